//! Best-of-N selection: candidates ranked by PRM score, optionally combined with a vote over
//! their final answers (majority, or weighted by the PRM's outcome probability).
//!
//! Tie rules, relied on by the tests and documented in the proto and docs/evaluation.md:
//! * by score: equal scores keep request order;
//! * by vote: the answer with the most votes (weight) wins; equal votes are broken by the
//!   answer's best candidate score, then by the answer's first candidate in request order.
//!   Candidates rank by their answer's place, within an answer by score (then request order);
//!   candidates without an answer come last, by score.
use std::cmp::Ordering;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{PrmError, Result};

/// How answers vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Voting {
    /// No vote: the PRM score alone.
    #[default]
    None,
    /// One vote per candidate.
    Majority,
    /// Each candidate adds `sigmoid(score)` to its answer.
    Weighted,
}

impl FromStr for Voting {
    type Err = PrmError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Voting::None),
            "majority" => Ok(Voting::Majority),
            "weighted" => Ok(Voting::Weighted),
            _ => Err(PrmError::Input(format!(
                "unknown voting {s:?}: expected none, majority or weighted"
            ))),
        }
    }
}

/// Groups candidates whose answers are equivalent, by the verifier's math comparison of
/// extracted answers (so "0.5" and "\frac{1}{2}" vote together). Returns, per candidate, the
/// index of its answer class (the first candidate of the class), `None` without an answer.
pub fn answer_classes(answers: &[Option<String>]) -> Vec<Option<usize>> {
    let mut classes: Vec<Option<usize>> = Vec::with_capacity(answers.len());
    for (i, answer) in answers.iter().enumerate() {
        let class = answer.as_deref().map(|a| {
            (0..i)
                .find(|&j| {
                    classes[j] == Some(j)
                        && answers[j]
                            .as_deref()
                            .is_some_and(|b| a == b || prime_verifier::math::answers_match(b, a))
                })
                .unwrap_or(i)
        });
        classes.push(class);
    }
    classes
}

/// The math answer a response states (last `\boxed{}`, else "answer is ..."), as the verifier
/// extracts it.
pub fn extract_answer(response: &str) -> Option<String> {
    prime_verifier::math::extract::extract_answer(response)
}

fn by_score_desc(scores: &[f32], a: usize, b: usize) -> Ordering {
    scores[b]
        .partial_cmp(&scores[a])
        .unwrap_or(Ordering::Equal)
        .then(a.cmp(&b))
}

/// Candidate indices, best first, under `voting` (see the module doc for ties). `answers` is
/// ignored by `Voting::None` and must otherwise have one entry per score.
pub fn rank(scores: &[f32], answers: &[Option<String>], voting: Voting) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if voting == Voting::None {
        order.sort_by(|&a, &b| by_score_desc(scores, a, b));
        return order;
    }
    assert_eq!(answers.len(), scores.len(), "one answer per candidate");
    let classes = answer_classes(answers);
    let vote = |i: usize| match voting {
        Voting::Weighted => 1.0 / (1.0 + (-f64::from(scores[i])).exp()),
        _ => 1.0,
    };
    let mut weight = vec![0.0f64; scores.len()];
    let mut best = vec![f32::NEG_INFINITY; scores.len()];
    for (i, class) in classes.iter().enumerate() {
        if let Some(c) = *class {
            weight[c] += vote(i);
            best[c] = best[c].max(scores[i]);
        }
    }
    let class_order = |a: usize, b: usize| {
        weight[b]
            .partial_cmp(&weight[a])
            .unwrap_or(Ordering::Equal)
            .then(best[b].partial_cmp(&best[a]).unwrap_or(Ordering::Equal))
            .then(a.cmp(&b))
    };
    order.sort_by(|&a, &b| match (classes[a], classes[b]) {
        (Some(ca), Some(cb)) if ca != cb => class_order(ca, cb),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        _ => by_score_desc(scores, a, b),
    });
    order
}

/// The candidate a plain majority vote picks (no PRM): the most frequent answer, equal counts
/// going to the answer seen first; its first candidate. `None` when no candidate has an answer.
pub fn majority_pick(answers: &[Option<String>]) -> Option<usize> {
    let classes = answer_classes(answers);
    let mut count = vec![0usize; answers.len()];
    for c in classes.iter().flatten() {
        count[*c] += 1;
    }
    (0..answers.len())
        .filter(|&c| count[c] > 0)
        .max_by(|&a, &b| count[a].cmp(&count[b]).then(b.cmp(&a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(a: &[&str]) -> Vec<Option<String>> {
        a.iter()
            .map(|s| (!s.is_empty()).then(|| s.to_string()))
            .collect()
    }

    #[test]
    fn score_ranking_keeps_request_order_on_ties() {
        assert_eq!(
            rank(&[0.1, 0.5, 0.1, 0.7], &[], Voting::None),
            vec![3, 1, 0, 2]
        );
    }

    #[test]
    fn majority_ties_go_to_the_best_score_then_the_first_answer() {
        // "4" and "5" both have two votes; "5" holds the best single score.
        let a = answers(&["4", "5", "4", "5", "6", ""]);
        let s = [0.2, 0.9, 0.3, -1.0, 2.0, 3.0];
        assert_eq!(rank(&s, &a, Voting::Majority), vec![1, 3, 2, 0, 4, 5]);
        // Equal votes and equal best scores: the answer seen first.
        let s = [0.5, 0.5, 0.1, 0.1, 0.0, 0.0];
        assert_eq!(rank(&s, &a, Voting::Majority), vec![0, 2, 1, 3, 4, 5]);
        // Equivalent forms vote together: 1/2 twice beats 3.
        let a = answers(&["\\frac{1}{2}", "3", "0.5"]);
        assert_eq!(rank(&[0.0, 1.0, 0.0], &a, Voting::Majority), vec![0, 2, 1]);
        assert_eq!(majority_pick(&a), Some(0));
        assert_eq!(majority_pick(&answers(&["7", "8", "", "8", "7"])), Some(0));
        assert_eq!(majority_pick(&answers(&["", ""])), None);
    }

    #[test]
    fn weighted_vote_sums_outcome_probabilities() {
        // σ(3) ≈ 0.95 for "9" alone beats σ(-2)·2 ≈ 0.24 for "8".
        let a = answers(&["8", "9", "8"]);
        assert_eq!(
            rank(&[-2.0, 3.0, -2.0], &a, Voting::Weighted),
            vec![1, 0, 2]
        );
        assert_eq!(
            rank(&[-2.0, 3.0, -2.0], &a, Voting::Majority),
            vec![0, 2, 1]
        );
    }
}
