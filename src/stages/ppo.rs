//! `ppo`: one PPO update of the policy per epoch of rollouts, closing the RL feedback loop.
//!
//! Each complete epoch's `rollout` records (sorted by key) become one update on the model
//! worker (`crate::train::ppo`); its `ppo_update` record names the new policy version and
//! goes downstream *and* back around the loop to the `rollout` stage, which then samples the
//! next epoch with the updated weights. At the end the policy is checkpointed.
//!
//! Each update logs mean score and reward, KL to the reference, entropy, response length,
//! clip fraction, value and policy loss, and the share of repeated 3-grams. When the score
//! has risen over the last `watch` updates while KL, length or repetition blew up, the record
//! carries an over-optimisation warning (and one is printed): the Goodhart signature.

use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::epoch_trainer::{EpochTrainer, Step};
use super::settings_digest;
use super::{
    Rec, StageContext, StageError, StageSettings, TrainJob, TrainWork, TrainingStage, expect_report,
};
use crate::record::{Key, Payload, PpoUpdateRecord};
use crate::train::ppo::repetition;
use crate::train::{PpoConfig, PpoRollout, PpoStats, PpoStep};
use crate::worker::Job;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "policy")]
    model: String,
    #[serde(default = "lr")]
    lr: f64,
    #[serde(default = "kl_coef")]
    kl_coef: f64,
    #[serde(default = "one")]
    gamma: f64,
    #[serde(default = "lam")]
    lam: f64,
    #[serde(default = "clip")]
    clip: f64,
    #[serde(default = "clip")]
    value_clip: f64,
    #[serde(default = "vf_coef")]
    vf_coef: f64,
    #[serde(default = "ppo_epochs")]
    ppo_epochs: usize,
    #[serde(default = "minibatch")]
    minibatch: usize,
    #[serde(default = "one")]
    max_grad_norm: f64,
    /// Updates looked back over by the over-optimisation warning.
    #[serde(default = "watch")]
    watch: usize,
    /// KL (nats per answer) above which rising scores are suspect.
    #[serde(default = "kl_limit")]
    kl_limit: f64,
    /// Growth of mean answer length over the first update that is suspect.
    #[serde(default = "length_growth")]
    length_growth: f64,
    /// Share of repeated 3-grams that is suspect.
    #[serde(default = "repetition_limit")]
    repetition_limit: f64,
}
fn policy() -> String {
    "policy".into()
}
fn lr() -> f64 {
    1e-6
}
fn kl_coef() -> f64 {
    0.05
}
fn one() -> f64 {
    1.0
}
fn lam() -> f64 {
    0.95
}
fn clip() -> f64 {
    0.2
}
fn vf_coef() -> f64 {
    0.1
}
fn ppo_epochs() -> usize {
    2
}
fn minibatch() -> usize {
    4
}
fn watch() -> usize {
    3
}
fn kl_limit() -> f64 {
    10.0
}
fn length_growth() -> f64 {
    1.5
}
fn repetition_limit() -> f64 {
    0.5
}

/// What earlier updates measured, for the over-optimisation warning.
#[derive(Clone, Debug)]
struct Seen {
    score: f64,
    kl: f64,
    length: f64,
    repetition: f64,
}

/// The `ppo` stage.
pub struct PpoStage {
    name: String,
    settings: Settings,
    ctx: StageContext,
    digest: u128,
    /// The whole of each epoch is one update: step numbers (policy versions) and keys.
    trainer: EpochTrainer<PpoRollout>,
    history: Arc<Mutex<Vec<Seen>>>,
}

