//! The balancer's merge rules (see "Merges" in the module docs of [`crate::balance`]): which
//! neighbours are small and cold enough to merge, merges of those on the same nodes, moves
//! that put those on different nodes on the same ones, and aborts of freezes that take too
//! long.

use super::{Accepted, Proposal, Round};
use crate::load::{LOAD_REPORT_REQUESTS_PER_S_MIN, LOAD_REPORT_SHARDS_MAX};
use crate::map::{NodeId, ReplicaRole, ShardDescriptor, ShardId};
use crate::merge::MergePhase;
use std::collections::BTreeSet;

/// Two neighbours that may merge (everything but their nodes checked).
#[derive(Clone, Copy, Debug)]
pub(super) struct Pair<'a> {
    pub(super) left: &'a ShardDescriptor,
    pub(super) right: &'a ShardDescriptor,
    /// Their bytes together.
    pub(super) bytes: u64,
}

impl Pair<'_> {
    /// Whether both are on the same nodes (and all voters: checked by [`Round::merge_pairs`]).
    fn aligned(&self) -> bool {
        nodes(self.left) == nodes(self.right)
    }
}

impl<'a> Round<'a> {
    /// Neighbours that may merge but for their nodes, smallest first: merges are on
    /// (`merge_size_bytes_threshold` > 0); neither moves, takes part in a merge, is busy this
    /// round or was moved recently; both have voters only, as many each; both sizes are
    /// known, from nodes that hold them, and together below the merge threshold and at most
    /// half the split threshold; both request rates are known (their leaders report) and
    /// together at most `merge_requests_per_s_max` and at most half the load-split rate.
    ///
    /// Not `strict`: by size and rate alone (a move in progress, a cool-down, a learner do not
    /// count): the pairs the count and size rules leave alone, so that neither shard of a pair
    /// being aligned is moved away from the other meanwhile.
    pub(super) fn merge_pairs(&self, strict: bool) -> Vec<Pair<'a>> {
        let cfg = self.cfg;
        if cfg.merge_size_bytes_threshold == 0 {
            return Vec::new();
        }
        let shards: Vec<&'a ShardDescriptor> = self.state.map.shards().collect();
        let mut pairs: Vec<Pair<'a>> = Vec::new();
        for w in shards.windows(2) {
            let (left, right) = (w[0], w[1]);
            debug_assert_eq!(left.end.as_deref(), Some(right.start.as_slice()), "the map covers the keyspace");
            let free = |d: &ShardDescriptor| {
                !self.busy.contains(&d.id)
                    && !self.cooling.contains_key(&d.id)
                    && self.state.merge_of(d.id).is_none()
                    && d.replicas.iter().all(|r| r.role == ReplicaRole::Voter)
            };
            if strict && (!free(left) || !free(right)) {
                continue;
            }
            if left.voters().count() != right.voters().count() {
                continue;
            }
            let (Some(lb), Some(rb)) = (self.held_size(left), self.held_size(right)) else { continue };
            let (Some(lr), Some(rr)) = (self.rate(left), self.rate(right)) else { continue };
            let bytes = lb.saturating_add(rb);
            let rate = lr.saturating_add(rr);
            let small =
                bytes < cfg.merge_size_bytes_threshold && bytes.saturating_mul(2) <= cfg.split_size_bytes_threshold;
            let cold = rate <= cfg.merge_requests_per_s_max
                && (cfg.load_split_requests_per_s == 0 || rate.saturating_mul(2) <= cfg.load_split_requests_per_s);
            if small && cold {
                pairs.push(Pair { left, right, bytes });
            }
        }
        pairs.sort_by_key(|p| (p.bytes, p.left.id));
        pairs
    }

    /// The shard's size as the nodes holding it report it (the largest: a learner still
    /// catching up reports less); `None` if none does (just split or merged: the reports
    /// described another range).
    fn held_size(&self, d: &ShardDescriptor) -> Option<u64> {
        d.replicas
            .iter()
            .filter_map(|r| self.state.nodes.get(&r.node))
            .filter_map(|i| i.report.shard_bytes.get(&d.id).copied())
            .max()
    }

    /// An upper bound of the shard's request rate, from its leader's report: its own rate if
    /// listed; if not, below the smallest listed when the list is full, and below
    /// [`LOAD_REPORT_REQUESTS_PER_S_MIN`] otherwise (a colder shard is not listed). `None`
    /// without a voter reporting that it leads.
    fn rate(&self, d: &ShardDescriptor) -> Option<u64> {
        let leader = d.voters().filter_map(|v| self.state.nodes.get(&v)).find(|i| i.report.leading.contains(&d.id))?;
        let listed = &leader.report.shard_load;
        if let Some(l) = listed.get(&d.id) {
            return Some(l.requests_per_s);
        }
        if listed.len() >= LOAD_REPORT_SHARDS_MAX {
            return Some(listed.values().map(|l| l.requests_per_s).min().unwrap_or(0));
        }
        Some(LOAD_REPORT_REQUESTS_PER_S_MIN)
    }

    /// Merges of aligned pairs, smallest first, a shard in one at most, while fewer than
    /// `merges_at_once_max` plans exist; and, for pairs on different nodes, moves that bring
    /// the right shard's nodes closer to the left one's, within the round's move budget.
    /// `taken`: shards split this round.
    pub(super) fn merges(&mut self, taken: &BTreeSet<ShardId>) -> Vec<Proposal> {
        let pairs: Vec<Pair<'a>> = self.merge_pairs(true);
        let mut room = self.cfg.merges_at_once_max.saturating_sub(self.state.merges.len());
        let mut used: BTreeSet<ShardId> = taken.clone();
        let mut out = Vec::new();
        for p in pairs {
            let (l, r) = (p.left, p.right);
            if used.contains(&l.id) || used.contains(&r.id) || self.busy.contains(&l.id) || self.busy.contains(&r.id) {
                continue;
            }
            if p.aligned() {
                if room == 0 || !self.ready_to_merge(&p) {
                    continue;
                }
                room -= 1;
                used.extend([l.id, r.id]);
                out.push(Proposal::BeginMerge { left: l.id, left_epoch: l.epoch, right: r.id, right_epoch: r.epoch });
            } else if self.align(&p) {
                used.extend([l.id, r.id]);
            }
        }
        out
    }

    /// Whether an aligned pair may begin merging now: every replica's node reports the shard
    /// (a node down reports nothing, and a merge with a replica that cannot take the freeze
    /// would only freeze the right shard's writes until it is aborted, and be proposed again),
    /// and neither shard has a removed replica not deleted yet (`BeginMerge` refuses: a shard
    /// out of the map is nobody's to clean up).
    fn ready_to_merge(&self, p: &Pair<'a>) -> bool {
        let reported = |d: &ShardDescriptor| {
            d.replicas
                .iter()
                .all(|r| self.state.nodes.get(&r.node).is_some_and(|n| n.report.applied.contains_key(&d.id)))
        };
        let tombstoned = |d: &ShardDescriptor| self.state.tombstones.contains_key(&d.id);
        reported(p.left) && reported(p.right) && !tombstoned(p.left) && !tombstoned(p.right)
    }

    /// One move that puts the pair on more common nodes: a replica of the right shard from a
    /// node the left one lacks to a node of the left one that the right one lacks or, if no
    /// such move fits, the other way round (a replica of the left shard). A move fits if its
    /// target may take it (registered, not draining, a snapshot slot free) and ends up with at
    /// most one replica more than its source (the source is not draining); the busiest source
    /// and the emptiest target first. Accepted outside the count and size rules' hysteresis
    /// (see "Merges" in the module docs).
    fn align(&mut self, p: &Pair<'a>) -> bool {
        if self.accepted.len() >= self.budget {
            return false;
        }
        let (l, r) = (nodes(p.left), nodes(p.right));
        let count = |n: &NodeId| self.load.get(n).map_or(0, |l| l.count);
        let pick = |moved: &ShardDescriptor, has: &BTreeSet<NodeId>, wants: &BTreeSet<NodeId>| {
            let mut sources: Vec<NodeId> = has.difference(wants).copied().collect();
            sources.sort_by_key(|n| (!self.draining(*n), std::cmp::Reverse(count(n)), *n));
            let mut targets: Vec<NodeId> = wants
                .difference(has)
                .copied()
                .filter(|n| self.state.nodes.get(n).is_some_and(|i| !i.draining))
                .filter(|n| self.incoming.get(n).copied().unwrap_or(0) < self.cfg.incoming_snapshots_per_node_max)
                .collect();
            targets.sort_by_key(|n| (count(n), *n));
            let from = sources.first().copied()?;
            let to = targets.into_iter().find(|t| self.draining(from) || count(t) <= count(&from))?;
            Some((moved.id, from, to, self.held_size(moved).unwrap_or(0)))
        };
        let Some((shard, from, to, bytes)) = pick(p.right, &r, &l).or_else(|| pick(p.left, &l, &r)) else {
            return false;
        };
        let f = self.load.entry(from).or_default();
        f.count = f.count.saturating_sub(1);
        f.bytes = f.bytes.saturating_sub(bytes);
        let t = self.load.entry(to).or_default();
        t.count += 1;
        t.bytes = t.bytes.saturating_add(bytes);
        *self.incoming.entry(to).or_default() += 1;
        self.busy.insert(p.right.id);
        self.busy.insert(p.left.id);
        self.accepted.push(Accepted { shard, from, to, bytes });
        true
    }

    /// Aborts of plans still freezing `merge_freeze_timeout_ms` after they began.
    pub(super) fn merge_aborts(&self, now_ms: u64) -> Vec<Proposal> {
        self.state
            .merges
            .values()
            .filter(|p| p.phase == MergePhase::Freezing)
            .filter(|p| now_ms >= p.started_ms.saturating_add(self.cfg.merge_freeze_timeout_ms))
            .map(|p| Proposal::AbortMerge { left: p.left, id: p.id })
            .collect()
    }
}

fn nodes(d: &ShardDescriptor) -> BTreeSet<NodeId> {
    d.replicas.iter().map(|r| r.node).collect()
}
