//! Finding the final answer in a model response (spec 8.2 step A).
//!
//! Leftover chat tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...) end the response:
//! whatever a model writes after them is another turn, not its answer. Then the last
//! `\boxed{...}` (or `\fbox{...}`) wins, with brace-depth counting for nested braces; boxes
//! that follow one another joined only by "and", commas or spacing (`\boxed{1} and
//! \boxed{2}`) are one answer, their list. An "answer is" / "answer:" phrase (also "réponse",
//! "答案") written after the last box takes precedence over it: the box was an intermediate
//! result. Without a box, the text after the last such phrase (or "Answer" directly followed by
//! displayed math) is taken up to the end of its sentence, and a phrase like "The largest $n$
//! is 34" keeps what follows its last "is" (spec 8.2 step A.4); a phrase in prose ("Jane
//! started 3 hours ago") gives its first number. Failing that, the final sentence states the
//! answer: its last math span, or else its last number. That sentence must be complete (end in
//! a full stop, or end with the value itself): a response cut off mid-sentence ("We have x = 7
//! and so on") has no answer and scores 0.

use regex::Regex;
use std::sync::LazyLock;

/// Longest answer (in bytes) that is graded; longer ones are treated as no answer.
pub const MAX_ANSWER_BYTES: usize = 4096;

/// The final answer of `response`, if it states one.
pub fn extract_answer(response: &str) -> Option<String> {
    let response = cut_chat_tokens(response);
    if last_box_start(response).is_some_and(|b| box_at(response, b).is_none()) {
        // The last box is cut off: the response ended before its answer.
        return None;
    }
    let boxed_at = response.rfind("\\boxed").max(response.rfind("\\fbox"));
    let phrase_after_box = answer_phrase_position(response)
        .filter(|&(p, _)| boxed_at.is_some_and(|b| p > b) && !inside_box(response, p));
    let answer = match phrase_after_box {
        Some(_) => answer_phrase(response),
        None => boxed_answer(response).or_else(|| answer_phrase(response)),
    }
    .or_else(|| final_sentence(response))?;
    let answer = answer.trim();
    if answer.is_empty() || answer.len() > MAX_ANSWER_BYTES {
        return None;
    }
    Some(answer.to_string())
}

/// Content of the last `\boxed`/`\fbox`. An unterminated last box (a cut-off response) counts
/// as no answer rather than falling back to an earlier, superseded one.
pub fn last_boxed(text: &str) -> Option<String> {
    let start = last_box_start(text)?;
    box_at(text, start).map(|(content, _)| content)
}

/// Start of the last `\boxed` or `\fbox` command in `text`.
fn last_box_start(text: &str) -> Option<usize> {
    text.rfind("\\boxed").max(text.rfind("\\fbox"))
}

/// The argument of the box command starting at `start`, and the byte offset just after it.
fn box_at(text: &str, start: usize) -> Option<(String, usize)> {
    let cmd_len = if text[start..].starts_with("\\boxed") {
        "\\boxed".len()
    } else {
        "\\fbox".len()
    };
    let rest = &text[start + cmd_len..];
    let trimmed = rest.trim_start();
    let offset = start + cmd_len + (rest.len() - trimmed.len());
    if let Some(inner) = trimmed.strip_prefix('{') {
        let mut depth = 1usize;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some((inner[..i].to_string(), offset + 1 + i + 1));
                    }
                }
                _ => {}
            }
        }
        None
    } else if rest.starts_with(' ') {
        // `\boxed 5`: the argument runs to the next space or math delimiter.
        let arg: String = trimmed
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect();
        let end = offset + arg.len();
        (!arg.is_empty()).then_some((arg, end))
    } else {
        None
    }
}

/// What may stand between boxes that together state one answer: math delimiters, spacing,
/// commas, "and"/"or" (also inside `\text{}`), a label with its equals sign (`y_2 =`) and a
/// part label (`for part (a)`, `(b)`).
static BOX_JOINER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?:\$|\\[()\[\]]|\\q?quad|\\[,;: ]|\\(?:text|mathrm)\s*\{|[{}]|[,;&.]|\\|\s|",
        r"\b(?:and|or)\b|[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?\s*=|",
        r"\b(?:for\s+)?part\s*\(?[a-z0-9]\)?|\([a-z]\))"
    ))
    .expect("valid regex")
});

