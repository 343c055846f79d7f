//! Helpers shared by the integration tests: a CA, node configs on loopback, receiving with a
//! generous deadline (the machine is small and shared; no test asserts on speed).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_transport::cert::{CertificateAuthority, TlsIdentity};
use flotilla_transport::{Envelope, Grant, GroupId, Incoming, NodeId, Role, Transport, TransportConfig};

/// Upper bound for anything a test waits for; reached only when something is broken.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn ca() -> CertificateAuthority {
    CertificateAuthority::generate("flotilla test CA").expect("CA")
}

pub fn node_tls(ca: &CertificateAuthority, node: u64) -> TlsIdentity {
    TlsIdentity::from_issued(ca.cert_pem(), &ca.issue_node(NodeId(node)).expect("issue")).expect("identity")
}

/// A client's identity (an admin), issued by `ca`.
pub fn client_tls(ca: &CertificateAuthority) -> TlsIdentity {
    TlsIdentity::from_issued(ca.cert_pem(), &ca.issue_client("cli", Grant::new(Role::Admin)).expect("issue"))
        .expect("identity")
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A config with short reconnect and handshake timers so restarts are quick.
pub fn config(ca: &CertificateAuthority, node: u64) -> TransportConfig {
    let mut config = TransportConfig::new(NodeId(node), loopback(), node_tls(ca, node));
    config.timing.reconnect_backoff_ms_min = 20;
    config.timing.reconnect_backoff_ms_max = 300;
    config.timing.handshake_timeout_ms = 2_000;
    config
}

pub async fn start(config: TransportConfig) -> (Transport, Incoming) {
    Transport::start(config).await.expect("start transport")
}

/// Starts nodes `ids` (ascending), each told the addresses of the nodes above it.
pub async fn cluster(ca: &CertificateAuthority, ids: &[u64]) -> Vec<(Transport, Incoming)> {
    let mut nodes: Vec<(Transport, Incoming)> = Vec::new();
    for &id in ids.iter().rev() {
        let mut config = config(ca, id);
        for (t, _) in &nodes {
            config.peers.push((t.node(), t.local_addr().expect("addr")));
        }
        nodes.push(start(config).await);
    }
    nodes.reverse();
    nodes
}

pub fn env(group: u64, payload: impl Into<bytes::Bytes>) -> Envelope {
    Envelope::new(GroupId(group), payload)
}

/// Payload carrying a sequence number (and optional padding).
pub fn seq_payload(seq: u64, pad: usize) -> Vec<u8> {
    let mut payload = seq.to_be_bytes().to_vec();
    payload.resize(8 + pad, 0xA5);
    payload
}

pub fn seq_of(envelope: &Envelope) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&envelope.payload[..8]);
    u64::from_be_bytes(bytes)
}

/// Receives exactly `n` envelopes, failing the test after `DEADLINE`.
pub async fn recv_n(incoming: &mut Incoming, n: usize) -> Vec<(NodeId, Envelope)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(DEADLINE, incoming.envelopes.recv()).await {
            Ok(Some(item)) => got.push(item),
            Ok(None) => panic!("incoming channel closed after {} of {n}", got.len()),
            Err(_) => panic!("timed out after receiving {} of {n} envelopes", got.len()),
        }
    }
    got
}

/// Polls `check` until it holds, failing after `DEADLINE`.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bare QUIC connection to node `to` at `addr` presenting `identity`, outside the
/// transport's own client: for tests that write raw bytes. The endpoint must outlive it.
#[allow(dead_code)] // not every test binary writes raw bytes
pub async fn raw_connection(
    identity: &TlsIdentity,
    addr: SocketAddr,
    to: NodeId,
) -> (quinn::Endpoint, quinn::Connection) {
    let config = flotilla_transport::tls::client_config(
        &identity.ca,
        Some((identity.chain.clone(), identity.key.clone_key())),
        flotilla_transport::tls::client_transport(),
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(addr, &flotilla_transport::cert::node_name(to)).unwrap().await.unwrap();
    (endpoint, conn)
}
