//! Every shipped config parses (unknown keys are errors) and passes validation.
use std::path::Path;

use prime_algo::Estimator;
use prime_learner::RunConfig;

fn shipped() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("configs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_loads_and_validates() {
    let files = shipped();
    assert!(
        files.len() >= 2,
        "expected demo.toml and eurus-2-7b.toml, found {files:?}"
    );
    for file in files {
        let config =
            RunConfig::from_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        config
            .learner
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        config
            .sft
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

#[test]
fn the_paper_config_holds_the_papers_numbers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let config = RunConfig::from_file(&dir.join("eurus-2-7b.toml")).expect("eurus config");
    let l = &config.learner;
    assert_eq!(
        (
            l.rollout.batch_prompts,
            l.rollout.samples_per_prompt,
            l.steps
        ),
        (256, 4, 592)
    );
    assert_eq!(
        (l.data.max_prompt_tokens, l.rollout.max_response_tokens),
        (1024, 3072)
    );
    assert_eq!(l.algo.estimator, Estimator::Prime);
    assert_eq!(l.algo.prm.beta, 0.05);
    assert_eq!((l.algo.filter.lower, l.algo.filter.upper), (0.2, 0.8));
    assert_eq!((l.policy_optimizer.lr, l.prm_optimizer.lr), (5e-7, 1e-6));
    assert_eq!(l.policy_optimizer.adamw.weight_decay, 0.01);
    assert_eq!(l.prm_optimizer.adamw.weight_decay, 0.0);
    assert_eq!(
        (
            l.policy_optimizer.max_grad_norm,
            l.prm_optimizer.max_grad_norm
        ),
        (1.0, 10.0)
    );
    assert_eq!(l.algo.mini_batches, 4);
}

#[test]
fn overrides_and_partial_optimizer_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[learner.prm_optimizer]\nlr = 1e-4\n").unwrap();
    let config = RunConfig::from_file_with_overrides(
        &path,
        &[
            "learner.algo.estimator=rloo".into(),
            "learner.algo.prm.beta=0.5".into(),
        ],
    )
    .unwrap();
    assert_eq!(config.learner.algo.estimator, Estimator::Rloo);
    assert_eq!(config.learner.algo.prm.beta, 0.5);
    // A partial table keeps the PRM's own defaults for the rest (not the policy's).
    assert_eq!(config.learner.prm_optimizer.lr, 1e-4);
    assert_eq!(config.learner.prm_optimizer.max_grad_norm, 10.0);
    assert_eq!(config.learner.prm_optimizer.adamw.weight_decay, 0.0);
    assert_eq!(config.learner.policy_optimizer.adamw.weight_decay, 0.01);
    let bad = RunConfig::from_file_with_overrides(&path, &["learner.betta=1".into()]);
    assert!(bad.unwrap_err().to_string().contains("betta"));
    // Values out of range are refused at load, naming the file and the key.
    for (set, key) in [
        ("learner.rollout.samples_per_prompt=1", "samples_per_prompt"),
        ("learner.rollout.top_p=0", "learner.rollout.top_p"),
        (
            "learner.rollout.temperature=nan",
            "learner.rollout.temperature",
        ),
        ("learner.algo.prm.beta=nan", "learner.algo.prm.beta"),
        ("learner.prm_optimizer.lr=inf", "learner.prm_optimizer.lr"),
    ] {
        let message = RunConfig::from_file_with_overrides(&path, &[set.into()])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(key) && message.contains("c.toml"),
            "{set}: {message}"
        );
    }
}

#[test]
fn lengths_the_model_cannot_hold_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    // From scratch: the [model] shape decides.
    std::fs::write(
        &path,
        "[model]\nmax_position_embeddings = 256\n[learner.data]\nmax_prompt_tokens = 200\n\
         [learner.rollout]\nmax_response_tokens = 57\n",
    )
    .unwrap();
    let error = RunConfig::from_file(&path).unwrap_err().to_string();
    for part in [
        "learner.data.max_prompt_tokens (200)",
        "learner.rollout.max_response_tokens (57)",
        "= 257",
        "max_position_embeddings (256",
        "model.max_position_embeddings",
    ] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
    // Exactly the model's positions is fine; so is an override that brings the sum down.
    let fits = RunConfig::from_file_with_overrides(
        &path,
        &["learner.rollout.max_response_tokens=56".into()],
    )
    .unwrap();
    assert_eq!(fits.learner.rollout.max_response_tokens, 56);
    // The defaults (the paper's 1,024 + 3,072) fit the default model.
    std::fs::write(&path, "").unwrap();
    RunConfig::from_file(&path).unwrap();

    // A model directory: its config.json decides, and the message names the file.
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 2048}"#,
    )
    .unwrap();
    std::fs::write(
        &path,
        format!("[model]\npath = {:?}\n", model.display().to_string()),
    )
    .unwrap();
    let error = RunConfig::from_file(&path).unwrap_err().to_string();
    assert!(error.contains("= 4096"), "{error}");
    assert!(error.contains("max_position_embeddings (2048"), "{error}");
    assert!(error.contains("config.json"), "{error}");
    let fits = RunConfig::from_file_with_overrides(
        &path,
        &["learner.rollout.max_response_tokens=1024".into()],
    );
    assert!(fits.is_ok(), "{fits:?}");
}

#[test]
fn the_kv_cache_budget_is_optional_and_positive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "").unwrap();
    let unset = RunConfig::from_file(&path).unwrap();
    assert_eq!(unset.learner.memory.kv_cache_gib, None);
    // Unset, it stays out of the saved config.
    assert!(!toml::to_string(&unset).unwrap().contains("kv_cache_gib"));
    let set =
        RunConfig::from_file_with_overrides(&path, &["learner.memory.kv_cache_gib=12.5".into()])
            .unwrap();
    assert_eq!(set.learner.memory.kv_cache_gib, Some(12.5));
    set.learner.validate().unwrap();
    // Refused at load, naming the file and the key.
    for bad in ["0", "-1.5", "nan", "inf"] {
        let error = RunConfig::from_file_with_overrides(
            &path,
            &[format!("learner.memory.kv_cache_gib={bad}")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("learner.memory.kv_cache_gib") && error.contains("c.toml"),
            "{error}"
        );
    }
}
