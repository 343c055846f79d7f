//! The stored meta state: every change round-trips through its records, follows change by
//! change, costs the records it changed, and format 1 converts.

use super::*;
use crate::placement::{MetaCommand, MovePlan, MoveStep, ReplicaRole, MOVE_HISTORY_MS};
use std::collections::BTreeMap;

/// A meta range as RocksDB would hold it.
#[derive(Default)]
struct Range(BTreeMap<Vec<u8>, Vec<u8>>);

impl Range {
    fn write(&mut self, writes: &[MetaWrite]) {
        for (k, v) in writes {
            match v {
                Some(v) => self.0.insert(k.clone(), v.clone()),
                None => self.0.remove(k),
            };
        }
    }
    fn load(&self) -> StoredMeta {
        StoredMeta::load(self.0.iter().map(|(k, v)| (k.clone(), v.clone()))).expect("load")
    }
    fn bytes(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Runs `cmd` on a copy of `stored`'s state, stores its change in `range`, and checks that a
/// copy following the change, and a replica reading the range afresh, hold the same state.
/// Returns the change's writes.
fn step(stored: &mut StoredMeta, range: &mut Range, cmd: MetaCommand) -> Vec<MetaWrite> {
    let mut next = stored.state.clone();
    next.apply(cmd.clone()).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (writes, after) = stored.changes(&next).expect("changes");
    assert_eq!(after.state, next, "{cmd:?}: the stored state is the state (no reports here)");
    range.write(&writes);
    if !writes.is_empty() {
        assert_eq!(after.revision(), stored.revision() + 1, "{cmd:?}");
    }
    // A copy read from format 1 reads again rather than follow (it holds no record numbers).
    if !stored.whole {
        let mut follower = stored.clone();
        if !writes.is_empty() {
            follower.apply(&writes).expect("follow");
        }
        assert_eq!(follower, after, "{cmd:?}: a copy following the change");
    }
    assert_eq!(range.load(), after, "{cmd:?}: a replica reading its range");
    *stored = after;
    writes
}

fn n(i: u64) -> NodeId {
    NodeId(i)
}

/// Four nodes and `shards` shards on the first three, stored by one change (each step checked
/// for the first few).
fn bootstrapped(range: &mut Range, shards: usize) -> StoredMeta {
    let mut s = StoredMeta::default();
    for i in 1..=4 {
        step(&mut s, range, MetaCommand::RegisterNode { node: n(i), addr: format!("127.0.0.1:{i}") });
    }
    step(&mut s, range, MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] });
    let mut state = s.state.clone();
    for i in 1..shards {
        let key = format!("k{i:06}").into_bytes();
        let d = state.map.lookup(&key).cloned().expect("shard");
        let split = MetaCommand::Split { shard: d.id, epoch: d.epoch, key };
        if i < 4 {
            step(&mut s, range, split);
            state = s.state.clone();
        } else {
            state.apply(split).expect("split");
        }
    }
    let (writes, after) = s.changes(&state).expect("changes");
    range.write(&writes);
    assert_eq!(range.load(), after);
    after
}

