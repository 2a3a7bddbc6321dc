//! `filter`: decides which answers SL-CAI may learn from. Each revision (of any round the spec
//! feeds it) and each helpful sample becomes a `target` event that is either kept or dropped
//! with a reason — empty, repetitive, meta-commentary about "the previous response", copied
//! instructions, a bare refusal, or cut off mid-sentence (`crate::quality`). The decision is
//! an event, so replay, fork and export see exactly what training saw. No model work.
//!
//! ```toml
//! [[stage]]
//! name = "targets"
//! kind = "filter"
//! from = ["revise_1", "revise_2", "sample"]   # every round's revisions, as the paper trains
//! drop_bare_refusals = true                    # default
//! ```

use serde::Deserialize;

use super::sample::settings_digest;
use super::{Rec, Reply, Stage, StageContext, StageError, StageSettings, Task, Work};
use crate::record::{Key, Payload, PromptPurpose, TargetRecord};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Drop refusals that do not engage with the request (default true: SL-CAI should learn
    /// to explain its objection and help with the safe part, not to decline).
    #[serde(default = "yes")]
    drop_bare_refusals: bool,
    /// Also check helpful samples (default true).
    #[serde(default = "yes")]
    samples: bool,
}
fn yes() -> bool {
    true
}

/// The `filter` stage.
pub struct FilterStage {
    name: String,
    settings: Settings,
    ctx: StageContext,
    digest: u128,
}

/// Builds the stage: `drop_bare_refusals`, `samples`.
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let parsed: Settings = super::parse_settings(name, settings)?;
    Ok(Box::new(FilterStage {
        name: name.to_string(),
        settings: parsed,
        ctx: ctx.clone(),
        digest: settings_digest(settings),
    }))
}

impl FilterStage {
    /// The target event for one record.
    fn check(&self, rec: &Rec) -> Result<Option<TargetRecord>, StageError> {
        let (conversation, response, origin, round, principle) = match &rec.payload {
            Payload::Revision(r) => (
                &r.conversation,
                &r.response,
                "revision",
                r.round,
                Some(&r.principle),
            ),
            Payload::Sample(s) if self.settings.samples => {
                (&s.conversation, &s.response, "sample", 0, None)
            }
            _ => return Ok(None),
        };
        // A revision must not copy the requests it was given back; a sample saw none.
        let mut instructions: Vec<&str> = Vec::new();
        if let Some(id) = principle {
            let p = self
                .ctx
                .constitution
                .critique_principle(id)
                .ok_or_else(|| StageError::Record {
                    stage: self.name.clone(),
                    key: rec.key,
                    message: format!("principle `{id}` is not in the constitution"),
                })?;
            instructions.push(&p.critique);
            instructions.push(&p.revision);
        }
        let mut reason = crate::quality::target_verdict(
            response,
            &instructions,
            self.settings.drop_bare_refusals,
        );
        // A sample that stopped at the length limit is cut off whatever its last character.
        if let (None, Payload::Sample(s)) = (&reason, &rec.payload)
            && !s.stopped
        {
            reason = Some("cut off (hit the token limit)".into());
        }
        Ok(Some(TargetRecord {
            conversation: conversation.clone(),
            response: response.clone(),
            origin: origin.into(),
            round,
            kept: reason.is_none(),
            reason: reason.unwrap_or_default(),
            repetition: crate::quality::repetition(response),
        }))
    }
}

