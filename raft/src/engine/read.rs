//! Linearizable reads on the leader: ReadIndex rounds of heartbeats confirmed by a quorum,
//! and the leader lease that skips the round trip (Raft thesis §6.4). [`Reads`] is the
//! leader's bookkeeping of both, a type of its own (as raft-rs's `ReadOnly`); the engine
//! only tells it which round a quorum acknowledged.

use super::*;
use replication::Replicator;

/// A ReadIndex read waiting for its heartbeat round.
#[derive(Debug)]
pub(super) struct PendingRead {
    /// The caller's id for the read.
    pub(super) id: u64,
    /// The heartbeat round that must be acknowledged by a quorum.
    pub(super) round: u64,
    /// The commit index when the read arrived.
    pub(super) index: LogIndex,
}

/// Bound on the history of heartbeat rounds kept for lease reads.
pub(super) const ROUNDS_KEPT_MAX: usize = 64;

/// The leader's reads and heartbeat rounds. Every heartbeat carries its round number; a
/// quorum acknowledging round `r` proves this node was leader when `r` was sent.
#[derive(Debug)]
pub(super) struct Reads {
    /// Last heartbeat round started.
    round: u64,
    /// A round must be started at the end of this step (reads are waiting on it).
    round_needed: bool,
    /// The round asked for must reach every follower: the heartbeat timer asked for it, and
    /// its heartbeats also hold followers' election timers back and tell them the commit
    /// index. A round only reads asked for needs no more than a quorum.
    round_to_all: bool,
    /// When the pending round was asked for: its start time for the lease.
    round_requested_at: Millis,
    /// Round acknowledgements counted so far (`count_answer`).
    answers: u64,
    /// Send time of recent rounds, oldest first (lease reads), at most `ROUNDS_KEPT_MAX`.
    round_sent_at: VecDeque<(u64, Millis)>,
    /// Reads waiting for their round to be acknowledged by a quorum, by round.
    pending: VecDeque<PendingRead>,
    /// Reads waiting for the first commit of this term (until then the leader's commit
    /// index may lag what earlier leaders committed).
    before_noop: Vec<(u64, ReadMode)>,
    /// A `TimeoutNow` went out this term: the target may win an election that ignores
    /// followers' leases at any time from now on, so this leader's lease is void for good.
    lease_void: bool,
}

impl Reads {
    /// No reads, no round yet.
    pub(super) fn new(now: Millis) -> Reads {
        Reads {
            round: 0,
            round_needed: false,
            round_to_all: false,
            round_requested_at: now,
            answers: 0,
            round_sent_at: VecDeque::new(),
            pending: VecDeque::new(),
            before_noop: Vec::new(),
            lease_void: false,
        }
    }

    /// Queues a ReadIndex read served at `index` once a quorum acknowledges the next round.
    /// The round starts when actions are next polled, so reads registered together share one
    /// round of heartbeats.
    pub(super) fn add(&mut self, id: u64, index: LogIndex, now: Millis) {
        self.pending.push_back(PendingRead { id, round: self.round + 1, index });
        self.round_needed = true;
        self.round_requested_at = now;
    }

    /// Parks a read until the first entry of the term is committed.
    pub(super) fn wait_for_first_commit(&mut self, id: u64, mode: ReadMode) {
        self.before_noop.push((id, mode));
    }

    /// The reads parked by `wait_for_first_commit`, in order.
    pub(super) fn take_waiting_for_first_commit(&mut self) -> Vec<(u64, ReadMode)> {
        std::mem::take(&mut self.before_noop)
    }

    /// Asks for a heartbeat round to every follower (the heartbeat timer fired).
    pub(super) fn request_round(&mut self, now: Millis) {
        self.round_needed = true;
        self.round_to_all = true;
        self.round_requested_at = now;
    }

    /// When the round asked for was requested, if one is waiting to start.
    pub(super) fn round_requested_at(&self) -> Option<Millis> {
        self.round_needed.then_some(self.round_requested_at)
    }

    /// Counts a follower's first acknowledgement of a round and returns the count: the order
    /// in which followers answered.
    pub(super) fn count_answer(&mut self) -> u64 {
        self.answers += 1;
        self.answers
    }

    /// The last round started (0: none yet).
    pub(super) fn last_round(&self) -> u64 {
        self.round
    }

    /// Starts the round asked for, sent at `now`: returns its number and whether it must reach
    /// every follower, or `None` if no round was asked for.
    pub(super) fn start_round(&mut self, now: Millis) -> Option<(u64, bool)> {
        if !self.round_needed {
            return None;
        }
        let to_all = self.round_to_all;
        self.round_needed = false;
        self.round_to_all = false;
        self.round += 1;
        // Room first: pushed onto a full history, the deque would double its buffer (to 128
        // rounds, 2 KiB per led group) only to drop the oldest at once.
        if self.round_sent_at.len() >= ROUNDS_KEPT_MAX {
            self.round_sent_at.pop_front();
        }
        self.round_sent_at.push_back((self.round, now));
        Some((self.round, to_all))
    }

