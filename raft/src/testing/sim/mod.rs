//! Deterministic simulation of whole Raft clusters in one thread.
//!
//! One seed decides everything: the configuration, the network's drops, duplicates, delays
//! (and so reordering) and partitions, which nodes crash and what part of their unsynced
//! writes survives, the clients' operations, membership changes, leadership transfers and
//! snapshots. Time is virtual. [`run`] plays one seed and checks, after every step, the Raft
//! safety properties (one leader per term, log matching, leader completeness, state-machine
//! safety, commits only by a durable quorum of the configuration, one configuration change at a
//! time), then the clients' history for linearizability ([`super::linearizability`]).
//!
//! A failure carries its seed and the last steps of the run; `run(seed, ..)` replays it exactly.
//!
//! This file holds the options, the report, the simulated cluster and its event loop; the
//! rest has a room each: `actions.rs` (a node's actions carried out), `disk.rs` (durable
//! storage and what a crash keeps), `nemesis.rs` (faults, pauses, reconfiguration),
//! `clients.rs` (operations and the final healing), `checks.rs` (the safety properties).

use super::kv::{apply_kv, KvCommand};
use super::linearizability::{check_history, Op, OpInput, OpOutput};
use crate::config::Config;
use crate::engine::{Action, Engine, InitialState, IoId, ReadMode, Role};
use crate::entry::{Entry, EntryPayload};
use crate::error::RaftError;
use crate::membership::{Membership, StoredMembership};
use crate::message::{Message, MessageBody};
use crate::storage::{Snapshot, SnapshotMeta};
use crate::types::{LogId, LogIndex, Millis, NodeId, Term, Vote};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

mod actions;
mod checks;
mod clients;
mod disk;
mod lease_edge;
mod nemesis;

use disk::{decode_map, encode_map, snapshot_bytes, snapshot_map, Disk, Write};
use lease_edge::LeaseEdge;

/// The simulator's RNG (SplitMix64): small, fast, and the same on every platform.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    /// A random element.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.range(0, items.len() as u64) as usize])
        }
    }
}

/// Engine bugs a simulation can switch on to prove it catches them (feature `sim-bugs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// Commit an entry of an earlier term by counting replicas (Raft §5.4.2, figure 8).
    pub commit_old_term_by_count: bool,
    /// Grant votes without the candidate's log being at least as up-to-date (§5.4.1).
    pub vote_without_log_check: bool,
    /// Serve reads on the leader at once, without ReadIndex or a lease.
    pub read_without_read_index: bool,
    /// Vote for a candidate while still within the promise to a live leader (the followers'
    /// half of the leader lease).
    pub vote_within_promise: bool,
    /// Keep serving lease reads after a `TimeoutNow` went out (its target's election ignores
    /// the followers' promise).
    pub lease_after_timeout_now: bool,
    /// Acknowledge (and count) appended entries before they are durable.
    pub ack_before_durable: bool,
    /// Let the leader lease outlast the followers' promise by the clock-drift margin
    /// (`election_timeout_ms_min + lease_clock_drift_ms` instead of `-`).
    pub lease_past_drift_margin: bool,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Steps (events processed) before the final healing phase.
    pub steps: usize,
    /// Nodes in the pool (the first three start as voters, the others are spares).
    pub nodes: u64,
    /// Concurrent clients.
    pub clients: u64,
    /// Keys the clients work on.
    pub keys: u64,
    /// Inject faults (partitions, crashes, drops, ...).
    pub faults: bool,
    /// Change membership, transfer leadership and take snapshots during the run.
    pub reconfigure: bool,
    /// Bugs to switch on in the engine (needs the `sim-bugs` feature to have any effect).
    pub bugs: InjectedBugs,
    /// Largest clock rate error of a node, in parts per million (with `faults`).
    pub clock_drift_ppm_max: u64,
    /// Steer the schedule toward reads racing leader changes (see [`SimOptions::read_races`]).
    pub read_races: bool,
    /// Steer the schedule to the end of leader leases (see [`SimOptions::lease_edges`]).
    pub lease_edges: bool,
    /// Serve a lease read, when [`Engine::local_read_end`](crate::Engine::local_read_end)
    /// allows it at the node's clock, from the node's state machine the moment it arrives
    /// (the rule of [`LeaseGate`](crate::LeaseGate): no call into the engine) instead of
    /// through `Engine::read`.
    pub local_reads: bool,
}

