//! `judge`: AI feedback on a pair of answers — the soft preference labels of RL-CAI.
//!
//! For each pair the stage draws `ensemble` distinct comparison principles (seeded by the run
//! seed and the pair), and asks the feedback model each one as a multiple-choice question,
//! after the constitution's few-shot labelled comparisons, **in both orders** (the pair as
//! shown, and swapped) to cancel position bias. The answer's probability comes from the
//! log-probabilities of the two option continuations, `(A)` and `(B)`, normalised over the
//! two. The label is the mean, over every question, of the probability that the record's
//! first answer is the better one.
//!
//! In chain-of-thought mode (`cot = true`) the model first writes its reasoning (one model
//! call), then the options are scored after it (a second call); such answers are nearly
//! certain, so each question's probability is clamped to `clamp` (default `[0.4, 0.6]`).

use rand::seq::SliceRandom;
use serde::Deserialize;

use super::settings_digest;
use super::{ChatPrefix, Rec, Reply, Stage, StageContext, StageError, StageSettings, Task, Work};
use crate::constitution::{ComparisonExample, ComparisonPrinciple, render};
use crate::model::{ChoiceRequest, GenerateRequest, Message, Role, SamplingParams};
use crate::record::{JudgementRecord, Key, PairRecord, Payload, PromptPurpose, Vote};

/// What the feedback model writes after its reasoning, before the option (chain-of-thought).
pub const ANSWER_LEAD: &str = "Final answer:";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "feedback_model")]
    model: String,
    #[serde(default = "one")]
    ensemble: usize,
    #[serde(default)]
    cot: bool,
    #[serde(default = "default_clamp")]
    clamp: [f64; 2],
    few_shot: Option<usize>,
    /// Principle ids for red-team pairs (default: all).
    principles: Option<Vec<String>>,
    /// Principle ids for helpful pairs (default: the red-team pool).
    helpful_principles: Option<Vec<String>>,
    #[serde(default = "reasoning_tokens")]
    max_new_tokens: usize,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "top_p")]
    top_p: f32,
}
fn feedback_model() -> String {
    "policy".into()
}
fn one() -> usize {
    1
}
fn default_clamp() -> [f64; 2] {
    [0.4, 0.6]
}
fn reasoning_tokens() -> usize {
    96
}
fn top_p() -> f32 {
    1.0
}

/// The `judge` stage.
pub struct JudgeStage {
    name: String,
    settings: Settings,
    ctx: StageContext,
    digest: u128,
    prefix: ChatPrefix,
    red_pool: Vec<ComparisonPrinciple>,
    helpful_pool: Vec<ComparisonPrinciple>,
    option_a: Vec<u32>,
    option_b: Vec<u32>,
}

/// Builds the stage: `model` (the feedback model), `ensemble` (principles per comparison),
/// `cot`, `clamp`, `few_shot`, `principles`, `helpful_principles`, and for chain-of-thought
/// the reasoning's `max_new_tokens`, `temperature` and `top_p`.
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let s: Settings = super::parse_settings(name, settings)?;
    let bad = |message: String| StageError::Config {
        stage: name.to_string(),
        message,
    };
    let c = &ctx.constitution;
    let pool = |ids: &Option<Vec<String>>| -> Result<Vec<ComparisonPrinciple>, StageError> {
        match ids {
            None => Ok(c.comparison_principles.clone()),
            Some(ids) if ids.is_empty() => Err(bad("a principle list may not be empty".into())),
            Some(ids) => ids
                .iter()
                .map(|id| {
                    c.comparison_principle(id).cloned().ok_or_else(|| {
                        bad(format!(
                            "comparison principle `{id}` is not in the constitution"
                        ))
                    })
                })
                .collect(),
        }
    };
    let red_pool = pool(&s.principles)?;
    let helpful_pool = match &s.helpful_principles {
        None => red_pool.clone(),
        some => pool(some)?,
    };
    let smallest = red_pool.len().min(helpful_pool.len());
    if s.ensemble == 0 || s.ensemble > smallest {
        return Err(bad(format!(
            "`ensemble` must be between 1 and the number of principles to draw from ({smallest})"
        )));
    }
    let [lo, hi] = s.clamp;
    if !(0.0..=0.5).contains(&lo) || !(0.5..=1.0).contains(&hi) {
        return Err(bad(
            "`clamp` must be [low, high] with 0 <= low <= 0.5 <= high <= 1".into(),
        ));
    }
    let tok = ctx.tokenizer(name, &s.model)?;
    let tok_err = |e: crate::model::ModelError| bad(e.to_string());
    let turns = few_shot_turns(ctx, s.cot, s.few_shot.unwrap_or(usize::MAX)).map_err(&bad)?;
    let prefix = ChatPrefix::new(tok, &turns).map_err(tok_err)?;
    // After reasoning the option follows a space; as a reply's first words it does not.
    let sep = if s.cot { " " } else { "" };
    let option_a = tok.encode(&format!("{sep}(A)")).map_err(tok_err)?;
    let option_b = tok.encode(&format!("{sep}(B)")).map_err(tok_err)?;
    Ok(Box::new(JudgeStage {
        name: name.to_string(),
        digest: settings_digest(settings) ^ c.digest(),
        settings: s,
        ctx: ctx.clone(),
        prefix,
        red_pool,
        helpful_pool,
        option_a,
        option_b,
    }))
}

