//! `prime model logprobs` and `prime model generate`: the model layer over JSONL files.
//!
//! These are fixed interfaces that other tools rely on:
//! - logprobs: input lines `{"input_ids":[...]}`, output lines `{"logprobs":[...]}` with
//!   `len - 1` values, value `t-1` = log p(ids[t] | ids[<t]);
//! - generate: input lines `{"input_ids":[...]}` or `{"prompt":"text"}` (chat template
//!   applied, as a user message with the generation prompt), output lines
//!   `{"output_ids":[...],"text":"..."}` with new tokens only, ending with EOS when produced.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use prime_check::jsonl::{self, Line};
use prime_check::path::AtomicFile;
use prime_check::rules;
use prime_model::{
    check_sequence, default_kind, generate_within, parse_device, parse_kind, sequence_logprobs,
    CausalLm, ChatMessage, KvBudget, SamplingParams, Tokenizer,
};
use serde_json::{json, Value};
use tch::{Device, Kind};

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
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
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
    #[arg(
        long,
        default_value_t = 16384,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub max_batch_tokens: usize,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: ModelArgs,
    /// Maximum number of new tokens per response.
    #[arg(long, allow_hyphen_values = true, value_parser = prime_check::arg::at_least(1usize))]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(
        long,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::TEMPERATURE),
    )]
    pub temperature: f64,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(
        long,
        default_value_t = 1.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::TOP_P),
    )]
    pub top_p: f64,
    /// Sample among the k most likely tokens only; 0 disables.
    #[arg(
        long,
        default_value_t = 0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(0i64),
    )]
    pub top_k: i64,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompts sampled together in one batch.
    #[arg(
        long,
        default_value_t = 32,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub batch_size: usize,
    /// Most GiB the KV cache may take: a batch decodes as many rows at once as it holds, with
    /// the same outputs (docs/memory.md). Default: unbounded on cpu; on cuda half of the
    /// device memory free after the model is loaded.
    #[arg(
        long,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::GIB),
    )]
    pub kv_cache_gib: Option<f64>,
}

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Logprobs(args) => logprobs(args),
        ModelCommand::Generate(args) => generate_cmd(args),
        ModelCommand::Init(args) => crate::cmd::model_init::run(args),
    }
}

/// Everything about the arguments that can be checked before any work: the output is not the
/// input, the device exists, the dtype is known.
fn check_args(args: &ModelArgs) -> Result<(Device, Kind)> {
    prime_check::path::distinct("--input", &args.input, "--output", &args.output)?;
    let device = parse_device(&args.device)?;
    let kind = match &args.dtype {
        Some(name) => parse_kind(name)?,
        None => default_kind(device),
    };
    Ok((device, kind))
}

fn load_model(args: &ModelArgs, device: Device, kind: Kind) -> Result<CausalLm> {
    CausalLm::load(&args.model, device, kind, kind)
        .with_context(|| format!("loading model {}", args.model.display()))
}

/// The token ids of a line's `input_ids`, or `None` when the line has none.
fn input_ids(line: &Line, path: &Path) -> Result<Option<Vec<i64>>> {
    let Some(ids) = line.value.get("input_ids") else {
        return Ok(None);
    };
    ids.as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
        .map(Some)
        .with_context(|| {
            format!(
                "{} line {}: input_ids must be an array of integers",
                path.display(),
                line.number
            )
        })
}

/// The output lines, written next to `path` and moved onto it once complete.
fn write_lines(path: &Path, rows: impl IntoIterator<Item = Value>) -> Result<()> {
    let mut out = AtomicFile::create(path)?;
    for row in rows {
        writeln!(out, "{row}").with_context(|| format!("writing {}", path.display()))?;
    }
    out.commit()?;
    Ok(())
}

fn logprobs(args: LogprobsArgs) -> Result<()> {
    let (device, kind) = check_args(&args.common)?;
    let path = &args.common.input;
    let lines = jsonl::read(path)?;
    let lm = load_model(&args.common, device, kind)?;
    let sequences = lines
        .iter()
        .map(|line| {
            let ids = input_ids(line, path)?.with_context(|| {
                format!("{} line {}: missing input_ids", path.display(), line.number)
            })?;
            check_sequence(&ids, &lm.config)
                .with_context(|| format!("{} line {}", path.display(), line.number))?;
            Ok(ids)
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
    let (device, kind) = check_args(&args.common)?;
    let path = &args.common.input;
    let lines = jsonl::read(path)?;
    let lm = load_model(&args.common, device, kind)?;
    let tokenizer = Tokenizer::from_dir(&args.common.model).ok();
    let mut prompts = Vec::new();
    for line in &lines {
        let at = || format!("{} line {}", path.display(), line.number);
        let ids = if let Some(ids) = input_ids(line, path)? {
            ids
        } else if let Some(text) = line.value.get("prompt").and_then(Value::as_str) {
            let Some(tokenizer) = &tokenizer else {
                bail!(
                    "{}: a text prompt needs tokenizer.json in the model directory",
                    at()
                );
            };
            let messages = [ChatMessage {
                role: "user".into(),
                content: text.into(),
            }];
            tokenizer.encode_chat(&messages, true).with_context(at)?
        } else {
            bail!("{}: expected \"input_ids\" or \"prompt\"", at());
        };
        if ids.is_empty() {
            bail!("{}: the prompt has no tokens", at());
        }
        check_sequence(&ids, &lm.config).with_context(at)?;
        let positions = lm.config.max_position_embeddings;
        if (ids.len() + args.max_new_tokens) as i64 > positions {
            bail!(
                "{}: the prompt's {} tokens plus --max-new-tokens {} exceed the model's \
                 max_position_embeddings ({positions})",
                at(),
                ids.len(),
                args.max_new_tokens
            );
        }
        prompts.push(ids);
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
    // Measured once: later, memory libtorch keeps cached from earlier batches counts as taken.
    let budget = KvBudget::resolve(args.kv_cache_gib, lm.model.device())?;
    tracing::info!(%budget, "KV cache budget");
    let bar = progress_bar(prompts.len() as u64, "generating");
    let mut rows = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(args.batch_size) {
        for generation in generate_within(&lm.model, chunk, &params, chunk.len(), budget)? {
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
