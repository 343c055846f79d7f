//! Dynamic membership: adding learners, changing voters by joint consensus, removing nodes.
//!
//! A configuration ([`Membership`]) has *voters*, which elect leaders and form quorums, and
//! *learners*, which receive the log but never vote and never count toward a quorum. Changes
//! are proposed on the leader and travel through the log as configuration entries. A node
//! uses the latest configuration in its log as soon as the entry is there, committed or not;
//! if a new leader overwrites that entry, the node goes back to the previous one.
//!
//! # Adding a learner
//!
//! Start the new node on empty storage, make it reachable, and **do not** initialize it
//! ([`cluster_formation`](super::cluster_formation)). Then, on the leader, call
//! [`Raft::add_learner`]. It proposes the current configuration plus the learner, and answers
//! with the entry's index once that entry is committed and applied on the leader. The leader
//! starts sending the log to the learner as soon as the entry is in its own log; the learner
//! catches up in the background, by entries or, if the leader has already compacted what it
//! needs, by a snapshot.
//!
//! Adding a node that is already a member (voter or learner) changes nothing and answers with
//! the index of the current configuration entry.
//!
//! To know when the learner has caught up, compare the leader's
//! [`RaftMetrics::replication`] entry for it (its matched log index) with the leader's
//! `last_log_id.index`, or watch the learner's own `applied`.
//!
//! # Changing the voters: joint consensus
//!
//! [`Raft::change_membership`] takes the complete new set of voters. Learners in the set are
//! promoted; voters not in it leave the group (they do not become learners); learners not in
//! it stay learners. The change happens in two steps, both driven by the leader:
//!
//! 1. The leader proposes a *joint* configuration: the new voters, with the current voters as
//!    [`outgoing`](crate::Membership::outgoing). While it is in effect, electing a leader or
//!    committing an entry needs a majority of the new voters **and** a majority of the old
//!    ones.
//! 2. As soon as the joint entry is committed, the leader proposes the new configuration alone
//!    (no `outgoing`). Nobody has to ask for this second step.
//!
//! The call answers once that final configuration is committed and applied on the leader,
//! with the index of the final entry. If the set equals the current voters, nothing is
//! proposed. An empty set is refused with [`RaftError::InvalidMembership`].
//!
//! Why two steps: if nodes switched directly from the old voters to the new ones, then for a
//! while some nodes would use the old configuration and some the new one, and a majority of
//! the old voters and a majority of the new voters could each elect a leader, or commit
//! different entries, without hearing of each other. In the joint configuration every
//! decision needs both majorities, so the old and new configurations cannot decide apart.
//! The crate does not offer the single-step (one node at a time) algorithm.
//!
//! # Why learners first
//!
//! A node added directly as a voter starts with an empty log. From the moment the joint
//! configuration is in the leader's log, committing anything needs a majority of the new
//! voters, and a new voter can acknowledge an entry only once it holds the log up to that
//! entry. Replacing voter 3 of {1, 2, 3} by an empty node 4, for example, makes every commit
//! need two of {1, 2, 4} as well as two of {1, 2, 3}. That works while nodes 1 and 2 are both
//! up; if either fails, the group cannot commit until node 4 has received the whole log or a
//! snapshot. Adding node 4 as a learner first moves that transfer to a time when node 4 counts
//! for nothing, so the group never waits for it. Promote a learner once it has caught up.
//!
//! # Removing nodes, and removing the leader
//!
//! A removed node stops receiving messages as soon as the leader has appended the final
//! configuration. It may therefore never see that configuration: it keeps the joint one,
//! where it is still a voter, and after an election timeout it starts asking for votes. It
//! cannot win (a majority of the new voters hold entries it lacks), and with
//! [`Config::check_quorum`] members that hear from their leader ignore it, but it is noise:
//! once the change has completed, call [`Raft::shutdown`] on it and stop routing to it.
//!
//! The leader itself may be removed. It stays leader through the joint phase (it is one of
//! the outgoing voters) and replicates the final configuration, in which it is not a voter
//! and does not count toward the quorum. Once that entry is committed, it steps down and
//! never campaigns again (log message "removed from the configuration: stepping down"). The
//! remaining voters elect a new leader only after their election timeout, so writes pause for
//! about that long. To avoid the pause, first hand leadership to a node that stays, with
//! [`Raft::transfer_leader`].
//!
//! # Demoting a voter
//!
//! There is no single call: `add_learner` on a voter changes nothing. Remove the node with
//! `change_membership`, then add it back with `add_learner`.
//!
//! # One change at a time: `ChangeInProgress`
//!
//! `add_learner` and `change_membership` are refused with [`RaftError::ChangeInProgress`]
//! while the latest configuration entry is not committed, while the configuration is joint
//! (the automatic second step has not committed yet), and on a new leader until the first
//! entry of its term is committed. A caller that waits for each change to answer before the
//! next rarely sees it; concurrent callers and callers right after an election do. Retry
//! after a short delay. Like writes, changes are also refused with
//! [`RaftError::NotLeader`] off the leader and with [`RaftError::TransferInProgress`] during a
//! leadership transfer.
//!
//! Both calls are bounded by [`Config::api_timeout_ms`]. [`RaftError::Timeout`] does not
//! cancel the change: it goes on in the group. Look at
//! [`RaftMetrics::committed_membership`] to see where it stands.
//!
//! # Example: replace a voter
//!
//! ```rust
//! # #[cfg(feature = "testing")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use flotilla_raft::testing::{MemLogStorage, MemRouter, MemStateMachine};
//! use flotilla_raft::{Config, GroupId, Membership, NodeId, Raft, Role};
//! use std::collections::{BTreeMap, BTreeSet};
//! use std::time::Duration;
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! runtime.block_on(async {
//!     let wait = Duration::from_secs(10);
//!     let router = MemRouter::new();
//!     let mut rafts = BTreeMap::new();
//!     for id in 1..=4 {
//!         let (log, sm) = (MemLogStorage::new(), MemStateMachine::new());
//!         let raft = Raft::start(NodeId(id), GroupId(1), Config::default(), log, sm, router.network()).await?;
//!         router.register(raft.clone());
//!         rafts.insert(NodeId(id), raft);
//!     }
//!     // Nodes 1..=3 form the cluster; node 4 is started but not initialized.
//!     rafts[&NodeId(1)].initialize(Membership::new([1, 2, 3].map(NodeId))).await?;
//!     let m = rafts[&NodeId(1)].wait_for(wait, |m| m.leader.is_some()).await?;
//!     let leader = &rafts[&m.leader.expect("checked")];
//!     leader.wait_for(wait, |m| m.role == Role::Leader).await?;
//!
//!     // 1. Node 4 joins as a learner and catches up.
//!     leader.add_learner(NodeId(4)).await?;
//!     let last = leader.metrics().borrow().last_log_id.index;
//!     leader.wait_for(wait, |m| m.replication.get(&NodeId(4)).is_some_and(|i| *i >= last)).await?;
//!
//!     // 2. Replace a voter other than the leader by node 4.
//!     let removed = [1, 2, 3].map(NodeId).into_iter().find(|n| *n != leader.id()).expect("two followers");
//!     let voters: BTreeSet<NodeId> = [1, 2, 3, 4].map(NodeId).into_iter().filter(|n| *n != removed).collect();
//!     leader.change_membership(voters.clone()).await?;
//!     let committed = leader.metrics().borrow().committed_membership.membership.clone();
//!     assert_eq!(committed.voters, voters);
//!     assert!(!committed.is_joint() && committed.learners.is_empty());
//!
//!     // 3. The removed node is no longer needed.
//!     router.unregister(removed);
//!     rafts[&removed].shutdown().await;
//!     for (id, raft) in &rafts {
//!         if *id != removed {
//!             raft.shutdown().await;
//!         }
//!     }
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! [`Membership`]: crate::Membership
//! [`Raft::add_learner`]: crate::Raft::add_learner
//! [`Raft::change_membership`]: crate::Raft::change_membership
//! [`Raft::transfer_leader`]: crate::Raft::transfer_leader
//! [`Raft::shutdown`]: crate::Raft::shutdown
//! [`RaftMetrics::replication`]: crate::RaftMetrics::replication
//! [`RaftMetrics::committed_membership`]: crate::RaftMetrics::committed_membership
//! [`RaftError::InvalidMembership`]: crate::RaftError::InvalidMembership
//! [`RaftError::ChangeInProgress`]: crate::RaftError::ChangeInProgress
//! [`RaftError::NotLeader`]: crate::RaftError::NotLeader
//! [`RaftError::TransferInProgress`]: crate::RaftError::TransferInProgress
//! [`RaftError::Timeout`]: crate::RaftError::Timeout
//! [`Config::check_quorum`]: crate::Config::check_quorum
//! [`Config::api_timeout_ms`]: crate::Config::api_timeout_ms
