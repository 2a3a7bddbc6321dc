//! `cairn eval` (model against model, judged by the feedback model), `cairn report` (a static
//! HTML page of a run's metrics, throughput and lineages) and `cairn watch` (a live terminal
//! view of a running job, read from its log as it grows).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use cairn::engine::RunOptions;
use cairn::eval::{EvalOptions, HARMLESS_PRINCIPLES, HELPFUL_PRINCIPLES};
use cairn::record::Payload;

/// Arguments of `cairn eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model A: GGUF file, model or checkpoint directory, or `default`.
    #[arg(long)]
    a: String,
    /// Model B.
    #[arg(long)]
    b: String,
    /// The judge: never model A or B (default: the fetched feedback model, `scripts/setup
    /// --feedback`).
    #[arg(long, default_value = "feedback")]
    judge: String,
    /// Run the judge in f32 instead of bfloat16.
    #[arg(long)]
    judge_f32: bool,
    /// A training run's log: its prompts are left out by text (repeatable).
    #[arg(long = "exclude-log")]
    exclude_log: Vec<PathBuf>,
    /// Do not ask the judge whether each answer is evasive.
    #[arg(long)]
    no_assess: bool,
    /// Summarise what the log holds so far (an evaluation stopped before its end) without
    /// running anything or writing to the log.
    #[arg(long)]
    summarise_only: bool,
    /// Red-team prompt files (`default`: the fetched sets).
    #[arg(long = "prompts", default_value = "default")]
    prompts: Vec<String>,
    /// Helpful prompt files (`default`: the fetched sets; `none`: no helpful prompts).
    #[arg(long = "helpful", default_value = "default")]
    helpful: Vec<String>,
    /// At most this many red-team prompts.
    #[arg(long, default_value_t = 8)]
    limit: usize,
    /// At most this many helpful prompts.
    #[arg(long, default_value_t = 4)]
    helpful_limit: usize,
    /// Skip this many red-team prompts first (e.g. those used in training).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Skip this many helpful prompts first.
    #[arg(long, default_value_t = 0)]
    helpful_skip: usize,
    /// Constitution with the comparison principles.
    #[arg(long, default_value = "constitutions/default.toml")]
    constitution: PathBuf,
    /// Principles per judgement.
    #[arg(long, default_value_t = 1)]
    ensemble: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Event log of the evaluation (rerun to continue it).
    #[arg(long)]
    log: PathBuf,
    /// Also write the outcome as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Runs `cairn eval`.
pub fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let helpful: Vec<String> = args
        .helpful
        .iter()
        .filter(|h| h.as_str() != "none")
        .cloned()
        .collect();
    let opts = EvalOptions {
        a: args.a.clone(),
        b: args.b.clone(),
        judge: args.judge.clone(),
        constitution: args.constitution.clone(),
        red_team: args.prompts.clone(),
        helpful,
        red_team_limit: Some(args.limit),
        helpful_limit: Some(args.helpful_limit),
        red_team_skip: args.skip,
        helpful_skip: args.helpful_skip,
        ensemble: args.ensemble,
        few_shot: 2,
        max_new_tokens: args.max_new_tokens,
        temperature: 0.0,
        seed: 1,
        principles: strings(HARMLESS_PRINCIPLES),
        helpful_principles: strings(HELPFUL_PRINCIPLES),
        exclude_logs: args.exclude_log.clone(),
        assess: !args.no_assess,
        judge_bf16: !args.judge_f32,
    };
    let result = if args.summarise_only {
        cairn::eval::summarise_log(&opts, &args.log)
            .with_context(|| format!("reading {}", args.log.display()))?
    } else {
        cairn::eval::evaluate(
            &opts,
            &RunOptions::new(args.log.clone(), cairn::model::parse_device(&args.device)?),
        )
        .context("evaluating")?
        .0
    };
    print!("{}", describe(&result));
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The outcome as lines of text: overall, then per purpose with each model's answer quality.
fn describe(r: &cairn::record::EvalReportRecord) -> String {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let mut out = format!(
        "A = {}\nB = {}\njudge = {}\n{} comparisons ({} prompts left out as seen in training): \
         A {} / {} / {} (wins / ties / losses), win rate {} (95% CI {}–{}), Elo A {:.0} vs B {:.0}\n",
        r.model_a,
        r.model_b,
        r.judge,
        r.overall.comparisons,
        r.excluded_prompts,
        r.overall.wins,
        r.overall.ties,
        r.overall.losses,
        pct(r.overall.win_rate),
        pct(r.overall.ci95[0]),
        pct(r.overall.ci95[1]),
        r.elo[0],
        r.elo[1],
    );
    for p in &r.by_purpose {
        let t = &p.tally;
        out += &format!(
            "  {:<9} {:>4} comparisons: A {} / {} / {}, win rate {} (95% CI {}–{})\n",
            p.purpose,
            t.comparisons,
            t.wins,
            t.ties,
            t.losses,
            pct(t.win_rate),
            pct(t.ci95[0]),
            pct(t.ci95[1])
        );
        for (name, s) in [("A", &p.a), ("B", &p.b)] {
            out += &format!(
                "    {name}: degenerate {} (repetitive {}, meta {}), refusals {} (bare {}), judged evasive {}\n",
                pct(s.degenerate),
                pct(s.repetitive),
                pct(s.meta),
                pct(s.refusal),
                pct(s.bare_refusal),
                s.evasive_judged
                    .map(pct)
                    .unwrap_or_else(|| "not asked".into())
            );
        }
    }
    out
}

