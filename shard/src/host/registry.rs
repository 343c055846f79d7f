//! The groups of a node and the starts under way: which group owns which keys here, so that a
//! group is never started twice and no create takes keys a split is starting a group for.

use super::*;

/// The groups of a node, and the ids of groups being started.
#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) groups: HashMap<GroupId, GroupEntry>,
    /// Reserved by a start under way, with the range the group will own, so that two starts
    /// of one group (a create and a split) cannot both build it, and no create takes keys a
    /// split-born group being started will own.
    starting: BTreeMap<GroupId, KeyRange>,
    /// Groups stopped for a merge to absorb them (`merge.rs`): their ranges stay claimed
    /// until the absorbing batch is written.
    pub(crate) parked: HashMap<GroupId, super::merge::Parked>,
}

impl Registry {
    /// A group of this node, registered or being started, other than `group` that owns keys
    /// of `range`.
    fn owner_of(&self, group: GroupId, range: &KeyRange) -> Option<GroupId> {
        let registered =
            self.groups.iter().filter(|(g, e)| **g != group && e.sm.with_range(|r| ranges_overlap(r, range)));
        let starting = self.starting.iter().filter(|(g, r)| **g != group && ranges_overlap(r, range));
        let parked =
            self.parked.iter().filter(|(g, p)| **g != group && p.entry.sm.with_range(|r| ranges_overlap(r, range)));
        registered.map(|(g, _)| *g).chain(starting.map(|(g, _)| *g)).chain(parked.map(|(g, _)| *g)).min()
    }
}

/// A group id reserved for one start; released when dropped unless the start completed.
pub(crate) struct Reservation {
    shared: Arc<Shared>,
    pub(crate) group: GroupId,
    done: bool,
}

impl Reservation {
    /// The group started: it is registered and the reservation ends.
    pub(crate) fn complete(mut self, entry: GroupEntry) -> Result<(), HostError> {
        let mut r = self.shared.registry.write().map_err(|_| HostError::Stopped)?;
        // Registered with the range it was reserved for: no moment where neither covers it.
        r.groups.insert(self.group, entry);
        r.starting.remove(&self.group);
        self.done = true;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            if let Ok(mut r) = self.shared.registry.write() {
                r.starting.remove(&self.group);
            }
        }
    }
}

impl Shared {
    /// Reserves `group`, which will own `range`, for a start; refused if the group is on this
    /// node or being started.
    pub(crate) fn reserve(self: &Arc<Self>, group: GroupId, range: &KeyRange) -> Result<Reservation, HostError> {
        let mut r = self.registry.write().map_err(|_| HostError::Stopped)?;
        Self::reserve_in(self, &mut r, group, range)
    }

    fn reserve_in(
        self: &Arc<Self>,
        r: &mut Registry,
        group: GroupId,
        range: &KeyRange,
    ) -> Result<Reservation, HostError> {
        if r.groups.contains_key(&group) || r.starting.contains_key(&group) || r.parked.contains_key(&group) {
            return Err(HostError::GroupExists(group));
        }
        r.starting.insert(group, range.clone());
        Ok(Reservation { shared: self.clone(), group, done: false })
    }

    /// Reserves `group` like [`Shared::reserve`], also refused while another group of this node
    /// owns keys of `range` or will once its start completes. Checked under the registry's
    /// lock, against the ranges splits publish under it too (`publish_splits`): a group a
    /// split is starting here, and every group the map split off it since, is that split's
    /// to start (with the source's configuration), never a create's (empty, unable to vote).
    pub(crate) fn reserve_free(self: &Arc<Self>, group: GroupId, range: &KeyRange) -> Result<Reservation, HostError> {
        let mut r = self.registry.write().map_err(|_| HostError::Stopped)?;
        let here = r.groups.contains_key(&group) || r.starting.contains_key(&group);
        if let Some(other) = r.owner_of(group, range).filter(|_| !here) {
            return Err(HostError::RangeTaken { group, other });
        }
        Self::reserve_in(self, &mut r, group, range)
    }

    /// [`Shared::reserve_free`] for many groups under one hold of the registry's lock: every
    /// range claimed here is read and sorted once, so that each group costs O(log n) rather than
    /// a scan of every group (a node forming 100,000 replicas). The answers are the ones
    /// `reserve_free` one after another would give, in order (a group of the batch counts as
    /// started for the ones after it).
    pub(crate) fn reserve_free_many(
        self: &Arc<Self>,
        wanted: &[(GroupId, KeyRange)],
    ) -> Vec<Result<Reservation, HostError>> {
        let mut r = match self.registry.write() {
            Ok(r) => r,
            Err(_) => return wanted.iter().map(|_| Err(HostError::Stopped)).collect(),
        };
        let claimed = ClaimedRanges::of(&r);
        let mut out = Vec::with_capacity(wanted.len());
        for (group, range) in wanted {
            let here = r.groups.contains_key(group) || r.starting.contains_key(group);
            // The index says whether any claim overlaps; the scan, only then, which one (and
            // whether it is the group's own); the groups reserved in this batch are few.
            let maybe = claimed.any_overlaps(range)
                || out.iter().flatten().any(|res: &Reservation| {
                    r.starting.get(&res.group).is_some_and(|other| ranges_overlap(other, range))
                });
            if let Some(other) = maybe.then(|| r.owner_of(*group, range)).flatten().filter(|_| !here) {
                out.push(Err(HostError::RangeTaken { group: *group, other }));
                continue;
            }
            out.push(Self::reserve_in(self, &mut r, *group, range));
        }
        out
    }

