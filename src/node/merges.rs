//! The node's part in merges (the plan lives in the meta state, `placement::merge`; what the
//! shards do is `flotilla_shard::merge`). Every reconciler round, for each plan in the view:
//! - **Freezing**, on the right shard's leader: propose the freeze; once it applied and every
//!   voter's log holds it (the leader's matched indexes), tell the meta group to commit the
//!   merge; if that does not happen within `merge_freeze_timeout_ms`, abort it instead.
//! - **Committed**, on the left shard's leader: propose the merge entry (the freeze's position,
//!   the right shard's range and the voters), then tell the meta group the plan is finished.
//! - **Aborted**, on the right shard's leader: propose the thaw (always, even if the shard
//!   looks thawed: a freeze proposed earlier may still be in its log, and the thaw fences it),
//!   then finish the plan.
//!
//! Each step is asked for at most once per [`super::RECONFIG_RETRY_MS`] per shard, and each
//! is idempotent: a repeated freeze answers with the first one's position, a repeated merge
//! entry is refused once the range no longer ends where the source starts, the meta commands
//! check the plan's id and phase.

use super::reconcile::Reconfig;
use super::Node;
use crate::meta::shard_range;
use crate::peer_wire::MetaOp;
use crate::placement::{LogIndex as PLogIndex, MergePhase, MergePlan, MetaCommand, MetaState};
use crate::raft::{GroupId, LogId, LogIndex, Role, Term};
use crate::shard::{GroupInfo, KeyRange, KvCommand, KvResponse};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// A step of a merge, as the reconciler rate-limits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum MergeStep {
    Freeze,
    Commit,
    Abort,
    Thaw,
    Absorb,
    Finish,
}

impl Node {
    /// Carries out the steps of the merge plans in `state` whose shards this node leads.
    pub(super) async fn drive_merges(&self, state: &MetaState) {
        for plan in state.merges.values() {
            let group = match &plan.phase {
                MergePhase::Freezing | MergePhase::Aborted => GroupId(plan.right.0),
                MergePhase::Committed { .. } => GroupId(plan.left.0),
            };
            let Ok(info) = self.inner.host.group_info_of(group).await else { continue };
            if info.role != Role::Leader {
                continue;
            }
            match &plan.phase {
                MergePhase::Freezing => self.freeze_step(plan, state, &info).await,
                MergePhase::Aborted => self.thaw_step(plan).await,
                MergePhase::Committed { freeze_term, freeze_index, right_range_start, right_range_end, voters } => {
                    let freeze = LogId { term: Term(*freeze_term), index: LogIndex(freeze_index.0) };
                    self.absorb_step(plan, freeze, right_range_start, right_range_end, voters).await
                }
            }
        }
        self.thaw_orphans(state).await;
        self.remove_stranded_sources(state).await;
        // Plans gone from the view: their clocks go too.
        if let Ok(mut seen) = self.inner.merges_seen.lock() {
            seen.retain(|id, _| state.merges.values().any(|p| p.id.0 == *id));
        }
    }

    /// Whether `step` of merge `plan` on `group` may be asked for now.
    fn merge_due(&self, group: GroupId, plan: &MergePlan, step: MergeStep) -> bool {
        !self.due(group, vec![Reconfig::Merge(plan.id.0, step)]).is_empty()
    }

