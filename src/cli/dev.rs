//! `flotilla dev`: a local cluster on loopback ([`DevCluster`]) with fresh certificates, its
//! cluster file written where the other commands look for it, until Ctrl-C.

use super::stop_signal;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use flotilla::cluster::{self, ClusterFile};
use flotilla::config::RUNTIME_THREADS_MAX;
use flotilla::dev_cluster::DevCluster;
use flotilla::meta::{dev_split_keys, BOOTSTRAP_SHARDS_MAX};
use flotilla::raft::NodeId;
use flotilla::BootstrapConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most nodes `flotilla dev` starts.
const DEV_NODES_MAX: u32 = 7;
/// How long `flotilla dev` waits for its cluster to serve (s).
const DEV_READY_TIMEOUT_S: u64 = 60;
/// Marker file in a dev data directory: only such a directory is wiped on the next run.
const DEV_MARKER: &str = ".flotilla-dev";

#[derive(Args)]
pub struct DevArgs {
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
    /// Neighbouring shards smaller than this together (and cold) are merged by the balancer.
    /// Off by default here: a dev cluster is split into --shards on purpose, to spread load
    /// over empty shards that merges would join again.
    #[arg(long, value_name = "BYTES")]
    merge_size_bytes: Option<u64>,
    /// Each node's memory budget for RocksDB's block cache and memtables (e.g. 256MiB;
    /// default 512MiB, as a server's).
    #[arg(long, value_name = "SIZE")]
    memory_budget: Option<String>,
    /// Do not serve the Redis protocol (on by default, on node 1, plaintext on loopback).
    #[arg(long)]
    no_resp: bool,
    /// Start from a backup (`flotilla admin backup`): the cluster's shards are the backup's
    /// (--shards is ignored) and hold its data.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Worker threads of the async runtime the nodes share (default: one per core). Each
    /// node's pollers then follow from it, as a server's do from its `runtime_threads`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=RUNTIME_THREADS_MAX as i64))]
    runtime_threads: Option<u16>,
}

impl DevArgs {
    /// The runtime's worker threads (`--runtime-threads`), read before the runtime starts.
    pub fn runtime_threads(&self) -> Option<usize> {
        self.runtime_threads.map(usize::from)
    }
}

