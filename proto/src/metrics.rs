//! The Prometheus exporter every role serves: typed `prometheus-client` instruments in one
//! [`Registry`] per process, written on `GET /metrics` by [`serve`], which also answers the
//! liveness (`GET /healthz`) and readiness (`GET /readyz`) probes. A scraper that accepts
//! OpenMetrics (Prometheus does) gets it; any other gets the Prometheus text format 0.0.4
//! ([`to_prometheus_text`]), which `curl` users and the classic parsers read.
//!
//! Conventions (docs/metrics.md, "Prometheus"): names start with `prime_{role}_`; counters end
//! in `_total`; durations are histograms in seconds (`_seconds`), sizes are histograms in their
//! unit (`_tokens`); gauges are levels only. Figures a role already keeps for its `Status` reply
//! are read at scrape time by a [`Snapshot`] collector, so each is counted once.
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`to_prometheus_text`]'s text.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A histogram of durations in seconds: 16 buckets from 1 ms growing by 2.5x (up to 15.5 min).
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 16))
}

/// A histogram of sizes in tokens: 17 buckets from 1 doubling up to 65,536.
pub fn token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 17))
}

/// A histogram of counts (items in a batch): 13 buckets from 1 doubling up to 4,096.
pub fn count_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// The name `prometheus-client` wants for a counter: its exposed name without `_total`, which
/// the encoder appends. Names are written in full in the code so they can be searched for.
fn counter_base(name: &str) -> &str {
    debug_assert!(
        name.ends_with("_total"),
        "counter {name} must end in _total"
    );
    name.strip_suffix("_total").unwrap_or(name)
}

/// Registers `metric` as `name` with the sentence `help` (`prometheus-client` adds the full
/// stop itself, so one ending `help` is dropped).
pub fn register(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    registry.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

/// Registers `counter` as `name` (which ends in `_total`).
pub fn register_counter(registry: &mut Registry, name: &str, help: &str, counter: Counter) {
    register(registry, counter_base(name), help, counter);
}

/// A collector that reads its figures when scraped: `write` names each one on a [`Sink`].
pub struct Snapshot<F>(pub F);

impl<F> fmt::Debug for Snapshot<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Snapshot")
    }
}

impl<F: Fn(&mut Sink<'_>) + Send + Sync + 'static> Collector for Snapshot<F> {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let mut sink = Sink {
            encoder,
            result: Ok(()),
        };
        (self.0)(&mut sink);
        sink.result
    }
}

/// Where a [`Snapshot`] writes its figures; the first encoding error is kept and returned.
pub struct Sink<'a> {
    encoder: DescriptorEncoder<'a>,
    result: fmt::Result,
}

impl Sink<'_> {
    fn write(
        &mut self,
        name: &str,
        help: &str,
        metric: &dyn EncodeMetric,
        labelled: &[(&str, &str, &dyn EncodeMetric)],
    ) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            let mut encoder =
                self.encoder
                    .encode_descriptor(name, help, None, metric.metric_type())?;
            if labelled.is_empty() {
                return metric.encode(encoder);
            }
            for (key, value, metric) in labelled {
                let labels = [(*key, *value)];
                metric.encode(encoder.encode_family(&labels)?)?;
            }
            Ok(())
        })();
    }

    /// A counter named `name` (ending in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let metric = ConstCounter::new(value);
        self.write(counter_base(name), help, &metric, &[]);
    }

    /// One counter per value of label `label`, e.g. `outcome`.
    pub fn counters(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        let metrics: Vec<ConstCounter> = values.iter().map(|v| ConstCounter::new(v.1)).collect();
        let labelled: Vec<(&str, &str, &dyn EncodeMetric)> = values
            .iter()
            .zip(&metrics)
            .map(|((value, _), metric)| (label, *value, metric as &dyn EncodeMetric))
            .collect();
        let first = ConstCounter::new(0u64);
        self.write(counter_base(name), help, &first, &labelled);
    }

    /// A gauge: a level that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.write(name, help, &ConstGauge::new(value), &[]);
    }

    /// A histogram kept elsewhere (e.g. in a part attached after start-up).
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.write(name, help, histogram, &[]);
    }
}

