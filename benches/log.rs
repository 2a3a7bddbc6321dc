//! Event-log throughput against raw file I/O doing the same work, measured in the same run.
//!
//! - `log_append/<policy>/<size>`: `LogWriter::append_batch` of 16 `note` events of 200 B or
//!   4 KiB text per iteration under `always`, `20ms` and `explicit` sync policies (`log`),
//!   against `raw`: one plain `write` of the same number of framed bytes per batch with the
//!   same `fdatasync` cadence (after every batch; from a thread every 20 ms; once at the end).
//!   Building the events is not timed; the final sync of `20ms` and `explicit` is.
//!   Throughput counts framed bytes (frame header + envelope), which both sides write.
//! - `log_read/<size>`: replaying a log of about 64 MiB from the page cache with
//!   `LogReader::visit_frames(0, ..)` (checked frames, no copies) and `iter_from(0)` (decoded
//!   envelopes), against two raw reads of the same segment files: `raw` (`std::fs::read`, the
//!   whole file into a fresh buffer of its size) and `raw_stream` (`read` calls of the
//!   reader's window size, 1 MiB, into one reused buffer: the cheapest plain sequential read,
//!   and the one the reader itself does).
//!
//! Logs live in a scratch directory under `target/` so that `fdatasync` reaches a real disk
//! (the run prints the file system it found). After the criterion groups, a summary of
//! log/raw ratios (medians of interleaved runs) goes to stderr; it is skipped by
//! `cargo test --benches`, `--test`, `--list`, `--profile-time` and `CAIRN_BENCH_SUMMARY=0`.
//!
//! ```text
//! cargo bench --bench log                 # criterion groups, then the ratio summary (~70 s)
//! CAIRN_BENCH_SUMMARY=0 cargo bench --bench log -- log_read   # one family, no summary
//! ```

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn::log::format::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, list_segments};
use cairn::log::{LogOptions, LogReader, LogWriter, SyncPolicy};
use cairn::record::{Key, NewEvent, Note, Payload, RunId};
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use tempfile::TempDir;

/// Events per `append_batch` call (and per raw `write`).
const BATCH: usize = 16;
/// Batches built ahead of each timed stretch (keeps event construction out of the timing).
const CHUNK: u64 = 64;
/// Background sync period of the `Interval` policy and of its raw baseline.
const INTERVAL: Duration = Duration::from_millis(20);
/// Note text sizes.
const SIZES: [(&str, usize); 2] = [("200B", 200), ("4KiB", 4096)];
/// Size of the log replayed by the read benchmarks.
const READ_LOG_BYTES: u64 = 64 << 20;

#[derive(Clone, Copy)]
enum Policy {
    Always,
    Interval,
    Explicit,
}

impl Policy {
    const ALL: [Policy; 3] = [Policy::Always, Policy::Interval, Policy::Explicit];

    fn name(self) -> &'static str {
        match self {
            Policy::Always => "always",
            Policy::Interval => "20ms",
            Policy::Explicit => "explicit",
        }
    }

    fn sync(self) -> SyncPolicy {
        match self {
            Policy::Always => SyncPolicy::Always,
            Policy::Interval => SyncPolicy::Interval(INTERVAL),
            Policy::Explicit => SyncPolicy::Explicit,
        }
    }
}

/// Where logs and raw files go: under `target/`, i.e. on the disk holding the build.
fn scratch_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scratch");
    std::fs::create_dir_all(&root).expect("create target/bench-scratch");
    root
}

fn scratch() -> TempDir {
    tempfile::tempdir_in(scratch_root()).expect("create a scratch directory")
}

/// The file system type of the mount holding `path` (from `/proc/self/mounts`).
fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_string()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, kind)| kind)
}

fn event(serial: u64, text: &str) -> NewEvent {
    NewEvent::new(
        Key::builder("bench").u64(serial).finish(),
        RunId(1),
        "bench",
        vec![],
        serial / 1000,
        Payload::Note(Note { text: text.into() }),
    )
}

