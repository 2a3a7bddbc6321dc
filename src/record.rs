//! Event records: the envelope every logged event carries, the idempotency keys that name
//! what produced an event, and the typed payloads of each record kind.
//!
//! This layer knows nothing of files, timely or models: it is plain serde data. The log
//! stores a payload as `(kind name, bincode body)`, so a reader meeting a kind it does not
//! know keeps the bytes ([`Payload::Unknown`]) instead of failing — later versions add
//! kinds without breaking older readers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stable 128-bit idempotency key: a hash of everything that determines an event (stage,
/// input keys, round, seed, relevant configuration). Equal keys mean "the same work".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Key(pub u128);

impl Key {
    /// Starts a key derivation for `stage`; add every input that affects the result.
    ///
    /// ```
    /// use cairn::record::Key;
    /// let prompt = Key::builder("prompts").str("harmbench").u64(7).finish();
    /// let a = Key::builder("sample").key(prompt).u64(42).finish();
    /// let b = Key::builder("sample").key(prompt).u64(42).finish();
    /// assert_eq!(a, b);
    /// assert_ne!(a, Key::builder("sample").key(prompt).u64(43).finish());
    /// ```
    pub fn builder(stage: &str) -> KeyBuilder {
        KeyBuilder::new(stage)
    }

    /// Parses the 32-hex-digit form printed by [`Key`]'s `Display`.
    pub fn parse_hex(text: &str) -> Option<Key> {
        if text.len() != 32 {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(Key)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// Incremental derivation of a [`Key`]. Every field is length- or type-tagged, so distinct
/// sequences of inputs never hash the same bytes.
pub struct KeyBuilder {
    hasher: blake3::Hasher,
}

impl KeyBuilder {
    fn new(stage: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"cairn-key-v1");
        let mut builder = KeyBuilder { hasher };
        builder = builder.str(stage);
        builder
    }

    /// Adds a string input.
    pub fn str(mut self, value: &str) -> Self {
        self.hasher.update(b"s");
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value.as_bytes());
        self
    }

    /// Adds an integer input (round numbers, seeds, indices).
    pub fn u64(mut self, value: u64) -> Self {
        self.hasher.update(b"u");
        self.hasher.update(&value.to_le_bytes());
        self
    }

    /// Adds a 128-bit input (digests of configuration).
    pub fn u128(mut self, value: u128) -> Self {
        self.hasher.update(b"w");
        self.hasher.update(&value.to_le_bytes());
        self
    }

    /// Adds the key of an input record.
    pub fn key(mut self, value: Key) -> Self {
        self.hasher.update(b"k");
        self.hasher.update(&value.0.to_le_bytes());
        self
    }

    /// Adds raw bytes.
    pub fn bytes(mut self, value: &[u8]) -> Self {
        self.hasher.update(b"b");
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
        self
    }

    /// Finishes the derivation.
    pub fn finish(self) -> Key {
        let hash = self.hasher.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash.as_bytes()[..16]);
        Key(u128::from_le_bytes(first))
    }
}

/// Identifies one run (one event log); forks get a new run id and record their parent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct RunId(pub u128);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({self})")
    }
}

/// An event before the log has given it an offset: what a stage hands to the writer.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Idempotency key; the log never stores two events with the same key.
    pub key: Key,
    /// Run that produced the event.
    pub run_id: RunId,
    /// Stage name (`prompts`, `sample`, `critique`, …).
    pub stage: String,
    /// Keys of the records this one was derived from (lineage).
    pub parents: Vec<Key>,
    /// Logical time: the dataflow epoch the record belongs to.
    pub epoch: u64,
    /// Wall-clock time in nanoseconds since the Unix epoch (informational, not replayed).
    pub wall_ns: u64,
    /// The record itself.
    pub payload: Payload,
}

