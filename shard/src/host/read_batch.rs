//! ReadIndex reads of one group travel in batches: one read call to the group's poller, one
//! round of heartbeats and one answer serve every read that arrived before the call was made.
//!
//! A ReadIndex read needs a quorum to confirm, after the read arrived, that this replica still
//! leads, and it is served at the commit index of that moment or later. Any read call made to
//! the group after the read arrived gives both. So while one call is out, the reads that arrive
//! wait together; when it comes back, one call goes for all of them (etcd's server keeps one
//! ReadIndex request in flight the same way). Each read otherwise cost a message to the poller
//! thread, often a wake-up of that thread, a reply channel back and, unless the engine's round
//! was shared, a round of heartbeats. With many reads in flight, a call serves several
//! (BENCHMARKS.md, session 21, has the figures).
//!
//! A task of its own (the batch's driver) makes the calls while reads keep coming, and ends
//! when a call comes back with nobody waiting for the next.

use super::{Host, HostError};
use flotilla_raft::{GroupId, RaftError, ReadMode, Request};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// The batches of one group (created on the group's first ReadIndex read here; about a
/// hundred bytes, kept while the group is on this node).
#[derive(Debug, Default)]
pub(crate) struct ReadBatches {
    state: Mutex<BatchState>,
    /// Woken each time a batch is answered.
    answered: Notify,
}

#[derive(Debug, Default)]
struct BatchState {
    /// Number of the last batch whose call was made (batches are numbered from 1).
    called: u64,
    /// A driver runs: the call of batch `called` is out, or about to be made.
    driving: bool,
    /// A read arrived after that call was made: batch `called + 1` has readers.
    next_wanted: bool,
    /// The highest batch answered `Ok`. Readers of every batch up to it are confirmed: a later
    /// batch's call was made after theirs, so it confirms them just as well.
    ok_through: u64,
    /// The last batch that failed, and how.
    failed: Option<(u64, BatchError)>,
}

