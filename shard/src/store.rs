//! One RocksDB instance per node, shared by every group on it, and the group-commit writer.
//!
//! All durable writes go through one writer thread: it takes every write request queued at
//! that moment (from any number of groups), puts them in one `WriteBatch`, writes it with one
//! fsync, and acknowledges each request. Under load, one fsync serves many groups.
//!
//! A failed write poisons the store: every later write fails with the original error. Raft
//! never continues on a log it cannot trust, and a disk that failed once (full, I/O error) is
//! not retried behind the caller's back.

use crate::keys::meta_key;
use crate::store_metrics::{ProcessUsage, StoreIo, StoreMemory, StoreMetrics};
use crate::store_options::{tuned, MemoryPlan, StoreOptions, STORE_COLUMN_FAMILIES};
use flotilla_raft::{GroupId, StorageError};
use rocksdb::statistics::Ticker;
use rocksdb::{
    properties, Cache, ColumnFamily, ColumnFamilyDescriptor, Options, ReadOptions, ReadTier, WriteBatch, WriteOptions,
    DB,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// Column family of Raft state (logs, votes, applied state, snapshots).
pub const CF_RAFT: &str = "raft";
/// Column family of the state machines' data, keyed by user key.
pub const CF_DATA: &str = "data";
/// Column family of group descriptors.
pub const CF_META: &str = "meta";
/// Every column family, in the order they are opened.
const COLUMN_FAMILIES: [&str; 3] = [CF_RAFT, CF_DATA, CF_META];
// The memory plan divides the memtables' share among this many families.
const _: () = assert!(COLUMN_FAMILIES.len() as u64 == STORE_COLUMN_FAMILIES);

/// The store's scratch directory, inside the database directory.
const SCRATCH_DIR: &str = "flotilla-scratch";

fn cf_options() -> Options {
    let mut o = Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o
}

/// Write requests the writer merges into one batch at most (a bound on batch latency).
pub const GROUP_COMMIT_REQUESTS_MAX: usize = 4096;
/// Bytes the writer merges into one batch at most.
pub const GROUP_COMMIT_BYTES_MAX: usize = 16 << 20;
/// A batch write (fsync included) this long or longer counts as slow: logged and counted
/// ([`WriterStats::slow_writes`]). A write with its fsync takes 0.1–1 ms on an SSD.
pub const SLOW_WRITE: std::time::Duration = std::time::Duration::from_millis(50);

/// Write requests queued for the writer. Beyond it, async writers wait for room and the
/// host's threads block in `submit`: a disk slower than the writes pushes back on them
/// instead of letting the queue grow without bound.
pub const WRITER_QUEUE_MAX: usize = GROUP_COMMIT_REQUESTS_MAX;

/// One operation of a write request.
#[derive(Debug, Clone)]
pub enum Op {
    /// Put a key.
    Put(&'static str, Vec<u8>, Vec<u8>),
    /// Delete a key.
    Delete(&'static str, Vec<u8>),
    /// Delete `[from, to)`.
    DeleteRange(&'static str, Vec<u8>, Vec<u8>),
}

impl Op {
    /// The deletes of everything group `group` keeps besides its data: its Raft state (the
    /// `raft` column family's group prefix) and its descriptor.
    pub(crate) fn group_deletes(group: GroupId) -> [Op; 2] {
        [
            Op::Delete(CF_META, meta_key(group).to_vec()),
            Op::DeleteRange(CF_RAFT, crate::keys::group_key(group, 0).to_vec(), crate::keys::group_end(group)),
        ]
    }

    /// The delete of every key-value of `range`.
    pub(crate) fn data_range_delete(range: &crate::kv::KeyRange) -> Op {
        let end = range.end.clone().unwrap_or_else(|| crate::kv::UNBOUNDED_END.to_vec());
        Op::DeleteRange(CF_DATA, range.start.clone(), end)
    }

    fn bytes(&self) -> usize {
        match self {
            Op::Put(_, k, v) => k.len() + v.len(),
            Op::Delete(_, k) => k.len(),
            Op::DeleteRange(_, a, b) => a.len() + b.len(),
        }
    }
}

struct WriteReq {
    ops: Vec<Op>,
    /// Whether the caller needs the write durable (fsync) before the answer.
    sync: bool,
    done: Done,
}

/// A callback the writer thread runs with the outcome of a write; it must be quick (it runs
/// on the writer, before the next batch): typically a channel send.
pub type WriteCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// How the writer reports a request's outcome.
enum Done {
    /// An async caller waits on it.
    Oneshot(oneshot::Sender<Result<(), StorageError>>),
    /// A host thread gets it back on its own queue.
    Callback(WriteCallback),
}

impl Done {
    fn send(self, r: Result<(), StorageError>) {
        match self {
            Done::Oneshot(tx) => {
                let _ = tx.send(r);
            }
            Done::Callback(f) => f(r),
        }
    }
}

/// Counters of the writer, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Write requests completed.
    pub requests: AtomicU64,
    /// Batches written (each one `write` call).
    pub batches: AtomicU64,
    /// Batches written with fsync.
    pub syncs: AtomicU64,
    /// Microseconds the writer spent writing batches (fsyncs included): against wall time,
    /// how busy the disk path is.
    pub write_micros: AtomicU64,
    /// Batches whose write took [`SLOW_WRITE`] or longer (logged, at most one line a second):
    /// a disk that paused, holding up the commits of every group on the node.
    pub slow_writes: AtomicU64,
    /// The number (counting from 1, as `batches`) of the last batch written with fsync. The
    /// store has one write-ahead log, and an fsync of it makes every earlier write durable
    /// too: every batch up to this one is durable.
    pub durable_batches: AtomicU64,
}

struct Inner {
    db: DB,
    /// The options the database was opened with: they hold its statistics (the tickers of
    /// [`Store::metrics`]).
    db_options: Options,
    /// The block cache every column family shares (its usage, for [`Store::metrics`]).
    cache: Cache,
    /// How the memory budget was split.
    plan: MemoryPlan,
    /// Set once a write failed; later writes fail with this error.
    poison: Mutex<Option<StorageError>>,
    poisoned: AtomicBool,
    stats: WriterStats,
    /// Test hook: fail the next write as the disk would.
    fail_next: AtomicBool,
    /// Test hook: the next batch's write takes this many more milliseconds (a slow disk).
    delay_next_ms: AtomicU64,
    /// Test hook: snapshot installations wait before touching anything while set.
    hold_installs: AtomicBool,
    /// Test hook: the writer takes nothing off its queue while set (a stalled disk).
    hold_writes: AtomicBool,
    /// Installations waiting on `hold_installs`.
    installs_held: std::sync::atomic::AtomicUsize,
    /// Signalled each time the writer takes requests off its full-or-not queue: async writers
    /// waiting for room try again.
    room: tokio::sync::Notify,
    /// Set when the writer thread ends (its queue closed, or it panicked): nobody waits for
    /// room any more.
    writer_gone: AtomicBool,
}

/// The node's store. Cheap to clone; the database closes when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    handle: Arc<WriterHandle>,
    /// Directory for temporary snapshot files.
    scratch: Arc<std::path::PathBuf>,
}

/// The writer thread's queue and handle. Dropping it (with the last `Store`) closes the queue,
/// lets the writer finish what is queued, and joins it, so the database is closed (and its
/// lock released) when the drop returns.
struct WriterHandle {
    tx: Option<mpsc::SyncSender<WriteReq>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Store {
    /// Opens (or creates) the store at `path` with the default options (a memory budget of
    /// [`MEMORY_BUDGET_BYTES_DEFAULT`](crate::store_options::MEMORY_BUDGET_BYTES_DEFAULT)).
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StorageError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the store at `path`, its caches and memtables sized by `options`
    /// (an error if they cannot work).
    pub fn open_with(path: impl AsRef<Path>, options: StoreOptions) -> Result<Store, StorageError> {
        options.check().map_err(|e| StorageError::new("open", e))?;
        let plan = options.memory_plan();
        let t = tuned(&plan, cf_options());
        let cfs = COLUMN_FAMILIES.iter().map(|name| ColumnFamilyDescriptor::new(*name, t.cf.clone()));
        let db = DB::open_cf_descriptors(&t.db, path.as_ref(), cfs)
            .map_err(|e| StorageError::new("open", format!("{}: {e}", path.as_ref().display())))?;
        // Scratch space for snapshot SST files: whatever a crash left there is garbage.
        let scratch = path.as_ref().join(SCRATCH_DIR);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .map_err(|e| StorageError::new("open", format!("{}: {e}", scratch.display())))?;
        info!(
            path = %path.as_ref().display(),
            memory_budget_bytes = plan.budget_bytes,
            block_cache_bytes = plan.block_cache_bytes,
            write_buffers_bytes = plan.write_buffers_bytes,
            "store opened"
        );
        let inner = Arc::new(Inner {
            db,
            db_options: t.db,
            cache: t.cache,
            plan,
            poison: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            stats: WriterStats::default(),
            fail_next: AtomicBool::new(false),
            delay_next_ms: AtomicU64::new(0),
            hold_installs: AtomicBool::new(false),
            hold_writes: AtomicBool::new(false),
            installs_held: std::sync::atomic::AtomicUsize::new(0),
            room: tokio::sync::Notify::new(),
            writer_gone: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::sync_channel(WRITER_QUEUE_MAX);
        let w = inner.clone();
        let thread = std::thread::Builder::new()
            .name("flotilla-writer".into())
            .spawn(move || writer_loop(w, rx))
            .map_err(|e| StorageError::new("open", format!("cannot start the writer thread: {e}")))?;
        let store = Store {
            inner,
            handle: Arc::new(WriterHandle { tx: Some(tx), thread: Some(thread) }),
            scratch: Arc::new(scratch),
        };
        // Install dirs of snapshot installations that never recorded their intent (or finished
        // without removing the dir): nothing refers to them.
        let stale = crate::kv_snapshot::remove_stale_installs(&store)?;
        if stale > 0 {
            info!(stale, "removed stale snapshot install dirs");
        }
        Ok(store)
    }

    /// A path for a temporary file in the store's scratch directory (emptied at open).
    pub fn scratch_path(&self, name: &str) -> Result<std::path::PathBuf, StorageError> {
        if name.contains('/') {
            return Err(StorageError::new("scratch", format!("bad scratch file name {name:?}")));
        }
        Ok(self.scratch.join(name))
    }

    /// The scratch directory (emptied at open).
    pub(crate) fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Options of the `data` column family (for writing SST files it can ingest).
    pub fn data_options(&self) -> Options {
        cf_options()
    }

    /// The RocksDB handle (reads).
    pub fn db(&self) -> &DB {
        &self.inner.db
    }

    /// A column family handle.
    pub fn cf(&self, name: &str) -> Result<&ColumnFamily, StorageError> {
        self.inner.db.cf_handle(name).ok_or_else(|| StorageError::new("open", format!("column family {name} missing")))
    }

    /// Reads `key` of column family `cf` if the memtables and the block cache can answer
    /// without the disk; `Ok(None)` when the read would have to go to the disk (call it from
    /// async code: it never waits for I/O).
    pub fn get_in_memory(&self, cf: &str, key: &[u8]) -> Result<Option<Option<Vec<u8>>>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_read_tier(ReadTier::BlockCache);
        match self.inner.db.get_cf_opt(self.cf(cf)?, key, &ro) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(None),
            Err(e) => Err(StorageError::new("get", e.to_string())),
        }
    }

    /// Writer counters.
    pub fn stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    /// The number of the last batch the writer wrote: a write whose completion was reported
    /// was in this batch or an earlier one.
    pub fn last_written_batch(&self) -> u64 {
        self.inner.stats.batches.load(Ordering::Acquire)
    }

    /// The number of the last batch written with fsync: it and every batch before it are
    /// durable (one write-ahead log).
    pub fn last_synced_batch(&self) -> u64 {
        self.inner.stats.durable_batches.load(Ordering::Acquire)
    }

    /// The store's memory, its RocksDB writes and the process's figures (blocking: RocksDB
    /// properties take its mutex and `/proc` is read; call it through [`Store::blocking`]).
    pub fn metrics(&self) -> Result<StoreMetrics, StorageError> {
        let db = &self.inner.db;
        let (mut memtable_bytes, mut table_readers_bytes) = (0u64, 0u64);
        for name in COLUMN_FAMILIES {
            let cf = self.cf(name)?;
            let int = |p| {
                db.property_int_value_cf(cf, p)
                    .map(|v| v.unwrap_or(0))
                    .map_err(|e| StorageError::new("metrics", format!("{name}: {e}")))
            };
            memtable_bytes = memtable_bytes.saturating_add(int(properties::CUR_SIZE_ALL_MEM_TABLES)?);
            table_readers_bytes = table_readers_bytes.saturating_add(int(properties::ESTIMATE_TABLE_READERS_MEM)?);
        }
        // The cache is shared: read once, not summed over families as its property would be.
        // Its capacity as the `data` family's table factory sees it (what the plan gave it,
        // unless the family were opened without the shared cache).
        let capacity = db
            .property_int_value_cf(self.cf(CF_DATA)?, properties::BLOCK_CACHE_CAPACITY)
            .map_err(|e| StorageError::new("metrics", format!("{CF_DATA}: {e}")))?
            .unwrap_or(0);
        let cache = &self.inner.cache;
        let memory = StoreMemory {
            budget_bytes: self.inner.plan.budget_bytes,
            block_cache_capacity_bytes: capacity,
            block_cache_usage_bytes: cache.get_usage() as u64,
            block_cache_pinned_bytes: cache.get_pinned_usage() as u64,
            memtable_bytes,
            table_readers_bytes,
        };
        let ticker = |t| self.inner.db_options.get_ticker_count(t);
        let io = StoreIo {
            user_written_bytes: ticker(Ticker::BytesWritten),
            wal_written_bytes: ticker(Ticker::WalFileBytes),
            flush_written_bytes: ticker(Ticker::FlushWriteBytes),
            compaction_written_bytes: ticker(Ticker::CompactWriteBytes),
        };
        Ok(StoreMetrics { memory, io, process: ProcessUsage::read() })
    }

    /// The error that poisoned the store, if any.
    pub fn poisoned(&self) -> Option<StorageError> {
        if !self.inner.poisoned.load(Ordering::Acquire) {
            return None;
        }
        self.inner.poison.lock().ok().and_then(|p| p.clone())
    }

    /// Test hook: the next batch fails as if the disk returned an error (it poisons the store).
    pub fn fail_next_write(&self) {
        self.inner.fail_next.store(true, Ordering::Release);
    }

    /// Test hook: the next batch's write takes `delay` longer, as on a disk that paused.
    #[doc(hidden)]
    pub fn delay_next_write(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.inner.delay_next_ms.store(ms, Ordering::Release);
    }

    /// Test hook: while `hold` is set, the writer takes nothing off its queue, as if the disk
    /// had stalled: its queue fills and submitters wait for room.
    #[doc(hidden)]
    pub fn hold_writes(&self, hold: bool) {
        self.inner.hold_writes.store(hold, Ordering::Release);
    }

    /// Test hook: while `hold` is set, snapshot installations wait before they touch anything
    /// (to test what happens to an installation in flight).
    #[doc(hidden)]
    pub fn hold_installs(&self, hold: bool) {
        self.inner.hold_installs.store(hold, Ordering::Release);
    }

    /// Test hook: installations waiting because of [`Store::hold_installs`].
    #[doc(hidden)]
    pub fn installs_held(&self) -> usize {
        self.inner.installs_held.load(Ordering::Acquire)
    }

    /// Where an installation waits while [`Store::hold_installs`] is set.
    pub(crate) async fn install_hold_point(&self) {
        if !self.inner.hold_installs.load(Ordering::Acquire) {
            return;
        }
        self.inner.installs_held.fetch_add(1, Ordering::AcqRel);
        while self.inner.hold_installs.load(Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        self.inner.installs_held.fetch_sub(1, Ordering::AcqRel);
    }

    /// Queues `ops` for the writer and waits for them to be written (and fsynced if `sync`).
    pub async fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StorageError> {
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        let (done, rx) = oneshot::channel();
        let mut req = WriteReq { ops, sync, done: Done::Oneshot(done) };
        let tx = self.handle.tx.as_ref().ok_or_else(|| StorageError::new("write", "the store is closed"))?;
        loop {
            // Registered before the attempt, so room made between a full attempt and the
            // wait is not missed.
            let room = self.inner.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match tx.try_send(req) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(r)) => {
                    if self.inner.writer_gone.load(Ordering::Acquire) {
                        return Err(StorageError::new("write", "the store's writer has stopped"));
                    }
                    req = r;
                    room.await;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(StorageError::new("write", "the store's writer has stopped"))
                }
            }
        }
        rx.await.map_err(|_| StorageError::new("write", "the store's writer has stopped"))?
    }

    /// Queues `ops` for the writer without waiting for the write: `done` runs on the writer
    /// thread with the outcome. Blocks while the writer's queue is full; called on a worker of
    /// a multi-thread runtime (the host's pollers), it blocks in place (`block_in_place`), so
    /// the worker's other tasks move to another thread meanwhile and a stalled disk does not
    /// stall the runtime. Requests submitted one after another are written in that order (a
    /// host relies on it to keep each group's writes ordered). An error here means nothing was
    /// queued and `done` will not run.
    pub fn submit(&self, ops: Vec<Op>, sync: bool, done: WriteCallback) -> Result<(), StorageError> {
        if let Some(e) = self.poisoned() {
            return Err(e);
        }
        self.enqueue(WriteReq { ops, sync, done: Done::Callback(done) })
    }

    fn enqueue(&self, req: WriteReq) -> Result<(), StorageError> {
        let Some(tx) = &self.handle.tx else {
            return Err(StorageError::new("write", "the store is closed"));
        };
        let stopped = || StorageError::new("write", "the store's writer has stopped");
        let req = match tx.try_send(req) {
            Ok(()) => return Ok(()),
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(stopped()),
            Err(mpsc::TrySendError::Full(req)) => req,
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let sent = if multi_thread { tokio::task::block_in_place(|| tx.send(req)) } else { tx.send(req) };
        sent.map_err(|_| stopped())
    }

    /// Runs blocking RocksDB work off the async threads.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StorageError::new("read", format!("blocking task failed: {e}")))?
    }

    /// Compacts `[from, to)` of the `raft` column family (blocking): after a ranged purge, so
    /// its range tombstone does not slow later reads.
    pub fn compact_raft_range(&self, from: &[u8], to: &[u8]) -> Result<(), StorageError> {
        self.inner.db.compact_range_cf(self.cf(CF_RAFT)?, Some(from), Some(to));
        Ok(())
    }

    /// Groups that have a descriptor, in id order.
    pub fn groups(&self) -> Result<Vec<GroupId>, StorageError> {
        let cf = self.cf(CF_META)?;
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(|e| StorageError::new("read", e.to_string()))?;
            if k.len() == 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&k);
                out.push(GroupId(u64::from_be_bytes(b)));
            }
        }
        Ok(out)
    }

    /// Records that `group` exists (with an opaque descriptor), durably.
    pub async fn put_group(&self, group: GroupId, descriptor: Vec<u8>) -> Result<(), StorageError> {
        self.write(vec![Op::Put(CF_META, meta_key(group).to_vec(), descriptor)], true).await
    }
}

