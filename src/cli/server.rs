//! `flotilla server`: one node per process, from a TOML file ([`flotilla::config`]) and flags
//! that override it.

use super::stop_signal;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use flotilla::config::ServerFile;
use flotilla::Node;
use std::path::{Path, PathBuf};

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
}

pub async fn run(a: ServerArgs) -> Result<i32> {
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
