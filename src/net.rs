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
//!
//! **Snapshot chunks** never ride in the batches: the host hands each one to
//! [`HostNetwork::send_transfer`], and we send it on a transfer stream of its own (QUIC send
//! priority below the Raft streams, its own flow-control window), so a megabyte of snapshot
//! never queues in front of heartbeats. The stream's header names the group; its body is one
//! [`NodeBatch`] record holding exactly that one message (the same checksummed encoding as the
//! batches, so the receiver checks and delivers it like a batch message). One sender task per
//! peer sends its chunks one after another, each acknowledged before the next stream opens:
//! the follower takes chunks only in order, so parallel streams that overtake each other
//! would make the leader rewind. At most [`TRANSFER_CHUNKS_QUEUED_PER_PEER_MAX`] chunks wait
//! per peer (beyond, dropped: the leader resends unacknowledged chunks after
//! `snapshot_resend_ms`), and each send has [`TRANSFER_SEND_MS_MAX`]. The receiver
//! ([`read_transfer`], then [`deliver_transfer`]) reads at most `snapshot_chunk_bytes` +
//! [`TRANSFER_ENVELOPE_BYTES_MAX`] within [`TRANSFER_RECV_MS_MAX`], and refuses (logs and
//! counts) anything that is not one snapshot message of the stream's group from the
//! stream's authenticated sender.

use crate::raft::{GroupId, Message, MessageBody, NodeId};
use crate::shard::{Host, HostNetwork, NodeBatch};
use crate::transport::{Envelope, IncomingTransfer, Transport, TransportError};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Largest encoded batch put in one envelope (bytes). Under the transport's 4 MiB frame
/// limit with room for framing.
pub const ENVELOPE_BYTES_MAX: usize = 3 << 20;

/// Snapshot chunks waiting for one peer's transfer sender; more are dropped (counted), and
/// the leader resends what was not acknowledged. Matches the Raft default of 4 chunks in
/// flight per follower.
pub const TRANSFER_CHUNKS_QUEUED_PER_PEER_MAX: usize = 4;

/// Longest one chunk's send may take: a slot, a connection, the stream, and the receiver's
/// acknowledgement of every byte. A chunk that takes longer is abandoned (Raft resends).
pub const TRANSFER_SEND_MS_MAX: u64 = 10_000;

/// Longest the receiver waits for one chunk's stream to end; a slower sender loses its slot.
pub const TRANSFER_RECV_MS_MAX: u64 = 10_000;

/// Bytes a transfer may carry beyond the chunk's data: the record and message headers and
/// the snapshot's metadata (its membership: a few ids).
pub const TRANSFER_ENVELOPE_BYTES_MAX: usize = 64 << 10;

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
    /// Snapshot chunks sent on transfer streams (acknowledged by the receiver's QUIC stack).
    pub snapshot_chunks_sent: AtomicU64,
    /// Bytes of those chunks as sent (encoded message).
    pub snapshot_bytes_sent: AtomicU64,
    /// Snapshot chunks not sent: the peer's queue was full, or the send failed or timed out.
    pub snapshot_chunks_dropped: AtomicU64,
    /// Snapshot chunks received on transfer streams and handed to the host.
    pub snapshot_chunks_received: AtomicU64,
    /// Bytes of those chunks as received (encoded message).
    pub snapshot_bytes_received: AtomicU64,
    /// Snapshot chunks that arrived inside a batch rather than on a transfer stream (a peer
    /// without the transfer path).
    pub snapshot_chunks_in_batches: AtomicU64,
    /// Incoming transfers refused: too large, too slow, undecodable, or not one snapshot
    /// chunk of the stream's group from the stream's sender.
    pub transfers_refused: AtomicU64,
}

/// [`HostNetwork`] over a [`Transport`].
pub struct TransportNetwork {
    transport: Transport,
    /// The host's pollers are tasks of this runtime, but a host may run on another one (tests
    /// do); the transport may spawn a task (a new peer's writer), so sends run inside this
    /// runtime's context.
    runtime: tokio::runtime::Handle,
    streams: u64,
    stats: Arc<NetStats>,
    /// Each peer's snapshot-chunk sender (a task, started on the first chunk to the peer),
    /// by the bounded queue feeding it. The tasks end when this network is dropped.
    transfer_queues: Mutex<HashMap<NodeId, mpsc::Sender<(GroupId, Bytes)>>>,
}

impl TransportNetwork {
    /// An adapter sending over `transport`, which has `streams` Raft streams. Must be made
    /// inside a Tokio runtime (the transport's).
    pub fn new(transport: Transport, streams: u16, stats: Arc<NetStats>) -> TransportNetwork {
        let runtime = tokio::runtime::Handle::current();
        let transfer_queues = Mutex::new(HashMap::new());
        TransportNetwork { transport, runtime, streams: u64::from(streams.max(1)), stats, transfer_queues }
    }

