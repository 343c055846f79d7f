//! The shard host: thousands of Raft groups (shards) of one node on a few tasks.
//!
//! Not a task and a timer per group. Groups are spread over `pollers` tasks (group `g`
//! lives on poller `g % pollers`); each poller owns its groups outright and runs rounds:
//!
//! 1. take every queued event (peer messages, API calls, completed writes and applies) from its
//!    one mailbox, and on the tick (every `tick_ms`, one timer for all its groups) fire the
//!    timers of the groups that are awake;
//! 2. drive each group touched ([`GroupCore::poll_action`]);
//! 3. submit the log writes of all those groups as **one** request to the store's writer (one
//!    fsync for the round, and the writer merges rounds of all pollers), then their applies;
//! 4. hand the transport **one [`NodeBatch`] per destination node**, carrying every message
//!    of every group of the round for that node (heartbeats of many groups travel together),
//!    except snapshot chunks, which go one by one to [`HostNetwork::send_transfer`] so that a
//!    megabyte of snapshot never queues in front of heartbeats and appends.
//!
//! **Quiescence.** A leader whose group has been idle (everything committed, applied and
//! matched by every live follower, no caller waiting; once woken, also every live follower
//! answered a heartbeat since, so a live node whose replica does not answer keeps a woken
//! group heartbeating until that node counts as down) for `quiesce_after_ticks` ticks goes
//! quiet and tells its followers in the next batch; a follower at the same point goes quiet
//! too (one still writing or applying the last entries when the notice comes, at the first
//! tick after its work is done, if that leader still counts as live). Quiet groups cost
//! nothing per tick: they are not in the awake set. A proposal, a call or a message wakes a
//! group. Node-level liveness replaces per-group heartbeats while quiet: every host pings the
//! nodes it talks to once per heartbeat interval, and when a node has not been heard from for
//! `peer_down_ms`, the quiet groups it leads are woken (at most
//! `wakes_per_tick_max` per poller tick, so a blip does not wake ten thousand groups at once)
//! and elect a new leader. A follower that is down does not keep a group awake; when its node
//! answers again, or comes back on a new connection (a restart too quick to count as down,
//! [`HostNetwork::connections`]), the quiet groups led here in which it may be behind (it is
//! a learner there, or lacks entries) wake the same way, after those whose leader went down,
//! so that it catches up (a learner never campaigns, so it would not wake them itself).
//!
//! The pollers are tasks on the runtime of the transport and the callers (see `Poller::run`
//! for why): a round's own RocksDB work (preparing log writes, applying, reading entries
//! and values the state machine needs, mostly from memory) runs on a Tokio worker; the
//! writes and their fsyncs run on the store's writer thread (a poller finding its queue full
//! blocks in place, so the worker's other tasks move elsewhere); snapshots, entry loads for
//! lagging followers and compactions run on Tokio's blocking pool. Liveness pings have a
//! thread of their own.

mod apply;
mod control;
mod drive;
mod group_info;
mod group_state;
mod inbox;
mod liveness;
mod merge;
mod poller;
mod registry;
mod sm_queue;

use crate::keys::{decode, encode, group_key, meta_key};
pub use crate::kv::GroupDescriptor;
use crate::kv::{KeyRange, KvCommand, KvResponse, KvStateMachine, SplitEffect};
use crate::log::RocksLog;
use crate::store::{Op, Store, CF_META, CF_RAFT};
use bytes::Bytes;
use flotilla_raft::{
    driver::recover_state, Config, Engine, GroupCore, GroupId, LogId, LogIndex, Membership, Message, Millis, NodeId,
    RaftError, ReadMode, Request, SnapshotMeta, StorageError, StoredMembership, Term,
};
pub use group_info::{GroupInfo, SharedConf};
use group_state::GroupState;
use poller::{Poller, PollerMsg, Removal};
pub(crate) use registry::{GroupEntry, Registry, Reservation};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::info;

/// Events a poller handles in one round before it drives its groups (a bound on latency).
pub const EVENTS_PER_ROUND_MAX: usize = 4096;

/// Tuning of a host. Every limit has its unit in its name.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// This node.
    pub node: NodeId,
    /// Poller tasks; groups are spread over them by id.
    pub pollers: usize,
    /// The one timer of each poller: how often the timers of awake groups are checked.
    pub tick_ms: u64,
    /// Raft timers and limits of every group.
    pub raft: Config,
    /// Ticks a leader's group must stay idle before it goes quiet; 0 disables quiescence.
    pub quiesce_after_ticks: u32,
    /// A node not heard from for this long counts as down: the quiet groups it leads wake up
    /// (and when it answers again, the quiet groups led here where it may be behind).
    pub peer_down_ms: u64,
    /// Quiet groups woken per poller tick because their leader's node went down, then because
    /// a member's node answers again or comes back on a new connection.
    pub wakes_per_tick_max: usize,
    /// Elections started per poller tick, at most; a group whose election timer fired past
    /// that waits for a later tick. Without a bound, a node restarting with 100,000 groups
    /// started them all at once: each round of the poller then took longer than an election
    /// timeout, so every election timed out before its votes were counted, and none ended.
    pub campaigns_per_tick_max: usize,
    /// Peer messages queued for one poller; beyond it arriving messages are dropped (and
    /// counted), which Raft tolerates.
    pub mailbox_msgs_max: usize,
    /// Caller requests queued for one poller; beyond it a call is refused at once with
    /// [`HostError::Overloaded`] (nothing was proposed: the caller may retry).
    pub mailbox_requests_max: usize,
    /// How long an API call waits for its answer before `Timeout` (outcome unknown).
    pub api_timeout_ms: u64,
}

impl HostConfig {
    /// Defaults for `node`: two pollers, a 10 ms tick, quiet after ~3 heartbeat intervals.
    pub fn new(node: NodeId) -> HostConfig {
        HostConfig::with_raft(node, Config::default())
    }