/// Bytes one event of `size` bytes of text takes in a segment: frame header + envelope.
/// Every field of the envelope is fixed-width or of a fixed length here, so this is exact.
fn frame_len(size: usize) -> u64 {
    let envelope = event(0, &"x".repeat(size)).at_offset(0);
    (FRAME_HEADER_LEN + envelope.encode().len()) as u64
}

/// Total size of the segment files of a log, headers included.
fn segment_bytes(dir: &Path) -> u64 {
    list_segments(dir)
        .expect("list segments")
        .iter()
        .map(|(_, p)| std::fs::metadata(p).expect("segment metadata").len())
        .sum()
}

/// Time spent in one append run: in the appends (syncs under `always` included) and in the
/// final sync (none under `always`).
#[derive(Clone, Copy)]
struct Timing {
    appends: Duration,
    sync: Duration,
}

impl Timing {
    fn total(self) -> Duration {
        self.appends + self.sync
    }
}

/// Appends `batches` batches of `size`-byte notes to a fresh log, then syncs.
fn run_log(policy: Policy, size: usize, batches: u64) -> Timing {
    let dir = scratch();
    let path = dir.path().join("log");
    let opts = LogOptions {
        sync: policy.sync(),
        ..LogOptions::default()
    };
    let writer = LogWriter::open(&path, opts).expect("open log");
    let text = "x".repeat(size);
    let mut serial = 0u64;
    let mut appends = Duration::ZERO;
    let mut done = 0;
    while done < batches {
        let n = CHUNK.min(batches - done);
        let chunk: Vec<Vec<NewEvent>> = (0..n)
            .map(|_| {
                (0..BATCH)
                    .map(|_| {
                        serial += 1;
                        event(serial, &text)
                    })
                    .collect()
            })
            .collect();
        let start = Instant::now();
        for batch in chunk {
            black_box(writer.append_batch(batch).expect("append"));
        }
        appends += start.elapsed();
        done += n;
    }
    let start = Instant::now();
    if !matches!(policy, Policy::Always) {
        writer.sync().expect("sync");
    }
    let sync = start.elapsed();
    writer.close().expect("close");
    drop(writer);
    // The raw baseline writes exactly what the log wrote (segment headers aside).
    let segments = list_segments(&path).expect("list segments").len() as u64;
    assert_eq!(
        segment_bytes(&path) - segments * SEGMENT_HEADER_LEN,
        batches * BATCH as u64 * frame_len(size),
        "frame size calibration is off"
    );
    Timing { appends, sync }
}

/// The baseline of [`run_log`]: `batches` sequential `write`s of `batch_bytes` each to a
/// plain file, with `fdatasync` at the policy's cadence.
fn run_raw(policy: Policy, batch_bytes: u64, batches: u64) -> Timing {
    let dir = scratch();
    let file = Arc::new(File::create(dir.path().join("raw")).expect("create raw file"));
    let buf = vec![0x5au8; batch_bytes as usize];
    let stop = Arc::new(AtomicBool::new(false));
    // Mirrors the log's background syncer: sleep for the interval, then fdatasync.
    let syncer = matches!(policy, Policy::Interval).then(|| {
        let (file, stop) = (Arc::clone(&file), Arc::clone(&stop));
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(INTERVAL);
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                file.sync_data().expect("fdatasync");
            }
        })
    });
    let mut appends = Duration::ZERO;
    let mut done = 0;
    while done < batches {
        let n = CHUNK.min(batches - done);
        let start = Instant::now();
        for _ in 0..n {
            (&*file).write_all(black_box(&buf)).expect("write");
            if matches!(policy, Policy::Always) {
                file.sync_data().expect("fdatasync");
            }
        }
        appends += start.elapsed();
        done += n;
    }
    let start = Instant::now();
    if !matches!(policy, Policy::Always) {
        file.sync_data().expect("fdatasync");
    }
    let sync = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = syncer {
        t.join().expect("syncer thread");
    }
    Timing { appends, sync }
}

