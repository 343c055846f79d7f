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

/// Format version of the stream (its first byte); the header record has its own.
pub const STREAM_FORMAT_VERSION: u8 = 1;
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
    if first.len() < PREFIX_BYTES || first[0] != STREAM_FORMAT_VERSION {
        return None;
    }
    let len = u32::from_be_bytes([first[1], first[2], first[3], first[4]]) as usize;
    let record = first.get(PREFIX_BYTES..PREFIX_BYTES.checked_add(len)?)?;
    let manifest: Manifest = decode(record, || "snapshot header".to_string()).ok()?;
    Some(manifest.range)
}

// ---------------------------------------------------------------------------------------------
// Sender
// ---------------------------------------------------------------------------------------------

/// Sender side: a snapshot built on demand, as SST files in the store's scratch dir, read by
/// offset as one stream. Dropping it removes its files; a sender that restarts builds again.
#[derive(Debug)]
pub struct BuiltSnapshot {
    /// The group, for error messages.
    group: GroupId,
    /// The stream's first bytes (prefix and encoded manifest): small, so kept in memory.
    header: Vec<u8>,
    /// The SST files in stream order, with their lengths. Every file created is listed (from
    /// its creation on), so a build that fails half-way still removes what it wrote.
    files: Vec<(PathBuf, u64)>,
    /// The stream's length: header plus files.
    size_bytes: u64,
}

/// The SST file a build is writing.
struct OpenSst<'o> {
    writer: rocksdb::SstFileWriter<'o>,
    /// Where its range deletion starts: the range's start for the first file, its first key
    /// for the others.
    start: Vec<u8>,
    /// Bytes of keys and values put in it: the measure of `file_bytes_max`.
    kv_bytes: u64,
}

impl BuiltSnapshot {
    /// Builds the snapshot of `group` over `range` at one RocksDB snapshot (`db.snapshot()`):
    /// the applied record and the data are read at the same point. The range's key-values go
    /// into SST files of at most `file_bytes_max` bytes of keys and values each (a file holds
    /// at least one pair, so a single pair larger than the limit gets a file of its own; on
    /// disk a file is that, compressed, plus its index and footer). An empty range gives no
    /// file. Files are written and checksummed in a streaming way, never read into memory.
    ///
    /// Returns the snapshot's meta (the applied id and membership, `snapshot_id`, and the
    /// stream's length as `size_bytes`) and the handle to read the stream from.
    pub fn build(
        store: &Store,
        group: GroupId,
        range: &KeyRange,
        snapshot_id: u64,
        file_bytes_max: u64,
    ) -> Result<(SnapshotMeta, BuiltSnapshot), StorageError> {
        Self::build_pinned(store, group, range, snapshot_id, file_bytes_max, || {})
    }

