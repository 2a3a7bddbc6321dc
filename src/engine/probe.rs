//! Stage probes: the model work of a spec's stages, run stage after stage outside timely and
//! outside the log, with every model call measured. A probe builds the plan exactly as
//! `cairn run` does (same settings, constitution, models, number formats and prefix
//! sharing), feeds the spec's prompts in the same epochs, and plans, chunks and completes
//! each stage's tasks as its operator would, so each call is the call a run makes: the
//! stage's prompts, sampling settings and batch. What it leaves out is the streaming (one
//! stage runs at a time), the log and the training stages, whose outputs do not exist here.
//! `cairn bench pipeline` is built on it.

use std::collections::HashSet;
use std::time::Instant;

use super::operator::{Built, Plan, advance_tasks, chunks, model_job, split_reply};
use super::{EngineError, load_prompts, model_factories, stage_context};
use crate::constitution::Constitution;
use crate::spec::Spec;
use crate::stages::{Rec, Reply, StageKind, Task};
use crate::worker::{Job, JobOutput, ModelWorker, WorkerHandle, WorkerOptions};

/// How a probe is set up.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Device of the models.
    pub device: tch::Device,
    /// Use only the first this many prompts, in the run's feeding order (`None`: all).
    pub prompts: Option<usize>,
    /// Load only the models these stages call (`None`: every model stage's).
    pub stages: Option<Vec<String>>,
}

/// One model call and what it cost.
#[derive(Clone, Debug)]
pub struct CallMeasure {
    /// The model it ran on.
    pub model: String,
    /// The job, as the stage sent it (the requests, for baselines on the same inputs).
    pub job: Job,
    /// Requests (rows) in the call.
    pub rows: usize,
    /// Wall time of the call, seconds.
    pub seconds: f64,
    /// Of that, the time in prefills (generation and multiple-choice contexts), seconds.
    pub prefill_seconds: f64,
    /// Prompt (or context) tokens of the requests, as sent.
    pub prompt_tokens: u64,
    /// Prompt tokens the model computed (a shared prefix once, served prefixes not at all).
    pub prefilled_tokens: u64,
    /// Shared-prefix tokens served from memory.
    pub reused_tokens: u64,
    /// Padding positions of the prompt batch: rows × the longest prompt − prompt tokens.
    pub padding_tokens: u64,
    /// Tokens generated.
    pub new_tokens: u64,
}

impl CallMeasure {
    /// Time outside the prefills: decode steps, sampling, and the call's own overhead.
    pub fn decode_seconds(&self) -> f64 {
        (self.seconds - self.prefill_seconds).max(0.0)
    }
}

/// What one stage's model work cost.
#[derive(Clone, Debug)]
pub struct StageMeasure {
    /// The stage instance.
    pub stage: String,
    /// Records it produced.
    pub records: usize,
    /// Its model calls, in the order they ran.
    pub calls: Vec<CallMeasure>,
    /// Wall time of the whole stage (planning and completing included), seconds.
    pub seconds: f64,
}

/// A spec's stages, their models loaded, ready to run stage by stage.
pub struct StageProbe {
    stages: Vec<Built>,
    /// Every record so far, with the epoch of the prompt it descends from.
    records: Vec<(u64, Rec)>,
    worker: ModelWorker,
}

impl StageProbe {
    /// Builds the plan of `spec` with the stage kinds `kinds`, reads its prompts and loads
    /// the models the probed stages call.
    pub fn new(
        spec: &Spec,
        kinds: &[StageKind],
        opts: &ProbeOptions,
    ) -> Result<StageProbe, EngineError> {
        let constitution = std::sync::Arc::new(
            Constitution::load(&spec.constitution)
                .map_err(|e| EngineError::Input(e.to_string()))?,
        );
        let mut prompts = load_prompts(spec)?;
        if let Some(n) = opts.prompts {
            prompts.truncate(n);
        }
        let ctx = stage_context(spec, constitution)?;
        let plan = Plan::build(spec, &ctx, kinds)?;
        let changing = plan.weights_change();
        let mut used = HashSet::new();
        for built in &plan.stages {
            if let Built::Model { name, stage, .. } = built {
                let wanted = opts.stages.as_ref().is_none_or(|s| s.contains(name));
                if wanted {
                    used.extend(stage.models());
                    used.extend(stage.setup().into_iter().map(|(m, _)| m));
                }
            }
        }
        if let Some(wanted) = &opts.stages {
            for name in wanted {
                let known = plan
                    .stages
                    .iter()
                    .any(|b| matches!(b, Built::Model { name: n, .. } if n == name));
                if !known {
                    return Err(EngineError::Input(format!(
                        "{}: no model stage named `{name}`",
                        spec.path.display()
                    )));
                }
            }
        }
        let factories = model_factories(spec, Some(&used), &changing);
        let worker = ModelWorker::spawn(
            factories,
            WorkerOptions {
                device: opts.device,
                merge: false,
                ..WorkerOptions::default()
            },
        )?;
        let epoch_size = spec.prompts.epoch_size.max(1);
        let records = prompts
            .into_iter()
            .enumerate()
            .map(|(i, r)| ((i / epoch_size) as u64, r))
            .collect();
        Ok(StageProbe {
            stages: plan.stages,
            records,
            worker,
        })
    }

