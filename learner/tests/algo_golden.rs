//! Golden tests of the algorithm core (`prime_learner::algo`) against the independent PyTorch
//! reference `tests/python/prime_ref.py`, on fixed random batches: padding (some of it made of
//! EOS ids), responses with several EOS, truncated responses without EOS, groups whose scores
//! are all equal, K = 2, 4, 8, fractional code scores, filter bounds hit exactly, an untrained
//! PRM (all log-ratios zero), and the repo/recipe/paper variants of every option. Besides values
//! it compares the gradients of the PRM loss and of the policy loss.
//!
//! The reference runs in the project's venv (`$PRIME_VENV`, default `~/.cache/prime-rs/venv`);
//! without it the test fails: its point is the comparison. Floats agree within 1e-6 (relative
//! above 1), masks, lengths and filter decisions exactly.
use std::path::{Path, PathBuf};
use std::process::Command;

use prime_algo::advantages::{advantages, leave_one_out, returns, rloo_outcome_rewards, whiten};
use prime_algo::filter::{group_mean_scores, keep_groups};
use prime_algo::implicit_prm::{
    dpo_abs_accuracy, dpo_accuracy, normalize_process_rewards, prm_ce_loss, process_rewards,
    ranking_accuracy, sequence_reward, token_log_ratio,
};
use prime_algo::masks::{last_token_mask, response_mask, valid_lengths};
use prime_algo::ppo::{policy_loss, token_entropy};
use prime_algo::{
    AlgoConfig, Estimator, KlEstimator, LossAggregation, ProcessBaseline, ProcessRewardVariant,
    RewardGranularity, RewardNorm,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

const TOLERANCE: f64 = 1e-6;
const EOS_IDS: [i64; 2] = [1, 2];
const PAD_ID: i64 = 0;
const VOCAB: i64 = 7;

/// One batch of inputs, as plain vectors so that the same numbers go to Rust and Python.
struct Fixture {
    name: String,
    k: i64,
    response_ids: Vec<Vec<i64>>,
    generated: Vec<Vec<bool>>,
    prm_logprobs: Vec<Vec<f32>>,
    ref_logprobs: Vec<Vec<f32>>,
    old_logprobs: Vec<Vec<f32>>,
    logprobs: Vec<Vec<f32>>,
    policy_ref_logprobs: Vec<Vec<f32>>,
    logits: Vec<Vec<Vec<f32>>>,
    scores: Vec<f32>,
    truncated: Vec<bool>,
}

fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    rng.gen_range(lo..hi)
}

/// Scores of one group, cycling through the kinds the learner sees.
fn group_scores(rng: &mut ChaCha8Rng, group: usize, k: usize) -> Vec<f32> {
    match group % 5 {
        0 => (0..k).map(|_| rng.gen_range(0..2) as f32).collect(),
        // All equal: nothing to learn from this group.
        1 => vec![[0.0, 1.0, 0.5][rng.gen_range(0..3)]; k],
        // Fractions of 10 test cases (code).
        2 => (0..k)
            .map(|_| rng.gen_range(0..=10) as f32 / 10.0)
            .collect(),
        // A mean exactly on the lower bound (0.2 = (0.8 + 0 ...) / 4 or one in five).
        3 => {
            let mut s = vec![0.0; k];
            s[0] = 0.2 * k as f32;
            if s[0] > 1.0 {
                s[0] = 1.0;
                s[1] = 0.2 * k as f32 - 1.0;
            }
            s
        }
        // A mean exactly on the upper bound.
        _ => {
            let mut s = vec![1.0; k];
            s[k - 1] = 1.0 - 0.2 * k as f32;
            if s[k - 1] < 0.0 {
                s[k - 1] = 0.0;
                s[k - 2] = 1.0 - (0.2 * k as f32 - 1.0);
            }
            s
        }
    }
}

