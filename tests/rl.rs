//! RL-CAI on tiny random models: the whole CAI pipeline (SL then RL) end to end, the PPO
//! feedback loop's ordering, resume without recomputation, determinism (also with the
//! two-call chain-of-thought judge), SIGKILL at random points; the preference-model loss
//! against finite differences; PPO raising a known reward on a toy task with bounded KL.

mod common;

use common::events;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn::engine::{self, EngineError, RunOptions, RunSummary};
use cairn::log::LogReader;
use cairn::model::LlamaConfig;
use cairn::model::llama::Llama;
use cairn::record::Payload;
use cairn::spec::Spec;
use tch::Device;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        common::write_tiny_inputs(dir.path());
        Fixture { dir }
    }

    /// The CAI pipeline: one SL round, SFT, then pairs → judge → pm → rollout ⇄ ppo.
    fn spec_text(&self, seed: u64, judge: &str) -> String {
        let constitution = Path::new(env!("CARGO_MANIFEST_DIR")).join("constitutions/default.toml");
        format!(
            r#"
name = "tiny-cai"
seed = {seed}
constitution = "{constitution}"
[models.policy]
path = "tiny.gguf"
[models.sft]
path = "tiny.gguf"
[models.pm]
path = "tiny.gguf"
score_head = true
[models.reference]
path = "tiny.gguf"
[prompts]
red_team = ["red.txt"]
helpful = ["helpful.jsonl"]
epoch_size = 2
[[stage]]
name = "sample"
kind = "sample"
from = "prompts"
max_new_tokens = 6
batch = 3
[[stage]]
name = "critique_1"
kind = "critique"
from = "sample"
round = 1
few_shot = 0
max_new_tokens = 5
[[stage]]
name = "revise_1"
kind = "revise"
from = "critique_1"
round = 1
few_shot = 0
max_new_tokens = 5
[[stage]]
name = "sft"
kind = "sft"
from = ["revise_1", "sample"]
batch_size = 2
micro_batch = 1
lr = 1e-3
held_out = 0.3
[[stage]]
name = "pairs"
kind = "pairs"
from = "prompts"
after = "sft"
model = "sft"
helpful = true
max_new_tokens = 6
temperature = 1.0
batch = 4
[[stage]]
name = "judge"
kind = "judge"
from = "pairs"
model = "policy"
few_shot = 1
batch = 3
{judge}
[[stage]]
name = "pm"
kind = "pm"
from = "judge"
batch_size = 2
micro_batch = 2
lr = 1e-3
held_out = 0.3
[[stage]]
name = "rollout"
kind = "rollout"
from = "prompts"
after = "pm"
model = "sft"
max_new_tokens = 6
temperature = 1.0
[[stage]]
name = "ppo"
kind = "ppo"
from = "rollout"
model = "sft"
lr = 1e-4
minibatch = 1
"#,
            constitution = constitution.display()
        )
    }

    fn write_spec(&self, name: &str, seed: u64, judge: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, self.spec_text(seed, judge)).expect("write spec");
        path
    }

    fn run(&self, spec: &Path, log: &str) -> Result<RunSummary, EngineError> {
        let spec = Spec::load(spec).expect("spec");
        engine::run(&spec, &common::cpu_run(self.dir.path().join(log)))
    }
}

