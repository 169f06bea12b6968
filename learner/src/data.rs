//! Data preparation: Eurus-2-RL-Data rows read from jsonl and parquet files, validated and
//! routed by ability (math, code), the chat template applied and tokenized on all cores,
//! prompts over the length limit dropped, and a [`DataSummary`] of all of it (`prime data
//! check`, and the start of every run). Nothing is dropped without being counted: a row is
//! kept, too long, or bad, and every bad row is named by its file, its row and why.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prime_model::{ChatMessage, Tokenizer};
use prime_verifier::code::TestSpec;
use prime_verifier::Ability;
use prime_world::{DataRow, WorldError};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{DataConfig, OnBadRow};
use crate::error::{LearnerError, Result};
use crate::scheduler::Prompt;

/// Bad rows a summary names one by one (the rest are counted).
pub const SHOWN_BAD_ROWS: usize = 20;

/// The file in a run dir holding the data summaries of the run's start ([`RunData`]).
pub const DATA_SUMMARY_FILE: &str = "data.json";

/// A held-out problem: prompt ids and the reference answer.
#[derive(Debug, Clone)]
pub struct EvalProblem {
    /// Prompt ids, chat template applied.
    pub prompt_ids: Vec<i64>,
    /// The reference answer (math) or JSON test spec (code).
    pub ground_truth: String,
    /// Which grader scores it.
    pub ability: Ability,
    /// Where the row comes from (`data_source`), for per-source accuracy.
    pub data_source: String,
}

/// A data row's prompt as chat messages.
pub(crate) fn to_chat(row: &DataRow) -> Vec<ChatMessage> {
    row.prompt
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// Token ids of a row's prompt: the chat template applied with the generation prompt.
fn encode_prompt(row: &DataRow, tokenizer: &Tokenizer) -> Result<Vec<i64>> {
    Ok(tokenizer.encode_chat(&to_chat(row), true)?)
}

/// The prompt ids of every row, in row order, encoded on all cores (rayon's pool); the
/// tokenizer's chat template is compiled once, at load. Element `i` is row `i`'s ids or why
/// they could not be made. The same as [`encode_prompts_sequential`].
pub fn encode_prompts(rows: &[DataRow], tokenizer: &Tokenizer) -> Vec<Result<Vec<i64>>> {
    rows.par_iter()
        .map(|row| encode_prompt(row, tokenizer))
        .collect()
}

/// [`encode_prompts`] on this thread alone.
pub fn encode_prompts_sequential(rows: &[DataRow], tokenizer: &Tokenizer) -> Vec<Result<Vec<i64>>> {
    rows.iter()
        .map(|row| encode_prompt(row, tokenizer))
        .collect()
}

/// Tokenizes held-out rows into prompts and reference answers; the first row that cannot be
/// tokenized is the error.
pub fn eval_problems(rows: &[DataRow], tokenizer: &Tokenizer) -> Result<Vec<EvalProblem>> {
    encode_prompts(rows, tokenizer)
        .into_iter()
        .zip(rows)
        .map(|(ids, row)| {
            let ability = row.ability.parse().map_err(|_| {
                LearnerError::Data(format!(
                    "a held-out row has ability {:?}: math or code expected",
                    row.ability
                ))
            })?;
            Ok(EvalProblem {
                prompt_ids: ids?,
                ground_truth: row.reward_model.ground_truth.clone(),
                ability,
                data_source: row.data_source.clone(),
            })
        })
        .collect()
}

/// The name of an ability as rows spell it.
pub fn ability_name(ability: Ability) -> &'static str {
    match ability {
        Ability::Math => "math",
        Ability::Code => "code",
    }
}

