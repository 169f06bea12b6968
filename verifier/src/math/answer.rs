//! The shape of an answer (number, equation, tuple, interval, set, matrix, text) and the
//! equivalence a careful mathematician applies to two of them.

use super::eval::{eval, exact};
use super::expr::{is_wordy, parse_expr, Expr};
use super::normalize::text_key;
use super::number::{close, Complex, Rational};
use regex::Regex;
use std::ops::Div;
use std::sync::LazyLock;

/// Most elements in one tuple, set or matrix that are compared.
const MAX_ITEMS: usize = 64;
/// Deepest nesting of structures (a set of tuples of intervals...).
const MAX_NESTING: usize = 6;
/// Points at which expressions with variables are compared.
const POINTS: usize = 5;
/// Relative tolerance when a rounded decimal is involved (spec 8.2, kept on purpose).
const DECIMAL_TOL: f64 = 1e-4;
/// Relative tolerance for exact expressions evaluated in floating point (rounding noise only).
const EXACT_TOL: f64 = 1e-9;

static LABEL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([a-zA-Z]|\\[a-zA-Z]+)(_\{?[0-9a-zA-Z]+\}?)?(\([^()]*\))?('*)$")
        .expect("valid regex")
});

/// Names of geometric objects a reference may carry: `AB`, `|AB|`, `\overline{AB}`,
/// `\angle ABC`, `m\angle A`, `S_{MBCN}`.
static GEOMETRIC_LABEL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"^(?:[A-Z]{1,4}|\|[A-Z]{1,4}\||\\overline\{[A-Z]{1,4}\}|(?:m\s*)?\\angle\s*\{?[A-Z]{1,3}\}?|",
        r"[A-Z]_\{?[A-Za-z0-9]{1,6}\}?)$"
    ))
    .expect("valid regex")
});

static LABEL_FRACTION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\\frac\{([^{}]+)\}\{([^{}]+)\}$").expect("valid regex"));

/// `x`, `f(x)`, `a_n`, `\theta`, `AB`, `|AB|`, a ratio of those like `S_{MBCN}:S`, or a tuple of
/// those like `(x, y)`.
fn is_label(s: &str) -> bool {
    if LABEL.is_match(s) || GEOMETRIC_LABEL.is_match(s) {
        return true;
    }
    let ratio = split_top(s, ':');
    if ratio.len() > 1 {
        return ratio.iter().all(|p| is_label(p.trim()));
    }
    if let Some(c) = LABEL_FRACTION.captures(s) {
        // `\frac{NO}{BO}`: a ratio of lengths, named by its segments.
        return GEOMETRIC_LABEL.is_match(&c[1]) && GEOMETRIC_LABEL.is_match(&c[2]);
    }
    s.len() >= 2
        && s.starts_with('(')
        && s.ends_with(')')
        && encloses(s, 0)
        && split_top(&s[1..s.len() - 1], ',')
            .iter()
            .all(|p| LABEL.is_match(p.trim()))
}

/// A relation operator, with `>` and `\ge` stored flipped as `<` and `\le`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelOp {
    Eq,
    Lt,
    Le,
    Ne,
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// One expression.
    Scalar(Expr),
    /// `x = 5`, `f(x) = x^2`: a name given to a value.
    Labeled { label: String, value: Box<Answer> },
    /// `2x + y = 3`, `x > 2`: a relation between expressions.
    Relation { op: RelOp, lhs: Expr, rhs: Expr },
    /// `(1, 2)`, `[0, 1)`, `\langle 1, 2 \rangle`: ordered, brackets matter.
    Tuple {
        open: char,
        close: char,
        items: Vec<Answer>,
    },
    /// `\{1, 2\}`: unordered.
    Set(Vec<Answer>),
    /// `1, 2`: a bare list, compared unordered (the solutions of an equation).
    List(Vec<Answer>),
    /// `(-\infty, 1) \cup (2, \infty)`.
    Union(Vec<Answer>),
    /// Rows of a matrix.
    Matrix(Vec<Vec<Answer>>),
    /// Anything else, by its loose text form.
    Text(String),
}

