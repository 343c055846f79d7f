//! Log compaction and snapshots: the log purged behind the durable applied index without a
//! snapshot, snapshots built on demand and dropped after use, streamed in chunks with a lost
//! chunk, refused or lost and rebuilt, and installed one at a time.

use super::*;

fn drain(e: &mut Engine) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(a) = e.poll_action() {
        out.push(a);
    }
    out
}

/// The log ids of every purge `id` issued.
fn purges(c: &Cluster, id: u64) -> Vec<LogIndex> {
    c.nodes[&n(id)]
        .seen
        .iter()
        .filter_map(|a| if let Action::PurgeUpTo { log_id, .. } = a { Some(log_id.index) } else { None })
        .collect()
}

fn count(c: &Cluster, id: u64, f: impl Fn(&Action) -> bool) -> usize {
    c.nodes[&n(id)].seen.iter().filter(|a| f(a)).count()
}

/// Cuts node 3 off from leader 1 for longer than a follower counts as catching up, then has
/// the leader commit `writes` entries without it (the cut stays).
fn leave_node_3_behind(c: &mut Cluster, writes: usize) {
    c.cut.insert((n(1), n(3)));
    c.settle(25);
    for i in 0..writes {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
}

/// Lets leader 1 start streaming a snapshot to node 3 while node 3's answers are lost, so the
/// transfer stays in flight; returns the snapshot.
fn start_unacknowledged_transfer(c: &mut Cluster) -> SnapshotMeta {
    for _ in 0..6 {
        c.advance(20);
        c.stabilize_with(|m| !matches!(m.body, MessageBody::SnapshotResp { .. }));
        if c.nodes[&n(1)].snapshot.is_some() {
            break;
        }
    }
    c.nodes[&n(1)].snapshot.as_ref().expect("a snapshot is being sent").0.clone()
}

/// Snapshot `snapshot_id` of `size_bytes` bytes (up to entry 1-50, node 2's committed
/// configuration), and its first chunk, `abcd`, from leader 1 to node 2.
fn first_chunk_to_2(c: &Cluster, snapshot_id: u64, size_bytes: u64, done: bool) -> (SnapshotMeta, Message) {
    let meta = SnapshotMeta {
        last_log_id: LogId::new(1, 50),
        membership: c.engine(2).committed_membership().clone(),
        snapshot_id,
        size_bytes,
    };
    let body =
        MessageBody::Snapshot { meta: Box::new(meta.clone()), offset: 0, data: Bytes::from_static(b"abcd"), done };
    let chunk = Message { from: n(1), to: n(2), term: c.engine(1).term(), body };
    (meta, chunk)
}

/// A config that purges everything durable at once and keeps nothing for lagging followers.
fn purging() -> Config {
    Config { log_keep_entries: 0, log_lag_entries_max: 0, log_purge_step_entries: 1, ..cfg() }
}

#[test]
fn the_log_is_purged_behind_the_durable_applied_index_without_building_a_snapshot() {
    let config = Config { log_keep_entries: 2, log_purge_step_entries: 1, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    for i in 0..6 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    // Entries 1 (configuration), 2 (blank) and 3..=8: durable up to 8, two kept behind it.
    assert_eq!(purges(&c, 1).last(), Some(&LogIndex(6)));
    assert_eq!(c.engine(1).status().first_log_index, LogIndex(7));
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 0, "no snapshot to compact the log");
    // Followers purge theirs on their own durability.
    assert_eq!(purges(&c, 2).last(), Some(&LogIndex(6)));
}

#[test]
fn nothing_is_purged_beyond_what_the_state_machine_holds_durably() {
    let config = Config { log_keep_entries: 0, log_purge_step_entries: 1, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.node(1).report_durable = false;
    for i in 0..6 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    let before = purges(&c, 1).last().copied().unwrap_or_default();
    assert!(before <= LogIndex(2), "purged to {before} without a durability report after 2");
    let now = c.now;
    c.node(1).engine.handle_applied_durable(now, LogIndex(5));
    c.stabilize();
    assert_eq!(purges(&c, 1).last(), Some(&LogIndex(5)));
    // A report beyond what was applied counts only up to the applied index.
    c.node(1).engine.handle_applied_durable(now, LogIndex(100));
    c.stabilize();
    assert_eq!(purges(&c, 1).last(), Some(&LogIndex(8)));
    assert_eq!(c.engine(1).status().durable_applied, LogIndex(8));
}

#[test]
fn a_leader_keeps_the_entries_a_follower_lagging_a_little_still_needs() {
    let config = Config { log_keep_entries: 0, log_lag_entries_max: 100, log_purge_step_entries: 1, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    leave_node_3_behind(&mut c, 6);
    // Node 3 matched 2 when it was cut: the leader keeps everything after it.
    assert_eq!(purges(&c, 1).last().copied().unwrap_or_default(), LogIndex(2));
    c.cut.clear();
    c.settle(4);
    assert_eq!(c.applied_data(3).len(), 6, "caught up from the log");
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 0, "no snapshot needed");
    // Once it caught up, the next durability report purges.
    c.propose(1, "more");
    c.stabilize();
    assert_eq!(purges(&c, 1).last(), Some(&LogIndex(9)));
}

#[test]
fn a_snapshot_is_built_only_when_a_follower_needs_one_and_dropped_after_use() {
    let mut c = Cluster::with_leader(&[1, 2, 3], purging());
    leave_node_3_behind(&mut c, 5);
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 0, "no follower needed one yet");
    assert!(c.engine(1).status().first_log_index > LogIndex(3), "the log was purged past node 3");
    c.cut.clear();
    c.settle(6);
    assert_eq!(c.applied_data(1), c.applied_data(1));
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 1, "one snapshot, built on demand");
    let built = c.nodes[&n(1)].snapshot.as_ref().expect("built").0.clone();
    assert_eq!(c.nodes[&n(3)].sm_applied, built.last_log_id, "node 3 installed it");
    assert_eq!(
        count(&c, 1, |a| matches!(a, Action::DropSnapshot { meta } if **meta == built)),
        1,
        "dropped once the transfer ended"
    );
    assert!(c.nodes[&n(1)].built.is_empty());
    assert_eq!(c.engine(1).status().snapshot, None);
    c.propose(1, "after");
    c.stabilize();
    assert_eq!(c.applied_data(3), vec!["after".to_string()]);
}

