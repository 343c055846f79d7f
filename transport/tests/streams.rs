//! Large transfers next to Raft traffic, and request/response (node to node and client).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use flotilla_transport::cert::TlsIdentity;
use flotilla_transport::{Client, ClientIdentity, Grant, GroupId, NodeId, PeerIdentity, Role, TransportError};

const TRANSFER_BYTES: usize = 8 << 20;
const CHUNK_BYTES: usize = 64 << 10;

fn pattern(offset: usize, len: usize) -> Bytes {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// While a multi-MiB transfer is stuck on flow control (the receiver does not read it), Raft
/// envelopes still flow; then the transfer completes intact once read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_flow_while_a_large_transfer_is_in_flight() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, mut b_in) = nodes.pop().unwrap();
    let (a, _a_in) = nodes.pop().unwrap();

    let mut transfer = a.send_stream(NodeId(2), GroupId(77)).await.unwrap();
    let writer = tokio::spawn(async move {
        let mut offset = 0;
        while offset < TRANSFER_BYTES {
            transfer.write(pattern(offset, CHUNK_BYTES)).await?;
            offset += CHUNK_BYTES;
        }
        transfer.finish(DEADLINE).await
    });
    let mut incoming = tokio::time::timeout(DEADLINE, b_in.transfers.recv()).await.unwrap().unwrap();
    assert_eq!((incoming.from, incoming.group), (NodeId(1), GroupId(77)));

    for round in 0..100u64 {
        for group in 0..10 {
            a.send(NodeId(2), env(group, seq_payload(round, 0))).unwrap();
        }
    }
    let got = recv_n(&mut b_in, 1_000).await;
    assert!(got.iter().all(|(from, _)| *from == NodeId(1)));
    // The receiver has read nothing: 8 MiB cannot all be in flight (1 MiB stream window).
    assert!(!writer.is_finished(), "transfer finished without being read: no backpressure");

    let mut received = 0;
    while let Some(chunk) = incoming.read_chunk().await.unwrap() {
        assert_eq!(chunk, pattern(received, chunk.len()), "corrupt at {received}");
        received += chunk.len();
    }
    assert_eq!(received, TRANSFER_BYTES);
    writer.await.unwrap().unwrap();
    let m = b.metrics().peers[&NodeId(1)].clone();
    assert_eq!((m.transfers_received, m.envelopes_received), (1, 1_000));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_transfers_are_limited_in_number() {
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.limits.transfers_out_max = 1;
    let (b, _b_in) = start(config_b).await;
    let mut config_a = config(&ca, 1);
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, mut a_in) = start(config_a).await;

    let first = b.send_stream(NodeId(1), GroupId(1)).await.unwrap();
    let second = tokio::time::timeout(Duration::from_millis(300), b.send_stream(NodeId(1), GroupId(2))).await;
    assert!(second.is_err(), "a second transfer started while the only slot was taken");
    first.abort();
    let mut second = tokio::time::timeout(DEADLINE, b.send_stream(NodeId(1), GroupId(2))).await.unwrap().unwrap();
    second.write(Bytes::from_static(b"snapshot")).await.unwrap();
    let finish = tokio::spawn(second.finish(DEADLINE));
    // The aborted first transfer may or may not reach the node before its reset.
    loop {
        let mut t = tokio::time::timeout(DEADLINE, a_in.transfers.recv()).await.unwrap().unwrap();
        if t.group == GroupId(2) {
            assert_eq!(t.read_chunk().await.unwrap().unwrap(), Bytes::from_static(b"snapshot"));
            assert!(t.read_chunk().await.unwrap().is_none());
            break;
        }
        assert!(t.read_chunk().await.is_err(), "the aborted transfer must end in an error");
    }
    finish.await.unwrap().unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// Serves requests on a node: "echo:<x>" -> "<x>", "fail" -> error, "slow" -> never answers.
fn serve(mut requests: tokio::sync::mpsc::Receiver<flotilla_transport::IncomingRequest>) {
    tokio::spawn(async move {
        let mut parked = Vec::new();
        while let Some(request) = requests.recv().await {
            let body = request.body.clone();
            if let Some(rest) = body.strip_prefix(b"echo:") {
                let mut answer = format!("{}:", request.from).into_bytes();
                answer.extend_from_slice(rest);
                request.responder.respond(answer);
            } else if &body[..] == b"fail" {
                request.responder.fail("nope");
            } else if &body[..] == b"fail-long" {
                request.responder.fail("é".repeat(100_000));
            } else {
                parked.push(request); // never answered while the server runs
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_both_directions_with_errors_and_timeouts() {
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.timing.request_handler_timeout_ms = 500;
    let (b, b_in) = start(config_b).await;
    let mut config_a = config(&ca, 1);
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, a_in) = start(config_a).await;
    serve(b_in.requests);
    serve(a_in.requests);

    let answer = a.request(NodeId(2), "echo:hi".into(), DEADLINE).await.unwrap();
    assert_eq!(&answer[..], b"n1:hi", "the server sees the sender from its certificate");
    let answer = b.request(NodeId(1), "echo:back".into(), DEADLINE).await.unwrap();
    assert_eq!(&answer[..], b"n2:back");
    match a.request(NodeId(2), "fail".into(), DEADLINE).await {
        Err(TransportError::Remote(reason)) => assert_eq!(reason, "nope"),
        other => panic!("{other:?}"),
    }
    // A huge reason is cut (at a character boundary) instead of breaking the connection.
    match a.request(NodeId(2), "fail-long".into(), DEADLINE).await {
        Err(TransportError::Remote(reason)) => assert_eq!(reason, "é".repeat(256)),
        other => panic!("{other:?}"),
    }
    // The client's own deadline.
    let started = tokio::time::Instant::now();
    assert!(matches!(
        a.request(NodeId(2), "slow".into(), Duration::from_millis(200)).await,
        Err(TransportError::Timeout)
    ));
    assert!(started.elapsed() >= Duration::from_millis(200));
    // The server's deadline for its handler (500 ms) comes first.
    match a.request(NodeId(2), "slow".into(), DEADLINE).await {
        Err(TransportError::Remote(reason)) => assert!(reason.contains("in time"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A request to a node nobody can reach times out instead of hanging.
    assert!(matches!(
        a.request(NodeId(9), "echo:x".into(), Duration::from_millis(200)).await,
        Err(TransportError::Timeout)
    ));
    let m = a.metrics().peers[&NodeId(2)].clone();
    assert_eq!(m.requests_sent, 5);
    assert_eq!(b.metrics().peers[&NodeId(1)].requests_received, 5);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_endpoint_with_a_client_certificate_can_request() {
    let ca = ca();
    let (b, b_in) = start(config(&ca, 2)).await;
    serve(b_in.requests);
    let tls =
        TlsIdentity::from_issued(ca.cert_pem(), &ca.issue_client("cli", Grant::new(Role::ReadOnly)).unwrap()).unwrap();
    assert_eq!(tls.identity().unwrap(), PeerIdentity::Client(ClientIdentity::new("cli", Grant::new(Role::ReadOnly))));
    let client = Client::new(&tls, loopback()).unwrap();
    let conn = client.connect(b.local_addr().unwrap(), NodeId(2), DEADLINE).await.unwrap();
    let answer = conn.request("echo:status".into(), DEADLINE).await.unwrap();
    assert_eq!(&answer[..], b"client cli:status");
    // Dialing the right address under the wrong node id is refused by TLS (name mismatch).
    assert!(client.connect(b.local_addr().unwrap(), NodeId(3), DEADLINE).await.is_err());
    // A node certificate cannot be used for a client endpoint.
    assert!(Client::new(&node_tls(&ca, 5), loopback()).is_err());
    client.close().await;
    b.shutdown().await;
}

/// A peer may have at most `transfers_in_per_peer_max` transfers open at the receiver; one
/// more is stopped on arrival, never reaches the node, and its sender's writes fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_transfers_per_peer_are_limited() {
    const BYTES: usize = 4 << 20; // more than one stream window: the refused sender must block
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.limits.transfers_in_per_peer_max = 1;
    let (b, mut b_in) = start(config_b).await;
    let mut config_a = config(&ca, 1);
    config_a.limits.transfers_out_max = 3;
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, _a_in) = start(config_a).await;

    let mut writers = Vec::new();
    for group in [1, 2] {
        let mut transfer = a.send_stream(NodeId(2), GroupId(group)).await.unwrap();
        writers.push(tokio::spawn(async move {
            let mut offset = 0;
            while offset < BYTES {
                transfer.write(pattern(offset, CHUNK_BYTES)).await?;
                offset += CHUNK_BYTES;
            }
            transfer.finish(DEADLINE).await
        }));
    }
    let mut kept = tokio::time::timeout(DEADLINE, b_in.transfers.recv()).await.unwrap().unwrap();
    let mut received = 0;
    while let Some(chunk) = kept.read_chunk().await.unwrap() {
        received += chunk.len();
    }
    assert_eq!(received, BYTES);
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1, "{results:?}");
    let refused = if results[0].is_err() { GroupId(1) } else { GroupId(2) };
    assert_ne!(kept.group, refused);
    let m = b.metrics().peers[&NodeId(1)].clone();
    assert_eq!((m.transfers_received, m.transfers_refused), (1, 1));
    // Once the kept transfer is dropped, its slot is free again.
    drop(kept);
    let mut third = a.send_stream(NodeId(2), GroupId(3)).await.unwrap();
    third.write(Bytes::from_static(b"again")).await.unwrap();
    third.finish(DEADLINE).await.unwrap();
    let t = tokio::time::timeout(DEADLINE, b_in.transfers.recv()).await.unwrap().unwrap();
    assert_eq!(t.group, GroupId(3));
    assert!(b_in.transfers.try_recv().is_err(), "the refused transfer never reaches the node");
    a.shutdown().await;
    b.shutdown().await;
}

/// A transfer longer than the receiver's `transfer_bytes_max` is cut off with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_transfer_is_stopped() {
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.limits.transfer_bytes_max = 100_000;
    let (b, mut b_in) = start(config_b).await;
    let mut config_a = config(&ca, 1);
    config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
    let (a, _a_in) = start(config_a).await;
    let mut transfer = a.send_stream(NodeId(2), GroupId(4)).await.unwrap();
    let writer = tokio::spawn(async move {
        // More than a stream window, so the sender is still writing when the stop arrives.
        for offset in (0..3 << 20).step_by(CHUNK_BYTES) {
            transfer.write(pattern(offset, CHUNK_BYTES)).await?;
        }
        transfer.finish(DEADLINE).await
    });
    let mut incoming = tokio::time::timeout(DEADLINE, b_in.transfers.recv()).await.unwrap().unwrap();
    let error = loop {
        match incoming.read_chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the whole overlong transfer was delivered"),
            Err(error) => break error,
        }
    };
    assert!(matches!(error, TransportError::TooLarge { .. }), "{error:?}");
    assert!(incoming.received_bytes() > 100_000);
    assert!(writer.await.unwrap().is_err(), "the sender learns the transfer was stopped");
    a.shutdown().await;
    b.shutdown().await;
}
