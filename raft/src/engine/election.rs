//! Elections: pre-vote, vote, and the role changes they cause (follower, pre-candidate,
//! candidate, leader). Raft §5.2, with pre-vote and the check-quorum lease of thesis §9.6.

use super::*;

impl Engine {
    /// Whether this node may grant votes (see `Config::votes_need_configuration`). With that
    /// rule every legitimate voter holds the configuration that made it one: members formed
    /// the group with it, and a replica added later receives it (by snapshot or log) before
    /// it is promoted. A node without any is an empty replica — new, or re-created after its
    /// state was deleted — whose vote could elect a candidate lacking acknowledged entries.
    fn may_vote(&self) -> bool {
        !self.config.votes_need_configuration || self.has_configuration()
    }

    /// Whether this node may campaign: it is a voter of any configuration in its log, not
    /// only of the latest. A node that alone holds an uncommitted entry removing it may be the
    /// only one whose log can win, and the others, still joint, need a leader to finish the
    /// change (tests/regressions.rs:
    /// a_node_removed_by_an_uncommitted_configuration_still_campaigns).
    pub(super) fn can_campaign(&self) -> bool {
        self.memberships.is_voter_in_any(self.id)
    }

    /// Whether this node refuses to help elect another leader at `now`: it leads, or it heard
    /// from a leader less than `election_timeout_ms_min` ago (check-quorum only).
    pub(super) fn in_lease(&self, now: Millis) -> bool {
        if !self.config.check_quorum || self.bugs().vote_within_promise {
            return false;
        }
        if self.role.is_leader() {
            return true;
        }
        // Not conditional on knowing the leader: a node that acknowledged a leader's heartbeat
        // keeps its promise not to vote for `election_timeout_ms_min` even if it learned of a
        // higher term meanwhile, or restarted (see Engine::new); lease reads rely on it.
        self.leader_contact_at.is_some_and(|t| now.since(t) < self.config.election_timeout_ms_min)
    }

    /// A message from the leader of our term: follow it and restart the election timer.
    pub(super) fn on_leader_contact(&mut self, now: Millis, from: NodeId) {
        debug_assert!(!self.role.is_leader(), "two leaders in term {}", self.vote.term);
        if self.role.is_leader() {
            return;
        }
        if !self.role.is_following() || self.leader != Some(from) {
            self.become_follower(now, self.vote.term, Some(from));
        }
        self.leader_contact_at = Some(now);
        self.reset_election_timer(now);
    }

    /// Follows `leader` (or nobody yet) in `term`; a leader stepping down fails its waiting reads.
    pub(super) fn become_follower(&mut self, now: Millis, term: Term, leader: Option<NodeId>) {
        if term > self.vote.term {
            self.set_vote(Vote { term, voted_for: None });
        }
        let learner = self.effective().membership.is_learner(self.id);
        let was = std::mem::replace(&mut self.role, RoleState::following(learner));
        let was_follower = was.is_following();
        if let RoleState::Leader(l) = was {
            info!(node = %self.id, term = %term, "leader stepping down");
            for id in l.reads.into_waiting_ids() {
                self.actions.push_back(Action::ReadFailed { id, error: RaftError::NotLeader { leader } });
            }
        }
        if leader.is_some() && self.leader != leader {
            debug!(node = %self.id, term = %term, leader = ?leader, "following");
        }
        if self.leader != leader && self.receiving.as_ref().is_some_and(|r| !r.installing) {
            // Chunks of different senders must never mix.
            self.receiving = None;
        }
        self.leader = leader;
        // A follower that merely learns a higher term (from a vote request it may refuse) keeps
        // its election timer (Raft §5.2: only a leader's messages and granted votes reset it).
        // Otherwise candidates that cannot win, each bumping the term, would keep the node with
        // the most up-to-date log from ever campaigning (tests/regressions.rs:
        // a_refused_vote_request_from_a_higher_term_does_not_reset_the_election_timer).
        if !was_follower || leader.is_some() {
            self.reset_election_timer(now);
        }
    }

    /// Election timeout with pre-vote: asks the voters whether they would vote for us in the
    /// next term, without changing the term (thesis §9.6).
    pub(super) fn pre_campaign(&mut self, now: Millis) {
        debug!(node = %self.id, term = %self.vote.term, "election timeout: pre-vote");
        self.role = RoleState::PreCandidate { granted: BTreeSet::new() };
        self.leader = None;
        self.reset_election_timer(now);
        let term = self.vote.term.next();
        let last_log_id = self.log.last_id();
        for id in self.effective().membership.nodes() {
            if id != self.id && self.effective().membership.is_voter(id) {
                self.send_at(id, term, MessageBody::PreVote { last_log_id });
            }
        }
        self.check_election_won(now);
    }

