//! Merges of two neighbouring shards, the shard side. The left group `L = [a, b)` absorbs the
//! right group `R = [b, c)` in three steps, each an entry of one group's log:
//!
//! 1. **Freeze** (in R's log, [`KvCommand::Freeze`](crate::KvCommand::Freeze)): R applies no
//!    more writes nor splits; its data stays as it is at the freeze entry on every replica.
//! 2. Placement waits until every voter of R holds the freeze entry, then decides (in the meta
//!    group, once): commit, or abort. An abort **thaws** R ([`KvCommand::Thaw`]); a thawed
//!    merge id never freezes again, so a late copy of the freeze cannot stop R for nothing.
//! 3. **Merge** (in L's log, [`KvCommand::Merge`]): every replica of L, at the same position
//!    of L's log, widens L's range to `[a, c)` and deletes R's Raft state and descriptor, in
//!    the one batch that applies the entry. The keys stay where they are: a node keeps all its
//!    groups' data in one keyspace, and R's are frozen at the freeze on every node.
//!
//! Step 3 depends on the node's replica of R: it must have applied the freeze (named by its
//! log id, so a replica of another history never passes) and be stopped, so that nothing of R
//! is written after its state is deleted. The host parks R (stops it, keeping its state) and
//! retries L's entry until R's stored state shows the freeze; L applies nothing after the entry
//! meanwhile. A crash in between loses nothing: R's state is intact until L's batch deletes it,
//! R restarts as any group, and L applies the entry again. Whether the entry merges at all is
//! decided from L's state alone (its range and configuration), the same on every replica.
//!
//! [`KvCommand::Thaw`]: crate::KvCommand::Thaw
//! [`KvCommand::Merge`]: crate::KvCommand::Merge

use crate::keys::{decode, encode, group_key, meta_key, KIND_MERGE};
use crate::kv::{GroupDescriptor, KeyRange, KvResponse};
use crate::store::{Op, Store, CF_META, CF_RAFT};
use flotilla_raft::{GroupId, LogId, Membership, NodeId, StorageError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A group's part in merges, kept under `KIND_MERGE` and carried by its snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeState {
    /// Frozen for a merge into another group: writes and splits are refused until thawed or
    /// absorbed.
    pub frozen: Option<Frozen>,
    /// The highest merge id thawed: a freeze of it or of an older one is refused.
    pub thawed_through: u64,
    /// The highest merge id this group absorbed a source in: a merge entry of it or of an
    /// older one (proposed again by a leader whose view lagged) is refused.
    pub absorbed_through: u64,
}

/// A freeze applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    /// The merge (placement's id for it).
    pub id: u64,
    /// The group that absorbs this one.
    pub into: GroupId,
    /// The freeze entry: the point every replica's data stops at.
    pub at: LogId,
}

impl MergeState {
    /// Whether writes and splits are refused.
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }
}

/// Reads `group`'s merge state (the default if it was never frozen).
pub(crate) fn read_merge_state(s: &Store, group: GroupId) -> Result<MergeState, StorageError> {
    match s
        .db()
        .get_cf(s.cf(CF_RAFT)?, group_key(group, KIND_MERGE))
        .map_err(|e| StorageError::new("read", e.to_string()))?
    {
        Some(b) => decode(&b, || format!("group {group} merge state")),
        None => Ok(MergeState::default()),
    }
}

/// Reads `group`'s merge state at a RocksDB snapshot (a snapshot build's point).
pub(crate) fn read_merge_state_at(
    s: &Store,
    snap: &rocksdb::Snapshot<'_>,
    group: GroupId,
) -> Result<MergeState, StorageError> {
    match snap
        .get_cf(s.cf(CF_RAFT)?, group_key(group, KIND_MERGE))
        .map_err(|e| StorageError::new("snapshot", e.to_string()))?
    {
        Some(b) => decode(&b, || format!("group {group} merge state")),
        None => Ok(MergeState::default()),
    }
}

/// The write that stores `state` for `group` (a delete for the default).
pub(crate) fn merge_state_op(group: GroupId, state: &MergeState) -> Result<Op, StorageError> {
    let key = group_key(group, KIND_MERGE).to_vec();
    Ok(match *state == MergeState::default() {
        true => Op::Delete(CF_RAFT, key),
        false => Op::Put(CF_RAFT, key, encode(state)?),
    })
}

