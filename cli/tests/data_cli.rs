//! `prime data check` run as a real process on a jsonl and a parquet file written here, with
//! bad rows and over-long prompts: the printed lines and every key of `--json`.
use std::path::Path;
use std::process::Command;

use prime_world::{build_world, read_rows, write_rows, DataRow, SplitConfig, WorldConfig};
use serde_json::{json, Value};

/// `row` with a user message `words` words long.
fn long(row: &DataRow, words: usize) -> DataRow {
    let mut row = row.clone();
    let last = row.prompt.len() - 1;
    row.prompt[last].content = "add the numbers ".repeat(words);
    row
}

/// Writes the two files: jsonl rows 0 and 3 good, 1 not JSON, 2 of an unknown ability, 4 too
/// long; parquet rows 0 and 2 good, 1 a code row whose ground truth is no test spec, 3 a good
/// code row.
fn write_files(dir: &Path, rows: &[DataRow]) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut physics = rows[1].clone();
    physics.ability = "physics".into();
    let lines = [
        serde_json::to_string(&rows[0]).unwrap(),
        "{\"data_source\": 1".to_string(),
        serde_json::to_string(&physics).unwrap(),
        serde_json::to_string(&rows[2]).unwrap(),
        serde_json::to_string(&long(&rows[3], 300)).unwrap(),
    ];
    let jsonl = dir.join("train.jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();

    let mut no_spec = rows[5].clone();
    no_spec.ability = "code".into();
    let mut code = rows[7].clone();
    code.ability = "code".into();
    code.data_source = "codecontests".into();
    code.reward_model.ground_truth = r#"{"inputs": ["2\n"], "outputs": ["4\n"]}"#.into();
    let parquet = dir.join("train.parquet");
    write_rows(&parquet, &[rows[4].clone(), no_spec, rows[6].clone(), code]).unwrap();
    (jsonl, parquet)
}

#[test]
fn data_check_counts_and_names_what_it_finds() {
    let dir = tempfile::tempdir().unwrap();
    let world = build_world(
        &WorldConfig {
            seed: 5,
            sft: SplitConfig::with_size(10),
            rl: SplitConfig::with_size(20),
            heldout: SplitConfig::with_size(5),
            vocab_size: 400,
            ..WorldConfig::default()
        },
        &dir.path().join("world"),
    )
    .unwrap();
    let rows = read_rows(&world.rl.parquet).unwrap();
    let (jsonl, parquet) = write_files(dir.path(), &rows);
    let json_path = dir.path().join("summary.json");
    let out = Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(["data", "check", "--files"])
        .arg(&jsonl)
        .arg(&parquet)
        .arg("--tokenizer")
        .arg(&world.tokenizer_dir)
        .args(["--max-prompt-tokens", "200", "--json"])
        .arg(&json_path)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = &rows[0].data_source;
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let keys: Vec<&str> = summary
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "rows",
            "kept",
            "too_long",
            "bad",
            "by_ability",
            "by_source",
            "prompt_tokens",
            "seconds"
        ]
    );
    assert_eq!(summary["rows"], 9);
    assert_eq!(summary["kept"], 5);
    assert_eq!(summary["too_long"], 1);
    let bad_jsonl = |row: usize, reason: &str| format!("{}:{row}: {reason}", jsonl.display());
    let bad_parquet = |row: usize, reason: &str| format!("{}:{row}: {reason}", parquet.display());
    let first: Vec<String> = summary["bad"]["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(summary["bad"]["count"], 3);
    assert_eq!(first.len(), 3);
    assert!(
        first[0].starts_with(&bad_jsonl(1, "line 2: not a data row: ")),
        "{first:?}"
    );
    assert_eq!(
        first[1],
        bad_jsonl(
            2,
            "field `ability`: unknown ability \"physics\" (expected \"math\" or \"code\")"
        )
    );
    assert!(
        first[2].starts_with(&bad_parquet(
            1,
            "field `reward_model.ground_truth`: a code row needs a JSON test spec"
        )),
        "{first:?}"
    );
    assert_eq!(summary["by_ability"], json!({"code": 1, "math": 4}));
    let mut by_source = serde_json::Map::new();
    by_source.insert("codecontests".into(), json!(1));
    by_source.insert(source.clone(), json!(4));
    assert_eq!(summary["by_source"], Value::Object(by_source));
    let tokens = &summary["prompt_tokens"];
    let figure = |key: &str| tokens[key].as_u64().unwrap();
    assert!(
        0 < figure("p50")
            && figure("p50") <= figure("p90")
            && figure("p90") <= figure("p99")
            && figure("p99") <= figure("max")
            && figure("max") > 200,
        "{tokens}"
    );
    assert_eq!(tokens.as_object().unwrap().len(), 4);
    assert!(summary["seconds"].as_f64().unwrap() >= 0.0);

    // The printed lines say the same.
    let lines: Vec<&str> = stdout.lines().collect();
    let code_first = if "codecontests" < source.as_str() {
        format!("codecontests 1, {source} 4")
    } else {
        format!("{source} 4, codecontests 1")
    };
    let expected = [
        "rows read: 9".to_string(),
        "kept: 5".to_string(),
        "kept by ability: code 1, math 4".to_string(),
        format!("kept by data_source: {code_first}"),
        "dropped as too long: 1 (prompt over 200 tokens)".to_string(),
        "bad rows: 3".to_string(),
        format!(
            "prompt tokens: p50 {} p90 {} p99 {} max {}",
            figure("p50"),
            figure("p90"),
            figure("p99"),
            figure("max")
        ),
    ];
    assert_eq!(lines[..7], expected, "{stdout}");
    assert!(lines[7].starts_with("seconds: "), "{stdout}");
    assert_eq!(lines[8], "first 3 of 3 bad rows:");
    for (line, bad) in lines[9..].iter().zip(&first) {
        assert_eq!(*line, format!("  {bad}"));
    }
    assert_eq!(lines.len(), 12, "{stdout}");

    // A missing file is an error naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(["data", "check", "--files"])
        .arg(dir.path().join("absent.parquet"))
        .arg("--tokenizer")
        .arg(&world.tokenizer_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.parquet"));
}
