//! Driving one group in a round: its `GroupCore`'s actions go where the round collects them —
//! log writes into the round's one store request, messages into the per-node batches (snapshot
//! chunks apart, for the network's transfer path), state-machine work into the group's queue —
//! and the completions of those writes come back.

use super::poller::{empty_batch, Poller};
use crate::keys::{encode, group_key, KIND_COMMITTED};
use crate::store::{Op, CF_RAFT};
use flotilla_raft::{Action, CoreAction, GroupId, IoId, LogAction, MessageBody, StorageError};
use tracing::error;

impl Poller {
    pub(super) fn drive_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for gid in dirty {
            self.drive(gid);
        }
    }

    /// Executes a group's actions: log writes into the round, messages into the batches,
    /// state-machine work into its queue.
    pub(super) fn drive(&mut self, gid: GroupId) {
        let now = self.shared.now();
        let me = self.shared.config.node;
        let Some(g) = self.groups.get_mut(&gid) else { return };
        let mut wrote = false;
        while let Some(action) = g.core.poll_action() {
            match action {
                CoreAction::Log(LogAction::Write(a)) => {
                    let io = io_of(&a);
                    match g.log.write_ops(&a) {
                        Ok((ops, compact)) => {
                            self.round.ops.extend(ops);
                            self.round.sync = true;
                            if let Some(c) = compact {
                                self.round.compact.push(c);
                            }
                            if let Some(io) = io {
                                self.round.done.insert(gid, io);
                            }
                            wrote = true;
                        }
                        Err(e) => g.core.fail(e),
                    }
                }
                CoreAction::Log(LogAction::SaveCommitted(index)) => match encode(&index) {
                    Ok(v) => self.round.ops.push(Op::Put(CF_RAFT, group_key(gid, KIND_COMMITTED).to_vec(), v)),
                    Err(e) => g.core.fail(e),
                },
                CoreAction::Log(LogAction::Load { peer, from, to, bytes_max }) => {
                    if g.writes_in_flight > 0 || wrote {
                        g.deferred_loads.push((peer, from, to, bytes_max));
                    } else {
                        match g.log.read_entries_blocking(from, to, bytes_max) {
                            Ok(entries) => g.core.handle_entries_loaded(now, peer, entries),
                            Err(e) => g.core.fail(e),
                        }
                    }
                }
                CoreAction::Send(msg) if matches!(msg.body, MessageBody::Snapshot { .. }) => {
                    self.round.transfers.push((gid, msg));
                }
                CoreAction::Send(msg) => {
                    let to = msg.to;
                    self.round.out.entry(to).or_insert_with(|| empty_batch(me)).messages.push((gid, msg));
                }
                CoreAction::Machine(a) => {
                    g.sm_queue.push_back(a);
                    if !g.sm_busy {
                        self.sm_ready.insert(gid);
                    }
                }
            }
        }
        if wrote {
            g.writes_in_flight += 1;
        }
    }

    /// A round's log writes are durable (or failed): each group hears of its last write, and
    /// the loads deferred behind them run.
    pub(super) fn on_writes_done(
        &mut self,
        done: Vec<(GroupId, IoId)>,
        compact: Vec<crate::log::CompactSpan>,
        result: Result<(), StorageError>,
    ) {
        let now = self.shared.now();
        if !compact.is_empty() && result.is_ok() {
            let store = self.shared.store.clone();
            self.shared.runtime.spawn_blocking(move || {
                for (a, b) in compact {
                    if let Err(e) = store.compact_raft_range(&a, &b) {
                        error!(error = %e, "compaction after purge failed");
                    }
                }
            });
        }
        for (gid, io) in done {
            let Some(g) = self.groups.get_mut(&gid) else { continue };
            g.writes_in_flight = g.writes_in_flight.saturating_sub(1);
            match &result {
                Ok(()) => g.core.handle_io_done(now, io),
                Err(e) => g.core.fail(e.clone()),
            }
            if g.writes_in_flight == 0 {
                for (peer, from, to, bytes_max) in std::mem::take(&mut g.deferred_loads) {
                    match g.log.read_entries_blocking(from, to, bytes_max) {
                        Ok(entries) => g.core.handle_entries_loaded(now, peer, entries),
                        Err(e) => g.core.fail(e),
                    }
                }
            }
            self.dirty.insert(gid);
        }
    }
}

fn io_of(a: &Action) -> Option<IoId> {
    match a {
        Action::SaveVote { io, .. }
        | Action::AppendEntries { io, .. }
        | Action::TruncateFrom { io, .. }
        | Action::PurgeUpTo { io, .. } => Some(*io),
        _ => None,
    }
}
