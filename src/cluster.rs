//! Certificates on disk and the cluster file: what `flotilla dev` writes so that the other
//! commands find the cluster with no flags.
//!
//! Layout of a certificate directory (made by `flotilla cert` and `flotilla dev`):
//! `ca.pem`, `ca-key.pem`, `node-<id>.pem` / `node-<id>-key.pem`,
//! `client-<name>.pem` / `client-<name>-key.pem` (keys mode 0600).
//!
//! The cluster file (JSON, `version` first) names the nodes' addresses and the client
//! certificate. Its default place is `$FLOTILLA_HOME/cluster.json`, with `FLOTILLA_HOME`
//! defaulting to `~/.flotilla`.

use crate::transport::cert::{read_pem_file, write_pem_file, CertificateAuthority, TlsIdentity};
use crate::transport::{Grant, NodeId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Format version of the cluster file.
pub const CLUSTER_FILE_VERSION: u32 = 1;

/// Flotilla's own directory: `$FLOTILLA_HOME`, else `~/.flotilla`, else `./.flotilla`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("FLOTILLA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".flotilla"),
        None => PathBuf::from(".flotilla"),
    }
}

/// Where the CLI looks for the cluster file by default.
pub fn default_cluster_file() -> PathBuf {
    home().join("cluster.json")
}

/// One node in the cluster file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    /// Node id.
    pub id: NodeId,
    /// Its QUIC address.
    pub addr: String,
    /// Its metrics/health HTTP address, if it serves one.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// How the CLI reaches a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    /// Format version ([`CLUSTER_FILE_VERSION`]).
    pub version: u32,
    /// The nodes.
    pub nodes: Vec<ClusterNode>,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client key.
    pub key: PathBuf,
    /// The dev cluster's data directory (informational).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Process id of the `flotilla dev` that wrote it (informational).
    #[serde(default)]
    pub pid: Option<u32>,
}

impl ClusterFile {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<ClusterFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "no cluster file at {}: start a local cluster with `flotilla dev` in another terminal, \
                     or pass --cluster FILE",
                    path.display()
                )
            } else {
                format!("cannot read {}: {e}", path.display())
            }
        })?;
        let f: ClusterFile =
            serde_json::from_str(&text).map_err(|e| format!("{} is not a valid cluster file: {e}", path.display()))?;
        if f.version != CLUSTER_FILE_VERSION {
            return Err(format!(
                "{}: cluster file version {} is not supported (this build reads {CLUSTER_FILE_VERSION})",
                path.display(),
                f.version
            ));
        }
        if f.nodes.is_empty() {
            return Err(format!("{}: no nodes listed", path.display()));
        }
        Ok(f)
    }

    /// Writes the file (atomically: a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The client's TLS identity.
    pub fn tls(&self) -> Result<TlsIdentity, String> {
        TlsIdentity::load(&self.ca, &self.cert, &self.key).map_err(|e| e.to_string())
    }

    /// Node ids and parsed addresses.
    pub fn endpoints(&self) -> Result<Vec<(NodeId, SocketAddr)>, String> {
        self.nodes
            .iter()
            .map(|n| n.addr.parse().map(|a| (n.id, a)).map_err(|e| format!("node {} address {:?}: {e}", n.id, n.addr)))
            .collect()
    }
}

/// Paths of one issued certificate in a certificate directory.
pub fn node_cert_paths(dir: &Path, node: NodeId) -> (PathBuf, PathBuf) {
    (dir.join(format!("node-{node}.pem")), dir.join(format!("node-{node}-key.pem")))
}

/// Paths of a client certificate in a certificate directory.
pub fn client_cert_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("client-{name}.pem")), dir.join(format!("client-{name}-key.pem")))
}

/// Creates a CA in `dir` (`ca.pem`, `ca-key.pem`); refuses to overwrite an existing one.
pub fn create_ca(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.exists() || key.exists() {
        return Err(format!("{} already holds a CA; refusing to overwrite it", dir.display()));
    }
    let ca = CertificateAuthority::generate("flotilla cluster CA").map_err(|e| e.to_string())?;
    write_pem_file(&cert, ca.cert_pem(), false).map_err(|e| e.to_string())?;
    write_pem_file(&key, &ca.key_pem(), true).map_err(|e| e.to_string())?;
    Ok(())
}

fn load_ca(dir: &Path) -> Result<CertificateAuthority, String> {
    let cert = read_pem_file(&dir.join("ca.pem"))
        .map_err(|e| format!("{e} (create a CA first: `flotilla cert ca --dir {}`)", dir.display()))?;
    let key = read_pem_file(&dir.join("ca-key.pem")).map_err(|e| e.to_string())?;
    CertificateAuthority::from_pem(&cert, &key).map_err(|e| e.to_string())
}

/// Issues a node certificate from the CA in `dir`.
pub fn issue_node(dir: &Path, node: NodeId) -> Result<(PathBuf, PathBuf), String> {
    if node.0 == 0 {
        return Err("node ids start at 1".into());
    }
    let ca = load_ca(dir)?;
    let issued = ca.issue_node(node).map_err(|e| e.to_string())?;
    let (cert, key) = node_cert_paths(dir, node);
    write_pem_file(&cert, &issued.cert_pem, false).map_err(|e| e.to_string())?;
    write_pem_file(&key, &issued.key_pem, true).map_err(|e| e.to_string())?;
    Ok((cert, key))
}

/// Issues a client certificate carrying `grant` (its role and key prefix) from the CA in `dir`.
pub fn issue_client(dir: &Path, name: &str, grant: Grant) -> Result<(PathBuf, PathBuf), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!("client name {name:?} must be letters, digits and '-'"));
    }
    let ca = load_ca(dir)?;
    let issued = ca.issue_client(name, grant).map_err(|e| e.to_string())?;
    let (cert, key) = client_cert_paths(dir, name);
    write_pem_file(&cert, &issued.cert_pem, false).map_err(|e| e.to_string())?;
    write_pem_file(&key, &issued.key_pem, true).map_err(|e| e.to_string())?;
    Ok((cert, key))
}

/// A node's TLS identity from a certificate directory.
pub fn node_tls(dir: &Path, node: NodeId) -> Result<TlsIdentity, String> {
    let (cert, key) = node_cert_paths(dir, node);
    TlsIdentity::load(&dir.join("ca.pem"), &cert, &key).map_err(|e| e.to_string())
}
