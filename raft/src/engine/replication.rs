//! Leader replication: proposals, sending appends to each follower within its window,
//! handling their answers, and advancing the commit index by (joint) quorum. Raft §5.3, §5.4.

use super::*;

/// The leader's sending to its followers, borrowing only what that needs: the leader's state
/// and the outbox mutably, the log, the snapshot and the configuration in effect. Leader-only
/// code runs on it, so it holds the leader's state without checking the role again.
pub(super) struct Replicator<'a> {
    /// This node.
    pub(super) id: NodeId,
    /// The leader's term.
    pub(super) term: Term,
    /// The commit index, told to followers.
    pub(super) committed: LogIndex,
    /// Limits on appends, windows and snapshot chunks.
    pub(super) config: &'a Config,
    /// Where entries come from.
    pub(super) log: &'a RaftLog,
    /// The newest snapshot built, for followers whose entries were purged.
    pub(super) snapshot: Option<&'a SnapshotMeta>,
    /// The configuration in effect (the quorum for heartbeat rounds).
    pub(super) membership: &'a Membership,
    /// The leader's own state.
    pub(super) leader: &'a mut LeaderState,
    /// The engine's actions.
    pub(super) actions: &'a mut VecDeque<Action>,
}

/// What [`Replicator::send_one_append`] did.
pub(super) enum Sent {
    /// Sent an append; another may follow within the window.
    More,
    /// Nothing more to send now.
    Stop,
    /// The follower needs purged entries and no snapshot covers them: build one.
    NeedSnapshot,
}

impl Engine {
    /// The leader's replication handler, if this node leads.
    pub(super) fn replicator(&mut self) -> Option<Replicator<'_>> {
        let RoleState::Leader(leader) = &mut self.role else { return None };
        Some(Replicator {
            id: self.id,
            term: self.vote.term,
            committed: self.committed,
            config: &self.config,
            log: &self.log,
            snapshot: self.snapshots.last(),
            membership: &self.memberships.effective().membership,
            leader,
            actions: &mut self.actions,
        })
    }
}

