//! Replication, leader and follower sides: send before persist, the pipelined window, byte
//! limits, conflict back-off, commitment by the current term, loading from storage, and
//! malformed appends.

use super::*;

#[test]
fn leader_sends_before_it_persists_and_counts_itself_once_durable() {
    // Reference: Raft thesis §10.2.1.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.node(1).auto_sync = false;
    let idx = c.propose(1, "a");
    let now = c.now;
    let actions = c.node(1).run(now);
    let append_pos = actions.iter().position(|a| matches!(a, Action::AppendEntries { .. })).unwrap();
    let send_pos = actions
        .iter()
        .position(|a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::Append { .. })))
        .unwrap();
    assert!(append_pos < send_pos);
    assert!(c.nodes[&n(1)].unsynced.len() == 1, "the leader's write is not durable yet");
    // Only node 2 answers: node 2 + a non-durable leader is no quorum.
    c.cut.insert((n(1), n(3)));
    c.stabilize();
    assert!(c.engine(1).committed() < idx);
    let now = c.now;
    c.node(1).sync(now);
    assert_eq!(c.engine(1).committed(), idx);
}

#[test]
fn pipelined_appends_fill_the_window_then_wait() {
    let config = Config { inflight_msgs_max: 3, append_entries_max: 2, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2], config);
    let now = c.now;
    let cmds: Vec<Bytes> = (0..10).map(|i| Bytes::from(format!("c{i}"))).collect();
    c.node(1).engine.propose(now, cmds).unwrap();
    let out = c.take_outbox(1);
    let appends: Vec<_> = out
        .iter()
        .filter_map(|m| if let MessageBody::Append { entries, .. } = &m.body { Some(entries.len()) } else { None })
        .collect();
    assert_eq!(appends, vec![2, 2, 2], "three messages of two entries, then the window is full");
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert_eq!(c.engine(2).last_log_id(), c.engine(1).last_log_id());
    assert_eq!(c.engine(1).committed(), c.engine(1).last_log_id().index);
}

#[test]
fn appends_in_flight_stop_at_the_byte_bound_and_go_on_as_acknowledged() {
    let config = Config { inflight_bytes_max: 3000, append_bytes_max: 1000, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2], config);
    let now = c.now;
    let cmds: Vec<Bytes> = (0..40).map(|_| Bytes::from(vec![7u8; 500])).collect();
    c.node(1).engine.propose(now, cmds).expect("propose");
    let bytes_of = |out: &[Message]| -> usize {
        out.iter()
            .filter_map(|m| match &m.body {
                MessageBody::Append { entries, .. } => Some(entries.iter().map(|e| e.size_bytes()).sum::<usize>()),
                _ => None,
            })
            .sum()
    };
    let out = c.take_outbox(1);
    let sent = bytes_of(&out);
    assert!((3000..4000).contains(&sent), "{sent} bytes sent before any acknowledgement");
    // Each acknowledgement frees room for more; everything arrives.
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert_eq!(c.engine(2).last_log_id(), c.engine(1).last_log_id());
    assert_eq!(c.engine(1).committed(), c.engine(1).last_log_id().index);
}

#[test]
fn append_messages_respect_the_byte_limit() {
    let config = Config { append_bytes_max: 250, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2], config);
    let now = c.now;
    let cmds: Vec<Bytes> = (0..4).map(|_| Bytes::from(vec![1u8; 100])).collect();
    c.node(1).engine.propose(now, cmds).unwrap();
    let out = c.take_outbox(1);
    let sizes: Vec<usize> = out
        .iter()
        .filter_map(|m| {
            if let MessageBody::Append { entries, .. } = &m.body {
                Some(entries.iter().map(|e| e.size_bytes()).sum())
            } else {
                None
            }
        })
        .collect();
    assert!(sizes.len() >= 2, "split across messages: {sizes:?}");
    assert!(sizes.iter().all(|s| *s <= 250), "{sizes:?}");
}

