//! The streaming SL-CAI dataflow on a tiny random model: end to end, resume without
//! recomputation, determinism, SIGKILL at random points, configuration errors that leave the
//! log untouched, and a stage added from outside the crate.

mod common;

use common::events;

#[allow(dead_code)]
#[path = "../examples/custom_stage.rs"]
mod custom_stage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn::engine::{self, EngineError, RunOptions, RunSummary};
use cairn::log::LogReader;
use cairn::record::{Key, Payload};
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

    fn spec_text(&self, seed: u64, extra: &str) -> String {
        let constitution = Path::new(env!("CARGO_MANIFEST_DIR")).join("constitutions/default.toml");
        format!(
            r#"
name = "tiny"
seed = {seed}
constitution = "{constitution}"
[models.policy]
path = "tiny.gguf"
[models.sft]
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
few_shot = 1
max_new_tokens = 5
[[stage]]
name = "revise_1"
kind = "revise"
from = "critique_1"
round = 1
few_shot = 1
max_new_tokens = 5
[[stage]]
name = "critique_2"
kind = "critique"
from = "revise_1"
round = 2
few_shot = 0
max_new_tokens = 5
[[stage]]
name = "revise_2"
kind = "revise"
from = "critique_2"
round = 2
few_shot = 0
max_new_tokens = 5
[[stage]]
name = "sft"
kind = "sft"
from = ["revise_2", "sample"]
batch_size = 2
micro_batch = 1
lr = 1e-3
held_out = 0.3
{extra}
"#,
            constitution = constitution.display()
        )
    }

    fn write_spec(&self, name: &str, seed: u64, extra: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, self.spec_text(seed, extra)).expect("write spec");
        path
    }

    fn run(&self, spec: &Path, log: &str) -> Result<RunSummary, EngineError> {
        let spec = Spec::load(spec).expect("spec");
        engine::run(&spec, &common::cpu_run(self.dir.path().join(log)))
    }
}

fn count_kind(log: &Path, kind: &str) -> usize {
    LogReader::open(log)
        .expect("log")
        .iter_from(0)
        .filter(|e| e.as_ref().is_ok_and(|e| e.payload.kind() == kind))
        .count()
}

/// The example stage's own records (`word_hit`, logged as `extension` records), decoded.
fn word_hits(log: &Path) -> Vec<custom_stage::WordHit> {
    LogReader::open(log)
        .expect("log")
        .iter_from(0)
        .filter_map(|e| match e.expect("event").payload {
            Payload::Extension(x) if x.kind == custom_stage::WORD_HIT => {
                Some(x.decode().expect("a word_hit decodes"))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn sl_cai_runs_end_to_end_then_resumes_without_recomputing() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 7, "");
    let first = fx.run(&spec, "log").expect("run");
    let log = fx.dir.path().join("log");
    assert_eq!(first.prompts, 7);
    assert_eq!(first.stages["sample"].computed, 7);
    for stage in ["critique_1", "revise_1", "critique_2", "revise_2"] {
        assert_eq!(
            first.stages[stage].computed, 5,
            "{stage}: one per red-team prompt"
        );
    }
    assert_eq!(count_kind(&log, "critique"), 10);
    assert!(count_kind(&log, "sft_step") >= 1);
    assert_eq!(count_kind(&log, "checkpoint"), 1);
    assert_eq!(first.checkpoints.len(), 1);
    assert!(
        Path::new(&first.checkpoints[0])
            .join("model.safetensors")
            .exists()
    );
    // The checkpoint loads as a model directory.
    cairn::model::load(Path::new(&first.checkpoints[0]), Device::Cpu).expect("checkpoint loads");
    // Lineage: every revision's parent is a critique of the same round.
    let all = events(&log);
    for (stage, parents, _) in all.values() {
        if stage == "revise_2" {
            assert_eq!(all[&parents[0]].0, "critique_2");
        }
    }
    // Each round's principle is recorded.
    for env in LogReader::open(&log)
        .expect("log")
        .iter_stage(0, "critique_1")
    {
        let Payload::Critique(c) = env.expect("event").payload else {
            panic!("not a critique")
        };
        assert!(c.round == 1 && !c.principle.is_empty());
    }

    // Differential aggregates counted every record that streamed through.
    let agg = &first.aggregates;
    assert_eq!(
        agg.get(&("sample".to_string(), "redteam".to_string())),
        Some(&5),
        "{agg:?}"
    );
    assert_eq!(
        agg.get(&("sample".to_string(), "helpful".to_string())),
        Some(&2),
        "{agg:?}"
    );
    let critiques: i64 = agg
        .iter()
        .filter(|((s, _), _)| s == "critique_1")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(critiques, 5);

    let before = events(&log);
    let second = fx.run(&spec, "log").expect("rerun");
    for stage in ["sample", "critique_1", "revise_1", "critique_2", "revise_2"] {
        assert_eq!(
            second.stages[stage].computed, 0,
            "{stage} recomputed on resume"
        );
        assert!(second.stages[stage].replayed > 0);
    }
    assert_eq!(
        events(&log),
        before,
        "a resumed finished run adds or changes nothing"
    );
    // ... and trains nothing: its saved state covers every step.
    assert_eq!(
        second.stages["sft"].skipped as usize,
        count_kind(&log, "sft_step")
    );
    assert_eq!(second.stages["sft"].recomputed, 0);
    assert!(count_kind(&log, "train_state") >= 1);
}

/// A training state whose file no longer matches its logged sha256 stops the resume with an
/// error naming the file and both digests; the log is left as it was.
#[test]
fn a_changed_training_state_file_is_an_error_naming_it() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 7, "");
    fx.run(&spec, "log").expect("run");
    let log = fx.dir.path().join("log");
    let states: Vec<cairn::record::TrainStateRecord> = LogReader::open(&log)
        .expect("log")
        .iter_from(0)
        .filter_map(|e| match e.expect("event").payload {
            Payload::TrainState(s) => Some(s),
            _ => None,
        })
        .collect();
    let latest = states.iter().max_by_key(|s| s.step).expect("a state");
    // Only the latest state is kept on disk.
    for s in &states {
        assert_eq!(
            Path::new(&s.path).exists(),
            s.step == latest.step,
            "{}",
            s.path
        );
    }
    let weights = Path::new(&latest.path).join("weights.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&weights, bytes).expect("write");
    let before = events(&log);
    let err = fx
        .run(&spec, "log")
        .expect_err("a changed state must stop the run");
    let msg = err.to_string();
    assert!(
        msg.contains("weights.safetensors") && msg.contains("sha256") && msg.contains("differs"),
        "{msg}"
    );
    let after: BTreeMap<_, _> = events(&log)
        .into_iter()
        .filter(|(_, (stage, _, _))| stage != "run")
        .collect();
    let before: BTreeMap<_, _> = before
        .into_iter()
        .filter(|(_, (stage, _, _))| stage != "run")
        .collect();
    assert_eq!(after, before);
}

#[test]
fn the_same_seed_gives_identical_events_and_another_seed_does_not() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 11, "");
    fx.run(&spec, "a").expect("run a");
    fx.run(&spec, "b").expect("run b");
    let (a, b) = (
        events(&fx.dir.path().join("a")),
        events(&fx.dir.path().join("b")),
    );
    assert_eq!(a, b);
    let other = fx.write_spec("other.toml", 12, "");
    fx.run(&other, "c").expect("run c");
    let c = events(&fx.dir.path().join("c"));
    let samples = |m: &BTreeMap<String, (String, Vec<String>, String)>| {
        m.values()
            .filter(|(s, _, _)| s == "sample")
            .map(|(_, _, p)| p.clone())
            .collect::<Vec<_>>()
    };
    assert_ne!(samples(&a), samples(&c), "the seed must change the samples");
}

