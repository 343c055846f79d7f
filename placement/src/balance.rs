//! The balancer: from the shard map and the nodes' reports, proposes replica moves that even
//! out replica counts per node (and empty draining nodes), and leader transfers that even out
//! leader counts. Pure: it only proposes; the node carries proposals out as plans.
//!
//! Guarantees, each tested:
//! - never two replicas of a shard on one node, never a move onto a draining node;
//! - at most `moves_per_round_max` moves per round and at most
//!   `incoming_snapshots_per_node_max` moves into one node (each new replica is fed by a
//!   snapshot);
//! - a move only goes from a node with at least two more replicas than its target (or from a
//!   draining node), so it never undoes an earlier move and proposes nothing once balanced.
//!
//! Not built yet: balancing by data size, split suggestions, moves per minute.

use crate::map::{NodeId, ReplicaRole, ShardId};
use crate::meta::MetaState;
use std::collections::BTreeMap;

/// Limits of one balancing round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalancerConfig {
    /// Moves proposed in one round at most.
    pub moves_per_round_max: usize,
    /// Moves into one node in one round at most (one snapshot at a time by default).
    pub incoming_snapshots_per_node_max: usize,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig { moves_per_round_max: 8, incoming_snapshots_per_node_max: 1 }
    }
}

/// A proposed change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// Move the replica of `shard` on `from` to `to` (add learner, catch up, promote, remove).
    MoveReplica {
        /// The shard.
        shard: ShardId,
        /// Current node.
        from: NodeId,
        /// New node.
        to: NodeId,
    },
    /// Hand leadership of `shard` from `from` to the voter on `to`.
    TransferLeader {
        /// The shard.
        shard: ShardId,
        /// Current leader.
        from: NodeId,
        /// New leader.
        to: NodeId,
    },
}

/// One balancing round.
pub fn balance(state: &MetaState, cfg: &BalancerConfig) -> Vec<Proposal> {
    let mut out = Vec::new();
    // Replica counts per registered node.
    let mut count: BTreeMap<NodeId, usize> = state.nodes.keys().map(|n| (*n, 0)).collect();
    for d in state.map.shards() {
        for r in &d.replicas {
            *count.entry(r.node).or_default() += 1;
        }
    }
    let draining = |n: &NodeId| state.nodes.get(n).is_some_and(|i| i.draining);
    let mut incoming: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut moved: Vec<ShardId> = Vec::new();
    while out.len() < cfg.moves_per_round_max {
        // Source: a draining node with replicas first, else the fullest node.
        let source = count.iter().filter(|(n, c)| **c > 0 && draining(n)).map(|(n, c)| (*n, *c)).next().or_else(|| {
            count
                .iter()
                .filter(|(n, _)| !draining(n))
                .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
                .map(|(n, c)| (*n, *c))
        });
        let Some((from, from_count)) = source else { break };
        // Target: the emptiest node that can take one more snapshot this round and lacks a
        // shard of `from` (not already moved this round).
        let mut targets: Vec<(NodeId, usize)> = count
            .iter()
            .filter(|(n, _)| **n != from && !draining(n))
            .filter(|(n, _)| incoming.get(n).copied().unwrap_or(0) < cfg.incoming_snapshots_per_node_max)
            .map(|(n, c)| (*n, *c))
            .collect();
        targets.sort_by_key(|(n, c)| (*c, *n));
        let pick = targets.into_iter().find_map(|(to, to_count)| {
            if !draining(&from) && from_count < to_count + 2 {
                return None; // balanced against this target (and every later one is fuller)
            }
            state
                .map
                .shards()
                .find(|d| d.replica(from).is_some() && d.replica(to).is_none() && !moved.contains(&d.id))
                .map(|d| (d.id, to))
        });
        let Some((shard, to)) = pick else { break };
        out.push(Proposal::MoveReplica { shard, from, to });
        moved.push(shard);
        *count.entry(from).or_default() -= 1;
        *count.entry(to).or_default() += 1;
        *incoming.entry(to).or_default() += 1;
    }
    out.extend(balance_leaders(state, &moved));
    out
}

/// Leader transfers from the node leading the most shards to voters on the node leading the
/// fewest, while the difference is at least two.
fn balance_leaders(state: &MetaState, skip: &[ShardId]) -> Vec<Proposal> {
    let mut leaders: BTreeMap<NodeId, Vec<ShardId>> = state.nodes.keys().map(|n| (*n, Vec::new())).collect();
    for (node, info) in &state.nodes {
        for s in &info.report.leading {
            if state.map.get(*s).is_some() {
                leaders.entry(*node).or_default().push(*s);
            }
        }
    }
    let mut out = Vec::new();
    let (Some(max), Some(min)) = (
        leaders.iter().max_by_key(|(n, v)| (v.len(), std::cmp::Reverse(**n))).map(|(n, v)| (*n, v.len())),
        leaders
            .iter()
            .filter(|(n, _)| !state.nodes[n].draining)
            .min_by_key(|(n, v)| (v.len(), **n))
            .map(|(n, v)| (*n, v.len())),
    ) else {
        return out;
    };
    if max.1 < min.1 + 2 {
        return out;
    }
    for s in &leaders[&max.0] {
        let Some(d) = state.map.get(*s) else { continue };
        if skip.contains(s) {
            continue;
        }
        if d.replica(min.0).is_some_and(|r| r.role == ReplicaRole::Voter) {
            out.push(Proposal::TransferLeader { shard: *s, from: max.0, to: min.0 });
            break;
        }
    }
    out
}
