//! The event log on real files: round trips, torn tails at every byte, bit flips, live
//! following, group commit, repair, and the committed format-version-1 fixture.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn::log::format::{SEGMENT_HEADER_LEN, list_segments};
use cairn::log::{
    Appended, LogError, LogOptions, LogReader, LogWriter, SyncPolicy, repair, verify,
};
use cairn::record::{Envelope, Key, NewEvent, Note, Payload, PromptPurpose, PromptRecord, RunId};
use proptest::prelude::*;

fn note(i: u64, stage: &str, text: &str) -> NewEvent {
    let mut e = NewEvent::new(
        Key::builder(stage).u64(i).str(text).finish(),
        RunId(7),
        stage,
        vec![Key(i as u128)],
        i / 10,
        Payload::Note(Note {
            text: text.to_string(),
        }),
    );
    e.wall_ns = 1_000 + i;
    e
}

fn opts(sync: SyncPolicy, segment_bytes: u64) -> LogOptions {
    LogOptions {
        sync,
        segment_bytes,
        index_every: 4,
    }
}

fn write_log(dir: &Path, events: &[NewEvent], o: LogOptions) {
    let w = LogWriter::open(dir, o).expect("open writer");
    w.append_batch(events.to_vec()).expect("append");
    w.close().expect("close");
}

fn read_all(dir: &Path) -> Vec<Envelope> {
    LogReader::open(dir)
        .expect("open reader")
        .iter_from(0)
        .collect::<Result<Vec<_>, _>>()
        .expect("read")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

fn last_segment(dir: &Path) -> PathBuf {
    list_segments(dir)
        .expect("list")
        .pop()
        .expect("a segment")
        .1
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn events_round_trip_across_segments(
        texts in prop::collection::vec(".{0,300}", 1..60),
        segment_bytes in 200u64..4000,
        from in 0usize..70,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let events: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| note(i as u64, if i % 3 == 0 { "critique" } else { "sample" }, t))
            .collect();
        write_log(dir.path(), &events, opts(SyncPolicy::Explicit, segment_bytes));
        let read = read_all(dir.path());
        prop_assert_eq!(read.len(), events.len());
        for (i, (env, ev)) in read.iter().zip(&events).enumerate() {
            prop_assert_eq!(env.offset, i as u64);
            prop_assert_eq!(env.key, ev.key);
            prop_assert_eq!(&env.stage, &ev.stage);
            prop_assert_eq!(&env.parents, &ev.parents);
            prop_assert_eq!(&env.payload, &ev.payload);
            prop_assert_eq!(env.wall_ns, ev.wall_ns);
        }
        let reader = LogReader::open(dir.path()).expect("reader");
        let tail: Vec<u64> = reader.iter_from(from as u64).map(|e| e.expect("ok").offset).collect();
        let expected: Vec<u64> = (from.min(events.len()) as u64..events.len() as u64).collect();
        prop_assert_eq!(tail, expected);
        let critiques = reader.iter_stage(0, "critique").count();
        prop_assert_eq!(critiques, events.len().div_ceil(3));
        let probe = &events[from % events.len()];
        let found = reader.find_key(probe.key).expect("find").expect("present");
        prop_assert_eq!(found.offset, (from % events.len()) as u64);
        // Reopening for append keeps every key and continues the offsets.
        let w = LogWriter::open(dir.path(), opts(SyncPolicy::Explicit, segment_bytes)).expect("reopen");
        prop_assert_eq!(w.next_offset(), events.len() as u64);
        prop_assert_eq!(w.offset_of(probe.key), Some((from % events.len()) as u64));
    }
}

#[test]
fn duplicate_keys_are_not_written_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = LogWriter::open(dir.path(), opts(SyncPolicy::Always, 1 << 20)).expect("open");
    assert_eq!(
        w.append(note(1, "s", "a")).expect("append"),
        Appended::New(0)
    );
    assert_eq!(
        w.append(note(2, "s", "b")).expect("append"),
        Appended::New(1)
    );
    assert_eq!(
        w.append(note(1, "s", "a")).expect("append"),
        Appended::Existing(0)
    );
    drop(w);
    let w = LogWriter::open(dir.path(), opts(SyncPolicy::Always, 1 << 20)).expect("reopen");
    assert_eq!(
        w.append(note(2, "s", "b")).expect("append"),
        Appended::Existing(1)
    );
    assert_eq!(read_all(dir.path()).len(), 2);
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _w = LogWriter::open(dir.path(), LogOptions::default()).expect("open");
    let err = LogWriter::open(dir.path(), LogOptions::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("another writer"), "{err}");
}

