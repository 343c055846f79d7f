//! The node's endpoint: connections, per-peer queues and writers, readers, dialing.
//!
//! Tasks, and why each exists:
//! - one accept loop: TLS handshakes of incoming connections (at most `handshakes_max` at a
//!   time), identity check, then a connection task;
//! - per peer, one writer: drains the peer's queue into batch frames on K Raft streams;
//! - per peer with a higher id than ours, one dialer: connects, waits for the connection to
//!   end, redials with backoff (the lower id dials; the higher one only waits);
//! - per connection, one task accepting the peer's streams, and one task per stream.
//!
//! This file holds the handle, the shared state and the peers; the tasks live in `inbound.rs`
//! (accepting, reading) and `outbound.rs` (dialing, writing).

mod inbound;
mod inbound_pipe;
mod outbound;

use inbound::run_accept;
use outbound::{run_dialer, run_writer};

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cert::{identity_of_cert, node_name, TlsIdentity};
use crate::config::TransportConfig;
use crate::error::TransportError;
use crate::fault::FaultState;
#[cfg(feature = "fault-injection")]
use crate::fault::SplitMix64;
use crate::frame::{
    decode_batch, decode_stream_header, encode_frame, encode_stream_header, envelope_wire_bytes, BatchBuilder,
    FrameDecoder, FrameError, FrameKind, StreamHeader, FRAME_HEADER_BYTES,
};
use crate::id::{Envelope, GroupId, NodeId, PeerIdentity};
use crate::metrics::{add, PeerCounters, PeerMetrics, TransportMetrics};
use crate::request_handler::{RequestHandler, Serving};
use crate::stream::{
    codes, read_frame_exact, request_on, stop_refused, IncomingRequest, IncomingTransfer, OutgoingTransfer, ReadFail,
    Responder, READ_CHUNK_BYTES_MAX,
};
use crate::tls;

/// QUIC send priority of Raft streams: above transfers, so heartbeats go first.
const RAFT_STREAM_PRIORITY: i32 = 10;
/// QUIC send priority of transfer streams.
const TRANSFER_STREAM_PRIORITY: i32 = 0;
/// Longest error reason sent back to a requester; a handler's reason is cut to it so that the
/// answer always fits the requester's frame limit (at least `FRAME_BYTES_MIN`).
const ERROR_REASON_BYTES_MAX: usize = 512;

