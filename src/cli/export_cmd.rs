//! `cairn export LOG --what sft|preferences|rollouts --out FILE`: datasets derived from a
//! run's events, in the formats the Hugging Face ecosystem reads (JSON Lines). `sft`: the
//! exact examples the run's SFT steps trained on, as chat `messages`. `preferences`: every
//! AI-feedback judgement as `prompt` / `chosen` / `rejected` (the column names TRL's reward
//! and DPO trainers read) plus the soft label and its votes. `rollouts`: every PPO rollout
//! with its policy version, PM score and answer.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};

use cairn::log::LogReader;
use cairn::record::Payload;

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
    /// Output file (JSON Lines).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `cairn export`.
pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let reader =
        LogReader::open(&args.log).with_context(|| format!("opening {}", args.log.display()))?;
    let mut by_key = HashMap::new();
    let mut steps = Vec::new();
    let mut records = Vec::new();
    for env in reader.iter_from(0) {
        let env = env?;
        match (&env.payload, args.what) {
            (Payload::SftStep(_), What::Sft) => steps.push(env.clone()),
            (Payload::Judgement(_), What::Preferences) | (Payload::Rollout(_), What::Rollouts) => {
                records.push(env.clone())
            }
            _ => {}
        }
        by_key.insert(env.key, env);
    }
    // Write to a temporary file, then rename: a failed export leaves no half file behind.
    let tmp = args.out.with_extension("partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut n = 0;
    match args.what {
        What::Sft => {
            for step in &steps {
                for parent in &step.parents {
                    let Some(rec) = by_key.get(parent) else {
                        continue;
                    };
                    let (conversation, response) = match &rec.payload {
                        Payload::Revision(r) => (&r.conversation, &r.response),
                        Payload::Sample(s) => (&s.conversation, &s.response),
                        _ => continue,
                    };
                    let Payload::SftStep(s) = &step.payload else {
                        continue;
                    };
                    let line = serde_json::json!({
                        "messages": [
                            {"role": "user", "content": conversation.prompt},
                            {"role": "assistant", "content": response},
                        ],
                        "purpose": conversation.purpose,
                        "key": rec.key.to_string(),
                        "stage": rec.stage,
                        "sft_step": s.step,
                    });
                    writeln!(out, "{line}")?;
                    n += 1;
                }
            }
        }
        What::Preferences => {
            for env in &records {
                let Payload::Judgement(j) = &env.payload else {
                    continue;
                };
                // The answer the label leans to is `chosen`; `p_chosen` keeps the soft label.
                let first = j.p_a >= 0.5;
                let (chosen, rejected) = if first {
                    (&j.response_a, &j.response_b)
                } else {
                    (&j.response_b, &j.response_a)
                };
                let line = serde_json::json!({
                    "prompt": j.conversation.prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "p_chosen": if first { j.p_a } else { 1.0 - j.p_a },
                    "purpose": j.conversation.purpose,
                    "principles": j.principles,
                    "cot": j.cot,
                    "votes": j.votes,
                    "key": env.key.to_string(),
                });
                writeln!(out, "{line}")?;
                n += 1;
            }
        }
        What::Rollouts => {
            for env in &records {
                let Payload::Rollout(r) = &env.payload else {
                    continue;
                };
                let line = serde_json::json!({
                    "prompt": r.conversation.prompt,
                    "completion": r.response,
                    "policy_version": r.policy_version,
                    "score": r.score,
                    "tokens": r.tokens.len(),
                    "seed": r.seed,
                    "key": env.key.to_string(),
                });
                writeln!(out, "{line}")?;
                n += 1;
            }
        }
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}: {n} record(s)", args.out.display());
    Ok(ExitCode::SUCCESS)
}
