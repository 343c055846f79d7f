//! Certificates for mutual TLS: the cluster CA, node certificates and client certificates.
//!
//! Identity naming: a node's certificate carries exactly one DNS subject alternative name
//! `node-<id>.flotilla` (decimal id); a client's carries `client-<name>.flotilla`. A node
//! dials a peer with the server name `node-<id>.flotilla`, so TLS itself checks that the
//! peer is the node it meant; the accepting side reads the name from the verified client
//! certificate. Node certificates are valid for both TLS server and client authentication;
//! client certificates only for client authentication, so a client certificate can never
//! serve as a node.
//!
//! Roles: a client certificate also carries its [`Grant`] as one URI subject alternative name,
//! `urn:flotilla:role:<role>` or `urn:flotilla:role:<role>:prefix:<hex>` (the prefix's bytes in
//! lowercase hex, so any bytes are safe). Identities are read only from DNS names and grants
//! only from URIs, so neither can pass for the other; a node certificate carrying a grant, two
//! grants, or a malformed `urn:flotilla:` URI is refused rather than read as no grant.
//!
//! **Compatibility rule:** a client certificate without a grant (issued before roles existed)
//! is accepted as `admin`, so existing CLI certificates keep working; the node logs a warning at
//! every such connection. Reissue them with `flotilla cert client --role ...`.
//!
//! The `flotilla cert` command is meant to call [`CertificateAuthority`] and
//! [`write_pem_file`]; tests use the same helpers.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::id::{ClientIdentity, Grant, NodeId, PeerIdentity, Role};

/// Domain under which identities are named.
pub const IDENTITY_DOMAIN: &str = "flotilla";
/// Default validity of a new CA.
pub const CA_VALIDITY_DAYS: u64 = 3650;
/// Default validity of a new node or client certificate.
pub const LEAF_VALIDITY_DAYS: u64 = 825;
/// Longest client name accepted in `client-<name>.flotilla`.
pub const CLIENT_NAME_BYTES_MAX: usize = 48;
/// Longest key prefix a client certificate may be limited to (bytes; twice that in hex).
pub const GRANT_PREFIX_BYTES_MAX: usize = 256;
/// Start of the URI naming a client's grant.
pub const GRANT_URI_PREFIX: &str = "urn:flotilla:role:";
/// Backdating of `not_before`, so that a peer whose clock is slightly behind accepts a
/// certificate issued a moment ago.
pub const CLOCK_SKEW_ALLOWANCE_SECS: u64 = 3600;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not build or sign the certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file or string could not be read.
    #[error("cannot read PEM {what}: {reason}")]
    Pem {
        /// Which item (CA certificate, node certificate, key).
        what: &'static str,
        /// The underlying error.
        reason: String,
    },
    /// The certificate does not parse as X.509.
    #[error("certificate does not parse: {0}")]
    Parse(String),
    /// The certificate has no usable identity name, or more than one.
    #[error("certificate identity: {0}")]
    Identity(String),
    /// A client name that cannot be put in a certificate.
    #[error("invalid client name {0:?}: use 1-{max} characters of [a-z0-9-]", max = CLIENT_NAME_BYTES_MAX)]
    ClientName(String),
    /// A grant that cannot be put in a certificate, or one read from a certificate that does
    /// not parse.
    #[error("invalid role grant: {0}")]
    Grant(String),
    /// Writing or reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The DNS name identifying a node: `node-<id>.flotilla`.
pub fn node_name(node: NodeId) -> String {
    format!("node-{}.{IDENTITY_DOMAIN}", node.0)
}

/// The DNS name identifying a client: `client-<name>.flotilla`.
pub fn client_name(name: &str) -> String {
    format!("client-{name}.{IDENTITY_DOMAIN}")
}

fn valid_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= CLIENT_NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Reads an identity from a DNS name; `None` for names outside our scheme.
pub fn parse_identity_name(name: &str) -> Option<PeerIdentity> {
    let label = name.strip_suffix(IDENTITY_DOMAIN)?.strip_suffix('.')?;
    if let Some(id) = label.strip_prefix("node-") {
        // Canonical decimal only, so one node has exactly one name.
        if id.is_empty()
            || id.len() > 20
            || !id.bytes().all(|b| b.is_ascii_digit())
            || (id.len() > 1 && id.starts_with('0'))
        {
            return None;
        }
        return id.parse().ok().map(|id| PeerIdentity::Node(NodeId(id)));
    }
    let client = label.strip_prefix("client-")?;
    valid_client_name(client).then(|| PeerIdentity::Client(ClientIdentity::from(client)))
}

