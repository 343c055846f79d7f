//! Shard copies for backups (`flotilla admin backup`, [`crate::backup`]), on the shard's
//! leader: [`AdminRequest::BackupStart`](crate::wire::AdminRequest::BackupStart) makes a
//! linearizable read, then builds the shard's snapshot files at one point at or after it (the
//! same build a follower's snapshot uses, from one RocksDB snapshot, so writes go on); the
//! client reads the copy's stream in chunks and releases it. A copy the client abandons goes
//! after [`BACKUP_COPY_IDLE_MS_MAX`] without a read; at most [`BACKUP_COPIES_MAX`] exist at
//! once, each a shard's worth of files in the store's scratch directory. A copy takes its
//! slot before it is built (a build under way counts), one shard is built once at a time (a
//! client's retry while it builds is told to wait, not given a second build), and a build is
//! refused while the store's file system has less free space than the shard's approximate
//! size plus [`BACKUP_FREE_BYTES_MARGIN`]: copies must never fill the leader's disk.

use super::{Node, BACKUP_COPIES_MAX, BACKUP_COPY_IDLE_MS_MAX};
use crate::placement::{Epoch, ShardId};
use crate::raft::SnapshotMeta;
use crate::shard::KvStateMachine;
use crate::wire::{AdminResponse, BackupShard, Response, BACKUP_CHUNK_BYTES_MAX};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info};

/// Free space a backup copy leaves on the store's file system beyond the shard's size: the
/// store's own writes and compactions need room too.
pub const BACKUP_FREE_BYTES_MARGIN: u64 = 512 << 20;

/// The copies this node holds for backups, by copy id (the snapshot's id), and the builds
/// under way: together at most `BACKUP_COPIES_MAX`.
#[derive(Default)]
pub(super) struct BackupCopies {
    state: Mutex<Copies>,
}

#[derive(Default)]
struct Copies {
    /// Copies built, until released or abandoned.
    built: HashMap<u64, BackupCopy>,
    /// Shards whose copy is being built: each holds a slot, and is built once at a time.
    building: HashSet<ShardId>,
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

/// Why no copy may be built now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SlotRefused {
    /// Every slot is held (by copies built or being built).
    Full,
    /// A copy of this shard is being built (a retry of the same request, most likely).
    Building,
}

/// A slot held for a copy being built: released on drop unless the copy was kept
/// ([`BackupCopies::keep`]), so a failed or cancelled build frees it.
pub(super) struct BuildSlot<'a> {
    copies: &'a BackupCopies,
    shard: ShardId,
}

impl Drop for BuildSlot<'_> {
    fn drop(&mut self) {
        self.copies.lock().building.remove(&self.shard);
    }
}

impl BackupCopies {
    fn lock(&self) -> std::sync::MutexGuard<'_, Copies> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a copy of `shard`, before it is built.
    pub(super) fn take_slot(&self, shard: ShardId) -> Result<BuildSlot<'_>, SlotRefused> {
        let mut c = self.lock();
        if c.building.contains(&shard) {
            return Err(SlotRefused::Building);
        }
        if c.built.len() + c.building.len() >= BACKUP_COPIES_MAX {
            return Err(SlotRefused::Full);
        }
        c.building.insert(shard);
        debug_assert!(c.built.len() + c.building.len() <= BACKUP_COPIES_MAX);
        Ok(BuildSlot { copies: self, shard })
    }

    /// Keeps a copy built in `slot`: its slot passes to the copy, in one step.
    fn keep(&self, slot: BuildSlot<'_>, copy: BackupCopy) {
        assert_eq!(slot.shard, copy.shard, "a copy is kept in its own shard's slot");
        let mut c = self.lock();
        c.building.remove(&slot.shard);
        c.built.insert(copy.meta.snapshot_id, copy);
        std::mem::forget(slot);
    }

    /// Slots held, by copies built and builds under way.
    #[cfg(test)]
    fn held(&self) -> usize {
        let c = self.lock();
        c.built.len() + c.building.len()
    }

    /// Removes the copies unused for longer than `idle` (their files go); returns how many.
    fn sweep(&self, idle: Duration) -> usize {
        let mut c = self.lock();
        let stale: Vec<u64> = c.built.iter().filter(|(_, c)| c.last_used.elapsed() > idle).map(|(id, _)| *id).collect();
        for id in &stale {
            if let Some(copy) = c.built.remove(id) {
                copy.sm.drop_built(*id);
            }
        }
        stale.len()
    }
}

