//! Stages: the units of work of a CAI dataflow, one file each. A stage says which records it
//! consumes, how each consumed record turns into tasks (with the idempotency key of each
//! output), what model work a task needs, and how the model's reply becomes the output
//! record. It knows nothing of timely or log files: the engine (`crate::engine`) turns each
//! stage into an operator that batches the model work, logs every output before emitting it,
//! and skips tasks whose keys are already logged.
//!
//! Adding a stage: write `src/stages/<name>.rs` implementing [`Stage`], add one line to
//! [`registry`], and name it in a `dataflows/*.toml` spec (see `examples/custom_stage.rs`).

pub mod assess;
pub mod critique;
pub mod epoch_trainer;
pub mod filter;
pub mod judge;
pub mod pairs;
pub mod pm;
pub mod ppo;
pub mod revise;
pub mod rollout;
pub mod sample;
pub mod schedule;
pub mod sft;

use std::collections::HashMap;
use std::sync::Arc;

use rand::SeedableRng;

use crate::constitution::Constitution;
use crate::model::{GenerateRequest, Generation, ScoreRequest, Scored, Tokenizer};
use crate::record::{Key, Payload};

/// A record flowing through the dataflow: an event's key, lineage and payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Rec {
    /// Idempotency key of the event.
    pub key: Key,
    /// Keys of the records it was derived from.
    pub parents: Vec<Key>,
    /// The stage instance that produced it.
    pub stage: String,
    /// The record.
    pub payload: Payload,
}

/// How a [`Rec`] crosses between timely workers and processes: its payload as the log stores
/// it (kind name and bincode body), so every record kind travels without serde derives.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireRec {
    key: Key,
    parents: Vec<Key>,
    stage: String,
    kind: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

impl serde::Serialize for Rec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut body = Vec::new();
        self.payload.encode_body_into(&mut body);
        WireRec {
            key: self.key,
            parents: self.parents.clone(),
            stage: self.stage.clone(),
            kind: self.payload.kind().to_string(),
            body,
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Rec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rec, D::Error> {
        let w = WireRec::deserialize(d)?;
        Ok(Rec {
            key: w.key,
            parents: w.parents,
            stage: w.stage,
            payload: Payload::decode(&w.kind, w.body).map_err(serde::de::Error::custom)?,
        })
    }
}

/// Model work a task needs: a worker [`Job`](crate::worker::Job) addressed to a model of
/// the run by name, or nothing to compute. Stages and the worker share one request
/// vocabulary; the engine merges a chunk's jobs into one model call and splits the answer
/// back, one [`Reply`] per task.
///
/// ```
/// use cairn::model::{GenerateRequest, SamplingParams};
/// use cairn::stages::Work;
/// let work = Work::generate(
///     "policy",
///     GenerateRequest { prompt: vec![1, 2], params: SamplingParams::default() },
/// );
/// assert_eq!((work.model(), work.requests()), (Some("policy"), 1));
/// assert_eq!(work.generate_request().map(|r| r.prompt.len()), Some(2));
/// ```
#[derive(Clone, Debug)]
pub enum Work {
    /// A job for the named model.
    Model {
        /// Model name in the run.
        model: String,
        /// What it computes (generation, scoring or multiple-choice scoring).
        job: crate::worker::Job,
    },
    /// No model work: the output is known already.
    Pure(Payload),
}

impl Work {
    /// One generation with `model`.
    pub fn generate(model: &str, request: GenerateRequest) -> Work {
        Work::generate_many(model, vec![request])
    }

    /// Several generations with `model`, in one model call with the rest of the chunk.
    pub fn generate_many(model: &str, requests: Vec<GenerateRequest>) -> Work {
        Work::Model {
            model: model.to_string(),
            job: crate::worker::Job::Generate(requests),
        }
    }

    /// One scoring with `model`.
    pub fn score(model: &str, request: ScoreRequest) -> Work {
        Work::Model {
            model: model.to_string(),
            job: crate::worker::Job::Score(vec![request]),
        }
    }

    /// Multiple-choice questions for `model`: each context once, then its choices.
    pub fn score_choices(model: &str, requests: Vec<crate::model::ChoiceRequest>) -> Work {
        Work::Model {
            model: model.to_string(),
            job: crate::worker::Job::ScoreChoices(requests),
        }
    }

