//! A replica move as an explicit plan of steps, kept in the replicated [`MetaState`] so that it
//! survives restarts and changes of meta leader.
//!
//! The steps, in order:
//! 1. [`MoveStep::AddLearner`]: add a learner on `to` (it is fed by a snapshot, then the log).
//! 2. [`MoveStep::WaitCaughtUp`]: wait until the shard leader reports a committed
//!    configuration holding the learner and the learner's reported applied index is within
//!    `catch_up_lag_entries_max` of the leader's, so promoting it does not stall the quorum.
//! 3. [`MoveStep::Promote`]: one joint-consensus change that makes `to` a voter and `from` a
//!    learner ([`MetaCommand::SwapVoter`]); the number of voters never changes.
//! 4. [`MoveStep::RemoveOld`]: remove the replica on `from` from the map, once the shard
//!    leader reports a committed configuration in which `to` votes and `from` does not.
//! 5. [`MoveStep::TransferLeader`] (only when `transfer_leader_to` is set): ask the group to hand
//!    leadership to that voter (typically `to`, when `from` was the leader).
//! 6. [`MoveStep::Done`].
//!
//! [`MovePlan::next`] is pure: it looks at the current map and reports and says what to do. It
//! never trusts the recorded step alone: if the step's effect is already in the map (a restart
//! after the change applied, or the same change made by hand) it advances without changing
//! anything; if the replicas are in a state no step of this plan can produce (someone removed
//! the learner, or the source), or the target started draining before its replica votes, it
//! returns a [`PlanError`] and the driver aborts the plan.
//!
//! How the node drives plans (meta leader, on every tick or heartbeat):
//! 1. for each plan in [`MetaState::moves`], call [`MovePlan::next`];
//! 2. on [`PlanAction::Run`] or [`PlanAction::Advance`], propose
//!    [`MetaCommand::AdvanceMove`] with the plan's current step: applying it re-runs the same
//!    check and performs the step's change and the step advance atomically, so a duplicate
//!    proposal is refused ([`crate::MetaError::MoveStepMismatch`]) and changes nothing;
//! 3. on [`PlanAction::Wait`] or [`PlanAction::WaitRaft`], do nothing until the next
//!    heartbeat (a step that waits past the driver's deadline is aborted);
//! 4. on an error, propose [`MetaCommand::AbortMove`].

use crate::map::{NodeId, ReplicaRole, ShardDescriptor, ShardId};
use crate::meta::{GroupConf, LogIndex, MetaCommand, MetaState};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where a move is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MoveStep {
    /// Add a learner on `to`.
    AddLearner,
    /// Wait for the learner to catch up with the leader.
    WaitCaughtUp,
    /// Joint change: `to` becomes a voter, `from` a learner.
    Promote,
    /// Remove the replica on `from`.
    RemoveOld,
    /// Ask for leadership to move to `transfer_leader_to`.
    TransferLeader,
    /// Finished.
    Done,
}

/// A move of one replica of `shard` from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovePlan {
    /// The shard.
    pub shard: ShardId,
    /// The node losing its replica (a voter when the plan starts).
    pub from: NodeId,
    /// The node gaining a replica.
    pub to: NodeId,
    /// Leadership goes here at the end; set when `from` led the shard, so that moving a
    /// replica does not also upset the leader balance.
    pub transfer_leader_to: Option<NodeId>,
    /// The next step to run.
    pub step: MoveStep,
    /// How far (in log entries) the learner's applied index may trail the leader's for the
    /// learner to count as caught up. Carried in the plan so that every meta replica judges
    /// the step the same way, whatever its configuration.
    pub catch_up_lag_entries_max: u64,
}

/// What to do next for a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanAction {
    /// Apply `command` (the current step's change); the plan is then at `then`.
    Run {
        /// The change, stamped with the shard's current epoch.
        command: MetaCommand,
        /// The step after it.
        then: MoveStep,
    },
    /// The current step's effect is already present (or its wait is over): move to `to`
    /// without changing the map.
    Advance {
        /// The step to move to.
        to: MoveStep,
    },
    /// The learner has not caught up yet (as far as the reports show); ask again after the
    /// next heartbeat.
    Wait {
        /// The learner's reported applied index, if it reported one.
        learner: Option<LogIndex>,
        /// The leader's (or, without a leader report, the most advanced voter's) applied index.
        leader: Option<LogIndex>,
    },
    /// The group's committed configuration (as its leader reports it, `conf`) does not show
    /// the previous step's change yet: ask again after the next heartbeat.
    WaitRaft {
        /// The leader's reported committed configuration, if any leader reported one.
        conf: Option<GroupConf>,
    },
    /// The plan has finished.
    Done,
}

