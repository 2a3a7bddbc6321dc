//! `cairn report`: a static HTML page about a run, built from its events alone — a plot of
//! every metric over the run (SFT loss, PM accuracy and calibration, PPO reward, KL,
//! entropy, response length, evaluation win rates), per-stage throughput, and a few sample
//! lineages (prompt → answer → each critique and revision). Plots are inline SVG, so the
//! page is one self-contained file; a small script measures each drawn line once the page is
//! laid out (`data-drawn-width`), which is how the tests check a real browser rendered them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use crate::log::{LogError, LogReader};
use crate::record::{Envelope, Key, Payload};

/// One plotted series: (x, y) points in order.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Plot title.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// What the report shows.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The plots, in page order.
    pub series: Vec<Series>,
    /// Per stage: records, first and last wall-clock seconds (from the run's start).
    pub throughput: BTreeMap<String, (u64, f64, f64)>,
    /// A few lineages: each a list of (stage, kind, text) from the prompt down.
    pub lineages: Vec<Vec<(String, String, String)>>,
    /// Whether the run has RL records (judgements, PM steps, PPO updates).
    pub has_rl: bool,
    /// Events read.
    pub events: u64,
    /// Run ids seen.
    pub runs: Vec<String>,
    /// Evaluations read from the extra logs, in order.
    pub evals: Vec<crate::record::EvalReportRecord>,
    /// Answer quality per stage that writes answers (samples, revisions, pairs, rollouts).
    pub quality: BTreeMap<String, crate::quality::QualityCounts>,
    /// Per filter stage: (kept, dropped) training targets.
    pub targets: BTreeMap<String, (u64, u64)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Reads `log` (then each of `extra`, e.g. the logs of `cairn eval` runs of its checkpoints)
