//! `prime bench generate` and `prime bench logprobs`: our model against transformers;
//! `prime bench learner-step`: our learner step against plain PyTorch; `prime bench
//! weight-sync`: the weight stream against raw TCP; `prime bench weight-broadcast`: the
//! weight broadcast to N actors against N concurrent weight streams; `prime bench
//! allreduce`: the learner's CPU collective backend against a plain TCP copy. Each runs both
//! sides in one invocation (the harness lives in the prime-bench crate); `prime bench
//! verifier` is wired from the verifier's module. `prime bench train` times the end-to-end
//! demo (`prime train`) with 1, 2, 4 actors. `prime bench data` times preparing the
//! full-size Eurus-2-RL-Data stand-in against transformers' `apply_chat_template`.
//!
//! Both sides use the same torch thread count: the global `--threads` (or `PRIME_THREADS`),
//! else torch's default on this machine; `prime bench train` gives each of its processes the
//! global `--threads`, else one thread.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use prime_bench::allreduce::AllReduceSettings;
use prime_bench::python::default_python;
use prime_bench::{BenchSettings, Python, Task, TinyModel};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Sampling throughput (generated tokens/s) against transformers' `generate`.
    Generate(GenerateArgs),
    /// Scoring throughput (scored tokens/s): no-grad forward and next-token log-probs.
    Logprobs(LogprobsArgs),
    /// Learner step time (PRM + policy update on one batch) against the same step in plain
    /// PyTorch eager (tests/python/prime_step_ref.py).
    LearnerStep(LearnerStepArgs),
    /// Weight sync GB/s: the learner's FetchWeights stream over loopback against a raw TCP copy.
    WeightSync(WeightSyncArgs),
    /// A new version to N actors on loopback: the learner's weight broadcast (TCP ring) against
    /// N concurrent FetchWeights streams; seconds until all N verified it, bytes the learner
    /// sent, and the first round (forming the group) apart.
    WeightBroadcast(WeightBroadcastArgs),
    /// Verifier: math grading against math-verify, sandboxed code tests against bare python3.
    Verifier(super::verifier::BenchVerifierArgs),
    /// Simulated actors (no model) stream groups to one real learner on a tiny model:
    /// groups/s, submit latency, the learner's peak memory and the loss check.
    Load(LoadArgs),
    /// The learner's CPU all-reduce (TCP ring on loopback): bus bandwidth against a plain TCP
    /// copy of the same bytes.
    Allreduce(AllreduceArgs),
    /// The end-to-end demo timed: `prime train` (verifier, learner, N actors on loopback) for
    /// a few PRIME steps from one warm-up checkpoint, per actor count: steps/hour, groups/s,
    /// sampled tokens/s, the learner's time split (rollout wait, PRM, policy, other), the
    /// actors' (waiting, weights, sampling, grading, submitting) and the speed-up over one
    /// actor.
    Train(TrainBenchArgs),
    /// Data preparation of the full-size Eurus-2-RL-Data stand-in as a run does it (read
    /// parquet, validate, chat template, tokenize on all cores, drop prompts over the limit)
    /// against transformers' `apply_chat_template(messages, tokenize=True,
    /// add_generation_prompt=True)` row by row over the same file; rows kept on each side
    /// and the prompt ids of sampled rows compared.
    Data(DataBenchArgs),
}

