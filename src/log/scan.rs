//! Walking the frames of one segment and deciding how it ends: cleanly, in a torn tail (an
//! append cut short by a crash, recoverable by truncation), or in corruption (a hard error).
//!
//! The rule: damage is "torn" only where a crash can cause it — in the last segment, in the
//! final frame (bytes missing, zero fill, or a payload whose checksum fails although it runs
//! exactly to the end of the file). Anything else is corruption and is never skipped.

use std::path::{Path, PathBuf};

use super::LogError;
use super::format::{
    FRAME_HEADER_LEN, Frame, SEGMENT_HEADER_LEN, decode_segment_header, read_frame,
};
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
    visit: impl FnMut(u64, u64, &[u8]) -> Result<(), LogError>,
) -> Result<SegmentScan, LogError> {
    let mut whole = SliceWindows(bytes.get(start_pos as usize..).unwrap_or(&[]));
    let seg = ScanStart {
        path,
        file_len: bytes.len() as u64,
        start_pos,
        start_offset,
        is_last,
    };
    scan_windows(&seg, &mut whole, visit)
}

/// A segment already in memory: one window, nothing more to read.
struct SliceWindows<'a>(&'a [u8]);

impl Windows for SliceWindows<'_> {
    fn window(&self) -> &[u8] {
        self.0
    }

    fn refill(&mut self, keep_from: usize, _need: usize) -> std::io::Result<usize> {
        self.0 = &self.0[keep_from..];
        Ok(0)
    }
}

/// Bytes a streaming scan reads per `read` call: large enough that system calls are a
/// rounding error, small enough that a window stays in the CPU cache while its frames are
/// checked (a whole segment read at once would be faulted into fresh memory, then read
/// again from RAM).
pub const READ_WINDOW: usize = 1 << 20;

/// Reading state for [`scan_file`], reusable across segments: the window buffer (allocated
/// once, never zero-filled again) and how to read.
pub struct ScanBuffer {
    bytes: Vec<u8>,
    window: usize,
    read_ahead: bool,
    /// Read-ahead buffers kept for the next segment (allocating and faulting in fresh ones
    /// per segment costs about a tenth of reading it).
    pool: Vec<Vec<u8>>,
}

impl Default for ScanBuffer {
    fn default() -> ScanBuffer {
        ScanBuffer::with_window(READ_WINDOW, true)
    }
}

impl ScanBuffer {
    /// A buffer reading `window` bytes at a time; with `read_ahead`, segments longer than
    /// two windows are read by a helper thread while the caller checks frames. (Tests use
    /// tiny windows so that frames straddle window boundaries everywhere.)
    pub fn with_window(window: usize, read_ahead: bool) -> ScanBuffer {
        ScanBuffer {
            bytes: Vec::new(),
            window: window.max(1),
            read_ahead,
            pool: Vec::new(),
        }
    }
}

/// A source of consecutive windows of a segment file.
trait Windows {
    /// The bytes available now.
    fn window(&self) -> &[u8];
    /// Drops `window()[..keep_from]` and appends more of the file, until the window holds
    /// at least `need` bytes or the file ends. Returns how many bytes were added (0: the
    /// file has no more).
    fn refill(&mut self, keep_from: usize, need: usize) -> std::io::Result<usize>;
}

/// Windows read by the caller itself into one buffer; `F` and `B` are the file and the
/// [`ScanBuffer`], borrowed (a scan inside one call) or owned (a [`SegmentFrames`] cursor).
struct DirectWindows<F, B> {
    file: F,
    buf: B,
    filled: usize,
    /// Bytes of the file not read yet (up to the length seen when the scan started).
    left: u64,
}

