//! flotilla-shard: the storage of one node — one RocksDB instance holding the Raft logs and
//! state machines of every group on the node, with group commit (many groups, one fsync) —
//! and the shard host that runs thousands of Raft groups on a few tasks.
//!
//! Not built yet: see the storage issue. It will depend on `flotilla-raft` only.
#![warn(missing_docs)]
