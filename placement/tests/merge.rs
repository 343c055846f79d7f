//! Shard merges: each command's checks (a refused command changes nothing), the map after a
//! commit, the freeze on replica and range changes while a shard is in a plan, unsafe recovery
//! aborting freezing plans, restore, and a property test over random sequences of splits,
//! moves and merges that checks the state's invariants after every step.

use flotilla_placement::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

fn n(i: u64) -> NodeId {
    NodeId(i)
}

/// Nodes 1..=5; shards 1 `[.., "m")`, 2 `["m", "t")` and 3 `["t", ..)`, all on voters 1, 2, 3.
fn state() -> MetaState {
    let mut s = MetaState::default();
    for i in 1..=5 {
        s.apply(MetaCommand::RegisterNode { node: n(i), addr: String::new() }).expect("register");
    }
    s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
    for key in [b"m", b"t"] {
        let d = s.map.lookup(key).expect("shard").clone();
        s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: key.to_vec() }).expect("split");
    }
    report_applied(&mut s, 1_000);
    s
}

/// Every node reports every shard of `s` applied through `index` (what a commit waits for).
fn report_applied(s: &mut MetaState, index: u64) {
    let ids: Vec<ShardId> = s.map.shards().map(|d| d.id).collect();
    for info in s.nodes.values_mut() {
        for id in &ids {
            std::sync::Arc::make_mut(&mut info.report).applied.insert(*id, LogIndex(index));
        }
    }
}

fn d(s: &MetaState, id: u64) -> ShardDescriptor {
    s.map.get(ShardId(id)).expect("shard").clone()
}

fn begin_cmd(s: &MetaState, left: u64, right: u64) -> MetaCommand {
    let (l, r) = (d(s, left), d(s, right));
    MetaCommand::BeginMerge { left: l.id, left_epoch: l.epoch, right: r.id, right_epoch: r.epoch, now_ms: 1_000 }
}

/// Begins the merge of `left` and `right`; returns the plan's id.
fn begin(s: &mut MetaState, left: u64, right: u64) -> MergeId {
    match s.apply(begin_cmd(s, left, right)) {
        Ok(MetaOutcome::Merge(p)) => {
            assert_eq!(s.merges.get(&ShardId(left)), Some(&p));
            p.id
        }
        other => panic!("begin merge: {other:?}"),
    }
}

fn commit(left: u64, id: MergeId) -> MetaCommand {
    MetaCommand::CommitMerge { left: ShardId(left), id, freeze_term: 3, freeze_index: LogIndex(17) }
}

/// Applies `cmd`, which must be refused with `err` and change nothing.
fn refused(s: &mut MetaState, cmd: MetaCommand, err: MetaError) {
    let before = s.clone();
    assert_eq!(s.apply(cmd.clone()), Err(err), "{cmd:?}");
    assert_eq!(*s, before, "a refused command changes nothing: {cmd:?}");
}

#[test]
fn a_merge_commits_only_once_every_replica_of_the_right_shard_reported_the_freeze_applied() {
    let mut s = state();
    let id = begin(&mut s, 1, 2);
    // Node 3 has applied only up to the entry before the freeze.
    std::sync::Arc::make_mut(&mut s.nodes.get_mut(&n(3)).expect("node").report)
        .applied
        .insert(ShardId(2), LogIndex(16));
    let before = s.clone();
    match s.apply(commit(1, id)) {
        Err(MetaError::InvalidMerge { reason, .. }) => assert!(reason.contains("[NodeId(3)]"), "{reason}"),
        other => panic!("a commit before node 3 applied the freeze: {other:?}"),
    }
    assert_eq!(s, before);
    std::sync::Arc::make_mut(&mut s.nodes.get_mut(&n(3)).expect("node").report)
        .applied
        .insert(ShardId(2), LogIndex(17));
    s.apply(commit(1, id)).expect("commit once every node reported it");
}

#[test]
fn a_merge_begins_commits_and_finishes() {
    let mut s = state();
    let (l, r) = (d(&s, 1), d(&s, 2));
    let next = s.next_shard_id;
    let id = begin(&mut s, 1, 2);
    assert_eq!(id, MergeId(next), "ids come from the shard id counter");
    assert_eq!(s.next_shard_id, next + 1);
    assert_eq!(s.merges[&ShardId(1)].phase, MergePhase::Freezing);
    assert_eq!(s.merges[&ShardId(1)].started_ms, 1_000);
    assert_eq!((d(&s, 1), d(&s, 2)), (l.clone(), r.clone()), "the map is unchanged while freezing");
    s.validate().expect("valid");

    report_applied(&mut s, 1_000);
    let out = s.apply(commit(1, id)).expect("commit");
    let merged = d(&s, 1);
    assert_eq!(out, MetaOutcome::Shards(vec![merged.clone()]));
    assert_eq!((merged.start.as_slice(), merged.end.as_deref()), (&b""[..], Some(&b"t"[..])));
    assert_eq!(merged.epoch.version, l.epoch.version + r.epoch.version + r.epoch.conf_version + 1);
    assert_eq!(merged.epoch.conf_version, l.epoch.conf_version, "replicas unchanged");
    assert_eq!(s.map.get(ShardId(2)), None, "the right shard is gone");
    assert_eq!(s.map.lookup(b"p").map(|d| d.id), Some(ShardId(1)));
    assert_eq!(
        s.merges[&ShardId(1)].phase,
        MergePhase::Committed {
            freeze_term: 3,
            freeze_index: LogIndex(17),
            right_range_start: b"m".to_vec(),
            right_range_end: Some(b"t".to_vec()),
            voters: [n(1), n(2), n(3)].into(),
        }
    );
    s.validate().expect("valid");
    // A routed request of the old epochs is told what changed.
    assert!(matches!(s.map.check_route(ShardId(1), l.epoch, b"a"), Err(RouteError::StaleEpoch { .. })));
    assert_eq!(s.map.check_route(ShardId(2), r.epoch, b"p"), Err(RouteError::UnknownShard(ShardId(2))));

    s.apply(MetaCommand::FinishMerge { left: ShardId(1), id }).expect("finish");
    assert!(s.merges.is_empty());
    s.validate().expect("valid");
    // Free again: the merged shard splits as any other.
    let m = d(&s, 1);
    s.apply(MetaCommand::Split { shard: m.id, epoch: m.epoch, key: b"p".to_vec() }).expect("split");
}

