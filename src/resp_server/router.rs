//! Keyed requests of the front door, routed inside the node the way [`crate::Client`] routes
//! them from outside: the key's shard and epoch from the node's copy of the map, the request
//! served here when this node leads the shard ([`Node::handle`], the same checks as for a
//! client) and sent to the leader over the transport otherwise; `NotLeader` followed,
//! `StaleEpoch`/`WrongShard`/`OutOfRange` answered by refreshing the node's map, retries with
//! backoff until the operation's deadline. As in the client, a write whose outcome is unknown
//! (sent, no answer) is never retried: the Redis client gets an error saying so.

use crate::placement::{NodeId, ShardDescriptor, ShardId};
use crate::transport::{PeerIdentity, TransportError};
use crate::wire::{check_user_key, check_value, ReadConsistency, Request, Response, ScanEnd, UpdateOp, SCAN_LIMIT_MAX};
use crate::Node;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Deadline of one operation, retries included.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one attempt on another node.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MS_MIN: u64 = 5;
const BACKOFF_MS_MAX: u64 = 200;

/// Why an operation failed, and what it means for the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// A write may or may not have been applied.
    Unknown(String),
    /// Nothing changed; no node could serve it in time.
    Unavailable(String),
    /// The request is wrong (bad key, value too large).
    Invalid(String),
}

impl RouteError {
    /// The Redis error text: `ERR` and what happened.
    pub fn message(&self) -> String {
        match self {
            RouteError::Unknown(e) => format!("ERR outcome unknown (the write may or may not have been applied): {e}"),
            RouteError::Unavailable(e) => format!("ERR unavailable, nothing was changed: {e}"),
            RouteError::Invalid(e) => format!("ERR {e}"),
        }
    }
}

/// The outcome of a compare-and-swap.
pub enum Swap {
    /// Swapped.
    Done,
    /// The value was not the expected one: here is the current one.
    Failed(Option<Vec<u8>>),
}

/// One shard's page of a scan, and where the scan goes on (`None`: the end of the keys).
pub struct Page {
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    pub next: Option<Vec<u8>>,
}

enum CallError {
    /// Not sent, and another attempt may succeed.
    NotSent(String),
    /// Sent, or perhaps sent: the outcome is unknown.
    Sent(String),
    /// Not sent, and never will be: the request is too large for the transport.
    TooLarge(String),
}

/// Routes keyed requests for every connection of one listener. Remembers each shard's leader
/// as answers show it, so a request goes to the leader directly after the first redirect.
pub struct Router {
    node: Node,
    leaders: Mutex<HashMap<ShardId, NodeId>>,
}

