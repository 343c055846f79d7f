//! The reconciler (every [`RECONCILE_MS`]): makes the replicas this node holds, and the groups
//! it leads, follow the map. It creates the replicas the map places here, deletes those whose
//! group's committed configuration no longer counts this node (`placement::lifecycle`), and on
//! the groups it leads carries out splits, learners, voter changes and leader transfers,
//! asking for each at most once per [`RECONFIG_RETRY_MS`].

use super::bootstrap_forming::Forming;
use super::reconcile_rounds::{full_round_due, groups_to_look_at, Reconciled, Seen};
use super::{BootstrapConfig, Node, RECONCILE_MS, RECONFIG_RETRY_MS};
use crate::meta::{shard_range, META_GROUP};
use crate::peer_wire::MetaOp;
use crate::placement::{
    replica_fate, DeleteReason, LocalReplica, LogIndex as PLogIndex, MetaState, ReplicaFate, ReplicaRole,
    ShardDescriptor, ShardMap,
};
use crate::raft::{GroupId, Membership, NodeId, Role};
use crate::shard::{GroupInfo, HostError, KeyRange, KvCommand, KvResponse};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// A change a group's leader asks of its group, rate-limited per group by [`due_now`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Reconfig {
    /// Propose the split entry that starts group `new`.
    Split { new: GroupId },
    /// Add this node as a learner (a move's target, or a voter the group lacks).
    AddLearner(NodeId),
    /// Stop counting this learner (the map dropped it: an aborted move).
    RemoveLearner(NodeId),
    /// Change the voters to exactly these (joint consensus).
    Voters(BTreeSet<NodeId>),
    /// Hand leadership to this node.
    Transfer(NodeId),
    /// A step of merge `.0` (see `merges.rs`).
    Merge(u64, super::merges::MergeStep),
}

/// When each change was last asked for, per group.
pub(super) type ReconfigTimes = HashMap<(GroupId, Reconfig), Instant>;

