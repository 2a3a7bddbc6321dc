//! Training on the model worker's thread: losses and optimiser steps. The worker calls
//! these for its training jobs; nothing here knows about timely or the log.
//!
//! - [`algorithm`]: the open set of training algorithms — the [`Algorithm`] and
//!   [`Measurement`] traits the model worker runs, and the typed [`Report`] they answer.
//!   `SftStep`, `PmStep` and `PpoStep` (with `SftEval`, `PmEval`) implement them.
//! - [`adamw`]: the optimiser, with state that can be saved and restored exactly.
//! - [`sft`]: supervised finetuning (next-token cross-entropy on target tokens only),
//!   AdamW with gradient accumulation and clipping.
//! - [`pm`]: the preference model — a scalar head trained on soft labels (Bradley–Terry
//!   with probability targets), with held-out accuracy and calibration.
//! - [`state`]: a model's training state on disk, written atomically, restored exactly.
//! - [`ppo`]: PPO with a value head, GAE and a per-token KL penalty to a reference model.

pub mod adamw;
pub mod algorithm;
pub mod pm;
pub mod ppo;
pub mod sft;
pub mod state;

pub use algorithm::{Algorithm, Measurement, Report};
pub use pm::{PmEval, PmEvalStats, PmExample, PmStats, PmStep};
pub use ppo::{PpoConfig, PpoRollout, PpoStats, PpoStep};
pub use sft::{OptimConfig, SftEval, SftEvalStats, SftExample, SftStep, StepStats, Trainer};
