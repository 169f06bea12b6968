//! `prime prm probe --run-dir DIR`: the step-level probe of a run's implicit PRM on its world's
//! held-out problems. Argument parsing and wiring; the probe is `prime_prm_server::probe`.
use std::path::PathBuf;

use anyhow::{bail, Context};
use prime_learner::checkpoint::{self, sft_checkpoint, PRM_DIR};
use prime_learner::RunConfig;
use prime_model::{CausalLm, Tokenizer};
use prime_prm_server::{probe, ProbeTrace, Scorer, StepSplit};
use tch::{Device, Kind};

/// `prime prm ...`: tools on a run's implicit PRM.
#[derive(Debug, clap::Subcommand)]
pub enum PrmCommand {
    /// Step-level probe: on held-out problems of the run's world, each traced right and with
    /// the flawed teacher's error (a product one copy short) at one step, the ROC AUC of the
    /// PRM's step reward (β·Σ log π_prm/π_ref over the step's tokens) separating the wrong
    /// steps from the right ones; writes JSON (docs/evaluation.md).
    Probe(ProbeArgs),
}

/// `prime prm probe`.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// The run directory: its config.toml (world, β, start model) and checkpoints/.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// The checkpoint to probe (a `checkpoints/step-NNNNNN` directory); the latest by default.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Held-out problems to probe (the first ones with a multiplication where the error is
    /// possible).
    #[arg(
        long,
        default_value_t = 200,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub cases: usize,
    /// Where to write the report; default `RUN/prm_probe/<checkpoint name>.json`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(command: PrmCommand) -> anyhow::Result<()> {
    match command {
        PrmCommand::Probe(args) => run_probe(args),
    }
}

fn run_probe(args: ProbeArgs) -> anyhow::Result<()> {
    let config = RunConfig::from_file(&args.run_dir.join("config.toml"))?;
    let checkpoint = match args.checkpoint {
        Some(dir) => dir,
        None => match checkpoint::latest(&args.run_dir.join("checkpoints"))? {
            Some(dir) => dir,
            None => bail!(
                "{} has no checkpoint to probe (the PRM starts equal to its reference, so every \
                 step reward would be 0)",
                args.run_dir.display()
            ),
        },
    };
    // The frozen reference is the PRM's start: learner.prm_path, else the policy's start.
    let start = config
        .model
        .path
        .clone()
        .unwrap_or_else(|| sft_checkpoint(&args.run_dir));
    let reference_dir = config.learner.prm_path.clone().unwrap_or(start);
    let prm_dir = checkpoint.join(PRM_DIR);
    let load = |dir: &PathBuf| {
        CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float)
            .with_context(|| format!("loading {}", dir.display()))
    };
    let scorer = Scorer::new(
        load(&prm_dir)?,
        load(&reference_dir)?,
        config.learner.algo.prm.beta,
        16384,
    )?;
    let tokenizer = Tokenizer::from_dir(&prm_dir)?;
    let Some(&eos_id) = scorer.eos_ids().first() else {
        bail!("{} names no end-of-sequence token", prm_dir.display());
    };
    let cases = prime_world::probe_cases(&config.world, args.cases)?;
    let traces = cases
        .iter()
        .map(|case| ProbeTrace::from_case(case, &tokenizer, eos_id))
        .collect::<Result<Vec<_>, _>>()?;
    let report = probe(&scorer, &tokenizer, &"lines".parse::<StepSplit>()?, &traces)?;

    let name = checkpoint
        .file_name()
        .map_or("checkpoint".into(), |n| n.to_string_lossy().into_owned());
    let out = args
        .out
        .unwrap_or_else(|| args.run_dir.join("prm_probe").join(format!("{name}.json")));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{name}: step AUC {:.3} (same step), {:.3} (all steps), {} cases; mean step reward wrong \
         {:.4}, right {:.4}; wrote {}",
        report.auc,
        report.auc_all_steps,
        report.cases,
        report.wrong_step_reward_mean,
        report.right_step_reward_mean,
        out.display()
    );
    Ok(())
}
