//! ReadIndex reads of one group travel in batches: one read call to the group's poller, one
//! round of heartbeats and one answer serve every read that arrived before the call was made.
//!
//! A ReadIndex read needs a quorum to confirm, after the read arrived, that this replica still
//! leads, and it is served at the commit index of that moment or later. Any read call made to
//! the group after the read arrived gives both. So while one call is out, the reads that arrive
//! wait together; when it comes back, one call goes for all of them (etcd's server keeps one
//! ReadIndex request in flight the same way). Each read otherwise cost a message to the poller
//! thread, a wake-up of that thread and a reply channel back: the largest cost of a ReadIndex
//! read beside a lease read, which skips all three.
//!
//! A task of its own (the batch's driver) makes the calls while reads keep coming, and ends
//! when a call comes back with nobody waiting for the next.

use super::{Host, HostError};
use flotilla_raft::{GroupId, RaftError, ReadMode, Request};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The batches of one group (created on the group's first ReadIndex read).
#[derive(Debug)]
pub(crate) struct ReadBatches {
    state: Mutex<BatchState>,
    /// The last batch answered and how: a batch's readers wait until it, or a later batch,
    /// is answered (a later batch's call, made after theirs, confirms them just as well).
    answered: watch::Sender<Answer>,
}

#[derive(Debug, Default)]
struct BatchState {
    /// Number of the last batch whose call was made (batches are numbered from 1).
    called: u64,
    /// A driver runs: the call of batch `called` is out, or about to be made.
    driving: bool,
    /// A read arrived after that call was made: batch `called + 1` has readers.
    next_wanted: bool,
}

/// How a batch was answered.
#[derive(Clone, Debug)]
struct Answer {
    batch: u64,
    result: Result<(), BatchError>,
}

/// What a failed batch tells each of its readers (a [`HostError`] is not `Clone`).
#[derive(Clone, Debug, PartialEq)]
enum BatchError {
    Raft(RaftError),
    UnknownGroup(GroupId),
    Overloaded(usize),
    Stopped,
    /// The driver ended before its call came back (its runtime shut down), or the call's
    /// answer could not be told apart from that.
    Lost,
}

impl BatchError {
    fn of(e: &HostError) -> BatchError {
        match e {
            HostError::Raft(r) => BatchError::Raft(r.clone()),
            HostError::UnknownGroup(g) => BatchError::UnknownGroup(*g),
            HostError::Overloaded(n) => BatchError::Overloaded(*n),
            HostError::Stopped => BatchError::Stopped,
            _ => BatchError::Lost,
        }
    }

    fn into_host(self) -> HostError {
        match self {
            BatchError::Raft(r) => HostError::Raft(r),
            BatchError::UnknownGroup(g) => HostError::UnknownGroup(g),
            BatchError::Overloaded(n) => HostError::Overloaded(n),
            BatchError::Stopped => HostError::Stopped,
            BatchError::Lost => HostError::Lost,
        }
    }
}

/// A reader's place: the batch it waits for, and whether it must start the driver.
#[derive(Debug, PartialEq)]
struct Joined {
    batch: u64,
    start_driver: bool,
}

impl ReadBatches {
    pub(crate) fn new() -> ReadBatches {
        ReadBatches {
            state: Mutex::new(BatchState::default()),
            answered: watch::channel(Answer { batch: 0, result: Ok(()) }).0,
        }
    }

    /// Takes a place in the next batch whose call is not made yet, and a receiver to learn
    /// when it is answered (subscribed under the lock, so no answer after the place is missed).
    fn join(&self) -> (Joined, watch::Receiver<Answer>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let joined = if s.driving {
            s.next_wanted = true;
            Joined { batch: s.called + 1, start_driver: false }
        } else {
            s.driving = true;
            s.called += 1;
            Joined { batch: s.called, start_driver: true }
        };
        (joined, self.answered.subscribe())
    }

    /// The driver's turn after batch `batch` was answered with `result`: the next batch to
    /// call, or `None` (the driver ends) when nobody waits for one.
    fn answer(&self, batch: u64, result: Result<(), BatchError>) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.answered.send_replace(Answer { batch, result });
        if s.next_wanted {
            s.next_wanted = false;
            s.called += 1;
            Some(s.called)
        } else {
            s.driving = false;
            None
        }
    }

    /// The driver ended without an answer for its batch: every reader waiting, of this batch
    /// and of the next, is told `Lost`, and the next reader starts a driver again.
    fn abandon(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.next_wanted {
            s.next_wanted = false;
            s.called += 1;
        }
        s.driving = false;
        self.answered.send_replace(Answer { batch: s.called, result: Err(BatchError::Lost) });
    }
}

