//! Sampling and grading with the learner's own policy: the one sample → decode → grade loop
//! ([`sample_and_grade`]) behind the held-out evaluation of the trainer and of the warm-up,
//! the rollouts of a single-process run, and `prime eval` ([`protocol`]).
pub mod grading;
pub mod protocol;

pub use grading::{CodeGrading, Grading, ToGrade};

use std::collections::BTreeMap;
use std::time::Instant;

use prime_model::{
    generate_within, CausalLm, FinishReason, Generation, KvBudget, SamplingParams, Tokenizer,
};
use prime_verifier::Ability;
use serde::{Deserialize, Serialize};

use crate::batch::{ScoredGroup, ScoredResponse};
use crate::config::{EvalConfig, RolloutConfig};
use crate::data::{ability_name, EvalProblem};
use crate::error::{LearnerError, Result};
use crate::scheduler::{Group, Work};

/// Rows per sampling call of an evaluation: each call is seeded with the evaluation's seed
/// plus its index. The memory plan (crate::plan) counts them.
pub const EVAL_CALL_ROWS: usize = 256;

/// How a sampling run is cut into calls.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Temperature, nucleus, stop ids, length; `seed` seeds the first call.
    pub params: SamplingParams,
    /// Rows per sampling call; call `c` is seeded with `seed + c`.
    pub call_rows: usize,
    /// Rows decoding at once inside a call (continuous batching refills them), at most as
    /// many as `kv_budget` holds.
    pub decode_rows: usize,
    /// What each call's KV cache may take.
    pub kv_budget: KvBudget,
}

impl Sampling {
    /// Every row in one call, as many decoding at once as `kv_budget` holds.
    pub fn one_call(params: SamplingParams, kv_budget: KvBudget) -> Self {
        Self {
            params,
            call_rows: usize::MAX,
            decode_rows: usize::MAX,
            kv_budget,
        }
    }
}

/// One sampled, decoded and graded response.
#[derive(Debug, Clone)]
pub struct Graded<G> {
    /// Index of its problem.
    pub problem: usize,
    /// Which of the problem's samples.
    pub sample: usize,
    /// What the sampler returned.
    pub generation: Generation,
    /// The decoded response (special tokens skipped).
    pub text: String,
    /// The grader's verdict.
    pub grade: G,
}

/// The sample → decode → grade loop: `per_problem` responses to every problem's prompt
/// (`prompt_of`), sampled as `sampling` says, decoded and graded by `grade(problem, text)`.
/// Deterministic for a seed; results in problem order, samples of a problem together.
pub fn sample_and_grade<P, G>(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    problems: &[P],
    prompt_of: impl Fn(&P) -> &[i64],
    per_problem: usize,
    sampling: &Sampling,
    mut grade: impl FnMut(&P, &str) -> Result<G>,
) -> Result<Vec<Graded<G>>> {
    let _guard = tch::no_grad_guard();
    let rows: Vec<(usize, usize)> = (0..problems.len())
        .flat_map(|p| (0..per_problem).map(move |s| (p, s)))
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    for (call, chunk) in rows.chunks(sampling.call_rows.max(1)).enumerate() {
        let prompts: Vec<Vec<i64>> = chunk
            .iter()
            .map(|&(p, _)| prompt_of(&problems[p]).to_vec())
            .collect();
        let params = SamplingParams {
            seed: sampling.params.seed.map(|s| s.wrapping_add(call as u64)),
            ..sampling.params.clone()
        };
        let decode_rows = sampling.decode_rows.clamp(1, prompts.len().max(1));
        let generations = generate_within(
            &lm.model,
            &prompts,
            &params,
            decode_rows,
            sampling.kv_budget,
        )?;
        for (generation, &(problem, sample)) in generations.into_iter().zip(chunk) {
            let text = tokenizer.decode(&generation.token_ids, true)?;
            let grade = grade(&problems[problem], &text)?;
            out.push(Graded {
                problem,
                sample,
                generation,
                text,
                grade,
            });
        }
    }
    Ok(out)
}

