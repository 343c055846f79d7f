//! Tests of snapshots as files. Memory is bounded by construction, which no test can measure
//! reliably (RSS is noisy): the sender reads only the bytes asked for (`read_exact_at` into a
//! buffer of the chunk's length) and checksums files through a fixed buffer; the receiver
//! buffers only the header and writes file bytes straight through. No code here or there reads
//! a file to its end into memory.

use super::install::{ingest, install_dir_name, install_root, read_intent, stage};
use super::*;
use crate::keys::meta_key;
use flotilla_raft::{Membership, NodeId, StoredMembership};

const G: GroupId = GroupId(7);

fn open(dir: &Path) -> Store {
    Store::open(dir).expect("open store")
}

fn key(i: usize) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

/// A value of ~100 bytes that does not compress to nothing (so files fill up).
fn value(i: usize) -> Vec<u8> {
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..96 + i % 9)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn range(from: usize, to: usize) -> KeyRange {
    KeyRange { start: key(from), end: Some(key(to)) }
}

fn put(store: &Store, pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) {
    let ops = pairs.into_iter().map(|(k, v)| Op::Put(CF_DATA, k, v)).collect();
    write_synced(store, ops).expect("put");
}

fn set_applied(store: &Store, g: GroupId, at: LogId, voters: &[u64]) {
    let applied = AppliedRecord {
        last_applied: Some(at),
        membership: StoredMembership { log_id: at, membership: Membership::new(voters.iter().map(|n| NodeId(*n))) },
    };
    let op = Op::Put(CF_RAFT, group_key(g, KIND_APPLIED).to_vec(), encode(&applied).expect("encode"));
    write_synced(store, vec![op]).expect("applied");
}

fn applied(store: &Store, g: GroupId) -> AppliedRecord {
    let raw = store.db().get_cf(store.cf(CF_RAFT).expect("cf"), group_key(g, KIND_APPLIED)).expect("read");
    decode(&raw.expect("applied record"), || "applied".into()).expect("decode")
}

fn set_descriptor(store: &Store, g: GroupId, range: &KeyRange) {
    let desc = GroupDescriptor { range: range.clone(), initial: None };
    write_synced(store, vec![Op::Put(CF_META, meta_key(g).to_vec(), encode(&desc).expect("encode"))]).expect("desc");
}

fn descriptor(store: &Store, g: GroupId) -> GroupDescriptor {
    let raw = store.db().get_cf(store.cf(CF_META).expect("cf"), meta_key(g)).expect("read");
    decode(&raw.expect("descriptor"), || "descriptor".into()).expect("decode")
}

fn all_data(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .db()
        .iterator_cf(store.cf(CF_DATA).expect("cf"), IteratorMode::Start)
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("iterate"))
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

/// The sender: keys 0..3000, group G applied at 3/500 with voters 1, 2, 3.
fn sender(dir: &Path) -> Store {
    let s = open(dir);
    put(&s, (0..3000).map(|i| (key(i), value(i))));
    set_applied(&s, G, LogId::new(3, 500), &[1, 2, 3]);
    s
}

/// The receiver: old keys in the range (some the snapshot has, with other values, some it
/// lacks), keys on both sides of it, and G's descriptor and applied record at 1/20.
fn receiver(dir: &Path, group_range: &KeyRange) -> Store {
    let s = open(dir);
    let mut pairs = vec![(b"a-outside".to_vec(), b"left".to_vec()), (b"z-outside".to_vec(), b"right".to_vec())];
    pairs.extend((400..3100).step_by(7).map(|i| (key(i), b"old".to_vec())));
    pairs.push((b"k01000-not-in-snapshot".to_vec(), b"old".to_vec()));
    // A key in every gap between the sender's keys: wherever a file of the snapshot ends, the
    // receiver has a key there that the files' range deletions must clear.
    pairs.extend((400..3100).map(|i| ([key(i), b"-gap".to_vec()].concat(), b"old".to_vec())));
    put(&s, pairs);
    set_descriptor(&s, G, group_range);
    set_applied(&s, G, LogId::new(1, 20), &[1, 2]);
    s
}