/// The URI naming `grant`: `urn:flotilla:role:<role>[:prefix:<hex>]`.
pub fn grant_uri(grant: &Grant) -> String {
    let mut uri = format!("{GRANT_URI_PREFIX}{}", grant.role);
    if let Some(prefix) = &grant.prefix {
        uri.push_str(":prefix:");
        for b in prefix {
            uri.push_str(&format!("{b:02x}"));
        }
    }
    uri
}

/// Checks that `grant` can be issued and read back: a prefix is 1 to
/// [`GRANT_PREFIX_BYTES_MAX`] bytes, does not start with `0x00` (the cluster's own keys), and
/// is never given to an admin, whose operations span the whole cluster.
pub fn check_grant(grant: &Grant) -> Result<(), CertError> {
    let Some(prefix) = &grant.prefix else { return Ok(()) };
    if grant.role == Role::Admin {
        return Err(CertError::Grant("an admin acts on the whole cluster and cannot be limited to a prefix".into()));
    }
    if prefix.is_empty() || prefix.len() > GRANT_PREFIX_BYTES_MAX {
        return Err(CertError::Grant(format!("a prefix must be 1 to {GRANT_PREFIX_BYTES_MAX} bytes")));
    }
    if prefix[0] == 0 {
        return Err(CertError::Grant("a prefix must not start with 0x00 (the cluster's own keys)".into()));
    }
    Ok(())
}

/// Reads a grant URI; `Ok(None)` for URIs outside our scheme, an error for one inside it that
/// does not parse (so that a damaged grant never reads as "no grant", which means admin).
pub fn parse_grant_uri(uri: &str) -> Result<Option<Grant>, CertError> {
    let bad = || CertError::Grant(format!("malformed grant URI {uri:?}"));
    // URN schemes and namespaces are case-insensitive (RFC 8141): any spelling of ours, or a
    // role named anywhere in the URI, is a grant that must parse — never "no grant".
    let lower = uri.to_ascii_lowercase();
    if !lower.starts_with("urn:flotilla:") && !lower.contains("flotilla:role") {
        return Ok(None);
    }
    let rest = uri.strip_prefix(GRANT_URI_PREFIX).ok_or_else(bad)?;
    let (role, prefix) = match rest.split_once(":prefix:") {
        Some((role, hex)) => (role, Some(decode_hex(hex).ok_or_else(bad)?)),
        None => (rest, None),
    };
    let role = Role::parse(role).ok_or_else(bad)?;
    let grant = Grant { role, prefix };
    check_grant(&grant)?;
    Ok(Some(grant))
}

/// Lowercase hex only, so that one prefix has exactly one spelling.
fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes.chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// The identity named in a certificate (DER). Exactly one of its DNS names must follow our
/// scheme, and at most one of its URIs may name a grant (a client's only); the certificate's
/// chain must already have been verified by TLS.
pub fn identity_of_cert(der: &[u8]) -> Result<PeerIdentity, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?
        .ok_or_else(|| CertError::Identity("no subject alternative name".into()))?;
    let mut found = None;
    let mut grant = None;
    for name in &san.value.general_names {
        match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => {
                if let Some(identity) = parse_identity_name(dns) {
                    if found.replace(identity).is_some() {
                        return Err(CertError::Identity("more than one flotilla identity".into()));
                    }
                }
            }
            x509_parser::extensions::GeneralName::URI(uri) => {
                if let Some(g) = parse_grant_uri(uri)? {
                    if grant.replace(g).is_some() {
                        return Err(CertError::Grant("more than one grant".into()));
                    }
                }
            }
            _ => {}
        }
    }
    match (found, grant) {
        (None, _) => Err(CertError::Identity("no node-<id> or client-<name> name".into())),
        (Some(PeerIdentity::Node(_)), Some(_)) => Err(CertError::Grant("a node certificate carries a grant".into())),
        (Some(PeerIdentity::Client(c)), grant) => Ok(PeerIdentity::Client(ClientIdentity { grant, ..c })),
        (Some(node), None) => Ok(node),
    }
}

/// A validity period.
#[derive(Copy, Clone, Debug)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: SystemTime,
    /// Last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// From a little before now (clock skew) to `days` from now.
    pub fn days_from_now(days: u64) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(CLOCK_SKEW_ALLOWANCE_SECS),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8). Keep it secret.
    pub key_pem: String,
}