/// What the learner needs of a row beyond [`DataRow::check`] (which every reader applies):
/// an ability it can grade (`math` or `code`, spelled so), a user message that says
/// something, a ground truth that is not blank and, for code, a JSON test spec. Returns the
/// row's ability, or why the row is bad (`field `...`: ...`).
pub fn validate_row(row: &DataRow) -> std::result::Result<Ability, String> {
    let ability = match row.ability.as_str() {
        "math" => Ability::Math,
        "code" => Ability::Code,
        other => {
            return Err(format!(
                "field `ability`: unknown ability {other:?} (expected \"math\" or \"code\")"
            ))
        }
    };
    if row.question().is_none_or(|q| q.trim().is_empty()) {
        return Err("field `prompt`: empty prompt (the user message has no text)".into());
    }
    let truth = &row.reward_model.ground_truth;
    if truth.trim().is_empty() {
        return Err("field `reward_model.ground_truth`: empty".into());
    }
    if ability == Ability::Code {
        TestSpec::parse(truth).map_err(|e| {
            format!(
                "field `reward_model.ground_truth`: a code row needs a JSON test spec \
                 ({{\"inputs\": [...], \"outputs\": [...], \"fn_name\"?: ...}}): {e}"
            )
        })?;
    }
    Ok(ability)
}

/// A row that was refused: its file, its 0-based row index in that file (jsonl: among the
/// non-blank lines) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub file: PathBuf,
    pub row: usize,
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.row, self.reason)
    }
}

/// Why a reader refused a row, without the file and row the error also names.
fn reader_reason(error: &WorldError) -> String {
    match error {
        WorldError::Row { field, reason, .. } => format!("field `{field}`: {reason}"),
        WorldError::Json { line, source, .. } => format!("line {line}: not a data row: {source}"),
        other => other.to_string(),
    }
}

/// A row that passed validation, with where it came from.
#[derive(Debug, Clone)]
pub struct ValidRow {
    pub file: PathBuf,
    pub row: usize,
    pub ability: Ability,
    pub data: DataRow,
}

/// The rows of some files: those that passed validation, in file and row order, and those
/// refused, with how many rows the files hold in all.
#[derive(Debug, Clone, Default)]
pub struct ReadRows {
    pub rows: Vec<ValidRow>,
    pub bad: Vec<BadRow>,
    pub read: usize,
}

impl ReadRows {
    /// Counts `bad` (`skip`) or stops with it (`fail`).
    fn refuse(&mut self, bad: BadRow, on_bad_row: OnBadRow) -> Result<()> {
        match on_bad_row {
            OnBadRow::Skip => {
                self.bad.push(bad);
                Ok(())
            }
            OnBadRow::Fail => Err(LearnerError::Data(format!(
                "{bad} (learner.data.on_bad_row = \"fail\"; \"skip\" skips and counts bad rows)"
            ))),
        }
    }
}

/// Reads every row of `files` (jsonl or parquet) and validates it ([`DataRow::check`], then
/// [`validate_row`]). A bad row is counted and named, or stops the read when `on_bad_row` is
/// `fail`; a file that cannot be read at all (missing, not parquet, a missing column) is
/// always an error.
pub fn read_valid_rows(files: &[PathBuf], on_bad_row: OnBadRow) -> Result<ReadRows> {
    let mut out = ReadRows::default();
    for file in files {
        let results = prime_world::read_row_results(file)?;
        out.read += results.len();
        for (row, result) in results.into_iter().enumerate() {
            let bad = |reason| BadRow {
                file: file.clone(),
                row,
                reason,
            };
            match result {
                Err(error) => out.refuse(bad(reader_reason(&error)), on_bad_row)?,
                Ok(data) => match validate_row(&data) {
                    Err(reason) => out.refuse(bad(reason), on_bad_row)?,
                    Ok(ability) => out.rows.push(ValidRow {
                        file: file.clone(),
                        row,
                        ability,
                        data,
                    }),
                },
            }
        }
    }
    Ok(out)
}

/// A kept row with its prompt ids.
#[derive(Debug, Clone)]
pub struct PreparedRow {
    pub ability: Ability,
    pub data: DataRow,
    /// Prompt ids, chat template applied; at most the length limit.
    pub prompt_ids: Vec<i64>,
}

/// Percentiles of prompt lengths in tokens (nearest rank), over every row tokenized: kept
/// and too long.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokens {
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
}

impl PromptTokens {
    /// The percentiles of `lengths` (all zero when there are none).
    pub fn of(mut lengths: Vec<usize>) -> Self {
        lengths.sort_unstable();
        let at = |p: usize| {
            if lengths.is_empty() {
                return 0;
            }
            let rank = (p * lengths.len()).div_ceil(100).max(1);
            lengths[rank - 1]
        };
        Self {
            p50: at(50),
            p90: at(90),
            p99: at(99),
            max: lengths.last().copied().unwrap_or(0),
        }
    }
}

