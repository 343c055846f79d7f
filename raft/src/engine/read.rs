//! Linearizable reads on the leader: ReadIndex rounds of heartbeats confirmed by a quorum,
//! and the leader lease that skips the round trip. Raft thesis §6.4.

use super::*;

#[derive(Debug)]
pub(super) struct PendingRead {
    pub(super) id: u64,
    /// The heartbeat round that must be acknowledged by a quorum.
    pub(super) round: u64,
    /// The commit index when the read arrived.
    pub(super) index: LogIndex,
}

/// Bound on the history of heartbeat rounds kept for lease reads.
pub(super) const ROUNDS_KEPT_MAX: usize = 64;

impl Engine {
    /// Registers a linearizable read with the caller's `id`. The answer comes as
    /// `Action::ReadReady` (then wait for that applied index and read the state machine) or
    /// `Action::ReadFailed`.
    pub fn read(&mut self, now: Millis, id: u64, mode: ReadMode) {
        let single = self.is_single_voter();
        let lease_ok = mode == ReadMode::Lease && self.lease_valid(now);
        let unchecked = self.bugs().read_without_read_index;
        let committed = self.committed;
        let Some(l) = self.role.leader_mut() else {
            self.actions.push_back(Action::ReadFailed { id, error: RaftError::NotLeader { leader: self.leader } });
            return;
        };
        if committed < l.noop_index {
            l.reads_before_noop.push((id, mode));
            return;
        }
        if single || lease_ok || unchecked {
            self.actions.push_back(Action::ReadReady { id, index: committed });
            return;
        }
        l.reads.push_back(PendingRead { id, round: l.round + 1, index: committed });
        // The round starts when actions are next polled, so reads registered together share
        // one round of heartbeats.
        l.round_needed = true;
        l.round_requested_at = now;
    }

    fn is_single_voter(&self) -> bool {
        let m = &self.effective().membership;
        !m.is_joint() && m.voters.len() == 1 && m.voters.contains(&self.id)
    }

    /// Whether the leader lease holds at `now`: a quorum acknowledged a heartbeat round sent
    /// less than `election_timeout_ms_min - lease_clock_drift_ms` ago. Followers refuse votes
    /// for `election_timeout_ms_min` after hearing from the leader, so no other leader can
    /// exist in that window. A transfer in progress voids the lease (its election ignores
    /// that rule).
    fn lease_valid(&self, now: Millis) -> bool {
        let Some(l) = self.role.leader() else { return false };
        if !self.config.lease_read || l.transfer.is_some() || l.lease_void || self.committed < l.noop_index {
            return false;
        }
        if self.is_single_voter() {
            return true;
        }
        let round = self.effective().membership.quorum_value(|id| {
            if id == self.id {
                u64::MAX
            } else {
                l.progress.get(&id).map(|p| p.round_acked).unwrap_or(0)
            }
        });
        let Some((_, sent)) = l.round_sent_at.iter().find(|(r, _)| *r == round) else { return false };
        let lease_ms = self.config.election_timeout_ms_min - self.config.lease_clock_drift_ms;
        now < sent.add_ms(lease_ms)
    }

    /// Starts a heartbeat round if one is needed. Every heartbeat carries the round number;
    /// a quorum acknowledging round `r` proves leadership as of the round's start.
    pub(super) fn flush_rounds(&mut self, now: Millis) {
        let committed = self.committed;
        let Some(l) = self.role.leader_mut() else { return };
        if !l.round_needed {
            return;
        }
        l.round_needed = false;
        l.round += 1;
        l.round_sent_at.push_back((l.round, now));
        if l.round_sent_at.len() > ROUNDS_KEPT_MAX {
            l.round_sent_at.pop_front();
        }
        for (id, p) in &l.progress {
            self.actions.push_back(Action::Send(Message {
                from: self.id,
                to: *id,
                term: self.vote.term,
                body: MessageBody::Heartbeat { commit: committed.min(p.matched), round: l.round },
            }));
        }
        // With no other voter the round is acknowledged at once.
        self.advance_reads();
    }

    pub(super) fn advance_reads(&mut self) {
        let Some(l) = self.role.leader_mut() else { return };
        if l.reads.is_empty() {
            return;
        }
        let id = self.id;
        let acked = self.memberships.effective().membership.quorum_value(|n| {
            if n == id {
                u64::MAX
            } else {
                l.progress.get(&n).map(|p| p.round_acked).unwrap_or(0)
            }
        });
        while l.reads.front().is_some_and(|r| r.round <= acked) {
            let r = l.reads.pop_front().expect("checked");
            self.actions.push_back(Action::ReadReady { id: r.id, index: r.index });
        }
    }
}
