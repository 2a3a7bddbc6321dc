//! `cairn generate` and `cairn score`: one prompt through a model, as text or JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use cairn::model::{self, GenerateRequest, Message, Role, SamplingParams, ScoreRequest};
use cairn::paths;

/// Model selection shared by the model commands.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory (default: the fetched SmolLM2-135M-Instruct; `feedback`: the fetched 1.5B feedback model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weight format: f32 (exact), bf16 (faster inference, bfloat16 rounding), quantised (bf16
    /// results with the GGUF file's quantised blocks kept: about the file's size in memory) or
    /// quantised-f32.
    #[arg(long, default_value = "f32")]
    pub dtype: cairn::dtype::WeightFormat,
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<model::LoadedModel> {
        let path = match &self.model {
            None => paths::default_model(),
            Some(m) => m
                .to_str()
                .and_then(paths::named_model)
                .unwrap_or_else(|| m.clone()),
        };
        if !path.exists() && path == paths::default_model() {
            anyhow::bail!(
                "default model {} is missing: {}",
                path.display(),
                paths::SETUP_HINT
            );
        }
        if !path.exists() && path == paths::feedback_model() {
            anyhow::bail!(
                "feedback model {} is missing: {}",
                path.display(),
                paths::FEEDBACK_HINT
            );
        }
        let device = model::parse_device(&self.device)?;
        let mut loaded = model::load::load_as(&path, device, self.dtype.dtype)
            .with_context(|| format!("loading model {}", path.display()))?;
        if self.dtype.quantised {
            model::load::keep_quantised(&mut loaded)
                .with_context(|| format!("keeping the quantised blocks of {}", path.display()))?;
        }
        Ok(loaded)
    }
}

/// Arguments of `cairn generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message.
    #[arg(long)]
    prompt: String,
    /// A system message (default: the model's own).
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as raw text instead of a chat turn.
    #[arg(long)]
    raw: bool,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object (text, token ids, log-probs).
    #[arg(long)]
    json: bool,
}

/// Runs `cairn generate`.
pub fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let prompt_ids = if args.raw {
        tok.encode(&args.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new(Role::System, system.clone()));
        }
        messages.push(Message::new(Role::User, args.prompt.clone()));
        tok.encode_chat(&messages)?
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        stop: Vec::new(),
    };
    let request = GenerateRequest {
        prompt: prompt_ids.clone(),
        params,
    };
    let started = std::time::Instant::now();
    let mut out = model::generate::generate(&loaded.model, tok.eos_ids(), &[request])?;
    let elapsed = started.elapsed().as_secs_f64();
    let generation = out.pop().context("the model returned no generation")?;
    let text = tok.decode(&generation.tokens)?;
    if args.json {
        let value = serde_json::json!({
            "text": text,
            "prompt_ids": prompt_ids,
            "token_ids": generation.tokens,
            "logprobs": generation.logprobs,
            "finish": generation.finish,
            "seconds": elapsed,
        });
        println!("{value}");
    } else {
        println!("{text}");
        tracing::info!(
            tokens = generation.tokens.len(),
            seconds = format!("{elapsed:.2}"),
            "generated"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `cairn score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (rendered as a chat turn unless --raw).
    #[arg(long)]
    prompt: String,
    /// The continuation to score (the assistant's reply).
    #[arg(long)]
    continuation: String,
    /// Treat the prompt as raw text.
    #[arg(long)]
    raw: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `cairn score`.
pub fn score(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let context = if args.raw {
        tok.encode(&args.prompt)?
    } else {
        tok.encode_chat(&[Message::new(Role::User, args.prompt.clone())])?
    };
    let continuation = tok.encode(&args.continuation)?;
    let request = ScoreRequest {
        context,
        continuation: continuation.clone(),
    };
    let scored = model::generate::score(&loaded.model, &[request])?
        .pop()
        .context("the model returned no score")?;
    if args.json {
        let tokens: Vec<String> = continuation
            .iter()
            .map(|&t| tok.decode(&[t]).unwrap_or_default())
            .collect();
        let value = serde_json::json!({
            "token_ids": continuation,
            "tokens": tokens,
            "logprobs": scored.logprobs,
            "total": scored.total,
        });
        println!("{value}");
    } else {
        println!(
            "total log-prob {:.4} over {} token(s)",
            scored.total,
            continuation.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
