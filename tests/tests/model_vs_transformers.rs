//! The Qwen2 model against transformers on small random checkpoints that the test creates
//! with non-trivial random weights and biases.
use std::path::Path;

use prime_model::{
    generate, sequence_logprobs, token_logprobs, CausalLm, FinishReason, PaddedBatch,
    SamplingParams,
};
use prime_tests::*;
use serde_json::json;
use tch::{Device, Kind};

const VOCAB: i64 = 300;

fn make_model(dir: &Path, extra: &[&str]) {
    let mut args = vec!["make", "--out", dir.to_str().unwrap(), "--vocab", "300"];
    args.extend_from_slice(extra);
    qwen2_ref(&args);
}

fn load(dir: &Path) -> CausalLm {
    CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float).expect("load")
}

/// Our per-token log-probs match transformers within 1e-4 and greedy decoding gives the same
/// tokens.
fn check_against_reference(extra: &[&str]) {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make_model(&dir, extra);
    let lm = load(&dir);

    let sequences = random_sequences(4, 2, 40, VOCAB, 7);
    let reference = reference_logprobs(&dir, &sequences, "float32");
    let ours = sequence_logprobs(&lm.model, &sequences, 4096).unwrap();
    for (row, (r, o)) in reference.iter().zip(&ours).enumerate() {
        let diff = max_abs_diff(r, o);
        assert!(diff < 1e-4, "{extra:?} row {row}: max |diff| {diff}");
    }

    let prompts = &sequences[..3];
    let reference = reference_greedy(&dir, prompts, 12);
    let params = SamplingParams {
        max_new_tokens: 12,
        temperature: 0.0,
        stop_token_ids: lm.eos_token_ids(),
        ..SamplingParams::default()
    };
    let ours = generate(&lm.model, prompts, &params).unwrap();
    for (row, (r, o)) in reference.iter().zip(&ours).enumerate() {
        assert_eq!(r, &o.token_ids, "{extra:?} greedy row {row}");
    }
}

#[test]
fn untied_gqa_matches_transformers() {
    check_against_reference(&["--untied", "--heads", "4", "--kv-heads", "2"]);
}

#[test]
fn tied_mha_matches_transformers() {
    check_against_reference(&["--tied", "--heads", "4", "--kv-heads", "4"]);
}

#[test]
fn mqa_legacy_config_matches_transformers() {
    check_against_reference(&[
        "--heads",
        "4",
        "--kv-heads",
        "1",
        "--legacy-config",
        "--rope-theta",
        "50000",
        "--layers",
        "3",
    ]);
}

#[test]
fn sharded_checkpoint_matches_transformers() {
    check_against_reference(&["--shard-size", "40000", "--layers", "3"]);
}

#[test]
fn bf16_weights_on_disk_load_as_f32() {
    check_against_reference(&["--dtype", "bfloat16", "--tied"]);
}

/// A right-padded batch of uneven lengths, the learner's layout: our log-probs (attention
/// causal without a mask) equal transformers' on the same batch with its attention mask
/// (eager and SDPA attention) and transformers' one sequence at a time, within 1e-4; the
/// padding entries stay finite.
#[test]
fn right_padded_batch_matches_transformers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make_model(
        &dir,
        &[
            "--untied",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--layers",
            "3",
        ],
    );
    let lm = load(&dir);
    let lengths = [37usize, 1, 20, 5, 33, 2];
    let sequences: Vec<Vec<i64>> = random_sequences(lengths.len(), 37, 37, VOCAB, 21)
        .into_iter()
        .zip(lengths)
        .map(|(s, len)| s[..len].to_vec())
        .collect();
    let batch = PaddedBatch::new(&sequences, VOCAB, 0, Device::Cpu).unwrap();
    let ours = tch::no_grad(|| token_logprobs(&lm.model, &batch, 8));
    assert_eq!(ours.size(), [6, 36]);
    let all = Vec::<f32>::try_from(ours.flatten(0, -1)).unwrap();
    assert!(all.iter().all(|v| v.is_finite()), "non-finite log-prob");
    let ours: Vec<Vec<f32>> = sequences
        .iter()
        .enumerate()
        .map(|(row, s)| {
            let n = s.len() as i64 - 1;
            Vec::<f32>::try_from(ours.get(row as i64).narrow(0, 0, n)).unwrap()
        })
        .collect();
    let alone = reference_logprobs(&dir, &sequences, "float32");
    for (attn, padded) in ["eager", "sdpa"].map(|attn| {
        (
            attn,
            reference_right_padded_logprobs(&dir, &sequences, attn),
        )
    }) {
        for (row, ((o, p), a)) in ours.iter().zip(&padded).zip(&alone).enumerate() {
            assert_eq!(o.len(), lengths[row] - 1);
            let diff = max_abs_diff(o, p).max(max_abs_diff(o, a));
            assert!(diff < 1e-4, "{attn} row {row}: max |diff| {diff}");
        }
    }
}