#[test]
fn a_snapshot_refused_as_corrupt_is_dropped_and_a_new_one_is_built() {
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { snapshot_chunk_bytes: 4, ..purging() });
    leave_node_3_behind(&mut c, 5);
    c.cut.clear();
    // Node 3 refuses the first snapshot as soon as its first chunk arrives.
    let mut refused = None;
    for _ in 0..10 {
        c.advance(20);
        let msgs = c.take_outbox(1);
        for m in msgs {
            if let (MessageBody::Snapshot { meta, .. }, None) = (&m.body, &refused) {
                if m.to == n(3) {
                    let meta = (**meta).clone();
                    let now = c.now;
                    // Its first reception: the state machine refuses the chunk it is given.
                    c.node(3).engine.handle_message(now, m.clone());
                    c.node(3).engine.handle_snapshot_refused(now, meta.clone(), 1, "checksum mismatch");
                    refused = Some(meta);
                    continue;
                }
            }
            c.deliver(m);
        }
        c.stabilize();
        if refused.is_some() {
            break;
        }
    }
    let refused = refused.expect("a snapshot was sent");
    c.settle(6);
    assert!(
        c.nodes[&n(1)].seen.iter().any(|a| matches!(a, Action::DropSnapshot { meta } if **meta == refused)),
        "the refused snapshot is dropped"
    );
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 2, "a new one was built");
    assert_eq!(c.engine(3).applied(), c.engine(1).applied(), "node 3 installed the new one");
}

#[test]
fn a_snapshot_the_state_machine_lost_is_built_again() {
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { snapshot_chunk_bytes: 4, ..purging() });
    leave_node_3_behind(&mut c, 5);
    c.cut.clear();
    // The leader's state machine loses the first snapshot it builds (its files are gone)
    // when the transfer reads it.
    c.node(1).lose_snapshot_reads = 1;
    c.settle(12);
    assert_eq!(c.nodes[&n(1)].lose_snapshot_reads, 0, "a read found it gone");
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 2, "built again after the loss");
    assert_eq!(c.engine(3).applied(), c.engine(1).applied(), "node 3 caught up with the second");
}

#[test]
fn a_snapshot_in_flight_holds_the_log_purge_until_its_follower_installed_it() {
    let mut c = Cluster::with_leader(
        &[1, 2, 3],
        Config { snapshot_chunk_bytes: 2, snapshot_chunks_in_flight_max: 1, ..purging() },
    );
    leave_node_3_behind(&mut c, 5);
    c.cut.clear();
    // Start the transfer, then write more while node 3's answers are held back.
    let snap = start_unacknowledged_transfer(&mut c).last_log_id;
    for i in 0..5 {
        c.propose(1, &format!("w{i}"));
    }
    c.stabilize_with(|m| !matches!(m.body, MessageBody::SnapshotResp { .. }));
    assert!(
        c.engine(1).status().first_log_index <= snap.index.next(),
        "purged beyond the snapshot in flight ({}), so node 3 would need another",
        snap
    );
    c.settle(10);
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 1, "one snapshot was enough");
    assert_eq!(c.engine(3).applied(), c.engine(1).applied());
    // Once node 3 caught up, the next durability report purges past the snapshot.
    c.propose(1, "after");
    c.stabilize();
    assert!(c.engine(1).status().first_log_index > snap.index.next(), "purged once the transfer ended");
}

