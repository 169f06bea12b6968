//! `prime learner serve --config FILE`: the Learner service (work, groups, filter, PRIME steps,
//! published weights); `prime learner step`: one PRIME iteration on recorded groups, for
//! replaying a batch to debug a step (and for the tests).
//!
//! Both run as one process per data-parallel rank: `WORLD_SIZE`, `RANK` (or a StatefulSet
//! ordinal in `HOSTNAME`), `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` and `PRIME_GROUP_EPOCH`
//! say which. Rank 0 serves actors, publishes weights and writes checkpoints and outputs; the
//! other ranks only train.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use prime_algo::{Estimator, ReferenceType};
use prime_check::jsonl;
use prime_check::path::StagedDir;
use prime_check::rules;
use prime_learner::parallel::Role;
use prime_learner::ranks::{join_ranks, run_rank, RankOptions};
use prime_learner::report::summary_table;
use prime_learner::service::ListenOptions;
use prime_learner::{prime_step, LearnerConfig, PrimeModels, RunConfig, ScoredGroup};
use prime_model::checkpoint::copy_tokenizer_files;
use prime_model::{check_sequence, parse_device, CausalLm, DEFAULT_MAX_SHARD_BYTES};
use tch::Kind;

/// Options of the Learner service.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Run config (TOML): [world], [model] and [learner] are used.
    #[arg(long)]
    pub config: PathBuf,
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
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// gRPC URL of the Verifier service that grades held-out code rows (with the same token);
    /// without it they are graded in this process's sandbox. Math is graded in process.
    #[arg(long, env = "PRIME_VERIFIER")]
    pub verifier: Option<String>,
    /// TLS towards an https:// --verifier URL.
    #[command(flatten)]
    pub verifier_tls: super::tls::ClientSecurityArgs,
    /// Start even when the memory plan (`prime plan`) says this rank does not fit its GPU;
    /// without it a rank on CUDA refuses such a config with the numbers and the keys to change.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum LearnerCommand {
    /// Serve actors and train: the Learner gRPC service, one process per data-parallel rank.
    Serve(Box<ServeArgs>),
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
    /// JSONL, one group per line: {"prompt_ids":[...],"responses":[{"ids":[...],"score":0.0}]};
    /// a response may carry "sampling_logprobs":[...] (one per id), which --off-policy uses.
    #[arg(long)]
    pub rollouts: PathBuf,
    /// Output directory (created if needed): policy/, prm/ and metrics.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps of the PRM pass and of the PPO pass; the groups are split whole, in file
    /// order.
    #[arg(
        long,
        default_value_t = 4,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub mini_batches: usize,
    /// β of the implicit reward (above 0).
    #[arg(
        long,
        default_value_t = 0.05,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::BETA),
    )]
    pub beta: f64,
    /// Policy learning rate (0 or more).
    #[arg(
        long,
        default_value_t = 5e-7,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::LEARNING_RATE),
    )]
    pub policy_lr: f64,
    /// PRM learning rate (0 or more).
    #[arg(
        long,
        default_value_t = 1e-6,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::LEARNING_RATE),
    )]
    pub prm_lr: f64,
    /// Advantage estimator.
    #[arg(long, value_enum, default_value_t = EstimatorArg::Prime)]
    pub estimator: EstimatorArg,
    /// The groups were sampled by an older policy than `--policy`: correct for it with
    /// decoupled PPO, each response's `sampling_logprobs` being the behaviour policy's (what
    /// the learner does with `learner.rollout.max_staleness >= 1`).
    #[arg(long)]
    pub off_policy: bool,
    /// Truncation of the behaviour weights `π_old/π_behav` (with --off-policy; above 0).
    #[arg(
        long,
        default_value_t = 5.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::BEHAVIOR_WEIGHT_CAP),
    )]
    pub behavior_weight_cap: f64,
    /// With several ranks: shard the optimizer state over them (ZeRO stage 1).
    #[arg(long)]
    pub zero1: bool,
    /// With several ranks: shard the gradients too (ZeRO stage 2; implies --zero1). Turns on
    /// activation recomputation, whose layer-by-layer backward hands the gradients over.
    #[arg(long)]
    pub zero2: bool,
    /// With several ranks: shard the parameters too (ZeRO stage 3; implies --zero2): each
    /// rank keeps 1/W of the policy, PRM and reference weights and gathers one layer at a
    /// time. Rank 0 still writes whole models.
    #[arg(long)]
    pub zero3: bool,
    /// With several ranks: seconds one collective may take before the rank fails.
    #[arg(
        long,
        default_value_t = 600,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::int(1u64, 1_000_000_000),
    )]
    pub collective_timeout_seconds: u64,
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(command: LearnerCommand) -> Result<()> {
    match command {
        LearnerCommand::Serve(args) => serve(*args),
        LearnerCommand::Step(step) => run_step(step),
    }
}

