//! The sender: a snapshot built into SST files, read back by offset as one stream.

use super::*;

/// Sender side: a snapshot built on demand, as SST files in the store's scratch dir, read by
/// offset as one stream. Dropping it removes its files; a sender that restarts builds again.
#[derive(Debug)]
pub struct BuiltSnapshot {
    /// The group, for error messages.
    group: GroupId,
    /// The stream's first bytes (prefix and encoded manifest): small, so kept in memory.
    pub(super) header: Vec<u8>,
    /// The SST files in stream order, with their lengths. Every file created is listed (from
    /// its creation on), so a build that fails half-way still removes what it wrote.
    pub(super) files: Vec<(PathBuf, u64)>,
    /// The stream's length: header plus files.
    size_bytes: u64,
    /// Key-value pairs written into the files (a backup's manifest records it).
    keys: u64,
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
        Self::build_at(store, group, range, snapshot_id, file_bytes_max, false, pinned)
    }

    /// [`BuiltSnapshot::build`] for a backup, which is taken beside the group's applies rather
    /// than in their order (as a transfer's snapshot is): the group's descriptor is read at the
    /// same RocksDB snapshot as the data, and a range that differs from `range` (a split
    /// applied since the caller read it) is refused, so that the files never hold keys another
    /// group owned at that point. The caller reads the range again and retries.
    pub fn build_backup(
        store: &Store,
        group: GroupId,
        range: &KeyRange,
        snapshot_id: u64,
        file_bytes_max: u64,
    ) -> Result<(SnapshotMeta, BuiltSnapshot), StorageError> {
        Self::build_at(store, group, range, snapshot_id, file_bytes_max, true, || {})
    }

    fn build_at(
        store: &Store,
        group: GroupId,
        range: &KeyRange,
        snapshot_id: u64,
        file_bytes_max: u64,
        check_descriptor: bool,
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
        let merge = crate::merge::read_merge_state_at(store, &snap, group)?;
        if check_descriptor {
            let raw = snap
                .get_cf(store.cf(CF_META)?, meta_key(group))
                .map_err(|e| StorageError::new("snapshot", e.to_string()))?
                .ok_or_else(|| StorageError::new("snapshot", format!("group {group} has no descriptor here")))?;
            let desc: GroupDescriptor = decode(&raw, || format!("group {group} descriptor"))?;
            if desc.range != *range {
                return Err(StorageError::new(
                    "snapshot",
                    format!("group {group}: its range changed (a split); retry"),
                ));
            }
        }
        pinned();
        let mut built = BuiltSnapshot { group, header: Vec::new(), files: Vec::new(), size_bytes: 0, keys: 0 };
        built.write_files(store, &snap, range, snapshot_id, file_bytes_max)?;
        let mut infos = Vec::with_capacity(built.files.len());
        for (path, bytes) in &built.files {
            infos.push(FileInfo { bytes: *bytes, crc32c: file_crc("snapshot", path, *bytes)? });
        }
        built.header = encode_header(&Manifest { range: range.clone(), files: infos, merge })?;
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
            self.keys += 1;
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

    /// Key-value pairs in the snapshot.
    pub fn key_count(&self) -> u64 {
        self.keys
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