    /// [`BuiltSnapshot::build`], calling `pinned` as soon as the point in time is fixed (the
    /// RocksDB snapshot taken and the applied record read), before the files are written: from
    /// then on the group may apply more entries, which the snapshot will not include.
    pub fn build_pinned(
        store: &Store,
        group: GroupId,
        range: &KeyRange,
        snapshot_id: u64,
        file_bytes_max: u64,
        pinned: impl FnOnce(),
    ) -> Result<(SnapshotMeta, BuiltSnapshot), StorageError> {
        assert!(file_bytes_max > 0, "file_bytes_max must be positive");
        let snap = store.db().snapshot();
        let applied: AppliedRecord = match snap
            .get_cf(store.cf(CF_RAFT)?, group_key(group, KIND_APPLIED))
            .map_err(|e| StorageError::new("snapshot", e.to_string()))?
        {
            Some(b) => decode(&b, || format!("group {group} applied state"))?,
            None => AppliedRecord::default(),
        };
        pinned();
        let mut built = BuiltSnapshot { group, header: Vec::new(), files: Vec::new(), size_bytes: 0 };
        built.write_files(store, &snap, range, snapshot_id, file_bytes_max)?;
        let mut infos = Vec::with_capacity(built.files.len());
        for (path, bytes) in &built.files {
            infos.push(FileInfo { bytes: *bytes, crc32c: file_crc("snapshot", path, *bytes)? });
        }
        built.header = encode_header(&Manifest { range: range.clone(), files: infos })?;
        built.size_bytes = built.header.len() as u64 + built.files.iter().map(|(_, b)| b).sum::<u64>();
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied.unwrap_or_default(),
            membership: applied.membership,
            snapshot_id,
            size_bytes: built.size_bytes,
        };
        Ok((meta, built))
    }

    /// Writes the range's key-values, read at `snap`, into SST files tiling the range.
    fn write_files(
        &mut self,
        store: &Store,
        snap: &rocksdb::Snapshot<'_>,
        range: &KeyRange,
        snapshot_id: u64,
        file_bytes_max: u64,
    ) -> Result<(), StorageError> {
        let g = self.group;
        let err = |e: rocksdb::Error| StorageError::new("snapshot", format!("group {g}: {e}"));
        let opts = store.data_options();
        let mut read = rocksdb::ReadOptions::default();
        // A snapshot is read once: do not push the node's working set out of the cache.
        read.fill_cache(false);
        if let Some(end) = &range.end {
            read.set_iterate_upper_bound(end.clone());
        }
        let seq = FILES_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut open: Option<OpenSst> = None;
        for item in snap.iterator_cf_opt(store.cf(CF_DATA)?, read, IteratorMode::From(&range.start, Direction::Forward))
        {
            let (k, v) = item.map_err(err)?;
            debug_assert!(range.contains(&k));
            let pair_bytes = (k.len() + v.len()) as u64;
            if let Some(o) = open.take_if(|o| o.kv_bytes > 0 && o.kv_bytes + pair_bytes > file_bytes_max) {
                self.close(o, &k)?;
            }
            let o = match &mut open {
                Some(o) => o,
                None => {
                    if self.files.len() >= SNAPSHOT_FILES_MAX {
                        return Err(StorageError::new(
                            "snapshot",
                            format!("group {g}: more than {SNAPSHOT_FILES_MAX} files; raise file_bytes_max"),
                        ));
                    }
                    let name = format!("snap-{}-{snapshot_id}-{seq}-{}.sst", g.0, self.files.len());
                    let path = store.scratch_path(&name)?;
                    let writer = rocksdb::SstFileWriter::create(&opts);
                    self.files.push((path.clone(), 0));
                    writer.open(&path).map_err(err)?;
                    let start = if self.files.len() == 1 { range.start.clone() } else { k.to_vec() };
                    open.insert(OpenSst { writer, start, kv_bytes: 0 })
                }
            };
            o.writer.put(&k, &v).map_err(err)?;
            o.kv_bytes += pair_bytes;
        }
        if let Some(o) = open.take() {
            self.close(o, &range_end(range))?;
        }
        Ok(())
    }

    /// Finishes the last file opened: its range deletion up to `end` (the next file's first
    /// key, or the range's end), then its length.
    fn close(&mut self, mut o: OpenSst<'_>, end: &[u8]) -> Result<(), StorageError> {
        let Some((path, bytes)) = self.files.last_mut() else {
            unreachable!("a file is open, so it is listed");
        };
        let err = |e: rocksdb::Error| StorageError::new("snapshot", format!("{}: {e}", path.display()));
        o.writer.delete_range(o.start.as_slice(), end).map_err(err)?;
        o.writer.finish().map_err(err)?;
        *bytes = std::fs::metadata(&*path).map_err(|e| io_err("snapshot", path.display(), e))?.len();
        Ok(())
    }

    /// The stream's length in bytes (`size_bytes` of the meta).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes `offset..offset + len` of the stream, read from the header and by positioned
    /// reads of the files (only the bytes asked for are read). At most [`READ_BYTES_MAX`].
    pub fn read(&self, offset: u64, len: u64) -> Result<Bytes, StorageError> {
        let g = self.group;
        let end = offset.checked_add(len).filter(|e| *e <= self.size_bytes).ok_or_else(|| {
            StorageError::new(
                "read_snapshot",
                format!("group {g}: read of {len} bytes at {offset} is past the snapshot's end ({})", self.size_bytes),
            )
        })?;
        if len > READ_BYTES_MAX {
            return Err(StorageError::new(
                "read_snapshot",
                format!("group {g}: read of {len} bytes exceeds the limit of {READ_BYTES_MAX}"),
            ));
        }
        let mut out = vec![0u8; len as usize];
        let header_len = self.header.len() as u64;
        if offset < header_len {
            let (from, to) = (offset as usize, end.min(header_len) as usize);
            out[..to - from].copy_from_slice(&self.header[from..to]);
        }
        let mut file_start = header_len;
        for (path, bytes) in &self.files {
            let file_end = file_start + bytes;
            let (from, to) = (offset.max(file_start), end.min(file_end));
            if from < to {
                let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
                File::open(path)
                    .and_then(|f| f.read_exact_at(dst, from - file_start))
                    .map_err(|e| io_err("read_snapshot", path.display(), e))?;
            }
            file_start = file_end;
        }
        Ok(Bytes::from(out))
    }
}

