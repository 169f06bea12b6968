//! `prime grade`'s file tool, locally and through a loopback verifier: same scores, input
//! order, input fields kept, `score` and `reason` added; every line checked before anything is
//! graded or written, and an existing output replaced only by a complete one.

use prime_verifier::grade::{Grader, GraderConfig};
use prime_verifier::jsonl::{grade_file, GradeFileOptions};
use prime_verifier::service::serve_on;
use serde_json::Value;

const INPUT: &str = r#"{"id": 1, "ability": "math", "response": "thus \\boxed{\\dfrac{3}{4}}", "ground_truth": "0.75", "extra": "kept"}
{"id": "two", "ability": "code", "response": "```python\nprint(sum(map(int, input().split())))\n```", "ground_truth": "{\"inputs\": [\"1 2\\n\", \"5 5\\n\"], \"outputs\": [\"3\\n\", \"11\\n\"]}"}

{"id": 4, "ability": "MATH", "response": "The answer is 12346", "ground_truth": 12345}
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
    assert_eq!(ids, ["1", "\"two\"", "4"]);
    let scores: Vec<f64> = rows.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert_eq!(scores, [1.0, 0.5, 0.0]);
    assert_eq!(rows[0]["extra"], "kept");
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
    assert_eq!(summary.items, 3);
    check(&read_output(&local));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let grader = Grader::new(GraderConfig::default());
        tokio::spawn(serve_on(
            listener,
            grader,
            Some("t0k-t0k-t0k-t0k-t0k".into()),
            std::future::pending(),
        ));
        addr
    });
    let remote = dir.path().join("remote.jsonl");
    grade_file(&GradeFileOptions {
        input,
        output: remote.clone(),
        addr: Some(addr),
        token: Some("t0k-t0k-t0k-t0k-t0k".into()),
        grader: GraderConfig::default(),
    })
    .unwrap();
    check(&read_output(&remote));
}

fn options(input: &std::path::Path, output: &std::path::Path) -> GradeFileOptions {
    GradeFileOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        addr: None,
        token: None,
        grader: GraderConfig::default(),
    }
}

/// Rows that cannot be graded are errors naming the file and line, not scores of 0 that
/// lower the mean; the output that was there stays as it was.
#[test]
fn rows_that_cannot_be_graded_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let good = r#"{"id": 1, "ability": "math", "response": "\\boxed{2}", "ground_truth": "2"}"#;
    for (bad, expected) in [
        (
            r#"{"id": 2, "ability": "poetry", "response": "x", "ground_truth": "y"}"#,
            "unknown ability \"poetry\"",
        ),
        (
            r#"{"id": 2, "ability": "math", "response": "x"}"#,
            "missing \"ground_truth\"",
        ),
        (
            r#"{"id": 2, "ability": "math", "response": "x", "ground_truth": null}"#,
            "missing \"ground_truth\"",
        ),
        (
            r#"{"id": 2, "response": "x", "ground_truth": "1"}"#,
            "missing \"ability\"",
        ),
        (
            r#"{"id": 2, "ability": "math", "ground_truth": "1"}"#,
            "missing \"response\"",
        ),
        (
            r#"{"id": 2, "ability": "math", "response": ["x"], "ground_truth": "1"}"#,
            "\"response\" must be a string, got an array",
        ),
        (r#"[1, 2]"#, "not a JSON object"),
        (r#"{"id": 2, "ability": "#, "invalid JSON"),
    ] {
        std::fs::write(&input, format!("{good}\n\n{bad}\n")).unwrap();
        std::fs::write(&output, "earlier results\n").unwrap();
        let message = grade_file(&options(&input, &output))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("in.jsonl line 3") && message.contains(expected),
            "{bad}: {message}"
        );
        assert_eq!(
            std::fs::read_to_string(&output).unwrap(),
            "earlier results\n"
        );
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 2, "no temporary file is left behind");
}

#[test]
fn the_input_is_never_its_own_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("s.jsonl");
    let text = r#"{"id": 1, "ability": "math", "response": "\\boxed{2}", "ground_truth": "2"}"#;
    std::fs::write(&input, text).unwrap();
    let dotted = dir.path().join(".").join("s.jsonl");
    let message = grade_file(&options(&input, &dotted))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("--output must be another file than --input"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&input).unwrap(), text);
    // An output in a directory that does not exist is named as such.
    let missing = dir.path().join("nowhere").join("out.jsonl");
    let message = grade_file(&options(&input, &missing))
        .unwrap_err()
        .to_string();
    assert!(message.contains("nowhere/out.jsonl"), "{message}");
    assert!(!message.contains("s.jsonl"), "{message}");
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
