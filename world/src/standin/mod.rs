//! A full-size synthetic stand-in for Eurus-2-RL-Data (prime-spec 9.1): the same files,
//! columns, prompts and row counts, with lengths like the real set's, made in seconds and
//! without a download, so the paper's data path can be rehearsed end to end.
//!
//! ```text
//! OUT/data/train.parquet        482,000 rows: 94.5% math, 5.5% code, 1 bad row in 10,000
//! OUT/data/validation.parquet   2,048 rows: half math, half code, no bad rows
//! OUT/tokenizer/                byte-level BPE (Qwen2 pre-tokenizer and special tokens), ChatML
//! OUT/standin.json              the settings and what was written
//! ```
//!
//! - Every prompt is the real system message ([`SYSTEM_PROMPT`]) and a user message with the
//!   real suffix ([`MATH_SUFFIX`], [`CODE_SUFFIX`]).
//! - A **math** question is one of the world's arithmetic word problems (1 to 5 operations)
//!   after a seeded filler story with no numbers in it; the ground truth is the problem's
//!   answer, so a response is graded for real. The question's length follows
//!   [`MATH_QUESTION_TOKENS`] (median 78 tokens, 97.5% between 20 and 300).
//! - A **code** statement is a story, a small programming task of one of
//!   [`code::TASK_FAMILIES`] families, its input and output sections, examples and sometimes a
//!   note, with lengths following [`CODE_STATEMENT_TOKENS`] (200 to 2,000 tokens, median 450),
//!   so some prompts pass 1,024 tokens. The ground truth is a JSON test spec: stdin/stdout
//!   for CodeContests and Codeforces rows and half of the APPS and TACO rows, call-based
//!   (`fn_name`) for the other half. Each task has a Python reference solution
//!   ([`StandinRow::reference`], not written to the files) that passes its tests.
//! - One training row in [`BAD_ROW_EVERY`] is bad in one of the ways of [`Fault`], in turn,
//!   so a run's skip-and-count path has work to do.
//!
//! Row `i` of a split depends only on the seed, the split and `i` (its own ChaCha8 stream), so
//! rows are made in parallel and the files are byte-identical for the same settings however
//! many threads make them.

pub mod code;
pub mod filler;

use std::path::{Path, PathBuf};
use std::time::Instant;

use parquet::basic::Compression;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::ParquetRowWriter;
use crate::rows::{CODE_SUFFIX, SYSTEM_PROMPT};
use crate::tokenizer::{render_chatml, save_tokenizer, split_special_tokens, train_tokenizer};
use crate::{
    ChatMessage, DataRow, ExtraInfo, ProblemGenerator, RewardModel, WorldConfig, WorldError,
    MATH_SUFFIX,
};
use code::{draw_task, CodeForm, Headings};
use filler::{estimate_tokens, narrative, Flavour};

/// Training rows by default: Eurus-2-RL-Data's train split has 482,019.
pub const TRAIN_ROWS: usize = 482_000;
/// Validation rows by default, as in Eurus-2-RL-Data.
pub const VALIDATION_ROWS: usize = 2_048;
/// Code rows per thousand training rows (the real set: 26,758 of 482,019).
pub const CODE_PER_MILLE: usize = 55;
/// One training row in this many is bad: rows `i` with `i % BAD_ROW_EVERY == BAD_ROW_OFFSET`.
pub const BAD_ROW_EVERY: usize = 10_000;
/// Where in each block of [`BAD_ROW_EVERY`] rows the bad row sits.
pub const BAD_ROW_OFFSET: usize = 4_321;
/// Tokenizer vocabulary limit, special tokens and the 256 byte symbols included; a model's
/// embedding is padded past it (Qwen2.5-Math-7B's has 152,064 rows).
pub const TOKENIZER_VOCAB: usize = 4_096;
/// About how many training rows the tokenizer is trained on (every k-th row).
pub const TOKENIZER_SAMPLE_ROWS: usize = 20_000;
/// Rows made and written at a time.
const CHUNK_ROWS: usize = 16_384;

/// A piecewise-linear quantile function: (probability in millionths, tokens) pairs, drawn
/// with integer arithmetic only, so every platform draws the same lengths.
pub type Quantiles = [(u32, u32)];

/// Token lengths of a math question (the part before the suffix). NuminaMath questions are
/// mostly a few sentences; a few are long.
pub const MATH_QUESTION_TOKENS: &Quantiles = &[
    (0, 18),
    (100_000, 30),
    (250_000, 46),
    (500_000, 78),
    (750_000, 125),
    (900_000, 190),
    (950_000, 245),
    (980_000, 320),
    (995_000, 480),
    (1_000_000, 1_000),
];

