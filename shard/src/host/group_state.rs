//! [`GroupState`]: one group as a poller holds it — its `GroupCore`, its log and state
//! machine, and the poller's bookkeeping around them (quiet or awake, writes in flight,
//! state-machine work queued).

use super::sm_queue::SmQueue;
use crate::kv::KvStateMachine;
use crate::log::RocksLog;
use flotilla_raft::{GroupCore, GroupId, LogIndex, NodeId, Term};
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_INCARNATION: AtomicU64 = AtomicU64::new(1);

/// Entries a leader asked to load for a follower, with the term it asked in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Load {
    pub(super) peer: NodeId,
    pub(super) from: LogIndex,
    pub(super) to: LogIndex,
    pub(super) bytes_max: usize,
    pub(super) term: Term,
}

/// One group on a poller.
pub(crate) struct GroupState {
    pub(super) id: GroupId,
    pub(super) core: GroupCore,
    pub(super) log: RocksLog,
    pub(super) sm: KvStateMachine,
    /// Not ticking (see quiescence in the module documentation).
    pub(super) quiet: bool,
    /// Consecutive ticks the group was found idle (leader).
    pub(super) idle_ticks: u32,
    /// Rounds with log writes of this group submitted and not yet durable.
    pub(super) writes_in_flight: usize,
    /// Loads waiting for the writes before them to be durable.
    pub(super) deferred_loads: Vec<Load>,
    /// Followers with a load reading on the blocking pool: one at a time each, so a follower's
    /// loads complete in the order the engine asked for them (it matches answers by order).
    pub(super) loading_peers: BTreeSet<NodeId>,
    /// Loads waiting for their follower's load before them.
    pub(super) loads_waiting: VecDeque<Load>,
    /// Tells this copy of the group from an earlier one of the same id (removed, added
    /// again): answers to the earlier copy's loads are dropped.
    pub(super) incarnation: u64,
    /// State-machine work (apply, build, install) waiting its turn; one runs at a time.
    pub(super) sm_queue: SmQueue,
    pub(super) sm_busy: bool,
    /// The leader it went quiet under (followers), for waking when that node goes down.
    pub(super) quiet_leader: Option<NodeId>,
    /// The snapshot being offered whose range this node cannot take: its chunks are dropped
    /// (answering them would make the sender resend at once), and its first chunk is judged
    /// again when resent, as the node's groups change.
    pub(super) refused_snapshot: Option<u64>,
    /// The highest index of a committed configuration without this node that a member told
    /// of (`RemovedNotice`): the node decides from it whether to delete this replica.
    pub(super) removed_at: Option<LogIndex>,
    /// A merge entry waiting for its source here (the state machine paused meanwhile). Boxed:
    /// rare, and each of a node's thousands of groups would carry its space inline.
    pub(super) merge_wait: Option<Box<super::merge::Waiting>>,
    /// The fingerprint of this group's summary as of the last time the host's generation of
    /// summaries counted it (`group_info::fingerprint`).
    pub(super) published: u64,
}

impl GroupState {
    pub(crate) fn new(id: GroupId, core: GroupCore, log: RocksLog, sm: KvStateMachine) -> GroupState {
        GroupState {
            id,
            core,
            log,
            sm,
            quiet: false,
            idle_ticks: 0,
            writes_in_flight: 0,
            deferred_loads: Vec::new(),
            loading_peers: BTreeSet::new(),
            loads_waiting: VecDeque::new(),
            incarnation: NEXT_INCARNATION.fetch_add(1, Ordering::Relaxed),
            sm_queue: SmQueue::default(),
            sm_busy: false,
            quiet_leader: None,
            refused_snapshot: None,
            removed_at: None,
            merge_wait: None,
            published: 0,
        }
    }

    /// Gives back the memory this group's buffers kept after their last use (see
    /// [`GroupCore::release_idle_memory`]). Called when the group goes quiet, and after each
    /// round that drives it while quiet (the messages that straddle the moment it went quiet
    /// fill some buffers again).
    pub(super) fn release_idle_memory(&mut self) {
        self.deferred_loads.shrink_to_fit();
        self.loads_waiting.shrink_to_fit();
        self.core.release_idle_memory();
    }

    pub(super) fn busy(&self) -> bool {
        self.writes_in_flight > 0
            || self.sm_busy
            || !self.sm_queue.is_empty()
            || !self.deferred_loads.is_empty()
            || !self.loading_peers.is_empty()
            || !self.loads_waiting.is_empty()
            || self.core.has_waiters()
    }
}
