//! Work of the meta leader on placement: one checked step of every replica move plan per
//! report interval (aborting a move whose step is past its deadline), and the automatic
//! balancer's rounds. Both only propose meta commands; the reconciler of each shard's leader
//! carries out what the map then says.

use super::{now_ms, Node};
use crate::meta;
use crate::peer_wire::MetaOp;
use crate::placement::{MetaCommand, PlanAction, ShardId, StepWatch};
use crate::wire::AdminResponse;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tracing::{debug, info, warn};

/// On the meta leader: a watch over each move's current step (step deadlines, counted from
/// the step's last progress).
pub(super) type MoveSteps = HashMap<ShardId, StepWatch>;

impl Node {
    /// On the meta leader: one balancer round, its proposals carried out. Not in the first
    /// report intervals of a tenure: the nodes' reports must reach the new leader first.
    pub(super) async fn auto_balance(&self) {
        let settled = Duration::from_millis(3 * self.inner.config.report_interval_ms);
        if !self.leads_meta().await || self.meta_tenure().is_none_or(|t| t < settled) {
            return;
        }
        match self.meta_exec(MetaOp::Rebalance { now_ms: now_ms() }, false).await {
            Ok((_, _, AdminResponse::Done(what))) if what != meta::NOTHING_TO_BALANCE => {
                info!(node = self.inner.id.0, "balancer: {}", what.replace('\n', "; "))
            }
            Ok(_) => {}
            Err(e) => debug!(node = self.inner.id.0, error = %e, "balancer round not run"),
        }
    }

    /// On the meta leader: runs one step of every replica move plan.
    pub(super) async fn drive_moves(&self) {
        if !self.leads_meta().await {
            // Another leader drives the moves meanwhile: watches kept from this tenure would
            // judge the next one by clocks that stopped.
            if let Ok(mut watches) = self.inner.move_steps.lock() {
                watches.clear();
            }
            return;
        }
        let state = self.meta_view();
        let now = self.inner.started.elapsed().as_millis() as u64;
        let deadline = self.inner.config.move_step_deadline_ms;
        let overdue: BTreeSet<ShardId> = match self.inner.move_steps.lock() {
            Ok(mut watches) => {
                watches.retain(|shard, _| state.moves.contains_key(shard));
                state
                    .moves
                    .values()
                    .filter(|p| {
                        let watch = watches.entry(p.shard).or_insert_with(|| StepWatch::new(p, now));
                        watch.overdue(p, &state, now, deadline)
                    })
                    .map(|p| p.shard)
                    .collect()
            }
            Err(_) => BTreeSet::new(),
        };
        for plan in state.moves.values() {
            if overdue.contains(&plan.shard) {
                warn!(shard = %plan.shard, step = ?plan.step, "move step without progress past its deadline; aborting the move");
                let cmd = MetaCommand::AbortMove { shard: plan.shard };
                if let Err(e) = self.meta_exec(MetaOp::Commands(vec![cmd]), false).await {
                    debug!(shard = %plan.shard, error = %e, "move not aborted");
                }
                continue;
            }
            let cmd = match plan.next(&state) {
                Ok(PlanAction::Wait { .. } | PlanAction::WaitRaft { .. }) => continue,
                Ok(_) => MetaCommand::AdvanceMove { shard: plan.shard, step: plan.step },
                Err(e) => {
                    warn!(shard = %plan.shard, error = %e, "move cannot go on; aborting it");
                    MetaCommand::AbortMove { shard: plan.shard }
                }
            };
            if let Err(e) = self.meta_exec(MetaOp::Commands(vec![cmd]), false).await {
                debug!(shard = %plan.shard, error = %e, "move step not taken");
            }
        }
    }
}
