//! What every operator of a run shares: the environment (log writer, worker, run id),
//! per-operator counters, and the stop flag and gates between operators.

use super::*;

/// Counters of one operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorStats {
    /// Outputs computed in this run.
    pub computed: u64,
    /// Outputs found in the log and re-emitted.
    pub replayed: u64,
    /// Model jobs submitted.
    pub jobs: u64,
    /// Training jobs not run because a saved training state covers them.
    pub skipped: u64,
    /// Training jobs run again although their event was logged (after the last state).
    pub recomputed: u64,
    /// Of those, how many came out different from their logged event.
    pub diverged: u64,
}

/// What every operator shares with the engine loop (one timely worker thread).
#[derive(Clone, Default)]
pub struct Shared(pub(super) Rc<RefCell<SharedState>>);

#[derive(Default)]
pub(super) struct SharedState {
    pub(super) error: Option<EngineError>,
    pub(super) stats: BTreeMap<String, OperatorStats>,
    pub(super) checkpoints: Vec<String>,
    pub(super) aggregates: BTreeMap<(String, String), i64>,
}

impl Shared {
    pub(super) fn fail(&self, e: EngineError) {
        let mut s = self.0.borrow_mut();
        if s.error.is_none() {
            s.error = Some(e);
        }
    }

    pub(super) fn failed(&self) -> bool {
        self.0.borrow().error.is_some()
    }

    pub(super) fn count(&self, stage: &str, f: impl FnOnce(&mut OperatorStats)) {
        f(self
            .0
            .borrow_mut()
            .stats
            .entry(stage.to_string())
            .or_default());
    }

    /// Returns the first error an operator hit, if any.
    pub fn check(&self) -> Result<(), EngineError> {
        match self.0.borrow_mut().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Counters by stage.
    pub fn stats(&self) -> BTreeMap<String, OperatorStats> {
        self.0.borrow().stats.clone()
    }

    /// Checkpoints written or found.
    pub fn checkpoints(&self) -> Vec<String> {
        self.0.borrow().checkpoints.clone()
    }

    /// Record counts by (stage, label), as maintained by [`aggregates`].
    pub fn aggregates(&self) -> BTreeMap<(String, String), i64> {
        self.0.borrow().aggregates.clone()
    }
}

/// What operators need from the run.
#[derive(Clone)]
pub struct Env {
    /// The log.
    pub writer: LogWriter,
    /// The model worker.
    pub worker: WorkerHandle,
    /// Records already logged, by key.
    pub done: Arc<HashMap<Key, Rec>>,
    /// This run.
    pub run_id: RunId,
    /// Where checkpoints go.
    pub checkpoint_dir: PathBuf,
    /// Tokenizers by model (saved with checkpoints).
    pub tokenizers: Arc<HashMap<String, Tokenizer>>,
}
