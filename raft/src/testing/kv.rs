//! A key-value command format ([`KvCommand`], [`KvResponse`]) and [`MemStateMachine`], an
//! in-memory [`StateMachine`] that applies it.
//!
//! Commands, responses and snapshot data use a small hand-written binary format: strings are
//! a big-endian `u32` length followed by UTF-8 bytes, an `Option<String>` is a `0` byte (none)
//! or a `1` byte followed by the string. Decoding rejects unknown tags, truncated input,
//! invalid UTF-8 and trailing bytes.

use crate::entry::{Entry, EntryPayload};
use crate::error::StorageError;
use crate::membership::StoredMembership;
use crate::storage::{AppliedState, SnapshotError, SnapshotMeta, StateMachine};
use crate::types::{LogId, LogIndex};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_CAS: u8 = 3;
/// Leads the snapshot data: "FKVS" and a format version. A 64-bit FNV-1a checksum of
/// everything before it ends the data.
const SNAPSHOT_MAGIC: &[u8; 5] = b"FKVS\x02";
/// The answer to an empty payload, which is no command: `KvResponse { previous: None, ok:
/// false }` encoded once. Benchmarks propose empty commands; this spares each a decode error
/// (a formatted message) and an allocation that tell nothing.
const EMPTY_PAYLOAD_RESPONSE: &[u8] = &[0, 0];

/// A command of the key-value state machine, carried as an
/// [`EntryPayload::Normal`] payload (see [`KvCommand::encode`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: String,
    },
    /// Compare-and-swap: if the value of `key` is `expected` (`None`: absent), sets it to
    /// `new` (`None`: removes it).
    Cas {
        /// The key.
        key: String,
        /// The value the key must have for the swap to happen (`None`: the key is absent).
        expected: Option<String>,
        /// The value after the swap (`None`: remove the key).
        new: Option<String>,
    },
}

impl KvCommand {
    /// The command in the binary format, ready to propose.
    pub fn encode(&self) -> Bytes {
        let mut buf = Vec::new();
        match self {
            KvCommand::Put { key, value } => {
                buf.push(TAG_PUT);
                put_str(&mut buf, key);
                put_str(&mut buf, value);
            }
            KvCommand::Delete { key } => {
                buf.push(TAG_DELETE);
                put_str(&mut buf, key);
            }
            KvCommand::Cas { key, expected, new } => {
                buf.push(TAG_CAS);
                put_str(&mut buf, key);
                put_opt_str(&mut buf, expected.as_deref());
                put_opt_str(&mut buf, new.as_deref());
            }
        }
        Bytes::from(buf)
    }

    /// Decodes a command written by [`KvCommand::encode`].
    pub fn decode(bytes: &[u8]) -> Result<KvCommand, String> {
        let mut r = Reader::new(bytes);
        let cmd = match r.u8()? {
            TAG_PUT => KvCommand::Put { key: r.string()?, value: r.string()? },
            TAG_DELETE => KvCommand::Delete { key: r.string()? },
            TAG_CAS => KvCommand::Cas { key: r.string()?, expected: r.opt_string()?, new: r.opt_string()? },
            tag => return Err(format!("unknown command tag {tag}")),
        };
        r.finish()?;
        Ok(cmd)
    }

    /// The key the command reads or writes.
    pub fn key(&self) -> &str {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key } | KvCommand::Cas { key, .. } => key,
        }
    }
}

/// The response of [`MemStateMachine`] to one [`KvCommand`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvResponse {
    /// The value of the key before the command.
    pub previous: Option<String>,
    /// `Put` and `Delete`: always `true`. `Cas`: whether it swapped. `false` also for a
    /// payload that is not a valid command.
    pub ok: bool,
}

impl KvResponse {
    /// The response in the binary format.
    pub fn encode(&self) -> Bytes {
        let mut buf = vec![u8::from(self.ok)];
        put_opt_str(&mut buf, self.previous.as_deref());
        Bytes::from(buf)
    }

    /// Decodes a response written by [`KvResponse::encode`].
    pub fn decode(bytes: &[u8]) -> Result<KvResponse, String> {
        let mut r = Reader::new(bytes);
        let ok = match r.u8()? {
            0 => false,
            1 => true,
            b => return Err(format!("invalid ok flag {b}")),
        };
        let previous = r.opt_string()?;
        r.finish()?;
        Ok(KvResponse { previous, ok })
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("string longer than 4 GiB");
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => buf.push(0),
        Some(s) => {
            buf.push(1);
            put_str(buf, s);
        }
    }
}

