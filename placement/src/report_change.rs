//! A node's report as the change from its previous one ([`ReportChange`]), so that a node
//! with tens of thousands of replicas sends each second what changed (on an idle node,
//! nothing) rather than every replica's applied index, and a whole report too large for one
//! message can go in parts.
//!
//! A report is a set of per-shard entries ([`ShardReport`]: the shard's line in each of
//! [`NodeReport`]'s maps) plus two totals. A change lists the shards whose entries differ,
//! each with its new entry or `None` when the node no longer reports the shard, and the totals.

use crate::map::ShardId;
use crate::meta::{GroupConf, LogIndex, NodeReport, ShardLoad};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Everything a report says of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReport {
    /// [`NodeReport::applied`].
    pub applied: Option<LogIndex>,
    /// Listed in [`NodeReport::leading`].
    pub leading: bool,
    /// [`NodeReport::shard_bytes`].
    pub bytes: Option<u64>,
    /// [`NodeReport::split_keys`].
    pub split_key: Option<Vec<u8>>,
    /// [`NodeReport::confs`].
    pub conf: Option<GroupConf>,
    /// [`NodeReport::shard_load`].
    pub load: Option<ShardLoad>,
}

/// The change from one report of a node to its next.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportChange {
    /// Shards whose entries changed, in id order: the new entry, or `None` if the report no
    /// longer names the shard.
    pub shards: Vec<(ShardId, Option<ShardReport>)>,
    /// [`NodeReport::requests_per_s`] of the new report.
    pub requests_per_s: u64,
    /// [`NodeReport::led_requests_per_s`] of the new report.
    pub led_requests_per_s: u64,
}

impl NodeReport {
    /// The change that turns this report into `next` ([`NodeReport::apply_change`]). Walks
    /// each map of both in key order once, so an unchanged report of many shards costs no
    /// allocation and no lookup.
    pub fn change_to(&self, next: &NodeReport) -> ReportChange {
        let mut changed = BTreeSet::new();
        differing(self.applied.iter(), next.applied.iter(), &mut changed);
        differing(self.shard_bytes.iter(), next.shard_bytes.iter(), &mut changed);
        differing(self.split_keys.iter(), next.split_keys.iter(), &mut changed);
        differing(self.confs.iter(), next.confs.iter(), &mut changed);
        differing(self.shard_load.iter(), next.shard_load.iter(), &mut changed);
        // `leading` is a list, in id order as reports build it (sorted here if not).
        let (led_before, led_after) = (in_order(&self.leading), in_order(&next.leading));
        differing(led_before.iter().map(|s| (s, &())), led_after.iter().map(|s| (s, &())), &mut changed);
        let shards = changed.into_iter().map(|s| (s, line(next, &led_after, s))).collect();
        ReportChange { shards, requests_per_s: next.requests_per_s, led_requests_per_s: next.led_requests_per_s }
    }

    /// Applies `change`: each shard it names takes its new entry (or leaves the report), the
    /// totals are replaced. `leading` stays in id order.
    pub fn apply_change(&mut self, change: &ReportChange) {
        let mut led: BTreeSet<ShardId> = self.leading.iter().copied().collect();
        for (s, entry) in &change.shards {
            self.applied.remove(s);
            self.shard_bytes.remove(s);
            self.split_keys.remove(s);
            self.confs.remove(s);
            self.shard_load.remove(s);
            led.remove(s);
            let Some(e) = entry else { continue };
            if let Some(a) = e.applied {
                self.applied.insert(*s, a);
            }
            if e.leading {
                led.insert(*s);
            }
            if let Some(b) = e.bytes {
                self.shard_bytes.insert(*s, b);
            }
            if let Some(k) = &e.split_key {
                self.split_keys.insert(*s, k.clone());
            }
            if let Some(c) = &e.conf {
                self.confs.insert(*s, c.clone());
            }
            if let Some(l) = &e.load {
                self.shard_load.insert(*s, l.clone());
            }
        }
        self.leading = led.into_iter().collect();
        self.requests_per_s = change.requests_per_s;
        self.led_requests_per_s = change.led_requests_per_s;
    }
}

