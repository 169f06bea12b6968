//! `prime`: the one binary of prime-rs, with a subcommand per role and tool.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd;
mod exit;
mod progress;

/// PRIME (process reinforcement through implicit rewards) as a Rust service.
#[derive(Debug, Parser)]
#[command(name = "prime", version)]
struct Cli {
    /// Torch CPU threads (default: $PRIME_THREADS, else torch's own choice; 0 also leaves
    /// the choice to torch).
    #[arg(
        long,
        global = true,
        env = "PRIME_THREADS",
        allow_hyphen_values = true,
        value_parser = threads
    )]
    threads: Option<i32>,
    /// Log lines on stderr: text, or json (one JSON object per line, for log collectors).
    #[arg(
        long,
        global = true,
        env = "PRIME_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One human-readable line per event (coloured on a terminal).
    Text,
    /// One JSON object per event: timestamp, level, target, fields and spans.
    Json,
}

impl LogFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Installs the log subscriber: stderr, `RUST_LOG` (default info), in `format`.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour only on a terminal: launchers and pods write logs to files.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// `--threads`/`PRIME_THREADS`: 0 to the maximum; empty (an unset variable) is 0, torch's
/// choice.
fn threads(text: &str) -> Result<i32, String> {
    if text.trim().is_empty() {
        return Ok(0);
    }
    prime_check::arg::int(0, prime_check::rules::MAX_THREADS)(text)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Model tools: per-token log-probs and sampling over JSONL files.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// The Learner service (`learner serve --config FILE`); `learner step` replays one
    /// iteration on recorded groups.
    #[command(subcommand)]
    Learner(cmd::learner::LearnerCommand),
    /// PRIME training end to end: warm-up if needed, then a learner, a verifier and actors
    /// as separate processes on loopback; plots and summary.json in the run dir.
    Train(cmd::train::TrainArgs),
    /// Supervised warm-up of the policy until held-out accuracy enters a band.
    Sft(cmd::sft::SftArgs),
    /// Write the embedded default world (problems, datasets and the trained tokenizer), or
    /// with --standin a full-size synthetic stand-in for Eurus-2-RL-Data.
    World(cmd::world::WorldArgs),
    /// Data tools: `data check` reads, validates and tokenizes data files as a run would.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// The Verifier gRPC service (`verifier serve`: math and sandboxed code grading).
    #[command(subcommand)]
    Verifier(VerifierCommand),
    /// Grade a JSONL file of responses, locally or through a running verifier.
    Grade(cmd::verifier::GradeArgs),
    /// Held-out accuracy of several runs against time in one chart.
    Compare(cmd::compare::CompareArgs),
    /// Benchmarks against transformers, side by side in one run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// A rollout actor (`actor run`): pulls work and weights from the learner, samples, has
    /// the verifier grade, streams groups back.
    #[command(subcommand)]
    Actor(ActorCommand),
    /// What a learner rank, an actor and a PRM server hold on one GPU for a run config,
    /// whether each fits, and which keys to change (docs/memory.md).
    Plan(cmd::plan::PlanArgs),
    /// Print the Status of the learner, verifier or PRM server at an address.
    Status(cmd::status::StatusArgs),
    /// The PrmServer gRPC service (`prm-server serve`): token-level process rewards of the
    /// implicit PRM, step scores and Best-of-N ranking; can follow a learner for new PRM
    /// weights.
    #[command(subcommand)]
    PrmServer(PrmServerCommand),
    /// Tools on a run's implicit PRM: `prm probe` measures how well its step rewards find a
    /// known wrong step.
    #[command(subcommand)]
    Prm(cmd::prm::PrmCommand),
    /// Evaluate a model on Eurus-schema data (avg@k, maj@k, pass@k, greedy per data source);
    /// with `--bon N --prm URL` Best-of-N against majority vote, random pick and pass@N.
    Eval(cmd::eval::EvalArgs),
}

#[derive(Debug, Subcommand)]
enum ActorCommand {
    /// Run a rollout actor until stopped (or `--max-batches`).
    Run(cmd::actor::ActorArgs),
}

#[derive(Debug, Subcommand)]
enum PrmServerCommand {
    /// Serve process rewards and Best-of-N over gRPC, with health, status and Prometheus
    /// metrics.
    Serve(cmd::prm_server::PrmServerArgs),
}

#[derive(Debug, Subcommand)]
enum VerifierCommand {
    /// Serve grading over gRPC, with health, status and Prometheus metrics.
    Serve(cmd::verifier::VerifierArgs),
}

/// Exit status (module `exit`, docs/reliability.md): 0 on success, 2 for a bad config, flag or
/// input (clap's usage errors too), 75 when a peer is down or late (retry), 1 for any other
/// error, and [`prime_check::panics::INTERNAL_ERROR`] (70) for an internal error: a panic,
/// printed as one line.
fn main() {
    prime_check::panics::install_hook();
    if let Err(error) = prime_check::panics::guard_main(run) {
        let code = exit::classify(&error).code();
        if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            // One JSON line like every other, for the log collector.
            tracing::error!(exit_status = code, "{error:#}");
        } else {
            eprintln!("Error: {error:?}");
        }
        std::process::exit(code);
    }
}

/// Whether `--log-format json` is in force (the final error is then logged as JSON too).
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn run() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    JSON_LOGS.store(
        cli.log_format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    // Processes this one starts (`prime train`'s services) log the same way.
    std::env::set_var("PRIME_LOG_FORMAT", cli.log_format.name());
    if let Some(threads) = cli.threads {
        if threads > 0 {
            tch::set_num_threads(threads);
        }
        // Processes this one starts (`prime train`'s services, `prime bench train`'s runs)
        // take the same count.
        std::env::set_var("PRIME_THREADS", threads.to_string());
    }
    match cli.command {
        Command::Model(command) => cmd::model::run(command),
        Command::Learner(command) => cmd::learner::run(command),
        Command::Train(args) => cmd::train::run(args),
        Command::Sft(args) => cmd::sft::run(args),
        Command::World(args) => cmd::world::run(args),
        Command::Data(command) => cmd::data::run(command),
        Command::Verifier(VerifierCommand::Serve(args)) => cmd::verifier::run(args),
        Command::Grade(args) => cmd::verifier::run_grade(args),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Compare(args) => cmd::compare::run(args),
        Command::Actor(ActorCommand::Run(args)) => cmd::actor::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::PrmServer(PrmServerCommand::Serve(args)) => cmd::prm_server::run(args),
        Command::Prm(command) => cmd::prm::run(command),
        Command::Eval(args) => cmd::eval::run(args),
    }
}
