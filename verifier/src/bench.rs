//! `prime bench verifier`: the math grader against `math-verify` (PyPI) on the same labelled
//! items in the same run, and one code test's latency in the sandbox against bare `python3`
//! running the same program with the same stdin.
//!
//! The Python side is `bench/python/math_verify_agreement.py`, run as a child process with an
//! interpreter that has `math-verify` installed; both sides print the same JSON summary.

use crate::code::sandbox::{Backend, Sandbox, SandboxLimits};
use crate::error::VerifierError;
use crate::math::{answers_match, grade_math};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Labelled math items (JSONL files: `category`, `ground_truth`, `answer` or `response`,
    /// `correct`), read one after the other.
    pub math_items: Vec<PathBuf>,
    /// Passes over the items when timing our grader (math-verify gets `python_repeats`).
    pub repeats: usize,
    /// Passes over the items when timing math-verify (it is much slower).
    pub python_repeats: usize,
    /// Python interpreter with `math-verify` installed; `None` skips that side.
    pub python: Option<PathBuf>,
    /// The Python side's script.
    pub math_verify_script: PathBuf,
    /// Timed runs of the code test per variant.
    pub code_runs: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let venv = std::env::var_os("PRIME_VENV")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/prime-rs/venv"))
            })
            .map(|v| v.join("bin/python"))
            .filter(|p| p.is_file());
        Self {
            // The project's own table and the cases from other graders' published suites.
            math_items: ["math_pairs.jsonl", "math_pairs_external.jsonl"]
                .map(|name| root.join("verifier/tests/data").join(name))
                .to_vec(),
            repeats: 20,
            python_repeats: 1,
            python: venv,
            math_verify_script: root.join("bench/python/math_verify_agreement.py"),
            code_runs: 30,
        }
    }
}

/// One math grader's agreement with the human labels and its speed.
#[derive(Debug, Clone, Serialize)]
pub struct MathSide {
    /// "prime-verifier" or "math-verify".
    pub grader: String,
    /// Labelled items.
    pub items: usize,
    /// Fraction of items where the verdict equals the human label.
    pub agreement: f64,
    /// Items graded per second, one thread.
    pub items_per_second: f64,
    /// Per category: (items, agreed).
    pub per_category: BTreeMap<String, (usize, usize)>,
}

/// Latency of one code test (median over the runs), milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct CodeLatency {
    /// The sandbox backend measured.
    pub backend: String,
    /// Whether each run had its own cgroup.
    pub cgroup: bool,
    /// Timed runs per variant.
    pub runs: usize,
    /// Bare `python3 -I -B main.py` (same interpreter, same stdin).
    pub bare_ms: f64,
    /// Sandbox started on demand for the run (no warm pool).
    pub cold_ms: f64,
    /// Sandbox taken from a warm pool that had time to refill between runs.
    pub warm_ms: f64,
    /// Back to back, per test, bare python.
    pub bare_back_to_back_ms: f64,
    /// Back to back, per test, warm pool of two refilling while the next test runs.
    pub warm_back_to_back_ms: f64,
    /// `cold_ms / bare_ms - 1`.
    pub cold_overhead: f64,
    /// `warm_ms / bare_ms - 1`.
    pub warm_overhead: f64,
    /// `warm_back_to_back_ms / bare_back_to_back_ms - 1`.
    pub back_to_back_overhead: f64,
}

/// Everything `prime bench verifier` measures.
#[derive(Debug, Clone, Serialize)]
pub struct VerifierBenchReport {
    /// Our grader.
    pub ours: MathSide,
    /// math-verify, or why it did not run.
    pub math_verify: Result<MathSide, String>,
    /// Our items/s over math-verify's.
    pub speedup: Option<f64>,
    /// Sandboxed code-test latency against bare python: the detected backend first, then
    /// Landlock + seccomp when the kernel offers it and it is not the detected one.
    pub code: Vec<CodeLatency>,
}

/// Runs both benchmarks.
pub fn run_bench(options: &BenchOptions) -> Result<VerifierBenchReport, VerifierError> {
    let ours = math_ours(options)?;
    let math_verify = match &options.python {
        Some(python) => math_verify(options, python),
        None => Err("no Python interpreter with math-verify given".into()),
    };
    let speedup = math_verify
        .as_ref()
        .ok()
        .map(|m| ours.items_per_second / m.items_per_second);
    let detected = Sandbox::detect(SandboxLimits::default())?;
    let mut code = vec![code_latency_in(&detected, options.code_runs)?];
    if let Some(landlock) = Backend::landlock().filter(|b| b != detected.backend()) {
        code.push(code_latency_in(
            &detected.clone().with_backend(landlock),
            options.code_runs,
        )?);
    }
    Ok(VerifierBenchReport {
        ours,
        math_verify,
        speedup,
        code,
    })
}

fn bench_err(what: impl std::fmt::Display) -> VerifierError {
    VerifierError::Sandbox(format!("benchmark: {what}"))
}