/// A cursor over an encoded buffer; every read checks the bounds.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|end| *end <= self.buf.len()).ok_or_else(|| {
            format!("truncated input: need {n} bytes at offset {}, have {}", self.pos, self.buf.len() - self.pos)
        })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("invalid UTF-8: {e}"))
    }

    fn opt_string(&mut self) -> Result<Option<String>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            b => Err(format!("invalid option flag {b}")),
        }
    }

    fn finish(&self) -> Result<(), String> {
        if self.pos != self.buf.len() {
            return Err(format!("{} trailing bytes", self.buf.len() - self.pos));
        }
        Ok(())
    }
}

/// FNV-1a, 64 bits: enough to tell a corrupted test snapshot from a good one.
pub(crate) fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn encode_map(map: &BTreeMap<String, String>) -> Bytes {
    let mut buf = SNAPSHOT_MAGIC.to_vec();
    buf.extend_from_slice(&(map.len() as u64).to_be_bytes());
    for (k, v) in map {
        put_str(&mut buf, k);
        put_str(&mut buf, v);
    }
    let sum = fnv64(&buf);
    buf.extend_from_slice(&sum.to_be_bytes());
    Bytes::from(buf)
}

fn decode_map(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let Some(body_len) = bytes.len().checked_sub(8) else {
        return Err("snapshot shorter than its checksum".into());
    };
    let (body, sum) = bytes.split_at(body_len);
    let expected = u64::from_be_bytes(sum.try_into().map_err(|_| "checksum".to_string())?);
    let actual = fnv64(body);
    if actual != expected {
        return Err(format!("snapshot checksum mismatch: computed {actual:016x}, recorded {expected:016x}"));
    }
    let mut r = Reader::new(body);
    if r.take(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
        return Err("not a MemStateMachine snapshot (bad magic)".into());
    }
    let count = r.u64()?;
    let mut map = BTreeMap::new();
    for _ in 0..count {
        let k = r.string()?;
        let v = r.string()?;
        if map.insert(k, v).is_some() {
            return Err("duplicate key".into());
        }
    }
    r.finish()?;
    Ok(map)
}

/// An in-memory key-value [`StateMachine`] applying [`KvCommand`]s. A clone shares the same
/// state, so a test can keep a handle on the machine it gave to a group and read from it.
///
/// It checks its caller: `apply` of an entry that does not directly follow the last applied
/// one returns a [`StorageError`] (and applies nothing of that batch).
#[derive(Clone, Debug, Default)]
pub struct MemStateMachine {
    inner: Arc<Mutex<SmInner>>,
}

#[derive(Debug, Default)]
struct SmInner {
    data: BTreeMap<String, String>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Snapshots built and not yet dropped, by id.
    built: BTreeMap<u64, (SnapshotMeta, Bytes)>,
    /// The snapshot being received and its bytes so far.
    receiving: Option<(SnapshotMeta, Vec<u8>)>,
    /// Number of snapshots built; the next one's id is this plus one.
    snapshots_built: u64,
}

impl SmInner {
    fn apply_command(&mut self, payload: &[u8]) -> KvResponse {
        apply_kv(&mut self.data, payload)
    }
}

/// Applies one encoded [`KvCommand`] to `data` (a payload that does not decode changes
/// nothing and answers `ok: false`). Shared by [`MemStateMachine`] and the simulator.
pub fn apply_kv(data: &mut BTreeMap<String, String>, payload: &[u8]) -> KvResponse {
    let Ok(cmd) = KvCommand::decode(payload) else {
        return KvResponse { previous: None, ok: false };
    };
    match cmd {
        KvCommand::Put { key, value } => KvResponse { previous: data.insert(key, value), ok: true },
        KvCommand::Delete { key } => KvResponse { previous: data.remove(&key), ok: true },
        KvCommand::Cas { key, expected, new } => {
            let previous = data.get(&key).cloned();
            let ok = previous == expected;
            if ok {
                match new {
                    Some(v) => data.insert(key, v),
                    None => data.remove(&key),
                };
            }
            KvResponse { previous, ok }
        }
    }
}