#[test]
fn a_merge_with_the_last_shard_reaches_the_end_of_the_keyspace() {
    let mut s = state();
    let id = begin(&mut s, 2, 3);
    report_applied(&mut s, 1_000);
    s.apply(commit(2, id)).expect("commit");
    assert_eq!(d(&s, 2).end, None);
    assert!(matches!(&s.merges[&ShardId(2)].phase, MergePhase::Committed { right_range_end: None, .. }));
    s.validate().expect("valid");
}

#[test]
fn begin_is_refused_unless_the_shards_fit() {
    let mut s = state();
    let (l, r) = (d(&s, 1), d(&s, 2));
    let stale = Epoch { version: 0, ..l.epoch };
    let cmd = MetaCommand::BeginMerge { left: l.id, left_epoch: stale, right: r.id, right_epoch: r.epoch, now_ms: 0 };
    refused(&mut s, cmd, MetaError::StaleEpoch { shard: l.id, given: stale, current: l.epoch });
    let cmd = MetaCommand::BeginMerge { left: l.id, left_epoch: l.epoch, right: r.id, right_epoch: stale, now_ms: 0 };
    refused(&mut s, cmd, MetaError::StaleEpoch { shard: r.id, given: stale, current: r.epoch });
    let cmd =
        MetaCommand::BeginMerge { left: l.id, left_epoch: l.epoch, right: ShardId(9), right_epoch: r.epoch, now_ms: 0 };
    refused(&mut s, cmd, MetaError::UnknownShard(ShardId(9)));
    // Not adjacent: 1 and 3, and 2 and 1 (right of left, not left of right).
    assert!(matches!(s.clone().apply(begin_cmd(&s, 1, 3)), Err(MetaError::InvalidMerge { .. })));
    assert!(matches!(s.clone().apply(begin_cmd(&s, 2, 1)), Err(MetaError::InvalidMerge { .. })));
    assert!(matches!(s.clone().apply(begin_cmd(&s, 1, 1)), Err(MetaError::InvalidMerge { .. })));
    // A learner on either.
    let mut t = s.clone();
    t.apply(MetaCommand::AddLearner { shard: ShardId(2), epoch: r.epoch, node: n(4) }).expect("learner");
    let before = t.clone();
    assert!(matches!(t.apply(begin_cmd(&t, 1, 2)), Err(MetaError::InvalidMerge { .. })));
    assert_eq!(t, before);
    // Different replica sets (same count).
    let e = d(&t, 2).epoch;
    t.apply(MetaCommand::SwapVoter { shard: ShardId(2), epoch: e, promote: n(4), demote: n(3) }).expect("swap");
    let e = d(&t, 2).epoch;
    t.apply(MetaCommand::RemoveReplica { shard: ShardId(2), epoch: e, node: n(3) }).expect("remove");
    assert!(matches!(t.clone().apply(begin_cmd(&t, 1, 2)), Err(MetaError::InvalidMerge { .. })));
    // A move in progress on either.
    let mut t = s.clone();
    let plan = MovePlan::new(ShardId(2), n(3), n(4), None, 10);
    t.apply(MetaCommand::StartMove { epoch: r.epoch, plan, now_ms: 0 }).expect("move");
    let cmd = begin_cmd(&t, 1, 2);
    refused(&mut t, cmd, MetaError::MoveInProgress(ShardId(2)));
    // Either in another merge.
    let mut t = s.clone();
    begin(&mut t, 2, 3);
    let cmd = begin_cmd(&t, 1, 2);
    refused(&mut t, cmd, MetaError::MergeInProgress(ShardId(2)));
    // Not bootstrapped.
    let mut empty = MetaState::default();
    let cmd = MetaCommand::BeginMerge { left: l.id, left_epoch: l.epoch, right: r.id, right_epoch: r.epoch, now_ms: 0 };
    refused(&mut empty, cmd, MetaError::NotBootstrapped);
    // A pending leader transfer does not stop a merge.
    s.apply(MetaCommand::TransferLeader { shard: ShardId(2), epoch: r.epoch, node: n(2) }).expect("transfer");
    begin(&mut s, 1, 2);
}

