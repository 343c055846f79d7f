//! The backup's manifest: what it holds, and the checks a restore makes before it writes
//! anything (the manifest's own crc, its format, that the shards tile the key space, and each
//! file's length and crc32c).

use super::{hex, io_error, sync_dir, unhex, BackupError};
use crate::meta::USER_KEYS_START;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::Path;

/// The manifest's file name in a backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Format of the backup this build writes and reads: 1, SST files of the snapshot build with
/// their range deletions, and this manifest.
pub const BACKUP_FORMAT_VERSION: u32 = 1;
/// Largest manifest read (a million shards of a few files fit well below it).
const MANIFEST_BYTES_MAX: u64 = 256 << 20;
/// Buffer for reading a file to checksum it: files are never read into memory whole.
const CHECKSUM_BUFFER_BYTES: usize = 256 << 10;

/// What a backup holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`BACKUP_FORMAT_VERSION`] when written.
    pub format: u32,
    /// Names this backup (time and process): restored stores record it.
    pub backup_id: String,
    /// When the backup started (ms since the Unix epoch).
    pub started_unix_ms: u64,
    /// When it finished.
    pub finished_unix_ms: u64,
    /// The `flotilla` version that wrote it.
    pub flotilla_version: String,
    /// The shards, in key order, tiling the key space.
    pub shards: Vec<ShardEntry>,
}

/// One shard of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The shard's id in the cluster backed up (the restored cluster numbers its own).
    pub shard: u64,
    /// First key, hex.
    pub start_hex: String,
    /// End key (exclusive), hex; `None`: the end of the key space.
    pub end_hex: Option<String>,
    /// The Raft index the copy was taken at (at or after a linearizable read point).
    pub raft_index: u64,
    /// That entry's term.
    pub raft_term: u64,
    /// Key-value pairs.
    pub keys: u64,
    /// Its SST files (none for an empty shard), which tile its range.
    pub files: Vec<FileEntry>,
}

/// One file of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name in the backup directory.
    pub name: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// crc32c of its bytes.
    pub crc32c: u32,
}

/// The manifest as stored: the manifest and the crc32c of its JSON text, so that a flipped
/// byte that still parses is caught too.
#[derive(Serialize, Deserialize)]
struct Stored {
    manifest: Manifest,
    crc32c: u32,
}

impl ShardEntry {
    /// The shard's first key.
    pub fn start(&self) -> Result<Vec<u8>, String> {
        unhex(&self.start_hex)
    }

    /// The shard's end key (`None`: unbounded).
    pub fn end(&self) -> Result<Option<Vec<u8>>, String> {
        self.end_hex.as_deref().map(unhex).transpose()
    }
}

