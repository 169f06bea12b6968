//! `prime bench train`: the end-to-end demo, timed. For each variant (an estimator, an actor
//! count, a staleness bound and a seed) the harness runs `prime train` (a verifier, a learner
//! and N actors as processes on loopback) for a few steps from one supervised warm-up
//! checkpoint, each in a fresh run directory with the same config, and reads back what the
//! run recorded:
//!
//! - the learner's `metrics.jsonl`: the PRIME phase's wall time (the learner's clock at the
//!   last step), steps per hour, groups per second and the time split of each step: waiting
//!   for rollouts, PRM update, policy update and the rest;
//! - each actor's log (`logs/actor-N.log`, one "batch submitted" line per batch): its time
//!   waiting for work, fetching weights, sampling, grading and submitting, and the tokens it
//!   sampled;
//! - the evaluation after the last step: held-out accuracy at equal steps.
//!
//! Variants that differ only in the seed are summarised together (mean and standard
//! deviation), and two ratios answer the step-cost questions directly: the learner's seconds
//! per step of PRIME over RLOO, and steps per hour with a staleness bound over synchronous
//! (staleness 0) runs.
//!
//! Held-out evaluation and periodic checkpoints are off during the timed steps
//! (`learner.eval.every = 0`, `learner.checkpoint.every = 0`); the evaluation and checkpoint
//! after the last step, and `prime train`'s closing evaluation (on `learner.eval.problems = 16`
//! problems), come after the window and count only in the process time.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use prime_learner::trainer::{Record, StepRecord};
use prime_learner::RunConfig;
use serde::Serialize;

use crate::error::{BenchError, Result};
use crate::machine::{cores, cpu_model, load_average};

/// The embedded default run config (`configs/demo.toml`), used when no `--config` is given.
pub const DEMO_CONFIG: &str = include_str!("../../configs/demo.toml");

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSettings {
    /// The `prime` executable.
    pub prime: PathBuf,
    /// The run config; `out_dir/demo.toml` (the embedded default) when absent.
    pub config: Option<PathBuf>,
    /// `--set KEY=VALUE` overrides, applied after the harness's own (so they win).
    pub overrides: Vec<String>,
    /// Holds `actors-N/` per actor count (replaced on each run) and, by default, `warmup/`.
    pub out_dir: PathBuf,
    /// Run directory of the supervised warm-up (`sft/checkpoint`, `world/`): reused when its
    /// checkpoint exists, else made once with `prime sft`. Default `out_dir/warmup`.
    pub warmup_dir: Option<PathBuf>,
    /// Steps per run.
    pub steps: u64,
    /// Actor counts, one run each (per estimator, staleness and seed).
    pub actors: Vec<usize>,
    /// Advantage estimators (`learner.algo.estimator`: `prime`, `rloo`, ...); empty: the
    /// config's.
    pub estimators: Vec<String>,
    /// Staleness bounds (`learner.rollout.max_staleness`); empty: the config's.
    pub staleness: Vec<u64>,
    /// Learner seeds (`learner.seed`); empty: the config's.
    pub seeds: Vec<u64>,
    /// Torch threads of every process (`PRIME_THREADS`).
    pub threads: usize,
    /// `cpu`, `cuda` or `cuda:N` (learner and actors).
    pub device: String,
}

impl TrainSettings {
    fn warmup_dir(&self) -> PathBuf {
        self.warmup_dir
            .clone()
            .unwrap_or_else(|| self.out_dir.join("warmup"))
    }

    /// The harness's overrides, then the user's: `steps` steps without evaluations or
    /// checkpoints in between, and a small closing evaluation.
    fn all_overrides(&self) -> Vec<String> {
        let mut all = vec![
            format!("learner.steps={}", self.steps),
            "learner.eval.every=0".to_string(),
            "learner.checkpoint.every=0".to_string(),
            "learner.eval.problems=16".to_string(),
        ];
        all.extend(self.overrides.iter().cloned());
        all
    }

    /// Every run, in order: estimators outermost, then staleness bounds, actor counts and
    /// seeds (so the runs one comparison needs sit next to each other).
    pub fn variants(&self) -> Vec<Variant> {
        fn or_config<T: Clone>(values: &[T]) -> Vec<Option<T>> {
            if values.is_empty() {
                vec![None]
            } else {
                values.iter().cloned().map(Some).collect()
            }
        }
        let mut variants = Vec::new();
        for estimator in or_config(&self.estimators) {
            for staleness in or_config(&self.staleness) {
                for &actors in &self.actors {
                    for seed in or_config(&self.seeds) {
                        variants.push(Variant {
                            estimator: estimator.clone(),
                            actors,
                            staleness,
                            seed,
                        });
                    }
                }
            }
        }
        variants
    }
}

/// One timed run's settings beyond the shared config; `None` keeps the config's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Variant {
    /// `learner.algo.estimator`.
    pub estimator: Option<String>,
    /// Actor processes.
    pub actors: usize,
    /// `learner.rollout.max_staleness`.
    pub staleness: Option<u64>,
    /// `learner.seed`.
    pub seed: Option<u64>,
}

