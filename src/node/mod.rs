//! [`Node`]: one RocksDB store, one shard host, one QUIC transport and the meta group, wired
//! together and serving the client protocol ([`crate::wire`]).
//!
//! # What runs
//! - **Envelope pump**: envelopes from peers are decoded into node batches, checked against
//!   the sender's certificate and handed to the host ([`crate::net`]).
//! - **Requests**: each client or peer request is served in the transport's task for it (the
//!   node is the transport's request handler, `serve::RequestServer`; at most
//!   [`REQUESTS_IN_FLIGHT_MAX`] at once); data requests are checked against the node's copy of
//!   the shard map (shard id, epoch, key in range) and then served by the host on the leader.
//! - **Reconciler** (every [`RECONCILE_MS`]): refreshes the node's copy of the meta state,
//!   tells the transport where higher-id peers listen (the lower id dials), creates the groups
//!   of shards the map places here, destroys those it no longer does, and on shards this node
//!   leads carries out what the map asks: learners added, voters changed (joint consensus),
//!   leadership handed over.
//! - **Reporter** (every `report_interval_ms`): sends the node's
//!   [`NodeReport`](crate::placement::NodeReport) (leaders, applied indexes, request rate,
//!   sizes and split points of the shards it leads) to the meta
//!   leader; on the meta leader, also drives replica move plans one checked step at a time and,
//!   with `auto_balance_interval_ms`, runs the balancer and carries out its proposals.
//! - **Bootstrapper** (once, on the lowest-id meta voter of a new cluster): registers the
//!   initial nodes, creates the first shard and splits it at the configured keys, in one meta
//!   change.
//!
//! # Bootstrap and join
//! A new cluster: every initial meta voter (up to five) starts with the same
//! [`BootstrapConfig`]; each creates group 0 with the same membership, and the lowest id
//! bootstraps the map. Data shards are created by each node's reconciler once the map names it:
//! the shards of the bootstrap (configuration version 1) are formed by all their voters at
//! once; a replica added later waits for its leader to feed it. A joining node starts with no
//! bootstrap and the addresses of some peers (with lower ids): it announces itself to them
//! under its node certificate (`Node::announce`), which registers it in the meta state; the
//! running nodes then learn its address and dial it (the transport's lower id dials), its
//! reports reach the meta leader, and it holds shards once the balancer or an operator moves
//! some to it. (`flotilla admin add-node ID ADDR`,
//! [`AdminRequest::AddNode`](crate::wire::AdminRequest::AddNode), registers a node by hand.)
//!
//! # Rooms
//! This file wires the parts together and runs the lifecycle (start, tasks, shutdown, metrics
//! and health); each concern is a file of its own, owning its state in `Inner`:
//! - `serve.rs`: client and peer requests, routing checks, host errors as answers.
//! - `meta_client.rs`: the node's view of the meta state and [`Node::meta_exec`].
//! - `reconcile.rs`: replicas and group configurations made to follow the map.
//! - `report.rs`: node reports to the meta leader and shard size checks.
//! - `moves.rs`: move plans stepped and balancer rounds run on the meta leader.
//! - `join.rs`: bootstrap of a new cluster and a node's announcement to a running one.
//! - `admin.rs`: admin requests and their listings.
//! - `backup.rs`: shard copies for backups, built on the leader and read in chunks.
//!
//! The limits and intervals of all rooms are the constants below, in one table.

mod admin;
mod backup;
mod bootstrap_forming;
mod join;
mod map_answer;
mod merges;
mod meta_client;
mod meta_members;
mod moves;
mod reconcile;
mod reconcile_rounds;
mod report;
mod shard_listing;
pub use map_answer::{MAP_ANSWER_BYTES_MAX, MAP_CHANGES_SHARDS_MAX, MAP_PAGE_SHARDS_MAX};
pub use report::{REPORTS_BETWEEN_WHOLE, REPORT_SHARDS_PER_MESSAGE};
pub use whole_state::{META_PART_BYTES_DEFAULT, WHOLE_STATE_BYTES_MAX};
mod serve;
mod unsafe_recovery;
mod whole_state;

pub use admin::view_of;

