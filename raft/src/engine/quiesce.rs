//! Quiescence, for hosts of many groups: an idle group may stop ticking. Its leader stops
//! heartbeating and its followers stop counting election timeouts. The engine only judges
//! when that is safe to start and restarts the timers on wake-up; the host decides when to
//! quiesce, tells the followers, and wakes groups on a proposal, a message, or when a
//! leader's node stops answering. Timers carry liveness only, never safety, so quiet timers
//! cannot break Raft's safety; the lease is computed from acknowledged heartbeat rounds and
//! simply lapses while quiet.

use super::*;

impl Engine {
    /// On a leader whose group is idle — everything committed and applied, every follower
    /// `is_live` says is up has matched the whole log, no read, transfer, snapshot or
    /// configuration change in progress — the `(term, last index)` the followers must also be
    /// at to go quiet. `None` otherwise.
    pub fn quiesce_point(&self, is_live: impl Fn(NodeId) -> bool) -> Option<(Term, LogIndex)> {
        let l = self.role.leader()?;
        let last = self.log.last_index();
        let idle = self.committed == last
            && self.applied == last
            && self.persisted.index == last
            && self.committed >= l.noop_index
            && l.transfer.is_none()
            && l.reads.is_idle()
            && self.building_snapshot.is_none()
            && self.effective().log_id.index <= self.committed
            && !self.effective().membership.is_joint();
        if !idle {
            return None;
        }
        let caught_up = l.progress.iter().all(|(id, p)| {
            !is_live(*id) || (p.matched == last && matches!(p.state, ReplState::Replicate) && p.inflight.is_empty())
        });
        caught_up.then_some((self.vote.term, last))
    }

    /// On a follower or learner: whether it may go quiet at the request of `leader`, which
    /// quiesced at `(term, index)`. True only if this node follows that leader in that term
    /// and has the whole log up to `index` durable, committed and applied.
    pub fn can_quiesce_follower(&self, leader: NodeId, term: Term, index: LogIndex) -> bool {
        !self.role.is_leader()
            && self.leader == Some(leader)
            && self.vote.term == term
            && self.log.last_index() == index
            && self.persisted.index == index
            && self.committed == index
            && self.applied == index
            && self.receiving.is_none()
    }

    /// The work of [`Engine::wake`].
    pub(super) fn resume_timers(&mut self, now: Millis, leader_alive: bool) {
        if let Some(l) = self.role.leader_mut() {
            l.heartbeat_at = now;
            l.check_quorum_at = now.add_ms(self.config.election_timeout_ms_min);
            // Followers were caught up and live when the group went quiet; check-quorum
            // judges them again over the next window.
            for p in l.progress.values_mut() {
                p.recent_active = true;
            }
            return;
        }
        if leader_alive && self.leader.is_some() {
            self.leader_contact_at = Some(now);
        }
        self.reset_election_timer(now);
    }
}
