//! The model worker: one thread that owns the models of one device and serves requests
//! from any number of callers (dataflow operators) over a crossbeam channel.
//!
//! It is a layer of its own, above `model/` (the decoder it serves) and `train/` (the
//! losses and optimiser steps it runs), so neither of those knows it exists.
//!
//! Requests queue up while the worker computes; when it is free it takes everything waiting,
//! merges same-model, same-kind jobs into batches up to a token budget (so a critique and a
//! sample can ride in one forward pass), answers each job on its own reply channel, and then
//! calls the job's wake-up callback — how a timely operator blocked on results is
//! re-scheduled (`SyncActivator::activate`).
//!
//! A model with a row limit (`decode_rows`) streams instead (`stream.rs`): generation jobs
//! that arrive while it decodes join the running batch as rows free up, and each is
//! answered as soon as its own requests finish.
//!
//! - [`instant`]: the stand-in backend that answers without computing (`cairn bench engine`).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};
use tch::Device;

use crate::model::ModelError;
use crate::model::generate::{
    ChoiceRequest, GenerateRequest, Generation, ScoreRequest, Scored, generate, score,
    score_choices,
};
use crate::model::llama::Llama;

pub mod instant;
mod merge;
mod stream;
use crate::train::{Algorithm, Measurement, OptimConfig, Report, Trainer};

/// A callback run after a job's reply has been sent.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Work for a model.
#[derive(Clone, Debug)]
pub enum Job {
    /// Continue each prompt.
    Generate(Vec<GenerateRequest>),
    /// Score each continuation.
    Score(Vec<ScoreRequest>),
    /// Total log-probability of each choice after its context (one pass per context).
    ScoreChoices(Vec<ChoiceRequest>),
    /// One optimiser step of any training algorithm (`crate::train::Algorithm`). The
    /// worker keeps one optimiser per model and algorithm slot, created on first use.
    Train(Arc<dyn Algorithm>),
    /// A read-only evaluation (`crate::train::Measurement`), such as a held-out loss.
    Measure(Arc<dyn Measurement>),
    /// Write the model as a Hugging Face directory (`config.json`, `model.safetensors`).
    Save(PathBuf),
    /// Replace this model's weights with a copy of another model's (e.g. freeze the SL-CAI
    /// policy as the RL reference before PPO changes it).
    CopyFrom(String),
    /// Write the model's training state — variables, every optimiser's moments and step
    /// counts — into a directory, atomically (`crate::train::state`).
    SaveState(PathBuf),
    /// Restore a training state that `SaveState` wrote (optimisers included).
    LoadState(PathBuf),
}

impl Job {
    /// A training job: one step of `algorithm`.
    pub fn train(algorithm: impl Algorithm + 'static) -> Job {
        Job::Train(Arc::new(algorithm))
    }

    /// A measuring job.
    pub fn measure(measurement: impl Measurement + 'static) -> Job {
        Job::Measure(Arc::new(measurement))
    }

    fn tokens(&self) -> usize {
        match self {
            Job::Generate(r) => r
                .iter()
                .map(|r| r.prompt.len() + r.params.max_new_tokens)
                .sum(),
            Job::Score(r) => r
                .iter()
                .map(|r| r.context.len() + r.continuation.len())
                .sum(),
            Job::ScoreChoices(r) => r
                .iter()
                .map(|r| r.context.len() + r.choices.iter().map(|c| c.len()).sum::<usize>())
                .sum(),
            _ => 0,
        }
    }
}

/// The answer to a job.
#[derive(Clone, Debug, PartialEq)]
pub enum JobOutput {
    /// One generation per request, in order.
    Generated(Vec<Generation>),
    /// One score per request, in order.
    Scored(Vec<Scored>),
    /// Per request, the total log-probability of each choice.
    ChoiceScores(Vec<Vec<f32>>),
    /// What a training step did, as its algorithm reports it.
    Trained(Report),
    /// What a measurement found.
    Measured(Report),
    /// Files written.
    Saved(Vec<PathBuf>),
    /// Weights copied.
    Copied,
    /// A training state restored.
    Restored,
}

