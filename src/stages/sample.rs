//! `sample`: the policy model's first answer to each prompt (red-team and helpful alike),
//! through the model's chat template, with a seed derived from the run seed and the prompt.

use super::{
    GenerationSettings, Rec, Reply, Stage, StageContext, StageError, StageSettings, Task, Work,
    settings_digest,
};
use crate::model::GenerateRequest;
use crate::record::{Conversation, Key, Payload, SampleRecord};

/// The `sample` stage.
pub struct SampleStage {
    name: String,
    settings: GenerationSettings,
    ctx: StageContext,
    digest: u128,
}

/// Builds the stage from its settings (the [`GenerationSettings`] keys).
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let parsed: GenerationSettings = super::parse_settings(name, settings)?;
    ctx.tokenizer(name, &parsed.model)?;
    Ok(Box::new(SampleStage {
        name: name.to_string(),
        settings: parsed,
        ctx: ctx.clone(),
        digest: settings_digest(settings),
    }))
}

impl Stage for SampleStage {
    fn models(&self) -> Vec<String> {
        vec![self.settings.model.clone()]
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        matches!(rec.payload, Payload::Prompt(_))
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let Payload::Prompt(p) = &rec.payload else {
            return Ok(Vec::new());
        };
        let prompt = self
            .ctx
            .user_prompt(&self.name, &self.settings.model, rec.key, &p.text)?;
        let seed = self.ctx.derive_seed(&self.name, rec.key, 0);
        let key = Key::builder(&self.name)
            .key(rec.key)
            .u64(self.ctx.seed)
            .u128(self.digest)
            .finish();
        Ok(vec![Task {
            key,
            input: rec.clone(),
            history: Vec::new(),
            work: Work::generate(
                &self.settings.model,
                GenerateRequest {
                    prompt,
                    params: self.settings.params(seed),
                },
            ),
        }])
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        let (Payload::Prompt(p), Some(g), Some(request)) = (
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
        let tok = self.ctx.tokenizer(&self.name, &self.settings.model)?;
        Ok(Payload::Sample(SampleRecord {
            conversation: Conversation {
                purpose: p.purpose,
                prompt: p.text.clone(),
            },
            response: super::decode(tok, &g),
            logprob: g.logprobs.iter().sum(),
            stopped: g.finish == crate::model::Finish::Stop,
            tokens: g.tokens,
            seed: request.params.seed,
        }))
    }
}
