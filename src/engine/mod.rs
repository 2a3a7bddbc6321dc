//! The engine: turns a dataflow spec into a timely dataflow of stage operators, feeds it the
//! prompts epoch by epoch, and runs it to completion against the event log.
//!
//! - Every output is appended to the log **before** it is emitted downstream.
//! - Before computing a task the operator asks whether its key is already logged; if so it
//!   re-emits the logged record instead (exactly-once resume: rerunning the same command on
//!   the same log continues where it stopped).
//! - Model work is batched per operator activation and sent to the model worker thread; the
//!   worker wakes the operator through a timely `SyncActivator` when the reply is ready.
//!
//! Adding a stage never touches this module: see `crate::stages`.

mod cluster;
mod driver;
mod fork;
pub mod links;
mod operator;
pub mod probe;
mod train_state;
mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::constitution::Constitution;
use crate::log::{LogError, LogOptions, LogReader, LogWriter, SyncPolicy};
use crate::model::ModelError;
use crate::prompts::{PromptSource, read_complete_prompts, read_prompts};
use crate::record::{Key, NewEvent, Payload, PromptPurpose, PromptRecord, RunId, RunStarted};
use crate::spec::Spec;
use crate::stages::{Rec, StageContext, StageError, StageKind};
use crate::worker::{ModelFactory, ServedModel};
use crate::worker::{ModelWorker, WorkerOptions};

pub use cluster::{Cluster, partition_dir};
pub use fork::{ForkReport, fork, import_events};
pub use operator::OperatorStats;
pub use verify::{VerifyReport, verify};

/// How to run a dataflow.
#[derive(Clone)]
pub struct RunOptions {
    /// Event log directory (created if missing; continued if it holds the same run).
    pub log: PathBuf,
    /// Device of the model worker.
    pub device: tch::Device,
    /// Start a new run in an existing log even though settings changed.
    pub new_run: bool,
    /// Set by a signal handler: stop feeding prompts, flush and return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Called a few times a second with the run's progress (for progress bars).
    pub progress: Option<ProgressFn>,
    /// The run this one was forked from (recorded in `run_started`).
    pub parent: Option<RunId>,
    /// Run on several timely workers (threads, processes); `None`: one worker.
    pub cluster: Option<Cluster>,
}

impl RunOptions {
    /// One worker on `device`, writing to `log`: no signal, no progress callback, no parent,
    /// continuing the log's run (set the other fields with struct update syntax).
    pub fn new(log: PathBuf, device: tch::Device) -> RunOptions {
        RunOptions {
            log,
            device,
            new_run: false,
            stop: None,
            progress: None,
            parent: None,
            cluster: None,
        }
    }
}

/// Receives [`Progress`] snapshots.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A snapshot of a running dataflow.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Prompts fed so far.
    pub prompts_fed: u64,
    /// Prompts known (grows in follow mode).
    pub prompts_known: u64,
    /// Per stage instance counters.
    pub stages: BTreeMap<String, OperatorStats>,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// The run id.
    pub run_id: RunId,
    /// Per stage instance: outputs computed now and outputs found in the log.
    pub stages: BTreeMap<String, OperatorStats>,
    /// Prompts fed.
    pub prompts: u64,
    /// Checkpoint directories written or found.
    pub checkpoints: Vec<String>,
    /// Whether the run stopped early on request.
    pub interrupted: bool,
    /// Records by (stage, label: principle, purpose or kind), kept by differential dataflow.
    pub aggregates: BTreeMap<(String, String), i64>,
    /// Wall-clock seconds of the dataflow (models loaded before it starts).
    pub wall_seconds: f64,
    /// Seconds the model worker spent in model calls meanwhile.
    pub model_seconds: f64,
    /// Per model, prompt tokens prefilled and shared-prefix tokens served from memory during
    /// the dataflow.
    pub prefill: BTreeMap<String, crate::worker::PrefillCount>,
    /// Per model, its decode steps during the dataflow.
    pub decode: BTreeMap<String, crate::worker::DecodeCount>,
}

/// Per model, `since(after, before)` of two readings of one of the worker's counters, for
/// the models whose count `moved`.
fn per_model_since<T: Copy + Default>(
    before: &BTreeMap<String, T>,
    after: &BTreeMap<String, T>,
    since: impl Fn(&T, &T) -> T,
    moved: impl Fn(&T) -> bool,
) -> BTreeMap<String, T> {
    after
        .iter()
        .map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            (name.clone(), since(a, &b))
        })
        .filter(|(_, c)| moved(c))
        .collect()
}

/// Each model's decode steps between two readings of the worker's counters.
pub(crate) fn decode_during(
    before: &crate::worker::WorkerStats,
    after: &crate::worker::WorkerStats,
) -> BTreeMap<String, crate::worker::DecodeCount> {
    per_model_since(
        &before.decode,
        &after.decode,
        |a, b| a.since(b),
        |c| c.steps > 0,
    )
}

