//! `flotilla server`'s configuration file (TOML). Unknown fields are errors (a typo must not
//! silently fall back to a default), and every check names the field at fault.
//!
//! ```toml
//! id = 1
//! data_dir = "/var/lib/flotilla/n1"
//! listen = "127.0.0.1:7001"
//! # advertise = "10.0.0.1:7001"      # address recorded for clients (default: the bound one)
//! # metrics_listen = "127.0.0.1:9101" # Prometheus /metrics and /health
//! # auto_balance = true               # split big shards, move replicas and leaders by itself
//! # split_size_bytes = 134217728      # shards past this are split (with auto_balance)
//! # load_split_requests_per_s = 3000  # shards busier than this are split by load (0: never)
//! # load_split_duration_ms = 10000    # ... once they stayed that busy this long
//! # merge_size_bytes = 20971520       # cold neighbours smaller than this together are merged
//! #                                   # (with auto_balance; 0: never)
//! # pollers = 1                       # shard poller tasks (default: half the runtime's
//! #                                   # threads, 1 to 8)
//! # runtime_threads = 1               # threads of the async runtime (default: one per core);
//! #                                   # nodes sharing a machine: give each its share of the cores
//! # memory_budget = "512MiB"          # RocksDB's block cache and memtables (64MiB..=1TiB)
//! # require_client_roles = true       # refuse client certificates issued without a role
//! # resp_listen = "0.0.0.0:6379"      # Redis protocol (redis-cli, Redis clients)
//! # resp_tls = true                   # TLS with [tls]'s certificate and CA; client certificates
//! #                                   # from the CA are required, or optional with resp_users
//! # resp_plaintext_loopback = true    # or: plaintext without authentication, on loopback only
//! # resp_connections_max = 10000      # Redis connections at once
//! # resp_bulk_bytes_max = "8MiB"      # longest bulk string a Redis client may send (64KiB..=512MiB)
//! # resp_auth_timeout_ms = 10000      # a connection that must AUTH and has not by then is closed
//!
//! # Redis users (AUTH user password; AUTH password is user "default"). Only the password's
//! # SHA-256 is kept: flotilla cert password-hash, or printf %s "$PASSWORD" | sha256sum.
//! # Unsalted, as Redis's ACL: use long random passwords (openssl rand -hex 24). Without
//! # resp_tls they cross the network in the clear: only on loopback or a trusted network.
//! # [[resp_users]]
//! # name = "app"
//! # password_sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
//! # role = "readwrite"                # admin, readwrite or readonly (src/authz.rs)
//! # prefix = "tenant1/"               # optional: every key the user names starts with this
//!
//! [tls]
//! ca = "certs/ca.pem"
//! cert = "certs/node-1.pem"
//! key = "certs/node-1-key.pem"
//!
//! [[peers]]
//! id = 2
//! addr = "127.0.0.1:7002"
//!
//! # Only on the initial nodes of a new cluster, the same on each. A node joining a running
//! # cluster has no [bootstrap]: it announces itself to its peers with lower ids.
//! [bootstrap]
//! meta_voters = [1, 2, 3]
//! shard_replicas = [1, 2, 3]
//! shards = 4
//! ```

use crate::meta::dev_split_keys;
use crate::node::{default_pollers, BootstrapConfig, NodeConfig, META_VOTERS_MAX};
use crate::raft::NodeId;
use crate::resp_server::{RespConfig, User, Users};
use crate::shard::StoreOptions;
use crate::transport::cert::TlsIdentity;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use crate::meta::BOOTSTRAP_SHARDS_MAX;

