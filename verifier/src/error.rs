//! The one error type of the crate, with its mapping to gRPC status codes.

/// Errors of the verifier.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The request is malformed (unknown ability, bad test spec, empty batch...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The sandbox could not be set up or the runner failed outside the candidate's control.
    #[error("sandbox failure: {0}")]
    Sandbox(String),
    /// An I/O error while preparing or running a check.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server's settings are unusable (TLS files, a listener without a token).
    #[error("configuration: {0}")]
    Config(String),
    /// The service is shutting down or overloaded.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A file of `prime grade`: unreadable, a line refused, an output that cannot be written
    /// or that is the input. The message names the file (and line).
    #[error("{0}")]
    File(String),
}

impl From<prime_check::FileError> for VerifierError {
    fn from(e: prime_check::FileError) -> Self {
        Self::File(e.to_string())
    }
}

impl From<VerifierError> for tonic::Status {
    fn from(e: VerifierError) -> Self {
        match &e {
            VerifierError::InvalidRequest(_) | VerifierError::File(_) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            VerifierError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
            VerifierError::Sandbox(_) | VerifierError::Io(_) | VerifierError::Config(_) => {
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
