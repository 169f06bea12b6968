//! Output comparison of the code grader (spec 8.3), done outside the sandbox.
//!
//! Standard-input problems use the reference harness's stages (1)-(4), first match wins; the
//! reference's last, whitespace-token-set stage compares a list with a set and so never
//! succeeds, and is not a check here either. Call-based problems compare the returned value with
//! Python's `==` on the values JSON can carry, after the harness has turned tuples into lists.
//! The Python string and number helpers below follow CPython's rules (`str.splitlines`,
//! `str.strip`, `str.isdigit`, `float(str)`) so that the stages see what the reference sees.

use serde_json::Value;

/// Stdout comparison (spec 8.3), first match wins:
///
/// 1. the output's lines joined by newlines, or the same with each line stripped, equal the
///    expected text, both stripped at the ends;
/// 2. the output is exactly one line, equal to the whole expected text;
/// 3. the expected text split on `\n`, empty lines dropped, lines stripped, equals the output's
///    lines as printed, or its non-empty lines as printed;
/// 4. the output's non-empty lines and those expected lines are as many, not all pairs are
///    digit strings, every line parses as a Python float, and the numbers agree within
///    `np.allclose` tolerances (`|a - b| <= 1e-8 + 1e-5 |b|`).
///
/// A line is never split into tokens, so several numbers on one line where one number per line
/// is expected (or the reverse) do not match.
pub fn stdout_matches(got: &str, expected: &str) -> bool {
    let out_lines = py_splitlines(got);
    let expected_stripped = py_strip(expected);
    // (1) The whole text.
    if py_strip(&out_lines.join("\n")) == expected_stripped {
        return true;
    }
    let stripped_lines: Vec<&str> = out_lines.iter().map(|l| py_strip(l)).collect();
    if py_strip(&stripped_lines.join("\n")) == expected_stripped {
        return true;
    }
    // (2) One output line equal to the expected text as given.
    if out_lines.len() == 1 && out_lines[0] == expected {
        return true;
    }
    // (3) The expected lines, cleaned, against the output lines as printed.
    let expected_lines: Vec<&str> = expected
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(py_strip)
        .collect();
    if out_lines == expected_lines {
        return true;
    }
    let out_nonempty: Vec<&str> = out_lines.into_iter().filter(|l| !l.is_empty()).collect();
    if out_nonempty == expected_lines {
        return true;
    }
    // (4) Line by line as floats.
    lines_allclose(&out_nonempty, &expected_lines)
}

/// Stage (4): equal counts, not all pairs digit strings (those had to match exactly), every
/// line a Python float, all pairs within `np.allclose` tolerances.
fn lines_allclose(got: &[&str], expected: &[&str]) -> bool {
    if got.len() != expected.len() {
        return false;
    }
    if got
        .iter()
        .zip(expected)
        .all(|(a, b)| py_isdigit(a) && py_isdigit(b))
    {
        return false;
    }
    got.iter()
        .zip(expected)
        .all(|(a, b)| matches!((py_float(a), py_float(b)), (Some(x), Some(y)) if np_isclose(x, y)))
}

/// `np.isclose(a, b)` with its default tolerances: infinities equal only themselves, NaN
/// equals nothing.
fn np_isclose(a: f64, b: f64) -> bool {
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= 1e-8 + 1e-5 * b.abs()
}

/// Whitespace as Python's `str.isspace` sees it: Rust's `char::is_whitespace` plus the ASCII
/// separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `str.splitlines()`: splits on `\n`, `\r`, `\r\n`, `\v`, `\f`, U+001C..U+001E,
/// U+0085, U+2028 and U+2029; no empty last line after a final line break.
pub fn py_splitlines(s: &str) -> Vec<&str> {
    let is_break = |c: char| {
        matches!(
            c,
            '\n' | '\r'
                | '\u{b}'
                | '\u{c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        )
    };
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if is_break(c) {
            lines.push(&s[start..i]);
            let mut end = i + c.len_utf8();
            if c == '\r' {
                if let Some(&(j, '\n')) = chars.peek() {
                    chars.next();
                    end = j + 1;
                }
            }
            start = end;
        }
    }
    if start < s.len() {
        lines.push(&s[start..]);
    }
    lines
}

