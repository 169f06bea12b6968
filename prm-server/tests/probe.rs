//! The step-level probe against an independent computation: transformers' log-probs of a
//! PRM and a reference it made itself, step token ranges found by encoding each trace's line
//! prefixes (not by the probe's decoding), step rewards summed by hand and the AUC counted
//! pair by pair.
use prime_model::{CausalLm, Tokenizer};
use prime_prm_server::probe::auc;
use prime_prm_server::{probe, ProbeTrace, Scorer};
use prime_tests::{init_threads, path_str, qwen2_ref, reference_logprobs};
use prime_world::{build_world, probe_cases, SplitConfig, WorldConfig, STEP_SEPARATOR};
use tch::{Device, Kind};

const BETA: f64 = 0.5;

/// The token ranges of a trace's steps: step `s` spans from the encoded length of the lines
/// before it (each with its separator) to that of the lines up to it; the last step runs to the
/// end (the answer line and the EOS).
fn step_ranges(tokenizer: &Tokenizer, text: &str, len: usize) -> Vec<std::ops::Range<usize>> {
    let lines: Vec<&str> = text.split(STEP_SEPARATOR).collect();
    let full = tokenizer.encode(text).unwrap();
    let mut bounds = vec![0];
    for s in 1..lines.len() {
        let prefix = format!("{}{STEP_SEPARATOR}", lines[..s].join(STEP_SEPARATOR));
        let ids = tokenizer.encode(&prefix).unwrap();
        assert_eq!(
            ids,
            full[..ids.len()],
            "the separator ends a token: {prefix:?}"
        );
        bounds.push(ids.len());
    }
    bounds.push(len);
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

#[test]
fn step_rewards_and_auc_equal_transformers_and_a_pair_count() {
    init_threads();
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        seed: 3,
        sft: SplitConfig::with_size(200),
        rl: SplitConfig::with_size(100),
        heldout: SplitConfig::with_size(100),
        vocab_size: 400,
        ..WorldConfig::default()
    };
    let world = build_world(&cfg, &dir.path().join("world")).unwrap();
    let tokenizer = Tokenizer::from_dir(&world.tokenizer_dir).unwrap();
    let eos = tokenizer.token_id("<|im_end|>").unwrap();
    let vocab = tokenizer.vocab_size().to_string();
    let make = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        qwen2_ref(&[
            "make",
            "--out",
            path_str(&out),
            "--vocab",
            &vocab,
            "--eos-id",
            &eos.to_string(),
            "--seed",
            seed,
            "--hidden",
            "32",
            "--intermediate",
            "64",
            "--max-pos",
            "256",
        ]);
        out
    };
    let (prm_dir, ref_dir) = (make("prm", "5"), make("ref", "6"));
    let load = |d: &std::path::Path| CausalLm::load(d, Device::Cpu, Kind::Float, Kind::Float);
    let scorer = Scorer::new(load(&prm_dir).unwrap(), load(&ref_dir).unwrap(), BETA, 300).unwrap();

    let cases = probe_cases(&cfg, 12).unwrap();
    let traces: Vec<ProbeTrace> = cases
        .iter()
        .map(|c| ProbeTrace::from_case(c, &tokenizer, eos).unwrap())
        .collect();
    let report = probe(&scorer, &tokenizer, &"lines".parse().unwrap(), &traces).unwrap();
    assert_eq!(report.cases, 12);

    // transformers' log-probs of every (prompt, response) sequence under both models.
    let sequences: Vec<Vec<i64>> = traces
        .iter()
        .flat_map(|t| [&t.right_ids, &t.wrong_ids].map(|r| [t.prompt_ids.as_slice(), r].concat()))
        .collect();
    let prm = reference_logprobs(&prm_dir, &sequences, "float32");
    let reference = reference_logprobs(&ref_dir, &sequences, "float32");
    let (mut wrong, mut right) = (Vec::new(), Vec::new());
    for (i, (case, trace)) in cases.iter().zip(&traces).enumerate() {
        let p = trace.prompt_ids.len();
        for (row, text, ids, got) in [
            (
                2 * i,
                &case.correct,
                &trace.right_ids,
                &report.scores[i].right,
            ),
            (
                2 * i + 1,
                &case.flawed,
                &trace.wrong_ids,
                &report.scores[i].wrong,
            ),
        ] {
            let ranges = step_ranges(&tokenizer, text, ids.len());
            assert_eq!(ranges.len(), got.len(), "case {i}: steps");
            for (s, range) in ranges.into_iter().enumerate() {
                let expected: f64 = range
                    .map(|t| BETA * f64::from(prm[row][p - 1 + t] - reference[row][p - 1 + t]))
                    .sum();
                assert!(
                    (expected - f64::from(got[s])).abs() < 1e-4,
                    "case {i} row {row} step {s}: {} vs transformers {expected}",
                    got[s]
                );
                if s == case.step {
                    if row % 2 == 0 {
                        right.push(expected);
                    } else {
                        wrong.push(expected);
                    }
                }
            }
        }
    }
    // The AUC: right step above wrong step, every pair, ties half.
    let mut wins = 0.0;
    for r in &right {
        for w in &wrong {
            wins += if r > w {
                1.0
            } else if r == w {
                0.5
            } else {
                0.0
            };
        }
    }
    let expected_auc = wins / (right.len() * wrong.len()) as f64;
    assert!(
        (report.auc - expected_auc).abs() < 1e-9,
        "{} vs {expected_auc}",
        report.auc
    );
    // Random models give both kinds of comparisons, so the check is not vacuous.
    assert!(expected_auc > 0.0 && expected_auc < 1.0, "{expected_auc}");
}

#[test]
fn auc_by_hand() {
    // Pairs (h, l): (3,1) (3,2) (3,2) win; (2,1) win, (2,2) twice tie; (0,*) lose:
    // (3 + 1 + 1 + 0) of 9.
    let got = auc(&[3.0, 2.0, 0.0], &[1.0, 2.0, 2.0]).unwrap();
    assert!((got - 5.0 / 9.0).abs() < 1e-12, "{got}");
    assert_eq!(auc(&[1.0, 2.0], &[0.0, -1.0]), Some(1.0));
    assert_eq!(auc(&[0.0], &[1.0, 2.0]), Some(0.0));
    assert_eq!(auc(&[0.5], &[0.5]), Some(0.5));
    assert_eq!(auc(&[], &[1.0]), None);
}
