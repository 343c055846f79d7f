//! flotilla-placement: which shard serves which keys, and where shards live. Pure logic: no
//! I/O, no async, no clock (time is an argument). The node runs [`MetaState`] as the state
//! machine of the meta Raft group.
//!
//! - [`ShardMap`]: ordered, non-overlapping key ranges covering the keyspace, each with a shard
//!   id, a version stamp ([`Epoch`]) and replicas; lookups by key and by range; routing checks
//!   that tell a client with a stale cache what changed ([`RouteError`]).
//! - [`MetaState`] and [`MetaCommand`]: bootstrap, nodes and their reports (shard sizes,
//!   leaders, applied indexes, suggested split keys), splits and replica changes, each checked
//!   against the current state (a stale or misplaced command is refused and changes nothing);
//!   snapshot and restore.
//! - [`plan`]: a replica move as a plan of checked steps (add learner, wait until caught up,
//!   promote by one joint change, remove the old replica, optionally transfer the lead). Plans
//!   live in the replicated [`MetaState`], so they survive restarts and meta leader changes;
//!   each step is checked against the current map, skipped when its effect is already there,
//!   and refused with a [`PlanError`] when the replicas changed under it.
//! - [`balance`]: one round proposes replica moves (replica count first, data size within the
//!   count band, draining nodes emptied), leader transfers and split suggestions, under limits
//!   per round, per minute and per node (one incoming snapshot at a time), and never a move it
//!   would want to undo next round.
//!
//! Not built: merges, and reading load (CPU, request rates) into balancing decisions.
#![warn(missing_docs)]

pub mod balance;
pub mod map;
pub mod meta;
pub mod plan;

pub use balance::{balance, BalancerConfig, Proposal};
pub use map::{Epoch, NodeId, Replica, ReplicaRole, RouteError, ShardDescriptor, ShardId, ShardMap};
pub use meta::{
    LogIndex, MetaCommand, MetaError, MetaOutcome, MetaState, MoveRecord, NodeInfo, NodeReport, MOVE_HISTORY_LEN_MAX,
    MOVE_HISTORY_MS, MOVE_WINDOW_MS,
};
pub use plan::{MovePlan, MoveStep, PlanAction, PlanError};