/// Chunk lengths of every size class, in a cycle.
const ODD_CHUNKS: [u64; 7] = [1, 7, 333, 4096, 65_537, 13, 20_000];

/// Streams `built` into a new transfer on `to`, chunk lengths cycling through `chunks`.
fn transfer(built: &BuiltSnapshot, meta: &SnapshotMeta, to: &Store, chunks: &[u64]) -> ReceivedSnapshot {
    let mut rx = ReceivingSnapshot::begin(to, G, meta).expect("begin");
    let mut offset = 0;
    for len in chunks.iter().cycle() {
        if offset == meta.size_bytes {
            break;
        }
        let len = (*len).min(meta.size_bytes - offset);
        rx.write(offset, &built.read(offset, len).expect("read")).expect("write");
        offset += len;
    }
    rx.finish().expect("finish")
}

/// What the receiver must hold after installing the sender's snapshot of `r`: its keys in `r`,
/// its own keys outside.
fn expected(sender: &Store, receiver_before: &[(Vec<u8>, Vec<u8>)], r: &KeyRange) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<_> = receiver_before.iter().filter(|(k, _)| !r.contains(k)).cloned().collect();
    out.extend(all_data(sender).into_iter().filter(|(k, _)| r.contains(k)));
    out.sort();
    out
}

#[test]
fn round_trip_over_many_files_in_odd_chunks() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let snap_range = range(500, 2500);
    let (meta, built) = BuiltSnapshot::build(&s, G, &snap_range, 41, 16 << 10).expect("build");
    assert!(built.files.len() >= 5, "several files: {}", built.files.len());
    assert_eq!(meta.size_bytes, built.size_bytes());
    assert_eq!(meta.last_log_id, LogId::new(3, 500));
    assert_eq!(meta.snapshot_id, 41);
    let before = all_data(&r);
    let received = transfer(&built, &meta, &r, &ODD_CHUNKS);
    assert_eq!(received.range(), &snap_range);
    let adopted = install(&r, G, &KeyRange::all(), received).expect("install");
    assert_eq!(adopted, snap_range);
    assert_eq!(all_data(&r), expected(&s, &before, &snap_range));
    assert!(all_data(&r).iter().any(|(k, v)| k == b"a-outside" && v == b"left"));
    assert!(!all_data(&r).iter().any(|(k, _)| k == b"k01000-not-in-snapshot"));
    let got = applied(&r, G);
    assert_eq!(got.last_applied, Some(LogId::new(3, 500)));
    assert_eq!(got.membership, meta.membership);
    // The group's range narrowed to the snapshot's; nothing is left behind.
    assert_eq!(descriptor(&r, G).range, snap_range);
    assert!(files_in(&install_root(&r)).is_empty() && files_in(r.scratch_dir()).is_empty());
    assert!(read_intent(&r, G).expect("read").is_none());
    // Survives a restart: the ingested files are the database's own now.
    drop(r);
    assert_eq!(all_data(&open(b.path())), expected(&s, &before, &snap_range));
}

#[test]
fn an_unbounded_range_in_one_file_round_trips() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, &KeyRange::all(), 1, 64 << 20).expect("build");
    assert_eq!(built.files.len(), 1);
    let before = all_data(&r);
    let received = transfer(&built, &meta, &r, &[meta.size_bytes]);
    install(&r, G, &KeyRange::all(), received).expect("install");
    assert_eq!(all_data(&r), expected(&s, &before, &KeyRange::all()));
}

