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
    /// Acknowledge (and count) appended entries before they are durable.
    pub ack_before_durable: bool,
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
    /// Configuration changes committed.
    pub membership_changes: usize,
    /// Messages dropped by the network.
    pub dropped_msgs: usize,
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

#[derive(Clone, Debug)]
enum Write {
    Vote(Vote),
    Append(Vec<Entry>),
    Truncate(LogIndex),
    Purge(LogId),
}

/// A node's log, vote and snapshot, as durable storage would hold them.
#[derive(Clone, Debug, Default)]
struct Disk {
    vote: Vote,
    last_purged: LogId,
    log: Vec<Entry>,
    snapshot: Option<Snapshot>,
}

impl Disk {
    fn apply(&mut self, w: &Write) {
        match w {
            Write::Vote(v) => self.vote = *v,
            Write::Append(entries) => {
                for e in entries {
                    assert_eq!(e.log_id.index, self.last().index.next(), "append must continue the log");
                    self.log.push(e.clone());
                }
            }
            Write::Truncate(index) => {
                let keep = index.0.saturating_sub(self.last_purged.index.0 + 1) as usize;
                self.log.truncate(keep);
            }
            Write::Purge(upto) => {
                if upto.index <= self.last_purged.index {
                    return;
                }
                let k = (upto.index.0 - self.last_purged.index.0) as usize;
                if k >= self.log.len() || self.log[k - 1].log_id != *upto {
                    self.log.clear();
                } else {
                    self.log.drain(..k);
                }
                self.last_purged = *upto;
            }
        }
    }

    fn last(&self) -> LogId {
        self.log.last().map(|e| e.log_id).unwrap_or(self.last_purged)
    }

    fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.last_purged.index {
            return None;
        }
        self.log.get((index.0 - self.last_purged.index.0 - 1) as usize)
    }

    fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.last_purged.index {
            return Some(self.last_purged.term);
        }
        self.entry(index).map(|e| e.log_id.term)
    }

    /// Whether this storage durably holds the effect of entry `id`: in the log, or inside the
    /// snapshot.
    fn holds(&self, id: LogId) -> bool {
        self.term_at(id.index) == Some(id.term)
            || self.snapshot.as_ref().is_some_and(|s| s.meta.last_log_id.index >= id.index)
    }

    /// What the engine resumes from after a crash. The state machine is volatile: it restarts
    /// from the snapshot.
    fn initial_state(&self) -> InitialState {
        let mut points: Vec<LogId> = Vec::new();
        for e in &self.log {
            if points.last().is_none_or(|p| p.term != e.log_id.term) {
                points.push(e.log_id);
            }
        }
        let (applied, applied_membership) = match &self.snapshot {
            Some(s) => (s.meta.last_log_id, s.meta.membership.clone()),
            None => (LogId::ZERO, StoredMembership::default()),
        };
        let log_memberships = self
            .log
            .iter()
            .filter(|e| e.log_id.index > applied.index)
            .filter_map(|e| e.membership().map(|m| StoredMembership { log_id: e.log_id, membership: m.clone() }))
            .collect();
        InitialState {
            vote: self.vote,
            last_purged: self.last_purged,
            term_points: points,
            last_log_id: self.last(),
            committed: LogIndex(0),
            applied,
            applied_membership,
            log_memberships,
            snapshot: self.snapshot.as_ref().map(|s| s.meta.clone()),
        }
    }
}

fn encode_map(map: &BTreeMap<String, String>) -> Bytes {
    let mut out = Vec::new();
    for (k, v) in map {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    Bytes::from(out)
}

fn decode_map(mut data: &[u8]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let take = |data: &mut &[u8]| -> String {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let s = String::from_utf8(data[4..4 + len].to_vec()).expect("simulator wrote it");
        *data = &data[4 + len..];
        s
    };
    while !data.is_empty() {
        let k = take(&mut data);
        let v = take(&mut data);
        map.insert(k, v);
    }
    map
}

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
    IoDone { node: NodeId, incarnation: u64, io: IoId },
    Restart(NodeId),
    Resume(NodeId),
    ClientTimeout(usize),
}

