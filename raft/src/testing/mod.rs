//! In-memory implementations of the storage traits and a conformance suite any implementation
//! runs against itself.
//!
//! - [`MemLogStorage`]: a [`LogStorage`](crate::LogStorage) kept in memory, with a switch to
//!   make every write fail ([`MemLogStorage::set_fail_writes`]).
//! - [`MemStateMachine`]: a key-value [`StateMachine`](crate::StateMachine) applying
//!   [`KvCommand`]s and answering [`KvResponse`]s.
//! - [`log_storage_suite`] and [`state_machine_suite`]: checks of the storage contracts that
//!   any implementation (in memory or on disk) runs against itself.
//!
//! Only compiled with the `testing` cargo feature.

pub mod conformance;
pub mod kv;
pub mod linearizability;
pub mod mem_log;
pub mod router;
pub mod sim;

pub use conformance::{log_storage_suite, state_machine_suite};
pub use kv::{apply_kv, KvCommand, KvResponse, MemStateMachine};
pub use mem_log::MemLogStorage;
pub use router::{MemNetwork, MemRouter};
