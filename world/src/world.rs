//! `build_world`: generates the splits, trains the tokenizer and writes everything with a
//! manifest that makes a second call with the same config a no-op.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dataset::{write_jsonl, write_parquet};
use crate::problem::{solution_text, teacher_steps};
use crate::tokenizer::{
    check_round_trip, encode, render_chatml, save_tokenizer, split_special_tokens, train_tokenizer,
    IM_END,
};
use crate::{ChatMessage, DataRow, Problem, ProblemGenerator, Split, WorldConfig, WorldError};

/// Bumped whenever the generator's output changes for a given config, so worlds written by
/// older code are rebuilt instead of reused.
pub const GENERATOR_VERSION: u32 = 1;

/// File name of the manifest at the root of a world directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The ChaCha stream of the flawed teacher's draws (the splits use streams 0 to 2).
const TEACHER_STREAM: u64 = 3;

/// The ChaCha stream of the step chosen for each probe case.
const PROBE_STREAM: u64 = 4;

/// Gives up on a split after this many draws per requested problem yield no new question.
const MAX_DRAWS_PER_PROBLEM: usize = 50;

/// The two files of one split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitFiles {
    pub jsonl: PathBuf,
    pub parquet: PathBuf,
}

/// Token counts of one split under the trained tokenizer. The prompt is the chat-rendered
/// prompt with the generation prompt (what the policy is conditioned on); the response is the
/// solution trace plus `<|im_end|>` (what supervised training learns to produce).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenStats {
    pub rows: usize,
    pub prompt_mean: f64,
    pub prompt_max: usize,
    /// Present for the supervised split only.
    pub response_mean: Option<f64>,
    pub response_max: Option<usize>,
    /// Prompt plus response, per row (supervised split only).
    pub total_mean: Option<f64>,
    pub total_max: Option<usize>,
}

/// What a flawed teacher did to the supervised split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TeacherStats {
    /// Multiplications in the supervised traces.
    pub multiplications: usize,
    /// Those where the error was possible (see [`crate::problem::teacher_steps`]).
    pub eligible: usize,
    /// Those written one copy short.
    pub flawed: usize,
    /// Share of supervised traces whose boxed answer is the true one (no error in them).
    pub traces_right: f64,
}

/// Figures about a built world, also stored in its manifest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorldStats {
    /// Vocabulary size of the trained tokenizer, special tokens included.
    pub vocab_size: usize,
    pub sft: TokenStats,
    pub rl: TokenStats,
    pub heldout: TokenStats,
    /// Present when the supervised traces come from a flawed teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherStats>,
}

/// Paths of everything [`build_world`] writes (all under the output directory), and the
/// world's token statistics.
///
/// ```text
/// OUT/manifest.json
/// OUT/data/{sft,rl,heldout}.{jsonl,parquet}
/// OUT/tokenizer/{tokenizer.json,tokenizer_config.json}
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct WorldFiles {
    pub root: PathBuf,
    pub manifest: PathBuf,
    pub sft: SplitFiles,
    pub rl: SplitFiles,
    pub heldout: SplitFiles,
    /// The directory to hand to a tokenizer loader (`AutoTokenizer.from_pretrained`).
    pub tokenizer_dir: PathBuf,
    pub tokenizer_json: PathBuf,
    pub tokenizer_config: PathBuf,
    pub stats: WorldStats,
    /// True when an existing, matching world was kept instead of rebuilt.
    pub reused: bool,
}

impl WorldFiles {
    /// The files of `split`.
    pub fn split(&self, split: Split) -> &SplitFiles {
        match split {
            Split::Sft => &self.sft,
            Split::Rl => &self.rl,
            Split::Heldout => &self.heldout,
        }
    }

    fn layout(root: &Path, stats: WorldStats, reused: bool) -> Self {
        let data = root.join("data");
        let split = |name: &str| SplitFiles {
            jsonl: data.join(format!("{name}.jsonl")),
            parquet: data.join(format!("{name}.parquet")),
        };
        let tokenizer_dir = root.join("tokenizer");
        WorldFiles {
            root: root.to_path_buf(),
            manifest: root.join(MANIFEST_FILE),
            sft: split("sft"),
            rl: split("rl"),
            heldout: split("heldout"),
            tokenizer_json: tokenizer_dir.join("tokenizer.json"),
            tokenizer_config: tokenizer_dir.join("tokenizer_config.json"),
            tokenizer_dir,
            stats,
            reused,
        }
    }

