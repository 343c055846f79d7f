//! The sans-IO Raft engine: a deterministic state machine. Inputs are method calls
//! (`handle_*` for events, plain verbs for API requests), outputs are [`Action`]s taken with
//! [`Engine::poll_action`]. It never reads a clock, draws no randomness of its own (a seeded
//! RNG lives inside) and performs no I/O.
//!
//! This file holds the [`Engine`] type, its inputs (each runs its concept's handler, then the
//! debug-build invariant check) and the dispatch of peer messages. Each Raft concept has a
//! room of its own: `election.rs`, `replication.rs` (leader), `append.rs` (follower),
//! `read.rs`, `transfer.rs`, `snapshot.rs`, `config_change.rs`, `quiesce.rs`, `timers.rs`,
//! `io.rs` (writes and applying); `role.rs` is the role with its own state, `invariants.rs`
//! the checks; `log.rs`, `progress.rs` and `rng.rs` are the data structures underneath.

mod append;
mod config_change;
mod election;
mod invariants;
mod io;
mod log;
mod progress;
mod quiesce;
mod read;
mod replication;
mod rng;
mod role;
mod snapshot;
mod timers;
mod transfer;
mod unsafe_recovery;

use io::PendingIo;
use read::Reads;
use role::{LeaderState, RoleState};
use snapshot::{BuildingSnapshot, Receiving, SnapshotAnswer};
use transfer::Transfer;

use crate::config::Config;
use crate::entry::{Entry, EntryPayload};
use crate::error::{Fatal, RaftError};
use crate::membership::{Membership, MembershipLog, StoredMembership};
use crate::message::{AppendResult, Message, MessageBody};
use crate::storage::SnapshotMeta;
use crate::types::{LogId, LogIndex, Millis, NodeId, Term, Vote};
use bytes::Bytes;
use log::RaftLog;
use progress::{Progress, ReplState, SnapshotSend};
use rng::Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use tracing::{debug, error, info, trace, warn};

/// Identifies a storage write the engine asked for. Writes complete in the order they were
/// issued; the driver reports completion with [`Engine::handle_io_done`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(pub u64);

/// Something the driver must do. See [`Engine`] for the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Durably store the vote. Completion: `handle_io_done(io)`.
    SaveVote {
        /// Write id.
        io: IoId,
        /// The vote.
        vote: Vote,
    },
    /// Durably append entries. Completion: `handle_io_done(io)`.
    AppendEntries {
        /// Write id.
        io: IoId,
        /// Entries, continuing the log.
        entries: Vec<Entry>,
    },
    /// Durably delete entries at `index` and after. Completion: `handle_io_done(io)`.
    TruncateFrom {
        /// Write id.
        io: IoId,
        /// First index deleted.
        index: LogIndex,
    },
    /// Delete entries up to `log_id` (their effects are durable in the state machine, or a
    /// snapshot was installed). Completion: `handle_io_done(io)`.
    PurgeUpTo {
        /// Write id.
        io: IoId,
        /// Last purged id.
        log_id: LogId,
    },
    /// Send a message (fire-and-forget).
    Send(Message),
    /// Read entries `from..=to` (at most `bytes_max`, at least one) from storage, ordered after
    /// the writes issued before it, and hand them to `handle_entries_loaded(peer, ..)`.
    LoadEntries {
        /// Follower they are for.
        peer: NodeId,
        /// First index.
        from: LogIndex,
        /// Last index.
        to: LogIndex,
        /// Byte budget.
        bytes_max: usize,
    },
    /// Apply committed entries `first..=last` to the state machine, in order, then report
    /// `handle_applied(last)`. `entries` carries them when the engine still had them in
    /// memory; otherwise read them from storage (they are durable).
    Apply {
        /// First index.
        first: LogIndex,
        /// Last index.
        last: LogIndex,
        /// The entries, if cached.
        entries: Option<Vec<Entry>>,
    },
    /// Build a snapshot of the state machine (a follower needs one), then report
    /// `handle_snapshot_built`.
    BuildSnapshot,
    /// Read bytes `offset..offset+len` of the snapshot `meta` for `to`, then report
    /// `handle_snapshot_read` (which sends them as a chunk).
    ReadSnapshotChunk {
        /// Recipient.
        to: NodeId,
        /// The snapshot.
        meta: Box<SnapshotMeta>,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Last chunk.
        done: bool,
    },
    /// Release the snapshot `meta`: no transfer uses it any more.
    DropSnapshot {
        /// The snapshot.
        meta: Box<SnapshotMeta>,
    },
    /// Store a received snapshot chunk (it follows the previous chunk of the same reception;
    /// `offset == 0` starts a new one and discards any partial one), then report
    /// `handle_snapshot_received` (or `handle_snapshot_refused`). The leader's next chunks wait
    /// for that report, so no more than its window is ever queued here.
    ReceiveSnapshotChunk {
        /// The snapshot.
        meta: Box<SnapshotMeta>,
        /// Offset of `data`.
        offset: u64,
        /// The bytes.
        data: Bytes,
        /// Which reception (of this engine) the chunk belongs to: reports name it, and a
        /// report of an earlier reception, even of the same snapshot, is ignored.
        reception: u64,
    },
    /// Install the fully received snapshot into the state machine, then report
    /// `handle_snapshot_installed` (or `handle_snapshot_refused` if it is corrupt).
    InstallSnapshot {
        /// The snapshot.
        meta: Box<SnapshotMeta>,
        /// The reception, as for `ReceiveSnapshotChunk`.
        reception: u64,
    },
    /// A read registered with [`Engine::read`] may be served once the state machine has
    /// applied `index`.
    ReadReady {
        /// The caller's id for the read.
        id: u64,
        /// Wait for this applied index.
        index: LogIndex,
    },
    /// A read registered with [`Engine::read`] cannot be served here.
    ReadFailed {
        /// The caller's id for the read.
        id: u64,
        /// Why.
        error: RaftError,
    },
}

