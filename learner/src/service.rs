//! The `Learner` gRPC service: thin handlers over the [`Scheduler`] (work, groups, filter)
//! and the published policy weights, plus the compute loop that trains on each filtered batch
//! and publishes the next version. tch work happens only on the caller's thread in
//! [`run_learner`]; the tokio tasks do I/O and bookkeeping.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use prime_model::transfer::{manifest_to_proto, Published};
use prime_model::weights::{encode_var_store, DEFAULT_CHUNK_BYTES};
use prime_model::CausalLm;
use prime_proto::metrics::{duration_histogram, token_histogram, Histogram, Registry, Sink};
use prime_proto::v1 as pb;
use prime_proto::v1::learner_server::{Learner, LearnerServer};
use prime_verifier::service::ability_to_proto;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::batch::{ScoredGroup, ScoredResponse};
use crate::broadcast::{BroadcastHandle, Broadcaster, Transport};
use crate::config::WeightBroadcastConfig;
use crate::error::{LearnerError, Result};
use crate::scheduler::{Group, Pull, Scheduler, Submitted};
use crate::trainer::{StepRecord, Trainer};

/// Largest message the service accepts or sends (a weight chunk is at most 4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Live figures for `Status` and Prometheus.
#[derive(Debug)]
struct Live {
    step: AtomicU64,
    errors: AtomicU64,
    tokens_per_second_milli: AtomicU64,
    /// Seconds of each step's training (after its batch was complete).
    train_seconds: Histogram,
    /// Seconds each step waited for its batch (rollouts, grading, submission).
    rollout_seconds: Histogram,
    /// Tokens of each response in the groups submitted.
    response_tokens: Histogram,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            step: AtomicU64::default(),
            errors: AtomicU64::default(),
            tokens_per_second_milli: AtomicU64::default(),
            train_seconds: duration_histogram(),
            rollout_seconds: duration_histogram(),
            response_tokens: token_histogram(),
        }
    }
}

/// State shared by the handlers and the compute loop.
#[derive(Debug)]
pub struct Shared {
    scheduler: Mutex<Scheduler>,
    batch_ready: Condvar,
    published: RwLock<Arc<Published>>,
    /// The PRM's weights, published once a PRM server asked for them (`FetchPrmWeights`).
    published_prm: RwLock<Option<Arc<Published>>>,
    prm_wanted: AtomicBool,
    model_config_json: String,
    sampling: pb::SamplingParams,
    lease_seconds: u32,
    live: Live,
    /// Pushes each new version to following actors, when `learner.weight_broadcast` is on.
    broadcaster: OnceLock<Arc<Broadcaster>>,
}

