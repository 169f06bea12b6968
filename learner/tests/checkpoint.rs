//! Checkpoints: a save/load round trip resumes training bit for bit, the RNG continues its
//! sequence, and interrupted or stray writes never hide the last good checkpoint.
use std::path::{Path, PathBuf};

use prime_learner::checkpoint::{
    latest, load_optimizer, load_state, save, step_dir_name, CheckpointParts, RngState,
    TrainerState, LATEST_FILE, POLICY_DIR, POLICY_OPTIMIZER_FILE, PRM_DIR, PRM_OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
};
use prime_learner::models::trainable_parameters;
use prime_learner::sft::{response_nll, SftExample};
use prime_learner::{AdamW, AdamWConfig, ModelSource};
use prime_model::CausalLm;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind};

const VOCAB: i64 = 64;

fn tiny_model(tied: bool, seed: i64) -> CausalLm {
    let config = ModelSource {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 48,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        ..ModelSource::default()
    }
    .qwen2_config(VOCAB, 1, 0);
    tch::manual_seed(seed);
    CausalLm::random(&config, Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

fn adamw_config() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

fn optimizer(lm: &CausalLm) -> AdamW {
    AdamW::new(trainable_parameters(lm), adamw_config())
}

/// A few fixed prompt/response pairs drawn from `seed`.
fn examples(seed: u64) -> Vec<SftExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..3)
        .map(|_| SftExample {
            prompt_ids: (0..5).map(|_| rng.gen_range(2..VOCAB)).collect(),
            response_ids: (0..4).map(|_| rng.gen_range(2..VOCAB)).collect(),
        })
        .collect()
}

/// Supervised steps `steps` on `data`, with a learning rate that depends on the step so a
/// resumed run must know where it is.
fn train(lm: &CausalLm, optimizer: &mut AdamW, data: &[SftExample], steps: std::ops::Range<u64>) {
    let batch: Vec<&SftExample> = data.iter().collect();
    for step in steps {
        optimizer.zero_grad();
        response_nll(lm, &batch).unwrap().backward();
        optimizer.clip_grad_norm(1.0);
        optimizer.step(1e-2 / (step + 1) as f64);
    }
}

/// Whether every variable of `a` equals the one of `b` bit for bit.
fn same_weights(a: &CausalLm, b: &CausalLm) -> bool {
    let (a, b) = (a.vs.variables(), b.vs.variables());
    a.len() == b.len()
        && a.iter().all(|(name, t)| {
            b.get(name)
                .is_some_and(|u| t.kind() == u.kind() && t.equal(u))
        })
}

fn same_optimizer_state(a: &AdamW, b: &AdamW) -> bool {
    let ((a, a_step), (b, b_step)) = (a.state(), b.state());
    a_step == b_step
        && a.len() == b.len()
        && a.iter()
            .all(|(name, t)| b.get(name).is_some_and(|u| t.equal(u)))
}

fn trainer_state(step: u64, rng: &ChaCha8Rng) -> TrainerState {
    TrainerState {
        step,
        policy_version: step + 100,
        data_cursor: 7 * step,
        data_epoch: 2,
        rng: RngState::capture(rng),
        surplus_prompts: vec![42, 3, u64::MAX],
        extra: serde_json::json!({"metrics_lines": step}),
    }
}

/// A policy and a PRM with their optimizers, trained a few steps so the moments are non-zero.
struct Run {
    policy: CausalLm,
    prm: CausalLm,
    policy_optimizer: AdamW,
    prm_optimizer: AdamW,
}

impl Run {
    fn new() -> Self {
        tch::set_num_threads(1);
        let (policy, prm) = (tiny_model(false, 1), tiny_model(true, 2));
        let (mut policy_optimizer, mut prm_optimizer) = (optimizer(&policy), optimizer(&prm));
        train(&policy, &mut policy_optimizer, &examples(10), 0..3);
        train(&prm, &mut prm_optimizer, &examples(20), 0..2);
        Self {
            policy,
            prm,
            policy_optimizer,
            prm_optimizer,
        }
    }

    fn save(&self, root: &Path, state: &TrainerState, keep: usize) -> PathBuf {
        save(root, &self.parts(state, None), keep).unwrap()
    }