use crate::meta::{meta_range, META_GROUP};
use crate::net::{deliver, deliver_transfer, read_transfer, transfer_bytes_max, NetStats, TransportNetwork};
use crate::placement::{BalancerConfig, LoadSplitConfig, LoadTrackers, ShardId};
use crate::raft::{Config as RaftConfig, NodeId, Role};
use crate::resp_server::{self, RespConfig, RespMetrics};
use crate::shard::{Host, HostConfig, HostError, KvStateMachine, Store, StoreMetrics, StoreOptions};
use crate::transport::{self as tp, cert::TlsIdentity, Transport, TransportConfig};
use crate::wire::check_user_key;
use meta_client::MetaClient;
use moves::MoveSteps;
use reconcile::ReconfigTimes;
use report::SizeCheck;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Requests served at once; more wait for a slot, as long as their requester does (the
/// transport bounds each connection's open requests, and answers those not served within its
/// handler timeout with an error).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 4096;
/// Shards larger than this are split by the automatic balancer (128 MiB, between TiKV's 96
/// and 256 MiB). Snapshots stream from disk, so the size is not bounded by memory; it trades
/// the number of groups against how long a move or a catch-up takes.
pub const SPLIT_SIZE_BYTES_DEFAULT: u64 = 128 << 20;
/// Bytes read at most by one round of size checks (the shard being read when it is reached
/// still completes, up to [`SIZE_SCAN_BYTES_MAX`]); shards not reached keep their last size
/// until the next round.
pub const SIZE_CHECK_BYTES_PER_ROUND: u64 = 256 << 20;
/// Bytes read at most to size one shard (four default split thresholds).
pub const SIZE_SCAN_BYTES_MAX: u64 = 4 * SPLIT_SIZE_BYTES_DEFAULT;
/// A report a meta leader received counts for this long (ms); after that the node's report
/// counts as unknown (empty).
pub const LIVE_REPORT_AGE_MAX_MS: u64 = 10_000;
/// How often a node not yet listed at its address tells its peers again (ms).
pub const ANNOUNCE_RETRY_MS: u64 = 1_000;
/// How often the reconciler looks for a change of the map or of the groups here (ms).
pub const RECONCILE_MS: u64 = 200;
/// How often, at most, the reconciler goes over every group and shard when the map or the
/// groups' summaries changed, or its last full round did or asked for something (ms); what
/// the map's changes and moves under way point at it looks at every tick
/// (`reconcile_rounds.rs`).
pub const RECONCILE_FULL_MS: u64 = 1_000;
/// How often it does when nothing changed and its last full round found nothing to do (ms).
pub const RECONCILE_IDLE_FULL_MS: u64 = 10_000;
/// How long a meta operation may take, forwarding and retries included (ms).
pub const META_OP_TIMEOUT_MS: u64 = 10_000;
/// Time allowed for one node-to-node request (ms).
pub const PEER_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// A leader asks for the same membership change or leader transfer at most this often (ms).
pub const RECONFIG_RETRY_MS: u64 = 2_000;
/// How often the bootstrapper tries again while the new meta group has no leader (ms).
pub const BOOTSTRAP_RETRY_MS: u64 = 200;
/// Backup copies a node holds at once (each a shard's worth of files in its scratch dir);
/// more are refused as unavailable until one is released.
pub const BACKUP_COPIES_MAX: usize = 4;
/// A backup copy unread for this long is removed (the client gave up) (ms).
pub const BACKUP_COPY_IDLE_MS_MAX: u64 = 60_000;
/// How long shutdown waits for the shard host's pollers and pinger (ms).
pub const SHUTDOWN_HOST_MS_MAX: u64 = 10_000;
/// Snapshot chunks read from transfer streams and waiting to be handed to the host; readers
/// wait beyond it (each holds one of its peer's transfer slots, so senders slow down too).
pub const TRANSFERS_READ_QUEUE_MAX: usize = 16;
/// Most voters of the meta group.
pub const META_VOTERS_MAX: usize = 5;
/// Voters of every initial data shard when a new cluster is made of a list of nodes
/// ([`BootstrapConfig::of_nodes`]): the first three (more replicas cost every write; fewer
/// cannot lose a node).
pub const INITIAL_SHARD_REPLICAS: usize = 3;
/// A replica move whose step has made no progress for this long is aborted (a learner that
/// cannot catch up, a configuration change that does not commit): it would otherwise block the
/// shard's splits and moves for good. Progress of a learner catching up is its lag reaching a
/// new low; before its first data, the shard's transfer time is added
/// ([`crate::placement::StepWatch`]).
pub const MOVE_STEP_DEADLINE_MS: u64 = 120_000;

/// How long a shard must stay above the load-split threshold before it is split by load (ms):
/// long enough that a burst does not split a shard, short enough to act on a hot spot that
/// lasts (TiKV waits 10 one-second windows too).
pub const LOAD_SPLIT_DURATION_MS_DEFAULT: u64 = 10_000;

/// Errors of the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration cannot work.
    #[error("bad node configuration: {0}")]
    Config(String),
    /// Opening the store failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The host failed.
    #[error("shard host: {0}")]
    Host(#[from] HostError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tp::TransportError),
    /// A meta operation was refused (it does not fit the meta state); retrying will not help.
    #[error("meta: {0}")]
    Meta(String),
    /// No meta leader could run the operation in time (election, unreachable); retry.
    #[error("meta unavailable: {0}")]
    MetaUnavailable(String),
}

/// How a new cluster is formed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapConfig {
    /// Voters of the meta group (at most [`META_VOTERS_MAX`]); every one of them must start
    /// with this same configuration.
    pub meta_voters: Vec<NodeId>,
    /// Voters of every initial data shard.
    pub shard_replicas: Vec<NodeId>,
    /// Client addresses of the initial nodes (recorded in the map for clients).
    pub addrs: Vec<(NodeId, String)>,
    /// Split points of the initial shards, ascending.
    pub split_keys: Vec<Vec<u8>>,
}

impl BootstrapConfig {
    /// A new cluster of `ids`: the meta group on the first [`META_VOTERS_MAX`], every initial
    /// shard on the first [`INITIAL_SHARD_REPLICAS`], split at `split_keys`. What `flotilla dev`
    /// forms.
    pub fn of_nodes(ids: &[NodeId], split_keys: Vec<Vec<u8>>) -> BootstrapConfig {
        BootstrapConfig {
            meta_voters: ids.iter().copied().take(META_VOTERS_MAX).collect(),
            shard_replicas: ids.iter().copied().take(INITIAL_SHARD_REPLICAS).collect(),
            addrs: Vec::new(),
            split_keys,
        }
    }
}

/// Everything a node needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id; must match its certificate.
    pub id: NodeId,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The store's memory budget (RocksDB's block cache and memtables).
    pub store: StoreOptions,
    /// UDP address for peers and clients (`127.0.0.1:0` picks a port).
    pub listen_addr: SocketAddr,
    /// The address recorded for clients; the bound address when `None`.
    pub advertise_addr: Option<String>,
    /// Certificates.
    pub tls: TlsIdentity,
    /// Known peers and their addresses.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Set on the initial nodes of a new cluster; ignored once the store holds state.
    pub bootstrap: Option<BootstrapConfig>,
    /// Raft timers and limits of every group.
    pub raft: RaftConfig,
    /// Host poller tasks.
    pub pollers: usize,
    /// How often the node reports to the meta leader (ms).
    pub report_interval_ms: u64,
    /// Shard entries a report message carries at most: a larger report goes in parts
    /// (default [`REPORT_SHARDS_PER_MESSAGE`]).
    pub report_shards_per_message: usize,
    /// Reports sent as changes between two whole ones (default [`REPORTS_BETWEEN_WHOLE`]).
    pub reports_between_whole: u32,
    /// Balancer limits (for `admin rebalance` and the automatic balancer).
    pub balancer: BalancerConfig,
    /// Run the balancer on the meta leader this often (ms), carrying out what it proposes:
    /// splits of shards past `balancer.split_size_bytes_threshold`, replica moves and leader
    /// transfers. `None`: only on `admin rebalance`.
    pub auto_balance_interval_ms: Option<u64>,
    /// A shard this node leads is re-sized (its range read through) at most this often, and only
    /// after it applied writes (ms).
    pub size_check_interval_ms: u64,
    /// How long a shard must stay above `balancer.load_split_requests_per_s` before its leader
    /// names a load split key (ms; counted in report intervals, at least one). Default
    /// [`LOAD_SPLIT_DURATION_MS_DEFAULT`].
    pub load_split_duration_ms: u64,
    /// A replica move whose step has made no progress for this long is aborted by the meta
    /// leader (ms; default [`MOVE_STEP_DEADLINE_MS`]).
    pub move_step_deadline_ms: u64,
    /// Refuse client certificates without a role (see `TransportConfig::require_client_roles`).
    pub require_client_roles: bool,
    /// The Redis protocol front door, if wanted ([`crate::resp_server`]).
    pub resp: Option<RespConfig>,
    /// Start with the reconciler paused: the node creates, removes and changes no replica
    /// until [`Node::pause_reconciler`]`(false)`. For tests and investigations.
    pub reconciler_paused: bool,
    /// Bytes of a whole meta state one answer carries at most; a larger one goes in parts
    /// (default [`META_PART_BYTES_DEFAULT`]).
    pub meta_part_bytes: usize,
}

