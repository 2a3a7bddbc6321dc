//! Whole-log checks behind `cairn log`: `verify` (read-only: every checksum, every envelope),
//! `repair` (truncate at the first bad record, only when asked, keeping what it cuts), and
//! `stats` (records and bytes per stage and kind, time range).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::format::{SEGMENT_HEADER_LEN, list_segments};
use super::index::SparseIndex;
use super::scan::{Ending, check_header, read_segment, scan_frames};
use super::{LogError, sync_dir};
use crate::record::Envelope;

/// Where a walk over the log stopped.
#[derive(Debug)]
enum Stop {
    Clean,
    Torn {
        segment: PathBuf,
        pos: u64,
        bytes: u64,
    },
    Bad {
        segment: PathBuf,
        pos: u64,
        error: LogError,
    },
}

struct Walk {
    segments: usize,
    records: u64,
    bytes: u64,
    next_offset: u64,
    stop: Stop,
    /// Segment files after the one the walk stopped in.
    later: Vec<PathBuf>,
}

/// Reads every segment, checking headers, continuity, checksums and (with `visit`) decoding.
fn walk(dir: &Path, mut visit: impl FnMut(&Envelope, usize)) -> Result<Walk, LogError> {
    if !dir.is_dir() {
        return Err(LogError::NotALog {
            path: dir.to_path_buf(),
            reason: "no such directory".into(),
        });
    }
    let segments = list_segments(dir).map_err(|e| LogError::io(dir, "list segments", e))?;
    if segments.is_empty() {
        return Err(LogError::NotALog {
            path: dir.to_path_buf(),
            reason: "no segment files (*.seg)".into(),
        });
    }
    let mut w = Walk {
        segments: segments.len(),
        records: 0,
        bytes: 0,
        next_offset: 0,
        stop: Stop::Clean,
        later: Vec::new(),
    };
    for (i, (_, path)) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        let bytes = read_segment(path)?;
        w.bytes += bytes.len() as u64;
        let bad = |pos, error| Stop::Bad {
            segment: path.clone(),
            pos,
            error,
        };
        match check_header(path, &bytes, w.next_offset, is_last) {
            Ok(Some(_)) => {}
            Ok(None) => {
                w.stop = Stop::Torn {
                    segment: path.clone(),
                    pos: 0,
                    bytes: bytes.len() as u64,
                };
                break;
            }
            Err(e) => {
                w.stop = bad(0, e);
                w.later = segments[i + 1..].iter().map(|(_, p)| p.clone()).collect();
                break;
            }
        }
        let mut decode_error = None;
        let scan = scan_frames(
            path,
            &bytes,
            SEGMENT_HEADER_LEN,
            w.next_offset,
            is_last,
            |offset, pos, payload| match Envelope::decode(payload) {
                Ok(env) => {
                    visit(&env, payload.len());
                    Ok(())
                }
                Err(e) => {
                    let error = LogError::Corrupt {
                        segment: path.clone(),
                        pos,
                        offset,
                        reason: e.to_string(),
                    };
                    decode_error = Some((pos, error));
                    // Stop the scan here; the record is reported below.
                    Err(LogError::Failed(String::new()))
                }
            },
        );
        let scan = match (scan, decode_error) {
            (_, Some((pos, error))) => {
                w.stop = bad(pos, error);
                w.later = segments[i + 1..].iter().map(|(_, p)| p.clone()).collect();
                break;
            }
            (Ok(scan), None) => scan,
            (Err(e), None) => return Err(e),
        };
        w.records += scan.next_offset - w.next_offset;
        w.next_offset = scan.next_offset;
        match scan.ending {
            Ending::Clean => {}
            Ending::Torn { pos, bytes } => {
                w.stop = Stop::Torn {
                    segment: path.clone(),
                    pos,
                    bytes,
                };
                break;
            }
            Ending::Corrupt(error) => {
                let pos = match &error {
                    LogError::Corrupt { pos, .. } => *pos,
                    _ => 0,
                };
                w.stop = bad(pos, error);
                w.later = segments[i + 1..].iter().map(|(_, p)| p.clone()).collect();
                break;
            }
        }
    }
    Ok(w)
}

/// What `verify` found.
#[derive(Debug)]
pub struct VerifyReport {
    /// Segment files.
    pub segments: usize,
    /// Good records before any problem.
    pub records: u64,
    /// Bytes on disk in segment files.
    pub bytes: u64,
    /// A torn final record (harmless: the next writer truncates it): segment, position, bytes.
    pub torn: Option<(PathBuf, u64, u64)>,
    /// The first corruption, if any.
    pub corruption: Option<LogError>,
}

