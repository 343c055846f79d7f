//! `GroupCore` by hand: the answers its callers get as the engine and the state machine move
//! on. A single-voter group whose storage and state machine are played by the test, so each
//! step (durable, committed, applied) can be held back and observed.

use bytes::Bytes;
use flotilla_raft::group::{IndexReply, WriteCall, WriteOneReply, WriteReply};
use flotilla_raft::{
    Action, Config, CoreAction, Engine, Entry, EntryPayload, Fatal, GroupCore, InitialState, LogAction, LogId,
    LogIndex, MachineAction, Membership, Message, MessageBody, Millis, NodeId, RaftError, ReadMode, Request, Role,
    SnapshotMeta, StorageError, Term, WriteResponse,
};
use std::sync::Arc;
use tokio::sync::oneshot;

type WriteAnswer = Result<Vec<Result<WriteResponse, RaftError>>, RaftError>;

struct Group {
    core: GroupCore,
    now: Millis,
    /// Every entry made durable, by position (index - 1).
    log: Vec<Entry>,
    /// Entries the engine asked to apply that the test has not applied yet.
    to_apply: Vec<Entry>,
    /// Whether `pump` applies at once.
    apply: bool,
    /// Messages to other nodes.
    outbox: Vec<Message>,
}

impl Group {
    /// Node `id` of a group formed with `voters`.
    fn new(id: u64, voters: &[u64]) -> Group {
        Group::with_config(id, voters, Config::default())
    }

    /// Node `id` of a group formed with `voters`, on `config`.
    fn with_config(id: u64, voters: &[u64], config: Config) -> Group {
        let engine = Engine::new(NodeId(id), Arc::new(config), InitialState::default(), id, Millis(0));
        let mut g = Group {
            core: GroupCore::new(engine),
            now: Millis(0),
            log: Vec::new(),
            to_apply: Vec::new(),
            apply: true,
            outbox: Vec::new(),
        };
        g.core.initialize(g.now, Membership::new(voters.iter().copied().map(NodeId))).expect("initialize");
        g.pump();
        g
    }

    /// Node 1, the only voter, elected and with everything applied.
    fn leader() -> Group {
        Group::leader_with(Config::default())
    }

    /// Node 1, the only voter, on `config`, elected and with everything applied.
    fn leader_with(config: Config) -> Group {
        let mut g = Group::with_config(1, &[1], config);
        g.now = g.core.engine().next_deadline();
        g.core.handle_timeout(g.now);
        g.pump();
        assert_eq!(g.core.engine().role(), Role::Leader);
        g
    }

    /// Runs every action: writes are made durable at once, applies done unless held back.
    fn pump(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                CoreAction::Log(LogAction::Write(w)) => {
                    let io = match w {
                        Action::SaveVote { io, .. }
                        | Action::TruncateFrom { io, .. }
                        | Action::PurgeUpTo { io, .. } => io,
                        Action::AppendEntries { io, entries } => {
                            self.log.extend(entries);
                            io
                        }
                        other => panic!("not a write: {other:?}"),
                    };
                    self.core.handle_io_done(self.now, io);
                }
                CoreAction::Machine(MachineAction::Apply { first, last, entries }) => {
                    let entries = entries
                        .unwrap_or_else(|| (first.0..=last.0).map(|i| self.log[(i - 1) as usize].clone()).collect());
                    self.to_apply.extend(entries);
                    if self.apply {
                        self.apply_all();
                    }
                }
                CoreAction::Send(m) => self.outbox.push(m),
                CoreAction::Log(LogAction::SaveCommitted(_)) | CoreAction::Machine(MachineAction::Drop(_)) => {}
                // Snapshots of nothing: what the tests look at is which index they cover.
                CoreAction::Machine(MachineAction::Build) => {
                    let applied = self.core.engine().applied();
                    let term = self.log.iter().find(|e| e.log_id.index == applied).map_or(Term(0), |e| e.log_id.term);
                    let meta = SnapshotMeta {
                        last_log_id: LogId { term, index: applied },
                        membership: self.core.engine().committed_membership().clone(),
                        snapshot_id: applied.0,
                        size_bytes: 10,
                    };
                    self.core.handle_snapshot_built(self.now, meta);
                }
                CoreAction::Machine(MachineAction::ReadChunk { to, meta, offset, len, done }) => {
                    let data = Bytes::from(vec![0u8; len as usize]);
                    self.core.handle_snapshot_read(self.now, to, *meta, offset, Some(data), done);
                }
                CoreAction::Machine(MachineAction::Receive { meta, offset, data, reception }) => {
                    self.core.handle_snapshot_received(self.now, *meta, reception, offset + data.len() as u64);
                }
                CoreAction::Machine(MachineAction::Install { meta, reception }) => {
                    self.core.handle_snapshot_installed(self.now, *meta, reception);
                }
                other => panic!("unexpected in these tests: {other:?}"),
            }
        }
    }

    /// The state machine applies what it was given: each command answers itself.
    fn apply_all(&mut self) {
        let results: Vec<(LogId, Bytes)> = std::mem::take(&mut self.to_apply)
            .into_iter()
            .map(|e| match e.payload {
                EntryPayload::Normal(data) => (e.log_id, data),
                _ => (e.log_id, Bytes::new()),
            })
            .collect();
        if let Some(last) = results.last().map(|(id, _)| id.index) {
            self.core.handle_applied(self.now, results);
            self.core.handle_applied_durable(self.now, last);
        }
    }

    fn write(&mut self, commands: &[&str]) -> oneshot::Receiver<WriteAnswer> {
        let (tx, rx): (WriteReply, _) = oneshot::channel();
        let commands = commands.iter().map(|c| Bytes::from(c.to_string())).collect();
        self.core.handle_request(self.now, Request::Write(commands, tx));
        rx
    }

    fn read(&mut self) -> oneshot::Receiver<Result<LogIndex, RaftError>> {
        let (tx, rx): (IndexReply, _) = oneshot::channel();
        self.core.handle_request(self.now, Request::Read { mode: ReadMode::ReadIndex, wait_apply: true, reply: tx });
        rx
    }
}