impl Replicator<'_> {
    /// Sends `body` to `to` in the leader's term.
    pub(super) fn send(&mut self, to: NodeId, body: MessageBody) {
        self.actions.push_back(Action::Send(Message { from: self.id, to, term: self.term, body }));
    }

    /// Sends one append to `peer` (or starts streaming a snapshot).
    pub(super) fn send_one_append(&mut self, now: Millis, peer: NodeId) -> Sent {
        let first = self.log.first_index();
        let last = self.log.last_index();
        let cfg = self.config;
        let Some(p) = self.leader.progress.get_mut(&peer) else { return Sent::Stop };
        if matches!(p.state, ReplState::Snapshot(_)) {
            self.send_snapshot_chunks(peer);
            return Sent::Stop;
        }
        // Before the window check: a snapshot built for this follower starts streaming even
        // while a probe is outstanding (its answer is stale then), or it would be dropped
        // unused and built again.
        if p.next < first {
            // The entries it needs are purged: stream a snapshot.
            return match self.snapshot {
                Some(meta) if meta.last_log_id.index.next() >= first => {
                    info!(node = %self.id, term = %self.term, %peer, snapshot = %meta.last_log_id, "sending snapshot");
                    let window = self.config.snapshot_chunks_in_flight_max;
                    p.state = ReplState::Snapshot(Box::new(SnapshotSend::new(meta.clone(), now, window)));
                    p.clear_inflight();
                    self.send_snapshot_chunks(peer);
                    Sent::Stop
                }
                _ => Sent::NeedSnapshot,
            };
        }
        if !p.can_send(cfg.inflight_msgs_max, cfg.inflight_bytes_max) {
            return Sent::Stop;
        }
        let prev = self.log.id_at(p.next.prev()).expect("prev is in the log");
        let entries = if p.next > last {
            if matches!(p.state, ReplState::Replicate) {
                return Sent::Stop; // nothing new; commit notices and heartbeats cover the rest
            }
            Vec::new()
        } else if let Some(e) = self.log.cached(p.next, cfg.append_entries_max, cfg.append_bytes_max) {
            e
        } else {
            // Not cached: those entries are durable (the cache keeps every entry that is
            // not), so storage can load them.
            let to = self.log.cache_first().prev().min(LogIndex(p.next.0 + cfg.append_entries_max as u64 - 1));
            p.loading = true;
            self.actions.push_back(Action::LoadEntries { peer, from: p.next, to, bytes_max: cfg.append_bytes_max });
            return Sent::Stop;
        };
        self.send_entries(peer, prev, entries);
        let p = &self.leader.progress[&peer];
        if matches!(p.state, ReplState::Replicate) && p.next <= last {
            Sent::More
        } else {
            Sent::Stop
        }
    }

    /// Sends `entries` (possibly none: a probe) after `prev` to `peer` and records them in
    /// its progress.
    fn send_entries(&mut self, peer: NodeId, prev: LogId, entries: Vec<Entry>) {
        let Some(p) = self.leader.progress.get_mut(&peer) else { return };
        let last = entries.last().map(|e| e.log_id.index).unwrap_or(prev.index);
        let commit = self.committed;
        p.sent(last, entries.iter().map(|e| e.size_bytes() as u64).sum());
        p.commit_sent = p.commit_sent.max(commit.min(last));
        self.send(peer, MessageBody::Append { prev, entries, commit });
    }

    /// Sends entries loaded from storage for `peer` if they still fit its progress. Returns
    /// false if `peer` is not replicated to (any more).
    fn entries_loaded(&mut self, peer: NodeId, entries: Vec<Entry>) -> bool {
        let Some(p) = self.leader.progress.get_mut(&peer) else { return false };
        p.loading = false;
        let usable = entries.first().is_some_and(|e| e.log_id.index == p.next)
            && entries.iter().all(|e| self.log.has(e.log_id))
            && p.can_send(self.config.inflight_msgs_max, self.config.inflight_bytes_max);
        if usable {
            if let Some(prev) = self.log.id_at(p.next.prev()) {
                self.send_entries(peer, prev, entries);
            }
        }
        true
    }

    /// Whether a follower that matched entries does not know they are committed (and
    /// `notify_commit` can tell it).
    fn commit_notice_needed(&self) -> bool {
        self.leader.progress.values().any(|p| commit_notice(self.log, self.committed, p).is_some())
    }

    /// Tells followers that matched entries they do not know are committed, so they apply
    /// without waiting for the next heartbeat. Appends carry the commit index too, so this
    /// only sends to followers that have nothing else coming.
    pub(super) fn notify_commit(&mut self) {
        self.leader.commit_notice_at = None;
        let committed = self.committed;
        for (peer, p) in self.leader.progress.iter_mut() {
            if let Some((known, prev)) = commit_notice(self.log, committed, p) {
                p.commit_sent = known;
                self.actions.push_back(Action::Send(Message {
                    from: self.id,
                    to: *peer,
                    term: self.term,
                    body: MessageBody::Append { prev, entries: Vec::new(), commit: committed },
                }));
            }
        }
    }
}

/// The commit notice a follower with progress `p` needs: the commit index it would learn,
/// and the entry the notice names (its last matched one). `None` if it knows that much
/// already, is not being replicated to in order, or its matched entry left the log.
fn commit_notice(log: &RaftLog, committed: LogIndex, p: &Progress) -> Option<(LogIndex, LogId)> {
    let known = committed.min(p.matched);
    if known > p.commit_sent && matches!(p.state, ReplState::Replicate) {
        log.id_at(p.matched).map(|prev| (known, prev))
    } else {
        None
    }
}

