//! The `Verifier` gRPC service: a thin handler that converts messages and calls [`Grader`],
//! plus the server wiring (health, optional shared token, Prometheus endpoint).

use crate::error::VerifierError;
use crate::grade::{Ability, GradeItem, GradeResult, Grader, Outcome};
use prime_proto::auth::ServerAuth;
use prime_proto::v1 as pb;
use prime_proto::v1::verifier_server::{Verifier, VerifierServer};
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Most items accepted in one `Grade` call.
pub const MAX_BATCH_ITEMS: usize = 8192;

/// The gRPC handler.
#[derive(Debug, Clone)]
pub struct VerifierService {
    grader: Grader,
}

impl VerifierService {
    /// Wraps a grader.
    pub fn new(grader: Grader) -> Self {
        Self { grader }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> VerifierServer<Self> {
        VerifierServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// The ability a wire value names; `None` for unspecified and unknown values.
pub fn ability_from_proto(ability: i32) -> Option<Ability> {
    match pb::GradeAbility::try_from(ability) {
        Ok(pb::GradeAbility::Math) => Some(Ability::Math),
        Ok(pb::GradeAbility::Code) => Some(Ability::Code),
        _ => None,
    }
}

/// The wire form of an ability; `None` is sent unspecified.
pub fn ability_to_proto(ability: Option<Ability>) -> pb::GradeAbility {
    match ability {
        Some(Ability::Math) => pb::GradeAbility::Math,
        Some(Ability::Code) => pb::GradeAbility::Code,
        None => pb::GradeAbility::Unspecified,
    }
}

/// Converts a wire item; an unknown ability becomes `None` (graded as an error result).
pub fn item_from_proto(item: pb::GradeItem) -> GradeItem {
    GradeItem {
        id: item.id,
        ability: ability_from_proto(item.ability),
        response: item.response,
        ground_truth: item.ground_truth,
    }
}

/// Converts a plain item to the wire form.
pub fn item_to_proto(item: &GradeItem) -> pb::GradeItem {
    pb::GradeItem {
        id: item.id.clone(),
        ability: ability_to_proto(item.ability) as i32,
        response: item.response.clone(),
        ground_truth: item.ground_truth.clone(),
        ..Default::default()
    }
}

/// Converts a result to the wire form.
pub fn result_to_proto(r: GradeResult) -> pb::GradeResult {
    pb::GradeResult {
        id: r.id,
        score: r.score,
        outcome: match r.outcome {
            Outcome::Graded => pb::GradeOutcome::Graded,
            Outcome::Timeout => pb::GradeOutcome::Timeout,
            Outcome::Error => pb::GradeOutcome::Error,
            Outcome::Unavailable => pb::GradeOutcome::Unavailable,
        } as i32,
        reason: r.reason,
        extracted_answer: r.extracted_answer.unwrap_or_default(),
        latency_ms: r.latency.as_secs_f64() * 1e3,
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<pb::GradeResult, Status>> + Send>>;

#[tonic::async_trait]
impl Verifier for VerifierService {
    async fn grade(
        &self,
        request: Request<pb::GradeRequest>,
    ) -> Result<Response<pb::GradeResponse>, Status> {
        let items = request.into_inner().items;
        if items.len() > MAX_BATCH_ITEMS {
            return Err(VerifierError::InvalidRequest(format!(
                "batch of {} items exceeds the limit of {MAX_BATCH_ITEMS}",
                items.len()
            ))
            .into());
        }
        let items = items.into_iter().map(item_from_proto).collect();
        let results = self.grader.grade_batch(items).await;
        Ok(Response::new(pb::GradeResponse {
            results: results.into_iter().map(result_to_proto).collect(),
        }))
    }

    type GradeStreamStream = ResultStream;

    async fn grade_stream(
        &self,
        request: Request<Streaming<pb::GradeItem>>,
    ) -> Result<Response<Self::GradeStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let grader = self.grader.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    next = incoming.next() => match next {
                        Some(Ok(item)) => {
                            let grader = grader.clone();
                            let tx = tx.clone();
                            tasks.spawn(async move {
                                let r = grader.grade(item_from_proto(item)).await;
                                // The client may have gone away; nothing to do then.
                                let _ = tx.send(Ok(result_to_proto(r))).await;
                            });
                        }
                        Some(Err(status)) => {
                            tracing::warn!(%status, "grade stream broken by the client");
                            break;
                        }
                        None => break,
                    },
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
            while tasks.join_next().await.is_some() {}
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        _request: Request<pb::VerifierStatusRequest>,
    ) -> Result<Response<pb::VerifierStatusResponse>, Status> {
        let s = self.grader.status();
        Ok(Response::new(pb::VerifierStatusResponse {
            build: Some(pb::BuildInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                role: pb::Role::Verifier as i32,
            }),
            items_graded: s.items_graded,
            timeouts: s.timeouts,
            errors: s.errors,
            latency_p50_ms: s.latency_p50_ms,
            latency_p99_ms: s.latency_p99_ms,
            queue_depth: s.queue_depth,
            in_flight: s.in_flight,
            max_concurrency: s.max_concurrency as u32,
            sandbox_backend: s.sandbox_backend,
            sandbox_cgroup: s.sandbox_cgroup,
        }))
    }
}

/// Serves the Verifier service and `grpc.health.v1` on `listener` until `shutdown` resolves.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    grader: Grader,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), VerifierError> {
    let auth = ServerAuth {
        token,
        ..ServerAuth::default()
    };
    serve_secure(listener, grader, &auth, shutdown).await
}

/// [`serve_on`] with every setting of `auth`: TLS (mutual when `auth.tls.client_ca` is set)
/// and the refusal of an open non-loopback listener.
pub async fn serve_secure(
    listener: tokio::net::TcpListener,
    grader: Grader,
    auth: &ServerAuth,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), VerifierError> {
    let mut builder = auth
        .server(listener.local_addr()?)
        .map_err(|e| VerifierError::Config(e.to_string()))?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<VerifierServer<VerifierService>>()
        .await;
    let incoming = prime_proto::transport::incoming(listener);
    builder
        .add_service(health_service)
        .add_service(auth.guard(VerifierService::new(grader).into_server()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| VerifierError::Unavailable(format!("server failed: {e}")))
}

/// Serves the grader's Prometheus metrics (and the probes) on `listener`, forever.
pub async fn serve_metrics(listener: tokio::net::TcpListener, grader: Grader) {
    let registry = std::sync::Arc::new(grader.metrics().registry());
    let probes = prime_proto::metrics::Probes::default();
    if let Err(e) = prime_proto::metrics::serve(listener, registry, probes).await {
        tracing::warn!(error = %e, "the metrics server stopped");
    }
}

/// Where the server listens and who it lets in.
pub use prime_proto::auth::ListenOptions;

/// Options of `prime verifier serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the server listens and who it lets in.
    pub server: ListenOptions,
    /// Grader settings.
    pub grader: crate::grade::GraderConfig,
}

/// Runs the verifier server until Ctrl-C, on its own tokio runtime (for the CLI).
pub fn run_server(options: ServeOptions) -> Result<(), VerifierError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Refused before anything is bound.
    options
        .server
        .auth
        .check(options.server.listen)
        .map_err(|e| VerifierError::Config(e.to_string()))?;
    runtime.block_on(async move {
        let grader = Grader::new(options.grader.clone());
        let listener = tokio::net::TcpListener::bind(options.server.listen).await?;
        tracing::info!(addr = %listener.local_addr()?, status = ?grader.status(), "verifier listening");
        if let Some(addr) = options.server.metrics_listen {
            let metrics_listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(addr = %metrics_listener.local_addr()?, "metrics listening");
            tokio::spawn(serve_metrics(metrics_listener, grader.clone()));
        }
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        serve_secure(listener, grader, &options.server.auth, shutdown).await
    })
}
