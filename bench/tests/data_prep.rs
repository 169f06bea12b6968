//! `prime bench data` at a small size: the learner's `prepare` and transformers'
//! `apply_chat_template(..., tokenize=True)` in the project's venv keep, drop and refuse the
//! same rows of the stand-in and give every kept row the same prompt ids.

use prime_bench::data_prep::{run_data_bench, DataBenchSettings};
use prime_bench::python::default_python;
use prime_bench::Python;
use prime_world::standin::{build_standin, StandinConfig, BAD_ROW_OFFSET};

#[test]
fn ours_and_transformers_agree_row_by_row() {
    let python = default_python();
    assert!(
        python.exists(),
        "no Python venv at {}: run `make test` (it creates ~/.cache/prime-rs/venv) or set PRIME_VENV",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let standin = dir.path().join("standin");
    // The first bad row (an empty ground truth) is row 4,321.
    let cfg = StandinConfig {
        seed: 2,
        train_rows: 4_400,
        validation_rows: 16,
    };
    build_standin(&cfg, &standin, &|_, _, _| {}).unwrap();
    let rows = BAD_ROW_OFFSET + 9;
    let settings = DataBenchSettings {
        standin,
        rows: Some(rows),
        // Low enough that both sides drop some prompts as too long.
        max_prompt_tokens: 400,
        repeats: 1,
        sample_every: 1,
    };
    let report = run_data_bench(
        &settings,
        &Python {
            executable: python,
            threads: 1,
        },
    )
    .unwrap();

    let (ours, theirs) = (&report.ours, &report.transformers);
    assert_eq!(ours.rows, rows);
    assert_eq!(
        (ours.rows, ours.kept, ours.too_long, ours.bad),
        (theirs.rows, theirs.kept, theirs.too_long, theirs.bad)
    );
    assert_eq!(ours.bad, 1);
    assert!(ours.too_long > 0 && ours.kept > rows / 2, "{ours:?}");
    // Every kept row was compared (sampling every row), and none differs.
    assert_eq!(report.compared, ours.kept);
    assert_eq!(report.mismatches, 0);
}
