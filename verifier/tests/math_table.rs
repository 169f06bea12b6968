//! The labelled answer pairs of `tests/data/math_pairs.jsonl` (the project's own table) and
//! `tests/data/math_pairs_external.jsonl` (cases transcribed from the published test suites of
//! other math graders, each row citing its `source`), by category: the verdict a careful
//! mathematician gives, by the reference's rules where the sources disagree (the row's `note`
//! then records the source's own label and why the verdict differs). Rows with an `answer`
//! compare an extracted answer with the reference; rows with a `response` grade a whole response
//! (extraction included). A row marked `known_failure` is a case the grader knowingly gets
//! wrong, with the reason; the test checks that it still does, so a fix must also remove the
//! mark, and that known failures stay under the agreement thresholds below. The same files feed
//! the agreement comparison with math-verify (`examples/math_agreement.rs` and
//! `bench/python/math_verify_agreement.py`).

use prime_verifier::math::{answers_match, grade_math};

/// Least share of rows of the external table the grader must agree with, over all of it.
const EXTERNAL_AGREEMENT: f64 = 0.99;
/// Least share per category of the external table.
const EXTERNAL_CATEGORY_AGREEMENT: f64 = 0.97;
/// Least number of rows of the external table.
const EXTERNAL_ROWS: usize = 1500;
use serde_json::Value;
use std::collections::BTreeMap;

fn rows(file: &str) -> Vec<Value> {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid row"))
        .collect()
}

/// The grader's verdict on one row, and the candidate as shown in a failure report.
fn verdict(row: &Value) -> (bool, String) {
    let gt = row["ground_truth"].as_str().expect("ground_truth");
    match (row.get("answer"), row.get("response")) {
        (Some(a), _) => (
            answers_match(gt, a.as_str().expect("answer")),
            a.to_string(),
        ),
        (None, Some(r)) => (
            grade_math(r.as_str().expect("response"), gt).correct,
            r.to_string(),
        ),
        _ => panic!("row without answer or response: {row}"),
    }
}

#[derive(Default)]
struct Tally {
    rows: usize,
    known: usize,
    failures: Vec<String>,
}

/// Checks every row of `file`, returning the tally per category.
fn check(file: &str) -> BTreeMap<String, Tally> {
    let mut per_category: BTreeMap<String, Tally> = BTreeMap::new();
    for row in rows(file) {
        let category = row["category"].as_str().expect("category").to_string();
        let want = row["correct"].as_bool().expect("correct");
        let (got, shown) = verdict(&row);
        let gt = &row["ground_truth"];
        let entry = per_category.entry(category).or_default();
        entry.rows += 1;
        match row.get("known_failure") {
            Some(reason) => {
                entry.known += 1;
                if got != want {
                    continue;
                }
                entry.failures.push(format!(
                    "  now agrees, remove known_failure ({reason}): gt={gt} candidate={shown}"
                ));
            }
            None if got != want => entry
                .failures
                .push(format!("  gt={gt} candidate={shown} want={want} got={got}")),
            None => {}
        }
    }
    per_category
}

fn report(per_category: &BTreeMap<String, Tally>) -> Vec<String> {
    per_category
        .iter()
        .filter(|(_, t)| !t.failures.is_empty())
        .map(|(c, t)| {
            format!(
                "{c}: {} of {} wrong\n{}",
                t.failures.len(),
                t.rows,
                t.failures.join("\n")
            )
        })
        .collect()
}

#[test]
fn math_table_by_category() {
    let per_category = check("math_pairs.jsonl");
    let total: usize = per_category.values().map(|t| t.rows).sum();
    let report = report(&per_category);
    assert!(report.is_empty(), "{}", report.join("\n"));
    assert!(
        per_category.values().all(|t| t.known == 0),
        "the project's own table has no known failures"
    );
    assert!(
        per_category.len() >= 15,
        "categories: {:?}",
        per_category.keys()
    );
    assert!(total >= 300, "only {total} cases");
}

#[test]
fn external_table_by_category() {
    let per_category = check("math_pairs_external.jsonl");
    let report = report(&per_category);
    assert!(report.is_empty(), "{}", report.join("\n"));
    for (category, tally) in &per_category {
        assert!(
            category.starts_with("external: "),
            "external categories are named `external: SOURCE`, not {category:?}"
        );
        assert!(tally.rows >= 20, "{category}: only {} rows", tally.rows);
    }
    let total: usize = per_category.values().map(|t| t.rows).sum();
    assert!(total >= EXTERNAL_ROWS, "only {total} external cases");
    let agreement = |t: &Tally| (t.rows - t.known) as f64 / t.rows as f64;
    for (category, tally) in &per_category {
        assert!(
            agreement(tally) >= EXTERNAL_CATEGORY_AGREEMENT,
            "{category}: agrees on {} of {} rows",
            tally.rows - tally.known,
            tally.rows
        );
    }
    let known: usize = per_category.values().map(|t| t.known).sum();
    let overall = (total - known) as f64 / total as f64;
    assert!(
        overall >= EXTERNAL_AGREEMENT,
        "agrees on {} of {total} rows ({overall:.4})",
        total - known
    );
    for row in rows("math_pairs_external.jsonl") {
        assert!(
            row["source"].as_str().is_some_and(|s| s.contains('/')),
            "row without a source: {row}"
        );
    }
}
