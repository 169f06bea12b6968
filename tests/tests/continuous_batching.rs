//! The continuously refilled sampler against independent references: greedy tokens against
//! transformers' greedy generate and against decoding each prompt alone, whatever the number
//! of rows decoding at once; sampling log-probs against a teacher-forced forward of the
//! sampled tokens; seeded sampling repeats; the sampler's draws follow the distribution; and
//! a KV cache budget changes only how many rows decode at once, never the outputs, and
//! refuses a sequence it cannot hold alone.
use prime_model::{
    generate, generate::sample, generate_batched, generate_within, kv_bytes_per_token,
    sequence_logprobs, CausalLm, FinishReason, Generation, KvBudget, ModelError, SamplingParams,
};
use prime_tests::*;
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 300;

/// Seeded sampling uses torch's process-wide generator; tests here that sample hold this.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

/// Prompts of different lengths, each repeated `k` times in a row (the K samples of a prompt,
/// as the actor lays them out).
fn grouped_prompts(n: usize, k: usize, seed: u64) -> Vec<Vec<i64>> {
    random_sequences(n, 3, 19, VOCAB, seed)
        .into_iter()
        .flat_map(|p| std::iter::repeat_n(p, k))
        .collect()
}

fn token_ids(generations: &[Generation]) -> Vec<Vec<i64>> {
    generations.iter().map(|g| g.token_ids.clone()).collect()
}

#[test]
fn greedy_equals_transformers_and_one_at_a_time_for_any_number_of_rows() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let lm = random_model(&dir);
    let prompts = grouped_prompts(5, 2, 3);
    let max_new = 14;
    let plain = SamplingParams {
        max_new_tokens: max_new,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    // Transformers decodes each distinct prompt (no stop tokens: all run to the limit).
    let distinct: Vec<Vec<i64>> = prompts.iter().step_by(2).cloned().collect();
    let reference = reference_greedy(&dir, &distinct, max_new);
    for rows in [1, 3, prompts.len()] {
        let ours = generate_batched(&lm.model, &prompts, &plain, rows).unwrap();
        for (i, g) in ours.iter().enumerate() {
            assert_eq!(g.token_ids, reference[i / 2], "rows {rows}, prompt {i}");
            assert_eq!(g.finish_reason, FinishReason::Length);
        }
    }

    // Stop tokens taken from the greedy outputs, so responses end at different steps and
    // rows are refilled mid-run.
    let stop_token_ids: Vec<i64> = reference
        .iter()
        .enumerate()
        .map(|(i, r)| r[3 + 2 * i])
        .collect();
    let stopping = SamplingParams {
        stop_token_ids: stop_token_ids.clone(),
        ..plain.clone()
    };
    let alone: Vec<Generation> = prompts
        .iter()
        .map(|p| {
            generate(&lm.model, std::slice::from_ref(p), &stopping)
                .unwrap()
                .remove(0)
        })
        .collect();
    let lengths: Vec<usize> = alone.iter().map(|g| g.token_ids.len()).collect();
    assert!(
        lengths.iter().any(|&l| l < max_new) && lengths.iter().min() != lengths.iter().max(),
        "the stop tokens should end responses at different steps: {lengths:?}"
    );
    for (g, r) in alone.iter().zip(prompts.iter().enumerate()) {
        // Each response is the reference cut at its first stop token.
        let reference = &reference[r.0 / 2];
        let stop = reference.iter().position(|t| stop_token_ids.contains(t));
        assert_eq!(g.token_ids, reference[..stop.map_or(max_new, |i| i + 1)]);
        let expected = match stop {
            Some(_) => FinishReason::Stop,
            None => FinishReason::Length,
        };
        assert_eq!(g.finish_reason, expected);
    }
    for rows in [1, 2, 3, 7, prompts.len()] {
        let batched = generate_batched(&lm.model, &prompts, &stopping, rows).unwrap();
        assert_eq!(token_ids(&batched), token_ids(&alone), "rows {rows}");
        for (b, a) in batched.iter().zip(&alone) {
            assert_eq!(b.finish_reason, a.finish_reason);
            assert!(max_abs_diff(&b.logprobs, &a.logprobs) < 1e-4, "rows {rows}");
        }
    }
}

