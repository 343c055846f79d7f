//! Crash test of merges through the shard host: a child process runs a host with pairs of
//! neighbouring single-node groups, writes to both halves of each pair from several clients
//! and merges the pairs one after another (freeze the right group, then the merge entry in the
//! left one) while the writes go on, and is killed (SIGKILL) somewhere in the middle: between
//! a freeze and its merge entry, while a source is parked, with the absorbing batch in flight.
//! After reopening the host on the same store (twice), each pair is either two groups or one
//! group over both ranges, never both or neither; the merges the child had left half done are
//! finished; and every write the child saw acknowledged reads back through the group that owns
//! its key now.

use flotilla_raft::{GroupId, LogId, Membership, NodeId, RaftError, ReadMode};
use flotilla_shard::{Host, HostError, KeyRange, KvCommand, KvResponse};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

mod common;

const PAIRS: u64 = 6;
const CHILD_ENV: &str = "FLOTILLA_MERGE_CRASH_CHILD_DIR";

/// Pair `p`: group `2p - 1` owns `[p/, p/m)`, group `2p` owns `[p/m, p0)`.
fn left(p: u64) -> GroupId {
    GroupId(2 * p - 1)
}
fn right(p: u64) -> GroupId {
    GroupId(2 * p)
}
fn left_range(p: u64) -> KeyRange {
    KeyRange { start: format!("{p:02}/").into_bytes(), end: Some(format!("{p:02}/m").into_bytes()) }
}
fn right_range(p: u64) -> KeyRange {
    KeyRange { start: format!("{p:02}/m").into_bytes(), end: Some(format!("{p:02}0").into_bytes()) }
}
fn pair_range(p: u64) -> KeyRange {
    KeyRange { start: format!("{p:02}/").into_bytes(), end: Some(format!("{p:02}0").into_bytes()) }
}
/// The merge id of pair `p` (any number above 0, one per pair).
fn merge_id(p: u64) -> u64 {
    100 + p
}

async fn open(dir: &str) -> Host {
    common::open_single(dir).await
}

/// `cmd` on `g`, retried while the single-node group elects itself.
async fn write_led(host: &Host, g: GroupId, cmd: KvCommand) -> Result<KvResponse, HostError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match host.write(g, cmd.clone()).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
}

/// Freezes pair `p`'s right group (if it is still there) and merges it into the left one.
async fn merge_pair(host: &Host, p: u64) {
    let at = match write_led(host, right(p), freeze(p)).await {
        Ok(KvResponse::Frozen { at }) => at,
        // Absorbed already (a run before the crash got that far).
        Err(HostError::UnknownGroup(_)) => return,
        other => panic!("freeze of pair {p}: {other:?}"),
    };
    // A while frozen and not merged: a kill may land there.
    tokio::time::sleep(Duration::from_millis(40)).await;
    match write_led(host, left(p), merge_entry(p, at)).await {
        Ok(KvResponse::Merged { range }) => assert_eq!(range, pair_range(p)),
        // A merge entry of the run before the crash applied first (this copy is refused).
        Ok(KvResponse::Refused(_)) if host.group_range(left(p)) == Some(pair_range(p)) => {}
        other => panic!("merge of pair {p}: {other:?}"),
    }
}

fn freeze(p: u64) -> KvCommand {
    let r = right_range(p);
    KvCommand::Freeze { id: merge_id(p), into: left(p).0, start: r.start, end: r.end }
}

fn merge_entry(p: u64, at: LogId) -> KvCommand {
    let r = right_range(p);
    KvCommand::Merge {
        source: right(p).0,
        id: merge_id(p),
        freeze: at,
        source_start: r.start,
        source_end: r.end,
        voters: [NodeId(1)].into(),
    }
}

/// The group that owns `key` of pair `p` on `host` now.
fn owner(host: &Host, p: u64, key: &[u8]) -> GroupId {
    if right_range(p).contains(key) && host.groups().contains(&right(p)) {
        right(p)
    } else {
        left(p)
    }
}

