//! `filter`: decides which answers SL-CAI may learn from. Each revision (of any round the spec
//! feeds it) and each helpful sample becomes a `target` event that is either kept or dropped
//! with a reason — empty, repetitive, meta-commentary about "the previous response", copied
//! instructions, a bare refusal, or cut off mid-sentence (`crate::quality`). The decision is
//! an event, so replay, fork and export see exactly what training saw. With `model` set, a
//! red-team revision that passes those checks is also put to the feedback model as a yes/no
//! question — does it still give harmful help? — and dropped when "yes" is more likely: a
//! small reviser often keeps complying.
//!
//! ```toml
//! [[stage]]
//! name = "targets"
//! kind = "filter"
//! from = ["revise_1", "revise_2", "sample"]   # every round's revisions, as the paper trains
//! drop_bare_refusals = true                    # default
//! model = "feedback"                           # optional: judge revisions for harm
//! trim_cut_off = true                          # keep a cut-off answer's finished sentences
//! drop_restated_requests = true                # "Instead, here is how to do it" is no refusal
//! ```

use serde::Deserialize;

use super::settings_digest;
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
    /// The feedback model that judges whether a red-team revision still helps with harm.
    model: Option<String>,
    /// P("yes, harmful") above which a judged revision is dropped (default 0.5; a judge
    /// that leans towards "yes" needs a higher bar).
    #[serde(default = "half")]
    harm_threshold: f64,
    /// Keep an answer that was cut off by cutting it back to its last complete sentence,
    /// when enough of it remains (default false: a cut-off answer is dropped). The kept
    /// target's reason says what was trimmed.
    #[serde(default)]
    trim_cut_off: bool,
    /// Drop a red-team revision whose offered alternative (what follows "Instead") repeats
    /// the request — a small reviser or policy often "declines" and then suggests the very
    /// thing asked for (default false).
    #[serde(default)]
    drop_restated_requests: bool,
}
fn half() -> f64 {
    0.5
}

/// The harm question put to the feedback model (our wording).
pub const HARM_QUESTION: &str = "Here is a request a user sent to an AI assistant, and the \
assistant's answer.\n\nREQUEST:\n{prompt}\n\nANSWER:\n{response}\n\nDoes the answer give \
real help toward something harmful, dangerous, illegal or unethical — instructions, details, \
persuasive content or encouragement that the request was after? Answer No if it declines that \
part or only offers safe, general or protective information. Reply with one word: Yes or No.";
fn yes() -> bool {
    true
}

/// Consecutive words of the request in a revision's alternative from which it is said to
/// restate the request (four words would catch "help you with" style phrases too often).
const RESTATED_WORDS: usize = 5;

/// The reason given to a sample that stopped at the token limit.
const CUT_AT_LIMIT: &str = "cut off (hit the token limit)";

/// The `filter` stage.
pub struct FilterStage {
    name: String,
    settings: Settings,
    ctx: StageContext,
    digest: u128,
    /// Token ids of "Yes" and "No" for the judge's model.
    options: Option<(Vec<u32>, Vec<u32>)>,
}

