//! What each command does. Connection commands change the connection's state ([`Conn`]);
//! data commands become gets, puts, deletes, compare-and-swaps and scans through the
//! [`Router`](super::router::Router), with Redis's reply types.
//!
//! `INCR` and its kin and `APPEND` are one state-machine command each (`KvCommand::Update`),
//! computed where they are applied: atomic, no read before, no retry. `GETSET` and
//! `SET ... GET|NX|XX` are compare-and-swaps (a retry loop for `GET` and `XX`: read, swap if the
//! value is still the one read, otherwise again from the value the failed swap returns), which
//! are atomic too but retry under contention on one key.
//!
//! `MSETNX` is one state-machine command too (`KvCommand::InsertAll`): atomic when its keys
//! live in one shard, refused with Redis Cluster's `CROSSSLOT` otherwise (never split into
//! per-shard parts, which could set some keys and not others), and bounded as a transaction is
//! (at most `TXN_WRITES_MAX` keys and `TXN_BYTES_MAX` bytes of keys and values, checked here
//! before it is routed). `DBSIZE` counts by scanning
//! every shard (Flotilla keeps no key count): O(N), at most [`DBSIZE_SCANNED_MAX`] keys, each
//! shard's part read with the connection's consistency but the sum not one snapshot, so it is
//! exact only when no write runs meanwhile. `TIME` is this node's clock.

use super::access::Principal;
use super::connection::Shared;
use super::glob;
use super::info;
use super::router::{RouteError, Swap};
use super::AUTH_FAILURES_MAX;
use crate::wire::{check_user_key, check_value, ReadConsistency, UpdateOp};
use bytes::Bytes;
use flotilla_resp::command::{ClientAttr, Credentials, SetCondition};
use flotilla_resp::number::parse_i64;
use flotilla_resp::{error, introspection, Command, Frame, Protocol};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Swaps tried before a read-modify-write gives up under contention.
const SWAP_ATTEMPTS_MAX: usize = 64;
/// Keys `SCAN` looks at per call when the client gives no `COUNT` (Redis's default).
const SCAN_COUNT_DEFAULT: u64 = 10;
/// Keys of one MGET or EXISTS read at once.
pub const MULTI_KEY_READS_AT_ONCE: usize = 32;
/// Most bytes of values one MGET answers with (the reply is held whole before it is sent).
pub const MGET_REPLY_BYTES_MAX: usize = 64 << 20;

/// Most keys `KEYS` looks at: past it the client is told to use `SCAN`.
pub const KEYS_SCANNED_MAX: usize = 100_000;
/// Most bytes of keys `KEYS` answers with (the reply is held whole before it is sent).
pub const KEYS_REPLY_BYTES_MAX: usize = 16 << 20;
/// Most keys `DBSIZE` counts (it scans them: Flotilla keeps no count); past it, an error.
pub const DBSIZE_SCANNED_MAX: usize = 1_000_000;

/// Failed `AUTH`s are logged at most once per this long per listener (every one is counted in
/// `flotilla_resp_auth_failures_total`): a client guessing passwords must not flood the log.
pub const AUTH_LOG_EVERY: Duration = Duration::from_secs(1);

/// A listener's limit on log lines about failed authentication.
#[derive(Debug, Default)]
pub struct AuthLog {
    last: Mutex<Option<Instant>>,
    left_out: AtomicU64,
}

impl AuthLog {
    /// Whether a line may be written now, and if so how many were left out since the last one.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < AUTH_LOG_EVERY) {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.left_out.swap(0, Ordering::Relaxed))
    }
}

/// The state of one connection that commands read and change.
pub struct Conn {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub name: Bytes,
    /// `CLIENT SETINFO LIB-NAME` and `LIB-VER`, shown by `CLIENT INFO`.
    pub lib_name: Bytes,
    pub lib_ver: Bytes,
    pub protocol: Protocol,
    pub consistency: ReadConsistency,
    pub created: Instant,
    pub last_active: Instant,
    pub last_command: &'static str,
    /// Who the connection acts as; `None` until it authenticates.
    pub principal: Option<Principal>,
    /// Failed `AUTH`s since the connection opened or last authenticated.
    pub auth_failures: u32,
}

