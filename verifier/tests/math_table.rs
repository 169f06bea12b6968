//! The labelled answer pairs of `tests/data/math_pairs.jsonl`, by category: the verdict a
//! careful mathematician gives. Rows with an `answer` compare an extracted answer with the
//! reference; rows with a `response` grade a whole response (extraction included). The same
//! file feeds the agreement comparison with math-verify (`examples/math_agreement.rs` and
//! `bench/python/math_verify_agreement.py`).

use prime_verifier::math::{answers_match, grade_math};
use serde_json::Value;
use std::collections::BTreeMap;

fn rows() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/math_pairs.jsonl");
    std::fs::read_to_string(path)
        .expect("math_pairs.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid row"))
        .collect()
}

#[test]
fn math_table_by_category() {
    let mut per_category: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
    for row in rows() {
        let category = row["category"].as_str().unwrap().to_string();
        let gt = row["ground_truth"].as_str().unwrap();
        let want = row["correct"].as_bool().unwrap();
        let (got, shown) = match (row.get("answer"), row.get("response")) {
            (Some(a), _) => (answers_match(gt, a.as_str().unwrap()), a.to_string()),
            (None, Some(r)) => (grade_math(r.as_str().unwrap(), gt).correct, r.to_string()),
            _ => panic!("row without answer or response: {row}"),
        };
        let entry = per_category.entry(category).or_default();
        entry.0 += 1;
        if got != want {
            entry.1.push(format!(
                "  gt={gt:?} candidate={shown} want={want} got={got}"
            ));
        }
    }
    let total: usize = per_category.values().map(|(n, _)| n).sum();
    let report: Vec<String> = per_category
        .iter()
        .filter(|(_, (_, failures))| !failures.is_empty())
        .map(|(c, (n, failures))| {
            format!(
                "{c}: {} of {n} wrong\n{}",
                failures.len(),
                failures.join("\n")
            )
        })
        .collect();
    assert!(report.is_empty(), "{}", report.join("\n"));
    assert!(
        per_category.len() >= 15,
        "categories: {:?}",
        per_category.keys()
    );
    assert!(total >= 300, "only {total} cases");
}
