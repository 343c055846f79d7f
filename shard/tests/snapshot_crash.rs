//! Crash test of a node receiving a snapshot: a child process streams a snapshot into a
//! replica's state machine and installs it, and dies (abort, no destructors, as `kill -9`) at
//! a point of the installation: after staging the files and recording the intent, or after
//! the ingestion, before the applied state is written. Reopened, the replica finishes the
//! installation at start-up: exactly the snapshot's data in its range, its applied index, the
//! keys of other shards untouched, no staged file left. Killed at a random moment instead, it
//! holds either its old state or the snapshot's, never a mix.

use flotilla_raft::{Entry, EntryPayload, GroupId, LogId, LogIndex, SnapshotMeta, StateMachine};
use flotilla_shard::kv_snapshot::BuiltSnapshot;
use flotilla_shard::{KeyRange, KvCommand, KvStateMachine, Store};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const CHILD_ENV: &str = "FLOTILLA_SNAPSHOT_CRASH_CHILD_DIR";
const G: GroupId = GroupId(7);
const KEYS: u32 = 6000;

fn range() -> KeyRange {
    KeyRange { start: b"k".to_vec(), end: Some(b"l".to_vec()) }
}

fn put(index: u64, k: &str, v: &str) -> Entry {
    let cmd = KvCommand::Put { key: k.as_bytes().to_vec(), value: v.as_bytes().to_vec() };
    Entry { log_id: LogId::new(1, index), payload: EntryPayload::Normal(cmd.encode().expect("encode")) }
}

/// The receiver's state before: stale keys in the range, and another shard's key beside it.
async fn prepare_receiver(dir: &Path) {
    let store = Store::open(dir).expect("open");
    let mut sm = KvStateMachine::new(store.clone(), G, range());
    sm.applied_state().await.expect("applied");
    sm.apply(vec![put(1, "k-stale-1", "old"), put(2, "k-stale-2", "old"), put(3, "k00001", "old")])
        .await
        .expect("apply");
    let mut other = KvStateMachine::new(store.clone(), GroupId(8), KeyRange { start: b"l".to_vec(), end: None });
    other.apply(vec![put(1, "l-other", "keep")]).await.expect("apply");
    store.write(Vec::new(), true).await.expect("sync");
}

/// Builds the snapshot on a source store (several SST files) and writes its stream and meta
/// into `dir` for the child.
async fn prepare_stream(source: &Path, dir: &Path) -> SnapshotMeta {
    let store = Store::open(source).expect("open");
    let mut sm = KvStateMachine::new(store.clone(), G, range());
    sm.applied_state().await.expect("applied");
    let entries: Vec<Entry> = (0..KEYS).map(|i| put(u64::from(i) + 1, &format!("k{i:05}"), &"v".repeat(200))).collect();
    sm.apply(entries).await.expect("apply");
    let (meta, built) = BuiltSnapshot::build(&store, G, &range(), 99, 256 << 10).expect("build");
    let stream = built.read(0, meta.size_bytes).expect("read");
    std::fs::write(dir.join("stream"), &stream).expect("write stream");
    std::fs::write(dir.join("meta"), bincode::serde::encode_to_vec(&meta, bincode::config::standard()).expect("enc"))
        .expect("write meta");
    meta
}

/// The child: receive the stream in 64 KiB chunks, install, report.
fn child(dir: &str) {
    let dir = Path::new(dir);
    let raw = std::fs::read(dir.join("meta")).expect("meta");
    let (meta, _): (SnapshotMeta, usize) =
        bincode::serde::decode_from_slice(&raw, bincode::config::standard()).expect("decode meta");
    let stream = std::fs::read(dir.join("stream")).expect("stream");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = Store::open(dir.join("db")).expect("open");
        let mut sm = KvStateMachine::new(store, G, range());
        sm.applied_state().await.expect("applied");
        for (i, chunk) in stream.chunks(64 << 10).enumerate() {
            let offset = (i * (64 << 10)) as u64;
            sm.receive_snapshot(&meta, offset, bytes::Bytes::copy_from_slice(chunk)).await.expect("receive");
        }
        sm.install_snapshot(&meta).await.expect("install");
        println!("installed");
    });
}

