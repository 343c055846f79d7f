//! The messages Raft peers exchange. Message passing, not request/response: a response is just
//! another message, so the network can batch and reorder freely (Raft tolerates both).

use crate::entry::Entry;
use crate::storage::SnapshotMeta;
use crate::types::{LogId, LogIndex, NodeId, Term};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A message from one member of a group to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// The sender's term (for `PreVote`: the term the sender would campaign in).
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// Pre-vote (Raft thesis §9.6): "would you vote for me in `term`?" Changes no state.
    PreVote {
        /// The candidate's last log id.
        last_log_id: LogId,
    },
    /// Answer to `PreVote`.
    PreVoteResp {
        /// Whether the vote would be granted.
        granted: bool,
    },
    /// RequestVote (Raft §5.2).
    Vote {
        /// The candidate's last log id.
        last_log_id: LogId,
        /// Set when the election follows a leadership transfer (`TimeoutNow`): voters then
        /// ignore that they heard from a leader recently.
        transfer: bool,
    },
    /// Answer to `Vote`; sent only once the vote is durable.
    VoteResp {
        /// Whether the vote was granted.
        granted: bool,
    },
    /// AppendEntries (Raft §5.3).
    Append {
        /// The id of the entry before `entries`.
        prev: LogId,
        /// Entries to append; may be empty (a probe).
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: LogIndex,
    },
    /// Answer to `Append`.
    AppendResp(AppendResult),
    /// Leader heartbeat: carries the commit index and the round number that ReadIndex and
    /// lease reads count acknowledgements of.
    Heartbeat {
        /// The log id at `min(commit, the follower's matched index)`: never beyond what the
        /// follower holds. An id, not an index: the follower advances its commit index only if
        /// it holds that very entry (a disk that rolled back may hold another term there, which
        /// was never committed). `LogId::ZERO` when the leader no longer has that entry (purged
        /// under a follower that still needs a snapshot): no advance then.
        commit: LogId,
        /// The heartbeat round.
        round: u64,
        /// The leader keeps its log after this index for a follower still catching up from
        /// it (see `Engine::purge_log`); `None`: for nobody. Followers keep theirs from there
        /// too, so that whichever of them leads next can still catch that follower up from
        /// the log rather than by snapshot.
        keep_after: Option<LogIndex>,
    },
    /// Answer to `Heartbeat`.
    HeartbeatResp {
        /// The round acknowledged.
        round: u64,
    },
    /// Leadership transfer: "campaign now" (Raft thesis §3.10).
    TimeoutNow,
    /// One chunk of a snapshot.
    Snapshot {
        /// Which snapshot. Boxed so that this rare message does not make every message (and
        /// every action that carries one) 200 bytes; encoded as the meta itself.
        meta: Box<SnapshotMeta>,
        /// Byte offset of `data` in the snapshot.
        offset: u64,
        /// The bytes.
        data: Bytes,
        /// Whether this is the last chunk.
        done: bool,
    },
    /// Answer to a snapshot chunk.
    SnapshotResp {
        /// Snapshot this answers about.
        snapshot_id: u64,
        /// The offset the receiver expects next (rewinds the sender after a lost chunk).
        next_offset: u64,
        /// Set once the snapshot is installed: the log id it ended at.
        installed: Option<LogId>,
        /// The receiver found the snapshot corrupt: the sender builds a new one rather than
        /// resend the same bytes.
        refused: bool,
        /// The chunk answered lies past `next_offset` (one before it was lost), or belongs to
        /// a snapshot the receiver is not taking (it restarted): the sender resends from
        /// `next_offset`. Unset on an acknowledgement and on the answer to a chunk received
        /// twice, which only says how far the receiver is — the sender must not take a
        /// duplicate's answer for a loss, or each resend would breed another.
        gap: bool,
    },
}

/// Result of an `Append`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendResult {
    /// The follower's log matches the leader's up to and including `matched` (durably).
    Success {
        /// Matched index.
        matched: LogIndex,
    },
    /// The entry at `rejected.index` did not match. `hint` is the follower's best guess of a
    /// matching point: the last entry at or before `rejected.index` whose term is at most
    /// `rejected.term` (fast back-off, one round trip per term rather than per entry).
    Conflict {
        /// The `prev` of the rejected message.
        rejected: LogId,
        /// Follower's hint.
        hint: LogId,
    },
}

impl MessageBody {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            MessageBody::PreVote { .. } => "pre_vote",
            MessageBody::PreVoteResp { .. } => "pre_vote_resp",
            MessageBody::Vote { .. } => "vote",
            MessageBody::VoteResp { .. } => "vote_resp",
            MessageBody::Append { .. } => "append",
            MessageBody::AppendResp(_) => "append_resp",
            MessageBody::Heartbeat { .. } => "heartbeat",
            MessageBody::HeartbeatResp { .. } => "heartbeat_resp",
            MessageBody::TimeoutNow => "timeout_now",
            MessageBody::Snapshot { .. } => "snapshot",
            MessageBody::SnapshotResp { .. } => "snapshot_resp",
        }
    }
}