impl NewEvent {
    /// Builds an event stamped with the current wall-clock time.
    pub fn new(
        key: Key,
        run_id: RunId,
        stage: impl Into<String>,
        parents: Vec<Key>,
        epoch: u64,
        payload: Payload,
    ) -> Self {
        NewEvent {
            key,
            run_id,
            stage: stage.into(),
            parents,
            epoch,
            wall_ns: now_ns(),
            payload,
        }
    }

    /// The event as logged at `offset`.
    pub fn at_offset(self, offset: u64) -> Envelope {
        Envelope {
            offset,
            key: self.key,
            run_id: self.run_id,
            stage: self.stage,
            parents: self.parents,
            epoch: self.epoch,
            wall_ns: self.wall_ns,
            payload: self.payload,
        }
    }
}

/// A logged event: a [`NewEvent`] plus the offset the log assigned it.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// Position in the log (0, 1, 2, … without gaps).
    pub offset: u64,
    /// Idempotency key.
    pub key: Key,
    /// Run that produced the event.
    pub run_id: RunId,
    /// Stage name.
    pub stage: String,
    /// Lineage.
    pub parents: Vec<Key>,
    /// Dataflow epoch.
    pub epoch: u64,
    /// Wall-clock nanoseconds since the Unix epoch.
    pub wall_ns: u64,
    /// The record.
    pub payload: Payload,
}

/// Version of the envelope encoding written by this build.
pub const ENVELOPE_VERSION: u16 = 1;

/// The on-disk form of an envelope (bincode). Fixed-size fields come first so that a key
/// index can be built without decoding strings; `version` comes first of all so that later
/// versions can dispatch on it.
#[derive(Serialize, Deserialize)]
struct StoredEnvelope {
    version: u16,
    offset: u64,
    key: Key,
    run_id: RunId,
    epoch: u64,
    wall_ns: u64,
    stage: String,
    parents: Vec<Key>,
    kind: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

/// [`StoredEnvelope`]'s fields before the body, borrowed, for encoding without copies.
#[derive(Serialize)]
struct StoredEnvelopeHead<'a> {
    version: u16,
    offset: u64,
    key: Key,
    run_id: RunId,
    epoch: u64,
    wall_ns: u64,
    stage: &'a str,
    parents: &'a [Key],
    kind: &'a str,
}

/// Byte range of the key inside an encoded envelope (after `version: u16, offset: u64`).
pub const KEY_RANGE: std::ops::Range<usize> = 10..26;

/// Why an envelope could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The bytes are not a valid envelope.
    #[error("undecodable envelope: {0}")]
    Envelope(String),
    /// The envelope was written by a newer, incompatible version.
    #[error("envelope version {0} is newer than this build understands ({ENVELOPE_VERSION})")]
    Version(u16),
    /// A known kind's body does not decode.
    #[error("record of kind `{kind}` does not decode: {reason}")]
    Body {
        /// The record kind.
        kind: String,
        /// Decoder message.
        reason: String,
    },
}

