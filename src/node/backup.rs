//! Shard copies for backups (`flotilla admin backup`, [`crate::backup`]), on the shard's
//! leader: [`AdminRequest::BackupStart`](crate::wire::AdminRequest::BackupStart) makes a
//! linearizable read, then builds the shard's snapshot files at one point at or after it (the
//! same build a follower's snapshot uses, from one RocksDB snapshot, so writes go on); the
//! client reads the copy's stream in chunks and releases it. A copy the client abandons goes
//! after [`BACKUP_COPY_IDLE_MS_MAX`] without a read; at most [`BACKUP_COPIES_MAX`] exist at
//! once, each a shard's worth of files in the store's scratch directory.

use super::{Node, BACKUP_COPIES_MAX, BACKUP_COPY_IDLE_MS_MAX};
use crate::placement::{Epoch, ShardId};
use crate::raft::SnapshotMeta;
use crate::shard::KvStateMachine;
use crate::wire::{AdminResponse, BackupShard, Response, BACKUP_CHUNK_BYTES_MAX};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info};

/// The copies this node holds for backups, by copy id (the snapshot's id).
#[derive(Default)]
pub(super) struct BackupCopies {
    copies: Mutex<HashMap<u64, BackupCopy>>,
}

/// One shard copy.
struct BackupCopy {
    /// The shard, checked against each read (a copy id alone could be guessed for another).
    shard: ShardId,
    /// The shard's state machine, which holds the built files until `drop_built`.
    sm: KvStateMachine,
    /// The copy's snapshot meta: what reads of it are checked against.
    meta: SnapshotMeta,
    /// The last request for it: an abandoned copy goes after a while.
    last_used: Instant,
}

impl BackupCopies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, BackupCopy>> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the copies unused for longer than `idle` (their files go); returns how many.
    fn sweep(&self, idle: Duration) -> usize {
        let mut copies = self.lock();
        let stale: Vec<u64> = copies.iter().filter(|(_, c)| c.last_used.elapsed() > idle).map(|(id, _)| *id).collect();
        for id in &stale {
            if let Some(c) = copies.remove(id) {
                c.sm.drop_built(*id);
            }
        }
        stale.len()
    }
}

impl Node {
    /// [`AdminRequest::BackupStart`](crate::wire::AdminRequest::BackupStart).
    pub(super) async fn backup_start(&self, shard: ShardId, epoch: Epoch) -> Response {
        if let Err(r) = self.route_shard(shard, epoch).await {
            return r;
        }
        let copies = &self.inner.backups;
        copies.sweep(Duration::from_millis(BACKUP_COPY_IDLE_MS_MAX));
        if copies.lock().len() >= BACKUP_COPIES_MAX {
            return Response::Unavailable(format!(
                "{BACKUP_COPIES_MAX} backup copies are held on node {} already; retry once one is read",
                self.inner.id
            ));
        }
        let (meta, keys, sm) = match self.inner.host.build_backup(shard).await {
            Ok(built) => built,
            Err(e) => return self.host_error(e, false),
        };
        let answer = BackupShard {
            copy_id: meta.snapshot_id,
            index: meta.last_log_id.index.0,
            term: meta.last_log_id.term.0,
            size_bytes: meta.size_bytes,
            keys,
        };
        info!(node = %self.inner.id, %shard, index = answer.index, bytes = answer.size_bytes, keys, "backup copy built");
        copies.lock().insert(meta.snapshot_id, BackupCopy { shard, sm, meta, last_used: Instant::now() });
        Response::Admin(AdminResponse::BackupStarted(answer))
    }

    /// [`AdminRequest::BackupRead`](crate::wire::AdminRequest::BackupRead).
    pub(super) async fn backup_read(&self, shard: ShardId, copy_id: u64, offset: u64, len: u64) -> Response {
        if len == 0 || len > BACKUP_CHUNK_BYTES_MAX {
            return Response::Invalid(format!("a backup read is of 1..={BACKUP_CHUNK_BYTES_MAX} bytes, not {len}"));
        }
        let found = {
            let mut copies = self.inner.backups.lock();
            copies.get_mut(&copy_id).filter(|c| c.shard == shard).map(|c| {
                c.last_used = Instant::now();
                (c.sm.clone(), c.meta.clone())
            })
        };
        let Some((sm, meta)) = found else {
            return Response::Invalid(format!(
                "node {} holds no backup copy {copy_id} of shard {shard} (released, or unused for {} s)",
                self.inner.id,
                BACKUP_COPY_IDLE_MS_MAX / 1000
            ));
        };
        match tokio::task::spawn_blocking(move || sm.read_snapshot_blocking(&meta, offset, len)).await {
            Ok(Ok(Some(bytes))) => Response::Admin(AdminResponse::BackupChunk(bytes)),
            Ok(Ok(None)) => Response::Invalid(format!("backup copy {copy_id} of shard {shard} is gone")),
            Ok(Err(e)) => Response::Invalid(e.to_string()),
            Err(e) => Response::Unavailable(format!("backup read failed: {e}")),
        }
    }

    /// [`AdminRequest::BackupEnd`](crate::wire::AdminRequest::BackupEnd): the copy's files go.
    pub(super) fn backup_end(&self, shard: ShardId, copy_id: u64) -> Response {
        let mut copies = self.inner.backups.lock();
        match copies.get(&copy_id) {
            Some(c) if c.shard == shard => {
                if let Some(c) = copies.remove(&copy_id) {
                    c.sm.drop_built(copy_id);
                }
                Response::Admin(AdminResponse::Done(format!("backup copy {copy_id} of shard {shard} released")))
            }
            _ => Response::Admin(AdminResponse::Done(format!("no backup copy {copy_id} of shard {shard} here"))),
        }
    }

    /// Removes abandoned backup copies every few seconds until shutdown.
    pub(super) async fn run_backup_sweeper(self, mut stop: watch::Receiver<bool>) {
        let idle = Duration::from_millis(BACKUP_COPY_IDLE_MS_MAX);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(idle / 4) => {}
                _ = stop.changed() => break,
            }
            let removed = self.inner.backups.sweep(idle);
            if removed > 0 {
                debug!(node = %self.inner.id, removed, "abandoned backup copies removed");
            }
        }
    }
}
