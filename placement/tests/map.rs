//! The shard map and the meta state machine: unit cases and property tests against a naive
//! model.

use flotilla_placement::*;
use proptest::prelude::*;

fn n(i: u64) -> NodeId {
    NodeId(i)
}

fn registered(nodes: &[u64]) -> MetaState {
    let mut s = MetaState::default();
    for i in nodes {
        s.apply(MetaCommand::RegisterNode { node: n(*i), addr: format!("10.0.0.{i}:7000") }).expect("register");
    }
    s
}

fn bootstrapped() -> MetaState {
    let mut s = registered(&[1, 2, 3, 4]);
    s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
    s
}

#[test]
fn bootstrap_covers_the_keyspace_once() {
    let mut s = bootstrapped();
    assert_eq!(s.map.len(), 1);
    assert_eq!(s.map.lookup(b"").map(|d| d.id), Some(ShardId(1)));
    assert_eq!(s.map.lookup(b"\xff\xff").map(|d| d.id), Some(ShardId(1)));
    assert_eq!(s.apply(MetaCommand::Bootstrap { nodes: vec![n(1)] }), Err(MetaError::AlreadyBootstrapped));
    let mut fresh = registered(&[1]);
    assert_eq!(fresh.apply(MetaCommand::Bootstrap { nodes: vec![n(9)] }), Err(MetaError::UnknownNode(n(9))));
    assert!(fresh.map.is_empty(), "a refused command changes nothing");
}

#[test]
fn split_bumps_version_on_both_halves_and_refuses_bad_keys() {
    let mut s = bootstrapped();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    let out = s.apply(MetaCommand::Split { shard: ShardId(1), epoch: e, key: b"m".to_vec() }).expect("split");
    let MetaOutcome::Shards(ds) = out else { panic!("shards expected") };
    assert_eq!(ds.len(), 2);
    assert!(ds.iter().all(|d| d.epoch.version == e.version + 1 && d.epoch.conf_version == e.conf_version));
    assert_eq!(s.map.lookup(b"a").map(|d| d.id), Some(ShardId(1)));
    assert_eq!(s.map.lookup(b"m").map(|d| d.id), Some(ShardId(2)));
    assert_eq!(s.map.lookup(b"z").map(|d| d.id), Some(ShardId(2)));
    // The old epoch is stale now; the split key must be strictly inside.
    let before = s.clone();
    assert!(matches!(
        s.apply(MetaCommand::Split { shard: ShardId(1), epoch: e, key: b"c".to_vec() }),
        Err(MetaError::StaleEpoch { .. })
    ));
    let e1 = s.map.get(ShardId(1)).expect("shard").epoch;
    assert_eq!(
        s.apply(MetaCommand::Split { shard: ShardId(1), epoch: e1, key: b"m".to_vec() }),
        Err(MetaError::SplitKeyOutsideRange(ShardId(1)))
    );
    assert_eq!(
        s.apply(MetaCommand::Split { shard: ShardId(1), epoch: e1, key: Vec::new() }),
        Err(MetaError::SplitKeyOutsideRange(ShardId(1)))
    );
    assert_eq!(s, before, "refused commands change nothing");
    s.map.validate().expect("invariant");
}

#[test]
fn routing_checks_name_what_changed() {
    let mut s = bootstrapped();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    assert!(s.map.check_route(ShardId(1), e, b"k").is_ok());
    s.apply(MetaCommand::Split { shard: ShardId(1), epoch: e, key: b"m".to_vec() }).expect("split");
    match s.map.check_route(ShardId(1), e, b"a") {
        Err(RouteError::StaleEpoch { current }) => assert_eq!(current.end.as_deref(), Some(&b"m"[..])),
        other => panic!("expected stale epoch, got {other:?}"),
    }
    match s.map.check_route(ShardId(1), e, b"x") {
        Err(RouteError::WrongShard { owner }) => assert_eq!(owner.id, ShardId(2)),
        other => panic!("expected wrong shard, got {other:?}"),
    }
    assert_eq!(s.map.check_route(ShardId(77), e, b"x").err(), Some(RouteError::UnknownShard(ShardId(77))));
}

