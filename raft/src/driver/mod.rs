//! The Tokio driver: [`Raft`], the public handle of one group, and the task that runs its
//! [`Engine`] against a [`LogStorage`], a [`StateMachine`] and a [`Network`].
//!
//! One task per group, the core: it owns the engine, answers API calls, sends messages, and
//! runs two stages of its own as futures it polls beside its queues: the log writer (executes
//! writes in order, one batch at a time, coalescing consecutive appends, and reports them
//! durable) and the applier (owns the state machine: applies, builds and installs snapshots,
//! one action at a time). A write in flight therefore never blocks the core: the leader keeps
//! replicating while its own fsync runs. And no hand-off between tasks is paid per round: a
//! storage that completes at once (in memory, or a write cache) is done within the same wake-up.
//! The storage's futures run on the core's task, so a storage that blocks must do so off the
//! runtime (`spawn_blocking`), as any code on Tokio's workers must. Whenever the core waits for
//! a stage (for room in its queue, or for its last work as the group stops) it polls both: a
//! store shared by the log and the state machine may make one stage's work wait for the
//! other's.
//!
//! The core hands each caller's [`Request`] to its [`GroupCore`] (the writes of one wake-up as
//! one proposal) and routes the [`CoreAction`]s it polls: [`LogAction`]s to the log writer,
//! [`MachineAction`]s to the applier, messages to the network. A host running thousands of
//! groups runs `GroupCore`s on its own threads instead (see the crate documentation's three
//! layers).

mod api_queue;
mod recover;

use crate::config::Config;
use crate::engine::{Action, Engine, EngineStatus, IoId, ReadMode, Role};
use crate::entry::Entry;
use crate::error::{Fatal, RaftError, StorageError};
pub use crate::group::WriteResponse;
use crate::group::{CoreAction, GroupCore, LogAction, MachineAction, WriteCall};
use crate::membership::{Membership, StoredMembership};
use crate::message::Message;
use crate::network::Network;
use crate::request::Request;
use crate::storage::{LogStorage, SnapshotError, SnapshotMeta, StateMachine};
use crate::types::{GroupId, LogId, LogIndex, Millis, NodeId, Term};
use api_queue::{api_queue, ApiReceiver, ApiSender, Refused};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::{error, info_span, Instrument};

pub use recover::recover_state;

/// Messages from peers queued for one group; when it is full, arriving messages are dropped
/// (Raft tolerates loss; a full queue means the group is overloaded).
pub const INBOX_MSGS_MAX: usize = 4096;
/// API requests queued for one group; callers wait for room (the core holds at most as many
/// again, taken in one drain: see `api_queue`).
const API_QUEUE_MAX: usize = 1024;
/// Log actions queued for the log writer. When full, the core waits for the batch in flight:
/// a slow disk slows the group down instead of queueing without bound.
const LOG_QUEUE_MAX: usize = 1024;
/// State-machine actions queued for the applier (each may cover many entries); when full,
/// the core waits for the action in flight.
const MACHINE_QUEUE_MAX: usize = 64;
/// Events the core handles before it executes the actions they produced: batching.
const EVENTS_PER_ROUND_MAX: usize = 256;
/// How long a change of the metrics' counters (indexes, replication) may wait to be published:
/// under load they change on every round, and each publication costs a status copy and a
/// notification of every watcher. A change of role, term, leader or configuration is
/// published at once.
const METRICS_DELAY: Duration = Duration::from_millis(1);
/// How long a leader with a proposal in flight leaves the API queue alone (see `Core::run`).
const API_HOLD_MAX: Duration = Duration::from_millis(1);

/// A snapshot of the state of one group, published on a `watch` channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftMetrics {
    /// This node.
    pub id: NodeId,
    /// The group.
    pub group: GroupId,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Last log id.
    pub last_log_id: LogId,
    /// Commit index.
    pub committed: LogIndex,
    /// Applied index.
    pub applied: LogIndex,
    /// Configuration in effect.
    pub membership: StoredMembership,
    /// Committed configuration.
    pub committed_membership: StoredMembership,
    /// The newest snapshot built for a transfer and not yet dropped.
    pub snapshot: Option<LogId>,
    /// The applied index the state machine holds durably (the log is purged behind it).
    pub durable_applied: LogIndex,
    /// The first index still in the log.
    pub first_log_index: LogIndex,
    /// On the leader: matched index per follower.
    pub replication: BTreeMap<NodeId, LogIndex>,
    /// Set once the group stopped and its storage work ended: why (a shut-down group whose
    /// last storage work failed reports that failure).
    pub stopped: Option<Fatal>,
}

impl RaftMetrics {
    fn from_status(group: GroupId, s: EngineStatus) -> RaftMetrics {
        RaftMetrics {
            id: s.id,
            group,
            role: s.role,
            term: s.term,
            leader: s.leader,
            last_log_id: s.last_log_id,
            committed: s.committed,
            applied: s.applied,
            membership: s.membership,
            committed_membership: s.committed_membership,
            snapshot: s.snapshot,
            durable_applied: s.durable_applied,
            first_log_index: s.first_log_index,
            replication: s.replication,
            stopped: None,
        }
    }
}

/// The fields of the metrics whose change is published at once; the others (indexes and
/// replication) change every round under load and may wait for `METRICS_DELAY`.
#[derive(PartialEq, Eq)]
struct MetricsShape {
    role: Role,
    term: Term,
    leader: Option<NodeId>,
    membership: LogId,
    committed_membership: LogId,
    snapshot: Option<LogId>,
}

