//! Admin requests (`flotilla admin`): listings of nodes and shards and the cluster summary,
//! read from the meta leader's state and reports; splits, moves, leader transfers, drains,
//! balancer rounds and node registrations, each one meta operation.

use super::meta_client::MetaAnswer;
use super::shard_listing::{shard_rows, shards_page, summarize};
use super::{now_ms, Node, NodeError};
use crate::meta::META_GROUP;
use crate::peer_wire::MetaOp;
use crate::placement::{MetaCommand, MetaState, MovePlan, NodeId};
use crate::wire::{check_user_key, AdminRequest, AdminResponse, ClusterView, NodeRow, Response, StatusReport};
use std::net::SocketAddr;

impl Node {
    pub(super) async fn admin(&self, a: AdminRequest) -> Response {
        let read = |s: Result<(u64, std::sync::Arc<MetaState>, AdminResponse), NodeError>| s.map(|(_, s, _)| s);
        let answer = |r: Result<(u64, std::sync::Arc<MetaState>, AdminResponse), NodeError>| match r {
            Ok((_, _, a)) => Response::Admin(a),
            Err(NodeError::Meta(e)) => Response::Invalid(e),
            Err(e) => Response::Unavailable(e.to_string()),
        };
        match a {
            AdminRequest::Nodes | AdminRequest::Shards | AdminRequest::ShardsPage { .. } | AdminRequest::Status => {
                let (revision, state) = match self.meta_exec_as(MetaOp::Read, false, MetaAnswer::WithReports).await {
                    Ok((revision, state, _)) => (revision, state),
                    Err(e) => return Response::Unavailable(e.to_string()),
                };
                match a {
                    AdminRequest::Nodes => Response::Admin(AdminResponse::Nodes(self.node_rows(&state))),
                    AdminRequest::Shards => Response::Admin(AdminResponse::Shards(shard_rows(&state))),
                    AdminRequest::ShardsPage { from, limit } => {
                        let summary = self.shards_summary(revision, &state);
                        Response::Admin(shards_page(&state, &from, limit, summary))
                    }
                    _ => {
                        let rows = self.node_rows(&state);
                        let live = rows.iter().filter(|r| r.report_age_ms.is_some_and(|a| a < 5_000)).count();
                        let summary = summarize(&state);
                        // This node's replica of the meta group, if it holds one: one group's
                        // state, not every group's.
                        let meta = self.inner.host.group_info_of(META_GROUP).await.ok();
                        let meta_leader = meta.as_ref().and_then(|i| i.leader);
                        let conf = meta.map(|i| i.committed_conf.membership);
                        let meta_voters = conf.as_ref().map(|c| c.voters.iter().copied().collect()).unwrap_or_default();
                        let meta_learners =
                            conf.as_ref().map(|c| c.learners.iter().copied().collect()).unwrap_or_default();
                        Response::Admin(AdminResponse::Status(StatusReport {
                            nodes: rows.len(),
                            nodes_live: live,
                            shards: summary.shards as usize,
                            shards_with_leader: summary.with_leader as usize,
                            moves: state.moves.len(),
                            meta_leader,
                            meta_voters,
                            meta_learners,
                        }))
                    }
                }
            }
            AdminRequest::Split { key } => {
                if let Err(e) = check_user_key(&key) {
                    return Response::Invalid(e);
                }
                answer(self.meta_exec(MetaOp::SplitAt { key }, false).await)
            }
            AdminRequest::Move { shard, from, to } => {
                // The meta leader's state: its reports say who leads the shard now.
                let state = match read(self.meta_exec_as(MetaOp::Read, false, MetaAnswer::WithReports).await) {
                    Ok(s) => s,
                    Err(e) => return Response::Unavailable(e.to_string()),
                };
                let Some(d) = state.map.get(shard) else { return Response::Invalid(format!("no shard {shard}")) };
                let leads = state.nodes.get(&from).is_some_and(|n| n.report.leading.contains(&shard));
                let plan = MovePlan::new(
                    shard,
                    from,
                    to,
                    leads.then_some(to),
                    self.inner.config.balancer.catch_up_lag_entries_max,
                );
                let now_ms = now_ms();
                let cmd = MetaCommand::StartMove { epoch: d.epoch, plan, now_ms };
                answer(self.meta_exec(MetaOp::Commands(vec![cmd]), false).await)
            }
            AdminRequest::TransferLeader { shard, node } => {
                let state = self.meta_view();
                let Some(d) = state.map.get(shard) else { return Response::Invalid(format!("no shard {shard}")) };
                let cmd = MetaCommand::TransferLeader { shard, epoch: d.epoch, node };
                answer(self.meta_exec(MetaOp::Commands(vec![cmd]), false).await)
            }
            AdminRequest::Rebalance => answer(self.meta_exec(MetaOp::Rebalance { now_ms: now_ms() }, false).await),
            AdminRequest::Merge { shard } => {
                let state = self.meta_view();
                let Some(left) = state.map.get(shard) else { return Response::Invalid(format!("no shard {shard}")) };
                let Some(right) = left.end.as_ref().and_then(|end| state.map.lookup(end)) else {
                    return Response::Invalid(format!("shard {shard} is the last one: it has no right-hand neighbour"));
                };
                let cmd = MetaCommand::BeginMerge {
                    left: left.id,
                    left_epoch: left.epoch,
                    right: right.id,
                    right_epoch: right.epoch,
                    now_ms: now_ms(),
                };
                answer(self.meta_exec(MetaOp::Commands(vec![cmd]), false).await)
            }
            AdminRequest::AddNode { node, addr } => {
                if node.0 == 0 {
                    return Response::Invalid("node ids start at 1".into());
                }
                if let Err(e) = addr.parse::<SocketAddr>() {
                    return Response::Invalid(format!("{addr:?} is not an address like 127.0.0.1:7004: {e}"));
                }
                answer(self.meta_exec(MetaOp::Commands(vec![MetaCommand::RegisterNode { node, addr }]), false).await)
            }
            AdminRequest::Drain { node, draining } => {
                answer(self.meta_exec(MetaOp::Commands(vec![MetaCommand::SetDraining { node, draining }]), false).await)
            }
            AdminRequest::BackupStart { shard, epoch } => self.backup_start(shard, epoch).await,
            AdminRequest::BackupRead { shard, copy_id, offset, len } => {
                self.backup_read(shard, copy_id, offset, len).await
            }
            AdminRequest::BackupEnd { shard, copy_id } => self.backup_end(shard, copy_id),
            AdminRequest::RemoveDeadNodes { dead, kept, revision_floor } => {
                answer(self.meta_exec(MetaOp::RemoveDeadNodes { dead, kept, revision_floor }, false).await)
            }
            AdminRequest::ReplicaStates { .. } | AdminRequest::ForceAlone { .. } | AdminRequest::DropReplica { .. } => {
                self.unsafe_recovery_local(a).await
            }
        }
    }

