//! `prime status --addr URL`: asks whichever prime-rs service answers at URL for its `Status`
//! and prints the figures as a table. Each service's Status RPC is tried in turn; a server
//! answers UNIMPLEMENTED for a service it does not host, which means: try the next.
use std::time::Duration;

use anyhow::Context;
use prime_proto::auth::ClientTls;
use prime_proto::client::{
    lazy_channel_secure, learner_client, prm_client, request, verifier_client,
};
use prime_proto::v1 as pb;

/// `prime status --addr URL [--token T] [--json]`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// gRPC URL of a learner, verifier or PRM server, e.g. http://127.0.0.1:50053.
    #[arg(long)]
    pub addr: String,
    /// Shared token, sent as `authorization: Bearer TOKEN`.
    #[arg(long, env = "PRIME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS for an https:// address.
    #[command(flatten)]
    pub security: super::tls::ClientSecurityArgs,
    /// Deadline of each Status call, in seconds.
    #[arg(
        long,
        default_value_t = 10.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(prime_check::rules::SECONDS),
    )]
    pub timeout_secs: f64,
    /// Print one JSON object (role, build version and every figure, numbers as numbers)
    /// instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// What the service at the address reported.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceStatus {
    /// A learner's figures.
    Learner(pb::LearnerStatus),
    /// A verifier's figures.
    Verifier(pb::VerifierStatusResponse),
    /// A PRM server's figures.
    Prm(pb::PrmStatus),
    /// A server with no prime-rs Status API that answers `grpc.health.v1` (a learner rank
    /// above 0): the health of `prime.v1.Learner`, else of the whole server.
    Health(String),
}

/// Asks the service at `addr` for its status, trying the learner, verifier and PRM-server
/// APIs in that order (over TLS when `addr` is `https://`).
pub async fn query(
    addr: &str,
    token: Option<&str>,
    tls: &ClientTls,
    timeout: Duration,
) -> anyhow::Result<ServiceStatus> {
    let channel = lazy_channel_secure("service", addr, timeout, token, tls)?;
    // A typed error, so that a peer that is down exits as retryable (crate::exit).
    let answer = |result: Result<ServiceStatus, tonic::Status>, api: &'static str| match result {
        Ok(status) => Ok(Some(status)),
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
        Err(s) => Err(
            anyhow::Error::new(prime_proto::client::ClientError::rpc(api, "Status", &s))
                .context(format!("the status of {addr}")),
        ),
    };
    let learner = learner_client(channel.clone())
        .status(request(pb::LearnerStatusRequest {}, timeout))
        .await
        .map(|r| ServiceStatus::Learner(r.into_inner()));
    if let Some(status) = answer(learner, "Learner")? {
        return Ok(status);
    }
    let verifier = verifier_client(channel.clone())
        .status(request(pb::VerifierStatusRequest {}, timeout))
        .await
        .map(|r| ServiceStatus::Verifier(r.into_inner()));
    if let Some(status) = answer(verifier, "Verifier")? {
        return Ok(status);
    }
    let prm = prm_client(channel.clone())
        .status(request(pb::PrmStatusRequest {}, timeout))
        .await
        .map(|r| ServiceStatus::Prm(r.into_inner()));
    if let Some(status) = answer(prm, "PrmServer")? {
        return Ok(status);
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = health
        .check(request(
            tonic_health::pb::HealthCheckRequest {
                service: "prime.v1.Learner".into(),
            },
            timeout,
        ))
        .await
        .with_context(|| format!("{addr} implements no prime-rs Status RPC and no health check"))?
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::try_from(check.status)
        .map_or_else(
            |_| format!("unknown ({})", check.status),
            |s| s.as_str_name().to_string(),
        );
    anyhow::ensure!(
        check.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "{addr}: learner rank not serving: {serving}"
    );
    Ok(ServiceStatus::Health(serving))
}

fn version(build: &Option<pb::BuildInfo>) -> String {
    build
        .as_ref()
        .map_or_else(|| "?".into(), |b| b.version.clone())
}

