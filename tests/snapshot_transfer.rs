//! Snapshot chunks travel on the transport's transfer streams, never in the Raft batches:
//! a chunk sent on that path reaches the other node's host, a transfer that is not one
//! snapshot chunk of its stream's group from its sender is refused without harm, and a
//! replica that comes back too far behind catches up by snapshot over that path.

use bytes::Bytes;
use flotilla::net::{transfer_bytes_max, NetStats, TransportNetwork};
use flotilla::raft::{GroupId, LogId, Message, MessageBody, NodeId, Role, SnapshotMeta, Term};
use flotilla::shard::{HostNetwork, NodeBatch};
use flotilla::Node;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::cluster::Cluster;

/// A group no node hosts: a chunk for it reaches the host and is counted there as a message
/// for an unknown group, touching no real replica.
const NO_SUCH_GROUP: GroupId = GroupId(4242);

fn chunk(from: u64, to: u64, data: &'static [u8]) -> Message {
    let meta = SnapshotMeta {
        last_log_id: LogId::default(),
        snapshot_id: 7,
        size_bytes: data.len() as u64,
        ..Default::default()
    };
    Message {
        from: NodeId(from),
        to: NodeId(to),
        term: Term(1),
        body: MessageBody::Snapshot { meta: Box::new(meta), offset: 0, data: Bytes::from_static(data), done: true },
    }
}

