//! Leadership transfer: `TimeoutNow` once the target is caught up, refused targets, and the
//! lease a transfer voids.

use super::*;

#[test]
fn transfer_sends_timeout_now_once_the_target_is_caught_up() {
    // Reference: Raft thesis §3.10.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.cut.insert((n(1), n(3)));
    c.propose(1, "a");
    c.stabilize();
    let now = c.now;
    c.node(1).engine.transfer_leader(now, n(3)).unwrap();
    assert_eq!(c.node(1).engine.propose(now, vec![Bytes::new()]), Err(RaftError::TransferInProgress));
    let out = c.take_outbox(1);
    assert!(!out.iter().any(|m| m.body == MessageBody::TimeoutNow), "target is behind: no TimeoutNow yet");
    c.cut.clear();
    for m in out {
        c.deliver(m);
    }
    c.settle(3);
    assert!(c.nodes[&n(1)]
        .seen
        .iter()
        .any(|a| matches!(a, Action::Send(m) if m.to == n(3) && m.body == MessageBody::TimeoutNow)));
    assert_eq!(c.engine(3).role(), Role::Leader, "voters grant despite their lease: it is a transfer");
    assert_eq!(c.engine(1).role(), Role::Follower);
    assert_eq!(c.engine(1).leader(), Some(n(3)));
}

#[test]
fn transfer_to_a_learner_is_refused() {
    let mut c = Cluster::with_leader(&[1, 2], cfg());
    c.add_learner(1, 3);
    let now = c.now;
    assert!(matches!(c.node(1).engine.transfer_leader(now, n(3)), Err(RaftError::InvalidTarget(..))));
}

#[test]
fn a_leader_that_sent_timeout_now_never_serves_lease_reads_again_in_its_term() {
    // The target may win an election that ignores leases even after the transfer timed out
    // at the leader (e.g. TimeoutNow was delayed), so the lease must stay void.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.settle(1);
    let now = c.now;
    c.node(1).engine.transfer_leader(now, n(2)).unwrap();
    // TimeoutNow goes out (the target is caught up) but is lost.
    let out = c.take_outbox(1);
    assert!(out.iter().any(|m| m.body == MessageBody::TimeoutNow));
    // The transfer times out; heartbeats keep flowing.
    c.settle(12);
    assert_eq!(c.engine(1).role(), Role::Leader);
    let now = c.now;
    c.node(1).engine.read(now, 9, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(c.nodes[&n(1)].reads.is_empty(), "no lease read without a round trip");
    assert!(out.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })), "falls back to ReadIndex");
}

/// Only the leader hands leadership over: a `TimeoutNow` from any other node is ignored. An
/// election it started would ignore the followers' leases while the real leader's lease still
/// holds (only a leader that sent `TimeoutNow` voids its own), and that leader could then
/// serve a stale lease read.
#[test]
fn timeout_now_from_a_node_other_than_the_leader_is_ignored() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.settle(1);
    let term = c.engine(3).term();
    let now = c.now;
    c.node(3).engine.handle_message(now, Message { from: n(2), to: n(3), term, body: MessageBody::TimeoutNow });
    c.node(3).run(now);
    assert_eq!(c.engine(3).role(), Role::Follower);
    assert_eq!(c.engine(3).term(), term);
    // From the leader it is obeyed.
    c.node(3).engine.handle_message(now, Message { from: n(1), to: n(3), term, body: MessageBody::TimeoutNow });
    c.node(3).run(now);
    assert_eq!(c.engine(3).role(), Role::Candidate);
}
