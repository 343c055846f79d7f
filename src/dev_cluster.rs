//! [`DevCluster`]: a whole cluster in one process on loopback, with fresh certificates in a
//! directory. `flotilla dev` runs one; the integration tests run theirs on it too, so the
//! start-up they test is the one users get.
//!
//! Layout of the directory: `certs/` (the CA, `node-<id>` certificates and the `dev` client
//! certificate, as [`crate::cluster`] writes them) and `node-<id>/` (each node's data).
//! Every node is told every other node's address (the transport dials the higher ids; a node
//! without a meta replica asks any of them for meta operations).

use crate::client::{Client, ClientConfig, ClientError};
use crate::cluster::{self, ClusterFile, ClusterNode};
use crate::node::{BootstrapConfig, Node, NodeConfig, NodeError};
use crate::raft::NodeId;
use crate::transport::cert::TlsIdentity;
use crate::transport::{Grant, Role};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The client certificate a dev cluster issues (`certs/client-dev.pem`).
pub const DEV_CLIENT_NAME: &str = "dev";
/// The key a readiness check writes and deletes again.
const READY_KEY: &[u8] = b"flotilla-dev-ready";
/// How long a readiness check waits between attempts (ms).
const READY_RETRY_MS: u64 = 200;
/// How long [`DevCluster::restart`] retries while the stopped node's store and socket close.
const RESTART_WITHIN_MS: u64 = 10_000;

/// Errors of a dev cluster's start-up.
#[derive(Debug, thiserror::Error)]
pub enum DevClusterError {
    /// Certificates could not be made or read.
    #[error("{0}")]
    Certs(String),
    /// A node did not start.
    #[error("starting node {id}: {source}")]
    Node {
        /// The node.
        id: NodeId,
        /// Why.
        source: NodeError,
    },
    /// The cluster did not serve a write in time.
    #[error("the dev cluster did not become ready: {0}")]
    NotReady(ClientError),
    /// A node's data directory could not be restored from the backup.
    #[error("restoring node {id}: {source}")]
    Restore {
        /// The node.
        id: NodeId,
        /// Why.
        source: crate::backup::BackupError,
    },
}

/// Nodes `1..=n` started in this process. Node `id` is `nodes[id - 1]` (`None` while stopped).
pub struct DevCluster {
    /// Where the certificates and the nodes' data live.
    dir: PathBuf,
    /// The running nodes, by id.
    nodes: Vec<Option<Node>>,
    /// Each node's configuration, its listen address fixed to the one it bound (for restarts).
    configs: Vec<NodeConfig>,
    /// The `dev` client certificate and key.
    client_cert: (PathBuf, PathBuf),
}

impl DevCluster {
    /// Makes a CA and certificates for nodes `1..=nodes` and the `dev` client in `dir/certs`,
    /// then starts the nodes on loopback with `bootstrap`, each configuration changed by `tweak`
    /// first, and tells every node where the others listen. Returns once the nodes run; the
    /// cluster forms in the background ([`DevCluster::wait_ready`]).
    pub async fn start(
        dir: &Path,
        nodes: u64,
        bootstrap: BootstrapConfig,
        tweak: impl Fn(&mut NodeConfig),
    ) -> Result<DevCluster, DevClusterError> {
        assert!(nodes >= 1, "a cluster needs a node");
        let certs = dir.join("certs");
        cluster::create_ca(&certs).map_err(DevClusterError::Certs)?;
        let ids: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
        for id in &ids {
            cluster::issue_node(&certs, *id).map_err(DevClusterError::Certs)?;
        }
        let client_cert =
            cluster::issue_client(&certs, DEV_CLIENT_NAME, Grant::new(Role::Admin)).map_err(DevClusterError::Certs)?;
        let mut out = DevCluster { dir: dir.to_path_buf(), nodes: Vec::new(), configs: Vec::new(), client_cert };
        for id in ids {
            let mut cfg = NodeConfig::new(id, dir.join(format!("node-{id}")), loopback(), out.node_tls(id)?);
            cfg.bootstrap = Some(bootstrap.clone());
            tweak(&mut cfg);
            if let Err(e) = out.add(cfg).await {
                out.shutdown().await;
                return Err(e);
            }
        }
        out.introduce_all()?;
        debug_assert_eq!(out.nodes.len() as u64, nodes);
        Ok(out)
    }