impl Node {
    /// The reconciler task: [`Node::reconcile`] every [`RECONCILE_MS`] until shutdown.
    pub(super) async fn run_reconciler(self, mut stop: watch::Receiver<bool>) {
        loop {
            if !self.inner.reconciler_paused.load(std::sync::atomic::Ordering::Acquire) {
                self.reconcile().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(RECONCILE_MS)) => {}
                _ = stop.changed() => break,
            }
        }
    }

    pub(super) async fn reconcile(&self) {
        if let Ok(mut times) = self.inner.reconfig.lock() {
            forget_expired(&mut times, Instant::now());
        }
        if !self.refresh_local_view().await {
            // No local meta replica: the changes since this node's copy, from the meta leader.
            if let Err(e) = self.meta_follow(MetaOp::Read).await {
                debug!(error = %e, "cannot read the meta state");
            }
        }
        // A full round costs every group here and every shard of the map; in between, a
        // round of what changed costs only what moved (`reconcile_rounds.rs`).
        let (revision, view) = self.meta_view_with_revision();
        let host = &self.inner.host;
        let seen = Seen { revision, groups: host.group_count(), generation: host.info_generation() };
        let forming = self.inner.bootstrap_forming.lock().map(|f| f.open()).unwrap_or(true);
        let last = self.inner.reconciled.lock().ok().and_then(|l| l.clone());
        let full = full_round_due(last.as_ref(), seen, forming, Instant::now());
        // Merges in progress move on every round: their steps wait on the groups (a freeze
        // reaching every replica), which the checks below do not watch. A group frozen for a
        // merge the view no longer holds (to be thawed or removed) is looked for in full
        // rounds only: that reads every group's merge state.
        // On a task of their own: a step may wait on a group (a merge entry applying) for as
        // long as a request may, and the rest of the round must not wait with it.
        if (!view.merges.is_empty() || (full && host.any_frozen()))
            && !self.inner.merges_running.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let node = self.clone();
            let view = view.clone();
            tokio::spawn(async move {
                // Reset however the task ends (a panic included): merges must not stop here.
                struct Running(Node);
                impl Drop for Running {
                    fn drop(&mut self) {
                        self.0.inner.merges_running.store(false, std::sync::atomic::Ordering::Release);
                    }
                }
                let running = Running(node);
                running.0.drive_merges(&view).await;
            });
        }
        let (me, mut last) = (self.inner.id, last);
        if !full {
            let Some(l) = last.filter(|_| !forming) else { return };
            self.learn_addresses(&view);
            let (groups, waiting) = groups_to_look_at(&l, &view, me);
            if groups.is_empty() {
                return;
            }
            let (busy, to_create) = self.reconcile_changed(&view, &groups).await;
            let done = l.after_changed_round(&view.map, busy, waiting, to_create);
            // A replica to create (a move's target): the full round that creates it comes in
            // this tick, not the next, if its spacing allows.
            if !(to_create && full_round_due(Some(&done), seen, forming, Instant::now())) {
                if let Ok(mut l) = self.inner.reconciled.lock() {
                    *l = Some(done);
                }
                return;
            }
            // The full round below records its bookkeeping on top of this round's.
            last = Some(done);
        }
        self.inner.stats.reconcile_full_rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let (busy, groups) = self.reconcile_full(&view).await;
        // Merges under way, and groups frozen by a merge that is over (thawed or removed by
        // `drive_merges`, whose steps may fail and be asked again), count as work.
        let busy = busy || !self.meta_view().merges.is_empty() || host.any_frozen();
        let took = started.elapsed().as_micros() as u64;
        self.inner.stats.reconcile_full_micros.fetch_add(took, std::sync::atomic::Ordering::Relaxed);
        let done = Reconciled::after_full_round(last, seen, started, busy, &view.map, groups);
        if let Ok(mut last) = self.inner.reconciled.lock() {
            *last = Some(done);
        }
    }

    /// Tells the transport where the nodes of `state` listen (those of higher ids: a pair's
    /// connection is opened by its lower id).
    pub(super) fn learn_addresses(&self, state: &MetaState) {
        for (id, info) in &state.nodes {
            if *id > self.inner.id {
                if let Ok(a) = info.addr.parse::<SocketAddr>() {
                    let _ = self.inner.transport.set_peer_addr(*id, a);
                }
            }
        }
    }

    /// A full round: every group here against every shard of the map. Whether it did or
    /// asked for anything, or stopped early (so that the next one comes at the usual pace,
    /// not only when something changed), and the groups it found work for (`None`: it stopped
    /// before it looked at them).
    async fn reconcile_full(&self, state: &Arc<MetaState>) -> (bool, Option<BTreeSet<GroupId>>) {
        let me = self.inner.id;
        self.learn_addresses(state);
        if state.map.is_empty() {
            return (true, None);
        }
        let host = &self.inner.host;
        let ids = host.groups();
        // Ranges are read (a lock each) only when the map places a shard here that is not.
        let missing = {
            let here: BTreeSet<GroupId> = ids.iter().copied().collect();
            state.map.shards().any(|d| d.replica(me).is_some() && !here.contains(&d.id))
        };
        let local: BTreeMap<GroupId, Option<KeyRange>> =
            ids.into_iter().map(|g| (g, if missing { host.group_range(g) } else { None })).collect();
        // Until this node formed its bootstrap shards once, it forms them whatever the map
        // holds of them now (`bootstrap_forming.rs`); it looks at its bootstrap in every full
        // round till then, to tell when that is.
        let forming = self.inner.bootstrap_forming.lock().map(|f| *f).unwrap_or(Forming::Done);
        // The cluster records which nodes formed their bootstrap shards: one it names whose
        // data directory does not say so lost that directory, and with it the votes its
        // replicas gave. Under its id it would vote again as if it never had: it holds no
        // replica at all.
        if forming.open() && state.bootstrap.as_ref().is_some_and(|b| b.formed.contains(&me)) {
            self.report_wiped();
            return (true, None);
        }
        // The rule that forms a shard whatever the map holds of it now needs the first voters
        // the cluster recorded (a cluster bootstrapped before the record forms by the older
        // rule only).
        let first_forming = forming.open() && state.bootstrap.as_ref().is_some_and(|b| b.voters.contains(&me));
        let bootstrap = match missing || forming.open() {
            true => self.bootstrap_to_form(state, !missing),
            false => Some(&NO_BOOTSTRAP),
        };
        let mut creations =
            replicas_to_create(me, &state.map, &local, bootstrap.unwrap_or(&NO_BOOTSTRAP), first_forming);
        let mut left_out = false;
        if forming.open() && creations.iter().any(|c| c.initial.is_some()) {
            // The view may be a meta replica catching up (this node's own, rebuilt after a
            // wipe) that does not hold the record of this node's forming yet: asked of the
            // meta leader before anything is formed.
            match self.meta_read_fresh().await {
                Ok(fresh) if fresh.bootstrap.as_ref().is_some_and(|b| b.formed.contains(&me)) => {
                    self.report_wiped();
                    return (true, None);
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(node = me.0, error = %e, "the bootstrap's shards wait for a meta read to be formed");
                    creations.retain(|c| c.initial.is_none());
                    left_out = true;
                }
            }
        }
        if !left_out && forming == Forming::NotStarted && creations.iter().any(|c| c.initial.is_some()) {
            if let Err(e) = self.record_forming(Forming::Started) {
                error!(node = me.0, error = %e, "cannot record that the bootstrap's shards are being formed");
                creations.retain(|c| c.initial.is_none());
                left_out = true;
            }
        }
        // Many at once: each creation is a durable write, and one after another the 10,000
        // replicas of a new cluster took 20 s of fsyncs that group commit shares when they
        // come together; and the host checks a batch's ranges against its groups' in one pass
        // (a check per creation scanned every group: quadratic when forming 100,000). Their
        // ranges are disjoint (`replicas_to_create`), and the host checks each against the
        // others atomically.
        // A bootstrap shard over a restore's data starts with that data as its history
        // (`Host::create_restored_group`), so that replicas added later get it.
        let mut busy = !creations.is_empty() || left_out;
        let over_restored = self.inner.restored.as_ref().is_some_and(|r| r.holds_data);
        let mut all_formed = true;
        for batch in creations.chunks(CREATIONS_AT_ONCE) {
            let formed: BTreeSet<GroupId> = batch.iter().filter(|c| c.initial.is_some()).map(|c| c.shard).collect();
            let wanted = batch.iter().map(|c| (c.shard, c.range.clone(), c.initial.clone())).collect();
            let done = host.create_groups(wanted, over_restored).await;
            let answered: BTreeSet<GroupId> = done.iter().map(|(g, _)| *g).collect();
            // A creation whose task failed is not answered: not formed this round.
            all_formed &= formed.iter().all(|g| answered.contains(g));
            for (shard, result) in done {
                all_formed &= result.is_ok() || !formed.contains(&shard);
                log_creation(me, Ok((shard, result)));
            }
        }
        // Every bootstrap shard placed here is formed now, the map holding each of them (a
        // bootstrap that matches it): from here on, a removed replica placed here again is fed
        // by its leader.
        let mut still_forming = forming.open();
        if still_forming && bootstrap.is_some() && all_formed && !left_out {
            match self.record_forming(Forming::Done) {
                Ok(()) => still_forming = false,
                Err(e) => warn!(node = me.0, error = %e, "cannot record that the bootstrap's shards are formed"),
            }
        }
        let Ok((_, infos)) = host.group_info_shared().await else { return (true, None) };
        busy |= still_forming;
        // Until forming is recorded done, a bootstrap shard removed here would be formed again
        // if placed here again: kept till then (a round or so).
        let kept = if still_forming { bootstrap } else { None };
        let busy_groups = self.act_on_groups(state, &infos, kept).await;
        busy |= !busy_groups.is_empty();
        // Last (it waits on the meta leader): the cluster records that this first voter
        // formed its bootstrap shards, so that it is never let form one again under its id.
        let unrecorded = state.bootstrap.as_ref().is_some_and(|b| b.voters.contains(&me) && !b.formed.contains(&me));
        busy |= unrecorded;
        if !still_forming && unrecorded {
            let op = MetaOp::Commands(vec![crate::placement::MetaCommand::BootstrapFormed { node: me }]);
            if let Err(e) = self.meta_exec(op, false).await {
                debug!(node = me.0, error = %e, "cannot record in the meta state that this node formed its shards");
            }
        }
        (busy, Some(busy_groups))
    }

    /// What the groups `infos` describe need so that they follow the view `state`: deletes
    /// the replicas their groups no longer count (but the bootstrap shards in `kept` this node
    /// is a first voter of), and on the groups this node leads proposes the map's splits,
    /// learners, voter changes and leader transfers. The groups that had something to do.
    pub(super) async fn act_on_groups(
        &self,
        state: &Arc<MetaState>,
        infos: &[GroupInfo],
        kept: Option<&BootstrapShards>,
    ) -> BTreeSet<GroupId> {
        let me = self.inner.id;
        let host = &self.inner.host;
        let mut busy = BTreeSet::new();
        for (group, why) in replicas_to_destroy(me, infos, state) {
            busy.insert(group);
            if kept.is_some_and(|b| b.get(&group).is_some_and(|b| b.voters.contains(&me))) {
                debug!(node = me.0, shard = group.0, "shard replica kept until the bootstrap's shards are formed");
                continue;
            }
            // Decided on `infos`, carried out one after another: each removal is judged again
            // on the group's state when its poller stops it, and on the view as it is then.
            let now = self.meta_view();
            let still = move |i: &GroupInfo| {
                matches!(replica_fate(me, i.group, &local_replica_of(i, me), &now), ReplicaFate::Delete(_))
            };
            match host.destroy_group_if(group, true, Box::new(still)).await {
                Ok(()) => info!(node = me.0, shard = group.0, reason = ?why, "shard replica removed"),
                Err(e @ HostError::Kept(_)) => info!(shard = group.0, error = %e, "shard replica kept"),
                Err(e) => warn!(shard = group.0, error = %e, "cannot remove shard replica"),
            }
        }
        // Only leaders split and change their groups.
        let led: Vec<&GroupInfo> = infos.iter().filter(|i| i.role == Role::Leader).collect();
        for i in led.iter().copied() {
            let Some((at, right)) = split_to_propose(i, host.group_range(i.group).as_ref(), &state.map) else {
                continue;
            };
            busy.insert(i.group);
            if self.due(i.group, vec![Reconfig::Split { new: right }]).is_empty() {
                continue;
            }
            match host.write(i.group, KvCommand::Split { at, new_group: right.0 }).await {
                Ok(KvResponse::Split { .. }) => info!(shard = i.group.0, new = %right, "shard split"),
                Ok(other) => warn!(shard = i.group.0, answer = ?other, "split refused"),
                Err(e) => debug!(shard = i.group.0, error = %e, "split not done yet"),
            }
        }
        // Ranges are read again: a split proposed above may have been applied since.
        for i in led {
            let wanted = reconfigs_wanted(me, i, host.group_range(i.group).as_ref(), state);
            if !wanted.is_empty() {
                busy.insert(i.group);
            }
            for what in self.due(i.group, wanted) {
                let done = match &what {
                    Reconfig::AddLearner(n) => host.add_learner(i.group, *n).await.map(drop),
                    Reconfig::RemoveLearner(n) => host.remove_learner(i.group, *n).await.map(drop),
                    Reconfig::Voters(v) => host.change_membership(i.group, v.clone()).await.map(drop),
                    Reconfig::Transfer(n) => host.transfer_leader(i.group, *n).await,
                    // Never wanted here: splits are proposed above, as writes, and merges by
                    // `drive_merges`.
                    Reconfig::Split { .. } | Reconfig::Merge(..) => Ok(()),
                };
                match (done, &what) {
                    (Ok(()), Reconfig::Voters(v)) => info!(shard = i.group.0, voters = ?v, "voters changed"),
                    (Ok(()), _) => {}
                    (Err(e), _) => debug!(shard = i.group.0, change = ?what, error = %e, "group change not done"),
                }
            }
        }
        busy
    }

    /// The bootstrap shards this node may form, as the bootstrap made them: `None` if its
    /// `[bootstrap]` disagrees with the map or the cluster's record of its bootstrap (every
    /// initial node must be given the same one). `quiet`: nothing to form now, no need to say
    /// why not.
    fn bootstrap_to_form(&self, state: &MetaState, quiet: bool) -> Option<&BootstrapShards> {
        let map = &state.map;
        let mine = self.inner.restored.as_ref().map(|r| r.backup_id.as_str());
        if let Err(e) = restore_matches(state.restored_from.as_deref(), mine) {
            if !quiet {
                error!(node = self.inner.id.0, error = %e, "this node forms no shard of the cluster's bootstrap");
            }
            return None;
        }
        let b = self.inner.config.bootstrap.as_ref();
        let shards = self.inner.bootstrap_shards.get_or_init(|| bootstrap_shards(b));
        let keys = b.map(|b| b.split_keys.as_slice()).unwrap_or_default();
        let recorded = state.bootstrap.as_ref().map(|r| &r.voters);
        match bootstrap_matches_map(keys, shards, map).and_then(|()| bootstrap_matches_record(shards, recorded)) {
            Ok(()) => Some(shards),
            Err(e) => {
                if !quiet {
                    warn!(node = self.inner.id.0, error = %e, "this node's [bootstrap] disagrees with the cluster's: it forms no shard");
                }
                None
            }
        }
    }

    /// Says (once) that this node was recorded as having formed its shards and its data
    /// directory does not say so.
    fn report_wiped(&self) {
        if !self.inner.wipe_reported.swap(true, std::sync::atomic::Ordering::Relaxed) {
            error!(
                node = self.inner.id.0,
                data_dir = %self.inner.config.data_dir.display(),
                "this node formed its shards before, and its data directory does not say so (a new or wiped \
                 directory): it creates no replica. Start it under a new node id, with an empty data directory"
            );
        }
    }

    /// Records, in the data directory and here, where this node is in forming its bootstrap
    /// shards.
    fn record_forming(&self, to: Forming) -> std::io::Result<()> {
        super::bootstrap_forming::record(&self.inner.config.data_dir, to)?;
        if let Ok(mut f) = self.inner.bootstrap_forming.lock() {
            *f = to;
        }
        if to == Forming::Done {
            info!(node = self.inner.id.0, "the bootstrap's shards placed here are formed");
        }
        Ok(())
    }

    /// Pauses (`true`) or resumes the reconciler: paused, the node creates, removes and
    /// changes no replica and proposes no split or reconfiguration (merges in progress wait
    /// too). For tests and investigations.
    pub fn pause_reconciler(&self, paused: bool) {
        self.inner.reconciler_paused.store(paused, std::sync::atomic::Ordering::Release);
    }

    /// Of the changes `wishes` of `shard`, those that may be asked for now (see [`due_now`]).
    pub(super) fn due(&self, shard: GroupId, wishes: Vec<Reconfig>) -> Vec<Reconfig> {
        let Ok(mut times) = self.inner.reconfig.lock() else { return Vec::new() };
        due_now(&mut times, shard, wishes, Instant::now())
    }
}

