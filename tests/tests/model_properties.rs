//! Properties of the model layer that need no reference implementation beyond itself:
//! KV-cache decoding equals full recomputation, padding changes nothing, seeded sampling
//! repeats, and truncated sampling degenerates to greedy where it must.
use prime_model::logprobs::{position_ids, PaddedBatch};
use prime_model::{generate, sequence_logprobs, CausalLm, SamplingParams};
use prime_tests::*;
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 300;

fn random_model(dir: &std::path::Path) -> CausalLm {
    qwen2_ref(&[
        "make",
        "--out",
        dir.to_str().unwrap(),
        "--vocab",
        "300",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--layers",
        "2",
    ]);
    CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

/// Logits `[T, V]` of one sequence from a plain forward without a cache.
fn full_logits(lm: &CausalLm, sequence: &[i64]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let batch = PaddedBatch::new(&[sequence.to_vec()], VOCAB, 0, Device::Cpu).unwrap();
    let hidden = lm.model.forward(
        &batch.input_ids,
        &position_ids(&batch.attention_mask),
        &batch.attention_mask,
        None,
    );
    lm.model.logits(&hidden).get(0)
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    let prompts = random_sequences(3, 3, 17, VOCAB, 11);
    let params = SamplingParams {
        max_new_tokens: 10,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let generations = generate(&lm.model, &prompts, &params).unwrap();
    for (prompt, generation) in prompts.iter().zip(&generations) {
        let full: Vec<i64> = [prompt.as_slice(), &generation.token_ids].concat();
        // Recompute without a cache: every generated token is the argmax of the full forward,
        // and its log-prob is the full forward's log-prob.
        let logprobs = sequence_logprobs(&lm.model, std::slice::from_ref(&full), 4096)
            .unwrap()
            .remove(0);
        let generated_logprobs = &logprobs[prompt.len() - 1..];
        assert!(max_abs_diff(generated_logprobs, &generation.logprobs) < 1e-4);
        let argmax = Vec::<i64>::try_from(full_logits(&lm, &full).argmax(-1, false)).unwrap();
        assert_eq!(
            &argmax[prompt.len() - 1..full.len() - 1],
            generation.token_ids.as_slice()
        );
    }
}

#[test]
fn padded_batch_equals_each_sequence_alone() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    let sequences = random_sequences(5, 2, 30, VOCAB, 5);
    let batched = sequence_logprobs(&lm.model, &sequences, 1 << 20).unwrap();
    for (seq, together) in sequences.iter().zip(&batched) {
        let alone = sequence_logprobs(&lm.model, std::slice::from_ref(seq), 1 << 20)
            .unwrap()
            .remove(0);
        assert!(
            max_abs_diff(&alone, together) < 1e-5,
            "log-probs depend on padding"
        );
    }
    let params = SamplingParams {
        max_new_tokens: 8,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let together = generate(&lm.model, &sequences, &params).unwrap();
    for (seq, joint) in sequences.iter().zip(&together) {
        let alone = generate(&lm.model, std::slice::from_ref(seq), &params)
            .unwrap()
            .remove(0);
        assert_eq!(
            alone.token_ids, joint.token_ids,
            "left padding changed greedy tokens"
        );
        assert!(max_abs_diff(&alone.logprobs, &joint.logprobs) < 1e-4);
    }
}

/// Seeded sampling draws from torch's process-wide generator and tests run in parallel: the
/// tests that sample hold this while they do.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn seeded_sampling_repeats_and_truncation_degenerates_to_greedy() {
    init_threads();
    let _rng = TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    let prompts = random_sequences(4, 4, 12, VOCAB, 9);
    let sampled = |seed, top_k, top_p| {
        let params = SamplingParams {
            max_new_tokens: 12,
            temperature: 1.0,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        generate(&lm.model, &prompts, &params).unwrap()
    };
    assert_eq!(sampled(1, 0, 1.0), sampled(1, 0, 1.0));
    assert_ne!(
        sampled(1, 0, 1.0)
            .iter()
            .map(|g| g.token_ids.clone())
            .collect::<Vec<_>>(),
        sampled(2, 0, 1.0)
            .iter()
            .map(|g| g.token_ids.clone())
            .collect::<Vec<_>>()
    );
    let greedy = generate(
        &lm.model,
        &prompts,
        &SamplingParams {
            max_new_tokens: 12,
            temperature: 0.0,
            ..SamplingParams::default()
        },
    )
    .unwrap();
    for truncated in [sampled(3, 1, 1.0), sampled(4, 0, 1e-6)] {
        for (t, g) in truncated.iter().zip(&greedy) {
            assert_eq!(t.token_ids, g.token_ids);
        }
    }
}

#[test]
fn sampling_logprobs_are_those_of_the_tempered_distribution() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner());
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    let prompt = random_sequences(1, 6, 6, VOCAB, 21);
    let temperature = 0.7;
    let params = SamplingParams {
        max_new_tokens: 6,
        temperature,
        seed: Some(5),
        ..SamplingParams::default()
    };
    let generation = generate(&lm.model, &prompt, &params).unwrap().remove(0);
    let full: Vec<i64> = [prompt[0].as_slice(), &generation.token_ids].concat();
    let logprobs = (full_logits(&lm, &full) / temperature).log_softmax(-1, Kind::Float);
    for (i, (&token, &lp)) in generation
        .token_ids
        .iter()
        .zip(&generation.logprobs)
        .enumerate()
    {
        let pos = (prompt[0].len() - 1 + i) as i64;
        let expected = logprobs.get(pos).get(token).double_value(&[]) as f32;
        assert!(
            (expected - lp).abs() < 1e-4,
            "token {i}: {expected} vs {lp}"
        );
    }
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    let err = sequence_logprobs(&lm.model, &[vec![1, 2, VOCAB]], 1024).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = generate(&lm.model, &[vec![-1]], &SamplingParams::default()).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}
