//! flotilla-placement: which shard serves which keys, and where shards live. Pure logic: no
//! I/O, no async. The node runs [`MetaState`] as the state machine of the meta Raft group.
//!
//! - [`ShardMap`]: ordered, non-overlapping key ranges covering the keyspace, each with a shard
//!   id, a version stamp ([`Epoch`]) and replicas; lookups by key and by range; routing checks
//!   that tell a client with a stale cache what changed ([`RouteError`]).
//! - [`MetaState`] and [`MetaCommand`]: bootstrap, nodes and their reports, splits and replica
//!   changes, each checked against the current state (a stale or misplaced command is refused
//!   and changes nothing); snapshot and restore.
//!
//! - [`balance`]: replica-count and leader-count balancing, with draining, under limits.
//!
//! Not built yet: balancing by data size, split suggestions, replica-move plans as checked
//! steps (see the placement issue).
#![warn(missing_docs)]

pub mod balance;
pub mod map;
pub mod meta;

pub use balance::{balance, BalancerConfig, Proposal};
pub use map::{Epoch, NodeId, Replica, ReplicaRole, RouteError, ShardDescriptor, ShardId, ShardMap};
pub use meta::{MetaCommand, MetaError, MetaOutcome, MetaState, NodeInfo, NodeReport};