#[test]
fn replica_changes_bump_conf_version_and_are_checked() {
    let mut s = bootstrapped();
    let sh = ShardId(1);
    let ep = |s: &MetaState| s.map.get(sh).expect("shard").epoch;
    let e = ep(&s);
    s.apply(MetaCommand::AddLearner { shard: sh, epoch: e, node: n(4) }).expect("learner");
    assert_eq!(ep(&s).conf_version, e.conf_version + 1);
    assert_eq!(ep(&s).version, e.version);
    assert_eq!(
        s.apply(MetaCommand::AddLearner { shard: sh, epoch: ep(&s), node: n(4) }),
        Err(MetaError::ReplicaExists { shard: sh, node: n(4) })
    );
    assert_eq!(
        s.apply(MetaCommand::AddLearner { shard: sh, epoch: ep(&s), node: n(9) }),
        Err(MetaError::UnknownNode(n(9)))
    );
    assert_eq!(
        s.apply(MetaCommand::Promote { shard: sh, epoch: ep(&s), node: n(1) }),
        Err(MetaError::NoSuchReplica { shard: sh, node: n(1) })
    );
    s.apply(MetaCommand::Promote { shard: sh, epoch: ep(&s), node: n(4) }).expect("promote");
    for node in [1, 2, 3] {
        s.apply(MetaCommand::RemoveReplica { shard: sh, epoch: ep(&s), node: n(node) }).expect("remove");
    }
    assert_eq!(
        s.apply(MetaCommand::RemoveReplica { shard: sh, epoch: ep(&s), node: n(4) }),
        Err(MetaError::LastVoter(sh))
    );
    assert_eq!(s.map.get(sh).expect("shard").voters().collect::<Vec<_>>(), vec![n(4)]);
}

#[test]
fn leader_transfer_requests_wait_for_the_target_to_report_leading() {
    let mut s = bootstrapped();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    assert_eq!(
        s.apply(MetaCommand::TransferLeader { shard: ShardId(1), epoch: e, node: n(4) }),
        Err(MetaError::NoSuchReplica { shard: ShardId(1), node: n(4) }),
        "only a voter can lead"
    );
    s.apply(MetaCommand::TransferLeader { shard: ShardId(1), epoch: e, node: n(2) }).expect("transfer");
    assert_eq!(s.transfers.get(&ShardId(1)), Some(&n(2)));
    let report = |leading: Vec<ShardId>| NodeReport { leading, ..Default::default() };
    s.apply(MetaCommand::Heartbeat { node: n(1), report: report(vec![ShardId(1)]) }).expect("hb");
    assert_eq!(s.transfers.get(&ShardId(1)), Some(&n(2)), "another node leading does not complete it");
    s.apply(MetaCommand::Heartbeat { node: n(2), report: report(vec![ShardId(1)]) }).expect("hb");
    assert!(s.transfers.is_empty());
}

#[test]
fn snapshot_restores_the_same_state_and_rejects_garbage() {
    let mut s = bootstrapped();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::Split { shard: ShardId(1), epoch: e, key: b"g".to_vec() }).expect("split");
    let bytes = s.snapshot().expect("snapshot");
    assert_eq!(MetaState::restore(&bytes).expect("restore"), s);
    assert!(MetaState::restore(&bytes[..bytes.len() / 2]).is_err());
}

#[test]
fn a_leader_transfer_to_a_node_losing_its_vote_is_forgotten() {
    let mut s = bootstrapped();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::TransferLeader { shard: ShardId(1), epoch: e, node: n(2) }).expect("transfer");
    // Removing another replica leaves the request alone.
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    assert_eq!(s.transfers.get(&ShardId(1)), Some(&n(2)));
    // Demoting the target drops it: a learner cannot take the lead.
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::AddLearner { shard: ShardId(1), epoch: e, node: n(4) }).expect("learner");
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::SwapVoter { shard: ShardId(1), epoch: e, promote: n(4), demote: n(2) }).expect("swap");
    assert!(s.transfers.is_empty());
    // So does removing it.
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::TransferLeader { shard: ShardId(1), epoch: e, node: n(4) }).expect("transfer");
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(4) }).expect("remove");
    assert!(s.transfers.is_empty());
}

#[test]
fn a_snapshot_whose_moves_do_not_match_the_map_is_refused() {
    let mut s = bootstrapped();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::StartMove { epoch: e, plan: MovePlan::new(ShardId(1), n(1), n(4), None, 1), now_ms: 0 })
        .expect("start");
    let good = s.clone();
    assert_eq!(MetaState::restore(&good.snapshot().expect("snapshot")).expect("restore"), good);
    // Recorded under another shard than its own.
    let mut wrong_key = good.clone();
    let mut plan = wrong_key.moves.remove(&ShardId(1)).expect("plan");
    plan.shard = ShardId(7);
    wrong_key.moves.insert(ShardId(1), plan);
    assert!(MetaState::restore(&wrong_key.snapshot().expect("snapshot")).is_err());
    // For a shard the map does not have.
    let mut unknown = good.clone();
    let mut plan = unknown.moves.remove(&ShardId(1)).expect("plan");
    plan.shard = ShardId(7);
    unknown.moves.insert(ShardId(7), plan);
    assert!(MetaState::restore(&unknown.snapshot().expect("snapshot")).is_err());
}