#[test]
fn discarded_snapshots_end_their_transfers_and_a_new_one_is_built() {
    let mut c = Cluster::with_leader(
        &[1, 2, 3],
        Config { snapshot_chunk_bytes: 2, snapshot_chunks_in_flight_max: 1, ..purging() },
    );
    leave_node_3_behind(&mut c, 5);
    c.cut.clear();
    let first = start_unacknowledged_transfer(&mut c);
    let now = c.now;
    c.node(1).engine.discard_snapshots(now);
    c.settle(10);
    assert!(c.nodes[&n(1)].seen.iter().any(|a| matches!(a, Action::DropSnapshot { meta } if **meta == first)));
    assert_eq!(count(&c, 1, |a| matches!(a, Action::BuildSnapshot)), 2, "a new one after the discard");
    assert_eq!(c.engine(3).applied(), c.engine(1).applied());
}

#[test]
fn snapshot_is_streamed_in_chunks_and_resumes_after_a_lost_chunk() {
    let config = Config { snapshot_chunk_bytes: 3, snapshot_chunks_in_flight_max: 2, ..purging() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    leave_node_3_behind(&mut c, 5);
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
    assert!(resp
        .iter()
        .any(|m| matches!(m.body, MessageBody::SnapshotResp { next_offset: 0, installed: None, refused: false, .. })));
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
fn a_lost_chunk_is_resent_once_however_many_chunks_report_the_gap() {
    let config = Config { snapshot_chunk_bytes: 1, snapshot_chunks_in_flight_max: 4, ..purging() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    leave_node_3_behind(&mut c, 30);
    c.cut.clear();
    // Deliver everything but the first copy of the second chunk; count the chunks sent.
    let (mut sent, mut lost) = (0u64, false);
    for _ in 0..200 {
        c.advance(20);
        c.stabilize_with(|m| {
            let MessageBody::Snapshot { offset, .. } = &m.body else { return true };
            sent += 1;
            if *offset == 1 && !lost {
                lost = true;
                return false;
            }
            true
        });
        if c.nodes[&n(3)].sm_applied == c.nodes[&n(1)].sm_applied {
            break;
        }
    }
    assert!(lost, "the second chunk was sent and lost");
    let meta = c.nodes[&n(1)].snapshot.as_ref().expect("the snapshot").0.clone();
    assert_eq!(c.nodes[&n(3)].sm_applied, meta.last_log_id, "installed");
    // Every chunk once, the lost one again, and at most one window of copies besides: the
    // chunks sent after the gap each report it, and none of those reports may resend a window.
    let chunks = meta.size_bytes;
    assert!(sent <= chunks + 1 + 4, "{sent} chunks sent for a snapshot of {chunks}");
}

/// The follower's side of a lost chunk: a chunk beyond what arrived is answered as a gap
/// naming the offset to resend from, at once, so the leader resends without waiting for its
/// resend timer; a repeated chunk is answered with what is stored, not as a gap.
#[test]
fn a_chunk_after_a_lost_one_is_answered_with_the_gap_at_once() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let (meta, first) = first_chunk_to_2(&c, 7, 12, false);
    let chunk_at = |offset: u64| Message {
        body: MessageBody::Snapshot {
            meta: Box::new(meta.clone()),
            offset,
            data: Bytes::from_static(b"abcd"),
            done: offset + 4 == meta.size_bytes,
        },
        ..first.clone()
    };
    let answers = |acts: &[Action]| -> Vec<(u64, bool)> {
        sends(acts)
            .into_iter()
            .filter_map(|m| match m.body {
                MessageBody::SnapshotResp { next_offset, gap, .. } => Some((next_offset, gap)),
                _ => None,
            })
            .collect()
    };
    let now = c.now;
    let e = &mut c.node(2).engine;
    e.handle_message(now, first.clone());
    drain(e);
    // Bytes 4..8 are lost; 8..12 arrives: a gap at 4.
    e.handle_message(now, chunk_at(8));
    assert_eq!(answers(&drain(e)), vec![(4, true)]);
    // The first chunk again: answered with what is stored (nothing reported stored yet).
    e.handle_message(now, first);
    assert_eq!(answers(&drain(e)), vec![(0, false)]);
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
        body: MessageBody::Snapshot {
            meta: Box::new(m.clone()),
            offset: 0,
            data: Bytes::from_static(b"abcd"),
            done: true,
        },
    };
    let now = c.now;
    let e = &mut c.node(2).engine;
    e.handle_message(now, chunk(&m1));
    let mut acts = Vec::new();
    while let Some(a) = e.poll_action() {
        acts.push(a);
    }
    assert!(acts.iter().any(|a| matches!(a, Action::InstallSnapshot { meta, .. } if **meta == m1)));
    // While S1 installs, S2 arrives: nothing may start.
    e.handle_message(now, chunk(&m2));
    assert!(e.poll_action().is_none(), "no second snapshot while one installs");
    // A malformed chunk (beyond the snapshot's size) is dropped too.
    e.handle_snapshot_installed(now, m1.clone(), 1);
    while e.poll_action().is_some() {}
    let bad = Message {
        from: n(1),
        to: n(2),
        term,
        body: MessageBody::Snapshot {
            meta: Box::new(m2.clone()),
            offset: 2,
            data: Bytes::from_static(b"abcd"),
            done: true,
        },
    };
    e.handle_message(now, bad);
    assert!(e.poll_action().is_none(), "malformed chunk dropped");
    // So are chunks whose `done` flag disagrees with where they end: one marked done short of
    // the end (installing it would install a truncated snapshot), and one reaching the end
    // without it.
    for (data, done) in [(&b"ab"[..], true), (&b"abcd"[..], false)] {
        let bad = Message {
            from: n(1),
            to: n(2),
            term,
            body: MessageBody::Snapshot { meta: Box::new(m2.clone()), offset: 0, data: Bytes::from_static(data), done },
        };
        e.handle_message(now, bad);
        assert!(e.poll_action().is_none(), "malformed chunk ({} bytes, done: {done}) dropped", data.len());
    }
}

/// A snapshot being installed stays the reception under way when a new leader (a higher
/// term) makes contact: its chunks of another snapshot must not start a second reception, nor
/// may anything be applied, until the first installation is reported done (both would race
/// it in the state machine).
#[test]
fn an_installation_under_way_survives_a_change_of_leader() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let (m1, chunk) = first_chunk_to_2(&c, 7, 4, true);
    let now = c.now;
    c.node(2).engine.handle_message(now, chunk.clone());
    let first = drain(&mut c.node(2).engine);
    assert!(first.iter().any(|a| matches!(a, Action::InstallSnapshot { meta, .. } if **meta == m1)), "{first:?}");
    // Node 3 leads a higher term now and streams its own snapshot to node 2.
    let m2 = SnapshotMeta { last_log_id: LogId::new(1, 60), snapshot_id: 8, ..m1.clone() };
    let from_3 = Message {
        from: n(3),
        term: chunk.term.next(),
        body: MessageBody::Snapshot {
            meta: Box::new(m2.clone()),
            offset: 0,
            data: Bytes::from_static(b"abcd"),
            done: true,
        },
        ..chunk
    };
    c.node(2).engine.handle_message(now, from_3.clone());
    assert_eq!(c.engine(2).leader(), Some(n(3)));
    let during = drain(&mut c.node(2).engine);
    assert!(
        !during.iter().any(|a| matches!(
            a,
            Action::ReceiveSnapshotChunk { .. } | Action::InstallSnapshot { .. } | Action::Apply { .. }
        )),
        "state machine work while a snapshot installs: {during:?}"
    );
    // The first installation completes; node 3's snapshot is taken when it is sent again.
    c.node(2).engine.handle_snapshot_installed(now, m1, 1);
    drain(&mut c.node(2).engine);
    c.node(2).engine.handle_message(now, from_3);
    let after = drain(&mut c.node(2).engine);
    assert!(after.iter().any(|a| matches!(a, Action::InstallSnapshot { meta, .. } if **meta == m2)), "{after:?}");
}

