//! PRIME over real gRPC on loopback: a verifier, a learner and two actors run as `prime`
//! processes on a tiny model. Checks that every batch trained on holds B whole groups from one
//! policy version and versions increase; that an actor killed mid-run has its work handed out
//! again; and that after the learner is killed and resumed from its checkpoint the surviving
//! actor reconnects and training runs to the end, each step recorded once. The learner
//! offers the TCP weight broadcast throughout: the actors follow it, a frozen or killed member
//! and the learner's restart cost at most a failed round (then gRPC), never a step.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prime_tests::{free_addr, gauge, step_records, wait_for, write_tiny_start_model, Procs};
use serde_json::Value;

const CONFIG: &str = r#"
[world]
seed = 4
sft = { size = 40 }
rl = { size = 80 }
heldout = { size = 6 }

[learner]
steps = 1000
weight_broadcast = { enabled = true, join_window_ms = 500, join_timeout_seconds = 5, timeout_seconds = 5 }

[learner.algo]
mini_batches = 2
filter = { enabled = false }

[learner.rollout]
batch_prompts = 4
samples_per_prompt = 3
max_response_tokens = 30
lease_seconds = 2

[learner.eval]
every = 0
problems = 6
greedy = false

[learner.checkpoint]
every = 1
keep = 2
"#;

fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(args)
        .env("PRIME_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prime starts")
}

fn learner_args<'a>(
    config: &'a str,
    run_dir: &'a str,
    listen: &'a str,
    metrics: &'a str,
    resume_until: Option<&'a str>,
) -> Vec<&'a str> {
    // The first learner would run 1000 steps; the resumed one stops at `resume_until`.
    let mut args = vec![
        "learner",
        "serve",
        "--config",
        config,
        "--run-dir",
        run_dir,
        "--listen",
        listen,
        "--metrics-listen",
        metrics,
    ];
    if let Some(steps) = resume_until {
        args.extend(["--resume", "--set", steps]);
    }
    args
}

