//! Merges on the shard host (see `flotilla_shard::merge`): the right group freezes, the left
//! absorbs it at a known freeze on every replica, through restarts at each step, a replica
//! whose apply lags, a replica that catches up by snapshot on either side, and an abort.

mod host_cluster;

use flotilla_raft::{GroupId, LogId, Membership, NodeId};
use flotilla_shard::{Host, HostError, KeyRange, KvCommand, KvResponse, Store};
use host_cluster::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const LEFT: GroupId = GroupId(1);
const RIGHT: GroupId = GroupId(2);
const MERGE_ID: u64 = 7;

fn left_range() -> KeyRange {
    KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) }
}

fn right_range() -> KeyRange {
    KeyRange { start: b"m".to_vec(), end: None }
}

fn voters(n: u64) -> BTreeSet<NodeId> {
    (1..=n).map(NodeId).collect()
}

/// Groups 1 (`[.., m)`) and 2 (`[m, ..)`) on every host of `c`, each with a few keys.
async fn two_groups(c: &Cluster) {
    let members = Membership::new(voters(c.hosts.len() as u64));
    for h in &c.hosts {
        h.create_group(LEFT, left_range(), Some(members.clone())).await.expect("create left");
        h.create_group(RIGHT, right_range(), Some(members.clone())).await.expect("create right");
    }
    for i in 0..10 {
        c.put(LEFT, &format!("a{i:02}"), "left").await.expect("write left");
        c.put(RIGHT, &format!("x{i:02}"), "right").await.expect("write right");
    }
    // Both groups led by node 1: the tests write through nodes 1 and 2 while node 3 holds
    // its applies or lags, and a group that node 3 happened to win would refuse them all.
    let all = all_nodes(c);
    for g in [LEFT, RIGHT] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leader = leader_among(c, &all, g).await;
            if leader == NodeId(1) {
                break;
            }
            assert!(Instant::now() < deadline, "group {g} never moved its leadership to node 1");
            let _ = c.host(leader).transfer_leader(g, NodeId(1)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn all_nodes(c: &Cluster) -> Vec<u64> {
    c.hosts.iter().map(|h| h.node().0).collect()
}

async fn freeze(c: &Cluster, nodes: &[u64]) -> LogId {
    match write_on(c, nodes, RIGHT, freeze_cmd()).await {
        Ok(KvResponse::Frozen { at }) => at,
        other => panic!("freeze: {other:?}"),
    }
}

fn freeze_cmd() -> KvCommand {
    KvCommand::Freeze { id: MERGE_ID, into: LEFT.0, start: b"m".to_vec(), end: None }
}

fn merge_cmd(freeze: LogId, n: u64) -> KvCommand {
    KvCommand::Merge {
        source: RIGHT.0,
        id: MERGE_ID,
        freeze,
        source_start: b"m".to_vec(),
        source_end: None,
        voters: voters(n),
    }
}

/// Waits until `host`'s replica of `group` applied `index`.
async fn wait_applied(host: &Host, group: GroupId, index: flotilla_raft::LogIndex) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let i = host.group_info_of(group).await.expect("info");
        if i.applied >= index {
            return;
        }
        assert!(Instant::now() < deadline, "node {} never applied {index} of {group}", host.node());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `host`'s store still holds a descriptor of group 2 (running, parked or stopped).
async fn right_stored(host: &Host) -> bool {
    host.store().groups().expect("groups").contains(&RIGHT)
}

/// Waits until `host` holds group 1 over every key and no group 2, in memory and on disk.
async fn wait_merged(host: &Host) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.group_range(LEFT) != Some(KeyRange::all()) || host.groups().contains(&RIGHT) || right_stored(host).await
    {
        assert!(
            Instant::now() < deadline,
            "node {} never merged: groups {:?}, left range {:?}",
            host.node(),
            host.groups(),
            host.group_range(LEFT)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `key` from `host`'s local state of group 1.
async fn local(host: &Host, key: &str) -> Option<Vec<u8>> {
    host.state_machine(LEFT).expect("left group").get(key.as_bytes().to_vec()).await.expect("read")
}

/// Shuts host `i` (0-based) down and opens it again on its store.
async fn restart(c: &mut Cluster, i: usize) {
    let old = c.hosts.remove(i);
    let id = old.node();
    c.net.hosts.write().expect("lock").remove(&id);
    old.shutdown().await;
    drop(old);
    // The store closes once every handle is gone (tasks of the old host may hold one briefly).
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = loop {
        match Store::open(c._dirs[i].path()) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen node {id}: {e}"),
        }
    };
    let h = Host::open(store, config(id.0), c.net.clone()).await.expect("host");
    c.net.hosts.write().expect("lock").insert(id, h.clone());
    c.hosts.insert(i, h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_left_group_absorbs_the_frozen_right_one_on_every_replica_and_the_merge_survives_restarts() {
    let mut c = Cluster::start(3).await;
    two_groups(&c).await;
    let nodes = all_nodes(&c);
    // A freeze decided on another range (a split the map made that the group has not applied
    // yet) is refused, and the group goes on unfrozen.
    let other = KvCommand::Freeze { id: MERGE_ID, into: LEFT.0, start: b"m".to_vec(), end: Some(b"t".to_vec()) };
    match write_on(&c, &nodes, RIGHT, other).await {
        Ok(KvResponse::Refused(why)) => assert!(why.contains("decided on"), "{why}"),
        other => panic!("a freeze of another range: {other:?}"),
    }
    c.put(RIGHT, "x98", "still writable").await.expect("write");
    let at = freeze(&c, &nodes).await;
    // Proposed again (a leader retrying after a lost answer): the first freeze stands.
    assert_eq!(freeze(&c, &nodes).await, at);
    // Frozen: writes and reads are refused (the caller retries where the keys live: once the
    // merge commits, the left group may write them).
    match c.put(RIGHT, "x99", "late").await {
        Err(HostError::KeyOutOfRange(g)) => assert_eq!(g, RIGHT),
        other => panic!("a write to a frozen group: {other:?}"),
    }
    let split = KvCommand::Split { at: b"t".to_vec(), new_group: 3 };
    assert!(matches!(write_on(&c, &nodes, RIGHT, split).await, Err(HostError::KeyOutOfRange(_))));
    assert!(matches!(c.get(RIGHT, "x01").await, Err(HostError::KeyOutOfRange(_))));
    for h in &c.hosts {
        wait_applied(h, RIGHT, at.index).await;
    }
    // A restart of a node between the freeze and the merge keeps it frozen.
    restart(&mut c, 2).await;
    assert!(c.host(NodeId(3)).merge_state(RIGHT).expect("right group").is_frozen());
    // A merge that does not fit the left group's state is refused alike everywhere.
    let wrong = KvCommand::Merge {
        source: RIGHT.0,
        id: MERGE_ID,
        freeze: at,
        source_start: b"n".to_vec(),
        source_end: None,
        voters: voters(3),
    };
    assert!(matches!(write_on(&c, &nodes, LEFT, wrong).await, Ok(KvResponse::Refused(_))));
    let r = write_on(&c, &nodes, LEFT, merge_cmd(at, 3)).await.expect("merge");
    assert_eq!(r, KvResponse::Merged { range: KeyRange::all() });
    for h in &c.hosts {
        wait_merged(h).await;
        for i in 0..10 {
            assert_eq!(local(h, &format!("x{i:02}")).await.as_deref(), Some(&b"right"[..]), "node {}", h.node());
            assert_eq!(local(h, &format!("a{i:02}")).await.as_deref(), Some(&b"left"[..]), "node {}", h.node());
        }
    }
    // The merged group takes writes over the whole range.
    c.put(LEFT, "x99", "after").await.expect("write after the merge");
    assert_eq!(c.get(LEFT, "x99").await.expect("read").as_deref(), Some(&b"after"[..]));
    for i in 0..3 {
        restart(&mut c, i).await;
    }
    for h in &c.hosts {
        wait_merged(h).await;
        assert_eq!(h.groups(), vec![LEFT], "node {}: the absorbed group does not come back", h.node());
    }
    assert_eq!(c.get(LEFT, "x05").await.expect("read").as_deref(), Some(&b"right"[..]));
    assert_eq!(c.get(LEFT, "x99").await.expect("read").as_deref(), Some(&b"after"[..]));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_entry_waits_for_a_source_whose_freeze_is_not_written_yet_and_a_crash_there_loses_nothing() {
    let mut c = Cluster::start(3).await;
    two_groups(&c).await;
    let nodes = all_nodes(&c);
    // Node 3 answers and holds its apply writes: its replica of group 2 has applied the
    // freeze in memory, but its stored state is short of it.
    c.host(NodeId(3)).hold_applies(true);
    let at = freeze(&c, &[1, 2]).await;
    for n in [1, 2] {
        wait_applied(c.host(NodeId(n)), RIGHT, at.index).await;
    }
    let r = write_on(&c, &[1, 2], LEFT, merge_cmd(at, 3)).await.expect("merge");
    assert_eq!(r, KvResponse::Merged { range: KeyRange::all() });
    wait_merged(c.host(NodeId(1))).await;
    wait_merged(c.host(NodeId(2))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h3 = c.host(NodeId(3));
    assert_eq!(h3.group_range(LEFT), Some(left_range()), "node 3 cannot merge before its freeze is written");
    // A crash now (the held writes are lost with the process): the source's state is intact,
    // and after the restart node 3 applies the freeze and then the merge.
    restart(&mut c, 2).await;
    wait_merged(c.host(NodeId(3))).await;
    for i in 0..10 {
        assert_eq!(local(c.host(NodeId(3)), &format!("x{i:02}")).await.as_deref(), Some(&b"right"[..]));
    }
    let _ = nodes;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_replica_that_holds_the_freeze_but_never_heard_it_committed_applies_it_for_the_merge() {
    let c = Cluster::start(3).await;
    two_groups(&c).await;
    // Node 3 leads neither group, and its replica of group 2 never hears that anything from
    // the next entry (the freeze) on is committed.
    for g in [LEFT, RIGHT] {
        let l = leader_among(&c, &[1, 2, 3], g).await;
        if l == NodeId(3) {
            c.host(l).transfer_leader(g, NodeId(1)).await.expect("transfer");
        }
    }
    let next = c.host(NodeId(1)).group_info_of(RIGHT).await.expect("info").last_index.0 + 1;
    *c.net.hide_commit.write().expect("lock") = Some((NodeId(3), RIGHT, flotilla_raft::LogIndex(next)));
    let at = freeze(&c, &[1, 2]).await;
    // Node 3 holds the freeze entry (the leader counted it), but has not applied it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let i = c.host(NodeId(3)).group_info_of(RIGHT).await.expect("info");
        if i.last_index >= at.index {
            assert!(i.applied < at.index, "node 3 learned the freeze's commit: {i:?}");
            break;
        }
        assert!(Instant::now() < deadline, "node 3 never got the freeze entry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Group 2's other replicas are absorbed: nobody is left to tell node 3 the freeze is
    // committed, but the merge entry it applies in group 1 is proof enough.
    write_on(&c, &[1, 2], LEFT, merge_cmd(at, 3)).await.expect("merge");
    for h in &c.hosts {
        wait_merged(h).await;
    }
    for i in 0..10 {
        assert_eq!(local(c.host(NodeId(3)), &format!("x{i:02}")).await.as_deref(), Some(&b"right"[..]));
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_entry_waits_while_the_source_is_held_then_applies_once_released() {
    let c = Cluster::start(3).await;
    two_groups(&c).await;
    let at = freeze(&c, &[1, 2]).await;
    for h in &c.hosts {
        wait_applied(h, RIGHT, at.index).await;
    }
    // Node 3 holds its apply writes from here: its merge batch is prepared, not written.
    c.host(NodeId(3)).hold_applies(true);
    write_on(&c, &[1, 2], LEFT, merge_cmd(at, 3)).await.expect("merge");
    wait_merged(c.host(NodeId(1))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(right_stored(c.host(NodeId(3))).await, "node 3's absorbing batch is held: group 2 is still on disk");
    c.host(NodeId(3)).hold_applies(false);
    wait_merged(c.host(NodeId(3))).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_group_writes_again_and_its_aborted_merge_never_freezes_it_again() {
    let c = Cluster::start(3).await;
    two_groups(&c).await;
    let nodes = all_nodes(&c);
    freeze(&c, &nodes).await;
    assert!(matches!(c.put(RIGHT, "x50", "v").await, Err(HostError::KeyOutOfRange(_))));
    let thawed = write_on(&c, &nodes, RIGHT, KvCommand::Thaw { id: MERGE_ID }).await.expect("thaw");
    assert_eq!(thawed, KvResponse::Done { previous: None });
    c.put(RIGHT, "x50", "v").await.expect("a thawed group takes writes");
    // A late copy of the aborted merge's freeze does not stop the group again.
    let late = write_on(&c, &nodes, RIGHT, freeze_cmd()).await;
    assert!(matches!(late, Ok(KvResponse::Refused(_))), "{late:?}");
    c.put(RIGHT, "x51", "v").await.expect("still writable");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_caught_up_by_snapshot_while_frozen_is_frozen_too() {
    let c = Cluster::start_with(3, small_snapshots).await;
    two_groups(&c).await;
    let lagging = NodeId(3);
    c.net.cut.write().expect("lock").insert(lagging);
    for i in 0..30 {
        write_on(&c, &[1, 2], RIGHT, KvCommand::Put { key: format!("y{i:02}").into_bytes(), value: b"v".to_vec() })
            .await
            .expect("write");
    }
    let at = freeze(&c, &[1, 2]).await;
    let leader = leader_among(&c, &[1, 2], RIGHT).await;
    c.host(leader).compact_log(RIGHT).await.expect("compact");
    c.net.cut.write().expect("lock").clear();
    wait_applied(c.host(lagging), RIGHT, at.index).await;
    let state = c.host(lagging).merge_state(RIGHT).expect("right group");
    assert_eq!(state.frozen.map(|f| (f.id, f.into, f.at)), Some((MERGE_ID, LEFT, at)), "node 3's replica: {state:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_the_merge_entry_takes_the_merged_snapshot_and_retires_its_frozen_source() {
    let c = Cluster::start_with(3, small_snapshots).await;
    two_groups(&c).await;
    let lagging = NodeId(3);
    let at = freeze(&c, &[1, 2, 3]).await;
    for h in &c.hosts {
        wait_applied(h, RIGHT, at.index).await;
    }
    c.net.cut.write().expect("lock").insert(lagging);
    write_on(&c, &[1, 2], LEFT, merge_cmd(at, 3)).await.expect("merge");
    // (A replica that has not applied the merge yet refuses keys of the right half.)
    wait_merged(c.host(NodeId(1))).await;
    wait_merged(c.host(NodeId(2))).await;
    for i in 0..40 {
        write_on(&c, &[1, 2], LEFT, KvCommand::Put { key: format!("z{i:02}").into_bytes(), value: b"new".to_vec() })
            .await
            .expect("write");
    }
    let leader = leader_among(&c, &[1, 2], LEFT).await;
    c.host(leader).compact_log(LEFT).await.expect("compact");
    let written = c.host(leader).group_info_of(LEFT).await.expect("info").committed;
    c.net.cut.write().expect("lock").clear();
    let h3 = c.host(lagging);
    wait_merged(h3).await;
    // Merged is not caught up: the writes after the merge may still be on their way to node 3
    // (as entries, when the leader's log still holds them).
    wait_applied(h3, LEFT, written).await;
    assert_eq!(local(h3, "z39").await.as_deref(), Some(&b"new"[..]));
    assert_eq!(local(h3, "x03").await.as_deref(), Some(&b"right"[..]));
    c.shutdown().await;
}
