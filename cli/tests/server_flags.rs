//! The server flags every server subcommand shares (`--token`/`PRIME_TOKEN`,
//! `--allow-no-token`, `--tls-*`), seen through `prime verifier serve` run as a real process:
//! an open non-loopback address is refused, a token from the environment or explicit consent
//! gets past that check, and the TLS files are then read.
use std::process::{Command, Output};

fn verifier_serve(args: &[&str], token: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prime"));
    command
        .args(["verifier", "serve", "--listen", "0.0.0.0:0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("PRIME_TOKEN")
        .env_remove("PRIME_TLS_CERT")
        .env_remove("PRIME_TLS_KEY")
        .env_remove("PRIME_TLS_CLIENT_CA");
    if let Some(token) = token {
        command.env("PRIME_TOKEN", token);
    }
    command.output().expect("prime runs")
}

fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "the server was expected to refuse");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_open_address_needs_a_token_or_consent_before_tls_is_read() {
    let stderr = failure(&verifier_serve(&[], None));
    assert!(stderr.contains("refusing to serve on 0.0.0.0"), "{stderr}");

    // Past the check, the (missing) TLS files are what stops the server: proof that the token
    // from PRIME_TOKEN, or --allow-no-token, was taken and the TLS flags reached the server.
    let tls = [
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ];
    for (extra, token) in [
        (&[][..], Some("s3cret-s3cret-s3cret")),
        (&["--allow-no-token"][..], None),
    ] {
        let args: Vec<&str> = tls.iter().chain(extra).copied().collect();
        let stderr = failure(&verifier_serve(&args, token));
        assert!(
            stderr.contains("cannot read certificate /nonexistent/cert.pem"),
            "{stderr}"
        );
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}

/// `prime` run with `args`, no token or TLS from the environment.
fn prime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("PRIME_TOKEN")
        .env_remove("PRIME_LEARNER")
        .env_remove("PRIME_VERIFIER")
        .output()
        .expect("prime runs")
}

/// The exit status classes of docs/reliability.md, as a supervisor sees them from the service
/// roles: a bad config, flag or listen policy is 2 (do not restart), a peer that is down at
/// start is 75 (restart later).
#[test]
fn exit_statuses_tell_bad_input_from_a_peer_that_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let code = |out: &Output| {
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // bad input: an unknown config key, a flag clap refuses, an open address with no token
    std::fs::write(dir.path().join("bad.toml"), "[learner]\nstepz = 3\n").unwrap();
    let (status, stderr) = code(&prime(&[
        "learner",
        "serve",
        "--config",
        &format!("{d}/bad.toml"),
    ]));
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("stepz"), "{stderr}");
    let (status, stderr) = code(&prime(&["actor", "run", "--max-prompts", "0"]));
    assert_eq!(status, Some(2), "{stderr}");
    let (status, stderr) = code(&verifier_serve(&[], None));
    assert_eq!(status, Some(2), "{stderr}");
    let (status, stderr) = code(&prime(&[
        "actor",
        "run",
        "--learner",
        "http://127.0.0.1:1",
        "--verifier",
        "http://127.0.0.1:1",
        "--tokenizer",
        &format!("{d}/no-such-tokenizer"),
    ]));
    assert_eq!(status, Some(2), "{stderr}");

    // a peer that is down: an actor whose learner never answers gives up with 75
    let world = prime(&[
        "world",
        "--out",
        &format!("{d}/world"),
        "--sft-size",
        "8",
        "--rl-size",
        "8",
        "--heldout-size",
        "8",
        "--vocab-size",
        "300",
    ]);
    assert!(
        world.status.success(),
        "{}",
        String::from_utf8_lossy(&world.stderr)
    );
    let closed = prime_tests::free_addr();
    let (status, stderr) = code(&prime(&[
        "actor",
        "run",
        "--learner",
        &format!("http://{closed}"),
        "--verifier",
        &format!("http://{closed}"),
        "--tokenizer",
        &format!("{d}/world/tokenizer"),
        "--give-up-after-secs",
        "1",
        "--max-backoff-secs",
        "0.2",
    ]));
    assert_eq!(status, Some(75), "{stderr}");
    assert!(stderr.contains("giving up"), "{stderr}");
}

/// `--log-format json`: every line on stderr is one JSON object, the events' fields as JSON
/// values, the final error included; the default stays text.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\":\"a\",\"ability\":\"math\",\"response\":\"\\\\boxed{4}\",\"ground_truth\":\"4\"}\n\
         {\"id\":\"b\",\"ability\":\"math\",\"response\":\"\\\\boxed{5}\",\"ground_truth\":\"4\"}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let (i, o) = (input.to_str().unwrap(), output.to_str().unwrap());
    let prime = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_prime"))
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("PRIME_LOG_FORMAT")
            .output()
            .expect("prime runs")
    };
    let lines = |out: &Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    };

    let out = prime(&["--log-format", "json", "grade", "--input", i, "--output", o]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = lines(&out);
    let graded = events
        .iter()
        .find(|e| e["fields"]["message"] == "graded")
        .expect("the graded event");
    assert_eq!(graded["level"], "INFO");
    assert_eq!(graded["fields"]["items"], 2);
    assert_eq!(graded["fields"]["mean_score"], 0.5);

    // the failure is a JSON line too, with its exit status
    let missing = dir.path().join("missing.jsonl");
    let out = prime(&[
        "grade",
        "--log-format",
        "json",
        "--input",
        missing.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = lines(&out);
    let last = events.last().expect("an error event");
    assert_eq!(last["level"], "ERROR");
    assert_eq!(last["fields"]["exit_status"], 2);
    assert!(last["fields"]["message"]
        .as_str()
        .unwrap()
        .contains("missing.jsonl"));

    // text by default
    let out = prime(&["grade", "--input", i, "--output", o]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(" INFO "));
}
