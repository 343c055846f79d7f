//! The Tokio driver: [`Raft`], the public handle of one group, and the task that runs its
//! [`Engine`] against a [`LogStorage`], a [`StateMachine`] and a [`Network`].
//!
//! Three tasks per group: the core (owns the engine, answers API calls, sends messages), a
//! log writer (executes writes in order, coalescing consecutive appends, and reports them
//! durable), and an applier (owns the state machine: applies, builds and installs snapshots).
//! Writes and applies therefore never block the core: the leader keeps replicating while its
//! own fsync runs. A host running thousands of groups drives [`Engine`] directly instead.

mod recover;

use crate::config::Config;
use crate::engine::{Action, Engine, EngineStatus, IoId, ReadMode, Role};
use crate::entry::Entry;
use crate::error::{Fatal, RaftError, StorageError};
use crate::membership::{Membership, StoredMembership};
use crate::message::{Message, MessageBody};
use crate::network::Network;
use crate::storage::{LogStorage, Snapshot, SnapshotMeta, StateMachine};
use crate::types::{GroupId, LogId, LogIndex, Millis, NodeId, Term};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info_span, warn, Instrument};

pub use recover::recover_state;

/// Messages from peers queued for one group; when it is full, arriving messages are dropped
/// (Raft tolerates loss; a full queue means the group is overloaded).
pub const INBOX_MSGS_MAX: usize = 4096;
/// API requests queued for one group; callers wait for room.
const API_QUEUE_MAX: usize = 1024;
/// Events the core handles before it executes the actions they produced: batching.
const EVENTS_PER_ROUND_MAX: usize = 256;

/// The result of a committed and applied write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResponse {
    /// Where the command landed in the log.
    pub log_id: LogId,
    /// What the state machine returned for it.
    pub data: Bytes,
}

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
    /// Last log id of the current snapshot.
    pub snapshot: Option<LogId>,
    /// The first index still in the log.
    pub first_log_index: LogIndex,
    /// On the leader: matched index per follower.
    pub replication: BTreeMap<NodeId, LogIndex>,
    /// Set once the group stopped.
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
            first_log_index: s.first_log_index,
            replication: s.replication,
            stopped: None,
        }
    }
}

enum Api {
    Initialize(Membership, oneshot::Sender<Result<(), RaftError>>),
    Write(Vec<Bytes>, oneshot::Sender<Result<Vec<Result<WriteResponse, RaftError>>, RaftError>>),
    Read(ReadMode, bool, oneshot::Sender<Result<LogIndex, RaftError>>),
    AddLearner(NodeId, oneshot::Sender<Result<LogIndex, RaftError>>),
    ChangeMembership(BTreeSet<NodeId>, oneshot::Sender<Result<LogIndex, RaftError>>),
    TransferLeader(NodeId, oneshot::Sender<Result<(), RaftError>>),
    TriggerSnapshot,
    Shutdown(oneshot::Sender<()>),
}

