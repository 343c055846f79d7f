//! The lease-edge steer ([`SimOptions::lease_edges`]): one race played at the end of a leader
//! lease, where only the drift margin separates a safe lease from a stale read.
//!
//! The leader's lease lasts `election_timeout_ms_min - lease_clock_drift_ms` of its own clock
//! from a heartbeat round a quorum acknowledged; the followers promise not to help elect
//! anyone for `election_timeout_ms_min` of theirs after receiving it. A lease a little too
//! long, or a promise a little too short, is unsafe only in the few milliseconds between the
//! promise's end and the lease's end, which random schedules seldom hit: a rival must campaign
//! the moment the promise ends, win, and commit a write, and the old leader must then be asked
//! for a lease read before its own clock says the lease is over. The steer plays exactly that:
//!
//! 1. Armed on a leader: the network heals and becomes fast (every message takes 1 ms, none
//!    is lost), no other fault or write happens, and it watches the heartbeat rounds. Half the
//!    time one follower is first cut off from the leader, so that its election timer runs out
//!    while the others still keep their promise (the promise's side of the race).
//! 2. When every other voter has received the same round and the rival is about to campaign
//!    (the simulator reads the followers' election deadlines and clocks) — within a few
//!    milliseconds after the last of the others' promises ends, or, for a cut follower, well
//!    inside them — the leader is cut off from everyone (what it sent since is lost), its
//!    acknowledgements of that round already on their way to it.
//! 3. When a rival leads, a client writes there; when the write is answered, clients ask the
//!    old leader, still isolated and unaware of the new term, for lease reads. If its lease
//!    outlives the followers' promise, it answers with the value before the write, and the
//!    history is not linearizable.

use super::*;

/// Longest a steer waits for a round that lines up, then for its race (global ms).
const STEER_MS_MAX: u64 = 1500;
/// How late after the others' promises end the rival's election timer may fire (ms): later,
/// and its election would no longer be the earliest the rules allow.
const RIVAL_SLACK_MS: u64 = 4;
/// A follower cut off from the leader must campaign within this long after a round reaches
/// the others (ms): well inside their promise and the leader's lease.
const CUT_RIVAL_WITHIN_MS: u64 = 30;
/// The old leader's lease reads go out this long after the rival's write is answered (ms): one
/// so that the read is invoked strictly after the write returned, a few more in case the first
/// finds no idle client.
const READ_AFTER_WRITE_MS: [u64; 3] = [1, 2, 4];

/// A steer in progress.
#[derive(Debug)]
pub(super) struct LeaseEdge {
    /// The leader whose lease is tested.
    leader: NodeId,
    /// Its term.
    term: Term,
    /// Global time after which the steer gives up.
    deadline: u64,
    /// Messages delivered after this global time were sent on fast links.
    fast_since: u64,
    /// The follower cut off from the leader from the start, if any: the rival whose election
    /// the others' promise must refuse.
    cut: Option<NodeId>,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for a heartbeat round that lines up; per follower, the last round received from
    /// the leader (sent on fast links) and the follower's local time when it last heard from it.
    Watching { round: BTreeMap<NodeId, u64>, contact: BTreeMap<NodeId, Millis> },
    /// The leader is cut off; some rival will campaign.
    Cut,
    /// A rival leads; its client's write is this operation.
    Writing { op: usize },
    /// The old leader's lease reads are on their way.
    Reading,
}

impl Sim {
    /// Whether a lease-edge steer is under way: the network is then fast and the nemesis
    /// stays out.
    pub(super) fn steering_lease_edge(&self) -> bool {
        self.lease_edge.is_some()
    }

    /// Called once per step: arms a steer now and then, and moves one on.
    pub(super) fn lease_edge_step(&mut self) -> Check {
        if !self.opts.lease_edges || !self.faults_on {
            return Ok(());
        }
        let Some(edge) = &self.lease_edge else {
            if self.rng.chance(1.0 / 50.0) {
                self.arm_lease_edge();
            }
            return Ok(());
        };
        if self.now >= edge.deadline {
            self.end_lease_edge("gave up");
            return Ok(());
        }
        let (old, term) = (edge.leader, edge.term);
        match edge.phase {
            Phase::Watching { .. } | Phase::Reading => Ok(()),
            Phase::Cut => {
                let Some(rival) = self.leader().filter(|l| *l != old) else { return Ok(()) };
                if self.nodes[&rival].engine.as_ref().is_none_or(|e| e.term() <= term) {
                    return Ok(());
                }
                let op = self.history.len();
                self.steer_op(rival, true)?;
                if self.history.len() == op {
                    self.end_lease_edge("no idle client to write at the rival");
                    return Ok(());
                }
                self.log(format!("lease edge: node {rival} leads; op {op} writes there"));
                self.set_phase(Phase::Writing { op });
                Ok(())
            }
            Phase::Writing { op } => {
                match self.history[op].state {
                    OpState::Pending => {}
                    OpState::Done => {
                        for after in READ_AFTER_WRITE_MS {
                            self.schedule(self.now + after, Event::SteerOp { node: old, write: false });
                        }
                        self.log(format!("lease edge: write answered; lease reads at node {old}"));
                        self.report.lease_edge_races += 1;
                        let edge = self.lease_edge.as_mut().expect("steering");
                        edge.deadline = self.now + READ_AFTER_WRITE_MS[2] + 1;
                        edge.phase = Phase::Reading;
                    }
                    OpState::Failed | OpState::Unknown => self.end_lease_edge("the rival's write failed"),
                }
                Ok(())
            }
        }
    }

