//! The rank protocol: what rank 0 tells the others between steps, and how a rank joins the
//! group.
use prime_collective::{broadcast_bytes, Collective};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::{comm_err, DataParallel};
use crate::batch::ScoredGroup;
use crate::config::ParallelConfig;
use crate::error::{LearnerError, Result};

/// What rank 0 tells the other ranks to do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Take part in the step `iteration` (0-based) on `groups`.
    Step {
        /// Drives the learning-rate schedule.
        iteration: u64,
        /// The whole batch.
        groups: Vec<ScoredGroup>,
    },
    /// Take part in gathering the sharded optimizer state for a checkpoint.
    Checkpoint,
    /// The run is over.
    Stop,
}

impl DataParallel {
    /// Rank 0: sends `command` to every other rank. Other ranks: wait for it (up to
    /// `idle_timeout_seconds`) and receive it.
    pub fn exchange(&mut self, command: Option<&Command>) -> Result<Command> {
        let bytes = match command {
            Some(c) => serde_json::to_vec(c).map_err(|e| LearnerError::Data(e.to_string()))?,
            None => Vec::new(),
        };
        let device = self.device;
        let idle = std::time::Duration::from_secs(self.config.idle_timeout_seconds.max(1));
        let waiting = command.is_none().then(|| self.comm.set_op_timeout(idle));
        let bytes = broadcast_bytes(&mut *self.comm, bytes, 0, device);
        if let Some(limit) = waiting {
            self.comm.set_op_timeout(limit);
        }
        let bytes = bytes.map_err(comm_err)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| LearnerError::Data(format!("a command from rank 0 is unreadable: {e}")))
    }
}

/// Forms this rank's group as `config` says, every operation under a watchdog: the TCP ring,
/// or NCCL on a CUDA `device` (with the `nccl` feature). `epoch` is the group generation the
/// launcher gives every rank of one start (`PRIME_GROUP_EPOCH`).
pub fn join_group(
    info: &prime_collective::RankInfo,
    config: &ParallelConfig,
    device: Device,
    epoch: u64,
) -> Result<Box<dyn Collective>> {
    use std::time::Duration;
    let limit = Duration::from_secs(config.collective_timeout_seconds.max(1));
    let join_timeout = Duration::from_secs(config.join_timeout_seconds.max(1));
    // The run's token proves membership of the group, as it does on every RPC.
    let token = std::env::var("PRIME_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    if config.backend.uses_nccl(device) {
        #[cfg(feature = "nccl")]
        {
            let group = prime_collective::nccl::NcclGroup::join(
                info,
                epoch,
                join_timeout,
                token.as_deref(),
            )?;
            let abort = group.abort_handle();
            let dog = prime_collective::Watchdog::exiting(limit, move || abort.abort());
            return Ok(Box::new(prime_collective::Watched::new(group, dog)));
        }
        #[cfg(not(feature = "nccl"))]
        return Err(LearnerError::Config {
            path: "learner.parallel.backend".into(),
            message: "the NCCL backend needs a build with `--features nccl`".into(),
        });
    }
    let options = prime_collective::tcp::TcpOptions {
        join_timeout,
        op_timeout: limit,
        epoch,
        token,
    };
    let group = prime_collective::TcpGroup::join(info, options)?;
    let abort = group.abort_handle();
    // The ring's own deadline fails a late operation first; the watchdog is the backstop
    // for a process stuck anyway.
    let dog =
        prime_collective::Watchdog::exiting(limit + Duration::from_secs(10), move || abort.abort());
    Ok(Box::new(prime_collective::Watched::new(group, dog)))
}