/// and gathers everything the page shows.
pub fn gather(log: &Path, extra: &[&Path]) -> Result<Report, LogError> {
    let mut by_key: HashMap<Key, Envelope> = HashMap::new();
    let mut order: Vec<Key> = Vec::new();
    let mut report = Report::default();
    let mut named: BTreeMap<&'static str, Series> = BTreeMap::new();
    let mut push = |id: &'static str, title: &str, x_label: &str, x: f64, y: f64| {
        let s = named.entry(id).or_insert_with(|| Series {
            title: title.to_string(),
            x_label: x_label.to_string(),
            points: Vec::new(),
        });
        if y.is_finite() {
            s.points.push((x, y));
        }
    };
    let mut start = None;
    let (mut judgements, mut evals) = (0u64, 0u64);
    let mut all = Vec::new();
    for path in std::iter::once(log).chain(extra.iter().copied()) {
        for env in LogReader::open(path)?.iter_from(0) {
            all.push((path == log, env?));
        }
    }
    for (main, env) in all {
        // Only the evaluation outcome of an extra log belongs in this run's page.
        if !main && !matches!(env.payload, Payload::EvalResult(_) | Payload::EvalReport(_)) {
            continue;
        }
        report.events += 1;
        let t0 = *start.get_or_insert(env.wall_ns);
        let t = env.wall_ns.saturating_sub(t0) as f64 / 1e9;
        let entry = report
            .throughput
            .entry(env.stage.clone())
            .or_insert((0, t, t));
        entry.0 += 1;
        entry.2 = t;
        if main {
            for answer in crate::quality::answers_of(&env.payload) {
                report
                    .quality
                    .entry(env.stage.clone())
                    .or_default()
                    .add(answer);
            }
            if let Payload::Target(t) = &env.payload {
                let e = report.targets.entry(env.stage.clone()).or_default();
                if t.kept { e.0 += 1 } else { e.1 += 1 }
            }
        }
        match &env.payload {
            Payload::RunStarted(_) => report.runs.push(env.run_id.to_string()),
            Payload::SftStep(s) => push(
                "a-sft-loss",
                "SFT training loss",
                "step",
                s.step as f64,
                s.loss,
            ),
            Payload::SftEval(s) => push(
                "b-sft-eval",
                "SFT held-out loss",
                "step",
                s.step as f64,
                s.loss,
            ),
            Payload::Judgement(j) => {
                report.has_rl = true;
                judgements += 1;
                push(
                    "c-label",
                    "AI-feedback soft label P(first answer better)",
                    "judgement",
                    judgements as f64,
                    j.p_a,
                );
            }
            Payload::PmStep(s) => {
                report.has_rl = true;
                push(
                    "d-pm-loss",
                    "Preference-model training loss",
                    "step",
                    s.step as f64,
                    s.loss,
                );
                push(
                    "e-pm-acc",
                    "Preference-model training accuracy",
                    "step",
                    s.step as f64,
                    s.accuracy,
                );
            }
            Payload::PmEval(s) => {
                report.has_rl = true;
                push(
                    "f-pm-eval-acc",
                    "Preference-model held-out accuracy",
                    "step",
                    s.step as f64,
                    s.accuracy,
                );
                push(
                    "g-pm-ece",
                    "Preference-model calibration error (ECE)",
                    "step",
                    s.step as f64,
                    s.ece,
                );
            }
            Payload::PpoUpdate(u) => {
                report.has_rl = true;
                let v = u.version as f64;
                push(
                    "h-reward",
                    "PPO mean reward (PM score − KL penalty)",
                    "policy version",
                    v,
                    u.mean_reward,
                );
                push(
                    "i-score",
                    "PPO mean preference-model score",
                    "policy version",
                    v,
                    u.mean_score,
                );
                push(
                    "j-kl",
                    "KL(policy ‖ reference) per answer",
                    "policy version",
                    v,
                    u.kl,
                );
                push(
                    "k-length",
                    "Mean response length (tokens)",
                    "policy version",
                    v,
                    u.response_length,
                );
                push(
                    "l-entropy",
                    "Policy entropy per token",
                    "policy version",
                    v,
                    u.entropy,
                );
                push(
                    "m-clip",
                    "PPO clip fraction",
                    "policy version",
                    v,
                    u.clip_fraction,
                );
            }
            Payload::EvalReport(e) => {
                evals += 1;
                push(
                    "n-win",
                    "Evaluation win rate of model A",
                    "evaluation",
                    evals as f64,
                    e.overall.win_rate,
                );
                report.evals.push(e.clone());
            }
            Payload::EvalResult(e) => {
                evals += 1;
                push(
                    "n-win",
                    "Evaluation win rate of model A",
                    "evaluation",
                    evals as f64,
                    e.win_rate_a,
                );
            }
            _ => {}
        }
        order.push(env.key);
        by_key.insert(env.key, env);
    }
    report.series = named.into_values().collect();
    // Lineages: the latest revisions (deepest rounds), traced back to their prompts.
    let mut ends: Vec<&Envelope> = order
        .iter()
        .filter_map(|k| by_key.get(k))
        .filter(|e| matches!(e.payload, Payload::Revision(_)))
        .collect();
    ends.sort_by_key(|e| match &e.payload {
        Payload::Revision(r) => std::cmp::Reverse(r.round),
        _ => std::cmp::Reverse(0),
    });
    for end in ends.into_iter().take(3) {
        let mut chain = Vec::new();
        let mut at = Some(end);
        while let Some(env) = at {
            let text = match &env.payload {
                Payload::Prompt(p) => p.text.clone(),
                Payload::Sample(s) => s.response.clone(),
                Payload::Critique(c) => format!("[{}] {}", c.principle, c.critique),
                Payload::Revision(r) => format!("[{}] {}", r.principle, r.response),
                other => other.to_json().to_string(),
            };
            chain.push((env.stage.clone(), env.payload.kind().to_string(), text));
            at = env.parents.first().and_then(|p| by_key.get(p));
        }
        chain.reverse();
        report.lineages.push(chain);
    }
    Ok(report)
}

