//! `prime eval`: the evaluation protocol (spec §8.4) on Eurus-schema data, and Best-of-N with
//! an implicit PRM.
//!
//! * Accuracy: k samples per problem at the protocol's temperature and top-p, graded by the
//!   verifier, averaged (avg@k), with pass@k, maj@k (plain majority vote over the k extracted
//!   answers) and greedy accuracy; per `data_source` and overall.
//! * Best-of-N (`--bon N --prm URL`): on the same N samples per problem, for n = 1, 2, 4, ...,
//!   N, the accuracy of the PRM's pick among the first n, of the PRM-weighted vote, of the plain
//!   majority vote, of a random pick (its expectation: the mean of the first n) and pass@n.
//!
//! Everything is deterministic for a seed: the samples come from one seeded sampling call.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prime_model::{CausalLm, SamplingParams, Tokenizer};
use prime_proto::v1 as pb;
use prime_world::DataRow;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use prime_prm_server::scorer::{Pair, Scorer};
use prime_prm_server::steps::{self, Aggregation, StepSplit};
use prime_prm_server::vote::{self, Voting};

use super::{sample_and_grade, Sampling};
use crate::checkpoint::{latest, sft_checkpoint};
use crate::config::RunConfig;
use crate::data::{read_valid_rows, to_chat};
use crate::error::{LearnerError, Result};
use crate::plot::{line_chart, Series};

/// Name of the row that sums up every data source.
pub const OVERALL: &str = "overall";

/// How to evaluate. The defaults are the protocol of spec §8.4 as the maintainers re-ran it:
/// temperature 0.3, top-p 0.95, avg@16, plus greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Samples per problem.
    pub k: usize,
    /// Sampling temperature of the k samples.
    pub temperature: f64,
    /// Nucleus sampling of the k samples.
    pub top_p: f64,
    /// Longest response; clipped to the model's positions left after the longest prompt.
    pub max_new_tokens: usize,
    /// Also decode greedily once per problem.
    pub greedy: bool,
    /// Evaluate the first `limit` problems only.
    pub limit: Option<usize>,
    /// Seeds the sampler.
    pub seed: u64,
    /// Sequences decoding at once.
    pub batch_rows: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            k: 16,
            temperature: 0.3,
            top_p: 0.95,
            max_new_tokens: 8192,
            greedy: true,
            limit: None,
            seed: 0,
            batch_rows: 64,
        }
    }
}

/// Best-of-N with a PRM server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BonConfig {
    /// Largest N (at most the samples per problem).
    pub n: usize,
    /// The PRM server's gRPC URL.
    pub prm_url: String,
    /// Shared token of the PRM server.
    #[serde(skip)]
    pub token: Option<String>,
    /// How step scores become a candidate's score.
    pub aggregation: Aggregation,
    /// Step split asked of the server ("" for its default).
    pub step_split: String,
    /// Deadline of one BestOfN call.
    pub timeout_secs: f64,
}

/// One graded sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Problem index in the evaluated rows.
    pub problem: usize,
    /// Sample index within the problem; `None` for the greedy decode.
    pub sample: Option<usize>,
    /// The response text (special tokens skipped).
    pub text: String,
    /// The response's token ids (EOS included when it stopped).
    pub token_ids: Vec<i64>,
    /// Whether it stopped by itself (else it hit the length limit).
    pub stopped: bool,
    /// The extracted math answer, if any.
    pub answer: Option<String>,
    /// Verifier score in [0, 1].
    pub score: f64,
    /// The PRM's aggregated score, with `--bon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prm_score: Option<f32>,
}

/// Accuracy of one data source (or of all: [`OVERALL`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceAccuracy {
    /// `data_source`, or `overall`.
    pub data_source: String,
    /// Problems evaluated.
    pub problems: usize,
    /// Mean score over the k samples of every problem.
    pub avg_at_k: f64,
    /// Share of problems with at least one fully correct sample among the k.
    pub pass_at_k: f64,
    /// Mean score of the plain majority vote's pick among the k.
    pub maj_at_k: f64,
    /// Mean score of the greedy decodes.
    pub greedy: Option<f64>,
}

