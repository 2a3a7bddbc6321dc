//! `cairn bench generate`: decode and prefill throughput of the model runtime, reported
//! against baselines measured in the same run — the model's own matmul chain (the compute
//! ceiling of one decode step) and, with `--peers`, Hugging Face transformers and llama.cpp
//! on the same GGUF (`benches/peers/`). Medians of repeated runs after a warm-up: this
//! machine is noisy, so read ratios, not absolute numbers.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tch::{Device, Kind, Tensor};

use cairn::model::{self, Dtype, GenerateRequest, Llama, Message, Role, SamplingParams, fused};
use cairn::paths;

use super::{median, time_it};

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

pub(super) fn run_peer(
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

pub(super) fn run(args: GenerateBench) -> anyhow::Result<ExitCode> {
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
                if full <= first {
                    eprintln!(
                        "warning: batch {b}: the whole run took no longer than its prefill \
                         ({full:.4} s against {first:.4} s), so the decode-only rate is not \
                         measured; use more --new-tokens or a quieter machine"
                    );
                }
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