/// Kills `cairn run` with SIGKILL at pseudo-random moments, restarts it with the same command
/// until it finishes, and compares the final log with an uninterrupted run.
#[test]
fn sigkill_at_random_points_then_resume_matches_an_uninterrupted_run() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 5, "");
    let bin = env!("CARGO_BIN_EXE_cairn");
    // The reference: the same command, uninterrupted; its duration scales the kill times.
    let started = std::time::Instant::now();
    let status = std::process::Command::new(bin)
        .args(["-q", "run"])
        .arg(&spec)
        .arg("--log")
        .arg(fx.dir.path().join("reference"))
        .args(["--device", "cpu"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("reference run");
    assert!(status.success());
    let span = started.elapsed().as_millis() as u64;
    let reference = events(&fx.dir.path().join("reference"));
    for (trial, seed) in [3u64, 17, 29].into_iter().enumerate() {
        let log = fx.dir.path().join(format!("killed{trial}"));
        let mut state = seed;
        let mut kills = 0;
        let mut span = span;
        loop {
            let mut child = std::process::Command::new(bin)
                .args(["-q", "run"])
                .arg(&spec)
                .arg("--log")
                .arg(&log)
                .args(["--device", "cpu"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn cairn run");
            // xorshift: a different kill time each attempt, reproducible per trial.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Anywhere from 5% to 95% of an uninterrupted run (which includes start-up).
            let delay =
                std::time::Duration::from_millis(span / 20 + state % (span * 9 / 10).max(1));
            let deadline = std::time::Instant::now() + delay;
            let mut finished = None;
            while std::time::Instant::now() < deadline {
                if let Some(status) = child.try_wait().expect("wait") {
                    finished = Some(status);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            match finished {
                Some(status) => {
                    let out = child.wait_with_output().expect("output");
                    assert!(
                        status.success(),
                        "run failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    if kills == 0 && span > 40 {
                        // Finished before the first kill: start the trial over, sooner.
                        std::fs::remove_dir_all(&log).expect("remove log");
                        span /= 2;
                        continue;
                    }
                    break;
                }
                None if kills < 6 => {
                    child.kill().expect("SIGKILL");
                    let _ = child.wait();
                    kills += 1;
                }
                None => {
                    let status = child.wait().expect("wait");
                    assert!(status.success());
                    break;
                }
            }
        }
        assert!(
            kills > 0,
            "trial {trial}: the run finished before the first kill; lower the delays"
        );
        assert_eq!(
            events(&log),
            reference,
            "trial {trial} after {kills} kill(s)"
        );
        assert!(cairn::log::verify(&log).expect("verify").is_ok());
    }
}

#[test]
fn configuration_errors_name_the_place_and_leave_the_log_untouched() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 7, "");
    fx.run(&spec, "log").expect("run");
    let log = fx.dir.path().join("log");
    let snapshot = || {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&log)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect();
        files.sort();
        files
    };
    let before = snapshot();

    let bad_kind = fx.write_spec(
        "kind.toml",
        7,
        "[[stage]]\nname = \"x\"\nkind = \"judge_of_everything\"\nfrom = \"sample\"\n",
    );
    let err = fx
        .run(&bad_kind, "log")
        .expect_err("unknown kind")
        .to_string();
    assert!(
        err.contains("kind.toml:") && err.contains("judge_of_everything"),
        "{err}"
    );

    let typo = fx
        .spec_text(7, "")
        .replace("max_new_tokens = 6", "max_new_tokenz = 6");
    let typo_path = fx.dir.path().join("typo.toml");
    std::fs::write(&typo_path, typo).expect("write");
    let err = fx
        .run(&typo_path, "log")
        .expect_err("unknown setting")
        .to_string();
    assert!(
        err.contains("typo.toml:") && err.contains("max_new_tokenz"),
        "{err}"
    );

    // RL stage settings: a gate naming a later stage, an ensemble larger than the principle
    // pool, a clamp that is not a probability range.
    for (extra, needle) in [
        (
            "[[stage]]\nname = \"pairs\"\nkind = \"pairs\"\nfrom = \"prompts\"\nafter = \"judge\"\n",
            "`after` must name an earlier stage",
        ),
        (
            "[[stage]]\nname = \"pairs\"\nkind = \"pairs\"\nfrom = \"prompts\"\n\
             [[stage]]\nname = \"judge\"\nkind = \"judge\"\nfrom = \"pairs\"\nensemble = 3\nprinciples = [\"honest\", \"overall\"]\n",
            "`ensemble` must be between 1 and",
        ),
        (
            "[[stage]]\nname = \"pairs\"\nkind = \"pairs\"\nfrom = \"prompts\"\n\
             [[stage]]\nname = \"judge\"\nkind = \"judge\"\nfrom = \"pairs\"\ncot = true\nclamp = [0.7, 0.9]\n",
            "`clamp` must be",
        ),
        (
            "[[stage]]\nname = \"pairs\"\nkind = \"pairs\"\nfrom = \"prompts\"\ntemperature = 0.0\n",
            "greedy decoding would give two equal answers",
        ),
    ] {
        let path = fx.write_spec("rl.toml", 7, extra);
        let err = fx.run(&path, "log").expect_err(needle).to_string();
        assert!(err.contains("rl.toml:") && err.contains(needle), "{err}");
    }

    // Model number formats: an unknown one, and a trained model loaded as bf16.
    let bad_dtype = fx.spec_text(7, "").replace(
        "[models.sft]\npath = \"tiny.gguf\"",
        "[models.sft]\npath = \"tiny.gguf\"\ndtype = \"fp8\"",
    );
    let bf16_trained = fx.spec_text(7, "").replace(
        "[models.sft]\npath = \"tiny.gguf\"",
        "[models.sft]\npath = \"tiny.gguf\"\ndtype = \"bf16\"",
    );
    assert!(bad_dtype.contains("fp8") && bf16_trained.contains("bf16"));
    let dtype_path = fx.dir.path().join("dtype.toml");
    std::fs::write(&dtype_path, bad_dtype).expect("write");
    let err = Spec::load(&dtype_path).expect_err("bad dtype").to_string();
    assert!(
        err.contains("dtype.toml:") && err.contains("unknown dtype `fp8`"),
        "{err}"
    );
    let bf16_path = fx.dir.path().join("bf16.toml");
    std::fs::write(&bf16_path, bf16_trained).expect("write");
    let err = fx
        .run(&bf16_path, "log")
        .expect_err("bf16 trained")
        .to_string();
    assert!(
        err.contains("bf16.toml:") && err.contains("a trained model needs dtype f32"),
        "{err}"
    );
    // A quantised model cannot be trained either, nor keep unpacked matrices it never has.
    for (extra, needle) in [
        (
            "dtype = \"quantised\"",
            "loaded as quantised; a trained model needs dtype f32",
        ),
        (
            "dtype = \"quantised\"\nkeep_unpacked = true",
            "keep_unpacked = true contradicts",
        ),
    ] {
        let text = fx.spec_text(7, "").replace(
            "[models.sft]\npath = \"tiny.gguf\"",
            &format!("[models.sft]\npath = \"tiny.gguf\"\n{extra}"),
        );
        assert!(text.contains(extra));
        let q_path = fx.dir.path().join("quantised.toml");
        std::fs::write(&q_path, text).expect("write");
        // The contradiction is the spec's own; training is checked when the run is planned.
        let err = match Spec::load(&q_path) {
            Err(e) => e.to_string(),
            Ok(_) => fx.run(&q_path, "log").expect_err(needle).to_string(),
        };
        assert!(
            err.contains("quantised.toml:") && err.contains(needle),
            "{err}"
        );
    }

    let changed = fx.write_spec("changed.toml", 8, "");
    let err = fx.run(&changed, "log").expect_err("settings changed");
    assert!(matches!(err, EngineError::SettingsChanged { .. }), "{err}");

    let missing = fx.spec_text(7, "").replace("red.txt", "nope.txt");
    let missing_path = fx.dir.path().join("missing.toml");
    std::fs::write(&missing_path, missing).expect("write");
    let err = fx
        .run(&missing_path, "log")
        .expect_err("missing prompts")
        .to_string();
    assert!(err.contains("nope.txt"), "{err}");

    assert_eq!(snapshot(), before, "failed runs must not touch the log");
}

#[test]
fn a_stage_from_outside_the_crate_runs_in_the_dataflow() {
    let fx = Fixture::new();
    let spec = fx.write_spec(
        "flag.toml",
        7,
        "[[stage]]\nname = \"flag\"\nkind = \"flag\"\nfrom = [\"sample\", \"revise_2\"]\nwords = [\"e\", \"a\"]\n",
    );
    let spec = Spec::load(&spec).expect("spec");
    let mut kinds = cairn::stages::registry();
    kinds.push(custom_stage::kind());
    let log = fx.dir.path().join("log");
    let summary = engine::run_with(&spec, &common::cpu_run(log.clone()), &kinds).expect("run");
    // Exactly the answers containing a listed word are flagged.
    let mut expected = 0;
    for env in LogReader::open(&log).expect("log").iter_from(0) {
        let env = env.expect("event");
        let text = match (&env.stage[..], &env.payload) {
            ("sample", Payload::Sample(s)) => s.response.to_lowercase(),
            ("revise_2", Payload::Revision(r)) => r.response.to_lowercase(),
            _ => continue,
        };
        if text.contains('e') || text.contains('a') {
            expected += 1;
        }
    }
    let hits = word_hits(&log);
    assert_eq!(hits.len(), expected);
    assert!(
        hits.iter().all(|h| h.word == "e" || h.word == "a"),
        "{hits:?}"
    );
    assert_eq!(
        summary.stages.get("flag").map(|s| s.computed).unwrap_or(0) as usize,
        expected
    );
}

/// Follow mode picks up prompts appended while the run is going; SIGTERM stops it cleanly
/// (exit 0, log intact), and rerunning continues.
#[test]
fn follow_mode_reads_appended_prompts_and_sigterm_stops_cleanly() {
    use std::io::Write;
    let fx = Fixture::new();
    let text = fx
        .spec_text(9, "")
        .replace("epoch_size = 2", "epoch_size = 2\nfollow = true");
    let spec = fx.dir.path().join("follow.toml");
    std::fs::write(&spec, text).expect("write");
    let log = fx.dir.path().join("log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["-q", "run"])
        .arg(&spec)
        .arg("--log")
        .arg(&log)
        .args(["--device", "cpu"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let samples = |log: &Path| -> usize {
        if !log.exists() {
            return 0;
        }
        LogReader::open(log)
            .map(|r| {
                r.iter_from(0)
                    .filter(|e| e.as_ref().is_ok_and(|e| e.stage == "sample"))
                    .count()
            })
            .unwrap_or(0)
    };
    let wait_for = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while samples(&log) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {n} samples"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait_for(7);
    // Another process appends two prompts (the second in two writes, as a writer might).
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(fx.dir.path().join("red.txt"))
        .expect("open");
    f.write_all(b"how to forge a signature\nhow to hide")
        .expect("append");
    f.flush().expect("flush");
    std::thread::sleep(std::time::Duration::from_millis(700));
    f.write_all(b" a body\n").expect("append");
    wait_for(9);
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("interrupted"));
    assert!(cairn::log::verify(&log).expect("verify").is_ok());
    let prompts: Vec<String> = LogReader::open(&log)
        .expect("log")
        .iter_from(0)
        .filter_map(|e| match e.expect("event").payload {
            Payload::Prompt(p) => Some(p.text),
            _ => None,
        })
        .collect();
    assert!(
        prompts.contains(&"how to hide a body".to_string()),
        "{prompts:?}"
    );
    assert!(
        !prompts.contains(&"how to hide".to_string()),
        "a half-written line was read"
    );
    assert_eq!(prompts.len(), 9);
}

/// On the CPU a record's bits do not depend on what shared its model call. Merging chunks of
/// different stages into one call (`merge_model_calls`), decoding one row at a time with the
/// others joining as rows finish (`decode_rows = 1`), and computing the few-shot prefix once
/// per batch (`share_prefix`) each give the plain run's events, payload for payload, through
/// SFT's checkpoint hashes.
#[test]
fn batching_choices_change_no_event() {
    let fx = Fixture::new();
    let plain = fx.write_spec("plain.toml", 4, "");
    let a = fx.run(&plain, "plain").expect("plain");
    let base = fx.spec_text(4, "");
    let policy = "[models.policy]\npath = \"tiny.gguf\"";
    assert!(base.contains(policy), "the fixture's policy model");
    let variants = [
        (
            "merged",
            base.replace("seed = 4", "seed = 4\nmerge_model_calls = true"),
        ),
        (
            "rows",
            base.replace(policy, &format!("{policy}\ndecode_rows = 1")),
        ),
        (
            "shared",
            base.replace(policy, &format!("{policy}\nshare_prefix = true")),
        ),
    ];
    let want = dataflow_events(&fx.dir.path().join("plain"));
    assert!(want.values().any(|(s, _, _)| s == "sft"), "the run trained");
    for (name, text) in variants {
        assert_ne!(text, base, "{name}: the variant changes the spec");
        let path = fx.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write");
        let b = fx.run(&path, name).expect(name);
        for (stage, s) in &a.stages {
            assert_eq!(b.stages[stage].computed, s.computed, "{name}: {stage}");
        }
        let got = dataflow_events(&fx.dir.path().join(name));
        assert_eq!(got.len(), want.len(), "{name}: event count");
        for (key, event) in &want {
            assert_eq!(got.get(key), Some(event), "{name}: event {key}");
        }
    }
}

/// `cairn export --what sft` writes exactly the examples the SFT steps trained on, and
/// `cairn log trace` walks a final revision back to its prompt through every round.
#[test]
fn export_and_trace_read_a_finished_run() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 7, "");
    fx.run(&spec, "log").expect("run");
    let log = fx.dir.path().join("log");
    let bin = env!("CARGO_BIN_EXE_cairn");
    let out = fx.dir.path().join("sft.jsonl");
    let status = std::process::Command::new(bin)
        .args(["-q", "export"])
        .arg(&log)
        .args(["--what", "sft", "--out"])
        .arg(&out)
        .status()
        .expect("export");
    assert!(status.success());
    let trained: u64 = LogReader::open(&log)
        .expect("log")
        .iter_from(0)
        .filter_map(|e| match e.expect("event").payload {
            Payload::SftStep(s) => Some(s.examples),
            _ => None,
        })
        .sum();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .expect("read")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len() as u64, trained);
    assert!(
        lines
            .iter()
            .all(|l| l["messages"][0]["role"] == "user" && l["messages"][1]["role"] == "assistant")
    );

    let revision = LogReader::open(&log)
        .expect("log")
        .iter_stage(0, "revise_2")
        .next()
        .expect("a revision")
        .expect("event");
    let trace = std::process::Command::new(bin)
        .args(["-q", "log", "trace"])
        .arg(&log)
        .arg(revision.key.to_string())
        .output()
        .expect("trace");
    assert!(trace.status.success());
    let text = String::from_utf8_lossy(&trace.stdout);
    let stages: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        stages,
        [
            "prompts",
            "sample",
            "critique_1",
            "revise_1",
            "critique_2",
            "revise_2"
        ],
        "{text}"
    );
    let bad = std::process::Command::new(bin)
        .args(["-q", "log", "trace"])
        .arg(&log)
        .arg("nothex")
        .output()
        .expect("trace");
    assert!(!bad.status.success());
}

