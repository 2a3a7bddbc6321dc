//! `critique`: for one revision round, draws a critique principle at random (seeded by the
//! run seed, the input record and the round; with replacement across rounds) and asks the
//! model to critique the latest answer to a red-team prompt against it, after the
//! constitution's few-shot examples. Helpful-prompt samples pass through untouched.

use rand::Rng;
use serde::Deserialize;

use super::settings_digest;
use super::{
    ChatPrefix, GenerationSettings, Rec, Reply, Stage, StageContext, StageError, StageSettings,
    Task, generate_task,
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
    /// Ids of the critique principles to draw from (default: all of the constitution's).
    principles: Option<Vec<String>>,
    /// `chat` (default): the few-shot examples as earlier turns of the conversation, then the
    /// answer, then the request, as in the paper. `framed`: one self-contained instruction
    /// holding the prompt, the answer (critique) or the critique (revision) and the
    /// principle, zero-shot — smaller instruction-tuned critics copy few-shot turns and the
    /// answer under revision back instead of rewriting them.
    format: Option<String>,
    /// Revise only: text the revision starts with, given to the model as the opening of its
    /// answer (e.g. a plain statement of what it declines), which it then continues.
    lead: Option<String>,
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
/// generation keys (`principles`, which only `critique` takes, is checked by its builder).
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

/// The critique instruction of the `framed` format (our wording).
pub const FRAMED_CRITIQUE: &str = "Below is a message a user sent to an AI assistant, and the \
assistant's answer.\n\nMESSAGE:\n{prompt}\n\nANSWER:\n{response}\n\nCritique the answer \
against this principle: {principle_critique}\nWrite the critique only, in two or three \
sentences.";

/// The revision instruction of the `framed` format (our wording). The answer under revision
/// is described by the critique, not shown: shown, a small reviser tends to copy it.
pub const FRAMED_REVISION: &str = "A user sent this message to an AI assistant:\n\"{prompt}\"\n\n\
A reviewer said of the assistant's first answer: {critique}\nThe reviewer's advice: \
{principle_revision}\n\nWrite the answer the assistant should give instead, speaking to the \
user. Never include harmful details. Do not just refuse: if you decline part of the request, \
say in one sentence what and why, then add two or three sentences, starting with \"Instead,\", \
that help with the person's likely underlying need or with the safe part of the request. \
Write only the answer.";

/// The `lead` of a revise stage's settings (empty when none).
pub(crate) fn lead(name: &str, settings: &StageSettings) -> Result<String, StageError> {
    let s: Settings = super::parse_settings(name, settings)?;
    Ok(s.lead.unwrap_or_default())
}

/// Whether a critique or revise stage's settings ask for the `framed` format.
pub(crate) fn framed(name: &str, settings: &StageSettings) -> Result<bool, StageError> {
    let s: Settings = super::parse_settings(name, settings)?;
    match s.format.as_deref() {
        None | Some("chat") => Ok(false),
        Some("framed") if s.few_shot.is_some_and(|n| n > 0) => Err(StageError::Config {
            stage: name.to_string(),
            message: "the `framed` format is zero-shot: drop `few_shot`".into(),
        }),
        Some("framed") => Ok(true),
        Some(other) => Err(StageError::Config {
            stage: name.to_string(),
            message: format!("`format = \"{other}\"`: expected chat or framed"),
        }),
    }
}

/// The `critique` stage of one round.
pub struct CritiqueStage {
    name: String,
    round: u32,
    generation: GenerationSettings,
    ctx: StageContext,
    digest: u128,
    prefix: ChatPrefix,
    /// The principles drawn from (indices into the constitution's list).
    pool: Vec<usize>,
    /// One self-contained instruction instead of few-shot chat turns.
    framed: bool,
}

/// Builds the stage: `round`, optional `few_shot` and `principles`, and the generation keys.
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let (round, few_shot, generation) = round_settings(name, settings)?;
    let framed = framed(name, settings)?;
    if settings.contains_key("lead") {
        return Err(StageError::Config {
            stage: name.to_string(),
            message: "`lead` belongs on the revise stage".into(),
        });
    }
    let shots = if framed {
        0
    } else {
        few_shot.unwrap_or(usize::MAX)
    };
    let prefix = few_shot_prefix(name, ctx, &generation, shots)?;
    let all = &ctx.constitution.critique_principles;
    let pool = match super::parse_settings::<Settings>(name, settings)?.principles {
        None => (0..all.len()).collect(),
        Some(ids) if ids.is_empty() => {
            return Err(StageError::Config {
                stage: name.to_string(),
                message: "`principles` may not be empty".into(),
            });
        }
        Some(ids) => ids
            .iter()
            .map(|id| {
                all.iter()
                    .position(|p| &p.id == id)
                    .ok_or_else(|| StageError::Config {
                        stage: name.to_string(),
                        message: format!("critique principle `{id}` is not in the constitution"),
                    })
            })
            .collect::<Result<Vec<usize>, StageError>>()?,
    };
    Ok(Box::new(CritiqueStage {
        name: name.to_string(),
        round,
        pool,
        framed,
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
    /// The principle drawn for `input` in this round (seeded; with replacement across rounds).
    fn draw(&self, input: Key) -> &CritiquePrinciple {
        let drawn = self
            .ctx
            .rng("critique-principle", input, self.round as u64)
            .gen_range(0..self.pool.len());
        &self.ctx.constitution.critique_principles[self.pool[drawn]]
    }

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
    fn models(&self) -> Vec<String> {
        vec![self.generation.model.clone()]
    }

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
        let principle = self.draw(rec.key);
        let turns = if self.framed {
            vec![Message::new(
                Role::User,
                render(
                    FRAMED_CRITIQUE,
                    &[
                        ("prompt", &conversation.prompt),
                        ("response", response),
                        ("principle_critique", &principle.critique),
                    ],
                )
                .map_err(|e| err(e.to_string()))?,
            )]
        } else {
            vec![
                Message::new(Role::User, conversation.prompt.clone()),
                Message::new(Role::Assistant, response.to_string()),
                Message::new(
                    Role::User,
                    critique_request(&self.ctx, principle).map_err(err)?,
                ),
            ]
        };
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
        let (Some((conversation, response)), Some(g), Some(request)) = (
            self.latest(&task.input),
            reply.into_generation(),
            task.work.generate_request(),
        ) else {
            return Err(err("unexpected reply"));
        };
        let principle = self.draw(task.input.key);
        let tok = self.ctx.tokenizer(&self.name, &self.generation.model)?;
        Ok(Payload::Critique(CritiqueRecord {
            conversation: conversation.clone(),
            round: self.round,
            principle: principle.id.clone(),
            response: response.to_string(),
            critique: super::decode(tok, &g),
            seed: request.params.seed,
        }))
    }
}
