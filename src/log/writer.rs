//! The log writer: appends events with group commit, rolls segments, recovers a torn tail
//! on open, and answers "was this key already logged?" — the question exactly-once resume
//! asks before doing any work.
//!
//! Durability contract: [`LogWriter::durable_offset`] never exceeds what an `fdatasync` has
//! confirmed. Appenders that wait for durability at the same time share one sync (group
//! commit): whoever finds no sync in flight becomes the leader, releases the lock while the
//! disk works, and wakes everyone whose events that sync covered.
//!
//! Under the buffered policies (`Interval`, `Explicit`) the `write` calls run on a flusher
//! thread, so encoding the next batch overlaps handing the previous one to the OS: an
//! appender encodes into its buffer, adds it to the bytes queued for the flusher (waiting
//! only when a full megabyte is already queued) and returns. A sync, a segment
//! roll or a close first waits for the flusher to go idle, so bytes reach each file in
//! offset order. Under `Always` the appender writes and syncs itself (it waits anyway).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use super::format::{
    FRAME_HEADER_LEN, MAX_RECORD_BYTES, SEGMENT_HEADER_LEN, encode_segment_header, list_segments,
    seal_frame_in_place, segment_file_name,
};
use super::index::SparseIndex;
use super::scan::{Ending, check_header, read_segment, scan_frames};
use super::{LogError, LogOptions, SyncPolicy, sync_dir};
use crate::record::{Envelope, Key, NewEvent};

/// Outcome of appending one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The event was appended at this offset.
    New(u64),
    /// An event with the same key was already logged at this offset; nothing was written.
    Existing(u64),
}

impl Appended {
    /// The offset of the event in the log, new or not.
    pub fn offset(self) -> u64 {
        match self {
            Appended::New(o) | Appended::Existing(o) => o,
        }
    }
}

/// A torn tail found and cut off when the log was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The segment it was in.
    pub segment: PathBuf,
    /// Byte position where it started (the segment now ends there).
    pub pos: u64,
    /// The offset the next record will get.
    pub offset: u64,
    /// Bytes dropped.
    pub bytes: u64,
    /// Where a copy of the dropped bytes was kept.
    pub saved_to: PathBuf,
}

/// What opening the log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments found.
    pub segments: usize,
    /// Records found.
    pub records: u64,
    /// A torn tail that was truncated, if any.
    pub torn: Option<TornTail>,
    /// Sparse indexes that were missing or stale and were rebuilt.
    pub indexes_rebuilt: usize,
}

struct Active {
    path: PathBuf,
    file: Arc<File>,
    /// Segment length including bytes still in the write buffer.
    len: u64,
    index: SparseIndex,
    since_index: u32,
}

/// Keys are already uniform hashes: use their low bits instead of hashing them again.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 ^= v as u64;
    }
}

type KeyMap = HashMap<Key, u64, std::hash::BuildHasherDefault<KeyHasher>>;

struct State {
    active: Active,
    next_offset: u64,
    /// Offsets below this are confirmed on disk.
    durable: u64,
    buf: Vec<u8>,
    syncing: bool,
    keys: KeyMap,
    failed: Option<String>,
    closed: bool,
}

struct Shared {
    dir: PathBuf,
    opts: LogOptions,
    state: Mutex<State>,
    flusher: Arc<FlushQueue>,
    synced: Condvar,
    recovery: RecoveryReport,
    lock_file: File,
}

/// An append handle on a log directory. Cloning is cheap; clones share one writer, so
/// threads appending through clones share group commits. Only one writer (process) may
/// hold a directory at a time.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

const FLUSH_AT: usize = 1 << 20;