/// A snapshot half received from one leader is not finished with another's chunks, even of
/// a snapshot described alike: two nodes' byte streams of the same state need not be the same
/// bytes, so mixing them could install a corrupt state. The new leader's stream starts over.
#[test]
fn a_reception_under_way_starts_over_when_another_leader_takes_over() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let (meta, chunk) = first_chunk_to_2(&c, 7, 8, false);
    let now = c.now;
    c.node(2).engine.handle_message(now, chunk.clone());
    let first = drain(&mut c.node(2).engine);
    assert!(first.iter().any(|a| matches!(a, Action::ReceiveSnapshotChunk { offset: 0, .. })), "{first:?}");
    // Node 3 leads a higher term now and sends the second half of a snapshot described alike.
    let from_3 = Message {
        from: n(3),
        term: chunk.term.next(),
        body: MessageBody::Snapshot { meta: Box::new(meta), offset: 4, data: Bytes::from_static(b"efgh"), done: true },
        ..chunk
    };
    c.node(2).engine.handle_message(now, from_3);
    assert_eq!(c.engine(2).leader(), Some(n(3)));
    let after = drain(&mut c.node(2).engine);
    assert!(
        !after.iter().any(|a| matches!(a, Action::ReceiveSnapshotChunk { .. } | Action::InstallSnapshot { .. })),
        "node 1's first half completed with node 3's second: {after:?}"
    );
    let asks_from_start = |a: &Action| {
        matches!(a, Action::Send(Message { to, body: MessageBody::SnapshotResp { next_offset: 0, gap: true, .. }, .. })
            if *to == n(3))
    };
    assert!(after.iter().any(asks_from_start), "node 3 is asked for its stream from the start: {after:?}");
}