impl SimOptions {
    /// A profile whose schedules aim at the read path: most operations are reads, on two
    /// keys, sent to the node a client last knew as leader (often a deposed one); leaders
    /// are paused (a process stop: no timers, no messages, then everything at once),
    /// isolated and asked to transfer leadership far more often; every clock runs at the
    /// edge of the allowed drift, half fast and half slow; and a paused leader is sent lease
    /// reads the moment it resumes, before it hears of any newer term. A read served from a
    /// lease that no longer holds, or by a leader that was deposed, shows up as a stale read
    /// in the history.
    pub fn read_races() -> SimOptions {
        SimOptions { clients: 6, keys: 2, read_races: true, ..SimOptions::default() }
    }

    /// A profile that plays, again and again, the race at the end of a leader's lease
    /// (`lease_edge.rs`): the leader is isolated right after a heartbeat round, a rival is
    /// elected the moment the followers' promise allows and writes, and the old leader is then
    /// asked for lease reads. Clocks are at the edge of the allowed drift, as in
    /// [`SimOptions::read_races`]; one key, so that every read can see the rival's write. A
    /// lease that outlives the promise, by the drift margin or less, shows up as a stale read.
    pub fn lease_edges() -> SimOptions {
        SimOptions { clients: 6, keys: 1, lease_edges: true, ..SimOptions::default() }
    }
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            steps: 3000,
            nodes: 5,
            clients: 4,
            keys: 3,
            faults: true,
            reconfigure: true,
            bugs: InjectedBugs::default(),
            clock_drift_ppm_max: CLOCK_DRIFT_PPM_MAX,
            read_races: false,
            lease_edges: false,
            local_reads: false,
        }
    }
}

/// What a successful run did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Events processed.
    pub steps: usize,
    /// Virtual time at the end, in ms.
    pub virtual_ms: u64,
    /// Client operations that completed.
    pub ops_ok: usize,
    /// Client operations with an unknown outcome (timeouts, crashes).
    pub ops_unknown: usize,
    /// Client operations that definitely failed (not leader, overwritten).
    pub ops_failed: usize,
    /// Terms in which a leader was elected.
    pub leaders_elected: usize,
    /// Node crashes.
    pub crashes: usize,
    /// Snapshots installed on followers.
    pub snapshots_installed: usize,
    /// Snapshots a follower refused as corrupt.
    pub snapshots_refused: usize,
    /// Snapshot chunks corrupted in flight.
    pub chunks_corrupted: usize,
    /// Configuration changes committed.
    pub membership_changes: usize,
    /// Messages dropped by the network.
    pub dropped_msgs: usize,
    /// Lease-edge races played to the end: a rival elected at the end of the followers'
    /// promise wrote, and the old leader was asked for lease reads (`SimOptions::lease_edges`).
    pub lease_edge_races: usize,
    /// Lease reads served from a state machine without the engine
    /// ([`SimOptions::local_reads`]).
    pub local_reads: usize,
}

/// A failed run: a safety violation, a non-linearizable history, or no progress after healing.
#[derive(Clone, Debug)]
pub struct SimFailure {
    /// The seed that replays it.
    pub seed: u64,
    /// What went wrong.
    pub message: String,
    /// The last steps before the failure.
    pub trace: Vec<String>,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "simulation failed with seed {}: {}", self.seed, self.message)?;
        writeln!(f, "last {} steps:", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay: SEED={} cargo test -p flotilla-raft --features testing --test sim -- --nocapture", self.seed)
    }
}

/// Default largest clock rate error per node (4%): two nodes drift apart by at most 8%, i.e.
/// 12 ms per 150 ms election timeout, inside the 20 ms the lease allows for
/// (`lease_clock_drift_ms`).
pub const CLOCK_DRIFT_PPM_MAX: u64 = 40_000;

/// Steps kept for the failure trace.
const TRACE_LINES_MAX: usize = 400;
/// A client gives up on an operation after this long (its outcome is then unknown).
const CLIENT_TIMEOUT_MS: u64 = 2_000;
/// After the faults stop, a write must commit within this long.
const HEAL_DEADLINE_MS: u64 = 60_000;