#[test]
fn greedy_stops_after_eos_and_includes_it() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make_model(&dir, &[]);
    let lm = load(&dir);
    let prompt = random_sequences(1, 5, 5, VOCAB, 3);
    let params = SamplingParams {
        max_new_tokens: 8,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let free = generate(&lm.model, &prompt, &params).unwrap();
    // Make the third generated token a stop token: generation must end right after it.
    let stop = free[0].token_ids[2];
    let first_stop = free[0].token_ids.iter().position(|&t| t == stop).unwrap();
    let stopped = generate(
        &lm.model,
        &prompt,
        &SamplingParams {
            stop_token_ids: vec![stop],
            ..params
        },
    )
    .unwrap();
    assert_eq!(stopped[0].token_ids, free[0].token_ids[..=first_stop]);
    assert_eq!(stopped[0].finish_reason, FinishReason::Stop);
    assert_eq!(free[0].finish_reason, FinishReason::Length);
}

#[test]
fn saved_checkpoint_is_bit_exact_and_loads_in_transformers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("tied", vec!["--tied"]),
        ("untied", vec!["--untied", "--dtype", "bfloat16"]),
    ] {
        let src = tmp.path().join(name);
        make_model(&src, &extra);
        let lm = load(&src);
        let saved = tmp.path().join(format!("{name}-saved"));
        lm.save(&saved, None, prime_model::DEFAULT_MAX_SHARD_BYTES)
            .unwrap();
        let again = load(&saved);
        let a = lm.vs.variables();
        let b = again.vs.variables();
        assert_eq!(a.len(), b.len());
        for (key, tensor) in &a {
            assert!(tensor.equal(&b[key]), "{name}: {key} changed on save/load");
        }
        let compare = qwen2_ref(&[
            "compare",
            "--model",
            src.to_str().unwrap(),
            "--other",
            saved.to_str().unwrap(),
        ]);
        assert_eq!(compare["equal"], json!(true), "{name}: {compare}");

        // A sharded save loads back to the same weights too.
        let sharded = tmp.path().join(format!("{name}-sharded"));
        lm.save(&sharded, None, 30_000).unwrap();
        assert!(sharded.join("model.safetensors.index.json").exists());
        let reloaded = load(&sharded);
        for (key, tensor) in &a {
            assert!(
                tensor.equal(&reloaded.vs.variables()[key]),
                "{name} sharded: {key}"
            );
        }
    }
}

#[test]
fn bf16_and_f16_compute_track_transformers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    make_model(&dir, &["--init-std", "0.05"]);
    let sequences = random_sequences(3, 5, 30, VOCAB, 13);
    let reference_f32 = reference_logprobs(&dir, &sequences, "float32");
    for (kind, name) in [(Kind::BFloat16, "bfloat16"), (Kind::Half, "float16")] {
        let lm = CausalLm::load(&dir, Device::Cpu, kind, kind).unwrap();
        let ours = sequence_logprobs(&lm.model, &sequences, 4096).unwrap();
        let reference = reference_logprobs(&dir, &sequences, name);
        for ((o, r), r32) in ours.iter().zip(&reference).zip(&reference_f32) {
            // Both half-precision runs round differently, but each stays near the f32 values
            // and near the other.
            let ours_vs_theirs = max_abs_diff(o, r);
            let ours_vs_f32 = max_abs_diff(o, r32);
            assert!(
                ours_vs_theirs < 0.1,
                "{name}: ours vs transformers {ours_vs_theirs}"
            );
            assert!(ours_vs_f32 < 0.15, "{name}: ours vs f32 {ours_vs_f32}");
            assert!(ours_vs_f32 > 0.0, "{name}: computed in f32?");
        }
    }
}
