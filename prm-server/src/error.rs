//! The one error type of the prm-server crate, with its mapping to gRPC status codes.
use std::path::PathBuf;

/// What can go wrong while scoring, serving or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum PrmError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A request or an input file is malformed (gRPC `INVALID_ARGUMENT`).
    #[error("invalid input: {0}")]
    Input(String),
    /// The service cannot answer now (gRPC `UNAVAILABLE`).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A call to another service failed.
    #[error("rpc: {0}")]
    Rpc(String),
    /// A plot could not be drawn.
    #[error("plot: {0}")]
    Plot(String),
    /// The model layer failed.
    #[error(transparent)]
    Model(#[from] prime_model::ModelError),
    /// A call to another service failed, or its channel could not be set up.
    #[error(transparent)]
    Client(#[from] prime_proto::client::ClientError),
    /// A tensor operation failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl PrmError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

impl From<PrmError> for tonic::Status {
    fn from(e: PrmError) -> Self {
        let message = e.to_string();
        match e {
            PrmError::Input(_) => tonic::Status::invalid_argument(message),
            PrmError::Model(prime_model::ModelError::Input(_)) => {
                tonic::Status::invalid_argument(message)
            }
            PrmError::Unavailable(_) => tonic::Status::unavailable(message),
            _ => tonic::Status::internal(message),
        }
    }
}

/// A call whose future ends with a PRM-server error (a bad weight stream) reports that error
/// as it is.
impl prime_proto::client::CallError for PrmError {
    type Error = PrmError;

    fn into_call_error(self, _service: &'static str, _rpc: &'static str) -> PrmError {
        self
    }
}

/// The crate's result type.
pub type Result<T, E = PrmError> = std::result::Result<T, E>;
