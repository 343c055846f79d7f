//! Unsafe recovery: a replica forced alone after its group lost a majority for good.

use super::*;

fn set(ids: &[u64]) -> BTreeSet<NodeId> {
    ids.iter().map(|i| n(*i)).collect()
}

#[test]
fn a_follower_forced_alone_leads_and_keeps_every_entry_it_held() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.propose(1, "a");
    c.stabilize();
    // Nodes 1 and 2 are lost for good; 3 holds "a".
    c.cut_off(1);
    c.cut_off(2);
    let kept = c.engine(3).last_log_id();
    let term = c.engine(3).term();
    let now = c.now;
    let forced = c.node(3).engine.force_alone(now, &set(&[1, 2]), kept).unwrap();
    assert_eq!(forced, kept.index.next(), "the forced configuration follows everything it held");
    assert_eq!(c.engine(3).membership().membership, Membership::new([n(3)]));
    assert_eq!(c.engine(3).role(), Role::Candidate, "not leader before its vote is durable");
    c.stabilize();
    assert_eq!(c.engine(3).role(), Role::Leader);
    assert!(c.engine(3).term() > term);
    assert!(c.engine(3).committed() > forced, "its own blank entry commits the forced configuration");
    assert_eq!(c.engine(3).committed_membership().membership, Membership::new([n(3)]));
    c.propose(3, "b");
    c.stabilize();
    assert_eq!(c.applied_data(3), vec!["a".to_string(), "b".to_string()]);
}

#[test]
fn a_leader_forced_alone_commits_what_it_could_not_commit_before() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.propose(1, "a");
    c.stabilize();
    c.cut_off(2);
    c.cut_off(3);
    let late = c.propose(1, "late");
    c.stabilize();
    assert!(c.engine(1).committed() < late, "no quorum: not committed");
    let now = c.now;
    let last = c.engine(1).last_log_id();
    let forced = c.node(1).engine.force_alone(now, &set(&[2, 3]), last).unwrap();
    assert_eq!(forced, late.next());
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert_eq!(c.applied_data(1), vec!["a".to_string(), "late".to_string()], "the survivor keeps its whole log");
    // Asked again (a retried request): nothing more happens.
    let now = c.now;
    assert_eq!(c.node(1).engine.force_alone(now, &set(&[2, 3]), last).unwrap(), forced);
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert_eq!(c.engine(1).membership().log_id.index, forced);
}

#[test]
fn a_replica_without_a_configuration_is_refused() {
    let mut c = Cluster::new(&[1], cfg());
    let now = c.now;
    let last = c.engine(1).last_log_id();
    assert!(matches!(c.node(1).engine.force_alone(now, &set(&[2]), last), Err(RaftError::InvalidMembership(_))));
    assert!(c.engine(1).is_pristine(), "nothing was written");
}

#[test]
fn a_forced_replica_does_not_wait_for_the_lost_voters_to_commit() {
    // Five voters, three lost: the two survivors could never elect anyone. One is forced; the
    // other is left out of the new configuration and no longer counts.
    let mut c = Cluster::with_leader(&[1, 2, 3, 4, 5], cfg());
    c.propose(1, "a");
    c.stabilize();
    for id in [1, 2, 3] {
        c.cut_off(id);
    }
    let now = c.now;
    let last = c.engine(4).last_log_id();
    c.node(4).engine.force_alone(now, &set(&[1, 2, 3]), last).unwrap();
    c.stabilize();
    assert_eq!(c.engine(4).role(), Role::Leader);
    let i = c.propose(4, "b");
    c.cut_off(5);
    c.stabilize();
    assert!(c.engine(4).committed() >= i, "committed by the forced replica alone");
}

#[test]
fn a_force_naming_no_dead_majority_or_a_moved_log_is_refused_and_changes_nothing() {
    // A typo in the dead nodes, or a decision made on a state that has moved on, must not
    // make a second leader of a group that still has its quorum.
    let mut c = Cluster::with_leader(&[1, 2, 3, 4, 5], cfg());
    c.propose(1, "a");
    c.stabilize();
    c.cut_off(1);
    c.cut_off(2);
    let last = c.engine(3).last_log_id();
    let term = c.engine(3).term();
    let membership = c.engine(3).membership().clone();
    let refused = |r: Result<LogIndex, RaftError>| matches!(r, Err(RaftError::InvalidMembership(_)));
    let now = c.now;
    // Two of five named dead: three voters are left, a majority.
    assert!(refused(c.node(3).engine.force_alone(now, &set(&[1, 2]), last)));
    // A majority named dead, but the log is not where the request saw it.
    let stale = LogId { term: last.term, index: LogIndex(last.index.0 - 1) };
    assert!(refused(c.node(3).engine.force_alone(now, &set(&[1, 2, 4]), stale)));
    // This node itself named dead.
    assert!(refused(c.node(3).engine.force_alone(now, &set(&[1, 2, 3]), last)));
    assert_eq!(c.engine(3).last_log_id(), last, "nothing appended");
    assert_eq!(c.engine(3).term(), term, "no campaign");
    assert_eq!(c.engine(3).membership(), &membership);
    assert_eq!(c.engine(3).role(), Role::Follower);
    // The right request is served.
    let forced = c.node(3).engine.force_alone(now, &set(&[1, 2, 4]), last).unwrap();
    assert_eq!(forced, last.index.next());
}
