//! The sampler decodes on fused q/k/v and gate/up projections whose rows the VarStore's
//! variables are views of. These tests change the weights every way the project does (an
//! in-place copy, as a weight sync or a checkpoint load does; an optimizer step; a dtype
//! round trip that gives every variable new storage) and check after each change that the
//! sampled log-probs equal a teacher-forced forward, which reads the variables themselves and
//! never the fused tensors: a decode on stale fused weights fails the comparison.
use prime_model::kv_cache::KvCache;
use prime_model::{
    generate, sequence_logprobs, token_logprobs, CausalLm, Generation, PaddedBatch, Qwen2Config,
    SamplingParams,
};
use prime_tests::*;
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};

const VOCAB: i64 = 300;

fn random_lm() -> CausalLm {
    random_lm_in(Kind::Float)
}

/// A random model with parameters and activations in `kind`.
fn random_lm_in(kind: Kind) -> CausalLm {
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
    }))
    .unwrap();
    CausalLm::random(&config, Device::Cpu, kind, kind).unwrap()
}

/// Greedy responses to `prompts`, after checking every token's log-prob against a
/// teacher-forced forward of prompt + response.
fn decode_and_check(lm: &CausalLm, prompts: &[Vec<i64>], what: &str) -> Vec<Vec<i64>> {
    decode_and_check_within(lm, prompts, what, 1e-4)
}

/// [`decode_and_check`] with log-probs equal within `tolerance`.
fn decode_and_check_within(
    lm: &CausalLm,
    prompts: &[Vec<i64>],
    what: &str,
    tolerance: f32,
) -> Vec<Vec<i64>> {
    let params = SamplingParams {
        max_new_tokens: 12,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let generations: Vec<Generation> = generate(&lm.model, prompts, &params).unwrap();
    let full: Vec<Vec<i64>> = prompts
        .iter()
        .zip(&generations)
        .map(|(p, g)| [p.as_slice(), &g.token_ids].concat())
        .collect();
    let forced = sequence_logprobs(&lm.model, &full, 1 << 16).unwrap();
    for ((prompt, g), forced) in prompts.iter().zip(&generations).zip(&forced) {
        let diff = max_abs_diff(&forced[prompt.len() - 1..], &g.logprobs);
        assert!(diff < tolerance, "{what}: max |diff| {diff}");
    }
    generations.into_iter().map(|g| g.token_ids).collect()
}

/// New random values for every variable, copied in place (what `WeightTransfer::apply` and
/// checkpoint loading do), large enough to change the greedy tokens.
fn copy_new_weights(lm: &CausalLm) {
    tch::no_grad(|| {
        for (_, mut var) in lm.vs.variables() {
            var.copy_(&(Tensor::randn_like(&var) * 0.3));
        }
    });
}

#[test]
fn decoding_follows_every_kind_of_weight_change() {
    init_threads();
    tch::manual_seed(11);
    let mut lm = random_lm();
    let prompts = random_sequences(3, 4, 9, VOCAB, 1);
    let first = decode_and_check(&lm, &prompts, "fresh model");

    copy_new_weights(&lm);
    let copied = decode_and_check(&lm, &prompts, "after copy_");
    assert_ne!(copied, first, "the new weights must change the responses");

    // An optimizer step updates the variables in place.
    let mut optimizer = nn::Sgd::default().build(&lm.vs, 5.0).unwrap();
    let batch = PaddedBatch::new(&prompts, VOCAB, 0, Device::Cpu).unwrap();
    let loss = -tch::with_grad(|| token_logprobs(&lm.model, &batch, 64).sum(Kind::Float));
    optimizer.backward_step(&loss);
    let stepped = decode_and_check(&lm, &prompts, "after an optimizer step");
    assert_ne!(stepped, copied, "the step must change the responses");

    // A dtype round trip gives every variable new storage; then an in-place change again.
    lm.vs.set_kind(Kind::Double);
    lm.vs.set_kind(Kind::Float);
    decode_and_check(&lm, &prompts, "after new storage");
    copy_new_weights(&lm);
    let last = decode_and_check(&lm, &prompts, "after new storage and copy_");
    assert_ne!(last, stepped);
}

#[test]
fn a_cached_forward_with_grad_reaches_every_projection() {
    init_threads();
    tch::manual_seed(12);
    let lm = random_lm();
    let ids = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10]).view([2, 3]);
    let positions = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]).view([2, 3]);
    let key_mask = Tensor::ones([2, 3], (Kind::Bool, Device::Cpu));
    let mut cache = KvCache::new(&lm.model, 2, 3);
    cache.target_block(0, 2, 0);
    let hidden = tch::with_grad(|| {
        lm.model
            .forward(&ids, &positions, &key_mask, Some(&mut cache))
    });
    tch::with_grad(|| hidden.square().sum(Kind::Float).backward());
    let layer = &lm.model.layers[0];
    for (name, weight) in [
        ("q_proj", &layer.self_attn.q_proj.weight),
        ("k_proj", &layer.self_attn.k_proj.weight),
        ("v_proj", &layer.self_attn.v_proj.weight),
        ("gate_proj", &layer.mlp.gate_proj.weight),
        ("up_proj", &layer.mlp.up_proj.weight),
    ] {
        let grad = weight.grad();
        assert!(grad.defined(), "{name} got no gradient");
        assert!(
            grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}"
        );
    }
}

#[test]
fn bf16_decoding_matches_a_teacher_forced_forward() {
    init_threads();
    tch::manual_seed(13);
    // bf16 parameters: `set_kind` gives every variable new storage after the model fused its
    // projections, so the first decode fuses again.
    let lm = random_lm_in(Kind::BFloat16);
    let prompts = random_sequences(3, 4, 9, VOCAB, 2);
    decode_and_check_within(&lm, &prompts, "bf16", 0.05);
    copy_new_weights(&lm);
    decode_and_check_within(&lm, &prompts, "bf16 after copy_", 0.05);
}
