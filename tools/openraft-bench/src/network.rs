//! An in-process network: a message to a node is a direct call on its `Raft` handle, as in
//! openraft's minimal benchmark (no serialization, no copy).

use crate::TypeConfig;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft, RaftNetwork, RaftNetworkFactory};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type NodeId = u64;

/// Every node of the cluster by id. Clones share the table.
#[derive(Clone, Default)]
pub struct Router {
    nodes: Arc<Mutex<BTreeMap<NodeId, Raft<TypeConfig>>>>,
}

impl Router {
    /// Makes `raft` reachable as `id`.
    pub fn register(&self, id: NodeId, raft: Raft<TypeConfig>) {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).insert(id, raft);
    }

    fn get(&self, id: NodeId) -> Result<Raft<TypeConfig>, Unreachable> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get(&id).cloned().ok_or_else(|| {
            Unreachable::new(&std::io::Error::new(std::io::ErrorKind::NotFound, format!("no node {id}")))
        })
    }
}

/// One node's connection to `target`.
pub struct Connection {
    target: NodeId,
    router: Router,
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection { target, router: self.clone() }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.router.get(self.target)?;
        raft.append_entries(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let raft = self.router.get(self.target)?;
        raft.install_snapshot(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, _option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.router.get(self.target)?;
        raft.vote(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}