/// Closing releases LOCK at once, even while the interval syncer thread still holds the writer
/// for a moment: the next writer (a rerun right after a run) always gets in.
#[test]
fn a_closed_writer_lets_the_next_one_in_immediately() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..40u64 {
        let w = LogWriter::open(
            dir.path(),
            opts(
                SyncPolicy::Interval(std::time::Duration::from_millis(1)),
                1 << 20,
            ),
        )
        .expect("the previous writer was closed");
        w.append(note(i, "sample", "x")).expect("append");
        std::thread::sleep(std::time::Duration::from_micros(500 + 50 * i));
        w.close().expect("close");
    }
}

/// Cuts the last record at every byte inside it: each complete record survives, none is
/// invented, the cut bytes are kept, and the log accepts appends afterwards.
#[test]
fn torn_tail_at_every_byte_keeps_every_complete_record() {
    let base = tempfile::tempdir().expect("tempdir");
    let original = base.path().join("original");
    let events: Vec<_> = (0..5)
        .map(|i| note(i, "sample", &"x".repeat(40 + i as usize)))
        .collect();
    write_log(&original, &events, opts(SyncPolicy::Explicit, 1 << 20));
    let seg = last_segment(&original);
    let full = std::fs::read(&seg).expect("read").len() as u64;
    // Where the last record starts: the length of a log holding only the first four.
    let four = base.path().join("four");
    write_log(&four, &events[..4], opts(SyncPolicy::Explicit, 1 << 20));
    let last_start = std::fs::read(last_segment(&four)).expect("read").len() as u64;
    assert!(last_start < full);
    for cut in last_start..full {
        let dir = base.path().join(format!("cut{cut}"));
        copy_dir(&original, &dir);
        let _ = std::fs::remove_file(dir.join("00000000000000000000.idx"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(last_segment(&dir))
            .expect("open");
        f.set_len(cut).expect("truncate");
        let read = read_all(&dir);
        assert_eq!(
            read.len(),
            4,
            "cut at {cut}: a reader stops before the torn record"
        );
        let w = LogWriter::open(&dir, opts(SyncPolicy::Always, 1 << 20)).expect("writer recovers");
        let report = w.recovery().clone();
        assert_eq!(report.records, 4, "cut at {cut}");
        if cut > last_start {
            let torn = report.torn.expect("torn tail reported");
            assert_eq!(
                (torn.pos, torn.offset, torn.bytes),
                (last_start, 4, cut - last_start)
            );
            assert_eq!(
                std::fs::read(&torn.saved_to).expect("saved").len() as u64,
                cut - last_start
            );
        } else {
            assert!(report.torn.is_none());
        }
        assert_eq!(
            w.append(events[4].clone()).expect("append"),
            Appended::New(4)
        );
        drop(w);
        assert_eq!(
            read_all(&dir),
            read_all(&original),
            "cut at {cut}: rewritten log matches"
        );
        assert!(verify(&dir).expect("verify").is_ok());
    }
}

/// Flips one bit at every byte position of a small log (and random bits over a larger one):
/// every flip is detected — as corruption, or as a torn final record — and never yields a
/// record that was not written.
#[test]
fn every_bit_flip_is_detected() {
    let base = tempfile::tempdir().expect("tempdir");
    let original = base.path().join("original");
    let events: Vec<_> = (0..6)
        .map(|i| note(i, "sample", &format!("record number {i}")))
        .collect();
    write_log(&original, &events, opts(SyncPolicy::Explicit, 1 << 20));
    let _ = std::fs::remove_file(original.join("00000000000000000000.idx"));
    let seg = last_segment(&original);
    let bytes = std::fs::read(&seg).expect("read");
    let good = read_all(&original);
    let dir = base.path().join("flip");
    copy_dir(&original, &dir);
    let flipped_seg = last_segment(&dir);
    for pos in 0..bytes.len() {
        let bit = 1u8 << (pos % 8);
        let mut damaged = bytes.clone();
        damaged[pos] ^= bit;
        std::fs::write(&flipped_seg, &damaged).expect("write");
        let report = verify(&dir).expect("verify runs");
        assert!(
            report.corruption.is_some() || report.torn.is_some(),
            "flip at byte {pos} went unnoticed"
        );
        // Whatever a reader returns is a prefix of what was written.
        let read: Vec<_> = LogReader::open(&dir)
            .expect("reader")
            .iter_from(0)
            .take_while(|r| r.is_ok())
            .map(|r| r.expect("ok"))
            .collect();
        assert!(read.len() < good.len(), "flip at {pos}");
        assert_eq!(&good[..read.len()], &read[..], "flip at {pos}");
        if pos < SEGMENT_HEADER_LEN as usize {
            let err = report.corruption.expect("header damage is corruption");
            assert!(matches!(err, LogError::BadHeader { .. }), "{err}");
        }
    }
}

#[test]
fn corruption_before_the_tail_is_a_hard_error_naming_segment_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events: Vec<_> = (0..10)
        .map(|i| note(i, "sample", "some payload text"))
        .collect();
    write_log(dir.path(), &events, opts(SyncPolicy::Explicit, 1 << 20));
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&seg, &bytes).expect("write");
    let report = verify(dir.path()).expect("verify");
    let err = report.corruption.expect("detected");
    let msg = err.to_string();
    assert!(
        msg.contains("00000000000000000000.seg") && msg.contains("record offset"),
        "{msg}"
    );
    let open = LogWriter::open(dir.path(), LogOptions::default());
    assert!(
        matches!(open, Err(LogError::Corrupt { .. })),
        "writer refuses a corrupt log"
    );

    // The CLI reports it with a non-zero exit.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["-q", "log", "verify"])
        .arg(dir.path())
        .output()
        .expect("run cairn");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("00000000000000000000.seg") && stderr.contains("corrupt at byte"),
        "{stderr}"
    );

    // Repair cuts there, keeps a copy, and leaves a log that opens and verifies.
    let kept_before = std::fs::read(&seg).expect("read");
    let r = repair(dir.path()).expect("repair");
    let (_, cut_pos) = r.cut_at.clone().expect("cut");
    assert!(r.kept_records < 10 && r.kept_records >= 4, "{r:?}");
    let saved = r.saved_to.expect("saved");
    let copy = std::fs::read_dir(&saved)
        .expect("saved dir")
        .next()
        .expect("a copy")
        .expect("entry");
    assert_eq!(
        std::fs::read(copy.path()).expect("copy"),
        kept_before[cut_pos as usize..]
    );
    assert!(verify(dir.path()).expect("verify").is_ok());
    assert_eq!(read_all(dir.path()).len() as u64, r.kept_records);
    LogWriter::open(dir.path(), LogOptions::default()).expect("opens after repair");
}