impl Conn {
    pub fn new(id: u64, peer: SocketAddr, local: Option<SocketAddr>, principal: Option<Principal>) -> Conn {
        let now = Instant::now();
        Conn {
            id,
            peer,
            local,
            principal,
            name: Bytes::new(),
            lib_name: Bytes::new(),
            lib_ver: Bytes::new(),
            protocol: Protocol::Resp2,
            consistency: ReadConsistency::Linearizable,
            created: now,
            last_active: now,
            last_command: "",
            auth_failures: 0,
        }
    }
}

/// Redis commands refused on purpose, answered with why rather than "unknown command" (which
/// would suggest a typo).
pub fn refused(args: &[Bytes]) -> Option<Frame> {
    let name = args.first()?;
    let named = |names: &[&str]| names.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()));
    if named(&["multi", "exec", "discard", "watch", "unwatch"]) {
        return Some(Frame::error(
            "ERR MULTI, EXEC, DISCARD and WATCH are not supported: Flotilla has no transactions across keys (yet)",
        ));
    }
    if named(&["expire", "pexpire", "expireat", "pexpireat", "ttl", "pttl", "persist", "setex", "psetex", "getex"]) {
        return Some(Frame::error("ERR expiries are not supported: Flotilla keys do not expire (yet)"));
    }
    None
}

/// Runs one command: its reply, and whether to close the connection after it.
pub async fn execute(shared: &Shared, conn: &mut Conn, command: Command) -> (Frame, bool) {
    if let Command::Quit = command {
        return (Frame::ok(), true);
    }
    let reply = match run(shared, conn, command).await {
        Ok(frame) => frame,
        Err(e) => Frame::error(e.message()),
    };
    // Guessing passwords costs a connection per AUTH_FAILURES_MAX tries.
    let close = conn.auth_failures >= AUTH_FAILURES_MAX;
    if close {
        shared.metrics.auth_closed.fetch_add(1, Ordering::Relaxed);
        if shared.auth_log.allow().is_some() {
            tracing::warn!(peer = %conn.peer, "redis protocol connection closed after {AUTH_FAILURES_MAX} failed AUTHs");
        }
    }
    (reply, close)
}

