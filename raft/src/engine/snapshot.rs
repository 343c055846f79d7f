//! Log compaction and snapshots (Raft §7). The log is purged behind what the state machine
//! has made durable, never because a snapshot was built. A snapshot is built only when a
//! follower needs entries that were purged, streamed to it chunk by chunk (read from the state
//! machine as the window allows), and dropped once no transfer uses it. A follower receives
//! the chunks in order and installs the snapshot when the last one arrived.

use super::*;
use replication::Replicator;

/// The fields of a `SnapshotResp`, as the leader reads them.
pub(super) struct SnapshotAnswer {
    pub(super) snapshot_id: u64,
    pub(super) next_offset: u64,
    pub(super) installed: Option<LogId>,
    pub(super) refused: bool,
    pub(super) gap: bool,
}

#[derive(Debug)]
pub(super) struct Receiving {
    pub(super) meta: SnapshotMeta,
    /// The number of this reception (see `Action::ReceiveSnapshotChunk`).
    pub(super) reception: u64,
    /// Next offset expected.
    pub(super) offset: u64,
    /// How far the chunks are stored (`handle_snapshot_received`): what answers to repeated
    /// chunks report, so the sender's window counts what waits unstored here.
    pub(super) stored: u64,
    /// The whole snapshot arrived; installation is under way.
    pub(super) installing: bool,
}

/// A `BuildSnapshot` in flight.
#[derive(Clone, Copy, Debug)]
pub(super) struct BuildingSnapshot {
    /// The snapshot will include every entry up to here: the state machine runs the applies
    /// issued before the build first. The log is not purged beyond it meanwhile, so the
    /// snapshot still covers what the follower lacks when it arrives.
    pub(super) covers: LogIndex,
    /// `discard_snapshots` was called since: the snapshot describes a state no receiver may
    /// get, and is dropped when it arrives.
    pub(super) discarded: bool,
}

impl Engine {
    /// Runs after every input: drops the snapshots no transfer uses any more, then checks the
    /// invariants (debug builds).
    pub(super) fn settle(&mut self) {
        if !self.snapshots.is_empty() {
            let all = std::mem::take(&mut self.snapshots);
            let before = all.len();
            for meta in all {
                if self.snapshot_in_use(meta.snapshot_id) {
                    self.snapshots.push(meta);
                } else {
                    self.actions.push_back(Action::DropSnapshot { meta: Box::new(meta) });
                }
            }
            if self.snapshots.len() < before {
                // A dropped snapshot no longer holds the log back (judged at the time of the
                // last durability report: followers look as recent as then, or more).
                self.purge_log(self.purge_judged_at, false);
            }
        }
        self.check_invariants();
    }

    /// Whether a transfer (this node leading) streams the snapshot `id`.
    fn snapshot_in_use(&self, id: u64) -> bool {
        self.role.leader().is_some_and(|l| {
            l.progress.values().any(|p| matches!(&p.state, ReplState::Snapshot(s) if s.meta.snapshot_id == id))
        })
    }

    /// The work of [`Engine::handle_applied_durable`].
    pub(super) fn on_applied_durable(&mut self, now: Millis, index: LogIndex) {
        // Never beyond what this engine saw applied: a report from before a snapshot
        // installation or a restart must not run ahead of it.
        let index = index.min(self.applied);
        if index > self.durable_applied {
            self.durable_applied = index;
            self.purge_log(now, false);
        }
    }

