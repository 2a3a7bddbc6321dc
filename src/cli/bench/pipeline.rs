//! `cairn bench pipeline`: what the stages of a real spec do with their models, measured
//! call by call, beside baselines on the same prompts in the same run. A stage probe
//! (`cairn::engine::probe`) runs the spec's model stages one after another on its first
//! prompts, each call exactly as `cairn run` makes it (prompts, sampling settings, batch,
//! prefix sharing). After each stage, every generation call it made is run again three ways
//! on a second copy of the same model, to say where the time goes:
//!
//! - **as sent, no early stop**: the same requests and seeds, every row generating its full
//!   length (what rows finishing early cost the batch);
//! - **greedy, same prompts**: those prompts decoded greedily to the same length (what
//!   sampling costs);
//! - **bench prompt**: `cairn bench generate`'s fixed 39-token prompt at the same batch and
//!   length (what the stage's prompt lengths and padding cost).
//!
//! For a model that decodes at most `decode_rows` requests at once, the baselines take the
//! call's first `decode_rows` requests: full batches of the width the call decodes at.
//!
//! With `--peers`, transformers and llama.cpp replay the stage's generation calls on the
//! same prompt tokens with the same sampling settings (`benches/peers/*_calls.py`). Rates are
//! per call sums: decode tokens/s is new tokens over the call's time outside its prefills;
//! this machine is noisy, so read the ratios, measured minutes apart, not the rates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use cairn::engine::probe::{
    CallMeasure, ProbeOptions, StageMeasure, StageProbe, prompt_batch_shape,
};
use cairn::model::{self, GenerateRequest, Llama, Message, Role, SamplingParams};
use cairn::spec::Spec;
use cairn::worker::Job;

/// Arguments of `cairn bench pipeline`.
#[derive(Args, Debug)]
pub struct PipelineBench {
    /// The dataflow spec whose stages are measured.
    #[arg(default_value = "dataflows/cai_real.toml")]
    spec: PathBuf,
    /// Prompts to run, the first in the run's feeding order (one epoch of the real run).
    #[arg(long, default_value_t = 24)]
    prompts: usize,
    /// Model stages to run, in spec order (default: every model stage).
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
    /// Skip the baselines on a second copy of each generating model.
    #[arg(long)]
    no_baselines: bool,
    /// Also replay the generation calls with transformers and llama.cpp (needs
    /// benches/peers/setup.sh).
    #[arg(long)]
    peers: bool,
    /// Python of the peers' virtual environment.
    #[arg(long)]
    peer_python: Option<PathBuf>,
    /// Device (`auto`, `cpu`, `cuda:N`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Sums over calls: seconds, prefill seconds, prefilled tokens, new tokens, rows.
#[derive(Clone, Copy, Default, Debug)]
struct Totals {
    seconds: f64,
    prefill_seconds: f64,
    prompt_tokens: u64,
    prefilled: u64,
    reused: u64,
    padding: u64,
    new_tokens: u64,
    rows: u64,
    calls: u64,
}

impl Totals {
    fn add(&mut self, c: &CallMeasure) {
        self.seconds += c.seconds;
        self.prefill_seconds += c.prefill_seconds;
        self.prompt_tokens += c.prompt_tokens;
        self.prefilled += c.prefilled_tokens;
        self.reused += c.reused_tokens;
        self.padding += c.padding_tokens;
        self.new_tokens += c.new_tokens;
        self.rows += c.rows as u64;
        self.calls += 1;
    }
    fn decode_tok_s(&self) -> Option<f64> {
        let t = self.seconds - self.prefill_seconds;
        (self.new_tokens > 0 && t > 0.0).then(|| self.new_tokens as f64 / t)
    }
    fn prefill_tok_s(&self) -> Option<f64> {
        (self.prefilled > 0 && self.prefill_seconds > 0.0)
            .then(|| self.prefilled as f64 / self.prefill_seconds)
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "calls": self.calls, "rows": self.rows, "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds, "prompt_tokens": self.prompt_tokens,
            "prefilled_tokens": self.prefilled, "reused_prefix_tokens": self.reused,
            "padding_tokens": self.padding, "new_tokens": self.new_tokens,
            "decode_tok_s": self.decode_tok_s(), "prefill_tok_s": self.prefill_tok_s(),
        })
    }
}