/// Options of `prime bench data`.
#[derive(Debug, Args)]
pub struct DataBenchArgs {
    /// Directory of the stand-in (`prime world --standin --out DIR`); written there with the
    /// default settings (482,000 training rows, seed 0) when it has no data/train.parquet.
    #[arg(long, default_value = "runs/standin")]
    pub standin: PathBuf,
    /// Prepare only the first N training rows (default: all).
    #[arg(long)]
    pub rows: Option<usize>,
    /// Prompts over this many tokens are dropped (the paper's limit).
    #[arg(long, default_value_t = 1024)]
    pub max_prompt_tokens: usize,
    /// Timed preparations per side; the median counts.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Compare the prompt ids of the rows whose position is a multiple of this.
    #[arg(long, default_value_t = 500)]
    pub sample_every: usize,
    /// Python with transformers and pyarrow (default as for `prime bench generate`).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn run_data(args: DataBenchArgs) -> Result<()> {
    let python = Python {
        executable: args.python.clone().unwrap_or_else(default_python),
        threads: 1,
    };
    let settings = prime_bench::data_prep::DataBenchSettings {
        standin: args.standin,
        rows: args.rows,
        max_prompt_tokens: args.max_prompt_tokens,
        repeats: args.repeats,
        sample_every: args.sample_every,
    };
    let report = prime_bench::data_prep::run_data_bench(&settings, &python)?;
    print!("{}", report.table());
    write_json(&args.json, serde_json::to_value(&report)?)
}

/// Options of `prime bench train`.
#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Run config (default: the embedded configs/demo.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value, e.g. `--set learner.rollout.batch_prompts=16` (repeatable; applied
    /// after the benchmark's own: steps, no evaluation or checkpoints between steps, 16
    /// closing evaluation problems).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Steps per run, from the warm-up checkpoint.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Actor counts, comma-separated; one fresh run each (same config and seed).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub actors: Vec<usize>,
    /// Advantage estimators, comma-separated (e.g. `prime,rloo`); one run each per actor
    /// count, with PRIME's learner seconds per step over RLOO's reported. Default: the
    /// config's.
    #[arg(long = "estimator", value_delimiter = ',')]
    pub estimators: Vec<String>,
    /// Staleness bounds (`learner.rollout.max_staleness`), comma-separated (e.g. `0,1`); one
    /// run each, with steps per hour over the synchronous run's reported. Default: the config's.
    #[arg(long, value_delimiter = ',')]
    pub staleness: Vec<u64>,
    /// Learner seeds, comma-separated (e.g. `0,1,2`); runs that differ only in the seed are
    /// summarised as mean ± sd. Default: the config's.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Directory of the runs (one per variant, named like `prime-actors-2-staleness-1-seed-0`
    /// with the parts given on the command line; replaced) and warmup/.
    #[arg(long, default_value = "runs/bench-train")]
    pub out_dir: PathBuf,
    /// Run directory of the supervised warm-up to start from (e.g. runs/demo after `make
    /// demo`, with the same [world], [model] and [sft]); made with `prime sft` when it has
    /// no checkpoint. Default: OUT_DIR/warmup.
    #[arg(long)]
    pub warmup_dir: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu) (learner and actors).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn run_train(args: TrainBenchArgs) -> Result<()> {
    let threads = std::env::var("PRIME_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let settings = prime_bench::train::TrainSettings {
        prime: std::env::current_exe().context("locating the prime binary")?,
        config: args.config,
        overrides: args.overrides,
        out_dir: args.out_dir,
        warmup_dir: args.warmup_dir,
        steps: args.steps,
        actors: args.actors,
        estimators: args.estimators,
        staleness: args.staleness,
        seeds: args.seeds,
        threads,
        device: args.device,
    };
    let report = prime_bench::train::run_train(&settings)?;
    print!("{}", report.table());
    write_json(&args.json, serde_json::to_value(&report)?)
}

