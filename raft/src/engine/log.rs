//! The engine's view of the log: ids of every entry (stored compactly as the points where the
//! term changes) and a cache of the newest entries. The entries themselves live in
//! [`LogStorage`](crate::LogStorage); the cache holds those not yet durable (they are not in
//! storage yet) and recent ones the leader still has to send.

use crate::entry::Entry;
use crate::types::{LogId, LogIndex, Term};
use std::collections::VecDeque;

#[derive(Debug, Default)]
pub(crate) struct RaftLog {
    /// The entry just before the first one in the log (a snapshot boundary, or ZERO).
    last_purged: LogId,
    /// For each run of entries of one term after `last_purged`: the id of its first entry.
    /// Terms never decrease along a log, so this is sorted by index and by term.
    points: Vec<LogId>,
    /// Id of the last entry (`last_purged` if the log is empty).
    last: LogId,
    /// A suffix of the log: entries `cache_first()..=last.index`.
    cache: VecDeque<Entry>,
    /// Sum of `size_bytes` over `cache`.
    cache_bytes: usize,
}

impl RaftLog {
    /// A log whose entries after `last_purged` have the term-change points `points` and end at
    /// `last`.
    pub(crate) fn new(last_purged: LogId, points: Vec<LogId>, last: LogId) -> Self {
        debug_assert!(points.windows(2).all(|w| w[0].index < w[1].index && w[0].term < w[1].term));
        debug_assert!(points.first().is_none_or(|p| p.index == last_purged.index.next()));
        debug_assert!(points.is_empty() == (last.index == last_purged.index));
        RaftLog { last_purged, points, last, cache: VecDeque::new(), cache_bytes: 0 }
    }

    pub(crate) fn last_purged(&self) -> LogId {
        self.last_purged
    }
    pub(crate) fn first_index(&self) -> LogIndex {
        self.last_purged.index.next()
    }
    pub(crate) fn last_id(&self) -> LogId {
        self.last
    }
    pub(crate) fn last_index(&self) -> LogIndex {
        self.last.index
    }
    #[cfg(test)]
    pub(crate) fn points(&self) -> &[LogId] {
        &self.points
    }

