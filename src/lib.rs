//! cairn: an event-sourced streaming dataflow engine for Constitutional AI.
//!
//! Prompts flow through a timely dataflow of stages (sample, critique, revise, judge,
//! preference-model and policy updates); every intermediate record is an event in an
//! append-only log, so a run can be resumed, audited and replayed. See `ARCHITECTURE.md`
//! for the layers; this crate's modules follow them bottom-up:
//!
//! - [`record`]: event envelope, idempotency keys, payload kinds (plain serde data).
//! - [`log`]: the durable, segmented event log.
//! - [`dtype`]: the number format a model computes in (`f32`, `bf16`), as specs name it.
//! - [`constitution`]: principles, few-shot examples and prompt templates (`constitutions/*.toml`).
//! - [`model`]: the model runtime (GGUF/HF loading, decoder, sampling).
//! - [`train`]: losses and optimiser steps run by the model worker (SFT, PM, PPO).
//! - [`worker`]: the model worker thread that batches requests and runs training jobs.
//! - [`spec`]: parsing and checking `dataflows/*.toml`.
//! - [`stages`]: what each stage kind does with a record (one file per stage kind).
//! - [`engine`]: stages as timely operators, run against the event log.
//! - [`replay`]: a run's datasets, metrics and checkpoints rebuilt from its events alone.
//! - [`eval`]: model-against-model evaluation (win rates, confidence intervals, Elo, refusals).
//! - [`report`]: a static HTML report of a run.
//! - [`prompts`]: reading prompt sources (text, JSONL, JSON payload files).
//! - [`quality`]: model-free checks of an answer (repetition, meta-commentary, bare refusals).
//! - [`paths`]: the cache of fetched models and data (`$CAIRN_HOME`).
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod constitution;
pub mod dtype;
pub mod engine;
pub mod eval;
pub mod log;
pub mod model;
pub mod paths;
pub mod prompts;
pub mod quality;
pub mod record;
pub mod replay;
pub mod report;
pub mod spec;
pub mod stages;
pub mod train;
pub mod worker;

/// The version of this build, recorded in every run.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
