//! The key-value state machine of one shard: put, delete, compare-and-swap and reads over the
//! shard's key range, stored in the shared `data` column family.
//!
//! Applying writes the data and the group's applied id in one batch, without fsync: the log is
//! durable, and replay after a crash is idempotent (the applied id says where to resume). The
//! store has one write-ahead log, so the next synced write of any group makes the batch
//! durable; from then on the log behind it may be purged (`durable_applied`). Snapshots are
//! built only for a transfer, as files (see [`crate::kv_snapshot`]).

use crate::keys::meta_key;
use crate::keys::{
    decode, encode, group_key, KIND_APPLIED, KIND_COMMITTED, KIND_LOG_STATE, KIND_SNAPSHOT_DATA, KIND_SNAPSHOT_META,
    KIND_VOTE,
};
use crate::kv_snapshot::{self, BuiltSnapshot, ReceivingSnapshot};
use crate::merge::{MergeSource, MergeState};
use crate::store::{Op, Store, CF_DATA, CF_META, CF_RAFT};
use bytes::Bytes;
use flotilla_raft::{
    AppliedState, Entry, EntryPayload, GroupId, LogId, LogIndex, NodeId, SnapshotError, SnapshotMeta, StateMachine,
    StorageError, StoredMembership,
};
use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Locks `m`; a poisoned lock is still usable (every holder leaves its data consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Longest key a command may carry: keeps every key below the unbounded range's end marker.
pub const KEY_BYTES_MAX: usize = 1000;
/// Largest value a command may carry (1 MiB), the one value limit of Flotilla (the client
/// protocol checks it too). An entry carrying one fits an envelope (3 MiB) under the
/// transport's 4 MiB frame; Raft sends an entry larger than its append byte limit alone.
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Most writes one [`KvCommand::Txn`] may carry: bounds the work of one apply.
pub const TXN_WRITES_MAX: usize = 4096;
/// Most bytes of keys and values one [`KvCommand::Txn`] may write: one largest value, so with
/// its expected value (at most [`VALUE_BYTES_MAX`]) its entry is no larger than a
/// compare-and-swap's and fits an envelope as one does.
pub const TXN_BYTES_MAX: usize = VALUE_BYTES_MAX;

/// A half-open key range `[start, end)`; `end: None` is unbounded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// First key of the range.
    pub start: Vec<u8>,
    /// First key after the range, or `None` for no upper bound.
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key.
    pub fn all() -> KeyRange {
        KeyRange::default()
    }
    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_ref().is_none_or(|e| key < e.as_slice())
    }
    /// Whether every key of `other` is in the range.
    pub fn covers(&self, other: &KeyRange) -> bool {
        let end_inside = match (&other.end, &self.end) {
            (_, None) => true,
            (Some(o), Some(e)) => o <= e,
            (None, Some(_)) => false,
        };
        other.start >= self.start && end_inside
    }
    /// Whether some key is in both ranges.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let before_end = |start: &[u8], end: &Option<Vec<u8>>| end.as_ref().is_none_or(|e| start < e.as_slice());
        before_end(&self.start, &other.end)
            && before_end(&other.start, &self.end)
            && !self.is_empty()
            && !other.is_empty()
    }
    fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|e| *e <= self.start)
    }
}

/// One page of a scan: the pairs read, in key order, and how far the read went. A caller
/// continues from where the page says, never from its own idea of the shard's end: the
/// shard's range may have narrowed (a split) since the caller routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// The pairs, in key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// How far the page covers.
    pub end: ScanEnd,
}

/// How far a [`ScanPage`] covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// The limit stopped the read with keys left in the requested span: every key up to the
    /// last pair was read; ask again from just after it.
    More,
    /// Every key from the scan's start up to this key (exclusive) was read: the requested end
    /// or the end of the shard's range, whichever comes first. `None`: to the end of the key
    /// space.
    Covered(Option<Vec<u8>>),
}

/// Why a scan was not served.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The scan starts outside the shard's range (it split, or the caller's routing is
    /// stale): the keys live in another shard now.
    #[error("scan start outside the shard's range")]
    OutOfRange(KeyRange),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What a size check found in a key range: logical bytes (keys plus values, as a client wrote
/// them) rather than bytes on disk, so a fresh shard still in the memtable is sized like an old
/// one, and the figure does not jump at a flush or compaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSize {
    /// Bytes of keys and values in the range.
    pub bytes: u64,
    /// Keys in the range.
    pub keys: u64,
    /// A key near the middle of the range by bytes, strictly after its first key: a split point
    /// that leaves about half the data on each side. `None` for fewer than two keys. Of a
    /// range read only in part, the middle of the part read.
    pub middle: Option<Vec<u8>>,
    /// Whether the whole range was read (`false`: it holds more than the limit; `bytes` and
    /// `keys` count the part read).
    pub complete: bool,
    /// The whole range's logical bytes: `bytes` when complete; else `bytes` scaled by how much
    /// of the range's files the part read spans (RocksDB's estimate from its file index, so
    /// compression cancels out; data only in memtables is not seen). What a move must copy.
    pub estimate: u64,
}

/// The largest factor a partly read range's size is scaled by (see `RangeSize::estimate`).
const ESTIMATE_SCALE_MAX: u64 = 64;

/// Marks kept while sizing a range: when there are this many, every other one is dropped and the
/// spacing doubles, so memory stays bounded whatever the range holds.
const SIZE_MARKS_MAX: usize = 512;

/// Sizes the data of `range` by reading it (blocking; does not fill the block cache), stopping
/// after `bytes_max` bytes. Cost is linear in what it reads: callers rate-limit it (the node
/// re-sizes a shard only after writes, at most every few seconds).
pub fn range_size_blocking(store: &Store, range: &KeyRange, bytes_max: u64) -> Result<RangeSize, StorageError> {
    let mut opts = rocksdb::ReadOptions::default();
    opts.fill_cache(false);
    if let Some(end) = &range.end {
        opts.set_iterate_upper_bound(end.clone());
    }
    let cf = store.cf(CF_DATA)?;
    // (bytes before the key, key), at least `step` bytes apart.
    let mut marks: Vec<(u64, Vec<u8>)> = Vec::new();
    let (mut step, mut next_mark) = (1u64, 0u64);
    let mut out = RangeSize { complete: true, ..RangeSize::default() };
    let mut stopped_at = None;
    for item in store.db().iterator_cf_opt(cf, opts, IteratorMode::From(&range.start, Direction::Forward)) {
        if out.bytes >= bytes_max {
            out.complete = false;
            if let Ok((k, _)) = item {
                stopped_at = Some(k.to_vec());
            }
            break;
        }
        let (k, v) = item.map_err(|e| StorageError::new("size", e.to_string()))?;
        if out.bytes >= next_mark {
            marks.push((out.bytes, k.to_vec()));
            next_mark = out.bytes + step;
            if marks.len() >= SIZE_MARKS_MAX {
                marks = marks.into_iter().step_by(2).collect();
                step *= 2;
            }
        }
        out.bytes += (k.len() + v.len()) as u64;
        out.keys += 1;
    }
    let half = out.bytes / 2;
    out.middle = marks.into_iter().filter(|(at, _)| *at > 0).min_by_key(|(at, _)| at.abs_diff(half)).map(|(_, k)| k);
    out.estimate = out.bytes;
    if let Some(stop) = stopped_at {
        let end = range.end.clone().unwrap_or_else(|| UNBOUNDED_END.to_vec());
        let sizes = store.db().get_approximate_sizes_cf(
            &cf,
            &[rocksdb::Range::new(&range.start, &stop), rocksdb::Range::new(&range.start, &end)],
        );
        if let [part, all] = sizes[..] {
            // Only where the part read is mostly in files: data still in memtables is not in
            // the file index, and a tiny `part` would scale the figure without bound.
            if part > 0 && all > part && all / part <= ESTIMATE_SCALE_MAX {
                let scaled = out.bytes as u128 * all as u128 / part as u128;
                out.estimate = u64::try_from(scaled).unwrap_or(u64::MAX);
            }
        }
    }
    Ok(out)
}

