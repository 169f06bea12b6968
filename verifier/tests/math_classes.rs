//! One test per class of answers the math grader was fixed for while growing the external table
//! (`tests/data/math_pairs_external.jsonl`), each with hand-checked cases on both sides: forms
//! that must be read as equal, and near misses that must not. docs/verifier.md ("Math: what
//! counts as equal") states the rules.

use prime_verifier::math::extract::extract_answer;
use prime_verifier::math::{answers_match, grade_math};

/// Asserts the grader's verdict on (reference, answer) pairs.
fn expect_answers(cases: &[(&str, &str, bool)]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(gt, answer, want)| answers_match(gt, answer) != *want)
        .map(|(gt, answer, want)| format!("  gt={gt:?} answer={answer:?} want={want}"))
        .collect();
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
}

/// Asserts the grader's verdict on (reference, whole response) pairs.
fn expect_responses(cases: &[(&str, &str, bool)]) {
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(gt, response, want)| grade_math(response, gt).correct != *want)
        .map(|(gt, response, want)| {
            format!(
                "  gt={gt:?} response={response:?} want={want} extracted={:?}",
                extract_answer(response)
            )
        })
        .collect();
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
}

#[test]
fn final_sentence_states_the_answer_when_nothing_is_boxed() {
    expect_responses(&[
        (
            "42",
            "Adding the two groups, there are 42 apples in all.",
            true,
        ),
        ("42", "So the total is $42$. I hope this helps!", true),
        (
            "\\frac{1}{2}",
            "The probability is therefore $\\frac{1}{2}$.",
            true,
        ),
        ("12", "Each box costs 12 dollars/box.", true),
        ("7", "所以答案是 7。", true),
        // The last value of the final sentence, not an earlier one.
        (
            "8",
            "We had 3 apples and bought 5 more, giving 8 apples.",
            true,
        ),
        (
            "3",
            "We had 3 apples and bought 5 more, giving 8 apples.",
            false,
        ),
        // Cut off mid-sentence: no answer.
        ("7", "We have x = 7 and so on", false),
    ]);
}

#[test]
fn response_that_is_one_expression_is_its_answer() {
    expect_responses(&[
        ("2x+1", "$2x+1$", true),
        ("\\frac{3}{4}", "\\frac{3}{4}", true),
        ("\\frac{3}{4}", "\\frac{4}{3}", false),
    ]);
}

#[test]
fn boxes_joined_by_connectives_are_one_answer() {
    expect_responses(&[
        ("1, 2", "The roots are $\\boxed{1}$ and $\\boxed{2}$.", true),
        ("(1, 2), (2, 1)", "$\\boxed{(1, 2)}, \\boxed{(2, 1)}$", true),
        ("3, 5", "So $x = \\boxed{3}$ or $x = \\boxed{5}$.", true),
        (
            "(3, 3), (1, 1)",
            "$$\\boxed{(3, 3)} \\text{ for part (a) and } \\boxed{(1, 1)}$$",
            true,
        ),
        // Side by side with no connective: the second box corrects the first.
        ("143", "$$\\boxed{20}$$ \\boxed{143}", true),
        ("20, 143", "$$\\boxed{20}$$ \\boxed{143}", false),
        // Boxes in separate sentences are separate statements.
        ("2", "First $\\boxed{1}$. Then it is $\\boxed{2}$", true),
    ]);
}

#[test]
fn answer_phrase_after_the_last_box_wins() {
    expect_responses(&[
        (
            "10",
            "The intermediate sum is $\\boxed{7}$. Adding 3, the answer is 10.",
            true,
        ),
        (
            "7",
            "The intermediate sum is $\\boxed{7}$. Adding 3, the answer is 10.",
            false,
        ),
        ("5", "Réponse : 5", true),
        ("5", "答案：5", true),
    ]);
}

#[test]
fn cut_off_last_box_is_no_answer() {
    expect_responses(&[
        (
            "3",
            "First I thought $\\boxed{3}$, but actually $\\boxed{4",
            false,
        ),
        (
            "4",
            "First I thought $\\boxed{3}$, but actually $\\boxed{4",
            false,
        ),
    ]);
}

