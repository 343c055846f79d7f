//! The queue of API calls into one group's core task: many callers, one core.
//!
//! Under load every caller's request used to cost a slot claim, a permit and a wake-up on a
//! general-purpose channel, and the core paid a permit release (under a lock) for each one it
//! took. Here a request is one push under an uncontended lock, and the core takes everything
//! queued in one swap of the queue with its own buffer: one lock per drain, not per request.
//!
//! Bounded: a caller waits while `cap` requests are queued. The core's buffer holds at most
//! what one swap took, so no more than `2 * cap` requests are ever held.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::sync::Notify;

struct State<T> {
    items: VecDeque<T>,
    /// Set by the core (it takes nothing more) or once the sender is gone.
    closed: bool,
    /// The sender was dropped: the core sees the end of the queue once it is empty.
    sender_gone: bool,
    /// The core, waiting for a request.
    waiting: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Callers waiting for room.
    room: Notify,
    cap: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every update of `State` is complete before the lock is released (no user code runs
        // under it), so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The callers' side. One per group (the handle's clones share it).
pub(super) struct ApiSender<T> {
    shared: Arc<Shared<T>>,
}

/// The core's side.
pub(super) struct ApiReceiver<T> {
    shared: Arc<Shared<T>>,
    /// Requests taken from the queue and not yet handed out, in order.
    buf: VecDeque<T>,
}

/// A queue holding up to `cap` requests (at least one).
pub(super) fn api_queue<T>(cap: usize) -> (ApiSender<T>, ApiReceiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), closed: false, sender_gone: false, waiting: None }),
        room: Notify::new(),
        cap: cap.max(1),
    });
    (ApiSender { shared: shared.clone() }, ApiReceiver { shared, buf: VecDeque::new() })
}

/// Why `try_send` handed an item back.
pub(super) enum Refused<T> {
    /// `cap` requests are queued.
    Full(T),
    /// The core takes no more.
    Closed(T),
}

impl<T> ApiSender<T> {
    /// Queues `item`, waiting while the queue is full; gives it back if the core takes no more.
    pub(super) async fn send(&self, item: T) -> Result<(), T> {
        let mut item = match self.try_send(item) {
            Ok(()) => return Ok(()),
            Err(Refused::Closed(item)) => return Err(item),
            Err(Refused::Full(item)) => item,
        };
        loop {
            // Registered before the check: room made after it still wakes this caller. Only
            // here, when the queue was full: registering takes the notifier's lock.
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            item = match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(Refused::Closed(item)) => return Err(item),
                Err(Refused::Full(item)) => item,
            };
            room.await;
        }
    }

    /// Queues `item` if there is room, without waiting.
    pub(super) fn try_send(&self, item: T) -> Result<(), Refused<T>> {
        let mut s = self.shared.lock();
        if s.closed {
            return Err(Refused::Closed(item));
        }
        if s.items.len() >= self.shared.cap {
            return Err(Refused::Full(item));
        }
        s.items.push_back(item);
        let waiting = s.waiting.take();
        drop(s);
        if let Some(w) = waiting {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Drop for ApiSender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.shared.lock();
            s.sender_gone = true;
            s.waiting.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> ApiReceiver<T> {
    /// Moves everything queued into `buf` (empty when called); true if anything came.
    fn refill(&mut self) -> bool {
        let was_full = {
            let mut s = self.shared.lock();
            let was_full = s.items.len() >= self.shared.cap;
            std::mem::swap(&mut s.items, &mut self.buf);
            was_full
        };
        if was_full {
            self.shared.room.notify_waiters();
        }
        !self.buf.is_empty()
    }

    /// The next request; `None` once the queue is closed or the sender gone and nothing is
    /// left.
    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.buf.pop_front() {
            return Poll::Ready(Some(item));
        }
        let mut s = self.shared.lock();
        if s.items.is_empty() {
            if s.closed || s.sender_gone {
                return Poll::Ready(None);
            }
            match &mut s.waiting {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        drop(s);
        self.refill();
        Poll::Ready(self.buf.pop_front())
    }

    /// The next request if one is queued.
    pub(super) fn try_recv(&mut self) -> Option<T> {
        if self.buf.is_empty() {
            self.refill();
        }
        self.buf.pop_front()
    }

    /// Takes no more requests: callers waiting for room and later ones get theirs back. Those
    /// queued are still handed out by `try_recv`.
    pub(super) fn close(&mut self) {
        self.shared.lock().closed = true;
        self.shared.room.notify_waiters();
    }
}

impl<T> Drop for ApiReceiver<T> {
    /// The core is gone, however it ended (a panic in the storage it polls included): later
    /// callers get their request back at once, and the requests still queued are dropped, which
    /// answers their callers (a dropped reply channel), instead of waiting for their timeouts.
    fn drop(&mut self) {
        let queued = {
            let mut s = self.shared.lock();
            s.closed = true;
            std::mem::take(&mut s.items)
        };
        // Dropped outside the lock: a request's drop may run its caller's code.
        drop(queued);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_core_side_refuses_later_requests_and_releases_those_queued() {
        let (tx, rx) = api_queue::<tokio::sync::oneshot::Sender<()>>(4);
        let (queued, answered) = tokio::sync::oneshot::channel();
        tx.send(queued).await.expect("room");
        drop(rx);
        assert!(answered.await.is_err(), "the queued request's reply channel is dropped");
        let (later, _) = tokio::sync::oneshot::channel();
        assert!(tx.send(later).await.is_err(), "nothing is taken any more");
    }

    #[tokio::test]
    async fn requests_come_out_in_order_and_a_full_queue_makes_callers_wait() {
        let (tx, mut rx) = api_queue::<u32>(2);
        tx.send(1).await.expect("room");
        tx.send(2).await.expect("room");
        let tx = Arc::new(tx);
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(3).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the queue is full: the third caller waits");
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(1));
        assert_eq!(waiting.await.expect("task"), Ok(()), "room was made: the caller got in");
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn a_closed_queue_hands_out_what_it_holds_and_refuses_the_rest() {
        let (tx, mut rx) = api_queue::<u32>(1);
        tx.send(1).await.expect("room");
        let tx = Arc::new(tx);
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(2).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        rx.close();
        assert_eq!(waiting.await.expect("task"), Err(2), "a caller waiting for room gets its request back");
        assert_eq!(tx.send(3).await, Err(3));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, None);
    }

    #[tokio::test]
    async fn the_core_waiting_is_woken_by_a_request_and_by_the_sender_going_away() {
        let (tx, mut rx) = api_queue::<u32>(4);
        let core = tokio::spawn(async move {
            let first = poll_fn(|cx| rx.poll_recv(cx)).await;
            let end = poll_fn(|cx| rx.poll_recv(cx)).await;
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(7).await.expect("room");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        assert_eq!(core.await.expect("task"), (Some(7), None));
    }
}
