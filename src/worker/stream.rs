//! Continuous batching across jobs: a generation job for a model with a row limit
//! (`decode_rows`) starts a [`Decoder`], and generation jobs for the same model
//! that arrive while it runs join it as rows free up, instead of waiting for the whole call
//! to end. Each job is answered as soon as its last request finishes, so the stage that sent
//! it goes on while the rows it left are filled by others.
//!
//! Jobs join only where that cannot change a record: on kernels whose rows are
//! bit-for-bit independent of their batch-mates (`Llama::batch_invariant`), or where the
//! run allows merged calls anyway (`WorkerOptions::merge`). A job joins only while nothing
//! older that cannot join (a training step, another model's call) waits, so streaming never
//! starves other work.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crossbeam_channel::Receiver;

use crate::model::ModelError;
use crate::model::decoder::Decoder;
use crate::model::generate::Generation;

use super::{
    Backend, Job, JobOutput, Message, ServedModel, Submission, WorkerOptions, WorkerStats,
    panic_message, respond, stats_now,
};

/// The decoder `batch` (generation jobs for one model, merged as the worker formed them)
/// should run on, if it streams: a real model with a row limit, under the conditions in
/// the module documentation.
pub(super) fn streams<'m>(
    models: &'m HashMap<String, ServedModel>,
    batch: &[Submission],
    opts: &WorkerOptions,
) -> Option<&'m ServedModel> {
    let first = batch.first()?;
    if !matches!(first.job, Job::Generate(_)) {
        return None;
    }
    let served = models.get(&first.model)?;
    match &served.backend {
        Backend::Llama(m) if m.decode_rows().is_some() && (opts.merge || m.batch_invariant()) => {
            Some(served)
        }
        _ => None,
    }
}

/// A job being decoded: its submission, where its requests' ids start, their generations
/// so far, and how many are still running.
struct Running {
    submission: Submission,
    first: usize,
    outputs: Vec<Option<Generation>>,
    left: usize,
}

/// Runs `batch` and every generation job for the same model that can join it, until the
/// decoder is idle. Messages that arrive meanwhile are answered (statistics) or queued in
/// `pending`, oldest first.
pub(super) fn serve_streaming(
    served: &ServedModel,
    models: &HashMap<String, ServedModel>,
    batch: Vec<Submission>,
    rx: &Receiver<Message>,
    pending: &mut Vec<Submission>,
    stats: &mut WorkerStats,
) {
    let Backend::Llama(model) = &served.backend else {
        // `streams` picks only real models; answer rather than drop, whatever happens.
        for s in batch {
            respond(
                s,
                Err(ModelError::InvalidRequest(
                    "streaming needs a real model".into(),
                )),
            );
        }
        return;
    };
    let Some(name) = batch.first().map(|s| s.model.clone()) else {
        return;
    };
    let mut decoder = Decoder::new(model, &served.eos);
    let mut running: Vec<Running> = Vec::new();
    stats.batches += 1;
    for s in batch {
        admit(&mut decoder, &mut running, s, stats);
    }
    loop {
        if decoder.has_room() {
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    Message::Work(s) => pending.push(s),
                    Message::Stats(tx) => {
                        let _ = tx.send(stats_now(stats, models));
                    }
                }
            }
            // Oldest first, and only up to the first job that cannot join.
            while pending
                .first()
                .is_some_and(|s| s.model == name && matches!(s.job, Job::Generate(_)))
            {
                let s = pending.remove(0);
                admit(&mut decoder, &mut running, s, stats);
            }
        }
        if decoder.is_idle() {
            return;
        }
        let started = std::time::Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| decoder.step()));
        stats.busy_ns += started.elapsed().as_nanos() as u64;
        let finished = match outcome {
            Ok(Ok(finished)) => finished,
            Ok(Err(e)) => return fail_all(running, &e.to_string(), stats),
            Err(panic) => return fail_all(running, &panic_message(panic), stats),
        };
        for (id, generation) in finished {
            let Some(at) = running
                .iter()
                .position(|r| (r.first..r.first + r.outputs.len()).contains(&id))
            else {
                continue;
            };
            let job = &mut running[at];
            job.outputs[id - job.first] = Some(generation);
            job.left -= 1;
            if job.left == 0 {
                let done = running.remove(at);
                let outputs: Vec<Generation> = done.outputs.into_iter().flatten().collect();
                stats.jobs += 1;
                respond(done.submission, Ok(JobOutput::Generated(outputs)));
            }
        }
    }
}

/// Queues a job's requests in the decoder; a job the decoder refuses (a bad request) is
/// answered with the error alone, and an empty one at once.
fn admit(
    decoder: &mut Decoder<'_>,
    running: &mut Vec<Running>,
    s: Submission,
    stats: &mut WorkerStats,
) {
    let Job::Generate(requests) = &s.job else {
        return;
    };
    if requests.is_empty() {
        stats.jobs += 1;
        respond(s, Ok(JobOutput::Generated(Vec::new())));
        return;
    }
    stats.sequences += requests.len() as u64;
    match decoder.add(requests) {
        Ok(first) => {
            let n = requests.len();
            running.push(Running {
                submission: s,
                first,
                outputs: vec![None; n],
                left: n,
            });
        }
        Err(e) => {
            stats.jobs += 1;
            respond(s, Err(e));
        }
    }
}

/// A failed step fails every job in the decoder (their rows shared it), each with the
/// error's message.
fn fail_all(running: Vec<Running>, message: &str, stats: &mut WorkerStats) {
    for r in running {
        stats.jobs += 1;
        respond(
            r.submission,
            Err(ModelError::InvalidRequest(format!(
                "generation failed: {message}"
            ))),
        );
    }
}
