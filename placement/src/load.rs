//! Load-based splitting, the measuring half: a shard's leader counts the requests it serves
//! per shard over windows (one window per report) and samples their keys, and once a shard
//! has stayed above the load-split threshold for enough windows in a row it names a key that
//! divides the sampled requests about evenly ([`LoadTracker`]). The node reports the busiest
//! shards ([`ShardLoad`]); the balancer proposes the split ([`crate::balance`]) through the
//! same meta command as a size split, and weighs leaders by these rates.
//!
//! As TiKV's load-base-split and CockroachDB's load-based splitting do: a rate over a window,
//! a bounded reservoir sample of request keys, a split only after the rate held for several
//! windows, at the sampled key that best balances the two sides, refused when one side would
//! take almost nothing (one hot key cannot be split: both halves would not share it).
//!
//! Bounded: an idle shard costs nothing (an entry exists only for shards that served a request
//! in the current or the last window); a shard allocates its sample only once it is warm (a
//! quarter of the threshold within one window, or hot in the last one), and a sample holds at
//! most [`LOAD_SAMPLE_KEYS_MAX`] keys of at most [`LOAD_SAMPLE_KEY_BYTES_MAX`] bytes. Pure: time
//! is an argument and the sample's randomness a seeded generator, so a run replays exactly.

use crate::map::{Epoch, ShardDescriptor, ShardId};
use crate::meta::ShardLoad;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Keys one shard's sample holds at most.
pub const LOAD_SAMPLE_KEYS_MAX: usize = 64;
/// Bytes of a sampled key kept at most: a longer key is cut. A cut key sorts at or before the
/// key, so it still divides the sample where the key would (or falls outside the range and is
/// not chosen).
pub const LOAD_SAMPLE_KEY_BYTES_MAX: usize = 256;
/// Sampled keys needed before a split key is chosen: fewer say too little about the load.
pub const LOAD_SAMPLE_KEYS_MIN: usize = 16;
/// The smaller side of a load split must take at least this share of the sampled requests
/// (percent): a split that leaves one side almost all the load does not spread it.
pub const LOAD_SPLIT_SIDE_PERCENT_MIN: usize = 25;
/// Shards a node reports the load of, at most (its busiest): bounds the report.
pub const LOAD_REPORT_SHARDS_MAX: usize = 64;
/// A shard below this many requests per second is not reported: its leadership is not worth
/// weighing, and the report stays small.
pub const LOAD_REPORT_REQUESTS_PER_S_MIN: u64 = 10;

/// Locks of a [`LoadTrackers`]: requests for shards in different stripes never wait for
/// each other.
pub const LOAD_TRACKER_STRIPES: usize = 16;

/// What closing a window gives: the busiest led shards, and the load of all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadWindow {
    /// The busiest led shards at or above [`LOAD_REPORT_REQUESTS_PER_S_MIN`], at most
    /// [`LOAD_REPORT_SHARDS_MAX`], busiest first (what the node reports shard by shard).
    pub busiest: Vec<(ShardId, ShardLoad)>,
    /// Requests per second over every led shard counted, the ones below the report's cut
    /// included: a node leading thousands of lukewarm shards is busy too.
    pub led_requests_per_s: u64,
}

/// When a shard counts as hot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSplitConfig {
    /// Requests per second above which a shard is hot; 0 turns load splitting off (rates are
    /// still measured and reported, for leader balancing).
    pub requests_per_s_threshold: u64,
    /// Windows in a row a shard must be hot before a split key is named (at least 1).
    pub hot_windows_min: u32,
}

/// One shard's count and sample on its leader.
#[derive(Debug)]
struct ShardWindow {
    /// The shard's epoch when counting started: a split or a replica change starts again.
    epoch: Epoch,
    /// Requests in the current window.
    requests: u64,
    /// When this shard's counting started, if after the window's start (ms): a shard whose
    /// leadership just arrived is rated over the time it was counted, not the whole window.
    since_ms: u64,
    /// Requests offered to the sample this window (the reservoir's denominator).
    sampled: u64,
    /// The reservoir: empty and unallocated until the shard is warm.
    sample: Vec<Vec<u8>>,
    /// Windows in a row above the threshold, this one not included.
    hot_windows: u32,
    /// The reservoir's generator (xorshift64), seeded by the shard id: deterministic.
    rng: u64,
}