/// Parses a normalised answer string.
pub fn parse_answer(s: &str) -> Answer {
    parse_at(s.trim(), 0)
}

fn parse_at(s: &str, depth: usize) -> Answer {
    if depth > MAX_NESTING {
        return Answer::Text(text_key(s));
    }
    let s = s.trim();
    if matches!(s, "\\emptyset" | "\\varnothing" | "\\{\\}" | "{}") {
        return Answer::Set(Vec::new());
    }
    let approx = split_top_str(s, "\\approx");
    if approx.len() > 1 {
        // `x \approx 11` gives the value 11; `x = 1/3 \approx 0.33` gives the exact 1/3, the
        // approximation being a gloss on it.
        let first = approx[0].trim();
        let chosen = if is_label(first) || first.is_empty() {
            approx[approx.len() - 1]
        } else {
            first
        };
        return parse_at(chosen, depth + 1);
    }
    if let Some(rows) = matrix_rows(s) {
        return Answer::Matrix(
            rows.iter()
                .map(|r| r.iter().map(|c| parse_at(c, depth + 1)).collect())
                .collect(),
        );
    }
    let union = split_top_multi(s, &["\\cup", " U "]);
    if union.len() > 1 {
        return Answer::Union(items(&union, depth));
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        if encloses(s, 1) {
            return Answer::Set(items(&split_top(inner, ','), depth));
        }
    }
    if let Some(inner) = s
        .strip_prefix("\\langle")
        .and_then(|r| r.strip_suffix("\\rangle"))
    {
        return Answer::Tuple {
            open: '<',
            close: '>',
            items: items(&split_top(inner, ','), depth),
        };
    }
    let first = s.chars().next().unwrap_or(' ');
    let last = s.chars().last().unwrap_or(' ');
    if s.len() >= 2
        && matches!(first, '(' | '[' | '{')
        && matches!(last, ')' | ']' | '}')
        && encloses(s, 0)
    {
        let inner = &s[1..s.len() - 1];
        let parts = split_top(inner, ',');
        if parts.len() > 1 {
            if first == '{' && last == '}' {
                // Unescaped braces only group in LaTeX: `{1,3}` shows as `1,3`, a list.
                return Answer::List(items(&parts, depth));
            }
            return Answer::Tuple {
                open: first,
                close: last,
                items: items(&parts, depth),
            };
        }
    }
    let parts: Vec<&str> = split_top(s, ',')
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .collect();
    if parts.len() > 1 {
        return Answer::List(items(&parts, depth));
    }
    if let [single] = parts[..] {
        if single.len() < s.len() {
            // `7, ` or `, 5`: an empty item left by a removed "and".
            return parse_at(single, depth + 1);
        }
    }
    if let Some(rel) = relation(s, depth) {
        return rel;
    }
    let ratio = split_top(s, ':');
    if ratio.len() > 1 && ratio.iter().all(|p| !p.trim().is_empty()) {
        // `7:32`: a ratio, its terms in order.
        return Answer::Tuple {
            open: ':',
            close: ':',
            items: items(&ratio, depth),
        };
    }
    if let Some(expanded) = expand_plus_minus(s) {
        return Answer::List(expanded.iter().map(|e| parse_at(e, depth + 1)).collect());
    }
    if is_wordy(s) {
        return Answer::Text(text_key(s));
    }
    match parse_expr(s) {
        Ok(e) => Answer::Scalar(e),
        Err(_) => Answer::Text(text_key(s)),
    }
}

fn items(parts: &[&str], depth: usize) -> Vec<Answer> {
    parts
        .iter()
        .take(MAX_ITEMS + 1)
        .map(|p| parse_at(p, depth + 1))
        .collect()
}

/// `a \pm b` → [`a + b`, `a - b`] (one `\pm` or `\mp` only).
fn expand_plus_minus(s: &str) -> Option<Vec<String>> {
    let count = s.matches("\\pm").count() + s.matches("\\mp").count();
    if count != 1 {
        return None;
    }
    let (plus, minus) = if s.contains("\\pm") {
        (s.replacen("\\pm", "+", 1), s.replacen("\\pm", "-", 1))
    } else {
        (s.replacen("\\mp", "-", 1), s.replacen("\\mp", "+", 1))
    };
    Some(vec![plus, minus])
}

