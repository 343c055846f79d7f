//! Key layout and record format on disk.
//!
//! Column family `raft` holds every group's Raft state under a group prefix:
//! `[group: u64 BE][kind: u8]` and, for log entries, `[group][KIND_ENTRY][index: u64 BE]`, so
//! one group's log is one contiguous key range. Column family `meta` holds one descriptor per
//! group (`[group: u64 BE]`), so start-up lists groups without touching any log.
//!
//! Every value is a record: `[format version: u8][crc32c of payload: u32 BE][payload]`, the
//! payload being bincode. The checksum is verified on every read: a mismatch is an error
//! naming the group and key, never silently used data.

use flotilla_raft::{GroupId, LogIndex, StorageError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Format version of every record written by this build.
pub const RECORD_VERSION: u8 = 1;
/// Bytes before a record's payload.
pub const RECORD_HEADER_BYTES: usize = 5;

/// The vote.
pub const KIND_VOTE: u8 = 0x01;
/// The last purged log id.
pub const KIND_LOG_STATE: u8 = 0x02;
/// The commit index, a hint read at start-up: written by `RocksLog::save_committed` (the
/// library's driver) and for a group born of a split, not by the host's rounds (its applied
/// record, written with every apply batch, serves instead).
pub const KIND_COMMITTED: u8 = 0x03;
/// The state machine's applied id and membership.
pub const KIND_APPLIED: u8 = 0x04;
/// The current snapshot's metadata.
pub const KIND_SNAPSHOT_META: u8 = 0x05;
/// The current snapshot's data.
pub const KIND_SNAPSHOT_DATA: u8 = 0x06;
/// A snapshot installation under way (its snapshot id): set durably before the data is
/// replaced, cleared with the new applied state, so a crash in between is finished at start-up.
pub const KIND_INSTALLING: u8 = 0x07;
/// The group's part in a merge ([`crate::merge::MergeState`]): frozen for one, or the merges
/// it thawed from. Absent for a group never frozen.
pub const KIND_MERGE: u8 = 0x08;
/// Log entries, followed by the index.
pub const KIND_ENTRY: u8 = 0x10;

/// `[group][kind]`.
pub fn group_key(group: GroupId, kind: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.0.to_be_bytes());
    k[8] = kind;
    k
}

/// `[group][KIND_ENTRY][index]`.
pub fn entry_key(group: GroupId, index: LogIndex) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..9].copy_from_slice(&group_key(group, KIND_ENTRY));
    k[9..].copy_from_slice(&index.0.to_be_bytes());
    k
}

/// The first key after every entry of `group`.
pub fn entries_end(group: GroupId) -> [u8; 9] {
    group_key(group, KIND_ENTRY + 1)
}

/// The index in an entry key, if `key` is an entry key of `group`.
pub fn entry_index(group: GroupId, key: &[u8]) -> Option<LogIndex> {
    if key.len() != 17 || key[..9] != group_key(group, KIND_ENTRY) {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[9..]);
    Some(LogIndex(u64::from_be_bytes(b)))
}

/// The first key after every `raft` key of `group`.
pub fn group_end(group: GroupId) -> Vec<u8> {
    match group.0.checked_add(1) {
        Some(next) => group_key(GroupId(next), 0).to_vec(),
        None => vec![0xff; 10],
    }
}

/// `[group]` in the `meta` column family.
pub fn meta_key(group: GroupId) -> [u8; 8] {
    group.0.to_be_bytes()
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` as a record.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    let payload = bincode::serde::encode_to_vec(value, bincode_config())
        .map_err(|e| StorageError::new("encode", e.to_string()))?;
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a record, checking its version and checksum. `what` names the record in errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: impl Fn() -> String) -> Result<T, StorageError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(StorageError::new("read", format!("{}: record of {} bytes is truncated", what(), bytes.len())));
    }
    if bytes[0] != RECORD_VERSION {
        return Err(StorageError::new(
            "read",
            format!(
                "{}: record format version {} is not supported (this build writes {RECORD_VERSION})",
                what(),
                bytes[0]
            ),
        ));
    }
    let crc = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[RECORD_HEADER_BYTES..];
    let actual = crc32c::crc32c(payload);
    if crc != actual {
        return Err(StorageError::new(
            "read",
            format!("{}: checksum mismatch (stored {crc:08x}, computed {actual:08x}): the record is corrupt", what()),
        ));
    }
    let (value, used) = bincode::serde::decode_from_slice(payload, bincode_config())
        .map_err(|e| StorageError::new("read", format!("{}: undecodable record: {e}", what())))?;
    if used != payload.len() {
        return Err(StorageError::new(
            "read",
            format!("{}: {} trailing bytes in record", what(), payload.len() - used),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_raft::LogId;

    #[test]
    fn entry_keys_sort_by_group_then_index() {
        let a = entry_key(GroupId(1), LogIndex(2));
        let b = entry_key(GroupId(1), LogIndex(256));
        let c = entry_key(GroupId(2), LogIndex(1));
        assert!(a < b && b < c);
        assert!(b.as_slice() < entries_end(GroupId(1)).as_slice());
        assert_eq!(entry_index(GroupId(1), &b), Some(LogIndex(256)));
        assert_eq!(entry_index(GroupId(2), &b), None);
    }

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        let id = LogId::new(3, 7);
        let mut rec = encode(&id).unwrap();
        assert_eq!(decode::<LogId>(&rec, || "x".into()).unwrap(), id);
        let last = rec.len() - 1;
        rec[last] ^= 0x40;
        let err = decode::<LogId>(&rec, || "group 1 entry 7".into()).unwrap_err();
        assert!(err.message.contains("group 1 entry 7") && err.message.contains("checksum"), "{err}");
        let mut rec = encode(&id).unwrap();
        rec[0] = 9;
        assert!(decode::<LogId>(&rec, || "x".into()).unwrap_err().message.contains("version 9"));
        assert!(decode::<LogId>(&[1, 2], || "x".into()).unwrap_err().message.contains("truncated"));
    }
}