impl<F, B> Windows for DirectWindows<F, B>
where
    F: std::borrow::BorrowMut<std::fs::File>,
    B: std::borrow::BorrowMut<ScanBuffer>,
{
    fn window(&self) -> &[u8] {
        &self.buf.borrow().bytes[..self.filled]
    }

    fn refill(&mut self, keep_from: usize, need: usize) -> std::io::Result<usize> {
        use std::io::Read;
        let buf = self.buf.borrow_mut();
        buf.bytes.copy_within(keep_from..self.filled, 0);
        self.filled -= keep_from;
        if need > buf.bytes.len() {
            let grown = need.next_multiple_of(buf.window);
            buf.bytes.resize(grown, 0);
        }
        let room = (buf.bytes.len() - self.filled).min(self.left as usize);
        let file = self.file.borrow_mut();
        let mut added = 0;
        while added < room {
            let at = self.filled + added;
            match file.read(&mut buf.bytes[at..self.filled + room]) {
                Ok(0) => break,
                Ok(n) => added += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.filled += added;
        self.left -= added as u64;
        Ok(added)
    }
}

impl<W: Windows + ?Sized> Windows for &mut W {
    fn window(&self) -> &[u8] {
        (**self).window()
    }

    fn refill(&mut self, keep_from: usize, need: usize) -> std::io::Result<usize> {
        (**self).refill(keep_from, need)
    }
}

/// Space kept free in front of each read-ahead buffer, so the unfinished frame at the end
/// of one window can be copied in front of the next and scanned in place.
const HEADROOM: usize = 64 << 10;

/// Windows filled by a helper thread (see [`read_ahead`]), scanned where they were read.
struct ReadAheadWindows {
    /// The buffer holding the window: `cur[lo..hi]`.
    cur: Vec<u8>,
    lo: usize,
    hi: usize,
    /// Whether `cur` came from the pool (and must go back to it).
    pooled: bool,
    full: crossbeam_channel::Receiver<std::io::Result<(Vec<u8>, usize)>>,
    free: crossbeam_channel::Sender<Vec<u8>>,
    /// Pool buffers the helper no longer takes (it has finished).
    spares: Vec<Vec<u8>>,
}

impl ReadAheadWindows {
    fn give_back(&mut self, buf: Vec<u8>) {
        if let Err(e) = self.free.send(buf) {
            self.spares.push(e.into_inner());
        }
    }
}

impl Windows for ReadAheadWindows {
    fn window(&self) -> &[u8] {
        &self.cur[self.lo..self.hi]
    }

    fn refill(&mut self, keep_from: usize, need: usize) -> std::io::Result<usize> {
        self.lo += keep_from;
        let mut added = 0;
        while self.hi - self.lo < need {
            let Ok(next) = self.full.recv() else {
                break; // the file is read to its end
            };
            let (mut next, n) = next?;
            let kept = self.hi - self.lo;
            let old = if kept <= HEADROOM {
                // The unfinished frame goes in front of the new data: one small copy.
                next[HEADROOM - kept..HEADROOM].copy_from_slice(&self.cur[self.lo..self.hi]);
                let old = std::mem::replace(&mut self.cur, next);
                (self.lo, self.hi) = (HEADROOM - kept, HEADROOM + n);
                old
            } else {
                // A frame larger than the headroom: join it with the new data elsewhere.
                let mut joined = Vec::with_capacity(kept + n);
                joined.extend_from_slice(&self.cur[self.lo..self.hi]);
                joined.extend_from_slice(&next[HEADROOM..HEADROOM + n]);
                self.give_back(next);
                let old = std::mem::replace(&mut self.cur, joined);
                (self.lo, self.hi) = (0, kept + n);
                old
            };
            if std::mem::replace(&mut self.pooled, kept <= HEADROOM) {
                self.give_back(old);
            }
            added += n;
        }
        Ok(added)
    }
}

/// The helper thread of a read-ahead scan: fills pool buffers (behind their headroom) with
/// consecutive windows of `file`, up to `left` bytes, and passes them on in order. Stops
/// when the file ends, on `stop`, or when the scanning side hangs up; returns the pool
/// buffers it still holds.
fn read_ahead(
    file: &mut std::fs::File,
    mut left: u64,
    window: usize,
    free: crossbeam_channel::Receiver<Vec<u8>>,
    full: crossbeam_channel::Sender<std::io::Result<(Vec<u8>, usize)>>,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<Vec<u8>> {
    use std::io::Read;
    let mut kept = Vec::new();
    while left > 0 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok(mut buf) = free.recv() else { break };
        let room = window.min(left as usize);
        let mut n = 0;
        let mut failed = None;
        while n < room {
            match file.read(&mut buf[HEADROOM + n..HEADROOM + room]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            kept.push(buf);
            let _ = full.send(Err(e));
            break;
        }
        if n == 0 {
            kept.push(buf);
            break;
        }
        if let Err(e) = full.send(Ok((buf, n))) {
            if let Ok((buf, _)) = e.into_inner() {
                kept.push(buf);
            }
            break;
        }
        left -= n as u64;
        if n < room {
            break; // the file shrank
        }
    }
    kept.extend(free.try_iter());
    kept
}

/// Like [`scan_frames`], but reads the segment file `file` (of `file_len` bytes) window by
/// window instead of needing it whole in memory, and classifies damage exactly as
/// [`scan_frames`] does on the whole file. With read-ahead (the default) a helper thread
/// reads the next windows while this one checks frames, so reading and checking overlap.
#[allow(clippy::too_many_arguments)]
pub fn scan_file(
    path: &Path,
    file: &mut std::fs::File,
    file_len: u64,
    start_pos: u64,
    start_offset: u64,
    is_last: bool,
    buf: &mut ScanBuffer,
    visit: impl FnMut(u64, u64, &[u8]) -> Result<(), LogError>,
) -> Result<SegmentScan, LogError> {
    use std::io::{Seek, SeekFrom};
    let io = |e: std::io::Error| LogError::io(path, "read segment", e);
    file.seek(SeekFrom::Start(start_pos)).map_err(io)?;
    let left = file_len.saturating_sub(start_pos);
    let seg = ScanStart {
        path,
        file_len,
        start_pos,
        start_offset,
        is_last,
    };
    let (window, read_ahead_on) = (buf.window, buf.read_ahead);
    if !read_ahead_on || left <= 2 * window as u64 {
        if buf.bytes.len() < window {
            buf.bytes.resize(window, 0);
        }
        let mut windows = DirectWindows {
            file,
            buf,
            filled: 0,
            left,
        };
        return scan_windows(&seg, &mut windows, visit);
    }
    let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(4);
    let (full_tx, full_rx) = crossbeam_channel::bounded(4);
    let mut pool = std::mem::take(&mut buf.pool);
    pool.retain(|b| b.len() == HEADROOM + window);
    pool.resize_with(3, || vec![0u8; HEADROOM + window]);
    for b in pool {
        let _ = free_tx.send(b);
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (result, pool) = std::thread::scope(|scope| {
        let stop = &stop;
        let helper = scope.spawn(move || read_ahead(file, left, window, free_rx, full_tx, stop));
        let mut windows = ReadAheadWindows {
            cur: Vec::new(),
            lo: 0,
            hi: 0,
            pooled: false,
            full: full_rx,
            free: free_tx,
            spares: Vec::new(),
        };
        let result = scan_windows(&seg, &mut windows, visit);
        // Stop the helper (it may be a window ahead, or stopped early by an error) and
        // gather every pool buffer back: from it, from the queue, and from here.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ReadAheadWindows {
            cur,
            pooled,
            full,
            free,
            mut spares,
            ..
        } = windows;
        drop(free);
        spares.extend(helper.join().unwrap_or_default());
        spares.extend(full.try_iter().filter_map(|r| r.ok().map(|(b, _)| b)));
        if pooled {
            spares.push(cur);
        }
        (result, spares)
    });
    buf.pool = pool;
    result
}

/// A segment scan's starting point: the segment, its length, and the first frame to read.
struct ScanStart<'a> {
    path: &'a Path,
    file_len: u64,
    start_pos: u64,
    start_offset: u64,
    is_last: bool,
}

/// The frame walk of [`scan_file`] and [`scan_frames`] over any source of windows.
fn scan_windows(
    seg: &ScanStart<'_>,
    windows: &mut dyn Windows,
    mut visit: impl FnMut(u64, u64, &[u8]) -> Result<(), LogError>,
) -> Result<SegmentScan, LogError> {
    let mut cursor = FrameCursor::new(seg, windows);
    loop {
        match cursor.step()? {
            Step::Record {
                offset,
                pos,
                payload,
            } => visit(offset, pos, payload)?,
            Step::End(scan) => return Ok(scan),
        }
    }
}

/// What [`FrameCursor::step`] found.
pub(crate) enum Step<'a> {
    /// A checked record.
    Record {
        offset: u64,
        pos: u64,
        payload: &'a [u8],
    },
    /// The segment's end, and how it ends.
    End(SegmentScan),
}

/// Walks the frames of a segment one at a time over a source of windows: the one place
/// where a segment's records are checked and its ending is classified.
struct FrameCursor<W> {
    windows: W,
    path: PathBuf,
    file_len: u64,
    is_last: bool,
    /// `window()[0]` sits at file position `base`; the walk is at `window()[at]`.
    base: u64,
    at: usize,
    offset: u64,
    ended: bool,
}

impl<W: Windows> FrameCursor<W> {
    fn new(seg: &ScanStart<'_>, windows: W) -> FrameCursor<W> {
        FrameCursor {
            windows,
            path: seg.path.to_path_buf(),
            file_len: seg.file_len,
            is_last: seg.is_last,
            base: seg.start_pos,
            at: 0,
            offset: seg.start_offset,
            ended: false,
        }
    }

    fn corrupt(&self, pos: u64, reason: String) -> Ending {
        Ending::Corrupt(LogError::Corrupt {
            segment: self.path.clone(),
            pos,
            offset: self.offset,
            reason,
        })
    }

    fn torn_or_corrupt(&self, pos: u64, why: &str) -> Ending {
        if self.is_last {
            Ending::Torn {
                pos,
                bytes: self.file_len - pos,
            }
        } else {
            self.corrupt(pos, format!("{why}, but a later segment exists"))
        }
    }

    fn end(&mut self, ending: Ending) -> Step<'_> {
        self.ended = true;
        Step::End(SegmentScan {
            next_offset: self.offset,
            end_pos: self.base + self.at as u64,
            ending,
        })
    }

    /// The next record, or the end (again on every later call).
    fn step(&mut self) -> Result<Step<'_>, LogError> {
        if self.ended {
            return Ok(self.end(Ending::Clean));
        }
        loop {
            let window = self.windows.window();
            let filled = window.len();
            let at_eof = self.base + filled as u64 >= self.file_len;
            let frame = read_frame(window, self.at);
            if !at_eof && matches!(frame, Frame::End | Frame::Incomplete) {
                // The window ends inside the file: keep the partial frame, read on.
                let need = frame_len_hint(&window[self.at..]).max(filled - self.at + 1);
                self.base += self.at as u64;
                let added = self
                    .windows
                    .refill(self.at, need)
                    .map_err(|e| LogError::io(&self.path, "read segment", e))?;
                self.at = 0;
                if added == 0 {
                    // The file shrank under us: what is there is its end.
                    self.file_len = self.base + self.windows.window().len() as u64;
                }
                continue;
            }
            let pos = self.base + self.at as u64;
            let (next, found) = match frame {
                Frame::Record { payload, next } => (next, Envelope::peek_offset_key(payload)),
                Frame::End => return Ok(self.end(Ending::Clean)),
                Frame::Incomplete => {
                    let ending = self.torn_or_corrupt(pos, "incomplete final record");
                    return Ok(self.end(ending));
                }
                Frame::BadPayload { next } if self.base + next as u64 == self.file_len => {
                    let ending = self.torn_or_corrupt(pos, "final record fails its checksum");
                    return Ok(self.end(ending));
                }
                Frame::BadPayload { .. } => {
                    let ending = self.corrupt(pos, "record checksum mismatch".into());
                    return Ok(self.end(ending));
                }
                Frame::BadHeader(reason) => {
                    let ending = self.corrupt(pos, reason);
                    return Ok(self.end(ending));
                }
            };
            match found {
                Some((found, _)) if found == self.offset => {}
                Some((found, _)) => {
                    let ending = self.corrupt(pos, format!("record claims offset {found}"));
                    return Ok(self.end(ending));
                }
                None => {
                    let ending = self.corrupt(pos, "record too short".into());
                    return Ok(self.end(ending));
                }
            }
            let (start, offset) = (self.at, self.offset);
            self.at = next;
            self.offset += 1;
            let payload = &self.windows.window()[start + FRAME_HEADER_LEN..next];
            return Ok(Step::Record {
                offset,
                pos,
                payload,
            });
        }
    }
}

