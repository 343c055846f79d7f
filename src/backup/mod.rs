//! Backups and restores of a whole cluster's data (`flotilla admin backup`, `flotilla restore`).
//!
//! # A backup
//!
//! The shards are copied one after another, in key order ([`take`]). Each copy is made on the
//! shard's leader: a ReadIndex read first (so it holds every write acknowledged before it was
//! asked for), then the shard's snapshot built from one RocksDB snapshot, the very build a
//! follower's snapshot uses (`flotilla_shard::kv_snapshot`), while the shard goes on taking
//! writes. The client reads the copy's stream in chunks of [`crate::wire::BACKUP_CHUNK_BYTES_MAX`]
//! and keeps each of its SST files as a file of the backup, checking each file's crc32c as its
//! last byte arrives. Every shard is at one Raft index of its own; the backup as a whole is
//! not one point in time across shards (as TiKV BR's, or etcd's per-member snapshot, are
//! not either), but every write acknowledged before the backup started is in it.
//!
//! # On disk
//!
//! ```text
//! DIR/manifest.json                    written last (temp file, fsync, rename, fsync DIR)
//! DIR/shard-<id>-<n>.sst               the SST files of each shard (temp name until whole)
//! ```
//!
//! The manifest ([`manifest::Manifest`]) says the format version, the backup's id and time,
//! and per shard its id, key range, Raft index and term, key count and files with their
//! lengths and crc32c; it carries a crc32c of itself. A directory without a manifest is an
//! unfinished backup, and restore refuses it.
//!
//! # A restore
//!
//! [`restore::restore_data_dir`] builds one new node's data directory from a backup, before
//! the node first starts: every file is checked first (nothing is written if one is missing,
//! short or corrupt); then, on a node that holds the initial shards (`[bootstrap]
//! shard_replicas`), the files are ingested into a new store, which gets a record of the
//! backup's split keys; the store appears under its final name by one rename. The restored
//! cluster bootstraps as any new one, but with the backup's split keys (read from the record
//! by `Node::start`), so each of its initial shards has a backup shard's range, and the data
//! is already in every replica's store when the shard's group forms: the same first state on
//! every replica, as a new cluster's empty one is. Each restored replica starts as if a
//! snapshot of that data had been installed at the group's first index
//! (`Host::create_restored_group`), so the data is part of the group's history and a replica
//! added later is sent it by snapshot. The bootstrap records the backup's id in the meta state
//! (`MetaState::restored_from`), and a node forms the initial shards only if its own restore
//! record names the same backup: a node left unrestored starts its replicas empty and
//! voteless, to be sent the data. Nothing of the old cluster is kept (no Raft state, no meta
//! state, no node identity): the restored nodes form a new cluster.

pub mod manifest;
pub mod restore;
pub mod take;

pub use manifest::{Manifest, ShardEntry, MANIFEST_FILE};
pub use restore::{restore_data_dir, restored, RestoreSummary, Restored};
pub use take::{take_backup, BackupSummary};

/// What a backup or a restore has done so far, for progress output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Shards finished.
    pub shards_done: u64,
    /// Shards in all (for a backup, as the map had them at the start: a split meanwhile adds
    /// one).
    pub shards_total: u64,
    /// Bytes of files written (backup) or checked and loaded (restore).
    pub bytes_done: u64,
}

/// Why a backup or a restore failed. Nothing here panics on what the disk, the network or the
/// user gives: each case says what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target or source directory is not usable as given.
    #[error("{0}")]
    Directory(String),
    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The backup is not a complete, intact backup of a format this build reads.
    #[error("the backup is not usable: {0}")]
    Corrupt(String),
    /// The cluster refused or could not serve the backup.
    #[error("{0}")]
    Cluster(#[from] crate::ClientError),
    /// The new store could not be made.
    #[error("store: {0}")]
    Store(String),
}

/// An I/O error on `path`.
pub(crate) fn io_error(path: &std::path::Path, error: std::io::Error) -> BackupError {
    BackupError::Io { path: path.display().to_string(), error }
}

/// Fsyncs a directory, so the names created or renamed in it survive a crash.
pub(crate) fn sync_dir(dir: &std::path::Path) -> Result<(), BackupError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

/// Lower-case hex of `bytes` (keys in the manifest: any bytes, readable JSON).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lower-case or upper-case hex `text`.
pub(crate) fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("hex {text:?} has an odd length"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("{text:?} is not hex"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(hex(&[0x01, 0xab, 0xff]), "01abff");
        assert_eq!(unhex("01abff").unwrap(), vec![0x01, 0xab, 0xff]);
        assert_eq!(unhex("").unwrap(), Vec::<u8>::new());
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
        assert!(unhex("é1").is_err());
    }
}
