//! Shard merges: two adjacent shards, left `L = [a, b)` and right `R = [b, c)`, become one,
//! `L = [a, c)`, as a plan of phases kept in the replicated [`MetaState::merges`] (as replica
//! moves are kept in [`MetaState::moves`]): it survives restarts and changes of meta leader,
//! and every meta replica checks each phase change against the same map.
//!
//! The phases, and who moves the plan on:
//! 1. [`MetaCommand::BeginMerge`](crate::MetaCommand::BeginMerge) (the balancer, or an
//!    operator) records the plan in [`MergePhase::Freezing`] under a fresh [`MergeId`]; the
//!    map is unchanged. It is refused unless both shards are at the epochs the decision was
//!    made at, adjacent, on exactly the same nodes, all voters, and in no move or other merge.
//! 2. R's leader proposes a freeze entry in R's log (R serves nothing more after it). Once R
//!    applied it and every R voter holds it, R's leader sends
//!    [`MetaCommand::CommitMerge`](crate::MetaCommand::CommitMerge) with the entry's position:
//!    the map changes at once (L covers `[a, c)` at a higher version, R is gone) and the plan
//!    goes to [`MergePhase::Committed`], which keeps R's range and the freeze position, since R
//!    has left the map. A committed merge is never undone.
//! 3. L's leader absorbs R (R's data up to the freeze entry, held by every L replica since
//!    both have the same nodes) and sends
//!    [`MetaCommand::FinishMerge`](crate::MetaCommand::FinishMerge): the plan is dropped.
//!
//! Instead of 2, while the plan is still freezing,
//! [`MetaCommand::AbortMerge`](crate::MetaCommand::AbortMerge) (the balancer, for a freeze that
//! takes longer than its timeout; or R's leader, when it cannot freeze) moves it to
//! [`MergePhase::Aborted`]; R's leader thaws R and sends `FinishMerge`, which drops the plan.
//! CommitMerge and AbortMerge are both checked against the phase `Freezing`, so whichever the
//! meta log orders first wins and the other is refused.
//!
//! While a shard takes part in a plan (as left or right, any phase), every command that changes
//! its replicas or range is refused with [`MetaError::MergeInProgress`]: splits, learners,
//! promotions, removals, voter swaps and move starts. Leader transfers and heartbeats go on.
//! Unsafe recovery ([`MetaCommand::RemoveDeadNodes`](crate::MetaCommand::RemoveDeadNodes)) is
//! the exception, and it aborts every freezing plan with a shard that had a replica on a dead
//! node: the replicas change under the plan, and a forced R may have lost its freeze entry, so
//! a late CommitMerge sent before the recovery must not commit it. A committed plan stays
//! committed (the map already merged); L's replicas are rebuilt like any shard's.

use crate::map::{Epoch, NodeId, ReplicaRole, ShardDescriptor, ShardId};
use crate::meta::{LogIndex, MetaError, MetaOutcome, MetaState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A merge's id: allocated from the same counter as shard ids ([`MetaState::next_shard_id`]),
/// so ids are unique (never reused, never a shard's) and grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MergeId(pub u64);

impl std::fmt::Display for MergeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "merge-{}", self.0)
    }
}

/// Where a merge is (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MergePhase {
    /// Recorded; R's leader freezes R. The map is unchanged.
    Freezing,
    /// The map merged: L covers R's range, R is gone. L's leader absorbs R.
    Committed {
        /// The term of R's freeze entry.
        freeze_term: u64,
        /// The index of R's freeze entry: R's data up to and including it is what L absorbs.
        freeze_index: LogIndex,
        /// First key of R's range (L's end before the merge): R has left the map, so the node
        /// learns which data to absorb here.
        right_range_start: Vec<u8>,
        /// First key after R's range (`None`: the end of the keyspace); L's end now.
        right_range_end: Option<Vec<u8>>,
        /// R's voters when the merge committed: every node of L's configuration must be one of
        /// them (each then holds R's frozen data). Kept here because the map's L may change
        /// afterwards (an unsafe recovery) while L's log still holds the merge to apply.
        voters: BTreeSet<NodeId>,
    },
    /// Given up before committing: the map is unchanged, and R's leader thaws R.
    Aborted,
}

/// A merge of `right` into `left`, its left neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergePlan {
    /// The plan's id: commands naming another id are duplicates or late, and are refused.
    pub id: MergeId,
    /// The shard that stays and grows (its key in [`MetaState::merges`]).
    pub left: ShardId,
    /// The shard that goes (its range follows `left`'s).
    pub right: ShardId,
    /// Where the merge is.
    pub phase: MergePhase,
    /// When the proposer decided the merge: a freeze that takes too long is aborted by the
    /// balancer.
    pub started_ms: u64,
}

impl MergePlan {
    /// Whether `shard` takes part (as left or right).
    pub fn involves(&self, shard: ShardId) -> bool {
        self.left == shard || self.right == shard
    }
}

