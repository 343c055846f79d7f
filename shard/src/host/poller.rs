//! One poller thread: owns a share of the host's groups and drives them in rounds (see the
//! module documentation of `host`).

use super::{build_group, GroupInfo, NodeBatch, QuiesceNotice, Shared, EVENTS_PER_ROUND_MAX};
use crate::keys::{encode, group_key, KIND_COMMITTED};
use crate::kv::KvStateMachine;
use crate::kv::SplitEffect;
use crate::log::RocksLog;
use crate::store::{Op, CF_RAFT};
use bytes::Bytes;
use flotilla_raft::{
    Action, CoreAction, Fatal, GroupCore, GroupId, IoId, LogAction, LogId, LogIndex, MachineAction, Message,
    MessageBody, NodeId, RaftError, Request, Role, Snapshot, StateMachine, StorageError,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{debug, error, info};

/// Bytes read per call when an apply reads its entries back from the log.
const APPLY_READ_BYTES_MAX: usize = 4 << 20;

/// What an apply batch produced: each entry's id and response, and the splits it applied.
pub(crate) type AppliedBatch = (Vec<(LogId, Bytes)>, Vec<SplitEffect>);

/// What a poller's mailbox carries.
pub(crate) enum PollerMsg {
    Add(Box<GroupState>, oneshot::Sender<()>),
    Remove(GroupId, oneshot::Sender<()>),
    Batch {
        from: NodeId,
        messages: Vec<(GroupId, Message)>,
        quiesce: Vec<QuiesceNotice>,
    },
    Api(GroupId, Request),
    /// A round's log writes are durable (or failed): the last write id of each group.
    WritesDone {
        done: Vec<(GroupId, IoId)>,
        compact: Vec<crate::log::CompactSpan>,
        result: Result<(), StorageError>,
    },
    Applied(GroupId, Result<AppliedBatch, StorageError>),
    Built(GroupId, Result<Snapshot, StorageError>),
    Installed(GroupId, Result<Snapshot, StorageError>),
    Info(oneshot::Sender<Vec<GroupInfo>>),
    Shutdown,
}

/// One group on a poller.
pub(crate) struct GroupState {
    id: GroupId,
    core: GroupCore,
    log: RocksLog,
    sm: KvStateMachine,
    /// Not ticking (see quiescence in the module documentation).
    quiet: bool,
    /// Consecutive ticks the group was found idle (leader).
    idle_ticks: u32,
    /// Rounds with log writes of this group submitted and not yet durable.
    writes_in_flight: usize,
    /// Loads waiting for the writes before them to be durable.
    deferred_loads: Vec<(NodeId, LogIndex, LogIndex, usize)>,
    /// State-machine work (apply, build, install) waiting its turn; one runs at a time.
    sm_queue: VecDeque<MachineAction>,
    sm_busy: bool,
    /// The leader it went quiet under (followers), for waking when that node goes down.
    quiet_leader: Option<NodeId>,
    /// The snapshot being offered whose range this node cannot take: its chunks are dropped
    /// (answering them would make the sender resend at once), and its first chunk is judged
    /// again when resent, as the node's groups change.
    refused_snapshot: Option<u64>,
}

impl GroupState {
    pub(crate) fn new(id: GroupId, core: GroupCore, log: RocksLog, sm: KvStateMachine) -> GroupState {
        GroupState {
            id,
            core,
            log,
            sm,
            quiet: false,
            idle_ticks: 0,
            writes_in_flight: 0,
            deferred_loads: Vec::new(),
            sm_queue: VecDeque::new(),
            sm_busy: false,
            quiet_leader: None,
            refused_snapshot: None,
        }
    }

    fn busy(&self) -> bool {
        self.writes_in_flight > 0
            || self.sm_busy
            || !self.sm_queue.is_empty()
            || !self.deferred_loads.is_empty()
            || self.core.has_waiters()
    }
}

/// The writes and messages of one round.
#[derive(Default)]
struct Round {
    ops: Vec<Op>,
    sync: bool,
    /// Last write id per group in this round.
    done: BTreeMap<GroupId, IoId>,
    compact: Vec<crate::log::CompactSpan>,
    out: HashMap<NodeId, NodeBatch>,
}

pub(crate) struct Poller {
    index: usize,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<PollerMsg>,
    /// Our own mailbox, for completions (writer callbacks, snapshot tasks).
    tx: mpsc::Sender<PollerMsg>,
    groups: HashMap<GroupId, GroupState>,
    /// Groups that tick.
    awake: BTreeSet<GroupId>,
    /// Groups with inputs since they were last driven.
    dirty: BTreeSet<GroupId>,
    /// Groups with state-machine work queued and none running (no scan of all groups).
    sm_ready: BTreeSet<GroupId>,
    /// Quiet groups to wake because their leader's node is down, oldest first.
    to_wake: VecDeque<GroupId>,
    /// Nodes seen down at the last tick (a node going down triggers the wake-up scan once).
    down: BTreeSet<NodeId>,
    round: Round,
    next_tick: Instant,
    stopping: bool,
    /// The store failed and every group was stopped.
    poisoned: bool,
}

impl Poller {
    pub(crate) fn new(
        index: usize,
        shared: Arc<Shared>,
        rx: mpsc::Receiver<PollerMsg>,
        tx: mpsc::Sender<PollerMsg>,
    ) -> Poller {
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
            to_wake: VecDeque::new(),
            down: BTreeSet::new(),
            round: Round::default(),
            next_tick: now,
            stopping: false,
            poisoned: false,
        }
    }

    pub(crate) fn run(mut self) {
        let tick = Duration::from_millis(self.shared.config.tick_ms);
        while !self.stopping {
            let wait = self.next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(m) => self.on_msg(m),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            for _ in 1..EVENTS_PER_ROUND_MAX {
                match self.rx.try_recv() {
                    Ok(m) => self.on_msg(m),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= self.next_tick {
                self.tick(now);
                // Skip ticks missed under load rather than firing them in a burst.
                self.next_tick = (self.next_tick + tick).max(now);
            }
            self.drive_dirty();
            self.flush();
            self.shared.stats.rounds.fetch_add(1, Ordering::Relaxed);
        }
        for (_, g) in self.groups.iter_mut() {
            g.core.stop(Fatal::Shutdown);
        }
        debug!(poller = self.index, "poller stopped");
    }

    fn on_msg(&mut self, m: PollerMsg) {
        let now = self.shared.now();
        match m {
            PollerMsg::Add(g, reply) => {
                let id = g.id;
                self.groups.insert(id, *g);
                self.awake.insert(id);
                self.dirty.insert(id);
                let _ = reply.send(());
            }
            PollerMsg::Remove(id, reply) => {
                if let Some(mut g) = self.groups.remove(&id) {
                    g.core.stop(Fatal::Shutdown);
                }
                self.awake.remove(&id);
                self.dirty.remove(&id);
                self.sm_ready.remove(&id);
                let _ = reply.send(());
            }
            PollerMsg::Batch { from, messages, quiesce } => {
                self.shared.queued[self.index].fetch_sub(messages.len(), Ordering::Relaxed);
                for (gid, msg) in messages {
                    if !self.groups.contains_key(&gid) {
                        self.shared.stats.unknown_group_msgs.fetch_add(1, Ordering::Relaxed);
                        debug!(group = %gid, %from, "message for a group not on this node");
                        continue;
                    }
                    if self.refuses_snapshot_chunk(gid, &msg) {
                        self.shared.stats.snapshot_chunks_refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if !self.groups.get(&gid).is_some_and(|g| g.quiet && keeps_quiet(g, &msg)) {
                        self.wake(gid, false);
                    }
                    if let Some(g) = self.groups.get_mut(&gid) {
                        g.core.handle_message(now, msg);
                        self.dirty.insert(gid);
                    }
                }
                for q in quiesce {
                    self.on_quiesce_notice(from, q);
                }
            }
            PollerMsg::Api(gid, req) => {
                if !self.groups.contains_key(&gid) {
                    // The group left this poller between the caller's lookup and now.
                    req.refuse(RaftError::Fatal(Fatal::Shutdown));
                    return;
                }
                self.wake(gid, false);
                let Some(g) = self.groups.get_mut(&gid) else { return };
                g.core.handle_request(now, req);
                self.dirty.insert(gid);
            }
            PollerMsg::WritesDone { done, compact, result } => {
                if !compact.is_empty() && result.is_ok() {
                    let store = self.shared.store.clone();
                    self.shared.runtime.spawn_blocking(move || {
                        for (a, b) in compact {
                            if let Err(e) = store.compact_raft_range(&a, &b) {
                                error!(error = %e, "compaction after purge failed");
                            }
                        }
                    });
                }
                for (gid, io) in done {
                    let Some(g) = self.groups.get_mut(&gid) else { continue };
                    g.writes_in_flight = g.writes_in_flight.saturating_sub(1);
                    match &result {
                        Ok(()) => g.core.handle_io_done(now, io),
                        Err(e) => g.core.fail(e.clone()),
                    }
                    if g.writes_in_flight == 0 {
                        for (peer, from, to, bytes_max) in std::mem::take(&mut g.deferred_loads) {
                            match g.log.read_entries_blocking(from, to, bytes_max) {
                                Ok(entries) => g.core.handle_entries_loaded(now, peer, entries),
                                Err(e) => g.core.fail(e),
                            }
                        }
                    }
                    self.dirty.insert(gid);
                }
            }
            PollerMsg::Applied(gid, r) => {
                let Some(g) = self.sm_done(gid) else { return };
                let splits = match r {
                    Ok((results, splits)) => {
                        g.core.handle_applied(now, results);
                        // The snapshot held (built or installed before the split) covers the
                        // wider range: no receiver may get it.
                        if !splits.is_empty() {
                            g.core.discard_snapshot();
                        }
                        splits
                    }
                    Err(e) => {
                        g.core.fail(e);
                        Vec::new()
                    }
                };
                for split in splits {
                    self.start_split_group(gid, split);
                }
            }
            PollerMsg::Built(gid, r) => {
                let Some(g) = self.sm_done(gid) else { return };
                match r {
                    Ok(s) => g.core.handle_snapshot_built(now, s),
                    Err(e) => g.core.fail(e),
                }
            }
            PollerMsg::Installed(gid, r) => {
                let Some(g) = self.sm_done(gid) else { return };
                match r {
                    Ok(s) => g.core.handle_snapshot_installed(now, s),
                    Err(e) => g.core.fail(e),
                }
            }
            PollerMsg::Info(reply) => {
                let info = self
                    .groups
                    .values()
                    .map(|g| {
                        let e = g.core.engine();
                        GroupInfo {
                            group: g.id,
                            role: e.role(),
                            term: e.term(),
                            leader: e.leader(),
                            last_index: e.last_log_id().index,
                            committed: e.committed(),
                            applied: e.applied(),
                            voters: e.membership().membership.voters.clone(),
                            committed_conf: e.committed_membership().clone(),
                            newest_conf: e.membership().log_id.index,
                            quiet: g.quiet,
                            stopped: g.core.fatal().map(|f| f.to_string()),
                        }
                    })
                    .collect();
                let _ = reply.send(info);
            }
            PollerMsg::Shutdown => self.stopping = true,
        }
    }

    /// A group's state-machine action finished: the next one may start, and the group is driven
    /// this round. `None` if the group is gone.
    fn sm_done(&mut self, gid: GroupId) -> Option<&mut GroupState> {
        let g = self.groups.get_mut(&gid)?;
        g.sm_busy = false;
        if !g.sm_queue.is_empty() {
            self.sm_ready.insert(gid);
        }
        self.dirty.insert(gid);
        Some(g)
    }

    /// Wakes a quiet group. `leader_down`: woken because its leader's node stopped answering.
    fn wake(&mut self, gid: GroupId, leader_down: bool) {
        let at = Instant::now();
        let now = self.shared.now();
        let Some(g) = self.groups.get_mut(&gid) else { return };
        if !g.quiet {
            return;
        }
        g.idle_ticks = 0;
        g.quiet = false;
        g.quiet_leader = None;
        let leader_alive = !leader_down && g.core.engine().leader().is_some_and(|l| self.shared.is_live(l, at));
        g.core.engine_mut().wake(now, leader_alive);
        self.awake.insert(gid);
        self.dirty.insert(gid);
        self.shared.stats.woken.fetch_add(1, Ordering::Relaxed);
    }

    fn on_quiesce_notice(&mut self, from: NodeId, q: QuiesceNotice) {
        let Some(g) = self.groups.get_mut(&q.group) else { return };
        if g.quiet || g.busy() || !g.core.engine().can_quiesce_follower(from, q.term, q.index) {
            return;
        }
        g.quiet = true;
        g.quiet_leader = Some(from);
        self.awake.remove(&q.group);
        self.shared.stats.quiesced.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether to drop `msg`, a chunk of a snapshot whose range group `gid` cannot install
    /// here: it would replace keys another group of this node owns (a group split from it
    /// later, or a parent that has not applied the split yet), or it is wider than the
    /// replica's range (an empty replica created with the map's range, narrowed ahead of Raft,
    /// waits until the leader applied that split and sends a snapshot of the narrowed range:
    /// adopting the wider range would race the creation of the group split off it). Judged on
    /// the first chunk,
    /// which carries the range; the sender resends that one until the transfer changes.
    fn refuses_snapshot_chunk(&mut self, gid: GroupId, msg: &Message) -> bool {
        let MessageBody::Snapshot { meta, offset, data, .. } = &msg.body else { return false };
        let Some(g) = self.groups.get(&gid) else { return false };
        if *offset != 0 {
            return g.refused_snapshot == Some(meta.snapshot_id);
        }
        // Unreadable: the installation checks the whole record and fails loudly.
        let Some(range) = crate::kv::snapshot_data_range(data) else { return false };
        let refused = if !g.sm.range().covers(&range) {
            Some("wider than the group's range".to_string())
        } else {
            self.owner_of_overlap(gid, &range).map(|other| format!("group {other} of this node owns keys in it"))
        };
        let Some(g) = self.groups.get_mut(&gid) else { return false };
        match refused {
            Some(why) => {
                if g.refused_snapshot != Some(meta.snapshot_id) {
                    info!(group = %gid, from = %msg.from, snapshot = %meta.last_log_id, reason = %why,
                        "refusing a snapshot whose range cannot be installed here");
                }
                g.refused_snapshot = Some(meta.snapshot_id);
                true
            }
            None => {
                g.refused_snapshot = None;
                false
            }
        }
    }

    /// Another group of this node that owns keys in `range`, if any.
    fn owner_of_overlap(&self, gid: GroupId, range: &crate::kv::KeyRange) -> Option<GroupId> {
        let r = self.shared.registry.read().ok()?;
        r.groups.iter().find(|(id, e)| **id != gid && e.sm.range().overlaps(range)).map(|(id, _)| *id)
    }

    /// The store failed: every group stops (their callers get the error at once rather than
    /// timing out, and they send nothing more, so the other nodes elect new leaders).
    fn stop_all_if_poisoned(&mut self) {
        if self.poisoned {
            return;
        }
        let Some(e) = self.shared.store.poisoned() else { return };
        self.poisoned = true;
        error!(poller = self.index, groups = self.groups.len(), error = %e, "the store is poisoned: stopping every group");
        for g in self.groups.values_mut() {
            g.core.fail(e.clone());
        }
        self.awake.clear();
        self.to_wake.clear();
    }

    /// The batched tick: timers of awake groups, quiescence, node liveness.
    fn tick(&mut self, at: Instant) {
        self.stop_all_if_poisoned();
        let now = self.shared.now();
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let live = |n: NodeId| shared.is_live(n, at);
        let mut going_quiet = Vec::new();
        for gid in &self.awake {
            let Some(g) = self.groups.get_mut(gid) else { continue };
            if g.core.fatal().is_some() {
                continue;
            }
            // Judged on the state the last round left (before this tick's heartbeat).
            if cfg.quiesce_after_ticks > 0 {
                match (g.busy(), g.core.engine().quiesce_point(live)) {
                    (false, Some(point)) => {
                        g.idle_ticks += 1;
                        if g.idle_ticks >= cfg.quiesce_after_ticks {
                            going_quiet.push((*gid, point));
                            continue;
                        }
                    }
                    _ => g.idle_ticks = 0,
                }
            }
            if now >= g.core.engine().next_deadline() {
                g.core.handle_timeout(now);
                self.dirty.insert(*gid);
            }
        }
        for (gid, (term, index)) in going_quiet {
            let Some(g) = self.groups.get_mut(&gid) else { continue };
            g.quiet = true;
            self.awake.remove(&gid);
            self.shared.stats.quiesced.fetch_add(1, Ordering::Relaxed);
            let me = self.shared.config.node;
            for node in g.core.engine().membership().membership.nodes() {
                if node != me {
                    self.round.out.entry(node).or_insert_with(|| empty_batch(me)).quiesce.push(QuiesceNotice {
                        group: gid,
                        term,
                        index,
                    });
                }
            }
        }
        // Nodes that went down since the last tick: their quiet groups wake (rate-limited).
        let peers: Vec<NodeId> = self.shared.peers.lock().map(|p| p.iter().copied().collect()).unwrap_or_default();
        let down: BTreeSet<NodeId> = peers.iter().copied().filter(|n| !self.shared.is_live(*n, at)).collect();
        let newly_down: Vec<NodeId> = down.difference(&self.down).copied().collect();
        if !newly_down.is_empty() {
            info!(poller = self.index, nodes = ?newly_down, "peers stopped answering: waking the quiet groups they lead");
            for (gid, g) in &self.groups {
                if g.quiet && g.quiet_leader.is_some_and(|l| newly_down.contains(&l)) {
                    self.to_wake.push_back(*gid);
                }
            }
        }
        self.down = down;
        for _ in 0..cfg.wakes_per_tick_max {
            let Some(gid) = self.to_wake.pop_front() else { break };
            self.wake(gid, true);
        }
    }

    fn drive_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for gid in dirty {
            self.drive(gid);
        }
    }

    /// Executes a group's actions: log writes into the round, messages into the batches,
    /// state-machine work into its queue.
    fn drive(&mut self, gid: GroupId) {
        let now = self.shared.now();
        let me = self.shared.config.node;
        let Some(g) = self.groups.get_mut(&gid) else { return };
        let mut wrote = false;
        while let Some(action) = g.core.poll_action() {
            match action {
                CoreAction::Log(LogAction::Write(a)) => {
                    let io = io_of(&a);
                    match g.log.write_ops(&a) {
                        Ok((ops, compact)) => {
                            self.round.ops.extend(ops);
                            self.round.sync = true;
                            if let Some(c) = compact {
                                self.round.compact.push(c);
                            }
                            if let Some(io) = io {
                                self.round.done.insert(gid, io);
                            }
                            wrote = true;
                        }
                        Err(e) => g.core.fail(e),
                    }
                }
                CoreAction::Log(LogAction::SaveCommitted(index)) => match encode(&index) {
                    Ok(v) => self.round.ops.push(Op::Put(CF_RAFT, group_key(gid, KIND_COMMITTED).to_vec(), v)),
                    Err(e) => g.core.fail(e),
                },
                CoreAction::Log(LogAction::Load { peer, from, to, bytes_max }) => {
                    if g.writes_in_flight > 0 || wrote {
                        g.deferred_loads.push((peer, from, to, bytes_max));
                    } else {
                        match g.log.read_entries_blocking(from, to, bytes_max) {
                            Ok(entries) => g.core.handle_entries_loaded(now, peer, entries),
                            Err(e) => g.core.fail(e),
                        }
                    }
                }
                CoreAction::Send(msg) => {
                    let to = msg.to;
                    self.round.out.entry(to).or_insert_with(|| empty_batch(me)).messages.push((gid, msg));
                }
                CoreAction::Machine(a) => {
                    g.sm_queue.push_back(a);
                    if !g.sm_busy {
                        self.sm_ready.insert(gid);
                    }
                }
            }
        }
        if wrote {
            g.writes_in_flight += 1;
        }
    }

    /// Submits the round's writes (one request for all groups), then starts state-machine
    /// work (after the writes, so applied state never precedes the log in the write order),
    /// then hands the batches to the network.
    fn flush(&mut self) {
        let round = std::mem::take(&mut self.round);
        if !round.ops.is_empty() {
            let done: Vec<(GroupId, IoId)> = round.done.into_iter().collect();
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
                    }
                }
            }
        }
        for gid in std::mem::take(&mut self.sm_ready) {
            self.start_sm(gid);
        }
        let net = self.shared.network.clone();
        for (to, batch) in round.out {
            self.shared.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.messages_sent.fetch_add(batch.messages.len() as u64, Ordering::Relaxed);
            net.send(to, batch);
        }
    }

    /// A split was applied (its descriptors are durable): start the new group on this node,
    /// formed with the source's configuration, on whichever poller it belongs to. A group of
    /// that id already here (the node was told to create it, or it restarted) is left alone.
    fn start_split_group(&mut self, source: GroupId, split: SplitEffect) {
        let id = split.new_group;
        let shared = self.shared.clone();
        let Ok(reservation) = shared.reserve(id) else {
            info!(%source, group = %id, "split: the new group already exists here");
            return;
        };
        // Its state (a snapshot point) was written with the split: it recovers like any group.
        let built = self.shared.runtime.block_on(build_group(&self.shared, id, split.range, None));
        match built {
            Ok((state, entry)) => {
                let poller = entry.poller;
                // Added to its poller's mailbox before the reservation ends, so no other start
                // can slip in between; messages for it queue behind the addition.
                let (tx, _rx) = oneshot::channel();
                let _ = self.shared.pollers[poller].send(PollerMsg::Add(Box::new(state), tx));
                if let Err(e) = reservation.complete(entry) {
                    error!(%source, group = %id, error = %e, "split: cannot register the new group");
                }
                info!(%source, group = %id, "split: new group started");
            }
            Err(e) => {
                // Its descriptor is durable: the next start of the host forms it.
                error!(%source, group = %id, error = %e, "split: cannot start the new group now");
            }
        }
    }

    /// Starts the next state-machine action of a group.
    fn start_sm(&mut self, gid: GroupId) {
        let Some(g) = self.groups.get_mut(&gid) else { return };
        if g.sm_busy {
            return;
        }
        let Some(action) = g.sm_queue.pop_front() else { return };
        g.sm_busy = true;
        let tx = self.tx.clone();
        match action {
            MachineAction::Apply { first, last, entries } => {
                let entries = match entries {
                    Some(e) => Ok(e),
                    None => read_all(&g.log, first, last),
                };
                let prepared = entries.and_then(|entries| {
                    let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
                    g.sm.prepare_apply_blocking(entries).map(|p| (ids, p))
                });
                match prepared {
                    Ok((ids, p)) if ids.len() == p.responses.len() => {
                        let results: Vec<(LogId, Bytes)> = ids.into_iter().zip(p.responses).collect();
                        // Clients need not wait for the applied state to be stored: their
                        // entries are committed and the answers fixed. Reads wait for it.
                        g.core.answer_writes(&results);
                        let splits = p.splits;
                        let r = self.shared.store.submit(
                            p.ops,
                            false,
                            Box::new(move |r| {
                                let _ = tx.send(PollerMsg::Applied(gid, r.map(|()| (results, splits))));
                            }),
                        );
                        if let Err(e) = r {
                            g.sm_busy = false;
                            g.core.fail(e);
                        }
                    }
                    Ok(_) => {
                        g.sm_busy = false;
                        g.core.fail(StorageError::new("apply", "wrong number of responses"));
                    }
                    Err(e) => {
                        g.sm_busy = false;
                        g.core.fail(e);
                    }
                }
            }
            MachineAction::Build => {
                let mut sm = g.sm.clone();
                self.shared.runtime.spawn(async move {
                    let r = sm.build_snapshot().await;
                    let _ = tx.send(PollerMsg::Built(gid, r));
                });
            }
            MachineAction::Install(snapshot) => {
                // Checked when the transfer began; a group of this node created since then
                // could own keys in the range, and its data must not be replaced.
                let overlap =
                    crate::kv::snapshot_data_range(&snapshot.data).and_then(|r| self.owner_of_overlap(gid, &r));
                let Some(g) = self.groups.get_mut(&gid) else { return };
                if let Some(other) = overlap {
                    g.sm_busy = false;
                    g.core.fail(StorageError::new(
                        "install_snapshot",
                        format!("group {gid}: the snapshot's range overlaps group {other} of this node"),
                    ));
                    return;
                }
                let mut sm = g.sm.clone();
                self.shared.runtime.spawn(async move {
                    let r = sm.install_snapshot(snapshot.clone()).await.map(|()| snapshot);
                    let _ = tx.send(PollerMsg::Installed(gid, r));
                });
            }
        }
        self.dirty.insert(gid);
    }
}

