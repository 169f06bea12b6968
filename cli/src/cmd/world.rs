//! `prime world`: generate the embedded default world (data splits and tokenizer), or with
//! `--standin` a full-size synthetic stand-in for Eurus-2-RL-Data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use prime_world::standin::{
    build_standin, SplitCounts, Stage, StandinConfig, StandinSplit, BAD_ROW_EVERY, TRAIN_ROWS,
    VALIDATION_ROWS,
};
use prime_world::{build_world, TokenStats, WorldConfig};

use crate::progress::progress_bar;

/// Generate the embedded default world: arithmetic word problems as Eurus-2-RL-Data rows
/// (data/{sft,rl,heldout}.{jsonl,parquet}) and the project's tokenizer (tokenizer/). Running
/// it again with the same settings keeps the existing files. A `[world.flawed_teacher]` table
/// in --config makes the supervised traces a flawed teacher's (docs/configuration.md).
///
/// With --standin: a full-size synthetic stand-in for Eurus-2-RL-Data instead, for rehearsing
/// the paper's run: data/train.parquet (482,000 rows by default: 94.5% math, 5.5% code with
/// stdin and fn_name test specs, one bad row in 10,000), data/validation.parquet (2,048 rows,
/// half math, half code), tokenizer/ (byte-level BPE with Qwen2's pre-tokenizer and special
/// tokens, ChatML template) and standin.json; the real system prompt and suffixes, prompt
/// lengths like the real set's. Byte-identical for the same settings.
#[derive(clap::Args, Debug)]
pub struct WorldArgs {
    /// Directory to write the world into.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the stand-in for Eurus-2-RL-Data instead of the embedded world (replaces what is
    /// in --out).
    #[arg(long, conflicts_with_all = ["config", "sft_size", "rl_size", "heldout_size", "vocab_size"])]
    pub standin: bool,
    /// Stand-in training rows.
    #[arg(long, requires = "standin", default_value_t = TRAIN_ROWS)]
    pub train_rows: usize,
    /// Stand-in validation rows (half math, half code).
    #[arg(long, requires = "standin", default_value_t = VALIDATION_ROWS)]
    pub heldout_rows: usize,
    /// Run config (TOML) whose `[world]` table to use; the built-in defaults otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seed of the generator (overrides the config; with --standin, default 0).
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
    if args.standin {
        return run_standin(&args);
    }
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
    if let Some(teacher) = &files.stats.teacher {
        println!(
            "  flawed teacher: {} of {} multiplications written one copy short ({} eligible); \
             {:.1}% of supervised traces right",
            teacher.flawed,
            teacher.multiplications,
            teacher.eligible,
            100.0 * teacher.traces_right
        );
    }
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

/// Writes the stand-in with a progress bar per split and prints what went where.
fn run_standin(args: &WorldArgs) -> anyhow::Result<()> {
    refuse_foreign_files(&args.out)?;
    let cfg = StandinConfig {
        seed: args.seed.unwrap_or(0),
        train_rows: args.train_rows,
        validation_rows: args.heldout_rows,
    };
    let train_bar = progress_bar(cfg.train_rows as u64, "train");
    let validation_bar = progress_bar(cfg.validation_rows as u64, "validation");
    let started = Instant::now();
    let files = build_standin(&cfg, &args.out, &|stage, done, _total| match stage {
        Stage::Rows(StandinSplit::Train) => train_bar.set_position(done as u64),
        Stage::Rows(_) => validation_bar.set_position(done as u64),
        Stage::Tokenizer => {}
    })
    .with_context(|| format!("writing the stand-in in {}", args.out.display()))?;
    train_bar.finish_and_clear();
    validation_bar.finish_and_clear();

    let stats = &files.stats;
    println!(
        "wrote the Eurus-2-RL-Data stand-in (seed {}) in {} in {:.1} s",
        cfg.seed,
        files.root.display(),
        started.elapsed().as_secs_f64()
    );
    for (path, counts) in [
        (&files.train, &stats.train),
        (&files.validation, &stats.validation),
    ] {
        println!("  {}  {}", path.display(), counts_summary(counts));
    }
    println!(
        "  tokenizer (vocab {}, trained on {} rows): {}",
        stats.vocab_size,
        stats.tokenizer_sample_rows,
        files.tokenizer_dir.display()
    );
    println!(
        "  bad rows: one training row in {BAD_ROW_EVERY}; check with: prime data check --files {} {} --tokenizer {}",
        files.train.display(),
        files.validation.display(),
        files.tokenizer_dir.display()
    );
    Ok(())
}

fn counts_summary(counts: &SplitCounts) -> String {
    format!(
        "{} rows: {} math, {} code ({} stdin, {} fn_name), {} bad",
        counts.rows,
        counts.math,
        counts.code_stdin + counts.code_call,
        counts.code_stdin,
        counts.code_call,
        counts.bad
    )
}

/// The files the stand-in writes, relative to `--out`.
const STANDIN_FILES: [&str; 4] = [
    "data/train.parquet",
    "data/validation.parquet",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
];

/// Refuses to write the stand-in over files it did not write itself: a directory holding any
/// of its file names without its `standin.json` (e.g. the real data set's directory, whose
/// files are also called train.parquet and validation.parquet).
fn refuse_foreign_files(out: &std::path::Path) -> anyhow::Result<()> {
    if out.join("standin.json").is_file() {
        return Ok(());
    }
    if let Some(existing) = STANDIN_FILES
        .iter()
        .map(|f| out.join(f))
        .find(|p| p.exists())
    {
        anyhow::bail!(
            "{} exists and {} holds no standin.json: the stand-in would overwrite files it did \
             not write; choose an empty or new --out",
            existing.display(),
            out.display()
        );
    }
    Ok(())
}
