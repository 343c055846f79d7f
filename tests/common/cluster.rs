//! The in-process cluster the node-level tests share: a [`DevCluster`] (the one `flotilla dev`
//! runs) in a temporary directory, with the tests' conveniences (nodes by number, clients that
//! wait for the cluster to form, a node that joins).

use flotilla::dev_cluster::DevCluster;
use flotilla::raft::NodeId;
use flotilla::wire::ReadConsistency;
use flotilla::{BootstrapConfig, Client, ClientConfig, Node, NodeConfig};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often the tests' nodes report to the meta leader (ms): faster than the default, so
/// that moves and balancing follow quickly.
pub const TEST_REPORT_INTERVAL_MS: u64 = 300;
/// How long a test client waits for the cluster to form (s).
const FORM_TIMEOUT_S: u64 = 60;

/// Nodes `1..=n` in this process on loopback.
pub struct Cluster {
    /// The nodes, their certificates and data.
    pub dev: DevCluster,
    /// Holds the directory until the cluster is dropped.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes, each in the meta group and every initial shard, with `shards` shards.
    pub async fn start(n: u64, shards: u32) -> Cluster {
        let ids: Vec<u64> = (1..=n).collect();
        Self::start_with(n, &ids, &ids, flotilla::meta::dev_split_keys(shards), |_| {}).await
    }

    /// `n` nodes; the meta group on `meta`, every initial shard on `replicas`, the initial
    /// shards split at `split_keys`; `tweak` changes each node's configuration.
    pub async fn start_with(
        n: u64,
        meta: &[u64],
        replicas: &[u64],
        split_keys: Vec<Vec<u8>>,
        tweak: impl Fn(&mut NodeConfig),
    ) -> Cluster {
        init_log();
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = BootstrapConfig {
            meta_voters: meta.iter().copied().map(NodeId).collect(),
            shard_replicas: replicas.iter().copied().map(NodeId).collect(),
            addrs: Vec::new(),
            split_keys,
        };
        let dev = DevCluster::start(dir.path(), n, bootstrap, |cfg| {
            cfg.report_interval_ms = TEST_REPORT_INTERVAL_MS;
            tweak(cfg);
        })
        .await
        .unwrap();
        Cluster { dev, _dir: dir }
    }

    /// `n` new nodes, each in the meta group and every initial shard, their data directories
    /// restored from the backup in `backup` first (`flotilla dev --restore`'s way).
    pub async fn start_restored(n: u64, backup: &std::path::Path) -> Cluster {
        init_log();
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        // The split keys given here are replaced by the backup's when the nodes start.
        let bootstrap = BootstrapConfig::of_nodes(&ids, Vec::new());
        DevCluster::restore(dir.path(), n, &bootstrap, backup, |_, _| {}).unwrap();
        let dev = DevCluster::start(dir.path(), n, bootstrap, |cfg| cfg.report_interval_ms = TEST_REPORT_INTERVAL_MS)
            .await
            .unwrap();
        Cluster { dev, _dir: dir }
    }

    /// Review probe: `n` new nodes, every one in the meta group and every initial shard, with
    /// no split keys of their own (a server file's default `shards = 1`); only the nodes in
    /// `restored` have their data directories restored from `backup` first.
    pub async fn start_partly_restored(n: u64, backup: &std::path::Path, restored: &[u64]) -> Cluster {
        init_log();
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        let bootstrap = BootstrapConfig::of_nodes(&ids, Vec::new());
        for id in restored {
            flotilla::backup::restore_data_dir(backup, &dir.path().join(format!("node-{id}")), true, |_| {}).unwrap();
        }
        let dev = DevCluster::start(dir.path(), n, bootstrap, |cfg| cfg.report_interval_ms = TEST_REPORT_INTERVAL_MS)
            .await
            .unwrap();
        Cluster { dev, _dir: dir }
    }

    /// Node `id`, which must be running.
    pub fn node(&self, id: u64) -> &Node {
        self.dev.node(NodeId(id)).unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// The running nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.dev.nodes()
    }

    /// The running nodes' ids and addresses.
    pub fn endpoints(&self) -> Vec<(NodeId, SocketAddr)> {
        self.dev.endpoints()
    }

    /// A client configuration naming only the nodes `endpoints` (20 s per operation).
    pub fn config(&self, endpoints: &[u64]) -> ClientConfig {
        let endpoints = endpoints.iter().map(|id| (NodeId(*id), self.node(*id).local_addr().unwrap())).collect();
        let mut cfg = ClientConfig::new(self.dev.client_tls().unwrap(), endpoints);
        cfg.op_timeout = Duration::from_secs(20);
        cfg
    }

