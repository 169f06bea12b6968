//! The learner step with ZeRO-3 against ZeRO-2 and one process, side by side on the CPU: W
//! ranks as threads of this process joined by the TCP ring on loopback, the same batch and
//! models as `prime bench learner-step`, recomputed activations everywhere (ZeRO-2 and ZeRO-3
//! need them, so one process uses them too). Reports seconds per step (a step ends when its
//! slowest rank does) and what rank 0 holds after it.
use std::fmt::Write as _;
use std::time::Instant;

use prime_learner::config::ParallelConfig;
use prime_learner::parallel::{DataParallel, Resident, Role};
use prime_learner::{prime_step, LearnerConfig, PrimeModels, ScoredGroup};
use prime_model::{CausalLm, Qwen2Config};
use serde::Serialize;
use tch::{Device, Kind};

use crate::error::{BenchError, Result};
use crate::learner_step::{read_rollouts, step_config, write_rollouts, StepSettings, StepTimes};
use crate::machine::{cores, cpu_model, load_average};
use crate::python::TinyModel;

/// How the ranks share the training state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// One process, nothing sharded.
    Single,
    /// Gradients and optimizer state sharded (`learner.parallel.zero2`).
    Zero2,
    /// Parameters sharded too (`learner.parallel.zero3`).
    Zero3,
}

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ShardingRow {
    pub mode: Mode,
    pub ranks: usize,
    pub times: StepTimes,
    /// Bytes rank 0 holds after the last step, counted from its tensors.
    pub resident: ResidentBytes,
    /// ZeRO-3: stage gathers of the policy a prefetch served on rank 0, over all steps.
    pub prefetched_gathers: usize,
}

/// [`Resident`] in a serialisable form.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResidentBytes {
    pub params: usize,
    pub grads: usize,
    pub optimizer: usize,
}

impl From<Resident> for ResidentBytes {
    fn from(r: Resident) -> Self {
        Self {
            params: r.params,
            grads: r.grads,
            optimizer: r.optimizer,
        }
    }
}

/// What `prime bench learner-step --zero3` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ShardingReport {
    pub settings: StepSettings,
    pub model: TinyModel,
    pub tokens: usize,
    pub rows: Vec<ShardingRow>,
    pub cpu: String,
    pub cores: usize,
    pub threads_per_rank: i32,
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

impl ShardingReport {
    /// A plain-text table: the setting, the machine, one row per mode.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let m = &self.model;
        let load = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.2}"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "learner step on cpu (f32, recomputed activations), ranks as threads on the TCP ring: {} groups x {} responses, prompt {} + response {} tokens ({} tokens), {} mini-batches; median of {} steps after a warm-up",
            s.groups, s.k, s.prompt_len, s.response_len, self.tokens, s.mini_batches, s.repeats
        );
        let _ = writeln!(
            out,
            "models: 3 x random Qwen2 (vocab {}, hidden {}, {} layers, {} heads / {} kv heads, intermediate {}); machine: {}, {} cores, {} torch thread(s) per rank, load {} -> {}",
            m.vocab, m.hidden, m.layers, m.heads, m.kv_heads, m.intermediate, self.cpu, self.cores,
            self.threads_per_rank, load(self.load_before), load(self.load_after)
        );
        let _ = writeln!(
            out,
            "{:<8} {:>5} {:>10} {:>10}  rank 0 holds (MiB): {:>8} {:>8} {:>9}",
            "mode", "ranks", "median s", "/ DP=1", "params", "grads", "optimizer"
        );
        let single = self.rows.first().map_or(1.0, |r| r.times.seconds);
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:<8} {:>5} {:>10.3} {:>9.2}x  {:>28.2} {:>8.2} {:>9.2}",
                format!("{:?}", row.mode),
                row.ranks,
                row.times.seconds,
                row.times.seconds / single,
                mib(row.resident.params),
                mib(row.resident.grads),
                mib(row.resident.optimizer),
            );
        }
        out
    }
}

fn qwen2(model: &TinyModel, positions: usize) -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": model.vocab, "hidden_size": model.hidden,
        "intermediate_size": model.intermediate, "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads, "num_key_value_heads": model.kv_heads,
        "max_position_embeddings": model.max_positions.max(positions),
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "eos_token_id": model.vocab - 1
    }))
    .expect("a valid Qwen2 config")
}

/// Policy, PRM and reference of `model`'s shape from `seed`, `seed + 1`, `seed + 2`.
fn models(config: &LearnerConfig, shape: &Qwen2Config, seed: u64) -> Result<PrimeModels> {
    let make = |i: u64| {
        tch::manual_seed((seed + i) as i64);
        CausalLm::random(shape, Device::Cpu, Kind::Float, Kind::Float)
    };
    Ok(PrimeModels::new(make(0)?, make(1)?, Some(make(2)?), config))
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| BenchError::Io {
            path: "a free loopback port".into(),
            source,
        })
}