    /// Purges the log behind the durable applied index. Kept: `log_keep_entries` behind it
    /// (unless `all`), everything a snapshot being built or streamed does not include (its
    /// follower continues from the log after it), and on a leader (unless `all`) the entries
    /// a follower still needs if it lags by at most `log_lag_entries_max` or is catching up
    /// (its matched index moved within two election timeouts: a follower that just installed a
    /// snapshot, or catches up from the log after one, is never sent another because writes
    /// went on meanwhile). A follower neither close nor moving gets a snapshot when it returns.
    /// A follower keeps what its leader last said it keeps for the others: replicas that purge
    /// alike let a new leader go on catching a lagging follower up from the log.
    pub(super) fn purge_log(&mut self, now: Millis, all: bool) {
        self.purge_judged_at = self.purge_judged_at.max(now);
        let durable = self.durable_applied.min(self.applied).0;
        let mut upto = if all { durable } else { durable.saturating_sub(self.config.log_keep_entries) };
        if let Some(b) = &self.building_snapshot {
            upto = upto.min(b.covers.0);
        }
        for s in &self.snapshots {
            upto = upto.min(s.last_log_id.index.0);
        }
        // Entries a load will read (polled or still queued): a purge ahead of it would leave
        // it reading entries that are gone.
        let queued = self.actions.iter().filter_map(|a| match a {
            Action::LoadEntries { from, .. } => Some(*from),
            _ => None,
        });
        for from in self.loads_in_flight.iter().map(|(_, f)| *f).chain(queued) {
            upto = upto.min(from.0.saturating_sub(1));
        }
        if !all {
            let keep_after =
                if self.role.leader().is_some() { self.kept_for_followers(now) } else { self.leader_keeps_after };
            if let Some(k) = keep_after {
                upto = upto.min(k.0);
            }
        }
        let purged = self.log.last_purged().index.0;
        let step = if all { 1 } else { self.config.log_purge_step_entries };
        if upto >= purged.saturating_add(step) {
            if let Some(id) = self.log.id_at(LogIndex(upto)) {
                self.purge_local(id);
            }
        }
    }

    /// On a leader: the index after which it keeps its log for its followers — the lowest
    /// matched index of a follower that lags by at most `log_lag_entries_max` or is catching
    /// up (its matched index moved within two election timeouts). `None` off a leader or
    /// with no other member.
    pub(super) fn kept_for_followers(&self, now: Millis) -> Option<LogIndex> {
        let l = self.role.leader()?;
        let durable = self.durable_applied.min(self.applied).0;
        let floor = durable.saturating_sub(self.config.log_lag_entries_max);
        let moving_ms = 2 * self.config.election_timeout_ms_max;
        l.progress
            .iter()
            .filter(|(id, p)| **id != self.id && (p.matched.0 >= floor || now.since(p.matched_at) < moving_ms))
            .map(|(_, p)| p.matched)
            .min()
    }

    /// Asks the state machine for a snapshot, unless one is being built.
    pub(super) fn maybe_build_snapshot(&mut self) {
        if self.building_snapshot.is_none() {
            self.building_snapshot = Some(BuildingSnapshot { covers: self.apply_sent, discarded: false });
            self.actions.push_back(Action::BuildSnapshot);
        }
    }

