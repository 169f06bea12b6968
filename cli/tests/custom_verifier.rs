//! Bring your own reward, end to end: the Python verifier docs/verifier.md shows (taken from
//! the page, its gRPC stubs generated from proto/ into a temporary directory) grades the rows
//! of one data source for a real `prime actor run`, next to a real `prime verifier serve` for
//! the other rows and a real `prime learner serve` on a tiny model. The items it saw carry
//! their rows' `data_source` and `extra_info`, no other source reaches it, the built-in
//! verifier grades the rest, its scores reach the learner's steps, and `prime status --json`
//! reads it like any verifier.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prime_tests::{free_addr, repo_root, step_records, wait_for, write_tiny_start_model, Procs};
use serde_json::Value;

const CONFIG: &str = r#"
[world]
seed = 5
sft = { size = 20 }
rl = { size = 40 }
heldout = { size = 4 }

[learner]
steps = 2

[learner.algo]
mini_batches = 1
filter = { enabled = false }

[learner.rollout]
batch_prompts = 4
samples_per_prompt = 2
max_response_tokens = 12

[learner.eval]
every = 0
problems = 4
greedy = false
"#;

/// The data source routed to the custom verifier.
const SOURCE: &str = "keyword_task";

fn spawn(program: &Path, args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(program)
        .args(args)
        .env("PRIME_THREADS", "1")
        .env("RUST_LOG", "info")
        .env_remove("PRIME_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starts")
}

/// The Python block of docs/verifier.md's "Bring your own reward" section.
fn documented_verifier() -> String {
    let page = std::fs::read_to_string(repo_root().join("docs/verifier.md")).unwrap();
    let section = &page[page.find("## Bring your own reward").expect("the section")..];
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let end = start + section[start..].find("\n```").expect("the block ends");
    section[start..end].to_string() + "\n"
}

/// `prime status --addr URL --json`.
fn status(url: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(["status", "--addr", url, "--json"])
        .env_remove("PRIME_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_python_verifier_grades_its_data_source_for_a_real_actor() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir: PathBuf = tmp.path().join("run");
    let config_path = tmp.path().join("config.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let config = prime_learner::RunConfig::from_file(&config_path).unwrap();
    write_tiny_start_model(&run_dir, &config, 11);
    let tokenizer = prime_learner::checkpoint::sft_checkpoint(&run_dir);

    // Every other training row becomes the custom task: its extra_info gains the keyword
    // (empty: every response contains it, so each of its items scores 1).
    let train = tmp.path().join("train.jsonl");
    let rows: Vec<Value> = std::fs::read_to_string(run_dir.join("world/data/rl.jsonl"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let mut row: Value = serde_json::from_str(line).unwrap();
            if i % 2 == 1 {
                row["data_source"] = SOURCE.into();
                row["extra_info"]["keyword"] = "".into();
            }
            row
        })
        .collect();
    std::fs::write(
        &train,
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();

    // The page's verifier, with stubs generated now from the repository's protos.
    let python = prime_tests::python();
    let stubs = tmp.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto_dir = repo_root().join("proto/proto");
    let mut protoc = Command::new(&python);
    protoc
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_dir);
    protoc.arg(format!("--python_out={}", stubs.display()));
    protoc.arg(format!("--grpc_python_out={}", stubs.display()));
    for entry in std::fs::read_dir(proto_dir.join("prime/v1")).unwrap() {
        protoc.arg(entry.unwrap().path());
    }
    let generated = protoc.output().unwrap();
    assert!(
        generated.status.success(),
        "grpc_tools.protoc (pip install -r tests/python/requirements.txt): {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let script = tmp.path().join("custom_verifier.py");
    std::fs::write(&script, documented_verifier()).unwrap();

    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (custom, builtin, learner) = (free_addr(), free_addr(), free_addr());
    let (custom_url, builtin_url, learner_url) = (
        format!("http://{custom}"),
        format!("http://{builtin}"),
        format!("http://{learner}"),
    );
    let custom_log = tmp.path().join("custom.log");
    let prime = PathBuf::from(env!("CARGO_BIN_EXE_prime"));
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        &python,
        &[
            &s(&script),
            "--listen",
            &custom.to_string(),
            "--stubs",
            &s(&stubs),
        ],
        &custom_log,
    ));
    procs.0.push(spawn(
        &prime,
        &["verifier", "serve", "--listen", &builtin.to_string()],
        &tmp.path().join("verifier.log"),
    ));
    let train_files = format!("learner.data.train_files=[{:?}]", s(&train));
    procs.0.push(spawn(
        &prime,
        &[
            "learner",
            "serve",
            "--config",
            &s(&config_path),
            "--run-dir",
            &s(&run_dir),
            "--listen",
            &learner.to_string(),
            "--set",
            &train_files,
        ],
        &tmp.path().join("learner.log"),
    ));
    wait_for("the custom verifier", Duration::from_secs(60), || {
        std::fs::read_to_string(&custom_log).is_ok_and(|t| t.contains("listening"))
    });
    let route = format!("{SOURCE}={custom_url}");
    procs.0.push(spawn(
        &prime,
        &[
            "actor",
            "run",
            "--learner",
            &learner_url,
            "--verifier",
            &builtin_url,
            "--verifier-route",
            &route,
            "--tokenizer",
            &s(&tokenizer),
            "--max-prompts",
            "4",
            "--max-backoff-secs",
            "1",
        ],
        &tmp.path().join("actor.log"),
    ));

    // The learner stops by itself after its two steps.
    let started = Instant::now();
    let learner_status = loop {
        if let Some(status) = procs.0[2].try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "the run did not finish: {}",
            std::fs::read_to_string(tmp.path().join("learner.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        learner_status.success(),
        "{}",
        std::fs::read_to_string(tmp.path().join("learner.log")).unwrap_or_default()
    );

    // What the custom verifier graded: only its source, each with its row's extra_info.
    let graded: Vec<Value> = std::fs::read_to_string(&custom_log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("id").is_some())
        .collect();
    assert!(!graded.is_empty(), "the custom verifier graded nothing");
    for item in &graded {
        assert_eq!(item["data_source"], SOURCE, "{item}");
        let info: Value = serde_json::from_str(item["extra_info"].as_str().unwrap()).unwrap();
        assert_eq!(info["keyword"], "", "{item}");
        assert_eq!(info["split"], "rl", "{item}");
        let index = info["index"].as_u64().unwrap() as usize;
        assert_eq!(
            index % 2,
            1,
            "an even row reached the custom verifier: {item}"
        );
        assert_eq!(rows[index]["extra_info"], info, "{item}");
        assert_eq!(item["score"], 1.0);
    }
    // `prime status` reads it, and the built-in verifier graded the other rows.
    let custom_status = status(&custom_url);
    assert_eq!(custom_status["role"], "verifier");
    assert_eq!(custom_status["items_graded"], graded.len());
    assert!(status(&builtin_url)["items_graded"].as_u64().unwrap() > 0);

    // Its scores reached the steps: a custom group scores 1, a built-in one 0 (a random tiny
    // model does not box the right answer), so each step's unfiltered mean times the groups
    // that arrived counts the custom groups among them.
    let steps = step_records(&run_dir);
    assert_eq!(steps.len(), 2);
    let custom_groups: f64 = steps
        .iter()
        .map(|r| {
            r["critic/score/unfiltered_mean"].as_f64().unwrap()
                * r["batch/groups_seen"].as_f64().unwrap()
        })
        .sum();
    assert!(custom_groups >= 1.0, "{steps:?}");
    assert!(
        (custom_groups - custom_groups.round()).abs() < 1e-6,
        "{steps:?}"
    );
}