/// No bootstrap shard to form.
static NO_BOOTSTRAP: BootstrapShards = BTreeMap::new();

/// Replicas the reconciler creates in one batch.
const CREATIONS_AT_ONCE: usize = 64;

/// What became of one replica creation.
fn log_creation(me: NodeId, done: Result<(GroupId, Result<(), HostError>), tokio::task::JoinError>) {
    match done {
        Ok((shard, Ok(()))) => info!(node = me.0, %shard, "shard replica created"),
        // A local group owns keys of it, or will: a split being started here, whose chain of
        // splits starts this one. Not an error; the next round looks again.
        Ok((shard, Err(e @ HostError::RangeTaken { .. }))) => {
            debug!(node = me.0, %shard, error = %e, "shard replica not created yet")
        }
        Ok((shard, Err(e))) => warn!(node = me.0, %shard, error = %e, "cannot create shard replica"),
        Err(e) => warn!(node = me.0, error = %e, "a shard replica's creation failed"),
    }
}

/// Of the changes `wishes` of `shard`, in order, those not asked for within
/// [`RECONFIG_RETRY_MS`] before `now`; each one returned is recorded in `times` as asked at
/// `now`. A change is asked again only after that long, so that a change in progress (a
/// learner catching up, a joint configuration being committed) is not asked again and again.
fn due_now(times: &mut ReconfigTimes, shard: GroupId, wishes: Vec<Reconfig>, now: Instant) -> Vec<Reconfig> {
    let retry = Duration::from_millis(RECONFIG_RETRY_MS);
    let mut out = Vec::new();
    for what in wishes {
        let key = (shard, what);
        if times.get(&key).is_some_and(|t| now.duration_since(*t) < retry) {
            continue;
        }
        times.insert(key.clone(), now);
        out.push(key.1);
    }
    out
}

/// Drops the changes asked for at least [`RECONFIG_RETRY_MS`] before `now`: [`due_now`] treats
/// them as never asked, and kept they would pile up for the life of the process (groups
/// destroyed since, every voter set ever wanted).
fn forget_expired(times: &mut ReconfigTimes, now: Instant) {
    let retry = Duration::from_millis(RECONFIG_RETRY_MS);
    times.retain(|_, asked| now.duration_since(*asked) < retry);
}

/// One shard as the bootstrap of a new cluster made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BootstrapShard {
    /// Its range then (the map may have split it since).
    pub range: KeyRange,
    /// Its first voters (the map may have changed them since).
    pub voters: BTreeSet<NodeId>,
}

/// The shards of a bootstrap, by id.
pub(super) type BootstrapShards = BTreeMap<GroupId, BootstrapShard>;

/// The shards the bootstrap of a new cluster made, as it made them: run again from the
/// bootstrap's split keys and replicas, as the bootstrapper ran it. None for a node that joined
/// a running cluster.
fn bootstrap_shards(bootstrap: Option<&BootstrapConfig>) -> BootstrapShards {
    let Some(b) = bootstrap else { return BTreeMap::new() };
    let mut s = MetaState::default();
    let op = MetaOp::Bootstrap {
        nodes: b.shard_replicas.iter().map(|n| (*n, String::new())).collect(),
        replicas: b.shard_replicas.clone(),
        split_keys: b.split_keys.clone(),
        backup_id: None,
    };
    if let Err(e) = crate::meta::run_op(&op, &mut s, &Default::default()) {
        warn!(error = %e, "cannot work out the bootstrap's shards: this node forms none");
        return BTreeMap::new();
    }
    s.map.shards().map(|d| (d.id, BootstrapShard { range: shard_range(d), voters: d.voters().collect() })).collect()
}

/// Whether this node's store (`mine`: the backup it was restored from, if any) starts the
/// cluster's bootstrap shards with the data their other replicas start with (`cluster`: the
/// backup the cluster was bootstrapped from). A node left unrestored in a restored cluster
/// would otherwise form an empty voting replica (which could lead, or make a quorum without
/// the data), and a node restored from another backup one with other data.
fn restore_matches(cluster: Option<&str>, mine: Option<&str>) -> Result<(), String> {
    match (cluster, mine) {
        (None, None) => Ok(()),
        (Some(c), Some(m)) if c == m => Ok(()),
        (Some(c), None) => Err(format!(
            "the cluster was restored from backup {c}, and this node's data directory was not: \
             run flotilla restore --from <that backup> on it (with an empty data directory)"
        )),
        (None, Some(m)) => Err(format!(
            "this node's data directory was restored from backup {m}, but the cluster was bootstrapped \
             without one (its bootstrapper was not restored): restore every initial node from the same backup"
        )),
        (Some(c), Some(m)) => Err(format!(
            "the cluster was restored from backup {c}, this node's data directory from backup {m}: \
             restore every initial node from the same backup"
        )),
    }
}