/// Selection accuracies among the first n samples of every problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Candidates per problem.
    pub n: usize,
    /// The PRM's best-scored candidate (with `--bon`).
    pub best_of_n: Option<f64>,
    /// The PRM-weighted vote (with `--bon`).
    pub weighted_vote: Option<f64>,
    /// Plain majority vote (equal counts: the answer seen first).
    pub majority_vote: f64,
    /// A uniformly random candidate, in expectation.
    pub random_pick: f64,
    /// At least one fully correct candidate.
    pub pass_at_n: f64,
}

/// What `prime eval` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The evaluated model directory.
    pub model: String,
    /// The data file(s).
    pub data: String,
    /// Settings.
    pub config: EvalConfig,
    /// The response limit actually used.
    pub max_new_tokens_used: usize,
    /// Problems skipped because their prompt left no room to answer.
    pub skipped_problems: usize,
    /// Per data source, then overall.
    pub accuracy: Vec<SourceAccuracy>,
    /// Selection accuracy against the number of candidates (n = 1, 2, 4, ..., k).
    pub curve: Vec<CurvePoint>,
    /// Best-of-N settings, when used.
    pub bon: Option<BonConfig>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// The samples behind a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The figures.
    pub report: EvalReport,
    /// Every graded sample, greedy ones included.
    pub samples: Vec<Sample>,
}

/// A problem ready to sample.
struct Problem {
    prompt_ids: Vec<i64>,
    row: DataRow,
}

/// Grades responses: math in process, code in the verifier's sandbox (created on first use).
struct Grading {
    grader: Option<prime_verifier::Grader>,
}

impl Grading {
    fn grade(&mut self, row: &DataRow, text: &str) -> (f64, Option<String>) {
        if row.ability == "math" {
            let verdict = prime_verifier::math::grade_math(text, &row.reward_model.ground_truth);
            return (verdict.score(), verdict.extracted);
        }
        let grader = self
            .grader
            .get_or_insert_with(|| prime_verifier::Grader::new(Default::default()));
        let ability = (row.ability == "code").then_some(prime_verifier::Ability::Code);
        let result = grader.grade_now(&prime_verifier::GradeItem {
            id: String::new(),
            ability,
            response: text.to_string(),
            ground_truth: row.reward_model.ground_truth.clone(),
        });
        (result.score, None)
    }
}

/// Where Best-of-N gets its PRM scores.
#[derive(Debug, Clone, Copy)]
pub enum PrmScoring<'a> {
    /// No PRM: accuracy, majority vote, random pick and pass@N only.
    None,
    /// A PRM server (`BonConfig::prm_url`).
    Server(&'a BonConfig),
    /// A PRM in this process, steps split by the tokenizer.
    Local {
        /// Settings (`prm_url` is only a label here).
        bon: &'a BonConfig,
        /// The PRM and its reference.
        scorer: &'a Scorer,
        /// Tokenizer for the step split.
        tokenizer: &'a Tokenizer,
    },
}

impl<'a> PrmScoring<'a> {
    fn bon(&self) -> Option<&'a BonConfig> {
        match *self {
            PrmScoring::None => None,
            PrmScoring::Server(bon) | PrmScoring::Local { bon, .. } => Some(bon),
        }
    }
}

/// Evaluates the model in `model_dir` on `rows` (`data` names them in the report); with
/// `bon`, also Best-of-N through the PRM server.
pub fn evaluate(
    model_dir: &Path,
    data: &str,
    rows: &[DataRow],
    config: &EvalConfig,
    bon: Option<&BonConfig>,
    device: Device,
    kind: Kind,
) -> Result<Evaluation> {
    let lm = CausalLm::load(model_dir, device, kind, kind)?;
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let prm = bon.map_or(PrmScoring::None, PrmScoring::Server);
    evaluate_loaded(
        &lm,
        &tokenizer,
        &model_dir.display().to_string(),
        data,
        rows,
        config,
        prm,
    )
}