/// One simulation.
struct Sim {
    seed: u64,
    opts: SimOptions,
    rng: SimRng,
    config: std::sync::Arc<Config>,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    nodes: BTreeMap<NodeId, SimNode>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    drop_p: f64,
    dup_p: f64,
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
        let pre_vote = rng.chance(0.7);
        let mut config = Config {
            election_timeout_ms_min: 150,
            election_timeout_ms_max: 300,
            heartbeat_interval_ms: 30,
            pre_vote,
            check_quorum: true,
            inflight_msgs_max: rng.range(1, 9) as usize,
            append_bytes_max: rng.range(100, 4096) as usize,
            append_entries_max: *rng.pick(&[1usize, 1, 2, 4, 16]).expect("non-empty"),
            entry_cache_bytes_max: *rng.pick(&[0usize, 512, 64 << 10]).expect("non-empty"),
            snapshot_threshold_entries: *rng.pick(&[0u64, 15, 40]).expect("non-empty"),
            log_keep_entries_after_snapshot: rng.range(0, 8),
            snapshot_chunk_bytes: rng.range(16, 256) as usize,
            snapshot_chunks_in_flight_max: rng.range(1, 4) as usize,
            snapshot_resend_ms: 200,
            lease_read: true,
            lease_clock_drift_ms: 20,
            transfer_timeout_ms: 300,
            api_timeout_ms: 5000,
            votes_need_configuration: false,
            uncommitted_bytes_max: 0,
            #[cfg(feature = "sim-bugs")]
            bugs: Default::default(),
        };
        // Drawn last, so the seeds' other choices stay what they were.
        config.votes_need_configuration = rng.chance(0.5);
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
                        match (opts.read_races, rate >= 0) {
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
            config,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            nodes,
            blocked: BTreeSet::new(),
            drop_p,
            dup_p,
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
            "seed {} config: pre_vote={} votes_need_configuration={} inflight={} append_entries_max={} snapshot_threshold={} drop={} dup={} delay<={}ms",
            self.seed,
            self.config.pre_vote,
            self.config.votes_need_configuration,
            self.config.inflight_msgs_max,
            self.config.append_entries_max,
            self.config.snapshot_threshold_entries,
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
                engine.handle_message(now, msg);
                self.log(line);
                self.drive(to)
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
            Event::ClientTimeout(op) => {
                if self.history[op].state == OpState::Pending {
                    self.finish_op(op, OpState::Unknown, None);
                }
                Ok(())
            }
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

    fn execute(&mut self, id: NodeId, action: Action) -> Check {
        let now = self.local(id);
        let disk_ms = self.rng.range(0, self.disk_ms_max + 1);
        let node = self.nodes.get_mut(&id).expect("exists");
        match action {
            Action::SaveVote { io, vote } => self.issue_write(id, io, Write::Vote(vote), disk_ms),
            Action::AppendEntries { io, entries } => self.issue_write(id, io, Write::Append(entries), disk_ms),
            Action::TruncateFrom { io, index } => self.issue_write(id, io, Write::Truncate(index), disk_ms),
            Action::PurgeUpTo { io, log_id } => self.issue_write(id, io, Write::Purge(log_id), disk_ms),
            Action::Send(msg) => {
                self.send(msg);
                Ok(())
            }
            Action::LoadEntries { peer, from, to, bytes_max } => {
                let mut out = Vec::new();
                let mut bytes = 0;
                for i in from.0..=to.0 {
                    let Some(e) = node.view.entry(LogIndex(i)) else {
                        return Err(format!("node {id}: LoadEntries of {i}, which storage does not have"));
                    };
                    if !out.is_empty() && bytes + e.size_bytes() > bytes_max {
                        break;
                    }
                    bytes += e.size_bytes();
                    out.push(e.clone());
                }
                node.engine.as_mut().expect("alive").handle_entries_loaded(now, peer, out);
                Ok(())
            }
            Action::Apply { first, last, entries } => {
                let entries = match entries {
                    Some(e) => e,
                    None => {
                        let mut out = Vec::new();
                        for i in first.0..=last.0 {
                            match node.disk.entry(LogIndex(i)) {
                                Some(e) => out.push(e.clone()),
                                None => return Err(format!("node {id}: Apply of {i}, which is not durable")),
                            }
                        }
                        out
                    }
                };
                for e in entries {
                    self.apply_entry(id, e)?;
                }
                let node = self.nodes.get_mut(&id).expect("exists");
                node.engine.as_mut().expect("alive").handle_applied(now, last);
                Ok(())
            }
            Action::BuildSnapshot => {
                node.snapshots_built += 1;
                let data = encode_map(&node.sm);
                let engine = node.engine.as_mut().expect("alive");
                let meta = SnapshotMeta {
                    last_log_id: node.sm_applied,
                    membership: engine.committed_membership().clone(),
                    snapshot_id: id.0 * 1_000_000 + node.snapshots_built,
                    size_bytes: data.len() as u64,
                };
                // The snapshot is durable once built (the state machine writes it).
                let snap = Snapshot { meta: meta.clone(), data };
                node.disk.snapshot = Some(snap.clone());
                node.view.snapshot = Some(snap);
                engine.handle_snapshot_built(now, meta);
                Ok(())
            }
            Action::SendSnapshotChunk { to, meta, offset, len, done } => {
                let Some(snap) = &node.disk.snapshot else { return Ok(()) };
                if snap.meta != meta {
                    return Ok(());
                }
                let data = snap.data.slice(offset as usize..(offset + len) as usize);
                let term = node.engine.as_ref().expect("alive").term();
                self.send(Message { from: id, to, term, body: MessageBody::Snapshot { meta, offset, data, done } });
                Ok(())
            }
            Action::ReceiveSnapshotChunk { offset, data, .. } => {
                if offset == 0 {
                    node.receiving.clear();
                }
                node.receiving.extend_from_slice(&data);
                Ok(())
            }
            Action::InstallSnapshot { meta } => {
                let data = Bytes::from(std::mem::take(&mut node.receiving));
                if data.len() as u64 != meta.size_bytes {
                    return Err(format!("node {id}: snapshot of {} bytes, meta says {}", data.len(), meta.size_bytes));
                }
                node.sm = decode_map(&data);
                node.sm_applied = meta.last_log_id;
                let snap = Snapshot { meta: meta.clone(), data };
                node.disk.snapshot = Some(snap.clone());
                node.view.snapshot = Some(snap);
                self.report.snapshots_installed += 1;
                self.log(format!("node {id} installed snapshot {}", meta.last_log_id));
                // Writes proposed here that the snapshot covers were overwritten by the leader
                // unless the snapshot agrees; the entries are gone, so their fate is unknown.
                let covered: Vec<(NodeId, LogIndex)> = self
                    .pending_writes
                    .keys()
                    .filter(|(n, i)| *n == id && *i <= meta.last_log_id.index)
                    .copied()
                    .collect();
                for k in covered {
                    if let Some((op, _)) = self.pending_writes.remove(&k) {
                        if self.history[op].state == OpState::Pending {
                            self.finish_op(op, OpState::Unknown, None);
                        }
                    }
                }
                let node = self.nodes.get_mut(&id).expect("exists");
                node.engine.as_mut().expect("alive").handle_snapshot_installed(now, meta);
                self.serve_reads(id);
                Ok(())
            }
            Action::ReadReady { id: op, index } => {
                node.reads.push((op as usize, index));
                self.serve_reads(id);
                Ok(())
            }
            Action::ReadFailed { id: op, error } => {
                let op = op as usize;
                if let RaftError::NotLeader { leader: Some(l) } = error {
                    let c = self.history[op].op.client as usize;
                    self.clients[c].guess = l;
                }
                if self.history[op].state == OpState::Pending {
                    self.finish_op(op, OpState::Failed, None);
                }
                Ok(())
            }
        }
    }

    fn issue_write(&mut self, id: NodeId, io: IoId, w: Write, disk_ms: u64) -> Check {
        let now = self.now;
        let node = self.nodes.get_mut(&id).expect("exists");
        node.view.apply(&w);
        node.unsynced.push_back((io, w));
        node.io_free_at = node.io_free_at.max(now) + disk_ms;
        let (at, incarnation) = (node.io_free_at, node.incarnation);
        self.schedule(at, Event::IoDone { node: id, incarnation, io });
        Ok(())
    }

    fn send(&mut self, msg: Message) {
        if self.blocked.contains(&(msg.from, msg.to)) || (self.faults_on && self.rng.chance(self.drop_p)) {
            self.report.dropped_msgs += 1;
            return;
        }
        let copies = if self.faults_on && self.rng.chance(self.dup_p) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.range(1, self.delay_ms_max + 1);
            self.schedule(self.now + delay, Event::Deliver(msg.clone()));
        }
    }

