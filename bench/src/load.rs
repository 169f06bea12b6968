//! `prime bench load`: many simulated actors stream groups to one real learner over loopback.
//!
//! For each actor count the harness makes a run directory with the embedded world and a random
//! tiny policy (hidden 32, 2 layers), starts `prime learner serve` on it as a separate process (so its
//! memory is its own), and runs that many light actors in this process for a fixed time. A
//! simulated actor follows the protocol without a model: `Register`, then `PullWork`, K random
//! responses per prompt (token ids in the vocabulary, finite log-probs, 0/1 scores), and
//! `SubmitGroups`; it waits `retry_after_ms` when the learner is busy, as a real actor does.
//! The learner runs real PRIME steps on every batch it fills.
//!
//! Measured per actor count: accepted groups per second, p50/p99 latency of `SubmitGroups` and
//! `PullWork`, the learner's peak resident memory (`VmHWM`), and the loss check: the replies
//! the actors got, summed, against the learner's own counters (Prometheus), read after every
//! actor has stopped. Peak memory stays flat as actors are added because the learner hands
//! out at most the in-flight cap of prompts and none while it trains (backpressure).
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prime_learner::RunConfig;
use prime_model::{CausalLm, Tokenizer};
use prime_proto::client::{lazy_channel, learner_client, request, LearnerClient};
use prime_proto::v1 as pb;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{BenchError, Result};
use crate::machine::{cores, cpu_model, load_average};

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSettings {
    /// The `prime` executable that runs the learner.
    pub prime: PathBuf,
    /// Simulated actor counts, one learner run each.
    pub actors: Vec<usize>,
    /// How long the actors stream groups, per actor count.
    pub seconds: f64,
    /// Groups per training batch (B).
    pub batch_prompts: usize,
    /// Responses per group (K).
    pub samples_per_prompt: usize,
    /// Most prompts a simulated actor takes per `PullWork`.
    pub prompts_per_pull: u32,
    /// Longest simulated response, in tokens (also the learner's `rollout.max_response_tokens`).
    pub max_response_tokens: usize,
    /// Seeds the world, the model and the simulated responses.
    pub seed: u64,
    /// Torch threads of the learner process.
    pub learner_threads: usize,
}

impl Default for LoadSettings {
    fn default() -> Self {
        Self {
            prime: PathBuf::from("prime"),
            actors: vec![4, 16, 64],
            seconds: 30.0,
            batch_prompts: 8,
            samples_per_prompt: 4,
            prompts_per_pull: 2,
            max_response_tokens: 16,
            seed: 0,
            learner_threads: 1,
        }
    }
}

/// The learner's counters (its Prometheus gauges) after the actors stopped.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct LearnerCounters {
    /// PRIME steps done.
    pub steps: u64,
    /// Groups accepted: kept by the accuracy filter (`groups_accepted`) or dropped by it
    /// (`groups_filtered`), as a `SubmitReply` counts them.
    pub accepted: u64,
    /// Of those, the groups the filter dropped.
    pub filtered: u64,
    /// Groups submitted again.
    pub duplicates: u64,
    /// Groups of an old policy version.
    pub stale: u64,
    /// Malformed groups.
    pub rejected: u64,
    /// Failed steps or requests.
    pub errors: u64,
}

/// What the simulated actors saw, summed over all of them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ActorTotals {
    /// Groups sent in answered `SubmitGroups` streams.
    pub submitted: u64,
    /// Groups the learner answered as accepted.
    pub accepted: u64,
    /// Groups answered as duplicates.
    pub duplicates: u64,
    /// Groups answered as stale.
    pub stale: u64,
    /// Groups answered as rejected.
    pub rejected: u64,
    /// Calls that failed (status or deadline).
    pub failed_calls: u64,
    /// `PullWork` answers without items (backpressure).
    pub empty_pulls: u64,
}