/// What [`sample_and_grade_by_ability`] needs of a problem.
pub trait Gradable {
    /// The prompt, chat template applied.
    fn prompt_ids(&self) -> &[i64];
    /// Which grader scores its responses.
    fn ability(&self) -> Ability;
    /// The reference answer or JSON test spec.
    fn ground_truth(&self) -> &str;
}

impl Gradable for EvalProblem {
    fn prompt_ids(&self) -> &[i64] {
        &self.prompt_ids
    }
    fn ability(&self) -> Ability {
        self.ability
    }
    fn ground_truth(&self) -> &str {
        &self.ground_truth
    }
}

impl Gradable for Work {
    fn prompt_ids(&self) -> &[i64] {
        &self.prompt.prompt_ids
    }
    fn ability(&self) -> Ability {
        self.prompt.ability
    }
    fn ground_truth(&self) -> &str {
        &self.prompt.ground_truth
    }
}

/// [`sample_and_grade`] with the graders of [`Grading`]: every sample is graded by its
/// problem's ability, in one batch after sampling (one call to a Verifier service for code).
pub fn sample_and_grade_by_ability<P: Gradable>(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    problems: &[P],
    per_problem: usize,
    sampling: &Sampling,
    grading: &mut Grading,
) -> Result<Vec<Graded<f64>>> {
    let graded = sample_and_grade(
        lm,
        tokenizer,
        problems,
        P::prompt_ids,
        per_problem,
        sampling,
        |_, _| Ok(()),
    )?;
    let items: Vec<ToGrade<'_>> = graded
        .iter()
        .map(|g| ToGrade {
            ability: problems[g.problem].ability(),
            ground_truth: problems[g.problem].ground_truth(),
            response: &g.text,
        })
        .collect();
    let scores = grading.grade(&items)?;
    Ok(graded
        .into_iter()
        .zip(scores)
        .map(|(g, grade)| Graded {
            problem: g.problem,
            sample: g.sample,
            generation: g.generation,
            text: g.text,
            grade,
        })
        .collect())
}

/// Mean scores of held-out problems: overall, per ability and per data source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accuracy {
    /// Over every sample.
    pub overall: f64,
    /// Per ability (`math`, `code`).
    pub by_ability: BTreeMap<String, f64>,
    /// Per `data_source`.
    pub by_source: BTreeMap<String, f64>,
}

impl Accuracy {
    /// Means of `scores`, each a sample of `problems[index]`.
    pub fn of(problems: &[EvalProblem], scores: &[(usize, f64)]) -> Self {
        let mut by_ability: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut by_source: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for &(index, score) in scores {
            let problem = &problems[index];
            for (map, key) in [
                (&mut by_ability, ability_name(problem.ability)),
                (&mut by_source, problem.data_source.as_str()),
            ] {
                let entry = map.entry(key.to_string()).or_default();
                entry.0 += score;
                entry.1 += 1;
            }
        }
        let mean = |(sum, n): (f64, usize)| sum / n.max(1) as f64;
        let total: f64 = scores.iter().map(|(_, s)| s).sum();
        Self {
            overall: mean((total, scores.len())),
            by_ability: by_ability.into_iter().map(|(k, v)| (k, mean(v))).collect(),
            by_source: by_source.into_iter().map(|(k, v)| (k, mean(v))).collect(),
        }
    }
}

/// `samples` responses per problem, graded by ability (see [`Grading`]), with the KV cache
/// within `kv_budget`.
pub fn accuracy(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    problems: &[EvalProblem],
    samples: usize,
    params: &SamplingParams,
    kv_budget: KvBudget,
    grading: &mut Grading,
) -> Result<Accuracy> {
    let sampling = Sampling {
        params: params.clone(),
        call_rows: EVAL_CALL_ROWS,
        decode_rows: EVAL_CALL_ROWS,
        kv_budget,
    };
    let graded = sample_and_grade_by_ability(lm, tokenizer, problems, samples, &sampling, grading)?;
    let scored: Vec<(usize, f64)> = graded.iter().map(|g| (g.problem, g.grade)).collect();
    Ok(Accuracy::of(problems, &scored))
}

