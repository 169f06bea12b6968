//! Code grading (spec 8.3): take the last ```python block, run it against the test spec in the
//! sandbox, compare outputs outside the sandbox, and score.
//!
//! Scoring follows the spec: 1.0 when every test passes, otherwise the fraction passed among
//! the first 10 (so a later failure alone still scores 1.0, as in the authors' code); with
//! `continuous = false` the score is 1.0 or 0.0. Because the fractional score depends only on
//! the first 10 tests, continuous grading runs only those; binary grading runs every test and
//! stops at the first failure. Each test is its own sandboxed process, so one test's state or
//! crash cannot leak into the next.
//!
//! The forms a test spec may take are in [`spec`], the comparison rules in [`compare`];
//! docs/verifier.md says what counts as a pass and why.

pub mod compare;
pub mod confine;
pub mod sandbox;
pub mod spec;

use crate::error::VerifierError;
use compare::call_result_matches;
pub use compare::stdout_matches;
use sandbox::{RunOutput, Sandbox, Termination};
use serde_json::Value;
pub use spec::TestSpec;
use spec::{call_arguments, stdio_text};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Imports and settings placed before every candidate program (spec 8.3 harness).
const PRELUDE: &str = "\
import sys
from string import *
from re import *
from datetime import *
from collections import *
from heapq import *
from bisect import *
from copy import *
from math import *
from random import *
from statistics import *
from itertools import *
from functools import *
from operator import *
from io import *
from sys import *
from json import *
from typing import *
import string, re, datetime, collections, heapq, bisect, copy, math, random, statistics
import itertools, functools, operator, io, json, typing
sys.setrecursionlimit(6 * 10 ** 5)
";

/// Settings of the code grader.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CodeGraderConfig {
    /// Fractional score (true, the spec default for training) or all-or-nothing.
    pub continuous: bool,
    /// Tests counted for the fractional score.
    pub max_partial_tests: usize,
}

impl Default for CodeGraderConfig {
    fn default() -> Self {
        Self {
            continuous: true,
            max_partial_tests: 10,
        }
    }
}

/// The outcome of grading one code response.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeVerdict {
    /// Score in [0, 1].
    pub score: f64,
    /// Tests run.
    pub tests_run: usize,
    /// Tests passed among those run.
    pub tests_passed: usize,
    /// A short human-readable reason.
    pub reason: String,
}

/// The candidate program: the text after the last "```python" fence, up to the next fence;
/// the whole response when there is no fence (spec 8.3).
pub fn extract_code(response: &str) -> String {
    match response.rfind("```python") {
        Some(start) => {
            let body = &response[start + "```python".len()..];
            let body = body.strip_prefix(['\n', ' ']).unwrap_or(body);
            match body.find("```") {
                Some(end) => body[..end].to_string(),
                None => body.to_string(),
            }
        }
        None => response.to_string(),
    }
}

/// Grades `response` against the JSON test spec `tests_json`. Tests not started by `deadline`
/// count as failed, and a run never outlasts it, so a timed-out item stops using the machine.
pub fn grade_code(
    sandbox: &Sandbox,
    config: &CodeGraderConfig,
    response: &str,
    tests_json: &str,
    deadline: Option<Instant>,
) -> Result<CodeVerdict, VerifierError> {
    let spec = TestSpec::parse(tests_json)?;
    let code = extract_code(response);
    if code.trim().is_empty() {
        return Ok(CodeVerdict {
            score: 0.0,
            tests_run: 0,
            tests_passed: 0,
            reason: "no code found".into(),
        });
    }
    let n = spec.inputs.len();
    let call_outputs = match spec.fn_name {
        Some(_) => spec.call_outputs(),
        None => Vec::new(),
    };
    let limit = if config.continuous {
        n.min(config.max_partial_tests.max(1))
    } else {
        n
    };
    let mut passed = 0;
    let mut run = 0;
    let mut first_failure = None;
    for i in 0..limit {
        let sandbox = match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
            Some(left) if left.is_zero() => {
                first_failure.get_or_insert_with(|| format!("test {i}: item deadline passed"));
                break;
            }
            Some(left) if left < sandbox.limits().wall_time => {
                let mut limits = sandbox.limits().clone();
                limits.wall_time = left;
                Cow::Owned(sandbox.clone().with_limits(limits))
            }
            _ => Cow::Borrowed(sandbox),
        };
        run += 1;
        match run_test(&sandbox, &code, &spec, &call_outputs, i)? {
            TestResult::Passed => passed += 1,
            failed => {
                if first_failure.is_none() {
                    first_failure = Some(format!("test {i}: {}", failed.describe()));
                }
                if !config.continuous {
                    break;
                }
            }
        }
    }
    let all = passed == limit;
    let score = if !config.continuous {
        if all {
            1.0
        } else {
            0.0
        }
    } else {
        passed as f64 / limit as f64
    };
    let reason = match first_failure {
        None => format!("passed {passed}/{run} tests"),
        Some(f) => format!("passed {passed}/{run} tests; first failure {f}"),
    };
    Ok(CodeVerdict {
        score,
        tests_run: run,
        tests_passed: passed,
        reason,
    })
}

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq)]
pub enum TestResult {
    /// Output matched.
    Passed,
    /// Ran to completion with a different output.
    WrongAnswer,
    /// Exited non-zero or crashed (compile errors included).
    RuntimeError(String),
    /// Hit the wall-clock or CPU limit.
    TimedOut,
    /// Wrote more than the output cap.
    OutputLimit,
}

