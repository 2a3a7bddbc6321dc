//! `pairs`: two answers to each red-team prompt (and, with `helpful = true`, each helpful
//! prompt) from one model, with distinct seeds derived from the run seed — the material the
//! feedback model compares. Both answers are sampled in the same model call as the rest of
//! the chunk.

use super::sample::settings_digest;
use super::{
    GenerationSettings, Rec, Reply, Stage, StageContext, StageError, StageSettings, Task, Work,
};
use crate::model::{GenerateRequest, Message, Role};
use crate::record::{Conversation, Key, PairRecord, Payload, PromptPurpose};

/// The `pairs` stage.
pub struct PairsStage {
    name: String,
    settings: GenerationSettings,
    helpful: bool,
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
    let parsed: GenerationSettings = super::parse_settings(name, &rest)?;
    if parsed.temperature <= 0.0 {
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
        ctx: ctx.clone(),
        digest: settings_digest(settings),
    }))
}

impl Stage for PairsStage {
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
        let tok = self.ctx.tokenizer(&self.name, &self.settings.model)?;
        let prompt = tok
            .encode_chat(&[Message::new(Role::User, p.text.clone())])
            .map_err(|e| StageError::Record {
                stage: self.name.clone(),
                key: rec.key,
                message: e.to_string(),
            })?;
        let requests = (0..2)
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
        Ok(vec![Task::new(
            key,
            rec.clone(),
            Work::GenerateMany {
                model: self.settings.model.clone(),
                requests,
            },
        )])
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        let (Payload::Prompt(p), Reply::GeneratedMany(g), Work::GenerateMany { requests, .. }) =
            (&task.input.payload, reply, &task.work)
        else {
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