/// What each model prefilled between two readings of the worker's counters.
pub(crate) fn prefill_during(
    before: &crate::worker::WorkerStats,
    after: &crate::worker::WorkerStats,
) -> BTreeMap<String, crate::worker::PrefillCount> {
    per_model_since(
        &before.prefill,
        &after.prefill,
        |a, b| a.since(b),
        |c| c.computed + c.reused > 0,
    )
}

impl RunSummary {
    /// Share of the dataflow's wall time not spent in model calls (engine overhead, logging,
    /// waiting); 0 when nothing ran.
    pub fn share_outside_model(&self) -> f64 {
        if self.wall_seconds <= 0.0 {
            return 0.0;
        }
        (1.0 - self.model_seconds / self.wall_seconds).max(0.0)
    }
}

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The event log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A stage failed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// Inputs (constitution, prompts) are unusable.
    #[error("{0}")]
    Input(String),
    /// The log belongs to a run with other settings.
    #[error(
        "{log}: this log holds a run with different settings (digest {old:032x}, now {new:032x}); \
         use a new log directory, or pass --new-run to start a new run in this one"
    )]
    SettingsChanged {
        /// The log.
        log: PathBuf,
        /// Digest recorded.
        old: u128,
        /// Digest now.
        new: u128,
    },
}

/// Digest of everything that changes results: the spec text, the constitution and the model
/// files (content hashes).
pub fn settings_digest(spec: &Spec, constitution: &Constitution) -> Result<u128, EngineError> {
    let mut k = Key::builder("run-settings")
        .str(&spec.text)
        .u128(constitution.digest());
    for m in &spec.models {
        k = k.str(&m.name).u128(file_digest(&m.path)?);
    }
    Ok(k.finish().0)
}

fn file_digest(path: &Path) -> Result<u128, EngineError> {
    let io = |e: std::io::Error| EngineError::Input(format!("{}: {e}", path.display()));
    let mut hasher = blake3::Hasher::new();
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for e in entries {
            hasher.update(
                e.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            hasher
                .update_reader(std::fs::File::open(&e).map_err(io)?)
                .map_err(io)?;
        }
    } else {
        hasher
            .update_reader(std::fs::File::open(path).map_err(io)?)
            .map_err(io)?;
    }
    let mut first = [0u8; 16];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    Ok(u128::from_le_bytes(first))
}

/// Reads the spec's prompt sources (before the log is touched, so bad files change nothing).
fn load_prompts(spec: &Spec) -> Result<Vec<Rec>, EngineError> {
    let read = if spec.prompts.follow {
        read_complete_prompts
    } else {
        read_prompts
    };
    let defaults = crate::paths::default_prompt_sources();
    let base = spec.path.parent().unwrap_or(Path::new("."));
    let mut excluded = std::collections::HashSet::new();
    for f in &spec.prompts.exclude {
        let source = PromptSource::new(base.join(f), PromptPurpose::RedTeam);
        for p in read_prompts(&source).map_err(|e| EngineError::Input(e.to_string()))? {
            excluded.insert(p.text.trim().to_string());
        }
    }
    let mut out = Vec::new();
    for (purpose, files, limit, skip) in [
        (
            PromptPurpose::RedTeam,
            &spec.prompts.red_team,
            spec.prompts.red_team_limit,
            spec.prompts.red_team_skip,
        ),
        (
            PromptPurpose::Helpful,
            &spec.prompts.helpful,
            spec.prompts.helpful_limit,
            spec.prompts.helpful_skip,
        ),
    ] {
        let sources: Vec<PromptSource> = files
            .iter()
            .flat_map(|f| {
                if f == "default" {
                    defaults
                        .iter()
                        .filter(|s| s.purpose == purpose)
                        .cloned()
                        .collect::<Vec<_>>()
                } else {
                    let p = f.replace(
                        "$CAIRN_HOME",
                        &crate::paths::cairn_home().display().to_string(),
                    );
                    vec![PromptSource::new(base.join(p), purpose)]
                }
            })
            .collect();
        let mut taken = 0usize;
        let mut skipped = 0usize;
        for source in sources {
            let prompts = read(&source).map_err(|e| EngineError::Input(e.to_string()))?;
            for p in prompts {
                if excluded.contains(p.text.trim()) {
                    continue;
                }
                if skipped < skip {
                    skipped += 1;
                    continue;
                }
                if limit.is_some_and(|l| taken >= l) {
                    break;
                }
                taken += 1;
                let key = Key::builder("prompts")
                    .str(&p.source)
                    .u64(p.index)
                    .str(&p.text)
                    .finish();
                out.push(Rec {
                    key,
                    parents: Vec::new(),
                    stage: "prompts".into(),
                    payload: Payload::Prompt(PromptRecord {
                        source: p.source,
                        index: p.index,
                        purpose: p.purpose,
                        text: p.text,
                    }),
                });
            }
        }
    }
    // Interleave red-team and helpful prompts deterministically (by key) so every epoch mixes both.
    out.sort_by_key(|r| r.key);
    Ok(out)
}

