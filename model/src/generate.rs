//! Sampling with a continuously refilled batch over a preallocated KV cache.
//!
//! Each sequence owns a row of the cache and decodes at its own column, so rows of different
//! lengths share a step and a finished row is refilled at once from the waiting prompts.
//! Prompts prefilled together are left-padded; RoPE positions come from the mask, so padding
//! changes nothing. Only the sampled ids and their log-probs cross to the host each step.
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
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

/// Samples one response per prompt with at most `max_rows` sequences decoding at once.
///
/// Continuous batching: a response that stops frees its row of the KV cache at once, and the
/// next waiting prompt takes it (its prefill runs in the same step). Running rows stay packed
/// at the front of the cache, so every decode step covers only live sequences. Consecutive
/// identical prompts (the K samples of one prompt) share one prefill whose keys and values
/// are forked into their rows. The cache is allocated once; per step only the sampled ids and
/// their log-probs cross to the host.
///
/// Which prompts share a step changes nothing but rounding: greedy outputs equal decoding
/// each prompt alone, and with a seed the draws repeat exactly for the same prompts,
/// parameters and `max_rows`.
pub fn generate_batched(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    params: &SamplingParams,
    max_rows: usize,
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
    let _guard = tch::no_grad_guard();
    if let Some(seed) = params.seed {
        tch::manual_seed(seed as i64);
    }
    let rows = max_rows.min(prompts.len());
    let mut batch = Batch::new(model, prompts, rows, longest + max_new);
    while let Some(logits) = batch.step()? {
        let (tokens, logprobs) = sample(&logits, params);
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

/// A prefill whose keys and values are forked into the rows of its prompt's samples.
#[derive(Debug)]
struct Prefill {
    /// The prompt group it is for (see [`Batch::group`]).
    group: usize,
    cache: Rc<KvCache>,
    /// Its row in `cache`, and the columns it fills there (left padding included).
    row: i64,
    width: i64,
    /// `[1, capacity]` bool: which of the batch cache's columns hold real tokens after it.
    key_mask: Tensor,
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
    /// The prefill of a group some of whose samples still wait for a row.
    retained: Option<Prefill>,
}

impl<'a> Batch<'a> {
    fn new(model: &'a Qwen2, prompts: &'a [Vec<i64>], rows: usize, capacity: i64) -> Self {
        let mut group: Vec<usize> = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            group.push(match group.last() {
                Some(&g) if prompts[i - 1] == *prompt => g,
                Some(&g) => g + 1,
                None => 0,
            });
        }
        let rows = rows as i64;
        Self {
            model,
            prompts,
            group,
            cache: KvCache::new(model, rows, capacity),
            key_mask: Tensor::zeros([rows, capacity], (Kind::Bool, model.device())),
            running: Vec::with_capacity(rows as usize),
            next_prompt: 0,
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
    /// without a prefill are prefilled together in one left-padded forward; each admitted
    /// prompt's row gets a fork of its group's keys and values. Returns their `[n, V]` logits.
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
        let retained = self.retained.take().filter(|p| p.group == runs[0].0);
        let skip = usize::from(retained.is_some());
        let firsts: Vec<usize> = runs.iter().skip(skip).map(|run| run.1).collect();
        let prefills: Vec<Prefill> = retained.into_iter().chain(self.prefill(&firsts)?).collect();
        let mut logits = Vec::with_capacity(runs.len());
        for (&(_, first, count), prefill) in runs.iter().zip(&prefills) {
            let (start, rows) = (self.running.len() as i64, count as i64);
            self.cache
                .fork_from(&prefill.cache, prefill.row, start, rows, prefill.width);
            self.key_mask
                .narrow(0, start, rows)
                .copy_(&prefill.key_mask);
            logits.push(prefill.logits.expand([rows, -1], false));
            self.running
                .extend((first..first + count).map(|prompt| Row {
                    prompt,
                    columns: prefill.width,
                    position: self.prompts[prompt].len() as i64,
                    next_token: 0,
                    done: false,
                }));
        }
        let last = prefills.into_iter().last().expect("at least one admitted");
        if self.group.get(self.next_prompt) == Some(&last.group) {
            self.retained = Some(last);
        }
        Ok(Tensor::cat(&logits, 0))
    }

    /// One left-padded prefill forward for the given prompts (each the first of its group).
    fn prefill(&self, prompts: &[usize]) -> Result<Vec<Prefill>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let device = self.model.device();
        let rows = prompts.len() as i64;
        let width = prompts
            .iter()
            .map(|&p| self.prompts[p].len())
            .max()
            .unwrap_or(0);
        let capacity = self.cache.capacity() as usize;
        let mut ids = vec![0i64; prompts.len() * width];
        let mut mask = vec![false; prompts.len() * capacity];
        for (row, &p) in prompts.iter().enumerate() {
            let prompt = &self.prompts[p];
            let pad = width - prompt.len();
            ids[row * width + pad..(row + 1) * width].copy_from_slice(prompt);
            mask[row * capacity + pad..row * capacity + width].fill(true);
        }
        let width = width as i64;
        let ids = Tensor::from_slice(&ids)
            .view([rows, width])
            .to_device(device);
        let key_mask = Tensor::from_slice(&mask)
            .view([rows, capacity as i64])
            .to_device(device);
        let prompt_mask = key_mask.narrow(1, 0, width);
        let mut cache = KvCache::new(self.model, rows, width);
        cache.target_block(0, rows, 0);
        let hidden = self.model.forward(
            &ids,
            &position_ids(&prompt_mask),
            &prompt_mask,
            Some(&mut cache),
        );
        let logits = self.model.logits(&hidden.select(1, -1));
        let cache = Rc::new(cache);
        Ok(prompts
            .iter()
            .enumerate()
            .map(|(row, &p)| {
                let row = row as i64;
                Prefill {
                    group: self.group[p],
                    cache: Rc::clone(&cache),
                    row,
                    width,
                    key_mask: key_mask.narrow(0, row, 1),
                    logits: logits.narrow(0, row, 1),
                }
            })
            .collect())
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
    let tokens = draw(&probs);
    let logprobs = logprobs_all
        .gather(-1, &tokens.unsqueeze(-1), false)
        .squeeze_dim(-1);
    (tokens, logprobs)
}

/// One draw per row of `probs` (`[B, V]`) by inverting its cumulative distribution with one
/// uniform number per row; `multinomial` would draw one per vocabulary entry, which costs more
/// than the rest of a small model's decode step. The sum runs in f64 so that long vocabularies
/// keep every token's interval.
fn draw(probs: &Tensor) -> Tensor {
    let rows = probs.size()[0];
    let cdf = probs.cumsum(-1, Kind::Double);
    let total = cdf.select(1, -1).unsqueeze(1);
    // u in (0, 1]: the point u * total is above 0, so it never lands on a leading
    // zero-probability token, and at most the total, so it never runs past the last token.
    let u: Tensor = 1.0 - Tensor::rand([rows, 1], (Kind::Double, probs.device()));
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
