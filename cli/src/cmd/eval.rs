//! `prime eval --model DIR --data FILE`: the evaluation protocol (avg@k, maj@k, pass@k and
//! greedy accuracy per data source), and with `--bon N --prm URL` Best-of-N against majority
//! vote, random pick and pass@N on the same samples. Prints the tables and writes
//! `report.json`, `samples.jsonl` and `accuracy_vs_n.png` into `--out`. Argument parsing only;
//! the work is in `prime_learner::eval::protocol`.
use std::path::PathBuf;

use anyhow::Context;
use prime_check::rules;
use prime_learner::eval::protocol::{evaluate, BonConfig, EvalConfig};
use prime_model::{default_kind, parse_device, parse_kind};
use prime_prm_server::Aggregation;

/// `prime eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model directory (Hugging Face format, with its tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// Eurus-schema data (parquet or jsonl); repeat for several files.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Samples per problem (avg@k, maj@k, pass@k).
    #[arg(
        long,
        default_value_t = 16,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub k: usize,
    /// Sampling temperature (the protocol's re-evaluation uses 0.3).
    #[arg(
        long,
        default_value_t = 0.3,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::TEMPERATURE),
    )]
    pub temperature: f64,
    /// Nucleus sampling, in (0, 1].
    #[arg(
        long,
        default_value_t = 0.95,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::TOP_P),
    )]
    pub top_p: f64,
    /// Longest response (clipped to the model's positions).
    #[arg(
        long,
        default_value_t = 8192,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub max_new_tokens: usize,
    /// Skip the greedy decode.
    #[arg(long)]
    pub no_greedy: bool,
    /// Evaluate the first N problems only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences decoding at once.
    #[arg(
        long,
        default_value_t = 64,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub batch_rows: usize,
    /// Best-of-N up to N candidates per problem (needs --prm; k is raised to N).
    #[arg(
        long,
        requires = "prm",
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub bon: Option<usize>,
    /// gRPC URL of a PRM server (`prime prm-server serve`).
    #[arg(long)]
    pub prm: Option<String>,
    /// Shared token of the PRM server.
    #[arg(long, env = "PRIME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How a candidate's step scores become its score: min, sum, mean or last.
    #[arg(long, default_value = "min")]
    pub aggregation: String,
    /// Step split asked of the PRM server (default: the server's own).
    #[arg(long, default_value = "")]
    pub step_split: String,
    /// Output directory for report.json, samples.jsonl and accuracy_vs_n.png.
    #[arg(long, default_value = "eval")]
    pub out: PathBuf,
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// Runs the evaluation, prints the tables and the output directory.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let token = super::tls::token(&args.token)?;
    for data in &args.data {
        prime_check::path::distinct("--data", data, "--out", &args.out)?;
    }
    let device = parse_device(&args.device)?;
    let kind = match &args.dtype {
        Some(d) => parse_kind(d)?,
        None => default_kind(device),
    };
    let mut rows = Vec::new();
    for file in &args.data {
        rows.extend(prime_world::read_rows(file).with_context(|| file.display().to_string())?);
    }
    let bon = match (args.bon, &args.prm) {
        (Some(n), Some(url)) => Some(BonConfig {
            n,
            prm_url: url.clone(),
            token,
            aggregation: args.aggregation.parse::<Aggregation>()?,
            step_split: args.step_split.clone(),
            timeout_secs: 600.0,
        }),
        (None, Some(_)) => anyhow::bail!("--prm needs --bon N"),
        _ => None,
    };
    let config = EvalConfig {
        k: args.k,
        temperature: args.temperature,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        greedy: !args.no_greedy,
        limit: args.limit,
        seed: args.seed,
        batch_rows: args.batch_rows,
    };
    let data = args
        .data
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let evaluation = evaluate(
        &args.model,
        &data,
        &rows,
        &config,
        bon.as_ref(),
        device,
        kind,
    )
    .context("evaluation failed")?;
    // Written aside and moved into --out once complete.
    let out = prime_check::path::StagedDir::create(&args.out)?;
    evaluation.write(out.path())?;
    out.commit()?;
    print!("{}", evaluation.report.table());
    println!("{}", args.out.display());
    Ok(())
}