impl Envelope {
    /// Encodes the envelope for the log.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded envelope to `out` (the log writer encodes straight into its
    /// write buffer).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let head = StoredEnvelopeHead {
            version: ENVELOPE_VERSION,
            offset: self.offset,
            key: self.key,
            run_id: self.run_id,
            epoch: self.epoch,
            wall_ns: self.wall_ns,
            stage: &self.stage,
            parents: &self.parents,
            kind: self.payload.kind(),
        };
        // Serialising plain data into a Vec cannot fail.
        let _ = bincode::serialize_into(&mut *out, &head);
        // The body, as bincode writes a byte string (u64 length, bytes), serialised in place:
        // the same bytes as `StoredEnvelope` without a temporary buffer.
        let len_at = out.len();
        out.extend_from_slice(&[0; 8]);
        self.payload.encode_body_into(out);
        let len = (out.len() - len_at - 8) as u64;
        out[len_at..len_at + 8].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes an envelope; an unknown payload kind becomes [`Payload::Unknown`].
    pub fn decode(bytes: &[u8]) -> Result<Envelope, RecordError> {
        if bytes.len() < 2 {
            return Err(RecordError::Envelope(
                "shorter than its version field".into(),
            ));
        }
        let version = u16::from_le_bytes([bytes[0], bytes[1]]);
        if version != ENVELOPE_VERSION {
            return Err(RecordError::Version(version));
        }
        use bincode::Options;
        let stored: StoredEnvelope = bincode_options()
            .deserialize(bytes)
            .map_err(|e| RecordError::Envelope(e.to_string()))?;
        let payload = Payload::decode(&stored.kind, stored.body)?;
        Ok(Envelope {
            offset: stored.offset,
            key: stored.key,
            run_id: stored.run_id,
            stage: stored.stage,
            parents: stored.parents,
            epoch: stored.epoch,
            wall_ns: stored.wall_ns,
            payload,
        })
    }

    /// Reads only the offset and key of an encoded envelope (fast path for key indexes).
    pub fn peek_offset_key(bytes: &[u8]) -> Option<(u64, Key)> {
        if bytes.len() < KEY_RANGE.end {
            return None;
        }
        let offset = u64::from_le_bytes(bytes[2..10].try_into().ok()?);
        let key = u128::from_le_bytes(bytes[KEY_RANGE].try_into().ok()?);
        Some((offset, Key(key)))
    }

    /// A JSON view for `cairn log cat` and exports.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "offset": self.offset,
            "key": self.key.to_string(),
            "run": self.run_id.to_string(),
            "stage": self.stage,
            "parents": self.parents.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "epoch": self.epoch,
            "wall_ns": self.wall_ns,
            "kind": self.payload.kind(),
            "payload": self.payload.to_json(),
        })
    }
}

/// bincode options matching `bincode::serialize` (fixed-width little-endian integers) but with
/// a size limit, so a corrupt length prefix cannot ask for gigabytes.
fn bincode_options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(1 << 30)
}

fn decode_body<T: serde::de::DeserializeOwned>(kind: &str, body: &[u8]) -> Result<T, RecordError> {
    use bincode::Options;
    bincode_options()
        .deserialize(body)
        .map_err(|e| RecordError::Body {
            kind: kind.to_string(),
            reason: e.to_string(),
        })
}

/// Current wall-clock time in nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