/// [`evaluate`] with a loaded model and tokenizer.
pub fn evaluate_loaded(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    model: &str,
    data: &str,
    rows: &[DataRow],
    config: &EvalConfig,
    prm: PrmScoring<'_>,
) -> Result<Evaluation> {
    let started = Instant::now();
    let bon = prm.bon();
    let _guard = tch::no_grad_guard();
    let k = config.k.max(bon.map_or(1, |b| b.n)).max(1);
    let rows = &rows[..config.limit.unwrap_or(rows.len()).min(rows.len())];
    if rows.is_empty() {
        return Err(LearnerError::Data("no problems to evaluate".into()));
    }
    let max_positions = lm.config.max_position_embeddings as usize;
    let mut problems = Vec::new();
    let mut skipped = 0;
    for row in rows {
        let prompt_ids = tokenizer.encode_chat(&to_chat(row), true)?;
        // A prompt that leaves fewer than 8 positions to answer in is not a fair question.
        if prompt_ids.len() + 8 > max_positions {
            skipped += 1;
            continue;
        }
        problems.push(Problem {
            prompt_ids,
            row: row.clone(),
        });
    }
    if problems.is_empty() {
        return Err(LearnerError::Data(format!(
            "every prompt is too long for the model's {max_positions} positions"
        )));
    }
    let longest = problems
        .iter()
        .map(|p| p.prompt_ids.len())
        .max()
        .unwrap_or(0);
    let max_new = config.max_new_tokens.min(max_positions - longest).max(1);
    let params = SamplingParams {
        max_new_tokens: max_new,
        temperature: config.temperature,
        top_p: config.top_p,
        top_k: 0,
        seed: Some(config.seed),
        stop_token_ids: lm.eos_token_ids(),
    };
    let mut grading = Grading { grader: None };
    let mut samples =
        sample_and_grade_rows(lm, tokenizer, &problems, k, &params, config, &mut grading)?;
    if config.greedy {
        let greedy = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            ..params.clone()
        };
        let mut decoded =
            sample_and_grade_rows(lm, tokenizer, &problems, 1, &greedy, config, &mut grading)?;
        for s in &mut decoded {
            s.sample = None;
        }
        samples.extend(decoded);
    }
    match prm {
        PrmScoring::None => {}
        PrmScoring::Server(bon) => score_with_server(&problems, &mut samples, bon)?,
        PrmScoring::Local {
            bon,
            scorer,
            tokenizer,
        } => score_locally(&problems, &mut samples, bon, scorer, tokenizer)?,
    }
    let sources: Vec<&str> = problems
        .iter()
        .map(|p| p.row.data_source.as_str())
        .collect();
    let accuracy = accuracy_table(&sources, &samples, k);
    let curve = selection_curve(problems.len(), &samples, k, bon.is_some());
    let report = EvalReport {
        model: model.to_string(),
        data: data.to_string(),
        config: EvalConfig {
            k,
            ..config.clone()
        },
        max_new_tokens_used: max_new,
        skipped_problems: skipped,
        accuracy,
        curve,
        bon: bon.cloned(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(Evaluation { report, samples })
}

/// `per_problem` samples of every problem in one seeded sampling call (`batch_rows`
/// decoding at once), decoded and graded.
fn sample_and_grade_rows(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    per_problem: usize,
    params: &SamplingParams,
    config: &EvalConfig,
    grading: &mut Grading,
) -> Result<Vec<Sample>> {
    let sampling = Sampling {
        params: params.clone(),
        call_rows: usize::MAX,
        decode_rows: config.batch_rows.max(1),
        kv_budget: prime_model::KvBudget::device_default(lm.model.device()),
    };
    let graded = sample_and_grade(
        lm,
        tokenizer,
        problems,
        |p| &p.prompt_ids,
        per_problem,
        &sampling,
        |problem, text| Ok(grading.grade(&problem.row, text)),
    )?;
    Ok(graded
        .into_iter()
        .map(|g| {
            let (score, answer) = g.grade;
            Sample {
                problem: g.problem,
                sample: Some(g.sample),
                stopped: g.generation.finish_reason == prime_model::FinishReason::Stop,
                token_ids: g.generation.token_ids,
                answer,
                text: g.text,
                score,
                prm_score: None,
            }
        })
        .collect())
}

/// Asks the PRM server to score the first N samples of every problem (one BestOfN call per
/// problem) and stores each candidate's aggregated score.
fn score_with_server(problems: &[Problem], samples: &mut [Sample], bon: &BonConfig) -> Result<()> {
    use prime_proto::client::{lazy_channel, prm_client, request, with_deadline};
    let timeout = Duration::from_secs_f64(bon.timeout_secs.max(0.001));
    let aggregation = match bon.aggregation {
        Aggregation::Min => pb::Aggregation::Min,
        Aggregation::Sum => pb::Aggregation::Sum,
        Aggregation::Mean => pb::Aggregation::Mean,
        Aggregation::Last => pb::Aggregation::Last,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LearnerError::io("tokio runtime"))?;
    runtime.block_on(async {
        let channel = lazy_channel("prm-server", &bon.prm_url, timeout, bon.token.as_deref())?;
        let mut client = prm_client(channel);
        for (index, problem) in problems.iter().enumerate() {
            let mine: Vec<&mut Sample> = samples
                .iter_mut()
                .filter(|s| s.problem == index && s.sample.is_some_and(|i| i < bon.n))
                .collect();
            // Our own extracted answers go along, so the server's voting and ours agree.
            let candidates: Vec<pb::Candidate> = mine
                .iter()
                .map(|s| pb::Candidate {
                    response_ids: s.token_ids.clone(),
                    step_ends: Vec::new(),
                    answer: s.answer.clone().unwrap_or_default(),
                })
                .collect();
            let message = pb::BestOfNRequest {
                prompt_ids: problem.prompt_ids.clone(),
                candidates,
                aggregation: aggregation as i32,
                voting: pb::Voting::None as i32,
                step_split: bon.step_split.clone(),
            };
            let reply = with_deadline(
                "PrmServer",
                "BestOfN",
                timeout,
                client.best_of_n(request(message, timeout)),
            )
            .await?
            .into_inner();
            if reply.scores.len() != mine.len() {
                return Err(LearnerError::Rpc(format!(
                    "BestOfN answered {} scores for {} candidates",
                    reply.scores.len(),
                    mine.len()
                )));
            }
            for (sample, score) in mine.into_iter().zip(reply.scores) {
                sample.prm_score = Some(score);
            }
        }
        Ok(())
    })
}

/// Scores the first N samples of every problem with a PRM in this process, split into steps
/// by `bon.step_split` (default "lines") and aggregated by `bon.aggregation`.
fn score_locally(
    problems: &[Problem],
    samples: &mut [Sample],
    bon: &BonConfig,
    scorer: &Scorer,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let split: StepSplit = if bon.step_split.is_empty() {
        "lines".parse()?
    } else {
        bon.step_split.parse()?
    };
    let chosen: Vec<usize> = (0..samples.len())
        .filter(|&i| {
            samples[i].sample.is_some_and(|j| j < bon.n) && !samples[i].token_ids.is_empty()
        })
        .collect();
    let pairs: Vec<Pair> = chosen
        .iter()
        .map(|&i| Pair {
            prompt_ids: problems[samples[i].problem].prompt_ids.clone(),
            response_ids: samples[i].token_ids.clone(),
        })
        .collect();
    let rewards = scorer.token_rewards(&pairs)?;
    for (&i, token_rewards) in chosen.iter().zip(rewards) {
        let ends = steps::step_ends(tokenizer, &samples[i].token_ids, &split)?;
        let score = bon
            .aggregation
            .apply(&steps::step_scores(&token_rewards, &ends));
        samples[i].prm_score = Some(score);
    }
    Ok(())
}

/// Per-source and overall accuracy from graded samples (`k` per problem, greedy ones marked
/// by `sample: None`). `sources[p]` is problem p's data source.
pub fn accuracy_table(sources: &[&str], samples: &[Sample], k: usize) -> Vec<SourceAccuracy> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (p, source) in sources.iter().enumerate() {
        groups.entry(source).or_default().push(p);
    }
    let mut by_problem: Vec<Vec<&Sample>> = vec![Vec::new(); sources.len()];
    let mut greedy: Vec<Option<f64>> = vec![None; sources.len()];
    for s in samples {
        match s.sample {
            Some(i) if i < k => by_problem[s.problem].push(s),
            Some(_) => {}
            None => greedy[s.problem] = Some(s.score),
        }
    }
    for list in &mut by_problem {
        list.sort_by_key(|s| s.sample);
    }
    let row = |name: &str, members: &[usize]| {
        let count = members.len().max(1) as f64;
        let mean = |f: &dyn Fn(usize) -> f64| members.iter().map(|&p| f(p)).sum::<f64>() / count;
        let has_greedy = members.iter().all(|&p| greedy[p].is_some()) && !members.is_empty();
        SourceAccuracy {
            data_source: name.to_string(),
            problems: members.len(),
            avg_at_k: mean(&|p| {
                let list = &by_problem[p];
                list.iter().map(|s| s.score).sum::<f64>() / list.len().max(1) as f64
            }),
            pass_at_k: mean(&|p| f64::from(u8::from(by_problem[p].iter().any(|s| s.score >= 1.0)))),
            maj_at_k: mean(&|p| majority_score(&by_problem[p])),
            greedy: has_greedy.then(|| mean(&|p| greedy[p].unwrap_or(0.0))),
        }
    };
    let mut table: Vec<SourceAccuracy> = groups.iter().map(|(name, m)| row(name, m)).collect();
    let all: Vec<usize> = (0..sources.len()).collect();
    table.push(row(OVERALL, &all));
    table
}

