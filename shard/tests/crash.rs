//! Crash test: a child process writes heavily across many groups and is killed (SIGKILL) in
//! the middle; every write it saw acknowledged must be there after reopening, and no torn or
//! corrupt entry may be read back.

use bytes::Bytes;
use flotilla_raft::{Entry, EntryPayload, GroupId, LogId, LogIndex, LogStorage};
use flotilla_shard::{RocksLog, Store};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

mod common;

const GROUPS: u64 = 32;
const CHILD_ENV: &str = "FLOTILLA_CRASH_CHILD_DIR";

fn payload(group: u64, index: u64) -> Bytes {
    // Large enough that a torn write would be visible, distinct per entry.
    Bytes::from(format!("group {group} entry {index} {}", "x".repeat(200 + (index % 50) as usize)))
}

/// The child: appends to every group as fast as it can, printing each acknowledged write.
fn child(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = Store::open(dir).expect("open");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
        for g in 0..GROUPS {
            let log = RocksLog::new(store.clone(), GroupId(g));
            let tx = tx.clone();
            tokio::spawn(async move {
                let st = log.log_state().await.expect("state");
                let mut next = st.last.or(st.last_purged).map(|l| l.index.0).unwrap_or(0) + 1;
                loop {
                    let e = Entry { log_id: LogId::new(1, next), payload: EntryPayload::Normal(payload(g, next)) };
                    log.append(vec![e]).await.expect("append");
                    let _ = tx.send((g, next));
                    next += 1;
                }
            });
        }
        drop(tx);
        let mut out = std::io::stdout().lock();
        while let Some((g, i)) = rx.recv().await {
            // Printed only after the append returned: an acknowledged, durable write.
            let _ = writeln!(out, "ack {g} {i}");
            let _ = out.flush();
        }
    });
}

#[test]
fn acknowledged_writes_survive_a_kill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..3u64 {
        let target = 500 + round * 700;
        let path = dir.path().to_str().expect("utf-8 path");
        let seen = common::run_and_kill(
            "acknowledged_writes_survive_a_kill",
            CHILD_ENV,
            path,
            target,
            Duration::from_secs(20),
            |ack| {
                let mut parts = ack.split_whitespace();
                let (Some(g), Some(i)) = (parts.next(), parts.next()) else { return };
                let (Ok(g), Ok(i)) = (g.parse::<u64>(), i.parse::<u64>()) else { return };
                let e = acked.entry(g).or_default();
                *e = (*e).max(i);
            },
        );
        assert!(seen > 0, "round {round}: the child acknowledged nothing");

        // Reopen and check every group.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let store = Store::open(dir.path()).expect("reopen after kill");
            for g in 0..GROUPS {
                let log = RocksLog::new(store.clone(), GroupId(g));
                let st = log.log_state().await.expect("state");
                let last = st.last.map(|l| l.index.0).unwrap_or(0);
                let want = acked.get(&g).copied().unwrap_or(0);
                assert!(last >= want, "round {round} group {g}: acknowledged up to {want}, recovered only {last}");
                if last == 0 {
                    continue;
                }
                let entries =
                    log.read_entries(LogIndex(1), LogIndex(last), usize::MAX).await.expect("every entry reads back");
                assert_eq!(entries.len() as u64, last, "round {round} group {g}: gap in the log");
                for e in entries {
                    let i = e.log_id.index.0;
                    assert_eq!(e.payload, EntryPayload::Normal(payload(g, i)), "group {g} entry {i} differs");
                }
            }
        });
    }
}
