//! `sft`: supervised finetuning of a model on (red-team prompt → final revision) pairs, mixed
//! with (helpful prompt → sample) pairs at a configured ratio, as the records stream in.
//!
//! The stage collects the records of each dataflow epoch; when the epoch is complete it sorts
//! them by key (so batches do not depend on arrival order), splits off a held-out share by
//! key, and forms optimiser steps of `batch_size` examples. At the end it trains on the
//! remainder, measures the held-out loss and writes a checkpoint. Steps are deterministic, so
//! a resumed run that retrains them logs nothing twice (same keys).

use serde::Deserialize;

use super::epoch_trainer::{EpochTrainer, Step};
use super::settings_digest;
use super::{
    Rec, StageContext, StageError, StageSettings, TrainJob, TrainWork, TrainingStage, expect_report,
};
use crate::model::{Message, Role};
use crate::record::{Key, Payload, PromptPurpose, SftEvalRecord, SftStepRecord};
use crate::train::{OptimConfig, SftEval, SftEvalStats, SftExample, SftStep, StepStats};
use crate::worker::Job;

/// Builds the stage (see [`SftStage::build`]).
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn TrainingStage>, StageError> {
    Ok(Box::new(SftStage::build(name, settings, ctx)?))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "sft_model")]
    model: String,
    #[serde(default = "batch_size")]
    batch_size: usize,
    #[serde(default = "micro_batch")]
    micro_batch: usize,
    #[serde(default = "lr")]
    lr: f64,
    #[serde(default)]
    warmup_steps: u64,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default = "max_grad_norm")]
    max_grad_norm: f64,
    #[serde(default = "helpful_ratio")]
    helpful_ratio: f64,
    #[serde(default = "held_out")]
    held_out: f64,
    /// Passes over the training examples (more than one: training waits for the input's end).
    #[serde(default = "one")]
    epochs: usize,
    /// `constant`, `linear` or `cosine` decay after warmup (decay: training waits for the
    /// input's end, when the number of steps is known).
    #[serde(default = "constant")]
    lr_schedule: String,
}
fn one() -> usize {
    1
}
fn constant() -> String {
    "constant".into()
}
fn sft_model() -> String {
    "sft".into()
}
fn batch_size() -> usize {
    8
}
fn micro_batch() -> usize {
    4
}
fn lr() -> f64 {
    1e-5
}
fn max_grad_norm() -> f64 {
    1.0
}
fn helpful_ratio() -> f64 {
    1.0
}
fn held_out() -> f64 {
    0.1
}

/// The `sft` stage.
pub struct SftStage {
    name: String,
    settings: Settings,
    ctx: StageContext,
    digest: u128,
    trainer: EpochTrainer<SftExample>,
}

impl SftStage {
    /// Builds the stage from its settings.
    pub fn build(
        name: &str,
        settings: &StageSettings,
        ctx: &StageContext,
    ) -> Result<SftStage, StageError> {
        let parsed: Settings = super::parse_settings(name, settings)?;
        ctx.tokenizer(name, &parsed.model)?;
        let bad = |m: &str| StageError::Config {
            stage: name.to_string(),
            message: m.to_string(),
        };
        if parsed.batch_size == 0 || parsed.micro_batch == 0 {
            return Err(bad("batch_size and micro_batch must be at least 1"));
        }
        if !(0.0..1.0).contains(&parsed.held_out)
            || parsed.helpful_ratio < 0.0
            || parsed.lr.is_nan()
            || parsed.lr <= 0.0
        {
            return Err(bad(
                "held_out must be in [0, 1), helpful_ratio >= 0 and lr > 0",
            ));
        }
        if parsed.epochs == 0 {
            return Err(bad("epochs must be at least 1"));
        }
        let schedule = super::schedule::Schedule {
            epochs: parsed.epochs,
            warmup_steps: parsed.warmup_steps,
            decay: super::schedule::parse_decay(name, &parsed.lr_schedule)?,
        };
        let digest = settings_digest(settings);
        Ok(SftStage {
            name: name.to_string(),
            digest,
            trainer: EpochTrainer::new(
                name,
                ctx.seed,
                digest,
                parsed.batch_size,
                parsed.held_out,
                schedule,
            ),
            settings: parsed,
            ctx: ctx.clone(),
        })
    }

    /// The model the stage trains.
    pub fn model(&self) -> &str {
        &self.settings.model
    }

    fn example(&self, rec: &Rec) -> Result<Option<(SftExample, bool)>, StageError> {
        let (conversation, response, red) = match &rec.payload {
            Payload::Revision(r) => (&r.conversation, &r.response, true),
            Payload::Sample(s) => (&s.conversation, &s.response, false),
            Payload::Target(t) if t.kept => (
                &t.conversation,
                &t.response,
                t.conversation.purpose == PromptPurpose::RedTeam,
            ),
            _ => return Ok(None),
        };
        let tok = self.ctx.tokenizer(&self.name, &self.settings.model)?;
        let err = |e: crate::model::ModelError| StageError::Record {
            stage: self.name.clone(),
            key: rec.key,
            message: e.to_string(),
        };
        let context = tok
            .encode_chat(&[Message::new(Role::User, conversation.prompt.clone())])
            .map_err(err)?;
        let mut target = tok.encode(response).map_err(err)?;
        // Learn to end the turn, too.
        if let Some(&end) = tok.eos_ids().last() {
            target.push(end);
        }
        Ok(Some((SftExample { context, target }, red)))
    }