fn fixture(
    name: &str,
    seed: u64,
    groups: usize,
    k: usize,
    t: usize,
    untrained_prm: bool,
) -> Fixture {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let b = groups * k;
    let mut response_ids = Vec::new();
    let mut generated = Vec::new();
    let mut truncated = Vec::new();
    for _ in 0..b {
        let style = rng.gen_range(0..4);
        let len = if style == 1 { t } else { rng.gen_range(1..=t) };
        let mut ids: Vec<i64> = (0..len).map(|_| rng.gen_range(3..VOCAB)).collect();
        if style >= 2 {
            // EOS somewhere, and sometimes another one after it.
            let at = rng.gen_range(0..len);
            ids[at] = EOS_IDS[rng.gen_range(0..2)];
            if at + 1 < len && rng.gen_bool(0.5) {
                ids[rng.gen_range(at + 1..len)] = EOS_IDS[0];
            }
        }
        truncated.push(!ids.iter().any(|id| EOS_IDS.contains(id)));
        let pad = if rng.gen_bool(0.3) {
            EOS_IDS[0]
        } else {
            PAD_ID
        };
        generated.push((0..t).map(|i| i < len).collect());
        ids.resize(t, pad);
        response_ids.push(ids);
    }
    let mut matrix = |lo: f32, hi: f32| -> Vec<Vec<f32>> {
        (0..b)
            .map(|_| (0..t).map(|_| uniform(&mut rng, lo, hi)).collect())
            .collect()
    };
    let ref_logprobs = matrix(-4.0, -0.05);
    let noise = matrix(-0.6, 0.6);
    let old_logprobs = matrix(-4.0, -0.05);
    let step = matrix(-0.4, 0.4);
    let policy_ref_logprobs = matrix(-4.0, -0.05);
    let prm_logprobs = ref_logprobs
        .iter()
        .zip(&noise)
        .map(|(r, n)| {
            r.iter()
                .zip(n)
                .map(|(r, n)| if untrained_prm { *r } else { r + n })
                .collect()
        })
        .collect();
    let logprobs = old_logprobs
        .iter()
        .zip(&step)
        .map(|(o, s)| o.iter().zip(s).map(|(o, s)| o + s).collect())
        .collect();
    let logits = (0..b)
        .map(|_| {
            (0..t)
                .map(|_| (0..5).map(|_| uniform(&mut rng, -3.0, 3.0)).collect())
                .collect()
        })
        .collect();
    let scores = (0..groups)
        .flat_map(|g| group_scores(&mut rng, g, k))
        .collect();
    Fixture {
        name: name.into(),
        k: k as i64,
        response_ids,
        generated,
        prm_logprobs,
        ref_logprobs,
        old_logprobs,
        logprobs,
        policy_ref_logprobs,
        logits,
        scores,
        truncated,
    }
}

fn fixtures() -> Vec<Fixture> {
    vec![
        fixture("k2", 11, 5, 2, 7, false),
        fixture("k4", 12, 5, 4, 9, false),
        fixture("k8", 13, 5, 8, 12, false),
        fixture("k4-untrained-prm", 14, 3, 4, 6, true),
    ]
}

/// The paper's defaults, and two sets of the other options.
fn configs() -> Vec<(&'static str, AlgoConfig)> {
    let mut recipe = AlgoConfig::default();
    recipe.prm.process_reward = ProcessRewardVariant::Recipe;
    recipe.advantage.process_baseline = ProcessBaseline::Paper;
    recipe.advantage.process_gamma = 0.9;
    recipe.advantage.outcome_gamma = 0.95;
    recipe.ppo.loss_aggregation = LossAggregation::TokenMean;
    recipe.ppo.entropy_coeff = 0.01;
    recipe.ppo.kl_coeff = 0.05;
    recipe.filter.drop_truncated = true;
    let mut whole = AlgoConfig::default();
    whole.prm.granularity = RewardGranularity::Whole;
    whole.prm.norm = RewardNorm::None;
    whole.prm.beta = 0.1;
    whole.ppo.kl_estimator = KlEstimator::LowVarKl;
    whole.ppo.kl_coeff = 0.1;
    whole.ppo.entropy_coeff = 0.001;
    whole.ppo.clip_ratio = 0.1;
    whole.filter.lower = 0.25;
    whole.filter.upper = 0.75;
    let mut rloo = whole.clone();
    rloo.prm.process_reward = ProcessRewardVariant::Recipe;
    rloo.prm.norm = RewardNorm::BatchNorm;
    rloo.estimator = Estimator::Rloo;
    rloo.filter.enabled = false;
    vec![
        ("default", AlgoConfig::default()),
        ("recipe", recipe),
        ("whole", whole),
        ("rloo", rloo),
    ]
}