/// How a read is made linearizable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex (Raft thesis §6.4): the leader confirms with a quorum heartbeat round that it
    /// is still leader, then serves at its commit index. One round trip, no clock assumption.
    ReadIndex,
    /// Lease read (§6.4.1): no round trip while the leader lease holds; falls back to
    /// ReadIndex otherwise. Safe if clocks drift by less than `lease_clock_drift_ms` per
    /// election timeout.
    Lease,
}

/// The role of a node in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking for pre-votes, without a new term yet.
    PreCandidate,
    /// Campaigning in a new term.
    Candidate,
    /// The leader.
    Leader,
    /// A learner: receives the log, never campaigns, never votes in quorums.
    Learner,
}

/// What a node recovered from storage, to start the engine from.
#[derive(Clone, Debug, Default)]
pub struct InitialState {
    /// The durable vote.
    pub vote: Vote,
    /// The last purged log id (`LogId::ZERO` if none).
    pub last_purged: LogId,
    /// The first log id of each run of equal terms in the log after `last_purged`.
    pub term_points: Vec<LogId>,
    /// The last log id.
    pub last_log_id: LogId,
    /// The commit index saved, if any (0 otherwise).
    pub committed: LogIndex,
    /// The state machine's last applied id.
    pub applied: LogId,
    /// The configuration the state machine applied last.
    pub applied_membership: StoredMembership,
    /// Configuration entries found in the log after `applied`, in order.
    pub log_memberships: Vec<StoredMembership>,
}

/// A point-in-time summary of the engine, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    /// This node.
    pub id: NodeId,
    /// Role.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Last log id.
    pub last_log_id: LogId,
    /// Last durable log id.
    pub persisted: LogId,
    /// Commit index.
    pub committed: LogIndex,
    /// Applied index.
    pub applied: LogIndex,
    /// Effective configuration.
    pub membership: StoredMembership,
    /// Latest committed configuration.
    pub committed_membership: StoredMembership,
    /// The newest snapshot built for a transfer and not yet dropped.
    pub snapshot: Option<LogId>,
    /// The last applied index known durable in the state machine (the log is purged behind it).
    pub durable_applied: LogIndex,
    /// The log's first index.
    pub first_log_index: LogIndex,
    /// On the leader: matched index of every other member.
    pub replication: BTreeMap<NodeId, LogIndex>,
}

/// Protocol bugs the simulator can switch on (feature `sim-bugs`); all off otherwise, and then
/// compiled away.
#[derive(Clone, Copy, Default)]
struct Bugs {
    commit_old_term: bool,
    vote_without_log_check: bool,
    read_without_read_index: bool,
    ack_before_durable: bool,
    vote_within_promise: bool,
    lease_after_timeout_now: bool,
    lease_past_drift_margin: bool,
}