/// `text` cut to at most `bytes_max` bytes, at a character boundary.
fn truncate(text: &str, bytes_max: usize) -> &[u8] {
    let mut end = text.len().min(bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// What the node receives. Each channel is bounded (see [`crate::Limits`]).
#[derive(Debug)]
pub struct Incoming {
    /// Raft envelopes with the sender's node id (from its certificate), in order per group.
    pub envelopes: mpsc::Receiver<(NodeId, Envelope)>,
    /// Large transfers opened by peers.
    pub transfers: mpsc::Receiver<IncomingTransfer>,
    /// Requests from nodes and clients, while no [`RequestHandler`] serves them
    /// ([`Transport::serve_requests_with`]).
    pub requests: mpsc::Receiver<IncomingRequest>,
}

/// One envelope waiting in a peer's queue.
#[derive(Debug)]
struct Queued {
    envelope: Envelope,
    /// Set by the delay fault: not written before this instant.
    ready_at: Option<Instant>,
}

/// A peer's outgoing queue: bounded by count and bytes, oldest dropped first.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Queued>,
    /// Sum of the queued payload lengths.
    payload_bytes: usize,
}

/// The current connection of a peer, with a generation so that a task ending an old
/// connection never clears a newer one.
#[derive(Clone, Debug)]
struct ConnSlot {
    conn: Connection,
    generation: u64,
}

/// Everything about one peer.
#[derive(Debug)]
struct Peer {
    id: NodeId,
    queue: Mutex<Queue>,
    /// Wakes the writer when the queue gains an envelope.
    wake: Notify,
    /// The connection in use, if any; the writer and requests wait on it.
    conn: watch::Sender<Option<ConnSlot>>,
    /// Where to dial the peer (only used when our id is lower).
    addr: watch::Sender<Option<SocketAddr>>,
    counters: Arc<PeerCounters>,
    /// Slots for incoming transfers from this peer (`transfers_in_per_peer_max`); the QUIC
    /// stream limit alone would let a peer with few Raft streams open more.
    transfers_in: Arc<Semaphore>,
}

/// State shared by the handle and all tasks.
struct Shared {
    config: TransportConfig,
    endpoint: Endpoint,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    faults: Mutex<FaultState>,
    /// Fast path: false while no fault is set.
    faults_active: AtomicBool,
    envelopes_tx: mpsc::Sender<(NodeId, Envelope)>,
    transfers_tx: mpsc::Sender<IncomingTransfer>,
    requests_tx: mpsc::Sender<IncomingRequest>,
    /// Serves requests in place of `requests_tx`, once set.
    handler: std::sync::OnceLock<Arc<dyn RequestHandler>>,
    /// How dials present this node and whom they trust ([`Transport::reload_tls`] replaces it).
    dial_config: Mutex<quinn::ClientConfig>,
    /// Slots for outgoing transfers (`transfers_out_max`).
    transfers_out: Arc<Semaphore>,
    /// Slots for handshakes in progress (`handshakes_max`).
    handshakes: Arc<Semaphore>,
    /// Becomes true once at shutdown.
    shutdown: watch::Sender<bool>,
    next_generation: AtomicU64,
    handshakes_refused: AtomicU64,
    dials_failed: AtomicU64,
    client_frames_rejected: AtomicU64,
    /// Writers, awaited at shutdown so they can flush; other tasks end with their connection.
    writers: Mutex<Vec<JoinHandle<()>>>,
    /// Everything else, aborted at shutdown if still running.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug elsewhere; the data (queues,
    // counters, maps) stays usable, so keep going rather than cascade the panic.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running transport. Cheap to clone; every clone drives the same endpoint.
///
/// Connections: one per pair of nodes. The node with the lower id dials (it needs the peer's
/// address, from [`TransportConfig::peers`] or [`set_peer_addr`](Self::set_peer_addr)); the
/// higher one never dials and queues what it sends until the lower one connects. A peer
/// that restarts is redialed with exponential backoff (`reconnect_backoff_ms_min..max`);
/// a newer connection from the same peer replaces the older one.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("node", &self.shared.config.node).finish_non_exhaustive()
    }
}

impl Transport {
    /// Binds the endpoint and starts accepting and dialing. Fails if the configuration is
    /// inconsistent, the certificate does not name `config.node`, or the address is taken.
    pub async fn start(config: TransportConfig) -> Result<(Transport, Incoming), TransportError> {
        config.validate()?;
        match config.tls.identity()? {
            PeerIdentity::Node(id) if id == config.node => {}
            other => {
                return Err(TransportError::Config(format!(
                    "certificate names {other}, but this node is n{}",
                    config.node
                )))
            }
        }
        let quic = tls::quic_transport(&config)?;
        let server = tls::server_config(&config.tls, quic.clone())?;
        let TlsIdentity { ca, chain, key } = config.tls.clone();
        let client = tls::client_config(&ca, Some((chain, key)), quic)?;
        let endpoint = Endpoint::server(server, config.listen_addr)?;

        let (envelopes_tx, envelopes) = mpsc::channel(config.limits.incoming_envelopes_max);
        let (transfers_tx, transfers) = mpsc::channel(config.limits.incoming_queue_max);
        let (requests_tx, requests) = mpsc::channel(config.limits.incoming_queue_max);
        let shared = Arc::new(Shared {
            endpoint,
            peers: Mutex::new(HashMap::new()),
            faults: Mutex::new(FaultState::default()),
            faults_active: AtomicBool::new(false),
            envelopes_tx,
            transfers_tx,
            requests_tx,
            handler: std::sync::OnceLock::new(),
            dial_config: Mutex::new(client),
            transfers_out: Arc::new(Semaphore::new(config.limits.transfers_out_max)),
            handshakes: Arc::new(Semaphore::new(config.limits.handshakes_max)),
            shutdown: watch::Sender::new(false),
            next_generation: AtomicU64::new(1),
            handshakes_refused: AtomicU64::new(0),
            dials_failed: AtomicU64::new(0),
            client_frames_rejected: AtomicU64::new(0),
            writers: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            config,
        });
        let transport = Transport { shared: shared.clone() };
        for (node, addr) in shared.config.peers.clone() {
            transport.set_peer_addr(node, addr)?;
        }
        let accept = tokio::spawn(run_accept(shared.clone()));
        lock(&shared.tasks).push(accept);
        info!(node = %shared.config.node, addr = ?shared.endpoint.local_addr().ok(), "transport started");
        Ok((transport, Incoming { envelopes, transfers, requests }))
    }