#[derive(Clone, Debug)]
enum Step {
    Split { pick: usize, key: Vec<u8> },
    AddLearner { pick: usize, node: u64 },
    Promote { pick: usize, node: u64 },
    Remove { pick: usize, node: u64 },
    Stale { pick: usize },
}

fn step() -> impl Strategy<Value = Step> {
    let key = prop::collection::vec(any::<u8>(), 0..4);
    prop_oneof![
        (any::<usize>(), key).prop_map(|(pick, key)| Step::Split { pick, key }),
        (any::<usize>(), 1..7u64).prop_map(|(pick, node)| Step::AddLearner { pick, node }),
        (any::<usize>(), 1..7u64).prop_map(|(pick, node)| Step::Promote { pick, node }),
        (any::<usize>(), 1..7u64).prop_map(|(pick, node)| Step::Remove { pick, node }),
        any::<usize>().prop_map(|pick| Step::Stale { pick }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// After any sequence of commands: the ranges never overlap and cover the keyspace, epochs
    /// only grow, and lookups agree with a naive scan over all shards.
    #[test]
    fn the_map_stays_consistent_under_any_commands(steps in prop::collection::vec(step(), 1..60), probes in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 1..20)) {
        let mut s = registered(&[1, 2, 3, 4, 5, 6]);
        s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
        let mut seen: std::collections::BTreeMap<ShardId, Epoch> = Default::default();
        for st in steps {
            let ids: Vec<ShardId> = s.map.shards().map(|d| d.id).collect();
            let pick = |p: usize| ids[p % ids.len()];
            let before = s.clone();
            let cmd = match st {
                Step::Split { pick: p, key } => { let d = s.map.get(pick(p)).expect("shard"); MetaCommand::Split { shard: d.id, epoch: d.epoch, key } }
                Step::AddLearner { pick: p, node } => { let d = s.map.get(pick(p)).expect("shard"); MetaCommand::AddLearner { shard: d.id, epoch: d.epoch, node: n(node) } }
                Step::Promote { pick: p, node } => { let d = s.map.get(pick(p)).expect("shard"); MetaCommand::Promote { shard: d.id, epoch: d.epoch, node: n(node) } }
                Step::Remove { pick: p, node } => { let d = s.map.get(pick(p)).expect("shard"); MetaCommand::RemoveReplica { shard: d.id, epoch: d.epoch, node: n(node) } }
                Step::Stale { pick: p } => { let d = s.map.get(pick(p)).expect("shard"); let mut e = d.epoch; e.version = e.version.saturating_sub(1); MetaCommand::Split { shard: d.id, epoch: Epoch { conf_version: e.conf_version, version: e.version }, key: b"zz".to_vec() } }
            };
            if s.apply(cmd).is_err() {
                prop_assert_eq!(&s, &before, "a refused command changed the state");
            }
            prop_assert!(s.map.validate().is_ok(), "{:?}", s.map.validate());
            for d in s.map.shards() {
                if let Some(old) = seen.get(&d.id) {
                    prop_assert!(d.epoch.version >= old.version && d.epoch.conf_version >= old.conf_version);
                }
                seen.insert(d.id, d.epoch);
            }
        }
        for key in probes {
            let naive: Vec<ShardId> = s.map.shards().filter(|d| d.contains(&key)).map(|d| d.id).collect();
            prop_assert_eq!(naive.len(), 1, "exactly one shard holds each key");
            prop_assert_eq!(s.map.lookup(&key).map(|d| d.id), Some(naive[0]));
        }
        // Range lookups return exactly the overlapping shards, in order.
        let all: Vec<ShardId> = s.map.lookup_range(b"", None).map(|d| d.id).collect();
        prop_assert_eq!(all.len(), s.map.len());
    }
}

#[derive(Clone, Debug)]
enum Op {
    Split { pick: usize, key: Vec<u8> },
    StartMove { pick: usize, from: usize, to: u64, lead: bool },
    Advance { pick: usize },
    CatchUp { pick: usize },
    Abort { pick: usize },
    ByHand { pick: usize, node: u64, kind: u8 },
    Register { node: u64 },
    Drain { node: u64, on: bool },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<usize>(), prop::collection::vec(any::<u8>(), 0..4)).prop_map(|(pick, key)| Op::Split { pick, key }),
        3 => (any::<usize>(), any::<usize>(), 1..9u64, any::<bool>()).prop_map(|(pick, from, to, lead)| Op::StartMove { pick, from, to, lead }),
        6 => any::<usize>().prop_map(|pick| Op::Advance { pick }),
        2 => any::<usize>().prop_map(|pick| Op::CatchUp { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Abort { pick }),
        2 => (any::<usize>(), 1..9u64, 0..4u8).prop_map(|(pick, node, kind)| Op::ByHand { pick, node, kind }),
        1 => (7..9u64).prop_map(|node| Op::Register { node }),
        1 => (1..9u64, any::<bool>()).prop_map(|(node, on)| Op::Drain { node, on }),
        1 => Just(Op::Restart),
    ]
}

