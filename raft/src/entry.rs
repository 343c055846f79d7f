//! Log entries.

use crate::membership::Membership;
use crate::types::LogId;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Term and index of the entry.
    pub log_id: LogId,
    /// What the entry carries.
    pub payload: EntryPayload,
}

/// The content of a log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPayload {
    /// An empty entry. A new leader appends one to commit the entries of earlier terms
    /// (Raft §5.4.2 forbids committing those by counting replicas).
    Blank,
    /// An application command, opaque to Raft; handed to the [`StateMachine`](crate::StateMachine).
    Normal(Bytes),
    /// A configuration (membership) entry. It takes effect as soon as it is in a log,
    /// committed or not (Raft thesis §4.1). Boxed: configurations are rare, and inline its
    /// three sets made every entry 96 bytes instead of 56, moved and copied on every path
    /// an entry takes. Encoded as the configuration itself (serde encodes a box as its
    /// content), so logs and messages written before read the same.
    Membership(Box<Membership>),
}

/// Fixed overhead counted per entry when sizing messages and caches: log id, tag, framing.
pub(crate) const ENTRY_OVERHEAD_BYTES: usize = 24;

impl Entry {
    /// A rough in-memory / on-the-wire size, used for byte limits.
    pub fn size_bytes(&self) -> usize {
        ENTRY_OVERHEAD_BYTES
            + match &self.payload {
                EntryPayload::Blank => 0,
                EntryPayload::Normal(b) => b.len(),
                EntryPayload::Membership(m) => 16 * m.node_count(),
            }
    }

    /// The membership this entry carries, if it is a configuration entry.
    pub fn membership(&self) -> Option<&Membership> {
        match &self.payload {
            EntryPayload::Membership(m) => Some(m.as_ref()),
            _ => None,
        }
    }
}