/// A write command of a shard, as carried in a log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Set `key` to `value`.
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// Key.
        key: Vec<u8>,
    },
    /// Split the shard at `at`: this group keeps `[start, at)`, and group `new_group` is
    /// formed on every replica with `[at, end)` and the same configuration. Applied at the same
    /// log position everywhere, so every replica splits at the same state; the data stays where
    /// it is (one keyspace), only the descriptors change.
    ///
    /// The new group starts from a snapshot point rather than from a first entry: its log is
    /// purged through [`SPLIT_BORN_LOG_ID`] and its applied state is that point with the
    /// source's configuration, the data being what the split left in place. A replica of the
    /// new group that did not apply the split (it skipped the entry by installing a later
    /// snapshot of the source, or was added afterwards) has none of that state, so its leader
    /// catches it up by snapshot rather than from a log that lacks the data.
    Split {
        /// First key of the new shard; strictly inside the current range.
        at: Vec<u8>,
        /// Id of the new group (allocated by placement).
        new_group: u64,
    },
    /// Set `key` to `new` (`None`: delete) if its value is `expected` (`None`: absent).
    Cas {
        /// Key.
        key: Vec<u8>,
        /// Expected current value.
        expected: Option<Vec<u8>>,
        /// New value.
        new: Option<Vec<u8>>,
    },
    /// Change the value of `key` by `op`, computed from the value the command finds when it is
    /// applied: atomic with no read before and no retry (Redis's `INCR`, `APPEND`). Answers
    /// [`KvResponse::Done`] with the value before, or [`KvResponse::Refused`] (nothing changed)
    /// when the value does not suit the operation.
    Update {
        /// Key.
        key: Vec<u8>,
        /// What to do with its value.
        op: UpdateOp,
    },
    /// Apply every write of `writes` in order, all in one batch, if `guard`'s value is
    /// `expected` (`None`: absent); otherwise nothing ([`KvResponse::CasFailed`] with the
    /// guard's value). A compare-and-swap of one small key that changes many: how a caller
    /// keeping a structure as many keys changes a few of them without rewriting the rest, and
    /// without another writer's change slipping in between its read and its write. Every key
    /// must be in the shard's range ([`KvResponse::OutOfRange`] otherwise, nothing changed).
    Txn {
        /// The key whose value decides.
        guard: Vec<u8>,
        /// Its expected value.
        expected: Option<Vec<u8>>,
        /// Key and new value (`None`: delete), applied in order.
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    },
    /// Set every key of `pairs` if none of them exists; otherwise nothing (Redis's `MSETNX`,
    /// atomic within one shard). Answers [`KvResponse::Done`] (no previous value) when written,
    /// [`KvResponse::CasFailed`] with the first existing key's value when not. Every key must be
    /// in the shard's range ([`KvResponse::OutOfRange`] otherwise, nothing changed); the same
    /// size limits as a [`KvCommand::Txn`]'s writes.
    InsertAll {
        /// Keys and values; a key given twice takes its last value, as in Redis.
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Freeze the shard for merge `id` into group `into` (see [`crate::merge`]): from this
    /// entry on it applies no write and no split, until thawed or absorbed. Answers
    /// [`KvResponse::Frozen`] with the freeze entry (the first one, if proposed again).
    Freeze {
        /// Placement's id of the merge.
        id: u64,
        /// The group that will absorb this one.
        into: u64,
        /// The range the merge was decided on: a shard whose range differs (a split the map
        /// made that its log has not applied yet) refuses the freeze.
        start: Vec<u8>,
        /// The end of that range (`None`: unbounded).
        end: Option<Vec<u8>>,
    },
    /// Thaw the shard frozen for merge `id` (the merge was aborted); no freeze of that merge
    /// applies afterwards.
    Thaw {
        /// Placement's id of the merge.
        id: u64,
    },
    /// Absorb group `source`, frozen for merge `id` at `freeze` with the range
    /// `[source_start, source_end)` starting where this shard ends: this shard's range
    /// becomes the union, and the source's replica on each node is deleted, its data kept.
    /// Refused (nothing changed, on every replica alike) unless the ranges are adjacent and
    /// this shard's configuration is exactly `voters`. Answers [`KvResponse::Merged`].
    Merge {
        /// The group absorbed.
        source: u64,
        /// Placement's id of the merge.
        id: u64,
        /// The source's freeze entry.
        freeze: LogId,
        /// The source's first key.
        source_start: Vec<u8>,
        /// The key after the source's last (`None`: unbounded).
        source_end: Option<Vec<u8>>,
        /// The voters both groups have.
        voters: std::collections::BTreeSet<NodeId>,
    },
}

/// A read-modify-write of one value ([`KvCommand::Update`]). Numbers follow Redis's rules
/// (`flotilla_resp::number`): the same on every replica, since they are part of the command's
/// meaning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateOp {
    /// Add to the value read as a decimal integer (absent: 0); overflow is refused.
    AddInt(i64),
    /// Add to the value read as a decimal float (absent: 0); the increment as its IEEE 754 bits
    /// (commands are compared for equality). A result that is not finite is refused.
    AddFloat(u64),
    /// Append bytes to the value (absent: empty); a result above [`VALUE_BYTES_MAX`] is refused.
    Append(Vec<u8>),
}

impl UpdateOp {
    /// The new value, from the current one; or why the operation does not apply to it.
    pub fn apply(&self, current: Option<&[u8]>) -> Result<Vec<u8>, String> {
        use flotilla_resp::number::{format_human, parse_f64, parse_i64};
        match self {
            UpdateOp::AddInt(delta) => {
                let n = match current {
                    None => 0,
                    Some(text) => parse_i64(text).ok_or("value is not an integer or out of range")?,
                };
                let sum = n.checked_add(*delta).ok_or("increment or decrement would overflow")?;
                Ok(sum.to_string().into_bytes())
            }
            UpdateOp::AddFloat(bits) => {
                let n = match current {
                    None => 0.0,
                    Some(text) => parse_f64(text).ok_or("value is not a valid float")?,
                };
                let sum = n + f64::from_bits(*bits);
                if !sum.is_finite() {
                    return Err("increment would produce NaN or Infinity".into());
                }
                Ok(format_human(sum).into_bytes())
            }
            UpdateOp::Append(tail) => {
                let mut value = current.map(<[u8]>::to_vec).unwrap_or_default();
                if value.len() + tail.len() > VALUE_BYTES_MAX {
                    return Err(format!("string exceeds maximum allowed size ({VALUE_BYTES_MAX} bytes)"));
                }
                value.extend_from_slice(tail);
                Ok(value)
            }
        }
    }
}

