//! Walking the frames of one segment and deciding how it ends: cleanly, in a torn tail (an
//! append cut short by a crash, recoverable by truncation), or in corruption (a hard error).
//!
//! The rule: damage is "torn" only where a crash can cause it — in the last segment, in the
//! final frame (bytes missing, zero fill, or a payload whose checksum fails although it runs
//! exactly to the end of the file). Anything else is corruption and is never skipped.

use std::path::Path;

use super::LogError;
use super::format::{Frame, SEGMENT_HEADER_LEN, decode_segment_header, read_frame};
use crate::record::Envelope;

/// How a segment ends.
#[derive(Debug)]
pub enum Ending {
    /// After the last record, the file ends.
    Clean,
    /// The bytes from `pos` to the end of the file (`bytes` of them) are an interrupted append.
    Torn {
        /// Byte position where the torn data starts.
        pos: u64,
        /// How many bytes follow it.
        bytes: u64,
    },
    /// Corruption before the tail.
    Corrupt(LogError),
}

/// The result of scanning one segment.
#[derive(Debug)]
pub struct SegmentScan {
    /// Offset following the last good record.
    pub next_offset: u64,
    /// Byte position after the last good record.
    pub end_pos: u64,
    /// How the segment ends.
    pub ending: Ending,
}

/// Reads a whole segment file.
pub fn read_segment(path: &Path) -> Result<Vec<u8>, LogError> {
    std::fs::read(path).map_err(|e| LogError::io(path, "read segment", e))
}

/// Checks a segment's header against the offset its name (and the previous segment)
/// promises. A last segment shorter than a header is reported as torn at position 0.
pub fn check_header(
    path: &Path,
    bytes: &[u8],
    expected_first: u64,
    is_last: bool,
) -> Result<Option<u64>, LogError> {
    if bytes.len() < SEGMENT_HEADER_LEN as usize && is_last {
        // Created but its header never fully reached the disk.
        return Ok(None);
    }
    let first = decode_segment_header(bytes).map_err(|reason| LogError::BadHeader {
        segment: path.to_path_buf(),
        reason,
    })?;
    if first != expected_first {
        return Err(LogError::Gap {
            segment: path.to_path_buf(),
            expected: expected_first,
            found: first,
        });
    }
    Ok(Some(first))
}

/// Scans the frames of `bytes` from `start_pos`, expecting the record there to have offset
/// `start_offset`. `visit(offset, pos, payload)` is called for each good record; an error
/// it returns stops the scan. Header checks are the caller's (see [`check_header`]).
pub fn scan_frames(
    path: &Path,
    bytes: &[u8],
    start_pos: u64,
    start_offset: u64,
    is_last: bool,
    mut visit: impl FnMut(u64, u64, &[u8]) -> Result<(), LogError>,
) -> Result<SegmentScan, LogError> {
    let mut pos = start_pos as usize;
    let mut offset = start_offset;
    let corrupt = |pos: usize, offset: u64, reason: String| LogError::Corrupt {
        segment: path.to_path_buf(),
        pos: pos as u64,
        offset,
        reason,
    };
    let torn_or_corrupt = |pos: usize, offset: u64, why: &str| {
        if is_last {
            Ending::Torn {
                pos: pos as u64,
                bytes: (bytes.len() - pos) as u64,
            }
        } else {
            Ending::Corrupt(corrupt(
                pos,
                offset,
                format!("{why}, but a later segment exists"),
            ))
        }
    };
    let ending = loop {
        match read_frame(bytes, pos) {
            Frame::End => break Ending::Clean,
            Frame::Incomplete => break torn_or_corrupt(pos, offset, "incomplete final record"),
            Frame::BadPayload { next } if next == bytes.len() => {
                break torn_or_corrupt(pos, offset, "final record fails its checksum");
            }
            Frame::BadPayload { .. } => {
                break Ending::Corrupt(corrupt(pos, offset, "record checksum mismatch".into()));
            }
            Frame::BadHeader(reason) => break Ending::Corrupt(corrupt(pos, offset, reason)),
            Frame::Record { payload, next } => {
                match Envelope::peek_offset_key(payload) {
                    Some((found, _)) if found == offset => {}
                    Some((found, _)) => {
                        break Ending::Corrupt(corrupt(
                            pos,
                            offset,
                            format!("record claims offset {found}"),
                        ));
                    }
                    None => {
                        break Ending::Corrupt(corrupt(pos, offset, "record too short".into()));
                    }
                }
                visit(offset, pos as u64, payload)?;
                offset += 1;
                pos = next;
            }
        }
    };
    Ok(SegmentScan {
        next_offset: offset,
        end_pos: pos as u64,
        ending,
    })
}
