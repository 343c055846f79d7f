//! The clock of every engine on a host: milliseconds since the host started, counted on
//! Linux's `CLOCK_BOOTTIME`.
//!
//! Leases are measured on this clock (see `flotilla_raft::Config::lease_clock_drift_ms`): a
//! leader serves lease reads for a while after a quorum acknowledged it, on the assumption
//! that the other nodes' clocks ran at nearly the same rate meanwhile. `CLOCK_MONOTONIC`
//! (what `std::time::Instant` reads on Linux) stops while the machine is suspended: a leader
//! whose VM was suspended past its lease would wake up believing the lease still held, while
//! the others had elected a new leader and taken writes — and serve stale reads.
//! `CLOCK_BOOTTIME` keeps counting through a suspend, so the lease has run out on waking.
//! Where it is missing (not Linux) the monotonic clock is used, with that caveat.

use std::time::Instant;

/// A clock started at its creation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BootClock {
    start_ms: u64,
    fallback: Instant,
}

impl BootClock {
    pub(crate) fn new() -> BootClock {
        BootClock { start_ms: boot_ms().unwrap_or(0), fallback: Instant::now() }
    }

    /// Milliseconds since the clock was created, suspends included where the OS counts them.
    pub(crate) fn elapsed_ms(&self) -> u64 {
        match boot_ms() {
            Some(now) => now.saturating_sub(self.start_ms),
            None => self.fallback.elapsed().as_millis() as u64,
        }
    }
}

#[cfg(target_os = "linux")]
fn boot_ms() -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and
    // CLOCK_BOOTTIME is a clock id every supported Linux kernel (2.6.39+) knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some((ts.tv_sec as u64).saturating_mul(1000).saturating_add(ts.tv_nsec as u64 / 1_000_000))
}

#[cfg(not(target_os = "linux"))]
fn boot_ms() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_clock_advances_with_real_time() {
        let c = BootClock::new();
        let a = c.elapsed_ms();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = c.elapsed_ms();
        assert!(b >= a + 25 && b < a + 2_000, "{a} -> {b}");
    }
}