    /// The queue of `to`'s chunk sender, starting the sender if there is none (or it ended).
    fn transfer_queue(&self, to: NodeId) -> Option<mpsc::Sender<(GroupId, Bytes)>> {
        let mut queues = self.transfer_queues.lock().ok()?;
        if let Some(q) = queues.get(&to).filter(|q| !q.is_closed()) {
            return Some(q.clone());
        }
        let (tx, rx) = mpsc::channel(TRANSFER_CHUNKS_QUEUED_PER_PEER_MAX);
        let _context = self.runtime.enter();
        tokio::spawn(run_transfer_sender(self.transport.clone(), to, rx, self.stats.clone()));
        queues.insert(to, tx.clone());
        Some(tx)
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
            let NodeBatch { from, mut messages, mut quiesce, removed } = batch;
            let (right_m, right_q) = if n >= 2 {
                (messages.split_off(n / 2), Vec::new())
            } else {
                let q = quiesce.len();
                (Vec::new(), quiesce.split_off(q / 2))
            };
            self.send_slice(to, slot, NodeBatch { from, messages, quiesce, removed });
            self.send_slice(to, slot, NodeBatch { from, messages: right_m, quiesce: right_q, removed: Vec::new() });
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
        let mut slices: Vec<NodeBatch> = (0..k)
            .map(|_| NodeBatch { from: batch.from, messages: Vec::new(), quiesce: Vec::new(), removed: Vec::new() })
            .collect();
        for (g, m) in batch.messages {
            slices[(g.0 % k) as usize].messages.push((g, m));
        }
        for q in batch.quiesce {
            let GroupId(g) = q.group;
            slices[(g % k) as usize].quiesce.push(q);
        }
        for r in batch.removed {
            let GroupId(g) = r.group;
            slices[(g % k) as usize].removed.push(r);
        }
        for (slot, slice) in slices.into_iter().enumerate() {
            if !slice.messages.is_empty() || !slice.quiesce.is_empty() || !slice.removed.is_empty() {
                self.send_slice(to, slot as u64, slice);
            }
        }
    }

    fn connections(&self, to: NodeId) -> u64 {
        self.transport.connections_with(to)
    }

    fn send_transfer(&self, to: NodeId, group: GroupId, msg: Message) {
        debug_assert!(matches!(msg.body, MessageBody::Snapshot { .. }), "only snapshot chunks take the transfer path");
        let batch =
            NodeBatch { from: msg.from, messages: vec![(group, msg)], quiesce: Vec::new(), removed: Vec::new() };
        let bytes = match batch.encode() {
            Ok(b) => b,
            Err(e) => {
                warn!(%to, %group, error = %e, "cannot encode a snapshot chunk; dropped");
                return;
            }
        };
        let Some(queue) = self.transfer_queue(to) else { return };
        if queue.try_send((group, bytes)).is_err() {
            self.stats.snapshot_chunks_dropped.fetch_add(1, Ordering::Relaxed);
            debug!(%to, %group, "snapshot chunk queue full; dropped (the leader resends)");
        }
    }
}

/// Sends `to`'s snapshot chunks one at a time, each on its own transfer stream, each
/// acknowledged before the next: in order, as the follower takes them. Ends when the network
/// (the queue's sender) is dropped.
async fn run_transfer_sender(
    transport: Transport,
    to: NodeId,
    mut queue: mpsc::Receiver<(GroupId, Bytes)>,
    stats: Arc<NetStats>,
) {
    while let Some((group, bytes)) = queue.recv().await {
        let len = bytes.len() as u64;
        let deadline = Duration::from_millis(TRANSFER_SEND_MS_MAX);
        match tokio::time::timeout(deadline, send_chunk(&transport, to, group, bytes, deadline)).await {
            Ok(Ok(())) => {
                stats.snapshot_chunks_sent.fetch_add(1, Ordering::Relaxed);
                stats.snapshot_bytes_sent.fetch_add(len, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                stats.snapshot_chunks_dropped.fetch_add(1, Ordering::Relaxed);
                debug!(%to, %group, error = %e, "snapshot chunk not sent (the leader resends)");
            }
            Err(_) => {
                stats.snapshot_chunks_dropped.fetch_add(1, Ordering::Relaxed);
                warn!(%to, %group, ms = TRANSFER_SEND_MS_MAX, "snapshot chunk send timed out (the leader resends)");
            }
        }
    }
}

/// One chunk on one stream: open, write, finish and wait for the acknowledgement.
async fn send_chunk(
    transport: &Transport,
    to: NodeId,
    group: GroupId,
    bytes: Bytes,
    ack_wait: Duration,
) -> Result<(), TransportError> {
    let mut stream = transport.send_stream(to, group).await?;
    if let Err(e) = stream.write(bytes).await {
        stream.abort();
        return Err(e);
    }
    // The outer timeout bounds the whole send; this one only has to be no shorter.
    stream.finish(ack_wait).await
}

/// Why an incoming transfer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransferRefused {
    /// More bytes than one chunk and its envelope may take.
    #[error("transfer of more than {max_bytes} bytes (one snapshot chunk and its envelope)")]
    TooLarge {
        /// The limit.
        max_bytes: usize,
    },
    /// The stream did not end within [`TRANSFER_RECV_MS_MAX`].
    #[error("transfer not finished within {TRANSFER_RECV_MS_MAX} ms")]
    Timeout,
    /// The stream failed (reset by the sender, connection lost).
    #[error("transfer stream failed: {0}")]
    Stream(String),
    /// The bytes are not a node batch record.
    #[error("undecodable transfer: {0}")]
    Malformed(String),
    /// A record, but not exactly one snapshot chunk from the stream's sender for the stream's
    /// group.
    #[error("not a snapshot chunk of the stream's group from its sender: {0}")]
    Unexpected(String),
}