/// The command an op stands for on the current state (`None`: nothing to do).
fn command(s: &mut MetaState, op: &Op, now_ms: u64) -> Option<MetaCommand> {
    let ids: Vec<ShardId> = s.map.shards().map(|d| d.id).collect();
    let shard = |p: usize| s.map.get(ids[p % ids.len()]).expect("shard").clone();
    let plan_of = |s: &MetaState, p: usize| s.moves.values().nth(p % s.moves.len().max(1)).cloned();
    Some(match op {
        Op::Split { pick, key } => {
            let d = shard(*pick);
            MetaCommand::Split { shard: d.id, epoch: d.epoch, key: key.clone() }
        }
        Op::StartMove { pick, from, to, lead } => {
            let d = shard(*pick);
            let voters: Vec<NodeId> = d.voters().collect();
            let from = voters[from % voters.len()];
            let plan = MovePlan::new(d.id, from, n(*to), lead.then_some(n(*to)), 5);
            MetaCommand::StartMove { epoch: d.epoch, plan, now_ms }
        }
        Op::Advance { pick } => {
            let plan = plan_of(s, *pick)?;
            match plan.next(s) {
                // What the node does on a conflict: abort the plan.
                Err(_) => MetaCommand::AbortMove { shard: plan.shard },
                Ok(_) => MetaCommand::AdvanceMove { shard: plan.shard, step: plan.step },
            }
        }
        Op::CatchUp { pick } => {
            let plan = plan_of(s, *pick)?;
            let mut report = s.nodes.get(&plan.to)?.report.as_ref().clone();
            report.applied.insert(plan.shard, LogIndex(now_ms));
            MetaCommand::Heartbeat { node: plan.to, report }
        }
        Op::Abort { pick } => MetaCommand::AbortMove { shard: plan_of(s, *pick)?.shard },
        Op::ByHand { pick, node, kind } => {
            let d = shard(*pick);
            let (shard, epoch, node) = (d.id, d.epoch, n(*node));
            match kind {
                0 => MetaCommand::AddLearner { shard, epoch, node },
                1 => MetaCommand::Promote { shard, epoch, node },
                2 => MetaCommand::RemoveReplica { shard, epoch, node },
                _ => MetaCommand::TransferLeader { shard, epoch, node },
            }
        }
        Op::Register { node } => MetaCommand::RegisterNode { node: n(*node), addr: String::new() },
        Op::Drain { node, on } => MetaCommand::SetDraining { node: n(*node), draining: *on },
        Op::Restart => {
            *s = MetaState::restore(&s.snapshot().expect("snapshot")).expect("restore");
            return None;
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// Splits, replica moves carried out step by step through their plans (with catch-up
    /// reports, aborts, conflicting changes by hand and restarts from a snapshot), and node
    /// changes, in any order: the ranges never overlap and cover the keyspace, every version
    /// stamp only grows, a refused command changes nothing, every plan names an existing shard,
    /// every shard keeps a voter, and lookups by key and by range agree with a naive model (a
    /// sorted list of range starts updated only by successful splits).
    #[test]
    fn splits_moves_and_node_changes_keep_the_map_consistent(
        ops in prop::collection::vec(op(), 1..120),
        probes in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..4), prop::collection::vec(any::<u8>(), 0..4)), 1..20),
    ) {
        let mut s = registered(&[1, 2, 3, 4, 5, 6]);
        s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
        // Every node reports an applied index for every shard id there will be, so learners can
        // catch up (with a CatchUp op).
        for i in 1..=6 {
            let report = NodeReport { applied: (1..=128).map(|id| (ShardId(id), LogIndex(0))).collect(), ..Default::default() };
            s.apply(MetaCommand::Heartbeat { node: n(i), report }).expect("heartbeat");
        }
        let mut model: Vec<(Vec<u8>, ShardId)> = vec![(Vec::new(), ShardId(1))];
        let mut seen: std::collections::BTreeMap<ShardId, Epoch> = Default::default();
        for (i, op) in ops.iter().enumerate() {
            let now_ms = i as u64 * 1_000;
            let Some(cmd) = command(&mut s, op, now_ms) else { continue };
            let before = s.clone();
            match s.apply(cmd.clone()) {
                Err(_) => prop_assert_eq!(&s, &before, "a refused command changed the state: {:?}", cmd),
                Ok(out) => {
                    if let (MetaCommand::Split { key, .. }, MetaOutcome::Shards(ds)) = (&cmd, &out) {
                        let right = ds.iter().find(|d| d.start == *key).expect("right half");
                        let at = model.partition_point(|(k, _)| k < key);
                        model.insert(at, (key.clone(), right.id));
                    }
                }
            }
            prop_assert!(s.map.validate().is_ok(), "{:?}", s.map.validate());
            let starts: Vec<(Vec<u8>, ShardId)> = s.map.shards().map(|d| (d.start.clone(), d.id)).collect();
            prop_assert_eq!(&starts, &model);
            for d in s.map.shards() {
                prop_assert!(d.voters().count() >= 1, "shard {} lost its last voter", d.id);
                if let Some(old) = seen.get(&d.id) {
                    prop_assert!(d.epoch.version >= old.version && d.epoch.conf_version >= old.conf_version, "epoch went back");
                }
                seen.insert(d.id, d.epoch);
            }
            for (shard, plan) in &s.moves {
                prop_assert_eq!(*shard, plan.shard);
                prop_assert!(s.map.get(*shard).is_some());
            }
        }
        let owner = |key: &[u8]| model.iter().rev().find(|(k, _)| k.as_slice() <= key).map(|(_, id)| *id);
        for (a, b) in probes {
            prop_assert_eq!(s.map.lookup(&a).map(|d| d.id), owner(&a));
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let expect: Vec<ShardId> = model
                .iter()
                .enumerate()
                .filter(|(i, (start, _))| {
                    let end = model.get(i + 1).map(|(k, _)| k.as_slice());
                    start.as_slice() < hi.as_slice() && end.is_none_or(|e| e > lo.as_slice())
                })
                .map(|(_, (_, id))| *id)
                .collect();
            let got: Vec<ShardId> = s.map.lookup_range(&lo, Some(&hi)).map(|d| d.id).collect();
            if lo < hi {
                prop_assert_eq!(got, expect, "range [{:?}, {:?})", lo, hi);
            }
        }
    }
}

