//! The one error type of the actor crate.
use std::time::Duration;

use prime_model::ModelError;
use prime_proto::client::{CallError, ClientError};

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
    Model(prime_model::ModelError),
    /// Joining the learner's weight broadcast group or receiving from it failed.
    #[error("weight broadcast: {0}")]
    Broadcast(#[from] prime_collective::CollectiveError),
    /// The memory plan says a batch does not fit the GPU (the numbers and what to change).
    #[error("memory plan: {0}")]
    MemoryPlan(String),
    /// The actor's tokio runtime could not start.
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

impl From<ModelError> for ActorError {
    /// A weight stream's own errors keep their meaning for the actor: one that breaks the
    /// protocol is a protocol error, and a stream that ended with a gRPC error is an error of
    /// the call it answers (the actor receives weight streams only from `Learner.FetchWeights`),
    /// retryable or not by its code.
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::TransferProtocol(message) => Self::Protocol(message),
            ModelError::TransferStream { code, message } => Self::Rpc {
                service: "Learner",
                rpc: "FetchWeights",
                code,
                message,
            },
            other => Self::Model(other),
        }
    }
}

impl From<ClientError> for ActorError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Url {
                service,
                url,
                message,
            } => Self::Url {
                service,
                url,
                message,
            },
            ClientError::Auth(e) => Self::Config(e.to_string()),
            ClientError::Rpc {
                service,
                rpc,
                code,
                message,
            } => Self::Rpc {
                service,
                rpc,
                code,
                message,
            },
        }
    }
}

/// A call whose future ends with an actor error (a malformed answer found while reading it)
/// reports that error as it is.
impl CallError for ActorError {
    type Error = ActorError;

    fn into_call_error(self, _service: &'static str, _rpc: &'static str) -> ActorError {
        self
    }
}

impl ActorError {
    /// An RPC error from a gRPC status (as the shared client helpers describe it).
    pub(crate) fn rpc(service: &'static str, rpc: &'static str, status: &tonic::Status) -> Self {
        ClientError::rpc(service, rpc, status).into()
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
    /// re-registering: a rejected token, a server that does not implement the service, or a
    /// batch the memory plan says does not fit.
    pub fn is_fatal(&self) -> bool {
        use tonic::Code;
        match self {
            Self::Rpc { code, .. } => matches!(
                code,
                Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented
            ),
            Self::Config(_)
            | Self::Url { .. }
            | Self::GaveUp { .. }
            | Self::Runtime(_)
            | Self::MemoryPlan(_) => true,
            Self::Protocol(_) | Self::Model(_) | Self::Broadcast(_) => false,
        }
    }
}

/// Results of the actor crate.
pub type Result<T, E = ActorError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prime_proto::client::with_deadline;

    use super::*;

    #[tokio::test]
    async fn missed_deadlines_are_retried_and_refused_tokens_are_fatal() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, tonic::Status>(())
        };
        let err: ActorError = with_deadline("Learner", "PullWork", Duration::from_millis(20), slow)
            .await
            .unwrap_err()
            .into();
        assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded));
        assert!(err.is_retryable() && !err.is_fatal());
        let refused = async { Err::<(), _>(tonic::Status::unauthenticated("wrong token")) };
        let err: ActorError = with_deadline("Learner", "PullWork", Duration::from_secs(1), refused)
            .await
            .unwrap_err()
            .into();
        assert!(!err.is_retryable() && err.is_fatal(), "{err}");
        assert_eq!(
            err.to_string(),
            "Learner.PullWork: Unauthenticated: wrong token"
        );
        // An actor error inside the call comes out as it went in.
        let malformed = async { Err::<(), _>(ActorError::Protocol("two manifests".into())) };
        let err = with_deadline("Learner", "FetchWeights", Duration::from_secs(1), malformed)
            .await
            .unwrap_err();
        assert!(matches!(err, ActorError::Protocol(_)), "{err}");
    }

    #[test]
    fn weight_stream_errors_keep_their_meaning() {
        let cut = ActorError::from(ModelError::TransferStream {
            code: tonic::Code::Unavailable,
            message: "learner restarting".into(),
        });
        assert_eq!(cut.code(), Some(tonic::Code::Unavailable));
        assert!(cut.is_retryable());
        assert_eq!(
            cut.to_string(),
            "Learner.FetchWeights: Unavailable: learner restarting"
        );
        let short = ActorError::from(ModelError::TransferProtocol(
            "ended after 3 of 4 bytes".into(),
        ));
        assert!(matches!(short, ActorError::Protocol(_)));
        assert!(!short.is_retryable() && !short.is_fatal());
        let token = ActorError::from(ClientError::Auth(prime_proto::auth::AuthError::BadToken));
        assert!(
            matches!(token, ActorError::Config(_)) && token.is_fatal(),
            "{token}"
        );
    }
}
