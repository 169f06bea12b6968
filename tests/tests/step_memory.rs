//! The learner step's memory switches: activation recomputation gives the same step as the
//! plain backward, and bf16 weights with f32 masters train (weights stay bf16 and move).
use prime_algo::ReferenceType;
use prime_learner::{prime_step, LearnerConfig, PrimeModels, ScoredGroup, ScoredResponse};
use prime_model::{CausalLm, Qwen2Config};
use prime_tests::{init_threads, random_sequences};
use tch::{Device, Kind, Tensor};

fn qwen2() -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": 2
    }))
    .unwrap()
}

/// torch's generator is global and the tests run in parallel: seed and draw under one lock.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(seed: i64, kind: Kind) -> CausalLm {
    let _lock = INIT.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed);
    CausalLm::random(&qwen2(), Device::Cpu, kind, Kind::Float).unwrap()
}

fn models(config: &LearnerConfig, kind: Kind) -> PrimeModels {
    PrimeModels::new(model(1, kind), model(2, kind), Some(model(3, kind)), config)
}

fn groups() -> Vec<ScoredGroup> {
    let prompts = random_sequences(4, 3, 8, 60, 5);
    let responses = random_sequences(12, 2, 14, 60, 6);
    let scores = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25, 1.0, 0.0, 0.0, 1.0];
    prompts
        .iter()
        .enumerate()
        .map(|(g, p)| ScoredGroup {
            prompt_ids: p.iter().map(|t| t + 3).collect(),
            responses: (0..3)
                .map(|i| ScoredResponse {
                    ids: responses[g * 3 + i].iter().map(|t| t + 3).collect(),
                    score: scores[g * 3 + i],
                    sampling_logprobs: Vec::new(),
                    truncated: false,
                })
                .collect(),
        })
        .collect()
}

fn config() -> LearnerConfig {
    let mut config = {
        let mut c = LearnerConfig::default();
        c.algo.mini_batches = 2;
        c.memory.micro_batch_tokens = 40;
        c.algo.reference = ReferenceType::Freeze;
        c
    };
    config.algo.prm.beta = 0.5;
    config.policy_optimizer.lr = 2e-4;
    config.prm_optimizer.lr = 2e-4;
    config
}

fn variables(lm: &CausalLm) -> Vec<(String, Tensor)> {
    let mut vars: Vec<_> = lm.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

#[test]
fn recomputed_activations_give_the_same_step() {
    init_threads();
    let plain_config = config();
    let recompute_config = {
        let mut c = config();
        c.memory.recompute_activations = true;
        c
    };
    let mut plain = models(&plain_config, Kind::Float);
    let mut recomputed = models(&recompute_config, Kind::Float);
    let before = variables(&model(1, Kind::Float));
    let a = prime_step(
        &mut plain,
        &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
        &groups(),
        &plain_config,
        0,
    )
    .unwrap();
    let b = prime_step(
        &mut recomputed,
        &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
        &groups(),
        &recompute_config,
        0,
    )
    .unwrap();
    assert!(
        (a.prm_loss - b.prm_loss).abs() < 1e-6,
        "{} vs {}",
        a.prm_loss,
        b.prm_loss
    );
    assert!(
        (a.policy_loss - b.policy_loss).abs() < 1e-6,
        "{} vs {}",
        a.policy_loss,
        b.policy_loss
    );
    let mut moved = 0f64;
    for (lm_a, lm_b) in [
        (&plain.policy, &recomputed.policy),
        (&plain.prm, &recomputed.prm),
    ] {
        for ((name, x), (_, y)) in variables(lm_a).iter().zip(variables(lm_b)) {
            let diff = (x - &y).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name} differs by {diff}");
        }
    }
    for ((_, x), (_, y)) in variables(&plain.policy).iter().zip(&before) {
        moved = moved.max((x - y).abs().max().double_value(&[]));
    }
    assert!(moved > 1e-4, "the policy did not move ({moved})");
}

