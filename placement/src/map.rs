//! The shard map: ordered, non-overlapping key ranges covering the whole keyspace, each served
//! by one shard (a Raft group) with a version stamp and its replicas.

use imbl::ordmap::DiffItem;
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A shard is one Raft group serving one key range, and its id is that group's id (as TiKV's
/// region id is its Raft group id): the same type, so node code never converts between them.
pub use flotilla_ids::GroupId as ShardId;
/// A node of the cluster: the id every crate of ours shares.
pub use flotilla_ids::NodeId;

/// A shard's version stamp. `version` grows with every split or merge (the range changed),
/// `conf_version` with every replica change. Each only ever grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Epoch {
    /// Bumped by replica changes.
    pub conf_version: u64,
    /// Bumped by splits and merges.
    pub version: u64,
}

/// Whether a replica votes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaRole {
    /// Votes and counts toward quorums.
    Voter,
    /// Receives the log only (catching up before promotion).
    Learner,
}

/// One replica of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Replica {
    /// The node it lives on.
    pub node: NodeId,
    /// Voter or learner.
    pub role: ReplicaRole,
}

/// Everything a client or node needs to know about one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDescriptor {
    /// The shard.
    pub id: ShardId,
    /// First key of its range.
    pub start: Vec<u8>,
    /// First key after its range; `None` is the end of the keyspace.
    pub end: Option<Vec<u8>>,
    /// Version stamp.
    pub epoch: Epoch,
    /// Replicas, at most one per node.
    pub replicas: Vec<Replica>,
}

impl ShardDescriptor {
    /// Whether `key` is in the shard's range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_ref().is_none_or(|e| key < e.as_slice())
    }
    /// The replica on `node`, if any.
    pub fn replica(&self, node: NodeId) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.node == node)
    }
    /// Voting replicas.
    pub fn voters(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas.iter().filter(|r| r.role == ReplicaRole::Voter).map(|r| r.node)
    }
}

/// Why a request's routing is out of date. Each carries what the client needs to retry.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum RouteError {
    /// No shard with that id (it may have been merged away): look the key up again.
    #[error("unknown shard {0}")]
    UnknownShard(ShardId),
    /// The shard's version stamp changed since the client routed: here is the current one.
    #[error("stale routing for shard {}: current epoch {:?}", current.id, current.epoch)]
    StaleEpoch {
        /// The shard as it is now.
        current: Box<ShardDescriptor>,
    },
    /// The key is not in that shard (any more): here is the shard that holds it.
    #[error("key not in shard; it is in shard {}", owner.id)]
    WrongShard {
        /// The shard holding the key now.
        owner: Box<ShardDescriptor>,
    },
}

/// The shard map. Invariant: the ranges are ordered, never overlap, and cover the keyspace
/// (the first starts at the empty key, each ends where the next starts, the last is unbounded).
///
/// Copies share one map until one of them changes, and then share all of it but the path to
/// what changed (persistent B-trees, `imbl::OrdMap`): a node keeps several copies of the meta
/// state (its view, the copy it follows, on meta replicas the stored one), and the meta leader
/// copies the state for every op. A copy costs nothing, a change `O(log n)`, and the shards
/// that differ between two copies are found by a walk that skips what they share
/// ([`ShardMap::differing`]): a meta op costs what it changes, not what the map holds.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Shards by the start key of their range.
    by_start: OrdMap<Vec<u8>, ShardDescriptor>,
    /// Start key of each shard, by id.
    starts: OrdMap<ShardId, Vec<u8>>,
}

impl std::fmt::Debug for ShardMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardMap").field("by_start", &self.by_start).field("starts", &self.starts).finish()
    }
}

impl ShardMap {
    /// A map of one shard covering the whole keyspace.
    pub fn bootstrap(id: ShardId, replicas: Vec<Replica>) -> ShardMap {
        let d = ShardDescriptor {
            id,
            start: Vec::new(),
            end: None,
            epoch: Epoch { conf_version: 1, version: 1 },
            replicas,
        };
        let mut m = ShardMap::default();
        m.starts.insert(id, Vec::new());
        m.by_start.insert(Vec::new(), d);
        m
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Whether the map has no shards (before bootstrap).
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The shard holding `key`. `None` only before bootstrap.
    pub fn lookup(&self, key: &[u8]) -> Option<&ShardDescriptor> {
        self.by_start.get_prev(key).map(|(_, d)| d)
    }

    /// The shards overlapping `[start, end)` in key order (`end: None`: to the end).
    pub fn lookup_range<'a>(
        &'a self,
        start: &[u8],
        end: Option<&'a [u8]>,
    ) -> impl Iterator<Item = &'a ShardDescriptor> + 'a {
        let first = self.lookup(start).map(|d| d.start.clone()).unwrap_or_default();
        self.by_start.range(first..).map(|(_, d)| d).take_while(move |d| end.is_none_or(|e| d.start.as_slice() < e))
    }

