//! One poller: a task that owns a share of the host's groups and runs them in rounds (see the
//! module documentation of `host`). This file is the round itself — take what the mailbox
//! holds, tick, drive the groups touched, flush the round's writes and batches. What each
//! step does to a group lives in its own room: `inbox` (peer messages), `liveness` (the
//! tick, quiescence, waking), `drive` (a group's actions into the round), `apply` (the
//! state-machine work) and `control` (groups joining and leaving).

use super::apply::AppliedBatch;
use super::group_state::GroupState;
use super::liveness::WakeQueue;
use super::{GroupInfo, NodeBatch, QuiesceNotice, RemovedNotice, Shared, EVENTS_PER_ROUND_MAX};
use crate::store::Op;
use bytes::Bytes;
use flotilla_raft::{
    Fatal, GroupId, IoId, LogIndex, Message, NodeId, RaftError, Request, SnapshotError, SnapshotMeta, StorageError,
    WriteCall,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
use tracing::debug;

/// The sending side of a poller's mailbox: every message is followed by a wake-up of the
/// poller's task (a permit if it is busy, so a message sent during a round is never missed:
/// the round's end finds it, or the next wait returns at once).
#[derive(Clone)]
pub(crate) struct PollerTx {
    tx: mpsc::Sender<PollerMsg>,
    wake: Arc<Notify>,
}

impl PollerTx {
    /// A mailbox: its sending side, and the receiving side with the wake-up the poller waits on.
    pub(crate) fn channel() -> (PollerTx, mpsc::Receiver<PollerMsg>) {
        let (tx, rx) = mpsc::channel();
        (PollerTx { tx, wake: Arc::new(Notify::new()) }, rx)
    }

    /// Queues `m` and wakes the poller; an error if the poller is gone (`m` is dropped).
    pub(crate) fn send(&self, m: PollerMsg) -> Result<(), PollerGone> {
        self.tx.send(m).map_err(|_| PollerGone)?;
        self.wake.notify_one();
        Ok(())
    }
}

/// A message was not queued: the poller stopped.
#[derive(Debug)]
pub(crate) struct PollerGone;

/// What a poller's mailbox carries. Snapshot metas are boxed: those messages are rare, and
/// every slot of the mailbox is as large as its largest message.
pub(crate) enum PollerMsg {
    Add(Box<GroupState>, oneshot::Sender<()>),
    /// Stop and drop a group if the guard holds, and unregister it (see `Removal`).
    Remove(GroupId, super::DestroyGuard, oneshot::Sender<Removal>),
    Batch {
        from: NodeId,
        messages: Vec<(GroupId, Message)>,
        quiesce: Vec<QuiesceNotice>,
        removed: Vec<RemovedNotice>,
    },
    Api(GroupId, Request),
    /// A round's log writes are durable (or failed): the last write id of each group.
    WritesDone {
        done: Vec<(GroupId, IoId)>,
        compact: Vec<crate::log::CompactSpan>,
        result: Result<(), StorageError>,
    },
    /// Entries read for a leader's follower (see `drive::start_load`).
    Loaded(super::drive::Loaded),
    Applied(GroupId, Result<AppliedBatch, StorageError>),
    Built(GroupId, Result<Box<SnapshotMeta>, StorageError>),
    /// A snapshot build fixed its point in time: the group's next state-machine action may start.
    BuildPinned(GroupId),
    /// Bytes of a built snapshot for a chunk to `to` (`None`: the snapshot is gone).
    ChunkRead {
        gid: GroupId,
        to: NodeId,
        meta: Box<SnapshotMeta>,
        offset: u64,
        done: bool,
        result: Result<Option<Bytes>, StorageError>,
    },
    /// A received chunk was stored up to `end` (or refused), for reception `reception`.
    Received {
        gid: GroupId,
        meta: Box<SnapshotMeta>,
        reception: u64,
        end: u64,
        result: Result<(), SnapshotError>,
    },
    Installed(GroupId, Box<SnapshotMeta>, u64, Result<(), SnapshotError>),
    /// The state of every group of this poller, or of those named (with `matched`).
    Info(Option<Vec<GroupId>>, oneshot::Sender<Vec<GroupInfo>>),
    /// Park `group` for `into` to absorb in merge `merge`, if it holds the freeze `freeze`.
    Park {
        group: GroupId,
        into: GroupId,
        merge: u64,
        freeze: Option<flotilla_raft::LogId>,
        reply: oneshot::Sender<super::merge::ParkOutcome>,
    },
    /// A group's waiting merge entry is tried again.
    MergeRetry(GroupId),
    Shutdown,
}

/// What became of a `PollerMsg::Remove`.
pub(crate) enum Removal {
    /// No such group on this poller (or not registered).
    Missing,
    /// The guard did not hold: the group runs on.
    Kept,
    /// Stopped and unregistered: its registry entry, for the deletes that follow.
    Removed(super::registry::GroupEntry),
}

/// The writes and messages of one round.
#[derive(Default)]
pub(super) struct Round {
    pub(super) ops: Vec<Op>,
    pub(super) sync: bool,
    /// Last write id per group in this round.
    pub(super) done: BTreeMap<GroupId, IoId>,
    pub(super) compact: Vec<crate::log::CompactSpan>,
    pub(super) out: HashMap<NodeId, NodeBatch>,
    /// Snapshot chunks, sent apart from the batches (`HostNetwork::send_transfer`).
    pub(super) transfers: Vec<(GroupId, Message)>,
    /// Removal notices this round already carries, by receiver and group.
    pub(super) told: std::collections::HashSet<(NodeId, GroupId)>,
}

pub(crate) struct Poller {
    pub(super) index: usize,
    pub(super) shared: Arc<Shared>,
    pub(super) rx: mpsc::Receiver<PollerMsg>,
    /// Our own mailbox, for completions (writer callbacks, snapshot tasks).
    pub(super) tx: PollerTx,
    /// Boxed: a group's state is large, and a map of them inline would hold the map's spare
    /// capacity (up to as much again) in whole group states.
    pub(super) groups: HashMap<GroupId, Box<GroupState>>,
    /// Groups that tick.
    pub(super) awake: BTreeSet<GroupId>,
    /// Groups with inputs since they were last driven.
    pub(super) dirty: BTreeSet<GroupId>,
    /// Groups with state-machine work queued and none running (no scan of all groups).
    pub(super) sm_ready: BTreeSet<GroupId>,
    /// Quiet groups to wake because their leader's node is down, oldest first: served before
    /// `to_catch_up`, since each of them has no leader until it wakes.
    pub(super) to_wake: WakeQueue,
    /// Quiet groups led here to wake because a member's node answers again or comes back on a
    /// new connection (see `tick`).
    pub(super) to_catch_up: WakeQueue,
    /// Nodes seen down at the last tick (a node going down triggers the wake-up scan once).
    pub(super) down: BTreeSet<NodeId>,
    /// Each peer's count of connections (`HostNetwork::connections`) as the last tick read it.
    pub(super) connections_seen: HashMap<NodeId, u64>,
    /// Quiesce notices a follower kept because it was busy, with their sender: taken at a later
    /// tick once the follower is idle at the notice's point, dropped once it never can be
    /// (`take_pending_notices`). At most one a group, only for groups of this poller.
    pub(super) quiesce_pending: HashMap<GroupId, (NodeId, QuiesceNotice)>,
    /// The nodes the host pings, as this poller last added to or read them (`flush`).
    pub(super) peers_seen: BTreeSet<NodeId>,
    pub(super) round: Round,
    pub(super) next_tick: Instant,
    pub(super) stopping: bool,
    /// The store failed and every group was stopped.
    pub(super) poisoned: bool,
    /// Apply writes prepared and answered, not submitted while the test hook
    /// `Host::hold_applies` is on.
    pub(super) held_applies: Vec<(GroupId, Vec<Op>, crate::store::WriteCallback)>,
    /// Applied indexes not yet known durable, in the order written: (the store batch that
    /// wrote it, group, index, when). A group hears its index is durable once a batch at or
    /// after that one was synced.
    pub(super) durable_waits: VecDeque<(u64, GroupId, LogIndex, Instant)>,
    /// When this poller last asked the store for a sync of its own (nothing else synced).
    pub(super) sync_asked_at: Option<Instant>,
    /// A group's summary changed in this round, or a group left: the host's generation of
    /// summaries moves at the round's end (`Host::group_info_shared`). Every change to a
    /// group's state marks it dirty, and `drive` compares its summary's fingerprint.
    pub(super) info_changed: bool,
    /// Write requests taken from the mailbox in this round and not proposed yet, by group (see
    /// `on_request`); at most `EVENTS_PER_ROUND_MAX` requests.
    pub(super) writes: BTreeMap<GroupId, Vec<WriteCall>>,
}

impl Poller {
    pub(crate) fn new(index: usize, shared: Arc<Shared>, rx: mpsc::Receiver<PollerMsg>, tx: PollerTx) -> Poller {
        let now = Instant::now();
        Poller {
            index,
            shared,
            rx,
            tx,
            groups: HashMap::new(),
            awake: BTreeSet::new(),
            dirty: BTreeSet::new(),
            sm_ready: BTreeSet::new(),
            to_wake: WakeQueue::default(),
            to_catch_up: WakeQueue::default(),
            down: BTreeSet::new(),
            connections_seen: HashMap::new(),
            quiesce_pending: HashMap::new(),
            peers_seen: BTreeSet::new(),
            round: Round::default(),
            next_tick: now,
            stopping: false,
            poisoned: false,
            held_applies: Vec::new(),
            durable_waits: VecDeque::new(),
            sync_asked_at: None,
            info_changed: false,
            writes: BTreeMap::new(),
        }
    }

    /// Runs rounds until shut down. A task on the runtime of the transport and the callers,
    /// not a thread of its own: a request reaches the poller, and a message the transport's
    /// writer, as a task's wake-up, most often on the same worker thread, where a thread of
    /// its own made each of them a wake-up of another thread (a futex call, and on an idle
    /// core an interrupt to wake it), several per write. A round's work on the worker is
    /// mostly short: fsyncs stay on the store's writer thread; snapshots, entry loads for
    /// lagging followers and compactions on the blocking pool. What stays in the round and can
    /// take long is reading back entries to apply that left the entry cache (up to a slice of
    /// 4 MiB), guard reads of conditional writes that miss RocksDB's cache, and ticking many
    /// thousands of awake groups; pollers are at most half the runtime's threads
    /// (`default_pollers` in the node), so the other workers serve the network meanwhile. A
    /// node given a runtime of one thread (`runtime_threads = 1`, nodes sharing a machine)
    /// serves nothing else while a round does that.
    pub(crate) async fn run(mut self) {
        let tick = Duration::from_millis(self.shared.config.tick_ms);
        // One timer for the poller's life, moved to each next tick (no registration per wait).
        let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(self.next_tick));
        tokio::pin!(timer);
        while !self.stopping {
            // Nothing queued and the tick not due: wait for a message or the tick.
            let first = match self.rx.try_recv() {
                Err(mpsc::TryRecvError::Empty) if Instant::now() < self.next_tick => {
                    let at = tokio::time::Instant::from_std(self.next_tick);
                    if timer.deadline() != at {
                        timer.as_mut().reset(at);
                    }
                    tokio::select! {
                        _ = self.tx.wake.notified() => {}
                        _ = &mut timer => {}
                    }
                    // Woken by the first of several senders (requests woken by one chunk of a
                    // client's, the messages of one packet), or by the tick: the tasks already
                    // queued on this worker run first, so this round more often takes them all,
                    // as one proposal per group and one store write, instead of a round for the
                    // first and another for the rest (BENCHMARKS.md, session 24). Tasks on
                    // another worker may still come later.
                    tokio::task::yield_now().await;
                    self.rx.try_recv()
                }
                other => other,
            };
            match first {
                Ok(m) => self.on_msg(m),
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            for _ in 1..EVENTS_PER_ROUND_MAX {
                match self.rx.try_recv() {
                    Ok(m) => self.on_msg(m),
                    Err(_) => break,
                }
            }
            self.propose_writes();
            let now = Instant::now();
            if now >= self.next_tick {
                self.tick(now);
                // Skip ticks missed under load rather than firing them in a burst.
                self.next_tick = (self.next_tick + tick).max(now);
            }
            self.report_durable(now);
            self.drive_dirty();
            self.release_held_applies();
            self.flush();
            if std::mem::take(&mut self.info_changed) {
                // After the round's changes, before the next round answers any `Info`: a
                // caller that read the generation before asking sees it move past any
                // change its answer missed.
                self.shared.info_generation.fetch_add(1, Ordering::AcqRel);
            }
            self.shared.stats.rounds.fetch_add(1, Ordering::Relaxed);
            // The worker's other tasks (the transport, callers) run between two rounds.
            tokio::task::yield_now().await;
        }
        for (_, g) in self.groups.iter_mut() {
            g.core.stop(Fatal::Shutdown);
        }
        debug!(poller = self.index, "poller stopped");
    }

    fn on_msg(&mut self, m: PollerMsg) {
        // A group joining, leaving, parking for a merge or retrying one, and the poller
        // stopping, all come after the writes taken before them.
        if matches!(
            m,
            PollerMsg::Add(..)
                | PollerMsg::Remove(..)
                | PollerMsg::Park { .. }
                | PollerMsg::MergeRetry(_)
                | PollerMsg::Shutdown
        ) {
            self.propose_writes();
        }
        match m {
            PollerMsg::Add(g, reply) => {
                self.on_add(g);
                let _ = reply.send(());
            }
            PollerMsg::Remove(id, still, reply) => {
                let _ = reply.send(self.on_remove(id, still));
            }
            PollerMsg::Batch { from, messages, quiesce, removed } => self.on_batch(from, messages, quiesce, removed),
            PollerMsg::Api(gid, req) => self.on_request(gid, req),
            PollerMsg::WritesDone { done, compact, result } => self.on_writes_done(done, compact, result),
            PollerMsg::Loaded(loaded) => self.on_loaded(loaded),
            PollerMsg::Applied(gid, r) => self.on_applied(gid, r),
            PollerMsg::Built(gid, r) => self.on_built(gid, r),
            PollerMsg::BuildPinned(gid) => {
                self.sm_done(gid);
            }
            PollerMsg::ChunkRead { gid, to, meta, offset, done, result } => {
                self.on_chunk_read(gid, to, *meta, offset, done, result)
            }
            PollerMsg::Received { gid, meta, reception, end, result } => {
                self.on_received(gid, *meta, reception, end, result)
            }
            PollerMsg::Installed(gid, meta, reception, r) => self.on_installed(gid, *meta, reception, r),
            PollerMsg::Info(only, reply) => {
                // A group changed earlier in this round shows that change in the answer, and
                // its fingerprint is compared only when it is driven: if it changed back by
                // then, the generation must still move past this answer.
                // Named groups' answers are not kept against the generation.
                self.info_changed |= only.is_none() && !self.dirty.is_empty();
                let _ = reply.send(self.info(only.as_deref()));
            }
            PollerMsg::Park { group, into, merge, freeze, reply } => {
                let _ = reply.send(self.on_park(group, into, merge, freeze));
            }
            PollerMsg::MergeRetry(gid) => self.on_merge_retry(gid),
            PollerMsg::Shutdown => self.stopping = true,
        }
    }

    /// A caller's request for one of this poller's groups. Writes wait for the round's end
    /// (`propose_writes`), so that a group's writes taken in one round become one proposal:
    /// one run of entries, one append in the round's store write and one message per
    /// follower, where a proposal per request made each follower decode, append and answer
    /// a message per request. Only the requests are regrouped, never other inputs: a write
    /// proposed after a peer's message that came after it in the mailbox is a write that came
    /// a moment later, which its caller, still waiting, cannot tell apart. A group's other
    /// requests come after its writes taken before them, so one caller's requests keep their
    /// order.
    fn on_request(&mut self, gid: GroupId, req: Request) {
        self.shared.requests_queued[self.index].fetch_sub(1, Ordering::AcqRel);
        if !self.groups.contains_key(&gid) {
            // The group left this poller between the caller's lookup and now.
            req.refuse(RaftError::Fatal(Fatal::Shutdown));
            return;
        }
        self.wake(gid, false);
        let call = match req {
            Request::Write(commands, reply) => WriteCall::Many(commands, reply),
            Request::WriteOne(command, reply) => WriteCall::One(command, reply),
            other => {
                self.propose_writes_of(gid);
                let now = self.shared.now();
                let Some(g) = self.groups.get_mut(&gid) else { return };
                g.core.handle_request(now, other);
                self.dirty.insert(gid);
                return;
            }
        };
        self.writes.entry(gid).or_default().push(call);
    }

    /// Proposes the writes waiting in this round, each group's as one proposal.
    pub(super) fn propose_writes(&mut self) {
        for (gid, calls) in std::mem::take(&mut self.writes) {
            self.propose(gid, calls);
        }
    }

    /// Proposes the writes of `gid` waiting in this round, if any.
    fn propose_writes_of(&mut self, gid: GroupId) {
        if let Some(calls) = self.writes.remove(&gid) {
            self.propose(gid, calls);
        }
    }

    fn propose(&mut self, gid: GroupId, mut calls: Vec<WriteCall>) {
        let now = self.shared.now();
        let Some(g) = self.groups.get_mut(&gid) else {
            // Not expected: every path that takes a group out of the poller (`Remove`, `Park`)
            // proposes the held writes first (`on_msg`). Answered as `on_request` answers a
            // request whose group is gone.
            for call in calls {
                call.refuse(RaftError::Fatal(Fatal::Shutdown));
            }
            return;
        };
        g.core.handle_writes(now, &mut calls);
        self.dirty.insert(gid);
    }

    /// Submits the round's writes (one request for all groups), then starts state-machine
    /// work (after the writes, so applied state never precedes the log in the write order),
    /// then hands the batches to the network.
    fn flush(&mut self) {
        let round = std::mem::take(&mut self.round);
        if !round.ops.is_empty() {
            let done: Vec<(GroupId, IoId)> = round.done.into_iter().collect();
            self.shared.stats.log_appends.fetch_add(done.len() as u64, Ordering::Relaxed);
            let tx = self.tx.clone();
            let compact = round.compact;
            let groups: Vec<GroupId> = done.iter().map(|(g, _)| *g).collect();
            let cb_done = done.clone();
            let r = self.shared.store.submit(
                round.ops,
                round.sync,
                Box::new(move |result| {
                    let _ = tx.send(PollerMsg::WritesDone { done: cb_done, compact, result });
                }),
            );
            if let Err(e) = r {
                for gid in groups {
                    if let Some(g) = self.groups.get_mut(&gid) {
                        g.core.fail(e.clone());
                        self.dirty.insert(gid);
                    }
                }
            }
        }
        for gid in std::mem::take(&mut self.sm_ready) {
            self.start_sm(gid);
        }
        // Every node a group sends to is pinged and watched (`tick`), not only the members
        // the host saw at a group's start or heard from: a learner added by a configuration
        // change while its node was down would otherwise never be seen come back, and a
        // group gone quiet without it would leave it behind.
        if round.out.keys().any(|to| !self.peers_seen.contains(to)) {
            if let Ok(mut peers) = self.shared.peers.lock() {
                let me = self.shared.config.node;
                peers.extend(round.out.keys().copied().filter(|to| *to != me));
                self.peers_seen = peers.clone();
            }
        }
        let net = self.shared.network.clone();
        for (to, batch) in round.out {
            self.shared.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.messages_sent.fetch_add(batch.messages.len() as u64, Ordering::Relaxed);
            net.send(to, batch);
        }
        for (gid, msg) in round.transfers {
            self.shared.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
            net.send_transfer(msg.to, gid, msg);
        }
    }
}

pub(super) fn empty_batch(from: NodeId) -> NodeBatch {
    NodeBatch { from, messages: Vec::new(), quiesce: Vec::new(), removed: Vec::new() }
}