/// The file's contents.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// Node id (from 1), matching the node certificate.
    pub id: u64,
    /// Data directory.
    pub data_dir: PathBuf,
    /// QUIC listen address (peers and clients).
    pub listen: String,
    /// Address recorded for clients.
    #[serde(default)]
    pub advertise: Option<String>,
    /// HTTP address for metrics and health.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Certificates.
    pub tls: TlsPaths,
    /// Other nodes.
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    /// New-cluster settings.
    #[serde(default)]
    pub bootstrap: Option<BootstrapEntry>,
    /// Run the balancer continuously (on whichever node leads the meta group): shards past
    /// `split_size_bytes` are split, replicas and leaders spread. Off: only `admin rebalance`.
    #[serde(default)]
    pub auto_balance: bool,
    /// Shards larger than this (keys plus values) are split by the balancer.
    #[serde(default)]
    pub split_size_bytes: Option<u64>,
    /// Shards whose leader serves more requests per second than this, for
    /// `load_split_duration_ms`, are split at a key that divides their load (with
    /// `auto_balance`; default 3,000; 0: never).
    #[serde(default)]
    pub load_split_requests_per_s: Option<u64>,
    /// How long a shard must stay above `load_split_requests_per_s` to be split (ms, default
    /// 10,000).
    #[serde(default)]
    pub load_split_duration_ms: Option<u64>,
    /// Neighbouring shards whose sizes add up to less than this, and that are cold, are merged
    /// by the balancer (with `auto_balance`; default 20 MiB; 0: never). Merges also need the
    /// sum under half `split_size_bytes`, so a merged shard is not split again.
    #[serde(default)]
    pub merge_size_bytes: Option<u64>,
    /// Tasks running the shards' Raft groups (default: half the runtime's threads, 1 to 8).
    #[serde(default)]
    pub pollers: Option<usize>,
    /// Worker threads of the process's async runtime, which runs the network, the Raft
    /// pollers and the requests (default: one per core the process may use, or
    /// `TOKIO_WORKER_THREADS` if set). Where several nodes share a machine, give each its
    /// share of the cores: with more runtime threads than cores to run them, each task handed
    /// from one thread to another wakes a sleeping thread; on two cores shared by three nodes,
    /// one thread each served more ReadIndex gets at lower latency than two, puts about the
    /// same or more (BENCHMARKS.md, session 28).
    #[serde(default)]
    pub runtime_threads: Option<usize>,
    /// Memory for RocksDB's block cache and memtables, with headroom (default 512 MiB; see
    /// `flotilla_shard::store_options`): bytes, or text such as `"512MiB"`.
    #[serde(default)]
    pub memory_budget: Option<ByteSize>,
    /// Refuse client certificates issued without a role (otherwise they count as admin, for
    /// clusters older than roles): set it once every client has a certificate with a role.
    #[serde(default)]
    pub require_client_roles: bool,
    /// TCP address of the Redis protocol front door (none by default).
    #[serde(default)]
    pub resp_listen: Option<String>,
    /// Allows the front door to speak plaintext without authentication, which it may only do
    /// on a loopback address.
    #[serde(default)]
    pub resp_plaintext_loopback: bool,
    /// The front door speaks TLS with `[tls]`'s certificate and CA (reloaded with them on
    /// SIGHUP); a client certificate from the CA is required, or optional when `resp_users`
    /// are configured (then a connection without one must AUTH).
    #[serde(default)]
    pub resp_tls: bool,
    /// Password users of the front door (`AUTH`).
    #[serde(default)]
    pub resp_users: Vec<RespUserEntry>,
    /// Most Redis protocol connections at once (default 10,000, Redis's `maxclients`).
    #[serde(default)]
    pub resp_connections_max: Option<usize>,
    /// Longest bulk string (a value) a Redis client may send (default 8 MiB); a longer one is
    /// a protocol error that closes the connection. Values above 1 MiB are refused anyway.
    #[serde(default)]
    pub resp_bulk_bytes_max: Option<ByteSize>,
    /// How long a Redis connection that must authenticate (no client certificate, on a
    /// listener with `resp_users`) may take to, from its accept, in milliseconds (default
    /// 10,000); then it is closed, so that connections that never authenticate cannot hold the
    /// `resp_connections_max` slots.
    #[serde(default)]
    pub resp_auth_timeout_ms: Option<u64>,
}

/// A size in a config file: a number of bytes, or text with a binary unit (`"512MiB"`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ByteSize {
    /// A plain number of bytes.
    Bytes(u64),
    /// Text, read by [`parse_bytes`].
    Text(String),
}

impl ByteSize {
    /// The number of bytes, or why the text is not a size.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(b) => Ok(*b),
            ByteSize::Text(t) => parse_bytes(t),
        }
    }
}

/// Reads a size: a whole number with an optional unit, `B`, `KiB`, `MiB`, `GiB` or `TiB`
/// (powers of 1024; case and a space before the unit do not matter). Decimal units (`MB`) are
/// refused rather than guessed: 512MB and 512MiB differ by 5 %.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("{text:?} is not a size like 536870912, \"512MiB\" or \"2GiB\"");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kib" => 10,
        "mib" => 20,
        "gib" => 30,
        "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// Most poller tasks a server may ask for.
