//! `prime learner step` as data-parallel ranks, one real process each, joined over loopback:
//! two ranks take the step of one process (losses and weights within 1e-6 in f32, with and
//! without optimizer, gradient and parameter sharding; three ranks with parameter sharding,
//! untied embeddings and PRIME or RLOO too); a rank killed mid-step, or stopped, makes the other exit
//! with a clear error within the collective timeout.
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prime_model::{CausalLm, Qwen2Config, DEFAULT_MAX_SHARD_BYTES};
use prime_tests::{init_threads, max_abs_diff, random_sequences, write_jsonl};
use serde_json::{json, Value};
use tch::{Device, Kind};

fn qwen2() -> Qwen2Config {
    serde_json::from_value(json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": 2
    }))
    .unwrap()
}

/// Policy, PRM and reference model dirs and a rollouts file of five groups of three.
fn fixtures(dir: &Path) {
    fixtures_tied(dir, true)
}

/// [`fixtures`] with tied or untied embeddings.
fn fixtures_tied(dir: &Path, tied: bool) {
    let config = Qwen2Config {
        tie_word_embeddings: tied,
        ..qwen2()
    };
    for (name, seed) in [("policy", 1), ("prm", 2), ("ref", 3)] {
        tch::manual_seed(seed);
        let lm = CausalLm::random(&config, Device::Cpu, Kind::Float, Kind::Float).unwrap();
        lm.save(&dir.join(name), None, DEFAULT_MAX_SHARD_BYTES)
            .unwrap();
    }
    let prompts = random_sequences(5, 3, 8, 60, 21);
    let responses = random_sequences(15, 2, 12, 60, 22);
    let scores = [
        1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0,
    ];
    let groups: Vec<Value> = (0..5)
        .map(|g| {
            let responses: Vec<Value> = (0..3)
                .map(|i| {
                    let ids: Vec<i64> = responses[g * 3 + i].iter().map(|t| t + 3).collect();
                    json!({ "ids": ids, "score": scores[g * 3 + i] })
                })
                .collect();
            json!({ "prompt_ids": prompts[g].iter().map(|t| t + 3).collect::<Vec<_>>(), "responses": responses })
        })
        .collect();
    write_jsonl(&dir.join("rollouts.jsonl"), &groups);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `prime learner step` on the fixtures in `dir`, writing to `dir/out`, as `rank` of
/// `world` (a plain single process when `world` is 1).
fn step(dir: &Path, out: &str, rank: usize, world: usize, port: u16, extra: &[&str]) -> Command {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prime"));
    cmd.env("PRIME_THREADS", "1")
        .env("RUST_LOG", "info")
        .args([
            "learner",
            "step",
            "--policy",
            &p("policy"),
            "--prm",
            &p("prm"),
        ])
        .args(["--ref", &p("ref"), "--rollouts", &p("rollouts.jsonl")])
        .args(["--out", &p(out), "--mini-batches", "2", "--beta", "0.5"])
        // Adam turns f32 rounding noise in a near-zero gradient into a step difference of
        // order lr/10; 5e-5 keeps it well inside 1e-6 while every weight still moves.
        .args(["--policy-lr", "5e-5", "--prm-lr", "5e-5"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if world > 1 {
        cmd.env("WORLD_SIZE", world.to_string())
            .env("RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
    }
    cmd
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "prime learner step failed: {stderr}");
    stderr
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let lm = CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    let mut vars: Vec<_> = lm
        .vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

fn metrics(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap()
}

fn two_ranks_match_one(extra: &[&str]) {
    ranks_match_one(2, true, extra, extra);
}

/// `world` rank processes with `extra` take the step of one process with `single_extra`, on
/// models with tied or untied embeddings.
fn ranks_match_one(world: usize, tied: bool, single_extra: &[&str], extra: &[&str]) {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fixtures_tied(dir, tied);
    let single = step(dir, "dp1", 0, 1, 0, single_extra).spawn().unwrap();
    finish(single);
    let port = free_port();
    let ranks: Vec<Child> = (0..world)
        .map(|rank| step(dir, "dpn", rank, world, port, extra).spawn().unwrap())
        .collect();
    for rank in ranks {
        finish(rank);
    }
    let (one, two) = (metrics(&dir.join("dp1")), metrics(&dir.join("dpn")));
    for key in [
        "prm_loss",
        "policy_loss",
        "prm_grad_norm",
        "policy_grad_norm",
        "entropy",
        "prm_accuracy",
        "approx_kl",
    ] {
        let (a, b) = (one[key].as_f64().unwrap(), two[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "{key}: DP=1 {a}, DP={world} {b}"
        );
    }
    for model in ["policy", "prm"] {
        let (a, b, start) = (
            weights(&dir.join("dp1").join(model)),
            weights(&dir.join("dpn").join(model)),
            weights(&dir.join(model)),
        );
        let diff = a
            .iter()
            .zip(&b)
            .map(|((_, x), (_, y))| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        let moved = a
            .iter()
            .zip(&start)
            .map(|((_, x), (_, y))| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        eprintln!("{model}: DP={world} {extra:?} vs DP=1 {diff:e}, moved {moved:e}");
        assert!(
            diff <= 1e-6,
            "{model}: DP={world} differs from DP=1 by {diff}"
        );
        if model == "prm" && extra.contains(&"rloo") {
            // RLOO needs no process rewards and leaves the PRM untouched.
            assert_eq!(moved, 0.0, "rloo moved the PRM");
        } else {
            assert!(moved > 1e-5, "{model} barely moved ({moved})");
        }
    }
}

#[test]
fn two_rank_processes_take_the_single_process_step() {
    two_ranks_match_one(&[]);
}

#[test]
fn two_rank_processes_with_sharded_optimizer_take_the_single_process_step() {
    two_ranks_match_one(&["--zero1"]);
}

#[test]
fn two_rank_processes_with_sharded_gradients_take_the_single_process_step() {
    two_ranks_match_one(&["--zero2"]);
}

/// ZeRO-3 ranks against one process that recomputes without sharding parameters (`--zero2`
/// on one rank shards nothing): tied embeddings on 2 ranks with PRIME, untied on 3 (an
/// uneven split of the five groups) with RLOO and with PRIME.
#[test]
fn rank_processes_with_sharded_parameters_take_the_single_process_step() {
    ranks_match_one(2, true, &["--zero2"], &["--zero3"]);
    let rloo = ["--estimator", "rloo"];
    ranks_match_one(
        3,
        false,
        &["--zero2", rloo[0], rloo[1]],
        &["--zero3", rloo[0], rloo[1]],
    );
    ranks_match_one(3, false, &["--zero2"], &["--zero3"]);
}

/// Starts two ranks, waits until rank 1 has joined, does `to_rank1` to it, and returns how
/// long rank 0 then took to exit, its status and its stderr.
fn fail_rank1(to_rank1: impl FnOnce(&mut Child), timeout: &str) -> (Duration, Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fixtures(dir);
    let port = free_port();
    let extra = ["--collective-timeout-seconds", timeout];
    let mut rank0 = step(dir, "out", 0, 2, port, &extra).spawn().unwrap();
    let mut rank1 = step(dir, "out", 1, 2, port, &extra).spawn().unwrap();
    let mut lines = BufReader::new(rank1.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("rank 1 ended before joining").unwrap();
        if line.contains("joined the TCP group") {
            break;
        }
    }
    to_rank1(&mut rank1);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = rank0.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "rank 0 hangs");
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = start.elapsed();
    let _ = rank1.kill();
    let _ = rank1.wait();
    let mut stderr = String::new();
    rank0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (waited, status.code(), stderr)
}

#[test]
fn a_killed_rank_makes_rank_0_exit_with_a_clear_error() {
    let (waited, code, stderr) = fail_rank1(|rank1| rank1.kill().unwrap(), "600");
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("rank 1 closed the connection"), "{stderr}");
    assert!(waited < Duration::from_secs(20), "{waited:?}: {stderr}");
}

#[test]
fn a_stopped_rank_makes_rank_0_exit_at_the_collective_timeout() {
    let (waited, code, stderr) = fail_rank1(
        |rank1| {
            let stopped = Command::new("kill")
                .args(["-STOP", &rank1.id().to_string()])
                .status()
                .unwrap();
            assert!(stopped.success());
        },
        "3",
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("did not finish within 3s"), "{stderr}");
    assert!(waited < Duration::from_secs(30), "{waited:?}: {stderr}");
}

/// `prime train --learners 2` on the embedded world with a tiny start model: two learner
/// ranks (the optimizer state sharded), a verifier and an actor run three steps; rank 1
/// follows to the end and each checkpoint holds the unsharded optimizer state.
#[test]
fn prime_train_with_two_learner_ranks() {
    train_with_two_learner_ranks("zero1 = true", false);
}

/// The same run with parameter sharding: rank 0 publishes, evaluates and checkpoints whole
/// models that every rank gathers after each step.
#[test]
fn prime_train_with_two_learner_ranks_and_sharded_parameters() {
    train_with_two_learner_ranks("zero3 = true", true);
}

/// `prime train` with two learner ranks whose `[learner.parallel]` sets `sharding` (with
/// recomputation when `recompute`): three steps, a checkpoint after each.
fn train_with_two_learner_ranks(sharding: &str, recompute: bool) {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let config_text = r#"
[world]
seed = 4
sft = { size = 40 }
rl = { size = 80 }
heldout = { size = 6 }

[learner]
steps = 3
parallel = { SHARDING, collective_timeout_seconds = 120 }
memory = { recompute_activations = RECOMPUTE }

[learner.algo]
mini_batches = 2
filter = { enabled = false }

[learner.rollout]
batch_prompts = 4
samples_per_prompt = 3
max_response_tokens = 30

[learner.eval]
every = 0
problems = 6
greedy = false

[learner.checkpoint]
every = 1
keep = 1
"#;
    let config_text = config_text
        .replace("SHARDING", sharding)
        .replace("RECOMPUTE", &recompute.to_string());
    let config_path = tmp.path().join("config.toml");
    std::fs::write(&config_path, config_text).unwrap();
    let config = prime_learner::RunConfig::from_file_with_overrides(&config_path, &[]).unwrap();
    prime_tests::write_tiny_start_model(&run_dir, &config, 7);
    let train = Command::new(env!("CARGO_BIN_EXE_prime"))
        .env("PRIME_THREADS", "1")
        .env("RUST_LOG", "info")
        .args(["train", "--config", config_path.to_str().unwrap()])
        .args([
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--actors",
            "1",
            "--learners",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, rank 1 answers health checks, and `prime status` reports it as such.
    let follower_log = run_dir.join("logs").join("learner-1.log");
    let start = Instant::now();
    let follower_addr = loop {
        let log = std::fs::read_to_string(&follower_log).unwrap_or_default();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("follower rank: grpc.health.v1 only"))
        {
            let addr = line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next();
            break addr.unwrap().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "rank 1 never served health"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(["status", "--addr", &format!("http://{follower_addr}")])
        .output()
        .unwrap();
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && status_text.contains("SERVING"),
        "prime status on rank 1: {status_text} {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let out = train.wait_with_output().unwrap();
    let logs =
        |name: &str| std::fs::read_to_string(run_dir.join("logs").join(name)).unwrap_or_default();
    assert!(
        out.status.success(),
        "prime train failed: {}\nrank 0:\n{}\nrank 1:\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs("learner.log"),
        logs("learner-1.log")
    );
    // `prime train` printed the data summary the learner saved as it opened the run.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in [
        "training data:",
        "  rows read: 80",
        "  kept: 80",
        "  bad rows: 0",
        "held-out data:",
        "  rows read: 6",
        "  kept by ability: math 6",
    ] {
        assert!(stderr.lines().any(|l| l == line), "{line:?} in {stderr}");
    }
    let steps = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"step\""))
        .count();
    assert_eq!(steps, 3);
    let follower = logs("learner-1.log");
    assert!(follower.contains("joined the TCP group"), "{follower}");
    let attached = sharding.replace(" = ", "=");
    assert!(follower.contains(&attached), "{attached} in {follower}");
    assert!(follower.contains("rank 0 stopped the group"), "{follower}");
    assert_eq!(follower.matches("step done").count(), 3, "{follower}");
    let checkpoint = run_dir.join("checkpoints").join("step-000003");
    let state =
        tch::Tensor::read_safetensors(checkpoint.join("policy_optimizer.safetensors")).unwrap();
    let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.iter().all(|n| !n.starts_with("zero1")), "{names:?}");
    assert!(
        names.iter().any(|n| n.ends_with(".exp_avg_sq")),
        "{names:?}"
    );
    // Whole Hugging Face models, not a rank's shards.
    let start = prime_learner::checkpoint::sft_checkpoint(&run_dir);
    for model in ["policy", "prm"] {
        let saved = weights(&checkpoint.join(model));
        let first = weights(&start);
        assert_eq!(saved.len(), first.len(), "{model}");
        for ((name, a), (_, b)) in saved.iter().zip(&first) {
            assert_eq!(a.len(), b.len(), "{model} {name}");
        }
    }
}
