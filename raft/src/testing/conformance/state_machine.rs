//! The `StateMachine` contract, check by check: one response per entry, membership entries,
//! durability reports, snapshots built on demand, streamed in chunks (lost, duplicated and
//! corrupt chunks refused, a dropped snapshot gone, a reception started over) and installed.

use super::*;
use crate::storage::{SnapshotError, SnapshotMeta};

/// Runs the [`StateMachine`] conformance checks, each on fresh, empty machines from `make`.
///
/// The checks are generic: they apply blank, membership and normal entries with arbitrary
/// payloads (a machine answers a payload it does not understand through its response, never
/// through an `Err`) and check only the response counts, the applied state and the
/// snapshots' metadata and bytes.
///
/// Checks: an empty machine; one response per entry (empty for blank and membership entries)
/// and `last_applied` advancing; membership entries update the applied membership;
/// `durable_applied` never runs ahead of what was applied; a built snapshot describes the
/// applied state, reads back the same bytes in any chunking, has a fresh `snapshot_id`, and
/// is gone once dropped; streaming it into a fresh machine reproduces the applied state; a
/// lost, a duplicated and a corrupt chunk are refused ([`SnapshotError::Refused`], never a
/// storage error) and leave the state as it was; a reception abandoned halfway starts over
/// from offset 0; installing replaces a more advanced state.
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
    run!(durable_applied_follows_applied(make().await));
    run!(built_snapshot_is_readable_until_dropped(make().await));
    run!(snapshot_round_trip(make().await, make().await));
    run!(lost_chunk_is_refused(make().await, make().await));
    run!(duplicated_chunk_is_refused(make().await, make().await));
    run!(corrupt_chunk_is_refused(make().await, make().await));
    run!(abandoned_reception_starts_over(make().await, make().await));
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
        ok(c, "durable_applied", sm.durable_applied().await),
        LogIndex(0),
        "conformance check `{c}` failed: a new machine holds nothing durably"
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

async fn durable_applied_follows_applied<S: StateMachine>(c: &str, mut sm: S) {
    apply_some(c, &mut sm).await;
    let durable = ok(c, "durable_applied", sm.durable_applied().await);
    assert!(durable <= LogIndex(4), "conformance check `{c}` failed: durable_applied {durable} beyond the applied 4");
    apply(c, &mut sm, vec![blank(2, 5)]).await;
    let later = ok(c, "durable_applied", sm.durable_applied().await);
    assert!(
        later >= durable && later <= LogIndex(5),
        "conformance check `{c}` failed: durable_applied went from {durable} to {later} (applied 5)"
    );
}

/// Reads the whole stream of `meta` from `sm` in chunks of `chunk` bytes.
async fn read_all<S: StateMachine>(c: &str, sm: &mut S, meta: &SnapshotMeta, chunk: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < meta.size_bytes {
        let len = chunk.min(meta.size_bytes - offset);
        let data =
            ok(c, &format!("read_snapshot(at {offset}, {len} bytes)"), sm.read_snapshot(meta, offset, len).await);
        let Some(data) = data else {
            panic!("conformance check `{c}` failed: a built snapshot is gone before its drop")
        };
        assert_eq!(data.len() as u64, len, "conformance check `{c}` failed: read_snapshot returned a short chunk");
        out.extend_from_slice(&data);
        offset += len;
    }
    out
}

/// Streams `bytes` (a snapshot `meta`'s stream) into `target` in chunks of `chunk` bytes.
async fn receive_all<S: StateMachine>(
    target: &mut S,
    meta: &SnapshotMeta,
    bytes: &[u8],
    chunk: usize,
) -> Result<(), SnapshotError> {
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + chunk).min(bytes.len());
        target.receive_snapshot(meta, offset as u64, Bytes::copy_from_slice(&bytes[offset..end])).await?;
        offset = end;
    }
    target.install_snapshot(meta).await
}

/// The value of `r`, or a panic naming the check (for the snapshot transfer calls).
fn transfer_ok<T>(c: &str, what: &str, r: Result<T, SnapshotError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("conformance check `{c}` failed: {what} returned an error: {e}"),
    }
}

