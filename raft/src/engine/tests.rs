//! Engine tests: each drives engines by hand and asserts what they emit. A small synchronous
//! harness plays the driver (storage, state machine, network) so a whole cluster can be
//! stepped message by message.

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
        snapshot_threshold_entries: 0,
        log_keep_entries_after_snapshot: 0,
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
    snapshot: Option<(SnapshotMeta, Vec<Entry>)>,
    receiving: Vec<u8>,
    outbox: Vec<Message>,
    /// Every action seen, for assertions.
    seen: Vec<Action>,
    reads: Vec<(u64, Result<LogIndex, RaftError>)>,
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
            receiving: Vec::new(),
            outbox: Vec::new(),
            seen: Vec::new(),
            reads: Vec::new(),
        }
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
                }
                Action::BuildSnapshot => {
                    let meta = SnapshotMeta {
                        last_log_id: self.sm_applied,
                        membership: self.engine.committed_membership().clone(),
                        snapshot_id: self.sm_applied.index.0,
                        size_bytes: 10,
                    };
                    self.snapshot = Some((meta.clone(), self.applied.clone()));
                    self.engine.handle_snapshot_built(now, meta);
                }
                Action::SendSnapshotChunk { to, meta, offset, len, done } => {
                    self.outbox.push(Message {
                        from: self.engine.id(),
                        to,
                        term: self.engine.term(),
                        body: MessageBody::Snapshot { meta, offset, data: Bytes::from(vec![7u8; len as usize]), done },
                    });
                }
                Action::ReceiveSnapshotChunk { offset, data, .. } => {
                    if offset == 0 {
                        self.receiving.clear();
                    }
                    self.receiving.extend_from_slice(&data);
                }
                Action::InstallSnapshot { meta } => {
                    assert_eq!(self.receiving.len() as u64, meta.size_bytes);
                    self.sm_applied = meta.last_log_id;
                    self.engine.handle_snapshot_installed(now, meta);
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

fn sends(actions: &[Action]) -> Vec<&Message> {
    actions.iter().filter_map(|a| if let Action::Send(m) = a { Some(m) } else { None }).collect()
}

fn kinds(msgs: &[Message]) -> Vec<(u64, &'static str)> {
    msgs.iter().map(|m| (m.to.0, m.body.kind())).collect()
}

// ----- elections ------------------------------------------------------------------------

#[test]
fn election_timeout_is_randomized_within_bounds_and_seeded() {
    // Reference: Raft §5.2, randomized election timeouts.
    let c = cfg();
    let deadlines: Vec<u64> = (0..20u64).map(|seed| TestNode::new(1, &c, seed).engine.next_deadline().0).collect();
    assert!(deadlines.iter().all(|d| (100..200).contains(d)), "{deadlines:?}");
    let distinct: BTreeSet<_> = deadlines.iter().collect();
    assert!(distinct.len() > 10, "timeouts should differ between seeds: {deadlines:?}");
    assert_eq!(TestNode::new(1, &c, 7).engine.next_deadline(), TestNode::new(1, &c, 7).engine.next_deadline());
}

#[test]
fn pre_vote_round_does_not_change_the_term() {
    // Reference: Raft thesis §9.6.
    let mut c = Cluster::initialized(&[1, 2, 3], cfg());
    c.fire(1);
    assert_eq!(c.engine(1).role(), Role::PreCandidate);
    assert_eq!(c.engine(1).term(), Term(0));
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "pre_vote"), (3, "pre_vote")]);
    assert!(out.iter().all(|m| m.term == Term(1)), "pre-vote asks for the next term");
    assert!(!c.nodes[&n(1)].seen.iter().any(|a| matches!(a, Action::SaveVote { vote, .. } if vote.term > Term(0))));
    // One grant makes a quorum of three: now it campaigns for real.
    let m = out.into_iter().next().unwrap();
    c.deliver(m);
    let resp = c.take_outbox(2);
    assert_eq!(kinds(&resp), vec![(1, "pre_vote_resp")]);
    assert_eq!(c.engine(2).term(), Term(0), "a pre-vote does not bump the voter's term");
    c.deliver(resp.into_iter().next().unwrap());
    assert_eq!(c.engine(1).role(), Role::Candidate);
    assert_eq!(c.engine(1).term(), Term(1));
}

#[test]
fn pre_vote_is_refused_while_a_leader_is_alive() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    // Node 3 is partitioned away, times out, and asks for pre-votes.
    c.now = c.now.add_ms(10);
    let now = c.now;
    let term = c.engine(3).term();
    c.node(3).engine.handle_timeout(now.add_ms(500));
    let out = c.take_outbox(3);
    let to2 = out.into_iter().find(|m| m.to == n(2)).unwrap();
    c.deliver(to2);
    let resp = c.take_outbox(2);
    assert_eq!(resp.len(), 1);
    assert_eq!(resp[0].body, MessageBody::PreVoteResp { granted: false });
    assert_eq!(c.engine(2).term(), term);
    assert_eq!(c.engine(1).role(), Role::Leader);
}

#[test]
fn candidate_counts_its_own_vote_only_once_durable() {
    let mut c = Cluster::initialized(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    c.node(1).auto_sync = false;
    c.fire(1);
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "vote"), (3, "vote")], "vote requests go out before the vote is durable");
    c.deliver(out[0].clone());
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Candidate, "one grant plus a non-durable self-vote is no quorum");
    let now = c.now;
    c.node(1).sync(now);
    assert_eq!(c.engine(1).role(), Role::Leader);
}

