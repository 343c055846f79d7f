//! The meta group (group 0): where the placement [`MetaState`] lives, and how it changes.
//!
//! The shard host runs key-value state machines only, so the meta group is an ordinary host
//! group that owns a reserved key range, `[0x00, 0x01)`: user keys may not start with `0x00`
//! (checked at the node and in the client), and data shards' host ranges start at `0x01` at
//! the lowest, so no data shard's snapshot or cleanup ever touches a meta key. The state is
//! stored there as one small record per item under a header ([`records`]), so the group's
//! ordinary snapshots, restarts and catch-up carry it with no code of their own.
//!
//! **Changing it.** The meta leader runs each [`MetaOp`] as: ReadIndex (linearizable) → the
//! state at that point (its in-memory copy, or read from its replica's records when the header
//! changed) → apply the op to a copy, with the nodes' live reports laid over it → one
//! `KvCommand::Txn` writing only the records the op changed, guarded by the header it read. A
//! guard that no longer matches (another change got in between: a previous meta leader's, say)
//! sends the op back to the read. One node serializes its own meta ops with a lock, so retries
//! are rare. An op is checked against the state it is applied to, so a retried op is never
//! applied on top of itself unknowingly: either it still fits the state or it is refused with
//! the reason.
//!
//! Why the log carries the op's effect (records) rather than the op: ops are checked against
//! the nodes' reports, which only the meta leader holds (they change every second and are not
//! replicated), so replicas could not re-run them to the same result. The effect is what the
//! leader decided; every replica applies it the same way, and it costs the records changed.

pub mod change_log;
pub mod leader_op;
pub mod map_history;
pub mod records;

use crate::peer_wire::MetaOp;
use crate::placement::{
    balance, BalancerConfig, MetaCommand, MetaOutcome, MetaState, NodeId, ShardDescriptor, ShardId,
};
use crate::raft::GroupId;
use crate::shard::{KeyRange, Store, CF_DATA};
use crate::wire::AdminResponse;

/// The meta group's id.
pub const META_GROUP: GroupId = GroupId(0);
pub use records::{StoredMeta, META_STATE_KEY};
/// Format version of a meta state sent between nodes ([`encode_view`]): its revision and the
/// whole state. 3: the state ends with the nodes removed for good (unsafe recovery).
pub const META_VIEW_FORMAT: u8 = 4;
/// The first key a data shard may own: everything below belongs to the meta group.
pub const USER_KEYS_START: &[u8] = &[0x01];

/// Calls `each` with every record of the meta range of `store`, in key order (one iterator:
/// one point in time).
fn scan_records_blocking(store: &Store, mut each: impl FnMut(&[u8], &[u8])) -> Result<(), String> {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(USER_KEYS_START.to_vec());
    let cf = store.cf(CF_DATA).map_err(|e| e.to_string())?;
    let mode = rocksdb::IteratorMode::From(records::META_PREFIX, rocksdb::Direction::Forward);
    for item in store.db().iterator_cf_opt(cf, opts, mode) {
        let (k, v) = item.map_err(|e| format!("reading the meta state: {e}"))?;
        if !k.starts_with(records::META_PREFIX) {
            break;
        }
        each(&k, &v);
    }
    Ok(())
}

/// Reads the meta state this node's replica holds (blocking): its records, in one consistent
/// read of the meta range.
pub fn read_stored_blocking(store: &Store) -> Result<StoredMeta, String> {
    let mut pairs = Vec::new();
    scan_records_blocking(store, |k, v| pairs.push((k.to_vec(), v.to_vec())))?;
    StoredMeta::load(pairs)
}

/// The keys of every record now in the meta range of `store` (the header's included).
pub fn record_keys_blocking(store: &Store) -> Result<Vec<Vec<u8>>, String> {
    let mut keys = Vec::new();
    scan_records_blocking(store, |k, _| keys.push(k.to_vec()))?;
    Ok(keys)
}

/// The meta group's key range.
pub fn meta_range() -> KeyRange {
    KeyRange { start: vec![0x00], end: Some(USER_KEYS_START.to_vec()) }
}

/// The host range of a data shard: its map range, with the reserved prefix cut off.
pub fn shard_range(d: &ShardDescriptor) -> KeyRange {
    let start = if d.start.as_slice() < USER_KEYS_START { USER_KEYS_START.to_vec() } else { d.start.clone() };
    KeyRange { start, end: d.end.clone() }
}

