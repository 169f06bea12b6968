//! A benchmark run: both implementations at every batch size, the table and the JSON report.
use std::fmt::Write as _;
use std::path::Path;

use prime_model::{default_kind, parse_device, parse_kind, CausalLm};
use serde::Serialize;
use tch::{Device, Kind};

use crate::error::{BenchError, Result};
use crate::machine::{load_average, Machine};
use crate::ours::{measure, Measurement, Task};
use crate::python::Python;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub task: Task,
    pub batches: Vec<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16`; the device's default when absent.
    pub dtype: Option<String>,
    /// Timed runs per implementation and batch size (after one warm-up run).
    pub repeats: usize,
    /// Seeds the random token ids and the sampling.
    pub seed: u64,
}

/// The model the numbers are for.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// The model directory, or a note that it was a random one made for this run.
    pub source: String,
    pub parameters: i64,
    pub vocab: i64,
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
}

/// Both implementations at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub batch: usize,
    /// Tokens one run processes.
    pub tokens: usize,
    pub ours: Measurement,
    pub transformers: Measurement,
    /// Our tokens/s over transformers' (above 1: we are faster).
    pub ratio: f64,
}

/// Everything one `prime bench` invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub model: ModelSummary,
    #[serde(flatten)]
    pub task: Task,
    pub device: String,
    pub dtype: String,
    pub repeats: usize,
    pub seed: u64,
    pub rows: Vec<Row>,
}

/// Runs the benchmark on the model in `model_dir`: for each batch size ours, then
/// transformers in a subprocess with the same settings and thread count.
pub fn run(
    settings: &BenchSettings,
    model_dir: &Path,
    model_source: &str,
    python: &Python,
) -> Result<Report> {
    settings.task.validate()?;
    if settings.batches.is_empty() || settings.batches.contains(&0) || settings.repeats == 0 {
        return Err(BenchError::Settings(
            "need at least one batch size, all positive, and at least one repeat".into(),
        ));
    }
    let device = parse_device(&settings.device)?;
    let kind = match &settings.dtype {
        Some(name) => parse_kind(name)?,
        None => default_kind(device),
    };
    let lm = CausalLm::load(model_dir, device, kind, kind)?;
    let config = &lm.config;
    if settings.task.max_len() as i64 > config.max_position_embeddings {
        return Err(BenchError::Settings(format!(
            "{} tokens per row exceed the model's max_position_embeddings ({})",
            settings.task.max_len(),
            config.max_position_embeddings
        )));
    }
    let (device_name, dtype_name) = (device_name(device), dtype_name(kind));
    let load_before = load_average();
    let mut rows = Vec::with_capacity(settings.batches.len());
    let mut environment = None;
    for &batch in &settings.batches {
        let ours = measure(
            &lm.model,
            settings.task,
            batch,
            settings.repeats,
            settings.seed,
        )?;
        tracing::info!(
            task = settings.task.name(),
            batch,
            tokens_per_s = ours.tokens_per_s,
            "prime-rs"
        );
        let reference = python.reference(
            model_dir,
            settings.task,
            batch,
            &device_name,
            python_dtype(kind),
            settings.repeats,
            settings.seed,
        )?;
        let transformers = reference.measurement;
        tracing::info!(
            task = settings.task.name(),
            batch,
            tokens_per_s = transformers.tokens_per_s,
            "transformers"
        );
        if reference.environment.threads != python.threads {
            tracing::warn!(
                ours = python.threads,
                transformers = reference.environment.threads,
                "the two sides ran with different thread counts"
            );
        }
        environment = Some(reference.environment);
        rows.push(Row {
            batch,
            tokens: settings.task.tokens(batch),
            ratio: ours.tokens_per_s / transformers.tokens_per_s,
            ours,
            transformers,
        });
    }
    let environment = environment.expect("at least one batch size ran");
    Ok(Report {
        machine: Machine::now(python.threads, environment, load_before),
        model: ModelSummary {
            source: model_source.to_string(),
            parameters: config.num_parameters(),
            vocab: config.vocab_size,
            hidden: config.hidden_size,
            layers: config.num_hidden_layers,
            heads: config.num_attention_heads,
            kv_heads: config.num_kv_heads(),
        },
        task: settings.task,
        device: device_name,
        dtype: dtype_name.to_string(),
        repeats: settings.repeats,
        seed: settings.seed,
        rows,
    })
}

impl Report {
    /// A plain-text table: a header naming the setting, then both implementations per batch.
    pub fn table(&self) -> String {
        let lengths = match self.task {
            Task::Generate {
                prompt_len,
                new_tokens,
            } => format!("prompt {prompt_len} + {new_tokens} new tokens"),
            Task::Logprobs { seq_len } => format!("{seq_len} tokens per row"),
        };
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} on {} ({}), {lengths}; median of {} runs after a warm-up",
            self.task.name(),
            self.device,
            self.dtype,
            self.repeats
        );
        let _ = writeln!(
            out,
            "model: {} ({:.2}M parameters); machine: {}{}, {} cores, {} threads, load {} -> {}; torch {}, transformers {}",
            self.model.source,
            self.model.parameters as f64 / 1e6,
            m.cpu,
            m.gpu.as_ref().map(|g| format!(" + {g}")).unwrap_or_default(),
            m.cores,
            m.threads,
            load(m.load_before),
            load(m.load_after),
            m.torch_version,
            m.transformers_version
        );
        let _ = writeln!(
            out,
            "{:>6}  {:<13} {:>12} {:>10}  ours/transformers",
            "batch", "impl", "tokens/s", "median s"
        );
        for row in &self.rows {
            let _ = writeln!(
                out,
                "{:>6}  {:<13} {:>12.1} {:>10.4}  {:.2}x",
                row.batch, "prime-rs", row.ours.tokens_per_s, row.ours.seconds, row.ratio
            );
            let _ = writeln!(
                out,
                "{:>6}  {:<13} {:>12.1} {:>10.4}",
                row.batch, "transformers", row.transformers.tokens_per_s, row.transformers.seconds
            );
        }
        out
    }
}

fn load(value: Option<f64>) -> String {
    value.map_or_else(|| "?".into(), |v| format!("{v:.2}"))
}

/// The device as the reference script spells it.
fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}

/// The dtype as our CLI spells it.
fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "f32",
    }
}

/// The dtype as the reference script spells it.
fn python_dtype(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}