/// The score of the plain majority vote's pick (0 when no sample states an answer).
fn majority_score(samples: &[&Sample]) -> f64 {
    let answers: Vec<Option<String>> = samples.iter().map(|s| s.answer.clone()).collect();
    vote::majority_pick(&answers).map_or(0.0, |i| samples[i].score)
}

/// Selection accuracies among the first n samples, for n = 1, 2, 4, ... and k.
pub fn selection_curve(
    problems: usize,
    samples: &[Sample],
    k: usize,
    with_prm: bool,
) -> Vec<CurvePoint> {
    let mut by_problem: Vec<Vec<&Sample>> = vec![Vec::new(); problems];
    for s in samples {
        if let Some(i) = s.sample {
            if i < k {
                by_problem[s.problem].push(s);
            }
        }
    }
    for list in &mut by_problem {
        list.sort_by_key(|s| s.sample);
    }
    let mut ns: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2))
        .take_while(|&n| n < k)
        .collect();
    ns.push(k);
    let count = problems.max(1) as f64;
    ns.into_iter()
        .map(|n| {
            let mean = |f: &dyn Fn(&[&Sample]) -> f64| {
                by_problem
                    .iter()
                    .map(|list| f(&list[..n.min(list.len())]))
                    .sum::<f64>()
                    / count
            };
            let prm_pick = |voting: Voting| {
                mean(&|list| {
                    let scores: Vec<f32> =
                        list.iter().map(|s| s.prm_score.unwrap_or(0.0)).collect();
                    let answers: Vec<Option<String>> =
                        list.iter().map(|s| s.answer.clone()).collect();
                    vote::rank(&scores, &answers, voting)
                        .first()
                        .map_or(0.0, |&i| list[i].score)
                })
            };
            CurvePoint {
                n,
                best_of_n: with_prm.then(|| prm_pick(Voting::None)),
                weighted_vote: with_prm.then(|| prm_pick(Voting::Weighted)),
                majority_vote: mean(&majority_score),
                random_pick: mean(&|list| {
                    list.iter().map(|s| s.score).sum::<f64>() / list.len().max(1) as f64
                }),
                pass_at_n: mean(&|list| f64::from(u8::from(list.iter().any(|s| s.score >= 1.0)))),
            }
        })
        .collect()
}