macro_rules! payloads {
    ($( $(#[$doc:meta])* $variant:ident($ty:ty) = $kind:literal, )*) => {
        /// The record carried by an event. Each variant is one record kind, stored under its
        /// kind name; kinds unknown to this build are kept as raw bytes.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Payload {
            $( $(#[$doc])* $variant($ty), )*
            /// A kind this build does not know (written by a newer version).
            Unknown {
                /// The kind name as stored.
                kind: String,
                /// The undecoded body.
                body: Vec<u8>,
            },
        }

        impl Payload {
            /// Every record kind this build knows.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            /// The kind name stored in the log.
            pub fn kind(&self) -> &str {
                match self {
                    $( Payload::$variant(_) => $kind, )*
                    Payload::Unknown { kind, .. } => kind,
                }
            }

            /// Appends the bincode of the record body to `out`.
            pub fn encode_body_into(&self, out: &mut Vec<u8>) {
                match self {
                    $( Payload::$variant(v) => { let _ = bincode::serialize_into(&mut *out, v); } )*
                    Payload::Unknown { body, .. } => out.extend_from_slice(body),
                }
            }

            /// Decodes a body stored under `kind`.
            pub fn decode(kind: &str, body: Vec<u8>) -> Result<Payload, RecordError> {
                match kind {
                    $( $kind => Ok(Payload::$variant(decode_body(kind, &body)?)), )*
                    _ => {
                        warn_unknown_kind(kind);
                        Ok(Payload::Unknown { kind: kind.to_string(), body })
                    }
                }
            }

            /// A JSON view of the record.
            pub fn to_json(&self) -> serde_json::Value {
                match self {
                    $( Payload::$variant(v) => serde_json::to_value(v).unwrap_or(serde_json::Value::Null), )*
                    Payload::Unknown { body, .. } => serde_json::json!({ "unknown_kind": true, "bytes": body.len() }),
                }
            }
        }
    };
}

/// Warns once per process for each unknown kind, so a long replay does not flood the output.
fn warn_unknown_kind(kind: &str) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen
        .get_or_insert_with(HashSet::new)
        .insert(kind.to_string())
    {
        tracing::warn!(
            kind,
            "skipping records of a kind this version of cairn does not know"
        );
    }
}

payloads! {
    /// A run (or a resumed run) started: the settings that determine its results.
    RunStarted(RunStarted) = "run_started",
    /// Free text written by tools and tests.
    Note(Note) = "note",
    /// A prompt read from a prompt source.
    Prompt(PromptRecord) = "prompt",
    /// A model's answer to a prompt.
    Sample(SampleRecord) = "sample",
    /// A critique of the latest answer against one principle.
    Critique(CritiqueRecord) = "critique",
    /// A revised answer following a critique.
    Revision(RevisionRecord) = "revision",
    /// One supervised finetuning step.
    SftStep(SftStepRecord) = "sft_step",
    /// A held-out loss measurement.
    SftEval(SftEvalRecord) = "sft_eval",
    /// A model checkpoint written to disk.
    Checkpoint(CheckpointRecord) = "checkpoint",
    /// A training stage's full state (weights, optimiser moments, step counts) on disk, from
    /// which a resumed run continues instead of training again.
    TrainState(TrainStateRecord) = "train_state",
    /// A record flagged by a screening stage (see `examples/custom_stage.rs`).
    Flag(FlagRecord) = "flag",
    /// A record of a kind defined outside this crate (see [`ExtensionRecord`]).
    Extension(ExtensionRecord) = "extension",
    /// Two answers to one prompt, for AI feedback.
    Pair(PairRecord) = "pair",
    /// The feedback model's soft preference label for a pair.
    Judgement(JudgementRecord) = "judgement",
    /// One preference-model optimiser step.
    PmStep(PmStepRecord) = "pm_step",
    /// Held-out accuracy and calibration of the preference model.
    PmEval(PmEvalRecord) = "pm_eval",
    /// A policy sample scored by the preference model and the reference model.
    Rollout(RolloutRecord) = "rollout",
    /// One PPO update: a new policy version.
    PpoUpdate(PpoUpdateRecord) = "ppo_update",
    /// Where a run's spec came from (so a fork can resolve its relative paths).
    RunSource(RunSourceRecord) = "run_source",
    /// The outcome of a pairwise evaluation of two models (before per-purpose intervals).
    EvalResult(EvalResultRecord) = "eval_result",
    /// A candidate training target checked for quality: kept, or dropped with a reason.
    Target(TargetRecord) = "target",
    /// The feedback model's yes/no assessment of each answer of a pair (e.g. evasiveness).
    Assessment(AssessmentRecord) = "assessment",
    /// The outcome of a pairwise evaluation: per purpose, with intervals, ties, evasion
    /// and degeneracy.
    EvalReport(EvalReportRecord) = "eval_report",
}

/// The `target` record: an answer (a revision of some round, or a helpful sample) checked
/// before SFT may learn from it; the decision is an event so replay and fork see it too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// The answer to learn.
    pub response: String,
    /// What it came from: `revision` or `sample`.
    pub origin: String,
    /// Revision round (0 for samples).
    pub round: u32,
    /// Whether SFT may learn from it.
    pub kept: bool,
    /// Why it was dropped (empty when kept).
    pub reason: String,
    /// Share of its 4-word phrases that repeat (see `quality::repetition`).
    pub repetition: f64,
    /// The feedback model's probability that it gives harmful help, when it was asked.
    pub p_harmful: Option<f64>,
}

/// The `assessment` record: one yes/no question about each answer of a pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssessmentRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// Id of the question asked (e.g. `evasive`).
    pub question: String,
    /// The pair's first and second answers.
    pub responses: [String; 2],
    /// Probability of "yes" for each answer (normalised over yes/no).
    pub p_yes: [f64; 2],
}

