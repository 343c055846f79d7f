//! Driving the engine: running the sans-IO [`Engine`] without the Tokio driver.
//!
//! [`Raft`](crate::Raft) costs a Tokio task, its channels and a timer per group. That
//! is nothing for a few groups and too much for thousands. It also fixes the runtime and
//! makes time real. The [`Engine`] has none of that: it is a plain value that you call with
//! inputs and that queues [`Action`]s for you to execute. This chapter is the contract you
//! take on when you drive it yourself.
//!
//! # Creating an engine
//!
//! [`Engine::new(id, config, state, seed, now)`](crate::Engine::new) starts from an
//! [`InitialState`] read from storage; [`driver::recover_state`](crate::driver::recover_state)
//! builds it from a [`LogStorage`](crate::LogStorage) and a
//! [`StateMachine`](crate::StateMachine). `Engine::new` does not validate the configuration: call
//! [`Config::validate`](crate::Config::validate) first (the driver does it in `Raft::start`).
//! The configuration is an `Arc<Config>`, so many groups can share one.
//!
//! The engine reads no clock: every input takes `now` as [`Millis`], on a monotonic clock of
//! your choosing that all inputs to one engine share. `seed` drives the randomized election
//! timeouts; give each start a different seed (the driver derives one from the node id, the
//! group id and process entropy), or a fixed one in a deterministic simulation, where the same
//! seed and inputs give the same actions.
//!
//! # The driving contract
//!
//! 1. **Feed every input, with the current time.** Messages from peers
//!    ([`handle_message`](crate::Engine::handle_message)), completed writes
//!    ([`handle_io_done`](crate::Engine::handle_io_done)), applied entries
//!    ([`handle_applied`](crate::Engine::handle_applied)), loaded entries
//!    ([`handle_entries_loaded`](crate::Engine::handle_entries_loaded)), how far the applied
//!    state is durable ([`handle_applied_durable`](crate::Engine::handle_applied_durable)),
//!    snapshots built, read, installed or refused
//!    ([`handle_snapshot_built`](crate::Engine::handle_snapshot_built),
//!    [`handle_snapshot_read`](crate::Engine::handle_snapshot_read),
//!    [`handle_snapshot_installed`](crate::Engine::handle_snapshot_installed),
//!    [`handle_snapshot_refused`](crate::Engine::handle_snapshot_refused)), and
//!    [`handle_timeout`](crate::Engine::handle_timeout) whenever `now >= `
//!    [`next_deadline()`](crate::Engine::next_deadline). Calling `handle_timeout` early is harmless;
//!    calling it late delays heartbeats and elections.
//! 2. **Drain the actions in order.** After every input, and after every API call
//!    ([`initialize`](crate::Engine::initialize), [`propose`](crate::Engine::propose),
//!    [`read`](crate::Engine::read), [`add_learner`](crate::Engine::add_learner),
//!    [`change_membership`](crate::Engine::change_membership),
//!    [`transfer_leader`](crate::Engine::transfer_leader),
//!    [`compact_log`](crate::Engine::compact_log)), take actions with
//!    [`poll_action`](crate::Engine::poll_action) until it returns `None`, and execute them in the
//!    order they come. Then read `next_deadline()` again: inputs move it.
//! 3. **Writes in order, reported once durable.** [`SaveVote`](crate::Action::SaveVote),
//!    [`AppendEntries`](crate::Action::AppendEntries), [`TruncateFrom`](crate::Action::TruncateFrom) and
//!    [`PurgeUpTo`](crate::Action::PurgeUpTo) may complete asynchronously, but must become durable in
//!    the order they were issued. Report each with `handle_io_done(io)` only once it is
//!    durable. [`IoId`]s increase, and `handle_io_done(io)` means "every write up to and
//!    including `io` is durable", so after executing a batch of writes and one sync, report
//!    only the last one. A write that fails must stop the group: never report it done, and do
//!    not feed the engine again.
//! 4. **Sends go out at once.** [`Send`](crate::Action::Send) may be executed before earlier writes
//!    are durable. The engine never emits a message whose truth depends on an unfinished
//!    write: votes are granted and appends acknowledged only after `handle_io_done`, and a
//!    leader counts its own entries toward the quorum only once they are durable. That is
//!    what lets a leader replicate while its own sync runs.
//! 5. **Apply in order.** Execute [`Apply`](crate::Action::Apply) in order and report
//!    `handle_applied(last)`. Loads and applies only ever ask for durable entries.
//!
//! # The actions
//!
//! | Action | Do | Then report |
//! |---|---|---|
//! | [`SaveVote`](crate::Action::SaveVote) | [`LogStorage::save_vote`](crate::LogStorage::save_vote) | `handle_io_done(io)` |
//! | [`AppendEntries`](crate::Action::AppendEntries) | [`LogStorage::append`](crate::LogStorage::append) | `handle_io_done(io)` |
//! | [`TruncateFrom`](crate::Action::TruncateFrom) | [`LogStorage::truncate_from`](crate::LogStorage::truncate_from) | `handle_io_done(io)` |
//! | [`PurgeUpTo`](crate::Action::PurgeUpTo) | [`LogStorage::purge_up_to`](crate::LogStorage::purge_up_to) | `handle_io_done(io)` |
//! | [`Send`](crate::Action::Send) | [`Network::send`](crate::Network::send) | nothing |
//! | [`LoadEntries`](crate::Action::LoadEntries) | [`LogStorage::read_entries`](crate::LogStorage::read_entries), after the writes issued before it | `handle_entries_loaded(peer, entries)` |
//! | [`Apply`](crate::Action::Apply) | [`StateMachine::apply`](crate::StateMachine::apply) on `entries`, or on `first..=last` read from storage when `entries` is `None` | `handle_applied(last)`, then `handle_applied_durable(`[`durable_applied()`](crate::StateMachine::durable_applied)`)` |
//! | [`BuildSnapshot`](crate::Action::BuildSnapshot) | [`StateMachine::build_snapshot`](crate::StateMachine::build_snapshot) | `handle_snapshot_built(meta)` |
//! | [`ReadSnapshotChunk`](crate::Action::ReadSnapshotChunk) | [`StateMachine::read_snapshot`](crate::StateMachine::read_snapshot) of bytes `offset..offset + len` | `handle_snapshot_read(to, meta, offset, data, done)` (it sends the chunk) |
//! | [`DropSnapshot`](crate::Action::DropSnapshot) | [`StateMachine::drop_snapshot`](crate::StateMachine::drop_snapshot) | nothing |
//! | [`ReceiveSnapshotChunk`](crate::Action::ReceiveSnapshotChunk) | [`StateMachine::receive_snapshot`](crate::StateMachine::receive_snapshot) (`offset == 0` starts a new one) | nothing, or `handle_snapshot_refused` if refused |
//! | [`InstallSnapshot`](crate::Action::InstallSnapshot) | [`StateMachine::install_snapshot`](crate::StateMachine::install_snapshot) | `handle_snapshot_installed(meta)`, or `handle_snapshot_refused` |
//! | [`ReadReady`](crate::Action::ReadReady) | wait until the state machine has applied `index`, then serve read `id` | nothing |
//! | [`ReadFailed`](crate::Action::ReadFailed) | fail read `id` with `error` | nothing |
//!
//! The engine does not track clients; the host does. [`propose`](crate::Engine::propose) returns the
//! index of the first new entry, and the entries carry the current [`term()`](crate::Engine::term).
//! When the entry at that index is applied, its response belongs to the proposal if the
//! entry's term is the one it was proposed in; otherwise a new leader replaced it and the
//! proposal failed (the driver answers [`RaftError::Dropped`](crate::RaftError::Dropped)).
//! Likewise, a membership change is complete once
//! [`committed_membership()`](crate::Engine::committed_membership) is no longer joint and is at or
//! after the index `change_membership` returned, and a transfer once
//! [`leader()`](crate::Engine::leader) is the target.
//!
//! # Example: one node, by hand
//!
//! A single-voter group with the log and state machine reduced to vectors and writes that
//! are durable at once. Time advances only when the host says so.
//!
//! ```rust
//! use bytes::Bytes;
//! use flotilla_raft::{Action, Config, Engine, Entry, EntryPayload, InitialState};
//! use flotilla_raft::{LogIndex, Membership, Millis, NodeId, ReadMode, Role, Vote};
//! use std::sync::Arc;
//!
//! /// Stands in for the log storage, the state machine and the reads waiting to be served.
//! #[derive(Default)]
//! struct Host {
//!     vote: Vote,
//!     log: Vec<Entry>, // the entry at index i is log[i - 1]: nothing is purged here
//!     applied: Vec<Entry>,
//!     reads_ready: Vec<(u64, LogIndex)>,
//! }
//!
//! impl Host {
//!     /// Executes the engine's actions in order until none is left.
//!     fn drain(&mut self, engine: &mut Engine, now: Millis) {
//!         while let Some(action) = engine.poll_action() {
//!             match action {
//!                 // Writes: make durable, then report. Reporting may queue more actions;
//!                 // they come after the ones already queued.
//!                 Action::SaveVote { io, vote } => {
//!                     self.vote = vote;
//!                     engine.handle_io_done(now, io);
//!                 }
//!                 Action::AppendEntries { io, entries } => {
//!                     self.log.extend(entries);
//!                     engine.handle_io_done(now, io);
//!                 }
//!                 Action::Apply { first, last, entries } => {
//!                     let entries = entries
//!                         .unwrap_or_else(|| self.log[first.0 as usize - 1..last.0 as usize].to_vec());
//!                     self.applied.extend(entries);
//!                     engine.handle_applied(now, last);
//!                 }
//!                 Action::ReadReady { id, index } => self.reads_ready.push((id, index)),
//!                 // A single voter sends nothing and never needs a snapshot; with nothing
//!                 // reported durable, it purges nothing.
//!                 other => panic!("not expected in this example: {other:?}"),
//!             }
//!         }
//!     }
//! }
//!
//! let config = Arc::new(Config::default());
//! config.validate().expect("valid config"); // Engine::new does not check it
//! let mut now = Millis(0);
//! let mut engine = Engine::new(NodeId(1), config, InitialState::default(), 42, now);
//! let mut host = Host::default();
//!
//! engine.initialize(now, Membership::new([NodeId(1)])).expect("a new node");
//! host.drain(&mut engine, now);
//!
//! // Nothing happens until time passes: jump to each deadline and fire the timer.
//! while engine.role() != Role::Leader {
//!     now = engine.next_deadline();
//!     engine.handle_timeout(now);
//!     host.drain(&mut engine, now);
//! }
//! assert_eq!(host.vote.voted_for, Some(NodeId(1)));
//!
//! let index = engine.propose(now, vec![Bytes::from_static(b"hello")]).expect("leader");
//! host.drain(&mut engine, now);
//! assert_eq!(engine.applied(), index);
//! assert_eq!(host.applied.last().map(|e| &e.payload), Some(&EntryPayload::Normal(Bytes::from_static(b"hello"))));
//!
//! engine.read(now, 1, ReadMode::ReadIndex);
//! host.drain(&mut engine, now);
//! assert_eq!(host.reads_ready, vec![(1, index)]); // a single voter needs no round trip
//! ```
//!
//! # Many groups on a few threads
//!
//! The reason the engine exists separately is a host that runs thousands of groups without a
//! task or a timer each. One workable shape, the batch system TiKV uses:
//!
//! - **A group is an engine and a mailbox.** Inbound messages, completed writes and apply
//!   results for the group go into its mailbox, and a group with a non-empty mailbox (or an
//!   expired deadline) is marked ready.
//! - **Pollers process ready groups in rounds.** A few threads each take a set of ready
//!   groups, and for each one feed everything in its mailbox, call `handle_timeout` if due,
//!   and drain its actions. Actions of all the groups in the round are pooled: sends go to
//!   per-peer outboxes shared by all groups (see
//!   [`implementing_network`](super::implementing_network)), writes go into one write batch
//!   of a store shared by all groups, applies go to apply workers.
//! - **One sync per round.** When the round's write batch is durable, each group gets
//!   `handle_io_done` with its last [`IoId`] in the batch and becomes ready again (that
//!   completion is what lets followers acknowledge and leaders commit).
//! - **One timer structure for all groups.** Keep each group's `next_deadline()` in a
//!   shared queue or timer wheel, updated after each time the group is processed. Since early
//!   calls to `handle_timeout` are harmless, a coarse wheel works, provided its tick is small
//!   next to [`heartbeat_interval_ms`](crate::Config::heartbeat_interval_ms). An idle
//!   follower's deadline is its election timeout; an idle leader's is its next heartbeat, so
//!   leaders wake every heartbeat interval even with no traffic.
//! - **Memory.** An idle group costs its engine: a fixed-size struct, its recent
//!   configurations, the points where the log's term changes, and a cache of recent entries
//!   bounded by
//!   [`entry_cache_bytes_max`](crate::Config::entry_cache_bytes_max) (entries not yet durable
//!   are always kept) and emptied as entries become durable, applied and, on a leader,
//!   replicated. With thousands of groups, lower that bound.
//!
//! The engine does not know its group id; wrap the calls for one group in a `tracing` span
//! naming it (see [`observability`](super::observability)).
//!
//! [`Engine`]: crate::Engine
//! [`Engine::new`]: crate::Engine::new
//! [`Action`]: crate::Action
//! [`InitialState`]: crate::InitialState
//! [`IoId`]: crate::IoId
//! [`Millis`]: crate::Millis