impl KvCommand {
    /// Why the command is too large to accept, if it is.
    pub fn check_size(&self) -> Result<(), String> {
        if let KvCommand::Txn { guard, expected, writes } = self {
            return check_txn_size(guard, expected.as_deref(), writes);
        }
        if let KvCommand::InsertAll { pairs } = self {
            return check_insert_size(pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        }
        if self.key().len() > KEY_BYTES_MAX {
            return Err(format!("key of {} bytes exceeds the limit of {KEY_BYTES_MAX}", self.key().len()));
        }
        let value = match self {
            KvCommand::Put { value, .. } => value.len(),
            KvCommand::Delete { .. }
            | KvCommand::Split { .. }
            | KvCommand::Txn { .. }
            | KvCommand::InsertAll { .. }
            | KvCommand::Thaw { .. } => 0,
            KvCommand::Merge { source_start: start, source_end: end, .. } | KvCommand::Freeze { start, end, .. } => {
                start.len().max(end.as_ref().map_or(0, |e| e.len()))
            }
            KvCommand::Update { op: UpdateOp::Append(tail), .. } => tail.len(),
            KvCommand::Update { .. } => 0,
            KvCommand::Cas { expected, new, .. } => {
                expected.as_ref().map_or(0, |v| v.len()).max(new.as_ref().map_or(0, |v| v.len()))
            }
        };
        if value > VALUE_BYTES_MAX {
            return Err(format!("value of {value} bytes exceeds the limit of {VALUE_BYTES_MAX}"));
        }
        Ok(())
    }

    /// The key the command writes (a transaction's guard).
    pub fn key(&self) -> &[u8] {
        match self {
            KvCommand::Put { key, .. }
            | KvCommand::Delete { key }
            | KvCommand::Cas { key, .. }
            | KvCommand::Update { key, .. } => key,
            KvCommand::Split { at, .. } => at,
            // Commands about the shard as a whole: no key of their own.
            KvCommand::Freeze { .. } | KvCommand::Thaw { .. } | KvCommand::Merge { .. } => &[],
            KvCommand::Txn { guard, .. } => guard,
            KvCommand::InsertAll { pairs } => pairs.first().map_or(&[][..], |(k, _)| k),
        }
    }

    /// Whether every key the command reads or writes is in `range`.
    pub fn within(&self, range: &KeyRange) -> bool {
        match self {
            KvCommand::Txn { guard, writes, .. } => {
                range.contains(guard) && writes.iter().all(|(k, _)| range.contains(k))
            }
            KvCommand::InsertAll { pairs } => pairs.iter().all(|(k, _)| range.contains(k)),
            KvCommand::Freeze { .. } | KvCommand::Thaw { .. } | KvCommand::Merge { .. } => true,
            other => range.contains(other.key()),
        }
    }

    /// Whether a frozen shard refuses the command: everything that changes its data or its
    /// range, except the merge steps themselves.
    pub fn refused_when_frozen(&self) -> bool {
        !matches!(self, KvCommand::Freeze { .. } | KvCommand::Thaw { .. })
    }
    /// Encodes as a checksummed, versioned record.
    pub fn encode(&self) -> Result<Bytes, StorageError> {
        encode(self).map(Bytes::from)
    }
    /// Decodes a record made by [`KvCommand::encode`].
    pub fn decode(bytes: &[u8]) -> Result<KvCommand, StorageError> {
        decode(bytes, || "kv command".into())
    }
}

/// Why a transaction is too large, if it is: each key and value within the single-key limits,
/// at most [`TXN_WRITES_MAX`] writes and [`TXN_BYTES_MAX`] bytes of them in all.
fn check_txn_size(guard: &[u8], expected: Option<&[u8]>, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), String> {
    if expected.map_or(0, <[u8]>::len) > VALUE_BYTES_MAX {
        return Err(format!("expected value exceeds the limit of {VALUE_BYTES_MAX}"));
    }
    check_key_size(guard)?;
    check_writes_size(writes.iter().map(|(k, v)| (k.as_slice(), v.as_ref().map_or(0, Vec::len))))
}

/// Why an insert of `pairs` ([`KvCommand::InsertAll`], Redis's `MSETNX`) is too large, if it
/// is: the limits of a transaction ([`TXN_WRITES_MAX`] writes, [`TXN_BYTES_MAX`] bytes of keys
/// and values in all, each key within [`KEY_BYTES_MAX`]). Looks at the pairs where they are,
/// copying nothing, so a front door can check a request before it builds one.
pub fn check_insert_size<'a>(pairs: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>) -> Result<(), String> {
    if pairs.len() == 0 {
        return Err("an insert of no keys".into());
    }
    check_writes_size(pairs.map(|(k, v)| (k, v.len())))
}

fn check_key_size(key: &[u8]) -> Result<(), String> {
    if key.len() > KEY_BYTES_MAX {
        return Err(format!("key of {} bytes exceeds the limit of {KEY_BYTES_MAX}", key.len()));
    }
    Ok(())
}

/// The count, each key's length and the total of keys and values of a transaction's writes
/// (each a key and the length of its value), in one pass.
fn check_writes_size<'a>(writes: impl ExactSizeIterator<Item = (&'a [u8], usize)>) -> Result<(), String> {
    if writes.len() > TXN_WRITES_MAX {
        return Err(format!("transaction of {} writes exceeds the limit of {TXN_WRITES_MAX}", writes.len()));
    }
    let mut total = 0usize;
    for (key, value) in writes {
        check_key_size(key)?;
        total = total.saturating_add(key.len()).saturating_add(value);
    }
    if total > TXN_BYTES_MAX {
        return Err(format!("transaction of {total} bytes exceeds the limit of {TXN_BYTES_MAX}"));
    }
    Ok(())
}

/// The answer to a [`KvCommand`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// Done; the value before the command (`None` for a put, which does not read it).
    Done {
        /// Previous value.
        previous: Option<Vec<u8>>,
    },
    /// A compare-and-swap that did not match; the current value.
    CasFailed {
        /// Current value.
        current: Option<Vec<u8>>,
    },
    /// The command was refused (e.g. its key is outside the shard's range); nothing changed.
    Refused(String),
    /// The key is outside the shard's range (it split after the command was routed); nothing
    /// changed, so the command can be retried where the key lives now.
    OutOfRange,
    /// The shard split: this group now owns `left`, the new group `right`.
    Split {
        /// The range this group keeps.
        left: KeyRange,
        /// The range of the new group.
        right: KeyRange,
    },
    /// The shard is frozen for a merge, since entry `at`.
    Frozen {
        /// The freeze entry.
        at: LogId,
    },
    /// The shard absorbed its right-hand neighbour: it owns `range` now.
    Merged {
        /// The range after the merge.
        range: KeyRange,
    },
}

impl KvResponse {
    /// Encodes as a record.
    pub fn encode(&self) -> Result<Bytes, StorageError> {
        encode(self).map(Bytes::from)
    }
    /// Decodes a record made by [`KvResponse::encode`].
    pub fn decode(bytes: &[u8]) -> Result<KvResponse, StorageError> {
        decode(bytes, || "kv response".into())
    }
}

/// Where a group born of a split starts: every replica that applies the split writes the same
/// point (log purged through it, applied up to it, vote term 1).
pub const SPLIT_BORN_LOG_ID: LogId = LogId { term: flotilla_raft::Term(1), index: flotilla_raft::LogIndex(1) };

/// The Raft and applied state of a group born of a split, written in the split's apply batch.
fn split_born_state(g: GroupId, membership: &flotilla_raft::Membership) -> Result<Vec<Op>, StorageError> {
    let at = SPLIT_BORN_LOG_ID;
    let applied = AppliedRecord {
        last_applied: Some(at),
        membership: StoredMembership { log_id: at, membership: membership.clone() },
    };
    let vote = flotilla_raft::Vote { term: at.term, voted_for: None };
    Ok(vec![
        Op::Put(CF_RAFT, group_key(g, KIND_VOTE).to_vec(), encode(&vote)?),
        Op::Put(CF_RAFT, group_key(g, KIND_LOG_STATE).to_vec(), encode(&at)?),
        Op::Put(CF_RAFT, group_key(g, KIND_COMMITTED).to_vec(), encode(&at.index)?),
        Op::Put(CF_RAFT, group_key(g, KIND_APPLIED).to_vec(), encode(&applied)?),
    ])
}