#[test]
fn conflict_hint_backs_off_a_whole_term_per_round_trip() {
    // Follower 1 has many entries of a stale term; the leader needs one rejection, not one
    // per entry, to find the match point.
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    let base = c.engine(1).last_log_id();
    // Node 1 leads, nodes 2 and 3 take no part; node 1 appends 20 entries nobody gets.
    c.cut.insert((n(1), n(2)));
    c.cut.insert((n(1), n(3)));
    for i in 0..20 {
        c.propose(1, &format!("lost{i}"));
    }
    c.stabilize();
    // Node 3 becomes leader with node 2 and writes in a new term; then node 2 is elected
    // in a third term, so the leader's first probe to node 1 lies beyond the divergence
    // point (a leader elected right after the stale term would probe at `base` and never be
    // rejected).
    c.cut.clear();
    for p in [2, 3] {
        c.cut.insert((n(1), n(p)));
        c.cut.insert((n(p), n(1)));
    }
    c.elect(3);
    for i in 0..5 {
        c.propose(3, &format!("won{i}"));
    }
    c.stabilize();
    c.elect(2);
    c.cut.clear();
    // Node 1 hears from node 2 and rejects; the hint lets node 2 skip the stale term.
    c.propose(2, "more");
    c.settle(4);
    let rejects = c.nodes[&n(1)]
        .seen
        .iter()
        .filter(|a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::AppendResp(AppendResult::Conflict { .. }))))
        .count();
    assert!((1..=2).contains(&rejects), "fast back-off: {rejects} rejections");
    // And the back-off lands on the last entry both logs share (`base`), not further back:
    // no append from node 2 to node 1 re-sends entries before it.
    let earliest = c.nodes[&n(2)]
        .seen
        .iter()
        .filter_map(|a| match a {
            Action::Send(Message { to, body: MessageBody::Append { prev, .. }, .. }) if *to == n(1) => Some(prev.index),
            _ => None,
        })
        .min();
    assert_eq!(earliest, Some(base.index), "node 2's appends to node 1 start at the shared prefix");
    assert_eq!(c.engine(1).last_log_id(), c.engine(2).last_log_id());
    assert!(c.applied_data(1).contains(&"won4".to_string()));
    assert!(!c.applied_data(1).iter().any(|d| d.starts_with("lost")));
    assert!(c.engine(1).last_log_id().index > base.index);
}

#[test]
fn entries_of_earlier_terms_commit_only_with_a_current_term_entry() {
    // Reference: Raft §5.4.2 (figure 8).
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    // Leader 1 appends "old" and it reaches nobody.
    c.cut.extend([(n(1), n(2)), (n(1), n(3))]);
    let old = c.propose(1, "old");
    c.stabilize();
    c.cut.clear();
    // Node 1 campaigns again in a higher term; the voters' logs are older so they grant.
    c.elect(1);
    // Before the new term's blank entry is replicated, "old" must not count as committed even
    // though the new leader has it: stop node 1's outgoing traffic right after election.
    assert!(c.engine(1).committed() >= old, "committed together with the new term's entry");
    let t = c.engine(1).term();
    assert_eq!(c.engine(1).term_at(c.engine(1).committed()), Some(t));

    // Direct check on the rule: a leader whose only replicated entries are of an old term does
    // not advance its commit index.
    let mut c =
        Cluster::with_leader(&[1, 2, 3], Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() });
    c.cut.extend([(n(1), n(2)), (n(1), n(3))]);
    let old = c.propose(1, "old");
    c.stabilize();
    c.cut.clear();
    c.now = c.now.add_ms(1000);
    c.fire(1);
    // Deliver votes but drop the new leader's appends to everyone: "old" is on the leader only.
    let mut became = false;
    c.stabilize_with(|m| {
        let drop = m.from == n(1) && matches!(m.body, MessageBody::Append { .. });
        became |= drop;
        !drop
    });
    assert!(became);
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert!(c.engine(1).committed() < old);
}

/// The figure-8 rule when the old entry does reach a quorum: a re-elected leader replicates
/// its earlier term's entry to every follower, but its own term's blank entry is lost. The
/// entry is on every replica and still not committed by counting them (a later leader
/// that never saw it could have overwritten it in the general case); it commits with the
/// blank entry.
#[test]
fn an_earlier_term_entry_on_a_quorum_is_not_committed_by_counting_replicas() {
    let config = Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut.extend([(n(1), n(2)), (n(1), n(3))]);
    let old = c.propose(1, "old");
    c.stabilize();
    c.cut.clear();
    let old_term = c.engine(1).term();
    // Node 1 learns a higher term from node 2's vote request (refused: node 1's log is
    // longer; the request to node 3 is lost), steps down, then campaigns and wins.
    c.fire(2);
    for m in c.take_outbox(2) {
        if m.to == n(1) {
            c.deliver(m);
        }
    }
    c.take_outbox(1);
    assert_eq!(c.engine(1).role(), Role::Follower);
    c.fire(1);
    // Every append loses what comes after "old" (the new term's blank entry): deliver until
    // quiet, cutting each append's entries back to those up to "old".
    for _ in 0..1000 {
        let now = c.now;
        let mut msgs = Vec::new();
        for node in c.nodes.values_mut() {
            node.run(now);
            msgs.append(&mut node.outbox);
        }
        if msgs.is_empty() {
            break;
        }
        for mut m in msgs {
            if let MessageBody::Append { entries, .. } = &mut m.body {
                entries.retain(|e| e.log_id.index <= old);
            }
            c.deliver(m);
        }
    }
    assert_eq!(c.engine(1).role(), Role::Leader);
    assert!(c.engine(1).term() > old_term);
    for f in [2, 3] {
        assert_eq!(c.engine(f).last_log_id(), LogId { term: old_term, index: old }, "node {f} holds \"old\" only");
    }
    assert!(c.engine(1).committed() < old, "an earlier term's entry committed by counting replicas");
    assert!(c.applied_data(1).is_empty());
    // The blank entry gets through: both commit.
    c.stabilize();
    c.settle(2);
    assert!(c.engine(1).committed() > old);
    assert_eq!(c.applied_data(1), vec!["old".to_string()]);
}