/// Delivers messages between `groups` (node ids 1, 2, ... in order) until none is left.
fn exchange(groups: &mut [Group]) {
    let all: Vec<u64> = (1..=groups.len() as u64).collect();
    exchange_among(groups, &all);
}

/// Delivers messages among `groups` (node ids 1, 2, ... in order) until none is left; every
/// message from or to a node not in `among` is lost.
fn exchange_among(groups: &mut [Group], among: &[u64]) {
    for _ in 0..1000 {
        let mut msgs = Vec::new();
        for g in groups.iter_mut() {
            g.pump();
            msgs.append(&mut g.outbox);
        }
        if msgs.is_empty() {
            return;
        }
        for m in msgs.into_iter().filter(|m| among.contains(&m.from.0) && among.contains(&m.to.0)) {
            let g = &mut groups[(m.to.0 - 1) as usize];
            g.core.handle_message(g.now, m);
        }
    }
    panic!("the groups did not settle");
}

/// Fires node `id`'s election timeout (every node's clock moved past its own).
fn campaign(groups: &mut [Group], id: u64) {
    for g in groups.iter_mut() {
        g.now = Millis(g.now.0 + 10_000);
    }
    let g = &mut groups[(id - 1) as usize];
    g.core.handle_timeout(g.now);
}

fn answered(data: &[(&str, LogIndex, Term)]) -> WriteAnswer {
    Ok(data
        .iter()
        .map(|(d, index, term)| {
            Ok(WriteResponse { log_id: LogId { term: *term, index: *index }, data: Bytes::from(d.to_string()) })
        })
        .collect())
}

#[test]
fn writes_in_flight_together_each_get_their_own_answers() {
    let mut g = Group::leader();
    g.apply = false;
    let mut a = g.write(&["a"]);
    let mut bc = g.write(&["b", "c"]);
    g.pump();
    assert!(a.try_recv().is_err() && bc.try_recv().is_err(), "not applied yet");
    assert!(g.core.has_waiters(), "writes in flight: the group must not go quiet");
    g.apply_all();
    g.pump();
    assert!(!g.core.has_waiters(), "every caller answered");
    let term = g.core.engine().term();
    let first = g.log.iter().find(|e| e.payload == EntryPayload::Normal(Bytes::from("a"))).expect("a").log_id.index;
    assert_eq!(a.try_recv(), Ok(answered(&[("a", first, term)])));
    assert_eq!(bc.try_recv(), Ok(answered(&[("b", first.next(), term), ("c", first.next().next(), term)])));
}

#[test]
fn a_read_that_waits_for_apply_is_answered_only_once_the_state_machine_reached_its_index() {
    let mut g = Group::leader();
    g.apply = false;
    let mut w = g.write(&["a"]);
    g.pump();
    let committed = g.core.engine().committed();
    assert!(g.core.engine().applied() < committed, "committed, not applied");
    let mut r = g.read();
    g.pump();
    assert!(r.try_recv().is_err(), "the read index is not applied yet: a read now would miss \"a\"");
    g.apply_all();
    g.pump();
    assert_eq!(r.try_recv(), Ok(Ok(committed)));
    assert!(matches!(w.try_recv(), Ok(Ok(_))));
}

/// Reads waiting together for the same leadership confirmation each get their own answer:
/// each needs its own id with the engine, or one caller's answer would go to another (a
/// later read could be given an earlier read's index and miss a write it must see).
#[test]
fn reads_in_flight_together_are_each_answered() {
    let (mut gs, _) = node_1_of_2_elected();
    let mut first = gs[0].read();
    let mut second = gs[0].read();
    gs[0].pump();
    assert!(first.try_recv().is_err() && second.try_recv().is_err(), "node 2 has not confirmed the leader yet");
    exchange(&mut gs);
    let committed = gs[0].core.engine().committed();
    assert_eq!(first.try_recv(), Ok(Ok(committed)));
    assert_eq!(second.try_recv(), Ok(Ok(committed)));
    assert!(!gs[0].core.has_waiters());
}