#[test]
fn an_empty_range_round_trips() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let empty = KeyRange { start: b"k00500-".to_vec(), end: Some(b"k00501".to_vec()) };
    put(&r, [(b"k00500-x".to_vec(), b"old".to_vec())]);
    let (meta, built) = BuiltSnapshot::build(&s, G, &empty, 2, 1 << 10).expect("build");
    assert!(built.files.is_empty());
    let before = all_data(&r);
    let received = transfer(&built, &meta, &r, &ODD_CHUNKS);
    assert_eq!(install(&r, G, &KeyRange::all(), received).expect("install"), empty);
    let after = all_data(&r);
    assert!(!after.iter().any(|(k, _)| k == b"k00500-x"), "the old key in the range is gone");
    assert_eq!(after, expected(&s, &before, &empty));
    assert_eq!(applied(&r, G).last_applied, Some(LogId::new(3, 500)));
    assert!(files_in(&install_root(&r)).is_empty());
}

#[test]
fn a_lost_or_repeated_chunk_is_refused_and_the_transfer_goes_on() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, &range(0, 3000), 3, 32 << 10).expect("build");
    let mut rx = ReceivingSnapshot::begin(&r, G, &meta).expect("begin");
    rx.write(0, &built.read(0, 1000).expect("read")).expect("first chunk");
    // Lost: the chunk at 1000 never came.
    let gap = rx.write(2000, &built.read(2000, 1000).expect("read")).expect_err("gap");
    assert!(gap.to_string().contains("offset 2000, expected offset 1000"), "{gap}");
    assert!(matches!(gap, SnapshotError::Refused(_)), "a lost chunk is a refusal, not a storage failure");
    // Repeated: the first chunk again.
    let dup = rx.write(0, &built.read(0, 1000).expect("read")).expect_err("duplicate");
    assert!(dup.to_string().contains("offset 0, expected offset 1000"), "{dup}");
    // Past the end.
    let past = rx.write(1000, &vec![0; meta.size_bytes as usize]).expect_err("past the end");
    assert!(past.to_string().contains("past the snapshot's size"), "{past}");
    // None of those changed anything: the sender goes on from where the receiver is.
    assert_eq!(rx.received_bytes(), 1000);
    let mut offset = rx.received_bytes();
    while offset < meta.size_bytes {
        let len = 50_000.min(meta.size_bytes - offset);
        rx.write(offset, &built.read(offset, len).expect("read")).expect("write");
        offset += len;
    }
    install(&r, G, &KeyRange::all(), rx.finish().expect("finish")).expect("install");
    assert_eq!(applied(&r, G).last_applied, Some(LogId::new(3, 500)));
}

#[test]
fn an_incomplete_transfer_does_not_finish() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, &range(0, 3000), 3, 32 << 10).expect("build");
    let mut rx = ReceivingSnapshot::begin(&r, G, &meta).expect("begin");
    rx.write(0, &built.read(0, meta.size_bytes - 1).expect("read")).expect("write");
    let err = rx.finish().expect_err("one byte short");
    assert!(err.to_string().contains(&format!("{} of {} bytes", meta.size_bytes - 1, meta.size_bytes)), "{err}");
    assert!(files_in(r.scratch_dir()).is_empty());
}

/// The whole stream of `built`, for tests that corrupt it (small snapshots only).
fn stream(built: &BuiltSnapshot) -> Vec<u8> {
    built.read(0, built.size_bytes()).expect("read").to_vec()
}