/// `x = 5`, `y = 2x + 3`, `x \le 3`, `a = b = 4` (a chain keeps its last value).
fn relation(s: &str, depth: usize) -> Option<Answer> {
    // `x \in [2, 5]`: membership names the value like `=` does.
    if let [lhs, rhs] = split_top_str(s, "\\in")[..] {
        if is_label(lhs.trim()) {
            return Some(Answer::Labeled {
                label: text_key(lhs.trim()),
                value: Box::new(parse_at(rhs, depth + 1)),
            });
        }
    }
    if let Some(interval) = inequality_chain(s, depth) {
        return Some(interval);
    }
    let ops: [(&str, RelOp, bool); 8] = [
        ("\\le", RelOp::Le, false),
        ("\\ge", RelOp::Le, true),
        ("\\ne", RelOp::Ne, false),
        ("<=", RelOp::Le, false),
        (">=", RelOp::Le, true),
        ("<", RelOp::Lt, false),
        (">", RelOp::Lt, true),
        ("=", RelOp::Eq, false),
    ];
    for (tok, op, flip) in ops {
        let parts = split_top_str(s, tok);
        if parts.len() < 2 {
            continue;
        }
        if op == RelOp::Eq {
            let lhs = parts[0].trim();
            let rhs = parts[parts.len() - 1].trim();
            if is_label(lhs) {
                return Some(Answer::Labeled {
                    label: text_key(lhs),
                    value: Box::new(parse_at(rhs, depth + 1)),
                });
            }
            let constant = |side: &str| parse_expr(side).is_ok_and(|e| e.variables().is_empty());
            // `\lim_{x \to 0} \frac{\sin x}{x} = 1`, `17 \bmod 5 = 2`: a computation written out
            // with its result, whose notation binds or hides its variables.
            let computation = |side: &str| {
                [
                    "\\lim", "\\bmod", "\\mod", "vmatrix", "\\det", "\\sum", "\\prod", "\\int",
                ]
                .iter()
                .any(|c| side.contains(c))
            };
            if parts.len() > 2
                || (constant(lhs) && constant(rhs))
                || (computation(lhs) && constant(rhs))
            {
                // `3 + 4 = 7`, `x = 2 + 3 = 5`: the last member is the value. `7 = 11a + c` is
                // an equation, not the value `11a + c`.
                return Some(parse_at(rhs, depth + 1));
            }
        } else if parts.len() > 2 {
            return None;
        }
        let lhs = parse_expr(parts[0]).ok()?;
        let rhs = parse_expr(parts[parts.len() - 1]).ok()?;
        let (lhs, rhs) = if flip { (rhs, lhs) } else { (lhs, rhs) };
        return Some(Answer::Relation { op, lhs, rhs });
    }
    None
}

