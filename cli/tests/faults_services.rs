//! Faults with real `prime` processes on loopback (issue 10): a verifier that is absent, then
//! killed mid-run, and a disk that fills while the learner checkpoints. The actor-killed and
//! learner-killed cases are in `train_services.rs`.
//!
//! - Verifier down: while no verifier answers, the actor's batch waits (grading is retried with
//!   backoff) and the learner receives no group at all, so none can carry a score from a failed
//!   grading; once a verifier answers, the waiting batch is submitted, nothing is given up and
//!   the run completes its steps with whole batches.
//! - Disk full: the learner is resumed under a file-size limit (`RLIMIT_FSIZE`, the signal it
//!   raises ignored, so a write fails with an OS error as on a full disk). Its next checkpoint
//!   fails: the learner exits with an error naming the file and the OS error, `latest` still
//!   names the previous checkpoint, no partial checkpoint is left, and the previous checkpoint
//!   loads and resumes.
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use prime_tests::{free_addr, gauge, step_records, wait_for, write_tiny_start_model, Procs};

fn config(steps: u64, checkpoint_every: u64) -> String {
    format!(
        r#"
[world]
seed = 5
sft = {{ size = 40 }}
rl = {{ size = 80 }}
heldout = {{ size = 4 }}

[learner]
steps = {steps}

[learner.algo]
mini_batches = 1
filter = {{ enabled = false }}

[learner.rollout]
batch_prompts = 2
samples_per_prompt = 3
max_response_tokens = 24
lease_seconds = 60

[learner.eval]
every = 0
problems = 4
greedy = false

[learner.checkpoint]
every = {checkpoint_every}
keep = 3
"#
    )
}

fn prime(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prime"));
    command
        .args(args)
        .env("PRIME_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    command
}

fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    prime(args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prime starts")
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < timeout, "a process did not exit in time");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Groups the learner has received in any category (kept, filtered, duplicate, stale,
/// rejected).
fn groups_received(metrics: SocketAddr) -> f64 {
    ["kept", "filtered", "duplicate", "stale", "rejected"]
        .iter()
        .map(|name| {
            gauge(
                metrics,
                &format!("prime_learner_groups_total{{outcome=\"{name}\"}}"),
            )
            .expect("learner metrics")
        })
        .sum()
}

/// A run directory with the tiny start model, and the paths the processes need.
struct Run {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    tokenizer: PathBuf,
    logs: PathBuf,
}

fn new_run(config_text: &str) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, config_text).unwrap();
    let parsed = prime_learner::RunConfig::from_file(&config).unwrap();
    write_tiny_start_model(&dir, &parsed, 11);
    let tokenizer = prime_learner::checkpoint::sft_checkpoint(&dir);
    let logs = tmp.path().to_path_buf();
    Run {
        _tmp: tmp,
        dir,
        config,
        tokenizer,
        logs,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn actor_args<'a>(learner: &'a str, verifier: &'a str, tokenizer: &'a str) -> Vec<&'a str> {
    vec![
        "actor",
        "run",
        "--learner",
        learner,
        "--verifier",
        verifier,
        "--tokenizer",
        tokenizer,
        "--name",
        "actor-0",
        "--max-prompts",
        "2",
        "--max-backoff-secs",
        "1",
    ]
}

/// How many times the actor has logged a failed grading call.
fn grading_failures(log: &Path) -> usize {
    read(log).matches("grading failed; retrying").count()
}

