//! Reconnection after one side restarts (same identity, same or new address).

mod common;

use std::time::Duration;

use common::*;
use flotilla_transport::{Incoming, NodeId, Transport};

/// Sends numbered envelopes from `from` to `to` until one arrives, and returns its number.
/// Envelopes sent while the connection is being rebuilt may be lost (Raft tolerates it), so
/// the test keeps sending rather than count on any single one.
async fn send_until_received(from: &Transport, to: NodeId, incoming: &mut Incoming) -> u64 {
    let start = tokio::time::Instant::now();
    let mut seq = 1_000;
    loop {
        assert!(start.elapsed() < DEADLINE, "nothing arrived after the restart");
        from.send(to, env(5, seq_payload(seq, 0))).unwrap();
        seq += 1;
        if let Ok(Some((sender, envelope))) =
            tokio::time::timeout(Duration::from_millis(50), incoming.envelopes.recv()).await
        {
            assert_eq!(sender, from.node());
            return seq_of(&envelope);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_node_restarts_on_the_same_port() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, _b_in) = nodes.pop().unwrap();
    let (a, mut a_in) = nodes.pop().unwrap();
    let b_addr = b.local_addr().unwrap();
    b.send(NodeId(1), env(5, seq_payload(0, 0))).unwrap();
    recv_n(&mut a_in, 1).await;

    b.shutdown().await;
    drop(b);
    drop(_b_in);
    // The old socket is released once the old endpoint's tasks have wound down.
    let mut config_b = config(&ca, 2);
    config_b.listen_addr = b_addr;
    let start = tokio::time::Instant::now();
    let (b, mut b_in) = loop {
        match flotilla_transport::Transport::start(config_b.clone()).await {
            Ok(started) => break started,
            Err(e) if start.elapsed() < DEADLINE => {
                eprintln!("rebinding {b_addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("could not rebind {b_addr}: {e}"),
        }
    };
    send_until_received(&a, NodeId(2), &mut b_in).await;
    send_until_received(&b, NodeId(1), &mut a_in).await;
    let m = a.metrics().peers[&NodeId(2)].clone();
    assert!(m.reconnects >= 1, "{m:?}");
    assert!(m.connected);
    assert_eq!(a.connections_with(NodeId(2)), m.connections, "{m:?}");
    assert_eq!(a.connections_with(NodeId(9)), 0, "a node never seen has no connections");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_node_restarts_on_a_new_port_and_is_told_by_set_peer_addr() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, _b_in) = nodes.pop().unwrap();
    let (a, mut a_in) = nodes.pop().unwrap();
    b.send(NodeId(1), env(5, seq_payload(0, 0))).unwrap();
    recv_n(&mut a_in, 1).await;
    b.shutdown().await;

    let (b2, mut b2_in) = start(config(&ca, 2)).await;
    a.set_peer_addr(NodeId(2), b2.local_addr().unwrap()).unwrap();
    send_until_received(&a, NodeId(2), &mut b2_in).await;
    send_until_received(&b2, NodeId(1), &mut a_in).await;
    assert!(a.metrics().peers[&NodeId(2)].reconnects >= 1);
    a.shutdown().await;
    b2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_node_restarts_and_dials_again() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, mut b_in) = nodes.pop().unwrap();
    let (a, _a_in) = nodes.pop().unwrap();
    a.send(NodeId(2), env(5, seq_payload(0, 0))).unwrap();
    recv_n(&mut b_in, 1).await;
    assert_eq!(b.connections_with(NodeId(1)), 1);
    a.shutdown().await;
    eventually("b sees the old connection close", || !b.metrics().peers[&NodeId(1)].connected).await;

    let mut config_a = config(&ca, 1);
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a2, mut a2_in) = start(config_a).await;
    send_until_received(&b, NodeId(1), &mut a2_in).await;
    send_until_received(&a2, NodeId(2), &mut b_in).await;
    let m = b.metrics().peers[&NodeId(1)].clone();
    assert_eq!(m.connections, 2, "{m:?}");
    // What the host reads to learn that node 1 may have restarted (`HostNetwork::connections`).
    assert_eq!(b.connections_with(NodeId(1)), 2);
    a2.shutdown().await;
    b.shutdown().await;
}
