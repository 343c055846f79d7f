//! Keeping many groups cheap and still live: the poller's one tick (timers of awake groups,
//! groups going quiet), waking quiet groups (by a message, a call, their leader's node going
//! down, or a member's node answering again), and stopping every group when the store is poisoned so that the other
//! nodes elect new leaders at once.

use super::group_state::GroupState;
use super::poller::{empty_batch, Poller};
use super::QuiesceNotice;
use flotilla_raft::{GroupId, Message, MessageBody, NodeId, Role};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{error, info};

impl Poller {
    /// Wakes a quiet group. `leader_down`: woken because its leader's node stopped answering.
    pub(super) fn wake(&mut self, gid: GroupId, leader_down: bool) {
        let at = Instant::now();
        let now = self.shared.now();
        let Some(g) = self.groups.get_mut(&gid) else { return };
        if !g.quiet {
            return;
        }
        g.idle_ticks = 0;
        g.quiet = false;
        g.quiet_leader = None;
        let leader_alive = !leader_down && g.core.engine().leader().is_some_and(|l| self.shared.is_live(l, at));
        g.core.engine_mut().wake(now, leader_alive);
        self.awake.insert(gid);
        self.dirty.insert(gid);
        self.shared.stats.woken.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn on_quiesce_notice(&mut self, from: NodeId, q: QuiesceNotice) {
        let Some(g) = self.groups.get_mut(&q.group) else { return };
        if g.quiet || g.busy() || !g.core.engine().can_quiesce_follower(from, q.term, q.index) {
            return;
        }
        g.quiet = true;
        g.quiet_leader = Some(from);
        g.release_idle_memory();
        self.awake.remove(&q.group);
        self.shared.stats.quiesced.fetch_add(1, Ordering::Relaxed);
    }

    /// The store failed: every group stops (their callers get the error at once rather than
    /// timing out, and they send nothing more, so the other nodes elect new leaders).
    pub(super) fn stop_all_if_poisoned(&mut self) {
        if self.poisoned {
            return;
        }
        let Some(e) = self.shared.store.poisoned() else { return };
        self.poisoned = true;
        error!(poller = self.index, groups = self.groups.len(), error = %e, "the store is poisoned: stopping every group");
        for g in self.groups.values_mut() {
            g.core.fail(e.clone());
        }
        self.info_changed = true;
        self.awake.clear();
        self.to_wake.clear();
    }

    /// The batched tick: timers of awake groups, quiescence, node liveness.
    pub(super) fn tick(&mut self, at: Instant) {
        self.stop_all_if_poisoned();
        let now = self.shared.now();
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let live = |n: NodeId| shared.is_live(n, at);
        let mut going_quiet = Vec::new();
        // Groups whose timer would start an election, with when it fired.
        let mut campaigns = Vec::new();
        for gid in &self.awake {
            let Some(g) = self.groups.get_mut(gid) else { continue };
            if g.core.fatal().is_some() {
                continue;
            }
            // Judged on the state the last round left (before this tick's heartbeat).
            if cfg.quiesce_after_ticks > 0 {
                // A leader serving lease reads on callers' threads is busy too: quiet, its
                // lease would run out and the reads would come back through here.
                let busy = g.busy() || g.core.lease_gate_used();
                match (busy, g.core.engine().quiesce_point(live)) {
                    (false, Some(point)) => {
                        g.idle_ticks += 1;
                        if g.idle_ticks >= cfg.quiesce_after_ticks {
                            going_quiet.push((*gid, point));
                            continue;
                        }
                    }
                    _ => g.idle_ticks = 0,
                }
            }
            let deadline = g.core.engine().next_deadline();
            if now >= deadline {
                // A follower's or candidate's timer starts an election (or a pre-vote), which
                // costs messages to and work on every member: bounded per tick, below.
                if matches!(g.core.engine().role(), Role::Follower | Role::PreCandidate | Role::Candidate) {
                    campaigns.push((deadline, *gid));
                    continue;
                }
                g.core.handle_timeout(now);
                self.dirty.insert(*gid);
            }
        }
        // The longest waiting first: each node's timers are its own random draws, so the
        // nodes do not all start the same groups' elections in the same tick (which would
        // split their votes), and a group put off is served once the ones that fired before
        // it are.
        let budget = cfg.campaigns_per_tick_max;
        if campaigns.len() > budget {
            campaigns.select_nth_unstable(budget);
            let postponed = (campaigns.len() - budget) as u64;
            campaigns.truncate(budget);
            self.shared.stats.campaigns_postponed.fetch_add(postponed, Ordering::Relaxed);
        }
        for (_, gid) in campaigns {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.core.handle_timeout(now);
                self.dirty.insert(gid);
            }
        }
        for (gid, (term, index)) in going_quiet {
            let Some(g) = self.groups.get_mut(&gid) else { continue };
            g.quiet = true;
            g.release_idle_memory();
            self.awake.remove(&gid);
            self.shared.stats.quiesced.fetch_add(1, Ordering::Relaxed);
            let me = self.shared.config.node;
            for node in g.core.engine().membership().membership.nodes() {
                if node != me {
                    self.round.out.entry(node).or_insert_with(|| empty_batch(me)).quiesce.push(QuiesceNotice {
                        group: gid,
                        term,
                        index,
                    });
                }
            }
        }
        // Nodes that went down since the last tick: their quiet groups wake (rate-limited).
        let peers: Vec<NodeId> = self.shared.peers.lock().map(|p| p.iter().copied().collect()).unwrap_or_default();
        let down: BTreeSet<NodeId> = peers.iter().copied().filter(|n| !self.shared.is_live(*n, at)).collect();
        let newly_down: Vec<NodeId> = down.difference(&self.down).copied().collect();
        if !newly_down.is_empty() {
            info!(poller = self.index, nodes = ?newly_down, "peers stopped answering: waking the quiet groups they lead");
            for (gid, g) in &self.groups {
                if g.quiet && g.quiet_leader.is_some_and(|l| newly_down.contains(&l)) {
                    self.to_wake.push_back(*gid);
                }
            }
        }
        // Nodes that answer again: the quiet groups this node leads with them as members wake
        // (rate-limited too). Such a group went quiet without them, so they may miss entries
        // or the commit index; a voter would wake the group itself by campaigning once its
        // election timer runs out, but a learner never campaigns and would stay behind until
        // the next write.
        let back: Vec<NodeId> = self.down.difference(&down).copied().collect();
        if !back.is_empty() {
            info!(poller = self.index, nodes = ?back, "peers answer again: waking the quiet groups led here that they are in");
            for (gid, g) in &self.groups {
                let e = g.core.engine();
                if g.quiet && e.role() == Role::Leader && back.iter().any(|n| e.membership().membership.contains(*n)) {
                    self.to_wake.push_back(*gid);
                }
            }
        }
        self.down = down;
        for _ in 0..cfg.wakes_per_tick_max {
            let Some(gid) = self.to_wake.pop_front() else { break };
            self.wake(gid, true);
        }
    }
}

/// Whether a quiet group may take `msg` without waking: acknowledgements and heartbeats of
/// its own term, which straddle the moment it went quiet and ask for nothing new.
pub(super) fn keeps_quiet(g: &GroupState, msg: &Message) -> bool {
    let e = g.core.engine();
    if msg.term != e.term() {
        return false;
    }
    match &msg.body {
        MessageBody::HeartbeatResp { .. } | MessageBody::AppendResp { .. } => e.role() == Role::Leader,
        MessageBody::Heartbeat { commit, .. } => e.leader() == Some(msg.from) && commit.index == e.committed(),
        _ => false,
    }
}