/// An owned cursor over one segment's records, read window by window on the caller's
/// thread: what a pulling iterator (decoded replay) walks, one record at a time, so that no
/// more than a window of the segment is in memory.
pub(crate) struct SegmentFrames(FrameCursor<DirectWindows<std::fs::File, ScanBuffer>>);

impl SegmentFrames {
    /// A cursor at `start_pos` (the record with offset `start_offset`) of `file`.
    pub(crate) fn new(
        path: &Path,
        mut file: std::fs::File,
        file_len: u64,
        start_pos: u64,
        start_offset: u64,
        is_last: bool,
        mut buf: ScanBuffer,
    ) -> Result<SegmentFrames, LogError> {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(start_pos))
            .map_err(|e| LogError::io(path, "read segment", e))?;
        if buf.bytes.len() < buf.window {
            buf.bytes.resize(buf.window, 0);
        }
        let seg = ScanStart {
            path,
            file_len,
            start_pos,
            start_offset,
            is_last,
        };
        let windows = DirectWindows {
            file,
            buf,
            filled: 0,
            left: file_len.saturating_sub(start_pos),
        };
        Ok(SegmentFrames(FrameCursor::new(&seg, windows)))
    }

    /// The next record, or the segment's end.
    pub(crate) fn step(&mut self) -> Result<Step<'_>, LogError> {
        self.0.step()
    }

    /// The buffer back, for the next segment.
    pub(crate) fn into_buffer(self) -> ScanBuffer {
        self.0.windows.buf
    }
}

