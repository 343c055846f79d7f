//! Unsafe recovery after losing a quorum for good (`flotilla admin unsafe-recover`): when the
//! disks of a majority of some group's voters are gone, that group can never elect a leader
//! again by Raft's rules. The operator names the dead nodes; this forces each group that lost
//! its quorum onto its most up-to-date surviving replica, accepting the loss of whatever only
//! the dead had (TiKV's online unsafe recovery), and reports exactly which groups were forced
//! and which log index each kept.
//!
//! The steps, each served by ordinary admin requests:
//! 0. **The dead must be gone**: a node named dead that answers a short request stops the
//!    tool before anything changes ([`RecoveryError::DeadAnswers`]).
//! 1. **Ask the survivors, not the map**: every live node (those the client knows, and those
//!    any node asked names in turn) reports its replicas' Raft state
//!    (configuration, last log position, commit index) from its own state
//!    ([`AdminRequest::ReplicaStates`]); the map may be what was lost.
//! 2. **Decide** per group ([`decide::decide`], pure).
//! 3. **The meta group first**, if it lost its quorum: forced onto its survivor, so that the
//!    map can be changed at all. Its other survivors' replicas are dropped (their nodes then
//!    follow the meta leader, which may give them new replicas).
//!    The forced survivor may lack meta changes that the dead meta leader had committed and
//!    other nodes had seen; its node therefore writes its first meta change after the force
//!    at a revision above every live node's (each node names its own in step 1), and the map
//!    change of step 4 too, so that no node takes its copy of the lost history for a state
//!    of the new one, nor follows the new one's changes from it.
//! 4. **The map**: the dead are removed for good (never registered again; every node drops
//!    their messages), forced shards keep only their survivor, and every shard that lost a
//!    replica gets voters on live nodes ([`AdminRequest::RemoveDeadNodes`]). The reconcilers
//!    then bring each shard back to full replication by the normal path (learner, catch-up,
//!    promotion by joint consensus), whether or not the balancer runs.
//! 5. **Force** each data group that lost its quorum onto its survivor
//!    ([`AdminRequest::ForceAlone`]), after the map no longer names the dead, so that the new
//!    leader adds the live nodes and not the dead ones. The request carries the dead set and
//!    the last log id the decision saw: the replica refuses unless the dead hold a majority
//!    of its configuration and its log has not moved.
//! 6. **Drop** the other survivors of a forced group ([`AdminRequest::DropReplica`]): their
//!    logs may contradict the kept one; the map gave them no replica of it.

pub mod decide;

pub use decide::{decide, Forced, LogPosition, Plan};

use crate::client::{Client, ClientError};
use crate::meta::META_GROUP;
use crate::placement::{NodeId, ShardId};
use crate::wire::{AdminRequest, AdminResponse, ReplicaState, ShardRow, REPLICA_STATES_PAGE_MAX};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Most replica states gathered from all nodes (pages of [`REPLICA_STATES_PAGE_MAX`]): a bound
/// on the tool's memory far above any cluster this node handles.
pub const REPLICA_STATES_MAX: usize = 10_000_000;

/// The highest meta revision a node may report: one change a microsecond for a century is
/// below it, and a revision near `u64::MAX` would leave no room for the changes after it.
pub const REVISION_FLOOR_MAX: u64 = 1 << 62;

/// How long a node named dead is given to answer before it is taken as gone.
pub const DEAD_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One forced group in the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForcedShard {
    /// The decision: group, survivor, kept position, the others' positions, dead voters.
    #[serde(flatten)]
    pub decision: Forced,
    /// The shard's range in the map before recovery (`None` for the meta group).
    pub range: Option<(Vec<u8>, Option<Vec<u8>>)>,
    /// The index of the forced configuration's entry on the survivor.
    pub forced_index: u64,
}

/// What unsafe recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The nodes removed for good.
    pub dead: Vec<NodeId>,
    /// The groups that lost their quorum, each forced onto one survivor. Writes after each
    /// one's `kept.index` that only the dead nodes held are lost.
    pub forced: Vec<ForcedShard>,
    /// Groups with no surviving replica: their data is gone and they were left as they are.
    pub lost: Vec<ShardId>,
    /// Shards whose replicas the map changed (forced ones and those that only lost a replica).
    pub changed: Vec<ShardId>,
}

