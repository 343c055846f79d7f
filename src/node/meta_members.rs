//! The meta group's own replicas. Its voters are set at bootstrap, an unsafe recovery leaves
//! it on one voter (until something brings it back, losing that node loses the placement
//! metadata again), and a draining node must be able to leave it. So the meta leader, one
//! configuration change at a time:
//!
//! 1. drops learners on nodes removed for good;
//! 2. drops voters on nodes removed for good (they can never vote again; the transport refuses
//!    them);
//! 3. with fewer voters than [`META_VOTERS_TARGET`] (or, where fewer than that many nodes may
//!    hold one, than one), adds learners on nodes that may hold a replica (registered with an
//!    address, not removed, not draining) until voters and learners make the target;
//! 4. once every learner has caught up, makes them voters in one change (joint consensus), so
//!    the group never passes through an even number of voters;
//! 5. with a voter on a draining node and another node that may hold one, adds a learner
//!    there and, once it caught up, replaces the draining voter by it in one change (the
//!    number of voters stays as it was); the leader's own node is drained by handing the
//!    leadership to another voter first. The replica left out learns it was removed (its
//!    committed configuration, or a member's removal notice) and its node deletes it and
//!    follows the meta leader from then on ([`meta_replica_removed`]).
//!
//! Otherwise the group keeps its voters: a group bootstrapped with more voters keeps them,
//! and a draining voter stays while no other live node may hold one; a learner no voter needs
//! (a drain cancelled mid-swap) leaves. A learner whose node is down stays a learner until it
//! returns.
//!
//! The learner's node creates its replica, empty, only when asked by the meta leader after
//! that learner's configuration committed ([`PeerRequest::HoldMetaReplica`]): the replica
//! exists because a committed entry of the meta group says so. An empty replica grants no
//! votes until the leader's snapshot or log reaches it.

use super::Node;
use crate::meta::{meta_range, META_GROUP};
use crate::peer_wire::{PeerRequest, PeerResponse};
use crate::raft::{NodeId, Role};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info};

/// Voters the meta group is brought back to when fewer are on nodes that may hold them.
pub const META_VOTERS_TARGET: usize = 3;
/// How often the meta leader looks at the meta group's replicas.
const META_MEMBERS_EVERY_MS: u64 = 1_000;
/// A learner is promoted once it has applied up to this many entries short of the leader's
/// commit at the time it was asked.
const CAUGHT_UP_SLACK_ENTRIES: u64 = 8;

/// What one round decided (for the log and the tests of the decision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MetaMembersStep {
    /// Nothing to change.
    Keep,
    /// Ask the learners' nodes to hold their replicas; once all caught up, change the voters
    /// to `voters` (the learners promoted, draining voters they replace left out).
    CatchUp {
        /// The learners.
        learners: BTreeSet<NodeId>,
        /// The voters after.
        voters: BTreeSet<NodeId>,
    },
    /// Hand the leadership to this voter (this node's own is draining).
    TransferLeader(NodeId),
    /// Remove the learner.
    DropLearner(NodeId),
    /// Change the voters to this set.
    Voters(BTreeSet<NodeId>),
    /// Add this node as a learner.
    AddLearner(NodeId),
}