/// A failed command's error reply.
enum Failure {
    Redis(&'static str),
    Text(String),
    Route(RouteError),
}

impl Failure {
    fn message(self) -> Bytes {
        match self {
            Failure::Redis(text) => Bytes::from_static(text.as_bytes()),
            Failure::Text(text) => text.into(),
            Failure::Route(e) => e.message().into(),
        }
    }
}

impl From<RouteError> for Failure {
    fn from(e: RouteError) -> Failure {
        Failure::Route(e)
    }
}

const NO_EXPIRY: &str =
    "ERR SET with EX, PX, EXAT, PXAT or KEEPTTL is not supported: Flotilla keys do not expire (yet)";
const NO_PASSWORD: &str =
    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?";

fn value_frame(v: Option<Vec<u8>>) -> Frame {
    v.map_or(Frame::NullBulk, Frame::bulk)
}

async fn run(shared: &Shared, conn: &mut Conn, command: Command) -> Result<Frame, Failure> {
    let router = &shared.router;
    let reads = conn.consistency;
    Ok(match command {
        Command::Ping { message: None } => Frame::simple("PONG"),
        Command::Ping { message: Some(m) } => Frame::Bulk(m),
        Command::Echo { message } => Frame::Bulk(message),
        Command::Quit => Frame::ok(),
        Command::Hello { protocol, auth, client_name } => {
            // Authenticated first: a wrong password changes nothing else.
            match auth {
                Some(credentials) => authenticate(shared, conn, credentials)?,
                None if conn.principal.is_none() => return Err(Failure::Redis(error::HELLO_NO_AUTH)),
                None => {}
            }
            if let Some(p) = protocol {
                conn.protocol = p;
            }
            if let Some(name) = client_name {
                conn.name = name;
            }
            info::hello(conn)
        }
        Command::Auth(credentials) => {
            authenticate(shared, conn, credentials)?;
            Frame::ok()
        }
        Command::Time => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Frame::Array(vec![Frame::bulk(now.as_secs().to_string()), Frame::bulk(now.subsec_micros().to_string())])
        }
        Command::Select { db: 0 } => Frame::ok(),
        Command::Select { .. } => return Err(Failure::Redis(error::DB_INDEX_OUT_OF_RANGE)),
        Command::ClientSetName { name } => {
            conn.name = name;
            Frame::ok()
        }
        Command::ClientSetInfo { attr, value } => {
            match attr {
                ClientAttr::LibName => conn.lib_name = value,
                ClientAttr::LibVer => conn.lib_ver = value,
            }
            Frame::ok()
        }
        Command::ClientGetName if conn.name.is_empty() => Frame::NullBulk,
        Command::ClientGetName => Frame::Bulk(conn.name.clone()),
        Command::ClientId => Frame::Integer(i64::try_from(conn.id).unwrap_or(i64::MAX)),
        Command::ClientInfo => Frame::Verbatim { format: *b"txt", text: info::client_line(conn).into() },
        Command::ClientHelp => introspection::help("client").unwrap_or(Frame::NullArray),
        Command::CommandAll => introspection::command_info(&[]),
        Command::CommandCount => introspection::command_count(),
        Command::CommandDocs { names } => introspection::command_docs(&names),
        Command::CommandInfo { names } => introspection::command_info(&names),
        Command::CommandHelp => introspection::help("command").unwrap_or(Frame::NullArray),
        Command::Info { sections } => {
            Frame::Verbatim { format: *b"txt", text: info::info(shared, conn, &sections).await.into() }
        }
        Command::ReadOnly => {
            // As in Redis Cluster: reads may come from any replica, and may be stale.
            conn.consistency = ReadConsistency::Stale;
            Frame::ok()
        }
        Command::ReadWrite => {
            conn.consistency = ReadConsistency::Linearizable;
            Frame::ok()
        }
        Command::Scan { cursor, pattern, count, type_name } => {
            let scope = Scope::of(conn);
            let start = match cursor {
                0 => Vec::new(),
                c => shared.cursors.get(conn.principal.as_ref(), c).ok_or(Failure::Redis(error::INVALID_CURSOR))?,
            };
            let Some(start) = scope.start(start) else {
                return Ok(Frame::Array(vec![Frame::bulk("0"), Frame::Array(Vec::new())]));
            };
            // Every Flotilla value is a string: another type matches nothing.
            let strings = type_name.as_ref().is_none_or(|t| t.eq_ignore_ascii_case(b"string"));
            let limit = usize::try_from(count.unwrap_or(SCAN_COUNT_DEFAULT)).unwrap_or(usize::MAX);
            let page = router.scan_page(&start, scope.end(), limit, reads).await?;
            let keys = page
                .pairs
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| strings && pattern.as_ref().is_none_or(|p| glob::matches(p, k)))
                .map(Frame::bulk)
                .collect();
            let next = scope.next(page.next).map_or(0, |next| shared.cursors.save(conn.principal.as_ref(), next));
            Frame::Array(vec![Frame::bulk(next.to_string()), Frame::Array(keys)])
        }
        Command::Keys { pattern } => {
            let mut keys = Vec::new();
            let mut bytes = 0usize;
            scan_keys(shared, &Scope::of(conn), reads, "KEYS", KEYS_SCANNED_MAX, |key| {
                if glob::matches(&pattern, &key) {
                    bytes += key.len();
                    keys.push(Frame::bulk(key));
                }
                bytes <= KEYS_REPLY_BYTES_MAX
            })
            .await?;
            Frame::Array(keys)
        }
        Command::DbSize => {
            let mut count = 0i64;
            scan_keys(shared, &Scope::of(conn), reads, "DBSIZE", DBSIZE_SCANNED_MAX, |_| {
                count += 1;
                true
            })
            .await?;
            Frame::Integer(count)
        }
        data => run_data(shared, reads, data).await?,
    })
}