struct SimNode {
    id: NodeId,
    engine: Option<Engine>,
    /// Bumped at every crash: completions of writes issued before are ignored.
    incarnation: u64,
    /// What survives a crash.
    disk: Disk,
    /// Durable plus unsynced writes: what reads see.
    view: Disk,
    /// Writes issued but not yet durable, oldest first.
    unsynced: VecDeque<(IoId, Write)>,
    /// Completion time of the newest write: writes complete in order.
    io_free_at: u64,
    sm: BTreeMap<String, String>,
    sm_applied: LogId,
    /// The applied index of the state machine's last checkpoint (`disk.checkpoint`).
    checkpointed: LogIndex,
    /// Snapshots built for transfers, by id. Volatile: a crash loses them, as a real node
    /// loses its scratch files.
    built: BTreeMap<u64, Snapshot>,
    receiving: Vec<u8>,
    snapshots_built: u64,
    /// Reads confirmed by the engine, waiting for the state machine: (op, index).
    reads: Vec<(usize, LogIndex)>,
    /// The role seen after the last step (to notice elections).
    last_role: Role,
    last_committed: LogIndex,
    /// Log checked for configuration entries up to here (leaders only).
    configs_scanned: LogIndex,
    /// Clock drift: this node's clock runs this many parts per million fast (or slow).
    rate_ppm: i64,
    /// Paused (stopped like SIGSTOP) until this global time: its timers and deliveries wait.
    paused_until: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpState {
    Pending,
    Done,
    Failed,
    Unknown,
}

struct ClientOp {
    op: Op,
    state: OpState,
}

struct Client {
    id: u64,
    busy: Option<usize>,
    guess: NodeId,
    counter: u64,
}

#[derive(Debug)]
enum Event {
    Deliver(Message),
    IoDone {
        node: NodeId,
        incarnation: u64,
        io: IoId,
    },
    Restart(NodeId),
    Resume(NodeId),
    /// Cut this node off from everyone (the second half of `Sim::cut_then_isolate`).
    Isolate(NodeId),
    ClientTimeout(usize),
    /// An idle client writes at `node` (`write`) or lease-reads there: the steered race of a
    /// late transfer (see `Sim::resume`).
    SteerOp {
        node: NodeId,
        write: bool,
    },
}

/// One simulation.
struct Sim {
    seed: u64,
    opts: SimOptions,
    rng: SimRng,
    /// Draws for snapshot faults and compaction settings, apart from `rng` so that adding
    /// them left every seed's other choices as they were.
    snapshot_rng: SimRng,
    config: std::sync::Arc<Config>,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    nodes: BTreeMap<NodeId, SimNode>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    drop_p: f64,
    dup_p: f64,
    /// The state machine checkpoints every this many applied entries (0: never).
    checkpoint_every: u64,
    delay_ms_max: u64,
    disk_ms_max: u64,
    clients: Vec<Client>,
    history: Vec<ClientOp>,
    /// Writes proposed and not yet applied: (node, index) -> (op, term).
    pending_writes: HashMap<(NodeId, LogIndex), (usize, Term)>,
    /// Every entry any node applied: index -> (term, payload). State-machine safety.
    applied: BTreeMap<LogIndex, (Term, EntryPayload)>,
    /// Every entry any leader committed: index -> term. Checked against new leaders' logs.
    committed: BTreeMap<LogIndex, Term>,
    /// The term of the first leader seen committing each entry of `committed`.
    committed_in: BTreeMap<LogIndex, Term>,
    /// Leader per term.
    leaders: BTreeMap<Term, NodeId>,
    trace: VecDeque<String>,
    report: SimReport,
    faults_on: bool,
    /// Transfer targets paused past the transfer's deadline -> the leader that asked.
    late_transfers: BTreeMap<NodeId, NodeId>,
    /// Until this global time clients only read.
    reads_only_until: u64,
    /// Until this global time clients only read at this node (an isolated leader whose
    /// lease is being tested: a write there would block its client until timeout).
    reads_only_on: Option<(NodeId, u64)>,
    /// The lease-edge race being played (`SimOptions::lease_edges`).
    lease_edge: Option<LeaseEdge>,
}

type Check = Result<(), String>;

/// Plays one seed.
pub fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, SimFailure> {
    let mut sim = Sim::new(seed, opts.clone());
    match sim.play() {
        Ok(()) => Ok(sim.report),
        Err(message) => Err(SimFailure { seed, message, trace: sim.trace.into_iter().collect() }),
    }
}

impl Sim {
    fn new(seed: u64, opts: SimOptions) -> Sim {
        let mut rng = SimRng::new(seed);
        let mut snapshot_rng = SimRng::new(seed ^ 0x5eed_5eed_5eed_5eed);
        let pre_vote = rng.chance(0.7);
        let (inflight, append_bytes, append_entries, cache_bytes) = (
            rng.range(1, 9) as usize,
            rng.range(100, 4096) as usize,
            *rng.pick(&[1usize, 1, 2, 4, 16]).expect("non-empty"),
            *rng.pick(&[0usize, 512, 64 << 10]).expect("non-empty"),
        );
        // How often the state machine checkpoints (0: never, so the log is never purged).
        let checkpoint_every = *rng.pick(&[0u64, 15, 40]).expect("non-empty");
        let log_keep = rng.range(0, 8);
        let mut config = Config {
            election_timeout_ms_min: 150,
            election_timeout_ms_max: 300,
            heartbeat_interval_ms: 30,
            pre_vote,
            check_quorum: true,
            inflight_msgs_max: inflight,
            // Derived, not drawn, so every seed keeps the configuration it had: with a wide
            // window, the byte bound (two full appends) is what stops the leader.
            inflight_bytes_max: if inflight > 4 { 2 * append_bytes } else { 0 },
            append_bytes_max: append_bytes,
            append_entries_max: append_entries,
            entry_cache_bytes_max: cache_bytes,
            log_keep_entries: log_keep,
            log_lag_entries_max: 50_000,
            log_purge_step_entries: 1,
            snapshot_chunk_bytes: rng.range(16, 256) as usize,
            snapshot_chunks_in_flight_max: rng.range(1, 4) as usize,
            snapshot_resend_ms: 200,
            lease_read: true,
            lease_clock_drift_ms: 20,
            transfer_timeout_ms: 300,
            api_timeout_ms: 5000,
            votes_need_configuration: false,
            uncommitted_bytes_max: 0,
            // Derived from the seed, not drawn, so the draws above stay what they were. A third
            // of the seeds hold commit notices back, for a third of a heartbeat interval or
            // for a whole one (as the shard host does); the others, the regression seeds
            // among them, send them at once.
            commit_notice_delay_ms: match seed % 6 {
                2 => 10,
                5 => 30,
                _ => 0,
            },
            // Derived too: three seeds in five send the rounds only reads asked for to a
            // quorum (as the shard host does); the regression seeds (1 and 3 modulo 5) do not.
            read_rounds_to_quorum: matches!(seed % 5, 0 | 2 | 4),
            #[cfg(feature = "sim-bugs")]
            bugs: Default::default(),
        };
        // Drawn last, so the seeds' other choices stay what they were.
        config.votes_need_configuration = rng.chance(0.5);
        config.log_purge_step_entries = snapshot_rng.range(1, 6);
        config.log_lag_entries_max = *snapshot_rng.pick(&[0u64, 5, 50_000]).expect("non-empty");
        #[cfg(feature = "sim-bugs")]
        {
            config.bugs = opts.bugs;
        }
        let (drop_p, dup_p, delay_ms_max) = if opts.faults {
            (rng.range(0, 6) as f64 / 100.0, rng.range(0, 4) as f64 / 100.0, rng.range(1, 12))
        } else {
            (0.0, 0.0, 2)
        };
        let disk_ms_max = rng.range(1, 6);
        let config = std::sync::Arc::new(config);
        let mut nodes = BTreeMap::new();
        for i in 1..=opts.nodes {
            let id = NodeId(i);
            let engine = Engine::new(id, config.clone(), InitialState::default(), rng.next_u64(), Millis(0));
            nodes.insert(
                id,
                SimNode {
                    id,
                    engine: Some(engine),
                    incarnation: 0,
                    disk: Disk::default(),
                    view: Disk::default(),
                    unsynced: VecDeque::new(),
                    io_free_at: 0,
                    sm: BTreeMap::new(),
                    sm_applied: LogId::ZERO,
                    checkpointed: LogIndex(0),
                    built: BTreeMap::new(),
                    receiving: Vec::new(),
                    snapshots_built: 0,
                    reads: Vec::new(),
                    last_role: Role::Follower,
                    last_committed: LogIndex(0),
                    configs_scanned: LogIndex(0),
                    rate_ppm: if opts.faults {
                        let rate =
                            rng.range(0, 2 * opts.clock_drift_ppm_max + 1) as i64 - opts.clock_drift_ppm_max as i64;
                        // Read races: every clock at the edge of the allowed drift.
                        match (opts.read_races || opts.lease_edges, rate >= 0) {
                            (false, _) => rate,
                            (true, true) => opts.clock_drift_ppm_max as i64,
                            (true, false) => -(opts.clock_drift_ppm_max as i64),
                        }
                    } else {
                        0
                    },
                    paused_until: 0,
                },
            );
        }
        let clients = (0..opts.clients).map(|id| Client { id, busy: None, guess: NodeId(1), counter: 0 }).collect();
        let faults_on = opts.faults;
        Sim {
            seed,
            opts,
            rng,
            snapshot_rng,
            config,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            nodes,
            blocked: BTreeSet::new(),
            drop_p,
            dup_p,
            checkpoint_every,
            delay_ms_max,
            disk_ms_max,
            clients,
            history: Vec::new(),
            pending_writes: HashMap::new(),
            applied: BTreeMap::new(),
            committed: BTreeMap::new(),
            committed_in: BTreeMap::new(),
            leaders: BTreeMap::new(),
            trace: VecDeque::new(),
            report: SimReport { seed, ..Default::default() },
            faults_on,
            late_transfers: BTreeMap::new(),
            reads_only_until: 0,
            reads_only_on: None,
            lease_edge: None,
        }
    }