/// The reply of one job.
pub type Reply = Result<JobOutput, ModelError>;

struct Submission {
    model: String,
    job: Job,
    reply: Sender<Reply>,
    wake: Option<Waker>,
}

/// A model served by the worker, with the tokens that end its turns.
pub struct ServedModel {
    /// What computes.
    pub backend: Backend,
    /// End-of-turn token ids.
    pub eos: Vec<u32>,
}

/// What answers a model's jobs.
pub enum Backend {
    /// A real decoder.
    Llama(Box<Llama>),
    /// Answers at once without computing (echoes the prompt's last tokens, log-probabilities
    /// 0): for measuring the engine's own overhead.
    Instant,
}

impl ServedModel {
    /// A decoder.
    pub fn llama(model: Llama, eos: Vec<u32>) -> ServedModel {
        ServedModel {
            backend: Backend::Llama(Box::new(model)),
            eos,
        }
    }

    /// The instant stand-in model.
    pub fn instant() -> ServedModel {
        ServedModel {
            backend: Backend::Instant,
            eos: Vec::new(),
        }
    }
}

/// Builds a model on the worker thread (tensors belong to the thread that made them).
pub type ModelFactory = Box<dyn FnOnce(Device) -> Result<ServedModel, ModelError> + Send>;

/// Worker settings.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Device for every model of this worker.
    pub device: Device,
    /// Largest batch, in prompt + new tokens (or context + continuation tokens for scoring).
    pub token_budget: usize,
    /// Largest batch, in sequences.
    pub max_batch: usize,
    /// Merge waiting jobs of the same model and kind into one model call. Faster, but a
    /// sequence's floating-point results then depend on what happened to share its batch;
    /// turn it off where outputs must be bit-identical from run to run.
    pub merge: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            device: Device::Cpu,
            token_budget: 16_384,
            max_batch: 64,
            merge: true,
        }
    }
}

/// Counters of what the worker did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Jobs answered.
    pub jobs: u64,
    /// Model calls (batches) run.
    pub batches: u64,
    /// Sequences processed.
    pub sequences: u64,
    /// Time spent in model calls, in nanoseconds.
    pub busy_ns: u64,
    /// Per model, the prompt tokens its prefills computed and the shared-prefix tokens it
    /// served from memory instead, since it was loaded.
    pub prefill: std::collections::BTreeMap<String, PrefillCount>,
    /// Per model, its decode steps since it was loaded.
    pub decode: std::collections::BTreeMap<String, DecodeCount>,
}

/// Decode steps of one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeCount {
    /// Steps run.
    pub steps: u64,
    /// Rows they advanced (new tokens fed), summed over steps.
    pub rows: u64,
    /// Their wall time, in nanoseconds.
    pub nanos: u64,
}

impl DecodeCount {
    /// Rows per step on average: how full the decode batches were.
    pub fn mean_rows(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.rows as f64 / self.steps as f64
        }
    }

    /// New tokens per second of decode steps.
    pub fn tokens_per_second(&self) -> f64 {
        if self.nanos == 0 {
            0.0
        } else {
            self.rows as f64 / (self.nanos as f64 / 1e9)
        }
    }

    /// The counts between two readings (`self` the later).
    pub fn since(&self, before: &DecodeCount) -> DecodeCount {
        DecodeCount {
            steps: self.steps.saturating_sub(before.steps),
            rows: self.rows.saturating_sub(before.rows),
            nanos: self.nanos.saturating_sub(before.nanos),
        }
    }
}

/// Prompt tokens of one model's prefills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillCount {
    /// Tokens run through the model (each row's own tokens, a shared prefix once per call
    /// unless served from memory; padding not counted).
    pub computed: u64,
    /// Shared-prefix tokens served from memory.
    pub reused: u64,
    /// Wall time of those prefills, in nanoseconds.
    pub nanos: u64,
}

impl PrefillCount {
    /// Wall time of the prefills, in seconds.
    pub fn seconds(&self) -> f64 {
        self.nanos as f64 / 1e9
    }