    async fn freeze_step(&self, plan: &MergePlan, view: &MetaState, info: &GroupInfo) {
        let right = GroupId(plan.right.0);
        let Some(state) = self.inner.host.merge_state(right) else { return };
        let Some(d) = view.map.get(plan.right) else { return };
        match state.frozen {
            Some(f) if f.id == plan.id.0 => {
                // Every member of the group, as Raft has it (committed, nothing newer, no
                // learner), is a voter of the map's, and holds the freeze.
                let conf = &info.committed_conf.membership;
                let me = self.inner.id;
                let settled = conf.outgoing.is_none()
                    && conf.learners.is_empty()
                    && info.newest_conf == info.committed_conf.log_id.index
                    && conf.voters.iter().copied().eq(d.voters().collect::<std::collections::BTreeSet<_>>());
                let held = settled
                    && conf.voters.iter().all(|v| match *v == me {
                        true => info.applied >= f.at.index,
                        false => info.matched.get(v).is_some_and(|m| *m >= f.at.index),
                    });
                if held {
                    if self.merge_due(right, plan, MergeStep::Commit) {
                        let cmd = MetaCommand::CommitMerge {
                            left: plan.left,
                            id: plan.id,
                            freeze_term: f.at.term.0,
                            freeze_index: PLogIndex(f.at.index.0),
                        };
                        match self.meta_exec(MetaOp::Commands(vec![cmd]), false).await {
                            Ok(_) => info!(merge = %plan.id, left = %plan.left, right = %plan.right, freeze = %f.at,
                                "merge committed: every replica of the right shard holds its freeze"),
                            Err(e) => debug!(merge = %plan.id, error = %e, "merge not committed yet"),
                        }
                    }
                    return;
                }
                self.abort_if_stuck(plan).await;
            }
            Some(other) => {
                warn!(merge = %plan.id, shard = %plan.right, frozen = ?other, "the right shard is frozen for another merge");
                self.abort_if_stuck(plan).await;
            }
            None if state.thawed_through >= plan.id.0 => {
                // Thawed for this merge already: the plan's abort is on its way to this view.
            }
            None => {
                // The range the merge was decided on: a split the map made that the group has
                // not applied yet goes first (its leader proposes it), then the freeze.
                let range = self.inner.host.group_range(right);
                if range.as_ref() != Some(&shard_range(d)) {
                    self.abort_if_stuck(plan).await;
                    return;
                }
                if self.merge_due(right, plan, MergeStep::Freeze) {
                    let (start, end) = (d.start.clone(), d.end.clone());
                    let cmd = KvCommand::Freeze { id: plan.id.0, into: plan.left.0, start, end };
                    match self.inner.host.write(right, cmd).await {
                        Ok(KvResponse::Frozen { at }) => {
                            info!(merge = %plan.id, shard = %plan.right, at = %at, "merge: right shard frozen")
                        }
                        Ok(other) => warn!(merge = %plan.id, shard = %plan.right, answer = ?other, "freeze refused"),
                        Err(e) => debug!(merge = %plan.id, error = %e, "freeze not done yet"),
                    }
                }
                self.abort_if_stuck(plan).await;
            }
        }
    }

    /// Aborts a merge that has been freezing for longer than `merge_freeze_timeout_ms` as
    /// this node has watched it (a replica that never catches up, a node down).
    async fn abort_if_stuck(&self, plan: &MergePlan) {
        let timeout = Duration::from_millis(self.inner.config.balancer.merge_freeze_timeout_ms);
        let since = match self.inner.merges_seen.lock() {
            Ok(mut seen) => *seen.entry(plan.id.0).or_insert_with(Instant::now),
            Err(_) => return,
        };
        if since.elapsed() < timeout || !self.merge_due(GroupId(plan.right.0), plan, MergeStep::Abort) {
            return;
        }
        warn!(merge = %plan.id, left = %plan.left, right = %plan.right, waited_ms = since.elapsed().as_millis() as u64,
            "merge: the right shard's replicas did not all take the freeze in time; aborting");
        let cmd = MetaCommand::AbortMerge { left: plan.left, id: plan.id };
        if let Err(e) = self.meta_exec(MetaOp::Commands(vec![cmd]), false).await {
            debug!(merge = %plan.id, error = %e, "merge not aborted");
        }
    }

    async fn thaw_step(&self, plan: &MergePlan) {
        let right = GroupId(plan.right.0);
        if !self.merge_due(right, plan, MergeStep::Thaw) {
            return;
        }
        match self.inner.host.write(right, KvCommand::Thaw { id: plan.id.0 }).await {
            Ok(KvResponse::Done { .. }) => {
                info!(merge = %plan.id, shard = %plan.right, "merge aborted: right shard thawed");
                self.finish_merge(right, plan).await;
            }
            Ok(other) => warn!(merge = %plan.id, shard = %plan.right, answer = ?other, "thaw refused"),
            Err(e) => debug!(merge = %plan.id, error = %e, "thaw not done yet"),
        }
    }