impl VerifyReport {
    /// True when no corruption was found (a torn tail is not corruption).
    pub fn is_ok(&self) -> bool {
        self.corruption.is_none()
    }
}

/// Checks a whole log without changing it.
pub fn verify(dir: &Path) -> Result<VerifyReport, LogError> {
    let w = walk(dir, |_, _| {})?;
    let (torn, corruption) = match w.stop {
        Stop::Clean => (None, None),
        Stop::Torn {
            segment,
            pos,
            bytes,
        } => (Some((segment, pos, bytes)), None),
        Stop::Bad { error, .. } => (None, Some(error)),
    };
    Ok(VerifyReport {
        segments: w.segments,
        records: w.records,
        bytes: w.bytes,
        torn,
        corruption,
    })
}

/// What `repair` did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// Records kept.
    pub kept_records: u64,
    /// The segment cut and the position it was cut at, if anything was cut.
    pub cut_at: Option<(PathBuf, u64)>,
    /// Bytes removed in all.
    pub bytes_cut: u64,
    /// Whole segment files removed (after the cut).
    pub segments_removed: usize,
    /// Folder holding copies of everything removed.
    pub saved_to: Option<PathBuf>,
}

/// Truncates the log at its first bad (or torn) record, moving every byte after it into
/// `dir/recovered/repair-<time>/`. A clean log is left untouched.
pub fn repair(dir: &Path) -> Result<RepairReport, LogError> {
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| LogError::io(&lock_path, "open lock file", e))?;
    if lock.try_lock().is_err() {
        return Err(LogError::NotALog {
            path: dir.to_path_buf(),
            reason: "a writer holds this log (LOCK is taken); stop it before repairing".into(),
        });
    }
    let w = walk(dir, |_, _| {})?;
    let (segment, pos) = match &w.stop {
        Stop::Clean => {
            return Ok(RepairReport {
                kept_records: w.records,
                ..RepairReport::default()
            });
        }
        Stop::Torn { segment, pos, .. } | Stop::Bad { segment, pos, .. } => (segment.clone(), *pos),
    };
    let saved = dir
        .join("recovered")
        .join(format!("repair-{}", crate::record::now_ns()));
    std::fs::create_dir_all(&saved).map_err(|e| LogError::io(&saved, "create", e))?;
    let mut report = RepairReport {
        kept_records: w.records,
        cut_at: Some((segment.clone(), pos)),
        saved_to: Some(saved.clone()),
        ..RepairReport::default()
    };
    // Copy first, then cut: a crash in between leaves the log as it was.
    let bytes = read_segment(&segment)?;
    let cut = &bytes[(pos as usize).min(bytes.len())..];
    let name = |p: &Path| p.file_name().map(|n| n.to_owned()).unwrap_or_default();
    let copy = saved.join(format!("{}.from{pos}", name(&segment).to_string_lossy()));
    write_synced(&copy, cut)?;
    report.bytes_cut += cut.len() as u64;
    for later in &w.later {
        let data = read_segment(later)?;
        write_synced(&saved.join(name(later)), &data)?;
        report.bytes_cut += data.len() as u64;
    }
    sync_dir(&saved)?;
    for p in std::iter::once(&segment).chain(&w.later) {
        let _ = std::fs::remove_file(SparseIndex::path_for(p));
    }
    for later in &w.later {
        std::fs::remove_file(later).map_err(|e| LogError::io(later, "remove segment", e))?;
        report.segments_removed += 1;
    }
    if pos < SEGMENT_HEADER_LEN {
        std::fs::remove_file(&segment).map_err(|e| LogError::io(&segment, "remove segment", e))?;
        report.segments_removed += 1;
    } else {
        let f = OpenOptions::new()
            .write(true)
            .open(&segment)
            .map_err(|e| LogError::io(&segment, "open", e))?;
        f.set_len(pos)
            .and_then(|()| f.sync_all())
            .map_err(|e| LogError::io(&segment, "truncate", e))?;
    }
    sync_dir(dir)?;
    Ok(report)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    std::fs::write(path, bytes)
        .and_then(|()| File::open(path)?.sync_all())
        .map_err(|e| LogError::io(path, "write copy", e))
}

/// Per-stage figures.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StageStats {
    /// Records.
    pub records: u64,
    /// Encoded record bytes (without framing).
    pub bytes: u64,
    /// Earliest wall-clock time (ns since the Unix epoch).
    pub first_wall_ns: u64,
    /// Latest wall-clock time.
    pub last_wall_ns: u64,
}

