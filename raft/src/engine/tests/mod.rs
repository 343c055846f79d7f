//! Engine tests, one file per concept. `actions.rs` feeds one input and compares the exact
//! list of actions; the others drive small clusters with the synchronous harness here, which
//! plays the driver (storage, state machine, network) so a cluster can be stepped message by
//! message. `regressions.rs` keeps the bugs the simulator found.

mod actions;
mod config_change;
mod election;
mod lifecycle;
mod quiesce;
mod read;
mod regressions;
mod replication;
mod snapshot;
mod transfer;
mod unsafe_recovery;

use super::*;
use crate::message::AppendResult;
use std::collections::BTreeMap;

fn n(id: u64) -> NodeId {
    NodeId(id)
}

fn voters(ids: &[u64]) -> BTreeSet<NodeId> {
    ids.iter().map(|i| NodeId(*i)).collect()
}

fn cfg() -> Config {
    Config {
        election_timeout_ms_min: 100,
        election_timeout_ms_max: 200,
        heartbeat_interval_ms: 20,
        lease_clock_drift_ms: 10,
        transfer_timeout_ms: 200,
        snapshot_resend_ms: 60,
        // No purging unless a test asks for it.
        log_keep_entries: 1_000_000,
        log_purge_step_entries: 1,
        ..Config::default()
    }
}

/// A node with synchronous in-memory storage. Writes are made durable only by `sync()` (or
/// automatically when `auto_sync`), so tests can observe the engine before durability.
struct TestNode {
    engine: Engine,
    log: Vec<Entry>,
    last_purged: LogId,
    vote: Vote,
    /// Writes issued but not yet durable.
    unsynced: Vec<Action>,
    last_io: IoId,
    auto_sync: bool,
    applied: Vec<Entry>,
    sm_applied: LogId,
    /// The last snapshot built.
    snapshot: Option<(SnapshotMeta, Vec<Entry>)>,
    /// Snapshots built and not dropped, by id.
    built: BTreeSet<u64>,
    /// Report the applied state durable after each apply (an on-disk state machine).
    report_durable: bool,
    /// The next this many snapshot reads find the snapshot gone (its files were lost).
    lose_snapshot_reads: usize,
    /// Hold `LoadEntries` instead of executing them (a slow disk), in `held_loads`.
    hold_loads: bool,
    held_loads: Vec<(NodeId, LogIndex, LogIndex, usize)>,
    receiving: Vec<u8>,
    outbox: Vec<Message>,
    /// Every action seen, for assertions.
    seen: Vec<Action>,
    reads: Vec<(u64, Result<LogIndex, RaftError>)>,
    /// Size of the snapshots this node builds.
    snapshot_size: u64,
}

impl TestNode {
    fn new(id: u64, config: &Config, seed: u64) -> TestNode {
        TestNode {
            engine: Engine::new(n(id), Arc::new(config.clone()), InitialState::default(), seed, Millis(0)),
            log: Vec::new(),
            last_purged: LogId::ZERO,
            vote: Vote::default(),
            unsynced: Vec::new(),
            last_io: IoId(0),
            auto_sync: true,
            applied: Vec::new(),
            sm_applied: LogId::ZERO,
            snapshot: None,
            built: BTreeSet::new(),
            report_durable: true,
            lose_snapshot_reads: 0,
            hold_loads: false,
            held_loads: Vec::new(),
            receiving: Vec::new(),
            outbox: Vec::new(),
            seen: Vec::new(),
            reads: Vec::new(),
            snapshot_size: 10,
        }
    }

