//! The math grader never panics and finishes quickly on hostile input.

use prime_verifier::math::{answers_match, expr::parse_expr, grade_math};
use proptest::prelude::*;
use std::time::{Duration, Instant};

/// Fragments that exercise every branch of the lexer and parser.
fn latexish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "\\frac",
        "\\sqrt",
        "[",
        "]",
        "{",
        "}",
        "(",
        ")",
        "^",
        "_",
        "!",
        "|",
        "x",
        "y",
        "2",
        "10",
        "0.5",
        "1e5",
        "-",
        "+",
        "*",
        "/",
        ",",
        "=",
        "<",
        "\\le",
        "\\pi",
        "\\infty",
        "\\pm",
        "\\{",
        "\\}",
        "\\cup",
        "\\text{",
        "\\boxed{",
        "\\left(",
        "\\right)",
        "\\begin{pmatrix}",
        "&",
        "\\\\",
        "\\end{pmatrix}",
        "\\sin",
        "\\log_",
        "\\binom",
        "i",
        "e",
        " ",
        "%",
        "$",
        "\\",
        "é",
        "\u{1}",
        "99999999999999999999999999999999999999999",
        "\\sqrt[",
        "**",
        ".",
        "abc",
    ]);
    prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parser_never_panics_on_bytes(s in "\\PC{0,80}") {
        let _ = parse_expr(&s);
        let _ = answers_match(&s, &s);
        let _ = grade_math(&s, "1");
    }

    #[test]
    fn grader_never_panics_on_latexish(a in latexish(), b in latexish()) {
        let _ = parse_expr(&a);
        let _ = answers_match(&a, &b);
        let _ = grade_math(&format!("\\boxed{{{a}}}"), &b);
    }

    #[test]
    fn an_answer_matches_itself_when_numeric(n in -1_000_000i64..1_000_000, d in 1i64..1000) {
        let s = format!("\\frac{{{n}}}{{{d}}}");
        prop_assert!(answers_match(&s, &s));
        let value = n as f64 / d as f64;
        if (value * 1e6).fract() == 0.0 && d != 1 {
            let decimal = value.to_string();
            prop_assert!(answers_match(&s, &decimal));
        }
    }
}

fn assert_quick(gt: &str, pred: &str) {
    let start = Instant::now();
    let _ = answers_match(gt, pred);
    let _ = grade_math(pred, gt);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?} on a {}-byte input",
        start.elapsed(),
        pred.len()
    );
}

#[test]
fn pathological_inputs_are_bounded() {
    let deep_parens = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
    let deep_braces = format!("\\boxed{{{}1{}}}", "{".repeat(100_000), "}".repeat(100_000));
    let deep_fracs = "\\frac{".repeat(3000) + "1" + &"}{2}".repeat(3000);
    let tower = "2^".repeat(2000) + "2";
    let megabytes = "the answer might be 7. ".repeat(200_000);
    let long_sum = vec!["1"; 2000].join("+");
    for (gt, pred) in [
        ("1", deep_parens.as_str()),
        ("1", deep_braces.as_str()),
        ("1", deep_fracs.as_str()),
        ("2", tower.as_str()),
        ("7", megabytes.as_str()),
        ("2000", long_sum.as_str()),
        ("2^{100000}", "2^{100000}"),
        ("2^{2^{2^{2^{2^{2}}}}}", "2^{2^{2^{2^{2^{3}}}}}"),
        ("1000!", "1001!"),
        ("10^{10^{10}}", "10^{10^{10}}+1"),
        ("\\binom{100000}{50000}", "\\binom{100000}{49999}"),
    ] {
        assert_quick(gt, pred);
    }
    let huge_box = format!("\\boxed{{{}}}", "1".repeat(3_000_000));
    assert_quick("1", &huge_box);
}

#[test]
fn huge_values_are_not_equal_by_overflow() {
    // Both sides overflow f64; they must not compare equal by accident.
    assert!(!answers_match("2^{100000}", "3^{100000}"));
    assert!(!answers_match("1000!", "1001!"));
    assert!(answers_match("2^{100000}", "2^{100000}"));
}

#[test]
fn unterminated_box_is_no_answer() {
    let v = grade_math("so we get \\boxed{\\frac{1}{2}", "\\frac{1}{2}");
    assert!(!v.correct);
    assert_eq!(v.extracted, None);
}
