//! The shard host: many groups on a few pollers, across three in-process hosts over an
//! in-memory network; quiescence and waking; restart; group lifecycle; bad requests.

use flotilla_raft::{GroupId, Membership, NodeId, RaftError, ReadMode, Role};
use flotilla_shard::keys::{group_key, KIND_COMMITTED};
use flotilla_shard::store::CF_RAFT;
use flotilla_shard::{Host, HostError, KeyRange, KvCommand, KvResponse, NodeBatch, Store};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod host_cluster;

use host_cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_groups_on_three_hosts_make_progress_together_and_go_quiet() {
    let n = groups_env(1000);
    let c = Cluster::start(3).await;
    c.create_groups(1..=n).await;
    // Every group elects a leader and takes a write; all are readable linearizably.
    let mut tasks = Vec::new();
    let c = Arc::new(c);
    for g in 1..=n {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.put(GroupId(g), &key(g, "k"), &format!("v{g}")).await;
            (g, r)
        }));
    }
    for t in tasks {
        let (g, r) = t.await.expect("task");
        if r.is_err() {
            for h in &c.hosts {
                let i = h.group_info().await.expect("info").into_iter().find(|i| i.group == GroupId(g));
                eprintln!("host {}: {i:?} stats {:?}", h.node(), h.stats());
            }
        }
        assert_eq!(r.expect("write"), KvResponse::Done { previous: None }, "group {g}");
    }
    for g in [1, n / 2, n] {
        assert_eq!(c.get(GroupId(g), &key(g, "k")).await.expect("read"), Some(format!("v{g}").into_bytes()));
    }
    // Idle groups go quiet on every replica; then each group has exactly one (quiet) leader.
    c.wait_info("all groups quiet", |infos| infos.len() as u64 == n && infos.iter().all(|i| i.quiet)).await;
    let mut leaders = HashMap::new();
    for h in &c.hosts {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader {
                assert!(leaders.insert(i.group, h.node()).is_none(), "two leaders for {}", i.group);
            }
        }
    }
    assert_eq!(leaders.len() as u64, n, "every group has a leader");
    let sent: u64 = c.hosts.iter().map(|h| h.stats().messages_sent.load(Ordering::Relaxed)).sum();
    let batches: u64 = c.hosts.iter().map(|h| h.stats().batches_sent.load(Ordering::Relaxed)).sum();
    eprintln!("{n} groups: {sent} messages in {batches} batches");
    if n >= 100 {
        assert!(sent > 4 * batches, "messages were coalesced per destination ({sent} messages, {batches} batches)");
    }
    // While quiet, the hosts exchange only liveness pings, no Raft messages.
    let raft_msgs = |c: &Cluster| c.hosts.iter().map(|h| h.stats().messages_sent.load(Ordering::Relaxed)).sum::<u64>();
    let before = raft_msgs(&c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(raft_msgs(&c), before, "quiet groups send no Raft messages");
    // A write wakes a quiet group and succeeds.
    let r = c.put(GroupId(n), &key(n, "again"), "x").await.expect("write after quiet");
    assert_eq!(r, KvResponse::Done { previous: None });
    // So does a linearizable read, on groups whose replicas gave back their buffers and their
    // leader its older heartbeat rounds when they went quiet.
    for g in [1, n / 2] {
        assert_eq!(
            c.get(GroupId(g), &key(g, "k")).await.expect("read after quiet"),
            Some(format!("v{g}").into_bytes())
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_groups_led_by_a_node_that_goes_down_elect_a_new_leader() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=30).await;
    for g in 1..=30 {
        c.put(GroupId(g), &key(g, "a"), "1").await.expect("write");
    }
    c.wait_info("all quiet", |infos| infos.iter().all(|i| i.quiet)).await;
    // Find a node that leads some groups and cut it off.
    let mut led: HashMap<NodeId, Vec<GroupId>> = HashMap::new();
    for h in &c.hosts {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader {
                led.entry(h.node()).or_default().push(i.group);
            }
        }
    }
    let (&victim, groups) = led.iter().max_by_key(|(_, g)| g.len()).expect("a leader");
    let groups = groups.clone();
    c.net.cut.write().expect("lock").insert(victim);
    // The others notice the node is down, wake those groups, and elect among themselves.
    let others: Vec<&Host> = c.hosts.iter().filter(|h| h.node() != victim).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for g in &groups {
        loop {
            let mut led_elsewhere = false;
            for h in &others {
                let infos = h.group_info().await.expect("info");
                if infos.iter().any(|i| i.group == *g && i.role == Role::Leader) {
                    led_elsewhere = true;
                }
            }
            if led_elsewhere {
                break;
            }
            assert!(Instant::now() < deadline, "group {g} found no new leader after its leader's node went down");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Groups led elsewhere stay quiet: a down follower does not wake a group.
    for h in &others {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader && !groups.contains(&i.group) {
                assert!(i.quiet, "group {} (leader {}) was woken by a down follower", i.group, h.node());
            }
        }
    }
    c.shutdown().await;
}

/// Waits until every group of `hosts` is quiet and no leader among them has entries to commit;
/// returns each group's last index on its leader.
async fn quiet_on(hosts: &[&Host], groups: usize, what: &str) -> HashMap<GroupId, flotilla_raft::LogIndex> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut last = HashMap::new();
        let mut all_quiet = true;
        for h in hosts {
            for i in h.group_info().await.expect("info") {
                all_quiet &= i.quiet;
                if i.role == Role::Leader && i.committed == i.last_index {
                    last.insert(i.group, i.last_index);
                }
            }
        }
        if all_quiet && last.len() == groups {
            return last;
        }
        assert!(Instant::now() < deadline, "{what}: not quiet after 30 s ({} of {groups} leaders idle)", last.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `host` has applied, in every group of `last`, the leader's last index.
async fn caught_up(host: &Host, last: &HashMap<GroupId, flotilla_raft::LogIndex>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let infos = host.group_info().await.expect("info");
        let lagging: Vec<_> = last
            .iter()
            .filter(|(g, l)| !infos.iter().any(|i| i.group == **g && i.applied >= **l))
            .map(|(g, l)| (*g, infos.iter().find(|i| i.group == *g).map(|i| i.applied), *l))
            .collect();
        if lagging.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} (group, applied, leader's last): {lagging:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three hosts and `groups` with voters on nodes 1 and 2 and a learner on node 3 (returned).
/// A learner never campaigns, so nothing it does of its own accord wakes a quiet leader: only
/// its leader's host noticing that the learner's node answers again can.
async fn voters_and_a_learner(groups: std::ops::RangeInclusive<u64>) -> (Cluster, NodeId) {
    let c = Cluster::start(3).await;
    let learner = NodeId(3);
    let members = Membership {
        voters: BTreeSet::from([NodeId(1), NodeId(2)]),
        outgoing: None,
        learners: BTreeSet::from([learner]),
    };
    for h in &c.hosts {
        for g in groups.clone() {
            h.create_group(GroupId(g), range_of(g), Some(members.clone())).await.expect("create");
        }
    }
    (c, learner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_back_after_missing_writes_catches_up_although_its_groups_went_quiet() {
    let groups = 1..=10u64;
    let (c, learner) = voters_and_a_learner(groups.clone()).await;
    for g in groups.clone() {
        c.put(GroupId(g), &key(g, "a"), "1").await.expect("write");
    }
    let voters = [c.host(NodeId(1)), c.host(NodeId(2))];
    quiet_on(&voters, 10, "before the cut").await;
    c.net.cut.write().expect("lock").insert(learner);
    for g in groups.clone() {
        c.put(GroupId(g), &key(g, "a"), "2").await.expect("write while the learner is cut off");
    }
    // The leaders go quiet again without the learner (its node counts as down).
    let last = quiet_on(&voters, 10, "without the learner").await;
    let behind = c.host(learner).group_info().await.expect("info");
    assert!(behind.iter().all(|i| i.applied < last[&i.group]), "the learner saw writes while cut off: {behind:?}");
    // Back: each leader's host sees the learner's node answer again and wakes the quiet groups
    // where it is a learner, which catch it up and tell it the commit index.
    c.net.cut.write().expect("lock").clear();
    caught_up(c.host(learner), &last, "the learner stayed behind in quiet groups").await;
    // And the leaders go quiet again.
    quiet_on(&voters, 10, "after the catch-up").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_busy_when_its_leader_went_quiet_goes_quiet_once_its_work_is_done() {
    let (c, learner) = voters_and_a_learner(1..=1).await;
    let g = GroupId(1);
    c.put(g, &key(1, "a"), "1").await.expect("write");
    let voters = [c.host(NodeId(1)), c.host(NodeId(2))];
    quiet_on(&voters, 1, "before").await;
    // The learner's applies wait, so it is still applying the next write when its leader goes
    // quiet, and refuses the leader's notice.
    c.host(learner).hold_applies(true);
    let deferred = c.host(learner).stats().quiesce_deferred.load(Ordering::Relaxed);
    c.put(g, &key(1, "a"), "2").await.expect("write");
    let last = quiet_on(&voters, 1, "with the learner's applies held").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.host(learner).stats().quiesce_deferred.load(Ordering::Relaxed) == deferred {
        assert!(Instant::now() < deadline, "the learner never kept the leader's notice for later");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = c.host(learner).group_info_of(g).await.expect("info");
    assert!(!info.quiet && info.applied < last[&g], "the learner was not busy when the notice came: {info:?}");
    // Its work done, it goes quiet on the notice it refused, with nothing more from the leader
    // (a learner never campaigns: without it, it would tick until the group next woke).
    let woken = voters_woken(&c);
    c.host(learner).hold_applies(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = c.host(learner).group_info_of(g).await.expect("info");
        if info.quiet {
            assert_eq!(info.applied, last[&g], "{info:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the learner stays awake after its applies: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(voters_woken(&c), woken, "the leader was woken for it");
    c.shutdown().await;
}

/// Voters still applying when their leader went quiet keep its notice; if the leader's node
/// counts as down before they are done, they must not take it: a group quiet under a leader
/// already counted down is never woken for it, and with every survivor in that state nobody
/// would campaign. (Elections here wait longer than `peer_down_ms`, so that the survivors are
/// still awake and have not campaigned when the leader counts as down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_busy_when_their_leader_went_quiet_and_died_elect_a_new_leader() {
    let c = Cluster::start_with(3, |cfg| {
        cfg.raft.election_timeout_ms_min = 1500;
        cfg.raft.election_timeout_ms_max = 2000;
    })
    .await;
    c.create_groups(1..=1).await;
    let g = GroupId(1);
    c.put(g, &key(1, "a"), "1").await.expect("write");
    let leader = leader_of_group(&c, g).await;
    let survivors: Vec<NodeId> = [1, 2, 3].map(NodeId).into_iter().filter(|n| *n != leader).collect();
    let all: Vec<&Host> = c.hosts.iter().collect();
    quiet_on(&all, 1, "before").await;
    for n in &survivors {
        c.host(*n).hold_applies(true);
    }
    let deferred = |n: &NodeId| c.host(*n).stats().quiesce_deferred.load(Ordering::Relaxed);
    let before: Vec<u64> = survivors.iter().map(deferred).collect();
    c.put(g, &key(1, "a"), "2").await.expect("write");
    quiet_on(&[c.host(leader)], 1, "the leader, with the survivors' applies held").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while survivors.iter().zip(&before).any(|(n, b)| deferred(n) == *b) {
        assert!(Instant::now() < deadline, "a survivor never kept the leader's notice for later");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The leader's node goes away and counts as down (300 ms) before the survivors are done.
    c.net.cut.write().expect("lock").insert(leader);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in &survivors {
        c.host(*n).hold_applies(false);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    'elected: loop {
        for n in &survivors {
            let info = c.host(*n).group_info_of(g).await.expect("info");
            if info.role == Role::Leader {
                break 'elected;
            }
        }
        assert!(Instant::now() < deadline, "no survivor campaigned: the group went quiet under a dead leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.net.cut.write().expect("lock").clear();
    c.shutdown().await;
}

/// Group 1 with voters on nodes 1 and 2 and a learner on node 3 (returned), quiet, where the
/// learner holds every entry but was never told that the last one committed: its log matches
/// the leader's, so the leader went quiet with it behind on the commit index only. The commit
/// stays hidden from it (`MemNet::hide_commit`) until the caller clears that. Also returns the
/// leader's last index.
async fn a_learner_missing_the_last_commit() -> (Cluster, NodeId, HashMap<GroupId, flotilla_raft::LogIndex>) {
    let (c, learner) = voters_and_a_learner(1..=1).await;
    let g = GroupId(1);
    c.put(g, &key(1, "a"), "1").await.expect("write");
    let voters = [c.host(NodeId(1)), c.host(NodeId(2))];
    let before = quiet_on(&voters, 1, "before").await;
    let next = flotilla_raft::LogIndex(before[&g].0 + 1);
    *c.net.hide_commit.write().expect("lock") = Some((learner, g, next));
    c.put(g, &key(1, "a"), "2").await.expect("write");
    let last = quiet_on(&voters, 1, "with the commit hidden").await;
    let info = c.host(learner).group_info_of(g).await.expect("info");
    assert_eq!(info.last_index, last[&g], "the learner has every entry");
    assert!(info.applied < last[&g], "the learner applied the write although its commit was hidden: {info:?}");
    (c, learner, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_with_every_entry_but_not_the_commit_index_learns_it_when_its_node_answers_again() {
    let (c, learner, last) = a_learner_missing_the_last_commit().await;
    // Its node goes away long enough to count as down, and comes back.
    c.net.cut.write().expect("lock").insert(learner);
    tokio::time::sleep(Duration::from_millis(600)).await;
    *c.net.hide_commit.write().expect("lock") = None;
    c.net.cut.write().expect("lock").clear();
    caught_up(c.host(learner), &last, "the learner never learned the commit index").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_behind_on_the_commit_index_learns_it_when_its_node_comes_back_on_a_new_connection() {
    let (c, learner, last) = a_learner_missing_the_last_commit().await;
    *c.net.hide_commit.write().expect("lock") = None;
    // Its node never stops answering for long enough to count as down (a restart faster than
    // `peer_down_ms`): nothing the leaders see of it says that it may be behind.
    let g = GroupId(1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let info = c.host(learner).group_info_of(g).await.expect("info");
    assert!(info.applied < last[&g], "the learner learned the commit with nothing to tell it: {info:?}");
    // Back on a new connection, as a restarted node's transport comes back: the leader wakes
    // the quiet group where it is a learner.
    *c.net.connections.write().expect("lock").entry(learner).or_insert(1) += 1;
    caught_up(c.host(learner), &last, "the learner stayed behind after its node reconnected").await;
    let voters = [c.host(NodeId(1)), c.host(NodeId(2))];
    quiet_on(&voters, 1, "after the catch-up").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_woken_for_a_learner_stays_awake_until_the_learner_answers() {
    let (c, learner, last) = a_learner_missing_the_last_commit().await;
    let g = GroupId(1);
    let voters = [c.host(NodeId(1)), c.host(NodeId(2))];
    // Its node goes away and comes back answering, but its group is not there yet to hear
    // the heartbeats of the leader woken for it (a restarted host loads its groups after it
    // starts answering). The leader matched the learner's whole log before, and must not take
    // that for a learner that heard the commit.
    c.net.cut.write().expect("lock").insert(learner);
    tokio::time::sleep(Duration::from_millis(600)).await;
    *c.net.hide_commit.write().expect("lock") = None;
    *c.net.unloaded.write().expect("lock") = Some((learner, g));
    let woken_before = voters_woken(&c);
    c.net.cut.write().expect("lock").clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    while voters_woken(&c) == woken_before {
        assert!(Instant::now() < deadline, "no group was woken for the learner");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for the woken leader to go quiet again if it were going to (10 ticks of
    // 10 ms once idle).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let leader = leader_of_group(&c, g).await;
    let info = c.host(leader).group_info_of(g).await.expect("info");
    assert!(!info.quiet, "the leader went quiet again without hearing from the learner: {info:?}");
    let info = c.host(learner).group_info_of(g).await.expect("info");
    assert!(info.applied < last[&g], "the learner heard the commit through a lost group: {info:?}");
    *c.net.unloaded.write().expect("lock") = None;
    caught_up(c.host(learner), &last, "the woken leader went quiet before the learner answered").await;
    quiet_on(&voters, 1, "once the learner answered").await;
    c.shutdown().await;
}

/// Quiet groups woken so far on nodes 1 and 2.
fn voters_woken(c: &Cluster) -> u64 {
    [NodeId(1), NodeId(2)].iter().map(|n| c.host(*n).stats().woken.load(Ordering::Relaxed)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_while_its_node_is_down_catches_up_when_it_answers() {
    let c = Cluster::start(3).await;
    let learner = NodeId(3);
    // Node 3 is cut off before the voters ever hear from it, and its replicas start empty:
    // it knows no peer to ping, and the voters know it only as the target of the learner.
    c.net.cut.write().expect("lock").insert(learner);
    let groups = 1..=5u64;
    for g in groups.clone() {
        for h in [c.host(NodeId(1)), c.host(NodeId(2))] {
            h.create_group(GroupId(g), range_of(g), Some(Membership::new([NodeId(1), NodeId(2)])))
                .await
                .expect("create");
        }
        c.host(learner).create_group(GroupId(g), range_of(g), None).await.expect("create empty");
        c.put(GroupId(g), &key(g, "a"), "1").await.expect("write");
    }
    let voters = [c.host(NodeId(1)), c.host(NodeId(2))];
    // Past `peer_down_ms` since the hosts started: a node never heard from counts as down.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for g in groups.clone() {
        let leader = leader_of_group(&c, GroupId(g)).await;
        c.host(leader).add_learner(GroupId(g), learner).await.expect("add the learner");
    }
    let last = quiet_on(&voters, 5, "without the learner").await;
    c.net.cut.write().expect("lock").clear();
    caught_up(c.host(learner), &last, "the learner added while down never caught up").await;
    let sm = c.host(learner).state_machine(GroupId(1)).expect("the learner's replica");
    assert_eq!(sm.get(key(1, "a").into_bytes()).await.expect("local read"), Some(b"1".to_vec()));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_resumes_every_group_with_its_data() {
    let net = Arc::new(MemNet::default());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let h = Host::open(Store::open(d.path()).expect("open"), config(id.0), net.clone()).await.expect("host");
        net.hosts.write().expect("lock").insert(id, h.clone());
        hosts.push(h);
    }
    let c = Cluster::of(net.clone(), hosts);
    c.create_groups(1..=20).await;
    for g in 1..=20 {
        c.put(GroupId(g), &key(g, "k"), &format!("{g}")).await.expect("write");
    }
    c.shutdown().await;
    // The stores close once every handle is gone.
    net.hosts.write().expect("lock").clear();
    drop(c);
    // Reopen every host on its store: the groups are listed and serve their data.
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let store = Store::open(d.path()).expect("reopen");
        // Rounds write no commit index (each apply batch's applied record carries it): the
        // groups come back from their applied records.
        for g in 1..=20 {
            let committed =
                store.db().get_cf(store.cf(CF_RAFT).expect("cf"), group_key(GroupId(g), KIND_COMMITTED)).expect("read");
            assert_eq!(committed, None, "node {id}, group {g}: a commit index was written");
        }
        let h = Host::open(store, config(id.0), net.clone()).await.expect("host");
        net.hosts.write().expect("lock").insert(id, h.clone());
        assert_eq!(h.groups(), (1..=20).map(GroupId).collect::<Vec<_>>());
        hosts.push(h);
    }
    let c = Cluster::of(net, hosts);
    for g in 1..=20 {
        assert_eq!(
            c.get(GroupId(g), &key(g, "k")).await.expect("read"),
            Some(format!("{g}").into_bytes()),
            "group {g}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_created_listed_and_destroyed_at_run_time_and_bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    net.hosts.write().expect("lock").insert(NodeId(1), host.clone());
    let range = KeyRange { start: b"m".to_vec(), end: Some(b"t".to_vec()) };
    host.create_group(GroupId(5), range.clone(), Some(Membership::new([NodeId(1)]))).await.expect("create");
    let right = KeyRange { start: b"t".to_vec(), end: None };
    host.create_group(GroupId(6), right, Some(Membership::new([NodeId(1)]))).await.expect("create");
    assert!(matches!(host.create_group(GroupId(5), range, None).await, Err(HostError::GroupExists(GroupId(5)))));
    // A node's groups own disjoint ranges.
    assert!(matches!(
        host.create_group(GroupId(7), KeyRange::all(), None).await,
        Err(HostError::RangeTaken { group: GroupId(7), other: GroupId(5) })
    ));
    assert_eq!(host.groups(), vec![GroupId(5), GroupId(6)]);
    // Many at once answer as one at a time would, in order: a group of the batch counts for
    // the ones after it.
    let r = |s: &str, e: &str| KeyRange { start: s.as_bytes().to_vec(), end: Some(e.as_bytes().to_vec()) };
    let one = Some(Membership::new([NodeId(1)]));
    let batch = vec![
        (GroupId(8), r("a", "c"), one.clone()),
        (GroupId(9), r("b", "d"), None),
        (GroupId(5), r("x", "y"), None),
        (GroupId(10), r("s", "u"), None),
        (GroupId(11), r("c", "e"), one.clone()),
    ];
    let done = host.create_groups(batch, false).await;
    let ids: Vec<GroupId> = done.iter().map(|(g, _)| *g).collect();
    assert_eq!(ids, [8, 9, 5, 10, 11].map(GroupId));
    assert!(done[0].1.is_ok() && done[4].1.is_ok(), "{done:?}");
    assert!(matches!(done[1].1, Err(HostError::RangeTaken { group: GroupId(9), other: GroupId(8) })), "{done:?}");
    assert!(matches!(done[2].1, Err(HostError::GroupExists(GroupId(5)))), "{done:?}");
    assert!(matches!(done[3].1, Err(HostError::RangeTaken { group: GroupId(10), other: GroupId(5) })), "{done:?}");
    assert_eq!(host.groups(), [5, 6, 8, 11].map(GroupId));
    for g in [8, 11] {
        host.destroy_group(GroupId(g), true).await.expect("destroy");
    }
    // A single-node group elects itself and serves.
    let put = |k: &str| KvCommand::Put { key: k.as_bytes().to_vec(), value: b"v".to_vec() };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match host.write(GroupId(5), put("n")).await {
            Ok(r) => {
                assert_eq!(r, KvResponse::Done { previous: None });
                break;
            }
            Err(HostError::Raft(RaftError::NotLeader { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    // Outside the range: refused before it reaches the log.
    assert!(matches!(host.write(GroupId(5), put("a")).await, Err(HostError::KeyOutOfRange(GroupId(5)))));
    assert!(matches!(
        host.get(GroupId(5), b"z".to_vec(), ReadMode::ReadIndex).await,
        Err(HostError::KeyOutOfRange(GroupId(5)))
    ));
    // Over the size limits: refused with the limit named.
    let big = KvCommand::Put { key: vec![b'n'; flotilla_shard::KEY_BYTES_MAX + 1], value: Vec::new() };
    assert!(matches!(host.write(GroupId(5), big).await, Err(HostError::TooLarge(m)) if m.contains("key")));
    // Unknown group.
    assert!(matches!(host.write(GroupId(99), put("n")).await, Err(HostError::UnknownGroup(GroupId(99)))));
    // Destroy: gone from the list, calls refused, its state deleted; the store does not
    // resurrect it on restart.
    host.destroy_group(GroupId(5), true).await.expect("destroy");
    assert_eq!(host.groups(), vec![GroupId(6)]);
    assert!(matches!(host.write(GroupId(5), put("n")).await, Err(HostError::UnknownGroup(GroupId(5)))));
    assert!(matches!(host.destroy_group(GroupId(5), true).await, Err(HostError::UnknownGroup(GroupId(5)))));
    assert_eq!(host.store().groups().expect("groups"), vec![GroupId(6)]);
    // A message for a group not on this node is counted, not fatal.
    host.receive(NodeBatch {
        from: NodeId(2),
        messages: vec![(
            GroupId(5),
            flotilla_raft::Message {
                from: NodeId(2),
                to: NodeId(1),
                term: flotilla_raft::Term(1),
                body: flotilla_raft::MessageBody::HeartbeatResp { round: 0 },
            },
        )],
        quiesce: Vec::new(),
        removed: Vec::new(),
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.stats().unknown_group_msgs.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "unknown-group message not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Corrupt batches are an error, not a panic.
    assert!(NodeBatch::decode(b"\x01garbage").is_err());
    // Bad configuration is refused with a reason.
    let mut bad = config(1);
    bad.pollers = 0;
    assert!(matches!(bad.validate(), Err(HostError::Config(_))));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_failure_stops_the_groups_and_calls_get_a_fatal_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    host.create_group(GroupId(1), KeyRange::all(), Some(Membership::new([NodeId(1)]))).await.expect("create");
    let put = KvCommand::Put { key: b"k".to_vec(), value: b"v".to_vec() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.write(GroupId(1), put.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "single-node group never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.store().fail_next_write();
    let err = host.write(GroupId(1), put.clone()).await.expect_err("the disk failed");
    assert!(
        matches!(&err, HostError::Raft(RaftError::Fatal(flotilla_raft::Fatal::Storage(e))) if e.message.contains("injected")),
        "{err}"
    );
    // The group stays stopped; the store refuses writes.
    assert!(host.write(GroupId(1), put).await.is_err());
    assert!(host.group_info().await.expect("info")[0].stopped.as_deref().is_some_and(|m| m.contains("injected")));
    assert!(host.store().poisoned().is_some());
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_catches_up_by_snapshot_through_the_hosts() {
    // Small snapshot threshold and log tail, tiny chunks: the cut-off replica's entries are
    // purged on the others, so it can only catch up from a streamed SST snapshot.
    let c = Cluster::start_with(3, small_snapshots).await;
    c.create_groups(1..=1).await;
    c.put(GroupId(1), &key(1, "first"), "1").await.expect("write");
    // Node 3 must not lead (a cut-off leader leaves its clients waiting until it times out):
    // hand leadership to node 1 if it does, then cut node 3 off.
    let lagging = NodeId(3);
    let infos = c.host(lagging).group_info().await.expect("info");
    if infos[0].role == Role::Leader {
        c.host(lagging).transfer_leader(GroupId(1), NodeId(1)).await.expect("transfer");
    }
    c.net.cut.write().expect("lock").insert(lagging);
    // The leader keeps entries for a follower whose matched index moved within two election
    // timeouts; past that, the log is purged and node 3 needs a snapshot.
    tokio::time::sleep(Duration::from_millis(2 * 300 + 100)).await;
    for i in 0..150 {
        if let Err(e) = c.put(GroupId(1), &key(1, &format!("k{i:03}")), &format!("value {i}")).await {
            for h in &c.hosts {
                eprintln!("host {}: {:?}", h.node(), h.group_info().await.expect("info"));
            }
            panic!("write {i} while cut: {e}");
        }
    }
    c.net.cut.write().expect("lock").clear();
    // Node 3 catches up: same applied index as the others, and the data is in its store.
    c.wait_info("replica 3 caught up", |infos| infos[0].applied.0 >= 150).await;
    let sm = flotilla_shard::KvStateMachine::new(c.host(lagging).store().clone(), GroupId(1), range_of(1));
    for i in [0, 77, 149] {
        let got = sm.get(key(1, &format!("k{i:03}")).into_bytes()).await.expect("local read");
        assert_eq!(got, Some(format!("value {i}").into_bytes()), "key {i} on the caught-up replica");
    }
    let info = c.host(lagging).group_info().await.expect("info").remove(0);
    assert!(info.first_index.0 > 10, "the replica's log starts after the snapshot it installed: {info:?}");
    // Every chunk went to the network's transfer path, none in a batch.
    assert!(c.net.transfers.load(Ordering::Relaxed) > 1, "the snapshot's chunks took the transfer path");
    assert_eq!(c.net.chunks_in_batches.load(Ordering::Relaxed), 0, "snapshot chunks in batches");
    // The leader's snapshot is dropped once the transfer ended; the next durability report
    // (a write's) purges the log behind the durable applied index, without a snapshot.
    c.wait_info("the leader dropped its snapshot", |infos| infos[0].snapshot.is_none()).await;
    c.put(GroupId(1), &key(1, "after"), "x").await.expect("write after the catch-up");
    let leader = c.hosts.iter().find(|h| h.node() != lagging).expect("a host");
    let deadline = Instant::now() + Duration::from_secs(10);
    while leader.group_info().await.expect("info")[0].first_index.0 <= 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let linfo = leader.group_info().await.expect("info").remove(0);
    assert!(linfo.first_index.0 > 100, "the log was purged: {linfo:?}");
    assert!(linfo.durable_applied.0 + 1 >= linfo.first_index.0, "purged only behind durability: {linfo:?}");
    c.shutdown().await;
}

/// Writes are answered once committed and computed, before their applied state is stored:
/// a read right after an answered write (ReadIndex or lease, on the leader) must still see it,
/// and a compare-and-swap right after must find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_or_cas_right_after_an_answered_write_sees_it() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=1).await;
    let g = GroupId(1);
    c.put(g, &key(1, "warm"), "up").await.expect("first write");
    let mut leader = leader_of_group(&c, g).await;
    let mut checked = 0;
    for i in 0..200u32 {
        let h = c.host(leader);
        let k = key(1, &format!("k{}", i % 7));
        let v = format!("v{i}").into_bytes();
        // A leader change (a loaded machine) skips the round.
        let r = match h.write(g, KvCommand::Put { key: k.clone().into_bytes(), value: v.clone() }).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) => {
                leader = leader_of_group(&c, g).await;
                continue;
            }
            r => r.expect("write"),
        };
        assert_eq!(r, KvResponse::Done { previous: None });
        let mode = if i % 2 == 0 { ReadMode::ReadIndex } else { ReadMode::Lease };
        match h.get(g, k.clone().into_bytes(), mode).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) => {
                leader = leader_of_group(&c, g).await;
                continue;
            }
            r => assert_eq!(r.expect("read"), Some(v.clone()), "{mode:?} read {i}"),
        }
        let next = format!("w{i}").into_bytes();
        let cas = KvCommand::Cas { key: k.into_bytes(), expected: Some(v.clone()), new: Some(next) };
        match h.write(g, cas).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) => leader = leader_of_group(&c, g).await,
            r => assert_eq!(r.expect("cas"), KvResponse::Done { previous: Some(v) }, "cas {i}"),
        }
        checked += 1;
    }
    assert!(checked >= 150, "only {checked} rounds ran on a stable leader");
    c.shutdown().await;
}

/// Writes to a group that its poller takes in one round become one proposal: one message to
/// each follower carries them all, where a proposal per write sent one per write.
#[tokio::test(flavor = "current_thread")]
async fn writes_taken_in_one_round_reach_the_followers_as_one_proposal() {
    const WRITES: u32 = 64;
    let c = Cluster::start(3).await;
    c.create_groups(1..=1).await;
    let g = GroupId(1);
    c.put(g, &key(1, "warm"), "up").await.expect("first write");
    let h = c.host(leader_of_group(&c, g).await).clone();
    let sent = |h: &Host| h.stats().messages_sent.load(Ordering::Relaxed);
    let before = sent(&h);
    // One thread: every write task runs, and queues its request, before the poller's next round.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..WRITES {
        let h = h.clone();
        let cmd = KvCommand::Put { key: key(1, &format!("k{i}")).into_bytes(), value: b"v".to_vec() };
        calls.spawn(async move { h.write(g, cmd).await });
    }
    while let Some(r) = calls.join_next().await {
        assert_eq!(r.expect("task").expect("write"), KvResponse::Done { previous: None });
    }
    // The proposal's append to each of the two followers, and a few heartbeats or commit
    // notices at most; a proposal per write sent 2 * WRITES.
    let messages = sent(&h) - before;
    assert!(messages <= 8, "{messages} messages for {WRITES} writes");
    for i in 0..WRITES {
        assert_eq!(c.get(g, &key(1, &format!("k{i}"))).await.expect("get"), Some(b"v".to_vec()));
    }
    c.shutdown().await;
}

/// The leader of `g` among `c`'s hosts (waits up to 30 s for one).
async fn leader_of_group(c: &Cluster, g: GroupId) -> NodeId {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for h in &c.hosts {
            let infos = h.group_info().await.expect("info");
            if infos.iter().any(|i| i.group == g && i.role == Role::Leader) {
                return h.node();
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lease reads on a leader whose lease gate is open are served on the caller's thread; a write
/// answered before its application is stored shuts the gate, so a lease read that starts after
/// the answer waits for the stored state instead of reading the state without the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_read_skips_the_poller_but_never_misses_an_answered_write() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=1).await;
    let g = GroupId(1);
    let k = key(1, "k").into_bytes();
    c.put(g, &key(1, "k"), "v1").await.expect("first write");
    let h = c.host(leader_of_group(&c, g).await);
    // Served locally once the applied state holds the answered write and a round was acked.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = h.stats().local_reads.load(Ordering::Relaxed);
    loop {
        assert_eq!(h.get(g, k.clone(), ReadMode::Lease).await.expect("read"), Some(b"v1".to_vec()));
        if h.stats().local_reads.load(Ordering::Relaxed) > before {
            break;
        }
        assert!(Instant::now() < deadline, "no lease read was served on the caller's thread");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Applies are prepared and their writers answered, but not written to the store.
    h.hold_applies(true);
    let r = h.write(g, KvCommand::Put { key: k.clone(), value: b"v2".to_vec() }).await.expect("write answered");
    assert_eq!(r, KvResponse::Done { previous: None });
    let local = h.stats().local_reads.load(Ordering::Relaxed);
    let read = {
        let h = h.clone();
        let k = k.clone();
        tokio::spawn(async move { h.get(g, k, ReadMode::Lease).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    if read.is_finished() {
        panic!("a read answered before the answered write was stored: {:?}", read.await);
    }
    assert_eq!(h.stats().local_reads.load(Ordering::Relaxed), local, "the gate was shut");
    h.hold_applies(false);
    let v = tokio::time::timeout(Duration::from_secs(10), read).await.expect("read done").expect("task");
    assert_eq!(v.expect("read"), Some(b"v2".to_vec()));
    c.shutdown().await;
}

/// Issue 12 (5): a node whose store was poisoned kept answering liveness pings, so the quiet
/// groups it led were never woken on the other nodes and stayed leaderless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_groups_led_by_a_node_whose_store_is_poisoned_elect_a_new_leader() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=20).await;
    for g in 1..=20 {
        c.put(GroupId(g), &key(g, "a"), "1").await.expect("write");
    }
    c.wait_info("all quiet", |infos| infos.iter().all(|i| i.quiet)).await;
    let mut led: HashMap<NodeId, Vec<GroupId>> = HashMap::new();
    for h in &c.hosts {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader {
                led.entry(h.node()).or_default().push(i.group);
            }
        }
    }
    let (&victim, groups) = led.iter().max_by_key(|(_, g)| g.len()).expect("a leader");
    let groups = groups.clone();
    // One failed write poisons the victim's store.
    c.host(victim).store().fail_next_write();
    let put = KvCommand::Put { key: key(groups[0].0, "b").into_bytes(), value: b"2".to_vec() };
    assert!(c.host(victim).write(groups[0], put).await.is_err());
    assert!(c.host(victim).store().poisoned().is_some());
    // Every group it led gets a leader elsewhere within a few election timeouts.
    let others: Vec<&Host> = c.hosts.iter().filter(|h| h.node() != victim).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    for g in &groups {
        loop {
            let mut led_elsewhere = false;
            for h in &others {
                let infos = h.group_info().await.expect("info");
                led_elsewhere |= infos.iter().any(|i| i.group == *g && i.role == Role::Leader);
            }
            if led_elsewhere {
                break;
            }
            assert!(Instant::now() < deadline, "group {g} found no new leader after its leader's store failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The victim's groups are all stopped, and it no longer pings.
    for i in c.host(victim).group_info().await.expect("info") {
        assert!(i.stopped.is_some(), "group {} still runs on the poisoned node", i.group);
    }
    c.shutdown().await;
}

/// Issue 12 (6): two starts of one group (the reconciler's create and a split's start) both
/// checked the registry, then both built and added the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_starts_of_one_group_start_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    let me = Some(Membership::new([NodeId(1)]));
    let (a, b) = tokio::join!(
        host.create_group(GroupId(7), KeyRange::all(), me.clone()),
        host.create_group(GroupId(7), KeyRange::all(), me.clone())
    );
    let exists = |r: &Result<(), HostError>| matches!(r, Err(HostError::GroupExists(GroupId(7))));
    assert!(a.is_ok() != b.is_ok(), "exactly one start succeeds: {a:?} {b:?}");
    assert!(exists(&a) || exists(&b), "the other is refused as a duplicate: {a:?} {b:?}");
    let infos = host.group_info().await.expect("info");
    assert_eq!(infos.iter().filter(|i| i.group == GroupId(7)).count(), 1);
    // Destroyed, the id can be used again.
    host.destroy_group(GroupId(7), true).await.expect("destroy");
    host.create_group(GroupId(7), KeyRange::all(), me).await.expect("create again");
    host.shutdown().await;
}

/// Issue 12 (7): destroying a group did not wait for the snapshot installation in flight,
/// which then ingested the snapshot into the range the destroy had cleared (and wrote the
/// group's Raft keys back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_group_while_it_installs_a_snapshot_leaves_its_range_empty() {
    let c = Cluster::start_with(3, small_snapshots).await;
    c.create_groups(1..=1).await;
    c.put(GroupId(1), &key(1, "first"), "1").await.expect("write");
    let lagging = NodeId(3);
    if c.host(lagging).group_info().await.expect("info")[0].role == Role::Leader {
        c.host(lagging).transfer_leader(GroupId(1), NodeId(1)).await.expect("transfer");
    }
    c.net.cut.write().expect("lock").insert(lagging);
    // The leader keeps entries for a follower whose matched index moved within two election
    // timeouts; past that, the log is purged and node 3 needs a snapshot.
    tokio::time::sleep(Duration::from_millis(2 * 300 + 100)).await;
    for i in 0..150 {
        c.put(GroupId(1), &key(1, &format!("k{i:03}")), "v").await.expect("write while cut");
    }
    let h = c.host(lagging).clone();
    h.store().hold_installs(true);
    c.net.cut.write().expect("lock").clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.store().installs_held() == 0 {
        assert!(Instant::now() < deadline, "node 3 never started installing a snapshot");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let destroy = tokio::spawn({
        let h = h.clone();
        async move { h.destroy_group(GroupId(1), true).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.store().hold_installs(false);
    destroy.await.expect("task").expect("destroy");
    let store = h.store();
    let range = range_of(1);
    let end = range.end.clone().expect("bounded");
    let raft_prefix = 1u64.to_be_bytes();
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        let data = store.cf(flotilla_shard::CF_DATA).expect("cf");
        let left = store
            .db()
            .iterator_cf(data, rocksdb_mode(&range.start))
            .map(|kv| kv.expect("iterate").0)
            .take_while(|k| k.as_ref() < end.as_slice())
            .count();
        assert_eq!(left, 0, "keys of the destroyed group came back");
        let raft = store.cf(flotilla_shard::CF_RAFT).expect("cf");
        let raft_keys = store
            .db()
            .iterator_cf(raft, rocksdb_mode(&raft_prefix))
            .map(|kv| kv.expect("iterate").0)
            .take_while(|k| k.starts_with(&raft_prefix))
            .count();
        assert_eq!(raft_keys, 0, "Raft state of the destroyed group came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// Issue 12 (8): the `from` of the Raft messages inside a batch was not checked against the
/// batch's (authenticated) sender, so any peer could speak for another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_claiming_another_sender_than_their_batch_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    let members = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
    host.create_group(GroupId(1), KeyRange::all(), Some(members)).await.expect("create");
    let heartbeat = |from: u64, term: u64| {
        (
            GroupId(1),
            flotilla_raft::Message {
                from: NodeId(from),
                to: NodeId(1),
                term: flotilla_raft::Term(term),
                body: flotilla_raft::MessageBody::Heartbeat {
                    commit: flotilla_raft::LogId::ZERO,
                    round: 0,
                    keep_after: None,
                },
            },
        )
    };
    // Node 2 sends a heartbeat in node 3's name (term 50), then one of its own (term 40).
    host.receive(NodeBatch {
        from: NodeId(2),
        messages: vec![heartbeat(3, 50), heartbeat(2, 40)],
        quiesce: Vec::new(),
        removed: Vec::new(),
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let info = loop {
        let info = host.group_info().await.expect("info").remove(0);
        if info.term.0 >= 40 {
            break info;
        }
        assert!(Instant::now() < deadline, "the genuine heartbeat was not handled: {info:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!((info.term.0, info.leader), (40, Some(NodeId(2))), "the forged message was taken");
    assert_eq!(host.stats().sender_mismatch_msgs.load(Ordering::Relaxed), 1);
    host.shutdown().await;
}

/// The requests queued for one poller are bounded: past the bound a call is refused at once
/// as overloaded (never queued), and the bound frees as the poller takes requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_mailbox_bound_are_refused_as_overloaded() {
    let cluster = Cluster::start_with(1, |c| {
        c.pollers = 1;
        c.mailbox_requests_max = 2;
    })
    .await;
    cluster.create_groups(1..=1).await;
    cluster.put(GroupId(1), &key(1, "a"), "v").await.expect("put");
    let host = cluster.hosts[0].clone();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let host = host.clone();
        calls.spawn(async move { host.get(GroupId(1), key(1, "a").into_bytes(), ReadMode::ReadIndex).await });
    }
    let (mut served, mut refused) = (0, 0);
    while let Some(r) = calls.join_next().await {
        match r.expect("task") {
            Ok(v) => {
                assert_eq!(v, Some(b"v".to_vec()));
                served += 1;
            }
            Err(HostError::Overloaded(n)) => {
                assert!(n >= 2, "refused below the bound: {n}");
                refused += 1;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(served > 0 && refused > 0, "served {served}, refused {refused}");
    // Every request taken gave its place back.
    assert_eq!(cluster.get(GroupId(1), &key(1, "a")).await.expect("get"), Some(b"v".to_vec()));
    cluster.shutdown().await;
}

/// No ReadIndex read misses a write acknowledged before it began: readers race a writer, many
/// reads sharing heartbeat rounds, and each must return at least the last value acknowledged
/// when it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_index_reads_racing_writes_never_miss_an_acknowledged_write() {
    let c = Arc::new(Cluster::start(3).await);
    c.create_groups(1..=1).await;
    c.put(GroupId(1), &key(1, "n"), "0").await.expect("first put");
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (c, acked) = (c.clone(), acked.clone());
        tokio::spawn(async move {
            for i in 1..=100u64 {
                c.put(GroupId(1), &key(1, "n"), &i.to_string()).await.expect("put");
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (c, acked) = (c.clone(), acked.clone());
        readers.spawn(async move {
            let mut reads = 0;
            while acked.load(Ordering::SeqCst) < 100 {
                let floor = acked.load(Ordering::SeqCst);
                let v = c.get(GroupId(1), &key(1, "n")).await.expect("get").expect("a value");
                let seen: u64 = String::from_utf8(v).expect("utf8").parse().expect("a number");
                assert!(seen >= floor, "read {seen} after write {floor} was acknowledged");
                reads += 1;
            }
            reads
        });
    }
    writer.await.expect("writer");
    let mut reads = 0;
    while let Some(r) = readers.join_next().await {
        reads += r.expect("reader");
    }
    // That the reads raced the writes at all: 32 readers, each reading as long as the 100 writes
    // go on. With writer and readers going straight to the leader, a read takes about as long
    // as a write, and the readers got through 5,000–6,500 reads here, alone or beside the
    // binary's other tests.
    assert!(reads >= 1_000, "only {reads} reads raced the writes");
    match Arc::try_unwrap(c) {
        Ok(c) => c.shutdown().await,
        Err(_) => panic!("cluster still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_reading_a_lagging_followers_entries_keeps_serving_its_other_groups() {
    // One poller per host, so both groups share the leader's poller; a small entry cache, so
    // the follower's entries come from storage.
    let c = Cluster::start_with(3, |cfg| {
        cfg.pollers = 1;
        cfg.raft.entry_cache_bytes_max = 1024;
    })
    .await;
    c.create_groups(1..=2).await;
    c.put(GroupId(1), &key(1, "first"), "v").await.expect("write");
    c.put(GroupId(2), &key(2, "first"), "v").await.expect("write");
    let lead = leader_among(&c, &[1, 2, 3], GroupId(1)).await;
    let lead2 = leader_among(&c, &[1, 2, 3], GroupId(2)).await;
    if lead2 != lead {
        c.host(lead2).transfer_leader(GroupId(2), lead).await.expect("transfer");
    }
    while leader_among(&c, &[1, 2, 3], GroupId(2)).await != lead {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let behind = c.hosts.iter().map(|h| h.node()).find(|n| *n != lead).expect("a follower");
    c.net.cut.write().expect("lock").insert(behind);
    for i in 0..200 {
        c.put(GroupId(1), &key(1, &format!("k{i}")), &"x".repeat(100)).await.expect("write while one is cut");
    }
    // The follower comes back while the leader's reads of its entries hang.
    c.host(lead).hold_loads(true);
    c.net.cut.write().expect("lock").remove(&behind);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        for i in 0..20 {
            c.put(GroupId(2), &key(2, &format!("k{i}")), "v").await.expect("write to the other group");
            c.put(GroupId(1), &key(1, &format!("more{i}")), "v").await.expect("write to the lagging group");
        }
    })
    .await;
    c.host(lead).hold_loads(false);
    assert!(served.is_ok(), "writes waited behind a held load of entries");
    // Released, the follower catches up from the log.
    let sm = flotilla_shard::KvStateMachine::new(c.host(behind).store().clone(), GroupId(1), range_of(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let local = sm.get(key(1, "more19").into_bytes()).await.expect("local read");
        if local.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the follower did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sm.get(key(1, "k0").into_bytes()).await.expect("local read").is_some(), "the first entry it missed");
    let info = c.host(behind).group_info().await.expect("info").into_iter().find(|i| i.group == GroupId(1));
    assert_eq!(info.map(|i| i.first_index.0), Some(1), "it caught up from the log, not by snapshot");
    c.shutdown().await;
}

/// A replica cut off while its group removed its node never hears of the removal from the
/// group's log. Once it can reach the others again its messages (pre-votes: it stopped
/// hearing a leader) are answered with the committed configuration that left it out, and the
/// host reports that index for the node's decision, newer than any configuration the replica
/// holds. The members never act on a removed node's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_its_removal_is_told_by_the_members() {
    let c = Cluster::start(3).await;
    let g = GroupId(1);
    c.create_groups(1..=1).await;
    c.put(g, &key(1, "a"), "1").await.expect("write");
    // Node 3 leads nothing (so the removal is not its own), then is cut off and removed.
    for h in &c.hosts {
        if h.group_info_of(g).await.expect("info").role == Role::Leader && h.node() == NodeId(3) {
            h.transfer_leader(g, NodeId(1)).await.expect("transfer");
        }
    }
    c.wait_info("node 3 follows", |_| true).await;
    c.net.cut.write().expect("lock").insert(NodeId(3));
    let voters: BTreeSet<NodeId> = [NodeId(1), NodeId(2)].into();
    let deadline = Instant::now() + Duration::from_secs(20);
    let removed_at = loop {
        let mut done = None;
        for h in &c.hosts[..2] {
            if let Ok(at) = h.change_membership(g, voters.clone()).await {
                done = Some(at);
            }
        }
        if let Some(at) = done {
            break at;
        }
        assert!(Instant::now() < deadline, "node 3 was not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.put(g, &key(1, "b"), "2").await.expect("a write after the removal");
    let before = c.host(NodeId(3)).group_info_of(g).await.expect("info");
    assert!(before.newest_conf < removed_at, "node 3 holds only the old configuration");
    assert_eq!(before.removed_at, None);
    c.net.cut.write().expect("lock").clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    let told = loop {
        let i = c.host(NodeId(3)).group_info_of(g).await.expect("info");
        if let Some(at) = i.removed_at {
            break (at, i.newest_conf);
        }
        assert!(Instant::now() < deadline, "node 3 was never told it was removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(told.0 >= removed_at && told.1 < told.0, "told of index {} holding {}", told.0, told.1);
    // The members went on without it.
    c.put(g, &key(1, "c"), "3").await.expect("a write after the removal");
    c.shutdown().await;
}

/// A removal decided on a reading of a group's state is carried out only if the group has not
/// changed since (`Host::destroy_group_if`): the poller judges and stops it in one step. Here a
/// configuration change lands between the reading and the removal, and the group is kept, still
/// serving; with the reading still true it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_decided_before_the_group_changed_is_not_carried_out() {
    let c = Cluster::start(3).await;
    let g = GroupId(1);
    c.create_groups(1..=1).await;
    c.put(g, &key(1, "a"), "1").await.expect("write");
    let h3 = c.host(NodeId(3));
    let seen = h3.group_info_of(g).await.expect("info").newest_conf;
    // The group changes: node 3 leaves the voters and comes back (two configurations).
    let all: BTreeSet<NodeId> = [NodeId(1), NodeId(2), NodeId(3)].into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while h3.group_info_of(g).await.expect("info").newest_conf == seen {
        for h in &c.hosts {
            let _ = h.change_membership(g, all.iter().copied().filter(|n| *n != NodeId(3)).collect()).await;
        }
        assert!(Instant::now() < deadline, "no configuration change reached node 3");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = h3.destroy_group_if(g, true, Box::new(move |i| i.newest_conf == seen)).await;
    assert!(matches!(kept, Err(HostError::Kept(GroupId(1)))), "{kept:?}");
    assert!(h3.groups().contains(&g), "the group is still here");
    assert!(h3.group_info_of(g).await.is_ok(), "and its poller still runs it");
    let now = h3.group_info_of(g).await.expect("info").newest_conf;
    h3.destroy_group_if(g, true, Box::new(move |i| i.newest_conf == now)).await.expect("unchanged: removed");
    assert!(!h3.groups().contains(&g));
    c.shutdown().await;
}

/// What `Host::group_info_shared` answers, as a fresh read describes it: the same but for the
/// `quiet` flags, which the generation does not follow.
fn without_quiet(infos: &[flotilla_shard::GroupInfo]) -> Vec<flotilla_shard::GroupInfo> {
    infos.iter().cloned().map(|i| flotilla_shard::GroupInfo { quiet: false, ..i }).collect()
}

/// The host's generation of summaries stands still while no group changes (a read that
/// wakes a quiet group included), and moves with a write, a leader change and a group
/// removed; the shared summaries are read again exactly when it moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_generation_moves_with_every_change_of_a_group_and_only_then() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=12).await;
    for g in 1..=12 {
        c.put(GroupId(g), &key(g, "a"), "1").await.expect("write");
    }
    c.wait_info("all quiet", |infos| infos.iter().all(|i| i.quiet)).await;
    let h = &c.hosts[0];
    // Settled: the generation stood for half a second (late durable indexes, log purges).
    let deadline = Instant::now() + Duration::from_secs(30);
    let g0 = loop {
        let g = h.info_generation();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if h.info_generation() == g {
            break g;
        }
        assert!(Instant::now() < deadline, "the generation never settled");
    };
    let (g1, shared) = h.group_info_shared().await.expect("shared");
    assert_eq!(without_quiet(&shared), without_quiet(&h.group_info().await.expect("info")));
    // Nothing changes: the same answer, not asked of the pollers again.
    let (g2, again) = h.group_info_shared().await.expect("shared");
    assert_eq!((g1, g2), (g0, g0), "no group changed");
    assert!(Arc::ptr_eq(&shared, &again), "the shared answer is kept while the generation stands");
    // A linearizable read wakes the group's replicas and changes nothing of their summaries.
    assert_eq!(c.get(GroupId(2), &key(2, "a")).await.expect("read"), Some(b"1".to_vec()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.info_generation(), g0, "a read changed no summary");

    // A write: every replica applies it, and each host's generation moves past it.
    let before: Vec<u64> = c.hosts.iter().map(|h| h.info_generation()).collect();
    c.put(GroupId(5), &key(5, "b"), "2").await.expect("write");
    let applied = |infos: &[flotilla_shard::GroupInfo]| infos.iter().find(|i| i.group == GroupId(5)).map(|i| i.applied);
    // The write's entry is the leader's last: its applied index may not have caught up yet
    // (a write is answered when its apply starts, before the applied state is written).
    let leader_infos = c.host(leader_among(&c, &[1, 2, 3], GroupId(5)).await).group_info().await.expect("info");
    let target = leader_infos.iter().find(|i| i.group == GroupId(5)).map(|i| i.last_index);
    c.wait_info("group 5 applied the write everywhere", |infos| applied(infos) == target).await;
    for (h, b) in c.hosts.iter().zip(&before) {
        let (g, shared) = h.group_info_shared().await.expect("shared");
        assert!(g > *b, "host {}: a write moved the generation", h.node());
        assert_eq!(applied(&shared), target, "host {}: the shared answer holds the write", h.node());
    }

    // A leader change.
    let leader = leader_among(&c, &[1, 2, 3], GroupId(7)).await;
    let to = NodeId(leader.0 % 3 + 1);
    let g_to = c.host(to).info_generation();
    c.host(leader).transfer_leader(GroupId(7), to).await.expect("transfer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, shared) = c.host(to).group_info_shared().await.expect("shared");
        if shared.iter().any(|i| i.group == GroupId(7) && i.role == Role::Leader) {
            break;
        }
        assert!(Instant::now() < deadline, "node {to} never showed itself leading group 7");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.host(to).info_generation() > g_to);

    // A group removed.
    let g_before = h.info_generation();
    h.destroy_group(GroupId(9), true).await.expect("destroy");
    let (g, shared) = h.group_info_shared().await.expect("shared");
    assert!(g > g_before, "a removal moved the generation");
    assert!(shared.iter().all(|i| i.group != GroupId(9)), "the shared answer no longer lists it");
    c.shutdown().await;
}

/// With one election a tick allowed per poller, groups created together put their elections
/// off to later ticks, and every one of them still elects a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_past_the_ticks_budget_wait_and_every_group_still_elects() {
    let c = Cluster::start_with(3, |cfg| cfg.campaigns_per_tick_max = 1).await;
    c.create_groups(1..=200).await;
    c.wait_info("every group led", |infos| infos.len() == 200 && infos.iter().all(|i| i.leader.is_some())).await;
    let postponed: u64 = c.hosts.iter().map(|h| h.stats().campaigns_postponed.load(Ordering::Relaxed)).sum();
    assert!(postponed > 0, "200 groups started their elections with at most one a tick and none waited");
    for g in [1, 100, 200] {
        assert_eq!(c.put(GroupId(g), &key(g, "k"), "v").await.expect("write"), KvResponse::Done { previous: None });
    }
    c.shutdown().await;
}