/// Wins, ties and losses of model A on one set of comparisons, with the win rate (ties
/// count half) and its 95% Wilson interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WinTally {
    /// Comparisons.
    pub comparisons: u64,
    /// A judged better.
    pub wins: u64,
    /// Neither judged better (P(A better) within the tie margin of 0.5).
    pub ties: u64,
    /// B judged better.
    pub losses: u64,
    /// (wins + ties / 2) / comparisons.
    pub win_rate: f64,
    /// 95% Wilson interval of the win rate.
    pub ci95: [f64; 2],
    /// Mean soft label P(A better).
    pub mean_p_a: f64,
}

/// Answer-quality shares of one model on one set of prompts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnswerShares {
    /// Answers counted.
    pub answers: u64,
    /// Repetitive or meta-commentary.
    pub degenerate: f64,
    /// Mostly repeated phrases.
    pub repetitive: f64,
    /// Talks about the previous response or the critique.
    pub meta: f64,
    /// Refuses (phrase list).
    pub refusal: f64,
    /// Refuses without engaging (phrase list and length).
    pub bare_refusal: f64,
    /// Judged evasive by the feedback model (P(yes) > 0.5); `None` when not asked.
    pub evasive_judged: Option<f64>,
}

/// One prompt purpose of an evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PurposeReport {
    /// `red_team` or `helpful`.
    pub purpose: String,
    /// A against B.
    pub tally: WinTally,
    /// Model A's answers.
    pub a: AnswerShares,
    /// Model B's answers.
    pub b: AnswerShares,
}

/// The `eval_report` record: model A against model B on held-out prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReportRecord {
    /// Model A (path).
    pub model_a: String,
    /// Model B (path).
    pub model_b: String,
    /// The judge (path): never A or B.
    pub judge: String,
    /// Every comparison.
    pub overall: WinTally,
    /// Elo of A and B from the overall win rate (B anchored at 1000).
    pub elo: [f64; 2],
    /// Per purpose.
    pub by_purpose: Vec<PurposeReport>,
    /// Prompts left out because their text is in a training log.
    pub excluded_prompts: u64,
}

/// The conversation a record belongs to: the prompt it answers, carried along so that every
/// stage (and every export) can read a record on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// Red-team or helpful.
    pub purpose: PromptPurpose,
    /// The user's request.
    pub prompt: String,
}

/// The `sample` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// The answer.
    pub response: String,
    /// Its token ids.
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities under the sampling model.
    pub logprob: f32,
    /// The generator seed.
    pub seed: u64,
    /// Whether generation ended on an end-of-turn token (else it hit the length limit).
    pub stopped: bool,
}

/// The `critique` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CritiqueRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// Revision round, from 1.
    pub round: u32,
    /// Id of the principle drawn for this round.
    pub principle: String,
    /// The answer being critiqued.
    pub response: String,
    /// The critique.
    pub critique: String,
    /// The generator seed.
    pub seed: u64,
}

/// The `revision` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// Revision round, from 1.
    pub round: u32,
    /// Id of the principle of this round.
    pub principle: String,
    /// The revised answer.
    pub response: String,
    /// The generator seed.
    pub seed: u64,
}

/// The `sft_step` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftStepRecord {
    /// Step number, from 1.
    pub step: u64,
    /// Mean loss per target token.
    pub loss: f64,
    /// Target tokens.
    pub tokens: u64,
    /// Examples in the step.
    pub examples: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// The `sft_eval` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftEvalRecord {
    /// Steps taken when measured.
    pub step: u64,
    /// Mean held-out loss per target token.
    pub loss: f64,
    /// Held-out target tokens.
    pub tokens: u64,
}