/// Adds to `out` every key of the two maps, each iterated in key order, that only one of them
/// has or that they give different values.
fn differing<'a, V: PartialEq + 'a>(
    a: impl Iterator<Item = (&'a ShardId, &'a V)>,
    b: impl Iterator<Item = (&'a ShardId, &'a V)>,
    out: &mut BTreeSet<ShardId>,
) {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((k, _)), None) => {
                out.insert(**k);
                a.next();
            }
            (None, Some((k, _))) => {
                out.insert(**k);
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.insert(**ka);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.insert(**kb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        out.insert(**ka);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// `leading` in id order without repeats: as given when it already is (reports are built so).
fn in_order(leading: &[ShardId]) -> std::borrow::Cow<'_, [ShardId]> {
    if leading.windows(2).all(|w| w[0] < w[1]) {
        return std::borrow::Cow::Borrowed(leading);
    }
    let set: BTreeSet<ShardId> = leading.iter().copied().collect();
    std::borrow::Cow::Owned(set.into_iter().collect())
}

/// What `r` says of shard `s` (`None`: nothing), `led` being its `leading` in id order.
fn line(r: &NodeReport, led: &[ShardId], s: ShardId) -> Option<ShardReport> {
    let e = ShardReport {
        applied: r.applied.get(&s).copied(),
        leading: led.binary_search(&s).is_ok(),
        bytes: r.shard_bytes.get(&s).copied(),
        split_key: r.split_keys.get(&s).cloned(),
        conf: r.confs.get(&s).cloned(),
        load: r.shard_load.get(&s).cloned(),
    };
    (e != ShardReport::default()).then_some(e)
}

impl ReportChange {
    /// Whether it changes no shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The change cut into parts of at most `shards_max` shards and about `bytes_max` bytes
    /// each (a shard whose entry alone is larger goes in a part of its own), to be applied in
    /// order: what a message can carry. At least one part, each with the totals.
    pub fn into_parts(self, shards_max: usize, bytes_max: usize) -> Vec<ReportChange> {
        let (requests_per_s, led_requests_per_s) = (self.requests_per_s, self.led_requests_per_s);
        let part =
            |shards: Vec<(ShardId, Option<ShardReport>)>| ReportChange { shards, requests_per_s, led_requests_per_s };
        let mut out = Vec::new();
        let (mut shards, mut bytes) = (Vec::new(), 0);
        for (s, entry) in self.shards {
            let size = entry.as_ref().map_or(0, ShardReport::approx_bytes) + 16;
            if !shards.is_empty() && (shards.len() >= shards_max.max(1) || bytes + size > bytes_max) {
                out.push(part(std::mem::take(&mut shards)));
                bytes = 0;
            }
            shards.push((s, entry));
            bytes += size;
        }
        if !shards.is_empty() || out.is_empty() {
            out.push(part(shards));
        }
        out
    }
}

impl ShardReport {
    /// About how many bytes the entry takes encoded (the keys it carries dominate).
    fn approx_bytes(&self) -> usize {
        let keys = self.split_key.as_ref().map_or(0, Vec::len)
            + self.load.as_ref().and_then(|l| l.split_key.as_ref()).map_or(0, Vec::len);
        let conf = self.conf.as_ref().map_or(0, |c| 8 * (c.voters.len() + c.learners.len()));
        48 + keys + conf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{Epoch, NodeId};

    fn s(id: u64) -> ShardId {
        ShardId(id)
    }

    /// A report of shards `ids`, led every third, with a little of everything.
    fn report(ids: impl IntoIterator<Item = u64>, salt: u64) -> NodeReport {
        let mut r = NodeReport { requests_per_s: 10 + salt, led_requests_per_s: 5 + salt, ..NodeReport::default() };
        for id in ids {
            r.applied.insert(s(id), LogIndex(id * 10 + salt));
            if id % 3 == 0 {
                r.leading.push(s(id));
                r.confs.insert(
                    s(id),
                    GroupConf { index: LogIndex(id), voters: [NodeId(1), NodeId(2)].into(), ..GroupConf::default() },
                );
                r.shard_bytes.insert(s(id), id * 1000);
            }
            if id % 5 == 0 {
                r.split_keys.insert(s(id), format!("k{id}").into_bytes());
                r.shard_load.insert(
                    s(id),
                    ShardLoad { requests_per_s: id, split_key: None, epoch: Epoch { conf_version: 1, version: 1 } },
                );
            }
        }
        r
    }

    #[test]
    fn a_change_applied_to_the_old_report_gives_the_new_one() {
        let cases = [
            (NodeReport::default(), report(1..50, 0)),
            (report(1..50, 0), NodeReport::default()),
            (report(1..50, 0), report(1..50, 0)),
            (report(1..50, 0), report(1..50, 1)),
            (report(1..50, 0), report(20..80, 0)),
            (report(1..50, 0), report((1..80).filter(|i| i % 7 != 0), 2)),
        ];
        for (old, new) in cases {
            let change = old.change_to(&new);
            let mut got = old.clone();
            got.apply_change(&change);
            assert_eq!(got, new, "change {change:?}");
        }
    }

    #[test]
    fn leading_out_of_order_or_repeated_is_taken_as_the_set_it_names() {
        let mut old = report(1..20, 0);
        old.leading = vec![s(9), s(3), s(9)];
        let mut new = old.clone();
        new.leading = vec![s(12), s(3), s(6), s(3)];
        let change = old.change_to(&new);
        let named: Vec<ShardId> = change.shards.iter().map(|(x, _)| *x).collect();
        assert_eq!(named, vec![s(6), s(9), s(12)]);
        let mut got = old.clone();
        got.apply_change(&change);
        assert_eq!(got.leading, vec![s(3), s(6), s(12)]);
        assert!(old.change_to(&NodeReport { leading: vec![s(3), s(9)], ..old.clone() }).is_empty());
    }

    #[test]
    fn an_unchanged_report_changes_no_shard_and_one_shard_changed_names_only_it() {
        let r = report(1..1000, 0);
        assert!(r.change_to(&r).is_empty());
        let mut next = r.clone();
        next.applied.insert(s(500), LogIndex(1));
        next.leading.retain(|x| *x != s(6));
        let change = r.change_to(&next);
        let named: Vec<ShardId> = change.shards.iter().map(|(x, _)| *x).collect();
        assert_eq!(named, vec![s(6), s(500)]);
        assert!(change.shards[0].1.as_ref().is_some_and(|e| !e.leading && e.conf.is_some()));
    }

    #[test]
    fn a_shard_no_longer_reported_leaves_every_map() {
        let old = report([15], 0);
        let change = old.change_to(&NodeReport::default());
        assert_eq!(change.shards, vec![(s(15), None)]);
        let mut got = old;
        got.apply_change(&change);
        assert_eq!(got, NodeReport::default());
    }

    #[test]
    fn parts_applied_in_order_give_the_whole_and_each_is_bounded() {
        let new = report(1..1000, 3);
        let whole = NodeReport::default().change_to(&new);
        let parts = whole.clone().into_parts(128, usize::MAX);
        assert_eq!(parts.len(), 999_usize.div_ceil(128));
        let mut got = NodeReport::default();
        for p in &parts {
            assert!(p.shards.len() <= 128);
            got.apply_change(p);
        }
        assert_eq!(got, new);
        assert_eq!(
            NodeReport::default().change_to(&NodeReport::default()).into_parts(128, 1).len(),
            1,
            "the totals still go"
        );
        // Bounded by bytes too: long split keys fill a part before its count does; one entry
        // larger than the bound still goes, alone.
        let mut long = report(1..100, 0);
        for k in long.split_keys.values_mut() {
            *k = vec![b'x'; 1000];
        }
        long.split_keys.insert(s(3), vec![b'y'; 10_000]);
        let parts = NodeReport::default().change_to(&long).into_parts(1000, 4000);
        let mut got = NodeReport::default();
        for p in &parts {
            let keys: usize = p.shards.iter().filter_map(|(_, e)| e.as_ref()?.split_key.as_ref()).map(Vec::len).sum();
            assert!(
                keys <= 4000 || p.shards.len() == 1,
                "a part of {} shards with {keys} bytes of keys",
                p.shards.len()
            );
            got.apply_change(p);
        }
        assert_eq!(got, long);
    }
}
