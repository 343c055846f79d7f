//! The key-value state machine of one shard: put, delete, compare-and-swap and reads over the
//! shard's key range, stored in the shared `data` column family.
//!
//! Applying writes the data and the group's applied id in one batch, without fsync: the log is
//! durable, and replay after a crash is idempotent (the applied id says where to resume).

use crate::keys::meta_key;
use crate::keys::{
    decode, encode, group_key, KIND_APPLIED, KIND_COMMITTED, KIND_INSTALLING, KIND_LOG_STATE, KIND_SNAPSHOT_DATA,
    KIND_SNAPSHOT_META, KIND_VOTE,
};
use crate::kv_snapshot::check_snapshot_range;
use crate::store::{Op, Store, CF_DATA, CF_META, CF_RAFT};
use bytes::Bytes;
use flotilla_raft::{
    AppliedState, Entry, EntryPayload, GroupId, LogId, NodeId, Snapshot, SnapshotMeta, StateMachine, StorageError,
    StoredMembership,
};
use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Longest key a command may carry: keeps every key below the unbounded range's end marker.
pub const KEY_BYTES_MAX: usize = 1000;
/// Largest value a command may carry (1 MiB), the one value limit of Flotilla (the client
/// protocol checks it too). An entry carrying one fits an envelope (3 MiB) under the
/// transport's 4 MiB frame; Raft sends an entry larger than its append byte limit alone.
pub const VALUE_BYTES_MAX: usize = 1 << 20;

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
}

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
    for item in store.db().iterator_cf_opt(cf, opts, IteratorMode::From(&range.start, Direction::Forward)) {
        if out.bytes >= bytes_max {
            out.complete = false;
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
}

impl KvCommand {
    /// Why the command is too large to accept, if it is.
    pub fn check_size(&self) -> Result<(), String> {
        if self.key().len() > KEY_BYTES_MAX {
            return Err(format!("key of {} bytes exceeds the limit of {KEY_BYTES_MAX}", self.key().len()));
        }
        let value = match self {
            KvCommand::Put { value, .. } => value.len(),
            KvCommand::Delete { .. } | KvCommand::Split { .. } => 0,
            KvCommand::Cas { expected, new, .. } => {
                expected.as_ref().map_or(0, |v| v.len()).max(new.as_ref().map_or(0, |v| v.len()))
            }
        };
        if value > VALUE_BYTES_MAX {
            return Err(format!("value of {value} bytes exceeds the limit of {VALUE_BYTES_MAX}"));
        }
        Ok(())
    }

    /// The key the command writes.
    pub fn key(&self) -> &[u8] {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key } | KvCommand::Cas { key, .. } => key,
            KvCommand::Split { at, .. } => at,
        }
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

/// What a snapshot's data is: the shard's range and an SST file of its key-values at the
/// snapshot's applied index (`None` when the range was empty: RocksDB cannot write an empty
/// SST file). The SST file carries, besides the keys, a range deletion of the whole range, so
/// ingesting it clears what the receiver held there and loads the snapshot in one step.
///
/// The range comes first: [`snapshot_data_range`] reads it from the first chunk of a transfer.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    range: KeyRange,
    sst: Option<Vec<u8>>,
}

/// Bytes a range can take in a snapshot's encoding (two keys of at most [`KEY_BYTES_MAX`] and
/// their lengths), with room to spare: a bound on what decoding a range may allocate.
const RANGE_ENCODED_BYTES_MAX: usize = 4096;

/// The key range of a snapshot, read from the start of its data (the whole data or only its
/// first chunk: the checksum is not checked, so this is for deciding whether to receive a
/// snapshot; the installation checks the whole record). `None` if it cannot be read.
pub fn snapshot_data_range(data: &[u8]) -> Option<KeyRange> {
    if data.len() < crate::keys::RECORD_HEADER_BYTES || data[0] != crate::keys::RECORD_VERSION {
        return None;
    }
    let config = bincode::config::standard().with_limit::<RANGE_ENCODED_BYTES_MAX>();
    bincode::serde::decode_from_slice(&data[crate::keys::RECORD_HEADER_BYTES..], config).ok().map(|(r, _)| r)
}

/// The exclusive upper bound used for a range with no end: above every key of at most this
/// many 0xff bytes. Keys are limited well below it.
pub(crate) const UNBOUNDED_END: [u8; 1024] = [0xff; 1024];

