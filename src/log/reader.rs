//! Reading the log: from any offset (using the sparse indexes), filtered by stage, and
//! following a writer that is still appending.
//!
//! A reader never writes. A torn tail at the end of the last segment is where reading
//! stops (the next writer will truncate it); corruption anywhere else is an error.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::LogError;
use super::format::{Frame, SEGMENT_HEADER_LEN, list_segments, read_frame, segment_file_name};
use super::index::SparseIndex;
use super::scan::{
    Ending, ScanBuffer, SegmentFrames, Step, check_header, read_segment, scan_file, scan_frames,
};
use crate::record::{Envelope, Key};

/// A read handle on a log directory (a snapshot of its segment list, refreshed as needed).
/// A partitioned log — one `part-NNNN/` log per dataflow worker, as `cairn run --workers`
/// writes — reads as one: partition after partition, each in order, offsets per partition.
pub struct LogReader {
    dir: PathBuf,
    parts: Vec<PathBuf>,
}

/// The logs that make up the log at `dir`: `dir` itself when it holds segments, else its
/// `part-*` subdirectories that do, in name order (empty when there are none).
pub fn partitions(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let segments = list_segments(dir).map_err(|e| LogError::io(dir, "list segments", e))?;
    if !segments.is_empty() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LogError::io(dir, "list partitions", e))? {
        let path = entry
            .map_err(|e| LogError::io(dir, "list partitions", e))?
            .path();
        let is_part = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("part-"));
        if is_part
            && path.is_dir()
            && !list_segments(&path)
                .map_err(|e| LogError::io(&path, "list segments", e))?
                .is_empty()
        {
            parts.push(path);
        }
    }
    parts.sort();
    Ok(parts)
}

impl LogReader {
    /// Opens the log in `dir` for reading.
    pub fn open(dir: &Path) -> Result<LogReader, LogError> {
        if !dir.is_dir() {
            return Err(LogError::NotALog {
                path: dir.to_path_buf(),
                reason: "no such directory".into(),
            });
        }
        let parts = partitions(dir)?;
        if parts.is_empty() {
            return Err(LogError::NotALog {
                path: dir.to_path_buf(),
                reason: "no segment files (*.seg) and no partitions (part-*)".into(),
            });
        }
        Ok(LogReader {
            dir: dir.to_path_buf(),
            parts,
        })
    }

