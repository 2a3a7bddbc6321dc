//! `cairn ingest`: reads prompt sources into an event log as `prompt` events. Each prompt's
//! key is derived from its source, index and text, so ingesting twice appends nothing new.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use cairn::log::{LogOptions, LogWriter, SyncPolicy};
use cairn::paths;
use cairn::prompts::{PromptSource, read_prompts};
use cairn::record::{Key, NewEvent, Payload, PromptPurpose, PromptRecord, RunId};

/// Arguments of `cairn ingest`.
#[derive(Args, Debug)]
pub struct IngestArgs {
    /// Log directory (created if missing).
    #[arg(long)]
    pub log: PathBuf,
    /// Red-team prompt files (text, .jsonl or .json). Default: the fetched red-team sets.
    #[arg(long = "red-team")]
    pub red_team: Vec<PathBuf>,
    /// Helpful prompt files. Default: the fetched helpful sets (when no file is given at all).
    #[arg(long)]
    pub helpful: Vec<PathBuf>,
}

/// Runs `cairn ingest`.
pub fn run(args: IngestArgs) -> anyhow::Result<ExitCode> {
    let sources: Vec<PromptSource> = if args.red_team.is_empty() && args.helpful.is_empty() {
        paths::default_prompt_sources()
    } else {
        args.red_team
            .iter()
            .map(|p| PromptSource::new(p, PromptPurpose::RedTeam))
            .chain(
                args.helpful
                    .iter()
                    .map(|p| PromptSource::new(p, PromptPurpose::Helpful)),
            )
            .collect()
    };
    // Read every source before touching the log, so bad input leaves the log as it was.
    let mut batches = Vec::new();
    for source in &sources {
        let prompts = read_prompts(source).with_context(|| {
            if source.path.starts_with(paths::cairn_home()) {
                format!("reading prompts ({})", paths::SETUP_HINT)
            } else {
                "reading prompts".to_string()
            }
        })?;
        batches.push((source, prompts));
    }
    let opts = LogOptions {
        sync: SyncPolicy::Explicit,
        ..LogOptions::default()
    };
    let writer = LogWriter::open(&args.log, opts)
        .with_context(|| format!("opening log {}", args.log.display()))?;
    let run_id = RunId(
        Key::builder("ingest")
            .str(&args.log.display().to_string())
            .finish()
            .0,
    );
    let (mut new, mut existing) = (0u64, 0u64);
    for (source, prompts) in batches {
        let events = prompts
            .into_iter()
            .map(|p| {
                let key = Key::builder("prompts")
                    .str(&p.source)
                    .u64(p.index)
                    .str(&p.text)
                    .finish();
                NewEvent::new(
                    key,
                    run_id,
                    "prompts",
                    vec![],
                    0,
                    Payload::Prompt(PromptRecord {
                        source: p.source,
                        index: p.index,
                        purpose: p.purpose,
                        text: p.text,
                    }),
                )
            })
            .collect();
        for a in writer.append_batch(events)? {
            match a {
                cairn::log::Appended::New(_) => new += 1,
                cairn::log::Appended::Existing(_) => existing += 1,
            }
        }
        tracing::info!(source = %source.name, "ingested");
    }
    writer.close()?;
    println!(
        "{}: {new} new prompt event(s), {existing} already logged",
        args.log.display()
    );
    Ok(ExitCode::SUCCESS)
}
