//! Math grading in pure Rust (spec 8.2, with the departures listed there): extract the final
//! answer, normalise both sides, parse them into [`answer::Answer`]s and compare the way a
//! careful mathematician would.
//!
//! Every step is bounded: the answer is at most [`extract::MAX_ANSWER_BYTES`], expressions at
//! most [`expr::MAX_EXPR_CHARS`] with bounded nesting, exponents and factorials are capped and
//! overflow turns into "not comparable" instead of a hang or a panic.

pub mod answer;
pub mod eval;
pub mod expr;
pub mod extract;
pub mod normalize;
pub mod number;

use regex::Regex;
use std::sync::LazyLock;

static CHOICE_GT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\(?([A-E])\)?$").expect("valid regex"));
/// An answer that ends with a percent sign (`10\%`, `10%`, `10 \%$`).
static PERCENT_END: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\\%|%|\s*(?:percent(?:age)?|pct|per cent))[\s$]*$").expect("valid regex")
});
static CHOICE_PRED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\(?([A-Ea-e])\)(?:\s|$)|^([A-E])$|^([A-E])\.\s").expect("valid regex")
});
/// A choice letter followed by its content: "C. x = 42", "(C) 42".
static CHOICE_LABELLED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\(?([A-E])(?:\.|\))\s").expect("valid regex"));

/// A time of day: `20:34`, `20:34:00`, `8:34 p.m.`, `08:34 PM`.
static CLOCK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^(\d{1,2}):([0-5]\d)(?::([0-5]\d))?(?:\s*([ap])\.?\s*m\.?)?$")
        .expect("valid regex")
});

/// The outcome of grading one math response.
#[derive(Debug, Clone, PartialEq)]
pub struct MathVerdict {
    /// Whether the response's final answer is correct.
    pub correct: bool,
    /// The extracted final answer, if any.
    pub extracted: Option<String>,
    /// A short human-readable reason.
    pub reason: String,
}

impl MathVerdict {
    /// 1.0 for a correct answer, else 0.0.
    pub fn score(&self) -> f64 {
        if self.correct {
            1.0
        } else {
            0.0
        }
    }
}

/// Grades a full model response against the reference answer.
pub fn grade_math(response: &str, ground_truth: &str) -> MathVerdict {
    let Some(extracted) = extract::extract_answer(response) else {
        return MathVerdict {
            correct: false,
            extracted: None,
            reason: "no final answer found".into(),
        };
    };
    let correct = answers_match(ground_truth, &extracted);
    let reason = if correct {
        "answer matches".to_string()
    } else {
        "answer differs".to_string()
    };
    MathVerdict {
        correct,
        extracted: Some(extracted),
        reason,
    }
}

/// Whether the answer `pred` (already extracted) equals the reference `gt`.
pub fn answers_match(gt: &str, pred: &str) -> bool {
    if gt.len() > extract::MAX_ANSWER_BYTES || pred.len() > extract::MAX_ANSWER_BYTES {
        return false;
    }
    let g = normalize::normalize(gt);
    let p = normalize::normalize(pred);
    if g.is_empty() || p.is_empty() {
        return false;
    }
    if g == p {
        return true;
    }
    if is_integer_literal(&g) && is_integer_literal(&p) {
        // Integers too long for exact arithmetic still compare exactly, digit by digit.
        return canonical_integer(&g) == canonical_integer(&p);
    }
    if let Some(same) = same_clock_time(&g, &p) {
        return same;
    }
    if let Some(c) = CHOICE_GT.captures(&g) {
        // A multiple-choice letter: compare letters, whatever the decoration. An answer that is
        // an expression in that letter (`Bsec(0)` against `B`) is compared as an expression.
        let letter = CHOICE_PRED
            .captures(&p)
            .and_then(|m| m.get(1).or(m.get(2)).or(m.get(3)));
        let expression = letter.is_none()
            && p.contains(&c[1])
            && expr::parse_expr(&p).is_ok_and(|e| e.variables().len() == 1);
        if !expression {
            return letter.is_some_and(|m| m.as_str().eq_ignore_ascii_case(&c[1]));
        }
    }
    if let (Some(c), Some(labelled)) = (CHOICE_GT.captures(&p), CHOICE_LABELLED.captures(&g)) {
        // A reference written as the choice with its content ("C. x = 42") and a bare letter.
        return c[1] == labelled[1];
    }
    let (ga, pa) = (answer::parse_answer(&g), answer::parse_answer(&p));
    if answer::equivalent(&ga, &pa) || percent_as_decimal(gt, pred) {
        return true;
    }
    // Text answers ("Monday", "\text{no solution}") and forms the parser does not know compare
    // by their loose text, unless exponents or subscripts make braces meaningful.
    if let Some(same) = product_of_letters(&g, &ga, &p, &pa) {
        return same;
    }
    let meaningful_braces = |s: &str| s.contains('^') || s.contains('_');
    let both_text = matches!(ga, answer::Answer::Text(_)) || matches!(pa, answer::Answer::Text(_));
    both_text
        && !meaningful_braces(&g)
        && !meaningful_braces(&p)
        && normalize::text_key(&g) == normalize::text_key(&p)
}

