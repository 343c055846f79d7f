//! Log compaction and snapshots: keeping the log short without rewriting the state, and
//! catching up nodes that fell too far behind, without ever holding a whole snapshot in
//! memory.
//!
//! # Compaction follows durability
//!
//! The log exists so that a node can rebuild its state machine after a crash. Once the
//! state machine holds the effects of entries *durably*, those entries are no longer needed
//! for that, and the log can be purged behind them. No snapshot is built for it.
//!
//! After each applied batch the driver asks the state machine how far its applied state is
//! durable ([`StateMachine::durable_applied`]):
//!
//! - An on-disk state machine reports what its store has synced. When the state machine
//!   shares a write-ahead log with the Raft log (one RocksDB, as Flotilla's shard host does),
//!   any later synced write, such as the next log append, makes earlier unsynced applies
//!   durable too; so the applied state may be written without its own sync, and
//!   `durable_applied` trails `applied` by about one batch.
//! - An in-memory state machine checkpoints now and then (writes its state somewhere
//!   durable) and reports the checkpoint's index. [`MemStateMachine`](crate::testing::MemStateMachine)
//!   lives in memory that outlives every restart of its tests and reports everything.
//!
//! The engine then purges its log ([`LogStorage::purge_up_to`]) up to the durable applied
//! index minus [`log_keep_entries`](crate::Config::log_keep_entries), in steps of at least
//! [`log_purge_step_entries`](crate::Config::log_purge_step_entries). Two more things hold the
//! purge back:
//!
//! - on a leader, the entries a follower still needs, unless it lags by more than
//!   [`log_lag_entries_max`](crate::Config::log_lag_entries_max) entries (a dead follower may
//!   pin at most that much disk; beyond it, it gets a snapshot when it returns);
//! - the entries after a snapshot being built or streamed (below), so that its follower can
//!   continue from the log once it installed it, rather than need another.
//!
//! Every node purges its own log on its own durability; nothing is coordinated.
//! [`Raft::compact_log`] purges now up to everything durable, without the slack;
//! [`RaftMetrics::first_log_index`] shows where the log starts and
//! [`RaftMetrics::durable_applied`] how far the state machine is durable.
//!
//! The contract the purge rests on: a restarted state machine reports an applied index at
//! least as far as every index it called durable. The driver refuses to start a group whose
//! state machine is behind its purged log, rather than run without entries it needs.
//!
//! # Snapshots are built on demand
//!
//! A follower that needs an entry the leader purged gets a snapshot instead. Only then does
//! the leader ask its state machine for one ([`StateMachine::build_snapshot`]): the state at
//! its last applied entry, kept readable by offset until it is dropped. An on-disk state
//! machine builds it from a point-in-time view of its store (a RocksDB snapshot written into
//! SST files in a scratch directory, say), never in memory. One snapshot serves every
//! follower that needs one while it covers what they lack; once no transfer uses it, the
//! engine drops it ([`StateMachine::drop_snapshot`]) and the files go.
//!
//! # Streaming a snapshot to a follower
//!
//! The leader streams the snapshot in chunks ([`MessageBody::Snapshot`](crate::MessageBody::Snapshot)),
//! reading each from the state machine ([`StateMachine::read_snapshot`]) just before it
//! goes out:
//!
//! - Each chunk holds up to [`snapshot_chunk_bytes`](crate::Config::snapshot_chunk_bytes)
//!   bytes; the last one is marked `done`.
//! - At most [`snapshot_chunks_in_flight_max`](crate::Config::snapshot_chunks_in_flight_max)
//!   chunks' worth of bytes are unacknowledged at any time, so at most that much of a
//!   snapshot is in memory on either side. The receiver acknowledges every chunk with the
//!   offset it expects next ([`MessageBody::SnapshotResp`](crate::MessageBody::SnapshotResp)),
//!   and each acknowledgement lets the leader read and send more. The window
//!   (`snapshot_chunk_bytes × snapshot_chunks_in_flight_max`) should cover the link's
//!   bandwidth times its round-trip time, or the transfer waits on acknowledgements.
//! - The receiver accepts only the chunk at the offset it expects and answers any other with
//!   that offset. After a lost chunk, the acknowledged offset stops moving; once
//!   [`snapshot_resend_ms`](crate::Config::snapshot_resend_ms) pass without progress, the
//!   leader resends from the first unacknowledged byte. The transfer resumes where it
//!   stopped, not from the beginning.
//! - If the receiver lost what it had (it restarted), it answers with offset 0 and the leader
//!   starts over. A newer snapshot does not restart a transfer: the log is kept for it.
//! - If the leader's state machine no longer has the snapshot (the leader restarted and its
//!   scratch files are gone), `read_snapshot` returns `None`: the transfer starts over with a
//!   new snapshot.
//! - If the receiver finds the data corrupt (a checksum does not match), its state machine
//!   refuses it ([`SnapshotError::Refused`](crate::SnapshotError::Refused)); the receiver
//!   tells the leader, which drops that snapshot and builds a new one. A refusal ends only the
//!   transfer; a storage error stops the group.
//!
//! # Installing
//!
//! The receiver hands each chunk, in order, to [`StateMachine::receive_snapshot`] (offset 0
//! starts a new reception and abandons any other), which can write it straight to a file.
//! After the last one, [`StateMachine::install_snapshot`] checks the whole and replaces the
//! state with it, durably and atomically (a crash leaves the old state or the new one, or an
//! installation the state machine finishes at start-up). Applying waits meanwhile. Then the
//! log is reconciled with the snapshot:
//!
//! - if the log holds the snapshot's last entry (same index and term), the entries up to it
//!   are purged and the later ones kept;
//! - otherwise the log disagrees with the snapshot or ends before it, and all of it is
//!   discarded; the log continues right after the snapshot.
//!
//! The node's commit, applied and durable applied indexes move to the snapshot's last index
//! and its configuration becomes the snapshot's. It tells the leader the snapshot is
//! installed, and the leader goes back to sending entries from there. A write proposed on
//! this node (when it was leader) whose entry is at or below the snapshot fails with
//! [`RaftError::Indeterminate`](crate::RaftError::Indeterminate). A chunk of a snapshot the
//! receiver already covers (its commit index is at or past the snapshot's end) is answered at
//! once as installed.
//!
//! # Choosing the values
//!
//! ```
//! use flotilla_raft::Config;
//!
//! let config = Config {
//!     // Followers up to 5k entries behind the durable state catch up from the log.
//!     log_keep_entries: 5_000,
//!     // A follower more than 200k entries behind gets a snapshot instead.
//!     log_lag_entries_max: 200_000,
//!     // 1 MiB chunks, 8 in flight: an 8 MiB window, enough for 4 Gbit/s at a 16 ms RTT.
//!     snapshot_chunk_bytes: 1 << 20,
//!     snapshot_chunks_in_flight_max: 8,
//!     // Resend after 1 s without progress; well above a round trip plus a chunk's write.
//!     snapshot_resend_ms: 1_000,
//!     ..Config::default()
//! };
//! config.validate().unwrap();
//! ```
//!
//! [`StateMachine::durable_applied`]: crate::StateMachine::durable_applied
//! [`StateMachine::build_snapshot`]: crate::StateMachine::build_snapshot
//! [`StateMachine::read_snapshot`]: crate::StateMachine::read_snapshot
//! [`StateMachine::drop_snapshot`]: crate::StateMachine::drop_snapshot
//! [`StateMachine::receive_snapshot`]: crate::StateMachine::receive_snapshot
//! [`StateMachine::install_snapshot`]: crate::StateMachine::install_snapshot
//! [`LogStorage::purge_up_to`]: crate::LogStorage::purge_up_to
//! [`Raft::compact_log`]: crate::Raft::compact_log
//! [`RaftMetrics::durable_applied`]: crate::RaftMetrics::durable_applied
//! [`RaftMetrics::first_log_index`]: crate::RaftMetrics::first_log_index
