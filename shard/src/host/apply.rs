//! The state-machine side of a poller: one action at a time per group (apply a batch of
//! committed entries; build, read, drop, receive or install a snapshot), started after the
//! round's log writes were submitted, so a group's applied state never precedes its log in
//! the write order. Also telling each group how far its applied state is durable.

use super::group_state::GroupState;
use super::poller::{Poller, PollerMsg};
use super::Reservation;
use crate::kv::SplitEffect;
use crate::log::RocksLog;
use bytes::Bytes;
use flotilla_raft::{
    GroupId, LogId, LogIndex, MachineAction, NodeId, SnapshotError, SnapshotMeta, StateMachine, StorageError,
};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// An applied index waits this long for another write's fsync to make it durable before the
/// poller asks the store for one itself (an idle node's last applies).
const DURABLE_WAIT_MAX: Duration = Duration::from_millis(500);

/// Bytes read per call when an apply reads its entries back from the log.
const APPLY_READ_BYTES_MAX: usize = 4 << 20;

/// What an apply batch produced: each entry's id and response, the splits it applied, each
/// with the reservation of its new group's id (`None`: the group exists here already), and the
/// groups it absorbed.
pub(crate) type AppliedBatch = (Vec<(LogId, Bytes)>, Vec<(SplitEffect, Option<Reservation>)>, Vec<GroupId>);

impl Poller {
    /// An apply batch is stored: answer the readers, and start the groups it split off.
    pub(super) fn on_applied(&mut self, gid: GroupId, r: Result<AppliedBatch, StorageError>) {
        let now = self.shared.now();
        let Some(g) = self.sm_done(gid) else { return };
        let (splits, merges) = match r {
            Ok((results, splits, merges)) => {
                let last = results.last().map(|(id, _)| id.index);
                g.core.handle_applied(now, results);
                // Snapshots built before the split (or the merge) cover another range: no
                // receiver may get them.
                if !splits.is_empty() || !merges.is_empty() {
                    g.core.discard_snapshots(now);
                }
                if let Some(last) = last {
                    // Written in this batch of the store or an earlier one (the callback runs
                    // after the writer counted it).
                    let batch = self.shared.store.last_written_batch();
                    self.durable_waits.push_back((batch, gid, last, Instant::now()));
                }
                (splits, merges)
            }
            Err(e) => {
                g.core.fail(e);
                (Vec::new(), Vec::new())
            }
        };
        for (split, reservation) in splits {
            self.start_split_group(gid, split, reservation);
        }
        self.forget_absorbed(gid, merges);
    }

    /// Submits the apply writes held back by [`super::Host::hold_applies`] once it is off.
    pub(super) fn release_held_applies(&mut self) {
        if self.held_applies.is_empty() || self.shared.hold_applies.load(Ordering::Acquire) {
            return;
        }
        for (gid, ops, done) in std::mem::take(&mut self.held_applies) {
            if let Err(e) = self.shared.store.submit(ops, false, done) {
                if let Some(g) = self.groups.get_mut(&gid) {
                    g.sm_busy = false;
                    g.core.fail(e);
                    self.dirty.insert(gid);
                }
            }
        }
    }

    /// Tells each group how far its applied state is durable: every batch up to the store's
    /// last synced one is. Asks for a sync when an index waited too long (nothing else wrote).
    pub(super) fn report_durable(&mut self, now: Instant) {
        let synced = self.shared.store.last_synced_batch();
        while let Some(&(batch, gid, index, _)) = self.durable_waits.front() {
            if batch > synced {
                break;
            }
            self.durable_waits.pop_front();
            if let Some(g) = self.groups.get_mut(&gid) {
                g.core.handle_applied_durable(self.shared.now(), index);
                self.dirty.insert(gid);
            }
        }
        let Some(&(_, _, _, since)) = self.durable_waits.front() else {
            self.sync_asked_at = None;
            return;
        };
        let asked_lately = self.sync_asked_at.is_some_and(|at| now.duration_since(at) < DURABLE_WAIT_MAX);
        if now.duration_since(since) >= DURABLE_WAIT_MAX && !asked_lately {
            self.sync_asked_at = Some(now);
            // An empty synced write: the writer syncs the write-ahead log. Nothing to report
            // back; the next round sees the new synced batch.
            if let Err(e) = self.shared.store.submit(Vec::new(), true, Box::new(|_| {})) {
                tracing::warn!(error = %e, "could not ask the store for a sync");
            }
        }
    }