/// Panics, naming the check, unless `r` is a refusal with a message.
fn expect_refused<T: Debug>(c: &str, what: &str, r: Result<T, SnapshotError>) {
    match r {
        Err(SnapshotError::Refused(why)) => {
            assert!(!why.is_empty(), "conformance check `{c}` failed: {what}: a refusal must say why")
        }
        Err(SnapshotError::Storage(e)) => {
            panic!("conformance check `{c}` failed: {what} must be refused, not a storage error: {e}")
        }
        Ok(v) => panic!("conformance check `{c}` failed: {what} must be refused, got Ok({v:?})"),
    }
}

async fn built_snapshot_is_readable_until_dropped<S: StateMachine>(c: &str, mut sm: S) {
    apply_some(c, &mut sm).await;
    let state = applied(c, &mut sm).await;
    let meta = ok(c, "build_snapshot", sm.build_snapshot().await);
    assert_eq!(
        Some(meta.last_log_id),
        state.last_applied,
        "conformance check `{c}` failed: the snapshot must end at the last applied entry"
    );
    assert_eq!(meta.membership, state.membership, "conformance check `{c}` failed: the snapshot's membership");
    let whole = read_all(c, &mut sm, &meta, meta.size_bytes.max(1)).await;
    assert_eq!(whole.len() as u64, meta.size_bytes, "conformance check `{c}` failed: the stream's size");
    for chunk in [1, 7, 64] {
        assert_eq!(
            read_all(c, &mut sm, &meta, chunk).await,
            whole,
            "conformance check `{c}` failed: reading in chunks of {chunk} gives other bytes"
        );
    }
    expect_err(c, "read_snapshot past the end", sm.read_snapshot(&meta, meta.size_bytes, 1).await);
    let second = ok(c, "build_snapshot", sm.build_snapshot().await);
    assert_ne!(
        second.snapshot_id, meta.snapshot_id,
        "conformance check `{c}` failed: a new snapshot must get a new snapshot_id"
    );
    ok(c, "drop_snapshot", sm.drop_snapshot(&meta).await);
    assert_eq!(
        ok(c, "read_snapshot of a dropped snapshot", sm.read_snapshot(&meta, 0, 1).await),
        None,
        "conformance check `{c}` failed: a dropped snapshot must be gone (None), so its transfer starts over"
    );
    let again = read_all(c, &mut sm, &second, 5).await;
    assert_eq!(again.len() as u64, second.size_bytes, "conformance check `{c}` failed: the other snapshot stays");
    ok(c, "drop_snapshot", sm.drop_snapshot(&second).await);
}

async fn snapshot_round_trip<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    apply_some(c, &mut source).await;
    let state = applied(c, &mut source).await;
    let meta = ok(c, "build_snapshot", source.build_snapshot().await);
    let bytes = read_all(c, &mut source, &meta, 3).await;
    transfer_ok(c, "streaming the snapshot into a fresh machine", receive_all(&mut target, &meta, &bytes, 5).await);
    assert_eq!(applied(c, &mut target).await, state, "conformance check `{c}` failed: applied state after installing");
    let durable = ok(c, "durable_applied", target.durable_applied().await);
    assert!(
        durable >= LogIndex(4),
        "conformance check `{c}` failed: an installed snapshot is durable, but durable_applied is {durable}"
    );
    // Applying continues right after the snapshot.
    apply(c, &mut target, vec![blank(2, 5)]).await;
    assert_eq!(
        applied(c, &mut target).await.last_applied,
        Some(LogId::new(2, 5)),
        "conformance check `{c}` failed: applying after an installed snapshot"
    );
}

/// A snapshot of `source` after [`apply_some`], with its bytes, and `target`'s state before.
async fn prepared<S: StateMachine>(c: &str, source: &mut S, target: &mut S) -> (SnapshotMeta, Vec<u8>, AppliedState) {
    apply_some(c, source).await;
    let meta = ok(c, "build_snapshot", source.build_snapshot().await);
    let bytes = read_all(c, source, &meta, 16).await;
    apply(c, target, vec![membership(1, 1, voters(&[9])), normal(1, 2, &b"target"[..])]).await;
    let before = applied(c, target).await;
    (meta, bytes, before)
}

