//! An in-memory network connecting [`Raft`] handles in one process, with fault injection.

use crate::driver::Raft;
use crate::message::Message;
use crate::network::Network;
use crate::types::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<NodeId, Raft>,
    /// Directed links that drop everything: (from, to).
    blocked: BTreeSet<(NodeId, NodeId)>,
    delivered: u64,
    dropped: u64,
}

/// Routes messages between the groups registered with it. Clone it freely: clones share
/// the routing table.
#[derive(Clone, Default)]
pub struct MemRouter {
    inner: Arc<Mutex<Inner>>,
}

impl MemRouter {
    /// An empty router.
    pub fn new() -> MemRouter {
        MemRouter::default()
    }

    /// The [`Network`] a node uses to send through this router.
    pub fn network(&self) -> MemNetwork {
        MemNetwork { router: self.clone() }
    }

    /// Makes `raft` reachable under its node id (replacing an earlier registration).
    pub fn register(&self, raft: Raft) {
        self.lock().nodes.insert(raft.id(), raft);
    }

    /// Makes a node unreachable (as if it crashed).
    pub fn unregister(&self, id: NodeId) -> Option<Raft> {
        self.lock().nodes.remove(&id)
    }

    /// Drops every message from `from` to `to`.
    pub fn block(&self, from: NodeId, to: NodeId) {
        self.lock().blocked.insert((from, to));
    }

    /// Cuts `id` off from every other node, both ways.
    pub fn isolate(&self, id: NodeId) {
        let mut g = self.lock();
        let others: Vec<NodeId> = g.nodes.keys().copied().filter(|n| *n != id).collect();
        for o in others {
            g.blocked.insert((id, o));
            g.blocked.insert((o, id));
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.lock().blocked.clear();
    }

    /// Messages delivered and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        let g = self.lock();
        (g.delivered, g.dropped)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock poisons it; the routing table is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, msg: Message) {
        let target = {
            let mut g = self.lock();
            if g.blocked.contains(&(msg.from, msg.to)) {
                g.dropped += 1;
                return;
            }
            match g.nodes.get(&msg.to).cloned() {
                Some(r) => {
                    g.delivered += 1;
                    r
                }
                None => {
                    g.dropped += 1;
                    return;
                }
            }
        };
        target.receive(msg);
    }
}

/// One node's handle on a [`MemRouter`].
#[derive(Clone)]
pub struct MemNetwork {
    router: MemRouter,
}

impl Network for MemNetwork {
    fn send(&self, msg: Message) {
        self.router.route(msg);
    }
}
