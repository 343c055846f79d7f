//! flotilla-raft: the Raft consensus protocol as a sans-IO engine, and a Tokio driver.
#![warn(missing_docs)]

pub mod config;
pub mod driver;
pub mod engine;
pub mod entry;
pub mod error;
pub mod membership;
pub mod message;
pub mod network;
pub mod storage;
pub mod types;

pub use config::Config;
pub use driver::{Raft, RaftMetrics, WriteResponse};
pub use engine::{Action, Engine, EngineStatus, InitialState, IoId, ReadMode, Role};
pub use entry::{Entry, EntryPayload};
pub use error::{ConfigError, Fatal, RaftError, StorageError};
pub use membership::{Membership, StoredMembership};
pub use message::{AppendResult, Message, MessageBody};
pub use network::Network;
pub use storage::{AppliedState, LogState, LogStorage, Snapshot, SnapshotMeta, StateMachine};
pub use types::{GroupId, LogId, LogIndex, Millis, NodeId, Term, Vote};

#[cfg(feature = "testing")]
pub mod testing;
