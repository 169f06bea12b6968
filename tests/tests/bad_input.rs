//! Every kind of file the project reads, damaged on purpose: run configs (unknown keys, wrong
//! types, broken TOML, bad `--set`), dataset rows (jsonl and parquet), model directories
//! (config.json, safetensors) and checkpoints (trainer state, optimizer state). Each must give
//! an error that names the file and the field or tensor at fault; random damage (proptest) must
//! give an error or a valid result, never a panic.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use prime_learner::RunConfig;
use prime_model::{CausalLm, DEFAULT_MAX_SHARD_BYTES};
use prime_world::dataset::read_rows;
use proptest::prelude::*;
use tch::{Device, Kind};

fn config_error(text: &str, overrides: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    // Parsing names unknown keys and bad types; validation (as `open_run` does it) names
    // values out of range.
    match RunConfig::from_file_with_overrides(&path, &overrides) {
        Ok(config) => match config.learner.validate() {
            Ok(()) => panic!("accepted a bad config: {text} {overrides:?}"),
            Err(message) => message,
        },
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn config_errors_name_the_key_at_fault() {
    for (text, overrides, expected) in [
        (
            "[learner.rollout]\nbatch_prompt = 3\n",
            &[][..],
            "batch_prompt",
        ),
        (
            "[learner.algo.ppo]\nclip_eps = 0.2\nbogus = 1\n",
            &[],
            "bogus",
        ),
        ("[nonsense]\nx = 1\n", &[], "nonsense"),
        ("[learner]\nsteps = \"ten\"\n", &[], "steps"),
        ("[learner]\nsteps = -3\n", &[], "steps"),
        ("[learner\nsteps = 3\n", &[], "line 1"),
        ("", &["learner.no_such_key=1"], "no_such_key"),
        ("", &["learner.steps"], "learner.steps"),
        (
            "",
            &["learner.rollout.samples_per_prompt=1"],
            "samples_per_prompt",
        ),
        // Values serde takes but the actors or the step cannot use.
        ("", &["learner.rollout.top_p=0"], "learner.rollout.top_p"),
        (
            "[learner.rollout]\ntemperature = nan\n",
            &[],
            "learner.rollout.temperature",
        ),
        (
            "[learner.algo.prm]\nbeta = nan\n",
            &[],
            "learner.algo.prm.beta",
        ),
        (
            "",
            &["learner.policy_optimizer.lr=-inf"],
            "learner.policy_optimizer.lr",
        ),
        ("[sft]\nmax_seconds = 1e30\n", &[], "sft.max_seconds"),
        ("[model]\nrope_theta = 0.0\n", &[], "model.rope_theta"),
    ] {
        let message = config_error(text, overrides);
        assert!(
            message.contains(expected),
            "{text:?} {overrides:?}: expected {expected:?} in {message:?}"
        );
        assert!(
            message.contains("config.toml") || !overrides.is_empty(),
            "{message}"
        );
    }
}

/// A key of the old flat `[learner]` table, in a file or a `--set`, is refused with its new
/// place in the sub-tables (docs/configuration.md, "Moved keys"), not taken silently.
#[test]
fn moved_learner_keys_name_their_new_place() {
    for (text, overrides, expected) in [
        ("[learner]\neval_every = 5\n", &[][..], "eval.every"),
        (
            "[learner]\nbatch_prompts = 8\n",
            &[],
            "rollout.batch_prompts",
        ),
        ("[learner.prm]\nbeta = 0.1\n", &[], "algo.prm"),
        ("", &["learner.estimator=rloo"], "algo.estimator"),
        (
            "",
            &["learner.recompute_activations=true"],
            "memory.recompute_activations",
        ),
    ] {
        let message = config_error(text, overrides);
        assert!(
            message.contains(expected),
            "{text:?} {overrides:?}: expected {expected:?} in {message:?}"
        );
    }
}

/// A small world's RL split, in both formats.
fn world_rows(dir: &Path) -> (PathBuf, PathBuf) {
    let config: RunConfig = toml::from_str(
        "[world]\nseed = 1\nsft = { size = 4 }\nrl = { size = 6 }\nheldout = { size = 2 }\n",
    )
    .unwrap();
    let world = prime_world::build_world(&config.world, &dir.join("world")).unwrap();
    (world.rl.jsonl.clone(), world.rl.parquet.clone())
}

#[test]
fn dataset_errors_name_the_line_or_row_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (jsonl, parquet) = world_rows(dir.path());
    assert_eq!(read_rows(&jsonl).unwrap().len(), 6);
    assert_eq!(read_rows(&parquet).unwrap().len(), 6);
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let lines: Vec<&str> = text.lines().collect();

    let write = |name: &str, body: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    // Not JSON on line 3.
    let broken = write(
        "broken.jsonl",
        format!("{}\n{}\n{{oops\n", lines[0], lines[1]),
    );
    let message = read_rows(&broken).unwrap_err().to_string();
    assert!(
        message.contains("broken.jsonl") && message.contains("line 3"),
        "{message}"
    );
    // A row without its prompt.
    let mut row: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    row.as_object_mut().unwrap().remove("prompt");
    let missing = write("missing.jsonl", format!("{row}\n"));
    let message = read_rows(&missing).unwrap_err().to_string();
    assert!(message.contains("prompt"), "{message}");
    // A ground truth of the wrong type.
    let mut row: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    row["reward_model"]["ground_truth"] = serde_json::json!({"nested": [1, 2]});
    let typed = write("typed.jsonl", format!("{row}\n"));
    let message = read_rows(&typed).unwrap_err().to_string();
    assert!(message.contains("line 1"), "{message}");
    // Not parquet at all, an unknown extension, a missing file.
    let fake = write("fake.parquet", "PAR1 but not really".into());
    assert!(read_rows(&fake)
        .unwrap_err()
        .to_string()
        .contains("fake.parquet"));
    let csv = write("rows.csv", "a,b\n".into());
    assert!(read_rows(&csv)
        .unwrap_err()
        .to_string()
        .contains("rows.csv"));
    let message = read_rows(&dir.path().join("absent.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("absent.jsonl"), "{message}");
}

/// Runs `f`, failing the test if it panics instead of returning.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(_) => panic!("{what} panicked instead of returning an error"),
    }
}

/// Flips, truncates or overwrites bytes of `bytes` as the strategy says.
fn damage(bytes: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(at, value) in edits {
        if !out.is_empty() {
            let i = at % out.len();
            out[i] = value;
        }
    }
    if let Some(cut) = cut {
        out.truncate(cut % (bytes.len() + 1));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn damaged_dataset_files_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (jsonl, parquet) = world_rows(dir.path());
        for path in [jsonl, parquet] {
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, damage(&bytes, &edits, cut)).unwrap();
            if let Err(e) = no_panic("read_rows", || read_rows(&path)) {
                let name = path.file_name().unwrap().to_str().unwrap();
                prop_assert!(e.to_string().contains(name), "{e}");
            }
        }
    }
}