/// Rank `rank` of `world`: a warm-up step and `repeats` timed ones (a barrier before each);
/// returns the step times, what it holds after them and the prefetches served.
fn rank_steps(
    (rank, world, port): (usize, usize, u16),
    mut models: PrimeModels,
    parallel: ParallelConfig,
    groups: &[ScoredGroup],
    config: &LearnerConfig,
    repeats: usize,
) -> std::result::Result<(Vec<f64>, Resident, usize), String> {
    tch::set_num_threads(1);
    let mut dp = if world == 1 {
        DataParallel::single(Device::Cpu)
    } else {
        let group = crate::allreduce::join_loopback(rank, world, port)?;
        DataParallel::attach(&mut models, Box::new(group), parallel).map_err(|e| e.to_string())?
    };
    let mut seconds = Vec::with_capacity(repeats);
    for iteration in 0..=repeats {
        dp.comm().barrier().map_err(|e| e.to_string())?;
        let start = Instant::now();
        prime_step(&mut models, &mut dp, groups, config, iteration as u64)
            .map_err(|e| e.to_string())?;
        if iteration > 0 {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok((
        seconds,
        dp.resident(&models),
        dp.prefetched_gathers(Role::Policy),
    ))
}

/// Runs `mode` on `world` ranks (one for [`Mode::Single`]).
fn run_mode(
    mode: Mode,
    world: usize,
    shape: &Qwen2Config,
    groups: &[ScoredGroup],
    config: &LearnerConfig,
    settings: &StepSettings,
) -> Result<ShardingRow> {
    let world = if mode == Mode::Single { 1 } else { world };
    let parallel = ParallelConfig {
        zero2: mode == Mode::Zero2,
        zero3: mode == Mode::Zero3,
        ..ParallelConfig::default()
    };
    let port = free_port()?;
    // torch's generator is global: every rank's models are drawn here, one after another.
    let all_models = (0..world)
        .map(|_| models(config, shape, settings.seed))
        .collect::<Result<Vec<_>>>()?;
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = all_models
            .into_iter()
            .enumerate()
            .map(|(rank, models)| {
                let parallel = parallel.clone();
                scope.spawn(move || {
                    rank_steps(
                        (rank, world, port),
                        models,
                        parallel,
                        groups,
                        config,
                        settings.repeats,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank thread"))
            .collect::<std::result::Result<Vec<_>, String>>()
    })
    .map_err(|e| BenchError::Settings(format!("{mode:?} on {world} ranks: {e}")))?;
    // A step ends when its slowest rank does.
    let per_step = (0..settings.repeats)
        .map(|i| results.iter().map(|r| r.0[i]).fold(0.0, f64::max))
        .collect();
    let (_, resident, prefetched) = &results[0];
    Ok(ShardingRow {
        mode,
        ranks: world,
        times: StepTimes::new(per_step),
        resident: (*resident).into(),
        prefetched_gathers: *prefetched,
    })
}

/// One process, ZeRO-2 on `world` ranks and ZeRO-3 on `world` ranks, on the same models and
/// batch.
pub fn run_sharding_bench(
    settings: &StepSettings,
    model: &TinyModel,
    world: usize,
) -> Result<ShardingReport> {
    if settings.groups == 0 || settings.k < 2 || settings.repeats == 0 || world < 2 {
        return Err(BenchError::Settings(
            "need at least one group, k >= 2, one repeat and two ranks".into(),
        ));
    }
    let temp = tempfile::tempdir().map_err(|source| BenchError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let rollouts = temp.path().join("rollouts.jsonl");
    let tokens = write_rollouts(&rollouts, settings, model.vocab as i64)?;
    let groups = read_rollouts(&rollouts)?;
    let mut config = step_config(settings);
    config.memory.recompute_activations = true;
    let shape = qwen2(model, settings.prompt_len + settings.response_len);
    let load_before = load_average();
    let rows = [Mode::Single, Mode::Zero2, Mode::Zero3]
        .into_iter()
        .map(|mode| {
            let row = run_mode(mode, world, &shape, &groups, &config, settings)?;
            tracing::info!(?mode, seconds = row.times.seconds, "learner step");
            Ok(row)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ShardingReport {
        settings: settings.clone(),
        model: model.clone(),
        tokens,
        rows,
        cpu: cpu_model(),
        cores: cores(),
        threads_per_rank: 1,
        load_before,
        load_after: load_average(),
    })
}