#[test]
fn sampled_logprobs_equal_a_teacher_forced_forward_and_seeds_repeat() {
    init_threads();
    let _rng = TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    let prompts = grouped_prompts(4, 3, 8);
    // A few common tokens stop responses, so rows finish at different steps and are refilled.
    let stop_token_ids: Vec<i64> = (0..40).collect();
    let params = SamplingParams {
        max_new_tokens: 16,
        temperature: 1.0,
        seed: Some(17),
        stop_token_ids,
        ..SamplingParams::default()
    };
    let sampled = generate_batched(&lm.model, &prompts, &params, 5).unwrap();
    let stopped = sampled
        .iter()
        .filter(|g| g.finish_reason == FinishReason::Stop)
        .count();
    assert!(
        stopped > 0 && stopped < sampled.len(),
        "{stopped} of {} stopped",
        sampled.len()
    );
    // The K samples of a prompt share its prefill but are drawn independently.
    assert_ne!(sampled[0].token_ids, sampled[1].token_ids);

    let full: Vec<Vec<i64>> = prompts
        .iter()
        .zip(&sampled)
        .map(|(p, g)| [p.as_slice(), &g.token_ids].concat())
        .collect();
    let forced = sequence_logprobs(&lm.model, &full, 1 << 16).unwrap();
    for ((prompt, g), forced) in prompts.iter().zip(&sampled).zip(&forced) {
        let diff = max_abs_diff(&forced[prompt.len() - 1..], &g.logprobs);
        assert!(diff < 1e-4, "max |diff| {diff}");
    }

    let again = generate_batched(&lm.model, &prompts, &params, 5).unwrap();
    assert_eq!(again, sampled);
    let other_seed = SamplingParams {
        seed: Some(18),
        ..params.clone()
    };
    let other = generate_batched(&lm.model, &prompts, &other_seed, 5).unwrap();
    assert_ne!(token_ids(&other), token_ids(&sampled));
}

