//! Driving one group in a round: its `GroupCore`'s actions go where the round collects them —
//! log writes into the round's one store request, messages into the per-node batches (snapshot
//! chunks apart, for the network's transfer path), state-machine work into the group's queue,
//! entry loads onto the blocking pool — and the completions of those writes and loads come
//! back.

use super::group_state::{GroupState, Load};
use super::poller::{empty_batch, Poller, PollerMsg};
use super::Shared;
use flotilla_raft::{Action, CoreAction, Entry, GroupId, IoId, LogAction, MessageBody, Role, StorageError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{debug, error};

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
                // Not written: every apply batch records its applied index in the same store
                // (the state machine's applied record), right behind the commit, and a restarted
                // replica starts from it and hears the rest from its leader. Raft needs no
                // durable commit index, and writing one per group per round cost a memtable
                // insert each, with many shards one per put.
                CoreAction::Log(LogAction::SaveCommitted(_)) => {}
                CoreAction::Log(LogAction::Load { peer, from, to, bytes_max }) => {
                    let load = Load { peer, from, to, bytes_max, term: g.core.engine().term() };
                    if g.writes_in_flight > 0 || wrote {
                        g.deferred_loads.push(load);
                    } else {
                        start_load(&self.shared, &self.tx, g, load);
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
                    g.sm_queue.push(a);
                    if !g.sm_busy {
                        self.sm_ready.insert(gid);
                    }
                }
            }
        }
        if wrote {
            g.writes_in_flight += 1;
        }
        if g.quiet {
            // Driven while quiet (a message that straddled the moment it went quiet): what
            // that used goes again.
            g.release_idle_memory();
        }
        let fingerprint = super::group_info::fingerprint(g);
        if fingerprint != g.published {
            g.published = fingerprint;
            self.info_changed = true;
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
                for load in std::mem::take(&mut g.deferred_loads) {
                    start_load(&self.shared, &self.tx, g, load);
                }
            }
            self.dirty.insert(gid);
        }
    }

    /// Entries read for `peer` (see [`start_load`]). A read that failed after the group left
    /// the term it was asked in is stale, not a fault: a follower's log may have been cut
    /// meanwhile (truncated by a new leader, replaced by a snapshot). A leader in the same
    /// term never cuts entries a load is reading (the engine holds its purges back), so there
    /// a failure is the storage's.
    pub(super) fn on_loaded(&mut self, loaded: Loaded) {
        let Loaded { gid, incarnation, load, result } = loaded;
        let now = self.shared.now();
        let Some(g) = self.groups.get_mut(&gid).filter(|g| g.incarnation == incarnation) else { return };
        g.loading_peers.remove(&load.peer);
        match result {
            Ok(entries) => g.core.handle_entries_loaded(now, load.peer, entries),
            Err(e) if g.core.engine().term() == load.term && g.core.engine().role() == Role::Leader => g.core.fail(e),
            Err(e) => {
                debug!(group = %gid, peer = %load.peer, error = %e, "a load from an earlier term failed: dropped");
                g.core.handle_entries_loaded(now, load.peer, Vec::new());
            }
        }
        if let Some(i) = g.loads_waiting.iter().position(|l| l.peer == load.peer) {
            if let Some(next) = g.loads_waiting.remove(i) {
                start_load(&self.shared, &self.tx, g, next);
            }
        }
        self.dirty.insert(gid);
    }
}

/// A load's answer, for the copy of the group that asked.
pub(crate) struct Loaded {
    pub(super) gid: GroupId,
    pub(super) incarnation: u64,
    pub(super) load: Load,
    pub(super) result: Result<Vec<Entry>, StorageError>,
}

/// Reads entries a leader asked for on the blocking pool, not on the poller's task: a
/// lagging follower's entries come from disk, and one poller drives many groups whose
/// heartbeats must not wait behind that read. The answer comes back as `PollerMsg::Loaded`;
/// the engine checks the entries still match its log before it sends them.
fn start_load(shared: &Arc<Shared>, tx: &super::poller::PollerTx, g: &mut GroupState, load: Load) {
    if !g.loading_peers.insert(load.peer) {
        g.loads_waiting.push_back(load);
        return;
    }
    let (gid, incarnation, log, tx) = (g.id, g.incarnation, g.log.clone(), tx.clone());
    let hooks = shared.clone();
    shared.runtime.spawn_blocking(move || {
        while hooks.hold_loads.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let result = log.read_entries_blocking(load.from, load.to, load.bytes_max);
        let _ = tx.send(PollerMsg::Loaded(Loaded { gid, incarnation, load, result }));
    });
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