    /// The term of the entry at `index`, if the log knows it (the purged boundary included).
    pub(crate) fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.last_purged.index {
            return Some(self.last_purged.term);
        }
        if index < self.first_index() || index > self.last.index {
            return None;
        }
        let pos = self.points.partition_point(|p| p.index <= index);
        Some(self.points[pos - 1].term)
    }

    pub(crate) fn id_at(&self, index: LogIndex) -> Option<LogId> {
        self.term_at(index).map(|term| LogId { term, index })
    }

    /// Whether the log holds `id` (same index and term).
    pub(crate) fn has(&self, id: LogId) -> bool {
        self.term_at(id.index) == Some(id.term)
    }

    /// The last entry at or before `index` whose term is at most `term` (the purged boundary if
    /// no entry qualifies). The follower's conflict hint and the leader's use of it.
    pub(crate) fn find_conflict_by_term(&self, index: LogIndex, term: Term) -> LogId {
        let mut idx = index.min(self.last.index);
        if idx <= self.last_purged.index {
            return self.last_purged;
        }
        let mut pos = self.points.partition_point(|p| p.index <= idx);
        while pos > 0 {
            let p = self.points[pos - 1];
            if p.term <= term {
                return LogId { term: p.term, index: idx };
            }
            idx = p.index.prev();
            pos -= 1;
        }
        self.last_purged
    }

    pub(crate) fn append(&mut self, entries: &[Entry]) {
        for e in entries {
            assert_eq!(e.log_id.index, self.last.index.next(), "append must continue the log");
            assert!(e.log_id.term >= self.last.term, "terms never decrease along a log");
            if self.points.is_empty() || e.log_id.term != self.last.term {
                self.points.push(e.log_id);
            }
            self.last = e.log_id;
            self.cache_bytes += e.size_bytes();
            self.cache.push_back(e.clone());
        }
    }

    /// Removes entries at `index` and after.
    pub(crate) fn truncate_from(&mut self, index: LogIndex) {
        assert!(index > self.last_purged.index, "cannot truncate purged entries");
        if index > self.last.index {
            return;
        }
        let prev = self.id_at(index.prev()).expect("entry before truncation point exists");
        self.points.retain(|p| p.index < index);
        self.last = prev;
        while self.cache.back().is_some_and(|e| e.log_id.index >= index) {
            let e = self.cache.pop_back().expect("checked");
            self.cache_bytes -= e.size_bytes();
        }
    }

    /// Forgets entries up to and including `upto.index`; the log then starts after `upto`.
    /// If `upto` is past the end, or the log disagrees about its term, the whole log goes.
    pub(crate) fn purge_up_to(&mut self, upto: LogId) {
        if upto.index <= self.last_purged.index {
            return;
        }
        if upto.index >= self.last.index || !self.has(upto) {
            self.points.clear();
            self.cache.clear();
            self.cache_bytes = 0;
            self.last_purged = upto;
            self.last = upto;
            return;
        }
        // Keep the point of the run that continues after `upto`, moved to its new start.
        let keep_from = self.points.partition_point(|p| p.index <= upto.index) - 1;
        self.points.drain(..keep_from);
        let next = upto.index.next();
        if self.points.len() > 1 && self.points[1].index == next {
            self.points.remove(0);
        } else {
            self.points[0].index = next;
        }
        self.last_purged = upto;
        self.evict_cache_up_to(upto.index);
    }

    /// Gives back the spare capacity of the cache and the term points (a quiet group's).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.cache.shrink_to_fit();
        self.points.shrink_to_fit();
    }

    /// (name, length, capacity) of the buffers `shrink_to_fit` shrinks.
    #[cfg(test)]
    pub(crate) fn buffer_sizes(&self) -> [(&'static str, usize, usize); 2] {
        [
            ("entry cache", self.cache.len(), self.cache.capacity()),
            ("term points", self.points.len(), self.points.capacity()),
        ]
    }

    pub(crate) fn cache_first(&self) -> LogIndex {
        self.cache.front().map(|e| e.log_id.index).unwrap_or(self.last.index.next())
    }

    pub(crate) fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }

    /// Drops cached entries up to and including `index`.
    pub(crate) fn evict_cache_up_to(&mut self, index: LogIndex) {
        while self.cache.front().is_some_and(|e| e.log_id.index <= index) {
            let e = self.cache.pop_front().expect("checked");
            self.cache_bytes -= e.size_bytes();
        }
    }

    /// Cached entries from `from` on, at most `entries_max` of them and (beyond the first)
    /// `bytes_max` bytes. `None` if `from` is not cached.
    pub(crate) fn cached(&self, from: LogIndex, entries_max: usize, bytes_max: usize) -> Option<Vec<Entry>> {
        let first = self.cache_first();
        if from < first || from > self.last.index {
            return None;
        }
        let skip = (from.0 - first.0) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.cache.iter().skip(skip) {
            if !out.is_empty() && (out.len() >= entries_max || bytes + e.size_bytes() > bytes_max) {
                break;
            }
            bytes += e.size_bytes();
            out.push(e.clone());
        }
        Some(out)
    }

    /// Cached entries `from..=to`, if all are cached.
    pub(crate) fn cached_range(&self, from: LogIndex, to: LogIndex) -> Option<Vec<Entry>> {
        if from < self.cache_first() || to > self.last.index || from > to {
            return None;
        }
        let skip = (from.0 - self.cache_first().0) as usize;
        Some(self.cache.iter().skip(skip).take((to.0 - from.0 + 1) as usize).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryPayload;

    fn ents(ids: &[(u64, u64)]) -> Vec<Entry> {
        ids.iter().map(|(t, i)| Entry { log_id: LogId::new(*t, *i), payload: EntryPayload::Blank }).collect()
    }

    fn log_with_terms(terms: &[u64]) -> RaftLog {
        let mut l = RaftLog::default();
        let e: Vec<_> = terms.iter().enumerate().map(|(i, t)| (*t, i as u64 + 1)).collect();
        l.append(&ents(&e));
        l
    }

    #[test]
    fn term_lookup_and_truncate() {
        let mut l = log_with_terms(&[1, 1, 2, 2, 2, 5]);
        assert_eq!(l.term_at(LogIndex(0)), Some(Term(0)));
        assert_eq!(l.term_at(LogIndex(2)), Some(Term(1)));
        assert_eq!(l.term_at(LogIndex(5)), Some(Term(2)));
        assert_eq!(l.term_at(LogIndex(6)), Some(Term(5)));
        assert_eq!(l.term_at(LogIndex(7)), None);
        l.truncate_from(LogIndex(4));
        assert_eq!(l.last_id(), LogId::new(2, 3));
        assert_eq!(l.points(), &[LogId::new(1, 1), LogId::new(2, 3)]);
        assert_eq!(l.cache_first(), LogIndex(1));
        assert!(l.cached(LogIndex(4), 10, 1000).is_none());
        // The cache's byte count follows (the leader evicts by it beyond its budget).
        assert_eq!(l.cache_bytes(), 3 * ENTRY);
    }

    #[test]
    fn conflict_hint_skips_whole_terms() {
        // Reference: the "fast back-off" of the Raft thesis §5.3 / etcd's findConflictByTerm.
        let l = log_with_terms(&[1, 1, 2, 2, 2, 5, 5]);
        assert_eq!(l.find_conflict_by_term(LogIndex(7), Term(4)), LogId::new(2, 5));
        assert_eq!(l.find_conflict_by_term(LogIndex(7), Term(1)), LogId::new(1, 2));
        assert_eq!(l.find_conflict_by_term(LogIndex(9), Term(6)), LogId::new(5, 7));
        assert_eq!(l.find_conflict_by_term(LogIndex(7), Term(0)), LogId::ZERO);
    }

    #[test]
    fn purge_keeps_the_suffix_and_its_terms() {
        let mut l = log_with_terms(&[1, 1, 2, 2, 2, 5]);
        l.purge_up_to(LogId::new(2, 3));
        assert_eq!(l.first_index(), LogIndex(4));
        assert_eq!(l.term_at(LogIndex(3)), Some(Term(2)));
        assert_eq!(l.term_at(LogIndex(4)), Some(Term(2)));
        assert_eq!(l.term_at(LogIndex(2)), None);
        assert_eq!(l.points(), &[LogId::new(2, 4), LogId::new(5, 6)]);
        l.purge_up_to(LogId::new(2, 5));
        assert_eq!(l.points(), &[LogId::new(5, 6)]);
        // A snapshot beyond the end empties the log.
        l.purge_up_to(LogId::new(7, 20));
        assert_eq!(l.last_id(), LogId::new(7, 20));
        assert_eq!(l.first_index(), LogIndex(21));
        assert!(l.points().is_empty());
    }

    #[test]
    fn purge_with_conflicting_term_drops_everything() {
        let mut l = log_with_terms(&[1, 1, 2]);
        l.purge_up_to(LogId::new(3, 2));
        assert_eq!(l.last_id(), LogId::new(3, 2));
        assert_eq!(l.last_index(), LogIndex(2));
    }

    #[test]
    fn cached_respects_limits() {
        let l = log_with_terms(&[1, 1, 1, 1]);
        let one = ENTRY;
        assert_eq!(l.cached(LogIndex(2), 2, 10_000).map(|v| v.len()), Some(2));
        assert_eq!(l.cached(LogIndex(1), 10, one * 3).map(|v| v.len()), Some(3));
        // At least one entry even when it alone exceeds the byte limit.
        assert_eq!(l.cached(LogIndex(1), 10, 1).map(|v| v.len()), Some(1));
    }
    const ENTRY: usize = crate::entry::ENTRY_OVERHEAD_BYTES;
}
