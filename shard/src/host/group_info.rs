//! What the host reports of each of its groups ([`GroupInfo`]), built on the group's poller.
//!
//! A node asks for every group's summary several times a second (its report to the meta
//! leader, the reconciler, the size checks, the metrics), and with thousands of groups that
//! was most of an idle node's CPU: each summary copied the group's two configurations, a few
//! sets each, only to drop them again. The configurations are now shared: one copy per
//! distinct configuration per call, which on a node whose groups mostly have the same replicas
//! is a handful for all of them.

use super::group_state::GroupState;
use flotilla_raft::{LogId, LogIndex, Membership, NodeId, Role, StoredMembership, Term};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// What [`super::Host::group_info`] reports of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group.
    pub group: flotilla_raft::GroupId,
    /// This node's role in it.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Last log index.
    pub last_index: LogIndex,
    /// The term of the last log entry: with `last_index`, how up to date the log is (what
    /// unsafe recovery compares to pick the replica a group keeps).
    pub last_term: Term,
    /// Commit index.
    pub committed: LogIndex,
    /// Applied index.
    pub applied: LogIndex,
    /// The applied index the state machine holds durably (the log is purged behind it).
    pub durable_applied: LogIndex,
    /// The first index still in the log.
    pub first_index: LogIndex,
    /// The newest snapshot built for a transfer and not yet dropped (leaders only).
    pub snapshot: Option<LogId>,
    /// The configuration in effect (the newest in the log), both halves while joint: whether
    /// the group still has a quorum once nodes are lost for good.
    pub membership: Arc<Membership>,
    /// The committed configuration and the entry that carried it: what a replica's lifecycle
    /// follows (a node leaves a group only once a committed configuration says so).
    pub committed_conf: SharedConf,
    /// The index of the newest configuration in the replica's log (0 if it holds none).
    pub newest_conf: LogIndex,
    /// The highest index of a committed configuration without this node that a member of the
    /// group told of ([`super::RemovedNotice`]).
    pub removed_at: Option<LogIndex>,
    /// Whether the group is quiet (not ticking).
    pub quiet: bool,
    /// On a leader: how far each other member's log is known to match the leader's (empty
    /// on a follower). A merge's source waits until every voter holds its freeze entry.
    /// Filled by [`super::Host::group_info_of`] only; [`super::Host::group_info`] leaves it
    /// empty.
    pub matched: BTreeMap<NodeId, LogIndex>,
    /// Why the group stopped for good (a storage failure, or its log forked from its
    /// leader's below the commit index), once it did; counted in `flotilla_groups_stopped`.
    pub stopped: Option<String>,
}

impl GroupInfo {
    /// Voters of the configuration in effect (the incoming ones while joint).
    pub fn voters(&self) -> &BTreeSet<NodeId> {
        &self.membership.voters
    }
}

/// A configuration and the entry that carried it, the configuration shared with the other
/// summaries that have the same one (what [`StoredMembership`] holds, without a copy each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedConf {
    /// The entry that carried the configuration.
    pub log_id: LogId,
    /// The configuration.
    pub membership: Arc<Membership>,
}

impl From<StoredMembership> for SharedConf {
    fn from(s: StoredMembership) -> SharedConf {
        SharedConf { log_id: s.log_id, membership: Arc::new(s.membership) }
    }
}

/// Distinct configurations kept for sharing within one call, at most; past that a
/// configuration not among them gets a copy of its own (as every summary did before).
const SHARED_CONFIGURATIONS_MAX: usize = 16;

/// The configurations the summaries of one call share.
#[derive(Default)]
pub(super) struct Configurations(Vec<Arc<Membership>>);

impl Configurations {
    /// A shared copy of `m`: one made earlier in this call if equal, a new one otherwise.
    fn share(&mut self, m: &Membership) -> Arc<Membership> {
        // Newest first: groups are visited in id order, and neighbours tend to share replicas.
        if let Some(a) = self.0.iter().rev().find(|a| ***a == *m) {
            return a.clone();
        }
        let a = Arc::new(m.clone());
        if self.0.len() >= SHARED_CONFIGURATIONS_MAX {
            self.0.remove(0);
        }
        self.0.push(a.clone());
        a
    }
}

