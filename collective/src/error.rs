//! The one error type of the collective crate.
use std::time::Duration;

/// What can go wrong in a collective, a join or rank discovery.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A socket operation with a peer failed.
    #[error("rank {rank}: {op} with rank {peer}: {source}")]
    Io {
        rank: usize,
        peer: usize,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A peer closed its connection: it exited or was killed.
    #[error("rank {rank}: rank {peer} closed the connection during {op} (did it exit or die?)")]
    PeerClosed {
        rank: usize,
        peer: usize,
        op: &'static str,
    },
    /// An operation did not finish before its deadline.
    #[error(
        "rank {rank}: {op} did not finish within {limit:?} (a peer is stuck, dead or unreachable)"
    )]
    Timeout {
        rank: usize,
        op: &'static str,
        limit: Duration,
    },
    /// The ranks disagree on what they are doing (different op, size or epoch).
    #[error("rank {rank}: protocol: {message}")]
    Protocol { rank: usize, message: String },
    /// Forming the group failed.
    #[error("joining the group: {0}")]
    Join(String),
    /// The environment does not say which rank this is.
    #[error("rank discovery: {0}")]
    Env(String),
    /// A tensor the operation cannot take (dtype, size, layout).
    #[error("tensor: {0}")]
    Tensor(String),
    /// An NCCL call failed, or libnccl could not be loaded.
    #[error("nccl: {0}")]
    Nccl(String),
    /// A torch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// The crate's result type.
pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;