/// Whether a quiet group may take `msg` without waking: acknowledgements and heartbeats of
/// its own term, which straddle the moment it went quiet and ask for nothing new.
fn keeps_quiet(g: &GroupState, msg: &Message) -> bool {
    let e = g.core.engine();
    if msg.term != e.term() {
        return false;
    }
    match &msg.body {
        MessageBody::HeartbeatResp { .. } | MessageBody::AppendResp { .. } => e.role() == Role::Leader,
        MessageBody::Heartbeat { commit, .. } => e.leader() == Some(msg.from) && *commit == e.committed(),
        _ => false,
    }
}

fn empty_batch(from: NodeId) -> NodeBatch {
    NodeBatch { from, messages: Vec::new(), quiesce: Vec::new() }
}

fn io_of(a: &Action) -> Option<IoId> {
    match a {
        Action::SaveVote { io, .. }
        | Action::AppendEntries { io, .. }
        | Action::TruncateFrom { io, .. }
        | Action::PurgeUpTo { io, .. } => Some(*io),
        _ => None,
    }
}

fn read_all(log: &RocksLog, first: LogIndex, last: LogIndex) -> Result<Vec<flotilla_raft::Entry>, StorageError> {
    let mut out = Vec::new();
    let mut next = first;
    while next <= last {
        let chunk = log.read_entries_blocking(next, last, APPLY_READ_BYTES_MAX)?;
        let Some(end) = chunk.last().map(|e| e.log_id.index) else {
            return Err(StorageError::new("read_entries", format!("no entries at {next}")));
        };
        next = end.next();
        out.extend(chunk);
    }
    Ok(out)
}
