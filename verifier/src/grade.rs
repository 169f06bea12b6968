//! The grader behind the service and the `prime grade` tool: dispatch by ability, bounded
//! concurrency, a per-item time limit, and metrics. Plain Rust; the gRPC layer only converts.

use crate::code::sandbox::{Sandbox, SandboxLimits};
use crate::code::{grade_code, CodeGraderConfig};
use crate::error::VerifierError;
use crate::math::grade_math;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Which grader an item goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ability {
    /// Math answer against a reference answer.
    Math,
    /// Python program against a JSON test spec.
    Code,
}

impl std::str::FromStr for Ability {
    type Err = VerifierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "math" => Ok(Ability::Math),
            "code" => Ok(Ability::Code),
            other => Err(VerifierError::InvalidRequest(format!(
                "unknown ability {other:?} (expected \"math\" or \"code\")"
            ))),
        }
    }
}

/// One item to grade.
#[derive(Debug, Clone, PartialEq)]
pub struct GradeItem {
    /// Caller's id, echoed back.
    pub id: String,
    /// Which grader; `None` when the request named none or an unknown one.
    pub ability: Option<Ability>,
    /// The model response.
    pub response: String,
    /// Reference answer (math) or JSON test spec (code).
    pub ground_truth: String,
}

/// How grading one item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Graded normally.
    Graded,
    /// Hit the per-item time limit (score 0).
    Timeout,
    /// Invalid item, or a response that broke the grader (score 0).
    Error,
    /// The verifier itself could not grade (no sandbox, a sandbox that failed to start, an
    /// I/O error): no verdict on the response; the caller should grade it again later.
    Unavailable,
}

/// The grade of one item.
#[derive(Debug, Clone, PartialEq)]
pub struct GradeResult {
    /// The item's id.
    pub id: String,
    /// Score in [0, 1].
    pub score: f64,
    /// How grading ended.
    pub outcome: Outcome,
    /// Human-readable reason.
    pub reason: String,
    /// Math: the extracted final answer.
    pub extracted_answer: Option<String>,
    /// Time spent grading (queueing excluded).
    pub latency: Duration,
}

/// Settings of a [`Grader`].
#[derive(Debug, Clone)]
pub struct GraderConfig {
    /// Most items graded at once (defaults to the number of cores).
    pub max_concurrency: usize,
    /// Time limit for one item, all of its code tests included.
    pub item_timeout: Duration,
    /// Code scoring settings.
    pub code: CodeGraderConfig,
    /// Limits of each sandboxed code run.
    pub sandbox: SandboxLimits,
}

impl Default for GraderConfig {
    fn default() -> Self {
        Self {
            max_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            item_timeout: Duration::from_secs(120),
            code: CodeGraderConfig::default(),
            sandbox: SandboxLimits::default(),
        }
    }
}

/// A snapshot of the grader's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct GraderStatus {
    /// Items graded (any outcome).
    pub items_graded: u64,
    /// Items that timed out.
    pub timeouts: u64,
    /// Items that ended with an error.
    pub errors: u64,
    /// Median latency, milliseconds.
    pub latency_p50_ms: f64,
    /// 99th-percentile latency, milliseconds.
    pub latency_p99_ms: f64,
    /// Items waiting for a slot.
    pub queue_depth: u64,
    /// Items being graded.
    pub in_flight: u64,
    /// Slots.
    pub max_concurrency: usize,
    /// Sandbox backend name, or "unavailable".
    pub sandbox_backend: String,
    /// Whether runs get their own cgroup.
    pub sandbox_cgroup: bool,
}

/// Grades items with bounded concurrency. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Grader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: GraderConfig,
    /// `None` when no usable python3 was found: code items then fail with a reason.
    sandbox: Option<Sandbox>,
    slots: Arc<Semaphore>,
    metrics: Metrics,
}

impl Grader {
    /// Builds a grader, probing for python3 and the best sandbox backend.
    pub fn new(config: GraderConfig) -> Self {
        let sandbox = match Sandbox::detect(config.sandbox.clone()) {
            // One sandbox started ahead per slot: a test's critical path is then the program.
            Ok(s) => Some(s.with_warm_pool(config.max_concurrency.max(1))),
            Err(e) => {
                tracing::warn!(error = %e, "no code sandbox: code items will be scored 0");
                None
            }
        };
        Self::with_sandbox(config, sandbox)
    }