#[test]
fn bf16_weights_with_master_weights_train() {
    init_threads();
    let config = {
        let mut c = config();
        c.memory.master_weights = true;
        c
    };
    let mut bf16 = models(&config, Kind::BFloat16);
    let before = variables(&model(1, Kind::BFloat16));
    let metrics = prime_step(
        &mut bf16,
        &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
        &groups(),
        &config,
        0,
    )
    .unwrap();
    assert!(metrics.prm_loss.is_finite() && metrics.policy_loss.is_finite());
    let mut moved = 0f64;
    for ((name, x), (_, y)) in variables(&bf16.policy).iter().zip(&before) {
        assert_eq!(x.kind(), Kind::BFloat16, "{name} left bf16");
        moved = moved.max((x - y).abs().max().double_value(&[]));
    }
    assert!(moved > 0.0, "no bf16 weight changed");
    let (state, _) = bf16.policy_optimizer.state();
    assert!(
        state.keys().any(|k| k.ends_with(".master")),
        "no f32 masters in the optimizer state"
    );
}

#[test]
fn the_reference_can_be_the_old_policy_and_rewards_can_follow_the_update() {
    init_threads();
    // With the old policy as reference and a PRM equal to the policy, every log-ratio on the
    // new batch is 0 before the PRM's first update: with one mini-batch (the new-batch figures
    // come from the forward that trains each mini-batch, before its own update) the PRM's
    // loss is ln 2 exactly, and its pairwise accuracy is what the authors' tie rule gives (a
    // tie reads as "the later response is not worse"): by hand, groups [1, 0, 0.5],
    // [0, 1, 1], [0, 0.25, 1], [0, 0, 1] score 0.25, 1, 1, 1. The ranking within groups
    // counts a tie half.
    let policy_ref = {
        let mut c = config();
        c.algo.reference = ReferenceType::Policy;
        c.algo.mini_batches = 1;
        c
    };
    let mut same = PrimeModels::new(
        model(1, Kind::Float),
        model(1, Kind::Float),
        None,
        &policy_ref,
    );
    let metrics = prime_step(
        &mut same,
        &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
        &groups(),
        &policy_ref,
        0,
    )
    .unwrap();
    assert!((metrics.prm_new_batch_loss - std::f64::consts::LN_2).abs() < 1e-6);
    assert!((metrics.prm_new_batch_accuracy - 0.8125).abs() < 1e-9);
    // Every pair of differently scored responses ties: the ranking within groups is exactly
    // chance (after the PRM's update on the batch it would not be).
    assert_eq!(metrics.prm_new_batch_ranking, Some(0.5));

    // Update-then-score takes the same PRM updates; only the rewards (from a second forward
    // after them) differ from single-forward.
    let after_config = {
        let mut c = config();
        c.algo.prm_update = prime_algo::PrmUpdate::UpdateThenScore;
        c
    };
    let (mut single, mut double) = (
        models(&config(), Kind::Float),
        models(&after_config, Kind::Float),
    );
    let a = prime_step(
        &mut single,
        &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
        &groups(),
        &config(),
        0,
    )
    .unwrap();
    let b = prime_step(
        &mut double,
        &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
        &groups(),
        &after_config,
        0,
    )
    .unwrap();
    for ((name, x), (_, y)) in variables(&single.prm).iter().zip(variables(&double.prm)) {
        assert!(x.equal(&y), "{name}: the PRM updates differ");
    }
    assert!(
        (a.prm_reward_mean - b.prm_reward_mean).abs() > 1e-6,
        "rewards after the update equal those before it"
    );
    // The new-batch figures come from the training forward in both modes (no scoring pass of
    // their own): equal across the modes, and under single-forward they are the figures of
    // the rewards themselves.
    assert_eq!(a.prm_new_batch_loss, b.prm_new_batch_loss);
    assert_eq!(a.prm_new_batch_accuracy, b.prm_new_batch_accuracy);
    assert_eq!(a.prm_new_batch_accuracy, a.prm_accuracy);
    assert_eq!(a.prm_new_batch_ranking, b.prm_new_batch_ranking);
    assert!(a.prm_new_batch_ranking.is_some());
}
