//! Replica-move plans: each step checked against the current map, effects already present are
//! skipped, conflicting changes abort, and a plan survives a snapshot and restore.

use flotilla_placement::*;
use proptest::prelude::*;

fn n(i: u64) -> NodeId {
    NodeId(i)
}

const S: ShardId = ShardId(1);

/// Nodes 1..=5 registered, shard 1 on voters 1, 2, 3.
fn state() -> MetaState {
    let mut s = MetaState::default();
    for i in 1..=5 {
        s.apply(MetaCommand::RegisterNode { node: n(i), addr: String::new() }).expect("register");
    }
    s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
    s
}

fn epoch(s: &MetaState) -> Epoch {
    s.map.get(S).expect("shard").epoch
}

fn roles(s: &MetaState) -> Vec<(u64, ReplicaRole)> {
    let mut v: Vec<(u64, ReplicaRole)> =
        s.map.get(S).expect("shard").replicas.iter().map(|r| (r.node.0, r.role)).collect();
    v.sort_by_key(|(node, _)| *node);
    v
}

/// Reports shard 1's applied index on `node` (and whether it leads).
fn applied(s: &mut MetaState, node: u64, index: u64, leading: bool) {
    let mut report = s.nodes[&n(node)].report.as_ref().clone();
    report.applied.insert(S, LogIndex(index));
    report.leading.retain(|x| *x != S);
    if leading {
        report.leading.push(S);
    }
    s.apply(MetaCommand::Heartbeat { node: n(node), report }).expect("heartbeat");
}

/// Shard 1's Raft group carried out the map's replica changes: `leader` (alone) reports
/// leading it, with a committed configuration of the map's voters and learners less `gone`
/// (a voter demoted by a swap leaves the group at once).
fn raft_follows(s: &mut MetaState, leader: u64, gone: &[u64]) {
    let d = s.map.get(S).expect("shard").clone();
    let keep = |x: &NodeId| !gone.contains(&x.0);
    let index = s.leader_conf(S).map_or(1, |c| c.index.0 + 1);
    let conf = GroupConf {
        index: LogIndex(index),
        voters: d.voters().filter(keep).collect(),
        learners: d.replicas.iter().filter(|r| r.role == ReplicaRole::Learner).map(|r| r.node).filter(keep).collect(),
        joint: false,
    };
    let others: Vec<NodeId> = s.nodes.keys().copied().filter(|x| x.0 != leader).collect();
    for o in others {
        let mut report = s.nodes[&o].report.as_ref().clone();
        report.leading.retain(|x| *x != S);
        s.apply(MetaCommand::Heartbeat { node: o, report }).expect("heartbeat");
    }
    let mut report = s.nodes[&n(leader)].report.as_ref().clone();
    report.leading.retain(|x| *x != S);
    report.leading.push(S);
    report.confs.insert(S, conf);
    s.apply(MetaCommand::Heartbeat { node: n(leader), report }).expect("heartbeat");
}

fn start(s: &mut MetaState, from: u64, to: u64, leader: Option<u64>) {
    let plan = MovePlan::new(S, n(from), n(to), leader.map(n), 10);
    s.apply(MetaCommand::StartMove { epoch: epoch(s), plan, now_ms: 0 }).expect("start move");
}

fn advance(s: &mut MetaState) -> Result<MetaOutcome, MetaError> {
    let step = s.moves[&S].step;
    s.apply(MetaCommand::AdvanceMove { shard: S, step })
}