struct Shared {
    id: NodeId,
    group: GroupId,
    api: mpsc::Sender<Api>,
    inbox: mpsc::Sender<Message>,
    metrics: watch::Receiver<RaftMetrics>,
    timeout: Duration,
    /// Messages dropped because the inbox was full.
    inbox_dropped: std::sync::atomic::AtomicU64,
    /// The group's tasks (core, log writer, applier), awaited by `shutdown`.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The handle of one Raft group on this node. Cheap to clone.
///
/// Every call is answered by the group's task; a call that gets no answer within
/// `Config::api_timeout_ms` returns [`RaftError::Timeout`] (for a write the outcome is then
/// unknown). After a storage failure or `shutdown`, calls return [`RaftError::Fatal`].
#[derive(Clone)]
pub struct Raft {
    shared: Arc<Shared>,
}

impl Raft {
    /// Starts the group: recovers its state from `log` and `state_machine` and spawns its
    /// tasks on the current Tokio runtime. A node with no state waits to be initialized or to
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
        let (state, snapshot) = recover_state(&*log, &mut state_machine).await.map_err(Fatal::from)?;
        let base = Instant::now();
        let seed = seed_from_entropy(id, group);
        let timeout = Duration::from_millis(config.api_timeout_ms);
        let engine = Engine::new(id, Arc::new(config), state, seed, Millis(0));
        let (api_tx, api_rx) = mpsc::channel(API_QUEUE_MAX);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_MSGS_MAX);
        let (metrics_tx, metrics_rx) = watch::channel(RaftMetrics::from_status(group, engine.status()));
        let (io_tx, io_rx) = mpsc::unbounded_channel();
        let (io_ev_tx, io_ev_rx) = mpsc::unbounded_channel();
        let (ap_tx, ap_rx) = mpsc::unbounded_channel();
        let (ap_ev_tx, ap_ev_rx) = mpsc::unbounded_channel();
        // `term` is recorded on the span as it changes, so every event of the group carries it.
        let span = info_span!("raft", group = %group, node = %id, term = tracing::field::Empty);
        let writer = tokio::spawn(log_writer(log.clone(), io_rx, io_ev_tx).instrument(span.clone()));
        let applier = tokio::spawn(applier(log.clone(), state_machine, ap_rx, ap_ev_tx).instrument(span.clone()));
        let core = Core {
            group,
            engine,
            network,
            base,
            io_tx,
            ap_tx,
            snapshot,
            receiving: BytesMut::new(),
            writes: BTreeMap::new(),
            batches: HashMap::new(),
            next_batch: 0,
            reads: HashMap::new(),
            reads_ready: Vec::new(),
            next_read: 0,
            learner_waits: Vec::new(),
            change_waits: Vec::new(),
            transfer_waits: Vec::new(),
            metrics: metrics_tx,
            span: span.clone(),
            term_recorded: None,
            committed_saved: LogIndex(0),
            fatal: None,
        };
        let task = tokio::spawn(core.run(api_rx, inbox_rx, io_ev_rx, ap_ev_rx).instrument(span));
        Ok(Raft {
            shared: Arc::new(Shared {
                id,
                group,
                api: api_tx,
                inbox: inbox_tx,
                metrics: metrics_rx,
                timeout,
                inbox_dropped: Default::default(),
                // The core first: when it ends it drops the writer's and applier's queues, and
                // they finish what is queued and stop.
                tasks: Mutex::new(vec![task, writer, applier]),
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

    /// The metrics channel: the latest state, updated after every change.
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.shared.metrics.clone()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, RaftError>>) -> Api) -> Result<T, RaftError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || self.shared.metrics.borrow().stopped.clone().unwrap_or(Fatal::Shutdown);
        let work = async {
            self.shared.api.send(make(tx)).await.map_err(|_| RaftError::Fatal(stopped()))?;
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
        self.call(|tx| Api::Initialize(membership, tx)).await
    }

    /// Proposes one command; answers once it is committed and applied, with the state
    /// machine's response.
    pub async fn client_write(&self, command: Bytes) -> Result<WriteResponse, RaftError> {
        let mut all = self.client_write_batch(vec![command]).await?;
        all.pop().unwrap_or(Err(RaftError::Timeout))
    }

    /// Proposes several commands as consecutive log entries in one step; answers once all are
    /// applied (or failed), one result per command, in order.
    pub async fn client_write_batch(
        &self,
        commands: Vec<Bytes>,
    ) -> Result<Vec<Result<WriteResponse, RaftError>>, RaftError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|tx| Api::Write(commands, tx)).await
    }

    /// ReadIndex: confirms this node is still the leader and returns the commit index a
    /// linearizable read must wait for. See [`Raft::ensure_linearizable`] to also wait for it.
    pub async fn read_index(&self, mode: ReadMode) -> Result<LogIndex, RaftError> {
        self.call(|tx| Api::Read(mode, false, tx)).await
    }

    /// Returns once the local state machine reflects every write committed before the call:
    /// read it then, and the read is linearizable. Leader only.
    pub async fn ensure_linearizable(&self, mode: ReadMode) -> Result<LogIndex, RaftError> {
        self.call(|tx| Api::Read(mode, true, tx)).await
    }

    /// Adds `node` as a learner; answers once the change is committed. The learner then
    /// catches up in the background (watch `metrics().replication`).
    pub async fn add_learner(&self, node: NodeId) -> Result<LogIndex, RaftError> {
        self.call(|tx| Api::AddLearner(node, tx)).await
    }

    /// Changes the voters to exactly `voters`, by joint consensus; answers once the final
    /// configuration is committed. Add new voters as learners first and let them catch up, or
    /// the group may be unavailable until they do. A `Timeout` does not cancel the change:
    /// it goes on in the group (watch `metrics().committed_membership`).
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<LogIndex, RaftError> {
        self.call(|tx| Api::ChangeMembership(voters, tx)).await
    }

