//! `cairn replay LOG` rebuilds a run's datasets, metrics and latest checkpoints from its
//! events alone (no model call) and reports what it rebuilt; `--verify N` re-executes N
//! logged model steps from their recorded inputs and seeds and checks the outputs are
//! identical. `cairn fork LOG --from STAGE --set key=value --out NEW` starts a new run that
//! reuses the recorded events upstream of STAGE and recomputes STAGE and everything after it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use cairn::engine::{self, RunOptions};

/// Arguments of `cairn replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Log directory.
    log: PathBuf,
    /// Write the rebuilt datasets and metrics here (JSON Lines) with a summary.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Re-execute this many logged model steps (CPU) and check they reproduce exactly.
    #[arg(long, default_value_t = 0)]
    verify: usize,
    /// Folder the recorded spec's relative paths are relative to, for logs that do not record
    /// where their spec was.
    #[arg(long)]
    base: Option<PathBuf>,
    /// With `--verify`: the model overrides the run was started with (`cairn run --model
    /// NAME=PATH`; the recorded spec does not carry them), e.g. `--model feedback=feedback`.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
}

/// Runs `cairn replay`.
pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let rebuilt = cairn::replay::rebuild(&args.log)
        .with_context(|| format!("reading {}", args.log.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let ev = rebuilt.events_seconds.max(1e-9);
    println!(
        "replayed {} events in {:.4} s ({:.0} events/s); the run took {:.1} s: rebuild {:.0}x faster \
         ({:.0}x counting {:.2} s of checkpoint checksums)",
        rebuilt.events,
        rebuilt.events_seconds,
        rebuilt.events as f64 / ev,
        rebuilt.original_seconds,
        rebuilt.original_seconds / ev,
        rebuilt.original_seconds / seconds.max(1e-9),
        rebuilt.checkpoint_seconds
    );
    println!(
        "rebuilt: {} SFT examples, {} preference comparisons, {} rollouts, {} metric events",
        rebuilt.sft.len(),
        rebuilt.preferences.len(),
        rebuilt.rollouts.len(),
        rebuilt.metrics.len()
    );
    let mut damaged = false;
    for c in &rebuilt.checkpoints {
        let state = match c.intact {
            Some(true) => "files match",
            Some(false) => {
                damaged = true;
                "FILES DIFFER from the logged sha256"
            }
            None => "files missing",
        };
        println!(
            "checkpoint {} step {}: {} ({state})",
            c.stage, c.record.step, c.record.path
        );
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, rows) in [
            ("sft.jsonl", &rebuilt.sft),
            ("preferences.jsonl", &rebuilt.preferences),
            ("rollouts.jsonl", &rebuilt.rollouts),
            ("metrics.jsonl", &rebuilt.metrics),
        ] {
            cairn::replay::write_jsonl(&dir.join(name), rows)
                .with_context(|| format!("writing {}", dir.join(name).display()))?;
        }
        let summary = serde_json::json!({
            "events": rebuilt.events,
            "kinds": rebuilt.kinds,
            "seconds": seconds,
            "events_seconds": rebuilt.events_seconds,
            "checkpoint_seconds": rebuilt.checkpoint_seconds,
            "original_seconds": rebuilt.original_seconds,
            "checkpoints": rebuilt.checkpoints.iter().map(|c| serde_json::json!({
                "stage": c.stage, "step": c.record.step, "path": c.record.path,
                "sha256": c.record.sha256, "intact": c.intact})).collect::<Vec<_>>(),
        });
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        println!("wrote {}", dir.display());
    }
    if args.verify > 0 {
        let models = super::model_overrides(&args.models)?;
        let report = engine::verify(&args.log, args.verify, args.base.as_deref(), &models)
            .with_context(|| format!("verifying {}", args.log.display()))?;
        println!(
            "verify: re-executed {} model step(s) in {} chunk(s): {} identical, {} diverged{}",
            report.checked,
            report.chunks,
            report.checked - report.diverged.len(),
            report.diverged.len(),
            if report.skipped.is_empty() {
                String::new()
            } else {
                format!(
                    " (not verifiable offline: stages on trained models: {})",
                    report.skipped.join(", ")
                )
            }
        );
        for (key, stage, what) in &report.diverged {
            println!("  diverged: {key} ({stage}): {what}");
        }
        if !report.diverged.is_empty() {
            if args.models.is_empty() {
                eprintln!(
                    "note: a run started with `cairn run --model NAME=PATH` records its spec \
                     without the override; pass the same `--model` to `cairn replay --verify`"
                );
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(if damaged {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Arguments of `cairn fork`.
#[derive(Args, Debug)]
pub struct ForkArgs {
    /// Log of the run to fork.
    log: PathBuf,
    /// First stage to recompute (it and every later stage run anew).
    #[arg(long = "from")]
    stage: String,
    /// Changed setting, `key=value` (repeatable): `constitution=FILE`, `seed=N`,
    /// `stage.NAME.KEY=VALUE`, `models.NAME.path=PATH`, ...
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Log directory of the new run.
    #[arg(long)]
    out: PathBuf,
    /// Folder the recorded spec's relative paths are relative to (default: where the spec
    /// was, as the log recorded it).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Runs `cairn fork`.
pub fn fork(args: ForkArgs) -> anyhow::Result<ExitCode> {
    let sets = args
        .sets
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("--set `{s}`: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = engine::fork(
        &args.log,
        &args.stage,
        &sets,
        args.base.as_deref(),
        &RunOptions::new(args.out.clone(), cairn::model::parse_device(&args.device)?),
    )
    .with_context(|| format!("forking {}", args.log.display()))?;
    println!(
        "fork of run {} from `{}`: reused {} ({} events copied); spec {}",
        report.parent,
        args.stage,
        report.reused_stages.join(", "),
        report.copied,
        report.spec_path.display()
    );
    println!("{:<14} {:>9} {:>9}", "stage", "computed", "reused");
    for (stage, s) in &report.summary.stages {
        println!("{stage:<14} {:>9} {:>9}", s.computed, s.replayed);
    }
    println!(
        "new run {} in {}",
        report.summary.run_id,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
