//! The epoch-ordered operator of training stages: whole epochs in key order, work run in
//! order, training states saved and restored, checkpoints written.

use super::*;

/// Runs a [`TrainingStage`]: epochs in time order, each once complete; the stage's work runs
/// on the model worker (blocking: the worker trains one step at a time anyway).
pub(super) fn training_operator<'s>(
    stream: Stream<'s, u64, Vec<Rec>>,
    from: Vec<String>,
    mut stage: Box<dyn TrainingStage>,
    after: Option<String>,
    state_every: u64,
    env: Env,
    shared: Shared,
) -> Stream<'s, u64, Vec<Rec>> {
    let name = stage.name().to_string();
    let mut cursor = TrainCursor::resume(&name, state_every, &env.done).unwrap_or_else(|e| {
        shared.fail(e);
        TrainCursor::default()
    });
    stream.unary_frontier(Pipeline, &name.clone(), move |initial, _info| {
        // Held until the input ends (for the final step and checkpoint), trailing the input
        // frontier so that downstream progress is not held back meanwhile.
        let mut end_cap = Some(initial);
        let mut epochs: BTreeMap<u64, (Capability<u64>, Vec<Rec>)> = BTreeMap::new();
        let mut gate_open = after.is_none();
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                for container in data {
                    for rec in container.drain(..) {
                        if after.as_deref() == Some(rec.stage.as_str())
                            && matches!(rec.payload, Payload::Checkpoint(_))
                        {
                            gate_open = true;
                        }
                        if from.contains(&rec.stage) && stage.accepts(&rec) {
                            epochs
                                .entry(*cap.time())
                                .or_insert_with(|| (cap.clone(), Vec::new()))
                                .1
                                .push(rec.clone());
                        }
                        output.session(&cap).give(rec);
                    }
                }
            });
            if shared.failed() {
                epochs.clear();
                end_cap = None;
                return;
            }
            if frontier.is_empty() {
                gate_open = true;
            }
            while gate_open && !epochs.is_empty() {
                let Some(&t) = epochs.keys().next() else {
                    break;
                };
                if frontier.less_equal(&t) {
                    break;
                }
                let Some((cap, mut recs)) = epochs.remove(&t) else {
                    break;
                };
                recs.sort_by_key(|r| r.key);
                let result = stage
                    .add_epoch(recs)
                    .map_err(EngineError::from)
                    .and_then(|work| {
                        run_training_work(&name, &env, &shared, work, *cap.time(), &mut cursor)
                    });
                match result {
                    Ok(out) => {
                        let mut session = output.session(&cap);
                        for rec in out {
                            session.give(rec);
                        }
                    }
                    Err(e) => shared.fail(e),
                }
            }
            if frontier.is_empty() && epochs.is_empty() {
                if let Some(cap) = end_cap.take() {
                    let result = stage.finish().map_err(EngineError::from).and_then(|work| {
                        run_training_work(&name, &env, &shared, work, *cap.time(), &mut cursor)
                    });
                    match result {
                        Ok(out) => {
                            let mut session = output.session(&cap);
                            for rec in out {
                                session.give(rec);
                            }
                        }
                        Err(e) => shared.fail(e),
                    }
                }
            } else if let (Some(cap), Some(&least)) =
                (end_cap.as_mut(), frontier.frontier().iter().min())
            {
                cap.downgrade(&least);
            }
        }
    })
}

/// Runs training work on the worker and logs its events. A training job covered by the
/// restore point (`train_state`) is not run: its logged event is re-emitted and the state is
/// loaded when the stage reaches it. Any other training job runs — the weights are state
/// that only training rebuilds — and when its event is logged already, the outcome is
/// compared with it. Measurements already logged are not repeated.
pub(super) fn run_training_work(
    name: &str,
    env: &Env,
    shared: &Shared,
    work: Vec<TrainWork>,
    epoch: u64,
    cursor: &mut TrainCursor,
) -> Result<Vec<Rec>, EngineError> {
    let mut out = Vec::new();
    for w in work {
        let TrainWork {
            key,
            parents,
            model,
            job,
        } = w;
        let payload = match job {
            TrainJob::Update {
                job,
                record,
                restored,
            } => {
                cursor.updates += 1;
                if cursor.skips() {
                    if let Some(rec) = env.done.get(&key) {
                        if let Some(restored) = restored {
                            restored(&rec.payload);
                        }
                        out.push(rec.clone());
                    }
                    shared.count(name, |s| s.skipped += 1);
                    if let Some(state) = cursor.take_restore() {
                        restore(name, env, &state)?;
                    }
                    continue;
                }
                let reply = env.worker.call(&model, job)?;
                let payload = record(reply)?;
                let logged = env.done.get(&key);
                if let Some(rec) = logged {
                    compare(name, shared, rec, payload.as_ref());
                    out.push(rec.clone());
                } else if let Some(p) = payload {
                    out.push(append(name, env, shared, key, parents, epoch, p)?);
                }
                if cursor.due() {
                    let state_key = Key::builder(name).str("state").key(key).finish();
                    save_state(name, env, shared, cursor, &model, state_key, epoch)?;
                }
                continue;
            }
            TrainJob::Measure { job, record } => {
                if let Some(rec) = env.done.get(&key) {
                    out.push(rec.clone());
                    shared.count(name, |s| s.replayed += 1);
                    continue;
                }
                if cursor.before_restore() {
                    return Err(inconsistent(name, key));
                }
                record(env.worker.call(&model, job)?)?
            }
            TrainJob::Checkpoint { step } => {
                if cursor.before_restore() {
                    return Err(inconsistent(name, key));
                }
                let payload = checkpoint(name, env, shared, &model, key, step)?;
                out.push(append(name, env, shared, key, parents, epoch, payload)?);
                if cursor.final_due() {
                    let state_key = Key::builder(name).str("state").key(key).finish();
                    save_state(name, env, shared, cursor, &model, state_key, epoch)?;
                }
                continue;
            }
        };
        if let Some(payload) = payload {
            out.push(append(name, env, shared, key, parents, epoch, payload)?);
        }
    }
    Ok(out)
}