    /// Builds the data directories of nodes `1..=nodes` in `dir` from the backup in `from`,
    /// before [`DevCluster::start`] starts them with `bootstrap` (whose split keys the nodes
    /// replace by the backup's): the replicas of the initial shards get the data. Blocking.
    /// Returns what the restore of the first node holding data loaded.
    pub fn restore(
        dir: &Path,
        nodes: u64,
        bootstrap: &BootstrapConfig,
        from: &Path,
        mut progress: impl FnMut(NodeId, crate::backup::Progress),
    ) -> Result<Option<crate::backup::RestoreSummary>, DevClusterError> {
        let mut first = None;
        for id in (1..=nodes).map(NodeId) {
            let holds_data = bootstrap.shard_replicas.contains(&id);
            let data_dir = dir.join(format!("node-{id}"));
            let summary = crate::backup::restore_data_dir(from, &data_dir, holds_data, |p| progress(id, p))
                .map_err(|source| DevClusterError::Restore { id, source })?;
            if holds_data && first.is_none() {
                first = Some(summary);
            }
        }
        Ok(first)
    }

    /// Starts one more node from `config` (its id must be the next one, `len + 1`), on its
    /// bound address from then on; the caller tells it and the others about each other.
    pub async fn add(&mut self, mut config: NodeConfig) -> Result<&Node, DevClusterError> {
        let id = config.id;
        assert_eq!(id, self.next_id(), "nodes are added in id order");
        let node = Node::start(config.clone()).await.map_err(|source| DevClusterError::Node { id, source })?;
        config.listen_addr = node.local_addr().map_err(|source| DevClusterError::Node { id, source })?;
        self.configs.push(config);
        self.nodes.push(Some(node));
        Ok(self.nodes.last().and_then(Option::as_ref).expect("just pushed"))
    }

    /// The TLS identity of node `id`, its certificate issued from the cluster's CA if it has
    /// none yet (a node joining later).
    pub fn node_tls(&self, id: NodeId) -> Result<TlsIdentity, DevClusterError> {
        let certs = self.certs_dir();
        if !cluster::node_cert_paths(&certs, id).0.exists() {
            cluster::issue_node(&certs, id).map_err(DevClusterError::Certs)?;
        }
        cluster::node_tls(&certs, id).map_err(DevClusterError::Certs)
    }

    /// Tells every running node where every other one listens.
    fn introduce_all(&self) -> Result<(), DevClusterError> {
        for a in self.nodes() {
            for b in self.nodes().filter(|b| b.id() != a.id()) {
                let addr = b.local_addr().map_err(|source| DevClusterError::Node { id: b.id(), source })?;
                a.set_peer_addr(b.id(), addr).map_err(|source| DevClusterError::Node { id: a.id(), source })?;
            }
        }
        Ok(())
    }

    /// The directory holding the certificates and the nodes' data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificate directory (`dir/certs`).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// The id the next node [`DevCluster::add`]ed must have.
    pub fn next_id(&self) -> NodeId {
        NodeId(self.nodes.len() as u64 + 1)
    }

