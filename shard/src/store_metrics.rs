//! What the store and its process use: memory (RocksDB's caches and memtables, the process's
//! resident set) and writes (RocksDB's bytes by kind, the process's bytes sent to disk).
//! Gathered here, in one place, by [`Store::metrics`](crate::Store::metrics); the node renders
//! them as Prometheus text.
//!
//! The process figures come from `/proc` (Linux); where it cannot be read (another system, a
//! sandbox that hides `/proc/self/io`) they are `None`, never an error: metrics must not fail
//! a node.

/// RocksDB's memory, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreMemory {
    /// The budget the store was opened with.
    pub budget_bytes: u64,
    /// Capacity of the shared block cache.
    pub block_cache_capacity_bytes: u64,
    /// Bytes in the block cache: data, index and filter blocks, and the memtables'
    /// reservation (the write buffer manager charges them to the cache).
    pub block_cache_usage_bytes: u64,
    /// Bytes of the cache pinned (by iterators, and the level-0 index and filter blocks).
    pub block_cache_pinned_bytes: u64,
    /// Memtables of every column family (active, immutable and being flushed).
    pub memtable_bytes: u64,
    /// Table readers' memory outside the block cache, summed over the column families.
    pub table_readers_bytes: u64,
}

/// Bytes RocksDB wrote since the store opened, by kind (RocksDB statistics' tickers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreIo {
    /// Bytes of the writes asked of RocksDB (keys and values, before compression).
    pub user_written_bytes: u64,
    /// Bytes appended to the write-ahead log.
    pub wal_written_bytes: u64,
    /// Bytes of SST files written by memtable flushes.
    pub flush_written_bytes: u64,
    /// Bytes of SST files written by compactions.
    pub compaction_written_bytes: u64,
}

/// The process's own figures (every store of the process shares them); `None` where `/proc`
/// could not be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessUsage {
    /// Resident set size (`VmRSS` of `/proc/self/status`).
    pub resident_bytes: Option<u64>,
    /// Bytes the process caused to be sent to the storage layer (`write_bytes` of
    /// `/proc/self/io`).
    pub disk_written_bytes: Option<u64>,
    /// CPU time the process has used, user and system together, in microseconds
    /// (`getrusage`): divided by the requests served, what a request costs, which on a machine
    /// the load generator shares says more than requests per second.
    pub cpu_microseconds: Option<u64>,
}

impl ProcessUsage {
    /// Reads `/proc/self` now (small in-memory files, but a read: call it off async threads).
    pub fn read() -> ProcessUsage {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        ProcessUsage {
            resident_bytes: read("/proc/self/status").as_deref().and_then(resident_bytes_of_status),
            disk_written_bytes: read("/proc/self/io").as_deref().and_then(write_bytes_of_io),
            cpu_microseconds: cpu_microseconds(),
        }
    }
}

/// A number drawn once, when the process first asks (48 random bits, never 0): two nodes'
/// metrics pages showing the same one are in the same process, wherever they run. A pid would
/// not do: servers in containers are all pid 1, and identical hosts repeat pids.
pub fn process_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static INSTANCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *INSTANCE.get_or_init(|| {
        // `RandomState` is seeded from the operating system's randomness in every process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        (h.finish() >> 16).max(1)
    })
}

/// User and system CPU time of the whole process so far, in microseconds.
#[cfg(not(unix))]
pub fn cpu_microseconds() -> Option<u64> {
    None
}

/// User and system CPU time of the whole process so far, in microseconds.
#[cfg(unix)]
pub fn cpu_microseconds() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` fills the struct it is given and reads nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: a zeroed `rusage` is a valid value, and `getrusage` succeeded.
    let usage = unsafe { usage.assume_init() };
    let us = |t: libc::timeval| {
        u64::try_from(t.tv_sec).ok()?.checked_mul(1_000_000)?.checked_add(u64::try_from(t.tv_usec).ok()?)
    };
    us(usage.ru_utime)?.checked_add(us(usage.ru_stime)?)
}

/// Everything [`Store::metrics`](crate::Store::metrics) gathers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreMetrics {
    /// RocksDB's memory.
    pub memory: StoreMemory,
    /// RocksDB's writes.
    pub io: StoreIo,
    /// The process's resident memory and disk writes.
    pub process: ProcessUsage,
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes (the file gives kB).
pub fn resident_bytes_of_status(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// `write_bytes` of a `/proc/<pid>/io` text.
pub fn write_bytes_of_io(io: &str) -> Option<u64> {
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_texts_parse_and_bad_ones_are_none() {
        let status = "Name:\tflotilla\nVmPeak:\t  200 kB\nVmRSS:\t   12345 kB\nThreads:\t9\n";
        assert_eq!(resident_bytes_of_status(status), Some(12345 * 1024));
        assert_eq!(resident_bytes_of_status("VmRSS: 12 MB\n"), None);
        assert_eq!(resident_bytes_of_status("Name: x\n"), None);
        let io = "rchar: 10\nwchar: 20\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(write_bytes_of_io(io), Some(8192));
        assert_eq!(write_bytes_of_io("write_bytes: lots\n"), None);
        assert_eq!(write_bytes_of_io(""), None);
    }

    #[test]
    fn this_process_cpu_time_grows_with_work() {
        let before = cpu_microseconds().expect("getrusage works here");
        // About 20 ms of work: more than the clock tick that may round CPU time down.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = cpu_microseconds().expect("getrusage works here");
        // Microseconds: 20 ms of work is at least 5,000 of them however coarse the kernel's
        // accounting (milliseconds or clock ticks would give 20 or 2).
        assert!(after >= before + 5_000, "CPU time did not grow by the work's: {before} -> {after}");
    }

    #[test]
    fn the_process_instance_is_fixed_and_fits_a_metric_sample() {
        let i = process_instance();
        assert_eq!(i, process_instance());
        assert!(i != 0 && i < 1 << 53, "{i} must survive the f64 of a parsed sample");
    }

    #[test]
    fn this_process_reads_its_resident_set() {
        // Linux is where the tests run; elsewhere there is nothing to read.
        if std::path::Path::new("/proc/self/status").exists() {
            let rss = ProcessUsage::read().resident_bytes.unwrap_or(0);
            assert!(rss > 1 << 20, "resident set of {rss} bytes");
        }
    }
}
