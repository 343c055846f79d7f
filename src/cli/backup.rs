//! `flotilla admin backup --to DIR` and `flotilla restore --from DIR --config FILE`, with
//! progress on standard error ([`flotilla::backup`] does the work).

use super::{client_config, Conn};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use flotilla::backup::{self, Progress};
use flotilla::config::ServerFile;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Progress lines are printed at most this often (and at each shard's end).
const PROGRESS_EVERY_MS: u64 = 1_000;

#[derive(Args)]
pub struct RestoreArgs {
    /// The backup's directory (made by `flotilla admin backup`).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// The new node's server file (`flotilla server --config`): its `data_dir` (absent or
    /// empty) is built, and its `[bootstrap]` says whether it holds the initial shards.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Override the file's `data_dir`, as `flotilla server --data-dir` does (so the restore
    /// builds the directory the server will open).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// Prints progress to standard error: on every finished shard, otherwise once a second.
pub fn progress_printer(what: &'static str) -> impl FnMut(Progress) {
    let mut last: Option<(Instant, u64)> = None;
    move |p: Progress| {
        let shard_done = last.is_none_or(|(_, done)| done != p.shards_done);
        let due = last.is_none_or(|(at, _)| at.elapsed() >= Duration::from_millis(PROGRESS_EVERY_MS));
        if shard_done || due {
            eprintln!(
                "{what}: {}/{} shards, {:.1} MiB",
                p.shards_done,
                p.shards_total,
                p.bytes_done as f64 / (1 << 20) as f64
            );
            last = Some((Instant::now(), p.shards_done));
        }
    }
}

pub async fn run_backup(conn: &Conn, to: &Path) -> Result<i32> {
    let cfg = client_config(conn)?;
    let summary = backup::take_backup(cfg, to, progress_printer("backup")).await?;
    let secs = summary.elapsed.as_secs_f64();
    if conn.json {
        let out = serde_json::json!({
            "backup_id": summary.backup_id,
            "dir": to.display().to_string(),
            "shards": summary.shards,
            "keys": summary.keys,
            "bytes": summary.bytes,
            "seconds": secs,
        });
        println!("{out}");
    } else {
        println!(
            "backup {} in {}: {} shards, {} keys, {:.1} MiB in {secs:.1} s",
            summary.backup_id,
            to.display(),
            summary.shards,
            summary.keys,
            summary.bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(0)
}

pub async fn run_restore(a: RestoreArgs) -> Result<i32> {
    let mut file = ServerFile::load(&a.config).map_err(|e| anyhow!(e))?;
    if let Some(d) = &a.data_dir {
        file.data_dir = d.clone();
    }
    let base = a.config.parent().map(Path::to_path_buf).unwrap_or_default();
    let Some(bootstrap) = &file.bootstrap else {
        bail!(
            "{}: no [bootstrap]: a restore makes a new cluster, whose initial nodes all have the same [bootstrap]",
            a.config.display()
        );
    };
    let data_dir = if file.data_dir.is_absolute() { file.data_dir.clone() } else { base.join(&file.data_dir) };
    let holds_data = bootstrap.shard_replicas.contains(&file.id);
    let from = a.from.clone();
    let target = data_dir.clone();
    let summary = tokio::task::spawn_blocking(move || {
        backup::restore_data_dir(&from, &target, holds_data, progress_printer("restore"))
    })
    .await??;
    println!(
        "restored backup {} into {} (node {}): {} shards{}",
        summary.backup_id,
        data_dir.display(),
        file.id,
        summary.shards,
        if holds_data {
            format!(", {} keys, {:.1} MiB", summary.keys, summary.bytes as f64 / (1 << 20) as f64)
        } else {
            " (this node holds no initial shard: no data)".to_string()
        }
    );
    Ok(0)
}