/// Python's `str.isdigit()` for the ASCII digits (a non-ASCII digit never parses as a float
/// here, so both sides of stage (4) fail on it alike).
fn py_isdigit(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Python's `float(str)`: surrounding whitespace allowed, `_` only between two digits,
/// `inf`/`infinity`/`nan` in any case with an optional sign.
pub fn py_float(s: &str) -> Option<f64> {
    let s = py_strip(s);
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'_' {
            let before = i > 0 && bytes[i - 1].is_ascii_digit();
            let after = bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
            if !(before && after) {
                return None;
            }
        }
    }
    let cleaned: String = s.chars().filter(|&c| c != '_').collect();
    let unsigned = cleaned.trim_start_matches(['+', '-']);
    if cleaned.len() - unsigned.len() > 1 {
        return None;
    }
    let word = unsigned.to_ascii_lowercase();
    if matches!(word.as_str(), "inf" | "infinity" | "nan") {
        let value = if word == "nan" {
            f64::NAN
        } else {
            f64::INFINITY
        };
        return Some(if cleaned.starts_with('-') {
            -value
        } else {
            value
        });
    }
    // Rust's grammar is Python's for the remaining (finite, decimal) forms.
    if !unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return None;
    }
    cleaned.parse::<f64>().ok()
}

/// Call-based comparison (spec 8.3): the returned value equals the expected one under
/// Python's `==`, or equals the only element of a one-element expected list (the APPS
/// convention of wrapping each expected value in a list). Tuples arrive as lists already.
pub fn call_result_matches(got: &Value, expected: &Value) -> bool {
    py_eq(got, expected)
        || matches!(expected, Value::Array(items) if items.len() == 1 && py_eq(got, &items[0]))
}

/// Python's `==` on JSON values: `True == 1 == 1.0`, integers and floats compare exactly,
/// lists element by element, dicts by their keys and values.
pub fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        _ => match (py_number(a), py_number(b)) {
            (Some(x), Some(y)) => x.equals(y),
            _ => false,
        },
    }
}

/// A JSON number or boolean as Python sees it in a comparison.
#[derive(Clone, Copy)]
enum PyNumber {
    Int(i128),
    Float(f64),
}

impl PyNumber {
    /// Exact comparison, as Python compares an int with a float.
    fn equals(self, other: PyNumber) -> bool {
        match (self, other) {
            (PyNumber::Int(x), PyNumber::Int(y)) => x == y,
            (PyNumber::Float(x), PyNumber::Float(y)) => x == y,
            (PyNumber::Int(i), PyNumber::Float(f)) | (PyNumber::Float(f), PyNumber::Int(i)) => {
                f.is_finite() && f.fract() == 0.0 && f.abs() < 1e38 && f as i128 == i
            }
        }
    }
}