/// The Raft protocol for one group, as a deterministic state machine.
///
/// # Driving contract
/// 1. **Feed every input** with the current time: peer messages (`handle_message`), completed
///    writes (`handle_io_done`), applied entries (`handle_applied`), loaded entries, built or
///    installed snapshots, and `handle_timeout` whenever `now >= next_deadline()`.
/// 2. **Drain actions** with [`poll_action`](Self::poll_action) and execute them **in order**.
///    Several inputs may be fed before draining (a driver batching messages does): actions
///    accumulate in order.
/// 3. **Writes** (`SaveVote`, `AppendEntries`, `TruncateFrom`, `PurgeUpTo`) may complete
///    asynchronously but must become durable in the order issued; report completion with
///    `handle_io_done(io)` only once durable (reporting the last of several done is enough).
///    A failed write must stop the group: never report it done.
/// 4. **Sends** may go out immediately, before earlier writes are durable: the engine never
///    emits a message whose truth depends on an unfinished write (a vote is answered and an
///    append acknowledged only after `handle_io_done`; a leader counts its own entries
///    toward the quorum only once durable — "send before persist", Raft thesis §10.2.1).
/// 5. **Apply** in order, report `handle_applied`. Loads and applies read only durable
///    entries.
/// 6. **Stop** the group once [`fatal`](Self::fatal) says why (its log forked from the
///    leader's): the engine then emits nothing more ([`GroupCore`](crate::GroupCore) does this).
pub struct Engine {
    /// This node.
    id: NodeId,
    /// Timeouts, limits and protocol options, shared with the driver.
    config: Arc<Config>,
    /// The election-timeout randomization, seeded so that a run replays.
    rng: Rng,
    /// The role, with the state only that role has.
    role: RoleState,
    /// Current vote (possibly not yet durable).
    vote: Vote,
    /// The vote as last made durable.
    vote_durable: Vote,
    /// The leader of the current term, if known (this node when it leads).
    leader: Option<NodeId>,
    /// Term boundaries of the log and a cache of entries not yet durable or not yet sent.
    log: RaftLog,
    /// Last log id known durable, consistent with the current log.
    persisted: LogId,
    /// Highest index known committed.
    committed: LogIndex,
    /// Highest index the state machine reported applied.
    applied: LogIndex,
    /// Highest index handed to an `Apply` action.
    apply_sent: LogIndex,
    /// The configurations in the log: the effective (latest) one and those not yet committed.
    memberships: MembershipLog,
    /// Highest index the state machine reported durable: the log may be purged up to here.
    durable_applied: LogIndex,
    /// Receptions of snapshots started (the last one's number names the current reception).
    receptions: u64,
    /// The time of the last purge decision (a purge that follows a dropped snapshot reuses it).
    purge_judged_at: Millis,
    /// What the leader last said it keeps its log after for its followers (a follower purges
    /// no further; see `purge_log`). On the leader, what it last announced.
    leader_keeps_after: Option<LogIndex>,
    /// `LoadEntries` polled and not yet answered (peer, first index): the log is never purged
    /// under them, whatever the role meanwhile, or the load would find its entries gone.
    loads_in_flight: Vec<(NodeId, LogIndex)>,
    /// Snapshots built for transfers and not yet dropped, oldest first; the last is the newest.
    snapshots: Vec<SnapshotMeta>,
    /// A `BuildSnapshot` is outstanding: ask for no second one. Holds the index every entry
    /// up to which the snapshot will include (the applies issued before it), which bounds the
    /// log purge until it is built, so that it still covers what a follower lacks.
    building_snapshot: Option<BuildingSnapshot>,
    /// A snapshot being received from the leader. Outside the role: an install under way
    /// survives a role change and blocks applying until it is done. Boxed, like the other
    /// fields used only for a while or once: most replicas of a host of many groups never
    /// receive a snapshot, and each would carry the space inline.
    receiving: Option<Box<Receiving>>,
    /// When a follower or candidate campaigns next (unused while leading).
    election_at: Millis,
    /// When this node last heard from a leader of its term (vote stickiness, check-quorum).
    leader_contact_at: Option<Millis>,
    /// The last write id issued.
    next_io: u64,
    /// Writes issued and not yet durable, in order.
    pending_io: VecDeque<PendingIo>,
    /// Vote answers waiting for the vote to be durable.
    vote_replies: Vec<(NodeId, Term)>,
    /// Append acknowledgement waiting for durability: (leader, term, matched index).
    ack_pending: Option<(NodeId, Term, LogIndex)>,
    /// Output waiting for `poll_action`, in order.
    actions: VecDeque<Action>,
    /// Set once the engine found it cannot go on safely (its log forked from the leader's
    /// below its commit index): from then on it takes no message or timer and emits nothing,
    /// and the driver stops the group with this error. Boxed, as `receiving`.
    fatal: Option<Box<Fatal>>,
}

