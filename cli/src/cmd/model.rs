//! `prime model logprobs` and `prime model generate`: the model layer over JSONL files.
//!
//! These are fixed interfaces that other tools rely on:
//! - logprobs: input lines `{"input_ids":[...]}`, output lines `{"logprobs":[...]}` with
//!   `len - 1` values, value `t-1` = log p(ids[t] | ids[<t]);
//! - generate: input lines `{"input_ids":[...]}` or `{"prompt":"text"}` (chat template
//!   applied, as a user message with the generation prompt), output lines
//!   `{"output_ids":[...],"text":"..."}` with new tokens only, ending with EOS when produced.
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use prime_model::{
    default_kind, generate, parse_device, parse_kind, sequence_logprobs, CausalLm, ChatMessage,
    SamplingParams, Tokenizer,
};
use serde_json::{json, Value};

use crate::progress::progress_bar;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Per-token log-probs of token sequences: {"input_ids":[...]} -> {"logprobs":[...]}.
    Logprobs(LogprobsArgs),
    /// Sample responses: {"input_ids":[...]} or {"prompt":"..."} -> {"output_ids":[...],"text":"..."}.
    Generate(GenerateArgs),
    /// A from-scratch Qwen2 of a run config's `[model]` shape, written as a self-contained
    /// model directory (weights, configs, tokenizer files) with random weights.
    Init(crate::cmd::model_init::InitArgs),
}

/// Options shared by the model tools.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// Input JSONL file.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL file, one line per input line, in the same order.
    #[arg(long)]
    pub output: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA, whatever the dtype on disk).
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    pub common: ModelArgs,
    /// Token budget of one forward batch (rows x padded length).
    #[arg(long, default_value_t = 16384)]
    pub max_batch_tokens: usize,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: ModelArgs,
    /// Maximum number of new tokens per response.
    #[arg(long)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    pub temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the k most likely tokens only; 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompts sampled together in one batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Logprobs(args) => logprobs(args),
        ModelCommand::Generate(args) => generate_cmd(args),
        ModelCommand::Init(args) => crate::cmd::model_init::run(args),
    }
}

fn load_model(args: &ModelArgs) -> Result<CausalLm> {
    let device = parse_device(&args.device)?;
    let kind = match &args.dtype {
        Some(name) => parse_kind(name)?,
        None => default_kind(device),
    };
    CausalLm::load(&args.model, device, kind, kind)
        .with_context(|| format!("loading model {}", args.model.display()))
}

/// Reads the JSONL input, naming the line of any error.
fn read_lines(path: &Path) -> Result<Vec<Value>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: invalid JSON", path.display(), i + 1))?;
        rows.push(value);
    }
    Ok(rows)
}

fn input_ids(row: &Value, path: &Path, line: usize) -> Result<Option<Vec<i64>>> {
    let Some(ids) = row.get("input_ids") else {
        return Ok(None);
    };
    ids.as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
        .map(Some)
        .with_context(|| {
            format!(
                "{} line {line}: input_ids must be an array of integers",
                path.display()
            )
        })
}

fn write_lines(path: &Path, rows: impl IntoIterator<Item = Value>) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for row in rows {
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    Ok(())
}

fn logprobs(args: LogprobsArgs) -> Result<()> {
    let lm = load_model(&args.common)?;
    let path = &args.common.input;
    let sequences = read_lines(path)?
        .iter()
        .enumerate()
        .map(|(i, row)| {
            input_ids(row, path, i + 1)?
                .with_context(|| format!("{} line {}: missing input_ids", path.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let bar = progress_bar(sequences.len() as u64, "scoring");
    let mut results = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(256) {
        results.extend(sequence_logprobs(&lm.model, chunk, args.max_batch_tokens)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    write_lines(
        &args.common.output,
        results.into_iter().map(|lp| json!({ "logprobs": lp })),
    )?;
    tracing::info!(sequences = sequences.len(), output = %args.common.output.display(), "wrote log-probs");
    Ok(())
}

fn generate_cmd(args: GenerateArgs) -> Result<()> {
    let lm = load_model(&args.common)?;
    let tokenizer = Tokenizer::from_dir(&args.common.model).ok();
    let path = &args.common.input;
    let mut prompts = Vec::new();
    for (i, row) in read_lines(path)?.iter().enumerate() {
        let line = i + 1;
        if let Some(ids) = input_ids(row, path, line)? {
            prompts.push(ids);
        } else if let Some(text) = row.get("prompt").and_then(Value::as_str) {
            let Some(tokenizer) = &tokenizer else {
                bail!(
                    "{} line {line}: a text prompt needs tokenizer.json in the model directory",
                    path.display()
                );
            };
            let messages = [ChatMessage {
                role: "user".into(),
                content: text.into(),
            }];
            prompts.push(tokenizer.encode_chat(&messages, true)?);
        } else {
            bail!(
                "{} line {line}: expected \"input_ids\" or \"prompt\"",
                path.display()
            );
        }
    }
    if let Some(seed) = args.seed {
        tch::manual_seed(seed as i64);
    }
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: None,
        stop_token_ids: lm.eos_token_ids(),
    };
    let bar = progress_bar(prompts.len() as u64, "generating");
    let mut rows = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(args.batch_size.max(1)) {
        for generation in generate(&lm.model, chunk, &params)? {
            let mut row = json!({ "output_ids": generation.token_ids });
            if let Some(tokenizer) = &tokenizer {
                row["text"] = json!(tokenizer.decode(&generation.token_ids, true)?);
            }
            rows.push(row);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    write_lines(&args.common.output, rows)?;
    tracing::info!(prompts = prompts.len(), output = %args.common.output.display(), "wrote generations");
    Ok(())
}