#[test]
fn a_move_runs_every_step_and_keeps_three_voters() {
    use ReplicaRole::{Learner, Voter};
    let mut s = state();
    applied(&mut s, 1, 500, true);
    start(&mut s, 1, 4, Some(4));
    let mut epochs = vec![epoch(&s)];
    assert_eq!(s.moves[&S].step, MoveStep::AddLearner);
    assert!(matches!(s.moves[&S].next(&s), Ok(PlanAction::Run { command: MetaCommand::AddLearner { .. }, .. })));
    advance(&mut s).expect("add learner");
    assert_eq!(roles(&s), vec![(1, Voter), (2, Voter), (3, Voter), (4, Learner)]);
    assert_eq!(s.moves[&S].step, MoveStep::WaitCaughtUp);
    // The group has not added the learner yet: its reports mean nothing.
    assert!(matches!(s.moves[&S].next(&s), Ok(PlanAction::WaitRaft { .. })));
    raft_follows(&mut s, 1, &[]);
    applied(&mut s, 1, 500, true);
    // The learner has reported nothing yet: wait, and the command is refused without change.
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Wait { learner: None, leader: Some(LogIndex(500)) }));
    let before = s.clone();
    assert_eq!(advance(&mut s), Err(MetaError::MoveWaiting(S)));
    assert_eq!(s, before);
    // 11 entries behind with a lag limit of 10: still waiting. 10 behind: caught up.
    applied(&mut s, 4, 489, false);
    assert!(matches!(s.moves[&S].next(&s), Ok(PlanAction::Wait { .. })));
    applied(&mut s, 4, 490, false);
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Advance { to: MoveStep::Promote }));
    advance(&mut s).expect("caught up");
    epochs.push(epoch(&s));
    advance(&mut s).expect("promote");
    assert_eq!(roles(&s), vec![(1, Learner), (2, Voter), (3, Voter), (4, Voter)], "one joint change swaps voters");
    epochs.push(epoch(&s));
    assert_eq!(advance(&mut s), Err(MetaError::MoveWaiting(S)), "Raft has not swapped the voters yet");
    raft_follows(&mut s, 2, &[1]);
    advance(&mut s).expect("remove old");
    assert_eq!(roles(&s), vec![(2, Voter), (3, Voter), (4, Voter)]);
    assert_eq!(s.moves[&S].step, MoveStep::TransferLeader);
    advance(&mut s).expect("transfer leader");
    assert_eq!(s.transfers.get(&S), Some(&n(4)));
    assert!(s.moves.is_empty(), "a finished plan is dropped");
    epochs.push(epoch(&s));
    assert!(epochs.windows(2).all(|w| w[1].conf_version >= w[0].conf_version && w[1].version == w[0].version));
    assert_eq!(epoch(&s).conf_version, epochs[0].conf_version + 3, "add, swap, remove: three replica changes");
    assert_eq!(s.apply(MetaCommand::AdvanceMove { shard: S, step: MoveStep::Done }), Err(MetaError::NoMove(S)));
}

#[test]
fn without_a_leader_applied_index_the_learner_catches_up_with_the_most_advanced_voter() {
    let mut s = state();
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 2, &[]);
    applied(&mut s, 3, 90, false);
    applied(&mut s, 4, 70, false);
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Wait { learner: Some(LogIndex(70)), leader: Some(LogIndex(90)) }));
    applied(&mut s, 4, 85, false);
    advance(&mut s).expect("caught up");
    advance(&mut s).expect("promote");
    raft_follows(&mut s, 2, &[1]);
    advance(&mut s).expect("remove old");
    assert!(s.moves.is_empty(), "no leader transfer asked: done after removing the old replica");
    assert!(s.transfers.is_empty());
}

#[test]
fn remove_old_waits_for_the_committed_configuration_and_leaves_a_confirmed_tombstone() {
    let mut s = promoted(None, 1);
    // The leader reports the joint configuration: node 1 still votes in its outgoing half.
    let mut report = s.nodes[&n(2)].report.as_ref().clone();
    report.confs.insert(
        S,
        GroupConf {
            index: LogIndex(7),
            voters: [1, 2, 3, 4].into_iter().map(n).collect(),
            learners: Default::default(),
            joint: true,
        },
    );
    s.apply(MetaCommand::Heartbeat { node: n(2), report }).expect("heartbeat");
    assert!(matches!(s.moves[&S].next(&s), Ok(PlanAction::WaitRaft { conf: Some(GroupConf { joint: true, .. }) })));
    let before = s.clone();
    assert_eq!(advance(&mut s), Err(MetaError::MoveWaiting(S)));
    assert_eq!(s, before, "a waiting step changes nothing");
    assert!(s.tombstones.is_empty());
    raft_follows(&mut s, 2, &[1]);
    let at = s.leader_conf(S).expect("conf").index;
    advance(&mut s).expect("remove old");
    assert_eq!(s.tombstones[&S][&n(1)], Tombstone { confirmed: Some(at) });
    // Node 1 deleted its replica and says so: the tombstone goes.
    let mut report = s.nodes[&n(1)].report.as_ref().clone();
    report.applied.remove(&S);
    s.apply(MetaCommand::Heartbeat { node: n(1), report }).expect("heartbeat");
    assert!(s.tombstones.is_empty());
}

#[test]
fn an_aborted_move_buries_its_learner_until_the_leader_confirms_its_removal() {
    let mut s = state();
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 2, &[]);
    s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    assert_eq!(s.tombstones[&S][&n(4)], Tombstone { confirmed: None }, "Raft still holds the learner");
    // Node 4 still hosts it and reports so: nothing changes.
    applied(&mut s, 4, 3, false);
    assert_eq!(s.tombstones[&S][&n(4)], Tombstone { confirmed: None });
    // The leader removed the learner from the group.
    raft_follows(&mut s, 2, &[]);
    let at = s.leader_conf(S).expect("conf").index;
    assert_eq!(s.tombstones[&S][&n(4)], Tombstone { confirmed: Some(at) });
    // A new move back onto node 4 lifts the tombstone: its old replica is a member again.
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    assert!(s.tombstones.is_empty());
}

