//! `prime train` and its children as real processes: a child that refuses its work stops the
//! whole run at once with that child's error on the console, and a `prime train` killed with
//! SIGKILL leaves no verifier, learner or actor behind (they die with it: PR_SET_PDEATHSIG).
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prime_tests::{wait_for, write_tiny_start_model, Procs};

const CONFIG: &str = r#"
[world]
seed = 4
sft = { size = 40 }
rl = { size = 80 }
heldout = { size = 6 }

[learner]
steps = 1000

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
every = 0
"#;

/// A run dir with its world and a tiny start model, and the config (plus `extra`) beside it.
fn prepare(dir: &Path, extra: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let config = prime_learner::RunConfig::from_file(&config_path).unwrap();
    let run_dir = dir.join("run");
    write_tiny_start_model(&run_dir, &config, 3);
    std::fs::write(&config_path, format!("{CONFIG}{extra}")).unwrap();
    (config_path, run_dir)
}

fn train(config: &Path, run_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prime"));
    command
        .args(["train", "--config", config.to_str().unwrap()])
        .args(["--run-dir", run_dir.to_str().unwrap(), "--actors", "1"])
        .env("PRIME_THREADS", "1")
        .env("RUST_LOG", "info")
        // Backtraces asked for: prime train prints its own, never a child's.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// (pid, parent pid, state) of every process.
fn processes() -> Vec<(u32, u32, char)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        all.push((pid, ppid, state));
    }
    all
}

/// Whether `pid` is running (a zombie waiting to be reaped is not).
fn alive(pid: u32) -> bool {
    processes()
        .iter()
        .any(|&(p, _, state)| p == pid && state != 'Z' && state != 'X')
}

/// Processes whose command line names `needle` (this test's run dir), zombies aside.
fn running_with(needle: &str) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|&(pid, _, state)| {
            state != 'Z'
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .map(|(pid, _, _)| pid)
        .collect()
}

#[test]
fn a_child_that_fails_stops_the_run_with_its_message() {
    let tmp = tempfile::tempdir().unwrap();
    // Valid as a config, but the learner cannot open the run: its training file is missing.
    let (config, run_dir) = prepare(
        tmp.path(),
        "\n[learner.data]\ntrain_files = [\"no-such-train-file.jsonl\"]\n",
    );
    let child = train(&config, &run_dir).spawn().unwrap();
    let pid = child.id();
    let mut procs = Procs(Vec::new());
    let started = Instant::now();
    let out = {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()).unwrap());
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                // A hang: end it (and its children, through PR_SET_PDEATHSIG).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("prime train still running after {:?}", started.elapsed());
            }
        }
    };
    procs.0.clear();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A missing file is bad input (exit status 2) for the learner, and so for the run.
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the learner exited with exit status: 2, so the run stops"),
        "{stderr}"
    );
    // The learner's own error, on the console.
    assert!(
        stderr.contains("Error:") && stderr.contains("no-such-train-file.jsonl"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Stack backtrace:").count(), 1, "{stderr}");
    // Nothing of the run is left running (the verifier was started before the learner).
    let needle = run_dir.to_str().unwrap();
    wait_for(
        "the run's processes to end",
        Duration::from_secs(20),
        || running_with(needle).is_empty(),
    );
}

#[test]
fn a_killed_prime_train_leaves_no_children_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, run_dir) = prepare(tmp.path(), "");
    let child = train(&config, &run_dir).spawn().unwrap();
    let pid = child.id();
    let mut procs = Procs(vec![child]);
    // The verifier, the learner and the actor (started once the learner listens).
    let mut children = Vec::new();
    wait_for(
        "prime train's three children",
        Duration::from_secs(120),
        || {
            children = processes()
                .into_iter()
                .filter(|&(_, ppid, state)| ppid == pid && state != 'Z')
                .map(|(p, _, _)| p)
                .collect();
            children.len() == 3
        },
    );
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = procs.0[0].wait();
    procs.0.clear();
    wait_for(
        "the children to die with prime train",
        Duration::from_secs(20),
        || children.iter().all(|&c| !alive(c)),
    );
    assert!(running_with(run_dir.to_str().unwrap()).is_empty());
}