/// Why a plan cannot go on. Each means: abort the plan ([`MetaCommand::AbortMove`]) and let
/// the balancer plan again from the current map.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum PlanError {
    /// The shard no longer exists.
    #[error("shard {0} no longer exists: abort the move")]
    ShardGone(ShardId),
    /// The replicas changed in a way no step of this plan produces.
    #[error(
        "replicas of shard {shard} changed under its move at step {step:?} (source replica: {from:?}, \
         target replica: {to:?}): abort the move and let the balancer plan again"
    )]
    Conflict {
        /// The shard.
        shard: ShardId,
        /// The step the plan was at.
        step: MoveStep,
        /// The role of the replica on the source node now.
        from: Option<ReplicaRole>,
        /// The role of the replica on the target node now.
        to: Option<ReplicaRole>,
    },
    /// The target started draining (or was forgotten) before its replica could vote: the move
    /// would only have to be undone.
    #[error("node {node} is draining, so the move of shard {shard} onto it stops: abort the move")]
    TargetDraining {
        /// The shard.
        shard: ShardId,
        /// The target node.
        node: NodeId,
    },
    /// The node leadership should go to is not a voter of the shard (any more).
    #[error("node {node} is not a voter of shard {shard}, so it cannot take the lead: abort the move")]
    LeaderTargetNotVoter {
        /// The shard.
        shard: ShardId,
        /// The intended leader.
        node: NodeId,
    },
}

impl MovePlan {
    /// A new plan at its first step.
    pub fn new(
        shard: ShardId,
        from: NodeId,
        to: NodeId,
        transfer_leader_to: Option<NodeId>,
        catch_up_lag_entries_max: u64,
    ) -> MovePlan {
        MovePlan { shard, from, to, transfer_leader_to, step: MoveStep::AddLearner, catch_up_lag_entries_max }
    }

    /// Checks the current step against `state` and says what to do next (see the module docs).
    pub fn next(&self, state: &MetaState) -> Result<PlanAction, PlanError> {
        use MoveStep as S;
        use ReplicaRole::{Learner, Voter};
        if self.step == S::Done {
            return Ok(PlanAction::Done);
        }
        let d = state.map.get(self.shard).ok_or(PlanError::ShardGone(self.shard))?;
        let (f, t) = (d.replica(self.from).map(|r| r.role), d.replica(self.to).map(|r| r.role));
        let conflict = || PlanError::Conflict { shard: self.shard, step: self.step, from: f, to: t };
        let after_remove = if self.transfer_leader_to.is_some() { S::TransferLeader } else { S::Done };
        let (shard, epoch) = (self.shard, d.epoch);
        if self.step < S::RemoveOld && t != Some(Voter) && state.nodes.get(&self.to).is_none_or(|n| n.draining) {
            return Err(PlanError::TargetDraining { shard: self.shard, node: self.to });
        }
        let run = |command, then| Ok(PlanAction::Run { command, then });
        let advance = |to| Ok(PlanAction::Advance { to });
        // States every step before TransferLeader shares: once `to` votes, the remaining work
        // is removing `from`, whatever step the plan recorded.
        match (self.step, f, t) {
            (S::TransferLeader, _, _) => self.transfer_leader(state, d),
            (_, Some(_), Some(Voter)) if self.step != S::RemoveOld => advance(S::RemoveOld),
            (_, None, Some(Voter)) => advance(after_remove),
            (S::RemoveOld, Some(_), Some(Voter)) => {
                // The map may drop the old replica only once the group's committed
                // configuration no longer counts it: its node deletes the replica then.
                match state.leader_conf(shard) {
                    Some(c) if !c.joint && c.voters.contains(&self.to) && !c.voters.contains(&self.from) => {
                        run(MetaCommand::RemoveReplica { shard, epoch, node: self.from }, after_remove)
                    }
                    other => Ok(PlanAction::WaitRaft { conf: other.cloned() }),
                }
            }
            (S::AddLearner, Some(Voter), None) => {
                run(MetaCommand::AddLearner { shard, epoch, node: self.to }, S::WaitCaughtUp)
            }
            (S::AddLearner, Some(Voter), Some(Learner)) => advance(S::WaitCaughtUp),
            (S::WaitCaughtUp, Some(Voter), Some(Learner)) => {
                // Reports of the learner's applied index mean nothing until the group's
                // committed configuration holds the learner.
                let conf_index = match state.leader_conf(shard) {
                    Some(c) if c.learners.contains(&self.to) && !c.joint => c.index,
                    other => return Ok(PlanAction::WaitRaft { conf: other.cloned() }),
                };
                // The learner must also hold the configuration that added it (applied past
                // it): promoted without one, it could never vote, and the group refuses that.
                let (learner, leader) = applied_indexes(state, d, self.to);
                match (learner, leader) {
                    (Some(l), Some(r))
                        if l >= conf_index && l.0.saturating_add(self.catch_up_lag_entries_max) >= r.0 =>
                    {
                        advance(S::Promote)
                    }
                    _ => Ok(PlanAction::Wait { learner, leader }),
                }
            }
            (S::Promote, Some(Voter), Some(Learner)) => {
                run(MetaCommand::SwapVoter { shard, epoch, promote: self.to, demote: self.from }, S::RemoveOld)
            }
            _ => Err(conflict()),
        }
    }

