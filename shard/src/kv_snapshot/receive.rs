//! The receiver: a transfer's chunks appended to files in scratch, checked as they arrive.

use super::*;

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
        if !stream_version_known(self.header[0]) {
            return Err(self.err(format_args!(
                "stream format version {} is not supported (this build reads {STREAM_FORMAT_OLDEST} to {STREAM_FORMAT_VERSION})",
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
            let manifest = decode_manifest(self.header[0], &self.header[PREFIX_BYTES..], || {
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
            merge: manifest.merge,
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
    pub(super) group: GroupId,
    /// Its meta.
    pub(super) meta: SnapshotMeta,
    /// Its key range, from the header.
    pub(super) range: KeyRange,
    /// Its files, in stream order, with what the header said of each.
    pub(super) files: Vec<(PathBuf, FileInfo)>,
    /// The group's merge state at the snapshot's point.
    pub(super) merge: MergeState,
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