impl MetaState {
    /// The merge plan `shard` takes part in, as left or right, in any phase.
    pub fn merge_of(&self, shard: ShardId) -> Option<&MergePlan> {
        if let Some(p) = self.merges.get(&shard) {
            return Some(p);
        }
        self.merges.values().find(|p| p.right == shard)
    }

    /// Refuses a change of `shard`'s replicas or range while it takes part in a merge.
    pub(crate) fn check_no_merge(&self, shard: ShardId) -> Result<(), MetaError> {
        match self.merge_of(shard) {
            Some(_) => Err(MetaError::MergeInProgress(shard)),
            None => Ok(()),
        }
    }

    /// [`MetaCommand::BeginMerge`](crate::MetaCommand::BeginMerge).
    pub(crate) fn begin_merge(
        &mut self,
        (left, left_epoch): (ShardId, Epoch),
        (right, right_epoch): (ShardId, Epoch),
        now_ms: u64,
    ) -> Result<MetaOutcome, MetaError> {
        let invalid = |reason: &str| Err(MetaError::InvalidMerge { left, right, reason: reason.into() });
        if left == right {
            return invalid("a shard cannot merge with itself");
        }
        let l = self.current(left, left_epoch)?;
        let r = self.current(right, right_epoch)?;
        if l.end.as_deref() != Some(r.start.as_slice()) {
            return invalid("the right shard's range does not start where the left one's ends");
        }
        for shard in [left, right] {
            if self.moves.contains_key(&shard) {
                return Err(MetaError::MoveInProgress(shard));
            }
            self.check_no_merge(shard)?;
        }
        if !all_voters(l) || !all_voters(r) {
            return invalid("both shards must have voters only (no learner)");
        }
        if nodes(l) != nodes(r) {
            return invalid("both shards must have their replicas on the same nodes");
        }
        // A replica removed from either shard and not deleted yet would outlive the merge (a
        // shard out of the map is nobody's to clean up) and keep its keys from the merged one.
        if self.tombstones.contains_key(&left) || self.tombstones.contains_key(&right) {
            return invalid("a replica removed from one of the shards is not deleted yet: retry once it is");
        }
        let id = MergeId(self.next_shard_id.max(1));
        self.next_shard_id = id.0 + 1;
        let plan = MergePlan { id, left, right, phase: MergePhase::Freezing, started_ms: now_ms };
        self.merges.insert(left, plan.clone());
        Ok(MetaOutcome::Merge(plan))
    }

    /// [`MetaCommand::CommitMerge`](crate::MetaCommand::CommitMerge).
    pub(crate) fn commit_merge(
        &mut self,
        left: ShardId,
        id: MergeId,
        freeze_term: u64,
        freeze_index: LogIndex,
    ) -> Result<MetaOutcome, MetaError> {
        let plan = self.plan(left, id)?;
        if plan.phase != MergePhase::Freezing {
            return Err(MetaError::MergePhaseMismatch { left, id, phase: plan.phase.clone() });
        }
        let right = plan.right;
        let l = self.map.get(left).ok_or(MetaError::UnknownShard(left))?;
        let r = self.map.get(right).ok_or(MetaError::UnknownShard(right))?;
        // Both hold while the plan freezes (replica changes are refused, and an unsafe recovery
        // aborts the plan), but the map is about to change for good: checked, not assumed.
        if l.end.as_deref() != Some(r.start.as_slice()) || nodes(l) != nodes(r) || !all_voters(l) || !all_voters(r) {
            let reason = "the shards are no longer adjacent on the same voters".into();
            return Err(MetaError::InvalidMerge { left, right, reason });
        }
        // Every replica of R must have applied the freeze, as its node last reported (reports
        // are the meta leader's, overlaid before the command runs): once L absorbs R on some
        // node, R's replicas elsewhere may lose their leader, and one that holds the freeze
        // without having applied it could only learn it committed from L's merge entry, which
        // a replica of L catching up by snapshot never applies.
        let lagging: Vec<NodeId> = r
            .voters()
            .filter(|n| self.nodes.get(n).and_then(|i| i.report.applied.get(&right)).is_none_or(|a| *a < freeze_index))
            .collect();
        if !lagging.is_empty() {
            let reason = format!("waiting for nodes {lagging:?} to report the freeze at {} applied", freeze_index.0);
            return Err(MetaError::InvalidMerge { left, right, reason });
        }
        let right_voters: BTreeSet<NodeId> = r.voters().collect();
        // Past the sum of both shards' epochs: copies of the map are told apart by the sum of
        // their shards' epochs (clients keep the later one), and the merge must raise it even
        // though a shard leaves.
        let version =
            l.epoch.version.saturating_add(r.epoch.version).saturating_add(r.epoch.conf_version).saturating_add(1);
        let r = self.map.remove_unchecked(right).expect("checked above");
        let l = self.map.get_mut(left).expect("checked above");
        l.end = r.end.clone();
        l.epoch.version = version;
        let merged = l.clone();
        debug_assert!(self.map.validate().is_ok(), "a merge of adjacent shards keeps the map covering");
        self.transfers.remove(&right);
        self.tombstones.remove(&right);
        // The reports described the old ranges: L's size alone would invite another merge at
        // once. Unknown until the next heartbeats instead (as after a split).
        for info in self.nodes.values_mut() {
            for shard in [left, right] {
                crate::meta::forget_shard(&mut info.report, shard);
            }
        }
        let plan = self.merges.get_mut(&left).expect("checked above");
        plan.phase = MergePhase::Committed {
            freeze_term,
            freeze_index,
            right_range_start: r.start,
            right_range_end: r.end,
            voters: right_voters,
        };
        Ok(MetaOutcome::Shards(vec![merged]))
    }