async fn run_data(shared: &Shared, reads: ReadConsistency, command: Command) -> Result<Frame, Failure> {
    let router = &shared.router;
    Ok(match command {
        Command::Get { key } => value_frame(router.get(&key, reads).await?),
        Command::Set { expiry: Some(_), .. } => return Err(Failure::Redis(NO_EXPIRY)),
        Command::Set { key, value, condition: None, get: false, expiry: None } => {
            router.put(&key, &value).await?;
            Frame::ok()
        }
        Command::Set { key, value, condition, get, expiry: None } => {
            let (previous, set) = swap(shared, &key, condition, |_| Ok(value.to_vec())).await?;
            match (get, set) {
                (true, _) => value_frame(previous),
                (false, true) => Frame::ok(),
                (false, false) => Frame::NullBulk,
            }
        }
        Command::SetNx { key, value } => {
            let (_, set) = swap(shared, &key, Some(SetCondition::IfMissing), |_| Ok(value.to_vec())).await?;
            Frame::Integer(i64::from(set))
        }
        Command::GetSet { key, value } => value_frame(swap(shared, &key, None, |_| Ok(value.to_vec())).await?.0),
        Command::GetDel { key } => value_frame(router.delete(&key).await?),
        Command::Del { keys } | Command::Unlink { keys } => {
            // Every key checked before any is deleted: a bad one later must not leave the
            // command half done.
            for key in &keys {
                check_user_key(key).map_err(|e| Failure::Route(RouteError::Invalid(e)))?;
            }
            let mut removed = 0i64;
            for key in &keys {
                removed += i64::from(router.delete(key).await?.is_some());
            }
            Frame::Integer(removed)
        }
        Command::Exists { keys } => {
            let mut found = 0i64;
            for batch in keys.chunks(MULTI_KEY_READS_AT_ONCE) {
                for value in join_all(batch.iter().map(|key| router.get(key, reads)).collect()).await {
                    found += i64::from(value?.is_some());
                }
            }
            Frame::Integer(found)
        }
        Command::Strlen { key } => {
            let len = router.get(&key, reads).await?.map_or(0, |v| v.len());
            Frame::Integer(i64::try_from(len).unwrap_or(i64::MAX))
        }
        Command::Type { key } => match router.get(&key, reads).await? {
            Some(_) => Frame::simple("string"),
            None => Frame::simple("none"),
        },
        Command::Append { key, value } => {
            let len = value.len();
            let previous = router.update(&key, UpdateOp::Append(value.to_vec())).await?;
            Frame::Integer(i64::try_from(previous.map_or(0, |v| v.len()) + len).unwrap_or(i64::MAX))
        }
        ref
        counter @ (Command::Incr { .. } | Command::Decr { .. } | Command::IncrBy { .. } | Command::DecrBy { .. }) => {
            let Some((key, delta)) = counter.counter_delta() else {
                return Err(Failure::Redis(error::INCREMENT_OVERFLOW));
            };
            let op = UpdateOp::AddInt(delta);
            let previous = router.update(key, op.clone()).await?;
            // The state machine applied `op` to `previous`; the same rule gives the reply.
            let new = op.apply(previous.as_deref()).map_err(|e| Failure::Text(format!("ERR {e}")))?;
            Frame::Integer(parse_i64(&new).ok_or(Failure::Redis(error::NOT_AN_INTEGER))?)
        }
        Command::IncrByFloat { key, delta } => {
            let op = UpdateOp::AddFloat(delta.to_bits());
            let previous = router.update(&key, op.clone()).await?;
            let new = op.apply(previous.as_deref()).map_err(|e| Failure::Text(format!("ERR {e}")))?;
            Frame::bulk(new)
        }
        Command::MGet { keys } => {
            // A few at once: MGET's keys may live in different shards (each read linearizable,
            // the whole not a snapshot). The reply is held whole, so its size is bounded.
            let mut values = Vec::with_capacity(keys.len().min(MULTI_KEY_READS_AT_ONCE));
            let mut bytes = 0usize;
            for batch in keys.chunks(MULTI_KEY_READS_AT_ONCE) {
                for value in join_all(batch.iter().map(|key| router.get(key, reads)).collect()).await {
                    let value = value?;
                    bytes += value.as_ref().map_or(0, |v| v.len());
                    if bytes > MGET_REPLY_BYTES_MAX {
                        return Err(Failure::Text(format!(
                            "ERR MGET answers {MGET_REPLY_BYTES_MAX} bytes of values at most: ask for fewer keys"
                        )));
                    }
                    values.push(value_frame(value));
                }
            }
            Frame::Array(values)
        }
        Command::MSet { pairs } => {
            // Key by key: not atomic across keys (they may live in different shards). Every
            // pair is checked first, so a bad one later does not leave the command half done.
            for (key, value) in &pairs {
                check_user_key(key)
                    .and_then(|_| check_value(value))
                    .map_err(|e| Failure::Route(RouteError::Invalid(e)))?;
            }
            for (key, value) in &pairs {
                router.put(key, value).await?;
            }
            Frame::ok()
        }
        Command::MSetNx { pairs } => {
            // Atomic as in Redis, but only within one shard: one state-machine command sets
            // every key if none exists. Keys of different shards get Redis Cluster's CROSSSLOT
            // (the node serving it checks again against its map, so a split in between is
            // caught too).
            for (key, value) in &pairs {
                check_user_key(key)
                    .and_then(|_| check_value(value))
                    .map_err(|e| Failure::Route(RouteError::Invalid(e)))?;
            }
            // One transaction: its totals are checked here, before it is routed (the shard
            // would refuse it, or the transport could not even carry it to a remote leader).
            crate::shard::check_insert_size(pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))).map_err(|e| {
                Failure::Text(format!("ERR MSETNX sets its keys in one transaction, and this one is too large: {e}"))
            })?;
            let view = shared.router.node().meta_view();
            let shards: std::collections::BTreeSet<_> =
                pairs.iter().filter_map(|(key, _)| view.map.lookup(key).map(|d| d.id)).collect();
            if shards.len() > 1 {
                return Err(Failure::Redis(error::CROSS_SLOT));
            }
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = pairs.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            match router.insert_all(pairs).await {
                Ok(set) => Frame::Integer(i64::from(set)),
                Err(RouteError::Invalid(e)) if e.starts_with("CROSSSLOT") => return Err(Failure::Text(e)),
                Err(e) => return Err(e.into()),
            }
        }
        Command::FlushDb(_) | Command::FlushAll(_) => {
            return Err(Failure::Redis("ERR FLUSHDB and FLUSHALL are not supported by Flotilla"))
        }
        other => {
            return Err(Failure::Text(format!("ERR '{}' is not a data command", other.spec().name)));
        }
    })
}

