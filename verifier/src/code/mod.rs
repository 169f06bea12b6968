//! Code grading (spec 8.3): take the last ```python block, run it against the test spec in the
//! sandbox, compare outputs outside the sandbox, and score.
//!
//! Scoring follows the spec: 1.0 when every test passes, otherwise the fraction passed among
//! the first 10 (so a later failure alone still scores 1.0, as in the authors' code); with
//! `continuous = false` the score is 1.0 or 0.0. Because the fractional score depends only on
//! the first 10 tests, continuous grading runs only those; binary grading runs every test and
//! stops at the first failure. Each test is its own sandboxed process, so one test's state or
//! crash cannot leak into the next.

pub mod confine;
pub mod sandbox;

use crate::error::VerifierError;
use sandbox::{RunOutput, Sandbox, Termination};
use serde_json::Value;
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

/// The test spec of a code problem (Eurus-2-RL-Data `ground_truth`, a JSON string).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TestSpec {
    /// Per test: the whole stdin text, or (call-based) the arguments.
    pub inputs: Vec<Value>,
    /// Per test: the expected stdout text, or (call-based) the expected return value.
    pub outputs: Vec<Value>,
    /// The function to call; absent for stdin/stdout problems.
    #[serde(default)]
    pub fn_name: Option<String>,
}

impl TestSpec {
    /// Parses and checks a spec.
    pub fn parse(json: &str) -> Result<Self, VerifierError> {
        let spec: TestSpec = serde_json::from_str(json)
            .map_err(|e| VerifierError::InvalidRequest(format!("bad test spec: {e}")))?;
        if spec.inputs.len() != spec.outputs.len() {
            return Err(VerifierError::InvalidRequest(format!(
                "test spec has {} inputs but {} outputs",
                spec.inputs.len(),
                spec.outputs.len()
            )));
        }
        if spec.inputs.is_empty() {
            return Err(VerifierError::InvalidRequest(
                "test spec has no tests".into(),
            ));
        }
        if let Some(name) = &spec.fn_name {
            if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(VerifierError::InvalidRequest(format!(
                    "fn_name {name:?} is not an identifier"
                )));
            }
        }
        Ok(spec)
    }
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
        match run_test(&sandbox, &code, &spec, i)? {
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
pub fn run_test(
    sandbox: &Sandbox,
    code: &str,
    spec: &TestSpec,
    i: usize,
) -> Result<TestResult, VerifierError> {
    let input = &spec.inputs[i];
    let expected = &spec.outputs[i];
    match &spec.fn_name {
        None => {
            let stdin = value_as_text(input);
            let program = format!("{PRELUDE}\n{code}");
            let out = sandbox.run(&program, stdin.as_bytes())?;
            if let Some(failure) = failure_of(&out) {
                return Ok(failure);
            }
            let got = String::from_utf8_lossy(&out.stdout);
            Ok(if stdout_matches(&got, &value_as_text(expected)) {
                TestResult::Passed
            } else {
                TestResult::WrongAnswer
            })
        }
        Some(fn_name) => {
            let args = call_arguments(input)?;
            let marker = format!(
                "__prime_result_{}_{}__",
                std::process::id(),
                MARKER_COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let program = call_harness(code, fn_name, &marker);
            let stdin = serde_json::to_string(&args)
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
                Some(v) if call_result_matches(&v, expected) => TestResult::Passed,
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

/// A JSON string as text; anything else as its JSON form.
fn value_as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

/// Call-based arguments: a string holds one JSON value per line; an array is the argument list.
fn call_arguments(input: &Value) -> Result<Vec<Value>, VerifierError> {
    match input {
        Value::String(s) => s
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| {
                    VerifierError::InvalidRequest(format!("bad call-based input line {l:?}: {e}"))
                })
            })
            .collect(),
        Value::Array(args) => Ok(args.clone()),
        other => Ok(vec![other.clone()]),
    }
}

/// The call-based harness: runs the candidate as a module with stdout swallowed, calls the
/// function (on `Solution()` when the code defines that class) with arguments read from stdin,
/// and prints the JSON result after `marker`. Expected outputs never enter the sandbox.
fn call_harness(code: &str, fn_name: &str, marker: &str) -> String {
    let code_literal = serde_json::to_string(code).unwrap_or_else(|_| "\"\"".into());
    format!(
        "import sys, io, json\n\
         _prime_stdout = sys.stdout\n\
         _prime_args = json.loads(sys.stdin.read())\n\
         sys.stdin = io.StringIO('')\n\
         sys.stdout = io.StringIO()\n\
         _prime_ns = {{'__name__': '__solution__'}}\n\
         exec(compile({prelude} + {code_literal}, 'solution.py', 'exec'), _prime_ns)\n\
         _prime_fn = _prime_ns.get({fn_name:?})\n\
         if _prime_fn is None and 'Solution' in _prime_ns:\n    \
             _prime_fn = getattr(_prime_ns['Solution'](), {fn_name:?})\n\
         _prime_result = _prime_fn(*_prime_args)\n\
         sys.stdout = _prime_stdout\n\
         print()\n\
         print({marker:?} + json.dumps(_prime_result, default=repr))\n",
        prelude = serde_json::to_string(PRELUDE).unwrap_or_else(|_| "\"\"".into()),
    )
}

/// Call-based comparison: equality after tuple→list (JSON has no tuples), numbers by value,
/// also accepting `result == expected[0]` for a one-element expected list.
fn call_result_matches(got: &Value, expected: &Value) -> bool {
    json_eq(got, expected)
        || matches!(expected, Value::Array(items) if items.len() == 1 && json_eq(got, &items[0]))
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Stdout comparison (spec 8.3), first match wins: whole text stripped; lines stripped; the
/// expected text's non-empty stripped lines against the output's; then, when every
/// whitespace-separated token parses as a number, numbers within `np.allclose` tolerances.
pub fn stdout_matches(got: &str, expected: &str) -> bool {
    if got.trim() == expected.trim() {
        return true;
    }
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let (g, e) = (lines(got), lines(expected));
    if g == e {
        return true;
    }
    let tokens = |s: &str| -> Option<Vec<f64>> {
        s.split_whitespace()
            .map(|t| t.parse::<f64>().ok())
            .collect()
    };
    match (tokens(got), tokens(expected)) {
        (Some(a), Some(b)) if a.len() == b.len() && !a.is_empty() => a
            .iter()
            .zip(&b)
            .all(|(x, y)| (x - y).abs() <= 1e-8 + 1e-5 * y.abs()),
        _ => false,
    }
}
