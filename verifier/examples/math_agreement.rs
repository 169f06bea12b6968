//! Agreement of the math grader with human labels, and its speed, on a labelled JSONL file
//! (default: `tests/data/math_pairs.jsonl`). The Python counterpart for math-verify is
//! `bench/python/math_verify_agreement.py`; `prime bench verifier` runs both in one go.
//!
//! `cargo run --release -p prime-verifier --example math_agreement [FILE] [REPEATS]`

use prime_verifier::bench::{math_ours, BenchOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut options = BenchOptions::default();
    if let Some(path) = args.next() {
        options.math_items = vec![path.into()];
    }
    if let Some(r) = args.next() {
        options.repeats = r.parse()?;
    }
    let side = math_ours(&options)?;
    println!("{}", serde_json::to_string(&side)?);
    Ok(())
}
