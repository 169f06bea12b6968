//! gRPC client plumbing shared by every caller of a prime-rs service (the actor, the PRM
//! server following a learner, `prime status`, the benchmarks): lazily connecting channels
//! with the shared-token interceptor, clients with a message limit that fits a weight chunk,
//! and deadlines.
use std::future::Future;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{AuthError, ClientTls};
use crate::v1 as pb;

pub use crate::auth::BearerToken;

/// A channel that sends the shared token with every call.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;
/// Client of the learner.
pub type LearnerClient = pb::learner_client::LearnerClient<AuthChannel>;
/// Client of the verifier.
pub type VerifierClient = pb::verifier_client::VerifierClient<AuthChannel>;
/// Client of the PRM server.
pub type PrmClient = pb::prm_server_client::PrmServerClient<AuthChannel>;

/// Most bytes a client accepts in one message from a service: a 4 MiB weight chunk plus its
/// framing fits, as do large work batches and grade responses.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Why a channel could not be set up or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A service URL (or the TLS settings for it) cannot be used.
    #[error("invalid {service} URL {url:?}: {message}")]
    Url {
        /// Which service the URL names.
        service: &'static str,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// The shared token cannot be sent.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A call was answered with a gRPC error or did not finish before its deadline.
    #[error("{service}.{rpc}: {code:?}: {message}")]
    Rpc {
        /// The service called, e.g. "Learner".
        service: &'static str,
        /// The method called.
        rpc: &'static str,
        /// The gRPC status code (`DeadlineExceeded` for a local deadline too).
        code: tonic::Code,
        /// The status message.
        message: String,
    },
}

impl ClientError {
    /// The error of `service`'s method `rpc` answered with `status`.
    pub fn rpc(service: &'static str, rpc: &'static str, status: &tonic::Status) -> Self {
        Self::Rpc {
            service,
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// The gRPC code of a failed call, `None` for an error setting up the channel.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            Self::Url { .. } | Self::Auth(_) => None,
        }
    }
}

/// A channel to `url` that connects on first use and reconnects after the server went away,
/// so a service that is not up yet (or restarts) shows up as `UNAVAILABLE` on each call
/// rather than as a construction error. Must be called inside a tokio runtime.
pub fn lazy_channel(
    service: &'static str,
    url: &str,
    connect_timeout: Duration,
    token: Option<&str>,
) -> Result<AuthChannel, ClientError> {
    lazy_channel_secure(service, url, connect_timeout, token, &ClientTls::default())
}

/// [`lazy_channel`] over TLS when `url` is `https://` (mutual TLS when `tls` carries a client
/// certificate).
pub fn lazy_channel_secure(
    service: &'static str,
    url: &str,
    connect_timeout: Duration,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<AuthChannel, ClientError> {
    let url_error = |message: String| ClientError::Url {
        service,
        url: url.to_string(),
        message,
    };
    if !url.contains("://") {
        return Err(url_error(
            "expected http://HOST:PORT or https://HOST:PORT".into(),
        ));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| url_error(e.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        // A peer that vanished without closing the connection (a killed pod) is noticed by
        // the pings instead of at the next deadline.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    // Weight streams arrive on these channels: large windows and frames (see the module).
    let endpoint = crate::transport::bulk_client(endpoint);
    let endpoint = tls.apply(endpoint).map_err(|e| url_error(e.to_string()))?;
    let bearer = BearerToken::new(token)?;
    Ok(InterceptedService::new(endpoint.connect_lazy(), bearer))
}

/// A learner client on `channel` that accepts messages up to [`MAX_MESSAGE_BYTES`] (tonic's
/// default limit of 4 MiB leaves no room for the framing of a full weight chunk).
pub fn learner_client(channel: AuthChannel) -> LearnerClient {
    LearnerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// A verifier client on `channel`, with the same message limit as [`learner_client`].
pub fn verifier_client(channel: AuthChannel) -> VerifierClient {
    VerifierClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// A PRM-server client on `channel`, with the same message limit as [`learner_client`].
pub fn prm_client(channel: AuthChannel) -> PrmClient {
    PrmClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// A request carrying `message` and `deadline` (sent as `grpc-timeout`, so the server gives up
/// too).
pub fn request<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// An error a call can end with: a gRPC status, or a caller's own error (a malformed answer
/// found while reading a stream, say), reported as the caller's error type.
pub trait CallError {
    /// What [`with_deadline`] returns for the call; a missed deadline becomes one too.
    type Error: From<ClientError>;

    /// The error as one of `service`'s method `rpc`.
    fn into_call_error(self, service: &'static str, rpc: &'static str) -> Self::Error;
}

impl CallError for tonic::Status {
    type Error = ClientError;

    fn into_call_error(self, service: &'static str, rpc: &'static str) -> ClientError {
        ClientError::rpc(service, rpc, &self)
    }
}

/// Awaits `call`, answering `DEADLINE_EXCEEDED` when it takes longer than `deadline`: the
/// grpc-timeout header bounds only the wait for the response headers, not a whole stream.
pub async fn with_deadline<T, E: CallError>(
    service: &'static str,
    rpc: &'static str,
    deadline: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E::Error> {
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.into_call_error(service, rpc)),
        Err(_) => Err(ClientError::Rpc {
            service,
            rpc,
            code: tonic::Code::DeadlineExceeded,
            message: format!("no answer within {deadline:?}"),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_a_scheme() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let err = lazy_channel("learner", "127.0.0.1:1", Duration::from_secs(1), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected http://HOST:PORT"), "{err}");
        assert!(lazy_channel(
            "learner",
            "http://127.0.0.1:1",
            Duration::from_secs(1),
            None
        )
        .is_ok());
        let err = lazy_channel(
            "learner",
            "http://127.0.0.1:1",
            Duration::from_secs(1),
            Some("token-with-a\nnewline-inside"),
        )
        .unwrap_err();
        assert!(
            matches!(err, ClientError::Auth(AuthError::BadToken)),
            "{err}"
        );
        assert!(err.to_string().contains("header"), "{err}");
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_deadline_exceeded() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, tonic::Status>(())
        };
        let err = with_deadline("Learner", "PullWork", Duration::from_millis(20), slow)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Rpc {
                    code: tonic::Code::DeadlineExceeded,
                    ..
                }
            ),
            "{err}"
        );
        let refused = async { Err::<(), _>(tonic::Status::unauthenticated("wrong token")) };
        let err = with_deadline("Learner", "PullWork", Duration::from_secs(1), refused)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Learner.PullWork: Unauthenticated: wrong token"
        );
    }
}