impl Shared {
    /// Shared state around a scheduler and the first published weights.
    pub fn new(
        scheduler: Scheduler,
        published: Published,
        model_config_json: String,
        sampling: pb::SamplingParams,
        lease_seconds: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            scheduler: Mutex::new(scheduler),
            batch_ready: Condvar::new(),
            published: RwLock::new(Arc::new(published)),
            published_prm: RwLock::new(None),
            prm_wanted: AtomicBool::new(false),
            model_config_json,
            sampling,
            lease_seconds,
            live: Live::default(),
            broadcaster: OnceLock::new(),
        })
    }

    /// Shared state of a Learner service that serves `published` and has no real work to hand
    /// out (its scheduler holds one placeholder prompt): for benchmarks and tests of the weight
    /// transfers.
    pub fn serving_weights(published: Published) -> Result<Arc<Self>> {
        let prompt = crate::scheduler::Prompt {
            prompt_ids: vec![1],
            ground_truth: String::new(),
            ability: prime_verifier::Ability::Math,
            data_source: String::new(),
            extra_info: String::new(),
        };
        let scheduler = Scheduler::new(
            vec![prompt],
            crate::scheduler::SchedulerConfig {
                batch_groups: 1,
                k: 2,
                max_staleness: 0,
                lease: Duration::from_secs(60),
                filter: Default::default(),
                seed: 0,
                oversample: 1.0,
                max_outstanding_prompts: 0,
                vocab_size: 2,
                max_response_tokens: 1,
            },
            None,
        )?;
        Ok(Self::new(
            scheduler,
            published,
            String::new(),
            pb::SamplingParams::default(),
            60,
        ))
    }

    /// Starts the weight broadcast of the versions published here and offers it to actors
    /// from now on; its rounds start with the version after the current one.
    pub fn start_broadcast(
        &self,
        config: WeightBroadcastConfig,
        transport: Transport,
        bind_ip: std::net::IpAddr,
        token: Option<String>,
    ) -> std::io::Result<BroadcastHandle> {
        let handle = Broadcaster::start(config, transport, bind_ip, token, self.published())?;
        if self.broadcaster.set(handle.broadcaster().clone()).is_err() {
            tracing::warn!("a weight broadcaster was already attached; keeping the first");
        }
        Ok(handle)
    }

    /// The newest published policy weights.
    pub fn published(&self) -> Arc<Published> {
        self.published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `published` the weights `FetchWeights` serves and broadcasts it to followers.
    pub fn publish(&self, published: Published) {
        let published = Arc::new(published);
        *self.published.write().unwrap_or_else(|p| p.into_inner()) = published.clone();
        if let Some(broadcaster) = self.broadcaster.get() {
            broadcaster.publish(published);
        }
    }

    fn scheduler(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The status reply: scheduler figures plus the compute loop's.
    pub fn status(&self) -> pb::LearnerStatus {
        let status = self.scheduler().status(Instant::now());
        pb::LearnerStatus {
            build: Some(pb::BuildInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                role: pb::Role::Learner as i32,
            }),
            policy_version: status.policy_version,
            step: self.live.step.load(Ordering::Relaxed),
            pending_prompts: status.pending_prompts,
            groups_buffered: status.groups_buffered,
            connected_actors: status.connected_actors,
            tokens_per_second: self.live.tokens_per_second_milli.load(Ordering::Relaxed) as f64
                / 1000.0,
            filter_pass_rate: status.filter_pass_rate,
            errors: self.live.errors.load(Ordering::Relaxed),
            phase: pb::LearnerPhase::from(status.phase) as i32,
        }
    }

    /// A registry of the learner's metrics (docs/metrics.md, "Prometheus"), read from the
    /// scheduler and the compute loop at each scrape.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::default();
        let shared = self.clone();
        registry.register_collector(Box::new(prime_proto::metrics::Snapshot(
            move |sink: &mut Sink<'_>| shared.write_metrics(sink),
        )));
        registry
    }

    fn write_metrics(&self, out: &mut Sink<'_>) {
        let s = self.status();
        let scheduler = self.scheduler().status(Instant::now());
        let c = &scheduler.counters;
        out.gauge(
            "prime_learner_policy_version",
            "Current policy version.",
            s.policy_version as f64,
        );
        out.gauge("prime_learner_step", "RL iterations done.", s.step as f64);
        out.gauge(
            "prime_learner_work_backlog",
            "Work items the current step still needs that no actor holds a live lease on \
             (not handed out yet or lease expired); the actors' autoscaling metric.",
            scheduler.work_backlog as f64,
        );
        out.gauge(
            "prime_learner_pending_prompts",
            "Prompts not drawn yet in this pass over the data, plus prompts queued again.",
            s.pending_prompts as f64,
        );
        out.gauge(
            "prime_learner_in_flight",
            "Work items handed out and not yet returned.",
            scheduler.in_flight as f64,
        );
        out.gauge(
            "prime_learner_groups_buffered",
            "Kept groups waiting for the next step.",
            s.groups_buffered as f64,
        );
        out.gauge(
            "prime_learner_connected_actors",
            "Actors heard from within three leases.",
            f64::from(s.connected_actors),
        );
        out.gauge(
            "prime_learner_tokens_per_second",
            "Sampled tokens per second of the last step.",
            s.tokens_per_second,
        );
        out.gauge(
            "prime_learner_filter_pass_rate",
            "Share of the recent groups (up to 256) the filter kept.",
            s.filter_pass_rate,
        );
        out.counter("prime_learner_errors_total", "Failed steps.", s.errors);
        out.counters(
            "prime_learner_groups_total",
            "Groups submitted, by what became of them.",
            "outcome",
            &[
                ("kept", c.accepted),
                ("filtered", c.filtered),
                ("duplicate", c.duplicates),
                ("stale", c.stale),
                ("rejected", c.rejected),
            ],
        );
        out.counter(
            "prime_learner_work_reissued_total",
            "Work items whose lease ran out; their prompts were queued again.",
            c.reissued,
        );
        out.counter(
            "prime_learner_work_cancelled_total",
            "Work items out when their version ran out; their prompts were queued again.",
            c.cancelled,
        );
        out.histogram(
            "prime_learner_train_duration_seconds",
            "Training time of each step, once its batch was complete.",
            &self.live.train_seconds,
        );
        out.histogram(
            "prime_learner_rollout_duration_seconds",
            "Time each step waited for its batch of kept groups.",
            &self.live.rollout_seconds,
        );
        out.histogram(
            "prime_learner_response_length_tokens",
            "Tokens of each response in the groups the learner judged.",
            &self.live.response_tokens,
        );
        if let Some(broadcaster) = self.broadcaster.get() {
            let b = broadcaster.stats();
            out.counter(
                "prime_learner_broadcast_rounds_total",
                "Weight broadcasts completed.",
                b.rounds,
            );
            out.counter(
                "prime_learner_broadcast_failed_rounds_total",
                "Weight broadcasts failed (their members fetched over gRPC).",
                b.failed_rounds,
            );
            out.counter(
                "prime_learner_broadcast_groups_total",
                "Weight broadcast groups formed.",
                b.groups,
            );
            out.counter(
                "prime_learner_broadcast_sent_bytes_total",
                "Bytes the learner sent in weight broadcasts.",
                b.bytes_sent,
            );
            out.gauge(
                "prime_learner_broadcast_members",
                "Actors in the last weight broadcast.",
                b.members as f64,
            );
            out.gauge(
                "prime_learner_broadcast_waiting",
                "Actors waiting for the next weight broadcast.",
                b.waiting as f64,
            );
            out.histogram(
                "prime_learner_broadcast_duration_seconds",
                "Time of each completed weight broadcast, forming the group included.",
                broadcaster.round_seconds(),
            );
        }
    }
}