/// Bytes handed to the flusher thread, to be written to `file` in one `write_all`.
struct FlushJob {
    file: Arc<File>,
    path: PathBuf,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct FlushSlot {
    /// The bytes waiting for the flusher (one job; later appends extend it).
    job: Option<FlushJob>,
    /// A job is being written right now.
    busy: bool,
    /// A cleared buffer to hand back to the appender (saves reallocating).
    spare: Vec<u8>,
    /// A failed write: the writer is broken from then on.
    error: Option<String>,
    shutdown: bool,
}

/// The hand-over point between appenders and the flusher thread. Lock order: the writer's
/// state, then this; the flusher takes only this, so waiting here with the state locked
/// cannot deadlock.
#[derive(Default)]
struct FlushQueue {
    slot: Mutex<FlushSlot>,
    changed: Condvar,
}

impl FlushQueue {
    fn lock(&self) -> MutexGuard<'_, FlushSlot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the frames in `bytes` (leaving it empty) for `file`, after what is queued
    /// already. Appends to the waiting job rather than waiting for the flusher, so an
    /// appender only blocks when a full [`FLUSH_AT`] is already waiting (backpressure).
    fn submit(&self, file: &Arc<File>, path: &Path, bytes: &mut Vec<u8>) -> Result<(), LogError> {
        let mut slot = self.lock();
        loop {
            if let Some(why) = &slot.error {
                return Err(LogError::Failed(why.clone()));
            }
            match &mut slot.job {
                None => {
                    let spare = std::mem::take(&mut slot.spare);
                    slot.job = Some(FlushJob {
                        file: Arc::clone(file),
                        path: path.to_path_buf(),
                        bytes: std::mem::replace(bytes, spare),
                    });
                    self.changed.notify_all();
                    return Ok(());
                }
                // Only one file at a time has queued bytes: a roll waits for the queue to
                // drain before it switches files.
                Some(job) if job.bytes.len() < FLUSH_AT => {
                    job.bytes.extend_from_slice(bytes);
                    bytes.clear();
                    return Ok(());
                }
                Some(_) => slot = self.changed.wait(slot).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// Waits until every queued byte has been written.
    fn wait_idle(&self) -> Result<(), LogError> {
        let mut slot = self.lock();
        while (slot.job.is_some() || slot.busy) && slot.error.is_none() {
            slot = self.changed.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
        match &slot.error {
            Some(why) => Err(LogError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    fn shut_down(&self) {
        self.lock().shutdown = true;
        self.changed.notify_all();
    }

    /// The flusher thread: writes jobs in the order they were queued.
    fn run(&self) {
        let mut slot = self.lock();
        loop {
            let Some(mut job) = slot.job.take() else {
                if slot.shutdown {
                    return;
                }
                slot = self.changed.wait(slot).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            slot.busy = true;
            drop(slot);
            let result = (&*job.file).write_all(&job.bytes);
            slot = self.lock();
            slot.busy = false;
            if let Err(e) = result {
                slot.error = Some(format!("{}: write: {e}", job.path.display()));
            }
            job.bytes.clear();
            if job.bytes.capacity() > slot.spare.capacity() {
                slot.spare = job.bytes;
            }
            self.changed.notify_all();
        }
    }
}

/// A directory whose events live in `part-*` partitions (a multi-worker run) is not a log
/// one writer may append to: its readers would ignore the partitions once root segments
/// appear. Checked before anything is written, the lock file included.
fn refuse_partitioned(dir: &Path) -> Result<(), LogError> {
    if !dir.is_dir() {
        return Ok(());
    }
    let parts = super::reader::partitions(dir)?;
    if parts.is_empty() || parts.first().is_some_and(|p| p == dir) {
        return Ok(());
    }
    Err(LogError::NotALog {
        path: dir.to_path_buf(),
        reason: format!(
            "a partitioned log written by {} workers (part-*); a single writer would hide \
             its partitions — continue it with `cairn run SPEC --workers {}` (or the same \
             --processes), write to a new log, or read it with `cairn log`, `replay` or `export`",
            parts.len(),
            parts.len()
        ),
    })
}

impl LogWriter {
    /// Opens (or creates) the log in `dir`: validates every segment, truncates a torn tail
    /// (keeping a copy under `dir/recovered/`), rebuilds stale indexes and loads the keys.
    /// Corruption before the tail is an error naming the segment and byte position.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<LogWriter, LogError> {
        refuse_partitioned(dir)?;
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| LogError::io(dir, "create log directory", e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LogError::io(&lock_path, "open lock file", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LogError::NotALog {
                    path: dir.to_path_buf(),
                    reason: "another writer holds this log (LOCK is taken)".into(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LogError::io(&lock_path, "lock", e));
            }
        }

        let mut report = RecoveryReport::default();
        let mut keys = KeyMap::default();
        let segments = list_segments(dir).map_err(|e| LogError::io(dir, "list segments", e))?;
        report.segments = segments.len();
        let mut next_offset = 0u64;
        let mut active = None;
        for (i, (first, path)) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            let bytes = read_segment(path)?;
            if check_header(path, &bytes, next_offset, is_last)?.is_none() {
                // The last segment's header never fully landed: start it afresh.
                let saved = save_torn(dir, path, 0, &bytes)?;
                write_new_segment(path, *first)?;
                report.torn = Some(TornTail {
                    segment: path.clone(),
                    pos: 0,
                    offset: next_offset,
                    bytes: bytes.len() as u64,
                    saved_to: saved,
                });
                active = Some((path.clone(), SEGMENT_HEADER_LEN, SparseIndex::default(), 0));
                break;
            }
            let mut entries = Vec::new();
            let mut since = 0u32;
            let every = opts.index_every.max(1);
            let scan = scan_frames(
                path,
                &bytes,
                SEGMENT_HEADER_LEN,
                next_offset,
                is_last,
                |offset, pos, payload| {
                    if since == 0 {
                        entries.push((offset, pos));
                    }
                    since = (since + 1) % every;
                    if let Some((_, key)) = Envelope::peek_offset_key(payload)
                        && keys.insert(key, offset).is_some()
                    {
                        tracing::warn!(%key, offset, "a key appears twice in the log; keeping the first");
                    }
                    Ok(())
                },
            )?;
            report.records += scan.next_offset - next_offset;
            next_offset = scan.next_offset;
            let mut len = bytes.len() as u64;
            match scan.ending {
                Ending::Clean => {}
                Ending::Corrupt(e) => return Err(e),
                Ending::Torn { pos, bytes: n } => {
                    let idx = SparseIndex::path_for(path);
                    let _ = std::fs::remove_file(&idx);
                    let saved = save_torn(dir, path, pos, &bytes[pos as usize..])?;
                    truncate(path, pos)?;
                    tracing::warn!(
                        segment = %path.display(), pos, bytes = n, saved = %saved.display(),
                        "truncated a torn final record left by an interrupted append"
                    );
                    report.torn = Some(TornTail {
                        segment: path.clone(),
                        pos,
                        offset: next_offset,
                        bytes: n,
                        saved_to: saved,
                    });
                    len = pos;
                }
            }
            let index = SparseIndex {
                segment_len: len,
                entries,
            };
            if is_last {
                active = Some((path.clone(), len, index, since));
            } else {
                let idx_path = SparseIndex::path_for(path);
                if SparseIndex::load(&idx_path, len).as_ref() != Some(&index) {
                    index.write(&idx_path)?;
                    report.indexes_rebuilt += 1;
                }
            }
        }
        let (path, len, index, since_index) = match active {
            Some(a) => a,
            None => {
                let path = dir.join(segment_file_name(0));
                write_new_segment(&path, 0)?;
                sync_dir(dir)?;
                report.segments = 1;
                (path, SEGMENT_HEADER_LEN, SparseIndex::default(), 0)
            }
        };
        let file = open_append(&path)?;
        let state = State {
            active: Active {
                path,
                file: Arc::new(file),
                len,
                index,
                since_index,
            },
            next_offset,
            durable: next_offset,
            buf: Vec::with_capacity(FLUSH_AT),
            syncing: false,
            keys,
            failed: None,
            closed: false,
        };
        let flusher = Arc::new(FlushQueue::default());
        if opts.sync != SyncPolicy::Always {
            let queue = Arc::clone(&flusher);
            std::thread::Builder::new()
                .name("cairn-log-flush".into())
                .spawn(move || queue.run())
                .map_err(|e| LogError::io(dir, "spawn flush thread", e))?;
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts: opts.clone(),
            state: Mutex::new(state),
            flusher,
            synced: Condvar::new(),
            recovery: report,
            lock_file: lock,
        });
        if let SyncPolicy::Interval(every) = opts.sync {
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("cairn-log-sync".into())
                .spawn(move || interval_syncer(weak, every))
                .map_err(|e| LogError::io(dir, "spawn sync thread", e))?;
        }
        Ok(LogWriter { shared })
    }

    /// What opening the log found and repaired.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.shared.recovery
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends one event (see [`LogWriter::append_batch`]).
    pub fn append(&self, event: NewEvent) -> Result<Appended, LogError> {
        let mut out = self.append_batch(vec![event])?;
        Ok(out.pop().unwrap_or(Appended::Existing(0)))
    }

    /// Appends events in order. An event whose key is already logged is not written again
    /// ([`Appended::Existing`]). Under [`SyncPolicy::Always`] this returns once the events
    /// are durable; otherwise once they are queued for the flusher thread, which hands them
    /// to the OS in order without further calls (a process killed right after this returns
    /// may lose them, as it may lose anything not yet synced).
    pub fn append_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, LogError> {
        let mut results = Vec::with_capacity(events.len());
        let target = {
            let mut st = self.lock()?;
            for event in events {
                if let Some(&offset) = st.keys.get(&event.key) {
                    results.push(Appended::Existing(offset));
                    continue;
                }
                let offset = st.next_offset;
                let envelope = event.at_offset(offset);
                let st = &mut *st;
                // Encode straight into the write buffer behind a reserved frame header.
                let before = st.buf.len();
                st.buf.resize(before + FRAME_HEADER_LEN, 0);
                envelope.encode_into(&mut st.buf);
                let payload_len = st.buf.len() - before - FRAME_HEADER_LEN;
                if payload_len > MAX_RECORD_BYTES as usize {
                    st.buf.truncate(before);
                    return Err(LogError::TooLarge {
                        bytes: payload_len,
                        max: MAX_RECORD_BYTES,
                    });
                }
                seal_frame_in_place(&mut st.buf, before);
                if st.active.since_index == 0 {
                    st.active.index.entries.push((offset, st.active.len));
                }
                st.active.since_index =
                    (st.active.since_index + 1) % self.shared.opts.index_every.max(1);
                st.active.len += (st.buf.len() - before) as u64;
                st.keys.insert(envelope.key, offset);
                st.next_offset += 1;
                results.push(Appended::New(offset));
                if st.buf.len() >= FLUSH_AT {
                    self.hand_over_locked(st)?;
                }
                if st.active.len >= self.shared.opts.segment_bytes {
                    self.roll_locked(st)?;
                }
            }
            self.hand_over_locked(&mut st)?;
            st.next_offset
        };
        if self.shared.opts.sync == SyncPolicy::Always {
            self.sync_to(target)?;
        }
        Ok(results)
    }

    /// Makes every event appended so far durable.
    pub fn sync(&self) -> Result<(), LogError> {
        let target = self.lock()?.next_offset;
        self.sync_to(target)
    }

    /// Waits until events below `offset` are durable, syncing if no one else is.
    pub fn sync_to(&self, target: u64) -> Result<(), LogError> {
        let mut st = self.lock_even_closed()?;
        // Nothing beyond what was appended can become durable.
        let target = target.min(st.next_offset);
        loop {
            if st.durable >= target {
                return Ok(());
            }
            if let Some(why) = &st.failed {
                return Err(LogError::Failed(why.clone()));
            }
            if st.syncing {
                st = self
                    .shared
                    .synced
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            self.flush_locked(&mut st)?;
            let upto = st.next_offset;
            let file = Arc::clone(&st.active.file);
            let path = st.active.path.clone();
            st.syncing = true;
            drop(st);
            let result = file.sync_data();
            st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            st.syncing = false;
            match result {
                Ok(()) => st.durable = st.durable.max(upto),
                Err(e) => {
                    st.failed = Some(format!("{}: fdatasync: {e}", path.display()));
                }
            }
            self.shared.synced.notify_all();
        }
    }

    /// The offset the next new event will get.
    pub fn next_offset(&self) -> u64 {
        self.shared
            .state
            .lock()
            .map(|s| s.next_offset)
            .unwrap_or_else(|p| p.into_inner().next_offset)
    }

    /// Events below this offset are confirmed on disk.
    pub fn durable_offset(&self) -> u64 {
        self.shared
            .state
            .lock()
            .map(|s| s.durable)
            .unwrap_or_else(|p| p.into_inner().durable)
    }

    /// The offset of the event logged under `key`, if any — "was this already done?".
    pub fn offset_of(&self, key: Key) -> Option<u64> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.keys.get(&key).copied()
    }

    /// Flushes, syncs and writes the active segment's index. Further appends fail.
    pub fn close(&self) -> Result<(), LogError> {
        self.sync()?;
        let mut st = self.lock()?;
        st.closed = true;
        let mut index = st.active.index.clone();
        index.segment_len = st.active.len;
        index.write(&SparseIndex::path_for(&st.active.path))?;
        self.shared.flusher.shut_down();
        // Release LOCK now rather than when the last handle drops: the background syncer may
        // still hold one for a moment, and a closed writer appends nothing more anyway.
        let _ = self.shared.lock_file.unlock();
        Ok(())
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, LogError> {
        let st = self.lock_even_closed()?;
        if st.closed {
            return Err(LogError::Failed("the writer is closed".into()));
        }
        Ok(st)
    }

    fn lock_even_closed(&self) -> Result<MutexGuard<'_, State>, LogError> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.failed {
            return Err(LogError::Failed(why.clone()));
        }
        Ok(st)
    }

    /// Hands buffered frames to the OS now, after whatever the flusher still holds.
    fn flush_locked(&self, st: &mut State) -> Result<(), LogError> {
        if let Err(e) = self.shared.flusher.wait_idle() {
            st.failed = Some(e.to_string());
            return Err(e);
        }
        if st.buf.is_empty() {
            return Ok(());
        }
        let result = (&*st.active.file).write_all(&st.buf);
        if let Err(e) = result {
            let path = st.active.path.clone();
            st.failed = Some(format!("{}: write: {e}", path.display()));
            return Err(LogError::io(path, "append", e));
        }
        st.buf.clear();
        Ok(())
    }

    /// Passes buffered frames on: to the flusher thread under the buffered policies, straight
    /// to the OS under `Always` (whose caller syncs next anyway).
    fn hand_over_locked(&self, st: &mut State) -> Result<(), LogError> {
        if st.buf.is_empty() {
            return Ok(());
        }
        if self.shared.opts.sync == SyncPolicy::Always {
            return self.flush_locked(st);
        }
        match self
            .shared
            .flusher
            .submit(&st.active.file, &st.active.path, &mut st.buf)
        {
            Ok(()) => {
                if st.buf.capacity() == 0 {
                    st.buf.reserve(FLUSH_AT);
                }
                Ok(())
            }
            Err(e) => {
                st.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Seals the active segment (sync, index) and starts the next one.
    fn roll_locked(&self, st: &mut State) -> Result<(), LogError> {
        self.flush_locked(st)?;
        let sealed = &st.active;
        if let Err(e) = sealed.file.sync_data() {
            st.failed = Some(format!("{}: fdatasync: {e}", sealed.path.display()));
            return Err(LogError::io(sealed.path.clone(), "fdatasync", e));
        }
        st.durable = st.durable.max(st.next_offset);
        let mut index = st.active.index.clone();
        index.segment_len = st.active.len;
        index.write(&SparseIndex::path_for(&st.active.path))?;
        let path = self.shared.dir.join(segment_file_name(st.next_offset));
        write_new_segment(&path, st.next_offset)?;
        sync_dir(&self.shared.dir)?;
        st.active = Active {
            file: Arc::new(open_append(&path)?),
            path,
            len: SEGMENT_HEADER_LEN,
            index: SparseIndex::default(),
            since_index: 0,
        };
        self.shared.synced.notify_all();
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let idle = self.flusher.wait_idle();
        self.flusher.shut_down();
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.failed.is_some() || st.closed {
            return;
        }
        let flushed =
            idle.is_ok() && (st.buf.is_empty() || (&*st.active.file).write_all(&st.buf).is_ok());
        if !flushed || st.active.file.sync_data().is_err() {
            tracing::error!(segment = %st.active.path.display(), "final flush of the event log failed");
        }
    }
}

fn interval_syncer(weak: Weak<Shared>, every: std::time::Duration) {
    loop {
        std::thread::sleep(every);
        let Some(shared) = weak.upgrade() else { return };
        let writer = LogWriter { shared };
        let target = {
            let st = writer
                .shared
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if st.closed || st.failed.is_some() {
                return;
            }
            st.next_offset
        };
        if let Err(e) = writer.sync_to(target) {
            tracing::error!(error = %e, "background sync of the event log failed");
            return;
        }
    }
}

fn open_append(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| LogError::io(path, "open segment for append", e))
}

fn write_new_segment(path: &Path, first_offset: u64) -> Result<(), LogError> {
    let mut f = File::create(path).map_err(|e| LogError::io(path, "create segment", e))?;
    f.write_all(&encode_segment_header(first_offset))
        .and_then(|()| f.sync_all())
        .map_err(|e| LogError::io(path, "write segment header", e))
}

fn truncate(path: &Path, len: u64) -> Result<(), LogError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LogError::io(path, "open for truncation", e))?;
    f.set_len(len)
        .and_then(|()| f.sync_all())
        .map_err(|e| LogError::io(path, "truncate", e))
}

/// Keeps a copy of bytes cut from a segment under `dir/recovered/`.
pub(crate) fn save_torn(
    dir: &Path,
    segment: &Path,
    pos: u64,
    bytes: &[u8],
) -> Result<PathBuf, LogError> {
    let out_dir = dir.join("recovered");
    std::fs::create_dir_all(&out_dir).map_err(|e| LogError::io(&out_dir, "create", e))?;
    let name = segment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = out_dir.join(format!("{name}.at{pos}.{}.torn", crate::record::now_ns()));
    std::fs::write(&out, bytes)
        .and_then(|()| File::open(&out)?.sync_all())
        .map_err(|e| LogError::io(&out, "save cut bytes", e))?;
    sync_dir(&out_dir)?;
    Ok(out)
}
