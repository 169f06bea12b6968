//! The small variant of `make rehearsal` (configs/rehearsal.toml): the paper's run shapes on a
//! CPU, end to end as separate processes. A stand-in for Eurus-2-RL-Data from
//! `prime world --standin` (math and code rows, the real system prompt, code statements past
//! the 1,024-token prompt limit, both code test forms), a model with Qwen2.5-Math-7B's
//! vocabulary (152,064 rows, untied, padded past the tokenizer) from `prime model init`, the
//! paper's prompt limit and algorithm settings; `prime train` with a verifier, a learner and
//! two actors runs a step and evaluates math and code held-out rows. Only the response limit,
//! the data size and the model's width are cut so that it runs in about a minute.
use std::path::Path;
use std::process::Command;

use prime_tests::*;
use serde_json::Value;

fn prime() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prime"));
    cmd.env("PRIME_THREADS", "1").env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().expect("prime runs");
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_rehearsal_runs_at_the_papers_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rehearsal = repo_root().join("configs/rehearsal.toml");
    let standin = root.join("standin");
    run(
        prime()
            .args(["world", "--standin", "--out", path_str(&standin)])
            .args(["--train-rows", "3000", "--heldout-rows", "64"]),
        "prime world --standin",
    );

    // The data as the run will see it: code statements over the paper's 1,024-token limit
    // are dropped and counted, math and code both kept.
    let check = root.join("check.json");
    let train = standin.join("data/train.parquet");
    let validation = standin.join("data/validation.parquet");
    run(
        prime()
            .args(["data", "check", "--files", path_str(&train)])
            .args([path_str(&validation), "--tokenizer"])
            .arg(standin.join("tokenizer"))
            .args(["--max-prompt-tokens", "1024", "--json", path_str(&check)]),
        "prime data check",
    );
    let check = json(&check);
    assert_eq!(check["rows"], 3064);
    assert!(check["too_long"].as_u64().unwrap() > 0, "{check}");
    assert!(check["by_ability"]["math"].as_u64().unwrap() > 0);
    assert!(check["by_ability"]["code"].as_u64().unwrap() > 0);
    assert!(check["prompt_tokens"]["max"].as_u64().unwrap() > 1024);

    let model = root.join("model");
    run(
        prime()
            .args(["model", "init", "--config", path_str(&rehearsal)])
            .args([
                "--set",
                "model.hidden_size=16",
                "--set",
                "model.intermediate_size=32",
            ])
            .args(["--set", "model.num_attention_heads=2", "--set"])
            .arg("model.num_key_value_heads=1")
            .arg("--tokenizer")
            .arg(standin.join("tokenizer"))
            .args(["--out", path_str(&model)]),
        "prime model init",
    );
    let config = json(&model.join("config.json"));
    assert_eq!(config["vocab_size"], 152_064);
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["max_position_embeddings"], 4096);

    let run_dir = root.join("run");
    let set = |key: &str, value: String| ["--set".to_string(), format!("{key}={value}")];
    let mut train_cmd = prime();
    train_cmd
        .args(["train", "--config", path_str(&rehearsal)])
        .args(["--run-dir", path_str(&run_dir), "--actors", "2"])
        .args(set("model.path", format!("{:?}", path_str(&model))))
        .args(set(
            "learner.data.train_files",
            format!("[{:?}]", path_str(&train)),
        ))
        .args(set(
            "learner.data.heldout_files",
            format!("[{:?}]", path_str(&validation)),
        ))
        .args(set("learner.steps", "1".into()))
        .args(set("learner.rollout.max_response_tokens", "24".into()))
        .args(set("learner.eval.problems", "4".into()));
    let out = train_cmd.output().expect("prime runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "prime train failed:\n{stdout}\n{stderr}"
    );

    // The start-up summary, saved and printed: too-long prompts dropped in both splits.
    let data = json(&run_dir.join("data.json"));
    assert!(data["train"]["too_long"].as_u64().unwrap() > 0, "{data}");
    assert!(data["heldout"]["too_long"].as_u64().unwrap() > 0, "{data}");
    assert!(
        stdout.contains("dropped as too long") || stderr.contains("dropped as too long"),
        "{stdout}\n{stderr}"
    );

    // One step of whole groups, and held-out evaluations graded by ability: math by the math
    // grader, code by the verifier's sandbox.
    let steps = step_records(&run_dir);
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0]["batch/groups"], 4);
    assert_eq!(steps[0]["batch/responses"], 16);
    let evals: Vec<Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "eval")
        .collect();
    assert!(!evals.is_empty());
    for eval in &evals {
        assert!(
            eval["val/accuracy/math"].is_f64() && eval["val/accuracy/code"].is_f64(),
            "{eval}"
        );
    }
    // The checkpoint is a self-contained model directory at the padded vocabulary.
    let saved = run_dir.join("checkpoints/step-000001/policy");
    assert_eq!(json(&saved.join("config.json"))["vocab_size"], 152_064);
    assert!(saved.join("tokenizer_config.json").exists());
}