/// Token lengths of a code statement (the part before the suffix): contest statements run
/// from a short paragraph to a few pages; with the system prompt about 7% of the prompts pass
/// 1,024 tokens.
pub const CODE_STATEMENT_TOKENS: &Quantiles = &[
    (0, 200),
    (100_000, 260),
    (250_000, 330),
    (500_000, 450),
    (750_000, 600),
    (900_000, 760),
    (950_000, 900),
    (990_000, 1_400),
    (1_000_000, 2_000),
];

/// `data_source` of math rows and their weights (per thousand): the real set's sources, not
/// its proportions.
const MATH_SOURCES: [(&str, u32); 6] = [
    ("numina_cn_k12", 300),
    ("numina_synthetic_math", 250),
    ("numina_olympiads", 200),
    ("numina_aops_forum", 100),
    ("numina_synthetic_amc", 100),
    ("numina_amc_aime", 50),
];

/// `data_source` of code rows and their weights (per thousand).
const CODE_SOURCES: [(&str, u32); 4] = [
    ("taco", 400),
    ("codecontests", 250),
    ("apps", 200),
    ("codeforces", 150),
];

/// Settings of the stand-in (`prime world --standin`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandinConfig {
    /// Seed of every random choice; the same settings give byte-identical files.
    pub seed: u64,
    /// Rows of `train.parquet`.
    pub train_rows: usize,
    /// Rows of `validation.parquet` (half math, half code).
    pub validation_rows: usize,
}

impl Default for StandinConfig {
    fn default() -> Self {
        StandinConfig {
            seed: 0,
            train_rows: TRAIN_ROWS,
            validation_rows: VALIDATION_ROWS,
        }
    }
}

/// The two files of the stand-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StandinSplit {
    Train,
    Validation,
}

impl StandinSplit {
    /// The name used for the file and `extra_info.split`.
    pub fn name(self) -> &'static str {
        match self {
            StandinSplit::Train => "train",
            StandinSplit::Validation => "validation",
        }
    }

    fn rows(self, cfg: &StandinConfig) -> usize {
        match self {
            StandinSplit::Train => cfg.train_rows,
            StandinSplit::Validation => cfg.validation_rows,
        }
    }

    /// Whether row `index` is a code row: spread evenly, [`CODE_PER_MILLE`] in training
    /// (exactly `floor(n * 55 / 1000)` of the first `n` rows), every other row in validation.
    pub fn is_code(self, index: usize) -> bool {
        match self {
            StandinSplit::Train => {
                (index + 1) * CODE_PER_MILLE / 1000 > index * CODE_PER_MILLE / 1000
            }
            StandinSplit::Validation => index % 2 == 1,
        }
    }

    /// Which fault row `index` has, if it is a bad row (training only).
    pub fn fault(self, index: usize) -> Option<Fault> {
        (self == StandinSplit::Train && index % BAD_ROW_EVERY == BAD_ROW_OFFSET)
            .then(|| Fault::ALL[(index / BAD_ROW_EVERY) % Fault::ALL.len()])
    }
}

/// The ways a bad row is bad, each refused by a reader or by the learner's validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// `reward_model.ground_truth` is empty.
    EmptyGroundTruth,
    /// The system message's role is `narrator`.
    UnknownRole,
    /// `ability` is `physics`.
    UnknownAbility,
    /// A code row whose ground truth is prose, not a JSON test spec.
    NotATestSpec,
}

impl Fault {
    /// The faults, in the order bad rows take them.
    pub const ALL: [Fault; 4] = [
        Fault::EmptyGroundTruth,
        Fault::UnknownRole,
        Fault::UnknownAbility,
        Fault::NotATestSpec,
    ];

    fn apply(self, row: &mut DataRow) {
        match self {
            Fault::EmptyGroundTruth => row.reward_model.ground_truth.clear(),
            Fault::UnknownRole => row.prompt[0].role = "narrator".into(),
            Fault::UnknownAbility => row.ability = "physics".into(),
            Fault::NotATestSpec => {
                row.ability = "code".into();
                row.reward_model.ground_truth = "the tests are the examples above".into();
            }
        }
    }
}

/// What a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    Math,
    Code(CodeForm),
    Bad(Fault),
}