    /// The meta group's leader when it is another node: as this node's replica knows it, or,
    /// without a replica, as the last answer from the meta group named it.
    pub(super) async fn meta_leader_elsewhere(&self) -> Option<NodeId> {
        let leader = match self.inner.host.group_info_of(META_GROUP).await {
            Ok(info) => info.leader?,
            Err(_) => self.meta_leader_named()?,
        };
        (leader != self.inner.id).then_some(leader)
    }

    fn node_rows(&self, state: &MetaState) -> Vec<NodeRow> {
        let reports = self.inner.meta.report_times();
        state
            .nodes
            .values()
            .map(|n| NodeRow {
                node: n.id,
                addr: n.addr.clone(),
                replicas: state.map.shards().filter(|d| d.replica(n.id).is_some()).count(),
                leading: n.report.leading.len(),
                requests_per_s: n.report.requests_per_s,
                draining: n.draining,
                report_age_ms: reports.get(&n.id).map(|t| t.elapsed().as_millis() as u64),
            })
            .collect()
    }
}

/// The client's view of a meta state.
pub fn view_of(state: &MetaState) -> ClusterView {
    ClusterView { map: state.map.clone(), nodes: node_addresses(state) }
}

/// The client address of each node of `state`: what a cluster view and a map answer carry.
pub(super) fn node_addresses(state: &MetaState) -> std::collections::BTreeMap<NodeId, String> {
    state.nodes.values().map(|n| (n.id, n.addr.clone())).collect()
}
