//! rustls and quinn configuration for mutual TLS with the cluster CA.
//!
//! TLS 1.3 only, on the `ring` provider passed explicitly (no process-wide default). Both
//! sides require a certificate chaining to the cluster CA; webpki checks the chain, the
//! validity period and the key usage, and the dialer additionally checks the server name
//! `node-<id>.flotilla`. Refusals surface as handshake errors that the endpoint logs with
//! rustls's reason (unknown issuer, expired, no certificate, ...).

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::cert::TlsIdentity;
use crate::config::TransportConfig;
use crate::error::TransportError;

/// ALPN protocol id; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"flotilla/1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(|e| TransportError::Config(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TransportError::Config("no CA certificate to trust".into()));
    }
    Ok(Arc::new(roots))
}

fn tls_err(e: rustls::Error) -> TransportError {
    TransportError::Config(format!("TLS: {e}"))
}

/// QUIC transport parameters derived from our config: keep-alive, idle timeout and the
/// stream limits that bound what one peer can make us hold.
pub(crate) fn quic_transport(config: &TransportConfig) -> Result<Arc<quinn::TransportConfig>, TransportError> {
    let mut transport = quinn::TransportConfig::default();
    let idle = IdleTimeout::try_from(Duration::from_millis(config.timing.idle_timeout_ms))
        .map_err(|_| TransportError::Config("idle_timeout_ms too large".into()))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(Duration::from_millis(config.timing.keep_alive_ms)));
    // Raft streams of a peer's K (bounded by RAFT_STREAMS_MAX) plus its transfers.
    let uni = u32::from(crate::config::RAFT_STREAMS_MAX) + u32::from(config.limits.transfers_in_per_peer_max);
    transport.max_concurrent_uni_streams(VarInt::from_u32(uni));
    transport.max_concurrent_bidi_streams(VarInt::from_u32(u32::from(config.limits.requests_in_per_peer_max)));
    transport.stream_receive_window(VarInt::from_u32(config.limits.stream_window_bytes));
    Ok(Arc::new(transport))
}

/// Server side: requires a client certificate from the cluster CA.
pub fn server_config(
    identity: &TlsIdentity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&identity.ca)?, provider.clone())
        .build()
        .map_err(|e| TransportError::Config(format!("client verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Config(format!("QUIC TLS: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport);
    Ok(server)
}

/// Client side: trusts only the cluster CAs and presents `client_auth` if given. Dialing
/// without a certificate is possible only so that tests can check the server refuses it.
pub fn client_config(
    ca: &[CertificateDer<'static>],
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .build()
        .map_err(|e| TransportError::Config(format!("server verifier: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_webpki_verifier(verifier);
    let mut tls = match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(tls_err)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Config(format!("QUIC TLS: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport);
    Ok(client)
}

/// Default QUIC parameters for a client endpoint (no Raft streams needed).
pub fn client_transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    Arc::new(transport)
}

#[cfg(test)]
pub(crate) fn verify_chain_for_tests(identity: &TlsIdentity) -> bool {
    let Ok(roots) = roots(&identity.ca) else { return false };
    let Ok(verifier) = WebPkiClientVerifier::builder_with_provider(roots, provider()).build() else { return false };
    verifier.verify_client_cert(&identity.chain[0], &identity.chain[1..], rustls::pki_types::UnixTime::now()).is_ok()
}
