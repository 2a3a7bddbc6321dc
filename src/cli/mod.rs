//! Command-line definitions (clap) and dispatch to one module per command group.

mod bench;
mod eval_cmd;
mod export_cmd;
mod ingest;
mod log_cmd;
mod model_cmd;
mod replay_cmd;
mod run_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// cairn: Constitutional AI as an event-sourced streaming dataflow.
#[derive(Parser, Debug)]
#[command(name = "cairn", version, about, long_about = None)]
pub struct Cli {
    /// More output (-v: debug, -vv: trace). RUST_LOG, when set, takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a dataflow spec (rerun the same command to continue an interrupted run).
    Run(run_cmd::RunArgs),
    /// List the stage kinds a dataflow can use.
    Stages,
    /// Inspect, verify and repair event logs.
    #[command(subcommand)]
    Log(log_cmd::LogCommand),
    /// Export datasets derived from a run's events (JSON Lines).
    Export(export_cmd::ExportArgs),
    /// Rebuild a run's datasets, metrics and checkpoints from its events; --verify N
    /// re-executes logged model steps.
    Replay(replay_cmd::ReplayArgs),
    /// Start a new run reusing another run's events upstream of a stage, with changed settings.
    Fork(replay_cmd::ForkArgs),
    /// Compare two models on red-team and helpful prompts, judged by the feedback model.
    Eval(eval_cmd::EvalArgs),
    /// Write a static HTML report of a run (metric plots, throughput, lineages).
    Report(eval_cmd::ReportArgs),
    /// Live terminal view of a running job, read from its log.
    Watch(eval_cmd::WatchArgs),
    /// Read prompt sources into an event log as `prompt` events (idempotent).
    Ingest(ingest::IngestArgs),
    /// Generate a reply to one prompt.
    Generate(model_cmd::GenerateArgs),
    /// Log-probabilities of a continuation.
    Score(model_cmd::ScoreArgs),
    /// Benchmarks reported against baselines measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs a parsed command.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run_cmd::run(args),
        Command::Stages => run_cmd::stages(),
        Command::Log(cmd) => log_cmd::run(cmd),
        Command::Ingest(args) => ingest::run(args),
        Command::Export(args) => export_cmd::run(args),
        Command::Replay(args) => replay_cmd::replay(args),
        Command::Fork(args) => replay_cmd::fork(args),
        Command::Eval(args) => eval_cmd::eval(args),
        Command::Report(args) => eval_cmd::report(args),
        Command::Watch(args) => eval_cmd::watch(args),
        Command::Generate(args) => model_cmd::generate(args),
        Command::Score(args) => model_cmd::score(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

/// Sets up `tracing` output on stderr: RUST_LOG if set, else from -v/-q.
pub fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// `--model NAME=PATH` arguments as (name, path) pairs; a named model (`default`,
/// `feedback`) resolves to its fetched file.
fn model_overrides(args: &[String]) -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    use anyhow::Context;
    args.iter()
        .map(|m| {
            let (name, path) = m
                .split_once('=')
                .with_context(|| format!("--model `{m}`: expected NAME=PATH"))?;
            let path =
                cairn::paths::named_model(path).unwrap_or_else(|| std::path::PathBuf::from(path));
            Ok((name.to_string(), path))
        })
        .collect()
}
