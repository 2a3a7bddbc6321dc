//! Training algorithms as an open set. A training job carries a value that implements
//! [`Algorithm`] (one optimiser step) or [`Measurement`] (a read-only evaluation, such as a
//! held-out loss); the model worker runs every one of them the same way — find or create the
//! model's optimiser for the algorithm, call it, send back its [`Report`] — without knowing
//! which algorithm it is. Adding an algorithm is a file in `train/` with its step and the
//! report type its stage reads back; the worker does not change.
//!
//! ```
//! use cairn::train::{Report, StepStats};
//! let report = Report::new(StepStats { loss: 0.5, tokens: 12, grad_norm: 1.0, step: 3 });
//! assert_eq!(report.get::<StepStats>().map(|s| s.step), Some(3));
//! // Asking for another algorithm's report type is an answer, not a panic.
//! assert!(report.get::<u32>().is_none());
//! ```

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use super::sft::{OptimConfig, Trainer};
use crate::model::ModelError;
use crate::model::llama::Llama;

/// One optimiser step of some training algorithm, with everything it needs.
pub trait Algorithm: Send + Sync + fmt::Debug {
    /// The job's kind, for messages ("sft step").
    fn kind_name(&self) -> &'static str;
    /// The optimiser slot the algorithm keeps per model ("sft", "pm", "ppo"). Each slot has
    /// its own moments and step count, and is saved under this name in a training state.
    fn optimiser(&self) -> &'static str;
    /// The optimiser's settings for this step (they create the optimiser on first use).
    fn optim(&self) -> OptimConfig;
    /// How many sequences (examples, comparisons, rollouts) the step reads.
    fn sequences(&self) -> usize;
    /// Adds what the model needs to take the step (PPO: a value head). Called before every
    /// step, so it must do nothing once the model has it. Nothing by default.
    fn prepare(&self, _model: &mut Llama) {}
    /// Runs the step: gradients, clipping, the optimiser update, the trainer's step count.
    fn step(&self, model: &Llama, trainer: &mut Trainer) -> Result<Report, ModelError>;
    /// What the step reports when no model computes (the engine-overhead stand-in).
    fn stand_in(&self) -> Report;
}

/// A read-only evaluation of a model (held-out loss, preference accuracy).
pub trait Measurement: Send + Sync + fmt::Debug {
    /// The job's kind, for messages ("pm eval").
    fn kind_name(&self) -> &'static str;
    /// How many sequences it reads.
    fn sequences(&self) -> usize;
    /// Measures `model` without changing it.
    fn measure(&self, model: &Llama) -> Result<Report, ModelError>;
    /// What it reports when no model computes (the engine-overhead stand-in).
    fn stand_in(&self) -> Report;
}

/// What a training or measuring job found, typed by its algorithm: the stage that sent the
/// job reads it back as the type it expects ([`Report::get`], [`Report::take`]).
#[derive(Clone)]
pub struct Report(Arc<dyn ReportValue>);

/// A value a report can carry: comparable and printable, so replies stay testable.
trait ReportValue: Any + Send + Sync + fmt::Debug {
    fn as_any(&self) -> &dyn Any;
    fn same(&self, other: &dyn ReportValue) -> bool;
}

impl<T: Any + Send + Sync + fmt::Debug + PartialEq> ReportValue for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn same(&self, other: &dyn ReportValue) -> bool {
        other.as_any().downcast_ref::<T>() == Some(self)
    }
}

impl Report {
    /// Wraps an algorithm's statistics.
    pub fn new<T: Any + Send + Sync + fmt::Debug + PartialEq>(stats: T) -> Report {
        Report(Arc::new(stats))
    }

    /// The statistics, when they are a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref::<T>()
    }

    /// The statistics as a `T`, or the report back when they are something else.
    pub fn take<T: Any + Clone>(self) -> Result<T, Report> {
        match self.get::<T>() {
            Some(t) => Ok(t.clone()),
            None => Err(self),
        }
    }
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq for Report {
    fn eq(&self, other: &Report) -> bool {
        self.0.same(other.0.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{PmStats, StepStats};

    #[test]
    fn reports_compare_by_type_and_value() {
        let a = Report::new(StepStats {
            loss: 1.0,
            tokens: 4,
            grad_norm: 0.0,
            step: 1,
        });
        let same = Report::new(StepStats {
            loss: 1.0,
            tokens: 4,
            grad_norm: 0.0,
            step: 1,
        });
        let later = Report::new(StepStats {
            loss: 1.0,
            tokens: 4,
            grad_norm: 0.0,
            step: 2,
        });
        let other_kind = Report::new(PmStats {
            loss: 1.0,
            accuracy: 0.0,
            grad_norm: 0.0,
            step: 1,
        });
        assert_eq!(a, same);
        assert_ne!(a, later);
        assert_ne!(a, other_kind);
        assert!(format!("{a:?}").contains("StepStats"));
        let back = other_kind.take::<StepStats>();
        assert!(back.is_err(), "a PM report is not an SFT one");
    }
}