/// One actor count.
#[derive(Debug, Clone, Serialize)]
pub struct LoadRow {
    /// Simulated actors.
    pub actors: usize,
    /// Seconds the actors streamed.
    pub seconds: f64,
    /// Accepted groups per second (learner count over `seconds`). More than are trained on:
    /// a batch that fills while other groups are still arriving keeps the first B, and the
    /// prompts of the surplus go back to the queue (spec §5.2).
    pub groups_per_second: f64,
    /// Groups trained on per second: steps x B over `seconds`.
    pub trained_groups_per_second: f64,
    /// Median `SubmitGroups` latency, ms.
    pub submit_p50_ms: f64,
    /// 99th-percentile `SubmitGroups` latency, ms.
    pub submit_p99_ms: f64,
    /// Median `PullWork` latency, ms.
    pub pull_p50_ms: f64,
    /// 99th-percentile `PullWork` latency, ms.
    pub pull_p99_ms: f64,
    /// The learner's peak resident memory, MiB.
    pub learner_peak_rss_mib: f64,
    /// The actors' view.
    pub actor_totals: ActorTotals,
    /// The learner's view.
    pub learner: LearnerCounters,
    /// Groups submitted that the learner does not count once in any category (0 means no
    /// loss); negative would mean counted twice.
    pub lost_groups: i64,
    /// Whether every per-category count of the actors equals the learner's.
    pub counts_match: bool,
}

/// Everything one `prime bench load` measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// CPU model.
    pub cpu: String,
    /// Logical cores.
    pub cores: usize,
    /// 1-minute load average before and after.
    pub load_before: Option<f64>,
    /// 1-minute load average after the last run.
    pub load_after: Option<f64>,
    /// The settings.
    pub settings: LoadSettings,
    /// One row per actor count.
    pub rows: Vec<LoadRow>,
}

impl LoadReport {
    /// A Markdown table of the rows.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| actors | groups/s accepted / trained | submit p50 / p99 ms | pull p50 / p99 ms | learner peak RSS MiB | steps | submitted | accepted (actors / learner) | dup / stale / rej | lost |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.rows {
            let a = &r.actor_totals;
            let _ = writeln!(
                out,
                "| {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} | {} | {} | {} / {} | {} / {} / {} | {} |",
                r.actors,
                r.groups_per_second,
                r.trained_groups_per_second,
                r.submit_p50_ms,
                r.submit_p99_ms,
                r.pull_p50_ms,
                r.pull_p99_ms,
                r.learner_peak_rss_mib,
                r.learner.steps,
                a.submitted,
                a.accepted,
                r.learner.accepted,
                r.learner.duplicates,
                r.learner.stale,
                r.learner.rejected,
                r.lost_groups,
            );
        }
        out
    }
}

/// Runs the load test for every actor count in `settings`.
pub fn run_load(settings: &LoadSettings) -> Result<LoadReport> {
    if settings.actors.is_empty() || settings.actors.contains(&0) {
        return Err(BenchError::Settings(
            "actor counts must be at least 1".into(),
        ));
    }
    if !(settings.seconds.is_finite() && settings.seconds > 0.0) {
        return Err(BenchError::Settings("seconds must be positive".into()));
    }
    let load_before = load_average();
    let mut rows = Vec::new();
    for &actors in &settings.actors {
        tracing::info!(actors, seconds = settings.seconds, "load run");
        let row = run_one(settings, actors)?;
        tracing::info!(?row, "load run done");
        rows.push(row);
    }
    Ok(LoadReport {
        cpu: cpu_model(),
        cores: cores(),
        load_before,
        load_after: load_average(),
        settings: settings.clone(),
        rows,
    })
}

fn service_error(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Service(format!("{what}: {e}"))
}

/// The run config of one learner: the embedded world (small), a tiny policy, B and K as set,
/// evaluation and checkpoints off, and as many steps as the time allows.
fn config_text(settings: &LoadSettings) -> String {
    format!(
        r#"
[world]
seed = {seed}
sft = {{ size = 8 }}
rl = {{ size = 512 }}
heldout = {{ size = 4 }}

[learner]
seed = {seed}
steps = 1000000

[learner.algo]
mini_batches = 1

[learner.rollout]
batch_prompts = {b}
samples_per_prompt = {k}
max_response_tokens = {max_tokens}
lease_seconds = 30

[learner.eval]
every = 0
problems = 2
greedy = false

[learner.checkpoint]
every = 0
"#,
        seed = settings.seed,
        b = settings.batch_prompts,
        k = settings.samples_per_prompt,
        max_tokens = settings.max_response_tokens,
    )
}

