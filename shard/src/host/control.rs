//! The control work of a poller: groups joining and leaving it, the start of a group a split
//! created (built off the poller's task, so a poller never waits on it), and the state of its
//! groups for the host's callers.

use super::group_info::{group_info, Configurations};
use super::group_state::GroupState;
use super::poller::{Poller, PollerMsg, Removal};
use super::{build_group, GroupInfo, Reservation};
use crate::kv::SplitEffect;
use flotilla_raft::{Fatal, GroupId};
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;
use tracing::{error, info};

impl Poller {
    /// A group joins this poller (created, recovered or split off).
    pub(super) fn on_add(&mut self, g: Box<GroupState>) {
        let id = g.id;
        self.groups.insert(id, g);
        self.awake.insert(id);
        self.dirty.insert(id);
        // Now, not at the round's end: the caller is answered before that, and a summary
        // read then must not be a shared one from before.
        self.shared.info_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A group leaves this poller (destroyed) if `still` holds of its state now: it stops,
    /// nothing of it stays queued, and it leaves the registry in the same step (so no caller
    /// that stops waiting halfway leaves a registered group that no poller runs, and no request
    /// reaches the poller for it after).
    pub(super) fn on_remove(&mut self, id: GroupId, still: super::DestroyGuard) -> Removal {
        let Some(g) = self.groups.get(&id) else { return Removal::Missing };
        if !still(&group_info(g, &mut Configurations::default(), true)) {
            return Removal::Kept;
        }
        let entry = self.shared.registry.write().ok().and_then(|mut r| r.groups.remove(&id));
        self.stop_group(id);
        entry.map_or(Removal::Missing, Removal::Removed)
    }

    /// Stops group `id` and forgets everything this poller holds of it (once the registry no
    /// longer lists it among the running groups).
    pub(super) fn stop_group(&mut self, id: GroupId) {
        if let Some(mut g) = self.groups.remove(&id) {
            g.core.stop(Fatal::Shutdown);
            // Now (see `on_add`).
            self.shared.info_generation.fetch_add(1, Ordering::AcqRel);
        }
        self.awake.remove(&id);
        self.dirty.remove(&id);
        self.sm_ready.remove(&id);
        // Its applied indexes say nothing of a replica created again under the same id (whose
        // state is written in later batches): it must not hear them as durable.
        self.durable_waits.retain(|(_, gid, _, _)| *gid != id);
        self.quiesce_pending.remove(&id);
    }

    /// The state of every group on this poller (`only`: of those groups, the ones here).
    /// In id order; `matched` is filled only for groups asked for by name (a map per led
    /// group, which only a merge's step reads, was a good part of the cost of a summary of all).
    pub(super) fn info(&self, only: Option<&[GroupId]>) -> Vec<GroupInfo> {
        let mut confs = Configurations::default();
        match only {
            Some(ids) => {
                ids.iter().filter_map(|id| self.groups.get(id)).map(|g| group_info(g, &mut confs, true)).collect()
            }
            None => {
                // Ordered here, by reference: the host merges the pollers' runs instead of
                // sorting whole summaries.
                let mut groups: Vec<&GroupState> = self.groups.values().map(|g| &**g).collect();
                groups.sort_unstable_by_key(|g| g.id);
                groups.into_iter().map(|g| group_info(g, &mut confs, false)).collect()
            }
        }
    }

    /// A split was applied (its descriptors are durable): start the new group on this node,
    /// formed with the source's configuration, on whichever poller it belongs to. A group of
    /// that id already here (the node was told to create it, or it restarted) is left alone.
    /// The group is recovered from the store by a task of its own (reads on the blocking
    /// pool), not in the poller's round: the poller goes on driving its other groups meanwhile.
    /// `reservation` was taken when the split was prepared (`None`: the group already existed).
    pub(super) fn start_split_group(&mut self, source: GroupId, split: SplitEffect, reservation: Option<Reservation>) {
        let id = split.new_group;
        let Some(reservation) = reservation else {
            info!(%source, group = %id, "split: the new group already exists here");
            return;
        };
        let shared = self.shared.clone();
        let task = self.shared.runtime.spawn(async move {
            if shared.stopping.load(Ordering::Acquire) {
                // Its descriptor is durable: the next start of the host forms it.
                return;
            }
            // Its state (a snapshot point) was written with the split: it recovers like any group.
            match build_group(&shared, id, split.range, None).await {
                Ok((state, entry)) => {
                    let poller = entry.poller;
                    // Added to its poller's mailbox before the reservation ends, so no other
                    // start can slip in between; messages for it queue behind the addition.
                    let (tx, _rx) = oneshot::channel();
                    if shared.pollers[poller].send(PollerMsg::Add(Box::new(state), tx)).is_err() {
                        // The poller stopped: not registered, formed at the next start.
                        return;
                    }
                    if let Err(e) = reservation.complete(entry) {
                        error!(%source, group = %id, error = %e, "split: cannot register the new group");
                    }
                    info!(%source, group = %id, "split: new group started");
                }
                Err(e) => {
                    // Its descriptor is durable: the next start of the host forms it.
                    error!(%source, group = %id, error = %e, "split: cannot start the new group now");
                }
            }
        });
        if let Ok(mut starts) = self.shared.split_starts.lock() {
            starts.retain(|t| !t.is_finished());
            starts.push(task);
        }
    }
}
