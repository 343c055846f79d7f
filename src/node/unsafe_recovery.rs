//! The node's part of unsafe recovery (`flotilla admin unsafe-recover`): answering with the
//! Raft state of its own replicas, forcing one of them alone, dropping one, all served by the
//! node asked from its own state (the meta group may be the group that lost its quorum), and
//! refusing every message of a node removed for good.

use super::Node;
use crate::meta::META_GROUP;
use crate::placement::NodeId;
use crate::raft::LogId;
use crate::shard::HostError;
use crate::wire::{AdminRequest, AdminResponse, ReplicaState, Response, REPLICA_STATES_PAGE_MAX};
use tracing::warn;

impl Node {
    /// Whether `node` was removed for good by an unsafe recovery, in this node's view of the
    /// meta state: its transport messages, snapshot chunks and requests are dropped. Its old
    /// disk may hold a majority of an old configuration of some group, which it must never
    /// form again with this node's help.
    pub(super) fn removed_for_good(&self, node: NodeId) -> bool {
        self.meta_view().removed.contains(&node)
    }

    /// Answers the unsafe-recovery requests a node serves itself.
    pub(super) async fn unsafe_recovery_local(&self, a: AdminRequest) -> Response {
        let host = &self.inner.host;
        let failed = |e: HostError| match e {
            HostError::UnknownGroup(_) | HostError::Raft(_) => Response::Invalid(e.to_string()),
            e => Response::Unavailable(e.to_string()),
        };
        match a {
            AdminRequest::ReplicaStates { from, limit } => {
                let infos = match host.group_info().await {
                    Ok(i) => i,
                    Err(e) => return failed(e),
                };
                let limit = limit.clamp(1, REPLICA_STATES_PAGE_MAX) as usize;
                let mut page = infos.into_iter().filter(|i| i.group >= from);
                let replicas: Vec<ReplicaState> = page
                    .by_ref()
                    .take(limit)
                    .map(|i| ReplicaState {
                        shard: i.group,
                        node: self.inner.id,
                        voters: i.membership.voters.iter().copied().collect(),
                        outgoing: i.membership.outgoing.as_ref().map(|o| o.iter().copied().collect()),
                        learners: i.membership.learners.iter().copied().collect(),
                        last_term: i.last_term.0,
                        last_index: i.last_index.0,
                        committed: i.committed.0,
                        applied: i.applied.0,
                        leader: i.leader,
                    })
                    .collect();
                let next = page.next().map(|i| i.group);
                Response::Admin(AdminResponse::ReplicaStates { replicas, next })
            }
            AdminRequest::ForceAlone { shard, dead, last_term, last_index } => {
                let last = LogId::new(last_term, last_index);
                match host.force_alone(shard, dead.into_iter().collect(), last).await {
                    Ok(index) => {
                        warn!(
                            node = self.inner.id.0,
                            shard = shard.0,
                            index = index.0,
                            "unsafe recovery: replica forced alone"
                        );
                        Response::Admin(AdminResponse::Forced { shard, index: index.0 })
                    }
                    Err(e) => failed(e),
                }
            }
            AdminRequest::DropReplica { shard } => {
                if shard == META_GROUP {
                    return Response::Invalid("the meta group's replicas are not dropped this way".into());
                }
                match host.destroy_group(shard, true).await {
                    Ok(()) | Err(HostError::UnknownGroup(_)) => {
                        warn!(node = self.inner.id.0, shard = shard.0, "unsafe recovery: replica dropped");
                        Response::Admin(AdminResponse::Done(format!("replica of shard {shard} dropped")))
                    }
                    Err(e) => failed(e),
                }
            }
            other => Response::Invalid(format!("not an unsafe-recovery request served locally: {other:?}")),
        }
    }
}
