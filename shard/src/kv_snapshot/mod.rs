//! Snapshots of the key-value state machine as files: built on demand into SST files and read
//! from them by offset (the sender), received chunk by chunk into files (the receiver), and
//! installed by ingesting those files, crash-safely. Plain blocking functions: callers run them
//! off Tokio's worker threads.
//!
//! # The stream
//!
//! `[u8 STREAM_FORMAT_VERSION][u32 BE header length][header][file 0][file 1]...`
//!
//! The header is a record ([`crate::keys::encode`]: record version, crc32c, bincode) of the
//! [`Manifest`]: the key range and, per file, its length and crc32c. The files follow back to
//! back. The receiver checks the header's crc once it has it all, and each file's crc as the
//! file's last byte arrives, so a corrupt transfer is refused at the first bad file rather than
//! at the end, and nothing corrupt ever reaches RocksDB.
//!
//! The files tile the range: file `i` carries a range deletion of `[its first key, the next
//! file's first key)` (the first from the range's start, the last to the range's end), so the
//! files do not overlap and, ingested together in one call (atomic), they clear everything the
//! receiver held in the range and load the snapshot in one step. An empty range has no file.
//!
//! # On disk
//!
//! - Sender: `<db>/flotilla-scratch/snap-<group>-<snapshot id>-<seq>-<n>.sst`, removed when the
//!   [`BuiltSnapshot`] is dropped (and by `Store::open`, which empties the scratch dir).
//! - Receiver, during the transfer: `<db>/flotilla-scratch/recv-<group>-<snapshot id>-<seq>-<n>.sst`,
//!   removed if the transfer is dropped. (`seq`, per process, keeps two builds or transfers of
//!   the same snapshot from sharing, and removing, each other's files.)
//! - Receiver, during the installation: `<db>/flotilla-install/g<group>-s<snapshot id>/<n>.sst`,
//!   outside scratch so a restart keeps it, and the intent record (`KIND_INSTALLING` in the
//!   `raft` column family) naming that directory and its files.
//!
//! # Installation, and a crash in the middle
//!
//! 1. Stage: move the received files into the install dir, fsync it (and its parent), then
//!    write the intent durably. A crash before the intent leaves a directory without an intent:
//!    [`remove_stale_installs`] (run by `Store::open`) removes it, and the group is as before.
//! 2. Ingest every file in one `ingest_external_file_cf_opts` call (atomic: all or none). The
//!    files are ingested through hard links, because `move_files` unlinks what it ingests: the
//!    originals stay in the install dir until step 3 is durable. (RocksDB never writes to an
//!    ingested file: `write_global_seqno` is off by default, so the shared inode is safe.)
//! 3. One synced batch: the applied record from the snapshot's meta, the group's descriptor if
//!    the range narrowed, and the intent deleted. Then the install dir is removed.
//!
//! After a crash anywhere from step 1's intent on, [`finish_interrupted_install`] repeats steps
//! 2 and 3. Repeating the ingestion is harmless: the files' range deletions cover the whole
//! range, so a second ingestion leaves exactly the snapshot's data, and nothing writes into the
//! range in between (the group applies nothing until its installation is finished, and the
//! range is the group's alone). An empty snapshot has no step 2: its range deletion is part of
//! step 3's batch.
//!
//! Not checked by RocksDB: `verify_checksums_before_ingest` is not exposed by the `rocksdb`
//! crate (0.25) we use. Every byte of every file is covered by the stream's crc32c, checked on
//! receipt and again before a repeated ingestion.