#[test]
fn a_duplicate_step_command_is_refused_and_changes_nothing() {
    let mut s = state();
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    let before = s.clone();
    assert_eq!(
        s.apply(MetaCommand::AdvanceMove { shard: S, step: MoveStep::AddLearner }),
        Err(MetaError::MoveStepMismatch { shard: S, given: MoveStep::AddLearner, current: MoveStep::WaitCaughtUp })
    );
    assert_eq!(s, before);
}

#[test]
fn steps_whose_effect_is_already_present_are_skipped() {
    // As after a restart that lost the step advance, or the same change made by hand.
    let mut s = state();
    start(&mut s, 1, 4, Some(4));
    s.apply(MetaCommand::AddLearner { shard: S, epoch: epoch(&s), node: n(4) }).expect("by hand");
    let e = epoch(&s);
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Advance { to: MoveStep::WaitCaughtUp }));
    advance(&mut s).expect("skip");
    assert_eq!(epoch(&s), e, "skipping changes no replica");
    // Promoted and the source removed by hand while the plan waited: straight to the transfer.
    s.apply(MetaCommand::Promote { shard: S, epoch: epoch(&s), node: n(4) }).expect("by hand");
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Advance { to: MoveStep::RemoveOld }));
    s.apply(MetaCommand::RemoveReplica { shard: S, epoch: epoch(&s), node: n(1) }).expect("by hand");
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Advance { to: MoveStep::TransferLeader }));
    advance(&mut s).expect("skip");
    // The target already leads: nothing to ask for.
    applied(&mut s, 4, 1, true);
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Advance { to: MoveStep::Done }));
    advance(&mut s).expect("done");
    assert!(s.moves.is_empty() && s.transfers.is_empty());
}

#[test]
fn a_plan_survives_snapshot_and_restore() {
    let mut s = state();
    start(&mut s, 2, 5, None);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 1, &[]);
    applied(&mut s, 5, 1, false);
    assert!(matches!(s.moves[&S].next(&s), Ok(PlanAction::Wait { leader: None, .. })), "no voter reported: wait");
    applied(&mut s, 1, 3, true);
    advance(&mut s).expect("caught up");
    let mut restored = MetaState::restore(&s.snapshot().expect("snapshot")).expect("restore");
    assert_eq!(restored, s);
    assert_eq!(restored.moves[&S].step, MoveStep::Promote);
    advance(&mut restored).expect("promote");
    raft_follows(&mut restored, 1, &[2]);
    advance(&mut restored).expect("remove old");
    assert!(restored.moves.is_empty());
    assert_eq!(restored.map.get(S).expect("shard").voters().collect::<Vec<_>>(), vec![n(1), n(3), n(5)]);
}

#[test]
fn concurrent_changes_abort_the_plan_with_a_clear_error() {
    // The learner is removed by hand while the plan waits for it.
    let mut s = state();
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    s.apply(MetaCommand::RemoveReplica { shard: S, epoch: epoch(&s), node: n(4) }).expect("by hand");
    let err = s.moves[&S].next(&s).expect_err("conflict");
    assert_eq!(
        err,
        PlanError::Conflict { shard: S, step: MoveStep::WaitCaughtUp, from: Some(ReplicaRole::Voter), to: None }
    );
    assert!(err.to_string().contains("abort the move"), "{err}");
    let before = s.clone();
    assert_eq!(advance(&mut s), Err(MetaError::MoveConflict(err)));
    assert_eq!(s, before, "a refused step changes nothing");
    s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    assert!(s.moves.is_empty());

    // The source is removed by hand before the promotion: aborting also removes the learner.
    let mut s = state();
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    s.apply(MetaCommand::RemoveReplica { shard: S, epoch: epoch(&s), node: n(1) }).expect("by hand");
    assert!(matches!(
        s.moves[&S].next(&s),
        Err(PlanError::Conflict { from: None, to: Some(ReplicaRole::Learner), .. })
    ));
    let e = epoch(&s);
    s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    assert_eq!(roles(&s), vec![(2, ReplicaRole::Voter), (3, ReplicaRole::Voter)]);
    assert_eq!(epoch(&s).conf_version, e.conf_version + 1);

    // The target starts draining before its learner is promoted: abort, learner removed.
    let mut s = state();
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    s.apply(MetaCommand::SetDraining { node: n(4), draining: true }).expect("drain");
    assert_eq!(s.moves[&S].next(&s), Err(PlanError::TargetDraining { shard: S, node: n(4) }));
    s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    assert_eq!(roles(&s), vec![(1, ReplicaRole::Voter), (2, ReplicaRole::Voter), (3, ReplicaRole::Voter)]);

    // The leadership target loses its vote before the transfer step.
    let mut s = state();
    start(&mut s, 1, 4, Some(2));
    applied(&mut s, 4, 1, false);
    applied(&mut s, 3, 1, false);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 3, &[]);
    advance(&mut s).expect("caught up");
    advance(&mut s).expect("promote");
    s.apply(MetaCommand::RemoveReplica { shard: S, epoch: epoch(&s), node: n(2) }).expect("by hand");
    raft_follows(&mut s, 3, &[1]);
    advance(&mut s).expect("remove old");
    assert_eq!(s.moves[&S].next(&s), Err(PlanError::LeaderTargetNotVoter { shard: S, node: n(2) }));
}