/// Tells writers waiting for room that the writer is gone, however the writer thread ends.
struct WriterGone(Arc<Inner>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        self.0.writer_gone.store(true, Ordering::Release);
        self.0.room.notify_waiters();
    }
}

fn writer_loop(inner: Arc<Inner>, rx: mpsc::Receiver<WriteReq>) {
    let _gone = WriterGone(inner.clone());
    let raft = inner.db.cf_handle(CF_RAFT).map(|_| ());
    debug_assert!(raft.is_some());
    let mut last_slow_logged: Option<std::time::Instant> = None;
    while let Ok(first) = rx.recv() {
        while inner.hold_writes.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut reqs = vec![first];
        let mut bytes: usize = reqs[0].ops.iter().map(Op::bytes).sum();
        while reqs.len() < GROUP_COMMIT_REQUESTS_MAX && bytes < GROUP_COMMIT_BYTES_MAX {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.ops.iter().map(Op::bytes).sum::<usize>();
                    reqs.push(r);
                }
                Err(_) => break,
            }
        }
        inner.room.notify_waiters();
        let started = std::time::Instant::now();
        let result = write_batch(&inner, &reqs);
        let elapsed = started.elapsed();
        let took = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        inner.stats.write_micros.fetch_add(took, Ordering::Relaxed);
        if elapsed >= SLOW_WRITE {
            note_slow_write(&inner, elapsed, &reqs, &mut last_slow_logged);
        }
        if let Err(e) = &result {
            error!(error = %e, "write failed: the store is poisoned and refuses further writes");
            if let Ok(mut p) = inner.poison.lock() {
                p.get_or_insert_with(|| e.clone());
            }
            inner.poisoned.store(true, Ordering::Release);
        }
        inner.stats.requests.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        for r in reqs {
            r.done.send(result.clone());
        }
    }
}