impl Router {
    pub fn new(node: Node) -> Router {
        Router { node, leaders: Mutex::new(HashMap::new()) }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    fn leader_hint(&self, shard: ShardId) -> Option<NodeId> {
        self.leaders.lock().ok().and_then(|l| l.get(&shard).copied())
    }

    fn set_leader(&self, shard: ShardId, node: Option<NodeId>) {
        if let Ok(mut l) = self.leaders.lock() {
            match node {
                Some(n) => l.insert(shard, n),
                None => l.remove(&shard),
            };
        }
    }

    async fn call(&self, target: NodeId, req: Request, timeout: Duration) -> Result<Response, CallError> {
        if target == self.node.id() {
            return Ok(self.node.handle(&PeerIdentity::Node(target), req).await);
        }
        match self.node.transport().request(target, req.encode(), timeout).await {
            Ok(bytes) => Response::decode(&bytes).map_err(|e| CallError::Sent(format!("node {target}: {e}"))),
            // No retry makes a request smaller: a final answer, not a wait until the deadline.
            Err(e @ TransportError::TooLarge { .. }) => Err(CallError::TooLarge(format!(
                "the request is too large to send to node {target}, the shard's leader ({e}); nothing was changed"
            ))),
            Err(e @ (TransportError::Blocked(_) | TransportError::SelfPeer(_))) => {
                Err(CallError::NotSent(format!("node {target}: {e}")))
            }
            Err(e) => Err(CallError::Sent(format!("node {target}: {e}"))),
        }
    }

    /// Sends the request `make` builds for the shard holding `key` to a node that can serve it,
    /// following redirects until [`OP_TIMEOUT`].
    async fn keyed(
        &self,
        key: &[u8],
        write: bool,
        stale: bool,
        make: impl Fn(&ShardDescriptor) -> Request,
    ) -> Result<Response, RouteError> {
        let deadline = Instant::now() + OP_TIMEOUT;
        let mut backoff = BACKOFF_MS_MIN;
        let mut attempt = 0usize;
        let mut last = String::from("no attempt made");
        let me = self.node.id();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(RouteError::Unavailable(format!("deadline passed; last error: {last}")));
            }
            let view = self.node.meta_view();
            let Some(d) = view.map.lookup(key).cloned() else {
                last = "no shard map yet".into();
                self.node.refresh_local_view().await;
                sleep_backoff(&mut backoff, deadline).await;
                continue;
            };
            let replicas: Vec<NodeId> = d.replicas.iter().map(|r| r.node).collect();
            let voters: Vec<NodeId> = d.voters().collect();
            let here = replicas.contains(&me);
            // A stale read is served by any replica: this node's if it has one.
            let target = if stale && here {
                me
            } else if stale && !replicas.is_empty() {
                replicas[attempt % replicas.len()]
            } else if let Some(leader) = self.leader_hint(d.id) {
                leader
            } else if here && attempt == 0 {
                // Asking the local replica costs no hop, and it names the leader if it is not.
                me
            } else if voters.is_empty() {
                last = format!("shard {} has no voters", d.id);
                sleep_backoff(&mut backoff, deadline).await;
                continue;
            } else {
                voters[attempt % voters.len()]
            };
            let timeout = REQUEST_TIMEOUT.min(deadline - now);
            match self.call(target, make(&d), timeout).await {
                Err(CallError::TooLarge(e)) => return Err(RouteError::Invalid(e)),
                Err(CallError::NotSent(e)) => {
                    last = e;
                    self.set_leader(d.id, None);
                    attempt += 1;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Err(CallError::Sent(e)) => {
                    self.set_leader(d.id, None);
                    if write {
                        return Err(RouteError::Unknown(e));
                    }
                    last = e;
                    attempt += 1;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Ok(Response::NotLeader { leader, .. }) => {
                    last = format!("node {target} is not the leader of shard {}", d.id);
                    match leader {
                        Some(l) if l != target => self.set_leader(d.id, Some(l)),
                        _ => {
                            self.set_leader(d.id, None);
                            attempt += 1;
                            sleep_backoff(&mut backoff, deadline).await;
                        }
                    }
                }
                Ok(
                    r @ (Response::StaleEpoch { .. }
                    | Response::WrongShard { .. }
                    | Response::UnknownShard
                    | Response::OutOfRange { .. }),
                ) => {
                    last = format!("node {target}: routing of shard {} out of date: {r:?}", d.id);
                    self.set_leader(d.id, None);
                    attempt += 1;
                    // The other node's map may be ahead of this one's: catch up, and wait
                    // only while the map still routes the key the same way.
                    self.node.refresh_local_view().await;
                    let now_routed = self.node.meta_view().map.lookup(key).map(|x| (x.id, x.epoch));
                    if now_routed == Some((d.id, d.epoch)) {
                        sleep_backoff(&mut backoff, deadline).await;
                    }
                }
                Ok(Response::Unknown(e)) => {
                    self.set_leader(d.id, None);
                    if write {
                        return Err(RouteError::Unknown(e));
                    }
                    last = e;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Ok(Response::Unavailable(e)) => {
                    last = format!("node {target}: {e}");
                    self.set_leader(d.id, None);
                    attempt += 1;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Ok(Response::Invalid(e)) => return Err(RouteError::Invalid(e)),
                Ok(other) => {
                    if !stale {
                        self.set_leader(d.id, Some(target));
                    }
                    return Ok(other);
                }
            }
        }
    }

    /// Reads `key`.
    pub async fn get(&self, key: &[u8], consistency: ReadConsistency) -> Result<Option<Vec<u8>>, RouteError> {
        check_user_key(key).map_err(RouteError::Invalid)?;
        let stale = consistency == ReadConsistency::Stale;
        let make = |d: &ShardDescriptor| Request::Get { shard: d.id, epoch: d.epoch, key: key.to_vec(), consistency };
        match self.keyed(key, false, stale, make).await? {
            Response::Value(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), RouteError> {
        check_user_key(key).and_then(|_| check_value(value)).map_err(RouteError::Invalid)?;
        let make = |d: &ShardDescriptor| Request::Put {
            shard: d.id,
            epoch: d.epoch,
            key: key.to_vec(),
            value: value.to_vec(),
        };
        match self.keyed(key, true, false, make).await? {
            Response::Written { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes `key`; the value it had.
    pub async fn delete(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RouteError> {
        check_user_key(key).map_err(RouteError::Invalid)?;
        let make = |d: &ShardDescriptor| Request::Delete { shard: d.id, epoch: d.epoch, key: key.to_vec() };
        match self.keyed(key, true, false, make).await? {
            Response::Written { previous } => Ok(previous),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets `key` to `new` if it holds `expected` (`None`: absent).
    pub async fn cas(&self, key: &[u8], expected: Option<&[u8]>, new: Option<&[u8]>) -> Result<Swap, RouteError> {
        check_user_key(key).map_err(RouteError::Invalid)?;
        for v in expected.iter().chain(new.iter()) {
            check_value(v).map_err(RouteError::Invalid)?;
        }
        let make = |d: &ShardDescriptor| Request::Cas {
            shard: d.id,
            epoch: d.epoch,
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        };
        match self.keyed(key, true, false, make).await? {
            Response::Written { .. } => Ok(Swap::Done),
            Response::CasFailed { current } => Ok(Swap::Failed(current)),
            other => Err(unexpected(&other)),
        }
    }

    /// Changes `key`'s value by `op` where it is applied (no read before, no retry); the value
    /// before.
    pub async fn update(&self, key: &[u8], op: UpdateOp) -> Result<Option<Vec<u8>>, RouteError> {
        check_user_key(key).map_err(RouteError::Invalid)?;
        let make =
            |d: &ShardDescriptor| Request::Update { shard: d.id, epoch: d.epoch, key: key.to_vec(), op: op.clone() };
        match self.keyed(key, true, false, make).await? {
            Response::Written { previous } => Ok(previous),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets every key of `pairs` (all of one shard) if none exists, atomically; whether it did.
    /// Keys of several shards are refused (`RouteError::Invalid` starting `CROSSSLOT`).
    pub async fn insert_all(&self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<bool, RouteError> {
        let Some((first, _)) = pairs.first() else { return Err(RouteError::Invalid("no keys".into())) };
        for (key, value) in &pairs {
            check_user_key(key).and_then(|_| check_value(value)).map_err(RouteError::Invalid)?;
        }
        let make = |d: &ShardDescriptor| Request::InsertAll { shard: d.id, epoch: d.epoch, pairs: pairs.clone() };
        match self.keyed(first, true, false, make).await? {
            Response::Written { .. } => Ok(true),
            Response::CasFailed { .. } => Ok(false),
            other => Err(unexpected(&other)),
        }
    }

    /// One page of at most `limit` pairs from `start` (inclusive), within the shard holding
    /// `start` and before `end` if given; where the scan goes on is what the serving node says,
    /// never this node's idea of the shard's end, which a split may have made wrong.
    pub async fn scan_page(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        consistency: ReadConsistency,
    ) -> Result<Page, RouteError> {
        let limit = u32::try_from(limit.clamp(1, SCAN_LIMIT_MAX)).unwrap_or(1);
        let stale = consistency == ReadConsistency::Stale;
        let make = |d: &ShardDescriptor| Request::Scan {
            shard: d.id,
            epoch: d.epoch,
            start: start.to_vec(),
            end: match (d.end.as_deref(), end) {
                (Some(a), Some(b)) => Some(a.min(b).to_vec()),
                (a, b) => a.or(b).map(<[u8]>::to_vec),
            },
            limit,
            consistency,
        };
        let Response::Page { pairs, end } = self.keyed(start, false, stale, make).await? else {
            return Err(RouteError::Unavailable("a scan answered with something else than a page".into()));
        };
        let next = match end {
            ScanEnd::More => {
                let Some((last, _)) = pairs.last() else {
                    return Err(RouteError::Unavailable("a scan page with no pairs said there were more".into()));
                };
                let mut next = last.clone();
                next.push(0);
                Some(next)
            }
            ScanEnd::Covered(None) => None,
            ScanEnd::Covered(Some(e)) if e.as_slice() <= start => {
                return Err(RouteError::Unavailable("a scan page did not move the scan on".into()));
            }
            ScanEnd::Covered(Some(e)) => Some(e),
        };
        Ok(Page { pairs, next })
    }
}

async fn sleep_backoff(backoff: &mut u64, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(Duration::from_millis(*backoff).min(left)).await;
    *backoff = (*backoff * 2).min(BACKOFF_MS_MAX);
}

fn unexpected(r: &Response) -> RouteError {
    RouteError::Unavailable(format!("unexpected answer: {r:?}"))
}
