//! Data preparation on real files and a real tokenizer (the embedded world's): bad rows of
//! every kind counted and named or fatal, prompts over the limit dropped in training and
//! held-out data alike, and parallel tokenization equal to the sequential path.
use std::path::{Path, PathBuf};

use prime_learner::config::{DataConfig, OnBadRow};
use prime_learner::data::{
    encode_prompts, encode_prompts_sequential, prepare, prepare_with, RunData, DATA_SUMMARY_FILE,
};
use prime_learner::run::prepare_run_data;
use prime_model::Tokenizer;
use prime_world::{build_world, read_rows, write_rows, DataRow, SplitConfig, WorldConfig};

/// A small world with a system prompt: its RL rows and its tokenizer.
fn world(dir: &Path) -> (Vec<DataRow>, Tokenizer) {
    let config = WorldConfig {
        seed: 3,
        sft: SplitConfig::with_size(20),
        rl: SplitConfig::with_size(40),
        heldout: SplitConfig::with_size(10),
        vocab_size: 400,
        system_prompt: Some("Think step by step.".into()),
        ..WorldConfig::default()
    };
    let files = build_world(&config, &dir.join("world")).unwrap();
    (
        read_rows(&files.rl.parquet).unwrap(),
        Tokenizer::from_dir(&files.tokenizer_dir).unwrap(),
    )
}

/// `row` with a user message `words` words long.
fn long(row: &DataRow, words: usize) -> DataRow {
    let mut row = row.clone();
    let last = row.prompt.len() - 1;
    row.prompt[last].content = "add the numbers ".repeat(words);
    row
}

#[test]
fn parallel_tokenization_equals_the_sequential_path() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, tokenizer) = world(dir.path());
    let mut rows = rows;
    // Different lengths, so threads finish out of order.
    for i in 0..40 {
        rows.push(long(&rows[i % 10], 1 + 7 * i));
    }
    let parallel = encode_prompts(&rows, &tokenizer);
    let sequential = encode_prompts_sequential(&rows, &tokenizer);
    assert_eq!(parallel.len(), rows.len());
    for (i, (p, s)) in parallel.iter().zip(&sequential).enumerate() {
        let (p, s) = (p.as_ref().unwrap(), s.as_ref().unwrap());
        assert_eq!(p, s, "row {i}");
        assert!(!p.is_empty());
    }
    // And both equal encoding one row at a time with the template rendered anew.
    for (row, ids) in rows.iter().zip(&parallel) {
        let messages: Vec<prime_model::ChatMessage> = row
            .prompt
            .iter()
            .map(|m| prime_model::ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let text = tokenizer.apply_chat_template(&messages, true).unwrap();
        assert_eq!(&tokenizer.encode(&text).unwrap(), ids.as_ref().unwrap());
    }
}

/// A jsonl file with good rows and bad rows of each kind a reader or the validation finds,
/// and a parquet file with good rows, a code row and an over-long prompt. Returns the files
/// and the number of good rows of each.
fn mixed_files(dir: &Path, rows: &[DataRow]) -> (PathBuf, PathBuf) {
    let good = serde_json::to_string(&rows[0]).unwrap();
    let value = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        f(&mut v);
        v.to_string()
    };
    let lines = [
        good.clone(),                                              // 0 good
        "{not json".to_string(),                                   // 1 unparseable
        value(&|v| v["prompt"] = serde_json::json!([])),           // 2 empty prompt
        value(&|v| v["reward_model"]["ground_truth"] = "".into()), // 3 empty truth
        value(&|v| v["prompt"][0]["role"] = "robot".into()),       // 4 unknown role
        value(&|v| v["ability"] = "physics".into()),               // 5 unknown ability
        value(&|v| v["ability"] = "code".into()),                  // 6 code without spec
        value(&|v| v["prompt"][1]["content"] = "   ".into()),      // 7 blank question
        serde_json::to_string(&rows[1]).unwrap(),                  // 8 good
    ];
    let jsonl = dir.join("mixed.jsonl");
    std::fs::write(&jsonl, lines.join("\n\n") + "\n").unwrap();

    let mut code = rows[2].clone();
    code.ability = "code".into();
    code.data_source = "codecontests".into();
    code.reward_model.ground_truth = r#"{"inputs": ["1 2\n"], "outputs": ["3\n"]}"#.into();
    let parquet_rows = vec![rows[3].clone(), code, long(&rows[4], 300), rows[5].clone()];
    let parquet = dir.join("mixed.parquet");
    write_rows(&parquet, &parquet_rows).unwrap();
    (jsonl, parquet)
}