impl NodeConfig {
    /// Defaults for node `id` storing in `data_dir`, listening on `listen_addr`.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>, listen_addr: SocketAddr, tls: TlsIdentity) -> NodeConfig {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            store: StoreOptions::default(),
            listen_addr,
            advertise_addr: None,
            tls,
            peers: Vec::new(),
            bootstrap: None,
            raft: default_raft(),
            pollers: default_pollers(None, 1),
            report_interval_ms: 1_000,
            report_shards_per_message: REPORT_SHARDS_PER_MESSAGE,
            reports_between_whole: REPORTS_BETWEEN_WHOLE,
            // A learner within this many entries of the leader is promoted: a joint change keeps
            // the old voters' quorum, so a small lag never stalls writes.
            balancer: BalancerConfig {
                catch_up_lag_entries_max: 512,
                split_size_bytes_threshold: SPLIT_SIZE_BYTES_DEFAULT,
                ..BalancerConfig::default()
            },
            auto_balance_interval_ms: None,
            size_check_interval_ms: 10_000,
            load_split_duration_ms: LOAD_SPLIT_DURATION_MS_DEFAULT,
            move_step_deadline_ms: MOVE_STEP_DEADLINE_MS,
            require_client_roles: false,
            resp: None,
            reconciler_paused: false,
            meta_part_bytes: META_PART_BYTES_DEFAULT,
        }
    }
}

/// When this node's leaders count a shard as hot: the balancer's threshold, held for
/// `load_split_duration_ms` worth of report windows.
fn load_split_config(config: &NodeConfig) -> LoadSplitConfig {
    let windows = config.load_split_duration_ms.div_ceil(config.report_interval_ms.max(50));
    LoadSplitConfig {
        requests_per_s_threshold: config.balancer.load_split_requests_per_s,
        hot_windows_min: u32::try_from(windows).unwrap_or(u32::MAX).max(1),
    }
}

/// Pollers (tasks on the node's runtime) for each of `nodes_per_process` nodes sharing a
/// runtime of `runtime_threads` workers (`None`: the runtime's default, one per core): half the
/// workers for all of them, at least one, at most eight, so that pollers in their rounds leave
/// at least half of the runtime's workers to the network and the callers. On two cores one
/// poller per node is 12–15 % faster for puts than two (larger write rounds; BENCHMARKS.md).
pub fn default_pollers(runtime_threads: Option<usize>, nodes_per_process: usize) -> usize {
    let threads = runtime_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    (threads / 2 / nodes_per_process.max(1)).clamp(1, 8)
}

/// Appends the store's and the process's memory and write figures to a metrics page. Process
/// figures (shared by every node of the process) are left out where `/proc` was unreadable.
fn store_metrics_text(out: &mut String, id: NodeId, m: &StoreMetrics) {
    use std::fmt::Write;
    let (mem, io, p) = (&m.memory, &m.io, &m.process);
    let (g, c) = ("gauge", "counter");
    let runtime_workers = tokio::runtime::Handle::try_current().ok().map(|h| h.metrics().num_workers() as u64);
    // (type, name, help, value): one metric a line, as a table reads best.
    #[rustfmt::skip]
    let lines = [
        (g, "flotilla_store_memory_budget_bytes", "Memory budget of RocksDB (cache, memtables, headroom).", Some(mem.budget_bytes)),
        (g, "flotilla_rocksdb_block_cache_capacity_bytes", "Capacity of the block cache every column family shares.", Some(mem.block_cache_capacity_bytes)),
        (g, "flotilla_rocksdb_block_cache_usage_bytes", "Bytes in the block cache, memtables' reservation included.", Some(mem.block_cache_usage_bytes)),
        (g, "flotilla_rocksdb_block_cache_pinned_bytes", "Bytes of the block cache pinned.", Some(mem.block_cache_pinned_bytes)),
        (g, "flotilla_rocksdb_memtable_bytes", "Memtables of every column family.", Some(mem.memtable_bytes)),
        (g, "flotilla_rocksdb_table_readers_bytes", "Table readers' memory outside the block cache.", Some(mem.table_readers_bytes)),
        (c, "flotilla_rocksdb_written_bytes_total", "Bytes of the writes asked of RocksDB.", Some(io.user_written_bytes)),
        (c, "flotilla_rocksdb_wal_written_bytes_total", "Bytes appended to RocksDB's write-ahead log.", Some(io.wal_written_bytes)),
        (c, "flotilla_rocksdb_flush_written_bytes_total", "Bytes of SST files written by memtable flushes.", Some(io.flush_written_bytes)),
        (c, "flotilla_rocksdb_compaction_written_bytes_total", "Bytes of SST files written by compactions.", Some(io.compaction_written_bytes)),
        (g, "flotilla_process_resident_memory_bytes", "Resident memory of the process (every node in it).", p.resident_bytes),
        (c, "flotilla_process_disk_written_bytes_total", "Bytes the process sent to storage (every node in it).", p.disk_written_bytes),
        (c, "flotilla_process_cpu_microseconds_total", "CPU time of the process, user and system (every node in it).", p.cpu_microseconds),
        (g, "flotilla_process_id", "The process's id.", Some(u64::from(std::process::id()))),
        (g, "flotilla_runtime_worker_threads", "Worker threads of the process's async runtime (runtime_threads).", runtime_workers),
        (g, "flotilla_process_instance", "A number drawn at the process's start: nodes showing the same one share a process and its figures.", Some(flotilla_shard::store_metrics::process_instance())),
    ];
    let heap = crate::allocator::stats();
    #[rustfmt::skip]
    let heap_lines = [
        (g, "flotilla_allocator_allocated_bytes", "Bytes in live heap allocations of the process, RocksDB's included (jemalloc).", heap.map(|h| h.allocated)),
        (g, "flotilla_allocator_resident_bytes", "Bytes of the process's heap pages resident in memory (jemalloc).", heap.map(|h| h.resident)),
    ];
    for (kind, name, help, value) in lines.into_iter().chain(heap_lines) {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{id}\"}} {v}");
        }
    }
}

