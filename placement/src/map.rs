//! The shard map: ordered, non-overlapping key ranges covering the whole keyspace, each served
//! by one shard (a Raft group) with a version stamp and its replicas.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
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
/// Copies share one map until one of them changes (copy on write): a node keeps several copies
/// of the meta state (its view, the copy it follows, on meta replicas the stored one), which
/// differ in their maps only for the moment between a change and the next view; shared, tens of
/// thousands of shards cost their memory once rather than two or three times.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ShardMap {
    inner: Arc<MapIndex>,
}

/// The map's two indexes. Serialized as the map itself, the layout it always had.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct MapIndex {
    /// Shards by the start key of their range.
    by_start: BTreeMap<Vec<u8>, ShardDescriptor>,
    /// Start key of each shard, by id.
    starts: BTreeMap<ShardId, Vec<u8>>,
}

impl std::fmt::Debug for ShardMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardMap").field("by_start", &self.inner.by_start).field("starts", &self.inner.starts).finish()
    }
}

impl Serialize for ShardMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.inner.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ShardMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        MapIndex::deserialize(deserializer).map(|m| ShardMap { inner: Arc::new(m) })
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
        let mut m = MapIndex::default();
        m.starts.insert(id, Vec::new());
        m.by_start.insert(Vec::new(), d);
        ShardMap { inner: Arc::new(m) }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.inner.by_start.len()
    }

    /// Whether the map has no shards (before bootstrap).
    pub fn is_empty(&self) -> bool {
        self.inner.by_start.is_empty()
    }

    /// The shard holding `key`. `None` only before bootstrap.
    pub fn lookup(&self, key: &[u8]) -> Option<&ShardDescriptor> {
        self.inner.by_start.range::<[u8], _>((Bound::Unbounded, Bound::Included(key))).next_back().map(|(_, d)| d)
    }

    /// The shards overlapping `[start, end)` in key order (`end: None`: to the end).
    pub fn lookup_range<'a>(
        &'a self,
        start: &[u8],
        end: Option<&'a [u8]>,
    ) -> impl Iterator<Item = &'a ShardDescriptor> + 'a {
        let first = self.lookup(start).map(|d| d.start.clone()).unwrap_or_default();
        self.inner
            .by_start
            .range(first..)
            .map(|(_, d)| d)
            .take_while(move |d| end.is_none_or(|e| d.start.as_slice() < e))
    }

    /// The shard with id `id`.
    pub fn get(&self, id: ShardId) -> Option<&ShardDescriptor> {
        self.inner.starts.get(&id).and_then(|s| self.inner.by_start.get(s))
    }

    /// Every shard in key order.
    pub fn shards(&self) -> impl Iterator<Item = &ShardDescriptor> {
        self.inner.by_start.values()
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
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The ids of the shards that differ between this map and `other`: in one and not the
    /// other, or in both but not the same. One walk of both in key order, nothing allocated
    /// for the shards that are the same; none at all for [`ShardMap::same`] maps.
    pub fn differing(&self, other: &ShardMap) -> Vec<ShardId> {
        let mut out = Vec::new();
        if self.same(other) {
            return out;
        }
        let (mut a, mut b) = (self.inner.by_start.iter().peekable(), other.inner.by_start.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some((_, x)), None) => {
                    out.push(x.id);
                    a.next();
                }
                (None, Some((_, y))) => {
                    out.push(y.id);
                    b.next();
                }
                (Some((ka, x)), Some((kb, y))) => match ka.cmp(kb) {
                    std::cmp::Ordering::Less => {
                        out.push(x.id);
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push(y.id);
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if x != y {
                            out.push(x.id);
                            if y.id != x.id {
                                out.push(y.id);
                            }
                        }
                        a.next();
                        b.next();
                    }
                },
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
        let m = Arc::make_mut(&mut self.inner);
        if let Some(old_start) = m.starts.insert(d.id, d.start.clone()) {
            if old_start != d.start && m.by_start.get(&old_start).is_some_and(|o| o.id == d.id) {
                m.by_start.remove(&old_start);
            }
        }
        m.by_start.insert(d.start.clone(), d);
    }

    /// Removes the shard `id` (see [`ShardMap::put_unchecked`]: the caller validates the map
    /// once the change is complete).
    pub fn remove_unchecked(&mut self, id: ShardId) -> Option<ShardDescriptor> {
        self.inner.starts.get(&id)?;
        let m = Arc::make_mut(&mut self.inner);
        let start = m.starts.remove(&id)?;
        match m.by_start.get(&start) {
            Some(d) if d.id == id => m.by_start.remove(&start),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, id: ShardId) -> Option<&mut ShardDescriptor> {
        self.inner.starts.get(&id)?;
        let m = Arc::make_mut(&mut self.inner);
        let start = m.starts.get(&id)?;
        m.by_start.get_mut(start)
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
        let m = Arc::make_mut(&mut self.inner);
        m.starts.insert(new_id, key.clone());
        m.by_start.insert(key, right);
    }

    /// Checks the map's invariant (ordered, non-overlapping, covering); used by tests and
    /// after restoring a snapshot.
    pub fn validate(&self) -> Result<(), String> {
        let mut expect_start: Vec<u8> = Vec::new();
        let mut open = true;
        for (start, d) in &self.inner.by_start {
            if !open {
                return Err(format!("shard {} starts after an unbounded shard", d.id));
            }
            if *start != d.start || *start != expect_start {
                return Err(format!("shard {} starts at {:?}, expected {:?}", d.id, d.start, expect_start));
            }
            if self.inner.starts.get(&d.id) != Some(start) {
                return Err(format!("shard {} is missing from the id index", d.id));
            }
            match &d.end {
                Some(e) if e.as_slice() <= d.start.as_slice() => {
                    return Err(format!("shard {} has an empty range", d.id))
                }
                Some(e) => expect_start = e.clone(),
                None => open = false,
            }
            let mut nodes: Vec<NodeId> = d.replicas.iter().map(|r| r.node).collect();
            nodes.sort();
            nodes.dedup();
            if nodes.len() != d.replicas.len() {
                return Err(format!("shard {} has two replicas on one node", d.id));
            }
        }
        if !self.inner.by_start.is_empty() && open {
            return Err("the last shard is bounded: the keyspace is not covered".into());
        }
        if self.inner.starts.len() != self.inner.by_start.len() {
            return Err("id index and range index disagree".into());
        }
        Ok(())
    }
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
        assert!(Arc::ptr_eq(&a.inner, &b.inner), "a copy shares the map");
        let mut d = b.get(ShardId(2)).cloned().expect("shard 2");
        d.epoch.conf_version += 1;
        b.put_unchecked(d.clone());
        assert!(!Arc::ptr_eq(&a.inner, &b.inner), "a change copies it first");
        assert_eq!(b.get(ShardId(2)), Some(&d));
        assert_ne!(a.get(ShardId(2)), Some(&d), "the other copy is untouched");
        let mut c = a.clone();
        assert_eq!(c.remove_unchecked(ShardId(9)), None);
        assert!(Arc::ptr_eq(&a.inner, &c.inner), "looking for a shard that is not there copies nothing");
        assert!(c.get_mut(ShardId(9)).is_none());
        assert!(Arc::ptr_eq(&a.inner, &c.inner));
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
        #[derive(Serialize)]
        struct Before<'a> {
            by_start: &'a BTreeMap<Vec<u8>, ShardDescriptor>,
            starts: &'a BTreeMap<ShardId, Vec<u8>>,
        }
        let m = two_shards();
        let cfg = bincode::config::standard();
        let now = bincode::serde::encode_to_vec(&m, cfg).expect("encodes");
        let before =
            bincode::serde::encode_to_vec(Before { by_start: &m.inner.by_start, starts: &m.inner.starts }, cfg)
                .expect("encodes");
        assert_eq!(now, before);
        let (back, _): (ShardMap, usize) = bincode::serde::decode_from_slice(&now, cfg).expect("decodes");
        assert_eq!(back, m);
    }
}
