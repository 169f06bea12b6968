//! `prime learner --config FILE`: the Learner service (work, groups, filter, PRIME steps,
//! published weights); `prime learner step`: one PRIME iteration on recorded groups, for
//! replaying a batch to debug a step (and for the tests).
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use prime_learner::algo::Estimator;
use prime_learner::config::ReferenceType;
use prime_learner::report::{plot_run, summarize, summary_table, Summary};
use prime_learner::run::open_run;
use prime_learner::service::{run_learner, ListenOptions};
use prime_learner::trainer::Trainer;
use prime_learner::{prime_step, LearnerConfig, PrimeModels, RunConfig, ScoredGroup};
use prime_model::checkpoint::copy_tokenizer_files;
use prime_model::{parse_device, CausalLm, DEFAULT_MAX_SHARD_BYTES};
use tch::Kind;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LearnerArgs {
    #[command(subcommand)]
    pub command: Option<LearnerCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Options of the Learner service.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Run config (TOML): [world], [model] and [learner] are used.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value, e.g. `--set learner.estimator=rloo` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run directory: metrics.jsonl, checkpoints/, plots, summary.json.
    #[arg(long, default_value = "runs/demo")]
    pub run_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Shared token every RPC must carry (`authorization: Bearer TOKEN`).
    #[arg(long, env = "PRIME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS and the no-token policy.
    #[command(flatten)]
    pub security: super::tls::ServerSecurityArgs,
    /// Continue from the latest checkpoint in the run directory, if there is one.
    #[arg(long)]
    pub resume: bool,
    /// Write the bound gRPC address to this file once listening (for launchers).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

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

pub fn run(args: LearnerArgs) -> Result<()> {
    match args.command {
        Some(LearnerCommand::Step(step)) => run_step(step),
        None => serve(args.serve),
    }
}

/// Runs the Learner service until the configured steps are done, then writes the report.
fn serve(args: ServeArgs) -> Result<()> {
    let Some(config_path) = &args.config else {
        bail!("`prime learner` needs --config FILE (or the `step` subcommand)");
    };
    let config = RunConfig::from_file_with_overrides(config_path, &args.overrides)?;
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating {}", args.run_dir.display()))?;
    std::fs::write(args.run_dir.join("config.toml"), config.to_toml())?;
    let device = parse_device(&args.device)?;
    let (trainer, scheduler) = open_run(&config, &args.run_dir, device, args.resume)?;
    let options = ListenOptions {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        token: args.token.clone(),
        allow_no_token: args.security.allow_no_token,
        tls: args.security.tls(),
    };
    let addr_file = args.addr_file.clone();
    let trainer = run_learner(
        trainer,
        scheduler,
        &options,
        |addr| {
            if let Some(path) = &addr_file {
                let tmp = path.with_extension("tmp");
                let written = std::fs::write(&tmp, addr.to_string())
                    .and_then(|()| std::fs::rename(&tmp, path));
                if let Err(e) = written {
                    tracing::error!(path = %path.display(), "cannot write the address file: {e}");
                }
            }
        },
        |record, _| {
            tracing::info!(
                step = record.step,
                reward = record.train_reward,
                pass_rate = record.filter_pass_rate,
                prm_accuracy = record.metrics.prm_accuracy,
                "step"
            );
        },
    )?;
    finish_run(&trainer, &config, &args.run_dir)?;
    Ok(())
}

/// Writes plots and `summary.json` and prints the closing table.
pub fn finish_run(trainer: &Trainer, config: &RunConfig, run_dir: &Path) -> Result<Summary> {
    plot_run(run_dir, &trainer.history);
    let estimator = match config.learner.estimator {
        Estimator::Prime => "prime",
        Estimator::Rloo => "rloo",
    };
    let summary = summarize(
        &trainer.history,
        estimator,
        config.learner.eval_samples,
        config.learner.eval_temperature,
    )?;
    let path = run_dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprint!("{}", summary_table(&summary));
    Ok(summary)
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
    let mut config = LearnerConfig {
        mini_batches: args.mini_batches,
        reference: ReferenceType::Freeze,
        ..LearnerConfig::default()
    };
    config.prm.beta = args.beta;
    config.policy_optimizer.lr = args.policy_lr;
    config.prm_optimizer.lr = args.prm_lr;
    config.estimator = match args.estimator {
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
