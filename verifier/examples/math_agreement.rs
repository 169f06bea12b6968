//! Agreement of the math grader with human labels, and its speed, on a labelled JSONL file
//! (default: `tests/data/math_pairs.jsonl`). The Python counterpart for math-verify is
//! `bench/python/math_verify_agreement.py`; both print one JSON summary line.
//!
//! `cargo run --release -p prime-verifier --example math_agreement [FILE] [REPEATS]`

use prime_verifier::math::{answers_match, grade_math};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/math_pairs.jsonl").to_string()
    });
    let repeats: usize = args.next().map_or(Ok(20), |r| r.parse())?;
    let rows: Vec<Value> = std::fs::read_to_string(&path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let grade = |row: &Value| -> bool {
        let gt = row["ground_truth"].as_str().unwrap_or_default();
        match (row.get("answer"), row.get("response")) {
            (Some(a), _) => answers_match(gt, a.as_str().unwrap_or_default()),
            (None, Some(r)) => grade_math(r.as_str().unwrap_or_default(), gt).correct,
            _ => false,
        }
    };
    let mut per_category: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut disagreements = Vec::new();
    for row in &rows {
        let agree = grade(row) == row["correct"].as_bool().unwrap_or(false);
        let entry = per_category
            .entry(row["category"].as_str().unwrap_or("?"))
            .or_default();
        entry.0 += 1;
        if agree {
            entry.1 += 1;
        } else {
            disagreements.push(row.clone());
        }
    }
    let start = Instant::now();
    let mut graded = 0usize;
    for _ in 0..repeats {
        for row in &rows {
            std::hint::black_box(grade(row));
            graded += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let agreed: usize = per_category.values().map(|(_, a)| a).sum();
    let summary = json!({
        "grader": "prime-verifier",
        "items": rows.len(),
        "agreement": agreed as f64 / rows.len().max(1) as f64,
        "per_category": per_category
            .iter()
            .map(|(c, (n, a))| (c.to_string(), json!({"items": n, "agreed": a})))
            .collect::<serde_json::Map<_, _>>(),
        "items_per_second": graded as f64 / seconds,
        "disagreements": disagreements,
    });
    println!("{summary}");
    Ok(())
}