/// Applies a freeze of merge `id` into `into`, the entry being `at`, to `group`'s `state`.
pub(crate) fn apply_freeze(group: GroupId, state: &mut MergeState, id: u64, into: GroupId, at: LogId) -> KvResponse {
    if into == group {
        return KvResponse::Refused(format!("group {group} cannot merge into itself"));
    }
    if id <= state.thawed_through {
        return KvResponse::Refused(format!("merge {id} of group {group} was aborted: it does not freeze again"));
    }
    match state.frozen {
        // A repeated proposal: the first freeze stands, and says where.
        Some(f) if f.id == id && f.into == into => KvResponse::Frozen { at: f.at },
        Some(f) => KvResponse::Refused(format!("group {group} is frozen for merge {} into group {}", f.id, f.into)),
        None => {
            state.frozen = Some(Frozen { id, into, at });
            KvResponse::Frozen { at }
        }
    }
}

/// Applies a thaw of merge `id`: a group frozen for it writes again, and no freeze of it
/// (a late or repeated proposal) applies after this.
pub(crate) fn apply_thaw(state: &mut MergeState, id: u64) -> KvResponse {
    if state.frozen.is_some_and(|f| f.id == id) {
        state.frozen = None;
    }
    state.thawed_through = state.thawed_through.max(id);
    KvResponse::Done { previous: None }
}

/// What the merge entry names: the source, the merge, the freeze and the source's range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MergeSource {
    /// The group absorbed.
    pub(crate) group: GroupId,
    /// Placement's id of the merge.
    pub(crate) id: u64,
    /// The source's freeze entry.
    pub(crate) freeze: LogId,
    /// The source's range.
    pub(crate) range: KeyRange,
}

/// Whether the merge entry may merge at all, judged on the target's state alone (the same on
/// every replica, so every replica decides alike): the source's range starts where the
/// target's ends, the merge is newer than any the target absorbed, and every node of the
/// target's configuration is one of `voters` (the source's when placement committed the
/// merge): every replica of the target then has the source's frozen data beside it.
pub(crate) fn merge_refusal(
    target: GroupId,
    range: &KeyRange,
    target_state: &MergeState,
    membership: &Membership,
    source: &MergeSource,
    voters: &BTreeSet<NodeId>,
) -> Option<String> {
    if target_state.is_frozen() {
        return Some(format!("group {target} is frozen for a merge of its own"));
    }
    if source.id <= target_state.absorbed_through {
        return Some(format!("group {target} absorbed merge {} already", target_state.absorbed_through));
    }
    if source.group == target {
        return Some(format!("group {target} cannot absorb itself"));
    }
    if range.end.as_deref() != Some(source.range.start.as_slice()) {
        return Some(format!(
            "group {target} ends at {:?}, not where group {} starts",
            range.end.as_ref().map(|e| e.escape_ascii().to_string()),
            source.group
        ));
    }
    // Every node of the target's configuration, learners and both halves of a joint one
    // included, must be one the source was frozen on: each then holds the source's data.
    let nodes = membership.voters.iter().chain(membership.outgoing.iter().flatten()).chain(&membership.learners);
    if let Some(n) = nodes.into_iter().find(|n| !voters.contains(n)) {
        return Some(format!(
            "node {n} of group {target}'s configuration holds no replica of group {} (frozen on {voters:?})",
            source.group
        ));
    }
    None
}

