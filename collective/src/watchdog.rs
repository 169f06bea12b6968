//! A collective that never returns is the classic silent hang of data parallelism: NCCL has
//! no timeout at all, and a stuck peer leaves every other rank waiting. The [`Watchdog`]
//! watches the operation in flight from a thread of its own; past the limit it reports
//! which operation overran, aborts the communicator (which makes the blocked call return an
//! error) and, if the process is still stuck a grace period later, exits it with
//! [`WATCHDOG_EXIT_CODE`] so the launcher restarts the group.
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tch::Tensor;

use crate::error::Result;
use crate::{Collective, ReduceOp};

/// Exit status of a process the watchdog ended.
pub const WATCHDOG_EXIT_CODE: i32 = 75;

/// How long an aborted operation gets to return its error before the process is ended.
const GRACE: Duration = Duration::from_secs(5);

struct State {
    /// The time limit of an operation.
    limit: Duration,
    /// The operation in flight, since when, and its number.
    armed: Option<(&'static str, Instant, u64)>,
    ops: u64,
    /// The number of the operation already reported, so it fires once.
    fired: Option<u64>,
    stop: bool,
}

impl State {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            armed: None,
            ops: 0,
            fired: None,
            stop: false,
        }
    }
}

type Expiry = Box<dyn Fn(&'static str, Duration) + Send + Sync>;

/// Watches one operation at a time against a time limit.
pub struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("limit", &self.limit())
            .finish()
    }
}

impl Watchdog {
    /// Calls `on_expiry(op, limit)` once for each operation still armed after `limit`.
    pub fn new(
        limit: Duration,
        on_expiry: impl Fn(&'static str, Duration) + Send + Sync + 'static,
    ) -> Self {
        let shared = Arc::new((Mutex::new(State::new(limit)), Condvar::new()));
        let on_expiry: Expiry = Box::new(on_expiry);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("collective-watchdog".into())
                .spawn(move || watch(&shared, &on_expiry))
                .expect("spawning the watchdog thread")
        };
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// The production watchdog: past `limit` it logs the overrun, calls `abort` (which must
    /// make the blocked operation fail), and ends the process with [`WATCHDOG_EXIT_CODE`]
    /// if it has not ended a few seconds later.
    pub fn exiting(limit: Duration, abort: impl Fn() + Send + Sync + 'static) -> Self {
        Self::new(limit, move |op, limit| {
            tracing::error!(
                op,
                limit_s = limit.as_secs_f64(),
                "collective watchdog: {op} ran longer than {limit:?}; aborting the communicator \
                 (a rank is stuck or dead; the group must restart from its last checkpoint)"
            );
            abort();
            std::thread::sleep(GRACE);
            tracing::error!(
                op,
                "collective watchdog: still stuck after the abort; exiting"
            );
            std::process::exit(WATCHDOG_EXIT_CODE);
        })
    }

    /// The time limit.
    pub fn limit(&self) -> Duration {
        self.shared.0.lock().expect("watchdog state").limit
    }

    /// Changes the time limit of later operations; returns the previous one.
    pub fn set_limit(&self, limit: Duration) -> Duration {
        let (lock, wake) = &*self.shared;
        let previous = std::mem::replace(&mut lock.lock().expect("watchdog state").limit, limit);
        wake.notify_all();
        previous
    }

    /// Starts watching `op` until the guard is dropped.
    pub fn arm(&self, op: &'static str) -> WatchGuard<'_> {
        let (lock, wake) = &*self.shared;
        let mut state = lock.lock().expect("watchdog state");
        state.ops += 1;
        state.armed = Some((op, Instant::now(), state.ops));
        wake.notify_all();
        WatchGuard { dog: self }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, wake) = &*self.shared;
            lock.lock().expect("watchdog state").stop = true;
            wake.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch(shared: &(Mutex<State>, Condvar), on_expiry: &Expiry) {
    let (lock, wake) = shared;
    let mut state = lock.lock().expect("watchdog state");
    loop {
        if state.stop {
            return;
        }
        match state.armed {
            Some((op, since, id)) if state.fired != Some(id) => {
                let (elapsed, limit) = (since.elapsed(), state.limit);
                if elapsed >= limit {
                    state.fired = Some(id);
                    drop(state);
                    on_expiry(op, limit);
                    state = lock.lock().expect("watchdog state");
                } else {
                    state = wake
                        .wait_timeout(state, limit - elapsed)
                        .expect("watchdog")
                        .0;
                }
            }
            _ => state = wake.wait(state).expect("watchdog state"),
        }
    }
}

/// Disarms the watchdog when dropped.
#[derive(Debug)]
pub struct WatchGuard<'a> {
    dog: &'a Watchdog,
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        let (lock, wake) = &*self.dog.shared;
        lock.lock().expect("watchdog state").armed = None;
        wake.notify_all();
    }
}

/// A [`Collective`] whose every operation runs under a [`Watchdog`].
#[derive(Debug)]
pub struct Watched<C> {
    inner: C,
    dog: Watchdog,
}

impl<C: Collective> Watched<C> {
    /// Wraps `inner`; see [`Watchdog`].
    pub fn new(inner: C, dog: Watchdog) -> Self {
        Self { inner, dog }
    }
}

impl<C: Collective> Collective for Watched<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        let _guard = self.dog.arm("all_reduce");
        self.inner.all_reduce(tensor, op)
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        let _guard = self.dog.arm("reduce_scatter");
        self.inner.reduce_scatter(input, output, op)
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let _guard = self.dog.arm("all_gather");
        self.inner.all_gather(input, output)
    }
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let _guard = self.dog.arm("broadcast");
        self.inner.broadcast(tensor, root)
    }
    fn barrier(&mut self) -> Result<()> {
        let _guard = self.dog.arm("barrier");
        self.inner.barrier()
    }
    fn set_op_timeout(&mut self, limit: Duration) -> Duration {
        // The watchdog keeps its margin over the backend's own deadline.
        let previous = self.dog.limit();
        let inner = self.inner.set_op_timeout(limit);
        let margin = previous.saturating_sub(inner.min(previous));
        self.dog.set_limit(limit.saturating_add(margin));
        inner.min(previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fires_once_for_an_overrun_and_never_for_quick_ops() {
        let fired = Arc::new(AtomicUsize::new(0));
        let dog = {
            let fired = fired.clone();
            Watchdog::new(Duration::from_millis(100), move |op, _| {
                assert_eq!(op, "all_reduce");
                fired.fetch_add(1, Ordering::SeqCst);
            })
        };
        for _ in 0..20 {
            let _quick = dog.arm("barrier");
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(fired.load(Ordering::SeqCst), 0);
        {
            let _slow = dog.arm("all_reduce");
            std::thread::sleep(Duration::from_millis(400));
        }
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }
}
