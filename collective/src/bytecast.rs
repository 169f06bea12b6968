//! A group that moves one byte string from rank 0 to every other rank: the communicator of
//! the learner's weight broadcast, over the TCP ring (host memory) or NCCL (CUDA memory).
//! Both ends of the broadcast (the learner sending, the actors receiving) hold one.
use std::net::TcpListener;
#[cfg(feature = "nccl")]
use std::time::Duration;

use crate::error::Result;
use crate::tcp::{HostBuffer, TcpGroup, TcpOptions};
use crate::RankInfo;

/// Where a member's received bytes end up.
pub enum Receiver<'a> {
    /// Host memory (the TCP ring): each piece goes to the sink as soon as it has arrived.
    Host(&'a mut dyn FnMut(Vec<u8>)),
    /// A 1-D `uint8` tensor on the member's CUDA device (NCCL), filled in place.
    Device(&'a mut tch::Tensor),
}

/// A broadcast group of one epoch.
pub enum ByteCast {
    /// The pipelined TCP ring.
    Tcp(TcpGroup),
    /// NCCL, watched: an operation past its limit aborts the communicator (the broadcast
    /// fails; the process goes on).
    #[cfg(feature = "nccl")]
    Nccl {
        /// The communicator.
        group: crate::Watched<crate::nccl::NcclGroup>,
        /// Its CUDA device.
        device: usize,
    },
}

impl std::fmt::Debug for ByteCast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(group) => f.debug_tuple("Tcp").field(group).finish(),
            #[cfg(feature = "nccl")]
            Self::Nccl { device, .. } => f.debug_struct("Nccl").field("device", device).finish(),
        }
    }
}

impl ByteCast {
    /// Joins a TCP group as `info.rank`; rank 0 joins on `listener`, bound beforehand on the
    /// port it handed out (the others need none).
    pub fn join_tcp(
        info: &RankInfo,
        options: TcpOptions,
        listener: Option<TcpListener>,
    ) -> Result<Self> {
        Ok(Self::Tcp(match listener {
            Some(listener) => TcpGroup::join_listening(info, options, listener)?,
            None => TcpGroup::join(info, options)?,
        }))
    }

    /// Joins an NCCL group from an id handed out by rank 0, on CUDA device `device`; each
    /// later broadcast may take `limit` before the communicator is aborted.
    #[cfg(feature = "nccl")]
    pub fn join_nccl(
        unique_id: &[u8],
        rank: usize,
        world_size: usize,
        device: usize,
        limit: Duration,
    ) -> Result<Self> {
        let group = crate::nccl::NcclGroup::from_unique_id(unique_id, rank, world_size, device)?;
        let abort = group.abort_handle();
        let dog = crate::Watchdog::new(limit, move |op, limit| {
            tracing::error!(op, ?limit, "the broadcast overran; aborting its group");
            abort.abort();
        });
        Ok(Self::Nccl {
            group: crate::Watched::new(group, dog),
            device,
        })
    }

    /// Rank 0: sends `bytes` to every other rank (NCCL sends from a device copy).
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Self::Tcp(group) => group.broadcast_host(HostBuffer::Send(bytes), 0),
            #[cfg(feature = "nccl")]
            Self::Nccl { group, device } => {
                use crate::Collective;
                let mut on_device =
                    tch::Tensor::from_slice(bytes).to_device(tch::Device::Cuda(*device));
                group.broadcast(&mut on_device, 0)
            }
        }
    }

    /// The CUDA device an NCCL group receives on; `None`: the group receives in host memory.
    pub fn device(&self) -> Option<usize> {
        match self {
            Self::Tcp(_) => None,
            #[cfg(feature = "nccl")]
            Self::Nccl { device, .. } => Some(*device),
        }
    }

    /// Ranks above 0: receives rank 0's `len` bytes into `into`, which must be the kind
    /// [`ByteCast::device`] says (a device tensor of `len` bytes for NCCL).
    pub fn receive(&mut self, len: usize, into: Receiver<'_>) -> Result<()> {
        match (self, into) {
            (Self::Tcp(group), Receiver::Host(sink)) => {
                group.broadcast_host(HostBuffer::Pieces { len, sink }, 0)
            }
            #[cfg(feature = "nccl")]
            (Self::Nccl { group, .. }, Receiver::Device(buffer)) => {
                use crate::Collective;
                crate::check_numel(buffer, len, "broadcast buffer")?;
                group.broadcast(buffer, 0)
            }
            (_, _) => Err(crate::CollectiveError::Tensor(
                "a broadcast received into the wrong kind of buffer".into(),
            )),
        }
    }
}