/// A stage whose tasks need different kinds of work (pure and model calls) gets each kind
/// in chunks of its own: every task is completed with its own kind of reply.
#[test]
fn a_stage_mixing_pure_and_model_work_completes_every_task() {
    use cairn::model::{GenerateRequest, SamplingParams};
    use cairn::record::{FlagRecord, Key};
    use cairn::stages::{Reply, Stage, StageContext, StageError, StageSettings, Task, Work};
    struct Mixed;
    impl Stage for Mixed {
        fn name(&self) -> &str {
            "mixed"
        }
        fn accepts(&self, rec: &cairn::stages::Rec) -> bool {
            matches!(rec.payload, Payload::Sample(_))
        }
        fn models(&self) -> Vec<String> {
            vec!["policy".into()]
        }
        fn plan(&self, rec: &cairn::stages::Rec) -> Result<Vec<Task>, StageError> {
            let flag = |reason: &str| {
                Payload::Flag(FlagRecord {
                    flagged: rec.key,
                    reason: reason.into(),
                })
            };
            Ok(vec![
                Task {
                    key: Key::builder("mixed").key(rec.key).u64(0).finish(),
                    input: rec.clone(),
                    history: Vec::new(),
                    work: Work::Pure(flag("pure")),
                },
                Task {
                    key: Key::builder("mixed").key(rec.key).u64(1).finish(),
                    input: rec.clone(),
                    history: Vec::new(),
                    work: Work::generate(
                        "policy",
                        GenerateRequest {
                            prompt: vec![1, 65, 66],
                            params: SamplingParams::greedy(2),
                        },
                    ),
                },
            ])
        }
        fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
            let reason = match (&task.work, reply.generation(), &reply) {
                (Work::Pure(_), _, Reply::Pure(_)) => "pure".to_string(),
                (Work::Model { .. }, Some(g), _) => {
                    format!("generated {}", g.tokens.len())
                }
                _ => {
                    return Err(StageError::Config {
                        stage: "mixed".into(),
                        message: "reply of the wrong kind".into(),
                    });
                }
            };
            Ok(Payload::Flag(FlagRecord {
                flagged: task.input.key,
                reason,
            }))
        }
    }
    fn build(_: &str, _: &StageSettings, _: &StageContext) -> Result<Box<dyn Stage>, StageError> {
        Ok(Box::new(Mixed))
    }
    let fx = Fixture::new();
    // Right after `sample`, so that it sees every sample (it consumes them).
    let text = fx.spec_text(7, "").replace(
        "[[stage]]\nname = \"critique_1\"",
        "[[stage]]\nname = \"mixed\"\nkind = \"mixed\"\nfrom = \"sample\"\n[[stage]]\nname = \"critique_1\"",
    );
    let path = fx.dir.path().join("mixed.toml");
    std::fs::write(&path, text).expect("write");
    let spec = Spec::load(&path).expect("spec");
    let mut kinds = cairn::stages::registry();
    kinds.push(cairn::stages::StageKind::model(
        "mixed",
        "pure and model work together",
        build,
    ));
    let log = fx.dir.path().join("log");
    engine::run_with(&spec, &common::cpu_run(log.clone()), &kinds).expect("run");
    let reasons: Vec<String> = LogReader::open(&log)
        .expect("log")
        .iter_stage(0, "mixed")
        .filter_map(|e| match e.expect("event").payload {
            Payload::Flag(f) => Some(f.reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "pure").count(),
        7,
        "{reasons:?}"
    );
    // Greedy generation of up to 2 tokens (it may stop early on an end-of-turn token).
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("generated ") && *r != "generated 0")
            .count(),
        7
    );
}