/// An installed snapshot is durable (the state machine's contract), so a follower counts its
/// log as persisted up to the snapshot at once: it acknowledges the leader's next append
/// there without waiting for the write that purges the log behind the snapshot.
#[test]
fn a_follower_acknowledges_up_to_an_installed_snapshot_before_its_purge_is_durable() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.node(2).auto_sync = false;
    let (meta, chunk) = first_chunk_to_2(&c, 7, 4, true);
    let now = c.now;
    c.node(2).engine.handle_message(now, chunk.clone());
    drain(&mut c.node(2).engine);
    c.node(2).engine.handle_snapshot_installed(now, meta.clone(), 1);
    let after = drain(&mut c.node(2).engine);
    assert!(after.iter().any(|a| matches!(a, Action::PurgeUpTo { .. })), "{after:?}");
    // The purge is not durable; the leader's probe after the snapshot arrives.
    let last = meta.last_log_id;
    let probe = Message { body: MessageBody::Append { prev: last, entries: Vec::new(), commit: last.index }, ..chunk };
    c.node(2).engine.handle_message(now, probe);
    let out = drain(&mut c.node(2).engine);
    assert!(
        sends(&out).iter().any(|m| m.body == MessageBody::AppendResp(AppendResult::Success { matched: last.index })),
        "{out:?}"
    );
}

/// A refusal left over from an earlier reception of the same snapshot (its `InstallSnapshot`
/// found nothing to install after a corrupt chunk was refused) must not cancel the
/// installation of the snapshot streamed again since: an `Apply` issued then would run after
/// that installation, on top of the snapshot's state.
#[test]
fn a_stale_refusal_does_not_cancel_an_installation_under_way() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    // Node 2's log writes stay unsynced: entry 3 commits (nodes 1 and 3) but node 2 cannot
    // apply it yet.
    c.node(2).auto_sync = false;
    c.propose(1, "a");
    c.stabilize();
    c.settle(2);
    assert!(c.engine(2).committed() >= LogIndex(3), "node 2 knows entry 3 committed");
    assert_eq!(c.engine(2).applied(), LogIndex(2));
    let (meta, chunk) = first_chunk_to_2(&c, 7, 4, true);
    let now = c.now;
    // First reception: Receive + Install queued in the state machine (in that order).
    c.node(2).engine.handle_message(now, chunk.clone());
    let first = drain(&mut c.node(2).engine);
    assert!(first.iter().any(|a| matches!(a, Action::InstallSnapshot { reception: 1, .. })), "{first:?}");
    // The chunk was corrupt: the Receive is refused.
    c.node(2).engine.handle_snapshot_refused(now, meta.clone(), 1, "crc mismatch");
    drain(&mut c.node(2).engine);
    // The leader streams the same snapshot again; the follower queues a second Install.
    c.node(2).engine.handle_message(now, chunk.clone());
    let second = drain(&mut c.node(2).engine);
    assert!(second.iter().any(|a| matches!(a, Action::InstallSnapshot { reception: 2, .. })), "{second:?}");
    // Node 2's log write becomes durable meanwhile: applying waits for the installation.
    c.node(2).sync(now);
    let held = drain(&mut c.node(2).engine);
    assert!(!held.iter().any(|a| matches!(a, Action::Apply { .. })), "held back by the installation");
    // The FIRST Install now reports that nothing was received: stale, ignored.
    c.node(2).engine.handle_snapshot_refused(now, meta.clone(), 1, "no snapshot was received to install");
    let after = drain(&mut c.node(2).engine);
    assert!(
        !after.iter().any(|a| matches!(a, Action::Apply { .. })),
        "an Apply was issued while the second installation was queued: {after:?}"
    );
    // The second installation completes: the applied index jumps to the snapshot's.
    c.node(2).engine.handle_snapshot_installed(now, meta.clone(), 2);
    assert_eq!(c.engine(2).applied(), LogIndex(50));
}

/// A follower that has just installed a snapshot catches up from the log, even when more than
/// `log_lag_entries_max` entries were written during its transfer: its matched index is
/// moving, so the leader keeps what it needs rather than send it another snapshot.
#[test]
fn a_follower_that_just_installed_is_not_snapshotted_again() {
    let config = Config {
        log_keep_entries: 0,
        log_lag_entries_max: 3,
        log_purge_step_entries: 1,
        append_entries_max: 1,
        snapshot_chunk_bytes: 2,
        snapshot_chunks_in_flight_max: 1,
        ..cfg()
    };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    leave_node_3_behind(&mut c, 10);
    c.cut.clear();
    // Start the transfer; while it goes on, the leader applies 8 more entries (more than
    // log_lag_entries_max); the transfer holds the purge at the snapshot.
    start_unacknowledged_transfer(&mut c);
    for i in 0..8 {
        c.propose(1, &format!("w{i}"));
    }
    c.stabilize_with(|m| !matches!(m.body, MessageBody::SnapshotResp { .. }));
    c.settle(30);
    assert_eq!(c.engine(3).applied(), c.engine(1).applied(), "node 3 caught up");
    let builds = count(&c, 1, |a| matches!(a, Action::BuildSnapshot));
    assert_eq!(builds, 1, "node 3 got {builds} snapshots: the log after the first was purged as it installed");
}

