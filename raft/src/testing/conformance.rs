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
    Entry { log_id: LogId::new(term, index), payload: EntryPayload::Membership(m) }
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

/// Runs the [`LogStorage`] conformance checks, each on a fresh, empty store from `make`.
///
/// Checks: an empty store; vote round-trip and overwrite; append and read back; `bytes_max`;
/// reads outside the log fail; `truncate_from` then continue with another term; `purge_up_to`
/// inside the log; `purge_up_to` beyond the last entry (then [`LogState::last`] is `None`, as
/// its doc says, and the log continues after the purged id); an append that does not continue
/// the log fails (and changes nothing); `save_committed` / `read_committed` round-trip or both
/// left at their defaults.
///
/// # Panics
/// On the first check that fails, with a message naming it.
pub async fn log_storage_suite<L, F, Fut>(mut make: F)
where
    L: LogStorage,
    F: FnMut() -> Fut,
    Fut: Future<Output = L>,
{
    macro_rules! run {
        ($($check:ident),* $(,)?) => {
            $({
                let _guard = CheckGuard { suite: "log_storage_suite", check: stringify!($check) };
                $check(stringify!($check), make().await).await;
            })*
        };
    }
    run!(
        empty_store,
        vote_round_trip,
        append_then_read_back,
        read_respects_bytes_max,
        read_outside_the_log_is_err,
        truncate_then_continue,
        purge_inside_the_log,
        purge_beyond_the_last_entry,
        append_not_continuing_is_err,
        committed_round_trip,
    );
}

async fn empty_store<L: LogStorage>(c: &str, log: L) {
    assert_eq!(ok(c, "read_vote", log.read_vote().await), None, "conformance check `{c}` failed: vote of a new store");
    assert_eq!(
        log_state(c, &log).await,
        LogState::default(),
        "conformance check `{c}` failed: log state of a new store"
    );
    expect_err(c, "read_entries(1, 1) on an empty log", log.read_entries(LogIndex(1), LogIndex(1), usize::MAX).await);
}

async fn vote_round_trip<L: LogStorage>(c: &str, log: L) {
    let v1 = Vote { term: Term(1), voted_for: Some(NodeId(3)) };
    ok(c, "save_vote", log.save_vote(&v1).await);
    assert_eq!(ok(c, "read_vote", log.read_vote().await), Some(v1), "conformance check `{c}` failed: vote read back");
    let v2 = Vote { term: Term(2), voted_for: None };
    ok(c, "save_vote", log.save_vote(&v2).await);
    assert_eq!(
        ok(c, "read_vote", log.read_vote().await),
        Some(v2),
        "conformance check `{c}` failed: the second vote must replace the first"
    );
    let v3 = Vote { term: Term(2), voted_for: Some(NodeId(1)) };
    ok(c, "save_vote", log.save_vote(&v3).await);
    assert_eq!(ok(c, "read_vote", log.read_vote().await), Some(v3), "conformance check `{c}` failed: third vote");
    assert_eq!(log_state(c, &log).await, LogState::default(), "conformance check `{c}` failed: a vote is not an entry");
}

async fn append_then_read_back<L: LogStorage>(c: &str, log: L) {
    let first = mixed(1, 1, 4);
    let second = mixed(2, 5, 9);
    append(c, &log, first.clone()).await;
    assert_eq!(
        log_state(c, &log).await,
        state(None, Some(LogId::new(1, 4))),
        "conformance check `{c}` failed: log state after appending 1..=4"
    );
    append(c, &log, second.clone()).await;
    let all: Vec<Entry> = first.into_iter().chain(second).collect();
    assert_eq!(read(c, &log, 1, 9).await, all, "conformance check `{c}` failed: entries read back differ");
    assert_eq!(read(c, &log, 3, 6).await, all[2..6], "conformance check `{c}` failed: entries 3..=6 read back differ");
    assert_eq!(read(c, &log, 9, 9).await, all[8..], "conformance check `{c}` failed: last entry read back differs");
    assert_eq!(
        log_state(c, &log).await,
        state(None, Some(LogId::new(2, 9))),
        "conformance check `{c}` failed: log state after appending 1..=9"
    );
    append(c, &log, Vec::new()).await;
    assert_eq!(
        log_state(c, &log).await,
        state(None, Some(LogId::new(2, 9))),
        "conformance check `{c}` failed: an empty append changes nothing"
    );
}

