//! [`Request`]: what a caller asks of one group, with the channel its answer goes back on.
//!
//! Both ways of running groups take the same requests: the Tokio driver ([`crate::Raft`])
//! queues them for its core task, a host running many groups on its pollers queues them in
//! the poller's mailbox, and each hands them to [`crate::GroupCore::handle_request`]. A
//! request that cannot reach its group (the group is gone or stopped) is answered with
//! [`Request::refuse`], never dropped silently.

use crate::engine::ReadMode;
use crate::error::RaftError;
use crate::group::WriteResponse;
use crate::membership::Membership;
use crate::types::{LogId, LogIndex, NodeId};
use bytes::Bytes;
use std::collections::BTreeSet;
use tokio::sync::oneshot;

/// Where the answer to a batch of writes goes: one result per command, in order.
pub type WriteReply = oneshot::Sender<Result<Vec<Result<WriteResponse, RaftError>>, RaftError>>;
/// Where the answer to a single write goes.
pub type WriteOneReply = oneshot::Sender<Result<WriteResponse, RaftError>>;
/// Where the answer to a read or a configuration change goes: the log index it took effect at.
pub type IndexReply = oneshot::Sender<Result<LogIndex, RaftError>>;
/// Where the answer to a request without a result goes.
pub type DoneReply = oneshot::Sender<Result<(), RaftError>>;

/// A caller's request to one group. See the module documentation.
#[derive(Debug)]
pub enum Request {
    /// Form a new cluster with this configuration (see [`crate::Engine::initialize`]).
    Initialize(Membership, DoneReply),
    /// Propose these commands; the reply carries one result per command once all applied.
    Write(Vec<Bytes>, WriteReply),
    /// Propose one command; the reply carries its result once applied. `Write` with one
    /// command, without a vector each way.
    WriteOne(Bytes, WriteOneReply),
    /// Confirm a linearizable read point; with `wait_apply`, answer only once the state
    /// machine applied it.
    Read {
        /// ReadIndex round or leader lease.
        mode: ReadMode,
        /// Wait for the state machine to reach the read index before answering.
        wait_apply: bool,
        /// The read index.
        reply: IndexReply,
    },
    /// Add a learner; answered with the index of the applied configuration entry.
    AddLearner(NodeId, IndexReply),
    /// Remove a learner; answered with the index of the applied configuration entry.
    RemoveLearner(NodeId, IndexReply),
    /// Change the voters by joint consensus; answered with the final configuration's index.
    ChangeMembership(BTreeSet<NodeId>, IndexReply),
    /// Hand leadership to this voter; answered once this node sees it lead.
    TransferLeader(NodeId, DoneReply),
    /// Purge the log now up to what the state machine holds durably; answered at once.
    CompactLog(DoneReply),
    /// Unsafe recovery (an operator's, after a majority of the voters was lost for good):
    /// make this replica the group's only voter ([`crate::Engine::force_alone`]); answered at
    /// once with the index of the forced configuration's entry. Refused unless `dead` hold a
    /// majority of the replica's configuration and its last log id is still `last`.
    ForceAlone {
        /// The nodes lost for good, as the operator named them.
        dead: BTreeSet<NodeId>,
        /// The replica's last log id when the operator's tool decided to force it.
        last: LogId,
        /// The answer.
        reply: IndexReply,
    },
}

impl Request {
    /// Answers the request with `error` without handling it.
    pub fn refuse(self, error: RaftError) {
        // A caller that stopped waiting dropped its receiver: nothing to tell it.
        match self {
            Request::Initialize(_, r) | Request::TransferLeader(_, r) | Request::CompactLog(r) => {
                let _ = r.send(Err(error));
            }
            Request::Write(_, r) => {
                let _ = r.send(Err(error));
            }
            Request::WriteOne(_, r) => {
                let _ = r.send(Err(error));
            }
            Request::Read { reply: r, .. }
            | Request::AddLearner(_, r)
            | Request::RemoveLearner(_, r)
            | Request::ChangeMembership(_, r)
            | Request::ForceAlone { reply: r, .. } => {
                let _ = r.send(Err(error));
            }
        }
    }
}
