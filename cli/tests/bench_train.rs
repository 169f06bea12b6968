//! `prime bench train` on a tiny config: two PRIME steps with one and with two actor processes
//! from a tiny start model. The report must agree with what the runs wrote: the steps it
//! counts are the `metrics.jsonl` step records, its wall time is the last record's clock,
//! throughput is steps over that time, the learner's split adds up to the wall time with no
//! part negative, and the actors' logs account for every group trained on.
use std::path::{Path, PathBuf};
use std::process::Command;

use prime_tests::{run_report, step_records, write_tiny_start_model};
use serde_json::Value;

const CONFIG: &str = r#"
[world]
seed = 5
sft = { size = 40 }
rl = { size = 80 }
heldout = { size = 6 }

[learner]
steps = 1000

[learner.algo]
mini_batches = 2
filter = { enabled = false }

[learner.rollout]
batch_prompts = 4
samples_per_prompt = 3
max_response_tokens = 24
lease_seconds = 30

[learner.eval]
every = 1
problems = 6
greedy = false

[learner.checkpoint]
every = 1
"#;

fn f(value: &Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {value}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// `prime bench train --steps 2 ARGS` on the tiny config from a tiny start model, in a fresh
/// directory (returned to keep it alive); the report, the printed table and the output dir.
fn bench_train(args: &[&str]) -> (tempfile::TempDir, Value, String, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = tmp.path().join("tiny.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let config = prime_learner::RunConfig::from_file(&config_path).unwrap();
    let warmup = tmp.path().join("warmup");
    write_tiny_start_model(&warmup, &config, 3);
    let (out, json) = (tmp.path().join("out"), tmp.path().join("report.json"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_prime"));
    command
        .args(["--threads", "1", "bench", "train", "--steps", "2"])
        .args(args)
        .arg("--config")
        .arg(&config_path)
        .arg("--warmup-dir")
        .arg(&warmup)
        .arg("--out-dir")
        .arg(&out);
    let (report, table) = run_report(command, &json);
    (tmp, report, table, out)
}

#[test]
fn bench_train_reports_what_the_runs_recorded() {
    let (_tmp, report, table, out) = bench_train(&["--actors", "1,2"]);
    assert_eq!(report["warmup_reused"], true);
    assert_eq!(report["batch_prompts"], 4);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, actors) in rows.iter().zip([1u64, 2]) {
        assert_eq!(row["actors"], actors);
        let run_dir = Path::new(row["run_dir"].as_str().unwrap());
        assert_eq!(run_dir, out.join(format!("actors-{actors}")));
        assert_eq!(
            (row["estimator"].as_str(), row["staleness"].as_u64()),
            (Some("prime"), Some(0))
        );
        assert!(
            table.contains(&format!("\n| prime | 0 | 0 | {actors} |")),
            "no row for {actors} actors in:\n{table}"
        );

        // Evaluation and checkpoints were off between the steps: the run is evaluated before
        // the first step and after the last, and checkpointed after the last.
        let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        let evals: Vec<Value> = metrics
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["kind"] == "eval")
            .collect();
        let eval_steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
        assert_eq!(eval_steps, [0, 2]);
        let checkpoints: Vec<_> = std::fs::read_dir(run_dir.join("checkpoints"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .collect();
        assert_eq!(checkpoints.len(), 1);

        // Steps and wall time are the run's own records; the window opens when the start
        // evaluation ends.
        let records = step_records(run_dir);
        assert_eq!(records.len(), 2, "the benchmark asks for 2 steps");
        assert_eq!(row["steps"], 2);
        let start = f(&evals[0], "timing_s/eval_wall") + f(&evals[0], "timing_s/eval");
        assert!(close(f(row, "start_seconds"), start));
        let wall = f(row, "wall_seconds");
        assert!(close(wall, f(&records[1], "timing_s/wall") - start));
        assert!(f(row, "process_seconds") > wall);
        assert!(close(f(row, "steps_per_hour"), 2.0 * 3600.0 / wall));
        let second_step = f(&records[1], "timing_s/wall") - f(&records[0], "timing_s/wall");
        assert!(close(f(row, "steady_steps_per_hour"), 3600.0 / second_step));
        let groups_seen: f64 = records.iter().map(|r| f(r, "batch/groups_seen")).sum();
        assert!(groups_seen >= 8.0, "two batches of 4 groups");
        assert!(close(f(row, "groups_per_second"), groups_seen / wall));

        // The learner's split: its measured parts fit in the wall time and the parts add up.
        let l = &row["learner"];
        let measured = f(l, "rollout_wait") + f(l, "prm_update") + f(l, "policy_update");
        assert!(measured > 0.0 && measured <= wall, "{l} against {wall}");
        for part in ["step_untimed", "between_steps", "other"] {
            assert!(f(l, part) >= 0.0, "{part} < 0: {l}");
        }
        assert!(close(
            f(l, "other"),
            f(l, "step_untimed") + f(l, "between_steps")
        ));
        assert!(close(measured + f(l, "other"), wall));
        assert_eq!(f(l, "evaluation"), 0.0);
        let rollout: f64 = records.iter().map(|r| f(r, "timing_s/gen")).sum();
        let prm: f64 = records
            .iter()
            .map(|r| f(r, "timing_s/update_prm") + f(r, "timing_s/ref"))
            .sum();
        assert!(close(f(l, "rollout_wait"), rollout));
        assert!(close(f(l, "prm_update"), prm));
        let train: f64 = records.iter().map(|r| f(r, "timing_s/step")).sum();
        assert!(close(f(row, "learner_step_seconds"), train / 2.0));
        // The accuracy at equal steps is the evaluation after the last step.
        assert_eq!(row["final_accuracy"], evals[1]["val/accuracy"]);
        assert_eq!(row["final_problems"], evals[1]["val/problems"]);

        // The actors' logs account for every group trained on, and their timed parts for
        // the tokens they sampled.
        let a = &row["actor"];
        assert!(
            a["batches"].as_u64().unwrap() >= 2,
            "one batch per step at least"
        );
        assert!(a["groups_accepted"].as_u64().unwrap() >= 8);
        assert!(f(a, "sampling") > 0.0 && f(a, "grading") > 0.0 && f(a, "weights") > 0.0);
        assert!(a["tokens"].as_u64().unwrap() > 0);
        assert!(close(
            f(row, "sampled_tokens_per_second"),
            f(a, "tokens") / wall
        ));
    }
    assert_eq!(rows[0]["speedup"], 1.0);
    assert!(close(
        f(&rows[1], "speedup"),
        f(&rows[1], "steps_per_hour") / f(&rows[0], "steps_per_hour")
    ));
}

/// Two estimators under a staleness bound: one run each, labelled by the resolved config,
/// and PRIME's learner seconds per step over RLOO's reported from the runs' own records.
#[test]
fn bench_train_compares_estimators() {
    let (_tmp, report, table, out) = bench_train(&[
        "--actors",
        "1",
        "--estimator",
        "rloo,prime",
        "--staleness",
        "1",
        "--seeds",
        "7",
    ]);
    let rows = report["rows"].as_array().unwrap();
    let labels: Vec<(&str, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["estimator"].as_str().unwrap(),
                r["staleness"].as_u64().unwrap(),
                r["seed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(labels, [("rloo", 1, 7), ("prime", 1, 7)]);
    let mut step_seconds = Vec::new();
    for (row, name) in rows.iter().zip(["rloo", "prime"]) {
        let run_dir = Path::new(row["run_dir"].as_str().unwrap());
        assert_eq!(
            run_dir,
            out.join(format!("{name}-actors-1-staleness-1-seed-7"))
        );
        let records = step_records(run_dir);
        assert_eq!(records.len(), 2);
        let train: f64 = records.iter().map(|r| f(r, "timing_s/step")).sum::<f64>() / 2.0;
        assert!(close(f(row, "learner_step_seconds"), train));
        step_seconds.push(train);
        // RLOO does not train the PRM; PRIME does.
        let prm_loss: f64 = records.iter().map(|r| f(r, "prm/loss").abs()).sum();
        assert_eq!(
            prm_loss > 0.0,
            name == "prime",
            "{name}: PRM loss {prm_loss}"
        );
    }
    let ratios = report["ratios"].as_array().unwrap();
    let learner = ratios
        .iter()
        .find(|r| r["what"] == "prime / rloo learner s/step, 1 actor(s), staleness 1")
        .unwrap_or_else(|| panic!("no learner ratio in {ratios:?}"));
    assert!(close(
        f(learner, "value"),
        step_seconds[1] / step_seconds[0]
    ));
    assert!(
        table.contains("prime / rloo learner s/step, 1 actor(s), staleness 1: "),
        "{table}"
    );
}
