//! The `PrmServer` gRPC service: a thin handler over the [`Scorer`] (which runs on one compute
//! thread that owns the models and batches the requests that wait together), step splitting
//! and Best-of-N ranking; the server wiring (health, shared token, Prometheus) and following a
//! learner for new PRM weights.
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use prime_model::transfer::{open_transfer, receive_chunks};
use prime_model::weights::{WeightAssembler, DEFAULT_CHUNK_BYTES};
use prime_model::{CausalLm, Tokenizer};
use prime_proto::metrics::{
    count_histogram, duration_histogram, Histogram, Registry, Sink, Snapshot,
};
use prime_proto::v1 as pb;
use prime_proto::v1::prm_server_server::{PrmServer, PrmServerServer};
use tch::{Device, Kind};
use tonic::{Request, Response, Status};

use crate::error::{PrmError, Result};
use crate::scorer::{Pair, Scorer};
use crate::steps::{self, Aggregation, StepSplit};
use crate::vote::{self, Voting};

/// Most responses one request may carry.
pub const MAX_REQUEST_RESPONSES: usize = 4096;
/// Largest message the service accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Requests kept for the latency percentiles and the throughput.
const RECENT: usize = 1024;
/// How long a stopping server waits for calls in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything `prime prm-server serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The implicit PRM's model directory (Hugging Face format).
    pub prm: PathBuf,
    /// The reference model's directory (the SFT start of the PRIME run).
    pub reference: PathBuf,
    /// Tokenizer directory (decoding for step splits and answers); the PRM's by default.
    pub tokenizer: Option<PathBuf>,
    /// The β of the rewards (the learner's `learner.algo.prm.beta`).
    pub beta: f64,
    /// Where the models run.
    pub device: Device,
    /// Weights and activations dtype.
    pub kind: Kind,
    /// Step split for responses that come without step ends.
    pub step_split: StepSplit,
    /// Most padded tokens in one forward.
    pub max_batch_tokens: usize,
    /// Most responses gathered from waiting requests into one device batch.
    pub max_batch_responses: usize,
    /// A learner to follow for new PRM weights.
    pub follow: Option<FollowConfig>,
}

/// Following a learner: poll its status, pull the PRM weights of each new version.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// The learner's gRPC URL.
    pub url: String,
    /// How often to ask for its version.
    pub poll: Duration,
    /// Deadline of one weight transfer.
    pub transfer_timeout: Duration,
    /// TLS towards the learner (for an `https://` URL).
    pub tls: prime_proto::auth::ClientTls,
}

/// Where the server listens and who it lets in (its token is also sent to a followed learner).
pub use prime_proto::auth::ListenOptions;

/// Live figures for `Status` and Prometheus.
#[derive(Debug)]
struct Live {
    responses: AtomicU64,
    tokens: AtomicU64,
    errors: AtomicU64,
    queued: AtomicU64,
    batches: AtomicU64,
    batch_max: AtomicU64,
    prm_version: AtomicU64,
    /// `(finished at, latency, response tokens)` of recent requests.
    recent: Mutex<VecDeque<(Instant, Duration, u64)>>,
    recent_batches: Mutex<VecDeque<u64>>,
    /// Seconds of each request answered.
    latency: Histogram,
    /// Responses in each device batch.
    batch_sizes: Histogram,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            responses: AtomicU64::default(),
            tokens: AtomicU64::default(),
            errors: AtomicU64::default(),
            queued: AtomicU64::default(),
            batches: AtomicU64::default(),
            batch_max: AtomicU64::default(),
            prm_version: AtomicU64::default(),
            recent: Mutex::default(),
            recent_batches: Mutex::default(),
            latency: duration_histogram(),
            batch_sizes: count_histogram(),
        }
    }
}

impl Live {
    fn record(&self, started: Instant, tokens: u64) {
        self.latency.observe(started.elapsed().as_secs_f64());
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back((Instant::now(), started.elapsed(), tokens));
    }

    fn record_batch(&self, responses: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_max.fetch_max(responses, Ordering::Relaxed);
        self.batch_sizes.observe(responses as f64);
        let mut recent = self
            .recent_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(responses);
    }

