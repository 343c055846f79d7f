//! Errors of this crate.

use std::io;

use crate::id::NodeId;

/// What went wrong, phrased so the caller knows what to do next.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The configuration is inconsistent; fix it and start again.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// Certificates or keys could not be created, read or used.
    #[error("certificate error: {0}")]
    Cert(#[from] crate::cert::CertError),
    /// Binding the UDP socket or another local I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The envelope or request is larger than a frame may be; it was not sent.
    #[error("message of {bytes} bytes exceeds the frame limit of {max_bytes} bytes")]
    TooLarge {
        /// Size of what was offered, with its framing.
        bytes: usize,
        /// The configured `frame_bytes_max`.
        max_bytes: usize,
    },
    /// The node is this node itself.
    #[error("cannot send to self (n{0})")]
    SelfPeer(NodeId),
    /// The number of peers reached `peers_max`.
    #[error("too many peers (limit {0})")]
    TooManyPeers(usize),
    /// Fault injection blocks this peer.
    #[error("peer n{0} is blocked by fault injection")]
    Blocked(NodeId),
    /// No connection to the peer could be used in time, or the deadline passed.
    #[error("timed out")]
    Timeout,
    /// The connection failed or closed while in use; a retry may succeed after reconnection.
    /// A request may have reached the server.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The connection was already closed when a request was to be sent: nothing of it left
    /// this endpoint, so the server never saw it.
    #[error("not sent, the connection is closed: {0}")]
    NotSent(String),
    /// The server answered the request with an error.
    #[error("request failed on the server: {0}")]
    Remote(String),
    /// The peer sent something this build cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The transport was shut down.
    #[error("transport shut down")]
    Shutdown,
}
