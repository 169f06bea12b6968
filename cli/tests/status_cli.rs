//! `prime status` run as a real process against a real verifier on a loopback port: it finds
//! the verifier (the learner API answers UNIMPLEMENTED first), prints the figures the
//! verifier's own Status RPC reports, sends the shared token, and fails clearly where nothing
//! listens.
use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::Duration;

use prime_proto::v1 as pb;
use prime_verifier::grade::{Grader, GraderConfig};

fn prime_status(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prime"))
        .arg("status")
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("PRIME_TOKEN")
        .output()
        .expect("prime runs")
}

/// The table's rows: label (words before two spaces) to value.
fn table(out: &Output) -> HashMap<String, String> {
    assert!(
        out.status.success(),
        "prime status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|line| {
            let (label, value) = line.split_once("  ").expect("two columns");
            (label.trim().to_string(), value.trim().to_string())
        })
        .collect()
}

fn item(id: &str, ability: pb::GradeAbility, response: &str, truth: &str) -> pb::GradeItem {
    pb::GradeItem {
        id: id.into(),
        ability: ability as i32,
        response: response.into(),
        ground_truth: truth.into(),
        ..Default::default()
    }
}

#[test]
fn status_of_a_verifier_with_and_without_the_token() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let grader = Grader::new(GraderConfig::default());
    runtime.spawn(prime_verifier::service::serve_on(
        listener,
        grader.clone(),
        Some("tok-tok-tok-tok-tok".into()),
        std::future::pending(),
    ));

    // Three items, one of them an error, through the service itself.
    runtime.block_on(async {
        let channel = prime_proto::client::lazy_channel(
            "verifier",
            &addr,
            Duration::from_secs(5),
            Some("tok-tok-tok-tok-tok"),
        )
        .unwrap();
        let mut client = prime_proto::client::verifier_client(channel);
        let items = vec![
            item("a", pb::GradeAbility::Math, "\\boxed{4}", "4"),
            item("b", pb::GradeAbility::Math, "\\boxed{3}", "4"),
            item("c", pb::GradeAbility::Unspecified, "x", "y"),
        ];
        let results = client
            .grade(pb::GradeRequest { items })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(results.len(), 3);
    });

    let rows = table(&prime_status(&[
        "--addr",
        &addr,
        "--token",
        "tok-tok-tok-tok-tok",
    ]));
    let expected = grader.status();
    assert_eq!(rows["role"], "verifier");
    assert_eq!(rows["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(rows["items graded"], "3");
    assert_eq!(rows["errors"], "1");
    assert_eq!(rows["timeouts"], "0");
    assert_eq!(rows["queue depth"], "0");
    assert_eq!(rows["in flight"], "0");
    assert_eq!(
        rows["max concurrency"],
        expected.max_concurrency.to_string()
    );
    assert_eq!(rows["sandbox"], expected.sandbox_backend);
    assert_eq!(
        rows["latency p99"],
        format!("{:.1} ms", expected.latency_p99_ms)
    );

    // --json: the same figures as typed JSON values, the verifier's own Status as reference.
    let out = prime_status(&["--addr", &addr, "--token", "tok-tok-tok-tok-tok", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = grader.status();
    assert_eq!(json["role"], "verifier");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["items_graded"], 3);
    assert_eq!(json["errors"], 1);
    assert_eq!(json["timeouts"], 0);
    assert_eq!(json["in_flight"], 0);
    assert_eq!(json["max_concurrency"], expected.max_concurrency);
    assert_eq!(json["sandbox_backend"], expected.sandbox_backend.as_str());
    assert_eq!(json["sandbox_cgroup"], expected.sandbox_cgroup);
    assert_eq!(json["latency_p99_ms"], expected.latency_p99_ms);

    // Without the token the verifier refuses; the error names the cause.
    let refused = prime_status(&["--addr", &addr]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
}

#[test]
fn status_where_nothing_listens_fails() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let out = prime_status(&["--addr", &addr, "--timeout-secs", "2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unavailable"), "{stderr}");
    // nothing listening is a peer that is down: retry later
    assert_eq!(out.status.code(), Some(75), "{stderr}");
}