#[test]
fn vote_is_answered_only_once_durable() {
    let mut c = Cluster::initialized(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    c.node(2).auto_sync = false;
    c.fire(1);
    let out = c.take_outbox(1);
    c.deliver(out.into_iter().find(|m| m.to == n(2)).unwrap());
    let now = c.now;
    let actions = c.node(2).run(now);
    assert!(matches!(actions[0], Action::SaveVote { vote: Vote { term: Term(1), voted_for: Some(NodeId(1)) }, .. }));
    assert!(sends(&actions).is_empty(), "no answer before the vote is durable: {actions:?}");
    let now = c.now;
    c.node(2).sync(now);
    let resp = c.take_outbox(2);
    assert_eq!(resp.len(), 1);
    assert_eq!(resp[0].body, MessageBody::VoteResp { granted: true });
}

#[test]
fn vote_refused_to_a_candidate_with_an_older_log() {
    // Reference: Raft §5.4.1, election restriction.
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    c.cut.insert((n(1), n(3)));
    c.propose(1, "x");
    c.stabilize();
    // Node 3 missed "x"; it campaigns and node 2 refuses.
    c.fire(3);
    c.stabilize();
    assert_ne!(c.engine(3).role(), Role::Leader);
    let refused = c.nodes[&n(2)]
        .seen
        .iter()
        .any(|a| matches!(a, Action::Send(m) if m.to == n(3) && m.body == MessageBody::VoteResp { granted: false }));
    assert!(refused);
}

#[test]
fn check_quorum_steps_down_a_leader_that_lost_its_quorum() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    for p in [2, 3] {
        c.cut.insert((n(p), n(1)));
    }
    for _ in 0..20 {
        c.advance(20);
        c.stabilize();
        if c.engine(1).role() != Role::Leader {
            break;
        }
    }
    assert_eq!(c.engine(1).role(), Role::Follower);
    assert!(c.now.0 < 2000 + 300, "within about one election timeout: {:?}", c.now);
}

// ----- replication ----------------------------------------------------------------------

#[test]
fn leader_sends_before_it_persists_and_counts_itself_once_durable() {
    // Reference: Raft thesis §10.2.1.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.node(1).auto_sync = false;
    let idx = c.propose(1, "a");
    let now = c.now;
    let actions = c.node(1).run(now);
    let append_pos = actions.iter().position(|a| matches!(a, Action::AppendEntries { .. })).unwrap();
    let send_pos = actions
        .iter()
        .position(|a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::Append { .. })))
        .unwrap();
    assert!(append_pos < send_pos);
    assert!(c.nodes[&n(1)].unsynced.len() == 1, "the leader's write is not durable yet");
    // Only node 2 answers: node 2 + a non-durable leader is no quorum.
    c.cut.insert((n(1), n(3)));
    c.stabilize();
    assert!(c.engine(1).committed() < idx);
    let now = c.now;
    c.node(1).sync(now);
    assert_eq!(c.engine(1).committed(), idx);
}

#[test]
fn pipelined_appends_fill_the_window_then_wait() {
    let config = Config { inflight_msgs_max: 3, append_entries_max: 2, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2], config);
    let now = c.now;
    let cmds: Vec<Bytes> = (0..10).map(|i| Bytes::from(format!("c{i}"))).collect();
    c.node(1).engine.propose(now, cmds).unwrap();
    let out = c.take_outbox(1);
    let appends: Vec<_> = out
        .iter()
        .filter_map(|m| if let MessageBody::Append { entries, .. } = &m.body { Some(entries.len()) } else { None })
        .collect();
    assert_eq!(appends, vec![2, 2, 2], "three messages of two entries, then the window is full");
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert_eq!(c.engine(2).last_log_id(), c.engine(1).last_log_id());
    assert_eq!(c.engine(1).committed(), c.engine(1).last_log_id().index);
}

#[test]
fn append_messages_respect_the_byte_limit() {
    let config = Config { append_bytes_max: 250, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2], config);
    let now = c.now;
    let cmds: Vec<Bytes> = (0..4).map(|_| Bytes::from(vec![1u8; 100])).collect();
    c.node(1).engine.propose(now, cmds).unwrap();
    let out = c.take_outbox(1);
    let sizes: Vec<usize> = out
        .iter()
        .filter_map(|m| {
            if let MessageBody::Append { entries, .. } = &m.body {
                Some(entries.iter().map(|e| e.size_bytes()).sum())
            } else {
                None
            }
        })
        .collect();
    assert!(sizes.len() >= 2, "split across messages: {sizes:?}");
    assert!(sizes.iter().all(|s| *s <= 250), "{sizes:?}");
}

#[test]
fn conflict_hint_backs_off_a_whole_term_per_round_trip() {
    // Follower 2 has many entries of a stale term; the leader needs one rejection, not one
    // per entry, to find the match point.
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    let base = c.engine(1).last_log_id();
    // Node 1 leads, node 2 isolated takes no part; node 1 appends 20 entries nobody gets.
    c.cut.insert((n(1), n(2)));
    c.cut.insert((n(1), n(3)));
    for i in 0..20 {
        c.propose(1, &format!("lost{i}"));
    }
    c.stabilize();
    // Node 3 becomes leader with node 2 and writes in a new term.
    c.cut.clear();
    c.cut.insert((n(1), n(2)));
    c.cut.insert((n(1), n(3)));
    c.cut.insert((n(2), n(1)));
    c.cut.insert((n(3), n(1)));
    c.elect(3);
    c.propose(3, "won");
    c.stabilize();
    c.cut.clear();
    // Node 1 hears from node 3 and rejects once; the hint lets node 3 skip the stale term.
    c.propose(3, "more");
    c.settle(4);
    let rejects = c.nodes[&n(1)]
        .seen
        .iter()
        .filter(|a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::AppendResp(AppendResult::Conflict { .. }))))
        .count();
    assert!(rejects <= 2, "fast back-off: {rejects} rejections");
    assert_eq!(c.engine(1).last_log_id(), c.engine(3).last_log_id());
    assert!(c.applied_data(1).contains(&"won".to_string()));
    assert!(!c.applied_data(1).iter().any(|d| d.starts_with("lost")));
    assert!(c.engine(1).last_log_id().index > base.index);
}