/// The length of the frame starting at `bytes[0]` when its header is complete and sound
/// (so a window can be grown to hold it), else 0.
fn frame_len_hint(bytes: &[u8]) -> usize {
    if bytes.len() < super::format::FRAME_HEADER_LEN {
        return 0;
    }
    let head_crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if head_crc != super::format::crc32c(&bytes[0..8]) || len > super::format::MAX_RECORD_BYTES {
        return 0;
    }
    super::format::FRAME_HEADER_LEN + len as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{encode_frame, encode_segment_header};
    use crate::record::{Key, NewEvent, Note, Payload, RunId};
    use proptest::prelude::*;

    /// A segment of `sizes.len()` note frames (offsets from 0) after a segment header.
    fn segment(sizes: &[usize]) -> Vec<u8> {
        let mut bytes = encode_segment_header(0).to_vec();
        for (i, &size) in sizes.iter().enumerate() {
            let event = NewEvent::new(
                Key::builder("t").u64(i as u64).finish(),
                RunId(1),
                "s",
                vec![],
                0,
                Payload::Note(Note {
                    text: "y".repeat(size),
                }),
            );
            let env = event.at_offset(i as u64);
            let mut payload = Vec::new();
            env.encode_into(&mut payload);
            encode_frame(&payload, &mut bytes);
        }
        bytes
    }

    type Seen = (Vec<(u64, u64, Vec<u8>)>, u64, u64, String);

    fn summarise(scan: Result<SegmentScan, LogError>, visits: Vec<(u64, u64, Vec<u8>)>) -> Seen {
        match scan {
            Ok(s) => {
                let ending = match s.ending {
                    Ending::Clean => "clean".to_string(),
                    Ending::Torn { pos, bytes } => format!("torn {pos} {bytes}"),
                    Ending::Corrupt(e) => format!("corrupt {e}"),
                };
                (visits, s.next_offset, s.end_pos, ending)
            }
            Err(e) => (visits, 0, 0, format!("error {e}")),
        }
    }

    /// Scans `bytes` both ways: whole in memory, and streamed from a file in `window`-byte
    /// windows.
    fn both(bytes: &[u8], is_last: bool, window: usize, read_ahead: bool) -> (Seen, Seen) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("00000000000000000000.seg");
        std::fs::write(&path, bytes).expect("write");
        let start = SEGMENT_HEADER_LEN;
        let mut whole_visits = Vec::new();
        let whole = scan_frames(&path, bytes, start, 0, is_last, |o, p, b| {
            whole_visits.push((o, p, b.to_vec()));
            Ok(())
        });
        let mut file = std::fs::File::open(&path).expect("open");
        let mut buf = ScanBuffer::with_window(window, read_ahead);
        let mut streamed_visits = Vec::new();
        let streamed = scan_file(
            &path,
            &mut file,
            bytes.len() as u64,
            start,
            0,
            is_last,
            &mut buf,
            |o, p, b| {
                streamed_visits.push((o, p, b.to_vec()));
                Ok(())
            },
        );
        (
            summarise(whole, whole_visits),
            summarise(streamed, streamed_visits),
        )
    }

    #[test]
    fn streamed_scan_handles_frames_larger_than_the_window() {
        // 70 kB is also larger than the read-ahead headroom.
        let bytes = segment(&[10, 5000, 3, 70_000, 1, 200_000, 7]);
        for read_ahead in [false, true] {
            let (whole, streamed) = both(&bytes, true, 64, read_ahead);
            assert_eq!(whole.1, 7);
            assert_eq!(whole, streamed, "read_ahead {read_ahead}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Streaming a segment through small windows, read directly or by the read-ahead
        /// thread, finds exactly what scanning it whole finds — the same records at the same positions, the same ending — for intact,
        /// truncated, bit-flipped and zero-padded segments.
        #[test]
        fn streamed_scan_equals_whole_scan(
            sizes in proptest::collection::vec(0usize..600, 1..12),
            window in 1usize..400,
            damage in 0u8..4,
            at in any::<proptest::sample::Index>(),
            bit in 0u8..8,
            is_last in any::<bool>(),
            read_ahead in any::<bool>(),
        ) {
            let mut bytes = segment(&sizes);
            let body = bytes.len() - SEGMENT_HEADER_LEN as usize;
            let pos = SEGMENT_HEADER_LEN as usize + at.index(body);
            match damage {
                1 => bytes.truncate(pos),
                2 => bytes[pos] ^= 1 << bit,
                3 => bytes.extend(std::iter::repeat_n(0u8, at.index(300) + 1)),
                _ => {}
            }
            let (whole, streamed) = both(&bytes, is_last, window, read_ahead);
            prop_assert_eq!(whole, streamed);
        }
    }
}
