//! Data parallelism gives the step of one process: DP=2 and DP=3 ranks (threads joined by
//! the TCP backend on loopback) against DP=1 on the same global batch, with and without
//! optimizer sharding (ZeRO-1), gradient sharding (ZeRO-2) and parameter sharding (ZeRO-3),
//! over two iterations: the same losses, gradient norms and weights within 1e-6 (f32), and
//! bit-identical weights on every rank. A ZeRO-2 rank never writes a parameter's `.grad`, and
//! its gradient accumulator is its share of the model; a ZeRO-3 rank holds 1/W of the
//! parameters, gradients and optimizer state, and its checkpoint resumes on another W.
use std::time::Duration;

use prime_algo::ReferenceType;
use prime_collective::tcp::TcpOptions;
use prime_collective::{RankInfo, TcpGroup};
use prime_learner::config::ParallelConfig;
use prime_learner::parallel::{DataParallel, Resident, Role, Trained};
use prime_learner::AdamW;
use prime_learner::{
    prime_step, LearnerConfig, PrimeModels, ScoredGroup, ScoredResponse, StepMetrics,
};
use prime_model::logprobs::PaddedBatch;
use prime_model::{CausalLm, Qwen2Config};
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
                        truncated: false,
                    }
                })
                .collect(),
        })
        .collect()
}