/// Per-shard request rates and key samples of the shards a node serves, over windows that
/// [`LoadTracker::roll`] closes (the node does it once per report).
#[derive(Debug)]
pub struct LoadTracker {
    cfg: LoadSplitConfig,
    /// When the current window started (ms, the caller's clock).
    window_start_ms: u64,
    shards: HashMap<ShardId, ShardWindow>,
    /// The shards this node led at the last window's close, if known: requests for others
    /// are not counted (a follower's count would be dropped at the close anyway).
    leading: Option<HashSet<ShardId>>,
}

impl LoadTracker {
    /// A tracker whose first window starts at `now_ms`.
    pub fn new(cfg: LoadSplitConfig, now_ms: u64) -> LoadTracker {
        LoadTracker { cfg, window_start_ms: now_ms, shards: HashMap::new(), leading: None }
    }

    /// Shards with an entry (they served requests in this window or were hot in the last).
    pub fn tracked(&self) -> usize {
        self.shards.len()
    }

    /// Shards whose sample is allocated.
    pub fn sampling(&self) -> usize {
        self.shards.values().filter(|w| w.sample.capacity() > 0).count()
    }

    /// From now on, counts only requests for `shards` (the ones this node leads); until
    /// called, counts every request.
    pub fn lead_only(&mut self, shards: HashSet<ShardId>) {
        self.leading = Some(shards);
    }

    /// Counts one request for `key` in `shard` (at `epoch`, as routed), at `now_ms`, unless
    /// this node did not lead the shard at the last window's close ([`LoadTracker::lead_only`]).
    pub fn record(&mut self, shard: ShardId, epoch: Epoch, key: &[u8], now_ms: u64) {
        if self.leading.as_ref().is_some_and(|l| !l.contains(&shard)) {
            return;
        }
        let start = self.window_start_ms;
        let w = self.shards.entry(shard).or_insert_with(|| ShardWindow::new(shard, epoch, now_ms.max(start)));
        if w.epoch != epoch {
            *w = ShardWindow::new(shard, epoch, now_ms.max(start));
        }
        w.requests += 1;
        // Warm: a rate of a quarter of the threshold so far this window (over at least 100 ms,
        // as at the close), or hot in the last one. A rate, not the window's count: windows
        // are report intervals, not seconds.
        let elapsed_ms = now_ms.saturating_sub(w.since_ms).max(100);
        let warm = w.hot_windows > 0
            || u128::from(w.requests) * 4_000 >= u128::from(self.cfg.requests_per_s_threshold) * u128::from(elapsed_ms);
        if self.cfg.requests_per_s_threshold > 0 && warm {
            w.offer(key);
        }
    }

    /// Closes the window at `now_ms`: each shard's rate over it, a split key for shards hot
    /// for [`LoadSplitConfig::hot_windows_min`] windows in a row, and a new window. `led` gives
    /// the current descriptor of each shard this node leads; the others are forgotten (only a
    /// leader's count means anything), and so is a shard whose epoch changed. Returns the
    /// busiest shards (see [`LoadWindow`]) and the load of all.
    pub fn roll<'a>(&mut self, now_ms: u64, led: impl Fn(ShardId) -> Option<&'a ShardDescriptor>) -> LoadWindow {
        let (mut busiest, led_requests_per_s) = self.close(now_ms, led);
        cut(&mut busiest);
        LoadWindow { busiest, led_requests_per_s }
    }

    /// [`LoadTracker::roll`] without the sort and the cut: every led shard at or above
    /// [`LOAD_REPORT_REQUESTS_PER_S_MIN`], and the sum of all led shards' rates.
    fn close<'a>(
        &mut self,
        now_ms: u64,
        led: impl Fn(ShardId) -> Option<&'a ShardDescriptor>,
    ) -> (Vec<(ShardId, ShardLoad)>, u64) {
        let cfg = self.cfg;
        let mut out = Vec::new();
        let mut total = 0u64;
        self.shards.retain(|shard, w| {
            let Some(d) = led(*shard).filter(|d| d.epoch == w.epoch) else { return false };
            // Rated over at least 100 ms: a shard counted for an instant says nothing.
            let elapsed_ms = now_ms.saturating_sub(w.since_ms).max(100);
            let rate = w.requests.saturating_mul(1000) / elapsed_ms;
            total = total.saturating_add(rate);
            let hot = cfg.requests_per_s_threshold > 0 && rate >= cfg.requests_per_s_threshold;
            w.hot_windows = if hot { w.hot_windows.saturating_add(1) } else { 0 };
            let split_key = (w.hot_windows >= cfg.hot_windows_min.max(1)).then(|| split_key(&w.sample, d)).flatten();
            if rate >= LOAD_REPORT_REQUESTS_PER_S_MIN {
                out.push((*shard, ShardLoad { requests_per_s: rate, split_key, epoch: d.epoch }));
            }
            w.requests = 0;
            w.sampled = 0;
            w.since_ms = now_ms;
            if hot {
                w.sample.clear(); // keeps the allocation for the next window
            } else {
                w.sample = Vec::new(); // frees it
            }
            rate > 0 || hot
        });
        self.window_start_ms = now_ms;
        debug_assert!(self.shards.values().all(|w| w.sample.len() <= LOAD_SAMPLE_KEYS_MAX));
        (out, total)
    }
}

