//! The driver of one timely worker, the same whether the run has one worker or many: build
//! the dataflow from the plan, feed this worker's share of the prompts epoch by epoch with
//! at most `LAG` epochs in flight, keep going in follow mode, and step the dataflow to its
//! end. A single-worker run is a cluster of one: it owns every epoch.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandle, ProbeHandle};

use super::operator::{Env, Plan, Shared};
use super::{EngineError, Progress, RunOptions, RunSummary, load_prompts};
use crate::log::LogWriter;
use crate::record::{Key, NewEvent};
use crate::spec::Spec;
use crate::stages::Rec;

/// Epochs fed ahead of the slowest streaming stage: bounded memory while streaming.
const LAG: u64 = 2;

/// What one worker feeds.
pub(super) struct Feed<'a> {
    /// Every prompt of the run, in feeding order.
    pub prompts: Vec<Rec>,
    /// This worker's index and the number of workers: it feeds epochs `e` with
    /// `e mod peers == index`.
    pub index: usize,
    /// Workers in the run.
    pub peers: usize,
    /// Prompts per epoch.
    pub epoch_size: usize,
    /// Follow mode: re-read this spec's prompt files for new prompts until stopped.
    pub follow: Option<&'a Spec>,
}

/// Runs `plan` on `timely_worker`: its share of the prompts goes in, each logged as a
/// `prompts` event before it is sent, and the dataflow runs until every stage is done.
pub(super) fn drive(
    timely_worker: &mut timely::worker::Worker,
    plan: Plan,
    env: Env,
    writer: &LogWriter,
    feed: Feed<'_>,
    opts: &RunOptions,
) -> Result<RunSummary, EngineError> {
    let (run_id, epoch_size) = (env.run_id, feed.epoch_size);
    let mut input: InputHandle<u64, CapacityContainerBuilder<Vec<Rec>>> = InputHandle::new();
    let probe: ProbeHandle<u64> = ProbeHandle::new();
    // Where the lag is measured: before the first gated stage (which holds its inputs until
    // an earlier stage finishes), or at the end.
    let lag_probe: ProbeHandle<u64> = ProbeHandle::new();
    let shared = Shared::default();
    {
        let (input_ref, probe_ref, lag_ref, shared_in) = (&mut input, &probe, &lag_probe, &shared);
        timely_worker.dataflow::<u64, _, _>(move |scope| {
            let stream = input_ref.to_stream(scope);
            let (out, lag_point) = plan.attach(stream, &env, shared_in);
            out.probe_with(probe_ref);
            lag_point.probe_with(lag_ref);
        });
    }
    let stopped = || opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    let mut last_report = Instant::now();
    let mut report = |shared: &Shared, fed: u64, known: u64, force: bool| {
        if let Some(cb) = &opts.progress
            && (force || last_report.elapsed() >= Duration::from_millis(200))
        {
            last_report = Instant::now();
            cb(&Progress {
                prompts_fed: fed,
                prompts_known: known,
                stages: shared.stats(),
            });
        }
    };
    let (mut fed, mut epoch) = (0u64, 0u64);
    let mut known = feed.prompts.len() as u64;
    let mut fed_keys: std::collections::HashSet<Key> = std::collections::HashSet::new();
    let mut batch = feed.prompts;
    loop {
        for chunk in batch.chunks(epoch_size) {
            if stopped() {
                break;
            }
            if epoch as usize % feed.peers == feed.index {
                let events: Vec<NewEvent> = chunk
                    .iter()
                    .map(|r| {
                        NewEvent::new(r.key, run_id, "prompts", vec![], epoch, r.payload.clone())
                    })
                    .collect();
                writer.append_batch(events)?;
                for rec in chunk {
                    fed_keys.insert(rec.key);
                    input.send(rec.clone());
                }
                fed += chunk.len() as u64;
            }
            epoch += 1;
            input.advance_to(epoch);
            while lag_probe.less_than(&epoch.saturating_sub(LAG)) {
                timely_worker.step_or_park(Some(Duration::from_millis(20)));
                shared.check()?;
                report(&shared, fed, known, false);
            }
        }
        let Some(spec) = feed.follow.filter(|_| !stopped()) else {
            break;
        };
        // Follow mode: keep working, and pick up prompts appended to the files.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline && !stopped() {
            timely_worker.step_or_park(Some(Duration::from_millis(50)));
            shared.check()?;
            report(&shared, fed, known, false);
        }
        batch = load_prompts(spec)?
            .into_iter()
            .filter(|r| !fed_keys.contains(&r.key))
            .collect();
        known += batch.len() as u64;
    }
    let interrupted = stopped();
    drop(input);
    while !probe.done() {
        timely_worker.step_or_park(Some(Duration::from_millis(20)));
        shared.check()?;
        report(&shared, fed, known, false);
    }
    report(&shared, fed, known, true);
    shared.check()?;
    Ok(RunSummary {
        run_id,
        stages: shared.stats(),
        prompts: fed,
        checkpoints: shared.checkpoints(),
        interrupted,
        aggregates: shared.aggregates(),
        wall_seconds: 0.0,
        model_seconds: 0.0,
        prefill: Default::default(),
        decode: Default::default(),
    })
}