#[test]
fn a_move_that_cannot_start_is_refused() {
    let mut s = state();
    let e = epoch(&s);
    let start =
        |s: &mut MetaState, epoch: Epoch, plan: MovePlan| s.apply(MetaCommand::StartMove { epoch, plan, now_ms: 5 });
    let before = s.clone();
    assert_eq!(
        start(&mut s, e, MovePlan::new(S, n(1), n(2), None, 1)),
        Err(MetaError::ReplicaExists { shard: S, node: n(2) })
    );
    assert_eq!(
        start(&mut s, e, MovePlan::new(S, n(4), n(5), None, 1)),
        Err(MetaError::NoSuchReplica { shard: S, node: n(4) })
    );
    assert_eq!(start(&mut s, e, MovePlan::new(S, n(1), n(9), None, 1)), Err(MetaError::UnknownNode(n(9))));
    assert!(matches!(start(&mut s, e, MovePlan::new(S, n(1), n(1), None, 1)), Err(MetaError::InvalidMove { .. })));
    assert!(matches!(
        start(&mut s, e, MovePlan::new(S, n(1), n(4), Some(n(1)), 1)),
        Err(MetaError::InvalidMove { .. })
    ));
    let mut late = MovePlan::new(S, n(1), n(4), None, 1);
    late.step = MoveStep::Promote;
    assert!(matches!(start(&mut s, e, late), Err(MetaError::InvalidMove { .. })));
    let stale = Epoch { conf_version: e.conf_version - 1, version: e.version };
    assert!(matches!(start(&mut s, stale, MovePlan::new(S, n(1), n(4), None, 1)), Err(MetaError::StaleEpoch { .. })));
    assert_eq!(s, before, "refusals change nothing");
    s.apply(MetaCommand::SetDraining { node: n(5), draining: true }).expect("drain");
    assert_eq!(start(&mut s, e, MovePlan::new(S, n(1), n(5), None, 1)), Err(MetaError::NodeDraining(n(5))));
    start(&mut s, e, MovePlan::new(S, n(1), n(4), None, 1)).expect("start");
    assert_eq!(
        s.recent_moves.iter().copied().collect::<Vec<_>>(),
        vec![MoveRecord { shard: S, from: n(1), to: n(4), started_ms: 5 }]
    );
    assert_eq!(start(&mut s, e, MovePlan::new(S, n(2), n(4), None, 1)), Err(MetaError::MoveInProgress(S)));
    assert_eq!(
        s.apply(MetaCommand::Split { shard: S, epoch: e, key: b"m".to_vec() }),
        Err(MetaError::MoveInProgress(S)),
        "no split while a move is in progress"
    );
    assert_eq!(s.apply(MetaCommand::AbortMove { shard: ShardId(9) }), Err(MetaError::NoMove(ShardId(9))));
}

#[test]
fn the_move_history_keeps_one_hour() {
    let mut s = state();
    for (i, t) in [0u64, 1_800_000, 3_599_999, 3_600_000, 7_300_000].into_iter().enumerate() {
        let d = s.map.get(S).expect("shard").clone();
        let to = 4 + (i as u64 % 2);
        let from = d.voters().next().expect("voter").0;
        if d.replica(n(to)).is_some() {
            continue;
        }
        s.apply(MetaCommand::StartMove { epoch: d.epoch, plan: MovePlan::new(S, n(from), n(to), None, 1), now_ms: t })
            .expect("start");
        s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    }
    let kept: Vec<u64> = s.recent_moves.iter().map(|m| m.started_ms).collect();
    assert_eq!(kept, vec![7_300_000], "moves older than MOVE_HISTORY_MS are dropped");
}

#[test]
fn every_move_started_within_the_hour_is_remembered() {
    let mut s = state();
    for (t, to) in [(0u64, 4u64), (1_000, 5), (2_000, 4)] {
        let plan = MovePlan::new(S, n(1), n(to), None, 1);
        s.apply(MetaCommand::StartMove { epoch: epoch(&s), plan, now_ms: t }).expect("start");
        s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    }
    let kept: Vec<(u64, u64)> = s.recent_moves.iter().map(|m| (m.started_ms, m.to.0)).collect();
    assert_eq!(kept, vec![(0, 4), (1_000, 5), (2_000, 4)], "the moves-per-minute limit counts them all");
}