/// An apply batch prepared for a host to submit: the writes, one response per entry, and the
/// splits it performs (the host starts the new groups once the batch is written).
#[derive(Debug)]
pub struct Prepared {
    /// The batch (data, descriptors, applied index).
    pub ops: Vec<Op>,
    /// One response per entry.
    pub responses: Vec<Bytes>,
    /// Splits applied.
    pub splits: Vec<SplitEffect>,
    /// The shard's range after the batch (narrowed by its splits, widened by its merges).
    pub range: KeyRange,
    /// Groups the batch absorbed ([`KvCommand::Merge`]): their state goes with the batch, and
    /// the host forgets their parked replicas once it is written.
    pub merges: Vec<GroupId>,
    /// The shard's merge state after the batch.
    pub merge_state: MergeState,
    /// Where the batch stopped short: a merge entry whose source is not ready on this node
    /// (not parked yet, or its stored state short of the freeze). The entries from there on
    /// are applied again later; the responses cover those before it.
    pub waiting: Option<MergeWait>,
}

/// A merge entry that cannot be applied yet on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeWait {
    /// The merge entry's index: the first entry not applied.
    pub index: LogIndex,
    /// The group to absorb.
    pub source: GroupId,
    /// Placement's id of the merge.
    pub id: u64,
    /// The source's freeze entry.
    pub freeze: LogId,
    /// Why not yet.
    pub why: String,
}

/// What the `meta` column family holds for each group of a node: its key range and, for a
/// group that must form itself at start-up (created with a configuration, or by a split), that
/// configuration. A host reads these at start-up without touching any log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDescriptor {
    /// The key range the group's state machine owns.
    pub range: KeyRange,
    /// The configuration to form the group with while it has no Raft state.
    pub initial: Option<flotilla_raft::Membership>,
}

/// A split the state machine applied: the host must start `new_group` (its descriptor is
/// already written, in the same batch as the applied index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitEffect {
    /// The new group.
    pub new_group: GroupId,
    /// Its range.
    pub range: KeyRange,
    /// The configuration it starts with (the source's at the split).
    pub membership: flotilla_raft::Membership,
}

/// The state machine's applied id and configuration, under `KIND_APPLIED` (written with each
/// apply batch, and by a snapshot's installation).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct AppliedRecord {
    /// The last entry applied; `None` before anything was.
    pub(crate) last_applied: Option<LogId>,
    /// The configuration in force at `last_applied`.
    pub(crate) membership: StoredMembership,
}

/// The exclusive upper bound used for a range with no end: above every key of at most this
/// many 0xff bytes. Keys are limited well below it.
pub(crate) const UNBOUNDED_END: [u8; 1024] = [0xff; 1024];

/// The state machine of one shard.
#[derive(Clone)]
pub struct KvStateMachine {
    store: Store,
    group: GroupId,
    /// What clones (the host's reader and the poller's applier) share: one allocation per
    /// group, not one per field (a node holds thousands of groups).
    life: Arc<Life>,
}

/// The state of a [`KvStateMachine`] its clones share.
#[derive(Default)]
struct Life {
    /// The range, narrowed by a split or by installing a snapshot taken after one.
    range: RwLock<KeyRange>,
    /// The merge state as of the last prepared batch.
    merge: RwLock<MergeState>,
    /// Whether the group was destroyed on this node.
    retired: std::sync::atomic::AtomicBool,
    /// Held by snapshot builds and installations while they run, so that a destroy can wait
    /// for them.
    snapshot_work: tokio::sync::Mutex<()>,
    /// Snapshots built for transfers and not yet dropped, by id.
    built: Mutex<HashMap<u64, Arc<BuiltSnapshot>>>,
    /// The snapshot being received, between chunks. Boxed: it is large (about 400 bytes) and
    /// there only while a snapshot streams in, which most groups of a node never do.
    receiving: Mutex<Option<Box<ReceivingSnapshot>>>,
    /// A range wider than the group's that the next installation may take: the group's own
    /// widened by sources frozen for it to absorb (a snapshot taken after the merge, which
    /// this replica missed). Set by the host just before the installation.
    install_over: Mutex<Option<KeyRange>>,
    /// Through the trait's `apply` (a host tracks it itself): the applied index durable so
    /// far, and the indexes applied after it with the store batch each was written in.
    durable: Mutex<(LogIndex, VecDeque<(u64, LogIndex)>)>,
    /// The applied record the last prepared batch left, so that the next batch does not read
    /// it back from the store (a memtable search through every version of a key rewritten by
    /// each batch, and a decode: with many shards, one per write). A group's batches are
    /// prepared one at a time, each once the one before was written, and a batch whose write
    /// fails stops the group, so the record here is the one the store holds. `None` until
    /// first read, while a batch is prepared and after one failed to, and whenever something
    /// else writes the record (a snapshot installation).
    applied: Mutex<Option<AppliedRecord>>,
}

/// Bytes of keys and values per SST file of a snapshot: the unit a receiver verifies and
/// ingests.
pub const SNAPSHOT_FILE_BYTES_MAX: u64 = 64 << 20;
/// Builds of one backup before giving up, each refused because a split changed the range.
const BACKUP_BUILD_TRIES: usize = 3;

/// A new snapshot's id. Clock-based: unique across restarts of this node, which forget earlier
/// snapshots; never the same twice in one process (a transfer and a backup may start at once,
/// and each drops its own by id).
fn snapshot_id_now() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let prev = LAST.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    if prev >= now {
        LAST.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    } else {
        now
    }
}

impl KvStateMachine {
    /// The state machine of `group`, owning `range`.
    pub fn new(store: Store, group: GroupId, range: KeyRange) -> KvStateMachine {
        KvStateMachine { store, group, life: Arc::new(Life { range: RwLock::new(range), ..Life::default() }) }
    }

    /// Marks the group destroyed on this node and waits for the snapshot build or installation
    /// under way, if any: after it returns none runs or starts, so nothing they would write
    /// can land after the caller deletes the group's state and data.
    pub(crate) async fn retire(&self) {
        self.life.retired.store(true, std::sync::atomic::Ordering::Release);
        drop(self.life.snapshot_work.lock().await);
    }