async fn read_respects_bytes_max<L: LogStorage>(c: &str, log: L) {
    let entries: Vec<Entry> = (1..=5).map(|i| normal(1, i, vec![i as u8; 100])).collect();
    let size = entries[0].size_bytes();
    append(c, &log, entries.clone()).await;
    for (bytes_max, expected) in [(0, 1), (1, 1), (size, 1), (size * 2 - 1, 1), (size * 2, 2), (size * 3 + 10, 3)] {
        let got = ok(
            c,
            &format!("read_entries(1, 5, {bytes_max})"),
            log.read_entries(LogIndex(1), LogIndex(5), bytes_max).await,
        );
        assert_eq!(
            got,
            entries[..expected],
            "conformance check `{c}` failed: read_entries(1, 5, bytes_max {bytes_max}) with entries of {size} bytes \
             must return the first {expected} entries"
        );
    }
    let got = ok(c, "read_entries(2, 3, 1)", log.read_entries(LogIndex(2), LogIndex(3), 1).await);
    assert_eq!(got, entries[1..2], "conformance check `{c}` failed: at least one entry, starting at `from`");
    let got = ok(c, "read_entries(2, 3, large)", log.read_entries(LogIndex(2), LogIndex(3), size * 10).await);
    assert_eq!(got, entries[1..3], "conformance check `{c}` failed: must stop at `to`");
}

async fn read_outside_the_log_is_err<L: LogStorage>(c: &str, log: L) {
    let entries = mixed(1, 1, 5);
    append(c, &log, entries.clone()).await;
    let bad = [(6, 6, "beyond the end"), (4, 6, "running beyond the end"), (0, 2, "at index 0")];
    for (from, to, why) in bad {
        let r = log.read_entries(LogIndex(from), LogIndex(to), usize::MAX).await;
        expect_err(c, &format!("read_entries({from}, {to}) {why}"), r);
    }
    ok(c, "purge_up_to(1-2)", log.purge_up_to(LogId::new(1, 2)).await);
    for (from, to) in [(1, 3), (2, 2), (1, 1)] {
        let r = log.read_entries(LogIndex(from), LogIndex(to), usize::MAX).await;
        expect_err(c, &format!("read_entries({from}, {to}) of purged entries"), r);
    }
    assert_eq!(read(c, &log, 3, 5).await, entries[2..], "conformance check `{c}` failed: entries after the purge");
}

async fn truncate_then_continue<L: LogStorage>(c: &str, log: L) {
    let entries = mixed(1, 1, 5);
    append(c, &log, entries.clone()).await;
    ok(c, "truncate_from(3)", log.truncate_from(LogIndex(3)).await);
    assert_eq!(
        log_state(c, &log).await,
        state(None, Some(LogId::new(1, 2))),
        "conformance check `{c}` failed: log state after truncate_from(3)"
    );
    assert_eq!(
        read(c, &log, 1, 2).await,
        entries[..2],
        "conformance check `{c}` failed: entries before the truncation"
    );
    expect_err(c, "read_entries(3, 3) after truncate_from(3)", log.read_entries(LogIndex(3), LogIndex(3), 1).await);
    let replacement = vec![normal(2, 3, &b"new 3"[..]), blank(2, 4)];
    append(c, &log, replacement.clone()).await;
    let expected: Vec<Entry> = entries[..2].iter().cloned().chain(replacement).collect();
    assert_eq!(
        read(c, &log, 1, 4).await,
        expected,
        "conformance check `{c}` failed: the log must continue at the truncated index with the new term"
    );
    assert_eq!(
        log_state(c, &log).await,
        state(None, Some(LogId::new(2, 4))),
        "conformance check `{c}` failed: log state after appending the new suffix"
    );
    ok(c, "truncate_from(1)", log.truncate_from(LogIndex(1)).await);
    assert_eq!(
        log_state(c, &log).await,
        LogState::default(),
        "conformance check `{c}` failed: truncate_from(1) empties the log"
    );
    append(c, &log, vec![blank(3, 1)]).await;
    assert_eq!(read(c, &log, 1, 1).await, vec![blank(3, 1)], "conformance check `{c}` failed: append after emptying");
}