    /// The reads whose round is at most `acked`, the highest round a quorum acknowledged,
    /// oldest first.
    pub(super) fn advance(&mut self, acked: u64) -> Vec<PendingRead> {
        let ready = self.pending.iter().take_while(|r| r.round <= acked).count();
        self.pending.drain(..ready).collect()
    }

    /// Round `acked`'s send time plus `lease_ms` (`None` if that round is not kept).
    pub(super) fn round_end(&self, acked: u64, lease_ms: u64) -> Option<Millis> {
        let (_, sent) = self.round_sent_at.iter().find(|(r, _)| *r == acked)?;
        Some(sent.add_ms(lease_ms))
    }

    /// Voids the lease for the rest of the term (a `TimeoutNow` went out).
    pub(super) fn void_lease(&mut self) {
        self.lease_void = true;
    }

    /// Whether no read waits and no round is asked for.
    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.before_noop.is_empty() && !self.round_needed
    }

    /// Whether any ReadIndex read waits for a round.
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Forgets the rounds older than `acked`, the highest round a quorum acknowledged (the
    /// lease never looks them up again: see [`Engine::release_idle_memory`]), and gives back
    /// the spare capacity of every queue.
    pub(super) fn release_idle_memory(&mut self, acked: u64) {
        while self.round_sent_at.front().is_some_and(|(r, _)| *r < acked) {
            self.round_sent_at.pop_front();
        }
        self.round_sent_at.shrink_to_fit();
        self.pending.shrink_to_fit();
        self.before_noop.shrink_to_fit();
    }

    /// (name, length, capacity) of the buffers `release_idle_memory` shrinks.
    #[cfg(test)]
    pub(super) fn buffer_sizes(&self) -> [(&'static str, usize, usize); 3] {
        [
            ("round_sent_at", self.round_sent_at.len(), self.round_sent_at.capacity()),
            ("pending reads", self.pending.len(), self.pending.capacity()),
            ("reads before noop", self.before_noop.len(), self.before_noop.capacity()),
        ]
    }

    /// Checks the bounds this type keeps: the round history is bounded and no read waits for
    /// a round after the next one.
    #[cfg(debug_assertions)]
    pub(super) fn check_bounds(&self) -> Result<(), String> {
        if self.round_sent_at.len() > ROUNDS_KEPT_MAX {
            return Err(format!("{} heartbeat rounds kept, more than {ROUNDS_KEPT_MAX}", self.round_sent_at.len()));
        }
        if let Some(r) = self.pending.iter().find(|r| r.round > self.round + 1) {
            return Err(format!("read {} waits for round {} but the last round is {}", r.id, r.round, self.round));
        }
        if !self.pending.iter().zip(self.pending.iter().skip(1)).all(|(a, b)| a.round <= b.round) {
            return Err("reads out of round order".to_string());
        }
        Ok(())
    }

    /// The ids of every read still waiting (the leader steps down: they fail), oldest first.
    pub(super) fn into_waiting_ids(self) -> impl Iterator<Item = u64> {
        self.pending.into_iter().map(|r| r.id).chain(self.before_noop.into_iter().map(|(id, _)| id))
    }
}

impl LeaderState {
    /// The highest heartbeat round a quorum of `membership` acknowledged (this node, `me`,
    /// acknowledges every round).
    pub(super) fn quorum_round(&self, me: NodeId, membership: &Membership) -> u64 {
        membership.quorum_value(|id| {
            if id == me {
                u64::MAX
            } else {
                self.progress.get(&id).map(|p| p.round_acked).unwrap_or(0)
            }
        })
    }
}

impl Engine {
    /// The work of [`Engine::read`].
    pub(super) fn register_read(&mut self, now: Millis, id: u64, mode: ReadMode) {
        let single = self.is_single_voter();
        let lease_ok = mode == ReadMode::Lease && self.lease_valid(now);
        let unchecked = self.bugs().read_without_read_index;
        let committed = self.committed;
        let Some(l) = self.role.leader_mut() else {
            self.actions.push_back(Action::ReadFailed { id, error: RaftError::NotLeader { leader: self.leader } });
            return;
        };
        if committed < l.noop_index {
            l.reads.wait_for_first_commit(id, mode);
            return;
        }
        if single || lease_ok || unchecked {
            self.actions.push_back(Action::ReadReady { id, index: committed });
            return;
        }
        l.reads.add(id, committed, now);
    }

    /// Whether this node is the only voter (no round trip needed to prove leadership).
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
        self.lease_end().is_some_and(|end| now < end)
    }

    /// When this leader's lease ends as things stand (later rounds acknowledged may extend
    /// it; a transfer, a configuration change or a step down may end it sooner): `None` if
    /// there is no lease (not leader, lease reads off, a transfer under way or sent, the
    /// term's first entry not committed). A single voter's lease never ends while it leads.
    pub fn lease_end(&self) -> Option<Millis> {
        let l = self.role.leader()?;
        let void = l.reads.lease_void && !self.bugs().lease_after_timeout_now;
        if !self.config.lease_read || l.transfer.is_some() || void || self.committed < l.noop_index {
            return None;
        }
        if self.is_single_voter() {
            return Some(Millis(u64::MAX));
        }
        let acked = l.quorum_round(self.id, &self.effective().membership);
        let lease_ms = if self.bugs().lease_past_drift_margin {
            self.config.election_timeout_ms_min + self.config.lease_clock_drift_ms
        } else {
            self.config.election_timeout_ms_min - self.config.lease_clock_drift_ms
        };
        l.reads.round_end(acked, lease_ms)
    }

    /// When a read served from the applied state without the engine may no longer be served
    /// so: the lease's end, while the state machine applied everything committed (so the
    /// term's first entry, and with it every write earlier leaders acknowledged and every
    /// state their reads saw). `None` if such reads must go through [`Engine::read`] now: a
    /// committed entry not applied here may be a split or a freeze that already lets another
    /// group take writes to keys this state machine still holds, or a write already answered.
    pub fn local_read_end(&self) -> Option<Millis> {
        if self.applied < self.committed {
            return None;
        }
        self.lease_end()
    }

    /// Starts a heartbeat round if one is needed. Every heartbeat carries the round number;
    /// a quorum acknowledging round `r` proves leadership as of the round's start.
    pub(super) fn flush_rounds(&mut self, now: Millis) {
        if self.role.leader().is_none_or(|l| l.reads.round_requested_at().is_none()) {
            return;
        }
        let keep_after = self.kept_for_followers(now);
        if let Some(mut r) = self.replicator() {
            r.flush_rounds(now, keep_after);
        }
        if keep_after > self.leader_keeps_after {
            // A follower caught up: what was kept for it may go now, not at the next write.
            self.leader_keeps_after = keep_after;
            self.purge_log(now, false);
        }
    }

    /// Serves the reads whose round a quorum acknowledged.
    pub(super) fn advance_reads(&mut self) {
        if let Some(mut r) = self.replicator() {
            r.advance_reads();
        }
    }
}

