//! Restoring: one new node's data directory built from a backup, before the node first
//! starts (see the module above for how the restored cluster forms).

use super::manifest::Manifest;
use super::{hex, io_error, sync_dir, unhex, BackupError, Progress};
use crate::shard::KeyRange;
use crate::shard::{kv_snapshot, Store, StoreOptions};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The store's directory in a node's data directory (as `Node::start` opens it).
pub const STORE_DIR: &str = "store";
/// Where a restore builds the store before renaming it to [`STORE_DIR`]: a directory of this
/// name is a restore that did not finish, and a node refuses to start beside it.
pub const RESTORING_DIR: &str = "store.restoring";
/// The record of the restore, in the store's directory (RocksDB ignores files it does not
/// know): which backup, and its split keys, which the node's bootstrap takes.
pub const RESTORE_RECORD: &str = "flotilla-restored.json";
/// Format of the record.
const RESTORE_RECORD_FORMAT: u32 = 1;
/// The restoring store's memory budget: it only ingests files.
const RESTORE_MEMORY_BUDGET_BYTES: u64 = 64 << 20;

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Shards in the backup (the restored cluster's initial shards).
    pub shards: u64,
    /// Pairs loaded into this node's store (0 on a node that holds no initial shard).
    pub keys: u64,
    /// Bytes of files loaded.
    pub bytes: u64,
    /// The backup's id.
    pub backup_id: String,
}

/// The record a restore leaves in the store.
#[derive(Serialize, Deserialize)]
struct RestoreRecord {
    /// [`RESTORE_RECORD_FORMAT`].
    format: u32,
    /// The backup restored.
    backup_id: String,
    /// The backup's split keys, hex: the restored cluster's bootstrap splits there.
    split_keys_hex: Vec<String>,
    /// Whether the backup's data was loaded here (a node of the initial shards' replicas).
    holds_data: bool,
}

/// Builds the data directory `data_dir` (absent or empty) of a new node from the backup in
/// `from`: every file checked first; then, with `holds_data` (the node is one of the initial
/// shards' replicas), the backup's files loaded into a new store; and the record of the
/// backup's split keys. Blocking. The store appears under its final name in one rename, so a
/// restore cut short leaves [`RESTORING_DIR`] (run it again) and never a partial store.
pub fn restore_data_dir(
    from: &Path,
    data_dir: &Path,
    holds_data: bool,
    mut progress: impl FnMut(Progress),
) -> Result<RestoreSummary, BackupError> {
    let manifest = Manifest::load(from)?;
    check_target(data_dir)?;
    // The marker first, before the (long) check of every file: a restore killed during the
    // check leaves a directory that refuses to start, never one that starts as a new node.
    std::fs::create_dir_all(data_dir).map_err(|e| io_error(data_dir, e))?;
    let tmp = data_dir.join(RESTORING_DIR);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io_error(&tmp, e))?;
    sync_dir(data_dir)?;
    let shards_total = manifest.shards.len() as u64;
    // Two shards naming one file would load its keys twice, under two ranges.
    let mut names = std::collections::BTreeSet::new();
    if let Some(f) = manifest.shards.iter().flat_map(|s| &s.files).find(|f| !names.insert(f.name.as_str())) {
        return Err(BackupError::Corrupt(format!("file {} is named by two shards", f.name)));
    }
    // What the node's bootstrap would refuse at its first start, refused now.
    let split_keys = manifest.split_keys()?;
    if shards_total > u64::from(crate::meta::BOOTSTRAP_SHARDS_MAX) {
        return Err(BackupError::Corrupt(format!(
            "{shards_total} shards, more than a cluster bootstraps with ({}); this build cannot restore it",
            crate::meta::BOOTSTRAP_SHARDS_MAX
        )));
    }
    if let Some((k, e)) = split_keys.iter().find_map(|k| crate::wire::check_user_key(k).err().map(|e| (k, e))) {
        return Err(BackupError::Corrupt(format!(
            "a shard starts at {:?}, not a user key: {e}",
            k.escape_ascii().to_string()
        )));
    }
    manifest.verify_files(from, |_| {})?;
    let mut state = Progress { shards_done: 0, shards_total, bytes_done: 0 };
    progress(state);
    let (mut keys, mut bytes) = (0, 0);
    {
        let store = Store::open_with(&tmp, StoreOptions::with_memory_budget(RESTORE_MEMORY_BUDGET_BYTES))
            .map_err(|e| BackupError::Store(e.to_string()))?;
        for s in &manifest.shards {
            if holds_data {
                let range = KeyRange {
                    start: s.start().map_err(BackupError::Corrupt)?,
                    end: s.end().map_err(BackupError::Corrupt)?,
                };
                let files: Vec<(PathBuf, u64, u32)> =
                    s.files.iter().map(|f| (from.join(&f.name), f.bytes, f.crc32c)).collect();
                kv_snapshot::ingest_copies(&store, &range, s.keys, &files)
                    .map_err(|e| BackupError::Store(e.to_string()))?;
                keys += s.keys;
                let shard_bytes: u64 = s.files.iter().map(|f| f.bytes).sum();
                bytes += shard_bytes;
                state.bytes_done += shard_bytes;
            }
            state.shards_done += 1;
            progress(state);
        }
        store.db().flush_wal(true).map_err(|e| BackupError::Store(e.to_string()))?;
        // Dropped here: the database closes before it is renamed.
    }
    let record = RestoreRecord {
        format: RESTORE_RECORD_FORMAT,
        backup_id: manifest.backup_id.clone(),
        split_keys_hex: split_keys.iter().map(|k| hex(k)).collect(),
        holds_data,
    };
    let text = serde_json::to_vec_pretty(&record).map_err(|e| BackupError::Store(e.to_string()))?;
    let path = tmp.join(RESTORE_RECORD);
    let mut f = std::fs::File::create(&path).map_err(|e| io_error(&path, e))?;
    f.write_all(&text).and_then(|()| f.sync_all()).map_err(|e| io_error(&path, e))?;
    sync_dir(&tmp)?;
    let store_dir = data_dir.join(STORE_DIR);
    std::fs::rename(&tmp, &store_dir).map_err(|e| io_error(&store_dir, e))?;
    sync_dir(data_dir)?;
    Ok(RestoreSummary { shards: shards_total, keys, bytes, backup_id: manifest.backup_id })
}

