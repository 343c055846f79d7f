//! The meta client: this node's copy of the meta state (the placement [`MetaState`]) and the
//! one way to change it, [`Node::meta_exec`], which runs an operation on the meta leader (here,
//! or forwarded to it): ReadIndex → the state at that point → the op on a copy → one
//! transaction writing the records it changed, guarded by the header read (`crate::meta`). On
//! the meta leader it also holds the nodes' live reports, which are kept in memory rather than
//! written to the meta group.

use super::{Node, NodeError, LIVE_REPORT_AGE_MAX_MS, META_OP_TIMEOUT_MS, PEER_REQUEST_TIMEOUT_MS};
use crate::meta::change_log::ChangeLog;
use crate::meta::leader_op::{work_out, WorkedOut};
use crate::meta::map_history::MapHistory;
use crate::meta::records::{change_parts, conversion_parts, without_leftovers, writes_bytes, MetaWrite};
use crate::meta::{self, StoredMeta, META_GROUP, META_STATE_KEY};
use crate::peer_wire::{MetaOp, MetaUpdate, PeerRequest, PeerResponse, WholeState};
use crate::placement::{MetaState, NodeId, NodeReport, ReportChange};
use crate::raft::{RaftError, ReadMode, Role};
use crate::shard::{HostError, KvCommand, KvResponse, TXN_BYTES_MAX, TXN_WRITES_MAX};
use crate::wire::AdminResponse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::warn;

/// Most bytes of changes sent to a node refreshing its copy; past it the whole state is sent.
const META_CHANGES_BYTES_MAX: usize = 1 << 20;

/// A node's report as the meta leader holds it: shared with the states of the ops run since
/// (copied only when changed), when it came, and the stored revision whose map it was cut to
/// (0: not known).
type LiveReport = (Arc<NodeReport>, Instant, u64);

/// The meta client's state, one lock per concern.
#[derive(Default)]
pub(super) struct MetaClient {
    /// This node's copy of the meta state and its revision; it never goes back in time
    /// ([`Node::set_view`]).
    view: RwLock<(u64, Arc<MetaState>)>,
    /// The stored state this node last read from its meta replica, or last wrote as meta
    /// leader: used again while the replica's header is the one it was read or written with,
    /// so that an op reads no record when nothing changed since the last one.
    stored: Mutex<Option<Arc<StoredMeta>>>,
    /// The changes this node wrote as meta leader, for nodes asking for the changes since
    /// their revision ([`PeerRequest::MetaSince`]).
    changes: Mutex<ChangeLog>,
    /// Which shards changed as this node's view moved, for clients asking for the changes
    /// since their copy's revision (`Request::MapSince`).
    pub(super) map_history: Mutex<MapHistory>,
    /// This node's copy as the meta leader's answers to [`Node::meta_follow`] brought it up to
    /// date (reports left out): what the next changes are applied to.
    followed: Mutex<Option<StoredMeta>>,
    /// The meta leader as the last answer to [`Node::meta_follow`] named it: asked first next
    /// time.
    follow_peer: Mutex<Option<NodeId>>,
    /// Which known node [`Node::meta_follow`] asks next when it knows no meta leader: kept
    /// across calls, so that successive calls try every node rather than the same one.
    follow_turn: std::sync::atomic::AtomicUsize,
    /// Serializes this node's meta read-modify-writes (fewer guard failures).
    lock: tokio::sync::Mutex<()>,
    /// When each node's report last reached this node as meta leader (`admin nodes`' report
    /// ages). Unlike `live`, not cleared when a new tenure starts.
    report_seen: Mutex<HashMap<NodeId, Instant>>,
    /// Reports received as meta leader: kept in memory, not written to the meta group (they
    /// change every second); a new meta leader has them again within one report interval.
    /// With each, the stored revision whose map it was cut to (0: not known).
    live: Mutex<HashMap<NodeId, LiveReport>>,
    /// Each node's whole report as of the last report change this node took as meta leader,
    /// with its number ([`MetaOp::ReportChange`]): what the node's next change applies to.
    /// Unlike `live`, as the node sent it (not cut to the map's shards, nor changed by ops).
    /// Cleared with `live` when a new tenure starts.
    report_bases: Mutex<HashMap<NodeId, (u64, NodeReport)>>,
    /// Since when this node leads the meta group (see [`Node::leads_meta`]).
    leader_since: Mutex<Option<Instant>>,
    /// A revision this node's next meta change must be written above (0: none): set by an
    /// unsafe recovery forcing the meta group onto this node, cleared by the first change
    /// written above it.
    revision_floor: AtomicU64,
    /// Serializes retirements of this node's meta replica (unsafe recovery's drop and the
    /// removed-replica check), so that one kept never removes the marker of one carried out.
    pub(super) retire_lock: tokio::sync::Mutex<()>,
}

