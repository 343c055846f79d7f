//! Counters per peer, and the snapshot handed to the node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::id::NodeId;

/// Live counters of one peer; updated with relaxed atomics (they are statistics, not
/// synchronization).
#[derive(Default, Debug)]
pub(crate) struct PeerCounters {
    pub bytes_sent: AtomicU64,
    pub envelopes_sent: AtomicU64,
    pub batches_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub envelopes_received: AtomicU64,
    pub batches_received: AtomicU64,
    pub queue_drops: AtomicU64,
    pub fault_drops: AtomicU64,
    pub lost_on_disconnect: AtomicU64,
    pub connections: AtomicU64,
    pub frames_rejected: AtomicU64,
    pub transfers_sent: AtomicU64,
    pub transfers_received: AtomicU64,
    pub transfers_refused: AtomicU64,
    pub requests_sent: AtomicU64,
    pub requests_received: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What happened with one peer since the transport started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerMetrics {
    /// Bytes of Raft frames written to the peer (headers included).
    pub bytes_sent: u64,
    /// Envelopes written to the peer.
    pub envelopes_sent: u64,
    /// Batch frames written (one per Raft stream per flush).
    pub batches_sent: u64,
    /// Bytes read from the peer's Raft streams.
    pub bytes_received: u64,
    /// Envelopes received from the peer and handed to the node.
    pub envelopes_received: u64,
    /// Batch frames received.
    pub batches_received: u64,
    /// Oldest envelopes dropped because the peer's queue was full.
    pub queue_drops: u64,
    /// Envelopes dropped by fault injection (block or drop fraction), both directions.
    pub fault_drops: u64,
    /// Envelopes taken from the queue but lost because the connection failed while writing.
    pub lost_on_disconnect: u64,
    /// Connections established with the peer, first one included.
    pub connections: u64,
    /// Connections after the first: redials after a failure, or the peer dialing again.
    pub reconnects: u64,
    /// Frames from the peer that were oversized or malformed (each closed the connection).
    pub frames_rejected: u64,
    /// Large transfers opened to the peer.
    pub transfers_sent: u64,
    /// Large transfers accepted from the peer.
    pub transfers_received: u64,
    /// Transfers from the peer stopped on arrival: over `transfers_in_per_peer_max`, blocked
    /// by fault injection, or the node no longer takes transfers.
    pub transfers_refused: u64,
    /// Requests sent to the peer.
    pub requests_sent: u64,
    /// Requests received from the peer.
    pub requests_received: u64,
    /// Envelopes waiting in the peer's queue now.
    pub queue_envelopes: usize,
    /// Whether a connection is up now.
    pub connected: bool,
    /// QUIC's smoothed round-trip estimate of the current connection.
    pub rtt: Option<Duration>,
}

impl PeerCounters {
    pub(crate) fn snapshot(&self) -> PeerMetrics {
        let connections = get(&self.connections);
        PeerMetrics {
            bytes_sent: get(&self.bytes_sent),
            envelopes_sent: get(&self.envelopes_sent),
            batches_sent: get(&self.batches_sent),
            bytes_received: get(&self.bytes_received),
            envelopes_received: get(&self.envelopes_received),
            batches_received: get(&self.batches_received),
            queue_drops: get(&self.queue_drops),
            fault_drops: get(&self.fault_drops),
            lost_on_disconnect: get(&self.lost_on_disconnect),
            connections,
            reconnects: connections.saturating_sub(1),
            frames_rejected: get(&self.frames_rejected),
            transfers_sent: get(&self.transfers_sent),
            transfers_received: get(&self.transfers_received),
            transfers_refused: get(&self.transfers_refused),
            requests_sent: get(&self.requests_sent),
            requests_received: get(&self.requests_received),
            queue_envelopes: 0,
            connected: false,
            rtt: None,
        }
    }
}

/// A snapshot of the whole transport.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TransportMetrics {
    /// Per known peer.
    pub peers: BTreeMap<NodeId, PeerMetrics>,
    /// Incoming connections refused: failed TLS handshake (no certificate, unknown CA,
    /// expired, ...), no usable identity, or a node claiming to be this one.
    pub handshakes_refused: u64,
    /// Dials that failed (peer down, or its certificate refused).
    pub dials_failed: u64,
    /// Bad frames from clients (not nodes); nodes' are counted per peer.
    pub client_frames_rejected: u64,
}
