//! Data parallelism gives the step of one process: DP=2 and DP=3 ranks (threads joined by
//! the TCP backend on loopback) against DP=1 on the same global batch, with and without
//! optimizer sharding, over two iterations: the same losses and the same weights within
//! 1e-6 (f32), and bit-identical weights on every rank.
use std::time::Duration;

use prime_collective::tcp::TcpOptions;
use prime_collective::{RankInfo, TcpGroup};
use prime_learner::config::ReferenceType;
use prime_learner::parallel::{DataParallel, ParallelConfig, Trained};
use prime_learner::AdamW;
use prime_learner::{
    prime_step, LearnerConfig, PrimeModels, ScoredGroup, ScoredResponse, StepMetrics,
};
use prime_model::{CausalLm, Qwen2Config};
use tch::{Device, Kind};

fn qwen2() -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": 2
    }))
    .unwrap()
}

/// torch's generator is global and ranks run as threads: seed and draw under one lock.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(seed: i64) -> CausalLm {
    let _lock = INIT.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed);
    CausalLm::random(&qwen2(), Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

/// Models from `seed`; ranks other than 0 use other seeds on purpose, since attaching must
/// replace their weights with rank 0's.
fn models(config: &LearnerConfig, seed: i64) -> PrimeModels {
    PrimeModels::new(model(seed), model(seed + 1), Some(model(seed + 2)), config)
}

/// A deterministic pseudo-random token stream (ids 3..63, so no EOS inside).
fn tokens(seed: u64, n: usize) -> Vec<i64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            3 + ((x >> 33) % 60) as i64
        })
        .collect()
}

/// Five groups of three responses of varied lengths: they split unevenly over 2 and 3 ranks.
fn groups(round: u64) -> Vec<ScoredGroup> {
    let scores = [
        1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0,
    ];
    (0..5u64)
        .map(|g| ScoredGroup {
            prompt_ids: tokens(100 * round + g, 3 + (g as usize % 4)),
            responses: (0..3u64)
                .map(|i| {
                    let mut ids = tokens(1000 * round + 10 * g + i, 2 + ((g + 2 * i) as usize % 9));
                    if i == 1 {
                        ids.push(2); // one response per group stopped at EOS
                    }
                    ScoredResponse {
                        ids,
                        score: scores[(g * 3 + i) as usize],
                        sampling_logprobs: Vec::new(),
                    }
                })
                .collect(),
        })
        .collect()
}

fn config() -> LearnerConfig {
    let mut config = LearnerConfig {
        mini_batches: 2,
        micro_batch_tokens: 40,
        reference: ReferenceType::Freeze,
        ..LearnerConfig::default()
    };
    config.prm.beta = 0.5;
    config.policy_optimizer.lr = 1e-4;
    config.prm_optimizer.lr = 1e-4;
    config
}

/// Every variable of policy and PRM, flattened, in name order.
fn weights(models: &PrimeModels) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (prefix, lm) in [("policy", &models.policy), ("prm", &models.prm)] {
        let mut vars: Vec<_> = lm.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars {
            out.push((
                format!("{prefix}.{name}"),
                Vec::<f32>::try_from(&t.reshape(-1)).unwrap(),
            ));
        }
    }
    out
}

/// Step metrics, weights, and the policy optimizer's state (unsharded format) and step count.
type Outcome = (
    Vec<StepMetrics>,
    Vec<(String, Vec<f32>)>,
    (Vec<(String, Vec<f32>)>, i64),
);

fn optimizer_state(optimizer: &AdamW) -> (Vec<(String, Vec<f32>)>, i64) {
    let (state, step) = optimizer.state();
    let flat = state
        .into_iter()
        .map(|(name, t)| (name, Vec::<f32>::try_from(&t.reshape(-1)).unwrap()))
        .collect();
    (flat, step)
}

fn two_steps(models: &mut PrimeModels, config: &LearnerConfig) -> Outcome {
    let metrics = (0..2)
        .map(|i| prime_step(models, &groups(i), config, i).unwrap())
        .collect();
    // As a checkpoint sees it: gathered from the shards when the state is sharded.
    let state = match models.parallel.take() {
        Some(mut dp) => {
            let full = dp.full_optimizer(models, Trained::Policy).unwrap();
            let state = optimizer_state(&full);
            drop(full);
            models.parallel = Some(dp);
            state
        }
        None => optimizer_state(&models.policy_optimizer),
    };
    (metrics, weights(models), state)
}