    /// Serves every request that arrives from now on with `handler`, in the task the transport
    /// runs for that request, instead of handing it to [`Incoming::requests`] (which still
    /// holds those that arrived before). Set once: a second handler is refused.
    pub fn serve_requests_with(&self, handler: Arc<dyn RequestHandler>) -> Result<(), TransportError> {
        self.shared.handler.set(handler).map_err(|_| TransportError::Config("requests already have a handler".into()))
    }

    /// Presents `tls` from now on (a renewed certificate, or a new CA's during a rotation):
    /// connections accepted or dialed after this use its certificate and trust its CAs; those
    /// already open keep the certificates they were made with until they close. The new
    /// certificate must name this node; on any error nothing changes.
    pub fn reload_tls(&self, tls: TlsIdentity) -> Result<(), TransportError> {
        let node = self.shared.config.node;
        match tls.identity()? {
            PeerIdentity::Node(id) if id == node => {}
            other => {
                return Err(TransportError::Config(format!("certificate names {other}, but this node is n{node}")))
            }
        }
        let quic = tls::quic_transport(&self.shared.config)?;
        let server = tls::server_config(&tls, quic.clone())?;
        let client = tls::client_config(&tls.ca, Some((tls.chain.clone(), tls.key.clone_key())), quic)?;
        self.shared.endpoint.set_server_config(Some(server));
        *lock(&self.shared.dial_config) = client;
        info!(node = %node, "TLS certificate and trusted CAs reloaded");
        Ok(())
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.shared.config.node
    }

