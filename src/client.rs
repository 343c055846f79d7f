//! [`Client`]: the Rust client. It caches the shard map, sends each request to the shard's
//! leader, follows redirects (`NotLeader`, `StaleEpoch`, `WrongShard`, `UnknownShard`) and
//! retries transient failures with exponential backoff until the operation's deadline.
//!
//! **Unknown outcomes.** A write whose request was sent but not answered (timeout, connection
//! lost, or the node's own `Unknown` answer) may or may not have been applied, and may still
//! be applied later. It is not retried: the error is [`ClientError::Unknown`] at once. A retry
//! is not harmless even for a put: the first attempt may apply, another client's write follow,
//! and the retry apply again over it — a value that comes back after it was overwritten, which
//! no single point in time explains (found by the node-level history test). A delete's retry
//! would also report the retry's previous value, not the first attempt's. Failures before a
//! request was sent, redirects and stale routing are retried until the deadline;
//! [`ClientError::Unavailable`] means nothing was applied.
//!
//! **Routing needs no meta leader.** The client routes by a node's local copy of the map
//! (`ClusterView { fresh: false }`), asked of every known node at once, and keeps the newest
//! copy it has seen (see [`map_progress`]): every shard checks the epoch a request was routed
//! with, so a stale copy costs a redirect, never a wrong answer. Only when a node says the
//! routing is out of date (`StaleEpoch`, `WrongShard`, `UnknownShard`, `OutOfRange`) does the
//! client look for a newer copy, again from any node that answers. A client cut off from the
//! meta leader keeps working with every shard leader it can reach. [`Client::refresh`] still
//! reads the map through the meta leader for callers that need the authoritative one.

use crate::placement::{Epoch, NodeId, ShardDescriptor, ShardId, ShardMap};
use crate::transport::{self as tp, cert::TlsIdentity, ClientConnection};
use crate::wire::{
    check_user_key, check_value, AdminRequest, AdminResponse, ClusterView, MapAnswer, ReadConsistency, Request,
    Response, ScanEnd,
};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

/// First retry delay (ms); doubles per retry up to [`BACKOFF_MS_MAX`].
pub const BACKOFF_MS_MIN: u64 = 10;
/// Longest retry delay (ms).
pub const BACKOFF_MS_MAX: u64 = 500;
/// Pages of one node's map read at most in one refresh.
pub const MAP_PAGES_MAX: usize = 1 << 16;
/// Most nodes asked at once for their map (the next refresh starts at the next ones).
pub const VIEW_FANOUT_MAX: usize = 16;
/// Once one node has answered a map request, how long the others still have (ms): a node that
/// does not answer must not hold up routing for a whole request timeout.
pub const VIEW_GRACE_MS: u64 = 200;

/// How a client connects and how long it tries.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// CA, client certificate and key.
    pub tls: TlsIdentity,
    /// Nodes to start from: id and address. More are learned from the map.
    pub endpoints: Vec<(NodeId, SocketAddr)>,
    /// Deadline of one operation, retries included.
    pub op_timeout: Duration,
    /// Deadline of one attempt (one request to one node).
    pub request_timeout: Duration,
    /// How reads are made.
    pub consistency: ReadConsistency,
    /// Shards asked for per page when the map is fetched whole (a node sends at most
    /// [`crate::node::MAP_PAGE_SHARDS_MAX`]).
    pub map_page_shards: u32,
}

impl ClientConfig {
    /// Defaults: 10 s per operation, 3 s per attempt, linearizable reads.
    pub fn new(tls: TlsIdentity, endpoints: Vec<(NodeId, SocketAddr)>) -> ClientConfig {
        ClientConfig {
            tls,
            endpoints,
            op_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            consistency: ReadConsistency::Linearizable,
            map_page_shards: crate::node::MAP_PAGE_SHARDS_MAX as u32,
        }
    }
}

/// What went wrong, and what it means for the data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A write may or may not have been applied: read the key to find out.
    #[error("outcome unknown (the write may or may not have been applied): {0}")]
    Unknown(String),
    /// Nothing was changed, and no node could serve the request before the deadline.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request is wrong (bad key, value too large, refused by the cluster); retrying will
    /// not help.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The client's certificate does not allow the request (its role, or its key prefix);
    /// nothing was read or changed.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The client's configuration or certificates are unusable.
    #[error("client configuration: {0}")]
    Config(String),
}

/// The outcome of a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Swapped; the previous value (equal to the expected one).
    Swapped {
        /// The value before.
        previous: Option<Vec<u8>>,
    },
    /// Did not match; nothing changed.
    Failed {
        /// The current value.
        current: Option<Vec<u8>>,
    },
}