#[test]
fn entries_of_earlier_terms_commit_only_with_a_current_term_entry() {
    // Reference: Raft §5.4.2 (figure 8).
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    // Leader 1 appends "old" and it reaches nobody.
    c.cut.extend([(n(1), n(2)), (n(1), n(3))]);
    let old = c.propose(1, "old");
    c.stabilize();
    c.cut.clear();
    // Node 1 campaigns again in a higher term; the voters' logs are older so they grant.
    c.elect(1);
    // Before the new term's blank entry is replicated, "old" must not count as committed even
    // though the new leader has it: stop node 1's outgoing traffic right after election.
    assert!(c.engine(1).committed() >= old, "committed together with the new term's entry");
    let t = c.engine(1).term();
    assert_eq!(c.engine(1).term_at(c.engine(1).committed()), Some(t));

    // Direct check on the rule: a leader whose only replicated entries are of an old term does
    // not advance its commit index.
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    c.cut.extend([(n(1), n(2)), (n(1), n(3))]);
    let old = c.propose(1, "old");
    c.stabilize();
    c.cut.clear();
    c.now = c.now.add_ms(1000);
    c.fire(1);
    // Deliver votes but drop the new leader's appends to everyone: "old" is on the leader only.
    let mut became = false;
    c.stabilize_with(|m| {
        let drop = m.from == n(1) && matches!(m.body, MessageBody::Append { .. });
        became |= drop;
        !drop
    });
    assert!(became);
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert!(c.engine(1).committed() < old);
}

#[test]
fn lagging_follower_is_caught_up_from_storage_when_not_cached() {
    let config = Config { entry_cache_bytes_max: 0, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut.insert((n(1), n(3)));
    for i in 0..30 {
        c.propose(1, &format!("v{i}"));
        c.stabilize();
    }
    c.cut.clear();
    // The appends to node 3 were lost: after two heartbeat intervals without progress the
    // leader probes again, and the entries come from storage.
    for _ in 0..3 {
        c.advance(20);
        c.stabilize();
    }
    assert!(c.nodes[&n(1)].seen.iter().any(|a| matches!(a, Action::LoadEntries { peer, .. } if *peer == n(3))));
    assert_eq!(c.applied_data(3).len(), 30);
}

// ----- membership -----------------------------------------------------------------------

#[test]
fn learner_receives_the_log_but_does_not_count() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    c.propose(1, "x");
    c.stabilize();
    assert_eq!(c.applied_data(4), vec!["x".to_string()]);
    assert_eq!(c.engine(4).role(), Role::Learner);
    // Nodes 2 and 3 down: the learner cannot make a quorum with the leader.
    c.cut.extend([(n(2), n(1)), (n(3), n(1))]);
    let idx = c.propose(1, "y");
    c.stabilize();
    assert!(c.engine(1).committed() < idx);
    // A learner never campaigns.
    c.now = c.now.add_ms(5000);
    let now = c.now;
    c.node(4).engine.handle_timeout(now);
    assert_eq!(c.engine(4).role(), Role::Learner);
    assert!(c.take_outbox(4).is_empty());
}

#[test]
fn joint_consensus_needs_both_majorities_then_leaves_automatically() {
    // Reference: Raft thesis §4.3.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    for id in [4, 5] {
        c.nodes.insert(n(id), TestNode::new(id, &cfg(), id));
    }
    // New voters 1,4,5 while the old are 1,2,3. Cut 4 and 5: the joint entry can reach a
    // majority of the old set but not of the new.
    c.cut.extend([(n(1), n(4)), (n(1), n(5))]);
    let now = c.now;
    let joint = c.node(1).engine.change_membership(now, voters(&[1, 4, 5])).unwrap();
    c.stabilize();
    assert!(c.engine(1).membership().membership.is_joint());
    assert!(c.engine(1).committed() < joint, "old majority alone does not commit the joint entry");
    assert_eq!(c.node(1).engine.change_membership(now, voters(&[1, 2])), Err(RaftError::ChangeInProgress));
    c.cut.clear();
    c.advance(20);
    c.stabilize();
    let m = c.engine(1).committed_membership().clone();
    assert!(!m.membership.is_joint(), "leader leaves the joint configuration on its own");
    assert_eq!(m.membership.voters, voters(&[1, 4, 5]));
    c.propose(1, "after");
    c.stabilize();
    assert_eq!(c.applied_data(5), vec!["after".to_string()]);
}

#[test]
fn promoting_a_learner_and_removing_the_leader() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[2, 3, 4])).unwrap();
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Follower, "a removed leader steps down once the change commits");
    assert_eq!(c.engine(2).committed_membership().membership.voters, voters(&[2, 3, 4]));
    assert!(c.engine(2).committed_membership().membership.learners.is_empty());
    // The remaining voters elect a leader; node 1 does not campaign.
    c.now = c.now.add_ms(1000);
    let now = c.now;
    c.node(1).engine.handle_timeout(now);
    assert!(c.take_outbox(1).is_empty());
    c.elect(4);
    c.propose(4, "z");
    c.stabilize();
    assert_eq!(c.applied_data(2).last().map(String::as_str), Some("z"));
}

