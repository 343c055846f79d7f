//! A node's recent history of its copy of the map: which shards changed from one revision of
//! the meta state to the next, as the node's view moved. With it a client holding the map at
//! some revision is sent only the shards changed since (`Request::MapSince`), not the whole map:
//! at 10,000 shards a whole map is about a megabyte, and past about 40,000 it no longer fits a
//! transport frame.
//!
//! Every node keeps one (a client asks any node), whatever its view is fed by (the local meta
//! replica, the meta leader's changes or whole state). A view that moved from revision `a` to
//! `b` records the shards that differ between its maps at `a` and `b`, so the history holds
//! steps, not every revision; a client's revision that falls inside a step is answered with the
//! whole step (a few more shards than changed, each sent as it is now, which is harmless). A
//! step that changed no shard is joined to the one before, so that revisions that leave the
//! map alone (most of them) cost no step. A step that does not start where the last one ended
//! starts the history again. Bounded in steps and in shard ids; the oldest go first.
//!
//! It also holds how far the map of the newest step has come (`client::map_progress`): sent with
//! changes, it lets a client check that its copy with the changes applied is the node's map.

use crate::placement::ShardId;
use std::collections::{BTreeSet, VecDeque};

/// Steps kept at most.
pub const MAP_HISTORY_STEPS_MAX: usize = 1024;
/// Shard ids kept at most, over all steps.
pub const MAP_HISTORY_IDS_MAX: usize = 1 << 18;

/// One step of the view: from revision, to revision, the shards that differ.
type Step = (u64, u64, Vec<ShardId>);

/// The recent steps, oldest first, each starting where the one before ended.
#[derive(Debug, Default)]
pub struct MapHistory {
    steps: VecDeque<Step>,
    /// Ids held over all steps (the bound).
    ids: usize,
    /// The revision of the newest map recorded, and its progress.
    progress: (u64, u64),
}

impl MapHistory {
    /// Records that the view moved from revision `from` to `to` (`to > from`), with `changed`
    /// the shards whose descriptors differ between the two maps, and `progress` how far the
    /// map at `to` has come.
    pub fn record(&mut self, from: u64, to: u64, changed: Vec<ShardId>, progress: u64) {
        if to <= from {
            return;
        }
        self.progress = (to, progress);
        if self.steps.back().is_some_and(|(_, last, _)| *last != from) {
            self.steps.clear();
            self.ids = 0;
        }
        if changed.is_empty() {
            if let Some(last) = self.steps.back_mut() {
                last.1 = to;
                return;
            }
        }
        self.ids += changed.len();
        self.steps.push_back((from, to, changed));
        while self.steps.len() > MAP_HISTORY_STEPS_MAX || (self.ids > MAP_HISTORY_IDS_MAX && self.steps.len() > 1) {
            if let Some((_, _, ids)) = self.steps.pop_front() {
                self.ids -= ids.len();
            }
        }
    }

    /// How far the map at `revision` has come, if it is the newest recorded.
    pub fn progress_at(&self, revision: u64) -> Option<u64> {
        (self.progress.0 == revision && revision > 0).then_some(self.progress.1)
    }

    /// The shards that may have changed from revision `since` to revision `to` (every shard
    /// that did is named), with at most `most` of them: `None` when the history does not reach
    /// from `since` to exactly `to`, or they are more.
    pub fn since(&self, since: u64, to: u64, most: usize) -> Option<BTreeSet<ShardId>> {
        if since == to {
            return Some(BTreeSet::new());
        }
        if since > to || self.steps.back().is_none_or(|(_, last, _)| *last != to) {
            return None;
        }
        // The first step that holds a revision after `since`.
        let first = self.steps.iter().rposition(|(from, _, _)| *from <= since)?;
        let mut out = BTreeSet::new();
        for (_, _, ids) in self.steps.iter().skip(first) {
            out.extend(ids.iter().copied());
            if out.len() > most {
                return None;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<ShardId> {
        v.iter().copied().map(ShardId).collect()
    }

    fn set(v: &[u64]) -> Option<BTreeSet<ShardId>> {
        Some(ids(v).into_iter().collect())
    }

    #[test]
    fn the_shards_changed_since_a_revision_are_every_step_after_it() {
        let mut h = MapHistory::default();
        assert_eq!(h.since(4, 4, 10), set(&[]), "the same revision: nothing");
        assert_eq!(h.since(3, 4, 10), None, "no history");
        h.record(4, 5, ids(&[1]), 1);
        h.record(5, 9, ids(&[2, 3]), 3);
        h.record(9, 10, ids(&[]), 3);
        assert_eq!(h.since(4, 10, 10), set(&[1, 2, 3]));
        assert_eq!(h.since(5, 10, 10), set(&[2, 3]));
        // Inside a step: the whole step.
        assert_eq!(h.since(7, 10, 10), set(&[2, 3]));
        // The step to 10 changed nothing: joined to the one before, whose shards it names.
        assert_eq!(h.since(9, 10, 10), set(&[2, 3]));
        assert_eq!(h.steps.len(), 2);
        // Not to the revision held, before the history, from ahead, or too many.
        assert_eq!(h.since(4, 9, 10), None);
        assert_eq!(h.since(3, 10, 10), None);
        assert_eq!(h.since(11, 10, 10), None);
        assert_eq!(h.since(4, 10, 2), None);
        // Steps out of order start again.
        h.record(12, 13, ids(&[7]), 4);
        assert_eq!(h.since(9, 13, 10), None);
        assert_eq!(h.since(12, 13, 10), set(&[7]));
        h.record(13, 13, ids(&[8]), 5);
        assert_eq!(h.since(12, 13, 10), set(&[7]), "no step to the same revision");
        assert_eq!((h.progress_at(13), h.progress_at(12)), (Some(4), None));
        // Steps that changed nothing join the one before: no slot each.
        for r in 13..500 {
            h.record(r, r + 1, ids(&[]), 4);
        }
        assert_eq!(h.steps.len(), 1);
        assert_eq!(h.since(12, 500, 10), set(&[7]));
        assert_eq!(h.since(300, 500, 10), set(&[7]), "inside the joined step: the whole step");
        assert_eq!(h.progress_at(500), Some(4));
    }

    #[test]
    fn the_history_is_bounded_in_steps_and_ids() {
        let mut h = MapHistory::default();
        for r in 0..(MAP_HISTORY_STEPS_MAX as u64 + 10) {
            h.record(r, r + 1, ids(&[r]), r);
        }
        assert_eq!(h.steps.len(), MAP_HISTORY_STEPS_MAX);
        assert_eq!(h.since(0, MAP_HISTORY_STEPS_MAX as u64 + 10, usize::MAX), None, "the oldest went");
        let big: Vec<ShardId> = (0..MAP_HISTORY_IDS_MAX as u64).map(ShardId).collect();
        h.record(MAP_HISTORY_STEPS_MAX as u64 + 10, MAP_HISTORY_STEPS_MAX as u64 + 11, big, 0);
        assert_eq!(h.steps.len(), 1, "past the id bound only the newest step stays");
        assert_eq!(h.ids, MAP_HISTORY_IDS_MAX);
    }
}
