//! An endpoint for programs that are not nodes (the CLI, admin tools): it dials a node with
//! a client certificate and sends requests. It never accepts connections.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, Endpoint};

use crate::cert::{identity_of_cert, node_name, TlsIdentity};
use crate::config::FRAME_BYTES_MAX_DEFAULT;
use crate::error::TransportError;
use crate::frame::FRAME_HEADER_BYTES;
use crate::id::{NodeId, PeerIdentity};
use crate::pipe::{self, PipeSlot};
use crate::stream::{codes, request_on};
use crate::tls;

/// A client endpoint.
#[derive(Debug)]
pub struct Client {
    endpoint: Endpoint,
    /// Largest request or response frame, header included.
    frame_bytes_max: usize,
}

impl Client {
    /// A client bound to `bind_addr` (e.g. `127.0.0.1:0`) presenting `tls`'s certificate.
    pub fn new(tls: &TlsIdentity, bind_addr: SocketAddr) -> Result<Client, TransportError> {
        // A node certificate would work too, but the node would then treat this endpoint as the
        // node itself: keep identities apart.
        Self::presenting(tls, bind_addr, false)
    }

    /// A node's own client endpoint, presenting its node certificate: for requests to lower-id
    /// nodes that do not dial it yet (a node asking to join the cluster). They arrive under the
    /// node's identity on a connection that carries requests only.
    pub fn for_node(tls: &TlsIdentity, bind_addr: SocketAddr) -> Result<Client, TransportError> {
        Self::presenting(tls, bind_addr, true)
    }

    /// An endpoint presenting `tls`, which must be a node certificate if `node`, else a client one.
    fn presenting(tls: &TlsIdentity, bind_addr: SocketAddr, node: bool) -> Result<Client, TransportError> {
        let identity = tls.identity()?;
        if matches!(identity, PeerIdentity::Node(_)) != node {
            let want = if node { "a node endpoint needs a node" } else { "client endpoints need a client" };
            return Err(TransportError::Config(format!("{want} certificate, got {identity}")));
        }
        let config =
            tls::client_config(&tls.ca, Some((tls.chain.clone(), tls.key.clone_key())), tls::client_transport())?;
        Self::with_config(config, bind_addr)
    }

    /// A client with a hand-built QUIC configuration (tests use it to present no certificate
    /// or a bad one, see [`tls::client_config`]).
    pub fn with_config(config: quinn::ClientConfig, bind_addr: SocketAddr) -> Result<Client, TransportError> {
        let mut endpoint = Endpoint::client(bind_addr)?;
        endpoint.set_default_client_config(config);
        Ok(Client { endpoint, frame_bytes_max: FRAME_BYTES_MAX_DEFAULT })
    }

    /// The bound UDP address (servers log it as the remote address).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Connects to node `node` at `addr`, checking that its certificate names that node.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        node: NodeId,
        timeout: Duration,
    ) -> Result<ClientConnection, TransportError> {
        let connecting =
            self.endpoint.connect(addr, &node_name(node)).map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| TransportError::Timeout)?
            .map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
        let named = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().and_then(|cert| identity_of_cert(cert).ok()));
        if named != Some(PeerIdentity::Node(node)) {
            conn.close(codes::CLOSE_IDENTITY_REFUSED, b"unexpected identity");
            return Err(TransportError::Protocol(format!("{addr} is not n{node}")));
        }
        Ok(ClientConnection { conn, frame_bytes_max: self.frame_bytes_max, pipe: PipeSlot::default() })
    }

    /// Closes all connections and waits briefly for the servers to be told.
    pub async fn close(&self) {
        self.endpoint.close(codes::CLOSE_SHUTDOWN, b"client closed");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// A connection from a client to one node.
#[derive(Debug, Clone)]
pub struct ClientConnection {
    conn: Connection,
    frame_bytes_max: usize,
    /// The stream requests are pipelined on (see `pipe.rs`), opened on first use.
    pipe: PipeSlot,
}

impl ClientConnection {
    /// Sends a request and waits for the response, within `timeout`. Requests share one
    /// pipelined stream of the connection (see `pipe.rs`); one too large for a pipelined
    /// frame goes on a stream of its own.
    pub async fn request(&self, body: Bytes, timeout: Duration) -> Result<Bytes, TransportError> {
        if body.len() + FRAME_HEADER_BYTES > self.frame_bytes_max {
            return Err(TransportError::TooLarge {
                bytes: body.len() + FRAME_HEADER_BYTES,
                max_bytes: self.frame_bytes_max,
            });
        }
        if pipe::fits(body.len(), self.frame_bytes_max) {
            return self.pipe.request(&self.conn, body, self.frame_bytes_max, timeout).await;
        }
        self.request_on_own_stream(body, timeout).await
    }

    /// Sends a request on a bidirectional stream of its own and waits for the response,
    /// within `timeout`.
    pub async fn request_on_own_stream(&self, body: Bytes, timeout: Duration) -> Result<Bytes, TransportError> {
        tokio::time::timeout(timeout, request_on(&self.conn, &body, self.frame_bytes_max))
            .await
            .map_err(|_| TransportError::Timeout)?
    }

    /// The underlying QUIC connection (tests use it to send raw frames).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}
