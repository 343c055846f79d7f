//! The Tokio driver end to end: clusters of `Raft` handles over the in-memory router, on
//! Tokio's paused clock (timers fire as soon as every task is idle, so the tests are fast
//! and do not depend on the machine's speed).

use bytes::Bytes;
use flotilla_raft::testing::{KvCommand, KvResponse, MemLogStorage, MemRouter, MemStateMachine};
use flotilla_raft::{Config, Fatal, Membership, NodeId, Raft, RaftError, RaftMetrics, ReadMode, Role};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn config() -> Config {
    Config::fast()
}

struct Node {
    raft: Raft,
    log: MemLogStorage,
    sm: MemStateMachine,
}

struct TestCluster {
    router: MemRouter,
    nodes: BTreeMap<u64, Node>,
    config: Config,
}

impl TestCluster {
    async fn new(ids: &[u64], config: Config) -> TestCluster {
        let mut c = TestCluster { router: MemRouter::new(), nodes: BTreeMap::new(), config };
        for id in ids {
            c.start(*id, MemLogStorage::new(), MemStateMachine::new()).await;
        }
        c
    }

    /// Starts node `id` on the given storage (fresh, or kept from an earlier run).
    async fn start(&mut self, id: u64, log: MemLogStorage, sm: MemStateMachine) {
        let raft = Raft::start(
            NodeId(id),
            Default::default(),
            self.config.clone(),
            log.clone(),
            sm.clone(),
            self.router.network(),
        )
        .await
        .expect("start");
        self.router.register(raft.clone());
        self.nodes.insert(id, Node { raft, log, sm });
    }

    /// A running cluster of `ids` with a leader.
    async fn formed(ids: &[u64], config: Config) -> TestCluster {
        let c = TestCluster::new(ids, config).await;
        let members = Membership::new(ids.iter().map(|i| NodeId(*i)));
        c.raft(ids[0]).initialize(members).await.expect("initialize");
        c.leader().await;
        c
    }

    fn raft(&self, id: u64) -> &Raft {
        &self.nodes[&id].raft
    }

    /// Waits until the nodes agree on one leader; returns it.
    async fn leader(&self) -> u64 {
        let first = self.nodes.values().next().expect("a node");
        for _ in 0..100 {
            let m = first.raft.wait_for(WAIT, |m| m.leader.is_some()).await.expect("a leader");
            let leader = m.leader.expect("checked").0;
            if let Some(l) = self.nodes.get(&leader) {
                if l.raft.metrics().borrow().role == Role::Leader {
                    return leader;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no stable leader");
    }

    async fn put(&self, on: u64, key: &str, value: &str) -> Result<KvResponse, RaftError> {
        let cmd = KvCommand::Put { key: key.into(), value: value.into() };
        let r = self.raft(on).client_write(cmd.encode()).await?;
        Ok(KvResponse::decode(&r.data).expect("response decodes"))
    }

    /// Waits until node `id` applied at least `index`.
    async fn applied(&self, id: u64, index: u64) -> RaftMetrics {
        self.raft(id).wait_for(WAIT, |m| m.applied.0 >= index).await.expect("applies")
    }
}

#[tokio::test(start_paused = true)]
async fn three_nodes_elect_write_and_read_linearizably() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    for i in 0..20 {
        let r = c.put(leader, &format!("k{i}"), &format!("v{i}")).await.expect("write commits");
        assert!(r.ok);
    }
    let overwrite = c.put(leader, "k3", "new").await.expect("write");
    assert_eq!(overwrite.previous.as_deref(), Some("v3"), "the state machine's response reaches the client");
    let idx = c.raft(leader).ensure_linearizable(ReadMode::ReadIndex).await.expect("read index");
    assert_eq!(c.nodes[&leader].sm.get("k3").as_deref(), Some("new"));
    let lease = c.raft(leader).ensure_linearizable(ReadMode::Lease).await.expect("lease read");
    assert!(lease >= idx);
    for id in [1, 2, 3] {
        c.applied(id, idx.0).await;
        assert_eq!(c.nodes[&id].sm.get("k19").as_deref(), Some("v19"), "node {id}");
    }
}

#[tokio::test(start_paused = true)]
async fn batch_writes_answer_each_command_in_order() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    let cmds: Vec<Bytes> =
        (0..50).map(|i| KvCommand::Put { key: "k".into(), value: format!("{i}") }.encode()).collect();
    let results = c.raft(leader).client_write_batch(cmds).await.expect("batch");
    assert_eq!(results.len(), 50);
    let mut last = 0;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.expect("applied");
        assert!(r.log_id.index.0 > last, "consecutive entries");
        last = r.log_id.index.0;
        let prev = KvResponse::decode(&r.data).expect("decodes").previous;
        assert_eq!(prev, if i == 0 { None } else { Some(format!("{}", i - 1)) });
    }
}

