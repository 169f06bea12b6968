//! String normalisation of an answer before it is parsed (spec 8.2 step B, the
//! PRM800K/Hendrycks rules): presentation-only LaTeX, units, degrees, percent, currency,
//! thousands separators, trailing periods and unicode symbols are removed or rewritten, so
//! that only the mathematical content is left.

use regex::Regex;
use std::sync::LazyLock;

/// Stand-in for `\\` while spacing commands are removed.
const ROW_BREAK: &str = "\u{1}";

static TEXT_WRAPPER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|textnormal|operatorname)\s*\{([^{}]*)\}(\^\{?[23]\}?)?")
        .expect("valid regex")
});
static UNIT_WORDS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?i)^(square |sq\.? |cubic )?(units?|dollars?|cents?|degrees?|radians?|",
        r"cm|centimeters?|centimetres?|mm|millimeters?|km|kilometers?|kilometres?|meters?|metres?|",
        r"inch(es)?|in|feet|foot|ft|yards?|yd|miles?|mi|mph|kph|km/h|m/s|",
        r"seconds?|sec|s|minutes?|min|mins|hours?|hrs?|h|days?|weeks?|months?|years?|",
        r"liters?|litres?|l|ml|gallons?|kg|kilograms?|grams?|g|mg|pounds?|lbs?|ounces?|oz|",
        r"people|persons?|students?|ways|times|points?|pages?|books?|apples?|marbles?|",
        r"sq|square|cubic|percent|per cent|%)(\^\{?[23]\}?|\^[23])?\.?$"
    ))
    .expect("valid regex")
});
static TRAILING_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(.*?[0-9})])\s+([a-zA-Z][a-zA-Z ./]*(\^\{?[23]\}?)?)\.?$").expect("valid regex")
});
static THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$").expect("valid regex"));
static MIXED_NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$").expect("valid regex"));
static BASE_SUBSCRIPT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([0-9A-Fa-f]+)_\{?(\d+)\}?$").expect("valid regex"));

/// Whether `s` (already trimmed) is a unit word or phrase like "cm", "square units".
pub fn is_unit(s: &str) -> bool {
    UNIT_WORDS.is_match(s.trim())
}

/// Normalises an answer string. The result keeps LaTeX structure (`\frac`, `\sqrt`, braces)
/// for the parser but none of the presentation.
pub fn normalize(answer: &str) -> String {
    let mut s = super::extract::strip_math_delimiters(answer.trim()).to_string();
    // A box inside the answer is presentation too.
    if let Some(inner) = s
        .strip_prefix("\\boxed{")
        .and_then(|r| r.strip_suffix('}'))
        .filter(|inner| super::extract::last_boxed(&s).as_deref() == Some(*inner))
    {
        s = inner.to_string();
    }
    s.retain(|c| !c.is_control() || c == '\n');
    for (from, to) in [
        ("\u{2212}", "-"),
        ("\u{2013}", "-"),
        ("\u{00d7}", "\\times "),
        ("\u{22c5}", "\\cdot "),
        ("\u{00b7}", "\\cdot "),
        ("\u{00f7}", "\\div "),
        ("\u{03c0}", "\\pi "),
        ("\u{221e}", "\\infty "),
        ("\u{221a}", "\\sqrt"),
        ("\u{222a}", "\\cup "),
        ("\u{2264}", "\\le "),
        ("\u{2265}", "\\ge "),
        ("\u{2205}", "\\emptyset "),
        ("\u{00b0}", "^\\circ"),
        ("\u{00b1}", "\\pm "),
        ("\u{00b2}", "^2"),
        ("\u{00b3}", "^3"),
    ] {
        s = s.replace(from, to);
    }
    // Presentation-only commands. A row break `\\` is protected so that removing `\ ` (a
    // space) cannot eat it.
    s = s.replace("\\\\", ROW_BREAK);
    for cmd in [
        "\\displaystyle",
        "\\left",
        "\\right",
        "\\bigl",
        "\\bigr",
        "\\Bigl",
        "\\Bigr",
        "\\big",
        "\\Big",
        "\\!",
        "\\,",
        "\\;",
        "\\:",
        "\\qquad",
        "\\quad",
        "\\ ",
        "~",
        "\\limits",
    ] {
        s = s.replace(cmd, if cmd.starts_with("\\q") { " " } else { "" });
    }
    s = s.replace(ROW_BREAK, "\\\\");
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    s = s.replace("\\cfrac", "\\frac");
    s = s.replace("\\leq", "\\le").replace("\\geq", "\\ge");
    s = s.replace("\\neq", "\\ne");
    // Degrees, percent, currency.
    for deg in ["^{\\circ}", "^\\circ", "{}^\\circ", "\\circ", "\\degree"] {
        s = s.replace(deg, "");
    }
    for pct in ["\\%", "%", "\\$", "$"] {
        s = s.replace(pct, "");
    }
    s = s.replace("{,}", "");
    s = unwrap_text(&s);
    s = s.trim().trim_end_matches(['.', ';']).trim().to_string();
    s = strip_trailing_unit(&s);
    if THOUSANDS.is_match(&s) {
        s = s.replace(',', "");
    }
    if let Some(c) = MIXED_NUMBER.captures(&s) {
        // A careful reader sees 2\frac{1}{2} as two and a half, not 2 times 1/2.
        s = format!("{}({}+\\frac{{{}}}{{{}}})", &c[1], &c[2], &c[3], &c[4]);
    }
    if let Some(c) = BASE_SUBSCRIPT.captures(&s) {
        // 1011_2: the digits are the answer; the subscript only names the base.
        s = c[1].to_string();
    }
    collapse_spaces(&s)
}

/// `\text{...}` and friends: the whole answer in text becomes its content, a unit after a
/// number is dropped, and "or"/"and" between answers become commas.
fn unwrap_text(s: &str) -> String {
    let mut out = s.to_string();
    // Nested wrappers (`\text{\textbf{A}}`) peel one level per pass; bounded.
    for _ in 0..4 {
        if !TEXT_WRAPPER.is_match(&out) {
            break;
        }
        let snapshot = out.clone();
        out = TEXT_WRAPPER
            .replace_all(&snapshot, |c: &regex::Captures| {
                let inner = c[1].trim();
                let whole = c.get(0).map(|m| m.start()).unwrap_or(0);
                let before = snapshot[..whole].trim_end();
                if inner.eq_ignore_ascii_case("or") || inner.eq_ignore_ascii_case("and") {
                    ",".to_string()
                } else if !before.is_empty() && is_unit(inner) {
                    String::new()
                } else if !before.is_empty()
                    && before.ends_with(|ch: char| ch.is_ascii_digit() || ch == '}')
                    && inner.chars().all(|ch| ch.is_alphabetic() || ch == ' ')
                {
                    // "5 \text{ apples}": any word after a number is a unit of the count.
                    String::new()
                } else {
                    let power = c.get(2).map_or("", |m| m.as_str());
                    format!(" {inner}{power} ")
                }
            })
            .into_owned();
    }
    out.trim().to_string()
}

/// "12 cm", "5 square units" → the number.
fn strip_trailing_unit(s: &str) -> String {
    if let Some(c) = TRAILING_UNIT.captures(s) {
        if is_unit(&c[2]) {
            return c[1].trim().to_string();
        }
    }
    s.to_string()
}

fn collapse_spaces(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The loosest textual form of an answer: lower case, no spaces, no braces, no backslashes,
/// used for text answers and as the last resort comparison.
pub fn text_key(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '{' | '}' | '\\'))
        .flat_map(char::to_lowercase)
        .collect()
}