    /// The partitions read (just the log directory when it is not partitioned).
    pub fn parts(&self) -> &[PathBuf] {
        &self.parts
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Calls `visit(segment, byte position, offset, payload)` for every checked frame from
    /// `offset` on, without copying payloads; `visit` returns `false` to stop early.
    pub fn visit_frames(
        &self,
        offset: u64,
        mut visit: impl FnMut(&Path, u64, u64, &[u8]) -> Result<bool, LogError>,
    ) -> Result<(), LogError> {
        let mut buf = ScanBuffer::default();
        for part in &self.parts {
            let mut expected: Option<u64> = None;
            for (first, path, is_last) in segments_from(part, offset)? {
                let (next, stopped) = visit_segment(
                    &path,
                    expected.unwrap_or(first),
                    offset,
                    is_last,
                    &mut buf,
                    &mut visit,
                )?;
                if stopped {
                    return Ok(());
                }
                expected = Some(next);
            }
        }
        Ok(())
    }

    /// Decoded events from `offset` on, in order (decoded a segment at a time).
    pub fn iter_from(
        &self,
        offset: u64,
    ) -> impl Iterator<Item = Result<Envelope, LogError>> + use<> {
        let parts = self.parts.clone();
        parts
            .into_iter()
            .flat_map(move |part| iter_dir(part, offset))
    }

    /// Events of one stage from `offset` on.
    pub fn iter_stage(
        &self,
        offset: u64,
        stage: &str,
    ) -> impl Iterator<Item = Result<Envelope, LogError>> + use<> {
        let stage = stage.to_string();
        self.iter_from(offset)
            .filter(move |e| e.as_ref().map(|e| e.stage == stage).unwrap_or(true))
    }

    /// Finds the event logged under `key` by scanning (the writer keeps an in-memory map;
    /// this is for tools that only read).
    pub fn find_key(&self, key: Key) -> Result<Option<Envelope>, LogError> {
        let mut found = None;
        self.visit_frames(0, |seg, pos, offset, bytes| {
            if Envelope::peek_offset_key(bytes).map(|(_, k)| k) != Some(key) {
                return Ok(true);
            }
            let env = Envelope::decode(bytes).map_err(|e| LogError::Corrupt {
                segment: seg.to_path_buf(),
                pos,
                offset,
                reason: e.to_string(),
            })?;
            found = Some(env);
            Ok(false)
        })?;
        Ok(found)
    }

    /// A follower that yields events from `offset` on and then waits for new ones (of the
    /// first partition of a partitioned log; open each partition to follow them all).
    pub fn follow(&self, offset: u64) -> Follower {
        Follower {
            dir: self
                .parts
                .first()
                .cloned()
                .unwrap_or_else(|| self.dir.clone()),
            next_offset: offset,
            segment: None,
        }
    }
}

/// Decoded events of one (unpartitioned) log directory from `offset` on, pulled one record
/// at a time (a window of the segment in memory, not the segment).
fn iter_dir(dir: PathBuf, offset: u64) -> impl Iterator<Item = Result<Envelope, LogError>> {
    let (segments, failed) = match segments_from(&dir, offset) {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    DecodedEvents {
        segments: segments.into_iter(),
        from: offset,
        expected: None,
        current: None,
        buf: ScanBuffer::default(),
        failed,
        done: false,
    }
}

/// The iterator behind [`LogReader::iter_from`] for one log directory.
struct DecodedEvents {
    segments: std::vec::IntoIter<(u64, PathBuf, bool)>,
    from: u64,
    /// The first offset the next segment must start with.
    expected: Option<u64>,
    current: Option<(PathBuf, SegmentFrames)>,
    /// The window buffer between segments (the current segment's cursor holds it).
    buf: ScanBuffer,
    failed: Option<LogError>,
    done: bool,
}

impl DecodedEvents {
    /// Records `e` as the last item: events decoded before an error come first, then the
    /// error, then nothing.
    fn fail(&mut self, e: LogError) -> Option<Result<Envelope, LogError>> {
        self.done = true;
        self.current = None;
        Some(Err(e))
    }
}

impl Iterator for DecodedEvents {
    type Item = Result<Envelope, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            if let Some(e) = self.failed.take() {
                return self.fail(e);
            }
            if let Some((path, frames)) = &mut self.current {
                let ended = match frames.step() {
                    Err(e) => return self.fail(e),
                    Ok(Step::Record {
                        offset,
                        pos,
                        payload,
                    }) => {
                        if offset < self.from {
                            continue;
                        }
                        let decoded = Envelope::decode(payload).map_err(|e| LogError::Corrupt {
                            segment: path.clone(),
                            pos,
                            offset,
                            reason: e.to_string(),
                        });
                        match decoded {
                            Ok(env) => return Some(Ok(env)),
                            Err(e) => return self.fail(e),
                        }
                    }
                    Ok(Step::End(scan)) => scan,
                };
                match ended.ending {
                    Ending::Clean => {}
                    Ending::Torn { pos, bytes } => {
                        tracing::warn!(segment = %path.display(), pos, bytes, "log ends in a torn record; reading stops before it");
                    }
                    Ending::Corrupt(e) => return self.fail(e),
                }
                self.expected = Some(ended.next_offset);
                if let Some((_, frames)) = self.current.take() {
                    self.buf = frames.into_buffer();
                }
                continue;
            }
            let (first, path, is_last) = self.segments.next()?;
            let first = self.expected.unwrap_or(first);
            let opened = match open_segment(&path, first, self.from, is_last) {
                Ok(Some(opened)) => opened,
                Ok(None) => {
                    self.expected = Some(first);
                    continue;
                }
                Err(e) => return self.fail(e),
            };
            let buf = std::mem::take(&mut self.buf);
            match SegmentFrames::new(
                &path,
                opened.file,
                opened.file_len,
                opened.start_pos,
                opened.start_offset,
                is_last,
                buf,
            ) {
                Ok(frames) => self.current = Some((path, frames)),
                Err(e) => return self.fail(e),
            }
        }
    }
}