fn config() -> LearnerConfig {
    let mut config = LearnerConfig::default();
    config.algo.mini_batches = 2;
    config.memory.micro_batch_tokens = 40;
    config.algo.reference = ReferenceType::Freeze;
    config.algo.prm.beta = 0.5;
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

/// Named flattened variables, as [`weights`] lists them.
type Weights = Vec<(String, Vec<f32>)>;

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

fn two_steps(models: &mut PrimeModels, dp: &mut DataParallel, config: &LearnerConfig) -> Outcome {
    let metrics = (0..2)
        .map(|i| prime_step(models, dp, &groups(i), config, i).unwrap())
        .collect();
    // ZeRO-3: the variables hold nothing between passes; every rank gathers them whole.
    for role in [Role::Policy, Role::Prm] {
        dp.unshard(role, Some(Device::Cpu)).unwrap();
    }
    // As a checkpoint sees it: gathered from the shards when the state is sharded.
    let full = dp.full_optimizer(models, Trained::Policy).unwrap();
    let state = optimizer_state(&full);
    drop(full);
    (metrics, weights(models), state)
}

fn alone() -> Outcome {
    alone_with(&config())
}

fn alone_with(config: &LearnerConfig) -> Outcome {
    two_steps(
        &mut models(config, 1),
        &mut DataParallel::single(tch::Device::Cpu),
        config,
    )
}

/// The config of the ZeRO-2 runs, DP=1 included: recomputation, which ZeRO-2 needs.
fn recompute_config() -> LearnerConfig {
    let mut config = config();
    config.memory.recompute_activations = true;
    config
}

fn on_ranks(world: usize, zero1: bool) -> Vec<Outcome> {
    let parallel = ParallelConfig {
        zero1,
        bucket_mb: 1,
        ..ParallelConfig::default()
    };
    on_ranks_with(world, &config(), &parallel, |_, _| {})
}

/// `world` ranks as threads, each attached with `parallel`, taking two steps under `config`;
/// `inspect` sees each rank's models after the steps.
fn on_ranks_with(
    world: usize,
    config: &LearnerConfig,
    parallel: &ParallelConfig,
    inspect: impl Fn(&mut PrimeModels, &DataParallel) + Sync,
) -> Vec<Outcome> {
    on_ranks_built(
        world,
        config,
        parallel,
        |seed| models(config, seed),
        inspect,
    )
}

/// [`on_ranks_with`] on the models `build` makes from a seed.
fn on_ranks_built(
    world: usize,
    config: &LearnerConfig,
    parallel: &ParallelConfig,
    build: impl Fn(i64) -> PrimeModels + Sync,
    inspect: impl Fn(&mut PrimeModels, &DataParallel) + Sync,
) -> Vec<Outcome> {
    let port = free_port();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (inspect, build) = (&inspect, &build);
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let mut models = build(1 + 10 * rank as i64);
                    let group = join(rank, world, port);
                    let mut dp =
                        DataParallel::attach(&mut models, Box::new(group), parallel.clone())
                            .unwrap();
                    let outcome = two_steps(&mut models, &mut dp, config);
                    inspect(&mut models, &dp);
                    outcome
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rank `rank` of a TCP ring of `world` on loopback `port`.
fn join(rank: usize, world: usize, port: u16) -> TcpGroup {
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
    TcpGroup::join(&info, options).unwrap()
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

fn zero2() -> ParallelConfig {
    ParallelConfig {
        zero2: true,
        bucket_mb: 1,
        ..ParallelConfig::default()
    }
}

/// Every trainable parameter of policy and PRM.
fn trained(models: &PrimeModels) -> Vec<(String, Tensor)> {
    let policy = models.policy.vs.variables().into_iter();
    let prm = models.prm.vs.variables().into_iter();
    policy
        .chain(prm)
        .filter(|(_, t)| t.requires_grad())
        .collect()
}

#[test]
fn sharded_gradients_take_the_single_process_step() {
    tch::set_num_threads(1);
    let config = recompute_config();
    let single = alone_with(&config);
    let check = |models: &mut PrimeModels, _: &DataParallel| {
        // No rank ever held a whole model's gradients in `.grad`.
        for (name, p) in trained(models) {
            assert!(!p.grad().defined(), "{name} has a .grad under ZeRO-2");
        }
    };
    // One rank with sharding on: the same code path with every collective the identity.
    let mut one = models(&config, 1);
    let mut one_dp =
        DataParallel::attach(&mut one, Box::new(prime_collective::Single), zero2()).unwrap();
    let outcome = two_steps(&mut one, &mut one_dp, &config);
    check(&mut one, &one_dp);
    assert_same_step(&single, &[outcome], "DP=1 ZeRO-2");
    assert_same_step(
        &single,
        &on_ranks_with(2, &config, &zero2(), check),
        "DP=2 ZeRO-2",
    );
    assert_same_step(
        &single,
        &on_ranks_with(3, &config, &zero2(), check),
        "DP=3 ZeRO-2",
    );
}

#[test]
fn zero2_accumulates_only_its_share_of_the_gradients() {
    tch::set_num_threads(1);
    let config = recompute_config();
    for world in [2usize, 3] {
        on_ranks_with(world, &config, &zero2(), |models, dp| {
            for (which, lm) in [
                (Trained::Policy, &models.policy),
                (Trained::Prm, &models.prm),
            ] {
                let total: usize = lm.vs.trainable_variables().iter().map(Tensor::numel).sum();
                // Each bucket (here one per backward stage) is padded to a multiple of W.
                let buckets = lm.model.gradient_stages().len();
                let len = dp.gradient_shard_len(which).expect("gradients are sharded");
                assert!(
                    len >= total / world && len <= total / world + buckets,
                    "W={world} {which:?}: shard of {len} elements for {total} parameters"
                );
            }
        });
    }
}

#[test]
fn zero2_without_recomputation_is_refused() {
    let mut config = config();
    config.parallel.zero2 = true;
    let message = config.validate().unwrap_err();
    assert!(
        message.contains("learner.parallel.zero2")
            && message.contains("learner.memory.recompute_activations"),
        "{message}"
    );
    config.memory.recompute_activations = true;
    config.validate().unwrap();
    // A step refuses too, for a config built past `validate`.
    let config = self::config();
    let mut models = models(&config, 1);
    let mut models_dp =
        DataParallel::attach(&mut models, Box::new(prime_collective::Single), zero2()).unwrap();
    let error = prime_step(&mut models, &mut models_dp, &groups(0), &config, 0)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("learner.parallel.zero2")
            && error.contains("learner.memory.recompute_activations"),
        "{error}"
    );
}

#[test]
fn the_gradient_sink_gets_each_stage_once_and_no_grad_is_written() {
    tch::set_num_threads(1);
    sink_gets_the_accumulated_gradients(true);
    sink_gets_the_accumulated_gradients(false);
}

/// A model like [`model`]'s, with tied or untied embeddings.
fn model_tied(seed: i64, tied: bool) -> CausalLm {
    let mut config = qwen2();
    config.tie_word_embeddings = tied;
    let _lock = INIT.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(seed);
    CausalLm::random(&config, Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

/// `token_logprobs_backward_to` hands over, stage by stage, gradients that add up to what the
/// recomputing backward accumulates into `.grad`, and writes no `.grad` itself.
fn sink_gets_the_accumulated_gradients(tied: bool) {
    let lm = model_tied(7, tied);
    let sequences: Vec<Vec<i64>> = (0..3u64).map(|i| tokens(i, 5 + 3 * i as usize)).collect();
    let batch = PaddedBatch::new(&sequences, 64, 0, Device::Cpu).unwrap();
    let width = batch.input_ids.size()[1] - 1;
    let weights = Tensor::arange(3 * width, (Kind::Float, Device::Cpu))
        .sin()
        .view([3, width]);
    let loss = |logprobs: &Tensor| (logprobs * &weights).sum(Kind::Float);
    // The reference: recomputation accumulating into `.grad`.
    let reference = lm.model.token_logprobs_backward(&batch, 4, true, loss);
    let expected: Vec<(String, Tensor)> = lm
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.grad().copy()))
        .collect();
    let lm = model_tied(7, tied);
    let stages = lm.model.gradient_stages();
    let mut received: Vec<(Vec<Tensor>, Vec<Tensor>)> = Vec::new();
    let mut sink = |params: &[Tensor], grads: Vec<Tensor>| {
        // While the pass runs, no parameter has a `.grad`.
        assert!(lm
            .vs
            .trainable_variables()
            .iter()
            .all(|p| !p.grad().defined()));
        received.push((params.iter().map(Tensor::shallow_clone).collect(), grads));
    };
    let out = lm
        .model
        .token_logprobs_backward_to(&batch, 4, &mut sink, loss);
    assert!((out.loss.double_value(&[]) - reference.loss.double_value(&[])).abs() < 1e-6);
    assert_eq!(received.len(), stages.len(), "one call per stage");
    for ((params, grads), stage) in received.iter().zip(&stages) {
        assert_eq!(params.len(), stage.len());
        assert_eq!(grads.len(), stage.len());
        for (p, q) in params.iter().zip(stage) {
            assert_eq!(
                p.data_ptr(),
                q.data_ptr(),
                "stages in gradient_stages order"
            );
        }
    }
    // The handed-over gradients add up to the accumulated ones (tied embeddings: twice).
    for (name, want) in expected {
        let var = &lm.vs.variables()[&name];
        let mut got = Tensor::zeros_like(var);
        for (params, grads) in &received {
            for (p, g) in params.iter().zip(grads) {
                if p.data_ptr() == var.data_ptr() && g.defined() {
                    got += g;
                }
            }
        }
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "tied {tied}: {name}: {diff}");
        assert!(
            want.abs().max().double_value(&[]) > 0.0,
            "{name} has a gradient"
        );
    }
}

#[test]
fn zero2_resumes_from_an_unsharded_checkpoint() {
    tch::set_num_threads(1);
    let config = recompute_config();
    let mut single = models(&config, 1);
    let mut single_dp = DataParallel::single(tch::Device::Cpu);
    let expected: Vec<StepMetrics> = (0..3)
        .map(|i| prime_step(&mut single, &mut single_dp, &groups(i), &config, i).unwrap())
        .collect();
    let (world, ports) = (2, [free_port(), free_port()]);
    let config = &config;
    let ranks: Vec<(StepMetrics, Weights)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let seed = 1 + 10 * rank as i64;
                    let mut first = models(config, seed);
                    let group = join(rank, world, ports[0]);
                    let mut first_dp =
                        DataParallel::attach(&mut first, Box::new(group), zero2()).unwrap();
                    for i in 0..2 {
                        prime_step(&mut first, &mut first_dp, &groups(i), config, i).unwrap();
                    }
                    // What a checkpoint holds: the optimizers gathered into the unsharded form.
                    let mut dp = first_dp;
                    let states = [Trained::Policy, Trained::Prm].map(|which| {
                        let (state, step) = dp.full_optimizer(&first, which).unwrap().state();
                        let state: std::collections::BTreeMap<String, Tensor> =
                            state.into_iter().map(|(n, t)| (n, t.copy())).collect();
                        (state, step)
                    });
                    drop(dp);
                    // A restarted rank loads the checkpoint and shards it again.
                    let mut resumed = models(config, seed);
                    resumed.policy.vs.copy(&first.policy.vs).unwrap();
                    resumed.prm.vs.copy(&first.prm.vs).unwrap();
                    let [(policy, policy_step), (prm, prm_step)] = states;
                    resumed
                        .policy_optimizer
                        .load_state(&policy, policy_step)
                        .unwrap();
                    resumed.prm_optimizer.load_state(&prm, prm_step).unwrap();
                    let group = join(rank, world, ports[1]);
                    let mut resumed_dp =
                        DataParallel::attach(&mut resumed, Box::new(group), zero2()).unwrap();
                    let metrics =
                        prime_step(&mut resumed, &mut resumed_dp, &groups(2), config, 2).unwrap();
                    (metrics, weights(&resumed))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want = weights(&single);
    for (rank, (metrics, rank_weights)) in ranks.iter().enumerate() {
        for ((name, x), (_, y)) in figures(&expected[2]).into_iter().zip(figures(metrics)) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "rank {rank} after resuming: {name} {x} alone, {y} resumed"
            );
        }
        for ((name, x), (_, y)) in want.iter().zip(rank_weights) {
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= 1e-6, "rank {rank}: {name}: {a} vs {b}");
            }
        }
    }
}

