//! Which groups unsafe recovery forces, and onto which replica: a pure function of the dead
//! nodes and the replicas' states as the live nodes reported them.

use crate::placement::{NodeId, ShardId};
use crate::raft::Membership;
use crate::wire::ReplicaState;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A replica's log position: (term, index) of its last entry, compared term first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogPosition {
    /// Term of the last entry.
    pub term: u64,
    /// Index of the last entry.
    pub index: u64,
}

/// The decision for one group that lost its quorum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forced {
    /// The group (0: the meta group).
    pub shard: ShardId,
    /// The replica kept: the most up-to-date survivor.
    pub survivor: NodeId,
    /// Its last log position: everything up to `kept.index` is kept; entries after it, which
    /// only the dead nodes may have had, are lost.
    pub kept: LogPosition,
    /// The other survivors (dropped) and their last log positions.
    pub others: Vec<(NodeId, LogPosition)>,
    /// The dead voters of the configuration judged.
    pub dead_voters: Vec<NodeId>,
}

/// What unsafe recovery does with each group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Groups that lost their quorum, each forced onto one survivor.
    pub forced: Vec<Forced>,
    /// Groups with no surviving replica that holds a configuration: nothing to rebuild from.
    pub lost: Vec<ShardId>,
}

/// Decides, for every group with a replica in `replicas`: a group is forced when the nodes of
/// `dead` hold a majority of the voters (of either half of a joint configuration) of the
/// configuration of its most up-to-date surviving replica; it is then kept on that replica
/// (the highest last log position; ties go to the higher commit index, then to a voter,
/// then to the lower node id). `replicas` of dead nodes are ignored. Groups whose quorum
/// survives are not forced: the map replaces their dead replicas by the normal path.
/// `expected` lists groups known to exist (the map's shards): one without any surviving
/// replica is reported lost.
pub fn decide(dead: &BTreeSet<NodeId>, replicas: &[ReplicaState], expected: &[ShardId]) -> Plan {
    let mut by_group: BTreeMap<ShardId, Vec<&ReplicaState>> = expected.iter().map(|s| (*s, Vec::new())).collect();
    for r in replicas.iter().filter(|r| !dead.contains(&r.node)) {
        by_group.entry(r.shard).or_default().push(r);
    }
    let mut plan = Plan::default();
    for (shard, survivors) in by_group {
        // A replica without a configuration (created empty, never reached) holds nothing.
        let mut candidates: Vec<&ReplicaState> =
            survivors.iter().copied().filter(|r| membership_of(r).contains(r.node)).collect();
        candidates.sort_by_key(|r| {
            let voter = membership_of(r).is_voter(r.node);
            (std::cmp::Reverse(position(r)), std::cmp::Reverse(r.committed), !voter, r.node)
        });
        let Some(best) = candidates.first() else {
            plan.lost.push(shard);
            continue;
        };
        let m = membership_of(best);
        if m.is_quorum(|n| !dead.contains(&n)) {
            continue;
        }
        let mut dead_voters: Vec<NodeId> = m.voters.iter().copied().filter(|v| dead.contains(v)).collect();
        for v in m.outgoing.iter().flatten().filter(|v| dead.contains(v)) {
            if !dead_voters.contains(v) {
                dead_voters.push(*v);
            }
        }
        dead_voters.sort();
        let others = survivors.iter().filter(|r| r.node != best.node).map(|r| (r.node, position(r))).collect();
        plan.forced.push(Forced { shard, survivor: best.node, kept: position(best), others, dead_voters });
    }
    plan
}

fn position(r: &ReplicaState) -> LogPosition {
    LogPosition { term: r.last_term, index: r.last_index }
}