#[test]
fn every_kind_of_change_round_trips_through_its_records() {
    let mut range = Range::default();
    let mut s = bootstrapped(&mut range, 8);
    assert_eq!(s.state.map.len(), 8);
    let d = s.state.map.shards().nth(3).cloned().expect("shard");
    let epoch = |s: &StoredMeta| s.state.map.get(d.id).expect("shard").epoch;
    {
        let epoch = epoch(&s);
        step(&mut s, &mut range, MetaCommand::AddLearner { shard: d.id, epoch, node: n(4) });
    }
    {
        let epoch = epoch(&s);
        step(&mut s, &mut range, MetaCommand::Promote { shard: d.id, epoch, node: n(4) });
    }
    assert!(s.state.bootstrap.as_ref().is_some_and(|b| b.voters.len() == 3), "the bootstrap's record is stored");
    let writes = step(&mut s, &mut range, MetaCommand::BootstrapFormed { node: n(2) });
    assert_eq!(writes.len(), 2, "the bootstrap's record and the header");
    assert!(s.state.bootstrap.as_ref().is_some_and(|b| b.formed.contains(&n(2))));
    {
        let epoch = epoch(&s);
        step(&mut s, &mut range, MetaCommand::TransferLeader { shard: d.id, epoch, node: n(4) });
    }
    assert_eq!(s.state.transfers.get(&d.id), Some(&n(4)));
    {
        let epoch = epoch(&s);
        step(&mut s, &mut range, MetaCommand::RemoveReplica { shard: d.id, epoch, node: n(4) });
    }
    assert!(s.state.transfers.is_empty() && s.state.tombstones.contains_key(&d.id), "transfer gone, tombstone in");
    {
        let epoch = epoch(&s);
        step(&mut s, &mut range, MetaCommand::AddLearner { shard: d.id, epoch, node: n(4) });
    }
    assert!(s.state.tombstones.is_empty(), "the tombstone went with the replica's return");
    step(&mut s, &mut range, MetaCommand::SetDraining { node: n(2), draining: true });
    // A move started and aborted before its learner came: a plan and a recent move, then no
    // plan.
    let other = s.state.map.shards().next().cloned().expect("shard");
    let plan = MovePlan {
        shard: other.id,
        from: n(1),
        to: n(4),
        transfer_leader_to: None,
        step: MoveStep::AddLearner,
        catch_up_lag_entries_max: 100,
    };
    step(&mut s, &mut range, MetaCommand::StartMove { epoch: other.epoch, plan, now_ms: 5 });
    assert_eq!(s.state.moves.len(), 1);
    step(&mut s, &mut range, MetaCommand::AdvanceMove { shard: other.id, step: MoveStep::AddLearner });
    let learner = s.state.map.get(other.id).and_then(|d| d.replica(n(4))).map(|r| r.role);
    assert_eq!(learner, Some(ReplicaRole::Learner));
    step(&mut s, &mut range, MetaCommand::AbortMove { shard: other.id });
    assert!(s.state.moves.is_empty() && s.state.recent_moves.len() == 1);
    // A command that changes nothing stored writes nothing.
    let before = s.revision();
    assert!(step(&mut s, &mut range, MetaCommand::SetDraining { node: n(2), draining: true }).is_empty());
    assert_eq!(s.revision(), before);
}

#[test]
fn a_split_or_a_replica_change_writes_its_records_not_the_map() {
    let mut range = Range::default();
    let mut s = bootstrapped(&mut range, 1000);
    let whole = range.bytes();
    assert!(whole > 50_000, "1000 shards take {whole} bytes");
    let d = s.state.map.lookup(b"k000500").cloned().expect("shard");
    let writes =
        step(&mut s, &mut range, MetaCommand::Split { shard: d.id, epoch: d.epoch, key: b"k000500x".to_vec() });
    let bytes: usize = writes.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
    assert_eq!(writes.len(), 3, "the two halves and the header: {writes:?}");
    assert!(bytes < 300, "a split writes {bytes} bytes of a {whole}-byte map");
    eprintln!("a split of one of 1000 shards writes {bytes} bytes in 3 records; the map's records hold {whole}");
    let e = s.state.map.get(d.id).expect("shard").epoch;
    let writes = step(&mut s, &mut range, MetaCommand::AddLearner { shard: d.id, epoch: e, node: n(4) });
    assert_eq!(writes.len(), 2, "the descriptor and the header: {writes:?}");
}

#[test]
fn recent_moves_drop_the_oldest_and_append_without_rewriting_the_rest() {
    let mut range = Range::default();
    let mut s = bootstrapped(&mut range, 2);
    let d = s.state.map.shards().next().cloned().expect("shard");
    for i in 0..5u64 {
        let plan = MovePlan {
            shard: d.id,
            from: n(1),
            to: n(4),
            transfer_leader_to: None,
            step: MoveStep::AddLearner,
            catch_up_lag_entries_max: 100,
        };
        // Each move an hour after the last: the one before falls out of the history.
        let now_ms = 1 + i * MOVE_HISTORY_MS;
        let writes = step(&mut s, &mut range, MetaCommand::StartMove { epoch: d.epoch, plan, now_ms });
        let recent: Vec<&MetaWrite> = writes.iter().filter(|(k, _)| ids(k, RECENT, 1).is_some()).collect();
        assert_eq!(recent.len(), if i == 0 { 1 } else { 2 }, "one appended, one dropped: {recent:?}");
        step(&mut s, &mut range, MetaCommand::AbortMove { shard: d.id });
        assert_eq!(s.state.recent_moves.len(), 1);
        assert_eq!(s.header.recent_first, i);
    }
}