    /// The worker job this work is (`None` for pure work).
    pub fn job(&self) -> Option<&crate::worker::Job> {
        match self {
            Work::Model { job, .. } => Some(job),
            Work::Pure(_) => None,
        }
    }

    /// How many requests the work's job carries (0 for pure work).
    pub fn requests(&self) -> usize {
        self.job().map_or(0, |j| j.requests())
    }

    /// The first generation request, for work that generates.
    pub fn generate_request(&self) -> Option<&GenerateRequest> {
        match self.job() {
            Some(crate::worker::Job::Generate(r)) => r.first(),
            _ => None,
        }
    }

    /// The reply to this work, from the worker's output for [`Work::job`]; an output of
    /// another kind or size is an error saying what came.
    pub fn reply(&self, out: crate::worker::JobOutput) -> Result<Reply, String> {
        use crate::worker::{Job, JobOutput};
        let answers = match (self.job(), &out) {
            (Some(Job::Generate(_)), JobOutput::Generated(g)) => g.len(),
            (Some(Job::Score(_)), JobOutput::Scored(s)) => s.len(),
            (Some(Job::ScoreChoices(_)), JobOutput::ChoiceScores(c)) => c.len(),
            _ => return Err(format!("{out:?} does not answer {self:?}")),
        };
        if answers != self.requests() {
            return Err(format!(
                "{answers} answers to {} requests: {out:?} does not answer {self:?}",
                self.requests()
            ));
        }
        Ok(Reply::Model(out))
    }

    /// The model the work runs on (`None` for pure work).
    pub fn model(&self) -> Option<&str> {
        match self {
            Work::Model { model, .. } => Some(model),
            Work::Pure(_) => None,
        }
    }
}

/// One output to produce.
#[derive(Clone, Debug)]
pub struct Task {
    /// Key of the output event.
    pub key: Key,
    /// The input record.
    pub input: Rec,
    /// What to compute next.
    pub work: Work,
    /// Replies to the task's earlier model calls, oldest first (multi-call tasks; see
    /// [`Stage::more`]).
    pub history: Vec<Reply>,
}

impl Task {
    /// A task with no earlier calls.
    pub fn new(key: Key, input: Rec, work: Work) -> Task {
        Task {
            key,
            input,
            work,
            history: Vec::new(),
        }
    }
}

/// What the model answered for a task: the worker's output for the task's job, one answer
/// per request, in order.
#[derive(Clone, Debug)]
pub enum Reply {
    /// For [`Work::Model`].
    Model(crate::worker::JobOutput),
    /// For [`Work::Pure`].
    Pure(Payload),
}

impl Reply {
    /// The generations, for generate work.
    pub fn generations(&self) -> Option<&[Generation]> {
        match self {
            Reply::Model(crate::worker::JobOutput::Generated(g)) => Some(g),
            _ => None,
        }
    }

    /// The generation, for generate work of one request.
    pub fn generation(&self) -> Option<&Generation> {
        self.generations().filter(|g| g.len() == 1).map(|g| &g[0])
    }

    /// The generations, owned, for generate work.
    pub fn into_generations(self) -> Option<Vec<Generation>> {
        match self {
            Reply::Model(crate::worker::JobOutput::Generated(g)) => Some(g),
            _ => None,
        }
    }

    /// The generation, owned, for generate work of one request.
    pub fn into_generation(self) -> Option<Generation> {
        self.into_generations()
            .filter(|g| g.len() == 1)
            .and_then(|g| g.into_iter().next())
    }

    /// The scores, for score work.
    pub fn scores(&self) -> Option<&[Scored]> {
        match self {
            Reply::Model(crate::worker::JobOutput::Scored(s)) => Some(s),
            _ => None,
        }
    }

    /// The score, for score work of one request.
    pub fn scored(&self) -> Option<&Scored> {
        self.scores().filter(|s| s.len() == 1).map(|s| &s[0])
    }

