//! Quiescence, for hosts of many groups: an idle group may stop ticking. Its leader stops
//! heartbeating and its followers stop counting election timeouts. The engine only judges
//! when that is safe to start and restarts the timers on wake-up; the host decides when to
//! quiesce, tells the followers, and wakes groups on a proposal, a message, when a leader's
//! node stops answering, or when a member that may be behind answers again. Timers carry
//! liveness only, never safety, so quiet timers cannot break Raft's safety; the lease is
//! computed from acknowledged heartbeat rounds and simply lapses while quiet.

use super::*;

impl Engine {
    /// On a leader whose group is idle — everything committed and applied, every follower
    /// `is_live` says is up has matched the whole log (and, if the group was quiet before,
    /// answered a heartbeat since it woke), no read, transfer, snapshot or configuration
    /// change in progress — the `(term, last index)` the followers must also be at to go
    /// quiet. `None` otherwise.
    pub fn quiesce_point(&self, is_live: impl Fn(NodeId) -> bool) -> Option<(Term, LogIndex)> {
        let l = self.role.leader()?;
        let last = self.log.last_index();
        let idle = self.committed == last
            && self.applied == last
            && self.persisted.index == last
            && self.committed >= l.noop_index
            && l.transfer.is_none()
            && l.commit_notice_at.is_none()
            && l.reads.is_idle()
            && self.building_snapshot.is_none()
            && self.effective().log_id.index <= self.committed
            && !self.effective().membership.is_joint();
        if !idle {
            return None;
        }
        // Once woken, a follower must also have answered a heartbeat sent since: a leader's
        // idea of it (matched, as it was when the group went quiet) says nothing of whether it
        // heard the commit index, nor whether its replica is there to hear it at all (its node
        // may answer before its groups are loaded again after a restart). The heartbeat it
        // answers names the leader's commit index (idle: the last entry, which a follower
        // that matched it holds and so commits).
        let answered = |p: &Progress| l.woke_after_round.is_none_or(|r| p.round_acked > r);
        let caught_up = l.progress.iter().all(|(id, p)| {
            !is_live(*id)
                || (p.matched == last
                    && matches!(p.state, ReplState::Replicate)
                    && p.inflight.is_empty()
                    && answered(p))
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

    /// Gives back the memory the engine's buffers kept after their last use: emptied queues
    /// (actions, writes in flight, the leader's appends in flight and reads), spare capacity
    /// of the entry cache and the configuration log, and the leader's heartbeat rounds older
    /// than the one a quorum acknowledged. For a host to call when the group goes quiet: with
    /// thousands of idle groups per node, these buffers were a fifth of a replica's memory.
    ///
    /// Changes no Raft state and no later behaviour: buffers are only reallocated to fit what
    /// they hold, and the lease looks up only the round a quorum acknowledged, which only grows
    /// within one configuration. Should a later configuration lower it to a round dropped here,
    /// the lease does not hold and a lease read takes a ReadIndex round instead: slower, never
    /// unsafe (a lease is never extended by it).
    pub fn release_idle_memory(&mut self) {
        self.actions.shrink_to_fit();
        self.pending_io.shrink_to_fit();
        self.vote_replies.shrink_to_fit();
        self.loads_in_flight.shrink_to_fit();
        self.snapshots.shrink_to_fit();
        self.log.shrink_to_fit();
        self.memberships.shrink_to_fit();
        let (me, membership) = (self.id, &self.memberships.effective().membership);
        if let RoleState::Leader(l) = &mut self.role {
            let acked = l.quorum_round(me, membership);
            l.reads.release_idle_memory(acked);
            l.uncommitted.shrink_to_fit();
            for p in l.progress.values_mut() {
                p.inflight.shrink_to_fit();
            }
        }
    }

    /// Per buffer [`Engine::release_idle_memory`] shrinks: (name, length, capacity).
    #[cfg(test)]
    pub(super) fn buffer_sizes(&self) -> Vec<(&'static str, usize, usize)> {
        let mut out = vec![
            ("actions", self.actions.len(), self.actions.capacity()),
            ("pending_io", self.pending_io.len(), self.pending_io.capacity()),
            ("vote_replies", self.vote_replies.len(), self.vote_replies.capacity()),
            ("loads_in_flight", self.loads_in_flight.len(), self.loads_in_flight.capacity()),
            ("snapshots", self.snapshots.len(), self.snapshots.capacity()),
            ("memberships", self.memberships.len(), self.memberships.capacity()),
        ];
        out.extend(self.log.buffer_sizes());
        if let Some(l) = self.role.leader() {
            out.extend(l.reads.buffer_sizes());
            out.push(("uncommitted", l.uncommitted.len(), l.uncommitted.capacity()));
            for p in l.progress.values() {
                out.push(("inflight", p.inflight.len(), p.inflight.capacity()));
            }
        }
        out
    }

    /// The work of [`Engine::wake`].
    pub(super) fn resume_timers(&mut self, now: Millis, leader_alive: bool) {
        if let Some(l) = self.role.leader_mut() {
            l.heartbeat_at = now;
            l.woke_after_round = Some(l.reads.last_round());
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