#[test]
fn lagging_follower_is_caught_up_from_storage_when_not_cached() {
    let config = Config { entry_cache_bytes_max: 0, append_entries_max: 8, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut.insert((n(1), n(3)));
    for i in 0..30 {
        c.propose(1, &format!("v{i}"));
        c.stabilize();
    }
    c.cut.clear();
    // The appends to node 3 were lost: after two heartbeat intervals without progress the
    // leader probes again, and the entries come from storage.
    for _ in 0..3 {
        c.advance(20);
        c.stabilize();
    }
    assert!(c.nodes[&n(1)].seen.iter().any(|a| matches!(a, Action::LoadEntries { peer, .. } if *peer == n(3))));
    assert_eq!(c.applied_data(3).len(), 30);
    // Each load reads no more than one append carries.
    for a in &c.nodes[&n(1)].seen {
        if let Action::LoadEntries { from, to, .. } = a {
            assert!(to.0 - from.0 < 8, "loads {from}..={to}");
        }
    }
}

#[test]
fn a_follower_that_missed_an_append_of_the_pipeline_is_caught_up_on_its_refusal_of_the_next() {
    // Appends to node 2 are pipelined; the first is lost and node 2 refuses the second (it
    // lacks its prev). That refusal is news, not an old answer: the leader resends from where
    // node 2's log ends at once, rather than after the two heartbeat intervals that declare
    // replication stalled.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.propose(1, "a");
    for m in c.take_outbox(1).into_iter().filter(|m| m.to != n(2)) {
        c.deliver(m);
    }
    c.propose(1, "b");
    c.stabilize();
    assert_eq!(c.engine(2).last_log_id(), c.engine(1).last_log_id(), "no time passed");
}

#[test]
fn a_malformed_append_is_dropped_not_trusted() {
    let mut c = Cluster::with_leader(&[1, 2], cfg());
    let term = c.engine(1).term();
    let last = c.engine(2).last_log_id();
    let bad = Message {
        from: n(1),
        to: n(2),
        term,
        // Entries that do not follow `prev`.
        body: MessageBody::Append {
            prev: last,
            entries: vec![Entry {
                log_id: LogId { term, index: LogIndex(last.index.0 + 5) },
                payload: EntryPayload::Blank,
            }],
            commit: LogIndex(0),
        },
    };
    let now = c.now;
    c.node(2).engine.handle_message(now, bad);
    assert!(c.take_outbox(2).is_empty());
    assert_eq!(c.engine(2).last_log_id(), last);
}

#[test]
fn a_leader_refuses_proposals_past_its_uncommitted_bytes_and_takes_them_again_once_committed() {
    let config = Config { uncommitted_bytes_max: 10, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    // Cut the leader off: nothing it proposes commits.
    c.cut_off(1);
    let now = c.now;
    let six = || vec![Bytes::from_static(b"123456")];
    // One proposal is always taken, even past the limit on its own.
    c.node(1).engine.propose(now, vec![Bytes::from_static(b"0123456789abcdef")]).expect("first proposal");
    assert_eq!(
        c.node(1).engine.propose(now, six()),
        Err(RaftError::Overloaded { pending_bytes: 16 }),
        "a second one past the limit is refused"
    );
    let last = c.engine(1).last_log_id().index;
    c.stabilize();
    assert_eq!(c.engine(1).last_log_id().index, last, "a refused proposal appends nothing");
    // Reconnected, the first proposal commits and frees the budget.
    c.cut.clear();
    c.settle(3);
    assert!(c.engine(1).committed() >= last);
    let now = c.now;
    c.node(1).engine.propose(now, six()).expect("taken once the earlier bytes committed");
    c.node(1).engine.propose(now, vec![Bytes::from_static(b"1234")]).expect("10 bytes fit exactly");
    assert!(matches!(c.node(1).engine.propose(now, six()), Err(RaftError::Overloaded { pending_bytes: 10 })));
}

#[test]
fn an_uncommitted_bytes_limit_of_zero_means_no_limit() {
    let config = Config { uncommitted_bytes_max: 0, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.cut_off(1);
    let now = c.now;
    for _ in 0..100 {
        c.node(1).engine.propose(now, vec![Bytes::from(vec![7u8; 4096])]).expect("no limit");
    }
}

#[test]
fn an_ack_waiting_for_durability_goes_to_the_leader_of_the_latest_append() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.node(2).auto_sync = false;
    let i = c.propose(1, "a");
    // The entry reaches 2 and 3; 2's write is not durable yet, so it owes 1 an ack.
    for m in c.take_outbox(1) {
        c.deliver(m);
    }
    let owed = c.take_outbox(2);
    assert!(!owed.iter().any(|m| matches!(m.body, MessageBody::AppendResp(_))), "no ack before durability");
    // 1 hands leadership to 3, which wins the next term without 2; its first append reaches 2.
    let now = c.now;
    c.node(1).engine.transfer_leader(now, n(3)).expect("transfer");
    let mut to_2 = Vec::new();
    c.stabilize_with(|m| {
        if m.to == n(2) {
            to_2.push(m.clone());
        }
        m.to != n(2) && m.from != n(2)
    });
    assert_eq!(c.engine(3).role(), Role::Leader);
    let term = c.engine(3).term();
    assert!(to_2.iter().any(|m| m.from == n(3) && matches!(m.body, MessageBody::Append { .. })));
    for m in to_2 {
        c.deliver(m);
    }
    let before_sync = c.take_outbox(2);
    assert!(!before_sync.iter().any(|m| matches!(m.body, MessageBody::AppendResp(_))), "no ack before durability");
    let now = c.now;
    c.node(2).sync(now);
    let acks: Vec<_> = c
        .take_outbox(2)
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResp(AppendResult::Success { matched }) => Some((m.to, m.term, matched)),
            _ => None,
        })
        .collect();
    assert!(
        acks.iter().any(|(to, t, matched)| *to == n(3) && *t == term && *matched > i),
        "the new leader hears of 2's durable entries at once: {acks:?}"
    );
}

