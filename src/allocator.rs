//! The process's allocator and what it reports.
//!
//! With the `jemalloc` feature (the default) every allocation of the process goes to jemalloc:
//! Rust's through the global allocator set here, and RocksDB's C++ ones too, because the
//! unprefixed build provides `malloc` and `free` themselves. glibc's malloc keeps memory freed
//! by a thread in that thread's arena, and RocksDB's steady churn of blocks and memtables on
//! many threads leaves it resident while no longer in use; jemalloc hands it back (dirty pages
//! decay within seconds and a background thread purges them) and reports how much is really
//! allocated, so `/metrics` separates live heap from resident memory.
//!
//! Without the feature the platform's allocator is used and [`stats`] returns `None`.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long freed pages stay resident before the allocator's background threads give them
/// back: jemalloc's default is 10 s. A node rebuilds its reports, group summaries and map
/// copies every second or so, and over 10 s the freed copies of those add up to a third of a
/// many-shard node's resident memory (30–37 MiB at 10,000 shards, beside 58–60 MiB of live
/// heap); one second keeps the churn of one round, not ten.
pub const DIRTY_DECAY_MS: isize = 1_000;

/// Sets the allocator's decay ([`DIRTY_DECAY_MS`]) for arenas made from now on and for each
/// one already made. Call once, early (before the runtime's threads). Without jemalloc, or if
/// it refuses, nothing changes (the error says why).
pub fn tune() -> Result<(), String> {
    #[cfg(feature = "jemalloc")]
    {
        // SAFETY: a NUL-terminated jemalloc control whose value type is `ssize_t` (isize).
        unsafe { tikv_jemalloc_ctl::raw::write(b"arenas.dirty_decay_ms\0", DIRTY_DECAY_MS) }
            .map_err(|e| e.to_string())?;
        // Twice: an arena another thread was making while the default changed may have taken
        // the old default and become visible only after the first pass (seen once in the
        // tests, whose threads allocate meanwhile). The second pass narrows that window; it
        // does not close it, and such an arena only returns memory more slowly.
        for _ in 0..2 {
            for i in made_arenas()? {
                let name = format!("arena.{i}.dirty_decay_ms\0");
                // SAFETY: as above.
                unsafe { tikv_jemalloc_ctl::raw::write(name.as_bytes(), DIRTY_DECAY_MS) }.map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// The decay of every arena made so far (ms), in index order, or `None` without jemalloc.
pub fn dirty_decay_ms() -> Option<Vec<isize>> {
    #[cfg(feature = "jemalloc")]
    {
        let arenas = made_arenas().ok()?;
        // SAFETY: a NUL-terminated jemalloc control whose value type is `ssize_t` (isize).
        let decay =
            |i: u32| unsafe { tikv_jemalloc_ctl::raw::read::<isize>(format!("arena.{i}.dirty_decay_ms\0").as_bytes()) };
        arenas.into_iter().map(|i| decay(i).ok()).collect()
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        None
    }
}

/// The indexes of the arenas jemalloc has made. Each by its own index: jemalloc 5.3's decay
/// setting does not handle the "all arenas" index (4096) and would read past its arena table.
#[cfg(feature = "jemalloc")]
fn made_arenas() -> Result<Vec<u32>, String> {
    // SAFETY: NUL-terminated jemalloc controls and their value types: `arenas.narenas` is
    // `unsigned` (u32), `arena.<i>.initialized` is `bool`.
    let arenas: u32 = unsafe { tikv_jemalloc_ctl::raw::read(b"arenas.narenas\0") }.map_err(|e| e.to_string())?;
    let made = |i: u32| unsafe { tikv_jemalloc_ctl::raw::read::<bool>(format!("arena.{i}.initialized\0").as_bytes()) };
    Ok((0..arenas).filter(|i| made(*i).unwrap_or(false)).collect())
}

/// What the allocator holds, in bytes (jemalloc's `stats.*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes in live allocations.
    pub allocated: u64,
    /// Bytes in pages the allocator has with live data or metadata: the heap's share of RSS.
    pub resident: u64,
    /// Bytes of virtual memory kept mapped but returned to the OS (not resident).
    pub retained: u64,
}

/// The allocator's figures now, or `None` when they are not available (not jemalloc, or it
/// refused to answer).
pub fn stats() -> Option<AllocatorStats> {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        // The figures are a snapshot refreshed by advancing the epoch.
        epoch::advance().ok()?;
        Some(AllocatorStats {
            allocated: stats::allocated::read().ok()? as u64,
            resident: stats::resident::read().ok()? as u64,
            retained: stats::retained::read().ok()? as u64,
        })
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "jemalloc")]
    #[test]
    fn tune_sets_the_decay_of_every_arena_made() {
        // Other tests of this binary run on threads of their own: several arenas are made.
        tune().expect("jemalloc takes the setting");
        let decays = dirty_decay_ms().expect("jemalloc answers");
        assert!(!decays.is_empty());
        assert!(decays.iter().all(|d| *d == DIRTY_DECAY_MS), "{decays:?}");
    }

    #[cfg(feature = "jemalloc")]
    #[test]
    fn jemalloc_counts_a_large_allocation_while_it_lives() {
        // The figures are the whole process's, and the other tests of this binary allocate and
        // free tens of megabytes beside this one: a few tries, one of which must see the block
        // come and go.
        let mut seen = Vec::new();
        for _ in 0..5 {
            let before = stats().expect("jemalloc answers").allocated;
            let block = vec![7u8; 64 << 20];
            let during = stats().expect("jemalloc answers");
            drop(block);
            let after = stats().expect("jemalloc answers").allocated;
            assert!(during.resident >= during.allocated / 2, "{during:?}");
            if during.allocated >= before + (60 << 20) && after + (60 << 20) <= during.allocated {
                return;
            }
            seen.push((before, during.allocated, after));
        }
        panic!("a 64 MiB block was never seen allocated and freed: {seen:?}");
    }
}
