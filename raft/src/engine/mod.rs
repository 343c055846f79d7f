//! The sans-IO Raft engine: a deterministic state machine. Inputs are method calls
//! (`handle_*` for events, plain verbs for API requests), outputs are [`Action`]s taken with
//! [`Engine::poll_action`]. It never reads a clock, draws no randomness of its own (a seeded
//! RNG lives inside) and performs no I/O.

mod log;
mod progress;
mod rng;

use crate::config::Config;
use crate::entry::{Entry, EntryPayload};
use crate::error::RaftError;
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
use tracing::{debug, info, trace, warn};

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
    /// Delete entries up to `log_id` (after a snapshot). Completion: `handle_io_done(io)`.
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
    /// Build a snapshot of the state machine, then report `handle_snapshot_built`.
    BuildSnapshot,
    /// Send bytes `offset..offset+len` of the current snapshot (`meta`) to `to` as a
    /// `MessageBody::Snapshot` chunk. Skip it if that snapshot is no longer current.
    SendSnapshotChunk {
        /// Recipient.
        to: NodeId,
        /// The snapshot.
        meta: SnapshotMeta,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Last chunk.
        done: bool,
    },
    /// Store a received snapshot chunk (it follows the previous chunk of the same snapshot;
    /// `offset == 0` starts a new one and discards any partial one).
    ReceiveSnapshotChunk {
        /// The snapshot.
        meta: SnapshotMeta,
        /// Offset of `data`.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Install the fully received snapshot into the state machine, then report
    /// `handle_snapshot_installed(meta)`.
    InstallSnapshot {
        /// The snapshot.
        meta: SnapshotMeta,
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
    /// The current snapshot, if any.
    pub snapshot: Option<SnapshotMeta>,
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
    /// Current snapshot's last log id.
    pub snapshot: Option<LogId>,
    /// The log's first index.
    pub first_log_index: LogIndex,
    /// On the leader: matched index of every other member.
    pub replication: BTreeMap<NodeId, LogIndex>,
}

#[derive(Debug)]
struct PendingRead {
    id: u64,
    /// The heartbeat round that must be acknowledged by a quorum.
    round: u64,
    /// The commit index when the read arrived.
    index: LogIndex,
}

#[derive(Debug)]
struct Transfer {
    target: NodeId,
    deadline: Millis,
    timeout_now_sent: bool,
}

/// State only a leader has.
#[derive(Debug)]
struct LeaderState {
    progress: BTreeMap<NodeId, Progress>,
    /// Index of the blank entry that opened this term; reads wait until it is committed.
    noop_index: LogIndex,
    /// Last heartbeat round started.
    round: u64,
    /// A round must be started at the end of this step (reads are waiting on it).
    round_needed: bool,
    /// When the pending round was asked for: its start time for the lease.
    round_requested_at: Millis,
    /// Send time of recent rounds, oldest first (lease reads).
    round_sent_at: VecDeque<(u64, Millis)>,
    /// Reads waiting for their round to be acknowledged by a quorum, by round.
    reads: VecDeque<PendingRead>,
    /// Reads waiting for the first commit of this term.
    reads_before_noop: Vec<(u64, ReadMode)>,
    heartbeat_at: Millis,
    check_quorum_at: Millis,
    transfer: Option<Transfer>,
    /// A `TimeoutNow` went out this term: the target may win an election that ignores
    /// followers' leases at any time from now on, so this leader's lease is void for good.
    lease_void: bool,
}

/// Protocol bugs the simulator can switch on (feature `sim-bugs`); all off otherwise, and then
/// compiled away.
#[derive(Clone, Copy, Default)]
struct Bugs {
    commit_old_term: bool,
    vote_without_log_check: bool,
    read_without_read_index: bool,
    ack_before_durable: bool,
}

/// Bound on the history of heartbeat rounds kept for lease reads.
const ROUNDS_KEPT_MAX: usize = 64;

#[derive(Debug)]
struct Receiving {
    meta: SnapshotMeta,
    /// Next offset expected.
    offset: u64,
    /// The whole snapshot arrived; installation is under way.
    installing: bool,
}

/// A pending write and the log id the durable log ends at once it is done (clamped when a later
/// truncation removes entries it wrote).
#[derive(Debug)]
enum PendingIo {
    Log { io: IoId, last: LogId },
    Vote { io: IoId, vote: Vote },
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
pub struct Engine {
    id: NodeId,
    config: Arc<Config>,
    rng: Rng,
    role: Role,
    /// Current vote (possibly not yet durable).
    vote: Vote,
    /// The vote as last made durable.
    vote_durable: Vote,
    leader: Option<NodeId>,
    log: RaftLog,
    /// Last log id known durable, consistent with the current log.
    persisted: LogId,
    committed: LogIndex,
    applied: LogIndex,
    /// Highest index handed to an `Apply` action.
    apply_sent: LogIndex,
    memberships: MembershipLog,
    snapshot: Option<SnapshotMeta>,
    building_snapshot: bool,
    receiving: Option<Receiving>,
    election_at: Millis,
    /// When this node last heard from a leader of its term (vote stickiness, check-quorum).
    leader_contact_at: Option<Millis>,
    leader_state: Option<Box<LeaderState>>,
    /// Voters that granted our (pre-)vote.
    granted: BTreeSet<NodeId>,
    next_io: u64,
    pending_io: VecDeque<PendingIo>,
    /// Vote answers waiting for the vote to be durable.
    vote_replies: Vec<(NodeId, Term)>,
    /// Append acknowledgement waiting for durability: (leader, term, matched index).
    ack_pending: Option<(NodeId, Term, LogIndex)>,
    actions: VecDeque<Action>,
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
            role: Role::Follower,
            vote: state.vote,
            vote_durable: state.vote,
            leader: None,
            persisted: log.last_id(),
            log,
            committed: state.committed.max(state.applied.index),
            applied: state.applied.index,
            apply_sent: state.applied.index,
            memberships,
            snapshot: state.snapshot,
            building_snapshot: false,
            receiving: None,
            election_at: now,
            leader_contact_at: None,
            leader_state: None,
            granted: BTreeSet::new(),
            next_io: 0,
            pending_io: VecDeque::new(),
            vote_replies: Vec::new(),
            ack_pending: None,
            actions: VecDeque::new(),
            config,
        };
        // The state machine may be ahead of the log: a snapshot was installed and the process
        // stopped before the log was reset to it. Finish that reset now.
        if state.applied.index > LogIndex(0) && !e.log.has(state.applied) {
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
        e.role = if e.effective().membership.is_learner(id) { Role::Learner } else { Role::Follower };
        e.reset_election_timer(now);
        e.maybe_apply();
        e
    }

    // ----- accessors -------------------------------------------------------------------

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.role
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
    /// The term of the entry at `index`, if the engine knows it.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term_at(index)
    }
    /// Whether this node holds any configuration (from its log, a snapshot or its formation).
    pub fn has_configuration(&self) -> bool {
        !self.memberships.effective().membership.nodes().is_empty()
    }

    /// Whether this node may grant votes (see `Config::votes_need_configuration`). With that
    /// rule every legitimate voter holds the configuration that made it one: members formed
    /// the group with it, and a replica added later receives it (by snapshot or log) before
    /// it is promoted. A node without any is an empty replica — new, or re-created after its
    /// state was deleted — whose vote could elect a candidate lacking acknowledged entries.
    fn may_vote(&self) -> bool {
        !self.config.votes_need_configuration || self.has_configuration()
    }

    /// Whether this node has never joined a cluster (no configuration, empty log).
    pub fn is_pristine(&self) -> bool {
        self.log.last_id() == LogId::ZERO && self.vote == Vote::default() && self.snapshot.is_none()
    }

    // ----- quiescence (hosts of many groups) ----------------------------------------------
    //
    // An idle group may stop ticking: its leader stops heartbeating and its followers stop
    // counting election timeouts. The engine only judges when that is safe to start and
    // restarts the timers on wake-up; the host decides when to quiesce, tells the followers,
    // and wakes groups on a proposal, a message, or when a leader's node stops answering.
    // Timers carry liveness only, never safety, so quiet timers cannot break Raft's safety;
    // the lease is computed from acknowledged heartbeat rounds and simply lapses while quiet.

    /// On a leader whose group is idle — everything committed and applied, every follower
    /// `is_live` says is up has matched the whole log, no read, transfer, snapshot or
    /// configuration change in progress — the `(term, last index)` the followers must also be
    /// at to go quiet. `None` otherwise.
    pub fn quiesce_point(&self, is_live: impl Fn(NodeId) -> bool) -> Option<(Term, LogIndex)> {
        let l = self.leader_state.as_ref()?;
        let last = self.log.last_index();
        let idle = self.committed == last
            && self.applied == last
            && self.persisted.index == last
            && self.committed >= l.noop_index
            && l.transfer.is_none()
            && l.reads.is_empty()
            && l.reads_before_noop.is_empty()
            && !l.round_needed
            && !self.building_snapshot
            && self.effective().log_id.index <= self.committed
            && !self.effective().membership.is_joint();
        if !idle {
            return None;
        }
        let caught_up = l.progress.iter().all(|(id, p)| {
            !is_live(*id) || (p.matched == last && matches!(p.state, ReplState::Replicate) && p.inflight.is_empty())
        });
        caught_up.then_some((self.vote.term, last))
    }

    /// On a follower or learner: whether it may go quiet at the request of `leader`, which
    /// quiesced at `(term, index)`. True only if this node follows that leader in that term
    /// and has the whole log up to `index` durable, committed and applied.
    pub fn can_quiesce_follower(&self, leader: NodeId, term: Term, index: LogIndex) -> bool {
        self.leader_state.is_none()
            && self.leader == Some(leader)
            && self.vote.term == term
            && self.log.last_index() == index
            && self.persisted.index == index
            && self.committed == index
            && self.applied == index
            && self.receiving.is_none()
    }

    /// Resumes the timers of a quiet group at `now`. A leader heartbeats at once. A follower
    /// restarts its election timeout; with `leader_alive` (the host knows the leader's node
    /// answers) it also counts this as contact with the leader, so a vote request that woke
    /// it does not win an election against a leader that was merely quiet.
    pub fn wake(&mut self, now: Millis, leader_alive: bool) {
        if let Some(l) = self.leader_state.as_mut() {
            l.heartbeat_at = now;
            l.check_quorum_at = now.add_ms(self.config.election_timeout_ms_min);
            // Followers were caught up and live when the group went quiet; check-quorum
            // judges them again over the next window.
            for p in l.progress.values_mut() {
                p.recent_active = true;
            }
            return;
        }
        if leader_alive && self.leader.is_some() {
            self.leader_contact_at = Some(now);
        }
        self.reset_election_timer(now);
    }

    /// A summary for metrics.
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            id: self.id,
            role: self.role,
            term: self.vote.term,
            leader: self.leader,
            last_log_id: self.log.last_id(),
            persisted: self.persisted,
            committed: self.committed,
            applied: self.applied,
            membership: self.effective().clone(),
            committed_membership: self.committed_membership().clone(),
            snapshot: self.snapshot.as_ref().map(|s| s.last_log_id),
            first_log_index: self.log.first_index(),
            replication: self
                .leader_state
                .as_ref()
                .map(|l| l.progress.iter().map(|(id, p)| (*id, p.matched)).collect())
                .unwrap_or_default(),
        }
    }

    /// The next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        if let Some(at) = self.leader_state.as_ref().filter(|l| l.round_needed).map(|l| l.round_requested_at) {
            self.flush_rounds(at);
        }
        self.actions.pop_front()
    }

    /// Whether actions are waiting.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The earliest time `handle_timeout` must be called.
    pub fn next_deadline(&self) -> Millis {
        match &self.leader_state {
            Some(l) => {
                let mut d = l.heartbeat_at.min(l.check_quorum_at);
                if let Some(t) = &l.transfer {
                    d = d.min(t.deadline);
                }
                d
            }
            None => self.election_at,
        }
    }

    fn effective(&self) -> &StoredMembership {
        self.memberships.effective()
    }

    #[inline]
    fn bugs(&self) -> Bugs {
        #[cfg(feature = "sim-bugs")]
        {
            let b = self.config.bugs;
            Bugs {
                commit_old_term: b.commit_old_term_by_count,
                vote_without_log_check: b.vote_without_log_check,
                read_without_read_index: b.read_without_read_index,
                ack_before_durable: b.ack_before_durable,
            }
        }
        #[cfg(not(feature = "sim-bugs"))]
        Bugs::default()
    }

    // ----- API requests ------------------------------------------------------------------

    /// Forms a new cluster with `membership` as its first configuration. Call on one node, or
    /// on every initial member with the same membership. Refused on a node with any state.
    pub fn initialize(&mut self, now: Millis, membership: Membership) -> Result<(), RaftError> {
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
        let entry = Entry { log_id: LogId::new(0, 1), payload: EntryPayload::Membership(membership) };
        self.append_local(vec![entry]);
        self.role = if self.effective().membership.is_learner(self.id) { Role::Learner } else { Role::Follower };
        // Campaign soon rather than after a whole election timeout: every initial member
        // starts at once and the randomized timeout still separates them.
        self.election_at = now.add_ms(self.rng.range(0, self.config.election_timeout_ms_min / 2 + 1));
        info!(node = %self.id, membership = %self.effective().membership, "initialized");
        Ok(())
    }

    /// Appends client commands to the log (leader only). Returns the index of the first.
    /// An empty `commands` appends nothing.
    pub fn propose(&mut self, now: Millis, commands: Vec<Bytes>) -> Result<LogIndex, RaftError> {
        self.check_can_propose()?;
        let first = self.log.last_index().next();
        if commands.is_empty() {
            return Ok(first);
        }
        let term = self.vote.term;
        let entries = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| Entry {
                log_id: LogId { term, index: LogIndex(first.0 + i as u64) },
                payload: EntryPayload::Normal(c),
            })
            .collect();
        self.leader_append(now, entries);
        Ok(first)
    }

    fn check_can_propose(&self) -> Result<(), RaftError> {
        let Some(l) = &self.leader_state else {
            return Err(RaftError::NotLeader { leader: self.leader });
        };
        if l.transfer.is_some() {
            return Err(RaftError::TransferInProgress);
        }
        Ok(())
    }

    /// Adds `node` as a learner (leader only). Returns the index of the configuration entry.
    pub fn add_learner(&mut self, now: Millis, node: NodeId) -> Result<LogIndex, RaftError> {
        self.check_can_change()?;
        let mut m = self.effective().membership.clone();
        if m.is_voter(node) {
            return Err(RaftError::InvalidTarget(node, "already a voter (remove it with change_membership)"));
        }
        if m.contains(node) {
            return Ok(self.effective().log_id.index);
        }
        m.learners.insert(node);
        Ok(self.propose_membership(now, m))
    }

    /// Removes the learner on `node` (leader only): the leader stops replicating to it once the
    /// configuration entry is appended. Returns the index of that entry (the current
    /// configuration's, when `node` is no member). A voter is refused: voters leave through
    /// `change_membership`.
    pub fn remove_learner(&mut self, now: Millis, node: NodeId) -> Result<LogIndex, RaftError> {
        self.check_can_change()?;
        let mut m = self.effective().membership.clone();
        if m.is_voter(node) {
            return Err(RaftError::InvalidTarget(node, "a voter (remove it with change_membership)"));
        }
        if !m.learners.remove(&node) {
            return Ok(self.effective().log_id.index);
        }
        Ok(self.propose_membership(now, m))
    }

    /// Changes the set of voters to `voters` by joint consensus (leader only): a joint
    /// configuration is committed first, then the new one alone, automatically. Learners that
    /// become voters are promoted; voters not in `voters` leave the group. Returns the index of
    /// the joint entry.
    pub fn change_membership(&mut self, now: Millis, voters: BTreeSet<NodeId>) -> Result<LogIndex, RaftError> {
        self.check_can_change()?;
        let cur = self.effective().membership.clone();
        if voters == cur.voters {
            return Ok(self.effective().log_id.index);
        }
        if self.config.votes_need_configuration {
            // A new voter must already hold a configuration, or it could never vote: a
            // configuration whose new majority needs it would have no leader once this one
            // is gone. It holds one once it matched the entry of the configuration in effect.
            let conf_index = self.effective().log_id.index;
            let l = self.leader_state.as_ref().expect("checked");
            for v in voters.iter().filter(|v| !cur.voters.contains(v) && **v != self.id) {
                if l.progress.get(v).is_none_or(|p| p.matched < conf_index) {
                    return Err(RaftError::InvalidTarget(
                        *v,
                        "has not received the configuration yet: add it as a learner and let it catch up first",
                    ));
                }
            }
        }
        let mut learners = cur.learners.clone();
        learners.retain(|l| !voters.contains(l));
        let joint = Membership { voters, outgoing: Some(cur.voters.clone()), learners };
        joint.validate().map_err(RaftError::InvalidMembership)?;
        Ok(self.propose_membership(now, joint))
    }

    fn check_can_change(&self) -> Result<(), RaftError> {
        self.check_can_propose()?;
        let l = self.leader_state.as_ref().expect("checked");
        let eff = self.effective();
        if eff.log_id.index > self.committed || eff.membership.is_joint() || self.committed < l.noop_index {
            return Err(RaftError::ChangeInProgress);
        }
        Ok(())
    }

    fn propose_membership(&mut self, now: Millis, m: Membership) -> LogIndex {
        let log_id = LogId { term: self.vote.term, index: self.log.last_index().next() };
        info!(node = %self.id, term = %self.vote.term, %log_id, membership = %m, "proposing configuration");
        self.leader_append(now, vec![Entry { log_id, payload: EntryPayload::Membership(m) }]);
        log_id.index
    }

    /// Hands leadership to `target` (leader only): once `target` has the whole log, it is told
    /// to campaign at once. Proposals are refused meanwhile.
    pub fn transfer_leader(&mut self, now: Millis, target: NodeId) -> Result<(), RaftError> {
        let Some(l) = &mut self.leader_state else {
            return Err(RaftError::NotLeader { leader: self.leader });
        };
        if target == self.id {
            return Ok(());
        }
        if !self.memberships.effective().membership.is_voter(target) {
            return Err(RaftError::InvalidTarget(target, "not a voter"));
        }
        if l.transfer.is_some() {
            return Err(RaftError::TransferInProgress);
        }
        info!(node = %self.id, term = %self.vote.term, %target, "transferring leadership");
        l.transfer =
            Some(Transfer { target, deadline: now.add_ms(self.config.transfer_timeout_ms), timeout_now_sent: false });
        self.maybe_send_timeout_now();
        self.send_append(now, target);
        Ok(())
    }

    /// Asks for a snapshot now (if anything was applied since the last one).
    pub fn trigger_snapshot(&mut self) {
        let last = self.snapshot.as_ref().map(|s| s.last_log_id.index).unwrap_or_default();
        if !self.building_snapshot && self.applied > last {
            self.building_snapshot = true;
            self.actions.push_back(Action::BuildSnapshot);
        }
    }

    /// Registers a linearizable read with the caller's `id`. The answer comes as
    /// `Action::ReadReady` (then wait for that applied index and read the state machine) or
    /// `Action::ReadFailed`.
    pub fn read(&mut self, now: Millis, id: u64, mode: ReadMode) {
        let single = self.is_single_voter();
        let lease_ok = mode == ReadMode::Lease && self.lease_valid(now);
        let unchecked = self.bugs().read_without_read_index;
        let committed = self.committed;
        let Some(l) = &mut self.leader_state else {
            self.actions.push_back(Action::ReadFailed { id, error: RaftError::NotLeader { leader: self.leader } });
            return;
        };
        if committed < l.noop_index {
            l.reads_before_noop.push((id, mode));
            return;
        }
        if single || lease_ok || unchecked {
            self.actions.push_back(Action::ReadReady { id, index: committed });
            return;
        }
        l.reads.push_back(PendingRead { id, round: l.round + 1, index: committed });
        // The round starts when actions are next polled, so reads registered together share
        // one round of heartbeats.
        l.round_needed = true;
        l.round_requested_at = now;
    }

    fn is_single_voter(&self) -> bool {
        let m = &self.effective().membership;
        !m.is_joint() && m.voters.len() == 1 && m.voters.contains(&self.id)
    }

    /// Whether the leader lease holds at `now`: a quorum acknowledged a heartbeat round sent
    /// less than `election_timeout_ms_min - lease_clock_drift_ms` ago. Followers refuse votes
    /// for `election_timeout_ms_min` after hearing from the leader, so no other leader can
    /// exist in that window. A transfer in progress voids the lease (its election ignores
    /// that rule).
    fn lease_valid(&self, now: Millis) -> bool {
        let Some(l) = &self.leader_state else { return false };
        if !self.config.lease_read || l.transfer.is_some() || l.lease_void || self.committed < l.noop_index {
            return false;
        }
        if self.is_single_voter() {
            return true;
        }
        let round = self.effective().membership.quorum_value(|id| {
            if id == self.id {
                u64::MAX
            } else {
                l.progress.get(&id).map(|p| p.round_acked).unwrap_or(0)
            }
        });
        let Some((_, sent)) = l.round_sent_at.iter().find(|(r, _)| *r == round) else { return false };
        let lease_ms = self.config.election_timeout_ms_min - self.config.lease_clock_drift_ms;
        now < sent.add_ms(lease_ms)
    }

    // ----- events -------------------------------------------------------------------------

    /// Timers: call when `now >= next_deadline()` (calling earlier is harmless).
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.leader_state.is_some() {
            self.leader_tick(now);
        } else if now >= self.election_at {
            if self.can_campaign() {
                if self.config.pre_vote {
                    self.pre_campaign(now);
                } else {
                    self.campaign(now, false);
                }
            } else {
                self.reset_election_timer(now);
            }
        }
    }

    fn can_campaign(&self) -> bool {
        self.memberships.is_voter_in_any(self.id)
    }

    fn leader_tick(&mut self, now: Millis) {
        let (hb_due, cq_due, transfer_expired) = {
            let l = self.leader_state.as_ref().expect("leader");
            (now >= l.heartbeat_at, now >= l.check_quorum_at, l.transfer.as_ref().is_some_and(|t| now >= t.deadline))
        };
        if transfer_expired {
            let l = self.leader_state.as_mut().expect("leader");
            if let Some(t) = l.transfer.take() {
                info!(node = %self.id, term = %self.vote.term, target = %t.target, "leadership transfer timed out");
            }
        }
        if cq_due {
            let quorum_active = {
                let l = self.leader_state.as_ref().expect("leader");
                self.effective()
                    .membership
                    .is_quorum(|id| id == self.id || l.progress.get(&id).is_some_and(|p| p.recent_active))
            };
            let l = self.leader_state.as_mut().expect("leader");
            l.check_quorum_at = now.add_ms(self.config.election_timeout_ms_min);
            for p in l.progress.values_mut() {
                p.recent_active = false;
            }
            if self.config.check_quorum && !quorum_active {
                info!(node = %self.id, term = %self.vote.term, "lost contact with a quorum: stepping down");
                self.become_follower(now, self.vote.term, None);
                return;
            }
        }
        if hb_due {
            self.sync_progress_with_membership(now);
            let l = self.leader_state.as_mut().expect("leader");
            l.heartbeat_at = now.add_ms(self.config.heartbeat_interval_ms);
            l.round_needed = true;
            self.flush_rounds(now);
            self.check_stalled(now);
        }
    }

    /// Appends or snapshot chunks may have been lost: restart replication that made no
    /// progress for two heartbeat intervals.
    fn check_stalled(&mut self, now: Millis) {
        let last = self.log.last_index();
        let stall_ms = 2 * self.config.heartbeat_interval_ms;
        let resend_ms = self.config.snapshot_resend_ms;
        let current_snapshot = self.snapshot.as_ref().map(|s| s.snapshot_id);
        let mut retry = Vec::new();
        let l = self.leader_state.as_mut().expect("leader");
        for (id, p) in l.progress.iter_mut() {
            match &mut p.state {
                ReplState::Replicate
                    if p.matched < last && now.since(p.matched_at) >= stall_ms && !p.inflight.is_empty() =>
                {
                    p.become_probe();
                    retry.push(*id);
                }
                ReplState::Probe { sent } if *sent && now.since(p.matched_at) >= stall_ms => {
                    *sent = false;
                    retry.push(*id);
                }
                ReplState::Snapshot(s) if now.since(s.progress_at) >= resend_ms => {
                    if current_snapshot != Some(s.meta.snapshot_id) {
                        // A newer snapshot exists: start over with it.
                        p.become_probe();
                        retry.push(*id);
                        continue;
                    }
                    s.sent = s.acked;
                    s.all_sent = false;
                    s.progress_at = now;
                    retry.push(*id);
                }
                _ => {}
            }
        }
        for id in retry {
            self.send_append(now, id);
        }
    }

    /// A message from a peer.
    pub fn handle_message(&mut self, now: Millis, msg: Message) {
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
                // the terms of candidates that cannot win (found by the simulator, seed 508).
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
            MessageBody::Heartbeat { commit, round } => {
                self.on_leader_contact(now, from);
                if commit > self.committed {
                    self.committed = commit.min(self.log.last_index());
                    self.after_commit(now);
                }
                self.send(from, MessageBody::HeartbeatResp { round });
            }
            MessageBody::HeartbeatResp { round } => self.on_heartbeat_resp(now, from, round),
            MessageBody::TimeoutNow => {
                if self.leader == Some(from) && self.can_campaign() {
                    info!(node = %self.id, term = %self.vote.term, %from, "leadership handed over: campaigning");
                    self.campaign(now, true);
                }
            }
            MessageBody::Snapshot { meta, offset, data, done } => {
                self.on_leader_contact(now, from);
                self.on_snapshot_chunk(from, meta, offset, data, done);
            }
            MessageBody::SnapshotResp { snapshot_id, next_offset, installed } => {
                self.on_snapshot_resp(now, from, snapshot_id, next_offset, installed)
            }
        }
        self.flush_rounds(now);
    }

    fn in_lease(&self, now: Millis) -> bool {
        if !self.config.check_quorum {
            return false;
        }
        if self.leader_state.is_some() {
            return true;
        }
        // Not conditional on knowing the leader: a node that acknowledged a leader's heartbeat
        // keeps its promise not to vote for `election_timeout_ms_min` even if it learned of a
        // higher term meanwhile, or restarted (see Engine::new); lease reads rely on it.
        self.leader_contact_at.is_some_and(|t| now.since(t) < self.config.election_timeout_ms_min)
    }

    fn on_leader_contact(&mut self, now: Millis, from: NodeId) {
        debug_assert!(self.leader_state.is_none(), "two leaders in term {}", self.vote.term);
        if self.leader_state.is_some() {
            return;
        }
        if self.role != Role::Follower && self.role != Role::Learner || self.leader != Some(from) {
            self.become_follower(now, self.vote.term, Some(from));
        }
        self.leader_contact_at = Some(now);
        self.reset_election_timer(now);
    }

    // ----- elections --------------------------------------------------------------------

    fn reset_election_timer(&mut self, now: Millis) {
        let c = &self.config;
        self.election_at = now.add_ms(self.rng.range(c.election_timeout_ms_min, c.election_timeout_ms_max));
    }

    fn become_follower(&mut self, now: Millis, term: Term, leader: Option<NodeId>) {
        if term > self.vote.term {
            self.set_vote(Vote { term, voted_for: None });
        }
        if let Some(l) = self.leader_state.take() {
            info!(node = %self.id, term = %term, "leader stepping down");
            for r in l.reads {
                self.actions.push_back(Action::ReadFailed { id: r.id, error: RaftError::NotLeader { leader } });
            }
            for (id, _) in l.reads_before_noop {
                self.actions.push_back(Action::ReadFailed { id, error: RaftError::NotLeader { leader } });
            }
        }
        if leader.is_some() && self.leader != leader {
            debug!(node = %self.id, term = %term, leader = ?leader, "following");
        }
        if self.leader != leader && self.receiving.as_ref().is_some_and(|r| !r.installing) {
            // Chunks of different senders must never mix.
            self.receiving = None;
        }
        let was_follower = matches!(self.role, Role::Follower | Role::Learner);
        self.role = if self.effective().membership.is_learner(self.id) { Role::Learner } else { Role::Follower };
        self.leader = leader;
        self.granted.clear();
        // A follower that merely learns a higher term (from a vote request it may refuse) keeps
        // its election timer (Raft §5.2: only a leader's messages and granted votes reset it).
        // Otherwise candidates that cannot win, each bumping the term, would keep the node with
        // the most up-to-date log from ever campaigning (found by the simulator, seed 12 with
        // 40% clock drift and no pre-vote).
        if !was_follower || leader.is_some() {
            self.reset_election_timer(now);
        }
    }

    fn set_vote(&mut self, vote: Vote) {
        self.vote = vote;
        // Two vote changes in one step (a new term, then a vote in it) make one write.
        if let (Some(Action::SaveVote { io, vote: v }), Some(PendingIo::Vote { io: pio, vote: pv })) =
            (self.actions.back_mut(), self.pending_io.back_mut())
        {
            if io == pio {
                *v = vote;
                *pv = vote;
                return;
            }
        }
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Vote { io, vote });
        self.actions.push_back(Action::SaveVote { io, vote });
    }

    fn next_io(&mut self) -> IoId {
        self.next_io += 1;
        IoId(self.next_io)
    }

    fn pre_campaign(&mut self, now: Millis) {
        debug!(node = %self.id, term = %self.vote.term, "election timeout: pre-vote");
        self.role = Role::PreCandidate;
        self.leader = None;
        self.granted.clear();
        self.granted.insert(self.id);
        self.reset_election_timer(now);
        let term = self.vote.term.next();
        let last_log_id = self.log.last_id();
        for id in self.effective().membership.nodes() {
            if id != self.id && self.effective().membership.is_voter(id) {
                self.send_at(id, term, MessageBody::PreVote { last_log_id });
            }
        }
        self.check_election_won(now);
    }

    fn campaign(&mut self, now: Millis, transfer: bool) {
        let term = self.vote.term.next();
        info!(node = %self.id, term = %term, transfer, "campaigning");
        if let Some(l) = self.leader_state.take() {
            debug_assert!(l.transfer.is_none());
        }
        self.role = Role::Candidate;
        self.leader = None;
        self.granted.clear();
        self.set_vote(Vote { term, voted_for: Some(self.id) });
        self.reset_election_timer(now);
        let last_log_id = self.log.last_id();
        for id in self.effective().membership.nodes() {
            if id != self.id && self.effective().membership.is_voter(id) {
                self.send(id, MessageBody::Vote { last_log_id, transfer });
            }
        }
        self.check_election_won(now);
    }

    fn on_pre_vote(&mut self, now: Millis, from: NodeId, term: Term, last_log_id: LogId) {
        // `term` is the candidate's next term; our own is lower or equal.
        let up_to_date = last_log_id >= self.log.last_id() || self.bugs().vote_without_log_check;
        let grant = term > self.vote.term && !self.in_lease(now) && up_to_date && self.may_vote();
        debug!(node = %self.id, term = %self.vote.term, %from, grant, "pre-vote request");
        self.send_at(from, if grant { term } else { self.vote.term }, MessageBody::PreVoteResp { granted: grant });
    }

    fn on_pre_vote_resp(&mut self, now: Millis, from: NodeId, term: Term, granted: bool) {
        if self.role != Role::PreCandidate || term != self.vote.term.next() || !granted {
            return;
        }
        self.granted.insert(from);
        self.check_election_won(now);
    }

    fn on_vote(&mut self, now: Millis, from: NodeId, last_log_id: LogId) {
        let can_vote = self.vote.voted_for == Some(from) || (self.vote.voted_for.is_none() && self.leader.is_none());
        let up_to_date = last_log_id >= self.log.last_id() || self.bugs().vote_without_log_check;
        let configured = self.may_vote();
        if !(can_vote && up_to_date && configured) {
            debug!(node = %self.id, term = %self.vote.term, %from, can_vote, up_to_date, configured, "vote refused");
            self.send(from, MessageBody::VoteResp { granted: false });
            return;
        }
        debug!(node = %self.id, term = %self.vote.term, %from, "vote granted");
        if self.vote.voted_for != Some(from) {
            self.set_vote(Vote { term: self.vote.term, voted_for: Some(from) });
        }
        self.reset_election_timer(now);
        if self.vote_durable == self.vote {
            self.send(from, MessageBody::VoteResp { granted: true });
        } else {
            self.vote_replies.push((from, self.vote.term));
        }
    }

    fn on_vote_resp(&mut self, now: Millis, from: NodeId, granted: bool) {
        if self.role != Role::Candidate || !granted {
            return;
        }
        self.granted.insert(from);
        self.check_election_won(now);
    }

    fn check_election_won(&mut self, now: Millis) {
        let self_counts = match self.role {
            Role::PreCandidate => true,
            // A candidate acts as leader of its term only once its vote for itself (and so the
            // term) is durable: otherwise, after a crash, it could campaign in the same term
            // again and lead it twice with different logs. Checked again in handle_io_done.
            Role::Candidate if self.vote_durable != self.vote => return,
            Role::Candidate => true,
            _ => return,
        };
        let won =
            self.effective()
                .membership
                .is_quorum(|id| if id == self.id { self_counts } else { self.granted.contains(&id) });
        if !won {
            return;
        }
        if self.role == Role::PreCandidate {
            self.campaign(now, false);
        } else {
            self.become_leader(now);
        }
    }

    fn become_leader(&mut self, now: Millis) {
        info!(node = %self.id, term = %self.vote.term, last_log_id = %self.log.last_id(), "became leader");
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.granted.clear();
        let next = self.log.last_index().next();
        let progress = self
            .memberships
            .nodes_in_any()
            .into_iter()
            .filter(|id| *id != self.id)
            .map(|id| (id, Progress::new(next, now)))
            .collect();
        self.leader_state = Some(Box::new(LeaderState {
            progress,
            noop_index: next,
            round: 0,
            round_needed: false,
            round_requested_at: now,
            round_sent_at: VecDeque::new(),
            reads: VecDeque::new(),
            reads_before_noop: Vec::new(),
            heartbeat_at: now.add_ms(self.config.heartbeat_interval_ms),
            check_quorum_at: now.add_ms(self.config.election_timeout_ms_min),
            transfer: None,
            lease_void: false,
        }));
        let log_id = LogId { term: self.vote.term, index: next };
        self.leader_append(now, vec![Entry { log_id, payload: EntryPayload::Blank }]);
    }

    // ----- replication: leader side -------------------------------------------------------

    fn leader_append(&mut self, now: Millis, entries: Vec<Entry>) {
        // Only a configuration entry changes who the leader replicates to; proposals (the hot
        // path) skip rebuilding the node set. Removals whose commit drops a node are synced
        // on the next heartbeat tick.
        let reconfigures = entries.iter().any(|e| e.membership().is_some());
        self.append_local(entries);
        if reconfigures {
            self.sync_progress_with_membership(now);
        }
        let peers: Vec<NodeId> = self.leader_state.as_ref().expect("leader").progress.keys().copied().collect();
        for id in peers {
            self.send_append(now, id);
        }
        // A single voter commits as soon as its own write is durable (handle_io_done).
    }

    /// Appends to the local log and issues the write; applies configuration entries.
    fn append_local(&mut self, entries: Vec<Entry>) {
        debug_assert!(!entries.is_empty());
        self.log.append(&entries);
        for e in &entries {
            if let Some(m) = e.membership() {
                self.memberships.push(StoredMembership { log_id: e.log_id, membership: m.clone() });
            }
        }
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Log { io, last: self.log.last_id() });
        self.actions.push_back(Action::AppendEntries { io, entries });
        self.refresh_role();
    }

    /// A follower becomes a learner (or back) as its configuration changes.
    fn refresh_role(&mut self) {
        let learner = self.effective().membership.is_learner(self.id);
        match self.role {
            Role::Follower if learner => self.role = Role::Learner,
            Role::Learner if !learner => self.role = Role::Follower,
            _ => {}
        }
    }

    /// Adds progress for new members and drops it for nodes whose removal is committed.
    fn sync_progress_with_membership(&mut self, now: Millis) {
        let nodes = self.memberships.nodes_in_any();
        let next = self.log.last_index();
        let Some(l) = &mut self.leader_state else { return };
        l.progress.retain(|id, _| nodes.contains(id));
        for id in nodes {
            if id != self.id {
                l.progress.entry(id).or_insert_with(|| Progress::new(next, now));
            }
        }
    }

    /// Sends what `peer` needs next, as many messages as the window allows.
    fn send_append(&mut self, now: Millis, peer: NodeId) {
        while self.send_one_append(now, peer) {}
    }

    /// Sends one append (or starts a snapshot). Returns whether another append may follow.
    fn send_one_append(&mut self, now: Millis, peer: NodeId) -> bool {
        let committed = self.committed;
        let first = self.log.first_index();
        let last = self.log.last_index();
        let cfg = self.config.clone();
        let Some(l) = &mut self.leader_state else { return false };
        let Some(p) = l.progress.get_mut(&peer) else { return false };
        if matches!(p.state, ReplState::Snapshot(_)) {
            self.send_snapshot_chunks(peer);
            return false;
        }
        if !p.can_send(cfg.inflight_msgs_max) {
            return false;
        }
        if p.next < first {
            // The entries it needs are purged: stream a snapshot.
            match &self.snapshot {
                Some(meta) if meta.last_log_id.index.next() >= first => {
                    info!(node = %self.id, term = %self.vote.term, %peer, snapshot = %meta.last_log_id, "sending snapshot");
                    p.state = ReplState::Snapshot(SnapshotSend {
                        meta: meta.clone(),
                        acked: 0,
                        sent: 0,
                        all_sent: false,
                        progress_at: now,
                    });
                    p.inflight.clear();
                    self.send_snapshot_chunks(peer);
                }
                _ => self.trigger_snapshot(),
            }
            return false;
        }
        let prev = self.log.id_at(p.next.prev()).expect("prev is in the log");
        let entries = if p.next > last {
            if matches!(p.state, ReplState::Replicate) {
                return false; // nothing new; commit notices and heartbeats cover the rest
            }
            Vec::new()
        } else if let Some(e) = self.log.cached(p.next, cfg.append_entries_max, cfg.append_bytes_max) {
            e
        } else {
            // Not cached: those entries are durable (the cache keeps every entry that is
            // not), so storage can load them.
            let to = self.log.cache_first().prev().min(LogIndex(p.next.0 + cfg.append_entries_max as u64 - 1));
            p.loading = true;
            self.actions.push_back(Action::LoadEntries { peer, from: p.next, to, bytes_max: cfg.append_bytes_max });
            return false;
        };
        Self::emit_append(&mut self.actions, self.id, self.vote.term, peer, p, prev, entries, committed);
        matches!(p.state, ReplState::Replicate) && p.next <= last
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_append(
        actions: &mut VecDeque<Action>,
        from: NodeId,
        term: Term,
        peer: NodeId,
        p: &mut Progress,
        prev: LogId,
        entries: Vec<Entry>,
        committed: LogIndex,
    ) {
        let last = entries.last().map(|e| e.log_id.index).unwrap_or(prev.index);
        p.sent(last);
        p.commit_sent = p.commit_sent.max(committed.min(last));
        actions.push_back(Action::Send(Message {
            from,
            to: peer,
            term,
            body: MessageBody::Append { prev, entries, commit: committed },
        }));
    }

    /// Entries requested with `LoadEntries` for `peer`.
    pub fn handle_entries_loaded(&mut self, now: Millis, peer: NodeId, entries: Vec<Entry>) {
        let committed = self.committed;
        let Some(l) = &mut self.leader_state else { return };
        let Some(p) = l.progress.get_mut(&peer) else { return };
        p.loading = false;
        let usable = entries.first().is_some_and(|e| e.log_id.index == p.next)
            && entries.iter().all(|e| self.log.has(e.log_id))
            && p.can_send(self.config.inflight_msgs_max);
        if usable {
            let prev = self.log.id_at(p.next.prev());
            if let Some(prev) = prev {
                Self::emit_append(&mut self.actions, self.id, self.vote.term, peer, p, prev, entries, committed);
            }
        }
        // Whether used or stale (the log moved meanwhile), carry on from the current state.
        self.send_append(now, peer);
        self.flush_rounds(now);
    }

    fn on_append_resp(&mut self, now: Millis, from: NodeId, r: AppendResult) {
        let last = self.log.last_index();
        let Some(l) = &mut self.leader_state else { return };
        let Some(p) = l.progress.get_mut(&from) else { return };
        p.recent_active = true;
        match r {
            AppendResult::Success { matched } => {
                if matched > last {
                    debug!(node = %self.id, %from, %matched, "ack beyond our log: ignored");
                    return;
                }
                let moved = p.ack(matched, now);
                if matches!(p.state, ReplState::Probe { .. }) {
                    p.state = ReplState::Replicate;
                    p.next = p.matched.next();
                    p.inflight.clear();
                }
                if moved {
                    self.maybe_commit(now);
                    self.maybe_send_timeout_now();
                }
                self.send_append(now, from);
                self.notify_commit();
            }
            AppendResult::Conflict { rejected, hint } => {
                let stale = match p.state {
                    ReplState::Replicate => rejected.index <= p.matched,
                    ReplState::Probe { .. } => rejected.index != p.next.prev(),
                    ReplState::Snapshot(_) => true,
                };
                if stale {
                    return;
                }
                // Skip the whole conflicting term at once: find our last entry at or before
                // the hint whose term is at most the hint's.
                let purged = self.log.last_purged();
                let probe = if hint.index > purged.index {
                    self.log.find_conflict_by_term(hint.index, hint.term).index
                } else if hint == purged {
                    hint.index
                } else {
                    // The follower diverges inside what we purged: only a snapshot helps.
                    hint.index.min(purged.index.prev())
                };
                p.become_probe();
                p.next = probe.min(rejected.index.prev()).next().max(p.matched.next());
                debug!(node = %self.id, %from, %rejected, %hint, next = %p.next, "append rejected: backing off");
                self.send_append(now, from);
            }
        }
    }

    fn on_heartbeat_resp(&mut self, now: Millis, from: NodeId, round: u64) {
        let last = self.log.last_index();
        let Some(l) = &mut self.leader_state else { return };
        let Some(p) = l.progress.get_mut(&from) else { return };
        p.recent_active = true;
        p.round_acked = p.round_acked.max(round);
        let lagging = p.matched < last;
        if let ReplState::Probe { sent } = &mut p.state {
            // A lost probe would otherwise stall the follower forever.
            *sent = false;
        }
        self.advance_reads();
        if lagging {
            self.send_append(now, from);
        }
    }

    /// Starts a heartbeat round if one is needed. Every heartbeat carries the round number;
    /// a quorum acknowledging round `r` proves leadership as of the round's start.
    fn flush_rounds(&mut self, now: Millis) {
        let committed = self.committed;
        let Some(l) = &mut self.leader_state else { return };
        if !l.round_needed {
            return;
        }
        l.round_needed = false;
        l.round += 1;
        l.round_sent_at.push_back((l.round, now));
        if l.round_sent_at.len() > ROUNDS_KEPT_MAX {
            l.round_sent_at.pop_front();
        }
        for (id, p) in &l.progress {
            self.actions.push_back(Action::Send(Message {
                from: self.id,
                to: *id,
                term: self.vote.term,
                body: MessageBody::Heartbeat { commit: committed.min(p.matched), round: l.round },
            }));
        }
        // With no other voter the round is acknowledged at once.
        self.advance_reads();
    }

    fn advance_reads(&mut self) {
        let Some(l) = &mut self.leader_state else { return };
        if l.reads.is_empty() {
            return;
        }
        let id = self.id;
        let acked = self.memberships.effective().membership.quorum_value(|n| {
            if n == id {
                u64::MAX
            } else {
                l.progress.get(&n).map(|p| p.round_acked).unwrap_or(0)
            }
        });
        while l.reads.front().is_some_and(|r| r.round <= acked) {
            let r = l.reads.pop_front().expect("checked");
            self.actions.push_back(Action::ReadReady { id: r.id, index: r.index });
        }
    }

    fn maybe_send_timeout_now(&mut self) {
        let last = self.log.last_index();
        let term = self.vote.term;
        let Some(l) = &mut self.leader_state else { return };
        let Some(t) = &mut l.transfer else { return };
        if t.timeout_now_sent || l.progress.get(&t.target).is_none_or(|p| p.matched < last) {
            return;
        }
        t.timeout_now_sent = true;
        l.lease_void = true;
        let target = t.target;
        self.actions.push_back(Action::Send(Message {
            from: self.id,
            to: target,
            term,
            body: MessageBody::TimeoutNow,
        }));
    }

    /// Advances the commit index to what a (joint) quorum holds, if that entry is of the
    /// current term (Raft §5.4.2: earlier terms' entries commit only indirectly).
    fn maybe_commit(&mut self, now: Millis) {
        let Some(l) = &self.leader_state else { return };
        let own = if self.bugs().ack_before_durable { self.log.last_index() } else { self.persisted.index };
        let id = self.id;
        let quorum = self.effective().membership.quorum_value(|n| {
            if n == id {
                own
            } else {
                l.progress.get(&n).map(|p| p.matched).unwrap_or_default()
            }
        });
        if quorum <= self.committed {
            return;
        }
        if self.log.term_at(quorum) != Some(self.vote.term) && !self.bugs().commit_old_term {
            return;
        }
        self.committed = quorum;
        trace!(node = %self.id, term = %self.vote.term, committed = %quorum, "committed");
        self.after_commit(now);
    }

    /// Tells followers that matched entries they do not know are committed, so they apply
    /// without waiting for the next heartbeat. Appends carry the commit index too, so this
    /// only sends to followers that have nothing else coming.
    fn notify_commit(&mut self) {
        let committed = self.committed;
        let Some(l) = &mut self.leader_state else { return };
        for (peer, p) in l.progress.iter_mut() {
            let known = committed.min(p.matched);
            if known > p.commit_sent && matches!(p.state, ReplState::Replicate) {
                if let Some(prev) = self.log.id_at(p.matched) {
                    p.commit_sent = known;
                    self.actions.push_back(Action::Send(Message {
                        from: self.id,
                        to: *peer,
                        term: self.vote.term,
                        body: MessageBody::Append { prev, entries: Vec::new(), commit: committed },
                    }));
                }
            }
        }
    }

    /// Work after the commit index advanced (any role).
    fn after_commit(&mut self, now: Millis) {
        self.memberships.compact(self.committed);
        self.maybe_apply();
        let Some(l) = &mut self.leader_state else { return };
        if self.committed >= l.noop_index && !l.reads_before_noop.is_empty() {
            let waiting = std::mem::take(&mut l.reads_before_noop);
            for (id, mode) in waiting {
                self.read(now, id, mode);
            }
        }
        let eff = self.memberships.effective().clone();
        if eff.log_id.index <= self.committed {
            if let Some(_outgoing) = &eff.membership.outgoing {
                // The joint configuration is committed: move to the new one alone.
                let m = Membership {
                    voters: eff.membership.voters.clone(),
                    outgoing: None,
                    learners: eff.membership.learners.clone(),
                };
                self.propose_membership(now, m);
            } else if !eff.membership.voters.contains(&self.id) {
                info!(node = %self.id, term = %self.vote.term, "removed from the configuration: stepping down");
                self.become_follower(now, self.vote.term, None);
            }
        }
    }

    // ----- replication: follower side -----------------------------------------------------

    fn on_append(&mut self, now: Millis, from: NodeId, prev: LogId, entries: Vec<Entry>, commit: LogIndex) {
        // Input from the network: check the shape before trusting it.
        let well_formed = entries.iter().enumerate().all(|(i, e)| {
            prev.index.0.checked_add(i as u64 + 1) == Some(e.log_id.index.0)
                && e.log_id.term >= prev.term
                && e.log_id.term <= self.vote.term
        }) && entries.windows(2).all(|w| w[0].log_id.term <= w[1].log_id.term);
        if !well_formed {
            warn!(node = %self.id, %from, %prev, "malformed append dropped");
            return;
        }
        if prev.index < self.committed {
            // Everything up to our commit index matches the leader's log already. Keep only
            // the entries after it.
            let skip = (self.committed.0 - prev.index.0) as usize;
            if skip >= entries.len() {
                self.ack(from, self.committed);
                return;
            }
            let prev = self.log.id_at(self.committed).expect("committed entry is in the log");
            let rest = entries[skip..].to_vec();
            return self.on_append(now, from, prev, rest, commit);
        }
        if !self.log.has(prev) {
            let hint_index = prev.index.min(self.log.last_index());
            let hint = self.log.find_conflict_by_term(hint_index, prev.term);
            debug!(node = %self.id, term = %self.vote.term, %prev, %hint, "append rejected");
            self.send(from, MessageBody::AppendResp(AppendResult::Conflict { rejected: prev, hint }));
            return;
        }
        let matched = LogIndex(prev.index.0 + entries.len() as u64);
        // Find the first entry we do not already have.
        let mut new_from = entries.len();
        for (i, e) in entries.iter().enumerate() {
            match self.log.term_at(e.log_id.index) {
                Some(t) if t == e.log_id.term => continue,
                Some(_) => {
                    assert!(
                        e.log_id.index > self.committed,
                        "leader conflicts with a committed entry at {}",
                        e.log_id.index
                    );
                    info!(node = %self.id, term = %self.vote.term, from = %e.log_id.index, "truncating conflicting entries");
                    self.truncate_local(e.log_id.index);
                    new_from = i;
                    break;
                }
                None => {
                    new_from = i;
                    break;
                }
            }
        }
        if new_from < entries.len() {
            let new: Vec<Entry> = entries[new_from..].to_vec();
            self.append_local(new);
        }
        let new_commit = commit.min(matched);
        if new_commit > self.committed {
            self.committed = new_commit;
            self.after_commit(now);
        }
        self.ack(from, matched);
    }

    fn truncate_local(&mut self, index: LogIndex) {
        self.log.truncate_from(index);
        self.memberships.truncate_from(index);
        let keep = self.log.last_id();
        if self.persisted.index >= index {
            self.persisted = keep;
        }
        for p in self.pending_io.iter_mut() {
            if let PendingIo::Log { last, .. } = p {
                if last.index >= index {
                    *last = keep;
                }
            }
        }
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Log { io, last: keep });
        self.actions.push_back(Action::TruncateFrom { io, index });
        self.refresh_role();
    }

    /// Acknowledges entries up to `matched`, now if durable, else once durable.
    fn ack(&mut self, leader: NodeId, matched: LogIndex) {
        if self.persisted.index >= matched || self.bugs().ack_before_durable {
            self.send(leader, MessageBody::AppendResp(AppendResult::Success { matched }));
        } else {
            let term = self.vote.term;
            match &mut self.ack_pending {
                Some((l, t, m)) if *l == leader && *t == term => *m = (*m).max(matched),
                slot => *slot = Some((leader, term, matched)),
            }
        }
    }

    // ----- storage completions -----------------------------------------------------------

    /// Every write up to and including `io` is durable.
    pub fn handle_io_done(&mut self, now: Millis, io: IoId) {
        while self.pending_io.front().is_some_and(|p| match p {
            PendingIo::Log { io: i, .. } | PendingIo::Vote { io: i, .. } => *i <= io,
        }) {
            match self.pending_io.pop_front().expect("checked") {
                // `last` is clamped by every truncation issued after this write, so it is
                // always a prefix of the current log.
                PendingIo::Log { last, .. } => self.persisted = last,
                PendingIo::Vote { vote, .. } => self.vote_durable = vote,
            }
        }
        // Vote answers waiting for durability.
        if !self.vote_replies.is_empty() && self.vote_durable == self.vote {
            for (to, term) in std::mem::take(&mut self.vote_replies) {
                if term == self.vote.term && self.vote.voted_for == Some(to) {
                    self.send(to, MessageBody::VoteResp { granted: true });
                }
            }
        }
        if let Some((leader, term, matched)) = self.ack_pending {
            if term != self.vote.term {
                self.ack_pending = None;
            } else if self.persisted.index >= matched {
                self.ack_pending = None;
                self.send(leader, MessageBody::AppendResp(AppendResult::Success { matched }));
            }
        }
        match self.role {
            Role::Candidate => self.check_election_won(now),
            Role::Leader => {
                self.maybe_commit(now);
                self.notify_commit();
            }
            _ => {}
        }
        self.maybe_apply();
        self.evict_cache();
        self.flush_rounds(now);
    }

    fn maybe_apply(&mut self) {
        if self.receiving.as_ref().is_some_and(|r| r.installing) {
            return;
        }
        let to = self.committed.min(self.persisted.index);
        if to > self.apply_sent {
            let first = self.apply_sent.next();
            let entries = self.log.cached_range(first, to);
            self.actions.push_back(Action::Apply { first, last: to, entries });
            self.apply_sent = to;
        }
    }

    /// Drops cached entries no longer needed: durable, applied and (on a leader) sent to and
    /// matched by every follower; and beyond the byte budget, any durable entry.
    fn evict_cache(&mut self) {
        let mut keep_after = self.persisted.index.min(self.apply_sent);
        if let Some(l) = &self.leader_state {
            let min_matched = l.progress.values().map(|p| p.matched).min().unwrap_or(keep_after);
            let over_budget = self.log.cache_bytes() > self.config.entry_cache_bytes_max;
            if !over_budget {
                keep_after = keep_after.min(min_matched);
            }
        }
        self.log.evict_cache_up_to(keep_after);
    }

    /// The state machine applied everything up to `index`.
    pub fn handle_applied(&mut self, _now: Millis, index: LogIndex) {
        if index > self.applied {
            self.applied = index;
        }
        self.evict_cache();
        let since = self.snapshot.as_ref().map(|s| s.last_log_id.index).unwrap_or_default();
        let threshold = self.config.snapshot_threshold_entries;
        if threshold > 0 && self.applied.0.saturating_sub(since.0) >= threshold {
            self.trigger_snapshot();
        }
    }

    // ----- snapshots -----------------------------------------------------------------------

    /// The state machine finished building the snapshot asked for by `BuildSnapshot`.
    pub fn handle_snapshot_built(&mut self, now: Millis, meta: SnapshotMeta) {
        self.building_snapshot = false;
        if self.snapshot.as_ref().is_some_and(|s| s.last_log_id >= meta.last_log_id) {
            return;
        }
        info!(node = %self.id, term = %self.vote.term, snapshot = %meta.last_log_id, "snapshot built");
        let upto = meta.last_log_id.index.0.saturating_sub(self.config.log_keep_entries_after_snapshot);
        self.snapshot = Some(meta);
        if upto > self.log.last_purged().index.0 {
            if let Some(id) = self.log.id_at(LogIndex(upto)) {
                self.purge_local(id);
            }
        }
        // Followers waiting for a snapshot can get this one.
        let waiting: Vec<NodeId> = self
            .leader_state
            .as_ref()
            .map(|l| l.progress.iter().filter(|(_, p)| p.next < self.log.first_index()).map(|(id, _)| *id).collect())
            .unwrap_or_default();
        for id in waiting {
            self.send_append(now, id);
        }
    }

    fn purge_local(&mut self, upto: LogId) {
        self.log.purge_up_to(upto);
        let io = self.next_io();
        self.pending_io.push_back(PendingIo::Log { io, last: self.log.last_id() });
        self.actions.push_back(Action::PurgeUpTo { io, log_id: upto });
    }

    /// Resets the log to start right after `snapshot_last` (the log disagrees with it or ends
    /// before it).
    fn reset_log_to(&mut self, snapshot_last: LogId) {
        if self.log.last_index() >= self.log.first_index() && !self.log.has(snapshot_last) {
            let first = self.log.first_index();
            self.truncate_local(first);
        }
        self.purge_local(snapshot_last);
        if self.persisted.index < snapshot_last.index {
            self.persisted = snapshot_last;
        }
    }

    fn send_snapshot_chunks(&mut self, peer: NodeId) {
        let chunk = self.config.snapshot_chunk_bytes as u64;
        let window = chunk * self.config.snapshot_chunks_in_flight_max as u64;
        let Some(l) = &mut self.leader_state else { return };
        let Some(p) = l.progress.get_mut(&peer) else { return };
        let ReplState::Snapshot(s) = &mut p.state else { return };
        let size = s.meta.size_bytes;
        while !s.all_sent && s.sent - s.acked < window {
            let len = chunk.min(size - s.sent);
            let done = s.sent + len == size;
            self.actions.push_back(Action::SendSnapshotChunk {
                to: peer,
                meta: s.meta.clone(),
                offset: s.sent,
                len,
                done,
            });
            s.sent += len;
            s.all_sent = done;
        }
    }

    fn on_snapshot_resp(
        &mut self,
        now: Millis,
        from: NodeId,
        snapshot_id: u64,
        next_offset: u64,
        installed: Option<LogId>,
    ) {
        let current = self.snapshot.clone();
        let Some(l) = &mut self.leader_state else { return };
        let Some(p) = l.progress.get_mut(&from) else { return };
        p.recent_active = true;
        let ReplState::Snapshot(s) = &mut p.state else { return };
        if s.meta.snapshot_id != snapshot_id {
            return;
        }
        if let Some(id) = installed {
            info!(node = %self.id, term = %self.vote.term, peer = %from, snapshot = %id, "snapshot installed on follower");
            p.ack(id.index, now);
            p.become_probe();
            self.send_append(now, from);
            return;
        }
        if next_offset > s.acked {
            s.acked = next_offset.min(s.sent);
            s.progress_at = now;
        } else if next_offset == s.acked && next_offset < s.sent {
            // The follower reports a gap: a chunk was lost. Resend from there now rather than
            // after the resend timeout.
            s.sent = next_offset;
            s.all_sent = false;
        } else if next_offset < s.acked {
            // The follower lost what it had (it restarted): start over from its offset.
            s.acked = next_offset;
            s.sent = next_offset;
            s.all_sent = false;
            s.progress_at = now;
        }
        // A newer snapshot replaces a stale transfer that has to restart anyway.
        if s.acked == 0 && current.as_ref().is_some_and(|c| c.snapshot_id != s.meta.snapshot_id) {
            p.become_probe();
            self.send_append(now, from);
            return;
        }
        self.send_snapshot_chunks(from);
    }

    fn on_snapshot_chunk(&mut self, from: NodeId, meta: SnapshotMeta, offset: u64, data: Bytes, done: bool) {
        if meta.last_log_id.index <= self.committed {
            // Already have all of it (or installed it earlier).
            let installed = self.log.id_at(self.committed).unwrap_or(self.log.last_purged());
            self.send(
                from,
                MessageBody::SnapshotResp {
                    snapshot_id: meta.snapshot_id,
                    next_offset: meta.size_bytes,
                    installed: Some(installed),
                },
            );
            return;
        }
        if self.receiving.as_ref().is_some_and(|r| r.installing) {
            // Installing a snapshot: nothing else may start until it is done (a second one
            // would race the first in the state machine). The sender retries.
            return;
        }
        // Validate before use: a chunk must lie inside the snapshot, and `done` exactly at its end.
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > meta.size_bytes || (done != (e == meta.size_bytes))) {
            warn!(node = %self.id, %from, offset, len = data.len(), size = meta.size_bytes, "malformed snapshot chunk dropped");
            return;
        }
        let same = self.receiving.as_ref().is_some_and(|r| r.meta == meta);
        if !same {
            if offset != 0 {
                self.send(
                    from,
                    MessageBody::SnapshotResp { snapshot_id: meta.snapshot_id, next_offset: 0, installed: None },
                );
                return;
            }
            self.receiving = Some(Receiving { meta: meta.clone(), offset: 0, installing: false });
        }
        let r = self.receiving.as_mut().expect("set above");
        if r.installing {
            return;
        }
        if offset != r.offset {
            let expected = r.offset;
            self.send(
                from,
                MessageBody::SnapshotResp { snapshot_id: meta.snapshot_id, next_offset: expected, installed: None },
            );
            return;
        }
        r.offset += data.len() as u64;
        let next_offset = r.offset;
        self.actions.push_back(Action::ReceiveSnapshotChunk { meta: meta.clone(), offset, data });
        if done {
            r.installing = true;
            self.actions.push_back(Action::InstallSnapshot { meta });
        } else {
            self.send(from, MessageBody::SnapshotResp { snapshot_id: meta.snapshot_id, next_offset, installed: None });
        }
    }

    /// The state machine installed the snapshot asked for by `InstallSnapshot`.
    pub fn handle_snapshot_installed(&mut self, _now: Millis, meta: SnapshotMeta) {
        let was_receiving = self.receiving.take();
        let last = meta.last_log_id;
        info!(node = %self.id, term = %self.vote.term, snapshot = %last, "snapshot installed");
        if last.index > self.applied {
            if self.log.has(last) {
                self.purge_local(last);
            } else {
                self.reset_log_to(last);
            }
            self.committed = self.committed.max(last.index);
            self.applied = last.index;
            self.apply_sent = last.index;
            self.memberships.reset_to(meta.membership.clone());
            self.refresh_role();
            self.snapshot = Some(meta.clone());
        }
        if let (Some(leader), Some(_)) = (self.leader, was_receiving) {
            self.send(
                leader,
                MessageBody::SnapshotResp {
                    snapshot_id: meta.snapshot_id,
                    next_offset: meta.size_bytes,
                    installed: Some(last),
                },
            );
        }
        self.maybe_apply();
    }

    // ----- helpers -------------------------------------------------------------------------

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.send_at(to, self.vote.term, body);
    }

    fn send_at(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.actions.push_back(Action::Send(Message { from: self.id, to, term, body }));
    }
}

#[cfg(test)]
mod tests;
