//! `prime model init`: a from-scratch Qwen2 written as a self-contained model directory, the
//! start model of runs that bring no checkpoint of their own (e.g. configs/rehearsal.toml).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use prime_learner::RunConfig;
use prime_model::checkpoint::copy_tokenizer_files;
use prime_model::config::TokenIds;
use prime_model::{CausalLm, Tokenizer, DEFAULT_MAX_SHARD_BYTES};
use tch::{Device, Kind};

/// Options of `prime model init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Run config whose `[model]` table gives the shape (hidden_size, num_hidden_layers,
    /// heads, intermediate_size, max_position_embeddings, tie_word_embeddings, vocab_size);
    /// its `model.path` is not read (it may name where this model goes).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set model.vocab_size=152064` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Tokenizer directory (tokenizer.json, tokenizer_config.json); its files are copied
    /// next to the weights and its EOS and pad tokens go into the model's configs.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Directory to write; must not exist yet (nothing is overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Builds the random model on the CPU in f32 and writes it beside `--out`, moved into place
/// only once complete.
pub fn run(args: InitArgs) -> Result<()> {
    if args.out.exists() {
        bail!(
            "{} already exists: `prime model init` writes a new directory and overwrites nothing",
            args.out.display()
        );
    }
    let config = RunConfig::from_file_with_overrides(&args.config, &args.overrides)?;
    let tokenizer = Tokenizer::from_dir(&args.tokenizer)
        .with_context(|| format!("loading the tokenizer in {}", args.tokenizer.display()))?;
    let eos = tokenizer
        .eos_token()
        .and_then(|t| tokenizer.token_id(t))
        .with_context(|| {
            format!(
                "{}: the tokenizer names no EOS token",
                args.tokenizer.display()
            )
        })?;
    let pad = tokenizer
        .pad_token()
        .and_then(|t| tokenizer.token_id(t))
        .unwrap_or(eos);
    let tokenizer_size = tokenizer.vocab_size() as i64;
    config
        .model
        .embedding_rows(tokenizer_size)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let qwen2 = config.model.qwen2_config(tokenizer_size, eos, pad);

    tch::manual_seed(args.seed as i64);
    let mut lm = CausalLm::random(&qwen2, Device::Cpu, Kind::Float, Kind::Float)?;
    lm.generation_config.eos_token_id = Some(TokenIds::One(eos));
    lm.generation_config.pad_token_id = Some(pad);

    // Assembled beside --out and moved into place only once complete.
    let out = prime_check::path::StagedDir::create(&args.out)?;
    lm.save(out.path(), None, DEFAULT_MAX_SHARD_BYTES)?;
    copy_tokenizer_files(&args.tokenizer, out.path())?;
    out.commit()?;
    println!(
        "wrote {}: {} parameters, vocabulary {} rows for a tokenizer of {} ids, {} layers, \
         hidden {}, context {} tokens",
        args.out.display(),
        qwen2.num_parameters(),
        qwen2.vocab_size,
        tokenizer_size,
        qwen2.num_hidden_layers,
        qwen2.hidden_size,
        qwen2.max_position_embeddings
    );
    Ok(())
}
