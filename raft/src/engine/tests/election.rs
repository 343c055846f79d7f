//! Elections: pre-vote, votes answered only once durable, the leader lease that refuses
//! votes, check-quorum, and when the election timer restarts.

use super::*;

#[test]
fn election_timeout_is_randomized_within_bounds_and_seeded() {
    // Reference: Raft §5.2, randomized election timeouts.
    let c = cfg();
    let deadlines: Vec<u64> = (0..20u64).map(|seed| TestNode::new(1, &c, seed).engine.next_deadline().0).collect();
    assert!(deadlines.iter().all(|d| (100..200).contains(d)), "{deadlines:?}");
    let distinct: BTreeSet<_> = deadlines.iter().collect();
    assert!(distinct.len() > 10, "timeouts should differ between seeds: {deadlines:?}");
    assert_eq!(TestNode::new(1, &c, 7).engine.next_deadline(), TestNode::new(1, &c, 7).engine.next_deadline());
}

#[test]
fn pre_vote_round_does_not_change_the_term() {
    // Reference: Raft thesis §9.6.
    let mut c = Cluster::initialized(&[1, 2, 3], cfg());
    c.fire(1);
    assert_eq!(c.engine(1).role(), Role::PreCandidate);
    assert_eq!(c.engine(1).term(), Term(0));
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "pre_vote"), (3, "pre_vote")]);
    assert!(out.iter().all(|m| m.term == Term(1)), "pre-vote asks for the next term");
    assert!(!c.nodes[&n(1)].seen.iter().any(|a| matches!(a, Action::SaveVote { vote, .. } if vote.term > Term(0))));
    // One grant makes a quorum of three: now it campaigns for real.
    let m = out.into_iter().next().unwrap();
    c.deliver(m);
    let resp = c.take_outbox(2);
    assert_eq!(kinds(&resp), vec![(1, "pre_vote_resp")]);
    assert_eq!(c.engine(2).term(), Term(0), "a pre-vote does not bump the voter's term");
    c.deliver(resp.into_iter().next().unwrap());
    assert_eq!(c.engine(1).role(), Role::Candidate);
    assert_eq!(c.engine(1).term(), Term(1));
}

#[test]
fn pre_vote_is_refused_while_a_leader_is_alive() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    // Node 3 is partitioned away, times out, and asks for pre-votes.
    c.now = c.now.add_ms(10);
    let now = c.now;
    let term = c.engine(3).term();
    c.node(3).engine.handle_timeout(now.add_ms(500));
    let out = c.take_outbox(3);
    let to2 = out.into_iter().find(|m| m.to == n(2)).unwrap();
    c.deliver(to2);
    let resp = c.take_outbox(2);
    assert_eq!(resp.len(), 1);
    assert_eq!(resp[0].body, MessageBody::PreVoteResp { granted: false });
    assert_eq!(c.engine(2).term(), term);
    assert_eq!(c.engine(1).role(), Role::Leader);
}

#[test]
fn candidate_counts_its_own_vote_only_once_durable() {
    let mut c = Cluster::initialized(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    c.node(1).auto_sync = false;
    c.fire(1);
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "vote"), (3, "vote")], "vote requests go out before the vote is durable");
    c.deliver(out[0].clone());
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Candidate, "one grant plus a non-durable self-vote is no quorum");
    let now = c.now;
    c.node(1).sync(now);
    assert_eq!(c.engine(1).role(), Role::Leader);
}