/// What stages may use, for `spec`: its constitution, seed and models' tokenizers (checking
/// that every model file exists).
fn stage_context(
    spec: &Spec,
    constitution: Arc<Constitution>,
) -> Result<StageContext, EngineError> {
    let mut tokenizers = HashMap::new();
    for m in &spec.models {
        if !m.path.exists() {
            return Err(EngineError::Input(format!(
                "model `{}`: {} does not exist ({})",
                m.name,
                m.path.display(),
                if m.path == crate::paths::feedback_model() {
                    crate::paths::FEEDBACK_HINT
                } else {
                    crate::paths::SETUP_HINT
                }
            )));
        }
        tokenizers.insert(m.name.clone(), crate::model::load::load_tokenizer(&m.path)?);
    }
    Ok(StageContext {
        constitution,
        seed: spec.seed,
        tokenizers: Arc::new(tokenizers),
    })
}

/// Everything a log (every partition) holds, by key — what exactly-once resume re-emits —
/// and the last run recorded in it with its settings digest.
fn logged(log: &Path) -> Result<LoggedRun, EngineError> {
    let mut done: HashMap<Key, Rec> = HashMap::new();
    let mut previous = None;
    for env in LogReader::open(log)?.iter_from(0) {
        let env = env?;
        if let Payload::RunStarted(r) = &env.payload {
            previous = Some((env.run_id, r.settings_digest));
        }
        done.insert(
            env.key,
            Rec {
                key: env.key,
                parents: env.parents,
                stage: env.stage,
                payload: env.payload,
            },
        );
    }
    Ok((done, previous))
}

/// Appends a run's bookkeeping: `run_started` (the settings that determine its results) and
/// `run_source` (where its spec file is, for forks).
fn append_run_events(
    writer: &LogWriter,
    spec: &Spec,
    run_id: RunId,
    digest: u128,
    parent: Option<RunId>,
) -> Result<(), EngineError> {
    writer.append(NewEvent::new(
        Key::builder("run_started").u128(run_id.0).finish(),
        run_id,
        "run",
        vec![],
        0,
        Payload::RunStarted(RunStarted {
            cairn_version: crate::version().to_string(),
            seed: spec.seed,
            settings_digest: digest,
            settings: spec.text.clone(),
            parent_run: parent,
        }),
    ))?;
    let spec_path = std::fs::canonicalize(&spec.path).unwrap_or_else(|_| spec.path.clone());
    writer.append(NewEvent::new(
        Key::builder("run_source")
            .u128(run_id.0)
            .str(&spec_path.display().to_string())
            .finish(),
        run_id,
        "run",
        vec![],
        0,
        Payload::RunSource(crate::record::RunSourceRecord {
            spec_path: spec_path.display().to_string(),
        }),
    ))?;
    Ok(())
}

/// Logged records by key, and the last run with its settings digest.
type LoggedRun = (HashMap<Key, Rec>, Option<(RunId, u128)>);

/// The model factories of `spec` (built on the worker thread).
/// The factories of the spec's models (`only`: just these). A model outside `changing` —
/// the models whose weights the run trains or copies into ([`operator::Plan::weights_change`])
/// — keeps only its packed weights unless the spec says `keep_unpacked`.
fn model_factories(
    spec: &Spec,
    only: Option<&HashSet<String>>,
    changing: &HashSet<String>,
) -> Vec<(String, ModelFactory)> {
    spec.models
        .iter()
        .filter(|m| only.is_none_or(|o| o.contains(&m.name)))
        .map(|m| {
            let path = m.path.clone();
            let instant = m.instant;
            let score_head = m.score_head;
            let dtype = m.dtype;
            let share_prefix = m.share_prefix;
            let decode_rows = m.decode_rows;
            let packed_only = !m.keep_unpacked && !changing.contains(&m.name);
            let quantised = m.quantised;
            let name = m.name.clone();
            let factory: ModelFactory = Box::new(move |device| {
                if instant {
                    return Ok(ServedModel::instant());
                }
                let mut loaded = crate::model::load::load_as(&path, device, dtype)?;
                if score_head {
                    loaded.model.ensure_score_head();
                }
                loaded.model.set_share_prefix(share_prefix);
                loaded.model.set_decode_rows(decode_rows);
                if quantised && !packed_only {
                    return Err(crate::model::ModelError::InvalidRequest(format!(
                        "model `{name}` is quantised, but the run copies weights into it; \
                         only a model the run never changes can keep quantised blocks"
                    )));
                }
                if quantised {
                    let kept = crate::model::load::keep_quantised(&mut loaded)?;
                    tracing::info!(
                        model = name,
                        quantised = kept.quantised,
                        packed = kept.packed,
                        held_mb = kept.held / (1 << 20),
                        released_mb = kept.released / (1 << 20),
                        "inference-only model: keeps its file's quantised blocks"
                    );
                } else if packed_only {
                    let released = loaded.model.keep_only_packed()?;
                    if released > 0 {
                        tracing::info!(
                            model = name,
                            released_mb = released / (1 << 20),
                            "inference-only model: keeps only its packed weights"
                        );
                    }
                }
                let eos = loaded.tokenizer.eos_ids().to_vec();
                Ok(ServedModel::llama(loaded.model, eos))
            });
            (m.name.clone(), factory)
        })
        .collect()
}