/// Bad rows: how many, and the first [`SHOWN_BAD_ROWS`] as `file:row: reason`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRows {
    pub count: usize,
    pub first: Vec<String>,
}

/// What preparing some files gave: `rows = kept + too_long + bad.count`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    /// Rows in the files.
    pub rows: usize,
    /// Rows kept: valid, and the prompt within the length limit.
    pub kept: usize,
    /// Valid rows dropped because the prompt is over the length limit.
    pub too_long: usize,
    /// Rows refused as bad.
    pub bad: BadRows,
    /// Kept rows per ability.
    pub by_ability: BTreeMap<String, usize>,
    /// Kept rows per `data_source`.
    pub by_source: BTreeMap<String, usize>,
    /// Prompt lengths of the valid rows (kept and too long).
    pub prompt_tokens: PromptTokens,
    /// Seconds reading, validating and tokenizing took.
    pub seconds: f64,
}

/// `name count, name count, ...`, or `-` for none.
fn counts(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl DataSummary {
    /// The summary as printed: one figure a line, then the bad rows shown. `max_prompt_tokens`
    /// is the limit the rows were prepared with.
    pub fn lines(&self, max_prompt_tokens: usize) -> Vec<String> {
        let t = &self.prompt_tokens;
        let mut lines = vec![
            format!("rows read: {}", self.rows),
            format!("kept: {}", self.kept),
            format!("kept by ability: {}", counts(&self.by_ability)),
            format!("kept by data_source: {}", counts(&self.by_source)),
            format!(
                "dropped as too long: {} (prompt over {max_prompt_tokens} tokens)",
                self.too_long
            ),
            format!("bad rows: {}", self.bad.count),
            format!(
                "prompt tokens: p50 {} p90 {} p99 {} max {}",
                t.p50, t.p90, t.p99, t.max
            ),
            format!("seconds: {:.2}", self.seconds),
        ];
        if self.bad.count > 0 {
            lines.push(format!(
                "first {} of {} bad rows:",
                self.bad.first.len(),
                self.bad.count
            ));
            lines.extend(self.bad.first.iter().map(|b| format!("  {b}")));
        }
        lines
    }
}

/// Rows made ready to train or evaluate on, and their summary.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub rows: Vec<PreparedRow>,
    pub summary: DataSummary,
}