/// The `checkpoint` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Model name in the run.
    pub model: String,
    /// Steps included.
    pub step: u64,
    /// Directory holding the checkpoint.
    pub path: String,
    /// sha256 of `model.safetensors`.
    pub sha256: String,
}

/// The `train_state` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainStateRecord {
    /// Model name in the run.
    pub model: String,
    /// Training jobs of the stage that the state includes (its optimiser steps and weight
    /// copies, in the order the stage ran them).
    pub step: u64,
    /// Directory holding the state.
    pub path: String,
    /// Each file of the directory and its sha256, in a fixed order.
    pub files: Vec<(String, String)>,
}

/// The `flag` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlagRecord {
    /// Key of the flagged record.
    pub flagged: Key,
    /// Why it was flagged.
    pub reason: String,
}

/// The `extension` record: a record of a kind defined outside this crate, by a stage written
/// against the published crate (`examples/custom_stage.rs`). It carries its own kind name and
/// its fields as JSON text, so such a stage logs, replays and exports records of its own
/// without a new variant in [`Payload`].
///
/// ```
/// use cairn::record::ExtensionRecord;
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct Hit { word: String, count: u32 }
/// let rec = ExtensionRecord::new("hit", &Hit { word: "bleach".into(), count: 2 }).unwrap();
/// assert_eq!(rec.kind, "hit");
/// let back: Hit = rec.decode().unwrap();
/// assert_eq!(back, Hit { word: "bleach".into(), count: 2 });
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExtensionRecord {
    /// The extension's own kind name.
    pub kind: String,
    /// The record's fields, as JSON text (JSON rather than bincode so that `cairn log cat`,
    /// `export` and the report can show it without knowing its type).
    pub json: String,
}

impl ExtensionRecord {
    /// Wraps `value` as a record of the extension kind `kind`.
    pub fn new<T: Serialize>(kind: &str, value: &T) -> Result<ExtensionRecord, RecordError> {
        let json = serde_json::to_string(value).map_err(|e| RecordError::Body {
            kind: kind.to_string(),
            reason: e.to_string(),
        })?;
        Ok(ExtensionRecord {
            kind: kind.to_string(),
            json,
        })
    }

    /// Reads the record's fields back as `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, RecordError> {
        serde_json::from_str(&self.json).map_err(|e| RecordError::Body {
            kind: self.kind.clone(),
            reason: e.to_string(),
        })
    }
}

/// The `pair` record: two answers to one prompt from the same model, with distinct seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// The first answer (shown as (A) in the first order).
    pub response_a: String,
    /// The second answer.
    pub response_b: String,
    /// Token ids of the first answer.
    pub tokens_a: Vec<u32>,
    /// Token ids of the second answer.
    pub tokens_b: Vec<u32>,
    /// Generator seeds of the two answers.
    pub seeds: [u64; 2],
}

/// One multiple-choice question put to the feedback model: one principle, one order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    /// Comparison principle id.
    pub principle: String,
    /// Whether the pair was shown swapped (the record's `response_b` as option (A)).
    pub swapped: bool,
    /// Log-probability of answering `(A)`.
    pub logprob_a: f32,
    /// Log-probability of answering `(B)`.
    pub logprob_b: f32,
    /// Probability that the record's `response_a` is better, from this question alone
    /// (after the chain-of-thought clamp, when it applies).
    pub p_first: f64,
    /// The feedback model's reasoning (chain-of-thought mode).
    pub reasoning: Option<String>,
}

/// The `judgement` record: a soft preference label from AI feedback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgementRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// The first answer.
    pub response_a: String,
    /// The second answer.
    pub response_b: String,
    /// Principles drawn for this comparison (the ensemble).
    pub principles: Vec<String>,
    /// Whether the feedback model reasoned first (labels clamped).
    pub cot: bool,
    /// Every question asked: each principle in both orders.
    pub votes: Vec<Vote>,
    /// The soft label: probability that `response_a` is preferred.
    pub p_a: f64,
    /// Seed of the principle draw (and of the reasoning samples).
    pub seed: u64,
}