    fn transfer_leader(&self, state: &MetaState, d: &ShardDescriptor) -> Result<PlanAction, PlanError> {
        let Some(target) = self.transfer_leader_to else {
            return Ok(PlanAction::Advance { to: MoveStep::Done });
        };
        if d.replica(target).is_none_or(|r| r.role != ReplicaRole::Voter) {
            return Err(PlanError::LeaderTargetNotVoter { shard: self.shard, node: target });
        }
        let leads = state.nodes.get(&target).is_some_and(|n| n.report.leading.contains(&self.shard));
        if leads || state.transfers.get(&self.shard) == Some(&target) {
            return Ok(PlanAction::Advance { to: MoveStep::Done });
        }
        Ok(PlanAction::Run {
            command: MetaCommand::TransferLeader { shard: self.shard, epoch: d.epoch, node: target },
            then: MoveStep::Done,
        })
    }
}

/// The slowest transfer of a shard's data that a move waits for (bytes per second): until its
/// learner first reports catching up, a move is given the shard's size at this rate on top of the
/// step deadline (a 1 GiB shard: 256 s more), so a large shard's snapshot is not cut off.
pub const MOVE_TRANSFER_BYTES_PER_S_MIN: u64 = 4 << 20;

/// The meta leader's watch over the current step of one move: a step is aborted when it goes a
/// deadline without progress, not a deadline after it began. While the learner catches up,
/// progress is its lag behind the leader reaching a new low, so a learner that keeps up with
/// the writes but never closes the gap is aborted too, and one far behind but closing is not.
/// Pure: time is an argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepWatch {
    /// The move and step watched: another move of the shard (after an abort, or decided by
    /// another meta leader) starts a new watch even at the same step.
    step: MoveStep,
    from: NodeId,
    to: NodeId,
    since_ms: u64,
    /// The smallest lag (entries) the learner has shown in this step.
    best_lag: Option<u64>,
}

impl StepWatch {
    /// Starts watching `plan`'s current step at `now_ms`.
    pub fn new(plan: &MovePlan, now_ms: u64) -> StepWatch {
        StepWatch { step: plan.step, from: plan.from, to: plan.to, since_ms: now_ms, best_lag: None }
    }

    /// Takes in `plan` and `state` at `now_ms` (a new step or a new low of the lag restarts the
    /// clock) and says whether the step has gone without progress for longer than its
    /// patience: `deadline_ms`, plus, for a learner that has not reported catching up yet, the
    /// time to transfer the shard at [`MOVE_TRANSFER_BYTES_PER_S_MIN`].
    pub fn overdue(&mut self, plan: &MovePlan, state: &MetaState, now_ms: u64, deadline_ms: u64) -> bool {
        if (plan.step, plan.from, plan.to) != (self.step, self.from, self.to) {
            *self = StepWatch::new(plan, now_ms);
        }
        let lag = plan.learner_lag(state);
        if let Some(l) = lag.filter(|l| self.best_lag.is_none_or(|b| *l < b)) {
            self.best_lag = Some(l);
            self.since_ms = now_ms;
        }
        let mut patience = deadline_ms;
        if plan.step == MoveStep::WaitCaughtUp && self.best_lag.is_none() {
            let bytes = state.nodes.values().filter_map(|n| n.report.shard_bytes.get(&plan.shard)).max();
            let transfer_ms = bytes.map_or(0, |b| b.saturating_mul(1000) / MOVE_TRANSFER_BYTES_PER_S_MIN);
            patience = patience.saturating_add(transfer_ms);
        }
        now_ms.saturating_sub(self.since_ms) > patience
    }
}

impl MovePlan {
    /// While waiting for the learner: how many entries its reported applied index trails the
    /// leader's, once it has one (it reports none until its first data arrived).
    pub fn learner_lag(&self, state: &MetaState) -> Option<u64> {
        if self.step != MoveStep::WaitCaughtUp {
            return None;
        }
        let d = state.map.get(self.shard)?;
        match applied_indexes(state, d, self.to) {
            (Some(l), Some(r)) if l.0 > 0 => Some(r.0.saturating_sub(l.0)),
            _ => None,
        }
    }
}

/// The learner's reported applied index, and the reference it must catch up with: the applied
/// index reported by the shard's leader, or, when no voter reports leading it, the highest one
/// any voter reports (a learner that has caught up with every voter has caught up).
fn applied_indexes(state: &MetaState, d: &ShardDescriptor, learner: NodeId) -> (Option<LogIndex>, Option<LogIndex>) {
    let applied = |n: NodeId| state.nodes.get(&n).and_then(|i| i.report.applied.get(&d.id).copied());
    let leader = d
        .voters()
        .find(|v| state.nodes.get(v).is_some_and(|i| i.report.leading.contains(&d.id)))
        .and_then(applied)
        .or_else(|| d.voters().filter_map(applied).max());
    (applied(learner), leader)
}
