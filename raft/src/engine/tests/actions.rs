//! One input, the exact actions: each test sets up a state, feeds one input (`handle_*` or an
//! API verb) and compares the whole list of actions it emits, in order. These pin the
//! protocol step by step, where the cluster tests elsewhere check outcomes.

use super::*;

/// Every action the engine has queued, in order; `has_actions` must have said whether any were.
fn drain(e: &mut Engine) -> Vec<Action> {
    let pending = e.has_actions();
    let out: Vec<Action> = std::iter::from_fn(|| e.poll_action()).take(10_000).collect();
    assert!(out.len() < 10_000, "the engine keeps emitting actions: {:?}", &out[..4]);
    assert_eq!(pending, !out.is_empty(), "has_actions before polling: {out:?}");
    assert!(!e.has_actions(), "nothing left once polled");
    out
}

fn send(from: u64, to: u64, term: u64, body: MessageBody) -> Action {
    Action::Send(Message { from: n(from), to: n(to), term: Term(term), body })
}

fn msg(from: u64, to: u64, term: u64, body: MessageBody) -> Message {
    Message { from: n(from), to: n(to), term: Term(term), body }
}

fn normal(term: u64, index: u64, data: &'static str) -> Entry {
    Entry { log_id: LogId::new(term, index), payload: EntryPayload::Normal(Bytes::from_static(data.as_bytes())) }
}

fn blank(term: u64, index: u64) -> Entry {
    Entry { log_id: LogId::new(term, index), payload: EntryPayload::Blank }
}

fn voters_123() -> StoredMembership {
    StoredMembership { log_id: LogId::new(0, 1), membership: Membership::new([n(1), n(2), n(3)]) }
}

/// Node 2 of voters {1, 2, 3}, restarted in term 2 having voted for 3. Its log: the
/// configuration (0-1), term 1's blank entry (1-2, committed and applied) and an uncommitted
/// entry of term 1 (1-3).
fn follower_2(config: Config) -> Engine {
    let state = InitialState {
        vote: Vote { term: Term(2), voted_for: Some(n(3)) },
        last_purged: LogId::ZERO,
        term_points: vec![LogId::new(0, 1), LogId::new(1, 2)],
        last_log_id: LogId::new(1, 3),
        committed: LogIndex(2),
        applied: LogId::new(1, 2),
        applied_membership: voters_123(),
        log_memberships: Vec::new(),
    };
    let mut e = Engine::new(n(2), Arc::new(config), state, 1, Millis(0));
    assert!(drain(&mut e).is_empty(), "a restart emits nothing");
    e
}

// ----- elections ------------------------------------------------------------------------

#[test]
fn an_election_timeout_with_pre_vote_asks_for_pre_votes_in_the_next_term_without_saving_anything() {
    let mut e = follower_2(cfg());
    let at = e.next_deadline();
    e.handle_timeout(at);
    let last_log_id = LogId::new(1, 3);
    assert_eq!(
        drain(&mut e),
        vec![send(2, 1, 3, MessageBody::PreVote { last_log_id }), send(2, 3, 3, MessageBody::PreVote { last_log_id })]
    );
    assert_eq!(e.role(), Role::PreCandidate);
    assert_eq!(e.term(), Term(2), "a pre-vote changes no term");
}

#[test]
fn a_candidate_winning_appends_a_blank_entry_and_sends_it_to_every_follower() {
    let mut e = follower_2(Config { pre_vote: false, ..cfg() });
    let at = e.next_deadline();
    e.handle_timeout(at);
    let vote = Vote { term: Term(3), voted_for: Some(n(2)) };
    let last_log_id = LogId::new(1, 3);
    assert_eq!(
        drain(&mut e),
        vec![
            Action::SaveVote { io: IoId(1), vote },
            send(2, 1, 3, MessageBody::Vote { last_log_id, transfer: false }),
            send(2, 3, 3, MessageBody::Vote { last_log_id, transfer: false }),
        ]
    );
    e.handle_io_done(at, IoId(1));
    assert!(drain(&mut e).is_empty(), "its own durable vote is not a quorum");
    // One more vote is a quorum: leader, with a blank entry of its term, sent before it is
    // durable (one append each, as followers start in the probe state).
    e.handle_message(at, msg(3, 2, 3, MessageBody::VoteResp { granted: true }));
    assert_eq!(e.role(), Role::Leader);
    let append = MessageBody::Append { prev: last_log_id, entries: vec![blank(3, 4)], commit: LogIndex(2) };
    assert_eq!(
        drain(&mut e),
        vec![
            Action::AppendEntries { io: IoId(2), entries: vec![blank(3, 4)] },
            send(2, 1, 3, append.clone()),
            send(2, 3, 3, append),
        ]
    );
}

