//! The actor loop. The calling thread is the compute thread: it owns the policy (tch tensors
//! are not `Sync`) and samples on it; every RPC runs on the actor's own tokio runtime through
//! `block_on`, so no tch call ever runs inside an async task.
//!
//! Sessions: the actor registers, then pulls and rolls out batches until the learner stops
//! knowing it (a restarted learner has forgotten every actor id) or a batch has to be given up.
//! Then it registers again after a pause. Registering anew is also how a batch is given up:
//! the learner re-queues the prompts of the old id when its lease lapses.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prime_model::memory::{actor_plan, decide, gib, ActorSetup, AttentionKernel, Decision};
use prime_model::transfer::{open_transfer, receive_chunks};
use prime_model::{
    default_kind, generate_within, CausalLm, KvBudget, ModelError, Qwen2Config, Tokenizer,
};
use prime_proto::client::{
    learner_client, request, verifier_client, with_deadline, LearnerClient, VerifierClient,
};
use prime_proto::v1 as pb;
use tch::Device;
use tracing::{debug, info, info_span, warn};

use crate::backoff::Backoff;
use crate::broadcast::{Delivered, Follower, FollowerConfig, Received};
use crate::config::ActorConfig;
use crate::error::{ActorError, Result};
use crate::rollout::{
    assemble_groups, batch_seed, grade_items, response_text, sample_rows, sampling_params,
    scores_from_grades,
};
use crate::telemetry::ActorMetrics;

/// What an actor did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActorStats {
    /// Successful `Register` calls (1 plus one per lost session).
    pub registrations: u64,
    /// Batches sampled, graded and submitted.
    pub batches: u64,
    /// Batches given up (weights or grades unobtainable, learner session lost, stopped).
    pub abandoned_batches: u64,
    /// Weight transfers over gRPC verified and applied.
    pub weight_fetches: u64,
    /// Versions received by the learner's weight broadcast and applied.
    pub weight_broadcasts: u64,
    /// Responses sampled.
    pub responses: u64,
    /// Tokens sampled, over all responses.
    pub generated_tokens: u64,
    /// Groups sent in `SubmitGroups` streams the learner answered.
    pub groups_submitted: u64,
    /// Groups the learner took.
    pub groups_accepted: u64,
    /// Groups the learner had already (a resubmission).
    pub groups_duplicate: u64,
    /// Groups the learner dropped as too old a policy version.
    pub groups_stale: u64,
    /// Groups the learner rejected as malformed.
    pub groups_rejected: u64,
    /// Policy version of the weights held at the end, if any were fetched.
    pub policy_version: Option<u64>,
    /// Where the submitted batches' time went, summed over them.
    pub time: BatchTimes,
}

/// Where one batch's time went (or, summed, many batches'). Each part is timed on the
/// actor's compute thread, so the parts do not overlap and add up to the batch's share of
/// the actor's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchTimes {
    /// From the end of the previous batch (or the start of the session) until this batch's
    /// work arrived: `PullWork` calls and the pauses while the learner had no work to hand
    /// out (it was training, or its in-flight cap was reached).
    pub waiting: Duration,
    /// Fetching, verifying and applying the batch's policy weights (zero when held).
    pub weights: Duration,
    /// Sampling the responses.
    pub sampling: Duration,
    /// Decoding the responses and the verifier's `Grade` calls.
    pub grading: Duration,
    /// The `SubmitGroups` stream.
    pub submitting: Duration,
}

impl BatchTimes {
    /// Adds `other` part by part.
    pub fn add(&mut self, other: &BatchTimes) {
        self.waiting += other.waiting;
        self.weights += other.weights;
        self.sampling += other.sampling;
        self.grading += other.grading;
        self.submitting += other.submitting;
    }
}

/// How often a wait checks the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Pause before asking again when the learner has no work and sets no `retry_after_ms`.
const EMPTY_POLL: Duration = Duration::from_secs(1);

