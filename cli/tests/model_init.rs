//! `prime model init`: a from-scratch model of a run config's `[model]` shape, with the
//! vocabulary padded past the tokenizer, loads in transformers with the same log-probs (also
//! at padded ids) and never overwrites an existing directory.
use std::path::Path;
use std::process::Command;

use prime_tests::*;
use serde_json::json;

fn prime() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prime"));
    cmd.env("PRIME_THREADS", "1").env("RUST_LOG", "warn");
    cmd
}

const SHAPE: &str = "[model]\nhidden_size = 16\nnum_hidden_layers = 1\nnum_attention_heads = 2\n\
num_key_value_heads = 1\nintermediate_size = 32\nmax_position_embeddings = 4096\n\
tie_word_embeddings = false\nvocab_size = 1000\n";

#[test]
fn init_pads_the_vocabulary_and_loads_in_transformers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let mut world = prime_world::WorldConfig::default();
    world.sft.size = 100;
    world.rl.size = 10;
    world.heldout.size = 10;
    let world = prime_world::build_world(&world, &tmp.path().join("world")).unwrap();
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, SHAPE).unwrap();
    let model = tmp.path().join("model");
    let init = |out: &Path, extra: &[&str]| {
        prime()
            .args([
                "model",
                "init",
                "--config",
                path_str(&config),
                "--tokenizer",
            ])
            .arg(&world.tokenizer_dir)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = init(&model, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config_json["vocab_size"], 1000);
    assert_eq!(config_json["tie_word_embeddings"], false);
    let tokenizer_size = prime_model::Tokenizer::from_dir(&model)
        .unwrap()
        .vocab_size();
    assert!(
        tokenizer_size < 1000,
        "the world's tokenizer has {tokenizer_size} ids"
    );

    // Parameters by hand: embedding and head 1000 x 16 each; one layer with q (16x16 + 16),
    // k and v (8x16 + 8 each: one kv head of width 8), o (16x16), the MLP (3 x 16x32) and two
    // norms (16 each); the final norm (16).
    let layer = (256 + 16) + 2 * (128 + 8) + 256 + 3 * 512 + 2 * 16;
    let expected = 2 * 16_000 + layer + 16;
    let loaded = qwen2_ref(&[
        "load-dir",
        "--dir",
        path_str(&model),
        "--messages",
        &json!([{"role": "user", "content": "What is 2 + 3?"}]).to_string(),
    ]);
    assert_eq!(loaded["parameters"], expected);

    // The padded rows are real rows: log-probs through them equal transformers'.
    let sequences = vec![vec![1, 40, 700, 41, 999, 3, 12], vec![5, 998, 6, 600]];
    let (input, output) = (tmp.path().join("in.jsonl"), tmp.path().join("out.jsonl"));
    let rows: Vec<_> = sequences
        .iter()
        .map(|s| json!({ "input_ids": s }))
        .collect();
    write_jsonl(&input, &rows);
    let out = prime()
        .args(["model", "logprobs", "--model", path_str(&model), "--input"])
        .args([path_str(&input), "--output", path_str(&output)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = reference_logprobs(&model, &sequences, "float32");
    for (ours, theirs) in read_jsonl(&output).iter().zip(&reference) {
        assert!(max_abs_diff(&f32s(&ours["logprobs"]), theirs) < 1e-4);
    }

    // An existing directory is refused and left as it was.
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let out = init(&model, &["--seed", "7"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );

    // Fewer embedding rows than the tokenizer has ids is refused, naming the key.
    let small = tmp.path().join("small");
    let out = init(&small, &["--set", "model.vocab_size=100"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model.vocab_size = 100"), "{stderr}");
    assert!(!small.exists());
}
