//! Implementing storage: the [`LogStorage`] and [`StateMachine`] contracts, and how to test an
//! implementation against them.
//!
//! Raft's guarantees hold only if storage keeps its promises. Most of what follows is about
//! *when* a call may return and *what must be true* once it has; getting this wrong does not
//! show up in normal operation, only after a crash, as lost or diverging data.
//!
//! # `LogStorage`: the log and the vote
//!
//! A [`LogStorage`] holds one group's log entries, the id of the last purged entry, and the
//! vote ([`Vote`]: the current term and whom this node voted for in it). It must be
//! `Send + Sync`: the driver shares it between two stages, the log writer (all writes, and reads
//! of entries for lagging followers) and the applier (reads of committed entries no longer in
//! memory), so a read may run while a write is in progress. Both stages are futures the group's
//! task polls: a call that blocks the thread stalls the group, so blocking I/O belongs on
//! `spawn_blocking` (or a thread of the store's own) with the future awaiting it. Awaiting is
//! fine, also on something the other stage holds (one store behind one async lock for the log
//! and the state machine): the task keeps polling both stages.
//!
//! ## The durability contract, point by point
//!
//! 1. **Durable before returning.** [`save_vote`](crate::LogStorage::save_vote),
//!    [`append`](crate::LogStorage::append), [`truncate_from`](crate::LogStorage::truncate_from) and
//!    [`purge_up_to`](crate::LogStorage::purge_up_to) return `Ok` only once their effect survives a
//!    crash of the process and of the machine: after the `fsync` (or equivalent), not after
//!    handing the data to the OS.
//! 2. **In call order.** Writes take effect in the order they are called. The driver calls
//!    them one at a time per group, each after the previous one returned, and merges
//!    consecutive appends into one `append` call (one sync for many entries). A store shared
//!    by many groups may commit the writes of several groups with one sync, as long as each
//!    call still returns only after the sync that covers it.
//! 3. **Nothing counts before `Ok`.** Raft answers a vote request, acknowledges entries to
//!    the leader, and (on the leader) counts its own copy of an entry toward the commit
//!    quorum only after the call that wrote it returned `Ok`. That is why returning early is a
//!    safety bug and not merely a durability one: a node that voted, crashed and forgot its
//!    vote can vote again in the same term and help elect a second leader; an entry a majority
//!    acknowledged but that some of them lost in a crash can be overwritten after it was
//!    reported committed.
//! 4. **An error stops the group.** Any `Err` makes the group stop with
//!    [`Fatal::Storage`](crate::Fatal::Storage): the driver does not retry and does not
//!    continue on a log it cannot trust. If a failure is worth retrying (a transient I/O
//!    error), retry inside your implementation before returning.
//!
//! Reads must see every write that returned. [`read_entries`](crate::LogStorage::read_entries)
//! returns entries exactly as they were appended, or an error: data that fails a checksum is
//! an error, never something to return.
//!
//! ## Method by method
//!
//! - [`read_vote`](crate::LogStorage::read_vote) / [`save_vote`](crate::LogStorage::save_vote): the last
//!   saved vote replaces the previous one; `None` on a store that never saved one.
//! - [`log_state`](crate::LogStorage::log_state): the id of the last purged entry (`None` if nothing
//!   was ever purged) and the id of the last entry. When the log holds no entry, `last` is
//!   `None` even if entries were purged; the last log id is then the last purged one. Read at
//!   start-up.
//! - [`read_entries(from, to, bytes_max)`](crate::LogStorage::read_entries): entries `from..=to` in
//!   order. Stop early when the next entry would take the total of
//!   [`Entry::size_bytes`](crate::Entry::size_bytes) past `bytes_max`, but always return at
//!   least one entry, so a single large entry still gets through. Any index in the range that
//!   was purged or lies past the last entry is an error.
//! - [`append(entries)`](crate::LogStorage::append): the first entry directly follows the current
//!   last entry (or, with an empty log, the last purged one). Raft never leaves a gap and
//!   removes conflicting entries with `truncate_from` first; terms never decrease along the
//!   log. An empty `append` must succeed and change nothing.
//! - [`truncate_from(index)`](crate::LogStorage::truncate_from): deletes `index` and everything
//!   after it. Used when a follower's uncommitted tail disagrees with its leader's log, and
//!   when an installed snapshot disagrees with the log; never reaches purged entries.
//! - [`purge_up_to(log_id)`](crate::LogStorage::purge_up_to): deletes entries up to and including
//!   `log_id.index` and records `log_id` as the last purged id. `log_id.index` may lie past the
//!   last entry: that happens after installing a snapshot from the leader, and the log is then
//!   empty and continues right after `log_id`.
//! - [`save_committed`](crate::LogStorage::save_committed) /
//!   [`read_committed`](crate::LogStorage::read_committed): optional, with defaults that store
//!   nothing. The Tokio driver calls `save_committed` (unsynced) whenever the commit index
//!   advances, and at start-up reads `read_committed` so that a node can apply up to that
//!   index without waiting for a leader; a host driving [`GroupCore`](crate::GroupCore) gets
//!   the same as `LogAction::SaveCommitted` and may ignore it. Raft's safety does not depend
//!   on it: a node that starts without it starts from its state machine's applied index and
//!   learns the rest from its leader. (Flotilla's shard host ignores it: each apply batch
//!   records the applied index right behind the commit, and writing the commit index too cost
//!   a store write per group per round.)
//!
//! # `StateMachine`: applying the log
//!
//! A [`StateMachine`] is owned by one stage of the group's task (the applier), which calls it
//! with `&mut self`, one call at a time.
//!
//! 1. **Committed entries, in order, once.** [`apply`](crate::StateMachine::apply) receives
//!    committed entries in log order with no gap, each exactly once in the life of the
//!    process. After a restart the driver applies again every entry after
//!    [`applied_state`](crate::StateMachine::applied_state)`().last_applied`. So **store the applied
//!    index atomically with the effects of the entries** (in the same transaction or write
//!    batch): if the data were written and the index not, or the reverse, a crash between the
//!    two would make the node apply an entry twice or skip it, and its state would diverge
//!    from the other nodes'.
//! 2. **One response per entry.** `apply` returns one [`Bytes`](bytes::Bytes) per entry,
//!    including an empty one for each [`Blank`](crate::EntryPayload::Blank) and
//!    [`Membership`](crate::EntryPayload::Membership) entry. The response of a command
//!    reaches the client that proposed it, as [`WriteResponse::data`](crate::WriteResponse::data),
//!    on the node where it was proposed. A different count stops the group.
//! 3. **Deterministic.** Every node applies the same entries and must end in the same state:
//!    do not read the clock, a random number or local settings in `apply`. If a command needs
//!    a time or a random value, the proposer puts it in the command.
//! 4. **Application errors are responses.** A command that fails by the application's rules
//!    (malformed, a failed compare-and-swap) is answered through its response. `Err` means the
//!    state machine itself failed and stops the group; since every node applies the same
//!    entries, a command that deterministically returns `Err` would stop every node.
//! 5. **Remember the configuration.** When applying a
//!    [`Membership`](crate::EntryPayload::Membership) entry, record it (with the entry's id) as
//!    the applied configuration, atomically with the applied index, and report it from
//!    `applied_state`. At start-up the driver rebuilds the configuration from it plus the
//!    configuration entries in the log after `last_applied`; entries before that may have been
//!    purged, so this is the only record of them.
//! 6. **Durability.** [`durable_applied`](crate::StateMachine::durable_applied) returns the
//!    last applied index whose effects survive a crash. The log is purged only up to there, so
//!    a restarted machine must report an applied index at least that far (the driver refuses
//!    to start otherwise). With a store that shares one write-ahead log with the Raft log, the
//!    applied state need not be synced on its own: any later synced write makes it durable;
//!    track which.
//! 7. **Snapshots, on demand and streamed.** [`build_snapshot`](crate::StateMachine::build_snapshot)
//!    captures the state at the last applied entry (a follower needs it) and keeps it
//!    readable by offset ([`read_snapshot`](crate::StateMachine::read_snapshot)) until
//!    [`drop_snapshot`](crate::StateMachine::drop_snapshot). Its [`SnapshotMeta`] holds the
//!    last applied id, the applied configuration, a `snapshot_id` unique among the snapshots
//!    this node builds (a counter or a clock reading), and `size_bytes`, the length of its byte
//!    stream. A snapshot this machine no longer has (it restarted) reads as `None`. A receiver
//!    gets the stream in order ([`receive_snapshot`](crate::StateMachine::receive_snapshot);
//!    offset 0 starts over) and then [`install_snapshot`](crate::StateMachine::install_snapshot),
//!    which checks the whole (put checksums in your stream format) and replaces the state
//!    with it, applied index and configuration included; make it atomic, so a crash leaves
//!    the old state or the new one (or an installation you finish at start-up). Corrupt data
//!    is [`SnapshotError::Refused`](crate::SnapshotError::Refused), which ends only that
//!    transfer.
//! 8. **An error stops the group**, as for the log.
//!
//! Building runs in the applier, so nothing is applied until it returns: build from a
//! point-in-time view of your store (a checkpoint, a read snapshot) rather than by copying
//! under a lock, and write it to files, not memory; see
//! [`snapshots_and_compaction`](super::snapshots_and_compaction).
//!
//! ## A state machine kept only in memory
//!
//! If the state machine does not persist its state, every restart applies the log again from
//! `last_applied`. It must checkpoint: write its state somewhere durable every so often,
//! report the checkpoint's index from `durable_applied`, and when it is created load the
//! checkpoint and report its last log id (and configuration) from `applied_state`, so that
//! applying resumes after it. The log behind the checkpoint is then purged.
//!
//! # Testing an implementation: the conformance suites
//!
//! With the `testing` feature, [`testing::log_storage_suite`](crate::testing::log_storage_suite)
//! and [`testing::state_machine_suite`](crate::testing::state_machine_suite) run the checks
//! behind the contracts above against any implementation: round trips of the vote, append
//! and read back, the `bytes_max` rule, reads outside the log, truncation, purging inside and
//! past the end of the log, appends that do not continue the log; one response per entry,
//! the applied state and configuration, `durable_applied` never ahead of the applied index,
//! snapshots that describe the applied state, read back the same in any chunking, are gone
//! once dropped and round-trip into a fresh machine, lost, duplicated and corrupt chunks
//! refused, a reception started over, installing over a more advanced state. Each check gets a
//! fresh, empty store from the closure you pass, and the suite panics naming the first check
//! that fails.
//!
//! Add the feature to your dev-dependencies
//! (`flotilla-raft = { workspace = true, features = ["testing"] }`) and call the suites from a
//! test. For an on-disk store, give each check its own directory:
//!
//! ```rust,ignore
//! #[tokio::test]
//! async fn my_log_passes_the_conformance_suite() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let mut n = 0;
//!     log_storage_suite(|| {
//!         n += 1;
//!         let path = dir.path().join(format!("check-{n}"));
//!         async move { MyLog::open(&path).await.unwrap() }
//!     })
//!     .await;
//! }
//! ```
//!
//! A complete, compiled version, with a `LogStorage` that forwards to the in-memory one to
//! show the shape of an implementation:
//!
//! ```rust
//! # #[cfg(feature = "testing")]
//! # fn main() {
//! use flotilla_raft::testing::{log_storage_suite, state_machine_suite, MemLogStorage, MemStateMachine};
//! use flotilla_raft::{Entry, LogId, LogIndex, LogState, LogStorage, StorageError, Vote};
//!
//! /// Stands in for your store.
//! struct MyLog {
//!     inner: MemLogStorage,
//! }
//!
//! impl LogStorage for MyLog {
//!     async fn read_vote(&self) -> Result<Option<Vote>, StorageError> {
//!         self.inner.read_vote().await
//!     }
//!     async fn save_vote(&self, vote: &Vote) -> Result<(), StorageError> {
//!         self.inner.save_vote(vote).await
//!     }
//!     async fn log_state(&self) -> Result<LogState, StorageError> {
//!         self.inner.log_state().await
//!     }
//!     async fn read_entries(&self, from: LogIndex, to: LogIndex, bytes_max: usize) -> Result<Vec<Entry>, StorageError> {
//!         self.inner.read_entries(from, to, bytes_max).await
//!     }
//!     async fn append(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
//!         self.inner.append(entries).await
//!     }
//!     async fn truncate_from(&self, index: LogIndex) -> Result<(), StorageError> {
//!         self.inner.truncate_from(index).await
//!     }
//!     async fn purge_up_to(&self, log_id: LogId) -> Result<(), StorageError> {
//!         self.inner.purge_up_to(log_id).await
//!     }
//!     // save_committed / read_committed keep their default (store nothing).
//! }
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! runtime.block_on(async {
//!     log_storage_suite(|| async { MyLog { inner: MemLogStorage::new() } }).await;
//!     state_machine_suite(|| async { MemStateMachine::new() }).await;
//! });
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! The suites check behaviour one call at a time on a live store. They cannot check that
//! writes survive a crash, or that the applied index and the data are written atomically:
//! test those with your store's own crash tests (for example, by killing a process during
//! writes and checking what it recovers).
//!
//! [`LogStorage`]: crate::LogStorage
//! [`StateMachine`]: crate::StateMachine
//! [`Vote`]: crate::Vote
//! [`SnapshotMeta`]: crate::SnapshotMeta
// Links into `crate::testing` resolve only when the `testing` feature is on.
#![cfg_attr(not(feature = "testing"), allow(rustdoc::broken_intra_doc_links))]