#[test]
fn a_format_1_state_is_read_then_converted_by_the_first_change_and_unknown_formats_are_refused() {
    let mut range = Range::default();
    let s = bootstrapped(&mut range, 20);
    let mut old = s.state.clone();
    std::sync::Arc::make_mut(&mut old.nodes.get_mut(&n(1)).expect("node").report).leading.push(ShardId(1));
    let mut v1 = vec![META_FORMAT_WHOLE];
    v1.extend(old.snapshot().expect("snapshot"));
    let mut legacy = Range::default();
    legacy.0.insert(META_STATE_KEY.to_vec(), v1.clone());
    let mut read = legacy.load();
    assert!(read.whole && read.revision() == 0 && read.guard == Some(v1));
    assert_eq!(read.state, s.state, "read as stored, reports aside");
    // The first change writes every record and the format-2 header, replacing the old value.
    let writes = step(&mut read, &mut legacy, MetaCommand::SetDraining { node: n(3), draining: true });
    assert_eq!(writes.len(), 4 + 20 + 1 + 1, "every node and shard, the bootstrap's record and the header");
    assert!(!read.whole && read.revision() == 1);
    assert_eq!(legacy.0.get(META_STATE_KEY).map(|v| v[0]), Some(META_FORMAT_RECORDS));
    // Anything else under the header's key, or an unknown record, is refused with its reason.
    let mut bad = Range::default();
    bad.0.insert(META_STATE_KEY.to_vec(), vec![3, 0]);
    let err = StoredMeta::load(bad.0.clone()).expect_err("format 3");
    assert!(err.contains("format 3 is not supported"), "{err}");
    let mut mixed = legacy.0.clone();
    mixed.insert(b"\x00meta/what/1".to_vec(), vec![1]);
    assert!(StoredMeta::load(mixed).expect_err("unknown").contains("not a record this build knows"));
}

#[test]
fn a_copy_refuses_a_change_that_does_not_follow_its_revision() {
    let mut range = Range::default();
    let mut s = bootstrapped(&mut range, 2);
    let stale = s.clone();
    let w1 = step(&mut s, &mut range, MetaCommand::SetDraining { node: n(1), draining: true });
    let w2 = step(&mut s, &mut range, MetaCommand::SetDraining { node: n(1), draining: false });
    let mut copy = stale.clone();
    assert!(copy.apply(&w2).expect_err("skips one").contains("does not follow"));
    copy.apply(&w1).expect("in order");
    copy.apply(&w2).expect("in order");
    assert_eq!(copy, s);
    copy.apply(&w1).expect("a change held already");
    copy.apply(&w2).expect("a change held already");
    assert_eq!(copy, s, "changes held already are skipped");
}

/// After an unsafe recovery forced the meta group onto a replica that lacked changes other
/// nodes had seen, the recovery's change is written above every revision they hold: their
/// copies, of another history, refuse it as a gap and read the whole state again instead of
/// taking later changes of the new history on top of the lost ones.
#[test]
fn a_change_written_above_a_floor_starts_past_every_copy_of_a_lost_history() {
    let mut range = Range::default();
    let forced = bootstrapped(&mut range, 2);
    // The lost history: two more changes that a following copy took.
    let mut lost_range = Range(range.0.clone());
    let mut lost = forced.clone();
    step(&mut lost, &mut lost_range, MetaCommand::SetDraining { node: n(4), draining: true });
    step(&mut lost, &mut lost_range, MetaCommand::RegisterNode { node: n(5), addr: "127.0.0.1:5".into() });
    let floor = lost.revision();

    let mut next = forced.state.clone();
    next.apply(MetaCommand::SetDraining { node: n(2), draining: true }).expect("drain");
    let (writes, after) = forced.changes_above(&next, floor).expect("changes");
    assert_eq!(after.revision(), floor + 2, "written above the floor, leaving a gap after it");
    range.write(&writes);
    assert_eq!(range.load(), after, "a replica reading its range");
    // With no item changed, a floor not passed yet is a change of the header alone.
    let (header_only, jumped) = forced.changes_above(&forced.state, floor).expect("changes");
    assert_eq!((header_only.len(), jumped.revision()), (1, floor + 2));
    let (none, _) = after.changes_above(&after.state, floor).expect("changes");
    assert!(none.is_empty(), "a floor passed already asks for nothing");
    // A floor near the end of the revisions is refused.
    let huge = crate::unsafe_recovery::REVISION_FLOOR_MAX + 1;
    assert!(forced.changes_above(&next, huge).expect_err("refused").contains("not believable"));
    // A floor below the next revision changes nothing.
    let (_, plain) = forced.changes_above(&next, 0).expect("changes");
    assert_eq!(plain.revision(), forced.revision() + 1);

    let mut copy = lost.clone();
    assert!(copy.apply(&writes).expect_err("another history").contains("does not follow"));
    assert_eq!(copy, lost, "nothing of the new history is taken on top of the lost one");
    let mut behind = forced.clone();
    assert!(behind.apply(&writes).is_err(), "a copy of the kept history reads the whole state too");
}