    /// An apply batch of `sm`'s group was prepared: its range becomes `range`, and the groups
    /// its splits start are reserved with theirs, in one step under the registry's lock, so
    /// that no create sees the source narrowed while the new group's keys look free.
    /// A split whose group is here already gets `None`.
    pub(crate) fn publish_splits(
        self: &Arc<Self>,
        sm: &KvStateMachine,
        range: KeyRange,
        splits: Vec<SplitEffect>,
    ) -> Vec<(SplitEffect, Option<Reservation>)> {
        let mut r = match self.registry.write() {
            Ok(r) => r,
            Err(_) => {
                sm.set_range(range);
                return splits.into_iter().map(|s| (s, None)).collect();
            }
        };
        let out = splits
            .into_iter()
            .map(|s| {
                let reservation = Self::reserve_in(self, &mut r, s.new_group, &s.range).ok();
                (s, reservation)
            })
            .collect();
        sm.set_range(range);
        out
    }
}

/// A registered group: where it lives and what it owns (for reads on the caller's side).
#[derive(Clone)]
pub(crate) struct GroupEntry {
    pub(crate) poller: usize,
    pub(crate) sm: KvStateMachine,
    /// Open while this replica leads under a lease with everything committed applied: lease
    /// reads are then served on the caller's thread ([`Host::get`](super::Host::get)).
    pub(crate) lease: Arc<flotilla_raft::LeaseGate>,
}

/// Every range claimed in a registry (groups, starts under way, parked groups), sorted by start,
/// with the largest end among each prefix: a range `[s, e)` overlaps a claim exactly when some
/// claim starting before `e` ends after `s`, that is when the largest end of the claims
/// starting before `e` is past `s`. Exact whether or not the claims overlap each other (a
/// merge's frozen source lies inside its absorber for a while).
struct ClaimedRanges {
    /// Start keys, ascending.
    starts: Vec<Vec<u8>>,
    /// `ends_max[i]`: the largest end among `starts[..=i]`'s ranges (`None`: unbounded).
    ends_max: Vec<Option<Vec<u8>>>,
}

impl ClaimedRanges {
    fn of(r: &Registry) -> ClaimedRanges {
        let mut all: Vec<KeyRange> = r.groups.values().map(|e| e.sm.range()).collect();
        all.extend(r.starting.values().cloned());
        all.extend(r.parked.values().map(|p| p.entry.sm.range()));
        Self::from_ranges(all)
    }

    fn from_ranges(mut all: Vec<KeyRange>) -> ClaimedRanges {
        all.sort_by(|a, b| a.start.cmp(&b.start));
        let mut ends_max: Vec<Option<Vec<u8>>> = Vec::with_capacity(all.len());
        let mut starts = Vec::with_capacity(all.len());
        for k in all {
            let end = match (ends_max.last(), k.end) {
                (Some(None), _) | (_, None) => None,
                (Some(Some(m)), Some(e)) => Some(if *m > e { m.clone() } else { e }),
                (None, Some(e)) => Some(e),
            };
            ends_max.push(end);
            starts.push(k.start);
        }
        ClaimedRanges { starts, ends_max }
    }

    /// Whether any claim overlaps `range` (as [`ranges_overlap`] says).
    fn any_overlaps(&self, range: &KeyRange) -> bool {
        let before_end = match &range.end {
            Some(e) => self.starts.partition_point(|s| s < e),
            None => self.starts.len(),
        };
        before_end > 0 && self.ends_max[before_end - 1].as_ref().is_none_or(|m| range.start < *m)
    }
}

/// Whether two key ranges share a key.
fn ranges_overlap(a: &KeyRange, b: &KeyRange) -> bool {
    let a_starts_before_b_ends = b.end.as_ref().is_none_or(|e| a.start < *e);
    let b_starts_before_a_ends = a.end.as_ref().is_none_or(|e| b.start < *e);
    a_starts_before_b_ends && b_starts_before_a_ends
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index answers as a scan of every claim does, for claims that overlap each other,
    /// empty ones, unbounded ones, and queries of every kind.
    #[test]
    fn the_claims_index_finds_an_overlap_exactly_when_a_scan_does() {
        let keys: Vec<Vec<u8>> = ["", "a", "b", "c", "d", "e", "f"].iter().map(|k| k.as_bytes().to_vec()).collect();
        let ranges: Vec<KeyRange> = keys
            .iter()
            .flat_map(|s| {
                let ends = keys.iter().map(|e| Some(e.clone())).chain([None]);
                ends.map(move |end| KeyRange { start: s.clone(), end })
            })
            .collect();
        // Deterministic claim sets: every window of consecutive ranges, with a stride.
        let mut checked = 0;
        for stride in 1..=7 {
            for first in 0..ranges.len() {
                let held: Vec<KeyRange> = ranges.iter().skip(first).step_by(stride).take(6).cloned().collect();
                let index = ClaimedRanges::from_ranges(held.clone());
                for q in &ranges {
                    let scan = held.iter().any(|h| ranges_overlap(h, q));
                    assert_eq!(index.any_overlaps(q), scan, "held {held:?}, query {q:?}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000);
        assert!(!ClaimedRanges::from_ranges(Vec::new()).any_overlaps(&ranges[0]));
    }
}
