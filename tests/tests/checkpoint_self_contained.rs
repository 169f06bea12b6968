//! A learner checkpoint's policy and PRM directories are whole Hugging Face model directories:
//! transformers loads the tokenizer (with the chat template), the model and the generation
//! config from each with no extra argument, and they agree with ours.
use prime_learner::run::{open_run, run_local};
use prime_learner::RunConfig;
use prime_model::{CausalLm, ChatMessage, Tokenizer};
use prime_tests::{init_threads, qwen2_ref, write_tiny_start_model};
use tch::{Device, Kind};

fn config() -> RunConfig {
    toml::from_str(
        r#"
        [world]
        seed = 3
        sft = { size = 20 }
        rl = { size = 20 }
        heldout = { size = 4 }

        [learner]
        steps = 1

        [learner.algo]
        mini_batches = 1
        filter = { enabled = false }

        [learner.rollout]
        batch_prompts = 2
        samples_per_prompt = 2
        max_response_tokens = 8

        [learner.eval]
        problems = 4
        greedy = false

        [learner.checkpoint]
        every = 1
        "#,
    )
    .expect("config")
}

#[test]
fn checkpoint_directories_load_in_transformers_as_they_are() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path();
    let config = config();
    write_tiny_start_model(run_dir, &config, 11);
    let (mut trainer, mut scheduler) = open_run(&config, run_dir, Device::Cpu, false).unwrap();
    run_local(&mut trainer, &mut scheduler, None, |_, _| {}).unwrap();
    let step = prime_learner::checkpoint::latest(&run_dir.join("checkpoints"))
        .unwrap()
        .expect("a checkpoint");
    let messages = [
        ChatMessage {
            role: "system".into(),
            content: "Think step by step.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is 12 + 30?".into(),
        },
    ];
    let json = serde_json::to_string(
        &messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for name in ["policy", "prm"] {
        let dir = step.join(name);
        for file in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(dir.join(file).exists(), "{name}/{file} missing");
        }
        let loaded = qwen2_ref(&[
            "load-dir",
            "--dir",
            dir.to_str().unwrap(),
            "--messages",
            &json,
        ]);
        let ours = Tokenizer::from_dir(&dir).unwrap();
        let chat: Vec<i64> = serde_json::from_value(loaded["chat_ids"].clone()).unwrap();
        assert_eq!(
            chat,
            ours.encode_chat(&messages, true).unwrap(),
            "{name}: chat template"
        );
        let lm = CausalLm::load(&dir, Device::Cpu, Kind::Float, Kind::Float).unwrap();
        let mut theirs: Vec<i64> =
            serde_json::from_value(loaded["generation_eos"].clone()).unwrap();
        let config_eos: Vec<i64> = serde_json::from_value(loaded["config_eos"].clone()).unwrap();
        for id in config_eos {
            if !theirs.contains(&id) {
                theirs.push(id);
            }
        }
        assert!(!theirs.is_empty(), "{name}: no stop token");
        assert_eq!(theirs, lm.eos_token_ids(), "{name}: stop tokens");
        assert_eq!(
            loaded["parameters"].as_i64().unwrap(),
            lm.config.num_parameters(),
            "{name}: parameters"
        );
    }
}