    /// Hands leadership to `target`; answers once this node sees `target` as leader.
    pub async fn transfer_leader(&self, target: NodeId) -> Result<(), RaftError> {
        self.call(|tx| Api::TransferLeader(target, tx)).await
    }

    /// Asks for a snapshot to be built now (the log is then compacted behind it). Returns once
    /// the request is queued; watch `metrics().snapshot` to see it done.
    pub async fn trigger_snapshot(&self) -> Result<(), RaftError> {
        self.shared.api.send(Api::TriggerSnapshot).await.map_err(|_| RaftError::Fatal(Fatal::Shutdown))
    }

    /// Stops the group's tasks. Pending requests fail with `Fatal(Shutdown)`.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.api.send(Api::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        // Wait for all three tasks, so that storage is no longer touched once this returns
        // (a restart on the same storage must not race the old writer).
        let tasks: Vec<_> = self.shared.tasks.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for task in tasks {
            let _ = task.await;
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

/// A seed for the engine's RNG: different per node, group and process start.
fn seed_from_entropy(id: NodeId, group: GroupId) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(id.0);
    h.write_u64(group.0);
    h.finish()
}

// ----- the log writer -------------------------------------------------------------------------

enum IoReq {
    Write(Action),
    /// Record the commit index (not a durability point: no completion is reported).
    SaveCommitted(LogIndex),
    Load {
        peer: NodeId,
        from: LogIndex,
        to: LogIndex,
        bytes_max: usize,
    },
}

enum IoEvent {
    Done(IoId),
    Loaded(NodeId, Vec<Entry>),
    Failed(StorageError),
}

/// Executes the engine's writes in order; reports them durable in batches.
async fn log_writer<L: LogStorage>(
    log: Arc<L>,
    mut rx: mpsc::UnboundedReceiver<IoReq>,
    tx: mpsc::UnboundedSender<IoEvent>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < EVENTS_PER_ROUND_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match write_batch(&*log, batch, &tx).await {
            Ok(Some(io)) => {
                let _ = tx.send(IoEvent::Done(io));
            }
            Ok(None) => {}
            Err(e) => {
                let _ = tx.send(IoEvent::Failed(e));
                return;
            }
        }
    }
}

async fn write_batch<L: LogStorage>(
    log: &L,
    batch: Vec<IoReq>,
    tx: &mpsc::UnboundedSender<IoEvent>,
) -> Result<Option<IoId>, StorageError> {
    let mut done = None;
    let mut appends: Vec<Entry> = Vec::new();
    for req in batch {
        if !matches!(req, IoReq::Write(Action::AppendEntries { .. })) && !appends.is_empty() {
            log.append(std::mem::take(&mut appends)).await?;
        }
        match req {
            IoReq::Write(Action::AppendEntries { io, entries }) => {
                // Consecutive appends become one write (one fsync).
                appends.extend(entries);
                done = Some(io);
            }
            IoReq::Write(Action::SaveVote { io, vote }) => {
                log.save_vote(&vote).await?;
                done = Some(io);
            }
            IoReq::Write(Action::TruncateFrom { io, index }) => {
                log.truncate_from(index).await?;
                done = Some(io);
            }
            IoReq::Write(Action::PurgeUpTo { io, log_id }) => {
                log.purge_up_to(log_id).await?;
                done = Some(io);
            }
            IoReq::Write(other) => unreachable!("not a write: {other:?}"),
            IoReq::SaveCommitted(index) => log.save_committed(index).await?,
            IoReq::Load { peer, from, to, bytes_max } => {
                let entries = log.read_entries(from, to, bytes_max).await?;
                let _ = tx.send(IoEvent::Loaded(peer, entries));
            }
        }
    }
    if !appends.is_empty() {
        log.append(appends).await?;
    }
    Ok(done)
}

// ----- the applier ----------------------------------------------------------------------------

enum ApplyReq {
    Apply { first: LogIndex, last: LogIndex, entries: Option<Vec<Entry>> },
    Build,
    Install(Snapshot),
}

enum ApplyEvent {
    Applied(Vec<(LogId, Bytes)>),
    Built(Snapshot),
    Installed(Snapshot),
    Failed(StorageError),
}

