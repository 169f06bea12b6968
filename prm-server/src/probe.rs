//! A step-level probe of the implicit PRM: given traces with a known error at a known step
//! (a right trace and the same trace with one step wrong), how well does the step reward, the
//! sum of β·log π_φ/π_ref over the step's tokens, tell the wrong step from a right one?
//!
//! The headline is a ROC AUC: the probability that a right step scores above a wrong one,
//! ties half (1: every wrong step below every right one; 0.5: chance). The right steps are
//! the same steps of the right traces: the same prefix and position, so only the step's own
//! tokens differ. A second AUC takes every step but the last (the answer line) of the right
//! traces as right steps.
use prime_model::{ChatMessage, Tokenizer};
use prime_world::ProbeCase;
use serde::{Deserialize, Serialize};

use crate::error::{PrmError, Result};
use crate::scorer::{Pair, Scorer};
use crate::steps::{step_ends, step_scores, StepSplit};

/// One probe case as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTrace {
    /// Prompt ids (chat template applied, with the generation prompt).
    pub prompt_ids: Vec<i64>,
    /// The right trace's response ids.
    pub right_ids: Vec<i64>,
    /// The same trace with `step` wrong (the steps before it the same).
    pub wrong_ids: Vec<i64>,
    /// The 0-based step that is wrong in `wrong_ids`.
    pub step: usize,
}

impl ProbeTrace {
    /// The token ids of a world's probe case ([`prime_world::probe_cases`]): the prompt with
    /// the chat template and generation prompt, each trace followed by `eos_id`, as the
    /// supervised warm-up and the policy's responses end.
    pub fn from_case(case: &ProbeCase, tokenizer: &Tokenizer, eos_id: i64) -> Result<Self> {
        let messages: Vec<ChatMessage> = case
            .prompt
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let response = |text: &str| -> Result<Vec<i64>> {
            let mut ids = tokenizer.encode(text)?;
            ids.push(eos_id);
            Ok(ids)
        };
        Ok(ProbeTrace {
            prompt_ids: tokenizer.encode_chat(&messages, true)?,
            right_ids: response(&case.correct)?,
            wrong_ids: response(&case.flawed)?,
            step: case.step,
        })
    }
}

/// The step rewards of one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeScores {
    /// The wrong step.
    pub step: usize,
    /// Step rewards of the right trace.
    pub right: Vec<f32>,
    /// Step rewards of the wrong trace.
    pub wrong: Vec<f32>,
}

/// What the probe measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Cases probed.
    pub cases: usize,
    /// β of the rewards.
    pub beta: f64,
    /// AUC of the step reward: right step `j` of the right traces against wrong step `j` of
    /// the wrong traces (0.5 = chance).
    pub auc: f64,
    /// AUC with every step but the last of the right traces as the right steps.
    pub auc_all_steps: f64,
    /// Mean step reward of the wrong steps.
    pub wrong_step_reward_mean: f64,
    /// Mean step reward of the right steps at the same positions.
    pub right_step_reward_mean: f64,
    /// Step rewards per case, in input order.
    pub scores: Vec<ProbeScores>,
}

/// `P(h > l) + ½ P(h = l)` over every pair of an `h` from `higher` and an `l` from `lower`:
/// the ROC AUC of a score meant to be higher on the first set (the Mann-Whitney U statistic
/// over the number of pairs). `None` when either set is empty.
pub fn auc(higher: &[f64], lower: &[f64]) -> Option<f64> {
    if higher.is_empty() || lower.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for h in higher {
        for l in lower {
            wins += match h.partial_cmp(l) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            };
        }
    }
    Some(wins / (higher.len() * lower.len()) as f64)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Scores every case with `scorer`, splits each response into steps with `split` (decoded by
/// `tokenizer`) and compares the wrong steps with the right ones. A case whose two traces
/// split into different numbers of steps, or fewer than `step + 1`, is an input error.
pub fn probe(
    scorer: &Scorer,
    tokenizer: &Tokenizer,
    split: &StepSplit,
    traces: &[ProbeTrace],
) -> Result<ProbeReport> {
    if traces.is_empty() {
        return Err(PrmError::Input("no probe cases".into()));
    }
    let pairs: Vec<Pair> = traces
        .iter()
        .flat_map(|t| {
            [&t.right_ids, &t.wrong_ids].map(|ids| Pair {
                prompt_ids: t.prompt_ids.clone(),
                response_ids: ids.clone(),
            })
        })
        .collect();
    let rewards = scorer.token_rewards(&pairs)?;
    let mut scores = Vec::with_capacity(traces.len());
    for (i, trace) in traces.iter().enumerate() {
        let steps_of = |ids: &[i64], rewards: &[f32]| -> Result<Vec<f32>> {
            Ok(step_scores(rewards, &step_ends(tokenizer, ids, split)?))
        };
        let right = steps_of(&trace.right_ids, &rewards[2 * i])?;
        let wrong = steps_of(&trace.wrong_ids, &rewards[2 * i + 1])?;
        if right.len() != wrong.len() || trace.step >= right.len() {
            return Err(PrmError::Input(format!(
                "probe case {i}: the right trace has {} steps and the wrong one {}; the wrong \
                 step is {}",
                right.len(),
                wrong.len(),
                trace.step
            )));
        }
        scores.push(ProbeScores {
            step: trace.step,
            right,
            wrong,
        });
    }
    let wrong: Vec<f64> = scores.iter().map(|s| f64::from(s.wrong[s.step])).collect();
    let right_same: Vec<f64> = scores.iter().map(|s| f64::from(s.right[s.step])).collect();
    let right_all: Vec<f64> = scores
        .iter()
        .flat_map(|s| s.right[..s.right.len() - 1].iter().map(|&r| f64::from(r)))
        .collect();
    Ok(ProbeReport {
        cases: traces.len(),
        beta: scorer.beta,
        auc: auc(&right_same, &wrong).unwrap_or(0.5),
        auc_all_steps: auc(&right_all, &wrong).unwrap_or(0.5),
        wrong_step_reward_mean: mean(&wrong),
        right_step_reward_mean: mean(&right_same),
        scores,
    })
}
