//! Envelope delivery: order per group, batching, queue bounds, fault injection.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use flotilla_transport::{NodeId, TransportConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_each_group_in_order_both_ways() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, mut b_in) = nodes.pop().unwrap();
    let (a, mut a_in) = nodes.pop().unwrap();
    const PER_GROUP: u64 = 500;
    const GROUPS: u64 = 10;
    for seq in 0..PER_GROUP {
        for group in 0..GROUPS {
            a.send(NodeId(2), env(group, seq_payload(seq, 20))).unwrap();
            b.send(NodeId(1), env(group, seq_payload(seq, 20))).unwrap();
        }
    }
    for (incoming, from) in [(&mut b_in, NodeId(1)), (&mut a_in, NodeId(2))] {
        let got = recv_n(incoming, (PER_GROUP * GROUPS) as usize).await;
        let mut next: HashMap<u64, u64> = HashMap::new();
        for (sender, envelope) in got {
            assert_eq!(sender, from);
            let expected = next.entry(envelope.group.0).or_insert(0);
            assert_eq!(seq_of(&envelope), *expected, "group {} out of order", envelope.group);
            *expected += 1;
        }
        assert_eq!(next.len() as u64, GROUPS);
    }
    let m = a.metrics().peers[&NodeId(2)].clone();
    assert_eq!(m.envelopes_sent, PER_GROUP * GROUPS);
    assert!(m.connected && m.rtt.is_some());
    assert_eq!(b.metrics().peers[&NodeId(1)].envelopes_received, PER_GROUP * GROUPS);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_all_to_all_with_sender_ids_from_certificates() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2, 3]).await;
    const N: u64 = 300;
    for (t, _) in &nodes {
        for to in 1..=3u64 {
            if to != t.node().0 {
                for seq in 0..N {
                    t.send(NodeId(to), env(seq % 3, seq_payload(seq, 0))).unwrap();
                }
            }
        }
    }
    for (t, incoming) in nodes.iter_mut() {
        let got = recv_n(incoming, (2 * N) as usize).await;
        let mut last: HashMap<(NodeId, u64), u64> = HashMap::new();
        let mut per_sender: HashMap<NodeId, u64> = HashMap::new();
        for (from, envelope) in got {
            assert_ne!(from, t.node());
            *per_sender.entry(from).or_default() += 1;
            let seq = seq_of(&envelope);
            if let Some(prev) = last.insert((from, envelope.group.0), seq) {
                assert!(seq > prev, "order broken from {from} in {}", envelope.group);
            }
        }
        assert_eq!(per_sender.len(), 2);
        assert!(per_sender.values().all(|n| *n == N));
    }
    for (t, _) in &nodes {
        t.shutdown().await;
    }
}

