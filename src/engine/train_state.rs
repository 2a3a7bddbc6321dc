//! Resuming a training stage without training it again. Every `state_every` training jobs
//! (and at its final checkpoint) a training stage's model saves its whole training state
//! (`crate::train::state`) and logs a `train_state` event with the sha256 of each file. On
//! resume the latest state whose files are all present is checked against its event and
//! becomes the restore point: the jobs up to it are not run again (their logged events are
//! re-emitted), the state is loaded as soon as the stage reaches that point, and only the
//! jobs after it run. A job that runs although its event is logged (it came after the last
//! state) has its new outcome compared with the logged one, and a difference is reported by
//! key, never discarded silently.
//!
//! Only the latest state of a stage is kept on disk; the log keeps every event.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::EngineError;
use crate::record::{Key, Payload, TrainStateRecord};
use crate::stages::Rec;

/// Training jobs between saved states when a stage does not say (`state_every`): every
/// one, so that a kill at any moment costs at most one step.
pub const DEFAULT_STATE_EVERY: u64 = 1;

/// Where a training stage stands in its sequence of training jobs, and where it may skip to.
#[derive(Debug, Default)]
pub struct TrainCursor {
    /// Training jobs (updates) met so far, skipped or run.
    pub updates: u64,
    /// The state to restore and the job count it includes.
    restore: Option<(u64, TrainStateRecord)>,
    /// The job count of the latest state saved or restored.
    last_state: u64,
    /// That state's directory, removed when a newer one is written.
    last_dir: Option<PathBuf>,
    /// Save a state every this many updates (0: only at the final checkpoint).
    pub every: u64,
}

impl TrainCursor {
    /// The cursor of stage `name` on resume: its restore point is the latest `train_state`
    /// event in `done` whose files all exist; their sha256 must equal the event's.
    pub fn resume(
        name: &str,
        every: u64,
        done: &HashMap<Key, Rec>,
    ) -> Result<TrainCursor, EngineError> {
        let mut states: Vec<&TrainStateRecord> = done
            .values()
            .filter(|r| r.stage == name)
            .filter_map(|r| match &r.payload {
                Payload::TrainState(s) => Some(s),
                _ => None,
            })
            .collect();
        states.sort_by_key(|s| std::cmp::Reverse(s.step));
        let mut cursor = TrainCursor {
            every,
            ..TrainCursor::default()
        };
        for state in states {
            let dir = Path::new(&state.path);
            if !state.files.iter().all(|(f, _)| dir.join(f).is_file()) {
                continue; // pruned (a newer state replaced it) or never finished
            }
            for (file, expected) in &state.files {
                let path = dir.join(file);
                let actual = crate::paths::sha256_file(&path)
                    .map_err(|e| EngineError::Input(format!("{}: {e}", path.display())))?;
                if &actual != expected {
                    return Err(EngineError::Input(format!(
                        "{}: sha256 {actual} differs from the train_state event of stage \
                         `{name}` at step {} ({expected}); the file changed after it was \
                         logged — restore it, or delete the directory {} to train from the \
                         previous state",
                        path.display(),
                        state.step,
                        dir.display()
                    )));
                }
            }
            tracing::info!(
                stage = name,
                step = state.step,
                path = %dir.display(),
                "resuming training from its saved state"
            );
            cursor.last_state = state.step;
            cursor.last_dir = Some(dir.to_path_buf());
            cursor.restore = Some((state.step, state.clone()));
            break;
        }
        Ok(cursor)
    }

    /// Whether the update just counted is covered by the restore point (so is not run).
    pub fn skips(&self) -> bool {
        self.restore
            .as_ref()
            .is_some_and(|(step, _)| self.updates <= *step)
    }

    /// Whether updates are still being skipped towards a restore point not yet loaded.
    pub fn before_restore(&self) -> bool {
        self.restore
            .as_ref()
            .is_some_and(|(step, _)| self.updates < *step)
    }

    /// The state to load now: at the restore point, once.
    pub fn take_restore(&mut self) -> Option<TrainStateRecord> {
        match &self.restore {
            Some((step, _)) if self.updates == *step => self.restore.take().map(|(_, s)| s),
            _ => None,
        }
    }

    /// Whether a cadence state is due after the update just run.
    pub fn due(&self) -> bool {
        self.every > 0 && self.updates.is_multiple_of(self.every) && self.updates > self.last_state
    }

    /// Whether the final checkpoint needs a state of its own (none at this count yet).
    pub fn final_due(&self) -> bool {
        self.updates > self.last_state
    }

    /// Records a state just logged; returns the directory of the one it replaces, to remove.
    pub fn saved(&mut self, state: &TrainStateRecord) -> Option<PathBuf> {
        self.last_state = state.step;
        let old = self.last_dir.replace(PathBuf::from(&state.path));
        old.filter(|o| o != Path::new(&state.path))
    }
}

/// The `train_state` record of a state directory just written: sha256 of every file.
pub fn state_record(
    model: &str,
    step: u64,
    dir: &Path,
    files: &[PathBuf],
) -> Result<TrainStateRecord, EngineError> {
    let mut hashed = Vec::with_capacity(files.len());
    for f in files {
        let sha = crate::paths::sha256_file(f)
            .map_err(|e| EngineError::Input(format!("{}: {e}", f.display())))?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        hashed.push((name, sha));
    }
    Ok(TrainStateRecord {
        model: model.to_string(),
        step,
        path: dir.display().to_string(),
        files: hashed,
    })
}

/// A kill between a state's rename into place and its event leaves a directory no event
/// names, which a resume never reads; once a later state of the same stage is durable, such
/// earlier ones (and half-written temporaries) in this run's own folder are removed.
pub(crate) fn remove_orphaned_states(name: &str, saved: &std::path::Path, step: u64) {
    let Some(folder) = saved.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    let prefix = format!("{name}-step");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        let earlier = file_name
            .strip_prefix(&prefix)
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < step);
        let half_written = file_name.starts_with(&format!(".{prefix}"));
        if (earlier || half_written)
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "could not remove an orphaned training state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::remove_orphaned_states;

    #[test]
    fn only_earlier_and_half_written_states_of_the_stage_are_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let names = [
            "sft-step2",
            "sft-step5",
            "sft-step9",
            ".sft-step6.partial",
            "sft2-step1",
            "pm-step1",
        ];
        for name in names {
            std::fs::create_dir_all(dir.path().join(name)).expect("dir");
        }
        remove_orphaned_states("sft", &dir.path().join("sft-step5"), 5);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["pm-step1", "sft-step5", "sft-step9", "sft2-step1"]);
    }
}