/// Whether a bootstrap (its split keys, and the shards they made) can be the one that made
/// `map`: every shard it made is in the map, every key it split at still starts a shard (a
/// split only adds boundaries), and every shard the map holds in its first configuration has
/// the voters the bootstrap gave it. A node given other split keys or replicas than the
/// bootstrapper would form replicas with other ranges or voters than their peers'. Not caught:
/// a node given a subset of the keys (fewer shards) whose ranges all still fit, or other
/// replicas once every shard's configuration changed.
fn bootstrap_matches_map(split_keys: &[Vec<u8>], shards: &BootstrapShards, map: &ShardMap) -> Result<(), String> {
    for (id, b) in shards {
        let Some(d) = map.get(*id) else {
            return Err(format!("its bootstrap made shard {id}, which the map does not hold"));
        };
        let map_voters: BTreeSet<NodeId> = d.voters().collect();
        if d.epoch.conf_version == 1 && map_voters != b.voters {
            return Err(format!(
                "its bootstrap gave shard {id} the voters {:?}, the map's first configuration {map_voters:?}",
                b.voters
            ));
        }
    }
    match split_keys.iter().find(|k| map.lookup(k).is_none_or(|d| d.start != **k)) {
        Some(k) => {
            Err(format!("its bootstrap split at {:?}, where no shard of the map starts", k.escape_ascii().to_string()))
        }
        None => Ok(()),
    }
}

/// Whether the first voters of a bootstrap (`shards`) are the ones the cluster recorded at its
/// bootstrap (`None`: a cluster bootstrapped before the record, nothing to compare).
fn bootstrap_matches_record(shards: &BootstrapShards, recorded: Option<&BTreeSet<NodeId>>) -> Result<(), String> {
    match (shards.values().next(), recorded) {
        (Some(b), Some(r)) if b.voters != *r => {
            Err(format!("its bootstrap's voters are {:?}, the cluster's were {r:?}", b.voters))
        }
        _ => Ok(()),
    }
}

/// Key ranges owned (by local groups, or by replicas about to be created), to tell whether a
/// range overlaps any: in O(log n) while they are disjoint, as a node's groups' ranges are, so
/// that working out 100,000 creations is not 100,000 scans of 100,000 ranges. Ranges found
/// overlapping each other are looked through one by one.
struct Taken {
    /// By start key: the end of each range (`None`: the keyspace's end).
    by_start: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Ranges that overlap another one held: checked one by one.
    tangled: Vec<KeyRange>,
}

impl Taken {
    fn new(ranges: impl Iterator<Item = KeyRange>) -> Taken {
        let mut t = Taken { by_start: BTreeMap::new(), tangled: Vec::new() };
        ranges.for_each(|r| t.insert(r));
        t
    }

    fn overlaps(&self, r: &KeyRange) -> bool {
        if self.tangled.iter().any(|t| t.overlaps(r)) {
            return true;
        }
        // Disjoint ranges: only the last one starting at or before `r`'s start can hold it,
        // and any other overlapping one starts inside `r`.
        let before =
            self.by_start.range::<[u8], _>((Bound::Unbounded, Bound::Included(r.start.as_slice()))).next_back();
        let inside = self.by_start.range::<[u8], _>((Bound::Excluded(r.start.as_slice()), Bound::Unbounded)).next();
        // `KeyRange::overlaps` on the held range as stored (both non-empty: `insert` keeps no
        // empty one, and an empty `r` overlaps nothing).
        let empty = r.end.as_ref().is_some_and(|e| *e <= r.start);
        !empty
            && [before, inside].into_iter().flatten().any(|(start, end)| {
                r.end.as_ref().is_none_or(|e| start < e) && end.as_ref().is_none_or(|e| r.start < *e)
            })
    }

    fn insert(&mut self, r: KeyRange) {
        // An empty range owns no key (the scan ignores it too); held, it could hide the range
        // before it from `overlaps`.
        if r.end.as_ref().is_some_and(|e| *e <= r.start) {
            return;
        }
        if self.overlaps(&r) || self.by_start.contains_key(&r.start) {
            self.tangled.push(r);
        } else {
            self.by_start.insert(r.start, r.end);
        }
    }
}

/// A replica the reconciler creates.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Creation {
    shard: GroupId,
    /// Its host range.
    range: KeyRange,
    /// The configuration it is formed with; `None`: it starts empty and its leader feeds it.
    initial: Option<Membership>,
}

/// The replicas node `me` creates: shards `map` places here that no local group is, and whose
/// keys no local group owns. `local` is every local group with its host range; `bootstrap`
/// the shards of the cluster's bootstrap as it made them ([`bootstrap_shards`]); `forming`:
/// this node has not yet formed every bootstrap shard placed on it (`bootstrap_forming.rs`).
fn replicas_to_create(
    me: NodeId,
    map: &ShardMap,
    local: &BTreeMap<GroupId, Option<KeyRange>>,
    bootstrap: &BootstrapShards,
    forming: bool,
) -> Vec<Creation> {
    let mut taken = Taken::new(local.iter().filter(|(g, _)| **g != META_GROUP).filter_map(|(_, r)| r.clone()));
    let wanted: Vec<(&ShardDescriptor, ReplicaRole)> = map
        .shards()
        .filter(|d| !local.contains_key(&d.id))
        .filter_map(|d| d.replica(me).map(|r| (d, r.role)))
        .collect();
    // Shards of the bootstrap are formed by all their first voters, each replica with the
    // shard's range and voters at the bootstrap: the same first state on every replica,
    // whatever the map did since. A replica formed later with a range the map narrowed would
    // hold keys its peers' logs still split off, and the split-born shards created beside it
    // would be empty replicas that the split entry can no longer start. So these come first,
    // and any shard inside their ranges is left to their split entries.
    // A first voter forms its replica even when the map changed the shard's replicas since,
    // until it has formed its bootstrap once: a move asked before the voters formed the
    // shard must not leave them empty, with nobody to lead them. After that, only while the
    // map holds the first configuration: a replica removed and placed here again is fed by
    // its leader, never formed a second time.
    let formed = |d: &ShardDescriptor, role: ReplicaRole| {
        bootstrap.get(&d.id).filter(|b| {
            b.voters.contains(&me) && (forming || (d.epoch.conf_version == 1 && role == ReplicaRole::Voter))
        })
    };
    let mut out = Vec::new();
    for (d, role) in &wanted {
        let Some(b) = formed(d, *role) else { continue };
        if taken.overlaps(&b.range) {
            continue;
        }
        taken.insert(b.range.clone());
        out.push(Creation {
            shard: d.id,
            range: b.range.clone(),
            initial: Some(Membership::new(b.voters.iter().copied())),
        });
    }
    for (d, role) in &wanted {
        if formed(d, *role).is_some() {
            continue;
        }
        // A shard split off a local group is started by the split entry when that group
        // applies it; created earlier, it could apply writes to keys the source group has
        // not finished with (both share one keyspace), and it would start empty, unable to
        // vote. The host checks again when it creates the group, atomically, against the
        // groups splits are starting here too (`HostError::RangeTaken`).
        let range = shard_range(d);
        if taken.overlaps(&range) {
            continue;
        }
        // Any other replica — added later, or of a shard born of a split this node did not
        // apply — starts empty and is caught up by its leader (by snapshot where the log lacks
        // the data). Forming a split-born shard here could let two replicas without its data
        // elect each other.
        taken.insert(range.clone());
        out.push(Creation { shard: d.id, range, initial: None });
    }
    out
}

/// The local replicas node `me` deletes, and why: only those whose group's committed
/// configuration no longer counts them (see `placement::lifecycle`), never because the view
/// `state` leaves them out. The meta group is not the map's to delete.
fn replicas_to_destroy(me: NodeId, infos: &[GroupInfo], state: &MetaState) -> Vec<(GroupId, DeleteReason)> {
    infos
        .iter()
        .filter(|i| i.group != META_GROUP)
        .filter_map(|i| match replica_fate(me, i.group, &local_replica_of(i, me), state) {
            ReplicaFate::Delete(why) => Some((i.group, why)),
            ReplicaFate::Keep => None,
        })
        .collect()
}