    /// A snapshot build finished (its `BuildPinned` released the group's state-machine queue
    /// before).
    pub(super) fn on_built(&mut self, gid: GroupId, r: Result<Box<SnapshotMeta>, StorageError>) {
        let now = self.shared.now();
        self.dirty.insert(gid);
        let Some(g) = self.groups.get_mut(&gid) else { return };
        match r {
            Ok(meta) => g.core.handle_snapshot_built(now, *meta),
            Err(e) => g.core.fail(e),
        }
    }

    /// Bytes of a snapshot chunk were read.
    pub(super) fn on_chunk_read(
        &mut self,
        gid: GroupId,
        to: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        done: bool,
        r: Result<Option<bytes::Bytes>, StorageError>,
    ) {
        let now = self.shared.now();
        let Some(g) = self.sm_done(gid) else { return };
        match r {
            Ok(data) => g.core.handle_snapshot_read(now, to, meta, offset, data, done),
            Err(e) => g.core.fail(e),
        }
    }

    /// A received chunk was stored, or refused. Once the stream's header is in, its range is
    /// judged against this node's other groups (the inbox judged the first chunk only if the
    /// header fit in it).
    pub(super) fn on_received(
        &mut self,
        gid: GroupId,
        meta: SnapshotMeta,
        reception: u64,
        end: u64,
        r: Result<(), SnapshotError>,
    ) {
        let now = self.shared.now();
        let overlap = match (&r, self.groups.get(&gid)) {
            (Ok(()), Some(g)) => g.sm.receiving_range().and_then(|range| self.owner_of_overlap(gid, &range)),
            _ => None,
        };
        let Some(g) = self.sm_done(gid) else { return };
        match (r, overlap) {
            (Ok(()), None) => g.core.handle_snapshot_received(now, meta, reception, end),
            (Ok(()), Some(other)) => {
                g.sm.abandon_receiving();
                let why = format!("its range overlaps group {other} of this node");
                g.core.handle_snapshot_refused(now, meta, reception, &why);
            }
            (Err(SnapshotError::Refused(why)), _) => g.core.handle_snapshot_refused(now, meta, reception, &why),
            (Err(SnapshotError::Storage(e)), _) => g.core.fail(e),
        }
    }

    /// A snapshot installation finished.
    pub(super) fn on_installed(
        &mut self,
        gid: GroupId,
        meta: SnapshotMeta,
        reception: u64,
        r: Result<(), SnapshotError>,
    ) {
        let now = self.shared.now();
        let Some(g) = self.sm_done(gid) else { return };
        match r {
            Ok(()) => {
                g.core.handle_snapshot_installed(now, meta, reception);
                let range = g.sm.range();
                self.retire_absorbed_sources(gid, &range);
            }
            Err(SnapshotError::Refused(why)) => g.core.handle_snapshot_refused(now, meta, reception, &why),
            Err(SnapshotError::Storage(e)) => g.core.fail(e),
        }
    }

    /// Refuses the installation of the snapshot group `gid` received (not fatal: the leader
    /// builds another one, which may fit by then); its next state-machine action may start.
    fn refuse_install(&mut self, gid: GroupId, meta: SnapshotMeta, reception: u64, why: &str) {
        let now = self.shared.now();
        let Some(g) = self.groups.get_mut(&gid) else { return };
        g.sm.abandon_receiving();
        g.core.handle_snapshot_refused(now, meta, reception, why);
        g.sm_busy = false;
        if !g.sm_queue.is_empty() {
            self.sm_ready.insert(gid);
        }
        self.dirty.insert(gid);
    }

    /// A group's state-machine action finished: the next one may start, and the group is driven
    /// this round. `None` if the group is gone.
    pub(super) fn sm_done(&mut self, gid: GroupId) -> Option<&mut GroupState> {
        let g = self.groups.get_mut(&gid)?;
        g.sm_busy = false;
        if !g.sm_queue.is_empty() {
            self.sm_ready.insert(gid);
        }
        self.dirty.insert(gid);
        Some(g)
    }

