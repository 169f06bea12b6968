//! The run's memory plan (`prime_learner::plan`): the resident state per ZeRO stage equals
//! docs/memory.md's hand counts, a plan that does not fit names changes that make it fit, and
//! the paper's run is planned as docs/running-the-paper.md shows.
use std::path::{Path, PathBuf};

use prime_learner::plan::{
    checked_learner_plan, learner_rank_plan, plan_run, Cluster, Shapes, Sharding,
};
use prime_learner::RunConfig;
use prime_model::memory::{RolePlan, GIB};
use prime_model::Qwen2Config;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The paper's run config with the SFT model's shape (configs/models/).
fn paper() -> (RunConfig, Shapes) {
    let config = RunConfig::from_file(&repo().join("configs/eurus-2-7b.toml")).unwrap();
    let model = repo().join("configs/models/eurus-2-7b-sft.config.json");
    let shapes = Shapes::for_plan(&config, Some(&model)).unwrap();
    (config, shapes)
}

const P7B: u64 = 7_615_616_512;

fn resident(plan: &RolePlan) -> u64 {
    plan.resident_bytes()
}

/// docs/memory.md, "7B on 8 x 80 GB": with f32 masters and a replicated bf16 reference,
/// 34 P unsharded, 13 P with ZeRO-1, 10 P with ZeRO-2 (f32 gradient shard); ZeRO-3 shards the
/// weights too (2 P of bf16 weights, 4 P of f32 gradients, 16 P of moments and f32 weights,
/// over W, and the reference's 2 P / W) and holds two gathered units (the LM head, V D, is
/// the largest).
#[test]
fn resident_state_per_zero_stage_is_the_hand_count() {
    let (config, shapes) = paper();
    assert_eq!(shapes.policy.num_parameters() as u64, P7B);
    let at = |sharding| {
        resident(&learner_rank_plan(
            &config.learner,
            &shapes,
            8,
            sharding,
            80 * GIB,
        ))
    };
    assert_eq!(at(Sharding::None), 34 * P7B);
    assert_eq!(at(Sharding::Zero1), 13 * P7B);
    assert_eq!(at(Sharding::Zero2), 10 * P7B);
    let head = 152_064 * 3584;
    assert_eq!(at(Sharding::Zero3), 38 * P7B / 8 + 2 * 2 * head);
    // 10 P is docs/memory.md's 70.9 GiB.
    assert_eq!(format!("{:.1}", (10 * P7B) as f64 / GIB as f64), "70.9");
}

#[test]
fn one_rank_shards_nothing() {
    let (config, _) = paper();
    assert!(config.learner.parallel.zero3);
    assert_eq!(Sharding::of(&config.learner, 1), Sharding::None);
    assert_eq!(Sharding::of(&config.learner, 8), Sharding::Zero3);
}

/// Qwen2.5-1.5B's shape (docs/memory.md's table).
fn qwen_1_5b() -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "tie_word_embeddings": true,
    }))
    .unwrap()
}