/// A chunk is acknowledged once the state machine stored it, not when it was queued: the
/// leader's window bounds what waits in the receiver's memory.
#[test]
fn a_chunk_is_acknowledged_once_stored() {
    let mut c = Cluster::with_leader(&[1, 2], cfg());
    let (meta, chunk) = first_chunk_to_2(&c, 9, 8, false);
    let now = c.now;
    c.node(2).engine.handle_message(now, chunk);
    let queued = drain(&mut c.node(2).engine);
    assert!(
        !queued.iter().any(|a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::SnapshotResp { .. }))),
        "not acknowledged before it is stored: {queued:?}"
    );
    c.node(2).engine.handle_snapshot_received(now, meta.clone(), 1, 4);
    let acked = drain(&mut c.node(2).engine);
    assert!(
        acked.iter().any(
            |a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::SnapshotResp { next_offset: 4, .. }))
        ),
        "acknowledged once stored: {acked:?}"
    );
    // A report of another reception says nothing of this one.
    c.node(2).engine.handle_snapshot_received(now, meta, 7, 8);
    assert!(drain(&mut c.node(2).engine).is_empty());
}

/// A load polled for a follower (its entries were evicted from the cache) reads them from
/// storage later, after writes issued since: a purge issued meanwhile must not remove them, or
/// the load fails and the group stops.
#[test]
fn the_log_is_not_purged_under_a_load_in_flight() {
    let config = Config {
        entry_cache_bytes_max: 0,
        log_keep_entries: 0,
        log_lag_entries_max: 100,
        log_purge_step_entries: 1,
        ..cfg()
    };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    let (from, to) = hold_a_load_for_node_3(&mut c);
    // Meanwhile the log is compacted as far as it may be.
    let now = c.now;
    c.node(1).engine.compact_log(now);
    c.stabilize();
    let purged = purges(&c, 1).last().copied().unwrap_or_default();
    assert!(purged < from, "purged to {purged} under a load of {from}..={to}");
    // The load then finds its entries, and node 3 catches up from the log.
    c.node(1).hold_loads = false;
    let held = std::mem::take(&mut c.node(1).held_loads);
    for (peer, from, to, _) in held {
        let entries: Vec<Entry> = (from.0..=to.0).map(|i| c.nodes[&n(1)].entry_at(LogIndex(i))).collect();
        let now = c.now;
        c.node(1).engine.handle_entries_loaded(now, peer, entries);
    }
    c.settle(5);
    assert_eq!(c.engine(3).applied(), c.engine(1).applied());
}

/// Like the test above, but the load is still queued (not yet polled) when the purge is
/// decided, in the same step: the driver executes the load after the purge's write may have
/// started, so the queued load must hold the log back as much as one in flight.
#[test]
fn the_log_is_not_purged_under_a_load_still_queued() {
    let config = Config {
        entry_cache_bytes_max: 0,
        log_keep_entries: 0,
        log_lag_entries_max: 100,
        log_purge_step_entries: 1,
        ..cfg()
    };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut.insert((n(1), n(3)));
    for i in 0..5 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    c.cut.clear();
    // Deliver messages one by one until the leader has queued a load for node 3 (the
    // entries are not cached), and stop there, before node 1 polls it.
    let queued_from = |c: &Cluster| {
        c.engine(1).actions.iter().find_map(|a| match a {
            Action::LoadEntries { peer, from, .. } if *peer == n(3) => Some(*from),
            _ => None,
        })
    };
    let mut from = None;
    'rounds: for _ in 0..10 {
        c.advance(20);
        for _ in 0..100 {
            let now = c.now;
            let mut msgs = Vec::new();
            for node in c.nodes.values_mut() {
                node.run(now);
                msgs.append(&mut node.outbox);
            }
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                c.deliver(m);
                from = queued_from(&c);
                if from.is_some() {
                    break 'rounds;
                }
            }
        }
    }
    let from = from.expect("the leader queued a load for node 3");
    // The log is compacted as far as it may be before the load is polled.
    let now = c.now;
    c.node(1).engine.compact_log(now);
    c.node(1).run(now);
    let purged = purges(&c, 1).last().copied().unwrap_or_default();
    assert!(purged < from, "purged to {purged} under a queued load from {from}");
    c.settle(5);
    assert_eq!(c.engine(3).applied(), c.engine(1).applied());
}