    /// Starts the next state-machine action of a group.
    pub(super) fn start_sm(&mut self, gid: GroupId) {
        let Some(g) = self.groups.get_mut(&gid) else { return };
        if g.sm_busy {
            return;
        }
        let Some(action) = g.sm_queue.pop() else { return };
        g.sm_busy = true;
        let tx = self.tx.clone();
        match action {
            MachineAction::Apply { first, last, entries } => {
                let entries = match entries {
                    Some(e) => Ok(e),
                    None => read_slice(&g.log, first, last).map(|(slice, rest)| {
                        // A long range is applied a slice at a time: the rest waits at the head.
                        if let Some(rest) = rest {
                            g.sm_queue.push_front(rest);
                        }
                        slice
                    }),
                };
                let shared = &self.shared;
                let parked = |source: GroupId| shared.is_parked(source, gid);
                let prepared = entries.and_then(|entries| {
                    let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
                    g.sm.prepare_apply_parked(entries, &parked).map(|p| (ids, p))
                });
                match prepared {
                    Ok((mut ids, mut p)) if ids.len() >= p.responses.len() => {
                        let waiting = p.waiting.take();
                        if let Some(w) = &waiting {
                            // The entries from the merge entry to the end of this slice are
                            // applied again once its source is ready here (read back from the
                            // log: they are in it; the rest of a long range is queued already).
                            // With entries before it, their batch goes first and the next try
                            // comes when it is written.
                            let slice_last = ids.last().map_or(last, |l| l.index);
                            ids.truncate(p.responses.len());
                            let again = MachineAction::Apply { first: w.index, last: slice_last, entries: None };
                            g.sm_queue.push_front(again);
                        } else {
                            g.merge_wait = None;
                            if ids.len() != p.responses.len() {
                                g.sm_busy = false;
                                g.core.fail(StorageError::new("apply", "wrong number of responses"));
                                self.info_changed = true;
                                return;
                            }
                        }
                        g.sm.set_merge_state(p.merge_state.clone());
                        if ids.is_empty() {
                            // Stopped at its first entry: nothing to write.
                            g.sm_busy = false;
                            if let Some(w) = waiting {
                                self.wait_for_merge_source(gid, w);
                            }
                            return;
                        }
                        let results: Vec<(LogId, Bytes)> = ids.into_iter().zip(p.responses).collect();
                        // The source's range narrows now, and in the same step the new groups'
                        // ids and ranges are reserved: until each is registered, nothing else may
                        // create it here, nor any group the map split off it since (which its
                        // own split will start). A replica created meanwhile would start empty,
                        // unable to vote, and keep the split's state from starting. Before the
                        // answers go: a caller told that the split applied finds the range
                        // narrowed.
                        let splits = self.shared.publish_splits(&g.sm, p.range, p.splits);
                        // Clients need not wait for the applied state to be stored: their
                        // entries are committed and the answers fixed. Reads wait for it.
                        g.core.answer_writes(&results);
                        let merges = p.merges;
                        let done: crate::store::WriteCallback = Box::new(move |r| {
                            let _ = tx.send(PollerMsg::Applied(gid, r.map(|()| (results, splits, merges))));
                        });
                        if self.shared.hold_applies.load(Ordering::Acquire) {
                            self.held_applies.push((gid, p.ops, done));
                        } else if let Err(e) = self.shared.store.submit(p.ops, false, done) {
                            g.sm_busy = false;
                            g.core.fail(e);
                            self.info_changed = true;
                        }
                    }
                    Ok(_) => {
                        g.sm_busy = false;
                        g.core.fail(StorageError::new("apply", "wrong number of responses"));
                        self.info_changed = true;
                    }
                    Err(e) => {
                        g.sm_busy = false;
                        g.core.fail(e);
                        self.info_changed = true;
                    }
                }
            }
            MachineAction::Build => {
                // The queue is released once the snapshot's point in time is fixed, not when
                // its files are written: a large shard's build must not hold up the applies,
                // and the answers to writes with them. (It only writes scratch files, so a
                // destroy need not wait for it.)
                let sm = g.sm.clone();
                self.shared.runtime.spawn_blocking(move || {
                    let released = std::cell::Cell::new(false);
                    let r = sm.build_snapshot_pinned(|| {
                        released.set(true);
                        let _ = tx.send(PollerMsg::BuildPinned(gid));
                    });
                    if !released.get() {
                        let _ = tx.send(PollerMsg::BuildPinned(gid));
                    }
                    let _ = tx.send(PollerMsg::Built(gid, r.map(Box::new)));
                });
            }
            MachineAction::ReadChunk { to, meta, offset, len, done } => {
                let sm = g.sm.clone();
                self.shared.runtime.spawn_blocking(move || {
                    let result = sm.read_snapshot_blocking(&meta, offset, len);
                    let _ = tx.send(PollerMsg::ChunkRead { gid, to, meta, offset, done, result });
                });
            }
            MachineAction::Drop(meta) => {
                // Removing the files is quick; the next action may start at once.
                g.sm.drop_built(meta.snapshot_id);
                g.sm_busy = false;
                if !g.sm_queue.is_empty() {
                    self.sm_ready.insert(gid);
                }
            }
            MachineAction::Receive { meta, offset, data, reception } => {
                let sm = g.sm.clone();
                self.shared.runtime.spawn_blocking(move || {
                    let end = offset + data.len() as u64;
                    let result = sm.receive_snapshot_blocking(&meta, offset, &data);
                    let _ = tx.send(PollerMsg::Received { gid, meta, reception, end, result });
                });
            }
            MachineAction::Install { meta, reception } => {
                // Checked as the chunks arrived; a group of this node created since then could
                // own keys in the range, and its data must not be replaced. Refused, not
                // fatal: the leader builds another snapshot, which may fit by then.
                let overlap = g.sm.receiving_range().and_then(|r| self.owner_of_overlap(gid, &r));
                if let Some(other) = overlap {
                    let why = format!("group {gid}: the snapshot's range overlaps group {other} of this node");
                    return self.refuse_install(gid, *meta, reception, &why);
                }
                let Some(g) = self.groups.get_mut(&gid) else { return };
                // A snapshot taken after merges this replica missed covers the sources frozen
                // for it here too (they are retired once it is installed).
                let own = g.sm.range();
                let wider = self.shared.range_with_frozen_sources(gid, &own);
                let snap_range = g.sm.receiving_range();
                if let Some(r) = snap_range.filter(|r| !own.covers(r)) {
                    if !self.park_covered_sources(gid, &r) {
                        // Refused for now: the leader sends it again once they are stopped.
                        let why = format!("group {gid}: sources it absorbed still run here; stopping them");
                        return self.refuse_install(gid, *meta, reception, &why);
                    }
                }
                let Some(g) = self.groups.get_mut(&gid) else { return };
                g.sm.permit_install_over((wider != own).then_some(wider));
                // Through the trait: it holds the lock a destroy waits on (and the test hook
                // that holds installations).
                let mut sm = g.sm.clone();
                self.shared.runtime.spawn(async move {
                    let r = sm.install_snapshot(&meta).await;
                    let _ = tx.send(PollerMsg::Installed(gid, meta, reception, r));
                });
            }
        }
        self.dirty.insert(gid);
    }
}

/// The first entries of `first..=last` from the log, at most [`APPLY_READ_BYTES_MAX`] of them
/// (at least one), and the apply of the rest, if any.
fn read_slice(
    log: &RocksLog,
    first: LogIndex,
    last: LogIndex,
) -> Result<(Vec<flotilla_raft::Entry>, Option<MachineAction>), StorageError> {
    let slice = log.read_entries_blocking(first, last, APPLY_READ_BYTES_MAX)?;
    let Some(end) = slice.last().map(|e| e.log_id.index) else {
        return Err(StorageError::new("read_entries", format!("no entries at {first}")));
    };
    let rest = (end < last).then(|| MachineAction::Apply { first: end.next(), last, entries: None });
    Ok((slice, rest))
}