impl Prepared {
    /// The kept rows as scheduler prompts.
    pub fn prompts(&self) -> Vec<Prompt> {
        self.rows
            .iter()
            .map(|r| Prompt {
                prompt_ids: r.prompt_ids.clone(),
                ground_truth: r.data.reward_model.ground_truth.clone(),
                ability: r.ability,
                data_source: r.data.data_source.clone(),
                extra_info: r
                    .data
                    .extra_info
                    .as_ref()
                    .map(|info| serde_json::to_string(info).expect("extra_info serialises"))
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The kept rows as held-out problems.
    pub fn eval_problems(&self) -> Vec<EvalProblem> {
        self.rows
            .iter()
            .map(|r| EvalProblem {
                prompt_ids: r.prompt_ids.clone(),
                ground_truth: r.data.reward_model.ground_truth.clone(),
                ability: r.ability,
                data_source: r.data.data_source.clone(),
            })
            .collect()
    }
}

/// Reads, validates and tokenizes `files` (on all cores), dropping prompts over
/// `max_prompt_tokens`: every row is kept, too long or bad, and counted in the summary. A
/// row the chat template or tokenizer refuses is a bad row too; a tokenizer without a usable
/// chat template is an error.
pub fn prepare(
    files: &[PathBuf],
    tokenizer: &Tokenizer,
    max_prompt_tokens: usize,
    on_bad_row: OnBadRow,
) -> Result<Prepared> {
    let clock = Instant::now();
    tokenizer.check_chat_template()?;
    let mut read = read_valid_rows(files, on_bad_row)?;
    let data: Vec<DataRow> = read.rows.iter().map(|r| r.data.clone()).collect();
    let encoded = encode_prompts(&data, tokenizer);
    let mut rows = Vec::with_capacity(read.rows.len());
    let mut lengths = Vec::with_capacity(read.rows.len());
    let mut too_long = 0;
    let valid = std::mem::take(&mut read.rows);
    for (valid, ids) in valid.into_iter().zip(encoded) {
        let ids = match ids {
            Ok(ids) => ids,
            Err(e) => {
                let bad = BadRow {
                    file: valid.file,
                    row: valid.row,
                    reason: format!("the prompt cannot be tokenized: {e}"),
                };
                read.refuse(bad, on_bad_row)?;
                continue;
            }
        };
        lengths.push(ids.len());
        if ids.len() > max_prompt_tokens {
            too_long += 1;
            continue;
        }
        rows.push(PreparedRow {
            ability: valid.ability,
            data: valid.data,
            prompt_ids: ids,
        });
    }
    // Reading and tokenizing find bad rows in two passes: name them in file and row order.
    let order: BTreeMap<&Path, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.as_path(), i))
        .collect();
    read.bad
        .sort_by_key(|b| (order.get(b.file.as_path()).copied(), b.row));
    let mut by_ability = BTreeMap::new();
    let mut by_source = BTreeMap::new();
    for row in &rows {
        *by_ability
            .entry(ability_name(row.ability).to_string())
            .or_insert(0) += 1;
        *by_source.entry(row.data.data_source.clone()).or_insert(0) += 1;
    }
    let summary = DataSummary {
        rows: read.read,
        kept: rows.len(),
        too_long,
        bad: BadRows {
            count: read.bad.len(),
            first: read
                .bad
                .iter()
                .take(SHOWN_BAD_ROWS)
                .map(ToString::to_string)
                .collect(),
        },
        by_ability,
        by_source,
        prompt_tokens: PromptTokens::of(lengths),
        seconds: clock.elapsed().as_secs_f64(),
    };
    debug_assert_eq!(
        summary.rows,
        summary.kept + summary.too_long + summary.bad.count
    );
    Ok(Prepared { rows, summary })
}

/// [`prepare`] with a run's `[learner.data]` settings.
pub fn prepare_with(
    files: &[PathBuf],
    tokenizer: &Tokenizer,
    config: &DataConfig,
) -> Result<Prepared> {
    prepare(
        files,
        tokenizer,
        config.max_prompt_tokens,
        config.on_bad_row,
    )
}

/// The data summaries of a run's start, saved as [`DATA_SUMMARY_FILE`] in the run dir.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunData {
    /// The prompt length limit both were prepared with.
    pub max_prompt_tokens: usize,
    /// The training prompts.
    pub train: DataSummary,
    /// The held-out prompts.
    pub heldout: DataSummary,
}

