//! The meta state machine: the shard map plus the nodes, changed only by [`MetaCommand`]s
//! (replicated by the meta Raft group). A command that does not fit the current state is
//! refused with a clear error and changes nothing.
//!
//! Replica moves in progress live here too ([`MetaState::moves`], see [`crate::plan`]): a plan
//! kept in the replicated state survives restarts and changes of meta leader, and every meta
//! replica checks each step against the same map. Recent moves are kept here as well, so the
//! balancer's moves-per-minute limit and its cool-down of moved shards hold across meta
//! leaders.
//!
//! Shard merges in progress live here as well ([`MetaState::merges`], see [`crate::merge`]).

use crate::map::{Epoch, NodeId, Replica, ReplicaRole, ShardDescriptor, ShardId, ShardMap};
use crate::merge::{MergeId, MergePhase, MergePlan};
use crate::plan::{MovePlan, MoveStep, PlanAction, PlanError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use thiserror::Error;

/// The window of the moves-per-minute limit.
pub const MOVE_WINDOW_MS: u64 = 60_000;

/// How long a started move is remembered ([`MetaState::recent_moves`]): the moves-per-minute
/// limit and the balancer's cool-down of a moved shard look no further back than this.
pub const MOVE_HISTORY_MS: u64 = 3_600_000;

/// Move records kept at most (older ones are dropped first). Far above any sane moves-per-hour
/// rate; it only bounds memory if moves are started by hand in bulk.
pub const MOVE_HISTORY_LEN_MAX: usize = 4096;

/// A move that was started (kept for [`MOVE_HISTORY_MS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// The shard.
    pub shard: ShardId,
    /// Where the replica came from.
    pub from: NodeId,
    /// Where it went.
    pub to: NodeId,
    /// When the proposer decided the move.
    pub started_ms: u64,
}

/// A position in a shard's Raft log (as reported by nodes; placement only compares them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogIndex(pub u64);

/// What a node reports on each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Bytes of data per shard replica on the node.
    pub shard_bytes: BTreeMap<ShardId, u64>,
    /// Shards the node currently leads.
    pub leading: Vec<ShardId>,
    /// Applied index per shard replica on the node: tells whether a learner has caught up.
    pub applied: BTreeMap<ShardId, LogIndex>,
    /// A key near the middle of each shard's data, as the node's storage estimates it: where
    /// to split a shard that grew too big. Without one, no split is suggested.
    pub split_keys: BTreeMap<ShardId, Vec<u8>>,
    /// Client requests per second the node served over its last report interval. Shown to
    /// operators; the balancer weighs leaders by [`NodeReport::shard_load`] instead, which
    /// says which shards the requests went to.
    pub requests_per_s: u64,
    /// The committed Raft configuration of each shard the node leads: what move plans wait
    /// for, and what confirms that a removed replica may be deleted.
    pub confs: BTreeMap<ShardId, GroupConf>,
    /// The busiest shards the node leads (at most [`crate::load::LOAD_REPORT_SHARDS_MAX`]):
    /// their request rates, and a split key for those hot long enough (load-based splitting,
    /// [`crate::load`]). Left out of this type's serialized form: that form is part of
    /// stored meta records (a node's record keeps an empty report, and format 1 whole
    /// reports), which must stay readable; the node sends it beside the report instead.
    #[serde(skip)]
    pub shard_load: BTreeMap<ShardId, ShardLoad>,
    /// Requests per second over every shard the node leads, from the same windows as
    /// [`NodeReport::shard_load`] but not cut to the busiest: the node's load when leaders
    /// are balanced (its lukewarm shards count too). Left out of the serialized form and sent
    /// beside the report, as `shard_load` is.
    #[serde(skip)]
    pub led_requests_per_s: u64,
}

/// One shard's request load, as its leader measured it over its last window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLoad {
    /// Requests (reads and writes) per second.
    pub requests_per_s: u64,
    /// Where to split the shard so that both halves take about the same share of the
    /// requests, chosen from sampled request keys; only once the shard has stayed above the
    /// load-split threshold long enough, and never where one side would take almost nothing.
    pub split_key: Option<Vec<u8>>,
    /// The shard's epoch over the window measured: a split key of an older epoch was sampled
    /// over another range (a report sent before a split, received after it) and is not used.
    pub epoch: Epoch,
}

/// A shard group's committed Raft configuration, as its leader reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConf {
    /// The log index of the entry that carried it.
    pub index: LogIndex,
    /// Voters (both halves while joint).
    pub voters: BTreeSet<NodeId>,
    /// Learners.
    pub learners: BTreeSet<NodeId>,
    /// Whether it is a joint configuration (a change half done).
    pub joint: bool,
}

