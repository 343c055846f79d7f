//! Identifiers and the unit the transport moves.

use std::fmt;

use bytes::Bytes;

/// Node and group ids are the ones every crate of ours shares. A node's id is the number in
/// its certificate (`node-<id>.flotilla`); the transport uses a group id only to choose a
/// stream, so that the messages of one group stay in order.
pub use flotilla_ids::{GroupId, NodeId};

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
            PeerIdentity::Node(id) => write!(f, "n{id}"),
            PeerIdentity::Client(name) => write!(f, "client {name}"),
        }
    }
}