    fn apply_entry(&mut self, id: NodeId, e: Entry) -> Check {
        // State-machine safety: every node applies the same entry at an index.
        match self.applied.get(&e.log_id.index) {
            Some((term, payload)) if *term != e.log_id.term || *payload != e.payload => {
                return Err(format!(
                    "state machine safety: node {id} applied {} ({:?}) where another node applied term {} ({:?})",
                    e.log_id, e.payload, term, payload
                ));
            }
            Some(_) => {}
            None => {
                self.applied.insert(e.log_id.index, (e.log_id.term, e.payload.clone()));
            }
        }
        let node = self.nodes.get_mut(&id).expect("exists");
        if e.log_id.index != node.sm_applied.index.next() {
            return Err(format!("node {id} applied {} after {}", e.log_id, node.sm_applied));
        }
        node.sm_applied = e.log_id;
        let resp = match &e.payload {
            EntryPayload::Normal(b) => Some(apply_kv(&mut node.sm, b)),
            EntryPayload::Membership(m) => {
                if !m.is_joint() {
                    self.report.membership_changes += 1;
                }
                None
            }
            EntryPayload::Blank => None,
        };
        if let Some((op, term)) = self.pending_writes.remove(&(id, e.log_id.index)) {
            if self.history[op].state == OpState::Pending {
                if term == e.log_id.term {
                    let resp = resp.unwrap_or_default();
                    let out = match &self.history[op].op.input {
                        OpInput::Put(_) => OpOutput::Put { previous: resp.previous },
                        OpInput::Cas { .. } => OpOutput::Cas { ok: resp.ok },
                        OpInput::Get => unreachable!("reads are not proposed"),
                    };
                    self.finish_op(op, OpState::Done, Some(out));
                } else {
                    // Another leader's entry took the index: this proposal can never commit.
                    self.finish_op(op, OpState::Failed, None);
                }
            }
        }
        self.serve_reads(id);
        Ok(())
    }

