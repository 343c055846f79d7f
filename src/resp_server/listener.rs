//! The accept loop: one task per connection, at most `connections_max` at once (more are told
//! so in Redis's words and closed), all of them ended when the node shuts down.

use super::connection::{self, Shared};
use super::metrics::RespMetrics;
use super::router::Router;
use super::RespConfig;
use crate::Node;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

/// How long the refusal at the connection limit may take to write.
const REFUSAL_WRITE_MS: u64 = 1_000;

/// A bound RESP listener, not serving yet ([`Listener::run`]).
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    config: RespConfig,
}

/// Checks the configuration and binds its address. Done before the node opens anything, so a
/// listener that may not start stops the node's start with the reason.
pub async fn bind(config: &RespConfig) -> Result<Listener, String> {
    config.check()?;
    let tcp = TcpListener::bind(config.listen).await.map_err(|e| format!("resp_listen {}: {e}", config.listen))?;
    Ok(Listener { tcp, config: config.clone() })
}

impl Listener {
    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves until `stop` turns true; the connections watch it too.
    pub async fn run(self, node: Node, metrics: Arc<RespMetrics>, mut stop: watch::Receiver<bool>) {
        let local = self.tcp.local_addr().ok();
        info!(node = node.id().0, addr = ?local, "redis protocol listener started");
        let shared = Arc::new(Shared {
            router: Router::new(node),
            cursors: Default::default(),
            metrics,
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            port: local.map_or(0, |a| a.port()),
            limits: self.config.limits.clone(),
            connections_max: self.config.connections_max,
        });
        let slots = Arc::new(Semaphore::new(self.config.connections_max));
        loop {
            let accepted = tokio::select! {
                a = self.tcp.accept() => a,
                _ = stop.changed() => break,
            };
            let (mut sock, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    warn!(error = %e, "redis protocol accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                shared.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let refuse = sock.write_all(b"-ERR max number of clients reached\r\n");
                    let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_WRITE_MS), refuse).await;
                });
                continue;
            };
            let _ = sock.set_nodelay(true);
            let shared = shared.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                shared.metrics.connected.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = connection::serve(&shared, sock, peer, stop).await {
                    debug!(%peer, error = %e, "redis protocol connection ended");
                }
                shared.metrics.connected.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            });
        }
    }
}
