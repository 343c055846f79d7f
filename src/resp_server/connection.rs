//! One connection, served by one task: read what the client sends into one buffer, take every
//! complete request off it and run and answer each in the order sent, one at a time
//! (pipelining), write the replies of a batch together, then read again. Buffers are bounded:
//! the parser refuses a request larger than its limits before buffering it, and replies are
//! written out whenever they pass [`OUT_FLUSH_BYTES`], reading on while they go out
//! ([`write_reading`]). A protocol error is answered and the connection closed; a client that
//! stops reading its replies is dropped after [`WRITE_TIMEOUT`]; a client that half-closes gets
//! the replies to everything it sent, then the connection closes. The same code serves
//! plaintext TCP and TLS (any `AsyncRead + AsyncWrite` stream).
//!
//! A connection that must authenticate is held to less until it has: the parser's small limits
//! ([`RespConfig::unauthenticated_limits`](super::RespConfig::unauthenticated_limits)), a small
//! read-ahead ([`UNAUTHENTICATED_INPUT_AHEAD_MAX`]), and a deadline from its accept
//! (`auth_timeout`), after which it is closed.

use super::access::{self, Principal};
use super::cursors::Cursors;
use super::dispatch::{self, AuthLog, Conn};
use super::metrics::RespMetrics;
use super::router::Router;
use super::users::Users;
use bytes::BytesMut;
use flotilla_resp::{table, Command, Frame, Limits, Parser};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Replies are written out once this many bytes wait, even mid-batch.
pub const OUT_FLUSH_BYTES: usize = 64 << 10;
/// A client must take its replies within this long, or it is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// What one read asks for at least while requests keep coming (the last read filled its room).
const READ_CHUNK: usize = 16 << 10;
/// What a read asks for after a quiet spell, and the most buffer room an idle connection keeps:
/// thousands of connections mostly wait, and most requests are small.
const IDLE_READ: usize = 1 << 10;
/// Bytes of requests read ahead while replies are being written, at most: a pipeline sent
/// whole before its replies are read fits if its requests do (Redis, which buffers replies
/// without bound for such clients, has no such limit; a larger pipeline is dropped after
/// [`WRITE_TIMEOUT`]).
const INPUT_AHEAD_MAX: usize = 32 << 20;
/// Read room reserved ahead for a large bulk string whose length is known, at most.
const RESERVE_MAX: usize = 1 << 20;
/// [`INPUT_AHEAD_MAX`] of a connection that has not authenticated yet.
const UNAUTHENTICATED_INPUT_AHEAD_MAX: usize = 64 << 10;
/// How long the goodbye to a connection that did not authenticate in time may take to write.
const GOODBYE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What every connection of a listener shares.
pub struct Shared {
    pub router: Router,
    pub cursors: Cursors,
    pub metrics: Arc<RespMetrics>,
    pub next_id: AtomicU64,
    pub started: Instant,
    pub port: u16,
    pub limits: Limits,
    /// The parser's limits until a connection that must authenticate has.
    pub unauthenticated_limits: Limits,
    /// How long from its accept a connection that must authenticate may take to.
    pub auth_timeout: Duration,
    pub connections_max: usize,
    /// Password users (`AUTH`); none when authentication is off.
    pub users: Users,
    /// Failed authentication is logged at most once a second.
    pub auth_log: AuthLog,
}

