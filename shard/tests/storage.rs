//! The RocksDB storage: the core's conformance suites, checksums, poisoning, restart, group
//! commit, and a 3-node Raft cluster on it.

use flotilla_raft::testing::{log_storage_suite, state_machine_suite, MemRouter};
use flotilla_raft::{
    Config, Entry, EntryPayload, GroupId, LogId, LogIndex, LogStorage, Membership, NodeId, Raft, ReadMode, Vote,
};
use flotilla_shard::keys::entry_key;
use flotilla_shard::{
    range_size_blocking, KeyRange, KvCommand, KvResponse, KvStateMachine, Op, RangeSize, RocksLog, Store, CF_DATA,
    CF_RAFT,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn entry(term: u64, index: u64, data: &str) -> Entry {
    Entry { log_id: LogId::new(term, index), payload: EntryPayload::Normal(bytes::Bytes::from(data.to_string())) }
}

#[tokio::test]
async fn rocks_log_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let next = Arc::new(AtomicU64::new(1));
    log_storage_suite(|| {
        let (store, next) = (store.clone(), next.clone());
        async move { RocksLog::new(store, GroupId(next.fetch_add(1, Ordering::Relaxed))) }
    })
    .await;
}

#[tokio::test]
async fn kv_state_machine_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let next = Arc::new(AtomicU64::new(1));
    state_machine_suite(|| {
        let (store, next) = (store.clone(), next.clone());
        async move {
            // Replicas of one shard: the suite installs one's snapshot into another.
            let g = next.fetch_add(1, Ordering::Relaxed);
            KvStateMachine::new(store, GroupId(g), KeyRange::all())
        }
    })
    .await;
}

#[tokio::test]
async fn a_corrupted_entry_is_detected_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let log = RocksLog::new(store.clone(), GroupId(7));
    log.append((1..=5).map(|i| entry(1, i, "payload")).collect()).await.expect("append");
    // Flip one bit of entry 3's stored value, as a bad disk would.
    let cf = store.cf(CF_RAFT).expect("cf");
    let key = entry_key(GroupId(7), LogIndex(3));
    let mut raw = store.db().get_cf(cf, key).expect("read").expect("present");
    let last = raw.len() - 1;
    raw[last] ^= 0x01;
    store.db().put_cf(cf, key, raw).expect("overwrite");
    let err = log.read_entries(LogIndex(1), LogIndex(5), usize::MAX).await.expect_err("corruption");
    assert!(err.message.contains("group 7 entry 3") && err.message.contains("checksum"), "{err}");
    // Entries before it still read fine.
    assert_eq!(log.read_entries(LogIndex(1), LogIndex(2), usize::MAX).await.expect("clean").len(), 2);
}

#[tokio::test]
async fn a_failed_write_poisons_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let log = RocksLog::new(store.clone(), GroupId(1));
    log.append(vec![entry(1, 1, "a")]).await.expect("first write");
    store.fail_next_write();
    let err = log.append(vec![entry(1, 2, "b")]).await.expect_err("injected failure");
    assert!(err.message.contains("injected"), "{err}");
    // Every later write fails with the original error; reads still work.
    let again = log.save_vote(&Vote::default()).await.expect_err("poisoned");
    assert_eq!(again, err);
    assert!(store.poisoned().is_some());
    assert_eq!(log.read_entries(LogIndex(1), LogIndex(1), usize::MAX).await.expect("read").len(), 1);
    let other = RocksLog::new(store.clone(), GroupId(2));
    assert!(other.append(vec![entry(1, 1, "x")]).await.is_err(), "the whole store refuses writes");
}

#[tokio::test]
async fn restart_finds_every_group_and_its_state_without_scanning_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        for g in 1..=3u64 {
            store.put_group(GroupId(g), vec![g as u8]).await.expect("descriptor");
            let log = RocksLog::new(store.clone(), GroupId(g));
            log.save_vote(&Vote { term: flotilla_raft::Term(g), voted_for: Some(NodeId(g)) }).await.expect("vote");
            log.append((1..=10 * g).map(|i| entry(1, i, "x")).collect()).await.expect("append");
            log.purge_up_to(LogId::new(1, g)).await.expect("purge");
        }
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.groups().expect("groups"), vec![GroupId(1), GroupId(2), GroupId(3)]);
    for g in 1..=3u64 {
        let log = RocksLog::new(store.clone(), GroupId(g));
        let vote = log.read_vote().await.expect("vote").expect("present");
        assert_eq!(vote.voted_for, Some(NodeId(g)));
        let st = log.log_state().await.expect("state");
        assert_eq!(st.last_purged, Some(LogId::new(1, g)));
        assert_eq!(st.last, Some(LogId::new(1, 10 * g)));
    }
}