#[test]
fn a_range_lookup_ends_before_the_shard_that_starts_at_its_end() {
    let mut s = bootstrapped();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::Split { shard: ShardId(1), epoch: e, key: b"m".to_vec() }).expect("split");
    let ids = |lo: &[u8], hi: Option<&[u8]>| s.map.lookup_range(lo, hi).map(|d| d.id).collect::<Vec<_>>();
    // `end` is exclusive: a range ending exactly where a shard starts does not reach it.
    assert_eq!(ids(b"a", Some(b"m")), [ShardId(1)]);
    assert_eq!(ids(b"a", Some(b"m\0")), [ShardId(1), ShardId(2)]);
    assert_eq!(ids(b"m", Some(b"n")), [ShardId(2)]);
    assert_eq!(ids(b"", None), [ShardId(1), ShardId(2)]);
}

/// A voter-only descriptor of shard `id` over `[start, end)` (`end: None`: to the end).
fn desc(id: u64, start: &str, end: Option<&str>, nodes: &[u64]) -> ShardDescriptor {
    ShardDescriptor {
        id: ShardId(id),
        start: start.as_bytes().to_vec(),
        end: end.map(|e| e.as_bytes().to_vec()),
        epoch: Epoch { conf_version: 1, version: 2 },
        replicas: nodes.iter().map(|i| Replica { node: n(*i), role: ReplicaRole::Voter }).collect(),
    }
}

/// A map rebuilt by putting `ds` in order.
fn map_of(ds: &[ShardDescriptor]) -> ShardMap {
    let mut m = ShardMap::default();
    for d in ds {
        m.put_unchecked(d.clone());
    }
    m
}

/// Each shard of `m` as (id, start, end), in key order.
fn layout(m: &ShardMap) -> Vec<(u64, Vec<u8>, Option<Vec<u8>>)> {
    m.shards().map(|d| (d.id.0, d.start.clone(), d.end.clone())).collect()
}

/// One change's rewritten descriptors (`put`) and deleted shards (`remove`), brought into a
/// copy of `before` in every order: each order must end in the map the change made.
fn replay_in_every_order(before: &ShardMap, put: &[ShardDescriptor], remove: &[u64], after: &[ShardDescriptor]) {
    #[derive(Clone)]
    enum Write {
        Put(ShardDescriptor),
        Remove(u64),
    }
    let writes: Vec<Write> =
        put.iter().cloned().map(Write::Put).chain(remove.iter().copied().map(Write::Remove)).collect();
    let orders: Vec<Vec<Write>> = match writes.len() {
        2 => vec![writes.clone(), vec![writes[1].clone(), writes[0].clone()]],
        _ => panic!("cases of two writes"),
    };
    for order in orders {
        let mut m = before.clone();
        let mut removed = Vec::new();
        for w in order {
            match w {
                Write::Put(d) => m.put_unchecked(d),
                Write::Remove(id) => removed.push((id, m.remove_unchecked(ShardId(id)))),
            }
        }
        m.validate().expect("the change's map is whole");
        assert_eq!(layout(&m), layout(&map_of(after)));
        for d in after {
            assert_eq!(m.get(d.id), Some(d), "shard {} by id", d.id);
            assert_eq!(m.lookup(&d.start).map(|x| x.id), Some(d.id));
        }
        for (id, _) in &removed {
            assert_eq!(m.get(ShardId(*id)), None, "shard {id} was removed");
        }
    }
}