/// Serves one connection until the client leaves, breaks the protocol or the node stops.
/// `principal` is who the connection acts as from the start (a client certificate's identity,
/// or the `default` user where no authentication is configured); `None` until it sends `AUTH`,
/// which it must do within the listener's `auth_timeout` from `accepted`.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut sock: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    principal: Option<Principal>,
    accepted: Instant,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn::new(id, peer, local, principal);
    // Until it has authenticated: small requests, little read ahead, and a deadline.
    let mut authenticated = conn.principal.is_some();
    let auth_deadline = accepted + shared.auth_timeout;
    let mut parser = Parser::new(match authenticated {
        true => shared.limits.clone(),
        false => shared.unauthenticated_limits.clone(),
    });
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut last_read_filled = false;
    // How much may be read ahead while replies are written, and for how long they may take.
    let ahead = |authenticated: bool| match authenticated {
        true => (INPUT_AHEAD_MAX, WRITE_TIMEOUT),
        false => {
            let left = auth_deadline.saturating_duration_since(Instant::now());
            (UNAUTHENTICATED_INPUT_AHEAD_MAX, WRITE_TIMEOUT.min(left))
        }
    };
    loop {
        if !authenticated && Instant::now() >= auth_deadline {
            // Checked here too: a client that keeps sending may never wait in the read below.
            return auth_timed_out(shared, &conn, &mut sock, &mut out).await;
        }
        loop {
            let args = match parser.parse(&mut input) {
                Ok(Some(args)) => args,
                Ok(None) => break,
                Err(e) => {
                    shared.metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    e.to_frame().encode(conn.protocol, &mut out);
                    write(&mut sock, &mut out).await?;
                    let _ = sock.shutdown().await;
                    return Ok(());
                }
            };
            if args.first().is_some_and(|a| a.eq_ignore_ascii_case(b"post") || a.eq_ignore_ascii_case(b"host:")) {
                // An HTTP request, as a web page can make a browser send to a loopback port:
                // its body must never run as commands. Closed unanswered, as Redis does.
                tracing::warn!(%peer, "an HTTP request on the Redis port (a possible cross-protocol attack): connection closed");
                shared.metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let name = args.first().and_then(|n| table::spec(n)).map_or("unknown", |s| s.name);
            let parsed = Instant::now();
            if let Some(reply) = access::gate(conn.principal.as_ref(), &args) {
                shared.metrics.denied.fetch_add(1, Ordering::Relaxed);
                answer(shared, &mut conn, &mut out, name, reply, parsed);
                continue;
            }
            if let Some(reply) = dispatch::refused(&args) {
                answer(shared, &mut conn, &mut out, name, reply, parsed);
                continue;
            }
            let command = match Command::parse(&args) {
                Ok(command) => command,
                Err(e) => {
                    answer(shared, &mut conn, &mut out, name, e.to_frame(), parsed);
                    continue;
                }
            };
            if let Some(principal) = &conn.principal {
                if let Err(reply) = access::authorize(principal, &command) {
                    shared.metrics.denied.fetch_add(1, Ordering::Relaxed);
                    answer(shared, &mut conn, &mut out, name, reply, parsed);
                    continue;
                }
            }
            // One at a time, in the order sent: Redis runs a connection's commands in order,
            // and clients count on it across keys (write the data, then the flag that points
            // to it; read the flag, then the data). Running requests on different keys at once
            // could let them take effect, or be read, out of that order; keeping the order
            // while pipelining across shards needs each shard's requests proposed in order,
            // which is not built yet.
            // Boxed: its state (routing, retries, fan-outs) lives only while a command runs, not
            // in every idle connection's task.
            let (reply, close) = Box::pin(dispatch::execute(shared, &mut conn, command)).await;
            answer(shared, &mut conn, &mut out, name, reply, parsed);
            if close {
                write(&mut sock, &mut out).await?;
                let _ = sock.shutdown().await;
                return Ok(());
            }
            if !authenticated && conn.principal.is_some() {
                // Authenticated: the configured limits from the next request on.
                authenticated = true;
                parser.set_limits(shared.limits.clone());
            }
            if out.len() >= OUT_FLUSH_BYTES {
                let (ahead_max, timeout) = ahead(authenticated);
                write_reading(&mut sock, &mut out, &mut input, ahead_max, timeout).await?;
            }
        }
        let before = input.len();
        let (ahead_max, timeout) = ahead(authenticated);
        write_reading(&mut sock, &mut out, &mut input, ahead_max, timeout).await?;
        if input.len() > before {
            // More requests arrived while the replies went out: parse them before waiting.
            continue;
        }
        // Waiting for the client: give back the room a burst left behind.
        if out.capacity() > IDLE_READ {
            out = BytesMut::new();
        }
        if input.is_empty() && input.capacity() > IDLE_READ {
            input = BytesMut::new();
        }
        let floor = if last_read_filled { READ_CHUNK } else { IDLE_READ };
        input.reserve(parser.bytes_missing(&input).clamp(floor, RESERVE_MAX));
        let room = input.capacity() - input.len();
        let auth_left = (!authenticated).then(|| auth_deadline.saturating_duration_since(Instant::now()));
        let n = tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            _ = until(auth_left) => return auth_timed_out(shared, &conn, &mut sock, &mut out).await,
            n = sock.read_buf(&mut input) => n?,
        };
        if n == 0 {
            // The client closed its side: everything it sent is answered.
            return Ok(());
        }
        last_read_filled = n >= room;
        conn.last_active = Instant::now();
    }
}

