//! The meta state as the meta group stores it: one small record per item (shard, node,
//! leader transfer, move plan, recent move, tombstone) plus a header, all in the meta group's
//! reserved key range. A change writes the records it changed and the header, nothing else:
//! a split writes two descriptors, not the map.
//!
//! Layout, in the `data` column family, every value a checksummed record
//! (`flotilla_shard::keys::encode`):
//!
//! | key                                   | value                                    |
//! |---------------------------------------|------------------------------------------|
//! | `\x00meta/state`                      | `[2][MetaHeader]`, the header and guard  |
//! | `\x00meta/shard/<shard: u64 BE>`      | `ShardDescriptor`                        |
//! | `\x00meta/node/<node: u64 BE>`        | `NodeInfo` with an empty report          |
//! | `\x00meta/transfer/<shard: u64 BE>`   | `NodeId`, the transfer's target          |
//! | `\x00meta/move/<shard: u64 BE>`       | `MovePlan`                               |
//! | `\x00meta/recent/<seq: u64 BE>`       | `MoveRecord`, oldest first               |
//! | `\x00meta/tomb/<shard BE><node BE>`   | `Tombstone`                              |
//! | `\x00meta/removed/<node: u64 BE>`     | `()`: removed for good (unsafe recovery) |
//! | `\x00meta/merge/<left: u64 BE>`       | `MergePlan`, a merge in progress         |
//!
//! **The header is the guard.** Every change is one `KvCommand::Txn` whose guard is the
//! header's bytes as the proposer read them and whose writes carry the new header, one
//! revision on: two proposers (two meta leaders of successive terms, say) cannot both apply a
//! change computed from the same state, and each revision names exactly one state of the meta
//! group's history.
//!
//! **Reports are not stored.** Nodes report every second; the meta leader keeps their reports
//! in memory and overlays them before running an operation (`src/node/meta_client.rs`), so a
//! report costs no write unless what it implies (a confirmed tombstone, a finished transfer)
//! changes a stored item.
//!
//! **Format 1** kept the whole state in the header's key (`[1][bincode MetaState]`). A store
//! holding it is read as revision 0 and converted by the meta leader's first operation, which
//! writes every record and then the format-2 header, each transaction guarded by the old
//! bytes: in parts when they are too many for one ([`conversion_parts`]), the header last;
//! item records under a format-1 header are ignored, so a conversion cut short is simply
//! done again. A build that reads only format 1 refuses the format-2 header with its version
//! in the message, rather than seeing no state and bootstrapping again.

use crate::placement::{MetaState, MoveRecord, NodeId, NodeInfo, ShardDescriptor, ShardId, Tombstone};
use crate::shard::keys::{decode, encode};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// The header's key: also where format 1 kept the whole state.
pub const META_STATE_KEY: &[u8] = b"\x00meta/state";
/// The prefix of every record of the meta state (the header included).
pub const META_PREFIX: &[u8] = b"\x00meta/";
/// Format 1: the whole state under [`META_STATE_KEY`].
pub const META_FORMAT_WHOLE: u8 = 1;
/// Format 2: a header under [`META_STATE_KEY`] and one record per item.
pub const META_FORMAT_RECORDS: u8 = 2;

const SHARD: &[u8] = b"shard/";
const NODE: &[u8] = b"node/";
const TRANSFER: &[u8] = b"transfer/";
const MOVE: &[u8] = b"move/";
const RECENT: &[u8] = b"recent/";
const TOMB: &[u8] = b"tomb/";
/// A node removed for good by an unsafe recovery. A build without this kind refuses the
/// state loudly ("not a record this build knows") rather than let a dead node back in.
const REMOVED: &[u8] = b"removed/";
/// [`MetaState::restored_from`]: one record, written by the bootstrap of a restored cluster.
/// A build that does not know it refuses the state ("not a record this build knows") rather
/// than letting unrestored nodes form its shards.
const RESTORED: &[u8] = b"restored";
/// [`MetaState::bootstrap`]: one record, written by the bootstrap and by each node that formed
/// its bootstrap shards. A build that does not know it refuses the state ("not a record this
/// build knows") rather than letting a wiped node form shards again.
const BOOTSTRAP: &[u8] = b"bootstrap";
/// A merge in progress, under its left shard. A build without this kind refuses the state
/// ("not a record this build knows") rather than let a frozen shard's neighbours move.
const MERGE: &[u8] = b"merge/";