fn percent(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

impl EvalReport {
    /// The results as terminal tables (accuracy per source, then the selection curve).
    pub fn table(&self) -> String {
        let k = self.config.k;
        let mut out = format!(
            "{} on {} (k={k}, T={}, top-p {}, max {} new tokens, seed {})\n",
            self.model,
            self.data,
            self.config.temperature,
            self.config.top_p,
            self.max_new_tokens_used,
            self.config.seed
        );
        let width = self
            .accuracy
            .iter()
            .map(|a| a.data_source.len())
            .max()
            .unwrap_or(0)
            .max("data_source".len());
        out += &format!(
            "{:<width$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}\n",
            "data_source",
            "problems",
            format!("avg@{k}"),
            format!("maj@{k}"),
            format!("pass@{k}"),
            "greedy"
        );
        for a in &self.accuracy {
            out += &format!(
                "{:<width$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}\n",
                a.data_source,
                a.problems,
                percent(a.avg_at_k),
                percent(a.maj_at_k),
                percent(a.pass_at_k),
                a.greedy.map_or("-".into(), percent)
            );
        }
        out += &format!(
            "\n{:>4}  {:>10}  {:>13}  {:>13}  {:>11}  {:>8}\n",
            "N", "best-of-N", "weighted vote", "majority vote", "random pick", "pass@N"
        );
        let dash = |x: Option<f64>| x.map_or("-".into(), percent);
        for p in &self.curve {
            out += &format!(
                "{:>4}  {:>10}  {:>13}  {:>13}  {:>11}  {:>8}\n",
                p.n,
                dash(p.best_of_n),
                dash(p.weighted_vote),
                percent(p.majority_vote),
                percent(p.random_pick),
                percent(p.pass_at_n)
            );
        }
        out
    }

    /// Draws accuracy against N (the selection curve) into a PNG.
    pub fn plot(&self, path: &Path) -> Result<()> {
        let points = |f: &dyn Fn(&CurvePoint) -> Option<f64>| -> Vec<(f64, f64)> {
            self.curve
                .iter()
                .filter_map(|p| f(p).map(|y| ((p.n as f64).log2(), 100.0 * y)))
                .collect()
        };
        let series = [
            ("best-of-N (PRM)", points(&|p| p.best_of_n)),
            ("PRM-weighted vote", points(&|p| p.weighted_vote)),
            ("majority vote", points(&|p| Some(p.majority_vote))),
            ("random pick", points(&|p| Some(p.random_pick))),
            ("pass@N", points(&|p| Some(p.pass_at_n))),
        ];
        let series: Vec<Series<'_>> = series
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(name, p)| Series { name, points: p })
            .collect();
        line_chart(
            path,
            &format!("accuracy against N ({})", self.model),
            "log2 N (candidates per problem)",
            "accuracy (%)",
            &series,
        )
        .map_err(|e| LearnerError::Plot(e.to_string()))
    }
}