#[test]
fn a_write_whose_entry_was_replaced_fails_with_dropped() {
    let mut g = Group::leader();
    g.apply = false;
    let mut w = g.write(&["a"]);
    g.pump();
    let index = g.core.engine().last_log_id().index;
    // The entry at its index applied with another term: a later leader replaced it.
    let other = Term(g.core.engine().term().0 + 1);
    g.core.answer_writes(&[(LogId { term: other, index }, Bytes::from("z"))]);
    assert_eq!(w.try_recv(), Ok(Ok(vec![Err(RaftError::Dropped { index })])));
}

#[test]
fn a_stopped_group_refuses_every_request_with_its_fatal_error() {
    let mut g = Group::leader();
    g.core.fail(StorageError::new("append", "disk gone"));
    let fatal = g.core.fatal().cloned().expect("stopped");
    let mut w = g.write(&["a"]);
    assert_eq!(w.try_recv(), Ok(Err(RaftError::Fatal(fatal.clone()))));
    let mut r = g.read();
    assert_eq!(r.try_recv(), Ok(Err(RaftError::Fatal(fatal.clone()))));
    let (tx, mut rx) = oneshot::channel();
    g.core.handle_request(g.now, Request::AddLearner(NodeId(2), tx));
    assert_eq!(rx.try_recv(), Ok(Err(RaftError::Fatal(fatal))));
    assert!(g.core.poll_action().is_none(), "a stopped group produces nothing");
}

#[test]
fn a_replica_whose_log_forked_below_its_commit_index_stops_the_group_with_the_fork_as_its_error() {
    let (mut gs, _) = node_1_elected::<3>(Config::default());
    let mut w = gs[0].write(&["a"]);
    exchange(&mut gs);
    assert!(w.try_recv().is_ok_and(|a| a.is_ok()));
    let (term, committed) = (gs[2].core.engine().term(), gs[2].core.engine().committed());
    assert_eq!(committed, gs[0].core.engine().committed(), "node 3 knows what is committed");
    // Node 2, leading the next term after an unsafe recovery onto a replica that lacked the
    // entry 3 committed, probes 3 right after its own, other, entry there.
    let prev = LogId { term: term.next(), index: committed };
    let body = MessageBody::Append { prev, entries: Vec::new(), commit: committed };
    let g = &mut gs[2];
    g.core.handle_message(g.now, Message { from: NodeId(2), to: NodeId(3), term: term.next(), body });
    g.pump();
    assert!(g.outbox.is_empty(), "no answer: {:?}", g.outbox);
    let fatal = Fatal::Diverged { leader: NodeId(2), index: committed, ours: term, theirs: term.next() };
    assert_eq!(g.core.fatal(), Some(&fatal));
    let mut r = g.read();
    assert_eq!(r.try_recv(), Ok(Err(RaftError::Fatal(fatal))));
}

/// Nodes 1 and 2 of a two-voter group, node 1 elected; and the time it was.
fn node_1_of_2_elected() -> ([Group; 2], Millis) {
    node_1_elected(Config::default())
}

/// Hands node 1 `request`, whose entry never leaves it (what it sends is dropped): the log id
/// of that entry.
fn entry_only_node_1_holds(gs: &mut [Group], t: Millis, request: Request) -> LogId {
    gs[0].core.handle_request(t, request);
    gs[0].pump();
    gs[0].outbox.clear();
    gs[0].log.last().expect("node 1 appended the request's entry").log_id
}

/// Nodes 2 and 3 elect node 2 without node 1.
fn node_2_elected_without_1(gs: &mut [Group]) {
    campaign(gs, 2);
    exchange_among(gs, &[2, 3]);
    assert_eq!(gs[1].core.engine().role(), Role::Leader);
}

/// The nodes of an `N`-voter group on `config`, node 1 elected; and the time it was.
fn node_1_elected<const N: usize>(config: Config) -> ([Group; N], Millis) {
    let voters: Vec<u64> = (1..=N as u64).collect();
    let mut gs: [Group; N] = std::array::from_fn(|i| Group::with_config(i as u64 + 1, &voters, config.clone()));
    let t = gs[0].core.engine().next_deadline();
    for g in gs.iter_mut() {
        g.now = t;
    }
    gs[0].core.handle_timeout(t);
    exchange(&mut gs);
    assert_eq!(gs[0].core.engine().role(), Role::Leader);
    (gs, t)
}

#[test]
fn a_leadership_transfer_is_answered_once_the_target_leads() {
    let (mut gs, t) = node_1_of_2_elected();
    let (tx, mut rx) = oneshot::channel();
    gs[0].core.handle_request(t, Request::TransferLeader(NodeId(2), tx));
    gs[0].pump();
    assert!(rx.try_recv().is_err(), "node 2 does not lead yet");
    exchange(&mut gs);
    assert_eq!(gs[1].core.engine().role(), Role::Leader);
    assert_eq!(gs[0].core.engine().leader(), Some(NodeId(2)));
    assert_eq!(rx.try_recv(), Ok(Ok(())));
}