#[test]
fn a_corrupt_file_is_refused_at_its_last_byte() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, &range(0, 3000), 4, 16 << 10).expect("build");
    assert!(built.files.len() >= 3);
    let mut bytes = stream(&built);
    // Flip a byte in the middle of file 1.
    let file1_start = built.header.len() as u64 + built.files[0].1;
    let file1_end = file1_start + built.files[1].1;
    bytes[(file1_start + built.files[1].1 / 2) as usize] ^= 0x20;
    let mut rx = ReceivingSnapshot::begin(&r, G, &meta).expect("begin");
    let chunk = 1000u64;
    let mut offset = 0;
    let err = loop {
        let len = chunk.min(meta.size_bytes - offset);
        match rx.write(offset, &bytes[offset as usize..(offset + len) as usize]) {
            Ok(()) => offset += len,
            Err(e) => break e,
        }
    };
    // Refused by the chunk carrying file 1's last byte, not before.
    assert!(offset < file1_end && file1_end <= offset + chunk, "refused at {offset}, file 1 ends at {file1_end}");
    let m = &err.to_string();
    assert!(m.contains("file 1") && m.contains("corrupt") && m.contains("the header says"), "{err}");
    let (good, bad) = (
        crc32c::crc32c(&stream(&built)[file1_start as usize..file1_end as usize]),
        crc32c::crc32c(&bytes[file1_start as usize..file1_end as usize]),
    );
    assert!(m.contains(&format!("{bad:08x}")) && m.contains(&format!("{good:08x}")), "{err}");
    // The transfer is over: later chunks are refused, and dropping it removes its files.
    assert!(rx.write(offset, &[0]).expect_err("broken").to_string().contains("start again"));
    assert!(!files_in(r.scratch_dir()).is_empty());
    drop(rx);
    assert!(files_in(r.scratch_dir()).is_empty());
}

#[test]
fn a_corrupt_header_is_refused() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, &range(0, 3000), 5, 16 << 10).expect("build");
    let header_len = built.header.len();
    let write_all = |bytes: &[u8]| {
        let mut rx = ReceivingSnapshot::begin(&r, G, &meta).expect("begin");
        let mut offset = 0;
        for piece in bytes.chunks(3) {
            rx.write(offset, piece)?;
            offset += piece.len() as u64;
        }
        Ok::<_, SnapshotError>(rx.received_bytes())
    };
    // A byte of the manifest: its checksum catches it once the header is whole.
    let mut bytes = stream(&built);
    bytes[header_len - 2] ^= 0x01;
    let err = write_all(&bytes).expect_err("corrupt manifest");
    assert!(err.to_string().contains("header") && err.to_string().contains("checksum mismatch"), "{err}");
    // The format version.
    let mut bytes = stream(&built);
    bytes[0] = 9;
    let err = write_all(&bytes).expect_err("unknown version");
    assert!(err.to_string().contains("stream format version 9"), "{err}");
    // The header's length.
    let mut bytes = stream(&built);
    bytes[1] = 0xff;
    let err = write_all(&bytes).expect_err("huge header");
    assert!(err.to_string().contains("corrupt header"), "{err}");
    // A header that does not add up to the meta's size.
    let mut other = meta.clone();
    other.size_bytes += 1;
    let mut rx = ReceivingSnapshot::begin(&r, G, &other).expect("begin");
    let err = rx.write(0, &stream(&built)[..header_len]).expect_err("size mismatch");
    assert!(err.to_string().contains(&format!("the snapshot's size is {}", other.size_bytes)), "{err}");
    assert!(files_in(r.scratch_dir()).is_empty());
}

#[test]
fn a_sender_builds_again_after_dropping_its_snapshot() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, &range(100, 2900), 6, 16 << 10).expect("build");
    let first = stream(&built);
    // Reads past the end are errors; a read at the end of nothing is not.
    let err = built.read(meta.size_bytes - 10, 11).expect_err("past the end");
    assert!(err.message.contains("past the snapshot's end"), "{err}");
    assert!(built.read(u64::MAX, 2).is_err());
    assert!(built.read(meta.size_bytes, 0).expect("empty read").is_empty());
    let mut rx = ReceivingSnapshot::begin(&r, G, &meta).expect("begin");
    rx.write(0, &first[..5000]).expect("write");
    // The sender restarts: its files are gone, and a new build of the same state streams the
    // same bytes apart from its id.
    drop(built);
    assert!(files_in(s.scratch_dir()).is_empty());
    drop(rx);
    let (meta2, built2) = BuiltSnapshot::build(&s, G, &range(100, 2900), 7, 16 << 10).expect("build again");
    assert_eq!((meta2.size_bytes, meta2.last_log_id), (meta.size_bytes, meta.last_log_id));
    let received = transfer(&built2, &meta2, &r, &ODD_CHUNKS);
    install(&r, G, &KeyRange::all(), received).expect("install");
    assert_eq!(applied(&r, G).last_applied, Some(LogId::new(3, 500)));
}