    /// The counts between two readings (`self` the later).
    pub fn since(&self, before: &PrefillCount) -> PrefillCount {
        PrefillCount {
            computed: self.computed.saturating_sub(before.computed),
            reused: self.reused.saturating_sub(before.reused),
            nanos: self.nanos.saturating_sub(before.nanos),
        }
    }
}

/// The counters, with each model's prefill counts read now.
fn stats_now(stats: &WorkerStats, models: &HashMap<String, ServedModel>) -> WorkerStats {
    let mut out = stats.clone();
    for (name, served) in models {
        if let Backend::Llama(m) = &served.backend {
            out.prefill.insert(
                name.clone(),
                PrefillCount {
                    computed: m.prompt_tokens_prefilled(),
                    reused: m.prefix_tokens_reused(),
                    nanos: (m.prefill_seconds() * 1e9) as u64,
                },
            );
            let (steps, rows, nanos) = m.decode_counts();
            out.decode
                .insert(name.clone(), DecodeCount { steps, rows, nanos });
        }
    }
    out
}

/// A cheap, cloneable handle for submitting jobs.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: Sender<Message>,
}

enum Message {
    Work(Submission),
    Stats(Sender<WorkerStats>),
}

/// The worker thread; dropping every handle and the worker stops it.
pub struct ModelWorker {
    handle: WorkerHandle,
    thread: Option<JoinHandle<()>>,
}

impl ModelWorker {
    /// Starts the worker and builds its models on it. Fails if any model fails to load.
    pub fn spawn(
        models: Vec<(String, ModelFactory)>,
        opts: WorkerOptions,
    ) -> Result<ModelWorker, ModelError> {
        let (tx, rx) = unbounded::<Message>();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), ModelError>>(1);
        let thread = std::thread::Builder::new()
            .name("cairn-model-worker".into())
            .spawn(move || {
                let mut served = HashMap::new();
                for (name, factory) in models {
                    match factory(opts.device) {
                        Ok(m) => {
                            served.insert(name, m);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                serve(served, rx, &opts);
            })
            .map_err(|e| ModelError::Io {
                path: "<model worker thread>".into(),
                source: e,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(ModelWorker {
                handle: WorkerHandle { tx },
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ModelError::WorkerGone)
            }
        }
    }

    /// A handle for submitting jobs.
    pub fn handle(&self) -> WorkerHandle {
        self.handle.clone()
    }
}

impl Drop for ModelWorker {
    fn drop(&mut self) {
        // The thread exits once every handle is gone; callers may still hold handles, so
        // only join when ours is the last.
        let (tx, _) = unbounded();
        let ours = std::mem::replace(&mut self.handle.tx, tx);
        drop(ours);
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}

impl WorkerHandle {
    /// Submits a job; the reply arrives on the returned channel, after which `wake` runs.
    pub fn submit(
        &self,
        model: &str,
        job: Job,
        wake: Option<Waker>,
    ) -> Result<Receiver<Reply>, ModelError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Message::Work(Submission {
                model: model.to_string(),
                job,
                reply,
                wake,
            }))
            .map_err(|_| ModelError::WorkerGone)?;
        Ok(rx)
    }

    /// Generates and waits for the result.
    pub fn generate(
        &self,
        model: &str,
        requests: Vec<GenerateRequest>,
    ) -> Result<Vec<Generation>, ModelError> {
        match self.submit(model, Job::Generate(requests), None)?.recv() {
            Ok(Ok(JobOutput::Generated(g))) => Ok(g),
            Ok(Ok(_)) => Err(ModelError::WorkerGone),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ModelError::WorkerGone),
        }
    }

    /// Scores and waits for the result.
    pub fn score(
        &self,
        model: &str,
        requests: Vec<ScoreRequest>,
    ) -> Result<Vec<Scored>, ModelError> {
        match self.submit(model, Job::Score(requests), None)?.recv() {
            Ok(Ok(JobOutput::Scored(s))) => Ok(s),
            Ok(Ok(_)) => Err(ModelError::WorkerGone),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ModelError::WorkerGone),
        }
    }

