//! flotilla-transport: QUIC (quinn + rustls, mutual TLS) between nodes. It moves opaque
//! envelopes tagged with a group id, batching the messages of all groups bound for one peer
//! over one connection. Of our crates it depends on the ids only (`flotilla-ids`), and it
//! never looks inside a payload.
//!
//! # Shape
//!
//! - [`Transport::start`] binds a QUIC endpoint and returns the handle and the [`Incoming`]
//!   channels (envelopes, large transfers, requests).
//! - [`Transport::send`] queues an [`Envelope`] for a peer and never blocks; a writer task per
//!   peer batches the queue into frames on K long-lived unidirectional streams, group `g` on
//!   stream `g % K`, so the envelopes of one group arrive in order.
//! - [`Transport::send_stream`] opens a large transfer (snapshot) on a stream of its own with
//!   a lower priority; [`Transport::request`] and [`Client`] do request/response on
//!   bidirectional streams.
//! - Identity comes only from certificates ([`cert`]): `node-<id>.flotilla` or
//!   `client-<name>.flotilla`, signed by the cluster CA.
//! - The wire format is in [`frame`]: every frame starts with a format version byte.
//!
//! # Contract for the node
//!
//! 1. Give every node a certificate from the same CA and the same `Limits` (a frame another
//!    node accepts must fit this node's `frame_bytes_max`).
//! 2. Tell each node the addresses of the peers with higher ids (`set_peer_addr`); the lower
//!    id dials.
//! 3. Drain [`Incoming`]: a full envelope channel slows the senders (QUIC flow control), an
//!    unanswered request gets an error after `request_handler_timeout_ms`. Or serve requests
//!    in the transport's own tasks with a [`RequestHandler`] ([`Transport::serve_requests_with`]):
//!    one task and one hand-over fewer per request.
//! 4. Call [`Transport::shutdown`] before dropping the last handle: the tasks hold the
//!    endpoint open until then.
#![warn(missing_docs)]

pub mod cert;
mod client;
mod config;
mod error;
mod fault;
pub mod frame;
mod id;
mod metrics;
mod pipe;
mod request_handler;
mod stream;
pub mod tls;
mod transport;

pub use client::{Client, ClientConnection};
pub use config::*;
pub use error::TransportError;
pub use id::{ClientIdentity, Envelope, Grant, GroupId, NodeId, PeerIdentity, Role};
pub use metrics::{PeerMetrics, TransportMetrics};
pub use request_handler::{RequestHandler, Serving};
pub use stream::{codes, IncomingRequest, IncomingTransfer, OutgoingTransfer, Responder};
pub use transport::{Incoming, Transport};
