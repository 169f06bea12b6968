//! Activation recomputation per decoder layer gives the parameter gradients of a plain forward
//! and backward: tied and untied embeddings, grouped-query attention, a right-padded batch and
//! a loss over token log-probs that masks the padding. Both run attention causally without a
//! mask (the batch is right-padded); their log-probs at real tokens and their gradients equal
//! those of the forward with the batch's explicit key mask.
use std::collections::HashMap;

use prime_model::logprobs::PaddedBatch;
use prime_model::{token_logprobs, CausalLm, Qwen2Config};
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 97;

fn tiny_config(tied: bool, kv_heads: i64) -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
    }))
    .unwrap()
}

/// Sequences of lengths 11, 7 and 4 (so the batch has right padding), ids from a fixed LCG.
fn sequences() -> Vec<Vec<i64>> {
    let mut state = 12345u64;
    [11usize, 7, 4]
        .iter()
        .map(|&len| {
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % VOCAB as u64) as i64
                })
                .collect()
        })
        .collect()
}

/// A loss with a non-constant gradient per token: weighted log-probs plus a squared term,
/// over real target tokens only (entry `t-1` predicts token `t < len`).
fn masked_loss(batch: &PaddedBatch) -> impl FnOnce(&Tensor) -> Tensor {
    let width = batch.input_ids.size()[1];
    let mut mask = vec![0f32; batch.lengths.len() * (width as usize - 1)];
    let mut weights = mask.clone();
    for (row, &len) in batch.lengths.iter().enumerate() {
        for t in 0..(len - 1) as usize {
            mask[row * (width as usize - 1) + t] = 1.0;
            weights[row * (width as usize - 1) + t] = ((row * 7 + t) as f32 * 0.61).sin();
        }
    }
    let shape = [batch.lengths.len() as i64, width - 1];
    let mask = Tensor::from_slice(&mask).view(shape);
    let weights = Tensor::from_slice(&weights).view(shape);
    move |logprobs: &Tensor| {
        let linear = (logprobs * &weights * &mask).sum(Kind::Float);
        let squared = (logprobs.square() * &mask).sum(Kind::Float) * 0.05;
        (linear + squared) / mask.sum(Kind::Float)
    }
}

