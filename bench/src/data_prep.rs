//! Data preparation (`prime bench data`): the learner's `prepare` (read the parquet file,
//! validate every row, apply the chat template, tokenize on all cores, drop prompts over the
//! limit) against the same work done with transformers' `apply_chat_template(...,
//! tokenize=True)` row by row (`bench/python/bench_data_prep.py`), on the full-size
//! Eurus-2-RL-Data stand-in (`prime world --standin`). Both sides also report what they kept,
//! and the prompt ids of a sample of rows are compared one by one.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use prime_learner::config::OnBadRow;
use prime_learner::data::prepare;
use prime_model::Tokenizer;
use prime_world::standin::{build_standin, StandinConfig, StandinFiles, StandinStats};
use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};
use crate::machine::{load_average, Machine};
use crate::ours::median;
use crate::python::Python;

/// What to prepare.
#[derive(Debug, Clone, Serialize)]
pub struct DataBenchSettings {
    /// The stand-in's directory; written with the default settings when it has no
    /// `data/train.parquet`.
    pub standin: PathBuf,
    /// Only the first this many training rows (all when absent).
    pub rows: Option<usize>,
    /// Prompts over this many tokens are dropped (the paper's 1,024).
    pub max_prompt_tokens: usize,
    /// Timed preparations per side; the median counts.
    pub repeats: usize,
    /// Rows at positions that are multiples of this have their ids compared.
    pub sample_every: usize,
}

/// What one side kept of the rows, and how long it took.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataSide {
    /// Median seconds from loading the tokenizer to the filtered rows.
    pub seconds: f64,
    pub seconds_all: Vec<f64>,
    pub rows: usize,
    pub kept: usize,
    pub too_long: usize,
    pub bad: usize,
}

impl DataSide {
    /// Rows prepared per second.
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds
    }
}

/// The line the reference script prints.
#[derive(Debug, Deserialize)]
struct ReferenceLine {
    #[serde(flatten)]
    side: DataSide,
    /// Seconds of reading, validating, and templating plus tokenizing, in the last repeat.
    stages: HashMap<String, f64>,
    #[serde(flatten)]
    environment: crate::python::ReferenceEnvironment,
}

/// What `prime bench data` measured.
#[derive(Debug, Clone, Serialize)]
pub struct DataBenchReport {
    pub settings: DataBenchSettings,
    /// The parquet file both sides prepared.
    pub file: PathBuf,
    pub ours: DataSide,
    /// Threads our tokenization ran on (rayon's pool).
    pub ours_threads: usize,
    pub transformers: DataSide,
    /// transformers' read, validate and tokenize seconds (last repeat).
    pub transformers_stages: HashMap<String, f64>,
    /// transformers' seconds over ours (above 1: we are faster).
    pub speedup: f64,
    /// Sampled rows whose ids were compared.
    pub compared: usize,
    /// Sampled rows whose ids differ, or that one side kept and the other did not.
    pub mismatches: usize,
    pub machine: Machine,
}

impl DataBenchReport {
    /// A plain-text table: the setting, the machine, then both sides.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "data preparation (read parquet, validate, chat template, tokenize, drop prompts over {} tokens) of {} ({} rows); median of {}",
            self.settings.max_prompt_tokens,
            self.file.display(),
            self.ours.rows,
            self.settings.repeats
        );
        let _ = writeln!(out, "machine: {}", self.machine.describe());
        let _ = writeln!(
            out,
            "{:<34} {:>9} {:>10} {:>8} {:>8} {:>5}  transformers/ours",
            "impl", "seconds", "rows/s", "kept", "too long", "bad"
        );
        let row = |out: &mut String, name: &str, side: &DataSide, ratio: &str| {
            let _ = writeln!(
                out,
                "{name:<34} {:>9.2} {:>10.0} {:>8} {:>8} {:>5}  {ratio}",
                side.seconds,
                side.rows_per_s(),
                side.kept,
                side.too_long,
                side.bad
            );
        };
        row(
            &mut out,
            &format!("prime-rs prepare ({} threads)", self.ours_threads),
            &self.ours,
            &format!("{:.1}x", self.speedup),
        );
        row(
            &mut out,
            "transformers apply_chat_template",
            &self.transformers,
            "",
        );
        let stage = |name: &str| self.transformers_stages.get(name).copied().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "transformers stages: read {:.2} s, validate {:.2} s, template + tokenize {:.2} s",
            stage("read"),
            stage("validate"),
            stage("tokenize")
        );
        let _ = writeln!(
            out,
            "prompt ids compared on {} sampled rows: {} mismatches",
            self.compared, self.mismatches
        );
        out
    }
}

