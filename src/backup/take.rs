//! Taking a backup: each shard copied on its leader, in key order, its stream read in chunks
//! and kept as files, then the manifest written last.

use super::manifest::{FileEntry, Manifest, ShardEntry, BACKUP_FORMAT_VERSION};
use super::{hex, io_error, sync_dir, BackupError, Progress, MANIFEST_FILE};
use crate::client::{Client, ClientConfig, ClientError};
use crate::meta::USER_KEYS_START;
use crate::placement::{NodeId, ShardId};
use crate::shard::kv_snapshot::{decode_stream_header, stream_header_len, StreamHeader, STREAM_PREFIX_BYTES};
use crate::wire::{AdminRequest, AdminResponse, BackupShard, BACKUP_CHUNK_BYTES_MAX};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long one request of a backup may take: a shard's copy is built before its answer, a
/// few seconds for a shard of the default split size (128 MiB) on a slow disk.
const BACKUP_REQUEST_TIMEOUT_S: u64 = 120;
/// How long a shard's copy may take to start, redirects and retries included.
const BACKUP_SHARD_TIMEOUT_S: u64 = 300;
/// Times a shard is copied again because its range changed under the backup (a split).
const RANGE_RETRIES_MAX: usize = 5;

/// What a finished backup holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSummary {
    /// Shards copied.
    pub shards: u64,
    /// Key-value pairs.
    pub keys: u64,
    /// Bytes of SST files.
    pub bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
    /// The backup's id.
    pub backup_id: String,
}

