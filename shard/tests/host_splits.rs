//! Splits on the shard host: both halves survive restarts, replicas that missed a split or
//! joined after it catch up, and a split-born group is started by its split alone.

mod host_cluster;

use flotilla_raft::{GroupId, Membership, NodeId, RaftError, Role};
use flotilla_shard::{Host, HostError, KeyRange, KvCommand, KvResponse, Store};
use host_cluster::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_splits_while_clients_write_and_both_halves_survive_a_restart() {
    let net = Arc::new(MemNet::default());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let open = |net: Arc<MemNet>, i: usize, dir: std::path::PathBuf| async move {
        let id = NodeId(i as u64 + 1);
        let h = Host::open(Store::open(&dir).expect("open"), config(id.0), net.clone()).await.expect("host");
        net.hosts.write().expect("lock").insert(id, h.clone());
        h
    };
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        hosts.push(open(net.clone(), i, d.path().to_path_buf()).await);
    }
    let c = Arc::new(Cluster::of(net.clone(), hosts));
    let members = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
    for h in &c.hosts {
        h.create_group(GroupId(1), KeyRange::all(), Some(members.clone())).await.expect("create");
    }
    // Writers on both sides of the future split point, running across the split.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for prefix in ["a", "z"] {
        let (c, stop) = (c.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("{prefix}{i:05}");
                // Before the split group 1 owns everything; after it, "z..." belongs to 2.
                for g in [1, 2] {
                    match c.put(GroupId(g), &k, "v").await {
                        Ok(KvResponse::Done { .. }) => {
                            acked.push((k.clone(), g));
                            break;
                        }
                        // Not applied: the key moved, the group is not here yet, or a new
                        // leader replaced the entry (elections under load).
                        Err(HostError::KeyOutOfRange(_))
                        | Err(HostError::UnknownGroup(_))
                        | Err(HostError::Raft(RaftError::Dropped { .. })) => continue,
                        // Outcome unknown: not counted as acknowledged (nor as lost).
                        Err(HostError::Raft(RaftError::Timeout | RaftError::Indeterminate { .. })) => break,
                        Ok(other) => panic!("unexpected answer {other:?}"),
                        Err(e) => panic!("write {k}: {e}"),
                    }
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut target = NodeId(1);
    let resp = loop {
        match c.host(target).write(GroupId(1), split.clone()).await {
            Err(HostError::Raft(RaftError::NotLeader { leader })) if Instant::now() < deadline => {
                target = leader.unwrap_or(NodeId(target.0 % 3 + 1));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.expect("split"),
        }
    };
    let left = KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) };
    let right = KeyRange { start: b"m".to_vec(), end: None };
    assert_eq!(resp, KvResponse::Split { left: left.clone(), right: right.clone() });
    // Every host starts group 2 and it elects a leader.
    c.wait_info("group 2 on every host", |infos| infos.iter().any(|i| i.group == GroupId(2))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(acked.iter().any(|(k, g)| k.starts_with('z') && *g == 2), "writes reached the new group");
    // Group 1 now refuses the right half; a second split at the same key is refused.
    assert!(matches!(
        c.host(target).write(GroupId(1), KvCommand::Put { key: b"zz".to_vec(), value: Vec::new() }).await,
        Err(HostError::KeyOutOfRange(GroupId(1)))
    ));
    // Restart every host: both halves come back with their ranges and every acknowledged write.
    drop(c);
    let old: Vec<Host> = net.hosts.read().expect("lock").values().cloned().collect();
    for h in &old {
        h.shutdown().await;
    }
    drop(old);
    net.hosts.write().expect("lock").clear();
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let h = open(net.clone(), i, d.path().to_path_buf()).await;
        assert_eq!(h.groups(), vec![GroupId(1), GroupId(2)]);
        hosts.push(h);
    }
    let c = Cluster::of(net, hosts);
    for (k, _) in &acked {
        let g = if k.as_str() < "m" { 1 } else { 2 };
        assert_eq!(c.get(GroupId(g), k).await.expect("read"), Some(b"v".to_vec()), "{k} in group {g}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_a_split_gets_the_new_groups_data_by_snapshot() {
    let c = Cluster::start_with(3, small_snapshots).await;
    let members = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
    for h in &c.hosts {
        h.create_group(GroupId(1), KeyRange::all(), Some(members.clone())).await.expect("create");
    }
    c.put(GroupId(1), "a0", "1").await.expect("write");
    let lagging = NodeId(3);
    if c.host(lagging).group_info().await.expect("info")[0].role == Role::Leader {
        c.host(lagging).transfer_leader(GroupId(1), NodeId(1)).await.expect("transfer");
    }
    c.net.cut.write().expect("lock").insert(lagging);
    // The leader keeps entries for a follower whose matched index moved within two election
    // timeouts; past that, the log is purged and node 3 needs a snapshot.
    tokio::time::sleep(Duration::from_millis(2 * 300 + 100)).await;
    // Written while node 3 is away, then split off into group 2: node 3 never applies it.
    c.put(GroupId(1), "x1", "right half, before the split").await.expect("write");
    for i in 0..50 {
        c.put(GroupId(1), &format!("b{i:03}"), "v").await.expect("write");
    }
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let mut target = NodeId(1);
    loop {
        match c.host(target).write(GroupId(1), split.clone()).await {
            Err(HostError::Raft(RaftError::NotLeader { leader })) => {
                target = leader.unwrap_or(NodeId(2));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => {
                assert!(matches!(other, Ok(KvResponse::Split { .. })), "{other:?}");
                break;
            }
        }
    }
    // Group 1 moves on past the split (snapshot, purge), so node 3 will skip the split entry.
    for i in 0..60 {
        c.put(GroupId(1), &format!("c{i:03}"), "v").await.expect("write");
    }
    // Group 2 lives on nodes 1 and 2 only so far: write through them.
    let y1 = KvCommand::Put { key: b"y1".to_vec(), value: b"right half, after the split".to_vec() };
    let deadline = Instant::now() + Duration::from_secs(30);
    'written: loop {
        for n in [1, 2] {
            if c.host(NodeId(n)).write(GroupId(2), y1.clone()).await.is_ok() {
                break 'written;
            }
        }
        assert!(Instant::now() < deadline, "group 2 never took a write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.net.cut.write().expect("lock").clear();
    // Node 3 catches up group 1 by snapshot and adopts the narrower range...
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.host(lagging).group_range(GroupId(1)).and_then(|r| r.end) != Some(b"m".to_vec()) {
        assert!(Instant::now() < deadline, "node 3 never adopted the split range");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!c.host(lagging).groups().contains(&GroupId(2)), "no split entry applied on node 3");
    // ...and a replica of group 2 created there empty (as the node's reconciler does) gets the
    // new group's data by snapshot, including what was written before the split.
    let right = KeyRange { start: b"m".to_vec(), end: None };
    c.host(lagging).create_group(GroupId(2), right.clone(), None).await.expect("create empty replica");
    let sm = flotilla_shard::KvStateMachine::new(c.host(lagging).store().clone(), GroupId(2), right);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let x1 = sm.get(b"x1".to_vec()).await.expect("read");
        let y1 = sm.get(b"y1".to_vec()).await.expect("read");
        if x1.as_deref() == Some(&b"right half, before the split"[..]) && y1.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "node 3's replica of group 2 never got the data: x1={x1:?} y1={y1:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// Splits group 1 (on nodes 1-3, whose leader holds a snapshot taken before the split) at "m",
/// then adds a learner on node 4, created empty with `placeholder` as its range. The learner
/// must catch up by snapshot with the left half's range and data, and none of the right half.
async fn learner_added_after_a_split(placeholder: KeyRange, then_split_at: Option<&[u8]>) {
    let c = Cluster::start_with(4, small_snapshots).await;
    let voters = [1, 2, 3];
    let members = Membership::new(voters.map(NodeId));
    for n in voters {
        c.host(NodeId(n)).create_group(GroupId(1), KeyRange::all(), Some(members.clone())).await.expect("create");
    }
    // Past the snapshot threshold (40 entries): a snapshot of the whole range, the log purged.
    for i in 0..45 {
        let k = format!("{}{i:03}", if i % 2 == 0 { "a" } else { "z" });
        let put = KvCommand::Put { key: k.into_bytes(), value: b"v".to_vec() };
        write_on(&c, &voters, GroupId(1), put).await.expect("write");
    }
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let r = write_on(&c, &voters, GroupId(1), split).await.expect("split");
    assert!(matches!(r, KvResponse::Split { .. }), "{r:?}");
    let mut left = KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) };
    let node4 = c.host(NodeId(4));
    node4.create_group(GroupId(1), placeholder, None).await.expect("create empty replica");
    let leader = leader_among(&c, &voters, GroupId(1)).await;
    let index = c.host(leader).add_learner(GroupId(1), NodeId(4)).await.expect("add learner");
    if let Some(at) = then_split_at {
        // The snapshot is wider than the placeholder: refused, without stopping the group,
        // until the group applies the split the map made ahead of it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let info = node4.group_info().await.expect("info").into_iter().find(|i| i.group == GroupId(1));
        let info = info.expect("group 1 on node 4");
        assert!(info.stopped.is_none(), "the learner's group stopped: {:?}", info.stopped);
        assert_eq!(info.applied, flotilla_raft::LogIndex(0), "a snapshot wider than the replica's range was installed");
        let split = KvCommand::Split { at: at.to_vec(), new_group: 3 };
        let r = write_on(&c, &voters, GroupId(1), split).await.expect("split");
        assert!(matches!(r, KvResponse::Split { .. }), "{r:?}");
        left = KeyRange { start: Vec::new(), end: Some(at.to_vec()) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = node4.group_info().await.expect("info").into_iter().find(|i| i.group == GroupId(1));
        let info = info.expect("group 1 on node 4");
        assert!(info.stopped.is_none(), "the learner's group stopped: {:?}", info.stopped);
        if info.applied >= index && node4.group_range(GroupId(1)) == Some(left.clone()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the learner never caught up: {info:?}, {:?}",
            node4.group_range(GroupId(1))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sm = flotilla_shard::KvStateMachine::new(node4.store().clone(), GroupId(1), left);
    for i in [0, 20, 44] {
        assert_eq!(sm.get(format!("a{i:03}").into_bytes()).await.expect("read"), Some(b"v".to_vec()), "a{i:03}");
    }
    // The right half belongs to group 2, which has no replica on node 4.
    let store = node4.store();
    let data = store.db().get_cf(store.cf(flotilla_shard::CF_DATA).expect("cf"), b"z001").expect("read");
    assert_eq!(data, None, "node 4 holds data of the right half");
    assert!(!node4.groups().contains(&GroupId(2)));
    c.shutdown().await;
}

/// Issue 12 (2): the new replica, created with the split's narrowed range, refused the leader's
/// pre-split snapshot (wider range) and its group stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_after_a_split_catches_up_by_snapshot_with_the_narrowed_range() {
    learner_added_after_a_split(KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) }, None).await;
}

/// Issue 12 (2): a replica created empty with a placeholder range narrower than the group's
/// (the map split the shard again before Raft carried it out) stopped on the wider snapshot.
/// It must wait, and catch up once the group applied that split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_created_with_a_narrower_placeholder_range_catches_up_once_the_group_splits_there() {
    learner_added_after_a_split(KeyRange { start: Vec::new(), end: Some(b"f".to_vec()) }, Some(b"f")).await;
}

/// Between a split's prepare (the source's range narrows at once) and its durable write, the
/// new group's id is already taken here: nothing else (the node's reconciler, following a map
/// that has the new shard) may create it empty, which would leave a replica unable to vote and
/// keep the split's own state from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_group_cannot_be_created_by_anyone_else_while_its_split_is_being_written() {
    let cluster = Cluster::start_with(1, |c| c.pollers = 1).await;
    let host = cluster.hosts[0].clone();
    let whole = KeyRange { start: Vec::new(), end: None };
    host.create_group(GroupId(1), whole, Some(Membership::new([NodeId(1)]))).await.expect("create");
    cluster.put(GroupId(1), "a", "v").await.expect("put");
    // A write is answered before its apply is stored: a read waits for that store, so no
    // write of the put is held back (its group would wait for it, and the split with it).
    assert_eq!(cluster.get(GroupId(1), "a").await.expect("get"), Some(b"v".to_vec()));
    host.hold_applies(true);
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let right = KeyRange { start: b"m".to_vec(), end: None };
    assert!(matches!(host.write(GroupId(1), split).await, Ok(KvResponse::Split { .. })));
    assert_eq!(host.group_range(GroupId(1)).and_then(|r| r.end), Some(b"m".to_vec()), "narrowed at prepare");
    assert!(!host.groups().contains(&GroupId(2)), "the split's write is held: group 2 has not started");
    let created = tokio::time::timeout(Duration::from_secs(5), host.create_group(GroupId(2), right, None)).await;
    assert!(
        matches!(created, Ok(Err(HostError::GroupExists(GroupId(2))))),
        "a second start of the split's group must be refused at once: {created:?}"
    );
    // Once written, the split's own state starts and serves.
    host.hold_applies(false);
    cluster.wait_info("group 2 started", |infos| infos.iter().any(|i| i.group == GroupId(2))).await;
    cluster.put(GroupId(2), "z", "w").await.expect("put in the split's group");
    assert_eq!(cluster.get(GroupId(2), "z").await.expect("get"), Some(b"w".to_vec()));
    cluster.shutdown().await;
}

/// A split's group is reserved while its split is being written, and with it every group the
/// map split off it since: those are started by the new group's own splits, with its
/// configuration. Created empty by anyone else meanwhile (the node's reconciler, which sees the
/// source narrowed and the new group not yet registered), a replica could never vote, and the
/// split's state could not start it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_split_off_a_split_group_being_started_is_left_to_that_split() {
    let cluster = Cluster::start_with(1, |c| c.pollers = 1).await;
    let host = cluster.hosts[0].clone();
    host.create_group(GroupId(1), KeyRange::all(), Some(Membership::new([NodeId(1)]))).await.expect("create");
    cluster.put(GroupId(1), "a", "v").await.expect("put");
    assert_eq!(cluster.get(GroupId(1), "a").await.expect("get"), Some(b"v".to_vec()));
    host.hold_applies(true);
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    assert!(matches!(host.write(GroupId(1), split).await, Ok(KvResponse::Split { .. })));
    assert!(!host.groups().contains(&GroupId(2)), "the split's write is held: group 2 has not started");
    // The map has split the new shard again, at "t": group 3 owns ["t", end) there.
    let third = KeyRange { start: b"t".to_vec(), end: None };
    let created = tokio::time::timeout(Duration::from_secs(5), host.create_group(GroupId(3), third, None)).await;
    let refused = matches!(&created, Ok(Err(e)) if e.to_string().contains("overlaps group 2"));
    assert!(refused, "group 3's keys belong to group 2 until it splits: {created:?}");
    host.hold_applies(false);
    cluster.wait_info("group 2 started", |infos| infos.iter().any(|i| i.group == GroupId(2))).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let split = KvCommand::Split { at: b"t".to_vec(), new_group: 3 };
        match host.write(GroupId(2), split).await {
            Ok(KvResponse::Split { .. }) => break,
            other => assert!(Instant::now() < deadline, "group 2 never split: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Started from the split's state: it elects itself and serves.
    cluster.wait_info("group 3 started", |infos| infos.iter().any(|i| i.group == GroupId(3))).await;
    cluster.put(GroupId(3), "z", "w").await.expect("put in the split's group");
    assert_eq!(cluster.get(GroupId(3), "z").await.expect("get"), Some(b"w".to_vec()));
    cluster.shutdown().await;
}