/// A state of 300 shards (its records), the same state stored in format 1 (one key), and
/// that range read.
fn format_1_of_300_shards() -> (StoredMeta, Range, StoredMeta) {
    let mut range = Range::default();
    let s = bootstrapped(&mut range, 300);
    let mut v1 = vec![META_FORMAT_WHOLE];
    v1.extend(s.state.snapshot().expect("snapshot"));
    let mut legacy = Range::default();
    legacy.0.insert(META_STATE_KEY.to_vec(), v1);
    let read = legacy.load();
    (s, legacy, read)
}

#[test]
fn a_large_format_1_state_converts_in_parts_and_a_conversion_cut_short_is_ignored() {
    let (s, mut legacy, read) = format_1_of_300_shards();
    let (writes, after) = read.changes(&read.state).expect("changes");
    let parts = conversion_parts(writes.clone(), 100, 1 << 20);
    assert_eq!(parts.len(), 5, "304 records in parts of 100, then the header alone");
    assert!(parts.last().is_some_and(|p| p.len() == 1 && p[0].0 == META_STATE_KEY));
    assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), writes.len());
    // Cut short after two parts: still the format-1 state, and converting again works.
    legacy.write(&parts[0]);
    legacy.write(&parts[1]);
    assert_eq!(legacy.load(), read, "records under a format-1 header are ignored");
    for p in conversion_parts(writes, 64, 2_000) {
        assert!(
            p.len() <= 64 && p.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum::<usize>() <= 2_000
        );
        legacy.write(&p);
    }
    assert_eq!(legacy.load(), after);
    assert_eq!(after.state, s.state);
}

/// A format-1 state, its records cut short after a conversion for `first` (every part but the
/// header), then converted again for `second` the way the meta leader does it (deleting what it
/// does not rewrite): the range must then load as exactly `second`'s state.
fn convert_twice(first: MetaCommand, second: MetaCommand) -> (StoredMeta, StoredMeta) {
    let (_, mut legacy, read) = format_1_of_300_shards();
    let mut next_a = read.state.clone();
    next_a.apply(first).expect("first op");
    let (writes_a, _) = read.changes(&next_a).expect("changes");
    let existing: Vec<Vec<u8>> = legacy.0.keys().cloned().collect();
    let parts_a = conversion_parts(without_leftovers(writes_a, existing), 100, 1 << 20);
    assert!(parts_a.len() > 2, "the conversion takes several parts");
    for p in &parts_a[..parts_a.len() - 1] {
        legacy.write(p);
    }
    assert_eq!(legacy.load(), read, "cut short: still the format-1 state");
    let mut next_b = read.state.clone();
    next_b.apply(second).expect("second op");
    let (writes_b, after_b) = read.changes(&next_b).expect("changes");
    let existing: Vec<Vec<u8>> = legacy.0.keys().cloned().collect();
    for p in conversion_parts(without_leftovers(writes_b, existing), 100, 1 << 20) {
        legacy.write(&p);
    }
    (legacy.load(), after_b)
}

#[test]
fn a_conversion_done_again_for_another_op_leaves_no_shard_of_the_first() {
    let mut probe = Range::default();
    let d = bootstrapped(&mut probe, 300).state.map.lookup(b"k000150x").cloned().expect("shard");
    let split = MetaCommand::Split { shard: d.id, epoch: d.epoch, key: b"k000150x".to_vec() };
    let (loaded, expected) = convert_twice(split, MetaCommand::SetDraining { node: n(4), draining: true });
    assert_eq!(loaded, expected);
}

#[test]
fn a_conversion_done_again_for_another_op_leaves_no_transfer_of_the_first() {
    let mut probe = Range::default();
    let d = bootstrapped(&mut probe, 300).state.map.get(ShardId(7)).cloned().expect("shard 7");
    let transfer = MetaCommand::TransferLeader { shard: d.id, epoch: d.epoch, node: n(2) };
    let (loaded, expected) = convert_twice(transfer, MetaCommand::SetDraining { node: n(4), draining: true });
    assert_eq!(loaded.state.transfers, expected.state.transfers);
    assert_eq!(loaded, expected);
}