#[test]
fn a_receiver_crash_mid_transfer_leaves_no_files() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, &range(0, 3000), 8, 16 << 10).expect("build");
    let half = meta.size_bytes / 2;
    // Dropped half-way: its files go at once.
    let mut rx = ReceivingSnapshot::begin(&r, G, &meta).expect("begin");
    rx.write(0, &built.read(0, half).expect("read")).expect("write");
    assert!(!files_in(r.scratch_dir()).is_empty());
    drop(rx);
    assert!(files_in(r.scratch_dir()).is_empty());
    // A crash half-way (no drop runs): the next open empties scratch.
    let mut rx = ReceivingSnapshot::begin(&r, G, &meta).expect("begin");
    rx.write(0, &built.read(0, half).expect("read")).expect("write");
    std::mem::forget(rx);
    assert!(!files_in(r.scratch_dir()).is_empty());
    drop(r);
    let r = open(b.path());
    assert!(files_in(r.scratch_dir()).is_empty());
    assert!(files_in(&install_root(&r)).is_empty());
}

#[test]
fn a_snapshot_outside_the_groups_range_is_refused_and_removed() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let narrow = range(1000, 2000);
    let (s, r) = (sender(a.path()), receiver(b.path(), &narrow));
    let (meta, built) = BuiltSnapshot::build(&s, G, &range(500, 2500), 9, 16 << 10).expect("build");
    let before = all_data(&r);
    let received = transfer(&built, &meta, &r, &ODD_CHUNKS);
    let err = install(&r, G, &narrow, received).expect_err("wider than the group");
    assert!(err.message.contains("outside the group's"), "{err}");
    assert_eq!(all_data(&r), before);
    assert!(files_in(r.scratch_dir()).is_empty() && files_in(&install_root(&r)).is_empty());
}

/// A receiver at the point of installing the sender's snapshot of keys 500..2500: the
/// receiver's dir, its data before, and the snapshot received.
struct MidInstall {
    _sender_dir: tempfile::TempDir,
    receiver_dir: tempfile::TempDir,
    sender: Store,
    receiver: Store,
    before: Vec<(Vec<u8>, Vec<u8>)>,
    received: ReceivedSnapshot,
}

fn installing(snap_range: &KeyRange) -> MidInstall {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let (meta, built) = BuiltSnapshot::build(&s, G, snap_range, 10, 16 << 10).expect("build");
    let before = all_data(&r);
    let received = transfer(&built, &meta, &r, &ODD_CHUNKS);
    MidInstall { _sender_dir: a, receiver_dir: b, sender: s, receiver: r, before, received }
}

/// Reopens the receiver as after a crash, finishes the installation, and checks the outcome.
fn restart_and_finish(t: MidInstall, snap_range: &KeyRange) {
    let MidInstall { receiver_dir, sender, receiver, before, .. } = t;
    drop(receiver);
    let r = open(receiver_dir.path());
    assert!(!files_in(&install_root(&r)).is_empty(), "start-up keeps an install dir its intent names");
    let adopted = finish_interrupted_install(&r, G, &KeyRange::all()).expect("finish");
    assert_eq!(adopted.as_ref(), Some(snap_range));
    assert_eq!(all_data(&r), expected(&sender, &before, snap_range));
    assert_eq!(applied(&r, G).last_applied, Some(LogId::new(3, 500)));
    assert_eq!(descriptor(&r, G).range, *snap_range);
    assert!(files_in(&install_root(&r)).is_empty(), "the install dir is gone");
    // Idempotent: nothing left to finish.
    assert_eq!(finish_interrupted_install(&r, G, &KeyRange::all()).expect("again"), None);
    drop(r);
    assert_eq!(all_data(&open(receiver_dir.path())), expected(&sender, &before, snap_range));
}

