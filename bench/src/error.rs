//! The one error type of the bench crate.
use std::path::PathBuf;

/// Everything that can go wrong while benchmarking.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] prime_model::ModelError),
    #[error(transparent)]
    Learner(#[from] prime_learner::LearnerError),
    #[error(transparent)]
    Actor(#[from] prime_actor::error::ActorError),
    #[error(transparent)]
    Client(#[from] prime_proto::client::ClientError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A Python reference script failed or printed something other than its JSON line.
    #[error("{script}: {message}")]
    Reference { script: PathBuf, message: String },
    #[error("invalid benchmark settings: {0}")]
    Settings(String),
    /// A service under load (`prime bench load`) or its setup failed.
    #[error("load test: {0}")]
    Service(String),
}

pub type Result<T> = std::result::Result<T, BenchError>;