#[test]
fn vote_is_answered_only_once_durable() {
    let mut c = Cluster::initialized(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    c.node(2).auto_sync = false;
    c.fire(1);
    let out = c.take_outbox(1);
    c.deliver(out.into_iter().find(|m| m.to == n(2)).unwrap());
    let now = c.now;
    let actions = c.node(2).run(now);
    assert!(matches!(actions[0], Action::SaveVote { vote: Vote { term: Term(1), voted_for: Some(NodeId(1)) }, .. }));
    assert!(sends(&actions).is_empty(), "no answer before the vote is durable: {actions:?}");
    let now = c.now;
    c.node(2).sync(now);
    let resp = c.take_outbox(2);
    assert_eq!(resp.len(), 1);
    assert_eq!(resp[0].body, MessageBody::VoteResp { granted: true });
}

#[test]
fn vote_refused_to_a_candidate_with_an_older_log() {
    // Reference: Raft §5.4.1, election restriction.
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    c.cut.insert((n(1), n(3)));
    c.propose(1, "x");
    c.stabilize();
    // Node 3 missed "x"; it campaigns and node 2 refuses.
    c.fire(3);
    c.stabilize();
    assert_ne!(c.engine(3).role(), Role::Leader);
    let refused = c.nodes[&n(2)]
        .seen
        .iter()
        .any(|a| matches!(a, Action::Send(m) if m.to == n(3) && m.body == MessageBody::VoteResp { granted: false }));
    assert!(refused);
}

#[test]
fn check_quorum_steps_down_a_leader_that_lost_its_quorum() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    for p in [2, 3] {
        c.cut.insert((n(p), n(1)));
    }
    for _ in 0..20 {
        c.advance(20);
        c.stabilize();
        if c.engine(1).role() != Role::Leader {
            break;
        }
    }
    assert_eq!(c.engine(1).role(), Role::Follower);
    assert!(c.now.0 < 2000 + 300, "within about one election timeout: {:?}", c.now);
}

#[test]
fn a_candidate_with_a_quorum_of_other_votes_still_waits_for_its_own_vote_to_be_durable() {
    // Otherwise a crash could let it lead the same term twice (review finding).
    let mut c = Cluster::initialized(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    c.node(1).auto_sync = false;
    c.fire(1);
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Candidate, "both other voters granted, but our vote is not durable");
    let leader_entries = |a: &Action| matches!(a, Action::AppendEntries { entries, .. } if entries.iter().any(|e| e.log_id.term > Term(0)));
    assert!(!c.nodes[&n(1)].seen.iter().any(leader_entries), "no entry of the new term yet");
    let now = c.now;
    c.node(1).sync(now);
    assert_eq!(c.engine(1).role(), Role::Leader);
}

#[test]
fn a_restarted_node_keeps_refusing_votes_for_one_election_timeout() {
    // A lease read relies on every node that acknowledged the leader refusing votes for
    // election_timeout_ms_min, even across a restart (review finding).
    let state = InitialState {
        vote: Vote { term: Term(3), voted_for: Some(n(1)) },
        last_purged: LogId::ZERO,
        term_points: vec![LogId::new(0, 1)],
        last_log_id: LogId::new(0, 1),
        applied_membership: StoredMembership::default(),
        log_memberships: vec![StoredMembership {
            log_id: LogId::new(0, 1),
            membership: Membership::new([n(1), n(2), n(3)]),
        }],
        ..Default::default()
    };
    let mut e = Engine::new(n(2), Arc::new(cfg()), state.clone(), 1, Millis(1000));
    let vote = |term| Message {
        from: n(3),
        to: n(2),
        term: Term(term),
        body: MessageBody::Vote { last_log_id: LogId::new(3, 9), transfer: false },
    };
    e.handle_message(Millis(1050), vote(4));
    assert_eq!(e.term(), Term(3), "ignored inside the window");
    assert!(e.poll_action().is_none());
    e.handle_message(Millis(1000 + 100), vote(4));
    assert_eq!(e.term(), Term(4), "granted once the window has passed");
    // A node with no state has promised nothing.
    let mut fresh = Engine::new(n(2), Arc::new(cfg()), InitialState::default(), 1, Millis(1000));
    fresh.handle_message(Millis(1001), vote(4));
    assert_eq!(fresh.term(), Term(4));
}