/// Builds the run directory: config, world and a random tiny start policy with the world's
/// tokenizer.
fn prepare_run(settings: &LoadSettings, run_dir: &Path) -> Result<PathBuf> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BenchError::Io { path, source }
    };
    std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    let config_path = run_dir.join("load.toml");
    std::fs::write(&config_path, config_text(settings)).map_err(io(&config_path))?;
    let config = RunConfig::from_file(&config_path).map_err(|e| service_error("config", e))?;
    let world = prime_world::build_world(&config.world, &run_dir.join("world"))
        .map_err(|e| service_error("world", e))?;
    let tokenizer = Tokenizer::from_dir(&world.tokenizer_dir)?;
    let eos_token = tokenizer
        .eos_token()
        .ok_or_else(|| service_error("tokenizer", "no end-of-sequence token"))?;
    let eos = tokenizer
        .token_id(eos_token)
        .ok_or_else(|| service_error("tokenizer", "end-of-sequence token has no id"))?;
    let qwen2 = prime_learner::ModelSource {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        ..prime_learner::ModelSource::default()
    }
    .qwen2_config(tokenizer.vocab_size() as i64, eos, eos);
    tch::manual_seed(settings.seed as i64);
    let mut lm = CausalLm::random(&qwen2, tch::Device::Cpu, tch::Kind::Float, tch::Kind::Float)?;
    lm.generation_config.eos_token_id = Some(prime_model::config::TokenIds::One(eos));
    let dir = prime_learner::checkpoint::sft_checkpoint(run_dir);
    lm.save(&dir, None, prime_model::DEFAULT_MAX_SHARD_BYTES)?;
    prime_model::checkpoint::copy_tokenizer_files(&world.tokenizer_dir, &dir)?;
    Ok(config_path)
}

/// The learner process, killed when dropped.
struct LearnerProcess(Child);

impl Drop for LearnerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
        path: "127.0.0.1:0".into(),
        source,
    })?;
    listener.local_addr().map_err(|source| BenchError::Io {
        path: "127.0.0.1:0".into(),
        source,
    })
}

