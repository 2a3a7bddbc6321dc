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
    /// Print the lineage of one record: its ancestors back to the prompt, oldest first.
    Trace {
        /// Log directory.
        dir: PathBuf,
        /// The record's key (32 hex digits, as `log cat` prints it).
        key: String,
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
        /// Keep waiting for new events (Ctrl-C to stop); follows every partition of a
        /// multi-worker log.
        #[arg(long)]
        follow: bool,
    },
}

/// Runs a log subcommand. Checks of a partitioned log (`cairn run --workers`) check each
/// partition in turn.
pub fn run(cmd: LogCommand) -> anyhow::Result<ExitCode> {
    let each = |dir: &std::path::Path, f: &dyn Fn(PathBuf) -> LogCommand| {
        let parts = log::partitions(dir).unwrap_or_default();
        if parts.len() > 1 {
            let mut code = ExitCode::SUCCESS;
            for part in parts {
                if run(f(part))? != ExitCode::SUCCESS {
                    code = ExitCode::FAILURE;
                }
            }
            return Ok(Some(code));
        }
        anyhow::Ok(None)
    };
    match &cmd {
        LogCommand::Verify { dir } => {
            if let Some(code) = each(dir, &|d| LogCommand::Verify { dir: d })? {
                return Ok(code);
            }
        }
        LogCommand::Repair { dir } => {
            if let Some(code) = each(dir, &|d| LogCommand::Repair { dir: d })? {
                return Ok(code);
            }
        }
        LogCommand::Stats { dir, json } => {
            let json = *json;
            if let Some(code) = each(dir, &|d| LogCommand::Stats { dir: d, json })? {
                return Ok(code);
            }
        }
        _ => {}
    }
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
            if !s.answers.is_empty() {
                println!("answer quality (model-free checks):");
                for (stage, q) in &s.answers {
                    println!("  {stage:<18} {}", q.summary());
                }
            }
            for (stage, t) in &s.targets {
                let reasons: Vec<String> = s_reasons(&t.reasons);
                println!(
                    "training targets ({stage}): {} kept{}, {} dropped{}",
                    t.kept,
                    if t.trimmed > 0 {
                        format!(" ({} trimmed to a full sentence)", t.trimmed)
                    } else {
                        String::new()
                    },
                    t.dropped,
                    if reasons.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", reasons.join(", "))
                    }
                );
            }
            for (stage, j) in &s.judgements {
                println!("AI feedback ({stage}): {}", j.summary());
            }
            if let Some(t) = &s.torn_tail {
                println!("torn tail: {t}");
            }
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Trace { dir, key } => {
            let key = cairn::record::Key::parse_hex(&key)
                .with_context(|| format!("`{key}` is not a record key (32 hex digits)"))?;
            let reader =
                LogReader::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
            let mut by_key = std::collections::HashMap::new();
            for env in reader.iter_from(0) {
                let env = env?;
                by_key.insert(env.key, env);
            }
            anyhow::ensure!(
                by_key.contains_key(&key),
                "{}: no record with key {key}",
                dir.display()
            );
            // Ancestors, each once, oldest first (depth-first from the record, then reversed).
            let mut order = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut stack = vec![key];
            while let Some(k) = stack.pop() {
                if !seen.insert(k) {
                    continue;
                }
                if let Some(env) = by_key.get(&k) {
                    order.push(env);
                    stack.extend(env.parents.iter().copied());
                }
            }
            order.sort_by_key(|e| e.offset);
            for env in order {
                println!(
                    "{:>8}  {:<12} {:<10} {}  {}",
                    env.offset,
                    env.stage,
                    env.payload.kind(),
                    env.key,
                    summary(&env.payload)
                );
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
                // One follower per partition (a multi-worker run writes one log per worker;
                // `--from` counts within each), polled in turn.
                let mut followers = reader
                    .parts()
                    .iter()
                    .map(|p| LogReader::open(p).map(|r| r.follow(from)))
                    .collect::<Result<Vec<_>, _>>()?;
                loop {
                    let mut any = false;
                    for follower in &mut followers {
                        for env in follower.poll()? {
                            any = true;
                            if keep(&env) && writeln!(out, "{}", env.to_json()).is_err() {
                                return Ok(ExitCode::SUCCESS); // the reader went away
                            }
                        }
                    }
                    if out.flush().is_err() {
                        return Ok(ExitCode::SUCCESS);
                    }
                    if !any {
                        std::thread::sleep(Duration::from_millis(50));
                    }
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

/// One line describing a record, for `log trace`.
fn summary(payload: &cairn::record::Payload) -> String {
    use cairn::record::Payload;
    let short = |t: &str| {
        let t = t.replace('\n', " ");
        if t.chars().count() > 90 {
            format!("{}…", t.chars().take(90).collect::<String>())
        } else {
            t
        }
    };
    match payload {
        Payload::Prompt(p) => format!("[{:?}] {}", p.purpose, short(&p.text)),
        Payload::Sample(s) => short(&s.response),
        Payload::Critique(c) => format!(
            "round {} `{}`: {}",
            c.round,
            c.principle,
            short(&c.critique)
        ),
        Payload::Revision(r) => format!(
            "round {} `{}`: {}",
            r.round,
            r.principle,
            short(&r.response)
        ),
        Payload::SftStep(s) => format!(
            "step {} loss {:.4} ({} examples)",
            s.step, s.loss, s.examples
        ),
        Payload::SftEval(e) => format!("held-out loss {:.4} at step {}", e.loss, e.step),
        Payload::Checkpoint(c) => format!("{} (sha256 {})", c.path, c.sha256),
        Payload::TrainState(t) => format!(
            "state after {} training jobs of `{}` in {} ({} files)",
            t.step,
            t.model,
            t.path,
            t.files.len()
        ),
        other => short(&other.to_json().to_string()),
    }
}

/// `reason: count` items, most frequent first.
fn s_reasons(reasons: &std::collections::BTreeMap<String, u64>) -> Vec<String> {
    let mut items: Vec<(&String, &u64)> = reasons.iter().collect();
    items.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    items
        .into_iter()
        .map(|(r, n)| format!("{r}: {n}"))
        .collect()
}