/// The split entry a group this node leads proposes, as (first key of the new group, its id):
/// a split the map holds that the group, whose host range is `host_range`, has not carried out
/// yet. One at a time: the first split point past the group's start (it is idempotent once
/// applied; the new group splits further itself).
fn split_to_propose(i: &GroupInfo, host_range: Option<&KeyRange>, map: &ShardMap) -> Option<(Vec<u8>, GroupId)> {
    if !(i.role == Role::Leader && i.group != META_GROUP) {
        return None;
    }
    let (Some(d), Some(hr)) = (map.get(i.group), host_range) else { return None };
    let at = d.end.clone()?;
    if !hr.contains(&at) {
        return None;
    }
    let right = map.lookup(&at).filter(|r| r.start == at)?;
    Some((at, right.id))
}

/// The changes a group this node (`me`) leads asks of itself so that it follows the map in
/// `state`, in the order asked: learners (a move's target, or a voter of the map the group
/// lacks), learners the map removed, the voters, a leader transfer. `host_range` is the
/// group's range on this node.
fn reconfigs_wanted(me: NodeId, i: &GroupInfo, host_range: Option<&KeyRange>, state: &MetaState) -> Vec<Reconfig> {
    let mut out = Vec::new();
    if !(i.role == Role::Leader && i.group != META_GROUP) {
        return out;
    }
    let Some(d) = state.map.get(i.group) else { return out };
    // A split the map made and the group has not applied yet: a configuration change
    // now would be copied into the split-born group, whose replicas the map took from
    // before the change. Wait for the split (`split_to_propose`).
    if host_range.is_some_and(|r| *r != shard_range(d)) {
        return out;
    }
    let want: BTreeSet<NodeId> = d.voters().collect();
    // Learners are added for the target of a move only: a voter demoted by a move's
    // swap is a learner in the map until the move removes it, and must not rejoin.
    let target = state.moves.get(&d.id).map(|p| p.to);
    for l in d.replicas.iter().filter(|r| r.role == ReplicaRole::Learner && Some(r.node) == target) {
        if !i.voters().contains(&l.node) {
            out.push(Reconfig::AddLearner(l.node));
        }
    }
    // Learners the map removed (an aborted move): the group stops counting them, which
    // confirms their tombstones so their nodes may delete them.
    let buried = state.tombstones.get(&d.id);
    for l in i.committed_conf.membership.learners.iter().filter(|l| !i.voters().contains(l)) {
        let gone = d.replica(*l).is_none() && buried.is_some_and(|t| t.contains_key(l));
        if gone {
            out.push(Reconfig::RemoveLearner(*l));
        }
    }
    // A voter of the map the group does not have at all (its Raft configuration came
    // from another source, a split say) joins as a learner first: the group promotes
    // only members that hold its configuration.
    for v in want.iter().filter(|v| !i.committed_conf.membership.contains(**v)) {
        out.push(Reconfig::AddLearner(*v));
    }
    if want != *i.voters() && !want.is_empty() {
        out.push(Reconfig::Voters(want));
    }
    if let Some(target) = state.transfers.get(&d.id) {
        if *target != me && i.voters().contains(target) {
            out.push(Reconfig::Transfer(*target));
        }
    }
    out
}