/// `replay` rebuilds what the run built from its events alone; `--verify` re-executes logged
/// model steps and reproduces them exactly, and names a step whose logged output was altered.
#[test]
fn replay_rebuilds_the_run_and_verify_reexecutes_logged_steps() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 21, "");
    let summary = fx.run(&spec, "log").expect("run");
    let log = fx.dir.path().join("log");
    let rebuilt = cairn::replay::rebuild(&log).expect("rebuild");
    let steps: Vec<Payload> = LogReader::open(&log)
        .expect("log")
        .iter_from(0)
        .map(|e| e.expect("event").payload)
        .filter(|p| matches!(p, Payload::SftStep(_)))
        .collect();
    let trained: u64 = steps
        .iter()
        .map(|p| match p {
            Payload::SftStep(s) => s.examples,
            _ => 0,
        })
        .sum();
    assert_eq!(
        rebuilt.sft.len() as u64,
        trained,
        "every example SFT trained on"
    );
    assert_eq!(
        rebuilt.metrics.len(),
        steps.len() + count_kind(&log, "sft_eval")
    );
    assert_eq!(rebuilt.checkpoints.len(), 1);
    assert_eq!(rebuilt.checkpoints[0].record.path, summary.checkpoints[0]);
    assert_eq!(rebuilt.checkpoints[0].intact, Some(true));
    assert_eq!(rebuilt.events as usize, events(&log).len());

    // The report of an SL-only run says there are no RL records rather than failing.
    let page = common::check_report(&log, &fx.dir.path().join("report"), &[]);
    assert!(page.contains("id=\"no-rl\""));
    assert!(page.contains("SFT training loss") && page.contains("class=\"lineage\""));

    let report = cairn::engine::verify(&log, 6, None, &[]).expect("verify");
    assert!(report.checked >= 6, "{report:?}");
    assert!(report.diverged.is_empty(), "{:?}", report.diverged);
    assert_eq!(report.skipped, Vec::<String>::new());
    // A model override must name a model of the recorded spec.
    let unknown = vec![("nope".to_string(), std::path::PathBuf::from("elsewhere"))];
    let err = cairn::engine::verify(&log, 6, None, &unknown).expect_err("unknown model");
    assert!(err.to_string().contains("no model `nope`"), "{err}");

    // Alter one logged critique: verify must name it.
    let altered = fx.dir.path().join("altered");
    let writer =
        cairn::log::LogWriter::open(&altered, cairn::log::LogOptions::default()).expect("writer");
    let mut target = None;
    for env in LogReader::open(&log).expect("log").iter_from(0) {
        let env = env.expect("event");
        let mut payload = env.payload.clone();
        if let Payload::Critique(c) = &mut payload
            && target.is_none()
        {
            c.critique.push_str(" (edited)");
            target = Some(env.key);
        }
        let mut ev = cairn::record::NewEvent::new(
            env.key,
            env.run_id,
            env.stage,
            env.parents,
            env.epoch,
            payload,
        );
        ev.wall_ns = env.wall_ns;
        writer.append(ev).expect("append");
    }
    writer.close().expect("close");
    let report = cairn::engine::verify(&altered, 100, None, &[]).expect("verify altered");
    let target = target.expect("a critique");
    let diverged: Vec<Key> = report.diverged.iter().map(|(k, _, _)| *k).collect();
    assert!(diverged.contains(&target), "{:?}", report.diverged);
    // Anything else that diverged was computed from the altered record.
    let altered_events = events(&altered);
    for k in diverged.iter().filter(|k| **k != target) {
        let (stage, parents, _) = &altered_events[&k.to_string()];
        assert!(
            parents.contains(&target.to_string()),
            "{stage} {k} diverged without being derived from the altered critique"
        );
    }
}

