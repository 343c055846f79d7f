//! Timers: the election timeout of followers and candidates, and the leader's heartbeat,
//! check-quorum and transfer deadlines. The engine owns no clock: `handle_timeout(now)` fires
//! whatever is due and `next_deadline` says when to call it next.

use super::*;

impl Engine {
    /// The earliest time `handle_timeout` must be called.
    pub fn next_deadline(&self) -> Millis {
        match self.role.leader() {
            Some(l) => {
                let mut d = l.heartbeat_at.min(l.check_quorum_at);
                if let Some(t) = &l.transfer {
                    d = d.min(t.deadline);
                }
                if let Some(t) = l.commit_notice_at {
                    d = d.min(t);
                }
                d
            }
            None => self.election_at,
        }
    }

    /// The work of [`Engine::handle_timeout`].
    pub(super) fn on_timeout(&mut self, now: Millis) {
        if self.role.is_leader() {
            self.leader_tick(now);
        } else if now >= self.election_at {
            if self.can_campaign() {
                if self.config.pre_vote {
                    self.pre_campaign(now);
                } else {
                    self.campaign(now, false);
                }
            } else {
                self.reset_election_timer(now);
            }
        }
    }

    /// The leader's timers: commit notices held back, transfer deadline, check-quorum,
    /// heartbeat round.
    fn leader_tick(&mut self, now: Millis) {
        let Some(l) = self.role.leader_mut() else { return };
        let hb_due = now >= l.heartbeat_at;
        // Held commit notices go when due, and at the latest with the heartbeat round: before
        // the progress of members whose removal committed is dropped below, so that a removed
        // member still hears that its removal is committed (nothing is sent to it after).
        if l.commit_notice_at.is_some_and(|t| hb_due || now >= t) {
            if let Some(mut r) = self.replicator() {
                r.notify_commit();
            }
        }
        let Some(l) = self.role.leader_mut() else { return };
        if l.transfer.as_ref().is_some_and(|t| now >= t.deadline) {
            if let Some(t) = l.transfer.take() {
                info!(node = %self.id, term = %self.vote.term, target = %t.target, "leadership transfer timed out");
            }
        }
        if now >= l.check_quorum_at {
            let quorum_active = self
                .memberships
                .effective()
                .membership
                .is_quorum(|id| id == self.id || l.progress.get(&id).is_some_and(|p| p.recent_active));
            l.check_quorum_at = now.add_ms(self.config.election_timeout_ms_min);
            for p in l.progress.values_mut() {
                p.recent_active = false;
            }
            if self.config.check_quorum && !quorum_active {
                info!(node = %self.id, term = %self.vote.term, "lost contact with a quorum: stepping down");
                self.become_follower(now, self.vote.term, None);
                return;
            }
        }
        if hb_due {
            self.sync_progress_with_membership(now);
            let Some(l) = self.role.leader_mut() else { return };
            l.heartbeat_at = now.add_ms(self.config.heartbeat_interval_ms);
            l.reads.request_round(now);
            self.flush_rounds(now);
            self.check_stalled(now);
        }
    }

    /// Restarts the election timeout, randomized in `[election_timeout_ms_min, _max)`.
    pub(super) fn reset_election_timer(&mut self, now: Millis) {
        let c = &self.config;
        self.election_at = now.add_ms(self.rng.range(c.election_timeout_ms_min, c.election_timeout_ms_max));
    }
}