impl Variant {
    /// The `--set` overrides that make this variant (after the harness's and the user's).
    pub fn overrides(&self) -> Vec<String> {
        let mut all = Vec::new();
        if let Some(estimator) = &self.estimator {
            all.push(format!("learner.algo.estimator={estimator}"));
        }
        if let Some(staleness) = self.staleness {
            all.push(format!("learner.rollout.max_staleness={staleness}"));
        }
        if let Some(seed) = self.seed {
            all.push(format!("learner.seed={seed}"));
        }
        all
    }

    /// The run directory's name: `actors-N`, with the estimator, staleness and seed when set.
    pub fn dir_name(&self) -> String {
        let mut name = String::new();
        if let Some(estimator) = &self.estimator {
            let _ = write!(name, "{estimator}-");
        }
        let _ = write!(name, "actors-{}", self.actors);
        if let Some(staleness) = self.staleness {
            let _ = write!(name, "-staleness-{staleness}");
        }
        if let Some(seed) = self.seed {
            let _ = write!(name, "-seed-{seed}");
        }
        name
    }
}

/// The learner's view of the timed steps: seconds summed over them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LearnerSplit {
    /// Waiting for the batch: from publishing the previous version until B groups passed
    /// the filter (`rollout_seconds`).
    pub rollout_wait: f64,
    /// The reference forward and the PRM pass: forward, backward, updates (`time_reference_s`
    /// + `time_prm_s`).
    pub prm_update: f64,
    /// Old log-probs, advantages and the PPO pass (`time_old_logprobs_s` +
    /// `time_advantages_s` + `time_policy_s`).
    pub policy_update: f64,
    /// The rest of the wall time: [`Self::step_untimed`] plus [`Self::between_steps`].
    pub other: f64,
    /// Inside the step but outside its timers: laying out the batch, the record.
    pub step_untimed: f64,
    /// After each step's record until the next batch is awaited: publishing the weights,
    /// writing metrics, evaluations and checkpoints (both off here), and the learner's
    /// start-up before the first batch.
    pub between_steps: f64,
    /// Held-out evaluations inside the window (part of `between_steps`; 0 with evaluation
    /// off).
    pub evaluation: f64,
}

impl LearnerSplit {
    /// The parts that make up the wall time, summed: equals the window's wall time.
    pub fn total(&self) -> f64 {
        self.rollout_wait + self.prm_update + self.policy_update + self.other
    }
}

/// What the actors' logs say about the batches they submitted for the timed steps (policy
/// versions below the step count), summed over the actors.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ActorSplit {
    /// Batches submitted.
    pub batches: u64,
    /// Groups the learner accepted.
    pub groups_accepted: u64,
    /// Tokens sampled.
    pub tokens: u64,
    /// Seconds waiting for work (`PullWork` and pauses while the learner had none).
    pub waiting: f64,
    /// Seconds fetching and applying weights.
    pub weights: f64,
    /// Seconds sampling.
    pub sampling: f64,
    /// Seconds decoding and grading.
    pub grading: f64,
    /// Seconds submitting.
    pub submitting: f64,
}

impl ActorSplit {
    /// Every timed second.
    pub fn total(&self) -> f64 {
        self.waiting + self.weights + self.sampling + self.grading + self.submitting
    }

    fn add(&mut self, other: &ActorSplit) {
        self.batches += other.batches;
        self.groups_accepted += other.groups_accepted;
        self.tokens += other.tokens;
        self.waiting += other.waiting;
        self.weights += other.weights;
        self.sampling += other.sampling;
        self.grading += other.grading;
        self.submitting += other.submitting;
    }
}

/// One timed run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainRow {
    /// Actor processes.
    pub actors: usize,
    /// The estimator the run trained with (the resolved config's).
    pub estimator: String,
    /// Its staleness bound (`learner.rollout.max_staleness`).
    pub staleness: u64,
    /// Its learner seed.
    pub seed: u64,
    /// Step records in `metrics.jsonl`.
    pub steps: u64,
    /// The PRIME phase: from the learner being ready (models loaded, the run's start
    /// evaluation done) to the last step's record, on the learner's clock. The first batch's
    /// wait for the actors to start is in it.
    pub wall_seconds: f64,
    /// The learner's clock when it was ready: loading and the start evaluation.
    pub start_seconds: f64,
    /// The whole `prime train` process: start-up, the steps, the last evaluation and
    /// checkpoint, plots and the closing evaluation.
    pub process_seconds: f64,
    /// `steps x 3600 / wall_seconds`.
    pub steps_per_hour: f64,
    /// Steps per hour after the first step (whose wait includes the actors' start-up and
    /// first weight fetch); absent with one step.
    pub steady_steps_per_hour: Option<f64>,
    /// Groups that reached the learner for the batches (kept by the filter or not) per
    /// second of wall time.
    pub groups_per_second: f64,
    /// Tokens the actors sampled for the timed steps per second of wall time.
    pub sampled_tokens_per_second: f64,
    /// Steps per hour over the 1-actor run's with the same estimator, staleness and seed (over
    /// the first such run without a 1-actor run).
    pub speedup: f64,
    /// The learner's mean seconds per step inside the step (`train_seconds`: reference, PRM,
    /// old log-probs, advantages, policy and the untimed rest; no waiting for rollouts).
    pub learner_step_seconds: f64,
    /// Held-out accuracy of the evaluation after the last step (sampled at the configured
    /// temperature).
    pub final_accuracy: Option<f64>,
    /// Its greedy accuracy, when evaluated.
    pub final_greedy_accuracy: Option<f64>,
    /// Problems in that evaluation.
    pub final_problems: usize,
    /// The learner's time, summed over the steps.
    pub learner: LearnerSplit,
    /// The actors' time, summed over the actors.
    pub actor: ActorSplit,
    /// Mean training reward over the steps (the same seed, so the runs can be compared).
    pub train_reward: f64,
    /// 1-minute load average before the run.
    pub load_before: Option<f64>,
    /// 1-minute load average after the run.
    pub load_after: Option<f64>,
    /// The run directory.
    pub run_dir: PathBuf,
}