fn run_child(dir: &Path, crash_at: Option<&str>, kill_after: Option<Duration>) -> std::process::ExitStatus {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", "a_receiver_killed_during_an_installation_finishes_it_at_start_up", "--nocapture"])
        .env(CHILD_ENV, dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(at) = crash_at {
        cmd.env("FLOTILLA_CRASH_AT", at);
    }
    let mut child = cmd.spawn().expect("spawn child");
    if let Some(after) = kill_after {
        std::thread::sleep(after);
        let _ = child.kill();
    }
    child.wait().expect("wait")
}

/// What the replica holds after a restart: `Some(true)` the snapshot exactly, `Some(false)`
/// its old state exactly; panics on anything else.
async fn check_replica(dir: &Path, meta: &SnapshotMeta) -> bool {
    let store = Store::open(dir.join("db")).expect("reopen");
    let mut sm = KvStateMachine::new(store.clone(), G, range());
    let applied = sm.applied_state().await.expect("applied state (finishes an installation)");
    let other = KvStateMachine::new(store.clone(), GroupId(8), KeyRange { start: b"l".to_vec(), end: None });
    assert_eq!(other.get(b"l-other".to_vec()).await.expect("get"), Some(b"keep".to_vec()), "another shard's key");
    let page = sm.scan(b"k".to_vec(), None, 100_000).await.expect("scan");
    let installed = applied.last_applied == Some(meta.last_log_id);
    if installed {
        assert_eq!(page.pairs.len(), KEYS as usize, "exactly the snapshot's keys");
        assert!(page.pairs.iter().all(|(k, v)| k.starts_with(b"k0") && v.len() == 200), "no stale key, no torn value");
        let staged = dir.join("db").join("flotilla-install");
        let left = std::fs::read_dir(&staged).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "the staged files were removed");
    } else {
        assert_eq!(applied.last_applied, Some(LogId::new(1, 3)), "the old applied state");
        let keys: Vec<&[u8]> = page.pairs.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, vec![&b"k-stale-1"[..], b"k-stale-2", b"k00001"], "exactly the old keys");
    }
    assert!(
        sm.durable_applied().await.expect("durable") <= applied.last_applied.map(|l| l.index).unwrap_or(LogIndex(0))
    );
    installed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_during_an_installation_finishes_it_at_start_up() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        // Blocking child work on a runtime of its own.
        tokio::task::spawn_blocking(move || child(&dir)).await.expect("child");
        return;
    }
    let source = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("tempdir");
    let meta = prepare_stream(source.path(), files.path()).await;
    // Killed at the two points of the installation: finished at start-up.
    for point in ["install_staged", "install_ingested"] {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["stream", "meta"] {
            std::fs::copy(files.path().join(f), dir.path().join(f)).expect("copy");
        }
        prepare_receiver(&dir.path().join("db")).await;
        let status = run_child(dir.path(), Some(point), None);
        assert!(!status.success(), "the child was to die at {point}: {status:?}");
        assert!(check_replica(dir.path(), &meta).await, "killed at {point}: the installation is finished at start-up");
    }
    // Killed at moments spread over the transfer and the installation: old or new, never a mix.
    let mut outcomes = Vec::new();
    for ms in [5u64, 40, 80, 120, 200, 400] {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["stream", "meta"] {
            std::fs::copy(files.path().join(f), dir.path().join(f)).expect("copy");
        }
        prepare_receiver(&dir.path().join("db")).await;
        run_child(dir.path(), None, Some(Duration::from_millis(ms)));
        outcomes.push((ms, check_replica(dir.path(), &meta).await));
    }
    eprintln!("killed after (ms, installed): {outcomes:?}");
    // Left alone, the child installs.
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["stream", "meta"] {
        std::fs::copy(files.path().join(f), dir.path().join(f)).expect("copy");
    }
    prepare_receiver(&dir.path().join("db")).await;
    assert!(run_child(dir.path(), None, None).success(), "the child installs when left alone");
    assert!(check_replica(dir.path(), &meta).await);
}
