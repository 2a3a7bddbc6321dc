//! `--verify N`: re-executes a sample of logged model steps from their recorded inputs and
//! seeds, and checks the outputs are identical.
//!
//! A model step's output depends on what shared its batch, so the check rebuilds the step's
//! whole chunk exactly as the engine formed it — the stage's inputs of that epoch, planned,
//! sorted by key, grouped and cut by `batch` — runs it (following multi-call tasks to their
//! end) on a fresh model worker, and compares every output with the logged event. Stages on
//! models that the run itself trains (the SFT model, the PM, the RL policy) cannot be
//! re-executed from the log without retraining; they are reported as skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::operator::{Built, Plan, chunks, model_job, split_reply};
use super::{EngineError, model_factories, stage_context};
use crate::constitution::Constitution;
use crate::log::LogReader;
use crate::record::{Envelope, Key};
use crate::spec::Spec;
use crate::stages::{Rec, Stage, Task};
use crate::worker::{ModelWorker, WorkerOptions};

/// What a verification found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Outputs re-executed and compared.
    pub checked: usize,
    /// Chunks (model calls) re-executed.
    pub chunks: usize,
    /// Outputs that differ: key, stage, what differs.
    pub diverged: Vec<(Key, String, String)>,
    /// Stages left out because their model is trained during the run.
    pub skipped: Vec<String>,
}

fn rec(env: &Envelope) -> Rec {
    Rec {
        key: env.key,
        parents: env.parents.clone(),
        stage: env.stage.clone(),
        payload: env.payload.clone(),
    }
}

/// Re-executes about `n` logged model steps of the run in `log` (see the module docs).
/// `base` resolves the recorded spec's relative paths for logs that do not record where the
/// spec was. `models` replaces model paths by name, as `cairn run --model NAME=PATH` did for
/// the run (the recorded spec is the file as written, without the run's overrides).
pub fn verify(
    log: &Path,
    n: usize,
    base: Option<&Path>,
    models: &[(String, PathBuf)],
) -> Result<VerifyReport, EngineError> {
    let (_, text, source) = super::fork::recorded_run(log)?;
    let recorded = source.is_some();
    let spec_path = match (base, source) {
        (Some(b), _) => b.join("spec.toml"),
        (None, Some(s)) => s,
        (None, None) => PathBuf::from("spec.toml"),
    };
    let mut spec = Spec::parse(&text, &spec_path).map_err(|e| EngineError::Input(e.to_string()))?;
    for (name, path) in models {
        spec.set_model_path(name, path.clone())
            .map_err(|e| EngineError::Input(format!("--model {name}=…: recorded spec {e}")))?;
    }
    let constitution = Arc::new(Constitution::load(&spec.constitution).map_err(|e| {
        EngineError::Input(if recorded {
            e.to_string()
        } else {
            format!("{e} (this log does not record where its spec was: pass --base DIR)")
        })
    })?);
    let ctx = stage_context(&spec, constitution)?;
    let plan = Plan::build(&spec, &ctx, &crate::stages::registry())?;
    // Models the run trains, and the model stages that use them.
    let trained = plan.trained_models();
    let changing = plan.weights_change();
    let looped = plan.looped();
    let mut report = VerifyReport::default();
    let mut stages: BTreeMap<String, (&dyn Stage, usize, Vec<String>)> = BTreeMap::new();
    for built in &plan.stages {
        if let Built::Model {
            name, stage, batch, ..
        } = built
        {
            let models = stage.models();
            if looped.contains(name) || models.iter().any(|m| trained.contains(m)) {
                report.skipped.push(name.clone());
            } else {
                stages.insert(name.clone(), (&**stage, *batch, models));
            }
        }
    }
    // Every event by key; the verifiable outputs by (stage, epoch).
    let mut by_key: HashMap<Key, Envelope> = HashMap::new();
    let mut groups: BTreeMap<(String, u64), Vec<Key>> = BTreeMap::new();
    for env in LogReader::open(log)?.iter_from(0) {
        let env = env?;
        if stages.contains_key(&env.stage) {
            groups
                .entry((env.stage.clone(), env.epoch))
                .or_default()
                .push(env.key);
        }
        by_key.insert(env.key, env);
    }
    let mut candidates: Vec<(Key, String, u64)> = groups
        .iter()
        .flat_map(|((s, e), keys)| keys.iter().map(move |k| (*k, s.clone(), *e)))
        .collect();
    candidates.sort_by_key(|c| c.0);
    if candidates.is_empty() || n == 0 {
        return Ok(report);
    }
    let step = (candidates.len() / n).max(1);
    let chosen: Vec<(Key, String, u64)> = candidates.into_iter().step_by(step).take(n).collect();
    let needed: HashSet<String> = chosen
        .iter()
        .flat_map(|(_, s, _)| stages[s].2.clone())
        .collect();
    let worker = ModelWorker::spawn(
        model_factories(&spec, Some(&needed), &changing),
        WorkerOptions {
            merge: false,
            ..WorkerOptions::default()
        },
    )?;
    let handle = worker.handle();
    let mut done_chunks: HashSet<Vec<Key>> = HashSet::new();
    for (key, stage_name, epoch) in &chosen {
        let (stage, batch, _) = stages[stage_name];
        // The stage's inputs at that epoch, in the order the engine would plan them.
        let mut inputs: Vec<Key> = groups[&(stage_name.clone(), *epoch)]
            .iter()
            .filter_map(|k| by_key.get(k).and_then(|e| e.parents.first().copied()))
            .collect();
        inputs.sort();
        inputs.dedup();
        let mut tasks: Vec<Task> = Vec::new();
        for input in inputs {
            let Some(env) = by_key.get(&input) else {
                continue;
            };
            tasks.extend(stage.plan(&rec(env))?);
        }
        tasks.sort_by_key(|t| t.key);
        let Some(chunk) = chunks(tasks, batch)
            .into_iter()
            .find(|c| c.iter().any(|t| t.key == *key))
        else {
            report.diverged.push((
                *key,
                stage_name.clone(),
                "planning its inputs again does not produce it".into(),
            ));
            continue;
        };
        if !done_chunks.insert(chunk.iter().map(|t| t.key).collect()) {
            continue;
        }
        let mut queue = vec![chunk];
        while let Some(chunk) = queue.pop() {
            let Some((model, job)) = model_job(stage_name, &chunk)? else {
                continue;
            };
            report.chunks += 1;
            let replies = split_reply(stage_name, &chunk, handle.call(&model, job))?;
            let mut going = Vec::new();
            for (mut task, reply) in chunk.into_iter().zip(replies) {
                if let Some(work) = stage.more(&task, &reply)? {
                    task.history.push(reply);
                    task.work = work;
                    going.push(task);
                    continue;
                }
                report.checked += 1;
                let again = stage.complete(&task, reply)?;
                match by_key.get(&task.key) {
                    Some(logged) if logged.payload == again => {}
                    Some(logged) => report.diverged.push((
                        task.key,
                        stage_name.clone(),
                        format!(
                            "logged {} but re-executed {}",
                            logged.payload.to_json(),
                            again.to_json()
                        ),
                    )),
                    None => report.diverged.push((
                        task.key,
                        stage_name.clone(),
                        "not in the log".into(),
                    )),
                }
            }
            queue.extend(chunks(going, batch));
        }
    }
    Ok(report)
}