/// The next step for a meta group whose committed configuration has `voters` and `learners`,
/// led by `leader`, where `may_hold` are the nodes that may hold a new replica (registered with
/// an address, not removed, not draining), `draining` the draining nodes, `live` the nodes
/// whose report reached the leader recently and `removed` the nodes removed for good. A pure
/// function of the committed configuration, the map and the reports.
pub(crate) fn next_step(
    leader: NodeId,
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    may_hold: &BTreeSet<NodeId>,
    draining: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
    removed: &BTreeSet<NodeId>,
) -> MetaMembersStep {
    if let Some(l) = learners.iter().find(|l| removed.contains(l)) {
        return MetaMembersStep::DropLearner(*l);
    }
    let alive: BTreeSet<NodeId> = voters.difference(removed).copied().collect();
    if alive.len() < voters.len() && !alive.is_empty() {
        return MetaMembersStep::Voters(alive);
    }
    // An odd number of voters: with two nodes that may hold one, a second voter would only
    // make the group need both.
    let nodes: BTreeSet<NodeId> = alive.union(may_hold).copied().collect();
    let target = if nodes.len() >= META_VOTERS_TARGET { META_VOTERS_TARGET } else { 1 };
    let promote_all =
        || MetaMembersStep::CatchUp { learners: learners.clone(), voters: voters.union(learners).copied().collect() };
    if alive.len() < target {
        if alive.len() + learners.len() < target {
            if let Some(n) = may_hold.iter().find(|n| !voters.contains(n) && !learners.contains(n)) {
                return MetaMembersStep::AddLearner(*n);
            }
        }
        return if learners.is_empty() { MetaMembersStep::Keep } else { promote_all() };
    }
    // Enough voters. Draining ones are replaced, one for one, by learners on live nodes that
    // may hold a replica.
    let drained: Vec<NodeId> = voters.iter().copied().filter(|v| draining.contains(v)).collect();
    let fresh: BTreeSet<NodeId> = learners.iter().copied().filter(|l| may_hold.contains(l)).collect();
    let candidate = may_hold.iter().find(|n| live.contains(n) && !voters.contains(n) && !learners.contains(n));
    if drained.is_empty() || (fresh.is_empty() && candidate.is_none()) {
        // A learner left over (a drain cancelled mid-swap) would make the voters even: it
        // leaves, and its node deletes its replica (`meta_replica_removed`).
        return match learners.iter().next() {
            Some(l) => MetaMembersStep::DropLearner(*l),
            None => MetaMembersStep::Keep,
        };
    }
    if drained.contains(&leader) {
        // The leader cannot take itself out in the same step: another voter leads first, one
        // that reports (a transfer to a node that is down holds every write back meanwhile).
        return match voters.iter().find(|v| !draining.contains(v) && live.contains(v)) {
            Some(v) => MetaMembersStep::TransferLeader(*v),
            None => MetaMembersStep::Keep,
        };
    }
    if fresh.is_empty() {
        return candidate.map_or(MetaMembersStep::Keep, |n| MetaMembersStep::AddLearner(*n));
    }
    let promoted: BTreeSet<NodeId> = fresh.iter().copied().take(drained.len()).collect();
    let mut after: BTreeSet<NodeId> = voters.union(&promoted).copied().collect();
    for d in drained.iter().take(promoted.len()) {
        after.remove(d);
    }
    MetaMembersStep::CatchUp { learners: promoted, voters: after }
}

/// Whether this node's replica of the meta group was removed from it: its committed
/// configuration leaves this node out (and nothing newer is in its log), or a member said a
/// configuration newer than anything in its log does. A replica never given a configuration
/// (created empty, waiting for its leader) is not removed.
pub(crate) fn meta_replica_removed(local: &crate::placement::LocalReplica) -> bool {
    match local.committed {
        None => false,
        Some((at, false)) if local.newest_conf <= at => true,
        // At the notice's index too: the configuration there is committed and leaves this node
        // out, so the replica's own entry at that index is that one or one to be replaced.
        Some(_) => matches!(local.removed_at, Some(at) if local.newest_conf <= at),
    }
}

