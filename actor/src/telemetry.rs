//! The actor's Prometheus metrics and probes, served on its metrics port
//! ([`ActorConfig::metrics_listen`](crate::ActorConfig::metrics_listen)) by
//! [`prime_proto::metrics`]: `/metrics`, `/healthz` (alive while the process serves) and
//! `/readyz` (ready once registered with the learner and holding the weights of the learner's
//! current policy version). Names, types and labels: docs/metrics.md, "Prometheus".
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use prime_proto::metrics::{
    duration_histogram, register, register_counter, token_histogram, Counter, Family, Gauge,
    Histogram, Probes, Registry,
};

use crate::run::BatchTimes;

/// One label, e.g. `outcome="accepted"`.
type Label = [(&'static str, &'static str); 1];

/// The actor's instruments; cheap to share (`Arc`) between the compute thread and the
/// metrics server.
#[derive(Debug)]
pub struct ActorMetrics {
    registered: AtomicBool,
    /// Version of the weights held; -1 while none are.
    held_version: AtomicI64,
    /// The learner's current policy version, as its last reply said; -1 before any.
    learner_version: AtomicI64,
    registrations: Counter,
    batches: Counter,
    abandoned_batches: Counter,
    weight_updates: Family<Label, Counter>,
    responses: Counter,
    generated_tokens: Counter,
    groups: Family<Label, Counter>,
    phase_seconds: Family<Label, Histogram, fn() -> Histogram>,
    response_tokens: Histogram,
    registered_gauge: Gauge,
    held_gauge: Gauge,
    learner_gauge: Gauge,
}

/// The `phase` labels of `prime_actor_batch_phase_duration_seconds`, in [`BatchTimes`] order.
pub const PHASES: [&str; 5] = ["waiting", "weights", "sampling", "grading", "submitting"];
/// The `outcome` labels of `prime_actor_groups_total`.
pub const GROUP_OUTCOMES: [&str; 4] = ["accepted", "duplicate", "stale", "rejected"];
/// The `source` labels of `prime_actor_weight_updates_total`.
pub const WEIGHT_SOURCES: [&str; 2] = ["grpc", "broadcast"];

impl Default for ActorMetrics {
    fn default() -> Self {
        let metrics = Self {
            registered: AtomicBool::new(false),
            held_version: AtomicI64::new(-1),
            learner_version: AtomicI64::new(-1),
            registrations: Counter::default(),
            batches: Counter::default(),
            abandoned_batches: Counter::default(),
            weight_updates: Family::default(),
            responses: Counter::default(),
            generated_tokens: Counter::default(),
            groups: Family::default(),
            phase_seconds: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            response_tokens: token_histogram(),
            registered_gauge: Gauge::default(),
            held_gauge: Gauge::default(),
            learner_gauge: Gauge::default(),
        };
        // Every label value is exported from the start, at zero.
        for outcome in GROUP_OUTCOMES {
            drop(metrics.groups.get_or_create(&[("outcome", outcome)]));
        }
        for source in WEIGHT_SOURCES {
            drop(metrics.weight_updates.get_or_create(&[("source", source)]));
        }
        for phase in PHASES {
            drop(metrics.phase_seconds.get_or_create(&[("phase", phase)]));
        }
        metrics.held_gauge.set(-1);
        metrics.learner_gauge.set(-1);
        metrics
    }
}

/// Whether an actor is ready: registered, and holding the weights of the learner's current
/// version (`held` and `current` are -1 when unknown).
pub fn is_ready(registered: bool, held: i64, current: i64) -> bool {
    registered && held >= 0 && held == current
}