/// A second copy of one of the spec's models, for the baselines.
struct Baseline {
    model: Llama,
    bench_prompt: Vec<u32>,
}

impl Baseline {
    fn load(spec: &Spec, name: &str, device: tch::Device) -> anyhow::Result<Baseline> {
        let m = spec
            .models
            .iter()
            .find(|m| m.name == name)
            .with_context(|| format!("model `{name}` is not in the spec"))?;
        let mut loaded = model::load::load_as(&m.path, device, m.dtype)
            .with_context(|| format!("loading {} for the baselines", m.path.display()))?;
        loaded.model.set_share_prefix(m.share_prefix);
        loaded.model.set_decode_rows(m.decode_rows);
        if m.quantised {
            model::load::keep_quantised(&mut loaded)?;
        } else {
            loaded.model.keep_only_packed()?;
        }
        let bench_prompt = loaded.tokenizer.encode_chat(&[Message::new(
            Role::User,
            "Write a short story about a lighthouse keeper.",
        )])?;
        Ok(Baseline {
            model: loaded.model,
            bench_prompt,
        })
    }

    /// Runs `requests` without end-of-turn tokens (every row runs its full length).
    fn time(&self, requests: &[GenerateRequest]) -> anyhow::Result<CallMeasure> {
        let prefill_before = self.model.prefill_seconds();
        let prefilled_before = self.model.prompt_tokens_prefilled();
        let started = std::time::Instant::now();
        let out = model::generate::generate(&self.model, &[], requests)?;
        let seconds = started.elapsed().as_secs_f64();
        let job = Job::Generate(requests.to_vec());
        let (rows, prompt_tokens, padding_tokens) = prompt_batch_shape(&job);
        Ok(CallMeasure {
            model: String::new(),
            job,
            rows,
            seconds,
            prefill_seconds: (self.model.prefill_seconds() - prefill_before).min(seconds),
            prompt_tokens,
            prefilled_tokens: self.model.prompt_tokens_prefilled() - prefilled_before,
            reused_tokens: 0,
            padding_tokens,
            new_tokens: out.iter().map(|g| g.tokens.len() as u64).sum(),
        })
    }

    /// The three baselines of one generation call: as sent without early stop, greedy on
    /// the same prompts, and the bench prompt at the same batch, all to the call's length.
    /// A call with more requests than the model decodes at once (`decode_rows`) is measured
    /// on its first `decode_rows` requests: the baselines are full batches of the width the
    /// call decodes at, without the tail a partial last cohort would add.
    fn of_call(&self, requests: &[GenerateRequest]) -> anyhow::Result<[CallMeasure; 3]> {
        let width = self
            .model
            .decode_rows()
            .unwrap_or(requests.len())
            .min(requests.len());
        let requests = &requests[..width];
        let longest = requests
            .iter()
            .map(|r| r.params.max_new_tokens)
            .max()
            .unwrap_or(1);
        let unstopped: Vec<GenerateRequest> = requests
            .iter()
            .map(|r| GenerateRequest {
                prompt: r.prompt.clone(),
                params: SamplingParams {
                    stop: Vec::new(),
                    ..r.params.clone()
                },
            })
            .collect();
        let greedy: Vec<GenerateRequest> = requests
            .iter()
            .map(|r| GenerateRequest {
                prompt: r.prompt.clone(),
                params: SamplingParams::greedy(r.params.max_new_tokens),
            })
            .collect();
        let bench: Vec<GenerateRequest> = requests
            .iter()
            .map(|_| GenerateRequest {
                prompt: self.bench_prompt.clone(),
                params: SamplingParams::greedy(longest),
            })
            .collect();
        Ok([
            self.time(&unstopped)?,
            self.time(&greedy)?,
            self.time(&bench)?,
        ])
    }
}

