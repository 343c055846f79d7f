//! Errors. API errors say what the caller can do next; `Fatal` means the group has stopped.

use crate::types::{LogIndex, NodeId, Term};
use thiserror::Error;

/// An error of the storage (`LogStorage` or `StateMachine`). Any storage error stops the group:
/// Raft never continues on a half-written state.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("storage error during {op}: {message}")]
pub struct StorageError {
    /// What was being done (`append`, `save_vote`, `read_entries`, ...).
    pub op: &'static str,
    /// What went wrong.
    pub message: String,
}

impl StorageError {
    /// A storage error during `op`.
    pub fn new(op: &'static str, message: impl Into<String>) -> Self {
        StorageError { op, message: message.into() }
    }
}

/// The group has stopped and will not serve again in this process.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Fatal {
    /// Storage failed; the group stopped rather than continue on a state it cannot trust.
    #[error("group stopped: {0}")]
    Storage(#[from] StorageError),
    /// The group was shut down.
    #[error("group is shut down")]
    Shutdown,
    /// This replica's log and its leader's differ at or below the replica's commit index: the
    /// histories forked. Raft never lets that happen; an unsafe recovery that forced the group
    /// onto a replica lacking entries another survivor had committed can, and so can a disk
    /// that lost writes it had confirmed. The replica stopped rather than acknowledge entries
    /// it does not hold or overwrite entries it applied: an operator decides which history
    /// stays (e.g. by rebuilding this replica from the leader).
    #[error(
        "group stopped: log forked from leader {leader}'s at index {index} (term {ours} here, {theirs} on the leader), at or below the commit index"
    )]
    Diverged {
        /// The leader whose append showed the fork.
        leader: NodeId,
        /// The index where the two logs were seen to differ.
        index: LogIndex,
        /// The term of this replica's entry there.
        ours: Term,
        /// The term of the leader's entry there.
        theirs: Term,
    },
}

/// Errors returned by the [`Raft`](crate::Raft) handle and by the engine's API calls.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RaftError {
    /// This node is not the leader. Retry on `leader` if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
    },
    /// A membership change is still in progress; retry once it has committed.
    #[error("a membership change is in progress")]
    ChangeInProgress,
    /// A leadership transfer is in progress; proposals are refused until it ends.
    #[error("a leadership transfer is in progress")]
    TransferInProgress,
    /// The request was not answered in time. For a write the outcome is unknown: it may still
    /// commit.
    #[error("timed out")]
    Timeout,
    /// This node can no longer tell whether the proposal's entry committed (its log was
    /// replaced by a snapshot covering the index). Like a timeout: it may have been applied.
    #[error("outcome unknown for the proposal at index {index}")]
    Indeterminate {
        /// Index the entry had.
        index: LogIndex,
    },
    /// The leader holds too many proposed bytes not yet committed
    /// (`Config::uncommitted_bytes_max`); nothing was appended: retry later.
    #[error("overloaded: {pending_bytes} bytes proposed and not yet committed")]
    Overloaded {
        /// Bytes proposed and not committed when the proposal came.
        pending_bytes: u64,
    },
    /// The proposal's entry was replaced by another leader's: it will never be applied.
    #[error("proposal dropped: entry {index} was overwritten by a new leader")]
    Dropped {
        /// Index the entry had.
        index: LogIndex,
    },
    /// `initialize` on a node that already has state.
    #[error("node already initialized")]
    AlreadyInitialized,
    /// The requested membership is not valid.
    #[error("invalid membership: {0}")]
    InvalidMembership(String),
    /// A request names a node that cannot take that role (e.g. transfer to a learner).
    #[error("invalid target node {0}: {1}")]
    InvalidTarget(NodeId, &'static str),
    /// The configuration given to `Raft::start` cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The group stopped. For a write the outcome is unknown, as for `Timeout`: its entry may
    /// already be in the log, and commit once the group runs again (after a restart, or on
    /// the other nodes).
    #[error(transparent)]
    Fatal(#[from] Fatal),
}

/// A configuration that cannot work.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("invalid raft config: {0}")]
pub struct ConfigError(pub String);