/// Raft timers for a node: elections in 0.6–1.2 s, heartbeats every 100 ms. Faster than
/// Raft's defaults (failover within about a second and a half on loopback), slow enough not
/// to elect spuriously on a loaded two-core machine.
pub fn default_raft() -> RaftConfig {
    const HEARTBEAT_INTERVAL_MS: u64 = 100;
    RaftConfig {
        election_timeout_ms_min: 600,
        election_timeout_ms_max: 1200,
        heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
        lease_clock_drift_ms: 60,
        transfer_timeout_ms: 1500,
        snapshot_resend_ms: 1000,
        // Followers learn of commits from the next append, or at the latest with the next
        // heartbeat round, rather than from a notice per commit: under writes each commit
        // otherwise costs every follower a message and a round of work. One-client puts 7%
        // faster at p50 with 15% less CPU (BENCHMARKS.md, session 23; a 10 ms delay gained
        // nothing). When writes stop, followers apply up to a heartbeat interval later; the
        // leader's answers never wait for them.
        commit_notice_delay_ms: HEARTBEAT_INTERVAL_MS,
        // A round that only ReadIndex reads asked for goes to just a quorum (in a group of
        // three, the follower that answered the last round first): ReadIndex gets at 64
        // clients 4-7% more at 16% less CPU per get, one-client gets 5-10% faster at p50
        // (BENCHMARKS.md, session 30). Each time a chosen follower fails to answer, the reads
        // waiting on it wait for the next heartbeat round (100 ms) and its answers.
        read_rounds_to_quorum: true,
        ..RaftConfig::default()
    }
}

/// Counters the node exports.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Client requests served (any answer).
    pub requests: AtomicU64,
    /// Requests answered with a redirect (not leader, stale epoch, unknown shard).
    pub redirects: AtomicU64,
    /// Requests that did not decode.
    pub bad_requests: AtomicU64,
    /// Requests refused because the client's role does not allow them.
    pub denied: AtomicU64,
    /// Meta operations run on this node as the meta leader.
    pub meta_ops: AtomicU64,
    /// Changes of the meta state this node proposed as the meta leader.
    pub meta_writes: AtomicU64,
    /// Records those changes wrote (the header included): what a change costs, in records.
    pub meta_write_records: AtomicU64,
    /// Bytes of keys and values those changes wrote.
    pub meta_write_bytes: AtomicU64,
    /// Refreshes of this node's copy of the meta state that came as the whole state.
    pub meta_updates_whole: AtomicU64,
    /// Full rounds of the reconciler (every group against every shard of the map).
    pub reconcile_full_rounds: AtomicU64,
    /// Time those rounds took, in microseconds.
    pub reconcile_full_micros: AtomicU64,
    /// Rounds of the reconciler over what changed only (the map's changes, moves under way).
    pub reconcile_changed_rounds: AtomicU64,
    /// Groups those rounds looked at.
    pub reconcile_changed_groups: AtomicU64,
    /// Whole meta states this node received in parts.
    pub meta_whole_in_parts: AtomicU64,
    /// Refreshes of this node's copy that came as the changes since its revision.
    pub meta_updates_changes: AtomicU64,
    /// Reports the meta leader took from this node whole (from an empty report).
    pub reports_whole: AtomicU64,
    /// Reports the meta leader took from this node as the change from its previous one.
    pub reports_changed: AtomicU64,
    /// Shard entries those reports carried (a whole report: every shard it names; a change:
    /// the shards that changed).
    pub report_shards_sent: AtomicU64,
}

