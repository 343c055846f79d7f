//! Observability: metrics on a watch channel, and `tracing` spans and events.
//!
//! # Metrics
//!
//! [`Raft::metrics`] returns a `tokio::sync::watch::Receiver<`[`RaftMetrics`]`>`. The group
//! publishes a new value whenever its state changed, after handling a batch of events; a
//! watch channel keeps only the latest value, so a reader sees the current state but may skip
//! intermediate ones. Use it to display and alert on state, not to count events.
//!
//! | Field | Meaning |
//! |---|---|
//! | `id`, `group` | this node and this group |
//! | `role` | [`Role`](crate::Role): `Follower`, `PreCandidate`, `Candidate`, `Leader` or `Learner` |
//! | `term` | the current term; a term that keeps rising means repeated elections |
//! | `leader` | the leader this node knows of, if any |
//! | `last_log_id` | the last entry in the log (durable or not yet) |
//! | `committed` | the commit index known to this node |
//! | `applied` | the last index applied by the state machine |
//! | `membership` | the configuration in effect (the latest in the log, maybe uncommitted) |
//! | `committed_membership` | the latest committed configuration |
//! | `snapshot` | the last log id covered by the current snapshot, if any |
//! | `first_log_index` | the first index still in the log (after compaction) |
//! | `replication` | on the leader only: the matched index of every other member, learners included; empty elsewhere |
//! | `stopped` | `Some(Fatal)` once the group has stopped, with the reason |
//!
//! Derived values worth watching: on the leader, `last_log_id.index - replication[peer]` is
//! how far a follower lags (a learner is ready for promotion when this is small);
//! `committed - applied` is the apply backlog; `last_log_id.index - first_log_index + 1` is
//! the number of entries in the log. `membership != committed_membership`, or a joint
//! `membership`, means a change is in progress.
//!
//! [`Raft::wait_for(timeout, predicate)`](crate::Raft::wait_for) waits until the predicate
//! holds on the metrics and returns them; it fails with `Fatal` if the group stops and with
//! `Timeout` when the time is up. It is how tests and tools wait for a leader, for a node to
//! catch up, or for a change to land:
//!
//! ```rust,ignore
//! let target = leader.metrics().borrow().last_log_id.index;
//! learner.wait_for(Duration::from_secs(30), |m| m.applied >= target).await?;
//! ```
//!
//! Two counters live outside the channel: [`Raft::inbox_dropped`] counts messages dropped
//! because the group's inbox was full (a sign the group cannot keep up), and, in tests,
//! `MemRouter::counts` gives the messages delivered and dropped by the in-memory network.
//! When you drive the [`Engine`](crate::Engine) yourself, [`Engine::status`] returns the same
//! information as an [`EngineStatus`](crate::EngineStatus), which also has `persisted`, the
//! last durable log id.
//!
//! # Tracing
//!
//! The crate logs through [`tracing`](https://docs.rs/tracing). The driver runs each group's
//! task inside a span named `raft` with the fields `group` and `node`, so every event of the
//! group, including the engine's, is attributed to it. Events also carry `node`, and almost
//! all carry `term`, the node's current term. Levels:
//!
//! - `error`: a storage failure that stops the group, or a log found forked from the leader's
//!   below the commit index (`Fatal::Diverged`), which stops it too;
//! - `warn`: unusual but handled, such as a snapshot that changed while it was being sent;
//! - `info`: changes of state an operator cares about: initialization, elections
//!   ("campaigning", "became leader", "leader stepping down"), check-quorum step-downs,
//!   configuration proposals, leadership transfers, conflicting entries truncated, snapshots
//!   built, sent and installed;
//! - `debug`: pre-votes and votes granted or refused, appends rejected and the leader's
//!   back-off, a new leader being followed;
//! - `trace`: every message received, and every advance of the commit index.
//!
//! Filter at run time with your subscriber, e.g. `RUST_LOG=flotilla_raft=info` with
//! `tracing_subscriber::EnvFilter`, or `flotilla_raft::engine=debug` for the protocol alone.
//! When you drive the engine yourself, enter a span of your own around the calls for one
//! group (for example `tracing::info_span!("raft", group = %group, node = %node)`), since the
//! engine does not know its group id.
//!
//! ## Capping verbosity at compile time
//!
//! `trace` and `debug` events sit on hot paths (one per message received). A disabled event
//! costs little, but not nothing. The `tracing` crate can remove events above a level at
//! compile time, through its cargo features `max_level_*` (all builds) and
//! `release_max_level_*` (builds without `debug_assertions`). Enable one in the
//! application's `Cargo.toml`:
//!
//! ```toml
//! [dependencies]
//! tracing = { version = "0.1", features = ["release_max_level_info"] }
//! ```
//!
//! Cargo features are unified across the build, so this caps every crate that uses `tracing`
//! in that application, this one included; a library cannot and should not set it for you.
//!
//! [`Raft::metrics`]: crate::Raft::metrics
//! [`Raft::inbox_dropped`]: crate::Raft::inbox_dropped
//! [`RaftMetrics`]: crate::RaftMetrics
//! [`Engine::status`]: crate::Engine::status
