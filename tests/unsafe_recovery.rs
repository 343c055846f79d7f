//! Unsafe recovery after losing a quorum for good: a 5-node cluster whose meta group and every
//! shard live on nodes 1, 2 and 3 loses nodes 2 and 3 with their disks. Recovery forces every
//! group onto node 1, removes 2 and 3 for good, and the shards come back to three replicas on
//! nodes 1, 4 and 5, writable, with every write node 1 had.

mod common;

use common::cluster::Cluster;
use flotilla::meta::META_GROUP;
use flotilla::placement::{NodeId, ReplicaRole};
use flotilla::unsafe_recovery::{recover, wait_replicated, RecoveryError};
use flotilla::wire::AdminRequest;
use flotilla::Client;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const SHARDS: u32 = 4;
const KEYS: usize = 40;

fn key(i: usize) -> Vec<u8> {
    // Spread over the shards' ranges (the dev split keys are two hex digits).
    format!("{:02x}key-{i}", i * 256 / KEYS).into_bytes()
}

/// Stops nodes `ids` and deletes their data directories: lost for good. Returns them.
async fn lose_for_good(c: &mut Cluster, ids: &[u64]) -> BTreeSet<NodeId> {
    for id in ids {
        c.stop(*id).await;
        std::fs::remove_dir_all(c.dev.dir().join(format!("node-{id}"))).unwrap();
    }
    ids.iter().map(|id| NodeId(*id)).collect()
}

