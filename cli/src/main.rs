//! `prime`: the one binary of prime-rs, with a subcommand per role and tool.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd;
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
    #[command(subcommand)]
    command: Command,
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
    /// The Learner service (`--config FILE`); `learner step` replays one iteration on
    /// recorded groups.
    Learner(cmd::learner::LearnerArgs),
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
    /// The Verifier gRPC service (math and sandboxed code grading).
    #[command(subcommand)]
    Verifier(VerifierCommand),
    /// Grade a JSONL file of responses, locally or through a running verifier.
    Grade(cmd::verifier::GradeArgs),
    /// Held-out accuracy of several runs against time in one chart.
    Compare(cmd::compare::CompareArgs),
    /// Benchmarks against transformers, side by side in one run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// A rollout actor: pulls work and weights from the learner, samples, has the verifier
    /// grade, streams groups back.
    Actor(cmd::actor::ActorArgs),
    /// What a learner rank, an actor and a PRM server hold on one GPU for a run config,
    /// whether each fits, and which keys to change (docs/memory.md).
    Plan(cmd::plan::PlanArgs),
    /// Print the Status of the learner, verifier or PRM server at an address.
    Status(cmd::status::StatusArgs),
    /// The PrmServer gRPC service: token-level process rewards of the implicit PRM, step
    /// scores and Best-of-N ranking; can follow a learner for new PRM weights.
    PrmServer(cmd::prm_server::PrmServerArgs),
    /// Tools on a run's implicit PRM: `prm probe` measures how well its step rewards find a
    /// known wrong step.
    #[command(subcommand)]
    Prm(cmd::prm::PrmCommand),
    /// Evaluate a model on Eurus-schema data (avg@k, maj@k, pass@k, greedy per data source);
    /// with `--bon N --prm URL` Best-of-N against majority vote, random pick and pass@N.
    Eval(cmd::eval::EvalArgs),
}

#[derive(Debug, Subcommand)]
enum VerifierCommand {
    /// Serve grading over gRPC, with health, status and Prometheus metrics.
    Serve(cmd::verifier::VerifierArgs),
}

/// Exit status: 0 on success, 1 for an error the user can fix (its message names the file,
/// line, key or flag), 2 for a command line clap refuses, and
/// [`prime_check::panics::INTERNAL_ERROR`] (70) for an internal error: a panic, printed as one
/// line.
fn main() -> Result<()> {
    prime_check::panics::install_hook();
    prime_check::panics::guard_main(run)
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: launchers and pods write logs to files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
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
        Command::Learner(args) => cmd::learner::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Sft(args) => cmd::sft::run(args),
        Command::World(args) => cmd::world::run(args),
        Command::Data(command) => cmd::data::run(command),
        Command::Verifier(VerifierCommand::Serve(args)) => cmd::verifier::run(args),
        Command::Grade(args) => cmd::verifier::run_grade(args),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Compare(args) => cmd::compare::run(args),
        Command::Actor(args) => cmd::actor::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::PrmServer(args) => cmd::prm_server::run(args),
        Command::Prm(command) => cmd::prm::run(command),
        Command::Eval(args) => cmd::eval::run(args),
    }
}
