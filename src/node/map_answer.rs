//! A node's answer to a client's [`Request::MapSince`]: the shards changed since the client's
//! revision when its history holds them (`meta/map_history.rs`), else its copy of the map in
//! pages. Either way an answer stays far below a transport frame, however many shards there
//! are; the client puts the pages together (`client.rs`).
//!
//! [`Request::MapSince`]: crate::wire::Request::MapSince

use super::admin::node_addresses as addresses;
use super::Node;
use crate::placement::{MetaState, ShardDescriptor};
use crate::wire::{MapAnswer, Response};

/// Shards a page carries at most.
pub const MAP_PAGE_SHARDS_MAX: usize = 8192;
/// Shards a changes answer names at most; more are sent as pages.
pub const MAP_CHANGES_SHARDS_MAX: usize = 4096;
/// Bytes of shard descriptors an answer carries at most, about (at least one shard).
pub const MAP_ANSWER_BYTES_MAX: usize = 1 << 20;

impl Node {
    /// Answers [`crate::wire::Request::MapSince`] from this node's view, to `peer`. A
    /// prefix-limited client is sent its concealed view whole, in one page
    /// ([`crate::authz::tenant_view`]).
    pub(super) fn map_since(
        &self,
        peer: &crate::transport::PeerIdentity,
        since: u64,
        from: Option<Vec<u8>>,
        limit: u32,
        progress: u64,
    ) -> Response {
        let (revision, state) = self.meta_view_with_revision();
        if state.map.is_empty() {
            return Response::Unavailable("cluster not bootstrapped yet".into());
        }
        if let Some(view) = crate::authz::tenant_view(peer, &state.map, &addresses(&state)) {
            let shards = view.map.shards().cloned().collect();
            return Response::Map(MapAnswer::Page { revision, shards, next: None, nodes: view.nodes });
        }
        // How far this copy has come (kept with the history, worked out only if it is not),
        // and the shards changed since the client's copy, read together.
        let (held, ids) = match self.inner.meta.map_history.lock() {
            Ok(h) => {
                let ids = (from.is_none() && since > 0 && since < revision)
                    .then(|| h.since(since, revision, MAP_CHANGES_SHARDS_MAX))
                    .flatten();
                (h.progress_at(revision), ids)
            }
            Err(_) => (None, None),
        };
        let mine = held.unwrap_or_else(|| crate::client::map_progress(&state.map));
        // At or behind the client's copy: nothing to send (the client asks a node further on).
        // Unless the maps say otherwise: a map further on than the client's under a lower
        // revision, or another one under the same, is another numbering (a meta state
        // converted from the one-key format numbers afresh), and is sent in pages.
        if from.is_none() && since >= revision && nothing_newer(since, revision, mine, progress) {
            let nodes = addresses(&state);
            let (changed, removed) = (Vec::new(), Vec::new());
            return Response::Map(MapAnswer::Changes {
                base: since,
                revision,
                changed,
                removed,
                nodes,
                progress: mine,
            });
        }
        if let Some(answer) = ids.and_then(|ids| changes_answer(&state, (since, revision, mine), ids)) {
            return Response::Map(answer);
        }
        let limit = (limit as usize).clamp(1, MAP_PAGE_SHARDS_MAX);
        Response::Map(page_answer(&state, revision, from.as_deref().unwrap_or_default(), limit))
    }
}

/// Whether a node whose copy is at `revision` with progress `mine` (`client::map_progress`)
/// has nothing newer for a client whose copy is at `since` (at least `revision`) with progress
/// `progress`: the same map, or an older one.
fn nothing_newer(since: u64, revision: u64, mine: u64, progress: u64) -> bool {
    (since > revision && mine <= progress) || (since == revision && mine == progress)
}

/// About how many bytes `d` takes in an answer.
fn descriptor_bytes(d: &ShardDescriptor) -> usize {
    48 + d.start.len() + d.end.as_ref().map_or(0, Vec::len) + 16 * d.replicas.len()
}

/// The shards `ids` of `state` as changes from revision `base` to `revision`, where its map
/// has come as far as `progress`; `None` past [`MAP_ANSWER_BYTES_MAX`].
fn changes_answer(
    state: &MetaState,
    (base, revision, progress): (u64, u64, u64),
    ids: std::collections::BTreeSet<crate::placement::ShardId>,
) -> Option<MapAnswer> {
    let (mut changed, mut removed, mut bytes) = (Vec::new(), Vec::new(), 0);
    for id in ids {
        match state.map.get(id) {
            Some(d) => {
                bytes += descriptor_bytes(d);
                if bytes > MAP_ANSWER_BYTES_MAX {
                    return None;
                }
                changed.push(d.clone());
            }
            None => removed.push(id),
        }
    }
    Some(MapAnswer::Changes { base, revision, changed, removed, nodes: addresses(state), progress })
}

