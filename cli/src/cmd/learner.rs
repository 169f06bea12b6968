//! `prime learner --config FILE`: the Learner service (work, groups, filter, PRIME steps,
//! published weights); `prime learner step`: one PRIME iteration on recorded groups, for
//! replaying a batch to debug a step (and for the tests).
//!
//! Both run as one process per data-parallel rank: `WORLD_SIZE`, `RANK` (or a StatefulSet
//! ordinal in `HOSTNAME`), `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` and `PRIME_GROUP_EPOCH`
//! say which. Rank 0 serves actors, publishes weights and writes checkpoints and outputs; the
//! other ranks only train.
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use prime_collective::{Collective, RankInfo};
use prime_learner::algo::Estimator;
use prime_learner::config::ReferenceType;
use prime_learner::parallel::{follow, join_group, DataParallel, ParallelConfig};
use prime_learner::report::{plot_run, summarize, summary_table, Summary};
use prime_learner::run::{open_follower, open_run};
use prime_learner::service::{run_learner, ListenOptions};
use prime_learner::trainer::Trainer;
use prime_learner::{prime_step, LearnerConfig, PrimeModels, RunConfig, ScoredGroup};
use prime_model::checkpoint::copy_tokenizer_files;
use prime_model::{parse_device, CausalLm, DEFAULT_MAX_SHARD_BYTES};
use tch::{Device, Kind};

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
    /// Override a config value, e.g. `--set learner.algo.estimator=rloo` (repeatable).
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
    /// Token, TLS and the no-token policy.
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
    /// With several ranks: shard the optimizer state over them (ZeRO stage 1).
    #[arg(long)]
    pub zero1: bool,
    /// With several ranks: shard the gradients too (ZeRO stage 2; implies --zero1). Turns on
    /// activation recomputation, whose layer-by-layer backward hands the gradients over.
    #[arg(long)]
    pub zero2: bool,
    /// With several ranks: seconds one collective may take before the rank fails.
    #[arg(long, default_value_t = 600)]
    pub collective_timeout_seconds: u64,
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

/// This process in the learner group.
struct Rank {
    info: RankInfo,
    /// `cuda` means `cuda:LOCAL_RANK`.
    device: Device,
    /// The joined group, with more than one rank.
    group: Option<Box<dyn Collective>>,
}

/// Finds this process's rank and joins its group.
fn join_ranks(device: &str, parallel: &ParallelConfig) -> Result<Rank> {
    let info = RankInfo::from_env()?;
    let device = match parse_device(device)? {
        Device::Cuda(0) if device == "cuda" => Device::Cuda(info.local_rank),
        d => d,
    };
    if info.world_size == 1 {
        return Ok(Rank {
            info,
            device,
            group: None,
        });
    }
    let epoch = match std::env::var("PRIME_GROUP_EPOCH") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("PRIME_GROUP_EPOCH={v:?} is not a number"))?,
        Err(_) => 0,
    };
    tracing::info!(
        rank = info.rank,
        world_size = info.world_size,
        master = %info.master(),
        epoch,
        "joining the learner group"
    );
    let group = join_group(&info, parallel, device, epoch)
        .with_context(|| format!("rank {} joining the learner group", info.rank))?;
    Ok(Rank {
        info,
        device,
        group: Some(group),
    })
}

/// Serves `grpc.health.v1` (with the rank's TLS) on `listen` from a thread of its own,
/// reporting `prime.v1.Learner` as serving while this follower rank lives.
fn serve_follower_health(
    listen: SocketAddr,
    security: &super::tls::ServerSecurityArgs,
) -> Result<std::thread::JoinHandle<()>> {
    let builder = security
        .auth()
        .tls
        .apply(tonic::transport::Server::builder())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("follower health endpoint on {listen}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "follower rank: grpc.health.v1 only");
    Ok(std::thread::spawn(move || {
        runtime.block_on(async move {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("prime.v1.Learner", tonic_health::ServingStatus::Serving)
                .await;
            let incoming = prime_proto::transport::incoming(listener);
            let mut builder = builder;
            if let Err(e) = builder
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(error = %e, "follower health endpoint stopped");
            }
        });
    }))
}

/// Runs the Learner service until the configured steps are done, then writes the report.
/// Ranks other than 0 follow rank 0's steps instead.
fn serve(args: ServeArgs) -> Result<()> {
    let Some(config_path) = &args.config else {
        bail!("`prime learner` needs --config FILE (or the `step` subcommand)");
    };
    let config = RunConfig::from_file_with_overrides(config_path, &args.overrides)?;
    let parallel = config.learner.parallel.clone();
    let Rank {
        info,
        device,
        mut group,
    } = join_ranks(&args.device, &parallel)?;
    if info.rank > 0 {
        let group = group.take().expect("a rank above 0 has a group");
        // Followers serve no Learner API, only grpc.health.v1, so one probe fits every rank.
        let _health = serve_follower_health(args.listen, &args.security)?;
        let mut models = open_follower(&config, &args.run_dir, device)?;
        DataParallel::attach(&mut models, group, parallel)?;
        let steps = follow(&mut models, &config.learner)
            .with_context(|| format!("learner rank {}", info.rank))?;
        tracing::info!(rank = info.rank, steps, "rank 0 stopped the group");
        return Ok(());
    }
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating {}", args.run_dir.display()))?;
    std::fs::write(args.run_dir.join("config.toml"), config.to_toml())?;
    let (mut trainer, scheduler) = open_run(&config, &args.run_dir, device, args.resume)?;
    if let Some(group) = group {
        DataParallel::attach(&mut trainer.models, group, parallel)?;
    }
    let options = ListenOptions {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        auth: args.security.auth(),
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
    config.parallel.zero1 = args.zero1;
    config.parallel.zero2 = args.zero2;
    config.recompute_activations |= args.zero2;
    config.parallel.collective_timeout_seconds = args.collective_timeout_seconds;
    let Rank {
        info,
        device,
        group,
    } = join_ranks(&args.device, &config.parallel)?;
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
    if let Some(group) = group {
        DataParallel::attach(&mut models, group, config.parallel.clone())?;
    }
    let metrics = prime_step(&mut models, &groups, &config, 0)
        .with_context(|| format!("learner rank {}", info.rank))?;
    if info.rank > 0 {
        return Ok(());
    }

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
