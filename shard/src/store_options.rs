//! How the store is tuned: one memory budget from which RocksDB's caches and memtables are
//! sized, so a node's memory does not grow with the data it holds.
//!
//! A budget `B` is split as follows (see [`MemoryPlan`]):
//! - **Block cache**, `3/4 B`: one LRU cache shared by every column family. It holds data
//!   blocks, the index and filter blocks of every table (`cache_index_and_filter_blocks`, so
//!   table readers do not keep them outside any bound; level-0 ones pinned, as they are read on
//!   every lookup), and the memtables' reservation (below).
//! - **Memtables**, `1/4 B`, inside the cache's capacity: a write buffer manager charges the
//!   memtables of every column family to the block cache (data blocks give way to them) and
//!   triggers flushes as their total nears `1/4 B`. Each column family holds at most
//!   [`WRITE_BUFFERS_PER_CF`] memtables of `1/4 B / (cfs × WRITE_BUFFERS_PER_CF)` bytes
//!   (RocksDB stalls writes rather than allocate one more), so the total is bounded, give or
//!   take the one write batch that overfills a memtable (at most the writer's
//!   [`GROUP_COMMIT_BYTES_MAX`](crate::store::GROUP_COMMIT_BYTES_MAX)).
//! - **Headroom**, `1/4 B`: what the cache cannot bound. Blocks pinned by open iterators and
//!   level-0 pins may exceed the cache's capacity (the cache is not strict: a read never fails
//!   for want of room), memtables being flushed are counted until their flush ends, and
//!   compactions and SST writers have their own buffers.
//!
//! Not in the budget: per-file table-reader state outside the cache (small; reported as
//! `estimate-table-readers-mem`), and everything outside RocksDB (Raft entry caches, queues).

use rocksdb::statistics::StatsLevel;
use rocksdb::{BlockBasedOptions, Cache, Options, WriteBufferManager};

/// Default memory budget of a store (512 MiB): a block cache of 384 MiB (of which up to
/// 128 MiB of memtables), enough to keep the index blocks and hot data of a few GiB of shards
/// in memory, yet small enough for several nodes on one developer machine.
pub const MEMORY_BUDGET_BYTES_DEFAULT: u64 = 512 << 20;
/// Smallest budget accepted (64 MiB): below it memtables shrink under ~3 MiB and flush so
/// often that compaction, not the workload, decides the write rate.
pub const MEMORY_BUDGET_BYTES_MIN: u64 = 64 << 20;
/// Write-ahead log kept on disk at most (RocksDB's `max_total_wal_size`): beyond it, the
/// column family holding the oldest log is flushed so that the log can go.
pub const WAL_BYTES_MAX: u64 = 256 << 20;
/// Largest budget accepted (1 TiB): a bound on a typo (a budget in bits, or a missing unit
/// read as bytes the other way round) rather than a RocksDB limit.
pub const MEMORY_BUDGET_BYTES_MAX: u64 = 1 << 40;
/// Memtables one column family may hold: one taking writes, one being flushed (RocksDB's
/// default). With more, a burst would be absorbed in memory; with fewer, writes stall on
/// every flush.
pub const WRITE_BUFFERS_PER_CF: u64 = 2;
/// Column families of the store (`raft`, `data`, `meta`; checked against the store's list at
/// compile time).
pub const STORE_COLUMN_FAMILIES: u64 = 3;

/// What the store is opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Bytes of memory RocksDB may use for its block cache and memtables, with headroom
    /// ([`MemoryPlan`]); default [`MEMORY_BUDGET_BYTES_DEFAULT`].
    pub memory_budget_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions { memory_budget_bytes: MEMORY_BUDGET_BYTES_DEFAULT }
    }
}

impl StoreOptions {
    /// Options with a budget of `memory_budget_bytes` (check them with [`StoreOptions::check`]).
    pub fn with_memory_budget(memory_budget_bytes: u64) -> StoreOptions {
        StoreOptions { memory_budget_bytes }
    }

    /// Whether the options can work; the error says which bound is crossed.
    pub fn check(&self) -> Result<(), String> {
        let b = self.memory_budget_bytes;
        if b < MEMORY_BUDGET_BYTES_MIN {
            return Err(format!(
                "memory budget of {b} bytes is below the minimum of {MEMORY_BUDGET_BYTES_MIN} (64 MiB)"
            ));
        }
        if b > MEMORY_BUDGET_BYTES_MAX {
            return Err(format!(
                "memory budget of {b} bytes is above the maximum of {MEMORY_BUDGET_BYTES_MAX} (1 TiB)"
            ));
        }
        if usize::try_from(b).is_err() {
            return Err(format!("memory budget of {b} bytes does not fit this machine's address space"));
        }
        Ok(())
    }