#[test]
fn a_crash_after_staging_is_finished_at_start_up() {
    let snap_range = range(500, 2500);
    let mut t = installing(&snap_range);
    let received = std::mem::replace(&mut t.received, ReceivedSnapshot::empty_for_tests());
    stage(&t.receiver, G, &KeyRange::all(), received).expect("stage");
    // Nothing of the data changed yet.
    assert_eq!(all_data(&t.receiver), t.before);
    restart_and_finish(t, &snap_range);
}

#[test]
fn a_crash_after_ingesting_is_finished_at_start_up() {
    let snap_range = range(500, 2500);
    let mut t = installing(&snap_range);
    let received = std::mem::replace(&mut t.received, ReceivedSnapshot::empty_for_tests());
    let intent = stage(&t.receiver, G, &KeyRange::all(), received).expect("stage");
    ingest(&t.receiver, G, &intent).expect("ingest");
    // The data is in, the applied record is not: the originals must still be there.
    assert_eq!(all_data(&t.receiver), expected(&t.sender, &t.before, &snap_range));
    assert_eq!(applied(&t.receiver, G).last_applied, Some(LogId::new(1, 20)));
    let dir = install_root(&t.receiver).join(&intent.dir);
    assert_eq!(files_in(&dir).len(), intent.files.len(), "originals kept, links gone");
    restart_and_finish(t, &snap_range);
}

#[test]
fn a_crash_after_staging_an_empty_snapshot_is_finished_at_start_up() {
    let empty = KeyRange { start: b"k00500-".to_vec(), end: Some(b"k00501".to_vec()) };
    let mut t = installing(&empty);
    put(&t.receiver, [(b"k00500-x".to_vec(), b"old".to_vec())]);
    t.before = all_data(&t.receiver);
    let received = std::mem::replace(&mut t.received, ReceivedSnapshot::empty_for_tests());
    stage(&t.receiver, G, &KeyRange::all(), received).expect("stage");
    restart_and_finish(t, &empty);
}

#[test]
fn a_crash_before_the_intent_leaves_nothing_behind() {
    let t = installing(&range(500, 2500));
    let r = &t.receiver;
    // As if staging had moved the files and crashed before recording its intent.
    let dir = install_root(r).join(install_dir_name(G, t.received.meta.snapshot_id));
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (i, (path, _)) in t.received.files.iter().enumerate() {
        std::fs::copy(path, dir.join(format!("{i:06}.sst"))).expect("copy");
    }
    let MidInstall { receiver_dir, receiver, before, .. } = t;
    drop(receiver);
    let r = open(receiver_dir.path());
    assert!(files_in(&install_root(&r)).is_empty(), "a dir with no intent is removed at open");
    assert_eq!(finish_interrupted_install(&r, G, &KeyRange::all()).expect("finish"), None);
    assert_eq!(all_data(&r), before);
}

#[test]
fn a_corrupt_staged_file_is_refused_at_start_up() {
    let snap_range = range(500, 2500);
    let mut t = installing(&snap_range);
    let received = std::mem::replace(&mut t.received, ReceivedSnapshot::empty_for_tests());
    let intent = stage(&t.receiver, G, &KeyRange::all(), received).expect("stage");
    let path = install_root(&t.receiver).join(&intent.dir).join(&intent.files[0].0);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[10] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");
    let err = finish_interrupted_install(&t.receiver, G, &KeyRange::all()).expect_err("corrupt");
    assert!(err.message.contains("is corrupt") && err.message.contains("000000.sst"), "{err}");
    assert_eq!(all_data(&t.receiver), t.before, "nothing was ingested");
}

#[test]
fn an_installation_waits_for_an_unfinished_one() {
    let snap_range = range(500, 2500);
    let mut t = installing(&snap_range);
    let received = std::mem::replace(&mut t.received, ReceivedSnapshot::empty_for_tests());
    stage(&t.receiver, G, &KeyRange::all(), received).expect("stage");
    let (meta, built) = BuiltSnapshot::build(&t.sender, G, &snap_range, 11, 16 << 10).expect("build");
    let again = transfer(&built, &meta, &t.receiver, &ODD_CHUNKS);
    let err = install(&t.receiver, G, &KeyRange::all(), again).expect_err("unfinished");
    assert!(err.message.contains("unfinished"), "{err}");
}

