//! Roles end to end: clients connect over QUIC with certificates the cluster's CA issued with
//! each role (and a key prefix), and every node refuses what the role does not allow.

mod common;

use common::cluster::Cluster;
use flotilla::placement::{NodeId, ShardId};
use flotilla::transport::cert::{read_pem_file, CertificateAuthority, TlsIdentity, Validity};
use flotilla::transport::{Grant, PeerIdentity, Role};
use flotilla::wire::{AdminRequest, AdminResponse};
use flotilla::{Client, ClientConfig, ClientError};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The audit log's lines, as a log pipeline filtering on its target would see them.
#[derive(Clone, Default)]
struct AuditLines(Arc<Mutex<Vec<u8>>>);

impl Write for AuditLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AuditLines {
    fn capture() -> AuditLines {
        let lines = AuditLines::default();
        let writer = lines.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!("{}=info", flotilla::authz::AUDIT_TARGET)))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        lines
    }

    fn has_line_with(&self, parts: &[&str]) -> bool {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().any(|l| parts.iter().all(|p| l.contains(p)))
    }
}

async fn connect(mut cfg: ClientConfig) -> Client {
    cfg.op_timeout = Duration::from_secs(20);
    Client::connect(cfg).await.expect("a client of any role may read the cluster view")
}

async fn client_as(cluster: &Cluster, name: &str, grant: Grant) -> Client {
    connect(cluster.dev.client_config_with(name, grant).unwrap()).await
}

fn denied<T: std::fmt::Debug>(r: Result<T, ClientError>, needle: &str) {
    match r {
        Err(ClientError::Denied(e)) => assert!(e.contains(needle), "expected {needle:?} in {e:?}"),
        other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
    }
}

/// Every admin operation a data role must be refused, with the word the refusal names.
fn admin_ops() -> Vec<(AdminRequest, &'static str)> {
    vec![
        (AdminRequest::Split { key: b"8m".to_vec() }, "split"),
        (AdminRequest::Move { shard: ShardId(1), from: NodeId(1), to: NodeId(2) }, "move"),
        (AdminRequest::Drain { node: NodeId(3), draining: true }, "drain"),
        (AdminRequest::Rebalance, "rebalance"),
        (AdminRequest::TransferLeader { shard: ShardId(1), node: NodeId(2) }, "transfer-leader"),
        (AdminRequest::Shards, "admin shards"),
        (AdminRequest::Status, "admin status"),
        (AdminRequest::Nodes, "admin nodes"),
        (AdminRequest::AddNode { node: NodeId(9), addr: "127.0.0.1:9".into() }, "add-node"),
    ]
}