impl JudgementRecord {
    /// Whether every question named the same winner, whichever answer was shown first. A
    /// comparison where the two orders disagree was decided by the option's position, not by
    /// the answers (a small judge's common failure), so its label says little. Exactly ½
    /// counts as no winner.
    ///
    /// ```
    /// use cairn::record::{Conversation, JudgementRecord, PromptPurpose, Vote};
    /// let vote = |swapped, p_first| Vote {
    ///     principle: "less-harmful".into(), swapped, logprob_a: 0.0, logprob_b: 0.0,
    ///     p_first, reasoning: None,
    /// };
    /// let mut j = JudgementRecord {
    ///     conversation: Conversation { prompt: "hi".into(), purpose: PromptPurpose::Helpful },
    ///     response_a: "a".into(), response_b: "b".into(), principles: vec![], cot: false,
    ///     votes: vec![vote(false, 0.7), vote(true, 0.6)], p_a: 0.65, seed: 0,
    /// };
    /// assert!(j.orders_agree());
    /// j.votes[1].p_first = 0.4; // shown swapped, (A) won again: position, not content
    /// assert!(!j.orders_agree());
    /// ```
    pub fn orders_agree(&self) -> bool {
        let side = |p: f64| (p > 0.5) as i8 - (p < 0.5) as i8;
        match self.votes.first() {
            None => false,
            Some(v) => {
                let first = side(v.p_first);
                first != 0 && self.votes.iter().all(|v| side(v.p_first) == first)
            }
        }
    }
}

/// The `pm_step` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PmStepRecord {
    /// Step number, from 1.
    pub step: u64,
    /// Mean soft-target cross-entropy.
    pub loss: f64,
    /// Share of comparisons whose preferred side the model ranks higher.
    pub accuracy: f64,
    /// Comparisons in the step.
    pub examples: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// The `pm_eval` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PmEvalRecord {
    /// Steps taken when measured.
    pub step: u64,
    /// Mean soft-target cross-entropy on held-out comparisons.
    pub loss: f64,
    /// Share of held-out comparisons ranked the way their label leans.
    pub accuracy: f64,
    /// Mean squared error between predicted and labelled probabilities.
    pub brier: f64,
    /// Expected calibration error (10 equal-width bins of the predicted probability).
    pub ece: f64,
    /// Held-out comparisons.
    pub examples: u64,
}

/// The `rollout` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The prompt.
    pub conversation: Conversation,
    /// The policy version that sampled it (PPO updates before it).
    pub policy_version: u64,
    /// The answer.
    pub response: String,
    /// Its token ids.
    pub tokens: Vec<u32>,
    /// The prompt's token ids as the policy saw them.
    pub context: Vec<u32>,
    /// The preference model's score of the answer.
    pub score: f32,
    /// Per-token log-probabilities under the reference model.
    pub ref_logprobs: Vec<f32>,
    /// The generator seed.
    pub seed: u64,
}

/// The `ppo_update` record: what one PPO update did; its `version` names the new policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoUpdateRecord {
    /// Policy version after this update (from 1).
    pub version: u64,
    /// Rollouts used.
    pub rollouts: u64,
    /// Mean preference-model score of the rollouts.
    pub mean_score: f64,
    /// Mean total reward (score minus the KL penalty).
    pub mean_reward: f64,
    /// Mean per-sequence KL(policy ‖ reference), summed over tokens.
    pub kl: f64,
    /// Mean per-token entropy of the policy.
    pub entropy: f64,
    /// Mean response length in tokens.
    pub response_length: f64,
    /// Share of token ratios clipped.
    pub clip_fraction: f64,
    /// Mean value loss.
    pub value_loss: f64,
    /// Mean clipped policy loss.
    pub policy_loss: f64,
    /// Share of repeated token 3-grams in the responses (a boilerplate signal).
    pub repetition: f64,
    /// Set when reward keeps rising while length, repetition or KL blow up.
    pub over_optimisation: Option<String>,
}