/// Busiest first (ties by shard id), at most [`LOAD_REPORT_SHARDS_MAX`].
fn cut(busiest: &mut Vec<(ShardId, ShardLoad)>) {
    busiest.sort_by(|a, b| b.1.requests_per_s.cmp(&a.1.requests_per_s).then(a.0.cmp(&b.0)));
    busiest.truncate(LOAD_REPORT_SHARDS_MAX);
}

/// A [`LoadTracker`] shared by the tasks serving requests: [`LOAD_TRACKER_STRIPES`] trackers,
/// each behind its own lock and holding the shards whose id falls in its stripe. A request
/// locks one stripe for a few hash-map operations; a window's close locks one stripe at a
/// time, and sorts and cuts the report outside the locks.
#[derive(Debug)]
pub struct LoadTrackers {
    stripes: Box<[Mutex<LoadTracker>]>,
}

impl LoadTrackers {
    /// Trackers whose first window starts at `now_ms`.
    pub fn new(cfg: LoadSplitConfig, now_ms: u64) -> LoadTrackers {
        LoadTrackers { stripes: (0..LOAD_TRACKER_STRIPES).map(|_| Mutex::new(LoadTracker::new(cfg, now_ms))).collect() }
    }

    fn stripe(&self, shard: ShardId) -> MutexGuard<'_, LoadTracker> {
        // A panic while holding a stripe leaves counts at worst off by one request.
        self.stripes[(shard.0 % self.stripes.len() as u64) as usize].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`LoadTracker::record`], locking the shard's stripe only.
    pub fn record(&self, shard: ShardId, epoch: Epoch, key: &[u8], now_ms: u64) {
        self.stripe(shard).record(shard, epoch, key, now_ms);
    }

    /// Closes every stripe's window at `now_ms` ([`LoadTracker::roll`]): `leading` are the
    /// shards this node leads now (the only ones counted until the next close) and
    /// `descriptor` their current descriptors.
    pub fn roll<'a>(
        &self,
        now_ms: u64,
        leading: &HashSet<ShardId>,
        descriptor: impl Fn(ShardId) -> Option<&'a ShardDescriptor>,
    ) -> LoadWindow {
        let n = self.stripes.len() as u64;
        let mut sets: Vec<HashSet<ShardId>> = vec![HashSet::new(); self.stripes.len()];
        for s in leading {
            sets[(s.0 % n) as usize].insert(*s);
        }
        let mut busiest = Vec::new();
        let mut led_requests_per_s = 0u64;
        for (i, set) in sets.into_iter().enumerate() {
            let mut t = self.stripes[i].lock().unwrap_or_else(PoisonError::into_inner);
            let (out, total) = t.close(now_ms, |s| if set.contains(&s) { descriptor(s) } else { None });
            t.lead_only(set);
            drop(t);
            busiest.extend(out);
            led_requests_per_s = led_requests_per_s.saturating_add(total);
        }
        cut(&mut busiest);
        LoadWindow { busiest, led_requests_per_s }
    }

    /// Shards with an entry, over all stripes ([`LoadTracker::tracked`]).
    pub fn tracked(&self) -> usize {
        (0..self.stripes.len()).map(|i| self.stripes[i].lock().unwrap_or_else(PoisonError::into_inner).tracked()).sum()
    }

    /// Shards whose sample is allocated, over all stripes ([`LoadTracker::sampling`]).
    pub fn sampling(&self) -> usize {
        (0..self.stripes.len()).map(|i| self.stripes[i].lock().unwrap_or_else(PoisonError::into_inner).sampling()).sum()
    }
}