#[test]
fn a_target_demoted_after_it_voted_is_a_conflict_even_if_it_drains() {
    use ReplicaRole::{Learner, Voter};
    let mut s = promoted(None, 5);
    assert_eq!(s.moves[&S].step, MoveStep::RemoveOld);
    // Swapped back by hand, then the target starts draining: its replica had voted, so this is
    // no early drain but replicas changed under the plan.
    s.apply(MetaCommand::SwapVoter { shard: S, epoch: epoch(&s), promote: n(1), demote: n(4) }).expect("by hand");
    s.apply(MetaCommand::SetDraining { node: n(4), draining: true }).expect("drain");
    assert_eq!(
        s.moves[&S].next(&s),
        Err(PlanError::Conflict { shard: S, step: MoveStep::RemoveOld, from: Some(Voter), to: Some(Learner) })
    );
}

#[test]
fn steps_wait_for_a_committed_configuration_that_carried_out_the_previous_change() {
    let mut s = state();
    start(&mut s, 1, 4, None);
    advance(&mut s).expect("add learner");
    // The leader's committed configuration predates the learner: its catch-up means nothing.
    raft_follows(&mut s, 2, &[4]);
    applied(&mut s, 2, 5, true);
    applied(&mut s, 4, 5, false);
    assert!(matches!(s.moves[&S].next(&s), Ok(PlanAction::WaitRaft { conf: Some(GroupConf { joint: false, .. }) })));
    raft_follows(&mut s, 2, &[]);
    assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::Advance { to: MoveStep::Promote }));
    advance(&mut s).expect("caught up");
    advance(&mut s).expect("promote");
    // The map swapped the voters, but the leader's committed configuration is still the one
    // before the change (not even joint yet): node 1 still votes, so it stays in the map.
    let mut report = s.nodes[&n(2)].report.as_ref().clone();
    let before = GroupConf {
        index: LogIndex(50),
        voters: [1, 2, 3].into_iter().map(n).collect(),
        learners: [4].into_iter().map(n).collect(),
        joint: false,
    };
    report.confs.insert(S, before);
    s.apply(MetaCommand::Heartbeat { node: n(2), report }).expect("heartbeat");
    assert!(matches!(s.moves[&S].next(&s), Ok(PlanAction::WaitRaft { .. })));
    assert_eq!(advance(&mut s), Err(MetaError::MoveWaiting(S)));
    raft_follows(&mut s, 2, &[1]);
    advance(&mut s).expect("remove old");
    assert!(s.moves.is_empty());
}

#[derive(Clone, Debug)]
enum Event {
    /// The driver's normal step.
    Step,
    /// A duplicate or late command naming an earlier step.
    Duplicate,
    /// The meta leader restarts from a snapshot.
    Restart,
    /// The learner reports progress (possibly still behind).
    Report(u64),
}

proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Driven through restarts, duplicate commands and late reports, a move ends with the
    /// intended replicas, three voters at every point, exactly three replica changes, and the
    /// leadership request recorded; duplicates are refused and change nothing.
    #[test]
    fn a_move_ends_right_whatever_restarts_and_duplicates_happen(
        events in proptest::collection::vec(
            proptest::prop_oneof![
                4 => proptest::strategy::Just(Event::Step),
                1 => proptest::strategy::Just(Event::Duplicate),
                1 => proptest::strategy::Just(Event::Restart),
                2 => (0..600u64).prop_map(Event::Report),
            ],
            0..40,
        ),
        from in 1..4u64,
        to in 4..6u64,
        lead in proptest::bool::ANY,
    ) {
        let mut s = state();
        applied(&mut s, 2, 500, true);
        let e0 = epoch(&s);
        start(&mut s, from, to, lead.then_some(to));
        let step = |s: &mut MetaState| -> bool {
            let Some(plan) = s.moves.get(&S).cloned() else { return false };
            match plan.next(s) {
                Ok(PlanAction::Wait { .. }) => false,
                Ok(PlanAction::WaitRaft { .. }) => {
                    // The group carries out the map's change; a voter other than the move's
                    // two nodes leads it (so the leadership request stays the plan's).
                    let d = s.map.get(S).expect("shard").clone();
                    let demoted = d.replica(n(from)).is_some_and(|r| r.role == ReplicaRole::Learner);
                    let leader = d.voters().map(|v| v.0).find(|v| *v != from && *v != to).expect("a third voter");
                    let gone: Vec<u64> = if demoted { vec![from] } else { Vec::new() };
                    raft_follows(s, leader, &gone);
                    applied(s, leader, 500, true);
                    false
                }
                Ok(_) => { advance(s).expect("a step that next() allows applies"); true }
                Err(e) => panic!("no conflicting change here: {e}"),
            }
        };
        for ev in events {
            match ev {
                Event::Step => { step(&mut s); }
                Event::Duplicate => {
                    if let Some(plan) = s.moves.get(&S).cloned() {
                        if plan.step > MoveStep::AddLearner {
                            let before = s.clone();
                            let r = s.apply(MetaCommand::AdvanceMove { shard: S, step: MoveStep::AddLearner });
                            prop_assert!(matches!(r, Err(MetaError::MoveStepMismatch { .. })), "{:?}", r);
                            prop_assert_eq!(&s, &before);
                        }
                    }
                }
                Event::Restart => s = MetaState::restore(&s.snapshot().expect("snapshot")).expect("restore"),
                Event::Report(i) => applied(&mut s, to, i, false),
            }
            prop_assert_eq!(s.map.get(S).expect("shard").voters().count(), 3, "voters stay three");
        }
        // Finish: the learner catches up, then every step runs.
        applied(&mut s, to, 500, false);
        for _ in 0..10 {
            step(&mut s);
            prop_assert_eq!(s.map.get(S).expect("shard").voters().count(), 3);
        }
        prop_assert!(s.moves.is_empty(), "finished");
        let d = s.map.get(S).expect("shard");
        prop_assert!(d.replica(n(from)).is_none());
        prop_assert!(d.replica(n(to)).is_some_and(|r| r.role == ReplicaRole::Voter));
        prop_assert_eq!(d.replicas.len(), 3);
        prop_assert_eq!(d.epoch.conf_version, e0.conf_version + 3, "add, swap, remove");
        prop_assert_eq!(d.epoch.version, e0.version);
        prop_assert_eq!(s.transfers.get(&S).copied(), lead.then_some(n(to)));
    }
}

