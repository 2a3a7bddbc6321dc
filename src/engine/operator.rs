//! Stage operators: the generic timely operator that runs any [`Stage`] (stash inputs under
//! capabilities, skip keys already logged, batch model work to the worker, wake on replies,
//! log then emit), and the epoch-ordered operator of the `sft` stage.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use crossbeam_channel::{Receiver, TryRecvError};
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use super::EngineError;
use crate::log::LogWriter;
use crate::model::worker::{Job, JobOutput, Reply as WorkerReply, Waker};
use crate::model::{Tokenizer, WorkerHandle};
use crate::record::{
    CheckpointRecord, Key, NewEvent, Payload, RunId, SftEvalRecord, SftStepRecord,
};
use crate::spec::Spec;
use crate::stages::sft::{SftStage, SftWork};
use crate::stages::{Rec, Reply, Stage, StageContext, StageError, StageKind, Task, Work};

/// Counters of one operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorStats {
    /// Outputs computed in this run.
    pub computed: u64,
    /// Outputs found in the log and re-emitted.
    pub replayed: u64,
    /// Model jobs submitted.
    pub jobs: u64,
}

/// What every operator shares with the engine loop (one timely worker thread).
#[derive(Clone, Default)]
pub struct Shared(Rc<RefCell<SharedState>>);

#[derive(Default)]
struct SharedState {
    error: Option<EngineError>,
    stats: BTreeMap<String, OperatorStats>,
    checkpoints: Vec<String>,
    aggregates: BTreeMap<(String, String), i64>,
}

impl Shared {
    fn fail(&self, e: EngineError) {
        let mut s = self.0.borrow_mut();
        if s.error.is_none() {
            s.error = Some(e);
        }
    }

    fn failed(&self) -> bool {
        self.0.borrow().error.is_some()
    }

    fn count(&self, stage: &str, f: impl FnOnce(&mut OperatorStats)) {
        f(self
            .0
            .borrow_mut()
            .stats
            .entry(stage.to_string())
            .or_default());
    }

    /// Returns the first error an operator hit, if any.
    pub fn check(&self) -> Result<(), EngineError> {
        match self.0.borrow_mut().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Counters by stage.
    pub fn stats(&self) -> BTreeMap<String, OperatorStats> {
        self.0.borrow().stats.clone()
    }

    /// Checkpoints written or found.
    pub fn checkpoints(&self) -> Vec<String> {
        self.0.borrow().checkpoints.clone()
    }

    /// Record counts by (stage, label), as maintained by [`aggregates`].
    pub fn aggregates(&self) -> BTreeMap<(String, String), i64> {
        self.0.borrow().aggregates.clone()
    }
}

/// What operators need from the run.
#[derive(Clone)]
pub struct Env {
    /// The log.
    pub writer: LogWriter,
    /// The model worker.
    pub worker: WorkerHandle,
    /// Records already logged, by key.
    pub done: Arc<HashMap<Key, Rec>>,
    /// This run.
    pub run_id: RunId,
    /// Where checkpoints go.
    pub checkpoint_dir: PathBuf,
    /// Tokenizers by model (saved with checkpoints).
    pub tokenizers: Arc<HashMap<String, Tokenizer>>,
}

enum Built {
    Model {
        name: String,
        from: Vec<String>,
        stage: Box<dyn Stage + Send + Sync>,
        batch: usize,
    },
    Sft {
        from: Vec<String>,
        stage: SftStage,
    },
}

/// The stages of a spec, built and ready to attach.
pub struct Plan {
    stages: Vec<Built>,
}

impl Plan {
    /// Builds every stage of `spec` (configuration errors surface here, before any work).
    pub fn build(
        spec: &Spec,
        ctx: &StageContext,
        kinds: &[StageKind],
    ) -> Result<Plan, EngineError> {
        let mut stages = Vec::new();
        for s in &spec.stages {
            let mut settings = s.settings.clone();
            // `batch` is the engine's: tasks per model job.
            let batch = match settings.remove("batch") {
                None => 16,
                Some(toml::Value::Integer(n)) if n > 0 => n as usize,
                Some(other) => {
                    return Err(EngineError::Input(format!(
                        "{}:{}: stage `{}`: `batch` must be a positive integer, found {other}",
                        spec.path.display(),
                        s.line,
                        s.name
                    )));
                }
            };
            let located = |e: StageError| {
                EngineError::Input(format!("{}:{}: {e}", spec.path.display(), s.line))
            };
            if s.kind == "sft" {
                stages.push(Built::Sft {
                    from: s.from.clone(),
                    stage: SftStage::build(&s.name, &settings, ctx).map_err(located)?,
                });
                continue;
            }
            let Some((_, _, builder)) = kinds.iter().find(|(k, _, _)| *k == s.kind) else {
                let known: Vec<&str> = kinds.iter().map(|(k, _, _)| *k).chain(["sft"]).collect();
                return Err(EngineError::Input(format!(
                    "{}:{}: stage `{}`: unknown kind `{}` (known: {})",
                    spec.path.display(),
                    s.line,
                    s.name,
                    s.kind,
                    known.join(", ")
                )));
            };
            stages.push(Built::Model {
                name: s.name.clone(),
                from: s.from.clone(),
                stage: builder(&s.name, &settings, ctx).map_err(located)?,
                batch,
            });
        }
        Ok(Plan { stages })
    }