/// The gRPC handler.
#[derive(Debug, Clone)]
pub struct LearnerService {
    shared: Arc<Shared>,
}

impl LearnerService {
    /// The tonic server for `shared`.
    pub fn server(shared: Arc<Shared>) -> LearnerServer<Self> {
        LearnerServer::new(Self { shared })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The plain form of a submitted group; a response without a finish reason is refused (the
/// filter and the advantages must know which responses were truncated).
fn group_from_proto(group: pb::RolloutGroup) -> std::result::Result<Group, String> {
    let mut responses = Vec::with_capacity(group.responses.len());
    for (i, r) in group.responses.into_iter().enumerate() {
        let truncated = match pb::FinishReason::try_from(r.finish_reason) {
            Ok(pb::FinishReason::Stop) => false,
            Ok(pb::FinishReason::Length) => true,
            _ => {
                return Err(format!(
                    "group {}: response {i} has no valid finish_reason ({})",
                    group.group_id, r.finish_reason
                ))
            }
        };
        responses.push(ScoredResponse {
            truncated,
            ids: r.token_ids,
            sampling_logprobs: r.sampling_logprobs,
            score: f64::from(r.score),
        });
    }
    Ok(Group {
        group_id: group.group_id,
        actor_id: group.actor_id,
        policy_version: group.policy_version,
        scored: ScoredGroup {
            prompt_ids: group.prompt_ids,
            responses,
        },
    })
}

type WeightStream = Pin<Box<dyn Stream<Item = Result<pb::WeightTransfer, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let request = request.into_inner();
        let name = if request.actor_name.is_empty() {
            "actor"
        } else {
            request.actor_name.as_str()
        };
        let mut scheduler = self.shared.scheduler();
        let actor_id = scheduler.register(name, Instant::now());
        let policy_version = scheduler.status(Instant::now()).policy_version;
        drop(scheduler);
        tracing::info!(%actor_id, device = %request.device, "actor registered");
        Ok(Response::new(pb::RegisterReply {
            actor_id,
            lease_seconds: self.shared.lease_seconds,
            policy_version,
            sampling: Some(self.shared.sampling.clone()),
            model_config_json: self.shared.model_config_json.clone(),
            weight_broadcast: self
                .shared
                .broadcaster
                .get()
                .map_or(pb::BroadcastTransport::Unspecified, |b| {
                    b.transport().into()
                }) as i32,
        }))
    }

    async fn pull_work(
        &self,
        request: Request<pb::PullWorkRequest>,
    ) -> Result<Response<pb::WorkBatch>, Status> {
        let request = request.into_inner();
        let now = Instant::now();
        let mut scheduler = self.shared.scheduler();
        scheduler.expire(now);
        let pull = scheduler.pull(&request.actor_id, request.max_prompts.max(1) as usize, now);
        drop(scheduler);
        let reply = match pull {
            Pull::Work {
                policy_version,
                items,
            } => pb::WorkBatch {
                items: items
                    .into_iter()
                    .map(|w| pb::WorkItem {
                        work_id: w.work_id,
                        prompt_ids: w.prompt.prompt_ids.clone(),
                        ground_truth: w.prompt.ground_truth.clone(),
                        ability: ability_to_proto(Some(w.prompt.ability)) as i32,
                        k: w.k,
                        data_source: w.prompt.data_source.clone(),
                        extra_info: w.prompt.extra_info.clone(),
                    })
                    .collect(),
                policy_version,
                sampling: Some(self.shared.sampling.clone()),
                retry_after_ms: 0,
            },
            Pull::Busy { retry_after } => pb::WorkBatch {
                policy_version: self.shared.scheduler().status(now).policy_version,
                sampling: Some(self.shared.sampling.clone()),
                retry_after_ms: retry_after.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
                ..pb::WorkBatch::default()
            },
            Pull::UnknownActor => {
                return Err(Status::not_found(format!(
                "actor {:?} is not registered (the learner restarted or forgot it): register again",
                request.actor_id
            )))
            }
        };
        Ok(Response::new(reply))
    }

    async fn submit_groups(
        &self,
        request: Request<Streaming<pb::RolloutGroup>>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let mut incoming = request.into_inner();
        let mut reply = pb::SubmitReply::default();
        while let Some(group) = incoming.next().await {
            let group = group?;
            let group_id = group.group_id.clone();
            let outcome = match group_from_proto(group) {
                Ok(group) => {
                    for response in &group.scored.responses {
                        self.shared
                            .live
                            .response_tokens
                            .observe(response.ids.len() as f64);
                    }
                    self.shared.scheduler().submit(group, Instant::now())
                }
                Err(reason) => self.shared.scheduler().reject(&group_id, reason),
            };
            match outcome {
                Submitted::Kept | Submitted::Filtered => reply.accepted += 1,
                Submitted::Duplicate => reply.duplicates += 1,
                Submitted::Stale => reply.stale += 1,
                Submitted::Rejected(reason) => {
                    reply.rejected += 1;
                    if reply.first_rejection.is_empty() {
                        reply.first_rejection = reason;
                    }
                }
            }
            self.shared.batch_ready.notify_all();
        }
        Ok(Response::new(reply))
    }

    type FetchWeightsStream = WeightStream;

    async fn fetch_weights(
        &self,
        request: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let published = self
            .shared
            .published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        stream_weights(published, request.into_inner())
    }

    type FetchPrmWeightsStream = WeightStream;

    async fn fetch_prm_weights(
        &self,
        request: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchPrmWeightsStream>, Status> {
        self.shared.prm_wanted.store(true, Ordering::Relaxed);
        let published = self
            .shared
            .published_prm
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                Status::unavailable("the PRM's weights are published from the next step on")
            })?;
        stream_weights(published, request.into_inner())
    }

