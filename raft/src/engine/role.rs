//! The role a node plays in its group, carrying the state only that role has: the votes a
//! (pre-)candidate collected, the leader's replication, reads and timers. Holding that state
//! inside the role makes "leader iff leader state" true by construction, and a leader-only
//! path gets its state from one match instead of a role check plus an `expect`.

use super::*;

/// The role and its own state. [`Role`] is its public, state-less summary.
#[derive(Debug)]
pub(super) enum RoleState {
    /// Follows a leader (or waits for one).
    Follower,
    /// Receives the log; never campaigns, never counts in quorums.
    Learner,
    /// Asking for pre-votes, without a new term yet.
    PreCandidate {
        /// Voters other than this node that granted the pre-vote.
        granted: BTreeSet<NodeId>,
    },
    /// Campaigning in a new term.
    Candidate {
        /// Voters other than this node that granted the vote.
        granted: BTreeSet<NodeId>,
    },
    /// The leader. Boxed: it is large, and most replicas of a host of many groups follow.
    Leader(Box<LeaderState>),
}

impl RoleState {
    /// A follower, or a learner if the configuration says this node is one.
    pub(super) fn following(learner: bool) -> RoleState {
        if learner {
            RoleState::Learner
        } else {
            RoleState::Follower
        }
    }

    /// The public summary.
    pub(super) fn role(&self) -> Role {
        match self {
            RoleState::Follower => Role::Follower,
            RoleState::Learner => Role::Learner,
            RoleState::PreCandidate { .. } => Role::PreCandidate,
            RoleState::Candidate { .. } => Role::Candidate,
            RoleState::Leader(_) => Role::Leader,
        }
    }

    /// Whether this node follows (or waits for) a leader: a follower or a learner.
    pub(super) fn is_following(&self) -> bool {
        matches!(self, RoleState::Follower | RoleState::Learner)
    }

    /// The leader's state, if this node leads.
    pub(super) fn leader(&self) -> Option<&LeaderState> {
        match self {
            RoleState::Leader(l) => Some(l),
            _ => None,
        }
    }

    /// The leader's state, if this node leads.
    pub(super) fn leader_mut(&mut self) -> Option<&mut LeaderState> {
        match self {
            RoleState::Leader(l) => Some(l),
            _ => None,
        }
    }

    /// Whether this node leads.
    pub(super) fn is_leader(&self) -> bool {
        matches!(self, RoleState::Leader(_))
    }
}

/// State only a leader has.
#[derive(Debug)]
pub(super) struct LeaderState {
    /// Replication state of every other member (voters and learners of any configuration
    /// in the log).
    // Boxed: a B-tree leaf has room for eleven values, so inline the two or four of a small
    // group cost a whole leaf of progress records, kilobytes per led group on a node of many.
    pub(super) progress: BTreeMap<NodeId, Box<Progress>>,
    /// Index of the blank entry that opened this term; reads wait until it is committed.
    pub(super) noop_index: LogIndex,
    /// Linearizable reads and the heartbeat rounds that confirm them (and the lease).
    pub(super) reads: Reads,
    /// When the next heartbeat round is due.
    pub(super) heartbeat_at: Millis,
    /// When the commit notices held back (`Config::commit_notice_delay_ms`) go, if any are.
    pub(super) commit_notice_at: Option<Millis>,
    /// When to check that a quorum was heard from since the last check.
    pub(super) check_quorum_at: Millis,
    /// A leadership transfer in progress; proposals are refused meanwhile.
    pub(super) transfer: Option<Transfer>,
    /// Command bytes proposed this term and not committed yet, by the last index of each
    /// proposal (bounded by `Config::uncommitted_bytes_max`).
    pub(super) uncommitted: VecDeque<(LogIndex, u64)>,
    /// Their sum.
    pub(super) uncommitted_bytes: u64,
    /// The last heartbeat round started before the group last woke from quiescence, if it
    /// ever did: it goes quiet again only once every live follower answered a later one.
    pub(super) woke_after_round: Option<u64>,
}

impl Engine {
    /// A follower becomes a learner (or back) as its configuration changes.
    pub(super) fn refresh_role(&mut self) {
        if self.role.is_following() {
            self.role = RoleState::following(self.effective().membership.is_learner(self.id));
        }
    }
}
