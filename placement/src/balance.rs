//! The balancer: from the meta state (map, node reports, moves in progress, recent move
//! starts) and the current time, proposes replica moves, leader transfers and splits. Pure: it
//! only proposes; the node turns each proposal into a command ([`Proposal::command`]) and moves
//! run as plans ([`crate::plan`]).
//!
//! # How the three goals combine
//! Replica count comes first, data size second, leader count separately:
//! - **Count.** Every replica costs about the same in Raft traffic, memory and file handles,
//!   so counts are the primary goal: a *count move* goes from a node with more than
//!   `replica_count_spread_max` replicas above its target (default 1: counts end within 1).
//!   Of the shards the source could give, it picks the one that best evens out the pair's
//!   bytes.
//! - **Size.** When the byte gap between two nodes exceeds the size tolerance
//!   (`size_spread_percent` of the mean bytes per node, at least `size_spread_bytes_min`), a
//!   *size move* sends the largest shard of at most half the gap from the fuller to the
//!   emptier node, if the fuller holds at least one replica more (so the counts do not get
//!   worse); if it does not, a *swap* sends a big shard one way and the target's smallest
//!   shard back, counts unchanged, the size difference at most half the gap.
//! - **Leaders** are balanced by transfers (cheap: no data moves), separately from the above:
//!   by count first (from the node leading the most shards to one leading at least two fewer,
//!   the shard that best evens out their load; one such transfer a round), then by request
//!   load (each leader reports its busiest shards' rates, [`crate::meta::ShardLoad`], and
//!   the total over all the shards it leads, [`crate::meta::NodeReport::led_requests_per_s`],
//!   which is the node's load: many lukewarm shards weigh too, though only the listed ones
//!   are moved): when the load of the shards one node leads
//!   exceeds another's by more than the load tolerance (`leader_load_spread_percent` of the
//!   mean, at least `leader_load_spread_requests_per_s_min`), the hottest shard of at most
//!   half the gap goes to the less loaded node if it leads fewer shards; if it does not, that
//!   shard is swapped for the other node's coldest one (two transfers, counts unchanged, the
//!   load difference at most half the gap). Count transfers lower the sum of leader counts
//!   squared; load transfers leave it as is or lower it and lower the sum of loads squared,
//!   so leader balancing ends too, and neither rule wants a transfer of the round back (the
//!   count rule never moves from a node leading fewer, the load rule never overshoots).
//!   A shard too hot to move without overshooting is a case for a load split instead.
//!
//! Why this terminates: every count move lowers the sum over nodes of count squared (by at
//! least 2); every size move or swap leaves that sum as it is or lowers it, and lowers the sum
//! of bytes squared (it never moves more than half the gap). So the pair (sum of counts
//! squared, sum of bytes squared) falls with every move: balancing stops, and no map state
//! ever comes back, whatever the limits do to the order of moves. Draining moves are the
//! exception, and finite: draining nodes only lose replicas.
//!
//! # Hysteresis: never undo a move next round
//! Right after a move, neither rule wants it back: a count move leaves the source at or
//! above the target's count; a size move leaves the target at most one replica above the
//! source and never moves more than half the byte gap; a swap's big half would overshoot if
//! moved back and its small half goes from a node that does not hold more replicas. Later
//! moves in the same round change the loads too, so before accepting a move the balancer
//! checks, on the loads after it, that no move accepted this round (itself included) would
//! be proposed in reverse; if one would, the move is dropped. Loads are *projected*: moves in
//! progress count as done, pending leader transfers as done, so the next round (before the
//! moves finish) does not propose them again.
//!
//! That still only covers the end of a round. The next round may first make moves the last
//! one could not (a snapshot slot came free) and then find a shard of the last round best
//! sent back (the property test found such cases). So a shard moved less than
//! `shard_move_cooldown_ms` ago is not moved again, except off a draining node, and never
//! straight back to where it came from while it cools down. That makes "never undo the
//! previous round's move" hold whenever rounds are closer together than the cool-down.
//!
//! # Limits (all hold together)
//! - at most `moves_per_round_max` moves per round;
//! - at most `moves_per_minute_max` moves started in any [`MOVE_WINDOW_MS`] window, counted
//!   from [`MetaState::recent_moves`] (the time is an argument, never read from a clock);
//! - at most `incoming_snapshots_per_node_max` moves feeding one node at a time: moves in
//!   progress still adding or catching up their learner count;
//! - never two replicas of a shard on one node, never a move onto a draining node, never a
//!   second move or a split of a shard with a move in progress;
//! - at most `leader_transfers_per_round_max` transfers (of which one count transfer at most:
//!   the limit of 2 is for a load swap's two legs) and `splits_per_round_max` splits.
//!
//! Draining nodes are emptied first (under the same limits). Splits are suggested for shards
//! over `split_size_bytes_threshold` when a node reported a split key strictly inside the
//! range; a shard's size is the largest any node reports for it (replicas hold the same data,
//! and a learner still catching up reports less). Shards whose leader reports more than
//! `load_split_requests_per_s` for long enough, with a key that divides the load, are split at
//! that key (load-based splitting, [`crate::load`]), within the same per-round limit.
//!
//! # Merges
//! Two neighbours are merged ([`crate::merge`]) when both are small and cold: their sizes, as
//! nodes holding them report them, add up to less than `merge_size_bytes_threshold` and to at
//! most half `split_size_bytes_threshold`; their request rates, as their leaders report them
//! (a shard a leader does not list is colder than the ones it lists), add up to at most
//! `merge_requests_per_s_max` and to at most half `load_split_requests_per_s`. Neither may be
//! moving, cooling down after a move, split this round or in a merge already; both must have
//! voters only, on the same nodes. The smallest pairs go first, a shard in one merge at most,
//! while fewer than `merges_at_once_max` plans exist. A plan still freezing
//! `merge_freeze_timeout_ms` after it began is aborted. The meta group is never merged: it is
//! not in the map the balancer reads.
//!
//! Neighbours on different nodes (as many voters each) get an *aligning move* instead: a
//! replica of the right shard from a node the left one lacks to one of the left one's nodes
//! (or, if that does not fit, the other way round), at most one per pair and round, within the
//! move limits, onto a node that ends up at most one replica above the source. Such moves
//! are exempt from the hysteresis check (they may leave counts one outside the band), and the
//! merge that follows takes a replica off every node of the pair.
//!
//! Why merges and the other rules do not fight:
//! - *Merge and split.* A merged shard is at most half the split size and half the load-split
//!   rate, so it is split only after it doubles; a size split's halves together are over the
//!   split size, and a load split's are hot, so neither is merged back while it stays so.
//!   Right after a split or a merge the reports describe the old ranges and are dropped
//!   ([`MetaState`] does so), so no merge is decided on them.
//! - *Merges and moves.* A merge lowers the number of shards, which nothing but splits raises,
//!   and splits only follow growth, so merges are finite. The count and size rules leave the
//!   shards of small, cold neighbour pairs where they are (off a draining node excepted), so
//!   they never move a shard away from the neighbour it is being aligned with; the aligning
//!   moves each add a common node to a pair and are undone by nothing but a drain, so they are
//!   finite too. The counts a merge or an aligning move unsettles are then evened out by
//!   count moves of other shards, which terminate as above.