async fn purge_inside_the_log<L: LogStorage>(c: &str, log: L) {
    let entries: Vec<Entry> = mixed(1, 1, 3).into_iter().chain(mixed(2, 4, 5)).collect();
    append(c, &log, entries.clone()).await;
    ok(c, "purge_up_to(1-3)", log.purge_up_to(LogId::new(1, 3)).await);
    assert_eq!(
        log_state(c, &log).await,
        state(Some(LogId::new(1, 3)), Some(LogId::new(2, 5))),
        "conformance check `{c}` failed: log state after purge_up_to(1-3)"
    );
    assert_eq!(read(c, &log, 4, 5).await, entries[3..], "conformance check `{c}` failed: the suffix must be kept");
    append(c, &log, vec![blank(2, 6)]).await;
    assert_eq!(
        log_state(c, &log).await,
        state(Some(LogId::new(1, 3)), Some(LogId::new(2, 6))),
        "conformance check `{c}` failed: log state after appending past a purge"
    );
    ok(c, "purge_up_to(2-6)", log.purge_up_to(LogId::new(2, 6)).await);
    assert_eq!(
        log_state(c, &log).await,
        state(Some(LogId::new(2, 6)), None),
        "conformance check `{c}` failed: purging up to the last entry empties the log (`last` is None)"
    );
    append(c, &log, vec![blank(3, 7)]).await;
    assert_eq!(
        read(c, &log, 7, 7).await,
        vec![blank(3, 7)],
        "conformance check `{c}` failed: append after a full purge"
    );
}

async fn purge_beyond_the_last_entry<L: LogStorage>(c: &str, log: L) {
    ok(c, "purge_up_to(1-4) of an empty log", log.purge_up_to(LogId::new(1, 4)).await);
    assert_eq!(
        log_state(c, &log).await,
        state(Some(LogId::new(1, 4)), None),
        "conformance check `{c}` failed: log state after purging beyond the end of an empty log"
    );
    append(c, &log, mixed(1, 5, 7)).await;
    ok(c, "purge_up_to(3-10)", log.purge_up_to(LogId::new(3, 10)).await);
    assert_eq!(
        log_state(c, &log).await,
        state(Some(LogId::new(3, 10)), None),
        "conformance check `{c}` failed: purging beyond the last entry leaves an empty log (`last` is None)"
    );
    for index in [7, 10, 11] {
        let r = log.read_entries(LogIndex(index), LogIndex(index), usize::MAX).await;
        expect_err(c, &format!("read_entries({index}, {index}) of an empty log purged up to 10"), r);
    }
    let next = vec![normal(3, 11, &b"eleven"[..]), blank(4, 12)];
    append(c, &log, next.clone()).await;
    assert_eq!(
        log_state(c, &log).await,
        state(Some(LogId::new(3, 10)), Some(LogId::new(4, 12))),
        "conformance check `{c}` failed: the log continues after the purged id"
    );
    assert_eq!(read(c, &log, 11, 12).await, next, "conformance check `{c}` failed: entries after the purged id");
    // Not continuing after the purged id is refused too.
    for entry in [blank(4, 12), blank(4, 14)] {
        let what = format!("append({}) after 4-12", entry.log_id);
        expect_err(c, &what, log.append(vec![entry]).await);
    }
}

async fn append_not_continuing_is_err<L: LogStorage>(c: &str, log: L) {
    expect_err(c, "append(1-2) to an empty log", log.append(vec![blank(1, 2)]).await);
    assert_eq!(
        log_state(c, &log).await,
        LogState::default(),
        "conformance check `{c}` failed: a refused append must not change the log"
    );
    let entries = mixed(1, 1, 3);
    append(c, &log, entries.clone()).await;
    let bad: [(Vec<Entry>, &str); 4] = [
        (vec![blank(1, 5)], "append(1-5) after 1-3: a gap"),
        (vec![blank(1, 3)], "append(1-3) after 1-3: overlaps"),
        (vec![blank(2, 2)], "append(2-2) after 1-3: overlaps"),
        (vec![blank(1, 1)], "append(1-1) after 1-3: overlaps"),
    ];
    for (batch, what) in bad {
        expect_err(c, what, log.append(batch).await);
        assert_eq!(
            log_state(c, &log).await,
            state(None, Some(LogId::new(1, 3))),
            "conformance check `{c}` failed: a refused {what} must not change the log"
        );
        assert_eq!(
            read(c, &log, 1, 3).await,
            entries,
            "conformance check `{c}` failed: a refused {what} must not change the entries"
        );
    }
}

