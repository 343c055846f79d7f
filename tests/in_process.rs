//! Three nodes in one process on loopback QUIC: bootstrap with several shards, every client
//! operation through `flotilla::Client`, then stop the node leading a shard and keep serving;
//! a client with a certificate from another CA is refused.

use flotilla::meta::dev_split_keys;
use flotilla::placement::{NodeId, ShardId};
use flotilla::transport::cert::{CertificateAuthority, TlsIdentity};
use flotilla::transport::{Grant, Role};
use flotilla::wire::{AdminRequest, AdminResponse};
use flotilla::{CasOutcome, Client, ClientConfig, ClientError};
use std::time::{Duration, Instant};

mod common;

use common::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_serve_and_survive_a_leader_failure() {
    let mut cluster = Cluster::start(3, 4).await;
    let client = cluster.client().await;
    assert_eq!(client.cached_view().map.len(), 4, "four shards from the bootstrap");

    // Every operation, on keys spread over the shards.
    let keys: Vec<String> = (0..40).map(|i| format!("{:02x}-key-{i}", (i * 37) % 256)).collect();
    for k in &keys {
        client.put(k.as_bytes(), format!("v-{k}").as_bytes()).await.unwrap();
    }
    for k in &keys {
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(format!("v-{k}").into_bytes()));
    }
    assert_eq!(client.get(b"absent").await.unwrap(), None);
    let k = keys[0].as_bytes();
    assert_eq!(
        client.cas(k, Some(b"wrong"), Some(b"x")).await.unwrap(),
        CasOutcome::Failed { current: Some(format!("v-{}", keys[0]).into_bytes()) }
    );
    let expected = format!("v-{}", keys[0]);
    assert!(matches!(client.cas(k, Some(expected.as_bytes()), Some(b"x")).await.unwrap(), CasOutcome::Swapped { .. }));
    assert_eq!(client.get(k).await.unwrap(), Some(b"x".to_vec()));
    client.delete(k).await.unwrap();
    assert_eq!(client.get(k).await.unwrap(), None);

    // A scan across all shards returns every remaining key in order; a limit cuts it.
    let all = client.scan(b"", None, 1000).await.unwrap();
    let mut want: Vec<&String> = keys[1..].iter().collect();
    want.sort();
    let got: Vec<String> = all.iter().map(|(k, _)| String::from_utf8(k.clone()).unwrap()).collect();
    assert_eq!(got.iter().collect::<Vec<_>>(), want);
    assert_eq!(client.scan(b"", None, 7).await.unwrap().len(), 7);
    let some = client.scan(b"40", Some(b"c0"), 1000).await.unwrap();
    assert!(some.iter().all(|(k, _)| k.as_slice() >= b"40".as_slice() && k.as_slice() < b"c0".as_slice()));
    assert_eq!(some.len(), want.iter().filter(|k| k.as_str() >= "40" && k.as_str() < "c0").count());

    // A scan answer over the byte budget is cut by the node and resumed by the client.
    let big = vec![b'x'; flotilla::wire::VALUE_BYTES_MAX];
    for i in 0..6 {
        client.put(format!("90-big-{i}").as_bytes(), &big).await.unwrap();
    }
    let bigs = client.scan(b"90-big-", Some(b"90-big-z"), 100).await.unwrap();
    assert_eq!(bigs.len(), 6);
    assert!(bigs.iter().all(|(_, v)| v.len() == big.len()));

    // Stale (follower) reads from any replica catch up with the writes.
    let stale = cluster.client_with(flotilla::wire::ReadConsistency::Stale).await;
    for k in &keys[1..6] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while stale.get(k.as_bytes()).await.unwrap() != Some(format!("v-{k}").into_bytes()) {
            assert!(Instant::now() < deadline, "stale read of {k} never caught up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stale.close().await;

    // Bad input is refused plainly.
    assert!(matches!(client.put(b"", b"v").await, Err(ClientError::Invalid(_))));
    assert!(matches!(client.put(b"\x00meta/state", b"v").await, Err(ClientError::Invalid(_))));

    // Admin: nodes and shards as the meta leader sees them.
    match client.admin(AdminRequest::Shards).await.unwrap() {
        AdminResponse::Shards(rows) => assert_eq!(rows.len(), 4),
        other => panic!("unexpected {other:?}"),
    }

    // Stop the node leading the shard of "80..." and keep writing and reading.
    let shard = client.cached_view().map.lookup(b"80").unwrap().id;
    let leader = wait_leader(&cluster, shard).await;
    eprintln!("stopping node {leader}, leader of shard {shard}");
    cluster.stop(leader).await;
    for i in 0..20 {
        let key = format!("80-after-{i}");
        client.put(key.as_bytes(), b"after").await.unwrap();
        assert_eq!(client.get(key.as_bytes()).await.unwrap(), Some(b"after".to_vec()));
    }
    // Writes made before the failure are still there, on every shard.
    for k in &keys[1..] {
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(format!("v-{k}").into_bytes()));
    }
    client.close().await;

    // A client whose certificate comes from another CA is refused.
    let other = CertificateAuthority::generate("other CA").unwrap();
    let issued = other.issue_client("intruder", Grant::new(Role::Admin)).unwrap();
    let tls = TlsIdentity::from_issued(other.cert_pem(), &issued).unwrap();
    let mut cfg = ClientConfig::new(tls, cluster.endpoints());
    cfg.request_timeout = Duration::from_secs(3);
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");

    cluster.shutdown().await;
}

