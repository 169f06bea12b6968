//! `prime prm-server serve --prm DIR --ref DIR --listen ADDR`: serve the implicit PRM (token-level
//! process rewards, step scores, Best-of-N). Argument parsing only; the work is in
//! `prime_prm_server::service`.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use prime_check::rules;
use prime_model::{default_kind, parse_device, parse_kind};
use prime_prm_server::service::{start, FollowConfig, ListenOptions, ServerConfig};
use prime_prm_server::StepSplit;

/// `prime prm-server serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrmServerArgs {
    /// The implicit PRM's model directory (e.g. a checkpoint's `prm/`).
    #[arg(long)]
    pub prm: PathBuf,
    /// The reference model's directory (the run's start: its SFT checkpoint).
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// Tokenizer directory for step splits and answer extraction (default: the PRM's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// β of the rewards: use the run's `learner.algo.prm.beta`.
    #[arg(
        long,
        default_value_t = 0.05,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::BETA),
    )]
    pub beta: f64,
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:50055")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (HTTP, `/metrics`); off when not given.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Token (also sent to a followed learner), TLS of this server and the no-token policy.
    #[command(flatten)]
    pub security: super::tls::ServerSecurityArgs,
    /// TLS towards a followed learner (an https:// --learner URL).
    #[command(flatten)]
    pub learner_tls: super::tls::ClientSecurityArgs,
    /// How responses without step ends are split: tokens, lines, blank-lines, step-headers,
    /// after:REGEX or before:REGEX.
    #[arg(long, default_value = "lines")]
    pub step_split: String,
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Most padded tokens in one forward.
    #[arg(
        long,
        default_value_t = 16384,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub max_batch_tokens: usize,
    /// Most responses of waiting requests gathered into one device batch.
    #[arg(
        long,
        default_value_t = 256,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub max_batch_responses: usize,
    /// Follow a learner at this URL: load the PRM weights of each new version it publishes
    /// (--token is sent to it too).
    #[arg(long)]
    pub learner: Option<String>,
    /// Seconds between polls of the followed learner.
    #[arg(
        long,
        default_value_t = 5.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub poll_secs: f64,
}

/// Serves until Ctrl-C.
pub fn run(args: PrmServerArgs) -> anyhow::Result<()> {
    let auth = args.security.auth()?;
    let device = parse_device(&args.device)?;
    let kind = match &args.dtype {
        Some(d) => parse_kind(d)?,
        None => default_kind(device),
    };
    let config = ServerConfig {
        prm: args.prm,
        reference: args.reference,
        tokenizer: args.tokenizer,
        beta: args.beta,
        device,
        kind,
        step_split: args.step_split.parse::<StepSplit>()?,
        max_batch_tokens: args.max_batch_tokens,
        max_batch_responses: args.max_batch_responses,
        follow: args.learner.map(|url| FollowConfig {
            url,
            poll: Duration::from_secs_f64(args.poll_secs),
            transfer_timeout: Duration::from_secs(300),
            tls: args.learner_tls.tls(),
        }),
    };
    let listen = ListenOptions {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        auth,
    };
    let server = start(&config, &listen, true).context("starting the PRM server")?;
    eprintln!("prm-server listening on {}", server.addr);
    server.wait().context("PRM server failed")
}
