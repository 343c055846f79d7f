//! The role a node plays in its group and the state that only a leader has.

use super::*;

/// State only a leader has.
#[derive(Debug)]
pub(super) struct LeaderState {
    pub(super) progress: BTreeMap<NodeId, Progress>,
    /// Index of the blank entry that opened this term; reads wait until it is committed.
    pub(super) noop_index: LogIndex,
    /// Last heartbeat round started.
    pub(super) round: u64,
    /// A round must be started at the end of this step (reads are waiting on it).
    pub(super) round_needed: bool,
    /// When the pending round was asked for: its start time for the lease.
    pub(super) round_requested_at: Millis,
    /// Send time of recent rounds, oldest first (lease reads).
    pub(super) round_sent_at: VecDeque<(u64, Millis)>,
    /// Reads waiting for their round to be acknowledged by a quorum, by round.
    pub(super) reads: VecDeque<PendingRead>,
    /// Reads waiting for the first commit of this term.
    pub(super) reads_before_noop: Vec<(u64, ReadMode)>,
    pub(super) heartbeat_at: Millis,
    pub(super) check_quorum_at: Millis,
    pub(super) transfer: Option<Transfer>,
    /// A `TimeoutNow` went out this term: the target may win an election that ignores
    /// followers' leases at any time from now on, so this leader's lease is void for good.
    pub(super) lease_void: bool,
}

impl Engine {
    /// A follower becomes a learner (or back) as its configuration changes.
    pub(super) fn refresh_role(&mut self) {
        let learner = self.effective().membership.is_learner(self.id);
        match self.role {
            Role::Follower if learner => self.role = Role::Learner,
            Role::Learner if !learner => self.role = Role::Follower,
            _ => {}
        }
    }
}
