//! The map's side of unsafe recovery (`flotilla admin unsafe-recover`): nodes lost for good
//! are removed for good, and every shard that had a replica on them gets replicas on live
//! nodes again, so that the reconcilers bring it back to full replication by the ordinary
//! path (the shard's leader adds the new replicas as learners, they catch up, the leader
//! promotes them by joint consensus). Nothing here forces a group: the operator's tool
//! forced each group that lost its quorum onto one surviving replica, and names it here.

use crate::map::{NodeId, Replica, ReplicaRole, ShardId};
use crate::meta::{MetaError, MetaOutcome, MetaState};
use std::collections::{BTreeMap, BTreeSet};

impl MetaState {
    /// The work of [`MetaCommand::RemoveDeadNodes`](crate::MetaCommand::RemoveDeadNodes):
    /// `dead` leave the cluster for good; every shard that has a replica on a dead node gets
    /// voters on live nodes up to the number of voters it had, the fewest loaded nodes first,
    /// and if it is in `kept` it first keeps only the replica on its node (the group was
    /// forced onto it). Idempotent: a shard that no longer names a dead node is left as it
    /// is, so applying the same command again changes nothing. A freezing merge of a shard that
    /// has a replica on a dead node is aborted. Returns the shards changed.
    pub(crate) fn remove_dead_nodes(
        &mut self,
        dead: &[NodeId],
        kept: &[(ShardId, NodeId)],
    ) -> Result<MetaOutcome, MetaError> {
        let dead: BTreeSet<NodeId> = dead.iter().copied().collect();
        if dead.is_empty() {
            return Err(MetaError::InvalidRecovery("no dead node named".into()));
        }
        let kept: BTreeMap<ShardId, NodeId> = kept.iter().copied().collect();
        for (shard, node) in &kept {
            if dead.contains(node) {
                return Err(MetaError::InvalidRecovery(format!("shard {shard} cannot be kept on dead node {node}")));
            }
            if self.map.get(*shard).is_none() {
                return Err(MetaError::UnknownShard(*shard));
            }
        }
        self.removed.extend(dead.iter().copied());
        self.nodes.retain(|n, _| !dead.contains(n));
        self.transfers.retain(|_, n| !dead.contains(n));
        for ts in self.tombstones.values_mut() {
            ts.retain(|n, _| !dead.contains(n));
        }
        self.tombstones.retain(|_, ts| !ts.is_empty());
        let mut load: BTreeMap<NodeId, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for d in self.map.shards() {
            for r in &d.replicas {
                if let Some(c) = load.get_mut(&r.node) {
                    *c += 1;
                }
            }
        }
        // Only shards that still name a dead node: a shard this command already rebuilt (a
        // re-run of the tool, or a client's retry of a request that did commit) keeps the live
        // voters it got then, instead of being cut back to its survivor alone.
        let touched: Vec<ShardId> =
            self.map.shards().filter(|d| d.replicas.iter().any(|r| dead.contains(&r.node))).map(|d| d.id).collect();
        // The replicas of a freezing merge change under it: given up (see `merge.rs`).
        self.abort_merges_of(&touched.iter().copied().collect());
        let mut changed = Vec::new();
        for shard in touched {
            let Some(d) = self.map.get(shard).cloned() else { continue };
            let wanted = d.voters().count();
            let mut replicas: Vec<Replica> = match kept.get(&shard) {
                Some(survivor) => vec![Replica { node: *survivor, role: ReplicaRole::Voter }],
                None => d.replicas.iter().filter(|r| !dead.contains(&r.node)).copied().collect(),
            };
            // A move that lost a node, or of a forced shard, cannot finish: its learner (if
            // any) goes with it.
            let broken = self
                .moves
                .get(&shard)
                .is_some_and(|p| kept.contains_key(&shard) || dead.contains(&p.from) || dead.contains(&p.to));
            if broken {
                if let Some(p) = self.moves.remove(&shard) {
                    replicas.retain(|r| !(r.node == p.to && r.role == ReplicaRole::Learner));
                }
            }
            if !replicas.iter().any(|r| r.role == ReplicaRole::Voter) {
                // No survivor named and none left: nothing to rebuild the shard from.
                continue;
            }
            // The dead, and the other survivors of a forced shard (its live replicas other than
            // the kept one, while it still names a dead node): they hold a log the kept one may
            // contradict, are dropped by the operator's tool and get no replica of it here.
            let excluded: BTreeSet<NodeId> = d.replicas.iter().map(|r| r.node).collect();
            while replicas.iter().filter(|r| r.role == ReplicaRole::Voter).count() < wanted {
                let pick = load
                    .iter()
                    .filter(|(n, _)| !excluded.contains(n) && !replicas.iter().any(|r| r.node == **n))
                    .filter(|(n, _)| self.nodes.get(n).is_some_and(|i| !i.draining))
                    .min_by_key(|(n, c)| (**c, **n))
                    .map(|(n, _)| *n);
                let Some(node) = pick else { break };
                replicas.push(Replica { node, role: ReplicaRole::Voter });
                *load.entry(node).or_default() += 1;
            }
            if let MetaOutcome::Shards(ds) = self.change(shard, |d| d.replicas = replicas)? {
                changed.extend(ds);
            }
        }
        Ok(MetaOutcome::Shards(changed))
    }
}

