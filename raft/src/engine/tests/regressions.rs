//! Regression tests: each protocol bug the deterministic simulator once found, kept as a
//! named test of the rule that fixed it. The comment in each says why the rule matters; the
//! engine code that implements it points here.

use super::*;

#[test]
fn a_node_removed_by_an_uncommitted_configuration_still_campaigns() {
    // Node 3 alone holds the entry that removes it. The others still run the joint
    // configuration and need its vote, which it refuses them for their shorter log; if it
    // did not campaign itself the group would never elect a leader again.
    // Engine: `can_campaign` (a voter of any configuration in the log).
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[1, 2, 4])).unwrap();
    // Let the joint entry commit everywhere, but the final entry reach only node 3.
    let mut final_seen = false;
    c.stabilize_with(|m| {
        let carries_final = matches!(&m.body, MessageBody::Append { entries, .. }
            if entries.iter().any(|e| e.membership().is_some_and(|m| !m.is_joint() && m.voters.len() == 3 && !m.voters.contains(&n(3)))));
        final_seen |= carries_final;
        // Once the final configuration is out, node 1's messages reach only node 3.
        !(final_seen && m.from == n(1) && m.to != n(3))
    });
    assert!(final_seen);
    assert!(!c.engine(3).membership().membership.is_voter(n(3)), "node 3 holds its removal");
    assert!(c.engine(2).membership().membership.is_joint(), "node 2 does not");
    // The leader dies. Node 3 must campaign: it is a voter of the joint configuration, which
    // is the last one it knows to be committed.
    c.nodes.remove(&n(1));
    c.now = c.now.add_ms(1000);
    let now = c.now;
    c.node(3).engine.handle_timeout(now);
    let out = c.take_outbox(3);
    assert!(
        out.iter().any(|m| matches!(m.body, MessageBody::PreVote { .. } | MessageBody::Vote { .. })),
        "node 3 campaigns: {out:?}"
    );
}

#[test]
fn a_vote_request_from_an_older_term_is_refused_with_our_term() {
    // A stale vote request must still be answered, with our term: otherwise the candidate with
    // the most up-to-date log never learns the higher terms that candidates which cannot win
    // keep reaching, stays a term behind forever, and the group elects no leader.
    // Engine: `handle_message` answers every stale Vote with a refusal in our term.
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    let now = c.now;
    let stale = Message {
        from: n(3),
        to: n(2),
        term: Term(0),
        body: MessageBody::Vote { last_log_id: LogId::new(9, 99), transfer: false },
    };
    c.node(2).engine.handle_message(now, stale);
    let out = c.take_outbox(2);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].body, MessageBody::VoteResp { granted: false });
    assert_eq!(out[0].term, c.engine(2).term());
}

#[test]
fn a_refused_vote_request_from_a_higher_term_does_not_reset_the_election_timer() {
    // Reference: Raft §5.2 (only a leader's messages and granted votes reset the timer). If
    // refusing a vote from a higher term restarted the timer, candidates that cannot win,
    // each bumping the term, would keep the node with the most up-to-date log from ever
    // campaigning (without pre-vote, and likelier with clock drift).
    // Engine: `become_follower` keeps a follower's timer when no leader is known.
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    c.propose(1, "x");
    c.stabilize();
    c.nodes.remove(&n(1));
    let deadline = c.engine(2).next_deadline();
    // Node 3 (with an older log) asks node 2 for votes in ever higher terms.
    for t in 0..5u64 {
        let now = c.now.add_ms(10 * t);
        let term = c.engine(2).term().next();
        let m = Message {
            from: n(3),
            to: n(2),
            term,
            body: MessageBody::Vote { last_log_id: LogId::new(1, 1), transfer: false },
        };
        c.node(2).engine.handle_message(now, m);
        c.node(2).run(now);
        assert_eq!(c.engine(2).next_deadline(), deadline, "refusing a vote does not push the timer out");
    }
}
