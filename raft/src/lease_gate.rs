//! A leader's lease, published for readers on other threads: a linearizable read may then be
//! served from the state machine on the caller's own thread, with no hand-off to the thread
//! that runs the group (TiKV's local reader does the same). [`GroupCore`](crate::GroupCore)
//! writes it before any action of a step leaves, so a transfer's `TimeoutNow`, a step down
//! or a configuration change closes the gate before any other node can act on it.

use crate::types::Millis;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Until when reads may be served from the applied state without asking the engine: the
/// leader's lease end while the state machine applied everything committed
/// ([`Engine::local_read_end`](crate::Engine::local_read_end)), in the clock the engine is
/// fed. Shared as `Arc<LeaseGate>` (see [`GroupCore::lease_gate`](crate::GroupCore::lease_gate)).
#[derive(Debug, Default)]
pub struct LeaseGate {
    /// Milliseconds of the engine's clock; 0: closed.
    until: AtomicU64,
    /// A read went through the gate since [`LeaseGate::take_used`] last asked: the group is in
    /// use even though its engine saw nothing (a host must not let it go quiet, which would
    /// let the lease run out).
    used: AtomicBool,
}

impl LeaseGate {
    /// Whether a read arriving at `now` (the engine's clock, read after the read arrived) may
    /// be served from the state machine as it stands: it holds every write acknowledged so far
    /// and every state a read already saw.
    pub fn open_at(&self, now: Millis) -> bool {
        let open = now.0 < self.until.load(Ordering::Acquire);
        // Loaded first: readers of a busy group do not write the shared line on every read.
        if open && !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        open
    }

    /// Whether a read went through the gate since the last call.
    pub fn take_used(&self) -> bool {
        self.used.load(Ordering::Relaxed) && self.used.swap(false, Ordering::Relaxed)
    }

    /// Sets the end (`None` closes the gate). Release: a reader that sees the gate open sees
    /// the applied state it was opened on.
    pub(crate) fn set(&self, end: Option<Millis>) {
        let v = end.map_or(0, |m| m.0);
        if self.until.load(Ordering::Relaxed) != v {
            self.until.store(v, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_strictly_before_its_end_and_closed_by_none() {
        let g = LeaseGate::default();
        assert!(!g.open_at(Millis(0)), "a new gate is closed");
        g.set(Some(Millis(100)));
        assert!(g.open_at(Millis(99)));
        assert!(!g.open_at(Millis(100)), "the lease's end is excluded, as in the engine");
        g.set(None);
        assert!(!g.open_at(Millis(0)));
    }

    #[test]
    fn a_read_through_the_open_gate_is_noted_once() {
        let g = LeaseGate::default();
        assert!(!g.open_at(Millis(0)));
        assert!(!g.take_used(), "a refused read is not a use");
        g.set(Some(Millis(10)));
        assert!(g.open_at(Millis(1)) && g.open_at(Millis(2)));
        assert!(g.take_used());
        assert!(!g.take_used(), "taken");
    }
}