impl MetaClient {
    /// When each node's report last reached this node as meta leader.
    pub(super) fn report_times(&self) -> HashMap<NodeId, Instant> {
        self.report_seen.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Node {
    /// The node's (possibly lagging) copy of the meta state.
    pub fn meta_view(&self) -> Arc<MetaState> {
        self.inner.meta.view.read().map(|v| v.1.clone()).unwrap_or_default()
    }

    /// [`Node::meta_view`] if it is the state at `revision` (`None`: another, or unreadable).
    fn view_at(&self, revision: u64) -> Option<Arc<MetaState>> {
        self.inner.meta.view.read().ok().filter(|v| v.0 == revision).map(|v| v.1.clone())
    }

    /// The revision of [`Node::meta_view`]: every change of the meta state bumps it.
    pub fn meta_revision(&self) -> u64 {
        self.inner.meta.view.read().map(|v| v.0).unwrap_or_default()
    }

    /// Replaces the view, unless `state` is of an older revision than the one held (a lagging
    /// meta replica read after a newer state came from the meta leader): a view never goes
    /// back in time. The same revision replaces it (the reports laid over it may be newer).
    pub(super) fn set_view(&self, revision: u64, state: Arc<MetaState>) {
        // Held across the change of view, so that steps are recorded in the order the view
        // took them (readers of the view do not wait on it).
        let mut history = self.inner.meta.map_history.lock().ok();
        let before = match self.inner.meta.view.write() {
            Ok(mut v) if revision >= v.0 => std::mem::replace(&mut *v, (revision, state.clone())),
            _ => return,
        };
        // Outside the view's lock: walks of both maps (none when the map was not changed).
        if let (true, Some(h)) = (revision > before.0, history.as_mut()) {
            let differing = before.1.map.differing(&state.map);
            let progress = match h.progress_at(before.0) {
                Some(p) => crate::client::map_progress_after(p, &before.1.map, &state.map, &differing),
                None => crate::client::map_progress(&state.map),
            };
            h.record(before.0, revision, differing, progress);
        }
    }

    /// [`Node::meta_view`] with its revision, read together.
    pub fn meta_view_with_revision(&self) -> (u64, Arc<MetaState>) {
        self.inner.meta.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Re-reads the local replica of the meta state, if this node holds one: its header, and
    /// its records only if the header changed since they were last read.
    pub(crate) async fn refresh_local_view(&self) -> bool {
        if !self.inner.host.hosts(META_GROUP) {
            return false;
        }
        let header = match self.inner.meta_sm.get(META_STATE_KEY.to_vec()).await {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "cannot read the local meta state");
                return false;
            }
        };
        match self.stored_at(header).await {
            // The view already holds this state (the meta leader's view gets each report as
            // its op runs): a copy of a large map five times a second is not free.
            Ok(stored) if stored.revision() == self.meta_revision() && stored.revision() > 0 => true,
            Ok(stored) => {
                let mut s = stored.state.clone();
                // On the meta leader, the reports it holds in memory, as meta ops see them.
                if self.meta_tenure().is_some() {
                    self.overlay_live_reports(&mut s);
                }
                self.set_view(stored.revision(), Arc::new(s));
                true
            }
            Err(e) => {
                warn!(error = %e, "local meta state does not decode");
                false
            }
        }
    }

    /// The stored state whose header is `header` (as just read from the local replica): the
    /// one held if it has that header, else read from the replica's records (one consistent
    /// read of the meta range), which may by then be newer than `header`.
    async fn stored_at(&self, header: Option<Vec<u8>>) -> Result<Arc<StoredMeta>, String> {
        if let Ok(held) = self.inner.meta.stored.lock() {
            if let Some(s) = held.as_ref().filter(|s| s.guard == header) {
                return Ok(s.clone());
            }
        }
        let read = self.inner.host.store().blocking(|s| Ok(meta::read_stored_blocking(s))).await;
        let stored = Arc::new(read.map_err(|e| e.to_string())??);
        self.keep_stored(stored.clone());
        Ok(stored)
    }

    /// Drops the stored state held for the next op: parts of a change were written and its
    /// header may not land, so the next op reads the range again (and deletes what they left:
    /// parts leave the header, and so the held state's guard, unchanged).
    /// Makes this node's next meta change go above `floor` (see `MetaClient::revision_floor`).
    pub(super) fn hold_revision_floor(&self, floor: u64) {
        self.inner.meta.revision_floor.fetch_max(floor, Ordering::SeqCst);
    }

    pub(super) fn forget_stored(&self) {
        if let Ok(mut held) = self.inner.meta.stored.lock() {
            *held = None;
        }
    }

    /// Holds `stored` for the next op, unless the one held is newer.
    fn keep_stored(&self, stored: Arc<StoredMeta>) {
        if let Ok(mut held) = self.inner.meta.stored.lock() {
            if held.as_ref().is_none_or(|h| h.revision() <= stored.revision()) {
                *held = Some(stored);
            }
        }
    }

    /// Runs `op` on the meta leader (here, or forwarded) and returns the state after it (and
    /// its revision) and the op's answer. The state is this node's view brought to the op's
    /// revision: run here, it carries the live reports; forwarded, only the changes since the
    /// view crossed the network and it carries none (see [`Node::meta_exec_as`]).
    pub async fn meta_exec(
        &self,
        op: MetaOp,
        forwarded: bool,
    ) -> Result<(u64, Arc<MetaState>, AdminResponse), NodeError> {
        self.meta_exec_as(op, forwarded, MetaAnswer::View).await
    }

    /// [`Node::meta_exec`], with the state after the op as `want` asks for it.
    pub(super) async fn meta_exec_as(
        &self,
        op: MetaOp,
        forwarded: bool,
        want: MetaAnswer,
    ) -> Result<(u64, Arc<MetaState>, AdminResponse), NodeError> {
        let deadline = Instant::now() + Duration::from_millis(META_OP_TIMEOUT_MS);
        let mut peer_turn = 0usize;
        let mut last_err = String::from("no meta leader reachable");
        while Instant::now() < deadline {
            if *self.inner.shutdown.borrow() {
                return Err(NodeError::MetaUnavailable("the node is shutting down".into()));
            }
            let target = if self.inner.host.hosts(META_GROUP) {
                match self.meta_local(&op).await {
                    Ok(r) => {
                        self.saw_report(&op);
                        return Ok(r);
                    }
                    Err(MetaTry::Refused(e)) => return Err(NodeError::Meta(e)),
                    Err(MetaTry::Leader(Some(l))) if l != self.inner.id && !forwarded => Some(l),
                    // A forwarded op is not forwarded again: the sender retries.
                    Err(MetaTry::Leader(l)) if forwarded => {
                        return Err(NodeError::MetaUnavailable(format!(
                            "node {} is not the meta leader ({l:?})",
                            self.inner.id
                        )))
                    }
                    Err(MetaTry::Leader(_)) => {
                        last_err = "the meta group has no leader yet".into();
                        None
                    }
                    Err(MetaTry::Retry(e)) => {
                        last_err = e;
                        None
                    }
                }
            } else if forwarded {
                return Err(NodeError::MetaUnavailable("this node holds no meta replica".into()));
            } else {
                // No local replica: first the meta leader the last answer named (a node that
                // forwards the op has no changes of its own to answer with, and sends the whole
                // state), then the nodes we know of in turn.
                let known = self.known_peers();
                if known.is_empty() {
                    return Err(NodeError::Meta("no peers known".into()));
                }
                peer_turn += 1;
                let named = self.meta_leader_named().filter(|_| peer_turn == 1);
                Some(named.unwrap_or(known[peer_turn % known.len()]))
            };
            if let Some(to) = target {
                // To the leader: final hop. To any node (we hold no meta replica): it may forward
                // once to its leader.
                let hop = self.inner.host.hosts(META_GROUP);
                let forwarded = match want {
                    MetaAnswer::View => self.forward_since(to, &op, hop).await,
                    MetaAnswer::WithReports => self.forward_whole(to, &op, hop).await,
                };
                match forwarded {
                    Ok(r) => return Ok(r),
                    Err(MetaTry::Refused(e)) => return Err(NodeError::Meta(e)),
                    Err(MetaTry::Retry(e)) => last_err = e,
                    Err(MetaTry::Leader(l)) => last_err = format!("node {to} does not lead the meta group ({l:?})"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(NodeError::MetaUnavailable(format!("timed out: {last_err}")))
    }

    /// Sends `req` to node `to` and decodes the answer (a refusal is an answer too).
    async fn ask_peer(&self, to: NodeId, req: &PeerRequest) -> Result<PeerResponse, PeerFailure> {
        let timeout = Duration::from_millis(PEER_REQUEST_TIMEOUT_MS);
        let bytes = self.inner.transport.request(to, req.encode(), timeout).await;
        let bytes = bytes.map_err(|e| PeerFailure::Unreachable(format!("node {to}: {e}")))?;
        PeerResponse::decode(&bytes).map_err(|e| PeerFailure::Garbled(format!("node {to}: {e}")))
    }

    /// Runs `op` on node `to` (the meta leader, or a node that forwards it there) and brings
    /// this node's view to the state after it with what `to` answers: the changes since the
    /// view's revision, or the whole state when `to` does not hold them all.
    async fn forward_since(
        &self,
        to: NodeId,
        op: &MetaOp,
        forwarded: bool,
    ) -> Result<(u64, Arc<MetaState>, AdminResponse), MetaTry> {
        let (since, view) = self.meta_view_with_revision();
        let req = PeerRequest::MetaSince { op: op.clone(), since: (since > 0).then_some(since), forwarded };
        match self.ask_peer(to, &req).await {
            Ok(PeerResponse::MetaSince { revision, update, leader, answer }) => {
                self.set_follow_peer(leader.filter(|l| *l != self.inner.id));
                match self.view_after(to, since, &view, revision, update).await {
                    Ok(state) => Ok((revision, state, answer)),
                    Err(e) => {
                        warn!(node = to.0, error = %e, "the changes since this node's view did not apply: reading the meta state whole");
                        self.read_whole_after(to, revision, answer, forwarded).await
                    }
                }
            }
            Ok(PeerResponse::Refused(e)) => Err(MetaTry::Refused(e)),
            Ok(other) => Err(MetaTry::Retry(format!("node {to} answered {other:?}"))),
            Err(PeerFailure::Garbled(e)) => Err(MetaTry::Retry(e)),
            Err(PeerFailure::Unreachable(e)) => {
                // A leader named by an earlier answer that cannot be reached: not asked first
                // next time.
                if self.meta_leader_named() == Some(to) {
                    self.set_follow_peer(None);
                }
                Err(MetaTry::Retry(e))
            }
        }
    }

    /// After an op that ran on node `to` (state at `revision`, answered `answer`) whose changes
    /// did not apply to this node's view: the state read whole from `to`. The op's answer
    /// stands; sent again, the op would be judged a second time. Without the whole state, the
    /// view as it is.
    async fn read_whole_after(
        &self,
        to: NodeId,
        revision: u64,
        answer: AdminResponse,
        forwarded: bool,
    ) -> Result<(u64, Arc<MetaState>, AdminResponse), MetaTry> {
        let read = PeerRequest::MetaSince { op: MetaOp::Read, since: None, forwarded };
        let Ok(PeerResponse::MetaSince { revision: at, update, .. }) = self.ask_peer(to, &read).await else {
            return Ok((revision, self.meta_view(), answer));
        };
        let state = self.view_after(to, 0, &MetaState::default(), at, update).await;
        let state = state.map_err(|e| MetaTry::Retry(format!("meta state from node {to}: {e}")))?;
        Ok((at.max(revision), state, answer))
    }

    /// Runs `op` on node `to`, as [`Node::forward_since`] does, and is answered with the meta
    /// leader's whole state, the live reports of every node in it.
    async fn forward_whole(
        &self,
        to: NodeId,
        op: &MetaOp,
        forwarded: bool,
    ) -> Result<(u64, Arc<MetaState>, AdminResponse), MetaTry> {
        let req = PeerRequest::Meta { op: op.clone(), forwarded };
        match self.ask_peer(to, &req).await {
            Ok(PeerResponse::Meta { state, answer }) => {
                let bytes = self.assemble_from(to, state).await;
                let bytes = bytes.map_err(|e| MetaTry::Retry(format!("meta state from node {to}: {e}")))?;
                let (revision, s) = meta::decode_view(&bytes).map_err(MetaTry::Refused)?;
                let s = Arc::new(s);
                self.set_view(revision, s.clone());
                Ok((revision, s, answer))
            }
            Ok(PeerResponse::Refused(e)) => Err(MetaTry::Refused(e)),
            Ok(other) => Err(MetaTry::Retry(format!("meta leader {to} answered {other:?}"))),
            Err(PeerFailure::Garbled(e) | PeerFailure::Unreachable(e)) => Err(MetaTry::Retry(e)),
        }
    }

    /// The state at (at least) `revision` that `update`, from node `from`, makes of `view`, this
    /// node's view at revision `since`: it becomes the view, unless a newer one came meanwhile.
    /// Nodes' reports are not in it.
    async fn view_after(
        &self,
        from: NodeId,
        since: u64,
        view: &MetaState,
        revision: u64,
        update: MetaUpdate,
    ) -> Result<Arc<MetaState>, String> {
        let (reached, state) = match update {
            MetaUpdate::Whole(whole) => {
                self.inner.stats.meta_updates_whole.fetch_add(1, Ordering::Relaxed);
                meta::decode_view(&self.assemble_from(from, whole).await?)?
            }
            MetaUpdate::Changes(changes) => {
                self.inner.stats.meta_updates_changes.fetch_add(1, Ordering::Relaxed);
                let mut copy = StoredMeta::followed(since, view.clone());
                changes.iter().try_for_each(|c| copy.apply(c))?;
                (copy.revision(), copy.state)
            }
        };
        if reached < revision {
            return Err(format!("node {from} brought the state to revision {reached}, not {revision}"));
        }
        // The copy that [`Node::meta_follow`] brings up to date is now at least this far: its
        // next request asks for the changes since here, not the whole state again.
        if let Ok(mut followed) = self.inner.meta.followed.lock() {
            if followed.as_ref().is_none_or(|f| f.revision() < reached) {
                *followed = Some(StoredMeta::followed(reached, state.clone()));
            }
        }
        let state = Arc::new(state);
        self.set_view(reached, state.clone());
        Ok(state)
    }

    /// Notes when a node's report reached this node as meta leader.
    fn saw_report(&self, op: &MetaOp) {
        if let Some(node) = op.reporter() {
            if let Ok(mut m) = self.inner.meta.report_seen.lock() {
                m.insert(node, Instant::now());
            }
        }
    }

    /// The whole report a [`MetaOp::ReportChange`] makes of the one held for its node, as a
    /// [`MetaOp::Report`] to run, at its last part; `None` at an earlier part, which is only
    /// held (see [`take_report_change`]).
    fn report_from_change(&self, op: &MetaOp) -> Result<Option<MetaOp>, String> {
        let MetaOp::ReportChange { node, addr, base, seq, change, last } = op else {
            return Err("not a report change".into());
        };
        let mut held = self.inner.meta.report_bases.lock().map_err(|_| "report bases poisoned".to_string())?;
        let report = take_report_change(&mut held, *node, *base, *seq, change)?;
        Ok(last.then(|| MetaOp::report(*node, addr.clone(), report)))
    }

    /// The changes this node wrote as meta leader from revision `since` to `to`, if it holds
    /// every one and they are small enough to send (else the asker is sent the whole state).
    pub(super) fn meta_changes(&self, since: u64, to: u64) -> Option<Vec<Vec<MetaWrite>>> {
        let changes = self.inner.meta.changes.lock().ok()?.between(since, to)?;
        let bytes: usize = changes.iter().map(|(_, w)| writes_bytes(w)).sum();
        (bytes <= META_CHANGES_BYTES_MAX).then(|| changes.into_iter().map(|(_, w)| w.as_ref().clone()).collect())
    }

    /// Runs `op` on the meta leader, as [`Node::meta_exec`] does, for a caller that needs only
    /// this node's view brought up to date (not the reports): a node without the meta leader's
    /// replica asks for the changes since its view's revision, and is sent the whole state only
    /// when the node answering does not hold them all (a new meta leader, a view too old).
    pub(super) async fn meta_follow(&self, op: MetaOp) -> Result<AdminResponse, NodeError> {
        let deadline = Instant::now() + Duration::from_millis(META_OP_TIMEOUT_MS);
        let mut last_err = String::from("no meta leader reachable");
        while Instant::now() < deadline {
            if *self.inner.shutdown.borrow() {
                return Err(NodeError::MetaUnavailable("the node is shutting down".into()));
            }
            if self.inner.host.hosts(META_GROUP) {
                match self.meta_local(&op).await {
                    Ok((_, _, answer)) => {
                        self.saw_report(&op);
                        return Ok(answer);
                    }
                    Err(MetaTry::Refused(e)) => return Err(NodeError::Meta(e)),
                    Err(MetaTry::Leader(Some(l))) if l != self.inner.id => self.set_follow_peer(Some(l)),
                    Err(MetaTry::Leader(_)) => {
                        last_err = "the meta group has no leader yet".into();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(MetaTry::Retry(e)) => {
                        last_err = e;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let held = self.meta_leader_named();
            let to = match held {
                Some(p) => p,
                None => {
                    let known = self.known_peers();
                    if known.is_empty() {
                        return Err(NodeError::Meta("no peers known".into()));
                    }
                    known[self.inner.meta.follow_turn.fetch_add(1, Ordering::Relaxed) % known.len()]
                }
            };
            let since = self.inner.meta.followed.lock().ok().and_then(|f| f.as_ref().map(StoredMeta::revision));
            let req = PeerRequest::MetaSince { op: op.clone(), since, forwarded: false };
            match self.ask_peer(to, &req).await {
                Ok(PeerResponse::MetaSince { revision, update, leader, answer }) => {
                    self.set_follow_peer(leader.filter(|l| *l != self.inner.id));
                    match self.assemble_update_from(to, update).await.and_then(|u| self.follow(revision, u)) {
                        Ok(()) => return Ok(answer),
                        // The copy is dropped: the next request asks for the whole state.
                        Err(e) => last_err = format!("meta update from {to}: {e}"),
                    }
                }
                Ok(PeerResponse::Refused(e)) => return Err(NodeError::Meta(e)),
                Ok(other) => {
                    self.set_follow_peer(None);
                    last_err = format!("node {to} answered {other:?}");
                }
                Err(PeerFailure::Garbled(e) | PeerFailure::Unreachable(e)) => {
                    self.set_follow_peer(None);
                    last_err = e;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(NodeError::MetaUnavailable(format!("timed out: {last_err}")))
    }

    /// The meta state as the meta leader holds it now, without its whole state crossing the
    /// network when it need not: read here if this node leads the meta group, else asked of
    /// the leader as the changes since this node's view ([`PeerRequest::MetaSince`]), applied
    /// to a copy of the view (the whole state only if the leader's log of changes does not
    /// reach that far). Reports are not part of it. For a check that must not trust a view
    /// that may lag (a meta replica catching up).
    pub(super) async fn meta_read_fresh(&self) -> Result<Arc<MetaState>, NodeError> {
        if self.meta_tenure().is_some() {
            return self.meta_exec(MetaOp::Read, false).await.map(|(_, s, _)| s);
        }
        // Any node will do when no leader is known: it runs the read on the leader.
        let leader = self.meta_leader_elsewhere().await.or_else(|| self.meta_leader_named());
        let Some(to) = leader.or_else(|| self.known_peers().first().copied()) else {
            return Err(NodeError::MetaUnavailable("no meta leader or peer known".into()));
        };
        let since = self.meta_revision();
        match self.forward_since(to, &MetaOp::Read, false).await {
            // Older than this node's view: a node that lost its meta group's history answered.
            Ok((revision, _, _)) if revision < since => {
                Err(NodeError::MetaUnavailable(format!("node {to} sent revision {revision}, before {since}")))
            }
            Ok((_, state, _)) => Ok(state),
            Err(MetaTry::Refused(e)) => Err(NodeError::Meta(e)),
            Err(MetaTry::Retry(e)) => Err(NodeError::MetaUnavailable(e)),
            Err(MetaTry::Leader(l)) => Err(NodeError::MetaUnavailable(format!("node {to} does not lead ({l:?})"))),
        }
    }

    /// The meta leader as the last answer from the meta group named it, if any.
    pub(super) fn meta_leader_named(&self) -> Option<NodeId> {
        self.inner.meta.follow_peer.lock().ok().and_then(|p| *p)
    }

    fn set_follow_peer(&self, peer: Option<NodeId>) {
        if let Ok(mut p) = self.inner.meta.follow_peer.lock() {
            *p = peer;
        }
    }

    /// Brings this node's followed copy, and its view, to `revision` with `update`. A change
    /// that does not apply drops the copy.
    fn follow(&self, revision: u64, update: MetaUpdate) -> Result<(), String> {
        let mut followed = self.inner.meta.followed.lock().map_err(|_| "meta copy lock poisoned")?;
        match update {
            MetaUpdate::Whole(WholeState::Parts { .. }) => {
                return Err("a whole state in parts, not assembled".into());
            }
            MetaUpdate::Whole(WholeState::Inline(bytes)) => {
                self.inner.stats.meta_updates_whole.fetch_add(1, Ordering::Relaxed);
                let (rev, state) = meta::decode_view(&bytes)?;
                // An answer to an earlier request may arrive after a newer one.
                if followed.as_ref().is_none_or(|f| f.revision() <= rev) {
                    *followed = Some(StoredMeta::followed(rev, state.clone()));
                }
                self.set_view(rev, Arc::new(state));
            }
            MetaUpdate::Changes(changes) => {
                self.inner.stats.meta_updates_changes.fetch_add(1, Ordering::Relaxed);
                let Some(copy) = followed.as_mut() else {
                    return Err("changes came for a copy this node does not hold".into());
                };
                // Changes the copy holds already (from the answer to a request made at the same
                // time, by the reporter or the reconciler) are skipped.
                let applied = changes.iter().try_for_each(|c| copy.apply(c));
                if let Err(e) = applied.and_then(|()| match copy.revision() >= revision {
                    true => Ok(()),
                    false => Err(format!("changes reach revision {}, not {revision}", copy.revision())),
                }) {
                    *followed = None;
                    return Err(e);
                }
                // Most answers carry no change: the view is copied only when there was one.
                if copy.revision() != self.meta_revision() {
                    self.set_view(copy.revision(), Arc::new(copy.state.clone()));
                }
            }
        }
        Ok(())
    }

    /// Other nodes this node knows of, in id order.
    fn known_peers(&self) -> Vec<NodeId> {
        let mut known: Vec<NodeId> = self.meta_view().nodes.keys().copied().collect();
        known.extend(self.inner.config.peers.iter().map(|p| p.0));
        if let Ok(p) = self.inner.extra_peers.lock() {
            known.extend(p.iter().copied());
        }
        known.sort();
        known.dedup();
        known.retain(|n| *n != self.inner.id);
        known
    }

    async fn meta_local(&self, op: &MetaOp) -> Result<(u64, Arc<MetaState>, AdminResponse), MetaTry> {
        let _guard = self.inner.meta.lock.lock().await;
        let g = META_GROUP;
        let mut whole_report = None;
        loop {
            // The read makes this node's replica current (linearizably) and gives the header
            // the state must have.
            let header =
                self.inner.host.get(g, META_STATE_KEY.to_vec(), ReadMode::ReadIndex).await.map_err(meta_try)?;
            let stored = self.stored_at(header).await.map_err(MetaTry::Refused)?;
            // Taken once this node is known to lead, and once only: the loop may run again.
            if whole_report.is_none() && matches!(op, MetaOp::ReportChange { .. }) {
                if let Some(done) = self.unchanged_report(op, &stored) {
                    return Ok(done);
                }
                match self.report_from_change(op).map_err(MetaTry::Refused)? {
                    Some(whole) => whole_report = Some(whole),
                    // A part before the last: held, nothing run. Answered with the state as
                    // stored (the asker follows it), as a report that changes nothing would be.
                    None => {
                        let view = self.view_at(stored.revision()).unwrap_or_else(|| Arc::new(stored.state.clone()));
                        return Ok((stored.revision(), view, AdminResponse::Done("report part held".into())));
                    }
                }
            }
            let op = whole_report.as_ref().unwrap_or(op);
            if let Some(done) = self.report_in_memory(op, &stored, whole_report.is_some()) {
                return Ok(done);
            }
            let held_floor = self.inner.meta.revision_floor.load(Ordering::SeqCst);
            let floor = op.revision_floor().max(held_floor);
            let balancer = &self.inner.config.balancer;
            let worked =
                work_out(&stored, op, balancer, floor, |s| self.overlay_live_reports(s)).map_err(MetaTry::Refused)?;
            let WorkedOut { next, answer, writes, after } = worked;
            self.inner.stats.meta_ops.fetch_add(1, Ordering::Relaxed);
            // The live reports follow what the op did to them (a report replaces its node's; a
            // split drops the split shard's size and split key).
            if let Ok(mut live) = self.inner.meta.live.lock() {
                if let MetaOp::Report { node, .. } = op {
                    live.insert(*node, (Arc::default(), Instant::now(), 0));
                }
                for (node, (report, _, cut_to)) in live.iter_mut() {
                    if let Some(info) = next.nodes.get(node) {
                        *report = info.report.clone();
                        // As the op left it: the next report is taken whole again.
                        *cut_to = 0;
                    }
                }
            }
            // Nothing stored changed (a read, or a report that changes reports only).
            if writes.is_empty() {
                let next = Arc::new(next);
                self.set_view(stored.revision(), next.clone());
                return Ok((stored.revision(), next, answer));
            }
            // Converting format 1: every record first, in parts if they are too many for one
            // transaction, each guarded by the format-1 header; the header last.
            let mut writes = writes;
            // Written in parts before this one: followers are then sent the whole state.
            let mut in_parts = stored.whole;
            if stored.whole {
                // Read after this op's linearizable read: the range holds whatever an earlier
                // conversion cut short committed, and this one deletes what it does not rewrite.
                let existing = self.inner.host.store().blocking(|s| Ok(meta::record_keys_blocking(s))).await;
                let existing = existing.map_err(|e| MetaTry::Refused(e.to_string()))?.map_err(MetaTry::Refused)?;
                let all = without_leftovers(writes, existing);
                let mut parts = conversion_parts(all, TXN_WRITES_MAX, TXN_BYTES_MAX - 4096);
                writes = parts.pop().unwrap_or_default();
                if !self.write_parts(parts, stored.guard.clone()).await? {
                    continue;
                }
            } else {
                // A change too large for one transaction (a bootstrap of many shards): the new
                // shards' records first, invisible until the header lands with the last part.
                let mut parts = change_parts(writes, stored.header.next_shard_id, TXN_WRITES_MAX, TXN_BYTES_MAX - 4096)
                    .map_err(MetaTry::Refused)?;
                writes = parts.pop().unwrap_or_default();
                in_parts = !parts.is_empty();
                if !self.write_parts(parts, stored.guard.clone()).await? {
                    continue;
                }
            }
            self.count_meta_write(&writes);
            let writes = Arc::new(writes);
            let txn = KvCommand::Txn {
                guard: META_STATE_KEY.to_vec(),
                expected: stored.guard.clone(),
                writes: writes.as_ref().clone(),
            };
            self.inner.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
            let result = self.inner.host.write(g, txn).await;
            if in_parts && !matches!(result, Ok(KvResponse::Done { .. })) {
                self.forget_stored();
            }
            match result {
                Ok(KvResponse::Done { .. }) => {
                    let revision = after.revision();
                    if held_floor > 0 && revision > held_floor {
                        let _ = self.inner.meta.revision_floor.compare_exchange(
                            held_floor,
                            0,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                    }
                    // The last part of a change written in parts holds only some of it: nodes
                    // following changes are sent the whole state once instead.
                    if let Ok(mut log) = self.inner.meta.changes.lock() {
                        match in_parts {
                            false => log.push(revision, writes),
                            true => *log = ChangeLog::default(),
                        }
                    }
                    self.keep_stored(Arc::new(after));
                    let next = Arc::new(next);
                    self.set_view(revision, next.clone());
                    return Ok((revision, next, answer));
                }
                // Another change got in since the read: read again.
                Ok(KvResponse::CasFailed { .. }) => continue,
                Ok(KvResponse::Refused(e)) => return Err(MetaTry::Refused(e)),
                Ok(
                    KvResponse::Split { .. }
                    | KvResponse::OutOfRange
                    | KvResponse::Frozen { .. }
                    | KvResponse::Merged { .. },
                ) => return Err(MetaTry::Refused("an unexpected answer to the meta transaction".into())),
                Err(HostError::TooLarge(e)) => {
                    return Err(MetaTry::Refused(format!("the change is too large for one meta transaction: {e}")))
                }
                Err(e) => return Err(meta_try(e)),
            }
        }
    }

    /// A report that cannot change what is stored, taken in memory: no copy of the state, no
    /// diff of it (with thousands of shards, each costs milliseconds, and every node reports
    /// every second). A report changes the stored state only by registering its node's new
    /// address, ending a leader transfer to its node, or confirming or clearing tombstones
    /// (`MetaCommand::Heartbeat`); with none of those possible it only replaces the live
    /// report, as the full op would. `None`: run the op in full.
    /// `numbered`: the report is the node's numbered one ([`MetaOp::ReportChange`]'s whole),
    /// whose live copy a change of no shard may then keep (`unchanged_report`); a plain
    /// [`MetaOp::Report`] (a node's announcement) is not.
    fn report_in_memory(
        &self,
        op: &MetaOp,
        stored: &StoredMeta,
        numbered: bool,
    ) -> Option<(u64, Arc<MetaState>, AdminResponse)> {
        let MetaOp::Report { node, addr, .. } = op else { return None };
        let s = &stored.state;
        let revision = stored.revision();
        // The answer carries the state at the stored revision: the view must be that one.
        if !quiet_report(*node, addr, stored) {
            return None;
        }
        let view = self.view_at(revision)?;
        let mut report = op.full_report()?;
        report.leading.retain(|sh| s.map.get(*sh).is_some());
        report.applied.retain(|sh, _| s.map.get(*sh).is_some());
        report.shard_load.retain(|sh, _| s.map.get(*sh).is_some());
        let cut_to = if numbered { revision } else { 0 };
        self.inner.meta.live.lock().ok()?.insert(*node, (Arc::new(report), Instant::now(), cut_to));
        self.inner.stats.meta_ops.fetch_add(1, Ordering::Relaxed);
        Some((revision, view, AdminResponse::Done("reported".into())))
    }

    /// A report change that changes no shard, taken where [`Node::report_in_memory`] would
    /// take its whole report, onto the copies already held: the node's numbered report and its
    /// live copy cut to the same map take the new totals and time, and nothing is copied
    /// (with thousands of shards the whole report is a large copy, and an idle node sends one
    /// every second). `None`: take it the general way.
    fn unchanged_report(&self, op: &MetaOp, stored: &StoredMeta) -> Option<(u64, Arc<MetaState>, AdminResponse)> {
        let MetaOp::ReportChange { node, addr, base: Some(base), seq, change, last: true } = op else { return None };
        let revision = stored.revision();
        if !change.is_empty() || !quiet_report(*node, addr, stored) {
            return None;
        }
        let view = self.view_at(revision)?;
        let mut bases = self.inner.meta.report_bases.lock().ok()?;
        let mut live = self.inner.meta.live.lock().ok()?;
        let (held_seq, held) = bases.get_mut(node).filter(|(s, _)| s == base)?;
        let (cut, at, cut_to) = live.get_mut(node).filter(|(_, _, r)| *r == revision)?;
        // The live copy is shared with the states of the ops run since it was taken: it is copied
        // once after an op, then changed in place.
        for r in [held, Arc::make_mut(cut)] {
            r.requests_per_s = change.requests_per_s;
            r.led_requests_per_s = change.led_requests_per_s;
        }
        *held_seq = *seq;
        (*at, *cut_to) = (Instant::now(), revision);
        self.inner.stats.meta_ops.fetch_add(1, Ordering::Relaxed);
        Some((revision, view, AdminResponse::Done("reported".into())))
    }

    /// Counts the records and bytes of one meta transaction's writes.
    fn count_meta_write(&self, writes: &[MetaWrite]) {
        self.inner.stats.meta_write_records.fetch_add(writes.len() as u64, Ordering::Relaxed);
        self.inner.stats.meta_write_bytes.fetch_add(writes_bytes(writes) as u64, Ordering::Relaxed);
    }

    /// Writes the first parts of a change written in parts (a format-1 conversion, a change
    /// with many new shards), each guarded by the header `guard` the change was computed from;
    /// `false` if the guard failed (another change got in: read again). Unless every part
    /// landed, the held stored state is dropped ([`Node::forget_stored`]).
    async fn write_parts(&self, parts: Vec<Vec<MetaWrite>>, guard: Option<Vec<u8>>) -> Result<bool, MetaTry> {
        for writes in parts {
            self.count_meta_write(&writes);
            let txn = KvCommand::Txn { guard: META_STATE_KEY.to_vec(), expected: guard.clone(), writes };
            let failed = match self.inner.host.write(META_GROUP, txn).await {
                Ok(KvResponse::Done { .. }) => continue,
                Ok(KvResponse::CasFailed { .. }) => Ok(false),
                Ok(other) => Err(MetaTry::Refused(format!("writing a meta change in parts: {other:?}"))),
                Err(HostError::TooLarge(e)) => Err(MetaTry::Refused(format!("writing a meta change in parts: {e}"))),
                Err(e) => Err(meta_try(e)),
            };
            self.forget_stored();
            return failed;
        }
        Ok(true)
    }

    /// Replaces every node's report with the one this node received as meta leader within
    /// [`LIVE_REPORT_AGE_MAX_MS`], or with an empty report (nothing known) if none: reports
    /// are not stored in the meta group.
    fn overlay_live_reports(&self, state: &mut MetaState) {
        let Ok(live) = self.inner.meta.live.lock() else { return };
        let max_age = Duration::from_millis(LIVE_REPORT_AGE_MAX_MS);
        for (node, info) in state.nodes.iter_mut() {
            info.report = match live.get(node) {
                Some((report, at, _)) if at.elapsed() < max_age => report.clone(),
                _ => Arc::default(),
            };
        }
    }

    /// How long this node has led the meta group without a break, as of the last check
    /// ([`Node::leads_meta`]); `None` if it does not lead it.
    pub(super) fn meta_tenure(&self) -> Option<Duration> {
        self.inner.meta.leader_since.lock().ok().and_then(|s| s.map(|at| at.elapsed()))
    }

    /// The reports this node holds as meta leader, as it took them (cut to the map's shards);
    /// on other nodes, what it held when it last led, or nothing.
    pub fn live_reports(&self) -> HashMap<NodeId, NodeReport> {
        self.inner
            .meta
            .live
            .lock()
            .map(|l| l.iter().map(|(n, (r, _, _))| (*n, r.as_ref().clone())).collect())
            .unwrap_or_default()
    }

    /// Whether this node leads the meta group; records when it started to (a new meta leader
    /// holds no live reports yet, and forgets the ones of an earlier tenure).
    pub(super) async fn leads_meta(&self) -> bool {
        let leads = self.inner.host.group_info_of(META_GROUP).await.is_ok_and(|i| i.role == Role::Leader);
        if let Ok(mut since) = self.inner.meta.leader_since.lock() {
            match (leads, since.is_some()) {
                (true, false) => {
                    *since = Some(Instant::now());
                    if let Ok(mut live) = self.inner.meta.live.lock() {
                        live.clear();
                    }
                    if let Ok(mut bases) = self.inner.meta.report_bases.lock() {
                        bases.clear();
                    }
                }
                (false, true) => *since = None,
                _ => {}
            }
        }
        leads
    }
}

/// Whether node `node`'s report, from `addr`, can change nothing stored in `stored`: no
/// address to register, no leader transfer to it to end, no tombstone to confirm or clear, and
/// no move whose steps are judged on the reports laid over the leader's view (only the full op
/// lays them there).
fn quiet_report(node: NodeId, addr: &str, stored: &StoredMeta) -> bool {
    let s = &stored.state;
    !stored.whole
        && stored.leftovers.is_empty()
        && s.moves.is_empty()
        && s.nodes.get(&node).is_some_and(|n| n.addr == addr)
        && !s.transfers.values().any(|t| *t == node)
        && s.tombstones.is_empty()
}

/// Takes node `node`'s report change `change`, which applies to its report numbered `base`
/// (`None`: an empty one) and makes report `seq`, onto the reports held in `held`: the whole
/// report it makes, held from now on as that node's. Refused when `held` has another report
/// of the node, or none (the node then sends its whole report); what was held of the node is
/// dropped then, so that only a whole report follows.
pub(super) fn take_report_change(
    held: &mut HashMap<NodeId, (u64, NodeReport)>,
    node: NodeId,
    base: Option<u64>,
    seq: u64,
    change: &ReportChange,
) -> Result<NodeReport, String> {
    // A part or change sent before the one held (a late copy of a retried request), of the
    // node's same run (the numbers' upper half): dropped, what is held stays.
    if held.get(&node).is_some_and(|(s, _)| s >> 32 == seq >> 32 && seq <= *s) {
        return Err(format!("report {seq} of node {node} is older than the one held here: dropped"));
    }
    let mut report = match (base, held.remove(&node)) {
        (None, _) => NodeReport::default(),
        (Some(b), Some((s, r))) if s == b => r,
        (Some(b), had) => {
            return Err(format!(
                "report change of node {node} applies to report {b}, but {} is held here: send the whole report",
                had.map_or("none".to_string(), |(s, _)| s.to_string())
            ))
        }
    };
    report.apply_change(change);
    held.insert(node, (seq, report.clone()));
    Ok(report)
}

/// What a caller of [`Node::meta_exec_as`] needs of the meta state after its op, when the
/// op is forwarded to the meta leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MetaAnswer {
    /// This node's view brought to the op's revision by the changes since the view's own
    /// (what crosses the network is what changed; the whole state only when the leader does
    /// not hold every change). Nodes' reports are not in it.
    View,
    /// The meta leader's state with every node's live report in it (who leads each shard,
    /// applied indexes): the whole state crosses the network.
    WithReports,
}

/// Why a request to a peer brought no answer.
enum PeerFailure {
    /// It did not reach the peer, or no answer came back in time.
    Unreachable(String),
    /// The answer did not decode.
    Garbled(String),
}

/// How one try of a meta op on a node ended.
enum MetaTry {
    /// Not the meta leader; the leader if known.
    Leader(Option<NodeId>),
    /// Refused by the op or state: final.
    Refused(String),
    /// Transient failure.
    Retry(String),
}

fn meta_try(e: HostError) -> MetaTry {
    match e {
        HostError::Raft(RaftError::NotLeader { leader }) => MetaTry::Leader(leader),
        other => MetaTry::Retry(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{LogIndex, ShardId};

    fn report(applied: &[(u64, u64)]) -> NodeReport {
        NodeReport {
            applied: applied.iter().map(|(s, a)| (ShardId(*s), LogIndex(*a))).collect(),
            ..NodeReport::default()
        }
    }

    #[test]
    fn changes_are_taken_only_onto_the_report_they_were_made_from() {
        let mut held = HashMap::new();
        let n = NodeId(2);
        let (r1, r2, r3) = (report(&[(1, 5), (2, 5)]), report(&[(1, 6), (2, 5)]), report(&[(2, 9)]));
        let whole = |r: &NodeReport| NodeReport::default().change_to(r);
        // Whole, then two changes in order.
        assert_eq!(take_report_change(&mut held, n, None, 10, &whole(&r1)), Ok(r1.clone()));
        assert_eq!(take_report_change(&mut held, n, Some(10), 11, &r1.change_to(&r2)), Ok(r2.clone()));
        assert_eq!(take_report_change(&mut held, n, Some(11), 12, &r2.change_to(&r3)), Ok(r3.clone()));
        // The same change again (an answer lost, the op sent twice), or a late copy of an
        // earlier whole report: dropped, not applied twice, and what is held stays.
        let again = take_report_change(&mut held, n, Some(11), 12, &r2.change_to(&r3));
        assert!(again.is_err_and(|e| e.contains("older")));
        assert!(take_report_change(&mut held, n, None, 10, &whole(&r1)).is_err_and(|e| e.contains("older")));
        assert_eq!(held.get(&n).map(|(s, r)| (*s, r.clone())), Some((12, r3.clone())));
        // A change onto a report not held (one lost on the way): refused, and nothing is held
        // any more, so no later change is taken either until a whole report.
        assert!(take_report_change(&mut held, n, Some(13), 14, &r3.change_to(&r1))
            .is_err_and(|e| e.contains("send the whole report")));
        assert!(take_report_change(&mut held, n, Some(12), 15, &r3.change_to(&r1)).is_err());
        assert_eq!(take_report_change(&mut held, n, None, 16, &whole(&r1)), Ok(r1.clone()));
        // A change for a node never heard of is refused.
        assert!(take_report_change(&mut held, NodeId(3), Some(16), 17, &r1.change_to(&r2)).is_err());
        // A whole report of the node's next run (a restart: other upper bits) is taken even
        // if its numbers are lower.
        let next_run = 1 << 32;
        assert_eq!(take_report_change(&mut held, n, None, next_run, &whole(&r2)), Ok(r2.clone()));
        assert_eq!(held.get(&n).map(|(s, r)| (*s, r.clone())), Some((next_run, r2)));
    }
}