    /// Chains the operators after `stream`.
    pub fn attach<'s>(
        self,
        stream: Stream<'s, u64, Vec<Rec>>,
        env: &Env,
        shared: &Shared,
    ) -> Stream<'s, u64, Vec<Rec>> {
        use timely::dataflow::operators::Concatenate;
        use timely::dataflow::operators::vec::Filter;
        let scope = stream.scope();
        // Each operator's own outputs (not what it passes through), for the aggregates.
        let mut own = vec![stream.clone().filter(|r: &Rec| r.stage == "prompts")];
        let mut stream = stream;
        for built in self.stages {
            let (name, next) = match built {
                Built::Model {
                    name,
                    from,
                    stage,
                    batch,
                } => {
                    let out = model_operator(
                        stream,
                        name.clone(),
                        from,
                        stage,
                        batch,
                        env.clone(),
                        shared.clone(),
                    );
                    (name, out)
                }
                Built::Sft { from, stage } => {
                    let name = stage.name().to_string();
                    (
                        name,
                        sft_operator(stream, from, stage, env.clone(), shared.clone()),
                    )
                }
            };
            own.push(next.clone().filter(move |r: &Rec| r.stage == name));
            stream = next;
        }
        aggregates(scope.concatenate(own), shared);
        stream
    }
}

type Chunk = (Capability<u64>, Vec<Task>);

