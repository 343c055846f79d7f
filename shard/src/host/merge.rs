//! Merges on a host (see [`crate::merge`] for the protocol): a group whose merge entry waits
//! for its source, the source parked (stopped, its state kept) so that nothing of it is
//! written after the absorbing batch deletes it, and a frozen source retired once its target
//! installed a snapshot taken after the merge.

use super::poller::{Poller, PollerMsg};
use super::registry::GroupEntry;
use super::Shared;
use crate::kv::{KeyRange, MergeWait};
use crate::store::Op;
use flotilla_raft::{GroupId, LogId};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a merge entry waits before its source is looked at again.
const MERGE_RETRY: Duration = Duration::from_millis(20);
/// A merge entry still waiting after this long is logged (again every such interval).
const MERGE_WAIT_WARN: Duration = Duration::from_secs(10);

/// A group stopped for another to absorb: out of the registry's groups (no request or message
/// reaches it), its range still claimed (no create or snapshot takes its keys), its state on
/// disk until the absorbing batch deletes it.
pub(crate) struct Parked {
    /// The group that absorbs it.
    pub(crate) into: GroupId,
    /// Its registry entry as it was.
    pub(crate) entry: GroupEntry,
}

/// What became of a `PollerMsg::Park`.
pub(crate) enum ParkOutcome {
    /// Stopped and parked.
    Parked,
    /// Not on this poller (not started yet, or gone).
    Missing,
    /// Its state is not the freeze the merge names yet.
    NotYet(String),
}

/// A merge entry that waits, as its poller holds it.
pub(crate) struct Waiting {
    pub(crate) wait: MergeWait,
    /// Since when (for the warning).
    pub(crate) since: Instant,
    /// When the wait was last logged.
    pub(crate) warned: Option<Instant>,
}

impl Poller {
    /// Group `gid`'s apply stopped at a merge entry (`wait`): the group's state-machine work
    /// pauses, and a task parks the source (if it is not yet) and tells this poller to try
    /// again a little later.
    pub(super) fn wait_for_merge_source(&mut self, gid: GroupId, wait: MergeWait) {
        let Some(g) = self.groups.get_mut(&gid) else { return };
        let now = Instant::now();
        let (since, warned) = match &g.merge_wait {
            Some(w) if w.wait.index == wait.index => (w.since, w.warned),
            _ => (now, None),
        };
        let warn_now = now.duration_since(since) >= MERGE_WAIT_WARN
            && warned.is_none_or(|at| now.duration_since(at) >= MERGE_WAIT_WARN);
        if warn_now {
            warn!(group = %gid, source = %wait.source, index = %wait.index, why = %wait.why,
                waited_s = now.duration_since(since).as_secs(), "a merge entry still waits for its source on this node");
        }
        let warned = if warn_now { Some(now) } else { warned };
        let (source, id, freeze) = (wait.source, wait.id, wait.freeze);
        g.merge_wait = Some(Box::new(Waiting { wait, since, warned }));
        // Paused: nothing after the merge entry may apply before it.
        g.sm_busy = true;
        let (shared, tx) = (self.shared.clone(), self.tx.clone());
        self.shared.runtime.spawn(async move {
            if !shared.is_parked(source, gid) {
                park(&shared, source, gid, id, Some(freeze)).await;
            }
            tokio::time::sleep(MERGE_RETRY).await;
            let _ = tx.send(PollerMsg::MergeRetry(gid));
        });
    }

    /// Time to try group `gid`'s waiting merge entry again.
    pub(super) fn on_merge_retry(&mut self, gid: GroupId) {
        let Some(g) = self.groups.get_mut(&gid) else { return };
        if g.merge_wait.is_none() {
            return;
        }
        g.sm_busy = false;
        if !g.sm_queue.is_empty() {
            self.sm_ready.insert(gid);
        }
        self.dirty.insert(gid);
    }

