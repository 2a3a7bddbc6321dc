//! The same dataflow on many timely workers: threads of one process and processes over TCP.
//!
//! - **Sharding.** Prompts are cut into the same epochs as on one worker (key order); epoch
//!   `e` is fed by worker `e mod W`, and each distributed stage processes it there. A chunk is
//!   still an epoch's tasks in key order, so every model call — and every event — is the one a
//!   single worker would make: the event set does not depend on the number of workers.
//! - **Central stages** run on worker 0, their input exchanged there: training stages (they
//!   need every epoch, in order, and own the weights they train), gated stages, the PPO loop,
//!   and stages using a model the run trains. Gradients are therefore never all-reduced: one
//!   trainer owns each trained model (see `ARCHITECTURE.md` for why).
//! - **Logs.** Each worker appends to its own partition `LOG/part-NNNN` (NNNN = global worker
//!   index); readers treat the partitions as one log, and resume loads all of them.
//! - **Models.** Every worker has its own model worker, on `cuda:(local index mod devices)`
//!   when the run asks for CUDA, else the CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    EngineError, RunOptions, RunSummary, load_prompts, model_factories, operator, settings_digest,
    stage_context,
};
use crate::constitution::Constitution;
use crate::log::{LogOptions, LogWriter, SyncPolicy};
use crate::record::{Key, RunId};
use crate::spec::Spec;
use crate::stages::{Rec, StageKind};
use crate::worker::{ModelWorker, WorkerOptions};

/// Where a run's workers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Worker threads per process.
    pub workers: usize,
    /// This process's index.
    pub process: usize,
    /// `host:port` of every process (one entry: a single process).
    pub hosts: Vec<String>,
    /// Shared secret every process must prove it holds when the links open (`links`);
    /// without one, the settings digest keeps other runs out but protects nothing.
    pub secret: Option<Vec<u8>>,
}

impl Cluster {
    /// Workers in all processes.
    pub fn total(&self) -> usize {
        self.workers * self.hosts.len().max(1)
    }

    /// Reads a hosts file: one `host:port` per line (blank lines and `#` comments skipped).
    pub fn read_hosts(path: &Path) -> Result<Vec<String>, EngineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Input(format!("{}: {e}", path.display())))?;
        let mut hosts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if !line.contains(':') {
                return Err(EngineError::Input(format!(
                    "{}:{}: expected host:port, found `{line}`",
                    path.display(),
                    i + 1
                )));
            }
            hosts.push(line.to_string());
        }
        if hosts.is_empty() {
            return Err(EngineError::Input(format!(
                "{}: no host:port lines",
                path.display()
            )));
        }
        Ok(hosts)
    }
}

/// The partition of global worker `index`.
pub fn partition_dir(log: &Path, index: usize) -> PathBuf {
    log.join(format!("part-{index:04}"))
}