    /// Node `id` restarted on a disk holding `log` (from index 1) and `vote`, nothing applied.
    fn restarted_with(id: u64, config: &Config, log: Vec<Entry>, vote: Vote) -> TestNode {
        let mut term_points: Vec<LogId> = Vec::new();
        for e in &log {
            if term_points.last().is_none_or(|p| p.term != e.log_id.term) {
                term_points.push(e.log_id);
            }
        }
        let log_memberships = log
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::Membership(m) => Some(StoredMembership { log_id: e.log_id, membership: (**m).clone() }),
                _ => None,
            })
            .collect();
        let state = InitialState {
            vote,
            term_points,
            last_log_id: log.last().map_or(LogId::ZERO, |e| e.log_id),
            log_memberships,
            ..Default::default()
        };
        let mut node = TestNode::new(id, config, id);
        node.engine = Engine::new(n(id), Arc::new(config.clone()), state, id, Millis(0));
        node.log = log;
        node.vote = vote;
        node
    }

    fn entry_at(&self, index: LogIndex) -> Entry {
        let pos = (index.0 - self.last_purged.index.0 - 1) as usize;
        self.log[pos].clone()
    }

    /// Executes pending actions. Returns them.
    fn run(&mut self, now: Millis) -> Vec<Action> {
        let mut all = Vec::new();
        loop {
            let Some(a) = self.engine.poll_action() else { break };
            all.push(a.clone());
            self.seen.push(a.clone());
            match a {
                Action::SaveVote { io, .. }
                | Action::AppendEntries { io, .. }
                | Action::TruncateFrom { io, .. }
                | Action::PurgeUpTo { io, .. } => {
                    self.last_io = io;
                    self.unsynced.push(a);
                    if self.auto_sync {
                        self.sync(now);
                    }
                }
                Action::Send(m) => self.outbox.push(m),
                Action::LoadEntries { peer, from, to, bytes_max } if self.hold_loads => {
                    self.held_loads.push((peer, from, to, bytes_max));
                }
                Action::LoadEntries { peer, from, to, bytes_max } => {
                    let mut out = Vec::new();
                    let mut bytes = 0;
                    for i in from.0..=to.0 {
                        let e = self.entry_at(LogIndex(i));
                        if !out.is_empty() && bytes + e.size_bytes() > bytes_max {
                            break;
                        }
                        bytes += e.size_bytes();
                        out.push(e);
                    }
                    self.engine.handle_entries_loaded(now, peer, out);
                }
                Action::Apply { first, last, entries } => {
                    let entries =
                        entries.unwrap_or_else(|| (first.0..=last.0).map(|i| self.entry_at(LogIndex(i))).collect());
                    assert_eq!(entries.first().map(|e| e.log_id.index), Some(first));
                    assert_eq!(entries.last().map(|e| e.log_id.index), Some(last));
                    self.sm_applied = entries.last().expect("non-empty").log_id;
                    self.applied.extend(entries);
                    self.engine.handle_applied(now, last);
                    if self.report_durable {
                        self.engine.handle_applied_durable(now, last);
                    }
                }
                Action::BuildSnapshot => {
                    let meta = SnapshotMeta {
                        last_log_id: self.sm_applied,
                        membership: self.engine.committed_membership().clone(),
                        snapshot_id: self.seen.len() as u64,
                        size_bytes: self.snapshot_size,
                    };
                    self.snapshot = Some((meta.clone(), self.applied.clone()));
                    self.built.insert(meta.snapshot_id);
                    self.engine.handle_snapshot_built(now, meta);
                }
                Action::ReadSnapshotChunk { to, meta, offset, len, done } => {
                    let meta = *meta;
                    if self.lose_snapshot_reads > 0 {
                        self.lose_snapshot_reads -= 1;
                        self.built.remove(&meta.snapshot_id);
                    }
                    let data = self.built.contains(&meta.snapshot_id).then(|| Bytes::from(vec![7u8; len as usize]));
                    self.engine.handle_snapshot_read(now, to, meta, offset, data, done);
                }
                Action::DropSnapshot { meta } => {
                    self.built.remove(&meta.snapshot_id);
                }
                Action::ReceiveSnapshotChunk { meta, offset, data, reception } => {
                    let meta = *meta;
                    if offset == 0 {
                        self.receiving.clear();
                    }
                    self.receiving.extend_from_slice(&data);
                    let end = self.receiving.len() as u64;
                    self.engine.handle_snapshot_received(now, meta, reception, end);
                }
                Action::InstallSnapshot { meta, reception } => {
                    let meta = *meta;
                    assert_eq!(self.receiving.len() as u64, meta.size_bytes);
                    self.sm_applied = meta.last_log_id;
                    self.engine.handle_snapshot_installed(now, meta, reception);
                }
                Action::ReadReady { id, index } => self.reads.push((id, Ok(index))),
                Action::ReadFailed { id, error } => self.reads.push((id, Err(error))),
            }
        }
        all
    }

    /// Makes every issued write durable and reports it.
    fn sync(&mut self, now: Millis) {
        for a in std::mem::take(&mut self.unsynced) {
            match a {
                Action::SaveVote { vote, .. } => self.vote = vote,
                Action::AppendEntries { entries, .. } => {
                    let expect = self.last_purged.index.0 + self.log.len() as u64 + 1;
                    assert_eq!(entries[0].log_id.index.0, expect, "append continues the log");
                    self.log.extend(entries);
                }
                Action::TruncateFrom { index, .. } => {
                    self.log.truncate((index.0 - self.last_purged.index.0 - 1) as usize);
                }
                Action::PurgeUpTo { log_id, .. } => {
                    let k = (log_id.index.0 - self.last_purged.index.0) as usize;
                    self.log.drain(..k.min(self.log.len()));
                    self.last_purged = log_id;
                }
                _ => unreachable!(),
            }
        }
        self.engine.handle_io_done(now, self.last_io);
    }
}

