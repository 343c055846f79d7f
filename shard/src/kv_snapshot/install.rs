//! Installation: the received files staged, ingested and committed, crash-safely.

use super::*;

/// The intent record of an installation under way (`KIND_INSTALLING`): everything needed to
/// finish it after a crash, without the transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InstallIntent {
    /// The snapshot's meta: the applied record step 3 writes.
    pub(super) meta: SnapshotMeta,
    /// The snapshot's range: checked again, and the group's range afterwards.
    pub(super) range: KeyRange,
    /// The install dir's name under [`INSTALL_DIR`].
    pub(super) dir: String,
    /// The files in the install dir, by name, with their lengths and checksums.
    pub(super) files: Vec<(String, FileInfo)>,
}

/// The directory of installations under way.
pub(super) fn install_root(store: &Store) -> PathBuf {
    store.db().path().join(INSTALL_DIR)
}

/// The install dir of one installation: named by group and snapshot, so a stale one is
/// recognised (its group has no intent naming it).
pub(super) fn install_dir_name(group: GroupId, snapshot_id: u64) -> String {
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
pub(super) fn stage(
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
    // The merge state goes with the intent: once recorded, the installation is always
    // finished (after a crash too), so the group's state is the snapshot's from here on.
    let recorded = synced.and_then(|()| {
        write_synced(
            store,
            vec![
                Op::Put(CF_RAFT, group_key(group, KIND_INSTALLING).to_vec(), encode(&intent)?),
                crate::merge::merge_state_op(group, &received.merge)?,
            ],
        )
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
pub(super) fn ingest(store: &Store, group: GroupId, intent: &InstallIntent) -> Result<(), StorageError> {
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
pub(super) enum Installing {
    /// An installation of this module's.
    Files(Box<InstallIntent>),
    /// An installation of the older in-memory path (its snapshot id): the data is in
    /// `KIND_SNAPSHOT_DATA`.
    InMemory,
}

pub(super) fn read_intent(store: &Store, group: GroupId) -> Result<Option<Installing>, StorageError> {
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
    // The intent's range was checked before it was recorded. It may be wider than the group's
    // descriptor says: a snapshot taken after merges this replica missed, over the sources
    // frozen for it here (retired once the group starts).
    if intent.range.start != current_range.start {
        check_snapshot_range(group, current_range, &intent.range)?;
    }
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

/// Loads the files of a snapshot stream that were kept as files (a backup's) into an unused
/// store, for `range`: checked against `files`' lengths and crc32c first, then ingested in one
/// call (atomic), by copy so the originals stay as they were; then the ingested files are
/// checked against what the backup says of them: every key inside `range`, and `keys` keys
/// in all (a crc32c proves a file intact, not that it is this shard's). Blocking. Only for a
/// store no group runs in yet (`flotilla restore` builds a new node's store with it, and
/// throws the store away after an error): nothing else must write into the range, and no
/// applied record is written (the group that forms over the range later starts from this
/// data).
pub fn ingest_copies(
    store: &Store,
    range: &KeyRange,
    keys: u64,
    files: &[(PathBuf, u64, u32)],
) -> Result<(), StorageError> {
    let op = "restore";
    for (path, bytes, crc) in files {
        let got = file_crc(op, path, *bytes)?;
        if got != *crc {
            return Err(StorageError::new(op, format!("{}: crc32c {got:08x}, expected {crc:08x}", path.display())));
        }
    }
    let shown = || range.start.escape_ascii().to_string();
    if files.is_empty() {
        // An empty range: nothing to load, and an unused store holds nothing there.
        if keys != 0 {
            return Err(StorageError::new(op, format!("range from {:?}: no file, but {keys} keys", shown())));
        }
        return Ok(());
    }
    let before = data_files(store)?;
    let mut opts = rocksdb::IngestExternalFileOptions::default();
    opts.set_move_files(false);
    let paths: Vec<PathBuf> = files.iter().map(|(p, _, _)| p.clone()).collect();
    store
        .db()
        .ingest_external_file_cf_opts(store.cf(CF_DATA)?, &opts, paths)
        .map_err(|e| StorageError::new(op, format!("range from {:?}: ingest: {e}", shown())))?;
    let mut found = 0u64;
    let mut ingested = 0usize;
    for f in data_files(store)?.into_iter().filter(|f| !before.iter().any(|b| b.name == f.name)) {
        ingested += 1;
        // A snapshot's first file also holds the range deletion that clears the range before
        // it is loaded: a deletion, whose end (the range's exclusive end) may be the file's
        // largest key.
        found = found.saturating_add(f.num_entries.saturating_sub(f.num_deletions));
        let starts_inside = f.start_key.as_ref().is_some_and(|k| range.contains(k));
        let ends_inside = f
            .end_key
            .as_ref()
            .is_some_and(|k| range.contains(k) || (f.num_deletions > 0 && range.end.as_ref().is_some_and(|e| e == k)));
        if !starts_inside || !ends_inside {
            return Err(StorageError::new(
                op,
                format!(
                    "range from {:?}: a file holds keys {:?}..={:?}, outside the shard's range",
                    shown(),
                    f.start_key.as_deref().map(|k| k.escape_ascii().to_string()),
                    f.end_key.as_deref().map(|k| k.escape_ascii().to_string()),
                ),
            ));
        }
    }
    // RocksDB keeps an ingested file whole (no compaction merges the disjoint files of a
    // restore), so their count and entries are the backup's.
    if ingested != files.len() || found != keys {
        return Err(StorageError::new(
            op,
            format!(
                "range from {:?}: {ingested} files of {found} keys, the backup says {} of {keys}",
                shown(),
                files.len()
            ),
        ));
    }
    Ok(())
}

/// The SST files of the data column family.
fn data_files(store: &Store) -> Result<Vec<rocksdb::LiveFile>, StorageError> {
    let all = store.db().live_files().map_err(|e| StorageError::new("restore", format!("live files: {e}")))?;
    Ok(all.into_iter().filter(|f| f.column_family_name == CF_DATA).collect())
}