    fn serve_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("exists");
        let applied = node.sm_applied.index;
        let mut ready = Vec::new();
        node.reads.retain(|(op, index)| {
            if *index <= applied {
                ready.push(*op);
                false
            } else {
                true
            }
        });
        for op in ready {
            if self.history[op].state != OpState::Pending {
                continue;
            }
            let value = self.nodes[&id].sm.get(&self.history[op].op.key).cloned();
            self.finish_op(op, OpState::Done, Some(OpOutput::Get(value)));
        }
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

    /// Invariants checked after every step of node `id`.
    fn after_step(&mut self, id: NodeId) -> Check {
        let node = self.nodes.get_mut(&id).expect("exists");
        let Some(engine) = node.engine.as_ref() else { return Ok(()) };
        let role = engine.role();
        let term = engine.term();
        let committed = engine.committed();
        let was = std::mem::replace(&mut node.last_role, role);
        let prev_committed = std::mem::replace(&mut node.last_committed, committed);
        if role == Role::Leader {
            // Election safety: at most one leader per term.
            match self.leaders.get(&term) {
                Some(other) if *other != id => {
                    return Err(format!("two leaders in term {term}: nodes {other} and {id}"));
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(term, id);
                    self.report.leaders_elected += 1;
                    self.log(format!("node {id} became leader of term {term}"));
                }
            }
            if was != Role::Leader {
                self.check_leader_completeness(id)?;
                // Entries inherited from earlier leaders are not this leader's changes.
                let node = self.nodes.get_mut(&id).expect("exists");
                node.configs_scanned = node.view.last().index;
            }
            if committed > prev_committed {
                self.check_commit_quorum(id, committed)?;
                self.record_committed(id, committed)?;
            }
            self.check_one_change_at_a_time(id)?;
        }
        Ok(())
    }

    /// Records the entries a leader just committed; a different entry committed at the same
    /// index before is a violation.
    fn record_committed(&mut self, id: NodeId, committed: LogIndex) -> Check {
        let node = &self.nodes[&id];
        let leader_term = node.engine.as_ref().map(|e| e.term()).unwrap_or_default();
        let from = self
            .committed
            .keys()
            .next_back()
            .copied()
            .unwrap_or_default()
            .next()
            .max(node.view.last_purged.index.next());
        let mut k = from;
        while k <= committed {
            let term = node.view.term_at(k).ok_or_else(|| format!("leader {id} committed {k} beyond its log"))?;
            self.committed.insert(k, term);
            k = k.next();
        }
        // The commit term of every index, purged ones included: it decides which later
        // leaders must hold the entry.
        let mut k = self.committed_in.keys().next_back().copied().unwrap_or_default().next();
        while k <= committed {
            self.committed_in.insert(k, leader_term);
            k = k.next();
        }
        // Entries recorded earlier must still be what this leader has.
        let lo = node.view.last_purged.index.next();
        if lo > committed {
            return Ok(());
        }
        for (index, term) in self.committed.range(lo..=committed) {
            if node.view.term_at(*index) != Some(*term) {
                return Err(format!(
                    "leader {id} committed {committed} but its entry at {index} differs from the committed term {term}"
                ));
            }
        }
        Ok(())
    }

    /// Leader completeness: a new leader holds every entry committed in an earlier term. A
    /// leader of a term older than the commit (a candidate whose votes arrived late, after a
    /// pause) need not: it is deposed at its first exchange with the newer term's voters.
    fn check_leader_completeness(&self, id: NodeId) -> Check {
        let node = &self.nodes[&id];
        let leader_term = node.engine.as_ref().map(|e| e.term()).unwrap_or_default();
        // An entry is committed no earlier than its own term.
        let before_this_term = |index: &LogIndex, term: &Term| {
            self.committed_in.get(index).copied().unwrap_or(*term).max(*term) < leader_term
        };
        for (index, term) in &self.committed {
            if *index <= node.view.last_purged.index || !before_this_term(index, term) {
                continue;
            }
            if node.view.term_at(*index) != Some(*term) {
                return Err(format!(
                    "leader completeness: node {id} leads without committed entry {term}-{index} (has {:?})",
                    node.view.term_at(*index)
                ));
            }
        }
        for (index, (term, _)) in &self.applied {
            if *index <= node.view.last_purged.index || !before_this_term(index, term) {
                continue;
            }
            if node.view.term_at(*index) != Some(*term) {
                return Err(format!(
                    "leader completeness: node {id} leads without applied entry {term}-{index} (has {:?})",
                    node.view.term_at(*index)
                ));
            }
        }
        Ok(())
    }