#[test]
fn putting_a_changed_descriptor_replaces_the_shard_wherever_it_started() {
    // The boundary between two shards moves: each descriptor moves its own start.
    let before = map_of(&[desc(1, "", Some("g"), &[1]), desc(2, "g", None, &[2])]);
    let mut m = before.clone();
    m.put_unchecked(desc(2, "m", None, &[2]));
    assert_eq!(m.len(), 2, "no copy of shard 2 is left at its old start");
    assert_eq!(layout(&m), vec![(1, b"".to_vec(), Some(b"g".to_vec())), (2, b"m".to_vec(), None)]);
    replay_in_every_order(
        &before,
        &[desc(1, "", Some("m"), &[1]), desc(2, "m", None, &[2])],
        &[],
        &[desc(1, "", Some("m"), &[1]), desc(2, "m", None, &[2])],
    );
}

#[test]
fn a_descriptor_put_where_another_shard_started_is_not_removed_when_that_shard_moves() {
    // Two shards trade ranges: whichever is put first takes the other's start, and putting
    // the other must not drop it from there.
    let before = map_of(&[desc(1, "", Some("m"), &[1]), desc(2, "m", None, &[2])]);
    let after = [desc(2, "", Some("m"), &[2]), desc(1, "m", None, &[1])];
    replay_in_every_order(&before, &after, &[], &after);
}

#[test]
fn removing_a_shard_returns_it_and_leaves_a_shard_put_at_its_start() {
    let before = map_of(&[desc(1, "", Some("m"), &[1]), desc(2, "m", None, &[2])]);
    let mut m = before.clone();
    assert_eq!(m.remove_unchecked(ShardId(2)), Some(desc(2, "m", None, &[2])));
    assert_eq!(layout(&m), vec![(1, b"".to_vec(), Some(b"m".to_vec()))]);
    assert_eq!(m.remove_unchecked(ShardId(2)), None, "already gone");
    // A merge, by either side: the surviving descriptor takes the whole keyspace, the other is
    // removed, in either order.
    replay_in_every_order(&before, &[desc(2, "", None, &[2])], &[1], &[desc(2, "", None, &[2])]);
    replay_in_every_order(&before, &[desc(1, "", None, &[1])], &[2], &[desc(1, "", None, &[1])]);
    // Removing the shard whose start another shard now holds returns nothing and keeps that one.
    let mut m = before.clone();
    m.put_unchecked(desc(2, "", None, &[2]));
    assert_eq!(m.remove_unchecked(ShardId(1)), None);
    assert_eq!(m.lookup(b"a").map(|d| d.id), Some(ShardId(2)));
}

#[test]
fn validate_refuses_a_map_that_misses_or_doubles_keys() {
    assert_eq!(ShardMap::default().validate(), Ok(()), "an empty map (before bootstrap) is whole");
    let whole = [desc(1, "", Some("g"), &[1]), desc(2, "g", Some("m"), &[2]), desc(3, "m", None, &[3])];
    assert_eq!(map_of(&whole).validate(), Ok(()));
    let broken: Vec<(&str, ShardMap)> = vec![
        ("a gap", map_of(&[desc(1, "", Some("g"), &[1]), desc(3, "m", None, &[3])])),
        ("an overlap", map_of(&[desc(1, "", Some("m"), &[1]), desc(2, "g", None, &[2])])),
        ("the first shard starts late", map_of(&[desc(2, "g", None, &[2])])),
        ("the last shard is bounded", map_of(&[desc(1, "", Some("g"), &[1]), desc(2, "g", Some("m"), &[2])])),
        ("a shard after an unbounded one", map_of(&[desc(1, "", None, &[1]), desc(2, "m", None, &[2])])),
        ("two replicas on one node", map_of(&[desc(1, "", None, &[1, 2, 1])])),
        ("an empty range", map_of(&[desc(1, "", Some("g"), &[1]), desc(2, "g", Some("g"), &[2])])),
        ("a replaced shard's id left in the index", {
            // Shard 3 put over shard 2's range: shard 2's id still points there.
            let mut m = map_of(&[desc(1, "", Some("m"), &[1]), desc(2, "m", None, &[2])]);
            m.put_unchecked(desc(3, "m", None, &[3]));
            m
        }),
    ];
    for (what, m) in broken {
        assert!(m.validate().is_err(), "{what}: {:?}", layout(&m));
    }
}

