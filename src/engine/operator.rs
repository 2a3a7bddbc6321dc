//! Stage operators: the generic timely operator that runs any [`Stage`] (stash inputs under
//! capabilities, skip keys already logged, batch model work to the worker, wake on replies,
//! log then emit), and the epoch-ordered operator of training stages (`sft`, `pm`, `ppo`).
//!
//! Two wiring features beyond a straight chain:
//! - a **gate** (`after = "STAGE"` in a stage's settings): the operator holds its inputs
//!   until STAGE has written its checkpoint (or the input has ended), e.g. RL sampling waits
//!   for the SL-CAI model;
//! - a **feedback loop**: a `ppo` stage's `ppo_update` records go back (one epoch later) to
//!   the `rollout` stage it consumes from, which plans epoch `e` only once every update of
//!   earlier epochs has arrived — rollouts → update → new policy version → rollouts.

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
use super::train_state::{self, DEFAULT_STATE_EVERY, TrainCursor};
use crate::log::LogWriter;
use crate::model::worker::{Job, JobOutput, Reply as WorkerReply, Waker};
use crate::model::{Tokenizer, WorkerHandle};
use crate::record::{CheckpointRecord, Key, NewEvent, Payload, RunId, TrainStateRecord};
use crate::spec::Spec;
use crate::stages::{
    Rec, Reply, Stage, StageContext, StageError, StageKind, Task, TrainJob, TrainWork,
    TrainingStage, Work,
};

/// Counters of one operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorStats {
    /// Outputs computed in this run.
    pub computed: u64,
    /// Outputs found in the log and re-emitted.
    pub replayed: u64,
    /// Model jobs submitted.
    pub jobs: u64,
    /// Training jobs not run because a saved training state covers them.
    pub skipped: u64,
    /// Training jobs run again although their event was logged (after the last state).
    pub recomputed: u64,
    /// Of those, how many came out different from their logged event.
    pub diverged: u64,
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

pub(super) enum Built {
    Model {
        name: String,
        from: Vec<String>,
        stage: Box<dyn Stage + Send + Sync>,
        batch: usize,
        after: Option<String>,
    },
    Training {
        name: String,
        from: Vec<String>,
        stage: Box<dyn TrainingStage>,
        after: Option<String>,
        state_every: u64,
    },
}

/// The stages of a spec, built and ready to attach.
pub struct Plan {
    pub(super) stages: Vec<Built>,
    /// Per stage: run it on worker 0 only (its input exchanged there) — set for multi-worker
    /// runs by [`Plan::centralise`].
    central: Vec<bool>,
}

