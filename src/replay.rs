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

pub use crate::paths::sha256_file;

/// Writes `rows` (JSON objects with the same fields) as a Parquet file: one column per
/// top-level field, typed from the values — integers as INT64, other numbers as DOUBLE,
/// booleans as BOOLEAN, strings as UTF-8 — and nested values (message lists, votes) as their
/// JSON text; integers beyond the range of INT64 (seeds) as their decimal text. Written
/// through a temporary file renamed at the end.
pub fn write_parquet(path: &Path, rows: &[Value]) -> Result<(), String> {
    use parquet::basic::{LogicalType, Repetition, Type as Physical};
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;
    use std::sync::Arc;

    #[derive(Clone, Copy, PartialEq)]
    enum Col {
        Int,
        Double,
        Bool,
        Text,
    }
    let err = |e: parquet::errors::ParquetError| format!("{}: {e}", path.display());
    let names: Vec<String> = rows
        .first()
        .and_then(|r| r.as_object())
        .map(|o| o.keys().cloned().collect())
        // No rows: a valid file with a single, empty `key` column.
        .unwrap_or_else(|| vec!["key".to_string()]);
    let kind_of = |v: &Value| match v {
        Value::Number(n) if n.is_i64() => Col::Int,
        // Above i64 (seeds): kept exact as text rather than rounded through a double.
        Value::Number(n) if n.is_u64() => Col::Text,
        Value::Number(_) => Col::Double,
        Value::Bool(_) => Col::Bool,
        _ => Col::Text,
    };
    let kinds: Vec<Col> = names
        .iter()
        .map(|name| {
            let mut kind = None;
            for r in rows {
                let k = kind_of(&r[name]);
                kind = match (kind, k) {
                    (None, k) => Some(k),
                    (Some(a), b) if a == b => Some(a),
                    (Some(Col::Int), Col::Double) | (Some(Col::Double), Col::Int) => {
                        Some(Col::Double)
                    }
                    _ => Some(Col::Text),
                };
            }
            kind.unwrap_or(Col::Text)
        })
        .collect();
    let fields = names
        .iter()
        .zip(&kinds)
        .map(|(name, kind)| {
            let (physical, logical) = match kind {
                Col::Int => (Physical::INT64, None),
                Col::Double => (Physical::DOUBLE, None),
                Col::Bool => (Physical::BOOLEAN, None),
                Col::Text => (Physical::BYTE_ARRAY, Some(LogicalType::String)),
            };
            Type::primitive_type_builder(name, physical)
                .with_repetition(Repetition::REQUIRED)
                .with_logical_type(logical)
                .build()
                .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let schema = Arc::new(
        Type::group_type_builder("record")
            .with_fields(fields)
            .build()
            .map_err(err)?,
    );
    let tmp = path.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::default()))
        .map_err(err)?;
    let mut group = writer.next_row_group().map_err(err)?;
    for (name, kind) in names.iter().zip(&kinds) {
        let Some(mut column) = group.next_column().map_err(err)? else {
            break;
        };
        let values = rows.iter().map(|r| &r[name]);
        match kind {
            Col::Int => {
                let v: Vec<i64> = values.map(|v| v.as_i64().unwrap_or(0)).collect();
                column.typed::<Int64Type>().write_batch(&v, None, None)
            }
            Col::Double => {
                let v: Vec<f64> = values.map(|v| v.as_f64().unwrap_or(f64::NAN)).collect();
                column.typed::<DoubleType>().write_batch(&v, None, None)
            }
            Col::Bool => {
                let v: Vec<bool> = values.map(|v| v.as_bool().unwrap_or(false)).collect();
                column.typed::<BoolType>().write_batch(&v, None, None)
            }
            Col::Text => {
                let v: Vec<ByteArray> = values
                    .map(|v| match v {
                        Value::String(s) => ByteArray::from(s.as_str()),
                        other => ByteArray::from(other.to_string().as_str()),
                    })
                    .collect();
                column.typed::<ByteArrayType>().write_batch(&v, None, None)
            }
        }
        .map_err(err)?;
        column.close().map_err(err)?;
    }
    group.close().map_err(err)?;
    writer.close().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
