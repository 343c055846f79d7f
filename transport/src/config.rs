//! Configuration and limits.

use std::net::SocketAddr;

use crate::cert::TlsIdentity;
use crate::error::TransportError;
use crate::frame::{ENVELOPE_HEADER_BYTES, FRAME_HEADER_BYTES};
use crate::id::NodeId;

/// Default largest frame, header included (4 MiB).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 4 << 20;
/// Smallest `frame_bytes_max` accepted: room for one small envelope.
pub const FRAME_BYTES_MIN: usize = 1024;
/// Default byte size at which a batch frame is cut even if the queue is not empty (64 KiB).
pub const BATCH_BYTES_MAX_DEFAULT: usize = 64 << 10;
/// Default per-peer queue length in envelopes.
pub const QUEUE_ENVELOPES_MAX_DEFAULT: usize = 16_384;
/// Default per-peer queue size in payload bytes (64 MiB).
pub const QUEUE_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// Default number of long-lived Raft streams per connection (K).
pub const RAFT_STREAMS_DEFAULT: u16 = 4;
/// Most Raft streams per connection a node accepts from a peer (and may configure).
pub const RAFT_STREAMS_MAX: u16 = 64;
/// Default capacity of the channel of received envelopes (all peers together).
pub const INCOMING_ENVELOPES_MAX_DEFAULT: usize = 65_536;
/// Default number of outgoing large transfers at a time (all peers together).
pub const TRANSFERS_OUT_MAX_DEFAULT: usize = 2;
/// Default number of incoming large transfers at a time per connection.
pub const TRANSFERS_IN_PER_PEER_MAX_DEFAULT: u16 = 2;
/// Default number of concurrent requests a peer may have open on one connection.
pub const REQUESTS_IN_PER_PEER_MAX_DEFAULT: u16 = 64;
/// Default capacity of the channels of incoming transfers and requests.
pub const INCOMING_QUEUE_MAX_DEFAULT: usize = 256;
/// Default largest incoming transfer (4 GiB).
pub const TRANSFER_BYTES_MAX_DEFAULT: u64 = 4 << 30;
/// Default per-stream receive window: how much a sender may have in flight unread on one
/// stream, hence the memory one transfer may pin on the receiver (1 MiB).
pub const STREAM_WINDOW_BYTES_DEFAULT: u32 = 1 << 20;
/// Default most peers (connections and queues) a node keeps.
pub const PEERS_MAX_DEFAULT: usize = 1024;
/// Default most TLS handshakes in progress at once; more incoming connections are refused.
pub const HANDSHAKES_MAX_DEFAULT: usize = 64;

/// Limits; every queue, buffer and concurrency has one. Units are in the names.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame sent or accepted, header included. A bigger envelope or request is
    /// refused by `send`/`request`; a bigger incoming frame closes the connection.
    pub frame_bytes_max: usize,
    /// A batch frame (one Raft stream's share of a flush) is cut at this many bytes, even if
    /// more is queued; one flush writes at most K such frames. An envelope larger than this
    /// (up to `frame_bytes_max`) travels alone.
    pub batch_bytes_max: usize,
    /// Envelopes queued per peer; beyond it the oldest are dropped (and counted).
    pub queue_envelopes_max: usize,
    /// Payload bytes queued per peer; beyond it the oldest are dropped (and counted).
    pub queue_bytes_max: usize,
    /// Received envelopes waiting for the node; when full, readers wait (QUIC flow control
    /// then slows the senders).
    pub incoming_envelopes_max: usize,
    /// Received transfers and requests waiting for the node, each (requests only while no
    /// [`crate::RequestHandler`] serves them).
    pub incoming_queue_max: usize,
    /// Outgoing large transfers at a time, all peers together; `send_stream` waits for a slot.
    pub transfers_out_max: usize,
    /// Incoming large transfers at a time from one peer; more are stopped with
    /// `STREAM_REFUSED` (the sender's `finish` fails).
    pub transfers_in_per_peer_max: u16,
    /// Requests one peer may have open at a time on a connection (QUIC stream limit).
    pub requests_in_per_peer_max: u16,
    /// Largest incoming transfer; a longer one is stopped with an error.
    pub transfer_bytes_max: u64,
    /// Per-stream QUIC receive window.
    pub stream_window_bytes: u32,
    /// Peers known at a time.
    pub peers_max: usize,
    /// TLS handshakes in progress at a time.
    pub handshakes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            queue_envelopes_max: QUEUE_ENVELOPES_MAX_DEFAULT,
            queue_bytes_max: QUEUE_BYTES_MAX_DEFAULT,
            incoming_envelopes_max: INCOMING_ENVELOPES_MAX_DEFAULT,
            incoming_queue_max: INCOMING_QUEUE_MAX_DEFAULT,
            transfers_out_max: TRANSFERS_OUT_MAX_DEFAULT,
            transfers_in_per_peer_max: TRANSFERS_IN_PER_PEER_MAX_DEFAULT,
            requests_in_per_peer_max: REQUESTS_IN_PER_PEER_MAX_DEFAULT,
            transfer_bytes_max: TRANSFER_BYTES_MAX_DEFAULT,
            stream_window_bytes: STREAM_WINDOW_BYTES_DEFAULT,
            peers_max: PEERS_MAX_DEFAULT,
            handshakes_max: HANDSHAKES_MAX_DEFAULT,
        }
    }
}