#[test]
fn commit_abort_and_finish_check_the_id_and_the_phase() {
    let mut s = state();
    refused(&mut s, commit(1, MergeId(99)), MetaError::NoMerge(ShardId(1)));
    refused(&mut s, MetaCommand::AbortMerge { left: ShardId(1), id: MergeId(99) }, MetaError::NoMerge(ShardId(1)));
    refused(&mut s, MetaCommand::FinishMerge { left: ShardId(1), id: MergeId(99) }, MetaError::NoMerge(ShardId(1)));
    let id = begin(&mut s, 1, 2);
    let other = MergeId(id.0 + 7);
    let mismatch = MetaError::MergeMismatch { left: ShardId(1), given: other, current: id };
    refused(&mut s, commit(1, other), mismatch.clone());
    refused(&mut s, MetaCommand::AbortMerge { left: ShardId(1), id: other }, mismatch.clone());
    refused(&mut s, MetaCommand::FinishMerge { left: ShardId(1), id: other }, mismatch);
    // Plans are filed under their left shard.
    refused(&mut s, commit(2, id), MetaError::NoMerge(ShardId(2)));
    let freezing = MetaError::MergePhaseMismatch { left: ShardId(1), id, phase: MergePhase::Freezing };
    refused(&mut s, MetaCommand::FinishMerge { left: ShardId(1), id }, freezing);

    // Committed: neither aborted nor committed again; finished once.
    let mut c = s.clone();
    report_applied(&mut c, 1_000);
    c.apply(commit(1, id)).expect("commit");
    let phase = c.merges[&ShardId(1)].phase.clone();
    let committed = MetaError::MergePhaseMismatch { left: ShardId(1), id, phase };
    refused(&mut c, MetaCommand::AbortMerge { left: ShardId(1), id }, committed.clone());
    refused(&mut c, commit(1, id), committed);
    c.apply(MetaCommand::FinishMerge { left: ShardId(1), id }).expect("finish");
    refused(&mut c, MetaCommand::FinishMerge { left: ShardId(1), id }, MetaError::NoMerge(ShardId(1)));

    // Aborted: the map is unchanged; no commit after it; finished once.
    let mut a = s.clone();
    let map = a.map.clone();
    a.apply(MetaCommand::AbortMerge { left: ShardId(1), id }).expect("abort");
    assert_eq!(a.merges[&ShardId(1)].phase, MergePhase::Aborted);
    assert_eq!(a.map, map);
    let aborted = MetaError::MergePhaseMismatch { left: ShardId(1), id, phase: MergePhase::Aborted };
    refused(&mut a, commit(1, id), aborted.clone());
    refused(&mut a, MetaCommand::AbortMerge { left: ShardId(1), id }, aborted);
    a.apply(MetaCommand::FinishMerge { left: ShardId(1), id }).expect("finish");
    assert!(a.merges.is_empty());
    a.validate().expect("valid");
    // The shards are free again, and a new merge gets a new id.
    let again = begin(&mut a, 1, 2);
    assert!(again > id);
}

#[test]
fn shards_in_a_plan_keep_their_replicas_and_range_in_every_phase() {
    for phase in ["freezing", "committed", "aborted"] {
        let mut s = state();
        let id = begin(&mut s, 1, 2);
        match phase {
            "committed" => {
                report_applied(&mut s, 1_000);
                s.apply(commit(1, id)).expect("commit");
            }
            "aborted" => {
                s.apply(MetaCommand::AbortMerge { left: ShardId(1), id }).expect("abort");
            }
            _ => {}
        }
        let mut shards = vec![1];
        if phase != "committed" {
            shards.push(2);
        }
        for sh in shards {
            let e = d(&s, sh).epoch;
            let shard = ShardId(sh);
            let key = if sh == 1 { b"c".to_vec() } else { b"p".to_vec() };
            let busy = MetaError::MergeInProgress(shard);
            refused(&mut s, MetaCommand::Split { shard, epoch: e, key }, busy.clone());
            refused(&mut s, MetaCommand::AddLearner { shard, epoch: e, node: n(4) }, busy.clone());
            refused(&mut s, MetaCommand::RemoveReplica { shard, epoch: e, node: n(3) }, busy.clone());
            let plan = MovePlan::new(shard, n(3), n(4), None, 10);
            refused(&mut s, MetaCommand::StartMove { epoch: e, plan, now_ms: 0 }, busy.clone());
            // Leader transfers go on.
            s.apply(MetaCommand::TransferLeader { shard, epoch: e, node: n(2) }).expect("transfer");
        }
        // The shard outside the plan is free.
        let e = d(&s, 3).epoch;
        s.apply(MetaCommand::AddLearner { shard: ShardId(3), epoch: e, node: n(4) }).expect("learner");
        s.validate().expect("valid");
    }
}

#[test]
fn promote_and_swap_are_refused_too() {
    // A learner cannot be there when a plan begins, but it is refused before the learner
    // question: set one up by hand on a shard that then takes part in a plan.
    let mut s = state();
    let id = begin(&mut s, 1, 2);
    let mut plan = s.merges[&ShardId(1)].clone();
    s.merges.clear();
    let e = d(&s, 1).epoch;
    s.apply(MetaCommand::AddLearner { shard: ShardId(1), epoch: e, node: n(4) }).expect("learner");
    plan.id = id;
    s.merges.insert(ShardId(1), plan);
    let e = d(&s, 1).epoch;
    let busy = MetaError::MergeInProgress(ShardId(1));
    refused(&mut s, MetaCommand::Promote { shard: ShardId(1), epoch: e, node: n(4) }, busy.clone());
    let swap = MetaCommand::SwapVoter { shard: ShardId(1), epoch: e, promote: n(4), demote: n(3) };
    refused(&mut s, swap, busy);
}