/// The comparison question for one principle, with the answers in the given order.
fn question(
    ctx: &StageContext,
    cot: bool,
    prompt: &str,
    first: &str,
    second: &str,
    principle: &str,
) -> Result<String, String> {
    let t = &ctx.constitution.templates;
    render(
        if cot {
            &t.comparison_cot
        } else {
            &t.comparison
        },
        &[
            ("prompt", prompt),
            ("response_a", first),
            ("response_b", second),
            ("principle", principle),
        ],
    )
    .map_err(|e| e.to_string())
}

/// The few-shot turns: each labelled example asked and answered (with its reasoning in
/// chain-of-thought mode).
fn few_shot_turns(ctx: &StageContext, cot: bool, limit: usize) -> Result<Vec<Message>, String> {
    let c = &ctx.constitution;
    let mut turns = Vec::new();
    for ex in c.comparison_examples.iter().take(limit) {
        let ComparisonExample {
            principle,
            prompt,
            response_a,
            response_b,
            preferred,
            reasoning,
        } = ex;
        let p = c
            .comparison_principle(principle)
            .ok_or_else(|| format!("example principle `{principle}` is not in the constitution"))?;
        turns.push(Message::new(
            Role::User,
            question(ctx, cot, prompt, response_a, response_b, &p.text)?,
        ));
        let answer = if cot {
            format!("{reasoning}\n{ANSWER_LEAD} ({})", preferred.letter())
        } else {
            format!("({})", preferred.letter())
        };
        turns.push(Message::new(Role::Assistant, answer));
    }
    Ok(turns)
}

/// P(option A) from the two options' log-probabilities, normalised over the two.
///
/// ```
/// use cairn::stages::judge::option_probability;
/// assert_eq!(option_probability(-1.0, -1.0), 0.5);
/// // e^-1 / (e^-1 + e^-3)
/// assert!((option_probability(-1.0, -3.0) - 0.880797).abs() < 1e-6);
/// ```
pub fn option_probability(logprob_a: f32, logprob_b: f32) -> f64 {
    1.0 / (1.0 + (f64::from(logprob_b) - f64::from(logprob_a)).exp())
}

/// The probability that the record's first answer is better, from one question: when the pair
/// was shown swapped, the first answer was option (B). `clamp` bounds it (chain-of-thought).
///
/// ```
/// use cairn::stages::judge::first_probability;
/// let p = first_probability(-1.0, -3.0, false, None);
/// assert!((p - 0.880797).abs() < 1e-6);
/// // Swapped: option (A) was the second answer.
/// assert!((first_probability(-1.0, -3.0, true, None) - 0.119203).abs() < 1e-6);
/// assert_eq!(first_probability(-1.0, -3.0, false, Some([0.4, 0.6])), 0.6);
/// ```
pub fn first_probability(
    logprob_a: f32,
    logprob_b: f32,
    swapped: bool,
    clamp: Option<[f64; 2]>,
) -> f64 {
    let p_a = option_probability(logprob_a, logprob_b);
    let p = if swapped { 1.0 - p_a } else { p_a };
    match clamp {
        Some([lo, hi]) => p.clamp(lo, hi),
        None => p,
    }
}

/// The soft label: the mean of every question's probability that the first answer is better
/// (each principle of the ensemble, both orders).
///
/// ```
/// use cairn::stages::judge::soft_label;
/// assert_eq!(soft_label(&[0.9, 0.7]), 0.8);
/// assert_eq!(soft_label(&[]), 0.5);
/// ```
pub fn soft_label(first_probabilities: &[f64]) -> f64 {
    if first_probabilities.is_empty() {
        return 0.5;
    }
    first_probabilities.iter().sum::<f64>() / first_probabilities.len() as f64
}

/// Cuts a chain-of-thought at the point where the model starts giving its answer, so the
/// engine can append the answer lead itself.
fn reasoning_part(text: &str) -> String {
    let cut = text.find(ANSWER_LEAD).unwrap_or(text.len());
    text[..cut].trim().to_string()
}