    fn parts<'a>(
        &'a self,
        state: &'a TrainerState,
        tokenizer_dir: Option<&'a Path>,
    ) -> CheckpointParts<'a> {
        CheckpointParts {
            policy: &self.policy,
            prm: &self.prm,
            policy_optimizer: &self.policy_optimizer,
            prm_optimizer: &self.prm_optimizer,
            tokenizer_dir,
            state,
        }
    }
}

fn entries(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn saved_step(dir: &Path) -> u64 {
    load_state(dir).unwrap().step
}

#[test]
fn round_trip_resumes_training_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("checkpoints");
    let tokenizer_dir = tmp.path().join("tokenizer");
    std::fs::create_dir(&tokenizer_dir).unwrap();
    std::fs::write(tokenizer_dir.join("tokenizer.json"), "{\"model\": 1}\n").unwrap();
    std::fs::write(tokenizer_dir.join("chat_template.jinja"), "{{ messages }}").unwrap();

    let run = Run::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let _ = rng.next_u32();
    let state = trainer_state(3, &rng);
    let dir = save(&root, &run.parts(&state, Some(&tokenizer_dir)), 2).unwrap();
    assert_eq!(dir, root.join("step-000003"));
    assert_eq!(latest(&root).unwrap(), Some(dir.clone()));
    assert_eq!(
        std::fs::read_to_string(root.join(LATEST_FILE)).unwrap(),
        "step-000003\n"
    );
    assert_eq!(entries(&root), ["latest", "step-000003"]);
    for sub in [POLICY_DIR, PRM_DIR] {
        for file in ["tokenizer.json", "chat_template.jinja"] {
            assert_eq!(
                std::fs::read(dir.join(sub).join(file)).unwrap(),
                std::fs::read(tokenizer_dir.join(file)).unwrap()
            );
        }
    }

    // Resume: everything from disk into fresh objects.
    let loaded = load_state(&dir).unwrap();
    assert_eq!(loaded, state);
    let load_model =
        |sub: &str| CausalLm::load(&dir.join(sub), Device::Cpu, Kind::Float, Kind::Float).unwrap();
    let (policy, prm) = (load_model(POLICY_DIR), load_model(PRM_DIR));
    let (mut policy_optimizer, mut prm_optimizer) = (optimizer(&policy), optimizer(&prm));
    load_optimizer(&dir.join(POLICY_OPTIMIZER_FILE), &mut policy_optimizer).unwrap();
    load_optimizer(&dir.join(PRM_OPTIMIZER_FILE), &mut prm_optimizer).unwrap();
    assert!(same_weights(&policy, &run.policy));
    assert!(same_weights(&prm, &run.prm));
    assert!(same_optimizer_state(
        &policy_optimizer,
        &run.policy_optimizer
    ));
    assert!(same_optimizer_state(&prm_optimizer, &run.prm_optimizer));
    assert_eq!(policy_optimizer.step_count(), 3);
    assert_eq!(prm_optimizer.step_count(), 2);

    // The same next step on the original and on the resumed run gives the same weights.
    let mut original = run;
    let before = load_model(POLICY_DIR);
    train(
        &original.policy,
        &mut original.policy_optimizer,
        &examples(10),
        3..5,
    );
    train(
        &original.prm,
        &mut original.prm_optimizer,
        &examples(20),
        2..4,
    );
    train(&policy, &mut policy_optimizer, &examples(10), 3..5);
    train(&prm, &mut prm_optimizer, &examples(20), 2..4);
    assert!(!same_weights(&policy, &before), "the steps changed nothing");
    assert!(same_weights(&policy, &original.policy));
    assert!(same_weights(&prm, &original.prm));

    // A resume that lost the optimizer state would have diverged: the test can tell.
    let fresh = load_model(POLICY_DIR);
    let mut fresh_optimizer = optimizer(&fresh);
    train(&fresh, &mut fresh_optimizer, &examples(10), 3..5);
    assert!(!same_weights(&fresh, &original.policy));
}

