//! Forks and reuse: a new run that takes the recorded events of another run for the stages
//! it does not change, and recomputes the rest.
//!
//! [`fork`] reads a finished (or running) log's spec from its `run_started` event, rewrites it
//! with changed settings, copies the events of every stage upstream of the fork point into
//! the new log (keys, lineage, epochs and times as recorded), and runs the new spec there.
//! Exactly-once resume then does the rest: a stage whose output keys are unchanged re-emits
//! the copied events without model work; the fork point and everything downstream get new
//! keys from their new settings and are computed. Rerunning the same fork continues it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{EngineError, RunOptions, RunSummary, run};
use crate::log::{Appended, LogOptions, LogReader, LogWriter};
use crate::record::{Envelope, Key, NewEvent, Note, Payload, RunId};
use crate::spec::Spec;

/// Copies the events of `from` that `keep` selects into the log at `to` (created if needed),
/// as they were recorded. Events already there are not copied twice. Returns (copied, already
/// present).
pub fn import_events(
    from: &Path,
    to: &Path,
    keep: impl Fn(&Envelope) -> bool,
) -> Result<(u64, u64), EngineError> {
    let reader = LogReader::open(from)?;
    let writer = LogWriter::open(to, LogOptions::default())?;
    let (mut copied, mut present) = (0, 0);
    let mut batch = Vec::new();
    let mut flush = |batch: &mut Vec<NewEvent>| -> Result<(), EngineError> {
        for a in writer.append_batch(std::mem::take(batch))? {
            match a {
                Appended::New(_) => copied += 1,
                Appended::Existing(_) => present += 1,
            }
        }
        Ok(())
    };
    for env in reader.iter_from(0) {
        let env = env?;
        if !keep(&env) {
            continue;
        }
        let mut ev = NewEvent::new(
            env.key,
            env.run_id,
            env.stage,
            env.parents,
            env.epoch,
            env.payload,
        );
        ev.wall_ns = env.wall_ns;
        batch.push(ev);
        if batch.len() >= 512 {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)?;
    writer.sync()?;
    writer.close()?;
    Ok((copied, present))
}

/// What a fork did.
#[derive(Clone, Debug)]
pub struct ForkReport {
    /// The run forked from.
    pub parent: RunId,
    /// The new spec, written into the new log directory.
    pub spec_path: PathBuf,
    /// Stages whose recorded events were copied (`prompts` and those before the fork point).
    pub reused_stages: Vec<String>,
    /// Events copied now (0 when continuing a fork).
    pub copied: u64,
    /// The new run.
    pub summary: RunSummary,
}

/// The last run recorded in a log: its id, spec text and the spec's path.
pub(super) fn recorded_run(log: &Path) -> Result<(RunId, String, Option<PathBuf>), EngineError> {
    let mut found = None;
    let mut source = None;
    for env in LogReader::open(log)?.iter_from(0) {
        let env = env?;
        match env.payload {
            Payload::RunStarted(r) => {
                found = Some((env.run_id, r.settings));
                source = None;
            }
            Payload::RunSource(s) => source = Some(PathBuf::from(s.spec_path)),
            _ => {}
        }
    }
    let (id, text) = found.ok_or_else(|| {
        EngineError::Input(format!(
            "{}: no run_started event: not a run's log",
            log.display()
        ))
    })?;
    Ok((id, text, source))
}

/// Forks the run in `opts.log`'s source log: see the module documentation. `base` resolves
/// the recorded spec's relative paths when the log does not say where the spec was (logs
/// written before `run_source` events existed).
pub fn fork(
    from_log: &Path,
    stage: &str,
    sets: &[(String, String)],
    base: Option<&Path>,
    opts: &RunOptions,
) -> Result<ForkReport, EngineError> {
    let (parent, text, source) = recorded_run(from_log)?;
    let base = match (base, &source) {
        (Some(b), _) => b.to_path_buf(),
        (None, Some(spec)) => spec.parent().unwrap_or(Path::new(".")).to_path_buf(),
        (None, None) => std::env::current_dir().map_err(|e| EngineError::Input(e.to_string()))?,
    };
    let new_text = crate::spec::rewrite(&text, &base, sets)
        .map_err(|e| EngineError::Input(format!("{}: recorded spec: {e}", from_log.display())))?;
    std::fs::create_dir_all(&opts.log)
        .map_err(|e| EngineError::Input(format!("{}: {e}", opts.log.display())))?;
    let spec_path = opts.log.join("fork.toml");
    let spec = Spec::parse(&new_text, &spec_path).map_err(|e| EngineError::Input(e.to_string()))?;
    let Some(at) = spec.stages.iter().position(|s| s.name == stage) else {
        let names: Vec<&str> = spec.stages.iter().map(|s| s.name.as_str()).collect();
        return Err(EngineError::Input(format!(
            "no stage `{stage}` in the recorded run (it has: {})",
            names.join(", ")
        )));
    };
    let reused: Vec<String> = std::iter::once("prompts".to_string())
        .chain(spec.stages[..at].iter().map(|s| s.name.clone()))
        .collect();
    for (key, _) in sets {
        if let Some(name) = key.strip_prefix("stage.").and_then(|k| k.split('.').next())
            && reused.iter().any(|r| r == name)
        {
            return Err(EngineError::Input(format!(
                "`{key}` changes stage `{name}`, which comes before `{stage}`: fork from `{name}` instead"
            )));
        }
    }
    std::fs::write(&spec_path, &new_text)
        .map_err(|e| EngineError::Input(format!("{}: {e}", spec_path.display())))?;
    let keep: HashSet<&str> = reused.iter().map(|s| s.as_str()).collect();
    let (copied, _) = import_events(from_log, &opts.log, |env| keep.contains(env.stage.as_str()))?;
    // Say what changed, once per fork.
    let mut note_key = Key::builder("fork").u128(parent.0).str(stage);
    let mut changed = Vec::new();
    for (k, v) in sets {
        note_key = note_key.str(k).str(v);
        changed.push(format!("{k}={v}"));
    }
    {
        let writer = LogWriter::open(&opts.log, LogOptions::default())?;
        writer.append(NewEvent::new(
            note_key.finish(),
            parent,
            "fork",
            vec![],
            0,
            Payload::Note(Note {
                text: format!(
                    "fork of run {parent} ({}) from stage `{stage}`; changed: {}",
                    from_log.display(),
                    if changed.is_empty() {
                        "nothing".to_string()
                    } else {
                        changed.join(", ")
                    }
                ),
            }),
        ))?;
        writer.close()?;
    }
    let summary = run(
        &spec,
        &RunOptions {
            parent: Some(parent),
            ..opts.clone()
        },
    )?;
    Ok(ForkReport {
        parent,
        spec_path,
        reused_stages: reused,
        copied,
        summary,
    })
}
