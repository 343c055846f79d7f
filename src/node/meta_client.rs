//! The meta client: this node's copy of the meta state (the placement [`MetaState`]) and the
//! one way to change it, [`Node::meta_exec`], which runs an operation on the meta leader (here,
//! or forwarded to it) by read → apply → compare-and-swap. On the meta leader it also holds the
//! nodes' live reports, which are kept in memory rather than written to the meta group.

use super::{Node, NodeError, LIVE_REPORT_AGE_MAX_MS, META_OP_TIMEOUT_MS, PEER_REQUEST_TIMEOUT_MS};
use crate::meta::{self, META_GROUP, META_STATE_KEY};
use crate::peer_wire::{MetaOp, PeerRequest, PeerResponse};
use crate::placement::{MetaState, NodeId, NodeReport};
use crate::raft::{RaftError, ReadMode, Role};
use crate::shard::{HostError, KvCommand, KvResponse};
use crate::wire::AdminResponse;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::warn;

/// The meta client's state, one lock per concern.
#[derive(Default)]
pub(super) struct MetaClient {
    /// This node's copy of the meta state; it never goes back in time ([`Node::set_view`]).
    view: RwLock<Arc<MetaState>>,
    /// Serializes this node's meta read-modify-writes (fewer CAS retries).
    lock: tokio::sync::Mutex<()>,
    /// When each node's report last reached this node as meta leader (`admin nodes`' report
    /// ages). Unlike `live`, not cleared when a new tenure starts.
    report_seen: Mutex<HashMap<NodeId, Instant>>,
    /// Reports received as meta leader: kept in memory, not written to the meta group (they
    /// change every second); a new meta leader has them again within one report interval.
    live: Mutex<HashMap<NodeId, (NodeReport, Instant)>>,
    /// Since when this node leads the meta group (see [`Node::leads_meta`]).
    leader_since: Mutex<Option<Instant>>,
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
        self.inner.meta.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Replaces the view, unless `state` is older than the one held (a lagging meta replica
    /// read after a newer state came from the meta leader): a view never goes back in time.
    pub(super) fn set_view(&self, state: MetaState) {
        if let Ok(mut v) = self.inner.meta.view.write() {
            if !is_older(&state, v.as_ref()) {
                *v = Arc::new(state);
            }
        }
    }

    /// Re-reads the local replica of the meta state, if this node holds one.
    pub(crate) async fn refresh_local_view(&self) -> bool {
        if !self.inner.host.groups().contains(&META_GROUP) {
            return false;
        }
        match self.inner.meta_sm.get(META_STATE_KEY.to_vec()).await {
            Ok(bytes) => match meta::decode_state(bytes.as_deref()) {
                Ok(mut s) => {
                    // On the meta leader, the reports it holds in memory, as meta ops see them.
                    if self.meta_tenure().is_some() {
                        self.overlay_live_reports(&mut s);
                    }
                    self.set_view(s);
                    true
                }
                Err(e) => {
                    warn!(error = %e, "local meta state does not decode");
                    false
                }
            },
            Err(e) => {
                warn!(error = %e, "cannot read the local meta state");
                false
            }
        }
    }

    /// Runs `op` on the meta leader (here, or forwarded) and returns the state after it and
    /// the op's answer.
    pub async fn meta_exec(&self, op: MetaOp, forwarded: bool) -> Result<(MetaState, AdminResponse), NodeError> {
        let deadline = Instant::now() + Duration::from_millis(META_OP_TIMEOUT_MS);
        let mut peer_turn = 0usize;
        let mut last_err = String::from("no meta leader reachable");
        while Instant::now() < deadline {
            if *self.inner.shutdown.borrow() {
                return Err(NodeError::MetaUnavailable("the node is shutting down".into()));
            }
            let target = if self.inner.host.groups().contains(&META_GROUP) {
                match self.meta_local(&op).await {
                    Ok(r) => {
                        if let MetaOp::Report { node, .. } = &op {
                            if let Ok(mut m) = self.inner.meta.report_seen.lock() {
                                m.insert(*node, Instant::now());
                            }
                        }
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
                // No local replica: ask the nodes we know of in turn.
                let mut known: Vec<NodeId> = self.meta_view().nodes.keys().copied().collect();
                known.extend(self.inner.config.peers.iter().map(|p| p.0));
                if let Ok(p) = self.inner.extra_peers.lock() {
                    known.extend(p.iter().copied());
                }
                known.sort();
                known.dedup();
                known.retain(|n| *n != self.inner.id);
                if known.is_empty() {
                    return Err(NodeError::Meta("no peers known".into()));
                }
                peer_turn += 1;
                Some(known[peer_turn % known.len()])
            };
            if let Some(to) = target {
                // To the leader: final hop. To any node (we hold no meta replica): it may forward
                // once to its leader.
                let hop = self.inner.host.groups().contains(&META_GROUP);
                let req = PeerRequest::Meta { op: op.clone(), forwarded: hop };
                match self
                    .inner
                    .transport
                    .request(to, req.encode(), Duration::from_millis(PEER_REQUEST_TIMEOUT_MS))
                    .await
                {
                    Ok(bytes) => match PeerResponse::decode(&bytes) {
                        Ok(PeerResponse::Meta { state, answer }) => {
                            let s = meta::decode_state(Some(&state)).map_err(NodeError::Meta)?;
                            self.set_view(s.clone());
                            return Ok((s, answer));
                        }
                        Ok(PeerResponse::Refused(e)) => return Err(NodeError::Meta(e)),
                        Ok(other) => last_err = format!("meta leader {to} answered {other:?}"),
                        Err(e) => last_err = e.to_string(),
                    },
                    Err(e) => last_err = format!("node {to}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(NodeError::MetaUnavailable(format!("timed out: {last_err}")))
    }

    async fn meta_local(&self, op: &MetaOp) -> Result<(MetaState, AdminResponse), MetaTry> {
        let _guard = self.inner.meta.lock.lock().await;
        let g = META_GROUP;
        loop {
            let cur = self.inner.host.get(g, META_STATE_KEY.to_vec(), ReadMode::ReadIndex).await.map_err(meta_try)?;
            let stored = meta::decode_state(cur.as_deref()).map_err(MetaTry::Refused)?;
            let mut state = stored.clone();
            self.overlay_live_reports(&mut state);
            let mut next = state.clone();
            let answer = meta::run_op(op, &mut next, &self.inner.config.balancer).map_err(MetaTry::Refused)?;
            self.inner.stats.meta_ops.fetch_add(1, Ordering::Relaxed);
            // The live reports follow what the op did to them (a report replaces its node's; a
            // split drops the split shard's size and split key).
            if let Ok(mut live) = self.inner.meta.live.lock() {
                if let MetaOp::Report { node, .. } = op {
                    live.insert(*node, (NodeReport::default(), Instant::now()));
                }
                for (node, (report, _)) in live.iter_mut() {
                    if let Some(info) = next.nodes.get(node) {
                        *report = info.report.clone();
                    }
                }
            }
            // A report that changes nothing but reports is kept in memory, not written.
            if matches!(op, MetaOp::Report { .. }) && without_reports(&next) == without_reports(&stored) {
                self.set_view(next.clone());
                return Ok((next, answer));
            }
            if next == state {
                self.set_view(state.clone());
                return Ok((state, answer));
            }
            let bytes = meta::encode_state(&next).map_err(MetaTry::Refused)?;
            self.inner.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
            let cas = KvCommand::Cas { key: META_STATE_KEY.to_vec(), expected: cur, new: Some(bytes) };
            match self.inner.host.write(g, cas).await.map_err(meta_try)? {
                KvResponse::Done { .. } => {
                    self.set_view(next.clone());
                    return Ok((next, answer));
                }
                KvResponse::CasFailed { .. } => continue,
                KvResponse::Refused(e) => return Err(MetaTry::Refused(e)),
                KvResponse::Split { .. } | KvResponse::OutOfRange => {
                    return Err(MetaTry::Refused("an unexpected answer to the meta compare-and-swap".into()))
                }
            }
        }
    }

    /// Replaces every node's stored report with the one this node received as meta leader
    /// within [`LIVE_REPORT_AGE_MAX_MS`], or with an empty report (nothing known) if none:
    /// stored reports are only as fresh as the last meta write, which may be long ago.
    fn overlay_live_reports(&self, state: &mut MetaState) {
        let Ok(live) = self.inner.meta.live.lock() else { return };
        let max_age = Duration::from_millis(LIVE_REPORT_AGE_MAX_MS);
        for (node, info) in state.nodes.iter_mut() {
            info.report = match live.get(node) {
                Some((report, at)) if at.elapsed() < max_age => report.clone(),
                _ => NodeReport::default(),
            };
        }
    }

    /// How long this node has led the meta group without a break, as of the last check
    /// ([`Node::leads_meta`]); `None` if it does not lead it.
    pub(super) fn meta_tenure(&self) -> Option<Duration> {
        self.inner.meta.leader_since.lock().ok().and_then(|s| s.map(|at| at.elapsed()))
    }

    /// Whether this node leads the meta group; records when it started to (a new meta leader
    /// holds no live reports yet, and forgets the ones of an earlier tenure).
    pub(super) async fn leads_meta(&self) -> bool {
        let infos = self.inner.host.group_info().await.unwrap_or_default();
        let leads = infos.iter().any(|i| i.group == META_GROUP && i.role == Role::Leader);
        if let Ok(mut since) = self.inner.meta.leader_since.lock() {
            match (leads, since.is_some()) {
                (true, false) => {
                    *since = Some(Instant::now());
                    if let Ok(mut live) = self.inner.meta.live.lock() {
                        live.clear();
                    }
                }
                (false, true) => *since = None,
                _ => {}
            }
        }
        leads
    }
}

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

/// Whether view `a` is older than view `b`: it allocated fewer shard ids, or some shard is at
/// an older epoch. Both come from one history (the meta group's), so no view is older in one
/// shard and newer in another.
fn is_older(a: &MetaState, b: &MetaState) -> bool {
    a.next_shard_id < b.next_shard_id
        || a.map.shards().any(|d| {
            b.map
                .get(d.id)
                .is_some_and(|o| (d.epoch.version, d.epoch.conf_version) < (o.epoch.version, o.epoch.conf_version))
        })
}

/// `state` with every node's report emptied: what a report alone does not change.
fn without_reports(state: &MetaState) -> MetaState {
    let mut s = state.clone();
    for info in s.nodes.values_mut() {
        info.report = NodeReport::default();
    }
    s
}