/// One question of a judgement: principle, order and its prompt tokens.
struct Question {
    principle: String,
    swapped: bool,
    context: Vec<u32>,
}

impl JudgeStage {
    fn pair<'a>(&self, rec: &'a Rec) -> Option<&'a PairRecord> {
        match &rec.payload {
            Payload::Pair(p) => Some(p),
            _ => None,
        }
    }

    fn draw(&self, pair: &PairRecord, key: Key) -> Vec<ComparisonPrinciple> {
        let pool = if pair.conversation.purpose == PromptPurpose::Helpful {
            &self.helpful_pool
        } else {
            &self.red_pool
        };
        let mut rng = self.ctx.rng("judge-principles", key, 0);
        pool.choose_multiple(&mut rng, self.settings.ensemble)
            .cloned()
            .collect()
    }

    fn questions(&self, rec: &Rec, pair: &PairRecord) -> Result<Vec<Question>, StageError> {
        let err = |message: String| StageError::Record {
            stage: self.name.clone(),
            key: rec.key,
            message,
        };
        let tok = self.ctx.tokenizer(&self.name, &self.settings.model)?;
        let mut out = Vec::new();
        for p in self.draw(pair, rec.key) {
            for swapped in [false, true] {
                let (first, second) = if swapped {
                    (&pair.response_b, &pair.response_a)
                } else {
                    (&pair.response_a, &pair.response_b)
                };
                let text = question(
                    &self.ctx,
                    self.settings.cot,
                    &pair.conversation.prompt,
                    first,
                    second,
                    &p.text,
                )
                .map_err(err)?;
                let context = self
                    .prefix
                    .encode(tok, &[Message::new(Role::User, text)])
                    .map_err(|e| err(e.to_string()))?;
                out.push(Question {
                    principle: p.id.clone(),
                    swapped,
                    context,
                });
            }
        }
        Ok(out)
    }

    /// The options of every question as one multiple-choice request each: the long context
    /// runs once, then `(A)` and `(B)` continue from it.
    fn option_requests(&self, contexts: Vec<Vec<u32>>) -> Work {
        let requests = contexts
            .into_iter()
            .map(|context| ChoiceRequest {
                context,
                choices: vec![self.option_a.clone(), self.option_b.clone()],
            })
            .collect();
        Work::score_choices(&self.settings.model, requests)
    }

    fn seed(&self, rec: &Rec) -> u64 {
        self.ctx.derive_seed(&self.name, rec.key, 0)
    }

    /// Reasoning texts decoded from the first call's reply, and the token ids that follow each
    /// question before the options: the reasoning and the answer lead.
    fn reasonings(&self, reply: &Reply) -> Result<Vec<(String, Vec<u32>)>, StageError> {
        let Some(gens) = reply.generations() else {
            return Err(StageError::Config {
                stage: self.name.clone(),
                message: "expected the reasoning generations".into(),
            });
        };
        let tok = self.ctx.tokenizer(&self.name, &self.settings.model)?;
        gens.iter()
            .map(|g| {
                let text = reasoning_part(&super::decode(tok, g));
                let ids = tok.encode(&format!("{text}\n{ANSWER_LEAD}")).map_err(|e| {
                    StageError::Config {
                        stage: self.name.clone(),
                        message: e.to_string(),
                    }
                })?;
                Ok((text, ids))
            })
            .collect()
    }
}

impl Stage for JudgeStage {
    fn models(&self) -> Vec<String> {
        vec![self.settings.model.clone()]
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        self.pair(rec).is_some()
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let Some(pair) = self.pair(rec) else {
            return Ok(Vec::new());
        };
        let questions = self.questions(rec, pair)?;
        let key = Key::builder(&self.name)
            .key(rec.key)
            .u64(self.ctx.seed)
            .u128(self.digest)
            .finish();
        let work = if self.settings.cot {
            let seed = self.seed(rec);
            Work::generate_many(
                &self.settings.model,
                questions
                    .into_iter()
                    .enumerate()
                    .map(|(i, q)| GenerateRequest {
                        prompt: q.context,
                        params: SamplingParams {
                            temperature: self.settings.temperature,
                            top_k: 0,
                            top_p: self.settings.top_p,
                            max_new_tokens: self.settings.max_new_tokens,
                            seed: seed.wrapping_add(i as u64),
                            stop: Vec::new(),
                        },
                    })
                    .collect(),
            )
        } else {
            self.option_requests(questions.into_iter().map(|q| q.context).collect())
        };
        Ok(vec![Task::new(key, rec.clone(), work)])
    }