impl Evaluation {
    /// Writes `report.json`, `samples.jsonl` and `accuracy_vs_n.png` into `dir`; returns the
    /// paths written. A plot that cannot be drawn (no font) is logged, not fatal.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(LearnerError::io(dir))?;
        let report = dir.join("report.json");
        let json = serde_json::to_string_pretty(&self.report)
            .map_err(|e| LearnerError::Data(format!("report: {e}")))?;
        std::fs::write(&report, json + "\n").map_err(LearnerError::io(&report))?;
        let samples = dir.join("samples.jsonl");
        let mut text = String::new();
        for s in &self.samples {
            text += &serde_json::to_string(s)
                .map_err(|e| LearnerError::Data(format!("sample: {e}")))?;
            text.push('\n');
        }
        std::fs::write(&samples, text).map_err(LearnerError::io(&samples))?;
        let mut written = vec![report, samples];
        let plot = dir.join("accuracy_vs_n.png");
        match self.report.plot(&plot) {
            Ok(()) => written.push(plot),
            Err(e) => tracing::warn!(error = %e, "no accuracy plot"),
        }
        Ok(written)
    }
}

/// Samples per problem (and Best-of-N's largest N) of the evaluation at the end of a run.
pub const RUN_EVAL_SAMPLES: usize = 4;

/// The evaluation that ends a training run: its start and final policies on the held-out set.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEvaluation {
    /// The start checkpoint's figures.
    pub start: EvalReport,
    /// The final checkpoint's figures.
    pub last: EvalReport,
    /// Where both reports, their samples and plots were written (`eval/start`, `eval/final`).
    pub dir: PathBuf,
}

