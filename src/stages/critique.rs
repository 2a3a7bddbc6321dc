//! `critique`: for one revision round, draws a critique principle at random (seeded by the
//! run seed, the input record and the round; with replacement across rounds) and asks the
//! model to critique the latest answer to a red-team prompt against it, after the
//! constitution's few-shot examples. Helpful-prompt samples pass through untouched.

use rand::Rng;
use serde::Deserialize;

use super::sample::settings_digest;
use super::{
    ChatPrefix, GenerationSettings, Rec, Reply, Stage, StageContext, StageError, StageSettings,
    Task, Work, generate_task,
};
use crate::constitution::{CritiquePrinciple, render};
use crate::model::{Message, Role};
use crate::record::{Conversation, CritiqueRecord, Key, Payload, PromptPurpose};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Revision round this instance handles, from 1.
    round: u32,
    /// How many of the constitution's few-shot examples to show (default: all).
    few_shot: Option<usize>,
    #[serde(flatten)]
    generation: GenerationSettingsFlat,
}

/// [`GenerationSettings`] without `deny_unknown_fields` (serde cannot flatten that).
#[derive(Deserialize)]
struct GenerationSettingsFlat {
    #[serde(default = "model")]
    model: String,
    #[serde(default = "max_new")]
    max_new_tokens: usize,
    #[serde(default = "temperature")]
    temperature: f32,
    #[serde(default = "top_p")]
    top_p: f32,
    #[serde(default)]
    top_k: usize,
}
fn model() -> String {
    "policy".into()
}
fn max_new() -> usize {
    96
}
fn temperature() -> f32 {
    0.7
}
fn top_p() -> f32 {
    0.9
}

/// Parses the settings shared by `critique` and `revise`: `round`, `few_shot` and the
/// generation keys.
pub(crate) fn round_settings(
    name: &str,
    settings: &StageSettings,
) -> Result<(u32, Option<usize>, GenerationSettings), StageError> {
    let s: Settings = super::parse_settings(name, settings)?;
    if s.round == 0 {
        return Err(StageError::Config {
            stage: name.to_string(),
            message: "round counts from 1".into(),
        });
    }
    let g = s.generation;
    Ok((
        s.round,
        s.few_shot,
        GenerationSettings {
            model: g.model,
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
        },
    ))
}

/// The `critique` stage of one round.
pub struct CritiqueStage {
    name: String,
    round: u32,
    generation: GenerationSettings,
    ctx: StageContext,
    digest: u128,
    prefix: ChatPrefix,
}

/// Builds the stage: `round`, optional `few_shot`, and the generation keys.
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let (round, few_shot, generation) = round_settings(name, settings)?;
    let prefix = few_shot_prefix(name, ctx, &generation, few_shot.unwrap_or(usize::MAX))?;
    Ok(Box::new(CritiqueStage {
        name: name.to_string(),
        round,
        generation,
        ctx: ctx.clone(),
        digest: settings_digest(settings) ^ ctx.constitution.digest(),
        prefix,
    }))
}

/// The tokenised few-shot opening shared by every prompt of a critique or revise stage.
pub(crate) fn few_shot_prefix(
    name: &str,
    ctx: &StageContext,
    generation: &GenerationSettings,
    few_shot: usize,
) -> Result<ChatPrefix, StageError> {
    let tok = ctx.tokenizer(name, &generation.model)?;
    let config = |message: String| StageError::Config {
        stage: name.to_string(),
        message,
    };
    let turns = few_shot_turns(ctx, few_shot).map_err(config)?;
    ChatPrefix::new(tok, &turns).map_err(|e| config(e.to_string()))
}

/// The few-shot turns: for each example, the prompt, the flawed answer, the critique request
/// and critique, the revision request and revision.
pub(crate) fn few_shot_turns(ctx: &StageContext, limit: usize) -> Result<Vec<Message>, String> {
    let c = &ctx.constitution;
    let mut turns = Vec::new();
    for ex in c.critique_examples.iter().take(limit) {
        let p = c.critique_principle(&ex.principle).ok_or_else(|| {
            format!(
                "example principle `{}` is not in the constitution",
                ex.principle
            )
        })?;
        turns.push(Message::new(Role::User, ex.prompt.clone()));
        turns.push(Message::new(Role::Assistant, ex.response.clone()));
        turns.push(Message::new(Role::User, critique_request(ctx, p)?));
        turns.push(Message::new(Role::Assistant, ex.critique.clone()));
        turns.push(Message::new(Role::User, revision_request(ctx, p)?));
        turns.push(Message::new(Role::Assistant, ex.revision.clone()));
    }
    Ok(turns)
}

