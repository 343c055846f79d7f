//! The `LogStorage` contract, check by check: votes, appends and reads, byte limits,
//! truncation, purges (inside and beyond the log), the commit index.

use super::*;

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