impl Node {
    /// On the meta leader, every [`META_MEMBERS_EVERY_MS`]: one step toward the meta group's
    /// voters on nodes that may hold them (see the module documentation).
    pub(super) async fn run_meta_members(self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(META_MEMBERS_EVERY_MS)) => {}
                _ = stop.changed() => break,
            }
            if let Err(e) = self.meta_members_round().await {
                debug!(error = %e, "meta group replicas: round not done");
            }
        }
    }

    async fn meta_members_round(&self) -> Result<(), String> {
        let host = &self.inner.host;
        if !host.hosts(META_GROUP) {
            return Ok(());
        }
        let info = host.group_info_of(META_GROUP).await.map_err(|e| e.to_string())?;
        if info.role != Role::Leader && meta_replica_removed(&super::reconcile::local_replica_of(&info, self.inner.id))
        {
            return self.retire_removed_meta_replica().await;
        }
        // One change at a time, from a committed configuration that is not joint.
        let conf = &info.committed_conf.membership;
        if info.role != Role::Leader || info.newest_conf > info.committed_conf.log_id.index || conf.is_joint() {
            return Ok(());
        }
        let (voters, learners) = (conf.voters.clone(), conf.learners.clone());
        let state = self.meta_view();
        let registered = || state.nodes.values().filter(|n| !state.removed.contains(&n.id));
        let may_hold: BTreeSet<NodeId> =
            registered().filter(|n| !n.draining && !n.addr.is_empty()).map(|n| n.id).collect();
        let draining: BTreeSet<NodeId> = registered().filter(|n| n.draining).map(|n| n.id).collect();
        let recent = Duration::from_millis(super::LIVE_REPORT_AGE_MAX_MS);
        let mut live: BTreeSet<NodeId> = self
            .inner
            .meta
            .report_times()
            .into_iter()
            .filter(|(_, at)| at.elapsed() < recent)
            .map(|(n, _)| n)
            .collect();
        live.insert(self.inner.id);
        match next_step(self.inner.id, &voters, &learners, &may_hold, &draining, &live, &state.removed) {
            MetaMembersStep::Keep => {}
            MetaMembersStep::TransferLeader(to) => {
                info!(node = %to, "meta group: this node drains, handing the leadership over");
                host.transfer_leader(META_GROUP, to).await.map_err(|e| e.to_string())?;
            }
            MetaMembersStep::CatchUp { learners: ls, voters: promoted } => {
                let mut behind = Vec::new();
                for l in &ls {
                    match self.ask_hold_meta_replica(*l).await {
                        Ok(applied) if applied + CAUGHT_UP_SLACK_ENTRIES >= info.committed.0 => {}
                        Ok(applied) => behind.push(format!("{l} at {applied}")),
                        Err(e) => behind.push(format!("{l}: {e}")),
                    }
                }
                if !behind.is_empty() {
                    return Err(format!("learners not caught up yet: {}", behind.join(", ")));
                }
                // The configuration may have changed while the learners were asked.
                let now = host.group_info_of(META_GROUP).await.map_err(|e| e.to_string())?;
                if now.role != Role::Leader || now.committed_conf.log_id != info.committed_conf.log_id {
                    return Ok(());
                }
                info!(?voters, ?promoted, "meta group: learners caught up, promoting them");
                host.change_membership(META_GROUP, promoted).await.map_err(|e| e.to_string())?;
            }
            MetaMembersStep::DropLearner(l) => {
                info!(node = %l, "meta group: learner leaves (its node was removed, or no voter needs replacing)");
                host.remove_learner(META_GROUP, l).await.map_err(|e| e.to_string())?;
            }
            MetaMembersStep::Voters(v) => {
                info!(from = ?voters, to = ?v, "meta group: voters on nodes removed for good leave");
                host.change_membership(META_GROUP, v).await.map_err(|e| e.to_string())?;
            }
            MetaMembersStep::AddLearner(n) => {
                info!(node = %n, ?voters, "meta group: too few voters, adding a learner");
                host.add_learner(META_GROUP, n).await.map_err(|e| e.to_string())?;
                // Committed: the node may now create its replica.
                if let Err(e) = self.ask_hold_meta_replica(n).await {
                    debug!(node = %n, error = %e, "meta group: new learner did not answer yet");
                }
            }
        }
        Ok(())
    }

    /// Deletes this node's replica of the meta group, which the group removed (see
    /// [`meta_replica_removed`], judged again when its poller stops it).
    async fn retire_removed_meta_replica(&self) -> Result<(), String> {
        let me = self.inner.id;
        let still = move |i: &crate::shard::GroupInfo| {
            i.role != Role::Leader && meta_replica_removed(&super::reconcile::local_replica_of(i, me))
        };
        if self.retire_meta_replica_if(Box::new(still)).await? {
            info!(node = me.0, "meta group: this node's replica was removed from the group; following the meta leader");
        }
        Ok(())
    }

    /// Asks `node` to hold a replica of the meta group; its applied index.
    async fn ask_hold_meta_replica(&self, node: NodeId) -> Result<u64, String> {
        let timeout = Duration::from_millis(super::PEER_REQUEST_TIMEOUT_MS);
        let bytes = self
            .inner
            .transport
            .request(node, PeerRequest::HoldMetaReplica.encode(), timeout)
            .await
            .map_err(|e| e.to_string())?;
        match PeerResponse::decode(&bytes).map_err(|e| e.to_string())? {
            PeerResponse::MetaReplica { applied } => Ok(applied),
            PeerResponse::Refused(e) | PeerResponse::Unavailable(e) => Err(e),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Holds a replica of the meta group (asked by the meta leader): creates it empty if this
    /// node has none; answers with its applied index.
    pub(super) async fn hold_meta_replica(&self) -> PeerResponse {
        let host = &self.inner.host;
        if !host.hosts(META_GROUP) {
            match host.create_group(META_GROUP, meta_range(), None).await {
                Ok(()) => {
                    self.clear_meta_retired();
                    info!(node = self.inner.id.0, "meta group: replica created, to be caught up by its leader")
                }
                Err(crate::shard::HostError::GroupExists(_)) => {}
                Err(e) => return PeerResponse::Unavailable(format!("cannot create a meta replica: {e}")),
            }
        }
        match host.group_info_of(META_GROUP).await {
            Ok(i) => PeerResponse::MetaReplica { applied: i.applied.0 },
            Err(e) => PeerResponse::Unavailable(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{LocalReplica, LogIndex as PLogIndex};

    fn set(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().map(|i| NodeId(*i)).collect()
    }

    /// [`next_step`] led by node 1 with nothing draining and nodes 1 to 9 reporting.
    fn step(voters: &[u64], learners: &[u64], may: &[u64], removed: &[u64]) -> MetaMembersStep {
        let live = set(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        next_step(NodeId(1), &set(voters), &set(learners), &set(may), &set(&[]), &live, &set(removed))
    }

    fn catch_up(learners: &[u64], voters: &[u64]) -> MetaMembersStep {
        MetaMembersStep::CatchUp { learners: set(learners), voters: set(voters) }
    }

    #[test]
    fn a_meta_group_forced_onto_one_voter_grows_to_three_through_learners_promoted_together() {
        let (may, removed) = (&[1, 4, 5], &[2, 3]);
        assert_eq!(step(&[1], &[], may, removed), MetaMembersStep::AddLearner(NodeId(4)));
        assert_eq!(step(&[1], &[4], may, removed), MetaMembersStep::AddLearner(NodeId(5)));
        assert_eq!(step(&[1], &[4, 5], may, removed), catch_up(&[4, 5], &[1, 4, 5]));
        assert_eq!(step(&[1, 4, 5], &[], may, removed), MetaMembersStep::Keep);
        // Removed nodes' voters leave first (they can never vote again), and their learners.
        assert_eq!(step(&[1, 2, 3], &[], may, removed), MetaMembersStep::Voters(set(&[1])));
        assert_eq!(step(&[1], &[2], may, removed), MetaMembersStep::DropLearner(NodeId(2)));
    }

    #[test]
    fn the_group_only_grows_and_never_to_an_even_number() {
        // Bootstrapped with three or five voters: kept, whatever the map says of their nodes
        // (a voter's address is empty until its first report).
        assert_eq!(step(&[1, 2, 3], &[], &[4], &[]), MetaMembersStep::Keep);
        assert_eq!(step(&[1, 2, 3, 4, 5], &[], &[1], &[]), MetaMembersStep::Keep);
        // Two nodes that may hold one: no second voter.
        assert_eq!(step(&[1], &[], &[1, 2], &[]), MetaMembersStep::Keep);
        // One voter and three nodes: grows.
        assert_eq!(step(&[1], &[], &[1, 2, 3], &[]), MetaMembersStep::AddLearner(NodeId(2)));
        // A learner left over beside enough voters (a drain cancelled mid-swap) leaves: four
        // voters would need three for a majority.
        assert_eq!(step(&[1, 2, 3], &[4], &[1, 2, 3, 4], &[]), MetaMembersStep::DropLearner(NodeId(4)));
    }

    #[test]
    fn a_draining_voter_is_replaced_one_for_one_by_a_caught_up_learner() {
        let (voters, none) = (set(&[1, 2, 3]), set(&[]));
        let draining = set(&[3]);
        let may = set(&[1, 2, 4]);
        let live = set(&[1, 2, 3, 4, 5]);
        let next = |leader: u64, learners: &BTreeSet<NodeId>| {
            next_step(NodeId(leader), &voters, learners, &may, &draining, &live, &none)
        };
        assert_eq!(next(1, &none), MetaMembersStep::AddLearner(NodeId(4)));
        assert_eq!(next(1, &set(&[4])), catch_up(&[4], &[1, 2, 4]), "three voters before and after");
        // The leader's own node drains: another voter leads first.
        assert_eq!(next(3, &none), MetaMembersStep::TransferLeader(NodeId(1)));
        // No other node may hold one, or none that reports: the draining voter stays.
        let only = set(&[1, 2]);
        assert_eq!(next_step(NodeId(1), &voters, &none, &only, &draining, &live, &none), MetaMembersStep::Keep);
        let quiet = set(&[1, 2, 3]);
        assert_eq!(next_step(NodeId(1), &voters, &none, &may, &draining, &quiet, &none), MetaMembersStep::Keep);
        // The leadership goes only to a voter that reports.
        let one_down = set(&[2, 3, 4]);
        assert_eq!(
            next_step(NodeId(3), &voters, &none, &may, &draining, &one_down, &none),
            MetaMembersStep::TransferLeader(NodeId(2))
        );
        // Every voter draining and nowhere to go: kept, and the leader is not handed around.
        let all = set(&[1, 2, 3]);
        assert_eq!(next_step(NodeId(1), &voters, &none, &may, &all, &live, &none), MetaMembersStep::Keep);
        // Two draining, one learner: one swap now, the next one later.
        let two = set(&[2, 3]);
        let may = set(&[1, 4, 5]);
        assert_eq!(next_step(NodeId(1), &voters, &set(&[4]), &may, &two, &live, &none), catch_up(&[4], &[1, 3, 4]));
    }

    #[test]
    fn a_replica_is_taken_as_removed_only_by_its_committed_configuration_or_a_newer_notice() {
        let local = |committed: Option<(u64, bool)>, newest: u64, removed_at: Option<u64>| LocalReplica {
            committed: committed.map(|(at, member)| (PLogIndex(at), member)),
            newest_conf: PLogIndex(newest),
            removed_at: removed_at.map(PLogIndex),
        };
        assert!(!meta_replica_removed(&local(None, 0, None)), "created empty, waiting for its leader");
        assert!(!meta_replica_removed(&local(Some((5, true)), 5, None)));
        assert!(meta_replica_removed(&local(Some((7, false)), 7, None)), "its committed configuration leaves it out");
        assert!(!meta_replica_removed(&local(Some((7, false)), 9, None)), "a newer configuration may add it back");
        assert!(meta_replica_removed(&local(Some((5, true)), 5, Some(8))), "a member names a newer configuration");
        assert!(meta_replica_removed(&local(Some((5, true)), 8, Some(8))), "or the one at its newest index");
        assert!(!meta_replica_removed(&local(Some((9, true)), 9, Some(8))), "added back since the notice");
        assert!(!meta_replica_removed(&local(None, 0, Some(8))), "an empty replica waits for its leader");
    }
}