/// Options of `prime bench load` (defaults: prime_bench::load::LoadSettings).
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Simulated actor counts, comma-separated; one learner run each.
    #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
    pub actors: Vec<usize>,
    /// Seconds the actors stream groups, per actor count.
    #[arg(long, default_value_t = 30.0)]
    pub seconds: f64,
    /// Groups per training batch (B).
    #[arg(long, default_value_t = 8)]
    pub batch_prompts: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn run_load(args: LoadArgs) -> Result<()> {
    let settings = prime_bench::load::LoadSettings {
        prime: std::env::current_exe().context("locating the prime binary")?,
        actors: args.actors,
        seconds: args.seconds,
        batch_prompts: args.batch_prompts,
        ..Default::default()
    };
    let report = prime_bench::load::run_load(&settings)?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct AllreduceArgs {
    /// Ranks in the ring (threads of this process, one socket pair each).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Buffer sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub sizes_mb: Vec<f64>,
    /// f32 or bf16 elements.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed repeats per size after one warm-up; the median counts.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Also write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn run_allreduce(args: AllreduceArgs) -> Result<()> {
    let kind = match args.dtype.as_str() {
        "f32" => tch::Kind::Float,
        "bf16" => tch::Kind::BFloat16,
        other => anyhow::bail!("--dtype {other}: the ring reduces f32 or bf16"),
    };
    let settings = AllReduceSettings {
        world: args.world,
        sizes: args
            .sizes_mb
            .iter()
            .map(|mb| (mb * (1 << 20) as f64) as usize)
            .collect(),
        kind,
        repeats: args.repeats,
    };
    let rows = prime_bench::allreduce::run_allreduce(&settings)?;
    print!("{}", prime_bench::allreduce::table(&settings, &rows));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Options shared by the benchmarks.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Hugging Face model directory. Without it a random tiny Qwen2 is made for the run.
    #[arg(long, conflicts_with = "tiny")]
    pub model: Option<PathBuf>,
    /// Benchmark a random Qwen2 made for this run (hidden 256, 4 layers, 8 heads / 2 kv
    /// heads, intermediate 1024, vocab 4096): the default when --model is absent.
    #[arg(long)]
    pub tiny: bool,
    /// Batch sizes, comma-separated; each is timed on both sides.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batch: Vec<usize>,
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Timed runs per implementation and batch size, after one warm-up run; the median counts.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Seed of the random token ids and of sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Python with torch and transformers (default: $PRIME_VENV/bin/python, else
    /// ~/.cache/prime-rs/venv/bin/python).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Also write the full report (machine, model, every timing) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Random prompt ids per row.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// New tokens per row (sampled at temperature 1 with no stop tokens, so exactly this many).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
}

#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
}

pub fn run(command: BenchCommand) -> Result<()> {
    let (common, task) = match command {
        BenchCommand::Generate(args) => (
            args.common,
            Task::Generate {
                prompt_len: args.prompt_len,
                new_tokens: args.new_tokens,
            },
        ),
        BenchCommand::Logprobs(args) => (
            args.common,
            Task::Logprobs {
                seq_len: args.seq_len,
            },
        ),
        BenchCommand::LearnerStep(args) => return run_learner_step(args),
        BenchCommand::WeightSync(args) => return run_weight_sync(args),
        BenchCommand::WeightBroadcast(args) => return run_weight_broadcast(args),
        BenchCommand::Verifier(args) => return super::verifier::run_bench(args),
        BenchCommand::Load(args) => return run_load(args),
        BenchCommand::Allreduce(args) => return run_allreduce(args),
        BenchCommand::Train(args) => return run_train(args),
        BenchCommand::Data(args) => return run_data(args),
    };
    let python = Python {
        executable: common.python.clone().unwrap_or_else(default_python),
        threads: tch::get_num_threads(),
    };
    let settings = BenchSettings {
        task,
        batches: common.batch.clone(),
        device: common.device.clone(),
        dtype: common.dtype.clone(),
        repeats: common.repeats,
        seed: common.seed,
    };
    // Keeps a temporary model alive until the run ends.
    let (_temp, model_dir, source) = match &common.model {
        Some(dir) => (None, dir.clone(), dir.display().to_string()),
        None => {
            let spec = TinyModel {
                max_positions: TinyModel::default().max_positions.max(task.max_len()),
                ..TinyModel::default()
            };
            tracing::info!(?spec, "making a random model");
            let temp = python
                .make_temp_tiny_model(&spec)
                .context("making the random benchmark model")?;
            let dir = temp.path().to_path_buf();
            (Some(temp), dir, "random tiny Qwen2".to_string())
        }
    };
    let report = prime_bench::run(&settings, &model_dir, &source, &python)?;
    print!("{}", report.table());
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct LearnerStepArgs {
    /// Groups in the batch.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// Responses per group.
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Random prompt ids per group.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Ids per response (two in three end early with EOS).
    #[arg(long, default_value_t = 64)]
    pub response_len: usize,
    /// Optimizer steps per update.
    #[arg(long, default_value_t = 2)]
    pub mini_batches: usize,
    /// Timed steps per side, after one warm-up step; the median counts.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Seed of the models and the batch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Python with torch and transformers (default as for `prime bench generate`).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Instead of the PyTorch comparison: the step with ZeRO-3 against ZeRO-2 and one
    /// process, `--ranks` threads on the TCP ring, side by side.
    #[arg(long)]
    pub zero3: bool,
    /// Ranks of the ZeRO-2 and ZeRO-3 runs (with --zero3).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(2..=64))]
    pub ranks: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Shape of the random model whose weights `weight-sync` and `weight-broadcast` send
/// (default: 256 MB of f32).
#[derive(Debug, Args)]
pub struct WeightShapeArgs {
    /// Vocabulary of the random model whose weights are sent.
    #[arg(long, default_value_t = 32768)]
    pub vocab: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// MLP size.
    #[arg(long, default_value_t = 2048)]
    pub intermediate: usize,
}

impl WeightShapeArgs {
    /// The model these flags describe (the other dimensions as the benchmarks' default).
    fn model(&self) -> TinyModel {
        TinyModel {
            vocab: self.vocab,
            hidden: self.hidden,
            layers: self.layers,
            intermediate: self.intermediate,
            ..TinyModel::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct WeightSyncArgs {
    #[command(flatten)]
    pub shape: WeightShapeArgs,
    /// Timed transfers per side, after one warm-up; the median counts.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Options of `prime bench weight-broadcast`.
#[derive(Debug, Args)]
pub struct WeightBroadcastArgs {
    #[command(flatten)]
    pub shape: WeightShapeArgs,
    /// Actor counts, comma-separated; one learner, group and set of followers each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub members: Vec<usize>,
    /// Timed rounds per path after the first (which forms the group); the median counts.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn write_json(path: &Option<PathBuf>, report: serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn run_learner_step(args: LearnerStepArgs) -> Result<()> {
    let python = Python {
        executable: args.python.clone().unwrap_or_else(default_python),
        threads: tch::get_num_threads(),
    };
    let settings = prime_bench::learner_step::StepSettings {
        groups: args.groups,
        k: args.k,
        prompt_len: args.prompt_len,
        response_len: args.response_len,
        mini_batches: args.mini_batches,
        repeats: args.repeats,
        seed: args.seed,
    };
    if args.zero3 {
        let report = prime_bench::sharding::run_sharding_bench(
            &settings,
            &TinyModel::default(),
            args.ranks as usize,
        )?;
        print!("{}", report.table());
        return write_json(&args.json, serde_json::to_value(&report)?);
    }
    let report =
        prime_bench::learner_step::run_step_bench(&settings, &TinyModel::default(), &python)?;
    print!("{}", report.table());
    write_json(&args.json, serde_json::to_value(&report)?)
}

fn run_weight_sync(args: WeightSyncArgs) -> Result<()> {
    let report = prime_bench::weight_sync::run_sync_bench(&args.shape.model(), args.repeats)?;
    print!("{}", report.table());
    write_json(&args.json, serde_json::to_value(&report)?)
}

fn run_weight_broadcast(args: WeightBroadcastArgs) -> Result<()> {
    let settings = prime_bench::weight_broadcast::BroadcastSettings {
        model: args.shape.model(),
        members: args.members,
        repeats: args.repeats,
    };
    let report = prime_bench::weight_broadcast::run_broadcast_bench(&settings)?;
    print!("{}", report.table());
    write_json(&args.json, serde_json::to_value(&report)?)
}
