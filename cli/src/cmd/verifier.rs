//! `prime verifier serve` (the Verifier gRPC service) and `prime grade` (grade a JSONL file locally
//! or through a running verifier). Argument parsing only; the work is in `prime_verifier`.

use anyhow::Context;
use prime_check::rules;
use prime_verifier::code::sandbox::SandboxLimits;
use prime_verifier::code::CodeGraderConfig;
use prime_verifier::grade::GraderConfig;
use prime_verifier::jsonl::{grade_file, GradeFileOptions};
use prime_verifier::service::{run_server, ListenOptions, ServeOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Grading settings shared by `prime verifier serve` and local `prime grade`.
#[derive(clap::Args, Debug, Clone)]
pub struct GradingArgs {
    /// Most items graded at once (default: the number of CPU cores).
    #[arg(long, allow_hyphen_values = true, value_parser = prime_check::arg::at_least(1usize))]
    pub concurrency: Option<usize>,
    /// Time limit for one item, all of its code tests included, in seconds.
    #[arg(
        long,
        default_value_t = 120.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub item_timeout_secs: f64,
    /// Wall-clock and CPU limit of one code test run, in seconds.
    #[arg(
        long,
        default_value_t = 5.0,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::float(rules::SECONDS),
    )]
    pub code_timeout_secs: f64,
    /// Memory cap of one code test run (address space per process, and the whole sandbox
    /// where a cgroup is available), in MiB.
    #[arg(
        long,
        default_value_t = 1024,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::int(1u64, 1 << 30),
    )]
    pub code_memory_mib: u64,
    /// Score code all-or-nothing instead of the fraction of the first 10 tests passed.
    #[arg(long)]
    pub binary_code_score: bool,
}

impl GradingArgs {
    fn config(&self) -> anyhow::Result<GraderConfig> {
        let defaults = GraderConfig::default();
        let memory = self.code_memory_mib.saturating_mul(1 << 20);
        Ok(GraderConfig {
            max_concurrency: self.concurrency.unwrap_or(defaults.max_concurrency),
            item_timeout: Duration::from_secs_f64(self.item_timeout_secs),
            code: CodeGraderConfig {
                continuous: !self.binary_code_score,
                ..CodeGraderConfig::default()
            },
            sandbox: SandboxLimits {
                wall_time: Duration::from_secs_f64(self.code_timeout_secs),
                cpu_seconds: self.code_timeout_secs.ceil() as u64,
                address_space_bytes: memory,
                memory_bytes: memory,
                ..SandboxLimits::default()
            },
        })
    }
}

/// `prime verifier serve --listen ADDR`: serve the Verifier gRPC service and grpc.health.v1.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifierArgs {
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:50053")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (HTTP, `/metrics`); off when not given.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Token, TLS and the no-token policy.
    #[command(flatten)]
    pub security: super::tls::ServerSecurityArgs,
    /// Grading settings.
    #[command(flatten)]
    pub grading: GradingArgs,
}

/// Runs the verifier server until Ctrl-C.
pub fn run(args: VerifierArgs) -> anyhow::Result<()> {
    let options = ServeOptions {
        server: ListenOptions {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            auth: args.security.auth()?,
        },
        grader: args.grading.config()?,
    };
    run_server(options).context("verifier server failed")
}

/// `prime grade --input IN.jsonl --output OUT.jsonl [--addr URL]`.
#[derive(clap::Args, Debug, Clone)]
pub struct GradeArgs {
    /// Input JSONL: {"id", "ability": "math"|"code", "response", "ground_truth"} per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL: each input line plus "score" and "reason", in input order.
    #[arg(long)]
    pub output: PathBuf,
    /// Grade through a running verifier at this URL (e.g. http://127.0.0.1:50053) instead of
    /// locally.
    #[arg(long)]
    pub addr: Option<String>,
    /// Shared token for the remote verifier.
    #[arg(long, env = "PRIME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Grading settings (local grading only).
    #[command(flatten)]
    pub grading: GradingArgs,
}

/// Grades a JSONL file and logs the totals.
pub fn run_grade(args: GradeArgs) -> anyhow::Result<()> {
    let options = GradeFileOptions {
        input: args.input,
        output: args.output,
        addr: args.addr,
        token: super::tls::token(&args.token)?,
        grader: args.grading.config()?,
    };
    // The errors name the file (and line) at fault themselves: input or output.
    let summary = grade_file(&options)?;
    let mean = if summary.items == 0 {
        0.0
    } else {
        summary.total_score / summary.items as f64
    };
    tracing::info!(
        items = summary.items,
        mean_score = mean,
        output = %options.output.display(),
        "graded"
    );
    Ok(())
}

/// `prime bench verifier`: math items/s and agreement against math-verify on the same items in
/// the same run, and a code test's latency in the sandbox against bare `python3`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchVerifierArgs {
    /// Labelled math items (JSONL; repeatable); default: the project's own table and the
    /// external one (verifier/tests/data/math_pairs.jsonl, math_pairs_external.jsonl).
    #[arg(long)]
    pub math_items: Vec<PathBuf>,
    /// Passes over the items when timing our grader.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Passes over the items when timing math-verify.
    #[arg(long, default_value_t = 1)]
    pub python_repeats: usize,
    /// Python interpreter with math-verify installed (default: ~/.cache/prime-rs/venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// The Python side's script (default: bench/python/math_verify_agreement.py).
    #[arg(long)]
    pub math_verify_script: Option<PathBuf>,
    /// Timed code-test runs per variant.
    #[arg(long, default_value_t = 30)]
    pub code_runs: usize,
    /// Also write the full report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs the verifier benchmark and prints its summary.
pub fn run_bench(args: BenchVerifierArgs) -> anyhow::Result<()> {
    let defaults = prime_verifier::bench::BenchOptions::default();
    let options = prime_verifier::bench::BenchOptions {
        math_items: if args.math_items.is_empty() {
            defaults.math_items
        } else {
            args.math_items
        },
        repeats: args.repeats.max(1),
        python_repeats: args.python_repeats.max(1),
        python: args.python.or(defaults.python),
        math_verify_script: args
            .math_verify_script
            .unwrap_or(defaults.math_verify_script),
        code_runs: args.code_runs.max(1),
    };
    let report = prime_verifier::bench::run_bench(&options).context("verifier benchmark")?;
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        prime_check::path::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}