impl BatchState {
    /// How a reader of `batch` fares: `None` while neither it nor a later batch was answered.
    /// A failure of a later batch fails it only if nothing from `batch` on succeeded.
    fn outcome(&self, batch: u64) -> Option<Result<(), BatchError>> {
        if self.ok_through >= batch {
            return Some(Ok(()));
        }
        match &self.failed {
            Some((b, e)) if *b >= batch => Some(Err(e.clone())),
            _ => None,
        }
    }
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
    fn lock(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place in the next batch whose call is not made yet.
    fn join(&self) -> Joined {
        let mut s = self.lock();
        if s.driving {
            s.next_wanted = true;
            Joined { batch: s.called + 1, start_driver: false }
        } else {
            s.driving = true;
            s.called += 1;
            Joined { batch: s.called, start_driver: true }
        }
    }

    /// How a reader of `batch` fares, if that is known yet.
    fn outcome(&self, batch: u64) -> Option<Result<(), BatchError>> {
        self.lock().outcome(batch)
    }

    /// Waits until a reader of `batch` is answered.
    async fn wait(&self, batch: u64) -> Result<(), BatchError> {
        loop {
            // Registered before the check, so an answer between the two is not missed.
            let notified = self.answered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.outcome(batch) {
                return r;
            }
            notified.await;
        }
    }

    /// The driver's turn after batch `batch` was answered with `result`: the next batch to
    /// call, or `None` (the driver ends) when nobody waits for one.
    fn answer(&self, batch: u64, result: Result<(), BatchError>) -> Option<u64> {
        let next = {
            let mut s = self.lock();
            match result {
                Ok(()) => s.ok_through = s.ok_through.max(batch),
                Err(e) => s.failed = Some((batch, e)),
            }
            if s.next_wanted {
                s.next_wanted = false;
                s.called += 1;
                Some(s.called)
            } else {
                s.driving = false;
                None
            }
        };
        self.answered.notify_waiters();
        next
    }

    /// The driver ended without an answer for its batch: every reader waiting, of this batch
    /// and of the next, is told `Lost`, and the next reader starts a driver again.
    fn abandon(&self) {
        {
            let mut s = self.lock();
            if s.next_wanted {
                s.next_wanted = false;
                s.called += 1;
            }
            s.driving = false;
            s.failed = Some((s.called, BatchError::Lost));
        }
        self.answered.notify_waiters();
    }
}

/// Answers `Lost` to the readers of a driver that ends early: dropped with its runtime, even
/// before it first ran (it is made before the task is spawned, and moves into it).
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
        let joined = batches.join();
        if joined.start_driver {
            let guard = DriverGuard(Some(batches.clone()));
            self.shared.runtime.spawn(self.clone().drive_read_batches(group, guard, joined.batch));
        }
        let timeout = Duration::from_millis(self.shared.config.api_timeout_ms);
        match tokio::time::timeout(timeout, batches.wait(joined.batch)).await {
            Ok(r) => r.map_err(BatchError::into_host),
            Err(_) => Err(HostError::Raft(RaftError::Timeout)),
        }
    }

    /// Makes one read call per batch, from `first`, while batches have readers.
    async fn drive_read_batches(self, group: GroupId, mut guard: DriverGuard, first: u64) {
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

    #[test]
    fn reads_that_arrive_while_a_call_is_out_share_the_next_call() {
        let b = ReadBatches::default();
        assert_eq!(b.join(), Joined { batch: 1, start_driver: true });
        // Three reads while batch 1's call is out: they wait for batch 2, and start nothing.
        for _ in 0..3 {
            assert_eq!(b.join(), Joined { batch: 2, start_driver: false });
        }
        // Batch 1 answered: its readers are confirmed, batch 2's are not; batch 2 is called.
        assert_eq!(b.answer(1, Ok(())), Some(2));
        assert_eq!((b.outcome(1), b.outcome(2)), (Some(Ok(())), None));
        // A read arriving now waits for batch 3: batch 2's call may predate it.
        assert_eq!(b.join(), Joined { batch: 3, start_driver: false });
        assert_eq!(b.answer(2, Ok(())), Some(3));
        // Nobody after batch 3: the driver ends, and the next read starts one again.
        let timeout = BatchError::Raft(RaftError::Timeout);
        assert_eq!(b.answer(3, Err(timeout.clone())), None);
        assert_eq!(b.outcome(3), Some(Err(timeout)));
        assert_eq!(b.join(), Joined { batch: 4, start_driver: true });
    }

    #[test]
    fn a_later_batchs_failure_does_not_fail_readers_an_earlier_batch_confirmed() {
        let b = ReadBatches::default();
        b.join();
        b.join();
        assert_eq!(b.answer(1, Ok(())), Some(2));
        // Batch 2 fails before batch 1's readers look: they were confirmed all the same.
        assert_eq!(b.answer(2, Err(BatchError::Overloaded(3))), None);
        assert_eq!(b.outcome(1), Some(Ok(())));
        assert_eq!(b.outcome(2), Some(Err(BatchError::Overloaded(3))));
        // And a later success confirms the readers of an earlier failed batch.
        b.join();
        assert_eq!(b.answer(3, Ok(())), None);
        assert_eq!(b.outcome(2), Some(Ok(())));
    }

    #[test]
    fn a_driver_that_ends_early_fails_its_readers_and_the_next_read_starts_afresh() {
        let b = Arc::new(ReadBatches::default());
        b.join();
        b.join();
        // Readers of batches 1 and 2 wait; the driver is dropped (here before it ever ran).
        drop(DriverGuard(Some(b.clone())));
        assert_eq!((b.outcome(1), b.outcome(2)), (Some(Err(BatchError::Lost)), Some(Err(BatchError::Lost))));
        // The next read does not take the number of a batch already answered `Lost`.
        assert_eq!(b.join(), Joined { batch: 3, start_driver: true });
        assert_eq!(b.outcome(3), None);
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_its_answer() {
        let b = Arc::new(ReadBatches::default());
        let joined = b.join();
        let reader = tokio::spawn({
            let b = b.clone();
            async move { b.wait(joined.batch).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.answer(joined.batch, Ok(())), None);
        let r = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("woken").expect("task");
        assert_eq!(r, Ok(()));
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
