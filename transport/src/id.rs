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

/// What a client certificate allows (carried in the certificate, see [`crate::cert`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything: data and the cluster's administration.
    Admin,
    /// Data only: reads and writes of keys, no administration.
    ReadWrite,
    /// Reads of keys only (gets and scans).
    ReadOnly,
}

impl Role {
    /// Every role, for help texts and exhaustive tests.
    pub const ALL: [Role; 3] = [Role::Admin, Role::ReadWrite, Role::ReadOnly];

    /// The role's name as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadWrite => "readwrite",
            Role::ReadOnly => "readonly",
        }
    }

    /// The role named `name` (exactly as [`Role::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::parse(s).ok_or_else(|| format!("unknown role {s:?}: use admin, readwrite or readonly"))
    }
}

/// A client's role and, optionally, the key prefix (tenant) it is limited to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grant {
    /// What the client may do.
    pub role: Role,
    /// When set, every key the client reads or writes starts with these bytes.
    pub prefix: Option<Vec<u8>>,
}

impl Grant {
    /// A grant of `role` over every key.
    pub fn new(role: Role) -> Grant {
        Grant { role, prefix: None }
    }

    /// A grant of `role` limited to keys starting with `prefix`.
    pub fn with_prefix(role: Role, prefix: impl Into<Vec<u8>>) -> Grant {
        Grant { role, prefix: Some(prefix.into()) }
    }
}

/// A client as named by its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientIdentity {
    /// The name in `client-<name>.flotilla`.
    pub name: String,
    /// The role the certificate carries; `None` for a certificate issued before roles existed,
    /// which the compatibility rule treats as `admin` (see [`crate::cert`]).
    pub grant: Option<Grant>,
}

impl ClientIdentity {
    /// A client named `name` with `grant`.
    pub fn new(name: impl Into<String>, grant: Grant) -> ClientIdentity {
        ClientIdentity { name: name.into(), grant: Some(grant) }
    }
}

/// A client whose certificate carries no role (tests and in-process callers).
impl From<&str> for ClientIdentity {
    fn from(name: &str) -> ClientIdentity {
        ClientIdentity { name: name.to_string(), grant: None }
    }
}

/// Who is at the other end of a connection, as read from its certificate (never from a frame).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// A cluster node (`node-<id>.flotilla`): may exchange Raft envelopes, transfers and requests.
    Node(NodeId),
    /// A client such as the CLI (`client-<name>.flotilla`): may only send requests, and only
    /// those its role allows.
    Client(ClientIdentity),
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Node(id) => write!(f, "n{id}"),
            PeerIdentity::Client(c) => write!(f, "client {}", c.name),
        }
    }
}