impl RunData {
    /// Both summaries as printed, each under its heading.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec!["training data:".to_string()];
        lines.extend(
            self.train
                .lines(self.max_prompt_tokens)
                .into_iter()
                .map(|l| format!("  {l}")),
        );
        lines.push("held-out data:".to_string());
        lines.extend(
            self.heldout
                .lines(self.max_prompt_tokens)
                .into_iter()
                .map(|l| format!("  {l}")),
        );
        lines
    }

    /// Writes the summaries to `run_dir`'s [`DATA_SUMMARY_FILE`].
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join(DATA_SUMMARY_FILE);
        let text = serde_json::to_string_pretty(self).expect("a data summary serialises") + "\n";
        std::fs::write(&path, text).map_err(LearnerError::io(&path))
    }

    /// Reads `run_dir`'s [`DATA_SUMMARY_FILE`].
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(DATA_SUMMARY_FILE);
        let text = std::fs::read_to_string(&path).map_err(LearnerError::io(&path))?;
        serde_json::from_str(&text)
            .map_err(|e| LearnerError::Data(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ability: &str, question: &str, truth: &str) -> DataRow {
        serde_json::from_value(serde_json::json!({
            "data_source": "numina_olympiads",
            "prompt": [
                {"role": "system", "content": "Think."},
                {"role": "user", "content": question},
            ],
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": truth},
        }))
        .unwrap()
    }

    const SPEC: &str = r#"{"inputs": ["1 2\n"], "outputs": ["3\n"]}"#;

    #[test]
    fn math_and_code_rows_are_routed_by_ability() {
        assert_eq!(validate_row(&row("math", "1+1?", "2")), Ok(Ability::Math));
        assert_eq!(validate_row(&row("code", "Add.", SPEC)), Ok(Ability::Code));
        let call = r#"{"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}"#;
        assert_eq!(validate_row(&row("code", "Add.", call)), Ok(Ability::Code));
    }

    #[test]
    fn each_kind_of_bad_row_has_its_reason() {
        let cases = [
            (row("physics", "Q", "1"), "unknown ability \"physics\""),
            (row("Math", "Q", "1"), "unknown ability \"Math\""),
            (row("math", "  \n", "1"), "empty prompt"),
            (row("math", "Q", " "), "`reward_model.ground_truth`: empty"),
            (row("code", "Q", "print(3)"), "needs a JSON test spec"),
            (
                row("code", "Q", r#"{"inputs": ["1"], "outputs": []}"#),
                "1 inputs but 0 outputs",
            ),
            (
                row("code", "Q", r#"{"inputs": [], "outputs": []}"#),
                "no tests",
            ),
            (
                row(
                    "code",
                    "Q",
                    r#"{"inputs": [1], "outputs": [1], "fn_name": "a b"}"#,
                ),
                "is not an identifier",
            ),
        ];
        for (data, expected) in cases {
            let reason = validate_row(&data).unwrap_err();
            assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
        }
    }

    #[test]
    fn reader_errors_become_reasons_without_the_file() {
        let error = WorldError::Row {
            path: "x.jsonl".into(),
            row: 3,
            field: "prompt[0].role".into(),
            reason: "unknown role \"robot\"".into(),
        };
        assert_eq!(
            reader_reason(&error),
            "field `prompt[0].role`: unknown role \"robot\""
        );
        let json = serde_json::from_str::<DataRow>("{oops").unwrap_err();
        let error = WorldError::Json {
            path: "x.jsonl".into(),
            line: 4,
            source: json,
        };
        assert!(reader_reason(&error).starts_with("line 4: not a data row: "));
        let bad = BadRow {
            file: "data/x.jsonl".into(),
            row: 3,
            reason: "field `ability`: empty".into(),
        };
        assert_eq!(bad.to_string(), "data/x.jsonl:3: field `ability`: empty");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        assert_eq!(PromptTokens::of(Vec::new()), PromptTokens::default());
        let t = PromptTokens::of((1..=100).rev().collect());
        assert_eq!((t.p50, t.p90, t.p99, t.max), (50, 90, 99, 100));
        let t = PromptTokens::of(vec![7, 3]);
        assert_eq!((t.p50, t.p90, t.p99, t.max), (3, 7, 7, 7));
    }

    #[test]
    fn a_bad_row_is_counted_or_stops_the_read() {
        let bad = BadRow {
            file: "a.jsonl".into(),
            row: 2,
            reason: "field `ability`: empty".into(),
        };
        let mut read = ReadRows::default();
        read.refuse(bad.clone(), OnBadRow::Skip).unwrap();
        assert_eq!(read.bad, vec![bad.clone()]);
        let message = read.refuse(bad, OnBadRow::Fail).unwrap_err().to_string();
        assert!(
            message.contains("a.jsonl:2: field `ability`: empty")
                && message.contains("on_bad_row = \"fail\""),
            "{message}"
        );
    }

    #[test]
    fn the_printed_summary_has_every_figure() {
        let summary = DataSummary {
            rows: 10,
            kept: 6,
            too_long: 1,
            bad: BadRows {
                count: 3,
                first: vec!["a.jsonl:1: x".into()],
            },
            by_ability: [("code".to_string(), 2), ("math".to_string(), 4)].into(),
            by_source: [("s".to_string(), 6)].into(),
            prompt_tokens: PromptTokens {
                p50: 5,
                p90: 9,
                p99: 11,
                max: 12,
            },
            seconds: 0.5,
        };
        assert_eq!(
            summary.lines(11),
            vec![
                "rows read: 10",
                "kept: 6",
                "kept by ability: code 2, math 4",
                "kept by data_source: s 6",
                "dropped as too long: 1 (prompt over 11 tokens)",
                "bad rows: 3",
                "prompt tokens: p50 5 p90 9 p99 11 max 12",
                "seconds: 0.50",
                "first 1 of 3 bad rows:",
                "  a.jsonl:1: x",
            ]
        );
    }
}