use crate::map::{Epoch, NodeId, ReplicaRole, ShardDescriptor, ShardId};
use crate::merge::MergeId;
use crate::meta::{MetaCommand, MetaState, MOVE_WINDOW_MS};
use crate::plan::{MovePlan, MoveStep};
use std::collections::{BTreeMap, BTreeSet, HashMap};

mod merge;

/// Limits and tolerances of the balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalancerConfig {
    /// Moves proposed in one round at most.
    pub moves_per_round_max: usize,
    /// Moves started in any one-minute window at most (moves cost snapshot bandwidth and disk).
    pub moves_per_minute_max: usize,
    /// Moves feeding one node at a time at most (each new replica starts with a snapshot).
    pub incoming_snapshots_per_node_max: usize,
    /// Replica counts within this of each other count as balanced. 0 counts as 1: a band of 0
    /// would move replicas back and forth. A wider band means fewer count moves.
    pub replica_count_spread_max: usize,
    /// A byte gap between two nodes below this percentage of the mean bytes per node counts as
    /// balanced.
    pub size_spread_percent: u64,
    /// A byte gap below this counts as balanced, whatever the mean (moving little data is not
    /// worth a snapshot).
    pub size_spread_bytes_min: u64,
    /// Leader transfers proposed in one round at most; one of them at most by the count rule
    /// (see "Leaders" in the module docs).
    pub leader_transfers_per_round_max: usize,
    /// Shards larger than this are suggested for a split.
    pub split_size_bytes_threshold: u64,
    /// Splits suggested in one round at most (by size and by load together).
    pub splits_per_round_max: usize,
    /// Shards whose leader serves more requests per second than this, for long enough that it
    /// names a split key ([`crate::load`]), are split at that key; 0: no load-based splits.
    pub load_split_requests_per_s: u64,
    /// A gap in request load between two nodes' led shards below this percentage of the mean
    /// load per node counts as balanced for leaders.
    pub leader_load_spread_percent: u64,
    /// A gap in request load below this (requests/s) counts as balanced, whatever the mean: a
    /// transfer costs an election's worth of unavailability for its shard.
    pub leader_load_spread_requests_per_s_min: u64,
    /// Copied into each plan: how many entries a learner may trail the leader and count as
    /// caught up.
    pub catch_up_lag_entries_max: u64,
    /// A shard moved less than this long ago is left alone (see "Hysteresis"). Capped by
    /// [`crate::MOVE_HISTORY_MS`], how long moves are remembered.
    pub shard_move_cooldown_ms: u64,
    /// Shards looked at, at most, when choosing which shard a node gives to another (in key
    /// order): bounds the cost of a round on nodes with very many shards, at the price of a
    /// choice that is only the best among those looked at.
    pub candidates_scanned_max: usize,
    /// Neighbours whose sizes add up to less than this are merged (see "Merges"); 0: no
    /// automatic merges. Merges also need the sum to be at most half
    /// `split_size_bytes_threshold`, so a merged shard is far from being split again.
    pub merge_size_bytes_threshold: u64,
    /// Neighbours whose leaders report more requests per second than this, together, are not
    /// merged (a busy shard is better served apart). Merges also need the sum to be at most
    /// half `load_split_requests_per_s`.
    pub merge_requests_per_s_max: u64,
    /// Merge plans in progress at most (each freezes a shard for a while, and its leader then
    /// copies the right shard's data).
    pub merges_at_once_max: usize,
    /// A merge still freezing this long after it began is aborted (its right shard's leader
    /// did not manage to freeze it: no leader, a lagging voter).
    pub merge_freeze_timeout_ms: u64,
}

