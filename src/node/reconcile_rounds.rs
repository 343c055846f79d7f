//! The reconciler's two kinds of round, and when each runs.
//!
//! A **full round** (`Node::reconcile_full`) holds every group here against every shard of
//! the map: the only round that creates replicas (a creation checks its range against every
//! local group's), and the one that finds what nothing else points at (a leadership gained, a
//! member telling a replica it was removed). With 100,000 groups it reads every group's
//! summary and looks up every shard, a quarter of a second of CPU or more, so it runs only
//! when something may have changed, and never more than a bounded share of the time
//! ([`FULL_ROUND_SPACING_PER_GROUP`]).
//!
//! A **round of what changed** ([`Node::reconcile_changed`]) runs on every tick in between.
//! It looks only at the groups whose shards changed in the map since the last round, the
//! shards a move, a tombstone, a leader transfer or a merge names, and the groups the last
//! round found work for, at most [`CHANGED_ROUND_GROUPS_MAX`] (the rest wait their turn).
//! Those are what a move, a split or a removal is waiting on, so their steps do not wait for
//! a full round, however many groups the node holds; creating a replica does (a move's
//! target), and so do groups frozen by a merge that is over. For the groups it looks at it
//! decides with the full round's own code ([`Node::act_on_groups`]), on each group's summary
//! read afresh.

use super::{Node, RECONCILE_FULL_MS, RECONCILE_IDLE_FULL_MS};
use crate::meta::META_GROUP;
use crate::placement::{MetaState, NodeId, ShardDescriptor, ShardMap};
use crate::raft::GroupId;
use crate::shard::KeyRange;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far apart full rounds are at least, per group here: about ten times what a full round
/// takes per group on this machine (2-3 µs), so that full rounds take at most a tenth of a
/// core whatever the number of groups. At 10,000 groups that is 250 ms, near the reconciler's
/// tick; at 100,000, 2.5 s. Counted by groups, not by the last round's length: a round's
/// length includes its waits on other nodes (a reconfiguration, a meta op), which cost no CPU
/// here. Capped at [`RECONCILE_IDLE_FULL_MS`].
const FULL_ROUND_SPACING_PER_GROUP: Duration = Duration::from_micros(25);

/// Groups a round of what changed looks at, at most: each is a summary read from its poller.
/// The rest of the map's changes and of the groups with work left wait for the next round,
/// ahead of the others.
pub(super) const CHANGED_ROUND_GROUPS_MAX: usize = 256;

/// What the reconciler saw when a full round started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Seen {
    /// The meta state's revision.
    pub(super) revision: u64,
    /// How many groups this node held.
    pub(super) groups: usize,
    /// The host's generation of group summaries (`Host::info_generation`): a role, an applied
    /// index, a configuration of some group changed since when it moved.
    pub(super) generation: u64,
}

/// The reconciler's last rounds.
#[derive(Clone, Debug)]
pub(super) struct Reconciled {
    /// What the last full round saw.
    pub(super) seen: Seen,
    /// When the last full round started.
    pub(super) at: Instant,
    /// Whether it did or asked for anything, or stopped early: another comes at the usual
    /// pace, not only when something changed.
    pub(super) busy: bool,
    /// The map the last round, of either kind, acted on: the next round of what changed looks
    /// at the shards that differ from it. A copy costs nothing (`ShardMap` shares its parts).
    /// `None` until a full round looked at every group: till then only full rounds run.
    pub(super) map: Option<ShardMap>,
    /// Groups the last round found something to do for: looked at again until they have
    /// nothing.
    pub(super) busy_groups: BTreeSet<GroupId>,
    /// Groups of the map's changes or with work left that the last round of what changed had
    /// no room for: first in the next one.
    pub(super) waiting: BTreeSet<GroupId>,
    /// A round of what changed found a replica to create: that takes a full round.
    pub(super) full_wanted: bool,
}