/// A follower whose commit notices were lost learns the commit index from the next heartbeat
/// (it carries the commit index up to what the follower matched), and applies.
#[test]
fn a_follower_learns_the_commit_index_from_heartbeats() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let x = c.propose(1, "x");
    // Entries reach the followers; the empty appends that only carry the commit index do not.
    c.stabilize_with(|m| !matches!(&m.body, MessageBody::Append { entries, .. } if entries.is_empty()));
    assert!(c.engine(1).committed() >= x);
    assert!(c.engine(2).committed() < x, "node 2 should not know yet");
    assert!(c.applied_data(2).is_empty());
    c.advance(20);
    c.stabilize_with(|m| !matches!(&m.body, MessageBody::Append { entries, .. } if entries.is_empty()));
    assert!(c.engine(2).committed() >= x);
    assert_eq!(c.applied_data(2), vec!["x".to_string()]);
}

/// Delivers what nodes `ids` have to send, in that order, with no time passing.
fn deliver_outboxes(c: &mut Cluster, ids: &[u64]) {
    for id in ids {
        for m in c.take_outbox(*id) {
            c.deliver(m);
        }
    }
}

/// The leader's appends, then the followers' answers (nodes 1, then 2 and 3).
fn exchange(c: &mut Cluster) {
    deliver_outboxes(c, &[1]);
    deliver_outboxes(c, &[2, 3]);
}