    /// Per question, each choice's total log-probability, for multiple-choice work.
    pub fn choice_scores(&self) -> Option<&[Vec<f32>]> {
        match self {
            Reply::Model(crate::worker::JobOutput::ChoiceScores(c)) => Some(c),
            _ => None,
        }
    }
}

/// Errors of stages (configuration and record handling).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A stage's settings are wrong.
    #[error("stage `{stage}`: {message}")]
    Config {
        /// Stage instance name.
        stage: String,
        /// What is wrong.
        message: String,
    },
    /// A record could not be processed.
    #[error("stage `{stage}`, record {key}: {message}")]
    Record {
        /// Stage instance name.
        stage: String,
        /// The input record's key.
        key: Key,
        /// What went wrong.
        message: String,
    },
}

/// What every stage may use: the constitution, the run's master seed, tokenizers by model.
#[derive(Clone)]
pub struct StageContext {
    /// The run's constitution.
    pub constitution: Arc<Constitution>,
    /// The master seed every random draw derives from.
    pub seed: u64,
    /// Tokenizers of the run's models.
    pub tokenizers: Arc<HashMap<String, Tokenizer>>,
}

impl StageContext {
    /// The tokenizer of `model`.
    pub fn tokenizer(&self, stage: &str, model: &str) -> Result<&Tokenizer, StageError> {
        self.tokenizers
            .get(model)
            .ok_or_else(|| StageError::Config {
                stage: stage.to_string(),
                message: format!("no model named `{model}` in the run"),
            })
    }

    /// A seed for one draw, derived from the master seed and what the draw is for.
    pub fn derive_seed(&self, purpose: &str, key: Key, round: u64) -> u64 {
        let k = Key::builder("seed")
            .u64(self.seed)
            .str(purpose)
            .key(key)
            .u64(round)
            .finish();
        k.0 as u64
    }

    /// The tokens of `text` as a user turn of `model`'s chat, with the assistant turn opened
    /// — the prompt every answering stage sends. Errors name the stage and the record.
    pub fn user_prompt(
        &self,
        stage: &str,
        model: &str,
        key: Key,
        text: &str,
    ) -> Result<Vec<u32>, StageError> {
        self.tokenizer(stage, model)?
            .encode_chat(&[crate::model::Message::new(
                crate::model::Role::User,
                text.to_string(),
            )])
            .map_err(|e| StageError::Record {
                stage: stage.to_string(),
                key,
                message: e.to_string(),
            })
    }

    /// A seeded generator for one draw.
    pub fn rng(&self, purpose: &str, key: Key, round: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(self.derive_seed(purpose, key, round))
    }
}

/// A stage of the dataflow.
pub trait Stage: Send + Sync {
    /// The stage instance's name (unique in a dataflow).
    fn name(&self) -> &str;
    /// Whether the stage consumes this record (every record also flows on, so later stages
    /// may read the same records).
    fn accepts(&self, rec: &Rec) -> bool;
    /// The outputs a consumed record leads to.
    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError>;
    /// The output payload of a task, given the model's reply.
    fn complete(&self, task: &Task, reply: Reply) -> Result<Payload, StageError>;
    /// Every model the stage calls, by spec name. The engine reads this contract (never the
    /// stage's kind or settings) to place the stage in a multi-worker run and to decide
    /// whether `cairn run --verify` can recompute it.
    fn models(&self) -> Vec<String>;
    /// For tasks that need several model calls in sequence (e.g. reason, then answer):
    /// the next call after `reply`, or `None` when `reply` is the last one. The engine
    /// keeps earlier replies in [`Task::history`] and sends the task's whole chunk on
    /// together, so batches stay deterministic.
    fn more(&self, task: &Task, reply: &Reply) -> Result<Option<Work>, StageError> {
        let _ = (task, reply);
        Ok(None)
    }
    /// Model jobs to run once, in order, before the stage's first epoch is planned (after
    /// its gate opens) — e.g. freezing a copy of the policy as the RL reference.
    fn setup(&self) -> Vec<(String, crate::worker::Job)> {
        Vec::new()
    }
    /// Receives each record that comes back around a feedback loop (e.g. a new policy
    /// version for the `rollout` stage), before later epochs are planned.
    fn feedback(&self, rec: &Rec) {
        let _ = rec;
    }
}

