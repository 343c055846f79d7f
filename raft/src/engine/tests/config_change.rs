//! Configuration changes: learners, joint consensus, promotion and removal (of the leader too).

use super::*;

#[test]
fn learner_receives_the_log_but_does_not_count() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    c.propose(1, "x");
    c.stabilize();
    assert_eq!(c.applied_data(4), vec!["x".to_string()]);
    assert_eq!(c.engine(4).role(), Role::Learner);
    // Nodes 2 and 3 down: the learner cannot make a quorum with the leader.
    c.cut.extend([(n(2), n(1)), (n(3), n(1))]);
    let idx = c.propose(1, "y");
    c.stabilize();
    assert!(c.engine(1).committed() < idx);
    // A learner never campaigns.
    c.now = c.now.add_ms(5000);
    let now = c.now;
    c.node(4).engine.handle_timeout(now);
    assert_eq!(c.engine(4).role(), Role::Learner);
    assert!(c.take_outbox(4).is_empty());
}

#[test]
fn joint_consensus_needs_both_majorities_then_leaves_automatically() {
    // Reference: Raft thesis §4.3.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    for id in [4, 5] {
        c.nodes.insert(n(id), TestNode::new(id, &cfg(), id));
    }
    // New voters 1,4,5 while the old are 1,2,3. Cut 4 and 5: the joint entry can reach a
    // majority of the old set but not of the new.
    c.cut.extend([(n(1), n(4)), (n(1), n(5))]);
    let now = c.now;
    let joint = c.node(1).engine.change_membership(now, voters(&[1, 4, 5])).unwrap();
    c.stabilize();
    assert!(c.engine(1).membership().membership.is_joint());
    assert!(c.engine(1).committed() < joint, "old majority alone does not commit the joint entry");
    assert_eq!(c.node(1).engine.change_membership(now, voters(&[1, 2])), Err(RaftError::ChangeInProgress));
    c.cut.clear();
    c.advance(20);
    c.stabilize();
    let m = c.engine(1).committed_membership().clone();
    assert!(!m.membership.is_joint(), "leader leaves the joint configuration on its own");
    assert_eq!(m.membership.voters, voters(&[1, 4, 5]));
    c.propose(1, "after");
    c.stabilize();
    assert_eq!(c.applied_data(5), vec!["after".to_string()]);
}

#[test]
fn promoting_a_learner_and_removing_the_leader() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[2, 3, 4])).unwrap();
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Follower, "a removed leader steps down once the change commits");
    assert_eq!(c.engine(2).committed_membership().membership.voters, voters(&[2, 3, 4]));
    assert!(c.engine(2).committed_membership().membership.learners.is_empty());
    // The remaining voters elect a leader; node 1 does not campaign.
    c.now = c.now.add_ms(1000);
    let now = c.now;
    c.node(1).engine.handle_timeout(now);
    assert!(c.take_outbox(1).is_empty());
    c.elect(4);
    c.propose(4, "z");
    c.stabilize();
    assert_eq!(c.applied_data(2).last().map(String::as_str), Some("z"));
}

#[test]
fn initialize_refuses_a_membership_without_this_node_and_add_learner_refuses_a_voter() {
    let mut node = TestNode::new(1, &cfg(), 1);
    let err = node.engine.initialize(Millis(0), Membership::new([n(2), n(3)])).unwrap_err();
    assert!(matches!(err, RaftError::InvalidMembership(_)), "{err:?}");
    assert!(node.engine.is_pristine(), "nothing was written");
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    assert!(matches!(c.node(1).engine.add_learner(now, n(2)), Err(RaftError::InvalidTarget(..))));
}

#[test]
fn remove_learner_stops_replication_to_it_and_refuses_a_voter() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    c.propose(1, "a");
    c.stabilize();
    assert_eq!(c.applied_data(4), vec!["a".to_string()]);
    let now = c.now;
    assert!(matches!(c.node(1).engine.remove_learner(now, n(2)), Err(RaftError::InvalidTarget(..))));
    let idx = c.node(1).engine.remove_learner(now, n(4)).expect("leader removes a learner");
    c.stabilize();
    assert!(c.engine(1).committed() >= idx);
    assert!(!c.engine(1).committed_membership().membership.contains(n(4)));
    // Removing it again changes nothing.
    let now = c.now;
    assert_eq!(c.node(1).engine.remove_learner(now, n(4)), Ok(c.engine(1).membership().log_id.index));
    c.propose(1, "b");
    c.settle(3);
    assert_eq!(c.applied_data(4), vec!["a".to_string()], "nothing is sent to a removed learner");
    assert_eq!(c.applied_data(2), vec!["a".to_string(), "b".to_string()]);
}

