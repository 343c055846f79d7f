//! The meta group's own replicas. Its voters are fixed at bootstrap; nodes come and go after.
//! An unsafe recovery leaves the meta group on one voter, and a voter on a node removed for
//! good or being drained would stay a voter forever. So the meta leader keeps the voters on
//! nodes that are registered, not removed and not draining, and brings them back to
//! [`META_VOTERS_TARGET`] when fewer and enough nodes may hold one (else to one: never to an
//! even number by growing; never fewer than it has: a cluster bootstrapped with five keeps
//! five), one configuration change at a time:
//!
//! 1. a learner in the configuration is promoted once its replica has caught up, or removed if
//!    its node may no longer hold one (removed, draining, gone from the map) or has not
//!    answered for [`LEARNER_SILENT_MS`];
//! 2. else voters on removed nodes leave the configuration;
//! 3. else, with too few voters, a node that may hold one is added as a learner;
//! 4. else voters on draining nodes leave, once enough others vote.
//!
//! The learner's node creates its replica, empty, only when asked by the meta leader after
//! that learner's configuration committed ([`PeerRequest::HoldMetaReplica`]): the replica
//! exists because a committed entry of the meta group says so. An empty replica grants no
//! votes until the leader's snapshot or log reaches it.

use super::Node;
use crate::meta::{meta_range, META_GROUP};
use crate::peer_wire::{PeerRequest, PeerResponse};
use crate::raft::{NodeId, Role};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Voters the meta group is brought back to when fewer are on nodes that may hold them.
pub const META_VOTERS_TARGET: usize = 3;
/// How often the meta leader looks at the meta group's replicas.
const META_MEMBERS_EVERY_MS: u64 = 1_000;
/// A learner that does not answer for this long is removed, and another node is tried.
const LEARNER_SILENT_MS: u64 = 30_000;
/// A node that did not answer is not picked as a new learner again for this long.
const PICK_AGAIN_AFTER_MS: u64 = 60_000;
/// A learner is promoted once it has applied up to this many entries short of the leader's
/// commit at the time it was asked.
const CAUGHT_UP_SLACK_ENTRIES: u64 = 8;

/// What one round decided (for the log and the tests of the decision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MetaMembersStep {
    /// Nothing to change.
    Keep,
    /// Ask the learner's node to hold its replica, and promote it if caught up.
    CatchUp(NodeId),
    /// Remove the learner.
    DropLearner(NodeId),
    /// Change the voters to this set.
    Voters(BTreeSet<NodeId>),
    /// Add this node as a learner.
    AddLearner(NodeId),
}

/// The next step for a meta group whose committed configuration has `voters` and `learners`,
/// where `may_hold` are the nodes that may hold a replica (registered, not removed, not
/// draining), `removed` the nodes removed for good, and `avoid` nodes not to pick now (they did
/// not answer lately). A pure function of the committed configuration and the map.
pub(crate) fn next_step(
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    may_hold: &BTreeSet<NodeId>,
    removed: &BTreeSet<NodeId>,
    avoid: &BTreeSet<NodeId>,
) -> MetaMembersStep {
    if let Some(l) = learners.iter().next() {
        return if may_hold.contains(l) { MetaMembersStep::CatchUp(*l) } else { MetaMembersStep::DropLearner(*l) };
    }
    let without_removed: BTreeSet<NodeId> = voters.difference(removed).copied().collect();
    if without_removed.len() < voters.len() && !without_removed.is_empty() {
        return MetaMembersStep::Voters(without_removed);
    }
    // An odd number of voters: with two nodes that may hold one, a second voter would only
    // make the group need both.
    let target = if may_hold.len() >= META_VOTERS_TARGET { META_VOTERS_TARGET } else { 1 };
    let good: BTreeSet<NodeId> = voters.intersection(may_hold).copied().collect();
    if good.len() < target {
        if let Some(n) = may_hold.iter().find(|n| !voters.contains(n) && !avoid.contains(n)) {
            return MetaMembersStep::AddLearner(*n);
        }
    }
    // Draining voters leave once the others are as many as the target asks.
    if good.len() < voters.len() && good.len() >= target && !good.is_empty() {
        return MetaMembersStep::Voters(good);
    }
    MetaMembersStep::Keep
}

/// The task's memory between rounds: when each learner was first asked, when it last answered,
/// and nodes that did not answer.
#[derive(Default)]
struct Memory {
    learner_answered: BTreeMap<NodeId, Instant>,
    silent: BTreeMap<NodeId, Instant>,
}

