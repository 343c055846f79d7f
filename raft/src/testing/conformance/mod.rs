//! A conformance suite for the storage traits: any [`LogStorage`] or [`StateMachine`]
//! implementation runs it against itself, e.g.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use flotilla_raft::testing::{log_storage_suite, state_machine_suite, MemLogStorage, MemStateMachine};
//!
//! log_storage_suite(|| async { MemLogStorage::new() }).await;
//! state_machine_suite(|| async { MemStateMachine::new() }).await;
//! # }
//! ```
//!
//! Each check runs on a fresh store from `make` and panics with a message naming the check
//! when the implementation does not follow the contract.

use crate::entry::{Entry, EntryPayload};
use crate::error::StorageError;
use crate::membership::{Membership, StoredMembership};
use crate::storage::{AppliedState, LogState, LogStorage, StateMachine};
use crate::types::{LogId, LogIndex, NodeId, Term, Vote};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;

mod log_storage;
mod state_machine;

pub use log_storage::log_storage_suite;
pub use state_machine::state_machine_suite;

/// Names the running check on stderr if it panics (including a panic inside the
/// implementation under test, whose message would not name it).
struct CheckGuard {
    suite: &'static str,
    check: &'static str,
}

impl Drop for CheckGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}: conformance check `{}` failed (panicked)", self.suite, self.check);
        }
    }
}

/// The value of `r`, or a panic naming the check.
fn ok<T>(check: &str, what: &str, r: Result<T, StorageError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("conformance check `{check}` failed: {what} returned an error: {e}"),
    }
}

/// Panics, naming the check, unless `r` is an error.
fn expect_err<T: Debug>(check: &str, what: &str, r: Result<T, StorageError>) {
    if let Ok(v) = r {
        panic!("conformance check `{check}` failed: {what} should be an error, got Ok({v:?})");
    }
}

fn blank(term: u64, index: u64) -> Entry {
    Entry { log_id: LogId::new(term, index), payload: EntryPayload::Blank }
}

fn normal(term: u64, index: u64, data: impl Into<Bytes>) -> Entry {
    Entry { log_id: LogId::new(term, index), payload: EntryPayload::Normal(data.into()) }
}

fn voters(ids: &[u64]) -> Membership {
    Membership::new(ids.iter().map(|i| NodeId(*i)))
}

fn membership(term: u64, index: u64, m: Membership) -> Entry {
    Entry { log_id: LogId::new(term, index), payload: EntryPayload::Membership(Box::new(m)) }
}

/// Entries `first..=last` of `term`, with a mix of payloads.
fn mixed(term: u64, first: u64, last: u64) -> Vec<Entry> {
    (first..=last)
        .map(|i| match i % 3 {
            0 => membership(term, i, voters(&[1, 2, i])),
            1 => normal(term, i, format!("command {i}").into_bytes()),
            _ => blank(term, i),
        })
        .collect()
}

fn state(last_purged: Option<LogId>, last: Option<LogId>) -> LogState {
    LogState { last_purged, last }
}

async fn read<L: LogStorage>(c: &str, log: &L, from: u64, to: u64) -> Vec<Entry> {
    ok(c, &format!("read_entries({from}, {to})"), log.read_entries(LogIndex(from), LogIndex(to), usize::MAX).await)
}

async fn log_state<L: LogStorage>(c: &str, log: &L) -> LogState {
    ok(c, "log_state", log.log_state().await)
}

async fn append<L: LogStorage>(c: &str, log: &L, entries: Vec<Entry>) {
    let what = match (entries.first(), entries.last()) {
        (Some(a), Some(b)) => format!("append({}..={})", a.log_id, b.log_id),
        _ => "append([])".to_string(),
    };
    ok(c, &what, log.append(entries).await);
}

