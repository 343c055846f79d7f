//! A network partition (a UDP relay that drops everything) and its heal: the idle timeout
//! notices the dead connection, the lower node redials with backoff, and traffic resumes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_transport::NodeId;
use tokio::net::UdpSocket;

/// Relays datagrams between one client and `server`; drops them all while `cut` is set.
async fn relay(server: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind(loopback()).await.unwrap());
    let back = Arc::new(UdpSocket::bind(loopback()).await.unwrap());
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let (f, b, c, x) = (front.clone(), back.clone(), client.clone(), cut.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().unwrap() = Some(from);
            if !x.load(Ordering::SeqCst) {
                let _ = b.send(&buf[..n]).await;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().unwrap();
            if let (Some(to), false) = (to, cut.load(Ordering::SeqCst)) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_recovers_after_a_partition_heals() {
    let ca = ca();
    let fast = |mut config: flotilla_transport::TransportConfig| {
        config.timing.keep_alive_ms = 200;
        config.timing.idle_timeout_ms = 1_000;
        config.timing.handshake_timeout_ms = 1_000;
        config
    };
    let (b, mut b_in) = start(fast(config(&ca, 2))).await;
    let cut = Arc::new(AtomicBool::new(false));
    let relay_addr = relay(b.local_addr().unwrap(), cut.clone()).await;
    let mut config_a = fast(config(&ca, 1));
    config_a.peers.push((NodeId(2), relay_addr));
    let (a, _a_in) = start(config_a).await;
    a.send(NodeId(2), env(1, seq_payload(0, 0))).unwrap();
    recv_n(&mut b_in, 1).await;

    cut.store(true, Ordering::SeqCst);
    eventually("the idle timeout closes the cut connection", || !a.metrics().peers[&NodeId(2)].connected).await;
    cut.store(false, Ordering::SeqCst);

    // Keep sending until something gets through the healed network.
    let start = tokio::time::Instant::now();
    let mut seq = 1;
    loop {
        assert!(start.elapsed() < DEADLINE, "no traffic after the heal");
        a.send(NodeId(2), env(1, seq_payload(seq, 0))).unwrap();
        seq += 1;
        if let Ok(Some((from, _))) = tokio::time::timeout(Duration::from_millis(50), b_in.envelopes.recv()).await {
            assert_eq!(from, NodeId(1));
            break;
        }
    }
    let m = a.metrics().peers[&NodeId(2)].clone();
    assert!(m.reconnects >= 1 && m.connected, "{m:?}");
    a.shutdown().await;
    b.shutdown().await;
}