// ----- leadership transfer --------------------------------------------------------------

#[test]
fn transfer_sends_timeout_now_once_the_target_is_caught_up() {
    // Reference: Raft thesis §3.10.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.cut.insert((n(1), n(3)));
    c.propose(1, "a");
    c.stabilize();
    let now = c.now;
    c.node(1).engine.transfer_leader(now, n(3)).unwrap();
    assert_eq!(c.node(1).engine.propose(now, vec![Bytes::new()]), Err(RaftError::TransferInProgress));
    let out = c.take_outbox(1);
    assert!(!out.iter().any(|m| m.body == MessageBody::TimeoutNow), "target is behind: no TimeoutNow yet");
    c.cut.clear();
    for m in out {
        c.deliver(m);
    }
    c.settle(3);
    assert!(c.nodes[&n(1)]
        .seen
        .iter()
        .any(|a| matches!(a, Action::Send(m) if m.to == n(3) && m.body == MessageBody::TimeoutNow)));
    assert_eq!(c.engine(3).role(), Role::Leader, "voters grant despite their lease: it is a transfer");
    assert_eq!(c.engine(1).role(), Role::Follower);
    assert_eq!(c.engine(1).leader(), Some(n(3)));
}

#[test]
fn transfer_to_a_learner_is_refused() {
    let mut c = Cluster::with_leader(&[1, 2], cfg());
    c.add_learner(1, 3);
    let now = c.now;
    assert!(matches!(c.node(1).engine.transfer_leader(now, n(3)), Err(RaftError::InvalidTarget(..))));
}

// ----- reads ----------------------------------------------------------------------------

#[test]
fn read_index_waits_for_a_quorum_heartbeat_round() {
    // Reference: Raft thesis §6.4.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let idx = c.propose(1, "x");
    c.stabilize();
    let now = c.now;
    c.node(1).engine.read(now, 7, ReadMode::ReadIndex);
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "heartbeat"), (3, "heartbeat")]);
    assert!(c.nodes[&n(1)].reads.is_empty(), "not before a quorum answered");
    c.deliver(out[0].clone());
    let resp = c.take_outbox(2);
    c.deliver(resp[0].clone());
    c.node(1).run(now);
    assert_eq!(c.nodes[&n(1)].reads, vec![(7, Ok(idx))]);
}

#[test]
fn read_on_a_follower_fails_with_the_leader_hint() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    c.node(2).engine.read(now, 1, ReadMode::ReadIndex);
    c.node(2).run(now);
    assert_eq!(c.nodes[&n(2)].reads, vec![(1, Err(RaftError::NotLeader { leader: Some(n(1)) }))]);
}

#[test]
fn lease_read_is_immediate_inside_the_lease_and_not_after() {
    // Reference: Raft thesis §6.4.1.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.advance(20);
    c.stabilize();
    let now = c.now;
    c.node(1).engine.read(now, 1, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.is_empty(), "no round trip inside the lease");
    assert_eq!(c.nodes[&n(1)].reads.len(), 1);
    // Followers stop answering; after the lease (100 - 10 ms) the read needs a round.
    c.cut.extend([(n(2), n(1)), (n(3), n(1))]);
    c.now = c.now.add_ms(95);
    let now = c.now;
    c.node(1).engine.read(now, 2, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })));
    assert_eq!(c.nodes[&n(1)].reads.len(), 1, "lease expired: no immediate answer");
}

#[test]
fn reads_wait_for_the_first_commit_of_the_term() {
    let mut c = Cluster::initialized(&[1, 2, 3], cfg());
    c.stabilize();
    c.now = c.now.add_ms(1000);
    c.fire(1);
    // Run the election but hold back the new leader's appends.
    c.stabilize_with(|m| !matches!(m.body, MessageBody::Append { .. }));
    assert_eq!(c.engine(1).role(), Role::Leader);
    let now = c.now;
    c.node(1).engine.read(now, 5, ReadMode::ReadIndex);
    c.node(1).run(now);
    assert!(c.nodes[&n(1)].reads.is_empty());
    c.advance(20);
    c.stabilize();
    assert_eq!(c.nodes[&n(1)].reads.len(), 1);
    assert!(c.nodes[&n(1)].reads[0].1.is_ok());
}

// ----- snapshots ------------------------------------------------------------------------

