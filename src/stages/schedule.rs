//! The learning-rate schedule and epoch order shared by the training stages (`sft`, `pm`):
//! linear warmup, then constant, linear or cosine decay to zero over the run's steps, and
//! several passes over the data in a seeded order. Decay and extra epochs need the total
//! number of steps, so a stage that uses them collects its whole input and trains when the
//! input ends; the plain schedule (one epoch, constant rate) trains as epochs stream in.

use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::record::Key;

/// How the rate moves after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stays at the base rate.
    #[default]
    Constant,
    /// Falls linearly to zero at the last step.
    Linear,
    /// Follows half a cosine to zero at the last step.
    Cosine,
}

/// A training stage's schedule settings (`epochs`, `warmup_steps`, `lr_schedule`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Passes over the training data (≥ 1).
    pub epochs: usize,
    /// Steps of linear warmup from `lr / warmup_steps` to `lr`.
    pub warmup_steps: u64,
    /// What follows warmup.
    pub decay: Decay,
}

impl Schedule {
    /// Whether the stage must see its whole input before training (the total number of
    /// steps matters).
    pub fn needs_all_data(&self) -> bool {
        self.epochs > 1 || self.decay != Decay::Constant
    }

    /// The rate of step `step` (from 1) of `total` for base rate `lr`: `lr · step / warmup`
    /// during warmup, then the decay over the remaining steps, which reaches zero just after
    /// the last step (so no step is wasted at rate zero).
    ///
    /// ```
    /// use cairn::stages::schedule::{Decay, Schedule};
    /// let s = Schedule { epochs: 1, warmup_steps: 2, decay: Decay::Linear };
    /// assert_eq!(s.lr(1.0, 1, 10), 0.5);
    /// assert_eq!(s.lr(1.0, 2, 10), 1.0);
    /// assert_eq!(s.lr(1.0, 3, 10), 1.0);
    /// assert_eq!(s.lr(1.0, 10, 10), 0.125);
    /// ```
    pub fn lr(&self, lr: f64, step: u64, total: u64) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return lr * step as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps);
        if span == 0 {
            return lr;
        }
        // 0 at the first step after warmup, (span - 1) / span at the last.
        let t = (step.saturating_sub(self.warmup_steps + 1)) as f64 / span as f64;
        match self.decay {
            Decay::Constant => lr,
            Decay::Linear => lr * (1.0 - t),
            Decay::Cosine => lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

/// The examples of pass `epoch` (from 0): key order first, then a shuffle seeded by `seed`
/// and the epoch, so every pass is reproducible.
pub fn epoch_order<T: Clone>(items: &[(Key, T)], epoch: usize, seed: u64) -> Vec<(Key, T)> {
    let mut out = items.to_vec();
    out.sort_by_key(|(k, _)| *k);
    if epoch > 0 {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(
            Key::builder("epoch-order")
                .u64(seed)
                .u64(epoch as u64)
                .finish()
                .0 as u64,
        );
        out.shuffle(&mut rng);
    }
    out
}

/// Reads `lr_schedule` (`constant`, `linear`, `cosine`).
pub fn parse_decay(stage: &str, name: &str) -> Result<Decay, super::StageError> {
    match name {
        "constant" => Ok(Decay::Constant),
        "linear" => Ok(Decay::Linear),
        "cosine" => Ok(Decay::Cosine),
        other => Err(super::StageError::Config {
            stage: stage.to_string(),
            message: format!("`lr_schedule = \"{other}\"`: expected constant, linear or cosine"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_the_rate_and_ends_at_zero() {
        let s = Schedule {
            epochs: 2,
            warmup_steps: 0,
            decay: Decay::Cosine,
        };
        assert!(s.needs_all_data());
        assert_eq!(s.lr(2.0, 1, 11), 2.0);
        let rates: Vec<f64> = (1..=11).map(|step| s.lr(2.0, step, 11)).collect();
        assert!(rates.windows(2).all(|w| w[1] < w[0]), "{rates:?}");
        assert!(rates[10] > 0.0 && rates[10] < 0.1, "{rates:?}");
        let flat = Schedule {
            epochs: 1,
            warmup_steps: 0,
            decay: Decay::Constant,
        };
        assert!(!flat.needs_all_data());
        assert_eq!(flat.lr(2.0, 7, 11), 2.0);
    }

    #[test]
    fn later_epochs_shuffle_reproducibly() {
        let items: Vec<(Key, u32)> = (0..20).map(|i| (Key(i as u128 * 7919 % 101), i)).collect();
        let first = epoch_order(&items, 0, 3);
        assert!(first.windows(2).all(|w| w[0].0 <= w[1].0));
        let second = epoch_order(&items, 1, 3);
        assert_ne!(first, second);
        assert_eq!(second, epoch_order(&items, 1, 3));
        let mut sorted = second.clone();
        sorted.sort_by_key(|(k, _)| *k);
        assert_eq!(sorted, first);
    }
}