/// Builds the stage: `model` (the policy, default `policy`), `lr`, `kl_coef`, `gamma`,
/// `lam`, `clip`, `value_clip`, `vf_coef`, `ppo_epochs`, `minibatch`, `max_grad_norm`, and
/// the warning's `watch`, `kl_limit`, `length_growth`, `repetition_limit`.
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
    if parsed.lr.is_nan() || parsed.lr <= 0.0 || parsed.kl_coef < 0.0 || parsed.clip <= 0.0 {
        return Err(bad("lr and clip must be above 0 and kl_coef at least 0"));
    }
    if parsed.ppo_epochs == 0 || parsed.minibatch == 0 {
        return Err(bad("ppo_epochs and minibatch must be at least 1"));
    }
    let digest = settings_digest(settings);
    Ok(Box::new(PpoStage {
        name: name.to_string(),
        digest,
        trainer: EpochTrainer::one_step_per_epoch(name, ctx.seed, digest),
        settings: parsed,
        ctx: ctx.clone(),
        history: Arc::new(Mutex::new(Vec::new())),
    }))
}

/// The warning, if the last `watch` updates show rising scores together with a blown-up KL,
/// length or repetition.
fn over_optimisation(history: &[Seen], s: &Settings) -> Option<String> {
    if s.watch < 2 || history.len() < s.watch {
        return None;
    }
    let recent = &history[history.len() - s.watch..];
    let rising = recent.windows(2).all(|w| w[1].score > w[0].score);
    if !rising {
        return None;
    }
    let last = recent.last()?;
    let first_length = history.first()?.length.max(1.0);
    let mut why = Vec::new();
    if last.kl > s.kl_limit {
        why.push(format!("KL {:.2} > {}", last.kl, s.kl_limit));
    }
    if last.length > first_length * s.length_growth {
        why.push(format!(
            "answer length {:.1} vs {:.1} at the first update",
            last.length, first_length
        ));
    }
    if last.repetition > s.repetition_limit {
        why.push(format!("repeated 3-grams {:.2}", last.repetition));
    }
    (!why.is_empty()).then(|| {
        format!(
            "score rose over the last {} updates while {}: likely over-optimising the preference model",
            s.watch,
            why.join(", ")
        )
    })
}

impl TrainingStage for PpoStage {
    fn trained_model(&self) -> &str {
        &self.settings.model
    }