/// The node's state, shared by its tasks. Each room's state is its own field (and lock), named
/// by the room that owns it.
struct Inner {
    /// This node; must match its certificate.
    id: NodeId,
    /// What the node was started with.
    config: NodeConfig,
    /// The address recorded for clients and peers (advertised, or the bound one).
    addr: String,
    /// The shard host: every group's Raft and state machine (group 0 is the meta group).
    host: Host,
    /// QUIC to peers and clients.
    transport: Transport,
    /// A reader of the local meta replica's state machine (the meta state without a Raft read).
    meta_sm: KvStateMachine,
    /// The meta client's view, lock and (on the meta leader) live reports (`meta_client.rs`).
    meta: MetaClient,
    /// The reconciler's last request of each change per group (`reconcile.rs`).
    reconfig: Mutex<ReconfigTimes>,
    /// The reconciler's last rounds: the last full one, and what the rounds since acted on.
    reconciled: Mutex<Option<reconcile_rounds::Reconciled>>,
    /// The last summary of the map `admin shards` computed (`shard_listing.rs`).
    shards_summary: Mutex<shard_listing::SummaryCache>,
    /// The shards of this node's bootstrap with their ranges then, worked out once.
    bootstrap_shards: std::sync::OnceLock<reconcile::BootstrapShards>,
    /// Where this node is in forming its bootstrap shards (`bootstrap_forming.rs`).
    bootstrap_forming: Mutex<bootstrap_forming::Forming>,
    /// Whether the reconciler skips its rounds ([`Node::pause_reconciler`]).
    reconciler_paused: std::sync::atomic::AtomicBool,
    /// Whether the reconciler said that this node's data directory was wiped (once).
    wipe_reported: std::sync::atomic::AtomicBool,
    /// The restore this node's store was built by (`flotilla restore`), if any: its bootstrap
    /// shards are formed over the restored data, and only in a cluster bootstrapped from the
    /// same backup (`reconcile.rs`).
    restored: Option<crate::backup::Restored>,
    /// Last size check of each shard this node leads (`report.rs`).
    sizes: Mutex<HashMap<ShardId, SizeCheck>>,
    /// What the last size check saw (the host's generation of summaries, the meta revision),
    /// if it left no shard waiting: the next one has nothing to do until either moves.
    sizes_seen: Mutex<Option<(u64, u64)>>,
    /// Moves whenever `sizes` changes (what a report's [`report::Basis`] compares).
    sizes_version: AtomicU64,
    /// The part of this node's report read off its groups, and the host's generation of
    /// summaries it was read at (`report.rs`).
    report_groups: Mutex<Option<(u64, Arc<crate::placement::NodeReport>)>>,
    /// Whole meta states this node sent in parts, for the askers to fetch (`whole_state.rs`).
    held_states: whole_state::HeldStates,
    /// The last report the meta leader took, that the next is sent as a change of
    /// (`report.rs`).
    reports_sent: tokio::sync::Mutex<report::ReportsSent>,
    /// Requests per shard served here and their sampled keys, for load-based splitting and
    /// leader balancing (`report.rs`; windows closed at each report).
    load: LoadTrackers,
    /// On the meta leader: when each move reached its current step (`moves.rs`).
    move_steps: Mutex<MoveSteps>,
    /// When this node first saw each merge (by id) freezing: its timeout counts from there.
    merges_seen: Mutex<HashMap<u64, Instant>>,
    /// A round of merge steps is running (`merges.rs`): the next waits for it.
    merges_running: std::sync::atomic::AtomicBool,
    /// Peers made known after start ([`Node::set_peer_addr`]): a node without a meta replica
    /// asks them for meta operations.
    extra_peers: Mutex<BTreeSet<NodeId>>,
    /// Shard copies built here for backups and not yet read (`backup.rs`).
    backups: backup::BackupCopies,
    /// Counters for metrics.
    stats: NodeStats,
    /// Client and peer requests being served (permits taken); shutdown waits for all.
    requests_limit: Arc<Semaphore>,
    /// Counters of the envelope pump.
    net_stats: Arc<NetStats>,
    /// For the uptime metric.
    started: Instant,
    /// The Redis front door's bound address, if it has one.
    resp_addr: Option<SocketAddr>,
    /// The Redis front door's TLS acceptor, reloaded with the transport's certificates.
    resp_tls: Option<Arc<resp_server::RespTls>>,
    /// The Redis front door's counters (zero without one).
    resp_metrics: Arc<RespMetrics>,
    /// Set once at shutdown; every task watches it.
    shutdown: watch::Sender<bool>,
    /// The node's tasks, aborted and awaited at shutdown.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.id).field("addr", &self.inner.addr).finish()
    }
}