/// What a local replica knows of its own group, for [`replica_fate`].
pub(super) fn local_replica_of(i: &GroupInfo, me: NodeId) -> LocalReplica {
    let m = &i.committed_conf.membership;
    let committed = (!m.nodes().is_empty()).then(|| (PLogIndex(i.committed_conf.log_id.index.0), m.contains(me)));
    LocalReplica {
        committed,
        newest_conf: PLogIndex(i.newest_conf.0),
        removed_at: i.removed_at.map(|r| PLogIndex(r.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{dev_split_keys, meta_range, run_op};
    use crate::placement::{BalancerConfig, Epoch, MetaCommand, MovePlan, MoveStep, Replica, Tombstone};
    use crate::raft::{LogId, LogIndex, StoredMembership, Term};

    fn n(id: u64) -> NodeId {
        NodeId(id)
    }

    fn nodes(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().map(|i| n(*i)).collect()
    }

    fn range(start: &str, end: Option<&str>) -> KeyRange {
        KeyRange { start: start.into(), end: end.map(Into::into) }
    }

    /// Nodes 1 to 5 registered; shards 1 `[.., "m")` and 2 `["m", ..)` on voters 1, 2, 3, as a
    /// bootstrap of two shards leaves them.
    fn state() -> MetaState {
        let mut s = MetaState::default();
        for i in 1..=5 {
            s.apply(MetaCommand::RegisterNode { node: n(i), addr: format!("127.0.0.1:{}", 7000 + i) }).unwrap();
        }
        s.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).unwrap();
        split(&mut s, "m");
        s
    }

    /// Splits the shard holding `key` at `key`; the id of the new right-hand shard.
    fn split(s: &mut MetaState, key: &str) -> GroupId {
        let d = s.map.lookup(key.as_bytes()).unwrap().clone();
        s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: key.into() }).unwrap();
        s.map.lookup(key.as_bytes()).unwrap().id
    }

    fn apply(s: &mut MetaState, shard: u64, cmd: impl FnOnce(Epoch) -> MetaCommand) {
        let epoch = s.map.get(GroupId(shard)).unwrap().epoch;
        s.apply(cmd(epoch)).unwrap();
    }

    /// The host range node replicas of `shard` have once they applied every split of the map.
    fn host_range(s: &MetaState, shard: u64) -> KeyRange {
        shard_range(s.map.get(GroupId(shard)).unwrap())
    }

    /// What the host reports of a replica of `group` whose committed configuration (at index 5,
    /// the newest it holds) has these voters and learners.
    fn info(group: u64, role: Role, voters: &[u64], learners: &[u64]) -> GroupInfo {
        GroupInfo {
            group: GroupId(group),
            role,
            term: Term(2),
            leader: None,
            last_index: LogIndex(10),
            last_term: Term(2),
            committed: LogIndex(10),
            applied: LogIndex(10),
            durable_applied: LogIndex(10),
            first_index: LogIndex(1),
            snapshot: None,
            membership: std::sync::Arc::new(Membership {
                voters: nodes(voters),
                outgoing: None,
                learners: nodes(learners),
            }),
            committed_conf: StoredMembership {
                log_id: LogId::new(2, 5),
                membership: Membership { voters: nodes(voters), outgoing: None, learners: nodes(learners) },
            }
            .into(),
            newest_conf: LogIndex(5),
            removed_at: None,
            quiet: false,
            matched: Default::default(),
            stopped: None,
        }
    }

    #[test]
    fn the_bootstrap_shards_are_the_ids_and_ranges_a_bootstrap_gives() {
        assert!(bootstrap_shards(None).is_empty(), "a node that joined forms no shard");
        for shards in [1, 4, 300] {
            let b = BootstrapConfig::of_nodes(&[n(1), n(2), n(3)], dev_split_keys(shards));
            let mut s = MetaState::default();
            let op = MetaOp::Bootstrap {
                nodes: vec![(n(1), "a".into()), (n(2), "b".into()), (n(3), "c".into())],
                replicas: vec![n(1), n(2), n(3)],
                split_keys: b.split_keys.clone(),
                backup_id: None,
            };
            run_op(&op, &mut s, &BalancerConfig::default()).unwrap();
            let voters = nodes(&[1, 2, 3]);
            let made: BootstrapShards = s
                .map
                .shards()
                .map(|d| (d.id, BootstrapShard { range: shard_range(d), voters: voters.clone() }))
                .collect();
            assert_eq!(bootstrap_shards(Some(&b)), made);
            assert_eq!(made.len(), shards as usize);
        }
    }

    #[test]
    fn only_a_node_restored_from_the_clusters_backup_forms_its_bootstrap_shards() {
        assert_eq!(restore_matches(None, None), Ok(()), "a new cluster of new nodes");
        assert_eq!(restore_matches(Some("b1"), Some("b1")), Ok(()));
        let left_out = restore_matches(Some("b1"), None).unwrap_err();
        assert!(left_out.contains("b1") && left_out.contains("flotilla restore"), "{left_out}");
        assert!(restore_matches(Some("b1"), Some("b2")).unwrap_err().contains("b2"));
        assert!(restore_matches(None, Some("b1")).is_err(), "a restored node in a cluster bootstrapped empty");
    }

    #[test]
    fn a_bootstrap_other_than_the_clusters_is_refused() {
        let mut s = state();
        split(&mut s, "t");
        let keys = |k: &[&str]| k.iter().map(|k| k.as_bytes().to_vec()).collect::<Vec<_>>();
        let b = |k: &[&str]| bootstrap_shards(Some(&BootstrapConfig::of_nodes(&[n(1), n(2), n(3)], keys(k))));
        // The cluster's own (split at "m"), with a split since.
        assert_eq!(bootstrap_matches_map(&keys(&["m"]), &b(&["m"]), &s.map), Ok(()));
        // Split elsewhere, or into more shards than the map ever had.
        assert!(bootstrap_matches_map(&keys(&["g"]), &b(&["g"]), &s.map).is_err());
        assert!(bootstrap_matches_map(&keys(&["m", "t", "x"]), &b(&["m", "t", "x"]), &s.map).is_err());
        // Other replicas, seen on a shard still in its first configuration.
        let other = bootstrap_shards(Some(&BootstrapConfig::of_nodes(&[n(1), n(2), n(4)], keys(&["m"]))));
        let e = bootstrap_matches_map(&keys(&["m"]), &other, &s.map).unwrap_err();
        assert!(e.contains("voters"), "{e}");
        // The same replicas in another order (`shard_replicas = [3, 1, 2]`) are the same voters.
        let unsorted = bootstrap_shards(Some(&BootstrapConfig::of_nodes(&[n(3), n(1), n(2)], keys(&["m"]))));
        let mut s3 = MetaState::default();
        for i in 1..=3 {
            s3.apply(MetaCommand::RegisterNode { node: n(i), addr: String::new() }).unwrap();
        }
        s3.apply(MetaCommand::Bootstrap { nodes: vec![n(3), n(1), n(2)] }).unwrap();
        split(&mut s3, "m");
        assert_eq!(bootstrap_matches_map(&keys(&["m"]), &unsorted, &s3.map), Ok(()));
        assert_eq!(bootstrap_matches_map(&keys(&["m"]), &b(&["m"]), &s3.map), Ok(()));
        let recorded = s3.bootstrap.as_ref().map(|r| &r.voters);
        assert_eq!(bootstrap_matches_record(&unsorted, recorded), Ok(()));
        // Other replicas than the cluster recorded: refused whatever the map says now; a
        // cluster bootstrapped before the record has nothing to compare.
        assert!(bootstrap_matches_record(&other, recorded).unwrap_err().contains("voters"));
        assert_eq!(bootstrap_matches_record(&other, None), Ok(()));
        // Not seen in the map once every shard's configuration changed (the limit the doc names).
        for shard in [1, 2] {
            apply(&mut s, shard, |epoch| MetaCommand::AddLearner { shard: GroupId(shard), epoch, node: n(5) });
        }
        assert_eq!(bootstrap_matches_map(&keys(&["m"]), &other, &s.map), Ok(()));
    }

    /// A move asked before the shard's voters formed it: they must still form it, with its
    /// first configuration, or nobody leads it and the move never ends.
    #[test]
    fn a_first_voter_forms_its_bootstrap_shard_after_the_map_changed_it_until_it_formed_its_bootstrap() {
        let mut s = state();
        let meta = BTreeMap::from([(META_GROUP, Some(meta_range()))]);
        let first = Some(Membership::new(nodes(&[1, 2, 3])));
        let created = |c: &[Creation]| c.iter().map(|c| (c.shard.0, c.initial.clone())).collect::<Vec<_>>();
        // A move of shard 1 from node 3 to node 4 put learner 4 in the map, and later made it
        // a voter.
        apply(&mut s, 1, |epoch| MetaCommand::AddLearner { shard: GroupId(1), epoch, node: n(4) });
        for node in [2, 3] {
            let c = replicas_to_create(n(node), &s.map, &meta, &boot(), true);
            assert_eq!(created(&c), vec![(1, first.clone()), (2, first.clone())], "node {node}");
            assert_eq!(c[0].range, host_range(&s, 1));
        }
        apply(&mut s, 1, |epoch| MetaCommand::Promote { shard: GroupId(1), epoch, node: n(4) });
        let c = replicas_to_create(n(3), &s.map, &meta, &boot(), true);
        assert_eq!(created(&c)[0], (1, first.clone()), "formed as it began, whatever the map made of it");
        // The move's target was no first voter: it starts empty, fed by the leader.
        assert_eq!(created(&replicas_to_create(n(4), &s.map, &meta, &boot(), true)), vec![(1, None)]);
        // Once node 3 formed its bootstrap, a replica of it placed here again is fed by the
        // leader: formed a second time, it would claim the first state the group left long ago.
        assert!(created(&replicas_to_create(n(3), &s.map, &meta, &boot(), false)).contains(&(1, None)));
        // Moved away before it formed it: nothing to form.
        apply(&mut s, 1, |epoch| MetaCommand::RemoveReplica { shard: GroupId(1), epoch, node: n(3) });
        assert_eq!(created(&replicas_to_create(n(3), &s.map, &meta, &boot(), true)), vec![(2, first)]);
    }

    /// The two shards [`state`] bootstraps.
    fn boot() -> BootstrapShards {
        let s = state();
        s.map.shards().map(|d| (d.id, BootstrapShard { range: shard_range(d), voters: d.voters().collect() })).collect()
    }

    #[test]
    fn a_bootstrap_shard_the_map_split_before_this_node_formed_it_is_formed_whole_and_its_splits_follow() {
        let mut s = state();
        let (whole_1, whole_2) = (host_range(&s, 1), host_range(&s, 2));
        let right = split(&mut s, "t");
        let left = split(&mut s, "f");
        let voters = Some(Membership::new(nodes(&[1, 2, 3])));
        // A node that forms its replicas only now (it started late, or its reconciler ran
        // after the splits were in the map).
        let local = BTreeMap::from([(META_GROUP, Some(meta_range()))]);
        let c = replicas_to_create(n(1), &s.map, &local, &boot(), false);
        let made: Vec<(u64, KeyRange, Option<Membership>)> =
            c.iter().map(|c| (c.shard.0, c.range.clone(), c.initial.clone())).collect();
        // Formed with the ranges every other replica started with; the shards split off them
        // are left to the split entries in their logs.
        assert_eq!(made, vec![(1, whole_1, voters.clone()), (2, whole_2, voters)]);
        assert!(!c.iter().any(|c| c.shard == right || c.shard == left));
    }

    #[test]
    fn taken_ranges_tell_an_overlap_as_a_scan_of_them_all_would() {
        let r = |s: &str, e: Option<&str>| range(s, e);
        let held = [r("b", Some("d")), r("d", Some("f")), r("k", None), r("g", Some("g"))];
        let t = Taken::new(held.iter().cloned());
        for q in [
            r("", Some("a")),
            r("", Some("c")),
            r("a", Some("b")),
            r("c", Some("e")),
            r("f", Some("k")),
            r("f", Some("g")),
            r("f", Some("h")),
            r("j", Some("l")),
            r("z", None),
            r("", None),
            r("e", Some("e")),
            r("f", Some("l")),
            r("fa", Some("gz")),
        ] {
            let scan = held.iter().any(|h| h.overlaps(&q));
            assert_eq!(t.overlaps(&q), scan, "{q:?}");
        }
        // Empty ranges held hide nothing.
        let t = Taken::new([r("a", Some("z")), r("c", Some("c"))].into_iter());
        assert!(t.overlaps(&r("d", Some("e"))));
        let t = Taken::new([r("e", Some("e")), r("f", Some("g"))].into_iter());
        assert!(t.overlaps(&r("d", Some("h"))));
        // Ranges that overlap each other are still seen.
        let mut t = Taken::new([r("a", Some("z"))].into_iter());
        t.insert(r("c", Some("d")));
        assert!(t.overlaps(&r("e", Some("f"))));
        assert!(!t.overlaps(&r("z", None)));
    }

    #[test]
    fn a_replica_is_known_by_its_committed_configuration() {
        let mut i = info(1, Role::Follower, &[1, 2, 3], &[4]);
        i.newest_conf = LogIndex(7);
        let l = |committed| LocalReplica { committed, newest_conf: PLogIndex(7), removed_at: None };
        assert_eq!(local_replica_of(&i, n(4)), l(Some((PLogIndex(5), true))));
        assert_eq!(local_replica_of(&i, n(2)), l(Some((PLogIndex(5), true))));
        assert_eq!(local_replica_of(&i, n(5)), l(Some((PLogIndex(5), false))));
        i.committed_conf = StoredMembership::default().into();
        assert_eq!(local_replica_of(&i, n(4)), l(None), "never given a configuration");
    }

    #[test]
    fn only_replicas_their_group_left_out_are_destroyed_never_on_the_map_alone() {
        let mut s = state();
        split(&mut s, "t");
        // Node 4 holds replicas the map (this view) does not list it in.
        let mut never_configured = info(3, Role::Follower, &[], &[]);
        never_configured.committed_conf = StoredMembership::default().into();
        never_configured.newest_conf = LogIndex(0);
        let infos = [
            info(0, Role::Follower, &[1, 2, 3], &[]),
            // Its group counts it: the view is older than its addition.
            info(1, Role::Learner, &[1, 2, 3], &[4]),
            // Its group removed it.
            info(2, Role::Follower, &[1, 2, 3], &[]),
            never_configured,
            // Unknown to the view: the view is older than the shard.
            info(9, Role::Follower, &[1, 2, 3], &[]),
        ];
        assert_eq!(
            replicas_to_destroy(n(4), &infos, &s),
            vec![(GroupId(2), DeleteReason::RemovedByItsGroup), (GroupId(3), DeleteReason::Empty)]
        );
        // Where the map lists the node, nothing is destroyed, whatever its group says.
        assert_eq!(replicas_to_destroy(n(1), &infos, &s), vec![]);
    }

    #[test]
    fn bootstrap_shards_are_formed_by_their_voters_and_every_other_replica_starts_empty() {
        let mut s = state();
        let meta = || (META_GROUP, Some(meta_range()));
        let voters = Some(Membership::new(nodes(&[1, 2, 3])));
        let created = |c: &[Creation]| c.iter().map(|c| (c.shard.0, c.initial.clone())).collect::<Vec<_>>();

        // A new cluster: node 1 forms both bootstrap shards, with their ranges.
        let local = BTreeMap::from([meta()]);
        let c = replicas_to_create(n(1), &s.map, &local, &boot(), false);
        assert_eq!(created(&c), vec![(1, voters.clone()), (2, voters.clone())]);
        assert_eq!(c[1].range, range("m", None));
        assert_eq!(c[0].range, host_range(&s, 1));
        // A node that joined forms none, and one the map does not place a shard on creates none.
        assert_eq!(
            created(&replicas_to_create(n(1), &s.map, &local, &BTreeMap::new(), false)),
            vec![(1, None), (2, None)]
        );
        assert_eq!(replicas_to_create(n(4), &s.map, &local, &boot(), false), vec![]);
        // A shard held already is not created again.
        let local = BTreeMap::from([meta(), (GroupId(1), Some(host_range(&s, 1)))]);
        assert_eq!(created(&replicas_to_create(n(1), &s.map, &local, &boot(), false)), vec![(2, voters.clone())]);

        // Shard 3 split off shard 2 in the map: while the local group 2 still owns its keys,
        // the split entry starts it, not the reconciler.
        let right = split(&mut s, "t");
        let before_split =
            BTreeMap::from([meta(), (GroupId(1), Some(host_range(&s, 1))), (GroupId(2), Some(range("m", None)))]);
        assert_eq!(replicas_to_create(n(1), &s.map, &before_split, &boot(), false), vec![]);
        // Once no local group owns its keys it is created, empty even though it is a voter at
        // configuration version 1: a split-born shard is never formed by the reconciler.
        let after_split =
            BTreeMap::from([meta(), (GroupId(1), Some(host_range(&s, 1))), (GroupId(2), Some(host_range(&s, 2)))]);
        let c = replicas_to_create(n(1), &s.map, &after_split, &boot(), false);
        assert_eq!(created(&c), vec![(right.0, None)]);
        assert_eq!(c[0].range, range("t", None));

        // A bootstrap shard whose replicas changed since: node 3, removed and added back, is fed
        // by the leader, as a learner and then as a voter.
        apply(&mut s, 1, |epoch| MetaCommand::RemoveReplica { shard: GroupId(1), epoch, node: n(3) });
        apply(&mut s, 1, |epoch| MetaCommand::AddLearner { shard: GroupId(1), epoch, node: n(3) });
        let none = BTreeMap::from([meta()]);
        assert!(created(&replicas_to_create(n(3), &s.map, &none, &boot(), false)).contains(&(1, None)));
        apply(&mut s, 1, |epoch| MetaCommand::Promote { shard: GroupId(1), epoch, node: n(3) });
        assert!(created(&replicas_to_create(n(3), &s.map, &none, &boot(), false)).contains(&(1, None)));
    }

    #[test]
    fn the_leader_proposes_the_first_split_the_map_holds_and_its_group_has_not_applied() {
        let mut s = state();
        let at_t = split(&mut s, "t");
        let at_p = split(&mut s, "p");
        let leader = info(2, Role::Leader, &[1, 2, 3], &[]);
        let wide = range("m", None);
        assert_eq!(split_to_propose(&leader, Some(&wide), &s.map), Some((b"p".to_vec(), at_p)));
        // Applied: the group's range ends where the map's does.
        assert_eq!(split_to_propose(&leader, Some(&host_range(&s, 2)), &s.map), None);
        // The next split is the new group's own to propose.
        let right = info(at_p.0, Role::Leader, &[1, 2, 3], &[]);
        assert_eq!(split_to_propose(&right, Some(&range("p", None)), &s.map), Some((b"t".to_vec(), at_t)));
        // The last shard of the map has nothing to split.
        let last = info(at_t.0, Role::Leader, &[1, 2, 3], &[]);
        assert_eq!(split_to_propose(&last, Some(&range("t", None)), &s.map), None);
        // Only the leader proposes, and only where it holds the group.
        let follower = info(2, Role::Follower, &[1, 2, 3], &[]);
        assert_eq!(split_to_propose(&follower, Some(&wide), &s.map), None);
        assert_eq!(split_to_propose(&leader, None, &s.map), None);
    }

    /// `state()` with shard 1 led by node 1, whose replica's group has these voters and learners.
    fn wanted(s: &MetaState, voters: &[u64], learners: &[u64]) -> Vec<Reconfig> {
        reconfigs_wanted(n(1), &info(1, Role::Leader, voters, learners), Some(&host_range(s, 1)), s)
    }

    #[test]
    fn a_group_that_matches_the_map_asks_for_nothing() {
        let s = state();
        assert_eq!(wanted(&s, &[1, 2, 3], &[]), vec![]);
    }

    #[test]
    fn only_the_leader_of_a_group_whose_range_matches_the_map_changes_it() {
        let mut s = state();
        // The map wants voter 4 instead of 3.
        apply(&mut s, 1, |epoch| MetaCommand::AddLearner { shard: GroupId(1), epoch, node: n(4) });
        apply(&mut s, 1, |epoch| MetaCommand::SwapVoter { shard: GroupId(1), epoch, promote: n(4), demote: n(3) });
        let change = vec![Reconfig::AddLearner(n(4)), Reconfig::Voters(nodes(&[1, 2, 4]))];
        assert_eq!(wanted(&s, &[1, 2, 3], &[]), change);
        let follower = info(1, Role::Follower, &[1, 2, 3], &[]);
        assert_eq!(reconfigs_wanted(n(1), &follower, Some(&host_range(&s, 1)), &s), vec![]);
        // A split the map made and the group has not applied: wait for it.
        let leader = info(1, Role::Leader, &[1, 2, 3], &[]);
        split(&mut s, "f");
        assert_eq!(reconfigs_wanted(n(1), &leader, Some(&range("", Some("m"))), &s), vec![]);
        assert_eq!(reconfigs_wanted(n(1), &leader, Some(&host_range(&s, 1)), &s), change);
        // A shard the view does not know.
        assert_eq!(reconfigs_wanted(n(1), &info(9, Role::Leader, &[1, 2, 3], &[]), None, &s), vec![]);
    }

    fn start_move(s: &mut MetaState, from: u64, to: u64) {
        let plan = MovePlan {
            shard: GroupId(1),
            from: n(from),
            to: n(to),
            transfer_leader_to: None,
            step: MoveStep::AddLearner,
            catch_up_lag_entries_max: 0,
        };
        s.moves.insert(GroupId(1), plan);
    }

    #[test]
    fn a_moves_target_joins_as_a_learner_and_its_source_never_rejoins() {
        let mut s = state();
        start_move(&mut s, 3, 4);
        apply(&mut s, 1, |epoch| MetaCommand::AddLearner { shard: GroupId(1), epoch, node: n(4) });
        assert_eq!(wanted(&s, &[1, 2, 3], &[]), vec![Reconfig::AddLearner(n(4))]);
        // Asked again while it is a learner: the group treats a learner it has as done.
        assert_eq!(wanted(&s, &[1, 2, 3], &[4]), vec![Reconfig::AddLearner(n(4))]);
        // Never while the group counts it as a voter (ahead of this view of the map).
        assert!(!wanted(&s, &[1, 2, 3, 4], &[]).contains(&Reconfig::AddLearner(n(4))));
        // The swap: 4 votes, 3 is a learner in the map until the move removes it.
        apply(&mut s, 1, |epoch| MetaCommand::SwapVoter { shard: GroupId(1), epoch, promote: n(4), demote: n(3) });
        assert_eq!(wanted(&s, &[1, 2, 3], &[4]), vec![Reconfig::Voters(nodes(&[1, 2, 4]))]);
        // Once the group has changed, the demoted voter is not added back as a learner.
        assert_eq!(wanted(&s, &[1, 2, 4], &[]), vec![]);
        // Nor is a learner of the map that is no move's target.
        s.moves.clear();
        assert_eq!(wanted(&s, &[1, 2, 4], &[]), vec![]);
    }

    #[test]
    fn a_learner_is_removed_only_once_the_map_dropped_it_with_a_tombstone() {
        let mut s = state();
        // Learner 4 of an aborted move: gone from the map, buried.
        s.tombstones.entry(GroupId(1)).or_default().insert(n(4), Tombstone { confirmed: None });
        assert_eq!(wanted(&s, &[1, 2, 3], &[4]), vec![Reconfig::RemoveLearner(n(4))]);
        // Learner 5 the map does not list and did not bury: the view predates its addition.
        assert_eq!(wanted(&s, &[1, 2, 3], &[5]), vec![]);
        // A learner the map lists (the target of a move) stays, buried or not.
        start_move(&mut s, 3, 4);
        apply(&mut s, 1, |epoch| MetaCommand::AddLearner { shard: GroupId(1), epoch, node: n(4) });
        s.tombstones.entry(GroupId(1)).or_default().insert(n(4), Tombstone { confirmed: None });
        assert_eq!(wanted(&s, &[1, 2, 3], &[4]), vec![Reconfig::AddLearner(n(4))]);
    }

    #[test]
    fn a_voter_the_group_lacks_joins_as_a_learner_before_the_voters_change() {
        let mut s = state();
        // The map's voters are 1, 2, 5 (the group's configuration came from elsewhere).
        apply(&mut s, 1, |epoch| MetaCommand::AddLearner { shard: GroupId(1), epoch, node: n(5) });
        apply(&mut s, 1, |epoch| MetaCommand::SwapVoter { shard: GroupId(1), epoch, promote: n(5), demote: n(3) });
        apply(&mut s, 1, |epoch| MetaCommand::RemoveReplica { shard: GroupId(1), epoch, node: n(3) });
        assert_eq!(wanted(&s, &[1, 2, 3], &[]), vec![Reconfig::AddLearner(n(5)), Reconfig::Voters(nodes(&[1, 2, 5]))]);
        assert_eq!(wanted(&s, &[1, 2, 3], &[5]), vec![Reconfig::Voters(nodes(&[1, 2, 5]))]);
    }

    #[test]
    fn a_map_without_voters_never_empties_the_group() {
        let s = MetaState {
            map: ShardMap::bootstrap(GroupId(1), vec![Replica { node: n(1), role: ReplicaRole::Learner }]),
            next_shard_id: 2,
            ..MetaState::default()
        };
        let leader = info(1, Role::Leader, &[1], &[]);
        let r = reconfigs_wanted(n(1), &leader, Some(&host_range(&s, 1)), &s);
        assert!(!r.iter().any(|r| matches!(r, Reconfig::Voters(_))), "{r:?}");
    }

    #[test]
    fn leadership_is_handed_only_to_another_voter_of_the_group() {
        let mut s = state();
        s.transfers.insert(GroupId(1), n(2));
        assert_eq!(wanted(&s, &[1, 2, 3], &[]), vec![Reconfig::Transfer(n(2))]);
        s.transfers.insert(GroupId(1), n(1));
        assert_eq!(wanted(&s, &[1, 2, 3], &[]), vec![]);
        // A voter of the map the group has not promoted yet.
        apply(&mut s, 1, |epoch| MetaCommand::AddLearner { shard: GroupId(1), epoch, node: n(4) });
        apply(&mut s, 1, |epoch| MetaCommand::Promote { shard: GroupId(1), epoch, node: n(4) });
        s.transfers.insert(GroupId(1), n(4));
        assert_eq!(wanted(&s, &[1, 2, 3], &[4]), vec![Reconfig::Voters(nodes(&[1, 2, 3, 4]))]);
    }

    #[test]
    fn a_change_is_asked_for_at_most_once_per_retry_interval_per_group() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let retry = ms(RECONFIG_RETRY_MS);
        let (a, b) = (Reconfig::Transfer(n(2)), Reconfig::AddLearner(n(4)));
        let mut times = ReconfigTimes::new();
        let g = GroupId(1);
        assert_eq!(due_now(&mut times, g, vec![a.clone(), b.clone(), a.clone()], t0), vec![a.clone(), b.clone()]);
        assert_eq!(due_now(&mut times, g, vec![a.clone()], t0 + ms(1)), vec![]);
        assert_eq!(due_now(&mut times, GroupId(2), vec![a.clone()], t0 + ms(1)), vec![a.clone()]);
        assert_eq!(due_now(&mut times, g, vec![a.clone(), b.clone()], t0 + retry - ms(1)), vec![]);
        assert_eq!(due_now(&mut times, g, vec![a.clone(), b.clone()], t0 + retry), vec![a.clone(), b]);
        assert_eq!(due_now(&mut times, g, vec![a.clone()], t0 + retry + ms(1)), vec![], "asked again at the retry");
        // Expired entries go, fresh ones stay; a forgotten change is due as before.
        forget_expired(&mut times, t0 + retry + ms(1));
        assert_eq!(times.len(), 2, "{times:?}");
        forget_expired(&mut times, t0 + retry * 2 + ms(1));
        assert!(times.is_empty(), "{times:?}");
        assert_eq!(due_now(&mut times, g, vec![a.clone()], t0 + retry * 2 + ms(2)), vec![a]);
    }
}