/// The non-empty lines of every item file, in order.
fn item_lines(options: &BenchOptions) -> Result<Vec<String>, VerifierError> {
    let mut lines = Vec::new();
    for path in &options.math_items {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bench_err(format!("{}: {e}", path.display())))?;
        lines.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    Ok(lines)
}

fn load_items(options: &BenchOptions) -> Result<Vec<Value>, VerifierError> {
    item_lines(options)?
        .iter()
        .map(|l| serde_json::from_str(l).map_err(bench_err))
        .collect()
}

/// Our grader on the labelled items: agreement, then items/s over `repeats` passes.
pub fn math_ours(options: &BenchOptions) -> Result<MathSide, VerifierError> {
    let rows = load_items(options)?;
    let grade = |row: &Value| -> bool {
        let gt = row["ground_truth"].as_str().unwrap_or_default();
        match (row.get("answer"), row.get("response")) {
            (Some(a), _) => answers_match(gt, a.as_str().unwrap_or_default()),
            (None, Some(r)) => grade_math(r.as_str().unwrap_or_default(), gt).correct,
            _ => false,
        }
    };
    let mut per_category: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for row in &rows {
        let agree = grade(row) == row["correct"].as_bool().unwrap_or(false);
        let entry = per_category
            .entry(row["category"].as_str().unwrap_or("?").to_string())
            .or_default();
        entry.0 += 1;
        entry.1 += usize::from(agree);
    }
    let start = Instant::now();
    let repeats = options.repeats.max(1);
    for _ in 0..repeats {
        for row in &rows {
            std::hint::black_box(grade(row));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let agreed: usize = per_category.values().map(|(_, a)| a).sum();
    Ok(MathSide {
        grader: "prime-verifier".into(),
        items: rows.len(),
        agreement: agreed as f64 / rows.len().max(1) as f64,
        items_per_second: (repeats * rows.len()) as f64 / seconds,
        per_category,
    })
}

/// math-verify on the same items, through the Python script.
fn math_verify(options: &BenchOptions, python: &PathBuf) -> Result<MathSide, String> {
    // The script reads one file: every table's items, in the same order as ours.
    let lines = item_lines(options).map_err(|e| e.to_string())?;
    let items =
        std::env::temp_dir().join(format!("prime-bench-items-{}.jsonl", std::process::id()));
    std::fs::write(&items, lines.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", items.display()))?;
    let out = Command::new(python)
        .arg(&options.math_verify_script)
        .arg(&items)
        .arg(options.python_repeats.max(1).to_string())
        .output()
        .map_err(|e| format!("{} not runnable: {e}", python.display()));
    let _ = std::fs::remove_file(&items);
    let out = out?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "math-verify side failed ({}): {}",
            out.status,
            stderr.lines().last().unwrap_or("").trim()
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| e.to_string())?;
    let per_category = v["per_category"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, c)| {
                    let n = c["items"].as_u64().unwrap_or(0) as usize;
                    let a = c["agreed"].as_u64().unwrap_or(0) as usize;
                    (k.clone(), (n, a))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(MathSide {
        grader: "math-verify".into(),
        items: v["items"].as_u64().unwrap_or(0) as usize,
        agreement: v["agreement"].as_f64().unwrap_or(0.0),
        items_per_second: v["items_per_second"]
            .as_f64()
            .ok_or("no items_per_second in the Python output")?,
        per_category,
    })
}

/// The code test: sum of squares of 1000 numbers read from stdin.
const PROGRAM: &str =
    "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(x * x for x in nums))\n";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Latency of the code test in the best available sandbox (cold, warm, back to back) and
/// bare.
pub fn code_latency(runs: usize) -> Result<CodeLatency, VerifierError> {
    code_latency_in(&Sandbox::detect(SandboxLimits::default())?, runs)
}

/// Latency of the code test in `sandbox` (cold, warm, back to back) and bare.
pub fn code_latency_in(sandbox: &Sandbox, runs: usize) -> Result<CodeLatency, VerifierError> {
    let runs = runs.max(1);
    let stdin: String = (0..1000).map(|i| format!("{i} ")).collect();
    let expected = (0..1000u64).map(|x| x * x).sum::<u64>().to_string();
    let cold = sandbox.clone().with_warm_pool(0);
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("main.py");
    std::fs::write(&script, PROGRAM)?;
    let bare = || -> Result<f64, VerifierError> {
        let start = Instant::now();
        let mut child = Command::new(cold.python())
            .args(["-I", "-B"])
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        if let Some(mut p) = child.stdin.take() {
            p.write_all(stdin.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !String::from_utf8_lossy(&out.stdout).starts_with(&expected) {
            return Err(bench_err("bare python gave a wrong answer"));
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let sandboxed = |sb: &Sandbox| -> Result<f64, VerifierError> {
        let start = Instant::now();
        let out = sb.run(PROGRAM, stdin.as_bytes())?;
        if !out.success() || !String::from_utf8_lossy(&out.stdout).starts_with(&expected) {
            return Err(bench_err(format!(
                "sandboxed run failed: {:?} {}",
                out.termination,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let warm = cold.clone().with_warm_pool(1);
    // Warm the page cache (and the pool).
    bare()?;
    sandboxed(&cold)?;
    std::thread::sleep(Duration::from_millis(300));
    let (mut bare_ms, mut cold_ms, mut warm_ms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        bare_ms.push(bare()?);
        cold_ms.push(sandboxed(&cold)?);
        // Let the pool refill, as it does between tests of a grader that is not saturated.
        std::thread::sleep(Duration::from_millis(150));
        warm_ms.push(sandboxed(&warm)?);
    }
    drop(warm);
    let start = Instant::now();
    for _ in 0..runs {
        bare()?;
    }
    let bare_b2b = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
    let pool = cold.clone().with_warm_pool(2);
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    for _ in 0..runs {
        sandboxed(&pool)?;
    }
    let warm_b2b = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
    let (b, c, w) = (median(bare_ms), median(cold_ms), median(warm_ms));
    Ok(CodeLatency {
        backend: cold.backend().name().into(),
        cgroup: cold.has_cgroup(),
        runs,
        bare_ms: b,
        cold_ms: c,
        warm_ms: w,
        bare_back_to_back_ms: bare_b2b,
        warm_back_to_back_ms: warm_b2b,
        cold_overhead: c / b - 1.0,
        warm_overhead: w / b - 1.0,
        back_to_back_overhead: warm_b2b / bare_b2b - 1.0,
    })
}

impl VerifierBenchReport {
    /// A short human-readable table.
    /// Agreement per category, ours next to math-verify's (when it ran).
    pub fn category_table(&self) -> String {
        let theirs = self.math_verify.as_ref().ok();
        let percent = |(n, a): (usize, usize)| 100.0 * a as f64 / n.max(1) as f64;
        let mut s = format!(
            "{:<40} {:>6} {:>15} {:>12}\n",
            "category", "items", "prime-verifier", "math-verify"
        );
        for (category, &counts) in &self.ours.per_category {
            let other = theirs
                .and_then(|m| m.per_category.get(category))
                .map_or("-".to_string(), |&c| format!("{:.1}%", percent(c)));
            s.push_str(&format!(
                "{category:<40} {:>6} {:>14.1}% {other:>12}\n",
                counts.0,
                percent(counts)
            ));
        }
        s
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let line = |m: &MathSide| {
            format!(
                "{:<16} {:>6} items  agreement {:>6.2}%  {:>12.0} items/s\n",
                m.grader,
                m.items,
                m.agreement * 100.0,
                m.items_per_second
            )
        };
        s.push_str(&line(&self.ours));
        match &self.math_verify {
            Ok(m) => s.push_str(&line(m)),
            Err(e) => s.push_str(&format!("math-verify      not run: {e}\n")),
        }
        if let Some(x) = self.speedup {
            s.push_str(&format!("speedup          {x:.0}x\n"));
        }
        s.push_str(&self.category_table());
        for c in &self.code {
            s.push_str(&format!(
            "code test ({}, cgroup {}): bare {:.1} ms, cold sandbox {:.1} ms ({:+.0}%), warm sandbox {:.1} ms ({:+.0}%), back to back {:.1} vs {:.1} ms per test ({:+.0}%)\n",
            c.backend,
            c.cgroup,
            c.bare_ms,
            c.cold_ms,
            c.cold_overhead * 100.0,
            c.warm_ms,
            c.warm_overhead * 100.0,
            c.warm_back_to_back_ms,
            c.bare_back_to_back_ms,
            c.back_to_back_overhead * 100.0
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn math_side_scores_a_small_labelled_file() {
        let dir = tempfile::tempdir().unwrap();
        let items = dir.path().join("items.jsonl");
        std::fs::write(
            &items,
            concat!(
                r#"{"category": "a", "ground_truth": "1/2", "answer": "0.5", "correct": true}"#,
                "\n",
                r#"{"category": "a", "ground_truth": "3", "answer": "4", "correct": false}"#,
                "\n",
                r#"{"category": "b", "ground_truth": "7", "response": "so \\boxed{7}", "correct": false}"#,
                "\n",
            ),
        )
        .unwrap();
        let options = BenchOptions {
            math_items: vec![items],
            repeats: 3,
            ..BenchOptions::default()
        };
        let side = math_ours(&options).unwrap();
        assert_eq!(side.items, 3);
        // The third label is deliberately wrong: our grader says 7 is correct.
        assert!((side.agreement - 2.0 / 3.0).abs() < 1e-9, "{side:?}");
        assert_eq!(side.per_category["a"], (2, 2));
        assert_eq!(side.per_category["b"], (1, 0));
        assert!(side.items_per_second > 0.0);
    }

    #[test]
    fn code_latency_measures_a_correct_sandboxed_run() {
        let c = code_latency(1).unwrap();
        assert_eq!(c.runs, 1);
        for ms in [c.bare_ms, c.cold_ms, c.warm_ms, c.bare_back_to_back_ms] {
            assert!(ms > 0.0 && ms < 10_000.0, "{c:?}");
        }
    }
}
