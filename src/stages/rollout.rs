//! `rollout`: the policy's answers for PPO, in a feedback loop with the `ppo` stage. Each
//! epoch's prompts are answered by the policy version that the updates of all earlier epochs
//! produced (the engine plans an epoch only once those updates have come back around the
//! loop). Each answer is then scored by the preference model (its scalar head, on the answer
//! re-encoded with the PM's own tokenizer) and by the frozen reference model (per-token
//! log-probabilities, for the KL penalty): three model calls per task, each batched with the
//! rest of the chunk.
//!
//! Before its first epoch the stage copies the policy into the reference model
//! (`init_reference`, default true), so the reference is the policy as RL found it — the
//! SL-CAI model when the stage is gated `after` SL-CAI's finetuning.

use std::sync::atomic::{AtomicU64, Ordering};

use super::settings_digest;
use super::{
    GenerationSettings, Rec, Reply, Stage, StageContext, StageError, StageSettings, Task, Work,
};
use crate::model::{GenerateRequest, Generation, Message, Role, ScoreRequest, Tokenizer};
use crate::record::{Conversation, Key, Payload, PromptPurpose, RolloutRecord};
use crate::worker::Job;

/// The `rollout` stage.
pub struct RolloutStage {
    name: String,
    generation: GenerationSettings,
    pm: String,
    reference: String,
    init_reference: bool,
    helpful: bool,
    ctx: StageContext,
    digest: u128,
    version: AtomicU64,
}

/// Builds the stage: the generation keys (`model` is the policy), `pm` (default `pm`),
/// `reference` (default `reference`), `init_reference` (default true) and `helpful` (also
/// roll out on helpful prompts; default false).
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let mut rest = settings.clone();
    let bad = |message: String| StageError::Config {
        stage: name.to_string(),
        message,
    };
    let mut take_str = |key: &str, default: &str| match rest.remove(key) {
        None => Ok(default.to_string()),
        Some(toml::Value::String(s)) => Ok(s),
        Some(other) => Err(bad(format!("`{key}` must be a model name, found {other}"))),
    };
    let pm = take_str("pm", "pm")?;
    let reference = take_str("reference", "reference")?;
    let mut take_bool = |key: &str, default: bool| match rest.remove(key) {
        None => Ok(default),
        Some(toml::Value::Boolean(b)) => Ok(b),
        Some(other) => Err(bad(format!("`{key}` must be true or false, found {other}"))),
    };
    let init_reference = take_bool("init_reference", true)?;
    let helpful = take_bool("helpful", false)?;
    let generation: GenerationSettings = super::parse_settings(name, &rest)?;
    for model in [&generation.model, &pm, &reference] {
        ctx.tokenizer(name, model)?;
    }
    Ok(Box::new(RolloutStage {
        name: name.to_string(),
        generation,
        pm,
        reference,
        init_reference,
        helpful,
        ctx: ctx.clone(),
        digest: settings_digest(settings),
        version: AtomicU64::new(0),
    }))
}

/// The sequence a preference model scores: the prompt as a chat turn, the answer, and the end
/// of the turn — in the PM's own tokens.
pub fn pm_sequence(
    tok: &Tokenizer,
    prompt: &str,
    response: &str,
) -> Result<(Vec<u32>, Vec<u32>), crate::model::ModelError> {
    let context = tok.encode_chat(&[Message::new(Role::User, prompt.to_string())])?;
    let mut answer = tok.encode(response)?;
    if let Some(&end) = tok.eos_ids().last() {
        answer.push(end);
    }
    Ok((context, answer))
}

impl RolloutStage {
    fn prompt<'a>(&self, rec: &'a Rec) -> Option<&'a crate::record::PromptRecord> {
        match &rec.payload {
            Payload::Prompt(p) if p.purpose == PromptPurpose::RedTeam || self.helpful => Some(p),
            _ => None,
        }
    }

    fn err(&self, key: Key, message: impl Into<String>) -> StageError {
        StageError::Record {
            stage: self.name.clone(),
            key,
            message: message.into(),
        }
    }

    fn generation<'a>(
        &self,
        task: &'a Task,
        reply: &'a Reply,
    ) -> Result<&'a Generation, StageError> {
        task.history
            .first()
            .unwrap_or(reply)
            .generation()
            .ok_or_else(|| self.err(task.input.key, "expected the policy's answer"))
    }
}

