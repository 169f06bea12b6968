//! Checkpoint and resume are exact: on CPU, 4 steps in one go and 2 steps + resume + 2 steps
//! give bit-identical weights, optimizer states and metrics. The run samples its own rollouts
//! (seeded), filters, and carries surplus prompts across steps, so the data cursor, the
//! surplus queue and the RNG all have to come back right.
use std::path::Path;

use prime_learner::checkpoint;
use prime_learner::run::{open_run, run_local};
use prime_learner::trainer::{Record, Trainer};
use prime_learner::RunConfig;
use prime_tests::write_tiny_start_model;
use tch::{Device, Tensor};

fn config() -> RunConfig {
    let mut config: RunConfig = toml::from_str(
        r#"
        [world]
        seed = 3
        sft = { size = 50 }
        rl = { size = 60 }
        heldout = { size = 8 }

        [learner]
        steps = 4
        seed = 5

        [learner.algo]
        mini_batches = 2

        [learner.rollout]
        batch_prompts = 4
        samples_per_prompt = 3
        oversample = 1.5
        max_response_tokens = 12

        [learner.eval]
        every = 2
        problems = 8

        [learner.checkpoint]
        every = 2
        keep = 3

        [learner.memory]
        micro_batch_tokens = 300

        [learner.policy_optimizer]
        lr = 1e-3
        [learner.prm_optimizer]
        lr = 1e-3
        "#,
    )
    .expect("config");
    // A random model never answers right: without a filter every group is trained on, with
    // the PRM's process rewards as the only signal.
    config.learner.algo.filter.enabled = false;
    config.learner.algo.prm.beta = 0.5;
    config
}

fn train(run_dir: &Path, resume: bool, steps: Option<u64>) -> Trainer {
    let config = config();
    let (mut trainer, mut scheduler) =
        open_run(&config, run_dir, Device::Cpu, resume).expect("open run");
    run_local(&mut trainer, &mut scheduler, steps, |_, _| {}).expect("train");
    trainer
}

fn tensors(trainer: &Trainer) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (prefix, lm) in [
        ("policy", &trainer.models.policy),
        ("prm", &trainer.models.prm),
    ] {
        for (name, t) in lm.vs.variables() {
            out.push((format!("{prefix}.{name}"), t));
        }
    }
    for (prefix, optimizer) in [
        ("policy_optimizer", &trainer.models.policy_optimizer),
        ("prm_optimizer", &trainer.models.prm_optimizer),
    ] {
        let (state, step) = optimizer.state();
        out.push((format!("{prefix}.step"), Tensor::from(step)));
        for (name, t) in state {
            out.push((format!("{prefix}.{name}"), t));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Records without their timings, which legitimately differ, as read back from JSON (the
/// resumed run's early records come from `metrics.jsonl`).
fn comparable(records: &[Record]) -> Vec<serde_json::Value> {
    records
        .iter()
        .map(|r| {
            let mut v: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
            let object = v.as_object_mut().unwrap();
            // Clocks differ between the runs: every `timing_s/*` key and the throughput.
            object.retain(|k, _| !k.starts_with("timing_s/") && k != "perf/throughput");
            v
        })
        .collect()
}

#[test]
fn two_steps_resume_two_steps_equals_four_steps() {
    tch::set_num_threads(1);
    let root = tempfile::tempdir().unwrap();
    let (straight, split) = (root.path().join("straight"), root.path().join("split"));
    let config = config();
    write_tiny_start_model(&straight, &config, 11);
    write_tiny_start_model(&split, &config, 11);

    let whole = train(&straight, false, None);
    assert_eq!(whole.step, 4);

    let first = train(&split, false, Some(2));
    assert_eq!(first.step, 2);
    let start = tensors(&first);
    drop(first);
    // A crash mid-write leaves a temp dir behind; the resume must ignore it.
    std::fs::create_dir_all(split.join("checkpoints/.tmp-step-000003-crash/policy")).unwrap();
    let resumed = train(&split, true, None);
    assert_eq!(resumed.step, 4);

    let (a, b) = (tensors(&whole), tensors(&resumed));
    assert_eq!(a.len(), b.len());
    let mut moved = false;
    for (((name, x), (other, y)), (_, s)) in a.iter().zip(&b).zip(&start) {
        assert_eq!(name, other);
        assert!(x.equal(y), "{name} differs after resume");
        moved |= !x.equal(s);
    }
    assert!(
        moved,
        "steps 3-4 changed nothing: the comparison would be vacuous"
    );
    assert_eq!(comparable(&whole.history), comparable(&resumed.history));
    let surplus: u64 = whole
        .history
        .iter()
        .filter_map(|r| match r {
            Record::Step(s) => Some(s.groups_seen - s.metrics.groups as u64),
            Record::Eval { .. } => None,
        })
        .sum();
    assert!(
        surplus > 0,
        "no surplus groups: the surplus queue was not exercised"
    );
    assert!(checkpoint::latest(&split.join("checkpoints"))
        .unwrap()
        .is_some());
}