/// Runs a dataflow spec to completion (or until `stop` is set) with the built-in stages.
pub fn run(spec: &Spec, opts: &RunOptions) -> Result<RunSummary, EngineError> {
    run_with(spec, opts, &crate::stages::registry())
}

/// Runs a dataflow spec with the given stage kinds (the built-in ones plus any of your own;
/// see `examples/custom_stage.rs`).
pub fn run_with(
    spec: &Spec,
    opts: &RunOptions,
    kinds: &[StageKind],
) -> Result<RunSummary, EngineError> {
    if let Some(c) = &opts.cluster
        && c.total() > 1
    {
        return cluster::run_cluster(spec, opts, kinds, c);
    }
    let constitution = Arc::new(
        Constitution::load(&spec.constitution).map_err(|e| EngineError::Input(e.to_string()))?,
    );
    let prompts = load_prompts(spec)?;
    let digest = settings_digest(spec, &constitution)?;
    let ctx = stage_context(spec, constitution)?;
    // Build every stage before touching the log: configuration errors change nothing.
    let plan = operator::Plan::build(spec, &ctx, kinds)?;

    // What this log already holds: the records exactly-once resume re-emits.
    let writer = LogWriter::open(
        &opts.log,
        LogOptions {
            sync: SyncPolicy::Interval(Duration::from_millis(20)),
            ..LogOptions::default()
        },
    )?;
    let (done, previous) = if writer.next_offset() > 0 {
        logged(&opts.log)?
    } else {
        (HashMap::new(), None)
    };
    let run_id = match previous {
        Some((id, d)) if d == digest => id,
        Some((_, d)) if !opts.new_run => {
            return Err(EngineError::SettingsChanged {
                log: opts.log.clone(),
                old: d,
                new: digest,
            });
        }
        _ => RunId(
            Key::builder("run")
                .u128(digest)
                .u64(writer.next_offset())
                .finish()
                .0,
        ),
    };
    let parent = opts
        .parent
        .or(previous.map(|(id, _)| id))
        .filter(|id| *id != run_id);
    append_run_events(&writer, spec, run_id, digest, parent)?;

    let factories = model_factories(spec, None, &plan.weights_change());
    let worker = ModelWorker::spawn(
        factories,
        WorkerOptions {
            device: opts.device,
            // Bit-identical events need each chunk to be one model call of its own; merging
            // chunks of different stages is the spec's choice (`merge_model_calls`).
            merge: spec.merge_model_calls,
            ..WorkerOptions::default()
        },
    )?;
    let handle = worker.handle();
    let epoch_size = spec.prompts.epoch_size;
    let follow_spec = spec.clone();
    let writer_for_run = writer.clone();
    let opts_for_run = opts.clone();
    let before = handle.stats()?;
    let busy_before = before.busy_ns;
    let wall = std::time::Instant::now();
    let stats_handle = handle.clone();
    let result = timely::execute_directly(move |timely_worker| {
        let env = operator::Env {
            writer: writer_for_run.clone(),
            worker: handle.clone(),
            done: Arc::new(done),
            run_id,
            checkpoint_dir: opts_for_run.log.join("checkpoints"),
            tokenizers: ctx.tokenizers.clone(),
        };
        // One worker: a cluster of one, feeding every epoch.
        let feed = driver::Feed {
            prompts,
            index: 0,
            peers: 1,
            epoch_size,
            follow: follow_spec.prompts.follow.then_some(&follow_spec),
        };
        driver::drive(
            timely_worker,
            plan,
            env,
            &writer_for_run,
            feed,
            &opts_for_run,
        )
    });
    let mut summary = result?;
    summary.wall_seconds = wall.elapsed().as_secs_f64();
    let after = stats_handle.stats()?;
    summary.model_seconds = (after.busy_ns - busy_before) as f64 / 1e9;
    summary.prefill = prefill_during(&before, &after);
    summary.decode = decode_during(&before, &after);
    writer.close()?;
    drop(worker);
    Ok(summary)
}