/// An SVG line chart of `s` (points in data order), with axis ranges labelled.
fn chart(s: &Series, id: usize) -> String {
    let (w, h, pad) = (480.0, 220.0, 40.0);
    let xs = s.points.iter().map(|p| p.0);
    let ys = s.points.iter().map(|p| p.1);
    let (x0, x1) = (
        xs.clone().fold(f64::MAX, f64::min),
        xs.fold(f64::MIN, f64::max),
    );
    let (y0, y1) = (
        ys.clone().fold(f64::MAX, f64::min),
        ys.fold(f64::MIN, f64::max),
    );
    let span = |a: f64, b: f64| if (b - a).abs() < 1e-12 { 1.0 } else { b - a };
    let px = |x: f64| pad + (x - x0) / span(x0, x1) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y0) / span(y0, y1) * (h - 2.0 * pad);
    let mut points = String::new();
    for (x, y) in &s.points {
        let _ = write!(points, "{:.1},{:.1} ", px(*x), py(*y));
    }
    let mut dots = String::new();
    for (x, y) in &s.points {
        let _ = write!(
            dots,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"/>",
            px(*x),
            py(*y)
        );
    }
    format!(
        "<figure class=\"plot\" id=\"plot-{id}\" data-points=\"{n}\">\
<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#fbfbfb\" stroke=\"#ccc\"/>\
<line x1=\"{pad}\" y1=\"{hb}\" x2=\"{wr}\" y2=\"{hb}\" stroke=\"#888\"/>\
<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{hb}\" stroke=\"#888\"/>\
<text x=\"{pad}\" y=\"{ty}\" font-size=\"11\">{x0:.3}</text>\
<text x=\"{wr}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\">{x1:.3} ({xl})</text>\
<text x=\"4\" y=\"{hb}\" font-size=\"11\">{y0:.3}</text>\
<text x=\"4\" y=\"{pad}\" font-size=\"11\">{y1:.3}</text>\
<polyline class=\"series\" fill=\"none\" stroke=\"#1f5fa8\" stroke-width=\"2\" points=\"{points}\"/>\
<g fill=\"#1f5fa8\">{dots}</g></svg><figcaption>{title}</figcaption></figure>\n",
        n = s.points.len(),
        hb = h - pad,
        wr = w - pad,
        ty = h - pad + 16.0,
        xl = escape(&s.x_label),
        title = escape(&s.title),
    )
}

