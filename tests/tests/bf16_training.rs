//! A model stored in bf16 trains through the learner's AdamW (f32 moments, f32 master
//! weights) with activation recomputation: the variables stay bf16, and a fixed batch is
//! memorised.
use prime_learner::models::trainable_parameters;
use prime_learner::{AdamW, AdamWConfig};
use prime_model::logprobs::PaddedBatch;
use prime_model::{CausalLm, Qwen2Config};
use prime_tests::*;
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 64;

#[test]
fn bf16_model_memorises_a_batch_with_master_weights_and_recompute() {
    init_threads();
    tch::manual_seed(5);
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": true,
    }))
    .unwrap();
    let lm = CausalLm::random(&config, Device::Cpu, Kind::BFloat16, Kind::BFloat16).unwrap();
    let sequences = random_sequences(4, 6, 12, VOCAB, 3);
    let batch = PaddedBatch::new(&sequences, VOCAB, 0, Device::Cpu).unwrap();
    let width = batch.input_ids.size()[1];
    let mask: Vec<f32> = batch
        .lengths
        .iter()
        .flat_map(|&len| (1..width).map(move |t| if t < len { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_slice(&mask).view([batch.lengths.len() as i64, width - 1]);
    let nll = |logprobs: &Tensor| -(logprobs * &mask).sum(Kind::Float) / mask.sum(Kind::Float);

    let mut optimizer = AdamW::with_master_weights(
        trainable_parameters(&lm),
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    );
    let mut losses = Vec::new();
    for _ in 0..40 {
        optimizer.zero_grad();
        let out = lm.model.token_logprobs_backward(&batch, 5, true, nll);
        losses.push(out.loss.double_value(&[]));
        optimizer.step(1e-2);
    }
    for (name, v) in lm.vs.variables() {
        assert_eq!(v.kind(), Kind::BFloat16, "{name}");
    }
    // Uniform guessing over 64 tokens is ln 64 = 4.16 nats; a memorised batch is far below.
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first > 3.5, "initial loss {first}");
    assert!(last < 0.5, "loss {first} -> {last}: {losses:?}");
}
