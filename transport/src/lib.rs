//! flotilla-transport: QUIC (quinn + rustls, mutual TLS) between nodes. It moves opaque
//! envelopes tagged with a group id, batching the messages of all groups bound for one peer
//! over one connection.
//!
//! Not built yet: see the transport issue. It depends on no other crate of ours.
#![warn(missing_docs)]
