//! Serving requests: each client or peer request is decoded, counted and answered
//! ([`Node::handle`]). A data request is checked against this node's copy of the map (shard,
//! epoch, key in range) and then served by the shard host on the leader (or by the local
//! replica for stale reads); host errors become the answers a client acts on (redirect, retry,
//! unknown outcome).

use super::meta_client::MetaAnswer;
use super::{view_of, Inner, Node, NodeError, PEER_REQUEST_TIMEOUT_MS};
use crate::authz;
use crate::meta::shard_range;
use crate::peer_wire::{is_peer_message, MetaOp, MetaUpdate, PeerRequest, PeerResponse};
use crate::placement::{Epoch, ShardDescriptor, ShardId};
use crate::raft::{RaftError, ReadMode};
use crate::shard::{HostError, KvCommand, KvResponse, KvStateMachine, ScanEnd, ScanError, ScanPage};
use crate::transport::{IncomingRequest, PeerIdentity, RequestHandler, Serving};
use crate::wire::{
    check_user_key, check_value, AdminRequest, ReadConsistency, Request, Response, ScanEnd as WireScanEnd,
    SCAN_LIMIT_MAX, SCAN_RESPONSE_BYTES_MAX,
};
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;
use tracing::{debug, info};

/// Serves the transport's requests in the transport's own tasks, as many at once as the
/// node's request slots allow. It holds the node weakly: the transport, which the node owns,
/// must not keep the node (its store, its socket) alive after the node is dropped.
pub(super) struct RequestServer(pub(super) Weak<Inner>);

impl RequestHandler for RequestServer {
    fn serve(&self, mut req: IncomingRequest) -> Serving {
        let inner = self.0.clone();
        Box::pin(async move {
            // A node gone or stopping does not answer: the dropped responder answers with an
            // error. Checked again once the slot is taken: shutdown sets the flag, then takes
            // every slot, so it waits for the requests that passed the check.
            let Some(inner) = inner.upgrade() else { return };
            let stopping = || *inner.shutdown.borrow();
            if stopping() {
                return;
            }
            // A request whose requester was told it timed out does not start later: it could
            // overwrite what the requester did since, and waiting ones would pile up.
            let slot = tokio::select! {
                slot = inner.requests_limit.clone().acquire_owned() => slot,
                () = req.responder.closed() => return,
            };
            let Ok(_slot) = slot else { return };
            if stopping() {
                return;
            }
            Node { inner }.serve(req).await;
        })
    }
}

impl Node {
    pub(super) async fn serve(&self, req: IncomingRequest) {
        let IncomingRequest { from, body, responder } = req;
        if let PeerIdentity::Node(id) = &from {
            if self.removed_for_good(*id) {
                // A node lost for good (unsafe recovery) is not answered: dropping the
                // responder fails its request.
                return;
            }
        }
        if is_peer_message(&body) {
            self.inner.stats.requests.fetch_add(1, Ordering::Relaxed);
            responder.respond(Box::pin(self.serve_peer(&from, &body)).await.encode());
            return;
        }
        let resp = match Request::decode(&body) {
            Ok(r) => self.handle(&from, r).await,
            Err(e) => {
                self.inner.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                Response::Invalid(format!("bad request: {e}"))
            }
        };
        self.inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        if matches!(
            resp,
            Response::NotLeader { .. }
                | Response::StaleEpoch { .. }
                | Response::WrongShard { .. }
                | Response::UnknownShard
                | Response::OutOfRange { .. }
        ) {
            self.inner.stats.redirects.fetch_add(1, Ordering::Relaxed);
        }
        responder.respond(resp.encode());
    }

    /// Answers one request (also usable in-process). Admin requests, refused ones included,
    /// are written to the audit log ([`authz::AUDIT_TARGET`]).
    pub async fn handle(&self, from: &PeerIdentity, req: Request) -> Response {
        // A tenant sees no shard boundary outside its prefix (authz::conceal).
        let Request::Admin(admin) = &req else { return authz::conceal(from, self.handle_authorized(from, req).await) };
        let (operation, request) = (authz::operation(&req), format!("{admin:?}"));
        // A backup reads each shard copy in chunks of a megabyte: its start and end are
        // audited, the reads between (which refusal would have stopped at the start) only at
        // debug level, or a large backup would flood the audit log.
        let chunk = matches!(admin, AdminRequest::BackupRead { .. });
        let resp = self.handle_authorized(from, req).await;
        let outcome = authz::audit_outcome(&resp);
        if chunk && matches!(resp, Response::Admin(_)) {
            debug!(target: authz::AUDIT_TARGET, node = %self.inner.id, who = %authz::who(from), operation, request, outcome, "admin request");
        } else {
            info!(target: authz::AUDIT_TARGET, node = %self.inner.id, who = %authz::who(from), operation, request, outcome, "admin request");
        }
        resp
    }