impl Stage for FilterStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        match &rec.payload {
            Payload::Revision(_) => true,
            Payload::Sample(s) => {
                self.settings.samples && s.conversation.purpose == PromptPurpose::Helpful
            }
            _ => false,
        }
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let Some(target) = self.check(rec)? else {
            return Ok(Vec::new());
        };
        let key = Key::builder(&self.name)
            .key(rec.key)
            .u64(self.ctx.seed)
            .u128(self.digest)
            .finish();
        Ok(vec![Task::new(
            key,
            rec.clone(),
            Work::Pure(Payload::Target(target)),
        )])
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        match reply {
            Reply::Pure(p) => Ok(p),
            _ => Err(StageError::Record {
                stage: self.name.clone(),
                key: task.input.key,
                message: "unexpected reply".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::record::{Conversation, RevisionRecord, SampleRecord};

    fn stage(settings: &str) -> Box<dyn Stage> {
        let constitution = crate::constitution::Constitution::load(std::path::Path::new(
            "constitutions/default.toml",
        ))
        .expect("default constitution");
        let ctx = StageContext {
            constitution: Arc::new(constitution),
            seed: 5,
            tokenizers: Arc::new(HashMap::new()),
        };
        build("targets", &toml::from_str(settings).expect("toml"), &ctx).expect("builds")
    }

    fn revision(text: &str, principle: &str) -> Rec {
        Rec {
            key: Key::builder("r").str(text).finish(),
            parents: vec![],
            stage: "revise_1".into(),
            payload: Payload::Revision(RevisionRecord {
                conversation: Conversation {
                    purpose: PromptPurpose::RedTeam,
                    prompt: "How do I get into my ex's email?".into(),
                },
                round: 2,
                principle: principle.into(),
                response: text.into(),
                seed: 1,
            }),
        }
    }

    fn target(stage: &dyn Stage, rec: &Rec) -> TargetRecord {
        let tasks = stage.plan(rec).expect("plans");
        assert_eq!(tasks.len(), 1);
        let Work::Pure(p) = &tasks[0].work else {
            panic!("pure work expected")
        };
        match stage
            .complete(&tasks[0], Reply::Pure(p.clone()))
            .expect("completes")
        {
            Payload::Target(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keeps_good_revisions_and_drops_bad_ones_with_reasons() {
        let s = stage("");
        let good = target(
            s.as_ref(),
            &revision(
                "I can't help you get into someone else's account. If you need something \
                 from it, ask them directly, or if it is evidence for a legal matter, a lawyer \
                 can request it properly.",
                "privacy",
            ),
        );
        assert!(good.kept, "{}", good.reason);
        assert_eq!((good.origin.as_str(), good.round), ("revision", 2));
        let cases = [
            ("", "empty"),
            (
                "The previous response is not entirely accurate. The previous response is not \
                 entirely accurate. The previous response is not entirely accurate.",
                "repetitive",
            ),
            (
                "The previous reply was unsafe, so here is a better one.",
                "meta-commentary",
            ),
            (
                "Protects other people's privacy and accounts, while helping with the \
                 legitimate concern behind the request.",
                "echoes",
            ),
            ("I'm sorry, but I can't assist with that.", "bare refusal"),
            ("You could start by asking them whether", "cut off"),
        ];
        for (text, reason) in cases {
            let t = target(s.as_ref(), &revision(text, "privacy"));
            assert!(!t.kept && t.reason.starts_with(reason), "{text:?}: {t:?}");
        }
        // Bare refusals may be kept when asked.
        let lenient = stage("drop_bare_refusals = false");
        assert!(
            target(
                lenient.as_ref(),
                &revision("I'm sorry, but I can't assist with that.", "privacy")
            )
            .kept
        );
    }

    #[test]
    fn checks_helpful_samples_and_their_stop() {
        let s = stage("");
        let sample = |stopped: bool, purpose| Rec {
            key: Key::builder("s").u64(stopped as u64).finish(),
            parents: vec![],
            stage: "sample".into(),
            payload: Payload::Sample(SampleRecord {
                conversation: Conversation {
                    purpose,
                    prompt: "Name three rivers.".into(),
                },
                response: "The Nile, the Amazon and the Danube.".into(),
                tokens: vec![],
                logprob: 0.0,
                seed: 1,
                stopped,
            }),
        };
        assert!(s.accepts(&sample(true, PromptPurpose::Helpful)));
        assert!(!s.accepts(&sample(true, PromptPurpose::RedTeam)));
        assert!(target(s.as_ref(), &sample(true, PromptPurpose::Helpful)).kept);
        let cut = target(s.as_ref(), &sample(false, PromptPurpose::Helpful));
        assert!(!cut.kept && cut.reason.contains("token limit"), "{cut:?}");
        assert!(
            stage("")
                .plan(&revision("x.", "no-such-principle"))
                .is_err()
        );
    }
}