/// Backs up every shard of the cluster `config` reaches into `to` (absent, or an empty
/// directory), calling `progress` as it goes. The client's certificate must carry the admin
/// role. On failure the directory holds no manifest, so it cannot be restored by mistake.
pub async fn take_backup(
    config: ClientConfig,
    to: &Path,
    mut progress: impl FnMut(Progress),
) -> Result<BackupSummary, BackupError> {
    prepare_target(to)?;
    let started = Instant::now();
    let started_unix_ms = unix_ms();
    let backup_id = format!("{started_unix_ms:x}-{:x}", std::process::id());
    let mut config = config;
    // Copies are made on leaders: a client configured for stale reads would ask followers.
    config.consistency = crate::wire::ReadConsistency::Linearizable;
    config.request_timeout = config.request_timeout.max(Duration::from_secs(BACKUP_REQUEST_TIMEOUT_S));
    config.op_timeout = config.op_timeout.max(Duration::from_secs(BACKUP_SHARD_TIMEOUT_S));
    let client = Client::connect(config).await?;
    let result = copy_all(&client, to, &mut progress).await;
    client.close().await;
    if result.is_err() {
        // A failed backup leaves no shard's worth of files behind (the directory was new or
        // empty: everything of this name in it is this backup's).
        remove_partial(to);
    }
    let shards = result?;
    let manifest = Manifest {
        format: BACKUP_FORMAT_VERSION,
        backup_id: backup_id.clone(),
        started_unix_ms,
        finished_unix_ms: unix_ms(),
        flotilla_version: env!("CARGO_PKG_VERSION").to_string(),
        shards,
    };
    manifest.save(to)?;
    Ok(BackupSummary {
        shards: manifest.shards.len() as u64,
        keys: manifest.keys(),
        bytes: manifest.bytes(),
        elapsed: started.elapsed(),
        backup_id,
    })
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// The target must be new or empty: a backup never mixes with other files.
fn prepare_target(to: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::Directory(format!(
                    "{} is not empty; back up into a new directory",
                    to.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(to).map_err(|e| io_error(to, e))?;
        }
        Err(e) => return Err(io_error(to, e)),
    }
    Ok(())
}

/// Copies the shards in key order, from the first user key to the end of the key space: each
/// copy's range (which a split may have narrowed since the map was read) says where the next
/// starts, so the copies tile the key space whatever splits meanwhile.
async fn copy_all(
    client: &Client,
    to: &Path,
    progress: &mut impl FnMut(Progress),
) -> Result<Vec<ShardEntry>, BackupError> {
    let total = client.refresh().await?.map.len() as u64;
    let mut state = Progress { shards_done: 0, shards_total: total, bytes_done: 0 };
    progress(state);
    let mut out: Vec<ShardEntry> = Vec::new();
    let mut cursor = USER_KEYS_START.to_vec();
    let mut retries = 0;
    loop {
        let (answer, d, node) =
            client.shard_admin(&cursor, |d| AdminRequest::BackupStart { shard: d.id, epoch: d.epoch }).await?;
        let AdminResponse::BackupStarted(copy) = answer else {
            return Err(ClientError::Unavailable(format!("unexpected answer to a backup of shard {}", d.id)).into());
        };
        let fetched = fetch_copy(client, node, d.id, &copy, to, out.len(), &mut state, progress).await;
        // Released whatever happened: its files are a shard's worth of disk on the leader.
        let _ = client.admin_at(node, AdminRequest::BackupEnd { shard: d.id, copy_id: copy.copy_id }).await;
        let (header, files) = fetched?;
        if header.range.start != cursor {
            // The copy does not start where the previous one ended: its range changed since
            // the map this client routed by (a split). Copied again by a newer map.
            remove_files(to, &files);
            retries += 1;
            if retries > RANGE_RETRIES_MAX {
                return Err(BackupError::Cluster(ClientError::Unavailable(format!(
                    "shard {} at {} keeps changing its range; try again later",
                    d.id,
                    hex(&cursor)
                ))));
            }
            client.refresh().await?;
            continue;
        }
        retries = 0;
        out.push(ShardEntry {
            shard: d.id.0,
            start_hex: hex(&header.range.start),
            end_hex: header.range.end.as_deref().map(hex),
            raft_index: copy.index,
            raft_term: copy.term,
            keys: copy.keys,
            files,
        });
        state.shards_done += 1;
        state.shards_total = state.shards_total.max(state.shards_done);
        progress(state);
        match header.range.end {
            Some(end) => cursor = end,
            None => return Ok(out),
        }
    }
}

/// Removes the copies' files (whole or temp) of a backup that failed in `dir`. Best effort:
/// without a manifest the directory is not a backup either way.
fn remove_partial(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("shard-") && (name.ends_with(".sst") || name.ends_with(".sst.tmp")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn remove_files(dir: &Path, files: &[FileEntry]) {
    for f in files {
        let _ = std::fs::remove_file(dir.join(&f.name));
    }
}

/// Reads the copy's stream from `node` in chunks: the header, then each file into a file of
/// the backup. Returns the header and the files written.
#[allow(clippy::too_many_arguments)]
async fn fetch_copy(
    client: &Client,
    node: NodeId,
    shard: ShardId,
    copy: &BackupShard,
    to: &Path,
    seq: usize,
    state: &mut Progress,
    progress: &mut impl FnMut(Progress),
) -> Result<(StreamHeader, Vec<FileEntry>), BackupError> {
    let size = copy.size_bytes;
    let read = |offset: u64, len: u64| async move {
        let req = AdminRequest::BackupRead { shard, copy_id: copy.copy_id, offset, len };
        match client.admin_at(node, req).await? {
            AdminResponse::BackupChunk(b) if b.len() as u64 == len => Ok(b),
            _ => Err(BackupError::Cluster(ClientError::Unavailable(format!(
                "node {node} answered a backup read of shard {shard} wrongly"
            )))),
        }
    };
    // The header: its length from the prefix, then the whole of it (bounded by the stream
    // format's header limit).
    let mut head = read(0, size.min(BACKUP_CHUNK_BYTES_MAX)).await?.to_vec();
    let header_len = stream_header_len(head.get(..STREAM_PREFIX_BYTES).unwrap_or(&head))
        .map_err(|e| BackupError::Cluster(ClientError::Unavailable(format!("shard {shard}: {e}"))))?;
    while (head.len() as u64) < header_len {
        let len = (header_len - head.len() as u64).min(BACKUP_CHUNK_BYTES_MAX);
        head.extend_from_slice(&read(head.len() as u64, len).await?);
    }
    let header = decode_stream_header(&head)
        .map_err(|e| BackupError::Cluster(ClientError::Unavailable(format!("shard {shard}: {e}"))))?;
    let files_bytes: u64 = header.files.iter().map(|(b, _)| b).sum();
    if header.header_bytes + files_bytes != size {
        return Err(BackupError::Cluster(ClientError::Unavailable(format!(
            "shard {shard}: the copy's header and length disagree"
        ))));
    }
    let mut sink = FileSink::new(to, shard, seq, &header.files);
    // What the first reads brought past the header.
    let mut offset = head.len() as u64;
    let rest = head.split_off(header.header_bytes as usize);
    state.bytes_done += rest.len() as u64;
    sink = write_blocking(sink, rest).await?;
    drop(head);
    while offset < size {
        let len = (size - offset).min(BACKUP_CHUNK_BYTES_MAX);
        let chunk = read(offset, len).await?;
        offset += len;
        sink = write_blocking(sink, chunk.to_vec()).await?;
        state.bytes_done += len;
        progress(*state);
    }
    let files = sink.finish()?;
    Ok((header, files))
}

/// Writes `bytes` on a blocking thread (file writes and fsyncs stay off the runtime's workers,
/// which in a test also run the cluster's nodes).
async fn write_blocking(mut sink: FileSink, bytes: Vec<u8>) -> Result<FileSink, BackupError> {
    tokio::task::spawn_blocking(move || sink.write(&bytes).map(|()| sink))
        .await
        .map_err(|e| BackupError::Directory(format!("writer thread failed: {e}")))?
}

/// The files of one shard copy, written in stream order: each under a temp name, its crc32c
/// checked against the header's as its last byte arrives, fsynced and renamed.
struct FileSink {
    /// The backup directory.
    dir: PathBuf,
    /// File names start `shard-<id>-<seq>`: a shard copied again after a split gets new names.
    prefix: String,
    /// Each file's expected length and crc32c.
    expected: Vec<(u64, u32)>,
    /// The file being written: its index, handle, bytes so far and running crc.
    open: Option<(usize, File, u64, u32)>,
    /// The files finished.
    done: Vec<FileEntry>,
}

impl FileSink {
    fn new(dir: &Path, shard: ShardId, seq: usize, expected: &[(u64, u32)]) -> FileSink {
        FileSink {
            dir: dir.to_path_buf(),
            prefix: format!("shard-{}-{seq}", shard.0),
            expected: expected.to_vec(),
            open: None,
            done: Vec::new(),
        }
    }

    fn name(&self, i: usize) -> String {
        format!("{}-{i}.sst", self.prefix)
    }

    fn write(&mut self, mut bytes: &[u8]) -> Result<(), BackupError> {
        while !bytes.is_empty() {
            let (i, mut f, written, crc) = match self.open.take() {
                Some(o) => o,
                None => {
                    let i = self.done.len();
                    if i >= self.expected.len() {
                        return Err(BackupError::Corrupt("the copy's stream is longer than its files".into()));
                    }
                    let tmp = self.dir.join(format!("{}.tmp", self.name(i)));
                    let f = File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
                    (i, f, 0, 0)
                }
            };
            let (len, want_crc) = self.expected[i];
            let n = ((len - written) as usize).min(bytes.len());
            let tmp = self.dir.join(format!("{}.tmp", self.name(i)));
            f.write_all(&bytes[..n]).map_err(|e| io_error(&tmp, e))?;
            let (written, crc) = (written + n as u64, crc32c::crc32c_append(crc, &bytes[..n]));
            bytes = &bytes[n..];
            if written < len {
                self.open = Some((i, f, written, crc));
                continue;
            }
            if crc != want_crc {
                let _ = std::fs::remove_file(&tmp);
                return Err(BackupError::Corrupt(format!(
                    "file {i} of the copy arrived corrupt (crc32c {crc:08x}, its header says {want_crc:08x})"
                )));
            }
            f.sync_all().map_err(|e| io_error(&tmp, e))?;
            let path = self.dir.join(self.name(i));
            std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
            self.done.push(FileEntry { name: self.name(i), bytes: len, crc32c: crc });
        }
        Ok(())
    }

    /// Every file whole: the directory's new names made durable.
    fn finish(self) -> Result<Vec<FileEntry>, BackupError> {
        if self.open.is_some() || self.done.len() != self.expected.len() {
            return Err(BackupError::Corrupt("the copy's stream ended before its last file".into()));
        }
        if !self.done.is_empty() {
            sync_dir(&self.dir)?;
        }
        debug_assert!(!self.done.iter().any(|f| f.name == MANIFEST_FILE));
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two files' bytes, as a copy's stream carries them after its header.
    fn two_files() -> (Vec<u8>, Vec<(u64, u32)>) {
        let (a, b) = (vec![7u8; 3000], (0..5000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let expected = vec![(a.len() as u64, crc32c::crc32c(&a)), (b.len() as u64, crc32c::crc32c(&b))];
        ([a, b].concat(), expected)
    }

    #[test]
    fn a_failed_backup_leaves_none_of_its_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["shard-1-0-0.sst", "shard-2-1-0.sst.tmp", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_partial(dir.path());
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["notes.txt".to_string()]);
    }

    #[test]
    fn a_copys_files_are_written_whole_whatever_the_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (stream, expected) = two_files();
        let mut sink = FileSink::new(dir.path(), ShardId(4), 0, &expected);
        // Chunks that cut across the files' boundary.
        for chunk in stream.chunks(1234) {
            sink.write(chunk).unwrap();
        }
        let files = sink.finish().unwrap();
        assert_eq!(files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["shard-4-0-0.sst", "shard-4-0-1.sst"]);
        assert_eq!(std::fs::read(dir.path().join(&files[1].name)).unwrap(), stream[3000..]);
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    #[test]
    fn a_corrupt_short_or_long_copy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut stream, expected) = two_files();
        stream[4000] ^= 1;
        let mut sink = FileSink::new(dir.path(), ShardId(4), 1, &expected);
        let corrupt = sink.write(&stream);
        assert!(
            matches!(&corrupt, Err(BackupError::Corrupt(e)) if e.contains("file 1 of the copy arrived corrupt")),
            "{corrupt:?}"
        );
        assert!(!dir.path().join("shard-4-1-1.sst").exists() && !dir.path().join("shard-4-1-1.sst.tmp").exists());

        let (stream, expected) = two_files();
        let mut short = FileSink::new(dir.path(), ShardId(4), 2, &expected);
        short.write(&stream[..stream.len() - 1]).unwrap();
        assert!(matches!(short.finish(), Err(BackupError::Corrupt(e)) if e.contains("ended before its last file")));
        let mut long = FileSink::new(dir.path(), ShardId(4), 3, &expected);
        let longer = [stream.as_slice(), b"x"].concat();
        assert!(matches!(long.write(&longer), Err(BackupError::Corrupt(e)) if e.contains("longer than its files")));
    }
}
