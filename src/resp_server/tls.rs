//! TLS for the front door (`resp_tls = true`): the node's own certificate and the cluster's CAs,
//! the same files its QUIC transport uses, so `redis-cli --tls --cacert ca.pem --cert
//! client.pem --key client-key.pem` works with a certificate from `flotilla cert client`.
//!
//! Client certificates (Redis's `tls-auth-clients`):
//! - without password users: **required**, as on the transport: the certificate's role and
//!   prefix are the connection's (mutual TLS is the authentication);
//! - with password users: **optional** (`tls-auth-clients optional`): a connection that presents
//!   one acts with its role from the start; one that does not must `AUTH` first.
//!
//! Either way a certificate that is presented must chain to a cluster CA (another CA's, or an
//! expired one, fails the handshake). TLS 1.2 and 1.3 are offered (Redis clients built on older
//! OpenSSL still speak 1.2 only), on the transport's `ring` provider.
//!
//! On SIGHUP the server reloads its certificates ([`RespTls::reload`]); connections accepted
//! from then on get the new ones, open ones keep theirs.

use crate::transport::cert::{identity_of_cert, TlsIdentity};
use crate::transport::PeerIdentity;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// The acceptor new connections use, replaced on reload.
pub struct RespTls {
    acceptor: RwLock<TlsAcceptor>,
    cert_optional: bool,
}

impl std::fmt::Debug for RespTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespTls").field("cert_optional", &self.cert_optional).finish_non_exhaustive()
    }
}

impl RespTls {
    /// From the node's identity; `cert_optional` when password users exist.
    pub fn new(identity: &TlsIdentity, cert_optional: bool) -> Result<RespTls, String> {
        let acceptor = RwLock::new(acceptor(identity, cert_optional)?);
        Ok(RespTls { acceptor, cert_optional })
    }

    /// What a new connection is accepted with.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Uses `identity` for every connection accepted from now on; on error nothing changes.
    pub fn reload(&self, identity: &TlsIdentity) -> Result<(), String> {
        let new = self.prepare(identity)?;
        self.install(new);
        Ok(())
    }

    /// The acceptor `identity` makes, not in use yet ([`RespTls::install`]): a reload of several
    /// parts builds each one's before it changes any.
    pub fn prepare(&self, identity: &TlsIdentity) -> Result<TlsAcceptor, String> {
        acceptor(identity, self.cert_optional)
    }

    /// Uses `acceptor` (from [`RespTls::prepare`]) for every connection accepted from now on.
    pub fn install(&self, acceptor: TlsAcceptor) {
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
    }
}

fn acceptor(identity: &TlsIdentity, cert_optional: bool) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in &identity.ca {
        roots.add(ca.clone()).map_err(|e| format!("resp_tls: CA certificate: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = if cert_optional { verifier.allow_unauthenticated() } else { verifier };
    let verifier = verifier.build().map_err(|e| format!("resp_tls: client verifier: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("resp_tls: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| format!("resp_tls: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The identity in the client's verified certificate, if it presented one; an error for a
/// certificate whose identity or role does not read (refused rather than taken as admin).
pub fn peer_identity(conn: &rustls::ServerConnection) -> Result<Option<PeerIdentity>, String> {
    let Some(cert) = conn.peer_certificates().and_then(|chain| chain.first()) else { return Ok(None) };
    identity_of_cert(cert).map(Some).map_err(|e| e.to_string())
}