/// Shard 1 reported at `bytes` by its leader, node 1.
fn sized(s: &mut MetaState, bytes: u64) {
    let mut report = s.nodes[&n(1)].report.as_ref().clone();
    report.shard_bytes.insert(S, bytes);
    s.apply(MetaCommand::Heartbeat { node: n(1), report }).expect("heartbeat");
}

#[test]
fn a_move_waits_for_a_large_shards_transfer_and_then_for_as_long_as_the_learner_closes_in() {
    let mut s = state();
    sized(&mut s, 1 << 30);
    start(&mut s, 2, 4, None);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 1, &[]);
    let plan = s.moves[&S].clone();
    assert_eq!(plan.step, MoveStep::WaitCaughtUp);
    let deadline = 1_000;
    let mut watch = StepWatch::new(&plan, 0);
    // No data on the learner yet: the deadline plus 1 GiB at 4 MiB/s (256 s).
    assert!(!watch.overdue(&plan, &s, 200_000, deadline), "transfer time allowed");
    assert!(!watch.overdue(&plan, &s, 257_000, deadline));
    assert!(watch.overdue(&plan, &s, 257_001, deadline), "no data after the transfer time");

    // Installed: far behind, but closing in; each new low restarts the clock.
    let mut watch = StepWatch::new(&plan, 0);
    applied(&mut s, 1, 100_000, true);
    applied(&mut s, 4, 10_000, false);
    assert!(!watch.overdue(&plan, &s, 100_000, deadline), "first report of a lag is progress");
    applied(&mut s, 1, 110_000, true);
    applied(&mut s, 4, 60_000, false);
    assert!(!watch.overdue(&plan, &s, 100_900, deadline), "lag 50,000 < 90,000");
    // Keeping pace with the writes without closing the gap is not progress.
    applied(&mut s, 1, 150_000, true);
    applied(&mut s, 4, 100_000, false);
    assert!(!watch.overdue(&plan, &s, 101_900, deadline), "lag 50,000 again: within the deadline");
    assert!(watch.overdue(&plan, &s, 101_901, deadline), "no new low for longer than the deadline");
}

#[test]
fn a_step_other_than_catching_up_has_the_plain_deadline_from_its_start() {
    let mut s = state();
    sized(&mut s, 1 << 30);
    start(&mut s, 2, 4, None);
    let plan = s.moves[&S].clone();
    assert_eq!(plan.step, MoveStep::AddLearner);
    let mut watch = StepWatch::new(&plan, 0);
    assert!(!watch.overdue(&plan, &s, 1_000, 1_000));
    assert!(watch.overdue(&plan, &s, 1_001, 1_000), "no transfer time outside WaitCaughtUp");
    // A new step starts a new clock.
    advance(&mut s).expect("add learner");
    let plan = s.moves[&S].clone();
    assert!(!watch.overdue(&plan, &s, 2_000, 1_000), "WaitCaughtUp starts now");
}