/// A tiny random model saved to `dir`.
fn tiny_model_dir(dir: &Path) -> CausalLm {
    tch::set_num_threads(1);
    let config: prime_model::Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "tie_word_embeddings": false
    }))
    .unwrap();
    tch::manual_seed(0);
    let lm = CausalLm::random(&config, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    lm.save(dir, None, DEFAULT_MAX_SHARD_BYTES).unwrap();
    lm
}

fn load(dir: &Path) -> Result<CausalLm, String> {
    no_panic("CausalLm::load", || {
        CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float).map_err(|e| e.to_string())
    })
}

fn safetensors_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a safetensors file")
}

#[test]
fn model_directory_errors_name_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model_dir(dir.path());
    assert!(load(dir.path()).is_ok());
    let config_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();

    config["num_attention_heads"] = serde_json::json!(0);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let message = load(dir.path()).unwrap_err();
    assert!(
        message.contains("num_attention_heads") && message.contains("config.json"),
        "{message}"
    );

    // A config whose shapes disagree with the weights: the tensor is named.
    config["num_attention_heads"] = serde_json::json!(2);
    config["intermediate_size"] = serde_json::json!(48);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let message = load(dir.path()).unwrap_err();
    assert!(message.contains("mlp"), "{message}");

    std::fs::write(&config_path, "{ not json").unwrap();
    assert!(load(dir.path()).unwrap_err().contains("config.json"));
    std::fs::remove_file(&config_path).unwrap();
    assert!(load(dir.path()).unwrap_err().contains("config.json"));
    std::fs::write(&config_path, &original).unwrap();

    // Truncated weights.
    let weights = safetensors_file(dir.path());
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let message = load(dir.path()).unwrap_err();
    assert!(message.contains("safetensors"), "{message}");
    std::fs::remove_file(&weights).unwrap();
    assert!(load(dir.path()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn damaged_weights_never_panic(
        edits in proptest::collection::vec((0usize..512, any::<u8>()), 1..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        tiny_model_dir(dir.path());
        let weights = safetensors_file(dir.path());
        let bytes = std::fs::read(&weights).unwrap();
        // Damage the header (the first bytes): lengths, names, dtypes, offsets.
        std::fs::write(&weights, damage(&bytes, &edits, cut)).unwrap();
        let _ = load(dir.path());
    }
}

#[test]
fn checkpoint_state_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("trainer_state.json");
    std::fs::write(&state, "{\"step\": \"three\"}").unwrap();
    let message = prime_learner::checkpoint::load_state(dir.path())
        .unwrap_err()
        .to_string();
    assert!(message.contains("trainer_state.json"), "{message}");
    std::fs::remove_file(&state).unwrap();
    let message = prime_learner::checkpoint::load_state(dir.path())
        .unwrap_err()
        .to_string();
    assert!(message.contains("trainer_state.json"), "{message}");

    // An optimizer file cut short, or holding garbage.
    let lm = tiny_model_dir(&dir.path().join("model"));
    let mut adamw = prime_learner::AdamW::new(
        prime_learner::models::trainable_parameters(&lm),
        prime_learner::AdamWConfig::default(),
    );
    let path = dir.path().join("optimizer.safetensors");
    prime_learner::checkpoint::save_optimizer(&path, &adamw).unwrap();
    prime_learner::checkpoint::load_optimizer(&path, &mut adamw).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for damaged in [
        bytes[..bytes.len() - 7].to_vec(),
        b"garbage".to_vec(),
        Vec::new(),
    ] {
        std::fs::write(&path, damaged).unwrap();
        let result = no_panic("load_optimizer", || {
            prime_learner::checkpoint::load_optimizer(&path, &mut adamw)
        });
        let message = result.unwrap_err().to_string();
        assert!(message.contains("optimizer.safetensors"), "{message}");
    }
}