pub(crate) fn critique_request(
    ctx: &StageContext,
    p: &CritiquePrinciple,
) -> Result<String, String> {
    render(
        &ctx.constitution.templates.critique,
        &[("principle_critique", &p.critique)],
    )
    .map_err(|e| e.to_string())
}

pub(crate) fn revision_request(
    ctx: &StageContext,
    p: &CritiquePrinciple,
) -> Result<String, String> {
    render(
        &ctx.constitution.templates.revision,
        &[("principle_revision", &p.revision)],
    )
    .map_err(|e| e.to_string())
}

/// The output key of a round stage: its name, the input, the round, the run seed and the
/// digest of its settings and constitution.
pub(crate) fn round_key(name: &str, input: Key, round: u32, seed: u64, digest: u128) -> Key {
    Key::builder(name)
        .key(input)
        .u64(round as u64)
        .u64(seed)
        .u128(digest)
        .finish()
}

impl CritiqueStage {
    /// The latest answer and conversation of a record this round consumes.
    fn latest<'a>(&self, rec: &'a Rec) -> Option<(&'a Conversation, &'a str)> {
        match &rec.payload {
            Payload::Sample(s)
                if self.round == 1 && s.conversation.purpose == PromptPurpose::RedTeam =>
            {
                Some((&s.conversation, &s.response))
            }
            Payload::Revision(r) if r.round + 1 == self.round => {
                Some((&r.conversation, &r.response))
            }
            _ => None,
        }
    }
}

impl Stage for CritiqueStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        self.latest(rec).is_some()
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let Some((conversation, response)) = self.latest(rec) else {
            return Ok(Vec::new());
        };
        let err = |message: String| StageError::Record {
            stage: self.name.clone(),
            key: rec.key,
            message,
        };
        let principles = &self.ctx.constitution.critique_principles;
        let drawn = self
            .ctx
            .rng("critique-principle", rec.key, self.round as u64)
            .gen_range(0..principles.len());
        let principle = &principles[drawn];
        let turns = [
            Message::new(Role::User, conversation.prompt.clone()),
            Message::new(Role::Assistant, response.to_string()),
            Message::new(
                Role::User,
                critique_request(&self.ctx, principle).map_err(err)?,
            ),
        ];
        let tok = self.ctx.tokenizer(&self.name, &self.generation.model)?;
        let prompt = self
            .prefix
            .encode(tok, &turns)
            .map_err(|e| err(e.to_string()))?;
        let seed = self.ctx.derive_seed(&self.name, rec.key, self.round as u64);
        let key = round_key(&self.name, rec.key, self.round, self.ctx.seed, self.digest);
        Ok(vec![generate_task(
            rec,
            key,
            &self.generation,
            prompt,
            seed,
        )])
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        let err = |message: &str| StageError::Record {
            stage: self.name.clone(),
            key: task.input.key,
            message: message.to_string(),
        };
        let (Some((conversation, response)), Reply::Generated(g), Work::Generate { request, .. }) =
            (self.latest(&task.input), reply, &task.work)
        else {
            return Err(err("unexpected reply"));
        };
        let principles = &self.ctx.constitution.critique_principles;
        let drawn = self
            .ctx
            .rng("critique-principle", task.input.key, self.round as u64)
            .gen_range(0..principles.len());
        let tok = self.ctx.tokenizer(&self.name, &self.generation.model)?;
        Ok(Payload::Critique(CritiqueRecord {
            conversation: conversation.clone(),
            round: self.round,
            principle: principles[drawn].id.clone(),
            response: response.to_string(),
            critique: super::decode(tok, &g),
            seed: request.params.seed,
        }))
    }
}