/// With `commit_notice_delay_ms`, a commit sends no empty append at once: the next append
/// carries the commit index, and if none comes, the notice goes when the delay is up (the
/// leader's next deadline) and the followers apply. With 0, it goes at once.
#[test]
fn commit_notices_wait_their_delay_and_the_next_append_carries_the_commit() {
    let empty_appends = |out: &[Message]| {
        out.iter().filter(|m| matches!(&m.body, MessageBody::Append { entries, .. } if entries.is_empty())).count()
    };
    let config = Config { commit_notice_delay_ms: 5, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.settle(2);
    let start = c.now;
    let x = c.propose(1, "x");
    // Deliver the appends and the acknowledgements by hand: no time passes.
    exchange(&mut c);
    assert!(c.engine(1).committed() >= x, "a quorum acknowledged x");
    let out = c.take_outbox(1);
    assert_eq!(empty_appends(&out), 0, "no commit notice at once: {out:?}");
    assert!(c.engine(2).committed() < x);
    assert_eq!(c.engine(1).next_deadline(), start.add_ms(5), "the notice is the leader's next deadline");

    // A proposal before the delay is up: its append tells the followers x is committed.
    let y = c.propose(1, "y");
    let out = c.take_outbox(1);
    assert!(out.iter().all(
        |m| matches!(&m.body, MessageBody::Append { entries, commit, .. } if !entries.is_empty() && *commit >= x)
    ));
    for m in out {
        c.deliver(m);
    }
    assert!(c.engine(2).committed() >= x && c.engine(3).committed() >= x);
    deliver_outboxes(&mut c, &[2, 3]);
    assert!(c.engine(1).committed() >= y);
    assert!(c.engine(2).committed() < y, "y's commit is not told yet");

    // No more proposals: when the delay is up, the notice goes and the followers apply y.
    c.fire(1);
    assert!(c.now < start.add_ms(20), "the notice, not a heartbeat, woke the leader");
    let out = c.take_outbox(1);
    assert_eq!(empty_appends(&out), 2, "one notice to each follower: {out:?}");
    for m in out {
        c.deliver(m);
    }
    c.stabilize();
    assert!(c.engine(2).committed() >= y && c.engine(3).committed() >= y);
    assert_eq!(c.applied_data(3), vec!["x".to_string(), "y".to_string()]);

    // With no delay, the notice goes with the acknowledgements' round.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.settle(2);
    let z = c.propose(1, "z");
    exchange(&mut c);
    assert!(c.engine(1).committed() >= z);
    assert_eq!(empty_appends(&c.take_outbox(1)), 2);
}

/// An append that starts inside the follower's committed prefix (the leader resends from an
/// older point) is trimmed to what follows the commit index: the entries after it are kept
/// and acknowledged in one go, not dropped.
#[test]
fn an_append_overlapping_the_commit_index_keeps_the_entries_after_it() {
    let mut c = Cluster::with_two_entries_committed();
    let committed = c.engine(2).committed();
    // Node 2 misses "c"; then gets an append of the last three entries (two committed).
    c.cut.insert((n(1), n(2)));
    let last = c.propose(1, "c");
    c.stabilize();
    let prev_index = LogIndex(committed.0 - 2);
    let prev = LogId { term: c.engine(1).term_at(prev_index).expect("in the log"), index: prev_index };
    let entries: Vec<Entry> = (committed.0 - 1..=last.0).map(|i| c.nodes[&n(1)].entry_at(LogIndex(i))).collect();
    let term = c.engine(1).term();
    let m = Message { from: n(1), to: n(2), term, body: MessageBody::Append { prev, entries, commit: committed } };
    let now = c.now;
    c.node(2).engine.handle_message(now, m);
    let out = c.take_outbox(2);
    assert_eq!(c.engine(2).last_log_id(), c.engine(1).last_log_id());
    assert!(out.iter().any(|m| m.body == MessageBody::AppendResp(AppendResult::Success { matched: last })), "{out:?}");
}

/// Acks a follower owes one leader in one term merge to the highest index: a duplicate of an
/// older append arriving while the writes are not durable must not lower what is acknowledged
/// once they are.
#[test]
fn acks_owed_to_one_leader_merge_to_the_highest_index() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.node(2).auto_sync = false;
    let to_2 = |msgs: Vec<Message>| msgs.into_iter().find(|m| m.to == n(2)).expect("an append to node 2");
    c.propose(1, "a");
    let first = to_2(c.take_outbox(1));
    let b = c.propose(1, "b");
    let second = to_2(c.take_outbox(1));
    c.deliver(first.clone());
    c.deliver(second);
    // The first append again (duplicated by the network).
    c.deliver(first);
    let before = c.take_outbox(2);
    assert!(!before.iter().any(|m| matches!(m.body, MessageBody::AppendResp(_))), "no ack before durability");
    let now = c.now;
    c.node(2).sync(now);
    let acks: Vec<LogIndex> = c
        .take_outbox(2)
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResp(AppendResult::Success { matched }) => Some(matched),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![b]);
}

/// An ack owed to a leader in an earlier term is not merged with one owed to the same node
/// leading a later term: it is replaced, and sent in the later term once durable (merged into
/// the old term's slot it would be dropped as stale, and the new term's leader would wait).
#[test]
fn an_ack_owed_to_a_re_elected_leader_goes_out_in_its_new_term() {
    let config = Config { pre_vote: false, check_quorum: false, lease_read: false, ..cfg() };
    let mut c = Cluster::with_leader(&[1, 2, 3], config);
    c.node(2).auto_sync = false;
    c.propose(1, "a");
    for m in c.take_outbox(1) {
        c.deliver(m);
    }
    c.stabilize_with(|m| m.to != n(2) && m.from != n(2));
    // Node 1 steps down on node 3's vote request (the grant is lost), then wins the term
    // after with node 3's vote; node 2 takes no part until node 1's append of that term.
    c.fire(3);
    let req = c.take_outbox(3).into_iter().find(|m| m.to == n(1)).expect("vote request to node 1");
    c.deliver(req);
    c.take_outbox(1);
    c.fire(1);
    c.stabilize_with(|m| m.to != n(2) && m.from != n(2));
    assert_eq!(c.engine(1).role(), Role::Leader);
    let term = c.engine(1).term();
    assert!(term > c.engine(2).term());
    let noop = c.engine(1).last_log_id().index;
    // A heartbeat tells node 2 the new term; the append that follows leaves it owing an ack
    // to node 1 again, in the new term.
    c.advance(20);
    c.stabilize();
    let now = c.now;
    c.node(2).sync(now);
    let acks: Vec<_> = c
        .take_outbox(2)
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResp(AppendResult::Success { matched }) => Some((m.to, m.term, matched)),
            _ => None,
        })
        .collect();
    assert!(acks.iter().any(|(to, t, matched)| *to == n(1) && *t == term && *matched >= noop), "{acks:?}");
}

