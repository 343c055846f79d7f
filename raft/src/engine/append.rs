//! The follower's side of replication: appends and heartbeats from the leader, conflicts and
//! truncation, and acknowledgements sent only once the entries are durable. Raft §5.3.

use super::*;

impl Engine {
    /// An append from the leader of our term: check it, keep what matches, truncate a
    /// conflicting suffix, append the rest, learn the commit index, acknowledge once durable.
    pub(super) fn on_append(&mut self, now: Millis, from: NodeId, prev: LogId, entries: Vec<Entry>, commit: LogIndex) {
        // Input from the network: check the shape before trusting it.
        // A `prev` of a term after ours is no entry of this leader's log: dropped, not taken
        // for a fork below our commit index.
        let well_formed = prev.term <= self.vote.term
            && entries.iter().enumerate().all(|(i, e)| {
                prev.index.0.checked_add(i as u64 + 1) == Some(e.log_id.index.0)
                    && e.log_id.term >= prev.term
                    && e.log_id.term <= self.vote.term
            })
            && entries.windows(2).all(|w| w[0].log_id.term <= w[1].log_id.term);
        if !well_formed {
            warn!(node = %self.id, %from, %prev, "malformed append dropped");
            return;
        }
        if let Some((index, ours, theirs)) = self.forked_below_commit(prev, &entries) {
            return self.stop_forked(from, index, ours, theirs);
        }
        if prev.index < self.committed {
            // Everything up to our commit index matches the leader's log already (what the
            // message shows of it was checked above). Keep only the entries after it.
            let skip = (self.committed.0 - prev.index.0) as usize;
            if skip >= entries.len() {
                self.ack(from, self.committed);
                return;
            }
            let prev = self.log.id_at(self.committed).expect("committed entry is in the log");
            let mut rest = entries;
            rest.drain(..skip);
            return self.on_append(now, from, prev, rest, commit);
        }
        if !self.log.has(prev) {
            let hint_index = prev.index.min(self.log.last_index());
            let hint = self.log.find_conflict_by_term(hint_index, prev.term);
            debug!(node = %self.id, term = %self.vote.term, %prev, %hint, "append rejected");
            self.send(from, MessageBody::AppendResp(AppendResult::Conflict { rejected: prev, hint }));
            return;
        }
        let matched = LogIndex(prev.index.0 + entries.len() as u64);
        // Find the first entry we do not already have.
        let mut new_from = entries.len();
        for (i, e) in entries.iter().enumerate() {
            match self.log.term_at(e.log_id.index) {
                Some(t) if t == e.log_id.term => continue,
                Some(_) => {
                    // Entries here follow `prev`, at or past our commit index: one at or below
                    // it that differs stopped the replica above.
                    debug_assert!(e.log_id.index > self.committed, "conflict at committed {}", e.log_id.index);
                    info!(node = %self.id, term = %self.vote.term, from = %e.log_id.index, "truncating conflicting entries");
                    self.truncate_local(e.log_id.index);
                    new_from = i;
                    break;
                }
                None => {
                    new_from = i;
                    break;
                }
            }
        }
        if new_from < entries.len() {
            // The message's own vector, its known prefix dropped: no copy of the entries.
            let mut new = entries;
            new.drain(..new_from);
            self.append_local(new);
        }
        let new_commit = commit.min(matched);
        if new_commit > self.committed {
            self.committed = new_commit;
            self.after_commit(now);
        }
        self.ack(from, matched);
    }

    /// The first entry the append names (`prev`, then its entries) at or below our commit
    /// index whose term differs from ours there, as (index, our term, the leader's term).
    /// The leader of our term holds every committed entry (Raft §5.4.1, leader completeness),
    /// so any such entry means the histories forked: an unsafe recovery forced the group onto
    /// a replica that lacked entries another survivor had committed, or a disk lost writes it
    /// had confirmed. Entries we purged are not compared (their term is gone here).
    fn forked_below_commit(&self, prev: LogId, entries: &[Entry]) -> Option<(LogIndex, Term, Term)> {
        std::iter::once(prev)
            .chain(entries.iter().map(|e| e.log_id))
            .take_while(|id| id.index <= self.committed)
            .find_map(|id| match self.log.term_at(id.index) {
                Some(ours) if ours != id.term => Some((id.index, ours, id.term)),
                _ => None,
            })
    }