/// Why unsafe recovery stopped. Each step can be run again: the decision is made again from
/// what the nodes report then.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// A node not named dead did not answer: its replicas may be the best survivors.
    #[error("node {0} did not answer ({1}): bring it back, or name it with --dead-nodes too")]
    Unreachable(NodeId, String),
    /// A node named dead answered: it is not gone, and forcing its groups would make two
    /// leaders of them.
    #[error("node {0} is named dead but answers: it is not gone (check --dead-nodes); nothing was changed")]
    DeadAnswers(NodeId),
    /// A request of a step failed.
    #[error("{step}: {source}")]
    Step {
        /// The step.
        step: String,
        /// Why.
        source: ClientError,
    },
    /// Something in the input or the answers is not usable.
    #[error("{0}")]
    Invalid(String),
}

fn step(what: impl Into<String>) -> impl FnOnce(ClientError) -> RecoveryError {
    let step = what.into();
    move |source| RecoveryError::Step { step, source }
}

/// Runs unsafe recovery with `dead` lost for good, through `client` (which must know every
/// live node's address, from its configuration or its cached view). `progress` gets a line
/// per step.
pub async fn recover(
    client: &Client,
    dead: &BTreeSet<NodeId>,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<Report, RecoveryError> {
    if dead.is_empty() {
        return Err(RecoveryError::Invalid("name the dead nodes".into()));
    }
    let view = client.cached_view();
    let mut live: BTreeSet<NodeId> = client.known_nodes().into_iter().collect();
    live.extend(view.nodes.keys().copied());
    live.retain(|n| !dead.contains(n));
    if live.is_empty() {
        return Err(RecoveryError::Invalid("no live node known".into()));
    }
    // 0. The nodes named dead must not answer (a typo in --dead-nodes forces groups that
    // still have their quorum).
    for node in dead {
        if client.answers(*node, DEAD_PROBE_TIMEOUT).await {
            return Err(RecoveryError::DeadAnswers(*node));
        }
    }
    // 1. Ask the survivors, and every node any of them knows of: a node registered by meta
    // changes the forced meta group may lose is known only to the nodes that saw them, and
    // its copy's revision counts as theirs.
    let mut states = Vec::new();
    let mut revision_floor = 0;
    let mut asked = BTreeSet::new();
    let mut to_ask: Vec<NodeId> = live.iter().rev().copied().collect();
    while let Some(node) = to_ask.pop() {
        if !asked.insert(node) {
            continue;
        }
        let (got, view_revision, nodes) = replica_states(client, node).await?;
        progress(format!("node {node}: {} replicas, meta revision {view_revision}", got.len()));
        states.extend(got);
        revision_floor = revision_floor.max(view_revision);
        for (other, addr) in nodes {
            if !dead.contains(&other) && !asked.contains(&other) {
                client.learn_address(other, &addr);
                to_ask.push(other);
            }
        }
    }
    if revision_floor > REVISION_FLOOR_MAX {
        return Err(RecoveryError::Invalid(format!("a node reported meta revision {revision_floor}: not believable")));
    }
    // 2. Decide.
    let shards: Vec<ShardId> = view.map.shards().map(|d| d.id).collect();
    let plan = decide(dead, &states, &shards);
    let mut report = Report { dead: dead.iter().copied().collect(), lost: plan.lost.clone(), ..Report::default() };
    progress(format!("{} groups lost their quorum, {} lost every replica", plan.forced.len(), plan.lost.len()));
    // 3. The meta group first.
    let (meta, data): (Vec<Forced>, Vec<Forced>) = plan.forced.into_iter().partition(|f| f.shard == META_GROUP);
    for f in meta {
        let index = force(client, dead, &f, revision_floor).await?;
        progress(format!("meta group forced onto node {} (kept index {})", f.survivor, f.kept.index));
        drop_others(client, dead, &f).await?;
        report.forced.push(ForcedShard { decision: f, range: None, forced_index: index });
    }
    // 4. The map, written above every revision a live node saw: those of the lost meta
    // history's changes must not be taken for the forced history's.
    let kept: Vec<(ShardId, NodeId)> = data.iter().map(|f| (f.shard, f.survivor)).collect();
    let req = AdminRequest::RemoveDeadNodes { dead: report.dead.clone(), kept, revision_floor };
    match client.admin(req).await.map_err(step("removing the dead nodes from the map"))? {
        AdminResponse::Changed(ds) => report.changed = ds.iter().map(|d| d.id).collect(),
        other => return Err(RecoveryError::Invalid(format!("unexpected answer to the map change: {other:?}"))),
    }
    progress(format!("map: dead nodes removed for good, {} shards get new replicas", report.changed.len()));
    // 5. Force, 6. drop the other survivors.
    for f in data {
        let index = force(client, dead, &f, 0).await?;
        drop_others(client, dead, &f).await?;
        progress(format!("shard {} forced onto node {} (kept index {})", f.shard, f.survivor, f.kept.index));
        let range = view.map.get(f.shard).map(|d| (d.start.clone(), d.end.clone()));
        report.forced.push(ForcedShard { decision: f, range, forced_index: index });
    }
    Ok(report)
}

/// Drops the replicas of `f`'s group on its other survivors: their logs may contradict the
/// kept one, and the map (or, for the meta group, its leader) gives their nodes new replicas.
async fn drop_others(client: &Client, dead: &BTreeSet<NodeId>, f: &Forced) -> Result<(), RecoveryError> {
    for (other, _) in &f.others {
        let req = AdminRequest::DropReplica { shard: f.shard, dead: dead.iter().copied().collect() };
        client.admin_on(*other, req).await.map_err(step(format!("dropping shard {} on node {other}", f.shard)))?;
    }
    Ok(())
}

/// Every replica state of `node`, page by page, the highest revision of its meta state copy
/// the pages named, and the nodes (with addresses) the first page said that copy registers.
async fn replica_states(
    client: &Client,
    node: NodeId,
) -> Result<(Vec<ReplicaState>, u64, Vec<(NodeId, String)>), RecoveryError> {
    let mut out = Vec::new();
    let mut from = ShardId(0);
    let mut revision = 0;
    let mut known = Vec::new();
    loop {
        let req = AdminRequest::ReplicaStates { from, limit: REPLICA_STATES_PAGE_MAX };
        let answer = client.admin_on(node, req).await.map_err(|e| RecoveryError::Unreachable(node, e.to_string()))?;
        let AdminResponse::ReplicaStates { replicas, next, view_revision, nodes } = answer else {
            return Err(RecoveryError::Invalid(format!("node {node} answered the replica states with {answer:?}")));
        };
        if replicas.iter().any(|r| r.node != node) {
            return Err(RecoveryError::Invalid(format!("node {node} reported another node's replicas")));
        }
        out.extend(replicas);
        revision = revision.max(view_revision);
        if known.is_empty() {
            known = nodes;
        }
        if out.len() > REPLICA_STATES_MAX {
            return Err(RecoveryError::Invalid(format!("more than {REPLICA_STATES_MAX} replicas reported")));
        }
        match next {
            // Pages only move forward: a node answering otherwise would loop us.
            Some(n) if n > from => from = n,
            _ => return Ok((out, revision, known)),
        }
    }
}

/// Forces `f`'s group onto its survivor; the forced configuration's index.
async fn force(
    client: &Client,
    dead: &BTreeSet<NodeId>,
    f: &Forced,
    revision_floor: u64,
) -> Result<u64, RecoveryError> {
    let what = format!("forcing shard {} onto node {}", f.shard, f.survivor);
    let req = AdminRequest::ForceAlone {
        shard: f.shard,
        dead: dead.iter().copied().collect(),
        last_term: f.kept.term,
        last_index: f.kept.index,
        revision_floor,
    };
    match client.admin_on(f.survivor, req).await.map_err(step(what))? {
        AdminResponse::Forced { index, .. } => Ok(index),
        other => Err(RecoveryError::Invalid(format!("unexpected answer to a force: {other:?}"))),
    }
}

/// How many of `rows` are not back to full replication: without a leader, with a replica on
/// a `dead` node, or with a replica that reports no applied index. Shards in `lost` (no
/// surviving replica: nothing will ever bring them back) are not counted.
pub fn not_replicated(rows: &[ShardRow], dead: &BTreeSet<NodeId>, lost: &[ShardId]) -> usize {
    rows.iter()
        .filter(|r| !lost.contains(&r.descriptor.id))
        .filter(|r| {
            let d = &r.descriptor;
            r.leader.is_none() || d.replicas.iter().any(|x| dead.contains(&x.node) || !r.applied.contains_key(&x.node))
        })
        .count()
}

/// Waits until every shard of the map but those `lost` has a leader, no replica on a `dead`
/// node, and every replica reporting an applied index (it exists and follows its leader), or
/// `timeout` passes. `progress` gets a line whenever the count of shards left changes.
pub async fn wait_replicated(
    client: &Client,
    dead: &BTreeSet<NodeId>,
    lost: &[ShardId],
    timeout: Duration,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<(), RecoveryError> {
    let deadline = Instant::now() + timeout;
    let mut last = usize::MAX;
    loop {
        let rows = match client.admin(AdminRequest::Shards).await {
            Ok(AdminResponse::Shards(rows)) => rows,
            Ok(other) => return Err(RecoveryError::Invalid(format!("unexpected answer: {other:?}"))),
            Err(e) if Instant::now() < deadline => {
                progress(format!("waiting for the cluster: {e}"));
                Vec::new()
            }
            Err(e) => return Err(step("reading the shards")(e)),
        };
        let left = not_replicated(&rows, dead, lost);
        if !rows.is_empty() && left == 0 {
            let lost_now = rows.iter().filter(|r| lost.contains(&r.descriptor.id)).count();
            progress(if lost_now == 0 {
                format!("all {} shards replicated on live nodes", rows.len())
            } else {
                format!("all {} shards replicated on live nodes but the {lost_now} lost", rows.len() - lost_now)
            });
            return Ok(());
        }
        if left != last && !rows.is_empty() {
            progress(format!("{left} of {} shards still catching up", rows.len()));
            last = left;
        }
        if Instant::now() >= deadline {
            return Err(RecoveryError::Invalid(format!(
                "{left} shards are not back to full replication after {} s (recovery goes on; check `flotilla admin shards`)",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{Epoch, Replica, ReplicaRole, ShardDescriptor};

    fn row(shard: u64, nodes: &[u64], leader: Option<u64>) -> ShardRow {
        let replicas = nodes.iter().map(|n| Replica { node: NodeId(*n), role: ReplicaRole::Voter }).collect();
        ShardRow {
            descriptor: ShardDescriptor {
                id: ShardId(shard),
                start: Vec::new(),
                end: None,
                epoch: Epoch::default(),
                replicas,
            },
            leader: leader.map(NodeId),
            applied: nodes.iter().filter(|n| !(2..=3).contains(*n)).map(|n| (NodeId(*n), 7)).collect(),
            bytes: 0,
            moving: None,
            merging: None,
        }
    }

    #[test]
    fn a_lost_shard_is_not_waited_for() {
        let dead: BTreeSet<NodeId> = [NodeId(2), NodeId(3)].into();
        // Shard 1 is back on 1, 4, 5; shard 2 had only 2 and 3 and is lost.
        let rows = [row(1, &[1, 4, 5], Some(1)), row(2, &[2, 3], None)];
        assert_eq!(not_replicated(&rows, &dead, &[ShardId(2)]), 0, "done: the lost shard never comes back");
        assert_eq!(not_replicated(&rows, &dead, &[]), 1);
        // A shard not lost that still names a dead node is waited for.
        let rows = [row(1, &[1, 3, 4], Some(1)), row(2, &[2, 3], None)];
        assert_eq!(not_replicated(&rows, &dead, &[ShardId(2)]), 1);
    }
}