/// Everything one `prime bench train` measured.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// CPU model.
    pub cpu: String,
    /// Logical cores.
    pub cores: usize,
    /// The settings.
    pub settings: TrainSettings,
    /// Whether an existing warm-up checkpoint was used.
    pub warmup_reused: bool,
    /// Seconds the warm-up took when it ran here.
    pub warmup_seconds: Option<f64>,
    /// Groups per batch (B) and responses per group (K) of the resolved config.
    pub batch_prompts: usize,
    /// Responses per group.
    pub samples_per_prompt: usize,
    /// One row per run.
    pub rows: Vec<TrainRow>,
    /// The runs that differ only in the seed, summarised.
    pub summaries: Vec<SeedSummary>,
    /// PRIME over RLOO, and staleness over synchronous, where the runs allow.
    pub ratios: Vec<Ratio>,
}

impl TrainReport {
    /// A Markdown table of the rows: throughput, the learner's split per step and the
    /// actors' split as shares of their time.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} PRIME steps per run, B = {}, K = {}, {} torch thread(s) per process; {}, {} cores",
            self.settings.steps,
            self.batch_prompts,
            self.samples_per_prompt,
            self.settings.threads,
            self.cpu,
            self.cores
        );
        let _ = writeln!(
            out,
            "| estimator | staleness | seed | actors | wall s | steps/h (after step 1) | groups/s | sampled tok/s | speed-up | learner s/step | per step: rollout wait / PRM / policy / other s | actors: wait / weights / sample / grade / submit % | final acc (greedy) | load |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"
        );
        for r in &self.rows {
            let n = r.steps.max(1) as f64;
            let l = &r.learner;
            let a = &r.actor;
            let share = |x: f64| 100.0 * x / a.total().max(1e-9);
            let load = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.1}"));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} | {:.0} ({}) | {:.2} | {:.0} | {:.2}x | {:.2} | {:.2} / {:.2} / {:.2} / {:.2} | {:.0} / {:.0} / {:.0} / {:.0} / {:.0} | {} | {} -> {} |",
                r.estimator,
                r.staleness,
                r.seed,
                r.actors,
                r.wall_seconds,
                r.steps_per_hour,
                r.steady_steps_per_hour
                    .map_or_else(|| "-".into(), |v| format!("{v:.0}")),
                r.groups_per_second,
                r.sampled_tokens_per_second,
                r.speedup,
                r.learner_step_seconds,
                l.rollout_wait / n,
                l.prm_update / n,
                l.policy_update / n,
                l.other / n,
                share(a.waiting),
                share(a.weights),
                share(a.sampling),
                share(a.grading),
                share(a.submitting),
                accuracy(r.final_accuracy, r.final_greedy_accuracy, r.final_problems),
                load(r.load_before),
                load(r.load_after),
            );
        }
        if self.rows.len() > self.summaries.len() {
            let _ = writeln!(out, "\nOver the seeds (mean ± sd):");
            let _ = writeln!(
                out,
                "| estimator | staleness | actors | seeds | steps/h | learner s/step | wall s/step | final acc | final greedy acc |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            let pm = |(m, sd): (f64, f64), digits: usize| format!("{m:.digits$} ± {sd:.digits$}");
            let pm_opt = |v: Option<(f64, f64)>| v.map_or_else(|| "-".into(), |v| pm(v, 3));
            for s in &self.summaries {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    s.estimator,
                    s.staleness,
                    s.actors,
                    s.seeds,
                    pm(s.steps_per_hour, 0),
                    pm(s.learner_step_seconds, 2),
                    pm(s.wall_step_seconds, 2),
                    pm_opt(s.final_accuracy),
                    pm_opt(s.final_greedy_accuracy),
                );
            }
        }
        for r in &self.ratios {
            let _ = writeln!(out, "{}: {:.2}x", r.what, r.value);
        }
        out
    }
}

