//! A communication thread: the group's collectives run on a thread of their own, in the order
//! they are submitted, so that the compute thread can start one (ZeRO-3's all-gather of the
//! next layer) and go on computing while it travels. [`CommThread`] is itself a
//! [`Collective`] whose operations wait for their result, so every other use of the group is
//! unchanged and stays in order with the started ones.
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use prime_collective::{Collective, CollectiveError, ReduceOp};
use tch::Tensor;

/// One operation for the thread.
type Job = Box<dyn FnOnce(&mut dyn Collective) + Send>;

/// The group's collectives on a thread of their own.
pub struct CommThread {
    jobs: Option<mpsc::Sender<Job>>,
    rank: usize,
    world: usize,
    thread: Option<JoinHandle<()>>,
}

/// The result of a started operation.
#[derive(Debug)]
pub(super) struct Started<T> {
    result: mpsc::Receiver<T>,
    rank: usize,
}

impl<T> Started<T> {
    /// Waits for it.
    pub(super) fn wait(self) -> prime_collective::Result<T> {
        self.result.recv().map_err(|_| CollectiveError::Protocol {
            rank: self.rank,
            message: "the communication thread stopped".into(),
        })
    }
}

impl CommThread {
    /// Moves `comm` onto a new thread.
    pub fn spawn(mut comm: Box<dyn Collective>) -> Self {
        let (rank, world) = (comm.rank(), comm.world_size());
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("comm-rank{rank}"))
            .spawn(move || {
                tch::set_num_threads(1);
                for job in queue {
                    job(&mut *comm);
                }
            })
            .expect("a thread starts");
        Self {
            jobs: Some(jobs),
            rank,
            world,
            thread: Some(thread),
        }
    }

    /// Starts `op` after every operation submitted before it.
    pub(super) fn start<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut dyn Collective) -> T + Send + 'static,
    ) -> Started<T> {
        let (done, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |comm| {
            let _ = done.send(op(comm));
        });
        if let Some(jobs) = &self.jobs {
            // A stopped thread drops the job, and `wait` reports it.
            let _ = jobs.send(job);
        }
        Started {
            result,
            rank: self.rank,
        }
    }

    /// Runs `op` after every operation submitted before it and waits for it.
    fn run(
        &self,
        op: impl FnOnce(&mut dyn Collective) -> prime_collective::Result<()> + Send + 'static,
    ) -> prime_collective::Result<()> {
        self.start(op).wait()?
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Handles to the same tensors, to move into a job: it writes what the caller reads after
/// waiting.
fn handles(t: &Tensor) -> Tensor {
    t.shallow_clone()
}

/// The group as a [`Collective`] whose operations run on a [`CommThread`] (shared with the
/// code that starts operations there), each waited for.
pub struct ThreadedComm(pub(super) std::sync::Arc<CommThread>);

impl Collective for ThreadedComm {
    fn rank(&self) -> usize {
        self.0.rank
    }

    fn world_size(&self) -> usize {
        self.0.world
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> prime_collective::Result<()> {
        let mut t = handles(tensor);
        self.0.run(move |comm| comm.all_reduce(&mut t, op))
    }

    fn reduce_scatter(
        &mut self,
        input: &Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> prime_collective::Result<()> {
        let (input, mut output) = (handles(input), handles(output));
        self.0
            .run(move |comm| comm.reduce_scatter(&input, &mut output, op))
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> prime_collective::Result<()> {
        let (input, mut output) = (handles(input), handles(output));
        self.0.run(move |comm| comm.all_gather(&input, &mut output))
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> prime_collective::Result<()> {
        let mut t = handles(tensor);
        self.0.run(move |comm| comm.broadcast(&mut t, root))
    }

    fn barrier(&mut self) -> prime_collective::Result<()> {
        self.0.run(|comm| comm.barrier())
    }

    fn set_op_timeout(&mut self, limit: Duration) -> Duration {
        self.0
            .start(move |comm| comm.set_op_timeout(limit))
            .wait()
            .unwrap_or(limit)
    }
}
