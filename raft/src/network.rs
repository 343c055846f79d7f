//! The network trait.

use crate::message::Message;

/// Sends Raft messages to peers. Fire-and-forget: Raft tolerates lost, duplicated, delayed and
/// reordered messages, so an implementation may drop under pressure (preferably the oldest)
/// instead of blocking. It should batch messages to the same peer; `send` must not block.
pub trait Network: Send + Sync + 'static {
    /// Queues `msg` for `msg.to`.
    fn send(&self, msg: Message);
}