/// A learner's phase as the table shows it: a lowercase word, or the number a newer learner
/// sent.
fn phase(phase: i32) -> String {
    match pb::LearnerPhase::try_from(phase) {
        Ok(pb::LearnerPhase::Collecting) => "collecting".into(),
        Ok(pb::LearnerPhase::Training) => "training".into(),
        Ok(pb::LearnerPhase::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown ({phase})"),
    }
}

impl ServiceStatus {
    /// `(label, value)` rows, the role first.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        match self {
            ServiceStatus::Learner(s) => vec![
                ("role", "learner".into()),
                ("version", version(&s.build)),
                ("phase", phase(s.phase)),
                ("policy version", s.policy_version.to_string()),
                ("step", s.step.to_string()),
                ("pending prompts", s.pending_prompts.to_string()),
                ("groups buffered", s.groups_buffered.to_string()),
                ("connected actors", s.connected_actors.to_string()),
                ("tokens/s", format!("{:.1}", s.tokens_per_second)),
                (
                    "filter pass rate",
                    format!("{:.1}%", 100.0 * s.filter_pass_rate),
                ),
                ("errors", s.errors.to_string()),
            ],
            ServiceStatus::Verifier(s) => vec![
                ("role", "verifier".into()),
                ("version", version(&s.build)),
                ("items graded", s.items_graded.to_string()),
                ("timeouts", s.timeouts.to_string()),
                ("errors", s.errors.to_string()),
                ("latency p50", format!("{:.1} ms", s.latency_p50_ms)),
                ("latency p99", format!("{:.1} ms", s.latency_p99_ms)),
                ("queue depth", s.queue_depth.to_string()),
                ("in flight", s.in_flight.to_string()),
                ("max concurrency", s.max_concurrency.to_string()),
                ("sandbox", s.sandbox_backend.clone()),
                (
                    "sandbox cgroup",
                    if s.sandbox_cgroup { "yes" } else { "no" }.into(),
                ),
            ],
            ServiceStatus::Prm(s) => vec![
                ("role", "prm-server".into()),
                ("version", version(&s.build)),
                ("prm model", s.prm_model.clone()),
                ("reference model", s.reference_model.clone()),
                ("beta", s.beta.to_string()),
                ("responses scored", s.responses_scored.to_string()),
                ("tokens scored", s.tokens_scored.to_string()),
                ("tokens/s", format!("{:.1}", s.tokens_per_second)),
                ("queue depth", s.queue_depth.to_string()),
                ("latency p50", format!("{:.1} ms", s.latency_p50_ms)),
                ("latency p99", format!("{:.1} ms", s.latency_p99_ms)),
                ("errors", s.errors.to_string()),
            ],
            ServiceStatus::Health(serving) => vec![
                ("role", "learner rank above 0 (health only)".into()),
                ("health", serving.clone()),
            ],
        }
    }

    /// Every figure as one JSON object: `role`, `version`, then the Status message's fields by
    /// their proto names (the learner's phase as its word).
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            ServiceStatus::Learner(s) => json!({
                "role": "learner",
                "version": version(&s.build),
                "phase": phase(s.phase),
                "policy_version": s.policy_version,
                "step": s.step,
                "pending_prompts": s.pending_prompts,
                "groups_buffered": s.groups_buffered,
                "connected_actors": s.connected_actors,
                "tokens_per_second": s.tokens_per_second,
                "filter_pass_rate": s.filter_pass_rate,
                "errors": s.errors,
            }),
            ServiceStatus::Verifier(s) => json!({
                "role": "verifier",
                "version": version(&s.build),
                "items_graded": s.items_graded,
                "timeouts": s.timeouts,
                "errors": s.errors,
                "latency_p50_ms": s.latency_p50_ms,
                "latency_p99_ms": s.latency_p99_ms,
                "queue_depth": s.queue_depth,
                "in_flight": s.in_flight,
                "max_concurrency": s.max_concurrency,
                "sandbox_backend": s.sandbox_backend,
                "sandbox_cgroup": s.sandbox_cgroup,
            }),
            ServiceStatus::Prm(s) => json!({
                "role": "prm-server",
                "version": version(&s.build),
                "prm_model": s.prm_model,
                "reference_model": s.reference_model,
                "beta": s.beta,
                "responses_scored": s.responses_scored,
                "tokens_scored": s.tokens_scored,
                "errors": s.errors,
                "queue_depth": s.queue_depth,
                "tokens_per_second": s.tokens_per_second,
                "latency_p50_ms": s.latency_p50_ms,
                "latency_p99_ms": s.latency_p99_ms,
                "prm_version": s.prm_version,
                "learner_url": s.learner_url,
                "batches": s.batches,
                "batch_size_mean": s.batch_size_mean,
            }),
            ServiceStatus::Health(serving) => json!({
                "role": "learner-rank",
                "health": serving,
            }),
        }
    }

    /// The rows as a two-column table, labels padded to one width.
    pub fn table(&self) -> String {
        let rows = self.rows();
        let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(label, value)| format!("{label:<width$}  {value}\n"))
            .collect()
    }
}

/// Prints the status of the service at `--addr`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let token = super::tls::token(&args.token)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    let status = runtime.block_on(query(
        &args.addr,
        token.as_deref(),
        &args.security.tls(),
        timeout,
    ))?;
    if args.json {
        println!("{}", status.json());
    } else {
        print!("{}", status.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_learners_phase_prints_as_a_word() {
        let row = |phase: i32| {
            let status = ServiceStatus::Learner(pb::LearnerStatus {
                phase,
                ..Default::default()
            });
            status
                .rows()
                .into_iter()
                .find(|(label, _)| *label == "phase")
                .map(|(_, value)| value)
                .unwrap()
        };
        assert_eq!(row(pb::LearnerPhase::Collecting as i32), "collecting");
        assert_eq!(row(pb::LearnerPhase::Training as i32), "training");
        assert_eq!(row(pb::LearnerPhase::Unspecified as i32), "unspecified");
        assert_eq!(row(9), "unknown (9)");
    }
}