/// A fork with unchanged settings reproduces the original downstream events; a fork with
/// another constitution reuses the samples and changes only what comes after them.
#[test]
fn fork_reuses_upstream_events_and_recomputes_downstream() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 8, "");
    fx.run(&spec, "log").expect("run");
    let log = fx.dir.path().join("log");
    let original = events(&log);
    let opts = |out: &str| common::cpu_run(fx.dir.path().join(out));
    let same = cairn::engine::fork(&log, "critique_1", &[], None, &opts("same")).expect("fork");
    assert_eq!(same.reused_stages, vec!["prompts", "sample"]);
    assert_eq!(same.summary.stages["sample"].computed, 0);
    assert_eq!(same.summary.stages["critique_1"].computed, 5);
    let forked = events(&fx.dir.path().join("same"));
    let dataflow = |m: &BTreeMap<String, (String, Vec<String>, String)>| {
        m.iter()
            .filter(|(_, (s, _, _))| s != "run" && s != "fork")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(dataflow(&forked), dataflow(&original));
    // The new run records its parent.
    let parent = LogReader::open(&fx.dir.path().join("same"))
        .expect("log")
        .iter_from(0)
        .find_map(|e| match e.expect("event").payload {
            Payload::RunStarted(r) => r.parent_run,
            _ => None,
        });
    assert_eq!(parent, Some(same.parent));

    // Another constitution: one critique principle reworded.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("constitutions/default.toml"),
    )
    .expect("constitution");
    let other = fx.dir.path().join("other.toml");
    std::fs::write(&other, text.replacen("name = \"", "name = \"other-", 1)).expect("write");
    let changed = cairn::engine::fork(
        &log,
        "critique_1",
        &[("constitution".into(), other.display().to_string())],
        None,
        &opts("changed"),
    )
    .expect("fork with another constitution");
    assert_eq!(
        changed.summary.stages["sample"].computed, 0,
        "samples reused"
    );
    let new = events(&fx.dir.path().join("changed"));
    let by_stage = |m: &BTreeMap<String, (String, Vec<String>, String)>, stage: &str| {
        m.iter()
            .filter(|(_, (s, _, _))| s == stage)
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(by_stage(&new, "sample"), by_stage(&original, "sample"));
    for stage in ["critique_1", "revise_1", "critique_2", "revise_2", "sft"] {
        let (a, b) = (by_stage(&new, stage), by_stage(&original, stage));
        assert!(!a.is_empty());
        assert!(
            a.iter().all(|k| !b.contains(k)),
            "{stage}: downstream events must be recomputed under the new constitution"
        );
    }
    // Changing a stage before the fork point is refused.
    let err = cairn::engine::fork(
        &log,
        "critique_1",
        &[("stage.sample.max_new_tokens".into(), "3".into())],
        None,
        &opts("refused"),
    )
    .expect_err("upstream change");
    assert!(err.to_string().contains("fork from `sample`"), "{err}");
}

