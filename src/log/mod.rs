//! The durable event log: an append-only, segmented file log of typed events — the source
//! of truth of every cairn run. Stages append; replay, resume, fork and reports read.
//!
//! - [`format`](mod@format): segment and frame layout (magic, version, CRC32C).
//! - [`scan`]: walking a segment and classifying how it ends (clean, torn tail, corrupt).
//! - [`index`]: sparse offset → file position index per segment.
//! - [`writer`]: [`LogWriter`], group commit under a [`SyncPolicy`], tail recovery on open,
//!   and "was this key already logged?" for exactly-once resume.
//! - [`reader`]: [`LogReader`], reading from any offset, by stage, or following a live writer.
//! - [`check`]: `verify`, `repair` and `stats` behind `cairn log`.
//!
//! ```
//! use cairn::log::{LogOptions, LogReader, LogWriter};
//! use cairn::record::{Key, NewEvent, Note, Payload, RunId};
//!
//! let dir = tempfile::tempdir()?;
//! let writer = LogWriter::open(dir.path(), LogOptions::default())?;
//! let event = NewEvent::new(Key::builder("note").u64(1).finish(), RunId(1), "note", vec![], 0,
//!     Payload::Note(Note { text: "hello".into() }));
//! writer.append(event)?;
//! writer.sync()?;
//! let events: Vec<_> = LogReader::open(dir.path())?.iter_from(0).collect::<Result<_, _>>()?;
//! assert_eq!(events.len(), 1);
//! assert_eq!(events[0].stage, "note");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod check;
pub mod format;
pub mod index;
pub mod reader;
pub mod scan;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

pub use check::{LogStats, RepairReport, VerifyReport, repair, stats, verify};
pub use reader::{Follower, LogReader, partitions};
pub use scan::READ_WINDOW;
pub use writer::{Appended, LogWriter, RecoveryReport, TornTail};

/// When appended events are made durable with `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every append returns only once its events are on disk (concurrent appenders share
    /// one sync: group commit).
    Always,
    /// A background thread syncs at this interval; `sync()` still forces one.
    Interval(Duration),
    /// Only an explicit [`LogWriter::sync`] (or closing the writer) syncs.
    Explicit,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;

    /// Parses `always`, `explicit` or `<N>ms`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "explicit" => Ok(SyncPolicy::Explicit),
            other => other
                .strip_suffix("ms")
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|&n| n > 0)
                .map(|n| SyncPolicy::Interval(Duration::from_millis(n)))
                .ok_or_else(|| {
                    format!("sync policy `{other}`: expected `always`, `explicit` or e.g. `20ms`")
                }),
        }
    }
}

/// Tuning of a log writer.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Durability policy.
    pub sync: SyncPolicy,
    /// A new segment starts once the current one reaches this size.
    pub segment_bytes: u64,
    /// One sparse-index entry every this many records.
    pub index_every: u32,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            sync: SyncPolicy::Interval(Duration::from_millis(20)),
            segment_bytes: 64 << 20,
            index_every: 256,
        }
    }
}

/// Errors of the event log. Every variant names the file and, where it applies, the byte
/// position and record offset involved.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record or header failed its checksum or a structural check.
    #[error("{segment}: corrupt at byte {pos} (record offset {offset}): {reason}")]
    Corrupt {
        /// Segment file.
        segment: PathBuf,
        /// Byte position in the segment.
        pos: u64,
        /// Offset the record there should have had.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A segment's header is unreadable or of an unsupported version.
    #[error("{segment}: bad segment header: {reason}")]
    BadHeader {
        /// Segment file.
        segment: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Segments do not follow on from each other.
    #[error("{segment}: expected the segment to start at offset {expected}, it starts at {found}")]
    Gap {
        /// Segment file.
        segment: PathBuf,
        /// The offset following the previous segment.
        expected: u64,
        /// What the segment says.
        found: u64,
    },
    /// The directory is not a log.
    #[error("{path}: not a cairn event log: {reason}")]
    NotALog {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An event is larger than a frame may carry.
    #[error("event of {bytes} bytes exceeds the {max}-byte record limit")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
        /// Limit.
        max: u32,
    },
    /// The writer stopped accepting appends after an earlier I/O failure.
    #[error("log writer failed earlier and accepts no more appends: {0}")]
    Failed(String),
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        LogError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// fsyncs a directory so that a file created in it survives a crash.
pub(crate) fn sync_dir(dir: &std::path::Path) -> Result<(), LogError> {
    let f = std::fs::File::open(dir).map_err(|e| LogError::io(dir, "open directory", e))?;
    f.sync_all()
        .map_err(|e| LogError::io(dir, "fsync directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_policies_parse() {
        assert_eq!("always".parse(), Ok(SyncPolicy::Always));
        assert_eq!("explicit".parse(), Ok(SyncPolicy::Explicit));
        assert_eq!(
            "15ms".parse(),
            Ok(SyncPolicy::Interval(Duration::from_millis(15)))
        );
        assert!("0ms".parse::<SyncPolicy>().is_err());
        assert!("sometimes".parse::<SyncPolicy>().is_err());
    }
}