/// The cluster CA: signs node and client certificates.
pub struct CertificateAuthority {
    /// Signs new certificates (the CA's name, key identifier and key).
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate, handed to every node and client as the trust root.
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA valid for [`CA_VALIDITY_DAYS`].
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        Self::generate_with_validity(common_name, Validity::days_from_now(CA_VALIDITY_DAYS))
    }

    /// A new self-signed CA with the given validity.
    pub fn generate_with_validity(common_name: &str, validity: Validity) -> Result<Self, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, validity);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads a CA written earlier (its certificate and key, PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Pem { what: "CA key", reason: e.to_string() })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| CertError::Pem { what: "CA certificate", reason: e.to_string() })?;
        Ok(CertificateAuthority { issuer, cert_pem: cert_pem.to_string() })
    }

    /// The CA certificate (PEM): the trust root every node and client is given.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PEM). Keep it off the nodes when possible.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `node`, valid for [`LEAF_VALIDITY_DAYS`].
    pub fn issue_node(&self, node: NodeId) -> Result<IssuedCert, CertError> {
        self.issue(&PeerIdentity::Node(node), Validity::days_from_now(LEAF_VALIDITY_DAYS))
    }

    /// A client certificate for `name` (lowercase letters, digits, `-`) carrying `grant`.
    pub fn issue_client(&self, name: &str, grant: Grant) -> Result<IssuedCert, CertError> {
        self.issue(&PeerIdentity::Client(ClientIdentity::new(name, grant)), Validity::days_from_now(LEAF_VALIDITY_DAYS))
    }

    /// A certificate for any identity and validity (tests use it for expired certificates).
    pub fn issue(&self, identity: &PeerIdentity, validity: Validity) -> Result<IssuedCert, CertError> {
        let (name, usages, grant) = match identity {
            PeerIdentity::Node(node) => {
                (node_name(*node), vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth], None)
            }
            PeerIdentity::Client(client) => {
                if !valid_client_name(&client.name) {
                    return Err(CertError::ClientName(client.name.clone()));
                }
                if let Some(grant) = &client.grant {
                    check_grant(grant)?;
                }
                (client_name(&client.name), vec![ExtendedKeyUsagePurpose::ClientAuth], client.grant.as_ref())
            }
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name.clone());
        params.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
        if let Some(grant) = grant {
            params.subject_alt_names.push(SanType::URI(grant_uri(grant).try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A self-signed certificate for `identity`, signed by no CA (tests use it to check refusal).
pub fn self_signed(identity: &PeerIdentity) -> Result<IssuedCert, CertError> {
    let name = match identity {
        PeerIdentity::Node(node) => node_name(*node),
        PeerIdentity::Client(client) => client_name(&client.name),
    };
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec![name])?.self_signed(&key)?;
    Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = OffsetDateTime::from(validity.not_before);
    params.not_after = OffsetDateTime::from(validity.not_after);
}

/// Reads the CA certificates of `pem` (every certificate in it; at least one).
pub fn ca_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let cas = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem { what: "CA certificate", reason: e.to_string() })?;
    if cas.is_empty() {
        return Err(CertError::Pem { what: "CA certificate", reason: "no certificate in PEM".into() });
    }
    Ok(cas)
}

/// What a node or client needs for mutual TLS: the CA to trust, its own certificate chain and
/// key. Build it from PEM with [`TlsIdentity::from_pem`] or files with [`TlsIdentity::load`].
#[derive(Debug)]
pub struct TlsIdentity {
    /// The CAs trusted, the only roots: the cluster CA and, while certificates are moved to a
    /// new CA, that one too (a CA file may hold several certificates).
    pub ca: Vec<CertificateDer<'static>>,
    /// Own certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Own private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl TlsIdentity {
    /// From PEM text: the CA certificate, own certificate (chain) and own key.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let ca = ca_from_pem(ca_pem)?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem { what: "certificate", reason: e.to_string() })?;
        if chain.is_empty() {
            return Err(CertError::Pem { what: "certificate", reason: "no certificate in PEM".into() });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CertError::Pem { what: "key", reason: e.to_string() })?;
        Ok(TlsIdentity { ca, chain, key })
    }

    /// From the CA's PEM and an issued certificate.
    pub fn from_issued(ca_pem: &str, issued: &IssuedCert) -> Result<Self, CertError> {
        Self::from_pem(ca_pem, &issued.cert_pem, &issued.key_pem)
    }

    /// From three PEM files.
    pub fn load(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        Self::from_pem(&read_pem_file(ca_path)?, &read_pem_file(cert_path)?, &read_pem_file(key_path)?)
    }

    /// The identity named in the own certificate.
    pub fn identity(&self) -> Result<PeerIdentity, CertError> {
        identity_of_cert(&self.chain[0])
    }
}