#[test]
fn snapshot_policy_builds_after_the_threshold_and_purges_the_log() {
    // Entries 1 (configuration) and 2 (the leader's blank entry) count too.
    let config = Config { snapshot_threshold_entries: 8, log_keep_entries_after_snapshot: 2, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    for i in 0..3 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    assert!(!c.nodes[&n(1)].seen.contains(&Action::BuildSnapshot));
    for i in 3..6 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    assert!(c.nodes[&n(1)].seen.contains(&Action::BuildSnapshot));
    let snap = c.nodes[&n(1)].snapshot.as_ref().unwrap().0.last_log_id;
    let purged = c.nodes[&n(1)].seen.iter().find_map(|a| {
        if let Action::PurgeUpTo { log_id, .. } = a {
            Some(*log_id)
        } else {
            None
        }
    });
    assert_eq!(purged.map(|p| p.index.0), Some(snap.index.0 - 2), "keeps two entries behind the snapshot");
}

#[test]
fn snapshot_is_streamed_in_chunks_and_resumes_after_a_lost_chunk() {
    let config = Config { snapshot_chunk_bytes: 3, snapshot_chunks_in_flight_max: 2, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut.insert((n(1), n(3)));
    for i in 0..5 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    c.node(1).engine.trigger_snapshot();
    c.stabilize();
    // The snapshot is 10 bytes: chunks of 3, two in flight. Node 3's lost appends are noticed
    // after two heartbeat intervals; its next probe finds the entries purged.
    c.cut.clear();
    let mut out = Vec::new();
    for _ in 0..5 {
        c.advance(20);
        out = c.take_outbox(1);
        if out.iter().any(|m| matches!(m.body, MessageBody::Snapshot { .. })) {
            break;
        }
        for m in std::mem::take(&mut out) {
            c.deliver(m);
        }
        c.stabilize();
    }
    let chunks: Vec<(u64, usize, bool)> = out
        .iter()
        .filter(|m| m.to == n(3))
        .filter_map(|m| {
            if let MessageBody::Snapshot { offset, data, done, .. } = &m.body {
                Some((*offset, data.len(), *done))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(chunks, vec![(0, 3, false), (3, 3, false)]);
    // Lose the first chunk; the second is refused as out of order.
    for m in out {
        if !matches!(&m.body, MessageBody::Snapshot { offset: 0, .. }) {
            c.deliver(m);
        }
    }
    let resp = c.take_outbox(3);
    assert!(resp.iter().any(|m| matches!(m.body, MessageBody::SnapshotResp { next_offset: 0, installed: None, .. })));
    for m in resp {
        c.deliver(m);
    }
    c.stabilize();
    assert!(c.applied_data(3).is_empty());
    // After the resend timeout the leader resends from the acknowledged offset.
    for _ in 0..5 {
        c.advance(20);
        c.stabilize();
    }
    assert_eq!(c.nodes[&n(3)].sm_applied, c.nodes[&n(1)].snapshot.as_ref().unwrap().0.last_log_id);
    c.propose(1, "after");
    c.stabilize();
    assert_eq!(c.applied_data(3), vec!["after".to_string()]);
    assert_eq!(c.engine(3).last_log_id(), c.engine(1).last_log_id());
}

#[test]
fn a_leader_that_sent_timeout_now_never_serves_lease_reads_again_in_its_term() {
    // The target may win an election that ignores leases even after the transfer timed out
    // at the leader (e.g. TimeoutNow was delayed), so the lease must stay void.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.settle(1);
    let now = c.now;
    c.node(1).engine.transfer_leader(now, n(2)).unwrap();
    // TimeoutNow goes out (the target is caught up) but is lost.
    let out = c.take_outbox(1);
    assert!(out.iter().any(|m| m.body == MessageBody::TimeoutNow));
    // The transfer times out; heartbeats keep flowing.
    c.settle(12);
    assert_eq!(c.engine(1).role(), Role::Leader);
    let now = c.now;
    c.node(1).engine.read(now, 9, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(c.nodes[&n(1)].reads.is_empty(), "no lease read without a round trip");
    assert!(out.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })), "falls back to ReadIndex");
}

#[test]
fn a_node_removed_by_an_uncommitted_configuration_still_campaigns() {
    // Found by the simulator (seed 1531): node 3 alone held the entry that removes it; the
    // others needed its vote (their configuration is still joint) and it refused them for
    // having a shorter log, while it never campaigned itself: no leader, ever.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[1, 2, 4])).unwrap();
    // Let the joint entry commit everywhere, but the final entry reach only node 3.
    let mut final_seen = false;
    c.stabilize_with(|m| {
        let carries_final = matches!(&m.body, MessageBody::Append { entries, .. }
            if entries.iter().any(|e| e.membership().is_some_and(|m| !m.is_joint() && m.voters.len() == 3 && !m.voters.contains(&n(3)))));
        final_seen |= carries_final;
        // Once the final configuration is out, node 1's messages reach only node 3.
        !(final_seen && m.from == n(1) && m.to != n(3))
    });
    assert!(final_seen);
    assert!(!c.engine(3).membership().membership.is_voter(n(3)), "node 3 holds its removal");
    assert!(c.engine(2).membership().membership.is_joint(), "node 2 does not");
    // The leader dies. Node 3 must campaign: it is a voter of the joint configuration, which
    // is the last one it knows to be committed.
    c.nodes.remove(&n(1));
    c.now = c.now.add_ms(1000);
    let now = c.now;
    c.node(3).engine.handle_timeout(now);
    let out = c.take_outbox(3);
    assert!(
        out.iter().any(|m| matches!(m.body, MessageBody::PreVote { .. } | MessageBody::Vote { .. })),
        "node 3 campaigns: {out:?}"
    );
}

#[test]
fn a_vote_request_from_an_older_term_is_refused_with_our_term() {
    // Found by the simulator (seed 508): the candidate with the most up-to-date log never
    // learned the higher term of a candidate that could not win, and stayed behind forever.
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    let now = c.now;
    let stale = Message {
        from: n(3),
        to: n(2),
        term: Term(0),
        body: MessageBody::Vote { last_log_id: LogId::new(9, 99), transfer: false },
    };
    c.node(2).engine.handle_message(now, stale);
    let out = c.take_outbox(2);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].body, MessageBody::VoteResp { granted: false });
    assert_eq!(out[0].term, c.engine(2).term());
}

#[test]
fn initialize_refuses_a_membership_without_this_node_and_add_learner_refuses_a_voter() {
    let mut node = TestNode::new(1, &cfg(), 1);
    let err = node.engine.initialize(Millis(0), Membership::new([n(2), n(3)])).unwrap_err();
    assert!(matches!(err, RaftError::InvalidMembership(_)), "{err:?}");
    assert!(node.engine.is_pristine(), "nothing was written");
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    assert!(matches!(c.node(1).engine.add_learner(now, n(2)), Err(RaftError::InvalidTarget(..))));
}

#[test]
fn reads_registered_together_share_one_heartbeat_round() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let now = c.now;
    for id in 0..10 {
        c.node(1).engine.read(now, id, ReadMode::ReadIndex);
    }
    let out = c.take_outbox(1);
    assert_eq!(kinds(&out), vec![(2, "heartbeat"), (3, "heartbeat")], "one round for ten reads");
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert_eq!(c.nodes[&n(1)].reads.len(), 10);
}