impl Plan {
    /// Builds every stage of `spec` (configuration errors surface here, before any work).
    pub fn build(
        spec: &Spec,
        ctx: &StageContext,
        kinds: &[StageKind],
    ) -> Result<Plan, EngineError> {
        let training = crate::stages::training_registry();
        let mut stages = Vec::new();
        let mut earlier: Vec<&str> = Vec::new();
        for s in &spec.stages {
            let at = |message: String| {
                EngineError::Input(format!(
                    "{}:{}: stage `{}`: {message}",
                    spec.path.display(),
                    s.line,
                    s.name
                ))
            };
            let mut settings = s.settings.clone();
            // `batch` and `after` are the engine's: tasks per model job, and the gate.
            let batch = match settings.remove("batch") {
                None => 16,
                Some(toml::Value::Integer(n)) if n > 0 => n as usize,
                Some(other) => {
                    return Err(at(format!(
                        "`batch` must be a positive integer, found {other}"
                    )));
                }
            };
            let after = match settings.remove("after") {
                None => None,
                Some(toml::Value::String(a)) if earlier.contains(&a.as_str()) => Some(a),
                Some(other) => {
                    return Err(at(format!(
                        "`after` must name an earlier stage, found {other}"
                    )));
                }
            };
            // `state_every` is the engine's too: how often a training stage saves its state.
            let state_every = match settings.remove("state_every") {
                None => None,
                Some(toml::Value::Integer(n)) if n >= 0 => Some(n as u64),
                Some(other) => {
                    return Err(at(format!(
                        "`state_every` must be a non-negative integer, found {other}"
                    )));
                }
            };
            earlier.push(&s.name);
            let located = |e: StageError| {
                EngineError::Input(format!("{}:{}: {e}", spec.path.display(), s.line))
            };
            if let Some((_, _, builder)) = training.iter().find(|(k, _, _)| *k == s.kind) {
                let stage = builder(&s.name, &settings, ctx).map_err(located)?;
                let m = stage.trained_model();
                if let Some(model) = spec.models.iter().find(|x| x.name == m)
                    && model.dtype != crate::model::Dtype::F32
                {
                    return Err(at(format!(
                        "trains model `{m}`, which is loaded as {}; a trained model needs \
                         dtype f32",
                        model.dtype
                    )));
                }
                stages.push(Built::Training {
                    name: s.name.clone(),
                    from: s.from.clone(),
                    stage,
                    after,
                    state_every: state_every.unwrap_or(DEFAULT_STATE_EVERY),
                });
                continue;
            }
            if state_every.is_some() {
                return Err(at(
                    "`state_every` applies to training stages only (see `cairn stages`)".into(),
                ));
            }
            let Some((_, _, builder)) = kinds.iter().find(|(k, _, _)| *k == s.kind) else {
                let known: Vec<&str> = kinds
                    .iter()
                    .map(|(k, _, _)| *k)
                    .chain(training.iter().map(|(k, _, _)| *k))
                    .collect();
                return Err(at(format!(
                    "unknown kind `{}` (known: {})",
                    s.kind,
                    known.join(", ")
                )));
            };
            stages.push(Built::Model {
                name: s.name.clone(),
                from: s.from.clone(),
                stage: builder(&s.name, &settings, ctx).map_err(located)?,
                batch,
                after,
            });
        }
        let central = vec![false; stages.len()];
        Ok(Plan { stages, central })
    }

    /// The models the plan's training stages train.
    pub fn trained_models(&self) -> std::collections::HashSet<String> {
        self.stages
            .iter()
            .filter_map(|b| match b {
                Built::Training { stage, .. } => Some(stage.trained_model().to_string()),
                Built::Model { .. } => None,
            })
            .collect()
    }