    /// `(p50 ms, p99 ms, tokens/s)` over the recent requests.
    fn recent_figures(&self) -> (f64, f64, f64) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let mut ms: Vec<f64> = recent.iter().map(|r| r.1.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        // Throughput over the span from the first recent request's start to the last finish.
        let first_start = recent.iter().map(|r| r.0 - r.1).min().expect("non-empty");
        let last_end = recent.iter().map(|r| r.0).max().expect("non-empty");
        let tokens: u64 = recent.iter().map(|r| r.2).sum();
        let span = (last_end - first_start).as_secs_f64().max(1e-6);
        (pick(0.5), pick(0.99), tokens as f64 / span)
    }

    fn batch_mean(&self) -> f64 {
        let recent = self
            .recent_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if recent.is_empty() {
            0.0
        } else {
            recent.iter().sum::<u64>() as f64 / recent.len() as f64
        }
    }
}

/// Work for the compute thread.
enum Job {
    Score {
        pairs: Vec<Pair>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>>>,
    },
    Load {
        assembler: WeightAssembler,
        version: u64,
        reply: tokio::sync::oneshot::Sender<Result<()>>,
    },
}

/// A handle to the compute thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    live: Arc<Live>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Score { pairs, .. } => write!(f, "Score({} pairs)", pairs.len()),
            Job::Load { version, .. } => write!(f, "Load(version {version})"),
        }
    }
}

impl Engine {
    /// Starts the compute thread around `scorer`; it batches up to `max_batch_responses`
    /// responses of the requests waiting together.
    fn start(scorer: Scorer, max_batch_responses: usize, live: Arc<Live>) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread_live = live.clone();
        std::thread::Builder::new()
            .name("prm-compute".into())
            .spawn(move || compute_loop(scorer, rx, max_batch_responses.max(1), &thread_live))
            .expect("spawn the compute thread");
        Self { jobs, live }
    }

    /// Token rewards of `pairs`, computed on the compute thread.
    pub async fn score(&self, pairs: Vec<Pair>) -> Result<Vec<Vec<f32>>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.live
            .queued
            .fetch_add(pairs.len() as u64, Ordering::Relaxed);
        self.jobs
            .send(Job::Score { pairs, reply })
            .map_err(|_| PrmError::Unavailable("the compute thread stopped".into()))?;
        rx.await
            .map_err(|_| PrmError::Unavailable("the compute thread stopped".into()))?
    }

    /// Copies assembled weights of learner version `version` into the PRM.
    pub async fn load(&self, assembler: WeightAssembler, version: u64) -> Result<()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Load {
                assembler,
                version,
                reply,
            })
            .map_err(|_| PrmError::Unavailable("the compute thread stopped".into()))?;
        rx.await
            .map_err(|_| PrmError::Unavailable("the compute thread stopped".into()))?
    }
}

