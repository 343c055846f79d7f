//! The process's limit on open files. A node holds a socket per Redis connection beside
//! RocksDB's files and its QUIC socket; Linux's usual soft limit (1,024) is far below the
//! 10,000 connections the front door accepts by default. Like Redis at start-up, the server
//! raises its soft limit toward what it needs, up to the hard limit an unprivileged process
//! may reach, and says so when that is not enough.

/// Descriptors kept for everything but client connections: RocksDB's files (it opens SSTs as
/// it needs them), the QUIC socket, the metrics listener, logs.
pub const RESERVED: u64 = 1_024;

/// What [`raise_to`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
    /// The hard limit (the most an unprivileged process may set).
    pub hard: u64,
}

impl OpenFiles {
    /// Whether the limit now allows `wanted` descriptors.
    pub fn allows(&self, wanted: u64) -> bool {
        self.now >= wanted
    }
}

/// Raises the soft limit on open files to `wanted`, or to the hard limit if that is lower; never
/// lowers it.
#[cfg(unix)]
pub fn raise_to(wanted: u64) -> std::io::Result<OpenFiles> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the call's duration.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (before, hard) = (lim.rlim_cur, lim.rlim_max);
    let target = wanted.min(hard);
    if target <= before {
        return Ok(OpenFiles { before, now: before, hard });
    }
    lim.rlim_cur = target;
    // SAFETY: as above; the kernel only reads `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OpenFiles { before, now: target, hard })
}

/// Elsewhere the limit is left as it is.
#[cfg(not(unix))]
pub fn raise_to(_wanted: u64) -> std::io::Result<OpenFiles> {
    Ok(OpenFiles { before: u64::MAX, now: u64::MAX, hard: u64::MAX })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_toward_what_is_wanted_but_never_lowered_nor_past_the_hard_limit() {
        let first = raise_to(0).expect("getrlimit");
        assert_eq!(first.now, first.before, "asking for less changes nothing");
        let wanted = first.hard.min(first.before.saturating_add(16));
        let raised = raise_to(wanted).expect("setrlimit");
        assert_eq!(raised.now, wanted.max(first.before));
        assert!(raised.allows(wanted));
        let capped = raise_to(u64::MAX).expect("setrlimit");
        assert_eq!(capped.now, capped.hard, "never past the hard limit");
        assert!(!capped.allows(u64::MAX) || capped.hard == u64::MAX);
    }
}
