//! What a poller lets in from peers: each message goes to its group (waking it unless the
//! message leaves a quiet group nothing to do), except chunks of a snapshot the group cannot
//! install on this node.

use super::liveness::keeps_quiet;
use super::poller::{empty_batch, Poller};
use super::{QuiesceNotice, RemovedNotice};
use flotilla_raft::{GroupId, LogIndex, Message, MessageBody, NodeId};
use std::sync::atomic::Ordering;
use tracing::{debug, info};

impl Poller {
    /// Peer messages for this poller's groups, and the quiescence notices that came with them.
    pub(super) fn on_batch(
        &mut self,
        from: NodeId,
        messages: Vec<(GroupId, Message)>,
        quiesce: Vec<QuiesceNotice>,
        removed: Vec<RemovedNotice>,
    ) {
        let now = self.shared.now();
        self.shared.queued[self.index].fetch_sub(messages.len(), Ordering::Relaxed);
        for (gid, msg) in messages {
            if !self.groups.contains_key(&gid) {
                self.shared.stats.unknown_group_msgs.fetch_add(1, Ordering::Relaxed);
                debug!(group = %gid, %from, "message for a group not on this node");
                continue;
            }
            self.tell_if_removed(gid, from);
            if self.refuses_snapshot_chunk(gid, &msg) {
                self.shared.stats.snapshot_chunks_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !self.groups.get(&gid).is_some_and(|g| g.quiet && keeps_quiet(g, &msg)) {
                self.wake(gid, false);
            }
            if let Some(g) = self.groups.get_mut(&gid) {
                g.core.handle_message(now, msg);
                self.dirty.insert(gid);
            }
        }
        for q in quiesce {
            self.on_quiesce_notice(from, q);
        }
        for r in removed {
            self.on_removed_notice(from, r);
        }
    }

    /// Tells `from` that group `gid` removed it, if the group's committed configuration and
    /// every newer one it holds leave `from` out (a configuration still being committed might
    /// add it). Once per group and sender per round.
    fn tell_if_removed(&mut self, gid: GroupId, from: NodeId) {
        let Some(g) = self.groups.get(&gid) else { return };
        let e = g.core.engine();
        let committed = e.committed_membership();
        if committed.log_id.index == LogIndex(0)
            || committed.membership.contains(from)
            || e.membership().membership.contains(from)
        {
            return;
        }
        let index = committed.log_id.index;
        if self.round.told.insert((from, gid)) {
            let me = self.shared.config.node;
            let batch = self.round.out.entry(from).or_insert_with(|| empty_batch(me));
            batch.removed.push(RemovedNotice { group: gid, index });
        }
    }

    /// A member of group `r.group` says its committed configuration at `r.index` leaves this
    /// node out. Recorded for the node's decision (`GroupInfo::removed_at`); the group goes on
    /// as it is until then. Only a member may say so: a notice from a node the group does not
    /// count is ignored.
    fn on_removed_notice(&mut self, from: NodeId, r: RemovedNotice) {
        let Some(g) = self.groups.get_mut(&r.group) else { return };
        if !g.core.engine().membership().membership.contains(from)
            && !g.core.engine().committed_membership().membership.contains(from)
        {
            return;
        }
        if g.removed_at.is_none_or(|at| at < r.index) {
            info!(group = %r.group, %from, index = %r.index, "a member says the group removed this node");
            g.removed_at = Some(r.index);
            self.info_changed = true;
        }
    }

    /// Whether to drop `msg`, a chunk of a snapshot whose range group `gid` cannot install
    /// here: it would replace keys another group of this node owns (a group split from it
    /// later, or a parent that has not applied the split yet), or it is wider than the
    /// replica's range (an empty replica created with the map's range, narrowed ahead of Raft,
    /// waits until the leader applied that split and sends a snapshot of the narrowed range:
    /// adopting the wider range would race the creation of the group split off it). Judged on
    /// the first chunk,
    /// which carries the range; the sender resends that one until the transfer changes.
    pub(super) fn refuses_snapshot_chunk(&mut self, gid: GroupId, msg: &Message) -> bool {
        let MessageBody::Snapshot { meta, offset, data, .. } = &msg.body else { return false };
        let Some(g) = self.groups.get(&gid) else { return false };
        if *offset != 0 {
            return g.refused_snapshot == Some(meta.snapshot_id);
        }
        // Unreadable: the installation checks the whole record and fails loudly.
        let Some(range) = crate::kv_snapshot::stream_range(data) else { return false };
        let narrow = g.sm.range();
        let own = self.shared.range_with_frozen_sources(gid, &narrow);
        if !narrow.covers(&range) && own.covers(&range) {
            // A snapshot taken after merges this replica missed: the sources it covers stop
            // while it streams in.
            self.park_covered_sources(gid, &range);
        }
        if !self.groups.contains_key(&gid) {
            return false;
        }
        let refused = if !own.covers(&range) {
            Some("wider than the group's range".to_string())
        } else {
            self.owner_of_overlap(gid, &range).map(|other| format!("group {other} of this node owns keys in it"))
        };
        let Some(g) = self.groups.get_mut(&gid) else { return false };
        match refused {
            Some(why) => {
                if g.refused_snapshot != Some(meta.snapshot_id) {
                    info!(group = %gid, from = %msg.from, snapshot = %meta.last_log_id, reason = %why,
                        "refusing a snapshot whose range cannot be installed here");
                }
                g.refused_snapshot = Some(meta.snapshot_id);
                true
            }
            None => {
                g.refused_snapshot = None;
                false
            }
        }
    }

    /// Another group of this node that owns keys in `range`, if any. A source frozen for
    /// `gid` to absorb, inside `range`, does not count: `range` is a snapshot of `gid` taken
    /// after the merge, and the source is retired once it is installed.
    pub(super) fn owner_of_overlap(&self, gid: GroupId, range: &crate::kv::KeyRange) -> Option<GroupId> {
        let r = self.shared.registry.read().ok()?;
        let registered = r.groups.iter().filter(|(id, e)| {
            let sr = e.sm.range();
            let into = e.sm.merge_state().frozen.map(|f| f.into);
            **id != gid && sr.overlaps(range) && !super::merge::absorbed_by_snapshot(into, gid, &sr, range)
        });
        let parked = r.parked.iter().filter(|(id, p)| {
            let sr = p.entry.sm.range();
            **id != gid && sr.overlaps(range) && !super::merge::absorbed_by_snapshot(Some(p.into), gid, &sr, range)
        });
        registered.map(|(id, _)| *id).chain(parked.map(|(id, _)| *id)).min()
    }
}
