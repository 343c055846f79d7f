//! Regression: the first append after a purge (log compaction after a snapshot) used to
//! deadlock on the log's cached-last-id lock, stopping the group's poller thread.

use flotilla_raft::{Action, Entry, EntryPayload, GroupId, IoId, LogId};
use flotilla_shard::{RocksLog, Store};
use std::time::Duration;

fn blank(i: u64) -> Entry {
    Entry { log_id: LogId::new(1, i), payload: EntryPayload::Blank }
}

/// Builds the write of `action` on a blocking thread (where a deadlock cannot hang the test)
/// and makes it durable.
async fn write(store: &Store, log: &RocksLog, action: Action) {
    let l = log.clone();
    // A plain thread, not Tokio's blocking pool: a deadlocked thread must not keep the test's
    // runtime from shutting down.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(l.write_ops(&action).map(|(ops, _)| ops));
    });
    let built = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the log write was built in time (no deadlock)")
        .expect("write_ops");
    store.write(built, true).await.expect("write");
}

#[tokio::test]
async fn append_after_purge_does_not_deadlock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let log = RocksLog::new(store.clone(), GroupId(7));
    write(&store, &log, Action::AppendEntries { io: IoId(1), entries: (1..=3).map(blank).collect() }).await;
    write(&store, &log, Action::PurgeUpTo { io: IoId(2), log_id: LogId::new(1, 2) }).await;
    write(&store, &log, Action::AppendEntries { io: IoId(3), entries: vec![blank(4)] }).await;
}
