//! `cairn log …`: verify, repair, stats and cat over an event log directory.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use cairn::log::{self, LogReader};

/// Log subcommands.
#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Check every segment, checksum and record; exit 1 on corruption.
    Verify {
        /// Log directory.
        dir: PathBuf,
    },
    /// Truncate the log at its first bad record, keeping a copy of what is cut.
    Repair {
        /// Log directory.
        dir: PathBuf,
    },
    /// Records and bytes per stage and kind, and the time range.
    Stats {
        /// Log directory.
        dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print events as JSON, one per line.
    Cat {
        /// Log directory.
        dir: PathBuf,
        /// Only events of this stage.
        #[arg(long)]
        stage: Option<String>,
        /// Start at this offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Keep waiting for new events (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
    },
}

/// Runs a log subcommand.
pub fn run(cmd: LogCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LogCommand::Verify { dir } => {
            let report =
                log::verify(&dir).with_context(|| format!("verifying {}", dir.display()))?;
            println!(
                "{}: {} segment(s), {} record(s), {} bytes",
                dir.display(),
                report.segments,
                report.records,
                report.bytes
            );
            if let Some((seg, pos, bytes)) = &report.torn {
                println!(
                    "torn tail: {} bytes at byte {pos} of {} (an interrupted append; the next writer truncates it)",
                    bytes,
                    seg.display()
                );
            }
            match &report.corruption {
                None => {
                    println!("ok");
                    Ok(ExitCode::SUCCESS)
                }
                Some(e) => {
                    eprintln!("error: {e}");
                    eprintln!(
                        "hint: `cairn log repair {}` truncates there, keeping a copy",
                        dir.display()
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        LogCommand::Repair { dir } => {
            let report =
                log::repair(&dir).with_context(|| format!("repairing {}", dir.display()))?;
            match &report.cut_at {
                None => println!(
                    "{}: clean, nothing cut ({} records)",
                    dir.display(),
                    report.kept_records
                ),
                Some((seg, pos)) => println!(
                    "cut {} at byte {pos}: kept {} record(s), removed {} byte(s) and {} later segment(s); copies in {}",
                    seg.display(),
                    report.kept_records,
                    report.bytes_cut,
                    report.segments_removed,
                    report
                        .saved_to
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Stats { dir, json } => {
            let s = log::stats(&dir).with_context(|| format!("reading {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{}: {} segment(s), {} record(s), {} bytes",
                dir.display(),
                s.segments,
                s.records,
                s.bytes
            );
            if let Some((a, b)) = s.time_range_ns {
                println!(
                    "time range: {} .. {} ({:.3} s)",
                    fmt_time(a),
                    fmt_time(b),
                    (b - a) as f64 / 1e9
                );
            }
            println!("{:<20} {:>10} {:>14}", "stage", "records", "bytes");
            for (stage, st) in &s.stages {
                println!("{stage:<20} {:>10} {:>14}", st.records, st.bytes);
            }
            println!("{:<20} {:>10}", "kind", "records");
            for (kind, n) in &s.kinds {
                println!("{kind:<20} {n:>10}");
            }
            if let Some(t) = &s.torn_tail {
                println!("torn tail: {t}");
            }
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Cat {
            dir,
            stage,
            from,
            follow,
        } => {
            let reader =
                LogReader::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let keep = |e: &cairn::record::Envelope| stage.as_deref().is_none_or(|s| e.stage == s);
            if follow {
                let mut follower = reader.follow(from);
                loop {
                    for env in follower.wait(Duration::from_millis(500))? {
                        if keep(&env) {
                            writeln!(out, "{}", env.to_json())?;
                        }
                    }
                    out.flush()?;
                }
            }
            for env in reader.iter_from(from) {
                let env = env?;
                if keep(&env) && writeln!(out, "{}", env.to_json()).is_err() {
                    // A closed pipe (`| head`) is a normal way to stop reading.
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let _ = out.flush();
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn fmt_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    format!("{secs}.{:03}", (ns % 1_000_000_000) / 1_000_000)
}