#[test]
fn asking_for_the_configuration_in_force_is_answered_at_once_by_the_leader_and_refused_by_a_follower() {
    let (mut gs, t) = node_1_of_2_elected();
    let voters: std::collections::BTreeSet<NodeId> = [NodeId(1), NodeId(2)].into();
    let in_force = gs[1].core.engine().committed_membership().log_id.index;
    assert_eq!(gs[0].core.engine().committed_membership().log_id.index, in_force, "both know it committed");

    // The leader has nothing to change: the index of the configuration, and no new entry.
    let logged = gs[0].log.len();
    let (tx, mut rx) = oneshot::channel();
    gs[0].core.handle_request(t, Request::ChangeMembership(voters.clone(), tx));
    gs[0].pump();
    assert_eq!(rx.try_recv(), Ok(Ok(in_force)));
    assert_eq!(gs[0].log.len(), logged, "no configuration entry proposed");

    // A follower holds the same configuration, but only the leader may answer for the group.
    let (tx, mut rx) = oneshot::channel();
    gs[1].core.handle_request(t, Request::ChangeMembership(voters, tx));
    gs[1].pump();
    assert_eq!(rx.try_recv(), Ok(Err(RaftError::NotLeader { leader: Some(NodeId(1)) })));
}

#[test]
fn writes_proposed_together_are_one_append_and_each_caller_gets_its_own_answers() {
    let mut g = Group::leader();
    let mut rxs = Vec::new();
    let mut writes: Vec<WriteCall> = Vec::new();
    for commands in [&["a"][..], &[][..], &["b", "c"][..], &["d"][..]] {
        let (tx, rx): (WriteReply, _) = oneshot::channel();
        writes.push(WriteCall::Many(commands.iter().map(|c| Bytes::from(c.to_string())).collect(), tx));
        rxs.push(rx);
    }
    let before = g.log.len();
    g.core.handle_writes(g.now, &mut writes);
    assert!(writes.is_empty(), "every request taken");
    match g.core.poll_action() {
        Some(CoreAction::Log(LogAction::Write(Action::AppendEntries { io, entries }))) => {
            assert_eq!(entries.len(), 4, "one proposal, one append of the four commands");
            g.log.extend(entries);
            g.core.handle_io_done(g.now, io);
        }
        other => panic!("expected the append first, got {other:?}"),
    }
    g.pump();
    assert_eq!(g.log.len(), before + 4, "four commands, consecutive entries, nothing else");
    let term = g.core.engine().term();
    let first = g.log[before].log_id.index;
    let i = |k: u64| LogIndex(first.0 + k);
    assert_eq!(rxs[0].try_recv(), Ok(answered(&[("a", i(0), term)])));
    assert_eq!(rxs[1].try_recv(), Ok(Ok(Vec::new())), "no command: answered at once, no entry");
    assert_eq!(rxs[2].try_recv(), Ok(answered(&[("b", i(1), term), ("c", i(2), term)])));
    assert_eq!(rxs[3].try_recv(), Ok(answered(&[("d", i(3), term)])));
    assert!(!g.core.has_waiters());
}

#[test]
fn a_single_write_is_answered_alone_beside_writes_of_several_commands() {
    let mut g = Group::leader();
    let (one_tx, mut one_rx): (WriteOneReply, _) = oneshot::channel();
    let (many_tx, mut many_rx): (WriteReply, _) = oneshot::channel();
    let (alone_tx, mut alone_rx): (WriteOneReply, _) = oneshot::channel();
    let before = g.log.len();
    let mut writes = vec![
        WriteCall::One(Bytes::from("a"), one_tx),
        WriteCall::Many(vec![Bytes::from("b"), Bytes::from("c")], many_tx),
    ];
    g.core.handle_writes(g.now, &mut writes);
    g.core.handle_request(g.now, Request::WriteOne(Bytes::from("d"), alone_tx));
    g.pump();
    assert_eq!(g.log.len(), before + 4);
    let term = g.core.engine().term();
    let first = g.log[before].log_id.index;
    let i = |k: u64| LogIndex(first.0 + k);
    let one = |d: &str, index| Ok(WriteResponse { log_id: LogId { term, index }, data: Bytes::from(d.to_string()) });
    assert_eq!(one_rx.try_recv(), Ok(one("a", i(0))));
    assert_eq!(many_rx.try_recv(), Ok(answered(&[("b", i(1), term), ("c", i(2), term)])));
    assert_eq!(alone_rx.try_recv(), Ok(one("d", i(3))));
    assert!(!g.core.has_waiters());
}

#[test]
fn writes_proposed_together_on_a_follower_are_each_refused_with_the_leader() {
    let mut gs = [Group::new(1, &[1, 2]), Group::new(2, &[1, 2])];
    let t = gs[0].core.engine().next_deadline();
    for g in gs.iter_mut() {
        g.now = t;
    }
    gs[0].core.handle_timeout(t);
    exchange(&mut gs);
    assert_eq!(gs[0].core.engine().role(), Role::Leader);
    let mut rxs = Vec::new();
    let mut writes: Vec<WriteCall> = Vec::new();
    for c in ["a", "b"] {
        let (tx, rx): (WriteReply, _) = oneshot::channel();
        writes.push(WriteCall::Many(vec![Bytes::from(c)], tx));
        rxs.push(rx);
    }
    gs[1].core.handle_writes(t, &mut writes);
    for mut rx in rxs {
        assert_eq!(rx.try_recv(), Ok(Err(RaftError::NotLeader { leader: Some(NodeId(1)) })));
    }
    assert!(!gs[1].core.has_waiters());
}