/// Runs this process's rank of the learner (see `prime_learner::ranks`); rank 0 prints the
/// closing table.
fn serve(args: ServeArgs) -> Result<()> {
    let config = RunConfig::from_file_with_overrides(&args.config, &args.overrides)?;
    parse_device(&args.device)?;
    let auth = args.security.auth()?;
    let options = RankOptions {
        run_dir: args.run_dir,
        listen: ListenOptions {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            auth,
        },
        resume: args.resume,
        addr_file: args.addr_file,
        device: args.device,
        verifier: args.verifier,
        verifier_tls: args.verifier_tls.tls(),
        force: args.force,
    };
    if let Some(summary) = run_rank(&config, &options)? {
        eprint!("{}", summary_table(&summary));
    }
    Ok(())
}

/// One group of a rollouts file and its line.
struct Group {
    line: usize,
    group: ScoredGroup,
}

/// Reads a rollouts file: one [`ScoredGroup`] per non-empty line.
fn read_groups(path: &Path) -> Result<Vec<Group>> {
    let groups = jsonl::read_nonempty(path)?
        .iter()
        .map(|line| {
            Ok(Group {
                line: line.number,
                group: jsonl::decode(path, line)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(groups)
}

/// Refuses a group the step cannot train on, naming its line: K below 2 or unlike the first
/// group's, an empty prompt or response, a score outside [0, 1], an id outside the
/// vocabulary, a prompt plus response longer than the model's positions, sampling log-probs
/// that are not one finite value per id (and, `off_policy`, missing ones: they weigh every
/// token of the policy loss).
fn check_group(
    path: &Path,
    group: &Group,
    k: usize,
    model: &prime_model::Qwen2Config,
    off_policy: bool,
) -> Result<()> {
    let at = || format!("{} line {}", path.display(), group.line);
    let g = &group.group;
    if g.responses.len() < 2 || g.responses.len() != k {
        bail!(
            "{}: {} responses; every group needs the same K >= 2 (the first has {k})",
            at(),
            g.responses.len()
        );
    }
    if g.prompt_ids.is_empty() {
        bail!("{}: prompt_ids is empty", at());
    }
    for (i, response) in g.responses.iter().enumerate() {
        if response.ids.is_empty() {
            bail!("{}: response {i} has no ids", at());
        }
        rules::PROBABILITY
            .check(&format!("response {i} score"), response.score)
            .with_context(at)?;
        let logprobs = &response.sampling_logprobs;
        if off_policy && logprobs.is_empty() {
            bail!(
                "{}: response {i} has no sampling_logprobs, which --off-policy needs",
                at()
            );
        }
        if !logprobs.is_empty()
            && (logprobs.len() != response.ids.len() || !logprobs.iter().all(|l| l.is_finite()))
        {
            bail!(
                "{}: response {i}: sampling_logprobs must hold one finite value per id ({} ids, \
                 {} values)",
                at(),
                response.ids.len(),
                logprobs.len()
            );
        }
        let sequence: Vec<i64> = g.prompt_ids.iter().chain(&response.ids).copied().collect();
        check_sequence(&sequence, model).with_context(|| format!("{}: response {i}", at()))?;
    }
    Ok(())
}

fn run_step(args: StepArgs) -> Result<()> {
    parse_device(&args.device)?;
    let groups = read_groups(&args.rollouts)?;
    if args.mini_batches > groups.len() {
        bail!(
            "--mini-batches {} is more than the {} groups of {}: mini-batches hold whole groups",
            args.mini_batches,
            groups.len(),
            args.rollouts.display()
        );
    }
    let mut config = LearnerConfig::default();
    config.algo.mini_batches = args.mini_batches;
    config.algo.reference = ReferenceType::Freeze;
    config.algo.prm.beta = args.beta;
    config.policy_optimizer.lr = args.policy_lr;
    config.prm_optimizer.lr = args.prm_lr;
    config.algo.estimator = match args.estimator {
        EstimatorArg::Prime => Estimator::Prime,
        EstimatorArg::Rloo => Estimator::Rloo,
    };
    if args.off_policy {
        config.rollout.max_staleness = 1;
        config.algo.ppo.behavior_weight_cap = args.behavior_weight_cap;
    }
    config.parallel.zero1 = args.zero1;
    config.parallel.zero2 = args.zero2;
    config.parallel.zero3 = args.zero3;
    config.memory.recompute_activations |= args.zero2 || args.zero3;
    config.parallel.collective_timeout_seconds = args.collective_timeout_seconds;
    config.rollout.batch_prompts = groups.len();
    config.validate().map_err(anyhow::Error::msg)?;
    let mut rank = join_ranks(&args.device, &config.parallel)?;
    let (info, device) = (rank.info.clone(), rank.device);
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
    let positions = [&policy, &prm, &reference]
        .iter()
        .map(|lm| lm.config.max_position_embeddings)
        .min()
        .unwrap_or_default();
    let shortest = prime_model::Qwen2Config {
        max_position_embeddings: positions,
        ..policy.config.clone()
    };
    let k = groups[0].group.responses.len();
    for group in &groups {
        check_group(&args.rollouts, group, k, &shortest, args.off_policy)?;
    }
    let groups: Vec<ScoredGroup> = groups.into_iter().map(|g| g.group).collect();
    let mut models = PrimeModels::new(policy, prm, Some(reference), &config);
    let mut dp = rank.data_parallel(&mut models, &config.parallel)?;
    let longest = groups
        .iter()
        .flat_map(|g| g.responses.iter().map(|r| g.prompt_ids.len() + r.ids.len()))
        .max()
        .unwrap_or_default() as i64;
    let shape = [groups.len() as i64, k as i64, longest];
    let metrics = prime_model::torch_op("the PRIME step", &[&shape], || {
        Ok(prime_step(&mut models, &mut dp, &groups, &config, 0))
    })?
    .with_context(|| format!("learner rank {}", info.rank))?;
    // ZeRO-3: the weights are gathered whole onto rank 0's host, a bucket at a time.
    for role in [Role::Policy, Role::Prm] {
        dp.unshard(role, (info.rank == 0).then_some(tch::Device::Cpu))
            .with_context(|| format!("learner rank {}: gathering the weights", info.rank))?;
    }
    if info.rank > 0 {
        return Ok(());
    }

    // Written aside and moved into --out once complete: a failure leaves --out as it was.
    let out = StagedDir::create(&args.out)?;
    for (lm, name, source) in [
        (&models.policy, "policy", &args.policy),
        (&models.prm, "prm", &args.prm),
    ] {
        let dir = out.path().join(name);
        lm.save(&dir, None, DEFAULT_MAX_SHARD_BYTES)
            .with_context(|| format!("writing the {name} into {}", args.out.display()))?;
        copy_tokenizer_files(source, &dir)?;
    }
    std::fs::write(
        out.path().join("metrics.json"),
        serde_json::to_string_pretty(&metrics)? + "\n",
    )
    .with_context(|| format!("writing {}", args.out.join("metrics.json").display()))?;
    out.commit()?;
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