#[test]
fn a_pristine_replica_refuses_a_vote_when_votes_need_a_configuration() {
    let config = Config { votes_need_configuration: true, ..cfg() };
    let mut e = Engine::new(n(2), Arc::new(config), InitialState::default(), 1, Millis(0));
    e.handle_message(Millis(1), msg(3, 2, 1, MessageBody::Vote { last_log_id: LogId::new(1, 5), transfer: false }));
    assert_eq!(
        drain(&mut e),
        vec![
            // The higher term is adopted (and saved) even though the vote is refused.
            Action::SaveVote { io: IoId(1), vote: Vote { term: Term(1), voted_for: None } },
            send(2, 3, 1, MessageBody::VoteResp { granted: false }),
        ]
    );
}

// ----- replication ----------------------------------------------------------------------

#[test]
fn a_proposal_is_sent_to_followers_in_the_same_step_as_its_write() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    let term = c.engine(1).term().0;
    let e = &mut c.node(1).engine;
    assert_eq!(e.propose(now, vec![Bytes::from_static(b"x")]), Ok(LogIndex(3)));
    let append =
        MessageBody::Append { prev: LogId::new(term, 2), entries: vec![normal(term, 3, "x")], commit: LogIndex(2) };
    assert_eq!(
        drain(e),
        vec![
            // Writes 1-3: the first configuration, the vote, the term's blank entry.
            Action::AppendEntries { io: IoId(4), entries: vec![normal(term, 3, "x")] },
            send(1, 2, term, append.clone()),
            send(1, 3, term, append),
        ]
    );
}

#[test]
fn a_follower_receiving_a_conflicting_append_truncates_appends_and_acknowledges_once_durable() {
    let mut e = follower_2(cfg());
    let y = normal(2, 3, "y");
    let append = MessageBody::Append { prev: LogId::new(1, 2), entries: vec![y.clone()], commit: LogIndex(2) };
    e.handle_message(Millis(1), msg(3, 2, 2, append));
    assert_eq!(
        drain(&mut e),
        vec![
            Action::TruncateFrom { io: IoId(1), index: LogIndex(3) },
            Action::AppendEntries { io: IoId(2), entries: vec![y] }
        ]
    );
    assert_eq!(e.leader(), Some(n(3)));
    // Not acknowledged before the write is durable.
    e.handle_io_done(Millis(2), IoId(1));
    assert!(drain(&mut e).is_empty());
    e.handle_io_done(Millis(3), IoId(2));
    assert_eq!(
        drain(&mut e),
        vec![send(2, 3, 2, MessageBody::AppendResp(AppendResult::Success { matched: LogIndex(3) }))]
    );
}

#[test]
fn an_append_that_does_not_match_is_rejected_with_a_hint_to_skip_the_whole_term() {
    let mut e = follower_2(cfg());
    // The leader thinks we hold 2-3; we hold 1-3 (and 1-2 before it).
    let append = MessageBody::Append { prev: LogId::new(2, 3), entries: Vec::new(), commit: LogIndex(2) };
    e.handle_message(Millis(1), msg(3, 2, 2, append));
    let conflict = AppendResult::Conflict { rejected: LogId::new(2, 3), hint: LogId::new(1, 3) };
    assert_eq!(drain(&mut e), vec![send(2, 3, 2, MessageBody::AppendResp(conflict))]);
}

// ----- configuration changes ------------------------------------------------------------

