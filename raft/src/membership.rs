//! Cluster membership and quorums, including joint consensus (Raft thesis §4.3).

use crate::types::{LogId, LogIndex, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// A cluster configuration: voters, optionally the outgoing voters of a joint configuration,
/// and learners (which receive the log but never vote and never count toward a quorum).
///
/// While `outgoing` is `Some`, the configuration is *joint*: an election or a commit needs a
/// majority of `voters` **and** a majority of `outgoing`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The voters (the incoming voters while joint).
    pub voters: BTreeSet<NodeId>,
    /// The outgoing voters while the configuration is joint; `None` otherwise.
    pub outgoing: Option<BTreeSet<NodeId>>,
    /// Non-voting members that receive the log.
    pub learners: BTreeSet<NodeId>,
}

impl Membership {
    /// A simple (non-joint) configuration of voters, no learners.
    pub fn new<I: IntoIterator<Item = NodeId>>(voters: I) -> Membership {
        Membership { voters: voters.into_iter().collect(), outgoing: None, learners: BTreeSet::new() }
    }

    /// Whether this is a joint configuration.
    pub fn is_joint(&self) -> bool {
        self.outgoing.is_some()
    }

    /// Whether `id` votes in this configuration (in either half while joint).
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.outgoing.as_ref().is_some_and(|o| o.contains(&id))
    }

    /// Whether `id` is a learner.
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id) && !self.is_voter(id)
    }

    /// Whether `id` takes part at all (voter or learner).
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    /// Every node of the configuration: voters of both halves and learners.
    pub fn nodes(&self) -> BTreeSet<NodeId> {
        let mut all = self.voters.clone();
        if let Some(o) = &self.outgoing {
            all.extend(o.iter().copied());
        }
        all.extend(self.learners.iter().copied());
        all
    }

    /// Number of distinct nodes.
    pub fn node_count(&self) -> usize {
        self.nodes().len()
    }

    /// Whether the nodes for which `yes` holds form a quorum: a majority of `voters` and,
    /// while joint, a majority of `outgoing` too.
    pub fn is_quorum(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        let majority = |set: &BTreeSet<NodeId>| {
            let n = set.iter().filter(|id| yes(**id)).count();
            n * 2 > set.len()
        };
        majority(&self.voters) && self.outgoing.as_ref().is_none_or(majority)
    }

    /// The largest value `v` such that a quorum of voters has `value(node) >= v`: with `value`
    /// being each node's matched log index, this is the index a quorum holds. While joint, the
    /// smaller of the two halves' results.
    pub fn quorum_value<T: Ord + Copy + Default>(&self, value: impl Fn(NodeId) -> T) -> T {
        let of = |set: &BTreeSet<NodeId>| -> T {
            if set.is_empty() {
                return T::default();
            }
            let mut vals: Vec<T> = set.iter().map(|id| value(*id)).collect();
            vals.sort_unstable_by(|a, b| b.cmp(a));
            // With n voters a majority is n/2 + 1 nodes; the (n/2)-th largest value (0-based)
            // is held by at least that many.
            vals[set.len() / 2]
        };
        let v = of(&self.voters);
        match &self.outgoing {
            Some(o) => v.min(of(o)),
            None => v,
        }
    }

    /// Checks that the configuration can work: at least one voter; no node both voter and
    /// learner.
    pub fn validate(&self) -> Result<(), String> {
        if self.voters.is_empty() {
            return Err("a configuration needs at least one voter".into());
        }
        if let Some(o) = &self.outgoing {
            if o.is_empty() {
                return Err("the outgoing half of a joint configuration is empty".into());
            }
        }
        if let Some(id) = self.learners.iter().find(|id| self.is_voter(**id)) {
            return Err(format!("node {id} is both voter and learner"));
        }
        Ok(())
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |s: &BTreeSet<NodeId>| s.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
        write!(f, "voters=[{}]", list(&self.voters))?;
        if let Some(o) = &self.outgoing {
            write!(f, " outgoing=[{}]", list(o))?;
        }
        if !self.learners.is_empty() {
            write!(f, " learners=[{}]", list(&self.learners))?;
        }
        Ok(())
    }
}

/// A membership together with the id of the log entry that carried it (`LogId::ZERO` for the
/// empty configuration of a node that has not joined any cluster yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMembership {
    /// The entry that carried the configuration.
    pub log_id: LogId,
    /// The configuration.
    pub membership: Membership,
}

/// The configurations found in the log that may still matter: the latest one at or below the
/// commit index and every one after it. Since a leader proposes a new change only once the
/// previous one is committed, this list stays at two or three items.
#[derive(Clone, Debug, Default)]
pub(crate) struct MembershipLog {
    items: Vec<StoredMembership>,
}