#[test]
fn a_follower_that_lost_entries_it_acknowledged_is_caught_up_from_where_its_log_ends() {
    // Node 3's disk is wiped and it comes back under its id, empty: it now rejects the probe at
    // the index it acknowledged. The leader must not keep probing there (a message ping-pong
    // that never ends and a replica that never catches up): it catches 3 up like a new one.
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    for i in 0..5 {
        c.propose(1, &format!("before{i}"));
    }
    c.stabilize();
    let acked = c.engine(3).last_log_id();
    assert_eq!(acked, c.engine(1).last_log_id());
    c.nodes.insert(n(3), TestNode::new(3, &cfg(), 7));
    let last = c.propose(1, "after");
    c.stabilize();
    assert_eq!(c.engine(3).last_log_id().index, last, "node 3 holds the whole log again");
    assert_eq!(c.engine(1).committed(), last);
    assert_eq!(c.applied_data(3), c.applied_data(1));
}

/// What node 3's disk will come back with after a roll-back: its log now, plus two entries of
/// the current term that were never sent to anyone (written by hand, as a deposed leader's
/// would be). Returns that log and the index of node 3's last entry now.
fn node_3_log_with_two_entries_never_sent(c: &Cluster) -> (Vec<Entry>, LogIndex) {
    let mut log = c.nodes[&n(3)].log.clone();
    let base = log.last().map(|e| e.log_id.index).unwrap_or(LogIndex(0));
    let term = c.engine(3).term();
    for i in 1..=2 {
        log.push(Entry {
            log_id: LogId { term, index: LogIndex(base.0 + i) },
            payload: EntryPayload::Normal(Bytes::from(format!("stale{i}"))),
        });
    }
    (log, base)
}

/// Node 1 leads and writes one entry; node 3's disk will come back with that log plus two
/// entries of node 1's term that were never sent (see `node_3_log_with_two_entries_never_sent`);
/// then node 2 takes over in a new term and proposes "b" (not yet replicated). Returns the
/// cluster, the rolled-back log and the index where it stops matching.
fn node_2_leads_over_a_log_node_3_will_roll_back_to() -> (Cluster, Vec<Entry>, LogIndex) {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.propose(1, "a");
    c.stabilize();
    let (rolled_back, base) = node_3_log_with_two_entries_never_sent(&c);
    c.elect(2);
    c.propose(2, "b");
    (c, rolled_back, base)
}

/// Node 3 restarts on `log` (its disk rolled back), keeping its vote.
fn restart_node_3_on(c: &mut Cluster, log: Vec<Entry>) {
    let vote = c.nodes[&n(3)].vote;
    c.nodes.insert(n(3), TestNode::restarted_with(3, &cfg(), log, vote));
}

#[test]
fn a_follower_whose_disk_rolled_back_to_entries_of_an_earlier_term_is_caught_up_past_them() {
    // Node 3 acknowledged the leader's entries, then its disk came back with an older log: the
    // same length, but the last entries from an earlier term that never committed. The leader
    // must not keep probing right after what 3 acknowledged (3 refuses it forever), nor trust
    // the entries that 3's hint names: their terms are not its own.
    // Node 2 takes over in a new term and writes two entries everyone acknowledges.
    let (mut c, rolled_back, _) = node_2_leads_over_a_log_node_3_will_roll_back_to();
    c.propose(2, "c");
    c.stabilize();
    assert_eq!(c.engine(3).last_log_id(), c.engine(2).last_log_id());
    // Node 3 restarts on the rolled-back disk.
    restart_node_3_on(&mut c, rolled_back);
    let last = c.propose(2, "d");
    c.stabilize();
    assert_eq!(c.engine(3).last_log_id(), c.engine(2).last_log_id(), "node 3 holds the leader's log");
    assert_eq!(c.engine(2).committed(), last);
}

#[test]
fn a_follower_whose_rolled_back_log_ends_at_the_leaders_purge_point_with_another_term_gets_a_snapshot_at_once() {
    // As above, but the leader purged its log up to exactly where node 3's rolled-back log now
    // ends, and the entry node 3 has there is not the leader's (another term): the logs agree
    // at no point the leader still holds. Its answer to node 3's first refusal is a snapshot,
    // not a probe right after its purge point that node 3 can only refuse again.
    let (mut c, rolled_back, base) = node_2_leads_over_a_log_node_3_will_roll_back_to();
    c.stabilize();
    let now = c.now;
    c.node(2).engine.compact_log(now);
    c.propose(2, "c");
    c.stabilize();
    assert_eq!(c.engine(2).first_log_index(), LogIndex(base.0 + 3), "purged up to node 3's last stale entry");
    restart_node_3_on(&mut c, rolled_back);
    let last = c.propose(2, "d");
    let mut refusals = 0;
    c.stabilize_with(|m| {
        refusals += usize::from(matches!(m.body, MessageBody::AppendResp(AppendResult::Conflict { .. })));
        true
    });
    assert_eq!(c.engine(3).last_log_id(), c.engine(2).last_log_id(), "node 3 holds the leader's log");
    assert_eq!(c.engine(2).committed(), last);
    assert_eq!(refusals, 1, "one refusal, answered with a snapshot");
}

