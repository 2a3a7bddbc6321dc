//! `cairn export LOG --what sft|preferences|rollouts --format jsonl|parquet --out FILE`:
//! datasets derived from a run's events, in the formats the Hugging Face ecosystem reads. `sft`: the
//! exact examples the run's SFT steps trained on, as chat `messages`. `preferences`: every
//! AI-feedback judgement as `prompt` / `chosen` / `rejected` (the column names TRL's reward
//! and DPO trainers read) plus the soft label and its votes. `rollouts`: every PPO rollout
//! with its policy version, PM score and answer.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};

/// What to export.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum What {
    /// The (prompt, answer) pairs SFT trained on, as chat messages.
    Sft,
    /// AI-feedback comparisons: prompt, chosen, rejected, soft label.
    Preferences,
    /// PPO rollouts: prompt, answer, policy version, PM score.
    Rollouts,
}

/// Arguments of `cairn export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Log directory.
    log: PathBuf,
    /// Dataset to export.
    #[arg(long, value_enum)]
    what: What,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// File format.
    #[arg(long, value_enum, default_value = "jsonl")]
    format: Format,
}

/// Export file formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// JSON Lines: one object per line.
    Jsonl,
    /// Apache Parquet: one column per field (nested values as JSON text).
    Parquet,
}

/// Runs `cairn export`.
pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let rebuilt = cairn::replay::rebuild(&args.log)
        .with_context(|| format!("reading {}", args.log.display()))?;
    let rows = match args.what {
        What::Sft => &rebuilt.sft,
        What::Preferences => &rebuilt.preferences,
        What::Rollouts => &rebuilt.rollouts,
    };
    match args.format {
        Format::Jsonl => cairn::replay::write_jsonl(&args.out, rows)
            .with_context(|| format!("writing {}", args.out.display()))?,
        Format::Parquet => {
            cairn::replay::write_parquet(&args.out, rows).map_err(anyhow::Error::msg)?
        }
    }
    println!("{}: {} record(s)", args.out.display(), rows.len());
    Ok(ExitCode::SUCCESS)
}