    /// The entry a leader just committed is durable on a quorum of its configuration (of both
    /// halves while joint).
    fn check_commit_quorum(&self, id: NodeId, committed: LogIndex) -> Check {
        let node = &self.nodes[&id];
        let engine = node.engine.as_ref().expect("alive");
        let Some(term) = node.view.term_at(committed) else {
            return Err(format!("node {id} committed {committed}, beyond its log"));
        };
        let entry = LogId { term, index: committed };
        let m = &engine.membership().membership;
        let holds = |n: NodeId| self.nodes.get(&n).is_some_and(|x| x.disk.holds(entry));
        if !m.is_quorum(holds) {
            let on: Vec<u64> = self.nodes.values().filter(|x| x.disk.holds(entry)).map(|x| x.id.0).collect();
            return Err(format!("node {id} committed {entry} but it is durable only on {on:?}; configuration {m}"));
        }
        Ok(())
    }

    /// One configuration change at a time: when a leader appends a configuration entry, the
    /// previous one in its log is committed.
    fn check_one_change_at_a_time(&mut self, id: NodeId) -> Check {
        let node = self.nodes.get_mut(&id).expect("exists");
        let engine = node.engine.as_ref().expect("alive");
        let (term, committed) = (engine.term(), engine.committed());
        let last = node.view.last().index;
        let from = node.configs_scanned.min(last).next().max(node.view.last_purged.index.next());
        node.configs_scanned = last;
        let mut k = from;
        while k <= last {
            let e = node.view.entry(k).expect("in the log");
            if e.log_id.term == term && e.membership().is_some() {
                let mut j = k.prev();
                while j > node.view.last_purged.index {
                    if node.view.entry(j).is_some_and(|p| p.membership().is_some()) {
                        break;
                    }
                    j = j.prev();
                }
                if j > committed {
                    return Err(format!(
                        "leader {id} appended configuration entry {} while the one at {j} is uncommitted (commit {committed})",
                        e.log_id
                    ));
                }
            }
            k = k.next();
        }
        Ok(())
    }