/// Runs a rollout actor until `stop` is set (checked between steps and during every wait and
/// RPC; a `generate` call in progress is finished first), `config.max_batches` batches are
/// submitted, or an error that retrying cannot fix occurs: a rejected token, a service that
/// does not implement its API, no learner for `config.give_up_after`, or a failing sampler.
pub fn run_actor(config: ActorConfig, stop: Arc<AtomicBool>) -> Result<ActorStats> {
    config.validate()?;
    let tokenizer = Tokenizer::from_dir(&config.tokenizer)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("prime-actor-io")
        .enable_all()
        .build()?;
    let (learner, verifier) = {
        let _guard = runtime.enter();
        let token = config.token.as_deref();
        let learner = prime_proto::client::lazy_channel_secure(
            "learner",
            &config.learner,
            config.connect_timeout,
            token,
            &config.tls,
        )?;
        let verifier = |url: &str| {
            prime_proto::client::lazy_channel_secure(
                "verifier",
                url,
                config.connect_timeout,
                token,
                &config.tls,
            )
            .map(verifier_client)
        };
        let routes = config
            .verifier_routes
            .iter()
            .map(|(source, url)| Ok((source.clone(), verifier(url)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        (
            learner_client(learner),
            Verifiers {
                default: verifier(&config.verifier)?,
                routes,
            },
        )
    };
    let metrics = Arc::new(ActorMetrics::default());
    if let Some(addr) = config.metrics_listen {
        runtime
            .block_on(prime_proto::metrics::start(
                addr,
                Arc::new(metrics.registry()),
                metrics.probes(),
            ))
            .map_err(|e| ActorError::Config(format!("metrics_listen {addr}: {e}")))?;
    }
    // torch's default generator starts from a fixed seed in every process; unseeded sampling
    // must differ between actors and restarts.
    tch::manual_seed(rand::random::<i64>());
    let mut actor = Actor {
        config,
        stop,
        runtime,
        learner,
        verifier,
        tokenizer,
        policy: None,
        stats: ActorStats::default(),
        follower: None,
        kv_budget: None,
        memory: MemoryCheck::default(),
        metrics,
    };
    let result = actor.run();
    info!(stats = ?actor.stats, "actor stopped");
    result.map(|()| actor.stats)
}

/// Why a step did not finish.
enum Halt {
    /// The stop flag was set.
    Stop,
    /// The learner session is unusable or a batch had to be given up: register again.
    Lost(ActorError),
    /// Retrying cannot help; the actor returns the error.
    Fatal(ActorError),
}

impl From<ActorError> for Halt {
    fn from(e: ActorError) -> Self {
        if e.is_fatal() {
            Halt::Fatal(e)
        } else {
            Halt::Lost(e)
        }
    }
}

impl From<ModelError> for Halt {
    fn from(e: ModelError) -> Self {
        Halt::from(ActorError::from(e))
    }
}

/// The sampling model and the version of the weights it holds.
struct Policy {
    lm: CausalLm,
    /// `None` until weights have been applied (and after a failed apply).
    version: Option<u64>,
}

/// One registration with the learner.
struct Session {
    actor_id: String,
    lease: Duration,
    /// Used when a work batch carries no sampling parameters.
    sampling: Option<pb::SamplingParams>,
}

struct Actor {
    config: ActorConfig,
    stop: Arc<AtomicBool>,
    runtime: tokio::runtime::Runtime,
    learner: LearnerClient,
    verifier: Verifiers,
    tokenizer: Tokenizer,
    policy: Option<Policy>,
    stats: ActorStats,
    /// Follows the learner's weight broadcast, once a registration offered it.
    follower: Option<Follower>,
    /// The sampler's KV cache budget, resolved at the first batch once its weights are in
    /// place (so that a CUDA default counts them as taken) and kept: measured again later,
    /// the memory libtorch keeps cached from earlier batches would count as taken too.
    kv_budget: Option<KvBudget>,
    memory: MemoryCheck,
    /// What the metrics port exports.
    metrics: Arc<ActorMetrics>,
}

/// The verifier of every item: by its `data_source` where a route names it, else the default.
struct Verifiers {
    default: VerifierClient,
    routes: BTreeMap<String, VerifierClient>,
}

impl Verifiers {
    /// The items' positions split by the verifier that grades them: the default's first
    /// (`None`), then each route's in `data_source` order; routes without items are left out.
    fn split(&self, items: &[pb::GradeItem]) -> Vec<(Option<&str>, Vec<usize>)> {
        route_items(items, |source| {
            self.routes.get_key_value(source).map(|(k, _)| k.as_str())
        })
    }

    fn client(&self, route: Option<&str>) -> VerifierClient {
        route
            .and_then(|source| self.routes.get(source))
            .unwrap_or(&self.default)
            .clone()
    }
}

/// The positions of `items` grouped by `route(data_source)` (`None`: the default verifier),
/// the default's group first, each group in item order.
fn route_items<'a>(
    items: &[pb::GradeItem],
    route: impl Fn(&str) -> Option<&'a str>,
) -> Vec<(Option<&'a str>, Vec<usize>)> {
    let mut groups: BTreeMap<Option<&'a str>, Vec<usize>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        groups.entry(route(&item.data_source)).or_default().push(i);
    }
    groups.into_iter().collect()
}

/// What the actor's memory plan has been checked for (CUDA only).
#[derive(Debug, Default)]
struct MemoryCheck {
    /// The device's total bytes, asked once.
    device_bytes: Option<u64>,
    /// The largest batch checked: rows and cache columns.
    checked: Option<(u64, u64)>,
}

pub(crate) fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}