/// `0.438 (0.500) of 16`, or `-` without a final evaluation.
fn accuracy(sampled: Option<f64>, greedy: Option<f64>, problems: usize) -> String {
    match (sampled, greedy) {
        (None, _) => "-".into(),
        (Some(s), None) => format!("{s:.3} of {problems}"),
        (Some(s), Some(g)) => format!("{s:.3} ({g:.3}) of {problems}"),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError {
    let path = path.to_path_buf();
    move |source| BenchError::Io { path, source }
}

fn service_error(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Service(format!("{what}: {e}"))
}

/// Runs the benchmark: the warm-up once (unless reused), then `prime train` per actor count.
pub fn run_train(settings: &TrainSettings) -> Result<TrainReport> {
    if settings.actors.is_empty() || settings.actors.contains(&0) {
        return Err(BenchError::Settings(
            "actor counts must be at least 1".into(),
        ));
    }
    if settings.steps == 0 || settings.threads == 0 {
        return Err(BenchError::Settings(
            "steps and threads must be at least 1".into(),
        ));
    }
    std::fs::create_dir_all(&settings.out_dir).map_err(io(&settings.out_dir))?;
    let config_path = match &settings.config {
        Some(path) => path.clone(),
        None => {
            let path = settings.out_dir.join("demo.toml");
            std::fs::write(&path, DEMO_CONFIG).map_err(io(&path))?;
            path
        }
    };
    let overrides = settings.all_overrides();
    let config = RunConfig::from_file_with_overrides(&config_path, &overrides)?;
    config
        .learner
        .validate()
        .map_err(|e| BenchError::Settings(format!("{}: {e}", config_path.display())))?;
    if config.model.path.is_some() {
        return Err(BenchError::Settings(
            "the benchmark starts from the supervised warm-up; the config sets model.path".into(),
        ));
    }

    let warmup_dir = settings.warmup_dir();
    let warmup_checkpoint = prime_learner::checkpoint::sft_checkpoint(&warmup_dir);
    let warmup_reused = warmup_checkpoint.join("config.json").exists();
    let warmup_seconds = if warmup_reused {
        tracing::info!(dir = %warmup_dir.display(), "reusing the warm-up checkpoint");
        None
    } else {
        Some(run_warmup(settings, &config_path, &warmup_dir)?)
    };

    let variants = settings.variants();
    // Every variant's config must load before the first run starts.
    let mut resolved = Vec::with_capacity(variants.len());
    for variant in &variants {
        let all: Vec<String> = overrides
            .iter()
            .cloned()
            .chain(variant.overrides())
            .collect();
        let config = RunConfig::from_file_with_overrides(&config_path, &all)?;
        config.learner.validate().map_err(|e| {
            BenchError::Settings(format!(
                "{} ({}): {e}",
                config_path.display(),
                variant.dir_name()
            ))
        })?;
        resolved.push(config);
    }
    let mut rows: Vec<TrainRow> = Vec::with_capacity(variants.len());
    for (i, (variant, config)) in variants.iter().zip(&resolved).enumerate() {
        let run_dir = settings.out_dir.join(variant.dir_name());
        prepare_run_dir(&warmup_dir, &run_dir)?;
        tracing::info!(
            run = i + 1,
            of = variants.len(),
            run_dir = %run_dir.display(),
            "timed run"
        );
        let load_before = load_average();
        let process_seconds = run_prime_train(settings, &config_path, &run_dir, variant)?;
        let load_after = load_average();
        let records = read_records(&run_dir.join("metrics.jsonl"))?;
        let actor = read_actor_logs(&run_dir.join("logs"), variant.actors, settings.steps)?;
        let mut row = summarize(
            variant.actors,
            &records,
            actor,
            process_seconds,
            (load_before, load_after),
            &run_dir,
        )?;
        row.estimator = serde_json::to_value(config.learner.algo.estimator)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        row.staleness = config.learner.rollout.max_staleness;
        row.seed = config.learner.seed;
        tracing::info!(?row, "timed run done");
        rows.push(row);
    }
    set_speedups(&mut rows);
    Ok(TrainReport {
        cpu: cpu_model(),
        cores: cores(),
        settings: settings.clone(),
        warmup_reused,
        warmup_seconds,
        batch_prompts: config.learner.rollout.batch_prompts,
        samples_per_prompt: config.learner.rollout.samples_per_prompt as usize,
        summaries: summarize_seeds(&rows),
        ratios: ratios(&summarize_seeds(&rows)),
        rows,
    })
}

/// A `prime` child process with the run's thread settings and info-level logs (the actor
/// timings are read from them).
fn prime_command(settings: &TrainSettings, log: &Path) -> Result<Command> {
    let file = std::fs::File::create(log).map_err(io(log))?;
    let err = file.try_clone().map_err(io(log))?;
    let threads = settings.threads.to_string();
    let mut command = Command::new(&settings.prime);
    command
        .env("PRIME_THREADS", &threads)
        .env("OMP_NUM_THREADS", &threads)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .env("RUST_LOG", "info")
        // The actor logs are read back as text lines.
        .env("PRIME_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err);
    Ok(command)
}

fn run_logged(mut command: Command, what: &str, log: &Path) -> Result<f64> {
    let started = Instant::now();
    let status = command.status().map_err(io(log))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(service_error(
            what,
            format!("{status}; the end of {}:\n{tail}", log.display()),
        ));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `prime sft` into `warmup_dir`; returns its seconds.
fn run_warmup(settings: &TrainSettings, config: &Path, warmup_dir: &Path) -> Result<f64> {
    std::fs::create_dir_all(warmup_dir).map_err(io(warmup_dir))?;
    let log = warmup_dir.join("sft.log");
    tracing::info!(dir = %warmup_dir.display(), log = %log.display(), "running the supervised warm-up once");
    let mut command = prime_command(settings, &log)?;
    command
        .arg("sft")
        .arg("--config")
        .arg(config)
        .arg("--run-dir")
        .arg(warmup_dir)
        .args(["--device", &settings.device]);
    for o in &settings.overrides {
        command.args(["--set", o]);
    }
    run_logged(command, "the supervised warm-up failed", &log)
}

/// A fresh run directory holding copies of the warm-up's `world/` and `sft/checkpoint/`.
fn prepare_run_dir(warmup_dir: &Path, run_dir: &Path) -> Result<()> {
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir).map_err(io(run_dir))?;
    }
    let checkpoint = prime_learner::checkpoint::sft_checkpoint(run_dir);
    copy_dir(
        &prime_learner::checkpoint::sft_checkpoint(warmup_dir),
        &checkpoint,
    )?;
    let world = warmup_dir.join("world");
    if world.is_dir() {
        copy_dir(&world, &run_dir.join("world"))?;
    }
    Ok(())
}

/// Copies the files under `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io(&source))?.is_dir() {
            copy_dir(&source, &target)?;
        } else {
            std::fs::copy(&source, &target).map_err(io(&source))?;
        }
    }
    Ok(())
}