/// Loads a saved training state into the worker's model.
pub(super) fn restore(name: &str, env: &Env, state: &TrainStateRecord) -> Result<(), EngineError> {
    match env
        .worker
        .call(&state.model, Job::LoadState(state.path.clone().into()))?
    {
        JobOutput::Restored => {
            tracing::info!(stage = name, step = state.step, "training state restored");
            Ok(())
        }
        other => Err(EngineError::Input(format!("unexpected reply {other:?}"))),
    }
}

/// Saves the model's training state (unless the logged one is on disk), logs its event,
/// and removes the state it supersedes once the event is durable.
pub(super) fn save_state(
    name: &str,
    env: &Env,
    shared: &Shared,
    cursor: &mut TrainCursor,
    model: &str,
    key: Key,
    epoch: u64,
) -> Result<(), EngineError> {
    let step = cursor.updates;
    let dir = env
        .checkpoint_dir
        .join("state")
        .join(format!("{name}-step{step}"));
    let files = match env.worker.call(model, Job::SaveState(dir.clone()))? {
        JobOutput::Saved(files) => files,
        other => return Err(EngineError::Input(format!("unexpected reply {other:?}"))),
    };
    let record = train_state::state_record(model, step, &dir, &files)?;
    if let Some(logged) = env.done.get(&key) {
        compare(
            name,
            shared,
            logged,
            Some(&Payload::TrainState(record.clone())),
        );
    } else {
        append(
            name,
            env,
            shared,
            key,
            Vec::new(),
            epoch,
            Payload::TrainState(record.clone()),
        )?;
    }
    env.writer.sync()?;
    // A state restored from another run's log (a fork, `--reuse`) is that run's to keep.
    if let Some(old) = cursor.saved(&record)
        && old.starts_with(&env.checkpoint_dir)
        && let Err(e) = std::fs::remove_dir_all(&old)
    {
        tracing::warn!(path = %old.display(), error = %e, "could not remove an old training state");
    }
    train_state::remove_orphaned_states(name, &dir, step);
    Ok(())
}

/// Saves `model` under `checkpoints/<stage>-step<step>` (unless a logged checkpoint's files
/// are there already) and returns its record.
pub(super) fn checkpoint(
    name: &str,
    env: &Env,
    shared: &Shared,
    model: &str,
    key: Key,
    step: u64,
) -> Result<Payload, EngineError> {
    let dir = env.checkpoint_dir.join(format!("{name}-step{step}"));
    let remember = |dir: &std::path::Path| {
        shared
            .0
            .borrow_mut()
            .checkpoints
            .push(dir.display().to_string());
    };
    if let Some(rec) = env.done.get(&key)
        && dir.join("model.safetensors").exists()
    {
        remember(&dir);
        return Ok(rec.payload.clone());
    }
    match env.worker.call(model, Job::Save(dir.clone()))? {
        JobOutput::Saved(_) => {}
        other => return Err(EngineError::Input(format!("unexpected reply {other:?}"))),
    }
    if let Some(tok) = env.tokenizers.get(model) {
        tok.save_dir(&dir)?;
    }
    let weights = dir.join("model.safetensors");
    let sha256 = crate::paths::sha256_file(&weights)
        .map_err(|e| EngineError::Input(format!("{}: {e}", weights.display())))?;
    remember(&dir);
    tracing::info!(stage = name, step, path = %dir.display(), "checkpoint");
    Ok(Payload::Checkpoint(CheckpointRecord {
        model: model.to_string(),
        step,
        path: dir.display().to_string(),
        sha256,
    }))
}
