//! The one error type of the learner crate.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("data: {0}")]
    Data(String),
    #[error("plot: {0}")]
    Plot(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error(transparent)]
    Model(#[from] prime_model::ModelError),
    #[error(transparent)]
    World(#[from] prime_world::WorldError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Auth(#[from] prime_proto::auth::AuthError),
    #[error(transparent)]
    Collective(#[from] prime_collective::CollectiveError),
    /// A call to another service failed.
    #[error("rpc: {0}")]
    Rpc(String),
    /// A call to another service failed, or its channel could not be set up.
    #[error(transparent)]
    Client(#[from] prime_proto::client::ClientError),
    /// PRM scoring (the step split, the scorer) failed.
    #[error(transparent)]
    Prm(#[from] prime_prm_server::PrmError),
    /// A peer's request that cannot be served as asked.
    #[error("{0}")]
    InvalidRequest(String),
    /// A request this learner cannot serve in its configuration or state.
    #[error("{0}")]
    Precondition(String),
    /// The memory plan says this rank does not fit its GPU (the numbers and what to change).
    #[error("memory plan: {0}")]
    MemoryPlan(String),
    /// Not now: the learner is stopping or the answer went away; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
}

impl LearnerError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

pub type Result<T, E = LearnerError> = std::result::Result<T, E>;
