//! `flotilla server`: one node per process, from a TOML file ([`flotilla::config`]) and flags
//! that override it.

use super::stop_signal;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use flotilla::config::{BootstrapEntry, ByteSize, PeerEntry, ServerFile, TlsPaths};
use flotilla::node::{INITIAL_SHARD_REPLICAS, META_VOTERS_MAX};
use flotilla::Node;
use std::path::{Path, PathBuf};

/// Raises the open-files limit for `connections` Redis connections beside the node's own files;
/// warns when the hard limit stops short (connections past it fail to be accepted).
fn raise_open_files(connections: u64) {
    use flotilla::open_files::{raise_to, RESERVED};
    let wanted = connections.saturating_add(RESERVED);
    match raise_to(wanted) {
        Ok(l) if !l.allows(wanted) => tracing::warn!(
            limit = l.now,
            wanted,
            "the open-files limit is below what resp_connections_max needs: raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower resp_connections_max"
        ),
        Ok(l) if l.now > l.before => tracing::info!(from = l.before, to = l.now, "open-files limit raised"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

#[derive(Args)]
pub struct ServerArgs {
    /// The config file (TOML; see the `config` module docs). Without it, the flags below
    /// give everything (--id, --data-dir, --listen, --ca, --cert, --key at least).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override `id`.
    #[arg(long)]
    id: Option<u64>,
    /// Override `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override `listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Override `advertise`.
    #[arg(long)]
    advertise: Option<String>,
    /// Override `metrics_listen`.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Override `tls.ca`.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Override `tls.cert`.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Override `tls.key`.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Add a peer, as ID=ADDR (repeatable).
    #[arg(long = "peer", value_name = "ID=ADDR")]
    peers: Vec<String>,
    /// New cluster: these node ids (comma-separated) hold the meta group (first five) and
    /// every initial shard (first three). Give the same on each initial node.
    #[arg(long, value_name = "IDS")]
    bootstrap: Option<String>,
    /// New cluster: number of initial shards (with --bootstrap).
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Override `auto_balance` (turn it on).
    #[arg(long)]
    auto_balance: bool,
    /// Override `split_size_bytes`.
    #[arg(long, value_name = "BYTES")]
    split_size_bytes: Option<u64>,
    /// Override `memory_budget`: RocksDB's block cache and memtables (e.g. 512MiB, 2GiB).
    #[arg(long, value_name = "SIZE")]
    memory_budget: Option<String>,
    /// Override `runtime_threads`: worker threads of the async runtime (default: one per core).
    #[arg(long, value_name = "N")]
    runtime_threads: Option<usize>,
    /// Override `resp_listen`: serve the Redis protocol (redis-cli, Redis clients) here.
    #[arg(long, value_name = "ADDR")]
    resp_listen: Option<String>,
    /// Override `resp_plaintext_loopback` (turn it on): the Redis protocol in plaintext without
    /// AUTH, allowed on a loopback address only.
    #[arg(long)]
    resp_plaintext_loopback: bool,
    /// Override `resp_tls` (turn it on): the Redis protocol over TLS with the node's certificate.
    #[arg(long)]
    resp_tls: bool,
}

/// The server's configuration as read before the runtime starts (it may set the runtime's
/// threads), and what to call it in errors; `run` goes on with this reading, so the file is
/// read once.
pub struct Loaded {
    file: ServerFile,
    base: PathBuf,
    shown: String,
}

impl Loaded {
    /// Reads the file (or the flags alone) with the flags applied.
    pub fn read(a: &ServerArgs) -> Result<Loaded> {
        let (file, base) = server_file(a)?;
        let shown = a.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "flags".into());
        Ok(Loaded { file, base, shown })
    }

    /// The runtime's worker threads asked for (`None`: the runtime's default), checked.
    pub fn runtime_threads(&self) -> Result<Option<usize>> {
        self.file.runtime_threads().map_err(|e| anyhow!("{}: {e}", self.shown))
    }
}

pub async fn run(loaded: Loaded) -> Result<i32> {
    let Loaded { file, base, shown } = loaded;
    let cfg = file.resolve(&base).map_err(|e| anyhow!("{shown}: {e}"))?;
    let cfg_resp_tls = cfg.node.resp.as_ref().is_some_and(|r| r.tls);
    raise_open_files(cfg.node.resp.as_ref().map_or(0, |r| r.connections_max as u64));
    let node = Node::start(cfg.node).await.context("starting the node")?;
    #[cfg(unix)]
    let _reloader = tokio::spawn(reload_tls_on_hangup(node.clone(), file.clone(), base.clone()));
    if let Some(m) = cfg.metrics_listen {
        let (bound, _task) =
            flotilla::http::serve(m, vec![node.clone()]).await.with_context(|| format!("metrics_listen {m}"))?;
        tracing::info!(%bound, "metrics and health over http");
    }
    println!("flotilla node {} listening on {}", node.id(), node.addr());
    if let Some(r) = node.resp_addr() {
        let tls = if cfg_resp_tls { " --tls --cacert CA --cert CLIENT.pem --key CLIENT-key.pem" } else { "" };
        println!("redis protocol on {r}: redis-cli -h {} -p {}{tls}", r.ip(), r.port());
    }
    stop_signal().await;
    eprintln!("stopping");
    node.shutdown().await;
    Ok(0)
}

/// Reads the certificate files again at each SIGHUP and presents them from then on (renewed
/// certificates, a move to a new CA: see `Transport::reload_tls`). A failure is logged and
/// the node keeps the certificates it has.
#[cfg(unix)]
async fn reload_tls_on_hangup(node: Node, file: ServerFile, base: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: certificates are read at start only");
        return;
    };
    while hangups.recv().await.is_some() {
        match file.load_tls(&base).map_err(anyhow::Error::msg).and_then(|tls| Ok(node.reload_tls(tls)?)) {
            Ok(()) => tracing::info!("SIGHUP: certificates reloaded"),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: certificates not reloaded; keeping the current ones"),
        }
    }
}

/// The server's configuration: the file given with `--config` (paths in it relative to its
/// directory), or one made of the flags alone, with every flag given overriding the file.
fn server_file(a: &ServerArgs) -> Result<(ServerFile, PathBuf)> {
    let (mut file, base) = match &a.config {
        Some(path) => {
            let file = ServerFile::load(path).map_err(|e| anyhow!(e))?;
            (file, path.parent().map(Path::to_path_buf).unwrap_or_default())
        }
        None => {
            let need = |what: &str| anyhow!("without --config, give --{what}");
            let file = ServerFile {
                id: a.id.ok_or_else(|| need("id"))?,
                data_dir: a.data_dir.clone().ok_or_else(|| need("data-dir"))?,
                listen: a.listen.clone().ok_or_else(|| need("listen"))?,
                advertise: None,
                metrics_listen: None,
                tls: TlsPaths {
                    ca: a.ca.clone().ok_or_else(|| need("ca"))?,
                    cert: a.cert.clone().ok_or_else(|| need("cert"))?,
                    key: a.key.clone().ok_or_else(|| need("key"))?,
                },
                peers: Vec::new(),
                bootstrap: None,
                auto_balance: false,
                split_size_bytes: None,
                load_split_requests_per_s: None,
                load_split_duration_ms: None,
                merge_size_bytes: None,
                pollers: None,
                runtime_threads: None,
                memory_budget: None,
                require_client_roles: false,
                resp_listen: None,
                resp_plaintext_loopback: false,
                resp_tls: false,
                resp_users: Vec::new(),
                resp_connections_max: None,
                resp_bulk_bytes_max: None,
                resp_auth_timeout_ms: None,
            };
            (file, PathBuf::new())
        }
    };
    apply_overrides(a, &mut file)?;
    Ok((file, base))
}

/// Every flag given replaces (or, for `--peer`, adds to) what the file says.
fn apply_overrides(a: &ServerArgs, file: &mut ServerFile) -> Result<()> {
    fn set<T: Clone>(flag: &Option<T>, field: &mut T) {
        if let Some(v) = flag {
            *field = v.clone();
        }
    }
    set(&a.id, &mut file.id);
    set(&a.data_dir, &mut file.data_dir);
    set(&a.listen, &mut file.listen);
    set(&a.ca, &mut file.tls.ca);
    set(&a.cert, &mut file.tls.cert);
    set(&a.key, &mut file.tls.key);
    if a.advertise.is_some() {
        file.advertise = a.advertise.clone();
    }
    if a.metrics_listen.is_some() {
        file.metrics_listen = a.metrics_listen.clone();
    }
    if a.split_size_bytes.is_some() {
        file.split_size_bytes = a.split_size_bytes;
    }
    if a.runtime_threads.is_some() {
        file.runtime_threads = a.runtime_threads;
    }
    if let Some(m) = &a.memory_budget {
        file.memory_budget = Some(ByteSize::Text(m.clone()));
    }
    file.auto_balance |= a.auto_balance;
    if a.resp_listen.is_some() {
        file.resp_listen = a.resp_listen.clone();
    }
    file.resp_plaintext_loopback |= a.resp_plaintext_loopback;
    file.resp_tls |= a.resp_tls;
    for p in &a.peers {
        let (id, addr) = p.split_once('=').ok_or_else(|| anyhow!("--peer {p:?}: expected ID=ADDR"))?;
        let id = id.trim().parse().map_err(|e| anyhow!("--peer {p:?}: bad node id: {e}"))?;
        file.peers.push(PeerEntry { id, addr: addr.trim().to_string() });
    }
    if let Some(ids) = &a.bootstrap {
        let ids: Vec<u64> = ids
            .split(',')
            .map(|t| t.trim().parse::<u64>().map_err(|e| anyhow!("--bootstrap {ids:?}: {e}")))
            .collect::<Result<_>>()?;
        file.bootstrap = Some(BootstrapEntry {
            meta_voters: ids.iter().copied().take(META_VOTERS_MAX).collect(),
            shard_replicas: ids.iter().copied().take(INITIAL_SHARD_REPLICAS).collect(),
            shards: a.shards,
        });
    }
    Ok(())
}