fn alone() -> Outcome {
    let config = config();
    two_steps(&mut models(&config, 1), &config)
}

fn on_ranks(world: usize, zero1: bool) -> Vec<Outcome> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let config = config();
                    let mut models = models(&config, 1 + 10 * rank as i64);
                    let info = RankInfo {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let options = TcpOptions {
                        join_timeout: Duration::from_secs(30),
                        op_timeout: Duration::from_secs(60),
                        epoch: 0,
                        token: None,
                    };
                    let group = TcpGroup::join(&info, options).unwrap();
                    let parallel = ParallelConfig {
                        zero1,
                        bucket_mb: 1,
                        ..ParallelConfig::default()
                    };
                    DataParallel::attach(&mut models, Box::new(group), parallel).unwrap();
                    two_steps(&mut models, &config)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn figures(m: &StepMetrics) -> [(&'static str, f64); 13] {
    [
        ("prm_loss", m.prm_loss),
        ("prm_new_batch_loss", m.prm_new_batch_loss),
        ("prm_new_batch_accuracy", m.prm_new_batch_accuracy),
        ("prm_accuracy", m.prm_accuracy),
        ("prm_grad_norm", m.prm_grad_norm),
        ("prm_reward_mean", m.prm_reward_mean),
        ("return_mean", m.return_mean),
        ("policy_loss", m.policy_loss),
        ("clip_fraction", m.clip_fraction),
        ("approx_kl", m.approx_kl),
        ("entropy", m.entropy),
        ("policy_grad_norm", m.policy_grad_norm),
        ("response_tokens", m.response_tokens as f64),
    ]
}

fn assert_same_step(single: &Outcome, ranks: &[Outcome], what: &str) {
    let (metrics, weights, (state, step)) = single;
    let mut worst = 0f32;
    for (rank, (rank_metrics, rank_weights, (rank_state, rank_step))) in ranks.iter().enumerate() {
        assert_eq!(step, rank_step, "{what} rank {rank}: optimizer step count");
        assert_eq!(
            state.len(),
            rank_state.len(),
            "{what} rank {rank}: optimizer state names"
        );
        for ((name, x), (other, y)) in state.iter().zip(rank_state) {
            assert_eq!(name, other);
            for (a, b) in x.iter().zip(y) {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{what} rank {rank}: {name}: {a} vs {b}"
                );
            }
        }
        for (step, (a, b)) in metrics.iter().zip(rank_metrics).enumerate() {
            for ((name, x), (_, y)) in figures(a).into_iter().zip(figures(b)) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                    "{what} rank {rank} step {step}: {name} {x} alone, {y} in parallel"
                );
            }
        }
        for ((name, x), (_, y)) in weights.iter().zip(rank_weights) {
            for (a, b) in x.iter().zip(y) {
                worst = worst.max((a - b).abs());
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{what} rank {rank}: {name} differs: {a} vs {b}"
                );
            }
        }
        assert_eq!(
            rank_weights, &ranks[0].1,
            "{what}: rank {rank} differs from rank 0"
        );
    }
    eprintln!("{what}: largest weight difference to DP=1 {worst:e}");
    // The step moved the weights, so the comparison is not of untouched models.
    let start = weights_of_fresh();
    let moved = start
        .iter()
        .zip(weights)
        .any(|((_, a), (_, b))| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-5));
    assert!(moved, "the step left the weights unchanged");
}

fn weights_of_fresh() -> Vec<(String, Vec<f32>)> {
    weights(&models(&config(), 1))
}

#[test]
fn two_ranks_take_the_single_process_step() {
    tch::set_num_threads(1);
    assert_same_step(&alone(), &on_ranks(2, false), "DP=2");
}

#[test]
fn three_ranks_with_an_idle_rank_take_the_single_process_step() {
    tch::set_num_threads(1);
    assert_same_step(&alone(), &on_ranks(3, false), "DP=3");
}

#[test]
fn sharded_optimizer_takes_the_single_process_step() {
    tch::set_num_threads(1);
    let single = alone();
    assert_same_step(&single, &on_ranks(2, true), "DP=2 ZeRO-1");
    assert_same_step(&single, &on_ranks(3, true), "DP=3 ZeRO-1");
}
