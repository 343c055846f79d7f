//! Linearizable reads: ReadIndex rounds, the lease and its exact end, reads before the
//! first commit of a term.

use super::*;

#[test]
fn read_index_waits_for_a_quorum_heartbeat_round() {
    // Reference: Raft thesis §6.4.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let idx = c.propose(1, "x");
    c.stabilize();
    let now = c.now;
    c.node(1).engine.read(now, 7, ReadMode::ReadIndex);
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "heartbeat"), (3, "heartbeat")]);
    assert!(c.nodes[&n(1)].reads.is_empty(), "not before a quorum answered");
    c.deliver(out[0].clone());
    let resp = c.take_outbox(2);
    c.deliver(resp[0].clone());
    c.node(1).run(now);
    assert_eq!(c.nodes[&n(1)].reads, vec![(7, Ok(idx))]);
}

#[test]
fn read_on_a_follower_fails_with_the_leader_hint() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    c.node(2).engine.read(now, 1, ReadMode::ReadIndex);
    c.node(2).run(now);
    assert_eq!(c.nodes[&n(2)].reads, vec![(1, Err(RaftError::NotLeader { leader: Some(n(1)) }))]);
}

#[test]
fn lease_read_is_immediate_inside_the_lease_and_not_after() {
    // Reference: Raft thesis §6.4.1.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.advance(20);
    c.stabilize();
    let now = c.now;
    c.node(1).engine.read(now, 1, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.is_empty(), "no round trip inside the lease");
    assert_eq!(c.nodes[&n(1)].reads.len(), 1);
    // Followers stop answering; after the lease (100 - 10 ms) the read needs a round.
    c.cut.extend([(n(2), n(1)), (n(3), n(1))]);
    c.now = c.now.add_ms(95);
    let now = c.now;
    c.node(1).engine.read(now, 2, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })));
    assert_eq!(c.nodes[&n(1)].reads.len(), 1, "lease expired: no immediate answer");
}

#[test]
fn reads_wait_for_the_first_commit_of_the_term() {
    let mut c = Cluster::initialized(&[1, 2, 3], cfg());
    c.stabilize();
    c.now = c.now.add_ms(1000);
    c.fire(1);
    // Run the election but hold back the new leader's appends.
    c.stabilize_with(|m| !matches!(m.body, MessageBody::Append { .. }));
    assert_eq!(c.engine(1).role(), Role::Leader);
    let now = c.now;
    c.node(1).engine.read(now, 5, ReadMode::ReadIndex);
    c.node(1).run(now);
    assert!(c.nodes[&n(1)].reads.is_empty());
    let noop = c.engine(1).last_log_id().index;
    c.advance(20);
    c.stabilize();
    // The parked read itself (id 5) is served, at an index that includes the term's first
    // entry: before it commits, the new leader's commit index may lag what was acknowledged.
    assert_eq!(c.nodes[&n(1)].reads.len(), 1);
    let (id, index) = c.nodes[&n(1)].reads[0].clone();
    assert_eq!(id, 5);
    assert!(index.expect("read served") >= noop);
}

#[test]
fn reads_registered_together_share_one_heartbeat_round() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    for id in 0..10 {
        c.node(1).engine.read(now, id, ReadMode::ReadIndex);
    }
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "heartbeat"), (3, "heartbeat")], "one round for ten reads");
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert_eq!(c.nodes[&n(1)].reads.len(), 10);
}

#[test]
fn the_lease_ends_exactly_election_timeout_less_drift_after_the_acknowledged_round_was_sent() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.advance(20);
    c.stabilize();
    // A heartbeat round sent at `t` and acknowledged by both followers.
    let t = c.now;
    c.node(1).engine.read(t, 1, ReadMode::ReadIndex);
    c.stabilize();
    assert_eq!(c.nodes[&n(1)].reads.len(), 1);
    c.cut.extend([(n(2), n(1)), (n(3), n(1))]);
    // cfg(): election timeouts from 100 ms, 10 ms of clock drift: the lease lasts 90 ms.
    c.node(1).engine.read(t.add_ms(89), 2, ReadMode::Lease);
    c.node(1).run(t.add_ms(89));
    assert_eq!(c.nodes[&n(1)].reads.len(), 2, "inside the lease: answered at once");
    c.node(1).engine.read(t.add_ms(90), 3, ReadMode::Lease);
    c.node(1).run(t.add_ms(90));
    assert_eq!(c.nodes[&n(1)].reads.len(), 2, "the lease has ended: the read waits for a heartbeat round");
}