#[test]
fn a_refused_vote_request_from_a_higher_term_does_not_reset_the_election_timer() {
    // Reference: Raft §5.2. Found by the simulator (seed 12, 40% clock drift, no pre-vote).
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    c.propose(1, "x");
    c.stabilize();
    c.nodes.remove(&n(1));
    let deadline = c.engine(2).next_deadline();
    // Node 3 (with an older log) asks node 2 for votes in ever higher terms.
    for t in 0..5u64 {
        let now = c.now.add_ms(10 * t);
        let term = c.engine(2).term().next();
        let m = Message {
            from: n(3),
            to: n(2),
            term,
            body: MessageBody::Vote { last_log_id: LogId::new(1, 1), transfer: false },
        };
        c.node(2).engine.handle_message(now, m);
        c.node(2).run(now);
        assert_eq!(c.engine(2).next_deadline(), deadline, "refusing a vote does not push the timer out");
    }
}

#[test]
fn a_candidate_with_a_quorum_of_other_votes_still_waits_for_its_own_vote_to_be_durable() {
    // Otherwise a crash could let it lead the same term twice (review finding).
    let mut c = Cluster::initialized(&[1, 2, 3], Config { pre_vote: false, ..cfg() });
    c.node(1).auto_sync = false;
    c.fire(1);
    c.stabilize();
    assert_eq!(c.engine(1).role(), Role::Candidate, "both other voters granted, but our vote is not durable");
    let leader_entries = |a: &Action| matches!(a, Action::AppendEntries { entries, .. } if entries.iter().any(|e| e.log_id.term > Term(0)));
    assert!(!c.nodes[&n(1)].seen.iter().any(leader_entries), "no entry of the new term yet");
    let now = c.now;
    c.node(1).sync(now);
    assert_eq!(c.engine(1).role(), Role::Leader);
}

#[test]
fn a_restarted_node_keeps_refusing_votes_for_one_election_timeout() {
    // A lease read relies on every node that acknowledged the leader refusing votes for
    // election_timeout_ms_min, even across a restart (review finding).
    let state = InitialState {
        vote: Vote { term: Term(3), voted_for: Some(n(1)) },
        last_purged: LogId::ZERO,
        term_points: vec![LogId::new(0, 1)],
        last_log_id: LogId::new(0, 1),
        applied_membership: StoredMembership::default(),
        log_memberships: vec![StoredMembership {
            log_id: LogId::new(0, 1),
            membership: Membership::new([n(1), n(2), n(3)]),
        }],
        ..Default::default()
    };
    let mut e = Engine::new(n(2), Arc::new(cfg()), state.clone(), 1, Millis(1000));
    let vote = |term| Message {
        from: n(3),
        to: n(2),
        term: Term(term),
        body: MessageBody::Vote { last_log_id: LogId::new(3, 9), transfer: false },
    };
    e.handle_message(Millis(1050), vote(4));
    assert_eq!(e.term(), Term(3), "ignored inside the window");
    assert!(e.poll_action().is_none());
    e.handle_message(Millis(1000 + 100), vote(4));
    assert_eq!(e.term(), Term(4), "granted once the window has passed");
    // A node with no state has promised nothing.
    let mut fresh = Engine::new(n(2), Arc::new(cfg()), InitialState::default(), 1, Millis(1000));
    fresh.handle_message(Millis(1001), vote(4));
    assert_eq!(fresh.term(), Term(4));
}

#[test]
fn snapshot_chunks_are_ignored_while_one_is_being_installed() {
    let mut c = Cluster::with_leader(&[1, 2], cfg());
    let meta = |id, last: u64| SnapshotMeta {
        last_log_id: LogId::new(1, last),
        membership: c.engine(2).committed_membership().clone(),
        snapshot_id: id,
        size_bytes: 4,
    };
    let (m1, m2) = (meta(1, 50), meta(2, 60));
    let term = c.engine(1).term();
    let chunk = |m: &SnapshotMeta| Message {
        from: n(1),
        to: n(2),
        term,
        body: MessageBody::Snapshot { meta: m.clone(), offset: 0, data: Bytes::from_static(b"abcd"), done: true },
    };
    let now = c.now;
    let e = &mut c.node(2).engine;
    e.handle_message(now, chunk(&m1));
    let mut acts = Vec::new();
    while let Some(a) = e.poll_action() {
        acts.push(a);
    }
    assert!(acts.iter().any(|a| matches!(a, Action::InstallSnapshot { meta } if *meta == m1)));
    // While S1 installs, S2 arrives: nothing may start.
    e.handle_message(now, chunk(&m2));
    assert!(e.poll_action().is_none(), "no second snapshot while one installs");
    // A malformed chunk (beyond the snapshot's size) is dropped too.
    e.handle_snapshot_installed(now, m1.clone());
    while e.poll_action().is_some() {}
    let bad = Message {
        from: n(1),
        to: n(2),
        term,
        body: MessageBody::Snapshot { meta: m2.clone(), offset: 2, data: Bytes::from_static(b"abcd"), done: true },
    };
    e.handle_message(now, bad);
    assert!(e.poll_action().is_none(), "malformed chunk dropped");
}