impl Reconciled {
    /// After a full round that started at `at` having seen `seen`, on `map`. `groups`: the
    /// groups it found work for; `None` if it stopped before looking at them, when what the
    /// rounds before had left to do is kept.
    pub(super) fn after_full_round(
        last: Option<Reconciled>,
        seen: Seen,
        at: Instant,
        busy: bool,
        map: &ShardMap,
        groups: Option<BTreeSet<GroupId>>,
    ) -> Reconciled {
        match (groups, last) {
            (None, Some(l)) => Reconciled { seen, at, busy, ..l },
            (groups, _) => Reconciled {
                seen,
                at,
                busy,
                map: groups.is_some().then(|| map.clone()),
                busy_groups: groups.unwrap_or_default(),
                waiting: BTreeSet::new(),
                full_wanted: false,
            },
        }
    }

    /// After a round of what changed, on `map`: `busy` the groups it found work for, `waiting`
    /// those it had no room for, `to_create` whether it found a replica to create.
    pub(super) fn after_changed_round(
        self,
        map: &ShardMap,
        busy: BTreeSet<GroupId>,
        waiting: BTreeSet<GroupId>,
        to_create: bool,
    ) -> Reconciled {
        Reconciled {
            map: Some(map.clone()),
            busy_groups: busy,
            waiting,
            full_wanted: self.full_wanted || to_create,
            ..self
        }
    }
}

/// Whether a full round is due, after the last one `last`, with the node as `seen` now.
/// `forming`: the node has not formed its bootstrap shards yet; until then every change of
/// the map gets a full round at once, which is the only kind that forms them.
pub(super) fn full_round_due(last: Option<&Reconciled>, seen: Seen, forming: bool, now: Instant) -> bool {
    let Some(l) = last else { return true };
    let since = now.saturating_duration_since(l.at);
    let spacing = FULL_ROUND_SPACING_PER_GROUP.saturating_mul(l.seen.groups as u32);
    if since < spacing.min(Duration::from_millis(RECONCILE_IDLE_FULL_MS)) && !forming {
        return false;
    }
    // A group come or gone (a split's new group, a creation), or a replica to create: at once.
    if l.seen.groups != seen.groups || l.full_wanted || (forming && l.seen.revision != seen.revision) {
        return true;
    }
    // Something changed (on a node taking writes, nearly every poller round) or the last
    // round had work: once per RECONCILE_FULL_MS. Nothing: once per RECONCILE_IDLE_FULL_MS,
    // in case something no summary shows changed.
    let every = if l.seen != seen || l.busy { RECONCILE_FULL_MS } else { RECONCILE_IDLE_FULL_MS };
    since >= Duration::from_millis(every)
}

/// The groups node `me`'s next round of what changed looks at after `last`, on the view
/// `view`, at most [`CHANGED_ROUND_GROUPS_MAX`]; and those it has no room for, which go first
/// in the round after. In this order: what waited, the map's changes, the groups with work
/// left, then the shards a move, a leader transfer or a merge names, and the tombstones that
/// may still call for something (one of this node's replicas, or one its group still counts);
/// a tombstone of another node confirmed already asks nothing here, and one of a node gone for
/// good stays in the meta state indefinitely. Nothing before a full round looked at every
/// group.
pub(super) fn groups_to_look_at(
    last: &Reconciled,
    view: &MetaState,
    me: NodeId,
) -> (BTreeSet<GroupId>, BTreeSet<GroupId>) {
    let Some(map) = last.map.as_ref() else { return Default::default() };
    let tombstones =
        view.tombstones.iter().filter(|(_, t)| t.contains_key(&me) || t.values().any(|t| t.confirmed.is_none()));
    let all = last
        .waiting
        .iter()
        .copied()
        .chain(map.differing(&view.map))
        .chain(last.busy_groups.iter().copied())
        .chain(view.moves.keys().copied())
        .chain(view.transfers.keys().copied())
        .chain(view.merges.keys().copied())
        .chain(tombstones.map(|(s, _)| *s));
    let (mut looked, mut waiting) = (BTreeSet::new(), BTreeSet::new());
    for g in all.filter(|g| *g != META_GROUP) {
        if looked.len() < CHANGED_ROUND_GROUPS_MAX {
            looked.insert(g);
        } else if !looked.contains(&g) {
            waiting.insert(g);
        }
    }
    (looked, waiting)
}