#[test]
fn optimizer_file_must_match_the_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new();
    let dir = run.save(
        tmp.path(),
        &trainer_state(1, &ChaCha8Rng::seed_from_u64(0)),
        0,
    );
    // The PRM is tied and the policy is not: the policy's state has an `lm_head` the PRM lacks.
    let mut prm_optimizer = optimizer(&run.prm);
    let err = load_optimizer(&dir.join(POLICY_OPTIMIZER_FILE), &mut prm_optimizer).unwrap_err();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
    // And the PRM's state lacks it for the policy.
    let mut policy_optimizer = optimizer(&run.policy);
    let err = load_optimizer(&dir.join(PRM_OPTIMIZER_FILE), &mut policy_optimizer).unwrap_err();
    assert!(err.to_string().contains("lacks lm_head.weight"), "{err}");
}

#[test]
fn rng_state_restores_the_same_sequence() {
    for (seed, stream, skip_words) in [(0u64, 0u64, 0usize), (9, 3, 5), (77, u64::MAX, 33)] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        // An odd number of words leaves the generator inside a u64 and inside a block.
        for _ in 0..skip_words {
            let _ = rng.next_u32();
        }
        let state = RngState::capture(&rng);
        let json = serde_json::to_value(state).unwrap();
        assert_eq!(json["seed"].as_str().unwrap().len(), 64);
        assert_eq!(json["word_pos"], skip_words.to_string());
        let back: RngState = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
        let mut restored = back.restore();
        let expected: Vec<u64> = (0..100).map(|_| rng.next_u64()).collect();
        let got: Vec<u64> = (0..100).map(|_| restored.next_u64()).collect();
        assert_eq!(got, expected);
    }

    // Far into a stream: the position needs more than 64 bits and survives JSON exactly.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    rng.set_word_pos((1u128 << 67) + 11);
    let json = serde_json::to_string(&RngState::capture(&rng)).unwrap();
    let mut restored = serde_json::from_str::<RngState>(&json).unwrap().restore();
    assert_eq!(restored.get_word_pos(), (1u128 << 67) + 11);
    assert_eq!(restored.next_u64(), rng.next_u64());

    let bad = r#"{"seed": "zz", "stream": 0, "word_pos": "0"}"#;
    assert!(serde_json::from_str::<RngState>(bad).is_err());
}

#[test]
fn latest_ignores_leftovers_and_a_dangling_pointer() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    assert_eq!(latest(&root.join("missing")).unwrap(), None);
    assert_eq!(latest(root).unwrap(), None);
    let run = Run::new();
    let rng = ChaCha8Rng::seed_from_u64(0);
    run.save(root, &trainer_state(1, &rng), 0);
    let second = run.save(root, &trainer_state(2, &rng), 0);

    // A half-written checkpoint of a later step.
    let leftover = root.join(".tmp-step-000003-999");
    std::fs::create_dir_all(leftover.join(POLICY_DIR)).unwrap();
    std::fs::write(leftover.join(POLICY_DIR).join("config.json"), "{").unwrap();
    assert_eq!(latest(root).unwrap(), Some(second.clone()));

    // A pointer to a checkpoint that is gone, then to one without its trainer state, then
    // to something that is not a checkpoint name at all.
    std::fs::write(root.join(LATEST_FILE), "step-000009\n").unwrap();
    assert_eq!(latest(root).unwrap(), Some(second.clone()));
    std::fs::remove_file(second.join(TRAINER_STATE_FILE)).unwrap();
    std::fs::write(root.join(LATEST_FILE), "step-000002\n").unwrap();
    assert_eq!(latest(root).unwrap(), Some(root.join("step-000001")));
    std::fs::write(root.join(LATEST_FILE), "../elsewhere\n").unwrap();
    assert_eq!(latest(root).unwrap(), Some(root.join("step-000001")));
    std::fs::remove_file(root.join(LATEST_FILE)).unwrap();
    assert_eq!(latest(root).unwrap(), Some(root.join("step-000001")));
    // Reading left everything in place.
    assert!(leftover.exists());
}

