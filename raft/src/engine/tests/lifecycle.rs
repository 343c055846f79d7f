//! Replica lifecycle: an emptied replica must not vote while it holds no configuration
//! (`Config::votes_need_configuration`).

use super::*;

/// Node 2 acknowledged "x" with leader 1; its state is then deleted and it comes back empty
/// (a replica destroyed and re-created). Node 3 never saw "x". With leader 1 gone, node 3 must
/// not win an election with the empty node's vote: that would lose an acknowledged entry.
fn cluster_with_an_emptied_voter(pre_vote: bool) -> Cluster {
    let config = Config { pre_vote, check_quorum: false, lease_read: false, votes_need_configuration: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config.clone());
    c.cut.extend([(n(1), n(3))]);
    let x = c.propose(1, "x");
    c.stabilize();
    assert!(c.engine(1).committed() >= x, "x is committed by nodes 1 and 2");
    c.nodes.insert(n(2), TestNode::new(2, &config, 7));
    c.cut.extend([(n(1), n(2)), (n(2), n(1)), (n(3), n(1))]);
    c
}

/// Node 3 campaigns (with or without pre-vote); the emptied node 2 must refuse it.
fn an_empty_replica_refuses(pre_vote: bool, refusal: MessageBody) {
    let mut c = cluster_with_an_emptied_voter(pre_vote);
    c.now = c.now.add_ms(1000);
    c.fire(3);
    c.stabilize();
    assert_ne!(c.engine(3).role(), Role::Leader, "node 3 lacks the acknowledged entry");
    let refused = c.nodes[&n(2)].seen.iter().any(|a| matches!(a, Action::Send(m) if m.to == n(3) && m.body == refusal));
    assert!(refused, "the empty replica refuses: {refusal:?}");
    assert!(!c.engine(2).has_configuration());
}

#[test]
fn an_empty_replica_grants_no_pre_vote() {
    an_empty_replica_refuses(true, MessageBody::PreVoteResp { granted: false });
}

#[test]
fn an_empty_replica_grants_no_vote() {
    an_empty_replica_refuses(false, MessageBody::VoteResp { granted: false });
}

#[test]
fn without_the_rule_an_empty_replica_votes_as_a_cluster_formed_by_one_member_needs() {
    let config = Config { votes_need_configuration: false, ..cfg() };
    let mut c = Cluster::new(&[1, 2, 3], config);
    let now = c.now;
    c.node(1).engine.initialize(now, Membership::new([n(1), n(2), n(3)])).expect("init");
    c.elect(1);
    assert!(c.engine(2).has_configuration(), "the elected leader hands its configuration on");
}