/// The higher node queues while the lower one is not yet up (it waits to be dialed); once
/// connected, the queue is written in a few large batches, not one frame per envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_envelopes_travel_in_few_batches() {
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.limits.batch_bytes_max = 64 << 10;
    let (b, _b_in) = start(config_b).await;
    const N: u64 = 2_000;
    for seq in 0..N {
        b.send(NodeId(1), env(seq % 4, seq_payload(seq, 92))).unwrap(); // 100-byte payloads
    }
    assert_eq!(b.queue_len(NodeId(1)), N as usize);
    let mut config_a = config(&ca, 1);
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, mut a_in) = start(config_a).await;
    let got = recv_n(&mut a_in, N as usize).await;
    for group in 0..4 {
        let seqs: Vec<u64> = got.iter().filter(|(_, e)| e.group.0 == group).map(|(_, e)| seq_of(e)).collect();
        assert_eq!(seqs, (0..N).filter(|s| s % 4 == group).collect::<Vec<_>>());
    }
    let m = b.metrics().peers[&NodeId(1)].clone();
    // 4 groups on 4 streams, 500 x 112 wire bytes = 56 KB each: everything was queued before
    // the connection existed, so one flush writes one frame per stream.
    assert_eq!(m.envelopes_sent, N);
    assert_eq!(m.batches_sent, 4, "{} batches for {N} envelopes", m.batches_sent);
    assert_eq!(a.metrics().peers[&NodeId(2)].batches_received, m.batches_sent);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_the_oldest_and_counts_them() {
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.limits.queue_envelopes_max = 100;
    let (b, _b_in) = start(config_b).await;
    for seq in 0..250 {
        b.send(NodeId(1), env(7, seq_payload(seq, 0))).unwrap();
    }
    let m = b.metrics().peers[&NodeId(1)].clone();
    assert_eq!((m.queue_drops, m.queue_envelopes), (150, 100));
    let mut config_a = config(&ca, 1);
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, mut a_in) = start(config_a).await;
    let seqs: Vec<u64> = recv_n(&mut a_in, 100).await.iter().map(|(_, e)| seq_of(e)).collect();
    assert_eq!(seqs, (150..250).collect::<Vec<_>>());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_bound_also_drops_oldest_and_oversized_envelopes_are_refused() {
    let ca = ca();
    let mut config_b: TransportConfig = config(&ca, 2);
    config_b.limits.queue_bytes_max = 10_000;
    config_b.limits.frame_bytes_max = 64 << 10;
    config_b.limits.batch_bytes_max = 32 << 10;
    let (b, _b_in) = start(config_b).await;
    for seq in 0..30 {
        b.send(NodeId(1), env(1, seq_payload(seq, 992))).unwrap(); // 1,000 bytes each
    }
    let m = b.metrics().peers[&NodeId(1)].clone();
    assert_eq!((m.queue_envelopes, m.queue_drops), (10, 20));
    let too_big = vec![0u8; (64 << 10) - 17];
    assert!(matches!(b.send(NodeId(1), env(1, too_big)), Err(flotilla_transport::TransportError::TooLarge { .. })));
    let fits = vec![0u8; (64 << 10) - 18];
    assert!(b.send(NodeId(1), env(1, fits)).is_ok());
    assert!(b.send(NodeId(2), env(1, vec![1])).is_err(), "sending to self is refused");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_peer_loses_traffic_both_ways_until_unblocked() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, mut b_in) = nodes.pop().unwrap();
    let (a, mut a_in) = nodes.pop().unwrap();
    // Make sure the connection is up first, so the blocked envelopes would otherwise arrive.
    a.send(NodeId(2), env(1, seq_payload(0, 0))).unwrap();
    recv_n(&mut b_in, 1).await;

    a.block_peer(NodeId(2));
    for seq in 1..=10 {
        a.send(NodeId(2), env(1, seq_payload(seq, 0))).unwrap(); // dropped at the sender
        b.send(NodeId(1), env(1, seq_payload(seq, 0))).unwrap(); // dropped at a's reader
    }
    assert!(matches!(
        a.request(NodeId(2), "x".into(), Duration::from_secs(5)).await,
        Err(flotilla_transport::TransportError::Blocked(_))
    ));
    let a_drops = || a.metrics().peers[&NodeId(2)].fault_drops;
    eventually("b's envelopes discarded by a", || a_drops() == 20).await;
    a.unblock_peer(NodeId(2));
    a.send(NodeId(2), env(1, seq_payload(99, 0))).unwrap();
    b.send(NodeId(1), env(1, seq_payload(99, 0))).unwrap();
    // Same group, same stream: had anything blocked got through, it would come first.
    assert_eq!(seq_of(&recv_n(&mut b_in, 1).await[0].1), 99);
    assert_eq!(seq_of(&recv_n(&mut a_in, 1).await[0].1), 99);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_fraction_and_delay_faults() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, mut b_in) = nodes.pop().unwrap();
    let (a, _a_in) = nodes.pop().unwrap();
    a.set_drop_fraction(0.5, 42);
    for seq in 0..1_000 {
        a.send(NodeId(2), env(3, seq_payload(seq, 0))).unwrap();
    }
    let dropped = a.metrics().peers[&NodeId(2)].fault_drops;
    assert!((300..700).contains(&dropped), "{dropped} of 1000 dropped at fraction 0.5");
    let got = recv_n(&mut b_in, (1_000 - dropped) as usize).await;
    assert!(got.windows(2).all(|w| seq_of(&w[0].1) < seq_of(&w[1].1)));
    a.clear_faults();

    let delay = Duration::from_millis(300);
    a.set_peer_delay(NodeId(2), delay);
    let started = tokio::time::Instant::now();
    for seq in 0..50 {
        a.send(NodeId(2), env(3, seq_payload(seq, 0))).unwrap();
    }
    let got = recv_n(&mut b_in, 50).await;
    assert!(started.elapsed() >= delay, "delivered before the injected delay");
    assert_eq!(got.iter().map(|(_, e)| seq_of(e)).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
    a.shutdown().await;
    b.shutdown().await;
}

/// Shutdown lets the writers flush what was queued before closing the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_envelopes() {
    let ca = ca();
    let (b, mut b_in) = start(config(&ca, 2)).await;
    // A node with a generous flush deadline, so a loaded machine cannot make this flaky;
    // shutdown returns as soon as the writers are done.
    let mut config_a = config(&ca, 1);
    config_a.timing.shutdown_flush_ms_max = 20_000;
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, _a_in) = start(config_a).await;
    a.send(NodeId(2), env(1, seq_payload(0, 0))).unwrap();
    recv_n(&mut b_in, 1).await;
    const N: u64 = 2_000;
    for seq in 1..=N {
        a.send(NodeId(2), env(seq % 3, seq_payload(seq, 100))).unwrap();
    }
    a.shutdown().await;
    assert!(a.send(NodeId(2), env(1, vec![0])).is_err(), "send after shutdown is refused");
    let got = recv_n(&mut b_in, N as usize).await;
    let mut seqs: Vec<u64> = got.iter().map(|(_, e)| seq_of(e)).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    b.shutdown().await;
}

/// A receiver slow to take up new streams still gets everything a shutdown flushed. QUIC
/// acknowledges the data of streams the receiver has not taken up yet, so the sender's
/// shutdown closes the connection before the receiver sees them; the receiver must still take
/// up every stream the closed connection holds, not stop at its first failed accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_slow_to_take_up_streams_reads_all_a_shutdown_flushed() {
    let ca = ca();
    let (b, mut b_in) = start(config(&ca, 2)).await;
    let mut config_a = config(&ca, 1);
    config_a.raft_streams = 8;
    config_a.timing.shutdown_flush_ms_max = 20_000;
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, _a_in) = start(config_a).await;
    a.send(NodeId(2), env(1, seq_payload(0, 0))).unwrap();
    recv_n(&mut b_in, 1).await;
    // Groups 0 and 2..=7 go on Raft streams not opened yet, which node 2 takes up one by one,
    // at least 100 ms apart until the close: node 1 shuts down and closes the connection
    // before most of them are taken up.
    b.set_accept_delay(Duration::from_millis(100));
    const N: u64 = 800;
    for seq in 1..=N {
        a.send(NodeId(2), env(seq % 8, seq_payload(seq, 100))).unwrap();
    }
    a.shutdown().await;
    let got = recv_n(&mut b_in, N as usize).await;
    let mut seqs: Vec<u64> = got.iter().map(|(_, e)| seq_of(e)).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    b.shutdown().await;
}