#[test]
fn a_commit_drops_the_right_shards_transfer_and_reports_and_no_merge_begins_over_a_tombstone() {
    let mut s = state();
    let (e1, e2) = (d(&s, 1).epoch, d(&s, 2).epoch);
    // A tombstone of shard 2 (a learner on node 4, removed) and pending transfers.
    s.apply(MetaCommand::AddLearner { shard: ShardId(2), epoch: e2, node: n(4) }).expect("learner");
    let e2 = d(&s, 2).epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(2), epoch: e2, node: n(4) }).expect("remove");
    let e2 = d(&s, 2).epoch;
    s.apply(MetaCommand::TransferLeader { shard: ShardId(2), epoch: e2, node: n(2) }).expect("transfer");
    s.apply(MetaCommand::TransferLeader { shard: ShardId(1), epoch: e1, node: n(3) }).expect("transfer");
    let mut report = NodeReport::default();
    for sh in [1, 2, 3] {
        report.shard_bytes.insert(ShardId(sh), 5);
        report.split_keys.insert(ShardId(sh), b"x".to_vec());
    }
    s.apply(MetaCommand::Heartbeat { node: n(1), report }).expect("heartbeat");
    assert!(s.tombstones.contains_key(&ShardId(2)));
    // Node 4's removed replica is not deleted yet: no merge, which would leave it to nobody.
    let cmd = begin_cmd(&s, 1, 2);
    assert!(matches!(s.apply(cmd), Err(MetaError::InvalidMerge { .. })));
    s.tombstones.clear();
    let id = begin(&mut s, 1, 2);
    report_applied(&mut s, 1_000);
    s.apply(commit(1, id)).expect("commit");
    assert_eq!(s.transfers.keys().copied().collect::<Vec<_>>(), vec![ShardId(1)]);
    let r = &s.nodes[&n(1)].report;
    assert_eq!(r.shard_bytes.keys().copied().collect::<Vec<_>>(), vec![ShardId(3)], "sizes of the old ranges go");
    assert_eq!(r.split_keys.keys().copied().collect::<Vec<_>>(), vec![ShardId(3)]);
}

#[test]
fn unsafe_recovery_aborts_freezing_plans_of_the_shards_it_rebuilds() {
    let mut s = state();
    let id = begin(&mut s, 1, 2);
    let mut c = s.clone();
    report_applied(&mut c, 1_000);
    c.apply(commit(1, id)).expect("commit");
    let done = c.merges[&ShardId(1)].phase.clone();

    s.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![] }).expect("recover");
    assert_eq!(s.merges[&ShardId(1)].phase, MergePhase::Aborted, "a late commit must not merge it");
    refused(&mut s, commit(1, id), MetaError::MergePhaseMismatch { left: ShardId(1), id, phase: MergePhase::Aborted });
    s.validate().expect("valid");
    s.apply(MetaCommand::FinishMerge { left: ShardId(1), id }).expect("finish");

    // A committed plan stays committed: the map merged already.
    c.apply(MetaCommand::RemoveDeadNodes { dead: vec![n(3)], kept: vec![(ShardId(1), n(1))] }).expect("recover");
    assert_eq!(c.merges[&ShardId(1)].phase, done);
    assert!(d(&c, 1).voters().all(|v| v != n(3)));
    c.validate().expect("valid");
}

#[test]
fn a_state_with_merges_survives_a_snapshot_and_one_without_them_reads_too() {
    let mut s = state();
    let id = begin(&mut s, 2, 3);
    report_applied(&mut s, 1_000);
    s.apply(commit(2, id)).expect("commit");
    assert_eq!(MetaState::restore(&s.snapshot().expect("snapshot")).expect("restore"), s, "committed");
    s.apply(MetaCommand::FinishMerge { left: ShardId(2), id }).expect("finish");
    begin(&mut s, 1, 2);
    assert_eq!(MetaState::restore(&s.snapshot().expect("snapshot")).expect("restore"), s, "freezing");
    // The current layout without its last two fields: a state written before merges existed
    // (and the bootstrap record after them).
    let mut s = state();
    s.bootstrap = None;
    let mut bytes = s.snapshot().expect("snapshot");
    assert_eq!(bytes.pop(), Some(0), "no bootstrap record is one zero byte");
    assert_eq!(bytes.pop(), Some(0), "an empty map of merges is one zero byte");
    assert_eq!(MetaState::restore(&bytes).expect("restore"), s);
    // And the format-1 layout, before `removed` and `restored_from` too.
    bytes.truncate(bytes.len() - 2);
    assert_eq!(MetaState::restore(&bytes).expect("restore"), s);
}

/// A change that breaks a state.
type Breakage = Box<dyn Fn(&mut MetaState)>;

#[test]
fn restore_refuses_plans_that_do_not_fit_the_map() {
    let mut s = state();
    let id = begin(&mut s, 1, 2);
    let good = s.clone();
    let broken: Vec<(&str, Breakage)> = vec![
        (
            "filed under another shard",
            Box::new(|s| {
                let p = s.merges.remove(&ShardId(1)).expect("plan");
                s.merges.insert(ShardId(3), p);
            }),
        ),
        ("not adjacent", Box::new(|s| s.merges.get_mut(&ShardId(1)).expect("plan").right = ShardId(3))),
        (
            "right gone while freezing",
            Box::new(|s| {
                s.merges.get_mut(&ShardId(1)).expect("plan").right = ShardId(9);
            }),
        ),
        (
            "committed with the right still there",
            Box::new(move |s| {
                s.merges.get_mut(&ShardId(1)).expect("plan").phase = MergePhase::Committed {
                    freeze_term: 1,
                    freeze_index: LogIndex(1),
                    right_range_start: b"m".to_vec(),
                    right_range_end: Some(b"t".to_vec()),
                    voters: [n(1), n(2), n(3)].into(),
                };
            }),
        ),
        ("an id not allocated", Box::new(|s| s.merges.get_mut(&ShardId(1)).expect("plan").id = MergeId(1_000))),
        ("a shard's id", Box::new(|s| s.merges.get_mut(&ShardId(1)).expect("plan").id = MergeId(3))),
        (
            "a shard in two plans",
            Box::new(move |s| {
                let mut p = s.merges[&ShardId(1)].clone();
                (p.left, p.right) = (ShardId(2), ShardId(3));
                s.merges.insert(ShardId(2), p);
            }),
        ),
        (
            "a move on a shard in a plan",
            Box::new(|s| {
                s.moves.insert(ShardId(2), MovePlan::new(ShardId(2), n(3), n(4), None, 10));
            }),
        ),
    ];
    for (what, f) in broken {
        let mut b = good.clone();
        f(&mut b);
        assert!(b.validate().is_err(), "{what}");
        assert!(MetaState::restore(&b.snapshot().expect("snapshot")).is_err(), "{what}");
    }
    let _ = id;
}

