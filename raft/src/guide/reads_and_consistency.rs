//! Reads and consistency: linearizable reads by ReadIndex or by leader lease, and what the
//! crate does not offer.
//!
//! # Writes
//!
//! A write that [`Raft::client_write`] answered with `Ok` is committed: it is in the log of a
//! quorum and will be applied on every node, in the same place in the order of writes. A write
//! answered with [`RaftError::Timeout`] may or may not have been committed; see
//! [`getting_started`](super::getting_started) for the errors and retries.
//!
//! # Why reading the state machine is not enough
//!
//! Each node's state machine holds what that node has applied, which can lag behind the
//! group. That is true even of the leader: a leader cut off from the others by a partition
//! keeps believing it leads until its check-quorum timer fires, while the majority elects a
//! new leader and accepts writes the old one never sees. A read served from its state machine
//! in that window misses them: it is stale, not linearizable.
//!
//! A linearizable read needs two things: proof that this node is still the leader at some
//! moment after the read arrived, and a state machine that has applied everything committed
//! before that moment. [`Raft::ensure_linearizable`] provides both: it returns once the node
//! has confirmed its leadership and its state machine has applied up to the commit index it
//! had when the read arrived. Read the local state machine right after it returns. (It
//! returns that index; [`Raft::read_index`] returns the same index without waiting for the
//! local state machine, for callers that want to wait in their own way.) Both must be called on
//! the leader; elsewhere they fail with [`RaftError::NotLeader`], naming the leader if known.
//!
//! A group with a single voter answers at once, with no round trip. A new leader answers no
//! read until the blank entry it appends at the start of its term is committed: until then it
//! may not know of entries that earlier leaders committed.
//!
//! # `ReadMode::ReadIndex`
//!
//! The leader records its commit index and starts a heartbeat round (a numbered heartbeat to
//! every other member). Once a quorum of the current configuration (both halves of a joint
//! one) has acknowledged that round or a later one, no other leader can have been elected
//! before the round began, and the read is served at the recorded index.
//!
//! Cost: one round trip to a quorum, and one heartbeat message per member, for each read.
//! Assumption: none beyond Raft's own; ReadIndex does not depend on clocks.
//!
//! With [`read_rounds_to_quorum`](crate::Config::read_rounds_to_quorum), a round that only
//! reads asked for goes to just enough voters to make a quorum with the leader: in a group of
//! three, one heartbeat instead of two, to the follower that answered the latest round first.
//! That spares the other follower, and the leader, a message each way per round, which is
//! most of the work of a read when reads come in many small rounds (on the shard host, ReadIndex
//! gets at 64 clients gained 4–7% at 16% less CPU per read, BENCHMARKS.md, session 30). The
//! heartbeat timer's rounds still go to every follower, and rank the followers again. Each
//! time a chosen follower fails to answer, the reads waiting on it are served by the timer's
//! next round: up to [`heartbeat_interval_ms`](crate::Config::heartbeat_interval_ms) and a
//! round trip later; and when a chosen follower goes down, the lease can lapse for as long.
//! Off by default. A joint configuration, a leader that is not a voter, and a new leader whose
//! followers have answered no round yet ask every follower; learners are never asked for a
//! read's round.
//!
//! # `ReadMode::Lease`
//!
//! A lease read skips the round trip while the leader holds a *lease*: a period in which no
//! other leader can exist. It rests on check-quorum: a follower that has heard from its
//! leader within [`election_timeout_ms_min`](crate::Config::election_timeout_ms_min) ignores
//! requests to vote for someone else. So once a quorum has acknowledged a heartbeat round, no
//! quorum can elect another leader until `election_timeout_ms_min` after each of those
//! followers received it, hence not before `election_timeout_ms_min` after the round was
//! sent.
//!
//! The leader measures that period on its own clock, and the followers on theirs, so the
//! lease is shortened by a margin for clock drift. **The lease lasts
//! `election_timeout_ms_min - lease_clock_drift_ms` from the send time of the latest heartbeat
//! round a quorum acknowledged.** It is safe as long as no two nodes' clocks drift apart by
//! more than [`lease_clock_drift_ms`](crate::Config::lease_clock_drift_ms) within one election
//! timeout. Only the rate matters, not the time of day: the driver measures time from its own
//! start on a monotonic clock. Clocks that jump (a VM migrated or resumed from suspension, a
//! badly virtualized clock) break the assumption; if your deployment cannot rule that out,
//! use ReadIndex.
//!
//! Rules that follow:
//!
//! - **`lease_read` requires `check_quorum`.** Without check-quorum, followers would vote
//!   for a new candidate right away, and the lease would prove nothing;
//!   [`Config::validate`](crate::Config::validate) refuses `lease_read` without
//!   `check_quorum`, and `lease_clock_drift_ms` must be below `election_timeout_ms_min`.
//!   Every node must use the same `election_timeout_ms_min`.
//! - **Transfers void the lease.** The election a leadership transfer starts
//!   ([`MessageBody::TimeoutNow`](crate::MessageBody::TimeoutNow), then a vote request marked
//!   `transfer`) is exempt from the followers' refusal, so the target may win at once. The
//!   leader therefore gives up its lease while a transfer is in progress, and from the moment
//!   it has sent `TimeoutNow` until the end of its term.
//! - **No lease before the term's first commit.** As for every read, a new leader serves
//!   nothing until its blank entry is committed.
//! - **Fallback.** When the lease does not hold, or
//!   [`lease_read`](crate::Config::lease_read) is off, a `Lease` read is served by ReadIndex
//!   instead: choosing `Lease` never fails a read that ReadIndex would serve.
//!
//! With [`Config::default`](crate::Config::default) the lease is 1000 − 100 = 900 ms after
//! each acknowledged heartbeat round, and rounds go out every 100 ms, so a healthy leader
//! serves lease reads without any round trip.
//!
//! # Lease reads without a call: the lease gate
//!
//! Even without a round trip, [`Raft::ensure_linearizable`] hands the read to the group's task
//! and back. [`Raft::lease_read_ready`] answers on the caller's thread instead: it reads the
//! group's [`LeaseGate`](crate::LeaseGate), which the group writes before any message of a step
//! leaves (so a transfer's `TimeoutNow`, a step down or a configuration change shuts it first)
//! and opens only while the state machine applied everything committed. Check it, then read
//! the state machine; call `ensure_linearizable(ReadMode::Lease)` first when it says no. A
//! runtime of your own gets the same from [`GroupCore::lease_gate`](crate::GroupCore::lease_gate);
//! if it answers writes before their application is visible to readers
//! ([`GroupCore::answer_writes`](crate::GroupCore::answer_writes)), the gate stays shut until
//! that application is reported with `handle_applied`.
//!
//! # Choosing
//!
//! | | ReadIndex | Lease |
//! |---|---|---|
//! | Latency | one round trip to a quorum | none while the lease holds |
//! | Assumes | nothing beyond Raft | bounded clock drift, no clock jumps, `check_quorum` |
//! | During a transfer | works | falls back to ReadIndex |
//!
//! # Reads on followers
//!
//! Follower reads (a follower asking the leader for the read index, then waiting to apply up
//! to it) are not offered yet: [`Raft::read_index`] and [`Raft::ensure_linearizable`] fail
//! with `NotLeader` on a follower. A caller that accepts stale data can read any node's state
//! machine directly, with no guarantee at all about freshness: the node may be arbitrarily far
//! behind, or cut off from the group. [`RaftMetrics::applied`](crate::RaftMetrics::applied)
//! tells how far that node has applied.
//!
//! # Failures
//!
//! A read fails with `NotLeader` if the node loses leadership before its round is
//! acknowledged (pending reads fail when it steps down), and with
//! [`RaftError::Timeout`] after [`api_timeout_ms`](crate::Config::api_timeout_ms), for example
//! when a quorum cannot be reached. A failed read has no effect; retry it, on the new leader if
//! there is one.
//!
//! [`Raft::client_write`]: crate::Raft::client_write
//! [`Raft::ensure_linearizable`]: crate::Raft::ensure_linearizable
//! [`Raft::read_index`]: crate::Raft::read_index
//! [`Raft::lease_read_ready`]: crate::Raft::lease_read_ready
//! [`RaftError::Timeout`]: crate::RaftError::Timeout
//! [`RaftError::NotLeader`]: crate::RaftError::NotLeader