    /// The model stages, in spec order.
    pub fn stage_names(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter_map(|b| match b {
                Built::Model { name, .. } => Some(name.clone()),
                Built::Training { .. } => None,
            })
            .collect()
    }

    /// Every record so far (the prompts and what probed stages produced).
    pub fn records(&self) -> impl Iterator<Item = &Rec> {
        self.records.iter().map(|(_, r)| r)
    }

    /// The worker serving the probe's models, for baselines on the same loaded weights.
    pub fn worker(&self) -> WorkerHandle {
        self.worker.handle()
    }

    /// Runs model stage `name` on every record it consumes so far: per epoch, its tasks
    /// sorted by key and cut into chunks of its batch, each chunk one measured call, further
    /// calls of multi-call tasks chunked together as the operator does. Its outputs join the
    /// records later stages read.
    pub fn run_stage(&mut self, name: &str) -> Result<StageMeasure, EngineError> {
        let started = Instant::now();
        let Some(Built::Model {
            stage, from, batch, ..
        }) = self
            .stages
            .iter()
            .find(|b| matches!(b, Built::Model { name: n, .. } if n == name))
        else {
            return Err(EngineError::Input(format!("no model stage named `{name}`")));
        };
        let handle = self.worker.handle();
        for (model, job) in stage.setup() {
            handle.call(&model, job)?;
        }
        let mut epochs: std::collections::BTreeMap<u64, Vec<Task>> = Default::default();
        for (epoch, rec) in &self.records {
            if from.contains(&rec.stage) && stage.accepts(rec) {
                epochs.entry(*epoch).or_default().extend(stage.plan(rec)?);
            }
        }
        let mut calls = Vec::new();
        let mut outputs = Vec::new();
        for (epoch, mut tasks) in epochs {
            tasks.sort_by_key(|t| t.key);
            let mut queue: std::collections::VecDeque<Vec<Task>> = chunks(tasks, *batch).into();
            while let Some(chunk) = queue.pop_front() {
                let replies = match model_job(name, &chunk)? {
                    None => chunk
                        .iter()
                        .map(|t| match &t.work {
                            crate::stages::Work::Pure(p) => Ok(Reply::Pure(p.clone())),
                            _ => Err(EngineError::Input(format!(
                                "stage `{name}`: model work in a pure chunk"
                            ))),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    Some((model, job)) => {
                        let (out, measure) = measured_call(&handle, &model, job)?;
                        calls.push(measure);
                        split_reply(name, &chunk, Ok(out))?
                    }
                };
                let (done, last, going) = advance_tasks(stage.as_ref(), chunk, replies)?;
                for (task, reply) in done.into_iter().zip(last) {
                    let payload = stage.complete(&task, reply)?;
                    outputs.push((
                        epoch,
                        Rec {
                            key: task.key,
                            parents: vec![task.input.key],
                            stage: name.to_string(),
                            payload,
                        },
                    ));
                }
                for next in chunks(going, *batch).into_iter().rev() {
                    queue.push_front(next);
                }
            }
        }
        let records = outputs.len();
        self.records.extend(outputs);
        Ok(StageMeasure {
            stage: name.to_string(),
            records,
            calls,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Runs `job` on `model` through the worker and measures it: wall time, and the model's
/// prefill counters read before and after (the worker runs one job at a time, so the
/// difference is this call's).
pub fn measured_call(
    handle: &WorkerHandle,
    model: &str,
    job: Job,
) -> Result<(JobOutput, CallMeasure), EngineError> {
    let before = handle.stats()?;
    let (rows, prompt_tokens, padding_tokens) = prompt_batch_shape(&job);
    let started = Instant::now();
    let out = handle.call(model, job.clone())?;
    let seconds = started.elapsed().as_secs_f64();
    let after = handle.stats()?;
    let counts = super::prefill_during(&before, &after)
        .remove(model)
        .unwrap_or_default();
    let new_tokens = match &out {
        JobOutput::Generated(g) => g.iter().map(|g| g.tokens.len() as u64).sum(),
        _ => 0,
    };
    let measure = CallMeasure {
        model: model.to_string(),
        job,
        rows,
        seconds,
        prefill_seconds: counts.seconds().min(seconds),
        prompt_tokens,
        prefilled_tokens: counts.computed,
        reused_tokens: counts.reused,
        padding_tokens,
        new_tokens,
    };
    Ok((out, measure))
}

/// Rows, prompt tokens and padding positions of a job's prompt batch (contexts for scoring):
/// the shape [`CallMeasure`] reports, for callers that time a job some other way.
pub fn prompt_batch_shape(job: &Job) -> (usize, u64, u64) {
    let lens: Vec<u64> = match job {
        Job::Generate(r) => r.iter().map(|r| r.prompt.len() as u64).collect(),
        Job::Score(r) => r
            .iter()
            .map(|r| (r.context.len() + r.continuation.len()) as u64)
            .collect(),
        Job::ScoreChoices(r) => r.iter().map(|r| r.context.len() as u64).collect(),
        _ => Vec::new(),
    };
    let total: u64 = lens.iter().sum();
    let longest = lens.iter().copied().max().unwrap_or(0);
    (lens.len(), total, longest * lens.len() as u64 - total)
}