/// One random step of the property test.
#[derive(Clone, Debug)]
enum Op {
    Split { at: u8, key: u8 },
    StartMove { at: u8, from: u8, to: u8 },
    AdvanceMove { at: u8 },
    AbortMove { at: u8 },
    Begin { at: u8 },
    Commit { at: u8 },
    Abort { at: u8 },
    Finish { at: u8 },
    Recover { node: u8 },
    Duplicate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<u8>(), any::<u8>()).prop_map(|(at, key)| Op::Split { at, key }),
        2 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(at, from, to)| Op::StartMove { at, from, to }),
        3 => any::<u8>().prop_map(|at| Op::AdvanceMove { at }),
        1 => any::<u8>().prop_map(|at| Op::AbortMove { at }),
        4 => any::<u8>().prop_map(|at| Op::Begin { at }),
        3 => any::<u8>().prop_map(|at| Op::Commit { at }),
        1 => any::<u8>().prop_map(|at| Op::Abort { at }),
        3 => any::<u8>().prop_map(|at| Op::Finish { at }),
        1 => (1..=6u8).prop_map(|node| Op::Recover { node }),
        2 => Just(Op::Duplicate),
    ]
}

fn pick<T: Clone>(v: &[T], at: u8) -> Option<T> {
    (!v.is_empty()).then(|| v[at as usize % v.len()].clone())
}

/// The group carried out the map's change for `shard`: a voter that stays leads it and
/// reports the map's configuration (a swap's demoted source gone), every replica caught up.
fn raft_follows(s: &mut MetaState, shard: ShardId, gone: Option<NodeId>) {
    let Some(d) = s.map.get(shard).cloned() else { return };
    let Some(leader) = d.voters().find(|v| Some(*v) != gone && s.nodes.contains_key(v)) else { return };
    let index = s.leader_conf(shard).map_or(1, |c| c.index.0 + 1);
    let conf = GroupConf {
        index: LogIndex(index),
        voters: d.voters().filter(|v| Some(*v) != gone).collect(),
        learners: d.replicas.iter().filter(|r| r.role == ReplicaRole::Learner).map(|r| r.node).collect(),
        joint: false,
    };
    for r in &d.replicas {
        let Some(info) = s.nodes.get(&r.node) else { continue };
        let mut report = info.report.as_ref().clone();
        report.applied.insert(shard, LogIndex(100));
        report.leading.retain(|x| *x != shard);
        report.confs.remove(&shard);
        if r.node == leader {
            report.leading.push(shard);
            report.confs.insert(shard, conf.clone());
        }
        s.apply(MetaCommand::Heartbeat { node: r.node, report }).expect("heartbeat");
    }
}