/// Leader 1 with 30 entries node 3 missed and purged behind it: node 3 needs a snapshot of
/// `size` one-byte chunks (a window of 4), the links healed.
fn node_3_needing_a_snapshot_of(size: u64) -> Cluster {
    let config = Config {
        snapshot_chunk_bytes: 1,
        snapshot_chunks_in_flight_max: 4,
        log_keep_entries: 0,
        log_lag_entries_max: 0,
        log_purge_step_entries: 1,
        ..cfg()
    };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.node(1).snapshot_size = size;
    c.cut.insert((n(1), n(3)));
    c.settle(25);
    for i in 0..30 {
        c.propose(1, &format!("v{i}"));
    }
    c.stabilize();
    c.cut.clear();
    c
}

/// Runs a transfer of a `size`-chunk snapshot from leader 1 to node 3 over FIFO links with a
/// one-way delay of 5 ms between 1 and 3; if `stall`, node 3's answers are held (not lost)
/// for 100 ms once, 40 ms into the transfer. Returns the number of chunks sent to node 3.
fn chunks_sent_for_a_transfer(size: u64, stall: bool) -> u64 {
    let mut c = node_3_needing_a_snapshot_of(size);

    let delay = 5u64;
    let mut wire: BTreeMap<(NodeId, NodeId), std::collections::VecDeque<(Millis, Message)>> = BTreeMap::new();
    let mut chunks_sent = 0u64;
    let mut first_chunk_at: Option<Millis> = None;
    for _ in 0..20_000 {
        c.advance(1);
        let now = c.now;
        // Run every node; messages between 1 and 2 are delivered at once, the others queue.
        for _ in 0..1000 {
            let mut msgs = Vec::new();
            for node in c.nodes.values_mut() {
                node.run(now);
                msgs.append(&mut node.outbox);
            }
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                if m.from == n(3) || m.to == n(3) {
                    if m.to == n(3) && matches!(m.body, MessageBody::Snapshot { .. }) {
                        chunks_sent += 1;
                        first_chunk_at.get_or_insert(now);
                    }
                    let q = wire.entry((m.from, m.to)).or_default();
                    let due = q.back().map_or(now.add_ms(delay), |(d, _)| (*d).max(now.add_ms(delay)));
                    q.push_back((due, m));
                } else {
                    c.deliver(m);
                }
            }
        }
        // Deliver what is due, in order; node 3's answers are held during the stall.
        let held = stall && first_chunk_at.is_some_and(|t| now >= t.add_ms(40) && now < t.add_ms(140));
        for (link, q) in wire.iter_mut() {
            if held && link.0 == n(3) {
                continue;
            }
            while q.front().is_some_and(|(d, _)| *d <= now) {
                let (_, m) = q.pop_front().expect("checked");
                if let Some(node) = c.nodes.get_mut(&m.to) {
                    node.engine.handle_message(now, m);
                }
            }
        }
        let target = c.nodes[&n(1)].snapshot.as_ref().map(|s| s.0.last_log_id);
        if target.is_some_and(|t| c.nodes[&n(3)].sm_applied == t) {
            return chunks_sent;
        }
    }
    panic!("the snapshot was not installed ({chunks_sent} chunks sent)");
}

#[test]
fn a_transfer_without_loss_or_delay_sends_each_chunk_once() {
    let sent = chunks_sent_for_a_transfer(400, false);
    assert!(sent <= 400 + 4, "{sent} chunks sent for 400");
}

#[test]
fn answers_delayed_once_past_the_resend_timeout_do_not_make_every_later_chunk_go_twice() {
    let sent = chunks_sent_for_a_transfer(400, true);
    // One timer resend may repeat the window in flight (4) and its follow-ups; not more.
    assert!(sent <= 400 + 3 * 4, "{sent} chunks sent for a 400-chunk snapshot after one 100 ms delay, no loss");
}