/// One generated row and what grades it.
#[derive(Clone, Debug, PartialEq)]
pub struct StandinRow {
    pub row: DataRow,
    pub kind: RowKind,
    /// A response that earns full marks: the worked solution ending in `\boxed{answer}`
    /// (math) or the reference program in a ```python fence (code).
    pub reference: String,
    /// Code rows: which task family (see [`code::TASK_FAMILIES`]).
    pub family: Option<usize>,
}

/// The ChaCha8 generator of row `index` of `split`: its own key, so rows are independent.
fn row_rng(seed: u64, split: StandinSplit, index: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(split as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(index as u64).to_le_bytes());
    key[24..].copy_from_slice(b"standin\0");
    ChaCha8Rng::from_seed(key)
}

/// A length drawn from `quantiles` (linear between the points).
pub fn draw_length(rng: &mut ChaCha8Rng, quantiles: &Quantiles) -> usize {
    let u = rng.gen_range(0..1_000_000u32);
    let upper = quantiles
        .iter()
        .position(|&(p, _)| p > u)
        .unwrap_or(quantiles.len() - 1);
    let (p0, t0) = quantiles[upper - 1];
    let (p1, t1) = quantiles[upper];
    let span = u64::from(p1 - p0).max(1);
    (u64::from(t0) + u64::from(t1 - t0) * u64::from(u - p0) / span) as usize
}

fn weighted<'a>(rng: &mut ChaCha8Rng, choices: &[(&'a str, u32)]) -> &'a str {
    let total: u32 = choices.iter().map(|(_, w)| w).sum();
    let mut u = rng.gen_range(0..total);
    for &(name, weight) in choices {
        if u < weight {
            return name;
        }
        u -= weight;
    }
    unreachable!("u < total")
}

fn eurus_row(
    data_source: &str,
    ability: &str,
    user: String,
    ground_truth: String,
    split: StandinSplit,
    index: usize,
) -> DataRow {
    DataRow {
        data_source: data_source.to_string(),
        prompt: vec![
            ChatMessage::new("system", SYSTEM_PROMPT),
            ChatMessage::new("user", user),
        ],
        ability: ability.to_string(),
        reward_model: RewardModel {
            style: "rule".into(),
            ground_truth,
        },
        extra_info: Some(ExtraInfo {
            split: split.name().to_string(),
            index: index as i64,
            num_ops: None,
            template: None,
            other: Default::default(),
        }),
        response: None,
    }
}

/// A math row: filler story, then an arithmetic word problem of 1 to 5 operations.
fn math_row(rng: &mut ChaCha8Rng, split: StandinSplit, index: usize) -> StandinRow {
    let mut problem_rng = rng.clone();
    problem_rng.set_stream(1);
    let problem = ProblemGenerator::new(&WorldConfig::default(), problem_rng).generate_in(1, 5);
    let target = draw_length(rng, MATH_QUESTION_TOKENS);
    let story = narrative(
        rng,
        Flavour::Everyday,
        target.saturating_sub(estimate_tokens(&problem.question)),
    );
    let question = if story.is_empty() {
        problem.question.clone()
    } else {
        format!("{story} {}", problem.question)
    };
    let source = weighted(rng, &MATH_SOURCES);
    StandinRow {
        row: eurus_row(
            source,
            "math",
            format!("{question}{MATH_SUFFIX}"),
            problem.answer.clone(),
            split,
            index,
        ),
        kind: RowKind::Math,
        reference: problem.solution,
        family: None,
    }
}

/// A code row: story, task, and sometimes a note, to the drawn length.
fn code_row(rng: &mut ChaCha8Rng, split: StandinSplit, index: usize) -> StandinRow {
    let source = weighted(rng, &CODE_SOURCES);
    let (form, headings) = match source {
        "apps" | "taco" => {
            let form = if rng.gen_bool(0.5) {
                CodeForm::Stdin
            } else {
                CodeForm::Call
            };
            (form, Headings::Dashes)
        }
        _ => (CodeForm::Stdin, Headings::Plain),
    };
    let task = draw_task(rng, form, headings);
    let target = draw_length(rng, CODE_STATEMENT_TOKENS);
    let filler = target.saturating_sub(estimate_tokens(&task.body));
    // Long statements explain themselves in a note too.
    let note_tokens = if filler > 150 { filler / 4 } else { 0 };
    let story = narrative(rng, Flavour::Contest, filler - note_tokens);
    let mut statement = format!("{story}\n\n{}", task.body);
    if note_tokens > 0 {
        statement.push_str("\n\n");
        statement.push_str(&headings_note(headings));
        statement.push_str(&narrative(rng, Flavour::Contest, note_tokens));
    }
    StandinRow {
        row: eurus_row(
            source,
            "code",
            format!("{statement}{CODE_SUFFIX}"),
            task.tests,
            split,
            index,
        ),
        kind: RowKind::Code(form),
        reference: format!("```python\n{}```", task.reference),
        family: Some(task.family),
    }
}