    /// Defaults for `node` running its groups with `raft`: the quiescence delay (~3 heartbeat
    /// intervals), the peer-down delay (the shortest election timeout) and the API timeout
    /// follow its timers.
    pub fn with_raft(node: NodeId, raft: Config) -> HostConfig {
        let tick_ms = 10;
        HostConfig {
            node,
            pollers: 2,
            tick_ms,
            quiesce_after_ticks: (3 * raft.heartbeat_interval_ms / tick_ms) as u32,
            peer_down_ms: raft.election_timeout_ms_min,
            wakes_per_tick_max: 64,
            campaigns_per_tick_max: 64,
            mailbox_msgs_max: 1 << 16,
            mailbox_requests_max: 1 << 14,
            api_timeout_ms: raft.api_timeout_ms,
            raft,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), HostError> {
        self.raft.validate().map_err(|e| HostError::Config(e.to_string()))?;
        if self.pollers == 0 || self.pollers > 256 {
            return Err(HostError::Config(format!("pollers must be 1..=256, not {}", self.pollers)));
        }
        if self.tick_ms == 0 || self.tick_ms > self.raft.heartbeat_interval_ms {
            return Err(HostError::Config(format!(
                "tick_ms must be 1..=heartbeat_interval_ms ({}), not {}",
                self.raft.heartbeat_interval_ms, self.tick_ms
            )));
        }
        if self.peer_down_ms < 2 * self.raft.heartbeat_interval_ms {
            return Err(HostError::Config("peer_down_ms must be at least two heartbeat intervals".into()));
        }
        if self.wakes_per_tick_max == 0
            || self.campaigns_per_tick_max == 0
            || self.mailbox_msgs_max == 0
            || self.mailbox_requests_max == 0
        {
            return Err(HostError::Config(
                "wakes_per_tick_max, campaigns_per_tick_max, mailbox_msgs_max and mailbox_requests_max must be positive"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Errors of host calls: what went wrong and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No such group on this node (never created, or destroyed): refresh routing.
    #[error("group {0} is not on this node")]
    UnknownGroup(GroupId),
    /// The group already exists.
    #[error("group {0} already exists on this node")]
    GroupExists(GroupId),
    /// Another group of this node owns keys of the range asked for, or will once the split
    /// being started here completes: the new group waits for the map or the split to settle.
    #[error("the range of group {group} overlaps group {other} of this node")]
    RangeTaken {
        /// The group asked for.
        group: GroupId,
        /// The local group (registered, or being started) that owns keys of its range.
        other: GroupId,
    },
    /// The Raft group refused or failed the request (e.g. `NotLeader { leader }`: retry there).
    #[error(transparent)]
    Raft(#[from] RaftError),
    /// The storage failed; the store is poisoned and the node must be restarted.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The key is outside the group's range: the caller's routing is stale.
    #[error("key outside the range of group {0}")]
    KeyOutOfRange(GroupId),
    /// A key or value over the size limits (`KEY_BYTES_MAX`, `VALUE_BYTES_MAX`).
    #[error("request too large: {0}")]
    TooLarge(String),
    /// Too many requests are queued for the group's poller; this one was not queued.
    #[error("the host is overloaded ({0} requests queued for this group's poller): retry later")]
    Overloaded(usize),
    /// The host is shutting down or stopped; the request did not reach its group.
    #[error("the host is stopped")]
    Stopped,
    /// The group stopped (host shutdown, group destroyed) after the request reached it and
    /// before it answered: a write may or may not have been applied.
    #[error("the group stopped before answering")]
    Lost,
    /// The configuration cannot work.
    #[error("bad host configuration: {0}")]
    Config(String),
    /// A conditional removal ([`Host::destroy_group_if`]) found the group changed since the
    /// removal was decided: it is kept.
    #[error("group {0} changed since its removal was decided: kept")]
    Kept(GroupId),
}

/// The condition of [`Host::destroy_group_if`], judged on the group's state on its poller.
pub type DestroyGuard = Box<dyn FnOnce(&GroupInfo) -> bool + Send>;

/// A leader's notice that group `group` went quiet at `(term, index)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceNotice {
    /// The group.
    pub group: GroupId,
    /// The leader's term.
    pub term: Term,
    /// The last index, committed and applied everywhere.
    pub index: LogIndex,
}

/// A member's answer to a message from a node its group's committed configuration at `index`
/// (and any newer one it holds) leaves out: the sender's replica may delete itself if the
/// newest configuration it holds is older (see `flotilla_placement::lifecycle`). How a replica
/// that missed its own removal learns of it: one started late by a split entry, say, after the
/// group it was born into had moved it away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNotice {
    /// The group.
    pub group: GroupId,
    /// The index of the committed configuration without the node.
    pub index: LogIndex,
}

/// Everything one host sends another in one round: the messages of many groups, quiescence
/// notices, and (when empty) a liveness ping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBatch {
    /// The sender. A transport must check it against the peer's authenticated identity.
    pub from: NodeId,
    /// Raft messages, tagged with their group.
    pub messages: Vec<(GroupId, Message)>,
    /// Groups whose leader went quiet.
    pub quiesce: Vec<QuiesceNotice>,
    /// Groups that removed the receiving node ([`RemovedNotice`]).
    pub removed: Vec<RemovedNotice>,
}

impl NodeBatch {
    /// Encodes as a versioned, checksummed record (for a transport that moves bytes).
    pub fn encode(&self) -> Result<Bytes, StorageError> {
        encode(self).map(Bytes::from)
    }
    /// Decodes bytes made by [`NodeBatch::encode`]; corrupt input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<NodeBatch, StorageError> {
        decode(bytes, || "node batch".into())
    }
}

/// Where a host's outgoing batches go: one call per destination node per round. Must not
/// block (queue and return); may drop (Raft tolerates loss).
pub trait HostNetwork: Send + Sync + 'static {
    /// Sends `batch` to node `to`.
    fn send(&self, to: NodeId, batch: NodeBatch);

    /// Sends one snapshot chunk (`msg`, a [`flotilla_raft::MessageBody::Snapshot`] of group
    /// `group`) to node `to`, apart from the batches: a network with a bulk path (the node's
    /// transfer streams) uses it so large chunks never delay Raft traffic. Same rules as
    /// `send`: must not block, may drop (the leader resends unacknowledged chunks). The
    /// default puts the chunk in a batch of its own, so a network without a bulk path works
    /// unchanged.
    fn send_transfer(&self, to: NodeId, group: GroupId, msg: Message) {
        self.send(
            to,
            NodeBatch { from: msg.from, messages: vec![(group, msg)], quiesce: Vec::new(), removed: Vec::new() },
        );
    }

    /// How many connections with node `to` were established so far, if the network knows (a
    /// network that does not answers a constant). The count moving tells the host that the
    /// node may have restarted and lost what it had not applied, even when it came back before
    /// it counted as down. With the node's transport, a restarted node dials its peers of
    /// higher id at once (the lower id of a pair dials): they see the count move. A peer of
    /// lower id keeps its old connection until QUIC's idle timeout, during which the restarted
    /// node cannot send, so it counts as down first and is caught up when it answers again.
    fn connections(&self, _to: NodeId) -> u64 {
        0
    }
}

/// Counters of a host.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Peer messages dropped because a poller's mailbox was full.
    pub mailbox_dropped: AtomicU64,
    /// Messages for groups not on this node.
    pub unknown_group_msgs: AtomicU64,
    /// Raft messages dropped because they claimed another sender than their batch's (whose
    /// sender the transport authenticated).
    pub sender_mismatch_msgs: AtomicU64,
    /// Snapshot chunks dropped because the snapshot's range cannot be installed here: it
    /// would replace keys another group of this node owns, or widen a group's range.
    pub snapshot_chunks_refused: AtomicU64,
    /// Batches handed to the network.
    pub batches_sent: AtomicU64,
    /// Raft messages handed to the network.
    pub messages_sent: AtomicU64,
    /// Groups that went quiet (cumulative).
    pub quiesced: AtomicU64,
    /// Quiesce notices a busy follower kept to take once its work is done (cumulative).
    pub quiesce_deferred: AtomicU64,
    /// Quiet groups woken (cumulative).
    pub woken: AtomicU64,
    /// Elections put off to a later tick by `HostConfig::campaigns_per_tick_max` (cumulative).
    pub campaigns_postponed: AtomicU64,
    /// Poller rounds run.
    pub rounds: AtomicU64,
    /// Log writes of one group handed to the store (a round writes each group's new entries
    /// and vote as one): with the store's syncs, how many groups' appends one fsync carries.
    pub log_appends: AtomicU64,
    /// Lease reads (gets and scans) served on the caller's thread, without a round to a
    /// poller (the group's lease gate was open).
    pub local_reads: AtomicU64,
    /// Summaries of every group built afresh for [`Host::group_info_shared`] (its shared
    /// copy was of an older generation).
    pub info_builds: AtomicU64,
    /// Time those builds took, waiting on the pollers included, in microseconds.
    pub info_build_micros: AtomicU64,
}