/// Counts a batch write that took `elapsed` (at least [`SLOW_WRITE`]) and logs it, at most
/// once a second: every group's commits on this node waited for it.
fn note_slow_write(
    inner: &Inner,
    elapsed: std::time::Duration,
    reqs: &[WriteReq],
    last_logged: &mut Option<std::time::Instant>,
) {
    inner.stats.slow_writes.fetch_add(1, Ordering::Relaxed);
    if last_logged.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
        return;
    }
    *last_logged = Some(std::time::Instant::now());
    let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let bytes: usize = reqs.iter().flat_map(|r| &r.ops).map(Op::bytes).sum();
    let sync = reqs.iter().any(|r| r.sync);
    warn!(millis, requests = reqs.len(), bytes, sync, "slow store write: every commit on this node waited for it");
}

fn write_batch(inner: &Inner, reqs: &[WriteReq]) -> Result<(), StorageError> {
    if inner.poisoned.load(Ordering::Acquire) {
        return Err(inner
            .poison
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .unwrap_or_else(|| StorageError::new("write", "poisoned")));
    }
    if inner.fail_next.swap(false, Ordering::AcqRel) {
        return Err(StorageError::new("write", "injected disk failure (Store::fail_next_write)"));
    }
    let delay_ms = inner.delay_next_ms.swap(0, Ordering::AcqRel);
    if delay_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    }
    let db = &inner.db;
    let mut batch = WriteBatch::default();
    let mut sync = false;
    for r in reqs {
        sync |= r.sync;
        for op in &r.ops {
            let cf_of = |name: &str| {
                db.cf_handle(name).ok_or_else(|| StorageError::new("write", format!("no column family {name}")))
            };
            match op {
                Op::Put(cf, k, v) => batch.put_cf(cf_of(cf)?, k, v),
                Op::Delete(cf, k) => batch.delete_cf(cf_of(cf)?, k),
                Op::DeleteRange(cf, a, b) => batch.delete_range_cf(cf_of(cf)?, a, b),
            }
        }
    }
    if batch.is_empty() && sync {
        // Only a sync was asked for (an applied state waiting to be durable): sync the log.
        db.flush_wal(true).map_err(|e| StorageError::new("write", e.to_string()))?;
    } else {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(batch, &wo).map_err(|e| StorageError::new("write", e.to_string()))?;
    }
    inner.stats.batches.fetch_add(1, Ordering::Relaxed);
    if sync {
        inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let written = inner.stats.batches.load(Ordering::Relaxed);
        inner.stats.durable_batches.store(written, Ordering::Release);
    }
    Ok(())
}
