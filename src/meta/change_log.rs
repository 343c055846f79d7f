//! The meta leader's recent changes, so that a node refreshing its copy of the meta state is
//! sent the changes since the revision it holds rather than the whole state (etcd's watch
//! from a revision, with its compaction: a revision too old is answered with the whole state).
//!
//! Only changes this node wrote as meta leader, one revision after the other: a gap (another
//! leader wrote in between) starts the log again. Bounded in entries and bytes; the oldest go
//! first.

use super::records::{writes_bytes, MetaWrite};
use std::collections::VecDeque;
use std::sync::Arc;

/// Changes kept at most.
pub const CHANGE_LOG_ENTRIES_MAX: usize = 1024;
/// Bytes of keys and values kept at most (4 MiB).
pub const CHANGE_LOG_BYTES_MAX: usize = 4 << 20;

/// One change: the revision it made and its writes.
pub type Change = (u64, Arc<Vec<MetaWrite>>);

/// The recent changes, oldest first, at consecutive revisions.
#[derive(Debug, Default)]
pub struct ChangeLog {
    /// The changes.
    changes: VecDeque<Change>,
    /// Bytes of keys and values they hold (the byte bound).
    bytes: usize,
}

impl ChangeLog {
    /// Records the change that made `revision`.
    pub fn push(&mut self, revision: u64, writes: Arc<Vec<MetaWrite>>) {
        if self.changes.back().is_some_and(|(last, _)| last + 1 != revision) {
            self.changes.clear();
            self.bytes = 0;
        }
        self.bytes += writes_bytes(&writes);
        self.changes.push_back((revision, writes));
        while self.changes.len() > CHANGE_LOG_ENTRIES_MAX
            || (self.bytes > CHANGE_LOG_BYTES_MAX && self.changes.len() > 1)
        {
            if let Some((_, w)) = self.changes.pop_front() {
                self.bytes -= writes_bytes(&w);
            }
        }
    }

    /// The changes from revision `since` to revision `to`, in order: empty when they are the
    /// same; `None` when the log does not hold every one of them (or `since` is ahead).
    pub fn between(&self, since: u64, to: u64) -> Option<Vec<Change>> {
        if since == to {
            return Some(Vec::new());
        }
        if since > to {
            return None;
        }
        let first = self.changes.front()?.0;
        if since + 1 < first {
            return None;
        }
        let out: Vec<Change> = self.changes.iter().filter(|(r, _)| *r > since && *r <= to).cloned().collect();
        (out.len() as u64 == to - since).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(n: usize) -> Arc<Vec<MetaWrite>> {
        Arc::new(vec![(vec![b'k'; n], None)])
    }

    #[test]
    fn changes_are_given_only_when_every_one_is_held() {
        let mut log = ChangeLog::default();
        assert_eq!(log.between(5, 5), Some(Vec::new()), "nothing changed");
        assert_eq!(log.between(4, 5), None, "not held");
        for r in 3..=6 {
            log.push(r, change(1));
        }
        let revs = |v: Option<Vec<Change>>| v.map(|v| v.into_iter().map(|(r, _)| r).collect::<Vec<_>>());
        assert_eq!(revs(log.between(2, 6)), Some(vec![3, 4, 5, 6]));
        assert_eq!(revs(log.between(4, 5)), Some(vec![5]));
        assert_eq!(log.between(1, 6), None, "revision 2 is not held");
        assert_eq!(log.between(6, 7), None, "revision 7 is not held");
        assert_eq!(log.between(7, 6), None, "ahead of the log");
        // A gap: another leader wrote revisions 7 and 8.
        log.push(9, change(1));
        assert_eq!(log.between(6, 9), None);
        assert_eq!(revs(log.between(8, 9)), Some(vec![9]));
    }

    #[test]
    fn the_log_is_bounded_in_entries_and_bytes() {
        let mut log = ChangeLog::default();
        for r in 1..=(CHANGE_LOG_ENTRIES_MAX as u64 + 10) {
            log.push(r, change(1));
        }
        assert_eq!(log.changes.len(), CHANGE_LOG_ENTRIES_MAX);
        assert_eq!(log.between(10, 11).map(|v| v.len()), Some(1), "revision 11 is held");
        assert_eq!(log.between(9, 11), None, "the oldest went first");
        let big = CHANGE_LOG_BYTES_MAX / 3 + 1;
        let last = CHANGE_LOG_ENTRIES_MAX as u64 + 10;
        for r in last + 1..=last + 3 {
            log.push(r, change(big));
        }
        assert!(log.bytes <= CHANGE_LOG_BYTES_MAX, "{} bytes held", log.bytes);
        assert_eq!(log.changes.len(), 2);
        assert!(log.between(last + 1, last + 3).is_some());
    }
}
