//! `prime`: the one binary of prime-rs, with a subcommand per role and tool.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd;
mod progress;

/// PRIME (process reinforcement through implicit rewards) as a Rust service.
#[derive(Debug, Parser)]
#[command(name = "prime", version, about, long_about = None)]
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
    }
}