    /// The stages inside a feedback loop: those a training stage that feeds back reads from
    /// (the rollouts a PPO stage updates the policy of).
    pub fn looped(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter_map(|b| match b {
                Built::Training { stage, from, .. } if stage.feeds_back() => Some(from.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Marks the stages that must run on worker 0 of a multi-worker run: training stages
    /// (they see every epoch, in order), gated stages, stages in a feedback loop, and stages
    /// whose models the run trains (their weights exist only where the training ran). Every
    /// other stage runs where its epoch's prompts were fed. Returns the central stages' names.
    pub fn centralise(&mut self) -> Vec<String> {
        let trained = self.trained_models();
        let looped = self.looped();
        let mut names = Vec::new();
        for (built, central) in self.stages.iter().zip(&mut self.central) {
            let (name, is_central) = match built {
                Built::Training { name, .. } => (name, true),
                Built::Model {
                    name, stage, after, ..
                } => {
                    let uses_trained = stage.models().iter().any(|m| trained.contains(m));
                    (name, after.is_some() || uses_trained || looped.contains(name))
                }
            };
            *central = is_central;
            if is_central {
                names.push(name.clone());
            }
        }
        names
    }

    /// Whether any stage waits for another to finish (then only the stages before the first
    /// such stage stream with bounded lag; the engine measures progress there).
    pub fn first_gated(&self) -> Option<usize> {
        self.stages.iter().position(|b| match b {
            Built::Model { after, .. } | Built::Training { after, .. } => after.is_some(),
        })
    }

    /// Chains the operators after `stream`. Returns the final stream and the stream entering
    /// the first gated stage (the point the engine's lag is measured at).
    pub fn attach<'s>(
        self,
        stream: Stream<'s, u64, Vec<Rec>>,
        env: &Env,
        shared: &Shared,
    ) -> (Stream<'s, u64, Vec<Rec>>, Stream<'s, u64, Vec<Rec>>) {
        use timely::dataflow::operators::vec::Filter;
        use timely::dataflow::operators::{Concatenate, ConnectLoop, Exchange, Feedback};
        let scope = stream.scope();
        let first_gated = self.first_gated();
        let central = self.central.clone();
        // A feedback edge into every stage that a `ppo` stage consumes from.
        let looped = self.looped();
        let mut loops: HashMap<
            String,
            timely::dataflow::operators::feedback::Handle<'s, u64, Vec<Rec>>,
        > = HashMap::new();
        // Each operator's own outputs (not what it passes through), for the aggregates.
        let mut own = vec![stream.clone().filter(|r: &Rec| r.stage == "prompts")];
        let mut stream = stream;
        let mut lag_point = None;
        for (i, built) in self.stages.into_iter().enumerate() {
            if central[i] {
                // Everything (consumed or passing through) moves to worker 0, so each record
                // still exists exactly once downstream.
                stream = stream.exchange(|_| 0);
            }
            if Some(i) == first_gated {
                lag_point = Some(stream.clone());
            }
            let (name, next) = match built {
                Built::Model {
                    name,
                    from,
                    stage,
                    batch,
                    after,
                } => {
                    let back = if looped.contains(&name) {
                        let (handle, back) = scope.feedback::<Vec<Rec>>(1);
                        loops.insert(name.clone(), handle);
                        back
                    } else {
                        timely::dataflow::operators::generic::operator::empty(scope)
                    };
                    let out = model_operator(
                        stream,
                        back,
                        ModelOp {
                            name: name.clone(),
                            from,
                            stage,
                            batch,
                            after,
                        },
                        env.clone(),
                        shared.clone(),
                    );
                    (name, out)
                }
                Built::Training {
                    name,
                    from,
                    stage,
                    after,
                    state_every,
                } => {
                    let feeds_back = stage.feeds_back();
                    let out = training_operator(
                        stream,
                        from.clone(),
                        stage,
                        after,
                        state_every,
                        env.clone(),
                        shared.clone(),
                    );
                    if feeds_back {
                        for f in &from {
                            if let Some(handle) = loops.remove(f) {
                                let me = name.clone();
                                out.clone()
                                    .filter(move |r: &Rec| {
                                        r.stage == me && matches!(r.payload, Payload::PpoUpdate(_))
                                    })
                                    .connect_loop(handle);
                            }
                        }
                    }
                    (name, out)
                }
            };
            own.push(next.clone().filter(move |r: &Rec| r.stage == name));
            stream = next;
        }
        // A loop whose consumer came earlier than its source cannot be closed; feed it
        // nothing (the handle must be connected for the dataflow to be well-formed).
        for (_, handle) in loops {
            timely::dataflow::operators::generic::operator::empty::<u64, Vec<Rec>>(scope)
                .connect_loop(handle);
        }
        aggregates(scope.concatenate(own), shared);
        let lag_point = lag_point.unwrap_or_else(|| stream.clone());
        (stream, lag_point)
    }
}

type Chunk = (Capability<u64>, Vec<Task>);

/// A model stage and its engine settings.
struct ModelOp {
    name: String,
    from: Vec<String>,
    stage: Box<dyn Stage + Send + Sync>,
    batch: usize,
    after: Option<String>,
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
fn model_operator<'s>(
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

type RecInput = timely::dataflow::operators::generic::InputHandleCore<
    u64,
    Vec<Rec>,
    <Pipeline as timely::dataflow::channels::pact::ParallelizationContract<u64, Vec<Rec>>>::Puller,
>;
type RecOutput<'a> = timely::dataflow::operators::generic::OutputBuilderSession<
    'a,
    u64,
    timely::container::CapacityContainerBuilder<Vec<Rec>>,
>;

/// Like timely's `binary_frontier`, except that the second input is a *side input*: it is not
/// connected to the output in progress tracking (outputs are made only under capabilities of
/// the first input). A feedback loop into the side input therefore forms no cycle of
/// capabilities: an operator holding a capability downstream would otherwise see its own
/// capability come back around the loop, one epoch later, and chase it forever.
fn with_side_input<'s, B, L>(
    stream: Stream<'s, u64, Vec<Rec>>,
    side: Stream<'s, u64, Vec<Rec>>,
    name: &str,
    constructor: B,
) -> Stream<'s, u64, Vec<Rec>>
where
    B: FnOnce(Capability<u64>, timely::dataflow::operators::generic::OperatorInfo) -> L,
    L: FnMut(
            (
                &mut RecInput,
                &timely::progress::frontier::MutableAntichain<u64>,
            ),
            (
                &mut RecInput,
                &timely::progress::frontier::MutableAntichain<u64>,
            ),
            &mut RecOutput<'_>,
        ) + 'static,
{
    use timely::dataflow::operators::generic::OutputBuilder;
    use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
    let mut builder = OperatorBuilder::new(name.to_owned(), stream.scope());
    let info = builder.operator_info();
    let mut main = builder.new_input(stream, Pipeline);
    // The output is connected to the inputs that exist when it is made: only `main`.
    let (output, out_stream) = builder.new_output();
    let mut side_in = builder.new_input_connection(side, Pipeline, []);
    let mut output: OutputBuilder<u64, timely::container::CapacityContainerBuilder<Vec<Rec>>> =
        OutputBuilder::from(output);
    builder.build(move |mut capabilities| {
        let mut logic = capabilities.pop().map(|cap| constructor(cap, info));
        move |frontiers| {
            let mut session = output.activate();
            if let Some(logic) = logic.as_mut() {
                logic(
                    (&mut main, &frontiers[0]),
                    (&mut side_in, &frontiers[1]),
                    &mut session,
                );
            }
        }
    });
    out_stream
}

/// Cuts key-sorted tasks into chunks of at most `batch`; a chunk is one model call, so it
/// never mixes kinds of work or models.
pub(super) fn chunks(tasks: Vec<Task>, batch: usize) -> Vec<Vec<Task>> {
    let mut groups: BTreeMap<(u8, String), Vec<Task>> = BTreeMap::new();
    for task in tasks {
        groups.entry(work_group(&task.work)).or_default().push(task);
    }
    groups
        .into_values()
        .flat_map(|g| g.chunks(batch).map(|c| c.to_vec()).collect::<Vec<_>>())
        .collect()
}

/// Which model call a task needs; chunks never mix groups.
fn work_group(work: &Work) -> (u8, String) {
    match work {
        Work::Pure(_) => (0, String::new()),
        Work::Generate { model, .. } | Work::GenerateMany { model, .. } => (1, model.clone()),
        Work::Score { model, .. } | Work::ScoreMany { model, .. } => (2, model.clone()),
        Work::ScoreChoices { model, .. } => (3, model.clone()),
    }
}

/// The model and job for a chunk of generate or score tasks (`None` for pure work); the
/// requests of every task, in task order.
pub(super) fn model_job(tasks: &[Task]) -> Option<(String, Job)> {
    let model = tasks.first()?.work.model()?.to_string();
    let job = match &tasks[0].work {
        Work::Generate { .. } | Work::GenerateMany { .. } => Job::Generate(
            tasks
                .iter()
                .flat_map(|t| match &t.work {
                    Work::Generate { request, .. } => vec![request.clone()],
                    Work::GenerateMany { requests, .. } => requests.clone(),
                    _ => Vec::new(),
                })
                .collect(),
        ),
        Work::ScoreChoices { .. } => Job::ScoreChoices(
            tasks
                .iter()
                .flat_map(|t| match &t.work {
                    Work::ScoreChoices { requests, .. } => requests.clone(),
                    _ => Vec::new(),
                })
                .collect(),
        ),
        _ => Job::Score(
            tasks
                .iter()
                .flat_map(|t| match &t.work {
                    Work::Score { request, .. } => vec![request.clone()],
                    Work::ScoreMany { requests, .. } => requests.clone(),
                    _ => Vec::new(),
                })
                .collect(),
        ),
    };
    Some((model, job))
}

/// Splits a worker reply back into one [`Reply`] per task.
pub(super) fn split_reply(
    name: &str,
    tasks: &[Task],
    reply: WorkerReply,
) -> Result<Vec<Reply>, EngineError> {
    let bad = |what: String| EngineError::Input(format!("stage `{name}`: {what}"));
    let mut out = Vec::with_capacity(tasks.len());
    match reply? {
        JobOutput::Generated(g) => {
            let mut g = g.into_iter();
            for t in tasks {
                out.push(match &t.work {
                    Work::Generate { .. } => {
                        Reply::Generated(g.next().ok_or_else(|| bad("too few generations".into()))?)
                    }
                    Work::GenerateMany { requests, .. } => {
                        let many: Vec<_> = g.by_ref().take(requests.len()).collect();
                        if many.len() != requests.len() {
                            return Err(bad("too few generations".into()));
                        }
                        Reply::GeneratedMany(many)
                    }
                    other => return Err(bad(format!("generation for {other:?}"))),
                });
            }
        }
        JobOutput::Scored(s) => {
            let mut s = s.into_iter();
            for t in tasks {
                out.push(match &t.work {
                    Work::Score { .. } => {
                        Reply::Scored(s.next().ok_or_else(|| bad("too few scores".into()))?)
                    }
                    Work::ScoreMany { requests, .. } => {
                        let many: Vec<_> = s.by_ref().take(requests.len()).collect();
                        if many.len() != requests.len() {
                            return Err(bad("too few scores".into()));
                        }
                        Reply::ScoredMany(many)
                    }
                    other => return Err(bad(format!("scores for {other:?}"))),
                });
            }
        }
        JobOutput::ChoiceScores(c) => {
            let mut c = c.into_iter();
            for t in tasks {
                let Work::ScoreChoices { requests, .. } = &t.work else {
                    return Err(bad(format!("choice scores for {:?}", t.work)));
                };
                let many: Vec<_> = c.by_ref().take(requests.len()).collect();
                if many.len() != requests.len() {
                    return Err(bad("too few choice scores".into()));
                }
                out.push(Reply::ChoiceScores(many));
            }
        }
        other => return Err(bad(format!("unexpected worker reply {other:?}"))),
    }
    Ok(out)
}

/// After a chunk's replies: tasks with another call to make become new chunks (kept
/// together, so batches stay deterministic); the rest complete, are logged and returned.
#[allow(clippy::too_many_arguments)]
fn advance(
    stage: &dyn Stage,
    name: &str,
    env: &Env,
    shared: &Shared,
    cap: &Capability<u64>,
    tasks: Vec<Task>,
    replies: Vec<Reply>,
    batch: usize,
) -> Result<(Vec<Rec>, Vec<Chunk>), EngineError> {
    let mut done_tasks = Vec::new();
    let mut done_replies = Vec::new();
    let mut going = Vec::new();
    for (mut task, reply) in tasks.into_iter().zip(replies) {
        match stage.more(&task, &reply)? {
            Some(work) => {
                task.history.push(reply);
                task.work = work;
                going.push(task);
            }
            None => {
                done_tasks.push(task);
                done_replies.push(reply);
            }
        }
    }
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
        events.push(event_of(env, &rec, epoch));
        out.push(rec);
    }
    shared.count(name, |s| s.computed += events.len() as u64);
    if !events.is_empty() {
        env.writer.append_batch(events)?;
    }
    Ok(out)
}

/// Runs a [`TrainingStage`]: epochs in time order, each once complete; the stage's work runs
/// on the model worker (blocking: the worker trains one step at a time anyway).
fn training_operator<'s>(
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
fn run_training_work(
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

/// The event that logs `rec` in this run.
fn event_of(env: &Env, rec: &Rec, epoch: u64) -> NewEvent {
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
fn append(
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
fn compare(name: &str, shared: &Shared, logged: &Rec, now: Option<&Payload>) {
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

fn inconsistent(name: &str, key: Key) -> EngineError {
    EngineError::Input(format!(
        "stage `{name}`: its saved training state is later than work {key} that the log \
         lacks; the log and the state directory do not belong together"
    ))
}

/// Loads a saved training state into the worker's model.
fn restore(name: &str, env: &Env, state: &TrainStateRecord) -> Result<(), EngineError> {
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
fn save_state(
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
fn checkpoint(
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
    let sha256 = crate::replay::sha256_file(&weights)
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