    async fn absorb_step(
        &self,
        plan: &MergePlan,
        freeze: LogId,
        right_start: &[u8],
        right_end: &Option<Vec<u8>>,
        voters: &std::collections::BTreeSet<crate::placement::NodeId>,
    ) {
        let left = GroupId(plan.left.0);
        let Some(range) = self.inner.host.group_range(left) else { return };
        if range.end.as_deref() == right_end.as_deref() && range.start.as_slice() < right_start {
            // Absorbed already (a finish that was lost, or a new leader).
            self.finish_merge(left, plan).await;
            return;
        }
        if range.end.as_deref() != Some(right_start) {
            warn!(merge = %plan.id, shard = %plan.left, range = ?range, "the left shard does not end where the merge's right shard starts");
            return;
        }
        if !self.merge_due(left, plan, MergeStep::Absorb) {
            return;
        }
        let cmd = KvCommand::Merge {
            source: plan.right.0,
            id: plan.id.0,
            freeze,
            source_start: right_start.to_vec(),
            source_end: right_end.clone(),
            voters: voters.clone(),
        };
        match self.inner.host.write(left, cmd).await {
            Ok(KvResponse::Merged { range }) => {
                info!(merge = %plan.id, shard = %plan.left, absorbed = %plan.right, range = ?range, "shards merged");
                self.finish_merge(left, plan).await;
            }
            // A copy proposed again while the first waited: absorbed by the first.
            Ok(KvResponse::Refused(_))
                if self.inner.host.merge_state(left).is_some_and(|s| s.absorbed_through >= plan.id.0) =>
            {
                self.finish_merge(left, plan).await
            }
            Ok(other) => error_refused(plan, &other),
            Err(e) => debug!(merge = %plan.id, error = %e, "merge entry not applied yet"),
        }
    }

    /// Thaws the shards this node leads that are frozen for a merge the view shows is over
    /// without them absorbed: the merge's id was handed out in the view's history (below its
    /// `next_shard_id`), no plan of that id is left, and the shard is still in the map (a
    /// committed merge takes it out of the map for good). A freeze proposed before the plan's
    /// abort and applied after its thaw is refused (the thaw fences it); this covers one
    /// proposed by a leader whose view lagged, applied after the plan finished.
    async fn thaw_orphans(&self, view: &MetaState) {
        for (group, frozen) in self.inner.host.frozen_groups() {
            let over = frozen.id < view.next_shard_id && !view.merges.values().any(|p| p.id.0 == frozen.id);
            if !over || view.map.get(group).is_none() {
                continue;
            }
            let Ok(info) = self.inner.host.group_info_of(group).await else { continue };
            if info.role != Role::Leader
                || self.due(group, vec![Reconfig::Merge(frozen.id, MergeStep::Thaw)]).is_empty()
            {
                continue;
            }
            match self.inner.host.write(group, KvCommand::Thaw { id: frozen.id }).await {
                Ok(_) => warn!(shard = %group, merge = frozen.id, "thawed a shard frozen for a merge that is over"),
                Err(e) => debug!(shard = %group, error = %e, "thaw not done yet"),
            }
        }
    }

    /// Deletes the replicas here of shards frozen for a merge that committed (the shard left
    /// the map, its id allocated in the view's history: only a commit takes a shard out) and
    /// that no local replica of the absorbing shard will ever absorb: that shard is not on
    /// this node, or its replica here no longer ends where the source starts (it absorbed, or
    /// caught up by a snapshot taken after the merge and a split of it since). Such a replica
    /// holds nothing the cluster needs (the absorbing shard has the source's frozen data on
    /// its other replicas) and would keep its keys from every shard placed here later. Its
    /// data goes too unless another local replica owns keys of it.
    async fn remove_stranded_sources(&self, view: &MetaState) {
        let host = &self.inner.host;
        for (group, frozen) in host.frozen_groups() {
            let Some(range) = host.group_range(group) else { continue };
            let target = host.group_range(frozen.into).zip(host.merge_state(frozen.into));
            if !stranded(view, group, &frozen, &range, target.as_ref()) {
                continue;
            }
            let others = host
                .groups()
                .into_iter()
                .filter(|g| *g != group)
                .any(|g| host.group_range(g).is_some_and(|r| r.overlaps(&range)));
            let still = move |i: &GroupInfo| i.group == group;
            match host.destroy_group_if(group, !others, Box::new(still)).await {
                Ok(()) => warn!(shard = %group, into = %frozen.into, merge = frozen.id,
                    "deleted a replica of a merged shard that nothing here would absorb"),
                Err(e) => debug!(shard = %group, error = %e, "stranded merge source not deleted yet"),
            }
        }
    }

    async fn finish_merge(&self, group: GroupId, plan: &MergePlan) {
        if !self.merge_due(group, plan, MergeStep::Finish) {
            return;
        }
        let cmd = MetaCommand::FinishMerge { left: plan.left, id: plan.id };
        if let Err(e) = self.meta_exec(MetaOp::Commands(vec![cmd]), false).await {
            debug!(merge = %plan.id, error = %e, "merge plan not finished yet");
        }
    }
}

