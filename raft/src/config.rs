//! Tuning of one Raft group. Every limit has its unit in its name.

use crate::error::ConfigError;

/// Configuration of a Raft group. `Config::default()` suits a LAN; tests shorten the timers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Lower bound of the randomized election timeout. Also the leader lease length and the
    /// time a follower refuses to vote after hearing from a leader.
    pub election_timeout_ms_min: u64,
    /// Upper bound (exclusive) of the randomized election timeout.
    pub election_timeout_ms_max: u64,
    /// How often a leader sends heartbeats. Must be well below the election timeout.
    pub heartbeat_interval_ms: u64,
    /// Run a pre-vote round before an election, so a partitioned node rejoining does not
    /// disrupt a healthy leader by bumping the term.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within an election timeout steps down; a
    /// follower that heard from a leader within `election_timeout_ms_min` refuses votes.
    /// Required for lease reads.
    pub check_quorum: bool,
    /// Append messages in flight to one follower before the leader waits for acknowledgements.
    pub inflight_msgs_max: usize,
    /// Bytes of entries in flight to one follower (0: no limit; one append always may go).
    /// Bounds the memory a follower catching up from far behind takes on both sides, which
    /// `inflight_msgs_max` full appends would not: 64 of 1 MiB each is 64 MiB per group.
    pub inflight_bytes_max: usize,
    /// Bytes of entries in one append message (at least one entry is always sent).
    pub append_bytes_max: usize,
    /// Entries in one append message.
    pub append_entries_max: usize,
    /// Bytes of already-persisted entries the leader keeps in memory for replication. Entries
    /// not yet durable are always kept (they are not in storage yet).
    pub entry_cache_bytes_max: usize,
    /// Entries kept in the log behind the state machine's durable applied index, so a
    /// follower lagging a little catches up from the log rather than by snapshot.
    pub log_keep_entries: u64,
    /// A leader keeps the entries a follower still needs unless it lags by more than this many
    /// entries (then the follower gets a snapshot): a bound on the disk a slow or dead
    /// follower can pin.
    pub log_lag_entries_max: u64,
    /// Purge the log in steps of at least this many entries (one write each).
    pub log_purge_step_entries: u64,
    /// Bytes of snapshot data in one message.
    pub snapshot_chunk_bytes: usize,
    /// Snapshot chunks in flight to one follower.
    pub snapshot_chunks_in_flight_max: usize,
    /// Resend unacknowledged snapshot chunks after this long without progress.
    pub snapshot_resend_ms: u64,
    /// Serve lease reads (no round trip) while the leader lease holds. Requires `check_quorum`.
    pub lease_read: bool,
    /// Safety margin taken off the lease for clock drift between nodes: the lease lasts
    /// `election_timeout_ms_min - lease_clock_drift_ms` from the send time of the heartbeat
    /// round a quorum acknowledged. Clocks must not drift apart by more than this within one
    /// election timeout.
    ///
    /// The clock is whatever the embedder passes to the engine as `now`. It must keep counting
    /// while the machine is suspended: a clock that stops (Linux's `CLOCK_MONOTONIC`, which
    /// `std::time::Instant` and Tokio read) lets a leader whose VM slept past its lease wake up
    /// believing it still holds, and serve reads the new leader's writes have overtaken. The
    /// shard host counts on `CLOCK_BOOTTIME`; the Tokio driver uses Tokio's clock (so tests
    /// can pause it) and therefore carries that caveat: turn `lease_read` off where machines
    /// may be suspended.
    pub lease_clock_drift_ms: u64,
    /// Give up a leadership transfer that has not completed within this long.
    pub transfer_timeout_ms: u64,
    /// The Tokio driver answers an API call that got no answer within this long with
    /// `RaftError::Timeout`.
    pub api_timeout_ms: u64,
    /// Grant no vote and no pre-vote while holding no configuration at all.
    ///
    /// Off, a node that never joined votes like any other: that is what lets a cluster be
    /// formed by initializing one member and letting the others, still empty, elect it. On, an
    /// empty node waits until a leader gave it a configuration (by log or snapshot). Turn it
    /// on wherever a replica's state may be deleted and the replica created again empty (a
    /// multi-Raft host moving replicas between nodes): re-created, it would otherwise vote for
    /// a candidate lacking entries its lost state had acknowledged. Every member must then be
    /// formed with the initial configuration (`initialize` on each).
    pub votes_need_configuration: bool,
    /// Bytes of commands a leader holds proposed and not yet committed; a proposal that would
    /// go past it is refused with `RaftError::Overloaded` (nothing is appended: retry later).
    /// A proposal is always taken when nothing is uncommitted, so one command larger than the
    /// limit still goes through. It bounds what a leader queues for a slow or partitioned
    /// quorum (raft-rs's `max_uncommitted_size`). 0: no limit.
    pub uncommitted_bytes_max: u64,
    /// How long a leader holds back a commit notice: the empty append that tells a follower
    /// with nothing else coming that entries it holds are committed, so that it applies them.
    /// 0: at once, on every advance of the commit index (as etcd's raft does). Longer, the next
    /// append, which carries the commit index anyway, usually makes the notice unneeded: under
    /// a steady stream of writes each commit otherwise costs every follower a message and a
    /// round of work. Followers then apply up to this much later when writes stop (the
    /// leader's own answers do not wait for them). Only when followers learn of commits
    /// depends on it, never what is committed. At most `heartbeat_interval_ms`, whose
    /// heartbeats carry the commit index too.
    pub commit_notice_delay_ms: u64,
    /// A heartbeat round that only ReadIndex reads asked for goes to just enough voters to
    /// make a quorum with the leader (in a group of three, one of the two followers), chosen
    /// as those that answered the latest rounds first, instead of to every follower; the
    /// heartbeat timer's rounds still go to all. Every other follower's heartbeat would cost
    /// it, and the leader, a message to handle and answer for nothing, since the reads wait
    /// for a quorum only. The cost: each time a chosen follower fails to answer (down, or a
    /// message lost), the reads waiting on it wait for the timer's next round and its answers,
    /// up to `heartbeat_interval_ms` and a round trip longer; and when a chosen follower goes
    /// down, the lease may lapse for as long (reads under it then take a round). Off (etcd's
    /// behaviour) by default. A joint configuration, a leader that is not a voter, or a new
    /// leader before its followers answered a round sends to every follower.
    pub read_rounds_to_quorum: bool,
    /// Engine bugs switched on for the simulator's self-test (feature `sim-bugs` only).
    #[cfg(feature = "sim-bugs")]
    pub bugs: crate::testing::sim::InjectedBugs,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            election_timeout_ms_min: 1000,
            election_timeout_ms_max: 2000,
            heartbeat_interval_ms: 100,
            pre_vote: true,
            check_quorum: true,
            inflight_msgs_max: 64,
            inflight_bytes_max: 8 << 20,
            append_bytes_max: 1 << 20,
            append_entries_max: 4096,
            entry_cache_bytes_max: 4 << 20,
            log_keep_entries: 1000,
            log_lag_entries_max: 50_000,
            log_purge_step_entries: 256,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_chunks_in_flight_max: 4,
            snapshot_resend_ms: 2000,
            lease_read: true,
            lease_clock_drift_ms: 100,
            transfer_timeout_ms: 2000,
            api_timeout_ms: 5000,
            votes_need_configuration: false,
            uncommitted_bytes_max: 64 << 20,
            commit_notice_delay_ms: 0,
            read_rounds_to_quorum: false,
            #[cfg(feature = "sim-bugs")]
            bugs: Default::default(),
        }
    }
}