/// Reads one incoming transfer whole: at most `bytes_max`, within [`TRANSFER_RECV_MS_MAX`].
/// Dropping the transfer on an error stops the stream and frees the sender's slot.
pub async fn read_transfer(mut transfer: IncomingTransfer, bytes_max: usize) -> Result<Bytes, TransferRefused> {
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(piece) = transfer.read_chunk().await.map_err(|e| TransferRefused::Stream(e.to_string()))? {
            if buf.len() + piece.len() > bytes_max {
                return Err(TransferRefused::TooLarge { max_bytes: bytes_max });
            }
            buf.extend_from_slice(&piece);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(Duration::from_millis(TRANSFER_RECV_MS_MAX), read)
        .await
        .map_err(|_| TransferRefused::Timeout)?
}

/// The largest transfer a node with Raft chunks of `snapshot_chunk_bytes` accepts.
pub fn transfer_bytes_max(snapshot_chunk_bytes: usize) -> usize {
    snapshot_chunk_bytes.saturating_add(TRANSFER_ENVELOPE_BYTES_MAX)
}

/// Checks that `bytes`, received on a transfer stream of `group` from `from` (authenticated),
/// is one snapshot chunk of `group` sent by `from`, and returns it as a batch of one.
pub fn check_transfer(from: NodeId, group: GroupId, bytes: &[u8]) -> Result<NodeBatch, TransferRefused> {
    let batch = NodeBatch::decode(bytes).map_err(|e| TransferRefused::Malformed(e.to_string()))?;
    let unexpected = |why: String| Err(TransferRefused::Unexpected(why));
    if batch.from != from {
        return unexpected(format!("the record claims sender {}", batch.from));
    }
    if !batch.quiesce.is_empty() || !batch.removed.is_empty() || batch.messages.len() != 1 {
        return unexpected(format!("{} messages and {} notices", batch.messages.len(), batch.quiesce.len()));
    }
    let (g, m) = &batch.messages[0];
    if *g != group {
        return unexpected(format!("a message of group {g} on a stream of group {group}"));
    }
    if m.from != from {
        return unexpected(format!("the message claims sender {}", m.from));
    }
    if !matches!(m.body, MessageBody::Snapshot { .. }) {
        return unexpected(format!("a {} message", m.body.kind()));
    }
    Ok(batch)
}

/// Hands a snapshot chunk read from a transfer stream (or the reason it was refused) to the
/// host, exactly as a batch message would be.
pub fn deliver_transfer(
    host: &Host,
    stats: &NetStats,
    from: NodeId,
    group: GroupId,
    read: Result<Bytes, TransferRefused>,
) {
    match read.and_then(|bytes| check_transfer(from, group, &bytes).map(|b| (b, bytes.len()))) {
        Ok((batch, len)) => {
            stats.snapshot_chunks_received.fetch_add(1, Ordering::Relaxed);
            stats.snapshot_bytes_received.fetch_add(len as u64, Ordering::Relaxed);
            host.receive(batch);
        }
        Err(e) => {
            stats.transfers_refused.fetch_add(1, Ordering::Relaxed);
            warn!(%from, %group, error = %e, "transfer refused");
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
    let in_batch = batch.messages.iter().filter(|(_, m)| matches!(m.body, MessageBody::Snapshot { .. })).count();
    if in_batch > 0 {
        stats.snapshot_chunks_in_batches.fetch_add(in_batch as u64, Ordering::Relaxed);
    }
    host.receive(batch);
}