    /// How the budget is split.
    pub fn memory_plan(&self) -> MemoryPlan {
        MemoryPlan::of(self.memory_budget_bytes)
    }
}

/// The sizes derived from a memory budget (the module documentation says why each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The budget split.
    pub budget_bytes: u64,
    /// Capacity of the block cache shared by every column family (memtables included).
    pub block_cache_bytes: u64,
    /// Limit of all memtables together (the write buffer manager's, charged to the cache).
    pub write_buffers_bytes: u64,
    /// Size of one memtable of one column family.
    pub write_buffer_bytes: u64,
}

impl MemoryPlan {
    /// The split of `budget_bytes`.
    pub fn of(budget_bytes: u64) -> MemoryPlan {
        let write_buffers_bytes = budget_bytes / 4;
        let plan = MemoryPlan {
            budget_bytes,
            block_cache_bytes: budget_bytes / 4 * 3,
            write_buffers_bytes,
            write_buffer_bytes: write_buffers_bytes / (STORE_COLUMN_FAMILIES * WRITE_BUFFERS_PER_CF),
        };
        // The memtables fit in the cache's capacity, and the cache in the budget.
        debug_assert!(
            plan.write_buffer_bytes * STORE_COLUMN_FAMILIES * WRITE_BUFFERS_PER_CF <= plan.write_buffers_bytes
        );
        debug_assert!(plan.write_buffers_bytes <= plan.block_cache_bytes && plan.block_cache_bytes <= budget_bytes);
        plan
    }
}

/// RocksDB options built from a plan. The cache is kept by the store (for its metrics); the
/// options hold their own references to it and to the write buffer manager.
pub(crate) struct Tuned {
    /// Options of the database (statistics on, write buffer manager).
    pub db: Options,
    /// Options of every column family (`base` plus the shared cache and memtable sizes).
    pub cf: Options,
    /// The block cache every column family shares.
    pub cache: Cache,
}

/// Builds the options for `plan` on top of `base_cf` (the column families' format options).
pub(crate) fn tuned(plan: &MemoryPlan, base_cf: Options) -> Tuned {
    // Sizes were checked to fit usize by `StoreOptions::check`.
    let size = |b: u64| usize::try_from(b).unwrap_or(usize::MAX);
    let cache = Cache::new_lru_cache(size(plan.block_cache_bytes));
    // Not stalling every writer at the limit: the per-family memtable count already stops
    // writes before memory runs away, and a stall here would also stop the `meta` family.
    let wbm =
        WriteBufferManager::new_write_buffer_manager_with_cache(size(plan.write_buffers_bytes), false, cache.clone());

    let mut db = Options::default();
    db.create_if_missing(true);
    db.create_missing_column_families(true);
    db.set_write_buffer_manager(&wbm);
    // A family that takes few writes (`meta`) would otherwise pin the oldest write-ahead log
    // until RocksDB's default limit (4 × the memtables: 1.5 GiB at the default budget) forces
    // its flush; past this size the family holding the oldest log is flushed instead.
    db.set_max_total_wal_size(WAL_BYTES_MAX);
    // Tickers only (bytes written by flushes, compactions, the WAL): histograms and timers
    // cost a clock read per operation, tickers a per-core counter.
    db.enable_statistics();
    db.set_statistics_level(StatsLevel::ExceptHistogramOrTimers);

    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut cf = base_cf;
    cf.set_block_based_table_factory(&table);
    cf.set_write_buffer_size(size(plan.write_buffer_bytes));
    cf.set_max_write_buffer_number(WRITE_BUFFERS_PER_CF as i32);
    Tuned { db, cf, cache }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_splits_as_documented() {
        let p = StoreOptions::default().memory_plan();
        assert_eq!(p.budget_bytes, 512 << 20);
        assert_eq!(p.block_cache_bytes, 384 << 20);
        assert_eq!(p.write_buffers_bytes, 128 << 20);
        assert_eq!(p.write_buffer_bytes, (128 << 20) / 6);
        assert!(StoreOptions::default().check().is_ok());
    }

    #[test]
    fn budgets_out_of_bounds_are_refused_with_the_bound() {
        let low = StoreOptions::with_memory_budget(MEMORY_BUDGET_BYTES_MIN - 1).check().unwrap_err();
        assert!(low.contains("below the minimum"), "{low}");
        let high = StoreOptions::with_memory_budget(MEMORY_BUDGET_BYTES_MAX + 1).check().unwrap_err();
        assert!(high.contains("above the maximum"), "{high}");
        assert!(StoreOptions::with_memory_budget(MEMORY_BUDGET_BYTES_MIN).check().is_ok());
        assert!(StoreOptions::with_memory_budget(MEMORY_BUDGET_BYTES_MAX).check().is_ok());
    }
}