impl Drop for BuiltSnapshot {
    fn drop(&mut self) {
        for (path, _) in &self.files {
            let _ = std::fs::remove_file(path);
        }
    }
}

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

// ---------------------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------------------

/// Receiver side: the chunks of one transfer, in order, appended to files in the store's
/// scratch dir. Memory is bounded by construction: only the header is buffered (at most
/// [`HEADER_BYTES_MAX`]); file bytes are written straight to their file, and each file's crc32c
/// is computed as the bytes pass. Dropping it before [`ReceivingSnapshot::finish`] removes its
/// files (and `Store::open` empties scratch after a crash).
#[derive(Debug)]
pub struct ReceivingSnapshot {
    /// The group, for error messages.
    group: GroupId,
    /// The snapshot being received; `size_bytes` bounds the stream.
    meta: SnapshotMeta,
    /// The scratch directory, where the files are created.
    scratch: PathBuf,
    /// Names this transfer's files: `recv-<group>-<snapshot id>-<seq>`.
    name_prefix: String,
    /// Bytes of the stream received so far: the offset the next chunk must have.
    received: u64,
    /// The stream's first bytes, until the whole header is in.
    header: Vec<u8>,
    /// The decoded header, once it is in.
    manifest: Option<Manifest>,
    /// Files created, in stream order (removed on drop unless handed over by `finish`).
    files: Vec<PathBuf>,
    /// The file being received, if one is open.
    current: Option<IncomingFile>,
    /// Set when corrupt data was refused: the transfer cannot continue.
    broken: bool,
}

/// The file a transfer is writing.
#[derive(Debug)]
struct IncomingFile {
    file: File,
    /// Bytes written to it.
    written: u64,
    /// crc32c of those bytes.
    crc32c: u32,
}

impl ReceivingSnapshot {
    /// Starts receiving the snapshot `meta` describes for `group`.
    pub fn begin(store: &Store, group: GroupId, meta: &SnapshotMeta) -> Result<ReceivingSnapshot, SnapshotError> {
        if meta.size_bytes < PREFIX_BYTES as u64 {
            return Err(SnapshotError::Refused(format!(
                "group {group}: a snapshot of {} bytes is too short to be one",
                meta.size_bytes
            )));
        }
        let seq = FILES_SEQ.fetch_add(1, Ordering::Relaxed);
        Ok(ReceivingSnapshot {
            group,
            meta: meta.clone(),
            scratch: store.scratch_dir().to_path_buf(),
            name_prefix: format!("recv-{}-{}-{seq}", group.0, meta.snapshot_id),
            received: 0,
            header: Vec::new(),
            manifest: None,
            files: Vec::new(),
            current: None,
            broken: false,
        })
    }

    /// The snapshot being received.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Bytes received so far: the offset the next chunk must start at.
    pub fn received_bytes(&self) -> u64 {
        self.received
    }

    /// The snapshot's key range, once the header is in (to refuse a transfer early).
    pub fn range(&self) -> Option<&KeyRange> {
        self.manifest.as_ref().map(|m| &m.range)
    }

    /// A refusal: the bytes are not this snapshot's (lost, repeated, corrupt).
    fn err(&self, message: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Refused(format!("group {} snapshot {}: {message}", self.group, self.meta.snapshot_id))
    }

