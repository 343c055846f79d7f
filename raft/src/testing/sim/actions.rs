//! What a node's engine asks for, carried out: disk writes that complete after a simulated
//! delay (and in order), messages handed to the simulated network, entries applied to the
//! node's key-value machine, snapshots built and installed, reads answered once applied.

use super::*;

impl Sim {
    pub(super) fn execute(&mut self, id: NodeId, action: Action) -> Check {
        let now = self.local(id);
        let disk_ms = self.rng.range(0, self.disk_ms_max + 1);
        let node = self.nodes.get_mut(&id).expect("exists");
        match action {
            Action::SaveVote { io, vote } => self.issue_write(id, io, Write::Vote(vote), disk_ms),
            Action::AppendEntries { io, entries } => self.issue_write(id, io, Write::Append(entries), disk_ms),
            Action::TruncateFrom { io, index } => self.issue_write(id, io, Write::Truncate(index), disk_ms),
            Action::PurgeUpTo { io, log_id } => self.issue_write(id, io, Write::Purge(log_id), disk_ms),
            Action::Send(msg) => {
                self.send(msg);
                Ok(())
            }
            Action::LoadEntries { peer, from, to, bytes_max } => {
                let mut out = Vec::new();
                let mut bytes = 0;
                for i in from.0..=to.0 {
                    let Some(e) = node.view.entry(LogIndex(i)) else {
                        return Err(format!("node {id}: LoadEntries of {i}, which storage does not have"));
                    };
                    if !out.is_empty() && bytes + e.size_bytes() > bytes_max {
                        break;
                    }
                    bytes += e.size_bytes();
                    out.push(e.clone());
                }
                node.engine.as_mut().expect("alive").handle_entries_loaded(now, peer, out);
                Ok(())
            }
            Action::Apply { first, last, entries } => {
                let entries = match entries {
                    Some(e) => e,
                    None => {
                        let mut out = Vec::new();
                        for i in first.0..=last.0 {
                            match node.disk.entry(LogIndex(i)) {
                                Some(e) => out.push(e.clone()),
                                None => return Err(format!("node {id}: Apply of {i}, which is not durable")),
                            }
                        }
                        out
                    }
                };
                for e in entries {
                    self.apply_entry(id, e)?;
                }
                let every = self.checkpoint_every;
                let node = self.nodes.get_mut(&id).expect("exists");
                let engine = node.engine.as_mut().expect("alive");
                engine.handle_applied(now, last);
                if every > 0 && node.sm_applied.index.0 >= node.checkpointed.0 + every {
                    // The state machine checkpoints itself (durably, at once); the log may
                    // then be purged behind it.
                    let meta = SnapshotMeta {
                        last_log_id: node.sm_applied,
                        membership: engine.committed_membership().clone(),
                        snapshot_id: 0,
                        size_bytes: 0,
                    };
                    let checkpoint = Snapshot { meta, data: encode_map(&node.sm) };
                    node.disk.checkpoint = Some(checkpoint.clone());
                    node.view.checkpoint = Some(checkpoint);
                    node.checkpointed = node.sm_applied.index;
                    engine.handle_applied_durable(now, node.checkpointed);
                }
                Ok(())
            }
            Action::BuildSnapshot => {
                node.snapshots_built += 1;
                let data = snapshot_bytes(&node.sm);
                let engine = node.engine.as_mut().expect("alive");
                let meta = SnapshotMeta {
                    last_log_id: node.sm_applied,
                    membership: engine.committed_membership().clone(),
                    snapshot_id: id.0 * 1_000_000 + node.snapshots_built,
                    size_bytes: data.len() as u64,
                };
                node.built.insert(meta.snapshot_id, Snapshot { meta: meta.clone(), data });
                engine.handle_snapshot_built(now, meta);
                Ok(())
            }
            Action::ReadSnapshotChunk { to, meta, offset, len, done } => {
                let meta = *meta;
                // Now and then the snapshot is gone, as if its files were lost: the transfer
                // must start over with a new one.
                if self.faults_on && self.snapshot_rng.chance(0.02) {
                    node.built.remove(&meta.snapshot_id);
                }
                let data = match node.built.get(&meta.snapshot_id) {
                    Some(s) if s.meta == meta => {
                        if offset + len > s.data.len() as u64 {
                            return Err(format!(
                                "node {id}: chunk {offset}+{len} beyond a {}-byte snapshot",
                                s.data.len()
                            ));
                        }
                        Some(s.data.slice(offset as usize..(offset + len) as usize))
                    }
                    _ => None,
                };
                node.engine.as_mut().expect("alive").handle_snapshot_read(now, to, meta, offset, data, done);
                Ok(())
            }
            Action::DropSnapshot { meta } => {
                node.built.remove(&meta.snapshot_id);
                Ok(())
            }
            Action::ReceiveSnapshotChunk { meta, offset, data, reception } => {
                let meta = *meta;
                if offset == 0 {
                    node.receiving.clear();
                }
                if offset != node.receiving.len() as u64 {
                    return Err(format!("node {id}: chunk at {offset} after {} bytes", node.receiving.len()));
                }
                node.receiving.extend_from_slice(&data);
                let end = node.receiving.len() as u64;
                node.engine.as_mut().expect("alive").handle_snapshot_received(now, meta, reception, end);
                Ok(())
            }
            Action::InstallSnapshot { meta, reception } => {
                let meta = *meta;
                let data = Bytes::from(std::mem::take(&mut node.receiving));
                if data.len() as u64 != meta.size_bytes {
                    return Err(format!("node {id}: snapshot of {} bytes, meta says {}", data.len(), meta.size_bytes));
                }
                let Some(map) = snapshot_map(&data) else {
                    node.engine.as_mut().expect("alive").handle_snapshot_refused(
                        now,
                        meta.clone(),
                        reception,
                        "checksum mismatch",
                    );
                    self.report.snapshots_refused += 1;
                    self.log(format!("node {id} refused corrupt snapshot {}", meta.last_log_id));
                    return Ok(());
                };
                node.sm = map;
                node.sm_applied = meta.last_log_id;
                // Installed durably: it is the state machine's new checkpoint.
                let checkpoint = Snapshot { meta: meta.clone(), data: encode_map(&node.sm) };
                node.disk.checkpoint = Some(checkpoint.clone());
                node.view.checkpoint = Some(checkpoint);
                node.checkpointed = meta.last_log_id.index;
                self.report.snapshots_installed += 1;
                self.log(format!("node {id} installed snapshot {}", meta.last_log_id));
                // Writes proposed here that the snapshot covers were overwritten by the leader
                // unless the snapshot agrees; the entries are gone, so their fate is unknown.
                let covered: Vec<(NodeId, LogIndex)> = self
                    .pending_writes
                    .keys()
                    .filter(|(n, i)| *n == id && *i <= meta.last_log_id.index)
                    .copied()
                    .collect();
                for k in covered {
                    if let Some((op, _)) = self.pending_writes.remove(&k) {
                        if self.history[op].state == OpState::Pending {
                            self.finish_op(op, OpState::Unknown, None);
                        }
                    }
                }
                let node = self.nodes.get_mut(&id).expect("exists");
                node.engine.as_mut().expect("alive").handle_snapshot_installed(now, meta, reception);
                self.serve_reads(id);
                Ok(())
            }
            Action::ReadReady { id: op, index } => {
                node.reads.push((op as usize, index));
                self.serve_reads(id);
                Ok(())
            }
            Action::ReadFailed { id: op, error } => {
                let op = op as usize;
                if let RaftError::NotLeader { leader: Some(l) } = error {
                    let c = self.history[op].op.client as usize;
                    self.clients[c].guess = l;
                }
                if self.history[op].state == OpState::Pending {
                    self.finish_op(op, OpState::Failed, None);
                }
                Ok(())
            }
        }
    }

