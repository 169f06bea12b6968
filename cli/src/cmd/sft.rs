//! `prime sft --config FILE`: builds the embedded world if needed, then trains the policy from
//! scratch (or continues an HF model) on the supervised split until held-out accuracy enters
//! the configured band, and saves an HF checkpoint.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use prime_learner::data::eval_problems;
use prime_learner::sft::{run_sft, sft_examples, SftResult};
use prime_learner::RunConfig;
use prime_model::{default_kind, parse_device, CausalLm, Tokenizer};
use prime_world::build_world;

#[derive(Debug, Args)]
pub struct SftArgs {
    /// Run config (TOML); its [world], [model] and [sft] tables are used.
    #[arg(long)]
    pub config: PathBuf,
    /// Run directory: world/, sft/ (checkpoint, metrics.jsonl, plots, result.json) and the
    /// resolved config.
    #[arg(long, default_value = "runs/demo")]
    pub run_dir: PathBuf,
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Override a config value, e.g. `--set sft.max_seconds=300` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run(args: SftArgs) -> Result<()> {
    let config = RunConfig::from_file_with_overrides(&args.config, &args.overrides)?;
    parse_device(&args.device)?;
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating {}", args.run_dir.display()))?;
    std::fs::write(args.run_dir.join("config.toml"), config.to_toml())?;
    let result = warm_up(&config, &args.run_dir, &args.device)?;
    let out_dir = args.run_dir.join("sft");
    println!(
        "supervised warm-up: {} steps, held-out accuracy {:.1}% ({} problems, temperature {}), stop: {:?}\ncheckpoint: {}\ncurves: {} and {}",
        result.steps,
        100.0 * result.heldout_accuracy,
        result.eval_problems,
        result.eval_temperature,
        result.stop,
        result.checkpoint.display(),
        out_dir.join("loss.png").display(),
        out_dir.join("accuracy.png").display(),
    );
    Ok(())
}

/// The supervised warm-up of `config` into `run_dir/sft/` (world built or reused first).
pub fn warm_up(config: &RunConfig, run_dir: &Path, device: &str) -> Result<SftResult> {
    let world = build_world(&config.world, &run_dir.join("world"))?;
    tracing::info!(root = %world.root.display(), reused = world.reused, "world ready");
    let tokenizer = Tokenizer::from_dir(&world.tokenizer_dir)?;
    let eos = tokenizer
        .eos_token()
        .and_then(|t| tokenizer.token_id(t))
        .context("the world tokenizer has no eos token")?;
    let pad = tokenizer
        .pad_token()
        .and_then(|t| tokenizer.token_id(t))
        .unwrap_or(eos);

    let device = parse_device(device)?;
    tch::manual_seed(config.sft.seed as i64);
    let lm = match &config.model.path {
        Some(path) => CausalLm::load(path, device, tch::Kind::Float, default_kind(device))?,
        None => {
            let tokenizer_size = tokenizer.vocab_size() as i64;
            config
                .model
                .embedding_rows(tokenizer_size)
                .map_err(anyhow::Error::msg)?;
            let qwen2 = config.model.qwen2_config(tokenizer_size, eos, pad);
            let mut lm = CausalLm::random(&qwen2, device, tch::Kind::Float, default_kind(device))?;
            lm.generation_config.eos_token_id = Some(prime_model::config::TokenIds::One(eos));
            lm.generation_config.pad_token_id = Some(pad);
            lm
        }
    };
    tracing::info!(parameters = lm.config.num_parameters(), "policy model");
    let examples = sft_examples(
        &prime_world::read_rows(&world.sft.parquet)?,
        &tokenizer,
        eos,
    )?;
    let heldout = eval_problems(&prime_world::read_rows(&world.heldout.parquet)?, &tokenizer)?;
    let out_dir = run_dir.join("sft");
    Ok(run_sft(
        &lm,
        &tokenizer,
        &world.tokenizer_dir,
        &examples,
        &heldout,
        &config.sft,
        &out_dir,
    )?)
}