/// A log of about `bytes` bytes of `size`-byte notes for the read benchmarks, read once so
/// that the page cache is warm.
fn build_read_log(size: usize, bytes: u64) -> TempDir {
    let dir = scratch();
    let opts = LogOptions {
        sync: SyncPolicy::Explicit,
        ..LogOptions::default()
    };
    let writer = LogWriter::open(dir.path(), opts).expect("open log");
    let text = "x".repeat(size);
    let events = bytes / frame_len(size);
    let mut serial = 0;
    while serial < events {
        let n = (BATCH as u64).min(events - serial);
        let batch = (0..n)
            .map(|_| {
                serial += 1;
                event(serial, &text)
            })
            .collect();
        writer.append_batch(batch).expect("append");
    }
    writer.close().expect("close");
    drop(writer);
    read_raw(dir.path());
    dir
}

/// Replays a log as checked frames; returns the number of payload bytes seen.
fn read_frames(dir: &Path) -> u64 {
    let reader = LogReader::open(dir).expect("open reader");
    let mut total = 0u64;
    reader
        .visit_frames(0, |_, _, _, payload| {
            total += payload.len() as u64;
            Ok(true)
        })
        .expect("frames");
    total
}

/// Replays a log as decoded envelopes; returns the number of events.
fn read_decoded(dir: &Path) -> u64 {
    let reader = LogReader::open(dir).expect("open reader");
    reader
        .iter_from(0)
        .map(|e| {
            black_box(e.expect("event"));
            1
        })
        .sum()
}

/// The read baseline: each segment file read whole into a buffer of its size.
fn read_raw(dir: &Path) -> u64 {
    list_segments(dir)
        .expect("list segments")
        .iter()
        .map(|(_, p)| black_box(std::fs::read(p).expect("read segment")).len() as u64)
        .sum()
}

/// The streamed read baseline: each segment read front to back in windows of the reader's
/// size into one reused buffer, bytes untouched.
fn read_raw_stream(dir: &Path) -> u64 {
    use std::io::Read;
    let mut buf = vec![0u8; cairn::log::READ_WINDOW];
    let mut total = 0u64;
    for (_, p) in list_segments(dir).expect("list segments") {
        let mut f = File::open(&p).expect("open segment");
        loop {
            let n = f.read(&mut buf).expect("read segment");
            if n == 0 {
                break;
            }
            total += black_box(&buf[..n]).len() as u64;
        }
    }
    total
}

fn append_benches(c: &mut Criterion) {
    for policy in Policy::ALL {
        for (label, size) in SIZES {
            let batch_bytes = BATCH as u64 * frame_len(size);
            let mut group = c.benchmark_group(format!("log_append/{}/{label}", policy.name()));
            configure(&mut group);
            group.throughput(Throughput::Bytes(batch_bytes));
            group.bench_function("log", |b| {
                b.iter_custom(|iters| run_log(policy, size, iters).total())
            });
            group.bench_function("raw", |b| {
                b.iter_custom(|iters| run_raw(policy, batch_bytes, iters).total())
            });
            group.finish();
        }
    }
}