/// Elements of state the optimizers of `models` hold on the device, policy and PRM.
fn allocated(models: &PrimeModels) -> [usize; 2] {
    [&models.policy_optimizer, &models.prm_optimizer].map(AdamW::allocated_state_elements)
}

/// Moments (m and v) of a whole model's optimizer, policy and PRM: what an unsharded
/// optimizer allocates.
fn full_moments(models: &PrimeModels) -> [usize; 2] {
    [&models.policy, &models.prm].map(|lm| {
        2 * lm
            .vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .sum::<usize>()
    })
}

/// Checks that a rank of `world` holds its share of the moments on the device: 1/W of
/// the whole model's (up to the padding of a few buckets), never the whole.
fn assert_share(models: &PrimeModels, world: usize, what: &str) {
    for ((held, full), name) in allocated(models)
        .into_iter()
        .zip(full_moments(models))
        .zip(["policy", "prm"])
    {
        assert!(
            held * world >= full && held * world <= full + 2 * world * 64,
            "{what} {name}: {held} elements of state on the device, the model's {full} / {world}"
        );
    }
}

#[test]
fn optimizers_are_built_and_resumed_without_device_state() {
    tch::set_num_threads(1);
    let config = recompute_config();
    let mut fresh = models(&config, 1);
    let mut fresh_dp = DataParallel::single(tch::Device::Cpu);
    assert_eq!(
        allocated(&fresh),
        [0, 0],
        "a fresh PrimeModels allocates no state"
    );
    // The checkpoint's view of a fresh optimizer (zeros) allocates nothing either.
    let (state, _) = fresh.policy_optimizer.state();
    assert!(state
        .values()
        .all(|t| t.abs().max().double_value(&[]) == 0.0));
    assert_eq!(allocated(&fresh), [0, 0]);
    // Alone, the first step allocates the whole moments.
    prime_step(&mut fresh, &mut fresh_dp, &groups(0), &config, 0).unwrap();
    assert_eq!(allocated(&fresh), full_moments(&fresh));
    // Loaded to the host: staged, nothing on the device until a step.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy_optimizer.safetensors");
    prime_learner::checkpoint::save_optimizer(&path, &fresh.policy_optimizer).unwrap();
    let mut resumed = models(&config, 1);
    prime_learner::checkpoint::load_optimizer_to_host(&path, &mut resumed.policy_optimizer)
        .unwrap();
    assert_eq!(allocated(&resumed), [0, 0]);
    assert_eq!(
        resumed.policy_optimizer.staged_state_elements(),
        full_moments(&resumed)[0]
    );
}

