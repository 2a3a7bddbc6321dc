//! Rebuilding a run's derived state from its events alone — no model, no dataflow: the
//! datasets it trained on (SFT examples, AI-feedback comparisons, PPO rollouts), every metric
//! it logged, and its latest checkpoints (with their sha256 checked against the files). This
//! is what `cairn replay` and `cairn export` print and write; it reads one pass over the log.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::log::{LogError, LogReader};
use crate::record::{CheckpointRecord, Envelope, Payload};

/// What a run built, rebuilt from its events.
#[derive(Clone, Debug, Default)]
pub struct Rebuilt {
    /// The examples the SFT steps trained on, in step order, as chat `messages`.
    pub sft: Vec<Value>,
    /// Every judgement as `prompt` / `chosen` / `rejected` plus the soft label.
    pub preferences: Vec<Value>,
    /// Every PPO rollout.
    pub rollouts: Vec<Value>,
    /// Every metric event (SFT/PM steps and evaluations, PPO updates) in log order.
    pub metrics: Vec<Value>,
    /// The latest checkpoint of each stage.
    pub checkpoints: Vec<CheckpointCheck>,
    /// Events read.
    pub events: u64,
    /// Events per kind.
    pub kinds: BTreeMap<String, u64>,
    /// Wall-clock seconds between the run's first and last event (how long the run took).
    pub original_seconds: f64,
    /// Seconds spent reading and rebuilding from the events.
    pub events_seconds: f64,
    /// Seconds spent checking checkpoint files against their logged sha256.
    pub checkpoint_seconds: f64,
}

/// A checkpoint event and whether the files still match it.
#[derive(Clone, Debug)]
pub struct CheckpointCheck {
    /// Stage that wrote it.
    pub stage: String,
    /// The event.
    pub record: CheckpointRecord,
    /// `Some(true)` when `model.safetensors` has the logged sha256, `Some(false)` when it
    /// differs, `None` when the file is gone.
    pub intact: Option<bool>,
}

/// Reads `log` once and rebuilds everything derivable from it.
pub fn rebuild(log: &Path) -> Result<Rebuilt, LogError> {
    let started = std::time::Instant::now();
    let reader = LogReader::open(log)?;
    let mut by_key: HashMap<crate::record::Key, Envelope> = HashMap::new();
    let mut steps = Vec::new();
    let mut out = Rebuilt::default();
    let mut latest: BTreeMap<String, CheckpointRecord> = BTreeMap::new();
    let (mut first, mut last) = (u64::MAX, 0u64);
    for env in reader.iter_from(0) {
        let env = env?;
        out.events += 1;
        *out.kinds.entry(env.payload.kind().to_string()).or_default() += 1;
        first = first.min(env.wall_ns);
        last = last.max(env.wall_ns);
        let metric = |fields: Value| {
            let mut m = json!({"stage": env.stage, "kind": env.payload.kind(), "epoch": env.epoch,
                "wall_ns": env.wall_ns, "key": env.key.to_string()});
            if let (Some(m), Value::Object(f)) = (m.as_object_mut(), fields) {
                m.extend(f);
            }
            m
        };
        match &env.payload {
            Payload::SftStep(_) => {
                out.metrics.push(metric(env.payload.to_json()));
                steps.push(env.clone());
            }
            Payload::SftEval(_)
            | Payload::PmStep(_)
            | Payload::PmEval(_)
            | Payload::PpoUpdate(_) => {
                out.metrics.push(metric(env.payload.to_json()));
            }
            Payload::Judgement(j) => {
                let first_wins = j.p_a >= 0.5;
                let (chosen, rejected) = if first_wins {
                    (&j.response_a, &j.response_b)
                } else {
                    (&j.response_b, &j.response_a)
                };
                out.preferences.push(json!({
                    "prompt": j.conversation.prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "p_chosen": if first_wins { j.p_a } else { 1.0 - j.p_a },
                    "purpose": j.conversation.purpose,
                    "principles": j.principles,
                    "cot": j.cot,
                    "votes": j.votes,
                    "key": env.key.to_string(),
                }));
            }
            Payload::Rollout(r) => out.rollouts.push(json!({
                "prompt": r.conversation.prompt,
                "completion": r.response,
                "policy_version": r.policy_version,
                "score": r.score,
                "tokens": r.tokens.len(),
                "seed": r.seed,
                "key": env.key.to_string(),
            })),
            Payload::Checkpoint(c) => {
                latest.insert(env.stage.clone(), c.clone());
            }
            _ => {}
        }
        by_key.insert(env.key, env);
    }
    for step in &steps {
        let Payload::SftStep(s) = &step.payload else {
            continue;
        };
        for parent in &step.parents {
            let Some(rec) = by_key.get(parent) else {
                continue;
            };
            let (conversation, response) = match &rec.payload {
                Payload::Revision(r) => (&r.conversation, &r.response),
                Payload::Sample(s) => (&s.conversation, &s.response),
                _ => continue,
            };
            out.sft.push(json!({
                "messages": [
                    {"role": "user", "content": conversation.prompt},
                    {"role": "assistant", "content": response},
                ],
                "purpose": conversation.purpose,
                "key": rec.key.to_string(),
                "stage": rec.stage,
                "sft_step": s.step,
            }));
        }
    }
    out.events_seconds = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    for (stage, record) in latest {
        let file = PathBuf::from(&record.path).join("model.safetensors");
        let intact = sha256_file(&file).ok().map(|sha| sha == record.sha256);
        out.checkpoints.push(CheckpointCheck {
            stage,
            record,
            intact,
        });
    }
    out.checkpoint_seconds = started.elapsed().as_secs_f64();
    if out.events > 0 && last >= first {
        out.original_seconds = (last - first) as f64 / 1e9;
    }
    Ok(out)
}

/// Writes `rows` as JSON Lines to `path`, through a temporary file renamed at the end (a
/// failed write leaves no half file).
pub fn write_jsonl(path: &Path, rows: &[Value]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for row in rows {
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, path)
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