    fn check_live(&self, what: &'static str) -> Result<(), StorageError> {
        if self.life.retired.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StorageError::new(what, format!("group {} was destroyed on this node", self.group)));
        }
        Ok(())
    }

    /// Reads `key` (from the local state: linearizable only after `ensure_linearizable`).
    pub async fn get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, StorageError> {
        if !self.range().contains(&key) {
            return Err(StorageError::new("get", format!("key outside shard {} range", self.group)));
        }
        // Most reads are answered by the memtables or the block cache: here, on the caller's
        // thread. A hand-off to the blocking pool and back costs two thread wake-ups, several
        // times the read itself; only a read that needs the disk pays for it.
        if let Some(v) = self.store.get_in_memory(CF_DATA, &key)? {
            return Ok(v);
        }
        self.store
            .blocking(move |s| s.db().get_cf(s.cf(CF_DATA)?, &key).map_err(|e| StorageError::new("get", e.to_string())))
            .await
    }

    /// Key-value pairs in `[from, to)` within the shard's range, at most `limit` (at least one
    /// is read: a page of none could not move a scan on), and how far the page covers: to
    /// `to` or the range's end, whichever comes first, or [`ScanEnd::More`] when the limit
    /// stopped it with keys left. A `from` outside the range is refused
    /// ([`ScanError::OutOfRange`]) rather than answered with an empty page, which a caller
    /// routing by an older, wider range would take for "nothing there" and skip past keys
    /// that now live in another shard.
    pub async fn scan(&self, from: Vec<u8>, to: Option<Vec<u8>>, limit: usize) -> Result<ScanPage, ScanError> {
        // One reading of the range for the check, the bound and the answer: a split applying
        // meanwhile cannot make them disagree.
        let range = self.range();
        if !range.contains(&from) {
            return Err(ScanError::OutOfRange(range));
        }
        let bound = match (to, range.end) {
            (Some(t), Some(e)) => Some(t.min(e)),
            (t, e) => t.or(e),
        };
        let limit = limit.max(1);
        let page = self
            .store
            .blocking(move |s| {
                let mut pairs = Vec::new();
                for item in s.db().iterator_cf(s.cf(CF_DATA)?, IteratorMode::From(&from, Direction::Forward)) {
                    let (k, v) = item.map_err(|e| StorageError::new("scan", e.to_string()))?;
                    if bound.as_ref().is_some_and(|b| k.as_ref() >= b.as_slice()) {
                        break;
                    }
                    if pairs.len() >= limit {
                        // A key in the span is left: the page ends at its last pair.
                        return Ok(ScanPage { pairs, end: ScanEnd::More });
                    }
                    pairs.push((k.to_vec(), v.to_vec()));
                }
                Ok(ScanPage { pairs, end: ScanEnd::Covered(bound) })
            })
            .await?;
        Ok(page)
    }

    /// The write batch and responses for applying `entries` (blocking), for a host that
    /// submits the batch itself. The batch must be written before the next call for this
    /// shard: a compare-and-swap reads the state the previous batch left, and the next batch
    /// starts from the applied index this one leaves (kept here, not read back). A batch that
    /// is not written must be the last: the group stops. The range the batch
    /// leaves ([`Prepared::range`]) is not in effect until the host sets it (`set_range`),
    /// together with what it does for the splits.
    pub fn prepare_apply_blocking(&self, entries: Vec<Entry>) -> Result<Prepared, StorageError> {
        self.prepare_apply_parked(entries, &|_| false)
    }

    /// [`KvStateMachine::prepare_apply_blocking`] for a host that parks the sources of
    /// merges: `parked(g)` says whether group `g`'s replica here is stopped for this shard to
    /// absorb it. A merge entry whose source is not stops the batch ([`Prepared::waiting`]).
    pub fn prepare_apply_parked(
        &self,
        entries: Vec<Entry>,
        parked: &dyn Fn(GroupId) -> bool,
    ) -> Result<Prepared, StorageError> {
        let mut range = self.range();
        let mut merge = self.merge_state();
        Self::apply_ops(&self.store, self.group, &self.life.applied, &mut range, &mut merge, entries, parked)
    }

    /// The shard's merge state (as of the last prepared batch).
    pub fn merge_state(&self) -> MergeState {
        self.life.merge.read().map(|r| r.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The freeze the shard holds, if any (as of the last prepared batch): the merge state's
    /// one field read often, without a copy of the rest.
    pub fn frozen(&self) -> Option<crate::merge::Frozen> {
        self.life.merge.read().map(|r| r.frozen).unwrap_or_else(|e| e.into_inner().frozen)
    }

    pub(crate) fn set_merge_state(&self, state: MergeState) {
        match self.life.merge.write() {
            Ok(mut r) => *r = state,
            Err(e) => *e.into_inner() = state,
        }
    }

    /// Reads the merge state from the store into memory (blocking): at start-up and after a
    /// snapshot's installation, which carries it.
    fn load_merge_state(&self, s: &Store) -> Result<(), StorageError> {
        self.set_merge_state(crate::merge::read_merge_state(s, self.group)?);
        Ok(())
    }

    /// The shard's key range (as of the last applied batch).
    pub fn range(&self) -> KeyRange {
        self.life.range.read().map(|r| r.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// `f` of the range, read in place: a check of every group's range (a node's 100,000) must
    /// not copy each one.
    pub fn with_range<T>(&self, f: impl FnOnce(&KeyRange) -> T) -> T {
        match self.life.range.read() {
            Ok(r) => f(&r),
            Err(e) => f(&e.into_inner()),
        }
    }

    /// Whether this replica has applied anything and holds a configuration with `node` in it.
    /// A replica created empty has neither until its leader's snapshot or log reaches it, so
    /// until then its (empty) data says nothing about the shard.
    pub async fn has_joined(&self, node: NodeId) -> Result<bool, StorageError> {
        let g = self.group;
        self.store
            .blocking(move |s| {
                let r = Self::read_applied(s, g)?;
                Ok(r.last_applied.is_some() && r.membership.membership.contains(node))
            })
            .await
    }

    /// Releases the snapshot built with `snapshot_id` (its files go).
    pub fn drop_built(&self, snapshot_id: u64) {
        lock(&self.life.built).remove(&snapshot_id);
    }

    /// Abandons the snapshot being received (its files go).
    pub fn abandon_receiving(&self) {
        *lock(&self.life.receiving) = None;
    }

    /// The key range of the snapshot being received, once its header arrived.
    pub fn receiving_range(&self) -> Option<KeyRange> {
        lock(&self.life.receiving).as_ref().and_then(|r| r.range().cloned())
    }

    /// Builds a snapshot of the shard for a transfer (blocking); it stays readable until
    /// dropped.
    pub fn build_snapshot_blocking(&self) -> Result<SnapshotMeta, StorageError> {
        self.build_snapshot_pinned(|| {})
    }

    /// [`KvStateMachine::build_snapshot_blocking`], calling `pinned` once the snapshot's point
    /// in time is fixed: a host lets the group apply again from then on, rather than wait for
    /// the files of a large shard to be written.
    pub fn build_snapshot_pinned(&self, pinned: impl FnOnce()) -> Result<SnapshotMeta, StorageError> {
        self.check_live("snapshot")?;
        let snapshot_id = snapshot_id_now();
        let (meta, built) = BuiltSnapshot::build_pinned(
            &self.store,
            self.group,
            &self.range(),
            snapshot_id,
            SNAPSHOT_FILE_BYTES_MAX,
            pinned,
        )?;
        // Destroyed meanwhile: its files go now rather than linger until a restart.
        self.check_live("snapshot")?;
        lock(&self.life.built).insert(meta.snapshot_id, Arc::new(built));
        Ok(meta)
    }

    /// Builds a snapshot of the shard for a backup, at one RocksDB snapshot taken now (the
    /// caller makes it a linearizable point by a read first), while the group goes on applying;
    /// it stays readable, like a transfer's, until [`KvStateMachine::drop_built`]. Returns its
    /// meta and how many pairs it holds. A split applying meanwhile makes it retry (a few
    /// times) with the narrowed range: the files never hold another group's keys.
    pub async fn build_backup(&self) -> Result<(SnapshotMeta, u64), StorageError> {
        let life = self.life.clone();
        let _working = life.snapshot_work.lock().await;
        let sm = self.clone();
        self.store
            .blocking(move |s| {
                let mut last = None;
                for _ in 0..BACKUP_BUILD_TRIES {
                    sm.check_live("backup")?;
                    let snapshot_id = snapshot_id_now();
                    match BuiltSnapshot::build_backup(s, sm.group, &sm.range(), snapshot_id, SNAPSHOT_FILE_BYTES_MAX) {
                        Ok((meta, built)) => {
                            let keys = built.key_count();
                            lock(&sm.life.built).insert(meta.snapshot_id, Arc::new(built));
                            return Ok((meta, keys));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| StorageError::new("backup", "not tried")))
            })
            .await
    }

    /// Bytes of a built snapshot (blocking); `None` if it is gone.
    pub fn read_snapshot_blocking(
        &self,
        meta: &SnapshotMeta,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, StorageError> {
        let built = lock(&self.life.built).get(&meta.snapshot_id).cloned();
        match built {
            Some(b) if b.size_bytes() == meta.size_bytes => b.read(offset, len).map(Some),
            _ => Ok(None),
        }
    }

    /// Stores the next bytes of the snapshot being received (blocking); offset 0 starts a new
    /// reception and abandons any other.
    pub fn receive_snapshot_blocking(
        &self,
        meta: &SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SnapshotError> {
        self.check_live("receive_snapshot")?;
        let mut slot = lock(&self.life.receiving);
        if offset == 0 {
            *slot = None; // its files go before the new transfer's are created
            *slot = Some(Box::new(ReceivingSnapshot::begin(&self.store, self.group, meta)?));
        }
        let Some(r) = slot.as_mut().filter(|r| r.meta() == meta) else {
            return Err(SnapshotError::Refused(format!(
                "group {}: a chunk at {offset} of snapshot {} that is not being received",
                self.group, meta.snapshot_id
            )));
        };
        let written = r.write(offset, data);
        if written.is_err() {
            // The transfer is over: the sender starts again (with a new snapshot if refused).
            *slot = None;
        }
        written
    }

    /// Installs the snapshot received whole (blocking): checked, then ingested crash-safely.
    pub fn install_snapshot_blocking(&self, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        self.check_live("install_snapshot")?;
        let Some(r) = lock(&self.life.receiving).take() else {
            return Err(SnapshotError::Refused(format!("group {}: no snapshot was received to install", self.group)));
        };
        if r.meta() != meta {
            return Err(SnapshotError::Refused(format!(
                "group {}: received snapshot {}, asked to install {}",
                self.group,
                r.meta().snapshot_id,
                meta.snapshot_id
            )));
        }
        let received = r.finish()?;
        // The installation writes the applied record: the next batch reads the new one.
        *lock(&self.life.applied) = None;
        let current = lock(&self.life.install_over).take().unwrap_or_else(|| self.range());
        // Not this replica's (another range, or wider than its own): refused, so the group goes
        // on and the leader builds another snapshot (one taken after the split it lacks).
        kv_snapshot::check_snapshot_range(self.group, &current, received.range())
            .map_err(|e| SnapshotError::Refused(e.to_string()))?;
        let adopted = kv_snapshot::install(&self.store, self.group, &current, received)?;
        self.set_range(adopted);
        self.load_merge_state(&self.store)?;
        Ok(())
    }

    /// Lets the next installation take a snapshot over `range` (see `Life::install_over`).
    pub(crate) fn permit_install_over(&self, range: Option<KeyRange>) {
        *lock(&self.life.install_over) = range;
    }

    pub(crate) fn set_range(&self, range: KeyRange) {
        match self.life.range.write() {
            Ok(mut r) => *r = range,
            Err(e) => *e.into_inner() = range,
        }
    }

    fn apply_ops(
        s: &Store,
        g: GroupId,
        cached: &Mutex<Option<AppliedRecord>>,
        range: &mut KeyRange,
        merge: &mut MergeState,
        entries: Vec<Entry>,
        parked: &dyn Fn(GroupId) -> bool,
    ) -> Result<Prepared, StorageError> {
        let mut splits = Vec::new();
        let mut merges = Vec::new();
        let mut waiting = None;
        let merge_before = merge.clone();
        // Taken, not copied (it holds the configuration): put back below once the batch is
        // prepared, so a batch that fails to prepare leaves the next to read the store's.
        let kept = lock(cached).take();
        let mut applied = match kept {
            Some(a) => a,
            None => Self::read_applied(s, g)?,
        };
        let data = s.cf(CF_DATA)?;
        // Values written earlier in this batch, which the database does not show yet.
        let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut ops = Vec::new();
        let mut responses = Vec::with_capacity(entries.len());
        for e in entries {
            // Entries apply in order, once: anything else (an apply racing an installation,
            // say) would write old state over newer, so the group stops instead.
            let expected = applied.last_applied.map(|l| l.index.next()).unwrap_or(LogIndex(1));
            if e.log_id.index != expected {
                return Err(StorageError::new(
                    "apply",
                    format!("group {g}: entry {} does not follow the applied index (expected {expected})", e.log_id),
                ));
            }
            let applied_before = applied.last_applied;
            applied.last_applied = Some(e.log_id);
            let resp = match e.payload {
                EntryPayload::Blank => Bytes::new(),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership { log_id: e.log_id, membership: *m };
                    Bytes::new()
                }
                EntryPayload::Normal(payload) => {
                    let r = match KvCommand::decode(&payload) {
                        Err(err) => KvResponse::Refused(format!("undecodable command: {}", err.message)),
                        Ok(cmd) if !cmd.within(range) => KvResponse::OutOfRange,
                        // Hosts check sizes before proposing; this holds for commands that
                        // reached the log another way, and is the same on every replica.
                        Ok(cmd) if cmd.check_size().is_err() => {
                            KvResponse::Refused(cmd.check_size().err().unwrap_or_default())
                        }
                        // Frozen for a merge: nothing changed, and the caller retries where the
                        // keys live once the merge is done or aborted.
                        Ok(cmd) if merge.is_frozen() && cmd.refused_when_frozen() => KvResponse::OutOfRange,
                        Ok(KvCommand::Freeze { id, into, start, end }) => {
                            let expected = KeyRange { start, end };
                            match *range == expected {
                                true => crate::merge::apply_freeze(g, merge, id, GroupId(into), e.log_id),
                                false => KvResponse::Refused(format!(
                                    "group {g} holds {range:?}, the merge was decided on {expected:?}"
                                )),
                            }
                        }
                        Ok(KvCommand::Thaw { id }) => crate::merge::apply_thaw(merge, id),
                        Ok(KvCommand::Merge { source, id, freeze, source_start, source_end, voters }) => {
                            let src = MergeSource {
                                group: GroupId(source),
                                id,
                                freeze,
                                range: KeyRange { start: source_start, end: source_end },
                            };
                            let membership = &applied.membership.membership;
                            match crate::merge::merge_refusal(g, range, merge, membership, &src, &voters) {
                                Some(why) => KvResponse::Refused(why),
                                None => {
                                    let ready = match parked(src.group) {
                                        true => crate::merge::absorb_ops(s, g, &src)?,
                                        false => Err(format!("group {} is not parked here yet", src.group)),
                                    };
                                    match ready {
                                        Ok(absorb) => {
                                            ops.extend(absorb);
                                            let merged = KeyRange { start: range.start.clone(), end: src.range.end };
                                            let desc = GroupDescriptor { range: merged.clone(), initial: None };
                                            ops.push(Op::Put(CF_META, meta_key(g).to_vec(), encode(&desc)?));
                                            merges.push(src.group);
                                            merge.absorbed_through = merge.absorbed_through.max(id);
                                            *range = merged.clone();
                                            KvResponse::Merged { range: merged }
                                        }
                                        Err(why) => {
                                            // This entry and those after it wait: the batch ends here.
                                            applied.last_applied = applied_before;
                                            waiting = Some(MergeWait {
                                                index: e.log_id.index,
                                                source: src.group,
                                                id,
                                                freeze,
                                                why,
                                            });
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                        Ok(KvCommand::Split { at, new_group }) => {
                            let new_group = GroupId(new_group);
                            if at == range.start || new_group == g {
                                KvResponse::Refused(format!(
                                    "split of shard {g} at its first key or into itself: nothing to split"
                                ))
                            } else {
                                let left = KeyRange { start: range.start.clone(), end: Some(at.clone()) };
                                let right = KeyRange { start: at, end: range.end.clone() };
                                let membership = applied.membership.membership.clone();
                                let desc = |range: &KeyRange| GroupDescriptor { range: range.clone(), initial: None };
                                ops.push(Op::Put(CF_META, meta_key(g).to_vec(), encode(&desc(&left))?));
                                // A replica of the new group already here (its vote or its
                                // descriptor written) keeps its own state: the split's starting
                                // point would reset its vote and log, and let it vote twice in a
                                // term. The host then finds the group present and starts nothing.
                                if !Self::group_present(s, new_group)? {
                                    ops.push(Op::Put(CF_META, meta_key(new_group).to_vec(), encode(&desc(&right))?));
                                    ops.extend(split_born_state(new_group, &membership)?);
                                }
                                splits.push(SplitEffect { new_group, range: right.clone(), membership });
                                *range = left.clone();
                                KvResponse::Split { left, right }
                            }
                        }
                        Ok(KvCommand::Txn { guard, expected, writes }) => {
                            let current = match overlay.get(&guard) {
                                Some(v) => v.clone(),
                                None => s
                                    .db()
                                    .get_cf(data, &guard)
                                    .map_err(|e| StorageError::new("apply", e.to_string()))?,
                            };
                            if expected != current {
                                KvResponse::CasFailed { current }
                            } else {
                                for (key, new) in writes {
                                    ops.push(match &new {
                                        Some(v) => Op::Put(CF_DATA, key.clone(), v.clone()),
                                        None => Op::Delete(CF_DATA, key.clone()),
                                    });
                                    overlay.insert(key, new);
                                }
                                KvResponse::Done { previous: current }
                            }
                        }
                        Ok(KvCommand::InsertAll { pairs }) => {
                            let mut existing = None;
                            for (key, _) in &pairs {
                                let current = match overlay.get(key) {
                                    Some(v) => v.clone(),
                                    None => s
                                        .db()
                                        .get_cf(data, key)
                                        .map_err(|e| StorageError::new("apply", e.to_string()))?,
                                };
                                if current.is_some() {
                                    existing = current;
                                    break;
                                }
                            }
                            match existing {
                                Some(current) => KvResponse::CasFailed { current: Some(current) },
                                None => {
                                    for (key, value) in pairs {
                                        ops.push(Op::Put(CF_DATA, key.clone(), value.clone()));
                                        overlay.insert(key, Some(value));
                                    }
                                    KvResponse::Done { previous: None }
                                }
                            }
                        }
                        Ok(cmd) => {
                            let key = cmd.key().to_vec();
                            // A put is blind: it does not read (and answers no previous value).
                            let current = match (&cmd, overlay.get(&key)) {
                                (KvCommand::Put { .. }, _) => None,
                                (_, Some(v)) => v.clone(),
                                (_, None) => {
                                    s.db().get_cf(data, &key).map_err(|e| StorageError::new("apply", e.to_string()))?
                                }
                            };
                            let (new, resp) = match cmd {
                                KvCommand::Put { value, .. } => {
                                    (Some(Some(value)), KvResponse::Done { previous: None })
                                }
                                KvCommand::Delete { .. } => (Some(None), KvResponse::Done { previous: current }),
                                KvCommand::Cas { expected, new, .. } if expected == current => {
                                    (Some(new), KvResponse::Done { previous: current })
                                }
                                KvCommand::Cas { .. } => (None, KvResponse::CasFailed { current }),
                                KvCommand::Update { op, .. } => match op.apply(current.as_deref()) {
                                    Ok(new) => (Some(Some(new)), KvResponse::Done { previous: current }),
                                    Err(e) => (None, KvResponse::Refused(e)),
                                },
                                KvCommand::Split { .. }
                                | KvCommand::Txn { .. }
                                | KvCommand::InsertAll { .. }
                                | KvCommand::Freeze { .. }
                                | KvCommand::Thaw { .. }
                                | KvCommand::Merge { .. } => (None, KvResponse::Refused("handled above".into())),
                            };
                            if let Some(new) = new {
                                ops.push(match &new {
                                    Some(v) => Op::Put(CF_DATA, key.clone(), v.clone()),
                                    None => Op::Delete(CF_DATA, key.clone()),
                                });
                                overlay.insert(key, new);
                            }
                            resp
                        }
                    };
                    r.encode()?
                }
            };
            responses.push(resp);
        }
        if *merge != merge_before {
            ops.push(crate::merge::merge_state_op(g, merge)?);
        }
        ops.push(Op::Put(CF_RAFT, group_key(g, KIND_APPLIED).to_vec(), encode(&applied)?));
        *lock(cached) = Some(applied);
        Ok(Prepared { ops, responses, splits, range: range.clone(), merges, merge_state: merge.clone(), waiting })
    }

    /// Whether `group` has a replica on this store: a descriptor or a vote.
    fn group_present(s: &Store, group: GroupId) -> Result<bool, StorageError> {
        let get = |cf: &str, key: &[u8]| -> Result<bool, StorageError> {
            let cf = s.cf(cf)?;
            Ok(s.db().get_pinned_cf(cf, key).map_err(|e| StorageError::new("apply", e.to_string()))?.is_some())
        };
        Ok(get(CF_META, &meta_key(group))? || get(CF_RAFT, &group_key(group, KIND_VOTE))?)
    }

    pub(crate) fn read_applied(s: &Store, group: GroupId) -> Result<AppliedRecord, StorageError> {
        match s
            .db()
            .get_cf(s.cf(CF_RAFT)?, group_key(group, KIND_APPLIED))
            .map_err(|e| StorageError::new("read", e.to_string()))?
        {
            Some(b) => decode(&b, || format!("group {group} applied state")),
            None => Ok(AppliedRecord::default()),
        }
    }
}

impl StateMachine for KvStateMachine {
    async fn applied_state(&mut self) -> Result<AppliedState, StorageError> {
        let (g, range) = (self.group, self.range());
        let sm = self.clone();
        let r = self
            .store
            .blocking(move |s| {
                // A crash during a snapshot installation: finish it before reporting.
                let adopted = kv_snapshot::finish_interrupted_install(s, g, &range)?;
                // Snapshots were once kept as RocksDB values; they are built on demand now.
                let cf = s.cf(CF_RAFT)?;
                for kind in [KIND_SNAPSHOT_META, KIND_SNAPSHOT_DATA] {
                    s.db().delete_cf(cf, group_key(g, kind)).map_err(|e| StorageError::new("write", e.to_string()))?;
                }
                sm.load_merge_state(s)?;
                let applied = Self::read_applied(s, g)?;
                *lock(&sm.life.applied) = Some(applied.clone());
                Ok((applied, adopted))
            })
            .await?;
        let (r, adopted) = r;
        if let Some(range) = adopted {
            self.set_range(range);
        }
        let applied = r.last_applied.map(|l| l.index).unwrap_or_default();
        lock(&self.life.durable).0 = applied;
        Ok(AppliedState { last_applied: r.last_applied, membership: r.membership })
    }

    async fn apply(&mut self, entries: Vec<Entry>) -> Result<Vec<Bytes>, StorageError> {
        let (g, mut range, mut merge) = (self.group, self.range(), self.merge_state());
        let life = self.life.clone();
        let last = entries.last().map(|e| e.log_id.index);
        let (p, range) = self
            .store
            .blocking(move |s| {
                // Merges need a host to park their sources: without one, a merge entry stops
                // the group rather than apply out of order.
                let p = Self::apply_ops(s, g, &life.applied, &mut range, &mut merge, entries, &|_| false)?;
                if let Some(w) = &p.waiting {
                    // Not written: the kept applied record would be ahead of the store's.
                    *lock(&life.applied) = None;
                    return Err(StorageError::new("apply", format!("group {g}: merge entry {}: {}", w.index, w.why)));
                }
                Ok((p, range))
            })
            .await?;
        if let Err(e) = self.store.write(p.ops, false).await {
            *lock(&self.life.applied) = None;
            return Err(e);
        }
        if let Some(last) = last {
            let batch = self.store.last_written_batch();
            lock(&self.life.durable).1.push_back((batch, last));
        }
        // Splits narrow the range; starting the new group is a host's job.
        self.set_range(range);
        self.set_merge_state(p.merge_state);
        Ok(p.responses)
    }

    async fn durable_applied(&mut self) -> Result<LogIndex, StorageError> {
        let synced = self.store.last_synced_batch();
        let mut d = lock(&self.life.durable);
        while let Some(&(batch, index)) = d.1.front() {
            if batch > synced {
                break;
            }
            d.0 = d.0.max(index);
            d.1.pop_front();
        }
        Ok(d.0)
    }

    async fn build_snapshot(&mut self) -> Result<SnapshotMeta, StorageError> {
        let life = self.life.clone();
        let _working = life.snapshot_work.lock().await;
        let sm = self.clone();
        self.store.blocking(move |_| sm.build_snapshot_blocking()).await
    }

    async fn read_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, StorageError> {
        let (sm, meta) = (self.clone(), meta.clone());
        self.store.blocking(move |_| sm.read_snapshot_blocking(&meta, offset, len)).await
    }

    async fn drop_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        self.drop_built(meta.snapshot_id);
        Ok(())
    }

    async fn receive_snapshot(&mut self, meta: &SnapshotMeta, offset: u64, data: Bytes) -> Result<(), SnapshotError> {
        let (sm, meta) = (self.clone(), meta.clone());
        self.store
            .blocking(move |_| Ok(sm.receive_snapshot_blocking(&meta, offset, &data)))
            .await
            .map_err(SnapshotError::Storage)?
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        let life = self.life.clone();
        let _working = life.snapshot_work.lock().await;
        self.store.install_hold_point().await;
        let (sm, meta) = (self.clone(), meta.clone());
        self.store.blocking(move |_| Ok(sm.install_snapshot_blocking(&meta))).await.map_err(SnapshotError::Storage)?
    }
}

#[cfg(test)]
mod update_tests {
    use super::{UpdateOp, VALUE_BYTES_MAX};

    #[test]
    fn updates_follow_redis_rules_and_refuse_what_does_not_fit() {
        let int = |delta, current: Option<&str>| UpdateOp::AddInt(delta).apply(current.map(str::as_bytes));
        assert_eq!(int(1, None), Ok(b"1".to_vec()));
        assert_eq!(int(-5, Some("3")), Ok(b"-2".to_vec()));
        assert!(int(1, Some("007")).is_err());
        assert!(int(1, Some(" 7")).is_err());
        assert_eq!(int(1, Some("9223372036854775807")), Err("increment or decrement would overflow".into()));
        let float =
            |delta: f64, current: Option<&str>| UpdateOp::AddFloat(delta.to_bits()).apply(current.map(str::as_bytes));
        assert_eq!(float(1.5, None), Ok(b"1.5".to_vec()));
        assert_eq!(float(0.25, Some("1.5")), Ok(b"1.75".to_vec()));
        assert_eq!(float(1.0, Some("abc")), Err("value is not a valid float".into()));
        assert_eq!(
            float(f64::MAX, Some("1.7976931348623157e308")),
            Err("increment would produce NaN or Infinity".into())
        );
        let append = |tail: &[u8], current: Option<&[u8]>| UpdateOp::Append(tail.to_vec()).apply(current);
        assert_eq!(append(b"b", Some(b"a")), Ok(b"ab".to_vec()));
        assert_eq!(append(b"b", None), Ok(b"b".to_vec()));
        assert!(append(b"b", Some(&vec![0; VALUE_BYTES_MAX])).is_err());
    }
}

#[cfg(test)]
mod range_tests {
    use super::KeyRange;

    fn range(start: &str, end: Option<&str>) -> KeyRange {
        KeyRange { start: start.as_bytes().to_vec(), end: end.map(|e| e.as_bytes().to_vec()) }
    }

    #[test]
    fn ranges_overlap_only_when_they_share_a_key() {
        let both = |a: &KeyRange, b: &KeyRange| a.overlaps(b) && b.overlaps(a);
        let neither = |a: &KeyRange, b: &KeyRange| !a.overlaps(b) && !b.overlaps(a);
        assert!(both(&range("a", Some("c")), &range("b", Some("d"))));
        assert!(both(&range("a", Some("z")), &range("b", Some("c"))));
        assert!(both(&range("a", None), &range("x", Some("y"))));
        // Adjacent: the end is exclusive.
        assert!(neither(&range("a", Some("b")), &range("b", Some("c"))));
        assert!(neither(&range("a", Some("b")), &range("c", None)));
        // An empty range holds no key.
        assert!(neither(&range("c", Some("c")), &range("a", None)));
    }
}

#[cfg(test)]
mod size_tests {
    use super::{check_insert_size, KvCommand, KEY_BYTES_MAX, TXN_BYTES_MAX, TXN_WRITES_MAX};

    /// What `InsertAll`'s `check_size` says, and what a front door checking the pairs where
    /// they lie says, are the same.
    fn both(pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), String> {
        let direct = check_insert_size(pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        assert_eq!(KvCommand::InsertAll { pairs: pairs.to_vec() }.check_size(), direct);
        direct
    }

    #[test]
    fn an_insert_is_bounded_as_a_transaction_is() {
        let pair = |k: &str, len: usize| (k.as_bytes().to_vec(), vec![b'v'; len]);
        assert_eq!(both(&[pair("a", 10), pair("b", 10)]), Ok(()));
        assert_eq!(both(&[]), Err("an insert of no keys".into()));
        // The total of keys and values, though each value is within the value limit.
        let half = TXN_BYTES_MAX / 2;
        assert_eq!(both(&[pair("a", half), pair("b", half - 2)]), Ok(()));
        let err = both(&[pair("a", half), pair("b", half)]).unwrap_err();
        assert!(err.contains(&format!("{} bytes exceeds the limit of {TXN_BYTES_MAX}", TXN_BYTES_MAX + 2)), "{err}");
        // The number of writes.
        let many: Vec<_> = (0..=TXN_WRITES_MAX).map(|i| (i.to_string().into_bytes(), Vec::new())).collect();
        let err = both(&many).unwrap_err();
        assert!(err.contains(&format!("{} writes exceeds the limit", TXN_WRITES_MAX + 1)), "{err}");
        assert_eq!(both(&many[..TXN_WRITES_MAX]), Ok(()));
        // Each key.
        let err = both(&[pair("a", 1), (vec![b'k'; KEY_BYTES_MAX + 1], Vec::new())]).unwrap_err();
        assert!(err.starts_with(&format!("key of {} bytes", KEY_BYTES_MAX + 1)), "{err}");
    }
}