/// The reference script.
pub fn data_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/bench_data_prep.py")
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parquet_error(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Settings(format!("{}: {e}", path.display()))
}

/// The stand-in in `dir`, written with the default settings when its training file is missing.
pub fn ensure_standin(dir: &Path) -> Result<StandinFiles> {
    let files = StandinFiles::layout(dir, StandinStats::default());
    if files.train.exists() && files.tokenizer_dir.join("tokenizer.json").exists() {
        return Ok(files);
    }
    tracing::info!(dir = %dir.display(), "writing the Eurus-2-RL-Data stand-in (prime world --standin)");
    build_standin(&StandinConfig::default(), dir, &|_, _, _| {})
        .map_err(|e| BenchError::Settings(format!("writing the stand-in: {e}")))
}

/// Copies the first `rows` rows of the parquet file `from` to `to`, columns as they are.
pub fn head_rows(from: &Path, to: &Path, rows: usize) -> Result<()> {
    let file = File::open(from).map_err(io_error(from))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_error(from, e))?;
    let schema = builder.schema().clone();
    let reader = builder
        .with_limit(rows)
        .build()
        .map_err(|e| parquet_error(from, e))?;
    let out = File::create(to).map_err(io_error(to))?;
    let mut writer = ArrowWriter::try_new(out, schema, None).map_err(|e| parquet_error(to, e))?;
    for batch in reader {
        let batch = batch.map_err(|e| parquet_error(from, e))?;
        writer.write(&batch).map_err(|e| parquet_error(to, e))?;
    }
    writer.close().map_err(|e| parquet_error(to, e))?;
    Ok(())
}

/// Prepares `file` as a run does, `repeats` times; the last preparation's ids by row
/// position (the stand-in's `extra_info.index`) for the rows sampled.
fn time_ours(
    file: &Path,
    tokenizer_dir: &Path,
    settings: &DataBenchSettings,
) -> Result<(DataSide, HashMap<usize, Vec<i64>>)> {
    let mut seconds_all = Vec::with_capacity(settings.repeats);
    let mut last = None;
    for _ in 0..settings.repeats {
        let start = Instant::now();
        let tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
        let prepared = prepare(
            &[file.to_path_buf()],
            &tokenizer,
            settings.max_prompt_tokens,
            OnBadRow::Skip,
        )?;
        seconds_all.push(start.elapsed().as_secs_f64());
        tracing::info!(seconds = seconds_all.last(), "prime-rs prepare");
        last = Some(prepared);
    }
    let prepared = last.ok_or_else(|| BenchError::Settings("need at least one repeat".into()))?;
    let summary = &prepared.summary;
    let side = DataSide {
        seconds: median(&seconds_all),
        seconds_all,
        rows: summary.rows,
        kept: summary.kept,
        too_long: summary.too_long,
        bad: summary.bad.count,
    };
    let sampled = prepared
        .rows
        .into_iter()
        .filter_map(|row| {
            let index = row.data.extra_info.as_ref()?.index as usize;
            index
                .is_multiple_of(settings.sample_every)
                .then_some((index, row.prompt_ids))
        })
        .collect();
    Ok((side, sampled))
}

