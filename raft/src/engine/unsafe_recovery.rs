//! Unsafe recovery: a group that lost a majority of its voters for good (their disks are
//! gone) is forced onto this one replica. Not Raft: the operator accepts losing whatever the
//! lost voters had and this replica lacks. Never called by the protocol itself; the only
//! caller is an operator's `flotilla admin unsafe-recover` (TiKV's online unsafe recovery).
//!
//! How, keeping the engine's own invariants: the replica campaigns in a new term (voting for
//! itself, as any candidate does), then appends, in that term, a configuration of itself
//! alone. The latest configuration in the log is the one in effect, so the election is won by
//! its own vote once that vote is durable; the new leader's blank entry commits by itself too,
//! and with it every entry this replica held (the index it kept). Nothing else changes: the
//! log is not rewritten, no entry is dropped, and the other members of the old configuration
//! are no longer asked for anything once the forced configuration commits.

use super::*;

impl Engine {
    /// The work of [`Engine::force_alone`].
    pub(super) fn force_alone_now(
        &mut self,
        now: Millis,
        dead: &BTreeSet<NodeId>,
        expected_last: LogId,
    ) -> Result<LogIndex, RaftError> {
        if !self.has_configuration() {
            return Err(RaftError::InvalidMembership(
                "this replica holds no configuration: it has nothing to keep, pick another".into(),
            ));
        }
        if self.receiving.as_ref().is_some_and(|r| r.installing) {
            // Its state machine is being replaced: what it keeps is not known until then.
            return Err(RaftError::ChangeInProgress);
        }
        let alone = Membership::new([self.id]);
        if self.role.is_leader() && self.effective().membership == alone {
            // Already forced (a retried request): nothing more to do.
            return Ok(self.effective().log_id.index);
        }
        // Guards against a mistaken request (a typo in the dead nodes, or a decision made on
        // a state that has moved on): forcing a group that still has its quorum makes two
        // leaders of one group.
        if dead.contains(&self.id) {
            return Err(RaftError::InvalidMembership(format!("refused: this node ({}) is named dead", self.id)));
        }
        if self.effective().membership.is_quorum(|n| !dead.contains(&n)) {
            return Err(RaftError::InvalidMembership(format!(
                "refused: the nodes named dead hold no majority of either half of this replica's configuration {:?}: \
                 the group still has its quorum",
                self.effective().membership
            )));
        }
        let last = self.log.last_id();
        if last != expected_last {
            return Err(RaftError::InvalidMembership(format!(
                "refused: this replica's last log id is {last}, not {expected_last} as the request saw it \
                 (it has moved on: decide again from what the nodes report now)"
            )));
        }
        if self.role.is_leader() {
            // A leader of a configuration that lost its quorum: its term cannot commit.
            self.become_follower(now, self.vote.term, None);
        }
        // A snapshot transfer from the lost leader will never finish.
        self.receiving = None;
        let kept = self.log.last_id();
        warn!(node = %self.id, term = %self.vote.term, %kept, "unsafe recovery: forcing this replica alone");
        // `campaign` may win at once only under the configuration in effect, which still
        // needs the lost voters; it wins below, under the forced one.
        self.campaign(now, false);
        let log_id = LogId { term: self.vote.term, index: kept.index.next() };
        self.append_local(vec![Entry { log_id, payload: EntryPayload::Membership(Box::new(alone)) }]);
        // Won once the vote for itself is durable (checked again in handle_io_done).
        self.check_election_won(now);
        Ok(log_id.index)
    }
}