/// A comma, semicolon, ampersand, "and" or "or" between boxes.
static CONNECTIVE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[,;&]|\band\b|\bor\b").expect("valid regex"));

/// The last box, or the list of the boxes that end the response side by side (`\boxed{1} and
/// \boxed{2}`, `\boxed{(1, 2)}, \boxed{(2, 1)}`).
fn boxed_answer(text: &str) -> Option<String> {
    let mut start = last_box_start(text)?;
    let (last, _) = box_at(text, start)?;
    let mut items = vec![last];
    while let Some(prev) = last_box_start(&text[..start]) {
        let Some((content, end)) = box_at(text, prev) else {
            break;
        };
        if end > start {
            break;
        }
        let between = &text[end..start];
        if !BOX_JOINER.replace_all(between, "").trim().is_empty() {
            break;
        }
        // Side by side without a connective (`$$\boxed{20}$$ \boxed{143}`) is a correction.
        if !CONNECTIVE.is_match(between) {
            break;
        }
        // A full stop ends a sentence, so boxes across one are separate statements.
        if text[end..start].contains(". ") {
            break;
        }
        items.push(content);
        start = prev;
    }
    items.reverse();
    Some(items.join(", "))
}

/// Whether byte `pos` lies inside the argument of the last box before it.
fn inside_box(text: &str, pos: usize) -> bool {
    last_box_start(&text[..pos])
        .and_then(|b| box_at(text, b))
        .is_some_and(|(_, end)| end > pos)
}

/// Chat-template tokens that end a model's turn; text after one is not part of the answer.
const CHAT_TOKENS: [&str; 7] = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
];

/// `text` up to its first chat-template token.
fn cut_chat_tokens(text: &str) -> &str {
    let end = CHAT_TOKENS
        .iter()
        .filter_map(|t| text.find(t))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

/// Phrases that introduce the final answer (matched in lower case).
const MARKERS: [&str; 9] = [
    "answer is",
    "answer:",
    "answers are",
    "answer is:",
    "réponse est",
    "réponse:",
    "réponse :",
    "答案是",
    "答案：",
];

/// Position and length of the last answer phrase in `text`.
fn answer_phrase_position(text: &str) -> Option<(usize, usize)> {
    let lower = text.to_ascii_lowercase();
    MARKERS
        .iter()
        .filter_map(|m| lower.rfind(m).map(|p| (p, m.len())))
        .chain(answer_then_math(&lower))
        .max_by_key(|(p, l)| (*p, *l))
}

/// Text after the last "answer is"-style phrase, up to the end of its sentence.
fn answer_phrase(text: &str) -> Option<String> {
    let (pos, len) = answer_phrase_position(text)?;
    let tail = text[pos + len..].trim_start_matches([':', ' ', '\t', '*']);
    if let Some(math) = leading_math(tail) {
        return Some(math.to_string());
    }
    let mut tail = tail;
    if let Some(end) = tail.find("\n\n") {
        tail = &tail[..end];
    }
    let tail = tail.lines().next().unwrap_or("");
    // A sentence ends at ". " or at a final "." (but not inside a decimal like 3.5).
    let tail = match tail.find(". ").or_else(|| tail.find('。')) {
        Some(end) => &tail[..end],
        None => tail,
    };
    let tail = tail.trim().trim_end_matches(['.', '*']).trim();
    let tail = tail.trim_start_matches("\\\"").trim_end_matches("\\\"");
    let tail = tail.trim_matches(['"', '\u{201c}', '\u{201d}']).trim();
    let tail = after_copula(tail);
    let mut tail = strip_math_delimiters(tail);
    if let Some(inner) = tail.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        // "(35 + 70 = 105)": a computation in parentheses, not a tuple.
        if inner.contains('=') && !inner.contains(',') {
            tail = inner.trim();
        }
    }
    if is_prose(tail) {
        // "Jane started growing Sphere 3 hours ago": the value the sentence states.
        if let Some(value) = sentence_values(tail).into_iter().next() {
            return Some(value.text);
        }
    }
    (!tail.is_empty()).then(|| tail.to_string())
}

