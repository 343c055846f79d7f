//! The `StateMachine` contract, check by check: one response per entry, membership entries,
//! snapshots built, transferred and installed.

use super::*;

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