    /// Parks group `id` for `into` to absorb, if its state is the freeze the merge names
    /// (frozen for merge `merge` into `into` at `freeze`, applied through it; with no freeze
    /// named, frozen into `into` at all: `into` installs a snapshot taken after the merge) and
    /// no state-machine work of it is running or queued (an installation in flight would write
    /// the group's range after the absorbing batch): stopped and out of the registry's groups
    /// in one step, its range still claimed.
    pub(super) fn on_park(&mut self, id: GroupId, into: GroupId, merge: u64, freeze: Option<LogId>) -> ParkOutcome {
        let now = self.shared.now();
        let Some(g) = self.groups.get_mut(&id) else { return ParkOutcome::Missing };
        let state = g.sm.merge_state();
        if g.sm_busy || !g.sm_queue.is_empty() {
            return ParkOutcome::NotYet(format!("group {id} has state-machine work in flight"));
        }
        let Some(freeze) = freeze else {
            return match state.frozen.is_some_and(|f| f.into == into) {
                true => self.park_now(id, into),
                false => ParkOutcome::NotYet(format!("group {id} is not frozen into {into}")),
            };
        };
        let frozen = state.frozen.is_some_and(|f| f.id == merge && f.into == into && f.at == freeze);
        let applied = g.core.engine().applied();
        if !frozen || applied < freeze.index {
            // The merge entry asking is committed, and it was proposed only once the freeze
            // was: a replica holding the freeze entry may apply it without hearing so from
            // its own leader, which may be gone already (absorbed on its node).
            if g.core.engine().committed() < freeze.index {
                g.core.learn_committed(now, freeze);
                self.dirty.insert(id);
            }
            return ParkOutcome::NotYet(format!(
                "group {id} holds {:?}, applied through {applied}; the merge needs its freeze {freeze}",
                state.frozen
            ));
        }
        let outcome = self.park_now(id, into);
        if matches!(outcome, ParkOutcome::Parked) {
            info!(group = %id, %into, merge, %freeze, "merge: source stopped for its absorption");
        }
        outcome
    }

    /// Stops group `id` and moves its registry entry to the parked ones, for `into`.
    fn park_now(&mut self, id: GroupId, into: GroupId) -> ParkOutcome {
        let parked = self.shared.registry.write().ok().and_then(|mut r| {
            let entry = r.groups.remove(&id)?;
            r.parked.insert(id, Parked { into, entry });
            Some(())
        });
        if parked.is_none() {
            return ParkOutcome::Missing;
        }
        self.stop_group(id);
        ParkOutcome::Parked
    }

    /// Before group `gid` installs a snapshot over `range`, wider than its own: the sources
    /// frozen into it inside `range` that still run here are asked to park (an installation of
    /// theirs in flight would land after `gid`'s). Whether none runs any more.
    pub(super) fn park_covered_sources(&mut self, gid: GroupId, range: &KeyRange) -> bool {
        let running: Vec<GroupId> = match self.shared.registry.read() {
            Ok(r) => r
                .groups
                .iter()
                .filter(|(_, e)| {
                    absorbed_by_snapshot(e.sm.merge_state().frozen.map(|f| f.into), gid, &e.sm.range(), range)
                })
                .map(|(id, _)| *id)
                .collect(),
            Err(_) => return false,
        };
        for source in &running {
            let (shared, source) = (self.shared.clone(), *source);
            self.shared.runtime.spawn(async move { park(&shared, source, gid, 0, None).await });
        }
        running.is_empty()
    }

    /// Group `gid` installed a snapshot over `range`: sources frozen into it inside that range
    /// (registered or parked) are retired, their keys being the snapshot's now.
    pub(super) fn retire_absorbed_sources(&mut self, gid: GroupId, range: &KeyRange) {
        let sources: Vec<GroupId> = match self.shared.registry.read() {
            Ok(r) => {
                let registered = r.groups.iter().filter(|(_, e)| {
                    absorbed_by_snapshot(e.sm.merge_state().frozen.map(|f| f.into), gid, &e.sm.range(), range)
                });
                let parked = r
                    .parked
                    .iter()
                    .filter(|(_, p)| absorbed_by_snapshot(Some(p.into), gid, &p.entry.sm.range(), range));
                registered.map(|(id, _)| *id).chain(parked.map(|(id, _)| *id)).collect()
            }
            Err(_) => return,
        };
        for source in sources {
            let shared = self.shared.clone();
            self.shared.runtime.spawn(retire_absorbed(shared, source, gid));
        }
    }

    /// An apply batch absorbed `sources` (written): their parked replicas are gone for good.
    pub(super) fn forget_absorbed(&mut self, gid: GroupId, sources: Vec<GroupId>) {
        for source in sources {
            let parked = self.shared.registry.write().ok().and_then(|mut r| r.parked.remove(&source));
            if let Some(p) = parked {
                info!(group = %gid, %source, "merge: source absorbed");
                // Its snapshot work, if any, ends; nothing of it writes after this.
                self.shared.runtime.spawn(async move { p.entry.sm.retire().await });
            }
        }
    }
}