    /// The work of [`Engine::handle_snapshot_built`].
    pub(super) fn on_snapshot_built(&mut self, now: Millis, meta: SnapshotMeta) {
        let building = self.building_snapshot.take();
        let useful = building.is_some_and(|b| !b.discarded)
            && self.role.leader().is_some()
            && meta.last_log_id.index >= self.log.last_purged().index;
        if !useful {
            // Discarded, or no longer leading (settle drops what no transfer uses).
            self.actions.push_back(Action::DropSnapshot { meta: Box::new(meta) });
        } else {
            info!(node = %self.id, term = %self.vote.term, snapshot = %meta.last_log_id, size = meta.size_bytes, "snapshot built");
            self.snapshots.push(meta);
        }
        // Followers waiting for a snapshot get this one (or ask for a new one).
        let first = self.log.first_index();
        let waiting: Vec<NodeId> = self
            .role
            .leader()
            .map(|l| {
                l.progress
                    .iter()
                    .filter(|(_, p)| p.next < first && !matches!(p.state, ReplState::Snapshot(_)))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for id in waiting {
            self.send_append(now, id);
        }
    }

    /// Forgets the log up to `upto` and issues the write.
    fn purge_local(&mut self, upto: LogId) {
        self.log.purge_up_to(upto);
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Log { io, last: self.log.last_id() });
        self.actions.push_back(Action::PurgeUpTo { io, log_id: upto });
    }

    /// Resets the log to start right after `snapshot_last` (the log disagrees with it or ends
    /// before it).
    pub(super) fn reset_log_to(&mut self, snapshot_last: LogId) {
        if self.log.last_index() >= self.log.first_index() && !self.log.has(snapshot_last) {
            let first = self.log.first_index();
            self.truncate_local(first);
        }
        self.purge_local(snapshot_last);
        if self.persisted.index < snapshot_last.index {
            self.persisted = snapshot_last;
        }
    }

    /// Streams chunks of the snapshot `peer` receives, as many as the window allows.
    pub(super) fn send_snapshot_chunks(&mut self, peer: NodeId) {
        if let Some(mut r) = self.replicator() {
            r.send_snapshot_chunks(peer);
        }
    }

    /// The work of [`Engine::handle_snapshot_read`].
    pub(super) fn on_snapshot_read(
        &mut self,
        now: Millis,
        to: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Option<Bytes>,
        done: bool,
    ) {
        let Some(data) = data else {
            warn!(node = %self.id, snapshot = %meta.last_log_id, "the state machine no longer has the snapshot: its transfers start over");
            self.abandon_snapshot(now, meta.snapshot_id, false);
            return;
        };
        // Sent only by a leader still streaming this snapshot to `to`: after a step-down the
        // chunk would speak for a leadership this node no longer holds.
        let streaming = self
            .role
            .leader()
            .and_then(|l| l.progress.get(&to))
            .is_some_and(|p| matches!(&p.state, ReplState::Snapshot(s) if s.meta.snapshot_id == meta.snapshot_id));
        if !streaming || offset.checked_add(data.len() as u64).is_none_or(|e| e > meta.size_bytes) {
            return;
        }
        self.send(to, MessageBody::Snapshot { meta: Box::new(meta), offset, data, done });
    }

    /// Stops every transfer of snapshot `id` and forgets it (dropping it in the state machine
    /// if `drop`); the followers get a new one.
    fn abandon_snapshot(&mut self, now: Millis, id: u64, drop: bool) {
        let pos = self.snapshots.iter().position(|m| m.snapshot_id == id);
        if let Some(meta) = pos.map(|i| self.snapshots.remove(i)) {
            if drop {
                self.actions.push_back(Action::DropSnapshot { meta: Box::new(meta) });
            }
        }
        let mut restart = Vec::new();
        if let Some(l) = self.role.leader_mut() {
            for (peer, p) in l.progress.iter_mut() {
                if matches!(&p.state, ReplState::Snapshot(s) if s.meta.snapshot_id == id) {
                    p.become_probe();
                    restart.push(*peer);
                }
            }
        }
        for peer in restart {
            self.send_append(now, peer);
        }
    }

    /// The work of [`Engine::discard_snapshots`].
    pub(super) fn drop_all_snapshots(&mut self, now: Millis) {
        if let Some(b) = &mut self.building_snapshot {
            b.discarded = true;
        }
        let ids: Vec<u64> = self.snapshots.iter().map(|m| m.snapshot_id).collect();
        for id in ids {
            self.abandon_snapshot(now, id, true);
        }
    }

    /// A follower's answer to a snapshot chunk: move the window on, resend from a gap, go
    /// back to appends once it installed the snapshot, or start over with a new snapshot if
    /// it refused this one.
    pub(super) fn on_snapshot_resp(&mut self, now: Millis, from: NodeId, answer: SnapshotAnswer) {
        let SnapshotAnswer { snapshot_id, next_offset, installed, refused, gap } = answer;
        let Some(l) = self.role.leader_mut() else { return };
        let Some(p) = l.progress.get_mut(&from) else { return };
        p.recent_active = true;
        let ReplState::Snapshot(s) = &mut p.state else { return };
        if s.meta.snapshot_id != snapshot_id {
            return;
        }
        if refused {
            warn!(node = %self.id, term = %self.vote.term, peer = %from, snapshot = %s.meta.last_log_id, "follower refused the snapshot as corrupt: building a new one");
            self.abandon_snapshot(now, snapshot_id, true);
            return;
        }
        if let Some(id) = installed {
            info!(node = %self.id, term = %self.vote.term, peer = %from, snapshot = %id, "snapshot installed on follower");
            p.ack(id.index, now);
            p.become_probe();
            self.send_append(now, from);
            return;
        }
        let window_max = self.config.snapshot_chunks_in_flight_max.max(1);
        let next_offset = next_offset.min(s.meta.size_bytes);
        if gap {
            // A chunk was lost (every chunk after it reports the same gap: resend once), or
            // the follower restarted and expects the snapshot from its start. A gap below
            // what was acknowledged, other than a restart's, is an old report overtaken.
            // `acked` stays what the follower stored: a gap names what arrived, not what is
            // stored, and the window must count chunks still waiting for its disk.
            let restart = next_offset == 0 && s.acked > 0;
            if s.gap_resent != Some(next_offset) && (next_offset >= s.acked || restart) {
                if restart {
                    s.acked = 0;
                    s.progress_at = now;
                }
                s.resend_from(next_offset);
                s.gap_resent = Some(next_offset);
            }
        } else if next_offset > s.acked {
            // Acknowledged (or answered for a chunk sent twice): the follower holds all up to
            // here. Chunks a timer resend took back that it already holds are not sent again.
            s.acked = next_offset;
            s.sent = s.sent.max(next_offset);
            s.progress_at = now;
            s.window_chunks = (s.window_chunks + 1).min(window_max);
            s.gap_resent = None;
        }
        self.send_snapshot_chunks(from);
    }

    /// A snapshot chunk from the leader: stored in order, installed when complete, one
    /// snapshot at a time.
    pub(super) fn on_snapshot_chunk(&mut self, from: NodeId, meta: SnapshotMeta, offset: u64, data: Bytes, done: bool) {
        let resp = |next_offset, installed, gap| MessageBody::SnapshotResp {
            snapshot_id: meta.snapshot_id,
            next_offset,
            installed,
            refused: false,
            gap,
        };
        if meta.last_log_id.index <= self.committed {
            // Already have all of it (or installed it earlier).
            let installed = self.log.id_at(self.committed).unwrap_or(self.log.last_purged());
            self.send(from, resp(meta.size_bytes, Some(installed), false));
            return;
        }
        if self.receiving.as_ref().is_some_and(|r| r.installing) {
            // Installing a snapshot: nothing else may start until it is done (a second one
            // would race the first in the state machine). The sender retries.
            return;
        }
        // Validate before use: a chunk must lie inside the snapshot, and `done` exactly at its end.
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > meta.size_bytes || (done != (e == meta.size_bytes))) {
            warn!(node = %self.id, %from, offset, len = data.len(), size = meta.size_bytes, "malformed snapshot chunk dropped");
            return;
        }
        let same = self.receiving.as_ref().is_some_and(|r| r.meta == meta);
        if !same {
            if offset != 0 {
                self.send(from, resp(0, None, true));
                return;
            }
            self.receptions += 1;
            self.receiving = Some(Box::new(Receiving {
                meta: meta.clone(),
                offset: 0,
                stored: 0,
                installing: false,
                reception: self.receptions,
            }));
        }
        let Some(r) = self.receiving.as_mut() else { return };
        if offset != r.offset {
            // A gap names where to resend from (what arrived); a repeated chunk's answer says
            // only what is stored, or the sender would open its window again over chunks
            // still waiting for the disk.
            let (next, gap) = if offset > r.offset { (r.offset, true) } else { (r.stored, false) };
            self.send(from, resp(next, None, gap));
            return;
        }
        r.offset += data.len() as u64;
        let reception = r.reception;
        // Acknowledged once stored (`on_snapshot_received`): the leader's window then bounds
        // what waits here in memory, however slow the disk.
        self.actions.push_back(Action::ReceiveSnapshotChunk { meta: Box::new(meta.clone()), offset, data, reception });
        if done {
            r.installing = true;
            self.actions.push_back(Action::InstallSnapshot { meta: Box::new(meta), reception });
        }
    }

