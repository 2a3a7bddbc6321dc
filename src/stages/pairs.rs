//! `pairs`: two answers to each red-team prompt (and, with `helpful = true`, each helpful
//! prompt) from one model, with distinct seeds derived from the run seed — the material the
//! feedback model compares. Both answers are sampled in the same model call as the rest of
//! the chunk. With `model_b`, the second answer comes from another model (a second call):
//! the material of a model-against-model evaluation.

use super::settings_digest;
use super::{
    GenerationSettings, Rec, Reply, Stage, StageContext, StageError, StageSettings, Task, Work,
};
use crate::model::GenerateRequest;
use crate::record::{Conversation, Key, PairRecord, Payload, PromptPurpose};
use crate::worker::Job;

/// The `pairs` stage.
pub struct PairsStage {
    name: String,
    settings: GenerationSettings,
    helpful: bool,
    model_b: Option<String>,
    ctx: StageContext,
    digest: u128,
}

/// Builds the stage: the generation keys, plus `helpful` (also pair helpful prompts, for the
/// preference model's helpfulness comparisons; default false).
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let mut rest = settings.clone();
    let helpful = match rest.remove("helpful") {
        None => false,
        Some(toml::Value::Boolean(b)) => b,
        Some(other) => {
            return Err(StageError::Config {
                stage: name.to_string(),
                message: format!("`helpful` must be true or false, found {other}"),
            });
        }
    };
    let model_b = match rest.remove("model_b") {
        None => None,
        Some(toml::Value::String(m)) => Some(m),
        Some(other) => {
            return Err(StageError::Config {
                stage: name.to_string(),
                message: format!("`model_b` must be a model name, found {other}"),
            });
        }
    };
    let parsed: GenerationSettings = super::parse_settings(name, &rest)?;
    if let Some(b) = &model_b {
        ctx.tokenizer(name, b)?;
    }
    if parsed.temperature <= 0.0 && model_b.is_none() {
        return Err(StageError::Config {
            stage: name.to_string(),
            message: "`temperature` must be above 0: greedy decoding would give two equal answers"
                .into(),
        });
    }
    ctx.tokenizer(name, &parsed.model)?;
    Ok(Box::new(PairsStage {
        name: name.to_string(),
        settings: parsed,
        helpful,
        model_b,
        ctx: ctx.clone(),
        digest: settings_digest(settings),
    }))
}

impl Stage for PairsStage {
    fn models(&self) -> Vec<String> {
        let mut models = vec![self.settings.model.clone()];
        models.extend(self.model_b.clone());
        models
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        match &rec.payload {
            Payload::Prompt(p) => p.purpose == PromptPurpose::RedTeam || self.helpful,
            _ => false,
        }
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let Payload::Prompt(p) = &rec.payload else {
            return Ok(Vec::new());
        };
        let prompt = self
            .ctx
            .user_prompt(&self.name, &self.settings.model, rec.key, &p.text)?;
        let requests: Vec<GenerateRequest> = (0..2)
            .map(|i| GenerateRequest {
                prompt: prompt.clone(),
                params: self
                    .settings
                    .params(self.ctx.derive_seed(&self.name, rec.key, i)),
            })
            .collect();
        let key = Key::builder(&self.name)
            .key(rec.key)
            .u64(self.ctx.seed)
            .u128(self.digest)
            .finish();
        let work = match &self.model_b {
            // Two models: the first answer now, the second in a call of its own.
            Some(_) => Work::generate(&self.settings.model, requests[0].clone()),
            None => Work::generate_many(&self.settings.model, requests),
        };
        Ok(vec![Task::new(key, rec.clone(), work)])
    }

    fn more(&self, task: &Task, _reply: &Reply) -> Result<Option<Work>, StageError> {
        let (Some(model_b), true, Payload::Prompt(p)) =
            (&self.model_b, task.history.is_empty(), &task.input.payload)
        else {
            return Ok(None);
        };
        let prompt = self
            .ctx
            .user_prompt(&self.name, model_b, task.input.key, &p.text)?;
        Ok(Some(Work::generate(
            model_b,
            GenerateRequest {
                prompt,
                params: self
                    .settings
                    .params(self.ctx.derive_seed(&self.name, task.input.key, 1)),
            },
        )))
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        if let (Some(model_b), [first], Some(b), Payload::Prompt(p)) = (
            &self.model_b,
            task.history.as_slice(),
            reply.generation(),
            &task.input.payload,
        ) && let Some(a) = first.generation()
        {
            let tok_a = self.ctx.tokenizer(&self.name, &self.settings.model)?;
            let tok_b = self.ctx.tokenizer(&self.name, model_b)?;
            return Ok(Payload::Pair(PairRecord {
                conversation: Conversation {
                    purpose: p.purpose,
                    prompt: p.text.clone(),
                },
                response_a: super::decode(tok_a, a),
                response_b: super::decode(tok_b, b),
                tokens_a: a.tokens.clone(),
                tokens_b: b.tokens.clone(),
                seeds: [
                    self.ctx.derive_seed(&self.name, task.input.key, 0),
                    self.ctx.derive_seed(&self.name, task.input.key, 1),
                ],
            }));
        }
        let (Payload::Prompt(p), Some(g), Some(Job::Generate(requests))) = (
            &task.input.payload,
            reply.into_generations(),
            task.work.job(),
        ) else {
            return Err(StageError::Record {
                stage: self.name.clone(),
                key: task.input.key,
                message: "unexpected reply".into(),
            });
        };
        let [a, b] = <[_; 2]>::try_from(g).map_err(|g| StageError::Record {
            stage: self.name.clone(),
            key: task.input.key,
            message: format!("expected 2 answers, got {}", g.len()),
        })?;
        let tok = self.ctx.tokenizer(&self.name, &self.settings.model)?;
        Ok(Payload::Pair(PairRecord {
            conversation: Conversation {
                purpose: p.purpose,
                prompt: p.text.clone(),
            },
            response_a: super::decode(tok, &a),
            response_b: super::decode(tok, &b),
            tokens_a: a.tokens,
            tokens_b: b.tokens,
            seeds: [requests[0].params.seed, requests[1].params.seed],
        }))
    }
}