/// With commit notices held for a heartbeat interval (the shard host's setting), a removed
/// learner still hears that its removal committed: the held notice goes with the heartbeat
/// round, before the leader forgets the learner.
#[test]
fn a_removed_learner_learns_its_removal_committed_when_notices_are_held() {
    let config = Config { commit_notice_delay_ms: 20, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.add_learner(1, 4);
    c.propose(1, "a");
    c.settle(2);
    // Just after a heartbeat round: the next one is due 20 ms on, the notice 25 ms on.
    c.advance(5);
    let now = c.now;
    let idx = c.node(1).engine.remove_learner(now, n(4)).expect("leader removes a learner");
    c.stabilize();
    assert!(c.engine(1).committed() >= idx);
    assert!(c.engine(4).committed() < idx, "held: no notice yet");
    // The heartbeat round comes first; the leader forgets node 4 then.
    c.advance(16);
    c.stabilize();
    c.settle(3);
    assert!(c.engine(4).committed() >= idx, "node 4 never heard its removal committed");
    assert!(!c.engine(4).committed_membership().membership.contains(n(4)));
}

#[test]
fn with_the_rule_a_learner_becomes_a_voter_once_it_holds_the_configuration_entry() {
    let config = Config { votes_need_configuration: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    // Node 4 is added as a learner while cut off: it has not received the configuration.
    // Node 3 is cut off too: an existing voter lagging behind the configuration entry does
    // not hold the promotion back (it already holds a configuration; the rule is for new
    // voters only).
    c.cut.insert((n(1), n(4)));
    c.cut.insert((n(1), n(3)));
    c.add_learner(1, 4);
    let now = c.now;
    assert!(matches!(
        c.node(1).engine.change_membership(now, voters(&[1, 2, 3, 4])),
        Err(RaftError::InvalidTarget(t, _)) if t == n(4)
    ));
    // Once it matched the configuration entry (and nothing after it), it may be promoted.
    c.cut.remove(&(n(1), n(4)));
    c.settle(3);
    let conf = c.engine(1).membership().log_id.index;
    assert_eq!(c.engine(4).last_log_id().index, conf, "the learner holds exactly the configuration entry");
    assert!(c.engine(3).last_log_id().index < conf, "node 3 lags behind the configuration entry");
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[1, 2, 3, 4])).expect("a learner holding the configuration");
}

/// A new leader starts no configuration change before its term's first entry commits, even
/// when the configuration in effect is committed (thesis §4.1 and the fix to the single-server
/// change bug: until then its commit index may lag what an earlier leader committed, and it
/// could not tell whether an earlier leader's change is still under way).
#[test]
fn a_new_leader_changes_the_configuration_only_after_its_first_entry_commits() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    // Node 2 wins an election, but its blank entry reaches nobody yet.
    c.now = c.now.add_ms(1000);
    c.fire(2);
    c.stabilize_with(|m| !matches!(m.body, MessageBody::Append { .. }));
    assert_eq!(c.engine(2).role(), Role::Leader);
    let noop = c.engine(2).last_log_id().index;
    assert!(c.engine(2).committed() < noop);
    assert!(c.engine(2).membership().log_id.index <= c.engine(2).committed(), "the configuration is committed");
    let now = c.now;
    assert_eq!(c.node(2).engine.change_membership(now, voters(&[1, 2])), Err(RaftError::ChangeInProgress));
    assert_eq!(c.node(2).engine.add_learner(now, n(4)), Err(RaftError::ChangeInProgress));
    // Once the blank entry commits (the lost appends are retried after a heartbeat), the
    // change starts.
    c.settle(3);
    assert!(c.engine(2).committed() >= noop);
    let now = c.now;
    assert!(c.node(2).engine.change_membership(now, voters(&[1, 2])).is_ok());
}