#[test]
fn writes_proposed_together_past_the_uncommitted_limit_are_each_answered_as_if_proposed_alone() {
    // 1 byte is pending when the writes come, the limit is 10: alone, in order, "aaaaa" fits
    // (6), "bbbbb" does not (11), "ccc" does (9), "dd" does not (11).
    let commands: [&[&str]; 5] = [&["aaaaa"], &["bbbbb"], &[], &["c", "cc"], &["dd"]];
    let answers = |together: bool| -> (Vec<WriteAnswer>, Term, u64) {
        let mut g = Group::leader_with(Config { uncommitted_bytes_max: 10, ..Config::default() });
        let first = g.log.len() as u64 + 2; // after "x"
        let _pending = g.write(&["x"]); // not pumped: stays uncommitted
        let mut rxs = Vec::new();
        let mut writes: Vec<WriteCall> = Vec::new();
        for c in commands {
            let (tx, rx): (WriteReply, _) = oneshot::channel();
            writes.push(WriteCall::Many(c.iter().map(|c| Bytes::from(c.to_string())).collect(), tx));
            rxs.push(rx);
        }
        if together {
            g.core.handle_writes(g.now, &mut writes);
        } else {
            for call in writes {
                let WriteCall::Many(c, tx) = call else { unreachable!("built as Many above") };
                g.core.handle_request(g.now, Request::Write(c, tx));
            }
        }
        g.pump();
        (rxs.into_iter().map(|mut rx| rx.try_recv().expect("answered")).collect(), g.core.engine().term(), first)
    };
    let (together, term, first) = answers(true);
    assert_eq!(together, answers(false).0);
    assert_eq!(together[0], answered(&[("aaaaa", LogIndex(first), term)]));
    assert_eq!(together[1], Err(RaftError::Overloaded { pending_bytes: 6 }));
    assert_eq!(together[2], Ok(Vec::new()));
    assert_eq!(together[3], answered(&[("c", LogIndex(first + 1), term), ("cc", LogIndex(first + 2), term)]));
    assert_eq!(together[4], Err(RaftError::Overloaded { pending_bytes: 9 }));
}

#[test]
fn an_added_learner_is_answered_with_its_entry_once_applied_and_not_before() {
    let mut g = Group::leader();
    g.apply = false;
    let (tx, mut rx) = oneshot::channel();
    g.core.handle_request(g.now, Request::AddLearner(NodeId(4), tx));
    g.pump();
    let entry = g.log.last().expect("the learner's entry").log_id.index;
    assert!(rx.try_recv().is_err(), "committed but not applied: no answer yet");
    g.apply_all();
    g.pump();
    assert_eq!(rx.try_recv(), Ok(Ok(entry)), "applied, and the configuration shows the learner");
}

#[test]
fn a_write_whose_entry_this_node_lost_to_a_new_leader_is_answered_as_unknown_not_dropped() {
    // Node 1 leads, appends u, v, w that reach nobody; node 2 leads next and cuts node 1's log
    // back; node 1 leads again and proposes at w's index. w's entry is gone from node 1 but
    // not from the group's history: another node holding it could still commit it, so its
    // caller must not hear that a retry is safe.
    let (mut groups, _) = node_1_elected::<3>(Config::default());
    let _u = groups[0].write(&["u"]);
    let _v = groups[0].write(&["v"]);
    let mut w = groups[0].write(&["w"]);
    groups[0].pump();
    groups[0].outbox.clear();
    let w_index = groups[0].core.engine().last_log_id().index;
    // Node 2 leads without node 1, then its log (one entry past the first leader's blank)
    // reaches node 1, which cuts its own back to it.
    campaign(&mut groups, 2);
    exchange_among(&mut groups, &[2, 3]);
    assert_eq!(groups[1].core.engine().role(), Role::Leader);
    for _ in 0..5 {
        let g = &mut groups[1];
        g.now = g.core.engine().next_deadline();
        let now = g.now;
        g.core.handle_timeout(now);
        exchange_among(&mut groups, &[1, 2]);
    }

    assert!(groups[0].core.engine().last_log_id().index.0 < w_index.0 - 1, "cut back by two or more");
    assert!(w.try_recv().is_err(), "not answered yet");
    // Node 1 leads again with node 3 and proposes at w's index.
    campaign(&mut groups, 1);
    exchange_among(&mut groups, &[1, 3]);
    assert_eq!(groups[0].core.engine().role(), Role::Leader);
    let _x = groups[0].write(&["x"]);
    groups[0].pump();
    let got = w.try_recv();
    let shown = format!("{got:?}");
    assert!(shown.contains("Indeterminate") && !shown.contains("Dropped"), "{shown}");
}

