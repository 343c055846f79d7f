//! Mutual TLS: each bad-certificate case is refused, and logged with its reason; the good
//! paths work. With mutual TLS a client without an acceptable certificate may still see its
//! `connect()` succeed (TLS 1.3 checks the client certificate after the client's side of the
//! handshake is done), so every case uses the connection before asserting.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use common::*;
use flotilla_transport::cert::{ca_from_pem, self_signed, CertificateAuthority, IssuedCert, TlsIdentity, Validity};
use flotilla_transport::{tls, Client, Grant, NodeId, PeerIdentity, Role, Transport};

/// Log lines of the whole test binary, to check that refusals are logged with a reason.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per test binary");
        buffer
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn client_with(ca_pem: &str, auth: Option<&IssuedCert>) -> Client {
    let ca = ca_from_pem(ca_pem).unwrap();
    let auth = auth.map(|issued| {
        let id = TlsIdentity::from_pem(ca_pem, &issued.cert_pem, &issued.key_pem).unwrap();
        (id.chain, id.key)
    });
    Client::with_config(tls::client_config(&ca, auth, tls::client_transport()).unwrap(), loopback()).unwrap()
}

/// Connects and sends one request; `Ok` only if the node answered.
async fn try_request(client: &Client, server: &Transport) -> Result<(), String> {
    let conn = client
        .connect(server.local_addr().unwrap(), server.node(), Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    conn.request("echo:x".into(), Duration::from_secs(10)).await.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused_with_a_logged_reason() {
    let _ = logs();
    let ca = ca();
    let (server, incoming) = start(config(&ca, 2)).await;
    tokio::spawn(async move {
        let mut requests = incoming.requests;
        while let Some(r) = requests.recv().await {
            r.responder.respond("ok");
        }
    });

    // The good path first: a client certificate from the cluster CA.
    let good = client_with(ca.cert_pem(), Some(&ca.issue_client("ops", Grant::new(Role::Admin)).unwrap()));
    try_request(&good, &server).await.expect("a valid client certificate is accepted");
    assert_eq!(server.metrics().handshakes_refused, 0);

    let other_ca = CertificateAuthority::generate("another cluster").unwrap();
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired = ca
        .issue(&PeerIdentity::Client("old".into()), Validity { not_before: now - 10 * day, not_after: now - day })
        .unwrap();
    let cases: Vec<(&str, Option<IssuedCert>, &str)> = vec![
        ("no client certificate", None, "no certificate"),
        ("self-signed", Some(self_signed(&PeerIdentity::Node(NodeId(1))).unwrap()), "UnknownIssuer"),
        ("other CA", Some(other_ca.issue_node(NodeId(1)).unwrap()), "UnknownIssuer"),
        ("expired", Some(expired), "expired"),
    ];
    for (i, (case, auth, reason)) in cases.into_iter().enumerate() {
        let client = client_with(ca.cert_pem(), auth.as_ref());
        // Other tests log too: this client's line is the next one with its address (a port
        // an earlier client of another test used may come round again).
        let remote = format!("remote={}", client.local_addr().unwrap());
        let seen = log_text().matches(&remote).count();
        let result = try_request(&client, &server).await;
        assert!(result.is_err(), "{case}: a request got through");
        eventually(case, || server.metrics().handshakes_refused == i as u64 + 1).await;
        eventually("the refusal is logged", || log_text().matches(&remote).count() > seen).await;
        let logs = log_text();
        let line = logs.lines().rev().find(|l| l.contains(&remote)).unwrap_or_default();
        eprintln!("{case}: {line}");
        assert!(line.contains("refused connection"), "{case}: {line}");
        assert!(line.to_lowercase().contains(&reason.to_lowercase()), "{case}: reason not logged: {line}");
        client.close().await;
    }
    // The server is unaffected.
    try_request(&good, &server).await.expect("still serving after the refusals");
    server.shutdown().await;
}

/// The dialing node refuses a server whose certificate is not from the cluster CA, and a
/// node certificate naming another node than the one dialed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_connect_to_an_impostor() {
    let _ = logs();
    let ca = ca();
    let other_ca = CertificateAuthority::generate("another cluster").unwrap();
    // An impostor claiming to be node 2, with a certificate from another CA that trusts ours.
    let impostor_cert = other_ca.issue_node(NodeId(2)).unwrap();
    let mut impostor_config = config(&ca, 2);
    impostor_config.tls =
        TlsIdentity::from_pem(ca.cert_pem(), &impostor_cert.cert_pem, &impostor_cert.key_pem).unwrap();
    let (impostor, _impostor_in) = start(impostor_config).await;
    // Node 3, genuine, listening where node 1 expects node 2: wrong name for the dial.
    let (node3, _node3_in) = start(config(&ca, 3)).await;

    let mut config_a = config(&ca, 1);
    config_a.peers.push((NodeId(2), impostor.local_addr().unwrap()));
    let (a, _a_in) = start(config_a).await;
    a.send(NodeId(2), env(1, vec![1])).unwrap();
    eventually("dial to the impostor fails", || a.metrics().dials_failed >= 1).await;
    assert_eq!(a.metrics().peers[&NodeId(2)].connections, 0);

    a.set_peer_addr(NodeId(2), node3.local_addr().unwrap()).unwrap();
    eventually("dial to the wrong node fails", || a.metrics().dials_failed >= 2).await;
    assert_eq!(a.metrics().peers[&NodeId(2)].connections, 0);
    assert_eq!(node3.metrics().peers.get(&NodeId(1)).map(|m| m.envelopes_received).unwrap_or(0), 0);
    a.shutdown().await;
    impostor.shutdown().await;
    node3.shutdown().await;
}

/// A node whose certificate names another node does not start; a client certificate cannot
/// start a node either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_only_starts_with_its_own_certificate() {
    let ca = ca();
    let mut wrong = config(&ca, 1);
    wrong.tls = node_tls(&ca, 4);
    assert!(Transport::start(wrong).await.is_err());
    let mut client_cert = config(&ca, 1);
    client_cert.tls =
        TlsIdentity::from_issued(ca.cert_pem(), &ca.issue_client("x", Grant::new(Role::Admin)).unwrap()).unwrap();
    assert!(Transport::start(client_cert).await.is_err());
}

