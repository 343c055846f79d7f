//! One connection, served by one task: read what the client sends into one buffer, take every
//! complete request off it and answer each in order (pipelining), write the replies of a batch
//! together, then read again. Buffers are bounded: the parser refuses a request larger than
//! its limits before buffering it, and replies are written out whenever they pass
//! [`OUT_FLUSH_BYTES`]. A protocol error is answered and the connection closed; a client that
//! stops reading its replies is dropped after [`WRITE_TIMEOUT`]; a client that half-closes gets
//! the replies to everything it sent, then the connection closes.

use super::dispatch::{self, Conn};
use super::metrics::RespMetrics;
use super::router::Router;
use bytes::BytesMut;
use flotilla_resp::{table, Command, Frame, Limits, Parser};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Replies are written out once this many bytes wait, even mid-batch.
pub const OUT_FLUSH_BYTES: usize = 64 << 10;
/// A client must take its replies within this long, or it is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// What one read asks for at least.
const READ_CHUNK: usize = 16 << 10;
/// Read room reserved ahead for a large bulk string whose length is known, at most.
const RESERVE_MAX: usize = 1 << 20;

/// What every connection of a listener shares.
pub struct Shared {
    pub router: Router,
    pub metrics: Arc<RespMetrics>,
    pub next_id: AtomicU64,
    pub started: Instant,
    pub port: u16,
    pub limits: Limits,
}

/// Serves one connection until the client leaves, breaks the protocol or the node stops.
pub async fn serve(
    shared: &Shared,
    mut sock: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let local = sock.local_addr().ok();
    let mut conn = Conn::new(id, peer, local);
    let mut parser = Parser::new(shared.limits.clone());
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    loop {
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
            let name = args.first().and_then(|n| table::spec(n)).map_or("unknown", |s| s.name);
            let (reply, close) = match Command::parse(&args) {
                Ok(command) => dispatch::execute(shared, &mut conn, command).await,
                Err(e) => (e.to_frame(), false),
            };
            conn.last_command = name;
            shared.metrics.count(name, matches!(reply, Frame::Error(_)));
            reply.encode(conn.protocol, &mut out);
            if close {
                write(&mut sock, &mut out).await?;
                let _ = sock.shutdown().await;
                return Ok(());
            }
            if out.len() >= OUT_FLUSH_BYTES {
                write(&mut sock, &mut out).await?;
            }
        }
        write(&mut sock, &mut out).await?;
        let want = parser.bytes_missing(&input).clamp(READ_CHUNK, RESERVE_MAX);
        input.reserve(want);
        let n = tokio::select! {
            n = sock.read_buf(&mut input) => n?,
            _ = stop.changed() => return Ok(()),
        };
        if n == 0 {
            // The client closed its side: everything it sent is answered.
            return Ok(());
        }
        conn.last_active = Instant::now();
    }
}

async fn write(sock: &mut TcpStream, out: &mut BytesMut) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(WRITE_TIMEOUT, sock.write_all(out)).await {
        Ok(result) => {
            out.clear();
            result
        }
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client does not read its replies")),
    }
}