impl Actor {
    fn run(&mut self) -> Result<()> {
        let mut session_backoff = Backoff::new(self.config.max_backoff);
        loop {
            let outcome = self
                .register()
                .and_then(|session| self.serve(&session, &mut session_backoff));
            match outcome {
                Ok(()) | Err(Halt::Stop) => return Ok(()),
                Err(Halt::Fatal(e)) => return Err(e),
                Err(Halt::Lost(e)) => {
                    self.metrics.set_registered(false);
                    let delay = session_backoff.next_delay();
                    warn!(error = %e, ?delay, "learner session lost; registering again");
                    match self.sleep(delay) {
                        Err(Halt::Stop) => return Ok(()),
                        _ => continue,
                    }
                }
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn check_stop(&self) -> Result<(), Halt> {
        if self.stopped() {
            Err(Halt::Stop)
        } else {
            Ok(())
        }
    }

    /// Runs `future` on the runtime, giving up as soon as the stop flag is set.
    fn block_on<T, E: Into<ActorError>>(
        &self,
        future: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Halt> {
        let stop = &self.stop;
        self.runtime.block_on(async {
            tokio::select! {
                result = future => result.map_err(|e| Halt::from(e.into())),
                () = async {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(STOP_POLL).await;
                    }
                } => Err(Halt::Stop),
            }
        })
    }

    fn sleep(&self, duration: Duration) -> Result<(), Halt> {
        self.block_on(async {
            tokio::time::sleep(duration).await;
            Ok::<_, ActorError>(())
        })
    }

    /// Calls `call` until it succeeds, retrying errors that may pass (the service restarting
    /// or overloaded) with growing pauses for at most `config.retry_budget`.
    fn with_retries<T, E, F, Fut>(&self, what: &str, mut call: F) -> Result<T, Halt>
    where
        E: Into<ActorError>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.max_backoff);
        loop {
            match self.block_on(call()) {
                Err(Halt::Lost(e))
                    if e.is_retryable() && started.elapsed() < self.config.retry_budget =>
                {
                    let delay = backoff.next_delay();
                    warn!(error = %e, ?delay, "{what} failed; retrying");
                    self.sleep(delay)?;
                }
                other => return other,
            }
        }
    }

    /// Registers with the learner, retrying with growing pauses while it is unreachable, and
    /// makes sure the policy has the learner's architecture.
    fn register(&mut self) -> Result<Session, Halt> {
        let _span = info_span!("register", learner = %self.config.learner).entered();
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.max_backoff);
        let deadline = self.config.rpc_timeout;
        let message = pb::RegisterRequest {
            actor_name: self.config.name.clone(),
            device: device_name(self.config.device),
            max_batch_prompts: self.config.max_prompts,
        };
        let mut attempt = 0u64;
        let reply = loop {
            self.check_stop()?;
            attempt += 1;
            let mut client = self.learner.clone();
            let message = message.clone();
            let result =
                self.block_on(with_deadline("Learner", "Register", deadline, async move {
                    let call = client.register(request(message, deadline));
                    call.await.map(tonic::Response::into_inner)
                }));
            match result {
                Ok(reply) => break reply,
                Err(Halt::Lost(e)) => {
                    let waited = started.elapsed();
                    if let Some(limit) = self.config.give_up_after {
                        if waited >= limit {
                            return Err(Halt::Fatal(ActorError::GaveUp {
                                url: self.config.learner.clone(),
                                waited,
                            }));
                        }
                    }
                    let delay = backoff.next_delay();
                    // A learner that is starting up takes a while: say so, but not every time.
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        warn!(attempt, error = %e, ?delay, "cannot register with the learner yet");
                    } else {
                        debug!(attempt, error = %e, ?delay, "cannot register with the learner yet");
                    }
                    self.sleep(delay)?;
                }
                Err(other) => return Err(other),
            }
        };
        self.stats.registrations += 1;
        self.metrics.set_registered(true);
        self.metrics.learner_version(reply.policy_version);
        let model_config: Qwen2Config = serde_json::from_str(&reply.model_config_json)
            .map_err(|e| ActorError::Protocol(format!("model_config_json: {e}")))?;
        model_config
            .validate()
            .map_err(|e| ActorError::Protocol(format!("model_config_json: {e}")))?;
        self.ensure_model(&model_config)?;
        self.follow_broadcast(reply.weight_broadcast)?;
        info!(
            actor_id = %reply.actor_id,
            policy_version = reply.policy_version,
            lease_seconds = reply.lease_seconds,
            "registered"
        );
        Ok(Session {
            actor_id: reply.actor_id,
            lease: Duration::from_secs(reply.lease_seconds.into()),
            sampling: reply.sampling,
        })
    }

    /// Starts following the learner's weight broadcast when a registration offers one
    /// (`offered`, a `pb::BroadcastTransport`, is specified), the actor allows it and can take
    /// part (NCCL needs a CUDA device and an NCCL build; a transport this build does not know
    /// is declined). A follower lives as long as the actor, unless it ended (a learner that
    /// restarted without the broadcast); a later offer starts a new one.
    fn follow_broadcast(&mut self, offered: i32) -> Result<(), Halt> {
        let following = self.follower.as_ref().is_some_and(Follower::is_following);
        let none = pb::BroadcastTransport::Unspecified as i32;
        if offered == none || !self.config.weight_broadcast || following {
            return Ok(());
        }
        let Ok(transport) = pb::BroadcastTransport::try_from(offered) else {
            warn!(
                transport = offered,
                "the learner broadcasts weights over a transport this build does not know; \
                 fetching over gRPC"
            );
            return Ok(());
        };
        let nccl_capable = cfg!(feature = "nccl") && self.config.device.is_cuda();
        if transport == pb::BroadcastTransport::Nccl && !nccl_capable {
            info!(
                device = %device_name(self.config.device),
                "the learner broadcasts weights over NCCL, which this actor cannot join; \
                 fetching over gRPC"
            );
            return Ok(());
        }
        let learner_host = self
            .config
            .learner
            .parse::<tonic::codegen::http::Uri>()
            .ok()
            .and_then(|uri| uri.host().map(str::to_string))
            .ok_or_else(|| ActorError::Url {
                service: "learner",
                url: self.config.learner.clone(),
                message: "no host to join the weight broadcast at".into(),
            })?;
        let config = FollowerConfig {
            member_id: format!("{}-{:016x}", self.config.name, rand::random::<u64>()),
            learner_host,
            device: self.config.device,
            token: self.config.token.clone(),
        };
        info!(?transport, member = %config.member_id, "following the learner's weight broadcast");
        self.follower = Some(Follower::start(
            config,
            self.learner.clone(),
            self.runtime.handle().clone(),
        )?);
        Ok(())
    }

    /// Builds the policy for `config` unless the one held already has it; a new policy holds
    /// random weights until the first transfer.
    fn ensure_model(&mut self, config: &Qwen2Config) -> Result<(), Halt> {
        if let Some(policy) = &self.policy {
            if &policy.lm.config == config {
                return Ok(());
            }
            info!("the learner's model config changed; rebuilding the policy");
        }
        self.policy = None;
        let kind = default_kind(self.config.device);
        let lm = CausalLm::random(config, self.config.device, kind, kind)
            .map_err(|e| Halt::Fatal(e.into()))?;
        info!(
            parameters = config.num_parameters(),
            device = %device_name(self.config.device),
            ?kind,
            "built the policy"
        );
        self.policy = Some(Policy { lm, version: None });
        self.metrics.held_version(None, None);
        Ok(())
    }

    /// Pulls and rolls out batches until `max_batches` is reached (Ok) or the session ends.
    fn serve(&mut self, session: &Session, session_backoff: &mut Backoff) -> Result<(), Halt> {
        let mut idle_since = Instant::now();
        loop {
            if self
                .config
                .max_batches
                .is_some_and(|max| self.stats.batches >= max)
            {
                return Ok(());
            }
            self.check_stop()?;
            let batch = self.pull_work(session)?;
            self.metrics.learner_version(batch.policy_version);
            if batch.items.is_empty() {
                let wait = if batch.retry_after_ms > 0 {
                    Duration::from_millis(batch.retry_after_ms.into())
                } else {
                    EMPTY_POLL
                };
                debug!(?wait, "no work; waiting");
                self.sleep(wait)?;
                continue;
            }
            let span = info_span!(
                "batch",
                policy_version = batch.policy_version,
                prompts = batch.items.len()
            );
            let _entered = span.enter();
            if let Err(halt) = self.roll_out(session, batch, idle_since.elapsed()) {
                self.stats.abandoned_batches += 1;
                self.metrics.abandoned();
                return Err(halt);
            }
            idle_since = Instant::now();
            self.stats.batches += 1;
            session_backoff.reset();
        }
    }

    /// The KV cache budget ([`Actor::kv_budget`]), resolved on the first call.
    fn kv_budget(&mut self) -> Result<KvBudget> {
        if let Some(budget) = self.kv_budget {
            return Ok(budget);
        }
        let budget = KvBudget::resolve(self.config.kv_cache_gib, self.config.device)?;
        info!(%budget, "KV cache budget");
        self.kv_budget = Some(budget);
        Ok(budget)
    }

    fn pull_work(&self, session: &Session) -> Result<pb::WorkBatch, Halt> {
        let deadline = self.config.rpc_timeout;
        let message = pb::PullWorkRequest {
            actor_id: session.actor_id.clone(),
            max_prompts: self.config.max_prompts,
        };
        self.with_retries("PullWork", || {
            let mut client = self.learner.clone();
            let message = message.clone();
            with_deadline("Learner", "PullWork", deadline, async move {
                let call = client.pull_work(request(message, deadline));
                call.await.map(tonic::Response::into_inner)
            })
        })
    }

    /// Samples, grades and submits one batch whose work took `waiting` to arrive.
    fn roll_out(
        &mut self,
        session: &Session,
        batch: pb::WorkBatch,
        waiting: Duration,
    ) -> Result<(), Halt> {
        let started = Instant::now();
        let mut time = BatchTimes {
            waiting,
            ..BatchTimes::default()
        };
        let wire = batch
            .sampling
            .as_ref()
            .or(session.sampling.as_ref())
            .ok_or_else(|| ActorError::Protocol("work batch without sampling parameters".into()))?;
        let policy = self
            .policy
            .as_ref()
            .expect("registration builds the policy");
        let mut params = sampling_params(wire, &policy.lm.eos_token_ids())?;
        let work_ids: Vec<&str> = batch.items.iter().map(|i| i.work_id.as_str()).collect();
        params.seed = wire
            .seed
            .map(|seed| batch_seed(seed, batch.policy_version, &work_ids));
        let rows = sample_rows(&batch.items)?;
        self.check_memory(&batch.items, &rows, params.max_new_tokens)?;

        let weights_started = Instant::now();
        self.ensure_weights(batch.policy_version)?;
        time.weights = weights_started.elapsed();
        self.check_stop()?;
        let budget = self.kv_budget()?;
        let policy = self
            .policy
            .as_ref()
            .expect("registration builds the policy");
        let sampling_started = Instant::now();
        let generations = {
            let _span = info_span!("sample", rows = rows.len()).entered();
            let max_rows = rows.len().max(1);
            generate_within(&policy.lm.model, &rows, &params, max_rows, budget).map_err(
                |e| match e {
                    // The batch's prompts or parameters do not fit the model: give it up.
                    ModelError::Input(message) => Halt::Lost(ActorError::Protocol(message)),
                    other => Halt::Fatal(other.into()),
                },
            )?
        };
        let tokens: usize = generations.iter().map(|g| g.token_ids.len()).sum();
        time.sampling = sampling_started.elapsed();
        let sampling_secs = time.sampling.as_secs_f64();
        self.stats.responses += generations.len() as u64;
        self.stats.generated_tokens += tokens as u64;
        self.metrics
            .sampled(generations.iter().map(|g| g.token_ids.len()));
        debug!(
            tokens,
            tokens_per_second = tokens as f64 / sampling_secs.max(1e-9),
            "sampled"
        );

        let grading_started = Instant::now();
        let texts = generations
            .iter()
            .map(|g| response_text(&self.tokenizer, &g.token_ids))
            .collect::<Result<Vec<_>>>()?;
        let requested = grade_items(&batch.items, &texts)?;
        let results = self.grade(&requested)?;
        let scores = scores_from_grades(&requested, &results)?;
        time.grading = grading_started.elapsed();
        let groups = assemble_groups(
            &session.actor_id,
            batch.policy_version,
            &batch.items,
            generations,
            &scores,
        )?;
        let submitted = groups.len() as u64;
        let submit_started = Instant::now();
        let reply = self.submit(groups)?;
        time.submitting = submit_started.elapsed();
        self.stats.time.add(&time);

        self.metrics.submitted(&time, &reply);
        self.stats.groups_submitted += submitted;
        self.stats.groups_accepted += u64::from(reply.accepted);
        self.stats.groups_duplicate += u64::from(reply.duplicates);
        self.stats.groups_stale += u64::from(reply.stale);
        self.stats.groups_rejected += u64::from(reply.rejected);
        if reply.rejected > 0 {
            warn!(
                rejected = reply.rejected,
                first = %reply.first_rejection,
                "the learner rejected groups"
            );
        }
        let elapsed = started.elapsed();
        let mean_score = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len() as f64;
        info!(
            groups = submitted,
            accepted = reply.accepted,
            duplicates = reply.duplicates,
            stale = reply.stale,
            tokens,
            mean_score,
            secs = elapsed.as_secs_f64(),
            wait_secs = time.waiting.as_secs_f64(),
            weights_secs = time.weights.as_secs_f64(),
            sample_secs = time.sampling.as_secs_f64(),
            grade_secs = time.grading.as_secs_f64(),
            submit_secs = time.submitting.as_secs_f64(),
            "batch submitted"
        );
        if !session.lease.is_zero() && elapsed > session.lease {
            warn!(
                ?elapsed,
                lease = ?session.lease,
                "a batch took longer than the learner's lease; take fewer prompts per batch"
            );
        }
        Ok(())
    }

    /// On CUDA, the actor's memory plan (`prime_model::memory::actor_plan`, the one `prime
    /// plan` prints) for a batch of these prompts, before the first batch is sampled and
    /// before any larger one: a batch that does not fit stops the actor with the numbers and
    /// the `--max-prompts` that fits, unless `--force`.
    fn check_memory(
        &mut self,
        items: &[pb::WorkItem],
        rows: &[Vec<i64>],
        max_new: usize,
    ) -> Result<(), Halt> {
        let device = self.config.device;
        let Device::Cuda(index) = device else {
            return Ok(());
        };
        let prompts = items.len() as u64;
        let samples = items.iter().map(|i| u64::from(i.k)).max().unwrap_or(1);
        let prompt = rows.iter().map(Vec::len).max().unwrap_or(0) as u64;
        let shape = (rows.len() as u64, prompt + max_new as u64);
        if let Some((r, c)) = self.memory.checked {
            if shape.0 <= r && shape.1 <= c {
                return Ok(());
            }
        }
        let device_bytes = match self.memory.device_bytes {
            Some(bytes) => bytes,
            None => {
                let (_, total) =
                    prime_model::device::cuda_memory(index).map_err(|e| Halt::Fatal(e.into()))?;
                self.memory.device_bytes = Some(total);
                total
            }
        };
        let policy = self
            .policy
            .as_ref()
            .expect("registration builds the policy");
        let plan = actor_plan(
            &policy.lm.config,
            &ActorSetup {
                prompts,
                samples,
                prompt,
                max_new: max_new as u64,
                dtype: default_kind(device),
                kernel: AttentionKernel::for_device(device),
                device_bytes,
            },
        );
        match decide(&plan, self.config.force) {
            Decision::Fits => info!(
                rows = shape.0,
                columns = shape.1,
                planned_gib = %gib(plan.total_bytes()),
                device_gib = %gib(device_bytes),
                "the memory plan fits"
            ),
            Decision::Forced(message) => warn!("{message}; sampling anyway (--force)"),
            Decision::Refused(message) => {
                return Err(Halt::Fatal(ActorError::MemoryPlan(message)));
            }
        }
        let (r, c) = self.memory.checked.unwrap_or((0, 0));
        self.memory.checked = Some((r.max(shape.0), c.max(shape.1)));
        Ok(())
    }

    /// Fetches, verifies and applies the weights of `version` unless the policy has them.
    fn ensure_weights(&mut self, version: u64) -> Result<(), Halt> {
        if self.policy.as_ref().and_then(|p| p.version) == Some(version) {
            return Ok(());
        }
        if let Some(delivered) = self.follower.as_ref().and_then(|f| {
            f.take(
                version,
                self.config.broadcast_wait,
                self.config.weights_timeout,
                &self.stop,
            )
        }) {
            match self.apply_delivered(delivered) {
                Ok(()) => return Ok(()),
                Err(e) => warn!(error = %e, "broadcast weights unusable; fetching over gRPC"),
            }
        }
        self.check_stop()?;
        let _span = info_span!("fetch_weights", policy_version = version).entered();
        let started = Instant::now();
        let timeout = self.config.weights_timeout;
        let max_chunk = self.config.max_chunk_bytes as usize;
        let mut client = self.learner.clone();
        let message = pb::FetchWeightsRequest {
            policy_version: version,
            max_chunk_bytes: self.config.max_chunk_bytes,
        };
        let (mut stream, mut assembler) =
            self.block_on(with_deadline("Learner", "FetchWeights", timeout, async {
                let mut stream = client
                    .fetch_weights(request(message, timeout))
                    .await
                    .map_err(|s| ActorError::rpc("Learner", "FetchWeights", &s))?
                    .into_inner();
                let assembler = open_transfer(&mut stream, version).await?;
                Ok::<_, ActorError>((stream, assembler))
            }))?;
        let policy = self
            .policy
            .as_mut()
            .expect("registration builds the policy");
        // Refuse a transfer for another architecture before its bytes are sent.
        assembler.check_target(&policy.lm.vs)?;
        let remaining = timeout.saturating_sub(started.elapsed());
        self.block_on(with_deadline("Learner", "FetchWeights", remaining, async {
            receive_chunks(&mut stream, &mut assembler, max_chunk)
                .await
                .map_err(ActorError::from)
        }))?;
        let bytes = assembler.received_bytes();
        let policy = self
            .policy
            .as_mut()
            .expect("registration builds the policy");
        // A failed copy leaves the weights mixed: they belong to no version until the next.
        policy.version = None;
        self.metrics.held_version(None, None);
        policy.version = Some(assembler.apply(&policy.lm.vs)?);
        self.metrics.held_version(policy.version, Some("grpc"));
        self.stats.weight_fetches += 1;
        self.stats.policy_version = policy.version;
        info!(
            bytes,
            secs = started.elapsed().as_secs_f64(),
            "fetched and verified weights"
        );
        Ok(())
    }

    /// Applies weights the broadcast brought: host bytes are checked against the manifest's
    /// hashes first, like a gRPC transfer; device bytes are copied in as they are.
    fn apply_delivered(&mut self, delivered: Delivered) -> Result<()> {
        let started = Instant::now();
        let policy = self
            .policy
            .as_mut()
            .expect("registration builds the policy");
        let Delivered { manifest, bytes } = delivered;
        let version = manifest.policy_version;
        // A failed copy leaves the weights mixed: they belong to no version until the next.
        policy.version = None;
        self.metrics.held_version(None, None);
        policy.version = Some(match bytes {
            Received::Host(assembler) => {
                assembler.check_target(&policy.lm.vs)?;
                assembler.apply(&policy.lm.vs)?
            }
            Received::Device(bytes) => {
                prime_model::weights::apply_device_bytes(&manifest, &bytes, &policy.lm.vs)?
            }
        });
        self.metrics.held_version(policy.version, Some("broadcast"));
        self.stats.weight_broadcasts += 1;
        self.stats.policy_version = policy.version;
        info!(
            policy_version = version,
            secs = started.elapsed().as_secs_f64(),
            "applied broadcast weights"
        );
        Ok(())
    }

    /// Grades every response, each by the verifier its `data_source` routes it to, in as few
    /// `Grade` calls as the verifiers' batch limit allows; the results come back in the
    /// order of `requested`.
    fn grade(&self, requested: &[pb::GradeItem]) -> Result<Vec<pb::GradeResult>, Halt> {
        let deadline = self.config.grade_timeout;
        let mut results: Vec<Option<pb::GradeResult>> = vec![None; requested.len()];
        for (route, positions) in self.verifier.split(requested) {
            for chunk in positions.chunks(prime_verifier::service::MAX_BATCH_ITEMS) {
                let message = pb::GradeRequest {
                    items: chunk.iter().map(|&i| requested[i].clone()).collect(),
                };
                let answered = self.with_retries("grading", || {
                    let mut client = self.verifier.client(route);
                    let message = message.clone();
                    with_deadline("Verifier", "Grade", deadline, async move {
                        let call = client.grade(request(message, deadline));
                        crate::rollout::verdicts(call.await?.into_inner().results)
                    })
                })?;
                // A short answer is caught by `scores_from_grades` (the ids must match).
                for (&i, result) in chunk.iter().zip(answered) {
                    results[i] = Some(result);
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Streams the groups to the learner; a resubmission after a lost answer is harmless
    /// (groups are identified by their work id).
    fn submit(&self, groups: Vec<pb::RolloutGroup>) -> Result<pb::SubmitReply, Halt> {
        let deadline = self.config.rpc_timeout;
        self.with_retries("SubmitGroups", || {
            let mut client = self.learner.clone();
            let stream = tokio_stream::iter(groups.clone());
            with_deadline("Learner", "SubmitGroups", deadline, async move {
                let call = client.submit_groups(request(stream, deadline));
                call.await.map(tonic::Response::into_inner)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_split_by_their_data_source_route() {
        let item = |id: &str, source: &str| pb::GradeItem {
            id: id.into(),
            data_source: source.into(),
            ..Default::default()
        };
        let items = [
            item("a", "numina"),
            item("b", "custom"),
            item("c", ""),
            item("d", "custom"),
            item("e", "other"),
        ];
        let routes = ["custom".to_string(), "other".to_string()];
        let split = route_items(&items, |source| {
            routes.iter().find(|r| *r == source).map(String::as_str)
        });
        assert_eq!(
            split,
            vec![
                (None, vec![0, 2]),
                (Some("custom"), vec![1, 3]),
                (Some("other"), vec![4]),
            ]
        );
        assert!(route_items(&[], |_| None).is_empty());
    }
}