/// Says goodbye to a connection that did not authenticate in time (a short write, not waited
/// on for long) and closes it.
async fn auth_timed_out<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &Conn,
    sock: &mut S,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    shared.metrics.auth_closed.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(peer = %conn.peer, "redis protocol connection closed: it did not authenticate in time");
    Frame::error("ERR authentication timed out: AUTH within resp_auth_timeout_ms of connecting")
        .encode(conn.protocol, out);
    let _ = tokio::time::timeout(GOODBYE_WRITE_TIMEOUT, async {
        write(sock, out).await?;
        sock.shutdown().await
    })
    .await;
    Ok(())
}

/// Waits `left`, or forever if `None`.
async fn until(left: Option<Duration>) {
    match left {
        Some(left) => tokio::time::sleep(left).await,
        None => std::future::pending().await,
    }
}

fn answer(shared: &Shared, conn: &mut Conn, out: &mut BytesMut, name: &'static str, reply: Frame, since: Instant) {
    conn.last_command = name;
    shared.metrics.count(name, matches!(reply, Frame::Error(_)), since.elapsed());
    reply.encode(conn.protocol, out);
}

/// Writes `out` within `timeout` while reading what the client sends on into `input` (up to
/// `ahead_max` bytes, [`INPUT_AHEAD_MAX`] once authenticated). A client may send a whole pipeline before it reads a reply
/// (redis-py's `execute`, Jedis's `sync`): not reading meanwhile would leave both sides
/// blocked on full socket buffers until the write timeout drops the client. Both directions
/// are polled on the one stream (plaintext or TLS) from one future; a read or write that is not
/// ready consumes nothing, so polling them by turns loses no byte.
async fn write_reading<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    out: &mut BytesMut,
    input: &mut BytesMut,
    ahead_max: usize,
    timeout: Duration,
) -> std::io::Result<()> {
    let (mut written, mut closed) = (0, false);
    let io = std::future::poll_fn(|cx| loop {
        let mut progress = false;
        if written < out.len() {
            match std::pin::pin!(sock.write(&out[written..])).poll(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    written += n;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if written == out.len() {
            // TLS holds records until flushed.
            match std::pin::pin!(sock.flush()).poll(cx) {
                Poll::Ready(result) => return Poll::Ready(result),
                Poll::Pending => {}
            }
        }
        if !closed && input.len() < ahead_max {
            input.reserve(READ_CHUNK);
            match std::pin::pin!(sock.read_buf(input)).poll(cx) {
                // The client closed its side: what it sent is answered after this write, and
                // the main loop sees the end of its input.
                Poll::Ready(Ok(0)) => closed = true,
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if !progress {
            return Poll::Pending;
        }
    });
    tokio::time::timeout(timeout, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the client does not read its replies"))??;
    out.clear();
    Ok(())
}

async fn write<S: AsyncWrite + Unpin>(sock: &mut S, out: &mut BytesMut) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let io = async {
        sock.write_all(out).await?;
        sock.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, io).await {
        Ok(result) => {
            out.clear();
            result
        }
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client does not read its replies")),
    }
}
