//! Whether a node keeps or deletes its replica of a shard: the rule that a replica's life
//! follows its group's committed Raft configuration, as a pure function.
//!
//! The map a node sees may lag (a meta replica behind its leader, a view fetched before a
//! split) or run ahead of Raft (a move's change is recorded before the group carries it out).
//! Deleting a replica that Raft still counts loses acknowledged writes: re-created empty, it
//! would vote for a candidate missing them. So the map alone never deletes a replica; it takes
//! one of these:
//! - the group's own committed configuration on this node leaves the node out (Raft removed
//!   it), and the map does not list the node either (it was not added back since);
//! - the replica never received any configuration (created empty and never reached): it
//!   acknowledged nothing and grants no vote, so nothing is lost with it;
//! - a confirmed [`Tombstone`](crate::Tombstone): the shard's leader reported a committed
//!   configuration without the node, at an index at least that of the newest configuration
//!   the local replica holds (a replica holding a newer one was added back since);
//! - the same told by a member of the group itself, answering a message of this replica
//!   (strictly newer than the replica's newest configuration): a replica that missed its
//!   removal (started late by a split entry after its group had moved it away, when the
//!   tombstone was gone) learns it from the group.
//!
//! A shard the view does not know at all (its id not allocated yet, or not in the map) is
//! always kept: that view is older than the replica.

use crate::map::{NodeId, ShardId};
use crate::meta::{LogIndex, MetaState};

/// What the local replica of a shard knows of its own group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalReplica {
    /// The committed configuration's index and whether it holds this node (voter or
    /// learner); `None` while the replica holds no configuration at all (created empty).
    pub committed: Option<(LogIndex, bool)>,
    /// The index of the newest configuration in the replica's log or snapshot (0 if none).
    pub newest_conf: LogIndex,
    /// The highest index of a committed configuration without this node that a member of the
    /// group told this replica of.
    pub removed_at: Option<LogIndex>,
}

/// The decision for one local replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaFate {
    /// Keep it (a member, or not known to be removed).
    Keep,
    /// Delete it: Raft no longer counts it.
    Delete(DeleteReason),
}

/// Why a replica may be deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// The replica applied a configuration without its node.
    RemovedByItsGroup,
    /// The replica never received a configuration (created empty, never reached): it holds
    /// nothing the group counts.
    Empty,
    /// The shard's leader reported a committed configuration without the node.
    Tombstone(LogIndex),
    /// A member of the group told of a committed configuration without the node.
    ToldByAMember(LogIndex),
}

/// Decides whether node `me` keeps its replica of `shard`, from the view `state` (which may be
/// stale) and what the replica itself knows.
pub fn replica_fate(me: NodeId, shard: ShardId, local: &LocalReplica, state: &MetaState) -> ReplicaFate {
    if shard.0 >= state.next_shard_id {
        return ReplicaFate::Keep;
    }
    let Some(d) = state.map.get(shard) else { return ReplicaFate::Keep };
    if d.replica(me).is_some() {
        return ReplicaFate::Keep;
    }
    match local.committed {
        // Its log may already hold a newer configuration adding it back: not until that one
        // is committed too.
        Some((at, false)) if local.newest_conf <= at => return ReplicaFate::Delete(DeleteReason::RemovedByItsGroup),
        // Never given a configuration: it acknowledged nothing and cannot vote.
        None => return ReplicaFate::Delete(DeleteReason::Empty),
        _ => {}
    }
    let tomb = state.tombstones.get(&shard).and_then(|t| t.get(&me)).and_then(|t| t.confirmed);
    if let Some(at) = tomb.filter(|at| local.newest_conf <= *at) {
        return ReplicaFate::Delete(DeleteReason::Tombstone(at));
    }
    match local.removed_at {
        // Strictly newer than anything the replica holds: a configuration at that index or
        // later would be in its log if it had been given one adding it back.
        Some(at) if local.newest_conf < at => ReplicaFate::Delete(DeleteReason::ToldByAMember(at)),
        _ => ReplicaFate::Keep,
    }
}