/// A node with a higher id that connects to a lower one (which dials it, once it knows its
/// address) gets a request-only connection: its requests arrive under its node identity (how a
/// new node asks to join), and a Raft stream on it closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_node_connecting_may_only_send_requests() {
    let _ = logs();
    let ca = ca();
    let (low, low_in) = start(config(&ca, 1)).await;
    tokio::spawn(async move {
        let mut requests = low_in.requests;
        while let Some(r) = requests.recv().await {
            let from = r.from.to_string();
            r.responder.respond(from);
        }
    });
    let client = Client::for_node(&node_tls(&ca, 9), loopback()).unwrap();
    let client_cert =
        TlsIdentity::from_issued(ca.cert_pem(), &ca.issue_client("x", Grant::new(Role::Admin)).unwrap()).unwrap();
    assert!(Client::for_node(&client_cert, loopback()).is_err(), "a node endpoint needs a node certificate");
    let conn = client.connect(low.local_addr().unwrap(), low.node(), Duration::from_secs(10)).await.unwrap();
    let answer = conn.request("join".into(), Duration::from_secs(10)).await.expect("a request is served");
    assert_eq!(answer.as_ref(), b"n9", "the request carries the node's identity");
    let mut raft = conn.connection().open_uni().await.unwrap();
    raft.write_all(&[0u8; 16]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), conn.connection().closed()).await.expect("closed");
    assert!(log_text().contains("request-only connection"), "{}", log_text());
    assert!(low.metrics().peers.get(&NodeId(9)).is_none_or(|p| !p.connected), "not installed as the pair's connection");
    assert_eq!(low.metrics().handshakes_refused, 0);
    client.close().await;
    low.shutdown().await;
}