/// Booleans are the integers 0 and 1 to Python's `==`.
fn py_number(v: &Value) -> Option<PyNumber> {
    match v {
        Value::Bool(b) => Some(PyNumber::Int(i128::from(*b))),
        Value::Number(n) => Some(if let Some(i) = n.as_i64() {
            PyNumber::Int(i128::from(i))
        } else if let Some(u) = n.as_u64() {
            PyNumber::Int(i128::from(u))
        } else {
            PyNumber::Float(n.as_f64()?)
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splitlines_and_strip_follow_python() {
        assert_eq!(
            py_splitlines("a\nb\r\nc\rd\u{b}e\n"),
            ["a", "b", "c", "d", "e"]
        );
        assert_eq!(py_splitlines("a\n\nb"), ["a", "", "b"]);
        assert!(py_splitlines("").is_empty());
        assert_eq!(py_splitlines("\n"), [""]);
        assert_eq!(py_strip("\u{1f} x \u{a0}\t"), "x");
    }

    #[test]
    fn float_parsing_follows_python() {
        assert_eq!(py_float(" 1_000.5 \n"), Some(1000.5));
        assert_eq!(py_float("-Infinity"), Some(f64::NEG_INFINITY));
        assert_eq!(py_float("+inf"), Some(f64::INFINITY));
        assert!(py_float("nan").unwrap().is_nan());
        assert_eq!(py_float("1.e5"), Some(1e5));
        assert_eq!(py_float(".5"), Some(0.5));
        for bad in [
            "1__0", "_1", "1_", "1 2", "--1", "", "0x10", "e5", "infx", "1,5",
        ] {
            assert_eq!(py_float(bad), None, "{bad:?}");
        }
    }

    /// The stages, each on a case only it accepts.
    #[test]
    fn stdout_stages() {
        // (1) stripped text; stripped lines.
        assert!(stdout_matches("  3\n\n", "3\n"));
        assert!(stdout_matches("1 2  \n3\n", "1 2\n3"));
        // (2) a single line equal to the expected text as given (also caught by (1)).
        assert!(stdout_matches("x \n", "x "));
        // (3) blank lines in the output; blank and indented lines in the expected text.
        assert!(stdout_matches("a\n\nb\n", "a\nb"));
        assert!(stdout_matches("a\nb", "\n  a  \n\n b\n"));
        // (4) floats line by line.
        assert!(stdout_matches("0.3333333\n", "0.33333333"));
        assert!(stdout_matches("1.0\n-2\n", "1\n-2.000000001"));
        assert!(stdout_matches("1e3\n", "1000.0"));
        assert!(!stdout_matches("0.34\n", "0.33"));
        // Digit strings must match exactly: no leading zeros.
        assert!(!stdout_matches("007\n", "7"));
        assert!(!stdout_matches("YES", "NO"));
        assert!(!stdout_matches("", "1"));
        assert!(stdout_matches("", "\n"));
    }

    /// The reference's token-set stage never succeeds, so tokens on the wrong lines fail,
    /// and numbers on one line are not compared as floats one by one.
    #[test]
    fn tokens_on_the_wrong_lines_fail() {
        assert!(!stdout_matches("1 2 3\n", "1\n2\n3\n"));
        assert!(!stdout_matches("1\n2\n3\n", "1 2 3\n"));
        assert!(!stdout_matches("b a\n", "a b\n"));
        assert!(!stdout_matches("1 2.0000001\n", "1 2\n"));
        assert!(!stdout_matches("YES NO\n", "YES\nNO"));
    }

    #[test]
    fn python_equality_on_json_values() {
        assert!(py_eq(&json!(1), &json!(1.0)));
        assert!(py_eq(&json!(true), &json!(1)));
        assert!(py_eq(&json!([false, 2]), &json!([0, 2.0])));
        assert!(!py_eq(&json!(0.1 + 0.2), &json!(0.3)));
        assert!(!py_eq(
            &json!(9_007_199_254_740_993_i64),
            &json!(9_007_199_254_740_992.0)
        ));
        assert!(!py_eq(&json!("1"), &json!(1)));
        assert!(!py_eq(&json!(null), &json!(0)));
        assert!(!py_eq(&json!([1, 2]), &json!([1, 2, 3])));
        assert!(py_eq(&json!({"a": [1, 2]}), &json!({"a": [1.0, 2]})));
        assert!(!py_eq(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(call_result_matches(&json!([1, 2]), &json!([[1, 2]])));
        assert!(call_result_matches(&json!(4), &json!([4.0])));
        // Only a one-element expected list is unwrapped.
        assert!(!call_result_matches(&json!(1), &json!([1, 2])));
    }
}
