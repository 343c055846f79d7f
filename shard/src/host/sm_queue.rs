//! [`SmQueue`]: a group's state-machine work waiting its turn (one action runs at a time),
//! bounded in the entry bytes it holds.
//!
//! The engine hands out committed entries as soon as they are durable, with the entries when
//! it still has them in memory. A follower catching up from far behind commits far faster than
//! its state machine applies, so its applies queue up here; holding their entries would make
//! the queue grow with the backlog. Applies that follow each other are merged, and past
//! [`QUEUED_ENTRY_BYTES_MAX`] the entries are let go: the apply reads them back from the log
//! (they are durable there, and the log is never purged past the applied index), a bounded
//! slice at a time.

use flotilla_raft::{Entry, MachineAction};
use std::collections::VecDeque;

/// Entry bytes the queued applies of one group may hold in memory.
pub(crate) const QUEUED_ENTRY_BYTES_MAX: usize = 8 << 20;

/// One group's queued state-machine actions, in order.
#[derive(Default)]
pub(crate) struct SmQueue {
    actions: VecDeque<MachineAction>,
    /// Bytes of the entries the queued applies hold.
    entry_bytes: usize,
}

fn bytes_of(entries: &[Entry]) -> usize {
    entries.iter().map(|e| e.size_bytes()).sum()
}

impl SmQueue {
    /// Queues `action`. An apply that continues the last queued one joins it; entries past the
    /// byte bound are dropped (to be read from the log).
    pub(crate) fn push(&mut self, action: MachineAction) {
        let MachineAction::Apply { first, last, entries } = action else {
            self.actions.push_back(action);
            return;
        };
        let added = entries.as_deref().map_or(0, bytes_of);
        let mut entries = entries;
        if entries.is_some() && self.entry_bytes + added > QUEUED_ENTRY_BYTES_MAX {
            entries = None;
        }
        if let Some(MachineAction::Apply { last: prev_last, entries: prev, .. }) = self.actions.back_mut() {
            if prev_last.next() == first {
                *prev_last = last;
                match (prev.as_mut(), entries) {
                    (Some(p), Some(e)) => {
                        p.extend(e);
                        self.entry_bytes += added;
                    }
                    (Some(p), None) => {
                        // One range, read from the log whole: what the earlier part held goes.
                        self.entry_bytes = self.entry_bytes.saturating_sub(bytes_of(p));
                        *prev = None;
                    }
                    (None, _) => {}
                }
                return;
            }
        }
        if entries.is_some() {
            self.entry_bytes += added;
        }
        self.actions.push_back(MachineAction::Apply { first, last, entries });
    }

    /// Puts `action` back at the head (the rest of an apply read from the log in slices).
    pub(crate) fn push_front(&mut self, action: MachineAction) {
        if let MachineAction::Apply { entries: Some(e), .. } = &action {
            self.entry_bytes += bytes_of(e);
        }
        self.actions.push_front(action);
    }

    /// The next action to run.
    pub(crate) fn pop(&mut self) -> Option<MachineAction> {
        let action = self.actions.pop_front()?;
        if let MachineAction::Apply { entries: Some(e), .. } = &action {
            self.entry_bytes = self.entry_bytes.saturating_sub(bytes_of(e));
        }
        // Most groups are idle most of the time: an emptied queue gives its buffer back (with
        // 10,000 groups on a node, the kept buffers were about 700 bytes each).
        if self.actions.is_empty() {
            self.actions = VecDeque::new();
        }
        Some(action)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Bytes of entries held by the queued applies.
    #[cfg(test)]
    pub(crate) fn entry_bytes(&self) -> usize {
        self.entry_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use flotilla_raft::{EntryPayload, LogId, LogIndex, Term};

    fn entries(first: u64, last: u64, size: usize) -> Vec<Entry> {
        (first..=last)
            .map(|i| Entry {
                log_id: LogId { term: Term(1), index: LogIndex(i) },
                payload: EntryPayload::Normal(Bytes::from(vec![0u8; size])),
            })
            .collect()
    }

    fn apply(first: u64, last: u64, size: Option<usize>) -> MachineAction {
        MachineAction::Apply {
            first: LogIndex(first),
            last: LogIndex(last),
            entries: size.map(|s| entries(first, last, s)),
        }
    }

    fn shape(a: &MachineAction) -> (u64, u64, Option<usize>) {
        match a {
            MachineAction::Apply { first, last, entries } => (first.0, last.0, entries.as_ref().map(|e| e.len())),
            _ => (0, 0, None),
        }
    }

    #[test]
    fn applies_that_follow_each_other_join_and_other_actions_keep_their_place() {
        let mut q = SmQueue::default();
        q.push(apply(1, 2, Some(10)));
        q.push(apply(3, 5, Some(10)));
        q.push(MachineAction::Build);
        q.push(apply(6, 6, Some(10)));
        q.push(apply(8, 9, Some(10)));
        let e = Entry {
            log_id: LogId { term: Term(1), index: LogIndex(1) },
            payload: EntryPayload::Normal(Bytes::from(vec![0u8; 10])),
        };
        assert_eq!(q.entry_bytes(), 8 * e.size_bytes());
        assert_eq!(q.pop().map(|a| shape(&a)), Some((1, 5, Some(5))));
        assert!(matches!(q.pop(), Some(MachineAction::Build)));
        assert_eq!(q.pop().map(|a| shape(&a)), Some((6, 6, Some(1))), "not joined across a Build");
        assert_eq!(q.pop().map(|a| shape(&a)), Some((8, 9, Some(2))), "not joined across a gap");
        assert!(q.is_empty());
        assert_eq!(q.entry_bytes(), 0);
    }

    #[test]
    fn past_the_byte_bound_queued_applies_let_their_entries_go() {
        let mut q = SmQueue::default();
        let big = 1 << 20;
        // One apply at a time, each 1 MiB, as a follower catching up gets them.
        for i in 0..100u64 {
            q.push(apply(i + 1, i + 1, Some(big)));
            assert!(q.entry_bytes() <= QUEUED_ENTRY_BYTES_MAX, "{} bytes held after {i}", q.entry_bytes());
        }
        // All one range now, to be read from the log.
        assert_eq!(q.pop().map(|a| shape(&a)), Some((1, 100, None)));
        assert_eq!(q.entry_bytes(), 0);
    }
}
