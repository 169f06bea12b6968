//! The catalogue of bad inputs every `prime` command is probed with (docs/reliability.md,
//! "Bad input"), the fixtures they run against, and the rule each run must keep: succeed
//! correctly, or exit with status 1 or 2 and a message that names the file, line, key or
//! flag at fault, leave every file that was there unchanged, never panic (status 101, or 70
//! from the panic hook) and never hang.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prime_model::{CausalLm, Qwen2Config, DEFAULT_MAX_SHARD_BYTES};
use tch::{Device, Kind};

/// The longest a probe may run before it counts as a hang.
pub const HANG: Duration = Duration::from_secs(60);

/// The tiny model's vocabulary and context (`{d}/model`).
pub const VOCAB: i64 = 40;
pub const POSITIONS: i64 = 64;

/// A file a probe writes before it runs.
#[derive(Clone, Copy, Debug)]
pub enum Content {
    Text(&'static str),
    Bytes(&'static [u8]),
    /// `line` repeated `times` times.
    Repeat(&'static str, usize),
}

/// One bad input: a command line (`{d}` is the fixture directory), the files and environment
/// it runs with, and what its error must name (nothing: it must succeed).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// The class of bad input (a row of the table in docs/reliability.md).
    pub class: &'static str,
    pub args: &'static [&'static str],
    pub env: &'static [(&'static str, &'static str)],
    pub files: &'static [(&'static str, Content)],
    /// Each must appear in stderr; empty: the command must succeed.
    pub mentions: &'static [&'static str],
    /// Files the command may change when it succeeds.
    pub writes: &'static [&'static str],
}

impl Probe {
    pub const fn new(class: &'static str, args: &'static [&'static str]) -> Self {
        Self {
            class,
            args,
            env: &[],
            files: &[],
            mentions: &[],
            writes: &[],
        }
    }
    pub const fn env(self, env: &'static [(&'static str, &'static str)]) -> Self {
        Self { env, ..self }
    }
    pub const fn files(self, files: &'static [(&'static str, Content)]) -> Self {
        Self { files, ..self }
    }
    pub const fn fails(self, mentions: &'static [&'static str]) -> Self {
        Self { mentions, ..self }
    }
    pub const fn succeeds(self, writes: &'static [&'static str]) -> Self {
        Self { writes, ..self }
    }
}

/// A grade input line that grades to 1.
pub const GRADE_ROW: &str =
    r#"{"id": 1, "ability": "math", "response": "so \\boxed{2}", "ground_truth": "2"}"#;
/// What an existing output holds before a probe; a failed probe must leave it so.
pub const EXISTING: &str = "EXISTING OUTPUT\n";

/// The directory every probe runs in: a tiny model, good inputs of every kind and an
/// existing output. `{d}` in a probe's arguments is its path.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        tch::set_num_threads(1);
        let config: Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": POSITIONS, "tie_word_embeddings": false,
            "eos_token_id": 2
        }))
        .unwrap();
        tch::manual_seed(0);
        let lm = CausalLm::random(&config, Device::Cpu, Kind::Float, Kind::Float).unwrap();
        lm.save(&d.join("model"), None, DEFAULT_MAX_SHARD_BYTES)
            .unwrap();
        let write = |name: &str, text: &str| std::fs::write(d.join(name), text).unwrap();
        write(
            "ids.jsonl",
            "{\"input_ids\": [1, 2, 3, 4]}\n{\"input_ids\": [5, 6]}\n",
        );
        write("grade.jsonl", &format!("{GRADE_ROW}\n"));
        write("out.jsonl", EXISTING);
        write("rollouts.jsonl", &rollouts(2, 2));
        std::fs::create_dir(d.join("out")).unwrap();
        write("out/keep.txt", EXISTING);
        write("config.toml", TINY_CONFIG);
        std::os::unix::fs::symlink(d.join("grade.jsonl"), d.join("link.jsonl")).unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `probe` and checks the rule; the failure message says which probe broke it.
    pub fn check(&self, probe: &Probe) {
        let d = self.path();
        for (name, content) in probe.files {
            let bytes = match content {
                Content::Text(t) => t.as_bytes().to_vec(),
                Content::Bytes(b) => b.to_vec(),
                Content::Repeat(line, n) => line.repeat(*n).into_bytes(),
            };
            let path = d.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let args: Vec<String> = probe
            .args
            .iter()
            .map(|a| a.replace("{d}", d.to_str().unwrap()))
            .collect();
        let before = snapshot(d);
        let run = run_prime(&args, probe.env);
        let what = format!("probe [{}] prime {}", probe.class, args.join(" "));
        let changed = changes(&before, &snapshot(d));
        run.assert_no_crash(&what);
        if probe.mentions.is_empty() {
            assert_eq!(
                run.code,
                Some(0),
                "{what}: expected success\n{}",
                run.stderr
            );
            for path in changed {
                assert!(
                    probe.writes.iter().any(|w| path.starts_with(w)),
                    "{what}: changed {path} beyond its outputs"
                );
            }
        } else {
            assert!(
                matches!(run.code, Some(1 | 2)),
                "{what}: expected a refusal (status 1 or 2), got {:?}\n{}",
                run.code,
                run.stderr
            );
            for mention in probe.mentions {
                assert!(
                    run.stderr.contains(mention),
                    "{what}: the message does not name {mention:?}:\n{}",
                    run.stderr
                );
            }
            assert!(
                changed.is_empty(),
                "{what}: a failed run changed {changed:?}"
            );
        }
    }
}