/// `abd + acd` reads as words, but against an algebraic answer with variables (`a(b+c)d`) it is
/// a sum of products of single-letter variables; compares the two that way.
fn product_of_letters(g: &str, ga: &answer::Answer, p: &str, pa: &answer::Answer) -> Option<bool> {
    use answer::Answer::{Scalar, Text};
    let (gt, pred) = match (ga, pa) {
        (Text(_), Scalar(e)) if !e.variables().is_empty() => (expr::parse_expr(g).ok()?, e.clone()),
        (Scalar(e), Text(_)) if !e.variables().is_empty() => (e.clone(), expr::parse_expr(p).ok()?),
        _ => return None,
    };
    Some(answer::scalars_equivalent(&gt, &pred))
}

/// A percentage against its decimal: when only one side carries a percent sign, `x\%` is also
/// read as x/100, so `10\%` matches `0.1` (and, as the reference strips the sign, still `10`).
/// Without a sign on either side nothing is scaled: `0.1` never matches `10`.
fn percent_as_decimal(gt: &str, pred: &str) -> bool {
    let (percent, other) = match (PERCENT_END.is_match(gt), PERCENT_END.is_match(pred)) {
        (true, false) => (gt, pred),
        (false, true) => (pred, gt),
        _ => return false,
    };
    let value = normalize::normalize(percent);
    let other = normalize::normalize(other);
    if value.is_empty() || other.is_empty() {
        return false;
    }
    let scaled = answer::parse_answer(&format!("({value})/100"));
    answer::equivalent(&scaled, &answer::parse_answer(&other))
}

fn is_integer_literal(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn canonical_integer(s: &str) -> String {
    let negative = s.starts_with('-');
    let digits = s.trim_start_matches(['-', '+']).trim_start_matches('0');
    match (digits.is_empty(), negative) {
        (true, _) => "0".to_string(),
        (false, true) => format!("-{digits}"),
        (false, false) => digits.to_string(),
    }
}

/// Two times of day, at least one of them written with seconds or a.m./p.m. (a bare `7:32` is
/// also a ratio): equal when they name the same second of the day.
fn same_clock_time(g: &str, p: &str) -> Option<bool> {
    let (a, explicit_a) = clock_seconds(g)?;
    let (b, explicit_b) = clock_seconds(p)?;
    (explicit_a || explicit_b).then_some(a == b)
}

/// Seconds since midnight, and whether the form is unmistakably a time.
fn clock_seconds(s: &str) -> Option<(u32, bool)> {
    let c = CLOCK.captures(s.trim())?;
    let mut hour: u32 = c[1].parse().ok()?;
    let minute: u32 = c[2].parse().ok()?;
    let second: u32 = c.get(3).map_or(Some(0), |m| m.as_str().parse().ok())?;
    match c.get(4).map(|m| m.as_str().to_ascii_lowercase()) {
        Some(half) => {
            if !(1..=12).contains(&hour) {
                return None;
            }
            hour = hour % 12 + if half == "p" { 12 } else { 0 };
        }
        None if hour > 23 => return None,
        None => {}
    }
    Some((
        hour * 3600 + minute * 60 + second,
        c.get(3).is_some() || c.get(4).is_some(),
    ))
}