    /// Node `id` if it runs.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get((id.0 as usize).checked_sub(1)?)?.as_ref()
    }

    /// The running nodes, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten()
    }

    /// The running nodes' ids and addresses.
    pub fn endpoints(&self) -> Vec<(NodeId, SocketAddr)> {
        self.nodes().filter_map(|n| n.local_addr().ok().map(|a| (n.id(), a))).collect()
    }

    /// The `dev` client's TLS identity.
    pub fn client_tls(&self) -> Result<TlsIdentity, DevClusterError> {
        let (cert, key) = &self.client_cert;
        TlsIdentity::load(&self.certs_dir().join("ca.pem"), cert, key)
            .map_err(|e| DevClusterError::Certs(e.to_string()))
    }

    /// A client configuration for the running nodes, as the `dev` client.
    pub fn client_config(&self) -> Result<ClientConfig, DevClusterError> {
        Ok(ClientConfig::new(self.client_tls()?, self.endpoints()))
    }

    /// A client configuration for the running nodes as a new client `name` whose certificate
    /// (issued now by the cluster's CA) carries `grant`.
    pub fn client_config_with(&self, name: &str, grant: Grant) -> Result<ClientConfig, DevClusterError> {
        let (cert, key) = cluster::issue_client(&self.certs_dir(), name, grant).map_err(DevClusterError::Certs)?;
        let tls = TlsIdentity::load(&self.certs_dir().join("ca.pem"), &cert, &key)
            .map_err(|e| DevClusterError::Certs(e.to_string()))?;
        Ok(ClientConfig::new(tls, self.endpoints()))
    }

    /// The cluster file for the running nodes; `metrics[i]` is the metrics address of the i-th.
    pub fn cluster_file(&self, metrics: &[SocketAddr]) -> ClusterFile {
        let nodes = self
            .nodes()
            .enumerate()
            .map(|(i, n)| ClusterNode {
                id: n.id(),
                addr: n.addr().to_string(),
                metrics: metrics.get(i).map(|m| m.to_string()),
            })
            .collect();
        ClusterFile {
            version: cluster::CLUSTER_FILE_VERSION,
            nodes,
            ca: self.certs_dir().join("ca.pem"),
            cert: self.client_cert.0.clone(),
            key: self.client_cert.1.clone(),
            data_dir: Some(self.dir.clone()),
            pid: Some(std::process::id()),
        }
    }

    /// Waits until a client gets a map and a write goes through (a key written and deleted),
    /// for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), DevClusterError> {
        let cfg = self.client_config()?;
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = async {
                let c = Client::connect(cfg.clone()).await?;
                let mut r = c.put(READY_KEY, b"1").await.map(|_| ());
                if r.is_ok() {
                    r = c.delete(READY_KEY).await.map(|_| ());
                }
                c.close().await;
                r
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(DevClusterError::NotReady(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(READY_RETRY_MS)).await,
            }
        }
    }

    /// Stops node `id` (no-op if it is stopped).
    pub async fn stop(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.get_mut((id.0 as usize).saturating_sub(1)).and_then(Option::take) {
            n.shutdown().await;
        }
    }

    /// Starts a stopped node again, on its data and at its address, and tells it where the
    /// others listen.
    pub async fn restart(&mut self, id: NodeId) -> Result<(), DevClusterError> {
        let config = self.configs[(id.0 - 1) as usize].clone();
        // The stopped node's socket and store close once its last handle is gone, which the
        // runtime finishes shortly after `shutdown` returns.
        let deadline = Instant::now() + Duration::from_millis(RESTART_WITHIN_MS);
        let node = loop {
            match Node::start(config.clone()).await {
                Ok(node) => break node,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(node = id.0, error = %e, "restart: not yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => return Err(DevClusterError::Node { id, source }),
            }
        };
        // Both ways: the node may listen on a new port (the cluster binds port 0), and of two
        // nodes the lower id dials, so a running node with a lower id must learn the new
        // address too. With every node restarted one after another, the first would otherwise
        // know no peer, and nobody would dial it until a meta leader (which needs connections)
        // recorded the new addresses.
        let new_addr = node.local_addr().map_err(|source| DevClusterError::Node { id, source })?;
        for other in self.nodes() {
            let addr = other.local_addr().map_err(|source| DevClusterError::Node { id: other.id(), source })?;
            node.set_peer_addr(other.id(), addr).map_err(|source| DevClusterError::Node { id, source })?;
            other.set_peer_addr(id, new_addr).map_err(|source| DevClusterError::Node { id: other.id(), source })?;
        }
        self.nodes[(id.0 - 1) as usize] = Some(node);
        Ok(())
    }

    /// Stops every node.
    pub async fn shutdown(&mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(n) = n.take() {
                n.shutdown().await;
            }
        }
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
