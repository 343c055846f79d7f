//! The node's part of unsafe recovery (`flotilla admin unsafe-recover`): answering with the
//! Raft state of its own replicas, forcing one of them alone, dropping one, all served by the
//! node asked from its own state (the meta group may be the group that lost its quorum), and
//! refusing every message of a node removed for good.

use super::Node;
use crate::meta::META_GROUP;
use crate::peer_wire::MetaOp;
use crate::placement::{NodeId, ShardId};
use crate::raft::{LogId, Role};
use crate::shard::{DestroyGuard, GroupInfo, HostError};
use crate::unsafe_recovery::REVISION_FLOOR_MAX;
use crate::wire::{AdminRequest, AdminResponse, ReplicaState, Response, REPLICA_STATES_PAGE_MAX};
use std::collections::BTreeSet;
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
                let (view_revision, view) = (self.meta_revision(), self.meta_view());
                let registered = view.nodes.iter().filter(|(n, _)| !view.removed.contains(n));
                let nodes = registered.map(|(n, i)| (*n, i.addr.clone())).collect();
                Response::Admin(AdminResponse::ReplicaStates { replicas, next, view_revision, nodes })
            }
            AdminRequest::ForceAlone { shard, dead, last_term, last_index, revision_floor } => {
                if revision_floor > REVISION_FLOOR_MAX {
                    return Response::Invalid(format!("meta revision floor {revision_floor} is not believable"));
                }
                if shard == META_GROUP && revision_floor > 0 {
                    // Before the force: whatever this node writes first as the forced meta
                    // leader (a move it aborts, a report) is written above the floor.
                    self.hold_revision_floor(revision_floor);
                }
                let last = LogId::new(last_term, last_index);
                match host.force_alone(shard, dead.into_iter().collect(), last).await {
                    Ok(index) => {
                        warn!(
                            node = self.inner.id.0,
                            shard = shard.0,
                            index = index.0,
                            "unsafe recovery: replica forced alone"
                        );
                        if shard == META_GROUP && revision_floor > 0 {
                            // The jump as soon as the forced group leads, in its log: a restart
                            // or a new meta leader before the recovery's map change cannot lose
                            // it. Not awaited: this node's own meta ops may hold the meta lock
                            // for seconds (they waited for a leader), and the tool must get its
                            // answer (a retried force is refused: the log moved).
                            let node = self.clone();
                            tokio::spawn(async move {
                                let jump = MetaOp::RaiseRevision { floor: revision_floor };
                                if let Err(e) = node.meta_exec(jump, false).await {
                                    warn!(error = %e, "unsafe recovery: meta revision not raised yet (the map change raises it)");
                                }
                            });
                        }
                        Response::Admin(AdminResponse::Forced { shard, index: index.0 })
                    }
                    Err(e) => failed(e),
                }
            }
            AdminRequest::DropReplica { shard, dead } if shard == META_GROUP => {
                self.retire_meta_replica(dead.into_iter().collect()).await
            }
            AdminRequest::DropReplica { shard, dead } => {
                let dead: BTreeSet<NodeId> = dead.into_iter().collect();
                let dead_again = dead.clone();
                let before_the_loss = move |i: &GroupInfo| held_before_the_loss(i, &dead);
                match host.destroy_group_if(shard, true, Box::new(before_the_loss)).await {
                    Ok(()) | Err(HostError::UnknownGroup(_)) => {
                        warn!(node = self.inner.id.0, shard = shard.0, "unsafe recovery: replica dropped");
                        Response::Admin(AdminResponse::Done(format!("replica of shard {shard} dropped")))
                    }
                    Err(HostError::Kept(_)) => self.kept_answer(shard, &dead_again).await,
                    Err(e) => failed(e),
                }
            }
            other => Response::Invalid(format!("not an unsafe-recovery request served locally: {other:?}")),
        }
    }

    /// Drops this node's replica of a forced meta group that was not kept: it holds the
    /// configuration from before the loss, so its node would read a state no one changes any
    /// more (and, if the replica were added back as it is, a log the forced one does not
    /// share). From then on the node follows the meta leader; the meta leader may later ask it
    /// to hold a new, empty replica ([`crate::peer_wire::PeerRequest::HoldMetaReplica`]). The
    /// retirement is written to the data directory first, so that a restart does not form
    /// the meta group again from the `[bootstrap]` section. A leader is not dropped.
    async fn retire_meta_replica(&self, dead: BTreeSet<NodeId>) -> Response {
        let dead_again = dead.clone();
        let old = move |i: &GroupInfo| i.role != Role::Leader && held_before_the_loss(i, &dead);
        match self.retire_meta_replica_if(Box::new(old)).await {
            Ok(true) => {
                warn!(node = self.inner.id.0, "unsafe recovery: meta replica retired; following the meta leader");
                Response::Admin(AdminResponse::Done("replica of the meta group dropped".into()))
            }
            Ok(false) => self.kept_answer(META_GROUP, &dead_again).await,
            Err(e) => Response::Unavailable(e),
        }
    }

    /// Deletes this node's meta replica if `still` holds of it when its poller stops it; the
    /// node then follows the meta leader. The retirement is written to the data directory
    /// first, so that a restart does not form the meta group again from the `[bootstrap]`
    /// section, and removed if the replica is kept. `Ok(false)`: kept (`still` did not hold).
    pub(super) async fn retire_meta_replica_if(&self, still: DestroyGuard) -> Result<bool, String> {
        let _one_at_a_time = self.inner.meta.retire_lock.lock().await;
        let path = self.inner.config.data_dir.join(META_RETIRED_FILE);
        if let Err(e) = write_durably(&path) {
            return Err(format!("cannot write {}: {e}", path.display()));
        }
        match self.inner.host.destroy_group_if(META_GROUP, true, still).await {
            Ok(()) | Err(HostError::UnknownGroup(_)) => {
                self.forget_stored();
                Ok(true)
            }
            Err(e) => {
                // The marker must not outlive the replica it was written for.
                self.clear_meta_retired();
                match e {
                    HostError::Kept(_) => Ok(false),
                    e => Err(e.to_string()),
                }
            }
        }
    }

    /// The answer to a drop the guard refused: a replica that leads is an error (the tool
    /// asked the wrong node); one that holds a configuration given since the loss already
    /// follows the forced group (its leader made it a learner, and Raft reconciled its log
    /// with the kept one), which is what the drop was for.
    async fn kept_answer(&self, shard: ShardId, dead: &BTreeSet<NodeId>) -> Response {
        let info = match self.inner.host.group_info_of(shard).await {
            Ok(i) => i,
            // Deleted since (by the reconciler, say): what the drop asked for.
            Err(HostError::UnknownGroup(_)) => {
                return Response::Admin(AdminResponse::Done(format!("replica of shard {shard} dropped")))
            }
            Err(e) => return Response::Unavailable(e.to_string()),
        };
        let conf = &info.committed_conf.membership;
        let names_dead = conf.voters.iter().chain(conf.outgoing.iter().flatten()).any(|v| dead.contains(v));
        if info.role == Role::Leader || names_dead {
            return Response::Invalid(format!(
                "this node's replica of shard {shard} leads its group or never lost its quorum: not dropped"
            ));
        }
        Response::Admin(AdminResponse::Done(format!(
            "replica of shard {shard} kept: it holds a configuration given since the loss"
        )))
    }

    /// Forgets that this node's meta replica was retired: it holds one the group gave it.
    pub(super) fn clear_meta_retired(&self) {
        let path = self.inner.config.data_dir.join(META_RETIRED_FILE);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(error = %e, path = %path.display(), "cannot remove the meta retirement marker");
            }
        }
    }

    /// Whether this node's meta replica was retired by an unsafe recovery (see
    /// [`Node::retire_meta_replica`]): it then forms no meta group from its `[bootstrap]`.
    pub(super) fn meta_replica_retired(&self) -> bool {
        self.inner.config.data_dir.join(META_RETIRED_FILE).exists()
    }
}

/// Whether `i` still holds the configuration from before the loss of `dead`: they hold a
/// majority of either half of its committed configuration (what unsafe recovery forced).
fn held_before_the_loss(i: &GroupInfo, dead: &BTreeSet<NodeId>) -> bool {
    !dead.is_empty() && !i.committed_conf.membership.is_quorum(|n| !dead.contains(&n))
}

/// The file in a node's data directory that says its meta replica was retired.
pub const META_RETIRED_FILE: &str = "meta-replica-retired";

/// Creates `path` (empty) and makes it and its directory entry durable.
pub(super) fn write_durably(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::create(path)?.sync_all()?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
