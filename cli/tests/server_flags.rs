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