/// The node that the map's reports say leads `shard` (waits for a report).
async fn wait_leader(cluster: &Cluster, shard: ShardId) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in cluster.nodes() {
            let infos = n.host().group_info().await.unwrap();
            if infos.iter().any(|i| i.group == shard && i.role == flotilla::raft::Role::Leader) {
                return n.id().0;
            }
        }
        assert!(Instant::now() < deadline, "no leader for shard {shard}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A move's steps are judged on the meta leader's view of the nodes' reports. With every node
/// a meta voter, nobody reads the map through the meta leader's full path (no admin reads, no
/// node following changes), so the reports taken in memory must still reach that view: the
/// move must finish on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_finishes_with_nobody_reading_the_map() {
    let mut cluster = Cluster::start_with(4, &[1, 2, 3, 4], &[1, 2, 3], dev_split_keys(2), |_| {}).await;
    let client = cluster.client().await;
    let shard = client.cached_view().map.lookup(b"0").unwrap().id;
    // The shard is led before the move is asked for: this test is about the move finishing
    // (a move asked before the shard's voters formed it is the next test's).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        if rows.iter().any(|r| r.descriptor.id == shard && r.leader.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "shard {shard} never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = client.admin(AdminRequest::Move { shard, from: NodeId(3), to: NodeId(4) }).await {
        assert!(Instant::now() < deadline, "move never started: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // From here on only the nodes' own views are looked at.
    wait_moved_from_3_to_4(&cluster, shard).await;
    cluster.shutdown().await;
}

/// A move of a bootstrap shard asked before two of its three voters formed it: the map then
/// holds a configuration the shard never had, and they must still form it with its first one
/// (and then the move go on), not start empty and wait for a leader nobody can become.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_asked_before_the_voters_formed_the_shard_leaves_it_led() {
    let held = |id: NodeId| id == NodeId(2) || id == NodeId(3);
    let mut cluster =
        Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(1), |cfg| cfg.reconciler_paused = held(cfg.id))
            .await;
    let client = cluster.client().await;
    let shard = client.cached_view().map.lookup(b"k").unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = client.admin(AdminRequest::Move { shard, from: NodeId(3), to: NodeId(4) }).await {
        assert!(Instant::now() < deadline, "move never started: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The held voters see the map as the move changed it before they look at it.
    for id in [2, 3] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.node(id).meta_view().map.get(shard).unwrap().epoch.conf_version == 1 {
            assert!(Instant::now() < deadline, "node {id} never saw the move");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for id in [2, 3] {
        assert!(cluster.node(id).host().group_info_of(shard).await.is_err(), "node {id} formed the shard already");
        cluster.node(id).pause_reconciler(false);
    }
    wait_moved_from_3_to_4(&cluster, shard).await;
    client.put(b"k", b"v").await.unwrap();
    assert_eq!(client.get(b"k").await.unwrap(), Some(b"v".to_vec()));
    cluster.shutdown().await;
}

/// A first voter back under its id with a wiped data directory: the cluster recorded that it
/// formed its shards, so it creates no replica at all (formed again it would vote as if it
/// never had, and two leaders could be elected in one term).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_voter_back_with_a_wiped_data_directory_creates_no_replica() {
    let mut cluster = Cluster::start_with(4, &[1, 2, 4], &[1, 2, 3], dev_split_keys(1), |_| {}).await;
    let client = cluster.client().await;
    client.put(b"k", b"v").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let formed = cluster.node(1).meta_view().bootstrap.as_ref().map(|b| b.formed.clone()).unwrap_or_default();
        if formed == [1, 2, 3].map(NodeId).into() {
            break;
        }
        assert!(Instant::now() < deadline, "the first voters' forming never recorded: {formed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop(3).await;
    std::fs::remove_dir_all(cluster.dev.dir().join("node-3")).unwrap();
    cluster.restart(3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.node(3).meta_view().map.is_empty() {
        assert!(Instant::now() < deadline, "node 3 never saw the map");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several reconciler rounds: still nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let groups = cluster.node(3).host().groups();
    assert!(groups.iter().all(|g| *g == flotilla::meta::META_GROUP), "node 3 holds {groups:?}");
    client.put(b"k", b"w").await.unwrap();
    assert_eq!(client.get(b"k").await.unwrap(), Some(b"w".to_vec()));
    cluster.shutdown().await;
}

/// Waits (60 s at most) until node 1's view holds the move of `shard` from node 3 to node 4
/// done; on failure, what every node holds of it.
async fn wait_moved_from_3_to_4(cluster: &Cluster, shard: ShardId) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = cluster.node(1).meta_view();
        let d = view.map.get(shard).expect("the shard");
        if view.moves.is_empty() && d.replica(NodeId(4)).is_some() && d.replica(NodeId(3)).is_none() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("the move did not finish: {:?}\n{}", view.moves.get(&shard), move_state(cluster, shard).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What every node holds of `shard` and of the meta group: to tell from one failed run which
/// input a stuck move waits for (a report, a learner's catch-up, a configuration).
async fn move_state(cluster: &Cluster, shard: ShardId) -> String {
    let mut out = String::new();
    for id in 1..=4 {
        let node = cluster.node(id);
        let view = node.meta_view();
        let meta = node.host().group_info_of(flotilla::meta::META_GROUP).await.ok();
        let replica = node.host().group_info_of(shard).await.ok();
        let report = view
            .nodes
            .get(&NodeId(id))
            .map(|n| (n.report.applied.get(&shard).copied(), n.report.confs.get(&shard).cloned()));
        out += &format!(
            "node {id}: revision {}, meta leader {:?}, report of the shard {:?}\n  replica {:?}\n",
            node.meta_revision(),
            meta.and_then(|m| m.leader),
            report,
            replica.map(|r| (
                r.role,
                r.term,
                r.leader,
                r.committed,
                r.applied,
                r.durable_applied,
                r.quiet,
                r.committed_conf,
                r.matched
            )),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_a_replica_while_clients_write() {
    // Shards on nodes 1-3, node 4 empty; move shard 1's replica from node 3 to node 4.
    let mut cluster = Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(2), |_| {}).await;
    let client = std::sync::Arc::new(cluster.client().await);
    for i in 0..50 {
        client.put(format!("0-before-{i}").as_bytes(), b"v").await.unwrap();
    }
    let shard = client.cached_view().map.lookup(b"0").unwrap().id;

    // A writer keeps going during the move; every acknowledged key must survive.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("0-during-{i}");
                if client.put(key.as_bytes(), b"w").await.is_ok() {
                    acked.push(key);
                }
                i += 1;
                // A steady client, not a flood: on two loaded cores a flood can outrun the
                // learner's catch-up for as long as it lasts.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        })
    };

    // Node 4 must have registered (its first report) before it can be a target.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.admin(AdminRequest::Move { shard, from: NodeId(3), to: NodeId(4) }).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("move not started yet: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("move never started: {e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        let row = rows.iter().find(|r| r.descriptor.id == shard).unwrap();
        let mut nodes: Vec<u64> = row.descriptor.replicas.iter().map(|r| r.node.0).collect();
        nodes.sort();
        if row.moving.is_none() && nodes == [1, 2, 4] && row.descriptor.voters().count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "move did not finish: {row:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Node 3 drops its replica; node 4 serves one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.node(3).host().groups().contains(&flotilla::raft::GroupId(shard.0)) {
        assert!(Instant::now() < deadline, "node 3 kept its replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster.node(4).host().groups().contains(&flotilla::raft::GroupId(shard.0)));

    // Leadership goes where an admin request says.
    client.admin(AdminRequest::TransferLeader { shard, node: NodeId(4) }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        if rows.iter().find(|r| r.descriptor.id == shard).unwrap().leader == Some(NodeId(4)) {
            break;
        }
        assert!(Instant::now() < deadline, "leadership did not move to node 4");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty());
    // Nothing acknowledged is lost, before or during the move; node 3 can even go away.
    cluster.stop(3).await;
    for i in 0..50 {
        assert_eq!(client.get(format!("0-before-{i}").as_bytes()).await.unwrap(), Some(b"v".to_vec()));
    }
    for k in &acked {
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(b"w".to_vec()), "{k}");
    }
    // Drain: the node is marked, and a balancer round proposes moving its replicas away.
    client.admin(AdminRequest::Drain { node: NodeId(2), draining: true }).await.unwrap();
    let AdminResponse::Nodes(rows) = client.admin(AdminRequest::Nodes).await.unwrap() else { panic!() };
    assert!(rows.iter().find(|r| r.node == NodeId(2)).unwrap().draining);
    let AdminResponse::Done(text) = client.admin(AdminRequest::Rebalance).await.unwrap() else { panic!() };
    eprintln!("rebalance: {text}");
    assert!(text.contains("StartMove"), "{text}");
    let AdminResponse::Status(st) = client.admin(AdminRequest::Status).await.unwrap() else { panic!() };
    assert_eq!((st.nodes, st.shards), (4, 2));
    client.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_a_running_cluster() {
    let mut cluster = Cluster::start(3, 1).await;
    let client = cluster.client().await;
    client.put(b"joined", b"yes").await.unwrap();

    // Node 4: no bootstrap, the others as peers; it announces itself to them.
    assert_eq!(cluster.join().await.id(), NodeId(4));

    // Its reports reach the meta leader, and a replica can move to it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Nodes(rows) = client.admin(AdminRequest::Nodes).await.unwrap() else { panic!() };
        if rows.iter().any(|r| r.node == NodeId(4) && r.report_age_ms.is_some_and(|a| a < 3_000)) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never reported: {rows:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let shard = client.cached_view().map.lookup(b"joined").unwrap().id;
    client.admin(AdminRequest::Move { shard, from: NodeId(1), to: NodeId(4) }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        let row = &rows[0];
        if row.moving.is_none() && row.descriptor.replica(NodeId(4)).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "move to the new node did not finish: {row:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.stop(1).await;
    assert_eq!(client.get(b"joined").await.unwrap(), Some(b"yes".to_vec()));
    client.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_a_shard_while_clients_write_losing_nothing() {
    let mut cluster = Cluster::start(3, 1).await;
    let client = std::sync::Arc::new(cluster.client().await);
    assert_eq!(client.cached_view().map.len(), 1);
    // Writers on both sides of the split key, running across the split.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for prefix in ["b", "x"] {
        let (client, stop) = (client.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let k = format!("{prefix}-{i:05}");
                match client.put(k.as_bytes(), b"v").await {
                    Ok(_) => acked.push(k),
                    Err(e) => panic!("write {k} failed across the split: {e}"),
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let AdminResponse::Changed(shards) = client.admin(AdminRequest::Split { key: b"m".to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    assert_eq!(shards.len(), 2, "{shards:?}");
    let right = shards.iter().find(|d| d.start == b"m").expect("the right half").id;
    // Both halves get a leader and serve.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        if rows.len() == 2 && rows.iter().all(|r| r.leader.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "the split shards never both got a leader: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.iter().any(|k| k.starts_with('x')), "writes reached the right half");
    // Every acknowledged write reads back, whichever shard holds it now.
    for k in &acked {
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(b"v".to_vec()), "{k} lost in the split");
    }
    assert_eq!(client.cached_view().map.lookup(b"x-00000").map(|d| d.id), Some(right));
    // Splitting at a shard's first key is refused with a reason.
    assert!(client.admin(AdminRequest::Split { key: b"m".to_vec() }).await.is_err());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_automatic_balancer_splits_a_shard_that_grew_past_the_threshold() {
    let mut cluster = Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], dev_split_keys(1), |cfg| {
        cfg.balancer.split_size_bytes_threshold = 32 << 10;
        cfg.size_check_interval_ms = 200;
        cfg.auto_balance_interval_ms = Some(300);
    })
    .await;
    let client = cluster.client().await;
    // 160 KiB of keys and values in the one shard: it must end up split into shards of at most
    // ~32 KiB (five or more), each sized by its leader.
    let value = vec![b'v'; 1000];
    let keys: Vec<String> = (0..160).map(|i| format!("key-{:04}", (i * 7919) % 10_000)).collect();
    for k in &keys {
        client.put(k.as_bytes(), &value).await.unwrap();
    }
    // The reported sizes come to add up to what was written (logical bytes: keys plus values).
    let written: u64 = keys.iter().map(|k| (k.len() + value.len()) as u64).sum();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        let sized = rows.iter().all(|r| r.leader.is_some() && r.bytes > 0 && r.bytes <= 40 << 10);
        if rows.len() >= 5 && sized && rows.iter().map(|r| r.bytes).sum::<u64>() == written {
            break;
        }
        assert!(Instant::now() < deadline, "the shard was not split down to size: {rows:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Nothing was lost and every key is served by the shard the map routes it to.
    for k in &keys {
        assert_eq!(client.get(k.as_bytes()).await.unwrap().as_deref(), Some(value.as_slice()), "{k}");
    }
    cluster.shutdown().await;
}

/// Load-based splitting end to end: clients hammer a range of one shard above a low threshold;
/// the shard's leader counts and samples the requests, names a key once the shard stayed hot,
/// and the balancer splits the shard there by itself, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_balancer_splits_a_shard_hot_with_requests_inside_its_hot_range() {
    let mut cluster = Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], dev_split_keys(1), |cfg| {
        cfg.balancer.load_split_requests_per_s = 100;
        cfg.load_split_duration_ms = 900; // three report windows of 300 ms
        cfg.auto_balance_interval_ms = Some(300);
    })
    .await;
    let client = std::sync::Arc::new(cluster.client().await);
    assert_eq!(client.cached_view().map.len(), 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    // Writes and reads spread over `hot-000..hot-199` (a put then a get of a fresh key).
    for w in 0..4u64 {
        let (client, stop) = (client.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let k = format!("hot-{:03}-{i:06}", (i * 7919) % 200);
                match client.put(k.as_bytes(), k.as_bytes()).await {
                    Ok(()) => acked.push(k.clone()),
                    Err(e) => panic!("write {k} failed across the load split: {e}"),
                }
                let _ = client.get(k.as_bytes()).await;
                i += 4;
            }
            acked
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let split_at = loop {
        let view = client.refresh().await.unwrap();
        if let Some(d) = view.map.shards().find(|d| !d.start.is_empty()) {
            break d.start.clone();
        }
        assert!(Instant::now() < deadline, "the hot shard was never split: {:?}", view.map);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = started.elapsed();
    eprintln!("split by load at {:?} after {took:?} of load", String::from_utf8_lossy(&split_at));
    assert!(
        split_at.as_slice() > b"hot-010".as_slice() && split_at.as_slice() < b"hot-190".as_slice(),
        "the split key divides the hot range: {:?}",
        String::from_utf8_lossy(&split_at)
    );
    // The load goes on across the split for a moment, then every acknowledged write reads back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 100, "{} writes", acked.len());
    for k in &acked {
        assert_eq!(client.get(k.as_bytes()).await.unwrap().as_deref(), Some(k.as_bytes()), "{k} lost in the split");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_reports_reach_the_meta_leader_without_meta_writes() {
    let mut cluster = Cluster::start(3, 2).await;
    let client = cluster.client().await;
    // Wait until every node's reports show both shards led somewhere.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Nodes(rows) = client.admin(AdminRequest::Nodes).await.unwrap() else { panic!() };
        let led: usize = rows.iter().map(|r| r.leading).sum();
        if rows.len() == 3 && led == 2 && rows.iter().all(|r| r.report_age_ms.is_some_and(|a| a < 1_000)) {
            break;
        }
        assert!(Instant::now() < deadline, "reports never settled: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Three nodes reporting every 300 ms for 3 s: about 30 reports, and no meta write for any.
    let writes = |c: &Cluster| -> u64 {
        c.nodes().map(|n| n.stats().meta_writes.load(std::sync::atomic::Ordering::Relaxed)).sum()
    };
    let before = writes(&cluster);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let AdminResponse::Nodes(rows) = client.admin(AdminRequest::Nodes).await.unwrap() else { panic!() };
    assert!(rows.iter().all(|r| r.report_age_ms.is_some_and(|a| a < 2_000)), "reports still arrive: {rows:?}");
    let after = writes(&cluster);
    assert!(after - before <= 1, "reports were written to the meta group: {before} -> {after}");
    // Idle, reports go as changes that name no shard: over 3 s, about 30 reports, carrying
    // only what changed (a few indexes at most).
    let sent = |c: &Cluster| -> (u64, u64, u64) {
        let get = |f: fn(&flotilla::node::NodeStats) -> &std::sync::atomic::AtomicU64| -> u64 {
            c.nodes().map(|n| f(n.stats()).load(std::sync::atomic::Ordering::Relaxed)).sum()
        };
        (get(|s| &s.reports_whole), get(|s| &s.reports_changed), get(|s| &s.report_shards_sent))
    };
    let (whole0, changed0, shards0) = sent(&cluster);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (whole1, changed1, shards1) = sent(&cluster);
    assert!(
        changed1 - changed0 >= 15,
        "reports went as changes: {changed0} -> {changed1} ({whole0} -> {whole1} whole)"
    );
    assert!(whole1 - whole0 <= 1, "no whole report without a cause: {whole0} -> {whole1}");
    assert!(
        shards1 - shards0 < changed1 - changed0,
        "an idle node's changes name (almost) no shard: {} shards in {} reports",
        shards1 - shards0,
        changed1 - changed0
    );
    // What the meta leader holds of each node is what the node has: every shard's durable
    // applied index (given a report interval or two to arrive).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut wrong = Vec::new();
        let mut leader = None;
        for n in cluster.nodes() {
            if n.host()
                .group_info_of(flotilla::meta::META_GROUP)
                .await
                .is_ok_and(|i| i.role == flotilla::raft::Role::Leader)
            {
                leader = Some(n);
            }
        }
        match leader {
            Some(leader) => {
                let live = leader.live_reports();
                for n in cluster.nodes() {
                    let held = live.get(&n.id()).map(|r| r.applied.clone()).unwrap_or_default();
                    for i in
                        n.host().group_info().await.unwrap().iter().filter(|i| i.group != flotilla::meta::META_GROUP)
                    {
                        if held.get(&i.group).map(|a| a.0) != Some(i.durable_applied.0) {
                            wrong.push((n.id(), i.group, held.get(&i.group).copied(), i.durable_applied));
                        }
                    }
                }
            }
            None => wrong.push((NodeId(0), ShardId(0), None, Default::default())),
        }
        if wrong.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the meta leader's reports differ from the nodes': {wrong:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.shutdown().await;
}

/// Clients run gets (linearizable and lease reads), puts, deletes and compare-and-swaps on a
/// few keys of two shards while the nodes are stopped and restarted one at a time; the Raft
/// crate's checker must find a linearization of the whole history (see
/// `common::History`). `FLOTILLA_HISTORY_SECS` runs it longer (default 8 s of faults).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_history_of_clients_across_node_restarts_is_linearizable() {
    let secs: u64 = std::env::var("FLOTILLA_HISTORY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let mut cluster = Cluster::start(3, 2).await;
    let mut clients = Vec::new();
    for c in 0..6u64 {
        let consistency = if c % 3 == 2 {
            flotilla::wire::ReadConsistency::Lease
        } else {
            flotilla::wire::ReadConsistency::Linearizable
        };
        clients.push(cluster.client_with(consistency).await);
    }
    let history = common::History::start(clients, &["10-a", "10-b", "10-c", "f0-a", "f0-b", "f0-c"]);
    // Faults: stop one node, restart it, move on to the next.
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut victim = 1u64;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        cluster.stop(victim).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.restart(victim).await;
        victim = victim % 3 + 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    history.stop_and_check(200).await;
    cluster.shutdown().await;
}

/// A write that reached a leader cut off from its followers ends as `Unknown`: the client
/// neither retries it on the next leader nor calls it failed. Regression: the client used to
/// retry such writes, and the history test caught the consequences (a delete reporting its
/// retry's previous value; a put applied twice around another client's write).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_cut_off_from_its_quorum_is_unknown_not_retried() {
    let mut cluster = Cluster::start(3, 1).await;
    let client = cluster.client().await;
    client.put(b"k", b"before").await.unwrap();
    let shard = client.cached_view().map.lookup(b"k").unwrap().id;
    let leader = wait_leader(&cluster, shard).await;
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let node = |id: u64| cluster.node(id);
    for o in &others {
        node(leader).transport().block_peer(NodeId(*o));
        node(*o).transport().block_peer(NodeId(leader));
    }
    let r = client.put(b"k", b"during").await;
    assert!(matches!(r, Err(ClientError::Unknown(_))), "{r:?}");
    for o in &others {
        node(leader).transport().unblock_peer(NodeId(*o));
        node(*o).transport().unblock_peer(NodeId(leader));
    }
    // Either outcome is possible; the value is one of the two.
    let v = client.get(b"k").await.unwrap();
    assert!(v.as_deref() == Some(b"before".as_slice()) || v.as_deref() == Some(b"during".as_slice()), "{v:?}");
    cluster.shutdown().await;
}

/// A node whose meta replica lags (cut from the meta leader only) applies a split through the
/// shard's Raft group and hosts the new group before its view of the map knows the group. The
/// replica must stay: a stale map never deletes a replica its group still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_lagging_map_keeps_the_group_a_split_gave_it() {
    let mut cluster = Cluster::start(3, 1).await;
    let client = cluster.client().await;
    client.put(b"a-0", b"v").await.unwrap();
    let shard = client.cached_view().map.lookup(b"a").unwrap().id;
    let meta_leader = wait_leader(&cluster, ShardId(0)).await;
    // The shard's leader and the node to cut are the two other nodes.
    let others: Vec<u64> = (1..=3).filter(|n| *n != meta_leader).collect();
    let (shard_leader, cut) = (others[0], others[1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while wait_leader(&cluster, shard).await != shard_leader {
        let _ = client.admin(AdminRequest::TransferLeader { shard, node: NodeId(shard_leader) }).await;
        assert!(Instant::now() < deadline, "shard {shard} never moved to node {shard_leader}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let node = |id: u64| cluster.node(id);
    node(cut).transport().block_peer(NodeId(meta_leader));
    node(meta_leader).transport().block_peer(NodeId(cut));

    let AdminResponse::Changed(shards) = client.admin(AdminRequest::Split { key: b"m".to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    let right = shards.iter().find(|d| d.start == b"m").expect("the right half").id;
    let group = flotilla::raft::GroupId(right.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node(cut).host().groups().contains(&group) {
        assert!(
            Instant::now() < deadline,
            "node {cut} never hosted the new group (it did not apply the split, or deleted the replica at once)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        node(cut).meta_view().map.get(right).is_none(),
        "the scenario needs node {cut}'s map to lag behind the split"
    );
    // The replica on the cut node stays through several reconciler rounds while its map lags.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(node(cut).host().groups().contains(&group), "node {cut} deleted a replica its group counts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node(cut).transport().unblock_peer(NodeId(meta_leader));
    node(meta_leader).transport().unblock_peer(NodeId(cut));
    let deadline = Instant::now() + Duration::from_secs(30);
    while node(cut).meta_view().map.get(right).is_none() {
        assert!(Instant::now() < deadline, "node {cut}'s map never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(node(cut).host().groups().contains(&group));
    for i in 0..20 {
        client.put(format!("x-{i}").as_bytes(), b"v").await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(client.get(format!("x-{i}").as_bytes()).await.unwrap(), Some(b"v".to_vec()));
    }
    cluster.shutdown().await;
}

/// Splits asked for faster than Raft carries them out (some in parallel, with a writer
/// running): the map splits a shard again before its group applied the previous split, so
/// split-born groups and new replicas meet snapshots of other ranges. Every shard must get a
/// leader within seconds and every acknowledged write must read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_quick_splits_converge_and_lose_nothing() {
    let mut cluster = Cluster::start(3, 1).await;
    let client = std::sync::Arc::new(cluster.client().await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(client.clone(), stop.clone(), |i| format!("k{:03}-{i}", (i * 7) % 200), Duration::ZERO);
    let splits = 40u32;
    for batch in (1..=splits).collect::<Vec<_>>().chunks(4) {
        let mut calls = Vec::new();
        for i in batch {
            let (client, key) = (client.clone(), format!("k{:03}", i * 5).into_bytes());
            calls.push(tokio::spawn(async move { client.admin(AdminRequest::Split { key }).await }));
        }
        for c in calls {
            c.await.unwrap().expect("split");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        let unled: Vec<ShardId> = rows.iter().filter(|r| r.leader.is_none()).map(|r| r.descriptor.id).collect();
        if rows.len() == splits as usize + 1 && unled.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            // What each node's replica of the leaderless shards looks like, to say why.
            for node in cluster.nodes() {
                let infos = node.host().group_info().await.unwrap_or_default();
                for i in infos.iter().filter(|i| unled.contains(&i.group)) {
                    eprintln!(
                        "node {} group {}: {:?} term {} leader {:?} last {} committed {} applied {} conf {:?} newest {} quiet {} stopped {:?}",
                        node.id(), i.group, i.role, i.term, i.leader, i.last_index, i.committed, i.applied,
                        i.committed_conf, i.newest_conf, i.quiet, i.stopped
                    );
                }
                let missing: Vec<_> = unled.iter().filter(|g| !infos.iter().any(|i| i.group == **g)).collect();
                eprintln!("node {}: no replica of {missing:?}", node.id());
            }
            panic!("{} shards, without a leader: {unled:?}", rows.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 20, "too few writes: {}", acked.len());
    assert_read_back_and_scanned(&client, &acked).await;
    cluster.shutdown().await;
}

/// Writes `a-key`, makes a node other than the meta leader lead its shard, cuts node 4 off from
/// that leader only (node 4 still gets the map from the meta leader), and starts a move of the
/// shard's third replica onto node 4. Returns (shard, meta leader, shard leader).
async fn move_onto_node_4_out_of_its_leaders_reach(cluster: &Cluster, client: &Client) -> (ShardId, u64, u64) {
    client.put(b"a-key", b"v").await.unwrap();
    let shard = client.cached_view().map.lookup(b"a").unwrap().id;
    let meta_leader = wait_leader(cluster, ShardId(0)).await;
    let leader = (1..=3).find(|n| *n != meta_leader).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while wait_leader(cluster, shard).await != leader {
        let _ = client.admin(AdminRequest::TransferLeader { shard, node: NodeId(leader) }).await;
        assert!(Instant::now() < deadline, "shard {shard} never moved to node {leader}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let node = |id: u64| cluster.node(id);
    node(4).transport().block_peer(NodeId(leader));
    node(leader).transport().block_peer(NodeId(4));
    let from = (1..=3).find(|n| *n != leader && *n != meta_leader).unwrap();
    // Node 4 registers itself in the background: retry until the meta state knows it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = client.admin(AdminRequest::Move { shard, from: NodeId(from), to: NodeId(4) }).await {
        assert!(Instant::now() < deadline, "move not accepted: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (shard, meta_leader, leader)
}

/// A replica created on its node but not yet reached by its leader holds none of the shard's
/// data: a stale read there must say so, not answer "no such key".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_read_on_a_replica_not_caught_up_is_refused() {
    use flotilla::transport::PeerIdentity;
    use flotilla::wire::{ReadConsistency, Request, Response};
    let mut cluster = Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(1), |_| {}).await;
    let client = cluster.client().await;
    let (shard, _, leader) = move_onto_node_4_out_of_its_leaders_reach(&cluster, &client).await;
    let node = |id: u64| cluster.node(id);
    let group = flotilla::raft::GroupId(shard.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node(4).host().groups().contains(&group) {
        assert!(Instant::now() < deadline, "node 4 never created its replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let epoch = node(4).meta_view().map.get(shard).unwrap().epoch;
    let get = Request::Get { shard, epoch, key: b"a-key".to_vec(), consistency: ReadConsistency::Stale };
    match node(4).handle(&PeerIdentity::Client("test".into()), get.clone()).await {
        Response::Unavailable(why) => assert!(why.contains("caught up"), "{why}"),
        other => panic!("an empty replica answered a stale read: {other:?}"),
    }
    // Reached by its leader, it answers.
    node(4).transport().unblock_peer(NodeId(leader));
    node(leader).transport().unblock_peer(NodeId(4));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let epoch = node(4).meta_view().map.get(shard).unwrap().epoch;
        let get = Request::Get { shard, epoch, key: b"a-key".to_vec(), consistency: ReadConsistency::Stale };
        match node(4).handle(&PeerIdentity::Client("test".into()), get).await {
            Response::Value(v) => {
                assert_eq!(v, Some(b"v".to_vec()));
                break;
            }
            other => assert!(Instant::now() < deadline, "node 4 never caught up: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}

/// A move whose learner cannot be reached is aborted at its step deadline: the learner leaves
/// the map, the shard's leader removes it from the group's configuration (which confirms its
/// tombstone), and its node deletes the replica; the shard keeps serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_move_removes_its_learner_from_the_group_and_its_node() {
    let mut cluster =
        Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(1), |c| c.move_step_deadline_ms = 3_000).await;
    let client = cluster.client().await;
    let (shard, meta_leader, leader) = move_onto_node_4_out_of_its_leaders_reach(&cluster, &client).await;
    let node = |id: u64| cluster.node(id);
    let group = flotilla::raft::GroupId(shard.0);
    let learner_in_group = |infos: &[flotilla::shard::GroupInfo]| {
        infos.iter().any(|i| i.group == group && i.committed_conf.membership.contains(flotilla::raft::NodeId(4)))
    };
    // The leader adds the learner to the group, which cannot reach it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !learner_in_group(&node(leader).host().group_info().await.unwrap()) {
        assert!(Instant::now() < deadline, "the learner was never added to the group");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the deadline: aborted, out of the group, off node 4, and no tombstone left.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let view = node(meta_leader).meta_view();
        let aborted = view.moves.is_empty() && view.map.get(shard).unwrap().replica(NodeId(4)).is_none();
        let removed = !learner_in_group(&node(leader).host().group_info().await.unwrap());
        let deleted = !node(4).host().groups().contains(&group);
        let buried = view.tombstones.contains_key(&shard);
        if aborted && removed && deleted && !buried {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "aborted {aborted}, out of the group {removed}, deleted on node 4 {deleted}, tombstone left {buried}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.put(b"a-key2", b"v").await.unwrap();
    assert_eq!(client.get(b"a-key").await.unwrap(), Some(b"v".to_vec()));
    cluster.shutdown().await;
}

/// Splits and replica moves asked for back to back, with a writer running: each shard split
/// is moved at once (its group may not have applied the split yet, the new half may have no
/// group yet), and the next split lands on a shard whose move just finished. Every shard must
/// end with a leader and three voters, each node must host exactly the replicas the map gives
/// it, and every acknowledged write must read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_racing_moves_converge_and_lose_nothing() {
    let mut cluster = Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(1), |_| {}).await;
    let client = std::sync::Arc::new(cluster.client().await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer =
        spawn_writer(client.clone(), stop.clone(), |i| format!("k{:03}-{i}", (i * 13) % 100), Duration::from_millis(2));
    let rows = |client: std::sync::Arc<Client>| async move {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
        rows
    };
    // Node 4 registers in the background; moves onto it are refused until then.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let AdminResponse::Nodes(nodes) = client.admin(AdminRequest::Nodes).await.unwrap() else { panic!() };
        if nodes.iter().any(|n| n.node == NodeId(4)) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut moves_started = 0;
    for round in 1..=6u32 {
        let key = format!("k{:03}", round * 14).into_bytes();
        let AdminResponse::Changed(halves) = client.admin(AdminRequest::Split { key }).await.expect("split") else {
            panic!("split answered otherwise")
        };
        // Move each half's replica off a node it has onto the one it lacks, at once.
        for d in halves {
            let nodes: Vec<NodeId> = d.replicas.iter().map(|r| r.node).collect();
            let Some(to) = (1..=4).map(NodeId).find(|n| !nodes.contains(n)) else { continue };
            let from = nodes[(round as usize) % nodes.len()];
            match client.admin(AdminRequest::Move { shard: d.id, from, to }).await {
                Ok(_) => moves_started += 1,
                Err(e) => eprintln!("round {round}: move of shard {} not started: {e}", d.id),
            }
        }
        // Wait for the moves of this round before the next split (splits of a moving shard
        // are refused), at most a little: the next split may then race their tail.
        let deadline = Instant::now() + Duration::from_secs(20);
        while rows(client.clone()).await.iter().any(|r| r.moving.is_some()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(moves_started >= 8, "only {moves_started} moves started");
    // Converged: no move left, every shard led with three voters, and every node hosts
    // exactly the replicas the map gives it.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = rows(client.clone()).await;
        let view = cluster.node(1).meta_view();
        let mut problems = Vec::new();
        for r in &rows {
            if r.moving.is_some() || r.leader.is_none() || r.descriptor.voters().count() != 3 {
                problems.push(format!("shard {}: moving {:?}, leader {:?}", r.descriptor.id, r.moving, r.leader));
            }
        }
        for node in cluster.nodes() {
            let hosted: std::collections::BTreeSet<u64> =
                node.host().groups().into_iter().map(|g| g.0).filter(|g| *g != 0).collect();
            let assigned: std::collections::BTreeSet<u64> =
                view.map.shards().filter(|d| d.replica(node.id()).is_some()).map(|d| d.id.0).collect();
            if hosted != assigned {
                problems.push(format!("node {} hosts {hosted:?}, the map gives it {assigned:?}", node.id()));
            }
        }
        if rows.len() == 7 && problems.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{} shards, not converged: {problems:?}", rows.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 50, "too few writes: {}", acked.len());
    assert_read_back_and_scanned(&client, &acked).await;
    cluster.shutdown().await;
}

/// A client writing `key(i)` = "v" for i = 0, 1, ... (pausing `pause` between writes) until
/// `stop`; returns the keys acknowledged. Outcomes a fault can cause (unknown, unavailable)
/// are skipped; any other error fails the test.
fn spawn_writer(
    client: std::sync::Arc<Client>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    key: impl Fn(u32) -> String + Send + 'static,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut i = 0u32;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let k = key(i);
            i += 1;
            match client.put(k.as_bytes(), b"v").await {
                Ok(()) => acked.push(k),
                Err(ClientError::Unknown(_) | ClientError::Unavailable(_)) => {}
                Err(e) => panic!("write {k}: {e}"),
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        acked
    })
}

/// Every acknowledged key reads back "v", and one scan of the "k" keys sees each exactly once.
async fn assert_read_back_and_scanned(client: &Client, acked: &[String]) {
    for k in acked {
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(b"v".to_vec()), "{k} lost");
    }
    let all = client.scan(b"k", Some(b"l"), 100_000).await.unwrap();
    let keys: std::collections::BTreeSet<Vec<u8>> = all.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys.len(), all.len(), "a scan returned a key twice");
    for k in acked {
        assert!(keys.contains(k.as_bytes()), "the scan missed {k}");
    }
}

/// Records and bytes of meta changes the nodes of `c` wrote as meta leaders.
fn meta_written(c: &Cluster) -> (u64, u64) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    c.nodes().fold((0, 0), |(r, b), n| (r + load(&n.stats().meta_write_records), b + load(&n.stats().meta_write_bytes)))
}

/// Splits at `key` and checks that the change wrote a few records, not the map (`whole` bytes).
async fn split_writing_little(c: &Cluster, client: &Client, key: &[u8], whole: u64) {
    let before = meta_written(c);
    let AdminResponse::Changed(halves) = client.admin(AdminRequest::Split { key: key.to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    assert_eq!(halves.len(), 2, "{halves:?}");
    let after = meta_written(c);
    let (records, bytes) = (after.0 - before.0, after.1 - before.1);
    eprintln!("split at {key:?}: {records} records, {bytes} bytes written; the whole map is {whole} bytes");
    assert!(records <= 6, "a split wrote {records} records");
    assert!(bytes * 10 < whole, "a split wrote {bytes} bytes of a {whole}-byte map");
}

/// The node leading the meta group, if one does.
async fn meta_leader(c: &Cluster) -> Option<NodeId> {
    for n in c.nodes() {
        let infos = n.host().group_info().await.unwrap();
        if infos.iter().any(|i| i.group == flotilla::raft::GroupId(0) && i.role == flotilla::raft::Role::Leader) {
            return Some(n.id());
        }
    }
    None
}

/// Issue 14: a placement change writes the records it changed, not the map. A split of one of
/// 128 shards writes a few hundred bytes where the map takes kilobytes, and after meta
/// leadership moves, the new leader goes on from its replica's state the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_changes_write_their_records_not_the_map_even_under_a_new_meta_leader() {
    let mut cluster = Cluster::start(3, 128).await;
    let client = cluster.client().await;
    let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await.unwrap() else { panic!() };
    assert_eq!(rows.len(), 128);
    let whole = flotilla::meta::encode_view(0, &cluster.node(1).meta_view()).unwrap().len() as u64;
    // What earlier builds rewrote on every change: the whole state with the reports the meta
    // leader lays over it (its view holds them, once every shard's leader reported).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let AdminResponse::Nodes(rows) = client.admin(AdminRequest::Nodes).await.unwrap() else { panic!() };
        if rows.iter().map(|r| r.leading).sum::<usize>() == 128 {
            break;
        }
        assert!(Instant::now() < deadline, "reports never covered every shard: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(l) = meta_leader(&cluster).await {
        let with_reports = flotilla::meta::encode_view(0, &cluster.node(l.0).meta_view()).unwrap().len();
        eprintln!("128 shards: {whole} bytes without reports, {with_reports} with the meta leader's reports");
    }
    split_writing_little(&cluster, &client, b"3f5", whole).await;
    // Meta leadership moves to another node, which continues from its replica's state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(l) = meta_leader(&cluster).await {
            break l;
        }
        assert!(Instant::now() < deadline, "no meta leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let next = NodeId(first.0 % 3 + 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while meta_leader(&cluster).await != Some(next) {
        let _ = cluster.node(first.0).host().transfer_leader(flotilla::raft::GroupId(0), next).await;
        assert!(Instant::now() < deadline, "meta leadership never moved to {next}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    split_writing_little(&cluster, &client, b"9a5", whole).await;
    // Every node's map gets both splits, at one revision.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<_> = cluster.nodes().map(|n| (n.meta_revision(), n.meta_view().map.len())).collect();
        if views.iter().all(|v| *v == views[0]) && views[0].1 == 130 {
            break;
        }
        assert!(Instant::now() < deadline, "the nodes' maps never agreed: {views:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}

/// Issue 14: a node without a meta replica refreshes its copy of the map with the changes
/// since its revision, not the whole map: splits reach it as changes once it found the meta
/// leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_a_meta_replica_follows_the_map_by_changes() {
    let mut cluster = Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(16), |_| {}).await;
    let client = cluster.client().await;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let updates = |c: &Cluster| {
        let s = c.node(4).stats();
        (load(&s.meta_updates_whole), load(&s.meta_updates_changes))
    };
    // Settled: node 4 asks the meta leader, which answers with (no) changes, report after report.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = updates(&cluster);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let after = updates(&cluster);
        if after.0 == before.0 && after.1 >= before.1 + 2 && cluster.node(4).meta_view().map.len() == 16 {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never settled on changes: {before:?} -> {after:?}");
    }
    let (whole, changes) = updates(&cluster);
    let leader_before = meta_leader(&cluster).await;
    for key in [b"1a".as_slice(), b"5a", b"9a"] {
        let AdminResponse::Changed(_) = client.admin(AdminRequest::Split { key: key.to_vec() }).await.unwrap() else {
            panic!("split answered otherwise")
        };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.node(4).meta_view().map.len() != 19
        || cluster.node(4).meta_revision() != cluster.node(1).meta_revision()
    {
        assert!(Instant::now() < deadline, "node 4's map never got the splits");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (whole_after, changes_after) = updates(&cluster);
    let leader_after = meta_leader(&cluster).await;
    assert_eq!(
        whole_after, whole,
        "node 4 was sent the whole map again (meta leader {leader_before:?} -> {leader_after:?}, changes {changes} -> \
         {changes_after})"
    );
    assert!(changes_after > changes, "node 4 was sent changes");
    // Its copy is the map, routing included.
    assert_eq!(cluster.node(4).meta_view().map, cluster.node(1).meta_view().map);
    // A new meta leader holds no changes from before its tenure: node 4 is sent the whole map
    // once, then follows it by changes again.
    let first = meta_leader(&cluster).await.expect("a meta leader");
    let next = NodeId(first.0 % 3 + 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while meta_leader(&cluster).await != Some(next) {
        let _ = cluster.node(first.0).host().transfer_leader(flotilla::raft::GroupId(0), next).await;
        assert!(Instant::now() < deadline, "meta leadership never moved to {next}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let AdminResponse::Changed(_) = client.admin(AdminRequest::Split { key: b"da".to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.node(4).meta_view().map != cluster.node(next.0).meta_view().map
        || cluster.node(4).meta_view().map.len() != 20
    {
        assert!(Instant::now() < deadline, "node 4's map never got the split under the new meta leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

/// Issue 14's upgrade path: a cluster whose meta replicas hold the state in the one-key format
/// of earlier builds starts, reads it, and converts it at the meta leader's first operation;
/// then it serves and changes placement as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meta_state_stored_in_the_one_key_format_converts_and_the_cluster_serves_on() {
    use flotilla::meta::{read_stored_blocking, META_STATE_KEY};
    use flotilla::shard::{Op, Store, CF_DATA};
    let mut cluster = Cluster::start(3, 4).await;
    let client = cluster.client().await;
    client.put(b"a-key", b"v").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<_> = cluster.nodes().map(|n| (n.meta_revision(), n.meta_view().map.len())).collect();
        if views.iter().all(|v| *v == views[0]) && views[0].1 == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the nodes' maps never agreed: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = cluster.node(1).meta_view().as_ref().clone();
    let mut one_key = vec![1u8];
    one_key.extend(state.snapshot().unwrap());
    for id in 1..=3 {
        cluster.stop(id).await;
    }
    // Every replica rewritten as an earlier build left it: no records, the whole state in one key.
    for id in 1..=3 {
        let path = cluster.dev.dir().join(format!("node-{id}")).join("store");
        let deadline = Instant::now() + Duration::from_secs(10);
        let store = loop {
            match Store::open(&path) {
                Ok(s) => break s,
                Err(e) => assert!(Instant::now() < deadline, "node {id}'s store never closed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ops = vec![
            Op::DeleteRange(CF_DATA, b"\x00meta/".to_vec(), b"\x00meta0".to_vec()),
            Op::Put(CF_DATA, META_STATE_KEY.to_vec(), one_key.clone()),
        ];
        store.write(ops, true).await.unwrap();
        assert!(read_stored_blocking(&store).unwrap().whole, "node {id} holds the one-key format");
    }
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    // Converted on every replica, without anyone asking: the nodes' reports are operations.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored: Vec<_> =
            cluster.nodes().map(|n| read_stored_blocking(n.host().store()).map(|s| (s.whole, s.revision()))).collect();
        if stored.iter().all(|s| matches!(s, Ok((false, r)) if *r > 0)) {
            break;
        }
        assert!(Instant::now() < deadline, "never converted: {stored:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(client.get(b"a-key").await.unwrap(), Some(b"v".to_vec()));
    let AdminResponse::Changed(_) = client.admin(AdminRequest::Split { key: b"a-kez".to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<_> = cluster.nodes().map(|n| (n.meta_revision(), n.meta_view().map.len())).collect();
        if views.iter().all(|v| *v == views[0]) && views[0].1 == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "the nodes' maps never agreed after the split: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.put(b"a-key", b"w").await.unwrap();
    assert_eq!(client.get(b"a-key").await.unwrap(), Some(b"w".to_vec()));
    cluster.shutdown().await;
}

/// A whole report too large for one message goes in parts; the meta leader holds the parts
/// until the last and runs only the whole: a report cut short would tell it the node no
/// longer holds the shards of the parts to come (and so, say, that their tombstones are done
/// with).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_in_parts_is_run_only_whole() {
    use flotilla::peer_wire::MetaOp;
    use flotilla::placement::{LogIndex, NodeReport, ReportChange};
    // Every node's whole report goes in parts of two shards, every third report.
    let mut cluster = Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], dev_split_keys(5), |cfg| {
        cfg.report_shards_per_message = 2;
        cfg.reports_between_whole = 2;
    })
    .await;
    let client = cluster.client().await;
    let shards: Vec<ShardId> = client.cached_view().map.shards().map(|d| d.id).collect();
    assert!(shards.len() >= 2, "{shards:?}");
    // The meta leader, once it holds every node's report of every shard.
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        let mut found = None;
        for n in cluster.nodes() {
            let i = n.host().group_info_of(flotilla::meta::META_GROUP).await;
            if i.is_ok_and(|i| i.role == flotilla::raft::Role::Leader) {
                found = Some(n);
            }
        }
        if let Some(n) = found {
            let live = n.live_reports();
            let whole = |id| live.get(&NodeId(id)).is_some_and(|r| shards.iter().all(|s| r.applied.contains_key(s)));
            if (1..=3).all(whole) {
                break n;
            }
        }
        assert!(Instant::now() < deadline, "no meta leader holding every node's report");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // While the nodes' own whole reports go in parts, the leader never holds one cut short.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for (node, r) in leader.live_reports() {
            assert!(
                shards.iter().all(|s| r.applied.contains_key(s)),
                "node {node}'s report cut short: {:?}",
                r.applied
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let whole: u64 = cluster.nodes().map(|n| n.stats().reports_whole.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(whole >= 3, "whole reports (in parts) were sent: {whole}");
    // The first part of a whole report of node 3 naming only the first shard (numbered in a run
    // of its own, so the leader takes it as a new whole report).
    let mut first = NodeReport::default();
    first.applied.insert(shards[0], LogIndex(1));
    let change: ReportChange = NodeReport::default().change_to(&first);
    let seq = 0xFEED_u64 << 32;
    let addr = leader.meta_view().nodes[&NodeId(3)].addr.clone();
    let op = MetaOp::ReportChange { node: NodeId(3), addr, base: None, seq, change, last: false };
    leader.meta_exec(op, false).await.expect("the part is taken");
    let held = leader.live_reports().get(&NodeId(3)).cloned().unwrap_or_default();
    assert!(
        shards.iter().all(|s| held.applied.contains_key(s)),
        "the leader ran a report cut short: node 3 holds {:?}",
        held.applied
    );
    cluster.shutdown().await;
}

/// The meta leader keeps a node's live report through changes of no shard only while it is the
/// copy of the node's numbered report: a plain report in between (a node's announcement,
/// arriving late) is replaced at the next report, not kept for as long as the node stays idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_announcement_between_numbered_reports_does_not_outlive_the_next() {
    use flotilla::peer_wire::MetaOp;
    use flotilla::placement::{LogIndex, NodeReport, ReportChange};
    // Node 4 holds nothing and is stopped once registered: the reports of it below are the
    // only ones the meta leader gets.
    let mut cluster = Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(3), |_| {}).await;
    let client = cluster.client().await;
    let shards: Vec<ShardId> = client.cached_view().map.shards().map(|d| d.id).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.nodes().any(|n| n.live_reports().contains_key(&NodeId(4))) {
        assert!(Instant::now() < deadline, "node 4 never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop(4).await;
    let mut leader = None;
    for id in 1..=3 {
        let i = cluster.node(id).host().group_info_of(flotilla::meta::META_GROUP).await;
        if i.is_ok_and(|i| i.role == flotilla::raft::Role::Leader) {
            leader = Some(id);
        }
    }
    let leader = cluster.node(leader.expect("a meta leader"));
    let addr = leader.meta_view().nodes[&NodeId(4)].addr.clone();
    let with_applied =
        |a: u64| NodeReport { applied: shards.iter().map(|s| (*s, LogIndex(a))).collect(), ..NodeReport::default() };
    let change = |base: Option<u64>, seq: u64, change: ReportChange| MetaOp::ReportChange {
        node: NodeId(4),
        addr: addr.clone(),
        base,
        seq,
        change,
        last: true,
    };
    let run = 0xFEED_u64 << 32;
    let numbered = with_applied(5);
    leader.meta_exec(change(None, run, NodeReport::default().change_to(&numbered)), false).await.expect("whole");
    leader.meta_exec(MetaOp::report(NodeId(4), addr.clone(), with_applied(1)), false).await.expect("announcement");
    assert_eq!(leader.live_reports()[&NodeId(4)].applied, with_applied(1).applied, "the announcement is taken");
    leader.meta_exec(change(Some(run), run + 1, numbered.change_to(&numbered)), false).await.expect("no change");
    assert_eq!(
        leader.live_reports()[&NodeId(4)].applied,
        numbered.applied,
        "the next numbered report replaces the announcement"
    );
    cluster.shutdown().await;
}

/// A whole meta state larger than a part (here 256 bytes) goes in parts: to the node a meta
/// operation was forwarded from, to a node that holds no meta replica and follows the map
/// from scratch (restarted), and to a node that joins. Each assembles it, and the cluster
/// serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meta_state_larger_than_a_part_reaches_every_node_in_parts() {
    use std::sync::atomic::Ordering;
    let mut cluster =
        Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], dev_split_keys(8), |cfg| cfg.meta_part_bytes = 256).await;
    let client = cluster.client().await;
    let parts = |cluster: &Cluster| cluster.node(4).stats().meta_whole_in_parts.load(Ordering::Relaxed);
    // A split asked of node 4 (no meta replica) runs on the meta leader; node 4 takes the
    // state after it.
    // (Asked of the node itself: a client may send an admin request to any node it knows.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.node(4).host().hosts(flotilla::meta::META_GROUP) {
        assert!(Instant::now() < deadline, "node 4 holds a meta replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its answer brings node 4's view up to date with the changes since the view's revision:
    // the state, larger than a part, does not cross the network again.
    let changes = |cluster: &Cluster| cluster.node(4).stats().meta_updates_changes.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while changes(&cluster) == 0 {
        assert!(Instant::now() < deadline, "node 4 never followed the meta state change by change");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (before, changes_before) = (parts(&cluster), changes(&cluster));
    let at = b"zz-in-parts".to_vec();
    let op = flotilla::peer_wire::MetaOp::SplitAt { key: at.clone() };
    let (_, state, _) = cluster.node(4).meta_exec(op, false).await.unwrap();
    assert_eq!(parts(&cluster), before, "the forwarded split was answered with its changes, not the whole state");
    assert!(changes(&cluster) > changes_before, "the answer was the changes since node 4's view");
    assert!(state.map.shards().any(|d| d.start == at), "the answer holds the split");
    assert!(cluster.node(4).meta_view().map.shards().any(|d| d.start == at), "node 4 holds the split");
    // Restarted, node 4 holds no copy to bring up to date: the whole state, in parts.
    cluster.stop(4).await;
    cluster.restart(4).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while parts(&cluster) == 0 || !cluster.node(4).meta_view().map.shards().any(|d| d.start == at) {
        assert!(Instant::now() < deadline, "node 4 never took the whole state again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A node that joins is answered the state in parts, and registers.
    let joined = cluster.join().await.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.node(1).meta_view().nodes.contains_key(&joined) {
        assert!(Instant::now() < deadline, "node {joined} never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster.node(joined.0).meta_view().map.len() >= 9, "the joined node holds the map");
    for k in ["a", "m", "zz-in-parts", "zzz"] {
        client.put(k.as_bytes(), b"v").await.unwrap();
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(b"v".to_vec()));
    }
    cluster.shutdown().await;
}
