//! Per-token log-probabilities of given sequences: the learner's forward.
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::qwen2::Qwen2;

/// A right-padded batch of token sequences on a device.
#[derive(Debug)]
pub struct PaddedBatch {
    /// `[B, T]` token ids; padding slots hold `pad_id`.
    pub input_ids: Tensor,
    /// `[B, T]` bool, true on real tokens.
    pub attention_mask: Tensor,
    /// Length of each sequence.
    pub lengths: Vec<i64>,
}

impl PaddedBatch {
    /// Right-pads `sequences` to the longest one. Every id must be in `0..vocab_size`.
    pub fn new(
        sequences: &[Vec<i64>],
        vocab_size: i64,
        pad_id: i64,
        device: Device,
    ) -> Result<Self> {
        if sequences.is_empty() {
            return Err(ModelError::Input("empty batch".into()));
        }
        let width = sequences.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; sequences.len() * width];
        let mut mask = vec![false; sequences.len() * width];
        for (row, seq) in sequences.iter().enumerate() {
            check_ids(seq, vocab_size)?;
            ids[row * width..row * width + seq.len()].copy_from_slice(seq);
            mask[row * width..row * width + seq.len()].fill(true);
        }
        let shape = [sequences.len() as i64, width as i64];
        Ok(Self {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            lengths: sequences.iter().map(|s| s.len() as i64).collect(),
        })
    }
}

impl PaddedBatch {
    /// RoPE positions `[B, T]` of the batch ([`position_ids`] of its mask).
    pub fn position_ids(&self) -> Tensor {
        position_ids(&self.attention_mask)
    }
}

/// Rejects token ids outside the vocabulary before they reach an embedding lookup.
pub fn check_ids(ids: &[i64], vocab_size: i64) -> Result<()> {
    match ids.iter().find(|&&id| id < 0 || id >= vocab_size) {
        Some(id) => Err(ModelError::Input(format!(
            "token id {id} is outside the vocabulary (size {vocab_size})"
        ))),
        None => Ok(()),
    }
}

/// Refuses a sequence the model cannot score: an id outside the vocabulary, or more tokens
/// than its `max_position_embeddings` (RoPE has no position beyond them).
pub fn check_sequence(ids: &[i64], config: &crate::Qwen2Config) -> Result<()> {
    let positions = config.max_position_embeddings;
    if i64::try_from(ids.len()).map_or(true, |n| n > positions) {
        return Err(ModelError::Input(format!(
            "{} tokens exceed the model's max_position_embeddings ({positions})",
            ids.len()
        )));
    }
    check_ids(ids, config.vocab_size)
}

/// RoPE positions of a padded batch: the index of each token among the real tokens of its
/// row (`cumsum(mask) - 1`), so left and right padding give the same positions.
pub fn position_ids(attention_mask: &Tensor) -> Tensor {
    (attention_mask.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0)
}

/// `[B, T-1]` f32: entry `t-1` is `log p(ids[t] | ids[<t])`. Entries past a row's length are
/// padding. Runs with or without gradients, as the caller's grad mode says. The vocabulary
/// log-softmax is taken `chunk_tokens` positions at a time to bound its memory. Attention is
/// causal without a mask ([`Qwen2::forward_right_padded`]): the batch is right-padded.
pub fn token_logprobs(model: &Qwen2, batch: &PaddedBatch, chunk_tokens: i64) -> Tensor {
    let hidden = model.forward_right_padded(&batch.input_ids, &batch.position_ids());
    let t = hidden.size()[1];
    let targets = batch.input_ids.narrow(1, 1, t - 1);
    let hidden = hidden.narrow(1, 0, t - 1);
    let chunk = chunk_tokens.max(1);
    let pieces: Vec<Tensor> = (0..t - 1)
        .step_by(chunk as usize)
        .map(|start| {
            let len = chunk.min(t - 1 - start);
            let logits = model.logits(&hidden.narrow(1, start, len));
            let target = targets.narrow(1, start, len).unsqueeze(-1);
            logits
                .log_softmax(-1, Kind::Float)
                .gather(-1, &target, false)
                .squeeze_dim(-1)
        })
        .collect();
    Tensor::cat(&pieces, 1)
}

/// Positions per chunk of the vocabulary log-softmax in [`sequence_logprobs`].
pub const SEQUENCE_LOGPROB_CHUNK: i64 = 512;

/// Per-token log-probs of each sequence (no gradients), batched by a token budget: each
/// returned vector has `len - 1` values.
pub fn sequence_logprobs(
    model: &Qwen2,
    sequences: &[Vec<i64>],
    max_batch_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let _guard = tch::no_grad_guard();
    let vocab = model.config().vocab_size;
    for (i, sequence) in sequences.iter().enumerate() {
        check_sequence(sequence, model.config())
            .map_err(|e| ModelError::Input(format!("sequence {i}: {e}")))?;
    }
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].len()));
    let mut out = vec![Vec::new(); sequences.len()];
    let mut start = 0;
    while start < order.len() {
        // Sorted longest first, so the first row sets the padded width of the micro-batch.
        let width = sequences[order[start]].len().max(1);
        let rows = (max_batch_tokens / width).max(1).min(order.len() - start);
        let idx = &order[start..start + rows];
        let batch_seqs: Vec<Vec<i64>> = idx.iter().map(|&i| sequences[i].clone()).collect();
        if batch_seqs.iter().all(|s| s.len() < 2) {
            start += rows;
            continue;
        }
        let batch = PaddedBatch::new(&batch_seqs, vocab, 0, model.device())?;
        let logprobs = crate::torch_op("the log-prob forward", &[&batch.input_ids.size()], || {
            Ok(token_logprobs(model, &batch, SEQUENCE_LOGPROB_CHUNK).to_device(Device::Cpu))
        })?;
        for (row, &i) in idx.iter().enumerate() {
            let n = sequences[i].len().saturating_sub(1) as i64;
            let values = Vec::<f32>::try_from(logprobs.get(row as i64).narrow(0, 0, n))?;
            out[i] = values;
        }
        start += rows;
    }
    Ok(out)
}