impl Replicator<'_> {
    /// Starts the heartbeat round asked for, if any, sent at `now`.
    fn flush_rounds(&mut self, now: Millis, keep_after: Option<LogIndex>) {
        let Some((round, to_all)) = self.leader.reads.start_round(now) else { return };
        let quorum = if to_all || !self.config.read_rounds_to_quorum { None } else { self.read_round_quorum() };
        let l = &mut *self.leader;
        for (id, p) in &l.progress {
            if quorum.as_ref().is_some_and(|q| !q.contains(id)) {
                continue;
            }
            // At or below our commit index, so in our log unless purged; purged, the follower
            // matched less than our log holds and catches up by snapshot, which brings the
            // commit index with it: name no entry then.
            let commit = self.log.id_at(self.committed.min(p.matched)).unwrap_or(LogId::ZERO);
            self.actions.push_back(Action::Send(Message {
                from: self.id,
                to: *id,
                term: self.term,
                body: MessageBody::Heartbeat { commit, round, keep_after },
            }));
        }
        // With no other voter the round is acknowledged at once.
        self.advance_reads();
    }

    /// The followers a round that only reads asked for goes to (`Config::read_rounds_to_quorum`):
    /// with this node, just a quorum of voters, those that answered the latest rounds, the
    /// first to answer first, since the quickest to answer serve the reads soonest. `None`
    /// (every follower) under a joint configuration, when this node is not a voter, or when
    /// one of those chosen has answered no round yet in this term: a new leader knows nothing
    /// of who answers (after a failover the old leader, down, would otherwise be as likely a
    /// choice as any). Learners are never chosen: they do not count towards a quorum. A
    /// follower left out is ranked again at the heartbeat timer's next round, which goes to
    /// every follower; if one chosen does not answer, the reads wait for a round it answers or
    /// for the timer's next round and its answers.
    fn read_round_quorum(&self) -> Option<Vec<NodeId>> {
        let m = self.membership;
        if m.is_joint() || !m.voters.contains(&self.id) {
            return None;
        }
        let others = m.voters.len() / 2;
        let mut ranked: Vec<(u64, u64, NodeId)> = m
            .voters
            .iter()
            .filter(|id| **id != self.id)
            .map(|id| {
                let (round, answer) = self.leader.progress.get(id).map_or((0, 0), |p| (p.round_acked, p.round_answer));
                (round, answer, *id)
            })
            .collect();
        // The latest round first; within a round, the first to answer.
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        ranked.truncate(others);
        if ranked.iter().any(|(round, _, _)| *round == 0) {
            return None;
        }
        Some(ranked.into_iter().map(|(_, _, id)| id).collect())
    }

    /// Serves the reads whose round a quorum acknowledged.
    fn advance_reads(&mut self) {
        let l = &mut *self.leader;
        if !l.reads.has_pending() {
            return;
        }
        let acked = l.quorum_round(self.id, self.membership);
        for r in l.reads.advance(acked) {
            self.actions.push_back(Action::ReadReady { id: r.id, index: r.index });
        }
    }
}