/// The last "answer" directly followed by displayed or inline math (`Answer \[ 9 \]`), as
/// (position, length of the word).
fn answer_then_math(lower: &str) -> Option<(usize, usize)> {
    let pos = lower.rfind("answer")?;
    let rest = lower[pos + "answer".len()..].trim_start();
    ["$", "\\[", "\\("]
        .iter()
        .any(|d| rest.starts_with(d))
        .then_some((pos, "answer".len()))
}

/// The content of a math span (`$..$`, `$$..$$`, `\[..\]`, `\(..\)`) at the start of `s`, which
/// may run over several lines.
fn leading_math(s: &str) -> Option<&str> {
    for (open, close) in [("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")] {
        if let Some(rest) = s.strip_prefix(open) {
            // An escaped `\$` (a dollar sign) does not close the span.
            let end = rest
                .match_indices(close)
                .map(|(i, _)| i)
                .find(|&i| close != "$" || !rest[..i].ends_with('\\'))?;
            let inner = rest[..end].trim();
            return (!inner.is_empty()).then_some(inner);
        }
    }
    None
}

/// "The largest $n$ is 34" → "34": a phrase that names the answer before giving it keeps what
/// follows its last "is"/"are"/"be" (spec 8.2 step A.4), unless that is inside math.
fn after_copula(s: &str) -> &str {
    [" is ", " are ", " be "]
        .iter()
        .filter_map(|w| s.rfind(w).map(|p| p + w.len()))
        .max()
        .filter(|&p| s[..p].matches('$').count().is_multiple_of(2))
        .map_or(s, |p| s[p..].trim())
}

/// Ends of sentences (outside math): a full stop, exclamation or question mark before a space,
/// CJK and Devanagari full stops, line breaks.
const CLOSERS: [char; 4] = ['\u{3002}', '\u{ff01}', '\u{ff1f}', '\u{0964}'];

/// The answer stated by the last sentence of `text`: its last math span that is not prose, or
/// else its last number. The sentence must be complete: it ends with a full stop (before any
/// closing "I hope it is correct."), or with the value itself, give or take a short unit.
fn final_sentence(text: &str) -> Option<String> {
    let mut text = text.trim_end();
    // Sign-offs after the answer.
    while let Some(start) = sentence_start(text.trim_end_matches(['.', '!'])) {
        let last = text[start..].trim();
        if last.starts_with("I hope") || last.starts_with("Hope this") {
            text = text[..start].trim_end();
        } else {
            break;
        }
    }
    let trimmed = text.trim_end_matches(|c: char| c.is_whitespace() || c == '*');
    let (body, terminated) = match trimmed.char_indices().next_back() {
        Some((i, c)) if ".!?".contains(c) || CLOSERS.contains(&c) => (&trimmed[..i], true),
        _ => (trimmed, false),
    };
    let start = sentence_start(body);
    if start.is_none()
        && !terminated
        && !is_prose(body)
        && !super::expr::is_wordy(body)
        && !body.contains('$')
    {
        // The whole response is one expression (`3+2`, `x = 4`): that is the answer.
        return (!body.trim().is_empty()).then(|| body.trim().to_string());
    }
    let sentence = &body[start.unwrap_or(0)..];
    let value = sentence_values(sentence).pop()?;
    (terminated || value.at_end).then_some(value.text)
}

/// Byte offset where the last sentence of `text` starts (after the last sentence end outside
/// math), if `text` has more than one sentence.
fn sentence_start(text: &str) -> Option<usize> {
    let mut start = None;
    let mut in_math = false;
    let mut prev = ' ';
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next = chars.peek().map(|&(_, n)| n);
        match c {
            '$' if prev != '\\' && next == Some('$') => {
                chars.next();
                let closes = in_math && text[..i].trim_end().ends_with('.');
                in_math = !in_math;
                if closes {
                    // `$$ ... = 2.$$ Therefore ...`: the display ended its sentence.
                    start = Some(i + 2);
                }
                prev = '$';
                continue;
            }
            '$' if prev != '\\' => in_math = !in_math,
            '(' | '[' if prev == '\\' => in_math = true,
            ')' | ']' if prev == '\\' => in_math = false,
            '\n' => start = Some(i + 1),
            '.' | '!' | '?' if !in_math && next.is_some_and(char::is_whitespace) => {
                start = Some(i + 1)
            }
            c if CLOSERS.contains(&c) => start = Some(i + c.len_utf8()),
            _ => {}
        }
        prev = c;
    }
    start.filter(|&s| s < text.len())
}