    fn log(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("t={} {line}", self.now));
    }

    /// Node `id`'s clock: it runs `rate_ppm` parts per million fast or slow.
    fn local(&self, id: NodeId) -> Millis {
        local_time(self.nodes[&id].rate_ppm, self.now)
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.events.insert((at, self.seq), ev);
    }

    fn play(&mut self) -> Check {
        let voters: Vec<NodeId> = (1..=3.min(self.opts.nodes)).map(NodeId).collect();
        self.log(format!(
            "seed {} config: pre_vote={} votes_need_configuration={} inflight={} append_entries_max={} checkpoint_every={} drop={} dup={} delay<={}ms",
            self.seed,
            self.config.pre_vote,
            self.config.votes_need_configuration,
            self.config.inflight_msgs_max,
            self.config.append_entries_max,
            self.checkpoint_every,
            self.drop_p,
            self.dup_p,
            self.delay_ms_max
        ));
        for id in &voters {
            let engine = self.nodes.get_mut(id).and_then(|n| n.engine.as_mut()).expect("alive");
            engine.initialize(Millis(0), Membership::new(voters.iter().copied())).map_err(|e| e.to_string())?;
            self.drive(*id)?;
        }
        for step in 0..self.opts.steps {
            self.report.steps = step + 1;
            self.step()?;
            self.nemesis()?;
            self.clients_act()?;
            self.check_log_matching()?;
        }
        self.heal_and_finish()
    }