/// The default of [`BalancerConfig::merge_size_bytes_threshold`]: as TiKV's
/// `max-merge-region-size` (20 MiB against a 96 to 144 MiB split size), a shard this small
/// costs a Raft group's traffic and memory for little data.
pub const MERGE_SIZE_BYTES_DEFAULT: u64 = 20 << 20;

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            moves_per_round_max: 8,
            moves_per_minute_max: 32,
            incoming_snapshots_per_node_max: 1,
            replica_count_spread_max: 1,
            size_spread_percent: 10,
            size_spread_bytes_min: 64 << 20,
            // Two: a load swap is two transfers (see "Leaders").
            leader_transfers_per_round_max: 2,
            split_size_bytes_threshold: 512 << 20,
            splits_per_round_max: 4,
            load_split_requests_per_s: 3_000,
            leader_load_spread_percent: 25,
            leader_load_spread_requests_per_s_min: 500,
            catch_up_lag_entries_max: 128,
            shard_move_cooldown_ms: 600_000,
            candidates_scanned_max: 1024,
            merge_size_bytes_threshold: MERGE_SIZE_BYTES_DEFAULT,
            // A tenth of the load-split rate: far from splitting again by load.
            merge_requests_per_s_max: 300,
            merges_at_once_max: 2,
            merge_freeze_timeout_ms: 30_000,
        }
    }
}

/// A proposed change, decided at the shard's `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// Start a replica move.
    Move {
        /// The shard's epoch when decided.
        epoch: Epoch,
        /// The plan, at its first step.
        plan: MovePlan,
    },
    /// Hand leadership of `shard` from `from` to the voter on `to`.
    TransferLeader {
        /// The shard.
        shard: ShardId,
        /// The shard's epoch when decided.
        epoch: Epoch,
        /// Current leader.
        from: NodeId,
        /// New leader.
        to: NodeId,
    },
    /// Split `shard` at `key` (strictly inside its range).
    Split {
        /// The shard.
        shard: ShardId,
        /// The shard's epoch when decided.
        epoch: Epoch,
        /// First key of the new right-hand shard.
        key: Vec<u8>,
    },
    /// Merge `right` into `left`, its left neighbour (see [`crate::merge`]).
    BeginMerge {
        /// The shard that stays.
        left: ShardId,
        /// Its epoch when decided.
        left_epoch: Epoch,
        /// The shard that goes.
        right: ShardId,
        /// Its epoch when decided.
        right_epoch: Epoch,
    },
    /// Give up the merge plan of `left`: it has been freezing longer than
    /// `merge_freeze_timeout_ms`.
    AbortMerge {
        /// The plan's left shard.
        left: ShardId,
        /// The plan's id.
        id: MergeId,
    },
}

impl Proposal {
    /// The meta command that carries the proposal out. `now_ms` stamps a move's or a merge's
    /// start: pass the time the round ran at, so the per-minute limit, the cool-down and the
    /// freeze timeout count from it.
    pub fn command(&self, now_ms: u64) -> MetaCommand {
        match self {
            Proposal::Move { epoch, plan } => MetaCommand::StartMove { epoch: *epoch, plan: plan.clone(), now_ms },
            Proposal::TransferLeader { shard, epoch, to, .. } => {
                MetaCommand::TransferLeader { shard: *shard, epoch: *epoch, node: *to }
            }
            Proposal::Split { shard, epoch, key } => {
                MetaCommand::Split { shard: *shard, epoch: *epoch, key: key.clone() }
            }
            Proposal::BeginMerge { left, left_epoch, right, right_epoch } => MetaCommand::BeginMerge {
                left: *left,
                left_epoch: *left_epoch,
                right: *right,
                right_epoch: *right_epoch,
                now_ms,
            },
            Proposal::AbortMerge { left, id } => MetaCommand::AbortMerge { left: *left, id: *id },
        }
    }
}

/// A node's projected load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Load {
    /// Replicas.
    count: usize,
    /// Bytes of its replicas' shards.
    bytes: u64,
}

/// A shard a node could give away, with its size.
#[derive(Clone, Copy, Debug)]
struct Candidate<'a> {
    d: &'a ShardDescriptor,
    bytes: u64,
}

/// A move accepted this round.
#[derive(Clone, Copy, Debug)]
struct Accepted {
    shard: ShardId,
    from: NodeId,
    to: NodeId,
    bytes: u64,
}

/// One round's working state.
struct Round<'a> {
    state: &'a MetaState,
    cfg: &'a BalancerConfig,
    /// Size of each shard anyone reported.
    sizes: HashMap<ShardId, u64>,
    /// Projected load of every node that is registered or holds a replica.
    load: BTreeMap<NodeId, Load>,
    /// Voter replicas per node, in key order (the shards a node can give away).
    voters_on: BTreeMap<NodeId, Vec<Candidate<'a>>>,
    /// Learners being fed per node: moves in progress plus moves accepted this round.
    incoming: BTreeMap<NodeId, usize>,
    /// Shards not to touch: moves in progress and moves accepted this round.
    busy: BTreeSet<ShardId>,
    /// Shards moved recently (still cooling down) -> the node each left.
    cooling: HashMap<ShardId, NodeId>,
    /// Shards of neighbours small and cold enough to merge ([`Round::merge_pairs`], by size
    /// and rate alone): the count and size rules leave them where they are (see "Merges").
    merge_bound: BTreeSet<ShardId>,
    /// Byte gap below which two nodes count as balanced.
    size_tolerance: u64,
    /// Moves this round may still make in all (round and minute limits).
    budget: usize,
    accepted: Vec<Accepted>,
}

