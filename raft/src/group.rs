//! [`GroupCore`]: one group's engine together with the bookkeeping of its callers' requests —
//! which client write waits for which log index, which read waits for which round, which
//! membership change waits for which configuration — without any I/O or task of its own.
//!
//! The middle of the crate's three layers: [`Engine`] is the protocol; `GroupCore` takes
//! [`Request`]s and turns the engine's [`Action`]s into [`CoreAction`]s for whoever runs it;
//! the runners are the Tokio driver ([`crate::Raft`], one `GroupCore` and one task per
//! group) and hosts of many groups (flotilla-shard runs thousands of `GroupCore`s on a few
//! poller tasks). Request handling is written once, here.
//!
//! # Driving contract
//! 1. Feed inputs: [`GroupCore::handle_request`], [`GroupCore::handle_message`],
//!    [`GroupCore::handle_timeout`] once `now >= next_deadline()`, and the completions of the
//!    actions below (`handle_io_done`, `handle_entries_loaded`, `handle_applied`,
//!    `handle_applied_durable`, `handle_snapshot_built`, `handle_snapshot_read`,
//!    `handle_snapshot_received`, `handle_snapshot_installed`, `handle_snapshot_refused`).
//! 2. After inputs, drain [`GroupCore::poll_action`] and execute each action:
//!    - [`CoreAction::Log`]: in the order polled, on the log store. `Write`s become durable,
//!      then report `handle_io_done(io)`; `SaveCommitted` reports nothing; `Load` runs after
//!      the writes polled before it, then reports `handle_entries_loaded`.
//!    - [`CoreAction::Machine`]: one at a time, in the order polled, on the state machine.
//!    - [`CoreAction::Send`] is fire-and-forget.
//! 3. Replies to callers are sent from inside the core (on the `oneshot` each request carried).

use crate::engine::{Action, Engine, IoId, ReadMode};
use crate::entry::Entry;
use crate::error::{Fatal, RaftError, StorageError};
use crate::lease_gate::LeaseGate;
use crate::membership::Membership;
use crate::message::Message;
use crate::request::Request;
pub use crate::request::{DoneReply, IndexReply, WriteOneReply, WriteReply};
use crate::storage::SnapshotMeta;
use crate::types::{LogId, LogIndex, Millis, NodeId, Term};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use tracing::warn;

/// The result of a committed and applied write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResponse {
    /// Where the command landed in the log.
    pub log_id: LogId,
    /// What the state machine returned for it.
    pub data: Bytes,
}

/// Work for the caller of [`GroupCore::poll_action`]; see the driving contract in the module
/// documentation.
#[derive(Debug)]
pub enum CoreAction {
    /// Work for the log store, executed in the order polled.
    Log(LogAction),
    /// Send a message.
    Send(Message),
    /// Work for the state machine, executed one at a time in the order polled.
    Machine(MachineAction),
}

/// Work for the log store (see [`CoreAction::Log`]).
#[derive(Debug)]
pub enum LogAction {
    /// A log write (`SaveVote`, `AppendEntries`, `TruncateFrom` or `PurgeUpTo`); report
    /// `handle_io_done` once durable.
    Write(Action),
    /// Record the commit index (not a durability point; ordered after the writes before it).
    SaveCommitted(LogIndex),
    /// Read entries `from..=to` (at most `bytes_max`) after the writes polled before, then
    /// report `handle_entries_loaded(peer, ..)`.
    Load {
        /// Follower they are for.
        peer: NodeId,
        /// First index.
        from: LogIndex,
        /// Last index.
        to: LogIndex,
        /// Byte budget.
        bytes_max: usize,
    },
}

/// Work for the state machine (see [`CoreAction::Machine`]).
#[derive(Debug)]
pub enum MachineAction {
    /// Apply `first..=last` (read them from the log when `entries` is `None`), then report
    /// `handle_applied` with the responses.
    Apply {
        /// First index.
        first: LogIndex,
        /// Last index.
        last: LogIndex,
        /// The entries, if the engine had them in memory.
        entries: Option<Vec<Entry>>,
    },
    /// Build a snapshot (a follower needs one), then report `handle_snapshot_built`.
    Build,
    /// Read bytes `offset..offset+len` of the snapshot `meta`, then report
    /// `handle_snapshot_read` (with `None` if the state machine no longer has it).
    ReadChunk {
        /// Recipient of the chunk.
        to: NodeId,
        /// The snapshot.
        meta: Box<SnapshotMeta>,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Whether it is the last chunk.
        done: bool,
    },
    /// Release the snapshot `meta` (no transfer uses it). Reports nothing.
    Drop(Box<SnapshotMeta>),
    /// Store the next received bytes of the snapshot `meta`, then report
    /// `handle_snapshot_received` with the end of these bytes (or `handle_snapshot_refused`).
    Receive {
        /// The snapshot.
        meta: Box<SnapshotMeta>,
        /// Bytes received before these.
        offset: u64,
        /// The bytes.
        data: Bytes,
        /// The reception they belong to; the report names it.
        reception: u64,
    },
    /// Install the fully received snapshot `meta`, then report `handle_snapshot_installed` (or
    /// `handle_snapshot_refused`), naming `reception`.
    Install {
        /// The snapshot.
        meta: Box<SnapshotMeta>,
        /// The reception.
        reception: u64,
    },
}

