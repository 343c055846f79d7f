//! Admin requests (`flotilla admin`): listings of nodes and shards and the cluster summary,
//! read from the meta leader's state and reports; splits, moves, leader transfers, drains,
//! balancer rounds and node registrations, each one meta operation.

use super::{now_ms, Node, NodeError};
use crate::meta::META_GROUP;
use crate::peer_wire::MetaOp;
use crate::placement::{MetaCommand, MetaState, MovePlan, NodeId};
use crate::wire::{
    check_user_key, AdminRequest, AdminResponse, ClusterView, NodeRow, Response, ShardRow, StatusReport,
};
use std::net::SocketAddr;

impl Node {
    pub(super) async fn admin(&self, a: AdminRequest) -> Response {
        let read = |s: Result<(u64, MetaState, AdminResponse), NodeError>| s.map(|(_, s, _)| s);
        let answer = |r: Result<(u64, MetaState, AdminResponse), NodeError>| match r {
            Ok((_, _, a)) => Response::Admin(a),
            Err(NodeError::Meta(e)) => Response::Invalid(e),
            Err(e) => Response::Unavailable(e.to_string()),
        };
        match a {
            AdminRequest::Nodes | AdminRequest::Shards | AdminRequest::Status => {
                let state = match read(self.meta_exec(MetaOp::Read, false).await) {
                    Ok(s) => s,
                    Err(e) => return Response::Unavailable(e.to_string()),
                };
                match a {
                    AdminRequest::Nodes => Response::Admin(AdminResponse::Nodes(self.node_rows(&state))),
                    AdminRequest::Shards => Response::Admin(AdminResponse::Shards(shard_rows(&state))),
                    _ => {
                        let rows = self.node_rows(&state);
                        let live = rows.iter().filter(|r| r.report_age_ms.is_some_and(|a| a < 5_000)).count();
                        let shards = shard_rows(&state);
                        let meta_leader = self
                            .inner
                            .host
                            .group_info()
                            .await
                            .ok()
                            .and_then(|v| v.into_iter().find(|i| i.group == META_GROUP))
                            .and_then(|i| i.leader);
                        Response::Admin(AdminResponse::Status(StatusReport {
                            nodes: rows.len(),
                            nodes_live: live,
                            shards: shards.len(),
                            shards_with_leader: shards.iter().filter(|s| s.leader.is_some()).count(),
                            moves: state.moves.len(),
                            meta_leader,
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
                let state = match read(self.meta_exec(MetaOp::Read, false).await) {
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
        }
    }

    /// The meta group's leader when it is another node (as this node's replica knows it).
    pub(super) async fn meta_leader_elsewhere(&self) -> Option<NodeId> {
        let infos = self.inner.host.group_info().await.ok()?;
        let leader = infos.into_iter().find(|i| i.group == META_GROUP)?.leader?;
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
    ClusterView { map: state.map.clone(), nodes: state.nodes.values().map(|n| (n.id, n.addr.clone())).collect() }
}

fn shard_rows(state: &MetaState) -> Vec<ShardRow> {
    state
        .map
        .shards()
        .map(|d| {
            let leader = d
                .replicas
                .iter()
                .map(|r| r.node)
                .find(|n| state.nodes.get(n).is_some_and(|i| i.report.leading.contains(&d.id)));
            let applied = d
                .replicas
                .iter()
                .filter_map(|r| {
                    state.nodes.get(&r.node).and_then(|i| i.report.applied.get(&d.id)).map(|a| (r.node, a.0))
                })
                .collect();
            let bytes =
                state.nodes.values().filter_map(|i| i.report.shard_bytes.get(&d.id)).copied().max().unwrap_or(0);
            let moving = state.moves.get(&d.id).map(|p| format!("{} -> {} at {:?}", p.from, p.to, p.step));
            ShardRow { descriptor: d.clone(), leader, applied, bytes, moving }
        })
        .collect()
}