#[test]
fn adding_a_learner_appends_the_configuration_and_probes_the_learner_with_it() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    let term = c.engine(1).term().0;
    let e = &mut c.node(1).engine;
    assert_eq!(e.add_learner(now, n(4)), Ok(LogIndex(3)));
    let mut m = Membership::new([n(1), n(2), n(3)]);
    m.learners.insert(n(4));
    let conf = Entry { log_id: LogId::new(term, 3), payload: EntryPayload::Membership(Box::new(m)) };
    let append = MessageBody::Append { prev: LogId::new(term, 2), entries: vec![conf.clone()], commit: LogIndex(2) };
    assert_eq!(
        drain(e),
        vec![
            Action::AppendEntries { io: IoId(4), entries: vec![conf] },
            send(1, 2, term, append.clone()),
            send(1, 3, term, append.clone()),
            send(1, 4, term, append),
        ]
    );
}

// ----- reads ----------------------------------------------------------------------------

/// Node 1 leading {1, 2, 3} without the lease, asked for ReadIndex read 7; the time and term.
fn leader_1_reading_7() -> (Cluster, Millis, u64) {
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { lease_read: false, ..cfg() });
    let now = c.now;
    let term = c.engine(1).term().0;
    c.node(1).engine.read(now, 7, ReadMode::ReadIndex);
    (c, now, term)
}

#[test]
fn a_read_index_read_starts_one_heartbeat_round_and_is_ready_once_a_quorum_acknowledged_it() {
    let (mut c, now, term) = leader_1_reading_7();
    let e = &mut c.node(1).engine;
    let heartbeat = MessageBody::Heartbeat { commit: LogId::new(term, 2), round: 1, keep_after: Some(LogIndex(2)) };
    assert_eq!(drain(e), vec![send(1, 2, term, heartbeat.clone()), send(1, 3, term, heartbeat)]);
    // This node and node 2 are a quorum of three.
    e.handle_message(now, msg(2, 1, term, MessageBody::HeartbeatResp { round: 1 }));
    assert_eq!(drain(e), vec![Action::ReadReady { id: 7, index: LogIndex(2) }]);
    e.handle_message(now, msg(3, 1, term, MessageBody::HeartbeatResp { round: 1 }));
    assert!(drain(e).is_empty(), "answered once");
}

#[test]
fn a_read_asked_for_after_a_round_went_out_waits_for_the_next_round() {
    let (mut c, now, term) = leader_1_reading_7();
    let e = &mut c.node(1).engine;
    let round = |round| MessageBody::Heartbeat { commit: LogId::new(term, 2), round, keep_after: Some(LogIndex(2)) };
    assert_eq!(drain(e), vec![send(1, 2, term, round(1)), send(1, 3, term, round(1))]);
    // Read 8 arrives while round 1 is out: an acknowledgement of round 1 may have been sent
    // before read 8 existed, so it proves nothing about leadership at read 8's time.
    e.read(now, 8, ReadMode::ReadIndex);
    e.handle_message(now, msg(2, 1, term, MessageBody::HeartbeatResp { round: 1 }));
    let ready = drain(e);
    assert!(ready.contains(&Action::ReadReady { id: 7, index: LogIndex(2) }), "{ready:?}");
    assert!(!ready.iter().any(|a| matches!(a, Action::ReadReady { id: 8, .. })), "read 8 waits: {ready:?}");
    assert!(ready.contains(&send(1, 2, term, round(2))), "read 8 gets a round of its own: {ready:?}");
    e.handle_message(now, msg(3, 1, term, MessageBody::HeartbeatResp { round: 2 }));
    assert_eq!(drain(e), vec![Action::ReadReady { id: 8, index: LogIndex(2) }]);
}

#[test]
fn a_leader_that_steps_down_fails_every_read_waiting_on_it_at_once() {
    let (mut c, now, term) = leader_1_reading_7();
    let e = &mut c.node(1).engine;
    e.read(now, 8, ReadMode::ReadIndex);
    drain(e);
    // Node 3 leads a later term.
    let append = MessageBody::Heartbeat { commit: LogId::new(term, 2), round: 1, keep_after: Some(LogIndex(2)) };
    e.handle_message(now, msg(3, 1, term + 1, append));
    let failed: Vec<Action> = drain(e).into_iter().filter(|a| matches!(a, Action::ReadFailed { .. })).collect();
    let not_leader = RaftError::NotLeader { leader: Some(n(3)) };
    assert_eq!(
        failed,
        vec![Action::ReadFailed { id: 7, error: not_leader.clone() }, Action::ReadFailed { id: 8, error: not_leader }]
    );
}