fn snake<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap()
}

fn case_json(f: &Fixture, config: &AlgoConfig) -> Value {
    json!({
        "k": f.k,
        "eos_ids": EOS_IDS,
        "response_ids": f.response_ids,
        "generated": f.generated.iter().map(|r| r.iter().map(|&g| g as i32).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "prm_logprobs": f.prm_logprobs,
        "ref_logprobs": f.ref_logprobs,
        "old_logprobs": f.old_logprobs,
        "logprobs": f.logprobs,
        "policy_ref_logprobs": f.policy_ref_logprobs,
        "logits": f.logits,
        // The decimals the f32 scores stand for (0.6, not 0.6000000238): the reference
        // filters with exact rationals.
        "scores": f.scores.iter().map(|s| s.to_string().parse::<f64>().unwrap()).collect::<Vec<_>>(),
        "truncated": f.truncated.iter().map(|&t| t as i32).collect::<Vec<_>>(),
        "config": {
            "beta": config.prm.beta,
            "process_reward": snake(config.prm.process_reward),
            "granularity": snake(config.prm.granularity),
            "norm": snake(config.prm.norm),
            "estimator": snake(config.estimator),
            "process_baseline": snake(config.advantage.process_baseline),
            "process_gamma": config.advantage.process_gamma,
            "outcome_gamma": config.advantage.outcome_gamma,
            "clip_ratio": config.ppo.clip_ratio,
            "loss_aggregation": snake(config.ppo.loss_aggregation),
            "entropy_coeff": config.ppo.entropy_coeff,
            "kl_coeff": config.ppo.kl_coeff,
            "kl_estimator": snake(config.ppo.kl_estimator),
            "filter_enabled": config.filter.enabled,
            "filter_lower": config.filter.lower,
            "filter_upper": config.filter.upper,
            "drop_truncated": config.filter.drop_truncated,
        },
    })
}

fn matrix<T: tch::kind::Element + Copy>(rows: &[Vec<T>]) -> Tensor {
    let flat: Vec<T> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}

fn floats(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn json_floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(json_floats).collect(),
        Value::Bool(b) => vec![*b as i32 as f64],
        other => vec![other
            .as_f64()
            .unwrap_or_else(|| panic!("not a number: {other}"))],
    }
}

/// Collects mismatches so that one run reports all of them.
#[derive(Default)]
struct Check {
    failures: Vec<String>,
    compared: usize,
    worst: f64,
}

impl Check {
    fn close(&mut self, case: &str, what: &str, ours: &Tensor, reference: &Value) {
        let (ours, reference) = (floats(ours), json_floats(reference));
        self.compared += 1;
        if ours.len() != reference.len() {
            self.failures.push(format!(
                "{case} {what}: {} values vs {}",
                ours.len(),
                reference.len()
            ));
            return;
        }
        let worst = ours
            .iter()
            .zip(&reference)
            // A NaN on either side is a failure, not a value `max` skips.
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .map(|e| if e.is_nan() { f64::INFINITY } else { e })
            .fold(0.0, f64::max);
        self.worst = self.worst.max(worst);
        if worst > TOLERANCE {
            self.failures.push(format!(
                "{case} {what}: off by {worst:e}\n  rust   {ours:?}\n  python {reference:?}"
            ));
        }
    }

    fn exact(&mut self, case: &str, what: &str, ours: &Tensor, reference: &Value) {
        let (ours, reference) = (floats(ours), json_floats(reference));
        self.compared += 1;
        if ours != reference {
            self.failures
                .push(format!("{case} {what}: rust {ours:?} python {reference:?}"));
        }
    }
}