/// The writes that absorb `source` into `target` on this node, or why they cannot be made yet:
/// the source's replica here must hold the freeze (`source.freeze`, of merge `source.id` into
/// `target`) in its stored state, with the range the merge names. The caller has made sure the
/// source is stopped, so that nothing of it is written after these deletes.
pub(crate) fn absorb_ops(
    s: &Store,
    target: GroupId,
    source: &MergeSource,
) -> Result<Result<Vec<Op>, String>, StorageError> {
    let g = source.group;
    let Some(raw) =
        s.db().get_cf(s.cf(CF_META)?, meta_key(g)).map_err(|e| StorageError::new("apply", e.to_string()))?
    else {
        return Ok(Err(format!("no replica of group {g} on this node")));
    };
    let desc: GroupDescriptor = decode(&raw, || format!("group {g} descriptor"))?;
    if desc.range != source.range {
        return Ok(Err(format!("group {g} holds {:?} here, the merge names {:?}", desc.range, source.range)));
    }
    let state = read_merge_state(s, g)?;
    match state.frozen {
        Some(f) if f.id == source.id && f.into == target && f.at == source.freeze => {}
        other => {
            return Ok(Err(format!(
                "group {g} here is not frozen at {} for merge {} into {target} (it holds {other:?})",
                source.freeze, source.id
            )))
        }
    }
    let applied = crate::kv::KvStateMachine::read_applied(s, g)?;
    if applied.last_applied.is_none_or(|a| a.index < source.freeze.index) {
        return Ok(Err(format!(
            "group {g} here applied {:?}, short of its freeze {}",
            applied.last_applied, source.freeze
        )));
    }
    Ok(Ok(Op::group_deletes(g).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_stands_once_applied_and_an_aborted_merge_never_freezes_again() {
        let (g, into) = (GroupId(2), GroupId(1));
        let mut s = MergeState::default();
        let at = LogId::new(3, 10);
        assert_eq!(apply_freeze(g, &mut s, 7, into, at), KvResponse::Frozen { at });
        // Proposed again (a leader retrying): the first position stands.
        assert_eq!(apply_freeze(g, &mut s, 7, into, LogId::new(3, 12)), KvResponse::Frozen { at });
        assert!(matches!(apply_freeze(g, &mut s, 8, into, LogId::new(3, 13)), KvResponse::Refused(_)));
        assert!(matches!(apply_freeze(g, &mut s, 9, g, LogId::new(3, 13)), KvResponse::Refused(_)));
        apply_thaw(&mut s, 7);
        assert!(!s.is_frozen());
        // A late copy of the aborted merge's freeze, or an older merge's.
        assert!(matches!(apply_freeze(g, &mut s, 7, into, LogId::new(3, 14)), KvResponse::Refused(_)));
        assert!(matches!(apply_freeze(g, &mut s, 5, into, LogId::new(3, 14)), KvResponse::Refused(_)));
        // A thaw of a merge never frozen here still fences its freeze.
        apply_thaw(&mut s, 11);
        assert!(matches!(apply_freeze(g, &mut s, 11, into, LogId::new(3, 15)), KvResponse::Refused(_)));
        assert_eq!(apply_freeze(g, &mut s, 12, into, LogId::new(3, 16)), KvResponse::Frozen { at: LogId::new(3, 16) });
    }

    #[test]
    fn a_merge_entry_merges_only_an_adjacent_source_with_the_same_voters() {
        let voters: BTreeSet<NodeId> = [NodeId(1), NodeId(2), NodeId(3)].into();
        let m = Membership::new(voters.clone());
        let range = KeyRange { start: b"a".to_vec(), end: Some(b"m".to_vec()) };
        let source = MergeSource {
            group: GroupId(2),
            id: 9,
            freeze: LogId::new(2, 5),
            range: KeyRange { start: b"m".to_vec(), end: None },
        };
        let ok = MergeState::default();
        assert_eq!(merge_refusal(GroupId(1), &range, &ok, &m, &source, &voters), None);
        let gap = KeyRange { start: b"a".to_vec(), end: Some(b"l".to_vec()) };
        assert!(merge_refusal(GroupId(1), &gap, &ok, &m, &source, &voters).is_some());
        let other: BTreeSet<NodeId> = [NodeId(1), NodeId(2), NodeId(4)].into();
        assert!(merge_refusal(GroupId(1), &range, &ok, &m, &source, &other).is_some());
        let mut with_learner = m.clone();
        with_learner.learners.insert(NodeId(4));
        assert!(merge_refusal(GroupId(1), &range, &ok, &with_learner, &source, &voters).is_some());
        // Fewer nodes than the source was frozen on (an unsafe recovery kept one): each still
        // has the source beside it.
        let one = Membership::new([NodeId(2)]);
        assert_eq!(merge_refusal(GroupId(1), &range, &ok, &one, &source, &voters), None);
        let mut joint = m.clone();
        joint.outgoing = Some([NodeId(1), NodeId(5)].into());
        assert!(merge_refusal(GroupId(1), &range, &ok, &joint, &source, &voters).is_some());
        // A merge entry of a merge the target absorbed already (proposed again).
        let absorbed = MergeState { absorbed_through: 9, ..MergeState::default() };
        assert!(merge_refusal(GroupId(1), &range, &absorbed, &m, &source, &voters).is_some());
        let frozen = MergeState {
            frozen: Some(Frozen { id: 3, into: GroupId(0), at: LogId::new(1, 1) }),
            ..MergeState::default()
        };
        assert!(merge_refusal(GroupId(1), &range, &frozen, &m, &source, &voters).is_some());
        assert!(merge_refusal(GroupId(2), &range, &ok, &m, &source, &voters).is_some());
    }
}