#[test]
fn a_read_on_a_follower_fails_at_once_naming_the_leader() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    let e = &mut c.node(2).engine;
    e.read(now, 7, ReadMode::Lease);
    assert_eq!(drain(e), vec![Action::ReadFailed { id: 7, error: RaftError::NotLeader { leader: Some(n(1)) } }]);
}

// ----- leadership transfer --------------------------------------------------------------

#[test]
fn a_transfer_sends_timeout_now_only_once_the_target_matched_the_whole_log() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.cut.insert((n(1), n(2)));
    let x = c.propose(1, "x");
    c.stabilize();
    assert_eq!(c.engine(1).committed(), x, "committed by nodes 1 and 3");
    let now = c.now;
    let term = c.engine(1).term().0;
    let e = &mut c.node(1).engine;
    e.transfer_leader(now, n(2)).unwrap();
    assert!(drain(e).is_empty(), "node 2 lacks x (its append is still in flight)");
    e.handle_message(now, msg(2, 1, term, MessageBody::AppendResp(AppendResult::Success { matched: x })));
    assert_eq!(
        drain(e),
        vec![
            send(1, 2, term, MessageBody::TimeoutNow),
            // Node 2 learns that x is committed too.
            send(1, 2, term, MessageBody::Append { prev: LogId::new(term, 3), entries: Vec::new(), commit: x }),
        ]
    );
}

// ----- snapshots ------------------------------------------------------------------------

#[test]
fn a_snapshot_in_one_chunk_is_stored_installed_then_the_log_is_reset_behind_it() {
    let mut e = follower_2(cfg());
    let meta = SnapshotMeta { last_log_id: LogId::new(2, 9), membership: voters_123(), snapshot_id: 5, size_bytes: 4 };
    let data = Bytes::from_static(b"abcd");
    let chunk = MessageBody::Snapshot { meta: Box::new(meta.clone()), offset: 0, data: data.clone(), done: true };
    e.handle_message(Millis(1), msg(3, 2, 2, chunk));
    assert_eq!(
        drain(&mut e),
        vec![
            Action::ReceiveSnapshotChunk { meta: Box::new(meta.clone()), offset: 0, data, reception: 1 },
            Action::InstallSnapshot { meta: Box::new(meta.clone()), reception: 1 },
        ]
    );
    e.handle_snapshot_installed(Millis(2), meta.clone(), 1);
    let installed = MessageBody::SnapshotResp {
        snapshot_id: 5,
        next_offset: 4,
        installed: Some(LogId::new(2, 9)),
        refused: false,
        gap: false,
    };
    assert_eq!(
        drain(&mut e),
        vec![
            // Our log disagrees with the snapshot (it ends before it): all of it goes.
            Action::TruncateFrom { io: IoId(1), index: LogIndex(1) },
            Action::PurgeUpTo { io: IoId(2), log_id: LogId::new(2, 9) },
            send(2, 3, 2, installed),
        ]
    );
    assert_eq!((e.committed(), e.applied()), (LogIndex(9), LogIndex(9)));
}

// ----- quiescence and timers ------------------------------------------------------------

#[test]
fn a_woken_leader_starts_a_heartbeat_round_at_once() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.now = c.now.add_ms(10_000);
    let now = c.now;
    let term = c.engine(1).term().0;
    let e = &mut c.node(1).engine;
    e.wake(now, true);
    assert!(drain(e).is_empty(), "waking only moves the timers");
    assert_eq!(e.next_deadline(), now);
    e.handle_timeout(now);
    let heartbeat = MessageBody::Heartbeat { commit: LogId::new(term, 2), round: 1, keep_after: Some(LogIndex(2)) };
    assert_eq!(drain(e), vec![send(1, 2, term, heartbeat.clone()), send(1, 3, term, heartbeat)]);
}

// ----- invariants -----------------------------------------------------------------------

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "committed 9 beyond the last log index 3")]
fn the_invariant_check_names_what_is_broken() {
    let mut e = follower_2(cfg());
    e.committed = LogIndex(9);
    e.check_invariants();
}