#[test]
fn lease_reads_stay_immediate_after_entries_past_the_first_commit_of_the_term() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let x = c.propose(1, "x");
    c.advance(20);
    c.stabilize();
    assert_eq!(c.engine(1).committed(), x);
    let now = c.now;
    c.node(1).engine.read(now, 1, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.is_empty(), "no round trip inside the lease");
    assert_eq!(c.nodes[&n(1)].reads, vec![(1, Ok(x))]);
}

#[test]
fn with_lease_reads_off_a_lease_read_waits_for_a_heartbeat_round() {
    let config = Config { lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.advance(20);
    c.stabilize();
    let now = c.now;
    c.node(1).engine.read(now, 1, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })), "a round, not the lease");
    assert!(c.nodes[&n(1)].reads.is_empty(), "not answered before a quorum acknowledged the round");
}

#[test]
fn a_leader_alone_in_a_joint_configurations_incoming_half_confirms_reads_with_the_outgoing_voters() {
    // Node 1 leads {1, 2, 3} and proposes {1} alone: the joint configuration is in effect on
    // node 1 as soon as appended, but nodes 2 and 3, cut off, never got it. They may elect a
    // leader of their own under {1, 2, 3} and commit writes node 1 never sees, so node 1 may
    // serve a read only once a majority of the outgoing voters confirmed it still leads: it
    // is no single voter while joint (reference: Raft thesis §4.3, §6.4).
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { lease_read: false, ..cfg() });
    c.cut_off(1);
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[1])).expect("joint proposed");
    c.stabilize();
    assert!(c.engine(1).membership().membership.is_joint());
    c.node(1).engine.read(now, 7, ReadMode::ReadIndex);
    c.stabilize();
    assert!(c.nodes[&n(1)].reads.is_empty(), "served without the outgoing voters: {:?}", c.nodes[&n(1)].reads);
}

#[test]
fn the_lease_can_count_on_any_of_the_last_rounds_kept_max_rounds_and_no_older() {
    // The send times of older rounds are dropped (a bound on memory); a lease on one of them
    // falls back to a round trip.
    let mut reads = Reads::new(Millis(0));
    let rounds = crate::engine::read::ROUNDS_KEPT_MAX as u64 + 1;
    for i in 1..=rounds {
        reads.request_round(Millis(i));
        assert_eq!(reads.start_round(Millis(i)), Some((i, true)), "a round the timer asked for goes to every follower");
    }
    assert_eq!(reads.round_end(1, 1_000), None, "round 1 is no longer kept");
    assert_eq!(
        reads.round_end(2, 1_000),
        Some(Millis(1_002)),
        "the oldest of the last {} rounds is",
        crate::engine::read::ROUNDS_KEPT_MAX
    );
}

#[test]
fn the_round_history_never_grows_its_buffer_past_rounds_kept_max() {
    // A leader keeps this history for its whole term: a buffer doubled past the bound would
    // stay doubled on every led group.
    let mut reads = Reads::new(Millis(0));
    let kept = crate::engine::read::ROUNDS_KEPT_MAX;
    for i in 1..=3 * kept as u64 {
        reads.request_round(Millis(i));
        reads.start_round(Millis(i));
    }
    let [(name, len, cap), ..] = reads.buffer_sizes();
    assert_eq!(name, "round_sent_at");
    assert_eq!((len, cap), (kept, kept));
}

/// Registers ReadIndex read `id` on the leader, node 1, and returns the messages it sends.
fn read_on_leader(c: &mut Cluster, id: u64) -> Vec<Message> {
    let now = c.now;
    c.node(1).engine.read(now, id, ReadMode::ReadIndex);
    c.take_outbox(1)
}

/// Under `read_rounds_to_quorum`, delivers the heartbeat timer's next round to every follower
/// and their answers to the leader in the order given.
fn timer_round_answered_in_order(c: &mut Cluster, order: &[u64]) {
    c.advance(20);
    let out = c.take_outbox(1);
    let followers: Vec<u64> = c.nodes.keys().map(|id| id.0).filter(|id| *id != 1).collect();
    let to: Vec<(u64, &str)> = followers.iter().map(|id| (*id, "heartbeat")).collect();
    assert_eq!(kinds(&out), to, "the timer's round goes to every follower");
    for m in out {
        c.deliver(m);
    }
    let answers: Vec<Vec<Message>> = order.iter().map(|id| c.take_outbox(*id)).collect();
    for m in answers.into_iter().flatten() {
        c.deliver(m);
    }
    let now = c.now;
    c.node(1).run(now);
}

