//! The leader's view of one follower's replication.

use crate::storage::SnapshotMeta;
use crate::types::{LogIndex, Millis};
use std::collections::VecDeque;

#[derive(Debug)]
pub(crate) enum ReplState {
    /// The leader does not know where the follower's log matches: one append at a time.
    Probe {
        /// An append is outstanding; resent on the next heartbeat response if lost.
        sent: bool,
    },
    /// The follower's log matches up to `matched`: appends are pipelined up to the window.
    Replicate,
    /// The follower needs entries that were purged: a snapshot is being streamed. Boxed: it
    /// is rare and large (the snapshot's meta), and every follower's progress would carry
    /// its space.
    Snapshot(Box<SnapshotSend>),
}

#[derive(Debug)]
pub(crate) struct SnapshotSend {
    pub(crate) meta: SnapshotMeta,
    /// Bytes the follower confirmed.
    pub(crate) acked: u64,
    /// Bytes sent (acked..sent are in flight).
    pub(crate) sent: u64,
    /// The last chunk (with `done`) was sent.
    pub(crate) all_sent: bool,
    /// When `acked` last moved (or the transfer started): the resend timer.
    pub(crate) progress_at: Millis,
    /// Chunks that may be in flight now: the configured window, cut to one after a loss
    /// (a gap or the resend timer) and grown by one per acknowledgement. Resending a whole
    /// window while the first copies still queue would only overflow the queues that lost a
    /// chunk in the first place.
    pub(crate) window_chunks: usize,
    /// The offset last resent because the follower reported a gap there: every chunk that
    /// arrives after a gap reports it again, and only the first report resends.
    pub(crate) gap_resent: Option<u64>,
}

impl SnapshotSend {
    /// A transfer of `meta` from its start, with `window_chunks` in flight at most.
    pub(crate) fn new(meta: SnapshotMeta, now: Millis, window_chunks: usize) -> SnapshotSend {
        SnapshotSend {
            meta,
            acked: 0,
            sent: 0,
            all_sent: false,
            progress_at: now,
            window_chunks: window_chunks.max(1),
            gap_resent: None,
        }
    }

    /// Sends again from `offset`, one chunk at a time until acknowledgements come back.
    pub(crate) fn resend_from(&mut self, offset: u64) {
        self.sent = offset;
        self.all_sent = false;
        self.window_chunks = 1;
    }
}

#[derive(Debug)]
pub(crate) struct Progress {
    /// Highest index known to match the leader's log (durably on the follower).
    pub(crate) matched: LogIndex,
    /// Next index to send.
    pub(crate) next: LogIndex,
    pub(crate) state: ReplState,
    /// Last index and entry bytes of each append in flight (Replicate state), oldest first.
    pub(crate) inflight: VecDeque<(LogIndex, u64)>,
    /// The sum of the bytes in `inflight`.
    pub(crate) inflight_bytes: u64,
    /// A `LoadEntries` for this follower is outstanding.
    pub(crate) loading: bool,
    /// Heard from the follower since the last check-quorum round.
    pub(crate) recent_active: bool,
    /// Highest heartbeat round the follower acknowledged (ReadIndex, lease, and whether it
    /// answered since the group last woke from quiescence).
    pub(crate) round_acked: u64,
    /// The leader's count of round acknowledgements (`Reads::count_answer`) when this follower
    /// acknowledged `round_acked`: among followers that answered the same round, who answered
    /// first (ReadIndex rounds go to the quickest).
    pub(crate) round_answer: u64,
    /// When `matched` last advanced: detects lost appends in the Replicate state.
    pub(crate) matched_at: Millis,
    /// The commit index this follower was last told (as far as its matched log allows).
    pub(crate) commit_sent: LogIndex,
}

impl Progress {
    pub(crate) fn new(next: LogIndex, now: Millis) -> Progress {
        Progress {
            matched: LogIndex(0),
            next,
            state: ReplState::Probe { sent: false },
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            loading: false,
            recent_active: false,
            round_acked: 0,
            round_answer: 0,
            matched_at: now,
            commit_sent: LogIndex(0),
        }
    }

    pub(crate) fn become_probe(&mut self) {
        self.state = ReplState::Probe { sent: false };
        self.next = self.matched.next();
        self.clear_inflight();
    }

    /// Forgets the appends in flight (their answers will be judged stale or not come).
    pub(crate) fn clear_inflight(&mut self) {
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// Whether an append may be sent now: within `inflight_max` messages and, unless nothing
    /// is in flight, `inflight_bytes_max` bytes of entries (0: no byte limit). The byte bound
    /// is what a follower catching up from far behind holds in its queues and the transport's.
    pub(crate) fn can_send(&self, inflight_max: usize, inflight_bytes_max: usize) -> bool {
        let bytes_ok =
            inflight_bytes_max == 0 || self.inflight.is_empty() || self.inflight_bytes < inflight_bytes_max as u64;
        !self.loading
            && match &self.state {
                ReplState::Probe { sent } => !sent,
                ReplState::Replicate => self.inflight.len() < inflight_max && bytes_ok,
                ReplState::Snapshot(_) => false,
            }
    }

    /// Records that entries up to `last`, of `bytes` in all, were sent.
    pub(crate) fn sent(&mut self, last: LogIndex, bytes: u64) {
        match &mut self.state {
            ReplState::Probe { sent } => *sent = true,
            ReplState::Replicate => {
                self.next = last.next();
                self.inflight.push_back((last, bytes));
                self.inflight_bytes += bytes;
            }
            ReplState::Snapshot(_) => unreachable!("no appends while sending a snapshot"),
        }
    }

    /// Records an acknowledgement up to `matched`; returns whether it moved.
    pub(crate) fn ack(&mut self, matched: LogIndex, now: Millis) -> bool {
        while let Some(&(last, bytes)) = self.inflight.front() {
            if last > matched {
                break;
            }
            self.inflight.pop_front();
            self.inflight_bytes = self.inflight_bytes.saturating_sub(bytes);
        }
        if matched <= self.matched {
            return false;
        }
        self.matched = matched;
        self.matched_at = now;
        if self.next <= matched {
            self.next = matched.next();
        }
        true
    }
}
