//! `cairn bench generate`: decode and prefill throughput of the model runtime, reported
//! against baselines measured in the same run — the model's own matmul chain (the compute
//! ceiling of one decode step) and, with `--peers`, Hugging Face transformers and llama.cpp
//! on the same GGUF (`benches/peers/`). Medians of repeated runs after a warm-up: this
//! machine is noisy, so read ratios, not absolute numbers.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use tch::{Device, Kind, Tensor};

use cairn::model::{self, Dtype, GenerateRequest, Llama, Message, Role, SamplingParams, fused};
use cairn::paths;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Generation throughput against the matmul ceiling and Python/C++ peers.
    Generate(GenerateBench),
    /// Engine overhead: records/s through sample -> critique -> revise with an instant model.
    Engine(EngineBench),
    /// RL-CAI: judgements/s and PPO update time against the raw model cost of the same work.
    Rl(RlBench),
}

/// Arguments of `cairn bench rl`.
#[derive(Args, Debug)]
pub struct RlBench {
    /// Model (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Pairs to judge.
    #[arg(long, default_value_t = 16)]
    pairs: usize,
    /// Principles per judgement (each asked in both orders).
    #[arg(long, default_value_t = 1)]
    ensemble: usize,
    /// Few-shot comparisons before each question.
    #[arg(long, default_value_t = 2)]
    few_shot: usize,
    /// Rollouts per PPO update.
    #[arg(long, default_value_t = 8)]
    rollouts: usize,
    /// New tokens per answer (pairs and rollouts).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed repetitions of the PPO update (median reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// Arguments of `cairn bench engine`.
#[derive(Args, Debug)]
pub struct EngineBench {
    /// Prompts to push through.
    #[arg(long, default_value_t = 2000)]
    prompts: usize,
    /// Critique/revision rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Prompts per epoch.
    #[arg(long, default_value_t = 64)]
    epoch_size: usize,
    /// Few-shot examples in critique/revision prompts (tokenising them is engine work).
    #[arg(long, default_value_t = 1)]
    few_shot: usize,
    /// Worker counts to compare (comma-separated); the first is the baseline of the ratios.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    workers: Vec<usize>,
}

/// Arguments of `cairn bench generate`.
#[derive(Args, Debug)]
pub struct GenerateBench {
    /// Model (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8,32,64", value_delimiter = ',')]
    batch: Vec<usize>,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed repetitions per point (median reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Weight formats to measure, comma-separated (`f32`, `bf16`).
    #[arg(long, default_value = "f32,bf16", value_delimiter = ',')]
    dtype: Vec<Dtype>,
    /// Also run the peers in benches/peers/ (needs benches/peers/setup.sh).
    #[arg(long)]
    peers: bool,
    /// Run generation on the plain tensor ops instead of the fused CPU kernels (the
    /// before/after comparison of `src/model/fused`).
    #[arg(long)]
    unfused: bool,
    /// Python of the peers' virtual environment.
    #[arg(long)]
    peer_python: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Generate(args) => generate(args),
        BenchCommand::Engine(args) => engine_bench(args),
        BenchCommand::Rl(args) => rl_bench(args),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn time_it(repeats: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// One decode step's matmuls alone: 30 layers' projections and the vocabulary projection on
/// distinct weights, at batch `b`, in the model's number format. `fused` uses the runtime's
/// fused q/k/v and gate/up matrices; otherwise the seven separate projections of the
/// reference definition. `transposed` multiplies `x · W` by a contiguous transposed copy
/// instead of `x · Wᵀ` by the stored matrix (the library may pack the two differently); the
/// ceiling is the faster layout, so it is the best the matmul library does, not an artefact
/// of one layout. `Packed` is cairn's own chain instead: the fused matrices through
/// `fused::linear_packed`, the products the runtime itself runs.
struct Chain {
    layers: Vec<Vec<Tensor>>,
    layout: Layout,
    /// `(out, in)` of each matrix as stored, whatever layout it is held in (packed panels
    /// pad both).
    shapes: Vec<Vec<(i64, i64)>>,
}

/// How a [`Chain`] holds and multiplies its weights.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `x · Wᵀ` by the stored `[out, in]` matrix.
    Stored,
    /// `x · W` by a contiguous `[in, out]` copy.
    Transposed,
    /// `fused::linear_packed` over `fused::pack_linear(W)`.
    Packed,
}

impl Chain {
    fn new(
        model: &Llama,
        tensors: &[(String, Tensor)],
        fused: bool,
        layout: Layout,
    ) -> anyhow::Result<Chain> {
        let _g = tch::no_grad_guard();
        // Weights as `[out, in]`; the transposed copies become `[in, out]` for `x · W`.
        let get = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.to_device(model.device()))
                .with_context(|| format!("tensor {name}"))
        };
        let c = model.config();
        let mut layers: Vec<Vec<Tensor>> = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let names = [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ];
            let w: Vec<Tensor> = names
                .iter()
                .map(|n| get(&format!("{p}.{n}.weight")))
                .collect::<anyhow::Result<_>>()?;
            if fused {
                layers.push(vec![
                    Tensor::cat(&[&w[0], &w[1], &w[2]], 0),
                    w[3].shallow_clone(),
                    Tensor::cat(&[&w[4], &w[5]], 0),
                    w[6].shallow_clone(),
                ]);
            } else {
                layers.push(w);
            }
        }
        layers.push(vec![get("model.embed_tokens.weight")?]);
        let shapes = layers
            .iter()
            .map(|layer| layer.iter().map(|w| (w.size()[0], w.size()[1])).collect())
            .collect();
        for layer in &mut layers {
            for w in layer.iter_mut() {
                match layout {
                    Layout::Stored => {}
                    Layout::Transposed => *w = w.tr().contiguous(),
                    Layout::Packed => *w = fused::pack_linear(w)?,
                }
            }
        }
        Ok(Chain {
            layers,
            layout,
            shapes,
        })
    }