fn python() -> PathBuf {
    let venv = std::env::var_os("PRIME_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").expect("HOME is set")).join(".cache/prime-rs/venv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} not found: the algorithm golden tests need the project venv with torch \
         (run `make test`, which creates ~/.cache/prime-rs/venv, or set PRIME_VENV)",
        python.display()
    );
    python
}

fn run_reference(cases: &[Value]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cases.json");
    std::fs::write(&input, json!({ "cases": cases }).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/prime_ref.py");
    let output = Command::new(python())
        .arg(&script)
        .args(["eval", "--input"])
        .arg(&input)
        .env("PRIME_THREADS", "1")
        .output()
        .expect("python starts");
    assert!(
        output.status.success(),
        "prime_ref.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).expect("prime_ref.py prints JSON");
    out["cases"].as_array().expect("cases").clone()
}

#[test]
fn algorithm_matches_the_pytorch_reference() {
    tch::set_num_threads(1);
    let fixtures = fixtures();
    let configs = configs();
    let mut cases = Vec::new();
    for f in &fixtures {
        for (config_name, config) in &configs {
            cases.push((
                format!("{}/{config_name}", f.name),
                f,
                config,
                case_json(f, config),
            ));
        }
    }
    let references = run_reference(&cases.iter().map(|c| c.3.clone()).collect::<Vec<_>>());
    assert_eq!(references.len(), cases.len());

    let mut check = Check::default();
    let mut kept_some = (false, false);
    for ((name, f, config, _), reference) in cases.iter().zip(&references) {
        let name = name.as_str();
        let k = f.k;
        let ids = matrix(&f.response_ids);
        let generated = matrix(&f.generated);
        let scores = Tensor::from_slice(&f.scores);
        let truncated = Tensor::from_slice(&f.truncated);

        let mask = response_mask(&ids, &generated, &EOS_IDS);
        check.exact(name, "mask", &mask, &reference["mask"]);
        check.exact(
            name,
            "lengths",
            &valid_lengths(&mask),
            &reference["lengths"],
        );
        check.exact(
            name,
            "last_token",
            &last_token_mask(&mask),
            &reference["last_token"],
        );

        let prm = &config.prm;
        let prm_logprobs = matrix(&f.prm_logprobs).set_requires_grad(true);
        let q = token_log_ratio(&prm_logprobs, &matrix(&f.ref_logprobs), &mask);
        check.close(name, "q", &q, &reference["q"]);
        let ce = prm_ce_loss(&q, &mask, &scores, prm.beta);
        check.close(name, "ce_loss", &ce, &reference["ce_loss"]);
        ce.backward();
        check.close(name, "ce_grad", &prm_logprobs.grad(), &reference["ce_grad"]);
        let q = q.detach();
        check.close(
            name,
            "sequence_reward",
            &sequence_reward(&q, &mask, prm.beta),
            &reference["sequence_reward"],
        );
        let rewards = process_rewards(&q, &mask, prm.beta, prm.process_reward, prm.granularity);
        check.close(
            name,
            "process_rewards",
            &rewards,
            &reference["process_rewards"],
        );
        let normalized = normalize_process_rewards(&rewards, prm.norm);
        check.close(
            name,
            "normalized_rewards",
            &normalized,
            &reference["normalized_rewards"],
        );
        check.close(
            name,
            "dpo_acc",
            &dpo_accuracy(&rewards, &mask, &scores, k),
            &reference["dpo_acc"],
        );
        check.close(
            name,
            "dpo_acc_abs",
            &dpo_abs_accuracy(&rewards, &mask, &scores),
            &reference["dpo_acc_abs"],
        );
        match (
            ranking_accuracy(&rewards, &mask, &scores, k),
            reference["ranking_acc"].as_f64(),
        ) {
            (Some(ours), Some(theirs)) => {
                check.close(name, "ranking_acc", &Tensor::from(ours), &json!(theirs))
            }
            (None, None) => {}
            (ours, theirs) => check
                .failures
                .push(format!("{name} ranking_acc: {ours:?} vs {theirs:?}")),
        }

        let adv = &config.advantage;
        let loo = leave_one_out(&normalized, &mask, k, adv.process_baseline);
        check.close(name, "loo_process", &loo, &reference["loo_process"]);
        check.close(
            name,
            "loo_outcome",
            &rloo_outcome_rewards(&scores, &mask, k),
            &reference["loo_outcome"],
        );
        let r = returns(&normalized, &scores, &mask, k, config.estimator, adv);
        check.close(name, "returns", &r, &reference["returns"]);
        let a = advantages(&normalized, &scores, &mask, k, config.estimator, adv);
        check.close(name, "advantages", &a, &reference["advantages"]);
        check.close(name, "whiten", &whiten(&r, &mask), &reference["advantages"]);

        let entropy = token_entropy(
            &Tensor::from_slice(
                &f.logits
                    .iter()
                    .flatten()
                    .flatten()
                    .copied()
                    .collect::<Vec<f32>>(),
            )
            .view([f.logits.len() as i64, f.logits[0].len() as i64, -1]),
        );
        check.close(
            name,
            "entropy_tokens",
            &entropy,
            &reference["entropy_tokens"],
        );
        let logprobs = matrix(&f.logprobs).set_requires_grad(true);
        let policy = policy_loss(
            &logprobs,
            &matrix(&f.old_logprobs),
            &a,
            &mask,
            Some(&entropy),
            Some(&matrix(&f.policy_ref_logprobs)),
            None,
            &config.ppo,
        );
        check.close(
            name,
            "pg_loss",
            &policy.surrogate.loss,
            &reference["pg_loss"],
        );
        check.close(
            name,
            "clip_fraction",
            &policy.surrogate.clip_fraction,
            &reference["clip_fraction"],
        );
        check.close(
            name,
            "approx_kl",
            &policy.surrogate.approx_kl,
            &reference["approx_kl"],
        );
        check.close(
            name,
            "entropy",
            policy.entropy.as_ref().unwrap(),
            &reference["entropy"],
        );
        check.close(name, "kl", policy.kl.as_ref().unwrap(), &reference["kl"]);
        check.close(name, "loss", &policy.loss, &reference["loss"]);
        policy.loss.backward();
        check.close(name, "loss_grad", &logprobs.grad(), &reference["loss_grad"]);

        check.close(
            name,
            "group_means",
            &group_mean_scores(&scores, k),
            &reference["group_means"],
        );
        let keep = keep_groups(&scores, Some(&truncated), k, &config.filter);
        check.exact(name, "keep", &keep, &reference["keep"]);
        let kept = Vec::<bool>::try_from(&keep).unwrap();
        kept_some = (
            kept_some.0 || kept.iter().any(|&x| x),
            kept_some.1 || kept.iter().any(|&x| !x),
        );
    }
    assert!(
        kept_some.0 && kept_some.1,
        "the fixtures exercise both filter outcomes"
    );
    println!(
        "{} comparisons, worst float error {:e}",
        check.compared, check.worst
    );
    assert!(
        check.failures.is_empty(),
        "{} of {} comparisons failed:\n{}",
        check.failures.len(),
        check.compared,
        check.failures.join("\n")
    );
}

#[test]
fn fixtures_cover_the_edge_cases() {
    tch::set_num_threads(1);
    for f in fixtures() {
        let mask = response_mask(&matrix(&f.response_ids), &matrix(&f.generated), &EOS_IDS);
        let lengths = Vec::<i64>::try_from(valid_lengths(&mask)).unwrap();
        let t = f.response_ids[0].len() as i64;
        let padded = f.generated.iter().any(|r| r.contains(&false));
        let eos_padding = f
            .response_ids
            .iter()
            .zip(&f.generated)
            .any(|(ids, g)| ids.iter().zip(g).any(|(id, g)| !g && *id == EOS_IDS[0]));
        let full_truncated = f
            .truncated
            .iter()
            .zip(&lengths)
            .any(|(&tr, &l)| tr && l == t);
        let equal_group = f
            .scores
            .chunks(f.k as usize)
            .any(|g| g.iter().all(|&s| s == g[0]));
        let fractional = f.scores.iter().any(|&s| s != 0.0 && s != 1.0);
        assert!(
            padded && eos_padding && full_truncated && equal_group && fractional,
            "{}",
            f.name
        );
    }
}
