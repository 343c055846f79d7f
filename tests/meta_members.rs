//! The meta group's own replicas follow the cluster's nodes: a draining meta voter is replaced
//! by a replica on another node, and the node left out deletes its replica and follows the
//! meta leader from then on.

mod common;

use common::cluster::Cluster;
use flotilla::meta::META_GROUP;
use flotilla::placement::NodeId;
use flotilla::wire::{AdminRequest, AdminResponse};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_meta_leader_is_replaced_and_its_node_follows_the_new_leader() {
    let c = Cluster::start_with(4, &[1, 2, 3], &[1, 2, 3], flotilla::meta::dev_split_keys(2), |_| {}).await;
    let client = c.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let view = c.node(1).meta_view();
        let registered = view.nodes.len() == 4 && view.nodes.values().all(|n| !n.addr.is_empty());
        // The leader as the leader itself knows it (another node's idea of it may be stale).
        let mut leader = None;
        for id in 1..=3 {
            let info = c.node(id).host().group_info_of(META_GROUP).await.unwrap();
            if info.role == flotilla::raft::Role::Leader {
                leader = Some(NodeId(id));
            }
        }
        if let (true, Some(l)) = (registered, leader) {
            break l;
        }
        assert!(Instant::now() < deadline, "node 4 never registered, or no meta leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The meta leader's own node drains: the leadership moves, a replica on node 4 catches up
    // and takes the drained voter's place, three voters throughout.
    client.admin(AdminRequest::Drain { node: leader, draining: true }).await.unwrap();
    let expected: BTreeSet<NodeId> = [1, 2, 3, 4].into_iter().map(NodeId).filter(|n| *n != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let now_leading = loop {
        let mut done = None;
        for id in expected.iter() {
            let info = c.node(id.0).host().group_info_of(META_GROUP).await;
            let Ok(info) = info else { continue };
            let conf = &info.committed_conf.membership;
            let voters: BTreeSet<NodeId> = conf.voters.iter().copied().collect();
            if info.leader == Some(*id) && voters == expected && conf.learners.is_empty() && !conf.is_joint() {
                done = Some(*id);
            }
        }
        if let Some(l) = done {
            break l;
        }
        assert!(Instant::now() < deadline, "the meta group never left node {leader}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The node left out deletes its replica (it would read a state nobody changes any more)
    // and follows the meta leader: a change made after it reaches its view.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.node(leader.0).host().groups().contains(&META_GROUP) {
        assert!(Instant::now() < deadline, "node {leader} keeps a replica its group removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.admin(AdminRequest::Drain { node: leader, draining: false }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = c.node(leader.0).meta_view();
        if view.nodes.get(&leader).is_some_and(|n| !n.draining) {
            break;
        }
        assert!(Instant::now() < deadline, "node {leader}'s view stays where its replica left it");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = client.admin_on(now_leading, AdminRequest::Status).await.unwrap();
    let AdminResponse::Status(status) = status else { panic!("{status:?}") };
    assert_eq!(status.meta_voters.into_iter().collect::<BTreeSet<_>>(), expected);
    client.close().await;
}