/// One write of a change: a record's key and its new value (`None`: deleted).
pub type MetaWrite = (Vec<u8>, Option<Vec<u8>>);

/// Bytes of keys and values `writes` carry: what a transaction's and the change log's byte
/// bounds count.
pub fn writes_bytes(writes: &[MetaWrite]) -> usize {
    writes.iter().map(write_bytes).sum()
}

fn write_bytes((k, v): &MetaWrite) -> usize {
    k.len() + v.as_ref().map_or(0, Vec::len)
}

/// What the header holds besides the items.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaHeader {
    /// Bumped by every change: names one state of the meta group's history (0: none stored,
    /// or format 1 not converted yet).
    pub revision: u64,
    /// [`MetaState::next_shard_id`].
    pub next_shard_id: u64,
    /// The sequence number of the oldest recent move's record; the others follow it.
    pub recent_first: u64,
}

/// The meta state as one replica holds it, and what a change of it must compare against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredMeta {
    /// The header's bytes as stored (`None` on a new cluster): the guard of the next change.
    pub guard: Option<Vec<u8>>,
    /// The header.
    pub header: MetaHeader,
    /// The state, every node's report empty (reports are not stored).
    pub state: MetaState,
    /// Read from format 1: no item has a record yet, so the next change writes them all.
    pub whole: bool,
    /// Keys of shard records at or above the header's `next_shard_id`: parts of a change
    /// written in parts that never got its header (see [`change_parts`]). They are not state;
    /// the next change deletes them.
    pub leftovers: Vec<Vec<u8>>,
}

impl StoredMeta {
    /// A copy of `state` at `revision` that follows changes ([`StoredMeta::apply`]) and never
    /// proposes any (its guard and recent-move numbering are unknown): what a node without
    /// the meta leader's replica keeps up to date.
    pub fn followed(revision: u64, mut state: MetaState) -> StoredMeta {
        for info in state.nodes.values_mut() {
            info.report = Default::default();
        }
        let header = MetaHeader { revision, next_shard_id: state.next_shard_id, recent_first: 0 };
        StoredMeta { guard: None, header, state, whole: false, leftovers: Vec::new() }
    }

    /// The revision of the state.
    pub fn revision(&self) -> u64 {
        self.header.revision
    }