/// Builds the stage: `drop_bare_refusals`, `samples`, `model`, `harm_threshold`,
/// `trim_cut_off`, `drop_restated_requests`.
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let parsed: Settings = super::parse_settings(name, settings)?;
    if !(0.0..=1.0).contains(&parsed.harm_threshold) {
        return Err(StageError::Config {
            stage: name.to_string(),
            message: "`harm_threshold` must be in [0, 1]".into(),
        });
    }
    let options = match &parsed.model {
        None => None,
        Some(m) => {
            let tok = ctx.tokenizer(name, m)?;
            let enc = |t: &str| {
                tok.encode(t).map_err(|e| StageError::Config {
                    stage: name.to_string(),
                    message: e.to_string(),
                })
            };
            Some((enc("Yes")?, enc("No")?))
        }
    };
    Ok(Box::new(FilterStage {
        name: name.to_string(),
        settings: parsed,
        ctx: ctx.clone(),
        digest: settings_digest(settings),
        options,
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
        // Nor copy the few-shot examples it was shown.
        let examples: Vec<&str> = self
            .ctx
            .constitution
            .critique_examples
            .iter()
            .flat_map(|e| {
                [
                    e.response.as_str(),
                    e.critique.as_str(),
                    e.revision.as_str(),
                ]
            })
            .collect();
        let mut reason = crate::quality::target_verdict(
            response,
            &instructions,
            self.settings.drop_bare_refusals,
        );
        if reason.is_none()
            && principle.is_some()
            && self.settings.drop_restated_requests
            && conversation.purpose == PromptPurpose::RedTeam
            && let Some(at) = response.find("Instead")
        {
            let run = crate::quality::shared_run(&response[at..], &conversation.prompt);
            if run >= RESTATED_WORDS {
                reason = Some(format!(
                    "restates the request in its alternative ({run} words of it in a row)"
                ));
            }
        }
        if reason.is_none() && principle.is_some() {
            for example in &examples {
                let run = crate::quality::shared_run(response, example);
                if run >= crate::quality::ECHO_WORDS {
                    reason = Some(format!("copies a few-shot example ({run} words in a row)"));
                    break;
                }
            }
        }
        // A sample that stopped at the length limit is cut off whatever its last character.
        if let (None, Payload::Sample(s)) = (&reason, &rec.payload)
            && !s.stopped
        {
            reason = Some(CUT_AT_LIMIT.into());
        }
        let mut response = response.clone();
        let cut_off = reason.as_deref().is_some_and(|r| r.starts_with("cut off"));
        let mut kept = reason.is_none();
        if cut_off
            && self.settings.trim_cut_off
            && let Some(trimmed) = crate::quality::trim_to_last_sentence(&response)
            && crate::quality::target_verdict(
                trimmed,
                &instructions,
                self.settings.drop_bare_refusals,
            )
            .is_none()
        {
            let words = |t: &str| t.split_whitespace().count();
            reason = Some(format!(
                "trimmed to its last full sentence ({} of {} words kept)",
                words(trimmed),
                words(&response)
            ));
            response = trimmed.to_string();
            kept = true;
        }
        Ok(Some(TargetRecord {
            conversation: conversation.clone(),
            repetition: crate::quality::repetition(&response),
            response,
            origin: origin.into(),
            round,
            kept,
            reason: reason.unwrap_or_default(),
            p_harmful: None,
        }))
    }
}

impl Stage for FilterStage {
    fn models(&self) -> Vec<String> {
        self.settings.model.iter().cloned().collect()
    }

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
        let judged = target.kept
            && target.origin == "revision"
            && target.conversation.purpose == PromptPurpose::RedTeam;
        let work = match (&self.settings.model, &self.options) {
            (Some(model), Some((yes, no))) if judged => {
                let err = |message: String| StageError::Record {
                    stage: self.name.clone(),
                    key: rec.key,
                    message,
                };
                let text = crate::constitution::render(
                    HARM_QUESTION,
                    &[
                        ("prompt", &target.conversation.prompt),
                        ("response", &target.response),
                    ],
                )
                .map_err(|e| err(e.to_string()))?;
                let context = self
                    .ctx
                    .tokenizer(&self.name, model)?
                    .encode_chat(&[crate::model::Message::new(crate::model::Role::User, text)])
                    .map_err(|e| err(e.to_string()))?;
                Work::score_choices(
                    model,
                    vec![crate::model::ChoiceRequest {
                        context,
                        choices: vec![yes.clone(), no.clone()],
                    }],
                )
            }
            _ => Work::Pure(Payload::Target(target)),
        };
        Ok(vec![Task::new(key, rec.clone(), work)])
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        let err = |message: &str| StageError::Record {
            stage: self.name.clone(),
            key: task.input.key,
            message: message.into(),
        };
        match reply {
            Reply::Pure(p) => Ok(p),
            reply @ Reply::Model(_) => {
                let Some([yes, no]) = reply
                    .choice_scores()
                    .and_then(|s| s.first())
                    .map(|s| s.as_slice())
                else {
                    return Err(err("unexpected reply: expected two choice scores"));
                };
                let mut target = self
                    .check(&task.input)?
                    .ok_or_else(|| err("record is not a target"))?;
                let p = super::judge::option_probability(*yes, *no);
                target.p_harmful = Some(p);
                if p > self.settings.harm_threshold {
                    target.kept = false;
                    target.reason = format!("judged harmful (P(yes) {p:.2})");
                }
                Ok(Payload::Target(target))
            }
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

    #[test]
    fn drops_an_alternative_that_restates_the_request_when_asked() {
        let restating = "I won't help with this, because it is someone else's account. \
                         Instead, I can show you how to get into my ex's email without them \
                         knowing.";
        let engaging = "I won't help with this, because it is someone else's account. \
                        Instead, if you need something from it, ask them, or a lawyer can \
                        request it properly.";
        assert!(target(stage("").as_ref(), &revision(restating, "privacy")).kept);
        let strict = stage("drop_restated_requests = true");
        let dropped = target(strict.as_ref(), &revision(restating, "privacy"));
        assert!(
            !dropped.kept && dropped.reason.starts_with("restates the request"),
            "{dropped:?}"
        );
        assert!(target(strict.as_ref(), &revision(engaging, "privacy")).kept);
    }

    #[test]
    fn trims_a_cut_off_answer_to_its_last_full_sentence_when_asked() {
        let long = "You could start by asking them whether they still use the account, and \
                    explain why you need what is in it. If they say no, a lawyer can ask for \
                    the records properly. Keep copies of";
        let dropped = target(stage("").as_ref(), &revision(long, "privacy"));
        assert!(!dropped.kept && dropped.reason.starts_with("cut off"));
        let trimming = stage("trim_cut_off = true");
        let kept = target(trimming.as_ref(), &revision(long, "privacy"));
        assert!(kept.kept, "{kept:?}");
        assert!(kept.response.ends_with("records properly."), "{kept:?}");
        assert!(kept.reason.starts_with("trimmed"), "{kept:?}");
        // Too little left, or a remainder that fails another check: still dropped.
        for text in [
            "Ask them first. Then",
            "I'm sorry, but I can't assist with that. And",
        ] {
            let t = target(trimming.as_ref(), &revision(text, "privacy"));
            assert!(!t.kept, "{text:?}: {t:?}");
        }
    }
}
