//! Crash test through the shard host: a child process runs a host whose groups take writes
//! from many concurrent clients and is killed (SIGKILL) in the middle; after reopening the
//! host on the same store, every write the child saw acknowledged reads back (linearizably,
//! through Raft), and the recovered logs decode (no torn entry is used).

use flotilla_raft::{GroupId, Membership, NodeId, RaftError, ReadMode};
use flotilla_shard::{Host, HostError, KeyRange, KvCommand};
use std::collections::BTreeMap;
use std::io::Write;

mod common;
use std::time::{Duration, Instant};

const GROUPS: u64 = 24;
const CHILD_ENV: &str = "FLOTILLA_HOST_CRASH_CHILD_DIR";

fn range_of(g: u64) -> KeyRange {
    KeyRange { start: format!("{g:04}/").into_bytes(), end: Some(format!("{g:04}0").into_bytes()) }
}

async fn open(dir: &str) -> Host {
    common::open_single(dir).await
}

/// Whether to retry: the (single-node) group is still electing itself after a start.
fn retry<T>(r: &Result<T, HostError>, deadline: Instant) -> bool {
    match r {
        Err(HostError::Raft(RaftError::NotLeader { .. })) if Instant::now() < deadline => true,
        Err(e) => panic!("request failed: {e}"),
        Ok(_) => false,
    }
}

async fn write_led(host: &Host, g: u64, cmd: KvCommand) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while retry(&host.write(GroupId(g), cmd.clone()).await, deadline) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_led(host: &Host, g: u64, key: &str) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = host.get(GroupId(g), key.as_bytes().to_vec(), ReadMode::ReadIndex).await;
        if !retry(&r, deadline) {
            return r.ok().flatten();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn child(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let host = open(dir).await;
        let existing = host.groups();
        for g in 1..=GROUPS {
            if !existing.contains(&GroupId(g)) {
                host.create_group(GroupId(g), range_of(g), Some(Membership::new([NodeId(1)]))).await.expect("create");
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, String, String)>();
        // Four clients per group, each writing its own keys in sequence.
        for g in 1..=GROUPS {
            for client in 0..4u64 {
                let (host, tx) = (host.clone(), tx.clone());
                tokio::spawn(async move {
                    let run = std::process::id();
                    for i in 0u64.. {
                        let key = format!("{g:04}/r{run}/c{client}/{i}");
                        let value = format!("run {run} value {i} {}", "v".repeat((i % 40) as usize));
                        let cmd = KvCommand::Put { key: key.clone().into_bytes(), value: value.clone().into_bytes() };
                        write_led(&host, g, cmd).await;
                        let _ = tx.send((g, key, value));
                    }
                });
            }
        }
        drop(tx);
        let mut out = std::io::stdout().lock();
        while let Some((g, k, v)) = rx.recv().await {
            // Printed only after the write was committed and applied: acknowledged.
            let _ = writeln!(out, "ack {g} {k} {v}");
            let _ = out.flush();
        }
    });
}

#[test]
fn acknowledged_writes_through_the_host_survive_a_kill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path").to_string();
    let mut acked: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for round in 0..2u64 {
        let test = "acknowledged_writes_through_the_host_survive_a_kill";
        common::run_and_kill_collecting(test, CHILD_ENV, &path, 800 + round * 800, &mut acked);

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            let host = open(&path).await;
            assert_eq!(host.groups().len() as u64, GROUPS, "round {round}: every group resumes");
            for (k, (g, v)) in &acked {
                let got = get_led(&host, *g, k).await;
                assert_eq!(got.as_deref(), Some(v.as_bytes()), "round {round}: acknowledged write {k} lost");
            }
            host.shutdown().await;
        });
    }
}
