//! [`Node`]: one RocksDB store, one shard host, one QUIC transport and the meta group, wired
//! together and serving the client protocol ([`crate::wire`]).
//!
//! # What runs
//! - **Envelope pump**: envelopes from peers are decoded into node batches, checked against
//!   the sender's certificate and handed to the host ([`crate::net`]).
//! - **Request pump**: each client or peer request runs as its own task (at most
//!   [`REQUESTS_IN_FLIGHT_MAX`] at once); data requests are checked against the node's copy of
//!   the shard map (shard id, epoch, key in range) and then served by the host on the leader.
//! - **Reconciler** (every [`RECONCILE_MS`]): refreshes the node's copy of the meta state,
//!   tells the transport where higher-id peers listen (the lower id dials), creates the groups
//!   of shards the map places here, destroys those it no longer does, and on shards this node
//!   leads carries out what the map asks: learners added, voters changed (joint consensus),
//!   leadership handed over.
//! - **Reporter** (every `report_interval_ms`): sends the node's [`NodeReport`] (leaders,
//!   applied indexes, request rate, sizes and split points of the shards it leads) to the meta
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
//! some to it. (`flotilla admin add-node ID ADDR`, [`AdminRequest::AddNode`], registers a node
//! by hand.)

use crate::meta::{self, meta_range, shard_range, META_GROUP, META_STATE_KEY};
use crate::net::{deliver, NetStats, TransportNetwork};
use crate::placement::{
    replica_fate, BalancerConfig, Epoch, GroupConf, LocalReplica, LogIndex as PLogIndex, MetaCommand, MetaState,
    MoveStep, NodeReport, PlanAction, ReplicaFate, ReplicaRole, ShardId,
};
use crate::raft::{Config as RaftConfig, GroupId, Membership, NodeId, RaftError, ReadMode, Role};
use crate::shard::{
    range_size_blocking, Host, HostConfig, HostError, KeyRange, KvCommand, KvResponse, KvStateMachine, RangeSize,
    ScanEnd, ScanError, ScanPage, Store,
};
use crate::transport::{self as tp, cert::TlsIdentity, IncomingRequest, PeerIdentity, Transport, TransportConfig};
use crate::wire::{
    check_user_key, check_value, AdminRequest, AdminResponse, ClusterView, MetaOp, NodeRow, ReadConsistency, Request,
    Response, ScanEnd as WireScanEnd, ShardRow, StatusReport, SCAN_LIMIT_MAX, SCAN_RESPONSE_BYTES_MAX,
};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Requests served at once; more wait (the transport bounds each peer's open requests too).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 4096;
/// Shards larger than this are split by the automatic balancer (64 MiB).
pub const SPLIT_SIZE_BYTES_DEFAULT: u64 = 64 << 20;
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
/// How often the reconciler runs (ms).
pub const RECONCILE_MS: u64 = 200;
/// How long a meta operation may take, forwarding and retries included (ms).
pub const META_OP_TIMEOUT_MS: u64 = 10_000;
/// Time allowed for one node-to-node request (ms).
pub const PEER_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// A leader asks for the same membership change or leader transfer at most this often (ms).
pub const RECONFIG_RETRY_MS: u64 = 2_000;
/// How long shutdown waits for the shard host's threads (ms).
pub const SHUTDOWN_HOST_MS_MAX: u64 = 10_000;
/// Most voters of the meta group.
pub const META_VOTERS_MAX: usize = 5;
/// A replica move whose step has not advanced for this long is aborted (a learner that cannot
/// catch up, a configuration change that does not commit): it would otherwise block the
/// shard's splits and moves for good.
pub const MOVE_STEP_DEADLINE_MS: u64 = 120_000;

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

/// Everything a node needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id; must match its certificate.
    pub id: NodeId,
    /// Where the store lives.
    pub data_dir: PathBuf,
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
    /// Host poller threads.
    pub pollers: usize,
    /// How often the node reports to the meta leader (ms).
    pub report_interval_ms: u64,
    /// Balancer limits (for `admin rebalance` and the automatic balancer).
    pub balancer: BalancerConfig,
    /// Run the balancer on the meta leader this often (ms), carrying out what it proposes:
    /// splits of shards past `balancer.split_size_bytes_threshold`, replica moves and leader
    /// transfers. `None`: only on `admin rebalance`.
    pub auto_balance_interval_ms: Option<u64>,
    /// A shard this node leads is re-sized (its range read through) at most this often, and only
    /// after it applied writes (ms).
    pub size_check_interval_ms: u64,
    /// A replica move whose step has not advanced for this long is aborted by the meta leader
    /// (ms; default [`MOVE_STEP_DEADLINE_MS`]).
    pub move_step_deadline_ms: u64,
}

impl NodeConfig {
    /// Defaults for node `id` storing in `data_dir`, listening on `listen_addr`.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>, listen_addr: SocketAddr, tls: TlsIdentity) -> NodeConfig {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            listen_addr,
            advertise_addr: None,
            tls,
            peers: Vec::new(),
            bootstrap: None,
            raft: default_raft(),
            pollers: default_pollers(1),
            report_interval_ms: 1_000,
            // A learner within this many entries of the leader is promoted: a joint change keeps
            // the old voters' quorum, so a small lag never stalls writes.
            // Shards split at 64 MiB: a snapshot is built in memory, and a smaller shard moves
            // and recovers faster.
            balancer: BalancerConfig {
                catch_up_lag_entries_max: 512,
                split_size_bytes_threshold: SPLIT_SIZE_BYTES_DEFAULT,
                ..BalancerConfig::default()
            },
            auto_balance_interval_ms: None,
            size_check_interval_ms: 10_000,
            move_step_deadline_ms: MOVE_STEP_DEADLINE_MS,
        }
    }
}

/// Poller threads for each of `nodes_per_process` nodes: half the cores for all of them
/// (the rest serve the network, the store's writer and clients), at least one, at most eight.
/// On two cores one poller per node is 12–15 % faster for puts than two (fewer thread
/// hand-offs, larger write rounds; BENCHMARKS.md).
pub fn default_pollers(nodes_per_process: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / 2 / nodes_per_process.max(1)).clamp(1, 8)
}

