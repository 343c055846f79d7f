//! A node's durable storage as the simulator keeps it: the log, the vote and the state
//! machine's last checkpoint, to which writes apply when they complete (what was not synced
//! is lost at a crash).

use super::*;

#[derive(Clone, Debug)]
pub(super) enum Write {
    Vote(Vote),
    Append(Vec<Entry>),
    Truncate(LogIndex),
    Purge(LogId),
}

/// A node's log, vote and state-machine checkpoint, as durable storage would hold them.
#[derive(Clone, Debug, Default)]
pub(super) struct Disk {
    pub(super) vote: Vote,
    pub(super) last_purged: LogId,
    pub(super) log: Vec<Entry>,
    /// The state machine as last checkpointed (or installed from a snapshot): what it
    /// restarts from. The log is purged only behind it.
    pub(super) checkpoint: Option<Snapshot>,
}

impl Disk {
    pub(super) fn apply(&mut self, w: &Write) {
        match w {
            Write::Vote(v) => self.vote = *v,
            Write::Append(entries) => {
                for e in entries {
                    assert_eq!(e.log_id.index, self.last().index.next(), "append must continue the log");
                    self.log.push(e.clone());
                }
            }
            Write::Truncate(index) => {
                let keep = index.0.saturating_sub(self.last_purged.index.0 + 1) as usize;
                self.log.truncate(keep);
            }
            Write::Purge(upto) => {
                if upto.index <= self.last_purged.index {
                    return;
                }
                let k = (upto.index.0 - self.last_purged.index.0) as usize;
                if k >= self.log.len() || self.log[k - 1].log_id != *upto {
                    self.log.clear();
                } else {
                    self.log.drain(..k);
                }
                self.last_purged = *upto;
            }
        }
    }

    pub(super) fn last(&self) -> LogId {
        self.log.last().map(|e| e.log_id).unwrap_or(self.last_purged)
    }

    pub(super) fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.last_purged.index {
            return None;
        }
        self.log.get((index.0 - self.last_purged.index.0 - 1) as usize)
    }

    pub(super) fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.last_purged.index {
            return Some(self.last_purged.term);
        }
        self.entry(index).map(|e| e.log_id.term)
    }

    /// Whether this storage durably holds the effect of entry `id`: in the log, or inside the
    /// checkpoint.
    pub(super) fn holds(&self, id: LogId) -> bool {
        self.term_at(id.index) == Some(id.term)
            || self.checkpoint.as_ref().is_some_and(|s| s.meta.last_log_id.index >= id.index)
    }

    /// What the engine resumes from after a crash. The state machine is volatile: it restarts
    /// from its checkpoint.
    pub(super) fn initial_state(&self) -> InitialState {
        let mut points: Vec<LogId> = Vec::new();
        for e in &self.log {
            if points.last().is_none_or(|p| p.term != e.log_id.term) {
                points.push(e.log_id);
            }
        }
        let (applied, applied_membership) = match &self.checkpoint {
            Some(s) => (s.meta.last_log_id, s.meta.membership.clone()),
            None => (LogId::ZERO, StoredMembership::default()),
        };
        let log_memberships = self
            .log
            .iter()
            .filter(|e| e.log_id.index > applied.index)
            .filter_map(|e| e.membership().map(|m| StoredMembership { log_id: e.log_id, membership: m.clone() }))
            .collect();
        InitialState {
            vote: self.vote,
            last_purged: self.last_purged,
            term_points: points,
            last_log_id: self.last(),
            committed: LogIndex(0),
            applied,
            applied_membership,
            log_memberships,
        }
    }
}

pub(super) fn encode_map(map: &BTreeMap<String, String>) -> Bytes {
    let mut out = Vec::new();
    for (k, v) in map {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    Bytes::from(out)
}

pub(super) fn decode_map(mut data: &[u8]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let take = |data: &mut &[u8]| -> String {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let s = String::from_utf8(data[4..4 + len].to_vec()).expect("simulator wrote it");
        *data = &data[4 + len..];
        s
    };
    while !data.is_empty() {
        let k = take(&mut data);
        let v = take(&mut data);
        map.insert(k, v);
    }
    map
}

/// A transfer snapshot's bytes: the map, then a checksum of it.
pub(super) fn snapshot_bytes(map: &BTreeMap<String, String>) -> Bytes {
    let mut out = encode_map(map).to_vec();
    let sum = crate::testing::kv::fnv64(&out);
    out.extend_from_slice(&sum.to_be_bytes());
    Bytes::from(out)
}

/// The map a transfer snapshot holds, or `None` if its checksum does not match.
pub(super) fn snapshot_map(data: &[u8]) -> Option<BTreeMap<String, String>> {
    let body_len = data.len().checked_sub(8)?;
    let (body, sum) = data.split_at(body_len);
    let expected = u64::from_be_bytes(sum.try_into().ok()?);
    (crate::testing::kv::fnv64(body) == expected).then(|| decode_map(body))
}