/// Replay into a live dataflow: a finished run's recorded streams feed a spec with a new
/// stage; the recorded stages compute nothing and the new stage runs on their records.
#[test]
fn recorded_streams_feed_a_new_stage() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 9, "");
    fx.run(&spec, "finished").expect("run");
    let finished = fx.dir.path().join("finished");
    let with_flag = fx.write_spec(
        "flag.toml",
        9,
        &format!(
            "[[stage]]\nname = \"flag\"\nkind = \"flag\"\nfrom = [\"revise_2\"]\nwords = [{}]\n",
            WORDS.map(|w| format!("\"{w}\"")).join(", ")
        ),
    );
    let with_flag = Spec::load(&with_flag).expect("spec");
    let dev = fx.dir.path().join("dev");
    let names: std::collections::HashSet<String> = std::iter::once("prompts".to_string())
        .chain(with_flag.stages.iter().map(|s| s.name.clone()))
        .collect();
    let (copied, _) =
        engine::import_events(&finished, &dev, |e| names.contains(&e.stage)).expect("import");
    assert!(copied > 0);
    let mut kinds = cairn::stages::registry();
    kinds.push(custom_stage::kind());
    let summary = engine::run_with(&with_flag, &common::cpu_run(dev.clone()), &kinds)
        .expect("run with a new stage");
    for stage in ["sample", "critique_1", "revise_1", "critique_2", "revise_2"] {
        assert_eq!(summary.stages[stage].computed, 0, "{stage} recomputed");
        assert!(summary.stages[stage].replayed > 0);
    }
    let revisions: Vec<String> = LogReader::open(&finished)
        .expect("log")
        .iter_stage(0, "revise_2")
        .filter_map(|e| match e.expect("event").payload {
            Payload::Revision(r) => Some(r.response.to_lowercase()),
            _ => None,
        })
        .collect();
    let expected = revisions
        .iter()
        .filter(|r| WORDS.iter().any(|w| r.contains(w)))
        .count();
    assert!(expected > 0, "the new stage must have something to flag");
    assert_eq!(word_hits(&dev).len(), expected);
}

/// Any of these in a (random-byte) revision gets it flagged.
const WORDS: [&str; 12] = ["a", "e", "i", "o", "u", "s", "t", "n", "r", " ", ".", "l"];

/// Dataflow events of a log (partitioned or not), without the per-run bookkeeping.
/// `--reuse LOG --recompute-from STAGE` copies only the stages before STAGE: the copy holds
/// exactly their events, and the run computes STAGE and what follows to the same events.
#[test]
fn reuse_with_recompute_from_copies_only_the_stages_before_it() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 11, "");
    fx.run(&spec, "finished").expect("run");
    let finished = fx.dir.path().join("finished");
    let upstream = ["prompts", "sample", "critique_1", "revise_1"];
    let expected = events(&finished)
        .values()
        .filter(|(stage, _, _)| upstream.contains(&stage.as_str()))
        .count();
    assert!(expected > 0);
    let dev = fx.dir.path().join("dev");
    let cli = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["-q", "run"])
            .arg(&spec)
            .arg("--log")
            .arg(&dev)
            .arg("--reuse")
            .arg(&finished)
            .args(extra)
            .args(["--device", "cpu"])
            .output()
            .expect("cairn run")
    };
    let out = cli(&["--recompute-from", "critique_2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{expected} events copied")),
        "{expected} upstream events expected in: {stdout}"
    );
    assert_eq!(dataflow_events(&dev), dataflow_events(&finished));
    let bad = cli(&["--recompute-from", "no_such_stage"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no_such_stage"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

fn dataflow_events(log: &Path) -> BTreeMap<String, (String, Vec<String>, String)> {
    events(log)
        .into_iter()
        .filter(|(_, (s, _, _))| s != "run")
        .collect()
}

/// Four worker threads produce exactly the events of one worker (epochs sharded across
/// workers, training on worker 0), into four log partitions that read as one log; a rerun
/// resumes across the partitions.
#[test]
fn four_workers_give_the_events_of_one() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 13, "");
    let one = fx.run(&spec, "one").expect("one worker");
    let parsed = Spec::load(&spec).expect("spec");
    let opts = RunOptions {
        log: fx.dir.path().join("four"),
        device: Device::Cpu,
        new_run: false,
        stop: None,
        progress: None,
        parent: None,
        cluster: Some(engine::Cluster {
            workers: 4,
            process: 0,
            hosts: Vec::new(),
            secret: None,
        }),
    };
    let summary = engine::run(&parsed, &opts).expect("four workers");
    assert_eq!(summary.prompts, 7);
    // The same requests, spread over four model workers, prefill the same prompt tokens.
    assert!(!one.prefill.is_empty(), "prefills are counted");
    // (Token counts, not their wall time, which no two runs share.)
    let counts = |s: &RunSummary| -> Vec<(String, u64, u64)> {
        s.prefill
            .iter()
            .map(|(m, p)| (m.clone(), p.computed, p.reused))
            .collect()
    };
    assert_eq!(counts(&summary), counts(&one));
    let four = fx.dir.path().join("four");
    assert_eq!(cairn::log::partitions(&four).expect("parts").len(), 4);
    assert_eq!(
        dataflow_events(&four),
        dataflow_events(&fx.dir.path().join("one"))
    );
    // Epochs were spread: more than one partition holds samples.
    let with_samples = cairn::log::partitions(&four)
        .expect("parts")
        .iter()
        .filter(|p| count_kind(p, "sample") > 0)
        .count();
    assert!(with_samples > 1, "samples in {with_samples} partition(s)");
    // `watch` reads every partition.
    let watch = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["-q", "watch", "--once"])
        .arg(&four)
        .output()
        .expect("watch");
    let shown = String::from_utf8_lossy(&watch.stdout);
    let samples = shown
        .lines()
        .find(|l| l.starts_with("sample "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<usize>().ok());
    assert_eq!(samples, Some(7), "{shown}");
    let again = engine::run(&parsed, &opts).expect("resume");
    assert_eq!(again.stages["sample"].computed, 0);
    assert_eq!(
        dataflow_events(&four),
        dataflow_events(&fx.dir.path().join("one"))
    );
    // A single writer is refused on the partitioned log before it writes anything (its
    // root segments would hide the partitions from every reader).
    let listing = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing(&four);
    let err = engine::run(
        &parsed,
        &RunOptions {
            cluster: None,
            ..opts.clone()
        },
    )
    .expect_err("one worker on a partitioned log");
    assert!(err.to_string().contains("--workers 4"), "{err}");
    assert_eq!(listing(&four), before);
    assert_eq!(
        dataflow_events(&four),
        dataflow_events(&fx.dir.path().join("one"))
    );
    // `--reuse` with several workers is refused before it copies.
    let fresh = fx.dir.path().join("fresh");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["-q", "run"])
        .arg(&spec)
        .arg("--log")
        .arg(&fresh)
        .arg("--reuse")
        .arg(fx.dir.path().join("one"))
        .args(["--workers", "2", "--device", "cpu"])
        .output()
        .expect("cairn run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--reuse"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!fresh.exists() || listing(&fresh).is_empty());
}