    /// The work of [`Engine::handle_snapshot_received`].
    pub(super) fn on_snapshot_received(&mut self, _now: Millis, meta: SnapshotMeta, reception: u64, end: u64) {
        if let Some(r) = self.receiving.as_mut().filter(|r| r.reception == reception) {
            r.stored = r.stored.max(end.min(r.offset));
        }
        let current = self.receiving.as_ref().is_some_and(|r| r.reception == reception && !r.installing);
        if let (true, Some(leader)) = (current, self.leader.filter(|l| *l != self.id)) {
            let body = MessageBody::SnapshotResp {
                snapshot_id: meta.snapshot_id,
                next_offset: end,
                installed: None,
                refused: false,
                gap: false,
            };
            self.send(leader, body);
        }
    }

    /// The work of [`Engine::handle_snapshot_refused`].
    pub(super) fn on_snapshot_refused(&mut self, _now: Millis, meta: SnapshotMeta, reception: u64, reason: &str) {
        if self.receiving.as_ref().is_none_or(|r| r.reception != reception) {
            // A report of an earlier reception (perhaps of the same snapshot, streamed again
            // since): the reception under way, or the installation queued behind it, is not
            // affected.
            debug!(node = %self.id, snapshot = %meta.last_log_id, reception, reason, "stale snapshot refusal ignored");
            return;
        }
        warn!(node = %self.id, term = %self.vote.term, snapshot = %meta.last_log_id, reason, "snapshot refused");
        self.receiving = None;
        // An installation held back applying; nothing of this reception is queued after it
        // (chunks and the install of one reception are issued before any of the next).
        self.maybe_apply();
        if let Some(leader) = self.leader.filter(|l| *l != self.id) {
            self.send(
                leader,
                MessageBody::SnapshotResp {
                    snapshot_id: meta.snapshot_id,
                    next_offset: 0,
                    installed: None,
                    refused: true,
                    gap: false,
                },
            );
        }
    }

