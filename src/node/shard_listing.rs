//! `admin shards`: the map's rows with each shard's leader, sizes and applied indexes as the
//! nodes report them, a page at a time, and the summary of the whole map that each page
//! carries.
//!
//! A listing of 100,000 shards is 100 pages. A page costs its own rows: leaders are looked up
//! for the page's shards only, in the reports' `leading` lists (in id order, as reports are
//! built). The summary covers the whole map, so it is computed once per revision of the meta
//! state and reused for [`SUMMARY_REUSE_MS`]: before, each page summed the whole map again and
//! a listing took 9 s.

use super::Node;
use crate::placement::{MetaState, NodeId, ShardDescriptor, ShardId};
use crate::wire::{AdminResponse, ShardRow, ShardsSummary, SHARDS_PAGE_MAX};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a summary serves the pages of its revision. Its leaders and sizes come from the
/// nodes' reports, which change every report interval without a new revision; a listing's
/// summary may be this much older than its rows.
pub(super) const SUMMARY_REUSE_MS: u64 = 1_000;

/// The last summary: the revision it was computed at, when, and what it said.
pub(super) type SummaryCache = Option<(u64, Instant, ShardsSummary)>;

impl Node {
    /// The summary of the map in `state`, at `revision`: the one computed last if it is of the
    /// same revision and younger than [`SUMMARY_REUSE_MS`].
    pub(super) fn shards_summary(&self, revision: u64, state: &MetaState) -> ShardsSummary {
        let fresh = |at: &Instant| at.elapsed() < Duration::from_millis(SUMMARY_REUSE_MS);
        if let Ok(cache) = self.inner.shards_summary.lock() {
            if let Some((_, _, s)) = cache.as_ref().filter(|(r, at, _)| *r == revision && fresh(at)) {
                return s.clone();
            }
        }
        let summary = summarize(state);
        if let Ok(mut cache) = self.inner.shards_summary.lock() {
            *cache = Some((revision, Instant::now(), summary.clone()));
        }
        summary
    }
}

/// Whom each node's report says it leads, as a list in id order (a report built otherwise is
/// sorted here, once per page).
struct Leading<'a>(BTreeMap<NodeId, std::borrow::Cow<'a, [ShardId]>>);

