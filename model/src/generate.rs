//! Batched sampling with a preallocated KV cache.
//!
//! Prompts of different lengths are left-padded into one batch; RoPE positions come from the
//! mask, so padding changes nothing. One prefill, then one token per step for every row until
//! each row has stopped (EOS) or reached `max_new_tokens`. Only the sampled ids and their
//! log-probs cross to the host each step.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::logprobs::{check_ids, position_ids};
use crate::qwen2::Qwen2;

/// How to sample. Temperature 0 is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: i64,
    /// Seeds torch's generator before sampling, for reproducible runs.
    pub seed: Option<u64>,
    /// Token ids that end a response (included in the output when produced).
    pub stop_token_ids: Vec<i64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Input(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.top_k < 0 {
            return Err(ModelError::Input(format!(
                "top_k must be >= 0, got {}",
                self.top_k
            )));
        }
        Ok(())
    }
}

/// Why a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

/// One sampled response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New tokens only, ending with the stop token when one was produced.
    pub token_ids: Vec<i64>,
    /// Log-probability of each token under the distribution it was sampled from: the model's
    /// softmax at the sampling temperature (temperature 1 when greedy), before top-p/top-k.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// Samples one response per prompt.
pub fn generate(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    params.validate()?;
    let vocab = model.config().vocab_size;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    for prompt in prompts {
        if prompt.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        check_ids(prompt, vocab)?;
    }
    let max_new = params.max_new_tokens as i64;
    let prompt_width = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let capacity = prompt_width + max_new;
    if capacity > model.config().max_position_embeddings {
        return Err(ModelError::Input(format!(
            "prompt ({prompt_width}) plus max_new_tokens ({max_new}) exceeds max_position_embeddings ({})",
            model.config().max_position_embeddings
        )));
    }
    let _guard = tch::no_grad_guard();
    if let Some(seed) = params.seed {
        tch::manual_seed(seed as i64);
    }
    let device = model.device();
    let batch = prompts.len() as i64;
    let (input_ids, key_mask) = left_pad(prompts, prompt_width, capacity, device);
    let mut positions = position_ids(&key_mask.narrow(1, 0, prompt_width));
    let mut cache = model.new_cache(batch, capacity);
    let mut hidden = model.forward(
        &input_ids,
        &positions,
        &key_mask.narrow(1, 0, prompt_width),
        Some(&mut cache),
    );
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    let mut running = vec![true; prompts.len()];
    for step in 0..max_new {
        let logits = model.logits(&hidden.select(1, -1));
        let (tokens, logprobs) = sample(&logits, params);
        let token_values = Vec::<i64>::try_from(&tokens.to_device(Device::Cpu))?;
        let logprob_values = Vec::<f32>::try_from(&logprobs.to_device(Device::Cpu))?;
        for (row, generation) in out.iter_mut().enumerate() {
            if !running[row] {
                continue;
            }
            generation.token_ids.push(token_values[row]);
            generation.logprobs.push(logprob_values[row]);
            if params.stop_token_ids.contains(&token_values[row]) {
                generation.finish_reason = FinishReason::Stop;
                running[row] = false;
            }
        }
        if step + 1 == max_new || !running.contains(&true) {
            break;
        }
        positions = positions.select(1, -1).unsqueeze(1) + 1;
        let width = prompt_width + step + 1;
        hidden = model.forward(
            &tokens.unsqueeze(1),
            &positions,
            &key_mask.narrow(1, 0, width),
            Some(&mut cache),
        );
    }
    Ok(out)
}

/// Left-pads prompts to `width` ids and returns them with a `[B, capacity]` key mask that is
/// true on prompt tokens and on every slot after the prompts (the generated tokens).
fn left_pad(prompts: &[Vec<i64>], width: i64, capacity: i64, device: Device) -> (Tensor, Tensor) {
    let width_usize = width as usize;
    let cap = capacity as usize;
    let mut ids = vec![0i64; prompts.len() * width_usize];
    let mut mask = vec![true; prompts.len() * cap];
    for (row, prompt) in prompts.iter().enumerate() {
        let pad = width_usize - prompt.len();
        ids[row * width_usize + pad..(row + 1) * width_usize].copy_from_slice(prompt);
        mask[row * cap..row * cap + pad].fill(false);
    }
    let b = prompts.len() as i64;
    (
        Tensor::from_slice(&ids).view([b, width]).to_device(device),
        Tensor::from_slice(&mask)
            .view([b, capacity])
            .to_device(device),
    )
}

/// Samples one token per row of `logits` (`[B, V]`, f32) and returns `(tokens, logprobs)`.
pub fn sample(logits: &Tensor, params: &SamplingParams) -> (Tensor, Tensor) {
    if params.temperature == 0.0 {
        let tokens = logits.argmax(-1, false);
        let logprobs = logits
            .log_softmax(-1, Kind::Float)
            .gather(-1, &tokens.unsqueeze(-1), false)
            .squeeze_dim(-1);
        return (tokens, logprobs);
    }
    let scaled = logits / params.temperature;
    let logprobs_all = scaled.log_softmax(-1, Kind::Float);
    let probs = if params.top_k == 0 && params.top_p >= 1.0 {
        logprobs_all.exp()
    } else {
        truncate(&scaled, params.top_k, params.top_p).softmax(-1, Kind::Float)
    };
    let tokens = probs.multinomial(1, false).squeeze_dim(-1);
    let logprobs = logprobs_all
        .gather(-1, &tokens.unsqueeze(-1), false)
        .squeeze_dim(-1);
    (tokens, logprobs)
}

/// Sets logits outside the top-k and outside the top-p nucleus to -inf. The most likely
/// token always survives.
fn truncate(logits: &Tensor, top_k: i64, top_p: f64) -> Tensor {
    let vocab = logits.size()[1];
    let mut logits = logits.shallow_clone();
    if top_k > 0 && top_k < vocab {
        let (kth, _) = logits.topk(top_k, -1, true, true);
        let threshold = kth.narrow(1, top_k - 1, 1);
        logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if top_p < 1.0 {
        let (sorted, indices) = logits.sort(-1, true);
        let sorted_probs = sorted.softmax(-1, Kind::Float);
        // Drop a token when the tokens ranked above it already reach top_p.
        let probs_before = sorted_probs.cumsum(-1, Kind::Float) - &sorted_probs;
        let drop_sorted = probs_before.ge(top_p);
        let drop = drop_sorted.scatter(-1, &indices, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
}
