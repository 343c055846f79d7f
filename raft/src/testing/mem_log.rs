//! [`MemLogStorage`]: a [`LogStorage`] kept in memory.

use crate::entry::Entry;
use crate::error::StorageError;
use crate::storage::{LogState, LogStorage};
use crate::types::{LogId, LogIndex, Vote};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// An in-memory [`LogStorage`]. Every write is "durable" as soon as it returns (there is no
/// crash to survive in a test); a clone shares the same log, so a test can keep a handle on
/// the store it gave to a group and inspect it or make it fail.
///
/// It checks its callers: an `append` that does not continue the log directly, a
/// `truncate_from` of purged entries, or a `purge_up_to` whose id disagrees with the log
/// returns a [`StorageError`] (never a panic).
#[derive(Clone, Debug, Default)]
pub struct MemLogStorage {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    vote: Option<Vote>,
    last_purged: Option<LogId>,
    /// The entries in order, contiguous, the first right after `last_purged`: appends,
    /// truncations and purges work on the ends, as a log does.
    entries: VecDeque<Entry>,
    committed: Option<LogIndex>,
    fail_writes: bool,
}

impl Inner {
    /// The id of the last entry, or of the last purged one if the log is empty.
    fn last_id(&self) -> Option<LogId> {
        self.entries.back().map(|e| e.log_id).or(self.last_purged)
    }

    /// The index of the first entry the log can hold (right after the last purged one).
    fn first_index(&self) -> u64 {
        self.last_purged.map_or(1, |p| p.index.0 + 1)
    }

    /// How many entries of `entries` come before `index` (all of them for an index past the
    /// end, none for a purged one).
    fn before(&self, index: u64) -> usize {
        usize::try_from(index.saturating_sub(self.first_index()))
            .map_or(self.entries.len(), |n| n.min(self.entries.len()))
    }

    fn check_writable(&self, op: &'static str) -> Result<(), StorageError> {
        if self.fail_writes {
            return Err(StorageError::new(op, "injected write failure (MemLogStorage::set_fail_writes)"));
        }
        Ok(())
    }
}

impl MemLogStorage {
    /// An empty store: no vote, no entries, nothing purged.
    pub fn new() -> Self {
        Self::default()
    }

    /// While `fail`, every write (`save_vote`, `append`, `truncate_from`, `purge_up_to`,
    /// `save_committed`) returns a [`StorageError`] and changes nothing. Reads still work.
    pub fn set_fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    /// A copy of the entries currently in the log, in order.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.iter().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated (every write
        // validates before changing anything), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogStorage for MemLogStorage {
    async fn read_vote(&self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_vote(&self, vote: &Vote) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner.check_writable("save_vote")?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn log_state(&self) -> Result<LogState, StorageError> {
        let inner = self.lock();
        Ok(LogState { last_purged: inner.last_purged, last: inner.entries.back().map(|e| e.log_id) })
    }

    async fn read_entries(&self, from: LogIndex, to: LogIndex, bytes_max: usize) -> Result<Vec<Entry>, StorageError> {
        const OP: &str = "read_entries";
        if from > to {
            return Ok(Vec::new());
        }
        let inner = self.lock();
        let first = inner.first_index();
        if from.0 < first {
            return Err(StorageError::new(
                OP,
                format!("index {from} is purged or before the first entry (first index is {first})"),
            ));
        }
        let last = first + inner.entries.len() as u64 - 1;
        if to.0 > last {
            return Err(StorageError::new(OP, format!("index {to} is beyond the last entry ({last})")));
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let (start, end) = (inner.before(from.0), inner.before(to.0.saturating_add(1)));
        for (index, entry) in (from.0..).zip(inner.entries.range(start..end)) {
            if entry.log_id.index.0 != index {
                return Err(StorageError::new(OP, format!("entry stored at {index} has id {}", entry.log_id)));
            }
            let size = entry.size_bytes();
            if !out.is_empty() && bytes.saturating_add(size) > bytes_max {
                break;
            }
            bytes = bytes.saturating_add(size);
            out.push(entry.clone());
        }
        Ok(out)
    }

    async fn append(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        const OP: &str = "append";
        let mut inner = self.lock();
        inner.check_writable(OP)?;
        // Validate the whole batch first: a rejected append changes nothing.
        let mut prev = inner.last_id().unwrap_or(LogId::ZERO);
        for entry in &entries {
            if entry.log_id.index != prev.index.next() {
                return Err(StorageError::new(
                    OP,
                    format!("entry {} does not continue the log after {prev}", entry.log_id),
                ));
            }
            if entry.log_id.term < prev.term {
                return Err(StorageError::new(
                    OP,
                    format!("entry {} has a lower term than the entry before it ({prev})", entry.log_id),
                ));
            }
            prev = entry.log_id;
        }
        inner.entries.extend(entries);
        Ok(())
    }

    async fn truncate_from(&self, index: LogIndex) -> Result<(), StorageError> {
        const OP: &str = "truncate_from";
        let mut inner = self.lock();
        inner.check_writable(OP)?;
        if let Some(purged) = inner.last_purged {
            if index <= purged.index {
                return Err(StorageError::new(
                    OP,
                    format!("cannot truncate from {index}: entries up to {purged} are purged"),
                ));
            }
        }
        let keep = inner.before(index.0);
        inner.entries.truncate(keep);
        Ok(())
    }

    async fn purge_up_to(&self, log_id: LogId) -> Result<(), StorageError> {
        const OP: &str = "purge_up_to";
        let mut inner = self.lock();
        inner.check_writable(OP)?;
        if let Some(purged) = inner.last_purged {
            if log_id.index < purged.index {
                // Already purged further: nothing to do.
                return Ok(());
            }
            if log_id.index == purged.index && log_id.term != purged.term {
                return Err(StorageError::new(OP, format!("{log_id} disagrees with the last purged id {purged}")));
            }
        }
        let at = inner.before(log_id.index.0);
        if let Some(entry) = inner.entries.get(at).filter(|_| log_id.index.0 >= inner.first_index()) {
            if entry.log_id != log_id {
                return Err(StorageError::new(
                    OP,
                    format!("{log_id} disagrees with the entry in the log {}", entry.log_id),
                ));
            }
        }
        let purged = inner.before(log_id.index.0.saturating_add(1));
        inner.entries.drain(..purged);
        inner.last_purged = Some(log_id);
        Ok(())
    }

    async fn save_committed(&self, committed: LogIndex) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner.check_writable("save_committed")?;
        inner.committed = Some(committed);
        Ok(())
    }

    async fn read_committed(&self) -> Result<Option<LogIndex>, StorageError> {
        Ok(self.lock().committed)
    }
}