    fn more(&self, task: &Task, reply: &Reply) -> Result<Option<Work>, StageError> {
        if !self.settings.cot || !task.history.is_empty() {
            return Ok(None);
        }
        let Some(pair) = self.pair(&task.input) else {
            return Ok(None);
        };
        let questions = self.questions(&task.input, pair)?;
        let reasonings = self.reasonings(reply)?;
        let contexts = questions
            .into_iter()
            .zip(reasonings)
            .map(|(q, (_, ids))| q.context.into_iter().chain(ids).collect())
            .collect();
        Ok(Some(self.option_requests(contexts)))
    }

    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError> {
        let err = |message: String| StageError::Record {
            stage: self.name.clone(),
            key: task.input.key,
            message,
        };
        let Some(pair) = self.pair(&task.input) else {
            return Err(err("not a pair".into()));
        };
        let Some(scores) = reply.choice_scores() else {
            return Err(err("expected option scores".into()));
        };
        let questions = self.questions(&task.input, pair)?;
        if scores.len() != questions.len() || scores.iter().any(|s| s.len() != 2) {
            return Err(err(format!(
                "{} option scores for {} questions",
                scores.len(),
                questions.len()
            )));
        }
        let reasonings: Vec<Option<String>> = match task.history.first() {
            Some(first) if self.settings.cot => self
                .reasonings(first)?
                .into_iter()
                .map(|(text, _)| Some(text))
                .collect(),
            _ => vec![None; questions.len()],
        };
        let clamp = self.settings.cot.then_some(self.settings.clamp);
        let votes: Vec<Vote> = questions
            .into_iter()
            .zip(scores)
            .zip(reasonings)
            .map(|((q, s), reasoning)| Vote {
                p_first: first_probability(s[0], s[1], q.swapped, clamp),
                principle: q.principle,
                swapped: q.swapped,
                logprob_a: s[0],
                logprob_b: s[1],
                reasoning,
            })
            .collect();
        let p_a = soft_label(&votes.iter().map(|v| v.p_first).collect::<Vec<_>>());
        Ok(Payload::Judgement(JudgementRecord {
            conversation: pair.conversation.clone(),
            response_a: pair.response_a.clone(),
            response_b: pair.response_b.clone(),
            principles: self
                .draw(pair, task.input.key)
                .into_iter()
                .map(|p| p.id)
                .collect(),
            cot: self.settings.cot,
            votes,
            p_a,
            seed: self.seed(&task.input),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_orders_cancel_a_position_bias() {
        // A judge that always leans 3:1 towards option (A), whatever is shown there.
        let (lp_a, lp_b) = ((0.75f32).ln(), (0.25f32).ln());
        let shown = first_probability(lp_a, lp_b, false, None);
        let swapped = first_probability(lp_a, lp_b, true, None);
        assert!((shown - 0.75).abs() < 1e-6);
        assert!((swapped - 0.25).abs() < 1e-6);
        assert!((soft_label(&[shown, swapped]) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn ensemble_averages_principles_by_hand() {
        // Principle 1: P(first) 0.8 as shown, 0.6 swapped (option A then = second answer, so
        // P(option A) = 0.4). Principle 2: 0.3 and 0.5.
        let lp = |p: f64| ((p as f32).ln(), ((1.0 - p) as f32).ln());
        let mut v = Vec::new();
        for (p_option_a, swapped) in [(0.8, false), (0.4, true), (0.3, false), (0.5, true)] {
            let (a, b) = lp(p_option_a);
            v.push(first_probability(a, b, swapped, None));
        }
        let expected = (0.8 + 0.6 + 0.3 + 0.5) / 4.0;
        assert!((soft_label(&v) - expected).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn chain_of_thought_labels_are_clamped_per_question() {
        let lp = |p: f64| ((p as f32).ln(), ((1.0 - p) as f32).ln());
        let (a, b) = lp(0.99);
        let clamp = Some([0.4, 0.6]);
        assert!((first_probability(a, b, false, clamp) - 0.6).abs() < 1e-12);
        assert!((first_probability(a, b, true, clamp) - 0.4).abs() < 1e-12);
        let (a, b) = lp(0.55);
        assert!((first_probability(a, b, false, clamp) - 0.55).abs() < 1e-6);
        // Confident in both orders that the first answer wins: 0.6 after the clamp.
        let (a2, b2) = lp(0.02);
        let label = soft_label(&[
            first_probability(a, b, false, clamp),
            first_probability(a2, b2, true, clamp),
        ]);
        assert!((label - (0.55 + 0.6) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn reasoning_stops_at_the_answer_lead() {
        assert_eq!(
            reasoning_part("B is kinder.\nFinal answer: (B)"),
            "B is kinder."
        );
        assert_eq!(reasoning_part("no lead here"), "no lead here");
    }
}