impl MetricsShape {
    fn of(e: &Engine) -> MetricsShape {
        MetricsShape {
            role: e.role(),
            term: e.term(),
            leader: e.leader(),
            membership: e.membership().log_id,
            committed_membership: e.committed_membership().log_id,
            snapshot: e.newest_snapshot(),
        }
    }
}

/// What the core task's API queue carries: requests for the group, and the driver's own stop.
enum Api {
    Request(Request),
    Shutdown(oneshot::Sender<()>),
}

struct Shared {
    id: NodeId,
    group: GroupId,
    api: ApiSender<Api>,
    inbox: mpsc::Sender<Message>,
    metrics: watch::Receiver<RaftMetrics>,
    timeout: Duration,
    /// Messages dropped because the inbox was full.
    inbox_dropped: std::sync::atomic::AtomicU64,
    /// The group's task (the core) until it ended. `shutdown` holds the lock while it awaits
    /// the task, so every call returns only once the task ended, whichever call awaited it.
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Signalled by `shutdown` before it queues its request: a core waiting for room in a
    /// full log or state-machine queue stops instead of waiting on.
    stop: Arc<Notify>,
    /// Why the group stopped, set by the core before it closes the API queue: a call refused
    /// while the group finishes its storage work (the metrics' `stopped` not yet set) says why.
    stopping: Arc<OnceLock<Fatal>>,
    /// The group's lease gate (see [`Raft::lease_read_ready`]).
    lease: Arc<crate::lease_gate::LeaseGate>,
    /// Time zero of the engine's clock, which the gate's times count from.
    base: Instant,
}

/// The handle of one Raft group on this node. Cheap to clone.
///
/// Every call is answered by the group's task; a call that gets no answer within
/// `Config::api_timeout_ms` returns [`RaftError::Timeout`] (for a write the outcome is then
/// unknown). After a storage failure or `shutdown`, calls return [`RaftError::Fatal`] (for a
/// write the outcome is unknown too).
///
/// The timeout is the group's task's to give, not a timer per call: the task answers
/// `Timeout` to a call that waited `api_timeout_ms` since it took it from its queue (normally
/// within a millisecond of the call), and if the task ends, however it ends, every call still
/// waiting is answered `Fatal`. A call that finds the queue full keeps a timer of its own. So
/// the bound holds as long as the task runs or has ended; a storage that blocks the task's
/// thread (which [`LogStorage`] and [`StateMachine`] must not) stalls its callers with it.
#[derive(Clone)]
pub struct Raft {
    shared: Arc<Shared>,
}

