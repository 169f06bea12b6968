//! Latency of one code test in the sandbox against bare `python3` running the same program
//! with the same stdin (the same interpreter binary, without shims). Prints one JSON line.
//!
//! `cargo run --release -p prime-verifier --example sandbox_overhead [RUNS]`

use prime_verifier::code::sandbox::{Backend, Sandbox, SandboxLimits};
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

const PROGRAM: &str = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(x * x for x in nums))\n";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args().nth(1).map_or(Ok(30), |r| r.parse())?;
    let stdin: String = (0..1000).map(|i| format!("{i} ")).collect();
    let sandbox = Sandbox::detect(SandboxLimits::default())?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("main.py");
    std::fs::write(&script, PROGRAM)?;

    let bare = || -> Result<f64, Box<dyn std::error::Error>> {
        let start = Instant::now();
        let mut child = Command::new(sandbox.python())
            .args(["-I", "-B"])
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        assert!(out.status.success());
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let sandboxed = || -> Result<f64, Box<dyn std::error::Error>> {
        let start = Instant::now();
        let out = sandbox.run(PROGRAM, stdin.as_bytes())?;
        assert!(out.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    // Warm the page cache for both.
    bare()?;
    sandboxed()?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rlimits_only = sandbox.clone().with_backend(Backend::Rlimits);
    let mut bare_ms = Vec::new();
    let mut sandbox_ms = Vec::new();
    let mut rlimits_ms = Vec::new();
    for _ in 0..runs {
        bare_ms.push(bare()?);
        sandbox_ms.push(sandboxed()?);
        let start = Instant::now();
        rlimits_only.run(PROGRAM, stdin.as_bytes())?;
        rlimits_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let (b, s, r) = (median(bare_ms), median(sandbox_ms), median(rlimits_ms));
    println!(
        "{}",
        json!({
            "backend": sandbox.backend().name(),
            "cgroup": sandbox.has_cgroup(),
            "runs": runs,
            "bare_python_median_ms": b,
            "sandbox_median_ms": s,
            "rlimits_backend_median_ms": r,
            "overhead": s / b - 1.0,
        })
    );
    Ok(())
}