#[test]
fn a_follower_whose_disk_rolled_back_learns_no_commit_index_from_a_heartbeat_for_entries_it_no_longer_matches() {
    // As above, node 3 acknowledged the new leader's entries and came back with a log of the
    // same indexes ending in entries of an earlier term that never committed. The leader's
    // next heartbeat says "committed up to what you matched": node 3 must not take that for
    // its own entries there and apply them. (The leader names the entry; 3 does not hold it.)
    let (mut c, rolled_back, base) = node_2_leads_over_a_log_node_3_will_roll_back_to();
    c.stabilize();
    assert_eq!(c.engine(3).last_log_id(), c.engine(2).last_log_id());
    assert_eq!(c.engine(2).committed(), c.engine(2).last_log_id().index, "3 matched all of it, committed");
    restart_node_3_on(&mut c, rolled_back);
    // Heartbeats only, before any append shows the leader that 3 lost its entries.
    c.advance(20);
    c.stabilize_with(|m| !matches!(m.body, MessageBody::Append { .. }));
    assert!(
        c.engine(3).committed() <= base,
        "node 3 committed {} past what it holds of the leader's",
        c.engine(3).committed()
    );
    assert!(!c.applied_data(3).iter().any(|d| d.starts_with("stale")), "applied: {:?}", c.applied_data(3));
    // Appends then bring node 3 the leader's log, and the commit index with it.
    let last = c.propose(2, "c");
    c.stabilize();
    c.settle(1);
    assert_eq!(c.engine(3).last_log_id(), c.engine(2).last_log_id());
    assert_eq!(c.engine(3).committed(), last);
    assert_eq!(c.applied_data(3), c.applied_data(2));
}

/// {1, 2, 3} led by node 1, with "a" and "b" committed and node 3 knowing it. The tests then
/// play node 2 leading the next term with a log forked from 3's, another term at the last
/// indexes (what an unsafe recovery onto a replica that lacked them leads to). Returns the
/// cluster, the term of 3's committed entries and 3's commit index.
fn node_3_with_two_entries_committed() -> (Cluster, Term, LogIndex) {
    let c = Cluster::with_two_entries_committed();
    let committed = c.engine(3).committed();
    let term = c.engine(1).term();
    (c, term, committed)
}

/// An append of node 2 in `term`, after `prev`, with entries of that term up to `last`.
fn forked_append(prev: LogId, last: LogIndex, commit: LogIndex, term: Term) -> Message {
    let entries = (prev.index.0 + 1..=last.0)
        .map(|i| Entry {
            log_id: LogId { term, index: LogIndex(i) },
            payload: EntryPayload::Normal(Bytes::from("forked")),
        })
        .collect();
    Message { from: n(2), to: n(3), term, body: MessageBody::Append { prev, entries, commit } }
}

/// Delivers `m` to node 3 and checks it stopped, forked at `index` (its entry of `ours`, the
/// leader's of `theirs`), without acknowledging or touching its log.
fn assert_node_3_stopped_forked(c: &mut Cluster, m: Message, index: LogIndex, ours: Term) {
    let theirs = m.term;
    let (last, committed) = (c.engine(3).last_log_id(), c.engine(3).committed());
    let now = c.now;
    c.node(3).engine.handle_message(now, m);
    let out = c.take_outbox(3);
    assert!(!out.iter().any(|m| matches!(m.body, MessageBody::AppendResp(_))), "no answer to the append: {out:?}");
    assert_eq!(c.engine(3).fatal(), Some(&Fatal::Diverged { leader: n(2), index, ours, theirs }));
    assert_eq!((c.engine(3).last_log_id(), c.engine(3).committed()), (last, committed), "log untouched");
    assert!(!c.nodes[&n(3)].seen.iter().any(|a| matches!(a, Action::TruncateFrom { .. })));
    // Stopped for good: it takes no more messages or timers and emits nothing.
    c.advance(1_000);
    assert!(c.take_outbox(3).is_empty());
}

#[test]
fn a_follower_given_entries_of_another_term_at_its_commit_index_stops_instead_of_acknowledging() {
    let (mut c, term, committed) = node_3_with_two_entries_committed();
    let new_term = term.next();
    // prev matches (below the fork); the entries cover the commit index with the new term.
    let index = LogIndex(committed.0 - 2);
    let prev = LogId { term: c.engine(3).term_at(index).expect("held"), index };
    let m = forked_append(prev, committed.next(), committed, new_term);
    assert_node_3_stopped_forked(&mut c, m, prev.index.next(), term);
}

#[test]
fn a_follower_probed_after_another_term_at_or_below_its_commit_index_stops_instead_of_acknowledging() {
    for below in [0, 1] {
        let (mut c, term, committed) = node_3_with_two_entries_committed();
        // An empty probe after the leader's entry at (or just below) 3's commit index.
        let prev = LogId { term: term.next(), index: LogIndex(committed.0 - below) };
        let m = forked_append(prev, prev.index, committed, term.next());
        assert_node_3_stopped_forked(&mut c, m, prev.index, term);
    }
}

