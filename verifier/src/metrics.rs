//! Counters, levels and latencies of the grader, for `Status` and Prometheus.

use crate::grade::Outcome;
use prime_proto::metrics::{
    duration_histogram, register, register_counter, Counter, Gauge, Histogram, Registry,
};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Latencies kept for the `Status` percentiles (a sliding window of recent items).
const LATENCY_WINDOW: usize = 4096;

/// Grader metrics; all methods are thread-safe. The instruments are shared with the
/// [`Registry`] of [`Metrics::registry`].
#[derive(Debug)]
pub struct Metrics {
    graded: Counter,
    timeouts: Counter,
    errors: Counter,
    queued: Gauge,
    in_flight: Gauge,
    latency: Histogram,
    recent_latencies_ms: Mutex<VecDeque<f64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            graded: Counter::default(),
            timeouts: Counter::default(),
            errors: Counter::default(),
            queued: Gauge::default(),
            in_flight: Gauge::default(),
            latency: duration_histogram(),
            recent_latencies_ms: Mutex::default(),
        }
    }
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Counts an item waiting for a slot until the guard is dropped.
    pub fn enter_queue(&self) -> GaugeGuard<'_> {
        self.queued.inc();
        GaugeGuard(&self.queued)
    }

    /// Counts an item being graded until the guard is dropped.
    pub fn enter_flight(&self) -> GaugeGuard<'_> {
        self.in_flight.inc();
        GaugeGuard(&self.in_flight)
    }

    /// Records a finished item.
    pub fn record(&self, outcome: Outcome, latency: Duration) {
        self.graded.inc();
        match outcome {
            Outcome::Graded => {}
            Outcome::Timeout => {
                self.timeouts.inc();
            }
            Outcome::Error | Outcome::Unavailable => {
                self.errors.inc();
            }
        }
        self.latency.observe(latency.as_secs_f64());
        if let Ok(mut window) = self.recent_latencies_ms.lock() {
            if window.len() == LATENCY_WINDOW {
                window.pop_front();
            }
            window.push_back(latency.as_secs_f64() * 1e3);
        }
    }

    /// Items graded.
    pub fn items_graded(&self) -> u64 {
        self.graded.get()
    }

    /// Items timed out.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.get()
    }

    /// Items with errors.
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    /// Items waiting for a slot.
    pub fn queue_depth(&self) -> u64 {
        self.queued.get().max(0) as u64
    }

    /// Items being graded.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.get().max(0) as u64
    }

    /// (p50, p99) of recent latencies in milliseconds; zeros before the first item.
    pub fn latency_percentiles_ms(&self) -> (f64, f64) {
        let mut v: Vec<f64> = match self.recent_latencies_ms.lock() {
            Ok(w) => w.iter().copied().collect(),
            Err(_) => return (0.0, 0.0),
        };
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.99))
    }

    /// A registry of these metrics (docs/metrics.md, "Prometheus").
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        register_counter(
            &mut registry,
            "prime_verifier_items_graded_total",
            "Items graded, any outcome.",
            self.graded.clone(),
        );
        register_counter(
            &mut registry,
            "prime_verifier_timeouts_total",
            "Items that hit the per-item time limit.",
            self.timeouts.clone(),
        );
        register_counter(
            &mut registry,
            "prime_verifier_errors_total",
            "Items that ended with an error.",
            self.errors.clone(),
        );
        register(
            &mut registry,
            "prime_verifier_queue_depth",
            "Items waiting for a grading slot.",
            self.queued.clone(),
        );
        register(
            &mut registry,
            "prime_verifier_in_flight",
            "Items being graded.",
            self.in_flight.clone(),
        );
        register(
            &mut registry,
            "prime_verifier_grade_duration_seconds",
            "Time an item took to grade once it had a slot.",
            self.latency.clone(),
        );
        registry
    }
}
