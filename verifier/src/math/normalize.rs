//! String normalisation of an answer before it is parsed (spec 8.2 step B, the
//! PRM800K/Hendrycks rules): presentation-only LaTeX, units, degrees, percent, currency,
//! thousands separators, trailing periods and unicode symbols are removed or rewritten, so
//! that only the mathematical content is left.

use regex::Regex;
use std::sync::LazyLock;

/// What an answer that is malformed on purpose normalises to: it matches only itself.
pub const UNREADABLE: &str = "\\unreadable";

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
        r"sq|square|cubic|percent|percentage|pct|per cent|%)(\^\{?[23]\}?|\^[23])?\.?$"
    ))
    .expect("valid regex")
});
static TRAILING_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(.*?[0-9})])\s+([a-zA-Z][a-zA-Z ./]*(\^\{?[23]\}?)?)\.?$").expect("valid regex")
});
static GLUED_UNIT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(.*?[0-9])([a-zA-Z]{3,})\.?$").expect("valid regex"));
static THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?\d{1,3}((,\d{3})+|( \d{3})+)(\.\d+)?$").expect("valid regex"));
static MIXED_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([-+]?)(\d{1,3}(?: \d{3})+|\d+)(?: *\\frac(?:\{(\d+)\}\{(\d+)\}|(\d)(\d))| +(\d+)/(\d+))$")
        .expect("valid regex")
});
static PAREN_SUBSCRIPT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"_\(([^()]*)\)").expect("valid regex"));
static GREEK_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(\\?)(?-u:\b)(alpha|beta|gamma|delta|epsilon|theta|lambda|sigma|tau|phi|omega)(?-u:\b)",
    )
    .expect("valid regex")
});
static GLUED_OR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(\d)or([A-Z(\[-])").expect("valid regex"));
static SPOKEN_LIST: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\s*,?\s+(?:or|and)\s+").expect("valid regex"));
static BASE_SUBSCRIPT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([0-9A-Fa-f]+)_\{?(\d+)\}?$").expect("valid regex"));

/// Trigonometric functions, whose arguments in degrees must be converted to radians.
const TRIG: [&str; 6] = ["\\sin", "\\cos", "\\tan", "\\sec", "\\csc", "\\cot"];

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
    s = single_backslash_commands(&s);
    s = join_digit_groups(&s);
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
        ("\u{2260}", "\\ne "),
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
        "\\space",
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
    s = s
        .replace("\\neq", "\\ne")
        .replace("!=", "\\ne ")
        .replace("=/=", "\\ne ")
        .replace("<>", "\\ne ");
    if s.contains("_(") {
        // `a_(n+1)`: a subscript in parentheses.
        s = PAREN_SUBSCRIPT.replace_all(&s, "_{$1}").into_owned();
    }
    if s.bytes().any(|b| b.is_ascii_alphabetic()) {
        // `theta`, `phi`: a Greek letter spelled out.
        s = GREEK_NAME
            .replace_all(&s, |c: &regex::Captures| format!("\\{}", &c[2]))
            .into_owned();
    }
    s = s
        .replace("\\leqslant", "\\le")
        .replace("\\geqslant", "\\ge");
    s = replace_command(&s, "\\lt", "<");
    s = replace_command(&s, "\\gt", ">");
    for reals in ["\\mathbb{R}", "\\mathbb R", "\u{211d}"] {
        // The real line, the interval a reader writes for it.
        s = s.replace(reals, "(-\\infty,\\infty)");
    }
    // Degrees, percent, currency. Inside a trigonometric function a degree is an angle unit
    // that changes the value: `\sin(90^\circ - x)` is `\cos x`.
    if s.contains("\\circ") && TRIG.iter().any(|f| s.contains(f)) {
        for deg in ["^{\\circ}", "^\\circ"] {
            s = s.replace(deg, "(\\pi/180)");
        }
    }
    for deg in ["^{\\circ}", "^\\circ", "{}^\\circ", "\\circ", "\\degree"] {
        s = s.replace(deg, "");
    }
    for pct in ["\\%", "%", "\\$", "$"] {
        s = s.replace(pct, "");
    }
    s = s.replace("{,}", "").replace("{, }", "");
    s = unwrap_text(&s);
    for dots in ["\\cdots", "\\dots", "..."] {
        // `1, 2, 3, ...` goes on: an ellipsis is an item of the list, not a full stop.
        if let Some(head) = s.trim_end().strip_suffix(dots) {
            s = format!("{head}\\ldots");
        }
    }
    s = s.trim().trim_end_matches(['.', ';']).trim().to_string();
    s = strip_trailing_unit(&s);
    if THOUSANDS.is_match(&s) {
        s = s.replace([',', ' '], "");
    }
    if let Some(c) = MIXED_NUMBER.captures(&s) {
        // A careful reader sees 2\frac{1}{2}, 2\frac12 and 2 1/2 as two and a half, not as
        // 2 times 1/2.
        let group = |a: usize, b: usize, d: usize| c.get(a).or(c.get(b)).or(c.get(d));
        if let (Some(num), Some(den)) = (group(3, 5, 7), group(4, 6, 8)) {
            let proper = match (num.as_str().parse::<u64>(), den.as_str().parse::<u64>()) {
                (Ok(n), Ok(d)) => n < d,
                _ => false,
            };
            s = if proper {
                format!(
                    "{}({}+\\frac{{{}}}{{{}}})",
                    c[1].trim_start_matches('+'),
                    c[2].replace(' ', ""),
                    num.as_str(),
                    den.as_str()
                )
            } else {
                // `11 7/6`, `4 4/0`: the fraction of a mixed number is proper, so this is not
                // one, and reading it as a product or a sum would credit a guess.
                UNREADABLE.to_string()
            };
        }
    }
    for glued in [")or(", "]or[", ")or[", "]or("] {
        // `(11,7)or(7,11)`
        s = s.replace(glued, &format!("{},{}", &glued[..1], &glued[3..]));
    }
    if s.contains("or") {
        // `W(x)=1orW(x)=-1`: "or" glued between a number and the next answer.
        s = GLUED_OR.replace_all(&s, "$1,$2").into_owned();
    }
    if s.contains(" or ") || s.contains(" and ") || s.contains(" OR ") || s.contains(" AND ") {
        // "1 or 2", "x = 1 and x = 2": the spoken list of several answers.
        s = SPOKEN_LIST.replace_all(&s, ";").into_owned();
        if !s.split(';').all(|g| g.contains(',') && g.contains('=')) {
            s = s.replace(';', ",");
        }
    }
    if s.contains(';') && !s.contains("\\begin") {
        let groups: Vec<&str> = s.split(';').collect();
        if groups.iter().all(|g| g.contains(',') && g.contains('=')) {
            // `p=5,q=2;p=7,q=2`: each group is one solution, a tuple of labelled values.
            s = groups
                .iter()
                .map(|g| format!("({})", g.trim()))
                .collect::<Vec<_>>()
                .join(",");
        }
    }
    if s.contains(';') && !s.contains("\\begin") {
        // "1; 2; 3": semicolons separate the items of a list like commas.
        s = s.replace(';', ",");
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
                    " and ".to_string()
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

/// "12 cm", "5 square units", "10weeks" → the number. A unit glued to the number needs three
/// letters or more: "10m" may be 10 times m, "10weeks" cannot be anything but ten weeks.
fn strip_trailing_unit(s: &str) -> String {
    for re in [&TRAILING_UNIT, &GLUED_UNIT] {
        if let Some(c) = re.captures(s) {
            if is_unit(&c[2]) {
                return c[1].trim().to_string();
            }
        }
    }
    s.to_string()
}

/// `\\frac` → `\frac`: answers that went through one JSON or Python escape too many double
/// the backslash of every command. A doubled backslash followed by a command name (a row break
/// is followed by a space, a digit or a sign in the answers we see) is read as one.
fn single_backslash_commands(s: &str) -> String {
    const COMMANDS: [&str; 22] = [
        "frac", "dfrac", "tfrac", "sqrt", "left", "right", "begin", "end", "pi", "cdot", "times",
        "infty", "text", "boxed", "le", "ge", "leq", "geq", "neq", "in", "cup", "cap",
    ];
    if !s.contains("\\\\") {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find("\\\\") {
        let after = &rest[p + 2..];
        let name_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        out.push_str(&rest[..p]);
        if COMMANDS.contains(&&after[..name_len]) {
            out.push('\\');
        } else {
            out.push_str("\\\\");
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `32,\! 349` and `11,\!111` → digits without the separator: a comma followed by a thin-space
/// command between digit groups is a thousands separator, never a list comma.
fn join_digit_groups(s: &str) -> String {
    if !s.contains(",\\!") {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find(",\\!") {
        let after = rest[p + 3..].trim_start();
        let digit_before = rest[..p].ends_with(|c: char| c.is_ascii_digit());
        let group = after.bytes().take_while(u8::is_ascii_digit).count() == 3;
        out.push_str(&rest[..p]);
        if !(digit_before && group) {
            out.push_str(",\\!");
        }
        rest = if digit_before && group {
            after
        } else {
            &rest[p + 3..]
        };
    }
    out.push_str(rest);
    out
}

/// Replaces the command `cmd` (like `\lt`) when no letter follows it (so `\ltimes` stays).
fn replace_command(s: &str, cmd: &str, with: &str) -> String {
    if !s.contains(cmd) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find(cmd) {
        let after = &rest[p + cmd.len()..];
        out.push_str(&rest[..p]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(cmd);
        } else {
            out.push_str(with);
        }
        rest = after;
    }
    out.push_str(rest);
    out
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