/// After a refused transfer, the state is unchanged and a clean transfer still installs.
async fn refused_then_clean<S: StateMachine>(
    c: &str,
    target: &mut S,
    meta: &SnapshotMeta,
    bytes: &[u8],
    before: AppliedState,
) {
    assert_eq!(
        applied(c, target).await,
        before,
        "conformance check `{c}` failed: a refused transfer changed the state"
    );
    transfer_ok(c, "a clean transfer after a refused one", receive_all(target, meta, bytes, 4).await);
    assert_eq!(
        applied(c, target).await.last_applied,
        Some(meta.last_log_id),
        "conformance check `{c}` failed: the clean transfer must install"
    );
}

async fn lost_chunk_is_refused<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    let (meta, bytes, before) = prepared(c, &mut source, &mut target).await;
    assert!(bytes.len() >= 3, "conformance check `{c}` failed: a snapshot of four entries has under 3 bytes");
    let third = bytes.len() / 3;
    transfer_ok(c, "the first chunk", target.receive_snapshot(&meta, 0, Bytes::copy_from_slice(&bytes[..third])).await);
    let r = match target.receive_snapshot(&meta, 2 * third as u64, Bytes::copy_from_slice(&bytes[2 * third..])).await {
        Ok(()) => target.install_snapshot(&meta).await,
        Err(e) => Err(e),
    };
    expect_refused(c, "a chunk after a gap", r);
    refused_then_clean(c, &mut target, &meta, &bytes, before).await;
}

async fn duplicated_chunk_is_refused<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    let (meta, bytes, before) = prepared(c, &mut source, &mut target).await;
    let half = bytes.len() / 2;
    let first = Bytes::copy_from_slice(&bytes[..half]);
    let second = Bytes::copy_from_slice(&bytes[half..]);
    transfer_ok(c, "the first chunk", target.receive_snapshot(&meta, 0, first).await);
    transfer_ok(c, "the second chunk", target.receive_snapshot(&meta, half as u64, second.clone()).await);
    let r = match target.receive_snapshot(&meta, half as u64, second).await {
        Ok(()) => target.install_snapshot(&meta).await,
        Err(e) => Err(e),
    };
    expect_refused(c, "the second chunk again", r);
    // After a refusal the sender starts over with a new snapshot: nothing of this one may
    // still install.
    expect_refused(c, "installing a refused transfer", target.install_snapshot(&meta).await);
    refused_then_clean(c, &mut target, &meta, &bytes, before).await;
}

async fn corrupt_chunk_is_refused<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    let (meta, bytes, before) = prepared(c, &mut source, &mut target).await;
    let mut bad = bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x5a;
    expect_refused(c, "a snapshot with a corrupt byte", receive_all(&mut target, &meta, &bad, 7).await);
    refused_then_clean(c, &mut target, &meta, &bytes, before).await;
}

async fn abandoned_reception_starts_over<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    let (meta, bytes, _) = prepared(c, &mut source, &mut target).await;
    let half = bytes.len() / 2;
    transfer_ok(c, "half a transfer", target.receive_snapshot(&meta, 0, Bytes::copy_from_slice(&bytes[..half])).await);
    // The sender restarted the transfer (or the receiver lost its progress): offset 0 again.
    transfer_ok(c, "the transfer from the start", receive_all(&mut target, &meta, &bytes, 6).await);
    assert_eq!(
        applied(c, &mut target).await.last_applied,
        Some(meta.last_log_id),
        "conformance check `{c}` failed: a transfer started over must install"
    );
}

async fn install_replaces_state<S: StateMachine>(c: &str, mut source: S, mut target: S) {
    apply(c, &mut source, vec![membership(1, 1, voters(&[7])), normal(1, 2, &b"a"[..])]).await;
    let state = applied(c, &mut source).await;
    let meta = ok(c, "build_snapshot", source.build_snapshot().await);
    let bytes = read_all(c, &mut source, &meta, 8).await;
    apply_some(c, &mut target).await;
    apply(c, &mut target, vec![membership(3, 5, voters(&[1, 2, 3])), normal(3, 6, &b"b"[..])]).await;
    transfer_ok(c, "installing over an advanced state", receive_all(&mut target, &meta, &bytes, 8).await);
    assert_eq!(
        applied(c, &mut target).await,
        state,
        "conformance check `{c}` failed: installing must replace the applied state with the snapshot's"
    );
}