    /// Submits a job and waits for its reply.
    pub fn call(&self, model: &str, job: Job) -> Reply {
        self.submit(model, job, None)?
            .recv()
            .map_err(|_| ModelError::WorkerGone)?
    }

    /// What the worker has done so far.
    pub fn stats(&self) -> Result<WorkerStats, ModelError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Message::Stats(tx))
            .map_err(|_| ModelError::WorkerGone)?;
        rx.recv().map_err(|_| ModelError::WorkerGone)
    }
}

fn serve(mut models: HashMap<String, ServedModel>, rx: Receiver<Message>, opts: &WorkerOptions) {
    let mut stats = WorkerStats::default();
    let mut trainers: HashMap<String, Trainer> = HashMap::new();
    let mut pending: Vec<Submission> = Vec::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(Message::Work(s)) => pending.push(s),
                Ok(Message::Stats(tx)) => {
                    let _ = tx.send(stats_now(&stats, &models));
                    continue;
                }
                Err(_) => return,
            }
        }
        // Take everything that arrived while we were busy.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Message::Work(s) => pending.push(s),
                Message::Stats(tx) => {
                    let _ = tx.send(stats_now(&stats, &models));
                }
            }
        }
        // The oldest job decides the batch: same model, same kind, up to the budget.
        let first = pending.remove(0);
        if !first.job.mergeable() {
            run_alone(&mut models, &mut trainers, first, &mut stats);
            continue;
        }
        let mut batch = vec![first];
        let mut tokens = batch[0].job.tokens();
        let mut seqs = batch[0].job.requests();
        let mut i = 0;
        while opts.merge && i < pending.len() {
            let s = &pending[i];
            let fits = tokens + s.job.tokens() <= opts.token_budget
                && seqs + s.job.requests() <= opts.max_batch;
            if s.model == batch[0].model && same_kind(&s.job, &batch[0].job) && fits {
                // (`same_kind` is false for jobs that are never merged.)
                tokens += s.job.tokens();
                seqs += s.job.requests();
                batch.push(pending.remove(i));
            } else {
                i += 1;
            }
        }
        if let Some(served) = stream::streams(&models, &batch, opts) {
            stream::serve_streaming(served, &models, batch, &rx, &mut pending, &mut stats);
            continue;
        }
        run_batch(&models, batch, &mut stats);
    }
}

/// Training, evaluation and saving run one job at a time.
fn run_alone(
    models: &mut HashMap<String, ServedModel>,
    trainers: &mut HashMap<String, Trainer>,
    s: Submission,
    stats: &mut WorkerStats,
) {
    if let Some(refusal) = packed_only_refusal(models, &s) {
        stats.jobs += 1;
        respond(s, Err(refusal));
        return;
    }
    if let Job::CopyFrom(source) = &s.job {
        let started = std::time::Instant::now();
        let reply = copy_weights(models, &s.model, source);
        stats.jobs += 1;
        stats.busy_ns += started.elapsed().as_nanos() as u64;
        respond(s, reply);
        return;
    }
    if let Job::LoadState(dir) = &s.job {
        let started = std::time::Instant::now();
        let reply = load_state(models, trainers, &s.model, dir);
        stats.jobs += 1;
        stats.busy_ns += started.elapsed().as_nanos() as u64;
        respond(s, reply);
        return;
    }
    if let Job::Train(algorithm) = &s.job
        && let Some(ServedModel {
            backend: Backend::Llama(m),
            ..
        }) = models.get_mut(&s.model)
    {
        algorithm.prepare(m);
    }
    let Some(served) = models.get(&s.model) else {
        let name = s.model.clone();
        respond(
            s,
            Err(ModelError::InvalidRequest(format!(
                "no model named `{name}` on this worker"
            ))),
        );
        return;
    };
    stats.batches += 1;
    stats.jobs += 1;
    stats.sequences += s.job.requests() as u64;
    let started = std::time::Instant::now();
    let model = match &served.backend {
        Backend::Llama(m) => m,
        Backend::Instant => {
            let reply = instant::reply(&s.job);
            stats.busy_ns += started.elapsed().as_nanos() as u64;
            respond(s, reply);
            return;
        }
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Reply {
        match &s.job {
            Job::Train(algorithm) => {
                let t = trainer(
                    trainers,
                    &s.model,
                    algorithm.optimiser(),
                    model,
                    &algorithm.optim(),
                )?;
                algorithm.step(model, t).map(JobOutput::Trained)
            }
            Job::Measure(measurement) => measurement.measure(model).map(JobOutput::Measured),
            Job::CopyFrom(_) => Err(ModelError::InvalidRequest("handled above".into())),
            Job::Save(dir) => model.save_dir(dir).map(|()| {
                JobOutput::Saved(vec![dir.join("config.json"), dir.join("model.safetensors")])
            }),
            Job::SaveState(dir) => {
                let prefix = format!("{}/", s.model);
                let mine: Vec<(&str, &Trainer)> = trainers
                    .iter()
                    .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|p| (p, t)))
                    .collect();
                crate::train::state::save(model, &mine, dir).map(JobOutput::Saved)
            }
            Job::LoadState(_) => Err(ModelError::InvalidRequest("handled above".into())),
            Job::Generate(_) | Job::Score(_) | Job::ScoreChoices(_) => {
                Err(ModelError::InvalidRequest("not a single-job kind".into()))
            }
        }
    }));
    let reply = outcome.unwrap_or_else(|panic| Err(ModelError::Panicked(panic_message(panic))));
    stats.busy_ns += started.elapsed().as_nanos() as u64;
    respond(s, reply);
}

