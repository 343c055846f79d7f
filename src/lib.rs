//! Flotilla: a multi-Raft sharded storage node.
//!
//! This crate will join the Raft core ([`flotilla_raft`]), the shared RocksDB storage
//! ([`flotilla_shard`]), the QUIC transport ([`flotilla_transport`]) and the placement
//! layer ([`flotilla_placement`]) into one node. Today only the Raft core is built; see
//! README.md for what works.
#![warn(missing_docs)]

pub use flotilla_placement as placement;
pub use flotilla_raft as raft;
pub use flotilla_shard as shard;
pub use flotilla_transport as transport;