fn headings_note(headings: Headings) -> String {
    match headings {
        Headings::Dashes => "-----Note-----\n".into(),
        Headings::Plain => "Note\n\n".into(),
    }
}

/// Row `index` of `split` for `seed`.
pub fn standin_row(seed: u64, split: StandinSplit, index: usize) -> StandinRow {
    let mut rng = row_rng(seed, split, index);
    let mut row = if split.is_code(index) {
        code_row(&mut rng, split, index)
    } else {
        math_row(&mut rng, split, index)
    };
    if let Some(fault) = split.fault(index) {
        fault.apply(&mut row.row);
        row.kind = RowKind::Bad(fault);
    }
    row
}

/// Rows of each kind in one file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub rows: usize,
    pub math: usize,
    /// Code rows with stdin/stdout tests.
    pub code_stdin: usize,
    /// Code rows with call-based (`fn_name`) tests.
    pub code_call: usize,
    /// Bad rows (a math or code row with one [`Fault`]).
    pub bad: usize,
}

impl SplitCounts {
    fn add(&mut self, kind: RowKind) {
        self.rows += 1;
        match kind {
            RowKind::Math => self.math += 1,
            RowKind::Code(CodeForm::Stdin) => self.code_stdin += 1,
            RowKind::Code(CodeForm::Call) => self.code_call += 1,
            RowKind::Bad(_) => self.bad += 1,
        }
    }
}

/// What [`build_standin`] wrote (also saved as `standin.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandinStats {
    pub config: StandinConfig,
    pub train: SplitCounts,
    pub validation: SplitCounts,
    /// Vocabulary size of the trained tokenizer, special tokens included.
    pub vocab_size: usize,
    /// Training rows the tokenizer was trained on.
    pub tokenizer_sample_rows: usize,
}

/// Where everything went.
#[derive(Clone, Debug, PartialEq)]
pub struct StandinFiles {
    pub root: PathBuf,
    pub train: PathBuf,
    pub validation: PathBuf,
    /// The directory to give `--tokenizer` or `AutoTokenizer.from_pretrained`.
    pub tokenizer_dir: PathBuf,
    /// `standin.json`.
    pub stats_file: PathBuf,
    pub stats: StandinStats,
}

impl StandinFiles {
    /// The layout under `root` (see the module docs).
    pub fn layout(root: &Path, stats: StandinStats) -> Self {
        StandinFiles {
            root: root.to_path_buf(),
            train: root.join("data").join("train.parquet"),
            validation: root.join("data").join("validation.parquet"),
            tokenizer_dir: root.join("tokenizer"),
            stats_file: root.join("standin.json"),
            stats,
        }
    }
}

/// A step of [`build_standin`], for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Rows of a split made and written (`done` of `total`).
    Rows(StandinSplit),
    /// The tokenizer trained and saved (`total` is 1).
    Tokenizer,
}

/// Writes the stand-in into `out_dir` (see the module docs for the layout), replacing what is
/// there. `progress(stage, done, total)` is called after each chunk of rows and at the end of
/// each stage.
pub fn build_standin(
    cfg: &StandinConfig,
    out_dir: &Path,
    progress: &(dyn Fn(Stage, usize, usize) + Sync),
) -> Result<StandinFiles, WorldError> {
    if cfg.train_rows == 0 {
        return Err(WorldError::Config(
            "the stand-in needs at least one training row (its tokenizer is trained on them)"
                .into(),
        ));
    }
    let mut files = StandinFiles::layout(
        out_dir,
        StandinStats {
            config: cfg.clone(),
            ..StandinStats::default()
        },
    );
    let data_dir = out_dir.join("data");
    std::fs::create_dir_all(&data_dir).map_err(|e| WorldError::io(&data_dir, e))?;

    let every = (cfg.train_rows / TOKENIZER_SAMPLE_ROWS).max(1);
    let mut sample = Vec::new();
    let started = Instant::now();
    files.stats.train = write_split(cfg, StandinSplit::Train, &files.train, progress, |row| {
        if row
            .row
            .extra_info
            .as_ref()
            .map(|e| e.index as usize % every)
            == Some(0)
        {
            // The system message once, not once a row: seen twice or more, each of its words
            // becomes a token (81 tokens in all), where Qwen2's tokenizer splits the rare
            // ones ("[ASSESS]", "[SYNTHESIZE]") into several (about 140); seen once, 168.
            let messages = if sample.is_empty() {
                &row.row.prompt[..]
            } else {
                &row.row.prompt[1..]
            };
            sample.push(render_chatml(messages, true));
        }
    })?;
    files.stats.validation = write_split(
        cfg,
        StandinSplit::Validation,
        &files.validation,
        progress,
        |_| {},
    )?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        train = files.stats.train.rows,
        validation = files.stats.validation.rows,
        "wrote the stand-in's rows"
    );

    let started = Instant::now();
    let tokenizer = train_tokenizer(
        sample.iter().flat_map(|text| split_special_tokens(text)),
        TOKENIZER_VOCAB,
    )?;
    save_tokenizer(&tokenizer, &files.tokenizer_dir)?;
    files.stats.vocab_size = tokenizer.get_vocab_size(true);
    files.stats.tokenizer_sample_rows = sample.len();
    progress(Stage::Tokenizer, 1, 1);
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        vocab_size = files.stats.vocab_size,
        sample_rows = sample.len(),
        "trained the stand-in's tokenizer"
    );

    let text = serde_json::to_string_pretty(&files.stats)
        .map_err(|e| WorldError::io(&files.stats_file, e.into()))?;
    std::fs::write(&files.stats_file, text + "\n")
        .map_err(|e| WorldError::io(&files.stats_file, e))?;
    Ok(files)
}