impl Raft {
    /// Starts the group: recovers its state from `log` and `state_machine` and spawns its
    /// task on the current Tokio runtime. A node with no state waits to be initialized or to
    /// hear from a leader that added it.
    pub async fn start<L: LogStorage, S: StateMachine, N: Network>(
        id: NodeId,
        group: GroupId,
        config: Config,
        log: L,
        mut state_machine: S,
        network: N,
    ) -> Result<Raft, RaftError> {
        config.validate()?;
        let log = Arc::new(log);
        let state = recover_state(&*log, &mut state_machine).await.map_err(Fatal::from)?;
        let base = Instant::now();
        let seed = seed_from_entropy(id, group);
        let timeout = Duration::from_millis(config.api_timeout_ms);
        let api_timeout_ms = config.api_timeout_ms;
        let engine = Engine::new(id, Arc::new(config), state, seed, Millis(0));
        let (api_tx, api_rx) = api_queue(API_QUEUE_MAX);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_MSGS_MAX);
        let (metrics_tx, metrics_rx) = watch::channel(RaftMetrics::from_status(group, engine.status()));
        // `term` is recorded on the span as it changes, so every event of the group carries it.
        let span = info_span!("raft", group = %group, node = %id, term = tracing::field::Empty);
        let stop = Arc::new(Notify::new());
        let stopping = Arc::new(OnceLock::new());
        let mut group_core = GroupCore::new(engine);
        let lease = group_core.lease_gate();
        let core = Core {
            stop: stop.clone(),
            stopping: stopping.clone(),
            group,
            core: group_core,
            network,
            base,
            writer: LogWriter::new(log.clone()),
            applier: Applier::new(log, state_machine),
            deferred: Vec::new(),
            metrics: metrics_tx,
            span: span.clone(),
            term_recorded: None,
            metrics_shape: None,
            metrics_at: base,
            metrics_pending: false,
            hold_since: None,
            hold_expired: false,
            writes: Vec::new(),
            api_timeout_ms,
        };
        let task = tokio::spawn(core.run(api_rx, inbox_rx).instrument(span));
        Ok(Raft {
            shared: Arc::new(Shared {
                id,
                group,
                api: api_tx,
                inbox: inbox_tx,
                metrics: metrics_rx,
                timeout,
                inbox_dropped: Default::default(),
                task: tokio::sync::Mutex::new(Some(task)),
                stop,
                stopping,
                lease,
                base,
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// The group's id.
    pub fn group(&self) -> GroupId {
        self.shared.group
    }

    /// Hands a message from a peer to the group. Never blocks: if the group's inbox is full
    /// the message is dropped (and counted), which Raft tolerates.
    pub fn receive(&self, msg: Message) {
        if self.shared.inbox.try_send(msg).is_err() {
            self.shared.inbox_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Messages dropped because the inbox was full (or the group stopped).
    pub fn inbox_dropped(&self) -> u64 {
        self.shared.inbox_dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The metrics channel: the latest state. Role, term, leader and configuration are published
    /// as they change; the counters (indexes, replication) at most a millisecond late.
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.shared.metrics.clone()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, RaftError>>) -> Request,
    ) -> Result<T, RaftError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || {
            let stopped = self.shared.metrics.borrow().stopped.clone();
            stopped.or_else(|| self.shared.stopping.get().cloned()).unwrap_or(Fatal::Shutdown)
        };
        // The common case: room in the queue. No timer: once the core took the call it answers
        // it, with `Timeout` if it waited `api_timeout_ms` (see `Core::time_out_calls`); if the
        // core ends instead, however it ends, the reply channel is dropped with it.
        let request = match self.shared.api.try_send(Api::Request(make(tx))) {
            Ok(()) => return rx.await.map_err(|_| RaftError::Fatal(stopped()))?,
            Err(Refused::Closed(_)) => return Err(RaftError::Fatal(stopped())),
            Err(Refused::Full(request)) => request,
        };
        // The queue is full: the caller waits for room, and a core that makes none (its storage
        // stalled) would answer nothing, so this wait, and the rest of the call with it, has a
        // timer of its own.
        let work = async {
            self.shared.api.send(request).await.map_err(|_| RaftError::Fatal(stopped()))?;
            rx.await.map_err(|_| RaftError::Fatal(stopped()))?
        };
        match tokio::time::timeout(self.shared.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(RaftError::Timeout),
        }
    }

    /// Forms a new cluster with `membership` as its first configuration. Call it on one
    /// node, or on every initial member with the same membership; the others join when the
    /// leader contacts them. Refused with `AlreadyInitialized` on a node that has any state.
    pub async fn initialize(&self, membership: Membership) -> Result<(), RaftError> {
        self.call(|tx| Request::Initialize(membership, tx)).await
    }

    /// Proposes one command; answers once it is committed and applied, with the state
    /// machine's response. After [`RaftError::Timeout`] or [`RaftError::Fatal`] the outcome is
    /// unknown: the entry may already be in the log and commit later (for `Fatal`, once the
    /// group runs again: after a restart, or on the other nodes).
    pub async fn client_write(&self, command: Bytes) -> Result<WriteResponse, RaftError> {
        self.call(|tx| Request::WriteOne(command, tx)).await
    }

    /// Proposes several commands as consecutive log entries in one step; answers once all are
    /// applied (or failed), one result per command, in order. As for [`Raft::client_write`],
    /// a command answered with `Timeout` or `Fatal` may still commit.
    pub async fn client_write_batch(
        &self,
        commands: Vec<Bytes>,
    ) -> Result<Vec<Result<WriteResponse, RaftError>>, RaftError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|tx| Request::Write(commands, tx)).await
    }

    /// ReadIndex: confirms this node is still the leader and returns the commit index a
    /// linearizable read must wait for. See [`Raft::ensure_linearizable`] to also wait for it.
    pub async fn read_index(&self, mode: ReadMode) -> Result<LogIndex, RaftError> {
        self.call(|reply| Request::Read { mode, wait_apply: false, reply }).await
    }

    /// Whether the local state machine may be read now, without a call to the group's task, for
    /// a read as linearizable as a [`ReadMode::Lease`] read: this node leads under a lease and
    /// its state machine applied everything committed. `false`: call
    /// [`Raft::ensure_linearizable`] (which also covers a lease not renewed lately) before
    /// reading. Check, then read: the answer holds for a read that starts after it.
    ///
    /// ```ignore
    /// if !raft.lease_read_ready() {
    ///     raft.ensure_linearizable(ReadMode::Lease).await?;
    /// }
    /// let value = state_machine.get(key);
    /// ```
    pub fn lease_read_ready(&self) -> bool {
        self.shared.lease.open_at(engine_clock(self.shared.base))
    }

    /// Returns once the local state machine reflects every write committed before the call:
    /// read it then, and the read is linearizable. Leader only.
    pub async fn ensure_linearizable(&self, mode: ReadMode) -> Result<LogIndex, RaftError> {
        self.call(|reply| Request::Read { mode, wait_apply: true, reply }).await
    }

    /// Adds `node` as a learner; answers once the change is committed. The learner then
    /// catches up in the background (watch `metrics().replication`).
    pub async fn add_learner(&self, node: NodeId) -> Result<LogIndex, RaftError> {
        self.call(|tx| Request::AddLearner(node, tx)).await
    }

    /// Removes the learner on `node`; answers once the change is committed. A voter is refused
    /// (voters leave through [`Raft::change_membership`]).
    pub async fn remove_learner(&self, node: NodeId) -> Result<LogIndex, RaftError> {
        self.call(|tx| Request::RemoveLearner(node, tx)).await
    }

    /// Changes the voters to exactly `voters`, by joint consensus; answers once the final
    /// configuration is committed. Add new voters as learners first and let them catch up, or
    /// the group may be unavailable until they do. A `Timeout` does not cancel the change:
    /// it goes on in the group (watch `metrics().committed_membership`).
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<LogIndex, RaftError> {
        self.call(|tx| Request::ChangeMembership(voters, tx)).await
    }

    /// Hands leadership to `target`; answers once this node sees `target` as leader.
    pub async fn transfer_leader(&self, target: NodeId) -> Result<(), RaftError> {
        self.call(|tx| Request::TransferLeader(target, tx)).await
    }

    /// Purges the log now up to what the state machine holds durably (`log_keep_entries`
    /// and lagging followers are not waited for). Returns once the group took the request;
    /// watch `metrics().first_log_index` to see it done.
    pub async fn compact_log(&self) -> Result<(), RaftError> {
        self.call(Request::CompactLog).await
    }

    /// Stops the group. Pending and queued requests fail with `Fatal(Shutdown)` at once; then
    /// the group finishes the storage work it started or queued and this returns. A storage
    /// failure meanwhile is logged and becomes the metrics' `stopped` (and what later calls
    /// fail with). Every call returns only once the group's storage work ended, also when
    /// several run at once or the group had stopped by itself (a storage failure).
    pub async fn shutdown(&self) {
        // A permit is stored if the core is not waiting now: its next wait for room ends at once.
        self.shared.stop.notify_one();
        let (tx, rx) = oneshot::channel();
        if self.shared.api.send(Api::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        // Wait for the task, which finishes the storage work it started or queued and then
        // drops the storage, so that storage is no longer touched once this returns (a restart
        // on the same storage must not race the old writer). The queue refuses a shutdown
        // as soon as the group stopped, long before that: every call waits here.
        let mut task = self.shared.task.lock().await;
        if let Some(handle) = task.as_mut() {
            let _ = handle.await;
            *task = None;
        }
    }

    /// Waits until `pred` holds for the metrics, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&RaftMetrics) -> bool,
    ) -> Result<RaftMetrics, RaftError> {
        let mut rx = self.metrics();
        let fut = async {
            loop {
                {
                    let m = rx.borrow_and_update();
                    if pred(&m) {
                        return Ok(m.clone());
                    }
                    if let Some(f) = &m.stopped {
                        return Err(RaftError::Fatal(f.clone()));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(RaftError::Fatal(Fatal::Shutdown));
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.unwrap_or(Err(RaftError::Timeout))
    }
}

/// A seed for the engine's RNG: different per node, group and process start (hosts that run
/// engines themselves use it too).
pub fn seed_from_entropy(id: NodeId, group: GroupId) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(id.0);
    h.write_u64(group.0);
    h.finish()
}

// ----- the stages -------------------------------------------------------------------------------

/// Work a stage runs, boxed: the storage's futures have no type that can be named.
type StageFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Sleeps until `at`; forever if `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Polls the work in `slot` and empties the slot once it is done. Never ready while the slot is
/// empty, so it can stand in `select!` beside the core's queues.
fn poll_stage<T: 'static>(slot: &mut Option<StageFuture<T>>) -> impl Future<Output = T> + '_ {
    std::future::poll_fn(move |cx| {
        let Some(work) = slot.as_mut() else { return Poll::Pending };
        let out = ready!(work.as_mut().poll(cx));
        *slot = None;
        Poll::Ready(out)
    })
}

/// What a batch of log actions did: the entries read for followers, in the order asked, and
/// the last write of the batch, now durable (or the error that stopped the batch).
type LogDone = (Vec<(NodeId, Vec<Entry>)>, Result<Option<IoId>, StorageError>);

/// Executes the engine's log actions in order, one batch at a time, so the writes of a group
/// become durable in the order issued; reports them durable per batch.
struct LogWriter<L: LogStorage> {
    log: Arc<L>,
    /// Actions not started yet, in order; at most `LOG_QUEUE_MAX`.
    queue: VecDeque<LogAction>,
    /// The batch in flight.
    running: Option<StageFuture<LogDone>>,
}

impl<L: LogStorage> LogWriter<L> {
    fn new(log: Arc<L>) -> Self {
        LogWriter { log, queue: VecDeque::new(), running: None }
    }

    fn is_full(&self) -> bool {
        self.queue.len() >= LOG_QUEUE_MAX
    }

    /// Starts the next batch, everything queued, unless one is in flight.
    fn start(&mut self) {
        if self.running.is_some() || self.queue.is_empty() {
            return;
        }
        let batch: Vec<LogAction> = self.queue.drain(..).collect();
        let log = self.log.clone();
        self.running = Some(Box::pin(async move {
            let mut loaded = Vec::new();
            let result = write_batch(&*log, batch, &mut loaded).await;
            (loaded, result)
        }));
    }
}

async fn write_batch<L: LogStorage>(
    log: &L,
    batch: Vec<LogAction>,
    loaded: &mut Vec<(NodeId, Vec<Entry>)>,
) -> Result<Option<IoId>, StorageError> {
    let mut done = None;
    let mut appends: Vec<Entry> = Vec::new();
    for req in batch {
        if !matches!(req, LogAction::Write(Action::AppendEntries { .. })) && !appends.is_empty() {
            log.append(std::mem::take(&mut appends)).await?;
        }
        match req {
            LogAction::Write(Action::AppendEntries { io, entries }) => {
                // Consecutive appends become one write (one fsync).
                if appends.is_empty() {
                    appends = entries;
                } else {
                    appends.extend(entries);
                }
                done = Some(io);
            }
            LogAction::Write(Action::SaveVote { io, vote }) => {
                log.save_vote(&vote).await?;
                done = Some(io);
            }
            LogAction::Write(Action::TruncateFrom { io, index }) => {
                log.truncate_from(index).await?;
                done = Some(io);
            }
            LogAction::Write(Action::PurgeUpTo { io, log_id }) => {
                log.purge_up_to(log_id).await?;
                done = Some(io);
            }
            LogAction::Write(other) => unreachable!("not a write: {other:?}"),
            LogAction::SaveCommitted(index) => log.save_committed(index).await?,
            LogAction::Load { peer, from, to, bytes_max } => {
                let entries = log.read_entries(from, to, bytes_max).await?;
                loaded.push((peer, entries));
            }
        }
    }
    if !appends.is_empty() {
        log.append(appends).await?;
    }
    Ok(done)
}

enum ApplyEvent {
    Applied(Vec<(LogId, Bytes)>, LogIndex),
    Built(SnapshotMeta),
    Read {
        to: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Option<Bytes>,
        done: bool,
    },
    Received {
        meta: SnapshotMeta,
        reception: u64,
        end: u64,
    },
    Installed(SnapshotMeta, u64),
    Refused(SnapshotMeta, u64, String),
    /// Nothing to report (a dropped snapshot).
    Nothing,
}

/// What one action on the state machine did, with the state machine handed back.
type ApplyDone<S> = (S, Result<ApplyEvent, StorageError>);

/// Owns the state machine and runs the engine's actions on it one at a time, in order:
/// applies, snapshot builds, reads and installs.
struct Applier<L: LogStorage, S: StateMachine> {
    log: Arc<L>,
    /// The state machine, here while no action runs on it (the action in flight owns it).
    sm: Option<S>,
    /// Actions not started yet, in order; at most `MACHINE_QUEUE_MAX`.
    queue: VecDeque<MachineAction>,
    /// The action in flight.
    running: Option<StageFuture<ApplyDone<S>>>,
}

impl<L: LogStorage, S: StateMachine> Applier<L, S> {
    fn new(log: Arc<L>, sm: S) -> Self {
        Applier { log, sm: Some(sm), queue: VecDeque::new(), running: None }
    }

    fn is_full(&self) -> bool {
        self.queue.len() >= MACHINE_QUEUE_MAX
    }

    /// Starts the next action unless one is in flight.
    fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Some(mut sm) = self.sm.take() else { return };
        let Some(mut action) = self.queue.pop_front() else {
            self.sm = Some(sm);
            return;
        };
        merge_applies(&mut action, &mut self.queue);
        let log = self.log.clone();
        self.running = Some(Box::pin(async move {
            let result = apply_one(&*log, &mut sm, action).await;
            (sm, result)
        }));
    }

    /// Takes the state machine back from a finished action.
    fn finished(&mut self, (sm, result): ApplyDone<S>) -> Result<ApplyEvent, StorageError> {
        self.sm = Some(sm);
        result
    }
}

/// Consecutive applies of entries the engine had in memory become one call on the state
/// machine: fewer calls and completions per round.
fn merge_applies(action: &mut MachineAction, queue: &mut VecDeque<MachineAction>) {
    let MachineAction::Apply { last, entries: Some(entries), .. } = action else { return };
    while let Some(MachineAction::Apply { first, entries: Some(_), .. }) = queue.front() {
        if *first != last.next() {
            return;
        }
        match queue.pop_front() {
            Some(MachineAction::Apply { last: next_last, entries: Some(more), .. }) => {
                entries.extend(more);
                *last = next_last;
            }
            Some(other) => {
                queue.push_front(other);
                return;
            }
            None => return,
        }
    }
}

async fn apply_one<L: LogStorage, S: StateMachine>(
    log: &L,
    sm: &mut S,
    req: MachineAction,
) -> Result<ApplyEvent, StorageError> {
    match req {
        MachineAction::Apply { first, last, entries } => {
            let entries = match entries {
                Some(e) => e,
                None => {
                    let mut out = Vec::new();
                    let mut next = first;
                    while next <= last {
                        let chunk = log.read_entries(next, last, 4 << 20).await?;
                        let Some(end) = chunk.last().map(|e| e.log_id.index) else {
                            return Err(StorageError::new("read_entries", format!("no entries at {next}")));
                        };
                        next = end.next();
                        out.extend(chunk);
                    }
                    out
                }
            };
            let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
            let responses = sm.apply(entries).await?;
            if responses.len() != ids.len() {
                return Err(StorageError::new("apply", "state machine returned the wrong number of responses"));
            }
            let durable = sm.durable_applied().await?;
            Ok(ApplyEvent::Applied(ids.into_iter().zip(responses).collect(), durable))
        }
        MachineAction::Build => Ok(ApplyEvent::Built(sm.build_snapshot().await?)),
        MachineAction::ReadChunk { to, meta, offset, len, done } => {
            let data = sm.read_snapshot(&meta, offset, len).await?;
            if data.as_ref().is_some_and(|d| d.len() as u64 != len) {
                return Err(StorageError::new(
                    "read_snapshot",
                    format!("asked for {len} bytes at {offset}, got fewer"),
                ));
            }
            Ok(ApplyEvent::Read { to, meta: *meta, offset, data, done })
        }
        MachineAction::Drop(meta) => {
            sm.drop_snapshot(&meta).await?;
            Ok(ApplyEvent::Nothing)
        }
        MachineAction::Receive { meta, offset, data, reception } => {
            let end = offset + data.len() as u64;
            match sm.receive_snapshot(&meta, offset, data).await {
                Ok(()) => Ok(ApplyEvent::Received { meta: *meta, reception, end }),
                Err(SnapshotError::Refused(why)) => Ok(ApplyEvent::Refused(*meta, reception, why)),
                Err(SnapshotError::Storage(e)) => Err(e),
            }
        }
        MachineAction::Install { meta, reception } => match sm.install_snapshot(&meta).await {
            Ok(()) => Ok(ApplyEvent::Installed(*meta, reception)),
            Err(SnapshotError::Refused(why)) => Ok(ApplyEvent::Refused(*meta, reception, why)),
            Err(SnapshotError::Storage(e)) => Err(e),
        },
    }
}

// ----- the core -------------------------------------------------------------------------------

/// A stage's completion taken while the core waited for room in its queue, handled once the
/// actions being executed are queued.
enum Deferred {
    Log(LogDone),
    Apply(Result<ApplyEvent, StorageError>),
}

/// The engine's clock: milliseconds since `base`, the group's start.
fn engine_clock(base: Instant) -> Millis {
    Millis(base.elapsed().as_millis() as u64)
}

struct Core<N: Network, L: LogStorage, S: StateMachine> {
    group: GroupId,
    /// The engine and the bookkeeping of pending requests.
    core: GroupCore,
    network: N,
    /// Time zero of the engine's clock.
    base: Instant,
    writer: LogWriter<L>,
    applier: Applier<L, S>,
    /// See `Deferred`.
    deferred: Vec<Deferred>,
    /// See `Shared::stop`.
    stop: Arc<Notify>,
    /// See `Shared::stopping`.
    stopping: Arc<OnceLock<Fatal>>,
    metrics: watch::Sender<RaftMetrics>,
    /// The group's span; its `term` field follows the engine's term.
    span: tracing::Span,
    term_recorded: Option<Term>,
    /// What the metrics last published said of the fields published at once.
    metrics_shape: Option<MetricsShape>,
    /// When the metrics were last published.
    metrics_at: Instant,
    /// A change may be waiting for `metrics_at + METRICS_DELAY` to be published.
    metrics_pending: bool,
    /// Since when the API queue has been left alone for the proposal in flight.
    hold_since: Option<Instant>,
    /// The hold lasted `API_HOLD_MAX`: the queue is read until the proposal commits.
    hold_expired: bool,
    /// The writes of one drain of the API queue, proposed together; kept for its capacity.
    writes: Vec<WriteCall>,
    /// `Config::api_timeout_ms`: how long a call taken from the API queue may wait for its
    /// answer before the core answers it `Timeout` (see `Raft::call`).
    api_timeout_ms: u64,
}

impl<N: Network, L: LogStorage, S: StateMachine> Core<N, L, S> {
    fn now(&self) -> Millis {
        engine_clock(self.base)
    }

    /// When the engine's next timer is due.
    fn engine_deadline(&self) -> Instant {
        self.base + Duration::from_millis(self.core.engine().next_deadline().0)
    }

    /// When the oldest call waiting for an answer times out, if one waits.
    fn call_deadline(&self) -> Option<Instant> {
        let at = self.core.next_call_timeout(self.api_timeout_ms)?;
        Some(self.base + Duration::from_millis(at.0))
    }

    /// Answers `Timeout` to the calls that waited `api_timeout_ms`, if any did: their callers
    /// have no timer of their own (see `Raft::call`).
    fn time_out_calls(&mut self) {
        if self.call_deadline().is_some_and(|at| Instant::now() >= at) {
            let now = self.now();
            self.core.time_out_calls(now, self.api_timeout_ms);
        }
    }

    /// When the core must wake up by itself: the engine's next timer, the publication of
    /// metrics held back, or the timeout of a call.
    fn deadline(&self) -> Instant {
        let mut deadline = self.engine_deadline();
        if let Some(at) = self.call_deadline() {
            deadline = deadline.min(at);
        }
        if self.metrics_pending {
            deadline = deadline.min(self.metrics_at + METRICS_DELAY);
        }
        if let (Some(since), false) = (self.hold_since, self.hold_expired) {
            deadline = deadline.min(since + API_HOLD_MAX);
        }
        deadline
    }

    /// Whether to leave the API queue alone now: while this leader has a proposal in flight
    /// (entries not yet committed), the requests arriving meanwhile wait in the queue and go
    /// out together once it commits, as one proposal (one append, one message per follower)
    /// in the same wake-up as that commit. Under load a round then carries everything that
    /// arrived during the previous one, where reading the queue at once made many small
    /// rounds, each paying its messages and its thread wake-ups; and callers queueing a
    /// request do not wake the core only for it to wait. Held `API_HOLD_MAX` at most per
    /// proposal, so a proposal that does not commit (a lost quorum) delays requests by no
    /// more than that.
    fn hold_api(&mut self) -> bool {
        let e = self.core.engine();
        let in_flight = e.role() == Role::Leader && e.last_log_id().index > e.committed();
        if !in_flight {
            self.hold_since = None;
            self.hold_expired = false;
            return false;
        }
        if self.hold_since.is_none() {
            self.hold_since = Some(Instant::now());
        }
        !self.hold_expired
    }

    async fn run(mut self, mut api: ApiReceiver<Api>, mut inbox: mpsc::Receiver<Message>) {
        let mut shutdown_reply = None;
        // One timer for the life of the group, moved to each new deadline: a later deadline
        // costs Tokio no lock, where a new timer per wait is registered and removed each time.
        let timer = tokio::time::sleep_until(self.deadline());
        tokio::pin!(timer);
        loop {
            self.execute_actions().await;
            if !self.deferred.is_empty() {
                // Their inputs may produce more actions: execute those first.
                for d in std::mem::take(&mut self.deferred) {
                    match d {
                        Deferred::Log(done) => self.on_log_done(done),
                        Deferred::Apply(result) => self.on_apply(result),
                    }
                }
                continue;
            }
            self.publish_metrics();
            // Under steady load the timer's branch, last in the biased select, may not run for
            // a while: counters held back go out here once their delay has passed.
            if self.metrics_pending && timer.is_elapsed() {
                self.publish_metrics_now();
            }
            // So are calls that waited too long: their callers have no other timer.
            if timer.is_elapsed() {
                self.time_out_calls();
            }
            if self.core.fatal().is_some() {
                break;
            }
            self.writer.start();
            self.applier.start();
            let hold_api = self.hold_api();
            let deadline = self.deadline();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                done = poll_stage(&mut self.writer.running) => self.on_log_done(done),
                done = poll_stage(&mut self.applier.running) => {
                    let result = self.applier.finished(done);
                    self.on_apply(result);
                }
                Some(msg) = inbox.recv() => {
                    let now = self.now();
                    self.core.handle_message(now, msg);
                    for _ in 1..EVENTS_PER_ROUND_MAX {
                        match inbox.try_recv() {
                            Ok(msg) => self.core.handle_message(now, msg),
                            Err(_) => break,
                        }
                    }
                }
                req = std::future::poll_fn(|cx| api.poll_recv(cx)), if !hold_api => match req {
                    Some(first) => {
                        if let Some(reply) = self.on_api(first, &mut api) {
                            shutdown_reply = Some(reply);
                        }
                    }
                    None => self.core.stop(Fatal::Shutdown),
                },
                _ = &mut timer => {
                    let now = Instant::now();
                    if self.metrics_pending && now >= self.metrics_at + METRICS_DELAY {
                        self.publish_metrics_now();
                    }
                    if self.hold_since.is_some_and(|since| now >= since + API_HOLD_MAX) {
                        self.hold_expired = true;
                    }
                    self.time_out_calls();
                    // The timer may have been set for the metrics only.
                    if now >= self.engine_deadline() {
                        let now = self.now();
                        self.core.handle_timeout(now);
                    }
                }
            }
        }
        self.publish_metrics_now();
        // Nothing more is taken. The requests still queued are answered now, not once the
        // storage work below is done: a slow disk must not leave callers to time out.
        let mut shutdown_replies: Vec<_> = shutdown_reply.into_iter().collect();
        self.refuse_queued(&mut api, &mut shutdown_replies);
        inbox.close();
        let failed = self.finish_storage_work().await;
        let fatal = match (self.core.fatal(), failed) {
            (Some(f @ (Fatal::Storage(_) | Fatal::Diverged { .. })), _) => f.clone(),
            (_, Some(e)) => Fatal::Storage(e),
            (_, None) => Fatal::Shutdown,
        };
        self.metrics.send_modify(|m| m.stopped = Some(fatal));
        for reply in shutdown_replies {
            let _ = reply.send(());
        }
    }

    /// Once the group stopped: closes the API queue and refuses every request in it with the
    /// group's fatal error; shutdowns are kept in `shutdowns`, answered once storage work ends.
    fn refuse_queued(&self, api: &mut ApiReceiver<Api>, shutdowns: &mut Vec<oneshot::Sender<()>>) {
        let fatal = self.core.fatal().cloned().unwrap_or(Fatal::Shutdown);
        // Before the queue closes: a call it refuses reads why from here.
        let _ = self.stopping.set(fatal.clone());
        api.close();
        while let Some(item) = api.try_recv() {
            match item {
                Api::Request(req) => req.refuse(RaftError::Fatal(fatal.clone())),
                Api::Shutdown(reply) => shutdowns.push(reply),
            }
        }
    }

    /// Once the group stopped: lets the storage work in flight finish and, on a shutdown, the
    /// work queued too (never after a storage failure: the log is not to be trusted), so that
    /// nothing touches storage once the task ended. Both stages are driven together, as in the
    /// core's wait: either one's work may wait for the other's (a store shared by the log and
    /// the state machine, behind one lock). A stage whose work fails runs nothing more; the
    /// first failure is returned (the group's waiters were answered when it stopped, so the
    /// metrics are what is left to report it to).
    async fn finish_storage_work(&mut self) -> Option<StorageError> {
        let shutdown = matches!(self.core.fatal(), Some(Fatal::Shutdown) | None);
        if !shutdown {
            self.writer.queue.clear();
            self.applier.queue.clear();
        }
        let mut first_failure = None;
        loop {
            self.writer.start();
            self.applier.start();
            if self.writer.running.is_none() && self.applier.running.is_none() {
                return first_failure;
            }
            let failed = tokio::select! {
                done = poll_stage(&mut self.writer.running) => done.1.err().inspect(|_| self.writer.queue.clear()),
                done = poll_stage(&mut self.applier.running) => {
                    self.applier.finished(done).err().inspect(|_| self.applier.queue.clear())
                }
            };
            if let Some(e) = failed {
                error!(error = %e, "storage failed while the group stopped");
                first_failure.get_or_insert(e);
            }
        }
    }

    /// Publishes the metrics if they changed: at once if a field of `MetricsShape` did, else
    /// at most once per `METRICS_DELAY` (the timer publishes what is held back).
    fn publish_metrics(&mut self) {
        let shape = MetricsShape::of(self.core.engine());
        if self.metrics_shape.as_ref() == Some(&shape) {
            if self.metrics_pending {
                return; // the timer publishes it
            }
            let now = Instant::now();
            if now < self.metrics_at + METRICS_DELAY {
                self.metrics_pending = true;
                return;
            }
        }
        self.publish_metrics_now();
    }

    fn publish_metrics_now(&mut self) {
        let term = self.core.engine().term();
        if self.term_recorded != Some(term) {
            self.term_recorded = Some(term);
            self.span.record("term", term.0);
        }
        self.metrics_shape = Some(MetricsShape::of(self.core.engine()));
        self.metrics_at = Instant::now();
        self.metrics_pending = false;
        let m = RaftMetrics::from_status(self.group, self.core.engine().status());
        self.metrics.send_if_modified(|cur| {
            if *cur == m {
                false
            } else {
                *cur = m;
                true
            }
        });
    }

    /// Handles `first` and what else is queued (up to `EVENTS_PER_ROUND_MAX` in all): reads
    /// arriving together share one heartbeat round, and writes one proposal (one append, one
    /// message per follower). Writes are gathered until another kind of request comes, so
    /// requests still take effect in the order queued. Returns the reply of a shutdown.
    fn on_api(&mut self, first: Api, api: &mut ApiReceiver<Api>) -> Option<oneshot::Sender<()>> {
        let now = self.now();
        let mut writes = std::mem::take(&mut self.writes);
        let mut next = Some(first);
        let mut taken = 0;
        let mut shutdown = None;
        while let Some(item) = next.take() {
            taken += 1;
            match item {
                Api::Request(Request::Write(commands, reply)) => writes.push(WriteCall::Many(commands, reply)),
                Api::Request(Request::WriteOne(command, reply)) => writes.push(WriteCall::One(command, reply)),
                Api::Request(req) => {
                    self.core.handle_writes(now, &mut writes);
                    self.core.handle_request(now, req);
                }
                Api::Shutdown(reply) => {
                    shutdown = Some(reply);
                    break;
                }
            }
            if taken < EVENTS_PER_ROUND_MAX {
                next = api.try_recv();
            }
        }
        self.core.handle_writes(now, &mut writes);
        self.writes = writes;
        if shutdown.is_some() {
            self.core.stop(Fatal::Shutdown);
        }
        shutdown
    }

    fn on_log_done(&mut self, (loaded, result): LogDone) {
        let now = self.now();
        for (peer, entries) in loaded {
            self.core.handle_entries_loaded(now, peer, entries);
        }
        match result {
            Ok(Some(io)) => self.core.handle_io_done(now, io),
            Ok(None) => {}
            Err(e) => self.stop(e),
        }
    }

    fn on_apply(&mut self, result: Result<ApplyEvent, StorageError>) {
        let now = self.now();
        let ev = match result {
            Ok(ev) => ev,
            Err(e) => return self.stop(e),
        };
        match ev {
            ApplyEvent::Applied(results, durable) => {
                self.core.handle_applied(now, results);
                self.core.handle_applied_durable(now, durable);
            }
            ApplyEvent::Built(meta) => self.core.handle_snapshot_built(now, meta),
            ApplyEvent::Read { to, meta, offset, data, done } => {
                self.core.handle_snapshot_read(now, to, meta, offset, data, done)
            }
            ApplyEvent::Received { meta, reception, end } => {
                self.core.handle_snapshot_received(now, meta, reception, end)
            }
            ApplyEvent::Installed(meta, reception) => self.core.handle_snapshot_installed(now, meta, reception),
            ApplyEvent::Refused(meta, reception, why) => self.core.handle_snapshot_refused(now, meta, reception, &why),
            ApplyEvent::Nothing => {}
        }
    }

    fn stop(&mut self, e: StorageError) {
        error!(error = %e, "storage failed: stopping the group");
        self.core.stop(Fatal::Storage(e));
    }

    async fn execute_actions(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                CoreAction::Log(a) => {
                    if self.writer.is_full() && !self.wait_for_writer().await {
                        return self.core.stop(Fatal::Shutdown);
                    }
                    self.writer.queue.push_back(a);
                }
                CoreAction::Send(msg) => self.network.send(msg),
                CoreAction::Machine(a) => {
                    if self.applier.is_full() && !self.wait_for_applier().await {
                        return self.core.stop(Fatal::Shutdown);
                    }
                    self.applier.queue.push_back(a);
                }
            }
        }
    }

    /// Makes room in the log writer's full queue: waits for the batch in flight, then starts
    /// the next (everything queued). The applier goes on meanwhile: the batch may wait for the
    /// action in flight there (a store shared by the log and the state machine, behind one
    /// lock), which only ends if it is polled, or for one queued there by the actions being
    /// executed, which only ends if it is started. False if the group stops instead (shut
    /// down meanwhile, or a stage failed).
    async fn wait_for_writer(&mut self) -> bool {
        self.applier.start();
        while self.writer.running.is_some() {
            let calls_due = self.call_deadline();
            tokio::select! {
                done = poll_stage(&mut self.writer.running) => {
                    if !self.defer_log(done) {
                        return false;
                    }
                }
                done = poll_stage(&mut self.applier.running) => {
                    if !self.defer_apply(done) {
                        return false;
                    }
                    self.applier.start();
                }
                _ = self.stop.notified() => return false,
                // Callers still get their timeouts while the core waits for its storage.
                _ = sleep_until_some(calls_due) => self.time_out_calls(),
            }
        }
        self.writer.start();
        true
    }

    /// Makes room in the applier's full queue: waits for the action in flight, then starts the
    /// next. The log writer goes on meanwhile, its queued work started first, for the same
    /// reasons as in `wait_for_writer`. False if the group stops instead.
    async fn wait_for_applier(&mut self) -> bool {
        self.writer.start();
        while self.applier.running.is_some() {
            let calls_due = self.call_deadline();
            tokio::select! {
                done = poll_stage(&mut self.applier.running) => {
                    if !self.defer_apply(done) {
                        return false;
                    }
                }
                done = poll_stage(&mut self.writer.running) => {
                    if !self.defer_log(done) {
                        return false;
                    }
                    self.writer.start();
                }
                _ = self.stop.notified() => return false,
                // Callers still get their timeouts while the core waits for its storage.
                _ = sleep_until_some(calls_due) => self.time_out_calls(),
            }
        }
        self.applier.start();
        true
    }

    /// Keeps a log batch's completion for after the actions being executed; false (and the
    /// group stopped) if the batch failed.
    fn defer_log(&mut self, done: LogDone) -> bool {
        if let Err(e) = &done.1 {
            self.stop(e.clone());
            return false;
        }
        self.deferred.push(Deferred::Log(done));
        true
    }

    /// Keeps an applier action's completion for after the actions being executed; false (and
    /// the group stopped) if the action failed.
    fn defer_apply(&mut self, done: ApplyDone<S>) -> bool {
        let result = self.applier.finished(done);
        if let Err(e) = &result {
            self.stop(e.clone());
            return false;
        }
        self.deferred.push(Deferred::Apply(result));
        true
    }
}