/// Writes PEM text to `path`; on Unix a file holding a private key should be given mode 0600
/// by passing `secret = true`.
pub fn write_pem_file(path: &Path, pem: &str, secret: bool) -> Result<(), CertError> {
    let io_err = |source| CertError::Io { path: path.display().to_string(), source };
    std::fs::write(path, pem).map_err(io_err)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

/// Reads a PEM file.
pub fn read_pem_file(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_lookalikes() {
        assert_eq!(parse_identity_name(&node_name(NodeId(42))), Some(PeerIdentity::Node(NodeId(42))));
        assert_eq!(parse_identity_name(&client_name("cli")), Some(PeerIdentity::Client("cli".into())));
        for bad in
            ["node-042.flotilla", "node-.flotilla", "node-1.flotilla.evil", "node-1xflotilla", "client-A.flotilla"]
        {
            assert_eq!(parse_identity_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn issued_certificates_name_their_identity_and_survive_pem_files() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let node = ca.issue_node(NodeId(7)).unwrap();
        let client = ca.issue_client("ops", Grant::new(Role::Admin)).unwrap();
        assert!(ca.issue_client("Bad Name", Grant::new(Role::Admin)).is_err());
        let id = TlsIdentity::from_issued(ca.cert_pem(), &node).unwrap();
        assert_eq!(id.identity().unwrap(), PeerIdentity::Node(NodeId(7)));
        let id = TlsIdentity::from_issued(ca.cert_pem(), &client).unwrap();
        assert_eq!(id.identity().unwrap(), PeerIdentity::Client(ClientIdentity::new("ops", Grant::new(Role::Admin))));

        let dir = tempfile::tempdir().unwrap();
        let (ca_path, ca_key_path) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        write_pem_file(&ca_path, ca.cert_pem(), false).unwrap();
        write_pem_file(&ca_key_path, &ca.key_pem(), true).unwrap();
        // A CA reloaded from its files issues certificates the original CA's root verifies.
        let reloaded =
            CertificateAuthority::from_pem(&read_pem_file(&ca_path).unwrap(), &read_pem_file(&ca_key_path).unwrap())
                .unwrap();
        let later = reloaded.issue_node(NodeId(8)).unwrap();
        write_pem_file(&dir.path().join("n8.pem"), &later.cert_pem, false).unwrap();
        write_pem_file(&dir.path().join("n8.key"), &later.key_pem, true).unwrap();
        let loaded = TlsIdentity::load(&ca_path, &dir.path().join("n8.pem"), &dir.path().join("n8.key")).unwrap();
        assert_eq!(loaded.identity().unwrap(), PeerIdentity::Node(NodeId(8)));
        assert!(crate::tls::verify_chain_for_tests(&loaded));
    }

    #[test]
    fn garbage_pem_is_an_error_not_a_panic() {
        assert!(TlsIdentity::from_pem("nope", "nope", "nope").is_err());
        assert!(identity_of_cert(b"\x30\x03garbage").is_err());
    }

    fn identity_of(issued: &IssuedCert) -> Result<PeerIdentity, CertError> {
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        identity_of_cert(&der)
    }

    /// A certificate from `ca` with exactly these subject alternative names, as a forger
    /// holding the CA key (or a buggy issuer) could make.
    fn issue_raw(ca: &CertificateAuthority, sans: Vec<SanType>) -> IssuedCert {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    #[test]
    fn grants_round_trip_through_certificates() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        // Bytes a DNS name or an unescaped URI could not hold survive the hex encoding.
        let awkward = vec![b't', b':', 0x00, 0xff, b'/', b'%'];
        for grant in [
            Grant::new(Role::Admin),
            Grant::new(Role::ReadWrite),
            Grant::new(Role::ReadOnly),
            Grant::with_prefix(Role::ReadWrite, b"tenant-a/".to_vec()),
            Grant::with_prefix(Role::ReadOnly, awkward.clone()),
        ] {
            let issued = ca.issue_client("app", grant.clone()).unwrap();
            assert_eq!(identity_of(&issued).unwrap(), PeerIdentity::Client(ClientIdentity::new("app", grant)));
        }
        assert_eq!(
            grant_uri(&Grant::with_prefix(Role::ReadOnly, awkward)),
            "urn:flotilla:role:readonly:prefix:743a00ff2f25"
        );
    }

    #[test]
    fn a_certificate_without_a_grant_still_parses_with_none() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let legacy = ca.issue(&PeerIdentity::Client("old".into()), Validity::days_from_now(1)).unwrap();
        assert_eq!(
            identity_of(&legacy).unwrap(),
            PeerIdentity::Client(ClientIdentity { name: "old".into(), grant: None })
        );
    }

    #[test]
    fn grants_that_cannot_be_issued_are_refused() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        for bad in [
            Grant::with_prefix(Role::Admin, b"t/".to_vec()),
            Grant::with_prefix(Role::ReadOnly, Vec::new()),
            Grant::with_prefix(Role::ReadOnly, b"\x00meta".to_vec()),
            Grant::with_prefix(Role::ReadOnly, vec![b'a'; GRANT_PREFIX_BYTES_MAX + 1]),
        ] {
            assert!(matches!(ca.issue_client("app", bad.clone()), Err(CertError::Grant(_))), "{bad:?}");
        }
        assert!(ca.issue_client("app", Grant::with_prefix(Role::ReadOnly, vec![b'a'; GRANT_PREFIX_BYTES_MAX])).is_ok());
    }

    #[test]
    fn grant_uris_parse_strictly() {
        let ok = |uri: &str| parse_grant_uri(uri).unwrap();
        assert_eq!(ok("urn:flotilla:role:readonly"), Some(Grant::new(Role::ReadOnly)));
        assert_eq!(
            ok("urn:flotilla:role:readwrite:prefix:6162"),
            Some(Grant::with_prefix(Role::ReadWrite, b"ab".to_vec()))
        );
        assert_eq!(ok("https://example.com/"), None);
        assert_eq!(ok("urn:other:role:admin"), None);
        for bad in [
            "urn:flotilla:role:root",
            "urn:flotilla:role:",
            "urn:flotilla:roles:admin",
            "urn:flotilla:role:Admin",
            "urn:flotilla:role:readonly:prefix:",
            "urn:flotilla:role:readonly:prefix:616",
            "urn:flotilla:role:readonly:prefix:6A",
            "urn:flotilla:role:readonly:prefix:zz",
            "urn:flotilla:role:readonly:prefix:0061",
            "urn:flotilla:role:admin:prefix:61",
            "urn:flotilla:role:readonly:tenant:61",
        ] {
            assert!(parse_grant_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_grant_never_rides_on_a_node_certificate_and_never_twice() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let dns = |n: String| SanType::DnsName(n.try_into().unwrap());
        let uri = |u: &str| SanType::URI(u.to_string().try_into().unwrap());
        let node_with_grant = issue_raw(&ca, vec![dns(node_name(NodeId(1))), uri("urn:flotilla:role:readonly")]);
        assert!(matches!(identity_of(&node_with_grant), Err(CertError::Grant(_))));
        let two = issue_raw(
            &ca,
            vec![dns(client_name("app")), uri("urn:flotilla:role:readonly"), uri("urn:flotilla:role:admin")],
        );
        assert!(matches!(identity_of(&two), Err(CertError::Grant(_))));
        // A damaged grant is an error, never "no grant" (which would mean admin).
        let damaged = issue_raw(&ca, vec![dns(client_name("app")), uri("urn:flotilla:role:superuser")]);
        assert!(matches!(identity_of(&damaged), Err(CertError::Grant(_))));
        // A grant alone names nobody.
        let nameless = issue_raw(&ca, vec![uri("urn:flotilla:role:admin")]);
        assert!(matches!(identity_of(&nameless), Err(CertError::Identity(_))));
    }

    #[test]
    fn a_grant_uri_in_another_letter_case_is_refused_not_read_as_no_grant() {
        for uri in ["URN:flotilla:role:readonly", "urn:FLOTILLA:role:readonly", "urn:Flotilla:role:readonly:prefix:61"]
        {
            assert!(parse_grant_uri(uri).is_err(), "{uri} parsed as {:?}", parse_grant_uri(uri));
        }
        assert!(parse_grant_uri("https://example.com/flotilla:role:readonly").is_err());
        assert_eq!(parse_grant_uri("https://example.com/other").ok(), Some(None));
    }

    #[test]
    fn a_certificate_whose_grant_is_spelled_otherwise_is_refused() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let dns = |n: String| SanType::DnsName(n.try_into().unwrap());
        let uri = |u: &str| SanType::URI(u.to_string().try_into().unwrap());
        let cert = issue_raw(&ca, vec![dns(client_name("app")), uri("URN:flotilla:role:readonly")]);
        assert!(matches!(identity_of(&cert), Err(CertError::Grant(_))), "{:?}", identity_of(&cert));
    }
}
