//! The balancer converges from skewed maps within bounded rounds, respects its limits, never
//! puts two replicas of a shard on one node, and is stable once balanced.

use flotilla_placement::*;
use std::collections::BTreeMap;

fn n(i: u64) -> NodeId {
    NodeId(i)
}

/// A map of `shards` shards, all on nodes 1..=3, with `nodes` nodes registered.
fn skewed(nodes: u64, shards: u64) -> MetaState {
    let mut s = MetaState::default();
    for i in 1..=nodes {
        s.apply(MetaCommand::RegisterNode { node: n(i), addr: String::new() }).expect("register");
    }
    s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
    for i in 1..shards {
        let last = s.map.lookup(&[0xff; 8]).expect("shard").clone();
        s.apply(MetaCommand::Split { shard: last.id, epoch: last.epoch, key: (i * 10).to_be_bytes().to_vec() })
            .expect("split");
    }
    s
}

/// Carries out a move the way a plan would: add learner, promote, remove the old replica.
fn execute(s: &mut MetaState, p: &Proposal) {
    if let Proposal::MoveReplica { shard, from, to } = p {
        let ep = |s: &MetaState| s.map.get(*shard).expect("shard").epoch;
        s.apply(MetaCommand::AddLearner { shard: *shard, epoch: ep(s), node: *to }).expect("add learner");
        s.apply(MetaCommand::Promote { shard: *shard, epoch: ep(s), node: *to }).expect("promote");
        s.apply(MetaCommand::RemoveReplica { shard: *shard, epoch: ep(s), node: *from }).expect("remove");
    }
}

fn counts(s: &MetaState) -> BTreeMap<NodeId, usize> {
    let mut c: BTreeMap<NodeId, usize> = s.nodes.keys().map(|k| (*k, 0)).collect();
    for d in s.map.shards() {
        for r in &d.replicas {
            *c.entry(r.node).or_default() += 1;
        }
    }
    c
}

/// Runs rounds until the balancer proposes nothing; returns the rounds taken.
fn converge(s: &mut MetaState, cfg: &BalancerConfig, rounds_max: usize) -> usize {
    for round in 0..rounds_max {
        let props = balance(s, cfg);
        let moves: Vec<_> = props.iter().filter(|p| matches!(p, Proposal::MoveReplica { .. })).collect();
        if moves.is_empty() {
            return round;
        }
        assert!(moves.len() <= cfg.moves_per_round_max, "round limit");
        let mut incoming: BTreeMap<NodeId, usize> = BTreeMap::new();
        for p in &moves {
            if let Proposal::MoveReplica { to, shard, .. } = p {
                *incoming.entry(*to).or_default() += 1;
                assert!(!s.nodes[to].draining, "never onto a draining node");
                assert!(s.map.get(*shard).expect("shard").replica(*to).is_none(), "two replicas on one node");
            }
        }
        assert!(incoming.values().all(|v| *v <= cfg.incoming_snapshots_per_node_max), "one incoming snapshot per node");
        for p in moves {
            execute(s, p);
        }
        s.map.validate().expect("map invariant");
    }
    panic!("did not converge within {rounds_max} rounds");
}

#[test]
fn a_new_empty_node_gets_its_share() {
    let mut s = skewed(4, 40); // 120 replicas on 3 nodes, node 4 empty
    let cfg = BalancerConfig::default();
    let rounds = converge(&mut s, &cfg, 100);
    let c = counts(&s);
    let (min, max) = (c.values().min().copied().unwrap_or(0), c.values().max().copied().unwrap_or(0));
    assert!(max - min <= 1, "balanced: {c:?}");
    assert_eq!(c.values().sum::<usize>(), 120, "replicas are moved, not lost or added");
    // One snapshot into node 4 per round: 30 replicas need 30 rounds.
    assert!((30..=31).contains(&rounds), "{rounds} rounds");
    assert!(balance(&s, &cfg).iter().all(|p| !matches!(p, Proposal::MoveReplica { .. })), "stable once balanced");
}

#[test]
fn many_new_nodes_are_filled_in_parallel_within_the_round_limit() {
    let mut s = skewed(9, 60); // 180 replicas on 3 of 9 nodes
    let cfg = BalancerConfig { moves_per_round_max: 4, incoming_snapshots_per_node_max: 1 };
    let rounds = converge(&mut s, &cfg, 200);
    let c = counts(&s);
    assert!(c.values().max().copied().unwrap_or(0) - c.values().min().copied().unwrap_or(0) <= 1, "{c:?}");
    assert!(rounds <= 120 / 4 + 1, "{rounds} rounds for 120 moves at 4 per round");
}

#[test]
fn a_draining_node_is_emptied() {
    let mut s = skewed(5, 20);
    let cfg = BalancerConfig::default();
    converge(&mut s, &cfg, 200);
    s.apply(MetaCommand::SetDraining { node: n(1), draining: true }).expect("drain");
    converge(&mut s, &cfg, 200);
    assert_eq!(counts(&s)[&n(1)], 0, "everything moved off the draining node");
    let c = counts(&s);
    let rest: Vec<usize> = c.iter().filter(|(k, _)| **k != n(1)).map(|(_, v)| *v).collect();
    assert!(rest.iter().max().unwrap_or(&0) - rest.iter().min().unwrap_or(&0) <= 1, "{c:?}");
}

#[test]
fn leaders_are_spread_across_voters() {
    let mut s = skewed(3, 9);
    // Node 1 leads everything.
    let all: Vec<ShardId> = s.map.shards().map(|d| d.id).collect();
    s.apply(MetaCommand::Heartbeat { node: n(1), report: NodeReport { leading: all, ..Default::default() } })
        .expect("hb");
    let props = balance(&s, &BalancerConfig::default());
    let transfers: Vec<_> = props.iter().filter(|p| matches!(p, Proposal::TransferLeader { .. })).collect();
    assert_eq!(transfers.len(), 1, "one transfer per round: {props:?}");
    assert!(matches!(transfers[0], Proposal::TransferLeader { from, to, .. } if *from == n(1) && *to != n(1)));
    // Balanced leaders: nothing to do.
    for (i, node) in [1, 2, 3].into_iter().enumerate() {
        let leading: Vec<ShardId> = s.map.shards().skip(i * 3).take(3).map(|d| d.id).collect();
        s.apply(MetaCommand::Heartbeat { node: n(node), report: NodeReport { leading, ..Default::default() } })
            .expect("hb");
    }
    assert!(balance(&s, &BalancerConfig::default()).is_empty());
}