    /// The next bytes of the stream. `offset` must be the bytes received so far: a lost or a
    /// repeated chunk is refused (and changes nothing: the transfer can go on from
    /// [`ReceivingSnapshot::received_bytes`]), as are bytes beyond the snapshot's size. A
    /// corrupt header or file is refused, and the transfer with it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), SnapshotError> {
        if self.broken {
            return Err(self.err("an earlier chunk was corrupt; the transfer must start again"));
        }
        if offset != self.received {
            return Err(self.err(format_args!(
                "chunk at offset {offset}, expected offset {} (a chunk was lost or repeated)",
                self.received
            )));
        }
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= self.meta.size_bytes);
        if end.is_none() {
            return Err(self.err(format_args!(
                "chunk of {} bytes at offset {offset} goes past the snapshot's size of {} bytes",
                data.len(),
                self.meta.size_bytes
            )));
        }
        let mut rest = data;
        while !rest.is_empty() {
            let taken = if self.manifest.is_none() { self.take_header(rest) } else { self.take_file_bytes(rest) };
            let n = match taken {
                Ok(n) => n,
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            };
            debug_assert!(n > 0 && n <= rest.len());
            rest = &rest[n..];
            self.received += n as u64;
        }
        Ok(())
    }

    /// Takes header bytes from `data` (up to the header's end); decodes the header once whole.
    fn take_header(&mut self, data: &[u8]) -> Result<usize, SnapshotError> {
        let want = if self.header.len() < PREFIX_BYTES {
            PREFIX_BYTES
        } else {
            PREFIX_BYTES + u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]) as usize
        };
        let n = (want - self.header.len()).min(data.len());
        self.header.extend_from_slice(&data[..n]);
        if self.header[0] != STREAM_FORMAT_VERSION {
            return Err(self.err(format_args!(
                "stream format version {} is not supported (this build reads {STREAM_FORMAT_VERSION})",
                self.header[0]
            )));
        }
        if self.header.len() == PREFIX_BYTES {
            let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]) as usize;
            if !(RECORD_HEADER_BYTES..=HEADER_BYTES_MAX).contains(&len) {
                return Err(self.err(format_args!(
                    "header length {len} is outside {RECORD_HEADER_BYTES}..={HEADER_BYTES_MAX}: corrupt header"
                )));
            }
        } else if self.header.len() == want {
            let manifest: Manifest = decode(&self.header[PREFIX_BYTES..], || {
                format!("group {} snapshot {} header", self.group, self.meta.snapshot_id)
            })
            .map_err(|e| SnapshotError::Refused(e.to_string()))?;
            self.check_manifest(&manifest)?;
            self.manifest = Some(manifest);
            self.header = Vec::new();
        }
        Ok(n)
    }

    /// Whether the header agrees with the meta and the limits.
    fn check_manifest(&self, m: &Manifest) -> Result<(), SnapshotError> {
        if m.files.len() > SNAPSHOT_FILES_MAX || m.files.iter().any(|f| f.bytes == 0) {
            return Err(self.err(format_args!("header lists {} files, or an empty one", m.files.len())));
        }
        let total = m.files.iter().try_fold(self.header.len() as u64, |sum, f| sum.checked_add(f.bytes));
        if total != Some(self.meta.size_bytes) {
            return Err(self.err(format_args!(
                "header and files make {total:?} bytes, the snapshot's size is {}",
                self.meta.size_bytes
            )));
        }
        Ok(())
    }

    /// Writes bytes of the current file from `data` (up to the file's end); checks the file's
    /// checksum and fsyncs it at its last byte.
    fn take_file_bytes(&mut self, data: &[u8]) -> Result<usize, SnapshotError> {
        let index = self.files.len() - usize::from(self.current.is_some());
        let Some(info) = self.manifest.as_ref().and_then(|m| m.files.get(index)).copied() else {
            return Err(self.err("bytes beyond the header's last file"));
        };
        if self.current.is_none() {
            let path = self.scratch.join(format!("{}-{index}.sst", self.name_prefix));
            let file = File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| SnapshotError::Storage(io_err("receive_snapshot", path.display(), e)))?;
            self.files.push(path);
            self.current = Some(IncomingFile { file, written: 0, crc32c: 0 });
        }
        let path = &self.files[index];
        let Some(cur) = self.current.as_mut() else { unreachable!("opened above") };
        let n = ((info.bytes - cur.written).min(data.len() as u64)) as usize;
        cur.file
            .write_all(&data[..n])
            .map_err(|e| SnapshotError::Storage(io_err("receive_snapshot", path.display(), e)))?;
        cur.crc32c = crc32c::crc32c_append(cur.crc32c, &data[..n]);
        cur.written += n as u64;
        if cur.written < info.bytes {
            return Ok(n);
        }
        let Some(done) = self.current.take() else { unreachable!("opened above") };
        if done.crc32c != info.crc32c {
            return Err(self.err(format_args!(
                "file {index} ({}) is corrupt: its bytes have crc32c {:08x}, the header says {:08x}",
                self.files[index].display(),
                done.crc32c,
                info.crc32c
            )));
        }
        done.file
            .sync_all()
            .map_err(|e| SnapshotError::Storage(io_err("receive_snapshot", self.files[index].display(), e)))?;
        Ok(n)
    }

    /// Every byte arrived and every checksum matched (each file was fsynced at its end):
    /// returns what [`install`] needs. An incomplete or refused transfer is an error.
    pub fn finish(mut self) -> Result<ReceivedSnapshot, SnapshotError> {
        if self.broken || self.received != self.meta.size_bytes {
            return Err(self.err(format_args!(
                "transfer incomplete: {} of {} bytes received{}",
                self.received,
                self.meta.size_bytes,
                if self.broken { ", and a chunk was corrupt" } else { "" }
            )));
        }
        let Some(manifest) = self.manifest.take() else {
            unreachable!("the size check covers the header");
        };
        debug_assert!(self.current.is_none() && self.files.len() == manifest.files.len());
        Ok(ReceivedSnapshot {
            group: self.group,
            meta: self.meta.clone(),
            range: manifest.range,
            files: std::mem::take(&mut self.files).into_iter().zip(manifest.files).collect(),
        })
    }
}