/// Runs `spec` on the workers of `cluster` (this process's share of them).
pub fn run_cluster(
    spec: &Spec,
    opts: &RunOptions,
    kinds: &[StageKind],
    cluster: &Cluster,
) -> Result<RunSummary, EngineError> {
    if spec.prompts.follow {
        return Err(EngineError::Input(
            "follow mode runs on one worker (drop --workers/--processes)".into(),
        ));
    }
    if cluster.workers == 0 || cluster.process >= cluster.hosts.len().max(1) {
        return Err(EngineError::Input(format!(
            "cluster: {} worker(s) per process, process {} of {}",
            cluster.workers,
            cluster.process,
            cluster.hosts.len()
        )));
    }
    let constitution = Arc::new(
        Constitution::load(&spec.constitution).map_err(|e| EngineError::Input(e.to_string()))?,
    );
    let prompts = load_prompts(spec)?;
    let digest = settings_digest(spec, &constitution)?;
    let ctx = stage_context(spec, constitution)?;
    let mut check = operator::Plan::build(spec, &ctx, kinds)?;
    let central = check.centralise();
    drop(check);
    std::fs::create_dir_all(&opts.log)
        .map_err(|e| EngineError::Input(format!("{}: {e}", opts.log.display())))?;
    if crate::log::partitions(&opts.log)?.first() == Some(&opts.log) {
        return Err(EngineError::Input(format!(
            "{}: this log was written by a single worker; continue it without --workers/--processes",
            opts.log.display()
        )));
    }
    // Everything logged so far, in every partition: what resume re-emits.
    let (done, previous) = if crate::log::partitions(&opts.log)?.is_empty() {
        (HashMap::new(), None)
    } else {
        super::logged(&opts.log)?
    };
    // Every process must agree on the run id without talking: it depends only on the settings
    // and on the run it continues.
    let run_id = match previous {
        Some((id, d)) if d == digest => id,
        Some((_, d)) if !opts.new_run => {
            return Err(EngineError::SettingsChanged {
                log: opts.log.clone(),
                old: d,
                new: digest,
            });
        }
        Some((old, _)) => RunId(Key::builder("run").u128(digest).u128(old.0).finish().0),
        None => RunId(Key::builder("run").u128(digest).str("cluster").finish().0),
    };
    tracing::info!(
        workers = cluster.total(),
        central = central.join(", "),
        "multi-worker run: central stages run on worker 0"
    );
    // The links are opened and authenticated here, before timely reads a byte from them.
    let (builders, comms) = if cluster.hosts.len() > 1 {
        use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
        use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
        let key = super::links::LinkKey::new(cluster.secret.as_deref(), digest);
        super::links::install_failure_report(cluster.hosts.clone(), cluster.process);
        let sockets = super::links::connect(&cluster.hosts, cluster.process, &key)?;
        let hooks = timely::communication::Hooks::default();
        let local = ProcessBuilder::new_typed_vector(
            cluster.workers,
            hooks.refill.clone(),
            hooks.spill.clone(),
        );
        let (tcp, guard) = initialize_networking_from_sockets(
            local,
            sockets,
            cluster.process,
            cluster.workers,
            hooks,
        )
        .map_err(|e| EngineError::Input(format!("cluster links: {e}")))?;
        let builders: Vec<AllocatorBuilder> = tcp.into_iter().map(AllocatorBuilder::Tcp).collect();
        let guard: Box<dyn std::any::Any + Send> = Box::new(guard);
        (builders, guard)
    } else {
        timely::CommunicationConfig::Process(cluster.workers)
            .try_build()
            .map_err(|e| EngineError::Input(format!("starting timely workers: {e}")))?
    };
    let done = Arc::new(done);
    let spec = Arc::new(spec.clone());
    let kinds: Vec<StageKind> = kinds.to_vec();
    let opts_shared = opts.clone();
    let ctx_shared = ctx.clone();
    let prompts = Arc::new(prompts);
    let busy = Arc::new(Mutex::new(0u64));
    let busy_in = Arc::clone(&busy);
    let wall = std::time::Instant::now();
    let guards = timely::execute::execute_from(
        builders,
        comms,
        timely::WorkerConfig::default(),
        move |timely_worker| {
            run_worker(
                timely_worker,
                &spec,
                &opts_shared,
                &kinds,
                &ctx_shared,
                &done,
                &prompts,
                run_id,
                digest,
                &busy_in,
            )
        },
    )
    .map_err(|e| EngineError::Input(format!("starting timely workers: {e}")))?;
    let mut summary = RunSummary {
        run_id,
        ..RunSummary::default()
    };
    for result in guards.join() {
        let part = result.map_err(|e| EngineError::Input(format!("worker failed: {e}")))??;
        summary.prompts += part.prompts;
        summary.interrupted |= part.interrupted;
        summary.checkpoints.extend(part.checkpoints);
        for (stage, s) in part.stages {
            let into = summary.stages.entry(stage).or_default();
            into.computed += s.computed;
            into.replayed += s.replayed;
            into.jobs += s.jobs;
            into.skipped += s.skipped;
            into.recomputed += s.recomputed;
            into.diverged += s.diverged;
        }
        for (k, n) in part.aggregates {
            let into = summary.aggregates.entry(k).or_insert(0);
            *into = (*into).max(n);
        }
        // Each timely worker has its own model worker: their prefills add up.
        for (model, p) in part.prefill {
            let into = summary.prefill.entry(model).or_default();
            into.computed += p.computed;
            into.reused += p.reused;
            into.nanos += p.nanos;
        }
        for (model, d) in part.decode {
            let into = summary.decode.entry(model).or_default();
            into.steps += d.steps;
            into.rows += d.rows;
            into.nanos += d.nanos;
        }
    }
    summary.wall_seconds = wall.elapsed().as_secs_f64();
    summary.model_seconds = *busy.lock().unwrap_or_else(|p| p.into_inner()) as f64 / 1e9;
    Ok(summary)
}

