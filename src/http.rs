//! A small HTTP responder for Prometheus metrics (`GET /metrics`) and health (`GET /health`:
//! 200 `ok`, or 503 with the reason), on a port of its own. Hand-rolled over Tokio: two
//! fixed routes do not need an HTTP framework. Every connection is bounded in header bytes and
//! time.

use crate::Node;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

/// Largest request head read (bytes); a longer one is answered 431.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// A connection must send its request within this long (ms).
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Binds `addr` and serves `nodes`' metrics (all of them, one after another) and health (every
/// node must be healthy). Returns the bound address and the serving task.
pub async fn serve(addr: SocketAddr, nodes: Vec<Node>) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, peer)) = listener.accept().await else { continue };
            let nodes = nodes.clone();
            tokio::spawn(async move {
                let work = async {
                    let mut buf = Vec::with_capacity(1024);
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
                        if buf.len() > REQUEST_HEAD_BYTES_MAX {
                            return respond(
                                &mut sock,
                                "431 Request Header Fields Too Large",
                                "text/plain",
                                "too large\n",
                            )
                            .await;
                        }
                        let n = sock.read(&mut chunk).await?;
                        if n == 0 {
                            return Ok(());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf);
                    let mut parts = head.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    if method != "GET" {
                        return respond(&mut sock, "405 Method Not Allowed", "text/plain", "GET only\n").await;
                    }
                    match path {
                        "/metrics" => {
                            let mut body = String::new();
                            for n in &nodes {
                                body.push_str(&n.metrics_text().await);
                            }
                            respond(&mut sock, "200 OK", "text/plain; version=0.0.4", &body).await
                        }
                        "/health" => {
                            let bad: Vec<String> = nodes
                                .iter()
                                .filter_map(|n| n.health().err().map(|e| format!("node {}: {e}", n.id())))
                                .collect();
                            if bad.is_empty() {
                                respond(&mut sock, "200 OK", "text/plain", "ok\n").await
                            } else {
                                respond(&mut sock, "503 Service Unavailable", "text/plain", &(bad.join("\n") + "\n"))
                                    .await
                            }
                        }
                        _ => respond(&mut sock, "404 Not Found", "text/plain", "try /metrics or /health\n").await,
                    }
                };
                match tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), work).await {
                    Ok(Err(e)) => debug!(%peer, error = %e, "http connection failed"),
                    Err(_) => debug!(%peer, "http request timed out"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    Ok((bound, task))
}

async fn respond(sock: &mut tokio::net::TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}
