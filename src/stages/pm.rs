//! `pm`: trains the preference model on the judge's soft labels as they stream in.
//!
//! Each complete epoch's judgements are sorted by key; a share is held out by key (the same
//! comparisons on every run); the rest form optimiser steps of `batch_size`. Each step
//! minimises the soft-target cross-entropy (see `crate::train::pm`). Every `eval_every` steps
//! and at the end, held-out loss, accuracy and calibration are logged; the end also writes a
//! checkpoint. Helpful-prompt judgements (from `pairs` with `helpful = true`) mix in the
//! helpfulness comparisons; `helpful = false` here leaves them out.

use std::collections::HashMap;

use serde::Deserialize;

use super::epoch_trainer::{EpochTrainer, Step};
use super::rollout::pm_sequence;
use super::settings_digest;
use super::{
    Rec, StageContext, StageError, StageSettings, TrainJob, TrainWork, TrainingStage, expect_report,
};
use crate::record::{Key, Payload, PmEvalRecord, PmStepRecord, PromptPurpose};
use crate::train::{OptimConfig, PmEval, PmEvalStats, PmExample, PmStats, PmStep};
use crate::worker::Job;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "pm_model")]
    model: String,
    #[serde(default = "batch_size")]
    batch_size: usize,
    #[serde(default = "micro_batch")]
    micro_batch: usize,
    #[serde(default = "lr")]
    lr: f64,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default = "max_grad_norm")]
    max_grad_norm: f64,
    #[serde(default = "held_out")]
    held_out: f64,
    #[serde(default)]
    eval_every: u64,
    #[serde(default = "yes")]
    helpful: bool,
    /// Passes over the comparisons (more than one: training waits for the input's end).
    #[serde(default = "one")]
    epochs: usize,
    #[serde(default)]
    warmup_steps: u64,
    /// `constant`, `linear` or `cosine` decay after warmup.
    #[serde(default = "constant")]
    lr_schedule: String,
    /// Multiplies the label's log-odds: 1 trains towards the judge's probability as it is;
    /// above 1 makes an under-confident judge's consistent choices count (10 turns 0.52 into
    /// 0.69 and 0.55 into 0.88); the sign, and so the preferred side, never changes.
    #[serde(default = "unit")]
    sharpen: f64,
    /// Leave out comparisons whose label is within this distance of ½ (ties).
    #[serde(default)]
    min_margin: f64,
    /// Train (and measure held-out accuracy) only on comparisons whose every question named
    /// the same winner in both orders (`JudgementRecord::orders_agree`).
    #[serde(default)]
    agreeing_only: bool,
}
fn unit() -> f64 {
    1.0
}

/// Why a judgement is not a training comparison, under the `min_margin` and
/// `agreeing_only` settings. A pure function of the logged judgement, so replay and forks
/// decide the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unused {
    /// The two orders named different winners (`agreeing_only`).
    OrdersDisagree,
    /// The label is within `min_margin` of ½.
    Tie,
}

/// What the preference model is trained towards for one judgement: the judge's label with
/// its log-odds multiplied by `sharpen`, unless the comparison is left out.
///
/// ```
/// use cairn::stages::pm::{training_target, Unused};
/// assert_eq!(training_target(0.58, 1.0, 0.0, true, false), Ok(0.58));
/// let sharpened = training_target(0.55, 10.0, 0.0, true, false).unwrap();
/// assert!((sharpened - 0.881).abs() < 1e-3);
/// assert_eq!(training_target(0.51, 1.0, 0.02, true, false), Err(Unused::Tie));
/// assert_eq!(training_target(0.58, 1.0, 0.0, false, true), Err(Unused::OrdersDisagree));
/// ```
pub fn training_target(
    p_a: f64,
    sharpen: f64,
    min_margin: f64,
    orders_agree: bool,
    agreeing_only: bool,
) -> Result<f32, Unused> {
    if agreeing_only && !orders_agree {
        return Err(Unused::OrdersDisagree);
    }
    if (p_a - 0.5).abs() < min_margin {
        return Err(Unused::Tie);
    }
    if sharpen == 1.0 {
        return Ok(p_a as f32);
    }
    let p = p_a.clamp(1e-6, 1.0 - 1e-6);
    let logit = (p / (1.0 - p)).ln() * sharpen;
    Ok((1.0 / (1.0 + (-logit).exp())) as f32)
}