/// Whether a failed attempt may have reached the node.
enum CallError {
    /// No connection: the request was not sent.
    NotSent(String),
    /// Sent, no usable answer.
    Sent(String),
}

/// A client of a Flotilla cluster. Cheap to share (`Arc`); all methods take `&self`.
pub struct Client {
    config: ClientConfig,
    endpoint: tp::Client,
    conns: tokio::sync::Mutex<HashMap<NodeId, ClientConnection>>,
    addrs: Mutex<HashMap<NodeId, SocketAddr>>,
    /// The cached view, with the meta state's revision it is of (0: not known; a view read
    /// through the meta leader).
    view: RwLock<(u64, ClusterView)>,
    leaders: Mutex<HashMap<ShardId, NodeId>>,
    /// Where this client's stale reads start among a shard's replicas (spreads clients).
    spread: usize,
    /// Rotates the nodes asked for a map when there are more than [`VIEW_FANOUT_MAX`].
    view_turn: AtomicUsize,
    /// Map requests made for routing (see [`Client::routing_refreshes`]).
    routing_refreshes: AtomicU64,
    /// Answers to map requests: changes since this client's copy, and pages (see
    /// [`Client::map_answers`]).
    map_answers: [AtomicU64; 2],
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoints", &self.config.endpoints).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects: binds a local endpoint and fetches the shard map from the first node that
    /// answers. Fails with the reasons if none does (e.g. a refused certificate).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        let loopback = config.endpoints.iter().all(|(_, a)| a.ip().is_loopback());
        let v6 = config.endpoints.iter().all(|(_, a)| a.is_ipv6());
        let bind: SocketAddr = match (loopback, v6) {
            (true, false) => SocketAddr::from(([127, 0, 0, 1], 0)),
            (true, true) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
            (false, true) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            (false, false) => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let endpoint = tp::Client::new(&config.tls, bind).map_err(|e| ClientError::Config(e.to_string()))?;
        let client = Client {
            addrs: Mutex::new(config.endpoints.iter().copied().collect()),
            config,
            endpoint,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            view: RwLock::new((0, ClusterView::default())),
            leaders: Mutex::new(HashMap::new()),
            spread: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as usize)
                .unwrap_or(0),
            view_turn: AtomicUsize::new(0),
            routing_refreshes: AtomicU64::new(0),
            map_answers: [AtomicU64::new(0), AtomicU64::new(0)],
        };
        // Any node's own copy of the map will do to start routing: no meta leader needed.
        client.refresh_routing(None, client.config.request_timeout).await?;
        Ok(client)
    }

    /// The cached view of the cluster.
    pub fn cached_view(&self) -> ClusterView {
        self.view.read().map(|v| v.1.clone()).unwrap_or_default()
    }

    /// The cached view with the revision of the meta state it is of (0: not known).
    fn cached(&self) -> (u64, ClusterView) {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// How the nodes answered this client's map requests: (answers with the changes since its
    /// copy, pages of a whole map). A client that holds a map is sent changes, not the map again.
    pub fn map_answers(&self) -> (u64, u64) {
        (self.map_answers[0].load(Ordering::Relaxed), self.map_answers[1].load(Ordering::Relaxed))
    }

    /// How many times this client asked the nodes for their map to route by (at connect, and
    /// after answers saying its routing was out of date).
    pub fn routing_refreshes(&self) -> u64 {
        self.routing_refreshes.load(Ordering::Relaxed)
    }

    /// Takes `v` as the cached view unless the cached one is newer (a node's copy may lag
    /// the one this client already has), and learns the node addresses it lists.
    fn install(&self, revision: u64, v: &ClusterView) {
        if let Ok(mut a) = self.addrs.lock() {
            for (id, addr) in &v.nodes {
                if let Ok(sa) = addr.parse::<SocketAddr>() {
                    a.insert(*id, sa);
                }
            }
        }
        if let Ok(mut w) = self.view.write() {
            if map_progress(&v.map) >= map_progress(&w.1.map) {
                *w = (revision, v.clone());
            }
        }
    }

    /// Node `n`'s copy of the map ([`Request::MapSince`]), with its revision: the changes
    /// since `base` (this client's copy) applied to it when the node has them, else the whole
    /// map in pages. Changes are taken only if the copy they make comes exactly as far as the
    /// node's map (`map_progress`): otherwise the client's revision named another history (a
    /// meta state converted from the one-key format numbers afresh) and the map is read whole.
    /// Pages read while the node's copy moved on are brought to one revision by the changes
    /// since the first page's; failing that, an error (the next refresh tries again).
    /// With `fresh`, the node first brings its copy to the meta leader's state (see
    /// `Request::MapSince`): the map holds every change acknowledged before the call.
    async fn fetch_map(
        &self,
        n: NodeId,
        base: &(u64, ClusterView),
        timeout: Duration,
        fresh: bool,
    ) -> Result<(u64, ClusterView), String> {
        let limit = self.config.map_page_shards.max(1);
        let progress = map_progress(&base.1.map);
        let ask =
            |since: u64, from: Option<Vec<u8>>, fresh: bool| Request::MapSince { since, from, limit, progress, fresh };
        let call = |req: Request| async move {
            match self.call(n, &req, timeout).await {
                Ok(Response::Map(a)) => Ok(a),
                Ok(other) => Err(format!("node {n}: {}", describe(&other))),
                Err(CallError::NotSent(e) | CallError::Sent(e)) => Err(e),
            }
        };
        let since = base.0;
        let mut answer = call(ask(since, None, fresh)).await?;
        if let MapAnswer::Changes { base: from, revision, changed, removed, nodes, progress: theirs } = answer {
            if from != since || since == 0 {
                return Err(format!("node {n}: changes from revision {from}, not asked"));
            }
            if revision < from {
                return Err(format!("node {n}: its map (revision {revision}) is older than this client's"));
            }
            self.map_answers[0].fetch_add(1, Ordering::Relaxed);
            if changed.is_empty() && removed.is_empty() && theirs == progress {
                return Ok((revision, ClusterView { map: base.1.map.clone(), nodes }));
            }
            let mut map = base.1.map.clone();
            apply_map_changes(&mut map, changed, removed);
            if map_progress(&map) == theirs && map.validate().is_ok() {
                return Ok((revision, ClusterView { map, nodes }));
            }
            answer = call(ask(0, None, false)).await?;
        }
        let (first, mut map, mut nodes, mut next) = match answer {
            MapAnswer::Changes { base, .. } => {
                return Err(format!("node {n}: changes from revision {base}, not asked"))
            }
            MapAnswer::Page { revision, shards, next, nodes } => {
                self.map_answers[1].fetch_add(1, Ordering::Relaxed);
                let mut map = ShardMap::default();
                shards.into_iter().for_each(|d| map.put_unchecked(d));
                (revision, map, nodes, next)
            }
        };
        let mut moved = false;
        for _ in 0..MAP_PAGES_MAX {
            let Some(from) = next.take() else { break };
            match call(ask(first, Some(from), false)).await? {
                MapAnswer::Page { revision, shards, next: more, nodes: at } => {
                    self.map_answers[1].fetch_add(1, Ordering::Relaxed);
                    moved |= revision != first;
                    shards.into_iter().for_each(|d| map.put_unchecked(d));
                    (next, nodes) = (more, at);
                }
                MapAnswer::Changes { .. } => return Err(format!("node {n}: changes where a page was asked for")),
            }
        }
        if next.is_some() {
            return Err(format!("node {n}: its map took more than {MAP_PAGES_MAX} pages"));
        }
        let mut revision = first;
        if moved {
            match call(ask(first, None, false)).await? {
                MapAnswer::Changes { base, revision: to, changed, removed, nodes: at, progress: theirs }
                    if base == first && to >= first =>
                {
                    apply_map_changes(&mut map, changed, removed);
                    if map_progress(&map) != theirs {
                        return Err(format!("node {n}: its pages and changes do not make its map"));
                    }
                    (revision, nodes) = (to, at);
                }
                _ => return Err(format!("node {n}: its map changed while it was read in pages")),
            }
        }
        map.validate().map_err(|e| format!("node {n}: its pages do not make a map: {e}"))?;
        Ok((revision, ClusterView { map, nodes }))
    }

    /// Asks the known nodes at once for their local copy of the map (no meta leader involved)
    /// and keeps the newest (see [`Client::install`]). With `wrong`, the caller's route for a
    /// key — `(key, shard, epoch)` — was refused: the search ends as soon as a copy routes the
    /// key otherwise; without, as soon as any node gave a map. Otherwise it ends
    /// [`VIEW_GRACE_MS`] after the first answer, or after `timeout`.
    async fn refresh_routing(
        &self,
        wrong: Option<(&[u8], ShardId, Epoch)>,
        timeout: Duration,
    ) -> Result<ClusterView, ClientError> {
        self.routing_refreshes.fetch_add(1, Ordering::Relaxed);
        let mut nodes: Vec<NodeId> = self.addrs.lock().map(|a| a.keys().copied().collect()).unwrap_or_default();
        nodes.sort();
        if nodes.is_empty() {
            return Err(ClientError::Config("no node address known".into()));
        }
        let turn = self.view_turn.fetch_add(VIEW_FANOUT_MAX, Ordering::Relaxed) % nodes.len();
        nodes.rotate_left(turn);
        nodes.truncate(VIEW_FANOUT_MAX);
        let base = self.cached();
        let floor = map_progress(&base.1.map);
        let moved = |v: &(u64, ClusterView)| match wrong {
            None => true,
            Some((key, shard, epoch)) => v.1.map.lookup(key).map(|d| (d.id, d.epoch)) != Some((shard, epoch)),
        };
        let base = &base;
        type Ask<'a> = Pin<Box<dyn Future<Output = (NodeId, Result<(u64, ClusterView), String>)> + Send + 'a>>;
        let mut asks: Vec<Option<Ask<'_>>> = nodes
            .iter()
            .map(|&n| Some(Box::pin(async move { (n, self.fetch_map(n, base, timeout, false).await) }) as Ask<'_>))
            .collect();
        let mut best: Option<(u64, ClusterView)> = None;
        let mut errors: Vec<String> = Vec::new();
        let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let overall = tokio::time::sleep(timeout);
        tokio::pin!(overall);
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for slot in asks.iter_mut() {
                let Some(ask) = slot else { continue };
                let Poll::Ready((n, answer)) = ask.as_mut().poll(cx) else {
                    pending = true;
                    continue;
                };
                *slot = None;
                match answer {
                    Ok(v) => {
                        let p = map_progress(&v.1.map);
                        if p < floor {
                            errors.push(format!("node {n}: its map is older than this client's"));
                        } else if best.as_ref().is_none_or(|b| p > map_progress(&b.1.map)) {
                            best = Some(v);
                        }
                        if best.as_ref().is_some_and(&moved) {
                            return Poll::Ready(());
                        }
                    }
                    Err(e) => errors.push(e),
                }
            }
            if !pending {
                return Poll::Ready(());
            }
            if best.is_some() && grace.is_none() {
                grace = Some(Box::pin(tokio::time::sleep(Duration::from_millis(VIEW_GRACE_MS))));
            }
            if grace.as_mut().is_some_and(|g| g.as_mut().poll(cx).is_ready()) || overall.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        drop(asks);
        match best {
            Some((revision, v)) => {
                self.install(revision, &v);
                Ok(v)
            }
            None if errors.is_empty() => {
                Err(ClientError::Unavailable(format!("no node gave a shard map within {timeout:?}")))
            }
            None => Err(ClientError::Unavailable(format!("no node gave a shard map: {}", errors.join("; ")))),
        }
    }

    /// Fetches the view through the meta leader (linearizable) from any node that answers:
    /// the authoritative map, for callers that need it (routing does not; see the module
    /// documentation). Needs a reachable meta leader. The map comes in pages
    /// (`Request::MapSince` with `fresh`), so it may hold any number of shards.
    pub async fn refresh(&self) -> Result<ClusterView, ClientError> {
        let mut nodes: Vec<NodeId> = self.addrs.lock().map(|a| a.keys().copied().collect()).unwrap_or_default();
        nodes.sort();
        let mut errors = Vec::new();
        let none = (0, ClusterView::default());
        for n in nodes {
            // In pages (a map of any size), read through the meta leader.
            match self.fetch_map(n, &none, self.config.request_timeout, true).await {
                Ok((revision, v)) if !v.map.is_empty() => {
                    self.install(revision, &v);
                    return Ok(v);
                }
                Ok(_) => errors.push(format!("node {n}: cluster not bootstrapped yet")),
                Err(e) => errors.push(e),
            }
        }
        Err(ClientError::Unavailable(format!("no node gave a shard map: {}", errors.join("; "))))
    }

    async fn connection(&self, node: NodeId) -> Result<ClientConnection, String> {
        if let Some(c) = self.conns.lock().await.get(&node) {
            return Ok(c.clone());
        }
        let addr = self
            .addrs
            .lock()
            .ok()
            .and_then(|a| a.get(&node).copied())
            .ok_or_else(|| format!("no address known for node {node}"))?;
        let c = self
            .endpoint
            .connect(addr, node, self.config.request_timeout)
            .await
            .map_err(|e| format!("cannot connect to node {node} at {addr}: {e}"))?;
        // Connected without holding the lock: a node that does not answer must not hold up
        // requests to the others (a map request goes to every node at once). Of two
        // connections made at once, the first one stored is kept.
        Ok(self.conns.lock().await.entry(node).or_insert(c).clone())
    }

    async fn call(&self, node: NodeId, req: &Request, timeout: Duration) -> Result<Response, CallError> {
        let conn = self.connection(node).await.map_err(CallError::NotSent)?;
        match conn.request(req.encode(), timeout).await {
            Ok(bytes) => Response::decode(&bytes).map_err(|e| CallError::Sent(format!("node {node}: {e}"))),
            Err(e) => {
                self.conns.lock().await.remove(&node);
                match e {
                    tp::TransportError::NotSent(_) | tp::TransportError::TooLarge { .. } => {
                        Err(CallError::NotSent(format!("node {node}: {e}")))
                    }
                    _ => Err(CallError::Sent(format!("node {node}: {e}"))),
                }
            }
        }
    }

    /// Sends a keyed request to the leader of the shard holding `key`, following redirects. A
    /// write whose outcome became unknown is not retried.
    async fn keyed(
        &self,
        key: &[u8],
        write: bool,
        make: impl Fn(&ShardDescriptor) -> Request,
    ) -> Result<(Response, ShardDescriptor), ClientError> {
        self.keyed_at(key, write, make).await.map(|(r, d, _)| (r, d))
    }

    /// [`Client::keyed`], also saying which node answered.
    async fn keyed_at(
        &self,
        key: &[u8],
        write: bool,
        make: impl Fn(&ShardDescriptor) -> Request,
    ) -> Result<(Response, ShardDescriptor, NodeId), ClientError> {
        let deadline = Instant::now() + self.config.op_timeout;
        let mut backoff = BACKOFF_MS_MIN;
        let mut attempt = 0usize;
        let mut last = String::from("no attempt made");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Unavailable(format!("deadline passed; last error: {last}")));
            }
            let view = self.cached_view();
            let Some(d) = view.map.lookup(key).cloned() else {
                if let Err(e) = self.refresh_routing(None, self.config.request_timeout.min(deadline - now)).await {
                    last = e.to_string();
                }
                sleep_backoff(&mut backoff, deadline).await;
                continue;
            };
            let voters: Vec<NodeId> = d.voters().collect();
            let stale = !write && self.config.consistency == ReadConsistency::Stale;
            // Stale reads go to any replica, starting at a different one per client.
            let hint = if stale {
                let all: Vec<NodeId> = d.replicas.iter().map(|r| r.node).collect();
                (!all.is_empty()).then(|| all[attempt.wrapping_add(self.spread) % all.len()])
            } else {
                self.leaders.lock().ok().and_then(|l| l.get(&d.id).copied())
            };
            let node = match hint {
                Some(n) => n,
                None if voters.is_empty() => {
                    last = format!("shard {} has no voters", d.id);
                    sleep_backoff(&mut backoff, deadline).await;
                    continue;
                }
                None => voters[attempt % voters.len()],
            };
            let timeout = self.config.request_timeout.min(deadline - now);
            let forget = |me: &Client| {
                if let Ok(mut l) = me.leaders.lock() {
                    l.remove(&d.id);
                }
            };
            match self.call(node, &make(&d), timeout).await {
                Err(CallError::NotSent(e)) => {
                    last = e;
                    forget(self);
                    attempt += 1;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Err(CallError::Sent(e)) => {
                    // The node may be gone: the next operation asks anew.
                    forget(self);
                    if write {
                        return Err(ClientError::Unknown(e));
                    }
                    last = e;
                    attempt += 1;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Ok(Response::NotLeader { leader, addr }) => {
                    last = format!("node {node} is not the leader of shard {}", d.id);
                    match leader {
                        Some(l) if l != node => {
                            if let (Some(a), Ok(mut addrs)) = (addr.and_then(|a| a.parse().ok()), self.addrs.lock()) {
                                addrs.insert(l, a);
                            }
                            if let Ok(mut m) = self.leaders.lock() {
                                m.insert(d.id, l);
                            }
                        }
                        _ => {
                            forget(self);
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
                    last = format!("node {node}: routing of shard {} out of date: {}", d.id, describe(&r));
                    forget(self);
                    if stale {
                        // This replica may lack the shard: the next try goes to another.
                        attempt += 1;
                    }
                    let timeout = self.config.request_timeout.min(deadline.saturating_duration_since(Instant::now()));
                    if let Err(e) = self.refresh_routing(Some((key, d.id, d.epoch)), timeout).await {
                        last = format!("{last}; {e}");
                    }
                    // A map that routes the key elsewhere is tried at once; otherwise no node
                    // has a newer one yet (a split still spreading): wait before asking again.
                    let now_routed = self.cached_view().map.lookup(key).map(|x| (x.id, x.epoch));
                    if now_routed == Some((d.id, d.epoch)) {
                        sleep_backoff(&mut backoff, deadline).await;
                    }
                }
                Ok(Response::Unknown(e)) => {
                    forget(self);
                    if write {
                        return Err(ClientError::Unknown(e));
                    }
                    last = e;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Ok(Response::Unavailable(e)) => {
                    last = format!("node {node}: {e}");
                    forget(self);
                    attempt += 1;
                    sleep_backoff(&mut backoff, deadline).await;
                }
                Ok(Response::Invalid(e)) => return Err(ClientError::Invalid(e)),
                Ok(Response::Denied(e)) => return Err(ClientError::Denied(e)),
                Ok(other) => {
                    if !stale {
                        if let Ok(mut m) = self.leaders.lock() {
                            m.insert(d.id, node);
                        }
                    }
                    return Ok((other, d, node));
                }
            }
        }
    }

    /// Reads `key` (linearizable unless configured otherwise).
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        check_user_key(key).map_err(ClientError::Invalid)?;
        let consistency = self.config.consistency;
        let make = |d: &ShardDescriptor| Request::Get { shard: d.id, epoch: d.epoch, key: key.to_vec(), consistency };
        match self.keyed(key, false, make).await? {
            (Response::Value(v), _) => Ok(v),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Sets `key` to `value`. A put does not read the old value (use [`Client::cas`] to
    /// replace a known value).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        check_user_key(key).map_err(ClientError::Invalid)?;
        check_value(value).map_err(ClientError::Invalid)?;
        let make = |d: &ShardDescriptor| Request::Put {
            shard: d.id,
            epoch: d.epoch,
            key: key.to_vec(),
            value: value.to_vec(),
        };
        match self.keyed(key, true, make).await? {
            (Response::Written { .. }, _) => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Removes `key`; returns the previous value.
    pub async fn delete(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        check_user_key(key).map_err(ClientError::Invalid)?;
        let make = |d: &ShardDescriptor| Request::Delete { shard: d.id, epoch: d.epoch, key: key.to_vec() };
        match self.keyed(key, true, make).await? {
            (Response::Written { previous }, _) => Ok(previous),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Sets `key` to `new` (`None`: delete) if its value is `expected` (`None`: absent).
    pub async fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, ClientError> {
        check_user_key(key).map_err(ClientError::Invalid)?;
        for v in expected.iter().chain(new.iter()) {
            check_value(v).map_err(ClientError::Invalid)?;
        }
        let make = |d: &ShardDescriptor| Request::Cas {
            shard: d.id,
            epoch: d.epoch,
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        };
        match self.keyed(key, true, make).await? {
            (Response::Written { previous }, _) => Ok(CasOutcome::Swapped { previous }),
            (Response::CasFailed { current }, _) => Ok(CasOutcome::Failed { current }),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Pairs with keys in `[start, end)` (`end: None`: to the end), in key order, at most
    /// `limit`, across shards. Each shard's part is linearizable; the whole is not a snapshot.
    pub async fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        let mut out = Vec::new();
        let mut cursor = start.to_vec();
        let consistency = self.config.consistency;
        while out.len() < limit {
            if end.is_some_and(|e| cursor.as_slice() >= e) {
                break;
            }
            let remaining = (limit - out.len()).min(crate::wire::SCAN_LIMIT_MAX) as u32;
            let make = |d: &ShardDescriptor| {
                let shard_end = match (&d.end, end) {
                    (Some(a), Some(b)) => Some(a.as_slice().min(b).to_vec()),
                    (Some(a), None) => Some(a.clone()),
                    (None, b) => b.map(<[u8]>::to_vec),
                };
                Request::Scan {
                    shard: d.id,
                    epoch: d.epoch,
                    start: cursor.clone(),
                    end: shard_end,
                    limit: remaining,
                    consistency,
                }
            };
            let (resp, d) = self.keyed(&cursor, false, make).await?;
            let Response::Page { pairs, end: page_end } = resp else { return Err(unexpected(&resp)) };
            // Continue from where the node says its page ends, never from this client's idea
            // of the shard's end: the shard may have split since this client's map was made,
            // and its end is then further than what the node read.
            let last = pairs.last().map(|(k, _)| k.clone());
            out.extend(pairs);
            match page_end {
                ScanEnd::More => {
                    let Some(mut next) = last else {
                        return Err(ClientError::Unavailable(format!(
                            "shard {} answered a scan page with no pairs and more to come",
                            d.id
                        )));
                    };
                    next.push(0);
                    cursor = next;
                }
                ScanEnd::Covered(None) => break,
                ScanEnd::Covered(Some(e)) if e <= cursor => {
                    return Err(ClientError::Unavailable(format!(
                        "shard {} answered a scan page that does not move the scan on",
                        d.id
                    )));
                }
                ScanEnd::Covered(Some(e)) => cursor = e,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Runs an admin request on any node that answers.
    pub async fn admin(&self, req: AdminRequest) -> Result<AdminResponse, ClientError> {
        let deadline = Instant::now() + self.config.op_timeout;
        let mut backoff = BACKOFF_MS_MIN;
        let mut last = String::new();
        let mut turn = 0usize;
        let request = Request::Admin(req);
        while Instant::now() < deadline {
            let mut nodes: Vec<NodeId> = self.addrs.lock().map(|a| a.keys().copied().collect()).unwrap_or_default();
            nodes.sort();
            if nodes.is_empty() {
                return Err(ClientError::Config("no node address known".into()));
            }
            let node = nodes[turn % nodes.len()];
            turn += 1;
            let timeout = self.config.request_timeout.max(Duration::from_secs(12)).min(deadline - Instant::now());
            match admin_outcome(node, self.call(node, &request, timeout).await) {
                Ok(done) => return done,
                Err(why) => last = why,
            }
            sleep_backoff(&mut backoff, deadline).await;
        }
        Err(ClientError::Unavailable(format!("no node answered the admin request: {last}")))
    }

    /// Sends the admin request `make` builds for the shard holding `key` to that shard's
    /// leader, following redirects as a read does; returns the answer, the shard as routed,
    /// and the node that answered (for requests that must go back to it). For backups.
    pub(crate) async fn shard_admin(
        &self,
        key: &[u8],
        make: impl Fn(&ShardDescriptor) -> AdminRequest,
    ) -> Result<(AdminResponse, ShardDescriptor, NodeId), ClientError> {
        match self.keyed_at(key, false, |d| Request::Admin(make(d))).await? {
            (Response::Admin(a), d, node) => Ok((a, d, node)),
            (other, _, _) => Err(unexpected(&other)),
        }
    }

    /// Sends one admin request to `node` (no retry elsewhere: it names something only that
    /// node holds). For backups.
    pub(crate) async fn admin_at(&self, node: NodeId, req: AdminRequest) -> Result<AdminResponse, ClientError> {
        let timeout = self.config.request_timeout;
        admin_outcome(node, self.call(node, &Request::Admin(req), timeout).await)
            .unwrap_or_else(|why| Err(ClientError::Unavailable(why)))
    }

    /// Runs an admin request on `node` only (requests a node serves from its own state, such
    /// as unsafe recovery's), retrying that node until the operation's timeout.
    pub async fn admin_on(&self, node: NodeId, req: AdminRequest) -> Result<AdminResponse, ClientError> {
        let deadline = Instant::now() + self.config.op_timeout;
        let mut backoff = BACKOFF_MS_MIN;
        let mut last = String::new();
        let request = Request::Admin(req);
        while Instant::now() < deadline {
            let timeout = self.config.request_timeout.max(Duration::from_secs(12)).min(deadline - Instant::now());
            match admin_outcome(node, self.call(node, &request, timeout).await) {
                Ok(done) => return done,
                Err(why) => last = why,
            }
            sleep_backoff(&mut backoff, deadline).await;
        }
        Err(ClientError::Unavailable(format!("node {node} did not answer the admin request: {last}")))
    }

    /// Whether `node` answers one short request within `timeout`: any answer counts, a refusal
    /// too (unsafe recovery checks that the nodes named dead are really gone).
    pub async fn answers(&self, node: NodeId, timeout: Duration) -> bool {
        let req = Request::Admin(AdminRequest::ReplicaStates { from: ShardId(0), limit: 1 });
        matches!(tokio::time::timeout(timeout, self.call(node, &req, timeout)).await, Ok(Ok(_)))
    }

    /// Learns `node`'s address (kept if one is known already): for a tool that hears of nodes
    /// from other nodes' answers rather than from the map ([`crate::unsafe_recovery`]). An
    /// address that does not parse is ignored (it is only a hint).
    pub fn learn_address(&self, node: NodeId, addr: &str) {
        let Ok(addr) = addr.parse() else { return };
        if let Ok(mut a) = self.addrs.lock() {
            a.entry(node).or_insert(addr);
        }
    }

    /// The nodes whose address this client knows (given, or learned from a cluster view).
    pub fn known_nodes(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.addrs.lock().map(|a| a.keys().copied().collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// Closes the client's connections.
    pub async fn close(&self) {
        self.endpoint.close().await;
    }
}

async fn sleep_backoff(backoff: &mut u64, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(Duration::from_millis(*backoff).min(left)).await;
    *backoff = (*backoff * 2).min(BACKOFF_MS_MAX);
}

/// How far a map has come: the sum of its shards' epochs. Every change of the map raises an
/// epoch or adds a shard, and a merge raises the left shard's version past the right one's
/// whole epoch, so of two copies of one cluster's map, the later one scores higher: a copy
/// scoring lower than the cached one is older, and routing never goes back to it.
pub fn map_progress(map: &ShardMap) -> u64 {
    map.shards().fold(0u64, |sum, d| sum.saturating_add(shard_progress(d)))
}

fn shard_progress(d: &ShardDescriptor) -> u64 {
    d.epoch.version.saturating_add(d.epoch.conf_version)
}

/// [`map_progress`] of `after`, from `progress`, that of `before`, and the shards that differ
/// between them ([`ShardMap::differing`]): what the changed shards took and added, without a
/// walk of the whole map.
pub fn map_progress_after(progress: u64, before: &ShardMap, after: &ShardMap, differing: &[ShardId]) -> u64 {
    let sum = |m: &ShardMap| {
        differing.iter().filter_map(|id| m.get(*id)).fold(0u64, |s, d| s.saturating_add(shard_progress(d)))
    };
    progress.saturating_sub(sum(before)).saturating_add(sum(after))
}

/// What an admin call to `node` came to: its answer or a refusal, final (`Ok`), or why another
/// try may do better (`Err`: no answer, or an answer that is not the admin's).
fn admin_outcome(node: NodeId, r: Result<Response, CallError>) -> Result<Result<AdminResponse, ClientError>, String> {
    match r {
        Ok(Response::Admin(a)) => Ok(Ok(a)),
        Ok(Response::Invalid(e)) => Ok(Err(ClientError::Invalid(e))),
        Ok(Response::Denied(e)) => Ok(Err(ClientError::Denied(e))),
        Ok(other) => Err(format!("node {node}: {}", describe(&other))),
        Err(CallError::NotSent(e) | CallError::Sent(e)) => Err(e),
    }
}

/// Brings `map` to the revision of changes `changed` and `removed` ([`MapAnswer::Changes`]).
fn apply_map_changes(map: &mut ShardMap, changed: Vec<ShardDescriptor>, removed: Vec<ShardId>) {
    for id in removed {
        map.remove_unchecked(id);
    }
    for d in changed {
        map.put_unchecked(d);
    }
}

fn describe(r: &Response) -> String {
    match r {
        Response::StaleEpoch { descriptor } => format!("shard {} is at a newer epoch", descriptor.id),
        Response::WrongShard { owner } => format!("the key is in shard {} now", owner.id),
        Response::UnknownShard => "no such shard there".into(),
        Response::OutOfRange { shard } => format!("shard {shard} no longer holds the key there (it split)"),
        Response::Unavailable(e) => format!("unavailable: {e}"),
        Response::Invalid(e) => format!("invalid: {e}"),
        Response::Denied(e) => format!("permission denied: {e}"),
        Response::Unknown(e) => format!("outcome unknown: {e}"),
        other => format!("unexpected answer {other:?}"),
    }
}

fn unexpected(r: &Response) -> ClientError {
    ClientError::Unavailable(format!("unexpected answer: {}", describe(r)))
}

#[cfg(test)]
mod progress_tests {
    use super::*;
    use crate::placement::{MetaCommand, MetaState};

    #[test]
    fn the_progress_after_a_change_is_that_of_the_whole_map() {
        let mut s = MetaState::default();
        s.apply(MetaCommand::RegisterNode { node: NodeId(1), addr: "a".into() }).expect("register");
        s.apply(MetaCommand::Bootstrap { nodes: vec![NodeId(1)] }).expect("bootstrap");
        let mut progress = map_progress(&s.map);
        for key in [b"m".to_vec(), b"f".to_vec(), b"t".to_vec()] {
            let before = s.map.clone();
            let d = s.map.lookup(&key).cloned().expect("a shard");
            s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key }).expect("split");
            let differing = before.differing(&s.map);
            progress = map_progress_after(progress, &before, &s.map, &differing);
            assert_eq!(progress, map_progress(&s.map));
        }
        let shrunk = ShardMap::default();
        let gone = s.map.differing(&shrunk);
        assert_eq!(map_progress_after(progress, &s.map, &shrunk, &gone), 0, "every shard gone");
    }
}
