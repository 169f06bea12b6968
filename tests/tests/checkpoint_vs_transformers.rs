//! A learner checkpoint as other tools see it: transformers loads its policy and PRM and scores
//! like our models, and PyTorch's safetensors reads both optimizer states.
use prime_learner::checkpoint::{
    save, CheckpointParts, RngState, TrainerState, POLICY_DIR, POLICY_OPTIMIZER_FILE, PRM_DIR,
    PRM_OPTIMIZER_FILE,
};
use prime_learner::models::trainable_parameters;
use prime_learner::sft::{response_nll, SftExample};
use prime_learner::{AdamW, AdamWConfig, ModelSource};
use prime_model::{sequence_logprobs, CausalLm};
use prime_tests::*;
use serde_json::Value;
use tch::{Device, Kind};

const VOCAB: i64 = 300;

fn trained_model(tied: bool, seed: i64) -> (CausalLm, AdamW) {
    let config = ModelSource {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 48,
        tie_word_embeddings: tied,
        ..ModelSource::default()
    }
    .qwen2_config(VOCAB, 1, 0);
    tch::manual_seed(seed);
    let lm = CausalLm::random(&config, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    let mut optimizer = AdamW::new(trainable_parameters(&lm), AdamWConfig::default());
    let sequences = random_sequences(3, 6, 12, VOCAB, seed as u64);
    let examples: Vec<SftExample> = sequences
        .iter()
        .map(|s| SftExample {
            prompt_ids: s[..3].to_vec(),
            response_ids: s[3..].to_vec(),
        })
        .collect();
    let batch: Vec<&SftExample> = examples.iter().collect();
    for _ in 0..2 {
        optimizer.zero_grad();
        response_nll(&lm, &batch).unwrap().backward();
        optimizer.step(1e-2);
    }
    (lm, optimizer)
}

/// Shape, dtype, sum and max |x| of every tensor of a safetensors file, read by PyTorch.
fn torch_summary(path: &std::path::Path) -> Value {
    let script = "import json,sys\n\
         from safetensors.torch import load_file\n\
         t=load_file(sys.argv[1])\n\
         print(json.dumps({k:{'shape':list(v.shape),'dtype':str(v.dtype),\
         'sum':v.double().sum().item(),'max':v.double().abs().max().item()}\
         for k,v in t.items()}))\n";
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(path)
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
fn checkpoint_loads_in_transformers_and_pytorch() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let (policy, policy_optimizer) = trained_model(false, 1);
    let (prm, prm_optimizer) = trained_model(true, 2);
    let state = TrainerState {
        step: 12,
        policy_version: 12,
        data_cursor: 40,
        data_epoch: 0,
        rng: RngState {
            seed: [3; 32],
            stream: 0,
            word_pos: 0,
        },
        surplus_prompts: vec![5, 6],
        extra: Value::Null,
    };
    let parts = CheckpointParts {
        policy: &policy,
        prm: &prm,
        policy_optimizer: &policy_optimizer,
        prm_optimizer: &prm_optimizer,
        tokenizer_dir: None,
        state: &state,
    };
    let dir = save(tmp.path(), &parts, 1).unwrap();

    let sequences = random_sequences(3, 4, 20, VOCAB, 9);
    for (sub, lm) in [(POLICY_DIR, &policy), (PRM_DIR, &prm)] {
        let reference = reference_logprobs(&dir.join(sub), &sequences, "float32");
        let ours = sequence_logprobs(&lm.model, &sequences, 4096).unwrap();
        for (row, (r, o)) in reference.iter().zip(&ours).enumerate() {
            let diff = max_abs_diff(r, o);
            assert!(diff < 1e-4, "{sub} row {row}: max |diff| {diff}");
        }
    }

    for (file, optimizer) in [
        (POLICY_OPTIMIZER_FILE, &policy_optimizer),
        (PRM_OPTIMIZER_FILE, &prm_optimizer),
    ] {
        let summary = torch_summary(&dir.join(file));
        let (moments, step) = optimizer.state();
        assert_eq!(summary["step"]["sum"], step as f64, "{file}");
        assert_eq!(summary["step"]["dtype"], "torch.int64", "{file}");
        assert_eq!(summary.as_object().unwrap().len(), moments.len() + 1);
        for (name, t) in &moments {
            let s = &summary[name.as_str()];
            assert_eq!(s["dtype"], "torch.float32", "{file} {name}");
            assert_eq!(
                s["shape"],
                serde_json::json!(t.size()),
                "{file} {name} shape"
            );
            let sum = t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
            let max = t.to_kind(Kind::Double).abs().max().double_value(&[]);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
            assert!(close(s["sum"].as_f64().unwrap(), sum), "{file} {name}: sum");
            assert!(close(s["max"].as_f64().unwrap(), max), "{file} {name}: max");
        }
    }
}