pub async fn run(a: DevArgs) -> Result<i32> {
    if a.nodes == 0 || a.nodes > DEV_NODES_MAX {
        bail!("--nodes must be 1..={DEV_NODES_MAX}, not {}", a.nodes);
    }
    if a.shards == 0 || a.shards > BOOTSTRAP_SHARDS_MAX {
        bail!("--shards must be 1..={BOOTSTRAP_SHARDS_MAX}, not {}", a.shards);
    }
    if a.split_size_bytes < flotilla::config::SPLIT_SIZE_BYTES_MIN {
        bail!("--split-size-bytes must be at least {}", flotilla::config::SPLIT_SIZE_BYTES_MIN);
    }
    let mut store = flotilla::shard::StoreOptions::default();
    if let Some(text) = &a.memory_budget {
        let bytes = flotilla::config::parse_bytes(text).map_err(|e| anyhow!("--memory-budget: {e}"))?;
        store = flotilla::shard::StoreOptions::with_memory_budget(bytes);
        store.check().map_err(|e| anyhow!("--memory-budget: {e}"))?;
    }
    let runtime_threads = a.runtime_threads();
    let dir = a.data_dir.unwrap_or_else(|| cluster::home().join("dev"));
    prepare_dev_dir(&dir)?;
    let log = std::fs::File::create(dir.join("dev.log"))
        .with_context(|| format!("creating {}", dir.join("dev.log").display()))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .try_init();

    let ids: Vec<NodeId> = (1..=u64::from(a.nodes)).map(NodeId).collect();
    let bootstrap = BootstrapConfig::of_nodes(&ids, dev_split_keys(a.shards));
    let mut shards = u64::from(a.shards);
    if let Some(from) = &a.restore {
        let (dir, from, boot, nodes) = (dir.clone(), from.clone(), bootstrap.clone(), ids.len() as u64);
        let printer = super::backup::progress_printer("restore");
        let restored = tokio::task::spawn_blocking(move || {
            let mut printer = printer;
            DevCluster::restore(&dir, nodes, &boot, &from, |id, p| {
                if id == NodeId(1) {
                    printer(p)
                }
            })
        })
        .await??;
        if let Some(r) = restored {
            eprintln!("restored backup {}: {} shards, {} keys", r.backup_id, r.shards, r.keys);
            shards = r.shards;
        }
    }
    let mut dev = DevCluster::start(&dir, ids.len() as u64, bootstrap.clone(), |cfg| {
        cfg.balancer.split_size_bytes_threshold = a.split_size_bytes;
        cfg.balancer.merge_size_bytes_threshold = a.merge_size_bytes.unwrap_or(0);
        cfg.store = store;
        cfg.pollers = flotilla::node::default_pollers(runtime_threads, ids.len());
        cfg.auto_balance_interval_ms = (!a.no_auto_balance).then_some(flotilla::config::AUTO_BALANCE_INTERVAL_MS);
        // The Redis front door on the first node (any node routes any key), on a free port.
        if cfg.id == NodeId(1) && !a.no_resp {
            let mut resp = flotilla::resp_server::RespConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
            resp.plaintext_loopback = true;
            cfg.resp = Some(resp);
        }
    })
    .await?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut metrics = Vec::new();
    for n in dev.nodes() {
        let (bound, _t) = flotilla::http::serve(loopback, vec![n.clone()]).await.context("metrics server")?;
        metrics.push(bound);
    }
    let file = dev.cluster_file(&metrics);
    // Ready once a client gets a map and a write goes through.
    dev.wait_ready(Duration::from_secs(DEV_READY_TIMEOUT_S)).await?;
    file.save(&dir.join("cluster.json")).map_err(|e| anyhow!(e))?;
    let default_file = cluster::default_cluster_file();
    file.save(&default_file).map_err(|e| anyhow!(e))?;
    let mut out = String::new();
    out += &format!(
        "flotilla dev: {} nodes, {} shards ({} replicas each), data in {}\n",
        a.nodes,
        shards,
        bootstrap.shard_replicas.len(),
        dir.display()
    );
    for (n, m) in dev.nodes().zip(&metrics) {
        out += &format!("  node {}: {}   metrics http://{m}/metrics\n", n.id(), n.addr());
    }
    let resp = dev.nodes().find_map(|n| n.resp_addr());
    if let Some(r) = resp {
        out += &format!("  redis protocol (node 1; any node routes any key): redis-cli -p {}\n", r.port());
    }
    out += &if a.no_auto_balance {
        "balancer: on request (flotilla admin rebalance)\n".to_string()
    } else {
        let merges = match a.merge_size_bytes {
            Some(b) => format!(", neighbours merged below {b} bytes"),
            None => String::new(),
        };
        format!("balancer: automatic (shards split past {} bytes{merges})\n", a.split_size_bytes)
    };
    out += &format!(
        "cluster file: {} (read by default by the other commands)\n\
         client certificate: {}\n\
         logs: {}\n\n\
         In another terminal:\n  \
         flotilla kv put hello world\n  \
         flotilla kv get hello\n  \
         {}\
         flotilla admin shards\n  \
         flotilla bench put --clients 64 --duration 10\n\n\
         Ctrl-C stops the cluster.\n",
        default_file.display(),
        file.cert.display(),
        dir.join("dev.log").display(),
        resp.map(|r| format!("redis-cli -p {} get hello\n  ", r.port())).unwrap_or_default(),
    );
    print!("{out}");
    let _ = std::io::stdout().flush();
    stop_signal().await;
    eprintln!("stopping the dev cluster");
    dev.shutdown().await;
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