    /// The bound UDP address (useful after binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.shared.endpoint.local_addr()?)
    }

    /// Sets or changes where `node` listens. Only used if our id is lower (we dial it); a
    /// change takes effect at the next dial (a live connection is kept).
    pub fn set_peer_addr(&self, node: NodeId, addr: SocketAddr) -> Result<(), TransportError> {
        let peer = self.shared.peer(node)?;
        peer.addr.send_replace(Some(addr));
        Ok(())
    }

    /// Queues `envelope` for `to` and returns at once. If the peer's queue is full, the oldest
    /// envelopes are dropped (counted in `queue_drops`): Raft tolerates loss, and a down peer
    /// must not make the node block or grow without bound. Envelopes of one group reach the
    /// peer in the order sent (while the connection lasts).
    pub fn send(&self, to: NodeId, envelope: Envelope) -> Result<(), TransportError> {
        let shared = &self.shared;
        if *shared.shutdown.borrow() {
            return Err(TransportError::Shutdown);
        }
        let max = shared.config.envelope_payload_bytes_max();
        if envelope.payload.len() > max {
            return Err(TransportError::TooLarge {
                bytes: envelope_wire_bytes(&envelope) + FRAME_HEADER_BYTES,
                max_bytes: shared.config.limits.frame_bytes_max,
            });
        }
        let peer = shared.peer(to)?;
        let mut ready_at = None;
        if shared.faults_active.load(Ordering::Acquire) {
            let mut faults = lock(&shared.faults);
            if faults.blocked.contains(&to) || faults.roll_drop() {
                add(&peer.counters.fault_drops, 1);
                return Ok(());
            }
            ready_at = faults.delay.get(&to).map(|delay| Instant::now() + *delay);
        }
        let limits = &shared.config.limits;
        {
            let mut queue = lock(&peer.queue);
            let len = envelope.payload.len();
            while !queue.items.is_empty()
                && (queue.items.len() >= limits.queue_envelopes_max
                    || queue.payload_bytes + len > limits.queue_bytes_max)
            {
                if let Some(old) = queue.items.pop_front() {
                    queue.payload_bytes -= old.envelope.payload.len();
                    add(&peer.counters.queue_drops, 1);
                }
            }
            queue.payload_bytes += len;
            queue.items.push_back(Queued { envelope, ready_at });
        }
        peer.wake.notify_one();
        Ok(())
    }

    /// Connections established with `node` so far, dialed or accepted (0 for an unknown peer).
    /// A peer that restarted comes back on a new connection, however quickly it came back.
    pub fn connections_with(&self, node: NodeId) -> u64 {
        lock(&self.shared.peers).get(&node).map_or(0, |peer| peer.counters.connections.load(Ordering::Relaxed))
    }

    /// Envelopes waiting for `to` now (0 for an unknown peer). A producer can use it to slow
    /// down before the queue starts dropping.
    pub fn queue_len(&self, to: NodeId) -> usize {
        lock(&self.shared.peers).get(&to).map_or(0, |peer| lock(&peer.queue).items.len())
    }

    /// Sends a request to node `to` and waits for its response, all within `timeout`
    /// (including waiting for a connection).
    pub async fn request(&self, to: NodeId, body: Bytes, timeout: Duration) -> Result<Bytes, TransportError> {
        let shared = &self.shared;
        let frame_max = shared.config.limits.frame_bytes_max;
        if body.len() + FRAME_HEADER_BYTES > frame_max {
            return Err(TransportError::TooLarge { bytes: body.len() + FRAME_HEADER_BYTES, max_bytes: frame_max });
        }
        if shared.blocked(to) {
            return Err(TransportError::Blocked(to));
        }
        let peer = shared.peer(to)?;
        add(&peer.counters.requests_sent, 1);
        let work = async {
            let conn = shared.wait_connection(&peer).await?;
            request_on(&conn, &body, frame_max).await
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| TransportError::Timeout)?
    }

    /// Opens a large transfer for `group` to `to`. Waits for a connection, then for one of
    /// `transfers_out_max` slots (wrap it in a timeout if needed). The transfer's stream has a lower
    /// send priority than the Raft streams, and QUIC flow control makes it wait for the
    /// receiver, so it never delays heartbeats.
    pub async fn send_stream(&self, to: NodeId, group: GroupId) -> Result<OutgoingTransfer, TransportError> {
        let shared = &self.shared;
        if shared.blocked(to) {
            return Err(TransportError::Blocked(to));
        }
        let peer = shared.peer(to)?;
        // The connection first, then the slot: a transfer waiting for a peer that is down must
        // not hold one of the few slots that transfers to live peers need.
        let conn = shared.wait_connection(&peer).await?;
        let permit = shared.transfers_out.clone().acquire_owned().await.map_err(|_| TransportError::Shutdown)?;
        let lost = |e: String| TransportError::ConnectionLost(e);
        let mut send = conn.open_uni().await.map_err(|e| lost(e.to_string()))?;
        let _ = send.set_priority(TRANSFER_STREAM_PRIORITY);
        send.write_chunk(encode_stream_header(&StreamHeader::Transfer { group }))
            .await
            .map_err(|e| lost(e.to_string()))?;
        add(&peer.counters.transfers_sent, 1);
        Ok(OutgoingTransfer { send, _permit: permit, sent_bytes: 0 })
    }

    /// A snapshot of the counters of every known peer.
    pub fn metrics(&self) -> TransportMetrics {
        let shared = &self.shared;
        let peers = lock(&shared.peers).values().cloned().collect::<Vec<_>>();
        let mut metrics = TransportMetrics {
            handshakes_refused: shared.handshakes_refused.load(Ordering::Relaxed),
            dials_failed: shared.dials_failed.load(Ordering::Relaxed),
            client_frames_rejected: shared.client_frames_rejected.load(Ordering::Relaxed),
            ..Default::default()
        };
        for peer in peers {
            let mut m: PeerMetrics = peer.counters.snapshot();
            m.queue_envelopes = lock(&peer.queue).items.len();
            if let Some(slot) = peer.conn.borrow().as_ref() {
                m.connected = slot.conn.close_reason().is_none();
                m.rtt = Some(slot.conn.rtt());
            }
            metrics.peers.insert(peer.id, m);
        }
        metrics
    }

    /// Fault injection: discards all traffic to and from `node` (envelopes dropped and
    /// counted, requests and transfers fail with [`TransportError::Blocked`]) until unblocked.
    /// The connection itself stays up, as QUIC keep-alives are not blocked.
    #[cfg(feature = "fault-injection")]
    pub fn block_peer(&self, node: NodeId) {
        self.shared.update_faults(|faults| {
            faults.blocked.insert(node);
        });
    }

    /// Fault injection: undoes [`block_peer`](Self::block_peer).
    #[cfg(feature = "fault-injection")]
    pub fn unblock_peer(&self, node: NodeId) {
        self.shared.update_faults(|faults| {
            faults.blocked.remove(&node);
        });
    }

    /// Fault injection: envelopes sent to `node` from now on wait `delay` before being written
    /// (order is kept). `Duration::ZERO` removes the delay.
    #[cfg(feature = "fault-injection")]
    pub fn set_peer_delay(&self, node: NodeId, delay: Duration) {
        self.shared.update_faults(|faults| {
            if delay.is_zero() {
                faults.delay.remove(&node);
            } else {
                faults.delay.insert(node, delay);
            }
        });
    }

    /// Fault injection: drops `fraction` (0.0..=1.0) of outgoing Raft envelopes, to all peers,
    /// chosen by a generator seeded with `seed` (the same seed drops the same sequence).
    #[cfg(feature = "fault-injection")]
    pub fn set_drop_fraction(&self, fraction: f64, seed: u64) {
        let fraction = fraction.clamp(0.0, 1.0);
        self.shared.update_faults(|faults| {
            faults.drop = (fraction > 0.0).then(|| (fraction, SplitMix64::new(seed)));
        });
    }

    /// Fault injection: a busy receiver. Its connection tasks (nodes' and clients' alike) wait
    /// `delay` before each round of taking up the streams a peer opened, requests included
    /// (QUIC acknowledges their data meanwhile); `Duration::ZERO` removes it.
    #[cfg(feature = "fault-injection")]
    pub fn set_accept_delay(&self, delay: Duration) {
        self.shared.update_faults(|faults| faults.accept_delay = (!delay.is_zero()).then_some(delay));
    }

    /// Fault injection: removes every fault.
    #[cfg(feature = "fault-injection")]
    pub fn clear_faults(&self) {
        self.shared.update_faults(|faults| *faults = FaultState::default());
    }

    /// Closes everything: stops accepting sends, lets writers flush what is queued (up to
    /// `shutdown_flush_ms_max`), closes connections with code 0 and waits briefly for the
    /// peers to be told. The `Incoming` channels end once the tasks have stopped and every
    /// `Transport` handle is dropped.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        if shared.shutdown.send_replace(true) {
            return;
        }
        let deadline = Duration::from_millis(shared.config.timing.shutdown_flush_ms_max);
        let writers = std::mem::take(&mut *lock(&shared.writers));
        let aborts = writers.iter().map(|w| w.abort_handle()).collect::<Vec<_>>();
        let flush = async {
            for writer in writers {
                let _ = writer.await;
            }
        };
        if tokio::time::timeout(deadline, flush).await.is_err() {
            warn!(node = %shared.config.node, "shutdown: writers did not flush in time");
            aborts.iter().for_each(|a| a.abort());
        }
        shared.endpoint.close(codes::CLOSE_SHUTDOWN, b"shutdown");
        let tasks = std::mem::take(&mut *lock(&shared.tasks));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        for peer in lock(&shared.peers).values() {
            peer.conn.send_replace(None);
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.endpoint.wait_idle()).await;
        info!(node = %shared.config.node, "transport shut down");
    }
}