/// With `require_client_roles`, a client certificate issued without a role (admin under the
/// compatibility rule) is refused at the handshake; one with a role is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_requiring_roles_refuses_a_client_certificate_without_one() {
    let ca = ca();
    let mut cfg = config(&ca, 2);
    cfg.require_client_roles = true;
    let (server, incoming) = start(cfg).await;
    tokio::spawn(async move {
        let mut requests = incoming.requests;
        while let Some(r) = requests.recv().await {
            r.responder.respond("ok");
        }
    });
    let legacy = ca.issue(&PeerIdentity::Client("legacy".into()), Validity::days_from_now(1)).unwrap();
    let client = client_with(ca.cert_pem(), Some(&legacy));
    assert!(try_request(&client, &server).await.is_err(), "a role-less certificate got through");
    eventually("the refusal is counted", || server.metrics().handshakes_refused == 1).await;
    let reader = ca.issue_client("reader", Grant::new(Role::ReadOnly)).unwrap();
    try_request(&client_with(ca.cert_pem(), Some(&reader)), &server)
        .await
        .expect("a certificate with a role is served");
    server.shutdown().await;
}

/// A node moves to a new CA without a restart: it first trusts both CAs, then presents a
/// certificate of the new one. Each step holds for connections made after it; a certificate
/// naming another node is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moves_to_a_new_ca_without_restarting() {
    let _ = logs();
    let (old, new) = (ca(), CertificateAuthority::generate("the next cluster CA").unwrap());
    let (server, incoming) = start(config(&old, 2)).await;
    tokio::spawn(async move {
        let mut requests = incoming.requests;
        while let Some(r) = requests.recv().await {
            r.responder.respond("ok");
        }
    });
    let admin = Grant::new(Role::Admin);
    let of_old = old.issue_client("old", admin.clone()).unwrap();
    let of_new = new.issue_client("new", admin.clone()).unwrap();
    // Trusting the old CA with the old CA's certificate; trusting the new one with the new one's;
    // trusting the old CA with a certificate of the new one.
    let old_client = client_with(old.cert_pem(), Some(&of_old));
    let new_client = client_with(new.cert_pem(), Some(&of_new));
    let mixed_client = client_with(old.cert_pem(), Some(&of_new));
    try_request(&old_client, &server).await.expect("the old CA's client");
    assert!(try_request(&new_client, &server).await.is_err(), "the node knows nothing of the new CA yet");
    assert!(try_request(&mixed_client, &server).await.is_err(), "a certificate of the new CA is not trusted yet");

    // Step 1: trust both CAs, same certificate.
    let both = format!("{}{}", old.cert_pem(), new.cert_pem());
    let node_old = old.issue_node(NodeId(2)).unwrap();
    server.reload_tls(TlsIdentity::from_pem(&both, &node_old.cert_pem, &node_old.key_pem).unwrap()).unwrap();
    try_request(&mixed_client, &server).await.expect("clients of the new CA are trusted now");
    try_request(&old_client, &server).await.expect("and those of the old one still are");
    assert!(try_request(&new_client, &server).await.is_err(), "the node still presents the old CA's certificate");

    // A certificate of another node is refused; the node goes on as it was.
    let impostor = new.issue_node(NodeId(3)).unwrap();
    let refused = server.reload_tls(TlsIdentity::from_pem(&both, &impostor.cert_pem, &impostor.key_pem).unwrap());
    assert!(refused.unwrap_err().to_string().contains("n2"), "the error names the node");
    assert!(try_request(&new_client, &server).await.is_err());

    // Step 2: present the new CA's certificate.
    let node_new = new.issue_node(NodeId(2)).unwrap();
    server.reload_tls(TlsIdentity::from_pem(&both, &node_new.cert_pem, &node_new.key_pem).unwrap()).unwrap();
    try_request(&new_client, &server).await.expect("a client trusting only the new CA");
    assert!(
        try_request(&old_client, &server).await.is_err(),
        "a client trusting only the old CA cannot verify the node"
    );
}