/// One balancing round at time `now_ms` (see the module docs for what it guarantees).
pub fn balance(state: &MetaState, cfg: &BalancerConfig, now_ms: u64) -> Vec<Proposal> {
    let recent = state.recent_moves.iter().filter(|m| now_ms < m.started_ms.saturating_add(MOVE_WINDOW_MS)).count();
    let budget = cfg.moves_per_round_max.min(cfg.moves_per_minute_max.saturating_sub(recent));
    let mut r = Round::new(state, cfg, budget, now_ms);
    while r.accepted.len() < r.budget {
        if !(r.drain_move() || r.count_move() || r.size_move()) {
            break;
        }
    }
    let mut splits = r.splits();
    splits.extend(r.load_splits(&splits));
    let split: BTreeSet<ShardId> = splits
        .iter()
        .filter_map(|p| match p {
            Proposal::Split { shard, .. } => Some(*shard),
            _ => None,
        })
        .collect();
    // After the splits (a shard split this round is not merged) and before the moves are
    // turned into proposals (aligning moves are added to them).
    let merges = r.merges(&split);
    let aborts = r.merge_aborts(now_ms);
    let mut out: Vec<Proposal> = r
        .accepted
        .iter()
        .map(|m| {
            let d = state.map.get(m.shard).expect("chosen from the map");
            let leads = state.nodes.get(&m.from).is_some_and(|n| n.report.leading.contains(&m.shard));
            let leader = leads.then_some(m.to);
            Proposal::Move {
                epoch: d.epoch,
                plan: MovePlan::new(m.shard, m.from, m.to, leader, cfg.catch_up_lag_entries_max),
            }
        })
        .collect();
    let mut skip = r.busy.clone();
    skip.extend(split);
    skip.extend(merges.iter().flat_map(|p| match p {
        Proposal::BeginMerge { left, right, .. } => vec![*left, *right],
        _ => vec![],
    }));
    out.extend(leaders(state, cfg, &skip));
    out.extend(splits);
    out.extend(merges);
    out.extend(aborts);
    out
}