struct Cluster {
    nodes: BTreeMap<NodeId, TestNode>,
    now: Millis,
    /// Links that drop everything: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
}

impl Cluster {
    fn new(ids: &[u64], config: Config) -> Cluster {
        let mut nodes = BTreeMap::new();
        for id in ids {
            nodes.insert(n(*id), TestNode::new(*id, &config, 42 + id));
        }
        Cluster { nodes, now: Millis(0), cut: BTreeSet::new() }
    }

    /// A cluster of `ids`, each initialized with all of them as voters; no leader yet.
    fn initialized(ids: &[u64], config: Config) -> Cluster {
        let mut c = Cluster::new(ids, config);
        for id in ids {
            let now = c.now;
            c.node(*id).engine.initialize(now, Membership::new(ids.iter().map(|i| n(*i)))).expect("init");
            c.node(*id).run(now);
        }
        c
    }

    /// A cluster of `ids` with node 1 elected leader and everything replicated.
    fn with_leader(ids: &[u64], config: Config) -> Cluster {
        let mut c = Cluster::initialized(ids, config);
        c.elect(1);
        c
    }

    /// {1, 2, 3} led by node 1, with "a" and "b" committed and every node knowing it (one
    /// heartbeat round after the replication).
    fn with_two_entries_committed() -> Cluster {
        let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
        c.propose(1, "a");
        c.propose(1, "b");
        c.stabilize();
        c.settle(1);
        let last = c.engine(1).last_log_id().index;
        for id in [2, 3] {
            assert_eq!(c.engine(id).committed(), last, "node {id} knows everything is committed");
        }
        c
    }

    /// Starts node `id` and has leader `leader` add it as a learner.
    fn add_learner(&mut self, leader: u64, id: u64) {
        self.nodes.insert(n(id), TestNode::new(id, &cfg(), id));
        let now = self.now;
        self.node(leader).engine.add_learner(now, n(id)).expect("add learner");
        self.stabilize();
    }

    fn node(&mut self, id: u64) -> &mut TestNode {
        self.nodes.get_mut(&n(id)).expect("node exists")
    }

    fn engine(&self, id: u64) -> &Engine {
        &self.nodes[&n(id)].engine
    }

    /// Runs every node's actions, then delivers messages until no node has anything left.
    fn stabilize(&mut self) {
        self.stabilize_with(|_| true);
    }