/// Two processes of two workers each, over TCP on localhost: the same events as one worker;
/// killing one process mid-run and restarting both continues with nothing lost or doubled.
#[test]
fn two_processes_match_one_worker_and_survive_a_kill() {
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 17, "");
    fx.run(&spec, "one").expect("one worker");
    let reference = dataflow_events(&fx.dir.path().join("one"));
    let start = |log: &Path, hosts: &Path, id: usize| cluster_process(&spec, log, hosts, id, &[]);
    let hosts_file = |name: &str| {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .expect("port")
                    .local_addr()
                    .expect("addr")
                    .port()
            })
            .collect();
        let path = fx.dir.path().join(name);
        std::fs::write(
            &path,
            ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}\n"))
                .collect::<String>(),
        )
        .expect("hosts");
        path
    };
    // Uninterrupted.
    let log = fx.dir.path().join("cluster");
    let hosts = hosts_file("hosts1.txt");
    let began = std::time::Instant::now();
    all_succeed((0..2).map(|i| start(&log, &hosts, i)).collect());
    let span = began.elapsed();
    assert_eq!(cairn::log::partitions(&log).expect("parts").len(), 4);
    assert_eq!(dataflow_events(&log), reference);

    // Killed: process 1 dies mid-run, process 0 is stopped too; then both restart. The kill
    // comes sooner until it lands before the run is complete.
    let mut delay = span.mul_f64(0.6);
    let mut attempt = 0;
    let log = loop {
        attempt += 1;
        let log = fx.dir.path().join(format!("killed{attempt}"));
        let hosts = hosts_file(&format!("hosts-kill{attempt}.txt"));
        let mut children: Vec<_> = (0..2).map(|i| start(&log, &hosts, i)).collect();
        std::thread::sleep(delay);
        children[1].kill().expect("kill process 1");
        let _ = children[1].wait();
        let _ = children[0].kill();
        let _ = children[0].wait();
        let started = cairn::log::partitions(&log)
            .map(|p| !p.is_empty())
            .unwrap_or(false);
        let partial = started && dataflow_events(&log).len() < reference.len();
        if partial || attempt == 8 {
            assert!(partial, "never killed mid-run");
            break log;
        }
        // Too late: kill sooner; too early (nothing logged yet): later.
        delay = delay.mul_f64(if started { 0.5 } else { 1.5 });
    };
    let hosts = hosts_file("hosts-restart.txt");
    all_succeed((0..2).map(|i| start(&log, &hosts, i)).collect());
    assert_eq!(dataflow_events(&log), reference);
}

