//! Helpers shared by the cross-crate integration tests in `tests/tests/`: running the
//! independent Python references (transformers in the project's venv), JSONL files and
//! deterministic test data.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's python. `make test` creates the venv; running the tests without it is an error,
/// not a skip: these tests exist to compare against transformers.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("PRIME_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/prime-rs/venv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} not found: run `make test` (it creates the venv) or set PRIME_VENV",
        python.display()
    );
    python
}

/// Limits torch to one thread per test: tests run two at a time on a 2-core machine.
pub fn init_threads() {
    tch::set_num_threads(1);
}

/// Runs a Python reference script (path relative to the repo root) and parses the JSON object
/// it prints last. Panics with its stderr when it fails.
pub fn run_python(script: &str, args: &[&str]) -> Value {
    let output = Command::new(python())
        .arg(repo_root().join(script))
        .args(args)
        .env("PRIME_THREADS", "1")
        .output()
        .expect("python starts");
    assert!(
        output.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("null");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{script}: bad JSON {last:?}: {e}"))
}

/// Runs `tests/python/qwen2_ref.py`.
pub fn qwen2_ref(args: &[&str]) -> Value {
    run_python("tests/python/qwen2_ref.py", args)
}

pub fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).expect("write jsonl");
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Deterministic pseudo-random token sequences (SplitMix64), lengths in `min_len..=max_len`.
pub fn random_sequences(
    n: usize,
    min_len: usize,
    max_len: usize,
    vocab: i64,
    seed: u64,
) -> Vec<Vec<i64>> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let len = min_len + (next() as usize) % (max_len - min_len + 1);
            (0..len).map(|_| (next() % vocab as u64) as i64).collect()
        })
        .collect()
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Reads a JSON array of numbers.
pub fn f32s(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

pub fn i64s(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_i64().expect("integer"))
        .collect()
}

/// transformers' per-token log-probs of `sequences` under the model in `dir`, computed in
/// `dtype` (`float32`, `bfloat16` or `float16`).
pub fn reference_logprobs(dir: &Path, sequences: &[Vec<i64>], dtype: &str) -> Vec<Vec<f32>> {
    let rows = run_on_sequences(dir, sequences, &["logprobs", "--dtype", dtype]);
    rows.iter().map(|r| f32s(&r["logprobs"])).collect()
}

/// transformers' next-token log-probs of all `sequences` in one right-padded batch with its
/// attention mask, in f32 with attention implementation `attn` (`eager` or `sdpa`): each
/// sequence's `len - 1` values at its real targets.
pub fn reference_right_padded_logprobs(
    dir: &Path,
    sequences: &[Vec<i64>],
    attn: &str,
) -> Vec<Vec<f32>> {
    let rows = run_on_sequences(
        dir,
        sequences,
        &["logprobs", "--right-padded", "--attn", attn],
    );
    rows.iter().map(|r| f32s(&r["logprobs"])).collect()
}

/// transformers' greedy continuation (`generate`, new tokens only, EOS kept) of each prompt.
pub fn reference_greedy(dir: &Path, prompts: &[Vec<i64>], max_new_tokens: usize) -> Vec<Vec<i64>> {
    let max_new = max_new_tokens.to_string();
    let rows = run_on_sequences(dir, prompts, &["greedy", "--max-new-tokens", &max_new]);
    rows.iter().map(|r| i64s(&r["output_ids"])).collect()
}

fn run_on_sequences(dir: &Path, sequences: &[Vec<i64>], command: &[&str]) -> Vec<Value> {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (input, output) = (tmp.path().join("in.jsonl"), tmp.path().join("out.jsonl"));
    let rows: Vec<Value> = sequences
        .iter()
        .map(|s| serde_json::json!({ "input_ids": s }))
        .collect();
    write_jsonl(&input, &rows);
    let paths = [
        "--model",
        path_str(dir),
        "--input",
        path_str(&input),
        "--output",
        path_str(&output),
    ];
    let args: Vec<&str> = command[..1]
        .iter()
        .chain(&paths)
        .chain(&command[1..])
        .copied()
        .collect();
    qwen2_ref(&args);
    read_jsonl(&output)
}

/// A path as `&str` for command lines (test paths are UTF-8).
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Prepares `run_dir` for a PRIME run of `config`: builds its world and saves a random tiny
/// Qwen2 (with the world's tokenizer) as the warm-up checkpoint, so a run can start without
/// the supervised stage.
pub fn write_tiny_start_model(run_dir: &Path, config: &prime_learner::RunConfig, seed: i64) {
    use prime_model::{CausalLm, Tokenizer};
    let world = prime_world::build_world(&config.world, &run_dir.join("world")).expect("world");
    let tokenizer = Tokenizer::from_dir(&world.tokenizer_dir).expect("tokenizer");
    let eos = tokenizer
        .token_id(tokenizer.eos_token().expect("eos"))
        .expect("eos id");
    let qwen2 = prime_learner::ModelSource {
        hidden_size: 32,
        num_hidden_layers: 2,
        intermediate_size: 64,
        ..prime_learner::ModelSource::default()
    }
    .qwen2_config(tokenizer.vocab_size() as i64, eos, eos);
    tch::manual_seed(seed);
    let mut lm = CausalLm::random(&qwen2, tch::Device::Cpu, tch::Kind::Float, tch::Kind::Float)
        .expect("model");
    lm.generation_config.eos_token_id = Some(prime_model::config::TokenIds::One(eos));
    let dir = prime_learner::checkpoint::sft_checkpoint(run_dir);
    lm.save(&dir, None, prime_model::DEFAULT_MAX_SHARD_BYTES)
        .expect("save");
    prime_model::checkpoint::copy_tokenizer_files(&world.tokenizer_dir, &dir).expect("copy");
}

/// Child processes killed (and reaped) on drop, so a failing test leaves none behind.
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `done` every 200 ms, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The `"kind": "step"` records of a run's metrics.jsonl (none while it does not exist).
pub fn step_records(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "step")
        .collect()
}

/// Runs `command` (a `prime` benchmark) with `--json PATH` appended, asserts it succeeded,
/// and returns the JSON report it wrote and the table it printed.
pub fn run_report(mut command: Command, json: &Path) -> (Value, String) {
    let output = command
        .arg("--json")
        .arg(json)
        .output()
        .expect("prime starts");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (report, String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One sample of a Prometheus endpoint (`name` in full, labels included as exposed, e.g.
/// `prime_learner_groups_total{outcome="kept"}`); `None` while it does not answer.
pub fn gauge(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}