    /// Processes the next event or timer.
    fn step(&mut self) -> Check {
        let next_event = self.events.keys().next().map(|k| k.0);
        let next_timer = self
            .nodes
            .values()
            .filter_map(|n| {
                n.engine.as_ref().map(|e| (global_time(n.rate_ppm, e.next_deadline()).max(n.paused_until), n.id))
            })
            .min();
        match (next_event, next_timer) {
            (Some(t), Some((d, id))) if d < t => self.fire_timer(d, id),
            (None, Some((d, id))) => self.fire_timer(d, id),
            (Some(_), _) => {
                let (&(t, seq), _) = self.events.iter().next().expect("non-empty");
                let ev = self.events.remove(&(t, seq)).expect("present");
                self.now = self.now.max(t);
                self.handle_event(ev)
            }
            (None, None) => {
                // Everything is down: jump ahead to let restarts happen.
                self.now += 100;
                Ok(())
            }
        }
    }

    fn fire_timer(&mut self, at: u64, id: NodeId) -> Check {
        self.now = self.now.max(at);
        let now = self.local(id);
        if let Some(e) = self.nodes.get_mut(&id).and_then(|n| n.engine.as_mut()) {
            e.handle_timeout(now);
        }
        self.drive(id)
    }

    fn handle_event(&mut self, ev: Event) -> Check {
        match ev {
            Event::Deliver(msg) => {
                let to = msg.to;
                if let Some(until) = self.paused(to) {
                    self.schedule(until, Event::Deliver(msg));
                    return Ok(());
                }
                let now = self.local(to);
                let Some(node) = self.nodes.get_mut(&to) else { return Ok(()) };
                let Some(engine) = node.engine.as_mut() else { return Ok(()) };
                let line = describe(&msg);
                let (from, term) = (msg.from, msg.term);
                let round = match &msg.body {
                    MessageBody::Heartbeat { round, .. } => Some(*round),
                    _ => None,
                };
                engine.handle_message(now, msg);
                self.log(line);
                self.drive(to)?;
                self.lease_edge_delivered(from, to, term, round, now);
                Ok(())
            }
            Event::IoDone { node, incarnation, io } => {
                if let Some(until) = self.paused(node) {
                    self.schedule(until, Event::IoDone { node, incarnation, io });
                    return Ok(());
                }
                let now = self.local(node);
                let Some(n) = self.nodes.get_mut(&node) else { return Ok(()) };
                if n.incarnation != incarnation || n.engine.is_none() {
                    return Ok(());
                }
                while n.unsynced.front().is_some_and(|(i, _)| *i <= io) {
                    let (_, w) = n.unsynced.pop_front().expect("checked");
                    n.disk.apply(&w);
                }
                n.engine.as_mut().expect("alive").handle_io_done(now, io);
                self.drive(node)
            }
            Event::Restart(id) => self.restart(id),
            Event::Resume(id) => self.resume(id),
            Event::Isolate(id) => {
                if self.faults_on {
                    let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                    self.isolate(id, &ids);
                    self.log(format!("nemesis: isolate node {id}"));
                }
                Ok(())
            }
            Event::ClientTimeout(op) => {
                if self.history[op].state == OpState::Pending {
                    self.finish_op(op, OpState::Unknown, None);
                }
                Ok(())
            }
            Event::SteerOp { node, write } => self.steer_op(node, write),
        }
    }

