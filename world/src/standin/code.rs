//! Seeded programming tasks for the stand-in's code rows: a statement, a JSON test spec in
//! either of Eurus-2-RL-Data's forms (stdin/stdout, or call-based with `fn_name`) and a
//! reference solution in Python that passes every test.
//!
//! Each task computes something small over a list, a number or a string. Expected outputs
//! come from the Rust solver here; the Python reference is written separately, so a test
//! that grades the reference with the project's code grader checks one against the other.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// How a task's tests are written (prime-spec 8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeForm {
    /// Each input is the whole stdin text, each output the expected stdout.
    Stdin,
    /// `fn_name` names a function; each input holds one JSON value per line (one per
    /// argument), each output the JSON text of the return value.
    Call,
}

/// One argument value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Arg {
    Int(i64),
    Ints(Vec<i64>),
    Text(String),
}

/// One expected result.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Int(i64),
    Text(String),
    Bool(bool),
}

/// The kinds of argument, for the statement's input section and the stdin reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Int,
    Ints,
    Text,
}

/// A parameter: its name in the reference solution, its kind and what the statement says of it.
struct Param {
    name: &'static str,
    kind: Kind,
    about: String,
}

/// The task families; the fields are drawn per row, so statements differ in more than their
/// story.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Task {
    Sum,
    CountMultiples { k: i64 },
    Spread,
    KthSmallest,
    CountLetter { letter: char },
    ReverseWords,
    Recurrence { a: i64, b: i64, m: i64 },
    Gcd,
    PairsWithSum,
    Balanced,
    LongestRun,
}

/// Number of task families.
pub const TASK_FAMILIES: usize = 11;

const WORDS: [&str; 16] = [
    "red", "river", "stone", "light", "cat", "tree", "book", "wind", "gold", "road", "bird",
    "snow", "lamp", "ship", "hill", "bell",
];

impl Task {
    fn draw(rng: &mut ChaCha8Rng) -> Task {
        match rng.gen_range(0..TASK_FAMILIES as u32) {
            0 => Task::Sum,
            1 => Task::CountMultiples {
                k: rng.gen_range(2..=9),
            },
            2 => Task::Spread,
            3 => Task::KthSmallest,
            4 => Task::CountLetter {
                letter: char::from(b'a' + rng.gen_range(0..26u8)),
            },
            5 => Task::ReverseWords,
            6 => Task::Recurrence {
                a: rng.gen_range(0..=5),
                b: rng.gen_range(1..=5),
                m: rng.gen_range(7..=1000),
            },
            7 => Task::Gcd,
            8 => Task::PairsWithSum,
            9 => Task::Balanced,
            _ => Task::LongestRun,
        }
    }

    /// Index of the family, for counting.
    fn family(&self) -> usize {
        match self {
            Task::Sum => 0,
            Task::CountMultiples { .. } => 1,
            Task::Spread => 2,
            Task::KthSmallest => 3,
            Task::CountLetter { .. } => 4,
            Task::ReverseWords => 5,
            Task::Recurrence { .. } => 6,
            Task::Gcd => 7,
            Task::PairsWithSum => 8,
            Task::Balanced => 9,
            Task::LongestRun => 10,
        }
    }