#[test]
fn a_follower_sees_every_record_once_in_order_while_the_writer_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = LogWriter::open(dir.path(), opts(SyncPolicy::Explicit, 2048)).expect("open");
    let total = 600u64;
    let w = writer.clone();
    let producer = std::thread::spawn(move || {
        for chunk in (0..total).collect::<Vec<_>>().chunks(7) {
            let batch = chunk
                .iter()
                .map(|&i| note(i, "sample", &format!("event {i}")))
                .collect();
            w.append_batch(batch).expect("append");
            std::thread::sleep(std::time::Duration::from_micros(300));
        }
    });
    let mut follower = LogReader::open(dir.path()).expect("reader").follow(0);
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while (seen.len() as u64) < total && std::time::Instant::now() < deadline {
        for env in follower
            .wait(std::time::Duration::from_millis(50))
            .expect("poll")
        {
            seen.push(env.offset);
        }
    }
    producer.join().expect("producer");
    assert_eq!(seen, (0..total).collect::<Vec<_>>());
    assert!(
        list_segments(dir.path()).expect("list").len() > 3,
        "the test must cross segments"
    );
    assert!(follower.poll().expect("poll").is_empty());
}

#[test]
fn group_commit_makes_every_concurrent_append_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer =
        Arc::new(LogWriter::open(dir.path(), opts(SyncPolicy::Always, 1 << 16)).expect("open"));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let w = Arc::clone(&writer);
            std::thread::spawn(move || {
                for i in 0..50 {
                    let a = w
                        .append(note(t * 1000 + i, "sample", "durable"))
                        .expect("append");
                    assert!(w.durable_offset() > a.offset(), "returned before durable");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(writer.durable_offset(), 200);
    assert_eq!(read_all(dir.path()).len(), 200);
}

#[test]
fn buffered_appends_from_many_threads_reach_the_files_in_offset_order() {
    // Under the buffered policies a flusher thread does the writes; appenders racing it
    // across segment rolls, syncs and a final drop (no close) must still leave every event
    // exactly once, at the offset it was given, with no gap.
    for sync in [
        SyncPolicy::Explicit,
        SyncPolicy::Interval(std::time::Duration::from_millis(1)),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = Arc::new(LogWriter::open(dir.path(), opts(sync, 4096)).expect("open"));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let w = Arc::clone(&writer);
                std::thread::spawn(move || {
                    let mut given = Vec::new();
                    for i in 0..60u64 {
                        let batch: Vec<NewEvent> = (0..1 + i % 5)
                            .map(|j| note(t * 100_000 + i * 10 + j, "s", &"z".repeat(40)))
                            .collect();
                        let keys: Vec<Key> = batch.iter().map(|e| e.key).collect();
                        let out = w.append_batch(batch).expect("append");
                        given.extend(keys.into_iter().zip(out.iter().map(|a| a.offset())));
                        if i % 17 == 0 {
                            w.sync().expect("sync");
                        }
                    }
                    given
                })
            })
            .collect();
        let mut given: Vec<(Key, u64)> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        drop(writer);
        given.sort_by_key(|&(_, o)| o);
        let read = read_all(dir.path());
        assert_eq!(read.len(), given.len(), "{sync:?}");
        for (env, (key, offset)) in read.iter().zip(&given) {
            assert_eq!((env.key, env.offset), (*key, *offset), "{sync:?}");
        }
        assert!(
            list_segments(dir.path()).expect("list").len() > 5,
            "the test must cross segments"
        );
    }
}