impl Stage for RolloutStage {
    fn models(&self) -> Vec<String> {
        vec![
            self.generation.model.clone(),
            self.pm.clone(),
            self.reference.clone(),
        ]
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        self.prompt(rec).is_some()
    }

    fn setup(&self) -> Vec<(String, Job)> {
        if self.init_reference {
            vec![(
                self.reference.clone(),
                Job::CopyFrom(self.generation.model.clone()),
            )]
        } else {
            Vec::new()
        }
    }

    fn feedback(&self, rec: &Rec) {
        if let Payload::PpoUpdate(u) = &rec.payload {
            self.version.fetch_max(u.version, Ordering::SeqCst);
        }
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let Some(p) = self.prompt(rec) else {
            return Ok(Vec::new());
        };
        let version = self.version.load(Ordering::SeqCst);
        let prompt = self
            .ctx
            .user_prompt(&self.name, &self.generation.model, rec.key, &p.text)?;
        let seed = self.ctx.derive_seed(&self.name, rec.key, version);
        let key = Key::builder(&self.name)
            .key(rec.key)
            .u64(version)
            .u64(self.ctx.seed)
            .u128(self.digest)
            .finish();
        Ok(vec![Task::new(
            key,
            rec.clone(),
            Work::generate(
                &self.generation.model,
                GenerateRequest {
                    prompt,
                    params: self.generation.params(seed),
                },
            ),
        )])
    }

    fn more(&self, task: &Task, reply: &Reply) -> Result<Option<Work>, StageError> {
        let Some(p) = self.prompt(&task.input) else {
            return Ok(None);
        };
        match task.history.len() {
            // After the answer: the preference model's score.
            0 => {
                let g = self.generation(task, reply)?;
                let tok = self.ctx.tokenizer(&self.name, &self.generation.model)?;
                let text = super::decode(tok, g);
                let pm_tok = self.ctx.tokenizer(&self.name, &self.pm)?;
                let (context, continuation) = pm_sequence(pm_tok, &p.text, &text)
                    .map_err(|e| self.err(task.input.key, e.to_string()))?;
                Ok(Some(Work::score(
                    &self.pm,
                    ScoreRequest {
                        context,
                        continuation,
                    },
                )))
            }
            // After the score: the reference's log-probabilities of the same tokens.
            1 => {
                let g = self.generation(task, reply)?;
                if !matches!(task.work.job(), Some(Job::Score(_))) {
                    return Err(self.err(task.input.key, "unexpected work"));
                }
                let context = self.ctx.user_prompt(
                    &self.name,
                    &self.generation.model,
                    task.input.key,
                    &p.text,
                )?;
                Ok(Some(Work::score(
                    &self.reference,
                    ScoreRequest {
                        context,
                        continuation: g.tokens.clone(),
                    },
                )))
            }
            _ => Ok(None),
        }
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        let key = task.input.key;
        let (Some(p), [answer, pm], Some(reference)) = (
            self.prompt(&task.input),
            task.history.as_slice(),
            reply.scored(),
        ) else {
            return Err(self.err(key, "unexpected replies"));
        };
        let (Some(g), Some(pm)) = (answer.generation(), pm.scored()) else {
            return Err(self.err(key, "unexpected replies"));
        };
        let score = pm
            .value
            .ok_or_else(|| self.err(key, format!("model `{}` has no scalar head", self.pm)))?;
        let tok = self.ctx.tokenizer(&self.name, &self.generation.model)?;
        let context = self
            .ctx
            .user_prompt(&self.name, &self.generation.model, key, &p.text)?;
        if !matches!(task.work.job(), Some(Job::Score(_))) {
            return Err(self.err(key, "unexpected work"));
        }
        // Updates arrive only after every rollout of the epoch is done: still the plan's version.
        let version = self.version.load(Ordering::SeqCst);
        Ok(Payload::Rollout(RolloutRecord {
            conversation: Conversation {
                purpose: p.purpose,
                prompt: p.text.clone(),
            },
            policy_version: version,
            response: super::decode(tok, g),
            tokens: g.tokens.clone(),
            context,
            score,
            ref_logprobs: reference.logprobs.clone(),
            seed: self.ctx.derive_seed(&self.name, key, version),
        }))
    }
}
