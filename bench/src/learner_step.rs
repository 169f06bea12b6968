//! The learner step (old and reference log-probs, PRM update, advantages, PPO update) against
//! the same step in plain PyTorch eager, `tests/python/prime_step_ref.py`, on the same models
//! and the same batch.
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prime_algo::ReferenceType;
use prime_learner::{prime_step, LearnerConfig, PrimeModels, ScoredGroup};
use prime_model::CausalLm;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tch::{Device, Kind};

use crate::error::{BenchError, Result};
use crate::machine::{load_average, Machine};
use crate::ours::median;
use crate::python::{Python, TinyModel};

/// The batch one step trains on.
#[derive(Debug, Clone, Serialize)]
pub struct StepSettings {
    /// Groups in the batch.
    pub groups: usize,
    /// Responses per group.
    pub k: usize,
    /// Random prompt ids per group.
    pub prompt_len: usize,
    /// Response ids per response; two in three responses end early with EOS.
    pub response_len: usize,
    /// Optimizer steps of each update (the groups split whole, in order).
    pub mini_batches: usize,
    /// Timed steps per side, after one warm-up step.
    pub repeats: usize,
    /// Seeds the models and the batch.
    pub seed: u64,
}

/// Seconds of one step on each side.
#[derive(Debug, Clone, Serialize)]
pub struct StepTimes {
    /// Median seconds of one step.
    pub seconds: f64,
    /// Every timed step, warm-up excluded.
    pub seconds_all: Vec<f64>,
}

impl StepTimes {
    /// The median of `seconds_all`, with them.
    pub fn new(seconds_all: Vec<f64>) -> Self {
        Self {
            seconds: median(&seconds_all),
            seconds_all,
        }
    }
}

/// What `prime bench learner-step` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub settings: StepSettings,
    pub model: TinyModel,
    /// Prompt plus response tokens in the batch.
    pub tokens: usize,
    pub ours: StepTimes,
    pub pytorch: StepTimes,
    /// PyTorch's step time over ours (above 1: we are faster).
    pub speedup: f64,
    pub machine: Machine,
}

impl StepReport {
    /// A plain-text table: the setting, the machine, then both sides.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "learner step (old + reference log-probs, PRM update, advantages, policy update) on cpu (f32): {} groups x {} responses, prompt {} + response {} tokens ({} tokens), {} mini-batches; median of {} steps after a warm-up",
            s.groups, s.k, s.prompt_len, s.response_len, self.tokens, s.mini_batches, s.repeats
        );
        let _ = writeln!(out, "models: 3 x random Qwen2 (vocab {}, hidden {}, {} layers, {} heads / {} kv heads, intermediate {}); machine: {}", self.model.vocab, self.model.hidden, self.model.layers, self.model.heads, self.model.kv_heads, self.model.intermediate, self.machine.describe());
        let _ = writeln!(out, "{:<22} {:>10}  pytorch/ours", "impl", "median s");
        let _ = writeln!(
            out,
            "{:<22} {:>10.4}  {:.2}x",
            "prime-rs", self.ours.seconds, self.speedup
        );
        let _ = writeln!(
            out,
            "{:<22} {:>10.4}",
            "pytorch eager (ref)", self.pytorch.seconds
        );
        out
    }
}

/// The step's hyperparameters, the same on both sides.
const BETA: f64 = 0.05;
const POLICY_LR: f64 = 5e-7;
const PRM_LR: f64 = 1e-6;

/// Makes policy, PRM and reference (random, different seeds) and the batch in a temporary
/// directory, times our step in this process and the reference's in a subprocess.
pub fn run_step_bench(
    settings: &StepSettings,
    model: &TinyModel,
    python: &Python,
) -> Result<StepReport> {
    if settings.groups == 0 || settings.k < 2 || settings.repeats == 0 {
        return Err(BenchError::Settings(
            "need at least one group, k >= 2 and at least one repeat".into(),
        ));
    }
    let temp = tempfile::Builder::new()
        .prefix("prime-bench-step-")
        .tempdir()
        .map_err(|source| BenchError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let dir = temp.path();
    let path = |name: &str| dir.join(name);
    for (i, name) in ["policy", "prm", "ref"].into_iter().enumerate() {
        let spec = TinyModel {
            seed: settings.seed + i as u64,
            max_positions: model
                .max_positions
                .max(settings.prompt_len + settings.response_len),
            ..model.clone()
        };
        python.make_tiny_model(&spec, &path(name))?;
    }
    let rollouts = path("rollouts.jsonl");
    let load_before = load_average();
    let tokens = write_rollouts(&rollouts, settings, model.vocab as i64)?;

    let ours = time_ours(settings, dir, &rollouts)?;
    tracing::info!(seconds = ours.seconds, "prime-rs learner step");
    let line = python.run_script(
        &step_script(),
        &step_reference_args(settings, dir, &rollouts),
    )?;
    let parsed: crate::python::ReferenceLine =
        serde_json::from_str(&line).map_err(|e| BenchError::Reference {
            script: step_script(),
            message: format!("bad JSON line {line:?}: {e}"),
        })?;
    let pytorch = StepTimes::new(parsed.seconds_all);
    tracing::info!(seconds = pytorch.seconds, "pytorch learner step");
    let environment = parsed.environment;
    let machine = Machine::now(environment.threads, environment, load_before);
    Ok(StepReport {
        settings: settings.clone(),
        model: model.clone(),
        tokens,
        speedup: pytorch.seconds / ours.seconds,
        ours,
        pytorch,
        machine,
    })
}

/// The wrapper that times the reference step.
pub fn step_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/bench_prime_step.py")
}