/// `prime train` for `variant` in `run_dir`; returns its seconds.
fn run_prime_train(
    settings: &TrainSettings,
    config: &Path,
    run_dir: &Path,
    variant: &Variant,
) -> Result<f64> {
    let actors = variant.actors;
    let log = run_dir.join("train.log");
    let mut command = prime_command(settings, &log)?;
    command
        .arg("train")
        .arg("--config")
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .args([
            "--actors",
            &actors.to_string(),
            "--device",
            &settings.device,
        ]);
    for o in settings
        .all_overrides()
        .into_iter()
        .chain(variant.overrides())
    {
        command.args(["--set", &o]);
    }
    run_logged(
        command,
        &format!("prime train ({})", variant.dir_name()),
        &log,
    )
}

fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| service_error("metrics.jsonl", e)))
        .collect()
}

/// The learner's split over `steps` (in order): each step's wall time since the previous
/// record (since `start`, when the learner was ready, for the first) is its rollout wait, its
/// step time (`train_seconds`) and what lay between the steps; the step time is the PRM and
/// policy timers plus the untimed rest.
pub fn learner_split(steps: &[&StepRecord], start: f64, evaluation: f64) -> LearnerSplit {
    let mut split = LearnerSplit {
        evaluation,
        ..LearnerSplit::default()
    };
    let mut previous_wall = start;
    for s in steps {
        let m = &s.metrics;
        let prm = m.time_reference_s + m.time_prm_s;
        let policy = m.time_old_logprobs_s + m.time_advantages_s + m.time_policy_s;
        split.rollout_wait += s.rollout_seconds;
        split.prm_update += prm;
        split.policy_update += policy;
        split.step_untimed += s.train_seconds - prm - policy;
        split.between_steps += s.wall_seconds - previous_wall - s.rollout_seconds - s.train_seconds;
        previous_wall = s.wall_seconds;
    }
    split.other = split.step_untimed + split.between_steps;
    split
}

/// One row from a run's records and its actors' split.
pub fn summarize(
    actors: usize,
    records: &[Record],
    actor: ActorSplit,
    process_seconds: f64,
    (load_before, load_after): (Option<f64>, Option<f64>),
    run_dir: &Path,
) -> Result<TrainRow> {
    let steps: Vec<&StepRecord> = records
        .iter()
        .filter_map(|r| match r {
            Record::Step(s) => Some(s.as_ref()),
            Record::Eval { .. } => None,
        })
        .collect();
    let last = steps
        .last()
        .ok_or_else(|| service_error("metrics.jsonl", "no step records"))?;
    // A fresh run is evaluated before its first step; the window starts after that.
    let start = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval {
                step: 0,
                evaluation,
            } => Some(evaluation.wall_seconds + evaluation.seconds),
            _ => None,
        })
        .fold(0.0, f64::max);
    let wall = last.wall_seconds - start;
    // Evaluations between the first and the last step.
    let evaluation = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval { step, evaluation } if (1..last.step).contains(step) => {
                Some(evaluation.seconds)
            }
            _ => None,
        })
        // Not `sum`, which gives -0.0 for no evaluations.
        .fold(0.0, |total, seconds| total + seconds);
    let count = steps.len() as u64;
    let per_second = |x: f64| x / wall.max(1e-9);
    let last_evaluation = records.iter().rev().find_map(|r| match r {
        Record::Eval { step, evaluation } if *step == last.step => Some(evaluation),
        _ => None,
    });
    Ok(TrainRow {
        actors,
        estimator: String::new(),
        staleness: 0,
        seed: 0,
        steps: count,
        wall_seconds: wall,
        start_seconds: start,
        process_seconds,
        steps_per_hour: 3600.0 * per_second(count as f64),
        steady_steps_per_hour: (count > 1).then(|| {
            3600.0 * (count - 1) as f64 / (last.wall_seconds - steps[0].wall_seconds).max(1e-9)
        }),
        groups_per_second: per_second(steps.iter().map(|s| s.groups_seen as f64).sum()),
        sampled_tokens_per_second: per_second(actor.tokens as f64),
        speedup: 1.0,
        learner_step_seconds: steps.iter().map(|s| s.train_seconds).sum::<f64>() / count as f64,
        final_accuracy: last_evaluation.map(|e| e.accuracy),
        final_greedy_accuracy: last_evaluation.and_then(|e| e.greedy_accuracy),
        final_problems: last_evaluation.map_or(0, |e| e.problems),
        learner: learner_split(&steps, start, evaluation),
        actor,
        train_reward: steps.iter().map(|s| s.train_reward).sum::<f64>() / count as f64,
        load_before,
        load_after,
        run_dir: run_dir.to_path_buf(),
    })
}