#[test]
fn interval_policy_syncs_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = LogWriter::open(
        dir.path(),
        opts(
            SyncPolicy::Interval(std::time::Duration::from_millis(5)),
            1 << 20,
        ),
    )
    .expect("open");
    w.append(note(0, "s", "x")).expect("append");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while w.durable_offset() < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(w.durable_offset(), 1);
}

#[test]
fn stale_or_missing_indexes_are_rebuilt_and_not_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events: Vec<_> = (0..40)
        .map(|i| note(i, "sample", "index me please"))
        .collect();
    write_log(dir.path(), &events, opts(SyncPolicy::Explicit, 600));
    let segments = list_segments(dir.path()).expect("list");
    assert!(segments.len() > 2);
    // Damage one index and delete another: reads stay right, and a writer rebuilds them.
    let idx0 = segments[0].1.with_extension("idx");
    std::fs::write(&idx0, b"garbage").expect("write");
    std::fs::remove_file(segments[1].1.with_extension("idx")).expect("rm");
    for from in [0u64, 3, 17, 39] {
        let got: Vec<u64> = LogReader::open(dir.path())
            .expect("r")
            .iter_from(from)
            .map(|e| e.expect("ok").offset)
            .collect();
        assert_eq!(got, (from..40).collect::<Vec<_>>());
    }
    let w = LogWriter::open(dir.path(), LogOptions::default()).expect("open");
    assert_eq!(w.recovery().indexes_rebuilt, 2);
    assert!(segments[1].1.with_extension("idx").exists());
}