/// Reads the reference's `{"row", "ids"}` lines.
fn read_reference_ids(path: &Path) -> Result<HashMap<usize, Vec<i64>>> {
    #[derive(Deserialize)]
    struct Line {
        row: usize,
        ids: Vec<i64>,
    }
    let file = File::open(path).map_err(io_error(path))?;
    let mut ids = HashMap::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io_error(path))?;
        let parsed: Line = serde_json::from_str(&line)
            .map_err(|e| BenchError::Settings(format!("{}: {e}", path.display())))?;
        ids.insert(parsed.row, parsed.ids);
    }
    Ok(ids)
}

/// Sampled rows compared, and how many differ: ids not equal, or kept on one side only.
pub fn compare_ids(
    ours: &HashMap<usize, Vec<i64>>,
    theirs: &HashMap<usize, Vec<i64>>,
) -> (usize, usize) {
    let mut rows: Vec<usize> = ours.keys().chain(theirs.keys()).copied().collect();
    rows.sort_unstable();
    rows.dedup();
    let mismatches = rows
        .iter()
        .filter(|row| ours.get(row) != theirs.get(row))
        .count();
    (rows.len(), mismatches)
}

/// Makes sure the stand-in exists, cuts it to `rows` if asked, and times both sides on the
/// same file (ours in this process, transformers in the venv).
pub fn run_data_bench(settings: &DataBenchSettings, python: &Python) -> Result<DataBenchReport> {
    if settings.repeats == 0 || settings.sample_every == 0 || settings.rows == Some(0) {
        return Err(BenchError::Settings(
            "need at least one repeat, one row and a sampling step of at least 1".into(),
        ));
    }
    let standin = ensure_standin(&settings.standin)?;
    let temp = tempfile::Builder::new()
        .prefix("prime-bench-data-")
        .tempdir()
        .map_err(io_error(&std::env::temp_dir()))?;
    let file = match settings.rows {
        Some(rows) => {
            let head = temp.path().join("train.parquet");
            head_rows(&standin.train, &head, rows)?;
            head
        }
        None => standin.train.clone(),
    };

    let load_before = load_average();
    let (ours, our_ids) = time_ours(&file, &standin.tokenizer_dir, settings)?;
    let ids_path = temp.path().join("ids.jsonl");
    let args = vec![
        "--data".to_string(),
        file.display().to_string(),
        "--tokenizer".into(),
        standin.tokenizer_dir.display().to_string(),
        "--max-prompt-tokens".into(),
        settings.max_prompt_tokens.to_string(),
        "--repeats".into(),
        settings.repeats.to_string(),
        "--sample-every".into(),
        settings.sample_every.to_string(),
        "--ids-out".into(),
        ids_path.display().to_string(),
    ];
    let script = data_script();
    let line = python.run_script(&script, &args)?;
    let parsed: ReferenceLine = serde_json::from_str(&line).map_err(|e| BenchError::Reference {
        script: script.clone(),
        message: format!("bad JSON line {line:?}: {e}"),
    })?;
    tracing::info!(
        seconds = parsed.side.seconds,
        "transformers data preparation"
    );
    let (compared, mismatches) = compare_ids(&our_ids, &read_reference_ids(&ids_path)?);
    let environment = parsed.environment;
    Ok(DataBenchReport {
        settings: settings.clone(),
        file: if settings.rows.is_some() {
            standin.train.clone()
        } else {
            file
        },
        speedup: parsed.side.seconds / ours.seconds,
        ours,
        ours_threads: rayon::current_num_threads(),
        transformers: parsed.side,
        transformers_stages: parsed.stages,
        compared,
        mismatches,
        machine: Machine::now(environment.threads, environment, load_before),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_kept_on_one_side_only_count_as_mismatches() {
        let ours: HashMap<usize, Vec<i64>> = [(0, vec![1, 2]), (500, vec![3]), (1000, vec![4])]
            .into_iter()
            .collect();
        let theirs: HashMap<usize, Vec<i64>> =
            [(0, vec![1, 2]), (500, vec![3, 3]), (1500, vec![5])]
                .into_iter()
                .collect();
        assert_eq!(compare_ids(&ours, &theirs), (4, 3));
        assert_eq!(compare_ids(&ours, &ours), (3, 0));
    }
}
