//! Cluster formation: how empty nodes become a cluster.
//!
//! # Nodes start with no configuration
//!
//! A node whose storage is empty (no log entry, no vote, no snapshot) belongs to no cluster:
//! its configuration is empty, so it is not a voter and never starts an election. Its election
//! timer still fires, and simply restarts. Such a node waits for one of two things:
//!
//! - [`Raft::initialize`] is called on it, which makes it a founding member; or
//! - a leader whose configuration includes it contacts it. The leader finds that the node's
//!   log is empty and sends it everything from index 1 (or a snapshot), including the
//!   configuration entries, after which the node knows the configuration and its own role in
//!   it. A pristine node also answers vote requests like any other node: that is how the
//!   first leader gets its majority from nodes that were never initialized.
//!
//! This is why nothing in [`Raft::start`] says whether a node is new: starting is the same
//! for a founding member, a node that will be added later, and a node restarting on its
//! existing storage (which resumes with the configuration it stored and needs no further
//! call).
//!
//! # `initialize`: once, with one membership
//!
//! [`Raft::initialize`] takes the first configuration, checks it
//! ([`Membership::validate`]: at least one voter, no node both voter and learner; otherwise
//! [`RaftError::InvalidMembership`]) and writes it as the first log entry, with id term 0,
//! index 1. The node then campaigns after a random delay of at most half of
//! [`Config::election_timeout_ms_min`], rather than a whole election timeout, so a new
//! cluster elects its first leader quickly.
//!
//! You can call it on **one** founding node, or on **every** founding node. Calling it on
//! several nodes is safe only if they all get **exactly the same membership**: every one of
//! them then writes the identical entry at term 0, index 1, and their logs agree. Raft relies
//! on two entries with the same term and index being the same entry. If node 1 were
//! initialized with voters {1, 2, 3} and node 4 with voters {3, 4, 5}, each would believe it
//! could win an election with a majority of its own configuration ({1, 2} and {4, 5} do not
//! overlap), and the group could have two leaders in one term.
//!
//! Include the node you call it on: a node that is not a voter in its own initial
//! configuration never campaigns, and if the other members are still empty nobody does.
//!
//! # `AlreadyInitialized`
//!
//! `initialize` is refused with [`RaftError::AlreadyInitialized`] on a node that has any state:
//! a log entry, a stored vote or a snapshot. That happens when
//!
//! - the node was initialized before and restarted: its stored configuration stands;
//! - the node has already been contacted by a candidate or a leader (voting stores a vote);
//!   this is the normal outcome of calling `initialize` on every founding node, since the
//!   first one to campaign may reach the others before their own call does.
//!
//! Either way the node is already part of the cluster, so a bootstrap procedure that calls
//! `initialize` with the same fixed membership on every founding node at every start-up, and
//! treats `AlreadyInitialized` as success, is correct. Do not use it for nodes that join
//! later: add those through the leader
//! ([`dynamic_membership`](super::dynamic_membership)).
//!
//! ```rust
//! # #[cfg(feature = "testing")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use flotilla_raft::testing::{MemLogStorage, MemRouter, MemStateMachine};
//! use flotilla_raft::{Config, GroupId, Membership, NodeId, Raft, RaftError};
//! use std::time::Duration;
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! runtime.block_on(async {
//!     let router = MemRouter::new();
//!     let founders = [NodeId(1), NodeId(2), NodeId(3)];
//!     let mut rafts = Vec::new();
//!     for id in founders {
//!         let raft = Raft::start(
//!             id,
//!             GroupId(7),
//!             Config::default(),
//!             MemLogStorage::new(),
//!             MemStateMachine::new(),
//!             router.network(),
//!         )
//!         .await?;
//!         router.register(raft.clone());
//!         rafts.push(raft);
//!     }
//!     // The same membership everywhere; a node that has already heard from a candidate
//!     // answers AlreadyInitialized, which is fine.
//!     for raft in &rafts {
//!         match raft.initialize(Membership::new(founders)).await {
//!             Ok(()) | Err(RaftError::AlreadyInitialized) => {}
//!             Err(e) => return Err(e.into()),
//!         }
//!     }
//!     let m = rafts[0].wait_for(Duration::from_secs(10), |m| m.leader.is_some()).await?;
//!     assert!(m.leader.is_some_and(|l| founders.contains(&l)));
//!
//!     // Once a node has state, initializing it again is refused.
//!     assert_eq!(rafts[0].initialize(Membership::new(founders)).await, Err(RaftError::AlreadyInitialized));
//!
//!     for raft in &rafts {
//!         raft.shutdown().await;
//!     }
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! # Other shapes
//!
//! - **One node.** `initialize` with a single voter: the node elects itself, commits alone,
//!   and answers linearizable reads without a round trip. Grow it later by adding learners
//!   and changing the voters.
//! - **Learners from the start.** The initial membership may list learners
//!   (`Membership { voters, outgoing: None, learners }`); they replicate but never vote.
//! - **Group ids.** Every node of a group uses the same [`GroupId`](crate::GroupId). The
//!   protocol does not look at it; it names the group in metrics and tracing, and your network
//!   uses it to route messages when a process runs several groups.
//!
//! [`Raft::initialize`]: crate::Raft::initialize
//! [`Raft::start`]: crate::Raft::start
//! [`Membership::validate`]: crate::Membership::validate
//! [`RaftError::InvalidMembership`]: crate::RaftError::InvalidMembership
//! [`RaftError::AlreadyInitialized`]: crate::RaftError::AlreadyInitialized
//! [`Config::election_timeout_ms_min`]: crate::Config::election_timeout_ms_min