impl<'a> Round<'a> {
    fn new(state: &'a MetaState, cfg: &'a BalancerConfig, budget: usize, now_ms: u64) -> Round<'a> {
        let mut sizes: HashMap<ShardId, u64> = HashMap::new();
        for info in state.nodes.values() {
            for (s, b) in &info.report.shard_bytes {
                let e = sizes.entry(*s).or_default();
                *e = (*e).max(*b);
            }
        }
        let mut load: BTreeMap<NodeId, Load> = state.nodes.keys().map(|n| (*n, Load::default())).collect();
        let mut voters_on: BTreeMap<NodeId, Vec<Candidate>> = BTreeMap::new();
        for d in state.map.shards() {
            let z = sizes.get(&d.id).copied().unwrap_or(0);
            for rep in &d.replicas {
                let l = load.entry(rep.node).or_default();
                l.count += 1;
                l.bytes = l.bytes.saturating_add(z);
                if rep.role == ReplicaRole::Voter {
                    voters_on.entry(rep.node).or_default().push(Candidate { d, bytes: z });
                }
            }
        }
        let mut incoming: BTreeMap<NodeId, usize> = BTreeMap::new();
        // Shards in a merge plan keep their replicas and range (the meta state refuses moves
        // and splits of them), and their leaders stay put while the merge runs.
        let mut busy: BTreeSet<ShardId> = state.merges.values().flat_map(|p| [p.left, p.right]).collect();
        for (shard, plan) in &state.moves {
            busy.insert(*shard);
            let Some(d) = state.map.get(*shard) else { continue };
            let z = sizes.get(shard).copied().unwrap_or(0);
            // Project the move as done: the target holds a replica, the source does not.
            if d.replica(plan.to).is_none() {
                let l = load.entry(plan.to).or_default();
                l.count += 1;
                l.bytes = l.bytes.saturating_add(z);
            }
            if d.replica(plan.from).is_some() {
                let l = load.entry(plan.from).or_default();
                l.count = l.count.saturating_sub(1);
                l.bytes = l.bytes.saturating_sub(z);
            }
            if plan.step <= MoveStep::WaitCaughtUp {
                *incoming.entry(plan.to).or_default() += 1;
            }
        }
        // The latest recent move of each shard still cooling down: shard -> the node it left.
        let cooling: HashMap<ShardId, NodeId> = state
            .recent_moves
            .iter()
            .filter(|m| now_ms < m.started_ms.saturating_add(cfg.shard_move_cooldown_ms))
            .map(|m| (m.shard, m.from))
            .collect();
        let eligible: Vec<&Load> =
            load.iter().filter(|(n, _)| state.nodes.get(n).is_some_and(|i| !i.draining)).map(|(_, l)| l).collect();
        let mean = eligible.iter().map(|l| l.bytes as u128).sum::<u128>() / (eligible.len().max(1) as u128);
        let size_tolerance = cfg
            .size_spread_bytes_min
            .max(u64::try_from(mean * cfg.size_spread_percent as u128 / 100).unwrap_or(u64::MAX));
        let mut r = Round {
            state,
            cfg,
            sizes,
            load,
            voters_on,
            incoming,
            busy,
            cooling,
            merge_bound: BTreeSet::new(),
            size_tolerance,
            budget,
            accepted: Vec::new(),
        };
        r.merge_bound = r.merge_pairs(false).iter().flat_map(|p| [p.left.id, p.right.id]).collect();
        r
    }

    /// The count band (at least 1).
    fn band(&self) -> usize {
        self.cfg.replica_count_spread_max.max(1)
    }

    fn draining(&self, n: NodeId) -> bool {
        self.state.nodes.get(&n).is_some_and(|i| i.draining)
    }

    fn size(&self, shard: ShardId) -> u64 {
        self.sizes.get(&shard).copied().unwrap_or(0)
    }

    /// Nodes that may receive a replica now, emptiest (by count, then bytes) first.
    fn targets(&self, by_bytes: bool) -> Vec<(NodeId, Load)> {
        let mut t: Vec<(NodeId, Load)> = self
            .load
            .iter()
            .filter(|(n, _)| self.state.nodes.get(n).is_some_and(|i| !i.draining))
            .filter(|(n, _)| self.incoming.get(n).copied().unwrap_or(0) < self.cfg.incoming_snapshots_per_node_max)
            .map(|(n, l)| (*n, *l))
            .collect();
        if by_bytes {
            t.sort_by_key(|(n, l)| (l.bytes, l.count, *n));
        } else {
            t.sort_by_key(|(n, l)| (l.count, l.bytes, *n));
        }
        t
    }

    /// Whether the rules (ignoring limits) want shard of `bytes` moved from `from` to `to`
    /// under `load`.
    fn wants(&self, load: &BTreeMap<NodeId, Load>, from: NodeId, to: NodeId, bytes: u64) -> bool {
        if self.draining(to) || !self.state.nodes.contains_key(&to) {
            return false;
        }
        if self.draining(from) {
            return true;
        }
        let (f, t) = (load.get(&from).copied().unwrap_or_default(), load.get(&to).copied().unwrap_or_default());
        let band = self.band();
        let count_rule = f.count > t.count + band;
        let gap = f.bytes.saturating_sub(t.bytes);
        let size_rule = f.count > t.count
            && bytes > 0
            && gap > self.size_tolerance
            && bytes.checked_mul(2).is_some_and(|b2| b2 <= gap);
        count_rule || size_rule
    }

    /// Accepts the moves (one, or the two halves of a swap) if, on the loads after them, no
    /// move accepted this round (these included) would be wanted in reverse.
    fn try_accept(&mut self, legs: &[(&ShardDescriptor, NodeId, NodeId)]) -> bool {
        let mut after = self.load.clone();
        let mut new = Vec::new();
        for (d, from, to) in legs {
            let m = Accepted { shard: d.id, from: *from, to: *to, bytes: self.size(d.id) };
            let f = after.entry(m.from).or_default();
            f.count = f.count.saturating_sub(1);
            f.bytes = f.bytes.saturating_sub(m.bytes);
            let t = after.entry(m.to).or_default();
            t.count += 1;
            t.bytes = t.bytes.saturating_add(m.bytes);
            new.push(m);
        }
        if self.accepted.iter().chain(&new).any(|a| self.wants(&after, a.to, a.from, a.bytes)) {
            return false;
        }
        self.load = after;
        for m in new {
            *self.incoming.entry(m.to).or_default() += 1;
            self.busy.insert(m.shard);
            self.accepted.push(m);
        }
        true
    }

    /// Shards `from` can give to `to`: voters there, none on `to`, not busy, not cooling down
    /// (off a draining node: not going straight back where it came from). At most
    /// `candidates_scanned_max` of them, in key order: a bound on the cost of a round.
    fn candidates(&self, from: NodeId, to: NodeId) -> impl Iterator<Item = Candidate<'a>> + '_ {
        let draining = self.draining(from);
        let any_cooling = !self.cooling.is_empty();
        self.voters_on
            .get(&from)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |c| {
                let cool = !any_cooling
                    || match self.cooling.get(&c.d.id) {
                        None => true,
                        Some(left) => draining && *left != to,
                    };
                cool && (draining || !self.merge_bound.contains(&c.d.id))
                    && !self.busy.contains(&c.d.id)
                    && c.d.replica(to).is_none()
                    && c.d.replica(from).is_some()
            })
            .take(self.cfg.candidates_scanned_max.max(1))
    }

    /// The candidate whose move best evens out the pair's bytes (closest to half the gap).
    fn best_for_bytes(&self, from: NodeId, to: NodeId) -> Option<&'a ShardDescriptor> {
        if self.sizes.is_empty() {
            return self.candidates(from, to).next().map(|c| c.d); // nothing reported: any will do
        }
        let bytes = |n: NodeId| self.load.get(&n).copied().unwrap_or_default().bytes as i128;
        let (f, t) = (bytes(from), bytes(to));
        self.candidates(from, to).min_by_key(|c| (f - t - 2 * c.bytes as i128).abs()).map(|c| c.d)
    }

    /// A move off a draining node, if any can be made.
    fn drain_move(&mut self) -> bool {
        let sources: Vec<NodeId> =
            self.load.iter().filter(|(n, l)| l.count > 0 && self.draining(**n)).map(|(n, _)| *n).collect();
        for from in sources {
            for (to, _) in self.targets(false) {
                if let Some(d) = self.best_for_bytes(from, to) {
                    if self.try_accept(&[(d, from, to)]) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// A move from a node with too many replicas, if any can be made.
    fn count_move(&mut self) -> bool {
        let band = self.band();
        let mut sources: Vec<(NodeId, Load)> =
            self.load.iter().filter(|(n, _)| !self.draining(**n)).map(|(n, l)| (*n, *l)).collect();
        sources.sort_by_key(|(n, l)| (std::cmp::Reverse((l.count, l.bytes)), *n));
        let targets = self.targets(false);
        for (from, fl) in sources {
            for (to, tl) in &targets {
                if fl.count <= tl.count + band {
                    break; // every later target holds at least as many
                }
                if *to == from {
                    continue;
                }
                if let Some(d) = self.best_for_bytes(from, *to) {
                    if self.try_accept(&[(d, from, *to)]) {
                        return true;
                    }
                }
            }
            if targets.first().is_none_or(|(_, tl)| fl.count <= tl.count + band) {
                break; // later sources hold fewer
            }
        }
        false
    }

    /// A move (or, when the count band blocks a single move, a swap) from a node with too many
    /// bytes, if any can be made.
    fn size_move(&mut self) -> bool {
        let mut sources: Vec<(NodeId, Load)> =
            self.load.iter().filter(|(n, l)| l.bytes > 0 && !self.draining(**n)).map(|(n, l)| (*n, *l)).collect();
        sources.sort_by_key(|(n, l)| (std::cmp::Reverse(l.bytes), *n));
        let targets = self.targets(true);
        for (from, fl) in sources {
            for (to, tl) in &targets {
                let gap = fl.bytes.saturating_sub(tl.bytes);
                if gap <= self.size_tolerance {
                    break; // later targets hold more bytes
                }
                if *to == from {
                    continue;
                }
                if fl.count <= tl.count {
                    if self.swap(from, *to, gap) {
                        return true;
                    }
                    continue;
                }
                // The largest shard of at most half the gap.
                let pick = self
                    .candidates(from, *to)
                    .filter(|c| c.bytes > 0 && c.bytes.saturating_mul(2) <= gap)
                    .max_by_key(|c| (c.bytes, std::cmp::Reverse(c.d.id)))
                    .map(|c| c.d);
                if let Some(d) = pick {
                    if self.try_accept(&[(d, from, *to)]) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// A count-neutral swap: a big shard from `from` to `to` and the smallest shard of `to`
    /// back, the size difference at most half the byte gap. Used only when `from` holds no
    /// more replicas than `to`, which is also why neither half is wanted in reverse afterwards
    /// (a single size move of the small shard back would need `from` to hold more, and the
    /// big one would overshoot).
    fn swap(&mut self, from: NodeId, to: NodeId, gap: u64) -> bool {
        if self.accepted.len() + 2 > self.budget
            || self.incoming.get(&from).copied().unwrap_or(0) >= self.cfg.incoming_snapshots_per_node_max
        {
            return false;
        }
        let Some(small) = self.candidates(to, from).min_by_key(|c| (c.bytes, c.d.id)) else { return false };
        let big = self
            .candidates(from, to)
            .filter(|c| c.bytes > small.bytes && (c.bytes - small.bytes).saturating_mul(2) <= gap)
            .max_by_key(|c| (c.bytes, std::cmp::Reverse(c.d.id)));
        match big {
            Some(big) => self.try_accept(&[(big.d, from, to), (small.d, to, from)]),
            None => false,
        }
    }

    /// Split suggestions for shards over the threshold, largest first.
    fn splits(&self) -> Vec<Proposal> {
        let mut big: Vec<(u64, ShardId)> = self
            .sizes
            .iter()
            .filter(|(s, z)| **z > self.cfg.split_size_bytes_threshold && !self.busy.contains(s))
            .map(|(s, z)| (*z, *s))
            .collect();
        big.sort_by_key(|(z, s)| (std::cmp::Reverse(*z), *s));
        let mut out = Vec::new();
        for (_, shard) in big {
            if out.len() >= self.cfg.splits_per_round_max {
                break;
            }
            let Some(d) = self.state.map.get(shard) else { continue };
            if let Some(key) = self.split_key(d) {
                out.push(Proposal::Split { shard, epoch: d.epoch, key });
            }
        }
        out
    }

    /// Load-split suggestions after the size splits `taken`, within what is left of
    /// `splits_per_round_max`: shards whose leader reports at least `load_split_requests_per_s`
    /// and a split key strictly inside the range (named only once the shard stayed hot for
    /// long enough, [`crate::load`]), busiest first. A shard is split once per round at most:
    /// its epoch changes, so the leader's count of hot windows starts over.
    fn load_splits(&self, taken: &[Proposal]) -> Vec<Proposal> {
        let threshold = self.cfg.load_split_requests_per_s;
        let room = self.cfg.splits_per_round_max.saturating_sub(taken.len());
        if threshold == 0 || room == 0 {
            return Vec::new();
        }
        let split: BTreeSet<ShardId> = taken
            .iter()
            .filter_map(|p| match p {
                Proposal::Split { shard, .. } => Some(*shard),
                _ => None,
            })
            .collect();
        let mut hot: Vec<(u64, ShardId, Epoch, &Vec<u8>)> = Vec::new();
        for info in self.state.nodes.values() {
            for (s, load) in &info.report.shard_load {
                let Some(key) = load.split_key.as_ref() else { continue };
                // Sampled over the range the map has now: a load of another epoch (a report
                // sent before a split, received after it) named a key for the old range.
                let current = self.state.map.get(*s).is_some_and(|d| d.epoch == load.epoch);
                if load.requests_per_s >= threshold
                    && current
                    && info.report.leading.contains(s)
                    && !self.busy.contains(s)
                    && !split.contains(s)
                {
                    hot.push((load.requests_per_s, *s, load.epoch, key));
                }
            }
        }
        hot.sort_by_key(|(rate, s, _, _)| (std::cmp::Reverse(*rate), *s));
        hot.dedup_by_key(|(_, s, _, _)| *s);
        hot.into_iter()
            .filter_map(|(_, shard, epoch, key)| {
                let d = self.state.map.get(shard)?;
                let inside = key.as_slice() > d.start.as_slice() && d.contains(key);
                // At the epoch the key was sampled at: should the map move on before the
                // command applies, the command is refused rather than applied to a new range.
                inside.then(|| Proposal::Split { shard, epoch, key: key.clone() })
            })
            .take(room)
            .collect()
    }

    /// The split key a replica reported (the leader's first), if strictly inside the range.
    fn split_key(&self, d: &ShardDescriptor) -> Option<Vec<u8>> {
        let inside = |k: &Vec<u8>| k.as_slice() > d.start.as_slice() && d.contains(k);
        let reported =
            |n: &NodeId| self.state.nodes.get(n).and_then(|i| i.report.split_keys.get(&d.id)).filter(|k| inside(k));
        let mut nodes: Vec<NodeId> = d.replicas.iter().map(|r| r.node).collect();
        nodes.sort_by_key(|n| (!self.state.nodes.get(n).is_some_and(|i| i.report.leading.contains(&d.id)), *n));
        nodes.iter().find_map(reported).cloned()
    }
}

/// Leader transfers: by count first, then by load (see "Leaders" in the module docs).
fn leaders(state: &MetaState, cfg: &BalancerConfig, skip: &BTreeSet<ShardId>) -> Vec<Proposal> {
    let mut r = LeaderRound::new(state, cfg, skip);
    let mut out = Vec::new();
    // One count transfer a round at most: the limit is two for a load swap's two legs, not to
    // double how fast counts churn.
    let mut counted = false;
    while out.len() < cfg.leader_transfers_per_round_max {
        let room = cfg.leader_transfers_per_round_max - out.len();
        let mut legs = None;
        if !counted {
            if let Some(c) = r.count_transfer() {
                counted = true;
                // Refused (the load rule would want it back): load transfers may still go.
                legs = r.try_accept(&c).then_some(c);
            }
        }
        let legs = match legs {
            Some(legs) => legs,
            None => match r.load_transfer(room) {
                Some(legs) if r.try_accept(&legs) => legs,
                _ => break,
            },
        };
        for (shard, from, to) in legs {
            let epoch = state.map.get(shard).expect("led shards are in the map").epoch;
            out.push(Proposal::TransferLeader { shard, epoch, from, to });
        }
    }
    out
}

/// One leader transfer: the shard, from, to.
type Leg = (ShardId, NodeId, NodeId);

/// One round's view of leadership: who leads what (pending transfers as done) and the request
/// load that comes with it.
struct LeaderRound<'a> {
    state: &'a MetaState,
    /// Shards not to touch (moves, splits of this round).
    skip: &'a BTreeSet<ShardId>,
    /// Shards each node leads, projected.
    led: BTreeMap<NodeId, Vec<ShardId>>,
    /// Requests per second of each shard, as its leader reported it (unreported: 0).
    shard_load: HashMap<ShardId, u64>,
    /// Each node's load: the requests per second over all the shards it leads, as it
    /// reported them (at least the sum of the busiest it listed one by one), projected: pending
    /// and accepted transfers move their shards' listed loads. Shards below the report's cut
    /// stay where they are counted; they are too cold to be worth a transfer.
    load: BTreeMap<NodeId, u64>,
    /// A load gap at or below this counts as balanced.
    tolerance: u64,
    /// Transfers accepted this round.
    moved: Vec<Leg>,
}

impl<'a> LeaderRound<'a> {
    fn new(state: &'a MetaState, cfg: &BalancerConfig, skip: &'a BTreeSet<ShardId>) -> LeaderRound<'a> {
        let mut leader_of: BTreeMap<ShardId, NodeId> = BTreeMap::new();
        let mut shard_load: HashMap<ShardId, u64> = HashMap::new();
        // Each node's reported total: every shard it leads, not only the busiest it lists.
        let mut load: BTreeMap<NodeId, u64> =
            state.nodes.iter().map(|(n, i)| (*n, i.report.led_requests_per_s)).collect();
        for (node, info) in &state.nodes {
            for s in &info.report.leading {
                if state.map.get(*s).and_then(|d| d.replica(*node)).is_some_and(|r| r.role == ReplicaRole::Voter) {
                    leader_of.insert(*s, *node);
                    if let Some(l) = info.report.shard_load.get(s) {
                        let e = shard_load.entry(*s).or_default();
                        *e = (*e).max(l.requests_per_s);
                    }
                }
            }
        }
        // A report without a total (or one below what it lists) counts what it lists.
        let mut listed: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (s, n) in &leader_of {
            let l = listed.entry(*n).or_default();
            *l = l.saturating_add(shard_load.get(s).copied().unwrap_or(0));
        }
        for (n, l) in listed {
            let e = load.entry(n).or_default();
            *e = (*e).max(l);
        }
        // Pending transfers as done: their shards' listed loads go with them.
        for (s, target) in state.transfers.iter().filter(|(s, _)| state.map.get(**s).is_some()) {
            let l = shard_load.get(s).copied().unwrap_or(0);
            let before = leader_of.insert(*s, *target);
            if before == Some(*target) {
                continue; // done and reported
            }
            if let Some(from) = before {
                let f = load.entry(from).or_default();
                *f = f.saturating_sub(l);
            }
            let t = load.entry(*target).or_default();
            *t = t.saturating_add(l);
        }
        let mut led: BTreeMap<NodeId, Vec<ShardId>> = state.nodes.keys().map(|n| (*n, Vec::new())).collect();
        for (s, n) in &leader_of {
            led.entry(*n).or_default().push(*s);
        }
        let eligible: Vec<u64> =
            load.iter().filter(|(n, _)| state.nodes.get(n).is_some_and(|i| !i.draining)).map(|(_, l)| *l).collect();
        let mean = eligible.iter().map(|l| *l as u128).sum::<u128>() / (eligible.len().max(1) as u128);
        let tolerance = cfg
            .leader_load_spread_requests_per_s_min
            .max(u64::try_from(mean * cfg.leader_load_spread_percent as u128 / 100).unwrap_or(u64::MAX));
        LeaderRound { state, skip, led, shard_load, load, tolerance, moved: Vec::new() }
    }

    fn count(&self, n: NodeId) -> usize {
        self.led.get(&n).map_or(0, Vec::len)
    }

    fn load_of(&self, n: NodeId) -> u64 {
        self.load.get(&n).copied().unwrap_or(0)
    }

    fn shard_load(&self, s: ShardId) -> u64 {
        self.shard_load.get(&s).copied().unwrap_or(0)
    }

    fn draining(&self, n: NodeId) -> bool {
        self.state.nodes.get(&n).is_some_and(|i| i.draining)
    }

    /// Shards `from` leads whose leadership may go to `to` this round: a voter there, no
    /// transfer pending or accepted, not skipped.
    fn movable(&self, from: NodeId, to: NodeId) -> impl Iterator<Item = ShardId> + '_ {
        self.led.get(&from).into_iter().flatten().copied().filter(move |s| {
            !self.skip.contains(s)
                && !self.state.transfers.contains_key(s)
                && !self.moved.iter().any(|m| m.0 == *s)
                && self.state.map.get(*s).and_then(|d| d.replica(to)).is_some_and(|r| r.role == ReplicaRole::Voter)
        })
    }

    /// The count rule: `from` leads at least two more shards than `to`.
    fn count_wants(&self, from: NodeId, to: NodeId) -> bool {
        self.count(from) >= self.count(to) + 2
    }

    /// Whether the load rule could send a shard of `load` requests/s from `from` to `to`, alone
    /// or as the hot half of a swap: the load gap is over the tolerance, and the shard moves
    /// at most half of it (never overshoots) and at least half the tolerance (worth two
    /// elections).
    fn load_wants(&self, from: NodeId, to: NodeId, load: u64) -> bool {
        let gap = self.load_of(from).saturating_sub(self.load_of(to));
        !self.draining(to) && gap > self.tolerance && self.worth(gap, load)
    }

    fn worth(&self, gap: u64, moved: u64) -> bool {
        moved.saturating_mul(2) <= gap && moved.saturating_mul(2) >= self.tolerance.max(1)
    }

    /// A transfer from the node leading the most shards to one leading at least two fewer:
    /// of the shards it can give, the one that best evens out the pair's load (the coldest
    /// when the target is the busier; first in key order among equals).
    fn count_transfer(&self) -> Option<Vec<Leg>> {
        let (max, max_n) =
            self.led.iter().max_by_key(|(n, v)| (v.len(), std::cmp::Reverse(**n))).map(|(n, v)| (*n, v.len()))?;
        let mut mins: Vec<(NodeId, usize)> =
            self.led.iter().filter(|(n, _)| !self.draining(**n)).map(|(n, v)| (*n, v.len())).collect();
        mins.sort_by_key(|(n, c)| (*c, *n));
        mins.iter().take_while(|(_, c)| max_n >= c + 2).find_map(|(min, _)| {
            let gap = self.load_of(max) as i128 - self.load_of(*min) as i128;
            let s = self.movable(max, *min).min_by_key(|s| (gap - 2 * self.shard_load(*s) as i128).abs())?;
            Some(vec![(s, max, *min)])
        })
    }

    /// A transfer that evens out load, from the node whose led shards take the most requests
    /// to a less loaded one, while the gap is over the tolerance: the hottest shard of at most
    /// half the gap when the target leads fewer shards; otherwise, with room for two
    /// transfers, a swap of such a shard for the target's coldest one, counts unchanged. Either
    /// must move at least half the tolerance.
    fn load_transfer(&self, room: usize) -> Option<Vec<Leg>> {
        let (from, from_load) = self.load.iter().max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))?;
        let (from, from_load) = (*from, *from_load);
        let mut targets: Vec<(NodeId, u64)> =
            self.load.iter().filter(|(n, _)| **n != from && !self.draining(**n)).map(|(n, l)| (*n, *l)).collect();
        targets.sort_by_key(|(n, l)| (*l, *n));
        for (to, to_load) in targets {
            let gap = from_load - to_load;
            if gap <= self.tolerance {
                break; // later targets carry more
            }
            let hottest_under = |floor: u64| {
                self.movable(from, to)
                    .filter(|s| self.shard_load(*s) > floor && self.worth(gap, self.shard_load(*s) - floor))
                    .max_by_key(|s| (self.shard_load(*s), std::cmp::Reverse(*s)))
            };
            if self.count(to) < self.count(from) {
                if let Some(s) = hottest_under(0) {
                    return Some(vec![(s, from, to)]);
                }
            } else if room >= 2 {
                let Some(cold) = self.movable(to, from).min_by_key(|s| (self.shard_load(*s), *s)) else { continue };
                if let Some(s) = hottest_under(self.shard_load(cold)) {
                    return Some(vec![(s, from, to), (cold, to, from)]);
                }
            }
        }
        None
    }

    fn shift(&mut self, (s, from, to): Leg) {
        let l = self.shard_load(s);
        if let Some(v) = self.led.get_mut(&from) {
            v.retain(|x| *x != s);
        }
        self.led.entry(to).or_default().push(s);
        let f = self.load.entry(from).or_default();
        *f = f.saturating_sub(l);
        let t = self.load.entry(to).or_default();
        *t = t.saturating_add(l);
    }

    /// Accepts `legs` unless, after them, a transfer of this round (these included) would be
    /// wanted in reverse by either rule (by the load rule alone or in a swap): the same
    /// hysteresis as for moves. A count transfer refused because the load rule would send it
    /// back is the round's count transfer: load transfers may still follow.
    fn try_accept(&mut self, legs: &[Leg]) -> bool {
        for leg in legs {
            self.shift(*leg);
        }
        let reverse = |m: &Leg| self.count_wants(m.2, m.1) || self.load_wants(m.2, m.1, self.shard_load(m.0));
        if self.moved.iter().chain(legs).any(reverse) {
            for (s, from, to) in legs.iter().rev() {
                self.shift((*s, *to, *from));
            }
            return false;
        }
        self.moved.extend_from_slice(legs);
        true
    }
}