impl ShardWindow {
    fn new(shard: ShardId, epoch: Epoch, since_ms: u64) -> ShardWindow {
        ShardWindow {
            epoch,
            requests: 0,
            since_ms,
            sampled: 0,
            sample: Vec::new(),
            hot_windows: 0,
            // Any odd constant keeps the state non-zero, which xorshift needs.
            rng: shard.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// Reservoir sampling (Vitter's algorithm R): every request offered in this window has the
    /// same chance to be in the sample.
    fn offer(&mut self, key: &[u8]) {
        self.sampled += 1;
        let key = &key[..key.len().min(LOAD_SAMPLE_KEY_BYTES_MAX)];
        if self.sample.len() < LOAD_SAMPLE_KEYS_MAX {
            if self.sample.capacity() == 0 {
                self.sample.reserve_exact(LOAD_SAMPLE_KEYS_MAX);
            }
            self.sample.push(key.to_vec());
            return;
        }
        let slot = (self.next_random() % self.sampled) as usize;
        if let Some(kept) = self.sample.get_mut(slot) {
            kept.clear();
            kept.extend_from_slice(key); // reuses the replaced key's buffer
        }
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// The sampled key that splits `d` so that the two sides' sampled requests are as even as
/// possible: requests for keys below it go left, the rest right. `None` with too few samples
/// ([`LOAD_SAMPLE_KEYS_MIN`]), when no sampled key lies strictly inside the range (a split at
/// the shard's start would leave an empty shard), or when even the best key leaves the smaller
/// side less than [`LOAD_SPLIT_SIDE_PERCENT_MIN`] of the sample: one hot key (or a few
/// adjacent ones) carries the load, and no split shares it. Ties go to the lower key.
pub fn split_key(sample: &[Vec<u8>], d: &ShardDescriptor) -> Option<Vec<u8>> {
    if sample.len() < LOAD_SAMPLE_KEYS_MIN {
        return None;
    }
    let mut keys: Vec<&[u8]> = sample.iter().map(Vec::as_slice).collect();
    keys.sort_unstable();
    let n = keys.len();
    let mut best: Option<(usize, usize)> = None; // (imbalance, index of the key's first sample)
    for i in 0..n {
        let k = keys[i];
        // Each distinct key once, at its first sample: `i` samples sort below it.
        if (i > 0 && keys[i - 1] == k) || k <= d.start.as_slice() || !d.contains(k) {
            continue;
        }
        let imbalance = n.abs_diff(2 * i);
        if best.is_none_or(|(b, _)| imbalance < b) {
            best = Some((imbalance, i));
        }
    }
    let (_, i) = best?;
    let smaller = i.min(n - i);
    debug_assert!(smaller <= n / 2);
    (smaller * 100 >= n * LOAD_SPLIT_SIDE_PERCENT_MIN).then(|| keys[i].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{NodeId, Replica, ReplicaRole};

    fn shard(start: &str, end: Option<&str>) -> ShardDescriptor {
        ShardDescriptor {
            id: ShardId(7),
            start: start.as_bytes().to_vec(),
            end: end.map(|e| e.as_bytes().to_vec()),
            epoch: Epoch { conf_version: 1, version: 1 },
            replicas: vec![Replica { node: NodeId(1), role: ReplicaRole::Voter }],
        }
    }

    fn keys(ks: &[&str]) -> Vec<Vec<u8>> {
        ks.iter().map(|k| k.as_bytes().to_vec()).collect()
    }

    const CFG: LoadSplitConfig = LoadSplitConfig { requests_per_s_threshold: 1_000, hot_windows_min: 3 };

    /// `rate` requests per second for one second over `keys` in turn, then the window closed.
    fn second(
        t: &mut LoadTracker,
        d: &ShardDescriptor,
        keys: &[String],
        rate: u64,
        now_ms: &mut u64,
    ) -> Vec<(ShardId, ShardLoad)> {
        for i in 0..rate {
            let k = &keys[(i as usize * 7919) % keys.len()];
            t.record(d.id, d.epoch, k.as_bytes(), *now_ms + i * 1000 / rate.max(1));
        }
        *now_ms += 1000;
        t.roll(*now_ms, |s| (s == d.id).then_some(d)).busiest
    }

    fn spread(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("k{i:04}")).collect()
    }

    #[test]
    fn the_key_chosen_divides_the_sampled_load_evenly() {
        let d = shard("a", Some("z"));
        let sample = keys(&["b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]);
        assert_eq!(split_key(&sample, &d), Some(b"j".to_vec()), "8 below, 8 at or above");
        // Skewed: most requests on low keys, so the split lands low.
        let mut skewed = keys(&["b"; 6]);
        skewed.extend(keys(&["c"; 4]));
        skewed.extend(keys(&["d", "e", "f", "g", "h", "i"]));
        assert_eq!(split_key(&skewed, &d), Some(b"c".to_vec()), "6 left, 10 right beats 10 left, 6 right on ties");
    }

    #[test]
    fn one_hot_key_is_not_split_nor_a_key_at_the_start() {
        let d = shard("a", Some("z"));
        assert_eq!(split_key(&keys(&["m"; 64]), &d), None, "one key takes everything");
        let mut mostly = keys(&["m"; 56]);
        mostly.extend(keys(&["b", "c", "d", "n", "o", "p", "q", "r"]));
        assert_eq!(split_key(&mostly, &d), None, "one key takes 7/8: either side keeps it whole");
        // The shard's start is no split point, nor anything outside the range.
        let mut at_start = keys(&["a"; 8]);
        at_start.extend(keys(&["zz"; 8]));
        assert_eq!(split_key(&at_start, &d), None);
        assert_eq!(split_key(&keys(&["b", "c"]), &d), None, "too few samples");
    }

    #[test]
    fn a_shard_hot_long_enough_gets_a_split_key_inside_its_hot_range() {
        let d = shard("", None);
        let hot = spread(200);
        let mut t = LoadTracker::new(CFG, 0);
        let mut now = 0;
        for window in 1..=CFG.hot_windows_min {
            let out = second(&mut t, &d, &hot, 2_000, &mut now);
            assert_eq!(out.len(), 1);
            let (s, load) = &out[0];
            assert_eq!(*s, d.id);
            assert!((1_900..=2_100).contains(&load.requests_per_s), "{load:?}");
            if window < CFG.hot_windows_min {
                assert_eq!(load.split_key, None, "window {window}: not hot for long enough yet");
            } else {
                let key = load.split_key.clone().expect("hot for long enough");
                assert!(key.as_slice() > b"k0040".as_slice() && key.as_slice() < b"k0160".as_slice(), "{key:?}");
            }
        }
    }

    #[test]
    fn a_shard_that_cools_down_is_not_split() {
        let d = shard("", None);
        let hot = spread(200);
        let mut t = LoadTracker::new(CFG, 0);
        let mut now = 0;
        for _ in 1..CFG.hot_windows_min {
            second(&mut t, &d, &hot, 2_000, &mut now);
        }
        let cool = second(&mut t, &d, &hot, 500, &mut now);
        assert_eq!(cool[0].1.split_key, None);
        // Hot again: the count of windows starts over.
        for _ in 1..CFG.hot_windows_min {
            let out = second(&mut t, &d, &hot, 2_000, &mut now);
            assert_eq!(out[0].1.split_key, None);
        }
        assert!(second(&mut t, &d, &hot, 2_000, &mut now)[0].1.split_key.is_some());
        // Idle: the entry and its sample are gone.
        second(&mut t, &d, &hot, 0, &mut now);
        assert_eq!(second(&mut t, &d, &hot, 0, &mut now), vec![]);
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn memory_stays_bounded_and_idle_shards_allocate_no_sample() {
        let mut t = LoadTracker::new(CFG, 0);
        let ds: Vec<ShardDescriptor> =
            (0..1_000u64).map(|i| ShardDescriptor { id: ShardId(i), ..shard("", None) }).collect();
        let long = vec![b'x'; 10_000];
        // A thousand shards with a few requests each: counted, none sampled.
        for d in &ds {
            for _ in 0..20 {
                t.record(d.id, d.epoch, &long, 10);
            }
        }
        assert_eq!((t.tracked(), t.sampling()), (1_000, 0));
        // One hot shard: sampled, within the bounds, long keys cut.
        for i in 0..100_000u64 {
            t.record(ds[3].id, ds[3].epoch, &[&long[..], &i.to_be_bytes()].concat(), 500);
        }
        assert_eq!(t.sampling(), 1);
        let w = &t.shards[&ds[3].id];
        assert_eq!(w.sample.len(), LOAD_SAMPLE_KEYS_MAX);
        assert!(w.sample.iter().all(|k| k.len() == LOAD_SAMPLE_KEY_BYTES_MAX));
        let out = t.roll(1_000, |s| ds.get(s.0 as usize)).busiest;
        assert_eq!(out.len(), LOAD_REPORT_SHARDS_MAX.min(1_000), "the report is bounded");
        assert_eq!(out[0].0, ds[3].id, "busiest first");
        // A shard no longer led, or split (another epoch), is forgotten.
        t.record(ds[3].id, ds[3].epoch, b"a", 1_100);
        let moved = Epoch { version: 2, ..ds[3].epoch };
        t.record(ds[4].id, ds[4].epoch, b"a", 1_100);
        t.roll(2_000, |s| (s == ds[4].id).then_some(&ds[4]));
        assert_eq!(t.tracked(), 1);
        t.record(ds[4].id, moved, b"a", 2_100);
        assert_eq!(t.shards[&ds[4].id].requests, 1, "another epoch counts from zero");
    }

    #[test]
    fn off_means_measured_but_never_split_nor_sampled() {
        let off = LoadSplitConfig { requests_per_s_threshold: 0, hot_windows_min: 1 };
        let d = shard("", None);
        let mut t = LoadTracker::new(off, 0);
        let mut now = 0;
        let out = second(&mut t, &d, &spread(100), 5_000, &mut now);
        assert_eq!((out[0].1.requests_per_s, out[0].1.split_key.clone(), t.sampling()), (5_000, None, 0));
    }

    #[test]
    fn the_led_total_counts_every_led_shard_not_only_the_reported_ones() {
        let mut t = LoadTracker::new(CFG, 0);
        let ds: Vec<ShardDescriptor> =
            (0..100u64).map(|i| ShardDescriptor { id: ShardId(i), ..shard("", None) }).collect();
        // A hundred shards at 9 requests/s (under the report's cut), one at 400.
        for d in &ds {
            let n = if d.id.0 == 50 { 400 } else { 9 };
            for _ in 0..n {
                t.record(d.id, d.epoch, b"k", 0);
            }
        }
        let w = t.roll(1_000, |s| ds.get(s.0 as usize));
        assert_eq!(w.busiest.len(), 1);
        assert_eq!(w.busiest[0].1, ShardLoad { requests_per_s: 400, split_key: None, epoch: ds[50].epoch });
        assert_eq!(w.led_requests_per_s, 99 * 9 + 400);
    }

    #[test]
    fn warm_means_a_rate_not_a_windows_count() {
        // 60 requests/s over a 5 s window: 300 requests, more than a quarter of the 1,000/s
        // threshold as a count, far less as a rate. Not warm: no sample.
        let d = shard("", None);
        let mut t = LoadTracker::new(CFG, 0);
        for i in 0..300u64 {
            t.record(d.id, d.epoch, b"k", i * 5_000 / 300);
        }
        assert_eq!(t.sampling(), 0);
        // 400 requests within 1 s of a new window: 400/s, warm.
        t.roll(5_000, |s| (s == d.id).then_some(&d));
        for i in 0..400u64 {
            t.record(d.id, d.epoch, b"k", 5_000 + i * 1_000 / 400);
        }
        assert_eq!(t.sampling(), 1);
    }

    #[test]
    fn striped_trackers_count_only_led_shards_and_report_the_busiest_of_all() {
        let ts = LoadTrackers::new(CFG, 0);
        let ds: Vec<ShardDescriptor> =
            (0..200u64).map(|i| ShardDescriptor { id: ShardId(i), ..shard("", None) }).collect();
        for d in &ds {
            for _ in 0..(10 + d.id.0) {
                ts.record(d.id, d.epoch, b"k", 0);
            }
        }
        assert_eq!(ts.tracked(), 200, "nothing known of leadership yet: all counted");
        let leading: HashSet<ShardId> = ds.iter().map(|d| d.id).filter(|s| s.0 % 2 == 0).collect();
        let w = ts.roll(1_000, &leading, |s| ds.get(s.0 as usize));
        assert_eq!(w.busiest.len(), LOAD_REPORT_SHARDS_MAX);
        let ids: Vec<u64> = w.busiest.iter().map(|(s, _)| s.0).collect();
        let want: Vec<u64> = (0..LOAD_REPORT_SHARDS_MAX as u64).map(|i| 198 - 2 * i).collect();
        assert_eq!(ids, want, "the busiest led shards over all stripes, busiest first");
        assert_eq!(w.led_requests_per_s, (0..100u64).map(|i| 10 + 2 * i).sum::<u64>());
        assert_eq!(ts.tracked(), 100, "the shards not led are forgotten");
        // Requests for shards this node does not lead are not counted any more.
        for d in &ds {
            ts.record(d.id, d.epoch, b"k", 1_100);
        }
        assert_eq!(ts.tracked(), 100);
        let w = ts.roll(2_000, &leading, |s| ds.get(s.0 as usize));
        assert_eq!(w.led_requests_per_s, 100);
    }
}
