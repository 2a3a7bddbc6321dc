//! Training on the model worker's thread: losses and optimiser steps. The worker calls
//! these for its training jobs; nothing here knows about timely or the log.
//!
//! - [`adamw`]: the optimiser, with state that can be saved and restored exactly.
//! - [`sft`]: supervised finetuning (next-token cross-entropy on target tokens only),
//!   AdamW with gradient accumulation and clipping.
//! - [`pm`]: the preference model — a scalar head trained on soft labels (Bradley–Terry
//!   with probability targets), with held-out accuracy and calibration.
//! - [`state`]: a model's training state on disk, written atomically, restored exactly.
//! - [`ppo`]: PPO with a value head, GAE and a per-token KL penalty to a reference model.

pub mod adamw;
pub mod pm;
pub mod ppo;
pub mod sft;
pub mod state;

pub use pm::{PmEvalStats, PmExample, PmStats};
pub use ppo::{PpoConfig, PpoRollout, PpoStats};
pub use sft::{OptimConfig, SftExample, StepStats, Trainer};