impl ReceivedSnapshot {
    /// A stand-in left behind when a test takes the real one.
    fn empty_for_tests() -> ReceivedSnapshot {
        ReceivedSnapshot {
            group: G,
            meta: SnapshotMeta::default(),
            range: KeyRange::all(),
            files: Vec::new(),
            merge: MergeState::default(),
        }
    }
}

/// A backup's copy: built only while the range it is given is the group's (a split applied
/// since is refused, never copied across two groups' keys); its stream's header read from
/// outside this module says where each file lies; the files, kept one by one, load into a
/// new store as exactly the range's data, and a corrupt one is refused before loading.
#[test]
fn a_backup_copy_is_of_the_groups_range_and_its_kept_files_load_into_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("db"));
    put(&store, (0..300).map(|i| (key(i), value(i))));
    set_applied(&store, G, LogId::new(2, 40), &[1]);
    set_descriptor(&store, G, &range(0, 200));
    let refused = BuiltSnapshot::build_backup(&store, G, &range(0, 300), 1, 4096);
    assert!(refused.is_err_and(|e| e.message.contains("range changed")));

    let (meta, built) = BuiltSnapshot::build_backup(&store, G, &range(0, 200), 2, 4096).expect("build");
    assert_eq!(meta.last_log_id.index.0, 40);
    assert_eq!(built.key_count(), 200);
    let prefix = built.read(0, STREAM_PREFIX_BYTES as u64).expect("prefix");
    let header_len = stream_header_len(&prefix).expect("header length");
    let header = decode_stream_header(&built.read(0, header_len).expect("header")).expect("decode");
    assert_eq!(header.range, range(0, 200));
    assert_eq!(header.header_bytes, header_len);
    assert!(header.files.len() > 2, "several files of 4 KiB of pairs");
    assert_eq!(header.header_bytes + header.files.iter().map(|(b, _)| b).sum::<u64>(), built.size_bytes());
    assert!(decode_stream_header(&built.read(0, header_len - 1).expect("short")).is_err());

    // Each file kept apart, as a backup keeps them.
    let kept = dir.path().join("kept");
    std::fs::create_dir(&kept).expect("mkdir");
    let mut files = Vec::new();
    let mut at = header.header_bytes;
    for (i, (bytes, crc)) in header.files.iter().enumerate() {
        let path = kept.join(format!("{i}.sst"));
        std::fs::write(&path, built.read(at, *bytes).expect("file")).expect("write");
        files.push((path, *bytes, *crc));
        at += bytes;
    }
    drop(built);

    let fresh = open(&dir.path().join("fresh"));
    let mut bad = files.clone();
    bad[1].2 ^= 1;
    assert!(ingest_copies(&fresh, &range(0, 200), 200, &bad).is_err_and(|e| e.message.contains("crc32c")));
    assert!(all_data(&fresh).is_empty(), "nothing loaded from a corrupt set");
    // Intact files that are not the shard's, or not all of it, are refused (the store is
    // thrown away then: each case on a store of its own).
    let refused = |name: &str, r: KeyRange, keys: u64, files: &[(PathBuf, u64, u32)]| {
        let store = open(&dir.path().join(name));
        let e = ingest_copies(&store, &r, keys, files).expect_err(name);
        eprintln!("{name}: {e}");
        e.message
    };
    assert!(refused("other-range", range(100, 300), 200, &files).contains("outside the shard's range"));
    assert!(refused("narrower", range(0, 150), 200, &files).contains("outside the shard's range"));
    assert!(refused("fewer-keys", range(0, 200), 201, &files).contains("the backup says"));
    assert!(refused("a-file-short", range(0, 200), 200, &files[1..]).contains("the backup says"));
    assert!(refused("no-file", range(0, 200), 3, &[]).contains("no file"));
    ingest_copies(&fresh, &range(0, 200), 200, &files).expect("ingest");
    assert_eq!(all_data(&fresh), (0..200).map(|i| (key(i), value(i))).collect::<Vec<_>>());
    assert!(files.iter().all(|(p, _, _)| p.exists()), "the kept files stay (ingested by copy)");
}