    /// The work of [`Engine::handle_snapshot_installed`].
    pub(super) fn on_snapshot_installed(&mut self, _now: Millis, meta: SnapshotMeta, reception: u64) {
        // The state machine holds the snapshot now, whatever reception it came from.
        let was_receiving = self.receiving.take_if(|r| r.reception == reception);
        let last = meta.last_log_id;
        info!(node = %self.id, term = %self.vote.term, snapshot = %last, "snapshot installed");
        if last.index > self.applied {
            // The installation is durable (the state machine's contract): the log may go.
            self.durable_applied = self.durable_applied.max(last.index);
            if self.log.has(last) {
                self.purge_local(last);
            } else {
                self.reset_log_to(last);
            }
            self.committed = self.committed.max(last.index);
            self.applied = last.index;
            self.apply_sent = last.index;
            self.memberships.reset_to(meta.membership.clone());
            self.refresh_role();
        }
        if let (Some(leader), Some(_)) = (self.leader, was_receiving) {
            self.send(
                leader,
                MessageBody::SnapshotResp {
                    snapshot_id: meta.snapshot_id,
                    next_offset: meta.size_bytes,
                    installed: Some(last),
                    gap: false,
                    refused: false,
                },
            );
        }
        self.maybe_apply();
    }
}

impl Replicator<'_> {
    /// Asks for chunks of the snapshot `peer` receives, as many as the window allows.
    pub(super) fn send_snapshot_chunks(&mut self, peer: NodeId) {
        let chunk = self.config.snapshot_chunk_bytes as u64;
        let Some(p) = self.leader.progress.get_mut(&peer) else { return };
        let ReplState::Snapshot(s) = &mut p.state else { return };
        // At least one chunk and at most the configured window (kept so by `SnapshotSend`).
        let window = chunk * s.window_chunks as u64;
        let size = s.meta.size_bytes;
        while !s.all_sent && s.sent - s.acked < window {
            let len = chunk.min(size - s.sent);
            let done = s.sent + len == size;
            self.actions.push_back(Action::ReadSnapshotChunk {
                to: peer,
                meta: Box::new(s.meta.clone()),
                offset: s.sent,
                len,
                done,
            });
            s.sent += len;
            s.all_sent = done;
        }
    }
}