impl Manifest {
    /// Bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().flat_map(|s| &s.files).map(|f| f.bytes).sum()
    }

    /// Pairs in all shards.
    pub fn keys(&self) -> u64 {
        self.shards.iter().map(|s| s.keys).sum()
    }

    /// The first key of every shard but the first: the split keys of a cluster with the
    /// backup's shards.
    pub fn split_keys(&self) -> Result<Vec<Vec<u8>>, BackupError> {
        self.shards.iter().skip(1).map(|s| s.start().map_err(BackupError::Corrupt)).collect()
    }

    /// Writes the manifest into `dir` atomically: a temp file, fsynced, renamed, and the
    /// directory fsynced. Written last, it is what makes a backup complete.
    pub fn save(&self, dir: &Path) -> Result<(), BackupError> {
        let text = serde_json::to_vec(self).map_err(|e| BackupError::Corrupt(e.to_string()))?;
        let stored = Stored { manifest: self.clone(), crc32c: crc32c::crc32c(&text) };
        let body = serde_json::to_vec_pretty(&stored).map_err(|e| BackupError::Corrupt(e.to_string()))?;
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let path = dir.join(MANIFEST_FILE);
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
        f.write_all(&body).and_then(|()| f.sync_all()).map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
        sync_dir(dir)
    }

    /// Reads the manifest of the backup in `dir` and checks it: its crc, its format, and that
    /// its shards tile the key space with files of safe names. The files are not read
    /// ([`Manifest::verify_files`]).
    pub fn load(dir: &Path) -> Result<Manifest, BackupError> {
        if !dir.is_dir() {
            return Err(BackupError::Directory(format!("{} is not a directory", dir.display())));
        }
        let path = dir.join(MANIFEST_FILE);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackupError::Corrupt(format!(
                    "{} has no {MANIFEST_FILE}: not a backup, or one that did not finish",
                    dir.display()
                )))
            }
            Err(e) => return Err(io_error(&path, e)),
        };
        let mut text = Vec::new();
        f.take(MANIFEST_BYTES_MAX + 1).read_to_end(&mut text).map_err(|e| io_error(&path, e))?;
        if text.len() as u64 > MANIFEST_BYTES_MAX {
            return Err(BackupError::Corrupt(format!("{} is larger than {MANIFEST_BYTES_MAX} bytes", path.display())));
        }
        let stored: Stored = serde_json::from_slice(&text)
            .map_err(|e| BackupError::Corrupt(format!("{} does not parse: {e}", path.display())))?;
        let m = stored.manifest;
        if m.format != BACKUP_FORMAT_VERSION {
            return Err(BackupError::Corrupt(format!(
                "backup format {} is not supported (this build reads format {BACKUP_FORMAT_VERSION})",
                m.format
            )));
        }
        let again = serde_json::to_vec(&m).map_err(|e| BackupError::Corrupt(e.to_string()))?;
        if crc32c::crc32c(&again) != stored.crc32c {
            return Err(BackupError::Corrupt(format!("{} fails its checksum (it was changed)", path.display())));
        }
        m.check_shape()?;
        Ok(m)
    }

    /// The shards tile the user key space, in order, and every file name is a plain name.
    fn check_shape(&self) -> Result<(), BackupError> {
        let bad = |what: String| Err(BackupError::Corrupt(what));
        let mut next = Some(USER_KEYS_START.to_vec());
        for s in &self.shards {
            let (start, end) = (s.start().map_err(BackupError::Corrupt)?, s.end().map_err(BackupError::Corrupt)?);
            if Some(&start) != next.as_ref() {
                return bad(format!(
                    "shard {} starts at {} where {:?} was expected",
                    s.shard,
                    s.start_hex,
                    next.map(|n| hex(&n))
                ));
            }
            if end.as_ref().is_some_and(|e| *e <= start) {
                return bad(format!("shard {} ends before it starts", s.shard));
            }
            for f in &s.files {
                let plain = !f.name.is_empty()
                    && f.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                    && !f.name.starts_with('.');
                if !plain {
                    return bad(format!("file name {:?} of shard {} is not a plain name", f.name, s.shard));
                }
            }
            next = end;
            if next.is_none() && !std::ptr::eq(s, self.shards.last().unwrap_or(s)) {
                return bad(format!("shard {} ends the key space, yet more shards follow", s.shard));
            }
        }
        match next {
            None => Ok(()),
            Some(k) => bad(format!("the shards end at {}, not at the end of the key space", hex(&k))),
        }
    }

    /// Checks every file the manifest names: present, of its length, of its crc32c. Read in
    /// small pieces; `progress` gets the bytes checked so far.
    pub fn verify_files(&self, dir: &Path, mut progress: impl FnMut(u64)) -> Result<(), BackupError> {
        let mut done = 0u64;
        let mut buf = vec![0u8; CHECKSUM_BUFFER_BYTES];
        for s in &self.shards {
            for f in &s.files {
                let path = dir.join(&f.name);
                let mut file = match std::fs::File::open(&path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(BackupError::Corrupt(format!("{} is missing (shard {})", path.display(), s.shard)))
                    }
                    Err(e) => return Err(io_error(&path, e)),
                };
                let (mut crc, mut len) = (0u32, 0u64);
                loop {
                    let n = file.read(&mut buf).map_err(|e| io_error(&path, e))?;
                    if n == 0 {
                        break;
                    }
                    crc = crc32c::crc32c_append(crc, &buf[..n]);
                    len += n as u64;
                }
                if len != f.bytes {
                    return Err(BackupError::Corrupt(format!(
                        "{} has {len} bytes, the manifest says {}",
                        path.display(),
                        f.bytes
                    )));
                }
                if crc != f.crc32c {
                    return Err(BackupError::Corrupt(format!(
                        "{} is corrupt: crc32c {crc:08x}, the manifest says {:08x}",
                        path.display(),
                        f.crc32c
                    )));
                }
                done += len;
                progress(done);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup of two shards in a temporary directory: `a..` split at "m", three files.
    fn sample() -> (tempfile::TempDir, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let mut shards = Vec::new();
        let ranges = [(USER_KEYS_START.to_vec(), Some(b"m".to_vec())), (b"m".to_vec(), None)];
        for (i, (start, end)) in ranges.into_iter().enumerate() {
            let mut files = Vec::new();
            for n in 0..=i {
                let name = format!("shard-{i}-{n}.sst");
                let body: Vec<u8> = (0..1000u32).map(|b| (b * 7 + i as u32 + n as u32) as u8).collect();
                std::fs::write(dir.path().join(&name), &body).unwrap();
                files.push(FileEntry { name, bytes: body.len() as u64, crc32c: crc32c::crc32c(&body) });
            }
            shards.push(ShardEntry {
                shard: i as u64 + 1,
                start_hex: hex(&start),
                end_hex: end.map(|e| hex(&e)),
                raft_index: 10,
                raft_term: 2,
                keys: 5,
                files,
            });
        }
        let m = Manifest {
            format: BACKUP_FORMAT_VERSION,
            backup_id: "test".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            flotilla_version: "0".into(),
            shards,
        };
        m.save(dir.path()).unwrap();
        (dir, m)
    }

    fn corrupt(result: Result<impl std::fmt::Debug, BackupError>, says: &str) {
        match result {
            Err(BackupError::Corrupt(e)) => assert!(e.contains(says), "{e:?} does not say {says:?}"),
            other => panic!("expected a corrupt backup saying {says:?}, got {other:?}"),
        }
    }

    #[test]
    fn an_intact_backup_loads_and_verifies() {
        let (dir, m) = sample();
        let loaded = Manifest::load(dir.path()).unwrap();
        assert_eq!(loaded, m);
        let mut seen = 0;
        loaded.verify_files(dir.path(), |b| seen = b).unwrap();
        assert_eq!(seen, m.bytes());
        assert_eq!(loaded.split_keys().unwrap(), vec![b"m".to_vec()]);
        assert!(!dir.path().join("manifest.json.tmp").exists(), "the temp file was renamed");
    }

    #[test]
    fn a_corrupt_byte_in_a_file_is_found() {
        let (dir, m) = sample();
        let path = dir.path().join(&m.shards[1].files[1].name);
        let mut body = std::fs::read(&path).unwrap();
        body[500] ^= 0x01;
        std::fs::write(&path, body).unwrap();
        let loaded = Manifest::load(dir.path()).unwrap();
        corrupt(loaded.verify_files(dir.path(), |_| {}), "is corrupt: crc32c");
    }

    #[test]
    fn a_missing_or_short_file_is_found() {
        let (dir, m) = sample();
        let path = dir.path().join(&m.shards[0].files[0].name);
        let body = std::fs::read(&path).unwrap();
        std::fs::write(&path, &body[..body.len() - 1]).unwrap();
        corrupt(m.verify_files(dir.path(), |_| {}), "has 999 bytes");
        std::fs::remove_file(&path).unwrap();
        corrupt(m.verify_files(dir.path(), |_| {}), "is missing");
    }

    #[test]
    fn a_truncated_changed_or_missing_manifest_is_refused() {
        let (dir, _) = sample();
        let path = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read(&path).unwrap();
        // Truncated: does not parse.
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        corrupt(Manifest::load(dir.path()), "does not parse");
        // A digit changed: still parses, fails the checksum.
        let changed = String::from_utf8(text.clone()).unwrap().replacen("\"keys\": 5", "\"keys\": 6", 1);
        assert_ne!(changed.as_bytes(), text.as_slice());
        std::fs::write(&path, changed).unwrap();
        corrupt(Manifest::load(dir.path()), "fails its checksum");
        std::fs::remove_file(&path).unwrap();
        corrupt(Manifest::load(dir.path()), "did not finish");
        match Manifest::load(&dir.path().join("nowhere")) {
            Err(BackupError::Directory(e)) => assert!(e.contains("is not a directory")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_format_or_a_gap_between_shards_is_refused() {
        let (dir, m) = sample();
        let mut newer = m.clone();
        newer.format = BACKUP_FORMAT_VERSION + 1;
        newer.save(dir.path()).unwrap();
        corrupt(Manifest::load(dir.path()), "format 2 is not supported");
        let mut gap = m.clone();
        gap.shards[1].start_hex = hex(b"n");
        gap.save(dir.path()).unwrap();
        corrupt(Manifest::load(dir.path()), "starts at 6e");
        let mut open_end = m.clone();
        open_end.shards[1].end_hex = Some(hex(b"x"));
        open_end.save(dir.path()).unwrap();
        corrupt(Manifest::load(dir.path()), "not at the end of the key space");
        let mut escape = m;
        escape.shards[0].files[0].name = "../etc/passwd".into();
        escape.save(dir.path()).unwrap();
        corrupt(Manifest::load(dir.path()), "not a plain name");
    }
}