    /// Log matching: two logs with an entry of the same index and term agree on every entry
    /// up to it.
    fn check_log_matching(&self) -> Check {
        let logs: Vec<(&NodeId, &Disk)> = self.nodes.iter().map(|(id, n)| (id, &n.view)).collect();
        for (i, (a, la)) in logs.iter().enumerate() {
            for (b, lb) in logs.iter().skip(i + 1) {
                let lo = la.last_purged.index.max(lb.last_purged.index).next();
                let hi = la.last().index.min(lb.last().index);
                // The highest index where the two agree on the term.
                let mut top = None;
                let mut k = hi;
                while k >= lo && k > LogIndex(0) {
                    if la.term_at(k) == lb.term_at(k) {
                        top = Some(k);
                        break;
                    }
                    k = k.prev();
                }
                let Some(top) = top else { continue };
                let mut k = lo;
                while k <= top {
                    let (ea, eb) = (la.entry(k), lb.entry(k));
                    if ea != eb {
                        return Err(format!(
                            "log matching: nodes {a} and {b} agree at {top} but differ at {k}: {ea:?} vs {eb:?}"
                        ));
                    }
                    k = k.next();
                }
            }
        }
        Ok(())
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

    fn nemesis(&mut self) -> Check {
        if self.faults_on && self.rng.chance(1.0 / 80.0) {
            self.network_fault();
        }
        if self.faults_on && self.rng.chance(1.0 / 300.0) {
            self.crash()?;
        }
        if self.opts.reconfigure && self.rng.chance(1.0 / 250.0) {
            self.reconfigure()?;
        }
        if self.opts.read_races && self.faults_on {
            if self.rng.chance(1.0 / 60.0) {
                self.network_fault();
            }
            if self.rng.chance(1.0 / 150.0) {
                self.pause();
            }
            if self.rng.chance(1.0 / 100.0) {
                self.transfer()?;
            }
        }
        Ok(())
    }

    /// The node's resume time if it is paused now.
    fn paused(&self, id: NodeId) -> Option<u64> {
        let until = self.nodes[&id].paused_until;
        (self.now < until).then_some(until)
    }

    /// Stops a node (the leader, mostly) for longer than an election timeout or shorter.
    fn pause(&mut self) {
        let alive = self.alive();
        let target = match self.leader() {
            Some(l) if self.rng.chance(0.7) => l,
            _ => match self.rng.pick(&alive) {
                Some(&n) => n,
                None => return,
            },
        };
        if self.paused(target).is_some() {
            return;
        }
        let until = self.now + self.rng.range(50, 700);
        self.nodes.get_mut(&target).expect("exists").paused_until = until;
        self.schedule(until, Event::Resume(target));
        self.log(format!("nemesis: pause node {target} until {until}"));
    }

    /// A resumed node gets lease reads before anything else it missed reaches it: if it was
    /// leader and was deposed meanwhile, only its clock can tell it that its lease is over.
    fn resume(&mut self, id: NodeId) -> Check {
        if self.nodes[&id].engine.is_none() {
            return Ok(());
        }
        self.log(format!("resume node {id}"));
        if let Some(old) = self.late_transfers.remove(&id).filter(|_| self.faults_on) {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for n in ids.into_iter().filter(|n| *n != old) {
                self.blocked.insert((n, old));
            }
            self.log(format!("nemesis: node {old} hears from no one while {id} campaigns"));
        }
        let idle: Vec<usize> = (0..self.clients.len()).filter(|c| self.clients[*c].busy.is_none()).take(2).collect();
        for c in idle {
            self.client_op_at(c, Some(OpInput::Get), Some((id, ReadMode::Lease)))?;
        }
        self.drive(id)
    }

    /// Asks the leader to hand over to a random voter.
    fn transfer(&mut self) -> Check {
        let Some(l) = self.leader() else { return Ok(()) };
        if self.paused(l).is_some() {
            return Ok(());
        }
        let now = self.local(l);
        let voters: Vec<NodeId> = self.nodes[&l]
            .engine
            .as_ref()
            .map(|e| e.membership().membership.voters.iter().copied().collect())
            .unwrap_or_default();
        let Some(&t) = self.rng.pick(&voters) else { return Ok(()) };
        if t != l && self.paused(t).is_none() && self.rng.chance(0.5) {
            // The target gets its TimeoutNow only after the transfer timed out at the leader,
            // which meanwhile renewed its lease with new rounds; when the target wakes, the
            // leader stops hearing from anyone (see `resume`) while clients keep reading
            // there. Only the void lease keeps those reads from going stale.
            let until = self.now + self.rng.range(self.config.transfer_timeout_ms + 20, 800);
            self.nodes.get_mut(&t).expect("exists").paused_until = until;
            self.schedule(until, Event::Resume(t));
            self.late_transfers.insert(t, l);
            self.log(format!("nemesis: pause transfer target {t} until {until}"));
        }
        let engine = self.nodes.get_mut(&l).and_then(|n| n.engine.as_mut()).expect("leader is alive");
        let line = format!("nemesis: leader {l}: transfer to {t}: {:?}", engine.transfer_leader(now, t));
        self.log(line);
        self.drive(l)
    }

    fn network_fault(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        match self.rng.range(0, 5) {
            0 => {
                self.blocked.clear();
                self.log("nemesis: heal the network".into());
            }
            1 => {
                if let Some(l) = self.leader() {
                    self.isolate(l, &ids);
                    self.log(format!("nemesis: isolate the leader {l}"));
                }
            }
            2 => {
                let n = *self.rng.pick(&ids).expect("nodes");
                self.isolate(n, &ids);
                self.log(format!("nemesis: isolate node {n}"));
            }
            3 => {
                let side: Vec<NodeId> = ids.iter().copied().filter(|_| self.rng.chance(0.5)).collect();
                for a in &ids {
                    for b in &ids {
                        if side.contains(a) != side.contains(b) {
                            self.blocked.insert((*a, *b));
                        }
                    }
                }
                self.log(format!("nemesis: partition {side:?} from the rest"));
            }
            _ => {
                let a = *self.rng.pick(&ids).expect("nodes");
                let b = *self.rng.pick(&ids).expect("nodes");
                if a != b {
                    self.blocked.insert((a, b));
                    self.log(format!("nemesis: drop everything from {a} to {b}"));
                }
            }
        }
    }

    fn isolate(&mut self, n: NodeId, ids: &[NodeId]) {
        for o in ids {
            if *o != n {
                self.blocked.insert((n, *o));
                self.blocked.insert((*o, n));
            }
        }
    }

    fn crash(&mut self) -> Check {
        let alive = self.alive();
        let Some(&id) = self.rng.pick(&alive) else { return Ok(()) };
        let keep_frac = self.rng.range(0, 101);
        let node = self.nodes.get_mut(&id).expect("exists");
        node.engine = None;
        node.incarnation += 1;
        node.paused_until = 0;
        // A prefix of the unsynced writes may have reached the disk anyway.
        let keep = node.unsynced.len() * keep_frac as usize / 100;
        for (_, w) in node.unsynced.drain(..).take(keep) {
            node.disk.apply(&w);
        }
        node.view = node.disk.clone();
        node.reads.clear();
        node.receiving.clear();
        self.report.crashes += 1;
        let lost: Vec<(NodeId, LogIndex)> = self.pending_writes.keys().filter(|(n, _)| *n == id).copied().collect();
        for k in lost {
            if let Some((op, _)) = self.pending_writes.remove(&k) {
                if self.history[op].state == OpState::Pending {
                    self.finish_op(op, OpState::Unknown, None);
                }
            }
        }
        // Reads in flight on the crashed node just never answer.
        for i in 0..self.history.len() {
            if self.history[i].state == OpState::Pending && self.history[i].op.input == OpInput::Get {
                let c = self.history[i].op.client as usize;
                if self.clients[c].guess == id {
                    self.finish_op(i, OpState::Unknown, None);
                }
            }
        }
        let back = self.now + self.rng.range(50, 3000);
        self.schedule(back, Event::Restart(id));
        self.log(format!("nemesis: crash node {id} (kept {keep_frac}% of unsynced writes), back at {back}"));
        Ok(())
    }

    fn restart(&mut self, id: NodeId) -> Check {
        let seed = self.rng.next_u64();
        let now = self.local(id);
        let config = self.config.clone();
        let node = self.nodes.get_mut(&id).expect("exists");
        if node.engine.is_some() {
            return Ok(());
        }
        let state = node.disk.initial_state();
        node.sm = node.disk.snapshot.as_ref().map(|s| decode_map(&s.data)).unwrap_or_default();
        node.sm_applied = state.applied;
        node.io_free_at = self.now;
        node.last_role = Role::Follower;
        node.last_committed = LogIndex(0);
        let mut engine = Engine::new(id, config, state, seed, now);
        // A member of the initial configuration keeps it somewhere durable of its own (the
        // shard host's group descriptor) and forms the group again if it lost every write
        // before its first sync: where empty nodes may not vote, it could not vote otherwise.
        let initial: Vec<NodeId> = (1..=3.min(self.opts.nodes)).map(NodeId).collect();
        if self.config.votes_need_configuration && initial.contains(&id) && engine.is_pristine() {
            engine.initialize(now, Membership::new(initial.iter().copied())).map_err(|e| e.to_string())?;
        }
        node.engine = Some(engine);
        self.log(format!("restart node {id}"));
        self.drive(id)
    }

    fn reconfigure(&mut self) -> Check {
        let Some(l) = self.leader() else { return Ok(()) };
        if self.paused(l).is_some() {
            return Ok(());
        }
        let now = self.local(l);
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let choice = self.rng.range(0, 4);
        let engine = self.nodes.get_mut(&l).and_then(|n| n.engine.as_mut()).expect("leader is alive");
        let m = engine.membership().membership.clone();
        let line = match choice {
            0 => {
                let outsiders: Vec<NodeId> = ids.iter().copied().filter(|i| !m.contains(*i)).collect();
                let Some(&n) = self.rng.pick(&outsiders) else { return Ok(()) };
                format!("leader {l}: add learner {n}: {:?}", engine.add_learner(now, n))
            }
            1 => {
                // A random voter set of 3 (sometimes 1, 2, 4 or 5) from the pool.
                let size = *self.rng.pick(&[3u64, 3, 3, 1, 2, 4, 5]).expect("non-empty");
                // Where empty nodes may not vote, a voter joins as a learner first (as the
                // shard host's moves do): promoting a node straight from outside could leave a
                // configuration whose new majority is nodes that may never vote.
                let mut pool =
                    if self.config.votes_need_configuration { m.nodes().into_iter().collect() } else { ids.clone() };
                let mut voters = BTreeSet::new();
                while (voters.len() as u64) < size.min(pool.len() as u64) {
                    let i = self.rng.range(0, pool.len() as u64) as usize;
                    voters.insert(pool.swap_remove(i));
                }
                format!("leader {l}: change voters to {voters:?}: {:?}", engine.change_membership(now, voters.clone()))
            }
            2 => {
                let voters: Vec<NodeId> = m.voters.iter().copied().collect();
                let Some(&t) = self.rng.pick(&voters) else { return Ok(()) };
                format!("leader {l}: transfer to {t}: {:?}", engine.transfer_leader(now, t))
            }
            _ => {
                engine.trigger_snapshot();
                format!("leader {l}: trigger snapshot")
            }
        };
        self.log(line);
        self.drive(l)
    }

    fn clients_act(&mut self) -> Check {
        for c in 0..self.clients.len() {
            if self.clients[c].busy.is_some() || !self.rng.chance(0.08) {
                continue;
            }
            self.client_op(c, None)?;
        }
        Ok(())
    }

    fn client_op(&mut self, c: usize, forced: Option<OpInput>) -> Check {
        self.client_op_at(c, forced, None)
    }

    /// A client operation; `at` forces the node and the read mode.
    fn client_op_at(&mut self, c: usize, forced: Option<OpInput>, at: Option<(NodeId, ReadMode)>) -> Check {
        let alive = self.alive();
        let mut target = self.clients[c].guess;
        if let Some((node, _)) = at {
            target = node;
        } else if !alive.contains(&target) || self.rng.chance(0.1) {
            let Some(&t) = self.rng.pick(&alive) else { return Ok(()) };
            target = t;
        }
        if at.is_none() && self.paused(target).is_some() {
            // A stopped process takes no requests; the client tries another node.
            let awake: Vec<NodeId> = alive.iter().copied().filter(|n| self.paused(*n).is_none()).collect();
            let Some(&t) = self.rng.pick(&awake) else { return Ok(()) };
            target = t;
        }
        let client = &mut self.clients[c];
        client.counter += 1;
        let value = format!("c{}-{}", client.id, client.counter);
        let key = format!("k{}", self.rng.range(0, self.opts.keys));
        // Out of ten: gets, then puts, one delete, and compare-and-sets for the rest.
        let (reads, puts) = if self.opts.read_races { (6, 2) } else { (4, 3) };
        let input = forced.unwrap_or_else(|| match self.rng.range(0, 10) {
            r if r < reads => OpInput::Get,
            r if r < reads + puts => OpInput::Put(Some(value.clone())),
            r if r == reads + puts => OpInput::Put(None),
            _ => {
                let expected = self.history.iter().rev().find(|h| h.op.key == key).and_then(|h| match &h.op.input {
                    OpInput::Put(v) => v.clone(),
                    OpInput::Cas { new, .. } => new.clone(),
                    OpInput::Get => None,
                });
                OpInput::Cas { expected, new: Some(value.clone()) }
            }
        });
        let op = self.history.len();
        self.history.push(ClientOp {
            op: Op { client: c as u64, key: key.clone(), input: input.clone(), invoke: self.now, result: None },
            state: OpState::Pending,
        });
        self.clients[c].busy = Some(op);
        self.clients[c].guess = target;
        self.schedule(self.now + CLIENT_TIMEOUT_MS, Event::ClientTimeout(op));
        let now = self.local(target);
        let engine = self.nodes.get_mut(&target).and_then(|n| n.engine.as_mut()).expect("alive");
        match &input {
            OpInput::Get => {
                let mode = match at {
                    Some((_, mode)) => mode,
                    None if self.rng.chance(0.5) => ReadMode::Lease,
                    None => ReadMode::ReadIndex,
                };
                engine.read(now, op as u64, mode);
            }
            OpInput::Put(v) => {
                let cmd = match v {
                    Some(v) => KvCommand::Put { key, value: v.clone() },
                    None => KvCommand::Delete { key },
                };
                self.propose(target, op, cmd)?;
            }
            OpInput::Cas { expected, new } => {
                let cmd = KvCommand::Cas { key, expected: expected.clone(), new: new.clone() };
                self.propose(target, op, cmd)?;
            }
        }
        self.drive(target)
    }

    fn propose(&mut self, target: NodeId, op: usize, cmd: KvCommand) -> Check {
        let now = self.local(target);
        let engine = self.nodes.get_mut(&target).and_then(|n| n.engine.as_mut()).expect("alive");
        match engine.propose(now, vec![cmd.encode()]) {
            Ok(index) => {
                let term = engine.term();
                self.pending_writes.insert((target, index), (op, term));
            }
            Err(e) => {
                if let RaftError::NotLeader { leader: Some(l) } = e {
                    self.clients[op_client(&self.history, op)].guess = l;
                }
                self.finish_op(op, OpState::Failed, None);
            }
        }
        Ok(())
    }

    /// Stops the faults, brings every node back, and requires progress; then checks the
    /// history.
    fn heal_and_finish(&mut self) -> Check {
        self.faults_on = false;
        self.blocked.clear();
        self.log("heal: network healed, faults off, restarting every node".into());
        let down: Vec<NodeId> = self.nodes.values().filter(|n| n.engine.is_none()).map(|n| n.id).collect();
        for id in down {
            self.restart(id)?;
        }
        let deadline = self.now + HEAL_DEADLINE_MS;
        // Once the cluster is whole again a write must commit, then a read by each mode must
        // be answered (an operation that failed, say during an election, is tried again).
        let phases = [None, Some(ReadMode::ReadIndex), Some(ReadMode::Lease)];
        let mut phase = 0;
        let mut final_op: Option<usize> = None;
        while self.now < deadline && phase < phases.len() {
            self.step()?;
            match final_op.map(|op| self.history[op].state) {
                Some(OpState::Pending) => continue,
                Some(OpState::Done) => {
                    phase += 1;
                    final_op = None;
                    if phase == phases.len() {
                        break;
                    }
                }
                _ => {}
            }
            let Some(c) = (0..self.clients.len()).find(|c| self.clients[*c].busy.is_none()) else { continue };
            let Some(l) = self.leader() else { continue };
            self.clients[c].guess = l;
            let op = self.history.len();
            match phases[phase] {
                None => self.client_op(c, Some(OpInput::Put(Some(format!("final-{op}")))))?,
                Some(mode) => self.client_op_at(c, Some(OpInput::Get), Some((l, mode)))?,
            }
            final_op = Some(op);
        }
        if phase < phases.len() {
            let what = ["write committed", "ReadIndex read answered", "lease read answered"][phase];
            return Err(format!("no progress: no {what} within {HEAL_DEADLINE_MS} ms after healing"));
        }
        self.check_log_matching()?;
        self.report.virtual_ms = self.now;
        let ops: Vec<Op> = self
            .history
            .iter()
            .filter(|h| h.state != OpState::Failed)
            .map(|h| {
                let mut op = h.op.clone();
                if h.state != OpState::Done {
                    op.result = None;
                }
                op
            })
            .collect();
        check_history(&ops).map_err(|e| e.to_string())
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