#[test]
fn restore_refuses_a_snapshot_whose_map_misses_keys() {
    let mut s = bootstrapped();
    s.map = map_of(&[desc(1, "", Some("g"), &[1]), desc(3, "m", None, &[3])]);
    let bytes = s.snapshot().expect("snapshot");
    assert!(MetaState::restore(&bytes).is_err());
}

#[test]
fn a_snapshot_with_bytes_left_over_or_cut_short_is_refused() {
    let mut s = bootstrapped();
    s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(4)], kept: vec![] }).expect("remove node 4");
    s.restored_from = Some("backup-7".into());
    let bytes = s.snapshot().expect("snapshot");
    assert_eq!(MetaState::restore(&bytes).expect("restore"), s, "removed nodes and the backup are kept");
    // Read as the older layout, either would lose the removed nodes (which may then join again).
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(MetaState::restore(&longer).is_err(), "a byte left over");
    // Cut into the bootstrap record (the last field): refused.
    for cut in 1..=4 {
        assert!(MetaState::restore(&bytes[..bytes.len() - cut]).is_err(), "{cut} bytes cut off the end");
    }
    // A cluster bootstrapped before the record: its last byte says there is none. Without it
    // the state is one serialized before the record existed, and without the empty map of
    // merges before it one serialized before merges existed: both read the same.
    let mut older = s.clone();
    older.bootstrap = None;
    let old_bytes = older.snapshot().expect("snapshot");
    assert_eq!(MetaState::restore(&old_bytes[..old_bytes.len() - 1]).expect("restore"), older);
    assert_eq!(MetaState::restore(&old_bytes[..old_bytes.len() - 2]).expect("restore"), older);
    for cut in 3..=5 {
        assert!(MetaState::restore(&old_bytes[..old_bytes.len() - cut]).is_err(), "{cut} bytes cut off the end");
    }
    // With a merge in progress, any cut is refused.
    let d = s.map.lookup(b"m").expect("shard").clone();
    s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: b"m".to_vec() }).expect("split");
    let (l, r) = (s.map.lookup(b"a").expect("left").clone(), s.map.lookup(b"m").expect("right").clone());
    let begin =
        MetaCommand::BeginMerge { left: l.id, left_epoch: l.epoch, right: r.id, right_epoch: r.epoch, now_ms: 7 };
    s.apply(begin).expect("begin merge");
    let bytes = s.snapshot().expect("snapshot");
    assert_eq!(MetaState::restore(&bytes).expect("restore"), s, "the merge is kept");
    for cut in 1..=4 {
        assert!(MetaState::restore(&bytes[..bytes.len() - cut]).is_err(), "{cut} bytes cut off the end");
    }
}

/// One edit of a map's descriptors, valid or not. Keys are two bytes.
#[derive(Clone, Debug)]
enum Edit {
    /// Shard at this position (mod the count) ends at another key (`None`: unbounded).
    End(usize, Option<u16>),
    /// Shard at this position starts at another key.
    Start(usize, u16),
    /// Shard at this position is removed.
    Remove(usize),
    /// A new shard over `[start, end)`.
    Add(u64, u16, Option<u16>),
    /// Shard at this position gets a second replica on one node.
    DoubleReplica(usize),
    /// Shard at this position absorbs its right neighbour (a merge: valid).
    Absorb(usize),
}

fn key16(k: u16) -> Vec<u8> {
    k.to_be_bytes().to_vec()
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), prop::option::of(any::<u16>())).prop_map(|(i, e)| Edit::End(i, e)),
        (any::<usize>(), any::<u16>()).prop_map(|(i, k)| Edit::Start(i, k)),
        any::<usize>().prop_map(Edit::Remove),
        (100_000u64..100_010, any::<u16>(), prop::option::of(any::<u16>())).prop_map(|(id, s, e)| Edit::Add(id, s, e)),
        any::<usize>().prop_map(Edit::DoubleReplica),
        any::<usize>().prop_map(Edit::Absorb),
    ]
}

