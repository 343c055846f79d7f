//! Storage writes the engine issues and their completion: the vote and the log become
//! durable in order, and only then are votes answered, appends acknowledged and entries
//! applied. Also applying what is committed and durable.

use super::*;

/// A pending write and the log id the durable log ends at once it is done (clamped when a later
/// truncation removes entries it wrote).
#[derive(Debug)]
pub(super) enum PendingIo {
    Log { io: IoId, last: LogId },
    Vote { io: IoId, vote: Vote },
}

impl Engine {
    /// Changes the vote and issues its write.
    pub(super) fn set_vote(&mut self, vote: Vote) {
        self.vote = vote;
        // Two vote changes in one step (a new term, then a vote in it) make one write.
        if let (Some(Action::SaveVote { io, vote: v }), Some(PendingIo::Vote { io: pio, vote: pv })) =
            (self.actions.back_mut(), self.pending_io.back_mut())
        {
            if io == pio {
                *v = vote;
                *pv = vote;
                return;
            }
        }
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Vote { io, vote });
        self.actions.push_back(Action::SaveVote { io, vote });
    }

    /// A fresh write id.
    pub(super) fn next_io(&mut self) -> IoId {
        self.next_io += 1;
        IoId(self.next_io)
    }

    /// The work of [`Engine::handle_io_done`].
    pub(super) fn on_io_done(&mut self, now: Millis, io: IoId) {
        while self.pending_io.front().is_some_and(|p| match p {
            PendingIo::Log { io: i, .. } | PendingIo::Vote { io: i, .. } => *i <= io,
        }) {
            match self.pending_io.pop_front().expect("checked") {
                // `last` is clamped by every truncation issued after this write, so it is
                // always a prefix of the current log.
                PendingIo::Log { last, .. } => self.persisted = last,
                PendingIo::Vote { vote, .. } => self.vote_durable = vote,
            }
        }
        // Vote answers waiting for durability.
        if !self.vote_replies.is_empty() && self.vote_durable == self.vote {
            for (to, term) in std::mem::take(&mut self.vote_replies) {
                if term == self.vote.term && self.vote.voted_for == Some(to) {
                    self.send(to, MessageBody::VoteResp { granted: true });
                }
            }
        }
        if let Some((leader, term, matched)) = self.ack_pending {
            if term != self.vote.term {
                self.ack_pending = None;
            } else if self.persisted.index >= matched {
                self.ack_pending = None;
                self.send(leader, MessageBody::AppendResp(AppendResult::Success { matched }));
            }
        }
        match self.role.role() {
            Role::Candidate => self.check_election_won(now),
            Role::Leader => {
                let advanced = self.maybe_commit(now);
                self.notify_commit(now, advanced);
            }
            _ => {}
        }
        self.maybe_apply();
        self.evict_cache();
        self.flush_rounds(now);
    }

    /// Hands newly committed and durable entries to the state machine (not while a snapshot is
    /// being installed).
    pub(super) fn maybe_apply(&mut self) {
        if self.receiving.as_ref().is_some_and(|r| r.installing) {
            return;
        }
        let to = self.committed.min(self.persisted.index);
        if to > self.apply_sent {
            let first = self.apply_sent.next();
            let entries = self.log.cached_range(first, to);
            self.actions.push_back(Action::Apply { first, last: to, entries });
            self.apply_sent = to;
        }
    }

    /// Drops cached entries no longer needed: durable, applied and (on a leader) sent to and
    /// matched by every follower; and beyond the byte budget, any durable entry.
    fn evict_cache(&mut self) {
        let mut keep_after = self.persisted.index.min(self.apply_sent);
        if let Some(l) = self.role.leader() {
            let min_matched = l.progress.values().map(|p| p.matched).min().unwrap_or(keep_after);
            let over_budget = self.log.cache_bytes() > self.config.entry_cache_bytes_max;
            if !over_budget {
                keep_after = keep_after.min(min_matched);
            }
        }
        self.log.evict_cache_up_to(keep_after);
    }

    /// The work of [`Engine::handle_applied`].
    pub(super) fn on_applied(&mut self, _now: Millis, index: LogIndex) {
        if index > self.applied {
            self.applied = index;
        }
        self.evict_cache();
    }
}
