//! Stage operators: the generic timely operator that runs any [`Stage`] (stash inputs under
//! capabilities, skip keys already logged, batch model work to the worker, wake on replies,
//! log then emit), and the epoch-ordered operator of training stages (`sft`, `pm`, `ppo`).
//!
//! Two wiring features beyond a straight chain:
//! - a **gate** (`after = "STAGE"` in a stage's settings): the operator holds its inputs
//!   until STAGE has written its checkpoint (or the input has ended), e.g. RL sampling waits
//!   for the SL-CAI model;
//! - a **feedback loop**: a `ppo` stage's `ppo_update` records go back (one epoch later) to
//!   the `rollout` stage it consumes from, which plans epoch `e` only once every update of
//!   earlier epochs has arrived — rollouts → update → new policy version → rollouts.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use crossbeam_channel::{Receiver, TryRecvError};
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use super::EngineError;
use super::train_state::{self, DEFAULT_STATE_EVERY, TrainCursor};
use crate::log::LogWriter;
use crate::model::Tokenizer;
use crate::record::{CheckpointRecord, Key, NewEvent, Payload, RunId, TrainStateRecord};
use crate::spec::Spec;
use crate::stages::{
    Builder, Rec, Reply, Stage, StageContext, StageError, StageKind, Task, TrainJob, TrainWork,
    TrainingStage, Work,
};
use crate::worker::WorkerHandle;
use crate::worker::{Job, JobOutput, Reply as WorkerReply, Waker};

mod aggregates;
mod batching;
mod env;
mod model_op;
mod plan;
mod record_io;
mod side_input;
mod training_op;

use aggregates::*;
pub(super) use batching::{advance_tasks, chunks, model_job, split_reply};
pub use env::*;
use model_op::*;
pub(super) use plan::Built;
pub use plan::*;
use record_io::*;
use side_input::*;
use training_op::*;
