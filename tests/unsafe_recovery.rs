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
    for id in [2, 3] {
        c.stop(id).await;
        std::fs::remove_dir_all(c.dev.dir().join(format!("node-{id}"))).unwrap();
    }
    let client = Client::connect(c.config(&[1, 4, 5])).await.unwrap();
    let dead: BTreeSet<NodeId> = [NodeId(2), NodeId(3)].into();
    let mut lines = Vec::new();
    let report = recover(&client, &dead, &mut |l| {
        eprintln!("{l}");
        lines.push(l)
    })
    .await
    .unwrap();
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