async fn committed_round_trip<L: LogStorage>(c: &str, log: L) {
    assert_eq!(
        ok(c, "read_committed", log.read_committed().await),
        None,
        "conformance check `{c}` failed: a new store has no committed index"
    );
    ok(c, "save_committed(7)", log.save_committed(LogIndex(7)).await);
    match ok(c, "read_committed", log.read_committed().await) {
        // The default implementations: nothing is kept, consistently.
        None => {
            ok(c, "save_committed(9)", log.save_committed(LogIndex(9)).await);
            assert_eq!(
                ok(c, "read_committed", log.read_committed().await),
                None,
                "conformance check `{c}` failed: read_committed returned None once, then Some"
            );
        }
        Some(got) => {
            assert_eq!(got, LogIndex(7), "conformance check `{c}` failed: committed index read back");
            ok(c, "save_committed(9)", log.save_committed(LogIndex(9)).await);
            assert_eq!(
                ok(c, "read_committed", log.read_committed().await),
                Some(LogIndex(9)),
                "conformance check `{c}` failed: the committed index must be replaced"
            );
        }
    }
}

// ----- StateMachine ----------------------------------------------------------------------------

/// Runs the [`StateMachine`] conformance checks, each on fresh, empty machines from `make`.
///
/// The checks are generic: they apply blank, membership and normal entries with arbitrary
/// payloads (a machine answers a payload it does not understand through its response, never
/// through an `Err`) and check only the response counts, the applied state and the
/// snapshots' metadata.
///
/// Checks: an empty machine; one response per entry (empty for blank and membership entries)
/// and `last_applied` advancing; membership entries update the applied membership; a built
/// snapshot describes the applied state, is the current snapshot, and has a fresh
/// `snapshot_id`; installing it into a fresh machine reproduces the applied state and makes
/// it the current snapshot; installing replaces a more advanced state.
///
/// # Panics
/// On the first check that fails, with a message naming it.
pub async fn state_machine_suite<S, F, Fut>(mut make: F)
where
    S: StateMachine,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    macro_rules! run {
        ($check:ident($($arg:expr),*)) => {{
            let _guard = CheckGuard { suite: "state_machine_suite", check: stringify!($check) };
            $check(stringify!($check), $($arg),*).await;
        }};
    }
    run!(empty_machine(make().await));
    run!(one_response_per_entry(make().await));
    run!(membership_entries_update_membership(make().await));
    run!(build_snapshot_becomes_current(make().await));
    run!(snapshot_round_trip(make().await, make().await));
    run!(install_replaces_state(make().await, make().await));
}

async fn applied<S: StateMachine>(c: &str, sm: &mut S) -> AppliedState {
    ok(c, "applied_state", sm.applied_state().await)
}

async fn apply<S: StateMachine>(c: &str, sm: &mut S, entries: Vec<Entry>) -> Vec<Bytes> {
    let what = match (entries.first(), entries.last()) {
        (Some(a), Some(b)) => format!("apply({}..={})", a.log_id, b.log_id),
        _ => "apply([])".to_string(),
    };
    let n = entries.len();
    let responses = ok(c, &what, sm.apply(entries).await);
    assert_eq!(responses.len(), n, "conformance check `{c}` failed: {what} must return one response per entry");
    responses
}

async fn empty_machine<S: StateMachine>(c: &str, mut sm: S) {
    assert_eq!(
        applied(c, &mut sm).await,
        AppliedState::default(),
        "conformance check `{c}` failed: applied state of a new machine"
    );
    assert_eq!(
        ok(c, "current_snapshot", sm.current_snapshot().await),
        None,
        "conformance check `{c}` failed: a new machine has no snapshot"
    );
}

async fn one_response_per_entry<S: StateMachine>(c: &str, mut sm: S) {
    let batch = vec![
        membership(1, 1, voters(&[1, 2, 3])),
        blank(1, 2),
        normal(1, 3, &b"\x00\xffnot a command of any format\x00"[..]),
        normal(1, 4, Bytes::new()),
    ];
    let responses = apply(c, &mut sm, batch).await;
    assert!(responses[0].is_empty(), "conformance check `{c}` failed: a membership entry's response must be empty");
    assert!(responses[1].is_empty(), "conformance check `{c}` failed: a blank entry's response must be empty");
    assert_eq!(
        applied(c, &mut sm).await.last_applied,
        Some(LogId::new(1, 4)),
        "conformance check `{c}` failed: last_applied after applying 1..=4"
    );
    let responses = apply(c, &mut sm, vec![blank(2, 5)]).await;
    assert!(responses[0].is_empty(), "conformance check `{c}` failed: a blank entry's response must be empty");
    assert_eq!(
        applied(c, &mut sm).await.last_applied,
        Some(LogId::new(2, 5)),
        "conformance check `{c}` failed: last_applied after applying 2-5"
    );
    apply(c, &mut sm, vec![normal(2, 6, &b"x"[..]), normal(2, 7, &b"y"[..]), normal(3, 8, &b"z"[..])]).await;
    assert_eq!(
        applied(c, &mut sm).await.last_applied,
        Some(LogId::new(3, 8)),
        "conformance check `{c}` failed: last_applied after applying 6..=8"
    );
}