/// A state of `shards` shards made from `base` in one change, as a bootstrap makes it.
fn many_shards(base: &StoredMeta, shards: usize) -> MetaState {
    let mut state = base.state.clone();
    if state.map.is_empty() {
        state.apply(MetaCommand::Bootstrap { nodes: vec![n(1), n(2), n(3)] }).expect("bootstrap");
    }
    for i in 1..shards {
        let key = format!("k{i:06}").into_bytes();
        let d = state.map.lookup(&key).cloned().expect("shard");
        if d.start != key {
            state.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key }).expect("split");
        }
    }
    state
}

#[test]
fn a_change_too_large_for_one_transaction_is_written_in_parts_that_each_fit() {
    let mut range = Range::default();
    let mut s = StoredMeta::default();
    for i in 1..=3 {
        step(&mut s, &mut range, MetaCommand::RegisterNode { node: n(i), addr: format!("127.0.0.1:{i}") });
    }
    let next = many_shards(&s, 3_000);
    let (writes, after) = s.changes(&next).expect("changes");
    let all = writes.len();
    let parts = change_parts(writes, s.header.next_shard_id, 1_000, 64 << 10).expect("parts");
    assert!(parts.len() >= 4, "{} parts", parts.len());
    assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), all, "every write in exactly one part");
    for p in &parts {
        let bytes: usize = p.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        assert!(p.len() <= 1_000 && bytes <= 64 << 10, "{} writes, {bytes} bytes", p.len());
    }
    let last = parts.last().expect("a last part");
    assert!(last.iter().any(|(k, _)| k.as_slice() == META_STATE_KEY), "the header comes last");
    // Until the last part lands, a replica reading its range sees the state before the change.
    for p in &parts[..parts.len() - 1] {
        range.write(p);
        let read = range.load();
        assert_eq!((read.state.clone(), read.header), (s.state.clone(), s.header));
        assert!(!read.leftovers.is_empty());
    }
    range.write(last);
    assert_eq!(range.load(), after, "the whole change once the header landed");
    assert_eq!(after.state.map.len(), 3_000);
    // A change that fits stays one part.
    let small = change_parts(vec![(META_STATE_KEY.to_vec(), Some(vec![1]))], 0, 10, 100).expect("parts");
    assert_eq!(small.len(), 1);
}

#[test]
fn a_change_in_parts_cut_short_is_not_state_and_the_next_change_deletes_what_it_left() {
    let mut range = Range::default();
    let s = bootstrapped(&mut range, 4);
    let before = range.0.len();
    let next = many_shards(&s, 2_000);
    let (writes, _) = s.changes(&next).expect("changes");
    let parts = change_parts(writes, s.header.next_shard_id, 500, 1 << 20).expect("parts");
    assert!(parts.len() > 2);
    // Two parts land; the proposer then dies.
    range.write(&parts[0]);
    range.write(&parts[1]);
    let read = range.load();
    assert_eq!(read.state, s.state, "shards of a change without its header are not state");
    assert_eq!(read.leftovers.len(), parts[0].len() + parts[1].len());
    // The next change (any: here a node registers) deletes them; the range holds only state.
    let mut read = read;
    let writes = step(&mut read, &mut range, MetaCommand::RegisterNode { node: n(9), addr: "127.0.0.1:9".into() });
    assert!(writes.iter().filter(|(_, v)| v.is_none()).count() >= parts[0].len() + parts[1].len());
    assert_eq!(range.0.len(), before + 1, "one node record more, no leftover");
    assert!(range.load().leftovers.is_empty());
}

#[test]
fn what_must_go_with_the_header_is_refused_when_it_does_not_fit() {
    let mut range = Range::default();
    let s = bootstrapped(&mut range, 50);
    // Moving every replica changes existing records only: nothing may go ahead of the header.
    let mut next = s.state.clone();
    for d in s.state.map.shards() {
        next.apply(MetaCommand::AddLearner { shard: d.id, epoch: d.epoch, node: n(4) }).expect("learner");
    }
    let (writes, _) = s.changes(&next).expect("changes");
    let e = change_parts(writes, s.header.next_shard_id, 10, 1 << 20).expect_err("too large");
    assert!(e.contains("too large for one meta transaction"), "{e}");
}

