//! The driver's two storage stages, the log writer and the applier, run on the group's one
//! task. These tests give it storages whose two halves depend on each other (one store behind
//! one async lock, as a store shared by the log and the state machine may be, or two stores
//! one of which orders the other's writes), and storages that are slow or fail while the group
//! stops. A group that hangs would hang the test:
//! every wait has a timeout, so a regression fails instead (the clock is Tokio's paused one,
//! so the timeouts cost no real time).

use bytes::Bytes;
use flotilla_raft::testing::{MemLogStorage, MemRouter, MemStateMachine};
use flotilla_raft::{
    AppliedState, Config, Entry, EntryPayload, Fatal, GroupId, LogId, LogIndex, LogState, LogStorage, Membership,
    Message, MessageBody, NodeId, Raft, RaftError, Role, SnapshotError, SnapshotMeta, StateMachine, StorageError, Term,
    Vote, WriteResponse,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

/// Storage calls that pass a closed gate wait until the test opens it (a slow fsync).
#[derive(Clone)]
struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    fn new(open: bool) -> Gate {
        Gate(Arc::new(watch::channel(open).0))
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    fn close(&self) {
        self.0.send_replace(false);
    }

    async fn pass(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// One store for the log and the state machine: every write of either holds `lock`. (A log
/// and a state machine on two `Shared`s are on two stores, whose gates a test may link.)
#[derive(Clone)]
struct Shared {
    lock: Arc<Mutex<()>>,
    /// Passed by `append` with the lock held: a write of the store that takes a while.
    log_gate: Gate,
    /// Passed by `apply` with the lock held: a write of the store that takes a while.
    apply_gate: Gate,
    /// Opened by each `append` once done.
    appended: Gate,
    /// Opened by each `apply` once done.
    applied: Gate,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            lock: Arc::new(Mutex::new(())),
            log_gate: Gate::new(true),
            apply_gate: Gate::new(true),
            appended: Gate::new(false),
            applied: Gate::new(false),
        }
    }
}

#[derive(Clone)]
struct Log(MemLogStorage, Shared);

struct Sm(MemStateMachine, Shared);

impl LogStorage for Log {
    async fn read_vote(&self) -> Result<Option<Vote>, StorageError> {
        self.0.read_vote().await
    }
    async fn save_vote(&self, vote: &Vote) -> Result<(), StorageError> {
        let _g = self.1.lock.lock().await;
        self.0.save_vote(vote).await
    }
    async fn log_state(&self) -> Result<LogState, StorageError> {
        self.0.log_state().await
    }
    async fn read_entries(&self, from: LogIndex, to: LogIndex, max: usize) -> Result<Vec<Entry>, StorageError> {
        self.0.read_entries(from, to, max).await
    }
    async fn append(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        let _g = self.1.lock.lock().await;
        self.1.log_gate.pass().await;
        self.0.append(entries).await?;
        self.1.appended.open();
        Ok(())
    }
    async fn truncate_from(&self, index: LogIndex) -> Result<(), StorageError> {
        let _g = self.1.lock.lock().await;
        self.0.truncate_from(index).await
    }
    async fn purge_up_to(&self, log_id: LogId) -> Result<(), StorageError> {
        let _g = self.1.lock.lock().await;
        self.0.purge_up_to(log_id).await
    }
}

impl StateMachine for Sm {
    async fn applied_state(&mut self) -> Result<AppliedState, StorageError> {
        self.0.applied_state().await
    }
    async fn apply(&mut self, entries: Vec<Entry>) -> Result<Vec<Bytes>, StorageError> {
        let _g = self.1.lock.lock().await;
        self.1.apply_gate.pass().await;
        let responses = self.0.apply(entries).await?;
        self.1.applied.open();
        Ok(responses)
    }
    async fn durable_applied(&mut self) -> Result<LogIndex, StorageError> {
        self.0.durable_applied().await
    }
    async fn build_snapshot(&mut self) -> Result<SnapshotMeta, StorageError> {
        self.0.build_snapshot().await
    }
    async fn read_snapshot(&mut self, m: &SnapshotMeta, off: u64, len: u64) -> Result<Option<Bytes>, StorageError> {
        self.0.read_snapshot(m, off, len).await
    }
    async fn drop_snapshot(&mut self, m: &SnapshotMeta) -> Result<(), StorageError> {
        self.0.drop_snapshot(m).await
    }
    async fn receive_snapshot(&mut self, m: &SnapshotMeta, off: u64, data: Bytes) -> Result<(), SnapshotError> {
        self.0.receive_snapshot(m, off, data).await
    }
    async fn install_snapshot(&mut self, m: &SnapshotMeta) -> Result<(), SnapshotError> {
        self.0.install_snapshot(m).await
    }
}

/// Node `id` alone on a router, on one store shared by its log and state machine.
async fn start(id: u64, config: Config, store: &Shared, log: &MemLogStorage) -> Raft {
    start_on(id, config, store, store, log).await
}

/// Node `id` alone on a router, its log on `log_store` and its state machine on `sm_store`.
async fn start_on(id: u64, config: Config, log_store: &Shared, sm_store: &Shared, log: &MemLogStorage) -> Raft {
    let sm = Sm(MemStateMachine::new(), sm_store.clone());
    Raft::start(NodeId(id), GroupId(0), config, Log(log.clone(), log_store.clone()), sm, MemRouter::new().network())
        .await
        .expect("start")
}

fn log_id(index: u64) -> LogId {
    LogId { term: Term(if index == 0 { 0 } else { 1 }), index: LogIndex(index) }
}

/// Entry `index` of term 1, as node 1 (the leader, played by the test) sends it.
fn entry(index: u64) -> Entry {
    let payload = if index == 1 {
        EntryPayload::Membership(Box::new(Membership::new([NodeId(1), NodeId(2)])))
    } else {
        EntryPayload::Normal(Bytes::from_static(b"x"))
    };
    Entry { log_id: log_id(index), payload }
}

/// Node 1's append of the entries after `prev` up to `last` to node 2, with its commit index.
fn append(prev: u64, last: u64, commit: u64) -> Message {
    let entries = (prev + 1..=last).map(entry).collect();
    Message {
        from: NodeId(1),
        to: NodeId(2),
        term: Term(1),
        body: MessageBody::Append { prev: log_id(prev), entries, commit: LogIndex(commit) },
    }
}

/// Follower 2 on `log` with entry 1 committed and its apply holding the store's lock, its
/// write not done until the test opens `store.apply_gate`.
async fn follower_applying(store: &Shared, log: &MemLogStorage) -> Raft {
    store.apply_gate.close();
    let raft = start(2, Config::fast(), store, log).await;
    raft.receive(append(0, 1, 1));
    raft.wait_for(WAIT, |m| m.committed >= LogIndex(1)).await.expect("entry 1 committed");
    // Idle until the apply waits for its gate, with the lock held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(raft.metrics().borrow().applied, LogIndex(0), "the apply waits for its gate");
    raft
}

#[tokio::test(start_paused = true)]
async fn a_storage_whose_log_and_state_machine_share_a_lock_does_not_hang() {
    let store = Shared::new();
    let raft = follower_applying(&store, &MemLogStorage::new()).await;
    // More appends than the log writer's queue holds (1024): the core waits for room while
    // the write in flight waits for the lock the apply holds.
    let last = 2101;
    for i in 2..=last {
        raft.receive(append(i - 1, i, 1));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The apply's write is done: it only has to be polled to release the lock.
    store.apply_gate.open();
    let m = raft.wait_for(WAIT, |m| m.applied >= LogIndex(1) && m.last_log_id.index >= LogIndex(last)).await;
    assert!(m.is_ok(), "the group is stuck: {m:?}");
    assert_eq!(raft.inbox_dropped(), 0);
    let done = tokio::time::timeout(WAIT, raft.shutdown()).await;
    assert!(done.is_ok(), "shutdown does not return");
}

#[tokio::test(start_paused = true)]
async fn a_storage_whose_log_and_state_machine_share_a_lock_does_not_hang_when_applies_queue_up() {
    let store = Shared::new();
    let log = MemLogStorage::new();
    let raft = start(2, Config::fast(), &store, &log).await;
    let durable = 100;
    raft.receive(append(0, durable, 0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.entries().len(), durable as usize);
    // The next append holds the lock until the test opens the gate.
    store.log_gate.close();
    raft.receive(append(durable, durable + 1, 0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The leader commits the durable entries one at a time: one apply each. The first waits
    // for the lock; the others queue behind it, more than the applier's queue holds (64), and
    // the core waits for room.
    raft.receive(append(durable + 1, durable + 1, 1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for commit in 2..=durable {
        raft.receive(append(durable + 1, durable + 1, commit));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(raft.metrics().borrow().applied, LogIndex(0), "the applies wait for the lock");
    // The append's write is done: it only has to be polled to release the lock.
    store.log_gate.open();
    let m = raft.wait_for(WAIT, |m| m.applied >= LogIndex(durable)).await;
    assert!(m.is_ok(), "the group is stuck: {m:?}");
    assert_eq!(log.entries().len(), durable as usize + 1);
    let done = tokio::time::timeout(WAIT, raft.shutdown()).await;
    assert!(done.is_ok(), "shutdown does not return");
}

#[tokio::test(start_paused = true)]
async fn a_storage_whose_log_and_state_machine_share_a_lock_shuts_down() {
    let store = Shared::new();
    let log = MemLogStorage::new();
    let raft = follower_applying(&store, &log).await;
    // The apply holds the lock; the log writer's next append waits for it.
    raft.receive(append(1, 2, 1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.entries().len(), 1, "the append waits for the lock");
    let shutdown = tokio::spawn({
        let raft = raft.clone();
        async move { raft.shutdown().await }
    });
    // The group stopped taking work and is finishing what it started; then the apply's write
    // is done.
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.apply_gate.open();
    let done = tokio::time::timeout(WAIT, shutdown).await;
    assert!(done.is_ok(), "shutdown does not return");
    assert_eq!(log.entries().len(), 2, "the append started before the shutdown is done");
}

/// Node 1, alone, leading, on `store` and `log`; then its log writes wait for the test to
/// open `store.log_gate` (a slow disk).
async fn leader_on_a_slow_disk(store: &Shared, log: &MemLogStorage) -> Raft {
    let raft = start(1, Config::fast(), store, log).await;
    raft.initialize(Membership::new([NodeId(1)])).await.expect("initialize");
    let m = raft.wait_for(WAIT, |m| m.role == Role::Leader && m.applied == m.last_log_id.index).await;
    m.expect("leads");
    store.log_gate.close();
    raft
}

fn write(raft: &Raft, command: &'static str) -> JoinHandle<Result<WriteResponse, RaftError>> {
    let raft = raft.clone();
    tokio::spawn(async move { raft.client_write(Bytes::from_static(command.as_bytes())).await })
}

#[tokio::test(start_paused = true)]
async fn every_pending_write_is_answered_at_shutdown_while_the_storage_finishes() {
    let store = Shared::new();
    let log = MemLogStorage::new();
    let raft = leader_on_a_slow_disk(&store, &log).await;
    // Taken by the group, its append in flight.
    let taken = write(&raft, "a");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!taken.is_finished());
    let shutdown = tokio::spawn({
        let raft = raft.clone();
        async move { raft.shutdown().await }
    });
    // Queued behind the shutdown, and sent while the group finishes its append.
    let mut writes = vec![taken, write(&raft, "b"), write(&raft, "c")];
    tokio::time::sleep(Duration::from_millis(1)).await;
    writes.push(write(&raft, "d"));
    // Every caller is answered now, the disk still slow: none is left to time out.
    for w in writes {
        let answer = tokio::time::timeout(WAIT, w).await.expect("answered").expect("no panic");
        assert_eq!(answer, Err(RaftError::Fatal(Fatal::Shutdown)));
    }
    assert!(!shutdown.is_finished(), "shutdown waits for the append in flight");
    store.log_gate.open();
    tokio::time::timeout(WAIT, shutdown).await.expect("shutdown returns").expect("no panic");
    assert_eq!(log.entries().last().map(|e| e.payload.clone()), Some(EntryPayload::Normal(Bytes::from("a"))));
}

#[tokio::test(start_paused = true)]
async fn a_storage_failure_while_the_group_shuts_down_is_reported() {
    let store = Shared::new();
    let log = MemLogStorage::new();
    let raft = leader_on_a_slow_disk(&store, &log).await;
    let taken = write(&raft, "a");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shutdown = tokio::spawn({
        let raft = raft.clone();
        async move { raft.shutdown().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The append in flight fails.
    log.set_fail_writes(true);
    store.log_gate.open();
    tokio::time::timeout(WAIT, shutdown).await.expect("shutdown returns").expect("no panic");
    assert_eq!(taken.await.expect("no panic"), Err(RaftError::Fatal(Fatal::Shutdown)));
    let stopped = raft.metrics().borrow().stopped.clone();
    assert!(matches!(stopped, Some(Fatal::Storage(StorageError { op: "append", .. }))), "{stopped:?}");
    let later = raft.client_write(Bytes::from_static(b"b")).await;
    assert!(matches!(later, Err(RaftError::Fatal(Fatal::Storage(_)))), "later calls say why: {later:?}");
}

/// Leader 1 alone, its log and its state machine on two stores, whose log failed while its
/// state machine still applies "a" (a slow write, until the test opens `sm_store.apply_gate`):
/// the group stopped on the storage failure and is finishing the apply.
async fn failed_leader_finishing_an_apply(log_store: &Shared, sm_store: &Shared, log: &MemLogStorage) -> Raft {
    let raft = start_on(1, Config::fast(), log_store, sm_store, log).await;
    raft.initialize(Membership::new([NodeId(1)])).await.expect("initialize");
    let m = raft.wait_for(WAIT, |m| m.role == Role::Leader && m.applied == m.last_log_id.index).await;
    m.expect("leads");
    sm_store.apply_gate.close();
    let a = write(&raft, "a");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!a.is_finished(), "the apply of \"a\" waits for its gate");
    log.set_fail_writes(true);
    let _b = write(&raft, "b");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = tokio::time::timeout(WAIT, a).await.expect("answered").expect("no panic");
    assert!(matches!(a, Err(RaftError::Fatal(Fatal::Storage(_)))), "the group stopped: {a:?}");
    raft
}

#[tokio::test(start_paused = true)]
async fn a_call_while_a_failed_group_finishes_its_storage_work_says_storage_failed() {
    let (log_store, sm_store) = (Shared::new(), Shared::new());
    let log = MemLogStorage::new();
    let raft = failed_leader_finishing_an_apply(&log_store, &sm_store, &log).await;
    let during = tokio::time::timeout(WAIT, raft.client_write(Bytes::from_static(b"c"))).await.expect("answered");
    sm_store.apply_gate.open();
    let done = tokio::time::timeout(WAIT, raft.shutdown()).await;
    assert!(done.is_ok(), "shutdown does not return");
    let after = raft.client_write(Bytes::from_static(b"d")).await;
    assert!(matches!(after, Err(RaftError::Fatal(Fatal::Storage(_)))), "after: {after:?}");
    assert!(matches!(during, Err(RaftError::Fatal(Fatal::Storage(_)))), "while finishing: {during:?}");
}

#[tokio::test(start_paused = true)]
async fn every_shutdown_call_waits_for_the_storage_work_of_a_failed_group() {
    let (log_store, sm_store) = (Shared::new(), Shared::new());
    let log = MemLogStorage::new();
    let raft = failed_leader_finishing_an_apply(&log_store, &sm_store, &log).await;
    let shutdowns: Vec<_> = (0..3)
        .map(|_| {
            let raft = raft.clone();
            tokio::spawn(async move { raft.shutdown().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let returned = shutdowns.iter().filter(|s| s.is_finished()).count();
    sm_store.apply_gate.open();
    for s in shutdowns {
        tokio::time::timeout(WAIT, s).await.expect("shutdown returns").expect("no panic");
    }
    assert_eq!(returned, 0, "a shutdown returned while the state machine was still being written");
}

#[tokio::test(start_paused = true)]
async fn a_full_log_queue_does_not_hang_when_the_log_writes_wait_for_the_state_machine() {
    // Two stores, one ordering the other's writes: a log write is done only once an apply is.
    let log_store = Shared::new();
    let sm_store = Shared { applied: log_store.log_gate.clone(), ..Shared::new() };
    let log = MemLogStorage::new();
    let raft = start_on(2, Config::fast(), &log_store, &sm_store, &log).await;
    raft.receive(append(0, 1, 0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.entries().len(), 1);
    // The next append waits for an apply.
    log_store.log_gate.close();
    raft.receive(append(1, 2, 0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One append each, queued behind it: 1023, one short of what the log writer's queue holds.
    let queued = 1025;
    for i in 2..queued {
        raft.receive(append(i, i + 1, 0));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One more append, and entry 1 committed: its apply is queued for the idle applier, then
    // the commit index's record finds the log writer's queue full and the core waits for room.
    raft.receive(append(queued, queued + 1, 1));
    let m = raft.wait_for(WAIT, |m| m.applied >= LogIndex(1)).await;
    assert!(m.is_ok(), "the group is stuck: {m:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.entries().len(), queued as usize + 1);
    let done = tokio::time::timeout(WAIT, raft.shutdown()).await;
    assert!(done.is_ok(), "shutdown does not return");
}

#[tokio::test(start_paused = true)]
async fn a_full_state_machine_queue_does_not_hang_when_the_applies_wait_for_the_log() {
    // Two stores, one ordering the other's writes: an apply is done only once a log write is.
    let log_store = Shared::new();
    let sm_store = Shared { apply_gate: log_store.appended.clone(), ..Shared::new() };
    let log = MemLogStorage::new();
    let raft = start_on(2, Config::fast(), &log_store, &sm_store, &log).await;
    let durable = 100;
    raft.receive(append(0, durable, 0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.entries().len(), durable as usize);
    // The next apply waits for an append.
    log_store.appended.close();
    raft.receive(append(durable, durable, 1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One apply each, queued behind it: 64, what the applier's queue holds.
    let queued = 65;
    for commit in 2..=queued {
        raft.receive(append(durable, durable, commit));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(raft.metrics().borrow().applied, LogIndex(0), "the applies wait for an append");
    // One more entry, and one more committed: its append is queued for the idle log writer,
    // then its apply finds the applier's queue full and the core waits for room.
    raft.receive(append(durable, durable + 1, queued + 1));
    let m = raft.wait_for(WAIT, |m| m.applied >= LogIndex(queued + 1)).await;
    assert!(m.is_ok(), "the group is stuck: {m:?}");
    assert_eq!(log.entries().len(), durable as usize + 1);
    let done = tokio::time::timeout(WAIT, raft.shutdown()).await;
    assert!(done.is_ok(), "shutdown does not return");
}