/// A request of several commands, answered once every one of them applied or failed.
struct Batch {
    results: Vec<Option<Result<WriteResponse, RaftError>>>,
    remaining: usize,
    reply: WriteReply,
}

/// Where the answer to one proposed command goes.
enum Waiter {
    /// A single-command request's own reply: no batch to assemble.
    One(WriteOneReply),
    /// Command `pos` of the request `batch` (see `GroupCore::batches`).
    Part { batch: u64, pos: usize },
}

/// A proposed command waiting for its entry to apply.
struct PendingWrite {
    index: LogIndex,
    /// The term it was proposed in: an entry applied at `index` in another term replaced it.
    term: Term,
    /// When the request was handed in: see [`GroupCore::time_out_calls`]. Proposals append in
    /// order, so these only grow from the front of `GroupCore::writes` to its back.
    since: Millis,
    waiter: Waiter,
}

/// A write request as [`GroupCore::handle_writes`] takes it.
#[derive(Debug)]
pub enum WriteCall {
    /// One command (`Request::WriteOne`).
    One(Bytes, WriteOneReply),
    /// Several commands answered together (`Request::Write`).
    Many(Vec<Bytes>, WriteReply),
}

impl WriteCall {
    fn len(&self) -> usize {
        match self {
            WriteCall::One(..) => 1,
            WriteCall::Many(c, _) => c.len(),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            WriteCall::One(c, _) => c.len() as u64,
            WriteCall::Many(c, _) => c.iter().map(|c| c.len() as u64).sum(),
        }
    }

