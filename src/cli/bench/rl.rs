//! `cairn bench rl`: judgements per second and PPO update time, against the raw model cost
//! of the same work.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use tch::{Device, Kind};

use cairn::model::{self, GenerateRequest, Message, Role, SamplingParams};
use cairn::paths;

use super::time_it;

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

/// Judge throughput through the engine against scoring the same requests directly, and a PPO
/// update against the plain forward/backward passes it is made of.
pub(super) fn run(args: RlBench) -> anyhow::Result<ExitCode> {
    use cairn::log::LogReader;
    use cairn::model::generate::{generate, score, score_tensors};
    use cairn::model::{ScoreRequest, Tokenizer};
    use cairn::record::Payload;
    use cairn::stages::{Rec, StageContext, Work};
    use cairn::train::ppo::ppo_update;
    use cairn::train::{PpoConfig, PpoRollout};
    use cairn::worker::Job;

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
                Work::Model {
                    job: Job::ScoreChoices(requests),
                    ..
                } => requests.clone(),
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