    /// Stops the replica whose log forked from the leader's at `index`, at or below our commit
    /// index: acknowledging would let the leader count entries we do not hold, truncating
    /// would undo entries we applied, and nothing from the network may panic the process.
    /// The driver stops the group with [`Fatal::Diverged`]; an operator decides which history
    /// stays.
    fn stop_forked(&mut self, leader: NodeId, index: LogIndex, ours: Term, theirs: Term) {
        error!(node = %self.id, %leader, %index, ours = %ours, theirs = %theirs, committed = %self.committed,
            "log forked from the leader's at or below the commit index: stopping the group");
        self.fatal = Some(Box::new(Fatal::Diverged { leader, index, ours, theirs }));
        // Nothing queued goes out any more either: the driver stops on the next poll.
        self.actions.clear();
    }

    /// A heartbeat from the leader of our term: learn the commit index and answer the round.
    /// Only if we hold the entry the leader names there: the leader sends what we matched, but
    /// our disk may have rolled back since (restored from an older copy, or a device that lied
    /// about a sync) to an entry of an earlier term that was never committed. The next append
    /// finds where our log and the leader's agree, and carries the commit index from there.
    pub(super) fn on_heartbeat(&mut self, now: Millis, from: NodeId, commit: LogId, round: u64) {
        // The leader names its own committed entry: at or below our commit index we hold a
        // committed entry there too, and another term means the histories forked (a quiet
        // group would otherwise answer the leader's read rounds until its next write).
        if commit.index.0 > 0 && commit.index <= self.committed && commit.term <= self.vote.term {
            if let Some(ours) = self.log.term_at(commit.index).filter(|ours| *ours != commit.term) {
                return self.stop_forked(from, commit.index, ours, commit.term);
            }
        }
        if commit.index > self.committed && self.log.has(commit) {
            self.committed = commit.index;
            self.after_commit(now);
        }
        self.send(from, MessageBody::HeartbeatResp { round });
    }

    /// Appends to the local log and issues the write; applies configuration entries.
    pub(super) fn append_local(&mut self, entries: Vec<Entry>) {
        debug_assert!(!entries.is_empty());
        self.log.append(&entries);
        for e in &entries {
            if let Some(m) = e.membership() {
                self.memberships.push(StoredMembership { log_id: e.log_id, membership: m.clone() });
            }
        }
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Log { io, last: self.log.last_id() });
        self.actions.push_back(Action::AppendEntries { io, entries });
        self.refresh_role();
    }

    /// Deletes entries from `index` on (a conflict with the leader) and issues the write; writes
    /// still pending are clamped so that `persisted` never names a deleted entry.
    pub(super) fn truncate_local(&mut self, index: LogIndex) {
        self.log.truncate_from(index);
        self.memberships.truncate_from(index);
        let keep = self.log.last_id();
        if self.persisted.index >= index {
            self.persisted = keep;
        }
        for p in self.pending_io.iter_mut() {
            if let PendingIo::Log { last, .. } = p {
                if last.index >= index {
                    *last = keep;
                }
            }
        }
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Log { io, last: keep });
        self.actions.push_back(Action::TruncateFrom { io, index });
        self.refresh_role();
    }

    /// Acknowledges entries up to `matched`, now if durable, else once durable.
    pub(super) fn ack(&mut self, leader: NodeId, matched: LogIndex) {
        if self.persisted.index >= matched || self.bugs().ack_before_durable {
            self.send(leader, MessageBody::AppendResp(AppendResult::Success { matched }));
        } else {
            let term = self.vote.term;
            match &mut self.ack_pending {
                Some((l, t, m)) if *l == leader && *t == term => *m = (*m).max(matched),
                slot => *slot = Some((leader, term, matched)),
            }
        }
    }
}