/// Bytes free for an unprivileged writer on the file system of `path`.
fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a NUL-terminated path; `st` is written by statvfs before it is read,
    // and only when it returns 0.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Node {
    /// [`AdminRequest::BackupStart`](crate::wire::AdminRequest::BackupStart).
    pub(super) async fn backup_start(&self, shard: ShardId, epoch: Epoch) -> Response {
        if let Err(r) = self.route_shard(shard, epoch).await {
            return r;
        }
        let copies = &self.inner.backups;
        copies.sweep(Duration::from_millis(BACKUP_COPY_IDLE_MS_MAX));
        let slot = match copies.take_slot(shard) {
            Ok(slot) => slot,
            Err(SlotRefused::Full) => {
                return Response::Unavailable(format!(
                "{BACKUP_COPIES_MAX} backup copies are held or being built on node {} already; retry once one is read",
                self.inner.id
            ))
            }
            Err(SlotRefused::Building) => {
                return Response::Unavailable(format!(
                    "a backup copy of shard {shard} is being built on node {}; retry in a while",
                    self.inner.id
                ))
            }
        };
        let dir = self.inner.host.store().db().path().to_path_buf();
        let size = self.approx_size_bytes(shard).unwrap_or(0);
        match free_bytes(&dir) {
            Ok(free) if free < size.saturating_add(BACKUP_FREE_BYTES_MARGIN) => {
                return Response::Unavailable(format!(
                    "node {} has {} MiB free in {}, less than shard {shard}'s copy (about {} MiB) and {} MiB to spare: \
                     free space on the leader first",
                    self.inner.id,
                    free >> 20,
                    dir.display(),
                    size >> 20,
                    BACKUP_FREE_BYTES_MARGIN >> 20
                ))
            }
            Ok(_) => {}
            Err(e) => return Response::Unavailable(format!("cannot tell the free space in {}: {e}", dir.display())),
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
        copies.keep(slot, BackupCopy { shard, sm, meta, last_used: Instant::now() });
        Response::Admin(AdminResponse::BackupStarted(answer))
    }

    /// [`AdminRequest::BackupRead`](crate::wire::AdminRequest::BackupRead).
    pub(super) async fn backup_read(&self, shard: ShardId, copy_id: u64, offset: u64, len: u64) -> Response {
        if len == 0 || len > BACKUP_CHUNK_BYTES_MAX {
            return Response::Invalid(format!("a backup read is of 1..={BACKUP_CHUNK_BYTES_MAX} bytes, not {len}"));
        }
        let found = {
            let mut copies = self.inner.backups.lock();
            copies.built.get_mut(&copy_id).filter(|c| c.shard == shard).map(|c| {
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
        match copies.built.get(&copy_id) {
            Some(c) if c.shard == shard => {
                if let Some(c) = copies.built.remove(&copy_id) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_holds_its_slot_from_before_its_build_and_one_shard_builds_once() {
        let copies = BackupCopies::default();
        let first = copies.take_slot(ShardId(1)).expect("a free slot");
        assert_eq!(copies.held(), 1, "a build under way holds a slot");
        assert_eq!(copies.take_slot(ShardId(1)).err(), Some(SlotRefused::Building), "a retry builds nothing");
        let mut others: Vec<BuildSlot<'_>> =
            (2..=BACKUP_COPIES_MAX as u64).map(|s| copies.take_slot(ShardId(s)).expect("slot")).collect();
        assert_eq!(copies.held(), BACKUP_COPIES_MAX);
        assert_eq!(copies.take_slot(ShardId(99)).err(), Some(SlotRefused::Full), "builds under way count");
        // A build that fails (or whose request is cancelled) gives its slot back.
        drop(first);
        assert_eq!(copies.held(), BACKUP_COPIES_MAX - 1);
        let again = copies.take_slot(ShardId(1)).expect("the shard's slot again");
        assert_eq!(copies.take_slot(ShardId(99)).err(), Some(SlotRefused::Full));
        drop(again);
        others.clear();
        assert_eq!(copies.held(), 0);
    }

    #[test]
    fn the_free_space_of_a_directory_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        assert!(free_bytes(&dir.path().join("absent")).is_err());
    }
}
