//! Snapshots: the build policy, streaming in chunks with a lost chunk, and installing one at
//! a time.

use super::*;

#[test]
fn snapshot_policy_builds_after_the_threshold_and_purges_the_log() {
    // Entries 1 (configuration) and 2 (the leader's blank entry) count too.
    let config = Config { snapshot_threshold_entries: 8, log_keep_entries_after_snapshot: 2, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    for i in 0..3 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    assert!(!c.nodes[&n(1)].seen.contains(&Action::BuildSnapshot));
    for i in 3..6 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    assert!(c.nodes[&n(1)].seen.contains(&Action::BuildSnapshot));
    let snap = c.nodes[&n(1)].snapshot.as_ref().unwrap().0.last_log_id;
    let purged = c.nodes[&n(1)].seen.iter().find_map(|a| {
        if let Action::PurgeUpTo { log_id, .. } = a {
            Some(*log_id)
        } else {
            None
        }
    });
    assert_eq!(purged.map(|p| p.index.0), Some(snap.index.0 - 2), "keeps two entries behind the snapshot");
}

#[test]
fn snapshot_is_streamed_in_chunks_and_resumes_after_a_lost_chunk() {
    let config = Config { snapshot_chunk_bytes: 3, snapshot_chunks_in_flight_max: 2, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut.insert((n(1), n(3)));
    for i in 0..5 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    c.node(1).engine.trigger_snapshot();
    c.stabilize();
    // The snapshot is 10 bytes: chunks of 3, two in flight. Node 3's lost appends are noticed
    // after two heartbeat intervals; its next probe finds the entries purged.
    c.cut.clear();
    let mut out = Vec::new();
    for _ in 0..5 {
        c.advance(20);
        out = c.take_outbox(1);
        if out.iter().any(|m| matches!(m.body, MessageBody::Snapshot { .. })) {
            break;
        }
        for m in std::mem::take(&mut out) {
            c.deliver(m);
        }
        c.stabilize();
    }
    let chunks: Vec<(u64, usize, bool)> = out
        .iter()
        .filter(|m| m.to == n(3))
        .filter_map(|m| {
            if let MessageBody::Snapshot { offset, data, done, .. } = &m.body {
                Some((*offset, data.len(), *done))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(chunks, vec![(0, 3, false), (3, 3, false)]);
    // Lose the first chunk; the second is refused as out of order.
    for m in out {
        if !matches!(&m.body, MessageBody::Snapshot { offset: 0, .. }) {
            c.deliver(m);
        }
    }
    let resp = c.take_outbox(3);
    assert!(resp.iter().any(|m| matches!(m.body, MessageBody::SnapshotResp { next_offset: 0, installed: None, .. })));
    for m in resp {
        c.deliver(m);
    }
    c.stabilize();
    assert!(c.applied_data(3).is_empty());
    // After the resend timeout the leader resends from the acknowledged offset.
    for _ in 0..5 {
        c.advance(20);
        c.stabilize();
    }
    assert_eq!(c.nodes[&n(3)].sm_applied, c.nodes[&n(1)].snapshot.as_ref().unwrap().0.last_log_id);
    c.propose(1, "after");
    c.stabilize();
    assert_eq!(c.applied_data(3), vec!["after".to_string()]);
    assert_eq!(c.engine(3).last_log_id(), c.engine(1).last_log_id());
}

#[test]
fn snapshot_chunks_are_ignored_while_one_is_being_installed() {
    let mut c = Cluster::with_leader(&[1, 2], cfg());
    let meta = |id, last: u64| SnapshotMeta {
        last_log_id: LogId::new(1, last),
        membership: c.engine(2).committed_membership().clone(),
        snapshot_id: id,
        size_bytes: 4,
    };
    let (m1, m2) = (meta(1, 50), meta(2, 60));
    let term = c.engine(1).term();
    let chunk = |m: &SnapshotMeta| Message {
        from: n(1),
        to: n(2),
        term,
        body: MessageBody::Snapshot { meta: m.clone(), offset: 0, data: Bytes::from_static(b"abcd"), done: true },
    };
    let now = c.now;
    let e = &mut c.node(2).engine;
    e.handle_message(now, chunk(&m1));
    let mut acts = Vec::new();
    while let Some(a) = e.poll_action() {
        acts.push(a);
    }
    assert!(acts.iter().any(|a| matches!(a, Action::InstallSnapshot { meta } if *meta == m1)));
    // While S1 installs, S2 arrives: nothing may start.
    e.handle_message(now, chunk(&m2));
    assert!(e.poll_action().is_none(), "no second snapshot while one installs");
    // A malformed chunk (beyond the snapshot's size) is dropped too.
    e.handle_snapshot_installed(now, m1.clone());
    while e.poll_action().is_some() {}
    let bad = Message {
        from: n(1),
        to: n(2),
        term,
        body: MessageBody::Snapshot { meta: m2.clone(), offset: 2, data: Bytes::from_static(b"abcd"), done: true },
    };
    e.handle_message(now, bad);
    assert!(e.poll_action().is_none(), "malformed chunk dropped");
}
