//! `revise`: rewrites the answer following the round's critique, with the revision request
//! of the principle the critique was drawn for, after the constitution's few-shot examples.

use super::critique::{
    FRAMED_REVISION, critique_request, few_shot_prefix, framed, lead, revision_request, round_key,
    round_settings,
};
use super::settings_digest;
use super::{
    ChatPrefix, GenerationSettings, Rec, Reply, Stage, StageContext, StageError, StageSettings,
    Task, generate_task,
};
use crate::model::{Message, Role};
use crate::record::{Payload, RevisionRecord};

/// The `revise` stage of one round.
pub struct ReviseStage {
    name: String,
    round: u32,
    generation: GenerationSettings,
    ctx: StageContext,
    digest: u128,
    prefix: ChatPrefix,
    framed: bool,
    /// What every revision starts with (the model continues it), and its token ids.
    lead: (String, Vec<u32>),
}

/// Builds the stage: `round`, optional `few_shot`, and the generation keys.
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let (round, few_shot, generation) = round_settings(name, settings)?;
    if settings.contains_key("principles") {
        return Err(StageError::Config {
            stage: name.to_string(),
            message: "`principles` belongs on the critique stage: a revision follows the principle its critique drew".into(),
        });
    }
    let framed = framed(name, settings)?;
    let lead_text = lead(name, settings)?;
    let lead_ids = ctx
        .tokenizer(name, &generation.model)?
        .encode(&lead_text)
        .map_err(|e| StageError::Config {
            stage: name.to_string(),
            message: e.to_string(),
        })?;
    let shots = if framed {
        0
    } else {
        few_shot.unwrap_or(usize::MAX)
    };
    let prefix = few_shot_prefix(name, ctx, &generation, shots)?;
    Ok(Box::new(ReviseStage {
        name: name.to_string(),
        round,
        generation,
        ctx: ctx.clone(),
        digest: settings_digest(settings) ^ ctx.constitution.digest(),
        prefix,
        framed,
        lead: (lead_text, lead_ids),
    }))
}

impl Stage for ReviseStage {
    fn models(&self) -> Vec<String> {
        vec![self.generation.model.clone()]
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        matches!(&rec.payload, Payload::Critique(c) if c.round == self.round)
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let Payload::Critique(c) = &rec.payload else {
            return Ok(Vec::new());
        };
        let err = |message: String| StageError::Record {
            stage: self.name.clone(),
            key: rec.key,
            message,
        };
        let principle = self
            .ctx
            .constitution
            .critique_principle(&c.principle)
            .ok_or_else(|| {
                err(format!(
                    "principle `{}` is not in the constitution",
                    c.principle
                ))
            })?;
        let turns = if self.framed {
            vec![Message::new(
                Role::User,
                crate::constitution::render(
                    FRAMED_REVISION,
                    &[
                        ("prompt", &c.conversation.prompt),
                        ("critique", &c.critique),
                        ("principle_revision", &principle.revision),
                    ],
                )
                .map_err(|e| err(e.to_string()))?,
            )]
        } else {
            vec![
                Message::new(Role::User, c.conversation.prompt.clone()),
                Message::new(Role::Assistant, c.response.clone()),
                Message::new(
                    Role::User,
                    critique_request(&self.ctx, principle).map_err(err)?,
                ),
                Message::new(Role::Assistant, c.critique.clone()),
                Message::new(
                    Role::User,
                    revision_request(&self.ctx, principle).map_err(err)?,
                ),
            ]
        };
        let tok = self.ctx.tokenizer(&self.name, &self.generation.model)?;
        let mut prompt = self
            .prefix
            .encode(tok, &turns)
            .map_err(|e| err(e.to_string()))?;
        prompt.extend_from_slice(&self.lead.1);
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
        let (Payload::Critique(c), Some(g), Some(request)) = (
            &task.input.payload,
            reply.into_generation(),
            task.work.generate_request(),
        ) else {
            return Err(StageError::Record {
                stage: self.name.clone(),
                key: task.input.key,
                message: "unexpected reply".into(),
            });
        };
        let tok = self.ctx.tokenizer(&self.name, &self.generation.model)?;
        let mut response = if self.lead.0.is_empty() {
            super::decode(tok, &g)
        } else {
            // The lead is part of the answer; the model's words continue it as written.
            format!(
                "{}{}",
                self.lead.0,
                tok.decode(&g.tokens).unwrap_or_default()
            )
            .trim()
            .to_string()
        };
        // An empty rewrite would teach nothing; keep the critiqued answer then.
        if response.is_empty() {
            response = c.response.clone();
        }
        Ok(Payload::Revision(RevisionRecord {
            conversation: c.conversation.clone(),
            round: self.round,
            principle: c.principle.clone(),
            response,
            seed: request.params.seed,
        }))
    }
}