/// Cluster links: a stray connection is refused while the run waits for its peer; bytes
/// corrupted in flight end both processes with an error naming the link, the log stays
/// intact, and the same commands then finish the run with the events of one worker.
#[test]
fn a_corrupt_link_ends_the_run_with_a_clear_error_and_the_log_intact() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let fx = Fixture::new();
    let spec = fx.write_spec("flow.toml", 19, "");
    fx.run(&spec, "one").expect("one worker");
    let reference = dataflow_events(&fx.dir.path().join("one"));
    let bin = env!("CARGO_BIN_EXE_cairn");
    let secret = fx.dir.path().join("secret");
    std::fs::write(&secret, "correct horse\n").expect("secret");
    let start = |log: &Path, hosts: &Path, id: usize| {
        cluster_process(
            &spec,
            log,
            hosts,
            id,
            &["--secret-file".as_ref(), secret.as_os_str()],
        )
    };
    let port = || {
        TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port()
    };
    let (p0, p1, proxy_port) = (port(), port(), port());
    let write_hosts = |name: &str, first: u16| {
        let path = fx.dir.path().join(name);
        std::fs::write(&path, format!("127.0.0.1:{first}\n127.0.0.1:{p1}\n")).expect("hosts");
        path
    };
    let direct = write_hosts("direct.txt", p0);
    // Process 1 reaches process 0 through a proxy that inverts every byte after the first
    // 200 it forwards towards process 0 (the handshake is 84 bytes).
    let via_proxy = write_hosts("proxy.txt", proxy_port);
    let listener = TcpListener::bind(("127.0.0.1", proxy_port)).expect("proxy");
    let proxy = std::thread::spawn(move || {
        let (mut from_one, _) = listener.accept().expect("accept");
        let mut to_zero = loop {
            match TcpStream::connect(("127.0.0.1", p0)) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        let (mut back_from, mut back_to) = (
            to_zero.try_clone().expect("clone"),
            from_one.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            // Process 0 is gone: close process 1's side as its own socket would close.
            let _ = back_to.shutdown(std::net::Shutdown::Both);
        });
        let mut forwarded = 0usize;
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_one.read(&mut buf) {
            if n == 0 {
                break;
            }
            for b in &mut buf[..n] {
                if forwarded >= 200 {
                    *b = !*b;
                }
                forwarded += 1;
            }
            if to_zero.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let log = fx.dir.path().join("cluster");
    let zero = start(&log, &direct, 0);
    // A stray client is refused; process 0 goes on waiting for process 1.
    let mut stray = loop {
        match TcpStream::connect(("127.0.0.1", p0)) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    stray
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n..........................")
        .expect("stray bytes");
    let one = start(&log, &via_proxy, 1);
    let wait = |child: std::process::Child, who: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut child = child;
        loop {
            if let Some(_status) = child.try_wait().expect("try_wait") {
                return child.wait_with_output().expect("output");
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "{who} hung on a corrupt link: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let out0 = wait(zero, "process 0");
    let out1 = wait(one, "process 1");
    let _ = proxy.join();
    let err0 = String::from_utf8_lossy(&out0.stderr).into_owned();
    let err1 = String::from_utf8_lossy(&out1.stderr).into_owned();
    assert!(
        !out0.status.success() && !out1.status.success(),
        "{err0}\n{err1}"
    );
    assert!(
        err0.contains("cluster link") && err0.contains("process 1"),
        "process 0 must name the link to process 1: {err0}"
    );
    assert!(
        err0.contains("refused a connection"),
        "stray not reported: {err0}"
    );
    assert!(err1.contains("cluster link"), "{err1}");
    // The log is intact, and the same commands (without the proxy) finish the run.
    let verify = std::process::Command::new(bin)
        .args(["-q", "log", "verify"])
        .arg(&log)
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    all_succeed((0..2).map(|i| start(&log, &direct, i)).collect());
    assert_eq!(dataflow_events(&log), reference);
}

/// Starts process `id` of a run of `spec` on two processes of two workers each.
fn cluster_process(
    spec: &Path,
    log: &Path,
    hosts: &Path,
    id: usize,
    extra: &[&std::ffi::OsStr],
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["-q", "run"])
        .arg(spec)
        .arg("--log")
        .arg(log)
        .args(["--device", "cpu", "--workers", "2", "--processes", "2"])
        .args(["--process-id", &id.to_string()])
        .arg("--hosts")
        .arg(hosts)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Waits for every process and asserts that each one succeeded.
fn all_succeed(children: Vec<std::process::Child>) {
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every dataflow shipped in `dataflows/` parses and validates (`Spec::load`) and names only
/// stage kinds that exist: a broken example is caught here, not by a user.
#[test]
fn every_shipped_dataflow_parses_and_names_known_stages() {
    let kinds: Vec<&str> = cairn::stages::registry().iter().map(|k| k.name).collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("dataflows/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let spec = Spec::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for stage in &spec.stages {
            assert!(
                kinds.contains(&stage.kind.as_str()),
                "{}: stage `{}` has unknown kind `{}`",
                path.display(),
                stage.name,
                stage.kind
            );
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} dataflows found");
}

#[test]
fn a_stage_probe_makes_the_calls_a_run_makes_and_measures_each() {
    use cairn::engine::probe::{ProbeOptions, StageProbe};
    let fx = Fixture::new();
    let spec_path = fx.write_spec("flow.toml", 11, "");
    fx.run(&spec_path, "log").expect("run");
    let logged: BTreeMap<Key, (String, Vec<Key>, Payload)> =
        LogReader::open(&fx.dir.path().join("log"))
            .expect("log")
            .iter_from(0)
            .map(|e| {
                let e = e.expect("event");
                (e.key, (e.stage, e.parents, e.payload))
            })
            .collect();
    let spec = Spec::load(&spec_path).expect("spec");
    let opts = ProbeOptions {
        device: Device::Cpu,
        prompts: None,
        stages: None,
    };
    let mut probe = StageProbe::new(&spec, &cairn::stages::registry(), &opts).expect("probe");
    let names = probe.stage_names();
    assert_eq!(
        names,
        ["sample", "critique_1", "revise_1", "critique_2", "revise_2"],
        "model stages only, in spec order"
    );
    for name in &names {
        let m = probe.run_stage(name).expect("stage runs");
        assert!(m.records > 0, "{name} produced nothing");
        let batch = if name == "sample" { 3 } else { 16 };
        for c in &m.calls {
            // Epochs of 2 prompts: no chunk is larger than an epoch's tasks or the batch.
            assert!(
                c.rows >= 1 && c.rows <= batch,
                "{name}: a call of {} rows",
                c.rows
            );
            assert!(c.new_tokens >= c.rows as u64, "{name}: every row generates");
            assert_eq!(
                c.prefilled_tokens, c.prompt_tokens,
                "{name}: no prefix sharing here"
            );
            assert!(c.prefill_seconds > 0.0 && c.prefill_seconds <= c.seconds);
        }
    }
    let mut compared = 0;
    for rec in probe.records().filter(|r| r.stage != "prompts") {
        let (stage, parents, payload) = logged
            .get(&rec.key)
            .unwrap_or_else(|| panic!("the probe made {} that the run did not", rec.key));
        assert_eq!((stage, parents), (&rec.stage, &rec.parents));
        assert_eq!(
            payload, &rec.payload,
            "{}: the probe's record differs",
            rec.stage
        );
        compared += 1;
    }
    let run_outputs = logged
        .values()
        .filter(|(stage, ..)| names.contains(stage))
        .count();
    assert_eq!(
        compared, run_outputs,
        "every output of the run, and nothing else"
    );

    let limited = ProbeOptions {
        prompts: Some(2),
        stages: Some(vec!["sample".into()]),
        ..opts
    };
    let mut probe = StageProbe::new(&spec, &cairn::stages::registry(), &limited).expect("probe");
    assert_eq!(probe.run_stage("sample").expect("sample").records, 2);
    let unknown = ProbeOptions {
        stages: Some(vec!["nope".into()]),
        ..limited
    };
    let err = StageProbe::new(&spec, &cairn::stages::registry(), &unknown)
        .err()
        .expect("an unknown stage is refused");
    assert!(
        err.to_string().contains("no model stage named `nope`"),
        "{err}"
    );
}