impl<'a> Leading<'a> {
    fn of(state: &'a MetaState) -> Leading<'a> {
        Leading(
            state
                .nodes
                .values()
                .map(|n| {
                    let led = &n.report.leading;
                    let list = if led.windows(2).all(|w| w[0] < w[1]) {
                        std::borrow::Cow::Borrowed(led.as_slice())
                    } else {
                        let mut v = led.clone();
                        v.sort_unstable();
                        v.dedup();
                        std::borrow::Cow::Owned(v)
                    };
                    (n.id, list)
                })
                .collect(),
        )
    }

    /// The leader of `d` by the reports: the lowest node holding a replica of it that reports
    /// leading it (a report can name a shard its node no longer holds, and two can name one
    /// while leadership moves).
    fn leader(&self, d: &ShardDescriptor) -> Option<NodeId> {
        d.replicas
            .iter()
            .map(|r| r.node)
            .filter(|n| self.0.get(n).is_some_and(|led| led.binary_search(&d.id).is_ok()))
            .min()
    }
}

/// Every row of the map (`AdminRequest::Shards`, and what a small map's listing shows).
pub(super) fn shard_rows(state: &MetaState) -> Vec<ShardRow> {
    let leading = Leading::of(state);
    state.map.shards().map(|d| shard_row(state, &leading, d)).collect()
}

/// The page of `AdminRequest::ShardsPage`: at most `limit` rows from the shard holding `from`,
/// where the next page starts, and `summary`.
pub(super) fn shards_page(state: &MetaState, from: &[u8], limit: u32, summary: ShardsSummary) -> AdminResponse {
    let limit = limit.clamp(1, SHARDS_PAGE_MAX) as usize;
    let leading = Leading::of(state);
    let mut page: Vec<&ShardDescriptor> = state.map.page(from, limit + 1).collect();
    let next = (page.len() > limit).then(|| page.pop().map(|d| d.start.clone())).flatten();
    let rows = page.into_iter().map(|d| shard_row(state, &leading, d)).collect();
    AdminResponse::ShardsPage { rows, next, summary }
}

/// The summary of the whole map: shards, those with a reported leader, moving, replicas, and
/// the sum of the shards' reported sizes.
pub(super) fn summarize(state: &MetaState) -> ShardsSummary {
    let leading = Leading::of(state);
    let mut s = ShardsSummary::default();
    for d in state.map.shards() {
        s.shards += 1;
        s.with_leader += u64::from(leading.leader(d).is_some());
        s.moving += u64::from(state.moves.contains_key(&d.id));
        s.replicas += d.replicas.len() as u64;
        s.bytes += shard_bytes(state, d.id);
    }
    s
}

/// The largest size any node reports for `shard` (0 when none does).
fn shard_bytes(state: &MetaState, shard: ShardId) -> u64 {
    state.nodes.values().filter_map(|i| i.report.shard_bytes.get(&shard)).copied().max().unwrap_or(0)
}

fn shard_row(state: &MetaState, leading: &Leading<'_>, d: &ShardDescriptor) -> ShardRow {
    let applied = d
        .replicas
        .iter()
        .filter_map(|r| state.nodes.get(&r.node).and_then(|i| i.report.applied.get(&d.id)).map(|a| (r.node, a.0)))
        .collect();
    let moving = state.moves.get(&d.id).map(|p| format!("{} -> {} at {:?}", p.from, p.to, p.step));
    let merging = state.merge_of(d.id).map(|p| {
        let phase = match p.phase {
            crate::placement::MergePhase::Freezing => "freezing",
            crate::placement::MergePhase::Committed { .. } => "committed",
            crate::placement::MergePhase::Aborted => "aborted",
        };
        format!("merge {} of {} and {}: {phase}", p.id, p.left, p.right)
    });
    ShardRow {
        descriptor: d.clone(),
        leader: leading.leader(d),
        applied,
        bytes: shard_bytes(state, d.id),
        moving,
        merging,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::NodeReport;
    use std::sync::Arc;

    fn state(shards: u32) -> MetaState {
        crate::meta::three_node_state(shards)
    }

    fn report(state: &mut MetaState, node: u64, leading: Vec<ShardId>, bytes: &[(u64, u64)]) {
        let r = NodeReport {
            leading,
            shard_bytes: bytes.iter().map(|(s, b)| (ShardId(*s), *b)).collect(),
            ..NodeReport::default()
        };
        state.nodes.get_mut(&NodeId(node)).expect("registered").report = Arc::new(r);
    }

    #[test]
    fn pages_hold_every_row_once_in_key_order_with_the_leader_the_reports_name() {
        let mut s = state(2_500);
        let ids: Vec<ShardId> = s.map.shards().map(|d| d.id).collect();
        // Node 1 leads every third shard, listed out of order; node 2 the rest but one, and
        // names a shard of no map (reports may be stale); node 3 claims shard ids[1] too.
        let mut one: Vec<ShardId> = ids.iter().step_by(3).copied().collect();
        one.reverse();
        let two: Vec<ShardId> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0 && *i != 5)
            .map(|(_, id)| *id)
            .chain([ShardId(999_999)])
            .collect();
        report(&mut s, 1, one, &[(ids[0].0, 10), (ids[1].0, 5)]);
        report(&mut s, 2, two, &[(ids[1].0, 7)]);
        report(&mut s, 3, vec![ids[1]], &[]);
        let summary = summarize(&s);
        assert_eq!(summary.shards, ids.len() as u64);
        assert_eq!(summary.with_leader, ids.len() as u64 - 1);
        assert_eq!(summary.replicas, 3 * ids.len() as u64);
        assert_eq!(summary.bytes, 10 + 7);
        let all = shard_rows(&s);
        let mut paged = Vec::new();
        let mut from = Vec::new();
        loop {
            let AdminResponse::ShardsPage { rows, next, summary: got } = shards_page(&s, &from, 1_000, summary.clone())
            else {
                panic!("not a page");
            };
            assert_eq!(got, summary);
            assert!(rows.len() <= 1_000);
            paged.extend(rows);
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert_eq!(paged, all);
        assert_eq!(all[0].leader, Some(NodeId(1)));
        assert_eq!(all[1].leader, Some(NodeId(2)), "the lowest of two nodes naming it");
        assert_eq!(all[5].leader, None);
        assert_eq!((all[0].bytes, all[1].bytes), (10, 7));
        // A page from inside a shard starts at that shard.
        let mut inside = all[10].descriptor.start.clone();
        inside.push(0);
        let AdminResponse::ShardsPage { rows, next, .. } = shards_page(&s, &inside, 2, summary) else {
            panic!("not a page");
        };
        assert_eq!(rows, all[10..12].to_vec());
        assert_eq!(next, Some(all[12].descriptor.start.clone()));
    }
}
