//! Sampling with a continuously refilled batch over a preallocated KV cache.
//!
//! Each sequence owns a row of the cache and decodes at its own column, so rows of different
//! lengths share a step and a finished row is refilled at once from the waiting prompts.
//! Prompts prefilled together are left-padded; RoPE positions come from the mask, so padding
//! changes nothing. The cache has as many rows as its memory budget holds ([`KvBudget`]).
//! Each response draws its tokens from a random stream of its own, so which responses share
//! a step changes nothing. Only the sampled ids and their log-probs cross to the host each
//! step.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::kv_cache::{cache_layout, kv_bytes_per_token, CacheLayout, KvBudget, KvCache};
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
    /// Seeds the sampler, for reproducible runs: the draw for token `n` of prompt `i` of a
    /// call is a function of (seed, i, n) alone (see [`generate_within`]). Without a seed,
    /// each call takes one from torch's generator.
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
    /// The rules of `prime_check` for the same knobs as flags and config keys: a finite
    /// temperature of 0 (greedy) or more, a top-p in (0, 1], a top-k of 0 (off) or more.
    pub fn validate(&self) -> Result<()> {
        use prime_check::rules;
        let input = |e: prime_check::Invalid| ModelError::Input(e.to_string());
        rules::TEMPERATURE
            .check("temperature", self.temperature)
            .map_err(input)?;
        rules::TOP_P.check("top_p", self.top_p).map_err(input)?;
        prime_check::number::at_least("top_k", self.top_k, 0).map_err(input)?;
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

/// Samples one response per prompt, all prompts decoding together; see [`generate_batched`].
pub fn generate(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    generate_batched(model, prompts, params, prompts.len().max(1))
}

/// Samples one response per prompt with at most `max_rows` sequences decoding at once; the
/// KV cache is not bounded otherwise. See [`generate_within`].
pub fn generate_batched(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
    max_rows: usize,
) -> Result<Vec<Generation>> {
    generate_within(model, prompts, params, max_rows, KvBudget::Unlimited)
}

/// Samples one response per prompt with at most `max_rows` sequences decoding at once and a
/// KV cache of at most `budget` bytes.
///
/// The cache is allocated once, as rows of `longest prompt + max_new_tokens` columns of
/// [`kv_bytes_per_token`] bytes each: as many rows as `max_rows`, the prompts and the budget
/// allow. A budget that cannot hold one row is refused with the numbers. When the budget has
/// room for one more longest prompt besides, a prompt whose samples straddle two admissions
/// keeps its prefill's keys and values for the later ones; otherwise they are prefilled again.
///
/// Continuous batching: a response that stops frees its row at once, and the next waiting
/// prompt takes it (its prefill runs in the same step, written straight into the cache).
/// Running rows stay packed at the front of the cache, so every decode step covers only live
/// sequences. Consecutive identical prompts (the K samples of one prompt) share one prefill
/// whose keys and values are copied into their rows. Per step only the sampled ids and their
/// log-probs cross to the host.
///
/// Which prompts share a step changes nothing but rounding, so outputs do not depend on
/// `max_rows` or the budget: greedy outputs equal decoding each prompt alone, and the
/// uniform number behind token `n` of prompt `i` is a hash of (seed, `i`, `n`) alone.
pub fn generate_within(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
    max_rows: usize,
    budget: KvBudget,
) -> Result<Vec<Generation>> {
    params.validate()?;
    if max_rows == 0 {
        return Err(ModelError::Input("max_rows must be at least 1".into()));
    }
    let vocab = model.config().vocab_size;
    for prompt in prompts {
        if prompt.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        check_ids(prompt, vocab)?;
    }
    let max_new = params.max_new_tokens as i64;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    if longest + max_new > model.config().max_position_embeddings {
        return Err(ModelError::Input(format!(
            "prompt ({longest}) plus max_new_tokens ({max_new}) exceeds max_position_embeddings ({})",
            model.config().max_position_embeddings
        )));
    }
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    if prompts.is_empty() || max_new == 0 {
        return Ok(out);
    }
    let bytes_per_token = kv_bytes_per_token(model.config(), model.compute_kind());
    let layout = cache_layout(
        budget,
        bytes_per_token,
        longest,
        max_new,
        max_rows,
        prompts.len(),
    )
    .map_err(|row_bytes| over_budget(model, prompts, max_new, row_bytes, budget))?;
    let _guard = tch::no_grad_guard();
    let seed = call_seed(params);
    let mut batch = Batch::new(model, prompts, layout);
    while let Some(logits) = batch.step()? {
        let uniforms = (params.temperature > 0.0).then(|| {
            let draws: Vec<f64> = batch
                .running
                .iter()
                .map(|row| uniform(seed, row.prompt, out[row.prompt].token_ids.len()))
                .collect();
            Tensor::from_slice(&draws)
                .view([-1, 1])
                .to_device(model.device())
        });
        let (tokens, logprobs) = sample_with(&logits, params, uniforms.as_ref());
        let tokens = Vec::<i64>::try_from(&tokens.to_device(Device::Cpu))?;
        let logprobs = Vec::<f32>::try_from(&logprobs.to_device(Device::Cpu))?;
        for ((row, token), logprob) in batch.running.iter_mut().zip(tokens).zip(logprobs) {
            let generation = &mut out[row.prompt];
            generation.token_ids.push(token);
            generation.logprobs.push(logprob);
            row.next_token = token;
            if params.stop_token_ids.contains(&token) {
                generation.finish_reason = FinishReason::Stop;
                row.done = true;
            } else if generation.token_ids.len() as i64 == max_new {
                row.done = true;
            }
        }
        batch.retire_done();
    }
    Ok(out)
}

/// The seed of a call's draws: the parameters', else one from torch's generator (greedy
/// decoding draws nothing).
fn call_seed(params: &SamplingParams) -> u64 {
    match params.seed {
        Some(seed) => seed,
        None if params.temperature > 0.0 => {
            Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64
        }
        None => 0,
    }
}

/// The refusal of a call whose longest sequence (the first longest of `prompts` plus
/// `max_new` new tokens) needs `row_bytes` of cache, more than `budget`.
fn over_budget(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    max_new: i64,
    row_bytes: u64,
    budget: KvBudget,
) -> ModelError {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let index = prompts.iter().position(|p| p.len() == longest).unwrap_or(0);
    let longest = longest as i64;
    let c = model.config();
    let kind = model.compute_kind();
    ModelError::Input(format!(
        "prompt {index} ({longest} tokens) plus max_new_tokens ({max_new}) does not fit the KV \
         cache budget of {budget}: its {} tokens take {row_bytes} bytes ({:.3} GiB) at {} bytes \
         per token (2 x {} layers x {} kv heads x {} head dim x {} bytes of {kind:?})",
        longest + max_new,
        row_bytes as f64 / (1u64 << 30) as f64,
        kv_bytes_per_token(c, kind),
        c.num_hidden_layers,
        c.num_kv_heads(),
        c.head_dim(),
        kind.elt_size_in_bytes(),
    ))
}

/// The uniform number in (0, 1] behind token `token` of prompt `prompt` in a call seeded with
/// `seed`: a SplitMix64 hash of the three, so that a response's draws do not depend on which
/// other responses share its steps.
fn uniform(seed: u64, prompt: usize, token: usize) -> f64 {
    let bits = mix(mix(mix(seed) ^ prompt as u64) ^ token as u64);
    ((bits >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// SplitMix64's output function of `x` plus its increment: a bijection on u64 whose outputs
/// look independent for neighbouring inputs.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One live sequence: a row of the cache.
#[derive(Debug)]
struct Row {
    /// Index of its prompt (and of its response).
    prompt: usize,
    /// Cache columns it fills (its prefill, padding included, and its fed tokens).
    columns: i64,
    /// RoPE position of the next token it feeds: its real tokens so far.
    position: i64,
    /// The token sampled last, fed at the next step.
    next_token: i64,
    /// It stopped or reached the length limit.
    done: bool,
}

/// The keys and values of a prompt's prefill, kept for its samples that still wait for a row.
#[derive(Debug)]
struct Prefix {
    /// The prompt group it is for (see [`Batch::group`]).
    group: usize,
    /// One slot holding the prefill's columns, left padding included.
    cache: KvCache,
    width: i64,
    /// `[1, V]` f32: the next-token logits after the prompt.
    logits: Tensor,
}

/// The continuous batch: the cache, its live rows (packed at the front) and the queue.
struct Batch<'a> {
    model: &'a Qwen2,
    prompts: &'a [Vec<i64>],
    /// For each prompt, the index of its group: a run of consecutive identical prompts.
    group: Vec<usize>,
    cache: KvCache,
    /// `[rows, capacity]` bool: real tokens in each row's cache columns.
    key_mask: Tensor,
    running: Vec<Row>,
    /// The next prompt to admit.
    next_prompt: usize,
    /// Whether a group's prefill is kept for its samples admitted later ([`CacheLayout`]).
    keep_prefix: bool,
    /// The prefill of a group some of whose samples still wait for a row.
    retained: Option<Prefix>,
}

impl<'a> Batch<'a> {
    fn new(model: &'a Qwen2, prompts: &'a [Vec<i64>], layout: CacheLayout) -> Self {
        let mut group: Vec<usize> = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            group.push(match group.last() {
                Some(&g) if prompts[i - 1] == *prompt => g,
                Some(&g) => g + 1,
                None => 0,
            });
        }
        let rows = layout.rows as i64;
        Self {
            model,
            prompts,
            group,
            cache: KvCache::new(model, rows, layout.columns),
            key_mask: Tensor::zeros([rows, layout.columns], (Kind::Bool, model.device())),
            running: Vec::with_capacity(layout.rows),
            next_prompt: 0,
            keep_prefix: layout.keep_prefix,
            retained: None,
        }
    }

    /// Runs one step: a decode forward for the running rows, then the prefill of the prompts
    /// admitted to the free rows. Returns the next-token logits of every running row in row
    /// order, or `None` when nothing is left.
    fn step(&mut self) -> Result<Option<Tensor>> {
        let mut logits = Vec::with_capacity(2);
        if !self.running.is_empty() {
            logits.push(self.decode());
        }
        let free = self.key_mask.size()[0] as usize - self.running.len();
        if free > 0 && self.next_prompt < self.prompts.len() {
            logits.push(self.admit(free)?);
        }
        Ok(match logits.len() {
            0 => None,
            1 => logits.pop(),
            _ => Some(Tensor::cat(&logits, 0)),
        })
    }

    /// Feeds every running row its last token at its own column; returns `[rows, V]` logits.
    fn decode(&mut self) -> Tensor {
        let n = self.running.len() as i64;
        // Ids, positions and write columns in one host-to-device copy.
        let mut host = Vec::with_capacity(3 * self.running.len());
        host.extend(self.running.iter().map(|r| r.next_token));
        host.extend(self.running.iter().map(|r| r.position));
        host.extend(self.running.iter().map(|r| r.columns));
        let host = Tensor::from_slice(&host)
            .view([3, n])
            .to_device(self.model.device());
        let (ids, positions, columns) = (host.get(0), host.get(1), host.get(2));
        let key_len = self.running.iter().map(|r| r.columns).max().unwrap_or(0) + 1;
        let mut key_mask = self.key_mask.narrow(0, 0, n);
        let _ = key_mask.scatter_value_(1, &columns.unsqueeze(1), 1);
        self.cache.target_per_slot(&columns, key_len);
        let hidden = self.model.forward(
            &ids.unsqueeze(1),
            &positions.unsqueeze(1),
            &key_mask.narrow(1, 0, key_len),
            Some(&mut self.cache),
        );
        for row in &mut self.running {
            row.columns += 1;
            row.position += 1;
        }
        self.model.logits(&hidden.select(1, 0))
    }

    /// Admits up to `free` waiting prompts into the rows after the running ones. Groups
    /// without a kept prefill are prefilled together in one left-padded forward that writes
    /// straight into the cache, the first of run `j` into row `start + j` (at or before the
    /// run's first row); each run's rows then get copies of its keys and values, the last run
    /// first, so no prefill is overwritten before it is copied. Returns their `[n, V]` logits.
    fn admit(&mut self, free: usize) -> Result<Tensor> {
        let end = (self.next_prompt + free).min(self.prompts.len());
        // Runs of one group among the admitted prompts: (group, first prompt, count).
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for i in self.next_prompt..end {
            match runs.last_mut() {
                Some(run) if run.0 == self.group[i] => run.2 += 1,
                _ => runs.push((self.group[i], i, 1)),
            }
        }
        self.next_prompt = end;
        let start = self.running.len() as i64;
        let retained = self.retained.take().filter(|p| p.group == runs[0].0);
        let skip = usize::from(retained.is_some());
        let fresh: Vec<usize> = runs[skip..].iter().map(|run| run.1).collect();
        let (width, fresh_logits) = self.prefill(start + skip as i64, &fresh)?;
        let firsts: Vec<i64> = runs
            .iter()
            .scan(start, |row, run| {
                let first = *row;
                *row += run.2 as i64;
                Some(first)
            })
            .collect();
        for j in (skip..runs.len()).rev() {
            let (source, first, count) = (start + j as i64, firsts[j], runs[j].2 as i64);
            // The prefill sits in the run's first row when every earlier run has one sample.
            let (first, count) = if first == source {
                (first + 1, count - 1)
            } else {
                (first, count)
            };
            if count > 0 {
                self.cache.fork_within(source, first, count, width);
            }
        }
        if let Some(prefix) = &retained {
            self.cache
                .fork_from(&prefix.cache, 0, start, runs[0].2 as i64, prefix.width);
        }
        let widths: Vec<i64> = (0..runs.len())
            .map(|j| match &retained {
                Some(prefix) if j == 0 => prefix.width,
                _ => width,
            })
            .collect();
        self.set_key_masks(start, &runs, &widths);
        let logits: Vec<Tensor> = runs
            .iter()
            .enumerate()
            .map(|(j, run)| {
                let logits = match &retained {
                    Some(prefix) if j == 0 => prefix.logits.shallow_clone(),
                    _ => fresh_logits.narrow(0, (j - skip) as i64, 1),
                };
                logits.expand([run.2 as i64, -1], false)
            })
            .collect();
        for (j, &(_, first, count)) in runs.iter().enumerate() {
            self.running
                .extend((first..first + count).map(|prompt| Row {
                    prompt,
                    columns: widths[j],
                    position: self.prompts[prompt].len() as i64,
                    next_token: 0,
                    done: false,
                }));
        }
        let last = runs.len() - 1;
        if self.keep_prefix && self.group.get(self.next_prompt) == Some(&runs[last].0) {
            self.retained = Some(match retained {
                Some(prefix) if last == 0 => prefix,
                _ => Prefix {
                    group: runs[last].0,
                    cache: self.cache.copy_of_slot(firsts[last], widths[last]),
                    width: widths[last],
                    logits: logits[last].narrow(0, 0, 1),
                },
            });
        }
        Ok(Tensor::cat(&logits, 0))
    }

    /// The key mask of the rows from `start` on for `runs` (as in [`Batch::admit`]) whose
    /// prefills are `widths` columns wide, left padding first: one host-to-device copy.
    fn set_key_masks(&mut self, start: i64, runs: &[(usize, usize, usize)], widths: &[i64]) {
        let capacity = self.cache.capacity() as usize;
        let rows: usize = runs.iter().map(|run| run.2).sum();
        let mut mask = vec![false; rows * capacity];
        let mut row = 0;
        for (&(_, first, count), &width) in runs.iter().zip(widths) {
            let width = width as usize;
            let pad = width - self.prompts[first].len();
            for _ in 0..count {
                mask[row * capacity + pad..row * capacity + width].fill(true);
                row += 1;
            }
        }
        let mask = Tensor::from_slice(&mask)
            .view([rows as i64, capacity as i64])
            .to_device(self.model.device());
        self.key_mask.narrow(0, start, rows as i64).copy_(&mask);
    }

    /// One left-padded prefill forward for the given prompts (each the first of its group)
    /// into rows `first_row..` of the cache. Returns its width and the `[n, V]` next-token
    /// logits (width 0 and no logits when there is nothing to prefill).
    fn prefill(&mut self, first_row: i64, prompts: &[usize]) -> Result<(i64, Tensor)> {
        if prompts.is_empty() {
            return Ok((0, Tensor::new()));
        }
        let device = self.model.device();
        let rows = prompts.len() as i64;
        let width = prompts
            .iter()
            .map(|&p| self.prompts[p].len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![0i64; prompts.len() * width];
        let mut mask = vec![false; prompts.len() * width];
        for (row, &p) in prompts.iter().enumerate() {
            let prompt = &self.prompts[p];
            let pad = width - prompt.len();
            ids[row * width + pad..(row + 1) * width].copy_from_slice(prompt);
            mask[row * width + pad..(row + 1) * width].fill(true);
        }
        let width = width as i64;
        let ids = Tensor::from_slice(&ids)
            .view([rows, width])
            .to_device(device);
        let mask = Tensor::from_slice(&mask)
            .view([rows, width])
            .to_device(device);
        self.cache.target_block(first_row, rows, 0);
        let hidden = self
            .model
            .forward(&ids, &position_ids(&mask), &mask, Some(&mut self.cache));
        Ok((width, self.model.logits(&hidden.select(1, -1))))
    }

    /// Drops the rows that are done, moving the last running rows into their places so the
    /// running rows stay packed at the front.
    fn retire_done(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].done {
                i += 1;
                continue;
            }
            let last = self.running.len() - 1;
            if i != last && !self.running[last].done {
                let (from, to) = (last as i64, i as i64);
                self.cache.move_slot(from, to, self.running[last].columns);
                self.key_mask
                    .narrow(0, to, 1)
                    .copy_(&self.key_mask.narrow(0, from, 1));
            }
            self.running.swap_remove(i);
        }
    }
}

/// Samples one token per row of `logits` (`[B, V]`, f32) with uniform numbers from torch's
/// generator and returns `(tokens, logprobs)`.
pub fn sample(logits: &Tensor, params: &SamplingParams) -> (Tensor, Tensor) {
    sample_with(logits, params, None)
}

/// [`sample`] with the uniform numbers in (0, 1] of the draws given (`[B, 1]` f64 on the
/// logits' device), or taken from torch's generator when `None`.
fn sample_with(
    logits: &Tensor,
    params: &SamplingParams,
    uniforms: Option<&Tensor>,
) -> (Tensor, Tensor) {
    if params.temperature == 0.0 {
        let tokens = logits.argmax(-1, false);
        let logprobs = logits
            .log_softmax(-1, Kind::Float)
            .gather(-1, &tokens.unsqueeze(-1), false)
            .squeeze_dim(-1);
        return (tokens, logprobs);
    }
    let scaled = if params.temperature == 1.0 {
        logits.shallow_clone()
    } else {
        logits / params.temperature
    };
    let logprobs_all = scaled.log_softmax(-1, Kind::Float);
    let probs = if params.top_k == 0 && params.top_p >= 1.0 {
        logprobs_all.exp()
    } else {
        truncate(&scaled, params.top_k, params.top_p).softmax(-1, Kind::Float)
    };
    let rows = probs.size()[0];
    let uniforms = match uniforms {
        Some(u) => u.shallow_clone(),
        // 1 - [0, 1) is in (0, 1].
        None => 1.0 - Tensor::rand([rows, 1], (Kind::Double, probs.device())),
    };
    let tokens = draw(&probs, &uniforms);
    let logprobs = logprobs_all
        .gather(-1, &tokens.unsqueeze(-1), false)
        .squeeze_dim(-1);
    (tokens, logprobs)
}

/// One draw per row of `probs` (`[B, V]`) by inverting its cumulative distribution at the
/// row's uniform number in `u` (`[B, 1]` f64); `multinomial` would draw one per vocabulary
/// entry, which costs more than the rest of a small model's decode step. The sum runs in f64
/// so that long vocabularies keep every token's interval.
fn draw(probs: &Tensor, u: &Tensor) -> Tensor {
    let cdf = probs.cumsum(-1, Kind::Double);
    let total = cdf.select(1, -1).unsqueeze(1);
    // u in (0, 1]: the point u * total is above 0, so it never lands on a leading
    // zero-probability token, and at most the total, so it never runs past the last token.
    (u * total)
        .searchsorted(&cdf, false, false, "left", None::<Tensor>)
        .squeeze_dim(-1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_are_in_the_unit_interval_and_evenly_spread() {
        let mut bins = [0usize; 20];
        let mut sum = 0.0;
        let n = 200 * 500;
        for prompt in 0..200 {
            for token in 0..500 {
                let u = uniform(9, prompt, token);
                assert!(u > 0.0 && u <= 1.0, "{u}");
                bins[((u * 20.0) as usize).min(19)] += 1;
                sum += u;
            }
        }
        // Each bin expects 5,000 with a standard deviation of about 69: 350 is 5 of them.
        for (i, &count) in bins.iter().enumerate() {
            assert!(count.abs_diff(n / 20) < 350, "bin {i}: {count}");
        }
        assert!((sum / n as f64 - 0.5).abs() < 0.005);
    }

    #[test]
    fn uniforms_differ_across_seeds_prompts_and_tokens() {
        let base = uniform(1, 2, 3);
        for other in [
            uniform(2, 2, 3),
            uniform(1, 3, 3),
            uniform(1, 2, 4),
            uniform(1, 3, 2),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(base, uniform(1, 2, 3));
        // Neighbouring keys are not correlated: the draws of prompt 0 and 1 at the same tokens.
        let pairs: Vec<(f64, f64)> = (0..5000)
            .map(|t| (uniform(4, 0, t), uniform(4, 1, t)))
            .collect();
        let mean = |f: &dyn Fn(&(f64, f64)) -> f64| pairs.iter().map(f).sum::<f64>() / 5000.0;
        let covariance = mean(&|p| p.0 * p.1) - mean(&|p| p.0) * mean(&|p| p.1);
        // Uniform variance is 1/12; a correlation under 0.05 is within 3.5 standard errors.
        assert!(
            (covariance * 12.0).abs() < 0.05,
            "correlation {}",
            covariance * 12.0
        );
    }
}
