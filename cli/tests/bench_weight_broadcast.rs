//! `prime bench weight-broadcast` on a tiny model with one and two actors. The report must
//! agree with what the learner sent: every gRPC round N copies of the encoded model, every
//! broadcast round one copy (the broadcaster's own count), each copy exactly the size of the
//! model's f32 parameters; every round after the first in the group the first one formed.
use std::process::Command;

use prime_tests::run_report;
use serde_json::Value;

/// f32 bytes of an untied Qwen2 (q/k/v biases, no o/MLP biases, two norms per layer and a
/// final one), counted from the shape alone.
fn qwen2_f32_bytes(
    vocab: u64,
    hidden: u64,
    layers: u64,
    intermediate: u64,
    heads: u64,
    kv_heads: u64,
) -> u64 {
    let kv = hidden / heads * kv_heads;
    let attention = (hidden * hidden + hidden) + 2 * (kv * hidden + kv) + hidden * hidden;
    let mlp = 3 * hidden * intermediate;
    let layer = attention + mlp + 2 * hidden;
    4 * (2 * vocab * hidden + hidden + layers * layer)
}

fn seconds(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

#[test]
fn bench_weight_broadcast_counts_one_copy_per_round_against_n() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("report.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_prime"));
    command.args([
        "--threads",
        "1",
        "bench",
        "weight-broadcast",
        "--vocab",
        "512",
        "--hidden",
        "64",
        "--layers",
        "2",
        "--intermediate",
        "128",
        "--members",
        "1,2",
        "--repeats",
        "1",
    ]);
    let (report, table) = run_report(command, &json);

    // The benchmark's model keeps the default 8 heads / 2 kv heads.
    let size = qwen2_f32_bytes(512, 64, 2, 128, 8, 2);
    assert_eq!(report["bytes"], size);
    assert_eq!(report["settings"]["repeats"], 1);
    assert!(report["cores"].as_u64().unwrap() >= 1);
    assert!(report["cpu"].is_string());
    assert!(seconds(&report["encode_seconds"]) > 0.0);

    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, members) in rows.iter().zip([1u64, 2]) {
        assert_eq!(row["members"], members);
        assert!(
            table.contains(&format!("\n| {members} |")),
            "no row for {members} actors in:\n{table}"
        );
        // The first round and one timed round of each path.
        let grpc_sent: Vec<u64> = serde_json::from_value(row["grpc_bytes_sent"].clone()).unwrap();
        let broadcast_sent: Vec<u64> =
            serde_json::from_value(row["broadcast_bytes_sent"].clone()).unwrap();
        assert_eq!(grpc_sent, vec![members * size; 2], "{row}");
        assert_eq!(broadcast_sent, vec![size; 2], "{row}");
        // The second round kept the group the first formed.
        assert_eq!(row["groups"], 1, "{row}");

        for path in ["grpc", "broadcast"] {
            let all = row[path]["seconds_all"].as_array().unwrap();
            assert_eq!(all.len(), 1, "{row}");
            assert_eq!(row[path]["seconds"], all[0]);
            let per_actor = size as f64 / seconds(&row[path]["seconds"]) / 1e9;
            let reported = seconds(&row[format!("{path}_gb_per_s").as_str()]);
            assert!((reported - per_actor).abs() <= 1e-9 * per_actor, "{row}");
        }
        let speedup = seconds(&row["grpc"]["seconds"]) / seconds(&row["broadcast"]["seconds"]);
        assert!(
            (seconds(&row["speedup"]) - speedup).abs() <= 1e-9 * speedup,
            "{row}"
        );
        assert!(seconds(&row["group_formation_seconds"]) > 0.0);
        assert!(seconds(&row["grpc_first_seconds"]) > 0.0);
    }
}