impl Node {
    /// Opens the store, starts the transport and host, and the node's tasks.
    pub async fn start(mut config: NodeConfig) -> Result<Node, NodeError> {
        if config.id.0 == 0 {
            return Err(NodeError::Config("node ids start at 1".into()));
        }
        // A data directory restored from a backup (`flotilla restore`): the new cluster's
        // shards are the backup's, whatever the bootstrap's own split keys.
        let restored = crate::backup::restored(&config.data_dir).map_err(|e| NodeError::Storage(e.to_string()))?;
        if let Some(r) = &restored {
            match &mut config.bootstrap {
                Some(b) => {
                    info!(
                        node = config.id.0,
                        backup = %r.backup_id,
                        shards = r.split_keys.len() + 1,
                        "restored from a backup: bootstrapping with its shards"
                    );
                    b.split_keys = r.split_keys.clone();
                }
                None => warn!(
                    node = config.id.0,
                    "restored from a backup, but started without a bootstrap: the backup's data joins no shard"
                ),
            }
        }
        if let Some(b) = &config.bootstrap {
            if b.meta_voters.is_empty() || b.meta_voters.len() > META_VOTERS_MAX {
                return Err(NodeError::Config(format!("the meta group needs 1..={META_VOTERS_MAX} voters")));
            }
            if b.shard_replicas.is_empty() {
                return Err(NodeError::Config("initial shards need at least one replica".into()));
            }
            let mut keys = b.split_keys.clone();
            keys.sort();
            keys.dedup();
            if keys != b.split_keys || keys.iter().any(|k| check_user_key(k).is_err()) {
                return Err(NodeError::Config("split keys must be ascending, distinct, valid user keys".into()));
            }
        }
        config.store.check().map_err(|e| NodeError::Config(format!("store: {e}")))?;
        // Before anything is opened: a front door that may not start stops the node's start.
        let resp_listener = match &config.resp {
            Some(r) => {
                let mut r = r.clone();
                r.require_client_roles = config.require_client_roles;
                Some(resp_server::bind(&r, &config.tls).await.map_err(NodeError::Config)?)
            }
            None => None,
        };
        let resp_addr = resp_listener.as_ref().and_then(|l| l.local_addr().ok());
        let resp_tls = resp_listener.as_ref().and_then(|l| l.tls());
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| NodeError::Storage(format!("cannot create {}: {e}", config.data_dir.display())))?;
        let store = Store::open_with(config.data_dir.join(crate::backup::restore::STORE_DIR), config.store)
            .map_err(|e| NodeError::Storage(e.to_string()))?;
        let holds_shards =
            store.groups().map_err(|e| NodeError::Storage(e.to_string()))?.iter().any(|g| *g != META_GROUP);
        let forming = bootstrap_forming::at_start(&config.data_dir, config.bootstrap.is_some(), holds_shards)
            .map_err(|e| NodeError::Storage(format!("cannot record the bootstrap's forming: {e}")))?;
        let mut tcfg = TransportConfig::new(config.id, config.listen_addr, config.tls.clone());
        tcfg.peers = config.peers.clone();
        tcfg.require_client_roles = config.require_client_roles;
        let streams = tcfg.raft_streams;
        let (transport, incoming) = Transport::start(tcfg).await?;
        let bound = transport.local_addr()?;
        let addr = config.advertise_addr.clone().unwrap_or_else(|| bound.to_string());
        let net_stats = Arc::new(NetStats::default());
        let network = Arc::new(TransportNetwork::new(transport.clone(), streams, net_stats.clone()));
        let mut hcfg = HostConfig::with_raft(config.id, config.raft.clone());
        hcfg.pollers = config.pollers;
        let host = match Host::open(store.clone(), hcfg, network).await {
            Ok(h) => h,
            Err(e) => {
                transport.shutdown().await;
                return Err(e.into());
            }
        };
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            id: config.id,
            addr,
            meta_sm: KvStateMachine::new(store, META_GROUP, meta_range()),
            host,
            transport,
            meta: MetaClient::default(),
            reconfig: Mutex::new(HashMap::new()),
            reconciled: Mutex::new(None),
            shards_summary: Mutex::new(None),
            bootstrap_shards: std::sync::OnceLock::new(),
            bootstrap_forming: Mutex::new(forming),
            reconciler_paused: std::sync::atomic::AtomicBool::new(config.reconciler_paused),
            wipe_reported: std::sync::atomic::AtomicBool::new(false),
            restored,
            sizes: Mutex::new(HashMap::new()),
            sizes_seen: Mutex::new(None),
            sizes_version: AtomicU64::new(0),
            report_groups: Mutex::new(None),
            held_states: whole_state::HeldStates::default(),
            reports_sent: tokio::sync::Mutex::new(report::ReportsSent::new()),
            load: LoadTrackers::new(load_split_config(&config), 0),
            requests_limit: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
            stats: NodeStats::default(),
            backups: backup::BackupCopies::default(),
            extra_peers: Mutex::new(BTreeSet::new()),
            move_steps: Mutex::new(HashMap::new()),
            merges_seen: Mutex::new(HashMap::new()),
            merges_running: std::sync::atomic::AtomicBool::new(false),
            net_stats,
            started: Instant::now(),
            resp_addr,
            resp_tls,
            resp_metrics: Arc::new(RespMetrics::default()),
            shutdown,
            tasks: Mutex::new(Vec::new()),
            config,
        });
        let node = Node { inner };
        if let Err(e) = node.init_meta().await {
            node.shutdown().await;
            return Err(e);
        }
        node.spawn_tasks(incoming, resp_listener);
        info!(node = node.inner.id.0, addr = %node.inner.addr, "node started");
        Ok(node)
    }

    fn spawn_tasks(&self, incoming: tp::Incoming, resp_listener: Option<resp_server::Listener>) {
        let tp::Incoming { mut envelopes, mut transfers, mut requests } = incoming;
        let mut tasks = Vec::new();
        {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((from, env)) = envelopes.recv().await {
                    if me.removed_for_good(from) {
                        continue;
                    }
                    deliver(&me.inner.host, &me.inner.net_stats, from, env);
                }
            }));
        }
        {
            // Snapshot chunks, one per transfer stream. Each is read by a task of its own (a
            // slow sender must not hold up the others; the transport bounds the streams per
            // peer), which holds no node handle: the delivery to the host happens here, in
            // this task, which shutdown waits for.
            let me = self.clone();
            let bytes_max = transfer_bytes_max(self.inner.config.raft.snapshot_chunk_bytes);
            tasks.push(tokio::spawn(async move {
                let (read_tx, mut read_rx) = tokio::sync::mpsc::channel(TRANSFERS_READ_QUEUE_MAX);
                let mut readers = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        t = transfers.recv() => {
                            let Some(t) = t else { break };
                            let read_tx = read_tx.clone();
                            readers.spawn(async move {
                                let (from, group) = (t.from, t.group);
                                let read = read_transfer(t, bytes_max).await;
                                let _ = read_tx.send((from, group, read)).await;
                            });
                        }
                        Some((from, group, read)) = read_rx.recv() => {
                            if me.removed_for_good(from) {
                                continue;
                            }
                            deliver_transfer(&me.inner.host, &me.inner.net_stats, from, group, read);
                        }
                        Some(_) = readers.join_next() => {}
                    }
                }
            }));
        }
        // Requests are served in the transport's tasks from now on; those that arrived
        // before are in `requests`, and get the same server (slot, refusal once stopping) in a
        // task each.
        let server = Arc::new(serve::RequestServer(Arc::downgrade(&self.inner)));
        if let Err(e) = self.inner.transport.serve_requests_with(server.clone()) {
            warn!(node = self.inner.id.0, error = %e, "requests keep going through the node's queue");
        }
        tasks.push(tokio::spawn(async move {
            while let Some(req) = requests.recv().await {
                tokio::spawn(tp::RequestHandler::serve(&*server, req));
            }
        }));
        let stop = || self.inner.shutdown.subscribe();
        if let Some(l) = resp_listener {
            tasks.push(tokio::spawn(l.run(self.clone(), self.inner.resp_metrics.clone(), stop())));
        }
        tasks.push(tokio::spawn(self.clone().run_reconciler(stop())));
        tasks.push(tokio::spawn(self.clone().run_reporter(stop())));
        tasks.push(tokio::spawn(self.clone().run_size_checks(stop())));
        tasks.push(tokio::spawn(self.clone().run_backup_sweeper(stop())));
        tasks.push(tokio::spawn(self.clone().run_meta_members(stop())));
        if self.inner.config.peers.iter().any(|(p, _)| *p < self.inner.id) {
            tasks.push(tokio::spawn(self.clone().run_announcer(stop())));
        }
        if let Some(b) = self.inner.config.bootstrap.clone() {
            if b.meta_voters.iter().min() == Some(&self.inner.id) {
                tasks.push(tokio::spawn(self.clone().run_bootstrap(b)));
            }
        }
        if let Ok(mut t) = self.inner.tasks.lock() {
            t.extend(tasks);
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The address clients and peers reach this node at.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, NodeError> {
        Ok(self.inner.transport.local_addr()?)
    }

    /// The Redis protocol front door's bound address, if the node has one.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.inner.resp_addr
    }

    /// The Redis protocol front door's counters.
    pub fn resp_metrics(&self) -> &RespMetrics {
        &self.inner.resp_metrics
    }

    /// The shard host (for embedders and tests).
    pub fn host(&self) -> &Host {
        &self.inner.host
    }

    /// Presents `tls` from now on (renewed certificates, or a move to a new CA): see
    /// [`Transport::reload_tls`]. A certificate naming another node is refused.
    /// The Redis front door's TLS listener, if it has one, takes them too, for the connections
    /// it accepts from then on. All or nothing: the front door's acceptor is built first, then
    /// the transport reloaded, then the acceptor put in use, so that certificates either part
    /// refuses change neither.
    pub fn reload_tls(&self, tls: TlsIdentity) -> Result<(), NodeError> {
        let resp = match &self.inner.resp_tls {
            Some(resp) => Some((resp, resp.prepare(&tls).map_err(NodeError::Config)?)),
            None => None,
        };
        self.inner.transport.reload_tls(tls)?;
        if let Some((resp, acceptor)) = resp {
            resp.install(acceptor);
        }
        Ok(())
    }

    /// The transport (for embedders and tests: fault injection, metrics).
    pub fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// Tells the node where `peer` listens: the transport dials it if its id is higher, and a
    /// node without a meta replica may send it meta requests.
    pub fn set_peer_addr(&self, peer: NodeId, addr: SocketAddr) -> Result<(), NodeError> {
        if let Ok(mut p) = self.inner.extra_peers.lock() {
            p.insert(peer);
        }
        Ok(self.inner.transport.set_peer_addr(peer, addr)?)
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.inner.stats
    }

    /// Counters of the host's network: batches and snapshot transfers.
    pub fn net_stats(&self) -> &NetStats {
        &self.inner.net_stats
    }

    /// Prometheus text exposition of the node's metrics.
    pub async fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let id = self.inner.id;
        let (s, h, w, n) =
            (&self.inner.stats, self.inner.host.stats(), self.inner.host.store().stats(), &self.inner.net_stats);
        // (name, help, counter): one counter a line, as a table reads best.
        #[rustfmt::skip]
        let counters = [
            ("flotilla_requests_total", "Client requests served.", &s.requests),
            ("flotilla_redirects_total", "Requests answered with a redirect.", &s.redirects),
            ("flotilla_bad_requests_total", "Requests that did not decode.", &s.bad_requests),
            ("flotilla_requests_denied_total", "Requests refused by the client's role.", &s.denied),
            ("flotilla_meta_ops_total", "Meta operations run as meta leader.", &s.meta_ops),
            ("flotilla_meta_writes_total", "Changes of the meta state proposed as meta leader.", &s.meta_writes),
            ("flotilla_meta_write_records_total", "Records those changes wrote.", &s.meta_write_records),
            ("flotilla_meta_updates_whole_total", "Refreshes of this node's meta copy sent as the whole state.", &s.meta_updates_whole),
            ("flotilla_meta_whole_in_parts_total", "Whole meta states this node received in parts (too large for one answer).", &s.meta_whole_in_parts),
            ("flotilla_reconcile_full_rounds_total", "Full rounds of the reconciler (every group here against every shard of the map).", &s.reconcile_full_rounds),
            ("flotilla_reconcile_full_microseconds_total", "Time the reconciler's full rounds took.", &s.reconcile_full_micros),
            ("flotilla_reconcile_changed_rounds_total", "Rounds of the reconciler over what changed only (the map's changes, moves under way).", &s.reconcile_changed_rounds),
            ("flotilla_reconcile_changed_groups_total", "Groups those rounds looked at.", &s.reconcile_changed_groups),
            ("flotilla_meta_updates_changes_total", "Refreshes of this node's meta copy sent as the changes since its revision.", &s.meta_updates_changes),
            ("flotilla_reports_whole_total", "Reports the meta leader took from this node whole.", &s.reports_whole),
            ("flotilla_reports_changed_total", "Reports the meta leader took from this node as the change from its previous one.", &s.reports_changed),
            ("flotilla_report_shards_sent_total", "Shard entries this node's reports carried (whole: every shard; changed: the shards that changed).", &s.report_shards_sent),
            ("flotilla_meta_write_bytes_total", "Bytes of keys and values those changes wrote.", &s.meta_write_bytes),
            ("flotilla_host_batches_sent_total", "Node batches sent.", &h.batches_sent),
            ("flotilla_host_messages_sent_total", "Raft messages sent.", &h.messages_sent),
            ("flotilla_host_mailbox_dropped_total", "Messages dropped at full mailboxes.", &h.mailbox_dropped),
            ("flotilla_host_rounds_total", "Poller rounds.", &h.rounds),
            ("flotilla_host_campaigns_postponed_total", "Elections put off to a later poller tick (a poller starts a bounded number per tick).", &h.campaigns_postponed),
            ("flotilla_host_log_appends_total", "Groups' log writes handed to the store (with the syncs: appends per fsync).", &h.log_appends),
            ("flotilla_host_info_builds_total", "Summaries of every group here built afresh (the shared copy was older).", &h.info_builds),
            ("flotilla_host_info_build_microseconds_total", "Time those builds took.", &h.info_build_micros),
            ("flotilla_host_local_reads_total", "Lease reads served on the request's thread (the lease gate open), without a round to a poller.", &h.local_reads),
            ("flotilla_store_write_requests_total", "Write requests the store completed.", &w.requests),
            ("flotilla_store_write_batches_total", "RocksDB write batches (group commits).", &w.batches),
            ("flotilla_store_syncs_total", "Write batches made durable with an fsync.", &w.syncs),
            ("flotilla_store_write_microseconds_total", "Time the store's writer spent writing batches, fsyncs included.", &w.write_micros),
            ("flotilla_store_slow_writes_total", "Batches whose write (fsync included) took 50 ms or longer.", &w.slow_writes),
            ("flotilla_net_spoofed_total", "Batches whose sender did not match its certificate.", &n.spoofed),
            ("flotilla_net_malformed_total", "Envelopes that did not decode.", &n.malformed),
            ("flotilla_net_snapshot_chunks_sent_total", "Snapshot chunks sent on transfer streams.", &n.snapshot_chunks_sent),
            ("flotilla_net_snapshot_bytes_sent_total", "Bytes of snapshot chunks sent on transfer streams.", &n.snapshot_bytes_sent),
            ("flotilla_net_snapshot_chunks_dropped_total", "Snapshot chunks not sent (queue full, send failed or timed out).", &n.snapshot_chunks_dropped),
            ("flotilla_net_snapshot_chunks_received_total", "Snapshot chunks received on transfer streams.", &n.snapshot_chunks_received),
            ("flotilla_net_snapshot_bytes_received_total", "Bytes of snapshot chunks received on transfer streams.", &n.snapshot_bytes_received),
            ("flotilla_net_snapshot_chunks_in_batches_total", "Snapshot chunks received inside Raft batches instead of transfer streams.", &n.snapshot_chunks_in_batches),
            ("flotilla_net_transfers_refused_total", "Incoming transfers refused (too large, too slow, malformed, unexpected).", &n.transfers_refused),
        ];
        for (name, help, v) in counters {
            let v = v.load(Ordering::Relaxed);
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{id}\"}} {v}");
        }
        // Read afresh (not the shared summaries): it counts quiet groups, which the host's
        // generation of summaries does not follow.
        let infos = self.inner.host.group_info().await.unwrap_or_default();
        let leaders = infos.iter().filter(|i| i.role == Role::Leader).count();
        let quiet = infos.iter().filter(|i| i.quiet).count();
        // A group stopped for good (its storage failed, or its log forked from its leader's
        // below the commit index): it answers nothing until an operator drops the replica.
        let stopped = infos.iter().filter(|i| i.stopped.is_some()).count();
        let _ = writeln!(
            out,
            "# HELP flotilla_groups_stopped Groups stopped by a fatal error (storage, or a log forked from the leader's).\n\
             # TYPE flotilla_groups_stopped gauge\nflotilla_groups_stopped{{node=\"{id}\"}} {stopped}"
        );
        let _ = writeln!(
            out,
            "# HELP flotilla_groups Groups hosted.\n# TYPE flotilla_groups gauge\nflotilla_groups{{node=\"{id}\"}} {}\n\
             # HELP flotilla_groups_leading Groups this node leads.\n# TYPE flotilla_groups_leading gauge\nflotilla_groups_leading{{node=\"{id}\"}} {leaders}\n\
             # HELP flotilla_groups_quiet Quiescent groups.\n# TYPE flotilla_groups_quiet gauge\nflotilla_groups_quiet{{node=\"{id}\"}} {quiet}\n\
             # HELP flotilla_host_summary_generation Moves whenever a group's summary changed (role, indexes, configuration) or a group came or went.
# TYPE flotilla_host_summary_generation gauge
flotilla_host_summary_generation{{node=\"{id}\"}} {}
\
             # HELP flotilla_meta_revision The revision of this node's view of the meta state.
# TYPE flotilla_meta_revision gauge
flotilla_meta_revision{{node=\"{id}\"}} {}
\
             # HELP flotilla_uptime_seconds Seconds since start.\n# TYPE flotilla_uptime_seconds gauge\nflotilla_uptime_seconds{{node=\"{id}\"}} {}",
            infos.len(),
            self.inner.host.info_generation(),
            self.meta_revision(),
            self.inner.started.elapsed().as_secs()
        );
        // What load-based splitting holds: an entry per shard busy lately, a sample per warm one.
        let load = &self.inner.load;
        let _ = writeln!(
            out,
            "# HELP flotilla_load_tracked_shards Shards whose requests this node counts (led, busy lately).\n\
             # TYPE flotilla_load_tracked_shards gauge\nflotilla_load_tracked_shards{{node=\"{id}\"}} {}\n\
             # HELP flotilla_load_sampled_shards Shards whose request keys this node samples (warm or hot).\n\
             # TYPE flotilla_load_sampled_shards gauge\nflotilla_load_sampled_shards{{node=\"{id}\"}} {}",
            load.tracked(),
            load.sampling()
        );
        // Off the async threads: RocksDB properties take its mutex, `/proc` is read. A failure
        // leaves the lines out rather than failing the whole page.
        if self.inner.resp_addr.is_some() {
            self.inner.resp_metrics.write_text(&mut out, id.0);
        }
        match self.inner.host.store().blocking(|s| s.metrics()).await {
            Ok(m) => store_metrics_text(&mut out, id, &m),
            Err(e) => debug!(node = id.0, error = %e, "store metrics unavailable"),
        }
        out
    }

    /// Whether the node is healthy: not stopped, store not poisoned, meta state known.
    pub fn health(&self) -> Result<(), String> {
        if *self.inner.shutdown.borrow() {
            return Err("shutting down".into());
        }
        if let Some(e) = self.inner.host.store().poisoned() {
            return Err(format!("store failed: {e}"));
        }
        if self.meta_view().map.is_empty() {
            return Err("no shard map yet (cluster not bootstrapped or meta unreachable)".into());
        }
        Ok(())
    }

    /// Stops the node's tasks, the host and the transport.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let tasks: Vec<_> = self.inner.tasks.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for t in &tasks {
            t.abort();
        }
        // Wait for them to go, so the node handles they hold are dropped by the time this
        // returns (the store and the socket close once the caller drops its own).
        for t in tasks {
            let _ = t.await;
        }
        // A host whose poller is stuck (a storage bug, a hung disk) must not hang the process's
        // exit: give it a bounded time.
        if tokio::time::timeout(Duration::from_millis(SHUTDOWN_HOST_MS_MAX), self.inner.host.shutdown()).await.is_err()
        {
            warn!(node = self.inner.id.0, "the shard host did not stop in time; leaving it");
        }
        // Requests in flight end quickly now (their groups answer "stopped"); wait for them,
        // so they drop their node handles too.
        let all = REQUESTS_IN_FLIGHT_MAX as u32;
        let drained = self.inner.requests_limit.acquire_many(all);
        if tokio::time::timeout(Duration::from_millis(SHUTDOWN_HOST_MS_MAX), drained).await.is_err() {
            warn!(node = self.inner.id.0, "requests still running at shutdown");
        }
        self.inner.transport.shutdown().await;
        info!(node = self.inner.id.0, "node stopped");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