impl MemStateMachine {
    /// An empty machine: no data, nothing applied, no snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.lock().data.get(key).cloned()
    }

    /// A copy of the whole key-value map.
    pub fn data(&self) -> BTreeMap<String, String> {
        self.lock().data.clone()
    }

    /// The last applied entry (or the last entry of the installed snapshot), if any.
    pub fn last_applied(&self) -> Option<LogId> {
        self.lock().last_applied
    }

    fn lock(&self) -> MutexGuard<'_, SmInner> {
        // Every method validates before changing anything, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StateMachine for MemStateMachine {
    async fn applied_state(&mut self) -> Result<AppliedState, StorageError> {
        let inner = self.lock();
        Ok(AppliedState { last_applied: inner.last_applied, membership: inner.membership.clone() })
    }

    async fn apply(&mut self, entries: Vec<Entry>) -> Result<Vec<Bytes>, StorageError> {
        let mut inner = self.lock();
        let mut prev = inner.last_applied.unwrap_or(LogId::ZERO);
        for entry in &entries {
            if entry.log_id.index != prev.index.next() {
                return Err(StorageError::new(
                    "apply",
                    format!("entry {} does not follow the last applied entry {prev}", entry.log_id),
                ));
            }
            prev = entry.log_id;
        }
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            let response = match &entry.payload {
                EntryPayload::Blank => Bytes::new(),
                EntryPayload::Normal(payload) if payload.is_empty() => Bytes::from_static(EMPTY_PAYLOAD_RESPONSE),
                EntryPayload::Normal(payload) => inner.apply_command(payload).encode(),
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership { log_id: entry.log_id, membership: (**m).clone() };
                    Bytes::new()
                }
            };
            inner.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        Ok(responses)
    }

    async fn durable_applied(&mut self) -> Result<LogIndex, StorageError> {
        // Memory outlives every restart a test makes (clones share it): all of it counts as
        // durable.
        Ok(self.lock().last_applied.map(|l| l.index).unwrap_or_default())
    }

    async fn build_snapshot(&mut self) -> Result<SnapshotMeta, StorageError> {
        let mut inner = self.lock();
        inner.snapshots_built += 1;
        let data = encode_map(&inner.data);
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied.unwrap_or(LogId::ZERO),
            membership: inner.membership.clone(),
            snapshot_id: inner.snapshots_built,
            size_bytes: data.len() as u64,
        };
        inner.built.insert(meta.snapshot_id, (meta.clone(), data));
        Ok(meta)
    }

    async fn read_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, StorageError> {
        let inner = self.lock();
        let Some((m, data)) = inner.built.get(&meta.snapshot_id) else { return Ok(None) };
        if m != meta {
            return Ok(None);
        }
        let end = offset.checked_add(len).filter(|e| *e <= data.len() as u64).ok_or_else(|| {
            StorageError::new("read_snapshot", format!("{len} bytes at {offset} of a {}-byte snapshot", data.len()))
        })?;
        Ok(Some(data.slice(offset as usize..end as usize)))
    }

    async fn drop_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        self.lock().built.remove(&meta.snapshot_id);
        Ok(())
    }

    async fn receive_snapshot(&mut self, meta: &SnapshotMeta, offset: u64, data: Bytes) -> Result<(), SnapshotError> {
        let mut inner = self.lock();
        if offset == 0 {
            inner.receiving = Some((meta.clone(), Vec::new()));
        }
        let Some((m, buf)) = inner.receiving.as_mut().filter(|(m, _)| m == meta) else {
            return Err(SnapshotError::Refused(format!("chunk at {offset} of a snapshot not being received")));
        };
        let refused = if buf.len() as u64 != offset {
            Some(format!("chunk at {offset}, expected {}", buf.len()))
        } else if offset + data.len() as u64 > m.size_bytes {
            Some(format!("chunk beyond the snapshot's {} bytes", m.size_bytes))
        } else {
            None
        };
        if let Some(why) = refused {
            // The transfer is over: the sender starts again with a new snapshot.
            inner.receiving = None;
            return Err(SnapshotError::Refused(why));
        }
        buf.extend_from_slice(&data);
        Ok(())
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
        let mut inner = self.lock();
        let Some((m, buf)) = inner.receiving.take() else {
            return Err(SnapshotError::Refused("install of a snapshot not received".into()));
        };
        if m != *meta || buf.len() as u64 != meta.size_bytes {
            return Err(SnapshotError::Refused(format!(
                "received {} bytes of snapshot {}, installing {} of {}",
                buf.len(),
                m.snapshot_id,
                meta.size_bytes,
                meta.snapshot_id
            )));
        }
        let data = decode_map(&buf).map_err(SnapshotError::Refused)?;
        let last = meta.last_log_id;
        inner.data = data;
        inner.last_applied = (last.index.0 != 0).then_some(last);
        inner.membership = meta.membership.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_to_an_empty_payload_is_the_refusal_apply_kv_gives_it() {
        let mut data = BTreeMap::new();
        assert_eq!(apply_kv(&mut data, &[]).encode(), Bytes::from_static(EMPTY_PAYLOAD_RESPONSE));
        assert!(data.is_empty());
    }
}