/// ZeRO-1 and ZeRO-2 on DP=2 from fresh optimizers, then resumed the way the trainer does:
/// rank 0 loads the gathered checkpoint to the host, rank 1 starts from fresh models. No
/// rank holds more than its share of the moments on the device after building, loading or
/// attaching, and the resumed step is the single process's third.
#[test]
fn sharded_optimizers_take_only_their_share_and_resume_from_the_host() {
    tch::set_num_threads(1);
    let config = recompute_config();
    let mut single = models(&config, 1);
    let mut single_dp = DataParallel::single(tch::Device::Cpu);
    let expected: Vec<StepMetrics> = (0..3)
        .map(|i| prime_step(&mut single, &mut single_dp, &groups(i), &config, i).unwrap())
        .collect();
    let want = weights(&single);
    let zero1 = ParallelConfig {
        zero1: true,
        bucket_mb: 1,
        ..ParallelConfig::default()
    };
    for (label, parallel) in [("ZeRO-1", zero1), ("ZeRO-2", zero2())] {
        let dir = tempfile::tempdir().unwrap();
        let (world, ports) = (2, [free_port(), free_port()]);
        let (config, parallel, dir) = (&config, &parallel, dir.path());
        let ranks: Vec<(StepMetrics, Weights)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    scope.spawn(move || {
                        tch::set_num_threads(1);
                        let seed = 1 + 10 * rank as i64;
                        let mut first = models(config, seed);
                        assert_eq!(allocated(&first), [0, 0], "{label}: built");
                        let group = join(rank, world, ports[0]);
                        let mut first_dp =
                            DataParallel::attach(&mut first, Box::new(group), parallel.clone())
                                .unwrap();
                        // Fresh shards stay unallocated until the first step.
                        assert_eq!(allocated(&first), [0, 0], "{label}: attached fresh");
                        for i in 0..2 {
                            prime_step(&mut first, &mut first_dp, &groups(i), config, i).unwrap();
                        }
                        assert_share(&first, world, &format!("{label} after two steps"));
                        let updates = first.policy_optimizer.step_count();
                        assert!(updates >= 2, "{label}: {updates} updates");
                        // The checkpoint: rank 0 writes the gathered optimizers.
                        let mut dp = first_dp;
                        for (which, file) in [
                            (Trained::Policy, "policy.safetensors"),
                            (Trained::Prm, "prm.safetensors"),
                        ] {
                            if rank == 0 {
                                let full = dp.full_optimizer(&first, which).unwrap();
                                assert_eq!(
                                    full.allocated_state_elements(),
                                    0,
                                    "{label}: gathered on the host"
                                );
                                prime_learner::checkpoint::save_optimizer(&dir.join(file), &full)
                                    .unwrap();
                            } else {
                                dp.contribute_full_optimizer(&first, which).unwrap();
                            }
                        }
                        drop(dp);
                        // Resumed: rank 0 loads the checkpoint to the host, rank 1 loads
                        // nothing (its models are only shapes).
                        let mut resumed = models(config, seed);
                        if rank == 0 {
                            resumed.policy.vs.copy(&first.policy.vs).unwrap();
                            resumed.prm.vs.copy(&first.prm.vs).unwrap();
                            for (optimizer, file) in [
                                (&mut resumed.policy_optimizer, "policy.safetensors"),
                                (&mut resumed.prm_optimizer, "prm.safetensors"),
                            ] {
                                prime_learner::checkpoint::load_optimizer_to_host(
                                    &dir.join(file),
                                    optimizer,
                                )
                                .unwrap();
                            }
                            assert!(resumed.policy_optimizer.staged_state_elements() > 0);
                        }
                        assert_eq!(allocated(&resumed), [0, 0], "{label}: loaded");
                        let group = join(rank, world, ports[1]);
                        let mut resumed_dp =
                            DataParallel::attach(&mut resumed, Box::new(group), parallel.clone())
                                .unwrap();
                        assert_share(&resumed, world, &format!("{label} resumed, attached"));
                        assert_eq!(resumed.policy_optimizer.step_count(), updates);
                        let metrics =
                            prime_step(&mut resumed, &mut resumed_dp, &groups(2), config, 2)
                                .unwrap();
                        assert_share(&resumed, world, &format!("{label} resumed, stepped"));
                        (metrics, weights(&resumed))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (metrics, rank_weights)) in ranks.iter().enumerate() {
            for ((name, x), (_, y)) in figures(&expected[2]).into_iter().zip(figures(metrics)) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                    "{label} rank {rank} after resuming: {name} {x} alone, {y} resumed"
                );
            }
            for ((name, x), (_, y)) in want.iter().zip(rank_weights) {
                for (a, b) in x.iter().zip(y) {
                    assert!(
                        (a - b).abs() <= 1e-6,
                        "{label} rank {rank}: {name}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

fn zero3() -> ParallelConfig {
    ParallelConfig {
        zero3: true,
        bucket_mb: 1,
        ..ParallelConfig::default()
    }
}

/// Policy, PRM and reference with tied or untied embeddings, from `seed` as [`models`].
fn models_tied(config: &LearnerConfig, seed: i64, tied: bool) -> PrimeModels {
    let [policy, prm, reference] = [0, 1, 2].map(|i| model_tied(seed + i, tied));
    PrimeModels::new(policy, prm, Some(reference), config)
}

/// ZeRO-3 on DP=1, 2 and 3 takes the single process's two steps (within 1e-6), with tied
/// and untied embeddings, for `estimator`; the ranks' micro-batches are uneven, so some
/// ranks gather for passes without rows.
fn zero3_takes_the_single_process_step(estimator: prime_algo::Estimator) {
    let mut config = recompute_config();
    config.algo.estimator = estimator;
    let config = &config;
    for tied in [true, false] {
        let build = |seed| models_tied(config, seed, tied);
        let single = two_steps(
            &mut build(1),
            &mut DataParallel::single(Device::Cpu),
            config,
        );
        let check = |models: &mut PrimeModels, _: &DataParallel| {
            for (name, p) in trained(models) {
                assert!(!p.grad().defined(), "{name} has a .grad under ZeRO-3");
            }
        };
        for world in [1, 2, 3] {
            let what = format!("DP={world} ZeRO-3 {estimator:?} tied={tied}");
            let ranks = on_ranks_built(world, config, &zero3(), build, check);
            assert_same_step(&single, &ranks, &what);
        }
    }
}

#[test]
fn zero3_takes_the_single_process_step_prime() {
    tch::set_num_threads(1);
    zero3_takes_the_single_process_step(prime_algo::Estimator::Prime);
}

#[test]
fn zero3_takes_the_single_process_step_rloo() {
    tch::set_num_threads(1);
    zero3_takes_the_single_process_step(prime_algo::Estimator::Rloo);
}

/// After a step, a ZeRO-3 rank of W holds 1/W of what one process holds of each kind of
/// state (within 10%), counted from the tensors each one holds.
#[test]
fn zero3_ranks_hold_their_share_of_parameters_gradients_and_optimizer() {
    tch::set_num_threads(1);
    let config = recompute_config();
    let mut single = models(&config, 1);
    let mut single_dp = DataParallel::single(Device::Cpu);
    prime_step(&mut single, &mut single_dp, &groups(0), &config, 0).unwrap();
    let whole = single_dp.resident(&single);
    assert!(
        whole.params > 0 && whole.grads > 0 && whole.optimizer > 0,
        "{whole:?}"
    );
    for world in [2usize, 3] {
        let port = free_port();
        let config = &config;
        let held: Vec<Resident> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    scope.spawn(move || {
                        tch::set_num_threads(1);
                        let mut models = models(config, 1 + 10 * rank as i64);
                        let group = join(rank, world, port);
                        let mut dp =
                            DataParallel::attach(&mut models, Box::new(group), zero3()).unwrap();
                        prime_step(&mut models, &mut dp, &groups(0), config, 0).unwrap();
                        // On the CPU backend the next stage was gathered ahead, every time
                        // the pass named it.
                        for role in [Role::Policy, Role::Prm, Role::Reference] {
                            assert!(dp.prefetched_gathers(role) > 0, "{role:?}");
                        }
                        dp.resident(&models)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, resident) in held.iter().enumerate() {
            for (what, mine, all) in [
                ("parameters", resident.params, whole.params),
                ("gradients", resident.grads, whole.grads),
                ("optimizer", resident.optimizer, whole.optimizer),
            ] {
                let share = all as f64 / world as f64;
                eprintln!("W={world} rank {rank}: {what} {mine} bytes, DP=1 {all} / {world}");
                assert!(
                    (mine as f64 - share).abs() <= 0.1 * share,
                    "W={world} rank {rank}: {what} {mine} bytes, DP=1 {all} / {world} = {share}"
                );
            }
        }
    }
}

/// A ZeRO-3 run on 2 ranks checkpointed (whole weights and the unsharded optimizers on rank
/// 0) resumes on 3 ranks and takes the single process's third step.
#[test]
fn zero3_resumes_onto_another_world_size() {
    tch::set_num_threads(1);
    let config = recompute_config();
    let mut single = models(&config, 1);
    let mut single_dp = DataParallel::single(Device::Cpu);
    let expected: Vec<StepMetrics> = (0..3)
        .map(|i| prime_step(&mut single, &mut single_dp, &groups(i), &config, i).unwrap())
        .collect();
    let want = weights(&single);
    let config = &config;
    let port = free_port();
    // Tensors are not `Sync`: the state crosses threads as shapes and values.
    type State = Vec<(String, Vec<i64>, Vec<f32>)>;
    type Saved = (Weights, [(State, i64); 2]);
    let saved: Vec<Option<Saved>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let mut models = models(config, 1 + 10 * rank as i64);
                    let group = join(rank, 2, port);
                    let mut dp =
                        DataParallel::attach(&mut models, Box::new(group), zero3()).unwrap();
                    for i in 0..2 {
                        prime_step(&mut models, &mut dp, &groups(i), config, i).unwrap();
                    }
                    // The checkpoint: rank 0 keeps the whole weights, every rank takes part.
                    for role in [Role::Policy, Role::Prm] {
                        dp.unshard(role, (rank == 0).then_some(Device::Cpu))
                            .unwrap();
                    }
                    if rank > 0 {
                        for which in [Trained::Policy, Trained::Prm] {
                            dp.contribute_full_optimizer(&models, which).unwrap();
                        }
                        return None;
                    }
                    let states = [Trained::Policy, Trained::Prm].map(|which| {
                        let (state, step) = dp.full_optimizer(&models, which).unwrap().state();
                        let state = state
                            .into_iter()
                            .map(|(n, t)| {
                                (n, t.size(), Vec::<f32>::try_from(&t.reshape(-1)).unwrap())
                            })
                            .collect();
                        (state, step)
                    });
                    Some((weights(&models), states))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (saved_weights, states) = saved.into_iter().next().flatten().expect("rank 0 saved");
    let (saved_weights, states) = (&saved_weights, &states);
    let port = free_port();
    let world = 3;
    let ranks: Vec<(StepMetrics, Weights)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    // Rank 0's reference is the run's (from the start models); the others' are
                    // replaced by it when attaching.
                    let mut models = models(config, 1 + 10 * rank as i64);
                    if rank == 0 {
                        // What loading the checkpoint does: weights by name, state to the host.
                        for (prefix, lm) in [("policy", &models.policy), ("prm", &models.prm)] {
                            for (name, t) in lm.vs.variables() {
                                let key = format!("{prefix}.{name}");
                                let (_, values) =
                                    saved_weights.iter().find(|(n, _)| *n == key).unwrap();
                                let _guard = tch::no_grad_guard();
                                t.shallow_clone()
                                    .copy_(&Tensor::from_slice(values).view(t.size().as_slice()));
                            }
                        }
                        let tensors =
                            |state: &State| -> std::collections::BTreeMap<String, Tensor> {
                                state
                                    .iter()
                                    .map(|(n, shape, v)| {
                                        (n.clone(), Tensor::from_slice(v).view(shape.as_slice()))
                                    })
                                    .collect()
                            };
                        let [(policy, policy_step), (prm, prm_step)] = states;
                        let optimizer = &mut models.policy_optimizer;
                        optimizer
                            .load_state(&tensors(policy), *policy_step)
                            .unwrap();
                        let optimizer = &mut models.prm_optimizer;
                        optimizer.load_state(&tensors(prm), *prm_step).unwrap();
                    }
                    let group = join(rank, world, port);
                    let mut dp =
                        DataParallel::attach(&mut models, Box::new(group), zero3()).unwrap();
                    let metrics = prime_step(&mut models, &mut dp, &groups(2), config, 2).unwrap();
                    for role in [Role::Policy, Role::Prm] {
                        dp.unshard(role, Some(Device::Cpu)).unwrap();
                    }
                    (metrics, weights(&models))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (metrics, rank_weights)) in ranks.iter().enumerate() {
        for ((name, x), (_, y)) in figures(&expected[2]).into_iter().zip(figures(metrics)) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "rank {rank} after resuming on 3: {name} {x} alone, {y} resumed"
            );
        }
        for ((name, x), (_, y)) in want.iter().zip(rank_weights) {
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= 1e-6, "rank {rank}: {name}: {a} vs {b}");
            }
        }
    }
}