fn one() -> usize {
    1
}
fn constant() -> String {
    "constant".into()
}
fn pm_model() -> String {
    "pm".into()
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
fn held_out() -> f64 {
    0.1
}
fn yes() -> bool {
    true
}

/// The `pm` stage.
pub struct PmStage {
    name: String,
    settings: Settings,
    ctx: StageContext,
    digest: u128,
    trainer: EpochTrainer<PmExample>,
    /// Judgements seen and left out (by reason), for the end-of-training summary.
    seen: u64,
    disagreeing: u64,
    ties: u64,
}

/// Builds the stage: `model` (default `pm`; give it `score_head = true`), `batch_size`,
/// `micro_batch`, `lr`, `weight_decay`, `max_grad_norm`, `held_out`, `eval_every`,
/// `helpful`, `epochs`, `warmup_steps`, `lr_schedule`, `sharpen`, `min_margin` and
/// `agreeing_only`.
pub fn build(
    name: &str,
    settings: &StageSettings,
    ctx: &StageContext,
) -> Result<Box<dyn TrainingStage>, StageError> {
    let parsed: Settings = super::parse_settings(name, settings)?;
    ctx.tokenizer(name, &parsed.model)?;
    let bad = |m: &str| StageError::Config {
        stage: name.to_string(),
        message: m.to_string(),
    };
    if parsed.batch_size == 0 || parsed.micro_batch == 0 {
        return Err(bad("batch_size and micro_batch must be at least 1"));
    }
    if !(0.0..1.0).contains(&parsed.held_out) || parsed.lr.is_nan() || parsed.lr <= 0.0 {
        return Err(bad("held_out must be in [0, 1) and lr > 0"));
    }
    if parsed.epochs == 0 {
        return Err(bad("epochs must be at least 1"));
    }
    let sharpen_ok = parsed.sharpen.is_finite() && parsed.sharpen > 0.0;
    if !sharpen_ok || !(0.0..0.5).contains(&parsed.min_margin) {
        return Err(bad("sharpen must be above 0 and min_margin in [0, 0.5)"));
    }
    let schedule = super::schedule::Schedule {
        epochs: parsed.epochs,
        warmup_steps: parsed.warmup_steps,
        decay: super::schedule::parse_decay(name, &parsed.lr_schedule)?,
    };
    let digest = settings_digest(settings);
    Ok(Box::new(PmStage {
        name: name.to_string(),
        trainer: EpochTrainer::new(
            name,
            ctx.seed,
            digest,
            parsed.batch_size,
            parsed.held_out,
            schedule,
        ),
        seen: 0,
        disagreeing: 0,
        ties: 0,
        digest,
        settings: parsed,
        ctx: ctx.clone(),
    }))
}

impl PmStage {
    fn example(&mut self, rec: &Rec) -> Result<Option<PmExample>, StageError> {
        let Payload::Judgement(j) = &rec.payload else {
            return Ok(None);
        };
        self.seen += 1;
        let target = match training_target(
            j.p_a,
            self.settings.sharpen,
            self.settings.min_margin,
            j.orders_agree(),
            self.settings.agreeing_only,
        ) {
            Ok(t) => t,
            Err(Unused::OrdersDisagree) => {
                self.disagreeing += 1;
                return Ok(None);
            }
            Err(Unused::Tie) => {
                self.ties += 1;
                return Ok(None);
            }
        };
        let tok = self.ctx.tokenizer(&self.name, &self.settings.model)?;
        let seq = |response: &str| {
            pm_sequence(tok, &j.conversation.prompt, response)
                .map(|(mut c, r)| {
                    c.extend(r);
                    c
                })
                .map_err(|e| StageError::Record {
                    stage: self.name.clone(),
                    key: rec.key,
                    message: e.to_string(),
                })
        };
        Ok(Some(PmExample {
            a: seq(&j.response_a)?,
            b: seq(&j.response_b)?,
            p_a: target,
        }))
    }

    /// The held-out evaluation after step `step` (its key covers the steps up to it and the
    /// held-out set).
    fn eval_work(&self, tag: &str, step: u64) -> Option<TrainWork> {
        let held_out = self.trainer.held_out();
        if held_out.is_empty() {
            return None;
        }
        let mut key = Key::builder(&self.name)
            .str(tag)
            .u64(step)
            .u128(self.digest);
        let before = &self.trainer.step_keys()[..step as usize];
        for k in before.iter().chain(held_out.iter().map(|(k, _)| k)) {
            key = key.key(*k);
        }
        let name = self.name.clone();
        Some(TrainWork {
            key: key.finish(),
            parents: vec![],
            model: self.settings.model.clone(),
            job: TrainJob::Measure {
                job: Job::measure(PmEval {
                    examples: held_out.iter().map(|(_, e)| e.clone()).collect(),
                    micro_batch: self.settings.micro_batch,
                }),
                record: Box::new(move |out| {
                    let s: PmEvalStats = expect_report(&name, out)?;
                    tracing::info!(
                        stage = name,
                        step,
                        accuracy = format!("{:.3}", s.accuracy),
                        ece = format!("{:.3}", s.ece),
                        "preference model held-out"
                    );
                    Ok(Some(Payload::PmEval(PmEvalRecord {
                        step,
                        loss: s.loss,
                        accuracy: s.accuracy,
                        brier: s.brier,
                        ece: s.ece,
                        examples: s.examples as u64,
                    })))
                }),
            },
        })
    }

    fn step_work(&self, step: Step<PmExample>) -> TrainWork {
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
                job: Job::train(PmStep {
                    examples: batch.into_iter().map(|(_, e)| e).collect(),
                    micro_batch: s.micro_batch,
                    optim,
                }),
                record: Box::new(move |out| {
                    let st: PmStats = expect_report(&name, out)?;
                    tracing::info!(
                        stage = name,
                        step,
                        loss = format!("{:.4}", st.loss),
                        "pm step"
                    );
                    Ok(Some(Payload::PmStep(PmStepRecord {
                        step,
                        loss: st.loss,
                        accuracy: st.accuracy,
                        examples: n,
                        lr,
                        grad_norm: st.grad_norm,
                    })))
                }),
                restored: None,
            },
        }
    }

    /// The steps now ready, each followed by a held-out evaluation when one is due (every
    /// `eval_every` steps).
    fn drain_steps(&mut self, input_ended: bool) -> Vec<TrainWork> {
        let steps = self.trainer.steps(self.settings.lr, input_ended);
        let every = self.settings.eval_every;
        let mut work = Vec::new();
        for step in steps {
            let n = step.step;
            work.push(self.step_work(step));
            if every > 0
                && n.is_multiple_of(every)
                && let Some(w) = self.eval_work("eval", n)
            {
                work.push(w);
            }
        }
        work
    }
}