impl Engine {
    /// The work of [`Engine::propose`].
    pub(super) fn append_commands(&mut self, now: Millis, commands: Vec<Bytes>) -> Result<LogIndex, RaftError> {
        let l = self.check_can_propose()?;
        let first = self.log.last_index().next();
        if commands.is_empty() {
            return Ok(first);
        }
        let bytes: u64 = commands.iter().map(|c| c.len() as u64).sum();
        if self.over_uncommitted_limit(l.uncommitted_bytes, bytes) {
            return Err(RaftError::Overloaded { pending_bytes: l.uncommitted_bytes });
        }
        let last = LogIndex(first.0 + commands.len() as u64 - 1);
        let term = self.vote.term;
        let entries = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| Entry {
                log_id: LogId { term, index: LogIndex(first.0 + i as u64) },
                payload: EntryPayload::Normal(c),
            })
            .collect();
        self.leader_append(now, entries);
        if let Some(l) = self.role.leader_mut() {
            l.uncommitted.push_back((last, bytes));
            l.uncommitted_bytes += bytes;
        }
        Ok(first)
    }

    /// On a leader that takes proposals, the bytes proposed and not yet committed; `None`
    /// where every proposal is refused, whatever its size.
    pub(crate) fn uncommitted_bytes(&self) -> Option<u64> {
        self.check_can_propose().ok().map(|l| l.uncommitted_bytes)
    }

    /// Whether a proposal of `bytes` is refused as `Overloaded` while `uncommitted` bytes are
    /// proposed and not committed (`Config::uncommitted_bytes_max`).
    pub(crate) fn over_uncommitted_limit(&self, uncommitted: u64, bytes: u64) -> bool {
        let max = self.config.uncommitted_bytes_max;
        max > 0 && uncommitted > 0 && uncommitted + bytes > max
    }

    /// The leader's state if it accepts proposals: it leads and transfers no leadership.
    pub(super) fn check_can_propose(&self) -> Result<&LeaderState, RaftError> {
        let Some(l) = self.role.leader() else {
            return Err(RaftError::NotLeader { leader: self.leader });
        };
        if l.transfer.is_some() {
            return Err(RaftError::TransferInProgress);
        }
        Ok(l)
    }

    /// Appends entries of this term on the leader and sends them to every follower at once;
    /// the local write proceeds in parallel (send before persist).
    pub(super) fn leader_append(&mut self, now: Millis, entries: Vec<Entry>) {
        // Only a configuration entry changes who the leader replicates to; proposals (the hot
        // path) skip rebuilding the node set. Removals whose commit drops a node are synced
        // on the next heartbeat tick.
        let reconfigures = entries.iter().any(|e| e.membership().is_some());
        self.append_local(entries);
        if reconfigures {
            self.sync_progress_with_membership(now);
        }
        let peers: Vec<NodeId> = self.role.leader().map(|l| l.progress.keys().copied().collect()).unwrap_or_default();
        for id in peers {
            self.send_append(now, id);
        }
        // A single voter commits as soon as its own write is durable (handle_io_done).
    }

    /// Adds progress for new members and drops it for nodes whose removal is committed.
    pub(super) fn sync_progress_with_membership(&mut self, now: Millis) {
        let nodes = self.memberships.nodes_in_any();
        let next = self.log.last_index();
        let Some(l) = self.role.leader_mut() else { return };
        l.progress.retain(|id, _| nodes.contains(id));
        for id in nodes {
            if id != self.id {
                l.progress.entry(id).or_insert_with(|| Box::new(Progress::new(next, now)));
            }
        }
    }

    /// Sends what `peer` needs next, as many messages as the window allows.
    pub(super) fn send_append(&mut self, now: Millis, peer: NodeId) {
        loop {
            let Some(mut r) = self.replicator() else { return };
            match r.send_one_append(now, peer) {
                Sent::More => {}
                Sent::Stop => return,
                Sent::NeedSnapshot => return self.maybe_build_snapshot(),
            }
        }
    }

    /// The work of [`Engine::handle_entries_loaded`].
    pub(super) fn on_entries_loaded(&mut self, now: Millis, peer: NodeId, entries: Vec<Entry>) {
        let Some(mut r) = self.replicator() else { return };
        if !r.entries_loaded(peer, entries) {
            return;
        }
        // Whether used or stale (the log moved meanwhile), carry on from the current state.
        self.send_append(now, peer);
        self.flush_rounds(now);
    }

    /// A follower's answer to an append: advance its progress and the commit index, or back off
    /// to where its log matches.
    pub(super) fn on_append_resp(&mut self, now: Millis, from: NodeId, r: AppendResult) {
        let last = self.log.last_index();
        let Some(l) = self.role.leader_mut() else { return };
        let Some(p) = l.progress.get_mut(&from) else { return };
        p.recent_active = true;
        match r {
            AppendResult::Success { matched } => {
                if matched > last {
                    debug!(node = %self.id, %from, %matched, "ack beyond our log: ignored");
                    return;
                }
                let moved = p.ack(matched, now);
                if matches!(p.state, ReplState::Probe { .. }) {
                    p.state = ReplState::Replicate;
                    p.next = p.matched.next();
                    p.clear_inflight();
                }
                let advanced = moved && self.maybe_commit(now);
                if moved {
                    self.maybe_send_timeout_now();
                }
                self.send_append(now, from);
                self.notify_commit(now, advanced);
            }
            AppendResult::Conflict { rejected, hint } => {
                // An append right after `matched` rejected: the follower no longer has the
                // entry it acknowledged there (a wiped or restored disk, a device that lied
                // about a sync), or this is an old answer overtaken by its acknowledgement.
                // What was committed counting that entry cannot be undone; the leader can only
                // stop sending after a log the follower no longer has (refused forever) and
                // catch it up again from where the logs agree. For the old answer this costs
                // a resend. Lowering `matched` never moves the commit index back.
                let lost = rejected.index == p.matched
                    && p.matched > LogIndex(0)
                    && match p.state {
                        ReplState::Replicate => true,
                        ReplState::Probe { .. } => rejected.index == p.next.prev(),
                        ReplState::Snapshot(_) => false,
                    };
                if lost {
                    tracing::warn!(node = %self.id, %from, matched = %p.matched, hint = %hint,
                        "follower refused entries it had acknowledged: catching it up again");
                    // The logs agree up to the hint only if the entry there is ours (a disk
                    // that rolled back may hold entries of an earlier term); else nothing is
                    // known to match.
                    let agreed = if self.log.has(hint) { hint.index } else { LogIndex(0) };
                    p.matched = agreed.min(p.matched);
                    p.commit_sent = p.commit_sent.min(p.matched);
                }
                let stale = match p.state {
                    ReplState::Replicate => rejected.index <= p.matched,
                    ReplState::Probe { .. } => rejected.index != p.next.prev(),
                    ReplState::Snapshot(_) => true,
                };
                if stale {
                    return;
                }
                // Skip the whole conflicting term at once: find our last entry at or before
                // the hint whose term is at most the hint's.
                let purged = self.log.last_purged();
                let probe = if hint.index > purged.index {
                    self.log.find_conflict_by_term(hint.index, hint.term).index
                } else if hint == purged {
                    hint.index
                } else {
                    // The follower diverges inside what we purged: only a snapshot helps.
                    hint.index.min(purged.index.prev())
                };
                p.become_probe();
                p.next = probe.min(rejected.index.prev()).next().max(p.matched.next());
                debug!(node = %self.id, %from, %rejected, %hint, next = %p.next, "append rejected: backing off");
                self.send_append(now, from);
            }
        }
    }

    /// A follower's answer to a heartbeat: count the round for reads, unblock a lost probe, and
    /// catch it up if it lags.
    pub(super) fn on_heartbeat_resp(&mut self, now: Millis, from: NodeId, round: u64) {
        let last = self.log.last_index();
        let Some(l) = self.role.leader_mut() else { return };
        let Some(p) = l.progress.get_mut(&from) else { return };
        p.recent_active = true;
        if round > p.round_acked {
            p.round_acked = round;
            p.round_answer = l.reads.count_answer();
        }
        let lagging = p.matched < last;
        if let ReplState::Probe { sent } = &mut p.state {
            // A lost probe would otherwise stall the follower forever.
            *sent = false;
        }
        self.advance_reads();
        if lagging {
            self.send_append(now, from);
        }
    }

    /// Appends or snapshot chunks may have been lost: restart replication that made no
    /// progress for two heartbeat intervals.
    pub(super) fn check_stalled(&mut self, now: Millis) {
        let last = self.log.last_index();
        let stall_ms = 2 * self.config.heartbeat_interval_ms;
        let resend_ms = self.config.snapshot_resend_ms;
        let mut retry = Vec::new();
        let Some(l) = self.role.leader_mut() else { return };
        for (id, p) in l.progress.iter_mut() {
            match &mut p.state {
                ReplState::Replicate
                    if p.matched < last && now.since(p.matched_at) >= stall_ms && !p.inflight.is_empty() =>
                {
                    p.become_probe();
                    retry.push(*id);
                }
                ReplState::Probe { sent } if *sent && now.since(p.matched_at) >= stall_ms => {
                    *sent = false;
                    retry.push(*id);
                }
                ReplState::Snapshot(s) if now.since(s.progress_at) >= resend_ms => {
                    // The transfer goes on with its snapshot even if a newer one exists: the
                    // log is kept for it, so the follower can continue from the log after it.
                    let acked = s.acked;
                    s.resend_from(acked);
                    s.progress_at = now;
                    retry.push(*id);
                }
                _ => {}
            }
        }
        for id in retry {
            self.send_append(now, id);
        }
    }

    /// Advances the commit index to what a (joint) quorum holds, if that entry is of the
    /// current term (Raft §5.4.2: earlier terms' entries commit only indirectly). Whether it
    /// moved.
    pub(super) fn maybe_commit(&mut self, now: Millis) -> bool {
        let Some(l) = self.role.leader() else { return false };
        let own = if self.bugs().ack_before_durable { self.log.last_index() } else { self.persisted.index };
        let id = self.id;
        let quorum = self.effective().membership.quorum_value(|n| {
            if n == id {
                own
            } else {
                l.progress.get(&n).map(|p| p.matched).unwrap_or_default()
            }
        });
        if quorum <= self.committed {
            return false;
        }
        if self.log.term_at(quorum) != Some(self.vote.term) && !self.bugs().commit_old_term {
            return false;
        }
        self.committed = quorum;
        if let Some(l) = self.role.leader_mut() {
            while l.uncommitted.front().is_some_and(|(last, _)| *last <= quorum) {
                let (_, bytes) = l.uncommitted.pop_front().expect("checked");
                l.uncommitted_bytes -= bytes;
            }
        }
        trace!(node = %self.id, term = %self.vote.term, committed = %quorum, "committed");
        self.after_commit(now);
        true
    }

    /// Tells followers that matched entries they do not know are committed, so they apply
    /// without waiting for the next heartbeat: at once, or, when `advanced` (this step moved
    /// the commit index) or notices are held already, after `Config::commit_notice_delay_ms`
    /// if the next append does not tell them first. A follower that only caught up while
    /// nothing is held (a late acknowledgement, say to a leader gone quiet, whose timers do
    /// not run) is told at once.
    pub(super) fn notify_commit(&mut self, now: Millis, advanced: bool) {
        let delay = self.config.commit_notice_delay_ms;
        let Some(mut r) = self.replicator() else { return };
        if delay == 0 || (!advanced && r.leader.commit_notice_at.is_none()) {
            r.notify_commit();
        } else if r.leader.commit_notice_at.is_none() && r.commit_notice_needed() {
            r.leader.commit_notice_at = Some(now.add_ms(delay));
        }
    }

    /// Work after the commit index advanced (any role).
    pub(super) fn after_commit(&mut self, now: Millis) {
        self.memberships.compact(self.committed);
        self.maybe_apply();
        let Some(l) = self.role.leader_mut() else { return };
        if self.committed >= l.noop_index {
            for (id, mode) in l.reads.take_waiting_for_first_commit() {
                self.register_read(now, id, mode);
            }
        }
        self.advance_configuration(now);
    }
}
