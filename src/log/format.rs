//! The on-disk format of the event log: segment file names and headers, record frames,
//! and the scanner that walks a segment's frames and classifies how it ends.
//!
//! A segment is `<first offset, 20 digits>.seg`: a 32-byte header
//! (`magic | format version | reserved | first offset | header CRC32C | pad`) followed by
//! frames `len: u32 | payload CRC32C: u32 | header CRC32C: u32 | payload`. The header CRC
//! covers `len` and the payload CRC, so a corrupt length is caught before it is trusted.

use std::path::{Path, PathBuf};

/// CRC32C (Castagnoli) of `bytes`: the checksum of segment headers, frame headers,
/// payloads and index files.
///
/// ```
/// // The standard check value of CRC-32C.
/// assert_eq!(cairn::log::format::crc32c(b"123456789"), 0xe306_9283);
/// ```
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// Magic bytes opening every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CAIRNLOG";
/// Segment format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Size of a frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest payload a frame may carry (a corrupt length beyond this is rejected early).
pub const MAX_RECORD_BYTES: u32 = 256 << 20;
/// Extension of segment files.
pub const SEGMENT_EXT: &str = "seg";

/// File name of the segment whose first record has `first_offset`.
pub fn segment_file_name(first_offset: u64) -> String {
    format!("{first_offset:020}.{SEGMENT_EXT}")
}

/// Parses a segment file name back into its first offset.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The segments of a log directory, sorted by first offset.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            segments.push((first, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Encodes a segment header.
pub fn encode_segment_header(first_offset: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_offset.to_le_bytes());
    let crc = crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns the first offset it records.
pub fn decode_segment_header(h: &[u8]) -> Result<u64, String> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err(format!(
            "segment header is {} bytes, expected {SEGMENT_HEADER_LEN}",
            h.len()
        ));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err("not a cairn log segment (bad magic)".into());
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    // The padding is outside the checksum, so it must be zero to count as intact.
    if crc != crc32c(&h[0..24]) || h[28..32] != [0; 4] {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(format!(
            "segment format version {version} is not supported (this build reads 1..={FORMAT_VERSION})"
        ));
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[16..24]);
    Ok(u64::from_le_bytes(first))
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = payload.len() as u32;
    let payload_crc = crc32c(payload);
    let mut head = [0u8; FRAME_HEADER_LEN];
    head[0..4].copy_from_slice(&len.to_le_bytes());
    head[4..8].copy_from_slice(&payload_crc.to_le_bytes());
    let head_crc = crc32c(&head[0..8]);
    head[8..12].copy_from_slice(&head_crc.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
}

/// Frames bytes already in `buf[start..]` (written after [`FRAME_HEADER_LEN`] reserved bytes
/// at `start`): fills in the header. Saves copying payloads that were encoded in place.
pub fn seal_frame_in_place(buf: &mut [u8], start: usize) {
    let (head, payload) = buf[start..].split_at_mut(FRAME_HEADER_LEN);
    head[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4..8].copy_from_slice(&crc32c(payload).to_le_bytes());
    let head_crc = crc32c(&head[0..8]);
    head[8..12].copy_from_slice(&head_crc.to_le_bytes());
}

/// What the scanner found at one position of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete frame whose checksums match; `next` is the position after it.
    Record {
        /// The payload bytes.
        payload: &'a [u8],
        /// Position of the following frame.
        next: usize,
    },
    /// The bytes end cleanly here.
    End,
    /// The bytes end inside a frame, or only zero bytes follow: what an interrupted append
    /// leaves behind.
    Incomplete,
    /// The frame is complete but its header checksum fails: corruption.
    BadHeader(String),
    /// The header is sound, the payload complete, but its checksum fails; `next` is the
    /// position after the frame.
    BadPayload {
        /// Position of the following frame.
        next: usize,
    },
}

/// Reads the frame at `pos` of `bytes` (a segment's content, header included).
pub fn read_frame(bytes: &[u8], pos: usize) -> Frame<'_> {
    let rest = &bytes[pos.min(bytes.len())..];
    if rest.is_empty() {
        return Frame::End;
    }
    if rest.iter().all(|&b| b == 0) {
        // Preallocated or never-written space after a crash.
        return Frame::Incomplete;
    }
    if rest.len() < FRAME_HEADER_LEN {
        return Frame::Incomplete;
    }
    let head_crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
    if head_crc != crc32c(&rest[0..8]) {
        return Frame::BadHeader("frame header checksum mismatch".into());
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if len == 0 || len > MAX_RECORD_BYTES {
        return Frame::BadHeader(format!("frame length {len} out of range"));
    }
    let end = FRAME_HEADER_LEN + len as usize;
    if rest.len() < end {
        return Frame::Incomplete;
    }
    let payload = &rest[FRAME_HEADER_LEN..end];
    let payload_crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if payload_crc != crc32c(payload) {
        return Frame::BadPayload { next: pos + end };
    }
    Frame::Record {
        payload,
        next: pos + end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_segment_file_name("00000000000000000042.idx"), None);
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = encode_segment_header(7);
        assert_eq!(decode_segment_header(&h), Ok(7));
        let mut bad = h;
        bad[17] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
        assert!(decode_segment_header(&h[..10]).is_err());
    }

    #[test]
    fn frames_classify_their_endings() {
        let mut bytes = Vec::new();
        encode_frame(b"hello", &mut bytes);
        let full = bytes.len();
        assert!(
            matches!(read_frame(&bytes, 0), Frame::Record { payload: b"hello", next } if next == full)
        );
        assert_eq!(read_frame(&bytes, full), Frame::End);
        assert_eq!(read_frame(&bytes[..full - 1], 0), Frame::Incomplete);
        assert_eq!(read_frame(&bytes[..5], 0), Frame::Incomplete);
        let mut flipped = bytes.clone();
        flipped[full - 1] ^= 0x10;
        assert_eq!(read_frame(&flipped, 0), Frame::BadPayload { next: full });
        let mut flipped = bytes.clone();
        flipped[1] ^= 0x10;
        assert!(matches!(read_frame(&flipped, 0), Frame::BadHeader(_)));
        bytes.extend_from_slice(&[0; 40]);
        assert_eq!(read_frame(&bytes, full), Frame::Incomplete);
        let mut in_place = vec![0u8; FRAME_HEADER_LEN];
        in_place.extend_from_slice(b"hello");
        seal_frame_in_place(&mut in_place, 0);
        assert_eq!(in_place, bytes[..full]);
    }
}