pub const POLLERS_MAX: usize = 64;
/// Most runtime worker threads a server may ask for.
pub const RUNTIME_THREADS_MAX: usize = 1024;
/// Smallest split threshold accepted (smaller shards would only multiply groups).
pub const SPLIT_SIZE_BYTES_MIN: u64 = 64 << 10;
/// How often a server's automatic balancer runs (ms).
pub const AUTO_BALANCE_INTERVAL_MS: u64 = 10_000;

/// Certificate paths (relative paths are relative to the config file).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// CA certificate.
    pub ca: PathBuf,
    /// Node certificate.
    pub cert: PathBuf,
    /// Node key.
    pub key: PathBuf,
}

/// `[[resp_users]]`: a password user of the Redis front door.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RespUserEntry {
    /// The name given to `AUTH` (`default` for `AUTH password`).
    pub name: String,
    /// SHA-256 of the password, 64 hex digits (`printf %s "$PASSWORD" | sha256sum`).
    pub password_sha256: String,
    /// `admin`, `readwrite` or `readonly`.
    pub role: String,
    /// Every key the user names must start with this (not for `admin`).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// A peer.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// Its id.
    pub id: u64,
    /// Its QUIC address.
    pub addr: String,
}

/// `[bootstrap]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootstrapEntry {
    /// Voters of the meta group.
    pub meta_voters: Vec<u64>,
    /// Voters of every initial shard.
    pub shard_replicas: Vec<u64>,
    /// Number of initial shards.
    #[serde(default = "one")]
    pub shards: u32,
}

fn one() -> u32 {
    1
}

/// A loaded, checked configuration: the node's and the metrics address.
#[derive(Debug)]
pub struct ServerConfig {
    /// The node's configuration.
    pub node: NodeConfig,
    /// Where to serve metrics and health, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

fn addr(field: &str, text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|e| format!("{field}: {text:?} is not an address like 127.0.0.1:7000 ({e})"))
}

impl ServerFile {
    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<ServerFile, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads a file.
    pub fn load(path: &Path) -> Result<ServerFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads the node's certificates (paths relative to `base`): at start, and again when the
    /// server is told to (SIGHUP) after they were renewed or moved to a new CA.
    pub fn load_tls(&self, base: &Path) -> Result<TlsIdentity, String> {
        let rel = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        TlsIdentity::load(&rel(&self.tls.ca), &rel(&self.tls.cert), &rel(&self.tls.key))
            .map_err(|e| format!("tls: {e}"))
    }

    /// The runtime's worker threads the file asks for (`None`: the runtime's default, one
    /// per core), checked. Read before the runtime starts, so apart from [`Self::resolve`].
    pub fn runtime_threads(&self) -> Result<Option<usize>, String> {
        match self.runtime_threads {
            Some(n) if n == 0 || n > RUNTIME_THREADS_MAX => {
                Err(format!("runtime_threads: {n} is not within 1..={RUNTIME_THREADS_MAX}"))
            }
            n => Ok(n),
        }
    }

