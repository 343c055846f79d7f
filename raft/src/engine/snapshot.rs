//! Snapshots: building them and purging the log behind them, streaming one to a follower
//! whose entries were purged (send), and receiving and installing one (receive). Raft §7.

use super::*;
use replication::Replicator;

#[derive(Debug)]
pub(super) struct Receiving {
    pub(super) meta: SnapshotMeta,
    /// Next offset expected.
    pub(super) offset: u64,
    /// The whole snapshot arrived; installation is under way.
    pub(super) installing: bool,
}

impl Engine {
    /// The work of [`Engine::trigger_snapshot`].
    pub(super) fn maybe_build_snapshot(&mut self) {
        let last = self.snapshot.as_ref().map(|s| s.last_log_id.index).unwrap_or_default();
        if !self.building_snapshot && self.applied > last {
            self.building_snapshot = true;
            self.actions.push_back(Action::BuildSnapshot);
        }
    }

    /// The work of [`Engine::handle_snapshot_built`].
    pub(super) fn on_snapshot_built(&mut self, now: Millis, meta: SnapshotMeta) {
        self.building_snapshot = false;
        if self.snapshot.as_ref().is_some_and(|s| s.last_log_id >= meta.last_log_id) {
            return;
        }
        info!(node = %self.id, term = %self.vote.term, snapshot = %meta.last_log_id, "snapshot built");
        let upto = meta.last_log_id.index.0.saturating_sub(self.config.log_keep_entries_after_snapshot);
        self.snapshot = Some(meta);
        if upto > self.log.last_purged().index.0 {
            if let Some(id) = self.log.id_at(LogIndex(upto)) {
                self.purge_local(id);
            }
        }
        // Followers waiting for a snapshot can get this one.
        let waiting: Vec<NodeId> = self
            .role
            .leader()
            .map(|l| l.progress.iter().filter(|(_, p)| p.next < self.log.first_index()).map(|(id, _)| *id).collect())
            .unwrap_or_default();
        for id in waiting {
            self.send_append(now, id);
        }
    }

    /// Forgets the log up to `upto` (covered by a snapshot) and issues the write.
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

    /// A follower's answer to a snapshot chunk: move the window on, resend from a gap, or go
    /// back to appends once it installed the snapshot.
    pub(super) fn on_snapshot_resp(
        &mut self,
        now: Millis,
        from: NodeId,
        snapshot_id: u64,
        next_offset: u64,
        installed: Option<LogId>,
    ) {
        let current = self.snapshot.clone();
        let Some(l) = self.role.leader_mut() else { return };
        let Some(p) = l.progress.get_mut(&from) else { return };
        p.recent_active = true;
        let ReplState::Snapshot(s) = &mut p.state else { return };
        if s.meta.snapshot_id != snapshot_id {
            return;
        }
        if let Some(id) = installed {
            info!(node = %self.id, term = %self.vote.term, peer = %from, snapshot = %id, "snapshot installed on follower");
            p.ack(id.index, now);
            p.become_probe();
            self.send_append(now, from);
            return;
        }
        if next_offset > s.acked {
            s.acked = next_offset.min(s.sent);
            s.progress_at = now;
        } else if next_offset == s.acked && next_offset < s.sent {
            // The follower reports a gap: a chunk was lost. Resend from there now rather than
            // after the resend timeout.
            s.sent = next_offset;
            s.all_sent = false;
        } else if next_offset < s.acked {
            // The follower lost what it had (it restarted): start over from its offset.
            s.acked = next_offset;
            s.sent = next_offset;
            s.all_sent = false;
            s.progress_at = now;
        }
        // A newer snapshot replaces a stale transfer that has to restart anyway.
        if s.acked == 0 && current.as_ref().is_some_and(|c| c.snapshot_id != s.meta.snapshot_id) {
            p.become_probe();
            self.send_append(now, from);
            return;
        }
        self.send_snapshot_chunks(from);
    }

    /// A snapshot chunk from the leader: stored in order, installed when complete, one
    /// snapshot at a time.
    pub(super) fn on_snapshot_chunk(&mut self, from: NodeId, meta: SnapshotMeta, offset: u64, data: Bytes, done: bool) {
        if meta.last_log_id.index <= self.committed {
            // Already have all of it (or installed it earlier).
            let installed = self.log.id_at(self.committed).unwrap_or(self.log.last_purged());
            self.send(
                from,
                MessageBody::SnapshotResp {
                    snapshot_id: meta.snapshot_id,
                    next_offset: meta.size_bytes,
                    installed: Some(installed),
                },
            );
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
                self.send(
                    from,
                    MessageBody::SnapshotResp { snapshot_id: meta.snapshot_id, next_offset: 0, installed: None },
                );
                return;
            }
            self.receiving = Some(Receiving { meta: meta.clone(), offset: 0, installing: false });
        }
        let r = self.receiving.as_mut().expect("set above");
        if r.installing {
            return;
        }
        if offset != r.offset {
            let expected = r.offset;
            self.send(
                from,
                MessageBody::SnapshotResp { snapshot_id: meta.snapshot_id, next_offset: expected, installed: None },
            );
            return;
        }
        r.offset += data.len() as u64;
        let next_offset = r.offset;
        self.actions.push_back(Action::ReceiveSnapshotChunk { meta: meta.clone(), offset, data });
        if done {
            r.installing = true;
            self.actions.push_back(Action::InstallSnapshot { meta });
        } else {
            self.send(from, MessageBody::SnapshotResp { snapshot_id: meta.snapshot_id, next_offset, installed: None });
        }
    }

    /// The work of [`Engine::handle_snapshot_installed`].
    pub(super) fn on_snapshot_installed(&mut self, _now: Millis, meta: SnapshotMeta) {
        let was_receiving = self.receiving.take();
        let last = meta.last_log_id;
        info!(node = %self.id, term = %self.vote.term, snapshot = %last, "snapshot installed");
        if last.index > self.applied {
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
            self.snapshot = Some(meta.clone());
        }
        if let (Some(leader), Some(_)) = (self.leader, was_receiving) {
            self.send(
                leader,
                MessageBody::SnapshotResp {
                    snapshot_id: meta.snapshot_id,
                    next_offset: meta.size_bytes,
                    installed: Some(last),
                },
            );
        }
        self.maybe_apply();
    }
}

impl Replicator<'_> {
    /// Streams chunks of the snapshot `peer` receives, as many as the window allows.
    pub(super) fn send_snapshot_chunks(&mut self, peer: NodeId) {
        let chunk = self.config.snapshot_chunk_bytes as u64;
        let window = chunk * self.config.snapshot_chunks_in_flight_max as u64;
        let Some(p) = self.leader.progress.get_mut(&peer) else { return };
        let ReplState::Snapshot(s) = &mut p.state else { return };
        let size = s.meta.size_bytes;
        while !s.all_sent && s.sent - s.acked < window {
            let len = chunk.min(size - s.sent);
            let done = s.sent + len == size;
            self.actions.push_back(Action::SendSnapshotChunk {
                to: peer,
                meta: s.meta.clone(),
                offset: s.sent,
                len,
                done,
            });
            s.sent += len;
            s.all_sent = done;
        }
    }
}