#[test]
fn a_snapshot_carries_the_groups_merge_state_and_its_installation_replaces_the_receivers() {
    let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (s, r) = (sender(a.path()), receiver(b.path(), &KeyRange::all()));
    let frozen = MergeState {
        frozen: Some(crate::merge::Frozen { id: 9, into: GroupId(3), at: LogId::new(3, 480) }),
        thawed_through: 4,
        absorbed_through: 2,
    };
    write_synced(&s, vec![crate::merge::merge_state_op(G, &frozen).expect("op")]).expect("write");
    let (meta, built) = BuiltSnapshot::build(&s, G, &KeyRange::all(), 5, 64 << 20).expect("build");
    install(&r, G, &KeyRange::all(), transfer(&built, &meta, &r, &[meta.size_bytes])).expect("install");
    assert_eq!(crate::merge::read_merge_state(&r, G).expect("read"), frozen);
    // A snapshot of a group never frozen clears a receiver's stale state.
    let c = tempfile::tempdir().expect("dir");
    let plain = sender(c.path());
    let (meta, built) = BuiltSnapshot::build(&plain, G, &KeyRange::all(), 6, 64 << 20).expect("build");
    install(&r, G, &KeyRange::all(), transfer(&built, &meta, &r, &[meta.size_bytes])).expect("install");
    assert_eq!(crate::merge::read_merge_state(&r, G).expect("read"), MergeState::default());
}

#[test]
fn a_format_1_stream_header_is_still_read_as_a_group_never_frozen() {
    let old = ManifestV1Writer { range: range(10, 20), files: vec![FileInfo { bytes: 100, crc32c: 7 }] };
    let record = crate::keys::encode(&old).expect("encode");
    let mut stream = vec![1u8];
    stream.extend_from_slice(&(record.len() as u32).to_be_bytes());
    stream.extend_from_slice(&record);
    let h = decode_stream_header(&stream).expect("a format-1 header");
    assert_eq!(h.range, range(10, 20));
    assert_eq!(h.files, vec![(100, 7)]);
    assert_eq!(stream_range(&stream), Some(range(10, 20)));
    stream[0] = 3;
    assert!(decode_stream_header(&stream).is_err(), "an unknown format is refused");
}

/// The manifest as format 1 wrote it.
#[derive(Serialize)]
struct ManifestV1Writer {
    range: KeyRange,
    files: Vec<FileInfo>,
}

#[test]
fn a_crash_after_staging_a_snapshot_wider_than_the_groups_range_is_finished_at_start_up() {
    // A replica that missed merges: its descriptor says [500, 1500), the snapshot (taken after
    // the merge) covers [500, 2500) over a source frozen for it. Staged with the wider range
    // allowed, then the process stops: start-up, which knows only the descriptor, finishes it.
    let snap_range = range(500, 2500);
    let mut t = installing(&snap_range);
    let received = std::mem::replace(&mut t.received, ReceivedSnapshot::empty_for_tests());
    set_descriptor(&t.receiver, G, &range(500, 1500));
    stage(&t.receiver, G, &snap_range, received).expect("stage");
    let MidInstall { receiver_dir, sender, receiver, before, .. } = t;
    drop(receiver);
    let r = open(receiver_dir.path());
    let adopted = finish_interrupted_install(&r, G, &range(500, 1500)).expect("finish at start-up");
    assert_eq!(adopted.as_ref(), Some(&snap_range));
    assert_eq!(all_data(&r), expected(&sender, &before, &snap_range));
    assert_eq!(descriptor(&r, G).range, snap_range, "the group's range widened with it");
}
