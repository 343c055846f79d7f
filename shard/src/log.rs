//! [`LogStorage`] of one group on the shared [`Store`].

use crate::keys::{
    decode, encode, entries_end, entry_index, entry_key, group_key, KIND_COMMITTED, KIND_LOG_STATE, KIND_VOTE,
};
use crate::store::{Op, Store, CF_RAFT};
use flotilla_raft::{Action, Entry, GroupId, LogId, LogIndex, LogState, LogStorage, StorageError, Vote};
use rocksdb::{Direction, IteratorMode};
use std::sync::{Arc, Mutex};

/// Purges of at most this many entries are point deletes in the normal batch; longer spans
/// use one range tombstone (and a compaction of that range, so tombstones do not pile up).
pub const PURGE_POINT_DELETES_MAX: u64 = 1024;

/// A key range `[from, to)` of the `raft` column family to compact after a ranged purge.
pub type CompactSpan = (Vec<u8>, Vec<u8>);

/// The log's bounds as the writes issued so far leave them (not only those already durable):
/// a host builds the batch of a write before the previous one reached the disk.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    /// Index of the last entry (or of the last purged one when the log is empty).
    last: LogIndex,
    /// The last purged id.
    purged: Option<LogId>,
}

/// One log write, as both the async trait methods and the host's batch builder see it.
enum LogWrite<'a> {
    Vote(&'a Vote),
    Append(&'a [Entry]),
    Truncate(LogIndex),
    Purge(LogId),
}

/// The log and vote of one group. Cheap to clone (clones share the cached bounds).
#[derive(Clone)]
pub struct RocksLog {
    store: Store,
    group: GroupId,
    /// The bounds, once read: each write is checked and planned against them without a read.
    /// Writes of one group come one at a time, in order (the driver's and the host's contract).
    bounds: Arc<Mutex<Option<Bounds>>>,
}

impl RocksLog {
    /// The log of `group` in `store`.
    pub fn new(store: Store, group: GroupId) -> RocksLog {
        RocksLog { store, group, bounds: Arc::new(Mutex::new(None)) }
    }

    fn cached(&self) -> Result<Option<Bounds>, StorageError> {
        Ok(*self.bounds.lock().map_err(|_| StorageError::new("log", "poisoned lock"))?)
    }

    fn set_bounds(&self, b: Bounds) -> Result<(), StorageError> {
        *self.bounds.lock().map_err(|_| StorageError::new("log", "poisoned lock"))? = Some(b);
        Ok(())
    }

    fn read_bounds(store: &Store, group: GroupId) -> Result<Bounds, StorageError> {
        let purged: Option<LogId> = Self::get(store, group, KIND_LOG_STATE)?;
        let last = Self::last_entry(store, group)?.or(purged).map(|l| l.index).unwrap_or_default();
        Ok(Bounds { last, purged })
    }

    /// The bounds, read once (blocking).
    fn bounds_blocking(&self) -> Result<Bounds, StorageError> {
        if let Some(b) = self.cached()? {
            return Ok(b);
        }
        let b = Self::read_bounds(&self.store, self.group)?;
        self.set_bounds(b)?;
        Ok(b)
    }

    async fn bounds(&self) -> Result<Bounds, StorageError> {
        if let Some(b) = self.cached()? {
            return Ok(b);
        }
        let g = self.group;
        let b = self.store.blocking(move |s| Self::read_bounds(s, g)).await?;
        self.set_bounds(b)?;
        Ok(b)
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Reads and caches the log's bounds (blocking: call from a thread of its own). Hosts call
    /// it once when a group starts, before any [`RocksLog::write_ops`], while the store holds
    /// every write of the group.
    pub fn load_last_blocking(&self) -> Result<LogIndex, StorageError> {
        let b = Self::read_bounds(&self.store, self.group)?;
        self.set_bounds(b)?;
        Ok(b.last)
    }

    /// The batch for `w`, the range to compact after it, and the bounds once it is written.
    fn plan(&self, b: Bounds, w: LogWrite<'_>) -> Result<(Vec<Op>, Option<CompactSpan>, Bounds), StorageError> {
        let g = self.group;
        match w {
            LogWrite::Vote(vote) => {
                Ok((vec![Op::Put(CF_RAFT, group_key(g, KIND_VOTE).to_vec(), encode(vote)?)], None, b))
            }
            LogWrite::Append(entries) => {
                let ops = self.append_ops(b.last, entries)?;
                let last = entries.last().map(|e| e.log_id.index).unwrap_or(b.last);
                Ok((ops, None, Bounds { last, ..b }))
            }
            LogWrite::Truncate(index) => {
                let last = b.last.min(LogIndex(index.0.saturating_sub(1)));
                Ok((vec![self.truncate_op(index)], None, Bounds { last, ..b }))
            }
            LogWrite::Purge(log_id) => {
                let (ops, compact) = self.purge_ops(b.purged, log_id)?;
                if ops.is_empty() {
                    return Ok((ops, None, b));
                }
                // Purging past the last entry (after a snapshot install) empties the log,
                // which then continues after the purged id.
                Ok((ops, compact, Bounds { last: b.last.max(log_id.index), purged: Some(log_id) }))
            }
        }
    }

    async fn write_planned(&self, w: LogWrite<'_>) -> Result<(), StorageError> {
        let b = self.bounds().await?;
        let (ops, compact, next) = self.plan(b, w)?;
        if ops.is_empty() {
            return Ok(());
        }
        self.store.write(ops, true).await?;
        self.set_bounds(next)?;
        if let Some((a, b)) = compact {
            // Compact just the purged range so its tombstone does not slow later reads.
            self.store.blocking(move |s| s.compact_raft_range(&a, &b)).await?;
        }
        Ok(())
    }

    /// The write batch for a log write of the engine (`SaveVote`, `AppendEntries`,
    /// `TruncateFrom`, `PurgeUpTo`), for a host that submits the writes of many groups
    /// itself. Blocking (a purge reads the previous bound). The cached bounds are updated as
    /// if the write succeeded: writes are applied in order, and a failed one stops the group.
    /// Also returns the key range to compact after a ranged purge.
    pub fn write_ops(&self, action: &Action) -> Result<(Vec<Op>, Option<CompactSpan>), StorageError> {
        let w = match action {
            Action::SaveVote { vote, .. } => LogWrite::Vote(vote),
            Action::AppendEntries { entries, .. } => LogWrite::Append(entries),
            Action::TruncateFrom { index, .. } => LogWrite::Truncate(*index),
            Action::PurgeUpTo { log_id, .. } => LogWrite::Purge(*log_id),
            other => return Err(StorageError::new("write", format!("not a log write: {other:?}"))),
        };
        let (ops, compact, next) = self.plan(self.bounds_blocking()?, w)?;
        self.set_bounds(next)?;
        Ok((ops, compact))
    }

    /// Entries `from..=to` (blocking), as [`LogStorage::read_entries`].
    pub fn read_entries_blocking(
        &self,
        from: LogIndex,
        to: LogIndex,
        bytes_max: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        read_entries_in(&self.store, self.group, from, to, bytes_max)
    }

    fn append_ops(&self, last: LogIndex, entries: &[Entry]) -> Result<Vec<Op>, StorageError> {
        let Some(first) = entries.first() else { return Ok(Vec::new()) };
        if first.log_id.index != last.next() {
            return Err(StorageError::new(
                "append",
                format!("group {}: entry {} does not follow the last index {last}", self.group, first.log_id),
            ));
        }
        if entries.windows(2).any(|w| w[1].log_id.index != w[0].log_id.index.next()) {
            return Err(StorageError::new("append", format!("group {}: entries are not consecutive", self.group)));
        }
        let mut ops = Vec::with_capacity(entries.len());
        for e in entries {
            ops.push(Op::Put(CF_RAFT, entry_key(self.group, e.log_id.index).to_vec(), encode(e)?));
        }
        Ok(ops)
    }

    fn truncate_op(&self, index: LogIndex) -> Op {
        Op::DeleteRange(CF_RAFT, entry_key(self.group, index).to_vec(), entries_end(self.group).to_vec())
    }

    /// The purge batch given the previous purge point, and the range to compact after it.
    fn purge_ops(&self, prev: Option<LogId>, log_id: LogId) -> Result<(Vec<Op>, Option<CompactSpan>), StorageError> {
        let g = self.group;
        if prev.is_some_and(|p| p.index >= log_id.index) {
            return Ok((Vec::new(), None));
        }
        let first = prev.map(|p| p.index.next()).unwrap_or(LogIndex(1));
        let mut ops = Vec::new();
        let span = log_id.index.0.saturating_sub(first.0) + 1;
        let mut compact = None;
        if span > PURGE_POINT_DELETES_MAX {
            let (a, b) = (entry_key(g, first).to_vec(), entry_key(g, log_id.index.next()).to_vec());
            ops.push(Op::DeleteRange(CF_RAFT, a.clone(), b.clone()));
            compact = Some((a, b));
        } else {
            for i in first.0..=log_id.index.0 {
                ops.push(Op::Delete(CF_RAFT, entry_key(g, LogIndex(i)).to_vec()));
            }
        }
        ops.push(Op::Put(CF_RAFT, group_key(g, KIND_LOG_STATE).to_vec(), encode(&log_id)?));
        Ok((ops, compact))
    }

    fn get<T: serde::de::DeserializeOwned>(store: &Store, group: GroupId, kind: u8) -> Result<Option<T>, StorageError> {
        let cf = store.cf(CF_RAFT)?;
        match store.db().get_cf(cf, group_key(group, kind)).map_err(|e| StorageError::new("read", e.to_string()))? {
            Some(bytes) => decode(&bytes, || format!("group {group} record kind {kind:#x}")).map(Some),
            None => Ok(None),
        }
    }

    fn last_entry(store: &Store, group: GroupId) -> Result<Option<LogId>, StorageError> {
        let cf = store.cf(CF_RAFT)?;
        let end = entries_end(group);
        let mut it = store.db().iterator_cf(cf, IteratorMode::From(&end, Direction::Reverse));
        // The reverse iterator starts at the last key <= end; `end` itself is not an entry key.
        for item in it.by_ref() {
            let (k, v) = item.map_err(|e| StorageError::new("read", e.to_string()))?;
            let Some(index) = entry_index(group, &k) else {
                if k.as_ref() >= end.as_slice() {
                    continue;
                }
                return Ok(None);
            };
            let e: Entry = decode(&v, || format!("group {group} entry {index}"))?;
            return Ok(Some(e.log_id));
        }
        Ok(None)
    }
}

impl LogStorage for RocksLog {
    async fn read_vote(&self) -> Result<Option<Vote>, StorageError> {
        let g = self.group;
        self.store.blocking(move |s| Self::get(s, g, KIND_VOTE)).await
    }

    async fn save_vote(&self, vote: &Vote) -> Result<(), StorageError> {
        self.write_planned(LogWrite::Vote(vote)).await
    }

    async fn log_state(&self) -> Result<LogState, StorageError> {
        let g = self.group;
        self.store
            .blocking(move |s| {
                let last_purged: Option<LogId> = Self::get(s, g, KIND_LOG_STATE)?;
                let last = Self::last_entry(s, g)?;
                Ok(LogState { last_purged, last })
            })
            .await
    }

    async fn read_entries(&self, from: LogIndex, to: LogIndex, bytes_max: usize) -> Result<Vec<Entry>, StorageError> {
        if from > to {
            return Ok(Vec::new());
        }
        let g = self.group;
        self.store.blocking(move |s| read_entries_in(s, g, from, to, bytes_max)).await
    }

    async fn append(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        self.write_planned(LogWrite::Append(&entries)).await
    }

    async fn truncate_from(&self, index: LogIndex) -> Result<(), StorageError> {
        self.write_planned(LogWrite::Truncate(index)).await
    }

    async fn purge_up_to(&self, log_id: LogId) -> Result<(), StorageError> {
        self.write_planned(LogWrite::Purge(log_id)).await
    }

    async fn save_committed(&self, committed: LogIndex) -> Result<(), StorageError> {
        // Not a durability point: written without fsync (a later synced write carries it).
        let op = Op::Put(CF_RAFT, group_key(self.group, KIND_COMMITTED).to_vec(), encode(&committed)?);
        self.store.write(vec![op], false).await
    }

    async fn read_committed(&self) -> Result<Option<LogIndex>, StorageError> {
        let g = self.group;
        self.store.blocking(move |s| Self::get(s, g, KIND_COMMITTED)).await
    }
}

/// Entries `from..=to` of `group`, checked: consecutive, each stored under its own index,
/// checksums verified; stops early only for the byte budget.
fn read_entries_in(
    s: &Store,
    g: GroupId,
    from: LogIndex,
    to: LogIndex,
    bytes_max: usize,
) -> Result<Vec<Entry>, StorageError> {
    if from > to {
        return Ok(Vec::new());
    }
    let cf = s.cf(CF_RAFT)?;
    let start = entry_key(g, from);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut expect = from;
    let mut full = false;
    for item in s.db().iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
        let (k, v) = item.map_err(|e| StorageError::new("read", e.to_string()))?;
        let Some(index) = entry_index(g, &k) else { break };
        if index > to {
            break;
        }
        if index != expect {
            return Err(StorageError::new("read_entries", format!("group {g}: entry {expect} missing")));
        }
        let e: Entry = decode(&v, || format!("group {g} entry {index}"))?;
        if e.log_id.index != index {
            return Err(StorageError::new(
                "read_entries",
                format!("group {g}: entry stored at {index} says it is {}", e.log_id),
            ));
        }
        if !out.is_empty() && bytes + e.size_bytes() > bytes_max {
            full = true;
            break;
        }
        bytes += e.size_bytes();
        out.push(e);
        expect = index.next();
    }
    if out.is_empty() {
        return Err(StorageError::new("read_entries", format!("group {g}: entry {from} missing")));
    }
    // Stopping early is allowed only for the byte budget, never for a missing entry.
    if !full && expect <= to {
        return Err(StorageError::new("read_entries", format!("group {g}: entry {expect} missing")));
    }
    Ok(out)
}