impl Drop for ReceivingSnapshot {
    fn drop(&mut self) {
        self.current = None;
        for path in &self.files {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A snapshot received whole and checked, its files in scratch, ready for [`install`].
/// Dropping it without installing removes its files.
#[derive(Debug)]
pub struct ReceivedSnapshot {
    /// The group it was received for.
    group: GroupId,
    /// Its meta.
    meta: SnapshotMeta,
    /// Its key range, from the header.
    range: KeyRange,
    /// Its files, in stream order, with what the header said of each.
    files: Vec<(PathBuf, FileInfo)>,
}

impl ReceivedSnapshot {
    /// The snapshot's meta.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }
    /// The snapshot's key range.
    pub fn range(&self) -> &KeyRange {
        &self.range
    }
}

impl Drop for ReceivedSnapshot {
    fn drop(&mut self) {
        for (path, _) in &self.files {
            let _ = std::fs::remove_file(path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Installation
// ---------------------------------------------------------------------------------------------

/// The intent record of an installation under way (`KIND_INSTALLING`): everything needed to
/// finish it after a crash, without the transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct InstallIntent {
    /// The snapshot's meta: the applied record step 3 writes.
    meta: SnapshotMeta,
    /// The snapshot's range: checked again, and the group's range afterwards.
    range: KeyRange,
    /// The install dir's name under [`INSTALL_DIR`].
    dir: String,
    /// The files in the install dir, by name, with their lengths and checksums.
    files: Vec<(String, FileInfo)>,
}

/// The directory of installations under way.
fn install_root(store: &Store) -> PathBuf {
    store.db().path().join(INSTALL_DIR)
}

/// The install dir of one installation: named by group and snapshot, so a stale one is
/// recognised (its group has no intent naming it).
fn install_dir_name(group: GroupId, snapshot_id: u64) -> String {
    format!("g{}-s{snapshot_id}", group.0)
}

/// Installs a received snapshot of `group`, whose range is `current_range` now; returns the
/// group's range afterwards (the snapshot's: narrower if the leader applied a split this
/// replica missed). Blocking. Crash-safe: see the module's doc; after a crash, start-up runs
/// [`finish_interrupted_install`] before the group applies anything. An error once the intent
/// is recorded leaves it (a storage error stops the group): start-up finishes the installation,
/// and until then another one is refused.
///
/// Never writes the data's key-values through memory: the files go from scratch to RocksDB by
/// rename and hard link.
pub fn install(
    store: &Store,
    group: GroupId,
    current_range: &KeyRange,
    received: ReceivedSnapshot,
) -> Result<KeyRange, StorageError> {
    let intent = stage(store, group, current_range, received)?;
    crash_point("install_staged");
    ingest(store, group, &intent)?;
    crash_point("install_ingested");
    commit(store, group, &intent)
}

/// Names the point where a crash test kills the process: with `FLOTILLA_CRASH_AT=<point>` in
/// the environment the process aborts there (no destructor runs, as with `kill -9`). Read once;
/// unset in production, where this is one comparison.
fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("FLOTILLA_CRASH_AT").ok()).as_deref() == Some(point) {
        eprintln!("crash point {point}: aborting");
        std::process::abort();
    }
}

/// Step 1: moves the files into the install dir, makes the move durable, then records the
/// intent durably.
fn stage(
    store: &Store,
    group: GroupId,
    current_range: &KeyRange,
    mut received: ReceivedSnapshot,
) -> Result<InstallIntent, StorageError> {
    assert_eq!(received.group, group, "a snapshot is installed into the group it was received for");
    check_snapshot_range(group, current_range, &received.range)?;
    if read_intent(store, group)?.is_some() {
        return Err(StorageError::new(
            "install_snapshot",
            format!("group {group}: an earlier installation is unfinished (finish_interrupted_install first)"),
        ));
    }
    let root = install_root(store);
    let name = install_dir_name(group, received.meta.snapshot_id);
    let dir = root.join(&name);
    // Without an intent, a directory of that name is a leftover of an attempt that failed
    // before recording it (or a snapshot id used again): nothing refers to it.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io_err("install_snapshot", dir.display(), e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| io_err("install_snapshot", dir.display(), e))?;
    let mut files = Vec::with_capacity(received.files.len());
    for (i, (path, info)) in std::mem::take(&mut received.files).into_iter().enumerate() {
        let file_name = format!("{i:06}.sst");
        let to = dir.join(&file_name);
        // Same file system (both under the database dir): a rename, no copy.
        if let Err(e) = std::fs::rename(&path, &to) {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io_err("install_snapshot", format!("{} -> {}", path.display(), to.display()), e));
        }
        files.push((file_name, info));
    }
    let synced = sync_dir("install_snapshot", &dir).and_then(|()| sync_dir("install_snapshot", &root));
    let intent = InstallIntent { meta: received.meta.clone(), range: received.range.clone(), dir: name, files };
    let recorded = synced.and_then(|()| {
        write_synced(store, vec![Op::Put(CF_RAFT, group_key(group, KIND_INSTALLING).to_vec(), encode(&intent)?)])
    });
    if let Err(e) = recorded {
        // No intent (or not known to be durable): the dir is garbage; start-up removes it too.
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(intent)
}

/// Step 2: ingests every file of the intent in one call (atomic). Through hard links: RocksDB
/// moves what it ingests (unlinks the source), and the originals must stay until step 3 is
/// durable, for a crash in between to be finished by ingesting again.
fn ingest(store: &Store, group: GroupId, intent: &InstallIntent) -> Result<(), StorageError> {
    if intent.files.is_empty() {
        return Ok(());
    }
    if let Some(e) = store.poisoned() {
        return Err(e);
    }
    let dir = install_root(store).join(&intent.dir);
    let mut links = Vec::with_capacity(intent.files.len());
    for (name, _) in &intent.files {
        let link = dir.join(format!("{name}.ingest"));
        // A link left by an ingestion a crash interrupted: make it afresh.
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("install_snapshot", link.display(), e)),
        }
        std::fs::hard_link(dir.join(name), &link).map_err(|e| io_err("install_snapshot", link.display(), e))?;
        links.push(link);
    }
    let mut opts = rocksdb::IngestExternalFileOptions::default();
    opts.set_move_files(true);
    let r = store.db().ingest_external_file_cf_opts(store.cf(CF_DATA)?, &opts, links.clone());
    for link in &links {
        // Gone after a successful move; left after a failure.
        let _ = std::fs::remove_file(link);
    }
    r.map_err(|e| StorageError::new("install_snapshot", format!("group {group}: ingest: {e}")))
}

/// Step 3: the applied record, the narrowed descriptor and the intent's deletion in one synced
/// batch (for an empty snapshot, with the range deletion); then the install dir goes.
fn commit(store: &Store, group: GroupId, intent: &InstallIntent) -> Result<KeyRange, StorageError> {
    let range = &intent.range;
    let mut ops = Vec::new();
    if intent.files.is_empty() {
        ops.push(Op::DeleteRange(CF_DATA, range.start.clone(), range_end(range)));
    }
    let applied = AppliedRecord {
        last_applied: Some(intent.meta.last_log_id).filter(|l| *l != LogId::default()),
        membership: intent.meta.membership.clone(),
    };
    ops.push(Op::Put(CF_RAFT, group_key(group, KIND_APPLIED).to_vec(), encode(&applied)?));
    ops.push(Op::Delete(CF_RAFT, group_key(group, KIND_INSTALLING).to_vec()));
    // A snapshot taken after a split this replica missed: the group's descriptor narrows too.
    let raw = store
        .db()
        .get_cf(store.cf(CF_META)?, meta_key(group))
        .map_err(|e| StorageError::new("install_snapshot", e.to_string()))?;
    if let Some(raw) = raw {
        let mut desc: GroupDescriptor = decode(&raw, || format!("group {group} descriptor"))?;
        if desc.range != *range {
            desc.range = range.clone();
            ops.push(Op::Put(CF_META, meta_key(group).to_vec(), encode(&desc)?));
        }
    }
    write_synced(store, ops)?;
    let dir = install_root(store).join(&intent.dir);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        // Harmless: without its intent the dir is stale, and start-up removes it.
        tracing::warn!(group = %group, dir = %dir.display(), error = %e, "cannot remove a finished install dir");
    }
    Ok(range.clone())
}

/// What `KIND_INSTALLING` holds for `group`.
enum Installing {
    /// An installation of this module's.
    Files(Box<InstallIntent>),
    /// An installation of the older in-memory path (its snapshot id): the data is in
    /// `KIND_SNAPSHOT_DATA`.
    InMemory,
}

fn read_intent(store: &Store, group: GroupId) -> Result<Option<Installing>, StorageError> {
    let raw = store
        .db()
        .get_cf(store.cf(CF_RAFT)?, group_key(group, KIND_INSTALLING))
        .map_err(|e| StorageError::new("read", e.to_string()))?;
    let Some(raw) = raw else { return Ok(None) };
    // The older record is a bare snapshot id: a payload of one integer, which an intent's
    // payload (several fields) never is, so trying it first cannot mistake one for the other.
    if decode::<u64>(&raw, String::new).is_ok() {
        return Ok(Some(Installing::InMemory));
    }
    decode(&raw, || format!("group {group} install intent")).map(|i| Some(Installing::Files(Box::new(i))))
}

/// Finishes an installation of `group` a crash interrupted (steps 2 and 3 again, after checking
/// the staged files), if there is one; returns the group's range afterwards. Run at start-up
/// before the group applies anything. Idempotent.
pub fn finish_interrupted_install(
    store: &Store,
    group: GroupId,
    current_range: &KeyRange,
) -> Result<Option<KeyRange>, StorageError> {
    let intent = match read_intent(store, group)? {
        None => return Ok(None),
        Some(Installing::InMemory) => {
            return Err(StorageError::new(
                "install_snapshot",
                format!(
                    "group {group}: an installation begun by an older version (its snapshot kept in \
                     RocksDB) was interrupted, and this version cannot finish it; remove the replica \
                     and let it be created again from its peers"
                ),
            ))
        }
        Some(Installing::Files(intent)) => *intent,
    };
    tracing::warn!(group = %group, snapshot = intent.meta.snapshot_id, "finishing a snapshot installation interrupted by a crash");
    check_snapshot_range(group, current_range, &intent.range)?;
    let dir = install_root(store).join(&intent.dir);
    for (name, info) in &intent.files {
        // Checked before anything reaches RocksDB: the files sat on disk across a crash.
        let crc = file_crc("install_snapshot", &dir.join(name), info.bytes).map_err(|e| {
            StorageError::new(
                "install_snapshot",
                format!("group {group}: interrupted installation cannot be finished: {}", e.message),
            )
        })?;
        if crc != info.crc32c {
            return Err(StorageError::new(
                "install_snapshot",
                format!(
                    "group {group}: staged file {} is corrupt: crc32c {crc:08x}, the header said {:08x}",
                    dir.join(name).display(),
                    info.crc32c
                ),
            ));
        }
    }
    ingest(store, group, &intent)?;
    commit(store, group, &intent).map(Some)
}

/// Removes install dirs no intent names (an installation that failed or crashed before its
/// intent was durable, or finished but not yet cleaned up). `Store::open` runs it, before any
/// installation can start. Returns how many it removed.
pub(crate) fn remove_stale_installs(store: &Store) -> Result<usize, StorageError> {
    let root = install_root(store);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("open", root.display(), e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("open", root.display(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let group = name.strip_prefix('g').and_then(|r| r.split('-').next()).and_then(|g| g.parse::<u64>().ok());
        let named = match group.map(|g| read_intent(store, GroupId(g))) {
            Some(Ok(intent)) => matches!(intent, Some(Installing::Files(i)) if i.dir == name),
            // An unreadable intent might name it: keep it (the installation will report it).
            Some(Err(_)) => true,
            None => false,
        };
        if !named {
            let path = entry.path();
            let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            r.map_err(|e| io_err("open", path.display(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