/// A node's data directory must not hold a store already: a restore makes a new node.
fn check_target(data_dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(data_dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(|e| io_error(data_dir, e))?;
                // A restore cut short is the only thing that may be there: it is done again.
                if e.file_name() != RESTORING_DIR {
                    return Err(BackupError::Directory(format!(
                        "{} is not empty; a restore builds a new node's data directory",
                        data_dir.display()
                    )));
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(data_dir, e)),
    }
}

/// What a restore recorded in a node's store, as `Node::start` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The backup restored: the node forms a bootstrap shard only in a cluster bootstrapped
    /// from this same backup.
    pub backup_id: String,
    /// The backup's split keys: the restored cluster's bootstrap splits there.
    pub split_keys: Vec<Vec<u8>>,
    /// Whether the backup's data was loaded here.
    pub holds_data: bool,
}

/// What a restore recorded in the store of `data_dir` (`None`: not restored). An error if a
/// restore was cut short, or the record is unreadable: the node must not start as if it were
/// new.
pub fn restored(data_dir: &Path) -> Result<Option<Restored>, BackupError> {
    if data_dir.join(RESTORING_DIR).exists() {
        return Err(BackupError::Directory(format!(
            "{} holds a restore that did not finish ({RESTORING_DIR}); run flotilla restore again",
            data_dir.display()
        )));
    }
    let path = data_dir.join(STORE_DIR).join(RESTORE_RECORD);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path, e)),
    };
    let record: RestoreRecord = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Corrupt(format!("{} does not parse: {e}", path.display())))?;
    if record.format != RESTORE_RECORD_FORMAT {
        return Err(BackupError::Corrupt(format!("{}: format {} is not supported", path.display(), record.format)));
    }
    let keys = record.split_keys_hex.iter().map(|k| unhex(k)).collect::<Result<Vec<_>, _>>();
    let split_keys = keys.map_err(|e| BackupError::Corrupt(format!("{}: {e}", path.display())))?;
    Ok(Some(Restored { backup_id: record.backup_id, split_keys, holds_data: record.holds_data }))
}