/// Settings of one stage instance, as written in a dataflow spec.
pub type StageSettings = toml::Table;

/// Builds a stage of the given kind from its settings.
pub type StageBuilder = fn(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError>;

/// How a stage kind is built: as a stage that calls models, or as one that trains.
#[derive(Clone, Copy)]
pub enum Builder {
    /// A model-calling stage ([`Stage`]).
    Model(StageBuilder),
    /// A training stage ([`TrainingStage`]).
    Training(TrainingBuilder),
}

/// A stage kind: its name in specs, a one-line description, and how it is built. One
/// registry of these serves `cairn run`, `--verify`, `fork` and `cairn stages`.
///
/// ```
/// use cairn::stages::{registry, StageKind};
/// let kinds = registry();
/// let sample = kinds.iter().find(|k| k.name == "sample").expect("sample is a kind");
/// assert!(!sample.trains());
/// assert!(kinds.iter().any(|k| k.name == "ppo" && k.trains()));
/// ```
#[derive(Clone, Copy)]
pub struct StageKind {
    /// The kind's name, as `kind = "…"` in a spec.
    pub name: &'static str,
    /// One line for `cairn stages`.
    pub about: &'static str,
    /// What builds an instance from its settings.
    pub builder: Builder,
}

impl StageKind {
    /// A model-calling stage kind.
    pub const fn model(name: &'static str, about: &'static str, build: StageBuilder) -> Self {
        StageKind {
            name,
            about,
            builder: Builder::Model(build),
        }
    }

    /// A training stage kind.
    pub const fn training(name: &'static str, about: &'static str, build: TrainingBuilder) -> Self {
        StageKind {
            name,
            about,
            builder: Builder::Training(build),
        }
    }

    /// Whether the kind trains a model.
    pub fn trains(&self) -> bool {
        matches!(self.builder, Builder::Training(_))
    }
}

/// Every stage kind, by the name used in dataflow specs: the model-calling stages, then
/// the training stages.
pub fn registry() -> Vec<StageKind> {
    vec![
        StageKind::model(
            "sample",
            "answer each prompt with the policy model",
            sample::build,
        ),
        StageKind::model(
            "critique",
            "critique the latest answer against a principle drawn for the round",
            critique::build,
        ),
        StageKind::model(
            "revise",
            "rewrite the answer following the round's critique",
            revise::build,
        ),
        StageKind::model(
            "filter",
            "keep or drop each revision/helpful sample as an SFT target, with a logged reason",
            filter::build,
        ),
        StageKind::model(
            "pairs",
            "answer each prompt twice, with distinct seeds, for AI feedback",
            pairs::build,
        ),
        StageKind::model(
            "judge",
            "soft preference label for a pair from the feedback model (both orders, ensemble, CoT)",
            judge::build,
        ),
        StageKind::model(
            "assess",
            "ask the feedback model a yes/no question about each answer of a pair (default: evasive?)",
            assess::build,
        ),
        StageKind::model(
            "rollout",
            "sample from the current policy and score with the PM and the reference (PPO loop)",
            rollout::build,
        ),
        StageKind::training(
            "sft",
            "finetune a model on final revisions mixed with helpful samples",
            sft::build,
        ),
        StageKind::training(
            "pm",
            "train a preference model on soft AI-feedback labels",
            pm::build,
        ),
        StageKind::training(
            "ppo",
            "update the policy with PPO against the preference model (feeds `rollout`)",
            ppo::build,
        ),
    ]
}

/// A digest of a stage's settings, part of every output key the stage derives: a changed
/// setting gives new keys, so a rerun recomputes exactly the stages whose settings changed.
pub fn settings_digest(settings: &StageSettings) -> u128 {
    Key::builder("settings")
        .str(&settings.to_string())
        .finish()
        .0
}

/// Reads typed settings out of a stage's table, rejecting unknown keys.
pub fn parse_settings<T: serde::de::DeserializeOwned>(
    name: &str,
    settings: &StageSettings,
) -> Result<T, StageError> {
    toml::Value::Table(settings.clone())
        .try_into()
        .map_err(|e: toml::de::Error| StageError::Config {
            stage: name.to_string(),
            message: e.message().to_string(),
        })
}

/// The generation settings every generating stage accepts.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// Model name in the run.
    #[serde(default = "default_model")]
    pub model: String,
    /// Most new tokens.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Nucleus mass.
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// Top-k (0: off).
    #[serde(default)]
    pub top_k: usize,
}