async fn membership_entries_update_membership<S: StateMachine>(c: &str, mut sm: S) {
    let m1 = voters(&[1, 2, 3]);
    apply(c, &mut sm, vec![membership(1, 1, m1.clone())]).await;
    let expected = AppliedState {
        last_applied: Some(LogId::new(1, 1)),
        membership: StoredMembership { log_id: LogId::new(1, 1), membership: m1.clone() },
    };
    assert_eq!(applied(c, &mut sm).await, expected, "conformance check `{c}` failed: after a membership entry");
    apply(c, &mut sm, vec![blank(1, 2), normal(1, 3, &b"payload"[..])]).await;
    assert_eq!(
        applied(c, &mut sm).await,
        AppliedState { last_applied: Some(LogId::new(1, 3)), ..expected },
        "conformance check `{c}` failed: other entries must not change the membership"
    );
    let joint = Membership {
        voters: [2, 3, 4].map(NodeId).into_iter().collect(),
        outgoing: Some(m1.voters.clone()),
        learners: BTreeSet::from([NodeId(5)]),
    };
    apply(c, &mut sm, vec![blank(2, 4), membership(2, 5, joint.clone()), blank(2, 6)]).await;
    assert_eq!(
        applied(c, &mut sm).await,
        AppliedState {
            last_applied: Some(LogId::new(2, 6)),
            membership: StoredMembership { log_id: LogId::new(2, 5), membership: joint },
        },
        "conformance check `{c}` failed: after a joint membership entry"
    );
}

/// Applies 1..=4 (a membership, two commands, a blank) to `sm`.
async fn apply_some<S: StateMachine>(c: &str, sm: &mut S) {
    let batch =
        vec![membership(1, 1, voters(&[1, 2])), normal(1, 2, &b"first"[..]), normal(1, 3, &b"second"[..]), blank(2, 4)];
    apply(c, sm, batch).await;
}

async fn build_snapshot_becomes_current<S: StateMachine>(c: &str, mut sm: S) {
    apply_some(c, &mut sm).await;
    let state = applied(c, &mut sm).await;
    let s1 = ok(c, "build_snapshot", sm.build_snapshot().await);
    assert_eq!(
        Some(s1.meta.last_log_id),
        state.last_applied,
        "conformance check `{c}` failed: the snapshot's last_log_id must be the last applied id"
    );
    assert_eq!(
        s1.meta.membership, state.membership,
        "conformance check `{c}` failed: the snapshot's membership must be the applied membership"
    );
    assert_eq!(
        s1.meta.size_bytes,
        s1.data.len() as u64,
        "conformance check `{c}` failed: size_bytes must be the data's length"
    );
    assert_eq!(
        ok(c, "current_snapshot", sm.current_snapshot().await),
        Some(s1.clone()),
        "conformance check `{c}` failed: the built snapshot must become the current one"
    );
    assert_eq!(applied(c, &mut sm).await, state, "conformance check `{c}` failed: building must not change the state");
    apply(c, &mut sm, vec![normal(2, 5, &b"third"[..])]).await;
    let s2 = ok(c, "build_snapshot", sm.build_snapshot().await);
    assert_ne!(
        s2.meta.snapshot_id, s1.meta.snapshot_id,
        "conformance check `{c}` failed: two snapshots built by one machine must have different snapshot_id"
    );
    assert_eq!(
        s2.meta.last_log_id,
        LogId::new(2, 5),
        "conformance check `{c}` failed: the second snapshot's last_log_id"
    );
    assert_eq!(
        ok(c, "current_snapshot", sm.current_snapshot().await),
        Some(s2),
        "conformance check `{c}` failed: the latest built snapshot must be the current one"
    );
}