/// Whether this node's replica of `group` (over `range`), frozen as `frozen`, is stranded:
/// its merge committed (the shard left the view's map, its id allocated in the view's history:
/// only a commit takes a shard out of the map), and the absorbing shard's replica here
/// (`target`: its range and merge state) is missing or will never absorb it (it does not end
/// where the source starts, or absorbed that merge already).
fn stranded(
    view: &MetaState,
    group: GroupId,
    frozen: &crate::shard::Frozen,
    range: &KeyRange,
    target: Option<&(KeyRange, crate::shard::MergeState)>,
) -> bool {
    if group.0 >= view.next_shard_id || view.map.get(group).is_some() {
        return false;
    }
    let absorbs =
        target.is_some_and(|(t, s)| t.end.as_deref() == Some(range.start.as_slice()) && s.absorbed_through < frozen.id);
    !absorbs
}

/// A merge entry the left shard refused: its range or configuration does not fit the plan
/// the meta group committed (nothing changed on any replica). Retried every round: the left
/// shard's configuration may still be settling (a learner leaving); if it never does (an
/// unsafe recovery changed it), the plan stays for an operator to see.
fn error_refused(plan: &MergePlan, answer: &KvResponse) {
    tracing::warn!(merge = %plan.id, left = %plan.left, right = %plan.right, answer = ?answer,
        "the left shard refused a committed merge: its range or voters differ from the plan's");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::MetaCommand;
    use crate::raft::NodeId;
    use crate::shard::{Frozen, MergeState};

    /// Shards 1 `[.., m)` and 2 `[m, ..)` on nodes 1..3; with `merged`, 2 merged into 1.
    fn view(merged: bool) -> MetaState {
        let mut s = MetaState::default();
        for i in 1..=3 {
            s.apply(MetaCommand::RegisterNode { node: NodeId(i), addr: String::new() }).expect("register");
        }
        s.apply(MetaCommand::Bootstrap { nodes: vec![NodeId(1), NodeId(2), NodeId(3)] }).expect("bootstrap");
        let d = s.map.lookup(b"m").expect("shard").clone();
        s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: b"m".to_vec() }).expect("split");
        if merged {
            let (l, r) = (s.map.lookup(b"a").expect("l").clone(), s.map.lookup(b"m").expect("r").clone());
            let begin = MetaCommand::BeginMerge {
                left: l.id,
                left_epoch: l.epoch,
                right: r.id,
                right_epoch: r.epoch,
                now_ms: 0,
            };
            s.apply(begin).expect("begin");
            let id = s.merges[&l.id].id;
            for info in s.nodes.values_mut() {
                std::sync::Arc::make_mut(&mut info.report).applied.insert(r.id, crate::placement::LogIndex(9));
            }
            let commit = MetaCommand::CommitMerge {
                left: l.id,
                id,
                freeze_term: 1,
                freeze_index: crate::placement::LogIndex(9),
            };
            s.apply(commit).expect("commit");
        }
        s
    }

    #[test]
    fn a_frozen_source_is_stranded_only_once_its_merge_committed_and_nothing_here_will_absorb_it() {
        let right = KeyRange { start: b"m".to_vec(), end: None };
        let frozen = Frozen { id: 3, into: GroupId(1), at: LogId::new(1, 9) };
        let waiting = (KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) }, MergeState::default());
        let absorbed = (KeyRange::all(), MergeState { absorbed_through: 3, ..MergeState::default() });
        let split_since = (KeyRange { start: Vec::new(), end: Some(b"f".to_vec()) }, MergeState::default());
        // Still in the map (freezing, or the view lags): never.
        let before = view(false);
        assert!(!stranded(&before, GroupId(2), &frozen, &right, None));
        assert!(!stranded(&before, GroupId(2), &frozen, &right, Some(&split_since)));
        let after = view(true);
        assert!(after.map.get(GroupId(2)).is_none(), "the commit took shard 2 out of the map");
        // The absorbing replica here waits at the merge entry: it will absorb it.
        assert!(!stranded(&after, GroupId(2), &frozen, &right, Some(&waiting)));
        // No absorbing replica here, or one that cannot absorb it any more.
        assert!(stranded(&after, GroupId(2), &frozen, &right, None));
        assert!(stranded(&after, GroupId(2), &frozen, &right, Some(&split_since)));
        let mut absorbed_other = absorbed.clone();
        absorbed_other.0 = waiting.0.clone();
        assert!(stranded(&after, GroupId(2), &frozen, &right, Some(&absorbed_other)));
        // A shard id the view has not allocated yet (a view older than the replica): never.
        assert!(!stranded(&after, GroupId(99), &frozen, &right, None));
    }
}