/// Makes the rows of `split` chunk by chunk on all cores and writes them in order; `visit`
/// sees every row.
fn write_split(
    cfg: &StandinConfig,
    split: StandinSplit,
    path: &Path,
    progress: &(dyn Fn(Stage, usize, usize) + Sync),
    mut visit: impl FnMut(&StandinRow),
) -> Result<SplitCounts, WorldError> {
    let total = split.rows(cfg);
    let mut writer = ParquetRowWriter::create(path, Compression::SNAPPY)?;
    let mut counts = SplitCounts::default();
    let mut start = 0;
    while start < total {
        let end = (start + CHUNK_ROWS).min(total);
        let rows: Vec<StandinRow> = (start..end)
            .into_par_iter()
            .map(|i| standin_row(cfg.seed, split, i))
            .collect();
        let data: Vec<DataRow> = rows
            .into_iter()
            .map(|row| {
                counts.add(row.kind);
                visit(&row);
                row.row
            })
            .collect();
        writer.write(&data)?;
        // Progress in the log too (bars are hidden off a terminal): every quarter.
        if end * 4 / total > start * 4 / total {
            tracing::info!(
                split = split.name(),
                rows = end,
                of = total,
                "stand-in rows written"
            );
        }
        start = end;
        progress(Stage::Rows(split), end, total);
    }
    writer.close()?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_rows_are_spread_evenly_at_the_rate() {
        let code = (0..482_000)
            .filter(|&i| StandinSplit::Train.is_code(i))
            .count();
        assert_eq!(code, 482_000 * 55 / 1000);
        let first: Vec<usize> = (0..60)
            .filter(|&i| StandinSplit::Train.is_code(i))
            .collect();
        assert_eq!(first, vec![18, 36, 54]);
        assert!(StandinSplit::Validation.is_code(1) && !StandinSplit::Validation.is_code(2));
    }

    #[test]
    fn bad_rows_take_the_faults_in_turn() {
        let bad: Vec<(usize, Fault)> = (0..48_000)
            .filter_map(|i| StandinSplit::Train.fault(i).map(|f| (i, f)))
            .collect();
        assert_eq!(
            bad,
            vec![
                (4_321, Fault::EmptyGroundTruth),
                (14_321, Fault::UnknownRole),
                (24_321, Fault::UnknownAbility),
                (34_321, Fault::NotATestSpec),
                (44_321, Fault::EmptyGroundTruth),
            ]
        );
        assert!((0..10_000).all(|i| StandinSplit::Validation.fault(i).is_none()));
    }

    #[test]
    fn lengths_follow_the_quantiles() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut draws: Vec<usize> = (0..20_000)
            .map(|_| draw_length(&mut rng, MATH_QUESTION_TOKENS))
            .collect();
        draws.sort_unstable();
        let at = |q: usize| draws[q * draws.len() / 1000];
        assert!((18..=1000).contains(&draws[0]) && *draws.last().unwrap() <= 1000);
        // Median 78, 90th percentile 190 (the table's points), within sampling noise.
        assert!((74..=82).contains(&at(500)), "{}", at(500));
        assert!((180..=200).contains(&at(900)), "{}", at(900));
    }
}
