//! flotilla-shard: the storage of one node — one RocksDB instance holding the Raft logs and
//! state machines of every group on the node, with group commit (the writes of many groups
//! made durable by one fsync) — and, next, the shard host that runs thousands of groups.
//!
//! - [`Store`]: the RocksDB instance (column families `raft`, `data`, `meta`) and its single
//!   group-commit writer. A failed write poisons it. Its caches and memtables are sized from
//!   one memory budget ([`StoreOptions`], `store_options.rs`); what it uses is read in one
//!   place ([`Store::metrics`], `store_metrics.rs`).
//! - [`RocksLog`]: `LogStorage` of one group (checksummed, versioned records).
//! - [`KvStateMachine`]: the key-value `StateMachine` of one shard over its key range.
//! - [`kv_snapshot`]: its snapshots as SST files, built, streamed by offset, received and
//!   installed crash-safely.
#![warn(missing_docs)]

mod clock;
pub mod host;
pub mod keys;
pub mod kv;
pub mod kv_snapshot;
pub mod log;
pub mod merge;
pub mod store;
pub mod store_metrics;
pub mod store_options;

pub use host::{
    DestroyGuard, GroupDescriptor, GroupInfo, Host, HostConfig, HostError, HostNetwork, HostStats, NodeBatch,
    QuiesceNotice, RemovedNotice,
};
pub use kv::{
    check_insert_size, range_size_blocking, KeyRange, KvCommand, KvResponse, KvStateMachine, MergeWait, Prepared,
    RangeSize, ScanEnd, ScanError, ScanPage, SplitEffect, UpdateOp, KEY_BYTES_MAX, TXN_BYTES_MAX, TXN_WRITES_MAX,
    VALUE_BYTES_MAX,
};
pub use log::RocksLog;
pub use merge::{Frozen, MergeState};
pub use store::{Op, Store, WriterStats, CF_DATA, CF_META, CF_RAFT};
pub use store_metrics::{ProcessUsage, StoreIo, StoreMemory, StoreMetrics};
pub use store_options::{MemoryPlan, StoreOptions};