/// State shared by the host handle and its pollers.
pub(crate) struct Shared {
    pub(crate) config: HostConfig,
    /// The Raft configuration of every group here (see [`engine_config`]): one copy for all of
    /// them, not one each (about 200 bytes per group on a node of thousands).
    pub(crate) raft: Arc<flotilla_raft::Config>,
    pub(crate) store: Store,
    pub(crate) network: Arc<dyn HostNetwork>,
    /// Time zero of liveness (peers never heard from count from here).
    pub(crate) base: Instant,
    /// Every engine clock on this host.
    pub(crate) clock: crate::clock::BootClock,
    pub(crate) stats: HostStats,
    /// When each peer node was last heard from (liveness for quiet groups).
    pub(crate) heard: Mutex<HashMap<NodeId, Instant>>,
    /// Nodes this host talks to: pinged once per heartbeat interval.
    pub(crate) peers: Mutex<BTreeSet<NodeId>>,
    /// Peer messages queued per poller (the mailbox bound).
    pub(crate) queued: Vec<AtomicUsize>,
    /// Caller requests queued per poller (the mailbox bound for them).
    pub(crate) requests_queued: Vec<AtomicUsize>,
    /// Runs snapshot work on Tokio's blocking pool.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Set by `shutdown`: the pinger stops.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Starts of split-born groups in flight (see `control.rs`): shutdown waits for them, so
    /// none outlives the host holding the store.
    pub(crate) split_starts: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Test hook (`Host::hold_applies`): apply writes wait, already answered and prepared.
    pub(crate) hold_applies: std::sync::atomic::AtomicBool,
    /// Test hook (`Host::hold_loads`): entry loads for followers wait before reading.
    pub(crate) hold_loads: std::sync::atomic::AtomicBool,
    /// The pollers' mailboxes (group `g` lives on poller `g % len`).
    pub(crate) pollers: Vec<poller::PollerTx>,
    /// Groups on this node: where each lives and its state machine (for reads).
    pub(crate) registry: RwLock<Registry>,
    /// Moves after any poller round in which a group's summary changed or a group left (see
    /// `Poller::info_changed`).
    pub(crate) info_generation: AtomicU64,
    /// The summaries of every group as of a generation ([`Host::group_info_shared`]).
    pub(crate) info_cache: Mutex<Option<(u64, Arc<Vec<GroupInfo>>)>>,
}

impl Shared {
    /// The engines' clock (see [`crate::clock`]: it keeps counting through a suspend).
    pub(crate) fn now(&self) -> Millis {
        Millis(self.clock.elapsed_ms())
    }

    /// Whether `node` answered recently. A node never heard from counts from the host's start,
    /// so groups do not all wake at start-up.
    pub(crate) fn is_live(&self, node: NodeId, at: Instant) -> bool {
        if node == self.config.node {
            return true;
        }
        let heard = self.heard.lock().ok().and_then(|h| h.get(&node).copied()).unwrap_or(self.base);
        at.saturating_duration_since(heard) < Duration::from_millis(self.config.peer_down_ms)
    }
}

/// Groups recovered at once when a host opens.
const GROUPS_STARTING_MAX: usize = 64;

