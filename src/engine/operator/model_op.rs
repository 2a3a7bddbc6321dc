//! The operator that runs any model stage: stash inputs under capabilities, skip keys
//! already logged, batch model work to the worker, wake on replies, log then emit.

use super::*;

pub(super) type Chunk = (Capability<u64>, Vec<Task>);

/// A model stage and its engine settings.
pub(super) struct ModelOp {
    pub(super) name: String,
    pub(super) from: Vec<String>,
    pub(super) stage: Box<dyn Stage + Send + Sync>,
    pub(super) batch: usize,
    pub(super) after: Option<String>,
}

/// Runs a [`Stage`] as an operator.
///
/// An epoch is planned once its input is complete (and the gate is open, and — for a stage
/// in a feedback loop — every record fed back from earlier epochs has arrived): its tasks are
/// sorted by key and cut into chunks of `batch`. A chunk's composition therefore depends only
/// on the data, never on timing or on what an earlier, interrupted run already logged — which
/// keeps model outputs bit-identical across runs and resumes (batched float arithmetic
/// depends on what shares the batch). A chunk with every output logged is re-emitted from the
/// log; a chunk with some is recomputed whole, and only the missing outputs are appended.
pub(super) fn model_operator<'s>(
    stream: Stream<'s, u64, Vec<Rec>>,
    back: Stream<'s, u64, Vec<Rec>>,
    op: ModelOp,
    env: Env,
    shared: Shared,
) -> Stream<'s, u64, Vec<Rec>> {
    let scope = stream.scope();
    let ModelOp {
        name,
        from,
        stage,
        batch,
        after,
    } = op;
    let op_name = name.clone();
    with_side_input(stream, back, &op_name, move |_cap, info| {
        let activator = Arc::new(scope.worker().sync_activator_for(info.address.to_vec()));
        let mut epochs: BTreeMap<u64, (Capability<u64>, Vec<Rec>)> = BTreeMap::new();
        let mut queue: std::collections::VecDeque<Chunk> = std::collections::VecDeque::new();
        let mut inflight: Vec<(Chunk, Receiver<WorkerReply>)> = Vec::new();
        let mut gate_open = after.is_none();
        let mut setup_done = false;
        move |(input, frontier), (looped, loop_frontier), output| {
            // 1. Records fed back around a loop update the stage (e.g. the policy version).
            looped.for_each(|_cap, data| {
                for rec in data.drain(..) {
                    stage.feedback(&rec);
                }
            });
            // 2. Take inputs: everything flows on; stash what this stage consumes
            //    by epoch.
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                for container in data {
                    for rec in container.drain(..) {
                        if shared.failed() {
                            continue;
                        }
                        if after.as_deref() == Some(rec.stage.as_str())
                            && matches!(rec.payload, Payload::Checkpoint(_))
                        {
                            gate_open = true;
                        }
                        // Every record also flows on: a later stage may read the same
                        // source (e.g. RL's `pairs` reads `prompts` like `sample` does).
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
                queue.clear();
                inflight.clear();
                return;
            }
            if frontier.is_empty() {
                // Everything upstream has finished: nothing left to wait for.
                gate_open = true;
            }
            // 3. Plan ready epochs, in time order; fully logged chunks are re-emitted at once.
            while gate_open && !epochs.is_empty() {
                let Some(&t) = epochs.keys().next() else {
                    break;
                };
                if frontier.less_equal(&t) || loop_frontier.less_equal(&t) {
                    break;
                }
                if !setup_done {
                    setup_done = true;
                    for (model, job) in stage.setup() {
                        if let Err(e) = env.worker.call(&model, job) {
                            shared.fail(e.into());
                        }
                    }
                }
                let Some((cap, recs)) = epochs.remove(&t) else {
                    break;
                };
                let mut tasks = Vec::new();
                for rec in &recs {
                    match stage.plan(rec) {
                        Ok(t) => tasks.extend(t),
                        Err(e) => shared.fail(e.into()),
                    }
                }
                tasks.sort_by_key(|task| task.key);
                for chunk in chunks(tasks, batch) {
                    if chunk.iter().all(|task| env.done.contains_key(&task.key)) {
                        let mut session = output.session(&cap);
                        for task in &chunk {
                            shared.count(&name, |s| s.replayed += 1);
                            session.give(env.done[&task.key].clone());
                        }
                    } else {
                        queue.push_back((cap.clone(), chunk));
                    }
                }
            }
            // 4. Collect replies: a task with more calls to make goes on (its chunk together);
            //    the others log every new output, then emit it.
            let mut i = 0;
            while i < inflight.len() {
                match inflight[i].1.try_recv() {
                    Ok(reply) => {
                        let ((cap, tasks), _) = inflight.remove(i);
                        let result = split_reply(&name, &tasks, reply).and_then(|replies| {
                            advance(&*stage, &name, &env, &shared, &cap, tasks, replies, batch)
                        });
                        match result {
                            Ok((out, next)) => {
                                let mut session = output.session(&cap);
                                for rec in out {
                                    session.give(rec);
                                }
                                for chunk in next.into_iter().rev() {
                                    queue.push_front(chunk);
                                }
                            }
                            Err(e) => shared.fail(e),
                        }
                    }
                    Err(TryRecvError::Empty) => i += 1,
                    Err(TryRecvError::Disconnected) => {
                        shared.fail(EngineError::Model(crate::model::ModelError::WorkerGone));
                        return;
                    }
                }
            }
            // 5. Submit queued chunks, a couple in flight at a time.
            while inflight.len() < 2 {
                let Some((cap, tasks)) = queue.pop_front() else {
                    break;
                };
                let planned = match model_job(&name, &tasks) {
                    Ok(planned) => planned,
                    Err(e) => {
                        shared.fail(e);
                        continue;
                    }
                };
                let Some((model, job)) = planned else {
                    // Pure work: the outputs are known; complete, log and emit them now.
                    let replies = tasks
                        .iter()
                        .filter_map(|t| match &t.work {
                            Work::Pure(p) => Some(Reply::Pure(p.clone())),
                            _ => None,
                        })
                        .collect();
                    match complete_tasks(&*stage, &name, &env, &shared, *cap.time(), tasks, replies)
                    {
                        Ok(out) => {
                            let mut session = output.session(&cap);
                            for rec in out {
                                session.give(rec);
                            }
                        }
                        Err(e) => shared.fail(e),
                    }
                    continue;
                };
                let act = Arc::clone(&activator);
                let waker: Waker = Arc::new(move || {
                    let _ = act.activate();
                });
                match env.worker.submit(&model, job, Some(waker)) {
                    Ok(rx) => {
                        shared.count(&name, |s| s.jobs += 1);
                        inflight.push(((cap, tasks), rx));
                    }
                    Err(e) => shared.fail(e.into()),
                }
            }
        }
    })
}

