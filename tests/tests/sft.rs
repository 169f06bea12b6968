//! The supervised warm-up on a small world: the loss falls, the stop rule acts on held-out
//! accuracy, and the checkpoint it writes loads in transformers with the same log-probs.
use prime_learner::data::eval_problems;
use prime_learner::sft::{run_sft, sft_examples, SftStop};
use prime_learner::{ModelSource, SftConfig};
use prime_model::{sequence_logprobs, CausalLm, Tokenizer};
use prime_tests::*;
use tch::{Device, Kind};

#[test]
fn warmup_learns_stops_on_accuracy_and_saves_an_hf_checkpoint() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let mut world_config = prime_world::WorldConfig::default();
    world_config.sft.size = 2000;
    world_config.rl.size = 10;
    world_config.heldout.size = 40;
    let world = prime_world::build_world(&world_config, &tmp.path().join("world")).unwrap();
    let tokenizer = Tokenizer::from_dir(&world.tokenizer_dir).unwrap();
    let eos = tokenizer.token_id("<|im_end|>").unwrap();
    let source = ModelSource {
        hidden_size: 64,
        num_hidden_layers: 2,
        intermediate_size: 128,
        ..ModelSource::default()
    };
    let config = source.qwen2_config(tokenizer.vocab_size() as i64, eos, 0);
    tch::manual_seed(0);
    let mut lm = CausalLm::random(&config, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    lm.generation_config.eos_token_id = Some(prime_model::config::TokenIds::One(eos));
    let examples = sft_examples(
        &prime_world::read_rows(&world.sft.jsonl).unwrap(),
        &tokenizer,
        eos,
    )
    .unwrap();
    let heldout = eval_problems(
        &prime_world::read_rows(&world.heldout.parquet).unwrap(),
        &tokenizer,
    )
    .unwrap();
    // A band that starts at 0 is entered at the first evaluation: the rule must stop there.
    let sft = SftConfig {
        batch_size: 16,
        warmup_steps: 5,
        eval_every: 40,
        eval_problems: 20,
        max_new_tokens: 60,
        accuracy_band: [0.0, 1.0],
        ..SftConfig::default()
    };
    let out = tmp.path().join("sft");
    let result = run_sft(
        &lm,
        &tokenizer,
        &world.tokenizer_dir,
        &examples,
        &heldout,
        &sft,
        &out,
    )
    .unwrap();
    assert_eq!(result.steps, 40);
    assert_eq!(result.stop, SftStop::InBand);
    assert_eq!(result.eval_problems, 20);

    let records = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(records.len(), 40);
    let loss = |i: usize| records[i]["loss"].as_f64().unwrap();
    let early = (0..5).map(loss).sum::<f64>() / 5.0;
    let late = (35..40).map(loss).sum::<f64>() / 5.0;
    assert!(late < 0.7 * early, "loss did not fall: {early} -> {late}");
    assert!(records[39]["heldout_accuracy"].is_number());
    for plot in ["loss.png", "accuracy.png", "result.json"] {
        assert!(
            out.join(plot).metadata().unwrap().len() > 0,
            "{plot} missing"
        );
    }

    // An unreachable band runs to max_steps and says so.
    let never = SftConfig {
        max_steps: 2,
        eval_every: 1,
        eval_problems: 4,
        max_new_tokens: 8,
        accuracy_band: [1.0, 1.0],
        ..sft.clone()
    };
    let result = run_sft(
        &lm,
        &tokenizer,
        &world.tokenizer_dir,
        &examples,
        &heldout,
        &never,
        &tmp.path().join("never"),
    )
    .unwrap();
    assert_eq!((result.steps, result.stop), (2, SftStop::MaxSteps));

    // The checkpoint loads in transformers and scores like our model.
    let checkpoint = out.join("checkpoint");
    let reloaded = CausalLm::load(&checkpoint, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    assert!(
        Tokenizer::from_dir(&checkpoint).is_ok(),
        "tokenizer files not copied"
    );
    let sequences: Vec<Vec<i64>> = examples[..3]
        .iter()
        .map(|e| [e.prompt_ids.clone(), e.response_ids.clone()].concat())
        .collect();
    let ours = sequence_logprobs(&reloaded.model, &sequences, 4096).unwrap();
    for (o, r) in ours
        .iter()
        .zip(reference_logprobs(&checkpoint, &sequences, "float32"))
    {
        assert!(max_abs_diff(o, &r) < 1e-4);
    }
}
