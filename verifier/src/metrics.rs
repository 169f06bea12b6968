//! Counters and latency percentiles of the grader, and their Prometheus text form.

use crate::grade::Outcome;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latencies kept for the percentiles (a sliding window of recent items).
const LATENCY_WINDOW: usize = 4096;

/// Grader metrics; all methods are thread-safe.
#[derive(Debug, Default)]
pub struct Metrics {
    graded: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    queued: AtomicU64,
    in_flight: AtomicU64,
    latency_seconds_sum_micros: AtomicU64,
    recent_latencies_ms: Mutex<VecDeque<f64>>,
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts an item waiting for a slot until the guard is dropped.
    pub fn enter_queue(&self) -> GaugeGuard<'_> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.queued)
    }

    /// Counts an item being graded until the guard is dropped.
    pub fn enter_flight(&self) -> GaugeGuard<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.in_flight)
    }

    /// Records a finished item.
    pub fn record(&self, outcome: Outcome, latency: Duration) {
        self.graded.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Graded => {}
            Outcome::Timeout => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Error | Outcome::Unavailable => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_seconds_sum_micros
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        if let Ok(mut window) = self.recent_latencies_ms.lock() {
            if window.len() == LATENCY_WINDOW {
                window.pop_front();
            }
            window.push_back(latency.as_secs_f64() * 1e3);
        }
    }

    /// Items graded.
    pub fn items_graded(&self) -> u64 {
        self.graded.load(Ordering::Relaxed)
    }

    /// Items timed out.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    /// Items with errors.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Items waiting for a slot.
    pub fn queue_depth(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Items being graded.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
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

    /// The Prometheus text exposition of these metrics.
    pub fn prometheus_text(&self) -> String {
        let (p50, p99) = self.latency_percentiles_ms();
        let rows: [(&str, &str, &str, f64); 8] = [
            (
                "prime_verifier_items_graded_total",
                "counter",
                "Items graded, any outcome.",
                self.items_graded() as f64,
            ),
            (
                "prime_verifier_timeouts_total",
                "counter",
                "Items that hit the per-item time limit.",
                self.timeouts() as f64,
            ),
            (
                "prime_verifier_errors_total",
                "counter",
                "Items that ended with an error.",
                self.errors() as f64,
            ),
            (
                "prime_verifier_queue_depth",
                "gauge",
                "Items waiting for a grading slot.",
                self.queue_depth() as f64,
            ),
            (
                "prime_verifier_in_flight",
                "gauge",
                "Items being graded.",
                self.in_flight() as f64,
            ),
            (
                "prime_verifier_latency_seconds_sum",
                "counter",
                "Total grading time.",
                self.latency_seconds_sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            ),
            (
                "prime_verifier_latency_p50_seconds",
                "gauge",
                "Median latency of recent items.",
                p50 / 1e3,
            ),
            (
                "prime_verifier_latency_p99_seconds",
                "gauge",
                "99th-percentile latency of recent items.",
                p99 / 1e3,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}