    /// [`MetaCommand::AbortMerge`](crate::MetaCommand::AbortMerge).
    pub(crate) fn abort_merge(&mut self, left: ShardId, id: MergeId) -> Result<MetaOutcome, MetaError> {
        let plan = self.plan(left, id)?;
        if plan.phase != MergePhase::Freezing {
            return Err(MetaError::MergePhaseMismatch { left, id, phase: plan.phase.clone() });
        }
        if let Some(p) = self.merges.get_mut(&left) {
            p.phase = MergePhase::Aborted;
        }
        Ok(MetaOutcome::Done)
    }

    /// [`MetaCommand::FinishMerge`](crate::MetaCommand::FinishMerge).
    pub(crate) fn finish_merge(&mut self, left: ShardId, id: MergeId) -> Result<MetaOutcome, MetaError> {
        let plan = self.plan(left, id)?;
        if plan.phase == MergePhase::Freezing {
            return Err(MetaError::MergePhaseMismatch { left, id, phase: plan.phase.clone() });
        }
        self.merges.remove(&left);
        Ok(MetaOutcome::Done)
    }

    /// The plan of `left`, if it has id `id`.
    fn plan(&self, left: ShardId, id: MergeId) -> Result<&MergePlan, MetaError> {
        let plan = self.merges.get(&left).ok_or(MetaError::NoMerge(left))?;
        if plan.id != id {
            return Err(MetaError::MergeMismatch { left, given: id, current: plan.id });
        }
        Ok(plan)
    }

    /// Unsafe recovery changed the replicas of `touched`: every freezing plan with one of them
    /// is aborted (see the module docs).
    pub(crate) fn abort_merges_of(&mut self, touched: &BTreeSet<ShardId>) {
        for p in self.merges.values_mut() {
            if p.phase == MergePhase::Freezing && (touched.contains(&p.left) || touched.contains(&p.right)) {
                p.phase = MergePhase::Aborted;
            }
        }
    }

    /// Checks that the merge plans fit the map: each is filed under its left shard, which is
    /// in the map; a freezing or aborted plan's right shard is in the map and starts where the
    /// left one ends; a committed plan's right shard is gone and its range is the end of the
    /// left one's; no shard is in two plans or has a move; ids are unique, below the id counter
    /// and no shard's.
    pub(crate) fn validate_merges(&self) -> Result<(), String> {
        let mut seen: BTreeSet<ShardId> = BTreeSet::new();
        let mut ids: BTreeSet<MergeId> = BTreeSet::new();
        for (key, p) in &self.merges {
            let bad = |what: &str| Err(format!("merge {} of shards {} and {}: {what}", p.id, p.left, p.right));
            if *key != p.left || p.left == p.right {
                return bad("not filed under its left shard");
            }
            if !seen.insert(p.left) || !seen.insert(p.right) {
                return bad("a shard takes part in two merges");
            }
            if !ids.insert(p.id) || p.id.0 >= self.next_shard_id.max(1) || self.map.get(ShardId(p.id.0)).is_some() {
                return bad("its id is not unique");
            }
            if self.moves.contains_key(&p.left) || self.moves.contains_key(&p.right) {
                return bad("a shard in it has a replica move");
            }
            let Some(l) = self.map.get(p.left) else { return bad("the left shard is not in the map") };
            match &p.phase {
                MergePhase::Freezing | MergePhase::Aborted => {
                    let Some(r) = self.map.get(p.right) else { return bad("the right shard is not in the map") };
                    if l.end.as_deref() != Some(r.start.as_slice()) {
                        return bad("the shards are not adjacent");
                    }
                }
                MergePhase::Committed { right_range_start, right_range_end, .. } => {
                    if self.map.get(p.right).is_some() {
                        return bad("committed, but the right shard is still in the map");
                    }
                    if l.end != *right_range_end
                        || right_range_start.as_slice() <= l.start.as_slice()
                        || !l.contains(right_range_start)
                    {
                        return bad("the right shard's range is not the end of the left one's");
                    }
                }
            }
        }
        Ok(())
    }
}

fn all_voters(d: &ShardDescriptor) -> bool {
    d.replicas.iter().all(|r| r.role == ReplicaRole::Voter)
}

fn nodes(d: &ShardDescriptor) -> BTreeSet<crate::map::NodeId> {
    d.replicas.iter().map(|r| r.node).collect()
}