/// Renders the page.
pub fn render(report: &Report, log: &Path) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>cairn run report</title>\
<style>body{{font-family:sans-serif;max-width:1040px;margin:2em auto;color:#222}}\
figure.plot{{display:inline-block;margin:8px}}figcaption{{font-size:13px;text-align:center}}\
table{{border-collapse:collapse}}td,th{{border:1px solid #ddd;padding:4px 8px;text-align:right}}\
ol.lineage li{{margin:4px 0}}.kind{{color:#1f5fa8;font-weight:bold}}</style></head><body>\
<h1>cairn run report</h1><p>Log <code>{}</code>: {} events, run(s) {}.</p>",
        escape(&log.display().to_string()),
        report.events,
        escape(&report.runs.join(", "))
    );
    html.push_str("<h2>Metrics</h2>\n");
    let plotted: Vec<&Series> = report
        .series
        .iter()
        .filter(|s| !s.points.is_empty())
        .collect();
    if plotted.is_empty() {
        html.push_str("<p id=\"no-metrics\">This run has no metric events yet.</p>\n");
    }
    for (i, s) in plotted.iter().enumerate() {
        html.push_str(&chart(s, i));
    }
    if !report.has_rl {
        html.push_str(
            "<p id=\"no-rl\">No RL records in this run: no AI-feedback judgements, preference-model \
             steps or PPO updates (an SL-CAI-only run, or RL has not started yet).</p>\n",
        );
    }
    if !report.evals.is_empty() {
        html.push_str("<h2>Evaluations</h2><table id=\"evals\"><tr><th>A</th><th>B</th><th>judge</th><th>purpose</th><th>n</th><th>A wins / ties / losses</th><th>A win rate (95% CI)</th><th>degenerate A / B</th><th>bare refusals A / B</th><th>judged evasive A / B</th></tr>\n");
        for e in &report.evals {
            for p in &e.by_purpose {
                let pct = |x: f64| format!("{:.0}%", 100.0 * x);
                let judged = |s: &crate::record::AnswerShares| {
                    s.evasive_judged.map(pct).unwrap_or_else(|| "–".into())
                };
                let _ = writeln!(
                    html,
                    "<tr><td style=\"text-align:left\">{}</td><td style=\"text-align:left\">{}</td><td style=\"text-align:left\">{}</td><td>{}</td><td>{}</td><td>{} / {} / {}</td><td>{} ({}–{})</td><td>{} / {}</td><td>{} / {}</td><td>{} / {}</td></tr>",
                    escape(&e.model_a),
                    escape(&e.model_b),
                    escape(&e.judge),
                    escape(&p.purpose),
                    p.tally.comparisons,
                    p.tally.wins,
                    p.tally.ties,
                    p.tally.losses,
                    pct(p.tally.win_rate),
                    pct(p.tally.ci95[0]),
                    pct(p.tally.ci95[1]),
                    pct(p.a.degenerate),
                    pct(p.b.degenerate),
                    pct(p.a.bare_refusal),
                    pct(p.b.bare_refusal),
                    judged(&p.a),
                    judged(&p.b),
                );
            }
        }
        html.push_str("</table>\n");
    }
    if !report.quality.is_empty() {
        html.push_str("<h2>Answer quality by stage</h2><table id=\"quality\"><tr><th>stage</th><th>answers</th><th>degenerate</th><th>repetitive</th><th>meta-commentary</th><th>refusals</th><th>bare refusals</th><th>cut off</th><th>targets kept / dropped</th></tr>\n");
        for (stage, q) in &report.quality {
            let pct = |n: u64| format!("{:.0}%", 100.0 * q.share(n));
            let targets = report
                .targets
                .get(stage)
                .map(|(k, d)| format!("{k} / {d}"))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                html,
                "<tr><td style=\"text-align:left\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{targets}</td></tr>",
                escape(stage),
                q.answers,
                pct(q.degenerate),
                pct(q.repetitive),
                pct(q.meta),
                pct(q.refusals),
                pct(q.bare_refusals),
                pct(q.cut_off),
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("<h2>Throughput by stage</h2><table id=\"throughput\"><tr><th>stage</th><th>records</th><th>first (s)</th><th>last (s)</th><th>records/s</th></tr>\n");
    for (stage, (n, first, last)) in &report.throughput {
        let rate = if last > first {
            format!("{:.2}", *n as f64 / (last - first))
        } else {
            "–".into()
        };
        let _ = writeln!(
            html,
            "<tr><td style=\"text-align:left\">{}</td><td>{n}</td><td>{first:.1}</td><td>{last:.1}</td><td>{rate}</td></tr>",
            escape(stage)
        );
    }
    html.push_str("</table>\n<h2>Sample lineages</h2>\n");
    if report.lineages.is_empty() {
        html.push_str("<p>No revisions in this run.</p>\n");
    }
    for chain in &report.lineages {
        html.push_str("<ol class=\"lineage\">");
        for (stage, kind, text) in chain {
            let _ = write!(
                html,
                "<li><span class=\"kind\">{}</span> ({}): {}</li>",
                escape(kind),
                escape(stage),
                escape(text)
            );
        }
        html.push_str("</ol>\n");
    }
    // Measure every drawn line once laid out: a rendered page carries the sizes.
    html.push_str(
        "<script>window.addEventListener('load',function(){document.querySelectorAll('figure.plot').forEach(function(f){\
var p=f.querySelector('polyline');var b=p.getBBox();f.setAttribute('data-drawn-width',Math.round(b.width));\
f.setAttribute('data-drawn-height',Math.round(b.height));});document.body.setAttribute('data-measured','yes');});</script>\
</body></html>\n",
    );
    html
}