/// A run config small enough to load in an instant (its world is never built by the probes).
pub const TINY_CONFIG: &str = r#"
[world]
seed = 1
sft = { size = 8 }
rl = { size = 8 }
heldout = { size = 4 }

[learner]
steps = 1

[learner.algo]
mini_batches = 1

[learner.rollout]
batch_prompts = 2
samples_per_prompt = 2
max_response_tokens = 8

[learner.data]
max_prompt_tokens = 48
"#;

/// `groups` rollout groups of `k` responses for the tiny model, one per line.
pub fn rollouts(groups: usize, k: usize) -> String {
    (0..groups)
        .map(|g| {
            let responses: Vec<serde_json::Value> = (0..k)
                .map(|i| {
                    let ids: Vec<i64> = (0..4)
                        .map(|t| 3 + ((g * 7 + i * 5 + t) as i64 % 30))
                        .collect();
                    serde_json::json!({ "ids": ids, "score": (i % 2) as f64 })
                })
                .collect();
            format!(
                "{}\n",
                serde_json::json!({ "prompt_ids": [3 + g as i64, 4, 5], "responses": responses })
            )
        })
        .collect()
}

/// How a `prime` run ended.
pub struct Run {
    /// The exit status; `None` when killed by a signal (a hang is killed too).
    pub code: Option<i32>,
    pub stderr: String,
    pub stdout: String,
    pub hung: bool,
}

impl Run {
    /// No hang, no panic (101 from Rust's default hook, 70 from ours), no death by signal.
    pub fn assert_no_crash(&self, what: &str) {
        assert!(!self.hung, "{what}: still running after {HANG:?}");
        assert!(
            !matches!(self.code, Some(101) | Some(70) | None),
            "{what}: crashed with status {:?}:\n{}",
            self.code,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked at") && !self.stderr.contains("internal error"),
            "{what}: panicked:\n{}",
            self.stderr
        );
    }
}

/// Runs `prime ARGS` with `env`, killed after [`HANG`].
pub fn run_prime(args: &[String], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prime"));
    command
        .args(args)
        .env("PRIME_THREADS", "1")
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .env_remove("PRIME_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("prime starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let (status, hung) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break (status, false);
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            break (child.wait().unwrap(), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        hung,
    }
}

/// Every file under `dir` (relative path) with its bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![PathBuf::from(dir)];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let name = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                files.insert(format!("{name}/"), Vec::new());
                stack.push(path);
            } else if meta.is_file() {
                files.insert(name, std::fs::read(&path).unwrap());
            } else {
                files.insert(name, b"<link>".to_vec());
            }
        }
    }
    files
}

/// Paths added, removed or changed between two snapshots.
pub fn changes(
    before: &BTreeMap<String, Vec<u8>>,
    after: &BTreeMap<String, Vec<u8>>,
) -> Vec<String> {
    let mut changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    changed.extend(after.keys().filter(|k| !before.contains_key(*k)).cloned());
    changed
}

/// Values a careless or hostile user types for a number: NaN and infinities in their
/// spellings, out-of-range and negative numbers, overflow, text, nothing.
pub const BAD_NUMBERS: &[&str] = &[
    "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1", "-0.5", "-1e-6", "abc", "", " ", "1,5",
    "0x10", "--", "1e", "4.5.6",
];