/// The compute thread: takes a job, gathers the score jobs already waiting behind it (up to
/// the batch limit), runs them as one batch and answers each.
fn compute_loop(scorer: Scorer, rx: mpsc::Receiver<Job>, max_batch: usize, live: &Live) {
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        match job {
            Job::Load {
                assembler,
                version,
                reply,
            } => {
                // `apply` checks names, shapes and hashes before copying anything.
                let result = assembler
                    .apply(&scorer.prm.vs)
                    .map(|_| ())
                    .map_err(PrmError::from);
                if result.is_ok() {
                    live.prm_version.store(version, Ordering::Relaxed);
                    tracing::info!(version, "loaded new PRM weights");
                }
                let _ = reply.send(result);
            }
            Job::Score { pairs, reply } => {
                let mut batch = vec![(pairs, reply)];
                let mut size = batch[0].0.len();
                while size < max_batch {
                    match rx.try_recv() {
                        Ok(Job::Score { pairs, reply }) => {
                            size += pairs.len();
                            batch.push((pairs, reply));
                        }
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                score_batch(&scorer, batch, live);
            }
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>>>;

/// Scores the valid requests of a batch in one go; a request with a bad pair fails alone.
fn score_batch(scorer: &Scorer, batch: Vec<(Vec<Pair>, Reply)>, live: &Live) {
    let mut valid = Vec::new();
    for (pairs, reply) in batch {
        live.queued.fetch_sub(pairs.len() as u64, Ordering::Relaxed);
        match pairs.iter().try_for_each(|p| scorer.check(p)) {
            Ok(()) => valid.push((pairs, reply)),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
    if valid.is_empty() {
        return;
    }
    let all: Vec<Pair> = valid.iter().flat_map(|(p, _)| p.iter().cloned()).collect();
    let _span = tracing::debug_span!("score_batch", responses = all.len()).entered();
    live.record_batch(all.len() as u64);
    match scorer.token_rewards(&all) {
        Ok(rewards) => {
            let mut rewards = rewards.into_iter();
            for (pairs, reply) in valid {
                let mine: Vec<Vec<f32>> = rewards.by_ref().take(pairs.len()).collect();
                let _ = reply.send(Ok(mine));
            }
        }
        Err(e) => {
            let message = e.to_string();
            tracing::warn!(error = %message, "scoring failed");
            for (_, reply) in valid {
                let _ = reply.send(Err(PrmError::Unavailable(message.clone())));
            }
        }
    }
}

/// The scores of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseRewards {
    /// One reward per response token.
    pub token_rewards: Vec<f32>,
    /// Where each step ends.
    pub step_ends: Vec<u32>,
    /// The sum of the token rewards of each step.
    pub step_scores: Vec<f32>,
}

/// The gRPC handler.
#[derive(Debug, Clone)]
pub struct PrmService {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    default_split: Arc<StepSplit>,
    info: Arc<Info>,
}

#[derive(Debug)]
struct Info {
    prm_model: String,
    reference_model: String,
    beta: f64,
    learner_url: String,
}

/// A response to score, with its caller-given step ends (empty: split by text).
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    /// The pair.
    pub pair: Pair,
    /// Caller-given step ends, possibly empty.
    pub step_ends: Vec<u32>,
}

impl PrmService {
    /// Token rewards, step ends and step scores of each request, in order.
    pub async fn score(
        &self,
        requests: Vec<ScoreRequest>,
        split: Option<&str>,
    ) -> Result<Vec<ResponseRewards>> {
        if requests.len() > MAX_REQUEST_RESPONSES {
            return Err(PrmError::Input(format!(
                "{} responses exceed the limit of {MAX_REQUEST_RESPONSES} per request",
                requests.len()
            )));
        }
        let split = match split {
            Some(s) if !s.is_empty() => Arc::new(s.parse::<StepSplit>()?),
            _ => self.default_split.clone(),
        };
        for r in &requests {
            if !r.step_ends.is_empty() {
                steps::check_step_ends(&r.step_ends, r.pair.response_ids.len())?;
            }
        }
        let pairs: Vec<Pair> = requests.iter().map(|r| r.pair.clone()).collect();
        let rewards = self.engine.score(pairs).await?;
        // Decoding for the step split is CPU work: off the async workers.
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || {
            requests
                .into_iter()
                .zip(rewards)
                .map(|(r, token_rewards)| {
                    let step_ends = if r.step_ends.is_empty() {
                        steps::step_ends(&tokenizer, &r.pair.response_ids, &split)?
                    } else {
                        r.step_ends
                    };
                    let step_scores = steps::step_scores(&token_rewards, &step_ends);
                    Ok(ResponseRewards {
                        token_rewards,
                        step_ends,
                        step_scores,
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| PrmError::Unavailable(format!("step split task: {e}")))?
    }

    fn status(&self) -> pb::PrmStatus {
        let live = &self.engine.live;
        let (p50, p99, tokens_per_second) = live.recent_figures();
        pb::PrmStatus {
            build: Some(pb::BuildInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                role: pb::Role::PrmServer as i32,
            }),
            prm_model: self.info.prm_model.clone(),
            reference_model: self.info.reference_model.clone(),
            beta: self.info.beta,
            responses_scored: live.responses.load(Ordering::Relaxed),
            tokens_scored: live.tokens.load(Ordering::Relaxed),
            errors: live.errors.load(Ordering::Relaxed),
            queue_depth: live.queued.load(Ordering::Relaxed),
            tokens_per_second,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            prm_version: live.prm_version.load(Ordering::Relaxed),
            learner_url: self.info.learner_url.clone(),
            batches: live.batches.load(Ordering::Relaxed),
            batch_size_mean: live.batch_mean(),
            batch_size_max: live.batch_max.load(Ordering::Relaxed),
            step_split: self.default_split.name(),
        }
    }

    /// A registry of the server's metrics (docs/metrics.md, "Prometheus"), read at each
    /// scrape.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        let live = self.engine.live.clone();
        registry.register_collector(Box::new(Snapshot(move |out: &mut Sink<'_>| {
            let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
            out.counter(
                "prime_prm_responses_scored_total",
                "Responses scored.",
                load(&live.responses),
            );
            out.counter(
                "prime_prm_tokens_scored_total",
                "Response tokens scored.",
                load(&live.tokens),
            );
            out.counter(
                "prime_prm_errors_total",
                "Requests answered with an error.",
                load(&live.errors),
            );
            out.counter(
                "prime_prm_batches_total",
                "Device batches run.",
                load(&live.batches),
            );
            out.gauge(
                "prime_prm_queue_depth",
                "Responses waiting for the model.",
                load(&live.queued) as f64,
            );
            out.gauge(
                "prime_prm_version",
                "Learner version of the PRM weights served (0: loaded from disk).",
                load(&live.prm_version) as f64,
            );
            out.histogram(
                "prime_prm_request_duration_seconds",
                "Time of each ProcessRewards or BestOfN request answered.",
                &live.latency,
            );
            out.histogram(
                "prime_prm_batch_size_responses",
                "Responses in each device batch.",
                &live.batch_sizes,
            );
        })));
        registry
    }

    /// Counts a finished request.
    fn finish<T>(&self, started: Instant, result: &Result<T>, responses: usize, tokens: u64) {
        let live = &self.engine.live;
        match result {
            Ok(_) => {
                live.responses
                    .fetch_add(responses as u64, Ordering::Relaxed);
                live.tokens.fetch_add(tokens, Ordering::Relaxed);
                live.record(started, tokens);
            }
            Err(_) => {
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> PrmServerServer<Self> {
        PrmServerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn best_of_n(&self, request: pb::BestOfNRequest) -> Result<pb::BestOfNResponse> {
        if request.candidates.is_empty() {
            return Err(PrmError::Input("no candidates to rank".into()));
        }
        let aggregation = match pb::Aggregation::try_from(request.aggregation) {
            Ok(pb::Aggregation::Sum) => Aggregation::Sum,
            Ok(pb::Aggregation::Mean) => Aggregation::Mean,
            Ok(pb::Aggregation::Last) => Aggregation::Last,
            Ok(pb::Aggregation::Min | pb::Aggregation::Unspecified) => Aggregation::Min,
            Err(_) => return Err(PrmError::Input("unknown aggregation".into())),
        };
        let voting = match pb::Voting::try_from(request.voting) {
            Ok(pb::Voting::Majority) => Voting::Majority,
            Ok(pb::Voting::Weighted) => Voting::Weighted,
            Ok(pb::Voting::None | pb::Voting::Unspecified) => Voting::None,
            Err(_) => return Err(PrmError::Input("unknown voting".into())),
        };
        let given: Vec<String> = request
            .candidates
            .iter()
            .map(|c| c.answer.clone())
            .collect();
        let requests: Vec<ScoreRequest> = request
            .candidates
            .into_iter()
            .map(|c| ScoreRequest {
                pair: Pair {
                    prompt_ids: request.prompt_ids.clone(),
                    response_ids: c.response_ids,
                },
                step_ends: c.step_ends,
            })
            .collect();
        let responses: Vec<Vec<i64>> = requests
            .iter()
            .map(|r| r.pair.response_ids.clone())
            .collect();
        let rewards = self.score(requests, Some(&request.step_split)).await?;
        let scores: Vec<f32> = rewards
            .iter()
            .map(|r| aggregation.apply(&r.step_scores))
            .collect();
        let tokenizer = self.tokenizer.clone();
        let answers: Vec<Option<String>> = tokio::task::spawn_blocking(move || {
            given
                .into_iter()
                .zip(&responses)
                .map(|(answer, ids)| {
                    if !answer.is_empty() {
                        return Ok(Some(answer));
                    }
                    Ok(vote::extract_answer(&tokenizer.decode(ids, true)?))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| PrmError::Unavailable(format!("answer task: {e}")))??;
        let ranking = vote::rank(&scores, &answers, voting);
        Ok(pb::BestOfNResponse {
            ranking: ranking.into_iter().map(|i| i as u32).collect(),
            scores,
            candidate_rewards: rewards
                .into_iter()
                .map(|r| to_proto(String::new(), r))
                .collect(),
            answers: answers.into_iter().map(Option::unwrap_or_default).collect(),
        })
    }
}

fn to_proto(id: String, r: ResponseRewards) -> pb::PairRewards {
    pb::PairRewards {
        id,
        token_rewards: r.token_rewards,
        step_scores: r.step_scores,
        step_ends: r.step_ends,
    }
}

#[tonic::async_trait]
impl PrmServer for PrmService {
    async fn process_rewards(
        &self,
        request: Request<pb::ProcessRewardsRequest>,
    ) -> Result<Response<pb::ProcessRewardsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let ids: Vec<String> = request.pairs.iter().map(|p| p.id.clone()).collect();
        let tokens: u64 = request
            .pairs
            .iter()
            .map(|p| p.response_ids.len() as u64)
            .sum();
        let n = request.pairs.len();
        let requests = request
            .pairs
            .into_iter()
            .map(|p| ScoreRequest {
                pair: Pair {
                    prompt_ids: p.prompt_ids,
                    response_ids: p.response_ids,
                },
                step_ends: p.step_ends,
            })
            .collect();
        let result = self.score(requests, Some(&request.step_split)).await;
        self.finish(started, &result, n, tokens);
        let results = result?
            .into_iter()
            .zip(ids)
            .map(|(r, id)| to_proto(id, r))
            .collect();
        Ok(Response::new(pb::ProcessRewardsResponse { results }))
    }

    async fn best_of_n(
        &self,
        request: Request<pb::BestOfNRequest>,
    ) -> Result<Response<pb::BestOfNResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let n = request.candidates.len();
        let tokens: u64 = request
            .candidates
            .iter()
            .map(|c| c.response_ids.len() as u64)
            .sum();
        let result = PrmService::best_of_n(self, request).await;
        self.finish(started, &result, n, tokens);
        Ok(Response::new(result?))
    }

    async fn status(
        &self,
        _request: Request<pb::PrmStatusRequest>,
    ) -> Result<Response<pb::PrmStatus>, Status> {
        Ok(Response::new(PrmService::status(self)))
    }
}

/// A running server (on threads of its own).
#[derive(Debug)]
pub struct RunningServer {
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// The bound Prometheus address, if any.
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// Stops serving and waits for the server thread.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    /// Serves until the process is interrupted (Ctrl-C) or the server fails.
    pub fn wait(mut self) -> Result<()> {
        // Dropping the sender would stop the server: it lives until the server ends.
        let _stop = self.stop.take();
        self.thread
            .take()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(PrmError::Unavailable("server panicked".into())))
            })
            .unwrap_or(Ok(()))
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread
            .take()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(PrmError::Unavailable("server panicked".into())))
            })
            .unwrap_or(Ok(()))
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Loads the models and the tokenizer, starts the compute thread and serves the PrmServer
/// service, `grpc.health.v1` and (optionally) Prometheus on a runtime of its own. Returns
/// once listening. With `until_ctrl_c` the server also stops on Ctrl-C.
pub fn start(
    config: &ServerConfig,
    listen: &ListenOptions,
    until_ctrl_c: bool,
) -> Result<RunningServer> {
    let load = |dir: &PathBuf| CausalLm::load(dir, config.device, config.kind, config.kind);
    let scorer = Scorer::new(
        load(&config.prm)?,
        load(&config.reference)?,
        config.beta,
        config.max_batch_tokens,
    )?;
    let tokenizer = Tokenizer::from_dir(config.tokenizer.as_ref().unwrap_or(&config.prm))?;
    let live = Arc::new(Live::default());
    let engine = Engine::start(scorer, config.max_batch_responses, live);
    let service = PrmService {
        engine: engine.clone(),
        tokenizer: Arc::new(tokenizer),
        default_split: Arc::new(config.step_split.clone()),
        info: Arc::new(Info {
            prm_model: config.prm.display().to_string(),
            reference_model: config.reference.display().to_string(),
            beta: config.beta,
            learner_url: config
                .follow
                .as_ref()
                .map(|f| f.url.clone())
                .unwrap_or_default(),
        }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(PrmError::io("tokio runtime"))?;
    let builder = listen
        .auth
        .server(listen.listen)
        .map_err(|e| PrmError::Input(e.to_string()))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen.listen))
        .map_err(PrmError::io(listen.listen.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(PrmError::io(listen.listen.to_string()))?;
    let metrics_addr = match listen.metrics_listen {
        Some(metrics) => {
            let bound = runtime
                .block_on(prime_proto::metrics::start(
                    metrics,
                    Arc::new(service.registry()),
                    prime_proto::metrics::Probes::default(),
                ))
                .map_err(PrmError::io(metrics.to_string()))?;
            Some(bound)
        }
        None => None,
    };
    if let Some(follow) = &config.follow {
        runtime.spawn(follow_learner(
            follow.clone(),
            listen.auth.token.clone(),
            engine.clone(),
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = listen.auth.guard(service.into_server());
    let thread = std::thread::Builder::new()
        .name("prm-server".into())
        .spawn(move || {
            runtime.block_on(async move {
                let (health_reporter, health_service) = tonic_health::server::health_reporter();
                health_reporter
                    .set_serving::<PrmServerServer<PrmService>>()
                    .await;
                let incoming = prime_proto::transport::incoming(listener);
                let stop = async move {
                    if until_ctrl_c {
                        tokio::select! {
                            _ = stop_rx => {}
                            _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
                        }
                    } else {
                        let _ = stop_rx.await;
                    }
                };
                let (graceful_tx, graceful_rx) = tokio::sync::oneshot::channel::<()>();
                let mut builder = builder;
                let serve = builder
                    .add_service(health_service)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = graceful_rx.await;
                    });
                tokio::pin!(serve);
                let failed = |e: tonic::transport::Error| {
                    PrmError::Unavailable(format!("server failed: {e}"))
                };
                tokio::select! {
                    result = &mut serve => return result.map_err(failed),
                    () = stop => {}
                }
                let _ = graceful_tx.send(());
                // Calls in flight get a moment to finish; an idle client that never answers
                // the goaway does not keep the server up.
                match tokio::time::timeout(SHUTDOWN_GRACE, serve).await {
                    Ok(result) => result.map_err(failed),
                    Err(_) => Ok(()),
                }
            })
        })
        .map_err(PrmError::io("server thread"))?;
    tracing::info!(%addr, "prm-server listening");
    Ok(RunningServer {
        addr,
        metrics_addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Polls the learner's status and pulls the PRM weights of each new version into the engine.
/// Failures are logged and retried at the next poll: the server keeps serving the weights it
/// has.
async fn follow_learner(follow: FollowConfig, token: Option<String>, engine: Engine) {
    let mut current = 0u64;
    loop {
        match pull_new_weights(&follow, token.as_deref(), &engine, current).await {
            Ok(Some(version)) => current = version,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, url = %follow.url, "following the learner"),
        }
        tokio::time::sleep(follow.poll).await;
    }
}

/// One poll: the learner's version, and its PRM weights when newer than `current`.
pub async fn pull_new_weights(
    follow: &FollowConfig,
    token: Option<&str>,
    engine: &Engine,
    current: u64,
) -> Result<Option<u64>> {
    use prime_proto::client::{
        lazy_channel_secure, learner_client, request, with_deadline, ClientError,
    };
    let channel = lazy_channel_secure(
        "learner",
        &follow.url,
        follow.transfer_timeout,
        token,
        &follow.tls,
    )?;
    let mut client = learner_client(channel);
    let status = with_deadline(
        "Learner",
        "Status",
        follow.transfer_timeout,
        client.status(request(
            pb::LearnerStatusRequest {},
            follow.transfer_timeout,
        )),
    )
    .await?
    .into_inner();
    let version = status.policy_version;
    if version <= current {
        return Ok(None);
    }
    let message = pb::FetchWeightsRequest {
        policy_version: version,
        max_chunk_bytes: DEFAULT_CHUNK_BYTES as u32,
    };
    let timeout = follow.transfer_timeout;
    let assembler = with_deadline("Learner", "FetchPrmWeights", timeout, async {
        let mut stream = client
            .fetch_prm_weights(request(message, timeout))
            .await
            .map_err(|s| ClientError::rpc("Learner", "FetchPrmWeights", &s))?
            .into_inner();
        let mut assembler = open_transfer(&mut stream, version).await?;
        receive_chunks(&mut stream, &mut assembler, DEFAULT_CHUNK_BYTES).await?;
        Ok::<_, PrmError>(assembler)
    })
    .await?;
    engine.load(assembler, version).await?;
    Ok(Some(version))
}
