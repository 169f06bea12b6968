//! `prime world --standin` then `prime data check` on what it wrote, as real processes: the
//! interface the rehearsal config is built on, the counts it prints and writes to
//! standin.json, and the bad rows and over-long prompts a run will skip and count.
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn prime(args: &[&str], dir: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prime {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_standin_passes_data_check_with_its_bad_and_long_rows_counted() {
    let dir = tempfile::tempdir().unwrap();
    // Rows 4,321 and 14,321 are bad: an empty ground truth, an unknown role.
    let out = prime(
        &[
            "world",
            "--standin",
            "--out",
            "standin",
            "--seed",
            "9",
            "--train-rows",
            "15000",
            "--heldout-rows",
            "64",
        ],
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let root = dir.path().join("standin");
    for file in [
        "data/train.parquet",
        "data/validation.parquet",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "standin.json",
    ] {
        assert!(root.join(file).exists(), "{file} missing:\n{stdout}");
    }
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("standin.json")).unwrap()).unwrap();
    assert_eq!(stats["config"]["seed"], 9);
    let train = &stats["train"];
    assert_eq!(train["rows"], 15_000);
    assert_eq!(train["bad"], 2);
    assert!(stdout.contains("15000 rows: "), "{stdout}");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tokenizer/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(config["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    // --train-rows belongs to --standin.
    let refused = Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(["world", "--out", "w", "--train-rows", "5"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());

    prime(
        &[
            "data",
            "check",
            "--files",
            "standin/data/train.parquet",
            "standin/data/validation.parquet",
            "--tokenizer",
            "standin/tokenizer",
            "--max-prompt-tokens",
            "1024",
            "--json",
            "check.json",
        ],
        dir.path(),
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("check.json")).unwrap())
            .unwrap();
    assert_eq!(summary["rows"], 15_064);
    assert_eq!(summary["bad"]["count"], 2);
    let first = summary["bad"]["first"].as_array().unwrap();
    assert!(first[0]
        .as_str()
        .unwrap()
        .ends_with("train.parquet:4321: field `reward_model.ground_truth`: empty"));
    assert!(first[1]
        .as_str()
        .unwrap()
        .ends_with("train.parquet:14321: field `prompt[0].role`: unknown role \"narrator\""));
    // Some code statements are too long for 1,024 prompt tokens, a few math questions too.
    let too_long = summary["too_long"].as_u64().unwrap();
    assert!(too_long > 0, "{summary}");
    let kept = summary["kept"].as_u64().unwrap();
    assert_eq!(kept + too_long + 2, 15_064);
    let code_written =
        train["code_stdin"].as_u64().unwrap() + train["code_call"].as_u64().unwrap() + 32;
    let code_kept = summary["by_ability"]["code"].as_u64().unwrap();
    assert!(
        code_kept < code_written && code_kept > code_written * 3 / 4,
        "{summary}"
    );
    assert!(summary["prompt_tokens"]["max"].as_u64().unwrap() > 1024);
}
