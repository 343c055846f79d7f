//! Identifiers and the unit the transport moves.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A node of the cluster. It is the number in the node's certificate (`node-<id>.flotilla`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A Raft group (shard). The transport uses it only to choose a stream, so that the messages
/// of one group stay in order.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u64);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// One message for one group: an opaque payload (a serialized Raft message). The transport
/// never looks inside `payload`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The group the payload belongs to; decides the stream it travels on.
    pub group: GroupId,
    /// The caller's bytes, delivered unchanged.
    pub payload: Bytes,
}

impl Envelope {
    /// An envelope for `group` carrying `payload`.
    pub fn new(group: GroupId, payload: impl Into<Bytes>) -> Self {
        Envelope { group, payload: payload.into() }
    }
}

/// Who is at the other end of a connection, as read from its certificate (never from a frame).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// A cluster node (`node-<id>.flotilla`): may exchange Raft envelopes, transfers and requests.
    Node(NodeId),
    /// A client such as the CLI (`client-<name>.flotilla`): may only send requests.
    Client(String),
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Node(id) => write!(f, "{id}"),
            PeerIdentity::Client(name) => write!(f, "client {name}"),
        }
    }
}