/// What `stats` reports.
#[derive(Debug, Default, Serialize)]
pub struct LogStats {
    /// Segment files.
    pub segments: usize,
    /// Records.
    pub records: u64,
    /// Bytes on disk in segment files.
    pub bytes: u64,
    /// By stage.
    pub stages: BTreeMap<String, StageStats>,
    /// Records by kind.
    pub kinds: BTreeMap<String, u64>,
    /// Run ids seen.
    pub runs: BTreeSet<String>,
    /// Earliest and latest wall-clock time.
    pub time_range_ns: Option<(u64, u64)>,
    /// A torn tail, described, if present.
    pub torn_tail: Option<String>,
    /// Quality of the model answers each stage wrote (`quality::answers_of`).
    pub answers: BTreeMap<String, crate::quality::QualityCounts>,
    /// Training targets each filter stage kept and dropped.
    pub targets: BTreeMap<String, TargetCounts>,
    /// What each judge stage's AI-feedback labels look like.
    pub judgements: BTreeMap<String, JudgementCounts>,
}

/// The AI-feedback labels of one judge stage: how many, how decided, how consistent.
#[derive(Debug, Default, Serialize)]
pub struct JudgementCounts {
    /// Comparisons judged.
    pub comparisons: u64,
    /// Of those, how many had the same winner in both orders (`JudgementRecord::orders_agree`).
    pub orders_agree: u64,
    /// Sum of |label − ½| (divide by `comparisons` for the mean distance from a coin flip).
    pub margin_sum: f64,
}

impl JudgementCounts {
    /// One line: count, share agreeing in both orders, mean distance from ½.
    pub fn summary(&self) -> String {
        let n = self.comparisons.max(1) as f64;
        format!(
            "{} comparisons, {} ({:.0} %) with the same winner in both orders, mean |label - 1/2| {:.3}",
            self.comparisons,
            self.orders_agree,
            100.0 * self.orders_agree as f64 / n,
            self.margin_sum / n
        )
    }
}

/// Training targets of one filter stage.
#[derive(Debug, Default, Serialize)]
pub struct TargetCounts {
    /// Kept for training.
    pub kept: u64,
    /// Of those kept, how many were cut back to their last full sentence first.
    pub trimmed: u64,
    /// Dropped.
    pub dropped: u64,
    /// Dropped, by reason (the reason's words before any parenthesis).
    pub reasons: BTreeMap<String, u64>,
}

/// Summarises a log; corruption is an error.
pub fn stats(dir: &Path) -> Result<LogStats, LogError> {
    let mut s = LogStats::default();
    let w = walk(dir, |env, len| {
        let st = s.stages.entry(env.stage.clone()).or_default();
        if st.records == 0 || env.wall_ns < st.first_wall_ns {
            st.first_wall_ns = env.wall_ns;
        }
        st.last_wall_ns = st.last_wall_ns.max(env.wall_ns);
        st.records += 1;
        st.bytes += len as u64;
        *s.kinds.entry(env.payload.kind().to_string()).or_default() += 1;
        s.runs.insert(env.run_id.to_string());
        for answer in crate::quality::answers_of(&env.payload) {
            s.answers.entry(env.stage.clone()).or_default().add(answer);
        }
        if let crate::record::Payload::Judgement(j) = &env.payload {
            let c = s.judgements.entry(env.stage.clone()).or_default();
            c.comparisons += 1;
            c.orders_agree += u64::from(j.orders_agree());
            c.margin_sum += (j.p_a - 0.5).abs();
        }
        if let crate::record::Payload::Target(t) = &env.payload {
            let c = s.targets.entry(env.stage.clone()).or_default();
            if t.kept {
                c.kept += 1;
                if !t.reason.is_empty() {
                    c.trimmed += 1;
                }
            } else {
                c.dropped += 1;
                let reason = t.reason.split(" (").next().unwrap_or_default();
                *c.reasons.entry(reason.to_string()).or_default() += 1;
            }
        }
        s.time_range_ns = Some(match s.time_range_ns {
            None => (env.wall_ns, env.wall_ns),
            Some((a, b)) => (a.min(env.wall_ns), b.max(env.wall_ns)),
        });
    })?;
    match w.stop {
        Stop::Clean => {}
        Stop::Torn {
            segment,
            pos,
            bytes,
        } => {
            s.torn_tail = Some(format!(
                "{}: {bytes} torn bytes at {pos} (truncated when a writer next opens the log)",
                segment.display()
            ));
        }
        Stop::Bad { error, .. } => return Err(error),
    }
    s.segments = w.segments;
    s.records = w.records;
    s.bytes = w.bytes;
    Ok(s)
}