/// The generation requests of a call (`None` for scoring calls).
fn generate_requests(c: &CallMeasure) -> Option<&[GenerateRequest]> {
    match &c.job {
        Job::Generate(r) => Some(r),
        _ => None,
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn show(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

/// The peers' replay of every generation call of the stages measured.
fn run_peers(
    args: &PipelineBench,
    spec: &Spec,
    measures: &[StageMeasure],
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let python = args.peer_python.clone().unwrap_or_else(|| {
        cairn::paths::cairn_home()
            .join("venv-peers")
            .join("bin")
            .join("python")
    });
    let mut out = serde_json::Map::new();
    let dir = std::env::temp_dir().join(format!("cairn-bench-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for m in measures {
        let calls: Vec<&CallMeasure> = m
            .calls
            .iter()
            .filter(|c| generate_requests(c).is_some())
            .collect();
        let Some(first) = calls.first() else {
            continue;
        };
        let model = spec
            .models
            .iter()
            .find(|s| s.name == first.model)
            .with_context(|| format!("model `{}`", first.model))?;
        if model.path.is_dir() {
            eprintln!(
                "peers skip stage `{}`: its model is a directory, not a GGUF",
                m.stage
            );
            continue;
        }
        let eos = model::load::load_tokenizer(&model.path)?.eos_ids().to_vec();
        let calls_json: Vec<serde_json::Value> = calls
            .iter()
            .filter_map(|c| generate_requests(c))
            .map(|reqs| {
                serde_json::json!(
                    reqs.iter()
                        .map(|r| serde_json::json!({
                            "prompt": r.prompt,
                            "temperature": r.params.temperature,
                            "top_p": r.params.top_p,
                            "top_k": r.params.top_k,
                            "max_new_tokens": r.params.max_new_tokens,
                            "seed": r.params.seed,
                            "stop": r.params.stop.iter().chain(&eos).collect::<Vec<_>>(),
                        }))
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        let file = dir.join(format!("{}.json", m.stage));
        std::fs::write(
            &file,
            serde_json::to_vec(&serde_json::json!({ "calls": calls_json }))?,
        )
        .with_context(|| format!("writing {}", file.display()))?;
        let dtype = match model.dtype {
            cairn::dtype::Dtype::F32 => "float32",
            _ => "bfloat16",
        };
        let common = vec![
            "--model".to_string(),
            model.path.display().to_string(),
            "--calls".into(),
            file.display().to_string(),
        ];
        let mut hf = common.clone();
        hf.extend(["--dtype".to_string(), dtype.to_string()]);
        eprintln!("stage `{}`: transformers ({dtype}) …", m.stage);
        if let Some(v) = super::generate::run_peer(&python, "benches/peers/hf_calls.py", &hf)? {
            out.insert(format!("{}/transformers", m.stage), v);
        }
        eprintln!("stage `{}`: llama.cpp …", m.stage);
        if let Some(v) =
            super::generate::run_peer(&python, "benches/peers/llamacpp_calls.py", &common)?
        {
            out.insert(format!("{}/llama.cpp", m.stage), v);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

pub(super) fn run(args: PipelineBench) -> anyhow::Result<ExitCode> {
    let device = model::parse_device(&args.device)?;
    let spec = Spec::load(&args.spec)?;
    let opts = ProbeOptions {
        device,
        prompts: Some(args.prompts),
        stages: (!args.stages.is_empty()).then(|| args.stages.clone()),
    };
    eprintln!(
        "loading the models of {} for its stages …",
        args.spec.display()
    );
    let mut probe = StageProbe::new(&spec, &cairn::stages::registry(), &opts)?;
    // In spec order, whatever order `--stages` names them in: a stage reads what earlier
    // stages produced.
    let names: Vec<String> = probe
        .stage_names()
        .into_iter()
        .filter(|n| opts.stages.as_ref().is_none_or(|s| s.contains(n)))
        .collect();
    let mut baselines: std::collections::HashMap<String, Baseline> = Default::default();
    let mut measures = Vec::new();
    let mut rows_json = Vec::new();
    println!(
        "| stage | model | calls | records | records/s | prompt tok/record | prefilled tok/record | \
         padding share | prefill tok/s | decode tok/s | no early stop | greedy, same prompts | \
         bench prompt | stage / bench prompt |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for name in &names {
        eprintln!("stage `{name}` …");
        let m = probe.run_stage(name)?;
        let mut stage = Totals::default();
        let mut base = [Totals::default(); 3];
        for c in &m.calls {
            stage.add(c);
            let Some(reqs) = generate_requests(c) else {
                continue;
            };
            if args.no_baselines {
                continue;
            }
            if !baselines.contains_key(&c.model) {
                eprintln!("loading a second `{}` for the baselines …", c.model);
                baselines.insert(c.model.clone(), Baseline::load(&spec, &c.model, device)?);
            }
            let b = &baselines[&c.model];
            for (into, got) in base.iter_mut().zip(b.of_call(reqs)?) {
                into.add(&got);
            }
        }
        let model = m.calls.first().map(|c| c.model.clone()).unwrap_or_default();
        let per_record = |n: u64| (m.records > 0).then(|| n as f64 / m.records as f64);
        let padding_share = (stage.prompt_tokens + stage.padding > 0)
            .then(|| stage.padding as f64 / (stage.prompt_tokens + stage.padding) as f64);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.stage,
            model,
            stage.calls,
            m.records,
            show((m.seconds > 0.0).then(|| m.records as f64 / m.seconds), 2),
            show(per_record(stage.prompt_tokens), 0),
            show(per_record(stage.prefilled), 0),
            show(padding_share, 2),
            show(stage.prefill_tok_s(), 0),
            show(stage.decode_tok_s(), 1),
            show(base[0].decode_tok_s(), 1),
            show(base[1].decode_tok_s(), 1),
            show(base[2].decode_tok_s(), 1),
            show(ratio(stage.decode_tok_s(), base[2].decode_tok_s()), 2),
        );
        rows_json.push(serde_json::json!({
            "stage": m.stage, "model": model, "records": m.records, "seconds": m.seconds,
            "calls": stage.json(),
            "baseline_as_sent_no_early_stop": base[0].json(),
            "baseline_greedy_same_prompts": base[1].json(),
            "baseline_bench_prompt": base[2].json(),
        }));
        measures.push(m);
    }
    let peers = if args.peers {
        run_peers(&args, &spec, &measures)?
    } else {
        Default::default()
    };
    if !peers.is_empty() {
        println!();
        println!(
            "| stage | peer | calls | decode tok/s (peer) | decode tok/s (cairn, same calls) | cairn / peer | end-to-end tok/s (peer) | cairn / peer end to end |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|");
        for m in &measures {
            let mut t = Totals::default();
            m.calls
                .iter()
                .filter(|c| generate_requests(c).is_some())
                .for_each(|c| t.add(c));
            for peer in ["transformers", "llama.cpp"] {
                let Some(v) = peers.get(&format!("{}/{peer}", m.stage)) else {
                    continue;
                };
                let theirs = v["decode_tok_s"].as_f64();
                let theirs_e2e = v["end_to_end_tok_s"].as_f64();
                let ours_e2e = (t.seconds > 0.0).then(|| t.new_tokens as f64 / t.seconds);
                println!(
                    "| {} | {peer} | {} | {} | {} | {} | {} | {} |",
                    m.stage,
                    v["calls"],
                    show(theirs, 1),
                    show(t.decode_tok_s(), 1),
                    show(ratio(t.decode_tok_s(), theirs), 2),
                    show(theirs_e2e, 1),
                    show(ratio(ours_e2e, theirs_e2e), 2),
                );
            }
        }
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "bench": "pipeline",
            "spec": args.spec.display().to_string(),
            "prompts": args.prompts,
            "threads": tch::get_num_threads(),
            "stages": rows_json,
            "peers": peers,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
