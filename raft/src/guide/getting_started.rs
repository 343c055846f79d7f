//! Getting started: run a group with the Tokio driver, write to it, read from it.
//!
//! The [crate-level example](crate#example-a-three-node-cluster-in-one-process) is a complete
//! program; this chapter explains its steps and what can go wrong at each.
//!
//! # Dependencies
//!
//! Inside this workspace, depend on `flotilla-raft.workspace = true`. Enable the `testing`
//! feature only for tests (`[dev-dependencies]`): it adds in-memory storage and a network that
//! keep nothing across a restart. The driver runs on Tokio; [`Raft::start`] spawns its task
//! with `tokio::spawn`, so call it from inside a runtime.
//!
//! # 1. Configure
//!
//! [`Config`] holds every timer and limit of a group, each with its unit in its name.
//! [`Config::default`] suits a LAN (election timeout 1–2 s, heartbeats every 100 ms);
//! [`Config::fast`] has shorter timers (election timeout 150–300 ms, heartbeats every 30 ms)
//! for tests and local demos.
//! [`Raft::start`] refuses a configuration that cannot work with [`RaftError::Config`];
//! [`Config::validate`] gives the same answer earlier:
//!
//! ```
//! use flotilla_raft::Config;
//!
//! let config = Config { log_keep_entries: 50_000, ..Config::default() };
//! assert!(config.validate().is_ok());
//!
//! // Heartbeats must come at least twice per minimum election timeout, or followers would
//! // start elections against a healthy leader.
//! let too_slow = Config { heartbeat_interval_ms: 600, ..Config::default() };
//! assert!(too_slow.validate().is_err());
//!
//! // Lease reads rely on check-quorum (see the reads chapter).
//! let inconsistent = Config { check_quorum: false, ..Config::default() };
//! assert!(inconsistent.validate().is_err());
//! let consistent = Config { check_quorum: false, lease_read: false, ..Config::default() };
//! assert!(consistent.validate().is_ok());
//! ```
//!
//! Every node of a group should use the same timers: the lease-read argument, for one, compares
//! one node's `election_timeout_ms_min` with another's.
//!
//! # 2. Start a group on every node
//!
//! ```rust,ignore
//! let raft = Raft::start(node_id, group_id, config, log_storage, state_machine, network).await?;
//! ```
//!
//! [`Raft::start`] reads the vote, the log bounds, the applied state and the current snapshot
//! from your [`LogStorage`] and [`StateMachine`], then spawns one task, the core: it owns the
//! [`Engine`], answers calls, sends messages, and runs two stages as futures beside them, a log
//! writer (executes writes in order) and an applier (owns the state machine). The returned
//! [`Raft`] is a cheap, cloneable handle.
//!
//! Messages for this group arriving from peers must be handed to [`Raft::receive`]; how your
//! network finds the right handle is up to it (see [`implementing_network`](super::implementing_network)).
//! With the in-memory kit, `MemRouter::register` does that.
//!
//! A node that restarts calls [`Raft::start`] on the same storage and resumes where it
//! stopped: it is a member again as soon as the group starts, with no further call.
//!
//! # 3. Form the cluster, once
//!
//! A node started on empty storage belongs to no cluster. Call [`Raft::initialize`] with the
//! initial [`Membership`] on one of the nodes (or on all of them with exactly the same
//! membership); the others join when the elected leader contacts them.
//! [`cluster_formation`](super::cluster_formation) explains why and what
//! [`RaftError::AlreadyInitialized`] means.
//!
//! `initialize` returns as soon as the first configuration entry is queued; wait for a leader
//! with [`Raft::wait_for`], which polls the [metrics](crate::Raft::metrics) until a predicate holds:
//!
//! ```rust,ignore
//! let m = raft.wait_for(Duration::from_secs(10), |m| m.leader.is_some()).await?;
//! ```
//!
//! # 4. Write
//!
//! [`Raft::client_write`] proposes one command (opaque [`Bytes`](bytes::Bytes)) and answers once
//! the entry is committed and applied by the state machine of the node you called, with the
//! entry's [`LogId`](crate::LogId) and whatever [`StateMachine::apply`] returned for it
//! ([`WriteResponse`]). [`Raft::client_write_batch`] proposes several commands as consecutive
//! entries in one step and answers with one result per command, in order; it is cheaper than
//! as many single writes because they share messages and a storage write.
//!
//! Only the leader accepts writes. The errors, and what to do about each:
//!
//! | Error | Meaning | What to do |
//! |---|---|---|
//! | [`NotLeader { leader }`](crate::RaftError::NotLeader) | this node is not the leader | retry on `leader` if `Some`, else wait and retry |
//! | [`TransferInProgress`](crate::RaftError::TransferInProgress) | leadership is being handed over | retry shortly, probably on the new leader |
//! | [`Dropped { index }`](crate::RaftError::Dropped) | a new leader replaced the entry: it will never apply | safe to retry |
//! | [`Timeout`](crate::RaftError::Timeout) | no answer within [`Config::api_timeout_ms`] | **outcome unknown**: the entry may still commit |
//! | [`Fatal`](crate::RaftError::Fatal) | the group stopped: a storage error, `shutdown`, or this replica's log forked from the leader's below its commit index (`Diverged`) | **outcome unknown** (the entry may commit after a restart); not on this handle: after a storage error, fix the storage and start the group again |
//!
//! A `Timeout` does not cancel anything. Retrying a write that timed out, or that failed with
//! `Fatal` (on another node, or after a restart), can apply it twice, so commands that are not
//! idempotent need a deduplication key (for example a client id and a sequence number inside
//! the command, checked by the state machine).
//!
//! # 5. Read
//!
//! Reading your state machine directly returns whatever it has applied, which may be stale even
//! on the leader (a leader cut off by a partition does not know at once that it was replaced).
//! For a linearizable read, call [`Raft::ensure_linearizable`] on the leader, then read the
//! local state machine:
//!
//! ```rust,ignore
//! raft.ensure_linearizable(ReadMode::ReadIndex).await?;
//! let value = my_state_machine.get("key");
//! ```
//!
//! [`reads_and_consistency`](super::reads_and_consistency) compares
//! [`ReadMode::ReadIndex`] and [`ReadMode::Lease`].
//!
//! # 6. Shut down
//!
//! [`Raft::shutdown`] stops the group's task and waits for it; calls still pending fail
//! with `RaftError::Fatal(Fatal::Shutdown)`, and so does every later call (unless the storage
//! work the group finished on its way out failed: then later calls report that failure).
//! Storage is left as it is: starting the group again on it resumes.
//!
//! # Next
//!
//! Run `cargo run -p flotilla-raft --features testing --example cluster`
//! (`RUST_LOG=flotilla_raft=debug` shows the protocol at work), then read
//! [`implementing_storage`](super::implementing_storage) and
//! [`implementing_network`](super::implementing_network) to replace the in-memory parts.
//!
//! [`Config`]: crate::Config
//! [`Config::default`]: crate::Config::default
//! [`Config::fast`]: crate::Config::fast
//! [`Config::validate`]: crate::Config::validate
//! [`Config::api_timeout_ms`]: crate::Config::api_timeout_ms
//! [`Raft`]: crate::Raft
//! [`Raft::start`]: crate::Raft::start
//! [`Raft::receive`]: crate::Raft::receive
//! [`Raft::initialize`]: crate::Raft::initialize
//! [`Raft::wait_for`]: crate::Raft::wait_for
//! [`Raft::client_write`]: crate::Raft::client_write
//! [`Raft::client_write_batch`]: crate::Raft::client_write_batch
//! [`Raft::ensure_linearizable`]: crate::Raft::ensure_linearizable
//! [`Raft::shutdown`]: crate::Raft::shutdown
//! [`RaftError::Config`]: crate::RaftError::Config
//! [`RaftError::AlreadyInitialized`]: crate::RaftError::AlreadyInitialized
//! [`Engine`]: crate::Engine
//! [`LogStorage`]: crate::LogStorage
//! [`StateMachine`]: crate::StateMachine
//! [`StateMachine::apply`]: crate::StateMachine::apply
//! [`Membership`]: crate::Membership
//! [`WriteResponse`]: crate::WriteResponse
//! [`ReadMode::ReadIndex`]: crate::ReadMode::ReadIndex
//! [`ReadMode::Lease`]: crate::ReadMode::Lease