impl Engine {
    /// An engine for node `id`, resuming from `state`. `seed` drives the election-timeout
    /// randomization. `config` must be valid ([`Config::validate`]).
    pub fn new(id: NodeId, config: Arc<Config>, state: InitialState, seed: u64, now: Millis) -> Engine {
        debug_assert_eq!(config.validate(), Ok(()), "invalid config");
        let log = RaftLog::new(state.last_purged, state.term_points, state.last_log_id);
        let mut memberships = MembershipLog::new(state.applied_membership.clone());
        for m in state.log_memberships {
            if m.log_id.index > state.applied_membership.log_id.index {
                memberships.push(m);
            }
        }
        let mut e = Engine {
            id,
            rng: Rng::new(seed ^ id.0.rotate_left(32)),
            role: RoleState::Follower,
            vote: state.vote,
            vote_durable: state.vote,
            leader: None,
            persisted: log.last_id(),
            log,
            committed: state.committed.max(state.applied.index),
            applied: state.applied.index,
            apply_sent: state.applied.index,
            memberships,
            durable_applied: state.last_purged.index,
            receptions: 0,
            purge_judged_at: now,
            leader_keeps_after: None,
            loads_in_flight: Vec::new(),
            snapshots: Vec::new(),
            building_snapshot: None,
            receiving: None,
            election_at: now,
            leader_contact_at: None,
            next_io: 0,
            pending_io: VecDeque::new(),
            vote_replies: Vec::new(),
            ack_pending: None,
            actions: VecDeque::new(),
            fatal: None,
            config,
        };
        // The state machine may be ahead of the log: a snapshot was installed and the process
        // stopped before the log was reset to it. Finish that reset now.
        if state.applied.index > LogIndex(0) && !e.log.has(state.applied) {
            e.durable_applied = state.applied.index;
            e.reset_log_to(state.applied);
        }
        if e.committed > e.log.last_index() {
            e.committed = e.log.last_index();
        }
        e.memberships.compact(e.committed);
        // A node with state may have acknowledged a leader just before it stopped: refuse
        // votes for one election timeout, as if it had just heard from that leader.
        if !e.is_pristine() {
            e.leader_contact_at = Some(now);
        }
        e.role = RoleState::following(e.effective().membership.is_learner(id));
        e.reset_election_timer(now);
        e.maybe_apply();
        e.check_invariants();
        e
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.role.role()
    }
    /// Current term.
    pub fn term(&self) -> Term {
        self.vote.term
    }
    /// Known leader.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// Commit index.
    pub fn committed(&self) -> LogIndex {
        self.committed
    }
    /// Applied index.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }
    /// Last log id.
    pub fn last_log_id(&self) -> LogId {
        self.log.last_id()
    }
    /// The configuration in effect (the latest in the log).
    pub fn membership(&self) -> &StoredMembership {
        self.memberships.effective()
    }
    /// The configuration now committed.
    pub fn committed_membership(&self) -> &StoredMembership {
        self.memberships.committed(self.committed)
    }
    /// The applied index the state machine holds durably (the log is purged behind it).
    pub fn durable_applied(&self) -> LogIndex {
        self.durable_applied
    }
    /// The first index still in the log.
    pub fn first_log_index(&self) -> LogIndex {
        self.log.first_index()
    }
    /// The newest snapshot built and not yet dropped.
    pub fn newest_snapshot(&self) -> Option<LogId> {
        self.snapshots.last().map(|s| s.last_log_id)
    }
    /// The term of the entry at `index`, if the engine knows it.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term_at(index)
    }
    /// Why the engine stopped, if it did: it then emits no action, and the driver must stop
    /// the group (as after a storage failure).
    pub fn fatal(&self) -> Option<&Fatal> {
        self.fatal.as_deref()
    }
    /// Whether this node holds any configuration (from its log, a snapshot or its formation).
    pub fn has_configuration(&self) -> bool {
        !self.memberships.effective().membership.nodes().is_empty()
    }

    /// Whether this node has never joined a cluster (no configuration, empty log).
    pub fn is_pristine(&self) -> bool {
        self.log.last_id() == LogId::ZERO && self.vote == Vote::default() && self.applied == LogIndex(0)
    }

    /// A summary for metrics.
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            id: self.id,
            role: self.role.role(),
            term: self.vote.term,
            leader: self.leader,
            last_log_id: self.log.last_id(),
            persisted: self.persisted,
            committed: self.committed,
            applied: self.applied,
            membership: self.effective().clone(),
            committed_membership: self.committed_membership().clone(),
            snapshot: self.snapshots.last().map(|s| s.last_log_id),
            durable_applied: self.durable_applied,
            first_log_index: self.log.first_index(),
            replication: self.replication(),
        }
    }

    /// On a leader, each follower's and learner's matched index (empty otherwise): the
    /// `replication` of [`Engine::status`] without the rest of it.
    pub fn replication(&self) -> BTreeMap<NodeId, LogIndex> {
        self.role.leader().map(|l| l.progress.iter().map(|(id, p)| (*id, p.matched)).collect()).unwrap_or_default()
    }

    /// On a leader, how far `peer`'s log is known to match: one entry of
    /// [`Engine::replication`], without building it. `None` on other roles, for the leader
    /// itself, and for a node the leader does not replicate to (in none of the configurations
    /// it holds, once its timer pruned it).
    pub fn matched(&self, peer: NodeId) -> Option<LogIndex> {
        self.role.leader().and_then(|l| l.progress.get(&peer)).map(|p| p.matched)
    }

    // Inputs. Each runs its concept's handler, then checks the engine's invariants (debug
    // builds only).

    /// Forms a new cluster with `membership` as its first configuration. Call on one node, or
    /// on every initial member with the same membership. Refused on a node with any state.
    pub fn initialize(&mut self, now: Millis, membership: Membership) -> Result<(), RaftError> {
        let result = self.init_cluster(now, membership);
        self.settle();
        result
    }

    /// A message from a peer.
    pub fn handle_message(&mut self, now: Millis, msg: Message) {
        if self.fatal.is_some() {
            return;
        }
        self.dispatch_message(now, msg);
        self.settle();
    }

    /// Appends client commands to the log (leader only). Returns the index of the first.
    /// An empty `commands` appends nothing.
    pub fn propose(&mut self, now: Millis, commands: Vec<Bytes>) -> Result<LogIndex, RaftError> {
        let result = self.append_commands(now, commands);
        self.settle();
        result
    }

    /// Entry `commit` is committed, as this node learned outside the group's own messages (a
    /// host: another group's committed entry was proposed only once this one was). The commit
    /// index advances to it if the log holds that very entry (same term), as a heartbeat naming
    /// it would; otherwise nothing changes.
    pub fn learn_committed(&mut self, now: Millis, commit: LogId) {
        if self.fatal.is_some() {
            return;
        }
        if commit.index > self.committed && self.log.has(commit) {
            self.committed = commit.index;
            self.after_commit(now);
        }
        self.settle();
    }

    /// Entries requested with `LoadEntries` for `peer`.
    pub fn handle_entries_loaded(&mut self, now: Millis, peer: NodeId, entries: Vec<Entry>) {
        // Loads complete in the order they were polled.
        if let Some(i) = self.loads_in_flight.iter().position(|(p, _)| *p == peer) {
            self.loads_in_flight.remove(i);
        }
        self.on_entries_loaded(now, peer, entries);
        self.settle();
    }

    /// Adds `node` as a learner (leader only). Returns the index of the configuration entry.
    pub fn add_learner(&mut self, now: Millis, node: NodeId) -> Result<LogIndex, RaftError> {
        let result = self.propose_add_learner(now, node);
        self.settle();
        result
    }

    /// Removes the learner on `node` (leader only): the leader stops replicating to it once the
    /// configuration entry is appended. Returns the index of that entry (the current
    /// configuration's, when `node` is no member). A voter is refused: voters leave through
    /// `change_membership`.
    pub fn remove_learner(&mut self, now: Millis, node: NodeId) -> Result<LogIndex, RaftError> {
        let result = self.propose_remove_learner(now, node);
        self.settle();
        result
    }

    /// Changes the set of voters to `voters` by joint consensus (leader only): a joint
    /// configuration is committed first, then the new one alone, automatically. Learners that
    /// become voters are promoted; voters not in `voters` leave the group. Returns the index of
    /// the joint entry.
    pub fn change_membership(&mut self, now: Millis, voters: BTreeSet<NodeId>) -> Result<LogIndex, RaftError> {
        let result = self.propose_voters(now, voters);
        self.settle();
        result
    }

    /// Hands leadership to `target` (leader only): once `target` has the whole log, it is told
    /// to campaign at once. Proposals are refused meanwhile.
    pub fn transfer_leader(&mut self, now: Millis, target: NodeId) -> Result<(), RaftError> {
        let result = self.start_transfer(now, target);
        self.settle();
        result
    }

    /// Unsafe recovery, for an operator only: forces this replica to be its group's only voter,
    /// after a majority of the voters was lost for good (see `unsafe_recovery.rs`). It
    /// campaigns in a new term with a configuration of itself alone appended after its last
    /// entry, leads once its vote is durable, and commits everything it holds. Entries only
    /// the lost voters had are gone. Returns the index of the forced configuration's entry
    /// (the replica kept everything before it).
    ///
    /// Refused (nothing changes) unless the nodes `dead` hold a majority of either half of the
    /// replica's configuration in effect (and do not include this node), and its last log id
    /// is still `expected_last` (what the operator's tool saw when it decided); a replica
    /// already forced answers its forced configuration's index again.
    pub fn force_alone(
        &mut self,
        now: Millis,
        dead: &BTreeSet<NodeId>,
        expected_last: LogId,
    ) -> Result<LogIndex, RaftError> {
        let result = self.force_alone_now(now, dead, expected_last);
        self.settle();
        result
    }

    /// Purges the log now up to everything the state machine has made durable (without the
    /// slack `log_keep_entries` keeps), e.g. before a backup or to test catch-up by snapshot.
    pub fn compact_log(&mut self, now: Millis) {
        self.purge_log(now, true);
        self.settle();
    }

    /// The state machine's applied state is durable up to `index` (see
    /// [`StateMachine::durable_applied`](crate::StateMachine::durable_applied)).
    pub fn handle_applied_durable(&mut self, now: Millis, index: LogIndex) {
        self.on_applied_durable(now, index);
        self.settle();
    }

    /// Ends every transfer of a snapshot built so far and drops those snapshots: they no
    /// longer describe what a receiver may get (e.g. the state machine's key range narrowed).
    /// Followers that still need one get a snapshot built afterwards.
    pub fn discard_snapshots(&mut self, now: Millis) {
        self.drop_all_snapshots(now);
        self.settle();
    }

    /// The state machine finished building the snapshot asked for by `BuildSnapshot`.
    pub fn handle_snapshot_built(&mut self, now: Millis, meta: SnapshotMeta) {
        self.on_snapshot_built(now, meta);
        self.settle();
    }

    /// The bytes a `ReadSnapshotChunk` asked for (`None`: the state machine no longer has the
    /// snapshot; the transfer starts over with a new one).
    pub fn handle_snapshot_read(
        &mut self,
        now: Millis,
        to: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Option<Bytes>,
        done: bool,
    ) {
        self.on_snapshot_read(now, to, meta, offset, data, done);
        self.settle();
    }

    /// The state machine stored a `ReceiveSnapshotChunk` of reception `reception`: the
    /// stream is stored up to `end` (the chunk's end).
    pub fn handle_snapshot_received(&mut self, now: Millis, meta: SnapshotMeta, reception: u64, end: u64) {
        self.on_snapshot_received(now, meta, reception, end);
        self.settle();
    }

    /// The state machine installed the snapshot asked for by `InstallSnapshot`.
    pub fn handle_snapshot_installed(&mut self, now: Millis, meta: SnapshotMeta, reception: u64) {
        self.on_snapshot_installed(now, meta, reception);
        self.settle();
    }

    /// The state machine refused the snapshot of reception `reception` (it is corrupt, or not
    /// for this replica): the leader is told, and builds a new one.
    pub fn handle_snapshot_refused(&mut self, now: Millis, meta: SnapshotMeta, reception: u64, reason: &str) {
        self.on_snapshot_refused(now, meta, reception, reason);
        self.settle();
    }

    /// Registers a linearizable read with the caller's `id`. The answer comes as
    /// `Action::ReadReady` (then wait for that applied index and read the state machine) or
    /// `Action::ReadFailed`.
    pub fn read(&mut self, now: Millis, id: u64, mode: ReadMode) {
        self.register_read(now, id, mode);
        self.settle();
    }

    /// Timers: call when `now >= next_deadline()` (calling earlier is harmless).
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.fatal.is_some() {
            return; // a stopped replica must not campaign with its forked log
        }
        self.on_timeout(now);
        self.settle();
    }

    /// Every write up to and including `io` is durable.
    pub fn handle_io_done(&mut self, now: Millis, io: IoId) {
        self.on_io_done(now, io);
        self.settle();
    }

    /// The state machine applied everything up to `index`.
    pub fn handle_applied(&mut self, now: Millis, index: LogIndex) {
        self.on_applied(now, index);
        self.settle();
    }

    /// Resumes the timers of a quiet group at `now`. A leader heartbeats at once, and may go
    /// quiet again only once every live follower answered a heartbeat sent since. A follower
    /// restarts its election timeout; with `leader_alive` (the host knows the leader's node
    /// answers) it also counts this as contact with the leader, so a vote request that woke
    /// it does not win an election against a leader that was merely quiet.
    pub fn wake(&mut self, now: Millis, leader_alive: bool) {
        self.resume_timers(now, leader_alive);
        self.settle();
    }

    /// The next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        if self.fatal.is_some() {
            return None;
        }
        if let Some(at) = self.role.leader().and_then(|l| l.reads.round_requested_at()) {
            self.flush_rounds(at);
            self.settle();
        }
        let action = self.actions.pop_front();
        if let Some(Action::LoadEntries { peer, from, .. }) = &action {
            self.loads_in_flight.push((*peer, *from));
        }
        action
    }

    /// Whether [`Engine::poll_action`] has something to return: actions queued, or a read
    /// round requested, whose heartbeats are made when polled (so that reads asked for in one
    /// step share one round).
    pub fn has_actions(&self) -> bool {
        self.fatal.is_none()
            && (!self.actions.is_empty() || self.role.leader().is_some_and(|l| l.reads.round_requested_at().is_some()))
    }

    /// The configuration in effect (the latest in the log).
    fn effective(&self) -> &StoredMembership {
        self.memberships.effective()
    }

    #[inline]
    /// The planted bugs switched on (feature `sim-bugs`; none otherwise).
    fn bugs(&self) -> Bugs {
        #[cfg(feature = "sim-bugs")]
        {
            let b = self.config.bugs;
            Bugs {
                commit_old_term: b.commit_old_term_by_count,
                vote_without_log_check: b.vote_without_log_check,
                read_without_read_index: b.read_without_read_index,
                ack_before_durable: b.ack_before_durable,
                vote_within_promise: b.vote_within_promise,
                lease_after_timeout_now: b.lease_after_timeout_now,
                lease_past_drift_margin: b.lease_past_drift_margin,
            }
        }
        #[cfg(not(feature = "sim-bugs"))]
        Bugs::default()
    }

    /// The work of [`Engine::initialize`].
    fn init_cluster(&mut self, now: Millis, membership: Membership) -> Result<(), RaftError> {
        if !self.is_pristine() {
            return Err(RaftError::AlreadyInitialized);
        }
        membership.validate().map_err(RaftError::InvalidMembership)?;
        if !membership.contains(self.id) {
            return Err(RaftError::InvalidMembership(format!(
                "node {} initializes a cluster it is not part of",
                self.id
            )));
        }
        let entry = Entry { log_id: LogId::new(0, 1), payload: EntryPayload::Membership(Box::new(membership)) };
        self.append_local(vec![entry]);
        self.role = RoleState::following(self.effective().membership.is_learner(self.id));
        // Campaign soon rather than after a whole election timeout: every initial member
        // starts at once and the randomized timeout still separates them.
        self.election_at = now.add_ms(self.rng.range(0, self.config.election_timeout_ms_min / 2 + 1));
        info!(node = %self.id, membership = %self.effective().membership, "initialized");
        Ok(())
    }

    /// The work of [`Engine::handle_message`].
    fn dispatch_message(&mut self, now: Millis, msg: Message) {
        if msg.to != self.id {
            debug!(node = %self.id, to = %msg.to, "dropping message addressed to another node");
            return;
        }
        let from = msg.from;
        trace!(node = %self.id, term = %self.vote.term, %from, msg_term = %msg.term, kind = msg.body.kind(), "message");
        if msg.term > self.vote.term {
            match &msg.body {
                MessageBody::PreVote { .. } => {}
                MessageBody::PreVoteResp { granted: true } => {}
                MessageBody::Vote { transfer: false, .. } if self.in_lease(now) => {
                    debug!(node = %self.id, term = %self.vote.term, %from, "ignoring vote request: leader is alive");
                    return;
                }
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } | MessageBody::Snapshot { .. } => {
                    self.become_follower(now, msg.term, Some(from));
                }
                _ => self.become_follower(now, msg.term, None),
            }
        } else if msg.term < self.vote.term {
            match &msg.body {
                // A stale leader (e.g. back from a partition): tell it the term so it steps
                // down; with pre-vote it could otherwise never learn it.
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } | MessageBody::Snapshot { .. } => {
                    self.send(from, MessageBody::HeartbeatResp { round: 0 });
                }
                MessageBody::PreVote { .. } => self.send(from, MessageBody::PreVoteResp { granted: false }),
                // A candidate behind on terms learns ours from the refusal. Ignoring it could
                // leave the candidate with the most up-to-date log forever one step behind
                // the terms of candidates that cannot win, and the group without a leader
                // (tests/regressions.rs: a_vote_request_from_an_older_term_is_refused_with_our_term).
                MessageBody::Vote { .. } => self.send(from, MessageBody::VoteResp { granted: false }),
                _ => {}
            }
            return;
        }

        match msg.body {
            MessageBody::PreVote { last_log_id } => self.on_pre_vote(now, from, msg.term, last_log_id),
            MessageBody::PreVoteResp { granted } => self.on_pre_vote_resp(now, from, msg.term, granted),
            MessageBody::Vote { last_log_id, .. } => self.on_vote(now, from, last_log_id),
            MessageBody::VoteResp { granted } => self.on_vote_resp(now, from, granted),
            MessageBody::Append { prev, entries, commit } => {
                self.on_leader_contact(now, from);
                self.on_append(now, from, prev, entries, commit);
            }
            MessageBody::AppendResp(r) => self.on_append_resp(now, from, r),
            MessageBody::Heartbeat { commit, round, keep_after } => {
                self.on_leader_contact(now, from);
                let raised = keep_after > self.leader_keeps_after;
                self.leader_keeps_after = keep_after;
                self.on_heartbeat(now, from, commit, round);
                if raised {
                    // What the leader no longer keeps may go here too, without waiting for the
                    // next write (a group gone quiet after a catch-up would keep it forever).
                    self.purge_log(now, false);
                }
            }
            MessageBody::HeartbeatResp { round } => self.on_heartbeat_resp(now, from, round),
            MessageBody::TimeoutNow => self.on_timeout_now(now, from),
            MessageBody::Snapshot { meta, offset, data, done } => {
                self.on_leader_contact(now, from);
                self.on_snapshot_chunk(from, *meta, offset, data, done);
            }
            MessageBody::SnapshotResp { snapshot_id, next_offset, installed, refused, gap } => {
                let answer = SnapshotAnswer { snapshot_id, next_offset, installed, refused, gap };
                self.on_snapshot_resp(now, from, answer)
            }
        }
        self.flush_rounds(now);
    }

    /// Sends `body` to `to` in our term.
    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.send_at(to, self.vote.term, body);
    }

    /// Sends `body` to `to` in `term` (a pre-vote asks in the next term).
    fn send_at(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.actions.push_back(Action::Send(Message { from: self.id, to, term, body }));
    }
}

#[cfg(test)]
mod tests;