fn keys(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<&str> {
    pairs.iter().map(|(k, _)| std::str::from_utf8(k).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_role_may_do_what_it_allows_and_nothing_more() {
    let audit = AuditLines::capture();
    // Four shards split at "40", "80" and "c0": the tenant prefix "8" spans the "80" boundary.
    let mut cluster = Cluster::start(3, 4).await;
    let admin = cluster.client().await;
    let all = ["7z", "8/a", "8a", "8z", "9", "9a", "a"];
    for k in all {
        admin.put(k.as_bytes(), format!("v-{k}").as_bytes()).await.unwrap();
    }

    // readonly: gets and scans, nothing else.
    let ro = client_as(&cluster, "viewer", Grant::new(Role::ReadOnly)).await;
    assert_eq!(ro.get(b"8a").await.unwrap(), Some(b"v-8a".to_vec()));
    assert_eq!(keys(&ro.scan(b"", None, 100).await.unwrap()), all);
    denied(ro.put(b"8a", b"x").await, "role readonly may not put");
    denied(ro.delete(b"8a").await, "role readonly may not delete");
    denied(ro.cas(b"8a", Some(b"v-8a"), Some(b"x")).await, "role readonly may not cas");
    for (op, name) in admin_ops() {
        denied(ro.admin(op).await, &format!("role readonly may not {name}"));
    }
    assert_eq!(admin.get(b"8a").await.unwrap(), Some(b"v-8a".to_vec()), "nothing changed");

    // readwrite: data, no administration.
    let rw = client_as(&cluster, "app", Grant::new(Role::ReadWrite)).await;
    rw.put(b"rw", b"1").await.unwrap();
    assert_eq!(rw.get(b"rw").await.unwrap(), Some(b"1".to_vec()));
    rw.cas(b"rw", Some(b"1"), Some(b"2")).await.unwrap();
    rw.delete(b"rw").await.unwrap();
    for (op, name) in admin_ops() {
        denied(rw.admin(op).await, &format!("role readwrite may not {name}"));
    }
    assert_eq!(admin.cached_view().map.len(), 4, "no split happened");

    // A tenant limited to the prefix "8": its keys only, in both shards the prefix spans.
    let tenant = client_as(&cluster, "tenant-8", Grant::with_prefix(Role::ReadWrite, b"8".to_vec())).await;
    assert_eq!(tenant.get(b"8/a").await.unwrap(), Some(b"v-8/a".to_vec()));
    tenant.put(b"8new", b"t").await.unwrap();
    // Just before the prefix, its end itself, and beyond.
    for outside in ["7z", "7\u{7f}", "9", "9a", "a"] {
        let key = outside.as_bytes();
        denied(tenant.get(key).await, "limited to keys starting with \"8\" may not get");
        denied(tenant.put(key, b"x").await, "may not put");
        denied(tenant.delete(key).await, "may not delete");
        denied(tenant.cas(key, None, Some(b"x")).await, "may not cas");
    }
    denied(tenant.admin(AdminRequest::Split { key: b"8m".to_vec() }).await, "role readwrite may not split");
    let tenant_keys = ["8/a", "8a", "8new", "8z"];
    // Scans are clamped to the prefix: the whole key space shows only the tenant's keys.
    assert_eq!(keys(&tenant.scan(b"", None, 100).await.unwrap()), tenant_keys);
    assert_eq!(keys(&tenant.scan(b"7", Some(b"8a"), 100).await.unwrap()), ["8/a"]);
    assert_eq!(keys(&tenant.scan(b"8b", None, 100).await.unwrap()), ["8new", "8z"]);
    assert_eq!(keys(&tenant.scan(b"8", Some(b"9"), 2).await.unwrap()), ["8/a", "8a"]);
    assert!(tenant.scan(b"9", None, 100).await.unwrap().is_empty());
    assert!(tenant.scan(b"0", Some(b"7zz"), 100).await.unwrap().is_empty());
    let reader = client_as(&cluster, "tenant-8-ro", Grant::with_prefix(Role::ReadOnly, b"8".to_vec())).await;
    assert_eq!(keys(&reader.scan(b"", None, 100).await.unwrap()), tenant_keys);
    denied(reader.put(b"8a", b"x").await, "role readonly may not put");
    denied(reader.get(b"9").await, "role readonly limited to keys starting with \"8\" may not get key \"9\"");

    // admin: everything, administration included.
    let AdminResponse::Changed(halves) = admin.admin(AdminRequest::Split { key: b"8m".to_vec() }).await.unwrap() else {
        panic!("a split answers the shards it changed")
    };
    assert_eq!(halves.len(), 2);
    admin.admin(AdminRequest::Drain { node: NodeId(3), draining: true }).await.unwrap();
    admin.admin(AdminRequest::Drain { node: NodeId(3), draining: false }).await.unwrap();
    admin.admin(AdminRequest::Rebalance).await.unwrap();
    assert!(matches!(admin.admin(AdminRequest::Shards).await.unwrap(), AdminResponse::Shards(s) if s.len() == 5));
    admin.admin(AdminRequest::Status).await.unwrap();
    // The tenant's scans stay clamped across the new boundary inside its prefix.
    assert_eq!(keys(&tenant.scan(b"", None, 100).await.unwrap()), tenant_keys);
    // Its view of the map names no split key outside its prefix (others' key names), only
    // "80" and the new "8m"; its reads and writes route through it across the new boundary.
    let seen = tenant.refresh().await.expect("the tenant's view");
    let boundaries: Vec<Vec<u8>> = seen.map.shards().map(|d| d.start.clone()).filter(|s| !s.is_empty()).collect();
    assert_eq!(boundaries, [b"80".to_vec(), b"8m".to_vec()], "{seen:?}");
    assert_eq!(admin.refresh().await.expect("admin's view").map.len(), 5, "others see the whole map");
    tenant.put(b"8zz", b"after").await.unwrap();
    assert_eq!(tenant.get(b"8zz").await.unwrap(), Some(b"after".to_vec()));
    denied(tenant.get(b"9").await, "may not get");

    // Admin requests are audited: who, what, the outcome, refusals included.
    for parts in [
        &[
            "flotilla::audit",
            "who=client viewer (role readonly)",
            "operation=\"split\"",
            "outcome=\"denied: role readonly may not split\"",
        ][..],
        &[
            "who=client app (role readwrite)",
            "operation=\"drain\"",
            "Drain { node: NodeId(3), draining: true }",
            "outcome=\"denied: ",
        ],
        &["who=client dev (role admin)", "operation=\"split\"", "outcome=\"ok\""],
        &["who=client dev (role admin)", "operation=\"rebalance\"", "outcome=\"ok\""],
    ] {
        assert!(audit.has_line_with(parts), "no audit line with {parts:?}");
    }
    assert!(!audit.has_line_with(&["operation=\"put\""]), "data requests are not audited");

    // A certificate issued before roles existed carries none: admin, by the compatibility rule.
    let certs = cluster.dev.certs_dir();
    let ca_pem = read_pem_file(&certs.join("ca.pem")).unwrap();
    let ca = CertificateAuthority::from_pem(&ca_pem, &read_pem_file(&certs.join("ca-key.pem")).unwrap()).unwrap();
    let legacy = ca.issue(&PeerIdentity::Client("legacy".into()), Validity::days_from_now(1)).unwrap();
    let legacy =
        connect(ClientConfig::new(TlsIdentity::from_issued(&ca_pem, &legacy).unwrap(), cluster.endpoints())).await;
    assert!(matches!(legacy.admin(AdminRequest::Shards).await.unwrap(), AdminResponse::Shards(_)));
    legacy.put(b"legacy", b"1").await.unwrap();

    // A role forged with another CA gets no connection at all.
    let other = CertificateAuthority::generate("other CA").unwrap();
    let forged = other.issue_client("forged", Grant::new(Role::Admin)).unwrap();
    let mut cfg = ClientConfig::new(TlsIdentity::from_issued(other.cert_pem(), &forged).unwrap(), cluster.endpoints());
    cfg.request_timeout = Duration::from_secs(3);
    assert!(matches!(Client::connect(cfg).await, Err(ClientError::Unavailable(_))));

    for c in [admin, ro, rw, tenant, reader, legacy] {
        c.close().await;
    }
    cluster.shutdown().await;
}
