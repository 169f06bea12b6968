//! The one error type of the actor crate.
use std::time::Duration;

/// Why the actor stopped with an error, or why one step of it failed.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// A setting of [`ActorConfig`](crate::ActorConfig) is unusable.
    #[error("invalid actor config: {0}")]
    Config(String),
    /// A service URL cannot be parsed.
    #[error("invalid {service} URL {url:?}: {message}")]
    Url {
        /// Which service the URL names.
        service: &'static str,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// A call was answered with a gRPC error or did not finish before its deadline.
    #[error("{service}.{rpc}: {code:?}: {message}")]
    Rpc {
        /// "Learner" or "Verifier".
        service: &'static str,
        /// The method called.
        rpc: &'static str,
        /// The gRPC status code (`DeadlineExceeded` for a local deadline too).
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// A service answered something that breaks the protocol (e.g. a weight stream without a
    /// manifest, or fewer grades than items).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The learner could not be reached for longer than `give_up_after`.
    #[error("no learner at {url} for {waited:?}; giving up")]
    GaveUp {
        /// The learner URL.
        url: String,
        /// How long the actor kept trying.
        waited: Duration,
    },
    /// Model construction, weight verification, tokenization or sampling failed.
    #[error(transparent)]
    Model(#[from] prime_model::ModelError),
    /// Joining the learner's weight broadcast group or receiving from it failed.
    #[error("weight broadcast: {0}")]
    Broadcast(#[from] prime_collective::CollectiveError),
    /// The actor's tokio runtime could not start.
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

impl ActorError {
    /// An RPC error from a gRPC status.
    pub(crate) fn rpc(service: &'static str, rpc: &'static str, status: &tonic::Status) -> Self {
        Self::Rpc {
            service,
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// The gRPC code of an RPC error, `None` for any other error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether trying again could help: the service may be restarting, overloaded or slow.
    /// Errors that only a change of configuration fixes (wrong token, wrong service at the
    /// address, a request the service calls invalid) are not retryable, nor are local errors.
    pub fn is_retryable(&self) -> bool {
        use tonic::Code;
        matches!(
            self.code(),
            Some(
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
            )
        )
    }

    /// Whether the error is a misconfiguration the actor cannot recover from by retrying or
    /// re-registering: a rejected token, or a server that does not implement the service.
    pub fn is_fatal(&self) -> bool {
        use tonic::Code;
        match self {
            Self::Rpc { code, .. } => matches!(
                code,
                Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented
            ),
            Self::Config(_) | Self::Url { .. } | Self::GaveUp { .. } | Self::Runtime(_) => true,
            Self::Protocol(_) | Self::Model(_) | Self::Broadcast(_) => false,
        }
    }
}

/// Results of the actor crate.
pub type Result<T, E = ActorError> = std::result::Result<T, E>;
