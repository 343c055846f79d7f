//! The replica-deletion rule (`replica_fate`): a stale or early map never deletes a replica
//! that its group's committed configuration may still count.

use flotilla_placement::*;

fn n(i: u64) -> NodeId {
    NodeId(i)
}

/// Nodes 1..=4 registered, shard 1 on voters 1, 2, 3.
fn state() -> MetaState {
    let mut s = MetaState::default();
    for i in 1..=4 {
        s.apply(MetaCommand::RegisterNode { node: n(i), addr: String::new() }).expect("register");
    }
    s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
    s
}

fn member(index: u64) -> LocalReplica {
    LocalReplica { committed: Some((LogIndex(index), true)), newest_conf: LogIndex(index), removed_at: None }
}

#[test]
fn a_shard_the_view_does_not_know_is_kept() {
    // The view predates the split that made shard 2 (the replica was born of it locally).
    let s = state();
    assert_eq!(replica_fate(n(3), ShardId(2), &member(5), &s), ReplicaFate::Keep);
    assert_eq!(replica_fate(n(3), ShardId(99), &LocalReplica::default(), &s), ReplicaFate::Keep);
    // An empty view (not read yet) keeps everything.
    assert_eq!(replica_fate(n(3), ShardId(1), &member(5), &MetaState::default()), ReplicaFate::Keep);
}

#[test]
fn a_replica_the_map_lists_is_kept_whatever_the_group_says() {
    let s = state();
    let removed = LocalReplica { committed: Some((LogIndex(9), false)), newest_conf: LogIndex(9), removed_at: None };
    assert_eq!(replica_fate(n(1), ShardId(1), &removed, &s), ReplicaFate::Keep, "added back since");
}

#[test]
fn a_map_without_the_node_alone_does_not_delete_a_member() {
    let mut s = state();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    // Removed from the map, but no leader confirmed it left the group: keep.
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: None });
    assert_eq!(replica_fate(n(3), ShardId(1), &member(5), &s), ReplicaFate::Keep);
    // A node the map never listed, with a replica it holds as a member (created from a newer
    // view, or born of a split): kept.
    assert_eq!(replica_fate(n(4), ShardId(1), &member(5), &s), ReplicaFate::Keep);
    // One never reached by its leader holds nothing the group counts.
    assert_eq!(replica_fate(n(4), ShardId(1), &LocalReplica::default(), &s), ReplicaFate::Delete(DeleteReason::Empty));
}

#[test]
fn a_replica_whose_log_adds_it_back_is_kept_until_that_is_committed() {
    let mut s = state();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    let re_added = LocalReplica { committed: Some((LogIndex(9), false)), newest_conf: LogIndex(12), removed_at: None };
    assert_eq!(replica_fate(n(3), ShardId(1), &re_added, &s), ReplicaFate::Keep);
}

#[test]
fn a_tombstone_is_raised_by_newer_configurations_without_the_node() {
    let mut s = state();
    let conf = |index: u64| GroupConf {
        index: LogIndex(index),
        voters: [1, 2].into_iter().map(n).collect(),
        ..Default::default()
    };
    let lead = |s: &mut MetaState, index: u64| {
        let mut report = NodeReport { leading: vec![ShardId(1)], ..Default::default() };
        report.confs.insert(ShardId(1), conf(index));
        s.apply(MetaCommand::Heartbeat { node: n(1), report }).expect("heartbeat");
    };
    lead(&mut s, 5);
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: Some(LogIndex(5)) });
    // The replica holds a newer configuration (index 8): not yet.
    assert_eq!(replica_fate(n(3), ShardId(1), &member(8), &s), ReplicaFate::Keep);
    lead(&mut s, 9);
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: Some(LogIndex(9)) });
    assert_eq!(
        replica_fate(n(3), ShardId(1), &member(8), &s),
        ReplicaFate::Delete(DeleteReason::Tombstone(LogIndex(9)))
    );
}

#[test]
fn the_groups_own_committed_configuration_deletes() {
    let mut s = state();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    let removed = LocalReplica { committed: Some((LogIndex(9), false)), newest_conf: LogIndex(9), removed_at: None };
    assert_eq!(replica_fate(n(3), ShardId(1), &removed, &s), ReplicaFate::Delete(DeleteReason::RemovedByItsGroup));
}

#[test]
fn a_confirmed_tombstone_deletes_only_replicas_not_newer_than_it() {
    let mut s = state();
    let mut report = NodeReport { leading: vec![ShardId(1)], ..Default::default() };
    report.confs.insert(
        ShardId(1),
        GroupConf { index: LogIndex(20), voters: [1, 2].into_iter().map(n).collect(), ..Default::default() },
    );
    s.apply(MetaCommand::Heartbeat { node: n(1), report }).expect("heartbeat");
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: Some(LogIndex(20)) });
    // The replica never learnt of its removal (its leader stopped sending to it).
    assert_eq!(
        replica_fate(n(3), ShardId(1), &member(12), &s),
        ReplicaFate::Delete(DeleteReason::Tombstone(LogIndex(20)))
    );
    assert_eq!(replica_fate(n(3), ShardId(1), &LocalReplica::default(), &s), ReplicaFate::Delete(DeleteReason::Empty));
    // A replica holding a configuration newer than the tombstone was added back since.
    assert_eq!(replica_fate(n(3), ShardId(1), &member(21), &s), ReplicaFate::Keep);
}

