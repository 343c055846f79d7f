//! The `flotilla` binary: `server`, `dev`, `cert`, `kv`, `admin` and `bench`.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use flotilla::bench::{self, BenchConfig, Workload};
use flotilla::cluster::{self, ClusterFile, ClusterNode};
use flotilla::config::ServerFile;
use flotilla::meta::dev_split_keys;
use flotilla::placement::{NodeId, ShardId};
use flotilla::wire::{AdminRequest, AdminResponse};
use flotilla::{BootstrapConfig, CasOutcome, Client, ClientConfig, Node, NodeConfig};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most nodes `flotilla dev` starts.
const DEV_NODES_MAX: u32 = 7;
/// Most shards `flotilla dev` bootstraps.
const DEV_SHARDS_MAX: u32 = 256;
/// How long `flotilla dev` waits for its cluster to serve (s).
const DEV_READY_TIMEOUT_S: u64 = 60;
/// Marker file in a dev data directory: only such a directory is wiped on the next run.
const DEV_MARKER: &str = ".flotilla-dev";

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Flotilla: a multi-Raft sharded key-value store")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log level or filter (also RUST_LOG); defaults to info for server, warn otherwise.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a TOML config file (flags override the file).
    Server(ServerArgs),
    /// Start a local cluster on loopback with fresh certificates (Ctrl-C stops it).
    Dev(DevArgs),
    /// Create a cluster CA and node or client certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Read and write keys.
    Kv(KvArgs),
    /// Inspect and operate the cluster.
    Admin(AdminArgs),
    /// Load generator: puts, gets or a mix, with latency percentiles.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ServerArgs {
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
}

#[derive(Args)]
struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Number of initial shards.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Data directory (default: $FLOTILLA_HOME/dev, wiped at each start).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Do not run the balancer by itself (then only `admin rebalance` splits shards that grew
    /// past --split-size-bytes and moves replicas and leaders).
    #[arg(long)]
    no_auto_balance: bool,
    /// Shards larger than this (keys plus values) are split.
    #[arg(long, value_name = "BYTES", default_value_t = flotilla::node::SPLIT_SIZE_BYTES_DEFAULT)]
    split_size_bytes: u64,
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a CA (ca.pem, ca-key.pem) in DIR.
    Ca {
        /// Certificate directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (node-ID.pem, node-ID-key.pem).
    Node {
        /// Certificate directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        id: u64,
    },
    /// Issue a client certificate (client-NAME.pem, client-NAME-key.pem).
    Client {
        /// Certificate directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Client name (letters, digits, '-').
        #[arg(long)]
        name: String,
    },
}

#[derive(Args, Clone)]
struct Conn {
    /// Cluster file (default: $FLOTILLA_HOME/cluster.json, written by `flotilla dev`).
    #[arg(long, global = true)]
    cluster: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of each operation, retries included (seconds).
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
}

#[derive(Args)]
struct KvArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    op: KvOp,
}

