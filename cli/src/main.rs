//! `prime`: the one binary of prime-rs, with a subcommand per role and tool.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd;
mod progress;

/// PRIME (process reinforcement through implicit rewards) as a Rust service.
#[derive(Debug, Parser)]
#[command(name = "prime", version)]
struct Cli {
    /// Torch CPU threads (default: $PRIME_THREADS, else torch's own choice).
    #[arg(long, global = true, env = "PRIME_THREADS")]
    threads: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Model tools: per-token log-probs and sampling over JSONL files.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// The PRIME learner; `learner step` replays one iteration on recorded groups.
    #[command(subcommand)]
    Learner(cmd::learner::LearnerCommand),
    /// Supervised warm-up of the policy until held-out accuracy enters a band.
    Sft(cmd::sft::SftArgs),
    /// Write the embedded default world: problems, datasets and the trained tokenizer.
    World(cmd::world::WorldArgs),
    /// The Verifier gRPC service (math and sandboxed code grading).
    #[command(subcommand)]
    Verifier(VerifierCommand),
    /// Grade a JSONL file of responses, locally or through a running verifier.
    Grade(cmd::verifier::GradeArgs),
    /// Benchmarks against transformers, side by side in one run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

#[derive(Debug, Subcommand)]
enum VerifierCommand {
    /// Serve grading over gRPC, with health, status and Prometheus metrics.
    Serve(cmd::verifier::VerifierArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        tch::set_num_threads(threads);
    }
    match cli.command {
        Command::Model(command) => cmd::model::run(command),
        Command::Learner(command) => cmd::learner::run(command),
        Command::Sft(args) => cmd::sft::run(args),
        Command::World(args) => cmd::world::run(args),
        Command::Verifier(VerifierCommand::Serve(args)) => cmd::verifier::run(args),
        Command::Grade(args) => cmd::verifier::run_grade(args),
        Command::Bench(c) => cmd::bench::run(c),
    }
}