#[test]
fn a_malformed_append_is_dropped_not_trusted() {
    let mut c = Cluster::with_leader(&[1, 2], cfg());
    let term = c.engine(1).term();
    let last = c.engine(2).last_log_id();
    let bad = Message {
        from: n(1),
        to: n(2),
        term,
        // Entries that do not follow `prev`.
        body: MessageBody::Append {
            prev: last,
            entries: vec![Entry {
                log_id: LogId { term, index: LogIndex(last.index.0 + 5) },
                payload: EntryPayload::Blank,
            }],
            commit: LogIndex(0),
        },
    };
    let now = c.now;
    c.node(2).engine.handle_message(now, bad);
    assert!(c.take_outbox(2).is_empty());
    assert_eq!(c.engine(2).last_log_id(), last);
}

#[test]
fn quiescence_needs_an_idle_caught_up_group_and_wake_resumes_the_timers() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.stabilize();
    let all = |_: NodeId| true;
    let (term, last) = c.engine(1).quiesce_point(all).expect("idle after stabilizing");
    assert_eq!(last, c.engine(1).last_log_id().index);
    for id in [2, 3] {
        assert!(c.engine(id).can_quiesce_follower(n(1), term, last));
        assert!(!c.engine(id).can_quiesce_follower(n(2), term, last), "not its leader");
        assert!(c.engine(id).quiesce_point(all).is_none(), "followers have no quiesce point");
    }
    // A proposal in flight: not idle, and a follower missing the entry refuses to go quiet.
    c.propose(1, "x");
    assert!(c.engine(1).quiesce_point(all).is_none());
    let new_last = c.engine(1).last_log_id().index;
    assert!(!c.engine(2).can_quiesce_follower(n(1), term, new_last));
    // A follower that is down (3's messages cut) does not keep the group awake; one that is
    // up and behind does.
    c.cut.extend([(n(1), n(3)), (n(3), n(1))]);
    c.stabilize();
    assert!(c.engine(1).quiesce_point(all).is_none(), "3 is behind and counted as live");
    assert!(c.engine(1).quiesce_point(|id| id != n(3)).is_some(), "3 is down: ignored");
    // Wake: a leader heartbeats at once; a follower restarts its election timer from now.
    c.now = c.now.add_ms(10_000);
    let now = c.now;
    c.node(1).engine.wake(now, true);
    assert_eq!(c.engine(1).next_deadline(), now);
    c.node(2).engine.wake(now, true);
    assert!(c.engine(2).next_deadline() > now, "no instant election after a long quiet spell");
    assert!(c.engine(2).in_lease(now), "the live leader counts as heard from");
    c.node(3).engine.wake(now, false);
    assert!(!c.engine(3).in_lease(now), "a dead leader is not counted as heard from");
}

// ----- replica lifecycle ----------------------------------------------------------------

/// Node 2 acknowledged "x" with leader 1; its state is then deleted and it comes back empty
/// (a replica destroyed and re-created). Node 3 never saw "x". With leader 1 gone, node 3 must
/// not win an election with the empty node's vote: that would lose an acknowledged entry.
fn cluster_with_an_emptied_voter(pre_vote: bool) -> Cluster {
    let config = Config { pre_vote, check_quorum: false, lease_read: false, votes_need_configuration: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config.clone());
    c.cut.extend([(n(1), n(3))]);
    let x = c.propose(1, "x");
    c.stabilize();
    assert!(c.engine(1).committed() >= x, "x is committed by nodes 1 and 2");
    c.nodes.insert(n(2), TestNode::new(2, &config, 7));
    c.cut.extend([(n(1), n(2)), (n(2), n(1)), (n(3), n(1))]);
    c
}

/// Node 3 campaigns (with or without pre-vote); the emptied node 2 must refuse it.
fn an_empty_replica_refuses(pre_vote: bool, refusal: MessageBody) {
    let mut c = cluster_with_an_emptied_voter(pre_vote);
    c.now = c.now.add_ms(1000);
    c.fire(3);
    c.stabilize();
    assert_ne!(c.engine(3).role(), Role::Leader, "node 3 lacks the acknowledged entry");
    let refused = c.nodes[&n(2)].seen.iter().any(|a| matches!(a, Action::Send(m) if m.to == n(3) && m.body == refusal));
    assert!(refused, "the empty replica refuses: {refusal:?}");
    assert!(!c.engine(2).has_configuration());
}

#[test]
fn an_empty_replica_grants_no_pre_vote() {
    an_empty_replica_refuses(true, MessageBody::PreVoteResp { granted: false });
}

#[test]
fn an_empty_replica_grants_no_vote() {
    an_empty_replica_refuses(false, MessageBody::VoteResp { granted: false });
}

#[test]
fn without_the_rule_an_empty_replica_votes_as_a_cluster_formed_by_one_member_needs() {
    let config = Config { votes_need_configuration: false, ..cfg() };
    let mut c = Cluster::new(&[1, 2, 3], config);
    let now = c.now;
    c.node(1).engine.initialize(now, Membership::new([n(1), n(2), n(3)])).expect("init");
    c.elect(1);
    assert!(c.engine(2).has_configuration(), "the elected leader hands its configuration on");
}