impl MembershipLog {
    pub(crate) fn new(base: StoredMembership) -> Self {
        MembershipLog { items: vec![base] }
    }

    /// The configuration in effect: the latest one in the log.
    pub(crate) fn effective(&self) -> &StoredMembership {
        self.items.last().expect("membership log is never empty")
    }

    /// The latest configuration at or below `committed`.
    pub(crate) fn committed(&self, committed: LogIndex) -> &StoredMembership {
        self.items.iter().rev().find(|m| m.log_id.index <= committed).unwrap_or_else(|| &self.items[0])
    }

    pub(crate) fn push(&mut self, m: StoredMembership) {
        debug_assert!(m.log_id >= self.effective().log_id);
        self.items.push(m);
    }

    /// Forgets configurations carried by entries at or after `index` (a truncated log suffix).
    pub(crate) fn truncate_from(&mut self, index: LogIndex) {
        while self.items.len() > 1 && self.items.last().is_some_and(|m| m.log_id.index >= index) {
            self.items.pop();
        }
    }

    /// Whether `id` votes in any configuration that may still be in force: the latest one known
    /// committed or any later one. A node removed by an entry not yet known committed must
    /// still campaign, or a cluster whose most up-to-date log is on that node can deadlock.
    pub(crate) fn is_voter_in_any(&self, id: NodeId) -> bool {
        self.items.iter().any(|m| m.membership.is_voter(id))
    }

    /// Every node of every configuration that may still be in force: the leader keeps
    /// replicating to a removed node until its removal is committed, so it learns of it.
    pub(crate) fn nodes_in_any(&self) -> BTreeSet<NodeId> {
        self.items.iter().flat_map(|m| m.membership.nodes()).collect()
    }

    /// Drops configurations made irrelevant by the commit index advancing.
    pub(crate) fn compact(&mut self, committed: LogIndex) {
        while self.items.len() > 1 && self.items[1].log_id.index <= committed {
            self.items.remove(0);
        }
    }

    /// Gives back spare capacity (a quiet group's log usually holds one configuration).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.items.shrink_to_fit();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.items.capacity()
    }

    /// Replaces everything with the configuration of an installed snapshot, keeping the
    /// entries that are still in the log after it.
    pub(crate) fn reset_to(&mut self, base: StoredMembership) {
        let keep: Vec<_> = self.items.drain(..).filter(|m| m.log_id.index > base.log_id.index).collect();
        self.items.push(base);
        self.items.extend(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().map(|i| NodeId(*i)).collect()
    }

    #[test]
    fn quorum_value_is_the_majority_match() {
        let m = Membership::new([1, 2, 3].map(NodeId));
        let matched = |id: NodeId| LogIndex([0, 10, 7, 3][id.0 as usize]);
        assert_eq!(m.quorum_value(matched), LogIndex(7));
    }

    #[test]
    fn joint_quorum_needs_both_halves() {
        // Reference: Raft thesis §4.3, joint consensus.
        let m = Membership { voters: set(&[4, 5, 6]), outgoing: Some(set(&[1, 2, 3])), learners: set(&[]) };
        assert!(!m.is_quorum(|id| [1, 2, 3].contains(&id.0)));
        assert!(!m.is_quorum(|id| [4, 5, 6].contains(&id.0)));
        assert!(m.is_quorum(|id| [1, 2, 4, 5].contains(&id.0)));
        let matched = |id: NodeId| LogIndex([0, 9, 9, 9, 2, 2, 2][id.0 as usize]);
        assert_eq!(m.quorum_value(matched), LogIndex(2));
    }

    #[test]
    fn even_sized_configuration_needs_more_than_half() {
        let m = Membership::new([1, 2, 3, 4].map(NodeId));
        assert!(!m.is_quorum(|id| id.0 <= 2));
        assert!(m.is_quorum(|id| id.0 <= 3));
        let matched = |id: NodeId| LogIndex([0, 8, 6, 4, 2][id.0 as usize]);
        assert_eq!(m.quorum_value(matched), LogIndex(4));
    }

    #[test]
    fn membership_log_reverts_on_truncation() {
        let mut log = MembershipLog::new(StoredMembership::default());
        log.push(StoredMembership { log_id: LogId::new(1, 1), membership: Membership::new([NodeId(1)]) });
        log.push(StoredMembership { log_id: LogId::new(1, 5), membership: Membership::new([NodeId(1), NodeId(2)]) });
        log.truncate_from(LogIndex(5));
        assert_eq!(log.effective().log_id, LogId::new(1, 1));
        log.compact(LogIndex(3));
        assert_eq!(log.committed(LogIndex(3)).log_id, LogId::new(1, 1));
    }
}