/// A value found in a sentence, and whether the sentence ends with it.
struct Found {
    text: String,
    at_end: bool,
}

/// Numbers as written in running text: LaTeX fractions, digit groups with thousands
/// separators, decimals, simple fractions, with a sign, currency or percent sign.
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"-?\\[dt]?frac\{-?\d+\}\{\d+\}|",
        r"-?\$?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+(?:/\d+)?)(?:\\?%)?"
    ))
    .expect("valid regex")
});

/// What may follow the value at the end of a sentence: a short unit or currency.
static UNIT_TAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^[\s*$]*(?:[a-zA-Z/\u{b2}\u{b3}]{1,8}|[\u{20ac}\u{a3}\u{a5}]|\p{Han}{1,3})?[\s*$)\]]*$",
    )
    .expect("valid regex")
});

/// The values stated in `sentence`, in order: its math spans that are not prose, and the
/// numbers written outside them.
fn sentence_values(sentence: &str) -> Vec<Found> {
    let end = sentence.trim_end().len();
    let spans: Vec<(usize, usize, &str)> = math_spans(sentence)
        .into_iter()
        .filter(|(_, _, inner)| !inner.is_empty() && !is_prose(inner))
        .collect();
    let mut found: Vec<(usize, Found)> = spans
        .iter()
        .map(|&(stop, _, inner)| {
            let found = Found {
                text: inner.to_string(),
                at_end: UNIT_TAIL.is_match(&sentence[stop..end]),
            };
            (stop, found)
        })
        .collect();
    for m in NUMBER.find_iter(sentence) {
        let inside = spans
            .iter()
            .any(|&(stop, start, _)| m.start() >= start && m.end() <= stop);
        if inside || !m.as_str().bytes().any(|b| b.is_ascii_digit()) {
            continue;
        }
        let number = Found {
            text: m.as_str().trim_start_matches('$').to_string(),
            at_end: UNIT_TAIL.is_match(&sentence[m.end()..end]),
        };
        found.push((m.end(), number));
    }
    found.sort_by_key(|(stop, _)| *stop);
    found.into_iter().map(|(_, f)| f).collect()
}

/// The math spans of `text` (`$..$`, `$$..$$`, `\(..\)`, `\[..\]`), as (end offset, start
/// offset, content).
fn math_spans(text: &str) -> Vec<(usize, usize, &str)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let found = [("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")]
            .into_iter()
            .find(|(open, _)| rest.starts_with(open) && !text[..i].ends_with('\\'));
        let Some((open, close)) = found else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let body = &rest[open.len()..];
        let Some(stop) = body
            .match_indices(close)
            .map(|(j, _)| j)
            .find(|&j| close != "$" || !body[..j].ends_with('\\'))
        else {
            break;
        };
        let end = i + open.len() + stop + close.len();
        spans.push((end, i, body[..stop].trim()));
        i = end;
    }
    spans
}

/// Whether `s` reads as words rather than math: two words of letters in a row (outside
/// LaTeX commands), or any run of CJK, Arabic or Devanagari letters.
fn is_prose(s: &str) -> bool {
    if s.chars().any(|c| {
        matches!(c as u32, 0x0600..=0x06ff | 0x0900..=0x097f | 0x3040..=0x30ff | 0x4e00..=0x9fff)
    }) {
        return true;
    }
    let mut run = 0;
    for word in s.split_whitespace() {
        let plain = word.trim_matches(|c: char| ",.;:!?()\"'".contains(c));
        if plain.len() >= 2 && plain.chars().all(|c| c.is_alphabetic()) {
            run += 1;
            if run >= 2 {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

/// Removes one level of `$...$`, `$$...$$`, `\(...\)` or `\[...\]` around `s`.
pub fn strip_math_delimiters(s: &str) -> &str {
    let s = s.trim();
    for (open, close) in [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")] {
        if s.len() >= open.len() + close.len() && s.starts_with(open) && s.ends_with(close) {
            return s[open.len()..s.len() - close.len()].trim();
        }
    }
    s
}