/// The `run_started` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStarted {
    /// cairn version that wrote the run.
    pub cairn_version: String,
    /// Master seed from which every random draw of the run derives.
    pub seed: u64,
    /// Digest of every setting that changes results (spec, constitution, model files).
    pub settings_digest: u128,
    /// The settings as text (the dataflow spec as given), for audit and fork.
    pub settings: String,
    /// Run this one was forked from, if any.
    pub parent_run: Option<RunId>,
}

/// The `eval_result` record: model A against model B, judged by the feedback model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResultRecord {
    /// Model A (path).
    pub model_a: String,
    /// Model B (path).
    pub model_b: String,
    /// Comparisons judged.
    pub comparisons: u64,
    /// Share of comparisons A won (a tie counts half).
    pub win_rate_a: f64,
    /// 95% Wilson interval of that share.
    pub ci95: [f64; 2],
    /// Mean soft label P(A better).
    pub mean_p_a: f64,
    /// Elo of A and B (B anchored at 1000).
    pub elo: [f64; 2],
    /// Share of A's and B's answers that refuse.
    pub refusal_share: [f64; 2],
    /// Per prompt purpose: (purpose, comparisons, win rate of A).
    pub by_purpose: Vec<(String, u64, f64)>,
}

/// The `run_source` record, written after each `run_started`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSourceRecord {
    /// Absolute path of the spec file the run was started from.
    pub spec_path: String,
}

/// The `note` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Note {
    /// The text.
    pub text: String,
}

/// The `prompt` record: one prompt from a source file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// Source name (file stem or configured name).
    pub source: String,
    /// Position in the source (0-based line or item number).
    pub index: u64,
    /// Whether the prompt is red-team (harmful) or helpful.
    pub purpose: PromptPurpose,
    /// The user's request.
    pub text: String,
}

/// What a prompt is for in CAI: red-team prompts get critiques and revisions; helpful prompts
/// are sampled to keep the finetuned model helpful.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptPurpose {
    /// A harmful or borderline request.
    RedTeam,
    /// A benign request.
    Helpful,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            offset: 9,
            key: Key::builder("prompts").u64(3).finish(),
            run_id: RunId(77),
            stage: "prompts".into(),
            parents: vec![Key(1), Key(2)],
            epoch: 4,
            wall_ns: 123,
            payload: Payload::Prompt(PromptRecord {
                source: "harmbench".into(),
                index: 3,
                purpose: PromptPurpose::RedTeam,
                text: "hello".into(),
            }),
        }
    }

    #[test]
    fn envelope_round_trips_and_peeks_its_key() {
        let env = sample();
        let bytes = env.encode();
        assert_eq!(Envelope::decode(&bytes).expect("decodes"), env);
        assert_eq!(Envelope::peek_offset_key(&bytes), Some((9, env.key)));
    }

    #[test]
    fn unknown_kind_is_kept_not_fatal() {
        let mut env = sample();
        env.payload = Payload::Unknown {
            kind: "from_the_future".into(),
            body: vec![1, 2, 3],
        };
        let decoded = Envelope::decode(&env.encode()).expect("decodes");
        assert_eq!(decoded.payload.kind(), "from_the_future");
        assert_eq!(decoded, env);
    }

    #[test]
    fn newer_envelope_version_is_an_error() {
        let mut bytes = sample().encode();
        bytes[0] = 99;
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(RecordError::Version(99))
        ));
    }

    #[test]
    fn corrupt_lengths_do_not_allocate_wildly() {
        let mut bytes = sample().encode();
        // The stage string's length prefix follows the fixed fields (2+8+16+16+8+8 bytes).
        bytes[58..66].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Envelope::decode(&bytes).is_err());
    }

    #[test]
    fn key_hex_round_trips() {
        let k = Key::builder("x").finish();
        assert_eq!(Key::parse_hex(&k.to_string()), Some(k));
        assert_eq!(Key::parse_hex("zz"), None);
    }
}