    pub(super) fn issue_write(&mut self, id: NodeId, io: IoId, w: Write, disk_ms: u64) -> Check {
        let now = self.now;
        let node = self.nodes.get_mut(&id).expect("exists");
        node.view.apply(&w);
        node.unsynced.push_back((io, w));
        node.io_free_at = node.io_free_at.max(now) + disk_ms;
        let (at, incarnation) = (node.io_free_at, node.incarnation);
        self.schedule(at, Event::IoDone { node: id, incarnation, io });
        Ok(())
    }

    pub(super) fn send(&mut self, msg: Message) {
        if self.steering_lease_edge() {
            // Fast links: the race it plays out is a few milliseconds wide.
            if self.blocked.contains(&(msg.from, msg.to)) {
                self.report.dropped_msgs += 1;
            } else {
                self.schedule(self.now + 1, Event::Deliver(msg));
            }
            return;
        }
        if self.blocked.contains(&(msg.from, msg.to)) || (self.faults_on && self.rng.chance(self.drop_p)) {
            self.report.dropped_msgs += 1;
            return;
        }
        let mut msg = msg;
        if let MessageBody::Snapshot { data, .. } = &mut msg.body {
            // A chunk corrupted on its way (or read from a bad disk): the receiver must refuse
            // the snapshot, and the sender build a new one.
            if self.faults_on && !data.is_empty() && self.snapshot_rng.chance(self.dup_p / 2.0) {
                let mut bad = data.to_vec();
                let at = self.snapshot_rng.range(0, bad.len() as u64) as usize;
                bad[at] ^= 0x41;
                *data = Bytes::from(bad);
                self.report.chunks_corrupted += 1;
            }
        }
        let copies = if self.faults_on && self.rng.chance(self.dup_p) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.range(1, self.delay_ms_max + 1);
            self.schedule(self.now + delay, Event::Deliver(msg.clone()));
        }
    }

    pub(super) fn apply_entry(&mut self, id: NodeId, e: Entry) -> Check {
        // State-machine safety: every node applies the same entry at an index.
        match self.applied.get(&e.log_id.index) {
            Some((term, payload)) if *term != e.log_id.term || *payload != e.payload => {
                return Err(format!(
                    "state machine safety: node {id} applied {} ({:?}) where another node applied term {} ({:?})",
                    e.log_id, e.payload, term, payload
                ));
            }
            Some(_) => {}
            None => {
                self.applied.insert(e.log_id.index, (e.log_id.term, e.payload.clone()));
            }
        }
        let node = self.nodes.get_mut(&id).expect("exists");
        if e.log_id.index != node.sm_applied.index.next() {
            return Err(format!("node {id} applied {} after {}", e.log_id, node.sm_applied));
        }
        node.sm_applied = e.log_id;
        let resp = match &e.payload {
            EntryPayload::Normal(b) => Some(apply_kv(&mut node.sm, b)),
            EntryPayload::Membership(m) => {
                if !m.is_joint() {
                    self.report.membership_changes += 1;
                }
                None
            }
            EntryPayload::Blank => None,
        };
        if let Some((op, term)) = self.pending_writes.remove(&(id, e.log_id.index)) {
            if self.history[op].state == OpState::Pending {
                if term == e.log_id.term {
                    let resp = resp.unwrap_or_default();
                    let out = match &self.history[op].op.input {
                        OpInput::Put(_) => OpOutput::Put { previous: resp.previous },
                        OpInput::Cas { .. } => OpOutput::Cas { ok: resp.ok },
                        OpInput::Get => unreachable!("reads are not proposed"),
                    };
                    self.finish_op(op, OpState::Done, Some(out));
                } else {
                    // Another leader's entry took the index: this proposal can never commit.
                    self.finish_op(op, OpState::Failed, None);
                }
            }
        }
        self.serve_reads(id);
        Ok(())
    }

    pub(super) fn serve_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("exists");
        let applied = node.sm_applied.index;
        let mut ready = Vec::new();
        node.reads.retain(|(op, index)| {
            if *index <= applied {
                ready.push(*op);
                false
            } else {
                true
            }
        });
        for op in ready {
            if self.history[op].state != OpState::Pending {
                continue;
            }
            let value = self.nodes[&id].sm.get(&self.history[op].op.key).cloned();
            self.finish_op(op, OpState::Done, Some(OpOutput::Get(value)));
        }
    }
}