    /// Builds a grader around an existing sandbox (or none).
    pub fn with_sandbox(config: GraderConfig, sandbox: Option<Sandbox>) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_concurrency.max(1)));
        Self {
            inner: Arc::new(Inner {
                config,
                sandbox,
                slots,
                metrics: Metrics::default(),
            }),
        }
    }

    /// The metrics this grader records.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Grades one item synchronously on the calling thread, without a slot; code tests stop
    /// at the per-item time limit.
    pub fn grade_now(&self, item: &GradeItem) -> GradeResult {
        let started = Instant::now();
        let deadline = started + self.inner.config.item_timeout;
        let (score, outcome, reason, extracted) = match self.dispatch(item, deadline) {
            Ok((score, reason, extracted)) => (score, Outcome::Graded, reason, extracted),
            Err(
                e @ (VerifierError::Sandbox(_)
                | VerifierError::Io(_)
                | VerifierError::Unavailable(_)
                | VerifierError::Config(_)
                | VerifierError::File(_)),
            ) => (0.0, Outcome::Unavailable, e.to_string(), None),
            Err(e @ VerifierError::InvalidRequest(_)) => (0.0, Outcome::Error, e.to_string(), None),
        };
        GradeResult {
            id: item.id.clone(),
            score,
            outcome,
            reason,
            extracted_answer: extracted,
            latency: started.elapsed(),
        }
    }

    fn dispatch(
        &self,
        item: &GradeItem,
        deadline: Instant,
    ) -> Result<(f64, String, Option<String>), VerifierError> {
        match item.ability {
            Some(Ability::Math) => {
                let v = grade_math(&item.response, &item.ground_truth);
                Ok((v.score(), v.reason, v.extracted))
            }
            Some(Ability::Code) => {
                let sandbox = self.inner.sandbox.as_ref().ok_or_else(|| {
                    VerifierError::Unavailable("no python3 sandbox on this host".into())
                })?;
                let v = grade_code(
                    sandbox,
                    &self.inner.config.code,
                    &item.response,
                    &item.ground_truth,
                    Some(deadline),
                )?;
                Ok((v.score, v.reason, None))
            }
            None => Err(VerifierError::InvalidRequest(
                "ability must be \"math\" or \"code\"".into(),
            )),
        }
    }

    /// Grades one item in a slot, on a blocking thread, under the per-item time limit.
    /// Never fails: problems become a score of 0 with a reason.
    pub async fn grade(&self, item: GradeItem) -> GradeResult {
        let metrics = &self.inner.metrics;
        let queued = metrics.enter_queue();
        let permit = match self.inner.slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => {
                drop(queued);
                return self.finish(error_result(&item.id, "grader is shutting down"));
            }
        };
        drop(queued);
        let running = metrics.enter_flight();
        let started = Instant::now();
        let id = item.id.clone();
        let this = self.clone();
        // The slot is held by the blocking task itself, so an item that outlives its time limit
        // still counts against the concurrency bound until it really stops.
        let task = tokio::task::spawn_blocking(move || {
            let result = this.grade_now(&item);
            drop(permit);
            result
        });
        let result = match tokio::time::timeout(self.inner.config.item_timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join_error)) => {
                tracing::error!(id = %id, error = %join_error, "grading task failed");
                error_result(&id, "internal error while grading")
            }
            Err(_) => GradeResult {
                id: id.clone(),
                score: 0.0,
                outcome: Outcome::Timeout,
                reason: format!(
                    "timed out after {:.1} s",
                    self.inner.config.item_timeout.as_secs_f64()
                ),
                extracted_answer: None,
                latency: started.elapsed(),
            },
        };
        drop(running);
        self.finish(result)
    }

    /// Grades a batch concurrently (up to the slot count); results in input order.
    pub async fn grade_batch(&self, items: Vec<GradeItem>) -> Vec<GradeResult> {
        let mut set = tokio::task::JoinSet::new();
        let n = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let this = self.clone();
            set.spawn(async move { (i, this.grade(item).await) });
        }
        let mut results: Vec<Option<GradeResult>> = vec![None; n];
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, r)) => results[i] = Some(r),
                Err(e) => tracing::error!(error = %e, "batch task failed"),
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| error_result("", "internal error while grading")))
            .collect()
    }

    fn finish(&self, result: GradeResult) -> GradeResult {
        self.inner.metrics.record(result.outcome, result.latency);
        tracing::debug!(
            id = %result.id,
            score = result.score,
            outcome = ?result.outcome,
            latency_ms = result.latency.as_secs_f64() * 1e3,
            "graded"
        );
        result
    }

    /// Current figures.
    pub fn status(&self) -> GraderStatus {
        let m = &self.inner.metrics;
        let (p50, p99) = m.latency_percentiles_ms();
        GraderStatus {
            items_graded: m.items_graded(),
            timeouts: m.timeouts(),
            errors: m.errors(),
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            queue_depth: m.queue_depth(),
            in_flight: m.in_flight(),
            max_concurrency: self.inner.config.max_concurrency.max(1),
            sandbox_backend: self
                .inner
                .sandbox
                .as_ref()
                .map_or("unavailable", |s| s.backend().name())
                .to_string(),
            sandbox_cgroup: self.inner.sandbox.as_ref().is_some_and(Sandbox::has_cgroup),
        }
    }
}

fn error_result(id: &str, reason: &str) -> GradeResult {
    GradeResult {
        id: id.to_string(),
        score: 0.0,
        outcome: Outcome::Error,
        reason: reason.to_string(),
        extracted_answer: None,
        latency: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(ability: Option<Ability>, response: &str, ground_truth: &str) -> GradeItem {
        GradeItem {
            id: "x".into(),
            ability,
            response: response.into(),
            ground_truth: ground_truth.into(),
        }
    }

    #[test]
    fn a_verifier_that_cannot_grade_says_so_instead_of_a_verdict() {
        // No sandbox: code cannot be run, which says nothing about the response.
        let grader = Grader::with_sandbox(GraderConfig::default(), None);
        let spec = r#"{"inputs": ["1\n"], "outputs": ["1\n"]}"#;
        let code = grader.grade_now(&item(Some(Ability::Code), "print(1)", spec));
        assert_eq!(code.outcome, Outcome::Unavailable, "{code:?}");
        assert_eq!(code.score, 0.0);
        // A bad item is the caller's error, and math needs no sandbox.
        let unknown = grader.grade_now(&item(None, "x", "y"));
        assert_eq!(unknown.outcome, Outcome::Error);
        let math = grader.grade_now(&item(Some(Ability::Math), "\\boxed{2}", "2"));
        assert_eq!((math.outcome, math.score), (Outcome::Graded, 1.0));
    }
}
