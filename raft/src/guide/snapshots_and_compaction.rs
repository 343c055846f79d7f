//! Snapshots and log compaction: keeping the log short, and catching up nodes that fell too
//! far behind.
//!
//! Without compaction the log grows forever, and a restarted node has to apply the whole of it
//! again. A snapshot is the state machine's state as of one log entry; once a node has one, it
//! can delete the entries the snapshot covers. A follower that needs entries its leader has
//! deleted receives the snapshot instead.
//!
//! # When snapshots are built
//!
//! Every node, leader or not, builds its own snapshots from its own state machine; nothing is
//! coordinated. After each batch of applied entries, a node asks its state machine for a
//! snapshot ([`StateMachine::build_snapshot`]) once
//! [`snapshot_threshold_entries`](crate::Config::snapshot_threshold_entries) entries have been
//! applied since its last snapshot. Set it to 0 to never build one automatically.
//! [`Raft::trigger_snapshot`] asks for one now (it does nothing if nothing was applied since
//! the last snapshot or a build is already running); it returns once the request is queued,
//! so watch [`RaftMetrics::snapshot`] to see it done. A leader also builds one when a
//! follower needs entries that are gone and the current snapshot does not reach far enough.
//!
//! # Compaction
//!
//! Once a snapshot ending at index `s` is built, the node purges its log up to index
//! `s - log_keep_entries_after_snapshot` ([`LogStorage::purge_up_to`]).
//! [`log_keep_entries_after_snapshot`](crate::Config::log_keep_entries_after_snapshot) keeps a
//! tail of entries the snapshot already covers: a follower that is only a little behind (it
//! restarted, or was partitioned for a moment) then catches up from the log with a few append
//! messages instead of receiving the whole snapshot. [`RaftMetrics::first_log_index`] shows
//! where the log now starts.
//!
//! # Streaming a snapshot to a follower
//!
//! When a follower needs an entry before the leader's first log index, the leader switches it
//! to snapshot mode and streams its current snapshot in chunks
//! ([`MessageBody::Snapshot`](crate::MessageBody::Snapshot)):
//!
//! - Each chunk holds up to [`snapshot_chunk_bytes`](crate::Config::snapshot_chunk_bytes) of
//!   data; the last one is marked `done`.
//! - At most [`snapshot_chunks_in_flight_max`](crate::Config::snapshot_chunks_in_flight_max)
//!   chunks' worth of bytes are unacknowledged at any time. The receiver acknowledges every
//!   chunk with the offset it expects next
//!   ([`MessageBody::SnapshotResp`](crate::MessageBody::SnapshotResp)), and each
//!   acknowledgement lets the leader send more. The window (`snapshot_chunk_bytes ×
//!   snapshot_chunks_in_flight_max`) should cover the link's bandwidth times its round-trip
//!   time, or the transfer waits on acknowledgements instead of filling the link.
//! - The receiver accepts only the chunk at the offset it expects, and answers any other with
//!   that offset. If a chunk is lost, the chunks after it are refused and the acknowledged
//!   offset stops moving; once
//!   [`snapshot_resend_ms`](crate::Config::snapshot_resend_ms) pass without progress, the
//!   leader resends from the first unacknowledged byte (it checks at each heartbeat). The
//!   transfer resumes where it stopped, not from the beginning.
//! - If the receiver lost what it had received (it restarted), it answers with offset 0 and
//!   the leader starts over. If the leader builds a newer snapshot during a transfer, the
//!   transfer restarts with the newer one.
//!
//! Chunking bounds the size of each message and keeps heartbeats flowing between chunks; it
//! does not bound memory. The driver keeps the current snapshot's data in memory to send it,
//! and the receiving driver collects the chunks in memory until the last one arrives. A
//! state machine whose snapshots do not fit in memory does not fit this design yet.
//!
//! # Installing
//!
//! When the last chunk arrives, the receiver checks that it got
//! [`size_bytes`](crate::SnapshotMeta::size_bytes) bytes (a mismatch stops the group) and
//! calls [`StateMachine::install_snapshot`]. Applying waits meanwhile. Then the log is
//! reconciled with the snapshot:
//!
//! - if the log holds the snapshot's last entry (same index and term), the entries up to it
//!   are purged and the later ones kept;
//! - otherwise the log disagrees with the snapshot or ends before it, and all of it is
//!   discarded; the log continues right after the snapshot.
//!
//! The node's commit and applied indexes move to the snapshot's last index and its
//! configuration becomes the snapshot's. It tells the leader the snapshot is installed, and
//! the leader goes back to sending entries from there. A write proposed on this node (when it
//! was leader) whose entry is at or below the snapshot fails with
//! [`RaftError::Dropped`](crate::RaftError::Dropped). A chunk of a snapshot the receiver
//! already covers (its commit index is at or past the snapshot's end) is answered at once as
//! installed.
//!
//! # Choosing the values
//!
//! ```
//! use flotilla_raft::Config;
//!
//! let config = Config {
//!     // Snapshot every 100k entries: fewer builds, but more log to replay after a restart.
//!     snapshot_threshold_entries: 100_000,
//!     // Followers up to 5k entries behind the last snapshot catch up from the log.
//!     log_keep_entries_after_snapshot: 5_000,
//!     // 256 KiB chunks, 8 in flight: a 2 MiB window, enough for 1 Gbit/s at a 16 ms RTT.
//!     snapshot_chunk_bytes: 256 << 10,
//!     snapshot_chunks_in_flight_max: 8,
//!     // Resend after 1 s without progress; well above a round trip plus a chunk's write.
//!     snapshot_resend_ms: 1_000,
//!     ..Config::default()
//! };
//! config.validate().unwrap();
//! ```
//!
//! [`StateMachine::build_snapshot`]: crate::StateMachine::build_snapshot
//! [`StateMachine::install_snapshot`]: crate::StateMachine::install_snapshot
//! [`LogStorage::purge_up_to`]: crate::LogStorage::purge_up_to
//! [`Raft::trigger_snapshot`]: crate::Raft::trigger_snapshot
//! [`RaftMetrics::snapshot`]: crate::RaftMetrics::snapshot
//! [`RaftMetrics::first_log_index`]: crate::RaftMetrics::first_log_index
