//! What an actor needs to know to run: where the services are, where it samples, and how
//! patient it is with them.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tch::Device;

use crate::error::{ActorError, Result};

/// Settings of one rollout actor.
#[derive(Debug, Clone)]
pub struct ActorConfig {
    /// gRPC URL of the learner, e.g. `http://learner:50051`.
    pub learner: String,
    /// gRPC URL of the verifier, e.g. `http://verifier:50053`: it grades every item whose
    /// `data_source` has no route.
    pub verifier: String,
    /// Verifiers by `data_source`: items of these sources are graded by the verifier at the
    /// URL (any server of the `prime.v1.Verifier` service, e.g. a custom reward in Python;
    /// docs/verifier.md), the rest by [`ActorConfig::verifier`].
    pub verifier_routes: std::collections::BTreeMap<String, String>,
    /// Where the policy samples: f32 weights on the CPU, bf16 on CUDA.
    pub device: Device,
    /// Directory with the policy's `tokenizer.json`: responses are decoded to text for the
    /// verifier. The weights themselves always come from the learner.
    pub tokenizer: PathBuf,
    /// Name shown in the learner's logs (e.g. the pod name).
    pub name: String,
    /// Most prompts taken in one `PullWork` call; each is sampled K times in one batch.
    pub max_prompts: u32,
    /// Shared token, sent to both services as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// TLS material for `https://` service URLs.
    pub tls: prime_proto::auth::ClientTls,
    /// Deadline of `Register`, `PullWork` and `SubmitGroups`.
    pub rpc_timeout: Duration,
    /// Deadline of one whole weight transfer (manifest and every chunk).
    pub weights_timeout: Duration,
    /// Deadline of one verifier `Grade` call for a whole batch of responses.
    pub grade_timeout: Duration,
    /// Longest wait for a TCP connection to a service.
    pub connect_timeout: Duration,
    /// Largest pause between retries; pauses start at 100 ms and double up to this.
    pub max_backoff: Duration,
    /// How long grading and submitting a finished batch are retried when the service is
    /// unavailable before the batch is given up.
    pub retry_budget: Duration,
    /// Return [`ActorError::GaveUp`] when the learner cannot be registered with for this long;
    /// `None` keeps trying until stopped (the learner may come up late or restart).
    pub give_up_after: Option<Duration>,
    /// Largest weight chunk asked for, in bytes (the learner never sends more than 4 MiB).
    pub max_chunk_bytes: u32,
    /// Return after this many batches have been submitted; `None` runs until stopped.
    pub max_batches: Option<u64>,
    /// Follow the learner's weight broadcast when it offers one (each new version arrives in
    /// one collective broadcast; `FetchWeights` stays the fallback). Turn it off for an actor
    /// the learner cannot reach directly (behind a proxy, another network).
    pub weight_broadcast: bool,
    /// How long a batch waits for the broadcast round of its version to start before the
    /// actor fetches the weights over gRPC instead (only while the follower is in a group).
    pub broadcast_wait: Duration,
    /// Most GiB the sampler's KV cache may take (`prime_model::KvBudget`): a batch's rows
    /// decode as many at once as it holds, and a sequence it cannot hold alone gives the
    /// batch up. `None`: unbounded on the CPU; on CUDA half of the device memory free at the
    /// first batch, after the weights arrived (`prime_model::kv_cache::CUDA_FREE_MEMORY_FRACTION`).
    pub kv_cache_gib: Option<f64>,
    /// Sample even a batch the memory plan says does not fit the GPU; without it an actor on
    /// CUDA stops at such a batch with the numbers and the `--max-prompts` that fits.
    pub force: bool,
    /// Where the actor serves Prometheus metrics and its probes over HTTP (`/metrics`,
    /// `/healthz`, `/readyz`; [`crate::telemetry`]); `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
}

/// Largest chunk of a weight transfer, as the protocol fixes it.
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;

/// Most bytes accepted in one message from either service (the clients' limit).
pub use prime_proto::client::MAX_MESSAGE_BYTES;

impl ActorConfig {
    /// Defaults for everything but the two services and the tokenizer: CPU, 8 prompts a
    /// batch, 30 s RPC deadlines, 10 min for weights and grading, 10 s largest backoff.
    pub fn new(
        learner: impl Into<String>,
        verifier: impl Into<String>,
        tokenizer: impl Into<PathBuf>,
    ) -> Self {
        Self {
            learner: learner.into(),
            verifier: verifier.into(),
            verifier_routes: Default::default(),
            device: Device::Cpu,
            tokenizer: tokenizer.into(),
            name: "actor".into(),
            max_prompts: 8,
            token: None,
            tls: prime_proto::auth::ClientTls::default(),
            rpc_timeout: Duration::from_secs(30),
            weights_timeout: Duration::from_secs(600),
            grade_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(10),
            retry_budget: Duration::from_secs(60),
            give_up_after: None,
            max_chunk_bytes: MAX_CHUNK_BYTES,
            max_batches: None,
            weight_broadcast: true,
            broadcast_wait: Duration::from_secs(5),
            kv_cache_gib: None,
            force: false,
            metrics_listen: None,
        }
    }

    /// Checks the settings that cannot work whatever the services do.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("rpc_timeout", self.rpc_timeout),
            ("weights_timeout", self.weights_timeout),
            ("grade_timeout", self.grade_timeout),
            ("connect_timeout", self.connect_timeout),
            ("max_backoff", self.max_backoff),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(ActorError::Config(format!("{name} must be positive")));
            }
        }
        if let Some(gib) = self.kv_cache_gib {
            if !(gib.is_finite() && gib > 0.0) {
                return Err(ActorError::Config(format!(
                    "kv_cache_gib must be a positive number of GiB, got {gib}"
                )));
            }
        }
        if self.max_prompts == 0 {
            return Err(ActorError::Config("max_prompts must be at least 1".into()));
        }
        if self.max_chunk_bytes == 0 || self.max_chunk_bytes > MAX_CHUNK_BYTES {
            return Err(ActorError::Config(format!(
                "max_chunk_bytes must be in 1..={MAX_CHUNK_BYTES}, got {}",
                self.max_chunk_bytes
            )));
        }
        if let Some(token) = &self.token {
            prime_proto::auth::usable_token(Some(token))
                .map_err(|e| ActorError::Config(e.to_string()))?;
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ActorError::Config(
                    "token must be non-empty printable ASCII without spaces".into(),
                ));
            }
        }
        Ok(())
    }
}