/// Runs a [`Stage`] as an operator.
///
/// Batches are formed per epoch, once the epoch's input is complete: its tasks sorted by key
/// and cut into chunks of `batch`. A chunk's composition therefore depends only on the data,
/// never on timing or on what an earlier, interrupted run already logged — which keeps model
/// outputs bit-identical across runs and resumes (batched float arithmetic depends on what
/// shares the batch). A chunk with every output logged is re-emitted from the log; a chunk
/// with some is recomputed whole, and only the missing outputs are appended.
fn model_operator<'s>(
    stream: Stream<'s, u64, Vec<Rec>>,
    name: String,
    from: Vec<String>,
    stage: Box<dyn Stage + Send + Sync>,
    batch: usize,
    env: Env,
    shared: Shared,
) -> Stream<'s, u64, Vec<Rec>> {
    let scope = stream.scope();
    let op_name = name.clone();
    stream.unary_frontier(Pipeline, &op_name, move |_cap, info| {
        let activator = Arc::new(scope.worker().sync_activator_for(info.address.to_vec()));
        let mut epochs: BTreeMap<u64, Chunk> = BTreeMap::new();
        let mut queue: std::collections::VecDeque<Chunk> = std::collections::VecDeque::new();
        let mut inflight: Vec<(Chunk, Receiver<WorkerReply>)> = Vec::new();
        move |(input, frontier), output| {
            // 1. Take inputs: pass through what this stage does not consume; gather the tasks
            //    of what it does, by epoch.
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                for container in data {
                    for rec in container.drain(..) {
                        if shared.failed() {
                            continue;
                        }
                        if !(from.contains(&rec.stage) && stage.accepts(&rec)) {
                            output.session(&cap).give(rec);
                            continue;
                        }
                        match stage.plan(&rec) {
                            Ok(tasks) => epochs
                                .entry(*cap.time())
                                .or_insert_with(|| (cap.clone(), Vec::new()))
                                .1
                                .extend(tasks),
                            Err(e) => shared.fail(e.into()),
                        }
                    }
                }
            });
            if shared.failed() {
                epochs.clear();
                queue.clear();
                inflight.clear();
                return;
            }
            // 2. Complete epochs become chunks; fully logged chunks are re-emitted at once.
            let complete: Vec<u64> = epochs
                .keys()
                .copied()
                .filter(|t| !frontier.less_equal(t))
                .collect();
            for t in complete {
                let Some((cap, mut tasks)) = epochs.remove(&t) else {
                    continue;
                };
                tasks.sort_by_key(|task| task.key);
                // A chunk is one model call, so it never mixes kinds of work or models.
                let mut groups: BTreeMap<(u8, String), Vec<Task>> = BTreeMap::new();
                for task in tasks {
                    groups.entry(work_group(&task.work)).or_default().push(task);
                }
                for chunk in groups.values().flat_map(|g| g.chunks(batch)) {
                    if chunk.iter().all(|task| env.done.contains_key(&task.key)) {
                        let mut session = output.session(&cap);
                        for task in chunk {
                            shared.count(&name, |s| s.replayed += 1);
                            session.give(env.done[&task.key].clone());
                        }
                    } else {
                        queue.push_back((cap.clone(), chunk.to_vec()));
                    }
                }
            }
            // 3. Collect replies: log every new output, then emit it.
            let mut i = 0;
            while i < inflight.len() {
                match inflight[i].1.try_recv() {
                    Ok(reply) => {
                        let ((cap, tasks), _) = inflight.remove(i);
                        match finish(&*stage, &name, &env, &shared, *cap.time(), tasks, reply) {
                            Ok(out) => {
                                let mut session = output.session(&cap);
                                for rec in out {
                                    session.give(rec);
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
            // 4. Submit queued chunks, a couple in flight at a time.
            while inflight.len() < 2 {
                let Some((cap, tasks)) = queue.pop_front() else {
                    break;
                };
                let Some((model, job)) = model_job(&tasks) else {
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

/// Which model call a task needs; chunks never mix groups.
fn work_group(work: &Work) -> (u8, String) {
    match work {
        Work::Pure(_) => (0, String::new()),
        Work::Generate { model, .. } => (1, model.clone()),
        Work::Score { model, .. } => (2, model.clone()),
    }
}

/// The model and job for a chunk of generate or score tasks (`None` for pure work).
fn model_job(tasks: &[Task]) -> Option<(String, Job)> {
    match &tasks.first()?.work {
        Work::Pure(_) => None,
        Work::Generate { model, .. } => Some((
            model.clone(),
            Job::Generate(
                tasks
                    .iter()
                    .filter_map(|t| match &t.work {
                        Work::Generate { request, .. } => Some(request.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
        )),
        Work::Score { model, .. } => Some((
            model.clone(),
            Job::Score(
                tasks
                    .iter()
                    .filter_map(|t| match &t.work {
                        Work::Score { request, .. } => Some(request.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
        )),
    }
}

/// Turns a worker reply into outputs.
fn finish(
    stage: &dyn Stage,
    name: &str,
    env: &Env,
    shared: &Shared,
    epoch: u64,
    tasks: Vec<Task>,
    reply: WorkerReply,
) -> Result<Vec<Rec>, EngineError> {
    let replies: Vec<Reply> = match reply? {
        JobOutput::Generated(g) => g.into_iter().map(Reply::Generated).collect(),
        JobOutput::Scored(s) => s.into_iter().map(Reply::Scored).collect(),
        other => {
            return Err(EngineError::Input(format!(
                "stage `{name}`: unexpected worker reply {other:?}"
            )));
        }
    };
    complete_tasks(stage, name, env, shared, epoch, tasks, replies)
}

/// Completes tasks, appends the outputs not yet logged (the log first, then downstream),
/// and returns every output in task order — logged ones as they were logged.
fn complete_tasks(
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
        events.push(NewEvent::new(
            rec.key,
            env.run_id,
            name,
            rec.parents.clone(),
            epoch,
            rec.payload.clone(),
        ));
        out.push(rec);
    }
    shared.count(name, |s| s.computed += events.len() as u64);
    env.writer.append_batch(events)?;
    Ok(out)
}

fn sft_operator<'s>(
    stream: Stream<'s, u64, Vec<Rec>>,
    from: Vec<String>,
    mut stage: SftStage,
    env: Env,
    shared: Shared,
) -> Stream<'s, u64, Vec<Rec>> {
    let name = stage.name().to_string();
    stream.unary_frontier(Pipeline, &name.clone(), move |initial, _info| {
        // Held until the input ends (for the final step and checkpoint), trailing the input
        // frontier so that downstream progress is not held back meanwhile.
        let mut end_cap = Some(initial);
        let mut epochs: BTreeMap<u64, (Capability<u64>, Vec<Rec>)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                for container in data {
                    for rec in container.drain(..) {
                        if from.contains(&rec.stage) && stage.accepts(&rec) {
                            epochs
                                .entry(*cap.time())
                                .or_insert_with(|| (cap.clone(), Vec::new()))
                                .1
                                .push(rec);
                        } else {
                            output.session(&cap).give(rec);
                        }
                    }
                }
            });
            if shared.failed() {
                epochs.clear();
                end_cap = None;
                return;
            }
            let complete: Vec<u64> = epochs
                .keys()
                .copied()
                .filter(|t| !frontier.less_equal(t))
                .collect();
            for t in complete {
                let Some((cap, recs)) = epochs.remove(&t) else {
                    continue;
                };
                let result = stage
                    .add_epoch(recs)
                    .map_err(EngineError::from)
                    .and_then(|work| run_sft_work(&stage, &name, &env, &shared, work, *cap.time()));
                match result {
                    Ok(out) => {
                        for rec in out {
                            output.session(&cap).give(rec);
                        }
                    }
                    Err(e) => shared.fail(e),
                }
            }
            if frontier.is_empty() {
                if let Some(cap) = end_cap.take() {
                    let work = stage.finish();
                    match run_sft_work(&stage, &name, &env, &shared, work, *cap.time()) {
                        Ok(out) => {
                            for rec in out {
                                output.session(&cap).give(rec);
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

/// Runs SFT work on the worker (blocking: the model worker trains one step at a time anyway)
/// and logs its events. Training steps are always run — the trained weights are state that
/// only training rebuilds — but a step already logged is not logged again.
fn run_sft_work(
    stage: &SftStage,
    name: &str,
    env: &Env,
    shared: &Shared,
    work: Vec<SftWork>,
    epoch: u64,
) -> Result<Vec<Rec>, EngineError> {
    let model = stage.model();
    let mut out = Vec::new();
    for w in work {
        let (key, parents, payload) = match w {
            SftWork::Step {
                key,
                parents,
                examples,
                micro_batch,
                optim,
                step,
            } => {
                let n = examples.len() as u64;
                let lr = optim.lr;
                let stats = match env.worker.call(
                    model,
                    Job::TrainSft {
                        examples,
                        micro_batch,
                        optim,
                    },
                )? {
                    JobOutput::Trained(s) => s,
                    other => return Err(EngineError::Input(format!("unexpected reply {other:?}"))),
                };
                tracing::info!(
                    stage = name,
                    step,
                    loss = format!("{:.4}", stats.loss),
                    "sft step"
                );
                (
                    key,
                    parents,
                    Payload::SftStep(SftStepRecord {
                        step,
                        loss: stats.loss,
                        tokens: stats.tokens as u64,
                        examples: n,
                        lr,
                        grad_norm: stats.grad_norm,
                    }),
                )
            }
            SftWork::Eval {
                key,
                examples,
                step,
            } => {
                if let Some(rec) = env.done.get(&key) {
                    out.push(rec.clone());
                    continue;
                }
                let (loss, tokens) = match env.worker.call(
                    model,
                    Job::EvalSft {
                        examples,
                        micro_batch: 4,
                    },
                )? {
                    JobOutput::Evaluated { loss, tokens } => (loss, tokens),
                    other => return Err(EngineError::Input(format!("unexpected reply {other:?}"))),
                };
                tracing::info!(
                    stage = name,
                    step,
                    loss = format!("{loss:.4}"),
                    "held-out loss"
                );
                (
                    key,
                    vec![],
                    Payload::SftEval(SftEvalRecord {
                        step,
                        loss,
                        tokens: tokens as u64,
                    }),
                )
            }
            SftWork::Checkpoint { key, step } => {
                let dir = env.checkpoint_dir.join(format!("{name}-step{step}"));
                if let Some(rec) = env.done.get(&key)
                    && dir.join("model.safetensors").exists()
                {
                    shared
                        .0
                        .borrow_mut()
                        .checkpoints
                        .push(dir.display().to_string());
                    out.push(rec.clone());
                    continue;
                }
                match env.worker.call(model, Job::Save(dir.clone()))? {
                    JobOutput::Saved(_) => {}
                    other => return Err(EngineError::Input(format!("unexpected reply {other:?}"))),
                }
                if let Some(tok) = env.tokenizers.get(model) {
                    tok.save_dir(&dir)?;
                }
                let weights = dir.join("model.safetensors");
                let sha256 = sha256_file(&weights)
                    .map_err(|e| EngineError::Input(format!("{}: {e}", weights.display())))?;
                shared
                    .0
                    .borrow_mut()
                    .checkpoints
                    .push(dir.display().to_string());
                tracing::info!(stage = name, step, path = %dir.display(), "checkpoint");
                (
                    key,
                    vec![],
                    Payload::Checkpoint(CheckpointRecord {
                        model: model.to_string(),
                        step,
                        path: dir.display().to_string(),
                        sha256,
                    }),
                )
            }
        };
        let rec = Rec {
            key,
            parents,
            stage: name.to_string(),
            payload,
        };
        let appended = env.writer.append(NewEvent::new(
            rec.key,
            env.run_id,
            name,
            rec.parents.clone(),
            epoch,
            rec.payload.clone(),
        ))?;
        shared.count(name, |s| match appended {
            crate::log::Appended::New(_) => s.computed += 1,
            crate::log::Appended::Existing(_) => s.replayed += 1,
        });
        out.push(rec);
    }
    Ok(out)
}

fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
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

/// Live aggregates with differential dataflow: the count of records per (stage, label), where
/// the label is the principle for critiques and revisions, the purpose for samples and the
/// kind otherwise. The counts update incrementally as epochs stream through; the latest value
/// of each is kept for the run summary.
fn aggregates<'s>(stream: Stream<'s, u64, Vec<Rec>>, shared: &Shared) {
    use differential_dataflow::AsCollection;
    let shared = shared.clone();
    let updates = stream.unary(Pipeline, "ToUpdates", |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(output.output_index()) else {
                    return;
                };
                let mut session = output.session(&cap);
                for container in data {
                    for rec in container.iter() {
                        let label = match &rec.payload {
                            Payload::Critique(c) => c.principle.clone(),
                            Payload::Revision(r) => r.principle.clone(),
                            Payload::Sample(s) => {
                                format!("{:?}", s.conversation.purpose).to_lowercase()
                            }
                            other => other.kind().to_string(),
                        };
                        session.give(((rec.stage.clone(), label), *cap.time(), 1isize));
                    }
                }
            });
        }
    });
    updates
        .as_collection()
        .count()
        .inspect(move |(((stage, label), count), _time, diff)| {
            if *diff > 0 {
                let mut state = shared.0.borrow_mut();
                let entry = state
                    .aggregates
                    .entry((stage.clone(), label.clone()))
                    .or_insert(0);
                *entry = (*entry).max(*count as i64);
            }
        });
}
