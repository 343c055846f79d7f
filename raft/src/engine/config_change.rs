//! Configuration changes (leader side): learners added and removed, voters changed by joint
//! consensus, and moving on from a committed joint configuration. Raft thesis §4.3.

use super::*;

impl Engine {
    /// The work of [`Engine::add_learner`].
    pub(super) fn propose_add_learner(&mut self, now: Millis, node: NodeId) -> Result<LogIndex, RaftError> {
        self.check_can_change()?;
        let mut m = self.effective().membership.clone();
        if m.is_voter(node) {
            return Err(RaftError::InvalidTarget(node, "already a voter (remove it with change_membership)"));
        }
        if m.contains(node) {
            return Ok(self.effective().log_id.index);
        }
        m.learners.insert(node);
        Ok(self.propose_membership(now, m))
    }

    /// The work of [`Engine::remove_learner`].
    pub(super) fn propose_remove_learner(&mut self, now: Millis, node: NodeId) -> Result<LogIndex, RaftError> {
        self.check_can_change()?;
        let mut m = self.effective().membership.clone();
        if m.is_voter(node) {
            return Err(RaftError::InvalidTarget(node, "a voter (remove it with change_membership)"));
        }
        if !m.learners.remove(&node) {
            return Ok(self.effective().log_id.index);
        }
        Ok(self.propose_membership(now, m))
    }

    /// The work of [`Engine::change_membership`].
    pub(super) fn propose_voters(&mut self, now: Millis, voters: BTreeSet<NodeId>) -> Result<LogIndex, RaftError> {
        let l = self.check_can_change()?;
        let cur = self.effective().membership.clone();
        if voters == cur.voters {
            return Ok(self.effective().log_id.index);
        }
        if self.config.votes_need_configuration {
            // A new voter must already hold a configuration, or it could never vote: a
            // configuration whose new majority needs it would have no leader once this one
            // is gone. It holds one once it matched the entry of the configuration in effect.
            let conf_index = self.effective().log_id.index;
            for v in voters.iter().filter(|v| !cur.voters.contains(v) && **v != self.id) {
                if l.progress.get(v).is_none_or(|p| p.matched < conf_index) {
                    return Err(RaftError::InvalidTarget(
                        *v,
                        "has not received the configuration yet: add it as a learner and let it catch up first",
                    ));
                }
            }
        }
        let mut learners = cur.learners.clone();
        learners.retain(|l| !voters.contains(l));
        let joint = Membership { voters, outgoing: Some(cur.voters.clone()), learners };
        joint.validate().map_err(RaftError::InvalidMembership)?;
        Ok(self.propose_membership(now, joint))
    }

    /// The leader's state if a configuration change may start now: none is in progress and
    /// this term's first entry is committed (thesis §4.1: one change at a time).
    fn check_can_change(&self) -> Result<&LeaderState, RaftError> {
        let l = self.check_can_propose()?;
        let eff = self.effective();
        if eff.log_id.index > self.committed || eff.membership.is_joint() || self.committed < l.noop_index {
            return Err(RaftError::ChangeInProgress);
        }
        Ok(l)
    }

    /// Appends configuration `m` as a new entry of this term and replicates it.
    fn propose_membership(&mut self, now: Millis, m: Membership) -> LogIndex {
        let log_id = LogId { term: self.vote.term, index: self.log.last_index().next() };
        info!(node = %self.id, term = %self.vote.term, %log_id, membership = %m, "proposing configuration");
        self.leader_append(now, vec![Entry { log_id, payload: EntryPayload::Membership(Box::new(m)) }]);
        log_id.index
    }

    /// Once the configuration in effect is committed: a joint one moves on to the new
    /// configuration alone; a leader the new one leaves out steps down.
    pub(super) fn advance_configuration(&mut self, now: Millis) {
        if !self.role.is_leader() {
            return;
        }
        let eff = self.memberships.effective().clone();
        if eff.log_id.index <= self.committed {
            if let Some(_outgoing) = &eff.membership.outgoing {
                // The joint configuration is committed: move to the new one alone.
                let m = Membership {
                    voters: eff.membership.voters.clone(),
                    outgoing: None,
                    learners: eff.membership.learners.clone(),
                };
                self.propose_membership(now, m);
            } else if !eff.membership.voters.contains(&self.id) {
                info!(node = %self.id, term = %self.vote.term, "removed from the configuration: stepping down");
                self.become_follower(now, self.vote.term, None);
            }
        }
    }
}
