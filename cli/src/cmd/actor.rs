//! `prime actor run`: a rollout actor. Argument parsing and signal handling only; the loop is
//! `prime_actor::run_actor`.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prime_actor::{run_actor, ActorConfig, MAX_CHUNK_BYTES};
use prime_check::rules;

/// `prime actor run --learner URL --verifier URL --tokenizer DIR [--device cuda:0]`.
#[derive(clap::Args, Debug, Clone)]
pub struct ActorArgs {
    /// Learner gRPC URL, e.g. http://learner:50051.
    #[arg(long, env = "PRIME_LEARNER")]
    pub learner: String,
    /// Verifier gRPC URL, e.g. http://verifier:50053: grades every item whose data_source has
    /// no --verifier-route.
    #[arg(long, env = "PRIME_VERIFIER")]
    pub verifier: String,
    /// Grade the items of one data_source with another verifier (any server of the
    /// prime.v1.Verifier service, e.g. a custom reward; docs/verifier.md), as
    /// DATA_SOURCE=URL (repeatable).
    #[arg(long = "verifier-route", value_name = "DATA_SOURCE=URL", value_parser = verifier_route)]
    pub verifier_routes: Vec<(String, String)>,
    /// Directory with the policy's tokenizer.json (responses are decoded for the verifier);
    /// the weights come from the learner.
    #[arg(long, env = "PRIME_TOKENIZER")]
    pub tokenizer: PathBuf,
    /// Where to sample: cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Name shown in the learner's logs (default: $HOSTNAME, else "actor").
    #[arg(long)]
    pub name: Option<String>,
    /// Most prompts per batch (each is sampled K times in one batch).
    #[arg(
        long,
        default_value_t = 8,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1u32),
    )]
    pub max_prompts: u32,
    /// Shared token sent to both services as `authorization: Bearer TOKEN`.
    #[arg(long, env = "PRIME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS for https:// service URLs.
    #[command(flatten)]
    pub security: super::tls::ClientSecurityArgs,
    /// Deadline of Register, PullWork and SubmitGroups, in seconds.
    #[arg(
        long,
        default_value_t = 30.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub rpc_timeout_secs: f64,
    /// Deadline of one whole weight transfer, in seconds.
    #[arg(
        long,
        default_value_t = 600.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub weights_timeout_secs: f64,
    /// Deadline of one verifier Grade call, in seconds.
    #[arg(
        long,
        default_value_t = 600.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub grade_timeout_secs: f64,
    /// Largest pause between reconnection attempts, in seconds.
    #[arg(
        long,
        default_value_t = 10.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub max_backoff_secs: f64,
    /// Exit with an error when the learner cannot be reached for this long, in seconds
    /// (default: keep trying until stopped).
    #[arg(
        long,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub give_up_after_secs: Option<f64>,
    /// Largest weight chunk asked for, in bytes.
    #[arg(
        long,
        default_value_t = MAX_CHUNK_BYTES,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::int(1u32, MAX_CHUNK_BYTES),
    )]
    pub max_chunk_bytes: u32,
    /// Exit after submitting this many batches (default: run until stopped).
    #[arg(long)]
    pub max_batches: Option<u64>,
    /// Do not follow the learner's weight broadcast even when it offers one; fetch every
    /// version over gRPC (for an actor the learner cannot reach directly).
    #[arg(long)]
    pub no_weight_broadcast: bool,
    /// How long a batch waits for the broadcast round of its version to start before the
    /// weights are fetched over gRPC, in seconds.
    #[arg(
        long,
        default_value_t = 5.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub broadcast_wait_secs: f64,
    /// Most GiB the sampler's KV cache may take; a batch's rows decode as many at once as it
    /// holds (docs/memory.md). Default: unbounded on cpu; on cuda half of the device memory
    /// free once the weights have arrived.
    #[arg(
        long,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::GIB),
    )]
    pub kv_cache_gib: Option<f64>,
    /// Sample even a batch the memory plan (`prime plan`) says does not fit the GPU; without
    /// it an actor on CUDA stops at such a batch with the numbers and the --max-prompts that
    /// fits.
    #[arg(long)]
    pub force: bool,
    /// Prometheus metrics and probes listen address (HTTP: `/metrics`, `/healthz` alive,
    /// `/readyz` registered and holding the current weights); off when not given.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl ActorArgs {
    fn config(self) -> anyhow::Result<ActorConfig> {
        let mut config = ActorConfig::new(self.learner, self.verifier, self.tokenizer);
        for (source, url) in self.verifier_routes {
            if config.verifier_routes.insert(source.clone(), url).is_some() {
                return Err(crate::exit::BadInput(format!(
                    "--verifier-route: data_source {source:?} is routed twice"
                ))
                .into());
            }
        }
        config.device = prime_model::parse_device(&self.device)?;
        config.name = self
            .name
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "actor".into());
        config.max_prompts = self.max_prompts;
        config.token = super::tls::token(&self.token)?;
        config.tls = self.security.tls();
        config.rpc_timeout = Duration::from_secs_f64(self.rpc_timeout_secs);
        config.weights_timeout = Duration::from_secs_f64(self.weights_timeout_secs);
        config.grade_timeout = Duration::from_secs_f64(self.grade_timeout_secs);
        config.max_backoff = Duration::from_secs_f64(self.max_backoff_secs);
        config.give_up_after = self.give_up_after_secs.map(Duration::from_secs_f64);
        config.max_chunk_bytes = self.max_chunk_bytes;
        config.max_batches = self.max_batches;
        config.weight_broadcast = !self.no_weight_broadcast;
        config.broadcast_wait = Duration::from_secs_f64(self.broadcast_wait_secs);
        config.kv_cache_gib = self.kv_cache_gib;
        config.force = self.force;
        config.metrics_listen = self.metrics_listen;
        Ok(config)
    }
}

/// `--verifier-route DATA_SOURCE=URL`: a non-empty data source and a URL.
fn verifier_route(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((source, url)) if !source.trim().is_empty() && !url.trim().is_empty() => {
            Ok((source.trim().to_string(), url.trim().to_string()))
        }
        _ => Err(format!("{text:?}: expected DATA_SOURCE=URL")),
    }
}

/// Sets `stop` on Ctrl-C or SIGTERM (how Kubernetes stops a pod), from a thread of its own.
fn stop_on_signals(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("prime-actor-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                let mut terminate =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler installs");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            });
            tracing::info!("stopping after the current step");
            stop.store(true, Ordering::Relaxed);
        })?;
    Ok(())
}

/// Runs the actor until a signal, `--max-batches`, or an error it cannot recover from.
pub fn run(args: ActorArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let stats = run_actor(config, stop).context("actor failed")?;
    tracing::info!(
        batches = stats.batches,
        groups_accepted = stats.groups_accepted,
        generated_tokens = stats.generated_tokens,
        "actor done"
    );
    Ok(())
}
