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
//! - [`load`]: load-based splitting: per-shard request rates over windows and a sample of
//!   request keys on each leader, and the key that divides a hot shard's load; the balancer
//!   splits shards that stay hot and weighs leaders by these rates.
//!
//! - [`merge`]: a merge of two adjacent shards as a plan of phases (freezing, committed or
//!   aborted, finished) kept in the replicated [`MetaState`]; while a shard takes part in
//!   one, its replicas and range stay as they are. The balancer proposes merges of small,
//!   cold neighbours on the same nodes, moves that put such neighbours on the same nodes, and
//!   aborts of freezes that take too long.
//!
//! Not built: CPU or disk load in balancing decisions.
//!
//! # The loop the node runs (on the meta leader)
//! ```
//! use flotilla_placement::*;
//!
//! let mut state = MetaState::default();
//! for i in 1..=4 {
//!     state.apply(MetaCommand::RegisterNode { node: NodeId(i), addr: format!("n{i}:7000") }).unwrap();
//! }
//! state.apply(MetaCommand::Bootstrap { nodes: vec![NodeId(1), NodeId(2), NodeId(3)] }).unwrap();
//! for key in [b"b", b"d", b"f", b"h", b"j"] {
//!     let last = state.map.lookup(b"z").unwrap().clone();
//!     state.apply(MetaCommand::Split { shard: last.id, epoch: last.epoch, key: key.to_vec() }).unwrap();
//! }
//! // Heartbeats carry sizes, leaders, applied indexes and split keys.
//! for i in 1..=3 {
//!     let mut report = NodeReport::default();
//!     for d in state.map.shards() {
//!         report.applied.insert(d.id, LogIndex(42));
//!     }
//!     state.apply(MetaCommand::Heartbeat { node: NodeId(i), report }).unwrap();
//! }
//! // A balancing round: nodes 1-3 hold 6 replicas each, node 4 none; one snapshot at a time
//! // goes to node 4. Each proposal becomes a command for the meta log, stamped with the time.
//! let now_ms = 1_000;
//! let proposals = balance(&state, &BalancerConfig::default(), now_ms);
//! assert!(matches!(&proposals[..], [Proposal::Move { plan, .. }] if plan.to == NodeId(4)));
//! for p in &proposals {
//!     state.apply(p.command(now_ms)).unwrap();
//! }
//! // Drive the plan: each step is checked against the current state when it is applied.
//! for _ in 0..20 {
//!     let Some(plan) = state.moves.values().next().cloned() else { break };
//!     match plan.next(&state) {
//!         Ok(PlanAction::Wait { .. }) => {
//!             // The learner catches up and says so in its next heartbeat.
//!             let mut report = NodeReport::default();
//!             report.applied.insert(plan.shard, LogIndex(42));
//!             state.apply(MetaCommand::Heartbeat { node: plan.to, report }).unwrap();
//!         }
//!         Ok(PlanAction::WaitRaft { .. }) => {
//!             // The shard's Raft group carries out the map's change; its leader (a voter that
//!             // stays) reports the committed configuration, in which the source is gone.
//!             let d = state.map.get(plan.shard).unwrap().clone();
//!             let leader = d.voters().find(|v| *v != plan.from).unwrap();
//!             let learners = d.replicas.iter().filter(|r| r.role == ReplicaRole::Learner);
//!             let conf = GroupConf {
//!                 index: LogIndex(40),
//!                 voters: d.voters().collect(),
//!                 learners: learners.map(|r| r.node).filter(|n| *n != plan.from).collect(),
//!                 joint: false,
//!             };
//!             let mut report = state.nodes[&leader].report.as_ref().clone();
//!             report.leading = vec![plan.shard];
//!             report.confs.insert(plan.shard, conf);
//!             state.apply(MetaCommand::Heartbeat { node: leader, report }).unwrap();
//!         }
//!         Ok(_) => {
//!             state.apply(MetaCommand::AdvanceMove { shard: plan.shard, step: plan.step }).unwrap();
//!         }
//!         Err(_) => {
//!             state.apply(MetaCommand::AbortMove { shard: plan.shard }).unwrap();
//!         }
//!     }
//! }
//! let moved = state.map.shards().find(|d| d.replica(NodeId(4)).is_some()).unwrap();
//! assert_eq!(moved.voters().count(), 3);
//! assert_eq!(state.recent_moves.len(), 1, "the per-minute limit counts it");
//! ```
#![warn(missing_docs)]

pub mod balance;
pub mod lifecycle;
pub mod load;
pub mod map;
pub mod merge;
pub mod meta;
pub mod plan;
pub mod report_change;
mod unsafe_recovery;

pub use balance::{balance, BalancerConfig, Proposal, MERGE_SIZE_BYTES_DEFAULT};
pub use lifecycle::{replica_fate, DeleteReason, LocalReplica, ReplicaFate};
pub use load::{LoadSplitConfig, LoadTracker, LoadTrackers, LoadWindow};
pub use map::{Epoch, NodeId, Replica, ReplicaRole, RouteError, ShardDescriptor, ShardId, ShardMap};
pub use merge::{MergeId, MergePhase, MergePlan};
pub use meta::{
    BootstrapRecord, GroupConf, LogIndex, MetaCommand, MetaError, MetaOutcome, MetaState, MoveRecord, NodeInfo,
    NodeReport, ShardLoad, Tombstone, MOVE_HISTORY_LEN_MAX, MOVE_HISTORY_MS, MOVE_WINDOW_MS,
};
pub use plan::{MovePlan, MoveStep, PlanAction, PlanError, StepWatch, MOVE_TRANSFER_BYTES_PER_S_MIN};
pub use report_change::{ReportChange, ShardReport};