/// Serializes a meta state and its revision, for another node.
pub fn encode_view(revision: u64, state: &MetaState) -> Result<Vec<u8>, String> {
    let mut out = vec![META_VIEW_FORMAT];
    out.extend(revision.to_be_bytes());
    out.extend(state.snapshot()?);
    Ok(out)
}

/// Reads bytes made by [`encode_view`]: the revision and the state.
pub fn decode_view(bytes: &[u8]) -> Result<(u64, MetaState), String> {
    let (&version, body) = bytes.split_first().ok_or("empty meta state")?;
    if version != META_VIEW_FORMAT {
        return Err(format!("meta state format {version} is not supported (this build reads {META_VIEW_FORMAT})"));
    }
    if body.len() < 8 {
        return Err("truncated meta state".into());
    }
    let (rev, state) = body.split_at(8);
    let mut b = [0u8; 8];
    b.copy_from_slice(rev);
    Ok((u64::from_be_bytes(b), MetaState::restore(state)?))
}

/// Most shards a new cluster starts with (`flotilla dev --shards`, `bootstrap.shards`). The
/// bootstrap is one meta change; above a transaction's limits its shard records are written in
/// parts before the header ([`records::change_parts`]). Nothing sends the map in one message
/// any more: the whole meta state goes in parts, forwarded ops are answered with changes, and
/// clients read the map in pages. The bound is what has been run and measured: three server
/// processes on a 2-core machine with 100,000 shards each on all three (BENCHMARKS.md).
pub const BOOTSTRAP_SHARDS_MAX: u32 = 100_000;

/// For tests: a meta state of nodes 1, 2 and 3, bootstrapped on all three and split into
/// `shards` shards at [`dev_split_keys`].
#[cfg(test)]
pub(crate) fn three_node_state(shards: u32) -> crate::placement::MetaState {
    use crate::placement::{MetaCommand, MetaState, NodeId};
    let mut s = MetaState::default();
    for n in 1..=3 {
        let cmd = MetaCommand::RegisterNode { node: NodeId(n), addr: format!("127.0.0.1:{}", 7000 + n) };
        s.apply(cmd).expect("register");
    }
    s.apply(MetaCommand::Bootstrap { nodes: vec![NodeId(1), NodeId(2), NodeId(3)] }).expect("bootstrap");
    for key in dev_split_keys(shards) {
        let d = s.map.lookup(&key).expect("a shard holds every key").clone();
        s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key }).expect("split");
    }
    s
}

/// Split keys spreading `shards` shards evenly over hex prefixes (the bench's keys are hex
/// strings, and most text keys land in some shard): `shards - 1` keys, of two hex digits
/// (`00`..`ff`) up to 256 shards, of four (`0000`..`ffff`) up to 65,536, of six beyond.
pub fn dev_split_keys(shards: u32) -> Vec<Vec<u8>> {
    let s = u64::from(shards.clamp(1, BOOTSTRAP_SHARDS_MAX));
    if s <= 256 {
        return (1..s).map(|i| format!("{:02x}", 256 * i / s).into_bytes()).collect();
    }
    if s <= 65_536 {
        return (1..s).map(|i| format!("{:04x}", 65_536 * i / s).into_bytes()).collect();
    }
    (1..s).map(|i| format!("{:06x}", (1u64 << 24) * i / s).into_bytes()).collect()
}

fn changed(outcome: MetaOutcome, acc: &mut Vec<ShardDescriptor>) {
    if let MetaOutcome::Shards(v) = outcome {
        acc.extend(v);
    }
}

