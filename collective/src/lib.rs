//! Collective communication for the data-parallel learner.
//!
//! One trait, [`Collective`], with the operations data parallelism needs (all-reduce,
//! reduce-scatter, all-gather, broadcast, barrier) over tch tensors, and two backends:
//! [`tcp::TcpGroup`], a ring over TCP that runs anywhere (loopback in tests, the pod network
//! on a CPU cluster), and, with the `nccl` feature, `nccl::NcclGroup` on CUDA device memory.
//! [`bytecast::ByteCast`] moves one byte string from rank 0 to the others over either
//! backend (the learner's weight broadcast). [`env::RankInfo`] says which rank a process is; [`watchdog::Watchdog`] turns a collective
//! that never returns into a clear error and a non-zero exit.
pub mod bytecast;
pub mod env;
pub mod error;
pub mod flat;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;
pub mod watchdog;

use tch::Tensor;

pub use env::RankInfo;
pub use error::{CollectiveError, Result};
pub use tcp::{HostBuffer, TcpGroup, TcpOptions};
pub use watchdog::{Watchdog, Watched};

/// How an all-reduce or reduce-scatter combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise sum divided by the world size.
    Mean,
}

/// Collective operations over a fixed group of ranks. Every rank must call the same
/// operations in the same order with tensors of the same size and dtype; a backend checks
/// what it can and returns an error, never hangs past its deadline.
///
/// Tensors are flat views of their elements: shapes are not exchanged, only `numel` counts.
/// Reductions take f32 or bf16; broadcast and all-gather take any dtype.
pub trait Collective: Send {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Reduces `tensor` over all ranks, in place; every rank ends with the same values.
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Reduces `input` (`world_size × n` elements) over all ranks and leaves elements
    /// `rank·n .. (rank+1)·n` of the result in `output` (`n` elements).
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Concatenates every rank's `input` (`n` elements) in rank order into `output`
    /// (`world_size × n` elements).
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;
    /// Copies `root`'s `tensor` into every other rank's `tensor`.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// Sets how long each later operation may take and returns the previous limit. A rank
    /// that waits for rank 0's next instruction (while rank 0 collects rollouts) raises it
    /// for that one wait. Backends without a deadline of their own return `Duration::MAX`.
    fn set_op_timeout(&mut self, limit: std::time::Duration) -> std::time::Duration;
}

/// The group of one process: every operation is the identity, so single-process training
/// runs the same code path as data parallelism.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _tensor: &mut Tensor, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, _op: ReduceOp) -> Result<()> {
        check_numel(output, input.numel(), "reduce_scatter output")?;
        output.view(-1).copy_(&input.view(-1));
        Ok(())
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_numel(output, input.numel(), "all_gather output")?;
        output.view(-1).copy_(&input.view(-1));
        Ok(())
    }
    fn broadcast(&mut self, _tensor: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn set_op_timeout(&mut self, _limit: std::time::Duration) -> std::time::Duration {
        std::time::Duration::MAX
    }
}

impl<C: Collective + ?Sized> Collective for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        (**self).all_reduce(tensor, op)
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        (**self).reduce_scatter(input, output, op)
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        (**self).all_gather(input, output)
    }
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        (**self).broadcast(tensor, root)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
    fn set_op_timeout(&mut self, limit: std::time::Duration) -> std::time::Duration {
        (**self).set_op_timeout(limit)
    }
}

/// Errors unless `t` holds `numel` elements.
pub(crate) fn check_numel(t: &Tensor, numel: usize, what: &str) -> Result<()> {
    if t.numel() != numel {
        return Err(CollectiveError::Tensor(format!(
            "{what} has {} elements, expected {numel}",
            t.numel()
        )));
    }
    Ok(())
}

/// Broadcasts a byte string from `root` (its `bytes`; the others' are ignored) to every rank:
/// the length first, then the bytes. Used to hand non-tensor data (a batch of rollouts) from
/// rank 0 to the others. The tensors carrying it live on `device` (NCCL needs CUDA ones).
pub fn broadcast_bytes(
    comm: &mut dyn Collective,
    bytes: Vec<u8>,
    root: usize,
    device: tch::Device,
) -> Result<Vec<u8>> {
    if comm.world_size() == 1 {
        return Ok(bytes);
    }
    let mut len = Tensor::from_slice(&[bytes.len() as i64]).to_device(device);
    comm.broadcast(&mut len, root)?;
    let len = len.int64_value(&[0]) as usize;
    let mut data = if comm.rank() == root {
        Tensor::from_slice(&bytes).to_device(device)
    } else {
        Tensor::zeros([len as i64], (tch::Kind::Uint8, device))
    };
    comm.broadcast(&mut data, root)?;
    let data = data.to_device(tch::Device::Cpu);
    let mut out = vec![0u8; len];
    data.copy_data_u8(&mut out, len);
    Ok(out)
}
