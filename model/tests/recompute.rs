//! Activation recomputation per decoder layer gives the parameter gradients of a plain forward
//! and backward: tied and untied embeddings, grouped-query attention, a right-padded batch and
//! a loss over token log-probs that masks the padding.
use std::collections::HashMap;

use prime_model::logprobs::PaddedBatch;
use prime_model::{CausalLm, Qwen2Config};
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

/// Gradients of every variable after one `token_logprobs_backward`, plus its outputs.
fn gradients(lm: &CausalLm, recompute: bool) -> (HashMap<String, Vec<f32>>, Vec<f32>, f64) {
    let batch = PaddedBatch::new(&sequences(), VOCAB, 0, Device::Cpu).unwrap();
    for (_, v) in lm.vs.variables() {
        let mut grad = v.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
    // A chunk of 4 positions splits the 10 log-prob columns into 4 + 4 + 2.
    let out = lm
        .model
        .token_logprobs_backward(&batch, 4, recompute, masked_loss(&batch));
    let grads = lm
        .vs
        .variables()
        .into_iter()
        .map(|(name, v)| {
            let grad = v.grad();
            assert!(grad.defined(), "{name} got no gradient");
            let values = Vec::<f32>::try_from(grad.to_kind(Kind::Float).flatten(0, -1)).unwrap();
            (name, values)
        })
        .collect();
    let logprobs = Vec::<f32>::try_from(out.logprobs.flatten(0, -1)).unwrap();
    (grads, logprobs, out.loss.double_value(&[]))
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