impl Config {
    /// Short timers for tests and local clusters: elections in 150–300 ms (about seven times
    /// faster than the default), heartbeats every 30 ms.
    pub fn fast() -> Config {
        Config {
            election_timeout_ms_min: 150,
            election_timeout_ms_max: 300,
            heartbeat_interval_ms: 30,
            lease_clock_drift_ms: 20,
            transfer_timeout_ms: 300,
            snapshot_resend_ms: 300,
            ..Config::default()
        }
    }

    /// Checks the relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if self.election_timeout_ms_min == 0 || self.heartbeat_interval_ms == 0 {
            return bad("timeouts must be positive");
        }
        if self.election_timeout_ms_max <= self.election_timeout_ms_min {
            return bad("election_timeout_ms_max must exceed election_timeout_ms_min");
        }
        if self.heartbeat_interval_ms * 2 > self.election_timeout_ms_min {
            return bad("heartbeat_interval_ms must be at most half of election_timeout_ms_min");
        }
        if self.inflight_msgs_max == 0 || self.append_entries_max == 0 || self.append_bytes_max == 0 {
            return bad("replication limits must be positive");
        }
        if self.log_purge_step_entries == 0 {
            return bad("log_purge_step_entries must be positive");
        }
        if self.snapshot_chunk_bytes == 0 || self.snapshot_chunks_in_flight_max == 0 {
            return bad("snapshot limits must be positive");
        }
        if self.lease_read && !self.check_quorum {
            return bad("lease_read requires check_quorum");
        }
        if self.lease_read && self.lease_clock_drift_ms >= self.election_timeout_ms_min {
            return bad("lease_clock_drift_ms must be below election_timeout_ms_min");
        }
        if self.commit_notice_delay_ms > self.heartbeat_interval_ms {
            return bad("commit_notice_delay_ms must be at most heartbeat_interval_ms");
        }
        Ok(())
    }
}