#[test]
fn actors_learner_and_verifier_train_survive_kills_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir: PathBuf = tmp.path().join("run");
    let config_path = tmp.path().join("config.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let config = prime_learner::RunConfig::from_file(&config_path).unwrap();
    write_tiny_start_model(&run_dir, &config, 7);
    let tokenizer = prime_learner::checkpoint::sft_checkpoint(&run_dir);
    let logs = tmp.path();
    let (verifier, learner, metrics) = (free_addr(), free_addr(), free_addr());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (config_arg, run_arg, tokenizer_arg) = (s(&config_path), s(&run_dir), s(&tokenizer));
    let (verifier_arg, learner_arg, metrics_arg) = (
        verifier.to_string(),
        learner.to_string(),
        metrics.to_string(),
    );
    let (learner_url, verifier_url) = (format!("http://{learner}"), format!("http://{verifier}"));

    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        &["verifier", "serve", "--listen", &verifier_arg],
        &logs.join("verifier.log"),
    ));
    procs.0.push(spawn(
        &learner_args(&config_arg, &run_arg, &learner_arg, &metrics_arg, None),
        &logs.join("learner.log"),
    ));
    let actor = |i: usize, procs: &mut Procs| {
        let name = format!("actor-{i}");
        procs.0.push(spawn(
            &[
                "actor",
                "run",
                "--learner",
                &learner_url,
                "--verifier",
                &verifier_url,
                "--tokenizer",
                &tokenizer_arg,
                "--name",
                &name,
                "--max-prompts",
                "2",
                "--max-backoff-secs",
                "1",
            ],
            &logs.join(format!("{name}.log")),
        ));
    };
    actor(0, &mut procs);
    wait_for("step 1", Duration::from_secs(240), || {
        !step_records(&run_dir).is_empty()
    });
    // Freeze actor 0 at a moment it holds work, then kill it: its leases run out and the work
    // goes to actor 1, which starts now.
    // The pause before each try varies: an actor resumed by SIGCONT starts its next batch at
    // once, and a batch shorter than a fixed pause would always end before the next SIGSTOP.
    let pid = procs.0[2].id().to_string();
    let mut tries = 0u64;
    wait_for(
        "actor 0 frozen holding work",
        Duration::from_secs(120),
        || {
            tries += 1;
            std::thread::sleep(Duration::from_millis(10 + tries * 37 % 400));
            Command::new("kill").args(["-STOP", &pid]).status().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            if gauge(metrics, "prime_learner_in_flight").unwrap_or(0.0) >= 1.0 {
                return true;
            }
            Command::new("kill").args(["-CONT", &pid]).status().unwrap();
            false
        },
    );
    procs.0[2].kill().unwrap();
    procs.0[2].wait().unwrap();
    let at_kill = step_records(&run_dir).len();
    actor(1, &mut procs);
    wait_for("two more steps", Duration::from_secs(240), || {
        step_records(&run_dir).len() >= at_kill + 2
    });
    // The frozen actor's work comes back either when its lease runs out (reissued) or, when
    // actor 1 completes the batch first, when the batch cancels work still out (its prompts go
    // back to the front of the queue).
    let reissued = gauge(metrics, "prime_learner_work_reissued_total").unwrap_or(0.0)
        + gauge(metrics, "prime_learner_work_cancelled_total").unwrap_or(0.0);
    let connected = gauge(metrics, "prime_learner_connected_actors").unwrap_or(0.0);

    // Kill the learner; resume it on the same address; actor 1 reconnects.
    procs.0[1].kill().unwrap();
    procs.0[1].wait().unwrap();
    let checkpointed = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    let resumed_at: u64 = checkpointed
        .trim()
        .trim_start_matches("step-")
        .parse()
        .expect("step-NNNNNN");
    let last = resumed_at + 3;
    let until = format!("learner.steps={last}");
    procs.0[1] = spawn(
        &learner_args(
            &config_arg,
            &run_arg,
            &learner_arg,
            &metrics_arg,
            Some(&until),
        ),
        &logs.join("learner-resumed.log"),
    );
    let status = {
        let start = Instant::now();
        loop {
            if let Some(status) = procs.0[1].try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "the resumed learner did not finish"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let log = std::fs::read_to_string(logs.join("learner-resumed.log")).unwrap();
    assert!(status.success(), "resumed learner failed:\n{log}");
    assert!(
        log.contains("resumed"),
        "the learner did not resume:\n{log}"
    );

    let steps = step_records(&run_dir);
    let numbers: Vec<u64> = steps.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(
        numbers,
        (1..=last).collect::<Vec<_>>(),
        "each step exactly once"
    );
    for record in &steps {
        let version = record["batch/policy_version"].as_u64().unwrap();
        assert_eq!(record["step"].as_u64().unwrap(), version + 1);
        assert_eq!(
            [
                &record["batch/oldest_group_version"],
                &record["batch/newest_group_version"]
            ],
            [version, version],
            "a batch mixes policy versions: {record}"
        );
        assert_eq!(record["batch/groups"], 4, "B groups per batch");
        assert_eq!(record["batch/responses"], 12, "whole groups of K = 3");
    }
    // The live TensorBoard files (one per learner start) hold each step once, after the
    // resume as before it, with the values of metrics.jsonl under the same keys.
    let tensorboard = prime_tests::run_python(
        "tests/python/tensorboard_read.py",
        &[run_dir.join("tensorboard").to_str().unwrap()],
    );
    let series = tensorboard["actor/pg_loss"].as_array().unwrap();
    let tb_steps: Vec<u64> = series.iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(tb_steps, numbers, "TensorBoard steps");
    for (point, record) in series.iter().zip(&steps) {
        let ours = record["actor/pg_loss"].as_f64().unwrap() as f32;
        assert_eq!(point[1].as_f64().unwrap() as f32, ours, "step {}", point[0]);
    }
    assert!(tensorboard["timing_s/gen"].as_array().unwrap().len() == steps.len());
    assert!(
        reissued >= 1.0,
        "the killed actor's work was never handed out again (reissued = {reissued})"
    );
    assert!(connected >= 1.0);
    // Weights reached the actors by broadcast: rounds completed on the learner's side and
    // an actor applied what it received (the gRPC fallback covers the rest).
    let log_lines = |names: &[&str], needle: &str| -> usize {
        names
            .iter()
            .map(|name| {
                std::fs::read_to_string(logs.join(name))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    };
    let rounds = log_lines(&["learner.log", "learner-resumed.log"], "broadcast weights");
    let applied = log_lines(&["actor-0.log", "actor-1.log"], "applied broadcast weights");
    assert!(
        rounds >= 1 && applied >= 1,
        "broadcast rounds {rounds}, applied by actors {applied}"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], last);
    assert_eq!(summary["heldout_size"], 6);
}