/// The host of one node's groups. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    shared: Arc<Shared>,
    /// The pollers' tasks, awaited at shutdown.
    pollers: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// The pinger's thread.
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl Host {
    /// Starts a host on `store`, resuming every group the store holds. Must be called inside
    /// a Tokio runtime: the pollers are tasks spawned on it (a multi-thread one, so that a
    /// poller's round and the other tasks run side by side; on a current-thread runtime a
    /// poller waiting for room in the store's queue holds the runtime until the writer
    /// drains it), and snapshots run on its blocking pool. The host stops with
    /// [`Host::shutdown`], or when the runtime is dropped.
    pub async fn open(store: Store, config: HostConfig, network: Arc<dyn HostNetwork>) -> Result<Host, HostError> {
        config.validate()?;
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..config.pollers).map(|_| poller::PollerTx::channel()).unzip();
        let shared = Arc::new(Shared {
            queued: (0..config.pollers).map(|_| AtomicUsize::new(0)).collect(),
            requests_queued: (0..config.pollers).map(|_| AtomicUsize::new(0)).collect(),
            raft: Arc::new(engine_config(&config)),
            config: config.clone(),
            store: store.clone(),
            network,
            base: Instant::now(),
            clock: crate::clock::BootClock::new(),
            stats: HostStats::default(),
            heard: Mutex::new(HashMap::new()),
            peers: Mutex::new(BTreeSet::new()),
            runtime: tokio::runtime::Handle::current(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            split_starts: Mutex::new(Vec::new()),
            hold_applies: std::sync::atomic::AtomicBool::new(false),
            hold_loads: std::sync::atomic::AtomicBool::new(false),
            pollers: senders.clone(),
            registry: RwLock::new(Registry::default()),
            info_generation: AtomicU64::new(0),
            info_cache: Mutex::new(None),
        });
        // Liveness pings on a thread of their own: their timing does not depend on a poller's
        // round (the pings themselves leave through the transport's tasks). Started first, so
        // that if it cannot start nothing else has.
        let pinger_thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("flotilla-pinger".into())
                .spawn(move || pinger(shared))
                .map_err(|e| HostError::Config(format!("cannot start the pinger thread: {e}")))?
        };
        let mut pollers = Vec::new();
        for (i, (rx, tx)) in receivers.into_iter().zip(senders).enumerate() {
            let poller = Poller::new(i, shared.clone(), rx, tx);
            pollers.push(tokio::spawn(poller.run()));
        }
        let host =
            Host { shared, pollers: Arc::new(Mutex::new(pollers)), threads: Arc::new(Mutex::new(vec![pinger_thread])) };
        let ids = match store.blocking(|s| s.groups()).await {
            Ok(ids) => ids,
            Err(e) => {
                // Nothing half-started stays behind: the pollers and the pinger stop.
                host.shutdown().await;
                return Err(e.into());
            }
        };
        // A group's recovery is a handful of reads, each a hand-off to the blocking pool and
        // back: one group at a time, 10,000 groups took seconds of wake-ups. Several at once.
        let mut starting = tokio::task::JoinSet::new();
        let mut next = ids.iter().copied();
        loop {
            while starting.len() < GROUPS_STARTING_MAX {
                let Some(g) = next.next() else { break };
                let h = host.clone();
                starting.spawn(async move { h.start_stored_group(g).await });
            }
            let failed = match starting.join_next().await {
                None => break,
                Some(Ok(Ok(()))) => continue,
                Some(Ok(Err(e))) => e,
                Some(Err(e)) => StorageError::new("open", format!("a group did not start: {e}")).into(),
            };
            // Nothing half-started stays behind: the other starts end, then the pollers.
            starting.shutdown().await;
            host.shutdown().await;
            return Err(failed);
        }
        host.retire_sources_absorbed_by_snapshots().await;
        info!(node = %config.node, groups = ids.len(), pollers = config.pollers, "host started");
        Ok(host)
    }

    /// Starts group `g` from its descriptor and state in the store (at [`Host::open`]).
    async fn start_stored_group(&self, g: GroupId) -> Result<(), HostError> {
        let desc = self
            .shared
            .store
            .blocking(move |s| {
                let raw = s
                    .db()
                    .get_cf(s.cf(CF_META)?, meta_key(g))
                    .map_err(|e| StorageError::new("read", e.to_string()))?
                    .ok_or_else(|| StorageError::new("read", format!("group {g}: descriptor vanished")))?;
                decode::<GroupDescriptor>(&raw, || format!("group {g} descriptor"))
            })
            .await?;
        let reservation = self.shared.reserve(g, &desc.range)?;
        self.start_group(reservation, desc.range, desc.initial).await
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.shared.config.node
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Counters.
    pub fn stats(&self) -> &HostStats {
        &self.shared.stats
    }

    /// Creates group `group` owning `range`, durably. With `initial`, this node forms the
    /// group with that configuration (call it on every initial member, or on one); without,
    /// the replica waits for a leader to add it. Refused with [`HostError::RangeTaken`] while a
    /// group of this node owns keys of `range`, or will once a split being started here
    /// completes: a node's groups own disjoint ranges.
    pub async fn create_group(
        &self,
        group: GroupId,
        range: KeyRange,
        initial: Option<Membership>,
    ) -> Result<(), HostError> {
        let reservation = self.shared.reserve_free(group, &range)?;
        self.create_reserved(reservation, range, initial).await
    }

    /// [`Host::create_group`] of each of `groups` (or, with `restored`, [`Host::create_restored_group`]
    /// of those with a configuration), answered in order: their ranges are checked under one
    /// hold of the registry's lock, at O(log n) each rather than a scan of every group here,
    /// and the creations then run together (their durable writes share fsyncs). How a node
    /// forms the thousands of replicas of a new cluster.
    pub async fn create_groups(
        &self,
        groups: Vec<(GroupId, KeyRange, Option<Membership>)>,
        restored: bool,
    ) -> Vec<(GroupId, Result<(), HostError>)> {
        let wanted: Vec<(GroupId, KeyRange)> = groups.iter().map(|(g, r, _)| (*g, r.clone())).collect();
        let reservations = self.shared.reserve_free_many(&wanted);
        let mut creating = tokio::task::JoinSet::new();
        for (i, ((group, range, initial), reservation)) in groups.into_iter().zip(reservations).enumerate() {
            let host = self.clone();
            creating.spawn(async move {
                let done = match (reservation, initial) {
                    (Err(e), _) => Err(e),
                    (Ok(r), Some(m)) if restored => host.create_restored_reserved(r, range, m).await,
                    (Ok(r), initial) => host.create_reserved(r, range, initial).await,
                };
                (i, group, done)
            });
        }
        let mut out: Vec<(usize, GroupId, Result<(), HostError>)> = Vec::new();
        while let Some(done) = creating.join_next().await {
            match done {
                Ok(d) => out.push(d),
                // A creation task that panicked: its group is not reported (the caller tries
                // again), and its reservation was released when the task unwound.
                Err(e) => tracing::warn!(error = %e, "a group's creation failed"),
            }
        }
        out.sort_by_key(|(i, _, _)| *i);
        out.into_iter().map(|(_, g, r)| (g, r)).collect()
    }

    /// The rest of [`Host::create_group`], once `reservation` holds the group's range.
    async fn create_reserved(
        &self,
        reservation: Reservation,
        range: KeyRange,
        initial: Option<Membership>,
    ) -> Result<(), HostError> {
        let group = reservation.group;
        // The configuration is kept in the descriptor: a crash before the group's first write
        // still forms it at the next start.
        let desc = encode(&GroupDescriptor { range: range.clone(), initial: initial.clone() })?;
        self.shared.store.write(vec![Op::Put(CF_META, meta_key(group).to_vec(), desc)], true).await?;
        self.start_group(reservation, range, initial).await
    }

    /// Forms group `group` over `range` on a node whose store already holds the range's data
    /// (a restore from a backup loaded it): as [`Host::create_group`] with `membership`, but
    /// the replica starts as if a snapshot at the formation point ([`RESTORED_FORMATION`],
    /// with `membership`) had been installed: applied there, and the log empty behind it. So
    /// the restored data is part of the group's history: a replica added later needs entries
    /// from index 1, which no log holds, and gets a snapshot, built from this data. Formed
    /// with an entry at index 1 instead, a new replica would be fed the log from there onto
    /// an empty key range, and never get the data. Every member of the bootstrap must form
    /// it this way, from the same data (the node checks the backup's id).
    pub async fn create_restored_group(
        &self,
        group: GroupId,
        range: KeyRange,
        membership: Membership,
    ) -> Result<(), HostError> {
        let reservation = self.shared.reserve_free(group, &range)?;
        self.create_restored_reserved(reservation, range, membership).await
    }

    /// The rest of [`Host::create_restored_group`], once `reservation` holds the group's range.
    async fn create_restored_reserved(
        &self,
        reservation: Reservation,
        range: KeyRange,
        membership: Membership,
    ) -> Result<(), HostError> {
        let group = reservation.group;
        let desc = encode(&GroupDescriptor { range: range.clone(), initial: Some(membership.clone()) })?;
        let applied = crate::kv::AppliedRecord {
            last_applied: Some(RESTORED_FORMATION),
            membership: StoredMembership { log_id: RESTORED_FORMATION, membership: membership.clone() },
        };
        // One synced write: a crash leaves either nothing or a group that starts as restored.
        let ops = vec![
            Op::Put(CF_META, meta_key(group).to_vec(), desc),
            Op::Put(CF_RAFT, group_key(group, crate::keys::KIND_APPLIED).to_vec(), encode(&applied)?),
        ];
        self.shared.store.write(ops, true).await?;
        // The engine starts from the applied record (`Engine::new` resets the empty log to it),
        // so it is not pristine and `membership` is not proposed again at index 1.
        self.start_group(reservation, range, Some(membership)).await
    }

    async fn start_group(
        &self,
        reservation: Reservation,
        range: KeyRange,
        initial: Option<Membership>,
    ) -> Result<(), HostError> {
        let (state, entry) = build_group(&self.shared, reservation.group, range, initial).await?;
        let (tx, rx) = oneshot::channel();
        self.shared.pollers[entry.poller].send(PollerMsg::Add(Box::new(state), tx)).map_err(|_| HostError::Stopped)?;
        rx.await.map_err(|_| HostError::Stopped)?;
        reservation.complete(entry)
    }

    /// Stops group `group` and deletes its Raft state and descriptor; with `clear_data`, also
    /// the data in its key range (when the shard moved away; not after a split or merge, where
    /// another group owns the keys now).
    pub async fn destroy_group(&self, group: GroupId, clear_data: bool) -> Result<(), HostError> {
        self.destroy_group_if(group, clear_data, Box::new(|_| true)).await
    }

    /// [`Host::destroy_group`], if `still` holds of the group's state when its poller stops
    /// it (else [`HostError::Kept`]). A removal decided on a reading of the group's state must
    /// not be carried out after the group changed (it took a configuration adding this node
    /// back, say, while other removals went first): the poller judges and stops the group in
    /// one step, so nothing the group does after the check is lost with it.
    pub async fn destroy_group_if(
        &self,
        group: GroupId,
        clear_data: bool,
        still: DestroyGuard,
    ) -> Result<(), HostError> {
        let poller = self.entry(group)?.poller;
        let (tx, rx) = oneshot::channel();
        self.shared.pollers[poller].send(PollerMsg::Remove(group, still, tx)).map_err(|_| HostError::Stopped)?;
        let entry = match rx.await.map_err(|_| HostError::Stopped)? {
            Removal::Removed(entry) => entry,
            Removal::Kept => return Err(HostError::Kept(group)),
            Removal::Missing => return Err(HostError::UnknownGroup(group)),
        };
        // A snapshot build or installation started before the removal would write the
        // group's state or data after the deletes below: wait for it, and start no other.
        entry.sm.retire().await;
        let mut ops = Vec::from(Op::group_deletes(group));
        if clear_data {
            ops.push(Op::data_range_delete(&entry.sm.range()));
        }
        // Sources parked for it to absorb (a merge entry it was waiting at) go with it, in the
        // same write: the merge is committed, and nothing else would ever absorb or delete them
        // here.
        let parked: Vec<(GroupId, merge::Parked)> = match self.shared.registry.write() {
            Ok(mut r) => {
                let ids: Vec<GroupId> = r.parked.iter().filter(|(_, p)| p.into == group).map(|(id, _)| *id).collect();
                ids.into_iter().filter_map(|id| r.parked.remove(&id).map(|p| (id, p))).collect()
            }
            Err(_) => Vec::new(),
        };
        for (source, p) in &parked {
            p.entry.sm.retire().await;
            ops.extend(Op::group_deletes(*source));
            if clear_data {
                ops.push(Op::data_range_delete(&p.entry.sm.range()));
            }
        }
        self.shared.store.write(ops, true).await?;
        info!(node = %self.node(), %group, parked_sources = ?parked.iter().map(|(s, _)| *s).collect::<Vec<_>>(), "group destroyed");
        Ok(())
    }

    /// The state machine of `group` on this node, for reads of its local (possibly stale)
    /// state.
    pub fn state_machine(&self, group: GroupId) -> Option<KvStateMachine> {
        self.entry(group).ok().map(|e| e.sm)
    }

    /// The key range group `group` owns on this node now (narrowed by splits as they apply).
    pub fn group_range(&self, group: GroupId) -> Option<KeyRange> {
        self.entry(group).ok().map(|e| e.sm.range())
    }

    /// The groups on this node frozen for a merge, with their freezes.
    pub fn frozen_groups(&self) -> Vec<(GroupId, crate::merge::Frozen)> {
        match self.shared.registry.read() {
            Ok(r) => r.groups.iter().filter_map(|(id, e)| Some((*id, e.sm.frozen()?))).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether any group on this node is frozen for a merge (what [`Host::frozen_groups`]
    /// lists, without collecting it).
    pub fn any_frozen(&self) -> bool {
        self.shared.registry.read().is_ok_and(|r| r.groups.values().any(|e| e.sm.frozen().is_some()))
    }

    /// Group `group`'s part in merges on this node (as of its last prepared apply batch).
    pub fn merge_state(&self, group: GroupId) -> Option<crate::merge::MergeState> {
        self.entry(group).ok().map(|e| e.sm.merge_state())
    }

    /// At start-up: a source frozen into a group whose range covers it now (the group installed
    /// a snapshot taken after the merge, and the process stopped before the source was
    /// retired) is retired.
    async fn retire_sources_absorbed_by_snapshots(&self) {
        let found: Vec<(GroupId, GroupId)> = match self.shared.registry.read() {
            Ok(r) => r
                .groups
                .iter()
                .filter_map(|(id, e)| {
                    let into = e.sm.merge_state().frozen?.into;
                    let target = r.groups.get(&into)?;
                    target.sm.range().overlaps(&e.sm.range()).then_some((*id, into))
                })
                .collect(),
            Err(_) => return,
        };
        for (source, into) in found {
            merge::retire_absorbed(self.shared.clone(), source, into).await;
        }
    }

    /// Groups on this node, in id order.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut v: Vec<GroupId> =
            self.shared.registry.read().map(|r| r.groups.keys().copied().collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// Whether group `group` runs on this node (what `groups().contains(..)` says, without
    /// listing every group).
    pub fn hosts(&self, group: GroupId) -> bool {
        self.shared.registry.read().is_ok_and(|r| r.groups.contains_key(&group))
    }

    /// How many groups are on this node.
    pub fn group_count(&self) -> usize {
        self.shared.registry.read().map(|r| r.groups.len()).unwrap_or_default()
    }

    /// The state of every group on this node, in id order, without `matched` (see
    /// [`GroupInfo::matched`]).
    pub async fn group_info(&self) -> Result<Vec<GroupInfo>, HostError> {
        let mut out = Vec::new();
        for p in self.shared.pollers.iter() {
            let (tx, rx) = oneshot::channel();
            p.send(PollerMsg::Info(None, tx)).map_err(|_| HostError::Stopped)?;
            let part = rx.await.map_err(|_| HostError::Stopped)?;
            if out.is_empty() {
                out = part;
            } else {
                out.extend(part);
            }
        }
        // Each poller's part is in order already: a stable sort only merges the runs.
        out.sort_by_key(|i| i.group);
        Ok(out)
    }

    /// A number that moves whenever the summary of a group here may have changed, or a group
    /// came or went: read before two calls of [`Host::group_info`], an unchanged number says
    /// the later call would describe every group as the earlier one did, but for
    /// [`GroupInfo::quiet`], which it does not follow.
    pub fn info_generation(&self) -> u64 {
        self.shared.info_generation.load(Ordering::Acquire)
    }

    /// What [`Host::group_info`] answers, with the generation it is valid for, shared: asked
    /// of the pollers only when the generation moved since the last answer (so its `quiet`
    /// flags may be older than the rest: read [`Host::group_info`] for those). A node of
    /// thousands of quiet groups is asked for all of them several times a second (its report,
    /// its reconciler, its size checks), and building them was most of its idle CPU.
    pub async fn group_info_shared(&self) -> Result<(u64, Arc<Vec<GroupInfo>>), HostError> {
        let generation = self.info_generation();
        if let Some((g, infos)) = self.shared.info_cache.lock().ok().and_then(|c| c.clone()) {
            if g == generation {
                return Ok((g, infos));
            }
        }
        let started = Instant::now();
        let infos = Arc::new(self.group_info().await?);
        self.shared.stats.info_builds.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.info_build_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Ok(mut c) = self.shared.info_cache.lock() {
            // An answer from a later generation (a caller that asked meanwhile) stays.
            if c.as_ref().is_none_or(|(g, _)| *g < generation) {
                *c = Some((generation, infos.clone()));
            }
        }
        Ok((generation, infos))
    }

    /// The state of one group on this node: asks only its poller, and describes only it.
    pub async fn group_info_of(&self, group: GroupId) -> Result<GroupInfo, HostError> {
        self.group_info_of_many(&BTreeSet::from([group])).await?.pop().ok_or(HostError::UnknownGroup(group))
    }

    /// The state of each of `groups` on this node (those not here are left out), in id order:
    /// one request to each poller that runs some of them, all sent before any answer is
    /// awaited, so that a few hundred groups cost a round of each poller, not one each.
    pub async fn group_info_of_many(&self, groups: &BTreeSet<GroupId>) -> Result<Vec<GroupInfo>, HostError> {
        let mut by_poller: BTreeMap<usize, Vec<GroupId>> = BTreeMap::new();
        if let Ok(r) = self.shared.registry.read() {
            for g in groups {
                if let Some(e) = r.groups.get(g) {
                    by_poller.entry(e.poller).or_default().push(*g);
                }
            }
        }
        let mut answers = Vec::with_capacity(by_poller.len());
        for (poller, ids) in by_poller {
            let p = self.shared.pollers.get(poller).ok_or(HostError::Stopped)?;
            let (tx, rx) = oneshot::channel();
            p.send(PollerMsg::Info(Some(ids), tx)).map_err(|_| HostError::Stopped)?;
            answers.push(rx);
        }
        let mut out = Vec::with_capacity(groups.len());
        for rx in answers {
            out.extend(rx.await.map_err(|_| HostError::Stopped)?);
        }
        out.sort_by_key(|i| i.group);
        Ok(out)
    }

    /// Hands a batch from a peer to the groups it names. Never blocks. `batch.from` must be the
    /// sender as the transport authenticated it; a Raft message claiming another sender is
    /// dropped.
    pub fn receive(&self, batch: NodeBatch) {
        let now = Instant::now();
        if let Ok(mut h) = self.shared.heard.lock() {
            // Two receives of one sender may race here: the later instant stays.
            let t = h.entry(batch.from).or_insert(now);
            *t = (*t).max(now);
        }
        if let Ok(mut p) = self.shared.peers.lock() {
            if !p.contains(&batch.from) && batch.from != self.node() {
                p.insert(batch.from);
            }
        }
        let n = self.shared.pollers.len();
        type PerPoller = (Vec<(GroupId, Message)>, Vec<QuiesceNotice>, Vec<RemovedNotice>);
        let mut per: Vec<PerPoller> = (0..n).map(|_| Default::default()).collect();
        for (g, m) in batch.messages {
            if m.from != batch.from {
                self.shared.stats.sender_mismatch_msgs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            per[(g.0 % n as u64) as usize].0.push((g, m));
        }
        for q in batch.quiesce {
            per[(q.group.0 % n as u64) as usize].1.push(q);
        }
        for r in batch.removed {
            per[(r.group.0 % n as u64) as usize].2.push(r);
        }
        for (i, (mut msgs, notices, removed)) in per.into_iter().enumerate() {
            if msgs.is_empty() && notices.is_empty() && removed.is_empty() {
                continue;
            }
            let queued = self.shared.queued[i].load(Ordering::Relaxed);
            let room = self.shared.config.mailbox_msgs_max.saturating_sub(queued);
            if msgs.len() > room {
                let dropped = msgs.len() - room;
                msgs.truncate(room);
                self.shared.stats.mailbox_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
            }
            self.shared.queued[i].fetch_add(msgs.len(), Ordering::Relaxed);
            let _ = self.shared.pollers[i].send(PollerMsg::Batch {
                from: batch.from,
                messages: msgs,
                quiesce: notices,
                removed,
            });
        }
    }

    async fn call<T>(
        &self,
        group: GroupId,
        make: impl FnOnce(oneshot::Sender<Result<T, RaftError>>) -> Request,
    ) -> Result<T, HostError> {
        let poller = self.entry(group)?.poller;
        let queued = &self.shared.requests_queued[poller];
        let before = queued.fetch_add(1, Ordering::AcqRel);
        if before >= self.shared.config.mailbox_requests_max {
            queued.fetch_sub(1, Ordering::AcqRel);
            return Err(HostError::Overloaded(before));
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.pollers[poller].send(PollerMsg::Api(group, make(tx))).is_err() {
            queued.fetch_sub(1, Ordering::AcqRel);
            return Err(HostError::Stopped);
        }
        match tokio::time::timeout(Duration::from_millis(self.shared.config.api_timeout_ms), rx).await {
            Ok(Ok(r)) => r.map_err(HostError::from),
            Ok(Err(_)) => Err(HostError::Lost),
            Err(_) => Err(HostError::Raft(RaftError::Timeout)),
        }
    }

    fn entry(&self, group: GroupId) -> Result<GroupEntry, HostError> {
        self.shared
            .registry
            .read()
            .map_err(|_| HostError::Stopped)?
            .groups
            .get(&group)
            .cloned()
            .ok_or(HostError::UnknownGroup(group))
    }

    /// Test hook: while `hold` is set, the state machines' apply writes are prepared (ranges
    /// narrowed by splits, writers answered) but not submitted; they go once it is cleared.
    /// Holds open the window between a split's prepare and its durable write.
    #[doc(hidden)]
    pub fn hold_applies(&self, hold: bool) {
        self.shared.hold_applies.store(hold, Ordering::Release);
    }

    /// Test hook: while `hold` is set, entry loads a leader starts for its lagging followers
    /// wait before reading, as a read from a slow disk would.
    #[doc(hidden)]
    pub fn hold_loads(&self, hold: bool) {
        self.shared.hold_loads.store(hold, Ordering::Release);
    }

    /// Forms a group that was created without a configuration (see [`Host::create_group`]).
    pub async fn initialize(&self, group: GroupId, membership: Membership) -> Result<(), HostError> {
        self.call(group, |tx| Request::Initialize(membership, tx)).await
    }

    /// Proposes `cmd` on `group` (leader only); answers once it is committed and the state
    /// machine has computed its answer (before the applied state is stored: a later read on
    /// this group still sees it).
    pub async fn write(&self, group: GroupId, cmd: KvCommand) -> Result<KvResponse, HostError> {
        let entry = self.entry(group)?;
        cmd.check_size().map_err(HostError::TooLarge)?;
        if !cmd.within(&entry.sm.range()) {
            return Err(HostError::KeyOutOfRange(group));
        }
        let payload = cmd.encode()?;
        let mut results = self.call(group, |tx| Request::Write(vec![payload], tx)).await?;
        let r = results.pop().ok_or(HostError::Raft(RaftError::Timeout))??;
        match KvResponse::decode(&r.data)? {
            // A split applied between the check above and the command: not applied, retry.
            KvResponse::OutOfRange => Err(HostError::KeyOutOfRange(group)),
            other => Ok(other),
        }
    }

    /// Reads `key` from `group`, linearizably (leader only; `mode` picks ReadIndex or lease).
    pub async fn get(&self, group: GroupId, key: Vec<u8>, mode: ReadMode) -> Result<Option<Vec<u8>>, HostError> {
        let entry = self.entry(group)?;
        if !entry.sm.range().contains(&key) {
            return Err(HostError::KeyOutOfRange(group));
        }
        if !self.lease_open(mode, &entry) {
            self.call(group, |tx| Request::Read { mode, wait_apply: true, reply: tx }).await?;
        }
        refuse_frozen(group, &entry.sm)?;
        Ok(entry.sm.get(key).await?)
    }

    /// Whether a read in `mode` may be served from `entry`'s state machine without a round to
    /// its poller: a lease read while the replica's lease gate is open (it leads under a lease
    /// and applied everything committed; see [`flotilla_raft::LeaseGate`]). Counted.
    fn lease_open(&self, mode: ReadMode, entry: &GroupEntry) -> bool {
        let open = mode == ReadMode::Lease && entry.lease.open_at(self.shared.now());
        if open {
            self.shared.stats.local_reads.fetch_add(1, Ordering::Relaxed);
        }
        open
    }

    /// A point-in-time copy of `group` for a backup (leader only): a ReadIndex read first, so
    /// the copy holds every write acknowledged before the call, then the shard's snapshot built
    /// from one RocksDB snapshot while the group goes on applying writes. The copy stays on
    /// disk, readable through the returned state machine, until `drop_built`.
    pub async fn build_backup(&self, group: GroupId) -> Result<(SnapshotMeta, u64, KvStateMachine), HostError> {
        let entry = self.entry(group)?;
        self.call(group, |tx| Request::Read { mode: ReadMode::ReadIndex, wait_apply: true, reply: tx }).await?;
        let (meta, keys) = entry.sm.build_backup().await?;
        Ok((meta, keys, entry.sm))
    }

    /// Scans `[from, to)` within `group`'s range, linearizably, at most `limit` pairs; the page
    /// says how far it covers. A `from` outside the range the group holds now (a split
    /// narrowed it) is refused as [`HostError::KeyOutOfRange`]: the caller's routing is stale.
    pub async fn scan(
        &self,
        group: GroupId,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
        limit: usize,
        mode: ReadMode,
    ) -> Result<crate::kv::ScanPage, HostError> {
        let entry = self.entry(group)?;
        // Refused before the read's round trip; the state machine checks again after it, on
        // the range as of the read (a split may apply in between).
        if !entry.sm.range().contains(&from) {
            return Err(HostError::KeyOutOfRange(group));
        }
        if !self.lease_open(mode, &entry) {
            self.call(group, |tx| Request::Read { mode, wait_apply: true, reply: tx }).await?;
        }
        refuse_frozen(group, &entry.sm)?;
        match entry.sm.scan(from, to, limit).await {
            Ok(page) => Ok(page),
            Err(crate::kv::ScanError::OutOfRange(_)) => Err(HostError::KeyOutOfRange(group)),
            Err(crate::kv::ScanError::Storage(e)) => Err(e.into()),
        }
    }

    /// Adds `node` as a learner of `group`.
    pub async fn add_learner(&self, group: GroupId, node: NodeId) -> Result<LogIndex, HostError> {
        self.call(group, |tx| Request::AddLearner(node, tx)).await
    }

    /// Removes the learner on `node` from `group` (a voter is refused).
    pub async fn remove_learner(&self, group: GroupId, node: NodeId) -> Result<LogIndex, HostError> {
        self.call(group, |tx| Request::RemoveLearner(node, tx)).await
    }

    /// Changes the voters of `group` by joint consensus.
    pub async fn change_membership(&self, group: GroupId, voters: BTreeSet<NodeId>) -> Result<LogIndex, HostError> {
        self.call(group, |tx| Request::ChangeMembership(voters, tx)).await
    }

    /// Hands leadership of `group` to `target`.
    pub async fn transfer_leader(&self, group: GroupId, target: NodeId) -> Result<(), HostError> {
        self.call(group, |tx| Request::TransferLeader(target, tx)).await
    }

    /// Asks `group` to purge its log now up to what its state machine holds durably.
    pub async fn compact_log(&self, group: GroupId) -> Result<(), HostError> {
        self.call(group, Request::CompactLog).await
    }

    /// Unsafe recovery: makes this node's replica of `group` the group's only voter (see
    /// [`flotilla_raft::Engine::force_alone`]); the index of the forced configuration's entry.
    /// Refused unless `dead` hold a majority of the replica's configuration and its last log
    /// id is still `last`.
    pub async fn force_alone(
        &self,
        group: GroupId,
        dead: BTreeSet<NodeId>,
        last: LogId,
    ) -> Result<LogIndex, HostError> {
        self.call(group, |reply| Request::ForceAlone { dead, last, reply }).await
    }

    /// Stops the pollers; pending calls fail with `Stopped` or `Fatal(Shutdown)`.
    pub async fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Before the pollers stop: a start in flight adds its group to one of them.
        let starts: Vec<_> = self.shared.split_starts.lock().map(|mut s| s.drain(..).collect()).unwrap_or_default();
        for s in starts {
            let _ = s.await;
        }
        for p in self.shared.pollers.iter() {
            let _ = p.send(PollerMsg::Shutdown);
        }
        let pollers: Vec<_> = self.pollers.lock().map(|mut p| p.drain(..).collect()).unwrap_or_default();
        for p in pollers {
            let _ = p.await;
        }
        let threads: Vec<_> = self.threads.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// A read of a group frozen for a merge is refused (the caller retries where the keys live):
/// once the merge is committed the absorbing group may take writes to these keys, and this
/// group's replicas (a leader holding a lease, say) would answer with what they froze. Judged
/// after the read's round trip: a group not frozen by then had not committed its freeze when
/// the read started, so the read is still this group's to answer.
fn refuse_frozen(group: GroupId, sm: &KvStateMachine) -> Result<(), HostError> {
    match sm.merge_state().is_frozen() {
        true => Err(HostError::KeyOutOfRange(group)),
        false => Ok(()),
    }
}

/// Recovers (or forms, with `initial`, while it has no Raft state) group `group` and returns its
/// poller state and registry entry. Used at start-up, by `create_group`, and by a poller
/// starting the group a split created.
pub(crate) async fn build_group(
    shared: &Shared,
    group: GroupId,
    range: KeyRange,
    initial: Option<Membership>,
) -> Result<(GroupState, GroupEntry), HostError> {
    let me = shared.config.node;
    let store = shared.store.clone();
    let log = RocksLog::new(store.clone(), group);
    let mut sm = KvStateMachine::new(store, group, range);
    let state = recover_state(&log, &mut sm).await?;
    {
        let l = log.clone();
        shared.store.blocking(move |_| l.load_last_blocking()).await?;
    }
    let seed = flotilla_raft::driver::seed_from_entropy(me, group);
    let engine = Engine::new(me, shared.raft.clone(), state, seed, shared.now());
    let mut core = GroupCore::new(engine);
    match initial {
        Some(m) if core.engine().is_pristine() => core.initialize(shared.now(), m)?,
        _ => {}
    }
    if let Ok(mut peers) = shared.peers.lock() {
        peers.extend(core.engine().membership().membership.nodes().into_iter().filter(|n| *n != me));
    }
    let poller = (group.0 % shared.pollers.len() as u64) as usize;
    let entry = GroupEntry { poller, sm: sm.clone(), lease: core.lease_gate() };
    Ok((GroupState::new(group, core, log, sm), entry))
}

/// The Raft configuration of the host's groups: the host's, with its API timeout, and votes
/// only from replicas that hold a configuration (replicas are deleted and created again as
/// shards move: an empty one must not vote).
fn engine_config(host: &HostConfig) -> flotilla_raft::Config {
    let mut config = host.raft.clone();
    config.api_timeout_ms = host.api_timeout_ms;
    config.votes_need_configuration = true;
    config
}

/// Sends an empty batch (a liveness ping) to every peer once per heartbeat interval. Not once
/// the store is poisoned: the node's groups have stopped, and its silence is what tells the
/// other nodes to wake the quiet groups it led and elect new leaders.
fn pinger(shared: Arc<Shared>) {
    let every = Duration::from_millis(shared.config.raft.heartbeat_interval_ms);
    let me = shared.config.node;
    while !shared.stopping.load(Ordering::Acquire) {
        if let Some(e) = shared.store.poisoned() {
            tracing::error!(node = %me, error = %e, "the store is poisoned: liveness pings stop");
            return;
        }
        let peers: Vec<NodeId> = shared.peers.lock().map(|p| p.iter().copied().collect()).unwrap_or_default();
        for p in peers {
            shared
                .network
                .send(p, NodeBatch { from: me, messages: Vec::new(), quiesce: Vec::new(), removed: Vec::new() });
        }
        std::thread::sleep(every);
    }
}

/// Where a group formed over restored data starts ([`Host::create_restored_group`]): the id
/// a new group's first entry (its configuration) would have, so that the replicas start where
/// a formed group's first entry leaves it, but with that entry purged.
pub const RESTORED_FORMATION: flotilla_raft::LogId = flotilla_raft::LogId { term: Term(0), index: LogIndex(1) };