#[tokio::test]
async fn long_purges_use_a_range_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let log = RocksLog::new(store.clone(), GroupId(1));
    log.append((1..=5000).map(|i| entry(1, i, "x")).collect()).await.expect("append");
    log.purge_up_to(LogId::new(1, 4000)).await.expect("purge");
    let st = log.log_state().await.expect("state");
    assert_eq!(st.last_purged, Some(LogId::new(1, 4000)));
    assert!(log.read_entries(LogIndex(4000), LogIndex(4000), 1).await.is_err(), "purged");
    assert_eq!(log.read_entries(LogIndex(4001), LogIndex(5000), usize::MAX).await.expect("rest").len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fsync_serves_many_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut tasks = Vec::new();
    for g in 0..200u64 {
        let log = RocksLog::new(store.clone(), GroupId(g));
        tasks.push(tokio::spawn(async move {
            for i in 1..=5 {
                log.append(vec![entry(1, i, "v")]).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let stats = store.stats();
    let (requests, syncs) = (stats.requests.load(Ordering::Relaxed), stats.syncs.load(Ordering::Relaxed));
    assert_eq!(requests, 1000);
    assert!(syncs < requests / 2, "group commit: {syncs} fsyncs for {requests} durable writes");
}

struct Node {
    raft: Raft,
    sm: KvStateMachine,
}

async fn start(router: &MemRouter, dir: &std::path::Path, id: u64) -> Node {
    let store = Store::open(dir).expect("open");
    let log = RocksLog::new(store.clone(), GroupId(1));
    let sm = KvStateMachine::new(store, GroupId(1), KeyRange::all());
    let config = Config { log_keep_entries: 10, log_lag_entries_max: 30, log_purge_step_entries: 1, ..Config::fast() };
    let raft = Raft::start(NodeId(id), GroupId(1), config, log, sm.clone(), router.network()).await.expect("start");
    router.register(raft.clone());
    Node { raft, sm }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_cluster_on_rocksdb_survives_a_restart() {
    let router = MemRouter::new();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(start(&router, d.path(), i as u64 + 1).await);
    }
    nodes[0].raft.initialize(Membership::new([1, 2, 3].map(NodeId))).await.expect("init");
    let wait = Duration::from_secs(20);
    let m = nodes[0].raft.wait_for(wait, |m| m.leader.is_some()).await.expect("leader");
    let leader = (m.leader.expect("leader").0 - 1) as usize;
    for i in 0..120u32 {
        let cmd = KvCommand::Put { key: format!("k{i:03}").into_bytes(), value: i.to_be_bytes().to_vec() };
        let r = nodes[leader].raft.client_write(cmd.encode().expect("encode")).await.expect("write");
        assert!(matches!(KvResponse::decode(&r.data).expect("decode"), KvResponse::Done { previous: None }));
    }
    let cas = KvCommand::Cas { key: b"k000".to_vec(), expected: Some(vec![9]), new: None };
    let r = nodes[leader].raft.client_write(cas.encode().expect("encode")).await.expect("write");
    assert_eq!(
        KvResponse::decode(&r.data).expect("decode"),
        KvResponse::CasFailed { current: Some(0u32.to_be_bytes().to_vec()) }
    );
    let idx = nodes[leader].raft.ensure_linearizable(ReadMode::ReadIndex).await.expect("read");
    // The log is purged behind what RocksDB holds durably, without any snapshot.
    let m = nodes[leader].raft.wait_for(wait, |m| m.first_log_index.0 > 50).await.expect("log purged");
    assert!(m.durable_applied.0 + 1 >= m.first_log_index.0, "purged only behind durability: {m:?}");
    assert!(m.snapshot.is_none(), "no snapshot was needed");

    // Restart a follower from its directory: it recovers its log, state and data.
    let f = (leader + 1) % 3;
    nodes[f].raft.wait_for(wait, |m| m.applied >= idx).await.expect("follower applied");
    router.unregister(NodeId(f as u64 + 1));
    nodes[f].raft.shutdown().await;
    // Drop every handle on the old store (it closes the database) before reopening it.
    let old = nodes.remove(f);
    drop(old);
    nodes.insert(f, start(&router, dirs[f].path(), f as u64 + 1).await);
    nodes[f].raft.wait_for(wait, |m| m.applied >= idx).await.expect("recovered");
    assert_eq!(nodes[f].sm.get(b"k119".to_vec()).await.expect("get"), Some(119u32.to_be_bytes().to_vec()));
    assert_eq!(nodes[f].sm.scan(b"k".to_vec(), None, 1000).await.expect("scan").pairs.len(), 120);
}

fn put(k: &str, v: &str) -> Entry {
    let cmd = KvCommand::Put { key: k.as_bytes().to_vec(), value: v.as_bytes().to_vec() };
    Entry { log_id: LogId::new(1, 0), payload: EntryPayload::Normal(cmd.encode().expect("encode")) }
}

/// Applies puts as consecutive entries starting at `first`.
async fn apply_puts(sm: &mut KvStateMachine, first: u64, pairs: &[(&str, &str)]) {
    use flotilla_raft::StateMachine;
    let entries: Vec<Entry> = pairs
        .iter()
        .enumerate()
        .map(|(i, (k, v))| Entry { log_id: LogId::new(1, first + i as u64), ..put(k, v) })
        .collect();
    sm.apply(entries).await.expect("apply");
}

/// Streams the snapshot `meta` of `from` into `to` in chunks of `chunk` bytes, then installs it.
async fn transfer(
    from: &mut KvStateMachine,
    to: &mut KvStateMachine,
    meta: &flotilla_raft::SnapshotMeta,
    chunk: u64,
) -> Result<(), flotilla_raft::SnapshotError> {
    use flotilla_raft::StateMachine;
    let mut offset = 0;
    while offset < meta.size_bytes {
        let len = chunk.min(meta.size_bytes - offset);
        let data = from.read_snapshot(meta, offset, len).await.expect("read").expect("built");
        to.receive_snapshot(meta, offset, data).await?;
        offset += len;
    }
    to.install_snapshot(meta).await
}

#[tokio::test]
async fn a_streamed_snapshot_replaces_exactly_the_shards_range_on_the_receiver() {
    use flotilla_raft::StateMachine;
    let (d1, d2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let (s1, s2) = (Store::open(d1.path()).expect("open"), Store::open(d2.path()).expect("open"));
    let range = KeyRange { start: b"b".to_vec(), end: Some(b"d".to_vec()) };
    let mut leader = KvStateMachine::new(s1, GroupId(1), range.clone());
    apply_puts(&mut leader, 1, &[("b1", "new"), ("c1", "x"), ("c2", "y")]).await;
    let snap = leader.build_snapshot().await.expect("build");
    assert_eq!(snap.last_log_id, LogId::new(1, 3));
    // The receiver holds stale keys in the range, and another shard's keys around it.
    let mut follower = KvStateMachine::new(s2.clone(), GroupId(1), range.clone());
    apply_puts(&mut follower, 1, &[("b1", "old"), ("b9", "stale")]).await;
    let mut other_low =
        KvStateMachine::new(s2.clone(), GroupId(2), KeyRange { start: b"a".to_vec(), end: Some(b"b".to_vec()) });
    apply_puts(&mut other_low, 1, &[("a5", "keep")]).await;
    let mut other_high = KvStateMachine::new(s2.clone(), GroupId(3), KeyRange { start: b"d".to_vec(), end: None });
    apply_puts(&mut other_high, 1, &[("d", "keep")]).await;
    transfer(&mut leader, &mut follower, &snap, 17).await.expect("transfer");
    let st = follower.applied_state().await.expect("applied");
    assert_eq!(st.last_applied, Some(LogId::new(1, 3)));
    assert!(follower.durable_applied().await.expect("durable") >= LogIndex(3), "an installation is durable");
    let got = follower.scan(b"b".to_vec(), None, 100).await.expect("scan");
    let got: Vec<(String, String)> = got
        .pairs
        .into_iter()
        .map(|(k, v)| (String::from_utf8_lossy(&k).into(), String::from_utf8_lossy(&v).into()))
        .collect();
    let want = [("b1", "new"), ("c1", "x"), ("c2", "y")].map(|(k, v)| (k.to_string(), v.to_string()));
    assert_eq!(got, want, "stale key b9 gone, snapshot keys in");
    assert_eq!(other_low.get(b"a5".to_vec()).await.expect("get"), Some(b"keep".to_vec()));
    assert_eq!(other_high.get(b"d".to_vec()).await.expect("get"), Some(b"keep".to_vec()));
    // A snapshot of another range is refused before anything changes.
    let mut wrong = KvStateMachine::new(s2, GroupId(3), KeyRange { start: b"d".to_vec(), end: None });
    assert!(transfer(&mut leader, &mut wrong, &snap, 64).await.is_err());
    assert_eq!(other_high.get(b"d".to_vec()).await.expect("get"), Some(b"keep".to_vec()));
    // Dropped after use: its files are gone and a transfer of it would start over.
    leader.drop_snapshot(&snap).await.expect("drop");
    assert_eq!(leader.read_snapshot(&snap, 0, 1).await.expect("read"), None);
}

#[tokio::test]
async fn the_first_apply_after_a_snapshot_installation_follows_the_installed_index() {
    use flotilla_raft::StateMachine;
    let (d1, d2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let (s1, s2) = (Store::open(d1.path()).expect("open"), Store::open(d2.path()).expect("open"));
    let range = KeyRange { start: b"a".to_vec(), end: None };
    let mut leader = KvStateMachine::new(s1, GroupId(1), range.clone());
    apply_puts(&mut leader, 1, &[("k1", "1"), ("k2", "2"), ("k3", "3"), ("k4", "4"), ("k5", "5")]).await;
    let snap = leader.build_snapshot().await.expect("build");
    assert_eq!(snap.last_log_id, LogId::new(1, 5));
    // The follower applied two entries itself (the state machine remembers where it is),
    // then takes the snapshot, and goes on from it without being asked its applied state.
    let mut follower = KvStateMachine::new(s2, GroupId(1), range);
    apply_puts(&mut follower, 1, &[("k1", "1"), ("k2", "2")]).await;
    transfer(&mut leader, &mut follower, &snap, 64).await.expect("transfer");
    let stale = follower.apply(vec![Entry { log_id: LogId::new(1, 3), ..put("k3", "stale") }]).await;
    assert!(stale.is_err(), "entry 3 is behind the installed snapshot: {stale:?}");
    apply_puts(&mut follower, 6, &[("k6", "6")]).await;
    assert_eq!(follower.get(b"k6".to_vec()).await.expect("get"), Some(b"6".to_vec()));
    assert_eq!(follower.get(b"k3".to_vec()).await.expect("get"), Some(b"3".to_vec()));
    assert_eq!(follower.applied_state().await.expect("applied").last_applied, Some(LogId::new(1, 6)));
}

#[tokio::test]
async fn the_applied_state_is_reported_durable_once_a_later_write_was_synced() {
    use flotilla_raft::StateMachine;
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(d.path()).expect("open");
    let mut sm = KvStateMachine::new(store.clone(), GroupId(1), KeyRange::all());
    sm.applied_state().await.expect("applied");
    apply_puts(&mut sm, 1, &[("a", "1"), ("b", "2")]).await;
    // Applied without fsync: not durable yet.
    assert_eq!(sm.durable_applied().await.expect("durable"), LogIndex(0));
    // Any synced write after it (another group's log append, say) makes it durable.
    store.write(Vec::new(), true).await.expect("sync");
    assert_eq!(sm.durable_applied().await.expect("durable"), LogIndex(2));
    apply_puts(&mut sm, 3, &[("c", "3")]).await;
    assert_eq!(sm.durable_applied().await.expect("durable"), LogIndex(2));
}

/// A tmpfs of a few MiB mounted for one test (needs root; the test says so and passes
/// vacuously elsewhere — CI runs as root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_poisons_the_store_with_a_clear_error() {
    let Some(disk) = SmallDisk::mount("24m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let store = Store::open(disk.dir.path()).expect("open on the small disk");
    let log = RocksLog::new(store.clone(), GroupId(1));
    let mut err = None;
    for i in 1..=10_000u64 {
        let e =
            Entry { log_id: LogId::new(1, i), payload: EntryPayload::Normal(bytes::Bytes::from(vec![7u8; 256 << 10])) };
        if let Err(e) = log.append(vec![e]).await {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("a 24 MiB disk fills up");
    eprintln!("full disk: {err}");
    assert!(
        err.message.contains("No space") || err.message.contains("space") || err.message.contains("IO error"),
        "the error names the cause: {err}"
    );
    // Poisoned: later writes fail with the original error, even small ones.
    assert!(store.poisoned().is_some());
    let later = log.save_vote(&Vote { term: flotilla_raft::Term(9), voted_for: None }).await.expect_err("poisoned");
    assert_eq!(later.message, err.message);
    drop(log);
    drop(store);
}

#[tokio::test]
async fn a_replica_that_missed_a_split_adopts_the_narrower_range_of_a_snapshot() {
    use flotilla_raft::StateMachine;
    let (d1, d2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let left = KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) };
    // The leader applied a split: group 1 owns [.., m).
    let mut leader = KvStateMachine::new(Store::open(d1.path()).expect("open"), GroupId(1), left.clone());
    apply_puts(&mut leader, 1, &[("a", "1")]).await;
    let snap = leader.build_snapshot().await.expect("build");
    // This replica still has the whole range, with data on both sides of the split key.
    let store = Store::open(d2.path()).expect("open");
    let mut replica = KvStateMachine::new(store, GroupId(1), KeyRange::all());
    apply_puts(&mut replica, 1, &[("a", "old"), ("b", "stale"), ("x", "right half")]).await;
    transfer(&mut leader, &mut replica, &snap, 1000).await.expect("install a narrower snapshot");
    assert_eq!(replica.range(), left, "the replica adopted the split range");
    assert_eq!(replica.get(b"a".to_vec()).await.expect("get"), Some(b"1".to_vec()));
    assert_eq!(replica.get(b"b".to_vec()).await.expect("get"), None, "stale key in the range cleared");
    // The right half is no longer this group's: left for the new group's snapshot to replace.
    assert!(replica.get(b"x".to_vec()).await.is_err(), "outside the group's range now");
}

#[tokio::test]
async fn a_range_is_sized_by_its_logical_bytes_with_a_middle_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    // 2,000 keys of 5 + 96 bytes in [k0000, k2000), and keys on both sides of the range.
    let mut ops: Vec<Op> =
        (0..2000u32).map(|i| Op::Put(CF_DATA, format!("k{i:04}").into_bytes(), vec![7; 96])).collect();
    ops.push(Op::Put(CF_DATA, b"a-before".to_vec(), vec![0; 5000]));
    ops.push(Op::Put(CF_DATA, b"z-after".to_vec(), vec![0; 5000]));
    store.write(ops, true).await.expect("write");
    let range = KeyRange { start: b"k".to_vec(), end: Some(b"l".to_vec()) };
    let size = range_size_blocking(&store, &range, u64::MAX).expect("size");
    assert_eq!((size.bytes, size.keys), (2000 * 101, 2000));
    // The middle key leaves about half the bytes on each side (marks thin out past 512).
    let middle = size.middle.expect("a middle key");
    let at: u32 = std::str::from_utf8(&middle[1..]).unwrap().parse().unwrap();
    assert!((950..=1050).contains(&at), "middle {at}");

    // Flushed or not, the figure is the same (a size taken from SST files would change).
    store.db().flush_cf(store.cf(CF_DATA).unwrap()).expect("flush");
    assert_eq!(range_size_blocking(&store, &range, u64::MAX).expect("size").bytes, 2000 * 101);

    // An open-ended range; one key has no split point; an empty range is zero.
    let tail = range_size_blocking(&store, &KeyRange { start: b"y".to_vec(), end: None }, u64::MAX).expect("size");
    assert_eq!((tail.bytes, tail.keys, tail.middle, tail.complete), (7 + 5000, 1, None, true));
    let empty_range = KeyRange { start: b"m".to_vec(), end: Some(b"n".to_vec()) };
    let empty = range_size_blocking(&store, &empty_range, u64::MAX).unwrap();
    assert_eq!(empty, RangeSize { complete: true, ..RangeSize::default() });
    assert_eq!(size.estimate, size.bytes, "a range read whole is its own estimate");

    // A limit stops the read: the size counts what was read, the middle is the part's.
    let part = range_size_blocking(&store, &range, 50_000).expect("size");
    assert!(!part.complete && (50_000..50_101).contains(&part.bytes), "{part:?}");
    let at: u32 = std::str::from_utf8(&part.middle.expect("middle")[1..]).unwrap().parse().unwrap();
    assert!((230..=265).contains(&at), "middle of the part read: {at}");
    // The whole range's size is estimated from the share of its files the part spans.
    assert!((150_000..=260_000).contains(&part.estimate), "estimate {} for 202,000 bytes", part.estimate);
}

#[tokio::test]
async fn puts_are_blind_deletes_answer_the_old_value_and_oversized_commands_are_refused_at_apply() {
    use flotilla_raft::StateMachine;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let mut sm = KvStateMachine::new(store, GroupId(1), KeyRange::all());
    let entry = |index: u64, cmd: KvCommand| Entry {
        log_id: LogId::new(1, index),
        payload: EntryPayload::Normal(cmd.encode().expect("encode")),
    };
    let (k, v) = (b"k".to_vec(), b"v".to_vec());
    let results = sm
        .apply(vec![
            entry(1, KvCommand::Put { key: k.clone(), value: b"old".to_vec() }),
            entry(2, KvCommand::Put { key: k.clone(), value: v.clone() }),
            entry(3, KvCommand::Delete { key: k.clone() }),
            entry(4, KvCommand::Put { key: vec![b'x'; flotilla_shard::KEY_BYTES_MAX + 1], value: Vec::new() }),
            entry(5, KvCommand::Put { key: k.clone(), value: vec![0; flotilla_shard::VALUE_BYTES_MAX + 1] }),
        ])
        .await
        .expect("apply");
    let answers: Vec<KvResponse> = results.iter().map(|r| KvResponse::decode(r).expect("decode")).collect();
    assert_eq!(answers[0], KvResponse::Done { previous: None });
    assert_eq!(answers[1], KvResponse::Done { previous: None }, "a put does not read the old value");
    assert_eq!(answers[2], KvResponse::Done { previous: Some(v) }, "a delete does");
    for a in &answers[3..] {
        assert!(matches!(a, KvResponse::Refused(why) if why.contains("exceeds the limit")), "{a:?}");
    }
    assert_eq!(sm.get(k).await.expect("get"), None, "the oversized put changed nothing");
}

#[tokio::test]
async fn a_store_opened_with_a_budget_sizes_its_cache_and_memtables_and_reports_them() {
    use flotilla_shard::store_options::MEMORY_BUDGET_BYTES_MIN;
    use flotilla_shard::StoreOptions;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions::with_memory_budget(MEMORY_BUDGET_BYTES_MIN);
    let plan = options.memory_plan();
    let store = Store::open_with(dir.path(), options).expect("open");
    // Every column family's table factory uses the one cache the budget sized.
    for cf in [CF_RAFT, CF_DATA, flotilla_shard::CF_META] {
        let capacity =
            store.db().property_int_value_cf(store.cf(cf).unwrap(), rocksdb::properties::BLOCK_CACHE_CAPACITY).unwrap();
        assert_eq!(capacity, Some(plan.block_cache_bytes), "column family {cf}");
    }
    let m = store.metrics().expect("metrics");
    assert_eq!(m.memory.budget_bytes, MEMORY_BUDGET_BYTES_MIN);
    assert_eq!(m.memory.block_cache_capacity_bytes, plan.block_cache_bytes);
    if std::path::Path::new("/proc/self/status").exists() {
        assert!(m.process.resident_bytes.unwrap_or(0) > 0, "{m:?}");
    }

    // Twice one memtable's worth of writes into `data`: RocksDB flushes by itself (the
    // memtables are the plan's size, not its 64 MiB default), and every ticker moves.
    let value = vec![7u8; 64 << 10];
    let writes = (2 * plan.write_buffer_bytes as usize).div_ceil(value.len());
    for i in 0..writes {
        store.write(vec![Op::Put(CF_DATA, format!("k{i:06}").into_bytes(), value.clone())], false).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = store.metrics().expect("metrics");
        if m.io.flush_written_bytes > 0 {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "no flush after {writes} writes: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(m.io.user_written_bytes >= (writes * value.len()) as u64, "{m:?}");
    assert!(m.io.wal_written_bytes >= (writes * value.len()) as u64, "{m:?}");
    // The memtables never hold more than the plan's share (plus arena slack).
    assert!(m.memory.memtable_bytes <= plan.write_buffers_bytes + (plan.write_buffers_bytes / 4), "{m:?}");
    // Their reservation is charged to the cache.
    assert!(m.memory.block_cache_usage_bytes > 0, "{m:?}");
}

#[test]
fn a_budget_below_the_minimum_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = flotilla_shard::StoreOptions::with_memory_budget(1 << 20);
    let err = Store::open_with(dir.path(), options).err().expect("a 1 MiB budget must be refused");
    assert!(err.to_string().contains("below the minimum"), "{err}");
}

#[tokio::test]
async fn a_split_leaves_alone_a_replica_of_the_new_group_already_on_the_node() {
    use flotilla_raft::{StateMachine, Term};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    // Group 2 has a replica here already, which voted in term 7.
    let voted = Vote { term: Term(7), voted_for: Some(NodeId(3)) };
    RocksLog::new(store.clone(), GroupId(2)).save_vote(&voted).await.expect("vote");
    let mut source = KvStateMachine::new(store.clone(), GroupId(1), KeyRange::all());
    apply_puts(&mut source, 1, &[("a", "1"), ("x", "2")]).await;
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let entry = Entry { log_id: LogId::new(1, 3), payload: EntryPayload::Normal(split.encode().expect("encode")) };
    let answers = source.apply(vec![entry]).await.expect("apply");
    assert!(matches!(KvResponse::decode(&answers[0]), Ok(KvResponse::Split { .. })), "split applied");
    assert_eq!(source.range(), KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) }, "the source narrowed");
    let vote = RocksLog::new(store.clone(), GroupId(2)).read_vote().await.expect("read");
    assert_eq!(vote, Some(voted), "the replica's vote survives the split");
}

#[tokio::test]
async fn a_read_the_caches_cannot_answer_goes_to_the_disk_and_finds_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store.write(vec![Op::Put(CF_DATA, b"k".to_vec(), b"v".to_vec())], true).await.expect("write");
    // In the memtable: answered from memory.
    assert_eq!(store.get_in_memory(CF_DATA, b"k").expect("read"), Some(Some(b"v".to_vec())));
    assert_eq!(store.get_in_memory(CF_DATA, b"absent").expect("read"), Some(None));
    // Flushed to a table file whose blocks no read has cached yet: memory cannot answer.
    let cf = store.cf(CF_DATA).expect("cf");
    store.db().flush_cf(cf).expect("flush");
    assert_eq!(store.get_in_memory(CF_DATA, b"k").expect("read"), None, "a flushed, uncached value needs the disk");
    // The state machine's read falls back to the disk, and its read fills the cache.
    let sm = KvStateMachine::new(store.clone(), GroupId(1), KeyRange::all());
    assert_eq!(sm.get(b"k".to_vec()).await.expect("get"), Some(b"v".to_vec()));
    assert_eq!(store.get_in_memory(CF_DATA, b"k").expect("read"), Some(Some(b"v".to_vec())));
}

#[tokio::test]
async fn a_transaction_applies_all_its_writes_only_when_its_guard_matches_and_only_inside_the_range() {
    use flotilla_raft::StateMachine;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let range = KeyRange { start: b"a".to_vec(), end: Some(b"m".to_vec()) };
    let mut sm = KvStateMachine::new(store, GroupId(1), range);
    let entry = |index: u64, cmd: KvCommand| Entry {
        log_id: LogId::new(1, index),
        payload: EntryPayload::Normal(cmd.encode().expect("encode")),
    };
    let txn = |expected: Option<&[u8]>, writes: &[(&[u8], Option<&[u8]>)]| KvCommand::Txn {
        guard: b"g".to_vec(),
        expected: expected.map(<[u8]>::to_vec),
        writes: writes.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect(),
    };
    let results = sm
        .apply(vec![
            // Guard absent as expected: every write lands, the guard's own included.
            entry(1, txn(None, &[(b"g", Some(b"1")), (b"b", Some(b"x")), (b"c", Some(b"y"))])),
            // Stale guard: nothing lands.
            entry(2, txn(None, &[(b"g", Some(b"2")), (b"b", None)])),
            // Current guard, read from this batch's earlier write: delete and overwrite.
            entry(3, txn(Some(b"1"), &[(b"g", Some(b"2")), (b"b", None), (b"c", Some(b"z"))])),
            // A write outside the range: nothing lands, even with the right guard.
            entry(4, txn(Some(b"2"), &[(b"g", Some(b"3")), (b"zz", Some(b"!"))])),
            // Too many writes: refused at apply.
            entry(
                5,
                KvCommand::Txn {
                    guard: b"g".to_vec(),
                    expected: Some(b"2".to_vec()),
                    writes: vec![(b"d".to_vec(), None); flotilla_shard::TXN_WRITES_MAX + 1],
                },
            ),
        ])
        .await
        .expect("apply");
    let answers: Vec<KvResponse> = results.iter().map(|r| KvResponse::decode(r).expect("decode")).collect();
    assert_eq!(answers[0], KvResponse::Done { previous: None });
    assert_eq!(answers[1], KvResponse::CasFailed { current: Some(b"1".to_vec()) });
    assert_eq!(answers[2], KvResponse::Done { previous: Some(b"1".to_vec()) });
    assert_eq!(answers[3], KvResponse::OutOfRange);
    assert!(matches!(&answers[4], KvResponse::Refused(why) if why.contains("exceeds the limit")), "{:?}", answers[4]);
    let get = |k: &[u8]| sm.get(k.to_vec());
    assert_eq!(get(b"g").await.expect("get"), Some(b"2".to_vec()));
    assert_eq!(get(b"b").await.expect("get"), None);
    assert_eq!(get(b"c").await.expect("get"), Some(b"z".to_vec()));
    let oversized = KvCommand::Txn {
        guard: b"g".to_vec(),
        expected: None,
        writes: vec![(b"b".to_vec(), Some(vec![0; flotilla_shard::TXN_BYTES_MAX]))],
    };
    assert!(oversized.check_size().is_err(), "a transaction is bounded in bytes as a put is");
}

#[tokio::test]
async fn an_insert_of_many_keys_sets_them_all_only_when_none_exists_and_only_inside_the_range() {
    use flotilla_raft::StateMachine;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let range = KeyRange { start: b"a".to_vec(), end: Some(b"m".to_vec()) };
    let mut sm = KvStateMachine::new(store, GroupId(1), range);
    let entry = |index: u64, cmd: KvCommand| Entry {
        log_id: LogId::new(1, index),
        payload: EntryPayload::Normal(cmd.encode().expect("encode")),
    };
    let insert = |pairs: &[(&[u8], &[u8])]| KvCommand::InsertAll {
        pairs: pairs.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
    };
    let results = sm
        .apply(vec![
            // None exists: all land.
            entry(1, insert(&[(b"b", b"1"), (b"c", b"2")])),
            // One (written by this batch's first entry) exists: nothing lands, not even "d".
            entry(2, insert(&[(b"d", b"3"), (b"c", b"4")])),
            // A key outside the range: nothing lands.
            entry(3, insert(&[(b"e", b"5"), (b"zz", b"6")])),
            // No key at all: refused.
            entry(4, KvCommand::InsertAll { pairs: Vec::new() }),
        ])
        .await
        .expect("apply");
    let answers: Vec<KvResponse> = results.iter().map(|r| KvResponse::decode(r).expect("decode")).collect();
    assert_eq!(answers[0], KvResponse::Done { previous: None });
    assert_eq!(answers[1], KvResponse::CasFailed { current: Some(b"2".to_vec()) });
    assert_eq!(answers[2], KvResponse::OutOfRange);
    assert!(matches!(&answers[3], KvResponse::Refused(_)), "{:?}", answers[3]);
    let get = |k: &[u8]| sm.get(k.to_vec());
    assert_eq!(get(b"b").await.expect("get"), Some(b"1".to_vec()));
    assert_eq!(get(b"c").await.expect("get"), Some(b"2".to_vec()));
    assert_eq!(get(b"d").await.expect("get"), None);
    assert_eq!(get(b"e").await.expect("get"), None);
}

/// A submitter on a Tokio worker (the host's pollers are tasks) that finds the writer's queue
/// full blocks in place: the worker's other tasks go on meanwhile, and every submitted write
/// still lands, in order, once the disk comes back. One worker: a plain blocking send would
/// hold it, and nothing else would run.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_full_writer_queue_does_not_stall_the_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store.hold_writes(true);
    let total = flotilla_shard::store::WRITER_QUEUE_MAX + 2;
    let written = Arc::new(AtomicU64::new(0));
    let order_ok = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // On a worker, as a poller submits: the last submissions find the queue full and block.
    let submitter = tokio::spawn({
        let (store, written, order_ok) = (store.clone(), written.clone(), order_ok.clone());
        async move {
            for i in 0..total as u64 {
                let (written, order_ok) = (written.clone(), order_ok.clone());
                let op = Op::Put(CF_DATA, format!("k{i:06}").into_bytes(), vec![1]);
                store
                    .submit(
                        vec![op],
                        false,
                        Box::new(move |r| {
                            // Callbacks run in submission order, each after its write.
                            if r.is_err() || written.fetch_add(1, Ordering::AcqRel) != i {
                                order_ok.store(false, Ordering::Release);
                            }
                        }),
                    )
                    .expect("submit");
            }
        }
    });
    // The submitter is blocked on the full queue (nothing is written while the disk stalls),
    // yet timers and other tasks of the runtime still run, more than once. Waited for with
    // the test's own thread (not a worker): a stalled runtime fails here, it does not hang.
    for _ in 0..5 {
        let (tx, rx) = std::sync::mpsc::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(7);
        });
        if rx.recv_timeout(Duration::from_secs(5)) != Ok(7) {
            store.hold_writes(false); // so that the runtime can shut down after the failure
            panic!("the runtime stalled behind the full queue");
        }
    }
    assert!(!submitter.is_finished(), "the queue never filled: the test tests nothing");
    assert_eq!(written.load(Ordering::Acquire), 0);
    store.hold_writes(false);
    tokio::time::timeout(Duration::from_secs(30), submitter).await.expect("submitter done").expect("join");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::Acquire) < total as u64 {
        assert!(std::time::Instant::now() < deadline, "writes did not land");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(order_ok.load(Ordering::Acquire), "a write failed or landed out of order");
}

/// A batch write that takes `SLOW_WRITE` or longer (here a disk pausing, by the test hook) is
/// counted, for `/metrics`. (Not asserted: that the other writes are not counted. A shared
/// virtual disk here pauses every fsync for 20–50 ms now and then, BENCHMARKS.md, session 31.)
#[tokio::test]
async fn a_slow_write_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let put = |k: &str| vec![Op::Put(CF_DATA, k.as_bytes().to_vec(), b"v".to_vec())];
    store.write(put("a"), true).await.expect("write");
    let before = store.stats().slow_writes.load(Ordering::Acquire);
    store.delay_next_write(flotilla_shard::store::SLOW_WRITE + Duration::from_millis(10));
    store.write(put("b"), true).await.expect("write");
    assert!(store.stats().slow_writes.load(Ordering::Acquire) > before, "the delayed write is counted");
}