/// Runs unsafe recovery with `dead` through `client`; its report and progress lines.
async fn recover_logged(client: &Client, dead: &BTreeSet<NodeId>) -> (flotilla::unsafe_recovery::Report, Vec<String>) {
    let mut lines = Vec::new();
    let report = recover(client, dead, &mut |l| {
        eprintln!("{l}");
        lines.push(l)
    })
    .await
    .unwrap();
    (report, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_replicas_lost_for_good_are_recovered_from_the_third() {
    let mut c = Cluster::start_with(5, &[1, 2, 3], &[1, 2, 3], flotilla::meta::dev_split_keys(SHARDS), |_| {}).await;
    let client = c.client().await;
    for i in 0..KEYS {
        client.put(&key(i), format!("v{i}").as_bytes()).await.unwrap();
    }
    // Every acknowledged write is on node 1 too before the loss (a majority of 2 out of 3 could
    // have left it behind, which the report would then show as a lower kept index).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let infos = c.node(1).host().group_info().await.unwrap();
        if infos.iter().all(|i| i.applied == i.committed && i.leader.is_some()) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shards = c.node(1).meta_view().map.shards().count();

    // Mistakes are refused and change nothing: nodes named dead that still answer (a typo in
    // --dead-nodes), a force naming dead nodes that are no majority, or a force whose last log
    // id is not the replica's.
    let alive: BTreeSet<NodeId> = [NodeId(2), NodeId(3)].into();
    let err = recover(&client, &alive, &mut |_| {}).await.unwrap_err();
    assert!(matches!(err, RecoveryError::DeadAnswers(NodeId(2))), "{err}");
    let shard = c.node(1).meta_view().map.shards().next().unwrap().id;
    let info = |infos: Vec<flotilla::shard::GroupInfo>| infos.into_iter().find(|i| i.group == shard).unwrap();
    let before = info(c.node(1).host().group_info().await.unwrap());
    let force = |dead: &[u64], last_term: u64, last_index: u64| AdminRequest::ForceAlone {
        shard,
        dead: dead.iter().map(|n| NodeId(*n)).collect(),
        last_term,
        last_index,
        revision_floor: 0,
    };
    let (term, index) = (before.last_term.0, before.last_index.0);
    for req in [force(&[2], term, index), force(&[2, 3], term, index + 1), force(&[2, 3], term + 1, index)] {
        let got = client.admin_on(NodeId(1), req.clone()).await;
        assert!(matches!(got, Err(flotilla::ClientError::Invalid(_))), "{req:?}: {got:?}");
    }
    let after = info(c.node(1).host().group_info().await.unwrap());
    assert_eq!(after.membership, before.membership, "nothing forced");
    assert_eq!(after.last_index, before.last_index, "nothing appended");
    client.close().await;

    // Nodes 2 and 3 are gone with their disks.
    let dead = lose_for_good(&mut c, &[2, 3]).await;
    let client = Client::connect(c.config(&[1, 4, 5])).await.unwrap();
    let (report, lines) = recover_logged(&client, &dead).await;
    assert!(!lines.is_empty(), "progress is reported");

    // The report names every group (the meta group and each shard) and what was kept.
    assert!(report.lost.is_empty(), "{report:?}");
    let forced: BTreeSet<u64> = report.forced.iter().map(|f| f.decision.shard.0).collect();
    let mut expected: BTreeSet<u64> = c.node(1).meta_view().map.shards().map(|d| d.id.0).collect();
    assert_eq!(expected.len(), shards);
    expected.insert(META_GROUP.0);
    assert_eq!(forced, expected, "every group lost its quorum and was forced");
    assert_eq!(report.forced[0].decision.shard, META_GROUP, "the meta group first");
    for f in &report.forced {
        assert_eq!(f.decision.survivor, NodeId(1));
        assert_eq!(f.decision.dead_voters, vec![NodeId(2), NodeId(3)]);
        assert!(f.decision.kept.index > 0 && f.forced_index == f.decision.kept.index + 1, "{f:?}");
        assert!(f.decision.others.is_empty(), "node 1 was the only survivor");
    }
    assert_eq!(report.changed.len(), shards, "every shard gets new replicas");

    // Back to three replicas on live nodes.
    wait_replicated(&client, &dead, &report.lost, Duration::from_secs(120), &mut |l| eprintln!("{l}")).await.unwrap();
    let state = c.node(1).meta_view();
    assert_eq!(state.removed, dead, "removed for good");
    for d in state.map.shards() {
        let voters: BTreeSet<u64> =
            d.replicas.iter().filter(|r| r.role == ReplicaRole::Voter).map(|r| r.node.0).collect();
        assert_eq!(voters, [1, 4, 5].into(), "shard {}", d.id);
    }

    // The meta group, forced onto node 1 alone, is back on three voters, all on live nodes,
    // each holding the meta state.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let meta = c.node(1).host().group_info_of(META_GROUP).await.unwrap();
        let leader = meta.leader.and_then(|l| [1, 4, 5].contains(&l.0).then_some(l));
        let conf = match leader {
            Some(l) => c.node(l.0).host().group_info_of(META_GROUP).await.unwrap().committed_conf.membership,
            None => meta.committed_conf.membership,
        };
        let voters: BTreeSet<u64> = conf.voters.iter().map(|n| n.0).collect();
        if voters == BTreeSet::from([1, 4, 5]) && conf.learners.is_empty() && !conf.is_joint() {
            break;
        }
        assert!(Instant::now() < deadline, "meta group voters {voters:?}, learners {:?}", conf.learners);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in [4, 5] {
        let sm = c.node(id).host().state_machine(META_GROUP).expect("a meta replica");
        let header = sm.get(flotilla::meta::META_STATE_KEY.to_vec()).await;
        assert!(matches!(header, Ok(Some(_))), "node {id} holds the meta state: {header:?}");
    }

    // Every shard is writable, and every write acknowledged before the loss is there.
    client.refresh().await.unwrap();
    for i in 0..KEYS {
        assert_eq!(client.get(&key(i)).await.unwrap(), Some(format!("v{i}").into_bytes()), "key {i}");
        client.put(&key(i), b"after").await.unwrap();
    }
    // A dead node never registers again.
    let again =
        client.admin(flotilla::wire::AdminRequest::AddNode { node: NodeId(2), addr: "127.0.0.1:9".into() }).await;
    assert!(again.is_err(), "{again:?}");
    client.close().await;
    c.shutdown().await;
}

/// The meta group's survivors were cut off while the rest of it went on changing the meta
/// state, and a node without a meta replica followed those changes; then the nodes that made
/// them are lost. Recovery forces the meta group onto one of the behind survivors and retires
/// the other one's replica; the map change is written above every revision a live node saw,
/// so the follower takes the recovered state at once instead of keeping the lost history's
/// copy (whose revision is higher) or taking the new history's changes on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_saw_a_lost_meta_history_take_the_recovered_one() {
    // Odd: the lost history ends with node 6 draining, which the recovered one never had.
    const LOST_CHANGES: u64 = 31;
    let mut c =
        Cluster::start_with(6, &[1, 2, 3, 4, 5], &[1, 2, 3], flotilla::meta::dev_split_keys(SHARDS), |_| {}).await;
    let client = c.client().await;
    for i in 0..KEYS {
        client.put(&key(i), format!("v{i}").as_bytes()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.node(6).meta_view().nodes.len() < 6 || c.node(1).meta_view().nodes.len() < 6 {
        assert!(Instant::now() < deadline, "node 6 never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let caught_up = |infos: Vec<flotilla::shard::GroupInfo>| infos.iter().all(|i| i.applied == i.committed);
    while !caught_up(c.node(1).host().group_info().await.unwrap()) {
        assert!(Instant::now() < deadline, "node 1 never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await;
    eprintln!("{:?}: registered and caught up", t0.elapsed());

    // Nodes 1 and 5 are cut from 2, 3 and 4, which go on changing the meta state; node 6
    // follows every change.
    for (a, b) in [1, 5].into_iter().flat_map(|a| [2, 3, 4].map(|b| (a, b))) {
        c.node(a).transport().block_peer(NodeId(b));
        c.node(b).transport().block_peer(NodeId(a));
    }
    let behind = c.node(1).meta_revision().max(c.node(5).meta_revision());
    let admin = Client::connect(c.config(&[2, 3, 4])).await.unwrap();
    for i in 0..LOST_CHANGES {
        // Asked of node 2: a call to a cut node would wait for its meta timeout.
        let req = AdminRequest::Drain { node: NodeId(6), draining: i % 2 == 0 };
        admin.admin_on(NodeId(2), req).await.unwrap();
    }
    admin.close().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.node(6).meta_revision() < behind + LOST_CHANGES {
        assert!(
            Instant::now() < deadline,
            "node 6 at {}, not past {behind} + {LOST_CHANGES}",
            c.node(6).meta_revision()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Node 7 joins now: only the lost history registers it, and only nodes 6 and 7 know it.
    c.join().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.node(6).meta_view().nodes.contains_key(&NodeId(7)) || c.node(7).meta_view().nodes.is_empty() {
        assert!(Instant::now() < deadline, "node 7 never joined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = c.node(6).meta_revision().max(c.node(7).meta_revision());
    eprintln!("{:?}: node 6 at revision {seen}, survivors behind at {behind}", t0.elapsed());
    assert!(c.node(1).meta_revision() < seen && c.node(5).meta_revision() < seen, "the survivors are behind");

    // Nodes 2, 3 and 4 are gone with their disks.
    let dead = lose_for_good(&mut c, &[2, 3, 4]).await;
    // The tool is given nodes 1 and 5 only: it hears of node 7 from node 6.
    let client = Client::connect(c.config(&[1, 5])).await.unwrap();
    assert!(!client.cached_view().nodes.contains_key(&NodeId(7)), "the scenario needs node 7 unknown to 1 and 5");
    let (report, lines) = recover_logged(&client, &dead).await;
    assert!(lines.iter().any(|l| l.starts_with("node 7:")), "node 7 was asked: {lines:?}");
    let meta = report.forced.iter().find(|f| f.decision.shard == META_GROUP).expect("the meta group was forced");
    let kept = meta.decision.survivor.0;
    let others: Vec<u64> = meta.decision.others.iter().map(|(n, _)| n.0).collect();
    assert!([1, 5].contains(&kept) && others.len() == 1 && [1, 5].contains(&others[0]), "{meta:?}");
    let retired = others[0];
    eprintln!("{:?}: recovered", t0.elapsed());
    // Its old replica is gone (retired), or the forced leader had already made it a learner of
    // the forced configuration, with its log reconciled by Raft (the drop then keeps it).
    let marker = c.dev.dir().join(format!("node-{retired}")).join("meta-replica-retired");
    let adopted = match c.node(retired).host().group_info_of(META_GROUP).await {
        Ok(i) => i.committed_conf.membership.voters.iter().all(|v| !dead.contains(v)),
        Err(_) => false,
    };
    assert!(marker.exists() != adopted, "node {retired}: retired {}, adopted {adopted}", marker.exists());

    // Every live node takes the recovered state promptly, whatever revision it had seen.
    // Node 7 may first ask its configured peers, the dead among them, a request timeout (5 s)
    // each, and may be sent to a dead leader its lost view still names: its asks go round its
    // six known peers, half of them dead, so several such timeouts in a row are possible.
    let recovered = Instant::now();
    for (id, secs) in [(1, 15), (5, 15), (6, 15), (7, 90)] {
        let deadline = recovered + Duration::from_secs(secs);
        while c.node(id).meta_view().removed != dead {
            assert!(
                Instant::now() < deadline,
                "node {id}'s copy (revision {}, the lost history reached {seen}) never took the recovery",
                c.node(id).meta_revision()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("{:?}: node {id} took the recovery", t0.elapsed());
    }

    // Back to full replication; then every node holds the meta leader's state, and the meta
    // group is back on three voters, the retired node among the candidates again.
    eprintln!("{:?}: every node took the recovery", t0.elapsed());
    wait_replicated(&client, &dead, &report.lost, Duration::from_secs(120), &mut |l| eprintln!("{l}")).await.unwrap();
    eprintln!("{:?}: replicated", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = c.node(kept).host().group_info_of(META_GROUP).await.unwrap();
        let conf = info.committed_conf.membership;
        let voters: BTreeSet<u64> = conf.voters.iter().map(|n| n.0).collect();
        let (revision, state) = (c.node(kept).meta_revision(), c.node(kept).meta_view());
        let same = [1, 5, 6, 7].iter().all(|id| {
            let view = c.node(*id).meta_view();
            let draining = |s: &flotilla::placement::MetaState| s.nodes.get(&NodeId(6)).map(|n| n.draining);
            c.node(*id).meta_revision() == revision
                && view.map == state.map
                && view.removed == state.removed
                && draining(&view) == Some(false)
                && draining(&view) == draining(&state)
        });
        if voters == BTreeSet::from([1, 5, 6]) && conf.learners.is_empty() && !conf.is_joint() && same {
            assert!(revision > seen, "the recovered history's revisions start past the lost one's");
            break;
        }
        assert!(Instant::now() < deadline, "meta voters {voters:?}, nodes agree on the map: {same}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{:?}: meta group on three voters", t0.elapsed());
    // `admin status` shows them.
    let status = client.admin_on(NodeId(kept), AdminRequest::Status).await.unwrap();
    let flotilla::wire::AdminResponse::Status(status) = status else { panic!("{status:?}") };
    assert_eq!(status.meta_voters, vec![NodeId(1), NodeId(5), NodeId(6)]);
    assert!(status.meta_learners.is_empty());
    client.refresh().await.unwrap();
    for i in 0..KEYS {
        assert_eq!(client.get(&key(i)).await.unwrap(), Some(format!("v{i}").into_bytes()), "key {i}");
        client.put(&key(i), b"after").await.unwrap();
    }
    client.close().await;
    c.shutdown().await;
}