/// At most `limit` shards of `state`'s map (at `revision`) from key `from`, and at least one,
/// within about [`MAP_ANSWER_BYTES_MAX`].
fn page_answer(state: &MetaState, revision: u64, from: &[u8], limit: usize) -> MapAnswer {
    let (mut shards, mut bytes) = (Vec::new(), 0);
    let mut next = None;
    for d in state.map.page(from, limit.saturating_add(1)) {
        bytes += descriptor_bytes(d);
        if shards.len() == limit || (bytes > MAP_ANSWER_BYTES_MAX && !shards.is_empty()) {
            next = Some(d.start.clone());
            break;
        }
        shards.push(d.clone());
    }
    MapAnswer::Page { revision, shards, next, nodes: addresses(state) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{MetaCommand, NodeId, ShardId};

    fn state(shards: usize) -> MetaState {
        let mut s = MetaState::default();
        for i in 1..=3 {
            s.apply(MetaCommand::RegisterNode { node: NodeId(i), addr: format!("127.0.0.1:{i}") }).unwrap();
        }
        s.apply(MetaCommand::Bootstrap { nodes: vec![NodeId(1), NodeId(2), NodeId(3)] }).unwrap();
        for i in 1..shards {
            let key = format!("k{i:05}").into_bytes();
            let d = s.map.lookup(&key).cloned().unwrap();
            s.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key }).unwrap();
        }
        s
    }

    #[test]
    fn pages_cover_the_map_once_in_order_and_stop_at_their_bounds() {
        let s = state(10);
        let mut from = Vec::new();
        let mut seen = Vec::new();
        loop {
            let MapAnswer::Page { revision, shards, next, nodes } = page_answer(&s, 7, &from, 4) else { panic!() };
            assert_eq!((revision, nodes.len()), (7, 3));
            assert!(shards.len() <= 4 && !shards.is_empty());
            seen.extend(shards.iter().map(|d| d.id));
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        let all: Vec<ShardId> = s.map.shards().map(|d| d.id).collect();
        assert_eq!(seen, all);
        // Long keys: the byte bound cuts pages short, never below one shard.
        let mut big = state(1);
        for i in 1..4u8 {
            let key: Vec<u8> =
                vec![b'k', i].into_iter().chain(std::iter::repeat_n(b'x', MAP_ANSWER_BYTES_MAX / 2)).collect();
            let d = big.map.lookup(&key).cloned().unwrap();
            big.apply(MetaCommand::Split { shard: d.id, epoch: d.epoch, key }).unwrap();
        }
        let MapAnswer::Page { shards, next, .. } = page_answer(&big, 1, b"k", 100) else { panic!() };
        assert_eq!(shards.len(), 1, "a shard of half the budget per key");
        assert!(next.is_some());
    }

    #[test]
    fn a_node_at_or_behind_the_client_sends_nothing_unless_its_map_is_another() {
        assert!(nothing_newer(5, 5, 40, 40), "the same copy");
        assert!(nothing_newer(7, 5, 38, 40), "an older copy");
        assert!(nothing_newer(7, 5, 40, 40), "older, and its map the same as far as it went");
        // Numbered afresh: further on under a lower revision, or another map under the same.
        assert!(!nothing_newer(7, 5, 41, 40));
        assert!(!nothing_newer(5, 5, 41, 40));
        assert!(!nothing_newer(5, 5, 39, 40));
    }

    #[test]
    fn changes_name_shards_now_and_the_ones_gone() {
        let s = state(3);
        let ids = [ShardId(2), ShardId(99)].into_iter().collect();
        let Some(MapAnswer::Changes { base, revision, changed, removed, progress, .. }) =
            changes_answer(&s, (4, 6, 77), ids)
        else {
            panic!()
        };
        assert_eq!((base, revision, progress), (4, 6, 77));
        assert_eq!(changed, vec![s.map.get(ShardId(2)).unwrap().clone()]);
        assert_eq!(removed, vec![ShardId(99)]);
    }
}