#[test]
fn another_move_of_the_shard_at_the_same_step_gets_a_fresh_watch() {
    let deadline = 120_000;
    let mut s = state();
    sized(&mut s, 1 << 30);
    // Move 1 (2 -> 4) waits for its learner, which has its data; the watch saw its lag at 0.
    start(&mut s, 2, 4, None);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 1, &[]);
    let m1 = s.moves[&S].clone();
    assert_eq!(m1.step, MoveStep::WaitCaughtUp);
    applied(&mut s, 1, 1_000, true);
    applied(&mut s, 4, 990, false);
    let mut watch = StepWatch::new(&m1, 0);
    assert!(!watch.overdue(&m1, &s, 0, deadline));
    // Move 1 is aborted and move 2 (2 -> 5) reaches the same step; node 5 has no data yet.
    s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    raft_follows(&mut s, 1, &[4]);
    start(&mut s, 2, 5, None);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 1, &[4]);
    let m2 = s.moves[&S].clone();
    assert_eq!(m2.step, MoveStep::WaitCaughtUp);
    // Watched with move 1's watch 130 s later, move 2 is owed its transfer time (256 s).
    assert!(!watch.overdue(&m2, &s, 130_000, deadline), "move 2 inherited move 1's clock");
    assert!(watch.overdue(&m2, &s, 130_000 + deadline + 256_001, deadline));
}

/// Shard 1's leader `leader` (alone) reports a committed configuration of `voters` and
/// `learners`, one index past the last one reported.
fn leader_reports(s: &mut MetaState, leader: u64, voters: &[u64], learners: &[u64], joint: bool) {
    let index = s.leader_conf(S).map_or(1, |c| c.index.0 + 1);
    let conf = GroupConf {
        index: LogIndex(index),
        voters: voters.iter().copied().map(n).collect(),
        learners: learners.iter().copied().map(n).collect(),
        joint,
    };
    let mut report = s.nodes[&n(leader)].report.as_ref().clone();
    report.leading.retain(|x| *x != S);
    report.leading.push(S);
    report.confs.insert(S, conf);
    s.apply(MetaCommand::Heartbeat { node: n(leader), report }).expect("heartbeat");
}

/// A move of shard 1 from node 1 to node 4 (leadership to `leader_to`) run through its
/// promotion: node 2 leads, its group carried out the learner's addition, and every
/// replica has applied `index`.
fn promoted(leader_to: Option<u64>, index: u64) -> MetaState {
    let mut s = state();
    start(&mut s, 1, 4, leader_to);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 2, &[]);
    applied(&mut s, 2, index, true);
    applied(&mut s, 4, index, false);
    advance(&mut s).expect("caught up");
    advance(&mut s).expect("promote");
    s
}

/// A move of shard 1 from node 1 to node 4 (leadership to `leader_to`) run up to its swap:
/// the map has node 4 voting and node 1 a learner, while the group's leader, node 2, still
/// reports the configuration before the swap (voters 1, 2, 3; learner 4).
fn swapped_in_the_map(leader_to: Option<u64>) -> MetaState {
    use ReplicaRole::{Learner, Voter};
    let s = promoted(leader_to, 5);
    assert_eq!(roles(&s), vec![(1, Learner), (2, Voter), (3, Voter), (4, Voter)]);
    assert_eq!(s.moves[&S].step, MoveStep::RemoveOld);
    assert_eq!(s.leader_conf(S).map(|c| c.voters.iter().map(|v| v.0).collect::<Vec<_>>()), Some(vec![1, 2, 3]));
    s
}

#[test]
fn aborting_a_move_swapped_in_the_map_but_not_in_the_group_gives_the_source_its_vote_back() {
    use ReplicaRole::Voter;
    let mut s = swapped_in_the_map(None);
    let e = epoch(&s);
    let out = s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    assert_eq!(roles(&s), vec![(1, Voter), (2, Voter), (3, Voter)], "the map follows the group: 1 votes, 4 goes");
    assert_eq!(out, MetaOutcome::Shards(vec![s.map.get(S).expect("shard").clone()]));
    assert_eq!(epoch(&s).conf_version, e.conf_version + 1);
    assert!(s.moves.is_empty());
    assert_eq!(s.tombstones[&S].keys().copied().collect::<Vec<_>>(), vec![n(4)]);
    assert_eq!(s.tombstones[&S][&n(4)], Tombstone { confirmed: None }, "the group still holds the learner");
}

#[test]
fn aborting_a_move_the_group_already_swapped_finishes_it_forward() {
    use ReplicaRole::Voter;
    let mut s = swapped_in_the_map(None);
    raft_follows(&mut s, 2, &[1]);
    let at = s.leader_conf(S).expect("conf").index;
    s.apply(MetaCommand::AbortMove { shard: S }).expect("abort");
    assert_eq!(roles(&s), vec![(2, Voter), (3, Voter), (4, Voter)], "the source leaves, the target keeps its vote");
    assert!(s.moves.is_empty());
    assert_eq!(s.tombstones[&S].keys().copied().collect::<Vec<_>>(), vec![n(1)]);
    assert_eq!(s.tombstones[&S][&n(1)], Tombstone { confirmed: Some(at) });
}

