//! `cairn bench quantised`: a GGUF model held as its file's quantised blocks
//! (`--dtype quantised`) against the same model held as packed bf16 (or f32) panels, both
//! inference-only, loaded side by side in one process. It first checks that the two give the
//! same logits and greedy tokens bit for bit, then times decode at each batch size and an
//! 8 × 256-token prefill in turns (A, B, A, B, …), so a slow spell of this shared machine
//! hits both sides of each ratio. Weight memory is what the kept forms hold.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tch::{Device, Kind, Tensor};

use cairn::dtype::Dtype;
use cairn::model::{self, GenerateRequest, Message, Role, SamplingParams};
use cairn::paths;

use super::median;

/// Arguments of `cairn bench quantised`.
#[derive(Args, Debug)]
pub struct QuantisedBench {
    /// GGUF model (default: the fetched feedback model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The number format both sides compute in.
    #[arg(long, default_value = "bf16")]
    dtype: Dtype,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    batch: Vec<usize>,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed repetitions per point and side (median reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Resident memory of this process, in bytes (0 where /proc is not readable).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

pub(super) fn run(args: QuantisedBench) -> anyhow::Result<ExitCode> {
    let path = args
        .model
        .as_deref()
        .and_then(|m| {
            m.to_str()
                .and_then(paths::named_model)
                .or(Some(m.to_path_buf()))
        })
        .unwrap_or_else(paths::feedback_model);
    anyhow::ensure!(
        path.is_file(),
        "model {} is missing (a GGUF file is needed): {}",
        path.display(),
        paths::FEEDBACK_HINT
    );
    let load = |quantised: bool| -> anyhow::Result<(model::LoadedModel, u64, u64)> {
        let before = resident_bytes();
        let mut loaded = model::load::load_as(&path, Device::Cpu, args.dtype)
            .with_context(|| format!("loading {}", path.display()))?;
        let kept = if quantised {
            model::load::keep_quantised(&mut loaded)?
        } else {
            loaded.model.keep_only_packed_with(|_| Ok(None))?
        };
        eprintln!(
            "{}: {} matrices quantised, {} packed, {:.0} MB held",
            if quantised { "quantised" } else { "packed" },
            kept.quantised,
            kept.packed,
            kept.held as f64 / 1e6
        );
        Ok((loaded, kept.held, resident_bytes().saturating_sub(before)))
    };
    let (packed, packed_held, packed_rss) = load(false)?;
    let (quant, quant_held, quant_rss) = load(true)?;
    let sides = [&packed.model, &quant.model];

    // Same results first: the logits of a prompt, and greedy tokens at the largest batch.
    let prompt = packed.tokenizer.encode_chat(&[Message::new(
        Role::User,
        "Explain how a refrigerator keeps food cold, step by step.",
    )])?;
    let _g = tch::no_grad_guard();
    let tokens =
        Tensor::from_slice(&prompt.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let positions = Tensor::arange(prompt.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let valid = Tensor::ones([1, prompt.len() as i64], (Kind::Bool, Device::Cpu));
    let logits = sides
        .iter()
        .map(|m| {
            let h = m.forward(&tokens, &positions, &valid, None)?;
            Ok(m.logits(&h))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let logits_equal = logits[0].equal(&logits[1]);
    let requests = |b: usize| -> Vec<GenerateRequest> {
        (0..b)
            .map(|i| GenerateRequest {
                prompt: prompt.clone(),
                params: SamplingParams {
                    seed: i as u64,
                    ..SamplingParams::greedy(args.new_tokens)
                },
            })
            .collect()
    };
    let widest = args.batch.iter().copied().max().unwrap_or(1);
    let outputs = sides
        .iter()
        .map(|m| model::generate::generate(m, &[], &requests(widest)))
        .collect::<Result<Vec<_>, _>>()?;
    let tokens_equal = outputs[0]
        .iter()
        .zip(&outputs[1])
        .all(|(a, b)| a.tokens == b.tokens);
    eprintln!("same logits bit for bit: {logits_equal}; same greedy tokens: {tokens_equal}");

    let mut rows = Vec::new();
    for &b in &args.batch {
        let reqs = requests(b);
        let mut times = [Vec::new(), Vec::new()];
        for rep in 0..=args.repeats {
            for (side, m) in sides.iter().enumerate() {
                let t = Instant::now();
                model::generate::generate(m, &[], &reqs)?;
                if rep > 0 {
                    times[side].push(t.elapsed().as_secs_f64());
                }
            }
        }
        let [a, q] = times.map(median);
        let tok = (b * args.new_tokens) as f64;
        eprintln!(
            "batch {b:>3}: packed {:.1} tok/s, quantised {:.1} tok/s, ratio {:.2}",
            tok / a,
            tok / q,
            a / q
        );
        rows.push(serde_json::json!({
            "batch": b, "packed_tok_s": tok / a, "quantised_tok_s": tok / q,
            "quantised_over_packed": a / q,
        }));
    }
    // Prefill: 8 sequences of 256 tokens, one forward pass and the last position's logits.
    let (b, t) = (8i64, 256i64);
    let vocab = packed.model.config().vocab_size as i64;
    let tokens = Tensor::randint(vocab, [b, t], (Kind::Int64, Device::Cpu));
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .repeat([b, 1]);
    let valid = Tensor::ones([b, t], (Kind::Bool, Device::Cpu));
    let mut times = [Vec::new(), Vec::new()];
    for rep in 0..=args.repeats {
        for (side, m) in sides.iter().enumerate() {
            let start = Instant::now();
            let h = m.forward(&tokens, &positions, &valid, None)?;
            let _ = m.logits(&h.select(1, t - 1));
            if rep > 0 {
                times[side].push(start.elapsed().as_secs_f64());
            }
        }
    }
    let [a, q] = times.map(median);
    let n = (b * t) as f64;
    eprintln!(
        "prefill 8x256: packed {:.0} tok/s, quantised {:.0} tok/s, ratio {:.2}",
        n / a,
        n / q,
        a / q
    );
    eprintln!(
        "weights held: packed {:.0} MB, quantised {:.0} MB ({:.2}x less); resident growth at \
         load: packed {:.0} MB, quantised {:.0} MB; file {:.0} MB",
        packed_held as f64 / 1e6,
        quant_held as f64 / 1e6,
        packed_held as f64 / quant_held.max(1) as f64,
        packed_rss as f64 / 1e6,
        quant_rss as f64 / 1e6,
        std::fs::metadata(&path).map_or(0, |m| m.len()) as f64 / 1e6
    );
    let report = serde_json::json!({
        "model": path.display().to_string(), "dtype": args.dtype.to_string(),
        "new_tokens": args.new_tokens, "threads": tch::get_num_threads(),
        "logits_equal": logits_equal, "tokens_equal": tokens_equal, "decode": rows,
        "prefill_packed_tok_s": n / a, "prefill_quantised_tok_s": n / q,
        "packed_held_bytes": packed_held, "quantised_held_bytes": quant_held,
        "packed_resident_growth_bytes": packed_rss, "quantised_resident_growth_bytes": quant_rss,
    });
    println!("{report}");
    if let Some(out) = &args.json {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(if logits_equal && tokens_equal {
        ExitCode::SUCCESS
    } else {
        eprintln!("the quantised model does not give the packed model's results");
        ExitCode::FAILURE
    })
}