/// Held-out accuracy at one point of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean score over `samples` samples per problem at the configured temperature (math 0 or
    /// 1, code the share of tests passed).
    pub accuracy: f64,
    /// The same per ability (`math`, `code`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accuracy_by_ability: BTreeMap<String, f64>,
    /// The same per `data_source`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accuracy_by_source: BTreeMap<String, f64>,
    /// Correctness of greedy decoding, when configured.
    pub greedy_accuracy: Option<f64>,
    /// Problems evaluated.
    pub problems: usize,
    /// Seconds the evaluation took.
    pub seconds: f64,
    /// Seconds since the run (or the resumed run) started, when the evaluation began.
    #[serde(default)]
    pub wall_seconds: f64,
}

/// Indices (ascending) of the `count` held-out problems an evaluation uses, out of problems
/// whose ability and data source are `strata[i]`: all of them when `count` is 0 or at least
/// their number, else one per ability in turn, each ability taking from its data sources in
/// turn (each source in split order), until `count` are taken. So a subset covers every
/// ability first and then every data source, whatever the split's order (stored source by
/// source, or interleaved), and holds the same problems every time.
pub fn stratified_subset<A: Ord + Clone, S: Ord + Clone>(
    strata: &[(A, S)],
    count: usize,
) -> Vec<usize> {
    use std::collections::{BTreeMap, VecDeque};
    let total = strata.len();
    if count == 0 || count >= total {
        return (0..total).collect();
    }
    let mut by_ability: BTreeMap<A, BTreeMap<S, VecDeque<usize>>> = BTreeMap::new();
    for (i, (ability, source)) in strata.iter().enumerate() {
        by_ability
            .entry(ability.clone())
            .or_default()
            .entry(source.clone())
            .or_default()
            .push_back(i);
    }
    // Per ability: its sources' queues and whose turn it is.
    let mut abilities: Vec<(Vec<VecDeque<usize>>, usize)> = by_ability
        .into_values()
        .map(|sources| (sources.into_values().collect(), 0))
        .collect();
    let mut picked = Vec::with_capacity(count);
    while picked.len() < count {
        for (sources, turn) in abilities.iter_mut() {
            if picked.len() == count {
                break;
            }
            let n = sources.len();
            for _ in 0..n {
                let queue = &mut sources[*turn % n];
                *turn += 1;
                if let Some(i) = queue.pop_front() {
                    picked.push(i);
                    break;
                }
            }
        }
    }
    picked.sort_unstable();
    picked
}

/// Held-out accuracy: `eval.samples` samples per problem at `eval.temperature`, graded by
/// ability (math by the math grader, code by the code grader as `grading` says), plus greedy
/// decoding when `eval.greedy` is set; the KV cache within `kv_budget`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    problems: &[EvalProblem],
    config: &EvalConfig,
    max_response_tokens: usize,
    seed: u64,
    kv_budget: KvBudget,
    grading: &mut Grading,
) -> Result<Evaluation> {
    let clock = Instant::now();
    let params = SamplingParams {
        max_new_tokens: max_response_tokens,
        temperature: config.temperature,
        top_p: 1.0,
        top_k: 0,
        seed: Some(seed),
        stop_token_ids: lm.eos_token_ids(),
    };
    let sampled = accuracy(
        lm,
        tokenizer,
        problems,
        config.samples.max(1),
        &params,
        kv_budget,
        grading,
    )?;
    let greedy_accuracy = if config.greedy {
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params.clone()
        };
        Some(self::accuracy(lm, tokenizer, problems, 1, &greedy, kv_budget, grading)?.overall)
    } else {
        None
    };
    Ok(Evaluation {
        accuracy: sampled.overall,
        accuracy_by_ability: sampled.by_ability,
        accuracy_by_source: sampled.by_source,
        greedy_accuracy,
        problems: problems.len(),
        seconds: clock.elapsed().as_secs_f64(),
        wall_seconds: 0.0,
    })
}