async fn applier<L: LogStorage, S: StateMachine>(
    log: Arc<L>,
    mut sm: S,
    mut rx: mpsc::UnboundedReceiver<ApplyReq>,
    tx: mpsc::UnboundedSender<ApplyEvent>,
) {
    while let Some(req) = rx.recv().await {
        let ev = match apply_one(&*log, &mut sm, req).await {
            Ok(ev) => ev,
            Err(e) => ApplyEvent::Failed(e),
        };
        let failed = matches!(ev, ApplyEvent::Failed(_));
        if tx.send(ev).is_err() || failed {
            return;
        }
    }
}

async fn apply_one<L: LogStorage, S: StateMachine>(
    log: &L,
    sm: &mut S,
    req: ApplyReq,
) -> Result<ApplyEvent, StorageError> {
    match req {
        ApplyReq::Apply { first, last, entries } => {
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
            Ok(ApplyEvent::Applied(ids.into_iter().zip(responses).collect()))
        }
        ApplyReq::Build => Ok(ApplyEvent::Built(sm.build_snapshot().await?)),
        ApplyReq::Install(snapshot) => {
            sm.install_snapshot(snapshot.clone()).await?;
            Ok(ApplyEvent::Installed(snapshot))
        }
    }
}

// ----- the core -------------------------------------------------------------------------------

type WriteReply = oneshot::Sender<Result<Vec<Result<WriteResponse, RaftError>>, RaftError>>;
type IndexReply = oneshot::Sender<Result<LogIndex, RaftError>>;

struct Batch {
    results: Vec<Option<Result<WriteResponse, RaftError>>>,
    remaining: usize,
    reply: WriteReply,
}

struct PendingWrite {
    term: Term,
    batch: u64,
    pos: usize,
}

struct Core<N: Network> {
    group: GroupId,
    engine: Engine,
    network: N,
    /// Time zero of the engine's clock.
    base: Instant,
    io_tx: mpsc::UnboundedSender<IoReq>,
    ap_tx: mpsc::UnboundedSender<ApplyReq>,
    /// The current snapshot (built or installed), for sending chunks.
    snapshot: Option<Snapshot>,
    /// Chunks of the snapshot being received.
    receiving: BytesMut,
    /// Proposed entries waiting to be applied, by index.
    writes: BTreeMap<LogIndex, PendingWrite>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    /// Reads waiting for the engine: id -> (wait for apply?, reply).
    reads: HashMap<u64, (bool, oneshot::Sender<Result<LogIndex, RaftError>>)>,
    /// Reads confirmed, waiting for the state machine to reach their index.
    reads_ready: Vec<(LogIndex, oneshot::Sender<Result<LogIndex, RaftError>>)>,
    next_read: u64,
    /// `add_learner` calls waiting for their entry (id) to apply: (entry, node, reply).
    learner_waits: Vec<(LogId, NodeId, IndexReply)>,
    /// Membership changes waiting for the final configuration (joint entry index).
    change_waits: Vec<(LogId, BTreeSet<NodeId>, IndexReply)>,
    transfer_waits: Vec<(NodeId, oneshot::Sender<Result<(), RaftError>>)>,
    metrics: watch::Sender<RaftMetrics>,
    /// The group's span; its `term` field follows the engine's term.
    span: tracing::Span,
    term_recorded: Option<Term>,
    /// The commit index last handed to `save_committed`.
    committed_saved: LogIndex,
    fatal: Option<Fatal>,
}

impl<N: Network> Core<N> {
    fn now(&self) -> Millis {
        Millis(self.base.elapsed().as_millis() as u64)
    }