    /// Every written file except the manifest.
    fn outputs(&self) -> Vec<&Path> {
        let mut paths = Vec::new();
        for split in Split::ALL {
            let files = self.split(split);
            paths.push(files.jsonl.as_path());
            paths.push(files.parquet.as_path());
        }
        paths.push(&self.tokenizer_json);
        paths.push(&self.tokenizer_config);
        paths
    }
}

/// `manifest.json`: what was built from which config, with a SHA-256 per file.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    generator_version: u32,
    config: WorldConfig,
    /// Path relative to the world root -> hex SHA-256.
    files: BTreeMap<String, String>,
    stats: WorldStats,
}

/// The generator of `seed` on ChaCha stream `stream`.
fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Problems of every split, in [`Split::ALL`] order. No question text occurs twice, within or
/// across splits. Each split draws from its own ChaCha8 stream of `cfg.seed`, so resizing one
/// split changes another only where a question would have collided. With a flawed teacher the
/// supervised traces are the teacher's, its draws on a stream of their own: every question and
/// answer is the same as without it.
pub fn generate_problems(cfg: &WorldConfig) -> Result<Vec<(Split, Vec<Problem>)>, WorldError> {
    cfg.validate()?;
    let mut seen = HashSet::new();
    let mut splits = Vec::with_capacity(Split::ALL.len());
    for (stream, split) in Split::ALL.into_iter().enumerate() {
        let split_cfg = split.config(cfg);
        let mut generator = ProblemGenerator::new(cfg, stream_rng(cfg.seed, stream as u64));
        let mut problems = Vec::with_capacity(split_cfg.size);
        let max_draws = split_cfg.size.saturating_mul(MAX_DRAWS_PER_PROBLEM);
        let mut draws = 0;
        while problems.len() < split_cfg.size {
            if draws == max_draws {
                return Err(WorldError::Config(format!(
                    "{}: found only {} distinct problems in {draws} draws; the ranges are too narrow for {} problems",
                    split.name(),
                    problems.len(),
                    split_cfg.size
                )));
            }
            draws += 1;
            let problem = generator.generate_in(split_cfg.min_ops, split_cfg.max_ops);
            if seen.insert(problem.question.clone()) {
                problems.push(problem);
            }
        }
        if let (Split::Sft, Some(teacher)) = (split, &cfg.flawed_teacher) {
            let mut rng = stream_rng(cfg.seed, TEACHER_STREAM);
            problems = problems
                .into_iter()
                .map(|p| p.taught(|_| rng.gen_bool(teacher.rate)))
                .collect();
        }
        splits.push((split, problems));
    }
    Ok(splits)
}

/// Counts what the teacher did in `problems` (the supervised split).
fn teacher_stats(problems: &[Problem]) -> TeacherStats {
    let mut stats = TeacherStats::default();
    for problem in problems {
        stats.multiplications += problem
            .steps
            .iter()
            .filter(|s| s.op == crate::Op::Mul)
            .count();
        stats.eligible += eligible_steps(problem).len();
        stats.flawed += problem.flawed_steps.len();
    }
    let right = problems
        .iter()
        .filter(|p| p.flawed_steps.is_empty())
        .count();
    stats.traces_right = right as f64 / problems.len().max(1) as f64;
    stats
}

/// The steps of `problem` where the flawed teacher's error is possible on the true chain.
fn eligible_steps(problem: &Problem) -> Vec<usize> {
    let mut eligible = Vec::new();
    teacher_steps(&problem.steps, |i| {
        eligible.push(i);
        false
    });
    eligible
}

/// A held-out problem traced twice, for probing a step-level reward: right, and with the
/// flawed teacher's error at one step only (the steps before it are the same; the steps after
/// it carry on from the wrong value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeCase {
    /// Row index in the held-out split.
    pub index: usize,
    /// The prompt's chat messages, as the held-out row has them.
    pub prompt: Vec<ChatMessage>,
    /// The true trace.
    pub correct: String,
    /// The same trace with the error at `step`.
    pub flawed: String,
    /// The 0-based step (line) of the error.
    pub step: usize,
}