/// Sets each row's speed-up against the 1-actor row with the same estimator, staleness and
/// seed (the first such row when there is none).
fn set_speedups(rows: &mut [TrainRow]) {
    let same = |a: &TrainRow, b: &TrainRow| {
        a.estimator == b.estimator && a.staleness == b.staleness && a.seed == b.seed
    };
    let bases: Vec<f64> = rows
        .iter()
        .map(|row| {
            let mut peers = rows.iter().filter(|r| same(r, row));
            let first = peers.clone().next();
            peers
                .find(|r| r.actors == 1)
                .or(first)
                .map_or(1.0, |r| r.steps_per_hour)
        })
        .collect();
    for (row, base) in rows.iter_mut().zip(bases) {
        row.speedup = row.steps_per_hour / base.max(1e-12);
    }
}

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The runs that differ only in the seed, summarised.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeedSummary {
    /// The estimator.
    pub estimator: String,
    /// Actor processes.
    pub actors: usize,
    /// The staleness bound.
    pub staleness: u64,
    /// Seeds run.
    pub seeds: usize,
    /// Steps per hour: mean and standard deviation over the seeds.
    pub steps_per_hour: (f64, f64),
    /// The learner's seconds per step (inside the step): mean and standard deviation.
    pub learner_step_seconds: (f64, f64),
    /// Wall seconds per step (waiting for rollouts included): mean and standard deviation.
    pub wall_step_seconds: (f64, f64),
    /// Final held-out accuracy: mean and standard deviation over the seeds that evaluated.
    pub final_accuracy: Option<(f64, f64)>,
    /// Final greedy accuracy, the same way.
    pub final_greedy_accuracy: Option<(f64, f64)>,
}