/// A log written by format version 1, committed to the repository: later versions must read it.
#[test]
fn format_version_1_fixture_stays_readable() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v1");
    if std::env::var_os("CAIRN_REGENERATE_FIXTURES").is_some() {
        let _ = std::fs::remove_dir_all(&fixture);
        write_log(&fixture, &fixture_events(), opts(SyncPolicy::Explicit, 700));
        let _ = std::fs::remove_file(fixture.join("LOCK"));
    }
    let read = read_all(&fixture);
    let expected = fixture_events();
    assert_eq!(read.len(), expected.len());
    for (env, ev) in read.iter().zip(&expected) {
        assert_eq!(
            (env.key, &env.stage, &env.payload, env.wall_ns),
            (ev.key, &ev.stage, &ev.payload, ev.wall_ns)
        );
    }
    assert!(verify(&fixture).expect("verify").is_ok());
}

fn fixture_events() -> Vec<NewEvent> {
    let mut events: Vec<_> = (0..8)
        .map(|i| note(i, "note", &format!("fixture note {i}")))
        .collect();
    for i in 0..4u64 {
        let mut e = NewEvent::new(
            Key::builder("prompts").u64(i).finish(),
            RunId(9),
            "prompts",
            vec![],
            0,
            Payload::Prompt(PromptRecord {
                source: "fixture".into(),
                index: i,
                purpose: if i % 2 == 0 {
                    PromptPurpose::RedTeam
                } else {
                    PromptPurpose::Helpful
                },
                text: format!("prompt {i}: how do I …?"),
            }),
        );
        e.wall_ns = 5_000 + i;
        events.push(e);
    }
    // A kind from "the future": readers must skip it with a warning, not fail.
    let mut future = note(99, "future", "x");
    future.payload = Payload::Unknown {
        kind: "from_a_later_version".into(),
        body: vec![1, 2, 3, 4],
    };
    events.push(future);
    events
}

/// Child half of the SIGKILL test: appends forever with `SyncPolicy::Always`, printing each
/// offset once it is durable. Runs only when the parent test spawns it.
#[test]
fn crash_child_appends_until_killed() {
    let Some(dir) = std::env::var_os("CAIRN_CRASH_CHILD_DIR") else {
        return;
    };
    use std::io::Write;
    let w = LogWriter::open(Path::new(&dir), opts(SyncPolicy::Always, 4096)).expect("open");
    let start = w.next_offset();
    let mut out = std::io::stdout();
    for i in start.. {
        let a = w
            .append(note(i, "sample", &format!("crash test {i}")))
            .expect("append");
        writeln!(out, "durable {}", a.offset()).expect("stdout");
        out.flush().expect("flush");
    }
}

/// Kills a writer process with SIGKILL at random moments, several times over the same log:
/// every append it reported durable is there, in order, and the log always reopens.
#[test]
fn sigkill_loses_no_acknowledged_event() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked = 0u64;
    for round in 0..4u64 {
        let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "crash_child_appends_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CAIRN_CRASH_CHILD_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        // Let it get some way in (a different distance each round), then kill it mid-stream.
        let wanted = 20 + round * 37;
        let mut last = None;
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("durable ") {
                last = Some(n.parse::<u64>().expect("offset"));
                if last.is_some_and(|l| l + 1 >= acked + wanted) {
                    break;
                }
            }
        }
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let last = last.expect("child made progress");
        acked = last + 1;
        let read = read_all(dir.path());
        assert!(
            read.len() as u64 >= acked,
            "round {round}: {} < {acked}",
            read.len()
        );
        for (i, env) in read.iter().enumerate() {
            assert_eq!(env.offset, i as u64);
            assert_eq!(
                env.payload,
                Payload::Note(Note {
                    text: format!("crash test {i}")
                })
            );
        }
        let w = LogWriter::open(dir.path(), LogOptions::default()).expect("reopens after SIGKILL");
        acked = w.next_offset();
    }
}