    fn add_epoch_inner(&mut self, mut recs: Vec<Rec>) -> Result<Vec<TrainWork>, StageError> {
        recs.sort_by_key(|r| r.key);
        let mut red = Vec::new();
        let mut helpful = Vec::new();
        for rec in &recs {
            if let Some((ex, is_red)) = self.example(rec)? {
                if is_red {
                    red.push((rec.key, ex))
                } else {
                    helpful.push((rec.key, ex))
                }
            }
        }
        let keep_helpful = ((red.len() as f64) * self.settings.helpful_ratio).ceil() as usize;
        helpful.truncate(if red.is_empty() {
            helpful.len()
        } else {
            keep_helpful
        });
        let mut all: Vec<(Key, SftExample)> = red.into_iter().chain(helpful).collect();
        all.sort_by_key(|(k, _)| *k);
        for (key, ex) in all {
            self.trainer.add(key, ex);
        }
        let steps = self.trainer.steps(self.settings.lr, false);
        Ok(steps.into_iter().map(|step| self.step_work(step)).collect())
    }

    fn finish_inner(&mut self) -> Vec<TrainWork> {
        let steps = self.trainer.steps(self.settings.lr, true);
        let mut work: Vec<TrainWork> = steps.into_iter().map(|s| self.step_work(s)).collect();
        let mut all = Key::builder(&self.name).str("end").u128(self.digest);
        for k in self.trainer.step_keys() {
            all = all.key(*k);
        }
        let end_key = all.finish();
        let step = self.trainer.steps_taken();
        if !self.trainer.held_out().is_empty() {
            let name = self.name.clone();
            work.push(TrainWork {
                key: Key::builder(&self.name).str("eval").key(end_key).finish(),
                parents: vec![],
                model: self.settings.model.clone(),
                job: TrainJob::Measure {
                    job: Job::measure(SftEval {
                        examples: self
                            .trainer
                            .held_out()
                            .iter()
                            .map(|(_, e)| e.clone())
                            .collect(),
                        micro_batch: self.settings.micro_batch,
                    }),
                    record: Box::new(move |out| {
                        let SftEvalStats { loss, tokens } = expect_report(&name, out)?;
                        tracing::info!(
                            stage = name,
                            step,
                            loss = format!("{loss:.4}"),
                            "held-out loss"
                        );
                        Ok(Some(Payload::SftEval(SftEvalRecord {
                            step,
                            loss,
                            tokens: tokens as u64,
                        })))
                    }),
                },
            });
        }
        if step > 0 {
            work.push(TrainWork {
                key: Key::builder(&self.name)
                    .str("checkpoint")
                    .key(end_key)
                    .finish(),
                parents: vec![],
                model: self.settings.model.clone(),
                job: TrainJob::Checkpoint { step },
            });
        }
        work
    }

    fn step_work(&self, step: Step<SftExample>) -> TrainWork {
        let Step {
            key,
            step,
            lr,
            batch,
        } = step;
        let s = &self.settings;
        let optim = OptimConfig {
            lr,
            weight_decay: s.weight_decay,
            max_grad_norm: s.max_grad_norm,
        };
        let (n, name) = (batch.len() as u64, self.name.clone());
        TrainWork {
            key,
            parents: batch.iter().map(|(k, _)| *k).collect(),
            model: s.model.clone(),
            job: TrainJob::Update {
                job: Job::train(SftStep {
                    examples: batch.into_iter().map(|(_, e)| e).collect(),
                    micro_batch: s.micro_batch,
                    optim,
                }),
                record: Box::new(move |out| {
                    let stats: StepStats = expect_report(&name, out)?;
                    tracing::info!(
                        stage = name,
                        step,
                        loss = format!("{:.4}", stats.loss),
                        "sft step"
                    );
                    Ok(Some(Payload::SftStep(SftStepRecord {
                        step,
                        loss: stats.loss,
                        tokens: stats.tokens as u64,
                        examples: n,
                        lr,
                        grad_norm: stats.grad_norm,
                    })))
                }),
                restored: None,
            },
        }
    }
}

impl TrainingStage for SftStage {
    fn trained_model(&self) -> &str {
        &self.settings.model
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Final revisions (the spec's `from` picks the round), helpful samples, and the
    /// targets a `filter` stage kept.
    fn accepts(&self, rec: &Rec) -> bool {
        match &rec.payload {
            Payload::Revision(_) => true,
            Payload::Target(t) => t.kept,
            Payload::Sample(s) => s.conversation.purpose == PromptPurpose::Helpful,
            _ => false,
        }
    }

    /// Forms the optimiser steps now full.
    fn add_epoch(&mut self, recs: Vec<Rec>) -> Result<Vec<TrainWork>, StageError> {
        self.add_epoch_inner(recs)
    }

    /// The last partial step, held-out loss, checkpoint.
    fn finish(&mut self) -> Result<Vec<TrainWork>, StageError> {
        Ok(self.finish_inner())
    }
}