#[test]
fn with_read_rounds_to_quorum_a_read_round_goes_to_the_follower_that_answered_the_last_round_first() {
    let config = Config { read_rounds_to_quorum: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    let committed = c.engine(1).committed();
    timer_round_answered_in_order(&mut c, &[3, 2]);
    let out = read_on_leader(&mut c, 7);
    assert_eq!(kinds(&out), vec![(3, "heartbeat")], "only the quickest follower: with the leader, a quorum");
    c.deliver(out[0].clone());
    let resp = c.take_outbox(3);
    c.deliver(resp[0].clone());
    let now = c.now;
    c.node(1).run(now);
    assert_eq!(c.nodes[&n(1)].reads, vec![(7, Ok(committed))]);
    // The next timer round, answered the other way round, makes node 2 the quickest.
    timer_round_answered_in_order(&mut c, &[2, 3]);
    assert_eq!(kinds(&read_on_leader(&mut c, 8)), vec![(2, "heartbeat")]);
}

#[test]
fn with_read_rounds_to_quorum_reads_whose_follower_stopped_answering_are_served_by_the_timers_round() {
    let config = Config { read_rounds_to_quorum: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    let committed = c.engine(1).committed();
    timer_round_answered_in_order(&mut c, &[3, 2]);
    // Node 3's answers are lost from now on.
    c.cut.insert((n(3), n(1)));
    let out = read_on_leader(&mut c, 7);
    assert_eq!(kinds(&out), vec![(3, "heartbeat")]);
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert!(c.nodes[&n(1)].reads.is_empty(), "not served: the one follower asked did not answer");
    // The timer's round goes to both, node 2 answers it, and the read is served.
    c.advance(20);
    c.stabilize();
    assert_eq!(c.nodes[&n(1)].reads, vec![(7, Ok(committed))]);
    // Node 2 answered the latest round: the next read's round goes to it.
    assert_eq!(kinds(&read_on_leader(&mut c, 8)), vec![(2, "heartbeat")]);
}

#[test]
fn with_read_rounds_to_quorum_five_voters_send_a_read_round_to_the_two_quickest() {
    let config = Config { read_rounds_to_quorum: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3, 4, 5], config);
    timer_round_answered_in_order(&mut c, &[5, 3, 2, 4]);
    let out = read_on_leader(&mut c, 7);
    assert_eq!(kinds(&out), vec![(3, "heartbeat"), (5, "heartbeat")]);
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert_eq!(c.nodes[&n(1)].reads.len(), 1, "two followers' answers and the leader make three of five");
}

#[test]
fn with_read_rounds_to_quorum_a_joint_configuration_sends_read_rounds_to_every_follower() {
    let config = Config { read_rounds_to_quorum: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config.clone());
    for id in [4, 5] {
        c.nodes.insert(n(id), TestNode::new(id, &config, id));
    }
    // Nodes 4 and 5 cannot be reached, so the joint configuration stays in effect.
    c.cut.extend([(n(1), n(4)), (n(1), n(5))]);
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[1, 4, 5])).expect("change");
    c.stabilize();
    assert!(c.engine(1).membership().membership.is_joint());
    let out = read_on_leader(&mut c, 7);
    let to: Vec<u64> = out.iter().filter(|m| matches!(m.body, MessageBody::Heartbeat { .. })).map(|m| m.to.0).collect();
    assert_eq!(to, vec![2, 3, 4, 5], "both majorities must answer: every follower is asked");
}

#[test]
fn with_read_rounds_to_quorum_a_new_leader_asks_every_follower_until_they_answered_a_round() {
    let config = Config { read_rounds_to_quorum: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    // No round answered in this term: nothing tells the live followers from a dead one.
    let out = read_on_leader(&mut c, 7);
    assert_eq!(kinds(&out), vec![(2, "heartbeat"), (3, "heartbeat")]);
    for m in out {
        c.deliver(m);
    }
    let answers: Vec<Message> = [3, 2].iter().flat_map(|id| c.take_outbox(*id)).collect();
    for m in answers {
        c.deliver(m);
    }
    let now = c.now;
    c.node(1).run(now);
    assert_eq!(c.nodes[&n(1)].reads.len(), 1);
    // Both answered that round, node 3 first: the next read's round goes to node 3 alone.
    assert_eq!(kinds(&read_on_leader(&mut c, 8)), vec![(3, "heartbeat")]);
}

#[test]
fn with_read_rounds_to_quorum_four_voters_send_a_read_round_to_the_two_quickest() {
    let config = Config { read_rounds_to_quorum: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3, 4], config);
    timer_round_answered_in_order(&mut c, &[4, 2, 3]);
    assert_eq!(
        kinds(&read_on_leader(&mut c, 7)),
        vec![(2, "heartbeat"), (4, "heartbeat")],
        "three of four with the leader"
    );
}