    /// Answers the request with `e` without proposing it.
    pub fn refuse(self, e: RaftError) {
        match self {
            WriteCall::One(_, r) => {
                let _ = r.send(Err(e));
            }
            WriteCall::Many(_, r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// One group's engine and its callers' pending requests. See the module documentation.
pub struct GroupCore {
    engine: Engine,
    /// Proposed commands waiting to be applied, in index order: proposals only ever append
    /// at the end of the log, and entries apply in order, so answers come off the front.
    writes: VecDeque<PendingWrite>,
    /// Requests of several commands being answered, by batch number.
    batches: HashMap<u64, Batch>,
    /// Scratch for `handle_writes`: the calls proposed, kept for its capacity.
    proposed: Vec<WriteCall>,
    /// Scratch for `handle_write`, kept for its capacity.
    calls: Vec<WriteCall>,
    next_batch: u64,
    /// Reads waiting for the engine: id -> (wait for apply?, reply, handed in at).
    reads: HashMap<u64, (bool, IndexReply, Millis)>,
    /// Reads confirmed, waiting for the state machine to reach their index (with when they
    /// were handed in).
    reads_ready: Vec<(LogIndex, IndexReply, Millis)>,
    next_read: u64,
    /// `add_learner` and `remove_learner` calls waiting for their entry to apply: (entry, node,
    /// whether the node is to be a member, reply, handed in at).
    learner_waits: Vec<(LogId, NodeId, bool, IndexReply, Millis)>,
    /// Membership changes waiting for the final configuration (joint entry id, handed in at).
    change_waits: Vec<(LogId, BTreeSet<NodeId>, IndexReply, Millis)>,
    /// Transfers waiting to see the target lead (handed in at).
    transfer_waits: Vec<(NodeId, DoneReply, Millis)>,
    /// No wait other than a write was handed in before this (reads, configuration changes,
    /// transfers; `None`: none waits): where the next [`GroupCore::time_out_calls`] is due
    /// without a scan of them all. Lowered as waits come, recomputed when calls time out, and
    /// cleared once none is left; may be early (a wait answered since), never late.
    waits_since_min: Option<Millis>,
    /// The commit index last handed out as `SaveCommitted`.
    committed_saved: LogIndex,
    /// Actions produced while handling the engine's own (chunks to send).
    out: std::collections::VecDeque<CoreAction>,
    /// Set once the group stopped: every later call is answered with it.
    fatal: Option<Fatal>,
    /// The lease published for readers on other threads, once one asked for it.
    lease_gate: Option<Arc<LeaseGate>>,
}

impl GroupCore {
    /// Wraps `engine`.
    pub fn new(engine: Engine) -> GroupCore {
        GroupCore {
            engine,
            writes: VecDeque::new(),
            batches: HashMap::new(),
            proposed: Vec::new(),
            calls: Vec::new(),
            next_batch: 0,
            reads: HashMap::new(),
            reads_ready: Vec::new(),
            next_read: 0,
            learner_waits: Vec::new(),
            change_waits: Vec::new(),
            transfer_waits: Vec::new(),
            waits_since_min: None,
            committed_saved: LogIndex(0),
            out: Default::default(),
            fatal: None,
            lease_gate: None,
        }
    }

    /// The gate through which reads may skip the engine while this replica leads under a
    /// lease and its state machine applied everything committed (see [`LeaseGate`]). Kept up
    /// to date by [`poll_action`](Self::poll_action), before any action of a step leaves, and
    /// by [`stop`](Self::stop). A reader on another thread checks
    /// [`LeaseGate::open_at`] with the clock this core is fed, then reads its state machine.
    pub fn lease_gate(&mut self) -> Arc<LeaseGate> {
        if let Some(g) = &self.lease_gate {
            return g.clone();
        }
        let g = Arc::new(LeaseGate::default());
        self.lease_gate = Some(g.clone());
        self.refresh_lease_gate();
        g
    }

    /// Whether a reader went through the lease gate since the last call (see
    /// [`LeaseGate::take_used`]): such a group is busy though its engine saw no request.
    pub fn lease_gate_used(&self) -> bool {
        self.lease_gate.as_ref().is_some_and(|g| g.take_used())
    }

    /// Publishes what the engine says of its lease now ([`Engine::local_read_end`]): shut while
    /// a committed entry is not applied (reported by `handle_applied`), so also while a write
    /// answered before its application was stored ([`GroupCore::answer_writes`]) is not. The
    /// commit index moves only in a step, and nobody else learns of it before this step's
    /// messages leave, so the gate shuts in time.
    fn refresh_lease_gate(&mut self) {
        let Some(g) = &self.lease_gate else { return };
        g.set(if self.fatal.is_some() { None } else { self.engine.local_read_end() });
    }

    /// The engine (status, deadlines).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, for inputs this type does not wrap (e.g. quiescence).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Why the group stopped, if it did.
    pub fn fatal(&self) -> Option<&Fatal> {
        self.fatal.as_ref()
    }

    /// Whether any caller waits for an answer (a group with waiters must not go quiet).
    pub fn has_waiters(&self) -> bool {
        !(self.writes.is_empty()
            && self.batches.is_empty()
            && self.reads.is_empty()
            && self.reads_ready.is_empty()
            && self.learner_waits.is_empty()
            && self.change_waits.is_empty()
            && self.transfer_waits.is_empty())
    }

    /// Gives back the memory the callers' queues and the scratch buffers kept after their last
    /// use, and the engine's ([`Engine::release_idle_memory`]): for a host to call when the
    /// group goes quiet. What the queues hold is kept; only spare capacity goes.
    pub fn release_idle_memory(&mut self) {
        self.writes.shrink_to_fit();
        self.batches.shrink_to_fit();
        self.proposed.shrink_to_fit();
        self.calls.shrink_to_fit();
        self.reads.shrink_to_fit();
        self.reads_ready.shrink_to_fit();
        self.learner_waits.shrink_to_fit();
        self.change_waits.shrink_to_fit();
        self.transfer_waits.shrink_to_fit();
        self.out.shrink_to_fit();
        self.engine.release_idle_memory();
    }

    // ----- API ---------------------------------------------------------------------------

    /// Handles a caller's request; the answer goes to the channel it carries.
    pub fn handle_request(&mut self, now: Millis, request: Request) {
        match request {
            Request::Initialize(membership, reply) => {
                let _ = reply.send(self.initialize(now, membership));
            }
            Request::Write(commands, reply) => self.handle_write(now, WriteCall::Many(commands, reply)),
            Request::WriteOne(command, reply) => self.handle_write(now, WriteCall::One(command, reply)),
            Request::Read { mode, wait_apply, reply } => self.read(now, mode, wait_apply, reply),
            Request::AddLearner(node, reply) => self.add_learner(now, node, reply),
            Request::RemoveLearner(node, reply) => self.remove_learner(now, node, reply),
            Request::ChangeMembership(voters, reply) => self.change_membership(now, voters, reply),
            Request::TransferLeader(target, reply) => self.transfer_leader(now, target, reply),
            Request::CompactLog(reply) => {
                let _ = reply.send(self.check_alive().map(|()| self.compact_log(now)));
            }
            Request::ForceAlone { dead, last, reply } => {
                let _ = reply.send(self.check_alive().and_then(|()| self.engine.force_alone(now, &dead, last)));
            }
        }
    }

    /// Forms a new cluster; see [`Engine::initialize`].
    pub fn initialize(&mut self, now: Millis, membership: Membership) -> Result<(), RaftError> {
        self.check_alive()?;
        self.engine.initialize(now, membership)
    }

    /// Proposes one write request's commands.
    fn handle_write(&mut self, now: Millis, call: WriteCall) {
        let mut calls = std::mem::take(&mut self.calls);
        calls.push(call);
        self.handle_writes(now, &mut calls);
        self.calls = calls;
    }

    /// Proposes the commands of several write requests as one run of consecutive entries: one
    /// engine proposal, so one log append and one message per follower for all of them, where
    /// a request at a time makes one of each per request. Each request is answered as
    /// [`handle_request`](Self::handle_request) would answer it alone, in the order given: past
    /// `Config::uncommitted_bytes_max`, the requests that no longer fit are refused with
    /// `Overloaded` and the others proposed. `writes` is left empty, its capacity kept for the
    /// next call.
    pub fn handle_writes(&mut self, now: Millis, writes: &mut Vec<WriteCall>) {
        if let Err(e) = self.check_alive() {
            for call in writes.drain(..) {
                call.refuse(e.clone());
            }
            return;
        }
        let mut proposed = std::mem::take(&mut self.proposed);
        let total: usize = writes.iter().map(WriteCall::len).sum();
        let mut all = Vec::with_capacity(total);
        // The bytes pending as each request would find them proposed alone; `None` where the
        // engine refuses any proposal (it answers all of them below).
        let mut uncommitted = self.engine.uncommitted_bytes();
        for call in writes.drain(..) {
            if call.len() == 0 {
                if let WriteCall::Many(_, reply) = call {
                    let _ = reply.send(Ok(Vec::new()));
                }
                continue;
            }
            if let Some(pending) = uncommitted.as_mut() {
                let bytes = call.bytes();
                if self.engine.over_uncommitted_limit(*pending, bytes) {
                    call.refuse(RaftError::Overloaded { pending_bytes: *pending });
                    continue;
                }
                *pending += bytes;
            }
            match &call {
                WriteCall::One(c, _) => all.push(c.clone()),
                WriteCall::Many(c, _) => all.extend(c.iter().cloned()),
            }
            proposed.push(call);
        }
        if !all.is_empty() {
            match self.engine.propose(now, all) {
                Ok(first) => self.await_applied(now, first, &mut proposed),
                Err(e) => {
                    for call in proposed.drain(..) {
                        call.refuse(e.clone());
                    }
                }
            }
        }
        self.proposed = proposed;
    }

    /// Records the answers owed for `calls`, handed in at `now` and proposed as consecutive
    /// entries from `first` in the current term. Empties `calls`.
    fn await_applied(&mut self, now: Millis, first: LogIndex, calls: &mut Vec<WriteCall>) {
        let term = self.engine.term();
        // Waiters at or past `first` waited for entries this node's log no longer holds (a
        // new leader cut it back before this proposal). Their entries may still be on other
        // nodes and commit there later, so their outcome is unknown here: not `Dropped`,
        // which tells a caller it is safe to retry.
        while self.writes.back().is_some_and(|w| w.index >= first) {
            if let Some(w) = self.writes.pop_back() {
                let index = w.index;
                self.finish_write(w, Err(RaftError::Indeterminate { index }));
            }
        }
        let mut index = first;
        for call in calls.drain(..) {
            match call {
                WriteCall::One(_, reply) => {
                    self.writes.push_back(PendingWrite { index, term, since: now, waiter: Waiter::One(reply) });
                    index = index.next();
                }
                WriteCall::Many(commands, reply) => {
                    let count = commands.len();
                    let batch = self.next_batch;
                    self.next_batch += 1;
                    for pos in 0..count {
                        self.writes.push_back(PendingWrite {
                            index,
                            term,
                            since: now,
                            waiter: Waiter::Part { batch, pos },
                        });
                        index = index.next();
                    }
                    self.batches.insert(batch, Batch { results: vec![None; count], remaining: count, reply });
                }
            }
        }
    }

    /// A linearizable read: `reply` gets the read index once it is confirmed (and, with
    /// `wait_apply`, once the state machine has applied it).
    fn read(&mut self, now: Millis, mode: ReadMode, wait_apply: bool, reply: IndexReply) {
        if let Err(e) = self.check_alive() {
            let _ = reply.send(Err(e));
            return;
        }
        let id = self.next_read;
        self.next_read += 1;
        self.reads.insert(id, (wait_apply, reply, now));
        self.note_wait(now);
        self.engine.read(now, id, mode);
    }

    /// Adds a learner; `reply` gets the entry's index once it applied.
    fn add_learner(&mut self, now: Millis, node: NodeId, reply: IndexReply) {
        self.learner_change(now, node, true, reply);
    }

    /// Removes a learner; `reply` gets the entry's index once it applied.
    fn remove_learner(&mut self, now: Millis, node: NodeId, reply: IndexReply) {
        self.learner_change(now, node, false, reply);
    }

    /// Proposes adding (`member`) or removing the learner on `node`; `reply` waits for the
    /// entry to apply with the change in the committed configuration.
    fn learner_change(&mut self, now: Millis, node: NodeId, member: bool, reply: IndexReply) {
        if let Err(e) = self.check_alive() {
            let _ = reply.send(Err(e));
            return;
        }
        let proposed = if member { self.engine.add_learner(now, node) } else { self.engine.remove_learner(now, node) };
        match proposed {
            Ok(index) => {
                let term = self.engine.term_at(index).unwrap_or_default();
                self.learner_waits.push((LogId { term, index }, node, member, reply, now));
                self.note_wait(now);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
        self.check_waits();
    }

    /// Changes the voters by joint consensus; `reply` gets the final configuration's index.
    fn change_membership(&mut self, now: Millis, voters: BTreeSet<NodeId>, reply: IndexReply) {
        if let Err(e) = self.check_alive() {
            let _ = reply.send(Err(e));
            return;
        }
        let committed = self.engine.committed_membership();
        if voters == committed.membership.voters
            && !committed.membership.is_joint()
            && self.engine.membership() == committed
            && self.engine.leader() == Some(self.engine.id())
        {
            // Already the configuration: nothing to do.
            let _ = reply.send(Ok(committed.log_id.index));
            return;
        }
        match self.engine.change_membership(now, voters.clone()) {
            Ok(index) => {
                let term = self.engine.term_at(index).unwrap_or_default();
                self.change_waits.push((LogId { term, index }, voters, reply, now));
                self.note_wait(now);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Hands leadership to `target`; `reply` answers once this node sees it lead.
    fn transfer_leader(&mut self, now: Millis, target: NodeId, reply: DoneReply) {
        if let Err(e) = self.check_alive() {
            let _ = reply.send(Err(e));
            return;
        }
        match self.engine.transfer_leader(now, target) {
            Ok(()) if self.engine.leader() == Some(target) => {
                let _ = reply.send(Ok(()));
            }
            Ok(()) => {
                self.transfer_waits.push((target, reply, now));
                self.note_wait(now);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Purges the log now up to what the state machine holds durably.
    pub fn compact_log(&mut self, now: Millis) {
        self.engine.compact_log(now);
    }

    /// Ends the transfers of every snapshot built so far and drops them: they no longer
    /// describe the state machine (e.g. its key range narrowed, and a receiver must never get
    /// the wider one). Followers that still need a snapshot get one built afterwards.
    pub fn discard_snapshots(&mut self, now: Millis) {
        if self.fatal.is_none() {
            self.engine.discard_snapshots(now);
        }
    }

    /// A wait other than a write was handed in at `now`.
    fn note_wait(&mut self, now: Millis) {
        self.waits_since_min = Some(self.waits_since_min.map_or(now, |m| m.min(now)));
    }

    /// When [`time_out_calls`](Self::time_out_calls) with this `wait_ms_max` has a call to
    /// answer, at the earliest: the oldest waiting call will then have waited longer than
    /// `wait_ms_max`. `None` while no call waits. Cheap (no scan): a runner may ask after every
    /// step.
    pub fn next_call_timeout(&self, wait_ms_max: u64) -> Option<Millis> {
        let oldest = match (self.writes.front().map(|w| w.since), self.waits_since_min) {
            (Some(w), Some(o)) => w.min(o),
            (w, o) => w.or(o)?,
        };
        // Strictly more than `wait_ms_max`: `now` counts whole milliseconds, so a call handed
        // in at `since` came up to a millisecond after it.
        Some(Millis(oldest.0.saturating_add(wait_ms_max).saturating_add(1)))
    }

    /// Answers [`RaftError::Timeout`] to every call that has waited more than `wait_ms_max`
    /// since it was handed in (the `now` of the `handle_request` or `handle_writes` that took
    /// it), so that its caller needs no timer of its own. A write's outcome is then unknown
    /// (its entry may still commit, and is then applied with nobody to answer); a read's or a
    /// configuration change's answer is dropped when the engine gives it. Optional: a runner
    /// whose callers bound their own waits never calls it.
    pub fn time_out_calls(&mut self, now: Millis, wait_ms_max: u64) {
        let expired = |since: Millis| now.0 > since.0.saturating_add(wait_ms_max);
        // Handed in in index order: the expired writes are a run at the front.
        while self.writes.front().is_some_and(|w| expired(w.since)) {
            if let Some(w) = self.writes.pop_front() {
                self.time_out_write(w);
            }
        }
        if !self.waits_since_min.is_some_and(expired) {
            return;
        }
        for (_, (_, r, _)) in self.reads.extract_if(|_, r| expired(r.2)) {
            let _ = r.send(Err(RaftError::Timeout));
        }
        for (_, r, _) in self.reads_ready.extract_if(.., |w| expired(w.2)) {
            let _ = r.send(Err(RaftError::Timeout));
        }
        for (_, _, _, r, _) in self.learner_waits.extract_if(.., |w| expired(w.4)) {
            let _ = r.send(Err(RaftError::Timeout));
        }
        for (_, _, r, _) in self.change_waits.extract_if(.., |w| expired(w.3)) {
            let _ = r.send(Err(RaftError::Timeout));
        }
        for (_, r, _) in self.transfer_waits.extract_if(.., |w| expired(w.2)) {
            let _ = r.send(Err(RaftError::Timeout));
        }
        let oldest = (self.reads.values().map(|r| r.2))
            .chain(self.reads_ready.iter().map(|r| r.2))
            .chain(self.learner_waits.iter().map(|w| w.4))
            .chain(self.change_waits.iter().map(|w| w.3))
            .chain(self.transfer_waits.iter().map(|w| w.2))
            .min();
        self.waits_since_min = oldest;
    }

    /// A write that waited too long: its caller gets `Timeout` (a request of several commands
    /// as a whole, on the first of its commands to time out; the others then find it gone).
    fn time_out_write(&mut self, w: PendingWrite) {
        match w.waiter {
            Waiter::One(reply) => {
                let _ = reply.send(Err(RaftError::Timeout));
            }
            Waiter::Part { batch, .. } => {
                if let Some(b) = self.batches.remove(&batch) {
                    let _ = b.reply.send(Err(RaftError::Timeout));
                }
            }
        }
    }

    fn check_alive(&self) -> Result<(), RaftError> {
        match &self.fatal {
            Some(f) => Err(RaftError::Fatal(f.clone())),
            None => Ok(()),
        }
    }

    // ----- inputs ------------------------------------------------------------------------

    /// A message from a peer.
    pub fn handle_message(&mut self, now: Millis, msg: Message) {
        if self.fatal.is_none() {
            self.engine.handle_message(now, msg);
        }
    }

    /// Entry `commit` is known committed from outside the group (see
    /// [`Engine::learn_committed`]).
    pub fn learn_committed(&mut self, now: Millis, commit: LogId) {
        if self.fatal.is_none() {
            self.engine.learn_committed(now, commit);
        }
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.fatal.is_none() {
            self.engine.handle_timeout(now);
        }
    }

    /// A `Write` action is durable.
    pub fn handle_io_done(&mut self, now: Millis, io: IoId) {
        if self.fatal.is_none() {
            self.engine.handle_io_done(now, io);
        }
    }

    /// Entries a `Load` action read.
    pub fn handle_entries_loaded(&mut self, now: Millis, peer: NodeId, entries: Vec<Entry>) {
        if self.fatal.is_none() {
            self.engine.handle_entries_loaded(now, peer, entries);
        }
    }

    /// Answers the writes among `results` — committed entries whose answers the state machine
    /// has computed — before their application is stored. They are already durable in a
    /// quorum's logs and their answers are fixed, so a host may answer as soon as the state
    /// machine has prepared them. Reads are unaffected: they still wait for
    /// [`handle_applied`](Self::handle_applied), which later finds these writes answered.
    pub fn answer_writes(&mut self, results: &[(LogId, Bytes)]) {
        for (log_id, data) in results {
            self.complete_write(*log_id, data.clone());
        }
    }

    /// An `Apply` action finished: the id and response of every entry applied, in order.
    pub fn handle_applied(&mut self, now: Millis, results: Vec<(LogId, Bytes)>) {
        let last = results.last().map(|(id, _)| id.index);
        for (log_id, data) in results {
            self.complete_write(log_id, data);
        }
        if let Some(last) = last {
            self.engine.handle_applied(now, last);
        }
        self.check_waits();
    }

    /// The state machine's applied state is durable up to `index`: the log may be purged
    /// behind it.
    pub fn handle_applied_durable(&mut self, now: Millis, index: LogIndex) {
        if self.fatal.is_none() {
            self.engine.handle_applied_durable(now, index);
        }
    }

    /// A `Build` action finished.
    pub fn handle_snapshot_built(&mut self, now: Millis, meta: SnapshotMeta) {
        if self.fatal.is_none() {
            self.engine.handle_snapshot_built(now, meta);
        }
    }

    /// A `ReadChunk` action finished (`data` is `None` if the snapshot is gone).
    pub fn handle_snapshot_read(
        &mut self,
        now: Millis,
        to: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Option<Bytes>,
        done: bool,
    ) {
        if self.fatal.is_none() {
            self.engine.handle_snapshot_read(now, to, meta, offset, data, done);
        }
    }

    /// A `Receive` action stored its bytes; the stream is stored up to `end`.
    pub fn handle_snapshot_received(&mut self, now: Millis, meta: SnapshotMeta, reception: u64, end: u64) {
        if self.fatal.is_none() {
            self.engine.handle_snapshot_received(now, meta, reception, end);
        }
    }

    /// An `Install` action finished.
    pub fn handle_snapshot_installed(&mut self, now: Millis, meta: SnapshotMeta, reception: u64) {
        if self.fatal.is_some() {
            return;
        }
        // Proposals at or below the snapshot: this node proposed them as leader, then fell
        // behind; whether they committed is unknown here.
        while self.writes.front().is_some_and(|w| w.index <= meta.last_log_id.index) {
            if let Some(w) = self.writes.pop_front() {
                let index = w.index;
                self.finish_write(w, Err(RaftError::Indeterminate { index }));
            }
        }
        self.engine.handle_snapshot_installed(now, meta, reception);
        self.check_waits();
    }

    /// A `Receive` or `Install` action found the snapshot corrupt.
    pub fn handle_snapshot_refused(&mut self, now: Millis, meta: SnapshotMeta, reception: u64, reason: &str) {
        if self.fatal.is_none() {
            self.engine.handle_snapshot_refused(now, meta, reception, reason);
        }
    }

    /// Storage failed or the group is shutting down: every pending and later request fails
    /// with `fatal`, and no more actions are produced.
    pub fn stop(&mut self, fatal: Fatal) {
        if self.fatal.is_some() {
            return;
        }
        let err = || RaftError::Fatal(fatal.clone());
        for w in self.writes.drain(..) {
            if let Waiter::One(reply) = w.waiter {
                let _ = reply.send(Err(err()));
            }
        }
        for (_, b) in self.batches.drain() {
            let _ = b.reply.send(Err(err()));
        }
        for (_, (_, r, _)) in self.reads.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, r, _) in self.reads_ready.drain(..) {
            let _ = r.send(Err(err()));
        }
        for (_, _, _, r, _) in self.learner_waits.drain(..) {
            let _ = r.send(Err(err()));
        }
        for (_, _, r, _) in self.change_waits.drain(..) {
            let _ = r.send(Err(err()));
        }
        for (_, r, _) in self.transfer_waits.drain(..) {
            let _ = r.send(Err(err()));
        }
        self.waits_since_min = None;
        self.out.clear();
        self.fatal = Some(fatal);
        self.refresh_lease_gate();
    }

    /// A storage error stops the group.
    pub fn fail(&mut self, e: StorageError) {
        warn!(node = %self.engine.id(), error = %e, "storage failed: stopping the group");
        self.stop(Fatal::Storage(e));
    }

    // ----- outputs -----------------------------------------------------------------------

    /// The next action to execute, in order; `None` once there is nothing to do.
    pub fn poll_action(&mut self) -> Option<CoreAction> {
        // Before anything of the last step leaves (a transfer's `TimeoutNow` above all).
        self.refresh_lease_gate();
        loop {
            if let (None, Some(f)) = (&self.fatal, self.engine.fatal()) {
                // The engine found it cannot go on (its log forked from the leader's): stop
                // as after a storage failure, answering every waiter.
                let f = f.clone();
                self.stop(f);
            }
            if self.fatal.is_some() {
                return None;
            }
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            let Some(action) = self.engine.poll_action() else {
                // Queued after the writes above, so the entries it covers are durable first.
                let committed = self.engine.committed();
                if committed > self.committed_saved {
                    self.committed_saved = committed;
                    return Some(CoreAction::Log(LogAction::SaveCommitted(committed)));
                }
                self.check_waits();
                return None;
            };
            match action {
                Action::SaveVote { .. }
                | Action::AppendEntries { .. }
                | Action::TruncateFrom { .. }
                | Action::PurgeUpTo { .. } => return Some(CoreAction::Log(LogAction::Write(action))),
                Action::LoadEntries { peer, from, to, bytes_max } => {
                    return Some(CoreAction::Log(LogAction::Load { peer, from, to, bytes_max }))
                }
                Action::Send(msg) => return Some(CoreAction::Send(msg)),
                Action::Apply { first, last, entries } => {
                    return Some(CoreAction::Machine(MachineAction::Apply { first, last, entries }))
                }
                Action::BuildSnapshot => return Some(CoreAction::Machine(MachineAction::Build)),
                Action::ReadSnapshotChunk { to, meta, offset, len, done } => {
                    return Some(CoreAction::Machine(MachineAction::ReadChunk { to, meta, offset, len, done }))
                }
                Action::DropSnapshot { meta } => return Some(CoreAction::Machine(MachineAction::Drop(meta))),
                Action::ReceiveSnapshotChunk { meta, offset, data, reception } => {
                    return Some(CoreAction::Machine(MachineAction::Receive { meta, offset, data, reception }))
                }
                Action::InstallSnapshot { meta, reception } => {
                    return Some(CoreAction::Machine(MachineAction::Install { meta, reception }))
                }
                Action::ReadReady { id, index } => {
                    if let Some((wait_apply, reply, since)) = self.reads.remove(&id) {
                        if wait_apply && index > self.engine.applied() {
                            self.reads_ready.push((index, reply, since));
                        } else {
                            let _ = reply.send(Ok(index));
                        }
                    }
                }
                Action::ReadFailed { id, error } => {
                    if let Some((_, reply, _)) = self.reads.remove(&id) {
                        let _ = reply.send(Err(error));
                    }
                }
            }
        }
    }

    fn complete_write(&mut self, log_id: LogId, data: Bytes) {
        // Entries apply in order: the waiter is at the front, unless a host answered it early.
        let pos = match self.writes.front() {
            Some(w) if w.index == log_id.index => 0,
            _ => match self.writes.binary_search_by_key(&log_id.index, |w| w.index) {
                Ok(pos) => pos,
                Err(_) => return,
            },
        };
        let Some(w) = self.writes.remove(pos) else { return };
        let result = if w.term == log_id.term {
            Ok(WriteResponse { log_id, data })
        } else {
            Err(RaftError::Dropped { index: log_id.index })
        };
        self.finish_write(w, result);
    }

    fn finish_write(&mut self, w: PendingWrite, r: Result<WriteResponse, RaftError>) {
        let (batch, pos) = match w.waiter {
            Waiter::One(reply) => {
                let _ = reply.send(r);
                return;
            }
            Waiter::Part { batch, pos } => (batch, pos),
        };
        let Some(b) = self.batches.get_mut(&batch) else { return };
        if b.results[pos].is_none() {
            b.results[pos] = Some(r);
            b.remaining -= 1;
        }
        if b.remaining == 0 {
            if let Some(b) = self.batches.remove(&batch) {
                let results = b.results.into_iter().map(|r| r.unwrap_or(Err(RaftError::Timeout))).collect();
                let _ = b.reply.send(Ok(results));
            }
        }
    }

    /// Answers requests whose condition now holds.
    fn check_waits(&mut self) {
        // Called after every drain of actions: with nobody waiting (the common case: writes
        // are answered as they apply), skip the copy of the configuration below.
        if self.reads_ready.is_empty()
            && self.learner_waits.is_empty()
            && self.change_waits.is_empty()
            && self.transfer_waits.is_empty()
        {
            if self.reads.is_empty() {
                // No wait but writes is left: no call time-out is due for them.
                self.waits_since_min = None;
            }
            return;
        }
        let applied = self.engine.applied();
        let committed_m = self.engine.committed_membership().clone();
        let mut i = 0;
        while i < self.reads_ready.len() {
            if self.reads_ready[i].0 <= applied {
                let (idx, r, _) = self.reads_ready.swap_remove(i);
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
            let (id, node, member) = (self.learner_waits[i].0, self.learner_waits[i].1, self.learner_waits[i].2);
            if id.index <= applied {
                let (_, _, _, r, _) = self.learner_waits.swap_remove(i);
                let ok = !replaced(&self.engine, id) && committed_m.membership.contains(node) == member;
                let _ = r.send(if ok { Ok(id.index) } else { Err(RaftError::Dropped { index: id.index }) });
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.change_waits.len() {
            let joint = self.change_waits[i].0;
            // Applied past the joint entry's index: the committed configuration is the last at
            // or before what applied, so one older than that index, or another entry at it,
            // means the history there holds no such entry. This also decides it once a
            // snapshot took the entry out of the log, where `replaced` can no longer look.
            let superseded = committed_m.log_id.index < joint.index
                || (committed_m.log_id.index == joint.index && committed_m.log_id.term != joint.term);
            if (replaced(&self.engine, joint) || superseded) && joint.index <= applied {
                let (_, _, r, _) = self.change_waits.swap_remove(i);
                let _ = r.send(Err(RaftError::Dropped { index: joint.index }));
                continue;
            }
            let done = committed_m.log_id.index > joint.index
                && !committed_m.membership.is_joint()
                && committed_m.log_id.index <= applied;
            if done {
                let (_, voters, r, _) = self.change_waits.swap_remove(i);
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
                let (_, r, _) = self.transfer_waits.swap_remove(i);
                let _ = r.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }
}
