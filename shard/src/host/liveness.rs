//! Keeping many groups cheap and still live: the poller's one tick (timers of awake groups,
//! groups going quiet), waking quiet groups (by a message, a call, their leader's node going
//! down, or a member's node answering again or on a new connection while it may be behind),
//! and stopping every group when the store is poisoned so that the other nodes elect new
//! leaders at once.

use super::group_state::GroupState;
use super::poller::{empty_batch, Poller};
use super::QuiesceNotice;
use flotilla_raft::{GroupId, Message, MessageBody, NodeId, Role};
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{error, info};

impl Poller {
    /// Wakes a quiet group. `leader_down`: woken because its leader's node stopped answering
    /// (else by a message, a call, or to catch up a member that answers again or comes back on
    /// a new connection).
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

    /// A leader went quiet: the follower does too if it is at the same point, idle. One still
    /// busy (writing, applying, loading) keeps the notice and takes it at a later tick once
    /// its work is done (`take_pending_notices`): a leader sends it once, and a learner that
    /// refused it would tick until the group next woke (a voter would campaign).
    pub(super) fn on_quiesce_notice(&mut self, from: NodeId, q: QuiesceNotice) {
        let Some(g) = self.groups.get_mut(&q.group) else { return };
        if g.quiet {
            return;
        }
        if g.busy() {
            // Never in place of a newer notice: one of an earlier term, arriving late, could
            // not be taken anyway.
            if q.term >= g.core.engine().term() {
                self.quiesce_pending.insert(q.group, (from, q));
            }
            self.shared.stats.quiesce_deferred.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.quiesce_pending.remove(&q.group);
        if g.core.engine().can_quiesce_follower(from, q.term, q.index) {
            self.go_quiet_following(q.group, from);
        }
    }

    /// Takes the notices kept while busy whose group is now idle at the notice's point (the
    /// check a notice passes on arrival). Drops those it can never take: the group went on
    /// past the point (a later term, entries or a commit index beyond it), is gone, failed or
    /// quiet, or the notice's leader no longer counts as live (`at`, the instant the tick
    /// judges liveness by): going quiet under a leader already counted down, the group would
    /// never be woken for it, since only a leader newly counted down wakes its quiet groups.
    /// A notice whose group is short of the point stays: its own write or apply may still be
    /// on the way (queued in the engine, not yet driven), and an entry costs one check a tick.
    fn take_pending_notices(&mut self, at: Instant) {
        if self.quiesce_pending.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let mut quiet = Vec::new();
        self.quiesce_pending.retain(|gid, (from, q)| {
            let Some(g) = self.groups.get(gid) else { return false };
            if g.quiet || g.core.fatal().is_some() || !shared.is_live(*from, at) {
                return false;
            }
            let e = g.core.engine();
            if e.term() != q.term || e.last_log_id().index > q.index || e.committed() > q.index {
                return false;
            }
            if !g.busy() && e.can_quiesce_follower(*from, q.term, q.index) {
                quiet.push((*gid, *from));
                return false;
            }
            true
        });
        for (gid, from) in quiet {
            self.go_quiet_following(gid, from);
        }
    }

    fn go_quiet_following(&mut self, gid: GroupId, leader: NodeId) {
        let Some(g) = self.groups.get_mut(&gid) else { return };
        g.quiet = true;
        g.quiet_leader = Some(leader);
        g.release_idle_memory();
        self.awake.remove(&gid);
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
        self.to_catch_up.clear();
    }

    /// The batched tick: timers of awake groups, quiescence, node liveness.
    pub(super) fn tick(&mut self, at: Instant) {
        self.stop_all_if_poisoned();
        self.take_pending_notices(at);
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
            info!(poller = self.index, nodes = ?newly_down, "peers not answering: waking the quiet groups they lead");
            for (gid, g) in &self.groups {
                if g.quiet && g.quiet_leader.is_some_and(|l| newly_down.contains(&l)) {
                    self.to_wake.push(*gid);
                }
            }
        }
        // Nodes that answer again after being counted down (a node this host sends to but
        // never heard from counts as down once the host is `peer_down_ms` old, see
        // `Poller::flush`), and live nodes on a new connection since the last tick (a node
        // that restarted faster than `peer_down_ms` is never counted down; it comes back on a
        // new connection, at once where it dials, see `HostNetwork::connections`): the quiet
        // groups led here in which they may be behind wake, so
        // that they catch up. Those are the groups where the leader knows them to lack
        // entries, and every group where they are learners: a learner never campaigns, and
        // one that has the entries may still lack the commit index (it missed the message
        // that carried it, or lost it in a crash). A voter in that state wakes the group
        // itself with a pre-vote once its election timer runs out. A woken leader goes quiet
        // again only once every live follower answered a heartbeat (`Engine::quiesce_point`),
        // so a node that answers before its groups are loaded again is caught up once they
        // are. A connection replaced for another reason (a network fault) costs such a wake
        // too, at most `wakes_per_tick_max` groups a tick.
        let mut back: Vec<NodeId> = self.down.difference(&down).copied().collect();
        for n in &peers {
            let count = self.shared.network.connections(*n);
            let before = self.connections_seen.insert(*n, count);
            if before.is_some_and(|b| count > b) && !down.contains(n) && !back.contains(n) {
                back.push(*n);
            }
        }
        if !back.is_empty() {
            info!(poller = self.index, nodes = ?back, "peers answer: waking the quiet groups led here where they may be behind");
            for (gid, g) in &self.groups {
                let e = g.core.engine();
                if !g.quiet || e.role() != Role::Leader {
                    continue;
                }
                let m = &e.membership().membership;
                let last = e.last_log_id().index;
                let behind = |n: &NodeId| m.is_learner(*n) || e.matched(*n).is_some_and(|i| i < last);
                if back.iter().any(behind) {
                    self.to_catch_up.push(*gid);
                }
            }
        }
        self.down = down;
        for _ in 0..cfg.wakes_per_tick_max {
            if let Some(gid) = self.to_wake.pop() {
                self.wake(gid, true);
            } else if let Some(gid) = self.to_catch_up.pop() {
                self.wake(gid, false);
            } else {
                break;
            }
        }
    }
}

/// Quiet groups waiting to be woken, in the order they were queued, each at most once: a node
/// that comes and goes does not queue its groups again while they still wait, so the queue
/// holds at most one entry per group id the poller has had (a group gone meanwhile is
/// skipped when its turn comes).
#[derive(Default)]
pub(super) struct WakeQueue {
    order: VecDeque<GroupId>,
    queued: HashSet<GroupId>,
}

impl WakeQueue {
    pub(super) fn push(&mut self, gid: GroupId) {
        if self.queued.insert(gid) {
            self.order.push_back(gid);
        }
    }

    pub(super) fn pop(&mut self) -> Option<GroupId> {
        let gid = self.order.pop_front()?;
        self.queued.remove(&gid);
        Some(gid)
    }

    pub(super) fn clear(&mut self) {
        self.order.clear();
        self.queued.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_queue_holds_each_group_once_in_the_order_first_queued() {
        let mut q = WakeQueue::default();
        for g in [3, 1, 3, 2, 1] {
            q.push(GroupId(g));
        }
        assert_eq!(std::iter::from_fn(|| q.pop()).collect::<Vec<_>>(), vec![GroupId(3), GroupId(1), GroupId(2)]);
        // Once taken out, a group may be queued again.
        q.push(GroupId(1));
        assert_eq!(q.pop(), Some(GroupId(1)));
        q.push(GroupId(4));
        q.clear();
        assert_eq!(q.pop(), None);
    }
}
