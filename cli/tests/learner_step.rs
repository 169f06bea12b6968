//! `prime learner step` (fixed interface) run as a real process, against the same step written
//! in plain PyTorch (tests/python/prime_step_ref.py): equal losses and equal updated weights.
use std::path::Path;
use std::process::Command;

use prime_model::CausalLm;
use prime_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind};

const EOS: i64 = 2;

fn prime() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prime"));
    cmd.env("PRIME_THREADS", "1").env("RUST_LOG", "warn");
    cmd
}

fn make_model(dir: &Path, seed: u64, tied: bool) {
    let seed = seed.to_string();
    let tie = if tied { "--tied" } else { "--untied" };
    qwen2_ref(&[
        "make",
        "--out",
        path_str(dir),
        "--vocab",
        "64",
        "--hidden",
        "32",
        "--intermediate",
        "64",
        "--eos-id",
        "2",
        "--seed",
        &seed,
        "--init-std",
        "0.05",
        tie,
    ]);
}

/// Groups with K responses: stopped responses (EOS, then junk the mask must drop), truncated
/// ones, a group whose scores are all equal and fractional code-style scores.
fn rollouts(groups: usize, k: usize, seed: u64) -> Vec<Value> {
    let prompts = random_sequences(groups, 3, 9, 60, seed);
    let responses = random_sequences(groups * k, 2, 12, 60, seed + 1);
    let score_table = [1.0, 0.0, 0.5, 0.0, 1.0, 0.25, 0.0, 1.0];
    (0..groups)
        .map(|g| {
            let responses: Vec<Value> = (0..k)
                .map(|i| {
                    let row = g * k + i;
                    let mut ids: Vec<i64> = responses[row].iter().map(|t| t + 3).collect();
                    if row % 3 != 2 {
                        // Stops: an EOS inside, possibly followed by tokens that do not count.
                        let at = (row * 7) % ids.len();
                        ids[at] = EOS;
                    }
                    let score = if g == 1 {
                        1.0
                    } else {
                        score_table[row % score_table.len()]
                    };
                    json!({ "ids": ids, "score": score })
                })
                .collect();
            json!({ "prompt_ids": prompts[g].iter().map(|t| t + 3).collect::<Vec<_>>(), "responses": responses })
        })
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let lm = CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float).expect("load");
    let mut vars: Vec<(String, Vec<f32>)> = lm
        .vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Largest difference between two models' weights, and between the first one and `before`
/// (how far the step moved it, so a test cannot pass by not updating at all).
fn compare(after: &Path, reference: &Path, before: &Path) -> (f32, f32) {
    let (a, r, b) = (weights(after), weights(reference), weights(before));
    assert_eq!(a.len(), r.len());
    let mut diff: f32 = 0.0;
    let mut moved: f32 = 0.0;
    for (((name, x), (rname, y)), (_, z)) in a.iter().zip(&r).zip(&b) {
        assert_eq!(name, rname);
        diff = diff.max(max_abs_diff(x, y));
        moved = moved.max(max_abs_diff(x, z));
    }
    (diff, moved)
}

fn check_step(groups: usize, k: usize, mini_batches: usize, estimator: &str, tied: bool) {
    check_step_with(groups, k, mini_batches, estimator, tied, None);
}

/// With `behavior_cap`, the groups carry behaviour log-probs of an older policy and both sides
/// train them with decoupled PPO (ours: `--off-policy`).
fn check_step_with(
    groups: usize,
    k: usize,
    mini_batches: usize,
    estimator: &str,
    tied: bool,
    behavior_cap: Option<f64>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let path = |name: &str| tmp.path().join(name);
    make_model(&path("policy"), 1, tied);
    make_model(&path("prm"), 2, tied);
    make_model(&path("ref"), 3, tied);
    let mut groups_json = rollouts(groups, k, 11);
    if behavior_cap.is_some() {
        // Behaviour log-probs unlike the policy's: weights exp(old − behav) spread around 1
        // and past the cap.
        for (g, group) in groups_json.iter_mut().enumerate() {
            for (i, response) in group["responses"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .enumerate()
            {
                let n = response["ids"].as_array().unwrap().len();
                let lp: Vec<f64> = (0..n)
                    .map(|t| -0.3 - 5.0 * (((g * 31 + i * 7 + t * 13) % 17) as f64 / 17.0))
                    .collect();
                response["sampling_logprobs"] = json!(lp);
            }
        }
    }
    write_jsonl(&path("rollouts.jsonl"), &groups_json);
    let (policy, prm, reference_dir, rollouts_file) =
        (dir("policy"), dir("prm"), dir("ref"), dir("rollouts.jsonl"));
    let (ours_dir, theirs_dir) = (dir("ours"), dir("theirs"));
    let mini = mini_batches.to_string();
    let common = [
        "--policy",
        &policy,
        "--prm",
        &prm,
        "--ref",
        &reference_dir,
        "--rollouts",
        &rollouts_file,
        "--mini-batches",
        &mini,
        "--beta",
        "0.5",
        // Adam moves every parameter by about lr whatever its gradient's size, so an element
        // whose gradient is near Adam's eps turns f32 rounding noise into a difference of
        // order lr/10: 2e-4 keeps that under the 1e-5 bound while each weight still moves.
        "--policy-lr",
        "2e-4",
        "--prm-lr",
        "2e-4",
        "--estimator",
        estimator,
    ];
    let cap = behavior_cap.map(|c| c.to_string());
    let mut ours_cmd = prime();
    ours_cmd
        .args(["learner", "step"])
        .args(common)
        .args(["--out", &ours_dir]);
    if let Some(cap) = &cap {
        ours_cmd.args(["--off-policy", "--behavior-weight-cap", cap]);
    }
    let out = ours_cmd.output().expect("prime runs");
    assert!(
        out.status.success(),
        "prime learner step failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--out", &theirs_dir]);
    if let Some(cap) = &cap {
        args.extend(["--behavior-cap", cap]);
    }
    let reference = run_python("tests/python/prime_step_ref.py", &args);
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(path("ours/metrics.json")).unwrap()).unwrap();

    for key in ["prm_loss", "policy_loss"] {
        let (a, b) = (
            ours[key].as_f64().unwrap(),
            reference[key].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{key}: ours {a}, reference {b}");
    }
    for model in ["policy", "prm"] {
        let (diff, moved) = compare(
            &path(&format!("ours/{model}")),
            &path(&format!("theirs/{model}")),
            &path(model),
        );
        assert!(diff < 1e-5, "{model}: weights differ by {diff}");
        if estimator == "rloo" && model == "prm" {
            assert_eq!(moved, 0.0, "rloo must leave the PRM untouched");
        } else {
            assert!(moved > 1e-4, "{model} barely moved ({moved})");
        }
    }
}

#[test]
fn prime_step_matches_pytorch() {
    init_threads();
    check_step(5, 4, 2, "prime", true);
}

#[test]
fn rloo_step_with_pairs_matches_pytorch() {
    init_threads();
    check_step(4, 2, 3, "rloo", false);
}

#[test]
fn off_policy_step_matches_pytorch_decoupled_ppo() {
    init_threads();
    check_step_with(4, 3, 2, "prime", false, Some(2.0));
}