impl TrainingStage for PmStage {
    fn trained_model(&self) -> &str {
        &self.settings.model
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        match &rec.payload {
            Payload::Judgement(j) => {
                self.settings.helpful || j.conversation.purpose == PromptPurpose::RedTeam
            }
            _ => false,
        }
    }

    fn add_epoch(&mut self, recs: Vec<Rec>) -> Result<Vec<TrainWork>, StageError> {
        let mut seen: HashMap<Key, ()> = HashMap::new();
        for rec in &recs {
            if seen.insert(rec.key, ()).is_some() {
                continue;
            }
            if let Some(ex) = self.example(rec)? {
                self.trainer.add(rec.key, ex);
            }
        }
        Ok(self.drain_steps(false))
    }

    fn finish(&mut self) -> Result<Vec<TrainWork>, StageError> {
        tracing::info!(
            stage = self.name,
            judgements = self.seen,
            used = self.seen - self.disagreeing - self.ties,
            orders_disagree = self.disagreeing,
            ties = self.ties,
            held_out = self.trainer.held_out().len(),
            sharpen = self.settings.sharpen,
            "preference data"
        );
        let mut work = self.drain_steps(true);
        let step = self.trainer.steps_taken();
        let last_eval_done = self.settings.eval_every > 0
            && step > 0
            && step.is_multiple_of(self.settings.eval_every);
        if !last_eval_done && let Some(w) = self.eval_work("final-eval", step) {
            work.push(w);
        }
        if step > 0 {
            let mut key = Key::builder(&self.name).str("checkpoint").u128(self.digest);
            for k in self.trainer.step_keys() {
                key = key.key(*k);
            }
            work.push(TrainWork {
                key: key.finish(),
                parents: vec![],
                model: self.settings.model.clone(),
                job: TrainJob::Checkpoint { step },
            });
        }
        Ok(work)
    }
}