fn apply_edit(m: &mut ShardMap, e: &Edit) {
    let all: Vec<ShardDescriptor> = m.shards().cloned().collect();
    if all.is_empty() {
        return;
    }
    let at = |i: usize| all[i % all.len()].clone();
    match e {
        Edit::End(i, end) => {
            let mut d = at(*i);
            d.end = end.map(key16);
            m.put_unchecked(d);
        }
        Edit::Start(i, k) => {
            let mut d = at(*i);
            d.start = key16(*k);
            m.put_unchecked(d);
        }
        Edit::Remove(i) => {
            m.remove_unchecked(at(*i).id);
        }
        Edit::Add(id, s, e) => {
            let d = ShardDescriptor { id: ShardId(*id), start: key16(*s), end: e.map(key16), ..at(0) };
            m.put_unchecked(d);
        }
        Edit::DoubleReplica(i) => {
            let mut d = at(*i);
            let r = d.replicas[0];
            d.replicas.push(r);
            m.put_unchecked(d);
        }
        Edit::Absorb(i) => {
            let k = *i % all.len();
            if k + 1 < all.len() {
                let mut left = all[k].clone();
                left.end = all[k + 1].end.clone();
                m.remove_unchecked(all[k + 1].id);
                m.put_unchecked(left);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The check of a changed map that looks only where it changed finds exactly what the
    /// check of the whole map finds, whatever the change.
    #[test]
    fn checking_only_what_changed_agrees_with_checking_the_whole_map(
        keys in prop::collection::btree_set(1u16.., 0..300),
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        // Up to 300 shards: several of the tree's leaves, so that edits land next to nodes
        // the two copies share.
        let mut bounds: Vec<Option<Vec<u8>>> = vec![None];
        bounds.extend(keys.iter().map(|k| Some(key16(*k))));
        let mut before = ShardMap::default();
        for (i, start) in bounds.iter().enumerate() {
            let end = bounds.get(i + 1).cloned().flatten();
            let start = start.clone().unwrap_or_default();
            before.put_unchecked(ShardDescriptor {
                id: ShardId(i as u64 + 1),
                start,
                end,
                epoch: Epoch { conf_version: 1, version: 1 },
                replicas: vec![Replica { node: n(1), role: ReplicaRole::Voter }],
            });
        }
        prop_assert!(before.validate().is_ok());
        let mut after = before.clone();
        for e in &edits {
            apply_edit(&mut after, e);
        }
        prop_assert_eq!(after.validate_changed(&before).is_ok(), after.validate().is_ok(), "{:?}", layout(&after));
    }
}

#[test]
fn checking_what_changed_costs_nothing_for_an_unchanged_map_and_the_whole_map_for_a_new_one() {
    let m = map_of(&[desc(1, "", Some("m"), &[1]), desc(2, "m", None, &[1])]);
    assert!(m.validate_changed(&m.clone()).is_ok());
    let broken = map_of(&[desc(1, "", Some("m"), &[1]), desc(2, "n", None, &[1])]);
    assert!(broken.validate_changed(&ShardMap::default()).is_err(), "against an empty map: the whole map");
}

/// The shards that differ between two copies of a large map, one changed at a single shard
/// (the meta leader's copy after an op), are found wherever that shard sits: also right after
/// a run of the tree's nodes the copies share, which a walk skipping shared nodes can step
/// over. `ShardMap::differing` is checked against a plain walk of both maps, and `==`
/// against the maps' contents.
#[test]
fn a_change_anywhere_in_a_large_map_is_found_by_the_walk_that_skips_what_copies_share() {
    fn naive(a: &ShardMap, b: &ShardMap) -> Vec<ShardId> {
        let mut ids: Vec<ShardId> = a.shards().chain(b.shards()).map(|d| d.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|id| a.get(*id) != b.get(*id));
        ids
    }
    let shards = 700u64;
    let mut base = ShardMap::default();
    for i in 0..shards {
        let start = if i == 0 { Vec::new() } else { format!("{i:05}").into_bytes() };
        let end = (i + 1 < shards).then(|| format!("{:05}", i + 1).into_bytes());
        base.put_unchecked(ShardDescriptor {
            id: ShardId(i + 1),
            start,
            end,
            epoch: Epoch { conf_version: 1, version: 1 },
            replicas: vec![Replica { node: n(1), role: ReplicaRole::Voter }],
        });
    }
    base.validate().unwrap();
    for i in 1..=shards {
        // A replica change of shard i: the same range, a new epoch.
        let mut changed = base.clone();
        let mut d = changed.get(ShardId(i)).cloned().expect("the shard");
        d.epoch.conf_version += 1;
        changed.put_unchecked(d);
        assert_eq!(base.differing(&changed), vec![ShardId(i)], "a change of shard {i}");
        assert_eq!(base.differing(&changed), naive(&base, &changed));
        assert_ne!(base, changed, "maps that differ at shard {i} are not equal");
        assert!(changed.validate_changed(&base).is_ok());
        // A split of shard i (its end moves in, a new shard after it).
        if i < shards {
            let mut split = base.clone();
            let mut left = split.get(ShardId(i)).cloned().expect("the shard");
            let key = [left.start.clone(), b"5".to_vec()].concat();
            let right = ShardDescriptor { id: ShardId(10_000 + i), start: key.clone(), ..left.clone() };
            left.end = Some(key);
            split.put_unchecked(left);
            split.put_unchecked(right);
            assert_eq!(base.differing(&split), naive(&base, &split), "a split of shard {i}");
            assert_eq!(base.differing(&split), vec![ShardId(i), ShardId(10_000 + i)]);
        }
    }
}
