//! An in-memory log and a state machine that holds no data: what openraft's minimal benchmark
//! measures with, written for openraft 0.9's storage API (`storage-v2`). Nothing is durable:
//! an append is "flushed" as soon as it is stored.

use crate::TypeConfig;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StoredMembership, Vote,
};
use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

/// A write of the benchmark: no data, as in openraft's minimal benchmark.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request;

/// The state machine's answer: nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response;

type NodeId = u64;

/// Locks `m`; a panic while holding it cannot leave the maps half-updated (each update is one
/// call on them), so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct LogInner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    /// The entries in order, contiguous from index `first` (as flotilla-raft's `MemLogStorage`
    /// keeps them: the same structure on both sides of the comparison).
    entries: VecDeque<Entry<TypeConfig>>,
    /// The index of `entries[0]`, or of the next entry while `entries` is empty.
    first: u64,
}

impl LogInner {
    /// How many entries come before `index` (all of them past the end, none before `first`).
    fn before(&self, index: u64) -> usize {
        usize::try_from(index.saturating_sub(self.first)).map_or(self.entries.len(), |n| n.min(self.entries.len()))
    }
}

/// The log of one node; clones share it (openraft asks for a separate reader).
#[derive(Clone, Default)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        let start = match range.start_bound() {
            Bound::Included(i) => inner.before(*i),
            Bound::Excluded(i) => inner.before(i.saturating_add(1)),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => inner.before(i.saturating_add(1)),
            Bound::Excluded(i) => inner.before(*i),
            Bound::Unbounded => inner.entries.len(),
        };
        Ok(inner.entries.range(start..end.max(start)).cloned().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        let last = inner.entries.back().map(|e| e.log_id).or(inner.last_purged);
        Ok(LogState { last_purged_log_id: inner.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        lock(&self.inner).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = lock(&self.inner);
            for e in entries {
                if inner.entries.is_empty() {
                    inner.first = e.log_id.index;
                }
                inner.entries.push_back(e);
            }
        }
        // In memory: stored is as durable as it gets.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        let keep = inner.before(log_id.index);
        inner.entries.truncate(keep);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        let purged = inner.before(log_id.index + 1);
        inner.entries.drain(..purged);
        inner.first = inner.first.max(log_id.index + 1);
        inner.last_purged = Some(log_id);
        Ok(())
    }
}

#[derive(Default)]
struct MachineInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    snapshots_built: u64,
    /// The last snapshot built or installed (only its meta: the machine holds no data).
    snapshot: Option<SnapshotMeta<NodeId, openraft::BasicNode>>,
}

/// A state machine with no data: it only records what it applied. Clones share it (the
/// snapshot builder is a clone).
#[derive(Clone, Default)]
pub struct StateMachine {
    inner: Arc<Mutex<MachineInner>>,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        inner.snapshots_built += 1;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("{}", inner.snapshots_built),
        };
        inner.snapshot = Some(meta.clone());
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, openraft::BasicNode>), StorageError<NodeId>> {
        let inner = lock(&self.inner);
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = lock(&self.inner);
        let mut out = Vec::new();
        for e in entries {
            inner.last_applied = Some(e.log_id);
            if let EntryPayload::Membership(m) = e.payload {
                inner.membership = StoredMembership::new(Some(e.log_id), m);
            }
            out.push(Response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut inner = lock(&self.inner);
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some(meta.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = lock(&self.inner);
        Ok(inner.snapshot.clone().map(|meta| Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) }))
    }
}
