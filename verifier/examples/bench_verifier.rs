//! What `prime bench verifier` runs, without building the CLI: math against math-verify on the
//! same items, and the sandboxed code test against bare python. Prints the summary, then the
//! report as JSON.
//!
//! `cargo run --release -p prime-verifier --example bench_verifier [CODE_RUNS]`

use prime_verifier::bench::{run_bench, BenchOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = BenchOptions::default();
    if let Some(runs) = std::env::args().nth(1) {
        options.code_runs = runs.parse()?;
    }
    let report = run_bench(&options)?;
    print!("{}", report.summary());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