impl RunEvaluation {
    /// Start against final, overall: avg@k, maj@k, pass@k, greedy and the final PRM's
    /// Best-of-N at the largest N.
    pub fn table(&self) -> String {
        let overall = |r: &EvalReport| {
            r.accuracy
                .iter()
                .find(|a| a.data_source == OVERALL)
                .cloned()
                .expect("an overall row")
        };
        let bon = |r: &EvalReport| r.curve.last().and_then(|p| p.best_of_n);
        let k = self.start.config.k;
        let mut out = format!(
            "held-out evaluation ({} problems, k={k}, T={}; details in {}):\n{:<8}  {:>7}  {:>7}  {:>7}  {:>7}  {:>12}\n",
            overall(&self.start).problems,
            self.start.config.temperature,
            self.dir.display(),
            "policy",
            format!("avg@{k}"),
            format!("maj@{k}"),
            format!("pass@{k}"),
            "greedy",
            format!("PRM best-of-{k}"),
        );
        for (name, r) in [("start", &self.start), ("final", &self.last)] {
            let a = overall(r);
            out += &format!(
                "{name:<8}  {:>7}  {:>7}  {:>7}  {:>7}  {:>12}\n",
                percent(a.avg_at_k),
                percent(a.maj_at_k),
                percent(a.pass_at_k),
                a.greedy.map_or("-".into(), percent),
                bon(r).map_or("-".into(), percent)
            );
        }
        out
    }
}