/// Makes the connection act as the user `credentials` name (`default` when none is named), if
/// the password is theirs; `-WRONGPASS` otherwise, and the connection stays as it was.
///
/// Without users, the listener's connections act as Redis's `default` user with `nopass` (or
/// as their client certificate's identity): as in Redis, `AUTH default <anything>` succeeds and
/// changes nothing, and `AUTH <password>` alone is an error. It never makes a connection that
/// has not authenticated act as anyone.
fn authenticate(shared: &Shared, conn: &mut Conn, credentials: Credentials) -> Result<(), Failure> {
    if !shared.users.any() {
        match credentials.username.as_deref() {
            None => return Err(Failure::Redis(NO_PASSWORD)),
            Some(b"default") if conn.principal.is_some() => return Ok(()),
            Some(_) => {}
        }
    }
    let name = credentials.username.as_deref().unwrap_or(b"default");
    let Some(user) = shared.users.check(name, &credentials.password) else {
        shared.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        conn.auth_failures = conn.auth_failures.saturating_add(1);
        if let Some(left_out) = shared.auth_log.allow() {
            tracing::info!(
                peer = %conn.peer,
                user = %name.escape_ascii(),
                failures_on_connection = conn.auth_failures,
                not_logged_since_last = left_out,
                "redis protocol AUTH failed (logged at most once a second; flotilla_resp_auth_failures_total counts all)"
            );
        }
        return Err(Failure::Redis(error::WRONG_PASS));
    };
    conn.principal = Some(Principal { user: user.name.clone(), grant: Some(user.grant.clone()) });
    conn.auth_failures = 0;
    Ok(())
}