/// `1 \le x < 3` → the interval `[1, 3)` (and `3 > x \ge 1` likewise).
fn inequality_chain(s: &str, depth: usize) -> Option<Answer> {
    const OPS: [(&str, bool, bool); 6] = [
        // (token, points "less than", strict)
        ("\\le", true, false),
        ("\\ge", false, false),
        ("<=", true, false),
        (">=", false, false),
        ("<", true, true),
        (">", false, true),
    ];
    let bytes = s.as_bytes();
    let mut found: Vec<(usize, usize, bool, bool)> = Vec::new();
    let mut depth_now = 0i32;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => depth_now += 1,
            b')' | b']' | b'}' => depth_now -= 1,
            _ => {}
        }
        let hit = (depth_now == 0 && s.is_char_boundary(i))
            .then(|| {
                OPS.iter().find(|(tok, _, _)| {
                    s[i..].starts_with(tok)
                        && !(tok.starts_with('\\')
                            && bytes
                                .get(i + tok.len())
                                .is_some_and(u8::is_ascii_alphabetic))
                })
            })
            .flatten();
        match hit {
            Some((tok, less, strict)) => {
                found.push((i, tok.len(), *less, *strict));
                i += tok.len();
            }
            None => i += 1,
        }
    }
    let [(p1, l1, less1, strict1), (p2, l2, less2, strict2)] = found[..] else {
        return None;
    };
    let middle = s[p1 + l1..p2].trim();
    let absolute = middle
        .strip_prefix('|')
        .and_then(|m| m.strip_suffix('|'))
        .is_some_and(|m| LABEL.is_match(m.trim()));
    if less1 != less2 || !(LABEL.is_match(middle) || absolute) {
        return None;
    }
    let (a, b) = (s[..p1].trim(), s[p2 + l2..].trim());
    let (low, high, low_strict, high_strict) = if less1 {
        (a, b, strict1, strict2)
    } else {
        (b, a, strict2, strict1)
    };
    let interval = |low: Answer, high: Answer, low_strict: bool, high_strict: bool| Answer::Tuple {
        open: if low_strict { '(' } else { '[' },
        close: if high_strict { ')' } else { ']' },
        items: vec![low, high],
    };
    if !absolute {
        return Some(interval(
            parse_at(low, depth + 1),
            parse_at(high, depth + 1),
            low_strict,
            high_strict,
        ));
    }
    // `1 \le |z| \le 2`: the two mirrored intervals `[-2, -1] \cup [1, 2]`, for a positive
    // lower bound (from zero the two would join into one).
    let (low, high) = (parse_expr(low).ok()?, parse_expr(high).ok()?);
    if exact(&low).is_none_or(|v| v.numer() <= 0) {
        return None;
    }
    let neg = |e: &Expr| Answer::Scalar(Expr::Neg(Box::new(e.clone())));
    Some(Answer::Union(vec![
        interval(neg(&high), neg(&low), high_strict, low_strict),
        interval(
            Answer::Scalar(low),
            Answer::Scalar(high),
            low_strict,
            high_strict,
        ),
    ]))
}

/// `x < 3` → `(-\infty, 3)`, `x \ge 1` → `[1, \infty)`: a one-variable inequality as the
/// interval it describes.
fn relation_as_interval(a: &Answer) -> Option<Answer> {
    let Answer::Relation { op, lhs, rhs } = a else {
        return None;
    };
    let strict = match op {
        RelOp::Lt => true,
        RelOp::Le => false,
        _ => return None,
    };
    let infinity = |negative: bool| {
        Answer::Scalar(if negative {
            Expr::Neg(Box::new(Expr::Infinity))
        } else {
            Expr::Infinity
        })
    };
    if lhs.is_variable() && rhs.variables().is_empty() {
        // x < b
        Some(Answer::Tuple {
            open: '(',
            close: if strict { ')' } else { ']' },
            items: vec![infinity(true), Answer::Scalar(rhs.clone())],
        })
    } else if rhs.is_variable() && lhs.variables().is_empty() {
        // a < x
        Some(Answer::Tuple {
            open: if strict { '(' } else { '[' },
            close: ')',
            items: vec![Answer::Scalar(lhs.clone()), infinity(false)],
        })
    } else {
        None
    }
}

/// Rows and cells of `\begin{pmatrix} a & b \\ c & d \end{pmatrix}` (also bmatrix, array).
fn matrix_rows(s: &str) -> Option<Vec<Vec<&str>>> {
    // `\left[\begin{array}{cc}..\end{array}\right]` (the `\left`/`\right` are gone by now) and
    // `(\begin{pmatrix}..\end{pmatrix})`: the outer brackets only draw the matrix.
    let s = match (s.chars().next(), s.chars().last()) {
        (Some('[' | '('), Some(']' | ')')) if s[1..].trim_start().starts_with("\\begin{") => {
            s[1..s.len() - 1].trim()
        }
        _ => s,
    };
    let rest = s.strip_prefix("\\begin{")?;
    let env_end = rest.find('}')?;
    let env = &rest[..env_end];
    if !matches!(
        env,
        "pmatrix" | "bmatrix" | "Bmatrix" | "matrix" | "smallmatrix" | "array" | "cases"
    ) {
        return None;
    }
    let mut body = rest[env_end + 1..].strip_suffix(&format!("\\end{{{env}}}"))?;
    if env == "array" {
        let spec_end = body.trim_start().strip_prefix('{')?.find('}')?;
        body = &body.trim_start()[spec_end + 2..];
    }
    let rows: Vec<Vec<&str>> = body
        .split("\\\\")
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.split('&').map(str::trim).collect())
        .collect();
    (!rows.is_empty() && rows.len() <= MAX_ITEMS && rows.iter().all(|r| r.len() <= MAX_ITEMS))
        .then_some(rows)
}