    fn fn_name(&self) -> &'static str {
        match self {
            Task::Sum => "total_sum",
            Task::CountMultiples { .. } => "count_multiples",
            Task::Spread => "spread",
            Task::KthSmallest => "kth_smallest",
            Task::CountLetter { .. } => "count_letter",
            Task::ReverseWords => "reverse_words",
            Task::Recurrence { .. } => "nth_term",
            Task::Gcd => "list_gcd",
            Task::PairsWithSum => "count_pairs",
            Task::Balanced => "is_balanced",
            Task::LongestRun => "longest_run",
        }
    }

    fn params(&self) -> Vec<Param> {
        let param = |name, kind, about: &str| Param {
            name,
            kind,
            about: about.to_string(),
        };
        let values = |range: &str| {
            param(
                "nums",
                Kind::Ints,
                &format!("a list of $n$ integers $a_1, \\dots, a_n$ ($1 \\le n \\le 12$, {range})"),
            )
        };
        match self {
            Task::Sum | Task::CountMultiples { .. } | Task::Spread | Task::LongestRun => {
                vec![values("$-50 \\le a_i \\le 100$")]
            }
            Task::KthSmallest => vec![
                values("$-50 \\le a_i \\le 100$"),
                param("k", Kind::Int, "an integer $k$ ($1 \\le k \\le n$)"),
            ],
            Task::Gcd => vec![values("$1 \\le a_i \\le 1000$")],
            Task::PairsWithSum => vec![
                values("$-20 \\le a_i \\le 20$"),
                param("target", Kind::Int, "an integer $t$ ($-40 \\le t \\le 40$)"),
            ],
            Task::CountLetter { .. } => vec![param(
                "word",
                Kind::Text,
                "a word $s$ of $1$ to $30$ lowercase English letters",
            )],
            Task::ReverseWords => vec![param(
                "line",
                Kind::Text,
                "a line of $1$ to $8$ lowercase words separated by single spaces",
            )],
            Task::Recurrence { .. } => {
                vec![param("n", Kind::Int, "an integer $n$ ($0 \\le n \\le 60$)")]
            }
            Task::Balanced => vec![param(
                "text",
                Kind::Text,
                "a string $s$ of $1$ to $20$ characters, each one of ()[]{}",
            )],
        }
    }

    /// What to compute, in words.
    fn goal(&self) -> String {
        match self {
            Task::Sum => "Find the sum of all the numbers.".into(),
            Task::CountMultiples { k } => {
                format!("Count how many of the numbers are divisible by ${k}$ (zero is divisible by every number).")
            }
            Task::Spread => {
                "Find the difference between the largest and the smallest number.".into()
            }
            Task::KthSmallest => "Find the $k$-th smallest number of the list (counting from $1$; equal numbers count separately).".into(),
            Task::CountLetter { letter } => {
                format!("Count how many times the letter '{letter}' occurs in $s$.")
            }
            Task::ReverseWords => {
                "Write the words of the line in reverse order, separated by single spaces.".into()
            }
            Task::Recurrence { a, b, m } => format!(
                "A sequence starts with $x_0 = {a}$ and $x_1 = {b}$, and every later term is $x_i = (x_{{i-1}} + x_{{i-2}}) \\bmod {m}$. Find $x_n$."
            ),
            Task::Gcd => "Find the greatest common divisor of all the numbers.".into(),
            Task::PairsWithSum => "Count the pairs of positions $i < j$ with $a_i + a_j = t$.".into(),
            Task::Balanced => "Decide whether the brackets in $s$ are balanced: every opening bracket is closed by a bracket of the same type, in the right order.".into(),
            Task::LongestRun => "Find the length of the longest run of consecutive positions in which every number is strictly greater than the one before it (a single number is a run of length $1$).".into(),
        }
    }

    fn draw_ints(rng: &mut ChaCha8Rng, low: i64, high: i64) -> Vec<i64> {
        let n = rng.gen_range(1..=12u32);
        (0..n).map(|_| rng.gen_range(low..=high)).collect()
    }

    /// The arguments of one test.
    fn draw_args(&self, rng: &mut ChaCha8Rng) -> Vec<Arg> {
        match self {
            Task::Sum | Task::CountMultiples { .. } | Task::Spread => {
                vec![Arg::Ints(Self::draw_ints(rng, -50, 100))]
            }
            Task::LongestRun => vec![Arg::Ints(Self::draw_ints(rng, -5, 10))],
            Task::KthSmallest => {
                let nums = Self::draw_ints(rng, -50, 100);
                let k = rng.gen_range(1..=nums.len() as i64);
                vec![Arg::Ints(nums), Arg::Int(k)]
            }
            Task::Gcd => {
                let factor = rng.gen_range(1..=12);
                let nums = Self::draw_ints(rng, 1, 1000 / factor)
                    .into_iter()
                    .map(|x| x * factor)
                    .collect();
                vec![Arg::Ints(nums)]
            }
            Task::PairsWithSum => {
                let nums = Self::draw_ints(rng, -20, 20);
                let i = rng.gen_range(0..nums.len());
                let j = rng.gen_range(0..nums.len());
                let target = if rng.gen_bool(0.8) {
                    nums[i] + nums[j]
                } else {
                    rng.gen_range(-40..=40)
                };
                vec![Arg::Ints(nums), Arg::Int(target)]
            }
            Task::CountLetter { letter } => {
                let len = rng.gen_range(1..=30u32);
                let word = (0..len)
                    .map(|_| {
                        if rng.gen_range(0..4u32) == 0 {
                            *letter
                        } else {
                            char::from(b'a' + rng.gen_range(0..26u8))
                        }
                    })
                    .collect();
                vec![Arg::Text(word)]
            }
            Task::ReverseWords => {
                let n = rng.gen_range(1..=8u32);
                let words: Vec<&str> = (0..n)
                    .map(|_| WORDS[rng.gen_range(0..WORDS.len() as u32) as usize])
                    .collect();
                vec![Arg::Text(words.join(" "))]
            }
            Task::Recurrence { .. } => vec![Arg::Int(rng.gen_range(0..=60))],
            Task::Balanced => {
                // Half are built balanced, half are random strings (rarely balanced).
                let text = if rng.gen_bool(0.5) {
                    let pairs = rng.gen_range(1..=10);
                    balanced_brackets(rng, pairs)
                } else {
                    let len = rng.gen_range(1..=20u32);
                    (0..len)
                        .map(|_| b"()[]{}"[rng.gen_range(0..6usize)] as char)
                        .collect()
                };
                vec![Arg::Text(text)]
            }
        }
    }

    /// The expected result for `args`.
    fn solve(&self, args: &[Arg]) -> Answer {
        let ints = |i: usize| match &args[i] {
            Arg::Ints(v) => v.as_slice(),
            other => unreachable!("argument {i} is {other:?}, not a list"),
        };
        let int = |i: usize| match &args[i] {
            Arg::Int(v) => *v,
            other => unreachable!("argument {i} is {other:?}, not an integer"),
        };
        let text = |i: usize| match &args[i] {
            Arg::Text(v) => v.as_str(),
            other => unreachable!("argument {i} is {other:?}, not a string"),
        };
        match self {
            Task::Sum => Answer::Int(ints(0).iter().sum()),
            Task::CountMultiples { k } => {
                Answer::Int(ints(0).iter().filter(|&&x| x % k == 0).count() as i64)
            }
            Task::Spread => {
                let v = ints(0);
                Answer::Int(v.iter().max().unwrap() - v.iter().min().unwrap())
            }
            Task::KthSmallest => {
                let mut v = ints(0).to_vec();
                v.sort_unstable();
                Answer::Int(v[int(1) as usize - 1])
            }
            Task::CountLetter { letter } => {
                Answer::Int(text(0).chars().filter(|c| c == letter).count() as i64)
            }
            Task::ReverseWords => {
                Answer::Text(text(0).split(' ').rev().collect::<Vec<_>>().join(" "))
            }
            Task::Recurrence { a, b, m } => {
                let (mut x, mut y) = (*a, *b);
                for _ in 0..int(0) {
                    (x, y) = (y, (x + y) % m);
                }
                Answer::Int(x)
            }
            Task::Gcd => Answer::Int(ints(0).iter().fold(0, |g, &x| gcd(g, x))),
            Task::PairsWithSum => {
                let (v, t) = (ints(0), int(1));
                let pairs = v
                    .iter()
                    .enumerate()
                    .map(|(i, a)| v[i + 1..].iter().filter(|&&b| a + b == t).count())
                    .sum::<usize>();
                Answer::Int(pairs as i64)
            }
            Task::Balanced => Answer::Bool(is_balanced(text(0))),
            Task::LongestRun => {
                let v = ints(0);
                let (mut best, mut run) = (1, 1);
                for w in v.windows(2) {
                    run = if w[1] > w[0] { run + 1 } else { 1 };
                    best = best.max(run);
                }
                Answer::Int(best)
            }
        }
    }

    /// The reference function in Python.
    fn python_function(&self) -> String {
        let name = self.fn_name();
        let args = self
            .params()
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ");
        let body = match self {
            Task::Sum => "    return sum(nums)\n".to_string(),
            Task::CountMultiples { k } => {
                format!("    return sum(1 for x in nums if x % {k} == 0)\n")
            }
            Task::Spread => "    return max(nums) - min(nums)\n".into(),
            Task::KthSmallest => "    return sorted(nums)[k - 1]\n".into(),
            Task::CountLetter { letter } => format!("    return word.count('{letter}')\n"),
            Task::ReverseWords => "    return ' '.join(reversed(line.split()))\n".into(),
            Task::Recurrence { a, b, m } => format!(
                "    x, y = {a}, {b}\n    for _ in range(n):\n        x, y = y, (x + y) % {m}\n    return x\n"
            ),
            Task::Gcd => "    import math\n    g = 0\n    for x in nums:\n        g = math.gcd(g, x)\n    return g\n".into(),
            Task::PairsWithSum => "    count = 0\n    for i in range(len(nums)):\n        for j in range(i + 1, len(nums)):\n            if nums[i] + nums[j] == target:\n                count += 1\n    return count\n".into(),
            Task::Balanced => "    pairs = {')': '(', ']': '[', '}': '{'}\n    stack = []\n    for c in text:\n        if c in pairs:\n            if not stack or stack.pop() != pairs[c]:\n                return False\n        else:\n            stack.append(c)\n    return not stack\n".into(),
            Task::LongestRun => "    best = run = 1\n    for i in range(1, len(nums)):\n        run = run + 1 if nums[i] > nums[i - 1] else 1\n        best = max(best, run)\n    return best\n".into(),
        };
        format!("def {name}({args}):\n{body}")
    }

    /// The kind of the result.
    fn answer_is_bool(&self) -> bool {
        matches!(self, Task::Balanced)
    }

    /// The reference solution of `form`: the function alone (call-based), or the function,
    /// the stdin reader and the print.
    fn python_solution(&self, form: CodeForm) -> String {
        let function = self.python_function();
        if form == CodeForm::Call {
            return function;
        }
        let mut main = String::from("\n\ndef main():\n");
        for p in self.params() {
            let line = match p.kind {
                Kind::Int => format!("    {} = int(input())\n", p.name),
                Kind::Ints => format!(
                    "    count = int(input())\n    {} = list(map(int, input().split()))[:count]\n",
                    p.name
                ),
                Kind::Text => format!("    {} = input()\n", p.name),
            };
            main.push_str(&line);
        }
        let call = format!(
            "{}({})",
            self.fn_name(),
            self.params()
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        if self.answer_is_bool() {
            main.push_str(&format!("    print('YES' if {call} else 'NO')\n"));
        } else {
            main.push_str(&format!("    print({call})\n"));
        }
        main.push_str("\n\nmain()\n");
        function + &main
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

fn is_balanced(text: &str) -> bool {
    let mut stack = Vec::new();
    for c in text.chars() {
        let open = match c {
            ')' => '(',
            ']' => '[',
            '}' => '{',
            _ => {
                stack.push(c);
                continue;
            }
        };
        if stack.pop() != Some(open) {
            return false;
        }
    }
    stack.is_empty()
}

/// A balanced string of `pairs` bracket pairs.
fn balanced_brackets(rng: &mut ChaCha8Rng, pairs: u32) -> String {
    if pairs == 0 {
        return String::new();
    }
    let inner = rng.gen_range(0..pairs);
    let (open, close) = [('(', ')'), ('[', ']'), ('{', '}')][rng.gen_range(0..3usize)];
    format!(
        "{open}{}{close}{}",
        balanced_brackets(rng, inner),
        balanced_brackets(rng, pairs - 1 - inner)
    )
}

/// An argument as stdin lines: a list as its length, then its values.
fn stdin_text(args: &[Arg]) -> String {
    let mut text = String::new();
    for arg in args {
        match arg {
            Arg::Int(v) => text.push_str(&format!("{v}\n")),
            Arg::Ints(v) => {
                let values: Vec<String> = v.iter().map(i64::to_string).collect();
                text.push_str(&format!("{}\n{}\n", v.len(), values.join(" ")));
            }
            Arg::Text(s) => text.push_str(&format!("{s}\n")),
        }
    }
    text
}

fn stdout_text(answer: &Answer) -> String {
    match answer {
        Answer::Int(v) => format!("{v}\n"),
        Answer::Text(s) => format!("{s}\n"),
        Answer::Bool(b) => if *b { "YES\n" } else { "NO\n" }.to_string(),
    }
}

fn arg_json(arg: &Arg) -> Value {
    match arg {
        Arg::Int(v) => json!(v),
        Arg::Ints(v) => json!(v),
        Arg::Text(s) => json!(s),
    }
}

fn answer_json(answer: &Answer) -> Value {
    match answer {
        Answer::Int(v) => json!(v),
        Answer::Text(s) => json!(s),
        Answer::Bool(b) => json!(b),
    }
}

/// Call-based input: one JSON value per line, one per argument.
fn call_input(args: &[Arg]) -> String {
    args.iter()
        .map(|a| arg_json(a).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A value as Python writes it, for the statement's examples.
fn python_repr(value: &Value) -> String {
    match value {
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => format!("'{s}'"),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(python_repr).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

/// The section headings of a statement, in the style of its source.
#[derive(Clone, Copy)]
pub enum Headings {
    /// APPS and TACO: `-----Input-----`.
    Dashes,
    /// CodeContests and Codeforces: a plain `Input` line.
    Plain,
}

impl Headings {
    fn heading(self, name: &str) -> String {
        match self {
            Headings::Dashes => format!("-----{name}-----\n"),
            Headings::Plain => format!("{name}\n\n"),
        }
    }
}

/// A generated programming task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeTask {
    /// The formal part of the statement: the goal, the input and output sections and the
    /// examples (the row puts a story before it and a note after it).
    pub body: String,
    /// The JSON test spec (`reward_model.ground_truth`).
    pub tests: String,
    /// A Python program that passes every test.
    pub reference: String,
    pub form: CodeForm,
    /// Which of the [`TASK_FAMILIES`] families it is.
    pub family: usize,
}

/// Draws a task of `form` with 4 to 10 tests, the first one or two shown as examples.
pub fn draw_task(rng: &mut ChaCha8Rng, form: CodeForm, headings: Headings) -> CodeTask {
    let task = Task::draw(rng);
    let tests: Vec<(Vec<Arg>, Answer)> = (0..rng.gen_range(4..=10u32))
        .map(|_| {
            let args = task.draw_args(rng);
            let answer = task.solve(&args);
            (args, answer)
        })
        .collect();
    let examples = rng.gen_range(1..=2usize);
    let params = task.params();

    let mut body = task.goal();
    body.push_str("\n\n");
    match form {
        CodeForm::Stdin => {
            body.push_str(&headings.heading("Input"));
            for p in &params {
                let line = match p.kind {
                    Kind::Ints => format!(
                        "One line holds $n$, the next one the list: {}, separated by spaces.\n",
                        p.about
                    ),
                    Kind::Int | Kind::Text => format!("One line holds {}.\n", p.about),
                };
                body.push_str(&line);
            }
            body.push('\n');
            body.push_str(&headings.heading("Output"));
            body.push_str(if task.answer_is_bool() {
                "Print YES if they are, and NO otherwise.\n"
            } else {
                "Print the answer on a single line.\n"
            });
            body.push('\n');
            body.push_str(&headings.heading("Examples"));
            for (args, answer) in tests.iter().take(examples) {
                body.push_str(&format!(
                    "Input\n{}\nOutput\n{}\n",
                    stdin_text(args),
                    stdout_text(answer)
                ));
            }
        }
        CodeForm::Call => {
            let signature = params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
            body.push_str(&format!(
                "Write a function `{}({signature})` that returns the answer{}.\n\n",
                task.fn_name(),
                if task.answer_is_bool() {
                    " as True or False"
                } else {
                    ""
                }
            ));
            for p in &params {
                body.push_str(&format!("- `{}`: {}\n", p.name, p.about));
            }
            body.push('\n');
            body.push_str(&headings.heading("Examples"));
            for (args, answer) in tests.iter().take(examples) {
                let call_args: Vec<String> =
                    args.iter().map(|a| python_repr(&arg_json(a))).collect();
                body.push_str(&format!(
                    "{}({}) returns {}\n",
                    task.fn_name(),
                    call_args.join(", "),
                    python_repr(&answer_json(answer))
                ));
            }
        }
    }

    let spec = match form {
        CodeForm::Stdin => json!({
            "inputs": tests.iter().map(|(a, _)| stdin_text(a)).collect::<Vec<_>>(),
            "outputs": tests.iter().map(|(_, o)| stdout_text(o)).collect::<Vec<_>>(),
        }),
        CodeForm::Call => json!({
            "fn_name": task.fn_name(),
            "inputs": tests.iter().map(|(a, _)| call_input(a)).collect::<Vec<_>>(),
            "outputs": tests.iter().map(|(_, o)| answer_json(o).to_string()).collect::<Vec<_>>(),
        }),
    };
    CodeTask {
        body: body.trim_end().to_string(),
        tests: spec.to_string(),
        reference: task.python_solution(form),
        form,
        family: task.family(),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn solvers_match_hand_worked_cases() {
        let ints = |v: &[i64]| Arg::Ints(v.to_vec());
        let text = |s: &str| Arg::Text(s.to_string());
        let cases = [
            (Task::Sum, vec![ints(&[1, -2, 30])], Answer::Int(29)),
            (
                Task::CountMultiples { k: 3 },
                vec![ints(&[0, 3, -6, 4])],
                Answer::Int(3),
            ),
            (Task::Spread, vec![ints(&[5, -1, 7])], Answer::Int(8)),
            (
                Task::KthSmallest,
                vec![ints(&[5, 1, 5, 2]), Arg::Int(3)],
                Answer::Int(5),
            ),
            (
                Task::CountLetter { letter: 'a' },
                vec![text("banana")],
                Answer::Int(3),
            ),
            (
                Task::ReverseWords,
                vec![text("red cat sat")],
                Answer::Text("sat cat red".into()),
            ),
            // 1, 2, 3, 5, 8 -> 8 mod 7 = 1 at n = 4.
            (
                Task::Recurrence { a: 1, b: 2, m: 7 },
                vec![Arg::Int(4)],
                Answer::Int(1),
            ),
            (Task::Gcd, vec![ints(&[12, 18, 30])], Answer::Int(6)),
            (
                Task::PairsWithSum,
                vec![ints(&[1, 2, 3, 2]), Arg::Int(4)],
                Answer::Int(2),
            ),
            (Task::Balanced, vec![text("([]{})")], Answer::Bool(true)),
            (Task::Balanced, vec![text("([)]")], Answer::Bool(false)),
            (Task::Balanced, vec![text("((")], Answer::Bool(false)),
            (
                Task::LongestRun,
                vec![ints(&[1, 2, 2, 3, 4, 0])],
                Answer::Int(3),
            ),
        ];
        for (task, args, expected) in cases {
            assert_eq!(task.solve(&args), expected, "{task:?} {args:?}");
        }
    }

    #[test]
    fn specs_have_the_forms_of_eurus_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for form in [CodeForm::Stdin, CodeForm::Call] {
            let task = draw_task(&mut rng, form, Headings::Dashes);
            let spec: Value = serde_json::from_str(&task.tests).unwrap();
            let (inputs, outputs) = (
                spec["inputs"].as_array().unwrap(),
                spec["outputs"].as_array().unwrap(),
            );
            assert!((4..=10).contains(&inputs.len()) && inputs.len() == outputs.len());
            assert!(inputs.iter().chain(outputs).all(Value::is_string));
            assert_eq!(spec.get("fn_name").is_some(), form == CodeForm::Call);
            if form == CodeForm::Call {
                for output in outputs {
                    serde_json::from_str::<Value>(output.as_str().unwrap()).unwrap();
                }
            }
        }
    }
}
