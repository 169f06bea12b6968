//! gRPC plumbing shared by the actor and the `prime status` tool: lazily connecting channels,
//! the shared-token interceptor, deadlines and retry pauses.
use std::future::Future;
use std::time::Duration;

use prime_proto::auth::ClientTls;
use prime_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::config::MAX_MESSAGE_BYTES;
use crate::error::{ActorError, Result};

/// A channel that sends the shared token with every call.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;
/// Client of the learner.
pub type LearnerClient = pb::learner_client::LearnerClient<AuthChannel>;
/// Client of the verifier.
pub type VerifierClient = pb::verifier_client::VerifierClient<AuthChannel>;
/// Client of the PRM server.
pub type PrmClient = pb::prm_server_client::PrmServerClient<AuthChannel>;

/// Adds `authorization: Bearer TOKEN` to every request (see [`prime_proto::auth`]).
pub use prime_proto::auth::BearerToken;

/// A channel to `url` that connects on first use and reconnects after the server went away,
/// so a service that is not up yet (or restarts) shows up as `UNAVAILABLE` on each call
/// rather than as a construction error. Must be called inside a tokio runtime.
pub fn lazy_channel(
    service: &'static str,
    url: &str,
    connect_timeout: Duration,
    token: Option<&str>,
) -> Result<AuthChannel> {
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
) -> Result<AuthChannel> {
    let url_error = |message: String| ActorError::Url {
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
    let endpoint = prime_proto::transport::bulk_client(endpoint);
    let endpoint = tls.apply(endpoint).map_err(|e| url_error(e.to_string()))?;
    let bearer = BearerToken::new(token).map_err(|e| ActorError::Config(e.to_string()))?;
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

/// An error a call can end with: a gRPC status, or an error of the actor's own (a malformed
/// answer found while reading a stream).
pub trait CallError {
    /// The error as an [`ActorError`] of `service`'s method `rpc`.
    fn into_actor_error(self, service: &'static str, rpc: &'static str) -> ActorError;
}

impl CallError for tonic::Status {
    fn into_actor_error(self, service: &'static str, rpc: &'static str) -> ActorError {
        ActorError::rpc(service, rpc, &self)
    }
}

impl CallError for ActorError {
    fn into_actor_error(self, _service: &'static str, _rpc: &'static str) -> ActorError {
        self
    }
}

/// Awaits `call`, answering `DEADLINE_EXCEEDED` when it takes longer than `deadline`: the
/// grpc-timeout header bounds only the wait for the response headers, not a whole stream.
pub async fn with_deadline<T, E: CallError>(
    service: &'static str,
    rpc: &'static str,
    deadline: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.into_actor_error(service, rpc)),
        Err(_) => Err(ActorError::Rpc {
            service,
            rpc,
            code: tonic::Code::DeadlineExceeded,
            message: format!("no answer within {deadline:?}"),
        }),
    }
}

/// Exponential pauses between retries: 100 ms doubling up to a maximum, each drawn between
/// half and all of the current step so that actors restarted together do not retry in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
}

/// The first pause of a [`Backoff`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

impl Backoff {
    /// Pauses up to `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            step: INITIAL_BACKOFF.min(max),
            max,
        }
    }

    /// The next pause; the step doubles after each call, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0))
    }

    /// Starts again from the first pause, after a success.
    pub fn reset(&mut self) {
        self.step = INITIAL_BACKOFF.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(700));
        // Steps: 100, 200, 400, 700, 700; each pause lies in [step / 2, step].
        for step_ms in [100u64, 200, 400, 700, 700] {
            let delay = backoff.next_delay();
            let step = Duration::from_millis(step_ms);
            assert!(delay >= step / 2 && delay <= step, "{delay:?} for {step:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL_BACKOFF);
        // A maximum below the first step caps that too.
        let mut small = Backoff::new(Duration::from_millis(10));
        assert!(small.next_delay() <= Duration::from_millis(10));
    }

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
        let err = BearerToken::new(Some("tok\nen")).unwrap_err().to_string();
        assert!(err.contains("header"), "{err}");
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
        assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded));
        assert!(err.is_retryable() && !err.is_fatal());
        let refused = async { Err::<(), _>(tonic::Status::unauthenticated("wrong token")) };
        let err = with_deadline("Learner", "PullWork", Duration::from_secs(1), refused)
            .await
            .unwrap_err();
        assert!(!err.is_retryable() && err.is_fatal(), "{err}");
        assert_eq!(
            err.to_string(),
            "Learner.PullWork: Unauthenticated: wrong token"
        );
    }
}