impl TestResult {
    fn describe(&self) -> String {
        match self {
            TestResult::Passed => "passed".into(),
            TestResult::WrongAnswer => "wrong answer".into(),
            TestResult::RuntimeError(e) => format!("runtime error: {e}"),
            TestResult::TimedOut => "time limit exceeded".into(),
            TestResult::OutputLimit => "output limit exceeded".into(),
        }
    }
}

static MARKER_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs test `i` in a fresh sandboxed process and compares its output outside the sandbox.
/// `call_outputs` are the decoded expected return values of a call-based spec
/// ([`TestSpec::call_outputs`]), unused for stdin problems.
pub fn run_test(
    sandbox: &Sandbox,
    code: &str,
    spec: &TestSpec,
    call_outputs: &[Value],
    i: usize,
) -> Result<TestResult, VerifierError> {
    let input = &spec.inputs[i];
    match &spec.fn_name {
        None => {
            let program = format!("{PRELUDE}\n{code}");
            let out = sandbox.run(&program, stdio_text(input).as_bytes())?;
            if let Some(failure) = failure_of(&out) {
                return Ok(failure);
            }
            let got = String::from_utf8_lossy(&out.stdout);
            Ok(if stdout_matches(&got, &stdio_text(&spec.outputs[i])) {
                TestResult::Passed
            } else {
                TestResult::WrongAnswer
            })
        }
        Some(fn_name) => {
            let marker = format!(
                "__prime_result_{}_{}__",
                std::process::id(),
                MARKER_COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let program = call_harness(code, fn_name, &marker);
            let stdin = serde_json::to_string(&call_arguments(input))
                .map_err(|e| VerifierError::InvalidRequest(e.to_string()))?;
            let out = sandbox.run(&program, stdin.as_bytes())?;
            if let Some(failure) = failure_of(&out) {
                return Ok(failure);
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let result = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix(marker.as_str()))
                .and_then(|json| serde_json::from_str::<Value>(json).ok());
            Ok(match result {
                Some(v) if call_result_matches(&v, &call_outputs[i]) => TestResult::Passed,
                Some(_) => TestResult::WrongAnswer,
                None => TestResult::RuntimeError("no result".into()),
            })
        }
    }
}

fn failure_of(out: &RunOutput) -> Option<TestResult> {
    match out.termination {
        Termination::Exited(0) => None,
        Termination::TimedOut => Some(TestResult::TimedOut),
        // SIGXCPU: the CPU-time rlimit.
        Termination::Signaled(sig) if sig == libc::SIGXCPU => Some(TestResult::TimedOut),
        Termination::OutputLimit => Some(TestResult::OutputLimit),
        Termination::Exited(code) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().last().unwrap_or("").trim();
            Some(TestResult::RuntimeError(format!(
                "exit code {code}: {}",
                last.chars().take(200).collect::<String>()
            )))
        }
        Termination::Signaled(sig) => Some(TestResult::RuntimeError(format!("signal {sig}"))),
    }
}

/// The call-based harness, in Python: runs the candidate as a module with stdout swallowed,
/// looks the function up (a method of a `Solution()` instance when the code defines that
/// class with it, as the reference does, otherwise a module-level name), turns the string
/// keys of a first argument that is a dict into integers where they all are (the reference's
/// undoing of JSON's string keys), calls it with the arguments read from stdin, and prints the
/// result as JSON after `marker`. Expected outputs never enter the sandbox.
fn call_harness(code: &str, fn_name: &str, marker: &str) -> String {
    let literal = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{HARNESS}\n_prime_run({prelude} + {code}, {name}, {marker})\n",
        prelude = literal(PRELUDE),
        code = literal(code),
        name = literal(fn_name),
        marker = literal(marker),
    )
}

/// The fixed part of the call-based harness. `_prime_plain` gives the result the shape JSON
/// can carry while keeping Python's `==` answer: tuples become lists (at every depth; the
/// expected values come from JSON, which has no tuples), dict keys become strings as
/// `json.dumps` writes them, and anything `==` could never find equal to a JSON value (sets,
/// NaN, infinities, other objects) becomes an object under a key no test spec uses.
const HARNESS: &str = r#"import sys, io, json, math

def _prime_key(k):
    if isinstance(k, str):
        return str.__str__(k)
    if isinstance(k, bool) or k is None:
        return json.dumps(k)
    if isinstance(k, int):
        return str(int(k))
    if isinstance(k, float):
        return repr(float(k))
    return repr(k)

def _prime_plain(x):
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float) and math.isfinite(x):
        return float(x)
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, (list, tuple)):
        return [_prime_plain(v) for v in x]
    if isinstance(x, dict):
        return {_prime_key(k): _prime_plain(v) for k, v in x.items()}
    return {'__prime_not_json__': repr(x)}

def _prime_run(source, name, marker):
    out = sys.stdout
    args = json.loads(sys.stdin.read())
    sys.stdin = io.StringIO('')
    sys.stdout = io.StringIO()
    ns = {'__name__': '__solution__'}
    exec(compile(source, 'solution.py', 'exec'), ns)
    cls = ns.get('Solution')
    if isinstance(cls, type) and hasattr(cls, name):
        fn = getattr(cls(), name)
    else:
        fn = ns[name]
    if args and isinstance(args[0], dict):
        try:
            args[0] = {int(k): v for k, v in args[0].items()}
        except Exception:
            pass
    result = json.dumps(_prime_plain(fn(*args)))
    sys.stdout = out
    out.write('\n' + marker + result + '\n')
    out.flush()
"#;