impl Shared {
    /// `gid`'s range `own`, widened to the right by the sources frozen for it to absorb
    /// (registered or parked) that start where it ends, one after another: what a snapshot
    /// of `gid` taken after those merges may cover here.
    pub(crate) fn range_with_frozen_sources(&self, gid: GroupId, own: &KeyRange) -> KeyRange {
        let Ok(r) = self.registry.read() else { return own.clone() };
        let sources: Vec<KeyRange> = r
            .groups
            .values()
            .filter(|e| e.sm.merge_state().frozen.is_some_and(|f| f.into == gid))
            .map(|e| e.sm.range())
            .chain(r.parked.values().filter(|p| p.into == gid).map(|p| p.entry.sm.range()))
            .collect();
        let mut out = own.clone();
        while let Some(end) = out.end.clone() {
            match sources.iter().find(|s| s.start == end) {
                Some(s) => out.end = s.end.clone(),
                None => break,
            }
        }
        out
    }

    /// Whether group `source` is parked here for `into` to absorb.
    pub(crate) fn is_parked(&self, source: GroupId, into: GroupId) -> bool {
        self.registry.read().is_ok_and(|r| r.parked.get(&source).is_some_and(|p| p.into == into))
    }
}

/// Asks the poller of `source` to park it for `into`: for merge `merge` at `freeze`, or with
/// no freeze named, because `into` is about to install a snapshot taken after their merge.
async fn park(shared: &Arc<Shared>, source: GroupId, into: GroupId, merge: u64, freeze: Option<LogId>) {
    let poller = shared.registry.read().ok().and_then(|r| r.groups.get(&source).map(|e| e.poller));
    let Some(poller) = poller else { return };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if shared.pollers[poller].send(PollerMsg::Park { group: source, into, merge, freeze, reply: tx }).is_err() {
        return;
    }
    if let Ok(ParkOutcome::NotYet(why)) = rx.await {
        tracing::debug!(%source, %into, why = %why, "merge: source not ready to park");
    }
}

/// Group `source`, frozen into `into`, after `into` installed a snapshot taken after the merge
/// (its range covers the source's): the snapshot holds the source's keys as the merged group
/// has them, so the source's replica here is stopped and its state and descriptor deleted (not
/// its data, which is the snapshot's now).
pub(crate) async fn retire_absorbed(shared: Arc<Shared>, source: GroupId, into: GroupId) {
    let parked = shared.registry.write().ok().and_then(|mut r| r.parked.remove(&source)).map(|p| p.entry);
    let entry = match parked {
        Some(e) => Some(e),
        None => {
            let poller = shared.registry.read().ok().and_then(|r| r.groups.get(&source).map(|e| e.poller));
            let Some(poller) = poller else { return };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let still: super::DestroyGuard = Box::new(|_| true);
            if shared.pollers[poller].send(PollerMsg::Remove(source, still, tx)).is_err() {
                return;
            }
            match rx.await {
                Ok(super::poller::Removal::Removed(e)) => Some(e),
                _ => None,
            }
        }
    };
    let Some(entry) = entry else { return };
    entry.sm.retire().await;
    match shared.store.write(Op::group_deletes(source).into(), true).await {
        Ok(()) => info!(%source, %into, "merge: source retired after its target's snapshot"),
        Err(e) => warn!(%source, %into, error = %e, "merge: cannot delete the absorbed source's state"),
    }
}

/// Whether `other`'s replica here, whose range is `range`, is a source frozen into `into` that
/// `into`'s snapshot over `snapshot_range` reaches: not a conflict, but a replica to retire once
/// the snapshot is installed. Reaching is enough: a snapshot of `into` that goes past the
/// source's start was taken after the merge (and `into` may have split inside the source's
/// keys since; their new group catches up here by a snapshot of its own).
pub(crate) fn absorbed_by_snapshot(
    other_frozen_into: Option<GroupId>,
    into: GroupId,
    range: &KeyRange,
    snapshot_range: &KeyRange,
) -> bool {
    other_frozen_into == Some(into) && snapshot_range.overlaps(range)
}
