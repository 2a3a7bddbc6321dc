//! Training on the model worker's thread: losses and optimiser steps. The worker calls
//! these for `Job::Train`; nothing here knows about timely or the log.
//!
//! - [`sft`]: supervised finetuning (next-token cross-entropy on target tokens only),
//!   AdamW with gradient accumulation and clipping.

pub mod sft;

pub use sft::{OptimConfig, SftExample, StepStats, Trainer};