#[test]
fn every_row_is_kept_too_long_or_bad_and_bad_rows_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, tokenizer) = world(dir.path());
    let (jsonl, parquet) = mixed_files(dir.path(), &rows);
    let files = vec![jsonl.clone(), parquet.clone()];
    let prepared = prepare(&files, &tokenizer, 200, OnBadRow::Skip).unwrap();
    let s = &prepared.summary;
    assert_eq!(
        (s.rows, s.kept, s.too_long, s.bad.count),
        (13, 5, 1, 7),
        "{s:?}"
    );
    let at = |row: usize, reason: &str| format!("{}:{row}: {reason}", jsonl.display());
    let expected = [
        (1, "line 3: not a data row: "),
        (2, "field `prompt`: no messages"),
        (3, "field `reward_model.ground_truth`: empty"),
        (4, "field `prompt[0].role`: unknown role \"robot\""),
        (5, "field `ability`: unknown ability \"physics\""),
        (
            6,
            "field `reward_model.ground_truth`: a code row needs a JSON test spec",
        ),
        (7, "field `prompt`: empty prompt"),
    ];
    assert_eq!(s.bad.first.len(), expected.len());
    for (shown, (row, reason)) in s.bad.first.iter().zip(expected) {
        assert!(shown.starts_with(&at(row, reason)), "{shown} vs {reason}");
    }
    assert_eq!(
        s.by_ability,
        [("code".to_string(), 1), ("math".to_string(), 4)].into()
    );
    assert_eq!(
        s.by_source,
        [
            ("codecontests".to_string(), 1),
            (rows[0].data_source.clone(), 4)
        ]
        .into()
    );
    assert!(
        s.prompt_tokens.max > 200 && s.prompt_tokens.p50 <= 200,
        "{s:?}"
    );
    // The kept rows, in file order, with their ability and their ids under the limit.
    let kept: Vec<&str> = prepared
        .rows
        .iter()
        .map(|r| r.data.ability.as_str())
        .collect();
    assert_eq!(kept, ["math", "math", "math", "code", "math"]);
    let prompts = prepared.prompts();
    assert_eq!(prompts[3].ability, prime_verifier::Ability::Code);
    assert!(prompts.iter().all(|p| p.prompt_ids.len() <= 200));

    // Fail: the first bad row stops it, named.
    let message = prepare(&files, &tokenizer, 200, OnBadRow::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&at(1, "line 3")) && message.contains("on_bad_row"),
        "{message}"
    );
    // A file that cannot be read at all is an error in either mode.
    let missing = prepare(
        &[dir.path().join("absent.jsonl")],
        &tokenizer,
        200,
        OnBadRow::Skip,
    )
    .unwrap_err()
    .to_string();
    assert!(missing.contains("absent.jsonl"), "{missing}");
}

#[test]
fn on_bad_row_fail_from_the_config_stops_with_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, tokenizer) = world(dir.path());
    let mut bad = rows[..3].to_vec();
    bad[2].ability = "chemistry".into();
    let file = dir.path().join("train.parquet");
    write_rows(&file, &bad).unwrap();
    let config: DataConfig = toml::from_str("on_bad_row = \"fail\"").unwrap();
    assert_eq!(config.on_bad_row, OnBadRow::Fail);
    let message = prepare_with(std::slice::from_ref(&file), &tokenizer, &config)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!("{}:2: field `ability`", file.display()))
            && message.contains("chemistry"),
        "{message}"
    );
    assert_eq!(DataConfig::default().on_bad_row, OnBadRow::Skip);
    assert!(toml::from_str::<DataConfig>("on_bad_row = \"ignore\"").is_err());
}

#[test]
fn held_out_prompts_are_length_filtered_like_training_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, tokenizer) = world(dir.path());
    let train = dir.path().join("train.jsonl");
    let heldout = dir.path().join("heldout.jsonl");
    write_rows(&train, &[rows[0].clone(), long(&rows[1], 300)]).unwrap();
    write_rows(
        &heldout,
        &[long(&rows[2], 300), rows[3].clone(), rows[4].clone()],
    )
    .unwrap();
    let config: DataConfig = toml::from_str("max_prompt_tokens = 150").unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let (train_data, heldout_data) =
        prepare_run_data(&config, &[train], &[heldout], &tokenizer, &run_dir).unwrap();
    assert_eq!(
        (train_data.summary.kept, train_data.summary.too_long),
        (1, 1)
    );
    assert_eq!(
        (heldout_data.summary.kept, heldout_data.summary.too_long),
        (2, 1)
    );
    assert!(heldout_data
        .eval_problems()
        .iter()
        .all(|p| p.prompt_ids.len() <= 150));
    // The summaries are saved in the run dir for `prime train` to print.
    let saved = RunData::load(&run_dir).unwrap();
    assert!(run_dir.join(DATA_SUMMARY_FILE).exists());
    assert_eq!(saved.train, train_data.summary);
    assert_eq!(saved.heldout, heldout_data.summary);
    assert_eq!(saved.max_prompt_tokens, 150);
    let lines = saved.lines();
    assert_eq!(lines[0], "training data:");
    assert!(lines.contains(&"  dropped as too long: 1 (prompt over 150 tokens)".to_string()));

    // No training prompt left: refused at start, with the counts.
    let short: DataConfig = toml::from_str("max_prompt_tokens = 5").unwrap();
    let message = prepare_run_data(
        &short,
        &[dir.path().join("train.jsonl")],
        &[dir.path().join("heldout.jsonl")],
        &tokenizer,
        &run_dir,
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("no training prompt") && message.contains("2 too long"),
        "{message}"
    );
}