impl Shared {
    /// How long a connection task waits before each round of taking up streams (fault
    /// injection).
    fn accept_delay(&self) -> Option<Duration> {
        if !self.faults_active.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.faults).accept_delay
    }

    fn blocked(&self, node: NodeId) -> bool {
        self.faults_active.load(Ordering::Acquire) && lock(&self.faults).blocked.contains(&node)
    }

    #[cfg(feature = "fault-injection")]
    fn update_faults(&self, change: impl FnOnce(&mut FaultState)) {
        let mut faults = lock(&self.faults);
        change(&mut faults);
        self.faults_active.store(faults.active(), Ordering::Release);
    }

    /// The peer's state, created (with its writer and, if we dial it, its dialer) on first use.
    fn peer(self: &Arc<Self>, node: NodeId) -> Result<Arc<Peer>, TransportError> {
        if node == self.config.node {
            return Err(TransportError::SelfPeer(node));
        }
        let mut peers = lock(&self.peers);
        if let Some(peer) = peers.get(&node) {
            return Ok(peer.clone());
        }
        if *self.shutdown.borrow() {
            return Err(TransportError::Shutdown);
        }
        if peers.len() >= self.config.limits.peers_max {
            return Err(TransportError::TooManyPeers(self.config.limits.peers_max));
        }
        let peer = Arc::new(Peer {
            id: node,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            conn: watch::Sender::new(None),
            addr: watch::Sender::new(None),
            counters: Arc::new(PeerCounters::default()),
            transfers_in: Arc::new(Semaphore::new(usize::from(self.config.limits.transfers_in_per_peer_max))),
        });
        peers.insert(node, peer.clone());
        drop(peers);
        let writer = tokio::spawn(run_writer(self.clone(), peer.clone()));
        lock(&self.writers).push(writer);
        if self.config.node < node {
            let dialer = tokio::spawn(run_dialer(self.clone(), peer.clone()));
            lock(&self.tasks).push(dialer);
        }
        Ok(peer)
    }

    async fn wait_connection(&self, peer: &Peer) -> Result<Connection, TransportError> {
        let mut conn_rx = peer.conn.subscribe();
        let mut shutdown_rx = self.shutdown.subscribe();
        loop {
            if *shutdown_rx.borrow_and_update() {
                return Err(TransportError::Shutdown);
            }
            if let Some(slot) = conn_rx.borrow_and_update().as_ref() {
                if slot.conn.close_reason().is_none() {
                    return Ok(slot.conn.clone());
                }
            }
            tokio::select! {
                changed = conn_rx.changed() => if changed.is_err() { return Err(TransportError::Shutdown) },
                _ = shutdown_rx.changed() => {}
            }
        }
    }

    /// Makes `conn` the peer's connection; closes the one it replaces.
    fn install(&self, peer: &Peer, conn: Connection) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let old = peer.conn.send_replace(Some(ConnSlot { conn, generation }));
        if let Some(old) = old {
            old.conn.close(codes::CLOSE_REPLACED, b"replaced by a newer connection");
        }
        add(&peer.counters.connections, 1);
        generation
    }

    fn uninstall(&self, peer: &Peer, generation: u64) {
        peer.conn.send_if_modified(|slot| match slot {
            Some(current) if current.generation == generation => {
                *slot = None;
                true
            }
            _ => false,
        });
    }

    fn reject_frame(&self, peer: Option<&Peer>, from: &PeerIdentity, conn: &Connection, error: &FrameError) {
        match peer {
            Some(peer) => add(&peer.counters.frames_rejected, 1),
            None => {
                self.client_frames_rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
        let code = match error {
            FrameError::Oversized { .. } => codes::CLOSE_FRAME_OVERSIZED,
            _ => codes::CLOSE_FRAME_MALFORMED,
        };
        warn!(node = %self.config.node, peer = %from, %error, "closing connection: bad frame");
        conn.close(code, error.to_string().as_bytes());
    }
}
