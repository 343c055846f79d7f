//! The reconciler (every [`RECONCILE_MS`]): makes the replicas this node holds, and the groups
//! it leads, follow the map. It creates the replicas the map places here, deletes those whose
//! group's committed configuration no longer counts this node (`placement::lifecycle`), and on
//! the groups it leads carries out splits, learners, voter changes and leader transfers,
//! asking for each at most once per [`RECONFIG_RETRY_MS`].

use super::{Node, RECONCILE_MS, RECONFIG_RETRY_MS};
use crate::meta::{shard_range, META_GROUP};
use crate::peer_wire::MetaOp;
use crate::placement::{replica_fate, LocalReplica, LogIndex as PLogIndex, ReplicaFate, ReplicaRole};
use crate::raft::{GroupId, Membership, NodeId, Role};
use crate::shard::{HostError, KeyRange, KvCommand, KvResponse};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// A change a group's leader asks of its group, rate-limited per group by [`Node::may_reconfig`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Reconfig {
    /// Propose the split entry that starts group `new`.
    Split { new: GroupId },
    /// Add this node as a learner (a move's target, or a voter the group lacks).
    AddLearner(NodeId),
    /// Stop counting this learner (the map dropped it: an aborted move).
    RemoveLearner(NodeId),
    /// Change the voters to exactly these (joint consensus).
    Voters(BTreeSet<NodeId>),
    /// Hand leadership to this node.
    Transfer(NodeId),
}

/// When each change was last asked for, per group.
pub(super) type ReconfigTimes = HashMap<(GroupId, Reconfig), Instant>;