    async fn run(
        mut self,
        mut api: mpsc::Receiver<Api>,
        mut inbox: mpsc::Receiver<Message>,
        mut io_ev: mpsc::UnboundedReceiver<IoEvent>,
        mut ap_ev: mpsc::UnboundedReceiver<ApplyEvent>,
    ) {
        let mut shutdown_reply = None;
        loop {
            self.execute_actions();
            self.publish_metrics();
            if self.fatal.is_some() {
                break;
            }
            let deadline = self.base + Duration::from_millis(self.engine.next_deadline().0);
            tokio::select! {
                biased;
                Some(ev) = io_ev.recv() => {
                    self.on_io(ev);
                    while let Ok(ev) = io_ev.try_recv() {
                        self.on_io(ev);
                    }
                }
                Some(ev) = ap_ev.recv() => {
                    self.on_apply(ev);
                    while let Ok(ev) = ap_ev.try_recv() {
                        self.on_apply(ev);
                    }
                }
                Some(msg) = inbox.recv() => {
                    let now = self.now();
                    self.engine.handle_message(now, msg);
                    for _ in 1..EVENTS_PER_ROUND_MAX {
                        match inbox.try_recv() {
                            Ok(msg) => self.engine.handle_message(now, msg),
                            Err(_) => break,
                        }
                    }
                }
                req = api.recv() => match req {
                    Some(Api::Shutdown(reply)) => {
                        shutdown_reply = Some(reply);
                        self.fatal = Some(Fatal::Shutdown);
                    }
                    Some(req) => {
                        self.on_api(req);
                        // Take what else is queued: reads arriving together share one
                        // heartbeat round, writes one append.
                        for _ in 1..EVENTS_PER_ROUND_MAX {
                            match api.try_recv() {
                                Ok(Api::Shutdown(reply)) => {
                                    shutdown_reply = Some(reply);
                                    self.fatal = Some(Fatal::Shutdown);
                                    break;
                                }
                                Ok(req) => self.on_api(req),
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.fatal = Some(Fatal::Shutdown),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                }
            }
        }
        let fatal = self.fatal.clone().unwrap_or(Fatal::Shutdown);
        self.fail_all(&fatal);
        self.metrics.send_modify(|m| m.stopped = Some(fatal));
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    fn stop(&mut self, e: StorageError) {
        error!(error = %e, "storage failed: stopping the group");
        self.fatal = Some(Fatal::Storage(e));
    }

    fn fail_all(&mut self, fatal: &Fatal) {
        let err = || RaftError::Fatal(fatal.clone());
        for (_, b) in self.batches.drain() {
            let _ = b.reply.send(Err(err()));
        }
        self.writes.clear();
        for (_, (_, r)) in self.reads.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, r) in self.reads_ready.drain(..) {
            let _ = r.send(Err(err()));
        }
        for (_, _, r) in self.learner_waits.drain(..) {
            let _ = r.send(Err(err()));
        }
        for (_, _, r) in self.change_waits.drain(..) {
            let _ = r.send(Err(err()));
        }
        for (_, r) in self.transfer_waits.drain(..) {
            let _ = r.send(Err(err()));
        }
    }

    fn publish_metrics(&mut self) {
        let term = self.engine.term();
        if self.term_recorded != Some(term) {
            self.term_recorded = Some(term);
            self.span.record("term", term.0);
        }
        let m = RaftMetrics::from_status(self.group, self.engine.status());
        self.metrics.send_if_modified(|cur| {
            if *cur == m {
                false
            } else {
                *cur = m;
                true
            }
        });
    }

    fn on_api(&mut self, req: Api) {
        let now = self.now();
        match req {
            Api::Initialize(m, reply) => {
                let _ = reply.send(self.engine.initialize(now, m));
            }
            Api::Write(cmds, reply) => {
                let count = cmds.len();
                match self.engine.propose(now, cmds) {
                    Ok(first) => {
                        let term = self.engine.term();
                        let batch = self.next_batch;
                        self.next_batch += 1;
                        for pos in 0..count {
                            self.writes.insert(LogIndex(first.0 + pos as u64), PendingWrite { term, batch, pos });
                        }
                        self.batches.insert(batch, Batch { results: vec![None; count], remaining: count, reply });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Api::Read(mode, wait_apply, reply) => {
                let id = self.next_read;
                self.next_read += 1;
                self.reads.insert(id, (wait_apply, reply));
                self.engine.read(now, id, mode);
            }
            Api::AddLearner(node, reply) => match self.engine.add_learner(now, node) {
                Ok(index) => {
                    let term = self.engine.term_at(index).unwrap_or_default();
                    self.learner_waits.push((LogId { term, index }, node, reply))
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Api::ChangeMembership(voters, reply)
                if voters == self.engine.committed_membership().membership.voters
                    && !self.engine.committed_membership().membership.is_joint()
                    && self.engine.membership() == self.engine.committed_membership()
                    && self.engine.leader() == Some(self.engine.id()) =>
            {
                // Already the configuration: nothing to do.
                let _ = reply.send(Ok(self.engine.committed_membership().log_id.index));
            }
            Api::ChangeMembership(voters, reply) => match self.engine.change_membership(now, voters.clone()) {
                Ok(index) => {
                    let term = self.engine.term_at(index).unwrap_or_default();
                    self.change_waits.push((LogId { term, index }, voters, reply))
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Api::TransferLeader(target, reply) => match self.engine.transfer_leader(now, target) {
                Ok(()) if self.engine.leader() == Some(target) => {
                    let _ = reply.send(Ok(()));
                }
                Ok(()) => self.transfer_waits.push((target, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Api::TriggerSnapshot => self.engine.trigger_snapshot(),
            Api::Shutdown(_) => unreachable!("handled by the loop"),
        }
        self.check_waits();
    }

    fn on_io(&mut self, ev: IoEvent) {
        let now = self.now();
        match ev {
            IoEvent::Done(io) => self.engine.handle_io_done(now, io),
            IoEvent::Loaded(peer, entries) => self.engine.handle_entries_loaded(now, peer, entries),
            IoEvent::Failed(e) => self.stop(e),
        }
    }

    fn on_apply(&mut self, ev: ApplyEvent) {
        let now = self.now();
        match ev {
            ApplyEvent::Applied(results) => {
                let last = results.last().map(|(id, _)| id.index);
                for (log_id, data) in results {
                    self.complete_write(log_id, data);
                }
                if let Some(last) = last {
                    self.engine.handle_applied(now, last);
                }
            }
            ApplyEvent::Built(snapshot) => {
                let meta = snapshot.meta.clone();
                // Keep it only if the engine will adopt it (it ignores one that is not newer),
                // so chunks are always served from the snapshot the engine names.
                if self.snapshot.as_ref().is_none_or(|s| s.meta.last_log_id < meta.last_log_id) {
                    self.snapshot = Some(snapshot);
                }
                self.engine.handle_snapshot_built(now, meta);
            }
            ApplyEvent::Installed(snapshot) => {
                let meta = snapshot.meta.clone();
                // Proposals at or below the snapshot: this node proposed them as leader, then
                // fell behind; whether they committed is unknown here.
                let below: Vec<LogIndex> = self.writes.range(..=meta.last_log_id.index).map(|(i, _)| *i).collect();
                for i in below {
                    self.fail_write(i, RaftError::Indeterminate { index: i });
                }
                self.snapshot = Some(snapshot);
                self.engine.handle_snapshot_installed(now, meta);
            }
            ApplyEvent::Failed(e) => self.stop(e),
        }
        self.check_waits();
    }

    fn complete_write(&mut self, log_id: LogId, data: Bytes) {
        let Some(w) = self.writes.get(&log_id.index) else { return };
        if w.term == log_id.term {
            let w = self.writes.remove(&log_id.index).expect("checked");
            self.finish_write(w, Ok(WriteResponse { log_id, data }));
        } else {
            self.fail_write(log_id.index, RaftError::Dropped { index: log_id.index });
        }
    }

    fn fail_write(&mut self, index: LogIndex, e: RaftError) {
        if let Some(w) = self.writes.remove(&index) {
            self.finish_write(w, Err(e));
        }
    }

    fn finish_write(&mut self, w: PendingWrite, r: Result<WriteResponse, RaftError>) {
        let Some(b) = self.batches.get_mut(&w.batch) else { return };
        if b.results[w.pos].is_none() {
            b.results[w.pos] = Some(r);
            b.remaining -= 1;
        }
        if b.remaining == 0 {
            let b = self.batches.remove(&w.batch).expect("present");
            let results = b.results.into_iter().map(|r| r.unwrap_or(Err(RaftError::Timeout))).collect();
            let _ = b.reply.send(Ok(results));
        }
    }

    /// Answers requests whose condition now holds.
    fn check_waits(&mut self) {
        let applied = self.engine.applied();
        let committed_m = self.engine.committed_membership().clone();
        let mut i = 0;
        while i < self.reads_ready.len() {
            if self.reads_ready[i].0 <= applied {
                let (idx, r) = self.reads_ready.swap_remove(i);
                let _ = r.send(Ok(idx));
            } else {
                i += 1;
            }
        }
        // A configuration request succeeded if its entry is the one that applied (same term)
        // and the committed configuration shows the change; a replaced entry fails it.
        let replaced = |engine: &Engine, id: LogId| engine.term_at(id.index).is_some_and(|t| t != id.term);
        let mut i = 0;
        while i < self.learner_waits.len() {
            let (id, node) = (self.learner_waits[i].0, self.learner_waits[i].1);
            if id.index <= applied {
                let (_, _, r) = self.learner_waits.swap_remove(i);
                let ok = !replaced(&self.engine, id) && committed_m.membership.contains(node);
                let _ = r.send(if ok { Ok(id.index) } else { Err(RaftError::Dropped { index: id.index }) });
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.change_waits.len() {
            let joint = self.change_waits[i].0;
            if replaced(&self.engine, joint) && joint.index <= applied {
                let (_, _, r) = self.change_waits.swap_remove(i);
                let _ = r.send(Err(RaftError::Dropped { index: joint.index }));
                continue;
            }
            let done = committed_m.log_id.index > joint.index
                && !committed_m.membership.is_joint()
                && committed_m.log_id.index <= applied;
            if done {
                let (_, voters, r) = self.change_waits.swap_remove(i);
                let ok = committed_m.membership.voters == voters;
                let _ = r.send(if ok {
                    Ok(committed_m.log_id.index)
                } else {
                    Err(RaftError::Dropped { index: joint.index })
                });
            } else {
                i += 1;
            }
        }
        let leader = self.engine.leader();
        let mut i = 0;
        while i < self.transfer_waits.len() {
            if Some(self.transfer_waits[i].0) == leader {
                let (_, r) = self.transfer_waits.swap_remove(i);
                let _ = r.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    fn execute_actions(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::SaveVote { .. }
                | Action::AppendEntries { .. }
                | Action::TruncateFrom { .. }
                | Action::PurgeUpTo { .. } => {
                    let _ = self.io_tx.send(IoReq::Write(action));
                }
                Action::LoadEntries { peer, from, to, bytes_max } => {
                    let _ = self.io_tx.send(IoReq::Load { peer, from, to, bytes_max });
                }
                Action::Send(msg) => self.network.send(msg),
                Action::Apply { first, last, entries } => {
                    let _ = self.ap_tx.send(ApplyReq::Apply { first, last, entries });
                }
                Action::BuildSnapshot => {
                    let _ = self.ap_tx.send(ApplyReq::Build);
                }
                Action::SendSnapshotChunk { to, meta, offset, len, done } => {
                    self.send_chunk(to, meta, offset, len, done)
                }
                Action::ReceiveSnapshotChunk { meta, offset, data } => {
                    if offset == 0 {
                        self.receiving.clear();
                        self.receiving.reserve(meta.size_bytes.min(64 << 20) as usize);
                    }
                    self.receiving.extend_from_slice(&data);
                }
                Action::InstallSnapshot { meta } => {
                    let data = std::mem::take(&mut self.receiving).freeze();
                    if data.len() as u64 != meta.size_bytes {
                        self.stop(StorageError::new(
                            "install_snapshot",
                            format!("received {} bytes, snapshot has {}", data.len(), meta.size_bytes),
                        ));
                        return;
                    }
                    let _ = self.ap_tx.send(ApplyReq::Install(Snapshot { meta, data }));
                }
                Action::ReadReady { id, index } => {
                    if let Some((wait_apply, reply)) = self.reads.remove(&id) {
                        if wait_apply && index > self.engine.applied() {
                            self.reads_ready.push((index, reply));
                        } else {
                            let _ = reply.send(Ok(index));
                        }
                    }
                }
                Action::ReadFailed { id, error } => {
                    if let Some((_, reply)) = self.reads.remove(&id) {
                        let _ = reply.send(Err(error));
                    }
                }
            }
        }
        // Queued after the writes above, so the entries it covers are durable first.
        let committed = self.engine.committed();
        if committed > self.committed_saved {
            self.committed_saved = committed;
            let _ = self.io_tx.send(IoReq::SaveCommitted(committed));
        }
        self.check_waits();
    }

    fn send_chunk(&mut self, to: NodeId, meta: SnapshotMeta, offset: u64, len: u64, done: bool) {
        let Some(s) = &self.snapshot else { return };
        if s.meta != meta {
            warn!(%to, "snapshot changed before its chunk was sent; the transfer will restart");
            return;
        }
        let (start, end) = (offset as usize, (offset + len) as usize);
        if end > s.data.len() {
            return;
        }
        let data = s.data.slice(start..end);
        self.network.send(Message {
            from: self.engine.id(),
            to,
            term: self.engine.term(),
            body: MessageBody::Snapshot { meta, offset, data, done },
        });
    }
}