/// The segments holding offsets from `offset` on, as `(first offset, path, is last)`:
/// from the last segment whose first offset is not beyond `offset`.
fn segments_from(dir: &Path, offset: u64) -> Result<Vec<(u64, PathBuf, bool)>, LogError> {
    let list = list_segments(dir).map_err(|e| LogError::io(dir, "list segments", e))?;
    let start = list.iter().rposition(|(f, _)| *f <= offset).unwrap_or(0);
    let total = list.len();
    Ok(list
        .into_iter()
        .enumerate()
        .skip(start)
        .map(|(i, (first, path))| (first, path, i + 1 == total))
        .collect())
}

/// A segment opened for reading, positioned by its index near the first wanted offset.
struct OpenSegment {
    file: std::fs::File,
    file_len: u64,
    /// The offset of the record at `start_pos`.
    start_offset: u64,
    start_pos: u64,
}

/// Opens a segment, checks its header against `first`, and finds where to start reading for
/// offset `from` (the closest sparse-index entry, or the first record). `None`: a last
/// segment whose header never fully reached the disk (nothing to read).
fn open_segment(
    path: &Path,
    first: u64,
    from: u64,
    is_last: bool,
) -> Result<Option<OpenSegment>, LogError> {
    let io = |e: std::io::Error| LogError::io(path, "read segment", e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut header = Vec::with_capacity(SEGMENT_HEADER_LEN as usize);
    (&mut file)
        .take(SEGMENT_HEADER_LEN)
        .read_to_end(&mut header)
        .map_err(io)?;
    if check_header(path, &header, first, is_last)?.is_none() {
        return Ok(None);
    }
    let (start_offset, start_pos) = SparseIndex::load(&SparseIndex::path_for(path), file_len)
        .and_then(|idx| idx.seek(from))
        .filter(|&(o, p)| o >= first && p >= SEGMENT_HEADER_LEN)
        .unwrap_or((first, SEGMENT_HEADER_LEN));
    Ok(Some(OpenSegment {
        file,
        file_len,
        start_offset,
        start_pos,
    }))
}

/// A frame visitor: `(segment, byte position, offset, payload)`, returning whether to go on.
type FrameVisitor<'a> = dyn FnMut(&Path, u64, u64, &[u8]) -> Result<bool, LogError> + 'a;

/// Visits the frames of one segment with offsets `>= from`, starting from the index entry
/// closest to `from`, streaming the file through `buf` (reused across segments, a window at
/// a time: see [`scan_file`]). `visit` returns `false` to stop. Returns the offset
/// following the segment's last record and whether the visitor stopped early.
fn visit_segment(
    path: &Path,
    first: u64,
    from: u64,
    is_last: bool,
    buf: &mut ScanBuffer,
    visit: &mut FrameVisitor<'_>,
) -> Result<(u64, bool), LogError> {
    let Some(OpenSegment {
        mut file,
        file_len,
        start_offset,
        start_pos,
    }) = open_segment(path, first, from, is_last)?
    else {
        return Ok((first, false));
    };
    let mut stopped = false;
    let scan = scan_file(
        path,
        &mut file,
        file_len,
        start_pos,
        start_offset,
        is_last,
        buf,
        |offset, pos, payload| {
            if stopped || offset < from {
                return Ok(());
            }
            if !visit(path, pos, offset, payload)? {
                stopped = true;
            }
            Ok(())
        },
    )?;
    match scan.ending {
        Ending::Clean => {}
        Ending::Torn { pos, bytes } => {
            tracing::warn!(segment = %path.display(), pos, bytes, "log ends in a torn record; reading stops before it");
        }
        Ending::Corrupt(e) if !stopped => return Err(e),
        Ending::Corrupt(_) => {}
    }
    Ok((scan.next_offset, stopped))
}

/// Follows a log that a writer is appending to: [`Follower::poll`] returns the events
/// appended since the last call, each exactly once and in order.
pub struct Follower {
    dir: PathBuf,
    next_offset: u64,
    segment: Option<(PathBuf, u64)>,
}

impl Follower {
    /// The offset of the next event this follower will return.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Returns whatever complete events are available now (possibly none). An append still
    /// in progress at the end of the log is waited for, never reported as corruption.
    pub fn poll(&mut self) -> Result<Vec<Envelope>, LogError> {
        let mut out = Vec::new();
        loop {
            if self.segment.is_none() && !self.locate()? {
                return Ok(out);
            }
            let Some((path, pos)) = self.segment.clone() else {
                return Ok(out);
            };
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.segment = None;
                    return Ok(out);
                }
                Err(e) => return Err(LogError::io(&path, "open segment", e)),
            };
            let mut bytes = Vec::new();
            file.seek(SeekFrom::Start(pos))
                .and_then(|_| file.read_to_end(&mut bytes))
                .map_err(|e| LogError::io(&path, "read segment", e))?;
            let mut at = 0usize;
            let mut stalled = false;
            while !stalled {
                match read_frame(&bytes, at) {
                    Frame::Record { payload, next } => {
                        let env = Envelope::decode(payload).map_err(|e| LogError::Corrupt {
                            segment: path.clone(),
                            pos: pos + at as u64,
                            offset: self.next_offset,
                            reason: e.to_string(),
                        })?;
                        if env.offset != self.next_offset {
                            return Err(LogError::Corrupt {
                                segment: path.clone(),
                                pos: pos + at as u64,
                                offset: self.next_offset,
                                reason: format!("record claims offset {}", env.offset),
                            });
                        }
                        self.next_offset += 1;
                        out.push(env);
                        at = next;
                    }
                    Frame::End | Frame::Incomplete | Frame::BadPayload { .. } => stalled = true,
                    Frame::BadHeader(reason) => {
                        return Err(LogError::Corrupt {
                            segment: path.clone(),
                            pos: pos + at as u64,
                            offset: self.next_offset,
                            reason,
                        });
                    }
                }
            }
            self.segment = Some((path.clone(), pos + at as u64));
            let at_end = at == bytes.len();
            // Move on only once this segment is complete and its successor exists.
            let successor = self.dir.join(segment_file_name(self.next_offset));
            if at_end && successor != path && successor.exists() {
                self.segment = Some((successor, SEGMENT_HEADER_LEN));
                continue;
            }
            return Ok(out);
        }
    }

    /// Waits up to `timeout` for at least one new event.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Envelope>, LogError> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.poll()?;
            if !events.is_empty() || Instant::now() >= deadline {
                return Ok(events);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Finds the segment and byte position holding `next_offset`.
    fn locate(&mut self) -> Result<bool, LogError> {
        let segments =
            list_segments(&self.dir).map_err(|e| LogError::io(&self.dir, "list segments", e))?;
        let Some(idx) = segments
            .iter()
            .rposition(|(first, _)| *first <= self.next_offset)
        else {
            return Ok(false);
        };
        let (first, path) = &segments[idx];
        let bytes = read_segment(path)?;
        if bytes.len() < SEGMENT_HEADER_LEN as usize {
            return Ok(false);
        }
        check_header(path, &bytes, *first, true)?;
        let mut pos = SEGMENT_HEADER_LEN;
        let target = self.next_offset;
        let scan = scan_frames(
            path,
            &bytes,
            SEGMENT_HEADER_LEN,
            *first,
            true,
            |offset, p, _| {
                if offset == target {
                    pos = p;
                }
                Ok(())
            },
        )?;
        if scan.next_offset <= target {
            pos = scan.end_pos;
        }
        self.segment = Some((path.clone(), pos));
        Ok(true)
    }
}
