//! Reasoning steps of a response: where they end (from text markers and the tokenizer's
//! decoding), the score of each step (the sum of its token rewards) and one score per response
//! (min, sum, mean or last step), as the implicit PRM's users score solutions step by step.
use std::fmt;
use std::str::FromStr;

use prime_model::Tokenizer;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{PrmError, Result};

/// How a response's text is cut into steps.
#[derive(Debug, Clone)]
pub enum StepSplit {
    /// Every token is a step of its own.
    Tokens,
    /// A step ends after each match (separators: newlines, blank lines).
    After(Regex),
    /// A step starts at each match (headers such as "Step 2:").
    Before(Regex),
}

impl StepSplit {
    /// The name this split parses back from.
    pub fn name(&self) -> String {
        match self {
            StepSplit::Tokens => "tokens".into(),
            StepSplit::After(r) if r.as_str() == r"\n+" => "lines".into(),
            StepSplit::After(r) if r.as_str() == r"\n[ \t]*\n\s*" => "blank-lines".into(),
            StepSplit::Before(r) if r.as_str() == r"(?m)^[ \t]*(?:#+[ \t]*)?Step[ \t]+\d+" => {
                "step-headers".into()
            }
            StepSplit::After(r) => format!("after:{}", r.as_str()),
            StepSplit::Before(r) => format!("before:{}", r.as_str()),
        }
    }
}

impl fmt::Display for StepSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for StepSplit {
    type Err = PrmError;

    /// `tokens`, `lines` (a step per non-empty line), `blank-lines` (paragraphs),
    /// `step-headers` (a line starting with "Step k" starts a step, as in EurusPRM's format),
    /// `after:REGEX` or `before:REGEX`.
    fn from_str(s: &str) -> Result<Self> {
        let regex = |pattern: &str| {
            Regex::new(pattern)
                .map_err(|e| PrmError::Input(format!("step split {s:?}: bad regex: {e}")))
        };
        match s {
            "tokens" => Ok(StepSplit::Tokens),
            "lines" => Ok(StepSplit::After(regex(r"\n+")?)),
            "blank-lines" => Ok(StepSplit::After(regex(r"\n[ \t]*\n\s*")?)),
            "step-headers" => Ok(StepSplit::Before(regex(
                r"(?m)^[ \t]*(?:#+[ \t]*)?Step[ \t]+\d+",
            )?)),
            _ => {
                if let Some(p) = s.strip_prefix("after:") {
                    Ok(StepSplit::After(regex(p)?))
                } else if let Some(p) = s.strip_prefix("before:") {
                    Ok(StepSplit::Before(regex(p)?))
                } else {
                    Err(PrmError::Input(format!(
                        "unknown step split {s:?}: expected tokens, lines, blank-lines, \
                         step-headers, after:REGEX or before:REGEX"
                    )))
                }
            }
        }
    }
}

/// Byte offsets in `text` where steps begin (besides 0), ascending and inside the text.
pub fn text_boundaries(text: &str, split: &StepSplit) -> Vec<usize> {
    let mut cuts: Vec<usize> = match split {
        StepSplit::Tokens => return Vec::new(),
        StepSplit::After(r) => r.find_iter(text).map(|m| m.end()).collect(),
        StepSplit::Before(r) => r.find_iter(text).map(|m| m.start()).collect(),
    };
    cuts.retain(|&c| c > 0 && c < text.len());
    cuts.dedup();
    cuts
}

