//! Reports and size checks: every `report_interval_ms` the node tells the meta leader what it
//! holds and leads ([`NodeReport`]: applied indexes, committed configurations, request rate,
//! sizes and split points of the shards it leads, and the request rates and load split keys
//! of its busiest led shards, one load window per report); a task of its own sizes the led
//! shards by reading their ranges, so a long read never delays a report.

use super::{Node, NodeError, SIZE_CHECK_BYTES_PER_ROUND, SIZE_SCAN_BYTES_MAX};
use crate::meta::{shard_range, META_GROUP};
use crate::peer_wire::MetaOp;
use crate::placement::{
    Epoch, GroupConf, LogIndex as PLogIndex, NodeReport, ReportChange, ShardDescriptor, ShardId, ShardLoad,
};
use crate::raft::Role;
use crate::shard::{range_size_blocking, KeyRange, RangeSize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::debug;

/// Shards of a report change sent in one message at most.
pub const REPORT_SHARDS_PER_MESSAGE: usize = 8192;
/// Bytes of a report change sent in one message, about, at most: well inside a transport
/// frame (4 MiB by default), whatever the split keys' lengths.
pub const REPORT_BYTES_PER_MESSAGE: usize = 1 << 20;
/// Reports sent as changes between two whole ones: a whole report now and then puts the meta
/// leader's copy right whatever happened to it (it cuts reports to the map's shards, and an op
/// may change the copy it shows).
pub const REPORTS_BETWEEN_WHOLE: u32 = 60;

/// What the reporter knows of the reports the meta leader took.
pub(super) struct ReportsSent {
    /// The last report the meta leader took, its number, and how many changes were sent
    /// since a whole report. `None` after any failure: the next report goes whole.
    last: Option<(u64, NodeReport, u32)>,
    /// What `last` was built from, if it carried no shard load: while neither moved, the next
    /// report differs from it only in its totals.
    basis: Option<Basis>,
    /// The number of the next report: the run (the process's start, in Unix seconds) in the
    /// upper half, a count in the lower. A node started again never numbers a report as an
    /// earlier run did (the meta leader would take a change onto the wrong one), and its
    /// numbers are above the earlier run's (which the leader drops as late copies).
    next_seq: u64,
}

impl ReportsSent {
    pub(super) fn new() -> ReportsSent {
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        ReportsSent { last: None, basis: None, next_seq: run << 32 }
    }
}

/// What a report is built from besides its totals and loads: the part read off the groups
/// (kept per generation of their summaries) and the version of the size checks.
#[derive(Clone)]
pub(super) struct Basis {
    groups: Arc<NodeReport>,
    sizes: u64,
}

impl Basis {
    fn same(&self, other: &Basis) -> bool {
        Arc::ptr_eq(&self.groups, &other.groups) && self.sizes == other.sizes
    }
}

/// A shard's last size check.
pub(super) struct SizeCheck {
    /// The shard's epoch when it was checked (a split changes its range).
    epoch: Epoch,
    /// The shard's applied index when it was checked.
    applied: u64,
    at: Instant,
    size: RangeSize,
}

impl Node {
    /// The reporter task: a report every `report_interval_ms`, then (on the meta leader) one
    /// step of every move plan and, when due, a balancer round.
    pub(super) async fn run_reporter(self, mut stop: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.inner.config.report_interval_ms.max(50));
        let mut served = 0u64;
        let mut at = Instant::now();
        let mut balanced_at = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => break,
            }
            let now_served = self.inner.stats.requests.load(Ordering::Relaxed);
            let secs = at.elapsed().as_secs_f64().max(0.001);
            let rate = ((now_served - served) as f64 / secs) as u64;
            served = now_served;
            at = Instant::now();
            if let Err(e) = self.report(rate).await {
                debug!(node = self.inner.id.0, error = %e, "report not delivered");
            }
            self.drive_moves().await;
            if let Some(ms) = self.inner.config.auto_balance_interval_ms {
                if balanced_at.elapsed() >= Duration::from_millis(ms) {
                    balanced_at = Instant::now();
                    self.auto_balance().await;
                }
            }
        }
    }

    /// The size-check task: [`Node::check_sizes`] four times per `size_check_interval_ms`
    /// (within 50 ms to 1 s).
    pub(super) async fn run_size_checks(self, mut stop: watch::Receiver<bool>) {
        let every = Duration::from_millis((self.inner.config.size_check_interval_ms / 4).clamp(50, 1_000));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => break,
            }
            self.check_sizes().await;
        }
    }

    pub(super) async fn report(&self, requests_per_s: u64) -> Result<(), NodeError> {
        let groups = self.report_groups().await?;
        let (shard_load, led_requests_per_s) = self.roll_load(&groups.leading);
        let basis = Basis { groups, sizes: self.inner.sizes_version.load(Ordering::Acquire) };
        // An idle node of 100,000 shards spent half its CPU copying, comparing and dropping
        // a report that had not changed: when nothing it is built from moved, only the
        // totals are sent.
        if shard_load.is_empty() {
            if let Some(sent) = self.send_totals(&basis, requests_per_s, led_requests_per_s).await {
                return sent;
            }
        }
        let mut report = self.report_from(&basis.groups, requests_per_s);
        (report.shard_load, report.led_requests_per_s) = (shard_load, led_requests_per_s);
        let basis = report.shard_load.is_empty().then_some(basis);
        self.send_report(report, basis).await
    }

    /// Sends only the totals, as the change onto the report the meta leader holds, if that
    /// report was built from `basis` and is not due to go whole; `None` when it cannot (the
    /// caller sends the whole report, or its change).
    async fn send_totals(
        &self,
        basis: &Basis,
        requests_per_s: u64,
        led_requests_per_s: u64,
    ) -> Option<Result<(), NodeError>> {
        let mut sent = self.inner.reports_sent.lock().await;
        if !sent.basis.as_ref().is_some_and(|b| b.same(basis)) {
            return None;
        }
        let between = self.inner.config.reports_between_whole;
        let (seq, mut last, n) = sent.last.take().filter(|(_, _, n)| *n < between)?;
        let change = ReportChange { shards: Vec::new(), requests_per_s, led_requests_per_s };
        match self.send_parts(&mut sent, Some(seq), change).await {
            Ok(seq) => {
                self.inner.stats.reports_changed.fetch_add(1, Ordering::Relaxed);
                (last.requests_per_s, last.led_requests_per_s) = (requests_per_s, led_requests_per_s);
                sent.last = Some((seq, last, n + 1));
                Some(Ok(()))
            }
            // Refused (the meta leader holds another report of this node): the whole one.
            Err(NodeError::Meta(e)) => {
                debug!(node = self.inner.id.0, error = %e, "report change refused");
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Sends `report` to the meta leader as the change from the last one it took (on an idle
    /// node, no shard changed), or whole when none is known to be held there or a whole one
    /// is due; in parts when large.
    pub(super) async fn send_report(&self, report: NodeReport, basis: Option<Basis>) -> Result<(), NodeError> {
        let mut sent = self.inner.reports_sent.lock().await;
        sent.basis = None;
        // Taken: whatever fails below leaves nothing, and the next report goes whole.
        let held = sent.last.take().filter(|(_, _, n)| *n < self.inner.config.reports_between_whole);
        if let Some((seq, last, n)) = held {
            match self.send_parts(&mut sent, Some(seq), last.change_to(&report)).await {
                Ok(seq) => {
                    self.inner.stats.reports_changed.fetch_add(1, Ordering::Relaxed);
                    sent.last = Some((seq, report, n + 1));
                    sent.basis = basis;
                    return Ok(());
                }
                // The meta leader holds another report of this node, or none (a new leader, or
                // one that started its tenure since): the whole report at once, rather than a
                // report interval without one.
                Err(NodeError::Meta(e)) => debug!(node = self.inner.id.0, error = %e, "report change refused"),
                Err(e) => return Err(e),
            }
        }
        let seq = self.send_parts(&mut sent, None, NodeReport::default().change_to(&report)).await?;
        self.inner.stats.reports_whole.fetch_add(1, Ordering::Relaxed);
        sent.last = Some((seq, report, 0));
        sent.basis = basis;
        Ok(())
    }

    /// Sends `change`, onto the report numbered `base`, in as many parts as it needs; the
    /// number of the report it made.
    async fn send_parts(
        &self,
        sent: &mut ReportsSent,
        mut base: Option<u64>,
        change: ReportChange,
    ) -> Result<u64, NodeError> {
        let parts = change.into_parts(self.inner.config.report_shards_per_message, REPORT_BYTES_PER_MESSAGE);
        let count = parts.len();
        let mut seq = 0;
        for (n, part) in parts.into_iter().enumerate() {
            seq = sent.next_seq;
            sent.next_seq = seq.wrapping_add(1);
            let shards = part.shards.len() as u64;
            let (node, addr, last) = (self.inner.id, self.inner.addr.clone(), n + 1 == count);
            let op = MetaOp::ReportChange { node, addr, base, seq, change: part, last };
            self.meta_follow(op).await?;
            self.inner.stats.report_shards_sent.fetch_add(shards, Ordering::Relaxed);
            base = Some(seq);
        }
        Ok(seq)
    }

    /// Counts a request routed to shard `d` for `key`: its load, and a sample of its keys
    /// once the shard is warm (load-based splitting, `flotilla_placement::load`). Only for
    /// shards this node led at the last report (a follower's count would be dropped), and
    /// locking only the shard's stripe of the trackers.
    pub(super) fn record_load(&self, d: &ShardDescriptor, key: &[u8]) {
        let now_ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.load.record(d.id, d.epoch, key, now_ms);
    }

    /// Closes the load window (one per report): the request rates of the busiest shards this
    /// node leads with a split key for those hot for long enough, and the rate over all the
    /// shards it leads. Counts of shards it does not lead, or whose epoch changed (split,
    /// replicas changed), are dropped; until the next report only `leading` are counted.
    fn roll_load(&self, leading: &[ShardId]) -> (BTreeMap<ShardId, ShardLoad>, u64) {
        let view = self.meta_view();
        let led: HashSet<ShardId> = leading.iter().copied().collect();
        let now_ms = self.inner.started.elapsed().as_millis() as u64;
        let window = self.inner.load.roll(now_ms, &led, |s| view.map.get(s));
        for (shard, l) in window.busiest.iter().filter(|(_, l)| l.split_key.is_some()) {
            debug!(node = self.inner.id.0, %shard, requests_per_s = l.requests_per_s, "hot shard: load split key named");
        }
        (window.busiest.into_iter().collect(), window.led_requests_per_s)
    }

    /// This node's report: leaders, applied indexes, sizes and split points of led shards.
    pub(super) async fn build_report(&self, requests_per_s: u64) -> Result<NodeReport, NodeError> {
        Ok(self.report_from(self.report_groups().await?.as_ref(), requests_per_s))
    }

    /// The report made of `groups` (the part read off the groups), `requests_per_s` and the
    /// sizes and split points of the shards it says this node leads.
    fn report_from(&self, groups: &NodeReport, requests_per_s: u64) -> NodeReport {
        let mut report = NodeReport { requests_per_s, ..groups.clone() };
        let threshold = self.inner.config.balancer.split_size_bytes_threshold;
        let leading: HashSet<ShardId> = report.leading.iter().copied().collect();
        if let Ok(sizes) = self.inner.sizes.lock() {
            for (shard, c) in sizes.iter().filter(|(s, _)| leading.contains(s)) {
                report.shard_bytes.insert(*shard, c.size.estimate);
                if let Some(middle) = c.size.middle.as_ref().filter(|_| c.size.bytes > threshold) {
                    report.split_keys.insert(*shard, middle.clone());
                }
            }
        }
        report
    }

    /// The part of this node's report read off its groups (leaders, their configurations,
    /// applied indexes): read again only when the host's generation of summaries moved.
    async fn report_groups(&self) -> Result<Arc<NodeReport>, NodeError> {
        let (generation, infos) = self.inner.host.group_info_shared().await?;
        if let Some((g, part)) = self.inner.report_groups.lock().ok().and_then(|r| r.clone()) {
            if g == generation {
                return Ok(part);
            }
        }
        let mut report = NodeReport::default();
        for i in infos.iter().filter(|i| i.group != META_GROUP) {
            if i.role == Role::Leader {
                report.leading.push(i.group);
                let m = &i.committed_conf.membership;
                let conf = GroupConf {
                    index: PLogIndex(i.committed_conf.log_id.index.0),
                    voters: m.nodes().into_iter().filter(|n| m.is_voter(*n)).collect(),
                    learners: m.learners.iter().filter(|n| m.is_learner(**n)).copied().collect(),
                    joint: m.is_joint(),
                };
                report.confs.insert(i.group, conf);
            }
            // What survives a crash of this node: a merge commits only once every replica of
            // the right shard reports its freeze applied this way (an applied index not yet
            // durable could go back, and the shard's leader be gone by then).
            report.applied.insert(i.group, PLogIndex(i.durable_applied.0));
        }
        let part = Arc::new(report);
        if let Ok(mut r) = self.inner.report_groups.lock() {
            if r.as_ref().is_none_or(|(g, _)| *g < generation) {
                *r = Some((generation, part.clone()));
            }
        }
        Ok(part)
    }

    /// The approximate bytes of `shard` as last sized here (only shards this node leads are).
    pub(super) fn approx_size_bytes(&self, shard: ShardId) -> Option<u64> {
        self.inner.sizes.lock().ok()?.get(&shard).map(|c| c.size.estimate)
    }

    /// Sizes the shards this node leads (their leaders report sizes; followers hold the same
    /// data), in its own task so a long read never delays reports. A shard is re-sized when its
    /// descriptor changed, or when it applied entries since its last check and that check is
    /// `size_check_interval_ms` old. One read stops at [`SIZE_SCAN_BYTES_MAX`] (a larger shard
    /// reports RocksDB's estimate of its whole size, and a split point inside the part read);
    /// one round reads at most [`SIZE_CHECK_BYTES_PER_ROUND`] in all, the rest wait. Shards no
    /// longer led are forgotten.
    async fn check_sizes(&self) {
        let Ok((generation, infos)) = self.inner.host.group_info_shared().await else { return };
        // Nothing led changed, applied anything or moved in the map since a check that left
        // no shard waiting: nothing is due.
        let seen = (generation, self.meta_revision());
        if self.inner.sizes_seen.lock().is_ok_and(|s| *s == Some(seen)) {
            return;
        }
        let led: HashMap<ShardId, u64> = infos
            .iter()
            .filter(|i| i.group != META_GROUP && i.role == Role::Leader)
            .map(|i| (i.group, i.applied.0))
            .collect();
        let view = self.meta_view();
        let every = Duration::from_millis(self.inner.config.size_check_interval_ms);
        // A shard that applied entries since its last check, but less than `every` ago,
        // waits: checks go on until it is sized.
        let mut waiting = false;
        let due: Vec<(ShardId, Epoch, u64, KeyRange)> = match self.inner.sizes.lock() {
            Ok(mut sizes) => {
                let before = sizes.len();
                sizes.retain(|s, _| led.contains_key(s));
                if sizes.len() != before {
                    self.inner.sizes_version.fetch_add(1, Ordering::AcqRel);
                }
                led.iter()
                    .filter_map(|(s, a)| {
                        let d = view.map.get(*s)?;
                        let c = sizes.get(s);
                        let moved = c.is_some_and(|c| c.epoch == d.epoch && c.applied != *a);
                        let stale = c.is_none_or(|c| c.epoch != d.epoch || (moved && c.at.elapsed() >= every));
                        waiting |= moved && !stale;
                        stale.then(|| (*s, d.epoch, *a, shard_range(d)))
                    })
                    .collect()
            }
            Err(_) => return,
        };
        let seen_now = |checked_all: bool| {
            if let Ok(mut s) = self.inner.sizes_seen.lock() {
                *s = (checked_all && !waiting).then_some(seen);
            }
        };
        if due.is_empty() {
            seen_now(true);
            return;
        }
        let wanted = due.len();
        let node = self.inner.id.0;
        let checked = self
            .inner
            .host
            .store()
            .blocking(move |s| {
                let mut out = Vec::new();
                let mut read = 0u64;
                for (shard, epoch, applied, range) in due {
                    if read >= SIZE_CHECK_BYTES_PER_ROUND {
                        break;
                    }
                    match range_size_blocking(s, &range, SIZE_SCAN_BYTES_MAX) {
                        Ok(size) => {
                            read += size.bytes;
                            out.push((shard, SizeCheck { epoch, applied, at: Instant::now(), size }));
                        }
                        Err(e) => debug!(node, %shard, error = %e, "size check failed"),
                    }
                }
                Ok(out)
            })
            .await;
        if let (Ok(list), Ok(mut sizes)) = (checked, self.inner.sizes.lock()) {
            // Every due shard sized (none left for the round's byte bound, none failed).
            let all = list.len() == wanted;
            if !list.is_empty() {
                self.inner.sizes_version.fetch_add(1, Ordering::AcqRel);
            }
            sizes.extend(list);
            drop(sizes);
            seen_now(all);
        }
    }
}