/// Raft timers for a node: elections in 0.6–1.2 s, heartbeats every 100 ms. Faster than
/// Raft's defaults (failover within about a second and a half on loopback), slow enough not
/// to elect spuriously on a loaded two-core machine.
pub fn default_raft() -> RaftConfig {
    RaftConfig {
        election_timeout_ms_min: 600,
        election_timeout_ms_max: 1200,
        heartbeat_interval_ms: 100,
        lease_clock_drift_ms: 60,
        transfer_timeout_ms: 1500,
        snapshot_resend_ms: 1000,
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
    /// Meta operations run on this node as the meta leader.
    pub meta_ops: AtomicU64,
    /// Compare-and-swap writes of the meta state this node proposed as the meta leader.
    pub meta_writes: AtomicU64,
}

struct Inner {
    id: NodeId,
    config: NodeConfig,
    addr: String,
    host: Host,
    transport: Transport,
    meta_sm: KvStateMachine,
    view: RwLock<Arc<MetaState>>,
    /// Serializes this node's meta read-modify-writes (fewer CAS retries).
    meta_lock: tokio::sync::Mutex<()>,
    /// When each node's report last reached this node as meta leader.
    reports: Mutex<HashMap<NodeId, Instant>>,
    /// Last time a reconfiguration was asked for, per (shard, what).
    reconfig: Mutex<HashMap<(GroupId, String), Instant>>,
    stats: NodeStats,
    /// Reports received as meta leader: kept in memory, not written to the meta group (they
    /// change every second); a new meta leader has them again within one report interval.
    live_reports: Mutex<HashMap<NodeId, (NodeReport, Instant)>>,
    /// Since when this node leads the meta group (see [`Node::leads_meta`]).
    meta_leader_since: Mutex<Option<Instant>>,
    /// Client and peer requests being served (permits taken).
    requests_limit: Arc<Semaphore>,
    /// Last size check of each shard this node leads.
    sizes: Mutex<HashMap<ShardId, SizeCheck>>,
    /// On the meta leader: the step each move was first seen at, and when (step deadlines).
    move_steps: Mutex<HashMap<ShardId, (MoveStep, Instant)>>,
    /// Peers made known after start ([`Node::set_peer_addr`]).
    extra_peers: Mutex<BTreeSet<NodeId>>,
    net_stats: Arc<NetStats>,
    started: Instant,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A shard's last size check.
struct SizeCheck {
    /// The shard's epoch when it was checked (a split changes its range).
    epoch: Epoch,
    /// The shard's applied index when it was checked.
    applied: u64,
    at: Instant,
    size: RangeSize,
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
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        if config.id.0 == 0 {
            return Err(NodeError::Config("node ids start at 1".into()));
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
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| NodeError::Storage(format!("cannot create {}: {e}", config.data_dir.display())))?;
        let store = Store::open(config.data_dir.join("store")).map_err(|e| NodeError::Storage(e.to_string()))?;
        let mut tcfg = TransportConfig::new(config.id, config.listen_addr, config.tls.clone());
        tcfg.peers = config.peers.clone();
        let streams = tcfg.raft_streams;
        let (transport, incoming) = Transport::start(tcfg).await?;
        let bound = transport.local_addr()?;
        let addr = config.advertise_addr.clone().unwrap_or_else(|| bound.to_string());
        let net_stats = Arc::new(NetStats::default());
        let network = Arc::new(TransportNetwork::new(transport.clone(), streams, net_stats.clone()));
        let mut hcfg = HostConfig::new(config.id);
        hcfg.raft = config.raft.clone();
        hcfg.pollers = config.pollers;
        hcfg.quiesce_after_ticks = (3 * hcfg.raft.heartbeat_interval_ms / hcfg.tick_ms) as u32;
        hcfg.peer_down_ms = hcfg.raft.election_timeout_ms_min;
        hcfg.api_timeout_ms = 5_000;
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
            view: RwLock::new(Arc::new(MetaState::default())),
            meta_lock: tokio::sync::Mutex::new(()),
            reports: Mutex::new(HashMap::new()),
            reconfig: Mutex::new(HashMap::new()),
            sizes: Mutex::new(HashMap::new()),
            requests_limit: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
            meta_leader_since: Mutex::new(None),
            live_reports: Mutex::new(HashMap::new()),
            stats: NodeStats::default(),
            extra_peers: Mutex::new(BTreeSet::new()),
            move_steps: Mutex::new(HashMap::new()),
            net_stats,
            started: Instant::now(),
            shutdown,
            tasks: Mutex::new(Vec::new()),
            config,
        });
        let node = Node { inner };
        if let Err(e) = node.init_meta().await {
            node.shutdown().await;
            return Err(e);
        }
        node.spawn_tasks(incoming);
        info!(node = node.inner.id.0, addr = %node.inner.addr, "node started");
        Ok(node)
    }

    /// Creates the meta group on a new cluster's meta voters.
    async fn init_meta(&self) -> Result<(), NodeError> {
        let Some(b) = self.inner.config.bootstrap.clone() else { return Ok(()) };
        if !b.meta_voters.contains(&self.inner.id) || self.inner.host.groups().contains(&META_GROUP) {
            return Ok(());
        }
        let members = Membership::new(b.meta_voters.iter().map(|n| *n));
        self.inner.host.create_group(META_GROUP, meta_range(), Some(members)).await?;
        info!(node = self.inner.id.0, "meta group created");
        Ok(())
    }

    fn spawn_tasks(&self, incoming: tp::Incoming) {
        let tp::Incoming { mut envelopes, mut transfers, mut requests } = incoming;
        let mut tasks = Vec::new();
        {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((from, env)) = envelopes.recv().await {
                    deliver(&me.inner.host, &me.inner.net_stats, from, env);
                }
            }));
        }
        tasks.push(tokio::spawn(async move {
            // Snapshots travel inside Raft messages (chunked); no transfer streams are used.
            while let Some(t) = transfers.recv().await {
                debug!(from = %t.from, "unexpected transfer stream; refused");
            }
        }));
        {
            let me = self.clone();
            let limit = self.inner.requests_limit.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(req) = requests.recv().await {
                    let Ok(permit) = limit.clone().acquire_owned().await else { break };
                    let me = me.clone();
                    tokio::spawn(async move {
                        me.serve(req).await;
                        drop(permit);
                    });
                }
            }));
        }
        {
            let me = self.clone();
            let mut stop = self.inner.shutdown.subscribe();
            tasks.push(tokio::spawn(async move {
                loop {
                    me.reconcile().await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(RECONCILE_MS)) => {}
                        _ = stop.changed() => break,
                    }
                }
            }));
        }
        {
            let me = self.clone();
            let mut stop = self.inner.shutdown.subscribe();
            let every = Duration::from_millis(self.inner.config.report_interval_ms.max(50));
            tasks.push(tokio::spawn(async move {
                let mut served = 0u64;
                let mut at = Instant::now();
                let mut balanced_at = Instant::now();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.changed() => break,
                    }
                    let now_served = me.inner.stats.requests.load(Ordering::Relaxed);
                    let secs = at.elapsed().as_secs_f64().max(0.001);
                    let rate = ((now_served - served) as f64 / secs) as u64;
                    served = now_served;
                    at = Instant::now();
                    if let Err(e) = me.report(rate).await {
                        debug!(node = me.inner.id.0, error = %e, "report not delivered");
                    }
                    me.drive_moves().await;
                    if let Some(ms) = me.inner.config.auto_balance_interval_ms {
                        if balanced_at.elapsed() >= Duration::from_millis(ms) {
                            balanced_at = Instant::now();
                            me.auto_balance().await;
                        }
                    }
                }
            }));
        }
        {
            let me = self.clone();
            let mut stop = self.inner.shutdown.subscribe();
            let every = Duration::from_millis((self.inner.config.size_check_interval_ms / 4).clamp(50, 1_000));
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.changed() => break,
                    }
                    me.check_sizes().await;
                }
            }));
        }
        if self.inner.config.peers.iter().any(|(p, _)| *p < self.inner.id) {
            let me = self.clone();
            let mut stop = self.inner.shutdown.subscribe();
            tasks.push(tokio::spawn(async move {
                while !me.announce().await {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(ANNOUNCE_RETRY_MS)) => {}
                        _ = stop.changed() => break,
                    }
                }
            }));
        }
        if let Some(b) = self.inner.config.bootstrap.clone() {
            if b.meta_voters.iter().min() == Some(&self.inner.id) {
                let me = self.clone();
                tasks.push(tokio::spawn(async move {
                    // Every initial node is registered; an address not given yet stays empty
                    // until the node's first report fills it in.
                    let mut ids: Vec<NodeId> = b.meta_voters.iter().chain(b.shard_replicas.iter()).copied().collect();
                    ids.sort();
                    ids.dedup();
                    let addr_of =
                        |n: NodeId| b.addrs.iter().find(|(m, _)| *m == n).map(|(_, a)| a.clone()).unwrap_or_default();
                    let op = MetaOp::Bootstrap {
                        nodes: ids.iter().map(|n| (*n, addr_of(*n))).collect(),
                        replicas: b.shard_replicas.clone(),
                        split_keys: b.split_keys.clone(),
                    };
                    loop {
                        match me.meta_exec(op.clone(), false).await {
                            Ok(_) => {
                                info!(node = me.inner.id.0, "cluster bootstrapped");
                                break;
                            }
                            Err(e) => {
                                debug!(error = %e, "bootstrap not done yet; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                }));
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

    /// The shard host (for embedders and tests).
    pub fn host(&self) -> &Host {
        &self.inner.host
    }

    /// The transport (for embedders and tests: fault injection, metrics).
    pub fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// The node's (possibly lagging) copy of the meta state.
    pub fn meta_view(&self) -> Arc<MetaState> {
        self.inner.view.read().map(|v| v.clone()).unwrap_or_default()
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

    /// Prometheus text exposition of the node's metrics.
    pub async fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let id = self.inner.id;
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{id}\"}} {v}");
        };
        let s = &self.inner.stats;
        counter("flotilla_requests_total", "Client requests served.", s.requests.load(Ordering::Relaxed));
        counter("flotilla_redirects_total", "Requests answered with a redirect.", s.redirects.load(Ordering::Relaxed));
        counter("flotilla_bad_requests_total", "Requests that did not decode.", s.bad_requests.load(Ordering::Relaxed));
        counter("flotilla_meta_ops_total", "Meta operations run as meta leader.", s.meta_ops.load(Ordering::Relaxed));
        let h = self.inner.host.stats();
        counter("flotilla_host_batches_sent_total", "Node batches sent.", h.batches_sent.load(Ordering::Relaxed));
        counter("flotilla_host_messages_sent_total", "Raft messages sent.", h.messages_sent.load(Ordering::Relaxed));
        counter(
            "flotilla_host_mailbox_dropped_total",
            "Messages dropped at full mailboxes.",
            h.mailbox_dropped.load(Ordering::Relaxed),
        );
        counter("flotilla_host_rounds_total", "Poller rounds.", h.rounds.load(Ordering::Relaxed));
        let n = &self.inner.net_stats;
        counter(
            "flotilla_net_spoofed_total",
            "Batches whose sender did not match its certificate.",
            n.spoofed.load(Ordering::Relaxed),
        );
        counter("flotilla_net_malformed_total", "Envelopes that did not decode.", n.malformed.load(Ordering::Relaxed));
        let w = self.inner.host.store().stats();
        let _ = w;
        let infos = self.inner.host.group_info().await.unwrap_or_default();
        let leaders = infos.iter().filter(|i| i.role == Role::Leader).count();
        let quiet = infos.iter().filter(|i| i.quiet).count();
        let _ = writeln!(
            out,
            "# HELP flotilla_groups Groups hosted.\n# TYPE flotilla_groups gauge\nflotilla_groups{{node=\"{id}\"}} {}\n\
             # HELP flotilla_groups_leading Groups this node leads.\n# TYPE flotilla_groups_leading gauge\nflotilla_groups_leading{{node=\"{id}\"}} {leaders}\n\
             # HELP flotilla_groups_quiet Quiescent groups.\n# TYPE flotilla_groups_quiet gauge\nflotilla_groups_quiet{{node=\"{id}\"}} {quiet}\n\
             # HELP flotilla_uptime_seconds Seconds since start.\n# TYPE flotilla_uptime_seconds gauge\nflotilla_uptime_seconds{{node=\"{id}\"}} {}",
            infos.len(),
            self.inner.started.elapsed().as_secs()
        );
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

    // ---------------------------------------------------------------- meta

    /// Replaces the view, unless `state` is older than the one held (a lagging meta replica
    /// read after a newer state came from the meta leader): a view never goes back in time.
    fn set_view(&self, state: MetaState) {
        if let Ok(mut v) = self.inner.view.write() {
            if !is_older(&state, v.as_ref()) {
                *v = Arc::new(state);
            }
        }
    }

    /// Re-reads the local replica of the meta state, if this node holds one.
    async fn refresh_local_view(&self) -> bool {
        if !self.inner.host.groups().contains(&META_GROUP) {
            return false;
        }
        match self.inner.meta_sm.get(META_STATE_KEY.to_vec()).await {
            Ok(bytes) => match meta::decode_state(bytes.as_deref()) {
                Ok(mut s) => {
                    // On the meta leader, the reports it holds in memory, as meta ops see them.
                    if self.meta_tenure().is_some() {
                        self.overlay_live_reports(&mut s);
                    }
                    self.set_view(s);
                    true
                }
                Err(e) => {
                    warn!(error = %e, "local meta state does not decode");
                    false
                }
            },
            Err(e) => {
                warn!(error = %e, "cannot read the local meta state");
                false
            }
        }
    }

    /// Runs `op` on the meta leader (here, or forwarded) and returns the state after it and
    /// the op's answer.
    pub async fn meta_exec(&self, op: MetaOp, forwarded: bool) -> Result<(MetaState, AdminResponse), NodeError> {
        let deadline = Instant::now() + Duration::from_millis(META_OP_TIMEOUT_MS);
        let mut peer_turn = 0usize;
        let mut last_err = String::from("no meta leader reachable");
        while Instant::now() < deadline {
            if *self.inner.shutdown.borrow() {
                return Err(NodeError::MetaUnavailable("the node is shutting down".into()));
            }
            let target = if self.inner.host.groups().contains(&META_GROUP) {
                match self.meta_local(&op).await {
                    Ok(r) => {
                        if let MetaOp::Report { node, .. } = &op {
                            if let Ok(mut m) = self.inner.reports.lock() {
                                m.insert(*node, Instant::now());
                            }
                        }
                        return Ok(r);
                    }
                    Err(MetaTry::Refused(e)) => return Err(NodeError::Meta(e)),
                    Err(MetaTry::Leader(Some(l))) if l != self.inner.id && !forwarded => Some(l),
                    // A forwarded op is not forwarded again: the sender retries.
                    Err(MetaTry::Leader(l)) if forwarded => {
                        return Err(NodeError::MetaUnavailable(format!(
                            "node {} is not the meta leader ({l:?})",
                            self.inner.id
                        )))
                    }
                    Err(MetaTry::Leader(_)) => {
                        last_err = "the meta group has no leader yet".into();
                        None
                    }
                    Err(MetaTry::Retry(e)) => {
                        last_err = e;
                        None
                    }
                }
            } else if forwarded {
                return Err(NodeError::MetaUnavailable("this node holds no meta replica".into()));
            } else {
                // No local replica: ask the nodes we know of in turn.
                let mut known: Vec<NodeId> = self.meta_view().nodes.keys().copied().collect();
                known.extend(self.inner.config.peers.iter().map(|p| p.0));
                if let Ok(p) = self.inner.extra_peers.lock() {
                    known.extend(p.iter().copied());
                }
                known.sort();
                known.dedup();
                known.retain(|n| *n != self.inner.id);
                if known.is_empty() {
                    return Err(NodeError::Meta("no peers known".into()));
                }
                peer_turn += 1;
                Some(known[peer_turn % known.len()])
            };
            if let Some(to) = target {
                // To the leader: final hop. To any node (we hold no meta replica): it may forward
                // once to its leader.
                let hop = self.inner.host.groups().contains(&META_GROUP);
                let req = Request::Meta { op: op.clone(), forwarded: hop };
                match self
                    .inner
                    .transport
                    .request(to, req.encode(), Duration::from_millis(PEER_REQUEST_TIMEOUT_MS))
                    .await
                {
                    Ok(bytes) => match Response::decode(&bytes) {
                        Ok(Response::Meta { state, answer }) => {
                            let s = meta::decode_state(Some(&state)).map_err(NodeError::Meta)?;
                            self.set_view(s.clone());
                            return Ok((s, answer));
                        }
                        Ok(Response::Invalid(e)) => return Err(NodeError::Meta(e)),
                        Ok(other) => last_err = format!("meta leader {to} answered {other:?}"),
                        Err(e) => last_err = e.to_string(),
                    },
                    Err(e) => last_err = format!("node {to}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(NodeError::MetaUnavailable(format!("timed out: {last_err}")))
    }

    async fn meta_local(&self, op: &MetaOp) -> Result<(MetaState, AdminResponse), MetaTry> {
        let _guard = self.inner.meta_lock.lock().await;
        let g = META_GROUP;
        loop {
            let cur = self.inner.host.get(g, META_STATE_KEY.to_vec(), ReadMode::ReadIndex).await.map_err(meta_try)?;
            let stored = meta::decode_state(cur.as_deref()).map_err(MetaTry::Refused)?;
            let mut state = stored.clone();
            self.overlay_live_reports(&mut state);
            let mut next = state.clone();
            let answer = meta::run_op(op, &mut next, &self.inner.config.balancer).map_err(MetaTry::Refused)?;
            self.inner.stats.meta_ops.fetch_add(1, Ordering::Relaxed);
            // The live reports follow what the op did to them (a report replaces its node's; a
            // split drops the split shard's size and split key).
            if let Ok(mut live) = self.inner.live_reports.lock() {
                if let MetaOp::Report { node, .. } = op {
                    live.insert(*node, (NodeReport::default(), Instant::now()));
                }
                for (node, (report, _)) in live.iter_mut() {
                    if let Some(info) = next.nodes.get(node) {
                        *report = info.report.clone();
                    }
                }
            }
            // A report that changes nothing but reports is kept in memory, not written.
            if matches!(op, MetaOp::Report { .. }) && without_reports(&next) == without_reports(&stored) {
                self.set_view(next.clone());
                return Ok((next, answer));
            }
            if next == state {
                self.set_view(state.clone());
                return Ok((state, answer));
            }
            let bytes = meta::encode_state(&next).map_err(MetaTry::Refused)?;
            self.inner.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
            let cas = KvCommand::Cas { key: META_STATE_KEY.to_vec(), expected: cur, new: Some(bytes) };
            match self.inner.host.write(g, cas).await.map_err(meta_try)? {
                KvResponse::Done { .. } => {
                    self.set_view(next.clone());
                    return Ok((next, answer));
                }
                KvResponse::CasFailed { .. } => continue,
                KvResponse::Refused(e) => return Err(MetaTry::Refused(e)),
                KvResponse::Split { .. } | KvResponse::OutOfRange => {
                    return Err(MetaTry::Refused("an unexpected answer to the meta compare-and-swap".into()))
                }
            }
        }
    }

    /// Replaces every node's stored report with the one this node received as meta leader
    /// within [`LIVE_REPORT_AGE_MAX_MS`], or with an empty report (nothing known) if none:
    /// stored reports are only as fresh as the last meta write, which may be long ago.
    fn overlay_live_reports(&self, state: &mut MetaState) {
        let Ok(live) = self.inner.live_reports.lock() else { return };
        let max_age = Duration::from_millis(LIVE_REPORT_AGE_MAX_MS);
        for (node, info) in state.nodes.iter_mut() {
            info.report = match live.get(node) {
                Some((report, at)) if at.elapsed() < max_age => report.clone(),
                _ => NodeReport::default(),
            };
        }
    }

    /// How long this node has led the meta group without a break, as of the last check
    /// ([`Node::leads_meta`]); `None` if it does not lead it.
    fn meta_tenure(&self) -> Option<Duration> {
        self.inner.meta_leader_since.lock().ok().and_then(|s| s.map(|at| at.elapsed()))
    }

    async fn report(&self, requests_per_s: u64) -> Result<(), NodeError> {
        let report = self.build_report(requests_per_s).await?;
        let op = MetaOp::Report { node: self.inner.id, addr: self.inner.addr.clone(), report };
        self.meta_exec(op, false).await?;
        Ok(())
    }

    /// This node's report: leaders, applied indexes, sizes and split points of led shards.
    async fn build_report(&self, requests_per_s: u64) -> Result<NodeReport, NodeError> {
        let infos = self.inner.host.group_info().await?;
        let mut report = NodeReport { requests_per_s, ..NodeReport::default() };
        for i in infos.iter().filter(|i| i.group != META_GROUP) {
            if i.role == Role::Leader {
                report.leading.push(i.group);
                let m = &i.committed_conf.membership;
                let conf = GroupConf {
                    index: PLogIndex(i.committed_conf.log_id.index.0),
                    voters: m.nodes().into_iter().filter(|n| m.is_voter(*n)).collect(),
                    learners: m.learners.iter().filter(|n| m.is_learner(**n)).copied().collect(),
                    joint: m.is_joint(),
                };
                report.confs.insert(i.group, conf);
            }
            report.applied.insert(i.group, PLogIndex(i.applied.0));
        }
        let threshold = self.inner.config.balancer.split_size_bytes_threshold;
        if let Ok(sizes) = self.inner.sizes.lock() {
            for (shard, c) in sizes.iter().filter(|(s, _)| report.leading.contains(s)) {
                report.shard_bytes.insert(*shard, c.size.bytes);
                if let Some(middle) = c.size.middle.as_ref().filter(|_| c.size.bytes > threshold) {
                    report.split_keys.insert(*shard, middle.clone());
                }
            }
        }
        Ok(report)
    }

    /// Sizes the shards this node leads (their leaders report sizes; followers hold the same
    /// data), in its own task so a long read never delays reports. A shard is re-sized when its
    /// descriptor changed, or when it applied entries since its last check and that check is
    /// `size_check_interval_ms` old. One read stops at [`SIZE_SCAN_BYTES_MAX`] (a larger shard
    /// reports what was read: more than any split threshold, with a split point inside it);
    /// one round reads at most [`SIZE_CHECK_BYTES_PER_ROUND`] in all, the rest wait. Shards no
    /// longer led are forgotten.
    async fn check_sizes(&self) {
        let Ok(infos) = self.inner.host.group_info().await else { return };
        let led: HashMap<ShardId, u64> = infos
            .iter()
            .filter(|i| i.group != META_GROUP && i.role == Role::Leader)
            .map(|i| (i.group, i.applied.0))
            .collect();
        let view = self.meta_view();
        let every = Duration::from_millis(self.inner.config.size_check_interval_ms);
        let due: Vec<(ShardId, Epoch, u64, KeyRange)> = match self.inner.sizes.lock() {
            Ok(mut sizes) => {
                sizes.retain(|s, _| led.contains_key(s));
                led.iter()
                    .filter_map(|(s, a)| {
                        let d = view.map.get(*s)?;
                        let stale = sizes
                            .get(s)
                            .is_none_or(|c| c.epoch != d.epoch || (c.applied != *a && c.at.elapsed() >= every));
                        stale.then(|| (*s, d.epoch, *a, shard_range(d)))
                    })
                    .collect()
            }
            Err(_) => return,
        };
        if due.is_empty() {
            return;
        }
        let node = self.inner.id.0;
        let checked = self
            .inner
            .host
            .store()
            .blocking(move |s| {
                let mut out = Vec::new();
                let mut read = 0u64;
                for (shard, epoch, applied, range) in due {
                    if read >= SIZE_CHECK_BYTES_PER_ROUND {
                        break;
                    }
                    match range_size_blocking(s, &range, SIZE_SCAN_BYTES_MAX) {
                        Ok(size) => {
                            read += size.bytes;
                            out.push((shard, SizeCheck { epoch, applied, at: Instant::now(), size }));
                        }
                        Err(e) => debug!(node, %shard, error = %e, "size check failed"),
                    }
                }
                Ok(out)
            })
            .await;
        if let (Ok(list), Ok(mut sizes)) = (checked, self.inner.sizes.lock()) {
            sizes.extend(list);
        }
    }

    /// Makes sure the meta state lists this node at its address, telling a lower-id peer if it
    /// does not; `true` once it does. Lower ids dial only the nodes the meta state lists, so a
    /// new node, or one back at another address, cannot reach them over the transport until
    /// then: its report goes over a request-only connection under its node certificate
    /// ([`tp::Client::for_node`]), and registers it (or updates its address). This is how a node
    /// joins a running cluster: started with no bootstrap and some peers' addresses.
    async fn announce(&self) -> bool {
        let me = self.inner.id;
        if self.meta_view().nodes.get(&me).is_some_and(|i| i.addr == self.inner.addr) {
            return true;
        }
        let bind = match self.inner.config.listen_addr {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let client = match tp::Client::for_node(&self.inner.config.tls, bind) {
            Ok(c) => c,
            Err(e) => {
                warn!(node = self.inner.id.0, error = %e, "cannot announce this node to its peers");
                return false;
            }
        };
        let timeout = Duration::from_millis(PEER_REQUEST_TIMEOUT_MS);
        // A made-up empty report would tell the meta leader this node holds no replica (and
        // so that its tombstones are done with): announce with a real one or not at all.
        let report = match self.build_report(0).await {
            Ok(r) => r,
            Err(e) => {
                warn!(node = self.inner.id.0, error = %e, "cannot build this node's report to announce it");
                return false;
            }
        };
        let op = MetaOp::Report { node: me, addr: self.inner.addr.clone(), report };
        let body = Request::Meta { op, forwarded: false }.encode();
        let mut done = false;
        for (peer, addr) in self.inner.config.peers.iter().filter(|(p, _)| *p < self.inner.id) {
            let answer = match client.connect(*addr, *peer, timeout).await {
                Ok(conn) => conn.request(body.clone(), timeout).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match answer.map(|b| Response::decode(&b)) {
                Ok(Ok(Response::Meta { state, .. })) => match meta::decode_state(Some(&state)) {
                    Ok(state) => {
                        done = state.nodes.get(&me).is_some_and(|i| i.addr == self.inner.addr);
                        self.set_view(state);
                        if done {
                            info!(node = self.inner.id.0, via = peer.0, addr = %self.inner.addr, "registered with the cluster");
                            break;
                        }
                    }
                    Err(e) => debug!(node = self.inner.id.0, via = peer.0, error = %e, "announce: bad meta state"),
                },
                Ok(Ok(other)) => debug!(node = self.inner.id.0, via = peer.0, answer = ?other, "announce not taken"),
                Ok(Err(e)) => debug!(node = self.inner.id.0, via = peer.0, error = %e, "announce: bad answer"),
                Err(e) => debug!(node = self.inner.id.0, via = peer.0, error = %e, "announce not delivered"),
            }
        }
        client.close().await;
        done
    }

    /// Whether this node leads the meta group; records when it started to (a new meta leader
    /// holds no live reports yet, and forgets the ones of an earlier tenure).
    async fn leads_meta(&self) -> bool {
        let infos = self.inner.host.group_info().await.unwrap_or_default();
        let leads = infos.iter().any(|i| i.group == META_GROUP && i.role == Role::Leader);
        if let Ok(mut since) = self.inner.meta_leader_since.lock() {
            match (leads, since.is_some()) {
                (true, false) => {
                    *since = Some(Instant::now());
                    if let Ok(mut live) = self.inner.live_reports.lock() {
                        live.clear();
                    }
                }
                (false, true) => *since = None,
                _ => {}
            }
        }
        leads
    }

    /// On the meta leader: one balancer round, its proposals carried out. Not in the first
    /// report intervals of a tenure: the nodes' reports must reach the new leader first.
    async fn auto_balance(&self) {
        let settled = Duration::from_millis(3 * self.inner.config.report_interval_ms);
        if !self.leads_meta().await || self.meta_tenure().is_none_or(|t| t < settled) {
            return;
        }
        match self.meta_exec(MetaOp::Rebalance { now_ms: now_ms() }, false).await {
            Ok((_, AdminResponse::Done(what))) if what != meta::NOTHING_TO_BALANCE => {
                info!(node = self.inner.id.0, "balancer: {}", what.replace('\n', "; "))
            }
            Ok(_) => {}
            Err(e) => debug!(node = self.inner.id.0, error = %e, "balancer round not run"),
        }
    }

    /// On the meta leader: runs one step of every replica move plan.
    async fn drive_moves(&self) {
        if !self.leads_meta().await {
            return;
        }
        let state = self.meta_view();
        let now = Instant::now();
        let deadline = Duration::from_millis(self.inner.config.move_step_deadline_ms);
        let overdue: BTreeSet<ShardId> = match self.inner.move_steps.lock() {
            Ok(mut steps) => {
                steps.retain(|shard, _| state.moves.contains_key(shard));
                state
                    .moves
                    .values()
                    .filter(|p| {
                        let (step, since) = steps.entry(p.shard).or_insert((p.step, now));
                        if *step != p.step {
                            *step = p.step;
                            *since = now;
                        }
                        now.duration_since(*since) > deadline
                    })
                    .map(|p| p.shard)
                    .collect()
            }
            Err(_) => BTreeSet::new(),
        };
        for plan in state.moves.values() {
            if overdue.contains(&plan.shard) {
                warn!(shard = %plan.shard, step = ?plan.step, "move step past its deadline; aborting the move");
                let cmd = MetaCommand::AbortMove { shard: plan.shard };
                if let Err(e) = self.meta_exec(MetaOp::Commands(vec![cmd]), false).await {
                    debug!(shard = %plan.shard, error = %e, "move not aborted");
                }
                continue;
            }
            let cmd = match plan.next(&state) {
                Ok(PlanAction::Wait { .. } | PlanAction::WaitRaft { .. }) => continue,
                Ok(_) => MetaCommand::AdvanceMove { shard: plan.shard, step: plan.step },
                Err(e) => {
                    warn!(shard = %plan.shard, error = %e, "move cannot go on; aborting it");
                    MetaCommand::AbortMove { shard: plan.shard }
                }
            };
            if let Err(e) = self.meta_exec(MetaOp::Commands(vec![cmd]), false).await {
                debug!(shard = %plan.shard, error = %e, "move step not taken");
            }
        }
    }

    // ---------------------------------------------------------------- reconciler

    async fn reconcile(&self) {
        if !self.refresh_local_view().await {
            // No local meta replica: fetch the state from the meta leader.
            if let Err(e) = self.meta_exec(MetaOp::Read, false).await {
                debug!(error = %e, "cannot read the meta state");
            }
        }
        let state = self.meta_view();
        let me = self.inner.id;
        for (id, info) in &state.nodes {
            if *id > self.inner.id {
                if let Ok(a) = info.addr.parse::<SocketAddr>() {
                    let _ = self.inner.transport.set_peer_addr(*id, a);
                }
            }
        }
        if state.map.is_empty() {
            return;
        }
        let host = &self.inner.host;
        let local: BTreeSet<GroupId> = host.groups().into_iter().collect();
        let local_ranges: Vec<(GroupId, KeyRange)> =
            local.iter().filter(|g| **g != META_GROUP).filter_map(|g| host.group_range(*g).map(|r| (*g, r))).collect();
        for d in state.map.shards() {
            let Some(r) = d.replica(me) else { continue };
            if local.contains(&d.id) {
                continue;
            }
            // A shard split off a local group is started by the split entry when that group
            // applies it; created earlier, it could apply writes to keys the source group has
            // not finished with (both share one keyspace).
            let range = shard_range(d);
            if local_ranges.iter().any(|(_, lr)| ranges_overlap(lr, &range)) {
                continue;
            }
            // Shards of the bootstrap (ids 1..=S) are formed by all their voters; any other
            // replica — added later, or of a shard born of a split this node did not apply —
            // starts empty and is caught up by its leader (by snapshot where the log lacks the
            // data). Forming a split-born shard here could let two replicas without its data
            // elect each other.
            let bootstrap_shards = self.inner.config.bootstrap.as_ref().map_or(0, |b| b.split_keys.len() as u64 + 1);
            let initial = (d.id.0 <= bootstrap_shards && d.epoch.conf_version == 1 && r.role == ReplicaRole::Voter)
                .then(|| Membership::new(d.voters().map(|n| n)));
            match host.create_group(d.id, shard_range(d), initial).await {
                Ok(()) => info!(node = self.inner.id.0, shard = %d.id, "shard replica created"),
                Err(e) => warn!(node = self.inner.id.0, shard = %d.id, error = %e, "cannot create shard replica"),
            }
        }
        let Ok(infos) = host.group_info().await else { return };
        // A replica is deleted only when its group's committed configuration no longer counts
        // it (see `placement::lifecycle`), never because this view leaves it out.
        for i in infos.iter().filter(|i| i.group != META_GROUP) {
            let fate = replica_fate(me, i.group, &local_replica_of(i, self.inner.id), &state);
            if let ReplicaFate::Delete(why) = fate {
                match host.destroy_group(i.group, true).await {
                    Ok(()) => info!(node = self.inner.id.0, shard = i.group.0, reason = ?why, "shard replica removed"),
                    Err(e) => warn!(shard = i.group.0, error = %e, "cannot remove shard replica"),
                }
            }
        }
        // Splits the map holds that a group this node leads has not carried out yet: propose
        // the split entry (one at a time per group; it is idempotent once applied).
        for i in infos.iter().filter(|i| i.role == Role::Leader && i.group != META_GROUP) {
            let (Some(d), Some(hr)) = (state.map.get(i.group), host.group_range(i.group)) else { continue };
            let Some(at) = d.end.clone() else { continue };
            if !hr.contains(&at) {
                continue;
            }
            let Some(right) = state.map.lookup(&at).filter(|r| r.start == at) else { continue };
            if !self.may_reconfig(i.group, format!("split-{}", right.id.0)) {
                continue;
            }
            let cmd = KvCommand::Split { at: at.clone(), new_group: right.id.0 };
            match host.write(i.group, cmd).await {
                Ok(KvResponse::Split { .. }) => info!(shard = i.group.0, new = %right.id, "shard split"),
                Ok(other) => warn!(shard = i.group.0, answer = ?other, "split refused"),
                Err(e) => debug!(shard = i.group.0, error = %e, "split not done yet"),
            }
        }
        for i in infos.iter().filter(|i| i.role == Role::Leader && i.group != META_GROUP) {
            let Some(d) = state.map.get(i.group) else { continue };
            // A split the map made and the group has not applied yet: a configuration change
            // now would be copied into the split-born group, whose replicas the map took from
            // before the change. Wait for the split (proposed above).
            if host.group_range(i.group).is_some_and(|r| r != shard_range(d)) {
                continue;
            }
            let want: BTreeSet<NodeId> = d.voters().collect();
            // Learners are added for the target of a move only: a voter demoted by a move's
            // swap is a learner in the map until the move removes it, and must not rejoin.
            let target = state.moves.get(&d.id).map(|p| p.to);
            for l in d.replicas.iter().filter(|r| r.role == ReplicaRole::Learner && Some(r.node) == target) {
                if !i.voters.contains(&l.node) && self.may_reconfig(i.group, format!("learner-{}", l.node.0)) {
                    if let Err(e) = host.add_learner(i.group, l.node).await {
                        debug!(shard = i.group.0, error = %e, "add learner");
                    }
                }
            }
            // Learners the map removed (an aborted move): the group stops counting them, which
            // confirms their tombstones so their nodes may delete them.
            let buried = state.tombstones.get(&d.id);
            for l in i.committed_conf.membership.learners.iter().filter(|l| !i.voters.contains(l)) {
                let gone = d.replica(*l).is_none() && buried.is_some_and(|t| t.contains_key(l));
                if gone && self.may_reconfig(i.group, format!("remove-learner-{}", l.0)) {
                    if let Err(e) = host.remove_learner(i.group, *l).await {
                        debug!(shard = i.group.0, error = %e, "remove learner");
                    }
                }
            }
            // A voter of the map the group does not have at all (its Raft configuration came
            // from another source, a split say) joins as a learner first: the group promotes
            // only members that hold its configuration.
            for v in want.iter().filter(|v| !i.committed_conf.membership.contains(**v)) {
                if self.may_reconfig(i.group, format!("learner-{}", v.0)) {
                    if let Err(e) = host.add_learner(i.group, *v).await {
                        debug!(shard = i.group.0, error = %e, "add learner before promotion");
                    }
                }
            }
            if want != i.voters && !want.is_empty() && self.may_reconfig(i.group, format!("voters-{want:?}")) {
                match host.change_membership(i.group, want.clone()).await {
                    Ok(_) => info!(shard = i.group.0, voters = ?want, "voters changed"),
                    Err(e) => debug!(shard = i.group.0, error = %e, "change membership"),
                }
            }
            if let Some(target) = state.transfers.get(&d.id) {
                if *target != self.inner.id
                    && i.voters.contains(&target)
                    && self.may_reconfig(i.group, format!("transfer-{}", target.0))
                {
                    if let Err(e) = host.transfer_leader(i.group, *target).await {
                        debug!(shard = i.group.0, error = %e, "transfer leader");
                    }
                }
            }
        }
    }

    fn may_reconfig(&self, shard: GroupId, what: String) -> bool {
        let Ok(mut m) = self.inner.reconfig.lock() else { return false };
        let now = Instant::now();
        match m.get(&(shard, what.clone())) {
            Some(t) if now.duration_since(*t) < Duration::from_millis(RECONFIG_RETRY_MS) => false,
            _ => {
                m.insert((shard, what), now);
                true
            }
        }
    }

    // ---------------------------------------------------------------- serving

    async fn serve(&self, req: IncomingRequest) {
        let IncomingRequest { from, body, responder } = req;
        let resp = match Request::decode(&body) {
            Ok(r) => self.handle(&from, r).await,
            Err(e) => {
                self.inner.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                Response::Invalid(format!("bad request: {e}"))
            }
        };
        self.inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        if matches!(
            resp,
            Response::NotLeader { .. }
                | Response::StaleEpoch { .. }
                | Response::WrongShard { .. }
                | Response::UnknownShard
                | Response::OutOfRange { .. }
        ) {
            self.inner.stats.redirects.fetch_add(1, Ordering::Relaxed);
        }
        responder.respond(resp.encode());
    }

    /// Answers one request (also usable in-process).
    pub async fn handle(&self, from: &PeerIdentity, req: Request) -> Response {
        match req {
            Request::Get { shard, epoch, key, consistency } => {
                if let Err(e) = check_user_key(&key) {
                    return Response::Invalid(e);
                }
                if let Err(r) = self.route(shard, epoch, &key).await {
                    return r;
                }
                if consistency == ReadConsistency::Stale {
                    let sm = match self.local_replica(shard).await {
                        Ok(sm) => sm,
                        Err(r) => return r,
                    };
                    // The replica's own range, which a split narrows before this node's map
                    // may show it: the key may live in another shard now.
                    if !sm.range().contains(&key) {
                        return Response::OutOfRange { shard };
                    }
                    return match sm.get(key).await {
                        Ok(v) => Response::Value(v),
                        Err(e) => Response::Unavailable(e.to_string()),
                    };
                }
                match self.inner.host.get(shard, key, read_mode(consistency)).await {
                    Ok(v) => Response::Value(v),
                    Err(e) => self.host_error(e, false),
                }
            }
            Request::Put { shard, epoch, key, value } => {
                if let Err(e) = check_user_key(&key).and_then(|_| check_value(&value)) {
                    return Response::Invalid(e);
                }
                self.write(shard, epoch, KvCommand::Put { key, value }).await
            }
            Request::Delete { shard, epoch, key } => {
                if let Err(e) = check_user_key(&key) {
                    return Response::Invalid(e);
                }
                self.write(shard, epoch, KvCommand::Delete { key }).await
            }
            Request::Cas { shard, epoch, key, expected, new } => {
                let sizes = expected.iter().chain(new.iter()).try_for_each(|v| check_value(v));
                if let Err(e) = check_user_key(&key).and(sizes) {
                    return Response::Invalid(e);
                }
                self.write(shard, epoch, KvCommand::Cas { key, expected, new }).await
            }
            Request::Scan { shard, epoch, start, end, limit, consistency } => {
                // A page of no pairs that says "more" could not move a scan on.
                if limit == 0 {
                    return Response::Invalid("a scan's limit must be at least 1".into());
                }
                let limit = (limit as usize).min(SCAN_LIMIT_MAX);
                let d = match self.route_shard(shard, epoch).await {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                // From the shard's first user key at the earliest (the map's first shard starts
                // at the empty key, its replica after the reserved meta prefix).
                let first = shard_range(&d).start;
                let from = if start < first { first } else { start };
                if let Err(r) = self.route_key(&d, &from) {
                    return r;
                }
                // Never past the shard's end in the map: what lies beyond is another shard's,
                // even while this replica's range (not split yet) still covers it.
                let end = match (end, d.end) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                // The replica refuses a start outside its range now and bounds the page by it:
                // a split may have narrowed it before this node's map shows the split.
                let page = if consistency == ReadConsistency::Stale {
                    let sm = match self.local_replica(shard).await {
                        Ok(sm) => sm,
                        Err(r) => return r,
                    };
                    match sm.scan(from, end, limit).await {
                        Ok(page) => page,
                        Err(ScanError::OutOfRange(_)) => return Response::OutOfRange { shard },
                        Err(ScanError::Storage(e)) => return Response::Unavailable(e.to_string()),
                    }
                } else {
                    match self.inner.host.scan(shard, from, end, limit, read_mode(consistency)).await {
                        Ok(page) => page,
                        Err(e) => return self.host_error(e, false),
                    }
                };
                cut_scan(page)
            }
            Request::ClusterView { fresh } => {
                let state = if fresh {
                    match self.meta_exec(MetaOp::Read, false).await {
                        Ok((s, _)) => Arc::new(s),
                        Err(e) => return Response::Unavailable(e.to_string()),
                    }
                } else {
                    self.meta_view()
                };
                Response::View(view_of(&state))
            }
            Request::Admin(a) => {
                // Report ages are known only on the meta leader: a client's node/status
                // request is answered there (one hop; a node never forwards a node's request).
                if matches!(a, AdminRequest::Nodes | AdminRequest::Status) && !matches!(from, PeerIdentity::Node(_)) {
                    if let Some(leader) = self.meta_leader_elsewhere().await {
                        let req = Request::Admin(a.clone());
                        let timeout = Duration::from_millis(PEER_REQUEST_TIMEOUT_MS);
                        if let Ok(bytes) = self.inner.transport.request(leader, req.encode(), timeout).await {
                            if let Ok(resp @ Response::Admin(_)) = Response::decode(&bytes) {
                                return resp;
                            }
                        }
                    }
                }
                self.admin(a).await
            }
            Request::Meta { op, forwarded } => {
                if !matches!(from, PeerIdentity::Node(_)) {
                    return Response::Invalid("meta operations are for nodes; use admin requests".into());
                }
                match self.meta_exec(op, forwarded).await {
                    Ok((state, answer)) => match meta::encode_state(&state) {
                        Ok(state) => Response::Meta { state, answer },
                        Err(e) => Response::Unavailable(e),
                    },
                    Err(NodeError::Meta(e)) => Response::Invalid(e),
                    Err(e) => Response::Unavailable(e.to_string()),
                }
            }
        }
    }

    /// A reader of this node's replica of `shard` for stale reads: its applied state, however
    /// far behind, but only once the replica has joined its group (applied from its leader's
    /// snapshot or log). A replica created empty and not caught up yet holds none of the
    /// shard's data: it answers `Unavailable` rather than "no such key".
    async fn local_replica(&self, shard: ShardId) -> Result<KvStateMachine, Response> {
        let sm = self.inner.host.state_machine(shard).ok_or(Response::UnknownShard)?;
        match sm.has_joined(self.inner.id).await {
            Ok(true) => Ok(sm),
            Ok(false) => Err(Response::Unavailable(format!(
                "the replica of shard {shard} on node {} has not caught up with its group yet: read from the leader",
                self.inner.id
            ))),
            Err(e) => Err(Response::Unavailable(e.to_string())),
        }
    }

    async fn write(&self, shard: ShardId, epoch: crate::placement::Epoch, cmd: KvCommand) -> Response {
        if let Err(r) = self.route(shard, epoch, cmd.key()).await {
            return r;
        }
        match self.inner.host.write(shard, cmd).await {
            Ok(KvResponse::Done { previous }) => Response::Written { previous },
            Ok(KvResponse::CasFailed { current }) => Response::CasFailed { current },
            Ok(KvResponse::Refused(e)) => Response::Invalid(e),
            Ok(KvResponse::Split { .. }) => Response::Invalid("a write answered as a split".into()),
            // A split applied between the routing check and the command; nothing changed.
            Ok(KvResponse::OutOfRange) => Response::OutOfRange { shard },
            Err(e) => self.host_error(e, true),
        }
    }

    /// Checks a request's routing against this node's map (re-reading it once on a mismatch,
    /// in case the client saw a newer map).
    async fn route_shard(
        &self,
        shard: ShardId,
        epoch: crate::placement::Epoch,
    ) -> Result<crate::placement::ShardDescriptor, Response> {
        for attempt in 0..2 {
            let view = self.meta_view();
            match view.map.get(shard) {
                Some(d) if d.epoch == epoch => return Ok(d.clone()),
                Some(d) if attempt == 1 => return Err(Response::StaleEpoch { descriptor: d.clone() }),
                None if attempt == 1 => return Err(Response::UnknownShard),
                _ => {
                    self.refresh_local_view().await;
                }
            }
        }
        Err(Response::UnknownShard)
    }

    async fn route(&self, shard: ShardId, epoch: crate::placement::Epoch, key: &[u8]) -> Result<(), Response> {
        let d = self.route_shard(shard, epoch).await?;
        self.route_key(&d, key)
    }

    /// Checks that `key` is in the shard `d` (as this node's map has it).
    fn route_key(&self, d: &crate::placement::ShardDescriptor, key: &[u8]) -> Result<(), Response> {
        if !d.contains(key) {
            return match self.meta_view().map.lookup(key) {
                Some(owner) => Err(Response::WrongShard { owner: owner.clone() }),
                None => Err(Response::UnknownShard),
            };
        }
        Ok(())
    }

    fn host_error(&self, e: HostError, write: bool) -> Response {
        match e {
            HostError::UnknownGroup(_) => Response::UnknownShard,
            HostError::Raft(RaftError::NotLeader { leader }) => {
                let addr = leader.and_then(|l| self.meta_view().nodes.get(&l).map(|n| n.addr.clone()));
                Response::NotLeader { leader: leader.map(|l| l), addr }
            }
            // The replica's range narrowed (a split) while this node's map still routes the
            // key here: the client must look for a newer map, not retry here.
            HostError::KeyOutOfRange(g) => Response::OutOfRange { shard: g },
            // Refused before the command entered the log, or its entry was replaced: nothing
            // was applied, and the client may retry.
            e @ (HostError::Stopped
            | HostError::TooLarge(_)
            | HostError::Raft(
                RaftError::ChangeInProgress | RaftError::TransferInProgress | RaftError::Dropped { .. },
            )) => Response::Unavailable(e.to_string()),
            // Anything else may have happened after the write was proposed (a timeout, the
            // group stopping or failing with it pending): its outcome is unknown.
            e if write => Response::Unknown(e.to_string()),
            other => Response::Unavailable(other.to_string()),
        }
    }

    async fn admin(&self, a: AdminRequest) -> Response {
        let read = |s: Result<(MetaState, AdminResponse), NodeError>| s.map(|(s, _)| s);
        let answer = |r: Result<(MetaState, AdminResponse), NodeError>| match r {
            Ok((_, a)) => Response::Admin(a),
            Err(NodeError::Meta(e)) => Response::Invalid(e),
            Err(e) => Response::Unavailable(e.to_string()),
        };
        match a {
            AdminRequest::Nodes | AdminRequest::Shards | AdminRequest::Status => {
                let state = match read(self.meta_exec(MetaOp::Read, false).await) {
                    Ok(s) => s,
                    Err(e) => return Response::Unavailable(e.to_string()),
                };
                match a {
                    AdminRequest::Nodes => Response::Admin(AdminResponse::Nodes(self.node_rows(&state))),
                    AdminRequest::Shards => Response::Admin(AdminResponse::Shards(shard_rows(&state))),
                    _ => {
                        let rows = self.node_rows(&state);
                        let live = rows.iter().filter(|r| r.report_age_ms.is_some_and(|a| a < 5_000)).count();
                        let shards = shard_rows(&state);
                        let meta_leader = self
                            .inner
                            .host
                            .group_info()
                            .await
                            .ok()
                            .and_then(|v| v.into_iter().find(|i| i.group == META_GROUP))
                            .and_then(|i| i.leader)
                            .map(|l| l);
                        Response::Admin(AdminResponse::Status(StatusReport {
                            nodes: rows.len(),
                            nodes_live: live,
                            shards: shards.len(),
                            shards_with_leader: shards.iter().filter(|s| s.leader.is_some()).count(),
                            moves: state.moves.len(),
                            meta_leader,
                        }))
                    }
                }
            }
            AdminRequest::Split { key } => {
                if let Err(e) = check_user_key(&key) {
                    return Response::Invalid(e);
                }
                answer(self.meta_exec(MetaOp::SplitAt { key }, false).await)
            }
            AdminRequest::Move { shard, from, to } => {
                // The meta leader's state: its reports say who leads the shard now.
                let state = match read(self.meta_exec(MetaOp::Read, false).await) {
                    Ok(s) => s,
                    Err(e) => return Response::Unavailable(e.to_string()),
                };
                let Some(d) = state.map.get(shard) else { return Response::Invalid(format!("no shard {shard}")) };
                let leads = state.nodes.get(&from).is_some_and(|n| n.report.leading.contains(&shard));
                let plan = crate::placement::MovePlan::new(
                    shard,
                    from,
                    to,
                    leads.then_some(to),
                    self.inner.config.balancer.catch_up_lag_entries_max,
                );
                let now_ms = now_ms();
                let cmd = MetaCommand::StartMove { epoch: d.epoch, plan, now_ms };
                answer(self.meta_exec(MetaOp::Commands(vec![cmd]), false).await)
            }
            AdminRequest::TransferLeader { shard, node } => {
                let state = self.meta_view();
                let Some(d) = state.map.get(shard) else { return Response::Invalid(format!("no shard {shard}")) };
                let cmd = MetaCommand::TransferLeader { shard, epoch: d.epoch, node };
                answer(self.meta_exec(MetaOp::Commands(vec![cmd]), false).await)
            }
            AdminRequest::Rebalance => answer(self.meta_exec(MetaOp::Rebalance { now_ms: now_ms() }, false).await),
            AdminRequest::AddNode { node, addr } => {
                if node.0 == 0 {
                    return Response::Invalid("node ids start at 1".into());
                }
                if let Err(e) = addr.parse::<SocketAddr>() {
                    return Response::Invalid(format!("{addr:?} is not an address like 127.0.0.1:7004: {e}"));
                }
                answer(self.meta_exec(MetaOp::Commands(vec![MetaCommand::RegisterNode { node, addr }]), false).await)
            }
            AdminRequest::Drain { node, draining } => {
                answer(self.meta_exec(MetaOp::Commands(vec![MetaCommand::SetDraining { node, draining }]), false).await)
            }
        }
    }

    /// The meta group's leader when it is another node (as this node's replica knows it).
    async fn meta_leader_elsewhere(&self) -> Option<NodeId> {
        let infos = self.inner.host.group_info().await.ok()?;
        let leader = infos.into_iter().find(|i| i.group == META_GROUP)?.leader?;
        (leader != self.inner.id).then_some(leader)
    }

    fn node_rows(&self, state: &MetaState) -> Vec<NodeRow> {
        let reports = self.inner.reports.lock().map(|r| r.clone()).unwrap_or_default();
        state
            .nodes
            .values()
            .map(|n| NodeRow {
                node: n.id,
                addr: n.addr.clone(),
                replicas: state.map.shards().filter(|d| d.replica(n.id).is_some()).count(),
                leading: n.report.leading.len(),
                requests_per_s: n.report.requests_per_s,
                draining: n.draining,
                report_age_ms: reports.get(&n.id).map(|t| t.elapsed().as_millis() as u64),
            })
            .collect()
    }
}

enum MetaTry {
    /// Not the meta leader; the leader if known.
    Leader(Option<NodeId>),
    /// Refused by the op or state: final.
    Refused(String),
    /// Transient failure.
    Retry(String),
}

fn meta_try(e: HostError) -> MetaTry {
    match e {
        HostError::Raft(RaftError::NotLeader { leader }) => MetaTry::Leader(leader),
        other => MetaTry::Retry(other.to_string()),
    }
}

/// Cuts a scan page to [`SCAN_RESPONSE_BYTES_MAX`] (keeping at least one pair); a page cut
/// short says "more", so the client continues after its last pair.
fn cut_scan(page: ScanPage) -> Response {
    let ScanPage { mut pairs, end } = page;
    let mut total = 0usize;
    let mut keep = pairs.len();
    for (i, (k, v)) in pairs.iter().enumerate() {
        total += k.len() + v.len();
        if total > SCAN_RESPONSE_BYTES_MAX && i > 0 {
            keep = i;
            break;
        }
    }
    if keep < pairs.len() {
        pairs.truncate(keep);
        return Response::Page { pairs, end: WireScanEnd::More };
    }
    let end = match end {
        ScanEnd::More => WireScanEnd::More,
        ScanEnd::Covered(e) => WireScanEnd::Covered(e),
    };
    Response::Page { pairs, end }
}

fn read_mode(c: ReadConsistency) -> ReadMode {
    match c {
        ReadConsistency::Linearizable => ReadMode::ReadIndex,
        ReadConsistency::Lease => ReadMode::Lease,
        // Never reaches the host's read path (served from the local replica).
        ReadConsistency::Stale => ReadMode::ReadIndex,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The client's view of a meta state.
pub fn view_of(state: &MetaState) -> ClusterView {
    ClusterView { map: state.map.clone(), nodes: state.nodes.values().map(|n| (n.id, n.addr.clone())).collect() }
}

fn shard_rows(state: &MetaState) -> Vec<ShardRow> {
    state
        .map
        .shards()
        .map(|d| {
            let leader = d
                .replicas
                .iter()
                .map(|r| r.node)
                .find(|n| state.nodes.get(n).is_some_and(|i| i.report.leading.contains(&d.id)));
            let applied = d
                .replicas
                .iter()
                .filter_map(|r| {
                    state.nodes.get(&r.node).and_then(|i| i.report.applied.get(&d.id)).map(|a| (r.node, a.0))
                })
                .collect();
            let bytes =
                state.nodes.values().filter_map(|i| i.report.shard_bytes.get(&d.id)).copied().max().unwrap_or(0);
            let moving = state.moves.get(&d.id).map(|p| format!("{} -> {} at {:?}", p.from, p.to, p.step));
            ShardRow { descriptor: d.clone(), leader, applied, bytes, moving }
        })
        .collect()
}

/// What a local replica knows of its own group, for [`replica_fate`].
fn local_replica_of(i: &crate::shard::GroupInfo, me: NodeId) -> LocalReplica {
    let m = &i.committed_conf.membership;
    let committed = (!m.nodes().is_empty()).then(|| (PLogIndex(i.committed_conf.log_id.index.0), m.contains(me)));
    LocalReplica { committed, newest_conf: PLogIndex(i.newest_conf.0) }
}

/// Whether view `a` is older than view `b`: it allocated fewer shard ids, or some shard is at
/// an older epoch. Both come from one history (the meta group's), so no view is older in one
/// shard and newer in another.
fn is_older(a: &MetaState, b: &MetaState) -> bool {
    a.next_shard_id < b.next_shard_id
        || a.map.shards().any(|d| {
            b.map
                .get(d.id)
                .is_some_and(|o| (d.epoch.version, d.epoch.conf_version) < (o.epoch.version, o.epoch.conf_version))
        })
}

/// `state` with every node's report emptied: what a report alone does not change.
fn without_reports(state: &MetaState) -> MetaState {
    let mut s = state.clone();
    for info in s.nodes.values_mut() {
        info.report = NodeReport::default();
    }
    s
}

/// Whether two key ranges share a key.
fn ranges_overlap(a: &KeyRange, b: &KeyRange) -> bool {
    let a_starts_before_b_ends = b.end.as_ref().is_none_or(|e| a.start < *e);
    let b_starts_before_a_ends = a.end.as_ref().is_none_or(|e| b.start < *e);
    a_starts_before_b_ends && b_starts_before_a_ends
}