fn default_model() -> String {
    "policy".into()
}
fn default_max_new() -> usize {
    128
}
fn default_temperature() -> f32 {
    0.7
}
fn default_top_p() -> f32 {
    0.9
}

impl GenerationSettings {
    /// Sampling parameters with the given seed.
    pub fn params(&self, seed: u64) -> crate::model::SamplingParams {
        crate::model::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed,
            stop: Vec::new(),
        }
    }
}

/// The fixed opening turns of a stage's prompts (system message and few-shot examples),
/// tokenised once; each task then tokenises only its own turns.
pub struct ChatPrefix {
    ids: Vec<u32>,
}

impl ChatPrefix {
    /// Tokenises `turns` (rendered with the model's default system message).
    pub fn new(
        tok: &Tokenizer,
        turns: &[crate::model::Message],
    ) -> Result<ChatPrefix, crate::model::ModelError> {
        Ok(ChatPrefix {
            ids: tok.encode(&tok.chat().render(turns, false))?,
        })
    }

    /// The ids of the prefix followed by `rest` and an open assistant turn — the same ids
    /// as encoding the whole conversation at once.
    pub fn encode(
        &self,
        tok: &Tokenizer,
        rest: &[crate::model::Message],
    ) -> Result<Vec<u32>, crate::model::ModelError> {
        let mut ids = self.ids.clone();
        ids.extend(tok.encode(&tok.chat().render_turns(rest, true))?);
        Ok(ids)
    }
}

/// A generation task for `rec` with output key `key`.
pub fn generate_task(
    rec: &Rec,
    key: Key,
    settings: &GenerationSettings,
    prompt: Vec<u32>,
    seed: u64,
) -> Task {
    Task::new(
        key,
        rec.clone(),
        Work::generate(
            &settings.model,
            GenerateRequest {
                prompt,
                params: settings.params(seed),
            },
        ),
    )
}

/// Decodes a generation into trimmed text.
pub fn decode(tok: &Tokenizer, g: &Generation) -> String {
    tok.decode(&g.tokens).unwrap_or_default().trim().to_string()
}

/// The key of a training step: the stage, the step (or policy version), the run seed, the
/// stage's settings digest and the keys of the records the step learns from.
pub fn step_key<'a>(
    stage: &str,
    step: u64,
    seed: u64,
    digest: u128,
    inputs: impl IntoIterator<Item = &'a Key>,
) -> Key {
    inputs
        .into_iter()
        .fold(
            Key::builder(stage).u64(step).u64(seed).u128(digest),
            |k, input| k.key(*input),
        )
        .finish()
}

/// Turns a model's reply to a training job into the event to log (`None`: log nothing).
pub type RecordFn =
    Box<dyn FnOnce(crate::worker::JobOutput) -> Result<Option<Payload>, StageError> + Send>;

/// Called instead of a [`RecordFn`] when an update is covered by a saved training state and
/// so does not run: it receives the logged event, so that the stage can rebuild what it
/// derives from its updates' outcomes (a history of scores, say).
pub type RestoredFn = Box<dyn FnOnce(&Payload) + Send>;

/// One job of a training stage, run on the model worker in order.
pub struct TrainWork {
    /// Key of the event it logs.
    pub key: Key,
    /// Keys of the records it used.
    pub parents: Vec<Key>,
    /// The model it runs on.
    pub model: String,
    /// What to do.
    pub job: TrainJob,
}

/// What a training job is, which decides what resume does with it.
pub enum TrainJob {
    /// Changes the model (an optimiser step, a weight copy). Run unless a saved training
    /// state covers it (the engine then restores that state instead); run again, and
    /// compared with its logged event, when it came after the last saved state. The event
    /// is logged once.
    Update {
        /// The job.
        job: crate::worker::Job,
        /// Its event.
        record: RecordFn,
        /// What the stage learns from the logged event when the job does not run.
        restored: Option<RestoredFn>,
    },
    /// Only reads the model (an evaluation): skipped when its event is logged.
    Measure {
        /// The job.
        job: crate::worker::Job,
        /// Its event.
        record: RecordFn,
    },
    /// Save the model to `checkpoints/<stage>-step<step>` and log a `checkpoint` event.
    Checkpoint {
        /// Steps the checkpoint includes.
        step: u64,
    },
}

