//! The clients: operations sent to the node each client believes leads, and the healing
//! phase that requires progress and then checks the history for linearizability.

use super::*;

impl Sim {
    pub(super) fn clients_act(&mut self) -> Check {
        for c in 0..self.clients.len() {
            if self.clients[c].busy.is_some() || !self.rng.chance(0.08) {
                continue;
            }
            self.client_op(c, None)?;
        }
        Ok(())
    }

    pub(super) fn client_op(&mut self, c: usize, forced: Option<OpInput>) -> Check {
        self.client_op_at(c, forced, None)
    }

    /// A client operation; `at` forces the node and the read mode.
    pub(super) fn client_op_at(&mut self, c: usize, forced: Option<OpInput>, at: Option<(NodeId, ReadMode)>) -> Check {
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
        let chosen = forced.is_some();
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
        // A quiet spell (see `cut_then_isolate`): clients only read, so no log grows ahead of
        // a follower cut off from the leader.
        let read_only_here = self.reads_only_on.is_some_and(|(n, until)| n == target && self.now < until);
        let input = if !chosen && (self.now < self.reads_only_until || read_only_here) { OpInput::Get } else { input };
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
                let local = self.opts.local_reads
                    && mode == ReadMode::Lease
                    && engine.local_read_end().is_some_and(|end| now < end);
                if local {
                    let value = self.nodes[&target].sm.get(&self.history[op].op.key).cloned();
                    self.report.local_reads += 1;
                    self.finish_op(op, OpState::Done, Some(OpOutput::Get(value)));
                    return self.drive(target);
                }
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

    pub(super) fn propose(&mut self, target: NodeId, op: usize, cmd: KvCommand) -> Check {
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
    pub(super) fn heal_and_finish(&mut self) -> Check {
        self.end_lease_edge("healing");
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