    /// Executes a node's actions until it has none.
    fn drive(&mut self, id: NodeId) -> Check {
        loop {
            let Some(node) = self.nodes.get_mut(&id) else { return Ok(()) };
            let Some(engine) = node.engine.as_mut() else { return Ok(()) };
            let Some(action) = engine.poll_action() else { break };
            self.execute(id, action)?;
        }
        self.after_step(id)
    }

    fn finish_op(&mut self, op: usize, state: OpState, out: Option<OpOutput>) {
        let now = self.now;
        let h = &mut self.history[op];
        h.state = state;
        h.op.result = out.map(|o| (now, o));
        match state {
            OpState::Done => self.report.ops_ok += 1,
            OpState::Failed => self.report.ops_failed += 1,
            OpState::Unknown => self.report.ops_unknown += 1,
            OpState::Pending => {}
        }
        let c = h.op.client as usize;
        if self.clients[c].busy == Some(op) {
            self.clients[c].busy = None;
        }
    }

    // ----- the world acting on the cluster -------------------------------------------------

    fn alive(&self) -> Vec<NodeId> {
        self.nodes.values().filter(|n| n.engine.is_some()).map(|n| n.id).collect()
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.engine.as_ref().is_some_and(|e| e.role() == Role::Leader))
            .map(|n| n.id)
            .max_by_key(|id| self.nodes[id].engine.as_ref().map(|e| e.term()))
    }
}

fn local_time(rate_ppm: i64, global: u64) -> Millis {
    let g = global as i128;
    Millis((g + g * rate_ppm as i128 / 1_000_000) as u64)
}

/// The first global time at which a clock running at `rate_ppm` reads at least `local`.
fn global_time(rate_ppm: i64, local: Millis) -> u64 {
    let mut g = ((local.0 as i128 * 1_000_000) / (1_000_000 + rate_ppm as i128)).max(0) as u64;
    while local_time(rate_ppm, g) < local {
        g += 1;
    }
    g
}

fn op_client(history: &[ClientOp], op: usize) -> usize {
    history[op].op.client as usize
}

fn describe(m: &Message) -> String {
    let body = match &m.body {
        MessageBody::Append { prev, entries, commit } => {
            format!("append(prev {prev}, {} entries, commit {commit})", entries.len())
        }
        MessageBody::Snapshot { meta, offset, data, done } => {
            format!("snapshot({} @{offset} +{} done={done})", meta.last_log_id, data.len())
        }
        other => format!("{other:?}"),
    };
    format!("{}->{} t{} {body}", m.from, m.to, m.term)
}

/// The seeds the default test run covers, and how long each runs: `SIM_SEEDS` and
/// `SIM_STEPS` override them; `SEED` runs just that seed.
pub fn seeds_from_env(default_seeds: u64) -> (Vec<u64>, usize) {
    let steps = std::env::var("SIM_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(SimOptions::default().steps);
    if let Some(seed) = std::env::var("SEED").ok().and_then(|s| s.parse().ok()) {
        return (vec![seed], steps);
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_seeds);
    ((0..n).collect(), steps)
}