/// The invariants checked after every step.
fn check(s: &MetaState, ids: &BTreeSet<u64>) -> Result<(), TestCaseError> {
    prop_assert!(s.validate().is_ok(), "{:?}", s.validate());
    for p in s.merges.values() {
        prop_assert!(!s.moves.contains_key(&p.left) && !s.moves.contains_key(&p.right));
        let l = s.map.get(p.left).expect("validated");
        match &p.phase {
            MergePhase::Committed { .. } => prop_assert!(s.map.get(p.right).is_none()),
            _ => {
                let r = s.map.get(p.right).expect("validated");
                prop_assert_eq!(l.end.as_deref(), Some(r.start.as_slice()));
            }
        }
    }
    prop_assert!(s.next_shard_id > *ids.iter().next_back().unwrap_or(&0));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random splits, moves and merges (with duplicates of the last command, and unsafe
    /// recoveries): after every step the map covers the keyspace, the plans fit it, no shard in
    /// a plan has a move, and every id handed out (shards and merges) is new.
    #[test]
    fn merges_moves_and_splits_keep_the_state_consistent(ops in proptest::collection::vec(op(), 1..80)) {
        let mut s = MetaState::default();
        for i in 1..=6 {
            s.apply(MetaCommand::RegisterNode { node: n(i), addr: String::new() }).expect("register");
        }
        s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
        let mut ids: BTreeSet<u64> = [1].into();
        let mut last: Option<MetaCommand> = None;
        let mut commits = 0;
        for op in ops {
            let shards: Vec<ShardDescriptor> = s.map.shards().cloned().collect();
            let moving: Vec<MovePlan> = s.moves.values().cloned().collect();
            let plans: Vec<MergePlan> = s.merges.values().cloned().collect();
            let cmd = match op {
                Op::Split { at, key } => pick(&shards, at).map(|d| {
                    let key = [d.start.as_slice(), &[key]].concat();
                    MetaCommand::Split { shard: d.id, epoch: d.epoch, key }
                }),
                Op::StartMove { at, from, to } => pick(&shards, at).and_then(|d| {
                    let from = pick(&d.voters().collect::<Vec<_>>(), from)?;
                    let to = n(1 + u64::from(to) % 6);
                    Some(MetaCommand::StartMove { epoch: d.epoch, plan: MovePlan::new(d.id, from, to, None, 10), now_ms: 0 })
                }),
                Op::AdvanceMove { at } => pick(&moving, at).map(|p| {
                    raft_follows(&mut s, p.shard, (p.step == MoveStep::RemoveOld).then_some(p.from));
                    MetaCommand::AdvanceMove { shard: p.shard, step: p.step }
                }),
                Op::AbortMove { at } => pick(&moving, at).map(|p| MetaCommand::AbortMove { shard: p.shard }),
                Op::Begin { at } => {
                    let pairs: Vec<(ShardDescriptor, ShardDescriptor)> =
                        shards.windows(2).map(|w| (w[0].clone(), w[1].clone())).collect();
                    pick(&pairs, at).map(|(l, r)| MetaCommand::BeginMerge {
                        left: l.id, left_epoch: l.epoch, right: r.id, right_epoch: r.epoch, now_ms: 0,
                    })
                }
                Op::Commit { at } => pick(&plans, at).map(|p| {
                    // Mostly the nodes have reported the freeze applied; otherwise the commit
                    // must wait (be refused, nothing changed).
                    report_applied(&mut s, if at % 4 == 0 { 0 } else { 1 });
                    MetaCommand::CommitMerge { left: p.left, id: p.id, freeze_term: 1, freeze_index: LogIndex(1) }
                }),
                Op::Abort { at } => pick(&plans, at).map(|p| MetaCommand::AbortMerge { left: p.left, id: p.id }),
                Op::Finish { at } => pick(&plans, at).map(|p| MetaCommand::FinishMerge { left: p.left, id: p.id }),
                Op::Recover { node } => {
                    let node = n(u64::from(node));
                    s.nodes.contains_key(&node).then(|| MetaCommand::RemoveDeadNodes { dead: vec![node], kept: vec![] })
                }
                Op::Duplicate => last.clone(),
            };
            let Some(cmd) = cmd else { continue };
            let before = s.clone();
            let next_id = s.next_shard_id;
            match s.apply(cmd.clone()) {
                Ok(outcome) => {
                    // Every id handed out is new.
                    for id in next_id..s.next_shard_id {
                        prop_assert!(ids.insert(id), "id {} handed out twice", id);
                    }
                    if let MetaOutcome::Merge(p) = &outcome {
                        prop_assert_eq!(p.id.0, next_id);
                    }
                    if matches!(cmd, MetaCommand::CommitMerge { .. }) {
                        commits += 1;
                        prop_assert_eq!(s.map.len() + 1, before.map.len(), "a commit removes one shard");
                    }
                }
                Err(_) => prop_assert_eq!(&s, &before, "a refused command changes nothing"),
            }
            check(&s, &ids)?;
            let snap = MetaState::restore(&s.snapshot().expect("snapshot"));
            prop_assert_eq!(snap.as_ref(), Ok(&s));
            last = Some(cmd);
        }
        if std::env::var_os("MERGE_PROPTEST_STATS").is_some() {
            eprintln!("commits {commits} shards {} plans {}", s.map.len(), s.merges.len());
        }
    }
}

// ---- The balancer's merges ----

const MIB: u64 = 1 << 20;

/// Every node reports the size in `sizes` of each shard it holds (none for shards not in
/// `sizes`) and an applied index for each, and node 1 leads every shard it votes in (else the
/// first voter leads).
fn report(s: &mut MetaState, sizes: &[(u64, u64)]) {
    let mut reports: std::collections::BTreeMap<NodeId, NodeReport> =
        s.nodes.keys().map(|n| (*n, NodeReport::default())).collect();
    for d in s.map.shards() {
        let leader = if d.replica(n(1)).is_some() { n(1) } else { d.voters().next().expect("a voter") };
        reports.get_mut(&leader).expect("registered").leading.push(d.id);
        for r in &d.replicas {
            reports.get_mut(&r.node).expect("registered").applied.insert(d.id, LogIndex(1_000));
            if let Some(&(_, mib)) = sizes.iter().find(|(sh, _)| *sh == d.id.0) {
                reports.get_mut(&r.node).expect("registered").shard_bytes.insert(d.id, mib * MIB);
            }
        }
    }
    for (node, report) in reports {
        s.apply(MetaCommand::Heartbeat { node, report }).expect("heartbeat");
    }
}

fn merges_of(props: &[Proposal]) -> Vec<(u64, u64)> {
    props
        .iter()
        .filter_map(|p| match p {
            Proposal::BeginMerge { left, right, .. } => Some((left.0, right.0)),
            _ => None,
        })
        .collect()
}

fn splits_of(props: &[Proposal]) -> usize {
    props.iter().filter(|p| matches!(p, Proposal::Split { .. })).count()
}

#[test]
fn no_merge_of_neighbours_with_a_replica_on_a_node_that_does_not_report() {
    let mut s = state();
    report(&mut s, &[(1, 1), (2, 2), (3, 5)]);
    // Node 3 is down: the meta leader holds no live report of it.
    s.apply(MetaCommand::Heartbeat { node: n(3), report: NodeReport::default() }).expect("heartbeat");
    let props = balance(&s, &BalancerConfig::default(), 10_000);
    assert_eq!(merges_of(&props), Vec::<(u64, u64)>::new(), "{props:?}");
}

#[test]
fn the_balancer_merges_the_smallest_pair_of_cold_neighbours_on_the_same_nodes() {
    let mut s = state();
    report(&mut s, &[(1, 1), (2, 2), (3, 5)]);
    let cfg = BalancerConfig::default();
    let props = balance(&s, &cfg, 10_000);
    assert_eq!(merges_of(&props), vec![(1, 2)], "2 takes part in one merge at most: {props:?}");
    for p in &props {
        s.apply(p.command(10_000)).expect("applies");
    }
    assert_eq!(s.merges[&ShardId(1)].started_ms, 10_000);
    // While it runs, nothing else for its shards.
    assert!(merges_of(&balance(&s, &cfg, 11_000)).is_empty());
    let id = s.merges[&ShardId(1)].id;
    report_applied(&mut s, 1_000);
    s.apply(commit(1, id)).expect("commit");
    s.apply(MetaCommand::FinishMerge { left: ShardId(1), id }).expect("finish");
    // Sizes unknown since the commit: no merge until the next reports.
    assert!(merges_of(&balance(&s, &cfg, 12_000)).is_empty());
    report(&mut s, &[(1, 3), (3, 5)]);
    assert_eq!(merges_of(&balance(&s, &cfg, 13_000)), vec![(1, 3)]);
}

#[test]
fn no_merge_of_big_hot_unknown_or_recently_moved_neighbours() {
    let cfg = BalancerConfig::default();
    // Together at the threshold.
    let mut s = state();
    report(&mut s, &[(1, 12), (2, 8), (3, 30)]);
    assert!(merges_of(&balance(&s, &cfg, 0)).is_empty());
    // Off.
    let mut s = state();
    report(&mut s, &[(1, 1), (2, 1), (3, 1)]);
    let off = BalancerConfig { merge_size_bytes_threshold: 0, ..BalancerConfig::default() };
    assert!(merges_of(&balance(&s, &off, 0)).is_empty());
    // Hot: shard 2's leader reports it busier than the limit.
    let mut hot = s.clone();
    let mut rep = hot.nodes[&n(1)].report.as_ref().clone();
    rep.shard_load.insert(ShardId(2), ShardLoad { requests_per_s: 301, split_key: None, epoch: d(&hot, 2).epoch });
    hot.apply(MetaCommand::Heartbeat { node: n(1), report: rep }).expect("heartbeat");
    assert!(merges_of(&balance(&hot, &cfg, 0)).is_empty());
    // Together busier than the limit.
    let mut warm = s.clone();
    let mut rep = warm.nodes[&n(1)].report.as_ref().clone();
    for sh in [1, 2, 3] {
        let load = ShardLoad { requests_per_s: 160, split_key: None, epoch: d(&warm, sh).epoch };
        rep.shard_load.insert(ShardId(sh), load);
    }
    warm.apply(MetaCommand::Heartbeat { node: n(1), report: rep }).expect("heartbeat");
    assert!(merges_of(&balance(&warm, &cfg, 0)).is_empty());
    // No leader reported: the rate is unknown.
    let mut leaderless = s.clone();
    let mut rep = leaderless.nodes[&n(1)].report.as_ref().clone();
    rep.leading.clear();
    leaderless.apply(MetaCommand::Heartbeat { node: n(1), report: rep }).expect("heartbeat");
    assert!(merges_of(&balance(&leaderless, &cfg, 0)).is_empty());
    // Just split: the halves' sizes are unknown until the next reports.
    let mut split = s.clone();
    let e = d(&split, 3).epoch;
    split.apply(MetaCommand::Split { shard: ShardId(3), epoch: e, key: b"w".to_vec() }).expect("split");
    assert_eq!(merges_of(&balance(&split, &cfg, 0)), vec![(1, 2)], "only the pair the split left alone");
    // Moved recently (shard 2 went from node 4 to node 3 a minute ago): cooling down.
    let mut moved = s.clone();
    moved.recent_moves.push_back(MoveRecord { shard: ShardId(2), from: n(4), to: n(3), started_ms: 0 });
    assert!(merges_of(&balance(&moved, &cfg, 60_000)).is_empty());
    assert_eq!(merges_of(&balance(&moved, &cfg, cfg.shard_move_cooldown_ms)), vec![(1, 2)], "cooled down");
}

#[test]
fn neighbours_on_different_nodes_get_a_move_that_aligns_them_first() {
    let mut s = state();
    // Shard 2 on 1, 2, 4 instead of 1, 2, 3.
    let e = d(&s, 2).epoch;
    s.apply(MetaCommand::AddLearner { shard: ShardId(2), epoch: e, node: n(4) }).expect("learner");
    let e = d(&s, 2).epoch;
    s.apply(MetaCommand::SwapVoter { shard: ShardId(2), epoch: e, promote: n(4), demote: n(3) }).expect("swap");
    let e = d(&s, 2).epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(2), epoch: e, node: n(3) }).expect("remove");
    report(&mut s, &[(1, 1), (2, 1), (3, 100)]);
    let cfg = BalancerConfig::default();
    let props = balance(&s, &cfg, 0);
    assert!(merges_of(&props).is_empty(), "{props:?}");
    let moves: Vec<(u64, u64, u64)> = props
        .iter()
        .filter_map(|p| match p {
            Proposal::Move { plan, .. } if plan.shard.0 <= 2 => Some((plan.shard.0, plan.from.0, plan.to.0)),
            _ => None,
        })
        .collect();
    // (Shard 3 may go to the empty node 5 by the count rule.) Node 3 holds two replicas (shards 1 and 3) and node 4 one: shard 1's replica on 3 goes to
    // 4 (the other way round would leave node 3 two above node 4).
    assert_eq!(moves, vec![(1, 3, 4)], "{props:?}");
    for p in &props {
        s.apply(p.command(0)).expect("applies");
    }
    // Nothing more for the pair while the move runs.
    assert!(balance(&s, &cfg, 1_000).iter().all(|p| !matches!(p, Proposal::Move { plan, .. } if plan.shard.0 <= 2)));
}

