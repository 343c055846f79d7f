//! The engine's state invariants, checked at the end of every input in debug builds (the
//! tests and the simulator's default run), never compiled into release builds. A violation
//! is a bug in the engine (or a driver breaking its contract), so it panics at the input
//! that broke the state rather than steps later where a symptom shows.

use super::*;

impl Engine {
    /// Panics, naming the rule and the state, if an invariant does not hold.
    #[cfg(debug_assertions)]
    pub(super) fn check_invariants(&self) {
        let last = self.log.last_index();
        let ctx = || format!("node {} term {} role {:?}", self.id, self.vote.term, self.role.role());
        // The log: applied <= handed to apply <= committed <= last; durable <= last.
        assert!(
            self.applied <= self.apply_sent,
            "{}: applied {} beyond apply_sent {}",
            ctx(),
            self.applied,
            self.apply_sent
        );
        assert!(
            self.apply_sent <= self.committed,
            "{}: apply_sent {} beyond committed {}",
            ctx(),
            self.apply_sent,
            self.committed
        );
        assert!(self.committed <= last, "{}: committed {} beyond the last log index {}", ctx(), self.committed, last);
        assert!(
            self.persisted.index <= last,
            "{}: persisted {} beyond the last log index {}",
            ctx(),
            self.persisted,
            last
        );
        // Entries handed to apply are durable, unless a snapshot brought them (while the log
        // is reset behind an installed snapshot, `persisted` follows the truncation first).
        let purged = self.log.last_purged().index;
        assert!(
            self.apply_sent <= self.persisted.index.max(purged),
            "{}: applying up to {} but only {} is durable (log purged to {})",
            ctx(),
            self.apply_sent,
            self.persisted,
            purged
        );
        // The log is purged only behind what the state machine holds durably: a restart
        // never needs an entry that is gone.
        assert!(
            purged <= self.durable_applied,
            "{}: log purged to {} beyond the durable applied index {}",
            ctx(),
            purged,
            self.durable_applied
        );
        assert!(
            self.log.first_index() <= last.next(),
            "{}: log starts at {} after its end {}",
            ctx(),
            self.log.first_index(),
            last
        );
        // `persisted` names an entry of the current log (or one behind its purged start): a
        // truncation clamps every pending write, so no deleted entry counts as durable.
        assert!(
            self.persisted.index <= self.log.last_purged().index || self.log.has(self.persisted),
            "{}: persisted {} is not in the log",
            ctx(),
            self.persisted
        );
        // Writes complete in the order issued: pending ids only grow.
        let ios = self.pending_io.iter().map(|p| match p {
            PendingIo::Log { io, .. } | PendingIo::Vote { io, .. } => *io,
        });
        assert!(ios.clone().zip(ios.skip(1)).all(|(a, b)| a < b), "{}: pending writes out of order", ctx());
        // The vote: what is durable is never ahead of what is current.
        assert!(
            self.vote_durable.term <= self.vote.term,
            "{}: durable vote {:?} ahead of the current vote {:?}",
            ctx(),
            self.vote_durable,
            self.vote
        );
        // Vote answers wait only while the vote is not durable (they go out when it becomes so).
        assert!(
            self.vote_replies.is_empty() || self.vote_durable != self.vote,
            "{}: vote answers held back although the vote is durable",
            ctx()
        );
        // A snapshot being received never grows past its size.
        if let Some(r) = &self.receiving {
            assert!(
                r.offset <= r.meta.size_bytes,
                "{}: received {} bytes of a {}-byte snapshot",
                ctx(),
                r.offset,
                r.meta.size_bytes
            );
        }
        // The role: leader iff it knows itself as leader; candidates and leaders voted for
        // themselves; a follower is a learner exactly when its configuration says so.
        assert_eq!(
            self.role.is_leader(),
            self.leader == Some(self.id),
            "{}: leader state and known leader {:?} disagree",
            ctx(),
            self.leader
        );
        match &self.role {
            RoleState::Leader(l) => {
                assert_eq!(self.vote.voted_for, Some(self.id), "{}: a leader that did not vote for itself", ctx());
                assert_eq!(self.vote_durable, self.vote, "{}: a leader whose vote is not durable", ctx());
                assert!(l.noop_index <= last, "{}: the term's first entry {} is not in the log", ctx(), l.noop_index);
                assert!(!l.progress.contains_key(&self.id), "{}: a leader replicating to itself", ctx());
                if let Err(e) = l.reads.check_bounds() {
                    panic!("{}: {e}", ctx());
                }
                for (id, p) in &l.progress {
                    assert_eq!(
                        p.inflight_bytes,
                        p.inflight.iter().map(|(_, b)| b).sum::<u64>(),
                        "{}: bytes in flight to {id} miscounted",
                        ctx()
                    );
                    assert!(
                        p.inflight.len() <= self.config.inflight_msgs_max,
                        "{}: {} appends in flight to {id}, more than the window",
                        ctx(),
                        p.inflight.len()
                    );
                    assert!(
                        p.matched < p.next,
                        "{}: follower {id} matched {} but next is {}",
                        ctx(),
                        p.matched,
                        p.next
                    );
                }
                if let Some(t) = &l.transfer {
                    assert_ne!(t.target, self.id, "{}: a leader transferring to itself", ctx());
                }
                let sum: u64 = l.uncommitted.iter().map(|(_, b)| b).sum();
                assert_eq!(sum, l.uncommitted_bytes, "{}: uncommitted bytes miscounted", ctx());
                assert!(
                    l.uncommitted.front().is_none_or(|(i, _)| *i > self.committed),
                    "{}: a committed proposal still counted as uncommitted",
                    ctx()
                );
            }
            RoleState::Candidate { granted } | RoleState::PreCandidate { granted } => {
                assert!(!granted.contains(&self.id), "{}: counts its own vote among the granted", ctx());
                if matches!(self.role, RoleState::Candidate { .. }) {
                    assert_eq!(
                        self.vote.voted_for,
                        Some(self.id),
                        "{}: a candidate that did not vote for itself",
                        ctx()
                    );
                }
            }
            RoleState::Follower | RoleState::Learner => {
                let learner = self.effective().membership.is_learner(self.id);
                assert_eq!(
                    matches!(self.role, RoleState::Learner),
                    learner,
                    "{}: the role disagrees with the configuration {}",
                    ctx(),
                    self.effective().membership
                );
            }
        }
    }

    /// Release builds check nothing.
    #[cfg(not(debug_assertions))]
    #[inline(always)]
    pub(super) fn check_invariants(&self) {}
}