/// Evaluates a finished run's start policy (`model.path`, else the warm-up checkpoint) and its
/// final policy (the latest checkpoint) on its held-out problems (`learner.eval.problems` of
/// them, at `learner.eval.temperature`, [`RUN_EVAL_SAMPLES`] samples each plus greedy), and
/// ranks each one's samples with the run's final implicit PRM (Best-of-N, steps split at
/// lines, min aggregation). Writes `eval/start` and `eval/final` in the run dir.
pub fn evaluate_run(config: &RunConfig, run_dir: &Path, device: Device) -> Result<RunEvaluation> {
    let learner = &config.learner;
    let start_dir = config
        .model
        .path
        .clone()
        .unwrap_or_else(|| sft_checkpoint(run_dir));
    let root = run_dir.join("checkpoints");
    let last = latest(&root)?
        .ok_or_else(|| LearnerError::Data(format!("no checkpoint in {}", root.display())))?;
    let files = if learner.data.heldout_files.is_empty() {
        let world = prime_world::build_world(&config.world, &run_dir.join("world"))?;
        vec![world.heldout.parquet.clone()]
    } else {
        learner.data.heldout_files.clone()
    };
    // Bad rows are skipped (and counted) or fatal as they were when the run started.
    let read = read_valid_rows(&files, learner.data.on_bad_row)?;
    if !read.bad.is_empty() {
        tracing::warn!(
            bad = read.bad.len(),
            first = %read.bad[0],
            "held-out rows skipped as bad"
        );
    }
    let rows: Vec<DataRow> = read.rows.into_iter().map(|r| r.data).collect();
    let data = files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let kind = prime_model::default_kind(device);
    let scorer = Scorer::new(
        CausalLm::load(&last.join("prm"), device, kind, kind)?,
        CausalLm::load(&start_dir, device, kind, kind)?,
        learner.algo.prm.beta,
        16384,
    )?;
    let eval_config = EvalConfig {
        k: RUN_EVAL_SAMPLES,
        temperature: learner.eval.temperature,
        top_p: 1.0,
        max_new_tokens: learner.rollout.max_response_tokens,
        greedy: true,
        limit: Some(learner.eval.problems),
        seed: learner.seed,
        batch_rows: 256,
    };
    let bon = BonConfig {
        n: RUN_EVAL_SAMPLES,
        prm_url: format!("local:{}", last.join("prm").display()),
        token: None,
        aggregation: Aggregation::Min,
        step_split: "lines".into(),
        timeout_secs: 0.0,
    };
    let dir = run_dir.join("eval");
    let mut reports = Vec::new();
    for (name, model_dir) in [("start", start_dir.clone()), ("final", last.join("policy"))] {
        let lm = CausalLm::load(&model_dir, device, kind, kind)?;
        let tokenizer = Tokenizer::from_dir(&model_dir)?;
        let prm = PrmScoring::Local {
            bon: &bon,
            scorer: &scorer,
            tokenizer: &tokenizer,
        };
        let label = model_dir.display().to_string();
        let evaluation = evaluate_loaded(&lm, &tokenizer, &label, &data, &rows, &eval_config, prm)?;
        evaluation.write(&dir.join(name))?;
        tracing::info!(name, seconds = evaluation.report.seconds, "evaluated");
        reports.push(evaluation.report);
    }
    let last = reports.pop().expect("two reports");
    let start = reports.pop().expect("two reports");
    Ok(RunEvaluation { start, last, dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(problem: usize, sample: Option<usize>, answer: &str, score: f64, prm: f32) -> Sample {
        Sample {
            problem,
            sample,
            text: String::new(),
            token_ids: Vec::new(),
            stopped: true,
            answer: (!answer.is_empty()).then(|| answer.to_string()),
            score,
            prm_score: Some(prm),
        }
    }

    /// Two problems of two sources, 4 samples each, and a greedy decode each.
    fn samples() -> Vec<Sample> {
        vec![
            // Problem 0 (answer 5): the majority says 3, the PRM prefers sample 2.
            sample(0, Some(0), "3", 0.0, 0.1),
            sample(0, Some(1), "3", 0.0, -0.2),
            sample(0, Some(2), "5", 1.0, 0.9),
            sample(0, Some(3), "", 0.0, 0.3),
            sample(0, None, "5", 1.0, 0.0),
            // Problem 1 (answer 7): 7 and 8 tie 2-2, 7 first; the PRM prefers the 8s.
            sample(1, Some(0), "7", 1.0, -1.0),
            sample(1, Some(1), "8", 0.0, 0.5),
            sample(1, Some(2), "8", 0.0, 0.4),
            sample(1, Some(3), "7", 1.0, 0.2),
            sample(1, None, "8", 0.0, 0.0),
        ]
    }

    #[test]
    fn accuracy_table_by_hand() {
        let table = accuracy_table(&["a", "b"], &samples(), 4);
        let names: Vec<&str> = table.iter().map(|r| r.data_source.as_str()).collect();
        assert_eq!(names, ["a", "b", OVERALL]);
        let a = &table[0];
        assert_eq!(
            (a.avg_at_k, a.pass_at_k, a.maj_at_k, a.greedy),
            (0.25, 1.0, 0.0, Some(1.0))
        );
        let b = &table[1];
        assert_eq!(
            (b.avg_at_k, b.pass_at_k, b.maj_at_k, b.greedy),
            (0.5, 1.0, 1.0, Some(0.0))
        );
        let all = &table[2];
        assert_eq!(all.problems, 2);
        assert_eq!(
            (all.avg_at_k, all.pass_at_k, all.maj_at_k, all.greedy),
            (0.375, 1.0, 0.5, Some(0.5))
        );
    }

    #[test]
    fn selection_curve_by_hand() {
        let curve = selection_curve(2, &samples(), 4, true);
        let ns: Vec<usize> = curve.iter().map(|p| p.n).collect();
        assert_eq!(ns, [1, 2, 4]);
        // n = 1: every method takes sample 0: wrong, right.
        assert_eq!(curve[0].best_of_n, Some(0.5));
        assert_eq!(
            (
                curve[0].majority_vote,
                curve[0].random_pick,
                curve[0].pass_at_n
            ),
            (0.5, 0.5, 0.5)
        );
        // n = 2: PRM picks 0 (0.1 > -0.2) and 8 (0.5); majority 3 and 7 (tie, first seen).
        let p = &curve[1];
        assert_eq!(
            (p.best_of_n, p.majority_vote, p.random_pick, p.pass_at_n),
            (Some(0.0), 0.5, 0.25, 0.5)
        );
        // n = 4: PRM picks 5 (right) and 8 (wrong); majority 3 (wrong) and 7 (tie, first
        // seen: right); weighted: σ(.1)+σ(-.2) = 0.975 for 3 against σ(.9) = 0.711 for 5,
        // and σ(.5)+σ(.4) = 1.221 for 8 against σ(-1)+σ(.2) = 0.819 for 7.
        let p = &curve[2];
        assert_eq!(p.best_of_n, Some(0.5));
        assert_eq!(p.weighted_vote, Some(0.0));
        assert_eq!(
            (p.majority_vote, p.random_pick, p.pass_at_n),
            (0.5, 0.375, 1.0)
        );
        let without = selection_curve(2, &samples(), 4, false);
        assert!(without
            .iter()
            .all(|p| p.best_of_n.is_none() && p.weighted_vote.is_none()));
    }
}