/// 1.5B with f32 masters on 4 ranks of 40 GiB, as configured by default (no sharding, no
/// recomputation, 16,384-token micro-batches): the plan does not fit and names memory keys;
/// a config with exactly those keys set fits.
#[test]
fn the_changes_a_plan_names_make_it_fit() {
    let shapes = Shapes {
        policy: qwen_1_5b(),
        prm: qwen_1_5b(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    // A small evaluation, so that the step is what decides.
    std::fs::write(
        &path,
        "[learner.memory]\nmaster_weights = true\nparam_dtype = \"bf16\"\n\
         [learner.eval]\nproblems = 8\n",
    )
    .unwrap();
    let config = RunConfig::from_file(&path).unwrap().learner;
    let device = 40 * GIB;
    let plan = checked_learner_plan(&config, &shapes, 4, device);
    assert!(!plan.fits(), "{}", plan.render());
    assert!(!plan.changes.is_empty());
    let overrides: Vec<String> = plan
        .changes
        .iter()
        .map(|change| {
            let (key, value) = change
                .split_once(" = ")
                .unwrap_or_else(|| panic!("not a key = value change: {change}"));
            assert!(key.starts_with("learner."), "{change}");
            format!("{key}={value}")
        })
        .collect();
    assert!(
        overrides.contains(&"learner.parallel.zero2=true".to_string()),
        "{overrides:?}"
    );
    let changed = RunConfig::from_file_with_overrides(&path, &overrides)
        .unwrap()
        .learner;
    changed.validate().unwrap();
    let after = checked_learner_plan(&changed, &shapes, 4, device);
    assert!(after.fits(), "{}", after.render());
    assert!(after.changes.is_empty());
}

/// The paper's run as configured (ZeRO-3, a 4 GiB evaluation KV cache) fits 8 learner ranks
/// of 79 GiB (an 80 GB card), and one node's 6; with ZeRO-2 instead the step does not fit 8
/// ranks, and the advice is ZeRO-3, after which the plan fits. The actor fits 32 prompts,
/// not 64; the PRM server fits.
#[test]
fn the_papers_run_on_three_nodes() {
    let (config, shapes) = paper();
    let cluster = Cluster {
        nodes: 3,
        gpus_per_node: 8,
        gpu_memory_gib: 79.0,
        actor_gpus: 16,
        actor_max_prompts: 32,
        prm_server_batch_tokens: 16384,
    };
    let plan = plan_run(&config.learner, &shapes, &cluster).unwrap();
    let text = plan.render();
    assert!(plan.fits(), "{text}");
    assert!(plan.zero3.is_none(), "the config is ZeRO-3 already");
    assert!(text.contains("W = 8, ZeRO-3,"), "{text}");
    let one_node = Cluster {
        nodes: 1,
        actor_gpus: 2,
        ..cluster
    };
    let plan = plan_run(&config.learner, &shapes, &one_node).unwrap();
    assert!(plan.fits(), "{}", plan.render());

    let mut zero2 = config.learner.clone();
    zero2.parallel.zero3 = false;
    zero2.parallel.zero2 = true;
    let plan = plan_run(&zero2, &shapes, &cluster).unwrap();
    let text = plan.render();
    assert!(!plan.learner.fits(), "{text}");
    assert_eq!(
        plan.learner.changes,
        ["learner.parallel.zero3 = true"],
        "{text}"
    );
    let zero3 = plan.zero3.as_ref().expect("a ZeRO-3 row");
    assert!(zero3.fits(), "{text}");
    let mut advised = zero2.clone();
    advised.parallel.zero3 = true;
    advised.validate().unwrap();
    assert!(checked_learner_plan(&advised, &shapes, 8, 79 * GIB).fits());

    let many = Cluster {
        actor_max_prompts: 64,
        ..cluster
    };
    let actor = plan_run(&config.learner, &shapes, &many).unwrap().actor;
    assert!(!actor.fits());
    assert!(
        actor.changes[0].starts_with("prime actor run --max-prompts 46 "),
        "{:?}",
        actor.changes
    );
}

/// What a learner rank on CUDA checks at start: ZeRO-3 on too few ranks does not fit, and the
/// plan says so with its numbers.
#[test]
fn zero3_on_too_few_ranks_does_not_fit() {
    let (config, shapes) = paper();
    let plan = checked_learner_plan(&config.learner, &shapes, 2, 79 * GIB);
    assert!(!plan.fits(), "{}", plan.render());
    let text = plan.render();
    assert!(text.contains("W = 2, ZeRO-3"), "{text}");
    assert!(text.contains("does not fit"), "{text}");
}

#[test]
fn a_cluster_needs_a_gpu_for_the_learner() {
    let (config, shapes) = paper();
    let cluster = Cluster {
        nodes: 1,
        gpus_per_node: 8,
        gpu_memory_gib: 79.0,
        actor_gpus: 8,
        actor_max_prompts: 8,
        prm_server_batch_tokens: 16384,
    };
    let error = plan_run(&config.learner, &shapes, &cluster).unwrap_err();
    assert!(
        error.to_string().contains("leave none of the 8 GPUs"),
        "{error}"
    );
}

#[test]
fn the_demo_fits_one_small_gpu() {
    let config = RunConfig::from_file(&repo().join("configs/demo.toml")).unwrap();
    let shapes = Shapes::for_plan(&config, None).unwrap();
    let plan = checked_learner_plan(&config.learner, &shapes, 1, 8 * GIB);
    assert!(plan.fits(), "{}", plan.render());
}