/// Whether the bracket opened at the start of `s` closes at its very end. `skip` extra
/// leading characters (the `\` of `\{`) are ignored.
fn encloses(s: &str, skip: usize) -> bool {
    let mut depth = 0i32;
    let n = s.len();
    for (i, c) in s.char_indices().skip(skip) {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 && i + c.len_utf8() < n {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// Splits `s` at `sep` occurrences outside any bracket.
fn split_top(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Splits `s` at a multi-character separator outside brackets. A separator that is a prefix
/// of a longer command (`\le` in `\left`) does not count, nor `<`/`>` next to `=`.
fn split_top_str<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth == 0 && s.is_char_boundary(i) && s[i..].starts_with(sep) {
            let end = i + sep.len();
            let letter_follows =
                sep.starts_with('\\') && bytes.get(end).is_some_and(|b| b.is_ascii_alphabetic());
            let part_of_compound = (sep == "<" || sep == ">" || sep == "=")
                && (bytes.get(end) == Some(&b'=')
                    || (sep == "=" && i > 0 && matches!(bytes[i - 1], b'<' | b'>' | b'!')));
            if !letter_follows && !part_of_compound {
                parts.push(&s[start..i]);
                start = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
}

fn split_top_multi<'a>(s: &'a str, seps: &[&str]) -> Vec<&'a str> {
    seps.iter()
        .map(|sep| split_top_str(s, sep))
        .find(|p| p.len() > 1)
        .unwrap_or_else(|| vec![s])
}

/// Whether `pred` is a correct answer when `gt` is the reference.
pub fn equivalent(gt: &Answer, pred: &Answer) -> bool {
    use Answer::*;
    match (gt, pred) {
        (
            Labeled {
                label: l1,
                value: v1,
            },
            Labeled {
                label: l2,
                value: v2,
            },
        ) => {
            if l1 == l2 || names_same_function(l1, l2) {
                return equivalent(v1, v2);
            }
            // `y = 2x + 3` vs `x = (y - 3)/2`: the same equation solved for another variable.
            match (as_relation(gt), as_relation(pred)) {
                (Some(a), Some(b)) => relations_equivalent(&a, &b),
                _ => false,
            }
        }
        (Labeled { .. }, Relation { .. }) | (Relation { .. }, Labeled { .. }) => {
            match (as_relation(gt), as_relation(pred)) {
                (Some(a), Some(b)) => relations_equivalent(&a, &b),
                _ => false,
            }
        }
        (Labeled { value, .. }, other) => equivalent(value, other),
        (other, Labeled { value, .. }) => equivalent(other, value),
        (Relation { .. }, Relation { .. }) => match (as_relation(gt), as_relation(pred)) {
            (Some(a), Some(b)) => relations_equivalent(&a, &b),
            _ => false,
        },
        (Scalar(a), Scalar(b)) => scalars_equivalent(a, b),
        (Relation { .. }, Tuple { .. }) => {
            relation_as_interval(gt).is_some_and(|g| equivalent(&g, pred))
        }
        (Tuple { .. }, Relation { .. }) => {
            relation_as_interval(pred).is_some_and(|p| equivalent(gt, &p))
        }
        // A one-element set written as its element.
        (Set(items), Scalar(_)) if items.len() == 1 => equivalent(&items[0], pred),
        (Scalar(_), Set(items)) if items.len() == 1 => equivalent(gt, &items[0]),
        (
            Tuple {
                open: o1,
                close: c1,
                items: i1,
            },
            Tuple {
                open: o2,
                close: c2,
                items: i2,
            },
        ) => o1 == o2 && c1 == c2 && ordered(i1, i2),
        (
            Tuple {
                open: '(',
                close: ')',
                items,
            },
            List(l),
        )
        | (
            List(l),
            Tuple {
                open: '(',
                close: ')',
                items,
            },
        ) => ordered(items, l),
        (Set(a) | List(a), Set(b) | List(b)) => unordered(a, b),
        (Union(a), Union(b)) => unordered(a, b),
        (Matrix(a), Matrix(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(r1, r2)| ordered(r1, r2))
        }
        (Matrix(m), Tuple { items, .. }) | (Tuple { items, .. }, Matrix(m)) => {
            // A column (or row) vector written as a tuple.
            let flat: Vec<Answer> = if m.iter().all(|r| r.len() == 1) {
                m.iter().map(|r| r[0].clone()).collect()
            } else if m.len() == 1 {
                m[0].clone()
            } else {
                return false;
            };
            ordered(&flat, items)
        }
        (Text(a), Text(b)) => a == b,
        _ => false,
    }
}

/// `y` and `f(x)` (already in text-key form) both name the function a reference gives as
/// `y = 2x + 3` or `f(x) = 2x + 3`: a single dependent variable against a function applied to
/// its argument.
fn names_same_function(a: &str, b: &str) -> bool {
    let is_application = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && s[1..].starts_with('(')
            && s.ends_with(')')
            && s.len() > 3
    };
    let is_dependent = |s: &str| matches!(s, "y" | "z" | "v" | "s");
    (is_application(a) && (is_dependent(b) || is_application(b)))
        || (is_application(b) && is_dependent(a))
}

fn ordered(a: &[Answer], b: &[Answer]) -> bool {
    a.len() == b.len() && a.len() <= MAX_ITEMS && a.iter().zip(b).all(|(x, y)| equivalent(x, y))
}

/// Multiset equality under [`equivalent`], by greedy matching (equivalence is transitive, so
/// greedy is exact up to tolerance effects). Lists of different lengths compare as sets: an
/// answer that repeats one of its solutions still names the same solutions.
fn unordered(a: &[Answer], b: &[Answer]) -> bool {
    if a.len() > MAX_ITEMS || b.len() > MAX_ITEMS {
        return false;
    }
    if a.len() != b.len() {
        let (a, b) = (distinct(a), distinct(b));
        return a.len() == b.len() && !a.is_empty() && unordered(&a, &b);
    }
    let mut used = vec![false; b.len()];
    a.iter().all(
        |x| match (0..b.len()).find(|&j| !used[j] && equivalent(x, &b[j])) {
            Some(j) => {
                used[j] = true;
                true
            }
            None => false,
        },
    )
}

/// The items of `items` that are not equivalent to an earlier one.
fn distinct(items: &[Answer]) -> Vec<Answer> {
    let mut out: Vec<Answer> = Vec::with_capacity(items.len());
    for item in items {
        if !out.iter().any(|o| equivalent(o, item)) {
            out.push(item.clone());
        }
    }
    out
}

/// Values of the variables at one sample point.
type Point = Vec<(String, Complex)>;

/// A relation as (op, lhs - rhs).
fn as_relation(a: &Answer) -> Option<(RelOp, Expr)> {
    match a {
        Answer::Relation { op, lhs, rhs } => {
            Some((*op, Expr::Sub(Box::new(lhs.clone()), Box::new(rhs.clone()))))
        }
        Answer::Labeled { label, value } => match value.as_ref() {
            Answer::Scalar(rhs) => {
                let lhs = parse_expr(label).ok()?;
                Some((RelOp::Eq, Expr::Sub(Box::new(lhs), Box::new(rhs.clone()))))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Two relations are equivalent when their `lhs - rhs` differ by a constant factor: any
/// non-zero factor for `=` and `\ne`, a positive one for inequalities.
fn relations_equivalent(a: &(RelOp, Expr), b: &(RelOp, Expr)) -> bool {
    if a.0 != b.0 {
        return false;
    }
    let tol = if a.1.has_decimal() || b.1.has_decimal() {
        DECIMAL_TOL
    } else {
        1e-7
    };
    let vars = union_vars(&a.1, &b.1);
    let mut ratios: Vec<(Complex, Point)> = Vec::new();
    let mut zeros = 0;
    for point in points(&vars, POINTS) {
        let (Ok(x), Ok(y)) = (eval(&a.1, &point), eval(&b.1, &point)) else {
            continue;
        };
        let (xz, yz) = (x.abs() < 1e-12, y.abs() < 1e-12);
        if xz && yz {
            zeros += 1;
            continue;
        }
        if xz != yz {
            return false;
        }
        ratios.push((x.div(y), point));
    }
    let constant = |scale: &dyn Fn(&Point) -> Complex| {
        let mut first: Option<Complex> = None;
        for (r, point) in &ratios {
            let r = r.div(scale(point));
            match first {
                None => first = Some(r),
                Some(r0) if !close(r0, r, tol) => return None,
                _ => {}
            }
        }
        first
    };
    let mut ratio = constant(&|_| Complex::real(1.0));
    if ratio.is_none() && a.0 == RelOp::Eq {
        // `(y+5)/x = 2` against `y = 2x - 5`: the same equation multiplied through by a variable
        // that one of them divides by (so it is not zero where that equation is defined).
        let mut divisors = a.1.divisor_variables();
        divisors.extend(b.1.divisor_variables());
        ratio = divisors.iter().find_map(|v| {
            [1.0, -1.0].into_iter().find_map(|k| {
                constant(&|point: &Point| {
                    let x = point
                        .iter()
                        .find(|(n, _)| n == v)
                        .map_or(1.0, |(_, c)| c.re);
                    Complex::real(x.powf(k))
                })
            })
        });
    }
    let valid = ratios.len();
    if valid == 0 && a.0 == b.0 && zeros >= 2 {
        // Both hold identically (`\sin^2 x + \cos^2 x = 1`): the same statement.
        return true;
    }
    match ratio {
        Some(r) if valid >= 2 || vars.is_empty() => {
            a.0 == RelOp::Eq || a.0 == RelOp::Ne || (r.re > 0.0 && r.im.abs() < 1e-9)
        }
        _ => false,
    }
}

/// Whether two scalar expressions are equal: integers exactly, rationals exactly, rounded
/// decimals within 1e-4 relative, everything else by evaluation (at random points when there
/// are variables).
pub fn scalars_equivalent(gt: &Expr, pred: &Expr) -> bool {
    let decimal = gt.has_decimal() || pred.has_decimal();
    let gt_exact = exact(gt);
    if let (Some(a), Some(b)) = (gt_exact, exact(pred)) {
        if a == b {
            return true;
        }
        if a.is_integer() {
            return false;
        }
        if rounds_to(gt, b.to_f64()) && !pred.has_decimal() {
            return true;
        }
        if !decimal {
            return false;
        }
        return close(
            Complex::real(a.to_f64()),
            Complex::real(b.to_f64()),
            DECIMAL_TOL,
        );
    }
    let tol = if gt_exact.is_some_and(|a| a.is_integer()) {
        EXACT_TOL
    } else if decimal {
        DECIMAL_TOL
    } else {
        EXACT_TOL
    };
    let vars = union_vars(gt, pred);
    if !decimal && !vars.is_empty() && differ_exactly(gt, pred, &vars) {
        return false;
    }
    if disagree_on_negatives(gt, pred, &vars) {
        return false;
    }
    let real_expressions = !gt.has_imaginary() && !pred.has_imaginary();
    let mut valid = 0;
    // More candidates than needed: points where a side is undefined or off the real line are
    // replaced by later ones.
    for point in points(&vars, 4 * POINTS) {
        match (eval(gt, &point), eval(pred, &point)) {
            (Ok(a), Ok(b)) => {
                if a.is_finite() != b.is_finite() {
                    return false;
                }
                let same = if a.is_finite() {
                    close(a, b, tol)
                } else {
                    a.re == b.re && a.im == b.im
                };
                if !same {
                    if real_expressions && off_real_line(a) && off_real_line(b) {
                        // Both off the real line (`((x-2)^3)^k` against `(x-2)^{3k}` for
                        // `x < 2`): the principal complex branches may differ where the real
                        // functions are undefined, so the point says nothing.
                        continue;
                    }
                    return false;
                }
                valid += 1;
                if valid == POINTS {
                    break;
                }
            }
            (Err(_), Err(_)) => {}
            _ => return false,
        }
    }
    valid >= if vars.is_empty() { 1 } else { 3 }
}

/// Whether `gt` is a decimal literal with at least three decimals (so evidently rounded) and
/// `value` rounds to it: `0.0833` for an exact `\frac{1}{12}`.
fn rounds_to(gt: &Expr, value: f64) -> bool {
    let Some(places) = gt.decimal_places() else {
        return false;
    };
    if places < 3 {
        return false;
    }
    let Some(g) = exact(gt) else {
        return false;
    };
    (g.to_f64() - value).abs() <= 0.5 * 10f64.powi(-(places as i32)) * (1.0 + 1e-9)
}

/// Whether the two sides take different exact values at some integer point: a polynomial whose
/// constant term is off by one in ten digits differs from the true one by less than any float
/// tolerance, but not exactly.
fn differ_exactly(gt: &Expr, pred: &Expr, vars: &[String]) -> bool {
    (0..3).any(|k| {
        let point: Vec<(String, Rational)> = vars
            .iter()
            .enumerate()
            .map(|(j, v)| (v.clone(), Rational::integer(2 + k as i128 * 3 + j as i128)))
            .collect();
        match (
            exact(&gt.substitute(&point)),
            exact(&pred.substitute(&point)),
        ) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        }
    })
}

/// Whether the two sides are both real but different at a point with negative values: the
/// sampled positive points cannot tell `\sqrt{x^2}` from `x`. Points where either side is not
/// real (`\ln x`, `x^{1/2}` for negative `x`) say nothing.
fn disagree_on_negatives(gt: &Expr, pred: &Expr, vars: &[String]) -> bool {
    if vars.is_empty() {
        return false;
    }
    (0..3).any(|k| {
        let exact_point: Vec<(String, Rational)> = vars
            .iter()
            .enumerate()
            .map(|(j, v)| (v.clone(), Rational::integer(-1 - k as i128 * 2 - j as i128)))
            .collect();
        if let (Some(a), Some(b)) = (
            exact(&gt.substitute(&exact_point)),
            exact(&pred.substitute(&exact_point)),
        ) {
            return a != b;
        }
        let x = [-0.7, -1.9, -2.6][k];
        let point: Vec<(String, Complex)> = vars
            .iter()
            .enumerate()
            .map(|(j, v)| (v.clone(), Complex::real(x - 0.13 * j as f64)))
            .collect();
        match (eval(gt, &point), eval(pred, &point)) {
            (Ok(a), Ok(b)) => {
                let real = |c: Complex| c.im.abs() <= 1e-9 * c.re.abs().max(1.0);
                real(a) && real(b) && !close(a, b, 1e-6)
            }
            _ => false,
        }
    })
}

/// Whether a value has a non-negligible imaginary part.
fn off_real_line(c: Complex) -> bool {
    c.im.abs() > 1e-9 * c.re.abs().max(1.0)
}

fn union_vars(a: &Expr, b: &Expr) -> Vec<String> {
    let mut v = a.variables();
    v.extend(b.variables());
    v.sort();
    v.dedup();
    v.truncate(12);
    v
}

/// Deterministic pseudo-random points: the same variable gets the same values on both sides.
fn points(vars: &[String], count: usize) -> impl Iterator<Item = Point> + '_ {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let count = if vars.is_empty() { 1 } else { count };
    (0..count).map(move |_| {
        vars.iter()
            .map(|v| (v.clone(), Complex::real(0.35 + 2.5 * next())))
            .collect()
    })
}
