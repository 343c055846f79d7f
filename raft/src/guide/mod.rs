//!
//! This module holds no code. Each submodule is a chapter; read them in order the first time,
//! then come back to the one you need.
//!
//! 1. [`getting_started`](crate::guide::getting_started): start a group with [`Raft::start`](crate::Raft::start), write,
//!    read and shut down; what each [`RaftError`](crate::RaftError) asks the caller to do.
//! 2. [`cluster_formation`](crate::guide::cluster_formation): how a set of empty nodes becomes a cluster, and why
//!    `initialize` must get the same membership everywhere.
//! 3. [`dynamic_membership`](crate::guide::dynamic_membership): adding learners, changing voters by joint consensus,
//!    removing the leader.
//! 4. [`implementing_storage`](crate::guide::implementing_storage): the [`LogStorage`](crate::LogStorage) and
//!    [`StateMachine`](crate::StateMachine) contracts point by point, and testing an
//!    implementation with the conformance suites.
//! 5. [`implementing_network`](crate::guide::implementing_network): what a [`Network`](crate::Network) must and must not do,
//!    and the messages it carries.
//! 6. [`snapshots_and_compaction`](crate::guide::snapshots_and_compaction): when snapshots are built, how much log is kept, and how
//!    a snapshot is streamed to a follower that fell behind.
//! 7. [`reads_and_consistency`](crate::guide::reads_and_consistency): ReadIndex and lease reads, the clock assumption behind
//!    leases, and what is not offered.
//! 8. [`driving_the_engine`](crate::guide::driving_the_engine): running the sans-IO [`Engine`](crate::Engine) yourself, for
//!    example many groups on a few threads.
//! 9. [`observability`](crate::guide::observability): metrics and tracing.
//!
//! Terms used throughout: a *group* is one replicated log and its state machine; a *node* is a
//! process taking part in groups, named by a [`NodeId`](crate::NodeId); one process may run
//! many groups, each named by a [`GroupId`](crate::GroupId). A *voter* takes part in
//! elections and quorums; a *learner* receives the log but never votes and never counts
//! toward a quorum.

pub mod cluster_formation;
pub mod driving_the_engine;
pub mod dynamic_membership;
pub mod getting_started;
pub mod implementing_network;
pub mod implementing_storage;
pub mod observability;
pub mod reads_and_consistency;
pub mod snapshots_and_compaction;