/// The keys a connection may see: all, or its grant's prefix. `SCAN`, `KEYS` and `DBSIZE`
/// name no key, so instead of being refused they see only these (as a tenant's scans on the
/// client protocol do, `crate::authz::scope_scan`).
struct Scope {
    /// The first key visible (empty: from the start).
    first: Vec<u8>,
    /// The first key after them (`None`: to the end).
    end: Option<Vec<u8>>,
}

impl Scope {
    fn of(conn: &Conn) -> Scope {
        let prefix = conn.principal.as_ref().and_then(|p| p.grant.as_ref()).and_then(|g| g.prefix.clone());
        match prefix {
            Some(prefix) => Scope { end: crate::authz::prefix_end(&prefix), first: prefix },
            None => Scope { first: Vec::new(), end: None },
        }
    }

    /// Where a scan from `start` begins; `None` when nothing visible lies at or after it.
    fn start(&self, start: Vec<u8>) -> Option<Vec<u8>> {
        let start = start.max(self.first.clone());
        self.end.as_ref().is_none_or(|end| start < *end).then_some(start)
    }

    fn end(&self) -> Option<&[u8]> {
        self.end.as_deref()
    }

    /// Where a scan goes on after a page that ended at `next`; `None` at the end of the scope.
    fn next(&self, next: Option<Vec<u8>>) -> Option<Vec<u8>> {
        next.filter(|n| self.end.as_ref().is_none_or(|end| n < end))
    }
}

/// Calls `visit` with every key in `scope`, shard by shard (each page read with `reads`; the
/// whole is not one snapshot), at most `max` of them; `visit` returning false stops the scan
/// with an error, as does passing the bound (`what` names the command).
async fn scan_keys(
    shared: &Shared,
    scope: &Scope,
    reads: ReadConsistency,
    what: &str,
    max: usize,
    mut visit: impl FnMut(Vec<u8>) -> bool,
) -> Result<(), Failure> {
    let too_many = || {
        Failure::Text(format!(
            "ERR {what} looks at {max} keys or answers {KEYS_REPLY_BYTES_MAX} bytes at most, and there are more: use SCAN"
        ))
    };
    let mut scanned = 0usize;
    let Some(mut start) = scope.start(Vec::new()) else { return Ok(()) };
    loop {
        let page = shared.router.scan_page(&start, scope.end(), max - scanned, reads).await?;
        scanned += page.pairs.len();
        for (key, _) in page.pairs {
            if !visit(key) {
                return Err(too_many());
            }
        }
        match scope.next(page.next) {
            None => return Ok(()),
            Some(_) if scanned >= max => return Err(too_many()),
            Some(next) => start = next,
        }
    }
}

/// A read-modify-write of one key by compare-and-swap: reads the value, computes the new one
/// with `compute` (which may refuse), swaps it in if the value is still the one read, and
/// starts again from the value a failed swap returns. `condition` (`SET`'s `NX`/`XX`) may
/// decide not to write. Returns the value before and whether the new one was written.
async fn swap(
    shared: &Shared,
    key: &[u8],
    condition: Option<SetCondition>,
    mut compute: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, Failure>,
) -> Result<(Option<Vec<u8>>, bool), Failure> {
    let router = &shared.router;
    // NX needs no read: the swap's expectation is "absent".
    let mut current = match condition {
        Some(SetCondition::IfMissing) => None,
        _ => router.get(key, ReadConsistency::Linearizable).await?,
    };
    for _ in 0..SWAP_ATTEMPTS_MAX {
        match (condition, &current) {
            (Some(SetCondition::IfMissing), Some(_)) | (Some(SetCondition::IfExists), None) => {
                return Ok((current, false))
            }
            _ => {}
        }
        let new = compute(current.as_deref())?;
        match router.cas(key, current.as_deref(), Some(&new)).await? {
            Swap::Done => return Ok((current, true)),
            Swap::Failed(now) => current = now,
        }
    }
    Err(Failure::Text(format!(
        "ERR the key changed under {SWAP_ATTEMPTS_MAX} attempts to update it (too much contention); nothing was changed"
    )))
}

/// Runs `futures` together on this task; their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
