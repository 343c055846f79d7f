//! The Raft safety properties the simulator checks after every step: one leader per term,
//! leader completeness, commits only by a durable quorum of the configuration, one
//! configuration change at a time, log matching.

use super::*;

impl Sim {
    /// Invariants checked after every step of node `id`.
    pub(super) fn after_step(&mut self, id: NodeId) -> Check {
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
    pub(super) fn record_committed(&mut self, id: NodeId, committed: LogIndex) -> Check {
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
    pub(super) fn check_leader_completeness(&self, id: NodeId) -> Check {
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
    pub(super) fn check_commit_quorum(&self, id: NodeId, committed: LogIndex) -> Check {
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
    pub(super) fn check_one_change_at_a_time(&mut self, id: NodeId) -> Check {
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
    pub(super) fn check_log_matching(&self) -> Check {
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
}
