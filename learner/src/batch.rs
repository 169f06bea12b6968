//! A batch of scored groups: the rollouts file's and the scheduler's unit ([`ScoredGroup`]) and
//! its layout for the models ([`StepBatch`]): full sequences for the forwards and
//! response-aligned `[N, R]` tensors for the algorithm.
use prime_algo::masks;
use prime_model::{CausalLm, PaddedBatch};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{LearnerError, Result};

/// One scored response of a group, as sampled (EOS included when it stopped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredResponse {
    /// Response token ids.
    pub ids: Vec<i64>,
    /// Verifier score in [0, 1]; fractional for code.
    pub score: f64,
    /// Log-probs the sampler reported for `ids`, when known: only monitored (the step
    /// recomputes the old log-probs), to catch a sampler that disagrees with the learner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sampling_logprobs: Vec<f32>,
    /// The sampler stopped at the token limit rather than at a stop token (the filter's
    /// `drop_truncated` reads it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// The K responses of one prompt: the unit of the filter, the baselines and the mini-batches.
/// One line of a `prime learner step --rollouts` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredGroup {
    /// Prompt token ids (chat template applied).
    pub prompt_ids: Vec<i64>,
    /// The K responses.
    pub responses: Vec<ScoredResponse>,
}

/// A batch of groups laid out for the models: full sequences for the forwards and
/// response-aligned `[N, R]` tensors for the algorithm (row `g·K + i` is response i of group g).
#[derive(Debug)]
pub struct StepBatch {
    /// Responses per group.
    pub k: usize,
    /// Prompt + response ids of each row.
    pub sequences: Vec<Vec<i64>>,
    /// Prompt length of each row.
    pub prompt_lengths: Vec<i64>,
    /// `[N, R]` valid-token mask (spec §0), on the device.
    pub mask: Tensor,
    /// `[N]` f32 scores, on the device.
    pub scores: Tensor,
    /// Width R of the response tensors.
    pub response_width: i64,
    /// `[N, R]` sampler log-probs, when every response carried them.
    pub sampling_logprobs: Option<Tensor>,
}

impl StepBatch {
    /// Lays out `groups`; every group must hold the same number K ≥ 2 of responses, each with
    /// at least one token, and every id must be in the vocabulary.
    pub fn new(
        groups: &[ScoredGroup],
        eos_ids: &[i64],
        vocab_size: i64,
        device: Device,
    ) -> Result<Self> {
        let k = groups.first().map(|g| g.responses.len()).unwrap_or(0);
        if k < 2 {
            return Err(LearnerError::Data(
                "a step needs at least one group of at least 2 responses".into(),
            ));
        }
        let mut sequences = Vec::new();
        let mut prompt_lengths = Vec::new();
        let mut scores = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            if group.responses.len() != k {
                return Err(LearnerError::Data(format!(
                    "group {g} has {} responses, group 0 has {k}: every group needs the same K",
                    group.responses.len()
                )));
            }
            if group.prompt_ids.is_empty() {
                return Err(LearnerError::Data(format!("group {g} has an empty prompt")));
            }
            for (i, response) in group.responses.iter().enumerate() {
                if response.ids.is_empty() {
                    return Err(LearnerError::Data(format!(
                        "group {g} response {i} has no tokens"
                    )));
                }
                if !(0.0..=1.0).contains(&response.score) {
                    return Err(LearnerError::Data(format!(
                        "group {g} response {i}: score {} is outside [0, 1]",
                        response.score
                    )));
                }
                let sequence: Vec<i64> = group
                    .prompt_ids
                    .iter()
                    .chain(&response.ids)
                    .copied()
                    .collect();
                prime_model::logprobs::check_ids(&sequence, vocab_size)
                    .map_err(|e| LearnerError::Data(format!("group {g} response {i}: {e}")))?;
                sequences.push(sequence);
                prompt_lengths.push(group.prompt_ids.len() as i64);
                scores.push(response.score as f32);
            }
        }
        let responses: Vec<&[i64]> = groups
            .iter()
            .flat_map(|g| g.responses.iter().map(|r| r.ids.as_slice()))
            .collect();
        let width = responses.iter().map(|r| r.len()).max().unwrap_or(1);
        let n = responses.len();
        let mut ids = vec![0i64; n * width];
        let mut generated = vec![false; n * width];
        for (row, response) in responses.iter().enumerate() {
            ids[row * width..row * width + response.len()].copy_from_slice(response);
            generated[row * width..row * width + response.len()].fill(true);
        }
        let shape = [n as i64, width as i64];
        let sampled: Vec<&[f32]> = groups
            .iter()
            .flat_map(|g| g.responses.iter().map(|r| r.sampling_logprobs.as_slice()))
            .collect();
        let sampling_logprobs = sampled
            .iter()
            .zip(&responses)
            .all(|(s, r)| s.len() == r.len())
            .then(|| {
                let mut values = vec![0f32; n * width];
                for (row, s) in sampled.iter().enumerate() {
                    values[row * width..row * width + s.len()].copy_from_slice(s);
                }
                Tensor::from_slice(&values).view(shape).to_device(device)
            });
        let mask = masks::response_mask(
            &Tensor::from_slice(&ids).view(shape),
            &Tensor::from_slice(&generated).view(shape),
            eos_ids,
        );
        Ok(Self {
            k,
            sequences,
            prompt_lengths,
            mask: mask.to_device(device),
            scores: Tensor::from_slice(&scores).to_device(device),
            response_width: width as i64,
            sampling_logprobs,
        })
    }

    /// Number of responses.
    pub fn rows(&self) -> usize {
        self.sequences.len()
    }

    /// Row ranges of `parts` mini-batches of whole groups, in order (the first ones take one
    /// group more when the groups do not divide evenly).
    pub fn mini_batches(&self, parts: usize) -> Vec<std::ops::Range<usize>> {
        let groups = self.rows() / self.k;
        let parts = parts.clamp(1, groups);
        let (base, extra) = (groups / parts, groups % parts);
        let mut start = 0;
        (0..parts)
            .map(|p| {
                let len = (base + usize::from(p < extra)) * self.k;
                let range = start..start + len;
                start += len;
                range
            })
            .collect()
    }

    /// Splits `rows` into consecutive micro-batches whose padded size (rows × longest
    /// sequence) stays within `budget` tokens; a single longer row goes alone.
    pub fn micro_batches(
        &self,
        rows: std::ops::Range<usize>,
        budget: usize,
    ) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut start = rows.start;
        let mut width = 0;
        for row in rows.clone() {
            let candidate = width.max(self.sequences[row].len());
            if row > start && candidate * (row - start + 1) > budget {
                out.push(start..row);
                start = row;
                width = self.sequences[row].len();
            } else {
                width = candidate;
            }
        }
        if start < rows.end {
            out.push(start..rows.end);
        }
        out
    }

    /// The full sequences of `rows`, right-padded on `model`'s device.
    pub(crate) fn padded(
        &self,
        rows: &std::ops::Range<usize>,
        model: &CausalLm,
    ) -> Result<PaddedBatch> {
        Ok(PaddedBatch::new(
            &self.sequences[rows.clone()],
            model.config.vocab_size,
            0,
            model.model.device(),
        )?)
    }

    pub(crate) fn rows_of(&self, t: &Tensor, rows: &std::ops::Range<usize>) -> Tensor {
        t.narrow(0, rows.start as i64, rows.len() as i64)
    }
}