#[test]
fn a_follower_told_by_a_heartbeat_of_another_term_at_its_commit_index_stops_instead_of_answering() {
    let (mut c, term, committed) = node_3_with_two_entries_committed();
    let theirs = term.next();
    let commit = LogId { term: theirs, index: committed };
    let m = Message {
        from: n(2),
        to: n(3),
        term: theirs,
        body: MessageBody::Heartbeat { commit, round: 1, keep_after: None },
    };
    let now = c.now;
    c.node(3).engine.handle_message(now, m);
    let out = c.take_outbox(3);
    assert!(!out.iter().any(|m| matches!(m.body, MessageBody::HeartbeatResp { .. })), "no answer: {out:?}");
    assert_eq!(c.engine(3).fatal(), Some(&Fatal::Diverged { leader: n(2), index: committed, ours: term, theirs }));
}

#[test]
fn an_append_whose_prev_is_of_a_later_term_than_the_message_is_dropped_not_taken_for_a_fork() {
    let (mut c, term, committed) = node_3_with_two_entries_committed();
    // From the leader of a new term, a `prev` of a term after it: no entry of its log.
    let prev = LogId { term: Term(term.0 + 5), index: committed };
    let m = forked_append(prev, prev.index, committed, term.next());
    let now = c.now;
    c.node(3).engine.handle_message(now, m);
    assert_eq!(c.engine(3).fatal(), None, "a malformed message stops nothing");
    assert!(!c.take_outbox(3).iter().any(|m| matches!(m.body, MessageBody::AppendResp(_))));
}

#[test]
fn entries_a_load_answers_are_sent_only_if_the_log_still_holds_them() {
    // The load read the log before a truncation changed it (this node stepped down, followed
    // another leader and leads again): storage answers entries of an earlier term at the
    // indexes the follower needs next. Sent, the follower would append them and the leader
    // count them as matching its own log. The leader loads again instead, and sends what that
    // load answers (refused too, the follower would never catch up).
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { entry_cache_bytes_max: 0, ..cfg() });
    c.elect(2);
    c.elect(1);
    let earlier = Term(c.engine(1).term().0 - 1);
    let (from, to) = hold_a_load_for_node_3(&mut c);
    let stale: Vec<Entry> = (from.0..=to.0)
        .map(|i| Entry { log_id: LogId { term: earlier, index: LogIndex(i) }, payload: EntryPayload::Blank })
        .collect();
    let now = c.now;
    c.node(1).held_loads.clear();
    c.node(1).engine.handle_entries_loaded(now, n(3), stale);
    let out = c.take_outbox(1);
    let sent = out.iter().filter_map(|m| match &m.body {
        MessageBody::Append { entries, .. } if m.to == n(3) => Some(entries),
        _ => None,
    });
    for entries in sent {
        assert!(entries.iter().all(|e| c.engine(1).term_at(e.log_id.index) == Some(e.log_id.term)), "{entries:?}");
    }
    let &(_, again, to, _) = c.nodes[&n(1)].held_loads.last().expect("loads again at once");
    assert_eq!(again, from);
    let entries: Vec<Entry> = (from.0..=to.0).map(|i| c.nodes[&n(1)].entry_at(LogIndex(i))).collect();
    c.node(1).engine.handle_entries_loaded(now, n(3), entries.clone());
    let out = c.take_outbox(1);
    assert!(
        out.iter().any(|m| m.to == n(3) && matches!(&m.body, MessageBody::Append { entries: e, .. } if *e == entries)),
        "{out:?}"
    );
}

#[test]
fn a_follower_told_from_outside_that_an_entry_it_holds_is_committed_applies_it_and_ignores_another_term() {
    let mut c = Cluster::with_two_entries_committed();
    let last = c.propose(1, "c");
    // Node 3 gets the entry, never the news that it committed.
    let mut to_3 = 0;
    c.stabilize_with(|m| {
        if m.to != n(3) {
            return true;
        }
        to_3 += 1;
        to_3 == 1 && matches!(m.body, MessageBody::Append { .. })
    });
    let id = c.engine(1).last_log_id();
    assert_eq!(id.index, last);
    assert_eq!(c.engine(1).committed(), last, "nodes 1 and 2 committed it");
    assert_eq!(c.engine(3).last_log_id(), id, "node 3 holds it");
    assert!(c.engine(3).committed() < last);
    let now = c.now;
    // Another term at that index is not the committed entry: nothing changes.
    let other = LogId { term: Term(id.term.0 + 1), index: last };
    c.node(3).engine.learn_committed(now, other);
    assert!(c.engine(3).committed() < last);
    // Beyond the log: nothing either.
    c.node(3).engine.learn_committed(now, LogId { term: id.term, index: LogIndex(last.0 + 1) });
    assert!(c.engine(3).committed() < last);
    c.node(3).engine.learn_committed(now, id);
    assert_eq!(c.engine(3).committed(), last);
    c.take_outbox(3);
    assert_eq!(c.applied_data(3), c.applied_data(1), "node 3 applied it");
}