/// Timers of the connection.
#[derive(Clone, Debug)]
pub struct Timing {
    /// QUIC keep-alive interval: keeps NAT bindings and idle detection alive.
    pub keep_alive_ms: u64,
    /// A connection with nothing received for this long is closed (peer crashed or cut off).
    pub idle_timeout_ms: u64,
    /// First delay before redialing a lost peer; doubles per failure.
    pub reconnect_backoff_ms_min: u64,
    /// Largest delay between redials.
    pub reconnect_backoff_ms_max: u64,
    /// A dial or an accepted handshake that takes longer is abandoned.
    pub handshake_timeout_ms: u64,
    /// How long a server waits for the node to answer a request before answering an error.
    pub request_handler_timeout_ms: u64,
    /// How long `shutdown` lets writers flush their queues.
    pub shutdown_flush_ms_max: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            keep_alive_ms: 1_000,
            idle_timeout_ms: 10_000,
            reconnect_backoff_ms_min: 50,
            reconnect_backoff_ms_max: 5_000,
            handshake_timeout_ms: 10_000,
            request_handler_timeout_ms: 30_000,
            shutdown_flush_ms_max: 1_000,
        }
    }
}

/// Everything [`Transport::start`](crate::Transport::start) needs.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// This node; must match the node id in `tls`'s certificate.
    pub node: NodeId,
    /// UDP address to listen on (`127.0.0.1:0` picks a free port).
    pub listen_addr: SocketAddr,
    /// CA, own certificate and key.
    pub tls: TlsIdentity,
    /// Known peer addresses at start; more with `set_peer_addr`. Only peers with a higher id
    /// need one: the lower id dials.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Number of long-lived Raft streams (K); group `g` uses stream `g % K`.
    pub raft_streams: u16,
    /// Limits.
    pub limits: Limits,
    /// Timers.
    pub timing: Timing,
    /// Refuse client certificates that carry no role at the handshake, rather than treating
    /// them as admin (the compatibility rule of `crate::cert`): the last step of moving a
    /// cluster's clients to roles, after which certificates issued before roles stop working.
    pub require_client_roles: bool,
}

impl TransportConfig {
    /// Defaults for `node` listening on `listen_addr`.
    pub fn new(node: NodeId, listen_addr: SocketAddr, tls: TlsIdentity) -> Self {
        TransportConfig {
            node,
            listen_addr,
            tls,
            peers: Vec::new(),
            raft_streams: RAFT_STREAMS_DEFAULT,
            limits: Limits::default(),
            timing: Timing::default(),
            require_client_roles: false,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), TransportError> {
        let l = &self.limits;
        let t = &self.timing;
        let fail = |what: &str| Err(TransportError::Config(what.to_string()));
        if self.raft_streams == 0 || self.raft_streams > RAFT_STREAMS_MAX {
            return fail("raft_streams must be in 1..=RAFT_STREAMS_MAX");
        }
        // Room above it for a pipelined answer's request id within a frame's u32 length.
        if l.frame_bytes_max < FRAME_BYTES_MIN || l.frame_bytes_max > (u32::MAX >> 1) as usize {
            return fail("frame_bytes_max must be in FRAME_BYTES_MIN..=2^31-1");
        }
        if l.batch_bytes_max < FRAME_HEADER_BYTES + ENVELOPE_HEADER_BYTES || l.batch_bytes_max > l.frame_bytes_max {
            return fail("batch_bytes_max must fit one envelope header and not exceed frame_bytes_max");
        }
        if l.queue_envelopes_max == 0 || l.queue_bytes_max == 0 || l.incoming_envelopes_max == 0 {
            return fail("queue limits must be positive");
        }
        if l.incoming_queue_max == 0 || l.transfers_out_max == 0 || l.peers_max == 0 || l.handshakes_max == 0 {
            return fail("incoming_queue_max, transfers_out_max, peers_max and handshakes_max must be positive");
        }
        if l.stream_window_bytes < 16 * 1024 {
            return fail("stream_window_bytes must be at least 16 KiB");
        }
        if t.reconnect_backoff_ms_min == 0 || t.reconnect_backoff_ms_min > t.reconnect_backoff_ms_max {
            return fail("need 0 < reconnect_backoff_ms_min <= reconnect_backoff_ms_max");
        }
        if t.keep_alive_ms == 0 || t.keep_alive_ms >= t.idle_timeout_ms {
            return fail("need 0 < keep_alive_ms < idle_timeout_ms");
        }
        Ok(())
    }

    /// Largest envelope payload `send` accepts: one envelope alone must fit in a frame.
    pub fn envelope_payload_bytes_max(&self) -> usize {
        self.limits.frame_bytes_max - FRAME_HEADER_BYTES - ENVELOPE_HEADER_BYTES
    }
}
