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

use cairn::model::{self, GenerateRequest, Llama, Message, Role, SamplingParams};
use cairn::paths;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Generation throughput against the matmul ceiling and Python/C++ peers.
    Generate(GenerateBench),
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
    /// Also run the peers in benches/peers/ (needs benches/peers/setup.sh).
    #[arg(long)]
    peers: bool,
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

/// Seconds of one decode step's matmuls alone: 30 layers' projections and the vocabulary
/// projection on distinct weights, at batch `b`. `fused` uses the runtime's fused q/k/v and
/// gate/up matrices; otherwise the seven separate projections of the reference definition.
fn chain_step_seconds(model: &Llama, b: i64, fused: bool, repeats: usize) -> anyhow::Result<f64> {
    let _g = tch::no_grad_guard();
    let tensors = model.named_tensors();
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.tr().contiguous().to_device(model.device()))
            .with_context(|| format!("tensor {name}"))
    };
    let c = model.config();
    let mut chain: Vec<Vec<Tensor>> = Vec::new();
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
            chain.push(vec![
                Tensor::cat(&[&w[0], &w[1], &w[2]], 1),
                w[3].shallow_clone(),
                Tensor::cat(&[&w[4], &w[5]], 1),
                w[6].shallow_clone(),
            ]);
        } else {
            chain.push(w);
        }
    }
    let vocab = get("model.embed_tokens.weight")?;
    let h = c.hidden_size as i64;
    let x = Tensor::randn([b, h], (Kind::Float, model.device()));
    let ffn_in = Tensor::randn(
        [b, c.intermediate_size as i64],
        (Kind::Float, model.device()),
    );
    let per_step = || {
        for layer in &chain {
            for w in layer {
                // Each matmul reads its own weight; inputs of the right width.
                let input = if w.size()[0] == h { &x } else { &ffn_in };
                let _ = input.matmul(w);
            }
        }
        let _ = x.matmul(&vocab);
    };
    let reps = 10;
    let t = time_it(repeats.max(3), || {
        for _ in 0..reps {
            per_step();
        }
        Ok(())
    })?;
    Ok(t / reps as f64)
}

fn generate(args: GenerateBench) -> anyhow::Result<ExitCode> {
    let path = args.model.clone().unwrap_or_else(paths::default_model);
    anyhow::ensure!(
        path.exists(),
        "model {} is missing: {}",
        path.display(),
        paths::SETUP_HINT
    );
    let loaded =
        model::load(&path, Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    let prompt = loaded.tokenizer.encode_chat(&[Message::new(
        Role::User,
        "Write a short story about a lighthouse keeper.",
    )])?;
    eprintln!(
        "cairn bench generate: {} ({} prompt tokens, {} new), libtorch threads {}",
        path.display(),
        prompt.len(),
        args.new_tokens,
        tch::get_num_threads()
    );
    let mut rows = Vec::new();
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
        // No end-of-turn tokens: every sequence runs the full length, as the peers do.
        let secs = time_it(args.repeats, || {
            model::generate::generate(&loaded.model, &[], &requests)?;
            Ok(())
        })?;
        let tok_s = (b * args.new_tokens) as f64 / secs;
        let unfused = chain_step_seconds(&loaded.model, b as i64, false, args.repeats)?;
        let fused = chain_step_seconds(&loaded.model, b as i64, true, args.repeats)?;
        let ceiling = b as f64 / unfused;
        eprintln!(
            "batch {b:>3}: {tok_s:>8.1} tok/s | chain ceiling {ceiling:>8.1} tok/s (fused chain {:>8.1}) | {:>5.1}% of ceiling",
            b as f64 / fused,
            100.0 * tok_s / ceiling
        );
        rows.push(serde_json::json!({
            "batch": b, "cairn_tok_s": tok_s, "chain_ceiling_tok_s": ceiling,
            "fused_chain_tok_s": b as f64 / fused, "share_of_ceiling": tok_s / ceiling,
        }));
    }
    // Prefill: 8 sequences of 256 tokens, one forward pass and the last position's logits.
    let prefill = {
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
        (b * t) as f64 / secs
    };
    eprintln!("prefill 8x256: {prefill:.0} tok/s");
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
        let n = args.new_tokens.to_string();
        let reps = args.repeats.to_string();
        let model_arg = path.display().to_string();
        for (name, script, batch) in [
            (
                "transformers",
                "benches/peers/hf_generate.py",
                batches.as_str(),
            ),
            ("llama.cpp", "benches/peers/llamacpp_generate.py", "1"),
        ] {
            eprintln!("running peer {name} …");
            let out = Command::new(&python)
                .args([
                    script,
                    "--model",
                    &model_arg,
                    "--batch",
                    batch,
                    "--new-tokens",
                    &n,
                    "--repeats",
                    &reps,
                ])
                .output()
                .with_context(|| {
                    format!(
                        "running {} {script} (run benches/peers/setup.sh first)",
                        python.display()
                    )
                })?;
            anyhow::ensure!(
                out.status.success(),
                "peer {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let last = text.lines().last().unwrap_or_default();
            let value: serde_json::Value = serde_json::from_str(last)
                .with_context(|| format!("peer {name} printed no JSON: {text}"))?;
            peers.insert(name.to_string(), value);
        }
        for row in &mut rows {
            let b = row["batch"].as_u64().unwrap_or(0).to_string();
            let ours = row["cairn_tok_s"].as_f64().unwrap_or(0.0);
            for (name, value) in &peers {
                if let Some(theirs) = value["decode_tok_s"][&b].as_f64() {
                    row[format!("{name}_tok_s")] = theirs.into();
                    row[format!("ratio_vs_{name}")] = (ours / theirs).into();
                }
            }
        }
    }
    println!(
        "| batch | cairn tok/s | chain ceiling | share of ceiling | transformers | cairn / transformers | llama.cpp | cairn / llama.cpp |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cell = |v: &serde_json::Value, digits: usize| {
        v.as_f64()
            .map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row["batch"],
            cell(&row["cairn_tok_s"], 1),
            cell(&row["chain_ceiling_tok_s"], 1),
            cell(&row["share_of_ceiling"], 2),
            cell(&row["transformers_tok_s"], 1),
            cell(&row["ratio_vs_transformers"], 2),
            cell(&row["llama.cpp_tok_s"], 1),
            cell(&row["ratio_vs_llama.cpp"], 2),
        );
    }
    println!(
        "\nprefill (8 × 256 tokens): cairn {prefill:.0} tok/s{}",
        match peers
            .get("transformers")
            .and_then(|v| v["prefill_tok_s"].as_f64())
        {
            Some(p) => format!(", transformers {p:.0} tok/s, ratio {:.2}", prefill / p),
            None => String::new(),
        }
    );
    if let Some(out) = args.json {
        let value = serde_json::json!({ "model": path.display().to_string(), "new_tokens": args.new_tokens,
            "threads": tch::get_num_threads(), "rows": rows, "prefill_tok_s": prefill, "peers": peers });
        std::fs::write(&out, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
