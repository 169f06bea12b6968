//! `prime data check`: reads, validates and tokenizes data files as a run would, and prints
//! what it found (the work is the learner's `data` module).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use prime_learner::config::{DataConfig, OnBadRow};
use prime_learner::data::prepare;
use prime_model::Tokenizer;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Read, validate and tokenize Eurus-2-RL-Data files as a run would: rows read and kept,
    /// kept rows by ability and data_source, prompts dropped as too long, bad rows (the first
    /// 20 as `file:row: reason`), prompt-length percentiles and seconds.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Data files (.jsonl or .parquet, Eurus-2-RL-Data columns).
    #[arg(long, required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Model or tokenizer directory (tokenizer.json, tokenizer_config.json with the chat
    /// template).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Prompt length limit in tokens, chat template applied (`learner.data.max_prompt_tokens`;
    /// default: its default).
    #[arg(long, allow_hyphen_values = true, value_parser = prime_check::arg::at_least(1usize))]
    pub max_prompt_tokens: Option<usize>,
    /// Also write the summary as JSON here (keys rows, kept, too_long, bad, by_ability,
    /// by_source, prompt_tokens, seconds).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> Result<()> {
    if let Some(json) = &args.json {
        for file in &args.files {
            prime_check::path::distinct("--files", file, "--json", json)?;
        }
    }
    let max_prompt_tokens = args
        .max_prompt_tokens
        .unwrap_or(DataConfig::default().max_prompt_tokens);
    let tokenizer = Tokenizer::from_dir(&args.tokenizer)
        .with_context(|| format!("loading the tokenizer in {}", args.tokenizer.display()))?;
    // A check counts every bad row instead of stopping at the first.
    let prepared = prepare(&args.files, &tokenizer, max_prompt_tokens, OnBadRow::Skip)?;
    for line in prepared.summary.lines(max_prompt_tokens) {
        println!("{line}");
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&prepared.summary)? + "\n";
        prime_check::path::write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}
