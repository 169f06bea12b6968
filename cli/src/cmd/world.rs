//! `prime world`: generate the embedded default world (data splits and tokenizer).

use std::path::PathBuf;

use anyhow::Context;
use prime_world::{build_world, TokenStats, WorldConfig};

/// Generate the embedded default world: arithmetic word problems as Eurus-2-RL-Data rows
/// (data/{sft,rl,heldout}.{jsonl,parquet}) and the project's tokenizer (tokenizer/). Running
/// it again with the same settings keeps the existing files.
#[derive(clap::Args, Debug)]
pub struct WorldArgs {
    /// Directory to write the world into.
    #[arg(long)]
    pub out: PathBuf,
    /// Run config (TOML) whose `[world]` table to use; the built-in defaults otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seed of the generator (overrides the config).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of supervised problems, with full solution traces (overrides the config).
    #[arg(long)]
    pub sft_size: Option<usize>,
    /// Number of RL problems, with final answers only (overrides the config).
    #[arg(long)]
    pub rl_size: Option<usize>,
    /// Number of held-out problems (overrides the config).
    #[arg(long)]
    pub heldout_size: Option<usize>,
    /// Tokenizer vocabulary size, special tokens included (overrides the config).
    #[arg(long)]
    pub vocab_size: Option<usize>,
}

/// Resolves the config from the file and flags, builds the world and prints where it went.
pub fn run(args: WorldArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(path) => WorldConfig::from_toml_file(path)?,
        None => WorldConfig::default(),
    };
    if let Some(seed) = args.seed {
        cfg.seed = seed;
    }
    if let Some(size) = args.sft_size {
        cfg.sft.size = size;
    }
    if let Some(size) = args.rl_size {
        cfg.rl.size = size;
    }
    if let Some(size) = args.heldout_size {
        cfg.heldout.size = size;
    }
    if let Some(size) = args.vocab_size {
        cfg.vocab_size = size;
    }
    let files = build_world(&cfg, &args.out)
        .with_context(|| format!("building the world in {}", args.out.display()))?;

    let verb = if files.reused { "kept" } else { "wrote" };
    println!("{verb} world in {}", files.root.display());
    for (name, split, stats) in [
        ("sft", &files.sft, &files.stats.sft),
        ("rl", &files.rl, &files.stats.rl),
        ("heldout", &files.heldout, &files.stats.heldout),
    ] {
        println!(
            "  {name:<8} {:>6} rows  {}  {}  {}",
            stats.rows,
            split.jsonl.display(),
            split.parquet.display(),
            token_summary(stats)
        );
    }
    println!(
        "  tokenizer (vocab {}): {}",
        files.stats.vocab_size,
        files.tokenizer_dir.display()
    );
    Ok(())
}

fn token_summary(stats: &TokenStats) -> String {
    let mut text = format!(
        "prompt tokens mean {:.1} max {}",
        stats.prompt_mean, stats.prompt_max
    );
    if let (Some(mean), Some(max)) = (stats.response_mean, stats.response_max) {
        text.push_str(&format!(", response mean {mean:.1} max {max}"));
    }
    if let (Some(mean), Some(max)) = (stats.total_mean, stats.total_max) {
        text.push_str(&format!(", total mean {mean:.1} max {max}"));
    }
    text
}