#[test]
fn remove_learner_stops_replication_to_it_and_refuses_a_voter() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.add_learner(1, 4);
    c.propose(1, "a");
    c.stabilize();
    assert_eq!(c.applied_data(4), vec!["a".to_string()]);
    let now = c.now;
    assert!(matches!(c.node(1).engine.remove_learner(now, n(2)), Err(RaftError::InvalidTarget(..))));
    let idx = c.node(1).engine.remove_learner(now, n(4)).expect("leader removes a learner");
    c.stabilize();
    assert!(c.engine(1).committed() >= idx);
    assert!(!c.engine(1).committed_membership().membership.contains(n(4)));
    // Removing it again changes nothing.
    let now = c.now;
    assert_eq!(c.node(1).engine.remove_learner(now, n(4)), Ok(c.engine(1).membership().log_id.index));
    c.propose(1, "b");
    c.settle(3);
    assert_eq!(c.applied_data(4), vec!["a".to_string()], "nothing is sent to a removed learner");
    assert_eq!(c.applied_data(2), vec!["a".to_string(), "b".to_string()]);
}

#[test]
fn with_the_rule_a_learner_becomes_a_voter_once_it_holds_the_configuration_entry() {
    let config = Config { votes_need_configuration: true, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    // Node 4 is added as a learner while cut off: it has not received the configuration.
    c.cut.insert((n(1), n(4)));
    c.add_learner(1, 4);
    let now = c.now;
    assert!(matches!(
        c.node(1).engine.change_membership(now, voters(&[1, 2, 3, 4])),
        Err(RaftError::InvalidTarget(t, _)) if t == n(4)
    ));
    // Once it matched the configuration entry (and nothing after it), it may be promoted.
    c.cut.clear();
    c.settle(3);
    let conf = c.engine(1).membership().log_id.index;
    assert_eq!(c.engine(4).last_log_id().index, conf, "the learner holds exactly the configuration entry");
    let now = c.now;
    c.node(1).engine.change_membership(now, voters(&[1, 2, 3, 4])).expect("a learner holding the configuration");
}

#[test]
fn the_lease_ends_exactly_election_timeout_less_drift_after_the_acknowledged_round_was_sent() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.advance(20);
    c.stabilize();
    // A heartbeat round sent at `t` and acknowledged by both followers.
    let t = c.now;
    c.node(1).engine.read(t, 1, ReadMode::ReadIndex);
    c.stabilize();
    assert_eq!(c.nodes[&n(1)].reads.len(), 1);
    c.cut.extend([(n(2), n(1)), (n(3), n(1))]);
    // cfg(): election timeouts from 100 ms, 10 ms of clock drift: the lease lasts 90 ms.
    c.node(1).engine.read(t.add_ms(89), 2, ReadMode::Lease);
    c.node(1).run(t.add_ms(89));
    assert_eq!(c.nodes[&n(1)].reads.len(), 2, "inside the lease: answered at once");
    c.node(1).engine.read(t.add_ms(90), 3, ReadMode::Lease);
    c.node(1).run(t.add_ms(90));
    assert_eq!(c.nodes[&n(1)].reads.len(), 2, "the lease has ended: the read waits for a heartbeat round");
}

#[test]
fn lease_reads_stay_immediate_after_entries_past_the_first_commit_of_the_term() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let x = c.propose(1, "x");
    c.advance(20);
    c.stabilize();
    assert_eq!(c.engine(1).committed(), x);
    let now = c.now;
    c.node(1).engine.read(now, 1, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.is_empty(), "no round trip inside the lease");
    assert_eq!(c.nodes[&n(1)].reads, vec![(1, Ok(x))]);
}

#[test]
fn a_leader_deposed_by_a_higher_term_waits_a_whole_election_timeout_before_campaigning() {
    let config = Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    // Long enough that the election deadline set when node 1 campaigned is far in the past.
    c.settle(20);
    let now = c.now;
    let term = c.engine(1).term().next();
    let body = MessageBody::Vote { last_log_id: LogId::ZERO, transfer: false };
    c.node(1).engine.handle_message(now, Message { from: n(3), to: n(1), term, body });
    assert_eq!(c.engine(1).role(), Role::Follower);
    assert_eq!(c.engine(1).term(), term);
    assert!(
        c.engine(1).next_deadline() >= now.add_ms(100),
        "a fresh election timeout, not the stale one: {:?} at {now:?}",
        c.engine(1).next_deadline()
    );
}

#[test]
fn a_pre_vote_is_granted_only_for_a_term_above_ours() {
    let config = Config { check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    let now = c.now;
    let term = c.engine(2).term();
    let last_log_id = c.engine(2).last_log_id();
    let answers = |c: &mut Cluster| -> Vec<(NodeId, Term, MessageBody)> {
        c.take_outbox(2).into_iter().map(|m| (m.to, m.term, m.body)).collect()
    };
    // A candidate a term behind asks for our current term: refused.
    c.node(2)
        .engine
        .handle_message(now, Message { from: n(3), to: n(2), term, body: MessageBody::PreVote { last_log_id } });
    assert_eq!(answers(&mut c), vec![(n(3), term, MessageBody::PreVoteResp { granted: false })]);
    // The same request for the next term is granted (no lease: check_quorum is off).
    let next = term.next();
    c.node(2)
        .engine
        .handle_message(now, Message { from: n(3), to: n(2), term: next, body: MessageBody::PreVote { last_log_id } });
    assert_eq!(answers(&mut c), vec![(n(3), next, MessageBody::PreVoteResp { granted: true })]);
    assert_eq!(c.engine(2).term(), term, "a pre-vote changes no term");
}

#[test]
fn with_lease_reads_off_a_lease_read_waits_for_a_heartbeat_round() {
    let config = Config { lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.advance(20);
    c.stabilize();
    let now = c.now;
    c.node(1).engine.read(now, 1, ReadMode::Lease);
    let out = c.take_outbox(1);
    assert!(out.iter().any(|m| matches!(m.body, MessageBody::Heartbeat { .. })), "a round, not the lease");
    assert!(c.nodes[&n(1)].reads.is_empty(), "not answered before a quorum acknowledged the round");
}
