//! Logging an operator's outputs: the event of a record, append-then-emit, and the
//! comparison of a recomputed output with the one already logged.

use super::*;

/// The event that logs `rec` in this run.
pub(super) fn event_of(env: &Env, rec: &Rec, epoch: u64) -> NewEvent {
    NewEvent::new(
        rec.key,
        env.run_id,
        &rec.stage,
        rec.parents.clone(),
        epoch,
        rec.payload.clone(),
    )
}

/// Logs one training event (once: an existing event is counted as replayed).
pub(super) fn append(
    name: &str,
    env: &Env,
    shared: &Shared,
    key: Key,
    parents: Vec<Key>,
    epoch: u64,
    payload: Payload,
) -> Result<Rec, EngineError> {
    let rec = Rec {
        key,
        parents,
        stage: name.to_string(),
        payload,
    };
    let appended = env.writer.append(event_of(env, &rec, epoch))?;
    shared.count(name, |s| match appended {
        crate::log::Appended::New(_) => s.computed += 1,
        crate::log::Appended::Existing(_) => s.replayed += 1,
    });
    Ok(rec)
}

/// A training job ran again although its event is logged: report when its outcome differs.
pub(super) fn compare(name: &str, shared: &Shared, logged: &Rec, now: Option<&Payload>) {
    let same = now == Some(&logged.payload);
    shared.count(name, |s| {
        s.recomputed += 1;
        s.replayed += 1;
        if !same {
            s.diverged += 1;
        }
    });
    if !same {
        tracing::warn!(
            stage = name,
            key = %logged.key,
            logged = ?logged.payload,
            now = ?now,
            "a recomputed training step differs from its logged event (a device that is not \
             bit-deterministic?); the logged event stands"
        );
    }
}

pub(super) fn inconsistent(name: &str, key: Key) -> EngineError {
    EngineError::Input(format!(
        "stage `{name}`: its saved training state is later than work {key} that the log \
         lacks; the log and the state directory do not belong together"
    ))
}