    /// Like `stabilize`, delivering only the messages `keep` accepts (the others are lost).
    fn stabilize_with(&mut self, mut keep: impl FnMut(&Message) -> bool) {
        for _ in 0..10_000 {
            let mut msgs = Vec::new();
            for node in self.nodes.values_mut() {
                node.run(self.now);
                msgs.append(&mut node.outbox);
            }
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if keep(&m) {
                    self.deliver(m);
                }
            }
        }
        panic!("cluster did not stabilize");
    }

    /// Cuts node `id` off from every other node, both ways.
    fn cut_off(&mut self, id: u64) {
        let others: Vec<NodeId> = self.nodes.keys().copied().filter(|o| *o != n(id)).collect();
        for o in others {
            self.cut.insert((n(id), o));
            self.cut.insert((o, n(id)));
        }
    }

    fn deliver(&mut self, m: Message) {
        if self.cut.contains(&(m.from, m.to)) {
            return;
        }
        let now = self.now;
        if let Some(node) = self.nodes.get_mut(&m.to) {
            node.engine.handle_message(now, m);
        }
    }

    /// Takes the queued outgoing messages of `id` (after running its actions).
    fn take_outbox(&mut self, id: u64) -> Vec<Message> {
        let now = self.now;
        let node = self.node(id);
        node.run(now);
        std::mem::take(&mut node.outbox)
    }

    /// Advances time to `id`'s next deadline and fires it.
    fn fire(&mut self, id: u64) {
        let d = self.engine(id).next_deadline();
        if d > self.now {
            self.now = d;
        }
        let now = self.now;
        self.node(id).engine.handle_timeout(now);
    }

    fn advance(&mut self, ms: u64) {
        self.now = self.now.add_ms(ms);
        let now = self.now;
        for node in self.nodes.values_mut() {
            if node.engine.next_deadline() <= now {
                node.engine.handle_timeout(now);
            }
        }
    }

    /// Lets `rounds` heartbeat intervals pass, delivering everything after each.
    fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.advance(20);
            self.stabilize();
        }
    }

    fn elect(&mut self, id: u64) {
        // Let leases of an earlier leader run out, then campaign.
        self.now = self.now.add_ms(1000);
        self.fire(id);
        self.stabilize();
        assert_eq!(self.engine(id).role(), Role::Leader, "node {id} should have won");
    }

    fn propose(&mut self, id: u64, data: &str) -> LogIndex {
        let now = self.now;
        self.node(id).engine.propose(now, vec![Bytes::from(data.to_string())]).expect("leader accepts proposals")
    }

    fn applied_data(&self, id: u64) -> Vec<String> {
        self.nodes[&n(id)]
            .applied
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::Normal(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect()
    }
}

/// Node 1, leading `c` on a config without an entry cache, writes five entries node 3 misses;
/// once node 3 answers again the leader loads them from storage, and the disk is slow: the
/// load is held in node 1's `held_loads`. Returns its range.
fn hold_a_load_for_node_3(c: &mut Cluster) -> (LogIndex, LogIndex) {
    c.cut.insert((n(1), n(3)));
    for i in 0..5 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    c.cut.clear();
    c.node(1).hold_loads = true;
    for _ in 0..5 {
        c.advance(20);
        c.stabilize();
        if !c.nodes[&n(1)].held_loads.is_empty() {
            break;
        }
    }
    let &(peer, from, to, _) = c.nodes[&n(1)].held_loads.first().expect("a load for node 3");
    assert_eq!(peer, n(3));
    (from, to)
}

fn sends(actions: &[Action]) -> Vec<&Message> {
    actions.iter().filter_map(|a| if let Action::Send(m) = a { Some(m) } else { None }).collect()
}

fn kinds(msgs: &[Message]) -> Vec<(u64, &'static str)> {
    msgs.iter().map(|m| (m.to.0, m.body.kind())).collect()
}