/// What the probe endpoints answer: `/healthz` is 200 while `live` says so, `/readyz` while
/// `ready` does (503 otherwise).
#[derive(Clone)]
pub struct Probes {
    live: Arc<dyn Fn() -> bool + Send + Sync>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes")
            .field("live", &(self.live)())
            .field("ready", &(self.ready)())
            .finish()
    }
}

impl Default for Probes {
    /// Alive and ready whenever the server answers.
    fn default() -> Self {
        Self::new(|| true, || true)
    }
}

impl Probes {
    /// Probes answered by `live` and `ready`.
    pub fn new(
        live: impl Fn() -> bool + Send + Sync + 'static,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            live: Arc::new(live),
            ready: Arc::new(ready),
        }
    }
}

/// The OpenMetrics text of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String fails only if a collector does.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(error = %e, "a metric could not be encoded");
    }
    text
}

/// OpenMetrics text (as [`render`] writes it) in the Prometheus text format 0.0.4: a counter's
/// `# HELP` and `# TYPE` lines name its `_total` sample (OpenMetrics names the family without
/// it), and the `# UNIT` and `# EOF` lines, which that format lacks, are left out.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match described {
            Some(line) => out.push_str(line.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Whether an `Accept` header asks for OpenMetrics.
fn wants_openmetrics(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn probe(ok: bool) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The HTTP routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(registry: Arc<Registry>, probes: Probes) -> axum::Router {
    let Probes { live, ready } = probes;
    axum::Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let registry = registry.clone();
                async move {
                    let text = render(&registry);
                    if wants_openmetrics(&headers) {
                        ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
                    } else {
                        let text = to_prometheus_text(&text);
                        ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], text)
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let ok = live();
                async move { probe(ok).into_response() }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ok = ready();
                async move { probe(ok).into_response() }
            }),
        )
}

/// Serves [`router`] on `listener` until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    probes: Probes,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry, probes)).await
}

/// Binds `addr` and serves [`router`] there on a task of the current runtime; returns the
/// bound address (port 0 picks a free one).
pub async fn start(
    addr: SocketAddr,
    registry: Arc<Registry>,
    probes: Probes,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics listening");
    tokio::spawn(async move {
        if let Err(e) = serve(listener, registry, probes).await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gain_total_and_labels_and_histograms_count_observations() {
        let mut registry = Registry::default();
        let counter = Counter::default();
        register_counter(
            &mut registry,
            "prime_x_things_total",
            "Things.",
            counter.clone(),
        );
        let histogram = duration_histogram();
        register(
            &mut registry,
            "prime_x_wait_seconds",
            "Waits.",
            histogram.clone(),
        );
        registry.register_collector(Box::new(Snapshot(|sink: &mut Sink<'_>| {
            sink.gauge("prime_x_level", "A level.", 2.5);
            sink.counters(
                "prime_x_groups_total",
                "Groups.",
                "outcome",
                &[("kept", 3), ("stale", 1)],
            );
        })));
        counter.inc_by(4);
        histogram.observe(0.002);
        histogram.observe(100.0);
        let text = render(&registry);
        for line in [
            "# HELP prime_x_things Things.",
            "# HELP prime_x_level A level.",
            "# TYPE prime_x_things counter",
            "prime_x_things_total 4",
            "# TYPE prime_x_wait_seconds histogram",
            "prime_x_wait_seconds_count 2",
            "prime_x_wait_seconds_bucket{le=\"0.001\"} 0",
            "prime_x_wait_seconds_bucket{le=\"0.0025\"} 1",
            "prime_x_wait_seconds_bucket{le=\"+Inf\"} 2",
            "# TYPE prime_x_level gauge",
            "prime_x_level 2.5",
            "prime_x_groups_total{outcome=\"kept\"} 3",
            "prime_x_groups_total{outcome=\"stale\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        let classic = to_prometheus_text(&text);
        for line in [
            "# HELP prime_x_things_total Things.",
            "# TYPE prime_x_things_total counter",
            "prime_x_things_total 4",
            "# TYPE prime_x_groups_total counter",
            "# TYPE prime_x_wait_seconds histogram",
            "# TYPE prime_x_level gauge",
        ] {
            assert!(
                classic.lines().any(|l| l == line),
                "{line:?} not in\n{classic}"
            );
        }
        assert!(!classic.contains("# EOF"));
        assert_eq!(classic.lines().count(), text.lines().count() - 1);
    }
}
