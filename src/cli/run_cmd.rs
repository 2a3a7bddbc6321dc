//! `cairn run SPEC --log DIR`: runs a dataflow; rerunning the same command on the same log
//! continues the run. `cairn stages` lists the stage kinds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;

use cairn::engine::{self, RunOptions};
use cairn::spec::Spec;

/// Arguments of `cairn run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The dataflow spec (`dataflows/*.toml`).
    spec: PathBuf,
    /// Event log directory (default: runs/<spec name>).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Start a new run in an existing log whose settings differ.
    #[arg(long)]
    new_run: bool,
    /// Load model NAME from PATH instead of the spec's path (repeatable), e.g.
    /// `--model policy=runs/sl-cai/checkpoints/sft-step3` to start RL-CAI from an SL-CAI
    /// checkpoint.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
    /// Feed the recorded events of another run's log in place of computing them: its events
    /// of `prompts` and of every stage named in this spec are copied into this run's log
    /// first, so stages with unchanged settings replay them and new or changed stages compute
    /// (develop a new stage against a finished run). Repeatable.
    #[arg(long = "reuse", value_name = "LOG")]
    reuse: Vec<PathBuf>,
    /// With `--reuse`: copy only `prompts` and the stages listed before STAGE in this spec,
    /// so STAGE and every stage after it run anew, as after `cairn fork --from STAGE`.
    /// Use it to retrain a stage whose reused events a state cannot restore (a log written
    /// before training states existed).
    #[arg(long = "recompute-from", value_name = "STAGE", requires = "reuse")]
    recompute_from: Option<String>,
    /// Timely worker threads in this process (each with its own model worker; the log is
    /// then partitioned, one `part-NNNN/` per worker).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Processes in the cluster (each started with the same command and its own
    /// --process-id); needs --hosts.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// This process's index in the cluster, from 0.
    #[arg(long, default_value_t = 0)]
    process_id: usize,
    /// File with one `host:port` per process, in process order.
    #[arg(long)]
    hosts: Option<PathBuf>,
    /// File holding the cluster's shared secret (every process must give the same one; the
    /// CAIRN_CLUSTER_SECRET environment variable is used when this is absent). Without a
    /// secret, processes of other runs are kept out but an attacker is not.
    #[arg(long, value_name = "FILE", requires = "hosts")]
    secret_file: Option<PathBuf>,
}

/// The shared secret of a cluster run: the file's bytes (surrounding whitespace trimmed), else
/// `CAIRN_CLUSTER_SECRET`, else none.
fn cluster_secret(file: Option<&std::path::Path>) -> anyhow::Result<Option<Vec<u8>>> {
    let secret = match file {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading the cluster secret {}", path.display()))?;
            bytes.trim_ascii().to_vec()
        }
        None => match std::env::var_os("CAIRN_CLUSTER_SECRET") {
            Some(v) => v.into_encoded_bytes().trim_ascii().to_vec(),
            None => return Ok(None),
        },
    };
    anyhow::ensure!(
        !secret.is_empty(),
        "the cluster secret is empty ({})",
        file.map_or("CAIRN_CLUSTER_SECRET".to_string(), |p| p
            .display()
            .to_string())
    );
    Ok(Some(secret))
}