/// What the host reports of one group, its configurations shared through `confs`, with
/// `matched` if `replication`.
pub(super) fn group_info(g: &GroupState, confs: &mut Configurations, replication: bool) -> GroupInfo {
    let e = g.core.engine();
    let committed = e.committed_membership();
    GroupInfo {
        group: g.id,
        role: e.role(),
        term: e.term(),
        leader: e.leader(),
        last_index: e.last_log_id().index,
        last_term: e.last_log_id().term,
        committed: e.committed(),
        applied: e.applied(),
        durable_applied: e.durable_applied(),
        first_index: e.first_log_index(),
        snapshot: e.newest_snapshot(),
        membership: confs.share(&e.membership().membership),
        committed_conf: SharedConf { log_id: committed.log_id, membership: confs.share(&committed.membership) },
        newest_conf: e.membership().log_id.index,
        removed_at: g.removed_at,
        quiet: g.quiet,
        // Only a leader tracks it; read alone (a whole status copies both configurations).
        matched: if replication { e.replication() } else { BTreeMap::new() },
        stopped: g.core.fatal().map(|f| f.to_string()),
    }
}

/// A digest of what [`group_info`] reports of `g`, but `matched` and `quiet`: equal digests
/// mean an equal summary otherwise, unless 64 bits collide. A configuration counts by the
/// entry that carried it, and by its members only while it is the one a group was formed
/// with (index 0), which no entry carries. `quiet` is left out: a group that serves reads
/// now and then (the meta group) wakes and goes quiet again each time, and nothing that
/// waits on the generation decides on it.
pub(super) fn fingerprint(g: &GroupState) -> u64 {
    let e = g.core.engine();
    let mut h = Mix(0);
    (e.role() as u8, e.term(), e.leader(), e.last_log_id(), e.committed(), e.applied()).hash(&mut h);
    (e.durable_applied(), e.first_log_index(), e.newest_snapshot()).hash(&mut h);
    let (effective, committed) = (e.membership(), e.committed_membership());
    (effective.log_id, committed.log_id, g.removed_at, g.core.fatal().is_some()).hash(&mut h);
    for m in [effective, committed].into_iter().filter(|m| m.log_id.index == LogIndex(0)) {
        (&m.membership.voters, &m.membership.outgoing, &m.membership.learners).hash(&mut h);
    }
    h.finish()
}

/// A fast multiply-rotate hash (the one rustc's own hash maps use): the fingerprint is taken
/// at every drive of every group, where SipHash showed in the profile of a node starting
/// 100,000 groups; it guards against no adversary, only against a change going unseen.
struct Mix(u64);

impl Hasher for Mix {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(voters: &[u64], learners: &[u64]) -> Membership {
        Membership {
            voters: voters.iter().map(|n| NodeId(*n)).collect(),
            outgoing: None,
            learners: learners.iter().map(|n| NodeId(*n)).collect(),
        }
    }

    #[test]
    fn equal_configurations_share_one_copy_and_different_ones_do_not() {
        let mut c = Configurations::default();
        let a = c.share(&conf(&[1, 2, 3], &[]));
        let b = c.share(&conf(&[1, 2, 3], &[]));
        assert!(Arc::ptr_eq(&a, &b));
        let l = c.share(&conf(&[1, 2, 3], &[4]));
        assert!(!Arc::ptr_eq(&a, &l), "a learner more is another configuration");
        assert_eq!(*l, conf(&[1, 2, 3], &[4]));
        let joint = Membership { outgoing: Some([NodeId(1)].into()), ..conf(&[1, 2, 3], &[]) };
        let j = c.share(&joint);
        assert!(!Arc::ptr_eq(&a, &j), "a joint configuration is another configuration");
        assert_eq!(*j, joint);
        assert!(Arc::ptr_eq(&a, &c.share(&conf(&[1, 2, 3], &[]))), "still shared after others");
    }

    #[test]
    fn past_the_bound_a_configuration_gets_a_copy_of_its_own_and_stays_right() {
        let mut c = Configurations::default();
        let all: Vec<Membership> =
            (0..(SHARED_CONFIGURATIONS_MAX as u64 + 8)).map(|i| conf(&[i, i + 1], &[])).collect();
        for m in &all {
            assert_eq!(*c.share(m), *m);
        }
        assert_eq!(c.0.len(), SHARED_CONFIGURATIONS_MAX);
        // The first ones were let go: shared again, they are equal to what was asked, whatever
        // copy they get.
        for m in &all {
            assert_eq!(*c.share(m), *m);
        }
    }
}