#[test]
fn mixed_numbers() {
    expect_answers(&[
        ("1.5", "1\\frac{1}{2}", true),
        ("-\\frac{5}{2}", "-2\\frac{1}{2}", true),
        ("\\frac{7}{2}", "3 \\frac{1}{2}", true),
        ("\\frac{3}{2}", "2\\frac{1}{2}", false),
        // An improper fraction after a whole number is not a mixed number of anything.
        ("\\frac{7}{2}", "2\\frac{3}{2}", false),
    ]);
}

#[test]
fn percent_words_against_decimals() {
    expect_answers(&[
        ("0.28", "28 percent", true),
        ("0.28", "28 pct", true),
        ("0.28", "28\\%", true),
        ("0.28", "2.8 percent", false),
        // Neither side has a sign: nothing is scaled.
        ("0.1", "10", false),
    ]);
}

#[test]
fn glued_or_and_solution_groups() {
    expect_answers(&[
        ("x = 1, x = -3", "x = 1 or x = -3", true),
        ("(11, 7), (7, 11)", "(7,11)or(11,7)", true),
        ("(11, 7), (7, 11)", "(7,11)or(11,8)", false),
        ("W(x) = 1, W(x) = -1", "W(x)=1orW(x)=-1", true),
        ("(1, 2)", "x = 1; y = 2", true),
        ("(1, 2)", "x = 1 and y = 2", true),
        ("(1, 2)", "x = 2 and y = 1", false),
    ]);
}

#[test]
fn choice_letters() {
    expect_answers(&[
        ("C", "(C)", true),
        ("C", "C. x = 42", true),
        ("C. x = 42", "C", true),
        ("C", "D", false),
        ("C. x = 42", "B", false),
    ]);
}

#[test]
fn functions_by_other_names() {
    expect_answers(&[
        ("\\csc x", "\\frac{1}{\\sin x}", true),
        ("\\operatorname{sech}(x)", "\\frac{1}{\\cosh x}", true),
        ("\\operatorname{arccot}(1)", "\\frac{\\pi}{4}", true),
        ("acsc(2)", "\\frac{\\pi}{6}", true),
        ("abs(x-1)", "|x-1|", true),
        ("floor(2.5)", "2", true),
        ("ceiling(2.5)", "3", true),
        ("lg(100)", "2", true),
        ("\\csc x", "\\frac{1}{\\cos x}", false),
        ("ceiling(2.5)", "2", false),
    ]);
}

#[test]
fn greek_names_and_subscripts() {
    expect_answers(&[
        ("2\\pi r", "2 pi r", true),
        ("\\theta^2", "theta^2", true),
        ("x_{1} + x_{2}", "x_(1) + x_(2)", true),
        ("\\alpha + \\beta", "alpha + beta", true),
        ("\\alpha + \\beta", "alpha - beta", false),
    ]);
}

#[test]
fn not_equal_signs_and_commands_glued_to_variables() {
    expect_answers(&[
        ("x \\ne 3", "x <> 3", true),
        ("x \\ne 3", "x ≠ 3", true),
        ("x \\ne 3", "x =/= 3", true),
        ("a \\cdot b", "a\\cdotb", true),
        ("\\sin x", "\\sinx", true),
        ("x \\ne 3", "x = 3", false),
    ]);
}

#[test]
fn polynomials_checked_exactly_at_integer_points() {
    expect_answers(&[
        ("x^2 + 2x + 1", "(x+1)^2", true),
        // Off by one in the constant of a large polynomial: within any float tolerance, but
        // not equal.
        ("1000000000x^3 + 1", "1000000000x^3 + 2", false),
        ("1000000000x^3 + 1", "1000000000 x^3 + 1", true),
    ]);
}

#[test]
fn negative_points_tell_roots_of_squares_apart() {
    expect_answers(&[
        ("|x|", "\\sqrt{x^2}", true),
        ("x", "\\sqrt{x^2}", false),
        // Equal wherever the root is defined (and in the complex numbers too).
        ("x", "(\\sqrt{x})^2", true),
        ("x^{1/3}", "\\sqrt[3]{x}", true),
    ]);
}

#[test]
fn equations_equal_up_to_a_divisor_variable() {
    expect_answers(&[
        ("y = 2x - 5", "\\frac{y+5}{x} = 2", true),
        ("y = 2x - 5", "2y = 4x - 10", true),
        ("y = 2x - 5", "y = 2x + 5", false),
        // Multiplying through by a variable that neither side divides by adds solutions.
        ("y = 2x - 5", "yz = 2xz - 5z", false),
    ]);
}