    /// The shard with id `id`.
    pub fn get(&self, id: ShardId) -> Option<&ShardDescriptor> {
        self.starts.get(&id).and_then(|s| self.by_start.get(s))
    }

    /// Every shard in key order.
    pub fn shards(&self) -> impl Iterator<Item = &ShardDescriptor> {
        self.by_start.values()
    }

    /// Checks a request routed to `shard` at `epoch` for `key`.
    pub fn check_route(&self, shard: ShardId, epoch: Epoch, key: &[u8]) -> Result<&ShardDescriptor, RouteError> {
        let d = self.get(shard).ok_or(RouteError::UnknownShard(shard))?;
        if !d.contains(key) {
            let owner = self.lookup(key).cloned().ok_or(RouteError::UnknownShard(shard))?;
            return Err(RouteError::WrongShard { owner: Box::new(owner) });
        }
        if d.epoch != epoch {
            return Err(RouteError::StaleEpoch { current: Box::new(d.clone()) });
        }
        Ok(d)
    }

    /// Whether `other` is this very map (a copy that was never changed): no shard differs.
    pub fn same(&self, other: &ShardMap) -> bool {
        self.by_start.ptr_eq(&other.by_start) && self.starts.ptr_eq(&other.starts)
    }

    /// The ids of the shards that differ between this map and `other`: in one and not the
    /// other, or in both but not the same. Parts of the two maps that one copied from the other
    /// are skipped unvisited: two copies of one map, one of them changed by an op, cost what
    /// the op changed; none at all for [`ShardMap::same`] maps.
    pub fn differing(&self, other: &ShardMap) -> Vec<ShardId> {
        let mut out = Vec::new();
        if self.same(other) {
            return out;
        }
        for item in self.by_start.diff(&other.by_start) {
            match item {
                DiffItem::Add(_, d) | DiffItem::Remove(_, d) => out.push(d.id),
                DiffItem::Update { old: (_, a), new: (_, b) } => {
                    out.push(a.id);
                    out.push(b.id);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// At most `limit` shards in key order from the one holding `from`: a page of the map,
    /// for a copy too large for one message.
    pub fn page<'a>(&'a self, from: &[u8], limit: usize) -> impl Iterator<Item = &'a ShardDescriptor> + 'a {
        self.lookup_range(from, None).take(limit)
    }

    /// Puts `d` in the map as it is, replacing the shard with its id wherever that started:
    /// how a copy of the map is rebuilt from stored descriptors or brought up to date by the
    /// ones a change rewrote. The map may break its invariant until the last descriptor of a
    /// change is in; the caller checks [`ShardMap::validate`] then.
    pub fn put_unchecked(&mut self, d: ShardDescriptor) {
        if let Some(old_start) = self.starts.insert(d.id, d.start.clone()) {
            if old_start != d.start && self.by_start.get(&old_start).is_some_and(|o| o.id == d.id) {
                self.by_start.remove(&old_start);
            }
        }
        self.by_start.insert(d.start.clone(), d);
    }

    /// Removes the shard `id` (see [`ShardMap::put_unchecked`]: the caller validates the map
    /// once the change is complete).
    pub fn remove_unchecked(&mut self, id: ShardId) -> Option<ShardDescriptor> {
        // Looked up first: removing a key that is not there may still copy the path to it.
        self.starts.get(&id)?;
        let start = self.starts.remove(&id)?;
        match self.by_start.get(&start) {
            Some(d) if d.id == id => self.by_start.remove(&start),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, id: ShardId) -> Option<&mut ShardDescriptor> {
        let start = self.starts.get(&id)?;
        if !self.by_start.contains_key(start) {
            return None;
        }
        self.by_start.get_mut(start)
    }

    /// Splits `shard` at `key` into `[start, key)` (keeps the id) and `[key, end)` (`new_id`);
    /// both get `version + 1` and the same replicas. The caller has validated everything.
    pub(crate) fn split(&mut self, shard: ShardId, key: Vec<u8>, new_id: ShardId) {
        let d = self.get_mut(shard).expect("validated");
        d.epoch.version += 1;
        let right = ShardDescriptor {
            id: new_id,
            start: key.clone(),
            end: d.end.take(),
            epoch: d.epoch,
            replicas: d.replicas.clone(),
        };
        d.end = Some(key.clone());
        self.starts.insert(new_id, key.clone());
        self.by_start.insert(key, right);
    }

    /// [`ShardMap::validate`] for a map made from `before`, a valid map, by changing some of
    /// its shards: the invariant can only break where the two differ, so only the shards that
    /// now hold the changed shards' start keys (old and new) are checked, each with its
    /// neighbours. Costs what changed, not what the map holds; the whole map is checked when
    /// `before` is empty.
    pub fn validate_changed(&self, before: &ShardMap) -> Result<(), String> {
        if before.is_empty() {
            return self.validate();
        }
        if self.same(before) {
            return Ok(());
        }
        if self.starts.len() != self.by_start.len() {
            return Err("id index and range index disagree".into());
        }
        if self.is_empty() {
            // As before a bootstrap: nothing to cover yet.
            return Ok(());
        }
        let mut keys: Vec<&[u8]> = Vec::new();
        for item in before.by_start.diff(&self.by_start) {
            match item {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) => keys.push(k),
                DiffItem::Update { old: (k, _), .. } => keys.push(k),
            }
        }
        // Ids that left the map must have left the id index too (and the other way round).
        for id in before.differing(self) {
            match (self.starts.get(&id), self.get(id)) {
                (Some(start), Some(d)) if *start == d.start && d.id == id => {}
                (None, None) => {}
                _ => return Err(format!("shard {id} is missing from one of the map's indexes")),
            }
        }
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let Some(d) = self.lookup(key) else {
                return Err(format!("no shard holds key {key:?}: the keyspace is not covered"));
            };
            self.check_shard(d)?;
            match self.by_start.range(..d.start.clone()).next_back() {
                Some((_, prev)) if prev.end.as_deref() != Some(d.start.as_slice()) => {
                    return Err(format!("shard {} does not end where shard {} starts", prev.id, d.id))
                }
                Some(_) => {}
                None if !d.start.is_empty() => return Err(format!("no shard before shard {}", d.id)),
                None => {}
            }
            // The next shard in key order starts exactly where this one ends.
            match (&d.end, self.by_start.range(d.start.clone()..).nth(1)) {
                (Some(end), Some((start, next))) if start == end => self.check_shard(next)?,
                (Some(_), _) => return Err(format!("no shard starts where shard {} ends", d.id)),
                (None, Some(_)) => return Err(format!("shard {} is unbounded and not the last", d.id)),
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// One shard's place in both indexes, and its own invariant ([`check_descriptor`]).
    fn check_shard(&self, d: &ShardDescriptor) -> Result<(), String> {
        if self.by_start.get(&d.start).map(|x| x.id) != Some(d.id) || self.starts.get(&d.id) != Some(&d.start) {
            return Err(format!("shard {} is missing from the id index", d.id));
        }
        check_descriptor(d)
    }

    /// Checks the map's invariant (ordered, non-overlapping, covering); used by tests and
    /// after restoring a snapshot.
    pub fn validate(&self) -> Result<(), String> {
        let mut expect_start: Vec<u8> = Vec::new();
        let mut open = true;
        for (start, d) in &self.by_start {
            if !open {
                return Err(format!("shard {} starts after an unbounded shard", d.id));
            }
            if *start != d.start || *start != expect_start {
                return Err(format!("shard {} starts at {:?}, expected {:?}", d.id, d.start, expect_start));
            }
            if self.starts.get(&d.id) != Some(start) {
                return Err(format!("shard {} is missing from the id index", d.id));
            }
            check_descriptor(d)?;
            match &d.end {
                Some(e) => expect_start = e.clone(),
                None => open = false,
            }
        }
        if !self.by_start.is_empty() && open {
            return Err("the last shard is bounded: the keyspace is not covered".into());
        }
        if self.starts.len() != self.by_start.len() {
            return Err("id index and range index disagree".into());
        }
        Ok(())
    }
}

/// A shard's own invariant, whatever the rest of the map: a non-empty range, one replica per
/// node.
fn check_descriptor(d: &ShardDescriptor) -> Result<(), String> {
    if d.end.as_ref().is_some_and(|e| e.as_slice() <= d.start.as_slice()) {
        return Err(format!("shard {} has an empty range", d.id));
    }
    let mut nodes: Vec<NodeId> = d.replicas.iter().map(|r| r.node).collect();
    nodes.sort();
    nodes.dedup();
    if nodes.len() != d.replicas.len() {
        return Err(format!("shard {} has two replicas on one node", d.id));
    }
    Ok(())
}

#[cfg(test)]
mod sharing_tests {
    use super::*;

    fn two_shards() -> ShardMap {
        let mut m = ShardMap::bootstrap(ShardId(1), vec![Replica { node: NodeId(1), role: ReplicaRole::Voter }]);
        m.split(ShardId(1), b"m".to_vec(), ShardId(2));
        m
    }

    #[test]
    fn copies_share_one_map_until_one_changes() {
        let a = two_shards();
        let mut b = a.clone();
        assert!(a.same(&b), "a copy shares the map");
        let mut d = b.get(ShardId(2)).cloned().expect("shard 2");
        d.epoch.conf_version += 1;
        b.put_unchecked(d.clone());
        assert!(!a.same(&b), "a change copies part of it first");
        assert_eq!(b.get(ShardId(2)), Some(&d));
        assert_ne!(a.get(ShardId(2)), Some(&d), "the other copy is untouched");
        let mut c = a.clone();
        assert_eq!(c.remove_unchecked(ShardId(9)), None);
        assert!(a.same(&c), "looking for a shard that is not there copies nothing");
        assert!(c.get_mut(ShardId(9)).is_none());
        assert!(a.same(&c));
    }

    #[test]
    fn the_shards_that_differ_are_named_once_whatever_the_change() {
        let a = two_shards();
        assert_eq!(a.differing(&a.clone()), Vec::<ShardId>::new());
        assert_eq!(a.differing(&ShardMap::default()), vec![ShardId(1), ShardId(2)]);
        // A split: the left shard narrowed, a new one on the right.
        let mut b = a.clone();
        b.split(ShardId(2), b"t".to_vec(), ShardId(3));
        assert_eq!(a.differing(&b), vec![ShardId(2), ShardId(3)]);
        assert_eq!(b.differing(&a), vec![ShardId(2), ShardId(3)]);
        // A replica change, and an equal map built apart (not shared): only what changed.
        let mut c = a.clone();
        let mut d = c.get(ShardId(1)).cloned().expect("shard 1");
        d.epoch.conf_version += 1;
        c.put_unchecked(d);
        assert_eq!(a.differing(&c), vec![ShardId(1)]);
        assert_eq!(a.differing(&two_shards()), Vec::<ShardId>::new());
        // A merge: shard 2 gone, shard 1 wider; and a shard whose start key another took.
        let mut m = a.clone();
        m.remove_unchecked(ShardId(2));
        let mut wide = m.get(ShardId(1)).cloned().expect("shard 1");
        wide.end = None;
        wide.epoch.version += 1;
        m.put_unchecked(wide);
        assert_eq!(a.differing(&m), vec![ShardId(1), ShardId(2)]);
        let mut r = a.clone();
        let mut other = r.get(ShardId(2)).cloned().expect("shard 2");
        r.remove_unchecked(ShardId(2));
        other.id = ShardId(7);
        r.put_unchecked(other);
        assert_eq!(a.differing(&r), vec![ShardId(2), ShardId(7)]);
        // Pages: in key order from a start key.
        let ids = |it: &mut dyn Iterator<Item = &ShardDescriptor>| it.map(|d| d.id.0).collect::<Vec<_>>();
        assert_eq!(ids(&mut b.page(b"", 2)), vec![1, 2]);
        assert_eq!(ids(&mut b.page(b"m", 5)), vec![2, 3]);
        assert_eq!(ids(&mut b.page(b"n", 5)), vec![2, 3], "from the shard holding the key");
        assert_eq!(ids(&mut b.page(b"u", 5)), vec![3]);
    }

    #[test]
    fn the_serialized_form_is_the_layout_it_always_had() {
        use std::collections::BTreeMap;
        #[derive(Serialize)]
        struct Before {
            by_start: BTreeMap<Vec<u8>, ShardDescriptor>,
            starts: BTreeMap<ShardId, Vec<u8>>,
        }
        let m = two_shards();
        let cfg = bincode::config::standard();
        let now = bincode::serde::encode_to_vec(&m, cfg).expect("encodes");
        let before = bincode::serde::encode_to_vec(
            Before {
                by_start: m.by_start.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                starts: m.starts.iter().map(|(k, v)| (*k, v.clone())).collect(),
            },
            cfg,
        )
        .expect("encodes");
        assert_eq!(now, before);
        let (back, _): (ShardMap, usize) = bincode::serde::decode_from_slice(&now, cfg).expect("decodes");
        assert_eq!(back, m);
    }
}