#[tokio::test(start_paused = true)]
async fn followers_refuse_writes_and_name_the_leader() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).expect("a follower");
    c.raft(follower).wait_for(WAIT, |m| m.leader == Some(NodeId(leader))).await.expect("knows the leader");
    let err = c.put(follower, "a", "b").await.expect_err("not leader");
    assert_eq!(err, RaftError::NotLeader { leader: Some(NodeId(leader)) });
    let err = c.raft(follower).read_index(ReadMode::ReadIndex).await.expect_err("not leader");
    assert_eq!(err, RaftError::NotLeader { leader: Some(NodeId(leader)) });
}

#[tokio::test(start_paused = true)]
async fn initialize_is_refused_on_a_node_with_state() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    for id in [1, 2, 3] {
        c.applied(id, 1).await;
        let err = c.raft(id).initialize(Membership::new([NodeId(id)])).await.expect_err("has state");
        assert_eq!(err, RaftError::AlreadyInitialized);
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_is_elected_when_the_leader_fails_and_the_old_one_rejoins() {
    let mut c = TestCluster::formed(&[1, 2, 3], config()).await;
    let old = c.leader().await;
    c.put(old, "before", "1").await.expect("write");
    // Crash the leader: its storage survives (MemLogStorage/MemStateMachine are kept).
    let node = c.nodes.remove(&old).expect("node");
    c.router.unregister(NodeId(old));
    node.raft.shutdown().await;
    let new = c.leader().await;
    assert_ne!(new, old);
    c.put(new, "after", "2").await.expect("the remaining majority commits");
    // Restart the old leader from its storage: it recovers and catches up.
    c.start(old, node.log, node.sm).await;
    let idx = c.raft(new).ensure_linearizable(ReadMode::ReadIndex).await.expect("read");
    c.applied(old, idx.0).await;
    assert_eq!(c.nodes[&old].sm.get("before").as_deref(), Some("1"));
    assert_eq!(c.nodes[&old].sm.get("after").as_deref(), Some("2"));
    assert_eq!(c.raft(old).metrics().borrow().role, Role::Follower);
}

#[tokio::test(start_paused = true)]
async fn membership_changes_by_joint_consensus_with_a_learner_first() {
    let mut c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    c.put(leader, "x", "1").await.expect("write");
    c.start(4, MemLogStorage::new(), MemStateMachine::new()).await;
    c.raft(leader).add_learner(NodeId(4)).await.expect("learner added");
    let m = c.applied(4, 1).await;
    assert_eq!(m.role, Role::Learner);
    let target = c.raft(leader).metrics().borrow().last_log_id.index.0;
    c.applied(4, target).await;
    assert_eq!(c.nodes[&4].sm.get("x").as_deref(), Some("1"));
    // Replace the voter that is not the leader and not 4 with 4.
    let removed = [1, 2, 3].into_iter().find(|i| *i != leader).expect("another voter");
    let voters: BTreeSet<NodeId> = [1, 2, 3, 4].into_iter().filter(|i| *i != removed).map(NodeId).collect();
    c.raft(leader).change_membership(voters.clone()).await.expect("change commits");
    let m = c.raft(leader).metrics().borrow().clone();
    assert_eq!(m.committed_membership.membership.voters, voters);
    assert!(!m.committed_membership.membership.is_joint());
    assert!(m.committed_membership.membership.learners.is_empty(), "the learner was promoted");
    // The group works without the removed node.
    c.router.isolate(NodeId(removed));
    c.put(leader, "y", "2").await.expect("write after the change");
    // A second change while none is pending is accepted; an empty voter set is not.
    let err = c.raft(leader).change_membership(BTreeSet::new()).await.expect_err("invalid");
    assert!(matches!(err, RaftError::InvalidMembership(_)), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn leadership_transfer_hands_over_to_the_target() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    c.put(leader, "a", "1").await.expect("write");
    let target = [1, 2, 3].into_iter().find(|i| *i != leader).expect("another node");
    c.raft(leader).transfer_leader(NodeId(target)).await.expect("transfer");
    c.raft(target).wait_for(WAIT, |m| m.role == Role::Leader).await.expect("target leads");
    c.put(target, "b", "2").await.expect("new leader writes");
    assert!(matches!(c.put(leader, "c", "3").await, Err(RaftError::NotLeader { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_lagging_node_catches_up_by_snapshot_after_compaction() {
    // The log is purged behind the durable applied index without any snapshot; the follower
    // lagging by more than `log_lag_entries_max` then needs one, built on demand and dropped
    // after the transfer.
    let cfg = Config { log_keep_entries: 5, log_lag_entries_max: 10, log_purge_step_entries: 1, ..Config::fast() };
    let c = TestCluster::formed(&[1, 2, 3], cfg).await;
    let leader = c.leader().await;
    let lagging = [1, 2, 3].into_iter().find(|i| *i != leader).expect("a follower");
    c.router.isolate(NodeId(lagging));
    // Past two election timeouts without progress, the follower no longer holds the log back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for i in 0..60 {
        c.put(leader, &format!("k{i}"), &format!("v{i}")).await.expect("write");
    }
    let m = c.raft(leader).wait_for(WAIT, |m| m.first_log_index.0 > 10).await.expect("compacted");
    assert!(m.snapshot.is_none(), "the log is purged without building a snapshot");
    assert!(m.durable_applied.0 >= m.first_log_index.0 - 1, "purged only behind the durable applied index");
    c.router.heal();
    let idx = c.raft(leader).ensure_linearizable(ReadMode::ReadIndex).await.expect("read");
    let lm = c.applied(lagging, idx.0).await;
    assert!(lm.first_log_index.0 > 10, "caught up by installing a snapshot (its log starts after it)");
    assert_eq!(c.nodes[&lagging].sm.data(), c.nodes[&leader].sm.data());
    assert_eq!(c.nodes[&lagging].sm.get("k59").as_deref(), Some("v59"));
    c.raft(leader).wait_for(WAIT, |m| m.snapshot.is_none()).await.expect("the snapshot is dropped after use");
}

#[tokio::test(start_paused = true)]
async fn a_storage_failure_stops_the_group_loudly() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    c.nodes[&leader].log.set_fail_writes(true);
    let err = c.put(leader, "a", "b").await.expect_err("cannot commit");
    assert!(matches!(err, RaftError::Fatal(Fatal::Storage(_))), "{err:?}");
    let m = c.raft(leader).wait_for(WAIT, |m| m.stopped.is_some()).await.expect("metrics say stopped");
    assert!(matches!(m.stopped, Some(Fatal::Storage(_))), "{m:?}");
    let err = c.raft(leader).read_index(ReadMode::ReadIndex).await.expect_err("stopped");
    assert!(matches!(err, RaftError::Fatal(Fatal::Storage(_))), "later calls report why: {err:?}");
    // The others elect a new leader and go on.
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
    c.router.isolate(NodeId(leader));
    let m = c.raft(others[0]).wait_for(WAIT, |m| m.leader.is_some() && m.leader != Some(NodeId(leader))).await;
    let new = m.expect("new leader").leader.expect("checked").0;
    c.put(new, "c", "d").await.expect("the rest goes on");
}

#[tokio::test(start_paused = true)]
async fn calls_after_shutdown_fail_with_fatal() {
    let c = TestCluster::formed(&[1], config()).await;
    c.put(1, "a", "b").await.expect("single node commits alone");
    c.raft(1).shutdown().await;
    let err = c.put(1, "a", "c").await.expect_err("stopped");
    assert_eq!(err, RaftError::Fatal(Fatal::Shutdown));
}

#[tokio::test(start_paused = true)]
async fn a_minority_partition_cannot_commit_and_its_writes_time_out() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    c.put(leader, "a", "1").await.expect("write");
    for id in [1, 2, 3] {
        if id != leader {
            c.router.isolate(NodeId(id));
        }
    }
    // Alone, the leader cannot commit; check-quorum makes it step down, so the write fails
    // (unknown outcome as far as the client knows).
    let err = c.put(leader, "b", "2").await.expect_err("no quorum");
    assert!(matches!(err, RaftError::Timeout | RaftError::NotLeader { .. } | RaftError::Dropped { .. }), "{err:?}");
    c.raft(leader).wait_for(WAIT, |m| m.role != Role::Leader).await.expect("stepped down");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_applies_what_it_knew_committed_without_a_leader() {
    let mut c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    for i in 0..5 {
        c.put(leader, &format!("k{i}"), "v").await.expect("write");
    }
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).expect("a follower");
    let idx = c.raft(leader).ensure_linearizable(ReadMode::ReadIndex).await.expect("read");
    c.applied(follower, idx.0).await;
    // Stop everything; restart the follower alone, with a fresh (empty) state machine: it
    // re-applies the entries it knew committed, with no leader to tell it.
    for id in [1, 2, 3] {
        c.router.unregister(NodeId(id));
        c.raft(id).shutdown().await;
    }
    let log = c.nodes[&follower].log.clone();
    c.start(follower, log, MemStateMachine::new()).await;
    c.applied(follower, idx.0).await;
    assert_eq!(c.nodes[&follower].sm.get("k4").as_deref(), Some("v"));
}

#[tokio::test(start_paused = true)]
async fn lease_reads_need_no_call_on_a_leader_under_lease_and_never_on_a_follower_or_after_a_transfer() {
    let c = TestCluster::formed(&[1, 2, 3], config()).await;
    let leader = c.leader().await;
    c.put(leader, "a", "1").await.expect("write");
    // The lease holds once a heartbeat round is acknowledged.
    let mut ready = false;
    for _ in 0..100 {
        if c.raft(leader).lease_read_ready() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "the leader never held a lease");
    assert_eq!(c.nodes[&leader].sm.get("a").as_deref(), Some("1"), "the write is in the state machine read");
    for id in [1, 2, 3].into_iter().filter(|i| *i != leader) {
        assert!(!c.raft(id).lease_read_ready(), "follower {id}");
    }
    let target = [1, 2, 3].into_iter().find(|i| *i != leader).expect("another node");
    c.raft(leader).transfer_leader(NodeId(target)).await.expect("transfer");
    assert!(!c.raft(leader).lease_read_ready(), "the old leader's gate shut when it handed over");
}

#[tokio::test(start_paused = true)]
async fn calls_a_group_cannot_answer_return_timeout_after_api_timeout_ms() {
    // A leader cut off from its followers, without check-quorum so that it never steps down:
    // nothing ever answers its callers but the timeout, which the group's task gives (callers
    // have no timer of their own). Reference: `Raft`'s contract, `Config::api_timeout_ms`.
    let cfg = Config { check_quorum: false, lease_read: false, api_timeout_ms: 1000, ..Config::fast() };
    let c = TestCluster::formed(&[1, 2, 3], cfg).await;
    let leader = c.leader().await;
    c.put(leader, "a", "1").await.expect("write");
    for id in [1, 2, 3].into_iter().filter(|i| *i != leader) {
        c.router.isolate(NodeId(id));
    }
    let raft = c.raft(leader);
    let start = tokio::time::Instant::now();
    let cmd = KvCommand::Put { key: "b".into(), value: "2".into() }.encode();
    let calls = async {
        tokio::join!(
            raft.client_write(cmd.clone()),
            raft.client_write_batch(vec![cmd.clone(), cmd]),
            raft.read_index(ReadMode::ReadIndex),
            raft.change_membership([NodeId(leader)].into_iter().collect()),
        )
    };
    // The test's own bound, far past the calls': a call left unanswered fails it, not hangs it.
    let (one, batch, read, change) = tokio::time::timeout(WAIT, calls).await.expect("every call is answered");
    let waited = start.elapsed();
    assert_eq!(one.expect_err("no quorum"), RaftError::Timeout);
    assert_eq!(batch.expect_err("no quorum"), RaftError::Timeout);
    assert_eq!(read.expect_err("no quorum"), RaftError::Timeout);
    assert_eq!(change.expect_err("no quorum"), RaftError::Timeout);
    assert!(waited >= Duration::from_millis(1000), "answered before the timeout: {waited:?}");
    assert!(waited <= Duration::from_millis(1050), "answered late: {waited:?}");
    assert_eq!(c.raft(leader).metrics().borrow().role, Role::Leader, "still leads: nothing else answered");
    // A call after the others timed out is timed out on its own schedule.
    let start = tokio::time::Instant::now();
    let err = tokio::time::timeout(WAIT, c.put(leader, "c", "3")).await.expect("answered");
    assert_eq!(err.expect_err("no quorum"), RaftError::Timeout);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1000) && waited <= Duration::from_millis(1050), "{waited:?}");
}

/// A log that panics on `append` once told to: a group's task that dies in the middle of its
/// work.
#[derive(Clone)]
struct PanickingLog {
    log: MemLogStorage,
    panic_on_append: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl flotilla_raft::LogStorage for PanickingLog {
    async fn read_vote(&self) -> Result<Option<flotilla_raft::Vote>, flotilla_raft::StorageError> {
        self.log.read_vote().await
    }
    async fn save_vote(&self, vote: &flotilla_raft::Vote) -> Result<(), flotilla_raft::StorageError> {
        self.log.save_vote(vote).await
    }
    async fn log_state(&self) -> Result<flotilla_raft::LogState, flotilla_raft::StorageError> {
        self.log.log_state().await
    }
    async fn read_entries(
        &self,
        from: flotilla_raft::LogIndex,
        to: flotilla_raft::LogIndex,
        bytes_max: usize,
    ) -> Result<Vec<flotilla_raft::Entry>, flotilla_raft::StorageError> {
        self.log.read_entries(from, to, bytes_max).await
    }
    async fn append(&self, entries: Vec<flotilla_raft::Entry>) -> Result<(), flotilla_raft::StorageError> {
        assert!(!self.panic_on_append.load(std::sync::atomic::Ordering::Relaxed), "injected panic in append");
        self.log.append(entries).await
    }
    async fn truncate_from(&self, index: flotilla_raft::LogIndex) -> Result<(), flotilla_raft::StorageError> {
        self.log.truncate_from(index).await
    }
    async fn purge_up_to(&self, log_id: flotilla_raft::LogId) -> Result<(), flotilla_raft::StorageError> {
        self.log.purge_up_to(log_id).await
    }
}

#[tokio::test(start_paused = true)]
async fn calls_to_a_group_whose_task_died_are_answered_without_a_timeout() {
    // Callers have no timer of their own: when the group's task ends without answering (a
    // panic in its storage), dropping the task's state must answer them, and the queue must
    // refuse later calls. The timeout is far past the test's bound, so it cannot be what
    // answers.
    let cfg = Config { api_timeout_ms: 3_600_000, ..Config::fast() };
    let log = PanickingLog { log: MemLogStorage::new(), panic_on_append: Default::default() };
    let router = MemRouter::new();
    let raft = Raft::start(NodeId(1), Default::default(), cfg, log.clone(), MemStateMachine::new(), router.network())
        .await
        .expect("start");
    raft.initialize(Membership::new([NodeId(1)])).await.expect("initialize");
    raft.wait_for(WAIT, |m| m.role == Role::Leader).await.expect("leads");
    let cmd = KvCommand::Put { key: "a".into(), value: "1".into() }.encode();
    raft.client_write(cmd.clone()).await.expect("a single node commits alone");
    log.panic_on_append.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = tokio::time::timeout(WAIT, raft.client_write(cmd.clone())).await.expect("answered");
    assert!(matches!(answered, Err(RaftError::Fatal(_))), "{answered:?}");
    let later = tokio::time::timeout(WAIT, raft.client_write(cmd)).await.expect("answered");
    assert!(matches!(later, Err(RaftError::Fatal(_))), "{later:?}");
}