#[test]
fn aborting_a_swapped_move_waits_while_the_groups_configuration_is_not_clearly_either_side() {
    // Joint, counting both as voters, counting neither, or no leader report at all: undoing
    // or finishing the swap in the map could drop a replica the group still counts.
    let cases: [(&str, &[u64], &[u64], bool); 3] = [
        ("joint", &[1, 2, 3, 4], &[], true),
        ("both vote", &[1, 2, 3, 4], &[], false),
        ("neither votes", &[2, 3], &[1, 4], false),
    ];
    for (what, voters, learners, joint) in cases {
        let mut s = swapped_in_the_map(None);
        leader_reports(&mut s, 2, voters, learners, joint);
        let before = s.clone();
        assert_eq!(s.apply(MetaCommand::AbortMove { shard: S }), Err(MetaError::MoveWaiting(S)), "{what}");
        assert_eq!(s, before, "{what}: a refused abort changes nothing");
    }
    let mut s = swapped_in_the_map(None);
    let mut report = s.nodes[&n(2)].report.as_ref().clone();
    report.leading.clear();
    s.apply(MetaCommand::Heartbeat { node: n(2), report }).expect("heartbeat");
    assert_eq!(s.leader_conf(S), None);
    assert_eq!(s.apply(MetaCommand::AbortMove { shard: S }), Err(MetaError::MoveWaiting(S)), "no leader report");
}

#[test]
fn aborting_a_move_after_its_source_left_changes_no_replica() {
    use ReplicaRole::Voter;
    let mut s = swapped_in_the_map(Some(4));
    raft_follows(&mut s, 2, &[1]);
    advance(&mut s).expect("remove old");
    assert_eq!(s.moves[&S].step, MoveStep::TransferLeader);
    let (e, tombstones) = (epoch(&s), s.tombstones.clone());
    assert_eq!(s.apply(MetaCommand::AbortMove { shard: S }), Ok(MetaOutcome::Done));
    assert_eq!(roles(&s), vec![(2, Voter), (3, Voter), (4, Voter)]);
    assert_eq!(epoch(&s), e);
    assert_eq!(s.tombstones, tombstones);
    assert!(s.moves.is_empty());
}

#[test]
fn the_source_leaves_the_map_only_once_the_group_counts_the_target_and_not_the_source() {
    let cases: [(&str, &[u64], &[u64]); 3] =
        [("before the swap", &[1, 2, 3], &[4]), ("both vote", &[1, 2, 3, 4], &[]), ("neither votes", &[2, 3], &[1, 4])];
    for (what, voters, learners) in cases {
        let mut s = swapped_in_the_map(None);
        leader_reports(&mut s, 2, voters, learners, false);
        let conf = s.leader_conf(S).cloned();
        assert_eq!(s.moves[&S].next(&s), Ok(PlanAction::WaitRaft { conf }), "{what}");
        assert_eq!(advance(&mut s), Err(MetaError::MoveWaiting(S)), "{what}");
    }
    let mut s = swapped_in_the_map(None);
    leader_reports(&mut s, 2, &[2, 3, 4], &[], false);
    let e = epoch(&s);
    assert_eq!(
        s.moves[&S].next(&s),
        Ok(PlanAction::Run {
            command: MetaCommand::RemoveReplica { shard: S, epoch: e, node: n(1) },
            then: MoveStep::Done
        })
    );
}

#[test]
fn a_learner_reporting_applied_index_zero_has_no_data_yet_and_keeps_its_transfer_time() {
    // A replica created empty reports applied index 0 until its snapshot arrives.
    let mut s = state();
    sized(&mut s, 1 << 30);
    start(&mut s, 2, 4, None);
    advance(&mut s).expect("add learner");
    raft_follows(&mut s, 1, &[]);
    applied(&mut s, 1, 100_000, true);
    applied(&mut s, 4, 0, false);
    let plan = s.moves[&S].clone();
    assert_eq!(plan.learner_lag(&s), None);
    let mut watch = StepWatch::new(&plan, 0);
    assert!(!watch.overdue(&plan, &s, 200_000, 1_000), "transfer time allowed");
    assert!(!watch.overdue(&plan, &s, 257_000, 1_000));
    assert!(watch.overdue(&plan, &s, 257_001, 1_000));
    applied(&mut s, 4, 1, false);
    assert_eq!(plan.learner_lag(&s), Some(99_999), "its first data: a lag");
}