/// One timely worker: its partition, its model worker, its share of the epochs.
#[allow(clippy::too_many_arguments)]
fn run_worker(
    timely_worker: &mut timely::worker::Worker,
    spec: &Spec,
    opts: &RunOptions,
    kinds: &[StageKind],
    ctx: &crate::stages::StageContext,
    done: &Arc<HashMap<Key, Rec>>,
    prompts: &[Rec],
    run_id: RunId,
    digest: u128,
    busy: &Mutex<u64>,
) -> Result<RunSummary, EngineError> {
    let index = timely_worker.index();
    let peers = timely_worker.peers();
    let mut plan = operator::Plan::build(spec, ctx, kinds)?;
    plan.centralise();
    let part = partition_dir(&opts.log, index);
    let writer = LogWriter::open(
        &part,
        LogOptions {
            sync: SyncPolicy::Interval(Duration::from_millis(20)),
            ..LogOptions::default()
        },
    )?;
    // The run's bookkeeping lives in worker 0's partition (readers merge partitions).
    if index == 0 {
        super::append_run_events(&writer, spec, run_id, digest, opts.parent)?;
    }
    // This worker's device: the machine's CUDA devices shared round-robin by the worker's
    // index within its process.
    let local = opts
        .cluster
        .as_ref()
        .map(|c| index % c.workers.max(1))
        .unwrap_or(0);
    let device = match opts.device {
        tch::Device::Cuda(_) => {
            let count = tch::Cuda::device_count().max(1) as usize;
            tch::Device::Cuda(local % count)
        }
        other => other,
    };
    let model_worker = ModelWorker::spawn(
        model_factories(spec, None, &plan.weights_change()),
        WorkerOptions {
            device,
            merge: spec.merge_model_calls,
            ..WorkerOptions::default()
        },
    )?;
    let handle = model_worker.handle();
    let before = handle.stats()?;
    let busy_before = before.busy_ns;
    let env = operator::Env {
        writer: writer.clone(),
        worker: handle.clone(),
        done: Arc::clone(done),
        run_id,
        checkpoint_dir: opts.log.join("checkpoints"),
        tokenizers: ctx.tokenizers.clone(),
    };
    let feed = super::driver::Feed {
        prompts: prompts.to_vec(),
        index,
        peers,
        epoch_size: spec.prompts.epoch_size,
        follow: None,
    };
    let mut summary = super::driver::drive(timely_worker, plan, env, &writer, feed, opts)?;
    let after = handle.stats()?;
    summary.prefill = super::prefill_during(&before, &after);
    summary.decode = super::decode_during(&before, &after);
    let spent = after.busy_ns - busy_before;
    *busy.lock().unwrap_or_else(|p| p.into_inner()) += spent;
    writer.close()?;
    drop(model_worker);
    Ok(summary)
}