#[test]
fn multi_window_segments_replay_the_same_way_through_every_reader() {
    // Segments of several 1 MiB read windows, with records straddling window edges and one
    // record larger than a window: the decoded iterator (pulling a record at a time), the
    // checked-frame visitor (read-ahead thread) and a reader starting mid-log all see what
    // was written; a corrupted record beyond the first window ends each of them with an
    // error naming its segment and offset, after every record before it.
    let dir = tempfile::tempdir().expect("tempdir");
    let sizes: Vec<usize> = (0..700u64)
        .map(|i| match i {
            350 => 1_500_000,
            _ => 500 + (i as usize * 7919) % 9000,
        })
        .collect();
    let events: Vec<NewEvent> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| note(i as u64, "s", &"w".repeat(n)))
        .collect();
    write_log(dir.path(), &events, opts(SyncPolicy::Explicit, 3 << 20));
    let segments = list_segments(dir.path()).expect("list");
    assert!(segments.len() >= 2, "the test must cross segments");
    let seg_len = std::fs::metadata(&segments[0].1).expect("meta").len();
    assert!(seg_len > 3 * cairn::log::READ_WINDOW as u64);

    let reader = LogReader::open(dir.path()).expect("reader");
    let decoded = read_all(dir.path());
    assert_eq!(decoded.len(), events.len());
    for (env, ev) in decoded.iter().zip(&events) {
        assert_eq!((env.key, &env.payload), (ev.key, &ev.payload));
    }
    let mut visited = Vec::new();
    reader
        .visit_frames(0, |segment, pos, offset, _| {
            visited.push((offset, segment.to_path_buf(), pos));
            Ok(true)
        })
        .expect("frames");
    assert_eq!(visited.len(), events.len());
    assert!(
        visited
            .iter()
            .enumerate()
            .all(|(i, (o, _, _))| *o == i as u64)
    );
    let tail: Vec<u64> = reader
        .iter_from(500)
        .map(|e| e.expect("event").offset)
        .collect();
    assert_eq!(tail, (500..events.len() as u64).collect::<Vec<_>>());

    // Corrupt the payload of a record well past the first window of segment 0.
    let (bad_offset, _, bad_pos) = visited
        .iter()
        .find(|(_, seg, pos)| *seg == segments[0].1 && *pos > cairn::log::READ_WINDOW as u64 + 100)
        .cloned()
        .expect("a record past the first window");
    let mut bytes = std::fs::read(&segments[0].1).expect("read");
    bytes[bad_pos as usize + 40] ^= 0x01;
    std::fs::write(&segments[0].1, &bytes).expect("write");
    let results: Vec<_> = LogReader::open(dir.path())
        .expect("reader")
        .iter_from(0)
        .collect();
    assert_eq!(results.len() as u64, bad_offset + 1);
    assert!(results[..bad_offset as usize].iter().all(|r| r.is_ok()));
    let err = results[bad_offset as usize]
        .as_ref()
        .expect_err("the corrupt record")
        .to_string();
    assert!(
        err.contains(&segments[0].1.display().to_string())
            && err.contains(&format!("offset {bad_offset}")),
        "{err}"
    );
    let mut seen = 0u64;
    let err = LogReader::open(dir.path())
        .expect("reader")
        .visit_frames(0, |_, _, _, _| {
            seen += 1;
            Ok(true)
        })
        .expect_err("the corrupt record")
        .to_string();
    assert_eq!(seen, bad_offset);
    assert!(err.contains(&format!("offset {bad_offset}")), "{err}");
}

#[test]
fn log_cat_follow_follows_every_partition_of_a_multi_worker_log() {
    // A partitioned log (`part-0000/`, `part-0001/`, as `cairn run --workers 2` writes) with a
    // writer still appending to the second partition: `cairn log cat --follow` prints the
    // events of both, including those appended after it started.
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let (p0, p1) = (dir.path().join("part-0000"), dir.path().join("part-0001"));
    write_log(
        &p0,
        &[note(0, "a", "first"), note(1, "a", "second")],
        LogOptions::default(),
    );
    let live = LogWriter::open(&p1, opts(SyncPolicy::Explicit, 1 << 20)).expect("open");
    live.append(note(10, "b", "early")).expect("append");
    live.sync().expect("sync");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["-q", "log", "cat", "--follow"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run cairn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.expect("line")).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut appended = false;
    while lines.len() < 4 && std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            lines.push(line);
        }
        if lines.len() == 3 && !appended {
            live.append(note(11, "b", "late")).expect("append");
            live.sync().expect("sync");
            appended = true;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(lines.len(), 4, "{lines:?}");
    for text in ["first", "second", "early", "late"] {
        assert!(
            lines.iter().any(|l| l.contains(text)),
            "{text} missing: {lines:?}"
        );
    }
}