/// Up to `count` probe cases from the held-out split of `cfg`, in row order: each problem with
/// a multiplication where the error is possible, with the erroneous step drawn uniformly among
/// those (from the world's seed, on a stream of its own). Needs no flawed teacher in `cfg`.
pub fn probe_cases(cfg: &WorldConfig, count: usize) -> Result<Vec<ProbeCase>, WorldError> {
    let splits = generate_problems(cfg)?;
    let heldout = splits
        .iter()
        .find(|(split, _)| *split == Split::Heldout)
        .map(|(_, problems)| problems.as_slice())
        .unwrap_or_default();
    let mut rng = stream_rng(cfg.seed, PROBE_STREAM);
    let mut cases = Vec::with_capacity(count);
    for (index, problem) in heldout.iter().enumerate() {
        if cases.len() == count {
            break;
        }
        let eligible = eligible_steps(problem);
        if eligible.is_empty() {
            continue;
        }
        let step = eligible[rng.gen_range(0..eligible.len() as u32) as usize];
        let (flawed, _) = teacher_steps(&problem.steps, |i| i == step);
        cases.push(ProbeCase {
            index,
            prompt: DataRow::from_problem(problem, Split::Heldout, index, cfg).prompt,
            correct: solution_text(&problem.steps),
            flawed: solution_text(&flawed),
            step,
        });
    }
    Ok(cases)
}

/// Writes the whole world into `out_dir` (see [`WorldFiles`] for the layout): for a given
/// config the bytes are always the same. If `out_dir` already holds a world built from the
/// same config by the same generator version, with every file intact, it is kept and
/// returned with `reused = true`; otherwise everything is (re)written, manifest last.
pub fn build_world(cfg: &WorldConfig, out_dir: &Path) -> Result<WorldFiles, WorldError> {
    cfg.validate()?;
    if let Some(files) = reusable_world(cfg, out_dir)? {
        tracing::info!(dir = %out_dir.display(), "world already built with this config; keeping it");
        return Ok(files);
    }
    let manifest_path = out_dir.join(MANIFEST_FILE);
    match std::fs::remove_file(&manifest_path) {
        Ok(()) => {
            tracing::info!(dir = %out_dir.display(), "rebuilding world: config or files changed")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(WorldError::io(&manifest_path, e)),
    }

    let splits = generate_problems(cfg)?;
    let rows: Vec<(Split, Vec<DataRow>)> = splits
        .iter()
        .map(|(split, problems)| {
            let rows = problems
                .iter()
                .enumerate()
                .map(|(i, p)| DataRow::from_problem(p, *split, i, cfg))
                .collect();
            (*split, rows)
        })
        .collect();

    let mut files = WorldFiles::layout(out_dir, WorldStats::default(), false);
    let data_dir = out_dir.join("data");
    std::fs::create_dir_all(&data_dir).map_err(|e| WorldError::io(&data_dir, e))?;
    for (split, split_rows) in &rows {
        let files = files.split(*split);
        write_jsonl(&files.jsonl, split_rows)?;
        write_parquet(&files.parquet, split_rows)?;
        tracing::info!(split = split.name(), rows = split_rows.len(), "wrote split");
    }

    let training_texts: Vec<String> = rows
        .iter()
        .filter(|(split, _)| *split != Split::Heldout)
        .flat_map(|(_, rows)| rows.iter().map(conversation))
        .collect();
    let tokenizer = train_tokenizer(
        training_texts
            .iter()
            .flat_map(|text| split_special_tokens(text)),
        cfg.vocab_size,
    )?;
    save_tokenizer(&tokenizer, &files.tokenizer_dir)?;

    files.stats = WorldStats {
        vocab_size: tokenizer.get_vocab_size(true),
        sft: split_stats(&tokenizer, split_rows(&rows, Split::Sft))?,
        rl: split_stats(&tokenizer, split_rows(&rows, Split::Rl))?,
        heldout: split_stats(&tokenizer, split_rows(&rows, Split::Heldout))?,
        teacher: cfg.flawed_teacher.as_ref().map(|_| {
            teacher_stats(
                splits
                    .iter()
                    .find(|(split, _)| *split == Split::Sft)
                    .map(|(_, problems)| problems.as_slice())
                    .unwrap_or_default(),
            )
        }),
    };
    let stats = &files.stats;
    for (split, s) in [
        ("sft", &stats.sft),
        ("rl", &stats.rl),
        ("heldout", &stats.heldout),
    ] {
        tracing::info!(
            split,
            prompt_mean = s.prompt_mean,
            prompt_max = s.prompt_max,
            response_mean = s.response_mean,
            response_max = s.response_max,
            "token lengths"
        );
    }
    if let Some(teacher) = &stats.teacher {
        tracing::info!(
            multiplications = teacher.multiplications,
            eligible = teacher.eligible,
            flawed = teacher.flawed,
            traces_right = teacher.traces_right,
            "flawed teacher"
        );
    }

    let manifest = Manifest {
        generator_version: GENERATOR_VERSION,
        config: cfg.clone(),
        files: checksums(&files)?,
        stats: files.stats.clone(),
    };
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| WorldError::io(&files.manifest, e.into()))?;
    std::fs::write(&files.manifest, text).map_err(|e| WorldError::io(&files.manifest, e))?;
    Ok(files)
}