    /// A client of every running node, once the cluster has formed.
    pub async fn client(&self) -> Client {
        self.client_with(ReadConsistency::Linearizable).await
    }

    /// A client of every running node reading with `consistency`, once the cluster has formed.
    pub async fn client_with(&self, consistency: ReadConsistency) -> Client {
        let all: Vec<u64> = self.nodes().map(|n| n.id().0).collect();
        let mut cfg = self.config(&all);
        cfg.consistency = consistency;
        // The cluster forms in the background: wait for a map.
        let deadline = Instant::now() + Duration::from_secs(FORM_TIMEOUT_S);
        loop {
            match Client::connect(cfg.clone()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for the cluster: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cluster never formed: {e}"),
            }
        }
    }

    /// Starts the next node with no bootstrap and the running nodes as peers: it announces
    /// itself to them and joins.
    pub async fn join(&mut self) -> &Node {
        let id = self.dev.next_id();
        let tls = self.dev.node_tls(id).unwrap();
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut cfg = NodeConfig::new(id, self.dev.dir().join(format!("node-{id}")), listen, tls);
        cfg.peers = self.endpoints();
        cfg.report_interval_ms = TEST_REPORT_INTERVAL_MS;
        self.dev.add(cfg).await.unwrap()
    }

    /// Stops node `id`.
    pub async fn stop(&mut self, id: u64) {
        self.dev.stop(NodeId(id)).await;
    }

    /// Starts a stopped node again, on its data and at its address.
    pub async fn restart(&mut self, id: u64) {
        self.dev.restart(NodeId(id)).await.unwrap_or_else(|e| panic!("node {id} does not start again: {e}"));
    }

    /// Stops every node.
    pub async fn shutdown(&mut self) {
        self.dev.shutdown().await;
    }
}

/// With `FLOTILLA_TEST_LOG` set (a filter such as `info` or `flotilla_shard=debug`), the test's
/// nodes log to standard error: what a failed run on a loaded machine left to read.
fn init_log() {
    if let Ok(filter) = std::env::var("FLOTILLA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A one-node cluster (two shards) with a Redis front door on loopback, configured by `tweak`;
/// the front door's address.
pub async fn one_node_front_door_with(
    tweak: impl Fn(&mut flotilla::resp_server::RespConfig),
) -> (Cluster, std::net::SocketAddr) {
    let cluster = Cluster::start_with(1, &[1], &[1], flotilla::meta::dev_split_keys(2), move |cfg| {
        let mut resp = flotilla::resp_server::RespConfig::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        tweak(&mut resp);
        cfg.resp = Some(resp);
    })
    .await;
    let _client = cluster.client().await;
    let addr = cluster.node(1).resp_addr().expect("front door");
    (cluster, addr)
}

/// A 3-node cluster of 2 shards (split at "80"), every shard on all three, with a plaintext
/// Redis front door on loopback on each node of `front_doors`.
pub async fn three_nodes_with_front_doors(front_doors: &'static [u64]) -> Cluster {
    Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], flotilla::meta::dev_split_keys(2), move |cfg| {
        if front_doors.contains(&cfg.id.0) {
            let mut resp = flotilla::resp_server::RespConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
            resp.plaintext_loopback = true;
            cfg.resp = Some(resp);
        }
    })
    .await
}

/// Splits the shard holding `at` there, waits until a shard starts at `at` and every shard has
/// a leader, then asks each shard's leader to hand over to another of its voters (a transfer
/// racing a leader change of its own is not retried).
pub async fn split_and_move_leaders(admin: &Client, at: &[u8]) {
    use flotilla::wire::{AdminRequest, AdminResponse};
    let split = admin.admin(AdminRequest::Split { key: at.to_vec() }).await;
    assert!(matches!(split, Ok(AdminResponse::Changed(_))), "split at {:?}: {split:?}", at.escape_ascii().to_string());
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let Ok(AdminResponse::Shards(rows)) = admin.admin(AdminRequest::Shards).await else { panic!("shards") };
        if rows.iter().any(|r| r.descriptor.start == at) && rows.iter().all(|r| r.leader.is_some()) {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the split at {:?} did not get a leader: {rows:?}",
            at.escape_ascii().to_string()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for row in rows {
        let Some(leader) = row.leader else { continue };
        let Some(to) = row.descriptor.voters().find(|n| *n != leader) else { continue };
        let _ = admin.admin(AdminRequest::TransferLeader { shard: row.descriptor.id, node: to }).await;
    }
}