/// The optimiser of `model` for one kind of training (created on first use).
fn trainer<'a>(
    trainers: &'a mut HashMap<String, Trainer>,
    model_name: &str,
    purpose: &str,
    model: &Llama,
    optim: &OptimConfig,
) -> Result<&'a mut Trainer, ModelError> {
    Ok(match trainers.entry(format!("{model_name}/{purpose}")) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(Trainer::new(model, optim)?),
    })
}

/// Restores `name`'s training state from `dir`: its variables, and each optimiser the state
/// holds (created when missing, replaced when present).
fn load_state(
    models: &mut HashMap<String, ServedModel>,
    trainers: &mut HashMap<String, Trainer>,
    name: &str,
    dir: &std::path::Path,
) -> Reply {
    let Some(ServedModel {
        backend: Backend::Llama(model),
        ..
    }) = models.get_mut(name)
    else {
        return Err(ModelError::InvalidRequest(format!(
            "no trainable model named `{name}` on this worker"
        )));
    };
    let restored = crate::train::state::load(model, dir)?;
    for (purpose, steps, file) in restored {
        let mut trainer = Trainer::new(model, &OptimConfig::default())?;
        trainer.opt.load(&file)?;
        trainer.steps = steps;
        trainers.insert(format!("{name}/{purpose}"), trainer);
    }
    Ok(JobOutput::Restored)
}

/// A model that keeps only packed weights (`Llama::keep_only_packed`) answers inference and
/// held-out evaluation; a job that would change, save or copy its weights is refused with
/// the model's name rather than run on released matrices.
fn packed_only_refusal(
    models: &HashMap<String, ServedModel>,
    s: &Submission,
) -> Option<ModelError> {
    let packed_only = |name: &str| matches!(models.get(name), Some(ServedModel { backend: Backend::Llama(m), .. }) if m.is_packed_only());
    let involved: Vec<&str> = match &s.job {
        Job::Generate(_) | Job::Score(_) | Job::ScoreChoices(_) | Job::Measure(_) => return None,
        Job::CopyFrom(source) => vec![s.model.as_str(), source.as_str()],
        _ => vec![s.model.as_str()],
    };
    involved.into_iter().find(|m| packed_only(m)).map(|m| {
        ModelError::InvalidRequest(format!(
            "model `{m}` keeps only its packed inference weights (nothing in the run trains \
             it), so a {} job cannot run on it",
            s.job.kind_name()
        ))
    })
}