/// Arguments of `cairn report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Log directory.
    log: PathBuf,
    /// Folder for `index.html`.
    #[arg(long)]
    out: PathBuf,
    /// Also plot the outcomes of these `cairn eval` logs (repeatable).
    #[arg(long = "with", value_name = "EVAL_LOG")]
    with: Vec<PathBuf>,
}

/// Runs `cairn report`.
pub fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let extra: Vec<&std::path::Path> = args.with.iter().map(|p| p.as_path()).collect();
    let report = cairn::report::gather(&args.log, &extra)
        .with_context(|| format!("reading {}", args.log.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let page = args.out.join("index.html");
    std::fs::write(&page, cairn::report::render(&report, &args.log))
        .with_context(|| format!("writing {}", page.display()))?;
    println!(
        "{}: {} plots, {} stages, {} lineages{}",
        page.display(),
        report
            .series
            .iter()
            .filter(|s| !s.points.is_empty())
            .count(),
        report.throughput.len(),
        report.lineages.len(),
        if report.has_rl {
            ""
        } else {
            " (no RL records)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `cairn watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Log directory of a running (or finished) job.
    log: PathBuf,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
    /// Print one snapshot of everything logged so far and exit.
    #[arg(long)]
    once: bool,
}

#[derive(Default)]
struct StageView {
    total: u64,
    recent: u64,
}

/// Runs `cairn watch`.
pub fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let reader = cairn::log::LogReader::open(&args.log)
        .with_context(|| format!("opening {}", args.log.display()))?;
    // One follower per partition (a multi-worker run writes one per worker).
    let mut followers = reader
        .parts()
        .iter()
        .map(|p| cairn::log::LogReader::open(p).map(|r| r.follow(0)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut stages: BTreeMap<String, StageView> = BTreeMap::new();
    let mut wiring: Vec<(String, Vec<String>)> = Vec::new();
    let mut latest: BTreeMap<&'static str, String> = BTreeMap::new();
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let mut last = Instant::now();
    loop {
        let mut events = Vec::new();
        for f in &mut followers {
            events.extend(f.poll()?);
        }
        if events.is_empty() && !args.once {
            std::thread::sleep(Duration::from_millis(100).min(interval));
        }
        for env in &events {
            let view = stages.entry(env.stage.clone()).or_default();
            view.total += 1;
            view.recent += 1;
            match &env.payload {
                Payload::RunStarted(r) => {
                    if let Ok(spec) =
                        cairn::spec::Spec::parse(&r.settings, std::path::Path::new("spec.toml"))
                    {
                        wiring = spec
                            .stages
                            .iter()
                            .map(|s| (s.name.clone(), s.from.clone()))
                            .collect();
                    }
                }
                Payload::SftStep(s) => {
                    latest.insert("sft", format!("step {} loss {:.4}", s.step, s.loss));
                }
                Payload::PmStep(s) => {
                    latest.insert(
                        "pm",
                        format!("step {} loss {:.4} acc {:.2}", s.step, s.loss, s.accuracy),
                    );
                }
                Payload::PmEval(s) => {
                    latest.insert(
                        "pm held-out",
                        format!("acc {:.2} ece {:.3}", s.accuracy, s.ece),
                    );
                }
                Payload::PpoUpdate(u) => {
                    latest.insert(
                        "ppo",
                        format!(
                            "version {} reward {:.3} kl {:.3} len {:.1}{}",
                            u.version,
                            u.mean_reward,
                            u.kl,
                            u.response_length,
                            if u.over_optimisation.is_some() {
                                " OVER-OPTIMISING"
                            } else {
                                ""
                            }
                        ),
                    );
                }
                Payload::EvalResult(e) => {
                    latest.insert("eval", format!("A wins {:.1}%", 100.0 * e.win_rate_a));
                }
                Payload::EvalReport(e) => {
                    latest.insert(
                        "eval",
                        format!("A win rate {:.1}%", 100.0 * e.overall.win_rate),
                    );
                }
                _ => {}
            }
        }
        if args.once || last.elapsed() >= interval {
            let secs = last.elapsed().as_secs_f64().max(1e-9);
            if !args.once {
                print!("\x1b[2J\x1b[H");
            }
            let total: u64 = followers.iter().map(|f| f.next_offset()).sum();
            println!("cairn watch {} — {total} events", args.log.display());
            println!(
                "{:<14} {:>8} {:>9} {:>9}",
                "stage", "records", "per sec", "waiting"
            );
            for (name, view) in &stages {
                // Waiting: records of the stages it reads that it has not caught up with
                // (an upper bound: a stage may skip some of them).
                let waiting = wiring
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, from)| {
                        let upstream: u64 = from
                            .iter()
                            .map(|f| stages.get(f).map(|v| v.total).unwrap_or(0))
                            .sum();
                        upstream.saturating_sub(view.total).to_string()
                    })
                    .unwrap_or_else(|| "–".into());
                println!(
                    "{name:<14} {:>8} {:>9.2} {:>9}",
                    view.total,
                    if args.once {
                        0.0
                    } else {
                        view.recent as f64 / secs
                    },
                    waiting
                );
            }
            for (what, value) in &latest {
                println!("{what:<14} {value}");
            }
            for view in stages.values_mut() {
                view.recent = 0;
            }
            last = Instant::now();
            if args.once {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}