fn start_learner(
    settings: &LoadSettings,
    config: &Path,
    run_dir: &Path,
    metrics: SocketAddr,
) -> Result<(LearnerProcess, SocketAddr)> {
    let addr_file = run_dir.join("learner.addr");
    let log_path = run_dir.join("learner.log");
    let log = std::fs::File::create(&log_path).map_err(|source| BenchError::Io {
        path: log_path.clone(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| BenchError::Io {
        path: log_path.clone(),
        source,
    })?;
    let threads = settings.learner_threads.to_string();
    let child = Command::new(&settings.prime)
        .args(["learner", "serve"])
        .arg("--config")
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen"])
        .arg(metrics.to_string())
        .arg("--addr-file")
        .arg(&addr_file)
        .env("PRIME_THREADS", &threads)
        .env("OMP_NUM_THREADS", &threads)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .env_remove("PRIME_TOKEN")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|source| BenchError::Io {
            path: settings.prime.clone(),
            source,
        })?;
    let mut learner = LearnerProcess(child);
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            if let Ok(addr) = text.trim().parse() {
                return Ok((learner, addr));
            }
        }
        let exited = learner.0.try_wait().ok().flatten();
        if exited.is_some() || started.elapsed() > Duration::from_secs(300) {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(service_error(
                "the learner did not start",
                format!("{exited:?}\n{log}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The learner's Prometheus samples (`prime_learner_*`), by name (labels included) without the
/// prefix.
fn scrape(metrics: SocketAddr) -> Result<LearnerCounters> {
    let fetch = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(metrics)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        Ok(body)
    };
    let body = fetch().map_err(|source| BenchError::Io {
        path: metrics.to_string().into(),
        source,
    })?;
    let gauge = |name: &str| -> Result<u64> {
        let prefix = format!("prime_learner_{name} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .ok_or_else(|| service_error("learner metrics", format!("no gauge {name}")))
    };
    let groups = |outcome: &str| gauge(&format!("groups_total{{outcome=\"{outcome}\"}}"));
    let filtered = groups("filtered")?;
    Ok(LearnerCounters {
        steps: gauge("step")?,
        accepted: groups("kept")? + filtered,
        filtered,
        duplicates: groups("duplicate")?,
        stale: groups("stale")?,
        rejected: groups("rejected")?,
        errors: gauge("errors_total")?,
    })
}

/// Peak resident memory of process `pid` in MiB (`VmHWM` of /proc/PID/status).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// One simulated actor's tallies and latencies.
#[derive(Debug, Default)]
struct ActorLog {
    totals: ActorTotals,
    submit_ms: Vec<f64>,
    pull_ms: Vec<f64>,
}

const RPC_DEADLINE: Duration = Duration::from_secs(30);

/// A simulated actor: the protocol of a real one with random responses instead of a model.
async fn simulated_actor(
    mut client: LearnerClient,
    index: usize,
    prompts_per_pull: u32,
    max_tokens: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> ActorLog {
    let mut log = ActorLog::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ ((index as u64 + 1) << 32));
    let mut session: Option<(String, i64)> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some((actor_id, vocab)) = session.clone() else {
            let message = pb::RegisterRequest {
                actor_name: format!("sim-{index}"),
                device: "none".into(),
                max_batch_prompts: prompts_per_pull,
            };
            match client.register(request(message, RPC_DEADLINE)).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let vocab = serde_json::from_str::<serde_json::Value>(&reply.model_config_json)
                        .ok()
                        .and_then(|c| c["vocab_size"].as_i64())
                        .unwrap_or(0);
                    session = Some((reply.actor_id, vocab));
                }
                Err(status) => {
                    tracing::warn!(%status, "register failed");
                    log.totals.failed_calls += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        };
        let started = Instant::now();
        let pulled = client
            .pull_work(request(
                pb::PullWorkRequest {
                    actor_id: actor_id.clone(),
                    max_prompts: prompts_per_pull,
                },
                RPC_DEADLINE,
            ))
            .await;
        log.pull_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let batch = match pulled {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                tracing::warn!(%status, "pull failed; registering again");
                log.totals.failed_calls += 1;
                session = None;
                continue;
            }
        };
        if batch.items.is_empty() {
            log.totals.empty_pulls += 1;
            let wait = batch.retry_after_ms.max(50);
            tokio::time::sleep(Duration::from_millis(wait.into())).await;
            continue;
        }
        let groups: Vec<pb::RolloutGroup> = batch
            .items
            .iter()
            .map(|item| pb::RolloutGroup {
                group_id: item.work_id.clone(),
                actor_id: actor_id.clone(),
                policy_version: batch.policy_version,
                prompt_ids: item.prompt_ids.clone(),
                responses: (0..item.k)
                    .map(|_| fake_response(&mut rng, vocab, max_tokens))
                    .collect(),
            })
            .collect();
        let count = groups.len() as u64;
        let started = Instant::now();
        let submitted = client
            .submit_groups(request(tokio_stream::iter(groups), RPC_DEADLINE))
            .await;
        log.submit_ms.push(started.elapsed().as_secs_f64() * 1e3);
        match submitted {
            Ok(reply) => {
                let reply = reply.into_inner();
                log.totals.submitted += count;
                log.totals.accepted += u64::from(reply.accepted);
                log.totals.duplicates += u64::from(reply.duplicates);
                log.totals.stale += u64::from(reply.stale);
                log.totals.rejected += u64::from(reply.rejected);
                if reply.rejected > 0 {
                    tracing::warn!(first = %reply.first_rejection, "groups rejected");
                }
            }
            Err(status) => {
                tracing::warn!(%status, "submit failed");
                log.totals.failed_calls += 1;
            }
        }
    }
    log
}

/// A response of 1..=`max_tokens` random ids below `vocab`, log-probs in (-5, 0] and a 0/1
/// score, so about seven groups in eight pass the accuracy filter at K = 4.
fn fake_response(rng: &mut impl Rng, vocab: i64, max_tokens: usize) -> pb::Response {
    let len = rng.gen_range(1..=max_tokens.max(1));
    let token_ids: Vec<i64> = (0..len).map(|_| rng.gen_range(0..vocab.max(1))).collect();
    let sampling_logprobs = (0..len).map(|_| -rng.gen_range(0.0f32..5.0)).collect();
    let finish_reason = if len < max_tokens {
        pb::FinishReason::Stop
    } else {
        pb::FinishReason::Length
    };
    pb::Response {
        token_ids,
        sampling_logprobs,
        score: if rng.gen_bool(0.5) { 1.0 } else { 0.0 },
        finish_reason: finish_reason as i32,
    }
}

/// The `q` quantile (nearest rank) of `values`; 0 when empty.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn run_one(settings: &LoadSettings, actors: usize) -> Result<LoadRow> {
    let temp = tempfile::tempdir().map_err(|source| BenchError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let run_dir = temp.path().join("run");
    let config = prepare_run(settings, &run_dir)?;
    let metrics = free_addr()?;
    let (learner, addr) = start_learner(settings, &config, &run_dir, metrics)?;
    let pid = learner.0.id();

    let runtime = crate::weight_sync::runtime()?;
    let stop = Arc::new(AtomicBool::new(false));
    let duration = Duration::from_secs_f64(settings.seconds);
    let logs = runtime.block_on(async {
        let url = format!("http://{addr}");
        let mut tasks = Vec::with_capacity(actors);
        for index in 0..actors {
            // One connection per actor, as separate actor processes would have.
            let channel = lazy_channel("learner", &url, Duration::from_secs(5), None)
                .map_err(|e| service_error("channel", e))?;
            tasks.push(tokio::spawn(simulated_actor(
                learner_client(channel),
                index,
                settings.prompts_per_pull,
                settings.max_response_tokens,
                settings.seed,
                stop.clone(),
            )));
        }
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::with_capacity(actors);
        for task in tasks {
            logs.push(task.await.map_err(|e| service_error("actor task", e))?);
        }
        Ok::<_, BenchError>(logs)
    })?;
    // Every actor has stopped: the learner's counters are final for what was sent.
    let counters = scrape(metrics)?;
    let peak = peak_rss_mib(pid).unwrap_or(f64::NAN);
    drop(learner);

    let mut totals = ActorTotals::default();
    let (mut submit_ms, mut pull_ms) = (Vec::new(), Vec::new());
    for log in logs {
        let t = log.totals;
        totals.submitted += t.submitted;
        totals.accepted += t.accepted;
        totals.duplicates += t.duplicates;
        totals.stale += t.stale;
        totals.rejected += t.rejected;
        totals.failed_calls += t.failed_calls;
        totals.empty_pulls += t.empty_pulls;
        submit_ms.extend(log.submit_ms);
        pull_ms.extend(log.pull_ms);
    }
    let counted = counters.accepted + counters.duplicates + counters.stale + counters.rejected;
    let counts_match = totals.accepted == counters.accepted
        && totals.duplicates == counters.duplicates
        && totals.stale == counters.stale
        && totals.rejected == counters.rejected;
    Ok(LoadRow {
        actors,
        seconds: settings.seconds,
        groups_per_second: counters.accepted as f64 / settings.seconds,
        trained_groups_per_second: (counters.steps * settings.batch_prompts as u64) as f64
            / settings.seconds,
        submit_p50_ms: quantile(&mut submit_ms, 0.5),
        submit_p99_ms: quantile(&mut submit_ms, 0.99),
        pull_p50_ms: quantile(&mut pull_ms, 0.5),
        pull_p99_ms: quantile(&mut pull_ms, 0.99),
        learner_peak_rss_mib: peak,
        actor_totals: totals,
        learner: counters,
        lost_groups: totals.submitted as i64 - counted as i64,
        counts_match,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
        assert_eq!(quantile(&mut [7.0], 0.99), 7.0);
    }

    #[test]
    fn fake_responses_follow_the_protocol() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let r = fake_response(&mut rng, 50, 6);
            assert!((1..=6).contains(&r.token_ids.len()));
            assert!(r.token_ids.iter().all(|&t| (0..50).contains(&t)));
            assert_eq!(r.sampling_logprobs.len(), r.token_ids.len());
            assert!(r
                .sampling_logprobs
                .iter()
                .all(|lp| lp.is_finite() && *lp <= 0.0));
            assert!(r.score == 0.0 || r.score == 1.0);
            let truncated = r.finish_reason == pb::FinishReason::Length as i32;
            assert_eq!(truncated, r.token_ids.len() == 6);
        }
    }
}