#[test]
fn draws_follow_the_truncated_distribution() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner());
    init_threads();
    tch::manual_seed(3);
    let _guard = tch::no_grad_guard();
    // Token 0 has probability 0; tokens 1..=4 have 0.1, 0.2, 0.3, 0.4.
    let probs = [0.0f64, 0.1, 0.2, 0.3, 0.4];
    let logits = Tensor::from_slice(&probs.map(|p| p.ln() as f32)).view([1, 5]);
    let draws = 40_000i64;
    let logits = logits.expand([draws, 5], false).contiguous();
    let frequencies = |params: &SamplingParams| -> Vec<f64> {
        let (tokens, logprobs) = sample(&logits, params);
        let tokens = Vec::<i64>::try_from(&tokens).unwrap();
        let logprobs = Vec::<f32>::try_from(&logprobs).unwrap();
        for (&t, &lp) in tokens.iter().zip(&logprobs) {
            // The sampling log-prob is the untruncated distribution's.
            assert!((lp as f64 - probs[t as usize].ln()).abs() < 1e-5);
        }
        let mut counts = [0usize; 5];
        tokens.iter().for_each(|&t| counts[t as usize] += 1);
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    };
    let base = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    // Standard error of a frequency here is at most 0.0025: 0.012 is almost 5 of them.
    let close = |got: &[f64], want: &[f64]| {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 0.012, "{got:?} vs {want:?}");
        }
    };
    close(&frequencies(&base), &probs);
    let top_k = SamplingParams {
        top_k: 2,
        ..base.clone()
    };
    close(&frequencies(&top_k), &[0.0, 0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
    // Nucleus 0.65: 0.4 alone is short of it, 0.4 + 0.3 reaches it.
    let top_p = SamplingParams {
        top_p: 0.65,
        ..base.clone()
    };
    close(&frequencies(&top_p), &[0.0, 0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
    let hot = SamplingParams {
        temperature: 2.0,
        ..base
    };
    let tempered: Vec<f64> = probs.iter().map(|p| p.sqrt()).collect();
    let sum: f64 = tempered.iter().sum();
    let tempered: Vec<f64> = tempered.iter().map(|p| p / sum).collect();
    let (tokens, _) = sample(&logits, &hot);
    let tokens = Vec::<i64>::try_from(&tokens).unwrap();
    let mut counts = [0usize; 5];
    tokens.iter().for_each(|&t| counts[t as usize] += 1);
    let got: Vec<f64> = counts.iter().map(|&c| c as f64 / draws as f64).collect();
    close(&got, &tempered);
}

/// The random model's cache: 2 (keys, values) x 2 layers x 2 kv heads x 16 head dim (hidden 64
/// over 4 heads) x 4 bytes (f32) = 512 bytes per token.
const BYTES_PER_TOKEN: u64 = 512;

/// Budgets from one row at a time to all rows at once, for prompts of at most `longest`
/// tokens with `max_new` new ones.
fn budgets(longest: usize, max_new: usize) -> Vec<(String, KvBudget)> {
    let row = BYTES_PER_TOKEN * (longest + max_new) as u64;
    let prefix = BYTES_PER_TOKEN * longest as u64;
    vec![
        ("unlimited".into(), KvBudget::Unlimited),
        // One row, and no room to keep a prefill for a prompt's later samples.
        ("one row".into(), KvBudget::Bytes(row)),
        ("one row and a prefix".into(), KvBudget::Bytes(row + prefix)),
        ("two rows".into(), KvBudget::Bytes(2 * row + prefix - 1)),
        (
            "five rows and a prefix".into(),
            KvBudget::Bytes(5 * row + prefix),
        ),
        ("1 GiB".into(), KvBudget::from_gib(1.0).unwrap()),
    ]
}

#[test]
fn outputs_do_not_depend_on_the_kv_budget() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    assert_eq!(
        kv_bytes_per_token(lm.model.config(), Kind::Float),
        BYTES_PER_TOKEN
    );
    // Five prompts of 3 to 19 tokens, three samples each: groups straddle admissions.
    let prompts = grouped_prompts(5, 3, 11);
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let max_new = 12;
    let greedy = SamplingParams {
        max_new_tokens: max_new,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    // Stop tokens from the greedy outputs, so that rows finish at different steps.
    let free = generate(&lm.model, &prompts, &greedy).unwrap();
    let stop_token_ids: Vec<i64> = free
        .iter()
        .step_by(3)
        .enumerate()
        .map(|(i, g)| g.token_ids[2 + 2 * i])
        .collect();
    let runs = [
        SamplingParams {
            stop_token_ids: stop_token_ids.clone(),
            ..greedy.clone()
        },
        SamplingParams {
            temperature: 1.0,
            seed: Some(5),
            stop_token_ids: (0..40).collect(),
            ..greedy.clone()
        },
        SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 50,
            seed: Some(6),
            stop_token_ids: (0..40).collect(),
            ..greedy.clone()
        },
    ];
    for params in &runs {
        let reference = generate(&lm.model, &prompts, params).unwrap();
        let lengths: Vec<usize> = reference.iter().map(|g| g.token_ids.len()).collect();
        assert!(
            lengths.iter().min() < lengths.iter().max(),
            "responses should end at different steps: {lengths:?}"
        );
        for (name, budget) in budgets(longest, max_new) {
            for max_rows in [prompts.len(), 4] {
                let got = generate_within(&lm.model, &prompts, params, max_rows, budget).unwrap();
                let label = format!(
                    "temperature {}, {name}, max_rows {max_rows}",
                    params.temperature
                );
                assert_eq!(token_ids(&got), token_ids(&reference), "{label}");
                for (g, r) in got.iter().zip(&reference) {
                    assert_eq!(g.finish_reason, r.finish_reason, "{label}");
                    let diff = max_abs_diff(&g.logprobs, &r.logprobs);
                    assert!(diff < 1e-4, "{label}: log-probs differ by {diff}");
                }
            }
        }
    }
}

#[test]
fn a_sequence_that_cannot_fit_alone_is_refused_with_the_numbers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let lm = random_model(tmp.path());
    let prompts = vec![vec![5; 7], vec![6; 10], vec![7; 4]];
    let params = SamplingParams {
        max_new_tokens: 6,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    // The longest sequence is prompt 1: 10 + 6 = 16 tokens of 512 bytes, 8,192 bytes.
    let err = generate_within(&lm.model, &prompts, &params, 3, KvBudget::Bytes(8_191)).unwrap_err();
    let ModelError::Input(message) = err else {
        panic!("expected an input error, got {err}");
    };
    for number in [
        "prompt 1 ",
        "(10 tokens)",
        "(6)",
        "16 tokens",
        "8192 bytes",
        "8191 bytes",
        "512 bytes per token",
        "2 layers",
        "2 kv heads",
        "16 head dim",
        "4 bytes",
    ] {
        assert!(
            message.contains(number),
            "{number:?} missing from {message:?}"
        );
    }
    let alone = generate_within(&lm.model, &prompts, &params, 3, KvBudget::Bytes(8_192)).unwrap();
    let together = generate(&lm.model, &prompts, &params).unwrap();
    assert_eq!(token_ids(&alone), token_ids(&together));
    for (a, t) in alone.iter().zip(&together) {
        assert!(max_abs_diff(&a.logprobs, &t.logprobs) < 1e-4);
    }
}