impl Node {
    /// A round of what changed over `groups`, on the view `state`: what each of them needs,
    /// decided on its summary read afresh, as a full round decides it. The groups that had
    /// something to do, and whether there is a replica to create here (left to a full round,
    /// which checks its range against every group's). Never while the bootstrap's shards are
    /// being formed: only a full round keeps those.
    pub(super) async fn reconcile_changed(
        &self,
        state: &Arc<MetaState>,
        groups: &BTreeSet<GroupId>,
    ) -> (BTreeSet<GroupId>, bool) {
        let (me, host) = (self.inner.id, &self.inner.host);
        if self.inner.bootstrap_forming.lock().map(|f| f.open()).unwrap_or(true) {
            return (groups.clone(), true);
        }
        self.inner.stats.reconcile_changed_rounds.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.reconcile_changed_groups.fetch_add(groups.len() as u64, Ordering::Relaxed);
        // Gone since (removed, merged away): nothing left to decide for them.
        let Ok(infos) = host.group_info_of_many(groups).await else { return (groups.clone(), false) };
        // A shard placed here and not here is one to create, unless a group here still holds
        // its first key: the map split it off that group, whose split entry starts it.
        // The ranges are read (a lock each) only when such a shard is found.
        let placed: Vec<&ShardDescriptor> = groups
            .iter()
            .filter(|g| !host.hosts(**g))
            .filter_map(|g| state.map.get(*g))
            .filter(|d| d.replica(me).is_some())
            .collect();
        let to_create = !placed.is_empty() && {
            let held: Vec<KeyRange> = infos.iter().filter_map(|i| host.group_range(i.group)).collect();
            placed.iter().any(|d| !held.iter().any(|r| r.contains(&d.start)))
        };
        (self.act_on_groups(state, &infos, None).await, to_create)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{MetaCommand, MovePlan, MoveStep, Tombstone};
    use std::collections::BTreeMap;

    fn seen(revision: u64, groups: usize, generation: u64) -> Seen {
        Seen { revision, groups, generation }
    }

    fn last(at: Instant, seen: Seen, busy: bool) -> Reconciled {
        Reconciled::after_full_round(None, seen, at, busy, &ShardMap::default(), Some(BTreeSet::new()))
    }

    #[test]
    fn a_full_round_comes_first_then_when_something_changed_and_spaced_by_the_groups_here() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let s = seen(5, 100, 7);
        assert!(full_round_due(None, s, false, t0));
        // A small node: every change within a second, nothing within ten.
        let small = last(t0, s, false);
        assert!(!full_round_due(Some(&small), seen(6, 100, 7), false, ms(999)));
        assert!(full_round_due(Some(&small), seen(6, 100, 7), false, ms(1_000)));
        assert!(full_round_due(Some(&small), seen(5, 100, 8), false, ms(1_000)));
        assert!(!full_round_due(Some(&small), s, false, ms(9_999)));
        assert!(full_round_due(Some(&small), s, false, ms(10_000)));
        assert!(full_round_due(Some(&last(t0, s, true)), s, false, ms(1_000)));
        // A group come or gone: past the spacing (2.5 ms for 100 groups), at once.
        assert!(!full_round_due(Some(&small), seen(5, 101, 7), false, ms(2)));
        assert!(full_round_due(Some(&small), seen(5, 101, 7), false, ms(3)));
        // 100,000 groups: 2.5 s apart, whatever came.
        let big = last(t0, seen(5, 100_000, 7), true);
        assert!(!full_round_due(Some(&big), seen(5, 100_001, 7), false, ms(2_499)));
        assert!(full_round_due(Some(&big), seen(5, 100_001, 7), false, ms(2_500)));
        let wanted = Reconciled { full_wanted: true, ..big.clone() };
        assert!(!full_round_due(Some(&wanted), seen(5, 100_000, 7), false, ms(2_499)));
        assert!(full_round_due(Some(&wanted), seen(5, 100_000, 7), false, ms(2_500)));
        // The spacing is capped at the idle round's period.
        let huge = last(t0, seen(5, 1_000_000, 7), true);
        assert!(!full_round_due(Some(&huge), seen(5, 1_000_001, 7), false, ms(9_999)));
        assert!(full_round_due(Some(&huge), seen(5, 1_000_001, 7), false, ms(10_000)));
        // Forming the bootstrap: every change of the map at once, however many groups.
        assert!(full_round_due(Some(&big), seen(6, 100_000, 7), true, ms(1)));
        assert!(!full_round_due(Some(&big), seen(5, 100_000, 7), true, ms(1)));
    }