#[test]
fn absolute_value_bars_side_by_side() {
    expect_answers(&[
        ("|x| \\cdot |y|", "|x||y|", true),
        ("|xy|", "|x||y|", true),
        ("|x| + |y|", "|x||y|", false),
    ]);
}

#[test]
fn factorials() {
    expect_answers(&[
        // Non-integers through the Gamma function: (1/2)! = sqrt(pi)/2.
        ("\\frac{\\sqrt{\\pi}}{2}", "(1/2)!", true),
        ("\\sqrt{\\pi}", "(1/2)!", false),
        // Quotients of factorials too large for 128-bit integers or floating point.
        (
            "\\frac{7}{22}",
            "\\frac{175! \\cdot 56!}{55! \\cdot 176!}",
            true,
        ),
        (
            "\\frac{7}{23}",
            "\\frac{175! \\cdot 56!}{55! \\cdot 176!}",
            false,
        ),
        ("9900", "\\frac{100!}{98!}", true),
        ("9901", "\\frac{100!}{98!}", false),
        ("(n+1)!", "(n+1) n!", true),
    ]);
}

#[test]
fn times_of_day() {
    expect_answers(&[
        ("20:34", "20:34:00", true),
        ("20:34", "8:34 p.m.", true),
        ("20:34", "08:34 \\text{P.M.}", true),
        ("12:05 a.m.", "00:05", true),
        ("20:34", "8:34 a.m.", false),
        ("20:34", "20:34:30", false),
        // Without seconds or a.m./p.m. on either side `7:32` stays a ratio.
        ("7:32", "14:64", false),
    ]);
}

#[test]
fn absolute_value_between_bounds_is_two_intervals() {
    expect_answers(&[
        (
            "1 \\le |z| \\le \\frac{3}{2}",
            "z \\in [-\\frac{3}{2}, -1] \\cup [1, \\frac{3}{2}]",
            true,
        ),
        ("2 < |x| < 5", "(-5, -2) \\cup (2, 5)", true),
        ("2 < |x| < 5", "(-5, -2] \\cup [2, 5)", false),
        ("2 < |x| < 5", "(2, 5)", false),
    ]);
}

#[test]
fn powers_whose_complex_branches_differ_off_the_real_domain() {
    expect_answers(&[
        ("6(x-2)^{3k}", "6((x-2)^3)^k", true),
        ("(x-2)^{3k}", "((x-2)^3)^{k+1}", false),
    ]);
}

#[test]
fn computations_written_with_their_result() {
    expect_answers(&[
        ("1", "\\lim_{x \\to 0} \\frac{\\sin x}{x} = 1", true),
        ("2", "17 \\bmod 5 = 2", true),
        (
            "-2",
            "\\begin{vmatrix} 1 & 2 \\\\ 3 & 4 \\end{vmatrix} = -2",
            true,
        ),
        ("2", "\\lim_{x \\to 0} \\frac{\\sin x}{x} = 1", false),
        // An equation with a variable on one side is not a value.
        ("11a + c", "7 = 11a + c", false),
    ]);
}

#[test]
fn sums_of_letter_products_against_factored_forms() {
    expect_answers(&[
        ("a(b+c)d", "abd + acd", true),
        ("a(b+c)d", "abd + acb", false),
    ]);
}

#[test]
fn segment_ratio_labels() {
    expect_answers(&[
        ("\\frac{3}{5}", "\\frac{NO}{BO} = \\frac{3}{5}", true),
        ("\\frac{3}{5}", "\\frac{NO}{BO} = \\frac{5}{3}", false),
    ]);
}

#[test]
fn sets_of_tuples_with_a_repeated_member() {
    expect_answers(&[
        ("(1, 2), (2, 1)", "(1, 2), (2, 1), (1, 2)", true),
        ("(1, 2), (2, 1)", "(1, 2), (1, 2)", false),
    ]);
}

#[test]
fn sequences_with_an_ellipsis() {
    expect_answers(&[
        ("1, 2, 3, \\ldots", "1, 2, 3, ...", true),
        ("1, 2, 3, \\ldots", "1, 2, 3, \\dots", true),
        ("1, 2, 3, \\ldots", "1, 2, 4, \\ldots", false),
    ]);
}
