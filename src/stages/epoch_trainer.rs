//! The skeleton the epoch-fed training stages (`sft`, `pm`, `ppo`) share: examples split into
//! training and held-out sets by their key, training examples carried across epochs until a
//! step is full, step keys derived from the step's inputs, the learning-rate schedule, and
//! — when the schedule needs the total number of steps — training deferred until the input
//! ends and then run over seeded epoch orders. A stage keeps what is its own: which records
//! become examples, the job of a step, and what it measures and logs.
//!
//! Every key comes from the stage name, the run seed, the settings digest and the inputs, so
//! a resumed run forms the same steps with the same keys and skips the ones already logged.

use super::schedule::{self, Schedule};
use crate::record::Key;

/// One optimiser step, ready for the stage to turn into a job.
#[derive(Clone, Debug, PartialEq)]
pub struct Step<E> {
    /// The step's event key.
    pub key: Key,
    /// Step number, from 1.
    pub step: u64,
    /// The learning rate of this step.
    pub lr: f64,
    /// The step's examples with their record keys, in training order.
    pub batch: Vec<(Key, E)>,
}

/// Held-out split, carry, step numbering and keys for one training stage.
#[derive(Clone, Debug)]
pub struct EpochTrainer<E> {
    name: String,
    seed: u64,
    digest: u128,
    batch_size: usize,
    /// Examples whose key modulo 1000 falls below this are held out.
    held_out_cut: u128,
    schedule: Schedule,
    step: u64,
    total_steps: u64,
    carry: Vec<(Key, E)>,
    held_out: Vec<(Key, E)>,
    step_keys: Vec<Key>,
}

impl<E: Clone> EpochTrainer<E> {
    /// A trainer for stage `name` (settings digest `digest`, run seed `seed`) that holds out
    /// the share `held_out` of examples, chosen by key, and steps `batch_size` at a time.
    pub fn new(
        name: &str,
        seed: u64,
        digest: u128,
        batch_size: usize,
        held_out: f64,
        schedule: Schedule,
    ) -> Self {
        EpochTrainer {
            name: name.to_string(),
            seed,
            digest,
            batch_size: batch_size.max(1),
            held_out_cut: (held_out * 1000.0) as u128,
            schedule,
            step: 0,
            total_steps: 0,
            carry: Vec::new(),
            held_out: Vec::new(),
            step_keys: Vec::new(),
        }
    }

    /// A trainer whose every epoch is one step, whatever its size, at a constant rate and
    /// with nothing held out: `ppo`, whose update takes all of an epoch's rollouts.
    pub fn one_step_per_epoch(name: &str, seed: u64, digest: u128) -> Self {
        let schedule = Schedule {
            epochs: 1,
            warmup_steps: 0,
            decay: schedule::Decay::Constant,
        };
        EpochTrainer::new(name, seed, digest, usize::MAX, 0.0, schedule)
    }

    /// Adds one example: held out when its key says so, else carried to the next step.
    /// The split depends on the key alone, so it is the same on every rerun and worker.
    pub fn add(&mut self, key: Key, example: E) {
        if key.0 % 1000 < self.held_out_cut {
            self.held_out.push((key, example));
        } else {
            self.carry.push((key, example));
        }
    }

    /// The steps now ready. While the input streams (`input_ended` false) that is every
    /// full batch, unless the schedule needs the total step count, which waits for the end.
    /// At the end: the deferred epochs in their seeded orders, or the last partial batch.
    pub fn steps(&mut self, base_lr: f64, input_ended: bool) -> Vec<Step<E>> {
        let mut steps = Vec::new();
        if self.schedule.needs_all_data() {
            if !input_ended || self.carry.is_empty() {
                return steps;
            }
            let pool = std::mem::take(&mut self.carry);
            self.total_steps =
                pool.len().div_ceil(self.batch_size) as u64 * self.schedule.epochs as u64;
            for epoch in 0..self.schedule.epochs {
                let order = schedule::epoch_order(&pool, epoch, self.seed);
                for batch in order.chunks(self.batch_size) {
                    steps.push(self.step(base_lr, batch.to_vec()));
                }
            }
            return steps;
        }
        while self.carry.len() >= self.batch_size || (input_ended && !self.carry.is_empty()) {
            let n = self.batch_size.min(self.carry.len());
            let batch: Vec<_> = self.carry.drain(..n).collect();
            steps.push(self.step(base_lr, batch));
        }
        steps
    }