    /// Reads the state from the meta range's pairs, in key order, as one consistent read
    /// returned them. Anything that does not decode is an error naming the key.
    pub fn load(pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<StoredMeta, String> {
        let mut out = StoredMeta::default();
        let mut items = Vec::new();
        for (key, value) in pairs {
            if key == META_STATE_KEY {
                let (&version, body) = value.split_first().ok_or("empty meta state header")?;
                match version {
                    META_FORMAT_WHOLE => {
                        // Written before `removed` existed, or by this build's conversion path.
                        out.state = MetaState::restore(body)?;
                        out.header.next_shard_id = out.state.next_shard_id;
                        out.whole = true;
                    }
                    META_FORMAT_RECORDS => {
                        out.header = decode(body, || "meta state header".into()).map_err(|e| e.message)?;
                    }
                    v => {
                        return Err(format!(
                            "meta state format {v} is not supported (this build reads {META_FORMAT_WHOLE} and \
                             {META_FORMAT_RECORDS})"
                        ))
                    }
                }
                out.guard = Some(value);
            } else if key.starts_with(META_PREFIX) {
                items.push((key, Some(value)));
            }
        }
        // Under a format-1 header, item records are a conversion in progress (written in parts
        // before the last one replaces the header): the format-1 state is the state.
        // Every shard id is allocated below the header's `next_shard_id`, so a shard record at
        // or above it belongs to a change written in parts whose header never landed: not state.
        if !out.whole {
            out.state.next_shard_id = out.header.next_shard_id;
            let next = out.header.next_shard_id;
            let (items, leftovers): (Vec<MetaWrite>, Vec<MetaWrite>) =
                items.into_iter().partition(|(k, _)| ids(k, SHARD, 1).is_none_or(|i| i[0] < next));
            out.leftovers = leftovers.into_iter().map(|(k, _)| k).collect();
            apply_items(&mut out.state, &items)?;
        }
        for info in out.state.nodes.values_mut() {
            info.report = Default::default();
        }
        out.check()?;
        Ok(out)
    }

    /// The writes that turn this state into `next` (reports aside), the new header among
    /// them, and the stored state after them. No writes when nothing stored changed.
    pub fn changes(&self, next: &MetaState) -> Result<(Vec<MetaWrite>, StoredMeta), String> {
        self.changes_above(next, 0)
    }

    /// [`StoredMeta::changes`], the new revision at least `floor + 2` too (an unsafe
    /// recovery's change: see `MetaOp::RemoveDeadNodes`): a copy following changes at `floor`
    /// or below cannot take this one as the change after its own ([`StoredMeta::apply`]
    /// refuses the gap) and reads the whole state instead.
    pub fn changes_above(&self, next: &MetaState, floor: u64) -> Result<(Vec<MetaWrite>, StoredMeta), String> {
        if floor > crate::unsafe_recovery::REVISION_FLOOR_MAX {
            // A header near `u64::MAX` would leave no room for the changes after it.
            return Err(format!("meta revision floor {floor} is not believable"));
        }
        let mut next = next.clone();
        for info in next.nodes.values_mut() {
            info.report = Default::default();
        }
        // Format 1 has no item records: every item is new.
        let empty = MetaState::default();
        let base = if self.whole { &empty } else { &self.state };
        let mut writes = Vec::new();
        // The shards: only those that differ, found by a walk that skips what the two maps
        // share (the op changed a copy of the stored map), so an op costs what it changed.
        let (mut puts, mut deletes) = (Vec::new(), Vec::new());
        for id in base.map.differing(&next.map) {
            match (base.map.get(id), next.map.get(id)) {
                (old, Some(d)) if old != Some(d) => {
                    puts.push((key(SHARD, &[id.0]), Some(encode(d).map_err(|e| e.message)?)))
                }
                (Some(_), None) => deletes.push((key(SHARD, &[id.0]), None)),
                _ => {}
            }
        }
        writes.extend(puts);
        writes.extend(deletes);
        diff_map(&mut writes, base.nodes.iter().map(|(k, v)| (*k, v)), next.nodes.iter().map(|(k, v)| (*k, v)), |n| {
            key(NODE, &[n.0])
        })?;
        diff_map(
            &mut writes,
            base.transfers.iter().map(|(k, v)| (*k, v)),
            next.transfers.iter().map(|(k, v)| (*k, v)),
            |s| key(TRANSFER, &[s.0]),
        )?;
        diff_map(&mut writes, base.moves.iter().map(|(k, v)| (*k, v)), next.moves.iter().map(|(k, v)| (*k, v)), |s| {
            key(MOVE, &[s.0])
        })?;
        diff_map(
            &mut writes,
            base.merges.iter().map(|(k, v)| (*k, v)),
            next.merges.iter().map(|(k, v)| (*k, v)),
            |s| key(MERGE, &[s.0]),
        )?;
        let tombs = |s: &MetaState| -> Vec<((ShardId, NodeId), Tombstone)> {
            s.tombstones.iter().flat_map(|(shard, ts)| ts.iter().map(|(n, t)| ((*shard, *n), *t))).collect()
        };
        let (old_t, new_t) = (tombs(base), tombs(&next));
        diff_map(&mut writes, old_t.iter().map(|(k, v)| (*k, v)), new_t.iter().map(|(k, v)| (*k, v)), |(s, n)| {
            key(TOMB, &[s.0, n.0])
        })?;
        let removed = |s: &MetaState| -> Vec<(NodeId, ())> { s.removed.iter().map(|n| (*n, ())).collect() };
        let (old_r, new_r) = (removed(base), removed(&next));
        diff_map(&mut writes, old_r.iter().map(|(k, v)| (*k, v)), new_r.iter().map(|(k, v)| (*k, v)), |n| {
            key(REMOVED, &[n.0])
        })?;
        if base.restored_from != next.restored_from {
            let value = next.restored_from.as_ref().map(encode).transpose().map_err(|e| e.message)?;
            writes.push((key(RESTORED, &[]), value));
        }
        if base.bootstrap != next.bootstrap {
            let value = next.bootstrap.as_ref().map(encode).transpose().map_err(|e| e.message)?;
            writes.push((key(BOOTSTRAP, &[]), value));
        }
        let recent_first = diff_recent(&mut writes, self.header.recent_first, &base.recent_moves, &next.recent_moves)?;
        if !self.leftovers.is_empty() {
            let written: std::collections::BTreeSet<&[u8]> = writes.iter().map(|(k, _)| k.as_slice()).collect();
            let stale: Vec<Vec<u8>> =
                self.leftovers.iter().filter(|k| !written.contains(k.as_slice())).cloned().collect();
            writes.extend(stale.into_iter().map(|k| (k, None)));
        }
        let header = MetaHeader { revision: self.header.revision, next_shard_id: next.next_shard_id, recent_first };
        // A floor the revision is not past yet is a change of its own (the header alone).
        let below_floor = floor > 0 && self.header.revision < floor.saturating_add(2);
        if writes.is_empty() && header == self.header && !self.whole && !below_floor {
            return Ok((Vec::new(), self.clone()));
        }
        // Above a floor by two: a copy at the floor must see a gap, not the change after its own.
        let revision = match floor {
            0 => self.header.revision + 1,
            f => (self.header.revision + 1).max(f.saturating_add(2)),
        };
        let header = MetaHeader { revision, ..header };
        let guard = header_bytes(&header)?;
        writes.push((META_STATE_KEY.to_vec(), Some(guard.clone())));
        Ok((writes, StoredMeta { guard: Some(guard), header, state: next, whole: false, leftovers: Vec::new() }))
    }

    /// Brings the state up to date with `writes` (a change made by [`StoredMeta::changes`] on
    /// the same state): how a copy follows the meta group change by change. A change the copy
    /// already holds (its revision is not newer) is skipped: answers to two requests made at
    /// once overlap. One that skips a revision is refused, and nothing changes.
    pub fn apply(&mut self, writes: &[MetaWrite]) -> Result<(), String> {
        if self.whole {
            return Err("a format-1 state cannot follow changes: read it again".into());
        }
        let (header, items): (Vec<&MetaWrite>, Vec<&MetaWrite>) =
            writes.iter().partition(|(k, _)| k.as_slice() == META_STATE_KEY);
        let Some((_, Some(bytes))) = header.last() else { return Err("a change without its header".into()) };
        let (&version, body) = bytes.split_first().ok_or("empty meta state header")?;
        if version != META_FORMAT_RECORDS {
            return Err(format!("a change with a format-{version} header"));
        }
        let new: MetaHeader = decode(body, || "meta state header".into()).map_err(|e| e.message)?;
        if new.revision <= self.header.revision {
            return Ok(());
        }
        if new.revision != self.header.revision + 1 {
            return Err(format!("a change to revision {} does not follow revision {}", new.revision, self.revision()));
        }
        let items: Vec<MetaWrite> = items.into_iter().cloned().collect();
        let before = self.state.map.clone();
        apply_items(&mut self.state, &items)?;
        self.leftovers.retain(|k| !items.iter().any(|(w, _)| w == k));
        self.state.next_shard_id = new.next_shard_id;
        self.header = new;
        self.guard = Some(bytes.clone());
        // The map was whole before the change: only around what it changed can it break.
        self.state.map.validate_changed(&before)?;
        self.check_plans()
    }

    /// The invariants a state read or followed must keep.
    fn check(&self) -> Result<(), String> {
        self.state.map.validate()?;
        self.check_plans()
    }

    /// Every merge and move is recorded under its shard, and that shard is in the map.
    fn check_plans(&self) -> Result<(), String> {
        for (left, plan) in &self.state.merges {
            if plan.left != *left || self.state.map.get(*left).is_none() {
                return Err(format!("the merge recorded under shard {left} does not match the map"));
            }
        }
        for (shard, plan) in &self.state.moves {
            if plan.shard != *shard || self.state.map.get(*shard).is_none() {
                return Err(format!("the move recorded under shard {shard} does not match the map"));
            }
        }
        Ok(())
    }
}

/// The writes of a format-1 conversion, plus a delete of every record in the range (`existing`:
/// its keys now) that they do not write. A conversion cut short leaves the records it wrote for
/// the state of its own op; one done again for another op writes another set, and any record of
/// the first it does not overwrite would be read as state once the new header lands (a shard,
/// a transfer or a tombstone nobody decided).
pub fn without_leftovers(mut writes: Vec<MetaWrite>, existing: impl IntoIterator<Item = Vec<u8>>) -> Vec<MetaWrite> {
    let written: std::collections::BTreeSet<Vec<u8>> = writes.iter().map(|(k, _)| k.clone()).collect();
    for key in existing {
        if key.starts_with(META_PREFIX) && key.as_slice() != META_STATE_KEY && !written.contains(&key) {
            writes.push((key, None));
        }
    }
    writes
}

/// The writes of a format-1 conversion cut into transactions of at most `writes_max` writes
/// and `bytes_max` bytes of keys and values, the header's write alone in the last: every part
/// before it lands under the format-1 header, which ignores them until the last lands.
pub fn conversion_parts(writes: Vec<MetaWrite>, writes_max: usize, bytes_max: usize) -> Vec<Vec<MetaWrite>> {
    let (header, items): (Vec<MetaWrite>, Vec<MetaWrite>) =
        writes.into_iter().partition(|(k, _)| k.as_slice() == META_STATE_KEY);
    let mut parts = chunks(items, writes_max, bytes_max);
    parts.push(header);
    parts
}

/// `writes` in order, in parts of at most `writes_max` writes and `bytes_max` bytes (a write
/// larger than that alone in its part).
fn chunks(writes: Vec<MetaWrite>, writes_max: usize, bytes_max: usize) -> Vec<Vec<MetaWrite>> {
    let mut parts: Vec<Vec<MetaWrite>> = Vec::new();
    let mut bytes = 0;
    for w in writes {
        let size = write_bytes(&w);
        match parts.last_mut() {
            Some(p) if p.len() < writes_max && bytes + size <= bytes_max => {
                bytes += size;
                p.push(w);
            }
            _ => {
                bytes = size;
                parts.push(vec![w]);
            }
        }
    }
    parts
}

/// A change too large for one transaction, in parts: the records of shards new to this
/// change (ids at or above `new_from`, the stored header's `next_shard_id`), and deletes of
/// leftovers at such ids, first, in parts of
/// at most `writes_max` writes and `bytes_max` bytes, then everything else with the header.
/// The parts before the last are invisible until the last lands: `StoredMeta::load` ignores
/// shard records at or above the header's `next_shard_id`, and the next change deletes them if
/// the last part never comes. One part (the change itself) when it fits; an error when what
/// must go with the header does not fit.
pub fn change_parts(
    writes: Vec<MetaWrite>,
    new_from: u64,
    writes_max: usize,
    bytes_max: usize,
) -> Result<Vec<Vec<MetaWrite>>, String> {
    if writes.len() <= writes_max && writes_bytes(&writes) <= bytes_max {
        return Ok(vec![writes]);
    }
    // Deletes at such ids go ahead too: they can only be leftovers of an earlier change cut
    // short, which no reader takes for state, and thousands of them must not crowd the header.
    let (early, last): (Vec<MetaWrite>, Vec<MetaWrite>) =
        writes.into_iter().partition(|w| ids(&w.0, SHARD, 1).is_some_and(|i| i[0] >= new_from));
    let last_bytes = writes_bytes(&last);
    if last.len() > writes_max || last_bytes > bytes_max {
        return Err(format!(
            "the change is too large for one meta transaction: {} writes and {last_bytes} bytes besides new shards \
             (at most {writes_max} writes and {bytes_max} bytes)",
            last.len()
        ));
    }
    let mut parts = chunks(early, writes_max, bytes_max);
    parts.push(last);
    Ok(parts)
}

/// The header's stored bytes.
fn header_bytes(header: &MetaHeader) -> Result<Vec<u8>, String> {
    let mut out = vec![META_FORMAT_RECORDS];
    out.extend(encode(header).map_err(|e| e.message)?);
    Ok(out)
}

/// `\x00meta/<kind><ids BE>`.
fn key(kind: &[u8], ids: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(META_PREFIX.len() + kind.len() + 8 * ids.len());
    k.extend_from_slice(META_PREFIX);
    k.extend_from_slice(kind);
    for id in ids {
        k.extend_from_slice(&id.to_be_bytes());
    }
    k
}

/// The ids after `kind` in `key`, if `key` is a record of that kind with `n` ids.
fn ids(key: &[u8], kind: &[u8], n: usize) -> Option<Vec<u64>> {
    let rest = key.strip_prefix(META_PREFIX)?.strip_prefix(kind)?;
    if rest.len() != 8 * n {
        return None;
    }
    Some(rest.chunks_exact(8).map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
}

/// Writes for the items of a map that differ between `old` and `new` (both in key order):
/// changed or added ones encoded, removed ones deleted.
fn diff_map<'a, K: Ord + Copy, V: Serialize + PartialEq + 'a>(
    writes: &mut Vec<MetaWrite>,
    old: impl Iterator<Item = (K, &'a V)>,
    new: impl Iterator<Item = (K, &'a V)>,
    key_of: impl Fn(K) -> Vec<u8>,
) -> Result<(), String> {
    let old: BTreeMap<K, &V> = old.collect();
    let new: BTreeMap<K, &V> = new.collect();
    for (k, v) in &new {
        if old.get(k) != Some(v) {
            writes.push((key_of(*k), Some(encode(*v).map_err(|e| e.message)?)));
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(k)) {
        writes.push((key_of(*k), None));
    }
    Ok(())
}

/// Writes for the recent moves, which change only by dropping the oldest and appending: the
/// dropped records are deleted and the appended ones written after every existing sequence
/// number. Any other change rewrites the list (at most `MOVE_HISTORY_LEN_MAX` records).
/// Returns the new first sequence number.
fn diff_recent(
    writes: &mut Vec<MetaWrite>,
    first: u64,
    old: &VecDeque<MoveRecord>,
    new: &VecDeque<MoveRecord>,
) -> Result<u64, String> {
    let dropped = (0..=old.len())
        .find(|k| old.len() - k <= new.len() && old.range(k..).eq(new.range(..old.len() - k)))
        .unwrap_or(old.len());
    let kept = old.len() - dropped;
    // The records kept keep their numbers, so the appended ones come after every old one:
    // in key order a change's deletes come before its puts (how `apply_items` replays them).
    let new_first = first + dropped as u64;
    for seq in first..new_first {
        writes.push((key(RECENT, &[seq]), None));
    }
    for (i, r) in new.iter().enumerate().skip(kept) {
        writes.push((key(RECENT, &[new_first + i as u64]), Some(encode(r).map_err(|e| e.message)?)));
    }
    Ok(new_first)
}

/// Applies item writes (no header) to `state`, in key order.
fn apply_items(state: &mut MetaState, items: &[MetaWrite]) -> Result<(), String> {
    let mut items: Vec<&MetaWrite> = items.iter().collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in items {
        let what = || format!("meta record {}", String::from_utf8_lossy(k).escape_debug());
        if let Some(i) = ids(k, SHARD, 1) {
            match v {
                Some(b) => {
                    let d: ShardDescriptor = decode(b, what).map_err(|e| e.message)?;
                    if d.id.0 != i[0] {
                        return Err(format!("{}: holds shard {}", what(), d.id));
                    }
                    state.map.put_unchecked(d);
                }
                None => {
                    state.map.remove_unchecked(ShardId(i[0]));
                }
            }
        } else if let Some(i) = ids(k, NODE, 1) {
            match v {
                Some(b) => {
                    let n: NodeInfo = decode(b, what).map_err(|e| e.message)?;
                    state.nodes.insert(NodeId(i[0]), n);
                }
                None => {
                    state.nodes.remove(&NodeId(i[0]));
                }
            }
        } else if let Some(i) = ids(k, TRANSFER, 1) {
            match v {
                Some(b) => {
                    state.transfers.insert(ShardId(i[0]), decode(b, what).map_err(|e| e.message)?);
                }
                None => {
                    state.transfers.remove(&ShardId(i[0]));
                }
            }
        } else if let Some(i) = ids(k, MOVE, 1) {
            match v {
                Some(b) => {
                    state.moves.insert(ShardId(i[0]), decode(b, what).map_err(|e| e.message)?);
                }
                None => {
                    state.moves.remove(&ShardId(i[0]));
                }
            }
        } else if let Some(i) = ids(k, MERGE, 1) {
            match v {
                Some(b) => {
                    state.merges.insert(ShardId(i[0]), decode(b, what).map_err(|e| e.message)?);
                }
                None => {
                    state.merges.remove(&ShardId(i[0]));
                }
            }
        } else if ids(k, RECENT, 1).is_some() {
            match v {
                Some(b) => state.recent_moves.push_back(decode(b, what).map_err(|e| e.message)?),
                None => {
                    state.recent_moves.pop_front();
                }
            }
        } else if let Some(i) = ids(k, TOMB, 2) {
            let (shard, node) = (ShardId(i[0]), NodeId(i[1]));
            match v {
                Some(b) => {
                    state.tombstones.entry(shard).or_default().insert(node, decode(b, what).map_err(|e| e.message)?);
                }
                None => {
                    if let Some(ts) = state.tombstones.get_mut(&shard) {
                        ts.remove(&node);
                        if ts.is_empty() {
                            state.tombstones.remove(&shard);
                        }
                    }
                }
            }
        } else if let Some(i) = ids(k, REMOVED, 1) {
            match v {
                Some(b) => {
                    let () = decode(b, what).map_err(|e| e.message)?;
                    state.removed.insert(NodeId(i[0]));
                }
                None => {
                    state.removed.remove(&NodeId(i[0]));
                }
            }
        } else if ids(k, RESTORED, 0).is_some() {
            state.restored_from = v.as_ref().map(|b| decode(b, what).map_err(|e| e.message)).transpose()?;
        } else if ids(k, BOOTSTRAP, 0).is_some() {
            state.bootstrap = v.as_ref().map(|b| decode(b, what).map_err(|e| e.message)).transpose()?;
        } else {
            return Err(format!("{}: not a record this build knows", what()));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