impl Node {
    /// On the meta leader, every [`META_MEMBERS_EVERY_MS`]: one step toward the meta group's
    /// voters on nodes that may hold them (see the module documentation).
    pub(super) async fn run_meta_members(self, mut stop: watch::Receiver<bool>) {
        let mut memory = Memory::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(META_MEMBERS_EVERY_MS)) => {}
                _ = stop.changed() => break,
            }
            if let Err(e) = self.meta_members_round(&mut memory).await {
                debug!(error = %e, "meta group replicas: round not done");
            }
        }
    }

    async fn meta_members_round(&self, memory: &mut Memory) -> Result<(), String> {
        let host = &self.inner.host;
        if !host.groups().contains(&META_GROUP) {
            return Ok(());
        }
        let info = host.group_info_of(META_GROUP).await.map_err(|e| e.to_string())?;
        // One change at a time, from a committed configuration that is not joint.
        let conf = &info.committed_conf.membership;
        if info.role != Role::Leader || info.newest_conf > info.committed_conf.log_id.index || conf.is_joint() {
            memory.learner_answered.clear();
            return Ok(());
        }
        let voters = conf.voters.clone();
        let learners = conf.learners.clone();
        let state = self.meta_view();
        let may_hold: BTreeSet<NodeId> = state
            .nodes
            .values()
            .filter(|n| !n.draining && !n.addr.is_empty() && !state.removed.contains(&n.id))
            .map(|n| n.id)
            .collect();
        let now = Instant::now();
        memory.silent.retain(|_, at| now.duration_since(*at) < Duration::from_millis(PICK_AGAIN_AFTER_MS));
        memory.learner_answered.retain(|n, _| learners.contains(n));
        let avoid: BTreeSet<NodeId> = memory.silent.keys().copied().collect();
        let step = next_step(&voters, &learners, &may_hold, &state.removed, &avoid);
        match step {
            MetaMembersStep::Keep => {}
            MetaMembersStep::CatchUp(l) => {
                let since = *memory.learner_answered.entry(l).or_insert(now);
                match self.ask_hold_meta_replica(l).await {
                    Ok(applied) => {
                        memory.learner_answered.insert(l, now);
                        if applied + CAUGHT_UP_SLACK_ENTRIES >= info.committed.0 {
                            let mut promoted = voters.clone();
                            promoted.insert(l);
                            info!(node = %l, ?promoted, "meta group: learner caught up, promoting it");
                            host.change_membership(META_GROUP, promoted).await.map_err(|e| e.to_string())?;
                        }
                    }
                    Err(e) if now.duration_since(since) >= Duration::from_millis(LEARNER_SILENT_MS) => {
                        warn!(node = %l, error = %e, "meta group: learner silent, removing it");
                        memory.silent.insert(l, now);
                        host.remove_learner(META_GROUP, l).await.map_err(|e| e.to_string())?;
                    }
                    Err(e) => return Err(format!("learner {l} did not answer: {e}")),
                }
            }
            MetaMembersStep::DropLearner(l) => {
                info!(node = %l, "meta group: its node may not hold a replica, removing the learner");
                host.remove_learner(META_GROUP, l).await.map_err(|e| e.to_string())?;
            }
            MetaMembersStep::Voters(v) => {
                info!(from = ?voters, to = ?v, "meta group: voters on nodes removed or draining leave");
                host.change_membership(META_GROUP, v).await.map_err(|e| e.to_string())?;
            }
            MetaMembersStep::AddLearner(n) => {
                info!(node = %n, ?voters, "meta group: too few voters, adding a learner");
                host.add_learner(META_GROUP, n).await.map_err(|e| e.to_string())?;
                // Committed: the node may now create its replica.
                memory.learner_answered.insert(n, now);
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
                Ok(()) => info!(node = self.inner.id.0, "meta group: replica created, to be caught up by its leader"),
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
    fn a_meta_group_forced_onto_one_voter_grows_back_one_learner_at_a_time() {
        let none = set(&[]);
        let may = set(&[1, 4, 5]);
        let removed = set(&[2, 3]);
        assert_eq!(next_step(&set(&[1]), &none, &may, &removed, &none), MetaMembersStep::AddLearner(NodeId(4)));
        assert_eq!(next_step(&set(&[1]), &set(&[4]), &may, &removed, &none), MetaMembersStep::CatchUp(NodeId(4)));
        assert_eq!(next_step(&set(&[1, 4]), &none, &may, &removed, &none), MetaMembersStep::AddLearner(NodeId(5)));
        assert_eq!(next_step(&set(&[1, 4, 5]), &none, &may, &removed, &none), MetaMembersStep::Keep);
        // A node that did not answer lately is not picked again at once.
        assert_eq!(next_step(&set(&[1]), &none, &may, &removed, &set(&[4])), MetaMembersStep::AddLearner(NodeId(5)));
    }

    #[test]
    fn voters_on_removed_nodes_leave_first_and_draining_ones_once_replaced() {
        let none = set(&[]);
        // Removed voters leave before anything is added (they can never vote again).
        assert_eq!(
            next_step(&set(&[1, 2, 3]), &none, &set(&[1, 4]), &set(&[2]), &none),
            MetaMembersStep::Voters(set(&[1, 3]))
        );
        // Node 3 drains: 4 is added first, then 3 leaves.
        let may = set(&[1, 2, 4]);
        assert_eq!(next_step(&set(&[1, 2, 3]), &none, &may, &none, &none), MetaMembersStep::AddLearner(NodeId(4)));
        assert_eq!(next_step(&set(&[1, 2, 3, 4]), &none, &may, &none, &none), MetaMembersStep::Voters(set(&[1, 2, 4])));
        // With no node to replace it, a draining voter still leaves: two voters of two live
        // nodes stand as much loss as three with one of them going.
        assert_eq!(
            next_step(&set(&[1, 2, 3]), &none, &set(&[1, 2]), &none, &none),
            MetaMembersStep::Voters(set(&[1, 2]))
        );
        // Two nodes that may hold one: no second voter.
        assert_eq!(next_step(&set(&[1]), &none, &set(&[1, 2]), &none, &none), MetaMembersStep::Keep);
        // A learner whose node may no longer hold a replica is dropped.
        assert_eq!(
            next_step(&set(&[1, 2, 3]), &set(&[5]), &set(&[1, 2, 3]), &none, &none),
            MetaMembersStep::DropLearner(NodeId(5))
        );
        // A group bootstrapped with five voters keeps five.
        assert_eq!(
            next_step(&set(&[1, 2, 3, 4, 5]), &none, &set(&[1, 2, 3, 4, 5]), &none, &none),
            MetaMembersStep::Keep
        );
    }
}