/// Applies `op` to `state` (a copy the caller CASes in afterwards). On error `state` may be
/// half-changed: the caller drops it.
pub fn run_op(op: &MetaOp, state: &mut MetaState, balancer: &BalancerConfig) -> Result<AdminResponse, String> {
    match op {
        MetaOp::Read => Ok(AdminResponse::Done("read".into())),
        MetaOp::RaiseRevision { floor } => Ok(AdminResponse::Done(format!("revision raised above {floor}"))),
        MetaOp::Commands(cmds) => {
            let mut acc = Vec::new();
            for c in cmds {
                changed(state.apply(c.clone()).map_err(|e| e.to_string())?, &mut acc);
            }
            Ok(AdminResponse::Changed(acc))
        }
        MetaOp::Bootstrap { nodes, replicas, split_keys, backup_id } => {
            if !state.map.is_empty() {
                return Ok(AdminResponse::Done("already bootstrapped".into()));
            }
            for (node, addr) in nodes {
                state
                    .apply(MetaCommand::RegisterNode { node: *node, addr: addr.clone() })
                    .map_err(|e| e.to_string())?;
            }
            state.apply(MetaCommand::Bootstrap { nodes: replicas.clone() }).map_err(|e| e.to_string())?;
            for key in split_keys {
                let d = state.map.lookup(key).cloned().ok_or("no shard after bootstrap")?;
                if d.start == *key {
                    continue;
                }
                state
                    .apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: key.clone() })
                    .map_err(|e| e.to_string())?;
            }
            state.restored_from = backup_id.clone();
            Ok(AdminResponse::Changed(state.map.shards().cloned().collect()))
        }
        // Taken onto the report the meta leader holds before it runs (`Node::meta_local`).
        MetaOp::ReportChange { .. } => Err("a report change is run as the whole report it makes".into()),
        MetaOp::Report { node, addr, .. } => {
            if state.nodes.get(node).map(|n| &n.addr) != Some(addr) {
                state
                    .apply(MetaCommand::RegisterNode { node: *node, addr: addr.clone() })
                    .map_err(|e| e.to_string())?;
            }
            // Reports name shards the node hosts; keep only those the map still has.
            let mut report = op.full_report().unwrap_or_default();
            report.leading.retain(|s| state.map.get(*s).is_some());
            report.applied.retain(|s, _| state.map.get(*s).is_some());
            report.shard_load.retain(|s, _| state.map.get(*s).is_some());
            state.apply(MetaCommand::Heartbeat { node: *node, report }).map_err(|e| e.to_string())?;
            Ok(AdminResponse::Done("reported".into()))
        }
        MetaOp::SplitAt { key } => {
            // The map changes here; the shard's leader then carries the split out in the
            // shard's own log (a `Split` entry applied at one position on every replica), and
            // the new shard's replicas are started by that entry, not by the reconciler.
            let d = state.map.lookup(key).cloned().ok_or("no shard holds that key")?;
            if d.start == *key {
                return Err(format!("the key is already the first key of shard {}", d.id));
            }
            state
                .apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key: key.clone() })
                .map_err(|e| e.to_string())?;
            Ok(AdminResponse::Changed(
                state.map.shards().filter(|s| s.start == d.start || s.start == *key).cloned().collect(),
            ))
        }
        MetaOp::RemoveDeadNodes { dead, kept, .. } => {
            let cmd = MetaCommand::RemoveDeadNodes { dead: dead.clone(), kept: kept.clone() };
            let mut acc = Vec::new();
            changed(state.apply(cmd).map_err(|e| e.to_string())?, &mut acc);
            Ok(AdminResponse::Changed(acc))
        }
        MetaOp::Rebalance { now_ms } => {
            let proposals = balance(state, balancer, *now_ms);
            let mut started = Vec::new();
            for p in proposals {
                let cmd = p.command(*now_ms);
                let what = format!("{cmd:?}");
                match state.apply(cmd) {
                    Ok(_) => started.push(what),
                    Err(e) => started.push(format!("refused {what}: {e}")),
                }
            }
            if started.is_empty() {
                Ok(AdminResponse::Done(NOTHING_TO_BALANCE.into()))
            } else {
                Ok(AdminResponse::Done(started.join("\n")))
            }
        }
    }
}

/// What a balancer round that proposed nothing answers.
pub const NOTHING_TO_BALANCE: &str = "balanced: nothing to do";

