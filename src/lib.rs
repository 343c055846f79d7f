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
//! - [`resp_server`]: the Redis protocol front door (`redis-cli` and Redis clients), routing
//!   every key through the node's own client path.
//! - [`http`]: Prometheus metrics and health over HTTP; [`mod@bench`]: the load generator.
//!
//! # Decisions
//! - **Meta group as a key-value group.** Group 0 owns the reserved key range `[0x00, 0x01)`;
//!   the placement `MetaState` is one key there, changed by read → apply → compare-and-swap on
//!   the meta leader ([`meta`] explains why and what it costs). User keys may not start with
//!   `0x00`.
//! - **One envelope per transport stream.** A host's per-destination batch is split by
//!   `group % K` so one lost packet delays only the groups of one stream ([`net`]).
//! - **Routing checked at the node.** Every data request names shard and epoch; the node checks
//!   them against its copy of the map and answers `StaleEpoch`/`WrongShard`/`UnknownShard`
//!   instead of serving; the client refreshes its map from the meta leader and retries.
//! - **Shards of the bootstrap are formed by all their voters** (configuration version 1);
//!   replicas added later are fed by their leader (snapshot chunks inside Raft messages).
//!
//! - **Live splits.** `admin split` (or an applied balancer suggestion) changes the map on
//!   the meta leader; the source shard's leader then proposes a `Split` entry in the shard's
//!   own log, and every replica narrows the source and starts the new shard when it applies it
//!   (`flotilla_shard::KvCommand::Split`). The reconciler never creates a shard whose range a
//!   local group still covers, so the new shard cannot apply writes to keys the source has not
//!   finished with (they share one keyspace).
//!
//! - **Shard sizes are logical bytes** (keys plus values), measured by each shard's leader by
//!   reading the range (`flotilla_shard::range_size_blocking`), only after writes and at most
//!   every `size_check_interval_ms`; the same pass finds the key at the middle by bytes, which
//!   the leader reports as the split point of a shard past the threshold. RocksDB's own range
//!   estimates count only flushed files, so a fresh shard would look empty.
//! - **Automatic balancing** (`auto_balance`, on in `flotilla dev`): the meta leader runs the
//!   balancer every few seconds and carries out what it proposes — splits of shards past
//!   `split_size_bytes`, replica moves, leader transfers — under the balancer's limits.
//!
//! # Not built yet
//! - Merges of small neighbouring shards.
#![warn(missing_docs)]

pub mod allocator;
pub mod authz;
pub mod backup;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dev_cluster;
pub mod http;
pub mod meta;
pub mod metrics_scrape;
pub mod net;
pub mod node;
pub mod open_files;
pub mod peer_wire;
pub mod resp_server;
pub mod unsafe_recovery;
pub mod wire;

pub use client::{CasOutcome, Client, ClientConfig, ClientError};
pub use node::{BootstrapConfig, Node, NodeConfig, NodeError};

pub use flotilla_placement as placement;
pub use flotilla_raft as raft;
pub use flotilla_shard as shard;
pub use flotilla_transport as transport;