/// Answers `Lost` to the readers of a driver that ends early (dropped with its runtime).
struct DriverGuard(Option<Arc<ReadBatches>>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.abandon();
        }
    }
}

impl Host {
    /// Confirms, for a ReadIndex read of `group` that arrived now, that this replica leads and
    /// has applied what was committed when the read arrived; batched with the group's other
    /// ReadIndex reads (see the module's documentation). The caller then reads its state machine.
    pub(super) async fn read_index_batched(&self, group: GroupId, batches: &Arc<ReadBatches>) -> Result<(), HostError> {
        self.shared.stats.read_index_reads.fetch_add(1, Ordering::Relaxed);
        let (joined, mut answered) = batches.join();
        if joined.start_driver {
            tokio::spawn(self.clone().drive_read_batches(group, batches.clone(), joined.batch));
        }
        let timeout = Duration::from_millis(self.shared.config.api_timeout_ms);
        let result = match tokio::time::timeout(timeout, answered.wait_for(|a| a.batch >= joined.batch)).await {
            Ok(Ok(a)) => a.result.clone().map_err(BatchError::into_host),
            // The sender lives as long as the batches, which the caller holds.
            Ok(Err(_)) => Err(HostError::Lost),
            Err(_) => Err(HostError::Raft(RaftError::Timeout)),
        };
        result
    }

    /// Makes one read call per batch, from `first`, while batches have readers.
    async fn drive_read_batches(self, group: GroupId, batches: Arc<ReadBatches>, first: u64) {
        let mut guard = DriverGuard(Some(batches));
        let mut batch = first;
        loop {
            self.shared.stats.read_index_batches.fetch_add(1, Ordering::Relaxed);
            let result = self
                .call(group, |tx| Request::Read { mode: ReadMode::ReadIndex, wait_apply: true, reply: tx })
                .await
                .map(|_| ())
                .map_err(|e| BatchError::of(&e));
            let Some(b) = guard.0.as_ref() else { return };
            match b.answer(batch, result) {
                Some(next) => batch = next,
                None => {
                    guard.0 = None;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(b: &ReadBatches) -> (u64, Result<(), BatchError>) {
        let a = b.answered.borrow();
        (a.batch, a.result.clone())
    }

    #[test]
    fn reads_that_arrive_while_a_call_is_out_share_the_next_call() {
        let b = ReadBatches::new();
        let (first, _) = b.join();
        assert_eq!(first, Joined { batch: 1, start_driver: true });
        // Three reads while batch 1's call is out: they wait for batch 2, and start nothing.
        for _ in 0..3 {
            assert_eq!(b.join().0, Joined { batch: 2, start_driver: false });
        }
        // Batch 1 answered: the driver calls batch 2 at once.
        assert_eq!(b.answer(1, Ok(())), Some(2));
        assert_eq!(answered(&b), (1, Ok(())));
        // A read arriving now waits for batch 3: batch 2's call may predate it.
        assert_eq!(b.join().0, Joined { batch: 3, start_driver: false });
        assert_eq!(b.answer(2, Ok(())), Some(3));
        // Nobody after batch 3: the driver ends, and the next read starts one again.
        assert_eq!(b.answer(3, Err(BatchError::Raft(RaftError::Timeout))), None);
        assert_eq!(answered(&b), (3, Err(BatchError::Raft(RaftError::Timeout))));
        assert_eq!(b.join().0, Joined { batch: 4, start_driver: true });
    }

    #[test]
    fn a_driver_that_ends_early_fails_its_readers_and_the_next_read_starts_afresh() {
        let b = ReadBatches::new();
        b.join();
        b.join();
        // Readers of batches 1 and 2 wait; the driver is dropped.
        b.abandon();
        assert_eq!(answered(&b), (2, Err(BatchError::Lost)));
        // The next read does not take the number of a batch already answered `Lost`.
        assert_eq!(b.join().0, Joined { batch: 3, start_driver: true });
    }

    #[test]
    fn batch_errors_come_back_as_the_host_errors_they_were() {
        for e in [
            HostError::Raft(RaftError::NotLeader { leader: None }),
            HostError::UnknownGroup(GroupId(7)),
            HostError::Overloaded(3),
            HostError::Stopped,
            HostError::Lost,
        ] {
            let back = BatchError::of(&e).into_host();
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
        }
    }
}