/// Raw TOML values put in place of a config key's value.
pub const BAD_TOML_VALUES: &[&str] = &[
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e400",
    "\"x\"",
    "[]",
    "{}",
    "true",
    "99999999999999999999",
    "0.0",
    "-0.0",
    "1.5",
    "[0.9, 0.1]",
    "",
];

/// `text` (TOML) with the value of its `index`-th `key = value` line replaced by `raw`.
pub fn replace_toml_value(text: &str, index: usize, raw: &str) -> String {
    let assignments: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(" = "))
        .map(|(i, _)| i)
        .collect();
    let target = assignments[index % assignments.len()];
    text.lines()
        .enumerate()
        .map(|(i, line)| match line.split_once(" = ") {
            Some((key, _)) if i == target => format!("{key} = {raw}\n"),
            _ => format!("{line}\n"),
        })
        .collect()
}

/// Damage done to a good JSONL file by a generated case.
#[derive(Clone, Debug)]
pub enum Damage {
    /// The file cut at this byte (mod its length): truncated JSON.
    Truncate(usize),
    /// A UTF-8 byte-order mark in front.
    Bom,
    /// CRLF line ends.
    Crlf,
    /// The value of one field (by index among the first object's keys) replaced by raw text.
    Field(usize, &'static str),
    /// One field dropped.
    Drop(usize),
    /// Bytes overwritten (position mod length, value).
    Bytes(Vec<(usize, u8)>),
    /// The file emptied, or only blank lines.
    Empty(&'static str),
    /// A 2 MiB line of junk appended.
    Huge,
}

/// Raw JSON texts put in place of a field's value.
pub const BAD_VALUES: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1",
    "null",
    "\"text\"",
    "[]",
    "{}",
    "true",
    "99999999999999999999",
    "[1.5, 2]",
    "[-3]",
    "[1e300]",
    "\"\"",
    "[[1]]",
    "0.5",
];

/// `text` with `damage` done.
pub fn damage(text: &str, damage: &Damage) -> Vec<u8> {
    match damage {
        Damage::Truncate(at) => text.as_bytes()[..at % (text.len() + 1)].to_vec(),
        Damage::Bom => [b"\xEF\xBB\xBF".as_slice(), text.as_bytes()].concat(),
        Damage::Crlf => text.replace('\n', "\r\n").into_bytes(),
        Damage::Field(index, raw) => edit_first_object(text, *index, Some(raw)),
        Damage::Drop(index) => edit_first_object(text, *index, None),
        Damage::Bytes(edits) => {
            let mut bytes = text.as_bytes().to_vec();
            for &(at, value) in edits {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = value;
                }
            }
            bytes
        }
        Damage::Empty(blank) => blank.as_bytes().to_vec(),
        Damage::Huge => format!("{text}{}\n", "x".repeat(2 << 20)).into_bytes(),
    }
}

/// The first line's object with its `index`-th key set to `raw` (or dropped).
fn edit_first_object(text: &str, index: usize, raw: Option<&str>) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&lines[0]).unwrap();
    let keys: Vec<String> = object.keys().cloned().collect();
    let key = &keys[index % keys.len()];
    match raw {
        Some(raw) => {
            object.insert(key.clone(), serde_json::Value::String("@@RAW@@".into()));
            lines[0] = serde_json::Value::Object(object)
                .to_string()
                .replace("\"@@RAW@@\"", raw);
        }
        None => {
            object.remove(key);
            lines[0] = serde_json::Value::Object(object).to_string();
        }
    }
    (lines.join("\n") + "\n").into_bytes()
}

/// The generated damage cases (proptest).
pub fn damage_strategy() -> impl proptest::strategy::Strategy<Value = Damage> {
    use proptest::prelude::*;
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        Just(Damage::Bom),
        Just(Damage::Crlf),
        (any::<usize>(), proptest::sample::select(BAD_VALUES))
            .prop_map(|(i, v)| Damage::Field(i, v)),
        any::<usize>().prop_map(Damage::Drop),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6).prop_map(Damage::Bytes),
        proptest::sample::select(&["", "\n\n", "  \r\n"][..]).prop_map(Damage::Empty),
        Just(Damage::Huge),
    ]
}

/// Non-blank lines of JSONL `bytes` once a byte-order mark is dropped, when it is UTF-8.
pub fn nonblank_lines(bytes: &[u8]) -> Option<usize> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).ok()?;
    Some(text.lines().filter(|l| !l.trim().is_empty()).count())
}

/// The machine has no CUDA device (the device probes expect the "no CUDA device" error).
pub fn no_cuda() -> bool {
    tch::Cuda::device_count() == 0
}