    /// Starts watching the current leader's heartbeat rounds on a healed, fast network.
    fn arm_lease_edge(&mut self) {
        let Some(l) = self.leader() else { return };
        if self.paused(l).is_some() {
            return;
        }
        let term = self.nodes[&l].engine.as_ref().map(|e| e.term()).expect("leader is alive");
        let deadline = self.now + STEER_MS_MAX;
        self.blocked.clear();
        let followers: Vec<NodeId> = self.voters_of(l).into_iter().filter(|v| *v != l).collect();
        let cut = if self.rng.chance(0.5) { self.rng.pick(&followers).copied() } else { None };
        if let Some(c) = cut {
            self.blocked.insert((l, c));
            self.blocked.insert((c, l));
        }
        // No write until the race is over: a write the rival missed would make its log too old
        // to win, and the vote's log check, not the promise, would decide.
        self.reads_only_until = deadline;
        self.lease_edge = Some(LeaseEdge {
            leader: l,
            term,
            deadline,
            fast_since: self.now + self.delay_ms_max,
            cut,
            phase: Phase::Watching { round: BTreeMap::new(), contact: BTreeMap::new() },
        });
        self.log(format!("lease edge: heal, fast links, cut {cut:?} from leader {l}, watch its rounds"));
    }

    fn set_phase(&mut self, phase: Phase) {
        self.lease_edge.as_mut().expect("steering").phase = phase;
    }

    /// Ends the steer: the network heals and the old leader learns of the new term.
    pub(super) fn end_lease_edge(&mut self, why: &str) {
        if self.lease_edge.take().is_some() {
            self.blocked.clear();
            self.reads_only_until = self.now;
            self.log(format!("lease edge: over ({why}); heal"));
        }
    }

    /// A message `from` -> `to` of `term` was delivered at `to`'s local time `now`; `round` is
    /// a heartbeat's round. Decides, once every other voter has the same round, whether to cut
    /// the leader off now.
    pub(super) fn lease_edge_delivered(
        &mut self,
        from: NodeId,
        to: NodeId,
        term: Term,
        round: Option<u64>,
        now: Millis,
    ) {
        let Some(edge) = &mut self.lease_edge else { return };
        let sent_fast = self.now > edge.fast_since;
        let Phase::Watching { round: rounds, contact } = &mut edge.phase else { return };
        if from != edge.leader || term != edge.term {
            return;
        }
        contact.insert(to, now);
        let Some(r) = round.filter(|_| sent_fast) else { return };
        rounds.insert(to, r);
        let (l, cut) = (edge.leader, edge.cut);
        let Some(engine) = self.nodes[&l].engine.as_ref() else { return };
        let m = engine.membership().membership.clone();
        if m.is_joint() || !m.is_quorum(|id| id != l) {
            return;
        }
        let followers: Vec<NodeId> = m.voters.iter().copied().filter(|v| *v != l && Some(*v) != cut).collect();
        let Phase::Watching { round: rounds, contact } = &self.lease_edge.as_ref().expect("steering").phase else {
            return;
        };
        if !followers.iter().all(|f| rounds.get(f) == Some(&r)) {
            return;
        }
        // When each follower campaigns, and when its promise to the leader ends (global ms).
        let mut fire = Vec::new();
        if let Some(c) = cut {
            let n = &self.nodes[&c];
            let Some(e) = n.engine.as_ref().filter(|e| e.role() != Role::Leader) else { return };
            fire.push((global_time(n.rate_ppm, e.next_deadline()), c, 0));
        }
        for f in &followers {
            let n = &self.nodes[f];
            let Some(e) = n.engine.as_ref().filter(|e| e.role() != Role::Leader) else { return };
            if self.paused(*f).is_some() {
                return;
            }
            let promise_end = global_time(n.rate_ppm, contact[f].add_ms(self.config.election_timeout_ms_min));
            fire.push((global_time(n.rate_ppm, e.next_deadline()), *f, promise_end));
        }
        fire.sort();
        let (first, rival, _) = fire[0];
        let promises_end = fire.iter().filter(|(_, f, _)| *f != rival).map(|(_, _, end)| *end).max().unwrap_or(0);
        if cut.is_some() {
            if cut != Some(rival) || first > self.now + CUT_RIVAL_WITHIN_MS {
                return;
            }
        } else if first + 1 < promises_end || first > promises_end + RIVAL_SLACK_MS {
            // Its request reaches the others 1 ms after it campaigns.
            return;
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.isolate(l, &ids);
        // What the leader sent after the round is lost too: a later message would renew the
        // promise and restart the rival's election timer.
        self.events.retain(|_, ev| !matches!(ev, Event::Deliver(m) if m.from == l));
        self.set_phase(Phase::Cut);
        self.log(format!(
            "lease edge: round {r} received; isolate leader {l}; node {rival} campaigns at {first}, promises end at {promises_end}"
        ));
    }
}