/// A change of voters is answered with its final configuration's index once that entry has
/// applied here, not merely committed: like every other answer, it tells the caller the state
/// machine has moved past it.
#[test]
fn a_membership_change_is_answered_once_its_final_configuration_applied_and_not_before() {
    let (mut gs, t) = node_1_of_2_elected();
    gs[0].apply = false;
    let (tx, mut rx) = oneshot::channel();
    gs[0].core.handle_request(t, Request::ChangeMembership([NodeId(1)].into_iter().collect(), tx));
    exchange(&mut gs);
    let last = gs[0].log.last().expect("entries").clone();
    assert!(
        matches!(&last.payload, EntryPayload::Membership(m) if !m.is_joint() && m.voters.len() == 1),
        "the final configuration is in the log: {last:?}"
    );
    assert_eq!(gs[0].core.engine().committed(), last.log_id.index, "and committed");
    assert!(rx.try_recv().is_err(), "committed but not applied: no answer yet");
    gs[0].apply_all();
    gs[0].pump();
    assert_eq!(rx.try_recv(), Ok(Ok(last.log_id.index)));
}

/// A membership change whose joint entry a later leader replaced in our log fails, but only
/// once what replaced it has applied: until it is committed, another leader holding the
/// original entry may still put it back and commit it.
#[test]
fn a_membership_change_whose_entry_was_replaced_fails_only_once_the_replacement_applied() {
    let (mut gs, t) = node_1_elected::<3>(Config::default());
    // Node 1 proposes a change that never leaves it.
    let (tx, mut rx) = oneshot::channel();
    let joint =
        entry_only_node_1_holds(&mut gs, t, Request::ChangeMembership([1, 2].into_iter().map(NodeId).collect(), tx));
    // Nodes 2 and 3 elect node 2, whose first entry takes the joint entry's index.
    node_2_elected_without_1(&mut gs);
    // Node 1 hears from node 2 and takes its entries, but does not apply them yet.
    gs[0].apply = false;
    let beat = gs[1].core.engine().next_deadline();
    for g in gs.iter_mut() {
        g.now = beat;
    }
    gs[1].core.handle_timeout(beat);
    exchange(&mut gs);
    let engine = gs[0].core.engine();
    assert_eq!(engine.leader(), Some(NodeId(2)));
    assert_ne!(engine.term_at(joint.index), Some(joint.term), "the joint entry is replaced");
    assert!(engine.committed() >= joint.index && engine.applied() < joint.index);
    assert!(rx.try_recv().is_err(), "the replacement has not applied: no answer yet");
    gs[0].apply_all();
    gs[0].pump();
    assert_eq!(rx.try_recv(), Ok(Err(RaftError::Dropped { index: joint.index })));
}

/// A learner request whose entry a later leader replaced fails with `Dropped`, even when that
/// leader made the same change itself: the answer is about the caller's entry, like a write's
/// (the index it would carry names another entry).
#[test]
fn an_added_learner_whose_entry_was_replaced_fails_with_dropped_even_if_another_leader_added_it() {
    let (mut gs, t) = node_1_elected::<3>(Config::default());
    // Node 1 proposes adding learner 4; the entry never leaves it.
    let (tx, mut mine) = oneshot::channel();
    let entry = entry_only_node_1_holds(&mut gs, t, Request::AddLearner(NodeId(4), tx));
    // Nodes 2 and 3 elect node 2, which adds learner 4 on its own.
    node_2_elected_without_1(&mut gs);
    let (tx, mut theirs) = oneshot::channel();
    let later = gs[1].now;
    gs[1].core.handle_request(later, Request::AddLearner(NodeId(4), tx));
    exchange_among(&mut gs, &[2, 3]);
    assert!(matches!(theirs.try_recv(), Ok(Ok(_))));
    // Node 1 hears from node 2 and applies its log.
    let beat = gs[1].core.engine().next_deadline();
    for g in gs.iter_mut() {
        g.now = beat;
    }
    gs[1].core.handle_timeout(beat);
    exchange_among(&mut gs, &[1, 2, 3]);
    let engine = gs[0].core.engine();
    assert_ne!(engine.term_at(entry.index), Some(entry.term), "node 1's entry is replaced");
    assert!(engine.committed_membership().membership.learners.contains(&NodeId(4)), "4 is a learner");
    assert_eq!(mine.try_recv(), Ok(Err(RaftError::Dropped { index: entry.index })));
}

/// Moves every group's clock forward by `ms` in steps of 100 ms, firing due timers and
/// delivering messages among `among` after each step.
fn run_for(groups: &mut [Group], ms: u64, among: &[u64]) {
    for _ in 0..ms / 100 {
        for g in groups.iter_mut() {
            g.now = Millis(g.now.0 + 100);
            if g.core.engine().next_deadline() <= g.now {
                let now = g.now;
                g.core.handle_timeout(now);
            }
        }
        exchange_among(groups, among);
    }
}