    /// Checks everything and loads the certificates (paths relative to `base`).
    pub fn resolve(&self, base: &Path) -> Result<ServerConfig, String> {
        if self.id == 0 {
            return Err("id: node ids start at 1".into());
        }
        self.runtime_threads()?;
        let listen = addr("listen", &self.listen)?;
        let metrics_listen = self.metrics_listen.as_deref().map(|m| addr("metrics_listen", m)).transpose()?;
        let resp = match &self.resp_listen {
            Some(text) => {
                let mut resp = RespConfig::new(addr("resp_listen", text)?);
                resp.plaintext_loopback = self.resp_plaintext_loopback;
                resp.tls = self.resp_tls;
                let users = self
                    .resp_users
                    .iter()
                    .map(|u| User::new(&u.name, &u.password_sha256, &u.role, u.prefix.as_deref().map(str::as_bytes)))
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(Users::new)
                    .map_err(|e| format!("resp_users: {e}"))?;
                resp.users = users;
                resp.require_client_roles = self.require_client_roles;
                if let Some(n) = self.resp_connections_max {
                    resp.connections_max = n;
                }
                if let Some(ms) = self.resp_auth_timeout_ms {
                    resp.auth_timeout = std::time::Duration::from_millis(ms);
                }
                if let Some(size) = &self.resp_bulk_bytes_max {
                    let bytes = size.bytes().map_err(|e| format!("resp_bulk_bytes_max: {e}"))?;
                    resp.limits.bulk_bytes_max = usize::try_from(bytes).unwrap_or(usize::MAX);
                    // A request holds at least one such string.
                    resp.limits.request_bytes_max = resp.limits.request_bytes_max.max(resp.limits.bulk_bytes_max);
                }
                resp.check()?;
                Some(resp)
            }
            None => None,
        };
        if let Some(p) = self.pollers.filter(|p| *p == 0 || *p > POLLERS_MAX) {
            return Err(format!("pollers: {p} is not within 1..={POLLERS_MAX}"));
        }
        if let Some(bytes) = self.split_size_bytes.filter(|b| *b < SPLIT_SIZE_BYTES_MIN) {
            return Err(format!("split_size_bytes: {bytes} is below the minimum of {SPLIT_SIZE_BYTES_MIN}"));
        }
        let store = match &self.memory_budget {
            Some(size) => {
                let options =
                    StoreOptions::with_memory_budget(size.bytes().map_err(|e| format!("memory_budget: {e}"))?);
                options.check().map_err(|e| format!("memory_budget: {e}"))?;
                options
            }
            None => StoreOptions::default(),
        };
        let mut peers = Vec::new();
        for p in &self.peers {
            if p.id == 0 || p.id == self.id {
                return Err(format!("peers: id {} is not a valid peer of node {}", p.id, self.id));
            }
            if peers.iter().any(|(id, _)| *id == NodeId(p.id)) {
                return Err(format!("peers: node {} is listed twice", p.id));
            }
            peers.push((NodeId(p.id), addr(&format!("peers (node {})", p.id), &p.addr)?));
        }
        let rel = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let tls = self.load_tls(base)?;
        let mut node = NodeConfig::new(NodeId(self.id), rel(&self.data_dir), listen, tls);
        node.advertise_addr = self.advertise.clone();
        node.peers = peers.clone();
        node.store = store;
        node.require_client_roles = self.require_client_roles;
        node.resp = resp;
        if let Some(bytes) = self.split_size_bytes {
            node.balancer.split_size_bytes_threshold = bytes;
        }
        if let Some(rate) = self.load_split_requests_per_s {
            node.balancer.load_split_requests_per_s = rate;
        }
        if let Some(ms) = self.load_split_duration_ms {
            node.load_split_duration_ms = ms;
        }
        if let Some(bytes) = self.merge_size_bytes {
            node.balancer.merge_size_bytes_threshold = bytes;
        }
        node.pollers = self.pollers.unwrap_or_else(|| default_pollers(self.runtime_threads, 1));
        node.auto_balance_interval_ms = self.auto_balance.then_some(AUTO_BALANCE_INTERVAL_MS);
        if let Some(b) = &self.bootstrap {
            if b.meta_voters.is_empty() || b.meta_voters.len() > META_VOTERS_MAX {
                return Err(format!("bootstrap.meta_voters: give 1 to {META_VOTERS_MAX} node ids"));
            }
            if b.shard_replicas.is_empty() {
                return Err("bootstrap.shard_replicas: give at least one node id".into());
            }
            if b.shards == 0 || b.shards > BOOTSTRAP_SHARDS_MAX {
                return Err(format!("bootstrap.shards: must be 1..={BOOTSTRAP_SHARDS_MAX}"));
            }
            let known = |n: &u64| *n == self.id || peers.iter().any(|(p, _)| p.0 == *n);
            if let Some(n) = b.meta_voters.iter().chain(b.shard_replicas.iter()).find(|n| !known(n)) {
                return Err(format!("bootstrap: node {n} is neither this node nor a listed peer"));
            }
            let mut addrs: Vec<(NodeId, String)> = peers.iter().map(|(n, a)| (*n, a.to_string())).collect();
            if let Some(a) = &self.advertise {
                addrs.push((NodeId(self.id), a.clone()));
            }
            node.bootstrap = Some(BootstrapConfig {
                meta_voters: b.meta_voters.iter().copied().map(NodeId).collect(),
                shard_replicas: b.shard_replicas.iter().copied().map(NodeId).collect(),
                addrs,
                split_keys: dev_split_keys(b.shards),
            });
        }
        Ok(ServerConfig { node, metrics_listen })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with the required fields, `line` among the top-level settings, and certificates
    /// that do not exist (so `resolve` gets past every other check to them).
    fn text_with(line: &str) -> String {
        format!("id = 1\ndata_dir = \"d\"\nlisten = \"127.0.0.1:1\"\n{line}\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n")
    }

    #[test]
    fn errors_name_the_field() {
        assert!(ServerFile::parse("id = 1").unwrap_err().contains("data_dir"));
        let text = "id = 1\ndata_dir = \"d\"\nlisten = \"x\"\ncolour = 3\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n";
        assert!(ServerFile::parse(text).unwrap_err().contains("colour"));
        let text = "id = 1\ndata_dir = \"d\"\nlisten = \"nope\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n";
        let f = ServerFile::parse(text).unwrap();
        assert!(f.resolve(Path::new(".")).unwrap_err().starts_with("listen"));
        let text = "id = 1\ndata_dir = \"d\"\nlisten = \"127.0.0.1:1\"\nsplit_size_bytes = 10\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n";
        let f = ServerFile::parse(text).unwrap();
        assert!(f.resolve(Path::new(".")).unwrap_err().starts_with("split_size_bytes"));
    }

    #[test]
    fn the_redis_listener_is_plaintext_on_loopback_only_when_asked() {
        let file = |listen: &str, plaintext: bool| {
            let text = format!(
                "id = 1\ndata_dir = \"d\"\nlisten = \"127.0.0.1:1\"\nresp_listen = \"{listen}\"\n\
                 resp_plaintext_loopback = {plaintext}\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n"
            );
            ServerFile::parse(&text).unwrap().resolve(Path::new(".")).unwrap_err()
        };
        assert!(file("0.0.0.0:6379", true).contains("loopback"), "{}", file("0.0.0.0:6379", true));
        assert!(file("127.0.0.1:6379", false).contains("resp_plaintext_loopback = true"));
        assert!(file("nope", true).starts_with("resp_listen"));
        // Allowed: the next error is the (missing) certificates.
        assert!(file("127.0.0.1:6379", true).starts_with("tls"));
        let limits = |extra: &str| {
            let text = format!(
                "id = 1\ndata_dir = \"d\"\nlisten = \"127.0.0.1:1\"\nresp_listen = \"127.0.0.1:0\"\n\
                 resp_plaintext_loopback = true\n{extra}\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n"
            );
            ServerFile::parse(&text).unwrap().resolve(Path::new(".")).unwrap_err()
        };
        assert!(limits("resp_bulk_bytes_max = \"1KiB\"").starts_with("resp_bulk_bytes_max"));
        assert!(limits("resp_bulk_bytes_max = \"1GiB\"").starts_with("resp_bulk_bytes_max"));
        assert!(limits("resp_bulk_bytes_max = \"256MiB\"").starts_with("tls"));
        assert!(limits("resp_auth_timeout_ms = 0").starts_with("resp_auth_timeout_ms"));
        assert!(limits("resp_auth_timeout_ms = 500").starts_with("tls"));
        assert!(limits("resp_connections_max = 0").starts_with("resp_connections_max"));
    }

    #[test]
    fn outside_loopback_the_redis_listener_needs_tls_or_users() {
        const HASH: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";
        let resolve = |extra: &str| {
            let text = format!(
                "id = 1\ndata_dir = \"d\"\nlisten = \"127.0.0.1:1\"\nresp_listen = \"0.0.0.0:6379\"\n{extra}\n\
                 [tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n"
            );
            ServerFile::parse(&text).map_err(|e| format!("parse: {e}"))?.resolve(Path::new(".")).map(|_| ())
        };
        let user = |fields: &str| format!("[[resp_users]]\n{fields}\n");
        // Plaintext without users: refused, saying what would do.
        let err = resolve("resp_plaintext_loopback = true").unwrap_err();
        assert!(err.contains("resp_tls = true") && err.contains("[[resp_users]]"), "{err}");
        // TLS, users, or both: past the check, to the (missing) certificates.
        assert!(resolve("resp_tls = true").unwrap_err().starts_with("tls"));
        let app = user(&format!("name = \"app\"\npassword_sha256 = \"{HASH}\"\nrole = \"readwrite\""));
        assert!(resolve(&app).unwrap_err().starts_with("tls"));
        assert!(resolve(&format!("resp_tls = true\n{app}")).unwrap_err().starts_with("tls"));
        let tenant =
            user(&format!("name = \"t\"\npassword_sha256 = \"{HASH}\"\nrole = \"readonly\"\nprefix = \"tenant1/\""));
        assert!(resolve(&tenant).unwrap_err().starts_with("tls"));
        // A bad user is refused at start, naming it and what is wrong.
        let err = resolve(&user("name = \"app\"\npassword_sha256 = \"secret\"\nrole = \"readwrite\"")).unwrap_err();
        assert!(err.starts_with("resp_users: user app") && err.contains("64 hex digits"), "{err}");
        let err = resolve(&user(&format!("name = \"a\"\npassword_sha256 = \"{HASH}\"\nrole = \"root\""))).unwrap_err();
        assert!(err.contains("unknown role"), "{err}");
        let err =
            resolve(&user(&format!("name = \"a\"\npassword_sha256 = \"{HASH}\"\nrole = \"admin\"\nprefix = \"t/\"")))
                .unwrap_err();
        assert!(err.contains("cannot be limited to a prefix"), "{err}");
        // A plain password field is not a thing: the file must hold the hash.
        let err = resolve(&user("name = \"a\"\npassword = \"secret\"\nrole = \"readonly\"")).unwrap_err();
        assert!(err.starts_with("parse:") && err.contains("password"), "{err}");
        // Both users named alike.
        let err = resolve(&format!("{app}{app}")).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn sizes_parse_with_binary_units_only() {
        assert_eq!(parse_bytes("536870912"), Ok(512 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes(" 2 gib "), Ok(2 << 30));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("1TiB"), Ok(1 << 40));
        assert_eq!(parse_bytes("10B"), Ok(10));
        for bad in ["", "MiB", "512MB", "1.5GiB", "-1", "512 mebibytes", "99999999999999TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn memory_budget_is_read_and_checked_before_anything_is_opened() {
        let file = |budget: &str| ServerFile::parse(&text_with(&format!("memory_budget = {budget}"))).unwrap();
        assert_eq!(file("\"256MiB\"").memory_budget, Some(ByteSize::Text("256MiB".into())));
        assert_eq!(file("268435456").memory_budget, Some(ByteSize::Bytes(256 << 20)));
        // Errors name the field and say what is wrong; the certificates (missing here) are
        // never reached.
        let err = file("\"lots\"").resolve(Path::new(".")).unwrap_err();
        assert!(err.starts_with("memory_budget:") && err.contains("not a size"), "{err}");
        let err = file("\"1MiB\"").resolve(Path::new(".")).unwrap_err();
        assert!(err.starts_with("memory_budget:") && err.contains("below the minimum"), "{err}");
        let err = file("\"2TiB\"").resolve(Path::new(".")).unwrap_err();
        assert!(err.starts_with("memory_budget:") && err.contains("above the maximum"), "{err}");
        // A good budget gets past the check, to the (missing) certificates.
        let err = file("\"256MiB\"").resolve(Path::new(".")).unwrap_err();
        assert!(err.starts_with("tls"), "{err}");
        // A value of the wrong type is refused by the parser, naming the field.
        assert!(ServerFile::parse(&text_with("memory_budget = true")).unwrap_err().contains("memory_budget"));
    }

    #[test]
    fn runtime_threads_are_read_and_checked_before_anything_is_opened() {
        let file = |line: &str| ServerFile::parse(&text_with(line)).unwrap();
        assert_eq!(file("").runtime_threads(), Ok(None));
        assert_eq!(file("runtime_threads = 1").runtime_threads(), Ok(Some(1)));
        assert_eq!(file("runtime_threads = 1024").runtime_threads(), Ok(Some(RUNTIME_THREADS_MAX)));
        for bad in ["runtime_threads = 0", "runtime_threads = 1025"] {
            let err = file(bad).runtime_threads().unwrap_err();
            assert!(err.starts_with("runtime_threads:") && err.contains("not within 1..=1024"), "{err}");
            // `resolve` refuses it too, before the (missing) certificates.
            assert_eq!(file(bad).resolve(Path::new(".")).unwrap_err(), err);
        }
        let err = file("runtime_threads = 2").resolve(Path::new(".")).unwrap_err();
        assert!(err.starts_with("tls"), "{err}");
        // Without `pollers`, half the runtime's threads run pollers.
        let pollers: Vec<usize> = [1, 2, 3, 8, 16, 64].into_iter().map(|t| default_pollers(Some(t), 1)).collect();
        assert_eq!(pollers, vec![1, 1, 1, 4, 8, 8]);
    }

    #[test]
    fn require_client_roles_is_read_and_off_unless_set() {
        assert!(ServerFile::parse(&text_with("require_client_roles = true")).unwrap().require_client_roles);
        assert!(!ServerFile::parse(&text_with("")).unwrap().require_client_roles);
        assert!(ServerFile::parse(&text_with("require_client_roles = \"yes\""))
            .unwrap_err()
            .contains("require_client_roles"));
    }
}