impl GroupConf {
    /// Whether `node` takes part (voter or learner).
    pub fn contains(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

/// A replica removed from the map, kept until its node has deleted it. `confirmed` is the
/// index of a committed configuration of the shard's group without the node, once its leader
/// reported one: only then may the node delete its replica (Raft no longer counts it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// Committed configuration index without the node, once known.
    pub confirmed: Option<LogIndex>,
}

/// A node as the meta state knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node.
    pub id: NodeId,
    /// Where it listens (opaque to placement).
    pub addr: String,
    /// Its last report, shared: the meta leader lays the live reports over a copy of the
    /// state for every op, and a report may hold an entry for each of 100,000 shards.
    /// Serialized as the report itself.
    pub report: Arc<NodeReport>,
    /// Being drained: the balancer moves everything off it.
    pub draining: bool,
}

/// A change to the meta state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create the first shard, over the whole keyspace, on `nodes` (voters).
    Bootstrap {
        /// Initial replicas.
        nodes: Vec<NodeId>,
    },
    /// Add (or update the address of) a node.
    RegisterNode {
        /// The node.
        node: NodeId,
        /// Its address.
        addr: String,
    },
    /// A node's periodic report.
    Heartbeat {
        /// The node.
        node: NodeId,
        /// Its report.
        report: NodeReport,
    },
    /// Split `shard` (as of `epoch`) at `key`.
    Split {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// First key of the new right-hand shard.
        key: Vec<u8>,
    },
    /// Add a learner replica on `node`.
    AddLearner {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// Make the learner on `node` a voter.
    Promote {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// Remove the replica on `node`.
    RemoveReplica {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// Ask the replicas of `shard` to hand leadership to the voter on `node`. Recorded until a
    /// heartbeat of `node` reports it leads the shard.
    TransferLeader {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The voter to lead.
        node: NodeId,
    },
    /// Start or stop draining a node.
    SetDraining {
        /// The node.
        node: NodeId,
        /// Draining or not.
        draining: bool,
    },
    /// One joint-consensus change: the learner on `promote` becomes a voter and the voter on
    /// `demote` a learner, so the number of voters stays the same.
    SwapVoter {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// A learner of the shard.
        promote: NodeId,
        /// A voter of the shard.
        demote: NodeId,
    },
    /// Record a replica move (at its first step) and the time it started.
    StartMove {
        /// The epoch of the shard the move was decided at.
        epoch: Epoch,
        /// The plan.
        plan: MovePlan,
        /// When the proposer decided the move (counts toward the moves-per-minute limit).
        now_ms: u64,
    },
    /// Run the current step of the move of `shard` (see [`MovePlan::next`]).
    AdvanceMove {
        /// The shard.
        shard: ShardId,
        /// The step the proposer saw; a mismatch means the command is a duplicate.
        step: MoveStep,
    },
    /// Drop the move of `shard`. A learner the move left on its target is removed too.
    AbortMove {
        /// The shard.
        shard: ShardId,
    },
    /// Unsafe recovery: `dead` are lost for good (never registered again); each shard of
    /// `kept` was forced onto its replica on that node; every shard that had a replica on a
    /// dead node gets voters on live nodes again (see `unsafe_recovery.rs`).
    RemoveDeadNodes {
        /// The nodes lost for good.
        dead: Vec<NodeId>,
        /// Shards that lost their quorum, each with the node of the replica it was forced onto.
        kept: Vec<(ShardId, NodeId)>,
    },
    // The merge commands come last: the variants before them keep their serialized tags.
    /// Record a merge of `right` into `left`, its left neighbour, in phase
    /// [`MergePhase::Freezing`] (see [`crate::merge`]); the map is unchanged. Answered with
    /// [`MetaOutcome::Merge`], which carries the plan and its new id.
    BeginMerge {
        /// The shard that stays.
        left: ShardId,
        /// The epoch of `left` the decision was made at.
        left_epoch: Epoch,
        /// The shard that goes: it must start where `left` ends.
        right: ShardId,
        /// The epoch of `right` the decision was made at.
        right_epoch: Epoch,
        /// When the proposer decided the merge (a freeze that takes too long is aborted).
        now_ms: u64,
    },
    /// Commit the merge of `left`: sent by the right shard's leader once the right shard
    /// applied its freeze entry, at `freeze_term` and `freeze_index`, and every voter of it
    /// holds that entry. The map merges; the plan goes to [`MergePhase::Committed`].
    CommitMerge {
        /// The plan's left shard.
        left: ShardId,
        /// The plan's id: another id means a duplicate or late command.
        id: MergeId,
        /// The term of the right shard's freeze entry.
        freeze_term: u64,
        /// The index of the right shard's freeze entry.
        freeze_index: LogIndex,
    },
    /// Give up the merge of `left` while it is still freezing (refused once committed: a
    /// committed merge is never undone). The right shard's leader then thaws it.
    AbortMerge {
        /// The plan's left shard.
        left: ShardId,
        /// The plan's id.
        id: MergeId,
    },
    /// Drop the plan of `left` once its work is done: after a commit, the left shard's leader
    /// absorbed the right shard; after an abort, the right shard's leader thawed it.
    FinishMerge {
        /// The plan's left shard.
        left: ShardId,
        /// The plan's id.
        id: MergeId,
    },
    /// Record that `node` formed every bootstrap shard placed on it ([`BootstrapRecord`]).
    /// Nothing to record in a cluster bootstrapped before the record existed.
    BootstrapFormed {
        /// The node.
        node: NodeId,
    },
}

/// What the bootstrap made that its voters form their replicas by, kept for the cluster's
/// life: a voter forms a bootstrap shard with these first voters, and only once (a node the
/// record names as formed, whose data directory says otherwise, was wiped and must not vote
/// again under its id).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapRecord {
    /// The first voters of every bootstrap shard.
    pub voters: BTreeSet<NodeId>,
    /// The nodes that formed every bootstrap shard placed on them.
    pub formed: BTreeSet<NodeId>,
}

/// [`MetaState`] as serialized before `bootstrap` existed: read with no record (a cluster
/// bootstrapped before it).
#[derive(Deserialize)]
struct MetaStateBeforeBootstrap {
    map: ShardMap,
    nodes: BTreeMap<NodeId, NodeInfo>,
    next_shard_id: u64,
    transfers: BTreeMap<ShardId, NodeId>,
    moves: BTreeMap<ShardId, MovePlan>,
    recent_moves: VecDeque<MoveRecord>,
    tombstones: BTreeMap<ShardId, BTreeMap<NodeId, Tombstone>>,
    removed: BTreeSet<NodeId>,
    restored_from: Option<String>,
    merges: BTreeMap<ShardId, MergePlan>,
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum MetaError {
    /// Bootstrap on a map that already has shards.
    #[error("already bootstrapped")]
    AlreadyBootstrapped,
    /// A command needs a bootstrapped map.
    #[error("not bootstrapped")]
    NotBootstrapped,
    /// The node is not registered.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The shard does not exist.
    #[error("unknown shard {0}")]
    UnknownShard(ShardId),
    /// The command was decided on an older version of the shard.
    #[error("stale epoch for shard {shard}: command at {given:?}, shard at {current:?}")]
    StaleEpoch {
        /// The shard.
        shard: ShardId,
        /// The epoch in the command.
        given: Epoch,
        /// The shard's epoch.
        current: Epoch,
    },
    /// A split key must lie strictly inside the shard's range.
    #[error("split key is not strictly inside shard {0}'s range")]
    SplitKeyOutsideRange(ShardId),
    /// The node already holds a replica of the shard.
    #[error("node {node} already holds a replica of shard {shard}")]
    ReplicaExists {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// The node holds no replica (or no learner, for a promotion) of the shard.
    #[error("node {node} holds no such replica of shard {shard}")]
    NoSuchReplica {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// Removing the replica would leave the shard without a voter.
    #[error("shard {0} would be left without a voter")]
    LastVoter(ShardId),
    /// Bootstrap needs at least one node, each registered once.
    #[error("invalid bootstrap: {0}")]
    InvalidBootstrap(String),
    /// The shard has a move in progress: splits and a second move wait for it.
    #[error("shard {0} has a replica move in progress: wait for it to finish or abort it")]
    MoveInProgress(ShardId),
    /// No move in progress for the shard.
    #[error("no replica move in progress for shard {0}")]
    NoMove(ShardId),
    /// The command named another step than the plan's current one (a duplicate or late command).
    #[error("move of shard {shard} is at step {current:?}, not {given:?}: read the plan again")]
    MoveStepMismatch {
        /// The shard.
        shard: ShardId,
        /// The step in the command.
        given: MoveStep,
        /// The plan's step.
        current: MoveStep,
    },
    /// The plan waits for the learner to catch up.
    #[error("move of shard {0} waits for its learner to catch up: retry after the next heartbeat")]
    MoveWaiting(ShardId),
    /// The plan cannot go on.
    #[error(transparent)]
    MoveConflict(#[from] PlanError),
    /// The plan does not describe a move that can start.
    #[error("invalid move of shard {shard}: {reason}")]
    InvalidMove {
        /// The shard.
        shard: ShardId,
        /// What is wrong.
        reason: String,
    },
    /// Nothing is moved onto a draining node.
    #[error("node {0} is draining: pick another target")]
    NodeDraining(NodeId),
    /// The node was removed for good by an unsafe recovery: it may not join again under this
    /// id (wipe its disk and give it a new id and certificate).
    #[error("node {0} was removed for good by an unsafe recovery: join it again under a new id with an empty disk")]
    NodeRemoved(NodeId),
    /// An unsafe recovery that does not fit the state.
    #[error("invalid unsafe recovery: {0}")]
    InvalidRecovery(String),
    // The merge errors come last: the variants before them keep their serialized tags.
    /// The shard takes part in a merge: its replicas and range stay as they are until the
    /// merge is finished (or aborted and finished).
    #[error("shard {0} takes part in a merge: wait for it to finish or abort it")]
    MergeInProgress(ShardId),
    /// No merge plan is filed under the shard (never begun, or already finished).
    #[error("no merge in progress with left shard {0}")]
    NoMerge(ShardId),
    /// The plan of the left shard has another id (the command is a duplicate or late).
    #[error("the merge of left shard {left} is {current}, not {given}")]
    MergeMismatch {
        /// The left shard.
        left: ShardId,
        /// The id in the command.
        given: MergeId,
        /// The plan's id.
        current: MergeId,
    },
    /// The command does not fit the plan's phase (a commit or abort after either, a finish
    /// while still freezing).
    #[error("merge {id} of left shard {left} is in phase {phase:?}")]
    MergePhaseMismatch {
        /// The left shard.
        left: ShardId,
        /// The plan's id.
        id: MergeId,
        /// The plan's phase.
        phase: MergePhase,
    },
    /// The two shards cannot merge.
    #[error("shards {left} and {right} cannot merge: {reason}")]
    InvalidMerge {
        /// The left shard.
        left: ShardId,
        /// The right shard.
        right: ShardId,
        /// What is wrong.
        reason: String,
    },
}

/// What an applied command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOutcome {
    /// Nothing beyond the state change.
    Done,
    /// The shard descriptors a command changed or created, as they are now.
    Shards(Vec<ShardDescriptor>),
    /// The merge plan [`MetaCommand::BeginMerge`] recorded, with its new id.
    Merge(MergePlan),
}

/// The replicated state of the placement layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// The shard map.
    pub map: ShardMap,
    /// Registered nodes.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// The id the next new shard gets.
    pub next_shard_id: u64,
    /// Leader transfers asked for and not yet seen done: shard -> target node.
    pub transfers: BTreeMap<ShardId, NodeId>,
    /// Replica moves in progress, at most one per shard.
    pub moves: BTreeMap<ShardId, MovePlan>,
    /// Moves started recently (oldest first): the moves-per-minute limit counts them, and the
    /// balancer leaves a recently moved shard alone for a while.
    pub recent_moves: VecDeque<MoveRecord>,
    /// Replicas removed from the map that their nodes may still hold: shard -> node ->
    /// tombstone. A node deletes its replica only on a confirmed tombstone (or its own group's
    /// committed configuration), never because a possibly stale map leaves it out.
    pub tombstones: BTreeMap<ShardId, BTreeMap<NodeId, Tombstone>>,
    /// Nodes removed for good by an unsafe recovery: they never register again, and every
    /// node refuses their messages (their old disks may hold a quorum of an old
    /// configuration). After the older fields: states serialized before it existed decode
    /// with none ([`MetaState::restore`]).
    pub removed: BTreeSet<NodeId>,
    /// The backup the cluster was bootstrapped from (`flotilla restore`), set by the
    /// bootstrap: a node forms a bootstrap shard only if its own store was restored from this
    /// same backup (or, with none, not restored at all), so that no replica starts without
    /// the data its peers start with. Last, so that a state serialized before it existed is
    /// still read ([`MetaState::restore`]).
    pub restored_from: Option<String>,
    /// Shard merges in progress, by left shard (see [`crate::merge`]): a shard takes part in
    /// one at most, and none with a move. Last, so that a state serialized before it existed
    /// is still read, with none ([`MetaState::restore`]).
    pub merges: BTreeMap<ShardId, MergePlan>,
    /// What the bootstrap made that nodes form their replicas by; `None` in a cluster
    /// bootstrapped before it existed. Last, so that a state serialized before it existed is
    /// still read ([`MetaState::restore`]).
    pub bootstrap: Option<BootstrapRecord>,
}

/// [`MetaState`] as serialized before `merges` existed: read with no merge in progress.
#[derive(Deserialize)]
struct MetaStateBeforeMerges {
    map: ShardMap,
    nodes: BTreeMap<NodeId, NodeInfo>,
    next_shard_id: u64,
    transfers: BTreeMap<ShardId, NodeId>,
    moves: BTreeMap<ShardId, MovePlan>,
    recent_moves: VecDeque<MoveRecord>,
    tombstones: BTreeMap<ShardId, BTreeMap<NodeId, Tombstone>>,
    removed: BTreeSet<NodeId>,
    restored_from: Option<String>,
}

/// [`MetaState`] as serialized before `removed` and `restored_from` existed (format-1 stores):
/// read with none removed and no backup.
#[derive(Deserialize)]
struct MetaStateBefore {
    map: ShardMap,
    nodes: BTreeMap<NodeId, NodeInfo>,
    next_shard_id: u64,
    transfers: BTreeMap<ShardId, NodeId>,
    moves: BTreeMap<ShardId, MovePlan>,
    recent_moves: VecDeque<MoveRecord>,
    tombstones: BTreeMap<ShardId, BTreeMap<NodeId, Tombstone>>,
}

impl MetaState {
    /// Applies `cmd`; on error nothing changed.
    pub fn apply(&mut self, cmd: MetaCommand) -> Result<MetaOutcome, MetaError> {
        match cmd {
            MetaCommand::Bootstrap { nodes } => {
                if !self.map.is_empty() {
                    return Err(MetaError::AlreadyBootstrapped);
                }
                if nodes.is_empty() {
                    return Err(MetaError::InvalidBootstrap("no nodes".into()));
                }
                let mut sorted = nodes.clone();
                sorted.sort();
                sorted.dedup();
                if sorted.len() != nodes.len() {
                    return Err(MetaError::InvalidBootstrap("a node is listed twice".into()));
                }
                if let Some(n) = nodes.iter().find(|n| !self.nodes.contains_key(n)) {
                    return Err(MetaError::UnknownNode(*n));
                }
                let id = ShardId(self.next_shard_id.max(1));
                self.next_shard_id = id.0 + 1;
                self.bootstrap =
                    Some(BootstrapRecord { voters: sorted.into_iter().collect(), formed: BTreeSet::new() });
                let replicas = nodes.into_iter().map(|node| Replica { node, role: ReplicaRole::Voter }).collect();
                self.map = ShardMap::bootstrap(id, replicas);
                Ok(MetaOutcome::Shards(self.map.get(id).cloned().into_iter().collect()))
            }
            MetaCommand::RegisterNode { node, addr } => {
                if self.removed.contains(&node) {
                    return Err(MetaError::NodeRemoved(node));
                }
                let e = self.nodes.entry(node).or_insert_with(|| NodeInfo {
                    id: node,
                    addr: String::new(),
                    report: Arc::default(),
                    draining: false,
                });
                e.addr = addr;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::Heartbeat { node, report } => {
                let n = self.nodes.get_mut(&node).ok_or(MetaError::UnknownNode(node))?;
                self.transfers.retain(|shard, target| !(*target == node && report.leading.contains(shard)));
                n.report = Arc::new(report);
                self.update_tombstones(node);
                Ok(MetaOutcome::Done)
            }
            MetaCommand::TransferLeader { shard, epoch, node } => {
                let d = self.current(shard, epoch)?;
                if d.replica(node).is_none_or(|r| r.role != ReplicaRole::Voter) {
                    return Err(MetaError::NoSuchReplica { shard, node });
                }
                self.transfers.insert(shard, node);
                Ok(MetaOutcome::Done)
            }
            MetaCommand::SetDraining { node, draining } => {
                let n = self.nodes.get_mut(&node).ok_or(MetaError::UnknownNode(node))?;
                n.draining = draining;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::Split { shard, epoch, key } => {
                let d = self.current(shard, epoch)?;
                // Both halves would carry the move's learner, and only one the plan.
                if self.moves.contains_key(&shard) {
                    return Err(MetaError::MoveInProgress(shard));
                }
                self.check_no_merge(shard)?;
                if key.as_slice() <= d.start.as_slice() || !d.contains(&key) {
                    return Err(MetaError::SplitKeyOutsideRange(shard));
                }
                let new_id = ShardId(self.next_shard_id.max(1));
                self.next_shard_id = new_id.0 + 1;
                self.map.split(shard, key, new_id);
                // The reported size and split key described the whole range: kept under the
                // left half's id they would suggest splitting it again. Unknown until the next
                // heartbeats instead.
                for info in self.nodes.values_mut() {
                    forget_shard(&mut info.report, shard);
                }
                let changed = [shard, new_id].iter().filter_map(|id| self.map.get(*id).cloned()).collect();
                Ok(MetaOutcome::Shards(changed))
            }
            MetaCommand::AddLearner { shard, epoch, node } => {
                if !self.nodes.contains_key(&node) {
                    return Err(MetaError::UnknownNode(node));
                }
                let d = self.current(shard, epoch)?;
                if d.replica(node).is_some() {
                    return Err(MetaError::ReplicaExists { shard, node });
                }
                self.check_no_merge(shard)?;
                // The node may still hold the replica removed earlier: it becomes a member
                // again, caught up from wherever its state is.
                self.unbury(shard, node);
                self.change(shard, |d| d.replicas.push(Replica { node, role: ReplicaRole::Learner }))
            }
            MetaCommand::Promote { shard, epoch, node } => {
                let d = self.current(shard, epoch)?;
                if d.replica(node).is_none_or(|r| r.role != ReplicaRole::Learner) {
                    return Err(MetaError::NoSuchReplica { shard, node });
                }
                self.check_no_merge(shard)?;
                self.change(shard, |d| {
                    if let Some(r) = d.replicas.iter_mut().find(|r| r.node == node) {
                        r.role = ReplicaRole::Voter;
                    }
                })
            }
            MetaCommand::RemoveReplica { shard, epoch, node } => {
                let d = self.current(shard, epoch)?;
                let Some(r) = d.replica(node) else {
                    return Err(MetaError::NoSuchReplica { shard, node });
                };
                if r.role == ReplicaRole::Voter && d.voters().count() == 1 {
                    return Err(MetaError::LastVoter(shard));
                }
                self.check_no_merge(shard)?;
                self.drop_transfer_to(shard, node);
                let outcome = self.change(shard, |d| d.replicas.retain(|r| r.node != node))?;
                self.bury(shard, node);
                Ok(outcome)
            }
            MetaCommand::SwapVoter { shard, epoch, promote, demote } => {
                let d = self.current(shard, epoch)?;
                if d.replica(promote).is_none_or(|r| r.role != ReplicaRole::Learner) {
                    return Err(MetaError::NoSuchReplica { shard, node: promote });
                }
                if d.replica(demote).is_none_or(|r| r.role != ReplicaRole::Voter) {
                    return Err(MetaError::NoSuchReplica { shard, node: demote });
                }
                self.check_no_merge(shard)?;
                self.drop_transfer_to(shard, demote);
                self.change(shard, |d| {
                    for r in d.replicas.iter_mut() {
                        if r.node == promote {
                            r.role = ReplicaRole::Voter;
                        } else if r.node == demote {
                            r.role = ReplicaRole::Learner;
                        }
                    }
                })
            }
            MetaCommand::StartMove { epoch, plan, now_ms } => {
                self.check_start(epoch, &plan)?;
                while self.recent_moves.front().is_some_and(|m| m.started_ms.saturating_add(MOVE_HISTORY_MS) <= now_ms)
                    || self.recent_moves.len() >= MOVE_HISTORY_LEN_MAX
                {
                    self.recent_moves.pop_front();
                }
                let record = MoveRecord { shard: plan.shard, from: plan.from, to: plan.to, started_ms: now_ms };
                self.recent_moves.push_back(record);
                self.moves.insert(plan.shard, plan);
                Ok(MetaOutcome::Done)
            }
            MetaCommand::AdvanceMove { shard, step } => {
                let plan = self.moves.get(&shard).ok_or(MetaError::NoMove(shard))?;
                if plan.step != step {
                    return Err(MetaError::MoveStepMismatch { shard, given: step, current: plan.step });
                }
                let (outcome, then) = match plan.next(self)? {
                    PlanAction::Run { command, then } => (self.apply(command)?, then),
                    PlanAction::Advance { to } => (MetaOutcome::Done, to),
                    PlanAction::Wait { .. } | PlanAction::WaitRaft { .. } => return Err(MetaError::MoveWaiting(shard)),
                    PlanAction::Done => (MetaOutcome::Done, MoveStep::Done),
                };
                if then == MoveStep::Done {
                    self.moves.remove(&shard);
                } else if let Some(p) = self.moves.get_mut(&shard) {
                    p.step = then;
                }
                Ok(outcome)
            }
            MetaCommand::AbortMove { shard } => {
                let plan = self.moves.get(&shard).ok_or(MetaError::NoMove(shard))?;
                let (from, to) = (plan.from, plan.to);
                let role = |n: NodeId| self.map.get(shard).and_then(|d| d.replica(n)).map(|r| r.role);
                let swapped = role(from) == Some(ReplicaRole::Learner) && role(to) == Some(ReplicaRole::Voter);
                let conf = self.leader_conf(shard).filter(|c| !c.joint).cloned();
                // Swapped in the map: the map follows what the group did. Not swapped in the
                // group: the source votes again and the target goes. Swapped there too: the
                // move is finished forward (the source leaves). Unknown: nothing is undone yet.
                let unswap = match (&conf, swapped) {
                    (_, false) => false,
                    (Some(c), true) if c.voters.contains(&from) && !c.voters.contains(&to) => true,
                    (Some(c), true) if c.voters.contains(&to) && !c.voters.contains(&from) => {
                        self.moves.remove(&shard);
                        let outcome = self.change(shard, |d| d.replicas.retain(|r| r.node != from))?;
                        self.bury(shard, from);
                        return Ok(outcome);
                    }
                    (_, true) => return Err(MetaError::MoveWaiting(shard)),
                };
                // StartMove refused a target that already held a replica, so a learner there
                // now was added for this move: it would otherwise linger, unaccounted for.
                let learner = role(to) == Some(ReplicaRole::Learner);
                self.moves.remove(&shard);
                if learner || unswap {
                    let outcome = self.change(shard, |d| {
                        d.replicas.retain(|r| r.node != to);
                        for r in d.replicas.iter_mut().filter(|r| r.node == from) {
                            r.role = ReplicaRole::Voter;
                        }
                    })?;
                    self.bury(shard, to);
                    return Ok(outcome);
                }
                Ok(MetaOutcome::Done)
            }
            MetaCommand::RemoveDeadNodes { dead, kept } => {
                // All or nothing, like every command: worked out on a copy.
                let mut next = self.clone();
                let outcome = next.remove_dead_nodes(&dead, &kept)?;
                *self = next;
                Ok(outcome)
            }
            MetaCommand::BeginMerge { left, left_epoch, right, right_epoch, now_ms } => {
                self.begin_merge((left, left_epoch), (right, right_epoch), now_ms)
            }
            MetaCommand::CommitMerge { left, id, freeze_term, freeze_index } => {
                self.commit_merge(left, id, freeze_term, freeze_index)
            }
            MetaCommand::AbortMerge { left, id } => self.abort_merge(left, id),
            MetaCommand::FinishMerge { left, id } => self.finish_merge(left, id),
            MetaCommand::BootstrapFormed { node } => {
                if let Some(b) = self.bootstrap.as_mut() {
                    b.formed.insert(node);
                }
                Ok(MetaOutcome::Done)
            }
        }
    }

    /// Checks that `plan` can start on the current map.
    fn check_start(&self, epoch: Epoch, plan: &MovePlan) -> Result<(), MetaError> {
        let shard = plan.shard;
        let invalid = |reason: &str| Err(MetaError::InvalidMove { shard, reason: reason.into() });
        let d = self.current(shard, epoch)?;
        if self.moves.contains_key(&shard) {
            return Err(MetaError::MoveInProgress(shard));
        }
        self.check_no_merge(shard)?;
        if plan.step != MoveStep::AddLearner {
            return invalid("a move starts at its first step, AddLearner");
        }
        if plan.from == plan.to {
            return invalid("source and target are the same node");
        }
        let target = self.nodes.get(&plan.to).ok_or(MetaError::UnknownNode(plan.to))?;
        if target.draining {
            return Err(MetaError::NodeDraining(plan.to));
        }
        if d.replica(plan.from).is_none_or(|r| r.role != ReplicaRole::Voter) {
            return Err(MetaError::NoSuchReplica { shard, node: plan.from });
        }
        if d.replica(plan.to).is_some() {
            return Err(MetaError::ReplicaExists { shard, node: plan.to });
        }
        if let Some(l) = plan.transfer_leader_to {
            if l == plan.from || (l != plan.to && d.replica(l).is_none_or(|r| r.role != ReplicaRole::Voter)) {
                return invalid("leadership can only go to the target or to another voter that stays");
            }
        }
        Ok(())
    }

    /// The committed configuration of `shard` as reported by a voter that leads it: the newest
    /// (highest index) if several report leading it, since a deposed leader's report can
    /// linger and committed configurations only move forward in the log.
    pub fn leader_conf(&self, shard: ShardId) -> Option<&GroupConf> {
        let d = self.map.get(shard)?;
        d.voters()
            .filter_map(|v| self.nodes.get(&v))
            .filter(|i| i.report.leading.contains(&shard))
            .filter_map(|i| i.report.confs.get(&shard))
            .max_by_key(|c| c.index)
    }

    /// Records that `node`'s replica of `shard` left the map; confirmed at once if the
    /// shard's leader already reports a committed configuration without it.
    fn bury(&mut self, shard: ShardId, node: NodeId) {
        let confirmed = self.leader_conf(shard).filter(|c| !c.joint && !c.contains(node)).map(|c| c.index);
        let t = self.tombstones.entry(shard).or_default().entry(node).or_insert(Tombstone { confirmed: None });
        t.confirmed = t.confirmed.max(confirmed);
    }

    fn unbury(&mut self, shard: ShardId, node: NodeId) {
        if let Some(t) = self.tombstones.get_mut(&shard) {
            t.remove(&node);
            if t.is_empty() {
                self.tombstones.remove(&shard);
            }
        }
    }

    /// After a report of `node`: tombstones of shards it leads are confirmed by the committed
    /// configuration it reports, and tombstones of its own replicas are dropped once confirmed
    /// and its report no longer lists the replica (it deleted it).
    fn update_tombstones(&mut self, node: NodeId) {
        let Some(report) = self.nodes.get(&node).map(|i| i.report.clone()) else { return };
        for (shard, ts) in self.tombstones.iter_mut() {
            let led = report.leading.contains(shard)
                && self.map.get(*shard).and_then(|d| d.replica(node)).is_some_and(|r| r.role == ReplicaRole::Voter);
            if let Some(conf) = report.confs.get(shard).filter(|c| led && !c.joint) {
                // Raised with every newer committed configuration without the node: one
                // confirmed by an older configuration than the replica's newest would never
                // let it go.
                for (n, t) in ts.iter_mut() {
                    if !conf.contains(*n) {
                        t.confirmed = t.confirmed.max(Some(conf.index));
                    }
                }
            }
            if ts.get(&node).is_some_and(|t| t.confirmed.is_some()) && !report.applied.contains_key(shard) {
                ts.remove(&node);
            }
        }
        self.tombstones.retain(|_, ts| !ts.is_empty());
    }

    /// Forgets a pending leader transfer to `node` (it is losing its vote in `shard`).
    fn drop_transfer_to(&mut self, shard: ShardId, node: NodeId) {
        if self.transfers.get(&shard) == Some(&node) {
            self.transfers.remove(&shard);
        }
    }

    /// The shard, if `epoch` is its current one.
    pub(crate) fn current(&self, shard: ShardId, epoch: Epoch) -> Result<&ShardDescriptor, MetaError> {
        if self.map.is_empty() {
            return Err(MetaError::NotBootstrapped);
        }
        let d = self.map.get(shard).ok_or(MetaError::UnknownShard(shard))?;
        if d.epoch != epoch {
            return Err(MetaError::StaleEpoch { shard, given: epoch, current: d.epoch });
        }
        Ok(d)
    }

    /// Applies a replica change and bumps `conf_version`.
    pub(crate) fn change(
        &mut self,
        shard: ShardId,
        f: impl FnOnce(&mut ShardDescriptor),
    ) -> Result<MetaOutcome, MetaError> {
        let d = self.map.get_mut(shard).ok_or(MetaError::UnknownShard(shard))?;
        f(d);
        d.epoch.conf_version += 1;
        Ok(MetaOutcome::Shards(vec![d.clone()]))
    }

    /// Serializes the whole state (a snapshot of the meta group).
    pub fn snapshot(&self) -> Result<Vec<u8>, String> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).map_err(|e| e.to_string())
    }

    /// Restores a state from [`MetaState::snapshot`], checking it ([`MetaState::validate`]).
    /// States serialized by older layouts are read too, each ending where a newer field would
    /// start: before `merges` (read with none), and before `removed` and `restored_from` (read
    /// with none removed and no backup). A layout fails on the bytes of a longer one (bytes
    /// left over) and on those of a shorter one (bytes missing), so exactly one reads them
    /// whole.
    pub fn restore(bytes: &[u8]) -> Result<MetaState, String> {
        let cfg = bincode::config::standard();
        let whole = |used: usize| used == bytes.len();
        let s = match bincode::serde::decode_from_slice::<MetaState, _>(bytes, cfg) {
            Ok((s, used)) if whole(used) => s,
            current => {
                if let Ok((o, used)) = bincode::serde::decode_from_slice::<MetaStateBeforeBootstrap, _>(bytes, cfg) {
                    if whole(used) {
                        return MetaState::checked(o.into());
                    }
                }
                if let Ok((o, used)) = bincode::serde::decode_from_slice::<MetaStateBeforeMerges, _>(bytes, cfg) {
                    if whole(used) {
                        return MetaState::checked(o.into());
                    }
                }
                match bincode::serde::decode_from_slice::<MetaStateBefore, _>(bytes, cfg) {
                    Ok((o, used)) if whole(used) => o.into(),
                    _ => {
                        return Err(match current {
                            Ok((_, used)) => format!("{} trailing bytes", bytes.len() - used),
                            Err(e) => e.to_string(),
                        })
                    }
                }
            }
        };
        MetaState::checked(s)
    }

    fn checked(s: MetaState) -> Result<MetaState, String> {
        s.validate()?;
        Ok(s)
    }

    /// Checks the state's invariants: the map's ([`ShardMap::validate`]), each move filed
    /// under its shard, which is in the map, and the merge plans fit the map (see
    /// [`crate::merge`]). Run on a restored state; tests run it after every command.
    pub fn validate(&self) -> Result<(), String> {
        self.map.validate()?;
        for (shard, plan) in &self.moves {
            if plan.shard != *shard || self.map.get(*shard).is_none() {
                return Err(format!("the move recorded under shard {shard} does not match the map"));
            }
        }
        self.validate_merges()
    }
}

impl From<MetaStateBeforeMerges> for MetaState {
    fn from(o: MetaStateBeforeMerges) -> MetaState {
        MetaState {
            map: o.map,
            nodes: o.nodes,
            next_shard_id: o.next_shard_id,
            transfers: o.transfers,
            moves: o.moves,
            recent_moves: o.recent_moves,
            tombstones: o.tombstones,
            removed: o.removed,
            restored_from: o.restored_from,
            merges: BTreeMap::new(),
            bootstrap: None,
        }
    }
}

impl From<MetaStateBeforeBootstrap> for MetaState {
    fn from(o: MetaStateBeforeBootstrap) -> MetaState {
        MetaState {
            map: o.map,
            nodes: o.nodes,
            next_shard_id: o.next_shard_id,
            transfers: o.transfers,
            moves: o.moves,
            recent_moves: o.recent_moves,
            tombstones: o.tombstones,
            removed: o.removed,
            restored_from: o.restored_from,
            merges: o.merges,
            bootstrap: None,
        }
    }
}

impl From<MetaStateBefore> for MetaState {
    fn from(o: MetaStateBefore) -> MetaState {
        MetaState {
            map: o.map,
            nodes: o.nodes,
            next_shard_id: o.next_shard_id,
            transfers: o.transfers,
            moves: o.moves,
            recent_moves: o.recent_moves,
            tombstones: o.tombstones,
            removed: BTreeSet::new(),
            restored_from: None,
            merges: BTreeMap::new(),
            bootstrap: None,
        }
    }
}

/// Drops what `report` says of `shard`'s size, split key and load (they described a range the
/// shard no longer has), copying the shared report only if it says anything of it.
pub(crate) fn forget_shard(report: &mut Arc<NodeReport>, shard: ShardId) {
    let r = report.as_ref();
    if r.shard_bytes.contains_key(&shard) || r.split_keys.contains_key(&shard) || r.shard_load.contains_key(&shard) {
        let r = Arc::make_mut(report);
        r.shard_bytes.remove(&shard);
        r.split_keys.remove(&shard);
        r.shard_load.remove(&shard);
    }
}