    async fn join_weight_broadcast(
        &self,
        request: Request<pb::JoinBroadcastRequest>,
    ) -> Result<Response<pb::BroadcastRound>, Status> {
        let broadcaster = self.shared.broadcaster.get().cloned().ok_or_else(|| {
            Status::failed_precondition(
                "this learner does not broadcast weights (learner.weight_broadcast.enabled is \
                 false): fetch them with FetchWeights",
            )
        })?;
        Ok(Response::new(broadcaster.join(request.into_inner()).await?))
    }

    async fn status(
        &self,
        _request: Request<pb::LearnerStatusRequest>,
    ) -> Result<Response<pb::LearnerStatus>, Status> {
        Ok(Response::new(self.shared.status()))
    }
}

/// The gRPC status of a learner error: what the caller did wrong, what it cannot have here,
/// what it may retry, and the rest as internal.
impl From<LearnerError> for Status {
    fn from(e: LearnerError) -> Self {
        match e {
            LearnerError::InvalidRequest(m) => Status::invalid_argument(m),
            LearnerError::Precondition(m) => Status::failed_precondition(m),
            LearnerError::Unavailable(m) => Status::unavailable(m),
            other => Status::internal(other.to_string()),
        }
    }
}

/// Streams `published` as a manifest and chunks, for `FetchWeights` and `FetchPrmWeights`.
fn stream_weights(
    published: Arc<Published>,
    request: pb::FetchWeightsRequest,
) -> Result<Response<WeightStream>, Status> {
    if request.policy_version != 0 && request.policy_version != published.policy_version {
        return Err(Status::failed_precondition(format!(
            "policy version {} is not published; the current one is {}",
            request.policy_version, published.policy_version
        )));
    }
    let chunk_bytes = match request.max_chunk_bytes as usize {
        0 => DEFAULT_CHUNK_BYTES,
        n => n.min(DEFAULT_CHUNK_BYTES),
    };
    let first = pb::WeightTransfer {
        payload: Some(pb::weight_transfer::Payload::Manifest(manifest_to_proto(
            &published.manifest,
        ))),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let total = published.bytes.len();
        for start in (0..total).step_by(chunk_bytes) {
            let end = (start + chunk_bytes).min(total);
            let message = pb::WeightTransfer {
                payload: Some(pb::weight_transfer::Payload::Chunk(pb::WeightChunk {
                    policy_version: published.policy_version,
                    offset: start as u64,
                    data: published.bytes.slice(start..end),
                })),
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// The weights of `lm`, encoded for publishing as version `policy_version`.
fn published(lm: &CausalLm, policy_version: u64) -> Result<Published> {
    Ok(Published::new(encode_var_store(
        &lm.vs,
        policy_version,
        None,
    )?))
}

/// Where the learner listens and who it lets in.
pub use prime_proto::auth::ListenOptions;

/// Serves the Learner service and health on a runtime of its own, then runs the compute loop
/// on this thread until the configured steps are done: wait for a filtered batch, train,
/// publish the new version. `on_listen` gets the bound gRPC address; `on_step` each record.
pub fn run_learner(
    mut trainer: Trainer,
    scheduler: Scheduler,
    options: &ListenOptions,
    on_listen: impl FnOnce(SocketAddr),
    mut on_step: impl FnMut(&StepRecord, &Trainer),
) -> Result<Trainer> {
    let sampling = {
        let params = trainer.rollout_params();
        pb::SamplingParams {
            max_new_tokens: params.max_new_tokens as u32,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            seed: None,
            stop_token_ids: params.stop_token_ids,
        }
    };
    let config_json = serde_json::to_string(&trainer.models.policy.config)
        .map_err(|e| LearnerError::Data(format!("model config: {e}")))?;
    let lease = trainer
        .config
        .rollout
        .lease_seconds
        .min(u64::from(u32::MAX)) as u32;
    let server_builder = options.auth.server(options.listen)?;
    let shared = Shared::new(
        scheduler,
        published(&trainer.models.policy, trainer.policy_version)?,
        config_json,
        sampling,
        lease,
    );
    shared.live.step.store(trainer.step, Ordering::Relaxed);
    let broadcast = &trainer.config.weight_broadcast;
    let broadcasting = if broadcast.enabled {
        let transport = Transport::resolve(broadcast.backend, trainer.models.policy.vs.device())?;
        let handle = shared
            .start_broadcast(
                broadcast.clone(),
                transport,
                options.listen.ip(),
                options.auth.token.clone(),
            )
            .map_err(LearnerError::io("weight broadcast thread"))?;
        tracing::info!(
            transport = transport.name(),
            "offering the weight broadcast"
        );
        Some(handle)
    } else {
        None
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(LearnerError::io("tokio runtime"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(options.listen))
        .map_err(LearnerError::io(options.listen.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(LearnerError::io(options.listen.to_string()))?;
    if let Some(metrics_addr) = options.metrics_listen {
        let registry = Arc::new(shared.registry());
        runtime
            .block_on(prime_proto::metrics::start(
                metrics_addr,
                registry,
                prime_proto::metrics::Probes::default(),
            ))
            .map_err(LearnerError::io(metrics_addr.to_string()))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let learner = options.auth.guard(LearnerService::server(shared.clone()));
        let mut server_builder = server_builder;
        runtime.spawn(async move {
            let (health_reporter, health_service) = tonic_health::server::health_reporter();
            health_reporter
                .set_serving::<LearnerServer<LearnerService>>()
                .await;
            let incoming = prime_proto::transport::incoming(listener);
            server_builder
                .add_service(health_service)
                .add_service(learner)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    tracing::info!(%addr, "learner listening");
    on_listen(addr);

    let result = compute_loop(&mut trainer, &shared, &mut on_step);
    // Before the server stops: the broadcast's long polls end at once.
    drop(broadcasting);
    let _ = stop_tx.send(());
    let _ = runtime.block_on(server);
    runtime.shutdown_timeout(Duration::from_secs(2));
    result.map(|()| trainer)
}

/// Waits for each filtered batch, trains on it and publishes the next version.
fn compute_loop(
    trainer: &mut Trainer,
    shared: &Shared,
    on_step: &mut impl FnMut(&StepRecord, &Trainer),
) -> Result<()> {
    let mut collecting_since = Instant::now();
    while !trainer.finished() {
        let batch = {
            let mut scheduler = shared.scheduler();
            loop {
                if let Some(batch) = scheduler.take_batch() {
                    break batch;
                }
                scheduler.expire(Instant::now());
                scheduler = shared
                    .batch_ready
                    .wait_timeout(scheduler, Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let rollout_seconds = collecting_since.elapsed().as_secs_f64();
        let step = trainer.train(batch, rollout_seconds, || shared.scheduler().state());
        let record = match step {
            Ok(record) => record,
            Err(e) => {
                shared.live.errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        shared.publish(published(&trainer.models.policy, trainer.policy_version)?);
        if shared.prm_wanted.load(Ordering::Relaxed) {
            let prm = published(&trainer.models.prm, trainer.policy_version)?;
            *shared
                .published_prm
                .write()
                .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(prm));
        }
        shared.live.step.store(trainer.step, Ordering::Relaxed);
        shared.live.rollout_seconds.observe(record.rollout_seconds);
        shared.live.train_seconds.observe(record.train_seconds);
        shared.live.tokens_per_second_milli.store(
            (record.tokens_per_second * 1000.0) as u64,
            Ordering::Relaxed,
        );
        shared.scheduler().publish(trainer.policy_version);
        collecting_since = Instant::now();
        on_step(&record, trainer);
    }
    trainer.tell_followers(crate::parallel::Command::Stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learner_errors_become_the_grpc_codes_a_caller_can_act_on() {
        let code = |e: LearnerError| Status::from(e).code();
        assert_eq!(
            code(LearnerError::InvalidRequest("bad".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(LearnerError::Precondition("not here".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(LearnerError::Unavailable("later".into())),
            tonic::Code::Unavailable
        );
        assert_eq!(code(LearnerError::Data("x".into())), tonic::Code::Internal);
        let status = Status::from(LearnerError::Precondition("needs CUDA".into()));
        assert_eq!(status.message(), "needs CUDA");
    }
}
