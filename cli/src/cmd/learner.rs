//! `prime learner step`: one PRIME iteration on recorded groups, for replaying a batch to debug
//! a step (and for the tests).
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use prime_learner::algo::Estimator;
use prime_learner::step::ReferenceType;
use prime_learner::{prime_step, PrimeModels, ScoredGroup, StepConfig};
use prime_model::checkpoint::copy_tokenizer_files;
use prime_model::{parse_device, CausalLm, DEFAULT_MAX_SHARD_BYTES};
use tch::Kind;

#[derive(Debug, Subcommand)]
pub enum LearnerCommand {
    /// Run exactly one PRIME iteration (old log-probs, PRM update with single-forward rewards,
    /// advantages, policy update) on recorded groups and write the updated models.
    Step(StepArgs),
}

/// Advantage estimators selectable on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EstimatorArg {
    /// Process plus outcome rewards (the paper).
    Prime,
    /// Outcome reward only (the paper's baseline).
    Rloo,
}

#[derive(Debug, Args)]
pub struct StepArgs {
    /// The policy before the step (Hugging Face model directory).
    #[arg(long)]
    pub policy: PathBuf,
    /// The implicit PRM before the step.
    #[arg(long)]
    pub prm: PathBuf,
    /// The frozen reference of the PRM.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// JSONL, one group per line: {"prompt_ids":[...],"responses":[{"ids":[...],"score":0.0}]}.
    #[arg(long)]
    pub rollouts: PathBuf,
    /// Output directory (created if needed): policy/, prm/ and metrics.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps of the PRM pass and of the PPO pass; the groups are split whole, in file
    /// order.
    #[arg(long, default_value_t = 4)]
    pub mini_batches: usize,
    /// β of the implicit reward.
    #[arg(long, default_value_t = 0.05)]
    pub beta: f64,
    /// Policy learning rate.
    #[arg(long, default_value_t = 5e-7)]
    pub policy_lr: f64,
    /// PRM learning rate.
    #[arg(long, default_value_t = 1e-6)]
    pub prm_lr: f64,
    /// Advantage estimator.
    #[arg(long, value_enum, default_value_t = EstimatorArg::Prime)]
    pub estimator: EstimatorArg,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(command: LearnerCommand) -> Result<()> {
    match command {
        LearnerCommand::Step(args) => run_step(args),
    }
}

/// Reads a rollouts file: one [`ScoredGroup`] per non-empty line.
fn read_groups(path: &Path) -> Result<Vec<ScoredGroup>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut groups = Vec::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let group: ScoredGroup = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", path.display(), number + 1))?;
        groups.push(group);
    }
    if groups.is_empty() {
        bail!("{} holds no groups", path.display());
    }
    Ok(groups)
}

fn run_step(args: StepArgs) -> Result<()> {
    if args.mini_batches == 0 {
        bail!("--mini-batches must be at least 1");
    }
    let groups = read_groups(&args.rollouts)?;
    let mut config = StepConfig {
        mini_batches: args.mini_batches,
        reference: ReferenceType::Freeze,
        ..StepConfig::default()
    };
    config.algo.prm.beta = args.beta;
    config.policy_optimizer.lr = args.policy_lr;
    config.prm_optimizer.lr = args.prm_lr;
    config.algo.advantage.estimator = match args.estimator {
        EstimatorArg::Prime => Estimator::Prime,
        EstimatorArg::Rloo => Estimator::Rloo,
    };
    let device = parse_device(&args.device)?;
    let load = |dir: &Path, what: &str| {
        CausalLm::load(dir, device, Kind::Float, Kind::Float)
            .with_context(|| format!("loading the {what} from {}", dir.display()))
    };
    let policy = load(&args.policy, "policy")?;
    let prm = load(&args.prm, "PRM")?;
    let reference = load(&args.reference, "reference")?;
    if prm.config.vocab_size != policy.config.vocab_size
        || reference.config.vocab_size != policy.config.vocab_size
    {
        bail!("policy, PRM and reference must share one vocabulary");
    }
    let mut models = PrimeModels::new(policy, prm, Some(reference), &config);
    let metrics = prime_step(&mut models, &groups, &config, 0)?;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (lm, name, source) in [
        (&models.policy, "policy", &args.policy),
        (&models.prm, "prm", &args.prm),
    ] {
        let dir = args.out.join(name);
        lm.save(&dir, None, DEFAULT_MAX_SHARD_BYTES)?;
        copy_tokenizer_files(source, &dir)?;
    }
    let metrics_path = args.out.join("metrics.json");
    std::fs::write(
        &metrics_path,
        serde_json::to_string_pretty(&metrics)? + "\n",
    )
    .with_context(|| format!("writing {}", metrics_path.display()))?;
    println!(
        "step on {} groups x {} responses: prm loss {:.4}, prm accuracy {:.3}, policy loss {:.4}, clip fraction {:.3}\nwrote {}",
        metrics.groups,
        metrics.responses / metrics.groups.max(1),
        metrics.prm_loss,
        metrics.prm_accuracy,
        metrics.policy_loss,
        metrics.clip_fraction,
        args.out.display()
    );
    Ok(())
}
