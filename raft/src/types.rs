//! Identifiers, indexes and time: newtypes so that a term is never passed where an index is
//! expected.

use serde::{Deserialize, Serialize};
use std::fmt;

use flotilla_ids::id_newtype;
/// Node and group ids are shared with every crate of ours (`flotilla-ids`); re-exported here
/// so that an embedder of the Raft library finds them beside the other types.
pub use flotilla_ids::{GroupId, NodeId};

id_newtype!(
    /// A Raft term. Term 0 is the term before any election; no entry carries it.
    Term
);
id_newtype!(
    /// The index of a log entry. Index 0 is "before the first entry": the first real entry
    /// has index 1.
    LogIndex
);

impl LogIndex {
    /// The index after this one.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }
    /// The index before this one (saturating at 0).
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

impl Term {
    /// The term after this one.
    pub fn next(self) -> Term {
        Term(self.0 + 1)
    }
}

/// The identity of a log entry: its term and index. Ordered by term first, then index, which
/// is exactly Raft's "at least as up-to-date" comparison (§5.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogId {
    /// The term of the leader that created the entry.
    pub term: Term,
    /// The position of the entry in the log.
    pub index: LogIndex,
}

impl LogId {
    /// A log id from raw numbers.
    pub fn new(term: u64, index: u64) -> LogId {
        LogId { term: Term(term), index: LogIndex(index) }
    }
    /// The id "before the first entry" (term 0, index 0).
    pub const ZERO: LogId = LogId { term: Term(0), index: LogIndex(0) };
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.term, self.index)
    }
}

/// What a node persists about elections: the current term and whom it voted for in it.
/// Raft's `currentTerm` and `votedFor`; must be durable before a vote is granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Vote {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, if any.
    pub voted_for: Option<NodeId>,
}

/// A point in time in milliseconds, on a clock of the driver's choosing (the Tokio driver
/// counts from its own start; the simulator runs a virtual clock). The engine never reads a
/// clock: every input carries `now`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// This instant plus `ms` milliseconds.
    pub fn add_ms(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}