/// The whole conversation of a row as chat text: prompt, then the trace if it has one, else
/// the generation prompt alone.
fn conversation(row: &DataRow) -> String {
    let mut text = render_chatml(&row.prompt, true);
    if let Some(response) = &row.response {
        text.push_str(response);
        text.push_str(IM_END);
        text.push('\n');
    }
    text
}

fn split_rows(rows: &[(Split, Vec<DataRow>)], split: Split) -> &[DataRow] {
    rows.iter()
        .find(|(s, _)| *s == split)
        .map(|(_, rows)| rows.as_slice())
        .unwrap_or_default()
}

/// Measures token lengths and checks that every conversation round-trips exactly.
fn split_stats(
    tokenizer: &tokenizers::Tokenizer,
    rows: &[DataRow],
) -> Result<TokenStats, WorldError> {
    let mut prompts = Vec::with_capacity(rows.len());
    let mut responses = Vec::new();
    for row in rows {
        check_round_trip(tokenizer, &conversation(row))?;
        prompts.push(encode(tokenizer, &render_chatml(&row.prompt, true))?.len());
        if let Some(response) = &row.response {
            responses.push(encode(tokenizer, &format!("{response}{IM_END}"))?.len());
        }
    }
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    let has_responses = !responses.is_empty();
    let totals: Vec<usize> = prompts.iter().zip(&responses).map(|(p, r)| p + r).collect();
    Ok(TokenStats {
        rows: rows.len(),
        prompt_mean: mean(&prompts),
        prompt_max: prompts.iter().copied().max().unwrap_or(0),
        response_mean: has_responses.then(|| mean(&responses)),
        response_max: responses.iter().copied().max(),
        total_mean: has_responses.then(|| mean(&totals)),
        total_max: totals.iter().copied().max(),
    })
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

fn checksums(files: &WorldFiles) -> Result<BTreeMap<String, String>, WorldError> {
    files
        .outputs()
        .into_iter()
        .map(|path| Ok((relative(&files.root, path), sha256_file(path)?)))
        .collect()
}

fn sha256_file(path: &Path) -> Result<String, WorldError> {
    let bytes = std::fs::read(path).map_err(|e| WorldError::io(path, e))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The existing world in `out_dir` if its manifest matches `cfg` and every file's checksum.
fn reusable_world(cfg: &WorldConfig, out_dir: &Path) -> Result<Option<WorldFiles>, WorldError> {
    let path = out_dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WorldError::io(&path, e)),
    };
    let manifest: Manifest = match serde_json::from_str(&text) {
        Ok(manifest) => manifest,
        Err(source) => {
            tracing::warn!(error = %WorldError::Manifest { path: path.clone(), source }, "ignoring unreadable manifest");
            return Ok(None);
        }
    };
    if manifest.generator_version != GENERATOR_VERSION || manifest.config != *cfg {
        return Ok(None);
    }
    let files = WorldFiles::layout(out_dir, manifest.stats.clone(), true);
    for path in files.outputs() {
        let expected = manifest.files.get(&relative(out_dir, path));
        let intact = match std::fs::metadata(path) {
            Ok(_) => expected == Some(&sha256_file(path)?),
            Err(_) => false,
        };
        if !intact {
            tracing::info!(file = %path.display(), "world file missing or changed");
            return Ok(None);
        }
    }
    Ok(Some(files))
}