impl ActorMetrics {
    /// A registry of these metrics.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        register_counter(
            &mut r,
            "prime_actor_registrations_total",
            "Successful Register calls (1 plus one per lost learner session).",
            self.registrations.clone(),
        );
        register_counter(
            &mut r,
            "prime_actor_batches_total",
            "Work batches sampled, graded and submitted.",
            self.batches.clone(),
        );
        register_counter(
            &mut r,
            "prime_actor_batches_abandoned_total",
            "Work batches given up (weights or grades unobtainable, session lost, stopped).",
            self.abandoned_batches.clone(),
        );
        register(
            &mut r,
            "prime_actor_weight_updates",
            "Policy weight versions applied, by how they arrived.",
            self.weight_updates.clone(),
        );
        register_counter(
            &mut r,
            "prime_actor_responses_total",
            "Responses sampled.",
            self.responses.clone(),
        );
        register_counter(
            &mut r,
            "prime_actor_generated_tokens_total",
            "Tokens sampled, over all responses.",
            self.generated_tokens.clone(),
        );
        register(
            &mut r,
            "prime_actor_groups",
            "Groups submitted, by the learner's answer.",
            self.groups.clone(),
        );
        register(
            &mut r,
            "prime_actor_batch_phase_duration_seconds",
            "Time of each phase of a submitted batch.",
            self.phase_seconds.clone(),
        );
        register(
            &mut r,
            "prime_actor_response_length_tokens",
            "Tokens of each response sampled.",
            self.response_tokens.clone(),
        );
        register(
            &mut r,
            "prime_actor_registered",
            "1 while the actor holds a learner session, else 0.",
            self.registered_gauge.clone(),
        );
        register(
            &mut r,
            "prime_actor_policy_version",
            "Policy version of the weights held (-1: none yet).",
            self.held_gauge.clone(),
        );
        register(
            &mut r,
            "prime_actor_learner_policy_version",
            "The learner's current policy version as last heard (-1: not yet).",
            self.learner_gauge.clone(),
        );
        r
    }

    /// The probes of the metrics port: alive while it answers, ready per [`is_ready`].
    pub fn probes(self: &Arc<Self>) -> Probes {
        let this = self.clone();
        Probes::new(|| true, move || this.ready())
    }

    /// Whether the actor is ready now (see [`is_ready`]).
    pub fn ready(&self) -> bool {
        is_ready(
            self.registered.load(Ordering::Relaxed),
            self.held_version.load(Ordering::Relaxed),
            self.learner_version.load(Ordering::Relaxed),
        )
    }

    /// A session began (`true`) or was lost (`false`).
    pub fn set_registered(&self, registered: bool) {
        if registered {
            self.registrations.inc();
        }
        self.registered.store(registered, Ordering::Relaxed);
        self.registered_gauge.set(i64::from(registered));
    }

    /// The learner said its current version is `version`.
    pub fn learner_version(&self, version: u64) {
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        self.learner_version.store(v, Ordering::Relaxed);
        self.learner_gauge.set(v);
    }

    /// The policy now holds the weights of `version` (`None`: no version), which arrived by
    /// `source` (one of [`WEIGHT_SOURCES`]) when given.
    pub fn held_version(&self, version: Option<u64>, source: Option<&'static str>) {
        let v = version.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        self.held_version.store(v, Ordering::Relaxed);
        self.held_gauge.set(v);
        if let (Some(_), Some(source)) = (version, source) {
            self.weight_updates
                .get_or_create(&[("source", source)])
                .inc();
        }
    }

    /// Responses sampled, with their token counts.
    pub fn sampled(&self, response_lengths: impl Iterator<Item = usize>) {
        for n in response_lengths {
            self.responses.inc();
            self.generated_tokens.inc_by(n as u64);
            self.response_tokens.observe(n as f64);
        }
    }

    /// A batch was submitted: its phases and the learner's answer.
    pub fn submitted(&self, time: &BatchTimes, reply: &prime_proto::v1::SubmitReply) {
        self.batches.inc();
        let parts = [
            time.waiting,
            time.weights,
            time.sampling,
            time.grading,
            time.submitting,
        ];
        for (phase, seconds) in PHASES.iter().zip(parts) {
            self.phase_seconds
                .get_or_create(&[("phase", phase)])
                .observe(seconds.as_secs_f64());
        }
        let counts = [
            reply.accepted,
            reply.duplicates,
            reply.stale,
            reply.rejected,
        ];
        for (outcome, n) in GROUP_OUTCOMES.iter().zip(counts) {
            self.groups
                .get_or_create(&[("outcome", outcome)])
                .inc_by(u64::from(n));
        }
    }

    /// A batch was given up.
    pub fn abandoned(&self) {
        self.abandoned_batches.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_registered_with_the_current_weights() {
        assert!(is_ready(true, 3, 3));
        assert!(!is_ready(false, 3, 3), "no session");
        assert!(!is_ready(true, 2, 3), "old weights");
        assert!(!is_ready(true, -1, -1), "no weights yet");
        let metrics = Arc::new(ActorMetrics::default());
        let probes = metrics.probes();
        assert!(!metrics.ready());
        metrics.set_registered(true);
        metrics.learner_version(0);
        assert!(!metrics.ready());
        metrics.held_version(Some(0), Some("grpc"));
        assert!(metrics.ready());
        metrics.learner_version(1);
        assert!(!metrics.ready(), "the learner published a new version");
        metrics.held_version(Some(1), Some("broadcast"));
        assert!(metrics.ready());
        metrics.set_registered(false);
        assert!(!metrics.ready());
        drop(probes);
        let text = prime_proto::metrics::render(&metrics.registry());
        for line in [
            "prime_actor_registrations_total 1",
            "prime_actor_weight_updates_total{source=\"grpc\"} 1",
            "prime_actor_weight_updates_total{source=\"broadcast\"} 1",
            "prime_actor_registered 0",
            "prime_actor_policy_version 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }
}
