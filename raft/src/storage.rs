//! The storage traits a user implements: the log ([`LogStorage`]) and the state machine
//! ([`StateMachine`]), with the durability contract Raft's safety rests on.

use crate::entry::Entry;
use crate::error::StorageError;
use crate::membership::StoredMembership;
use crate::types::{LogId, LogIndex, Vote};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::future::Future;

/// The bounds of a log: everything Raft needs to resume from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogState {
    /// The id of the last purged entry (the log's entries start right after it); `None` if
    /// nothing was ever purged.
    pub last_purged: Option<LogId>,
    /// The id of the last entry; `None` if the log is empty (then the last log id is
    /// `last_purged`).
    pub last: Option<LogId>,
}

/// The replicated log and the vote of one group.
///
/// # Durability contract
/// 1. `save_vote`, `append`, `truncate_from` and `purge_up_to` return only once their effect is
///    **durable** (it survives a crash of the process and of the machine).
/// 2. They take effect in the order they are called. (The driver calls them one at a time
///    per group; a shared store may still commit the writes of many groups with one fsync.)
/// 3. Raft counts a vote or an entry only after the call that wrote it returned `Ok`. An
///    implementation that returns early breaks Raft's safety, not just durability.
/// 4. An `Err` stops the group: the driver never retries and never continues on a log it
///    cannot trust.
///
/// Reads see every write that returned. `read_entries` must return entries exactly as
/// appended, or an error (a checksum mismatch is an error, never silently used data).
pub trait LogStorage: Send + Sync + 'static {
    /// The vote, or `None` on a node that never stored one.
    fn read_vote(&self) -> impl Future<Output = Result<Option<Vote>, StorageError>> + Send;
    /// Durably stores the vote, replacing the previous one.
    fn save_vote(&self, vote: &Vote) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// The log's bounds.
    fn log_state(&self) -> impl Future<Output = Result<LogState, StorageError>> + Send;
    /// Entries with indexes in `from..=to`, in order, stopping early (but returning at least
    /// one entry) once `bytes_max` (as [`Entry::size_bytes`]) would be exceeded. An index in
    /// that range that is purged or beyond the end is an error.
    fn read_entries(
        &self,
        from: LogIndex,
        to: LogIndex,
        bytes_max: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, StorageError>> + Send;
    /// Durably appends entries. The first one follows the current last entry directly
    /// (Raft truncates conflicting entries first with `truncate_from`).
    fn append(&self, entries: Vec<Entry>) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Durably deletes the entries at `index` and after.
    fn truncate_from(&self, index: LogIndex) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Deletes the entries up to and including `log_id.index` and records `log_id` as the last
    /// purged id. `log_id.index` may be beyond the last entry (after a snapshot was installed):
    /// the log is then empty and continues after `log_id`.
    fn purge_up_to(&self, log_id: LogId) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Records the commit index, so a restart can apply without waiting for a leader.
    /// Optional (need not be durable); the default does nothing.
    fn save_committed(&self, _committed: LogIndex) -> impl Future<Output = Result<(), StorageError>> + Send {
        async { Ok(()) }
    }
    /// The commit index saved last, if any.
    fn read_committed(&self) -> impl Future<Output = Result<Option<LogIndex>, StorageError>> + Send {
        async { Ok(None) }
    }
}

/// Describes a snapshot: the state machine after applying every entry up to `last_log_id`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Id of the last entry the snapshot includes.
    pub last_log_id: LogId,
    /// The configuration in force at `last_log_id`.
    pub membership: StoredMembership,
    /// Unique per snapshot built by one node (e.g. a counter or a clock reading); tells chunks
    /// of different snapshots apart.
    pub snapshot_id: u64,
    /// Size of the snapshot's byte stream.
    pub size_bytes: u64,
}

/// A snapshot held whole in memory: its description and its bytes. Only for small state
/// machines and tests; the [`StateMachine`] API itself streams snapshots in chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// What the snapshot is.
    pub meta: SnapshotMeta,
    /// The state machine's serialized state.
    pub data: Bytes,
}

/// What a state machine reports of itself at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    /// The last applied entry, if any.
    pub last_applied: Option<LogId>,
    /// The last configuration applied (from an entry or a snapshot).
    pub membership: StoredMembership,
}

/// Why receiving or installing a snapshot failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The received bytes are not a valid snapshot (a checksum does not match, a header is
    /// malformed): the transfer is refused and the sender builds a new snapshot. The group
    /// goes on.
    #[error("snapshot refused: {0}")]
    Refused(String),
    /// Storage failed: the group stops.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The application's state machine.
///
/// # Contract
/// 1. `apply` receives committed entries in log order, each exactly once per process life;
///    after a restart, entries after `applied_state().last_applied` are applied again, so the
///    applied index must be stored atomically with the effects of the entries.
/// 2. `apply` returns one response per entry (blank and membership entries included: return
///    an empty response for those). The response reaches the client that proposed the entry.
/// 3. **Log compaction follows durability, not snapshots.** `durable_applied` tells how far
///    the applied state survives a crash; Raft purges its log only up to there, so a restart
///    never needs an entry that is gone. An on-disk state machine reports what its store has
///    synced (with a write-ahead log shared with the Raft log, any later synced write makes
///    earlier unsynced ones durable); an in-memory one reports the index of its last
///    durable checkpoint.
/// 4. **Snapshots are built on demand and streamed.** `build_snapshot` is called only when a
///    follower needs entries that were purged; it captures the state at the last applied
///    entry and keeps it readable by offset (`read_snapshot`) until `drop_snapshot`. A
///    receiver gets the stream in order through `receive_snapshot` (offset 0 starts a new
///    reception and abandons any other) and then `install_snapshot`, which replaces the whole
///    state (and the applied index) with the snapshot's, durably. Neither side need hold a
///    whole snapshot in memory.
/// 5. A `StorageError` stops the group; [`SnapshotError::Refused`] only ends that transfer.
pub trait StateMachine: Send + 'static {
    /// The applied index and configuration, read at start-up.
    fn applied_state(&mut self) -> impl Future<Output = Result<AppliedState, StorageError>> + Send;
    /// Applies committed entries and returns their responses.
    fn apply(&mut self, entries: Vec<Entry>) -> impl Future<Output = Result<Vec<Bytes>, StorageError>> + Send;
    /// The last applied index whose effects survive a crash (see the contract, point 3).
    fn durable_applied(&mut self) -> impl Future<Output = Result<LogIndex, StorageError>> + Send;
    /// Builds a snapshot of the state at the last applied entry and keeps it readable until
    /// `drop_snapshot`. Returns its description.
    fn build_snapshot(&mut self) -> impl Future<Output = Result<SnapshotMeta, StorageError>> + Send;
    /// Bytes `offset..offset + len` of the snapshot `meta` built (always within its size);
    /// `None` if this machine no longer has it (the process restarted, it was dropped): the
    /// transfer then starts over with a new snapshot.
    fn read_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Option<Bytes>, StorageError>> + Send;
    /// Releases a snapshot `build_snapshot` made (no longer needed by any transfer).
    fn drop_snapshot(&mut self, meta: &SnapshotMeta) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Stores the next bytes of the snapshot `meta` being received: `offset` is the number of
    /// bytes received before (0 starts a new reception, abandoning any other).
    fn receive_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = Result<(), SnapshotError>> + Send;
    /// Every byte of `meta` was received: check it and replace the state with it, durably.
    fn install_snapshot(&mut self, meta: &SnapshotMeta) -> impl Future<Output = Result<(), SnapshotError>> + Send;
}