/// After a chunk's replies: tasks with another call to make become new chunks (kept
/// together, so batches stay deterministic); the rest complete, are logged and returned.
#[allow(clippy::too_many_arguments)]
pub(super) fn advance(
    stage: &dyn Stage,
    name: &str,
    env: &Env,
    shared: &Shared,
    cap: &Capability<u64>,
    tasks: Vec<Task>,
    replies: Vec<Reply>,
    batch: usize,
) -> Result<(Vec<Rec>, Vec<Chunk>), EngineError> {
    let (done_tasks, done_replies, going) = advance_tasks(stage, tasks, replies)?;
    let out = complete_tasks(
        stage,
        name,
        env,
        shared,
        *cap.time(),
        done_tasks,
        done_replies,
    )?;
    let next = chunks(going, batch)
        .into_iter()
        .map(|c| (cap.clone(), c))
        .collect();
    Ok((out, next))
}

/// Completes tasks, appends the outputs not yet logged (the log first, then downstream),
/// and returns every output in task order — logged ones as they were logged.
pub(super) fn complete_tasks(
    stage: &dyn Stage,
    name: &str,
    env: &Env,
    shared: &Shared,
    epoch: u64,
    tasks: Vec<Task>,
    replies: Vec<Reply>,
) -> Result<Vec<Rec>, EngineError> {
    if replies.len() != tasks.len() {
        return Err(EngineError::Input(format!(
            "stage `{name}`: {} replies for {} tasks",
            replies.len(),
            tasks.len()
        )));
    }
    let mut events = Vec::new();
    let mut out = Vec::with_capacity(tasks.len());
    for (task, reply) in tasks.into_iter().zip(replies) {
        if let Some(logged) = env.done.get(&task.key) {
            shared.count(name, |s| s.replayed += 1);
            out.push(logged.clone());
            continue;
        }
        let payload = stage.complete(&task, reply)?;
        let rec = Rec {
            key: task.key,
            parents: vec![task.input.key],
            stage: name.to_string(),
            payload,
        };
        events.push(event_of(env, &rec, epoch));
        out.push(rec);
    }
    shared.count(name, |s| s.computed += events.len() as u64);
    if !events.is_empty() {
        env.writer.append_batch(events)?;
    }
    Ok(out)
}