/// Sampling parameters of rollouts for a policy whose stop ids are `stop_token_ids`.
pub fn rollout_params(config: &RolloutConfig, stop_token_ids: Vec<i64>) -> SamplingParams {
    SamplingParams {
        max_new_tokens: config.max_response_tokens,
        temperature: config.temperature,
        top_p: config.top_p,
        top_k: config.top_k,
        seed: None,
        stop_token_ids,
    }
}

/// Samples K responses for each work item with the learner's own policy, the KV cache within
/// `kv_budget`, and grades them by ability (see [`Grading`]): the rollouts of a
/// single-process run. Deterministic for a given `seed`.
#[allow(clippy::too_many_arguments)]
pub fn local_rollouts(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    work: &[Work],
    params: &SamplingParams,
    policy_version: u64,
    actor_id: &str,
    seed: u64,
    kv_budget: KvBudget,
    grading: &mut Grading,
) -> Result<Vec<Group>> {
    let k = work.first().map_or(0, |item| item.k as usize);
    for item in work {
        if item.k as usize != k {
            return Err(LearnerError::Data(format!(
                "work items of one pull ask for different K ({} and {k})",
                item.k
            )));
        }
    }
    let sampling = Sampling::one_call(
        SamplingParams {
            seed: Some(seed),
            ..params.clone()
        },
        kv_budget,
    );
    let graded = sample_and_grade_by_ability(lm, tokenizer, work, k, &sampling, grading)?;
    let mut graded = graded.into_iter();
    Ok(work
        .iter()
        .map(|item| Group {
            group_id: item.work_id.clone(),
            actor_id: actor_id.to_string(),
            policy_version,
            scored: ScoredGroup {
                prompt_ids: item.prompt.prompt_ids.clone(),
                responses: graded
                    .by_ref()
                    .take(k)
                    .map(|g| ScoredResponse {
                        truncated: g.generation.finish_reason == FinishReason::Length,
                        score: g.grade,
                        sampling_logprobs: g.generation.logprobs,
                        ids: g.generation.token_ids,
                    })
                    .collect(),
            },
        })
        .collect())
}

#[cfg(test)]
mod subset_tests {
    use super::stratified_subset;

    fn one_source(abilities: &[&'static str]) -> Vec<(&'static str, &'static str)> {
        abilities.iter().map(|&a| (a, "s")).collect()
    }

    #[test]
    fn a_subset_takes_every_ability_then_every_source_in_turn() {
        let all = |n: usize| (0..n).collect::<Vec<_>>();
        let same = one_source(&["math"; 10]);
        assert_eq!(stratified_subset(&same, 0), all(10));
        assert_eq!(stratified_subset(&same, 10), all(10));
        assert_eq!(stratified_subset(&same, 25), all(10));
        // One stratum: the first `count` in split order.
        assert_eq!(stratified_subset(&same, 4), vec![0, 1, 2, 3]);
        // Math then code, 1,024 each: 4 of each.
        let blocks: Vec<&str> = (0..2048)
            .map(|i| if i < 1024 { "math" } else { "code" })
            .collect();
        assert_eq!(
            stratified_subset(&one_source(&blocks), 8),
            vec![0, 1, 2, 3, 1024, 1025, 1026, 1027]
        );
        // Interleaved math, code, math, code...: 2 of each (a regular stride would take only
        // one kind).
        let interleaved: Vec<&str> = (0..64)
            .map(|i| if i % 2 == 0 { "math" } else { "code" })
            .collect();
        assert_eq!(
            stratified_subset(&one_source(&interleaved), 4),
            vec![0, 1, 2, 3]
        );
        // Many math sources and few code ones: abilities alternate first, then each ability's
        // sources take turns.
        let mixed = [
            ("math", "a"),
            ("math", "b"),
            ("math", "c"),
            ("math", "d"),
            ("code", "x"),
            ("code", "x"),
            ("code", "y"),
        ];
        assert_eq!(stratified_subset(&mixed, 4), vec![0, 1, 4, 6]);
        assert_eq!(stratified_subset(&mixed, 6), vec![0, 1, 2, 4, 5, 6]);
    }
}