fn child(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let host = open(dir).await;
        let existing = host.groups();
        for p in 1..=PAIRS {
            for (g, r) in [(left(p), left_range(p)), (right(p), right_range(p))] {
                // A right group absorbed before a crash is not created again.
                let absorbed = g == right(p) && existing.contains(&left(p));
                if !existing.contains(&g) && !absorbed {
                    host.create_group(g, r, Some(Membership::new([NodeId(1)]))).await.expect("create");
                }
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        // Two writers per pair, each on both halves, going wherever the key lives now.
        for p in 1..=PAIRS {
            for client in 0..2u64 {
                let (host, tx) = (host.clone(), tx.clone());
                tokio::spawn(async move {
                    let run = std::process::id();
                    for i in 0u64.. {
                        let half = if i % 2 == 0 { "a" } else { "x" };
                        let key = format!("{p:02}/{half}{run}-{client}-{i}");
                        let value = format!("v{i}");
                        let put = KvCommand::Put { key: key.clone().into_bytes(), value: value.clone().into_bytes() };
                        // Refused while frozen, or routed before the merge: try again.
                        loop {
                            let g = owner(&host, p, key.as_bytes());
                            match write_led(&host, g, put.clone()).await {
                                Ok(KvResponse::Done { .. }) => break,
                                Err(HostError::KeyOutOfRange(_) | HostError::UnknownGroup(_)) => {
                                    tokio::time::sleep(Duration::from_millis(5)).await
                                }
                                other => panic!("write {key}: {other:?}"),
                            }
                        }
                        let _ = tx.send(format!("ack {p} {key} {value}"));
                    }
                });
            }
        }
        // The merges, one pair after another, while the writes go on.
        {
            let host = host.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for p in 1..=PAIRS {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    merge_pair(&host, p).await;
                    let _ = tx.send(format!("merged {p}"));
                }
            });
        }
        drop(tx);
        let mut out = std::io::stdout().lock();
        while let Some(line) = rx.recv().await {
            // Printed only once the write was committed and applied: acknowledged.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
}

/// Checks the host after a crash: each pair is two groups or one over both, and every
/// acknowledged write reads back from its key's owner.
async fn check(host: &Host, acked: &BTreeMap<String, (u64, String)>, round: u64) -> BTreeSet<u64> {
    let mut merged = BTreeSet::new();
    for p in 1..=PAIRS {
        // A merge entry in the left group's log applies again after the restart (its source
        // parked meanwhile, out of `groups()` but still on disk): wait for it to settle.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stored = host.store().groups().expect("stored groups");
            assert!(host.groups().contains(&left(p)), "round {round}: pair {p} lost its left group");
            let two = host.groups().contains(&right(p))
                && host.group_range(left(p)) == Some(left_range(p))
                && host.group_range(right(p)) == Some(right_range(p));
            let one = !stored.contains(&right(p)) && host.group_range(left(p)) == Some(pair_range(p));
            if one {
                merged.insert(p);
            }
            if two || one {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: pair {p} neither two groups nor one: running {:?}, stored {stored:?}, left range {:?}",
                host.groups(),
                host.group_range(left(p))
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (k, (p, v)) in acked {
        let g = owner(host, *p, k.as_bytes());
        let deadline = Instant::now() + Duration::from_secs(20);
        let got = loop {
            match host.get(g, k.clone().into_bytes(), ReadMode::ReadIndex).await {
                Err(HostError::Raft(RaftError::NotLeader { .. })) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                // A right group frozen before the crash: its local state is still the data.
                Err(HostError::KeyOutOfRange(_)) if g == right(*p) => {
                    let sm = host.state_machine(g).expect("right group");
                    break sm.get(k.clone().into_bytes()).await.expect("local read");
                }
                other => break other.expect("read"),
            }
        };
        assert_eq!(got.as_deref(), Some(v.as_bytes()), "round {round}: acknowledged write {k} lost (group {g})");
    }
    merged
}

#[test]
fn merges_killed_at_any_step_lose_no_acknowledged_write_and_finish_after_the_restart() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path").to_string();
    let mut acked: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut merged_seen = BTreeSet::new();
    for round in 0..2u64 {
        let test = "merges_killed_at_any_step_lose_no_acknowledged_write_and_finish_after_the_restart";
        common::run_and_kill_collecting(test, CHILD_ENV, &path, 1_500 + round * 1_500, &mut acked);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            let host = open(&path).await;
            let merged = check(&host, &acked, round).await;
            assert!(
                merged_seen.is_subset(&merged),
                "round {round}: a merge went back: {merged_seen:?} then {merged:?}"
            );
            merged_seen = merged;
            host.shutdown().await;
        });
    }
    // The last restart finishes every merge (a right group left frozen, a merge entry left
    // waiting for its source), and every acknowledged write is in the merged groups.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let host = open(&path).await;
        for p in 1..=PAIRS {
            merge_pair(&host, p).await;
        }
        let merged = check(&host, &acked, 2).await;
        assert_eq!(merged, (1..=PAIRS).collect::<BTreeSet<_>>());
        host.shutdown().await;
    });
    eprintln!("{} acknowledged writes checked; merged before the last restart: {merged_seen:?}", acked.len());
}