/// Copies `source`'s weights into `target` (same architecture; by variable name).
fn copy_weights(models: &mut HashMap<String, ServedModel>, target: &str, source: &str) -> Reply {
    let missing =
        |name: &str| ModelError::InvalidRequest(format!("no model named `{name}` on this worker"));
    if !models.contains_key(source) {
        return Err(missing(source));
    }
    let Some(mut dst) = models.remove(target) else {
        return Err(missing(target));
    };
    let result = match (&mut dst.backend, models.get(source).map(|m| &m.backend)) {
        (Backend::Llama(d), Some(Backend::Llama(src))) => {
            let _g = tch::no_grad_guard();
            d.var_store_mut()
                .copy(src.var_store())
                .map(|()| JobOutput::Copied)
                .map_err(ModelError::Torch)
        }
        (Backend::Instant, _) | (_, Some(Backend::Instant)) => Ok(JobOutput::Copied),
        _ => Err(missing(source)),
    };
    models.insert(target.to_string(), dst);
    result
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn same_kind(a: &Job, b: &Job) -> bool {
    matches!(
        (a, b),
        (Job::Generate(_), Job::Generate(_))
            | (Job::Score(_), Job::Score(_))
            | (Job::ScoreChoices(_), Job::ScoreChoices(_))
    )
}

fn run_batch(
    models: &HashMap<String, ServedModel>,
    batch: Vec<Submission>,
    stats: &mut WorkerStats,
) {
    let name = batch[0].model.clone();
    let Some(served) = models.get(&name) else {
        for s in batch {
            respond(
                s,
                Err(ModelError::InvalidRequest(format!(
                    "no model named `{name}` on this worker"
                ))),
            );
        }
        return;
    };
    stats.batches += 1;
    let lens: Vec<usize> = batch.iter().map(|s| s.job.requests()).collect();
    stats.sequences += lens.iter().sum::<usize>() as u64;
    stats.jobs += batch.len() as u64;
    // A failing request must not sink the others that rode with it: on error, retry each job
    // alone so the error reaches only the job that caused it.
    let started = std::time::Instant::now();
    let result = run_merged(served, &batch);
    stats.busy_ns += started.elapsed().as_nanos() as u64;
    match result {
        Ok(outputs) => {
            for (s, out) in batch.into_iter().zip(outputs) {
                respond(s, Ok(out));
            }
        }
        Err(_) if batch.len() > 1 => {
            for s in batch {
                let out = run_merged(served, std::slice::from_ref(&s)).map(|mut v| v.remove(0));
                respond(s, out);
            }
        }
        Err(e) => {
            if let Some(s) = batch.into_iter().next() {
                respond(s, Err(e));
            }
        }
    }
}

/// Runs the jobs as one model call and splits the outputs back per job.
fn run_merged(served: &ServedModel, batch: &[Submission]) -> Result<Vec<JobOutput>, ModelError> {
    let model = match &served.backend {
        Backend::Llama(m) => m,
        Backend::Instant => return batch.iter().map(|s| instant::reply(&s.job)).collect(),
    };
    let lens: Vec<usize> = batch.iter().map(|s| s.job.requests()).collect();
    let merged = Job::concat(batch.iter().map(|s| s.job.clone()))?;
    let outcome = catch_unwind(AssertUnwindSafe(|| match &merged {
        Job::Generate(all) => Ok(JobOutput::Generated(generate(model, &served.eos, all)?)),
        Job::Score(all) => Ok(JobOutput::Scored(score(model, all)?)),
        Job::ScoreChoices(all) => Ok(JobOutput::ChoiceScores(score_choices(model, all)?)),
        other => Err(ModelError::InvalidRequest(format!(
            "{} jobs are not batched",
            other.kind_name()
        ))),
    }));
    outcome
        .unwrap_or_else(|panic| Err(ModelError::Panicked(panic_message(panic))))?
        .split(&lens)
}

fn respond(s: Submission, reply: Reply) {
    let _ = s.reply.send(reply);
    if let Some(wake) = s.wake {
        wake();
    }
}