/// A stage that trains a model as records stream in (`sft`, `pm`, `ppo`). The engine hands
/// it each complete epoch's records (sorted by key, so work never depends on arrival order)
/// and runs the work it returns in order; outputs are logged, then emitted downstream.
pub trait TrainingStage: Send + Sync {
    /// The stage instance's name.
    fn name(&self) -> &str;
    /// Whether the stage consumes this record (every record also flows on downstream).
    fn accepts(&self, rec: &Rec) -> bool;
    /// Takes one complete epoch's records; returns the work now ready.
    fn add_epoch(&mut self, recs: Vec<Rec>) -> Result<Vec<TrainWork>, StageError>;
    /// Called once when the input has ended: the remaining work (last step, evaluation,
    /// checkpoint).
    fn finish(&mut self) -> Result<Vec<TrainWork>, StageError>;
    /// The model the stage trains, by spec name. Stages that call it see its weights change,
    /// so the engine runs them where the training runs and does not re-verify them.
    fn trained_model(&self) -> &str;
    /// The kind of record (its payload kind name) that goes back around a feedback loop to
    /// the stages this one reads from — PPO's `ppo_update`, the new policy version its
    /// rollouts wait for before planning their next epoch — or `None` outside a loop.
    fn feeds_back(&self) -> Option<&'static str> {
        None
    }
}

/// Builds a training stage of the given kind from its settings.
pub type TrainingBuilder = fn(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn TrainingStage>, StageError>;

/// Reads a training or measuring job's report as the type its algorithm answers, or says
/// what came instead.
pub fn expect_report<T: std::any::Any + Clone>(
    stage: &str,
    out: crate::worker::JobOutput,
) -> Result<T, StageError> {
    use crate::worker::JobOutput;
    let picked = match out {
        JobOutput::Trained(r) => r.take::<T>().map_err(JobOutput::Trained),
        JobOutput::Measured(r) => r.take::<T>().map_err(JobOutput::Measured),
        other => Err(other),
    };
    picked.map_err(|other| StageError::Config {
        stage: stage.to_string(),
        message: format!("unexpected model reply {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Finish, SamplingParams};
    use crate::worker::JobOutput;

    fn generation(token: u32) -> Generation {
        Generation {
            tokens: vec![token],
            logprobs: vec![0.0],
            finish: Finish::Stop,
        }
    }

    #[test]
    fn a_reply_must_be_of_the_work_kind_with_one_answer_per_request() {
        let request = GenerateRequest {
            prompt: vec![1],
            params: SamplingParams::greedy(1),
        };
        let one = Work::generate("policy", request.clone());
        let reply = one
            .reply(JobOutput::Generated(vec![generation(7)]))
            .expect("one generation answers one request");
        assert_eq!(reply.generation().map(|g| g.tokens[0]), Some(7));
        assert!(reply.scored().is_none(), "not a score");

        let two = JobOutput::Generated(vec![generation(7), generation(8)]);
        let err = one
            .reply(two.clone())
            .expect_err("two answers to one request");
        assert!(err.contains("2 answers to 1 requests"), "{err}");
        let many = Work::generate_many("policy", vec![request.clone(), request]);
        let reply = many.reply(two).expect("two answers to two requests");
        assert!(reply.generation().is_none(), "two generations are not one");
        assert_eq!(reply.generations().map(|g| g.len()), Some(2));

        let scored = JobOutput::Scored(vec![Scored {
            logprobs: vec![0.0],
            total: 0.0,
            value: None,
        }]);
        assert!(
            one.reply(scored).is_err(),
            "a score does not answer a generation"
        );
        assert!(
            Work::Pure(Payload::Flag(crate::record::FlagRecord {
                flagged: Key::builder("x").finish(),
                reason: String::new(),
            }))
            .job()
            .is_none()
        );
    }
}