use crate::keys::{decode, encode, group_key, meta_key, KIND_APPLIED, KIND_INSTALLING, RECORD_HEADER_BYTES};
use crate::kv::{AppliedRecord, GroupDescriptor, KeyRange, UNBOUNDED_END};
use crate::merge::MergeState;
use crate::store::{Op, Store, CF_DATA, CF_META, CF_RAFT};
use bytes::Bytes;
use flotilla_raft::{GroupId, LogId, SnapshotError, SnapshotMeta, StorageError};
use rocksdb::{Direction, IteratorMode};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Format version of the stream (its first byte); the header record has its own. Version 2
/// added the group's merge state to the header; version 1 streams (no merge state: a group
/// never frozen) are still read.
pub const STREAM_FORMAT_VERSION: u8 = 2;
/// The oldest stream format read.
const STREAM_FORMAT_OLDEST: u8 = 1;
/// Bytes before the header record: the format version and the header's length.
const PREFIX_BYTES: usize = 5;
/// Largest header the receiver buffers: the one thing of a transfer it holds in memory.
pub const HEADER_BYTES_MAX: usize = 4 << 20;
/// Files a snapshot may have (a file is at most ~15 bytes of header): keeps the header small.
pub const SNAPSHOT_FILES_MAX: usize = 65_536;
/// Largest read of a [`BuiltSnapshot`] at once: the caller's chunk is the memory it costs.
pub const READ_BYTES_MAX: u64 = 64 << 20;
/// Buffer for reading a file to checksum it: files are never read into memory whole.
const CHECKSUM_BUFFER_BYTES: usize = 64 << 10;
/// The directory of installations under way, in the database directory (not in scratch, which
/// `Store::open` empties: a crash must not lose files an intent record names).
const INSTALL_DIR: &str = "flotilla-install";

/// What the stream's header says: everything the receiver needs to check the files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    /// The key range of the snapshot.
    range: KeyRange,
    /// The files, in stream order.
    files: Vec<FileInfo>,
    /// The group's merge state at the snapshot's point: a replica caught up by a snapshot
    /// taken while the group was frozen is frozen too.
    merge: MergeState,
}

/// [`Manifest`] as stream format 1 had it.
#[derive(Deserialize)]
struct ManifestV1 {
    range: KeyRange,
    files: Vec<FileInfo>,
}

/// Decodes the header record of a stream of format `version`.
fn decode_manifest(version: u8, record: &[u8], what: impl Fn() -> String) -> Result<Manifest, StorageError> {
    match version {
        1 => {
            let m: ManifestV1 = decode(record, what)?;
            Ok(Manifest { range: m.range, files: m.files, merge: MergeState::default() })
        }
        _ => decode(record, what),
    }
}

/// Whether this build reads streams of format `version`.
fn stream_version_known(version: u8) -> bool {
    (STREAM_FORMAT_OLDEST..=STREAM_FORMAT_VERSION).contains(&version)
}

/// One file of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileInfo {
    /// Its length in bytes (never 0: an SST file always has a footer).
    bytes: u64,
    /// crc32c of its bytes.
    crc32c: u32,
}

/// Tells apart the file names of two builds or transfers of the same snapshot in one process
/// (a leader may start a transfer again while the first one's files are still being dropped).
static FILES_SEQ: AtomicU64 = AtomicU64::new(0);

fn io_err(op: &'static str, what: impl std::fmt::Display, e: impl std::fmt::Display) -> StorageError {
    StorageError::new(op, format!("{what}: {e}"))
}

/// A snapshot's range must be the group's, or inside it: the leader had applied a split this
/// replica has not (the replica adopts the narrower range). Never wider, not even for a
/// replica created empty with a range the map narrowed ahead of Raft: the keys beyond it may
/// belong to a group this node creates meanwhile; that replica waits for a snapshot taken
/// after its leader applied the split. Anything else is a stale, misrouted or corrupt
/// snapshot.
pub(crate) fn check_snapshot_range(g: GroupId, current: &KeyRange, snap: &KeyRange) -> Result<(), StorageError> {
    let nonempty = snap.end.as_ref().is_none_or(|e| *e > snap.start);
    if nonempty && current.covers(snap) {
        Ok(())
    } else {
        Err(StorageError::new("install_snapshot", format!("group {g}: snapshot of a key range outside the group's")))
    }
}

/// The exclusive end of `range` as a key (a range with no end ends above every key).
fn range_end(range: &KeyRange) -> Vec<u8> {
    range.end.clone().unwrap_or_else(|| UNBOUNDED_END.to_vec())
}

/// crc32c of the file at `path`, read in small pieces, checking it has `bytes` bytes.
fn file_crc(op: &'static str, path: &Path, bytes: u64) -> Result<u32, StorageError> {
    let mut f = File::open(path).map_err(|e| io_err(op, path.display(), e))?;
    let mut buf = vec![0u8; CHECKSUM_BUFFER_BYTES];
    let (mut crc, mut total) = (0u32, 0u64);
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(op, path.display(), e))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        total += n as u64;
    }
    if total != bytes {
        return Err(StorageError::new(op, format!("{}: {total} bytes, expected {bytes}", path.display())));
    }
    Ok(crc)
}

