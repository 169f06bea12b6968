//! `prime grade`'s file tool, locally and through a loopback verifier: same scores, input
//! order, input fields kept, `score` and `reason` added.

use prime_verifier::grade::{Grader, GraderConfig};
use prime_verifier::jsonl::{grade_file, GradeFileOptions};
use prime_verifier::service::serve_on;
use serde_json::Value;

const INPUT: &str = r#"{"id": 1, "ability": "math", "response": "thus \\boxed{\\dfrac{3}{4}}", "ground_truth": "0.75", "extra": "kept"}
{"id": "two", "ability": "code", "response": "```python\nprint(sum(map(int, input().split())))\n```", "ground_truth": "{\"inputs\": [\"1 2\\n\", \"5 5\\n\"], \"outputs\": [\"3\\n\", \"11\\n\"]}"}

{"id": 3, "ability": "poetry", "response": "x", "ground_truth": "y"}
{"id": 4, "ability": "MATH", "response": "The answer is 12346", "ground_truth": "12345"}
"#;

fn read_output(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check(rows: &[Value]) {
    let ids: Vec<String> = rows.iter().map(|r| r["id"].to_string()).collect();
    assert_eq!(ids, ["1", "\"two\"", "3", "4"]);
    let scores: Vec<f64> = rows.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert_eq!(scores, [1.0, 0.5, 0.0, 0.0]);
    assert_eq!(rows[0]["extra"], "kept");
    assert!(rows[2]["reason"].as_str().unwrap().contains("ability"));
}

#[test]
fn grades_locally_and_remotely_alike() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, INPUT).unwrap();
    let local = dir.path().join("local.jsonl");
    let summary = grade_file(&GradeFileOptions {
        input: input.clone(),
        output: local.clone(),
        addr: None,
        token: None,
        grader: GraderConfig::default(),
    })
    .unwrap();
    assert_eq!(summary.items, 4);
    check(&read_output(&local));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let grader = Grader::new(GraderConfig::default());
        tokio::spawn(serve_on(
            listener,
            grader,
            Some("t0k".into()),
            std::future::pending(),
        ));
        addr
    });
    let remote = dir.path().join("remote.jsonl");
    grade_file(&GradeFileOptions {
        input,
        output: remote.clone(),
        addr: Some(addr),
        token: Some("t0k".into()),
        grader: GraderConfig::default(),
    })
    .unwrap();
    check(&read_output(&remote));
}

#[test]
fn malformed_line_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"id\": 1}\nnot json\n").unwrap();
    let err = grade_file(&GradeFileOptions {
        input,
        output: dir.path().join("out.jsonl"),
        addr: None,
        token: None,
        grader: GraderConfig::default(),
    })
    .unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}
