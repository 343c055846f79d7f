//! Bootstrap and join. A new cluster: each initial meta voter creates group 0 with the same
//! membership ([`Node::init_meta`]), and the lowest id registers the initial nodes and creates
//! the first shards in one meta change ([`Node::run_bootstrap`]). A joining node: started with
//! no bootstrap and some lower-id peers' addresses, it announces itself to them
//! ([`Node::announce`]) until the meta state lists it at its address.

use super::{BootstrapConfig, Node, NodeError, ANNOUNCE_RETRY_MS, BOOTSTRAP_RETRY_MS, PEER_REQUEST_TIMEOUT_MS};
use crate::meta::{self, meta_range, META_GROUP};
use crate::peer_wire::{MetaOp, PeerRequest, PeerResponse};
use crate::raft::{Membership, NodeId};
use crate::transport as tp;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

impl Node {
    /// Creates the meta group on a new cluster's meta voters.
    pub(super) async fn init_meta(&self) -> Result<(), NodeError> {
        let Some(b) = self.inner.config.bootstrap.clone() else { return Ok(()) };
        if !b.meta_voters.contains(&self.inner.id) || self.inner.host.hosts(META_GROUP) {
            return Ok(());
        }
        if self.meta_replica_retired() {
            info!(
                node = self.inner.id.0,
                "meta replica retired by an unsafe recovery: the meta group is not formed again"
            );
            return Ok(());
        }
        let members = Membership::new(b.meta_voters.iter().copied());
        self.inner.host.create_group(META_GROUP, meta_range(), Some(members)).await?;
        info!(node = self.inner.id.0, "meta group created");
        Ok(())
    }

    /// The bootstrapper (on the lowest-id meta voter of a new cluster): registers the initial
    /// nodes, creates the first shard and splits it at the configured keys, in one meta change,
    /// retrying until the meta group has a leader.
    pub(super) async fn run_bootstrap(self, b: BootstrapConfig) {
        // Every initial node is registered; an address not given yet stays empty
        // until the node's first report fills it in.
        let mut ids: Vec<NodeId> = b.meta_voters.iter().chain(b.shard_replicas.iter()).copied().collect();
        ids.sort();
        ids.dedup();
        let addr_of = |n: NodeId| b.addrs.iter().find(|(m, _)| *m == n).map(|(_, a)| a.clone()).unwrap_or_default();
        let op = MetaOp::Bootstrap {
            nodes: ids.iter().map(|n| (*n, addr_of(*n))).collect(),
            replicas: b.shard_replicas.clone(),
            split_keys: b.split_keys.clone(),
            backup_id: self.inner.restored.as_ref().map(|r| r.backup_id.clone()),
        };
        loop {
            match self.meta_exec(op.clone(), false).await {
                Ok(_) => {
                    info!(node = self.inner.id.0, "cluster bootstrapped");
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "bootstrap not done yet; retrying");
                    tokio::time::sleep(Duration::from_millis(BOOTSTRAP_RETRY_MS)).await;
                }
            }
        }
    }

    /// The announcer (on a node with lower-id peers): [`Node::announce`] every
    /// [`ANNOUNCE_RETRY_MS`] until the meta state lists this node at its address.
    pub(super) async fn run_announcer(self, mut stop: watch::Receiver<bool>) {
        while !self.announce().await {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ANNOUNCE_RETRY_MS)) => {}
                _ = stop.changed() => break,
            }
        }
    }

    /// Makes sure the meta state lists this node at its address, telling a lower-id peer if it
    /// does not; `true` once it does. Lower ids dial only the nodes the meta state lists, so a
    /// new node, or one back at another address, cannot reach them over the transport until
    /// then: its report goes over a request-only connection under its node certificate
    /// ([`tp::Client::for_node`]), and registers it (or updates its address). This is how a node
    /// joins a running cluster: started with no bootstrap and some peers' addresses.
    pub(super) async fn announce(&self) -> bool {
        let me = self.inner.id;
        if self.meta_view().nodes.get(&me).is_some_and(|i| i.addr == self.inner.addr) {
            return true;
        }
        let bind = match self.inner.config.listen_addr {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let client = match tp::Client::for_node(&self.inner.config.tls, bind) {
            Ok(c) => c,
            Err(e) => {
                warn!(node = self.inner.id.0, error = %e, "cannot announce this node to its peers");
                return false;
            }
        };
        // A made-up empty report would tell the meta leader this node holds no replica (and
        // so that its tombstones are done with): announce with a real one or not at all.
        let report = match self.build_report(0).await {
            Ok(r) => r,
            Err(e) => {
                warn!(node = self.inner.id.0, error = %e, "cannot build this node's report to announce it");
                return false;
            }
        };
        let op = MetaOp::report(me, self.inner.addr.clone(), report);
        let body = PeerRequest::Meta { op, forwarded: false }.encode();
        let mut done = false;
        for (peer, addr) in self.inner.config.peers.iter().filter(|(p, _)| *p < self.inner.id) {
            let state = match self.announce_to(&client, *peer, *addr, body.clone()).await {
                Ok(state) => state,
                Err(e) => {
                    debug!(node = self.inner.id.0, via = peer.0, error = %e, "announce not taken");
                    continue;
                }
            };
            match meta::decode_view(&state) {
                Ok((revision, state)) => {
                    done = state.nodes.get(&me).is_some_and(|i| i.addr == self.inner.addr);
                    self.set_view(revision, std::sync::Arc::new(state));
                    if done {
                        info!(node = self.inner.id.0, via = peer.0, addr = %self.inner.addr, "registered with the cluster");
                        break;
                    }
                }
                Err(e) => debug!(node = self.inner.id.0, via = peer.0, error = %e, "announce: bad meta state"),
            }
        }
        client.close().await;
        done
    }

    /// Sends the announcement `body` to `peer` at `addr`; the meta state it answers, whole
    /// (a large one comes in parts, fetched on the same connection).
    async fn announce_to(
        &self,
        client: &tp::Client,
        peer: NodeId,
        addr: SocketAddr,
        body: bytes::Bytes,
    ) -> Result<Vec<u8>, String> {
        let timeout = Duration::from_millis(PEER_REQUEST_TIMEOUT_MS);
        let conn = client.connect(addr, peer, timeout).await.map_err(|e| e.to_string())?;
        let answer = conn.request(body, timeout).await.map_err(|e| e.to_string())?;
        match PeerResponse::decode(&answer).map_err(|e| e.to_string())? {
            PeerResponse::Meta { state, .. } => {
                let conn = &conn;
                super::whole_state::assemble(state, |req| async move {
                    conn.request(req, timeout).await.map_err(|e| e.to_string())
                })
                .await
            }
            other => Err(format!("answered {other:?}")),
        }
    }
}