#[test]
fn a_membership_change_whose_entry_a_snapshot_replaced_fails_instead_of_waiting_forever() {
    // Node 1 proposes a change that reaches nobody; nodes 2 and 3 go on without it and purge
    // their logs; node 1 comes back and catches up by a snapshot covering the change's index.
    // Its entry is gone with its log, and the history at that index held no configuration:
    // the caller must hear that the change failed, and the group must not wait on it for good.
    let config = Config { log_keep_entries: 0, log_lag_entries_max: 0, log_purge_step_entries: 1, ..Config::default() };
    let (mut gs, t) = node_1_elected::<3>(config);
    let (tx, mut rx) = oneshot::channel();
    let joint =
        entry_only_node_1_holds(&mut gs, t, Request::ChangeMembership([1, 2].into_iter().map(NodeId).collect(), tx));
    node_2_elected_without_1(&mut gs);
    for i in 0..5 {
        drop(gs[1].write(&[&format!("w{i}")]));
        exchange_among(&mut gs, &[2, 3]);
    }
    run_for(&mut gs, 10_000, &[2, 3]);
    drop(gs[1].write(&["last"]));
    exchange_among(&mut gs, &[2, 3]);
    assert!(gs[1].core.engine().first_log_index() > joint.index, "node 2 purged past the change's index");
    run_for(&mut gs, 10_000, &[1, 2, 3]);
    assert!(gs[0].core.engine().applied() > joint.index, "node 1 caught up past the change");
    assert_eq!(rx.try_recv(), Ok(Err(RaftError::Dropped { index: joint.index })));
    assert!(!gs[0].core.has_waiters(), "nothing left waiting");
}

/// Node 1 of three, elected, and a heartbeat round it sent acknowledged by the others: its
/// lease holds from then on for `election_timeout_ms_min - lease_clock_drift_ms`.
fn node_1_of_3_with_a_lease() -> [Group; 3] {
    let (mut gs, _) = node_1_elected::<3>(Config::default());
    heartbeat_round(&mut gs);
    gs
}

/// Node 1's heartbeat timer fires (every clock moves on by an interval) and the round is
/// exchanged.
fn heartbeat_round(gs: &mut [Group; 3]) {
    let step = Config::default().heartbeat_interval_ms;
    for g in gs.iter_mut() {
        g.now = g.now.add_ms(step);
    }
    let t = gs[0].core.engine().next_deadline().max(gs[0].now);
    for g in gs.iter_mut() {
        g.now = t;
    }
    gs[0].core.handle_timeout(t);
    exchange(gs);
}

#[test]
fn the_lease_gate_opens_on_a_leader_holding_a_lease_and_never_on_a_follower() {
    let mut gs = node_1_of_3_with_a_lease();
    let (leader, follower) = (gs[0].core.lease_gate(), gs[1].core.lease_gate());
    let now = gs[0].now;
    assert!(leader.open_at(now), "the leader holds a lease and applied its first entry");
    assert!(!follower.open_at(now), "a follower never serves reads past the engine");
    let c = Config::default();
    let end = now.add_ms(c.election_timeout_ms_min - c.lease_clock_drift_ms);
    assert!(!leader.open_at(end), "no later than the lease the engine itself would grant");
    // Rounds acknowledged later carry the gate on.
    heartbeat_round(&mut gs);
    assert!(leader.open_at(end));
}

#[test]
fn the_lease_gate_stays_shut_until_the_new_leader_applied_its_first_entry() {
    let voters = [1, 2, 3];
    let mut gs: [Group; 3] = std::array::from_fn(|i| Group::new(i as u64 + 1, &voters));
    gs[0].apply = false;
    let gate = gs[0].core.lease_gate();
    let t = gs[0].core.engine().next_deadline();
    for g in gs.iter_mut() {
        g.now = t;
    }
    gs[0].core.handle_timeout(t);
    exchange(&mut gs);
    heartbeat_round(&mut gs);
    assert_eq!(gs[0].core.engine().role(), Role::Leader);
    assert!(gs[0].core.engine().committed() > gs[0].core.engine().applied());
    assert!(!gate.open_at(gs[0].now), "earlier leaders' writes may not be in the state machine yet");
    gs[0].apply_all();
    gs[0].pump();
    assert!(gate.open_at(gs[0].now));
}

#[test]
fn the_lease_gate_is_shut_before_a_transfers_timeout_now_leaves() {
    let mut gs = node_1_of_3_with_a_lease();
    let gate = gs[0].core.lease_gate();
    assert!(gate.open_at(gs[0].now));
    let (tx, _rx) = oneshot::channel();
    let now = gs[0].now;
    gs[0].core.handle_request(now, Request::TransferLeader(NodeId(2), tx));
    let mut sent = false;
    while let Some(a) = gs[0].core.poll_action() {
        if let CoreAction::Send(m) = a {
            if matches!(m.body, MessageBody::TimeoutNow) {
                assert!(!gate.open_at(now), "the target may be elected ignoring leases from now on");
                sent = true;
            }
        }
    }
    assert!(sent, "the transfer sent TimeoutNow");
    assert!(!gate.open_at(now));
}

