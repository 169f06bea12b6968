//! Latency of one code test in the sandbox (cold, and from a warm pool) against bare `python3`
//! running the same program with the same stdin. Prints one JSON line. `prime bench verifier`
//! runs the same measurement next to the math benchmark.
//!
//! `cargo run --release -p prime-verifier --example sandbox_overhead [RUNS]`

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args().nth(1).map_or(Ok(30), |r| r.parse())?;
    let latency = prime_verifier::bench::code_latency(runs)?;
    println!("{}", serde_json::to_string(&latency)?);
    Ok(())
}
