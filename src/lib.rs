//! Flotilla: a multi-Raft sharded storage node.
//!
//! This crate joins the Raft core ([`flotilla_raft`]), the shared RocksDB storage and shard
//! host ([`flotilla_shard`]), the QUIC transport ([`flotilla_transport`]) and the placement
//! layer ([`flotilla_placement`]) into one node, and gives it a client.
//!
//! - [`Node`] ([`node`]): an embeddable node — store, host, transport, the meta group (group 0,
//!   holding the placement state, see [`meta`]) and the client protocol server.
//! - [`wire`]: the versioned client protocol (get/put/delete/cas/scan naming shard and epoch,
//!   admin calls, redirects).
//! - [`Client`] ([`client`]): caches the shard map, routes to leaders, follows redirects,
//!   retries with backoff within a deadline, and reports unknown outcomes as such.
//! - [`net`]: the shard host's network over the transport (node batches split per stream,
//!   sender checked against its certificate).
//! - [`cluster`]: certificates and the cluster file that `flotilla dev` writes and the CLI
//!   reads; [`config`]: `flotilla server`'s TOML file.
//! - [`http`]: Prometheus metrics and health over HTTP; [`bench`]: the load generator.
#![warn(missing_docs)]

pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod http;
pub mod meta;
pub mod net;
pub mod node;
pub mod wire;

pub use client::{CasOutcome, Client, ClientConfig, ClientError};
pub use node::{BootstrapConfig, Node, NodeConfig, NodeError};

pub use flotilla_placement as placement;
pub use flotilla_raft as raft;
pub use flotilla_shard as shard;
pub use flotilla_transport as transport;