#[test]
fn a_write_answered_before_its_application_is_stored_shuts_the_lease_gate_until_it_is() {
    let mut gs = node_1_of_3_with_a_lease();
    let gate = gs[0].core.lease_gate();
    gs[0].apply = false;
    let mut rx = gs[0].write(&["x"]);
    exchange(&mut gs);
    assert!(gs[0].core.engine().committed() > gs[0].core.engine().applied());
    assert!(!gate.open_at(gs[0].now), "committed, not applied: it may be a split another group acts on");
    // The host answers from the prepared batch before the store wrote it.
    let prepared: Vec<(LogId, Bytes)> = gs[0]
        .to_apply
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(d) => (e.log_id, d.clone()),
            _ => (e.log_id, Bytes::new()),
        })
        .collect();
    gs[0].core.answer_writes(&prepared);
    assert!(rx.try_recv().is_ok(), "the writer has its answer");
    assert!(!gate.open_at(gs[0].now), "a read now must see the write, which the state machine does not hold yet");
    gs[0].pump();
    assert!(!gate.open_at(gs[0].now), "still unwritten");
    gs[0].apply_all();
    gs[0].pump();
    assert!(gate.open_at(gs[0].now));
}

#[test]
fn a_stopped_group_and_a_leader_that_stepped_down_shut_the_lease_gate() {
    let mut gs = node_1_of_3_with_a_lease();
    let gate = gs[0].core.lease_gate();
    gs[0].core.stop(Fatal::Shutdown);
    assert!(!gate.open_at(gs[0].now));

    let mut gs = node_1_of_3_with_a_lease();
    let gate = gs[0].core.lease_gate();
    // Past the lease, nodes 2 and 3 elect node 2; node 1 hears of the new term.
    node_2_elected_without_1(&mut gs);
    assert!(!gate.open_at(gs[0].now), "the lease ran out");
    // Node 2's next heartbeat reaches node 1.
    let t = gs[1].core.engine().next_deadline();
    gs[1].now = t;
    gs[1].core.handle_timeout(t);
    exchange(&mut gs);
    assert_ne!(gs[0].core.engine().role(), Role::Leader);
    assert!(!gate.open_at(Millis(gs[0].now.0.saturating_sub(10_000))), "closed, not only expired");
}

/// A runner whose callers have no timer of their own (the Tokio driver) asks the core to time
/// them out: each call is answered `Timeout` once it waited more than the bound since the
/// `now` it was handed in with, the others are left to their answers, and an entry whose
/// caller timed out still commits and applies, with nobody to answer.
#[test]
fn calls_that_waited_past_the_bound_are_answered_timeout_and_the_others_are_left_alone() {
    const WAIT_MS_MAX: u64 = 1000;
    let (mut gs, t) = node_1_of_2_elected();
    assert_eq!(gs[0].core.next_call_timeout(WAIT_MS_MAX), None, "nobody waits");
    // Node 2 hears nothing yet: nothing commits, no read is confirmed.
    let mut old_write = gs[0].write(&["a"]);
    let mut old_read = gs[0].read();
    gs[0].pump();
    let later = Millis(t.0 + 400);
    gs[0].now = later;
    let mut new_write = gs[0].write(&["b", "c"]);
    let mut new_read = gs[0].read();
    gs[0].pump();
    assert_eq!(gs[0].core.next_call_timeout(WAIT_MS_MAX), Some(Millis(t.0 + WAIT_MS_MAX + 1)));
    // Not before it waited more than the bound.
    gs[0].core.time_out_calls(Millis(t.0 + WAIT_MS_MAX), WAIT_MS_MAX);
    assert!(old_write.try_recv().is_err() && old_read.try_recv().is_err(), "waited exactly the bound");
    gs[0].core.time_out_calls(Millis(t.0 + WAIT_MS_MAX + 1), WAIT_MS_MAX);
    assert_eq!(old_write.try_recv(), Ok(Err(RaftError::Timeout)));
    assert_eq!(old_read.try_recv(), Ok(Err(RaftError::Timeout)));
    assert!(new_write.try_recv().is_err() && new_read.try_recv().is_err(), "handed in later: still waiting");
    assert_eq!(gs[0].core.next_call_timeout(WAIT_MS_MAX), Some(Millis(later.0 + WAIT_MS_MAX + 1)));
    // Node 2 hears from the leader: everything commits and applies, "a" included.
    exchange(&mut gs);
    let term = gs[0].core.engine().term();
    let a = gs[0].log.iter().find(|e| e.payload == EntryPayload::Normal(Bytes::from("a"))).expect("a").log_id;
    assert!(gs[0].core.engine().applied() >= a.index, "the timed-out write's entry applied");
    assert_eq!(new_write.try_recv(), Ok(answered(&[("b", a.index.next(), term), ("c", a.index.next().next(), term)])));
    assert!(matches!(new_read.try_recv(), Ok(Ok(_))));
    assert!(!gs[0].core.has_waiters());
    assert_eq!(gs[0].core.next_call_timeout(WAIT_MS_MAX), None);
}