#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_as_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let run = Run::new();
    let rng = ChaCha8Rng::seed_from_u64(0);
    let first = run.save(root, &trainer_state(1, &rng), 0);

    // A crash mid-write: the temp directory holds some parts and was never renamed.
    let crashed = root.join(format!(".tmp-{}-12345", step_dir_name(2)));
    run.policy
        .save(
            &crashed.join(POLICY_DIR),
            None,
            prime_model::DEFAULT_MAX_SHARD_BYTES,
        )
        .unwrap();
    assert_eq!(latest(root).unwrap(), Some(first.clone()));
    assert_eq!(saved_step(&first), 1);

    // A save that fails half way (a tokenizer "file" that is a directory cannot be copied
    // after the policy weights are written) reports the error and changes nothing.
    let tokenizer_dir = tmp.path().join("bad-tokenizer");
    std::fs::create_dir_all(tokenizer_dir.join("tokenizer.json")).unwrap();
    let state = trainer_state(2, &rng);
    assert!(save(root, &run.parts(&state, Some(&tokenizer_dir)), 0).is_err());
    assert_eq!(latest(root).unwrap(), Some(first.clone()));
    assert_eq!(entries(root), ["bad-tokenizer", "latest", "step-000001"]);

    // The next good save cleans up and moves on.
    std::fs::create_dir_all(&crashed).unwrap();
    let second = run.save(root, &state, 0);
    assert_eq!(latest(root).unwrap(), Some(second));
    assert_eq!(
        entries(root),
        ["bad-tokenizer", "latest", "step-000001", "step-000002"]
    );
}

#[test]
fn resaving_a_step_replaces_it_even_across_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let run = Run::new();
    let rng = ChaCha8Rng::seed_from_u64(0);
    let mut state = trainer_state(4, &rng);
    let dir = run.save(root, &state, 1);
    state.policy_version = 7;
    assert_eq!(run.save(root, &state, 1), dir);
    assert_eq!(load_state(&dir).unwrap().policy_version, 7);
    assert_eq!(entries(root), ["latest", "step-000004"]);

    // A crash between the two renames of a re-save: only the moved-aside copy exists.
    let old = root.join(".old-step-000004");
    std::fs::rename(&dir, &old).unwrap();
    assert_eq!(latest(root).unwrap(), Some(old.clone()));
    assert_eq!(saved_step(&old), 4);
    // The next save puts it back before anything else, then prunes it by `keep`.
    run.save(root, &trainer_state(5, &rng), 2);
    assert_eq!(entries(root), ["latest", "step-000004", "step-000005"]);
    assert_eq!(load_state(&dir).unwrap().policy_version, 7);

    // A crash after the second rename: both copies exist and the new one wins.
    let five = root.join("step-000005");
    let mut replaced = trainer_state(5, &rng);
    replaced.policy_version = 1;
    run.save(root, &replaced, 0);
    copy_dir(&five, &root.join(".old-step-000005"));
    std::fs::write(
        root.join(".old-step-000005").join(TRAINER_STATE_FILE),
        serde_json::to_string(&trainer_state(5, &rng)).unwrap(),
    )
    .unwrap();
    run.save(root, &trainer_state(6, &rng), 2);
    assert_eq!(entries(root), ["latest", "step-000005", "step-000006"]);
    assert_eq!(load_state(&five).unwrap().policy_version, 1);
}

#[test]
fn keep_prunes_the_oldest_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let run = Run::new();
    let rng = ChaCha8Rng::seed_from_u64(0);
    for step in 1..=5 {
        run.save(root, &trainer_state(step, &rng), 2);
    }
    assert_eq!(entries(root), ["latest", "step-000004", "step-000005"]);
    assert_eq!(saved_step(&latest(root).unwrap().unwrap()), 5);

    // keep = 0 keeps everything.
    run.save(root, &trainer_state(6, &rng), 0);
    run.save(root, &trainer_state(7, &rng), 0);
    assert_eq!(
        entries(root),
        [
            "latest",
            "step-000004",
            "step-000005",
            "step-000006",
            "step-000007"
        ]
    );

    // Resumed from step 5 and saved step 6 again: that is the latest, the old step 7 stays,
    // and only earlier steps count against `keep`.
    let dir = run.save(root, &trainer_state(6, &rng), 2);
    assert_eq!(latest(root).unwrap(), Some(dir));
    assert_eq!(
        entries(root),
        ["latest", "step-000005", "step-000006", "step-000007"]
    );
}