    /// Seconds of one step on inputs `x` `[batch, hidden]` and `ffn_in`
    /// `[batch, intermediate]`: the mean of 10 back-to-back steps.
    fn step_seconds(&self, x: &Tensor, ffn_in: &Tensor) -> anyhow::Result<f64> {
        let _g = tch::no_grad_guard();
        let h = x.size()[1];
        let reps = 10;
        let t = Instant::now();
        for _ in 0..reps {
            for (layer, shapes) in self.layers.iter().zip(&self.shapes) {
                for (w, &(n, k)) in layer.iter().zip(shapes) {
                    // Each matmul reads its own weight; inputs of the right width.
                    let input = if k == h { x } else { ffn_in };
                    let _ = match self.layout {
                        Layout::Stored => input.matmul(&w.tr()),
                        Layout::Transposed => input.matmul(w),
                        Layout::Packed => fused::linear_packed(input, w, n, None, input.kind())
                            .context("cairn's packed chain")?,
                    };
                }
            }
        }
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    }
}

/// The transformers peer's results for one weights dtype.
fn peer_key(name: &str, dtype: Dtype) -> String {
    match dtype {
        Dtype::F32 => name.to_string(),
        other => format!("{name}_{other}"),
    }
}

fn run_peer(
    python: &std::path::Path,
    script: &str,
    args: &[String],
) -> anyhow::Result<Option<serde_json::Value>> {
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .with_context(|| {
            format!(
                "running {} {script} (run benches/peers/setup.sh first)",
                python.display()
            )
        })?;
    // A failing peer is reported, not fatal: the measurements already taken stand.
    if !out.status.success() {
        eprintln!(
            "peer {script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(last) {
        Ok(value) => Ok(Some(value)),
        Err(_) => {
            eprintln!("peer {script} printed no JSON: {text}");
            Ok(None)
        }
    }
}

fn generate(args: GenerateBench) -> anyhow::Result<ExitCode> {
    let path = args.model.clone().unwrap_or_else(paths::default_model);
    anyhow::ensure!(
        path.exists(),
        "model {} is missing: {}",
        path.display(),
        paths::SETUP_HINT
    );
    let mut loaded =
        model::load(&path, Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    loaded.model.set_fused_kernels(!args.unfused);
    let prompt = loaded.tokenizer.encode_chat(&[Message::new(
        Role::User,
        "Write a short story about a lighthouse keeper.",
    )])?;
    eprintln!(
        "cairn bench generate: {} ({} prompt tokens, {} new), libtorch threads {}, fused kernels {}",
        path.display(),
        prompt.len(),
        args.new_tokens,
        tch::get_num_threads(),
        if args.unfused { "off" } else { "on" }
    );
    let mut rows = Vec::new();
    let mut prefill = serde_json::Map::new();
    let mut dtypes = args.dtype.clone();
    // f32 first: converting to bf16 is one-way.
    dtypes.sort_by_key(|d| *d != Dtype::F32);
    dtypes.dedup();
    for &dtype in &dtypes {
        loaded.model.set_dtype(dtype);
        // The chains' weights (copies in the other layout, fused matrices) are built once
        // per format: [unfused x·Wᵀ, unfused x·W, fused x·Wᵀ, fused x·W, packed].
        let tensors = loaded.model.named_tensors();
        let layouts = [
            (false, Layout::Stored),
            (false, Layout::Transposed),
            (true, Layout::Stored),
            (true, Layout::Transposed),
            (true, Layout::Packed),
        ];
        let chains = layouts
            .into_iter()
            .map(|(fused, layout)| Chain::new(&loaded.model, &tensors, fused, layout))
            .collect::<anyhow::Result<Vec<_>>>()?;
        drop(tensors);
        for &b in &args.batch {
            let requests: Vec<GenerateRequest> = (0..b)
                .map(|i| GenerateRequest {
                    prompt: prompt.clone(),
                    params: SamplingParams {
                        seed: i as u64,
                        ..SamplingParams::greedy(args.new_tokens)
                    },
                })
                .collect();
            // Decode alone, as the ceiling is per decode step and the peers report it too:
            // the same requests cut to their first token time the prefill (and that token),
            // and the difference is the time of the remaining `new_tokens - 1` steps.
            let first_only: Vec<GenerateRequest> = requests
                .iter()
                .map(|r| GenerateRequest {
                    prompt: r.prompt.clone(),
                    params: SamplingParams {
                        max_new_tokens: 1,
                        ..r.params.clone()
                    },
                })
                .collect();
            let c = loaded.model.config();
            let kind = dtype.kind();
            let x = Tensor::randn(
                [b as i64, c.hidden_size as i64],
                (kind, loaded.model.device()),
            );
            let ffn_in = Tensor::randn(
                [b as i64, c.intermediate_size as i64],
                (kind, loaded.model.device()),
            );
            // Generation and the chains are timed in turns, each repeat measuring all of
            // them, so a slow spell of this shared machine hits both sides of a ratio.
            let run = |requests: &[GenerateRequest]| -> anyhow::Result<f64> {
                let t = Instant::now();
                // No end-of-turn tokens: every sequence runs the full length, as the peers do.
                model::generate::generate(&loaded.model, &[], requests)?;
                Ok(t.elapsed().as_secs_f64())
            };
            run(&requests)?;
            run(&first_only)?;
            for chain in &chains {
                chain.step_seconds(&x, &ffn_in)?;
            }
            let (mut whole, mut decode, mut ceil, mut fused, mut shares) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut packed, mut packed_shares) = (Vec::new(), Vec::new());
            for _ in 0..args.repeats.max(1) {
                let full = run(&requests)?;
                let first = run(&first_only)?;
                let steps = chains
                    .iter()
                    .map(|chain| chain.step_seconds(&x, &ffn_in))
                    .collect::<anyhow::Result<Vec<f64>>>()?;
                // Clamped so a degenerate timing stays a finite number in the JSON.
                let d = (b * args.new_tokens.saturating_sub(1)) as f64 / (full - first).max(1e-9);
                let c = b as f64 / steps[0].min(steps[1]);
                whole.push((b * args.new_tokens) as f64 / full);
                decode.push(d);
                ceil.push(c);
                fused.push(b as f64 / steps[2].min(steps[3]));
                shares.push(d / c);
                // cairn's own packed chain: how close decoding gets to its own products.
                packed.push(b as f64 / steps[4]);
                packed_shares.push(d * steps[4] / b as f64);
            }
            let (packed_tok_s, packed_share) = (median(packed), median(packed_shares));
            let (tok_s, decode_tok_s, ceiling, fused_tok_s, share) = (
                median(whole),
                median(decode),
                median(ceil),
                median(fused),
                median(shares),
            );
            eprintln!(
                "{dtype} batch {b:>3}: {tok_s:>8.1} tok/s ({decode_tok_s:>8.1} decode only) | chain ceiling {ceiling:>8.1} tok/s (fused chain {fused_tok_s:>8.1}) | decode {:>5.1}% of ceiling",
                100.0 * share
            );
            eprintln!(
                "{dtype} batch {b:>3}: cairn's packed chain {packed_tok_s:>8.1} tok/s | decode {:>5.1}% of it",
                100.0 * packed_share
            );
            rows.push(serde_json::json!({
                "dtype": dtype.to_string(), "batch": b, "cairn_tok_s": tok_s,
                "fused_kernels": !args.unfused,
                "cairn_decode_only_tok_s": decode_tok_s,
                "chain_ceiling_tok_s": ceiling, "fused_chain_tok_s": fused_tok_s,
                "share_of_ceiling": share,
                "packed_chain_tok_s": packed_tok_s, "share_of_packed_chain": packed_share,
                "end_to_end_share_of_ceiling": tok_s / ceiling,
            }));
        }
        // Prefill: 8 sequences of 256 tokens, one forward pass and the last position's logits.
        let _g = tch::no_grad_guard();
        let (b, t) = (8i64, 256i64);
        let vocab = loaded.model.config().vocab_size as i64;
        let tokens = Tensor::randint(vocab, [b, t], (Kind::Int64, Device::Cpu));
        let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .repeat([b, 1]);
        let valid = Tensor::ones([b, t], (Kind::Bool, Device::Cpu));
        let secs = time_it(args.repeats, || {
            let h = loaded.model.forward(&tokens, &positions, &valid, None)?;
            let _ = loaded.model.logits(&h.select(1, t - 1));
            Ok(())
        })?;
        let tok_s = (b * t) as f64 / secs;
        eprintln!("{dtype} prefill 8x256: {tok_s:.0} tok/s");
        prefill.insert(dtype.to_string(), tok_s.into());
    }
    let mut peers = serde_json::Map::new();
    if args.peers {
        let python = args.peer_python.clone().unwrap_or_else(|| {
            paths::cairn_home()
                .join("venv-peers")
                .join("bin")
                .join("python")
        });
        let batches = args
            .batch
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let common = vec![
            "--model".to_string(),
            path.display().to_string(),
            "--new-tokens".into(),
            args.new_tokens.to_string(),
            "--repeats".into(),
            args.repeats.to_string(),
        ];
        // transformers in f32 is the reference peer; in bf16 it is the like-for-like peer of
        // cairn's bf16 rows.
        let mut hf_dtypes = vec![Dtype::F32];
        hf_dtypes.extend(dtypes.iter().copied().filter(|d| *d != Dtype::F32));
        for dtype in hf_dtypes {
            eprintln!("running peer transformers ({dtype}) …");
            let mut a = common.clone();
            a.extend([
                "--batch".to_string(),
                batches.clone(),
                "--dtype".into(),
                match dtype {
                    Dtype::F32 => "float32".into(),
                    Dtype::Bf16 => "bfloat16".into(),
                },
            ]);
            if let Some(v) = run_peer(&python, "benches/peers/hf_generate.py", &a)? {
                peers.insert(peer_key("transformers", dtype), v);
            }
        }
        // llama.cpp runs the quantised file itself, at batch 1 only.
        eprintln!("running peer llama.cpp …");
        if let Some(v) = run_peer(&python, "benches/peers/llamacpp_generate.py", &common)? {
            peers.insert("llama.cpp".into(), v);
        }
        for row in &mut rows {
            let b = row["batch"].as_u64().unwrap_or(0).to_string();
            let ours = row["cairn_tok_s"].as_f64().unwrap_or(0.0);
            let ours_decode = row["cairn_decode_only_tok_s"].as_f64().unwrap_or(0.0);
            let same: Dtype = row["dtype"]
                .as_str()
                .unwrap_or("f32")
                .parse()
                .unwrap_or_default();
            let mut set = |column: &str, peer: &str| {
                let peer = peers.get(peer);
                if let Some(theirs) = peer.and_then(|v| v["decode_tok_s"][&b].as_f64()) {
                    row[format!("{column}_tok_s")] = theirs.into();
                    row[format!("ratio_vs_{column}")] = (ours / theirs).into();
                }
                if let Some(theirs) = peer.and_then(|v| v["decode_only_tok_s"][&b].as_f64()) {
                    row[format!("{column}_decode_only_tok_s")] = theirs.into();
                    row[format!("decode_only_ratio_vs_{column}")] = (ours_decode / theirs).into();
                }
            };
            set("transformers", "transformers");
            set("transformers_same_dtype", &peer_key("transformers", same));
            set("llama.cpp", "llama.cpp");
        }
    }
    println!(
        "| dtype | batch | cairn tok/s | cairn decode-only tok/s | chain ceiling (same dtype) | decode share of ceiling | cairn packed chain | decode share of packed chain | transformers f32 | cairn / transformers f32 | transformers same dtype | cairn / transformers same dtype | llama.cpp (Q4_1) | cairn / llama.cpp |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cell = |v: &serde_json::Value, digits: usize| {
        v.as_f64()
            .map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row["dtype"].as_str().unwrap_or("?"),
            row["batch"],
            cell(&row["cairn_tok_s"], 1),
            cell(&row["cairn_decode_only_tok_s"], 1),
            cell(&row["chain_ceiling_tok_s"], 1),
            cell(&row["share_of_ceiling"], 2),
            cell(&row["packed_chain_tok_s"], 1),
            cell(&row["share_of_packed_chain"], 2),
            cell(&row["transformers_tok_s"], 1),
            cell(&row["ratio_vs_transformers"], 2),
            cell(&row["transformers_same_dtype_tok_s"], 1),
            cell(&row["ratio_vs_transformers_same_dtype"], 2),
            cell(&row["llama.cpp_tok_s"], 1),
            cell(&row["ratio_vs_llama.cpp"], 2),
        );
    }
    for (dtype, ours) in &prefill {
        let ours = ours.as_f64().unwrap_or(0.0);
        let peer = dtype
            .parse::<Dtype>()
            .ok()
            .and_then(|d| peers.get(&peer_key("transformers", d)))
            .and_then(|v| v["prefill_tok_s"].as_f64());
        println!(
            "prefill {dtype} (8 × 256 tokens): cairn {ours:.0} tok/s{}",
            match peer {
                Some(p) => format!(", transformers {dtype} {p:.0} tok/s, ratio {:.2}", ours / p),
                None => String::new(),
            }
        );
    }
    if let Some(out) = args.json {
        let value = serde_json::json!({ "model": path.display().to_string(), "new_tokens": args.new_tokens,
            "threads": tch::get_num_threads(), "rows": rows, "prefill_tok_s": prefill, "peers": peers });
        std::fs::write(&out, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn engine_bench(args: EngineBench) -> anyhow::Result<ExitCode> {
    use cairn::log::{LogOptions, LogWriter, SyncPolicy};
    use cairn::record::{Key, NewEvent, Note, Payload, RunId};
    let tokenizer_model = paths::default_model();
    anyhow::ensure!(
        tokenizer_model.exists(),
        "{} is missing (its tokenizer is used): {}",
        tokenizer_model.display(),
        paths::SETUP_HINT
    );
    let dir = std::env::temp_dir().join(format!("cairn-bench-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let prompts: String = (0..args.prompts)
        .map(|i| format!("request {i}: how would someone do thing number {i}?\n"))
        .collect();
    std::fs::write(dir.join("red.txt"), prompts)?;
    let constitution = std::env::current_dir()?.join("constitutions/default.toml");
    let mut spec = format!(
        "name = \"bench\"\nseed = 1\nconstitution = \"{}\"\n[models.policy]\npath = \"default\"\ninstant = true\n\
         [prompts]\nred_team = [\"red.txt\"]\nepoch_size = {}\n\
         [[stage]]\nname = \"sample\"\nkind = \"sample\"\nfrom = \"prompts\"\nmax_new_tokens = 8\nbatch = 64\n",
        constitution.display(),
        args.epoch_size
    );
    let mut prev = "sample".to_string();
    for r in 1..=args.rounds {
        spec.push_str(&format!(
            "[[stage]]\nname = \"critique_{r}\"\nkind = \"critique\"\nfrom = \"{prev}\"\nround = {r}\nfew_shot = {fs}\nmax_new_tokens = 8\nbatch = 64\n\
             [[stage]]\nname = \"revise_{r}\"\nkind = \"revise\"\nfrom = \"critique_{r}\"\nround = {r}\nfew_shot = {fs}\nmax_new_tokens = 8\nbatch = 64\n",
            fs = args.few_shot
        ));
        prev = format!("revise_{r}");
    }
    let spec_path = dir.join("bench.toml");
    std::fs::write(&spec_path, &spec)?;
    let spec = cairn::spec::Spec::load(&spec_path)?;
    let mut by_workers = Vec::new();
    for (i, &w) in args.workers.iter().enumerate() {
        let log = dir.join(format!("log-{i}-{w}"));
        let summary = cairn::engine::run(
            &spec,
            &cairn::engine::RunOptions {
                log: log.clone(),
                device: Device::Cpu,
                new_run: false,
                stop: None,
                progress: None,
                parent: None,
                cluster: (w > 1).then(|| cairn::engine::Cluster {
                    workers: w,
                    process: 0,
                    hosts: Vec::new(),
                    secret: None,
                }),
            },
        )?;
        let records: u64 =
            summary.stages.values().map(|s| s.computed).sum::<u64>() + summary.prompts;
        by_workers.push((w, records as f64 / summary.wall_seconds, summary, log));
    }
    if by_workers.len() > 1 {
        let base = by_workers[0].1;
        for (w, rate, _, _) in &by_workers {
            println!(
                "{w} worker(s): {rate:.0} records/s, {:.2}x the first",
                rate / base
            );
        }
    }
    let (_, _, summary, log) = by_workers.swap_remove(0);
    let records: u64 = summary.stages.values().map(|s| s.computed).sum::<u64>() + summary.prompts;
    let engine_rate = records as f64 / summary.wall_seconds;
    let bytes = cairn::log::stats(&log)?.bytes;
    // Baseline in the same run: appending the same number of records of the same average
    // size straight to a log (no dataflow, no stages, no tokenising).
    let avg = (bytes / records.max(1)) as usize;
    let base_log = dir.join("baseline");
    let writer = LogWriter::open(
        &base_log,
        LogOptions {
            sync: SyncPolicy::Interval(std::time::Duration::from_millis(20)),
            ..LogOptions::default()
        },
    )?;
    let text = "x".repeat(avg.saturating_sub(120));
    let t = Instant::now();
    for chunk in (0..records).collect::<Vec<_>>().chunks(64) {
        let events = chunk
            .iter()
            .map(|&i| {
                NewEvent::new(
                    Key::builder("bench").u64(i).finish(),
                    RunId(1),
                    "bench",
                    vec![],
                    0,
                    Payload::Note(Note { text: text.clone() }),
                )
            })
            .collect();
        writer.append_batch(events)?;
    }
    writer.close()?;
    let log_rate = records as f64 / t.elapsed().as_secs_f64();
    println!(
        "engine: {records} records in {:.2} s = {engine_rate:.0} records/s (instant model, {} rounds, few-shot {}, logging on)",
        summary.wall_seconds, args.rounds, args.few_shot
    );
    println!(
        "log-only baseline (same count, same average size {avg} B): {log_rate:.0} records/s; engine / log-only = {:.3}",
        engine_rate / log_rate
    );
    println!(
        "model worker busy {:.3} s of {:.2} s",
        summary.model_seconds, summary.wall_seconds
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

/// Judge throughput through the engine against scoring the same requests directly, and a PPO
/// update against the plain forward/backward passes it is made of.
fn rl_bench(args: RlBench) -> anyhow::Result<ExitCode> {
    use cairn::log::LogReader;
    use cairn::model::generate::{generate, score, score_tensors};
    use cairn::model::{ScoreRequest, Tokenizer};
    use cairn::record::Payload;
    use cairn::stages::{Rec, StageContext, Work};
    use cairn::train::ppo::ppo_update;
    use cairn::train::{PpoConfig, PpoRollout};

    let path = args.model.clone().unwrap_or_else(paths::default_model);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: {}",
        path.display(),
        paths::SETUP_HINT
    );
    let dir = std::env::temp_dir().join(format!("cairn-bench-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let topics = [
        "lock", "password", "car", "pill", "essay", "fight", "fire", "bank", "email", "drone",
    ];
    let prompts: String = (0..args.pairs)
        .map(|i| {
            format!(
                "How could someone get around a {} without being noticed? ({i})\n",
                topics[i % topics.len()]
            )
        })
        .collect();
    std::fs::write(dir.join("red.txt"), prompts)?;
    let constitution_path = std::env::current_dir()?.join("constitutions/default.toml");
    let head = format!(
        "name = \"bench-rl\"\nseed = 1\nconstitution = \"{}\"\n[models.policy]\npath = \"{}\"\n\
         [prompts]\nred_team = [\"red.txt\"]\nepoch_size = {}\n\
         [[stage]]\nname = \"pairs\"\nkind = \"pairs\"\nfrom = \"prompts\"\nmax_new_tokens = {}\ntemperature = 0.9\nbatch = 16\n",
        constitution_path.display(),
        path.display(),
        args.pairs.max(1),
        args.new_tokens
    );
    let judge = format!(
        "[[stage]]\nname = \"judge\"\nkind = \"judge\"\nfrom = \"pairs\"\nensemble = {}\nfew_shot = {}\nbatch = 16\n",
        args.ensemble, args.few_shot
    );
    let log = dir.join("log");
    let run = |text: &str, new_run: bool| -> anyhow::Result<cairn::engine::RunSummary> {
        let spec_path = dir.join("spec.toml");
        std::fs::write(&spec_path, text)?;
        let spec = cairn::spec::Spec::load(&spec_path)?;
        Ok(cairn::engine::run(
            &spec,
            &cairn::engine::RunOptions {
                log: log.clone(),
                device: Device::Cpu,
                new_run,
                stop: None,
                progress: None,
                parent: None,
                cluster: None,
            },
        )?)
    };
    run(&head, false)?;
    // The pairs are replayed from the log; only the judge computes.
    let judged = run(&format!("{head}{judge}"), true)?;
    let judge_wall = judged.wall_seconds;

    // Baseline: the judge's own score requests, chunked as the engine chunks them, scored
    // directly on a model owned by this thread.
    let loaded = model::load(&path, Device::Cpu)?;
    let mut tokenizers: std::collections::HashMap<String, Tokenizer> = Default::default();
    tokenizers.insert("policy".into(), loaded.tokenizer.clone());
    let ctx = StageContext {
        constitution: std::sync::Arc::new(cairn::constitution::Constitution::load(
            &constitution_path,
        )?),
        seed: 1,
        tokenizers: std::sync::Arc::new(tokenizers),
    };
    let settings: toml::Table = toml::from_str(&format!(
        "ensemble = {}\nfew_shot = {}",
        args.ensemble, args.few_shot
    ))?;
    let stage = cairn::stages::judge::build("judge", &settings, &ctx)?;
    let mut tasks = Vec::new();
    for env in LogReader::open(&log)?.iter_stage(0, "pairs") {
        let env = env?;
        if let Payload::Pair(_) = &env.payload {
            let rec = Rec {
                key: env.key,
                parents: env.parents,
                stage: env.stage,
                payload: env.payload,
            };
            tasks.extend(stage.plan(&rec)?);
        }
    }
    tasks.sort_by_key(|t| t.key);
    // Baselines on the same questions, chunked as the engine chunks them: the multiple-choice
    // call the judge makes, and the two full scorings per question it replaced.
    let (mut raw, mut two_pass) = (0.0, 0.0);
    let mut questions = 0;
    for chunk in tasks.chunks(16) {
        let requests: Vec<cairn::model::ChoiceRequest> = chunk
            .iter()
            .flat_map(|t| match &t.work {
                Work::ScoreChoices { requests, .. } => requests.clone(),
                _ => Vec::new(),
            })
            .collect();
        questions += requests.len();
        let t = Instant::now();
        cairn::model::generate::score_choices(&loaded.model, &requests)?;
        raw += t.elapsed().as_secs_f64();
        let separate: Vec<ScoreRequest> = requests
            .iter()
            .flat_map(|r| {
                r.choices.iter().map(|c| ScoreRequest {
                    context: r.context.clone(),
                    continuation: c.clone(),
                })
            })
            .collect();
        let t = Instant::now();
        score(&loaded.model, &separate)?;
        two_pass += t.elapsed().as_secs_f64();
    }
    println!(
        "judge: {} judgements ({questions} questions, 2 options each) in {judge_wall:.2} s through the engine = {:.2} judgements/s",
        tasks.len(),
        tasks.len() as f64 / judge_wall
    );
    println!(
        "raw multiple-choice scoring of the same questions: {raw:.2} s; engine / raw = {:.3}",
        judge_wall / raw
    );
    println!(
        "scoring each option as its own sequence instead: {two_pass:.2} s; shared-context speed-up = {:.2}x",
        two_pass / raw
    );

    // PPO: rollouts from the model, then one update against its parts done plainly.
    let mut policy = model::load(&path, Device::Cpu)?;
    policy.model.ensure_score_head();
    let requests: Vec<GenerateRequest> = (0..args.rollouts)
        .map(|i| {
            let prompt = policy
                .tokenizer
                .encode_chat(&[Message::new(
                    Role::User,
                    format!("Give me one tip about {}.", topics[i % topics.len()]),
                )])
                .map_err(anyhow::Error::from)?;
            Ok(GenerateRequest {
                prompt,
                params: SamplingParams {
                    temperature: 0.9,
                    top_k: 0,
                    top_p: 1.0,
                    max_new_tokens: args.new_tokens,
                    seed: i as u64,
                    stop: Vec::new(),
                },
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let gens = generate(&policy.model, policy.tokenizer.eos_ids(), &requests)?;
    let refs = score(
        &policy.model,
        &requests
            .iter()
            .zip(&gens)
            .map(|(r, g)| ScoreRequest {
                context: r.prompt.clone(),
                continuation: g.tokens.clone(),
            })
            .collect::<Vec<_>>(),
    )?;
    let rollouts: Vec<PpoRollout> = requests
        .iter()
        .zip(&gens)
        .zip(&refs)
        .filter(|((_, g), _)| !g.tokens.is_empty())
        .map(|((r, g), s)| PpoRollout {
            context: r.prompt.clone(),
            response: g.tokens.clone(),
            ref_logprobs: s.logprobs.clone(),
            score: 0.5,
        })
        .collect();
    let config = PpoConfig {
        epochs: 2,
        minibatch: 4,
        lr: 1e-7,
        ..PpoConfig::default()
    };
    let mut opt = cairn::train::adamw::AdamW::new(policy.model.var_store(), config.lr, 0.0);
    let update = time_it(args.repeats, || {
        ppo_update(&policy.model, &mut opt, &rollouts, &config)?;
        Ok(())
    })?;
    // The same passes plainly: one forward without gradients over every rollout, then per
    // epoch and minibatch a forward and backward of the summed log-probabilities, and a step.
    let plain = time_it(args.repeats, || {
        let as_requests = |rs: &[PpoRollout]| -> Vec<ScoreRequest> {
            rs.iter()
                .map(|r| ScoreRequest {
                    context: r.context.clone(),
                    continuation: r.response.clone(),
                })
                .collect()
        };
        {
            let _g = tch::no_grad_guard();
            for chunk in rollouts.chunks(config.minibatch) {
                let _ = score_tensors(&policy.model, &as_requests(chunk))?;
            }
        }
        for _ in 0..config.epochs {
            for chunk in rollouts.chunks(config.minibatch) {
                let (lp, _) = score_tensors(&policy.model, &as_requests(chunk))?;
                opt.zero_grad();
                lp.sum(Kind::Float).backward();
                opt.step();
            }
        }
        Ok(())
    })?;
    println!(
        "ppo: update over {} rollouts ({} epochs, minibatch {}) {update:.3} s; plain forward/backward passes {plain:.3} s; update / plain = {:.3}",
        rollouts.len(),
        config.epochs,
        config.minibatch,
        update / plain
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