#[test]
fn followers_keep_what_their_leader_keeps_so_the_next_leader_catches_a_lagging_follower_up_from_the_log() {
    let config = Config { log_keep_entries: 5, log_lag_entries_max: 20, log_purge_step_entries: 1, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    // 3 falls 60 entries behind, within two election timeouts: it still counts as catching
    // up, so leader 1 keeps its log for it, and says so in its heartbeats.
    c.cut_off(3);
    for i in 0..60 {
        c.propose(1, &format!("v{i}"));
        if i % 10 == 9 {
            c.settle(1);
        }
    }
    c.stabilize();
    let behind = c.engine(3).last_log_id().index;
    assert!(c.engine(2).applied().0 >= behind.0 + 50, "2 applied the entries 3 lacks");
    assert!(
        c.nodes[&n(2)].last_purged.index <= behind,
        "2 purged entries 3 still needs: purged to {}, 3 has {behind}",
        c.nodes[&n(2)].last_purged.index
    );
    // 1 goes; 2 leads and catches 3 up from its log, without a snapshot.
    c.cut.clear();
    c.cut_off(1);
    c.elect(2);
    c.settle(3);
    assert_eq!(c.engine(3).applied(), c.engine(2).applied(), "3 caught up");
    assert!(
        !c.nodes[&n(2)].seen.iter().any(|a| matches!(a, Action::BuildSnapshot | Action::ReadSnapshotChunk { .. })),
        "the new leader sent a snapshot"
    );
    assert_eq!(c.applied_data(3).len(), c.applied_data(2).len());
    // Caught up, and no write since: once 1 (gone) no longer counts as catching up, the
    // heartbeats let every replica purge what was kept.
    c.settle(25);
    let applied = c.engine(2).applied().0;
    for id in [2, 3] {
        let purged = c.nodes[&n(id)].last_purged.index.0;
        assert!(purged + 5 + 1 >= applied, "node {id} purged to {purged} of {applied} applied");
    }
}

#[test]
fn a_receiver_whose_disk_stalls_holds_no_more_than_the_window_unstored() {
    let mut c = node_3_needing_a_snapshot_of(400);
    // Node 3 takes chunks into its queue but its disk never reports one stored.
    let mut taken_unstored = 0u64;
    for _ in 0..2000 {
        c.advance(1);
        let now = c.now;
        for _ in 0..1000 {
            let mut msgs = Vec::new();
            for (id, node) in c.nodes.iter_mut() {
                if *id == n(3) {
                    while let Some(a) = node.engine.poll_action() {
                        match a {
                            Action::Send(m) => msgs.push(m),
                            Action::ReceiveSnapshotChunk { data, .. } => taken_unstored += data.len() as u64,
                            Action::SaveVote { io, .. }
                            | Action::AppendEntries { io, .. }
                            | Action::TruncateFrom { io, .. }
                            | Action::PurgeUpTo { io, .. } => node.engine.handle_io_done(now, io),
                            _ => {}
                        }
                    }
                } else {
                    node.run(now);
                    msgs.append(&mut node.outbox);
                }
            }
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                c.deliver(m);
            }
        }
    }
    assert!(taken_unstored <= 4, "{taken_unstored} chunks queued unstored on the receiver (window 4)");
}

/// A follower purges what its leader kept for a lagging follower as soon as a heartbeat says
/// the leader no longer keeps it, without waiting for a write: a group gone quiet once the
/// laggard caught up would otherwise keep those entries on every follower forever.
#[test]
fn a_follower_purges_what_its_leader_stopped_keeping_on_the_heartbeat_that_says_so() {
    let config = Config { log_keep_entries: 0, log_lag_entries_max: 100, log_purge_step_entries: 1, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    leave_node_3_behind(&mut c, 6);
    let applied = c.engine(2).applied();
    assert!(c.nodes[&n(2)].last_purged.index < applied, "node 2 keeps what leader 1 keeps for node 3");
    // Node 3 comes back and catches up; no write follows.
    c.cut.clear();
    let mut raised = false;
    for _ in 0..20 {
        c.advance(20);
        c.stabilize_with(|m| {
            raised |= m.to == n(2)
                && matches!(m.body, MessageBody::Heartbeat { keep_after, .. } if keep_after >= Some(applied));
            true
        });
        if raised {
            break;
        }
    }
    assert!(raised, "leader 1 told node 2 it no longer keeps anything for node 3");
    assert_eq!(c.engine(3).applied(), applied, "node 3 caught up");
    assert_eq!(c.nodes[&n(2)].last_purged.index, applied, "node 2 purged on that heartbeat");
}

/// A snapshot that ends at or below what the follower already committed (a new leader whose
/// progress for it is stale) is answered as installed and never stored or installed: the
/// state machine would go back to an older state.
#[test]
fn a_snapshot_at_or_below_the_followers_commit_index_is_answered_without_being_installed() {
    let mut c = Cluster::with_two_entries_committed();
    let committed = c.engine(2).committed();
    for last in [LogIndex(committed.0 - 1), committed] {
        let (mut meta, chunk) = first_chunk_to_2(&c, 7, 4, true);
        meta.last_log_id = LogId { term: c.engine(2).term(), index: last };
        let body = MessageBody::Snapshot {
            meta: Box::new(meta.clone()),
            offset: 0,
            data: Bytes::from_static(b"abcd"),
            done: true,
        };
        let now = c.now;
        c.node(2).engine.handle_message(now, Message { body, ..chunk });
        let out = drain(&mut c.node(2).engine);
        assert!(
            !out.iter().any(|a| matches!(a, Action::ReceiveSnapshotChunk { .. } | Action::InstallSnapshot { .. })),
            "a snapshot ending at {last} stored or installed over commit index {committed}: {out:?}"
        );
        let answered = |a: &Action| {
            matches!(
                a,
                Action::Send(Message {
                    body: MessageBody::SnapshotResp { installed: Some(_), next_offset: 4, .. },
                    ..
                })
            )
        };
        assert!(out.iter().any(answered), "{out:?}");
        assert_eq!(c.engine(2).committed(), committed);
    }
}