// ----- LogStorage ------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{SnapshotError, SnapshotMeta};
    use crate::testing::{KvCommand, KvResponse, MemLogStorage, MemStateMachine};

    #[tokio::test]
    async fn mem_log_storage_passes_the_suite() {
        log_storage_suite(|| async { MemLogStorage::new() }).await;
    }

    #[tokio::test]
    async fn mem_state_machine_passes_the_suite() {
        state_machine_suite(|| async { MemStateMachine::new() }).await;
    }

    /// A [`MemLogStorage`] with one deliberate fault, to show the suite catches it.
    struct FaultyLog {
        inner: MemLogStorage,
        fault: LogFault,
    }

    #[derive(PartialEq)]
    enum LogFault {
        IgnoresBytesMax,
        LastIsPurgedWhenEmpty,
    }

    impl LogStorage for FaultyLog {
        async fn read_vote(&self) -> Result<Option<Vote>, StorageError> {
            self.inner.read_vote().await
        }
        async fn save_vote(&self, vote: &Vote) -> Result<(), StorageError> {
            self.inner.save_vote(vote).await
        }
        async fn log_state(&self) -> Result<LogState, StorageError> {
            let mut s = self.inner.log_state().await?;
            if self.fault == LogFault::LastIsPurgedWhenEmpty && s.last.is_none() {
                s.last = s.last_purged;
            }
            Ok(s)
        }
        async fn read_entries(
            &self,
            from: LogIndex,
            to: LogIndex,
            bytes_max: usize,
        ) -> Result<Vec<Entry>, StorageError> {
            let bytes_max = if self.fault == LogFault::IgnoresBytesMax { usize::MAX } else { bytes_max };
            self.inner.read_entries(from, to, bytes_max).await
        }
        async fn append(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
            self.inner.append(entries).await
        }
        async fn truncate_from(&self, index: LogIndex) -> Result<(), StorageError> {
            self.inner.truncate_from(index).await
        }
        async fn purge_up_to(&self, log_id: LogId) -> Result<(), StorageError> {
            self.inner.purge_up_to(log_id).await
        }
    }

    #[tokio::test]
    #[should_panic(expected = "conformance check `read_respects_bytes_max` failed")]
    async fn suite_catches_ignored_bytes_max() {
        log_storage_suite(|| async { FaultyLog { inner: MemLogStorage::new(), fault: LogFault::IgnoresBytesMax } })
            .await;
    }

    #[tokio::test]
    #[should_panic(expected = "conformance check `purge_inside_the_log` failed")]
    async fn suite_catches_last_reported_after_full_purge() {
        log_storage_suite(|| async {
            FaultyLog { inner: MemLogStorage::new(), fault: LogFault::LastIsPurgedWhenEmpty }
        })
        .await;
    }

    /// A [`MemStateMachine`] that never releases a snapshot: a transfer of a dropped one would
    /// go on instead of starting over.
    struct KeepsDroppedSnapshots(MemStateMachine);

    impl StateMachine for KeepsDroppedSnapshots {
        async fn applied_state(&mut self) -> Result<AppliedState, StorageError> {
            self.0.applied_state().await
        }
        async fn apply(&mut self, entries: Vec<Entry>) -> Result<Vec<Bytes>, StorageError> {
            self.0.apply(entries).await
        }
        async fn durable_applied(&mut self) -> Result<LogIndex, StorageError> {
            self.0.durable_applied().await
        }
        async fn build_snapshot(&mut self) -> Result<SnapshotMeta, StorageError> {
            self.0.build_snapshot().await
        }
        async fn read_snapshot(
            &mut self,
            meta: &SnapshotMeta,
            offset: u64,
            len: u64,
        ) -> Result<Option<Bytes>, StorageError> {
            self.0.read_snapshot(meta, offset, len).await
        }
        async fn drop_snapshot(&mut self, _meta: &SnapshotMeta) -> Result<(), StorageError> {
            Ok(())
        }
        async fn receive_snapshot(
            &mut self,
            meta: &SnapshotMeta,
            offset: u64,
            data: Bytes,
        ) -> Result<(), SnapshotError> {
            self.0.receive_snapshot(meta, offset, data).await
        }
        async fn install_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), SnapshotError> {
            self.0.install_snapshot(meta).await
        }
    }

    #[tokio::test]
    #[should_panic(expected = "conformance check `built_snapshot_is_readable_until_dropped` failed")]
    async fn suite_catches_a_snapshot_kept_after_its_drop() {
        state_machine_suite(|| async { KeepsDroppedSnapshots(MemStateMachine::new()) }).await;
    }

    fn commands() -> Vec<KvCommand> {
        vec![
            KvCommand::Put { key: "k".into(), value: "v".into() },
            KvCommand::Put { key: String::new(), value: String::new() },
            KvCommand::Put { key: "ключ".into(), value: "värde \u{1F980}".into() },
            KvCommand::Delete { key: "k".into() },
            KvCommand::Cas { key: "k".into(), expected: None, new: Some("v".into()) },
            KvCommand::Cas { key: "k".into(), expected: Some("v".into()), new: None },
            KvCommand::Cas { key: "k".into(), expected: Some(String::new()), new: Some("x".repeat(1000)) },
        ]
    }

    #[test]
    fn kv_command_round_trips() {
        for cmd in commands() {
            let bytes = cmd.encode();
            assert_eq!(KvCommand::decode(&bytes), Ok(cmd.clone()), "{cmd:?}");
        }
    }

    #[test]
    fn kv_response_round_trips() {
        for resp in [
            KvResponse { previous: None, ok: true },
            KvResponse { previous: Some("old".into()), ok: false },
            KvResponse { previous: Some(String::new()), ok: true },
        ] {
            assert_eq!(KvResponse::decode(&resp.encode()), Ok(resp.clone()));
        }
    }

    #[test]
    fn decoding_garbage_is_an_error() {
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0xff, 1, 2, 3],
            b"hello world".to_vec(),
            vec![1, 0, 0, 0, 5, b'a'],       // Put with a truncated key
            vec![2, 0, 0, 0, 1, 0xff],       // Delete with a key that is not UTF-8
            vec![3, 0, 0, 0, 0, 2, 0],       // Cas with an invalid option flag
            vec![1, 0xff, 0xff, 0xff, 0xff], // a length far beyond the input
        ];
        for g in &garbage {
            assert!(KvCommand::decode(g).is_err(), "{g:?} decoded");
        }
        for cmd in commands() {
            let bytes = cmd.encode();
            let mut trailing = bytes.to_vec();
            trailing.push(0);
            assert!(KvCommand::decode(&trailing).is_err(), "trailing byte accepted for {cmd:?}");
            assert!(KvCommand::decode(&bytes[..bytes.len() - 1]).is_err(), "truncated {cmd:?} accepted");
        }
        assert!(KvResponse::decode(&[]).is_err());
        assert!(KvResponse::decode(&[2, 0]).is_err());
        assert!(KvResponse::decode(&[1, 0, 0]).is_err());
    }

    #[tokio::test]
    async fn failing_writes_are_errors() {
        let log = MemLogStorage::new();
        log.append(vec![blank(1, 1)]).await.unwrap();
        let handle = log.clone();
        handle.set_fail_writes(true);
        assert!(log.append(vec![blank(1, 2)]).await.is_err());
        assert!(log.save_vote(&Vote { term: Term(1), voted_for: None }).await.is_err());
        assert!(log.truncate_from(LogIndex(1)).await.is_err());
        assert!(log.purge_up_to(LogId::new(1, 1)).await.is_err());
        assert!(log.save_committed(LogIndex(1)).await.is_err());
        // Nothing changed, and reads still work.
        assert_eq!(log.entries(), vec![blank(1, 1)]);
        assert_eq!(log.read_vote().await, Ok(None));
        assert_eq!(log.read_committed().await, Ok(None));
        handle.set_fail_writes(false);
        log.append(vec![blank(1, 2)]).await.unwrap();
        assert_eq!(handle.entries(), vec![blank(1, 1), blank(1, 2)]);
    }

    #[tokio::test]
    async fn mem_log_refuses_bad_writes() {
        let log = MemLogStorage::new();
        log.append(mixed(2, 1, 4)).await.unwrap();
        // A lower term than the previous entry.
        assert!(log.append(vec![blank(1, 5)]).await.is_err());
        // A gap inside the batch.
        assert!(log.append(vec![blank(2, 5), blank(2, 7)]).await.is_err());
        assert_eq!(log.entries(), mixed(2, 1, 4));
        // A purge id that disagrees with the entry at its index.
        assert!(log.purge_up_to(LogId::new(1, 2)).await.is_err());
        log.purge_up_to(LogId::new(2, 2)).await.unwrap();
        // Purged entries cannot be truncated; an older purge is a no-op.
        assert!(log.truncate_from(LogIndex(2)).await.is_err());
        log.purge_up_to(LogId::new(2, 1)).await.unwrap();
        assert_eq!(log.log_state().await, Ok(state(Some(LogId::new(2, 2)), Some(LogId::new(2, 4)))));
    }

    fn put(term: u64, index: u64, key: &str, value: &str) -> Entry {
        normal(term, index, KvCommand::Put { key: key.into(), value: value.into() }.encode())
    }

    fn response(bytes: &Bytes) -> KvResponse {
        KvResponse::decode(bytes).expect("a KvResponse")
    }

    #[tokio::test]
    async fn mem_state_machine_applies_commands() {
        let mut sm = MemStateMachine::new();
        let cas = |index, expected: Option<&str>, new: Option<&str>| {
            let cmd = KvCommand::Cas { key: "a".into(), expected: expected.map(Into::into), new: new.map(Into::into) };
            normal(1, index, cmd.encode())
        };
        let responses = sm
            .apply(vec![
                put(1, 1, "a", "1"),
                put(1, 2, "a", "2"),
                normal(1, 3, KvCommand::Delete { key: "b".into() }.encode()),
                cas(4, Some("1"), Some("3")),
                cas(5, Some("2"), Some("3")),
                normal(1, 6, &b"garbage"[..]),
                put(1, 7, "b", "x"),
                cas(8, Some("3"), None),
            ])
            .await
            .unwrap();
        let responses: Vec<KvResponse> = responses.iter().map(response).collect();
        let r = |previous: Option<&str>, ok| KvResponse { previous: previous.map(Into::into), ok };
        assert_eq!(
            responses,
            vec![
                r(None, true),
                r(Some("1"), true),
                r(None, true),
                r(Some("2"), false),
                r(Some("2"), true),
                r(None, false),
                r(None, true),
                r(Some("3"), true),
            ]
        );
        assert_eq!(sm.get("a"), None);
        assert_eq!(sm.get("b"), Some("x".into()));
        assert_eq!(sm.data().len(), 1);
        assert_eq!(sm.last_applied(), Some(LogId::new(1, 8)));
    }

    /// Streams the snapshot `meta` of `from` into `to` in chunks of 5 bytes and installs it.
    async fn transfer(
        from: &mut MemStateMachine,
        to: &mut MemStateMachine,
        meta: &SnapshotMeta,
    ) -> Result<(), SnapshotError> {
        let mut offset = 0;
        while offset < meta.size_bytes {
            let len = 5.min(meta.size_bytes - offset);
            let data = from.read_snapshot(meta, offset, len).await.unwrap().expect("built");
            to.receive_snapshot(meta, offset, data).await?;
            offset += len;
        }
        to.install_snapshot(meta).await
    }

    #[tokio::test]
    async fn mem_state_machine_snapshot_carries_the_data() {
        let mut sm = MemStateMachine::new();
        sm.apply(vec![put(1, 1, "a", "1"), put(1, 2, "b", "2")]).await.unwrap();
        let meta = sm.build_snapshot().await.unwrap();
        let mut other = MemStateMachine::new();
        other.apply(vec![put(1, 1, "c", "3")]).await.unwrap();
        transfer(&mut sm, &mut other, &meta).await.unwrap();
        assert_eq!(other.data(), sm.data());
        assert_eq!(other.last_applied(), Some(LogId::new(1, 2)));
    }

    #[tokio::test]
    async fn mem_state_machine_refuses_bad_input() {
        let mut sm = MemStateMachine::new();
        sm.apply(vec![put(1, 1, "a", "1")]).await.unwrap();
        // A snapshot whose data does not decode.
        let meta = crate::SnapshotMeta { size_bytes: 7, ..Default::default() };
        sm.receive_snapshot(&meta, 0, Bytes::from_static(b"garbage")).await.unwrap();
        let r = sm.install_snapshot(&meta).await;
        assert!(matches!(&r, Err(SnapshotError::Refused(why)) if why.contains("checksum")), "{r:?}");
        // Installing more than was received.
        let mut source = MemStateMachine::new();
        source.apply(vec![put(1, 1, "z", "9")]).await.unwrap();
        let good = source.build_snapshot().await.unwrap();
        let data = source.read_snapshot(&good, 0, good.size_bytes - 1).await.unwrap().expect("built");
        sm.receive_snapshot(&good, 0, data).await.unwrap();
        assert!(matches!(sm.install_snapshot(&good).await, Err(SnapshotError::Refused(_))));
        assert_eq!(sm.get("a"), Some("1".into()));
        // Entries out of order.
        assert!(sm.apply(vec![put(1, 3, "a", "2")]).await.is_err());
        assert!(sm.apply(vec![put(1, 1, "a", "2")]).await.is_err());
        assert_eq!(sm.get("a"), Some("1".into()));
        assert_eq!(sm.last_applied(), Some(LogId::new(1, 1)));
    }
}
