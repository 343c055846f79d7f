//! The accept loop: one task per connection, at most `connections_max` at once (more are told
//! so in Redis's words and closed), all of them ended when the node shuts down. With TLS, each
//! connection's handshake runs in its own task (bounded by [`HANDSHAKE_TIMEOUT`]), and the
//! client certificate it presented, if any, decides who the connection acts as.

use super::access::Principal;
use super::connection::{self, Shared};
use super::metrics::RespMetrics;
use super::router::Router;
use super::tls::{self, RespTls};
use super::RespConfig;
use crate::transport::cert::TlsIdentity;
use crate::transport::PeerIdentity;
use crate::Node;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

/// How long the refusal at the connection limit may take to write.
const REFUSAL_WRITE_MS: u64 = 1_000;
/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound RESP listener, not serving yet ([`Listener::run`]).
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    config: RespConfig,
    tls: Option<Arc<RespTls>>,
}

/// Checks the configuration and binds its address; with `resp_tls`, builds the TLS acceptor
/// from the node's identity `node_tls`. Done before the node opens anything, so a listener that
/// may not start stops the node's start with the reason.
pub async fn bind(config: &RespConfig, node_tls: &TlsIdentity) -> Result<Listener, String> {
    config.check()?;
    let tls = match config.tls {
        true => Some(Arc::new(RespTls::new(node_tls, config.users.any())?)),
        false => None,
    };
    if tls.is_none() && config.users.any() && !config.listen.ip().is_loopback() {
        warn!(addr = %config.listen, "redis protocol without TLS outside loopback: AUTH passwords cross the network in the clear (set resp_tls = true)");
    }
    let tcp = TcpListener::bind(config.listen).await.map_err(|e| format!("resp_listen {}: {e}", config.listen))?;
    Ok(Listener { tcp, config: config.clone(), tls })
}

impl Listener {
    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The TLS acceptor, to reload certificates into (`None` for plaintext).
    pub fn tls(&self) -> Option<Arc<RespTls>> {
        self.tls.clone()
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
            unauthenticated_limits: self.config.unauthenticated_limits(),
            auth_timeout: self.config.auth_timeout,
            connections_max: self.config.connections_max,
            users: self.config.users.clone(),
            auth_log: Default::default(),
        });
        // Without users or TLS, nobody can authenticate: the listener is plaintext on
        // loopback, allowed by the configuration (`RespConfig::check`), as Redis's `default`
        // user with `nopass`.
        let open = !self.config.users.any() && self.tls.is_none();
        let require_roles = self.config.require_client_roles;
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
            let tls = self.tls.as_ref().map(|t| t.acceptor());
            let accepted = Instant::now();
            tokio::spawn(async move {
                shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                shared.metrics.connected.fetch_add(1, Ordering::Relaxed);
                let local = sock.local_addr().ok();
                // Each way boxed: a plaintext connection's task does not carry room for the
                // TLS handshake and stream (the task is sized for its largest state).
                let served = match tls {
                    None => {
                        let principal = open.then(Principal::default_user);
                        Box::pin(connection::serve(&shared, sock, peer, local, principal, accepted, stop)).await
                    }
                    Some(acceptor) => match Box::pin(handshake(&shared, acceptor, sock, peer, require_roles)).await {
                        Some((stream, principal)) => {
                            Box::pin(connection::serve(&shared, stream, peer, local, principal, accepted, stop)).await
                        }
                        None => Ok(()),
                    },
                };
                if let Err(e) = served {
                    debug!(%peer, error = %e, "redis protocol connection ended");
                }
                shared.metrics.connected.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            });
        }
    }
}

/// Runs the TLS handshake; the stream and who it acts as (from its client certificate, if it
/// presented one), or `None` if the handshake failed or the certificate may not be used (it is
/// logged, counted, and the connection closed).
async fn handshake(
    shared: &Shared,
    acceptor: tokio_rustls::TlsAcceptor,
    sock: TcpStream,
    peer: SocketAddr,
    require_roles: bool,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Option<Principal>)> {
    let refused = |why: String| {
        shared.metrics.tls_refused.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, reason = %why, "redis protocol TLS connection refused");
    };
    let mut stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            refused(format!("TLS handshake failed: {e}"));
            return None;
        }
        Err(_) => {
            refused("TLS handshake timed out".into());
            return None;
        }
    };
    match tls::peer_identity(stream.get_ref().1) {
        Ok(None) => Some((stream, None)),
        Ok(Some(PeerIdentity::Client(c))) if c.grant.is_none() && require_roles => {
            refused(format!("client certificate {} carries no role, and require_client_roles is set", c.name));
            let reply =
                b"-ERR client certificate carries no role, and this node requires one (require_client_roles)\r\n";
            let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_WRITE_MS), async {
                stream.write_all(reply).await?;
                stream.shutdown().await
            })
            .await;
            None
        }
        Ok(Some(identity)) => {
            if let PeerIdentity::Client(c) = &identity {
                if c.grant.is_none() {
                    warn!(%peer, client = %c.name, "client certificate carries no role: treated as admin for compatibility");
                }
            }
            Some((stream, Some(Principal::of_certificate(&identity))))
        }
        Err(e) => {
            refused(format!("client certificate: {e}"));
            None
        }
    }
}