/// Runs `cairn run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut spec = Spec::load(&args.spec)?;
    for (name, path) in super::model_overrides(&args.models)? {
        spec.set_model_path(&name, path)
            .map_err(|e| anyhow::anyhow!("--model {name}=…: {e}"))?;
    }
    let log = args
        .log
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&spec.name));
    let device = cairn::model::parse_device(&args.device)?;
    let cluster = match (&args.hosts, args.processes) {
        (_, 0) => anyhow::bail!("--processes must be at least 1"),
        (None, 1) => (args.workers > 1).then(|| engine::Cluster {
            workers: args.workers,
            process: 0,
            hosts: Vec::new(),
            secret: None,
        }),
        (None, _) => {
            anyhow::bail!("--processes above 1 needs --hosts FILE (one host:port per process)")
        }
        (Some(file), p) => {
            let hosts = engine::Cluster::read_hosts(file)?;
            anyhow::ensure!(
                hosts.len() == p,
                "{}: {} host(s) for --processes {p}",
                file.display(),
                hosts.len()
            );
            anyhow::ensure!(
                args.process_id < p,
                "--process-id {} is not below --processes {p}",
                args.process_id
            );
            Some(engine::Cluster {
                workers: args.workers.max(1),
                process: args.process_id,
                hosts,
                secret: cluster_secret(args.secret_file.as_deref())?,
            })
        }
    };
    if !args.reuse.is_empty() {
        // Refused before anything is copied: the copy would be root segments, which a
        // multi-worker run does not continue.
        anyhow::ensure!(
            cluster.as_ref().is_none_or(|c| c.total() <= 1),
            "--reuse copies into a single-worker log; run it without --workers/--processes \
             (then continue that log with one worker), or reuse into a new log first"
        );
        let upto = match &args.recompute_from {
            None => spec.stages.len(),
            Some(stage) => spec
                .stages
                .iter()
                .position(|s| &s.name == stage)
                .with_context(|| {
                    format!(
                        "--recompute-from {stage}: no such stage in {}",
                        args.spec.display()
                    )
                })?,
        };
        let names: std::collections::HashSet<String> = std::iter::once("prompts".to_string())
            .chain(spec.stages[..upto].iter().map(|s| s.name.clone()))
            .collect();
        for from in &args.reuse {
            let (copied, present) =
                engine::import_events(from, &log, |env| names.contains(&env.stage))
                    .with_context(|| format!("reusing {}", from.display()))?;
            println!(
                "reused {}: {copied} events copied ({present} already here)",
                from.display()
            );
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    install_signal_handlers(&stop);
    let started = std::time::Instant::now();
    let bars = Bars::new();
    let progress: engine::ProgressFn = {
        let bars = bars.clone();
        Arc::new(move |p: &engine::Progress| bars.update(p))
    };
    let summary = engine::run(
        &spec,
        &RunOptions {
            log: log.clone(),
            device,
            new_run: args.new_run,
            stop: Some(stop),
            progress: Some(progress),
            parent: None,
            cluster,
        },
    )
    .with_context(|| format!("running {}", args.spec.display()))?;
    bars.finish();
    println!(
        "run {} ({} prompts) in {:.1} s",
        summary.run_id,
        summary.prompts,
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<14} {:>9} {:>9} {:>6}",
        "stage", "computed", "replayed", "jobs"
    );
    for (stage, s) in &summary.stages {
        println!(
            "{stage:<14} {:>9} {:>9} {:>6}",
            s.computed, s.replayed, s.jobs
        );
    }
    for (stage, s) in &summary.stages {
        if s.skipped + s.recomputed > 0 {
            println!(
                "{stage}: {} training jobs restored from its saved state, {} run again \
                 ({} differ from their logged events)",
                s.skipped, s.recomputed, s.diverged
            );
        }
    }
    println!(
        "model calls {:.1} s of {:.1} s dataflow wall time ({:.1}% outside model calls)",
        summary.model_seconds,
        summary.wall_seconds,
        100.0 * summary.share_outside_model()
    );
    for (model, p) in &summary.prefill {
        println!(
            "prompt tokens prefilled by `{model}`: {} computed in {:.1} s, {} of shared \
             prefixes served from memory",
            p.computed,
            p.seconds(),
            p.reused
        );
    }
    for (model, d) in &summary.decode {
        println!(
            "decode steps of `{model}`: {} tokens in {:.1} s ({:.1} tok/s), {:.2} rows per step",
            d.rows,
            d.nanos as f64 / 1e9,
            d.tokens_per_second(),
            d.mean_rows()
        );
    }
    if !summary.aggregates.is_empty() {
        println!("records by stage and principle / purpose / kind:");
        for ((stage, label), n) in &summary.aggregates {
            println!("  {stage:<14} {label:<24} {n:>6}");
        }
    }
    println!("event log: {}", log.display());
    for c in &summary.checkpoints {
        println!("checkpoint: {c}");
    }
    if summary.interrupted {
        println!("interrupted: rerun the same command to continue");
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress bars on stderr (hidden when it is not a terminal): prompts fed with an ETA, and a
/// line per stage with outputs computed, replayed from the log, and the rate.
#[derive(Clone)]
struct Bars {
    multi: indicatif::MultiProgress,
    prompts: indicatif::ProgressBar,
    stages: Arc<std::sync::Mutex<std::collections::BTreeMap<String, indicatif::ProgressBar>>>,
}

impl Bars {
    fn new() -> Bars {
        let multi = indicatif::MultiProgress::with_draw_target(
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>12} {bar:30} {pos}/{len} prompts  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let prompts = multi.add(
            indicatif::ProgressBar::new(0)
                .with_style(style)
                .with_prefix("prompts"),
        );
        Bars {
            multi,
            prompts,
            stages: Arc::default(),
        }
    }

    fn update(&self, p: &engine::Progress) {
        self.prompts.set_length(p.prompts_known);
        self.prompts.set_position(p.prompts_fed);
        let mut stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        for (name, s) in &p.stages {
            let bar = stages.entry(name.clone()).or_insert_with(|| {
                let style = indicatif::ProgressStyle::with_template(
                    "{prefix:>12} {pos:>6} outputs  {per_sec}  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
                self.multi.add(
                    indicatif::ProgressBar::new_spinner()
                        .with_style(style)
                        .with_prefix(name.clone()),
                )
            });
            bar.set_position(s.computed + s.replayed);
            bar.set_message(format!(
                "({} replayed from the log, {} model jobs)",
                s.replayed, s.jobs
            ));
        }
    }

    fn finish(&self) {
        self.prompts.finish_and_clear();
        for bar in self
            .stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            bar.finish_and_clear();
        }
    }
}

/// SIGINT/SIGTERM set `stop`: the engine stops feeding prompts, finishes what is in flight,
/// flushes the log and returns. A second signal exits at once (the log stays consistent).
fn install_signal_handlers(stop: &Arc<AtomicBool>) {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(stop));
        let _ = signal_hook::flag::register(signal, Arc::clone(stop));
    }
}

/// Runs `cairn stages`.
pub fn stages() -> anyhow::Result<ExitCode> {
    for kind in cairn::stages::registry() {
        println!("{:<10} {}", kind.name, kind.about);
    }
    Ok(ExitCode::SUCCESS)
}