fn membership_of(r: &ReplicaState) -> Membership {
    Membership {
        voters: r.voters.iter().copied().collect(),
        outgoing: r.outgoing.as_ref().map(|o| o.iter().copied().collect()),
        learners: r.learners.iter().copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId(id)
    }

    fn set(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().map(|i| n(*i)).collect()
    }

    fn replica(shard: u64, node: u64, voters: &[u64], last: (u64, u64)) -> ReplicaState {
        ReplicaState {
            shard: ShardId(shard),
            node: n(node),
            voters: voters.iter().map(|v| n(*v)).collect(),
            outgoing: None,
            learners: Vec::new(),
            last_term: last.0,
            last_index: last.1,
            committed: last.1,
            applied: last.1,
            leader: None,
        }
    }

    #[test]
    fn a_group_that_lost_a_majority_is_forced_onto_its_survivor() {
        let rs = [replica(1, 1, &[1, 2, 3], (2, 10))];
        let plan = decide(&set(&[2, 3]), &rs, &[ShardId(1)]);
        assert_eq!(plan.forced.len(), 1);
        let f = &plan.forced[0];
        assert_eq!((f.shard, f.survivor, f.kept), (ShardId(1), n(1), LogPosition { term: 2, index: 10 }));
        assert_eq!(f.dead_voters, vec![n(2), n(3)]);
        assert!(plan.lost.is_empty());
    }

    #[test]
    fn a_group_with_its_quorum_left_is_not_forced() {
        let rs = [replica(1, 1, &[1, 2, 3], (2, 10)), replica(1, 2, &[1, 2, 3], (2, 9))];
        assert_eq!(decide(&set(&[3]), &rs, &[ShardId(1)]), Plan::default());
        // Two of five lost: three voters left, still a majority.
        let rs = [replica(2, 1, &[1, 2, 3, 4, 5], (1, 4))];
        assert!(decide(&set(&[2, 3]), &rs, &[]).forced.is_empty());
    }

    #[test]
    fn the_most_up_to_date_survivor_is_kept_term_first() {
        let rs = [
            replica(1, 3, &[1, 2, 3, 4, 5], (3, 7)),
            replica(1, 4, &[1, 2, 3, 4, 5], (2, 12)),
            replica(1, 5, &[1, 2, 3, 4, 5], (3, 6)),
        ];
        let plan = decide(&set(&[1, 2, 4]), &rs, &[]);
        assert_eq!(plan.forced[0].survivor, n(3), "node 4 is dead; of the others (3,7) beats (3,6)");
        let plan = decide(&set(&[1, 2, 5]), &rs, &[]);
        assert_eq!(plan.forced[0].survivor, n(3), "a higher term beats a longer log of an older term");
        assert_eq!(plan.forced[0].others, vec![(n(4), LogPosition { term: 2, index: 12 })]);
    }

    #[test]
    fn ties_go_to_the_higher_commit_index_then_the_lower_node() {
        let mut a = replica(1, 4, &[1, 2, 3, 4, 5], (2, 9));
        let b = replica(1, 5, &[1, 2, 3, 4, 5], (2, 9));
        a.committed = 5;
        let plan = decide(&set(&[1, 2, 3]), &[a.clone(), b.clone()], &[]);
        assert_eq!(plan.forced[0].survivor, n(5), "the same log: the one that knows more committed");
        a.committed = b.committed;
        let plan = decide(&set(&[1, 2, 3]), &[b, a], &[]);
        assert_eq!(plan.forced[0].survivor, n(4), "all equal: the lower id, whatever the order reported");
    }

    #[test]
    fn a_joint_configuration_is_lost_when_either_half_is() {
        let mut r = replica(1, 1, &[1, 4, 5], (2, 10));
        r.outgoing = Some(vec![n(1), n(2), n(3)]);
        // The incoming half keeps 1, 4, 5 but the outgoing half lost 2 and 3.
        let plan = decide(&set(&[2, 3]), &[r.clone()], &[]);
        assert_eq!(plan.forced[0].dead_voters, vec![n(2), n(3)]);
        // Only 3 dead: both halves keep a majority.
        assert!(decide(&set(&[3]), &[r], &[]).forced.is_empty());
    }

    #[test]
    fn a_group_without_a_configured_survivor_is_lost() {
        // Node 4 holds an empty replica (no configuration yet); the others are dead.
        let mut empty = replica(1, 4, &[], (0, 0));
        empty.voters.clear();
        let plan = decide(&set(&[1, 2, 3]), &[empty], &[ShardId(1), ShardId(2)]);
        assert_eq!(plan.lost, vec![ShardId(1), ShardId(2)]);
        assert!(plan.forced.is_empty());
    }
}