#[test]
fn a_freeze_that_takes_too_long_is_aborted() {
    let mut s = state();
    report(&mut s, &[(1, 1), (2, 1), (3, 100)]);
    let cfg = BalancerConfig::default();
    let id = begin(&mut s, 1, 2); // at 1_000
    let timeout = cfg.merge_freeze_timeout_ms;
    assert!(!balance(&s, &cfg, 1_000 + timeout - 1).iter().any(|p| matches!(p, Proposal::AbortMerge { .. })));
    let props = balance(&s, &cfg, 1_000 + timeout);
    assert!(props.contains(&Proposal::AbortMerge { left: ShardId(1), id }), "{props:?}");
    for p in &props {
        s.apply(p.command(1_000 + timeout)).expect("applies");
    }
    assert_eq!(s.merges[&ShardId(1)].phase, MergePhase::Aborted);
    // An aborted (or committed) plan is not aborted again: it waits for its finish.
    assert!(!balance(&s, &cfg, 2 * timeout).iter().any(|p| matches!(p, Proposal::AbortMerge { .. })));
}

#[test]
fn merges_at_once_are_limited() {
    let mut s = state();
    for key in [b"c", b"p", b"x"] {
        let sh = s.map.lookup(key).expect("shard").clone();
        s.apply(MetaCommand::Split { shard: sh.id, epoch: sh.epoch, key: key.to_vec() }).expect("split");
    }
    let sizes: Vec<(u64, u64)> = s.map.shards().map(|d| (d.id.0, 1)).collect();
    report(&mut s, &sizes);
    let cfg = BalancerConfig::default();
    let props = balance(&s, &cfg, 0);
    assert_eq!(merges_of(&props).len(), cfg.merges_at_once_max);
    for p in &props {
        s.apply(p.command(0)).expect("applies");
    }
    assert!(merges_of(&balance(&s, &cfg, 1)).is_empty(), "as many plans as allowed run already");
}

