//! The meta group's own replicas. Its voters are fixed at bootstrap, and an unsafe recovery
//! leaves it on one voter: until something brings it back, losing that node loses the
//! placement metadata again. So the meta leader, one configuration change at a time:
//!
//! 1. drops learners on nodes removed for good;
//! 2. drops voters on nodes removed for good (they can never vote again; the transport refuses
//!    them);
//! 3. with fewer voters than [`META_VOTERS_TARGET`] (or, where fewer than that many nodes may
//!    hold one, than one), adds learners on nodes that may hold a replica (registered with an
//!    address, not removed, not draining) until voters and learners make the target;
//! 4. once every learner has caught up, makes them voters in one change (joint consensus), so
//!    the group never passes through an even number of voters.
//!
//! It only grows the group or drops dead voters: a group bootstrapped with more voters keeps
//! them, and a draining node stays a voter (retiring a meta voter is not automatic). A learner
//! whose node is down stays a learner until it returns.
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
    /// Ask the learners' nodes to hold their replicas; promote them all once all caught up.
    CatchUp(BTreeSet<NodeId>),
    /// Remove the learner.
    DropLearner(NodeId),
    /// Change the voters to this set.
    Voters(BTreeSet<NodeId>),
    /// Add this node as a learner.
    AddLearner(NodeId),
}

/// The next step for a meta group whose committed configuration has `voters` and `learners`,
/// where `may_hold` are the nodes that may hold a new replica (registered with an address, not
/// removed, not draining) and `removed` the nodes removed for good. A pure function of the
/// committed configuration and the map.
pub(crate) fn next_step(
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    may_hold: &BTreeSet<NodeId>,
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
    if alive.len() >= target {
        return if learners.is_empty() { MetaMembersStep::Keep } else { MetaMembersStep::CatchUp(learners.clone()) };
    }
    if alive.len() + learners.len() < target {
        if let Some(n) = may_hold.iter().find(|n| !voters.contains(n) && !learners.contains(n)) {
            return MetaMembersStep::AddLearner(*n);
        }
    }
    if learners.is_empty() {
        MetaMembersStep::Keep
    } else {
        MetaMembersStep::CatchUp(learners.clone())
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
        if !host.groups().contains(&META_GROUP) {
            return Ok(());
        }
        let info = host.group_info_of(META_GROUP).await.map_err(|e| e.to_string())?;
        // One change at a time, from a committed configuration that is not joint.
        let conf = &info.committed_conf.membership;
        if info.role != Role::Leader || info.newest_conf > info.committed_conf.log_id.index || conf.is_joint() {
            return Ok(());
        }
        let (voters, learners) = (conf.voters.clone(), conf.learners.clone());
        let state = self.meta_view();
        let may_hold: BTreeSet<NodeId> = state
            .nodes
            .values()
            .filter(|n| !n.draining && !n.addr.is_empty() && !state.removed.contains(&n.id))
            .map(|n| n.id)
            .collect();
        match next_step(&voters, &learners, &may_hold, &state.removed) {
            MetaMembersStep::Keep => {}
            MetaMembersStep::CatchUp(ls) => {
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
                let promoted: BTreeSet<NodeId> = voters.union(&ls).copied().collect();
                info!(?voters, ?promoted, "meta group: learners caught up, promoting them");
                host.change_membership(META_GROUP, promoted).await.map_err(|e| e.to_string())?;
            }
            MetaMembersStep::DropLearner(l) => {
                info!(node = %l, "meta group: learner on a node removed for good leaves");
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
        if !host.groups().contains(&META_GROUP) {
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

    fn set(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().map(|i| NodeId(*i)).collect()
    }

    #[test]
    fn a_meta_group_forced_onto_one_voter_grows_to_three_through_learners_promoted_together() {
        let none = set(&[]);
        let may = set(&[1, 4, 5]);
        let removed = set(&[2, 3]);
        assert_eq!(next_step(&set(&[1]), &none, &may, &removed), MetaMembersStep::AddLearner(NodeId(4)));
        assert_eq!(next_step(&set(&[1]), &set(&[4]), &may, &removed), MetaMembersStep::AddLearner(NodeId(5)));
        assert_eq!(next_step(&set(&[1]), &set(&[4, 5]), &may, &removed), MetaMembersStep::CatchUp(set(&[4, 5])));
        assert_eq!(next_step(&set(&[1, 4, 5]), &none, &may, &removed), MetaMembersStep::Keep);
        // Removed nodes' voters leave first (they can never vote again), and their learners.
        assert_eq!(next_step(&set(&[1, 2, 3]), &none, &may, &removed), MetaMembersStep::Voters(set(&[1])));
        assert_eq!(next_step(&set(&[1]), &set(&[2]), &may, &removed), MetaMembersStep::DropLearner(NodeId(2)));
    }

    #[test]
    fn the_group_only_grows_and_never_to_an_even_number() {
        let none = set(&[]);
        // Bootstrapped with three or five voters: kept, whatever the map says of their nodes
        // (a voter's address is empty until its first report; a draining voter stays).
        assert_eq!(next_step(&set(&[1, 2, 3]), &none, &set(&[4]), &none), MetaMembersStep::Keep);
        assert_eq!(next_step(&set(&[1, 2, 3, 4, 5]), &none, &set(&[1]), &none), MetaMembersStep::Keep);
        // Two nodes that may hold one: no second voter.
        assert_eq!(next_step(&set(&[1]), &none, &set(&[1, 2]), &none), MetaMembersStep::Keep);
        // One voter and three nodes: grows.
        assert_eq!(next_step(&set(&[1]), &none, &set(&[1, 2, 3]), &none), MetaMembersStep::AddLearner(NodeId(2)));
        // A learner left over beside enough voters is caught up and promoted, not dropped (its
        // node may hold a replica already).
        assert_eq!(
            next_step(&set(&[1, 2, 3]), &set(&[4]), &set(&[1, 2, 3, 4]), &none),
            MetaMembersStep::CatchUp(set(&[4]))
        );
    }
}