fn zero_gradients(lm: &CausalLm) {
    for (_, v) in lm.vs.variables() {
        let mut grad = v.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
}

/// Every variable's `.grad`, as f32 values by name.
fn collect_gradients(lm: &CausalLm) -> HashMap<String, Vec<f32>> {
    lm.vs
        .variables()
        .into_iter()
        .map(|(name, v)| {
            let grad = v.grad();
            assert!(grad.defined(), "{name} got no gradient");
            let values = Vec::<f32>::try_from(grad.to_kind(Kind::Float).flatten(0, -1)).unwrap();
            (name, values)
        })
        .collect()
}

/// Gradients of every variable after one `token_logprobs_backward`, plus its outputs.
fn gradients(lm: &CausalLm, recompute: bool) -> (HashMap<String, Vec<f32>>, Vec<f32>, f64) {
    let batch = PaddedBatch::new(&sequences(), VOCAB, 0, Device::Cpu).unwrap();
    zero_gradients(lm);
    // A chunk of 4 positions splits the 10 log-prob columns into 4 + 4 + 2.
    let out = lm
        .model
        .token_logprobs_backward(&batch, 4, recompute, masked_loss(&batch));
    let logprobs = Vec::<f32>::try_from(out.logprobs.flatten(0, -1)).unwrap();
    (collect_gradients(lm), logprobs, out.loss.double_value(&[]))
}

/// `[B, T-1]` log-probs of `batch` through `Qwen2::forward` with the batch's explicit key
/// mask (no cache): every query attends to the real keys up to its own position and to
/// itself, the masked path that the right-padded batches no longer take.
fn masked_path_logprobs(lm: &CausalLm, batch: &PaddedBatch) -> Tensor {
    let hidden = lm.model.forward(
        &batch.input_ids,
        &batch.position_ids(),
        &batch.attention_mask,
        None,
    );
    let t = hidden.size()[1];
    lm.model.target_logprobs(
        &hidden.narrow(1, 0, t - 1),
        &batch.input_ids.narrow(1, 1, t - 1),
    )
}

/// Gradients of every variable and the log-probs of [`masked_loss`] over the masked path.
fn masked_path_gradients(lm: &CausalLm) -> (HashMap<String, Vec<f32>>, Vec<f32>) {
    let batch = PaddedBatch::new(&sequences(), VOCAB, 0, Device::Cpu).unwrap();
    zero_gradients(lm);
    let logprobs = tch::with_grad(|| {
        let logprobs = masked_path_logprobs(lm, &batch);
        masked_loss(&batch)(&logprobs).backward();
        logprobs.detach()
    });
    let logprobs = Vec::<f32>::try_from(logprobs.flatten(0, -1)).unwrap();
    (collect_gradients(lm), logprobs)
}

/// Which entries of the flattened `[B, T-1]` log-probs of [`sequences`] are real targets.
fn real_targets() -> Vec<bool> {
    let lengths: Vec<usize> = sequences().iter().map(Vec::len).collect();
    let width = lengths.iter().max().copied().unwrap_or(0) - 1;
    lengths
        .iter()
        .flat_map(|&len| (0..width).map(move |t| t + 1 < len))
        .collect()
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Checks that recomputation reproduces the plain gradients within `tolerance` (absolute, on
/// gradients scaled to at most 1 per variable) and that they are not trivially zero.
fn check_recompute_matches_plain(lm: &CausalLm, tolerance: f32) {
    let (plain, plain_logprobs, plain_loss) = gradients(lm, false);
    let (recomputed, logprobs, loss) = gradients(lm, true);
    assert!(max_abs_diff(&plain_logprobs, &logprobs) < tolerance);
    assert!(
        (plain_loss - loss).abs() < tolerance as f64,
        "{plain_loss} vs {loss}"
    );
    assert_eq!(plain.len(), recomputed.len());
    for (name, expected) in &plain {
        let got = &recomputed[name];
        let scale = max_abs(expected);
        assert!(scale > 0.0, "{name}: zero gradient");
        let diff = max_abs_diff(expected, got) / scale.max(1.0);
        assert!(diff < tolerance, "{name}: recompute differs by {diff}");
    }
}

#[test]
fn recompute_gradients_equal_plain_backward_f32() {
    tch::set_num_threads(1);
    for (tied, kv_heads) in [(true, 2), (false, 2), (false, 4)] {
        tch::manual_seed(7);
        let lm = CausalLm::random(
            &tiny_config(tied, kv_heads),
            Device::Cpu,
            Kind::Float,
            Kind::Float,
        )
        .unwrap();
        check_recompute_matches_plain(&lm, 1e-6);
    }
}

#[test]
fn recompute_gradients_with_f32_masters_and_bf16_compute() {
    tch::set_num_threads(1);
    tch::manual_seed(11);
    // f32 variables computed in bf16: the casts sit inside every recomputed layer.
    let lm = CausalLm::random(
        &tiny_config(true, 2),
        Device::Cpu,
        Kind::Float,
        Kind::BFloat16,
    )
    .unwrap();
    check_recompute_matches_plain(&lm, 1e-6);
}

#[test]
fn recompute_gradients_with_bf16_weights() {
    tch::set_num_threads(1);
    tch::manual_seed(13);
    let lm = CausalLm::random(
        &tiny_config(true, 2),
        Device::Cpu,
        Kind::BFloat16,
        Kind::BFloat16,
    )
    .unwrap();
    // bf16 gradients: the tied embedding's two contributions are summed in another order,
    // which may round the sum differently (about one bf16 ulp of the largest gradient).
    check_recompute_matches_plain(&lm, 4e-3);
}

/// The plain and the recomputing backward (causal attention without a mask) give the masked
/// path's log-probs at every real target within 1e-5 and its gradients within 1e-5 of their
/// scale, in f32; padding entries stay finite.
#[test]
fn causal_attention_equals_the_masked_path_f32() {
    tch::set_num_threads(1);
    let real = real_targets();
    for (tied, kv_heads) in [(true, 2), (false, 2), (false, 4), (false, 1)] {
        tch::manual_seed(17);
        let lm = CausalLm::random(
            &tiny_config(tied, kv_heads),
            Device::Cpu,
            Kind::Float,
            Kind::Float,
        )
        .unwrap();
        let (expected, masked_logprobs) = masked_path_gradients(&lm);
        let batch = PaddedBatch::new(&sequences(), VOCAB, 0, Device::Cpu).unwrap();
        let no_grad = tch::no_grad(|| token_logprobs(&lm.model, &batch, 4));
        let no_grad = Vec::<f32>::try_from(no_grad.flatten(0, -1)).unwrap();
        for recompute in [false, true] {
            let (got, logprobs, _) = gradients(&lm, recompute);
            let label = format!("tied {tied}, kv heads {kv_heads}, recompute {recompute}");
            for (i, &is_real) in real.iter().enumerate() {
                assert!(logprobs[i].is_finite(), "{label}: entry {i} not finite");
                if is_real {
                    for value in [logprobs[i], no_grad[i]] {
                        let diff = (value - masked_logprobs[i]).abs();
                        assert!(diff < 1e-5, "{label}: entry {i} differs by {diff}");
                    }
                }
            }
            // Padding positions after the first attend to earlier padding too: the paths
            // differ there, so the comparison above is between two different computations.
            let padding_differs = real
                .iter()
                .enumerate()
                .any(|(i, &is_real)| !is_real && (logprobs[i] - masked_logprobs[i]).abs() > 1e-4);
            assert!(padding_differs, "{label}: the masked path ran again");
            for (name, want) in &expected {
                let scale = max_abs(want);
                assert!(scale > 0.0, "{name}: zero gradient");
                let diff = max_abs_diff(want, &got[name]) / scale.max(1.0);
                assert!(diff < 1e-5, "{label}: {name} differs by {diff}");
            }
        }
    }
}
