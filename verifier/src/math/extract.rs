//! Finding the final answer in a model response (spec 8.2 step A).
//!
//! Leftover chat tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...) end the response:
//! whatever a model writes after them is another turn, not its answer. Then the last
//! `\boxed{...}` (or `\fbox{...}`) wins, with brace-depth counting for nested braces. Without a
//! box, the text after the last "answer is" / "answer:" phrase (or "Answer" directly followed by
//! displayed math) is taken up to the end of its sentence, and a phrase like "The largest $n$
//! is 34" keeps what follows its last "is" (spec 8.2 step A.4). Failing that, a closing
//! sentence that starts with "Therefore", "Thus", "Hence" or "So" and ends in "is VALUE." states
//! the answer. Unlike the authors' grader, a response with none of these has no answer and
//! scores 0: a truncated response must not score through its last number.

/// Longest answer (in bytes) that is graded; longer ones are treated as no answer.
pub const MAX_ANSWER_BYTES: usize = 4096;

/// The final answer of `response`, if it states one.
pub fn extract_answer(response: &str) -> Option<String> {
    let response = cut_chat_tokens(response);
    let answer = last_boxed(response)
        .or_else(|| answer_phrase(response))
        .or_else(|| concluding_sentence(response))?;
    let answer = answer.trim();
    if answer.is_empty() || answer.len() > MAX_ANSWER_BYTES {
        return None;
    }
    Some(answer.to_string())
}

/// Content of the last `\boxed`/`\fbox`. An unterminated last box (a cut-off response) counts
/// as no answer rather than falling back to an earlier, superseded one.
pub fn last_boxed(text: &str) -> Option<String> {
    let boxed = text.rfind("\\boxed");
    let fbox = text.rfind("\\fbox");
    let (start, cmd_len) = match (boxed, fbox) {
        (Some(b), Some(f)) if f > b => (f, "\\fbox".len()),
        (Some(b), _) => (b, "\\boxed".len()),
        (None, Some(f)) => (f, "\\fbox".len()),
        (None, None) => return None,
    };
    let rest = &text[start + cmd_len..];
    let trimmed = rest.trim_start();
    if let Some(inner) = trimmed.strip_prefix('{') {
        let mut depth = 1usize;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(inner[..i].to_string());
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
        (!arg.is_empty()).then_some(arg)
    } else {
        None
    }
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

/// Text after the last "answer is"-style phrase, up to the end of its sentence.
fn answer_phrase(text: &str) -> Option<String> {
    const MARKERS: [&str; 4] = ["answer is", "answer:", "answers are", "answer is:"];
    let lower = text.to_ascii_lowercase();
    let (pos, len) = MARKERS
        .iter()
        .filter_map(|m| lower.rfind(m).map(|p| (p, m.len())))
        .chain(answer_then_math(&lower))
        .max_by_key(|(p, l)| (*p, *l))?;
    let tail = text[pos + len..].trim_start_matches([':', ' ', '\t']);
    if let Some(math) = leading_math(tail) {
        return Some(math.to_string());
    }
    let mut tail = tail;
    if let Some(end) = tail.find("\n\n") {
        tail = &tail[..end];
    }
    let tail = tail.lines().next().unwrap_or("");
    // A sentence ends at ". " or at a final "." (but not inside a decimal like 3.5).
    let tail = match tail.find(". ") {
        Some(end) => &tail[..end],
        None => tail,
    };
    let tail = tail.trim().trim_end_matches('.').trim();
    let tail = after_copula(tail);
    let tail = strip_math_delimiters(tail);
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

/// "Therefore, the probability that Alice wins is 2/3." at the very end of a response: a
/// closing sentence that draws the conclusion and ends in a short value with a digit.
fn concluding_sentence(text: &str) -> Option<String> {
    let text = text.trim_end();
    let body = text.strip_suffix('.')?;
    let start = body.rfind(". ").map_or(0, |p| p + 2);
    let sentence = body[start..].trim();
    let opener = ["Therefore", "Thus", "Hence", "So", "In conclusion"];
    if !opener.iter().any(|o| sentence.starts_with(o)) {
        return None;
    }
    let value = strip_math_delimiters(after_copula(sentence));
    let short = value.len() <= 40 && value.len() < sentence.len();
    (short && value.bytes().any(|b| b.is_ascii_digit())).then(|| value.to_string())
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