#[cfg(test)]
mod tests {
    use crate::{MetaCommand, MetaError, MetaOutcome, MetaState, MovePlan, MoveStep, NodeId, ReplicaRole, ShardId};

    fn n(id: u64) -> NodeId {
        NodeId(id)
    }

    /// Nodes 1 to 5; shards 1 `[.., "m")` and 2 `["m", ..)` on voters 1, 2, 3.
    fn state() -> MetaState {
        let mut s = MetaState::default();
        for i in 1..=5 {
            s.apply(MetaCommand::RegisterNode { node: n(i), addr: format!("127.0.0.1:{}", 7000 + i) }).unwrap();
        }
        s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).unwrap();
        let d = s.map.lookup(b"m").unwrap().clone();
        s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: b"m".to_vec() }).unwrap();
        s
    }

    fn voters(s: &MetaState, shard: u64) -> Vec<u64> {
        s.map.get(ShardId(shard)).unwrap().voters().map(|v| v.0).collect()
    }

    #[test]
    fn forced_shards_keep_their_survivor_and_get_voters_on_live_nodes() {
        let mut s = state();
        let before = s.map.get(ShardId(1)).unwrap().epoch;
        let kept = vec![(ShardId(1), n(1)), (ShardId(2), n(1))];
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(2), n(3)], kept }).unwrap();
        assert_eq!(voters(&s, 1), vec![1, 4, 5]);
        assert_eq!(voters(&s, 2), vec![1, 4, 5]);
        assert!(s.map.get(ShardId(1)).unwrap().epoch.conf_version > before.conf_version, "routing sees the change");
        assert_eq!(s.removed.iter().map(|n| n.0).collect::<Vec<_>>(), vec![2, 3]);
        assert!(!s.nodes.contains_key(&n(2)) && !s.nodes.contains_key(&n(3)));
        let again = s.apply(MetaCommand::RegisterNode { node: n(2), addr: "127.0.0.1:1".into() });
        assert_eq!(again, Err(MetaError::NodeRemoved(n(2))), "a dead node never comes back under its id");
    }

    #[test]
    fn applied_twice_the_second_changes_nothing() {
        // A re-run of the tool, or a client retrying a request that committed after all.
        let mut s = state();
        let kept = vec![(ShardId(1), n(1)), (ShardId(2), n(1))];
        let cmd = MetaCommand::RemoveDeadNodes { dead: vec![n(2), n(3)], kept };
        s.apply(cmd.clone()).unwrap();
        let once = s.clone();
        assert_eq!(voters(&s, 1), vec![1, 4, 5]);
        assert_eq!(s.apply(cmd), Ok(MetaOutcome::Shards(vec![])));
        assert_eq!(s, once, "the live voters the first added are kept");
        assert_eq!(voters(&s, 1), vec![1, 4, 5]);
        assert_eq!(voters(&s, 2), vec![1, 4, 5]);
        // Unforced shards too.
        let mut s = state();
        let cmd = MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![] };
        s.apply(cmd.clone()).unwrap();
        let once = s.clone();
        s.apply(cmd).unwrap();
        assert_eq!(s, once);
    }

    #[test]
    fn a_shard_with_its_quorum_left_only_replaces_its_dead_replica() {
        let mut s = state();
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![] }).unwrap();
        // Nodes 4 and 5 carry nothing; the lower id first, then the other for the next shard.
        assert_eq!(voters(&s, 1), vec![1, 2, 4]);
        assert_eq!(voters(&s, 2), vec![1, 2, 5]);
        assert!(s.map.shards().all(|d| d.replicas.iter().all(|r| r.role == ReplicaRole::Voter)));
    }

    #[test]
    fn other_survivors_of_a_forced_shard_get_no_replica_of_it() {
        let mut s = state();
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![(ShardId(1), n(1))] }).unwrap();
        // Node 2 survived too, with a log the kept replica may contradict.
        assert_eq!(voters(&s, 1), vec![1, 4, 5]);
    }

    #[test]
    fn a_recovery_that_does_not_fit_changes_nothing() {
        let mut s = state();
        let before = s.clone();
        let bad = MetaCommand::RemoveDeadNodes { dead: vec![n(2), n(3)], kept: vec![(ShardId(1), n(2))] };
        assert!(matches!(s.apply(bad), Err(MetaError::InvalidRecovery(_))));
        assert!(matches!(
            s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(2)], kept: vec![(ShardId(9), n(1))] }),
            Err(MetaError::UnknownShard(_))
        ));
        assert!(s.apply(MetaCommand::RemoveDeadNodes { dead: vec![], kept: vec![] }).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn a_state_serialized_before_removed_nodes_existed_restores_with_none() {
        let mut s = state();
        s.bootstrap = None;
        let mut bytes = s.snapshot().unwrap();
        // The newest fields, last: an empty set, no backup, no merges and no bootstrap record,
        // one zero byte each.
        assert_eq!(bytes.split_off(bytes.len() - 4), [0, 0, 0, 0]);
        assert_eq!(MetaState::restore(&bytes).unwrap(), s);
    }

    #[test]
    fn a_state_serialized_before_the_bootstrap_record_existed_restores_without_one() {
        let s = state();
        assert!(s.bootstrap.as_ref().is_some_and(|b| b.voters.len() == 3 && b.formed.is_empty()));
        let mut without = s.clone();
        without.bootstrap = None;
        let mut bytes = without.snapshot().unwrap();
        assert_eq!(bytes.split_off(bytes.len() - 1), [0]);
        assert_eq!(MetaState::restore(&bytes).unwrap(), without);
        // And the record itself round-trips, nodes that formed theirs included.
        let mut formed = s.clone();
        formed.apply(MetaCommand::BootstrapFormed { node: n(2) }).unwrap();
        assert!(formed.bootstrap.as_ref().is_some_and(|b| b.formed.contains(&n(2))));
        assert_eq!(MetaState::restore(&formed.snapshot().unwrap()).unwrap(), formed);
        // Nothing to record in a cluster bootstrapped before the record.
        let mut old = without.clone();
        old.apply(MetaCommand::BootstrapFormed { node: n(2) }).unwrap();
        assert_eq!(old, without);
    }

    fn epoch(s: &MetaState, shard: u64) -> crate::Epoch {
        s.map.get(ShardId(shard)).unwrap().epoch
    }

    fn learners(s: &MetaState, shard: u64) -> Vec<u64> {
        let d = s.map.get(ShardId(shard)).unwrap();
        d.replicas.iter().filter(|r| r.role == ReplicaRole::Learner).map(|r| r.node.0).collect()
    }

    #[test]
    fn transfers_and_tombstones_of_dead_nodes_go_and_those_of_live_nodes_stay() {
        let mut s = state();
        s.apply(MetaCommand::TransferLeader { shard: ShardId(1), epoch: epoch(&s, 1), node: n(3) }).unwrap();
        s.apply(MetaCommand::TransferLeader { shard: ShardId(2), epoch: epoch(&s, 2), node: n(2) }).unwrap();
        // A removed replica on live node 5 (shard 1) and one on node 3, about to die (shard 2).
        s.apply(MetaCommand::AddLearner { shard: ShardId(1), epoch: epoch(&s, 1), node: n(5) }).unwrap();
        s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: epoch(&s, 1), node: n(5) }).unwrap();
        s.apply(MetaCommand::RemoveReplica { shard: ShardId(2), epoch: epoch(&s, 2), node: n(3) }).unwrap();
        assert_eq!(s.tombstones.len(), 2);
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![] }).unwrap();
        assert_eq!(s.transfers.iter().map(|(sh, n)| (sh.0, n.0)).collect::<Vec<_>>(), vec![(2, 2)]);
        let tombs: Vec<(u64, Vec<u64>)> =
            s.tombstones.iter().map(|(sh, ts)| (sh.0, ts.keys().map(|n| n.0).collect())).collect();
        assert_eq!(
            tombs,
            vec![(1, vec![5])],
            "node 5 may still hold its removed replica: it keeps the permission to delete it"
        );
    }

    #[test]
    fn new_voters_go_to_the_live_nodes_holding_the_fewest_replicas() {
        let mut s = state();
        // Node 4 holds a learner of shard 2; node 5 holds nothing.
        s.apply(MetaCommand::AddLearner { shard: ShardId(2), epoch: epoch(&s, 2), node: n(4) }).unwrap();
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![] }).unwrap();
        assert_eq!(voters(&s, 1), vec![1, 2, 5]);
        assert_eq!(voters(&s, 2), vec![1, 2, 5]);
        assert_eq!(learners(&s, 2), vec![4]);
    }

    #[test]
    fn a_move_that_lost_its_source_is_dropped_with_its_learner() {
        let mut s = state();
        let plan = MovePlan::new(ShardId(1), n(3), n(4), None, 10);
        s.apply(MetaCommand::StartMove { epoch: epoch(&s, 1), plan, now_ms: 0 }).unwrap();
        s.apply(MetaCommand::AdvanceMove { shard: ShardId(1), step: MoveStep::AddLearner }).unwrap();
        assert_eq!(learners(&s, 1), vec![4]);
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![] }).unwrap();
        assert!(s.moves.is_empty());
        assert_eq!(voters(&s, 1), vec![1, 2, 5], "node 4 held the move's learner: it gets no voter");
        assert!(learners(&s, 1).is_empty());
        s.map.validate().unwrap();
    }

    #[test]
    fn a_forced_shard_drops_its_move() {
        let mut s = state();
        let plan = MovePlan::new(ShardId(1), n(1), n(4), None, 10);
        s.apply(MetaCommand::StartMove { epoch: epoch(&s, 1), plan, now_ms: 0 }).unwrap();
        s.apply(MetaCommand::AdvanceMove { shard: ShardId(1), step: MoveStep::AddLearner }).unwrap();
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(2), n(3)], kept: vec![(ShardId(1), n(1))] }).unwrap();
        assert!(s.moves.is_empty(), "the forced group is on node 1 alone: the move cannot go on");
        assert_eq!(voters(&s, 1), vec![1, 5]);
        assert!(learners(&s, 1).is_empty());
    }

    #[test]
    fn a_swapped_move_whose_source_died_keeps_the_targets_vote() {
        // The move 3 -> 4 swapped in the map (4 votes, 3 is a learner), waiting to remove 3.
        let mut s = state();
        s.apply(MetaCommand::AddLearner { shard: ShardId(1), epoch: epoch(&s, 1), node: n(4) }).unwrap();
        let e = epoch(&s, 1);
        s.apply(MetaCommand::SwapVoter { shard: ShardId(1), epoch: e, promote: n(4), demote: n(3) }).unwrap();
        let mut plan = MovePlan::new(ShardId(1), n(3), n(4), None, 10);
        plan.step = MoveStep::RemoveOld;
        s.moves.insert(ShardId(1), plan);
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![] }).unwrap();
        assert!(s.moves.is_empty());
        assert_eq!(voters(&s, 1), vec![1, 2, 4], "the group may already count 4's vote");
        assert!(learners(&s, 1).is_empty());
    }

    #[test]
    fn other_survivors_of_a_forced_shard_get_no_replica_even_when_live_nodes_run_short() {
        let mut s = state();
        s.apply(MetaCommand::SetDraining { node: n(5), draining: true }).unwrap();
        s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![(ShardId(1), n(1))] }).unwrap();
        // Node 4 is the only live node that may take a replica: shard 1 gets one voter short
        // rather than one on node 2, whose log the kept replica may contradict.
        assert_eq!(voters(&s, 1), vec![1, 4]);
        s.map.validate().unwrap();
    }
}