    /// Starts an election in the next term, voting for ourselves. `transfer` marks an election
    /// the leader asked for, which followers' leases do not block.
    pub(super) fn campaign(&mut self, now: Millis, transfer: bool) {
        let term = self.vote.term.next();
        info!(node = %self.id, term = %term, transfer, "campaigning");
        if let RoleState::Leader(l) =
            std::mem::replace(&mut self.role, RoleState::Candidate { granted: BTreeSet::new() })
        {
            debug_assert!(l.transfer.is_none());
        }
        self.leader = None;
        self.set_vote(Vote { term, voted_for: Some(self.id) });
        self.reset_election_timer(now);
        let last_log_id = self.log.last_id();
        for id in self.effective().membership.nodes() {
            if id != self.id && self.effective().membership.is_voter(id) {
                self.send(id, MessageBody::Vote { last_log_id, transfer });
            }
        }
        self.check_election_won(now);
    }

    /// A pre-vote request for `term`: granted if it is above ours, no leader is alive and the
    /// candidate's log is at least as up to date.
    pub(super) fn on_pre_vote(&mut self, now: Millis, from: NodeId, term: Term, last_log_id: LogId) {
        // `term` is the candidate's next term; our own is lower or equal.
        let up_to_date = last_log_id >= self.log.last_id() || self.bugs().vote_without_log_check;
        let grant = term > self.vote.term && !self.in_lease(now) && up_to_date && self.may_vote();
        debug!(node = %self.id, term = %self.vote.term, %from, grant, "pre-vote request");
        self.send_at(from, if grant { term } else { self.vote.term }, MessageBody::PreVoteResp { granted: grant });
    }

    /// A pre-vote answer: count it if we still pre-campaign for the next term.
    pub(super) fn on_pre_vote_resp(&mut self, now: Millis, from: NodeId, term: Term, granted: bool) {
        if term != self.vote.term.next() || !granted {
            return;
        }
        let RoleState::PreCandidate { granted: votes } = &mut self.role else { return };
        votes.insert(from);
        self.check_election_won(now);
    }

    /// A vote request in our term: granted once per term to a candidate whose log is at least as
    /// up to date, answered only once the vote is durable.
    pub(super) fn on_vote(&mut self, now: Millis, from: NodeId, last_log_id: LogId) {
        let can_vote = self.vote.voted_for == Some(from) || (self.vote.voted_for.is_none() && self.leader.is_none());
        let up_to_date = last_log_id >= self.log.last_id() || self.bugs().vote_without_log_check;
        let configured = self.may_vote();
        if !(can_vote && up_to_date && configured) {
            debug!(node = %self.id, term = %self.vote.term, %from, can_vote, up_to_date, configured, "vote refused");
            self.send(from, MessageBody::VoteResp { granted: false });
            return;
        }
        debug!(node = %self.id, term = %self.vote.term, %from, "vote granted");
        if self.vote.voted_for != Some(from) {
            self.set_vote(Vote { term: self.vote.term, voted_for: Some(from) });
        }
        self.reset_election_timer(now);
        if self.vote_durable == self.vote {
            self.send(from, MessageBody::VoteResp { granted: true });
        } else {
            self.vote_replies.push((from, self.vote.term));
        }
    }

    /// A vote answer: count it if we are still a candidate of this term.
    pub(super) fn on_vote_resp(&mut self, now: Millis, from: NodeId, granted: bool) {
        if !granted {
            return;
        }
        let RoleState::Candidate { granted: votes } = &mut self.role else { return };
        votes.insert(from);
        self.check_election_won(now);
    }

    /// Moves on if a (joint) quorum granted: a pre-candidate campaigns, a candidate leads.
    pub(super) fn check_election_won(&mut self, now: Millis) {
        let (granted, pre_vote) = match &self.role {
            RoleState::PreCandidate { granted } => (granted, true),
            // A candidate acts as leader of its term only once its vote for itself (and so the
            // term) is durable: otherwise, after a crash, it could campaign in the same term
            // again and lead it twice with different logs. Checked again in handle_io_done.
            RoleState::Candidate { .. } if self.vote_durable != self.vote => return,
            RoleState::Candidate { granted } => (granted, false),
            _ => return,
        };
        let won = self.memberships.effective().membership.is_quorum(|id| id == self.id || granted.contains(&id));
        if !won {
            return;
        }
        if pre_vote {
            self.campaign(now, false);
        } else {
            self.become_leader(now);
        }
    }

    /// Leads the current term: progress for every member, and a blank entry of the term whose
    /// commit commits everything before it (Raft §5.4.2) and opens reads.
    fn become_leader(&mut self, now: Millis) {
        info!(node = %self.id, term = %self.vote.term, last_log_id = %self.log.last_id(), "became leader");
        self.leader = Some(self.id);
        let next = self.log.last_index().next();
        let progress = self
            .memberships
            .nodes_in_any()
            .into_iter()
            .filter(|id| *id != self.id)
            .map(|id| (id, Box::new(Progress::new(next, now))))
            .collect();
        self.role = RoleState::Leader(Box::new(LeaderState {
            progress,
            noop_index: next,
            reads: Reads::new(now),
            heartbeat_at: now.add_ms(self.config.heartbeat_interval_ms),
            commit_notice_at: None,
            check_quorum_at: now.add_ms(self.config.election_timeout_ms_min),
            transfer: None,
            uncommitted: VecDeque::new(),
            uncommitted_bytes: 0,
            woke_after_round: None,
        }));
        let log_id = LogId { term: self.vote.term, index: next };
        self.leader_append(now, vec![Entry { log_id, payload: EntryPayload::Blank }]);
    }
}