    fn step(&mut self, base_lr: f64, batch: Vec<(Key, E)>) -> Step<E> {
        self.step += 1;
        let key = super::step_key(
            &self.name,
            self.step,
            self.seed,
            self.digest,
            batch.iter().map(|(k, _)| k),
        );
        self.step_keys.push(key);
        Step {
            key,
            step: self.step,
            lr: self.schedule.lr(base_lr, self.step, self.total_steps),
            batch,
        }
    }

    /// Steps formed so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The keys of the steps formed so far, in order (they make the keys of what is
    /// computed after them: evaluations, the checkpoint).
    pub fn step_keys(&self) -> &[Key] {
        &self.step_keys
    }

    /// The held-out examples so far.
    pub fn held_out(&self) -> &[(Key, E)] {
        &self.held_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::schedule::Decay;

    fn key(i: u128) -> Key {
        Key(i)
    }

    fn constant() -> Schedule {
        Schedule {
            epochs: 1,
            warmup_steps: 0,
            decay: Decay::Constant,
        }
    }

    #[test]
    fn streams_full_steps_and_carries_the_rest_to_the_end() {
        let mut t = EpochTrainer::new("s", 1, 2, 3, 0.0, constant());
        for i in 0..4 {
            t.add(key(i), i);
        }
        let first = t.steps(0.1, false);
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].batch.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!((first[0].step, first[0].lr), (1, 0.1));
        assert!(t.steps(0.1, false).is_empty(), "one example waits for more");
        let last = t.steps(0.1, true);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].batch, vec![(key(3), 3)]);
        assert_eq!(t.step_keys(), &[first[0].key, last[0].key]);
        assert_ne!(first[0].key, last[0].key);
    }

    #[test]
    fn held_out_examples_are_chosen_by_key_and_never_trained() {
        let mut t = EpochTrainer::new("s", 1, 2, 1, 0.25, constant());
        for i in [10u128, 1_260, 2_249, 3_250, 4_999] {
            t.add(key(i), i);
        }
        let held: Vec<u128> = t.held_out().iter().map(|(_, e)| *e).collect();
        assert_eq!(
            held,
            [10, 2_249],
            "keys whose last three digits are below 250"
        );
        let trained: Vec<u128> = t
            .steps(1.0, true)
            .into_iter()
            .flat_map(|s| s.batch.into_iter().map(|(_, e)| e))
            .collect();
        assert_eq!(trained, [1_260, 3_250, 4_999]);
    }

    #[test]
    fn a_decaying_schedule_waits_for_the_end_then_runs_every_epoch() {
        let schedule = Schedule {
            epochs: 2,
            warmup_steps: 0,
            decay: Decay::Linear,
        };
        let mut t = EpochTrainer::new("s", 7, 2, 2, 0.0, schedule);
        for i in 0..3 {
            t.add(key(i), i);
        }
        assert!(t.steps(1.0, false).is_empty());
        let steps = t.steps(1.0, true);
        // Two batches per epoch (2 + 1 examples), two epochs, rates falling to zero.
        assert_eq!(steps.len(), 4);
        let seen: Vec<usize> = steps.iter().map(|s| s.batch.len()).collect();
        assert_eq!(seen, [2, 1, 2, 1]);
        assert!(steps.windows(2).all(|w| w[0].lr > w[1].lr), "{steps:?}");
        assert_eq!(steps[3].step, 4);
        assert!(t.steps(1.0, true).is_empty(), "nothing is trained twice");
    }

    #[test]
    fn one_step_per_epoch_takes_each_epoch_whole_and_keys_it_like_any_step() {
        let mut t = EpochTrainer::one_step_per_epoch("ppo", 9, 3);
        for i in 0..5 {
            t.add(key(i), i);
        }
        let first = t.steps(0.5, true);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].batch.len(), 5, "nothing held out, nothing carried");
        assert_eq!((first[0].step, first[0].lr), (1, 0.5));
        let expected =
            crate::stages::step_key("ppo", 1, 9, 3, (0..5).map(key).collect::<Vec<_>>().iter());
        assert_eq!(first[0].key, expected);
        t.add(key(7), 7);
        let second = t.steps(0.5, true);
        assert_eq!((second.len(), second[0].step), (1, 2));
        assert_eq!(t.step_keys(), &[first[0].key, second[0].key]);
    }

    #[test]
    fn keys_depend_on_the_seed_and_the_settings() {
        let step_key = |seed, digest| {
            let mut t = EpochTrainer::new("s", seed, digest, 1, 0.0, constant());
            t.add(key(5), ());
            t.steps(1.0, true)[0].key
        };
        assert_eq!(step_key(1, 2), step_key(1, 2));
        assert_ne!(step_key(1, 2), step_key(3, 2));
        assert_ne!(step_key(1, 2), step_key(1, 4));
    }
}