#[derive(Subcommand)]
enum KvOp {
    /// Print the value of KEY.
    Get {
        /// The key.
        key: String,
        /// Lease read instead of ReadIndex.
        #[arg(long, conflicts_with = "stale")]
        lease: bool,
        /// Read from any replica, possibly stale (follower read).
        #[arg(long)]
        stale: bool,
    },
    /// Set KEY to VALUE.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove KEY.
    Delete {
        /// The key.
        key: String,
    },
    /// Set KEY to NEW if its value is EXPECTED.
    Cas {
        /// The key.
        key: String,
        /// The expected value (omit with --absent).
        #[arg(long, conflicts_with = "absent")]
        expected: Option<String>,
        /// Expect the key to be absent.
        #[arg(long)]
        absent: bool,
        /// The new value (omit with --delete).
        #[arg(long, conflicts_with = "delete")]
        new: Option<String>,
        /// Delete the key if it matches.
        #[arg(long)]
        delete: bool,
    },
    /// List pairs with keys in [START, END).
    Scan {
        /// First key (default: the beginning).
        start: Option<String>,
        /// End key, exclusive (default: the end).
        end: Option<String>,
        /// Most pairs.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Args)]
struct AdminArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    op: AdminOp,
}

#[derive(Subcommand)]
enum AdminOp {
    /// List nodes.
    Nodes,
    /// List shards with replicas, leaders and applied indexes.
    Shards,
    /// Split the shard holding KEY at KEY.
    Split {
        /// The split key.
        key: String,
    },
    /// Move SHARD's replica from node FROM to node TO.
    Move {
        /// Shard id.
        shard: u64,
        /// Node losing the replica.
        from: u64,
        /// Node gaining it.
        to: u64,
        /// Return at once instead of following the move.
        #[arg(long)]
        no_wait: bool,
    },
    /// Hand SHARD's leadership to NODE.
    TransferLeader {
        /// Shard id.
        shard: u64,
        /// Target node.
        node: u64,
    },
    /// Run the balancer once.
    Rebalance,
    /// Drain NODE (move everything off it), or stop draining with --undo.
    Drain {
        /// Node id.
        node: u64,
        /// Stop draining.
        #[arg(long)]
        undo: bool,
    },
    /// Cluster summary.
    Status,
    /// Register a node by hand (a node started with peers and no bootstrap registers itself).
    AddNode {
        /// Its id.
        node: u64,
        /// Its QUIC address.
        addr: String,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    conn: Conn,
    /// Workload.
    #[arg(value_enum)]
    workload: WorkloadArg,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Value size (bytes).
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Run time (seconds).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many operations.
    #[arg(long)]
    ops: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    Put,
    Get,
    Mixed,
}

fn main() {
    let cli = Cli::parse();
    let quiet_default = !matches!(cli.command, Command::Server(_));
    if let Err(e) = init_logs(&cli, quiet_default) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

fn init_logs(cli: &Cli, quiet: bool) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match (&cli.log, std::env::var("RUST_LOG")) {
        (Some(f), _) => EnvFilter::try_new(f).map_err(|e| anyhow!("--log {f:?}: {e}"))?,
        (None, Ok(f)) if !f.is_empty() => EnvFilter::try_new(&f).map_err(|e| anyhow!("RUST_LOG {f:?}: {e}"))?,
        _ => EnvFilter::new(if quiet { "warn" } else { "info" }),
    };
    // `dev` logs to a file in its data directory instead (set up there).
    if matches!(cli.command, Command::Dev(_)) {
        return Ok(());
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

async fn run(command: Command) -> Result<i32> {
    match command {
        Command::Server(a) => server(a).await,
        Command::Dev(a) => dev(a).await,
        Command::Cert(c) => cert(c),
        Command::Kv(a) => kv(a).await,
        Command::Admin(a) => admin(a).await,
        Command::Bench(a) => bench_cmd(a).await,
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn server(a: ServerArgs) -> Result<i32> {
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
                tls: flotilla::config::TlsPaths {
                    ca: a.ca.clone().ok_or_else(|| need("ca"))?,
                    cert: a.cert.clone().ok_or_else(|| need("cert"))?,
                    key: a.key.clone().ok_or_else(|| need("key"))?,
                },
                peers: Vec::new(),
                bootstrap: None,
                auto_balance: false,
                split_size_bytes: None,
                pollers: None,
            };
            (file, PathBuf::new())
        }
    };
    if let Some(id) = a.id {
        file.id = id;
    }
    if let Some(d) = a.data_dir {
        file.data_dir = d;
    }
    if let Some(l) = a.listen {
        file.listen = l;
    }
    if let Some(v) = a.advertise {
        file.advertise = Some(v);
    }
    if let Some(m) = a.metrics_listen {
        file.metrics_listen = Some(m);
    }
    if let Some(c) = a.ca {
        file.tls.ca = c;
    }
    if let Some(c) = a.cert {
        file.tls.cert = c;
    }
    if let Some(k) = a.key {
        file.tls.key = k;
    }
    if a.auto_balance {
        file.auto_balance = true;
    }
    if let Some(b) = a.split_size_bytes {
        file.split_size_bytes = Some(b);
    }
    for p in &a.peers {
        let (id, addr) = p.split_once('=').ok_or_else(|| anyhow!("--peer {p:?}: expected ID=ADDR"))?;
        let id = id.trim().parse().map_err(|e| anyhow!("--peer {p:?}: bad node id: {e}"))?;
        file.peers.push(flotilla::config::PeerEntry { id, addr: addr.trim().to_string() });
    }
    if let Some(ids) = &a.bootstrap {
        let ids: Vec<u64> = ids
            .split(',')
            .map(|t| t.trim().parse::<u64>().map_err(|e| anyhow!("--bootstrap {ids:?}: {e}")))
            .collect::<Result<_>>()?;
        file.bootstrap = Some(flotilla::config::BootstrapEntry {
            meta_voters: ids.iter().copied().take(5).collect(),
            shard_replicas: ids.iter().copied().take(3).collect(),
            shards: a.shards,
        });
    }
    let shown = a.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "flags".into());
    let cfg = file.resolve(&base).map_err(|e| anyhow!("{shown}: {e}"))?;
    let node = Node::start(cfg.node).await.context("starting the node")?;
    if let Some(m) = cfg.metrics_listen {
        let (bound, _task) =
            flotilla::http::serve(m, vec![node.clone()]).await.with_context(|| format!("metrics_listen {m}"))?;
        tracing::info!(%bound, "metrics and health over http");
    }
    println!("flotilla node {} listening on {}", node.id(), node.addr());
    stop_signal().await;
    eprintln!("stopping");
    node.shutdown().await;
    Ok(0)
}

async fn dev(a: DevArgs) -> Result<i32> {
    if a.nodes == 0 || a.nodes > DEV_NODES_MAX {
        bail!("--nodes must be 1..={DEV_NODES_MAX}, not {}", a.nodes);
    }
    if a.shards == 0 || a.shards > DEV_SHARDS_MAX {
        bail!("--shards must be 1..={DEV_SHARDS_MAX}, not {}", a.shards);
    }
    if a.split_size_bytes < flotilla::config::SPLIT_SIZE_BYTES_MIN {
        bail!("--split-size-bytes must be at least {}", flotilla::config::SPLIT_SIZE_BYTES_MIN);
    }
    let dir = a.data_dir.unwrap_or_else(|| cluster::home().join("dev"));
    prepare_dev_dir(&dir)?;
    let log = std::fs::File::create(dir.join("dev.log"))
        .with_context(|| format!("creating {}", dir.join("dev.log").display()))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .try_init();

    let certs = dir.join("certs");
    cluster::create_ca(&certs).map_err(|e| anyhow!(e))?;
    let ids: Vec<NodeId> = (1..=u64::from(a.nodes)).map(NodeId).collect();
    for id in &ids {
        cluster::issue_node(&certs, *id).map_err(|e| anyhow!(e))?;
    }
    let (client_cert, client_key) = cluster::issue_client(&certs, "dev").map_err(|e| anyhow!(e))?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let bootstrap = BootstrapConfig {
        meta_voters: ids.iter().copied().take(5).collect(),
        shard_replicas: ids.iter().copied().take(3).collect(),
        addrs: Vec::new(),
        split_keys: dev_split_keys(a.shards),
    };
    let mut nodes = Vec::new();
    for id in &ids {
        let tls = cluster::node_tls(&certs, *id).map_err(|e| anyhow!(e))?;
        let mut cfg = NodeConfig::new(*id, dir.join(format!("node-{id}")), loopback, tls);
        cfg.bootstrap = Some(bootstrap.clone());
        cfg.balancer.split_size_bytes_threshold = a.split_size_bytes;
        cfg.pollers = flotilla::node::default_pollers(ids.len());
        cfg.auto_balance_interval_ms = (!a.no_auto_balance).then_some(flotilla::config::AUTO_BALANCE_INTERVAL_MS);
        nodes.push(Node::start(cfg).await.with_context(|| format!("starting node {id}"))?);
    }
    for x in &nodes {
        for y in &nodes {
            if y.id() > x.id() {
                x.set_peer_addr(y.id(), y.local_addr()?)?;
            }
        }
    }
    let mut metrics = Vec::new();
    for n in &nodes {
        let (bound, _t) = flotilla::http::serve(loopback, vec![n.clone()]).await.context("metrics server")?;
        metrics.push(bound);
    }
    let file = ClusterFile {
        version: cluster::CLUSTER_FILE_VERSION,
        nodes: nodes
            .iter()
            .zip(&metrics)
            .map(|(n, m)| ClusterNode { id: n.id(), addr: n.addr().to_string(), metrics: Some(m.to_string()) })
            .collect(),
        ca: certs.join("ca.pem"),
        cert: client_cert,
        key: client_key,
        data_dir: Some(dir.clone()),
        pid: Some(std::process::id()),
    };
    // Ready once a client gets a map and a write goes through.
    let tls = file.tls().map_err(|e| anyhow!(e))?;
    let cconf = ClientConfig::new(tls, file.endpoints().map_err(|e| anyhow!(e))?);
    let deadline = Instant::now() + Duration::from_secs(DEV_READY_TIMEOUT_S);
    loop {
        let attempt = async {
            let c = Client::connect(cconf.clone()).await?;
            let mut r = c.put(b"flotilla-dev-ready", b"1").await.map(|_| ());
            if r.is_ok() {
                r = c.delete(b"flotilla-dev-ready").await.map(|_| ());
            }
            c.close().await;
            r
        };
        match attempt.await {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => bail!("the dev cluster did not become ready: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    file.save(&dir.join("cluster.json")).map_err(|e| anyhow!(e))?;
    let default_file = cluster::default_cluster_file();
    file.save(&default_file).map_err(|e| anyhow!(e))?;
    let mut out = String::new();
    out += &format!(
        "flotilla dev: {} nodes, {} shards ({} replicas each), data in {}\n",
        a.nodes,
        a.shards,
        bootstrap.shard_replicas.len(),
        dir.display()
    );
    for (n, m) in nodes.iter().zip(&metrics) {
        out += &format!("  node {}: {}   metrics http://{m}/metrics\n", n.id(), n.addr());
    }
    out += &if a.no_auto_balance {
        "balancer: on request (flotilla admin rebalance)\n".to_string()
    } else {
        format!("balancer: automatic (shards split past {} bytes)\n", a.split_size_bytes)
    };
    out += &format!(
        "cluster file: {} (read by default by the other commands)\n\
         client certificate: {}\n\
         logs: {}\n\n\
         In another terminal:\n  \
         flotilla kv put hello world\n  \
         flotilla kv get hello\n  \
         flotilla admin shards\n  \
         flotilla bench put --clients 64 --duration 10\n\n\
         Ctrl-C stops the cluster.\n",
        default_file.display(),
        file.cert.display(),
        dir.join("dev.log").display()
    );
    print!("{out}");
    let _ = std::io::stdout().flush();
    stop_signal().await;
    eprintln!("stopping the dev cluster");
    for n in &nodes {
        n.shutdown().await;
    }
    // Remove the default cluster file only if it still points at this cluster.
    if ClusterFile::load(&default_file).ok().and_then(|f| f.pid) == Some(std::process::id()) {
        let _ = std::fs::remove_file(&default_file);
    }
    Ok(0)
}

fn prepare_dev_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_none();
        if !empty {
            if !dir.join(DEV_MARKER).exists() {
                bail!(
                    "{} is not empty and was not made by `flotilla dev`; refusing to wipe it (give another --data-dir)",
                    dir.display()
                );
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("wiping {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(DEV_MARKER), "made by flotilla dev; wiped at its next start\n")
        .with_context(|| format!("writing into {}", dir.display()))?;
    Ok(())
}

fn cert(c: CertCommand) -> Result<i32> {
    match c {
        CertCommand::Ca { dir } => {
            cluster::create_ca(&dir).map_err(|e| anyhow!(e))?;
            println!("CA written to {}", dir.join("ca.pem").display());
        }
        CertCommand::Node { dir, id } => {
            let (cert, key) = cluster::issue_node(&dir, NodeId(id)).map_err(|e| anyhow!(e))?;
            println!("node {id}: {} and {}", cert.display(), key.display());
        }
        CertCommand::Client { dir, name } => {
            let (cert, key) = cluster::issue_client(&dir, &name).map_err(|e| anyhow!(e))?;
            println!("client {name}: {} and {}", cert.display(), key.display());
        }
    }
    Ok(0)
}

fn client_config(conn: &Conn) -> Result<ClientConfig> {
    let path = conn.cluster.clone().unwrap_or_else(cluster::default_cluster_file);
    let file = ClusterFile::load(&path).map_err(|e| anyhow!(e))?;
    let tls = file.tls().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut cfg = ClientConfig::new(tls, file.endpoints().map_err(|e| anyhow!(e))?);
    if !(conn.timeout.is_finite() && conn.timeout > 0.0 && conn.timeout <= 3600.0) {
        bail!("--timeout must be a number of seconds in (0, 3600]");
    }
    cfg.op_timeout = Duration::from_secs_f64(conn.timeout);
    cfg.request_timeout = cfg.request_timeout.min(cfg.op_timeout);
    Ok(cfg)
}

async fn connect(conn: &Conn) -> Result<Client> {
    let cfg = client_config(conn)?;
    Client::connect(cfg).await.map_err(|e| anyhow!("cannot reach the cluster: {e}"))
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_opt(v: &Option<Vec<u8>>) -> serde_json::Value {
    v.as_ref().map(|b| serde_json::Value::String(show(b))).unwrap_or(serde_json::Value::Null)
}

async fn kv(a: KvArgs) -> Result<i32> {
    let json = a.conn.json;
    // Check the input before connecting, so a typo is reported even with no cluster.
    let check = |k: &str| flotilla::wire::check_user_key(k.as_bytes()).map_err(|e| anyhow!("key {k:?}: {e}"));
    match &a.op {
        KvOp::Get { key, .. } | KvOp::Delete { key } => check(key)?,
        KvOp::Put { key, value } => {
            check(key)?;
            flotilla::wire::check_value(value.as_bytes()).map_err(|e| anyhow!(e))?;
        }
        KvOp::Cas { key, expected, absent, new, delete } => {
            check(key)?;
            if expected.is_none() && !absent {
                bail!("cas needs --expected VALUE or --absent");
            }
            if new.is_none() && !delete {
                bail!("cas needs --new VALUE or --delete");
            }
        }
        KvOp::Scan { limit, start, end } => {
            if *limit == 0 {
                bail!("--limit must be at least 1");
            }
            if let (Some(s), Some(e)) = (start, end) {
                if s >= e {
                    bail!("the scan's start {s:?} must come before its end {e:?}");
                }
            }
        }
    }
    let mut cfg = client_config(&a.conn)?;
    match &a.op {
        KvOp::Get { lease: true, .. } => cfg.consistency = flotilla::wire::ReadConsistency::Lease,
        KvOp::Get { stale: true, .. } => cfg.consistency = flotilla::wire::ReadConsistency::Stale,
        _ => {}
    }
    let client = Client::connect(cfg).await.map_err(|e| anyhow!("cannot reach the cluster: {e}"))?;
    let code = match a.op {
        KvOp::Get { key, .. } => {
            let v = client.get(key.as_bytes()).await?;
            if json {
                println!("{}", serde_json::json!({"key": key, "found": v.is_some(), "value": json_opt(&v)}));
                0
            } else if let Some(v) = v {
                println!("{}", show(&v));
                0
            } else {
                eprintln!("key {key:?} not found");
                1
            }
        }
        KvOp::Put { key, value } => {
            client.put(key.as_bytes(), value.as_bytes()).await?;
            if json {
                println!("{}", serde_json::json!({"key": key, "ok": true}));
            } else {
                println!("OK");
            }
            0
        }
        KvOp::Delete { key } => {
            let prev = client.delete(key.as_bytes()).await?;
            if json {
                println!("{}", serde_json::json!({"key": key, "deleted": prev.is_some(), "previous": json_opt(&prev)}));
            } else if prev.is_some() {
                println!("OK (deleted)");
            } else {
                println!("OK (was absent)");
            }
            0
        }
        KvOp::Cas { key, expected, new, .. } => {
            let r = client
                .cas(key.as_bytes(), expected.as_deref().map(str::as_bytes), new.as_deref().map(str::as_bytes))
                .await?;
            match r {
                CasOutcome::Swapped { .. } => {
                    if json {
                        println!("{}", serde_json::json!({"key": key, "swapped": true}));
                    } else {
                        println!("OK (swapped)");
                    }
                    0
                }
                CasOutcome::Failed { current } => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"key": key, "swapped": false, "current": json_opt(&current)})
                        );
                    } else {
                        let cur = current.as_ref().map(|c| format!("{:?}", show(c))).unwrap_or_else(|| "absent".into());
                        println!("NOT SWAPPED: the current value is {cur}");
                    }
                    1
                }
            }
        }
        KvOp::Scan { start, end, limit } => {
            let pairs = client
                .scan(start.as_deref().unwrap_or("").as_bytes(), end.as_deref().map(str::as_bytes), limit)
                .await?;
            if json {
                let items: Vec<_> =
                    pairs.iter().map(|(k, v)| serde_json::json!({"key": show(k), "value": show(v)})).collect();
                println!("{}", serde_json::json!({"pairs": items}));
            } else {
                let rows: Vec<Vec<String>> = pairs.iter().map(|(k, v)| vec![show(k), show(v)]).collect();
                print_table(&["KEY", "VALUE"], &rows);
                println!("({} pairs)", pairs.len());
            }
            0
        }
    };
    client.close().await;
    Ok(code)
}

fn print_table(head: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

async fn admin(a: AdminArgs) -> Result<i32> {
    let json = a.conn.json;
    let req = match &a.op {
        AdminOp::Nodes => AdminRequest::Nodes,
        AdminOp::Shards => AdminRequest::Shards,
        AdminOp::Split { key } => {
            flotilla::wire::check_user_key(key.as_bytes()).map_err(|e| anyhow!("key {key:?}: {e}"))?;
            AdminRequest::Split { key: key.as_bytes().to_vec() }
        }
        AdminOp::Move { shard, from, to, .. } => {
            if from == to {
                bail!("FROM and TO are the same node");
            }
            AdminRequest::Move { shard: ShardId(*shard), from: NodeId(*from), to: NodeId(*to) }
        }
        AdminOp::TransferLeader { shard, node } => {
            AdminRequest::TransferLeader { shard: ShardId(*shard), node: NodeId(*node) }
        }
        AdminOp::Rebalance => AdminRequest::Rebalance,
        AdminOp::Drain { node, undo } => AdminRequest::Drain { node: NodeId(*node), draining: !undo },
        AdminOp::Status => AdminRequest::Status,
        AdminOp::AddNode { node, addr } => {
            addr.parse::<SocketAddr>().map_err(|e| anyhow!("{addr:?} is not an address like 127.0.0.1:7004: {e}"))?;
            AdminRequest::AddNode { node: NodeId(*node), addr: addr.clone() }
        }
    };
    let client = connect(&a.conn).await?;
    let resp = client.admin(req).await?;
    if json {
        println!("{}", serde_json::to_string(&resp)?);
    } else {
        print_admin(&resp);
    }
    if let (AdminOp::Move { shard, no_wait: false, .. }, false) = (&a.op, json) {
        follow_move(&client, ShardId(*shard)).await?;
    }
    client.close().await;
    Ok(0)
}

/// Prints the progress of a move until it finishes.
async fn follow_move(client: &Client, shard: ShardId) -> Result<()> {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let AdminResponse::Shards(rows) = client.admin(AdminRequest::Shards).await? else { bail!("unexpected answer") };
        let Some(row) = rows.into_iter().find(|r| r.descriptor.id == shard) else { bail!("shard {shard} vanished") };
        match &row.moving {
            Some(m) => {
                let applied: Vec<String> = row.applied.iter().map(|(n, a)| format!("n{n}@{a}")).collect();
                let now = format!("moving {m}; applied: {}", applied.join(" "));
                if now != last {
                    println!("{now}");
                    last = now;
                }
            }
            None => {
                let replicas: Vec<String> = row.descriptor.replicas.iter().map(|r| format!("{}", r.node)).collect();
                println!("move done: shard {shard} on nodes {}", replicas.join(","));
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("the move did not finish within 10 minutes (it goes on; check `flotilla admin shards`)")
}

fn human_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

fn print_admin(r: &AdminResponse) {
    match r {
        AdminResponse::Nodes(rows) => {
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|n| {
                    vec![
                        n.node.to_string(),
                        n.addr.clone(),
                        n.replicas.to_string(),
                        n.leading.to_string(),
                        n.requests_per_s.to_string(),
                        if n.draining { "draining".into() } else { "-".into() },
                        n.report_age_ms
                            .map(|a| format!("{:.1}s ago", a as f64 / 1000.0))
                            .unwrap_or_else(|| "never".into()),
                    ]
                })
                .collect();
            print_table(&["NODE", "ADDRESS", "REPLICAS", "LEADING", "REQ/S", "DRAIN", "LAST REPORT"], &rows);
        }
        AdminResponse::Shards(rows) => {
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|s| {
                    let d = &s.descriptor;
                    let range = format!(
                        "[{}, {})",
                        if d.start.is_empty() { "-inf".into() } else { show(&d.start) },
                        d.end.as_ref().map(|e| show(e)).unwrap_or_else(|| "+inf".into())
                    );
                    let replicas: Vec<String> = d
                        .replicas
                        .iter()
                        .map(|r| match r.role {
                            flotilla::placement::ReplicaRole::Voter => r.node.to_string(),
                            flotilla::placement::ReplicaRole::Learner => format!("{}(learner)", r.node),
                        })
                        .collect();
                    let max = s.applied.values().copied().max().unwrap_or(0);
                    let lag = s.applied.values().map(|a| max - a).max().unwrap_or(0);
                    vec![
                        d.id.to_string(),
                        range,
                        format!("{}.{}", d.epoch.conf_version, d.epoch.version),
                        replicas.join(","),
                        s.leader.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                        max.to_string(),
                        lag.to_string(),
                        human_bytes(s.bytes),
                        s.moving.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(&["SHARD", "RANGE", "EPOCH", "REPLICAS", "LEADER", "APPLIED", "LAG", "SIZE", "MOVE"], &rows);
        }
        AdminResponse::Changed(ds) => {
            if ds.is_empty() {
                println!("OK");
            }
            for d in ds {
                let nodes: Vec<String> = d.replicas.iter().map(|r| r.node.to_string()).collect();
                println!(
                    "shard {} epoch {}.{} on nodes {}",
                    d.id,
                    d.epoch.conf_version,
                    d.epoch.version,
                    nodes.join(",")
                );
            }
        }
        AdminResponse::Done(s) => println!("{s}"),
        AdminResponse::Status(s) => {
            println!("nodes:  {} registered, {} reporting", s.nodes, s.nodes_live);
            println!("shards: {} ({} with a known leader)", s.shards, s.shards_with_leader);
            println!("moves in progress: {}", s.moves);
            println!("meta leader: {}", s.meta_leader.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into()));
        }
    }
}

async fn bench_cmd(a: BenchArgs) -> Result<i32> {
    if a.clients == 0 || a.clients > 4096 {
        bail!("--clients must be 1..=4096");
    }
    if a.keys == 0 {
        bail!("--keys must be at least 1");
    }
    if a.value_size > flotilla::wire::VALUE_BYTES_MAX {
        bail!("--value-size must be at most {} bytes", flotilla::wire::VALUE_BYTES_MAX);
    }
    if !(a.duration.is_finite() && a.duration > 0.0 && a.duration <= 86_400.0) {
        bail!("--duration must be a number of seconds in (0, 86400]");
    }
    let workload = match a.workload {
        WorkloadArg::Put => Workload::Put,
        WorkloadArg::Get => Workload::Get,
        WorkloadArg::Mixed => Workload::Mixed,
    };
    let cfg = BenchConfig {
        workload,
        clients: a.clients,
        value_size: a.value_size,
        keys: a.keys,
        duration: Duration::from_secs_f64(a.duration),
        ops: a.ops,
    };
    let ccfg = client_config(&a.conn)?;
    let progress = Arc::new(bench::Progress::default());
    let p = progress.clone();
    let json = a.conn.json;
    let ticker = tokio::spawn(async move {
        let start = Instant::now();
        let mut last = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let ops = p.ops.load(std::sync::atomic::Ordering::Relaxed);
            let errors = p.errors.load(std::sync::atomic::Ordering::Relaxed);
            if !json {
                eprint!(
                    "\r{:>5.0}s  {ops:>9} ops  {:>8} ops/s  {errors} errors   ",
                    start.elapsed().as_secs_f64(),
                    ops - last
                );
                let _ = std::io::stderr().flush();
            }
            last = ops;
        }
    });
    let report = bench::run(ccfg, cfg, progress).await;
    ticker.abort();
    let report = report.map_err(|e| anyhow!("cannot reach the cluster: {e}"))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!();
        println!(
            "{:?}: {} clients, {}-byte values, {} keys, {:.1} s",
            report.workload, report.clients, report.value_size, report.keys, report.elapsed_s
        );
        println!("  ops:      {} ({:.0} ops/s)", report.ops, report.ops_per_s);
        println!(
            "  latency:  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            report.p50_ms, report.p90_ms, report.p99_ms, report.p999_ms, report.max_ms
        );
        println!("  errors:   {} unknown outcome, {} other", report.errors_unknown, report.errors_other);
    }
    Ok(0)
}