impl Node {
    /// The reconciler task: [`Node::reconcile`] every [`RECONCILE_MS`] until shutdown.
    pub(super) async fn run_reconciler(self, mut stop: watch::Receiver<bool>) {
        loop {
            self.reconcile().await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(RECONCILE_MS)) => {}
                _ = stop.changed() => break,
            }
        }
    }

    pub(super) async fn reconcile(&self) {
        if !self.refresh_local_view().await {
            // No local meta replica: the changes since this node's copy, from the meta leader.
            if let Err(e) = self.meta_follow(MetaOp::Read).await {
                debug!(error = %e, "cannot read the meta state");
            }
        }
        let state = self.meta_view();
        let me = self.inner.id;
        for (id, info) in &state.nodes {
            if *id > self.inner.id {
                if let Ok(a) = info.addr.parse::<SocketAddr>() {
                    let _ = self.inner.transport.set_peer_addr(*id, a);
                }
            }
        }
        if state.map.is_empty() {
            return;
        }
        let host = &self.inner.host;
        let local: BTreeSet<GroupId> = host.groups().into_iter().collect();
        let local_ranges: Vec<(GroupId, KeyRange)> =
            local.iter().filter(|g| **g != META_GROUP).filter_map(|g| host.group_range(*g).map(|r| (*g, r))).collect();
        for d in state.map.shards() {
            let Some(r) = d.replica(me) else { continue };
            if local.contains(&d.id) {
                continue;
            }
            // A shard split off a local group is started by the split entry when that group
            // applies it; created earlier, it could apply writes to keys the source group has
            // not finished with (both share one keyspace), and it would start empty, unable to
            // vote. The host checks again when it creates the group, atomically, against the
            // groups splits are starting here too (`HostError::RangeTaken`).
            let range = shard_range(d);
            if local_ranges.iter().any(|(_, lr)| ranges_overlap(lr, &range)) {
                continue;
            }
            // Shards of the bootstrap (ids 1..=S) are formed by all their voters; any other
            // replica — added later, or of a shard born of a split this node did not apply —
            // starts empty and is caught up by its leader (by snapshot where the log lacks the
            // data). Forming a split-born shard here could let two replicas without its data
            // elect each other.
            let bootstrap_shards = self.inner.config.bootstrap.as_ref().map_or(0, |b| b.split_keys.len() as u64 + 1);
            let initial = (d.id.0 <= bootstrap_shards && d.epoch.conf_version == 1 && r.role == ReplicaRole::Voter)
                .then(|| Membership::new(d.voters()));
            match host.create_group(d.id, shard_range(d), initial).await {
                Ok(()) => info!(node = self.inner.id.0, shard = %d.id, "shard replica created"),
                // A local group owns keys of it, or will: a split being started here, whose
                // chain of splits starts this one. Not an error; the next round looks again.
                Err(e @ HostError::RangeTaken { .. }) => {
                    debug!(node = self.inner.id.0, shard = %d.id, error = %e, "shard replica not created yet")
                }
                Err(e) => warn!(node = self.inner.id.0, shard = %d.id, error = %e, "cannot create shard replica"),
            }
        }
        let Ok(infos) = host.group_info().await else { return };
        // A replica is deleted only when its group's committed configuration no longer counts
        // it (see `placement::lifecycle`), never because this view leaves it out.
        for i in infos.iter().filter(|i| i.group != META_GROUP) {
            let fate = replica_fate(me, i.group, &local_replica_of(i, self.inner.id), &state);
            if let ReplicaFate::Delete(why) = fate {
                match host.destroy_group(i.group, true).await {
                    Ok(()) => info!(node = self.inner.id.0, shard = i.group.0, reason = ?why, "shard replica removed"),
                    Err(e) => warn!(shard = i.group.0, error = %e, "cannot remove shard replica"),
                }
            }
        }
        // Splits the map holds that a group this node leads has not carried out yet: propose
        // the split entry (one at a time per group; it is idempotent once applied).
        for i in infos.iter().filter(|i| i.role == Role::Leader && i.group != META_GROUP) {
            let (Some(d), Some(hr)) = (state.map.get(i.group), host.group_range(i.group)) else { continue };
            let Some(at) = d.end.clone() else { continue };
            if !hr.contains(&at) {
                continue;
            }
            let Some(right) = state.map.lookup(&at).filter(|r| r.start == at) else { continue };
            if !self.may_reconfig(i.group, Reconfig::Split { new: right.id }) {
                continue;
            }
            let cmd = KvCommand::Split { at: at.clone(), new_group: right.id.0 };
            match host.write(i.group, cmd).await {
                Ok(KvResponse::Split { .. }) => info!(shard = i.group.0, new = %right.id, "shard split"),
                Ok(other) => warn!(shard = i.group.0, answer = ?other, "split refused"),
                Err(e) => debug!(shard = i.group.0, error = %e, "split not done yet"),
            }
        }
        for i in infos.iter().filter(|i| i.role == Role::Leader && i.group != META_GROUP) {
            let Some(d) = state.map.get(i.group) else { continue };
            // A split the map made and the group has not applied yet: a configuration change
            // now would be copied into the split-born group, whose replicas the map took from
            // before the change. Wait for the split (proposed above).
            if host.group_range(i.group).is_some_and(|r| r != shard_range(d)) {
                continue;
            }
            let want: BTreeSet<NodeId> = d.voters().collect();
            // Learners are added for the target of a move only: a voter demoted by a move's
            // swap is a learner in the map until the move removes it, and must not rejoin.
            let target = state.moves.get(&d.id).map(|p| p.to);
            for l in d.replicas.iter().filter(|r| r.role == ReplicaRole::Learner && Some(r.node) == target) {
                if !i.voters.contains(&l.node) && self.may_reconfig(i.group, Reconfig::AddLearner(l.node)) {
                    if let Err(e) = host.add_learner(i.group, l.node).await {
                        debug!(shard = i.group.0, error = %e, "add learner");
                    }
                }
            }
            // Learners the map removed (an aborted move): the group stops counting them, which
            // confirms their tombstones so their nodes may delete them.
            let buried = state.tombstones.get(&d.id);
            for l in i.committed_conf.membership.learners.iter().filter(|l| !i.voters.contains(l)) {
                let gone = d.replica(*l).is_none() && buried.is_some_and(|t| t.contains_key(l));
                if gone && self.may_reconfig(i.group, Reconfig::RemoveLearner(*l)) {
                    if let Err(e) = host.remove_learner(i.group, *l).await {
                        debug!(shard = i.group.0, error = %e, "remove learner");
                    }
                }
            }
            // A voter of the map the group does not have at all (its Raft configuration came
            // from another source, a split say) joins as a learner first: the group promotes
            // only members that hold its configuration.
            for v in want.iter().filter(|v| !i.committed_conf.membership.contains(**v)) {
                if self.may_reconfig(i.group, Reconfig::AddLearner(*v)) {
                    if let Err(e) = host.add_learner(i.group, *v).await {
                        debug!(shard = i.group.0, error = %e, "add learner before promotion");
                    }
                }
            }
            if want != i.voters && !want.is_empty() && self.may_reconfig(i.group, Reconfig::Voters(want.clone())) {
                match host.change_membership(i.group, want.clone()).await {
                    Ok(_) => info!(shard = i.group.0, voters = ?want, "voters changed"),
                    Err(e) => debug!(shard = i.group.0, error = %e, "change membership"),
                }
            }
            if let Some(target) = state.transfers.get(&d.id) {
                if *target != self.inner.id
                    && i.voters.contains(target)
                    && self.may_reconfig(i.group, Reconfig::Transfer(*target))
                {
                    if let Err(e) = host.transfer_leader(i.group, *target).await {
                        debug!(shard = i.group.0, error = %e, "transfer leader");
                    }
                }
            }
        }
    }

    fn may_reconfig(&self, shard: GroupId, what: Reconfig) -> bool {
        let Ok(mut m) = self.inner.reconfig.lock() else { return false };
        let now = Instant::now();
        match m.get(&(shard, what.clone())) {
            Some(t) if now.duration_since(*t) < Duration::from_millis(RECONFIG_RETRY_MS) => false,
            _ => {
                m.insert((shard, what), now);
                true
            }
        }
    }
}

/// What a local replica knows of its own group, for [`replica_fate`].
fn local_replica_of(i: &crate::shard::GroupInfo, me: NodeId) -> LocalReplica {
    let m = &i.committed_conf.membership;
    let committed = (!m.nodes().is_empty()).then(|| (PLogIndex(i.committed_conf.log_id.index.0), m.contains(me)));
    LocalReplica { committed, newest_conf: PLogIndex(i.newest_conf.0) }
}

/// Whether two key ranges share a key.
fn ranges_overlap(a: &KeyRange, b: &KeyRange) -> bool {
    let a_starts_before_b_ends = b.end.as_ref().is_none_or(|e| a.start < *e);
    let b_starts_before_a_ends = a.end.as_ref().is_none_or(|e| b.start < *e);
    a_starts_before_b_ends && b_starts_before_a_ends
}