/// The voters of `shard` in `state`, if it exists.
pub fn voters(state: &MetaState, shard: ShardId) -> Vec<NodeId> {
    state.map.get(shard).map(|d| d.voters().collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_splits_and_round_trips() {
        let mut s = MetaState::default();
        let op = MetaOp::Bootstrap {
            nodes: vec![(NodeId(1), "a".into()), (NodeId(2), "b".into())],
            replicas: vec![NodeId(1), NodeId(2)],
            split_keys: dev_split_keys(4),
            backup_id: None,
        };
        run_op(&op, &mut s, &BalancerConfig::default()).unwrap();
        assert_eq!(s.map.len(), 4);
        assert_eq!(s.map.lookup(b"3f").unwrap().id, s.map.lookup(b"00").unwrap().id);
        let again = s.clone();
        run_op(&op, &mut s, &BalancerConfig::default()).unwrap();
        assert_eq!(s, again, "bootstrap twice changes nothing");
        let bytes = encode_view(7, &s).unwrap();
        assert_eq!(decode_view(&bytes).unwrap(), (7, s.clone()));
        assert!(decode_view(&[9, 1, 2]).is_err());
        assert!(decode_view(&bytes[..5]).is_err());
        let first = s.map.shards().next().unwrap().clone();
        assert_eq!(shard_range(&first).start, USER_KEYS_START.to_vec());
        assert!(!meta_range().contains(b"a") && meta_range().contains(META_STATE_KEY));
    }

    #[test]
    fn split_keys_are_sorted_and_distinct_at_every_count() {
        for n in [1, 2, 4, 255, 256, 257, 1_000, BOOTSTRAP_SHARDS_MAX] {
            let keys = dev_split_keys(n);
            assert_eq!(keys.len(), n as usize - 1, "{n}");
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "{n}: sorted and distinct");
        }
        assert_eq!(dev_split_keys(4), [b"40".to_vec(), b"80".to_vec(), b"c0".to_vec()], "small counts keep their keys");
        assert_eq!(dev_split_keys(512)[255], b"8000".to_vec());
    }

    /// The meta state a node is sent whole (a follower's first copy, a joining node's) goes in
    /// parts of `meta_part_bytes`; the asker puts together at most
    /// [`crate::node::WHOLE_STATE_BYTES_MAX`]. The largest bootstrap, with a report of every shard
    /// from every node, must stay far below that.
    #[test]
    fn the_whole_state_of_the_largest_bootstrap_is_far_below_what_a_node_assembles() {
        use crate::placement::{GroupConf, LogIndex as PLogIndex, NodeReport, ShardId};
        let mut s = MetaState::default();
        let voters = vec![NodeId(1), NodeId(2), NodeId(3)];
        let op = MetaOp::Bootstrap {
            nodes: voters.iter().map(|n| (*n, format!("10.0.0.{}:7001", n.0))).collect(),
            replicas: voters.clone(),
            split_keys: dev_split_keys(BOOTSTRAP_SHARDS_MAX),
            backup_id: None,
        };
        run_op(&op, &mut s, &BalancerConfig::default()).unwrap();
        let ids: Vec<ShardId> = s.map.shards().map(|d| d.id).collect();
        for (k, n) in voters.iter().enumerate() {
            let mut r = NodeReport { requests_per_s: 1_000_000, ..NodeReport::default() };
            for (i, id) in ids.iter().enumerate() {
                r.applied.insert(*id, PLogIndex(1_000_000));
                if i % voters.len() == k {
                    r.leading.push(*id);
                    r.shard_bytes.insert(*id, 1 << 30);
                    // A split point of a shard grown past its size: a long key.
                    r.split_keys.insert(*id, vec![b'k'; 64]);
                    let conf = GroupConf {
                        index: PLogIndex(1_000),
                        voters: voters.iter().copied().collect(),
                        ..GroupConf::default()
                    };
                    r.confs.insert(*id, conf);
                }
            }
            if let Some(info) = s.nodes.get_mut(n) {
                info.report = std::sync::Arc::new(r);
            }
        }
        let bytes = encode_view(u64::MAX, &s).unwrap().len();
        let most = crate::node::WHOLE_STATE_BYTES_MAX as usize;
        assert!(bytes <= most / 16, "{bytes} bytes for {BOOTSTRAP_SHARDS_MAX} shards; a node assembles {most}");
    }

    #[test]
    fn the_largest_bootstrap_is_written_in_parts_that_each_fit_a_meta_transaction() {
        let mut s = MetaState::default();
        let nodes: Vec<(NodeId, String)> = (1..=5).map(|i| (NodeId(i), format!("127.0.0.1:{i}"))).collect();
        let op = MetaOp::Bootstrap {
            nodes,
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            split_keys: dev_split_keys(BOOTSTRAP_SHARDS_MAX),
            backup_id: None,
        };
        run_op(&op, &mut s, &BalancerConfig::default()).unwrap();
        assert_eq!(s.map.len(), BOOTSTRAP_SHARDS_MAX as usize);
        let stored = records::StoredMeta::default();
        let (writes, _) = stored.changes(&s).unwrap();
        let (w, b) = (crate::shard::TXN_WRITES_MAX, crate::shard::TXN_BYTES_MAX - 4096);
        let parts = records::change_parts(writes, stored.header.next_shard_id, w, b).unwrap();
        assert!(parts.len() > 1);
        for p in parts {
            let bytes = records::writes_bytes(&p);
            assert!(p.len() <= w && bytes <= b, "{} writes, {bytes} bytes", p.len());
        }
    }
}