fn step_reference_args(settings: &StepSettings, dir: &Path, rollouts: &Path) -> Vec<String> {
    let dir = |name: &str| dir.join(name).display().to_string();
    [
        "--repeats".to_string(),
        settings.repeats.to_string(),
        "--".into(),
        "--policy".into(),
        dir("policy"),
        "--prm".into(),
        dir("prm"),
        "--ref".into(),
        dir("ref"),
        "--rollouts".into(),
        rollouts.display().to_string(),
        "--out".into(),
        dir("reference-out"),
        "--mini-batches".into(),
        settings.mini_batches.to_string(),
        "--beta".into(),
        BETA.to_string(),
        "--policy-lr".into(),
        POLICY_LR.to_string(),
        "--prm-lr".into(),
        PRM_LR.to_string(),
    ]
    .into()
}

/// Random groups in `prime learner step --rollouts` form; returns the batch's token count.
pub(crate) fn write_rollouts(path: &Path, settings: &StepSettings, vocab: i64) -> Result<usize> {
    let eos = vocab - 1;
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut ids = |len: usize| -> Vec<i64> { (0..len).map(|_| rng.gen_range(0..eos)).collect() };
    let scores = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5];
    let mut text = String::new();
    let mut tokens = 0;
    for g in 0..settings.groups {
        let prompt_ids = ids(settings.prompt_len);
        let responses: Vec<serde_json::Value> = (0..settings.k)
            .map(|i| {
                let row = g * settings.k + i;
                let mut response = ids(settings.response_len);
                if row % 3 != 2 {
                    let at = settings.response_len / 2 + row % (settings.response_len / 2).max(1);
                    response[at.min(settings.response_len - 1)] = eos;
                }
                serde_json::json!({ "ids": response, "score": scores[row % scores.len()] })
            })
            .collect();
        tokens += settings.k * (settings.prompt_len + settings.response_len);
        let group = serde_json::json!({ "prompt_ids": prompt_ids, "responses": responses });
        text.push_str(&group.to_string());
        text.push('\n');
    }
    let io = |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io)?;
    Ok(tokens)
}

/// Our step as `prime learner step` runs it, on models loaded once: a warm-up step, then
/// `repeats` timed steps (each on the models the previous one left; the work is the same).
fn time_ours(settings: &StepSettings, dir: &Path, rollouts: &Path) -> Result<StepTimes> {
    let groups = read_rollouts(rollouts)?;
    let config = step_config(settings);
    let load = |name: &str| CausalLm::load(&dir.join(name), Device::Cpu, Kind::Float, Kind::Float);
    let mut models = PrimeModels::new(load("policy")?, load("prm")?, Some(load("ref")?), &config);
    let mut seconds = Vec::with_capacity(settings.repeats);
    for iteration in 0..=settings.repeats {
        let start = Instant::now();
        prime_step(
            &mut models,
            &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
            &groups,
            &config,
            iteration as u64,
        )?;
        if iteration > 0 {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(StepTimes::new(seconds))
}

/// The groups of a rollouts file [`write_rollouts`] wrote.
pub(crate) fn read_rollouts(path: &Path) -> Result<Vec<ScoredGroup>> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| BenchError::Settings(format!("rollouts: {e}")))
}

/// The step's config, the same on both sides: `settings`' mini-batches, a frozen reference,
/// [`BETA`] and the learning rates.
pub(crate) fn step_config(settings: &StepSettings) -> LearnerConfig {
    let mut config = LearnerConfig::default();
    config.algo.mini_batches = settings.mini_batches;
    config.algo.reference = ReferenceType::Freeze;
    config.algo.prm.beta = BETA;
    config.policy_optimizer.lr = POLICY_LR;
    config.prm_optimizer.lr = PRM_LR;
    config
}