/// One [`SeedSummary`] per estimator, actor count and staleness bound, in the rows' order.
pub fn summarize_seeds(rows: &[TrainRow]) -> Vec<SeedSummary> {
    let mut keys: Vec<(String, usize, u64)> = Vec::new();
    for r in rows {
        let key = (r.estimator.clone(), r.actors, r.staleness);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.into_iter()
        .map(|(estimator, actors, staleness)| {
            let group: Vec<&TrainRow> = rows
                .iter()
                .filter(|r| {
                    r.estimator == estimator && r.actors == actors && r.staleness == staleness
                })
                .collect();
            let of = |f: &dyn Fn(&TrainRow) -> f64| {
                mean_sd(&group.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let of_some = |f: &dyn Fn(&TrainRow) -> Option<f64>| {
                let values: Vec<f64> = group.iter().filter_map(|r| f(r)).collect();
                (!values.is_empty()).then(|| mean_sd(&values))
            };
            SeedSummary {
                seeds: group.len(),
                steps_per_hour: of(&|r| r.steps_per_hour),
                learner_step_seconds: of(&|r| r.learner_step_seconds),
                wall_step_seconds: of(&|r| r.wall_seconds / r.steps.max(1) as f64),
                final_accuracy: of_some(&|r| r.final_accuracy),
                final_greedy_accuracy: of_some(&|r| r.final_greedy_accuracy),
                estimator,
                actors,
                staleness,
            }
        })
        .collect()
}

/// A ratio between two summaries that differ in one setting.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ratio {
    /// What is compared, e.g. `prime / rloo learner s/step, 2 actors, staleness 0`.
    pub what: String,
    /// The ratio of the means.
    pub value: f64,
}

/// PRIME's learner and wall seconds per step over RLOO's (same actors and staleness), and
/// steps per hour with each staleness bound above 0 over the synchronous runs' (same
/// estimator and actors).
pub fn ratios(summaries: &[SeedSummary]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for s in summaries.iter().filter(|s| s.estimator == "prime") {
        if let Some(r) = summaries
            .iter()
            .find(|r| r.estimator == "rloo" && r.actors == s.actors && r.staleness == s.staleness)
        {
            let at = format!("{} actor(s), staleness {}", s.actors, s.staleness);
            out.push(Ratio {
                what: format!("prime / rloo learner s/step, {at}"),
                value: s.learner_step_seconds.0 / r.learner_step_seconds.0.max(1e-12),
            });
            out.push(Ratio {
                what: format!("prime / rloo wall s/step, {at}"),
                value: s.wall_step_seconds.0 / r.wall_step_seconds.0.max(1e-12),
            });
        }
    }
    for s in summaries.iter().filter(|s| s.staleness > 0) {
        if let Some(sync) = summaries
            .iter()
            .find(|r| r.staleness == 0 && r.estimator == s.estimator && r.actors == s.actors)
        {
            out.push(Ratio {
                what: format!(
                    "steps/h staleness {} / staleness 0, {}, {} actor(s)",
                    s.staleness, s.estimator, s.actors
                ),
                value: s.steps_per_hour.0 / sync.steps_per_hour.0.max(1e-12),
            });
        }
    }
    out
}

/// The `key=value` fields of a log line (span fields included), values as written.
fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split(|c: char| c.is_whitespace() || c == '{' || c == '}')
        .filter_map(|token| token.split_once('='))
        .map(|(key, value)| (key, value.trim_end_matches(':')))
}

/// What one actor log's "batch submitted" lines (written by `prime actor run`) say about the
/// batches of policy versions below `steps`: the batches that fed the timed steps.
pub fn actor_split_from_log(text: &str, steps: u64) -> ActorSplit {
    let mut split = ActorSplit::default();
    for line in text.lines().filter(|l| l.contains("batch submitted")) {
        let field = |name: &str| {
            fields(line)
                .find(|(key, _)| *key == name)
                .and_then(|(_, value)| value.parse::<f64>().ok())
        };
        match field("policy_version") {
            Some(version) if version < steps as f64 => {}
            _ => continue,
        }
        let seconds = |name: &str| field(name).unwrap_or(0.0);
        split.add(&ActorSplit {
            batches: 1,
            groups_accepted: seconds("accepted") as u64,
            tokens: seconds("tokens") as u64,
            waiting: seconds("wait_secs"),
            weights: seconds("weights_secs"),
            sampling: seconds("sample_secs"),
            grading: seconds("grade_secs"),
            submitting: seconds("submit_secs"),
        });
    }
    split
}

/// The actors' split, summed over `logs/actor-0.log` .. `actor-{actors-1}.log`.
fn read_actor_logs(logs: &Path, actors: usize, steps: u64) -> Result<ActorSplit> {
    let mut total = ActorSplit::default();
    for i in 0..actors {
        let path = logs.join(format!("actor-{i}.log"));
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        total.add(&actor_split_from_log(&text, steps));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A line as `prime actor run` writes it to a file (no colour), span fields first.
    const LINE: &str = "2026-12-06T05:23:41.123456Z  INFO batch{policy_version=3 prompts=8}: prime_actor::run: batch submitted groups=8 accepted=7 duplicates=0 stale=1 tokens=1234 mean_score=0.5 secs=3.25 wait_secs=0.5 weights_secs=0.25 sample_secs=2 grade_secs=0.125 submit_secs=0.0625";

    #[test]
    fn actor_lines_are_summed_below_the_step_count() {
        let other =
            "2026-12-06T05:23:40Z  INFO prime_actor::run: registered actor_id=a policy_version=0";
        let late = LINE.replace("policy_version=3", "policy_version=4");
        let text = format!("{other}\n{LINE}\n{LINE}\n{late}\n");
        let split = actor_split_from_log(&text, 4);
        assert_eq!(split.batches, 2);
        assert_eq!(split.groups_accepted, 14);
        assert_eq!(split.tokens, 2468);
        assert_eq!(split.waiting, 1.0);
        assert_eq!(split.weights, 0.5);
        assert_eq!(split.sampling, 4.0);
        assert_eq!(split.grading, 0.25);
        assert_eq!(split.submitting, 0.125);
        assert_eq!(split.total(), 5.875);
        assert_eq!(actor_split_from_log(&text, 3), ActorSplit::default());
        assert_eq!(actor_split_from_log(&text, 5).batches, 3);
    }

    fn row(actors: usize, steps_per_hour: f64) -> TrainRow {
        TrainRow {
            actors,
            estimator: "prime".into(),
            staleness: 0,
            seed: 0,
            steps: 1,
            wall_seconds: 1.0,
            start_seconds: 0.0,
            process_seconds: 1.0,
            steps_per_hour,
            steady_steps_per_hour: None,
            groups_per_second: 0.0,
            sampled_tokens_per_second: 0.0,
            speedup: 0.0,
            learner_step_seconds: 0.0,
            final_accuracy: None,
            final_greedy_accuracy: None,
            final_problems: 0,
            learner: LearnerSplit::default(),
            actor: ActorSplit::default(),
            train_reward: 0.0,
            load_before: None,
            load_after: None,
            run_dir: PathBuf::new(),
        }
    }

    #[test]
    fn speedups_are_against_one_actor() {
        let mut rows = vec![row(2, 300.0), row(1, 200.0), row(4, 100.0)];
        set_speedups(&mut rows);
        let speedups: Vec<f64> = rows.iter().map(|r| r.speedup).collect();
        assert_eq!(speedups, [1.5, 1.0, 0.5]);
    }

    #[test]
    fn speedups_compare_runs_of_the_same_estimator_staleness_and_seed() {
        let with = |estimator: &str, staleness, actors, steps_per_hour| TrainRow {
            estimator: estimator.into(),
            staleness,
            ..row(actors, steps_per_hour)
        };
        let mut rows = vec![
            with("prime", 0, 1, 100.0),
            with("prime", 0, 2, 150.0),
            with("rloo", 0, 1, 200.0),
            with("rloo", 0, 2, 500.0),
            with("prime", 1, 2, 240.0),
        ];
        set_speedups(&mut rows);
        let speedups: Vec<f64> = rows.iter().map(|r| r.speedup).collect();
        // The staleness-1 run has no 1-actor peer: it is its own base.
        assert_eq!(speedups, [1.0, 1.5, 1.0, 2.5, 1.0]);
    }

    #[test]
    fn variants_cover_every_combination_in_order() {
        let settings = TrainSettings {
            prime: PathBuf::new(),
            config: None,
            overrides: vec![],
            out_dir: PathBuf::new(),
            warmup_dir: None,
            steps: 1,
            actors: vec![1, 2],
            estimators: vec!["prime".into(), "rloo".into()],
            staleness: vec![],
            seeds: vec![0, 1],
            threads: 1,
            device: "cpu".into(),
        };
        let names: Vec<String> = settings.variants().iter().map(Variant::dir_name).collect();
        assert_eq!(
            names,
            [
                "prime-actors-1-seed-0",
                "prime-actors-1-seed-1",
                "prime-actors-2-seed-0",
                "prime-actors-2-seed-1",
                "rloo-actors-1-seed-0",
                "rloo-actors-1-seed-1",
                "rloo-actors-2-seed-0",
                "rloo-actors-2-seed-1",
            ]
        );
        assert_eq!(
            settings.variants()[5].overrides(),
            ["learner.algo.estimator=rloo", "learner.seed=1"]
        );
        let plain = TrainSettings {
            estimators: vec![],
            seeds: vec![],
            staleness: vec![1],
            actors: vec![4],
            ..settings
        };
        let variants = plain.variants();
        assert_eq!(variants.len(), 1);
        assert_eq!(variants[0].dir_name(), "actors-4-staleness-1");
        assert_eq!(variants[0].overrides(), ["learner.rollout.max_staleness=1"]);
    }

    #[test]
    fn seeds_are_summarised_and_compared() {
        let run = |estimator: &str, staleness, seed, steps_per_hour, step_s, acc| TrainRow {
            estimator: estimator.into(),
            staleness,
            seed,
            steps: 10,
            wall_seconds: 36000.0 / steps_per_hour,
            learner_step_seconds: step_s,
            final_accuracy: Some(acc),
            ..row(2, steps_per_hour)
        };
        let rows = vec![
            run("prime", 0, 0, 100.0, 3.0, 0.5),
            run("prime", 0, 1, 120.0, 5.0, 0.7),
            run("rloo", 0, 0, 200.0, 2.0, 0.4),
            run("prime", 1, 0, 165.0, 4.0, 0.6),
        ];
        let summaries = summarize_seeds(&rows);
        assert_eq!(summaries.len(), 3);
        let sync = &summaries[0];
        assert_eq!((sync.estimator.as_str(), sync.seeds), ("prime", 2));
        assert_eq!(sync.steps_per_hour.0, 110.0);
        // Sample sd of {100, 120}: sqrt(200) = 14.142...
        assert!((sync.steps_per_hour.1 - 200f64.sqrt()).abs() < 1e-12);
        assert_eq!(sync.learner_step_seconds, (4.0, 2f64.sqrt()));
        let (acc, acc_sd) = sync.final_accuracy.unwrap();
        assert!((acc - 0.6).abs() < 1e-12 && (acc_sd - 0.02f64.sqrt()).abs() < 1e-12);
        assert_eq!(sync.final_greedy_accuracy, None);
        assert_eq!(summaries[1].steps_per_hour, (200.0, 0.0));

        let ratios = ratios(&summaries);
        let values: Vec<(&str, f64)> = ratios.iter().map(|r| (r.what.as_str(), r.value)).collect();
        assert_eq!(values.len(), 3);
        assert_eq!(
            values[0],
            ("prime / rloo learner s/step, 2 actor(s), staleness 0", 2.0)
        );
        // Wall s/step: prime (360 + 300) / 2 = 330 over rloo 180.
        assert_eq!(
            values[1].0,
            "prime / rloo wall s/step, 2 actor(s), staleness 0"
        );
        assert!((values[1].1 - 330.0 / 180.0).abs() < 1e-12);
        assert_eq!(
            values[2],
            ("steps/h staleness 1 / staleness 0, prime, 2 actor(s)", 1.5)
        );
    }
}
