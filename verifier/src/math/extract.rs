//! Finding the final answer in a model response (spec 8.2 step A).
//!
//! The last `\boxed{...}` (or `\fbox{...}`) wins, with brace-depth counting for nested braces.
//! Without a box, the text after the last "answer is" / "answer:" phrase is taken up to the end
//! of its sentence. Unlike the authors' grader, a response with neither has no answer and
//! scores 0: a truncated response must not score through its last number.

/// Longest answer (in bytes) that is graded; longer ones are treated as no answer.
pub const MAX_ANSWER_BYTES: usize = 4096;

/// The final answer of `response`, if it states one.
pub fn extract_answer(response: &str) -> Option<String> {
    let answer = last_boxed(response).or_else(|| answer_phrase(response))?;
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

/// Text after the last "answer is"-style phrase, up to the end of its sentence.
fn answer_phrase(text: &str) -> Option<String> {
    const MARKERS: [&str; 4] = ["answer is", "answer:", "answers are", "answer is:"];
    let lower = text.to_ascii_lowercase();
    let (pos, len) = MARKERS
        .iter()
        .filter_map(|m| lower.rfind(m).map(|p| (p, m.len())))
        .max_by_key(|(p, l)| (*p, *l))?;
    let mut tail = text[pos + len..].trim_start_matches([':', ' ', '\t']);
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
    let tail = strip_math_delimiters(tail);
    (!tail.is_empty()).then(|| tail.to_string())
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
