//! Unsafe recovery: a replica forced alone after its group lost a majority for good.

use super::*;

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
    let forced = c.node(3).engine.force_alone(now).unwrap();
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
    let forced = c.node(1).engine.force_alone(now).unwrap();
    assert_eq!(forced, late.next());
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert_eq!(c.applied_data(1), vec!["a".to_string(), "late".to_string()], "the survivor keeps its whole log");
    // Asked again (a retried request): nothing more happens.
    let now = c.now;
    assert_eq!(c.node(1).engine.force_alone(now).unwrap(), forced);
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert_eq!(c.engine(1).membership().log_id.index, forced);
}

#[test]
fn a_replica_without_a_configuration_is_refused() {
    let mut c = Cluster::new(&[1], cfg());
    let now = c.now;
    assert!(matches!(c.node(1).engine.force_alone(now), Err(RaftError::InvalidMembership(_))));
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
    c.node(4).engine.force_alone(now).unwrap();
    c.stabilize();
    assert_eq!(c.engine(4).role(), Role::Leader);
    let i = c.propose(4, "b");
    c.cut_off(5);
    c.stabilize();
    assert!(c.engine(4).committed() >= i, "committed by the forced replica alone");
}