#[test]
fn thousands_of_leftovers_do_not_stop_the_next_change() {
    let mut range = Range::default();
    let s = bootstrapped(&mut range, 4);
    let next = many_shards(&s, 12_000);
    let (writes, _) = s.changes(&next).expect("changes");
    let parts = change_parts(writes, s.header.next_shard_id, 4_096, 1 << 20).expect("parts");
    assert!(parts.len() >= 4);
    // Two parts land (8,192 shard records); the proposer dies.
    range.write(&parts[0]);
    range.write(&parts[1]);
    let read = range.load();
    assert_eq!(read.leftovers.len(), 8_192);
    // A small change must still go through: its deletes of the leftovers go ahead of the header.
    let mut next = read.state.clone();
    next.apply(MetaCommand::RegisterNode { node: n(9), addr: "127.0.0.1:9".into() }).expect("register");
    let (writes, after) = read.changes(&next).expect("changes");
    let parts = change_parts(writes, read.header.next_shard_id, 4_096, 1 << 20).expect("the change fits in parts");
    for p in &parts {
        assert!(p.len() <= 4_096);
        range.write(p);
    }
    assert_eq!(range.load(), after);
    assert!(range.load().leftovers.is_empty());
}

#[test]
fn the_backup_a_cluster_was_restored_from_is_one_record_that_follows_and_reloads() {
    let mut range = Range::default();
    let mut s = bootstrapped(&mut range, 3);
    let mut next = s.state.clone();
    next.restored_from = Some("18c0ffee-1".into());
    let (writes, after) = s.changes(&next).expect("changes");
    assert_eq!(writes.len(), 2, "the record and the header: {writes:?}");
    range.write(&writes);
    assert_eq!(range.load(), after, "a replica reading its range");
    let mut follower = s.clone();
    follower.apply(&writes).expect("follow");
    assert_eq!(follower, after, "a copy following the change");
    s = after;
    assert_eq!(s.state.restored_from.as_deref(), Some("18c0ffee-1"));
    // The whole state (a view, format 1) carries it, and one serialized before this field,
    // `removed`, `merges` and the bootstrap record existed (it ends where they start: an
    // empty set, `None`, an empty map and `None`, a zero byte each, are its last bytes) is
    // still read.
    assert_eq!(MetaState::restore(&s.state.snapshot().expect("snapshot")).expect("restore"), s.state);
    let mut old = s.state.clone();
    old.restored_from = None;
    old.bootstrap = None;
    let bytes = old.snapshot().expect("snapshot");
    assert_eq!(bytes[bytes.len() - 4..], [0, 0, 0, 0]);
    assert_eq!(MetaState::restore(&bytes[..bytes.len() - 4]).expect("restore the older layout"), old);
    assert!(MetaState::restore(&[bytes.as_slice(), &[0]].concat()).is_err(), "trailing bytes");
}

#[test]
fn a_merge_plan_is_one_record_through_its_phases_and_the_commit_writes_two_shards_not_the_map() {
    let mut range = Range::default();
    let mut s = bootstrapped(&mut range, 3);
    let shards: Vec<_> = s.state.map.shards().cloned().collect();
    let (left, right) = (&shards[0], &shards[1]);
    let begin = MetaCommand::BeginMerge {
        left: left.id,
        left_epoch: left.epoch,
        right: right.id,
        right_epoch: right.epoch,
        now_ms: 5,
    };
    step(&mut s, &mut range, begin);
    let plan = s.state.merges.get(&left.id).cloned().expect("a plan under the left shard");
    assert_eq!(range.load(), s, "a replica reading its range");
    let commit = MetaCommand::CommitMerge {
        left: left.id,
        id: plan.id,
        freeze_term: 2,
        freeze_index: crate::placement::LogIndex(9),
    };
    let mut next = s.state.clone();
    // The nodes report the freeze applied (reports are not stored: the change is the same).
    for info in next.nodes.values_mut() {
        std::sync::Arc::make_mut(&mut info.report).applied.insert(right.id, crate::placement::LogIndex(9));
    }
    next.apply(commit).expect("commit");
    let (writes, after) = s.changes(&next).expect("changes");
    // The left shard's descriptor, the right one's deletion, the plan and the header.
    assert_eq!(writes.len(), 4, "{writes:?}");
    range.write(&writes);
    let mut follower = s.clone();
    follower.apply(&writes).expect("follow");
    assert_eq!(follower, after);
    assert_eq!(range.load(), after);
    s = after;
    assert!(s.state.map.get(right.id).is_none());
    step(&mut s, &mut range, MetaCommand::FinishMerge { left: left.id, id: plan.id });
    assert!(s.state.merges.is_empty());
    assert_eq!(range.load(), s);
}
