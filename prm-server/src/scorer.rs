//! Token-level process rewards of the implicit PRM: `β · (log π_φ(y_t) − log π_ref(y_t))` on
//! the tokens the learner trains on (up to and including the first EOS), 0 after them. The
//! log-ratio and the mask are the learner's own functions ([`implicit_prm::token_log_ratio`],
//! [`masks::response_mask`]); the log-probs are the model crate's batched forward.
use prime_algo::{implicit_prm, masks};
use prime_model::{sequence_logprobs, CausalLm};
use tch::{Kind, Tensor};

use crate::error::{PrmError, Result};

/// A (prompt, response) pair to score, as token ids (chat template applied to the prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Prompt ids; at least one.
    pub prompt_ids: Vec<i64>,
    /// Response ids; at least one.
    pub response_ids: Vec<i64>,
}

/// The PRM and its reference, owned by one compute thread.
#[derive(Debug)]
pub struct Scorer {
    /// π_φ.
    pub prm: CausalLm,
    /// π_ref.
    pub reference: CausalLm,
    /// The β of the rewards.
    pub beta: f64,
    /// Most padded tokens in one forward.
    pub max_batch_tokens: usize,
    eos_ids: Vec<i64>,
}

impl Scorer {
    /// Pairs a PRM with its reference; both must share the vocabulary (one tokenizer). The
    /// end-of-sequence ids come from the PRM's generation config.
    pub fn new(
        prm: CausalLm,
        reference: CausalLm,
        beta: f64,
        max_batch_tokens: usize,
    ) -> Result<Self> {
        if prm.config.vocab_size != reference.config.vocab_size {
            return Err(PrmError::Input(format!(
                "the PRM's vocabulary ({}) differs from the reference's ({}): they must share \
                 one tokenizer",
                prm.config.vocab_size, reference.config.vocab_size
            )));
        }
        if !(beta.is_finite() && beta > 0.0) {
            return Err(PrmError::Input(format!(
                "beta must be positive, got {beta}"
            )));
        }
        let eos_ids = prm.eos_token_ids();
        Ok(Self {
            prm,
            reference,
            beta,
            max_batch_tokens: max_batch_tokens.max(1),
            eos_ids,
        })
    }

    /// Ids that end a response.
    pub fn eos_ids(&self) -> &[i64] {
        &self.eos_ids
    }

    /// Checks a pair before it reaches a model.
    pub fn check(&self, pair: &Pair) -> Result<()> {
        if pair.prompt_ids.is_empty() || pair.response_ids.is_empty() {
            return Err(PrmError::Input(
                "prompt and response need at least one token each".into(),
            ));
        }
        let vocab = self.prm.config.vocab_size;
        let max_len = self.prm.config.max_position_embeddings as usize;
        let len = pair.prompt_ids.len() + pair.response_ids.len();
        if len > max_len {
            return Err(PrmError::Input(format!(
                "{len} tokens exceed the model's {max_len} positions"
            )));
        }
        prime_model::logprobs::check_ids(&pair.prompt_ids, vocab)?;
        prime_model::logprobs::check_ids(&pair.response_ids, vocab)?;
        Ok(())
    }

    /// One reward per response token of each pair, in order.
    pub fn token_rewards(&self, pairs: &[Pair]) -> Result<Vec<Vec<f32>>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        for pair in pairs {
            self.check(pair)?;
        }
        let _guard = tch::no_grad_guard();
        let sequences: Vec<Vec<i64>> = pairs
            .iter()
            .map(|p| {
                p.prompt_ids
                    .iter()
                    .chain(&p.response_ids)
                    .copied()
                    .collect()
            })
            .collect();
        let prm = sequence_logprobs(&self.prm.model, &sequences, self.max_batch_tokens)?;
        let reference =
            sequence_logprobs(&self.reference.model, &sequences, self.max_batch_tokens)?;
        // Response-aligned [N, R] tensors: token t of a response is predicted at position
        // P + t - 1 of its sequence, entry P + t - 1 of the (len - 1) log-probs.
        let width = pairs
            .iter()
            .map(|p| p.response_ids.len())
            .max()
            .unwrap_or(1);
        let n = pairs.len();
        let mut ids = vec![0i64; n * width];
        let mut generated = vec![false; n * width];
        let (mut prm_rows, mut ref_rows) = (vec![0f32; n * width], vec![0f32; n * width]);
        for (row, pair) in pairs.iter().enumerate() {
            let (p, r) = (pair.prompt_ids.len(), pair.response_ids.len());
            let at = row * width;
            ids[at..at + r].copy_from_slice(&pair.response_ids);
            generated[at..at + r].fill(true);
            prm_rows[at..at + r].copy_from_slice(&prm[row][p - 1..p - 1 + r]);
            ref_rows[at..at + r].copy_from_slice(&reference[row][p - 1..p - 1 + r]);
        }
        let shape = [n as i64, width as i64];
        let mask = masks::response_mask(
            &Tensor::from_slice(&ids).view(shape),
            &Tensor::from_slice(&generated).view(shape),
            &self.eos_ids,
        );
        let q = implicit_prm::token_log_ratio(
            &Tensor::from_slice(&prm_rows).view(shape),
            &Tensor::from_slice(&ref_rows).view(shape),
            &mask,
        );
        let rewards = (q * self.beta).to_kind(Kind::Float);
        let values = Vec::<f32>::try_from(rewards.flatten(0, -1))?;
        Ok(pairs
            .iter()
            .enumerate()
            .map(|(row, pair)| values[row * width..row * width + pair.response_ids.len()].to_vec())
            .collect())
    }
}