/// Fsyncs a directory, so the names created or moved into it survive a crash.
fn sync_dir(op: &'static str, dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(op, dir.display(), e))
}

/// Writes `ops` durably through the store's writer (one fsync, and a poisoned store refuses),
/// waiting for the outcome: the writer is the only durable writer of the store.
fn write_synced(store: &Store, ops: Vec<Op>) -> Result<(), StorageError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    store.submit(
        ops,
        true,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )?;
    rx.recv().map_err(|_| StorageError::new("install_snapshot", "the store's writer stopped before answering"))?
}

/// The key range of a snapshot, read from the first bytes of its stream (a transfer's first
/// chunk), if they hold the whole header and it is intact; `None` otherwise. For deciding
/// early whether to receive a snapshot at all: the receiver checks everything again.
pub fn stream_range(first: &[u8]) -> Option<KeyRange> {
    if first.len() < PREFIX_BYTES || !stream_version_known(first[0]) {
        return None;
    }
    let len = u32::from_be_bytes([first[1], first[2], first[3], first[4]]) as usize;
    let record = first.get(PREFIX_BYTES..PREFIX_BYTES.checked_add(len)?)?;
    let manifest = decode_manifest(first[0], record, || "snapshot header".to_string()).ok()?;
    Some(manifest.range)
}

/// What a stream's header says, for a reader outside this module (a backup keeps each file of
/// the stream as a file of its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// The key range of the snapshot.
    pub range: KeyRange,
    /// Each file's length in bytes and crc32c, in stream order; the files follow the header
    /// back to back.
    pub files: Vec<(u64, u32)>,
    /// The header's length in bytes (where the first file starts in the stream).
    pub header_bytes: u64,
}

/// The header's length from a stream's first [`STREAM_PREFIX_BYTES`] bytes (version and
/// length), or why they are not a stream's.
pub fn stream_header_len(prefix: &[u8]) -> Result<u64, String> {
    if prefix.len() < PREFIX_BYTES {
        return Err(format!("{} bytes are too few for a snapshot stream's prefix", prefix.len()));
    }
    if !stream_version_known(prefix[0]) {
        return Err(format!(
            "snapshot stream format {} is not supported (this build reads {STREAM_FORMAT_OLDEST} to {STREAM_FORMAT_VERSION})",
            prefix[0]
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > HEADER_BYTES_MAX {
        return Err(format!("snapshot header of {len} bytes exceeds the limit of {HEADER_BYTES_MAX}"));
    }
    Ok((PREFIX_BYTES + len) as u64)
}

/// Reads a stream's whole header (`bytes` starts with it and holds at least
/// [`stream_header_len`] bytes), checking its crc.
pub fn decode_stream_header(bytes: &[u8]) -> Result<StreamHeader, String> {
    let len = stream_header_len(bytes)? as usize;
    let record =
        bytes.get(PREFIX_BYTES..len).ok_or_else(|| format!("snapshot header cut short at {} bytes", bytes.len()))?;
    let manifest = decode_manifest(bytes[0], record, || "snapshot header".to_string()).map_err(|e| e.to_string())?;
    Ok(StreamHeader {
        range: manifest.range,
        files: manifest.files.iter().map(|f| (f.bytes, f.crc32c)).collect(),
        header_bytes: len as u64,
    })
}

/// Bytes of a stream before its header record: the format version and the header's length.
pub const STREAM_PREFIX_BYTES: usize = PREFIX_BYTES;

/// The stream's first bytes for `manifest`: version, length, record.
fn encode_header(manifest: &Manifest) -> Result<Vec<u8>, StorageError> {
    let record = encode(manifest)?;
    assert!(record.len() <= HEADER_BYTES_MAX, "a manifest of at most {SNAPSHOT_FILES_MAX} files is small");
    let mut out = Vec::with_capacity(PREFIX_BYTES + record.len());
    out.push(STREAM_FORMAT_VERSION);
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(&record);
    Ok(out)
}

mod build;
mod install;
mod receive;

pub use build::BuiltSnapshot;
pub(crate) use install::remove_stale_installs;
pub use install::{finish_interrupted_install, ingest_copies, install};
pub use receive::{ReceivedSnapshot, ReceivingSnapshot};

#[cfg(test)]
mod tests;
