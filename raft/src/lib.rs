//! flotilla-raft: the Raft consensus protocol as a sans-IO engine, and a Tokio driver.
//!
//! Raft keeps a log of commands identical on a group of machines, so that each of them can
//! apply the log to a copy of the same state machine and the group keeps working while a
//! minority of it is down or unreachable. This crate implements the protocol: elections
//! (with pre-vote and check-quorum), pipelined log replication, membership changes by joint
//! consensus, leadership transfer, linearizable reads (ReadIndex and leader lease), and
//! snapshots streamed in chunks. It does not store anything or open any socket itself: you
//! plug in a log store, a state machine and a network through three traits.
//!
//! # Three layers
//!
//! - [`Engine`] is the protocol as a deterministic state machine. You feed it inputs (a
//!   message from a peer, a timer firing, a write that became durable, entries that were
//!   applied) and it answers with [`Action`]s (write these entries, send this message, apply
//!   up to this index). It reads no clock (every input carries the time as [`Millis`]), draws
//!   randomness only from a seeded generator, and does no I/O. The same inputs always
//!   produce the same actions, which is what lets a simulator test it under faults and
//!   replay a failure from its seed.
//! - [`GroupCore`] wraps one engine with its callers' pending requests: it takes a
//!   [`Request`] (write, read, membership change, ...) with the channel its answer goes to,
//!   and hands out [`CoreAction`]s grouped by who executes them (the log store, the state
//!   machine, the network). Still no I/O and no task: whoever runs it executes the actions.
//! - [`Raft`] is the handle of one group run by the Tokio driver. [`Raft::start`] recovers
//!   the group's state from your [`LogStorage`] and [`StateMachine`], spawns the task that
//!   drives an `Engine` against them and your [`Network`], and gives you `async` calls:
//!   [`initialize`](Raft::initialize), [`client_write`](Raft::client_write),
//!   [`ensure_linearizable`](Raft::ensure_linearizable),
//!   [`change_membership`](Raft::change_membership) and so on, plus
//!   [`metrics`](Raft::metrics) on a watch channel. It runs one `GroupCore` per group.
//!
//! **Use [`Raft`]** unless you have a reason not to: it implements the whole driving
//! contract for you (write ordering, durability before acknowledgement, timers, snapshot
//! transfer) and costs one Tokio task per group. **Run [`GroupCore`]s yourself** when
//! that cost is too high (flotilla-shard runs thousands of groups on a few tasks and
//! batches the storage writes of many groups into one fsync) or when you need a different
//! runtime; **drive the [`Engine`] alone** when you want to step a cluster deterministically
//! in a test (the simulator does). The [`guide::driving_the_engine`]
//! chapter explains the contract you then take on.
//!
//! # What you provide
//!
//! - a [`LogStorage`]: the replicated log and the vote, durable before each call returns;
//! - a [`StateMachine`]: applies committed commands, builds and installs snapshots;
//! - a [`Network`]: sends [`Message`]s to peers, fire-and-forget; messages arriving from
//!   peers are handed to [`Raft::receive`].
//!
//! With the `testing` cargo feature the crate also ships in-memory implementations of all
//! three (`testing::MemLogStorage`, `testing::MemStateMachine`, a key-value machine with
//! `testing::KvCommand`, and `testing::MemRouter`) and the conformance suites
//! `testing::log_storage_suite` and `testing::state_machine_suite`, which check your own
//! storage against the contracts. Enable it in `[dev-dependencies]`; it is not meant for
//! production.
//!
//! # Example: a three-node cluster in one process
//!
//! Three nodes of one group talk through an in-memory router. Node 1 forms the cluster; nodes 2 and 3
//! start empty and join when the leader contacts them. The example writes a key, confirms a
//! linearizable read point, and reads the value from the leader's state machine. (It needs
//! the `testing` feature, as in `cargo test -p flotilla-raft --features testing --doc`.)
//!
//! ```rust
//! # #[cfg(feature = "testing")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use flotilla_raft::testing::{KvCommand, KvResponse, MemLogStorage, MemRouter, MemStateMachine};
//! use flotilla_raft::{Config, GroupId, Membership, NodeId, Raft, ReadMode, Role};
//! use std::time::Duration;
//!
//! // `Raft::start` spawns a task, so it must run inside a Tokio runtime.
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! runtime.block_on(async {
//!     let router = MemRouter::new();
//!     let mut nodes = Vec::new();
//!     for id in 1..=3 {
//!         // Keep a clone of the state machine: clones share state, so we can read from it.
//!         let sm = MemStateMachine::new();
//!         let raft = Raft::start(
//!             NodeId(id),
//!             GroupId(1),
//!             Config::default(),
//!             MemLogStorage::new(),
//!             sm.clone(),
//!             router.network(),
//!         )
//!         .await?;
//!         // Messages addressed to this node id now reach `raft.receive`.
//!         router.register(raft.clone());
//!         nodes.push((raft, sm));
//!     }
//!
//!     // Form the cluster. Only one node needs to be told; the others have no state and
//!     // wait until the leader contacts them.
//!     let members = Membership::new([1, 2, 3].map(NodeId));
//!     nodes[0].0.initialize(members).await?;
//!
//!     // Wait until node 1 knows a leader, then until that node sees itself as leader.
//!     let wait = Duration::from_secs(10);
//!     let known = nodes[0].0.wait_for(wait, |m| m.leader.is_some()).await?;
//!     let (leader, leader_sm) = nodes
//!         .iter()
//!         .find(|(raft, _)| Some(raft.id()) == known.leader)
//!         .expect("the leader is one of the three nodes");
//!     leader.wait_for(wait, |m| m.role == Role::Leader).await?;
//!
//!     // Write: answered once the entry is committed and applied on the leader, with the
//!     // state machine's response.
//!     let put = KvCommand::Put { key: "greeting".into(), value: "hello".into() };
//!     let written = leader.client_write(put.encode()).await?;
//!     let response = KvResponse::decode(&written.data)?;
//!     assert!(response.ok);
//!     assert_eq!(response.previous, None);
//!
//!     // Read: confirm leadership with a quorum, wait until the local state machine has
//!     // applied everything committed before the call, then read it locally.
//!     let read_at = leader.ensure_linearizable(ReadMode::ReadIndex).await?;
//!     assert!(read_at >= written.log_id.index);
//!     assert_eq!(leader_sm.get("greeting").as_deref(), Some("hello"));
//!
//!     for (raft, _) in &nodes {
//!         raft.shutdown().await;
//!     }
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! `raft/examples/cluster.rs` goes further (lease reads, adding a learner and replacing a
//! voter, leadership transfer, snapshots):
//! `cargo run -p flotilla-raft --features testing --example cluster`.
//!
//! # Where to go next
//!
//! The [`guide`] has one chapter per task: [getting started](guide::getting_started),
//! [forming a cluster](guide::cluster_formation),
//! [changing membership](guide::dynamic_membership),
//! [implementing storage](guide::implementing_storage),
//! [implementing the network](guide::implementing_network),
//! [snapshots and compaction](guide::snapshots_and_compaction),
//! [reads and consistency](guide::reads_and_consistency),
//! [driving the engine](guide::driving_the_engine) and
//! [observability](guide::observability).
#![warn(missing_docs)]

pub mod config;
pub mod driver;
pub mod engine;
pub mod entry;
pub mod error;
pub mod group;
/// Documentation only: a guide to the crate, one chapter per task.
pub mod guide;
pub mod lease_gate;
pub mod membership;
pub mod message;
pub mod network;
pub mod request;
pub mod storage;
pub mod types;

pub use config::Config;
pub use driver::{Raft, RaftMetrics, WriteResponse};
pub use engine::{Action, Engine, EngineStatus, InitialState, IoId, ReadMode, Role};
pub use entry::{Entry, EntryPayload};
pub use error::{ConfigError, Fatal, RaftError, StorageError};
pub use group::{CoreAction, GroupCore, LogAction, MachineAction, WriteCall};
pub use lease_gate::LeaseGate;
pub use membership::{Membership, StoredMembership};
pub use message::{AppendResult, Message, MessageBody};
pub use network::Network;
pub use request::Request;
pub use storage::{AppliedState, LogState, LogStorage, Snapshot, SnapshotError, SnapshotMeta, StateMachine};
pub use types::{GroupId, LogId, LogIndex, Millis, NodeId, Term, Vote};

#[cfg(feature = "testing")]
pub mod testing;