fn read_benches(c: &mut Criterion, log_bytes: u64) {
    for (label, size) in SIZES {
        let log = build_read_log(size, log_bytes);
        let dir = log.path();
        let mut group = c.benchmark_group(format!("log_read/{label}"));
        configure(&mut group);
        group.throughput(Throughput::Bytes(segment_bytes(dir)));
        group.bench_function("frames", |b| b.iter(|| read_frames(dir)));
        group.bench_function("decoded", |b| b.iter(|| read_decoded(dir)));
        group.bench_function("raw", |b| b.iter(|| read_raw(dir)));
        group.bench_function("raw_stream", |b| b.iter(|| read_raw_stream(dir)));
        group.finish();
    }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

/// `n` runs each of `log` and `raw`, interleaved so that drift hits both alike.
fn runs<T>(n: usize, mut log: impl FnMut() -> T, mut raw: impl FnMut() -> T) -> (Vec<T>, Vec<T>) {
    (0..n).map(|_| (log(), raw())).unzip()
}

/// Median in seconds of one part of the runs.
fn median<T>(runs: &[T], part: impl Fn(&T) -> Duration) -> f64 {
    let mut secs: Vec<f64> = runs.iter().map(|t| part(t).as_secs_f64()).collect();
    secs.sort_by(f64::total_cmp);
    secs[secs.len() / 2]
}

/// One summary line: throughputs of `bytes` in `log` and `raw` seconds and their ratio.
fn line(what: &str, bytes: u64, log: f64, raw: f64, target: f64) -> String {
    let mbps = |secs: f64| bytes as f64 / secs / 1e6;
    let ratio = raw / log;
    format!(
        "{what:<22} log {:>7.1} MB/s  raw {:>7.1} MB/s  ratio {ratio:.3} ({} {target})",
        mbps(log),
        mbps(raw),
        if ratio >= target { "meets" } else { "MISSES" },
    )
}

/// Log/raw throughput ratios from our own timing (criterion reports no ratios).
fn summary() {
    let root = scratch_root();
    eprintln!(
        "\n== cairn event log vs raw I/O: medians of interleaved runs; scratch {} ({}) ==",
        root.display(),
        fs_type(&root)
    );
    let framed: Vec<String> = SIZES
        .iter()
        .map(|&(label, size)| format!("{label} note = {} B framed", frame_len(size)))
        .collect();
    eprintln!("{BATCH} events per batch; {}", framed.join(", "));
    for policy in Policy::ALL {
        for (label, size) in SIZES {
            let batch_bytes = BATCH as u64 * frame_len(size);
            // `always`: 9 runs of 100 synced batches (short runs, finely interleaved, because
            // fsync latency drifts with other disk traffic); otherwise 5 runs of ~32 MiB.
            let (n, batches) = match policy {
                Policy::Always => (9, 100),
                _ => (5, (32 << 20) / batch_bytes),
            };
            let bytes = batches * batch_bytes;
            let (log, raw) = runs(
                n,
                || run_log(policy, size, batches),
                || run_raw(policy, batch_bytes, batches),
            );
            let what = format!("append {} {label}", policy.name());
            let total = |t: &Timing| t.total();
            let mut out = line(&what, bytes, median(&log, total), median(&raw, total), 0.8);
            if !matches!(policy, Policy::Always) {
                // The final fdatasync writes back everything at disk speed for both sides;
                // the ratio of the append phase alone shows the log's CPU overhead.
                let appends = |t: &Timing| t.appends;
                let (l, r) = (median(&log, appends), median(&raw, appends));
                out += &format!(
                    "  [appends only: log {:.0} MB/s, raw {:.0} MB/s, ratio {:.3}]",
                    bytes as f64 / l / 1e6,
                    bytes as f64 / r / 1e6,
                    r / l
                );
            }
            eprintln!("{out}");
        }
    }
    for (label, size) in SIZES {
        let log = build_read_log(size, READ_LOG_BYTES);
        let dir = log.path();
        let bytes = segment_bytes(dir);
        for (what, read) in [
            ("frames", read_frames as fn(&Path) -> u64),
            ("decoded", read_decoded),
        ] {
            for (baseline, raw_read) in [
                ("whole-file read", read_raw as fn(&Path) -> u64),
                ("streamed read", read_raw_stream),
            ] {
                let (log, raw) = runs(5, || timed(|| read(dir)), || timed(|| raw_read(dir)));
                let what = format!("read {what} {label}");
                let (l, r) = (median(&log, |d| *d), median(&raw, |d| *d));
                eprintln!("{}  [raw = {baseline}]", line(&what, bytes, l, r, 0.9));
            }
        }
    }
}

fn timed(f: impl FnOnce() -> u64) -> Duration {
    let start = Instant::now();
    black_box(f());
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    // Criterion's own rule: without `--bench` (as under `cargo test --benches`) or with
    // `--test` it runs each benchmark once as a test; `--list` runs nothing; under
    // `--profile-time` it runs without measuring, for a profiler.
    let measuring = has("--bench") && !has("--test") && !has("--list") && !has("--profile-time");
    let summarise = measuring && std::env::var("CAIRN_BENCH_SUMMARY").as_deref() != Ok("0");
    let mut c = Criterion::default().configure_from_args();
    append_benches(&mut c);
    read_benches(&mut c, if measuring { READ_LOG_BYTES } else { 1 << 20 });
    c.final_summary();
    if summarise {
        summary();
    }
}