#[test]
fn merges_and_splits_do_not_undo_each_other() {
    let cfg = BalancerConfig::default();
    // Many small shards merge down to one; no round proposes a split on the way.
    let mut s = state();
    for key in [b"c", b"f", b"p", b"r", b"x"] {
        let sh = s.map.lookup(key).expect("shard").clone();
        s.apply(MetaCommand::Split { shard: sh.id, epoch: sh.epoch, key: key.to_vec() }).expect("split");
    }
    let mut sizes: std::collections::BTreeMap<u64, u64> = s.map.shards().map(|d| (d.id.0, 2)).collect();
    for round in 0..20u64 {
        let now = round * 1_000;
        report(&mut s, &sizes.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
        let props = balance(&s, &cfg, now);
        assert_eq!(splits_of(&props), 0, "round {round}: {props:?}");
        for p in &props {
            s.apply(p.command(now)).expect("applies");
        }
        // Each merge commits and finishes; the left shard then holds both sizes.
        for p in s.merges.values().cloned().collect::<Vec<_>>() {
            report_applied(&mut s, 1_000);
            s.apply(commit(p.left.0, p.id)).expect("commit");
            s.apply(MetaCommand::FinishMerge { left: p.left, id: p.id }).expect("finish");
            let right = sizes.remove(&p.right.0).expect("size");
            *sizes.get_mut(&p.left.0).expect("size") += right;
        }
        s.validate().expect("valid");
    }
    assert_eq!(s.map.len(), 1, "{:?}", s.map.shards().map(|d| d.id).collect::<Vec<_>>());
    // A shard split by size: its halves are not merged, even under a merge threshold above them.
    let wide = BalancerConfig { merge_size_bytes_threshold: 1 << 30, split_size_bytes_threshold: 128 * MIB, ..cfg };
    let mut s = state();
    report(&mut s, &[(1, 100), (2, 200), (3, 100)]);
    let props = balance(&s, &wide, 0);
    assert_eq!(merges_of(&props), vec![], "200 MiB together is over half the split size");
    report(&mut s, &[(1, 64), (2, 200), (3, 64)]);
    assert!(merges_of(&balance(&s, &wide, 0)).is_empty(), "halves of a split at 128 MiB");
    report(&mut s, &[(1, 30), (2, 30), (3, 200)]);
    let props = balance(&s, &wide, 0);
    assert_eq!(merges_of(&props), vec![(1, 2)]);
    for p in &props {
        s.apply(p.command(0)).expect("applies");
    }
    // And the merged shard is not split again: 60 MiB is half the split size away from it.
    let id = s.merges[&ShardId(1)].id;
    report_applied(&mut s, 1_000);
    s.apply(commit(1, id)).expect("commit");
    s.apply(MetaCommand::FinishMerge { left: ShardId(1), id }).expect("finish");
    report(&mut s, &[(1, 60), (3, 200)]);
    let props = balance(&s, &wide, 0);
    assert!(props.iter().all(|p| !matches!(p, Proposal::Split { shard, .. } if shard.0 == 1)), "{props:?}");
}
