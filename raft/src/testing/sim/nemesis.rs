//! The faults: partitions and one-way cuts, crashes that lose unsynced writes, pauses (a
//! stopped process), and the membership changes, transfers and snapshots run during them.

use super::*;

impl Sim {
    pub(super) fn nemesis(&mut self) -> Check {
        self.lease_edge_step()?;
        if self.steering_lease_edge() {
            return Ok(());
        }
        if self.now < self.reads_only_until {
            // A quiet spell (see `quiet_spell`): no other fault, and no configuration entry
            // that would put the rival's log behind.
            return Ok(());
        }
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
            if self.rng.chance(1.0 / 150.0) {
                self.cut_then_isolate();
            }
        }
        Ok(())
    }

    /// The node's resume time if it is paused now.
    pub(super) fn paused(&self, id: NodeId) -> Option<u64> {
        let until = self.nodes[&id].paused_until;
        (self.now < until).then_some(until)
    }

    /// Stops a node (the leader, mostly) for longer than an election timeout or shorter.
    pub(super) fn pause(&mut self) {
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
    pub(super) fn resume(&mut self, id: NodeId) -> Check {
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
            // The race the void lease decides, played out within the old leader's lease: the
            // target, once elected, commits writes, and the old leader serves lease reads
            // after them. Left to the clients, both rarely land inside that window.
            let lease = self.config.election_timeout_ms_min;
            for _ in 0..3 {
                let at = self.now + self.rng.range(5, lease / 2);
                self.schedule(at, Event::SteerOp { node: id, write: true });
                let at = self.now + self.rng.range(lease / 4, lease);
                self.schedule(at, Event::SteerOp { node: old, write: false });
            }
        }
        let idle: Vec<usize> = (0..self.clients.len()).filter(|c| self.clients[*c].busy.is_none()).take(2).collect();
        for c in idle {
            self.client_op_at(c, Some(OpInput::Get), Some((id, ReadMode::Lease)))?;
        }
        self.drive(id)
    }

    /// An idle client writes at `node`, or lease-reads there (see `resume`).
    pub(super) fn steer_op(&mut self, node: NodeId, write: bool) -> Check {
        if !self.faults_on || self.nodes[&node].engine.is_none() || self.paused(node).is_some() {
            return Ok(());
        }
        let Some(c) = (0..self.clients.len()).find(|c| self.clients[*c].busy.is_none()) else { return Ok(()) };
        if write {
            let client = &mut self.clients[c];
            client.counter += 1;
            let value = format!("c{}-{}", client.id, client.counter);
            self.client_op_at(c, Some(OpInput::Put(Some(value))), Some((node, ReadMode::Lease)))
        } else {
            self.client_op_at(c, Some(OpInput::Get), Some((node, ReadMode::Lease)))
        }
    }

    /// Cuts one follower off from the leader only: its election timer runs out and it
    /// campaigns among the others, who still hear from the leader and so must refuse it (their
    /// promise is what the leader's lease rests on). About when it campaigns, the leader loses
    /// everyone while clients keep reading there: a follower voting inside its promise would
    /// let a new leader commit writes those reads miss. Clients only read until then, or the
    /// cut follower's shorter log would lose the election anyway.
    fn cut_then_isolate(&mut self) {
        let Some(l) = self.leader() else { return };
        let followers: Vec<NodeId> = self.voters_of(l).into_iter().filter(|v| *v != l).collect();
        let Some(&c) = self.rng.pick(&followers) else { return };
        let at =
            self.now + self.rng.range(self.config.election_timeout_ms_min, self.config.election_timeout_ms_max + 50);
        self.quiet_spell(l, at);
        self.blocked.insert((l, c));
        self.blocked.insert((c, l));
        self.schedule(at, Event::Isolate(l));
        self.log(format!("nemesis: cut {c} from leader {l}; isolate {l} at {at}"));
    }

    /// A spell in which one scenario plays alone: partitions left from earlier are healed (they
    /// could cost `leader` its quorum), no other fault and no write happens until `until` (a
    /// commit would leave the rival's log behind, so the vote's log check rather than the rule
    /// under test would stop it), and for longer than any lease after it, clients only read at
    /// `leader` (a write there would hold its client until timeout).
    fn quiet_spell(&mut self, leader: NodeId, until: u64) {
        self.blocked.clear();
        self.reads_only_until = until;
        self.reads_only_on = Some((leader, until + 2 * self.config.election_timeout_ms_min));
    }

    /// The voters of the configuration `node` is in.
    pub(super) fn voters_of(&self, node: NodeId) -> Vec<NodeId> {
        self.nodes[&node]
            .engine
            .as_ref()
            .map(|e| e.membership().membership.voters.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Asks the leader to hand over to a random voter.
    pub(super) fn transfer(&mut self) -> Check {
        let Some(l) = self.leader() else { return Ok(()) };
        if self.paused(l).is_some() {
            return Ok(());
        }
        let now = self.local(l);
        let voters = self.voters_of(l);
        let Some(&t) = self.rng.pick(&voters) else { return Ok(()) };
        if t != l && self.paused(t).is_none() && self.rng.chance(0.5) {
            // The target gets its TimeoutNow only after the transfer timed out at the leader,
            // which meanwhile renewed its lease with new rounds; when the target wakes (in a
            // quiet spell, so it can still win), the leader stops hearing from anyone (see
            // `resume`) while clients keep reading there. Only the void lease keeps those
            // reads from going stale.
            let until = self.now + self.rng.range(self.config.transfer_timeout_ms + 20, 800);
            self.quiet_spell(l, until);
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

    pub(super) fn network_fault(&mut self) {
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

    pub(super) fn isolate(&mut self, n: NodeId, ids: &[NodeId]) {
        for o in ids {
            if *o != n {
                self.blocked.insert((n, *o));
                self.blocked.insert((*o, n));
            }
        }
    }

    pub(super) fn crash(&mut self) -> Check {
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
        node.built.clear();
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

    pub(super) fn restart(&mut self, id: NodeId) -> Check {
        let seed = self.rng.next_u64();
        let now = self.local(id);
        let config = self.config.clone();
        let node = self.nodes.get_mut(&id).expect("exists");
        if node.engine.is_some() {
            return Ok(());
        }
        let state = node.disk.initial_state();
        node.sm = node.disk.checkpoint.as_ref().map(|s| decode_map(&s.data)).unwrap_or_default();
        node.sm_applied = state.applied;
        node.checkpointed = state.applied.index;
        node.io_free_at = self.now;
        node.last_role = Role::Follower;
        node.last_committed = LogIndex(0);
        let mut engine = Engine::new(id, config, state, seed, now);
        engine.handle_applied_durable(now, node.checkpointed);
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

    pub(super) fn reconfigure(&mut self) -> Check {
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
                engine.compact_log(now);
                format!("leader {l}: compact the log")
            }
        };
        self.log(line);
        self.drive(l)
    }
}