fn encoded(from: u64, group: GroupId, msg: Message) -> Bytes {
    NodeBatch { from: NodeId(from), messages: vec![(group, msg)], quiesce: Vec::new(), removed: Vec::new() }
        .encode()
        .unwrap()
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `body` on a raw transfer stream of `group` from `from` to `to`; the receiver may stop
/// it early, so the outcome is not checked.
async fn raw_transfer(from: &Node, to: NodeId, group: GroupId, body: Bytes) {
    let mut stream = from.transport().send_stream(to, group).await.expect("a transfer stream");
    if stream.write(body).await.is_ok() {
        let _ = stream.finish(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_chunk_crosses_on_a_transfer_stream_and_bad_transfers_are_refused() {
    let mut cluster = Cluster::start(2, 1).await;
    let _client = cluster.client().await;
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let unknown_before = n2.host().stats().unknown_group_msgs.load(Ordering::Relaxed);

    // The sending half as the node uses it, on node 1's transport.
    let sent = Arc::new(NetStats::default());
    let network = TransportNetwork::new(n1.transport().clone(), 4, sent.clone());
    network.send_transfer(NodeId(2), NO_SUCH_GROUP, chunk(1, 2, b"snapshot bytes"));
    let received = n2.net_stats();
    wait_for("the chunk on node 2", 10, || received.snapshot_chunks_received.load(Ordering::Relaxed) == 1).await;
    wait_for("the chunk in node 2's host", 10, || {
        n2.host().stats().unknown_group_msgs.load(Ordering::Relaxed) > unknown_before
    })
    .await;
    wait_for("the acknowledgement on node 1", 10, || sent.snapshot_chunks_sent.load(Ordering::Relaxed) == 1).await;
    assert_eq!(
        sent.snapshot_bytes_sent.load(Ordering::Relaxed),
        received.snapshot_bytes_received.load(Ordering::Relaxed)
    );
    assert_eq!(received.snapshot_chunks_in_batches.load(Ordering::Relaxed), 0);
    let metrics = n2.metrics_text().await;
    assert!(metrics.contains("flotilla_net_snapshot_chunks_received_total{node=\"2\"} 1"), "{metrics}");

    // Refused, one after another: garbage, more than a chunk may be, a chunk of another group
    // than its stream's, a message that is not a chunk, a chunk claiming another sender.
    let oversized = vec![0u8; transfer_bytes_max(n2_chunk_bytes()) + 1];
    let heartbeat = Message {
        body: MessageBody::Heartbeat { commit: Default::default(), round: 1, keep_after: None },
        ..chunk(1, 2, b"")
    };
    let cases: Vec<(GroupId, Bytes)> = vec![
        (NO_SUCH_GROUP, Bytes::from_static(b"not a record")),
        (NO_SUCH_GROUP, Bytes::from(oversized)),
        (GroupId(4243), encoded(1, NO_SUCH_GROUP, chunk(1, 2, b"x"))),
        (NO_SUCH_GROUP, encoded(1, NO_SUCH_GROUP, heartbeat)),
        (NO_SUCH_GROUP, encoded(3, NO_SUCH_GROUP, chunk(3, 2, b"x"))),
    ];
    let n = cases.len() as u64;
    for (group, body) in cases {
        raw_transfer(n1, NodeId(2), group, body).await;
    }
    wait_for("the refusals", 10, || received.transfers_refused.load(Ordering::Relaxed) == n).await;
    assert_eq!(received.snapshot_chunks_received.load(Ordering::Relaxed), 1);

    // Node 2 still takes good chunks.
    network.send_transfer(NodeId(2), NO_SUCH_GROUP, chunk(1, 2, b"again"));
    wait_for("a second chunk", 10, || received.snapshot_chunks_received.load(Ordering::Relaxed) == 2).await;
    cluster.shutdown().await;
}

/// The chunk size of the nodes' Raft configuration (the default).
fn n2_chunk_bytes() -> usize {
    flotilla::node::default_raft().snapshot_chunk_bytes
}

/// Node 3 is stopped while its shard's log moves far past it and is purged; when it comes
/// back, the leader sends it a snapshot, in several chunks, all on transfer streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_far_behind_catches_up_by_snapshot_on_transfer_streams() {
    let mut cluster = Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], Vec::new(), |cfg| {
        cfg.raft.log_keep_entries = 5;
        cfg.raft.log_lag_entries_max = 20;
        cfg.raft.log_purge_step_entries = 5;
        // Small chunks: the snapshot takes several, which must arrive in order.
        cfg.raft.snapshot_chunk_bytes = 4 << 10;
    })
    .await;
    let client = cluster.client().await;
    // Written before node 3 stops, so every snapshot it may get holds them: values that do not
    // compress, about 30 KiB, many chunks.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..100 {
        let value: Vec<u8> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        client.put(format!("a{i:04}").as_bytes(), &value).await.unwrap();
    }
    let group = data_group(cluster.node(1)).await;
    let infos = cluster.node(3).host().group_info().await.unwrap();
    let n3_last = infos.iter().find(|i| i.group == group).expect("node 3's replica").last_index;
    cluster.stop(3).await;
    // Far past node 3, until the leader's log starts after node 3's: only a snapshot helps it.
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        client.put(format!("b{i:04}").as_bytes(), b"v").await.unwrap();
        i += 1;
        if i >= 30 && leader_info(&cluster, group).await.is_some_and(|l| l.first_index.0 > n3_last.0 + 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the leader never purged its log past node 3's ({n3_last})");
    }
    cluster.restart(3).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader_committed = leader_info(&cluster, group).await.map(|l| l.committed);
        let n3 = cluster.node(3).host().group_info().await.unwrap_or_default();
        let caught_up = n3.iter().any(|i| i.group == group && leader_committed.is_some_and(|c| i.applied >= c));
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 never caught up (leader at {leader_committed:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n3 = cluster.node(3).net_stats();
    let received = n3.snapshot_chunks_received.load(Ordering::Relaxed);
    if received == 0 {
        for node in cluster.nodes() {
            eprintln!("node {}: {:?}", node.id(), node.host().group_info().await.unwrap_or_default());
        }
        panic!("node 3 caught up without a snapshot chunk on a transfer stream");
    }
    // The leader counts a chunk once the receiver's QUIC stack acknowledged it, which may
    // come after the receiver delivered it: wait for the acknowledgements.
    let sent = || cluster.nodes().map(|n| n.net_stats().snapshot_chunks_sent.load(Ordering::Relaxed)).sum::<u64>();
    wait_for("the leader's count of chunks sent", 10, || sent() >= received).await;
    let bytes = n3.snapshot_bytes_received.load(Ordering::Relaxed);
    let dropped: u64 = cluster.nodes().map(|n| n.net_stats().snapshot_chunks_dropped.load(Ordering::Relaxed)).sum();
    eprintln!("snapshot chunks: {} sent, {received} ({bytes} bytes) received by node 3, {dropped} dropped", sent());
    for node in cluster.nodes() {
        assert_eq!(node.net_stats().snapshot_chunks_in_batches.load(Ordering::Relaxed), 0, "node {}", node.id());
        assert_eq!(node.net_stats().transfers_refused.load(Ordering::Relaxed), 0, "node {}", node.id());
    }
    cluster.shutdown().await;
}

/// The one data shard's group (not the meta group).
async fn data_group(node: &Node) -> GroupId {
    let infos = node.host().group_info().await.unwrap();
    infos.iter().map(|i| i.group).find(|g| g.0 != 0).expect("a data group")
}

async fn leader_info(cluster: &Cluster, group: GroupId) -> Option<flotilla::shard::GroupInfo> {
    for node in cluster.nodes() {
        let infos = node.host().group_info().await.unwrap_or_default();
        if let Some(i) = infos.into_iter().find(|i| i.group == group && i.role == Role::Leader) {
            return Some(i);
        }
    }
    None
}