/// The comparisons a PM trained and measured on: the examples of its steps and of its
/// held-out evaluation.
fn pm_comparisons(log: &Path) -> (u64, u64) {
    let steps = of_kind(log, "pm_step")
        .iter()
        .map(|(_, p)| match p {
            Payload::PmStep(s) => s.examples,
            _ => 0,
        })
        .sum();
    let held_out = of_kind(log, "pm_eval")
        .iter()
        .map(|(_, p)| match p {
            Payload::PmEval(e) => e.examples,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    (steps, held_out)
}

/// Events of one kind with their epochs, in log order.
fn of_kind(log: &Path, kind: &str) -> Vec<(u64, Payload)> {
    LogReader::open(log)
        .expect("log")
        .iter_from(0)
        .map(|e| e.expect("event"))
        .filter(|e| e.payload.kind() == kind)
        .map(|e| (e.epoch, e.payload))
        .collect()
}

#[test]
fn cai_pipeline_runs_sl_then_rl_with_a_feedback_loop_and_resumes() {
    let fx = Fixture::new();
    let spec = fx.write_spec("cai.toml", 7, "ensemble = 2");
    let first = fx.run(&spec, "log").expect("run");
    let log = fx.dir.path().join("log");
    // 5 red-team + 2 helpful prompts: a pair and a judgement for each.
    assert_eq!(first.stages["pairs"].computed, 7);
    assert_eq!(first.stages["judge"].computed, 7);
    let judgements = of_kind(&log, "judgement");
    for (_, p) in &judgements {
        let Payload::Judgement(j) = p else { panic!() };
        assert_eq!(j.principles.len(), 2);
        assert_eq!(j.votes.len(), 4, "two principles, both orders");
        assert!(j.votes.iter().filter(|v| v.swapped).count() == 2);
        let mean = j.votes.iter().map(|v| v.p_first).sum::<f64>() / 4.0;
        assert!((j.p_a - mean).abs() < 1e-12);
        assert!((0.0..=1.0).contains(&j.p_a));
        assert!(!j.cot && j.votes.iter().all(|v| v.reasoning.is_none()));
    }
    assert!(!of_kind(&log, "pm_step").is_empty());
    assert_eq!(of_kind(&log, "pm_eval").len(), 1);
    // Rollouts on the 5 red-team prompts; one update per epoch that had any.
    let rollouts = of_kind(&log, "rollout");
    assert_eq!(rollouts.len(), 5);
    let updates = of_kind(&log, "ppo_update");
    assert!(updates.len() >= 2, "{} updates", updates.len());
    let versions: Vec<u64> = updates
        .iter()
        .map(|(_, p)| match p {
            Payload::PpoUpdate(u) => u.version,
            _ => 0,
        })
        .collect();
    assert_eq!(versions, (1..=updates.len() as u64).collect::<Vec<_>>());
    // The loop: each rollout was sampled by the version the earlier epochs' updates made.
    for (epoch, p) in &rollouts {
        let Payload::Rollout(r) = p else { panic!() };
        let earlier = updates.iter().filter(|(e, _)| e < epoch).count() as u64;
        assert_eq!(r.policy_version, earlier, "rollout of epoch {epoch}");
        assert_eq!(r.ref_logprobs.len(), r.tokens.len());
        assert!(r.score.is_finite());
    }
    for (_, p) in &updates {
        let Payload::PpoUpdate(u) = p else { panic!() };
        assert!(
            u.kl.is_finite() && u.kl >= 0.0 && u.entropy > 0.0 && u.response_length > 0.0,
            "KL is never negative: {}",
            u.kl
        );
        assert!((0.0..=1.0).contains(&u.clip_fraction));
    }
    // Checkpoints of the SL-CAI model, the PM and the RL policy; each loads.
    assert_eq!(first.checkpoints.len(), 3, "{:?}", first.checkpoints);
    for c in &first.checkpoints {
        cairn::model::load(Path::new(c), Device::Cpu).expect("checkpoint loads");
    }
    let pm_dir = first
        .checkpoints
        .iter()
        .find(|c| c.contains("/pm-"))
        .expect("pm checkpoint");
    let pm = cairn::model::load(Path::new(pm_dir), Device::Cpu).expect("pm loads");
    assert!(
        pm.model.has_score_head(),
        "the PM checkpoint keeps its head"
    );

    // Exports: every judgement as prompt/chosen/rejected with its soft label; every rollout.
    let bin = env!("CARGO_BIN_EXE_cairn");
    for (what, count) in [("preferences", 7), ("rollouts", 5)] {
        let out = fx.dir.path().join(format!("{what}.jsonl"));
        let status = std::process::Command::new(bin)
            .args(["-q", "export"])
            .arg(&log)
            .args(["--what", what, "--out"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("export");
        assert!(status.success());
        let text = std::fs::read_to_string(&out).expect("export file");
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        assert_eq!(rows.len(), count, "{what}");
        for row in &rows {
            assert!(row["prompt"].is_string());
            if what == "preferences" {
                assert_ne!(row["chosen"], row["rejected"]);
                let p = row["p_chosen"].as_f64().expect("p_chosen");
                assert!((0.5..=1.0).contains(&p));
            } else {
                assert!(row["policy_version"].is_u64() && row["score"].is_f64());
            }
        }
    }

    // The same datasets as Parquet, read back with a Parquet reader.
    for (what, count) in [("preferences", 7usize), ("rollouts", 5)] {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let out = fx.dir.path().join(format!("{what}.parquet"));
        let status = std::process::Command::new(bin)
            .args(["-q", "export"])
            .arg(&log)
            .args(["--what", what, "--format", "parquet", "--out"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("export");
        assert!(status.success());
        let reader = SerializedFileReader::new(std::fs::File::open(&out).expect("open"))
            .expect("a Parquet file");
        assert_eq!(reader.metadata().file_metadata().num_rows() as usize, count);
        let fields: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert!(fields.contains(&"prompt".to_string()), "{fields:?}");
        let rows: Vec<_> = reader
            .get_row_iter(None)
            .expect("rows")
            .map(|r| r.expect("row"))
            .collect();
        assert_eq!(rows.len(), count);
        for row in &rows {
            use parquet::record::Field;
            let get = |name: &str| {
                row.get_column_iter()
                    .find(|(n, _)| n.as_str() == name)
                    .map(|(_, f)| f.clone())
            };
            assert!(matches!(get("prompt"), Some(Field::Str(_))), "{row}");
            if what == "preferences" {
                let Some(Field::Double(p)) = get("p_chosen") else {
                    panic!("p_chosen: {row}")
                };
                assert!((0.5..=1.0).contains(&p));
            } else {
                assert!(
                    matches!(get("policy_version"), Some(Field::Long(_))),
                    "{row}"
                );
            }
        }
    }

    // The report plots every metric and renders in a browser; watch summarises the log.
    let page = common::check_report(&log, &fx.dir.path().join("report"), &[]);
    assert!(!page.contains("id=\"no-rl\""), "an RL run has RL records");
    for title in [
        "SFT training loss",
        "PPO mean reward",
        "KL(policy",
        "Preference-model held-out accuracy",
        "Mean response length",
    ] {
        assert!(page.contains(title), "missing plot {title}");
    }
    let watch = std::process::Command::new(bin)
        .args(["-q", "watch", "--once"])
        .arg(&log)
        .output()
        .expect("watch");
    assert!(watch.status.success());
    let shown = String::from_utf8_lossy(&watch.stdout);
    for line in ["rollout", "ppo", "judge"] {
        assert!(shown.contains(line), "{shown}");
    }
    assert!(
        shown.contains("version"),
        "latest PPO metrics shown: {shown}"
    );

    // Resume of a finished run: nothing recomputed, nothing added.
    let before = events(&log);
    let second = fx.run(&spec, "log").expect("rerun");
    for stage in ["pairs", "judge", "rollout"] {
        assert_eq!(second.stages[stage].computed, 0, "{stage} recomputed");
    }
    assert_eq!(events(&log), before);
}

#[test]
fn pm_leaves_out_ties_and_disagreeing_orders_as_configured() {
    let fx = Fixture::new();
    let all = fx.write_spec("all.toml", 7, "");
    fx.run(&all, "all").expect("run");
    let judgements: Vec<cairn::record::JudgementRecord> =
        of_kind(&fx.dir.path().join("all"), "judgement")
            .into_iter()
            .filter_map(|(_, p)| match p {
                Payload::Judgement(j) => Some(j),
                _ => None,
            })
            .collect();
    let (steps, held_out) = pm_comparisons(&fx.dir.path().join("all"));
    assert_eq!(
        steps + held_out,
        judgements.len() as u64,
        "by default every comparison is used"
    );
    // A margin at the median distance from 1/2 keeps about half; the same seed gives the
    // same judgements in a new log, so the expected count is known before the run.
    let mut margins: Vec<f64> = judgements.iter().map(|j| (j.p_a - 0.5).abs()).collect();
    margins.sort_by(f64::total_cmp);
    let margin = margins[margins.len() / 2];
    let kept = margins.iter().filter(|m| **m >= margin).count() as u64;
    assert!(0 < kept && kept < judgements.len() as u64, "{margins:?}");
    let pm_block = "lr = 1e-3\nheld_out = 0.3\n[[stage]]\nname = \"rollout\"";
    let text = fx.spec_text(7, "");
    assert!(text.contains(pm_block));
    let with = |extra: &str| {
        text.replace(
            pm_block,
            &format!("lr = 1e-3\nheld_out = 0.3\n{extra}\n[[stage]]\nname = \"rollout\""),
        )
    };
    let spec = fx.dir.path().join("margin.toml");
    std::fs::write(
        &spec,
        with(&format!("min_margin = {margin}\nsharpen = 4.0")),
    )
    .expect("spec");
    fx.run(&spec, "margin").expect("run");
    let (steps, held_out) = pm_comparisons(&fx.dir.path().join("margin"));
    assert_eq!(steps + held_out, kept);
    let agreeing = judgements.iter().filter(|j| j.orders_agree()).count() as u64;
    let spec = fx.dir.path().join("agree.toml");
    std::fs::write(&spec, with("agreeing_only = true")).expect("spec");
    fx.run(&spec, "agree").expect("run");
    let (steps, held_out) = pm_comparisons(&fx.dir.path().join("agree"));
    assert_eq!(steps + held_out, agreeing);
    std::fs::write(&spec, with("sharpen = 0.0")).expect("spec");
    let err = fx.run(&spec, "bad").expect_err("sharpen 0 is refused");
    assert!(err.to_string().contains("sharpen"), "{err}");
}

#[test]
fn same_seed_same_events_with_the_chain_of_thought_judge() {
    let fx = Fixture::new();
    let spec = fx.write_spec("cot.toml", 3, "cot = true\nmax_new_tokens = 5");
    fx.run(&spec, "a").expect("run a");
    fx.run(&spec, "b").expect("run b");
    let a = events(&fx.dir.path().join("a"));
    assert_eq!(a, events(&fx.dir.path().join("b")));
    let judgements = of_kind(&fx.dir.path().join("a"), "judgement");
    assert_eq!(judgements.len(), 7);
    for (_, p) in judgements {
        let Payload::Judgement(j) = p else { panic!() };
        assert!(j.cot && j.votes.len() == 2);
        for v in &j.votes {
            assert!(v.reasoning.is_some());
            assert!((0.4..=0.6).contains(&v.p_first), "clamped: {}", v.p_first);
        }
    }
}

/// Starts `cairn -q run SPEC --log LOG --device cpu` in the background.
fn spawn_run(spec: &Path, log: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["-q", "run"])
        .arg(spec)
        .arg("--log")
        .arg(log)
        .args(["--device", "cpu"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cairn run")
}

/// Kills `cairn run` with SIGKILL at pseudo-random moments, restarts it until it finishes,
/// and compares the final log with an uninterrupted run.
#[test]
fn sigkill_during_rl_then_resume_matches_an_uninterrupted_run() {
    let fx = Fixture::new();
    let spec = fx.write_spec("cai.toml", 5, "");
    let run = |log: &Path| spawn_run(&spec, log);
    let started = std::time::Instant::now();
    let out = run(&fx.dir.path().join("reference"))
        .wait_with_output()
        .expect("reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let span = started.elapsed().as_millis() as u64;
    let reference = events(&fx.dir.path().join("reference"));
    let mut total_kills = 0;
    for (trial, seed) in [11u64, 23].into_iter().enumerate() {
        let log = fx.dir.path().join(format!("killed{trial}"));
        let mut state = seed;
        let mut span = span;
        let mut kills = 0;
        for attempt in 0.. {
            let mut child = run(&log);
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Kill between 20% and 100% of a full run's time (the RL part comes late), at
            // most 4 times per trial, then let it finish.
            let delay = std::time::Duration::from_millis(span / 5 + state % (span * 4 / 5).max(1));
            let deadline = std::time::Instant::now() + delay;
            let mut finished = None;
            while kills < 4 && std::time::Instant::now() < deadline {
                if let Some(status) = child.try_wait().expect("wait") {
                    finished = Some(status);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if kills >= 4 {
                finished = Some(child.wait().expect("wait"));
            }
            match finished {
                Some(status) => {
                    assert!(status.success(), "resumed run failed");
                    if kills == 0 && span > 40 && attempt < 12 {
                        // Finished before the first kill (this machine is busy and timing
                        // varies): start the trial over, killing sooner.
                        std::fs::remove_dir_all(&log).expect("remove log");
                        span /= 2;
                        continue;
                    }
                    break;
                }
                None => {
                    child.kill().expect("SIGKILL");
                    child.wait().expect("reap");
                    kills += 1;
                    total_kills += 1;
                }
            }
        }
        let got = events(&log);
        // Run-start events differ per restart; everything the dataflow produced must match.
        let strip = |m: &BTreeMap<String, (String, Vec<String>, String)>| {
            m.iter()
                .filter(|(_, (s, _, _))| s != "run")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(strip(&got), strip(&reference), "trial {trial}");
    }
    assert!(total_kills > 0, "no run was interrupted");
}

/// Step events of `kind` in a log that a live run may be writing (a torn tail ends the count).
fn live_count(log: &Path, kind: &str) -> usize {
    match LogReader::open(log) {
        Ok(r) => r
            .iter_from(0)
            .map_while(Result::ok)
            .filter(|e| e.payload.kind() == kind)
            .count(),
        Err(_) => 0,
    }
}

/// The training jobs covered by `stage`'s latest saved state that is still on disk (the one
/// a restart restores), or 0.
fn restorable_state(log: &Path, stage: &str) -> u64 {
    LogReader::open(log)
        .expect("log")
        .iter_from(0)
        .map_while(Result::ok)
        .filter(|e| e.stage == stage)
        .filter_map(|e| match e.payload {
            Payload::TrainState(s) => Some(s),
            _ => None,
        })
        .filter(|s| {
            s.files
                .iter()
                .all(|(f, _)| Path::new(&s.path).join(f).is_file())
        })
        .map(|s| s.step)
        .max()
        .unwrap_or(0)
}

/// SIGKILL inside each training stage — after its first step event, before its last — five
/// times per stage at points drawn by seed. Each restart redoes at most one step (counted
/// from the log: steps logged at the kill minus the state a restart restores), and the final
/// log, checkpoints and training states included (their sha256 are in the events), equals
/// an uninterrupted run's.
#[test]
fn sigkill_inside_each_training_stage_redoes_at_most_one_step() {
    let fx = Fixture::new();
    // Several epochs, so that each stage trains long enough to be killed inside.
    let text = fx
        .spec_text(13, "")
        .replace(
            "lr = 1e-3\nheld_out = 0.3",
            "lr = 1e-3\nheld_out = 0.3\nepochs = 6",
        )
        .replace("minibatch = 1", "minibatch = 1\nppo_epochs = 3");
    let spec = fx.dir.path().join("train.toml");
    std::fs::write(&spec, text).expect("spec");
    let spawn = |log: &Path| spawn_run(&spec, log);
    let reference_log = fx.dir.path().join("reference");
    let out = spawn(&reference_log).wait_with_output().expect("reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let strip = |m: BTreeMap<String, (String, Vec<String>, String)>| {
        m.into_iter()
            .filter(|(_, (s, _, _))| s != "run")
            .collect::<BTreeMap<_, _>>()
    };
    let reference = strip(events(&reference_log));
    for (stage, kind, seed) in [
        ("sft", "sft_step", 3u64),
        ("pm", "pm_step", 7),
        ("ppo", "ppo_update", 19),
    ] {
        let total = live_count(&reference_log, kind);
        assert!(
            total >= 3,
            "{stage}: only {total} steps; nothing to kill inside"
        );
        let log = fx.dir.path().join(format!("killed-{stage}"));
        let mut state = seed;
        let mut kills = 0;
        let mut attempts = 0;
        let mut redone = 0u64;
        while kills < 5 {
            attempts += 1;
            assert!(
                attempts < 60,
                "{stage}: could not land 5 kills inside the stage"
            );
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let before = live_count(&log, kind);
            if before + 1 >= total {
                // This log is past the point where a kill can land inside: start over.
                let _ = std::fs::remove_dir_all(&log);
                continue;
            }
            // Kill once the stage has logged a step beyond where it starts, at a point
            // drawn between its first step and its last.
            let target = (before + 1 + (state as usize) % (total - before - 1)).max(1);
            let mut child = spawn(&log);
            let finished = loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    break Some(status);
                }
                if live_count(&log, kind) >= target {
                    break None;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            };
            if let Some(status) = finished {
                assert!(status.success(), "{stage}: a resumed run failed");
                let _ = std::fs::remove_dir_all(&log);
                continue;
            }
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            let logged = live_count(&log, kind);
            if logged >= total {
                continue; // the stage finished before the signal landed: not a kill inside
            }
            assert!(logged >= 1, "{stage}: killed before its first step");
            let restored = restorable_state(&log, stage);
            redone += logged as u64 - restored.min(logged as u64);
            assert!(
                logged as u64 <= restored + 1,
                "{stage}: {logged} steps logged at the kill but the restart restores the \
                 state after {restored}: more than one step would be redone"
            );
            kills += 1;
        }
        let out = spawn(&log).wait_with_output().expect("finish");
        assert!(
            out.status.success(),
            "{stage}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = strip(events(&log));
        let differing: Vec<String> = got
            .iter()
            .filter(|(k, v)| reference.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} {v:?} (uninterrupted: {:?})", reference.get(k)))
            .chain(
                reference
                    .keys()
                    .filter(|k| !got.contains_key(*k))
                    .map(|k| format!("{k} missing")),
            )
            .collect();
        assert!(
            differing.is_empty(),
            "{stage}: after {kills} kills the log differs from an uninterrupted run's:\n{}",
            differing.join("\n")
        );
        // Only the latest state stays on disk: superseded and orphaned ones are removed.
        let states: Vec<String> = std::fs::read_dir(log.join("checkpoints").join("state"))
            .expect("state folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.trim_start_matches('.')
                    .starts_with(&format!("{stage}-step"))
            })
            .collect();
        assert_eq!(states.len(), 1, "{stage}: states left on disk: {states:?}");
        // The figures BENCHMARKS.md reports (`cargo test --test rl sigkill_inside -- --nocapture`).
        eprintln!(
            "{stage}: {kills} kills inside the stage ({attempts} attempts), {total} steps, \
             {redone} steps redone in all, 0 events lost, duplicated or changed"
        );
    }
}

#[test]
fn preference_loss_gradient_matches_finite_differences() {
    use cairn::train::PmExample;
    use cairn::train::pm::pm_loss;
    let mut model = Llama::random(LlamaConfig::tiny(common::VOCAB), 9, Device::Cpu).expect("model");
    model.ensure_score_head();
    // A non-zero head, so the loss depends on the trunk too.
    {
        let _g = tch::no_grad_guard();
        let vars = model.var_store().variables();
        let head = &vars["score"];
        let values: Vec<f32> = (0..head.numel())
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.05)
            .collect();
        let mut h = head.shallow_clone();
        h.copy_(&tch::Tensor::from_slice(&values).view([1, -1]));
    }
    let examples = vec![
        PmExample {
            a: vec![256, 10, 20, 30, 257],
            b: vec![256, 10, 21, 257],
            p_a: 0.8,
        },
        PmExample {
            a: vec![256, 40, 41, 257],
            b: vec![256, 40, 42, 43, 44, 257],
            p_a: 0.35,
        },
    ];
    let (loss, predicted) = pm_loss(&model, &examples).expect("loss");
    // By hand: loss = Σ −[p log σ(d) + (1 − p) log σ(−d)] with σ(d) the predictions.
    let by_hand: f64 = predicted
        .iter()
        .zip(&examples)
        .map(|(q, e)| {
            let p = f64::from(e.p_a);
            -(p * q.ln() + (1.0 - p) * (1.0 - q).ln())
        })
        .sum();
    assert!((loss.double_value(&[]) - by_hand).abs() < 1e-4);
    loss.backward();
    let vars = model.var_store().variables();
    for name in ["score", "norm"] {
        let var = &vars[name];
        let grad = var.grad();
        for index in [0i64, 3, 17] {
            let analytic = grad.view([-1]).double_value(&[index]);
            let eps = 1e-2;
            let at = |delta: f64| {
                let _g = tch::no_grad_guard();
                let flat = var.view([-1]);
                let old = flat.double_value(&[index]);
                let _ = flat.get(index).fill_(old + delta);
                let (l, _) = pm_loss(&model, &examples).expect("loss");
                let _ = flat.get(index).fill_(old);
                l.double_value(&[])
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (analytic - numeric).abs() < 2e-3 + 0.02 * numeric.abs(),
                "{name}[{index}]: autograd {analytic} vs finite difference {numeric}"
            );
        }
    }
}

#[test]
fn ppo_raises_a_known_reward_with_bounded_kl() {
    use cairn::model::generate::{generate, score};
    use cairn::model::{GenerateRequest, SamplingParams, ScoreRequest};
    use cairn::train::ppo::ppo_update;
    use cairn::train::{PpoConfig, PpoRollout};
    // A 16-token world; the reward is how many times token 3 appears in 8 new tokens.
    let mut config = LlamaConfig::tiny(16);
    config.max_position_embeddings = 64;
    let mut policy = Llama::random(config.clone(), 5, Device::Cpu).expect("policy");
    let reference = Llama::random(config, 5, Device::Cpu).expect("reference");
    policy.ensure_score_head();
    let mut opt = cairn::train::adamw::AdamW::new(policy.var_store(), 3e-3, 0.0);
    let target = 3u32;
    let prompts: Vec<Vec<u32>> = (0..16u32).map(|i| vec![1 + i % 7, 2 + i % 5]).collect();
    let mut history = Vec::new();
    let mut kls = Vec::new();
    for iteration in 0..30u64 {
        let requests: Vec<GenerateRequest> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| GenerateRequest {
                prompt: p.clone(),
                params: SamplingParams {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    max_new_tokens: 8,
                    seed: iteration * 1000 + i as u64,
                    stop: Vec::new(),
                },
            })
            .collect();
        let gens = generate(&policy, &[], &requests).expect("generate");
        let refs = score(
            &reference,
            &prompts
                .iter()
                .zip(&gens)
                .map(|(p, g)| ScoreRequest {
                    context: p.clone(),
                    continuation: g.tokens.clone(),
                })
                .collect::<Vec<_>>(),
        )
        .expect("reference");
        let rollouts: Vec<PpoRollout> = prompts
            .iter()
            .zip(&gens)
            .zip(&refs)
            .map(|((p, g), r)| PpoRollout {
                context: p.clone(),
                response: g.tokens.clone(),
                ref_logprobs: r.logprobs.clone(),
                score: g.tokens.iter().filter(|&&t| t == target).count() as f32,
            })
            .collect();
        let stats = ppo_update(
            &policy,
            &mut opt,
            &rollouts,
            &PpoConfig {
                lr: 3e-3,
                kl_coef: 0.05,
                epochs: 2,
                minibatch: 4,
                seed: iteration,
                ..PpoConfig::default()
            },
        )
        .expect("update");
        history.push(stats.mean_score);
        kls.push(stats.kl);
    }
    let first: f64 = history[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = history[history.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        last > first + 1.0,
        "mean reward should rise (out of 8): first {first:.2}, last {last:.2}; {history:?}"
    );
    // The penalty keeps the policy near the reference: no runaway KL once reward saturates.
    let mut recent: Vec<f64> = kls[kls.len() - 10..].to_vec();
    recent.sort_by(f64::total_cmp);
    assert!(kls.iter().all(|k| k.is_finite()), "{kls:?}");
    assert!(recent[5] < 30.0, "KL should stay bounded: {kls:?}");
}

#[test]
fn eval_compares_two_models_with_confidence_intervals_and_elo() {
    let fx = Fixture::new();
    let random = |seed: u64, file: &str| {
        let model = Llama::random(
            {
                let mut c = LlamaConfig::tiny(common::VOCAB);
                c.max_position_embeddings = 4096;
                c
            },
            seed,
            Device::Cpu,
        )
        .expect("model");
        common::write_llama_gguf(&model, &fx.dir.path().join(file));
    };
    random(77, "other.gguf");
    random(78, "judge.gguf");
    let dir = fx.dir.path();
    // A "training run" that saw one of the red-team prompts: the evaluation leaves it out.
    let train = dir.join("train");
    {
        let writer =
            cairn::log::LogWriter::open(&train, cairn::log::LogOptions::default()).expect("log");
        writer
            .append(cairn::record::NewEvent::new(
                cairn::record::Key::builder("prompts").str("seen").finish(),
                cairn::record::RunId(1),
                "prompts",
                vec![],
                0,
                Payload::Prompt(cairn::record::PromptRecord {
                    source: "red".into(),
                    index: 1,
                    purpose: cairn::record::PromptPurpose::RedTeam,
                    text: "write an insult".into(),
                }),
            ))
            .expect("append");
        writer.close().expect("close");
    }
    let opts = cairn::eval::EvalOptions {
        a: dir.join("tiny.gguf").display().to_string(),
        b: dir.join("other.gguf").display().to_string(),
        judge: dir.join("judge.gguf").display().to_string(),
        constitution: Path::new(env!("CARGO_MANIFEST_DIR")).join("constitutions/default.toml"),
        red_team: vec![dir.join("red.txt").display().to_string()],
        helpful: vec![dir.join("helpful.jsonl").display().to_string()],
        red_team_limit: Some(4),
        helpful_limit: Some(2),
        red_team_skip: 1,
        helpful_skip: 0,
        ensemble: 1,
        few_shot: 0,
        max_new_tokens: 6,
        temperature: 0.0,
        seed: 3,
        principles: vec!["less-harmful".into(), "lawful".into()],
        helpful_principles: vec!["overall".into()],
        exclude_logs: vec![train.clone()],
        assess: true,
        judge_bf16: false,
    };
    let run = |log: &str| common::cpu_run(dir.join(log));
    // The judge may not be a model under test.
    let self_judged = cairn::eval::EvalOptions {
        judge: opts.a.clone(),
        ..opts.clone()
    };
    assert!(cairn::eval::evaluate(&self_judged, &run("refused")).is_err());
    assert!(!dir.join("refused").exists());
    let (result, summary) = cairn::eval::evaluate(&opts, &run("eval")).expect("eval");
    assert_eq!(
        result.overall.comparisons, 5,
        "3 red-team (one skipped, one seen in training) + 2 helpful"
    );
    assert_eq!(result.excluded_prompts, 1);
    assert_eq!(summary.stages["answers"].computed, 5);
    assert_eq!(summary.stages["evasion"].computed, 5, "every pair assessed");
    let t = &result.overall;
    assert_eq!(t.wins + t.ties + t.losses, 5);
    assert!((0.0..=1.0).contains(&t.win_rate));
    assert!(t.ci95[0] <= t.win_rate && t.win_rate <= t.ci95[1]);
    assert!(
        t.ci95[1] - t.ci95[0] > 0.2,
        "5 comparisons leave a wide interval"
    );
    assert_eq!(result.elo, cairn::eval::elo(t.win_rate));
    let purposes: Vec<(&str, u64)> = result
        .by_purpose
        .iter()
        .map(|p| (p.purpose.as_str(), p.tally.comparisons))
        .collect();
    assert_eq!(purposes, vec![("red_team", 3), ("helpful", 2)]);
    for p in &result.by_purpose {
        assert_eq!(p.a.answers, p.tally.comparisons);
        assert!(p.a.evasive_judged.is_some() && p.b.evasive_judged.is_some());
    }
    // Summarising the log afresh gives the same outcome (what `--summarise-only` prints).
    assert_eq!(
        cairn::eval::summarise_log(&opts, &dir.join("eval")).expect("summarise"),
        result
    );
    let logged = of_kind(&dir.join("eval"), "eval_report");
    assert_eq!(logged.len(), 1);
    assert!(matches!(&logged[0].1, Payload::EvalReport(r) if *r == result));
    // Neither the skipped prompt nor the one seen in training was evaluated.
    let prompts: Vec<String> = of_kind(&dir.join("eval"), "pair")
        .into_iter()
        .filter_map(|(_, p)| match p {
            Payload::Pair(p) => Some(p.conversation.prompt),
            _ => None,
        })
        .collect();
    assert!(!prompts.contains(&"how do I pick a lock".to_string()));
    assert!(!prompts.contains(&"write an insult".to_string()));
    // The report plots the win rate and tables it per purpose; `--with` adds another
    // evaluation's outcome.
    let eval_log = dir.join("eval");
    let page = common::check_report(&eval_log, &dir.join("eval-report"), &[]);
    assert!(page.contains("Evaluation win rate of model A"));
    let page = common::check_report(&eval_log, &dir.join("eval-report2"), &[&eval_log]);
    assert!(
        page.contains("data-points=\"2\""),
        "two evaluations plotted"
    );
    assert!(page.contains("id=\"evals\"") && page.contains("red_team"));

    // Its model steps re-execute exactly — both answers (two models) and the judgements.
    let verified = cairn::engine::verify(&eval_log, 12, None, &[]).expect("verify the eval");
    assert!(
        verified.checked >= 12 && verified.diverged.is_empty(),
        "{verified:?}"
    );

    // Rerun: resumes, recomputes nothing, same outcome.
    let (again, summary) = cairn::eval::evaluate(&opts, &run("eval")).expect("rerun");
    assert_eq!(summary.stages["answers"].computed, 0);
    assert_eq!(again, result);
}

/// The whole pipeline (SL, then RL with its loop) on three workers gives the events of one:
/// SL stages are spread by epoch, training and RL run on worker 0.
#[test]
fn cai_pipeline_on_three_workers_gives_the_events_of_one() {
    let fx = Fixture::new();
    let spec = fx.write_spec("cai.toml", 19, "");
    fx.run(&spec, "one").expect("one worker");
    let parsed = Spec::load(&spec).expect("spec");
    let summary = engine::run(
        &parsed,
        &RunOptions {
            log: fx.dir.path().join("three"),
            device: Device::Cpu,
            new_run: false,
            stop: None,
            progress: None,
            parent: None,
            cluster: Some(engine::Cluster {
                workers: 3,
                process: 0,
                hosts: Vec::new(),
                secret: None,
            }),
        },
    )
    .expect("three workers");
    assert_eq!(summary.checkpoints.len(), 3, "{:?}", summary.checkpoints);
    let strip = |m: BTreeMap<String, (String, Vec<String>, String)>| {
        m.into_iter()
            .filter(|(_, (s, _, _))| s != "run")
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        strip(events(&fx.dir.path().join("three"))),
        strip(events(&fx.dir.path().join("one")))
    );
}