async fn snapshot_round_trip<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    apply_some(c, &mut source).await;
    let state = applied(c, &mut source).await;
    let snapshot = ok(c, "build_snapshot", source.build_snapshot().await);
    ok(c, "install_snapshot into a fresh machine", target.install_snapshot(snapshot.clone()).await);
    assert_eq!(
        applied(c, &mut target).await,
        state,
        "conformance check `{c}` failed: installing a snapshot must reproduce the applied state"
    );
    let current = ok(c, "current_snapshot", target.current_snapshot().await);
    let Some(current) = current else {
        panic!("conformance check `{c}` failed: the installed snapshot must become the current one, got None");
    };
    assert_eq!(
        current.meta, snapshot.meta,
        "conformance check `{c}` failed: the current snapshot's meta after installing"
    );
    assert_eq!(
        current.data, snapshot.data,
        "conformance check `{c}` failed: the current snapshot's data after installing"
    );
    // Applying continues right after the snapshot.
    apply(c, &mut target, vec![blank(2, 5)]).await;
    assert_eq!(
        applied(c, &mut target).await.last_applied,
        Some(LogId::new(2, 5)),
        "conformance check `{c}` failed: applying after an installed snapshot"
    );
}

async fn install_replaces_state<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    apply(c, &mut source, vec![membership(1, 1, voters(&[7])), normal(1, 2, &b"a"[..])]).await;
    let state = applied(c, &mut source).await;
    let snapshot = ok(c, "build_snapshot", source.build_snapshot().await);
    apply_some(c, &mut target).await;
    apply(c, &mut target, vec![membership(3, 5, voters(&[1, 2, 3])), normal(3, 6, &b"b"[..])]).await;
    let _ = ok(c, "build_snapshot", target.build_snapshot().await);
    ok(c, "install_snapshot over an advanced state", target.install_snapshot(snapshot.clone()).await);
    assert_eq!(
        applied(c, &mut target).await,
        state,
        "conformance check `{c}` failed: installing must replace the applied state with the snapshot's"
    );
    let current = ok(c, "current_snapshot", target.current_snapshot().await).map(|s| s.meta);
    assert_eq!(
        current,
        Some(snapshot.meta),
        "conformance check `{c}` failed: the installed snapshot must replace the current one"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{KvCommand, KvResponse, MemLogStorage, MemStateMachine};
    use crate::Snapshot;

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

    /// A [`MemStateMachine`] that forgets its current snapshot.
    struct NoCurrentSnapshot(MemStateMachine);

    impl StateMachine for NoCurrentSnapshot {
        async fn applied_state(&mut self) -> Result<AppliedState, StorageError> {
            self.0.applied_state().await
        }
        async fn apply(&mut self, entries: Vec<Entry>) -> Result<Vec<Bytes>, StorageError> {
            self.0.apply(entries).await
        }
        async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
            self.0.build_snapshot().await
        }
        async fn current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
            Ok(None)
        }
        async fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
            self.0.install_snapshot(snapshot).await
        }
    }

    #[tokio::test]
    #[should_panic(expected = "conformance check `build_snapshot_becomes_current` failed")]
    async fn suite_catches_a_missing_current_snapshot() {
        state_machine_suite(|| async { NoCurrentSnapshot(MemStateMachine::new()) }).await;
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

    #[tokio::test]
    async fn mem_state_machine_snapshot_carries_the_data() {
        let mut sm = MemStateMachine::new();
        sm.apply(vec![put(1, 1, "a", "1"), put(1, 2, "b", "2")]).await.unwrap();
        let snapshot = sm.build_snapshot().await.unwrap();
        let mut other = MemStateMachine::new();
        other.apply(vec![put(1, 1, "c", "3")]).await.unwrap();
        other.install_snapshot(snapshot).await.unwrap();
        assert_eq!(other.data(), sm.data());
        assert_eq!(other.last_applied(), Some(LogId::new(1, 2)));
    }

    #[tokio::test]
    async fn mem_state_machine_refuses_bad_input() {
        let mut sm = MemStateMachine::new();
        sm.apply(vec![put(1, 1, "a", "1")]).await.unwrap();
        // A snapshot whose data does not decode.
        let meta = crate::SnapshotMeta { size_bytes: 7, ..Default::default() };
        let bad = Snapshot { meta, data: Bytes::from_static(b"garbage") };
        assert!(sm.install_snapshot(bad).await.is_err());
        // Data and size disagreeing.
        let mut good = sm.build_snapshot().await.unwrap();
        good.meta.size_bytes += 1;
        assert!(sm.install_snapshot(good).await.is_err());
        assert_eq!(sm.get("a"), Some("1".into()));
        // Entries out of order.
        assert!(sm.apply(vec![put(1, 3, "a", "2")]).await.is_err());
        assert!(sm.apply(vec![put(1, 1, "a", "2")]).await.is_err());
        assert_eq!(sm.get("a"), Some("1".into()));
        assert_eq!(sm.last_applied(), Some(LogId::new(1, 1)));
    }
}