    fn feeds_back(&self) -> Option<&'static str> {
        Some("ppo_update")
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        matches!(rec.payload, Payload::Rollout(_))
    }

    fn add_epoch(&mut self, recs: Vec<Rec>) -> Result<Vec<TrainWork>, StageError> {
        let rollouts: Vec<(Key, PpoRollout)> = recs
            .iter()
            .filter_map(|rec| match &rec.payload {
                Payload::Rollout(r) => Some((
                    rec.key,
                    PpoRollout {
                        context: r.context.clone(),
                        response: r.tokens.clone(),
                        ref_logprobs: r.ref_logprobs.clone(),
                        score: r.score,
                    },
                )),
                _ => None,
            })
            .collect();
        if rollouts.iter().all(|(_, r)| r.response.is_empty()) {
            return Ok(Vec::new());
        }
        for (key, rollout) in rollouts {
            self.trainer.add(key, rollout);
        }
        let Some(Step {
            key,
            step: version,
            batch,
            ..
        }) = self.trainer.steps(self.settings.lr, true).pop()
        else {
            return Ok(Vec::new());
        };
        let parents: Vec<Key> = batch.iter().map(|(k, _)| *k).collect();
        let rollouts: Vec<PpoRollout> = batch.into_iter().map(|(_, r)| r).collect();
        let reps: Vec<f64> = rollouts.iter().map(|r| repetition(&r.response)).collect();
        let s = &self.settings;
        let config = PpoConfig {
            lr: s.lr,
            kl_coef: s.kl_coef,
            gamma: s.gamma,
            lam: s.lam,
            clip: s.clip,
            value_clip: s.value_clip,
            vf_coef: s.vf_coef,
            epochs: s.ppo_epochs,
            minibatch: s.minibatch,
            max_grad_norm: s.max_grad_norm,
            seed: self.ctx.derive_seed(&self.name, key, version),
        };
        let repetition = reps.iter().sum::<f64>() / reps.len().max(1) as f64;
        let replayed = Arc::clone(&self.history);
        let (name, history, settings, n) = (
            self.name.clone(),
            Arc::clone(&self.history),
            s.clone(),
            rollouts.len() as u64,
        );
        Ok(vec![TrainWork {
            key,
            parents,
            model: s.model.clone(),
            job: TrainJob::Update {
                job: Job::train(PpoStep { rollouts, config }),
                record: Box::new(move |out| {
                    let st: PpoStats = expect_report(&name, out)?;
                    let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                    h.push(Seen {
                        score: st.mean_score,
                        kl: st.kl,
                        length: st.response_length,
                        repetition,
                    });
                    let warning = over_optimisation(&h, &settings);
                    if let Some(w) = &warning {
                        tracing::warn!(stage = name, version, "{w}");
                    }
                    tracing::info!(
                        stage = name,
                        version,
                        score = format!("{:.3}", st.mean_score),
                        kl = format!("{:.3}", st.kl),
                        "ppo update"
                    );
                    Ok(Some(Payload::PpoUpdate(PpoUpdateRecord {
                        version,
                        rollouts: n,
                        mean_score: st.mean_score,
                        mean_reward: st.mean_reward,
                        kl: st.kl,
                        entropy: st.entropy,
                        response_length: st.response_length,
                        clip_fraction: st.clip_fraction,
                        value_loss: st.value_loss,
                        policy_loss: st.policy_loss,
                        repetition,
                        over_optimisation: warning,
                    })))
                }),
                restored: Some(Box::new(move |logged| {
                    if let Payload::PpoUpdate(u) = logged {
                        let mut h = replayed.lock().unwrap_or_else(|p| p.into_inner());
                        h.push(Seen {
                            score: u.mean_score,
                            kl: u.kl,
                            length: u.response_length,
                            repetition: u.repetition,
                        });
                    }
                })),
            },
        }])
    }

    fn finish(&mut self) -> Result<Vec<TrainWork>, StageError> {
        let updates = self.trainer.steps_taken();
        if updates == 0 {
            return Ok(Vec::new());
        }
        let mut key = Key::builder(&self.name).str("checkpoint").u128(self.digest);
        for k in self.trainer.step_keys() {
            key = key.key(*k);
        }
        Ok(vec![TrainWork {
            key: key.finish(),
            parents: vec![],
            model: self.settings.model.clone(),
            job: TrainJob::Checkpoint { step: updates },
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        toml::from_str("").expect("defaults")
    }

    fn seen(score: f64, kl: f64, length: f64, repetition: f64) -> Seen {
        Seen {
            score,
            kl,
            length,
            repetition,
        }
    }

    #[test]
    fn warns_only_when_score_rises_and_something_blows_up() {
        let s = settings();
        let calm = vec![
            seen(0.1, 1.0, 20.0, 0.1),
            seen(0.2, 2.0, 21.0, 0.1),
            seen(0.3, 2.0, 22.0, 0.1),
        ];
        assert_eq!(over_optimisation(&calm, &s), None);
        let long = vec![
            seen(0.1, 1.0, 20.0, 0.1),
            seen(0.2, 2.0, 25.0, 0.1),
            seen(0.3, 2.0, 40.0, 0.1),
        ];
        assert!(over_optimisation(&long, &s).is_some_and(|w| w.contains("length")));
        let kl = vec![
            seen(0.1, 1.0, 20.0, 0.1),
            seen(0.2, 5.0, 20.0, 0.1),
            seen(0.3, 12.0, 20.0, 0.1),
        ];
        assert!(over_optimisation(&kl, &s).is_some_and(|w| w.contains("KL")));
        // KL blew up but the score fell: not the over-optimisation signature.
        let falling = vec![
            seen(0.3, 1.0, 20.0, 0.1),
            seen(0.2, 5.0, 20.0, 0.1),
            seen(0.1, 12.0, 20.0, 0.1),
        ];
        assert_eq!(over_optimisation(&falling, &s), None);
    }
}