#[test]
fn a_verifier_that_is_down_holds_groups_back_until_it_answers() {
    const STEPS: u64 = 5;
    let run = new_run(&config(STEPS, 0));
    let (verifier, learner, metrics) = (free_addr(), free_addr(), free_addr());
    let (verifier_arg, learner_arg, metrics_arg) = (
        verifier.to_string(),
        learner.to_string(),
        metrics.to_string(),
    );
    let (learner_url, verifier_url) = (format!("http://{learner}"), format!("http://{verifier}"));
    let actor_log = run.logs.join("actor.log");
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        &[
            "learner",
            "serve",
            "--config",
            s(&run.config),
            "--run-dir",
            s(&run.dir),
            "--listen",
            &learner_arg,
            "--metrics-listen",
            &metrics_arg,
        ],
        &run.logs.join("learner.log"),
    ));
    procs.0.push(spawn(
        &actor_args(&learner_url, &verifier_url, s(&run.tokenizer)),
        &actor_log,
    ));

    // No verifier yet: the actor samples its first batch and keeps retrying the grading.
    wait_for("a failed grading", Duration::from_secs(240), || {
        grading_failures(&actor_log) >= 1
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        grading_failures(&actor_log) >= 3,
        "grading is retried with backoff:\n{}",
        read(&actor_log)
    );
    assert_eq!(
        groups_received(metrics),
        0.0,
        "a group reached the learner before any verifier existed"
    );
    assert!(step_records(&run.dir).is_empty());

    let serve_verifier = |procs: &mut Procs, name: &str| {
        procs.0.push(spawn(
            &["verifier", "serve", "--listen", &verifier_arg],
            &run.logs.join(name),
        ));
    };
    serve_verifier(&mut procs, "verifier-1.log");
    wait_for("step 1", Duration::from_secs(240), || {
        !step_records(&run.dir).is_empty()
    });

    // Kill the verifier mid-run: once the actor's grading fails, nothing more arrives.
    let before_kill = grading_failures(&actor_log);
    procs.0[2].kill().unwrap();
    procs.0[2].wait().unwrap();
    wait_for(
        "a failed grading after the kill",
        Duration::from_secs(120),
        || grading_failures(&actor_log) > before_kill,
    );
    let held = groups_received(metrics);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        groups_received(metrics),
        held,
        "groups reached the learner while the verifier was down"
    );
    assert!(step_records(&run.dir).len() < STEPS as usize);
    serve_verifier(&mut procs, "verifier-2.log");

    let status = wait_exit(&mut procs.0[0], Duration::from_secs(300));
    let learner_log = read(&run.logs.join("learner.log"));
    assert!(status.success(), "the learner failed:\n{learner_log}");
    let steps = step_records(&run.dir);
    let numbers: Vec<u64> = steps.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=STEPS).collect::<Vec<_>>(), "each step once");
    for record in &steps {
        assert_eq!(record["batch/groups"], 2, "B whole groups: {record}");
        assert_eq!(
            record["batch/responses"], 6,
            "K = 3 responses each: {record}"
        );
    }

    // Stop the actor (SIGTERM): its totals show that no batch was given up or lost.
    let pid = procs.0[1].id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = wait_exit(&mut procs.0[1], Duration::from_secs(60));
    let log = read(&actor_log);
    assert!(status.success(), "the actor failed:\n{log}");
    let stats = log
        .lines()
        .find(|l| l.contains("actor stopped"))
        .unwrap_or_else(|| panic!("no final stats:\n{log}"));
    let field = |name: &str| -> u64 {
        let rest = &stats[stats.find(&format!("{name}: ")).expect(name) + name.len() + 2..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // A batch given up (grading past its retry budget) would have ended the session.
    assert!(!log.contains("session lost"), "{log}");
    assert_eq!(field("registrations"), 1, "{stats}");
    assert_eq!(field("groups_rejected"), 0, "{stats}");
    assert!(field("groups_accepted") >= 2 * STEPS, "{stats}");
    assert_eq!(
        field("groups_submitted"),
        field("groups_accepted")
            + field("groups_duplicate")
            + field("groups_stale")
            + field("groups_rejected"),
        "every submitted group is answered once: {stats}"
    );
}

/// Runs `prime ARGS` with every file it writes limited to `max_bytes` (`RLIMIT_FSIZE` through
/// the shell's `ulimit -f`, in 1024-byte blocks in bash) and SIGXFSZ ignored, which the learner
/// inherits through exec: a write past the limit fails with EFBIG, as it would with ENOSPC on a
/// full disk. Output goes through a pipe (not a file, which the limit would cut) into `log`.
fn spawn_with_file_limit(
    args: &[&str],
    max_bytes: u64,
    log: &Path,
) -> (Child, std::thread::JoinHandle<()>) {
    let script = format!(
        "trap '' XFSZ; ulimit -f {}; exec \"$0\" \"$@\"",
        max_bytes / 1024
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_prime"))
        .args(args)
        .env("PRIME_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut file = std::fs::File::create(log).unwrap();
    let copier = std::thread::spawn(move || {
        let err = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            text
        });
        let _ = std::io::copy(&mut stdout, &mut file);
        let _ = file.write_all(&err.join().unwrap());
    });
    (child, copier)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_stops_the_learner() {
    let run = new_run(&config(1, 1));
    let (verifier, learner, metrics) = (free_addr(), free_addr(), free_addr());
    let (verifier_arg, learner_arg, metrics_arg) = (
        verifier.to_string(),
        learner.to_string(),
        metrics.to_string(),
    );
    let (learner_url, verifier_url) = (format!("http://{learner}"), format!("http://{verifier}"));
    let learner_args = |resume_until: Option<&'static str>| {
        let mut args = vec![
            "learner".to_string(),
            "serve".into(),
            "--config".into(),
            s(&run.config).into(),
            "--run-dir".into(),
            s(&run.dir).into(),
            "--listen".into(),
            learner_arg.clone(),
            "--metrics-listen".into(),
            metrics_arg.clone(),
        ];
        if let Some(until) = resume_until {
            args.extend(["--resume".into(), "--set".into(), until.into()]);
        }
        args
    };
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        &["verifier", "serve", "--listen", &verifier_arg],
        &run.logs.join("verifier.log"),
    ));
    procs.0.push(spawn(
        &actor_args(&learner_url, &verifier_url, s(&run.tokenizer)),
        &run.logs.join("actor.log"),
    ));
    // A first learner trains step 1 and checkpoints it.
    let first: Vec<String> = learner_args(None);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut learner_1 = spawn(&first, &run.logs.join("learner-1.log"));
    let status = wait_exit(&mut learner_1, Duration::from_secs(300));
    assert!(
        status.success(),
        "{}",
        read(&run.logs.join("learner-1.log"))
    );
    let checkpoints = run.dir.join("checkpoints");
    assert_eq!(read(&checkpoints.join("latest")).trim(), "step-000001");
    let good = checkpoints.join("step-000001");
    let good_files: Vec<(PathBuf, Vec<u8>)> = files_under(&good)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();

    // The limit: half the policy's weights file, so the next checkpoint cannot be written,
    // while the small files the learner writes before it (config, metrics lines) fit.
    let weights = good.join("policy/model.safetensors");
    let limit = std::fs::metadata(&weights).unwrap().len() / 2;
    let metrics_len = std::fs::metadata(run.dir.join("metrics.jsonl"))
        .unwrap()
        .len();
    assert!(
        limit > 4 * metrics_len + 16 * 1024,
        "the tiny model is too small for this test: limit {limit} B, metrics {metrics_len} B"
    );
    let second = learner_args(Some("learner.steps=2"));
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let log_path = run.logs.join("learner-2.log");
    let (mut learner_2, copier) = spawn_with_file_limit(&second, limit, &log_path);
    let status = wait_exit(&mut learner_2, Duration::from_secs(300));
    copier.join().unwrap();
    let log = read(&log_path);
    assert!(
        !status.success(),
        "the learner went on without its checkpoint:\n{log}"
    );
    // It trained step 2 and failed to save it, saying where and why.
    assert_eq!(step_records(&run.dir).len(), 2, "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("Error: "))
        .unwrap_or_else(|| panic!("no error reported:\n{log}"));
    assert!(
        error.contains("checkpoint") && error.contains(s(&checkpoints)),
        "the error names the checkpoint path: {error}"
    );
    assert!(
        error.contains("File too large") || error.contains("os error 27"),
        "the error carries the OS error: {error}"
    );
    assert!(
        error.contains(&format!("the latest checkpoint is {}", good.display())),
        "the error says what a resume starts from: {error}"
    );

    // The previous checkpoint is intact and still the one to resume from; nothing half-written
    // is left beside it.
    assert_eq!(read(&checkpoints.join("latest")).trim(), "step-000001");
    for (path, bytes) in &good_files {
        assert_eq!(
            &std::fs::read(path).unwrap(),
            bytes,
            "{} changed",
            path.display()
        );
    }
    let names: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n == "latest" || n == "step-000001"),
        "leftovers of the failed save: {names:?}"
    );
    assert_eq!(
        prime_learner::checkpoint::latest(&checkpoints).unwrap(),
        Some(good.clone())
    );

    // With the disk free again the learner resumes from step 1 and finishes.
    let third = learner_args(Some("learner.steps=2"));
    let third: Vec<&str> = third.iter().map(String::as_str).collect();
    let mut learner_3 = spawn(&third, &run.logs.join("learner-3.log"));
    let status = wait_exit(&mut learner_3, Duration::from_secs(300));
    let log = read(&run.logs.join("learner-3.log"));
    assert!(status.success(), "{log}");
    assert!(log.contains("resumed"), "{log}");
    assert_eq!(read(&checkpoints.join("latest")).trim(), "step-000002");
}