    fn state(shards: u32) -> MetaState {
        crate::meta::three_node_state(shards)
    }

    /// Splits the shard holding `key` at `key`; the id of the new right-hand shard.
    fn split(s: &mut MetaState, key: Vec<u8>) -> GroupId {
        let d = s.map.lookup(&key).expect("a shard holds every key").clone();
        s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: key.clone() }).expect("split");
        s.map.lookup(&key).expect("a shard holds every key").id
    }

    fn acted_on(map: &ShardMap, busy: &[u64], waiting: &[u64]) -> Reconciled {
        let l = last(Instant::now(), seen(1, 1, 1), false);
        let ids = |v: &[u64]| v.iter().map(|g| GroupId(*g)).collect();
        l.after_changed_round(map, ids(busy), ids(waiting), false)
    }

    fn tomb(nodes: &[(u64, Option<u64>)]) -> BTreeMap<NodeId, Tombstone> {
        nodes.iter().map(|(n, c)| (NodeId(*n), Tombstone { confirmed: c.map(crate::placement::LogIndex) })).collect()
    }

    #[test]
    fn a_round_of_what_changed_looks_at_the_changed_shards_and_those_in_flight_only() {
        let me = NodeId(1);
        let before = state(1_000);
        let mut after = before.clone();
        let middle = after.map.shards().nth(500).expect("a shard").clone();
        let mut at = middle.start.clone();
        at.push(0x80);
        let new = split(&mut after, at);
        let moved = after.map.shards().nth(10).expect("a shard").id;
        let plan = MovePlan {
            shard: moved,
            from: NodeId(3),
            to: NodeId(4),
            transfer_leader_to: None,
            step: MoveStep::AddLearner,
            catch_up_lag_entries_max: 0,
        };
        after.moves.insert(moved, plan);
        after.transfers.insert(GroupId(20), NodeId(2));
        // A tombstone of this node's, one not confirmed yet, and one of another node's that
        // is confirmed (asks nothing here).
        after.tombstones.insert(GroupId(30), tomb(&[(1, Some(9))]));
        after.tombstones.insert(GroupId(31), tomb(&[(4, None)]));
        after.tombstones.insert(GroupId(32), tomb(&[(4, Some(9))]));
        let l = acted_on(&before.map, &[7], &[]);
        let (looked, waiting) = groups_to_look_at(&l, &after, me);
        let want: BTreeSet<GroupId> = [middle.id, new, moved, GroupId(7), GroupId(20), GroupId(30), GroupId(31)].into();
        assert_eq!(looked, want);
        assert!(waiting.is_empty());
        // The same map and nothing in flight: nothing to look at. The meta group never.
        assert_eq!(groups_to_look_at(&acted_on(&before.map, &[], &[]), &before, me), Default::default());
        let only_meta = acted_on(&before.map, &[META_GROUP.0], &[]);
        assert_eq!(groups_to_look_at(&only_meta, &before, me), Default::default());
    }

    #[test]
    fn a_round_of_what_changed_is_bounded_and_what_it_had_no_room_for_goes_first_next() {
        let me = NodeId(1);
        let (before, after) = (state(1_000), state(0));
        let (looked, waiting) = groups_to_look_at(&acted_on(&after.map, &[], &[]), &before, me);
        assert_eq!(looked.len(), CHANGED_ROUND_GROUPS_MAX);
        assert!(looked.is_disjoint(&waiting));
        let every: BTreeSet<GroupId> =
            before.map.shards().map(|d| d.id).chain(after.map.shards().map(|d| d.id)).collect();
        let both: BTreeSet<GroupId> = looked.union(&waiting).copied().collect();
        assert_eq!(both, every);
        // Next: what waited comes before groups of lower ids still busy, and before the shards
        // in flight, so every group with work gets its turn.
        let mut view = before.clone();
        let in_flight = GroupId(999_999);
        view.transfers.insert(in_flight, NodeId(2));
        let busy: Vec<u64> = (1..=CHANGED_ROUND_GROUPS_MAX as u64).collect();
        let waited: Vec<u64> = waiting.iter().map(|g| g.0).collect();
        let l = acted_on(&before.map, &busy, &waited);
        let (next, rest) = groups_to_look_at(&l, &view, me);
        let first: BTreeSet<GroupId> = waiting.iter().take(CHANGED_ROUND_GROUPS_MAX).copied().collect();
        assert_eq!(next, first);
        assert_eq!(next.len() + rest.len(), waiting.len() + busy.len() + 1);
        assert!(busy.iter().all(|g| rest.contains(&GroupId(*g))));
        assert!(rest.contains(&in_flight), "what is in flight waits its turn too");
    }

    #[test]
    fn a_round_records_the_map_it_acted_on_and_one_that_stopped_early_keeps_what_was_left() {
        let (before, after) = (state(10), state(20));
        let t0 = Instant::now();
        let full = Reconciled::after_full_round(None, seen(1, 10, 1), t0, false, &before.map, Some(BTreeSet::new()));
        let ids = |v: &[u64]| -> BTreeSet<GroupId> { v.iter().map(|g| GroupId(*g)).collect() };
        let changed = full.after_changed_round(&after.map, ids(&[3]), ids(&[4]), true);
        assert!(changed.map.as_ref().is_some_and(|m| m.same(&after.map)));
        assert_eq!(
            (changed.busy_groups.clone(), changed.waiting.clone(), changed.full_wanted),
            (ids(&[3]), ids(&[4]), true)
        );
        // A full round that stopped before looking at the groups: what was left stays.
        let stopped = Reconciled::after_full_round(Some(changed.clone()), seen(2, 10, 1), t0, true, &before.map, None);
        assert!(stopped.map.as_ref().is_some_and(|m| m.same(&after.map)));
        assert_eq!((stopped.busy_groups.clone(), stopped.waiting.clone()), (ids(&[3]), ids(&[4])));
        assert_eq!(stopped.seen, seen(2, 10, 1));
        // One that looked at every group starts afresh.
        let done = Reconciled::after_full_round(Some(changed), seen(2, 10, 1), t0, true, &before.map, Some(ids(&[9])));
        assert!(done.map.as_ref().is_some_and(|m| m.same(&before.map)));
        // A first full round that stopped early leaves no map: no round of what changed yet.
        let first = Reconciled::after_full_round(None, seen(1, 10, 1), t0, true, &before.map, None);
        assert!(first.map.is_none());
        let mut view = after.clone();
        view.transfers.insert(GroupId(2), NodeId(2));
        assert_eq!(groups_to_look_at(&first, &view, NodeId(1)), Default::default());
        assert_eq!((done.busy_groups, done.waiting, done.full_wanted), (ids(&[9]), BTreeSet::new(), false));
    }
}