/// `node`'s report: it leads shard 1 (or not) and gives `conf` as the group's committed
/// configuration.
fn report_conf(s: &mut MetaState, node: u64, leading: bool, conf: GroupConf) {
    let mut report = NodeReport { leading: if leading { vec![ShardId(1)] } else { vec![] }, ..Default::default() };
    report.confs.insert(ShardId(1), conf);
    s.apply(MetaCommand::Heartbeat { node: n(node), report }).expect("heartbeat");
}

fn conf(index: u64, voters: &[u64]) -> GroupConf {
    GroupConf { index: LogIndex(index), voters: voters.iter().copied().map(n).collect(), ..Default::default() }
}

#[test]
fn a_tombstone_is_confirmed_only_once_the_committed_configuration_leaves_the_node_out() {
    let mut s = state();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    // The map dropped node 3 before Raft did: the leader's committed configuration still
    // counts it, so the tombstone stays unconfirmed and the replica is kept.
    report_conf(&mut s, 1, true, conf(5, &[1, 2, 3]));
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: None });
    assert_eq!(replica_fate(n(3), ShardId(1), &member(5), &s), ReplicaFate::Keep);
    // Raft removed it: confirmed at that configuration's index.
    report_conf(&mut s, 1, true, conf(7, &[1, 2]));
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: Some(LogIndex(7)) });
    // A later configuration without it raises the confirmation (see
    // `a_tombstone_is_raised_by_newer_configurations_without_the_node`).
    report_conf(&mut s, 1, true, conf(9, &[1, 2]));
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: Some(LogIndex(9)) });
}

#[test]
fn only_a_voter_that_leads_the_shard_confirms_a_tombstone() {
    let mut s = state();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    // A voter that does not lead the shard (a deposed leader's lingering report).
    report_conf(&mut s, 2, false, conf(7, &[1, 2]));
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: None });
    // A node that is no voter of the shard, even if it says it leads it.
    report_conf(&mut s, 4, true, conf(7, &[1, 2]));
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: None });
    // A leader's joint configuration is not the end of the change.
    report_conf(&mut s, 1, true, GroupConf { joint: true, ..conf(6, &[1, 2]) });
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: None });
    assert_eq!(replica_fate(n(3), ShardId(1), &member(5), &s), ReplicaFate::Keep);
    report_conf(&mut s, 1, true, conf(7, &[1, 2]));
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: Some(LogIndex(7)) });
}

#[test]
fn a_confirmed_tombstone_stays_until_its_node_no_longer_reports_the_replica() {
    let mut s = state();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    report_conf(&mut s, 1, true, conf(7, &[1, 2]));
    // Node 3 has not deleted its replica yet: it still reports it.
    let mut report = NodeReport::default();
    report.applied.insert(ShardId(1), LogIndex(6));
    s.apply(MetaCommand::Heartbeat { node: n(3), report }).expect("heartbeat");
    assert_eq!(s.tombstones[&ShardId(1)][&n(3)], Tombstone { confirmed: Some(LogIndex(7)) });
    // It deleted it: the tombstone has done its work.
    s.apply(MetaCommand::Heartbeat { node: n(3), report: NodeReport::default() }).expect("heartbeat");
    assert!(s.tombstones.is_empty());
}

/// A replica that missed its removal and whose tombstone is gone (a split entry started it
/// late, on an old configuration that holds its node): a member's word that a committed
/// configuration newer than anything the replica holds leaves the node out deletes it.
#[test]
fn a_members_notice_of_a_newer_committed_removal_deletes_a_replica_that_missed_it() {
    let mut s = state();
    let e = s.map.get(ShardId(1)).expect("shard").epoch;
    s.apply(MetaCommand::RemoveReplica { shard: ShardId(1), epoch: e, node: n(3) }).expect("remove");
    s.tombstones.clear();
    let told = |newest: u64, at: Option<u64>| LocalReplica {
        committed: Some((LogIndex(newest), true)),
        newest_conf: LogIndex(newest),
        removed_at: at.map(LogIndex),
    };
    assert_eq!(replica_fate(n(3), ShardId(1), &told(5, None), &s), ReplicaFate::Keep, "nothing says it was removed");
    assert_eq!(
        replica_fate(n(3), ShardId(1), &told(5, Some(20)), &s),
        ReplicaFate::Delete(DeleteReason::ToldByAMember(LogIndex(20)))
    );
    // Its log already holds a configuration at or after the notice's: it may have been added
    // back; its own committed configuration decides.
    assert_eq!(replica_fate(n(3), ShardId(1), &told(20, Some(20)), &s), ReplicaFate::Keep);
    assert_eq!(replica_fate(n(3), ShardId(1), &told(25, Some(20)), &s), ReplicaFate::Keep);
    // The map lists the node (added back, or the view lags): kept, whatever it was told.
    assert_eq!(replica_fate(n(1), ShardId(1), &told(5, Some(20)), &s), ReplicaFate::Keep);
}