    async fn handle_authorized(&self, from: &PeerIdentity, req: Request) -> Response {
        // Before any routing or forwarding: a refused request costs no work and reaches no one.
        if let Err(denied) = authz::check(from, &req) {
            self.inner.stats.denied.fetch_add(1, Ordering::Relaxed);
            debug!(target: "flotilla::authz", peer = %from, %denied, "request refused");
            return Response::Denied(denied);
        }
        match req {
            Request::Get { shard, epoch, key, consistency } => {
                if let Err(e) = check_user_key(&key) {
                    return Response::Invalid(e);
                }
                if let Err(r) = self.route(shard, epoch, &key).await {
                    return r;
                }
                if consistency == ReadConsistency::Stale {
                    let sm = match self.local_replica(shard).await {
                        Ok(sm) => sm,
                        Err(r) => return r,
                    };
                    // The replica's own range, which a split narrows before this node's map
                    // may show it: the key may live in another shard now.
                    if !sm.range().contains(&key) {
                        return Response::OutOfRange { shard };
                    }
                    return match sm.get(key).await {
                        Ok(v) => Response::Value(v),
                        Err(e) => Response::Unavailable(e.to_string()),
                    };
                }
                match self.inner.host.get(shard, key, read_mode(consistency)).await {
                    Ok(v) => Response::Value(v),
                    Err(e) => self.host_error(e, false),
                }
            }
            Request::Put { shard, epoch, key, value } => {
                if let Err(e) = check_user_key(&key).and_then(|_| check_value(&value)) {
                    return Response::Invalid(e);
                }
                self.write(shard, epoch, KvCommand::Put { key, value }).await
            }
            Request::Delete { shard, epoch, key } => {
                if let Err(e) = check_user_key(&key) {
                    return Response::Invalid(e);
                }
                self.write(shard, epoch, KvCommand::Delete { key }).await
            }
            Request::Cas { shard, epoch, key, expected, new } => {
                let sizes = expected.iter().chain(new.iter()).try_for_each(|v| check_value(v));
                if let Err(e) = check_user_key(&key).and(sizes) {
                    return Response::Invalid(e);
                }
                self.write(shard, epoch, KvCommand::Cas { key, expected, new }).await
            }
            Request::Update { shard, epoch, key, op } => {
                let size = match &op {
                    crate::shard::UpdateOp::Append(tail) => check_value(tail),
                    _ => Ok(()),
                };
                if let Err(e) = check_user_key(&key).and(size) {
                    return Response::Invalid(e);
                }
                self.write(shard, epoch, KvCommand::Update { key, op }).await
            }
            Request::InsertAll { shard, epoch, pairs } => {
                if pairs.is_empty() {
                    return Response::Invalid("an insert of no keys".into());
                }
                if let Err(e) = pairs.iter().try_for_each(|(k, v)| check_user_key(k).and_then(|_| check_value(v))) {
                    return Response::Invalid(e);
                }
                // Every key in the shard, by this node's map at the request's epoch: keys of
                // several shards cannot be set atomically, so the request is refused, not split.
                let d = match self.route_shard(shard, epoch).await {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                if let Some((first, _)) = pairs.first() {
                    if let Err(r) = self.route_key(&d, first) {
                        return r;
                    }
                }
                if pairs.iter().any(|(k, _)| !d.contains(k)) {
                    return Response::Invalid(flotilla_resp::error::CROSS_SLOT.into());
                }
                self.write(shard, epoch, KvCommand::InsertAll { pairs }).await
            }
            Request::Scan { shard, epoch, start, end, limit, consistency } => {
                // A page of no pairs that says "more" could not move a scan on.
                if limit == 0 {
                    return Response::Invalid("a scan's limit must be at least 1".into());
                }
                let limit = (limit as usize).min(SCAN_LIMIT_MAX);
                // A tenant's scan sees only its prefix's keys (crate::authz).
                let (start, end, cut_end) = match authz::grant_of(from).and_then(|g| g.prefix.as_deref()) {
                    None => (start, end, None),
                    Some(prefix) => match authz::scope_scan(prefix, start, end) {
                        authz::ScanScope::Nothing(end) => return Response::Page { pairs: Vec::new(), end },
                        authz::ScanScope::Range { start, end, cut_end } => (start, end, cut_end),
                    },
                };
                let d = match self.route_shard(shard, epoch).await {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                // From the shard's first user key at the earliest (the map's first shard starts
                // at the empty key, its replica after the reserved meta prefix).
                let first = shard_range(&d).start;
                let from = if start < first { first } else { start };
                if let Err(r) = self.route_key(&d, &from) {
                    return r;
                }
                // Never past the shard's end in the map: what lies beyond is another shard's,
                // even while this replica's range (not split yet) still covers it.
                let end = match (end, d.end) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                // The replica refuses a start outside its range now and bounds the page by it:
                // a split may have narrowed it before this node's map shows the split.
                let page = if consistency == ReadConsistency::Stale {
                    let sm = match self.local_replica(shard).await {
                        Ok(sm) => sm,
                        Err(r) => return r,
                    };
                    match sm.scan(from, end, limit).await {
                        Ok(page) => page,
                        Err(ScanError::OutOfRange(_)) => return Response::OutOfRange { shard },
                        Err(ScanError::Storage(e)) => return Response::Unavailable(e.to_string()),
                    }
                } else {
                    match self.inner.host.scan(shard, from, end, limit, read_mode(consistency)).await {
                        Ok(page) => page,
                        Err(e) => return self.host_error(e, false),
                    }
                };
                match cut_scan(page) {
                    Response::Page { pairs, end } => Response::Page { pairs, end: authz::widen_page_end(end, cut_end) },
                    other => other,
                }
            }
            Request::ClusterView { fresh } => {
                let state = if fresh {
                    match Box::pin(self.meta_exec(MetaOp::Read, false)).await {
                        Ok((_, s, _)) => s,
                        Err(e) => return Response::Unavailable(e.to_string()),
                    }
                } else {
                    self.meta_view()
                };
                Response::View(view_of(&state))
            }
            Request::MapSince { since, from: start, limit, progress, fresh } => {
                // The read brings this node's view to the meta leader's state (the changes
                // since the view cross the network, not the map), which the answer is read from.
                if fresh {
                    if let Err(e) = Box::pin(self.meta_exec(MetaOp::Read, false)).await {
                        return Response::Unavailable(e.to_string());
                    }
                }
                self.map_since(from, since, start, limit, progress)
            }
            Request::Admin(a) => Box::pin(self.handle_admin(from, a)).await,
        }
    }

    /// An admin request. The caller boxes its future, as it does the peer protocol's and the
    /// meta reads': those futures are large, and every request's spawned task would otherwise
    /// be as large (5 KiB instead of 2 KiB, copied at each spawn).
    async fn handle_admin(&self, from: &PeerIdentity, a: AdminRequest) -> Response {
        // Reports (who leads each shard, applied indexes, report ages) are held only
        // by the meta leader: a client's request that reads them is answered there, so
        // that the state with every report need not cross the network (one hop; a node
        // never forwards a node's request).
        let reads_reports = matches!(
            a,
            AdminRequest::Nodes
                | AdminRequest::Status
                | AdminRequest::Shards
                | AdminRequest::ShardsPage { .. }
                | AdminRequest::Move { .. }
        );
        if reads_reports && !matches!(from, PeerIdentity::Node(_)) {
            if let Some(leader) = self.meta_leader_elsewhere().await {
                let req = Request::Admin(a.clone());
                let timeout = Duration::from_millis(PEER_REQUEST_TIMEOUT_MS);
                match self.inner.transport.request(leader, req.encode(), timeout).await {
                    // The leader's answer, whatever it is: run here again, a move it
                    // started or refused would be judged a second time.
                    Ok(bytes) => match Response::decode(&bytes) {
                        Ok(resp) => return resp,
                        Err(e) => return Response::Unavailable(format!("meta leader {leader}: {e}")),
                    },
                    // A move may have started on the leader before its answer was
                    // lost: neither run here nor left for the client to send elsewhere
                    // (an `Unavailable` would be), which would start it a second time.
                    Err(e) if matches!(a, AdminRequest::Move { .. }) => {
                        return Response::Invalid(format!(
                            "the meta leader (node {leader}) did not answer ({e}): the move may have \
                             started; see `flotilla admin shards`"
                        ))
                    }
                    Err(_) => {}
                }
            }
        }
        self.admin(a).await
    }

    /// Answers a request of the peer protocol: nodes only, checked before decoding.
    async fn serve_peer(&self, from: &PeerIdentity, body: &[u8]) -> PeerResponse {
        if !matches!(from, PeerIdentity::Node(_)) {
            return PeerResponse::Refused("meta operations are for nodes; use admin requests".into());
        }
        let (op, forwarded, since) = match PeerRequest::decode(body) {
            Ok(PeerRequest::Meta { op, forwarded }) => (op, forwarded, None),
            Ok(PeerRequest::MetaSince { op, since, forwarded }) => (op, forwarded, Some(since)),
            Ok(PeerRequest::HoldMetaReplica) => return self.hold_meta_replica().await,
            Ok(PeerRequest::MetaPart { revision, offset }) => return self.meta_part(revision, offset),
            Err(e) => {
                self.inner.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                return PeerResponse::Refused(format!("bad peer request: {e}"));
            }
        };
        // On the meta leader, or forwarded once to it. A `Meta` request is answered with the
        // whole state, the live reports in it: read on the leader, never rebuilt from changes.
        let want = if since.is_some() { MetaAnswer::View } else { MetaAnswer::WithReports };
        let (revision, state, answer) = match self.meta_exec_as(op, forwarded, want).await {
            Ok(r) => r,
            Err(NodeError::Meta(e)) => return PeerResponse::Refused(e),
            Err(e) => return PeerResponse::Unavailable(e.to_string()),
        };
        let Some(since) = since else {
            return match self.whole_state(revision, &state) {
                Ok(state) => PeerResponse::Meta { state, answer },
                Err(e) => PeerResponse::Unavailable(e),
            };
        };
        let changes = since.and_then(|s| self.meta_changes(s, revision));
        let update = match changes {
            Some(changes) => MetaUpdate::Changes(changes),
            None => match self.whole_state(revision, &state) {
                Ok(state) => MetaUpdate::Whole(state),
                Err(e) => return PeerResponse::Unavailable(e),
            },
        };
        // Where the asker's next request goes: here if this node leads the meta group, else the
        // leader it knows of (this node forwarded the op there).
        let leader = match self.meta_tenure() {
            Some(_) => Some(self.inner.id),
            None => self.meta_leader_elsewhere().await,
        };
        PeerResponse::MetaSince { revision, update, leader, answer }
    }

    /// A reader of this node's replica of `shard` for stale reads: its applied state, however
    /// far behind, but only once the replica has joined its group (applied from its leader's
    /// snapshot or log). A replica created empty and not caught up yet holds none of the
    /// shard's data: it answers `Unavailable` rather than "no such key".
    async fn local_replica(&self, shard: ShardId) -> Result<KvStateMachine, Response> {
        let sm = self.inner.host.state_machine(shard).ok_or(Response::UnknownShard)?;
        match sm.has_joined(self.inner.id).await {
            Ok(true) => Ok(sm),
            Ok(false) => Err(Response::Unavailable(format!(
                "the replica of shard {shard} on node {} has not caught up with its group yet: read from the leader",
                self.inner.id
            ))),
            Err(e) => Err(Response::Unavailable(e.to_string())),
        }
    }

    pub(super) async fn write(&self, shard: ShardId, epoch: Epoch, cmd: KvCommand) -> Response {
        if let Err(r) = self.route(shard, epoch, cmd.key()).await {
            return r;
        }
        match self.inner.host.write(shard, cmd).await {
            Ok(KvResponse::Done { previous }) => Response::Written { previous },
            Ok(KvResponse::CasFailed { current }) => Response::CasFailed { current },
            Ok(KvResponse::Refused(e)) => Response::Invalid(e),
            Ok(KvResponse::Split { .. } | KvResponse::Frozen { .. } | KvResponse::Merged { .. }) => {
                Response::Invalid("a write answered as a change of the shard".into())
            }
            // A split applied between the routing check and the command; nothing changed.
            Ok(KvResponse::OutOfRange) => Response::OutOfRange { shard },
            Err(e) => self.host_error(e, true),
        }
    }

    /// Checks a request's routing against this node's map (re-reading it once on a mismatch,
    /// in case the client saw a newer map).
    pub(super) async fn route_shard(&self, shard: ShardId, epoch: Epoch) -> Result<ShardDescriptor, Response> {
        for attempt in 0..2 {
            let view = self.meta_view();
            match view.map.get(shard) {
                Some(d) if d.epoch == epoch => return Ok(d.clone()),
                Some(d) if attempt == 1 => return Err(Response::StaleEpoch { descriptor: d.clone() }),
                None if attempt == 1 => return Err(Response::UnknownShard),
                _ => {
                    self.refresh_local_view().await;
                }
            }
        }
        Err(Response::UnknownShard)
    }

    async fn route(&self, shard: ShardId, epoch: Epoch, key: &[u8]) -> Result<(), Response> {
        let d = self.route_shard(shard, epoch).await?;
        self.route_key(&d, key)
    }

    /// Checks that `key` is in the shard `d` (as this node's map has it), and counts the request
    /// in the shard's load: every data request passes here once.
    fn route_key(&self, d: &ShardDescriptor, key: &[u8]) -> Result<(), Response> {
        if !d.contains(key) {
            return match self.meta_view().map.lookup(key) {
                Some(owner) => Err(Response::WrongShard { owner: owner.clone() }),
                None => Err(Response::UnknownShard),
            };
        }
        self.record_load(d, key);
        Ok(())
    }

    pub(super) fn host_error(&self, e: HostError, write: bool) -> Response {
        match e {
            HostError::UnknownGroup(_) => Response::UnknownShard,
            HostError::Raft(RaftError::NotLeader { leader }) => {
                let addr = leader.and_then(|l| self.meta_view().nodes.get(&l).map(|n| n.addr.clone()));
                Response::NotLeader { leader, addr }
            }
            // The replica's range narrowed (a split) while this node's map still routes the
            // key here: the client must look for a newer map, not retry here.
            HostError::KeyOutOfRange(g) => Response::OutOfRange { shard: g },
            // Refused before the command entered the log, or its entry was replaced: nothing
            // was applied, and the client may retry.
            e @ (HostError::Stopped
            | HostError::Overloaded(_)
            | HostError::TooLarge(_)
            | HostError::Raft(
                RaftError::ChangeInProgress
                | RaftError::TransferInProgress
                | RaftError::Overloaded { .. }
                | RaftError::Dropped { .. },
            )) => Response::Unavailable(e.to_string()),
            // Anything else may have happened after the write was proposed (a timeout, the
            // group stopping or failing with it pending): its outcome is unknown.
            e if write => Response::Unknown(e.to_string()),
            other => Response::Unavailable(other.to_string()),
        }
    }
}

/// Cuts a scan page to [`SCAN_RESPONSE_BYTES_MAX`] (keeping at least one pair); a page cut
/// short says "more", so the client continues after its last pair.
fn cut_scan(page: ScanPage) -> Response {
    let ScanPage { mut pairs, end } = page;
    let mut total = 0usize;
    let mut keep = pairs.len();
    for (i, (k, v)) in pairs.iter().enumerate() {
        total += k.len() + v.len();
        if total > SCAN_RESPONSE_BYTES_MAX && i > 0 {
            keep = i;
            break;
        }
    }
    if keep < pairs.len() {
        pairs.truncate(keep);
        return Response::Page { pairs, end: WireScanEnd::More };
    }
    let end = match end {
        ScanEnd::More => WireScanEnd::More,
        ScanEnd::Covered(e) => WireScanEnd::Covered(e),
    };
    Response::Page { pairs, end }
}

fn read_mode(c: ReadConsistency) -> ReadMode {
    match c {
        ReadConsistency::Linearizable => ReadMode::ReadIndex,
        ReadConsistency::Lease => ReadMode::Lease,
        // Never reaches the host's read path (served from the local replica).
        ReadConsistency::Stale => ReadMode::ReadIndex,
    }
}
