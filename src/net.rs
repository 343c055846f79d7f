//! The host's network over the QUIC transport.
//!
//! The host hands over one [`NodeBatch`] per destination per round. We split it into one
//! envelope per transport stream: the messages of group `g` go in slice `g % K` (K = the
//! transport's Raft streams), sent as an envelope tagged with group id `g % K`, so they travel
//! on stream `g % K` — the messages of one group stay in order, and one lost packet delays only
//! the groups of its stream instead of every group of the round. A slice whose encoding is over
//! [`ENVELOPE_BYTES_MAX`] is halved until it fits (halves keep their order on the same
//! stream); a single message over the limit is dropped and logged (Raft resends; the Raft
//! limits keep appends and snapshot chunks near 1 MiB). A liveness ping (empty batch) travels
//! on stream 0.
//!
//! On receipt, [`deliver`] decodes the envelope and checks that the batch's `from` is the
//! sender's authenticated node id (from its certificate): a batch claiming another sender is
//! dropped and logged.

use crate::raft::{GroupId, NodeId};
use crate::shard::{Host, HostNetwork, NodeBatch};
use crate::transport::{Envelope, Transport};
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{debug, warn};

/// Largest encoded batch put in one envelope (bytes). Under the transport's 4 MiB frame
/// limit with room for framing.
pub const ENVELOPE_BYTES_MAX: usize = 3 << 20;

/// Counters of the adapter.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Batches received whose `from` did not match the sender's certificate.
    pub spoofed: AtomicU64,
    /// Envelopes that did not decode.
    pub malformed: AtomicU64,
    /// Messages dropped because one alone was over [`ENVELOPE_BYTES_MAX`].
    pub oversized: AtomicU64,
    /// Envelopes the transport refused (shut down, too many peers).
    pub send_failed: AtomicU64,
}

/// [`HostNetwork`] over a [`Transport`].
pub struct TransportNetwork {
    transport: Transport,
    /// The host calls `send` from its poller threads, outside Tokio; the transport may spawn a
    /// task (a new peer's writer), so sends run inside this runtime's context.
    runtime: tokio::runtime::Handle,
    streams: u64,
    stats: std::sync::Arc<NetStats>,
}

impl TransportNetwork {
    /// An adapter sending over `transport`, which has `streams` Raft streams. Must be made
    /// inside a Tokio runtime (the transport's).
    pub fn new(transport: Transport, streams: u16, stats: std::sync::Arc<NetStats>) -> TransportNetwork {
        let runtime = tokio::runtime::Handle::current();
        TransportNetwork { transport, runtime, streams: u64::from(streams.max(1)), stats }
    }

    fn send_slice(&self, to: NodeId, slot: u64, batch: NodeBatch) {
        let bytes = match batch.encode() {
            Ok(b) => b,
            Err(e) => {
                warn!(%to, error = %e, "cannot encode a node batch; dropped");
                return;
            }
        };
        if bytes.len() > ENVELOPE_BYTES_MAX {
            let n = batch.messages.len();
            if n + batch.quiesce.len() <= 1 {
                self.stats.oversized.fetch_add(1, Ordering::Relaxed);
                warn!(%to, bytes = bytes.len(), "one Raft message exceeds the envelope limit; dropped");
                return;
            }
            let NodeBatch { from, mut messages, mut quiesce } = batch;
            let (right_m, right_q) = if n >= 2 {
                (messages.split_off(n / 2), Vec::new())
            } else {
                let q = quiesce.len();
                (Vec::new(), quiesce.split_off(q / 2))
            };
            self.send_slice(to, slot, NodeBatch { from, messages, quiesce });
            self.send_slice(to, slot, NodeBatch { from, messages: right_m, quiesce: right_q });
            return;
        }
        if let Err(e) = self.transport.send(to, Envelope::new(GroupId(slot), bytes)) {
            self.stats.send_failed.fetch_add(1, Ordering::Relaxed);
            debug!(%to, error = %e, "transport refused a batch");
        }
    }
}

impl HostNetwork for TransportNetwork {
    fn send(&self, to: NodeId, batch: NodeBatch) {
        let _context = self.runtime.enter();
        if batch.messages.is_empty() && batch.quiesce.is_empty() {
            self.send_slice(to, 0, batch);
            return;
        }
        let k = self.streams;
        let mut slices: Vec<NodeBatch> =
            (0..k).map(|_| NodeBatch { from: batch.from, messages: Vec::new(), quiesce: Vec::new() }).collect();
        for (g, m) in batch.messages {
            slices[(g.0 % k) as usize].messages.push((g, m));
        }
        for q in batch.quiesce {
            let GroupId(g) = q.group;
            slices[(g % k) as usize].quiesce.push(q);
        }
        for (slot, slice) in slices.into_iter().enumerate() {
            if !slice.messages.is_empty() || !slice.quiesce.is_empty() {
                self.send_slice(to, slot as u64, slice);
            }
        }
    }
}

/// Hands an envelope received from `from` (authenticated) to the host.
pub fn deliver(host: &Host, stats: &NetStats, from: NodeId, envelope: Envelope) {
    let batch = match NodeBatch::decode(&envelope.payload) {
        Ok(b) => b,
        Err(e) => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            warn!(from = %from, error = %e, "undecodable node batch; dropped");
            return;
        }
    };
    if batch.from != from {
        stats.spoofed.fetch_add(1, Ordering::Relaxed);
        warn!(sender = %from, claimed = %batch.from, "node batch claims another sender; dropped");
        return;
    }
    host.receive(batch);
}