/// Step ends (token indices, each one past a step's last token, the last equal to
/// `response_ids.len()`) for `response_ids` split by `split`.
///
/// A boundary at byte `c` of the decoded text ends the step after the last token whose
/// decoded prefix ends at or before `c`: a token that straddles the boundary starts the next
/// step. The prefix lengths come from decoding prefixes (binary search per boundary), so
/// multi-token characters and merged whitespace are handled as the tokenizer decodes them.
pub fn step_ends(
    tokenizer: &Tokenizer,
    response_ids: &[i64],
    split: &StepSplit,
) -> Result<Vec<u32>> {
    let n = response_ids.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    if matches!(split, StepSplit::Tokens) {
        return Ok((1..=n as u32).collect());
    }
    let text = tokenizer.decode(response_ids, false)?;
    let prefix_len = |j: usize| -> Result<usize> {
        Ok(if j == 0 {
            0
        } else {
            tokenizer.decode(&response_ids[..j], false)?.len()
        })
    };
    let mut ends = Vec::new();
    for cut in text_boundaries(&text, split) {
        // Largest j in [0, n] with prefix_len(j) <= cut.
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if prefix_len(mid)? <= cut {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo > 0 && lo < n && ends.last() != Some(&(lo as u32)) {
            ends.push(lo as u32);
        }
    }
    ends.push(n as u32);
    Ok(ends)
}

/// Checks caller-given step ends: ascending, non-empty steps, the last equal to `len`.
pub fn check_step_ends(ends: &[u32], len: usize) -> Result<()> {
    let bad = |why: &str| Err(PrmError::Input(format!("step_ends {ends:?}: {why}")));
    if ends.last().map(|&e| e as usize) != Some(len) {
        return bad(&format!(
            "the last one must equal the response length {len}"
        ));
    }
    if ends.first() == Some(&0) || ends.windows(2).any(|w| w[0] >= w[1]) {
        return bad("must be ascending and each step must hold a token");
    }
    Ok(())
}

/// The score of each step: the sum of its token rewards.
pub fn step_scores(token_rewards: &[f32], ends: &[u32]) -> Vec<f32> {
    let mut start = 0usize;
    ends.iter()
        .map(|&end| {
            let end = (end as usize).min(token_rewards.len());
            let sum = token_rewards[start.min(end)..end].iter().sum();
            start = end;
            sum
        })
        .collect()
}

/// How step scores become one response score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The lowest step score: a response is as good as its worst step (the default of the
    /// implicit-PRM Best-of-N evaluation).
    #[default]
    Min,
    /// The sum of the step scores: the sequence reward `β Σ_t q_t` the PRM is trained on.
    Sum,
    /// The mean step score.
    Mean,
    /// The last step's score.
    Last,
}

impl Aggregation {
    /// Combines `steps` into one score; a response without steps scores 0.
    pub fn apply(self, steps: &[f32]) -> f32 {
        if steps.is_empty() {
            return 0.0;
        }
        match self {
            Aggregation::Min => steps.iter().copied().fold(f32::INFINITY, f32::min),
            Aggregation::Sum => steps.iter().sum(),
            Aggregation::Mean => steps.iter().sum::<f32>() / steps.len() as f32,
            Aggregation::Last => steps[steps.len() - 1],
        }
    }
}

impl FromStr for Aggregation {
    type Err = PrmError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "min" => Ok(Aggregation::Min),
            "sum" => Ok(Aggregation::Sum),
            "mean" => Ok(Aggregation::Mean),
            "last" => Ok(Aggregation::Last),
            _ => Err(PrmError::Input(format!(
                "unknown aggregation {s:?}: expected min, sum, mean or last"
            ))),
        }
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Aggregation::Min => "min",
            Aggregation::Sum => "sum",
            Aggregation::Mean => "mean",
            Aggregation::Last => "last",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_boundaries_by_split() {
        let text = "Step 1: a=2\nStep 2: b=3\n\nso \\boxed{5}";
        let lines: StepSplit = "lines".parse().unwrap();
        assert_eq!(text_boundaries(text, &lines), vec![12, 25]);
        let blank: StepSplit = "blank-lines".parse().unwrap();
        assert_eq!(text_boundaries(text, &blank), vec![25]);
        let headers: StepSplit = "step-headers".parse().unwrap();
        assert_eq!(text_boundaries(text, &headers), vec![12]);
        let custom: StepSplit = "before:so".parse().unwrap();
        assert_eq!(text_boundaries(text, &custom), vec![25]);
        for name in ["tokens", "lines", "blank-lines", "step-headers", "after:x+"] {
            assert_eq!(name.parse::<StepSplit>().unwrap().name(), name);
        }
        assert!("sentences".parse::<StepSplit>().is_err());
        assert!("after:(".parse::<StepSplit>().is_err());
    }

    #[test]
    fn step_scores_and_aggregations_by_hand() {
        let rewards = [0.5f32, -1.0, 2.0, 0.25, -0.5];
        let steps = step_scores(&rewards, &[2, 3, 5]);
        assert_eq!(steps, vec![-0.5, 2.0, -0.25]);
        assert_eq!(Aggregation::Min.apply(&steps), -0.5);
        assert_eq!(Aggregation::Sum.apply(&steps), 1.25);
        assert!((Aggregation::Mean.apply(&steps) - 1.25 / 3.0).abs() < 1e-7);
        assert_eq!(Aggregation::Last.apply(&steps), -0.25);
        assert_eq!(Aggregation::Min.apply(&[]), 0.0);
        assert!(check_step_ends(&[2, 3, 5], 5).is_ok());
        assert!(check_step_ends(&[2, 2, 5], 5).is_err());
        assert!(check_step_ends(&[0, 5], 5).is_err());
        assert!(check_step_ends(&[2, 4], 5).is_err());
    }
}
