//! `prime plan --config FILE --nodes N --gpus-per-node G --gpu-memory-gib M [--actor-gpus A]`:
//! what a learner rank, an actor and a PRM server hold on one GPU for a run config, whether
//! each fits, and which keys to change (`prime_learner::plan`; docs/memory.md). The learner and
//! the actor compute the same plan at start on CUDA.
use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use clap::Args;
use prime_learner::plan::{plan_run, Cluster, Shapes, ACTOR_MAX_PROMPTS, PRM_SERVER_BATCH_TOKENS};
use prime_learner::RunConfig;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Run config (TOML): [model] and [learner] are planned.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set learner.memory.micro_batch_tokens=4096`
    /// (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Machines.
    #[arg(long, default_value_t = 1)]
    pub nodes: u64,
    /// GPUs per machine.
    #[arg(long)]
    pub gpus_per_node: u64,
    /// Memory of one GPU in GiB, as the device reports it (an "80 GB" H100 or A100: about 79).
    #[arg(long)]
    pub gpu_memory_gib: f64,
    /// GPUs given to actors (one each); every other GPU is a learner rank.
    #[arg(long, default_value_t = 0)]
    pub actor_gpus: u64,
    /// Prompts per actor batch (`prime actor run --max-prompts`, the chart's actors.maxPrompts).
    #[arg(long, default_value_t = ACTOR_MAX_PROMPTS)]
    pub actor_max_prompts: u64,
    /// Tokens per PRM server forward (`prime prm-server serve --max-batch-tokens`).
    #[arg(long, default_value_t = PRM_SERVER_BATCH_TOKENS)]
    pub prm_server_max_batch_tokens: u64,
    /// The policy's config.json (or its directory) when model.path is not on this machine;
    /// also the PRM's and the reference's unless learner.prm_path is set.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
}

/// Prints the plan; fails (exit status 1) when a role does not fit.
pub fn run(args: PlanArgs) -> Result<()> {
    ensure!(
        args.nodes > 0 && args.gpus_per_node > 0,
        "--nodes and --gpus-per-node must be at least 1"
    );
    ensure!(
        args.gpu_memory_gib.is_finite() && args.gpu_memory_gib > 0.0,
        "--gpu-memory-gib must be positive"
    );
    ensure!(
        args.actor_max_prompts > 0 && args.prm_server_max_batch_tokens > 0,
        "--actor-max-prompts and --prm-server-max-batch-tokens must be positive"
    );
    let config = RunConfig::from_file_with_overrides(&args.config, &args.overrides)?;
    config.learner.validate().map_err(anyhow::Error::msg)?;
    let shapes = Shapes::for_plan(&config, args.model_config.as_deref())?;
    let cluster = Cluster {
        nodes: args.nodes,
        gpus_per_node: args.gpus_per_node,
        gpu_memory_gib: args.gpu_memory_gib,
        actor_gpus: args.actor_gpus,
        actor_max_prompts: args.actor_max_prompts,
        prm_server_batch_tokens: args.prm_server_max_batch_tokens,
    };
    let plan = plan_run(&config.learner, &shapes, &cluster)?;
    print!("{}", plan.render());
    if !plan.fits() {
        bail!("the run does not fit: the `change:` lines above say what would");
    }
    Ok(())
}