/// The state machine of one shard.
#[derive(Clone)]
pub struct KvStateMachine {
    store: Store,
    group: GroupId,
    /// The range, shared by clones (the host's reader and the poller's applier) and narrowed by
    /// a split or by installing a snapshot taken after one.
    range: Arc<RwLock<KeyRange>>,
    /// Shared by clones: whether the group was destroyed on this node, and the lock snapshot
    /// builds and installations hold while they run, so that a destroy can wait for them.
    life: Arc<Life>,
}

#[derive(Default)]
struct Life {
    retired: std::sync::atomic::AtomicBool,
    snapshot_work: tokio::sync::Mutex<()>,
}

impl KvStateMachine {
    /// The state machine of `group`, owning `range`.
    pub fn new(store: Store, group: GroupId, range: KeyRange) -> KvStateMachine {
        KvStateMachine { store, group, range: Arc::new(RwLock::new(range)), life: Arc::default() }
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
    /// shard: a compare-and-swap reads the state the previous batch left.
    pub fn prepare_apply_blocking(&self, entries: Vec<Entry>) -> Result<Prepared, StorageError> {
        let mut range = self.range();
        let out = Self::apply_ops(&self.store, self.group, &mut range, entries)?;
        self.set_range(range);
        Ok(out)
    }

    /// The shard's key range (as of the last applied batch).
    pub fn range(&self) -> KeyRange {
        self.range.read().map(|r| r.clone()).unwrap_or_else(|e| e.into_inner().clone())
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

    fn set_range(&self, range: KeyRange) {
        match self.range.write() {
            Ok(mut r) => *r = range,
            Err(e) => *e.into_inner() = range,
        }
    }

    fn apply_ops(s: &Store, g: GroupId, range: &mut KeyRange, entries: Vec<Entry>) -> Result<Prepared, StorageError> {
        let mut splits = Vec::new();
        let mut applied = Self::read_applied(s, g)?;
        let data = s.cf(CF_DATA)?;
        // Values written earlier in this batch, which the database does not show yet.
        let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut ops = Vec::new();
        let mut responses = Vec::with_capacity(entries.len());
        for e in entries {
            applied.last_applied = Some(e.log_id);
            let resp = match e.payload {
                EntryPayload::Blank => Bytes::new(),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership { log_id: e.log_id, membership: m };
                    Bytes::new()
                }
                EntryPayload::Normal(payload) => {
                    let r = match KvCommand::decode(&payload) {
                        Err(err) => KvResponse::Refused(format!("undecodable command: {}", err.message)),
                        Ok(cmd) if !range.contains(cmd.key()) => KvResponse::OutOfRange,
                        // Hosts check sizes before proposing; this holds for commands that
                        // reached the log another way, and is the same on every replica.
                        Ok(cmd) if cmd.check_size().is_err() => {
                            KvResponse::Refused(cmd.check_size().err().unwrap_or_default())
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
                                ops.push(Op::Put(CF_META, meta_key(new_group).to_vec(), encode(&desc(&right))?));
                                ops.extend(split_born_state(new_group, &membership)?);
                                splits.push(SplitEffect { new_group, range: right.clone(), membership });
                                *range = left.clone();
                                KvResponse::Split { left, right }
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
                                KvCommand::Split { .. } => (None, KvResponse::Refused("split handled above".into())),
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
        ops.push(Op::Put(CF_RAFT, group_key(g, KIND_APPLIED).to_vec(), encode(&applied)?));
        Ok(Prepared { ops, responses, splits })
    }

    fn read_applied(s: &Store, group: GroupId) -> Result<AppliedRecord, StorageError> {
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
        let r = self
            .store
            .blocking(move |s| {
                // A crash during a snapshot installation: finish it before reporting.
                let installing = s
                    .db()
                    .get_cf(s.cf(CF_RAFT)?, group_key(g, KIND_INSTALLING))
                    .map_err(|e| StorageError::new("read", e.to_string()))?;
                let mut adopted = None;
                if installing.is_some() {
                    tracing::warn!(group = %g, "finishing a snapshot installation interrupted by a crash");
                    adopted = Some(finish_install(s, g, &range)?);
                }
                Ok((Self::read_applied(s, g)?, adopted))
            })
            .await?;
        let (r, adopted) = r;
        if let Some(range) = adopted {
            self.set_range(range);
        }
        Ok(AppliedState { last_applied: r.last_applied, membership: r.membership })
    }

    async fn apply(&mut self, entries: Vec<Entry>) -> Result<Vec<Bytes>, StorageError> {
        let (g, mut range) = (self.group, self.range());
        let (p, range) = self
            .store
            .blocking(move |s| {
                let p = Self::apply_ops(s, g, &mut range, entries)?;
                Ok((p, range))
            })
            .await?;
        self.store.write(p.ops, false).await?;
        // Splits narrow the range; starting the new group is a host's job.
        self.set_range(range);
        Ok(p.responses)
    }

    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let life = self.life.clone();
        let _working = life.snapshot_work.lock().await;
        self.check_live("snapshot")?;
        let (g, range) = (self.group, self.range());
        let snapshot = self
            .store
            .blocking(move |s| {
                // One RocksDB snapshot: the data and the applied id are read at the same point.
                let snap = s.db().snapshot();
                let applied: AppliedRecord = match snap
                    .get_cf(s.cf(CF_RAFT)?, group_key(g, KIND_APPLIED))
                    .map_err(|e| StorageError::new("snapshot", e.to_string()))?
                {
                    Some(b) => decode(&b, || format!("group {g} applied state"))?,
                    None => AppliedRecord::default(),
                };
                let snapshot_id = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or_default();
                let path = s.scratch_path(&format!("snapshot-{g}-{snapshot_id}.sst"))?;
                let sst = write_sst(s, &path, &range, |put| {
                    for item in snap.iterator_cf(s.cf(CF_DATA)?, IteratorMode::From(&range.start, Direction::Forward)) {
                        let (k, v) = item.map_err(|e| StorageError::new("snapshot", e.to_string()))?;
                        if !range.contains(&k) {
                            break;
                        }
                        put(&k, &v)?;
                    }
                    Ok(())
                });
                let _ = std::fs::remove_file(&path);
                let data = Bytes::from(encode(&SnapshotData { range, sst: sst? })?);
                let snapshot_id = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or_default();
                let meta = SnapshotMeta {
                    last_log_id: applied.last_applied.unwrap_or_default(),
                    membership: applied.membership,
                    snapshot_id,
                    size_bytes: data.len() as u64,
                };
                Ok(Snapshot { meta, data })
            })
            .await?;
        let ops = vec![
            Op::Put(CF_RAFT, group_key(g, KIND_SNAPSHOT_META).to_vec(), encode(&snapshot.meta)?),
            Op::Put(CF_RAFT, group_key(g, KIND_SNAPSHOT_DATA).to_vec(), snapshot.data.to_vec()),
        ];
        self.store.write(ops, true).await?;
        Ok(snapshot)
    }

    async fn current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let g = self.group;
        self.store
            .blocking(move |s| {
                let cf = s.cf(CF_RAFT)?;
                let read =
                    |kind| s.db().get_cf(cf, group_key(g, kind)).map_err(|e| StorageError::new("read", e.to_string()));
                let (Some(meta), Some(data)) = (read(KIND_SNAPSHOT_META)?, read(KIND_SNAPSHOT_DATA)?) else {
                    return Ok(None);
                };
                let meta: SnapshotMeta = decode(&meta, || format!("group {g} snapshot meta"))?;
                // The data is itself a checksummed record: check it now rather than at install.
                let _: SnapshotData = decode(&data, || format!("group {g} snapshot data"))?;
                Ok(Some(Snapshot { meta, data: Bytes::from(data) }))
            })
            .await
    }

    async fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        let life = self.life.clone();
        let _working = life.snapshot_work.lock().await;
        self.store.install_hold_point().await;
        self.check_live("install_snapshot")?;
        let (g, range) = (self.group, self.range());
        // Check the data before touching anything.
        let d: SnapshotData = decode(&snapshot.data, || format!("group {g} received snapshot"))?;
        check_snapshot_range(g, &range, &d.range)?;
        // 1. Durably: the snapshot itself and the intent to install it.
        let ops = vec![
            Op::Put(CF_RAFT, group_key(g, KIND_SNAPSHOT_META).to_vec(), encode(&snapshot.meta)?),
            Op::Put(CF_RAFT, group_key(g, KIND_SNAPSHOT_DATA).to_vec(), snapshot.data.to_vec()),
            Op::Put(CF_RAFT, group_key(g, KIND_INSTALLING).to_vec(), encode(&snapshot.meta.snapshot_id)?),
        ];
        self.store.write(ops, true).await?;
        self.check_live("install_snapshot")?;
        // 2 and 3: replace the range's data, then record the applied state and clear the intent.
        let adopted = self.store.blocking(move |s| finish_install(s, g, &range)).await?;
        self.set_range(adopted);
        Ok(())
    }
}

/// Steps 2 and 3 of an installation whose snapshot and intent are durable: ingest the SST file
/// (its range deletion clears the old data; ingestion is atomic), then write the applied state
/// and clear the intent in one synced batch. Idempotent: start-up repeats it after a crash.
/// Returns the range the group owns after the installation (the snapshot's).
pub(crate) fn finish_install(s: &Store, g: GroupId, range: &KeyRange) -> Result<KeyRange, StorageError> {
    let cf = s.cf(CF_RAFT)?;
    let read = |kind| s.db().get_cf(cf, group_key(g, kind)).map_err(|e| StorageError::new("read", e.to_string()));
    let (Some(meta), Some(data)) = (read(KIND_SNAPSHOT_META)?, read(KIND_SNAPSHOT_DATA)?) else {
        return Err(StorageError::new("install_snapshot", format!("group {g}: snapshot to install is missing")));
    };
    let meta: SnapshotMeta = decode(&meta, || format!("group {g} snapshot meta"))?;
    let d: SnapshotData = decode(&data, || format!("group {g} snapshot data"))?;
    check_snapshot_range(g, range, &d.range)?;
    let range = &d.range;
    let end = range.end.clone().unwrap_or_else(|| UNBOUNDED_END.to_vec());
    let data_cf = s.cf(CF_DATA)?;
    match d.sst {
        Some(bytes) => {
            let path = s.scratch_path(&format!("install-{g}-{}.sst", meta.snapshot_id))?;
            std::fs::write(&path, &bytes)
                .map_err(|e| StorageError::new("install_snapshot", format!("group {g}: {}: {e}", path.display())))?;
            let mut opts = rocksdb::IngestExternalFileOptions::default();
            opts.set_move_files(true);
            let r = s.db().ingest_external_file_cf_opts(data_cf, &opts, vec![&path]);
            let _ = std::fs::remove_file(&path);
            r.map_err(|e| StorageError::new("install_snapshot", format!("group {g}: ingest: {e}")))?;
        }
        None => {
            // An empty snapshot: just clear the range (durably, before the applied state).
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            let mut b = rocksdb::WriteBatch::default();
            b.delete_range_cf(data_cf, &range.start, &end);
            s.db().write_opt(b, &wo).map_err(|e| StorageError::new("install_snapshot", e.to_string()))?;
        }
    }
    let applied = AppliedRecord {
        last_applied: Some(meta.last_log_id).filter(|l| *l != LogId::default()),
        membership: meta.membership.clone(),
    };
    let mut b = rocksdb::WriteBatch::default();
    b.put_cf(cf, group_key(g, KIND_APPLIED), encode(&applied)?);
    b.delete_cf(cf, group_key(g, KIND_INSTALLING));
    // A snapshot taken after a split this replica missed: the group's descriptor narrows too.
    let meta_cf = s.cf(CF_META)?;
    if let Some(raw) = s.db().get_cf(meta_cf, meta_key(g)).map_err(|e| StorageError::new("read", e.to_string()))? {
        let mut desc: GroupDescriptor = decode(&raw, || format!("group {g} descriptor"))?;
        if desc.range != *range {
            desc.range = range.clone();
            b.put_cf(meta_cf, meta_key(g), encode(&desc)?);
        }
    }
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    s.db().write_opt(b, &wo).map_err(|e| StorageError::new("install_snapshot", e.to_string()))?;
    Ok(range.clone())
}

/// Writes the range's key-values (given in order by `fill`) to an SST file at `path`, with a
/// range deletion of the whole range, and returns its bytes; `None` if the range is empty.
fn write_sst(
    s: &Store,
    path: &std::path::Path,
    range: &KeyRange,
    fill: impl FnOnce(&mut dyn FnMut(&[u8], &[u8]) -> Result<(), StorageError>) -> Result<(), StorageError>,
) -> Result<Option<Vec<u8>>, StorageError> {
    let err = |e: rocksdb::Error| StorageError::new("snapshot", format!("{}: {e}", path.display()));
    let opts = s.data_options();
    let mut w = rocksdb::SstFileWriter::create(&opts);
    w.open(path).map_err(err)?;
    let end = range.end.clone().unwrap_or_else(|| UNBOUNDED_END.to_vec());
    w.delete_range(&range.start, &end).map_err(err)?;
    fill(&mut |k, v| w.put(k, v).map_err(err))?;
    w.finish().map_err(err)?;
    std::fs::read(path).map(Some).map_err(|e| StorageError::new("snapshot", format!("{}: {e}", path.display())))
}
