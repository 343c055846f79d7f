//! The CLI's command families, one file each, and what they share: how a client command finds
//! the cluster ([`Conn`]), output helpers and the stop signal.

pub mod admin;
pub mod backup;
pub mod bench;
pub mod cert;
pub mod dev;
pub mod kv;
pub mod recover;
pub mod server;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use flotilla::cluster::{self, ClusterFile};
use flotilla::{Client, ClientConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct Conn {
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

/// Waits for Ctrl-C or SIGTERM.
pub async fn stop_signal() {
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

/// The client configuration a command's flags and cluster file give.
pub fn client_config(conn: &Conn) -> Result<ClientConfig> {
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

pub async fn connect(conn: &Conn) -> Result<Client> {
    let cfg = client_config(conn)?;
    Client::connect(cfg).await.map_err(|e| anyhow!("cannot reach the cluster: {e}"))
}

pub fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn json_opt(v: &Option<Vec<u8>>) -> serde_json::Value {
    v.as_ref().map(|b| serde_json::Value::String(show(b))).unwrap_or(serde_json::Value::Null)
}

pub fn print_table(head: &[&str], rows: &[Vec<String>]) {
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
