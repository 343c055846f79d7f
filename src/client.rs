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

use crate::placement::{ShardDescriptor, ShardId};
use crate::transport::{self as tp, cert::TlsIdentity, ClientConnection};
use crate::wire::{
    check_user_key, check_value, AdminRequest, AdminResponse, ClusterView, ReadConsistency, Request, Response,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// First retry delay (ms); doubles per retry up to [`BACKOFF_MS_MAX`].
pub const BACKOFF_MS_MIN: u64 = 10;
/// Longest retry delay (ms).
pub const BACKOFF_MS_MAX: u64 = 500;

/// How a client connects and how long it tries.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// CA, client certificate and key.
    pub tls: TlsIdentity,
    /// Nodes to start from: id and address. More are learned from the map.
    pub endpoints: Vec<(u64, SocketAddr)>,
    /// Deadline of one operation, retries included.
    pub op_timeout: Duration,
    /// Deadline of one attempt (one request to one node).
    pub request_timeout: Duration,
    /// How reads are made.
    pub consistency: ReadConsistency,
}

impl ClientConfig {
    /// Defaults: 10 s per operation, 3 s per attempt, linearizable reads.
    pub fn new(tls: TlsIdentity, endpoints: Vec<(u64, SocketAddr)>) -> ClientConfig {
        ClientConfig {
            tls,
            endpoints,
            op_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            consistency: ReadConsistency::Linearizable,
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
    conns: tokio::sync::Mutex<HashMap<u64, ClientConnection>>,
    addrs: Mutex<HashMap<u64, SocketAddr>>,
    view: RwLock<ClusterView>,
    leaders: Mutex<HashMap<ShardId, u64>>,
    /// Where this client's stale reads start among a shard's replicas (spreads clients).
    spread: usize,
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
            view: RwLock::new(ClusterView::default()),
            leaders: Mutex::new(HashMap::new()),
            spread: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as usize)
                .unwrap_or(0),
        };
        client.refresh().await?;
        Ok(client)
    }

    /// The cached view of the cluster.
    pub fn cached_view(&self) -> ClusterView {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Fetches the view through the meta leader (linearizable) from any node that answers.
    pub async fn refresh(&self) -> Result<ClusterView, ClientError> {
        let mut nodes: Vec<u64> = self.addrs.lock().map(|a| a.keys().copied().collect()).unwrap_or_default();
        nodes.sort();
        let mut errors = Vec::new();
        for n in nodes {
            match self.call(n, &Request::ClusterView { fresh: true }, self.config.request_timeout).await {
                Ok(Response::View(v)) if !v.map.is_empty() => {
                    if let Ok(mut a) = self.addrs.lock() {
                        for (id, addr) in &v.nodes {
                            if let Ok(sa) = addr.parse::<SocketAddr>() {
                                a.insert(id.0, sa);
                            }
                        }
                    }
                    if let Ok(mut w) = self.view.write() {
                        *w = v.clone();
                    }
                    return Ok(v);
                }
                Ok(Response::View(_)) => errors.push(format!("node {n}: cluster not bootstrapped yet")),
                Ok(other) => errors.push(format!("node {n}: {}", describe(&other))),
                Err(CallError::NotSent(e) | CallError::Sent(e)) => errors.push(format!("node {n}: {e}")),
            }
        }
        Err(ClientError::Unavailable(format!("no node gave a shard map: {}", errors.join("; "))))
    }

    async fn connection(&self, node: u64) -> Result<ClientConnection, String> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&node) {
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
            .connect(addr, tp::NodeId(node), self.config.request_timeout)
            .await
            .map_err(|e| format!("cannot connect to node {node} at {addr}: {e}"))?;
        conns.insert(node, c.clone());
        Ok(c)
    }

    async fn call(&self, node: u64, req: &Request, timeout: Duration) -> Result<Response, CallError> {
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
                if let Err(e) = self.refresh().await {
                    last = e.to_string();
                }
                sleep_backoff(&mut backoff, deadline).await;
                continue;
            };
            let voters: Vec<u64> = d.voters().map(|n| n.0).collect();
            let stale = !write && self.config.consistency == ReadConsistency::Stale;
            // Stale reads go to any replica, starting at a different one per client.
            let hint = if stale {
                let all: Vec<u64> = d.replicas.iter().map(|r| r.node.0).collect();
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
                        Some(l) if l.0 != node => {
                            if let (Some(a), Ok(mut addrs)) = (addr.and_then(|a| a.parse().ok()), self.addrs.lock()) {
                                addrs.insert(l.0, a);
                            }
                            if let Ok(mut m) = self.leaders.lock() {
                                m.insert(d.id, l.0);
                            }
                        }
                        _ => {
                            forget(self);
                            attempt += 1;
                            sleep_backoff(&mut backoff, deadline).await;
                        }
                    }
                }
                Ok(Response::StaleEpoch { .. } | Response::WrongShard { .. } | Response::UnknownShard) => {
                    last = format!("routing of shard {} out of date", d.id);
                    forget(self);
                    if let Err(e) = self.refresh().await {
                        last = e.to_string();
                    }
                    sleep_backoff(&mut backoff, deadline).await;
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
                Ok(other) => {
                    if !stale {
                        if let Ok(mut m) = self.leaders.lock() {
                            m.insert(d.id, node);
                        }
                    }
                    return Ok((other, d));
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
            let Response::Pairs(pairs) = resp else { return Err(unexpected(&resp)) };
            // A shard answers at most `remaining` pairs and at most a byte budget: ask it again
            // from after its last key until it has nothing more, then go to the next shard.
            if let Some((k, _)) = pairs.last() {
                let mut next = k.clone();
                next.push(0);
                cursor = next;
                out.extend(pairs);
                continue;
            }
            match d.end {
                Some(e) => cursor = e,
                None => break,
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
            let mut nodes: Vec<u64> = self.addrs.lock().map(|a| a.keys().copied().collect()).unwrap_or_default();
            nodes.sort();
            if nodes.is_empty() {
                return Err(ClientError::Config("no node address known".into()));
            }
            let node = nodes[turn % nodes.len()];
            turn += 1;
            let timeout = self.config.request_timeout.max(Duration::from_secs(12)).min(deadline - Instant::now());
            match self.call(node, &request, timeout).await {
                Ok(Response::Admin(a)) => return Ok(a),
                Ok(Response::Invalid(e)) => return Err(ClientError::Invalid(e)),
                Ok(other) => last = format!("node {node}: {}", describe(&other)),
                Err(CallError::NotSent(e) | CallError::Sent(e)) => last = e,
            }
            sleep_backoff(&mut backoff, deadline).await;
        }
        Err(ClientError::Unavailable(format!("no node answered the admin request: {last}")))
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

fn describe(r: &Response) -> String {
    match r {
        Response::Unavailable(e) => format!("unavailable: {e}"),
        Response::Invalid(e) => format!("invalid: {e}"),
        Response::Unknown(e) => format!("outcome unknown: {e}"),
        other => format!("unexpected answer {other:?}"),
    }
}

fn unexpected(r: &Response) -> ClientError {
    ClientError::Unavailable(format!("unexpected answer: {}", describe(r)))
}