#[test]
fn a_leader_deposed_by_a_higher_term_waits_a_whole_election_timeout_before_campaigning() {
    let config = Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    // Long enough that the election deadline set when node 1 campaigned is far in the past.
    c.settle(20);
    let now = c.now;
    let term = c.engine(1).term().next();
    let body = MessageBody::Vote { last_log_id: LogId::ZERO, transfer: false };
    c.node(1).engine.handle_message(now, Message { from: n(3), to: n(1), term, body });
    assert_eq!(c.engine(1).role(), Role::Follower);
    assert_eq!(c.engine(1).term(), term);
    assert!(
        c.engine(1).next_deadline() >= now.add_ms(100),
        "a fresh election timeout, not the stale one: {:?} at {now:?}",
        c.engine(1).next_deadline()
    );
}

#[test]
fn a_pre_vote_is_granted_only_for_a_term_above_ours() {
    let config = Config { check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    let now = c.now;
    let term = c.engine(2).term();
    let last_log_id = c.engine(2).last_log_id();
    let answers = |c: &mut Cluster| -> Vec<(NodeId, Term, MessageBody)> {
        c.take_outbox(2).into_iter().map(|m| (m.to, m.term, m.body)).collect()
    };
    // A candidate a term behind asks for our current term: refused.
    c.node(2)
        .engine
        .handle_message(now, Message { from: n(3), to: n(2), term, body: MessageBody::PreVote { last_log_id } });
    assert_eq!(answers(&mut c), vec![(n(3), term, MessageBody::PreVoteResp { granted: false })]);
    // The same request for the next term is granted (no lease: check_quorum is off).
    let next = term.next();
    c.node(2)
        .engine
        .handle_message(now, Message { from: n(3), to: n(2), term: next, body: MessageBody::PreVote { last_log_id } });
    assert_eq!(answers(&mut c), vec![(n(3), next, MessageBody::PreVoteResp { granted: true })]);
    assert_eq!(c.engine(2).term(), term, "a pre-vote changes no term");
}

/// A vote is answered once *its own* write is durable, not when an earlier write completes:
/// node 2 votes for node 1 in one term, then for node 3 in the next; the first write's
/// completion alone must not release the second vote's answer (after a crash node 2 could
/// otherwise vote again in that term, for another candidate).
#[test]
fn a_vote_is_not_answered_when_only_an_earlier_write_is_durable() {
    let config = Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::initialized(&[1, 2, 3], config);
    c.node(2).auto_sync = false;
    let save_vote_io = |actions: &[Action]| {
        actions.iter().find_map(|a| if let Action::SaveVote { io, .. } = a { Some(*io) } else { None })
    };
    // Node 1 campaigns in term 1; nodes 2 and 3 vote for it (node 2's write is not durable
    // yet), and the answers are lost.
    c.fire(1);
    for m in c.take_outbox(1) {
        c.deliver(m);
    }
    let now = c.now;
    let first = save_vote_io(&c.node(2).run(now)).expect("node 2 writes its vote for node 1");
    c.take_outbox(3);
    // Node 3 campaigns in term 2; node 2 votes for it in a second write.
    c.fire(3);
    let req = c.take_outbox(3).into_iter().find(|m| m.to == n(2)).expect("vote request to node 2");
    assert_eq!(req.term, Term(2));
    c.deliver(req);
    let now = c.now;
    let second = save_vote_io(&c.node(2).run(now)).expect("node 2 writes its vote for node 3");
    assert!(second > first);
    assert_eq!(c.engine(2).vote, Vote { term: Term(2), voted_for: Some(n(3)) });
    // Only the first write completes: no answer yet.
    c.node(2).engine.handle_io_done(now, first);
    let out = c.take_outbox(2);
    assert!(
        !out.iter().any(|m| matches!(m.body, MessageBody::VoteResp { granted: true })),
        "vote granted before it is durable: {out:?}"
    );
    // The second completes: node 3 gets its vote.
    c.node(2).engine.handle_io_done(now, second);
    let out = c.take_outbox(2);
    assert_eq!(kinds(&out), vec![(3, "vote_resp")]);
    assert_eq!(out[0].body, MessageBody::VoteResp { granted: true });
}

/// A pre-vote grant counts only for the round it answers: a copy of a grant from an earlier
/// round (delayed or duplicated by the network) must not start a real election, the
/// disruption pre-vote exists to prevent.
#[test]
fn a_pre_vote_grant_from_an_earlier_round_is_not_counted() {
    let mut c = Cluster::initialized(&[1, 2, 3], cfg());
    c.fire(1);
    let to2 = c.take_outbox(1).into_iter().find(|m| m.to == n(2)).expect("pre-vote request to node 2");
    c.deliver(to2);
    let grant = c.take_outbox(2).pop().expect("node 2 answers");
    assert_eq!(grant.body, MessageBody::PreVoteResp { granted: true });
    c.deliver(grant.clone());
    assert_eq!(c.engine(1).role(), Role::Candidate);
    assert_eq!(c.engine(1).term(), Term(1));
    // The election in term 1 goes nowhere (its requests are lost); node 1 times out and asks
    // for pre-votes for term 2.
    c.take_outbox(1);
    c.fire(1);
    assert_eq!(c.engine(1).role(), Role::PreCandidate);
    c.take_outbox(1);
    // The copy of node 2's grant for term 1 arrives now.
    c.deliver(grant);
    assert_eq!(c.engine(1).role(), Role::PreCandidate, "an old round's grant started an election");
    assert_eq!(c.engine(1).term(), Term(1));
}

/// A stale leader back from a partition learns the new term from the answer to its own
/// heartbeat (followers of a higher term answer it with their term). With pre-vote and no
/// check-quorum nothing else would ever tell it: it would keep taking requests it can never
/// commit or serve.
#[test]
fn a_stale_leader_learns_the_new_term_from_the_answer_to_its_heartbeat() {
    let config = Config { check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut_off(1);
    c.elect(2);
    c.cut.clear();
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert!(c.engine(1).term() < c.engine(2).term());
    // Node 1's heartbeat reaches node 3; only node 3's answer gets back (node 2's own
    // messages are held, so they cannot be what tells node 1).
    c.fire(1);
    let hb = c.take_outbox(1).into_iter().find(|m| m.to == n(3)).expect("node 1 sends to node 3");
    c.deliver(hb);
    for m in c.take_outbox(3).into_iter().filter(|m| m.to == n(1)) {
        c.deliver(m);
    }
    assert_eq!(c.engine(1).role(), Role::Follower);
    assert_eq!(c.engine(1).term(), c.engine(3).term());
}

/// A pre-vote from a node whose term is behind ours is refused in our term, and the refusal
/// teaches it that term. Were it ignored, a node with the most up-to-date log that missed
/// elections would ask in a term that is never high enough (a pre-vote round does not raise
/// it), and with no leader around to tell it, the group could elect no one.
#[test]
fn a_pre_vote_from_a_node_terms_behind_is_refused_and_teaches_it_our_term() {
    // No leases, so that nodes 1 and 2 can take turns leading while node 3 is away.
    let config = Config { check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut_off(3);
    c.elect(2);
    c.elect(1);
    let stale = c.engine(3).term();
    let current = c.engine(2).term();
    assert!(stale.next() < current, "node 3 is at least two terms behind: {stale} vs {current}");
    // Node 3 pre-campaigns for the term after its own; only node 2 hears it.
    c.fire(3);
    c.cut.clear();
    let asks: Vec<Message> = c.take_outbox(3).into_iter().filter(|m| m.to == n(2)).collect();
    assert!(matches!(asks.as_slice(), [Message { body: MessageBody::PreVote { .. }, .. }]), "{asks:?}");
    assert_eq!(asks[0].term, stale.next());
    for m in asks {
        c.deliver(m);
    }
    let answers: Vec<Message> = c.take_outbox(2).into_iter().filter(|m| m.to == n(3)).collect();
    assert_eq!(
        answers.iter().map(|m| (m.term, m.body.clone())).collect::<Vec<_>>(),
        vec![(current, MessageBody::PreVoteResp { granted: false })]
    );
    for m in answers {
        c.deliver(m);
    }
    assert_eq!(c.engine(3).term(), current, "node 3 learned the term from the refusal");
}
