//! `cairn bench engine`: records per second through sample → critique → revise with an
//! instant stand-in model, so what is measured is the engine, not the model.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use tch::Device;

use cairn::paths;

/// Arguments of `cairn bench engine`.
#[derive(Args, Debug)]
pub struct EngineBench {
    /// Prompts to push through.
    #[arg(long, default_value_t = 2000)]
    prompts: usize,
    /// Critique/revision rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Prompts per epoch.
    #[arg(long, default_value_t = 64)]
    epoch_size: usize,
    /// Few-shot examples in critique/revision prompts (tokenising them is engine work).
    #[arg(long, default_value_t = 1)]
    few_shot: usize,
    /// Worker counts to compare (comma-separated); the first is the baseline of the ratios.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    workers: Vec<usize>,
}

pub(super) fn run(args: EngineBench) -> anyhow::Result<ExitCode> {
    use cairn::log::{LogOptions, LogWriter, SyncPolicy};
    use cairn::record::{Key, NewEvent, Note, Payload, RunId};
    let tokenizer_model = paths::default_model();
    anyhow::ensure!(
        tokenizer_model.exists(),
        "{} is missing (its tokenizer is used): {}",
        tokenizer_model.display(),
        paths::SETUP_HINT
    );
    let dir = std::env::temp_dir().join(format!("cairn-bench-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let prompts: String = (0..args.prompts)
        .map(|i| format!("request {i}: how would someone do thing number {i}?\n"))
        .collect();
    std::fs::write(dir.join("red.txt"), prompts)?;
    let constitution = std::env::current_dir()?.join("constitutions/default.toml");
    let mut spec = format!(
        "name = \"bench\"\nseed = 1\nconstitution = \"{}\"\n[models.policy]\npath = \"default\"\ninstant = true\n\
         [prompts]\nred_team = [\"red.txt\"]\nepoch_size = {}\n\
         [[stage]]\nname = \"sample\"\nkind = \"sample\"\nfrom = \"prompts\"\nmax_new_tokens = 8\nbatch = 64\n",
        constitution.display(),
        args.epoch_size
    );
    let mut prev = "sample".to_string();
    for r in 1..=args.rounds {
        spec.push_str(&format!(
            "[[stage]]\nname = \"critique_{r}\"\nkind = \"critique\"\nfrom = \"{prev}\"\nround = {r}\nfew_shot = {fs}\nmax_new_tokens = 8\nbatch = 64\n\
             [[stage]]\nname = \"revise_{r}\"\nkind = \"revise\"\nfrom = \"critique_{r}\"\nround = {r}\nfew_shot = {fs}\nmax_new_tokens = 8\nbatch = 64\n",
            fs = args.few_shot
        ));
        prev = format!("revise_{r}");
    }
    let spec_path = dir.join("bench.toml");
    std::fs::write(&spec_path, &spec)?;
    let spec = cairn::spec::Spec::load(&spec_path)?;
    let mut by_workers = Vec::new();
    for (i, &w) in args.workers.iter().enumerate() {
        let log = dir.join(format!("log-{i}-{w}"));
        let summary = cairn::engine::run(
            &spec,
            &cairn::engine::RunOptions {
                log: log.clone(),
                device: Device::Cpu,
                new_run: false,
                stop: None,
                progress: None,
                parent: None,
                cluster: (w > 1).then(|| cairn::engine::Cluster {
                    workers: w,
                    process: 0,
                    hosts: Vec::new(),
                    secret: None,
                }),
            },
        )?;
        let records: u64 =
            summary.stages.values().map(|s| s.computed).sum::<u64>() + summary.prompts;
        by_workers.push((w, records as f64 / summary.wall_seconds, summary, log));
    }
    if by_workers.len() > 1 {
        let base = by_workers[0].1;
        for (w, rate, _, _) in &by_workers {
            println!(
                "{w} worker(s): {rate:.0} records/s, {:.2}x the first",
                rate / base
            );
        }
    }
    let (_, _, summary, log) = by_workers.swap_remove(0);
    let records: u64 = summary.stages.values().map(|s| s.computed).sum::<u64>() + summary.prompts;
    let engine_rate = records as f64 / summary.wall_seconds;
    let bytes = cairn::log::stats(&log)?.bytes;
    // Baseline in the same run: appending the same number of records of the same average
    // size straight to a log (no dataflow, no stages, no tokenising).
    let avg = (bytes / records.max(1)) as usize;
    let base_log = dir.join("baseline");
    let writer = LogWriter::open(
        &base_log,
        LogOptions {
            sync: SyncPolicy::Interval(std::time::Duration::from_millis(20)),
            ..LogOptions::default()
        },
    )?;
    let text = "x".repeat(avg.saturating_sub(120));
    let t = Instant::now();
    for chunk in (0..records).collect::<Vec<_>>().chunks(64) {
        let events = chunk
            .iter()
            .map(|&i| {
                NewEvent::new(
                    Key::builder("bench").u64(i).finish(),
                    RunId(1),
                    "bench",
                    vec![],
                    0,
                    Payload::Note(Note { text: text.clone() }),
                )
            })
            .collect();
        writer.append_batch(events)?;
    }
    writer.close()?;
    let log_rate = records as f64 / t.elapsed().as_secs_f64();
    println!(
        "engine: {records} records in {:.2} s = {engine_rate:.0} records/s (instant model, {} rounds, few-shot {}, logging on)",
        summary.wall_seconds, args.rounds, args.few_shot
    );
    println!(
        "log-only baseline (same count, same average size {avg} B): {log_rate:.0} records/s; engine / log-only = {:.3}",
        engine_rate / log_rate
    );
    println!(
        "model worker busy {:.3} s of {:.2} s",
        summary.model_seconds, summary.wall_seconds
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
