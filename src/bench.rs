//! The load generator behind `flotilla bench`: N concurrent workers issuing puts, gets or a mix
//! through the ordinary [`Client`], for a duration or a number of operations, recording every
//! latency. Keys are `K` fixed keys, each the 16-hex-digit mix of its index (spread evenly over
//! the hex split points `flotilla dev` uses). Values are a fixed pattern per worker (compresses
//! well) or, with `random_values`, fresh pseudo-random bytes per put (does not compress: what a
//! disk-bound benchmark needs). With `timeline_ms`, the report also has one row per interval
//! (throughput and latency percentiles), so phases of a long run can be told apart.

use crate::{Client, ClientConfig, ClientError};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Workers sharing one client (one QUIC connection per node); more workers get more clients,
/// so one connection's stream limit does not cap the load.
pub const WORKERS_PER_CLIENT: usize = 16;

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Puts only.
    Put,
    /// Gets only (of keys a put run wrote).
    Get,
    /// Half gets, half puts.
    Mixed,
}

/// Parameters of a run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    /// Workload.
    pub workload: Workload,
    /// Concurrent workers (each has one request outstanding).
    pub clients: usize,
    /// Value size in bytes.
    pub value_size: usize,
    /// Number of distinct keys.
    pub keys: u64,
    /// Run for this long...
    pub duration: Duration,
    /// ...or stop after this many operations (whichever comes first).
    pub ops: Option<u64>,
    /// Each put writes fresh pseudo-random bytes (incompressible) instead of a fixed pattern.
    pub random_values: bool,
    /// Interval of the report's timeline (ms); none: no timeline.
    pub timeline_ms: Option<u32>,
}

/// One interval of a run's timeline: operations that ended in it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelineRow {
    /// Start of the interval, seconds since the run started.
    pub t_s: f64,
    /// Successful operations that ended in the interval.
    pub ops: u64,
    /// Failed operations that ended in the interval.
    pub errors: u64,
    /// Successful operations per second over the interval.
    pub ops_per_s: f64,
    /// Latency percentiles of those operations (ms; 0 when there were none).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Largest latency (ms).
    pub max_ms: f64,
}

/// The summary of a run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Workload.
    pub workload: Workload,
    /// Workers.
    pub clients: usize,
    /// Value size (bytes).
    pub value_size: usize,
    /// Distinct keys.
    pub keys: u64,
    /// Operations that succeeded.
    pub ops: u64,
    /// Failed operations: outcome unknown.
    pub errors_unknown: u64,
    /// Failed operations: unavailable or invalid.
    pub errors_other: u64,
    /// Wall time (s).
    pub elapsed_s: f64,
    /// Successful operations per second.
    pub ops_per_s: f64,
    /// Latency percentiles of successful operations (ms).
    pub p50_ms: f64,
    /// 90th percentile (ms).
    pub p90_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// 99.9th percentile (ms).
    pub p999_ms: f64,
    /// Largest latency (ms).
    pub max_ms: f64,
    /// When the run started (Unix time, seconds), to line the timeline up with other samples.
    pub start_unix_s: f64,
    /// One row per `timeline_ms` interval (empty without it).
    pub timeline: Vec<TimelineRow>,
    /// What each server did during the run, from its metrics page (nodes whose page could not
    /// be read are left out; empty when no node has a metrics address).
    pub servers: Vec<ServerFigures>,
    /// CPU time the server processes used during the run per successful operation (µs),
    /// every process counted once; unknown (`None`) unless every node with a metrics address
    /// gave its process's figures before and after, from the same process. On a machine shared
    /// with the load generator this moves less from run to run than operations per second.
    pub servers_cpu_us_per_op: Option<f64>,
    /// CPU time this load generator used per successful operation (µs), if it could be read.
    pub client_cpu_us_per_op: Option<f64>,
}

/// One server's work during a run: the difference of its metrics page before and after.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerFigures {
    /// The node.
    pub node: u64,
    /// Client requests it served per second.
    pub requests_per_s: f64,
    /// Store write batches (group commits) per second.
    pub write_batches_per_s: f64,
    /// fsyncs per second.
    pub fsyncs_per_s: f64,
    /// Groups' log appends per fsync: how many shards one fsync made durable (0 without fsyncs).
    pub appends_per_fsync: f64,
    /// Share of the run the store's writer spent writing (0..1): near 1, the disk bounds puts.
    pub writer_busy: f64,
    /// Raft messages it sent per second (appends, heartbeats, answers; every group): with reads,
    /// how many reads one ReadIndex round of heartbeats carried.
    pub raft_messages_per_s: f64,
    /// Its process's CPU time during the run (µs; user and system; a process holding several
    /// nodes shows the same figure for each). `None` if a page lacked it, or the process was
    /// not the same one at the end (a restart).
    pub cpu_us: Option<f64>,
    /// Cores' worth of CPU its process used over the run, from `cpu_us`.
    pub cpu_cores: Option<f64>,
    /// Its process's instance (`flotilla_process_instance`; 0 if the page did not say), so
    /// that the figures of nodes sharing a process are counted once.
    pub process: u64,
}

impl ServerFigures {
    /// The figures of `node` from its page's samples before and after `elapsed_s` seconds.
    pub fn between(node: u64, before: &HashMap<String, f64>, after: &HashMap<String, f64>, elapsed_s: f64) -> Self {
        let delta =
            |name: &str| (after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)).max(0.0);
        let per_s = |name: &str| delta(name) / elapsed_s.max(1e-9);
        let syncs = delta("flotilla_store_syncs_total");
        let cpu_us = cpu_between(before, after);
        ServerFigures {
            node,
            requests_per_s: per_s("flotilla_requests_total"),
            write_batches_per_s: per_s("flotilla_store_write_batches_total"),
            fsyncs_per_s: per_s("flotilla_store_syncs_total"),
            appends_per_fsync: if syncs > 0.0 { delta("flotilla_host_log_appends_total") / syncs } else { 0.0 },
            writer_busy: per_s("flotilla_store_write_microseconds_total") / 1e6,
            raft_messages_per_s: per_s("flotilla_host_messages_sent_total"),
            cpu_us,
            cpu_cores: cpu_us.map(|us| us / 1e6 / elapsed_s.max(1e-9)),
            process: after.get(INSTANCE).copied().unwrap_or(0.0) as u64,
        }
    }
}

/// The metric naming a node's process.
const INSTANCE: &str = "flotilla_process_instance";
/// The metric of a process's CPU time.
const CPU: &str = "flotilla_process_cpu_microseconds_total";

/// A process's CPU time between two pages, if both give it for the same process and it did
/// not go back.
fn cpu_between(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Option<f64> {
    let same = matches!((before.get(INSTANCE), after.get(INSTANCE)), (Some(a), Some(b)) if a == b && *a != 0.0);
    let (a, b) = (before.get(CPU)?, after.get(CPU)?);
    (same && b >= a).then_some(b - a)
}

/// CPU time of the servers' processes per operation (µs): each process once, however many
/// nodes it holds. Unknown if fewer than `nodes` nodes gave figures, if any node's are
/// unknown, or without operations.
pub fn servers_cpu_us_per_op(servers: &[ServerFigures], nodes: usize, ops: u64) -> Option<f64> {
    if servers.len() < nodes || ops == 0 {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let mut cpu = 0.0;
    for f in servers {
        let us = f.cpu_us?;
        if seen.insert(f.process) {
            cpu += us;
        }
    }
    Some(cpu / ops as f64)
}

/// How long a metrics page may take to read.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Each node's metrics samples now; nodes whose page cannot be read are skipped.
async fn scrape_all(metrics: &[(u64, String)]) -> HashMap<u64, HashMap<String, f64>> {
    let mut out = HashMap::new();
    for (node, addr) in metrics {
        match crate::metrics_scrape::fetch(addr, SCRAPE_TIMEOUT).await {
            Ok(page) => {
                out.insert(*node, crate::metrics_scrape::samples(&page));
            }
            Err(e) => tracing::warn!(node, error = %e, "cannot read the metrics page; no server figures for it"),
        }
    }
    out
}

/// The value percentile `p` of sorted latencies in microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted_us.len() as f64 - 1.0)).round() as usize;
    f64::from(sorted_us[idx.min(sorted_us.len() - 1)]) / 1000.0
}

/// Cuts `(end_ms, latency_us)` samples of successes and end times of failures into rows of
/// `interval_ms`, covering `elapsed_ms` (a last, partial interval included).
pub fn timeline(ok: &[(u32, u32)], failed_ms: &[u32], interval_ms: u32, elapsed_ms: u32) -> Vec<TimelineRow> {
    assert!(interval_ms > 0, "a timeline needs a positive interval");
    let rows = (elapsed_ms.div_ceil(interval_ms)).max(1) as usize;
    let mut lat: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut errors = vec![0u64; rows];
    let row = |t: u32| ((t / interval_ms) as usize).min(rows - 1);
    for &(t, l) in ok {
        lat[row(t)].push(l);
    }
    for &t in failed_ms {
        errors[row(t)] += 1;
    }
    let mut out = Vec::with_capacity(rows);
    for (i, mut l) in lat.into_iter().enumerate() {
        l.sort_unstable();
        let start_ms = i as u32 * interval_ms;
        let span_ms = interval_ms.min(elapsed_ms.saturating_sub(start_ms)).max(1);
        out.push(TimelineRow {
            t_s: f64::from(start_ms) / 1000.0,
            ops: l.len() as u64,
            errors: errors[i],
            ops_per_s: l.len() as f64 * 1000.0 / f64::from(span_ms),
            p50_ms: percentile_ms(&l, 50.0),
            p99_ms: percentile_ms(&l, 99.0),
            max_ms: l.last().map(|v| f64::from(*v) / 1000.0).unwrap_or(0.0),
        });
    }
    debug_assert_eq!(out.len(), rows);
    out
}

/// Fills `value` with xorshift64 bytes from `state` (advanced): incompressible, cheap.
pub fn fill_random(value: &mut [u8], state: &mut u64) {
    assert!(*state != 0, "xorshift state must not be zero");
    for chunk in value.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// The key of index `i`.
pub fn key_of(i: u64) -> Vec<u8> {
    // SplitMix64's finalizer: a bijection, so K indexes give K distinct keys.
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31)).into_bytes()
}

/// Live counters, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful operations so far.
    pub ops: AtomicU64,
    /// Failed operations so far.
    pub errors: AtomicU64,
}

/// Runs the benchmark with clients made from `client_config`; `progress` is updated live.
/// `metrics` names each node's metrics address (`host:port`), read before and after the run
/// for the report's server figures.
pub async fn run(
    client_config: ClientConfig,
    cfg: BenchConfig,
    metrics: &[(u64, String)],
    progress: Arc<Progress>,
) -> Result<BenchReport, ClientError> {
    let n_clients = cfg.clients.div_ceil(WORKERS_PER_CLIENT).max(1);
    let mut clients = Vec::new();
    for _ in 0..n_clients {
        clients.push(Arc::new(Client::connect(client_config.clone()).await?));
    }
    let before = scrape_all(metrics).await;
    let client_cpu_before = flotilla_shard::store_metrics::cpu_microseconds();
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_unix_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let mut workers = Vec::new();
    for w in 0..cfg.clients.max(1) {
        let client = clients[w % n_clients].clone();
        let (stop, issued, unknown, progress, cfg) =
            (stop.clone(), issued.clone(), unknown.clone(), progress.clone(), cfg.clone());
        workers.push(tokio::spawn(async move {
            let mut lat_us: Vec<u32> = Vec::new();
            // End times (ms since start) of each success, kept only for a timeline.
            let mut end_ms: Vec<u32> = Vec::new();
            let mut failed_ms: Vec<u32> = Vec::new();
            let mut value: Vec<u8> = (0..cfg.value_size).map(|i| b'a' + ((i + w) % 26) as u8).collect();
            let mut rng = (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let mut value_rng = rng | 1;
            loop {
                if stop.load(Ordering::Relaxed) || start.elapsed() >= cfg.duration {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if cfg.ops.is_some_and(|max| n >= max) {
                    break;
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = key_of(match cfg.workload {
                    // Puts walk the keys in order first, so a put run writes each key.
                    Workload::Put => n % cfg.keys.max(1),
                    _ => rng % cfg.keys.max(1),
                });
                let read = match cfg.workload {
                    Workload::Put => false,
                    Workload::Get => true,
                    Workload::Mixed => rng >> 63 == 0,
                };
                if cfg.random_values && !read {
                    fill_random(&mut value, &mut value_rng);
                }
                let t = Instant::now();
                let r =
                    if read { client.get(&key).await.map(|_| ()) } else { client.put(&key, &value).await.map(|_| ()) };
                match r {
                    Ok(()) => {
                        lat_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        if cfg.timeline_ms.is_some() {
                            end_ms.push(start.elapsed().as_millis().min(u128::from(u32::MAX)) as u32);
                        }
                        progress.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if cfg.timeline_ms.is_some() {
                            failed_ms.push(start.elapsed().as_millis().min(u128::from(u32::MAX)) as u32);
                        }
                        if matches!(e, ClientError::Unknown(_)) {
                            unknown.fetch_add(1, Ordering::Relaxed);
                        }
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (lat_us, end_ms, failed_ms)
        }));
    }
    let mut all: Vec<u32> = Vec::new();
    let mut ok_timed: Vec<(u32, u32)> = Vec::new();
    let mut failed_timed: Vec<u32> = Vec::new();
    for w in workers {
        if let Ok((lat, ends, failed)) = w.await {
            ok_timed.extend(ends.iter().copied().zip(lat.iter().copied()));
            failed_timed.extend(failed);
            all.extend(lat);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let client_cpu_us = match (client_cpu_before, flotilla_shard::store_metrics::cpu_microseconds()) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64),
        _ => None,
    };
    let after = scrape_all(metrics).await;
    let mut servers: Vec<ServerFigures> = before
        .iter()
        .filter_map(|(node, b)| after.get(node).map(|a| ServerFigures::between(*node, b, a, elapsed)))
        .collect();
    servers.sort_by_key(|f| f.node);
    for c in &clients {
        c.close().await;
    }
    all.sort_unstable();
    let pct = |p: f64| percentile_ms(&all, p);
    let timeline = match cfg.timeline_ms {
        Some(every) => timeline(&ok_timed, &failed_timed, every, (elapsed * 1000.0) as u32),
        None => Vec::new(),
    };
    let ops = all.len() as u64;
    let errors = progress.errors.load(Ordering::Relaxed);
    let errors_unknown = unknown.load(Ordering::Relaxed);
    Ok(BenchReport {
        workload: cfg.workload,
        clients: cfg.clients,
        value_size: cfg.value_size,
        keys: cfg.keys,
        ops,
        errors_unknown,
        errors_other: errors - errors_unknown,
        elapsed_s: elapsed,
        ops_per_s: ops as f64 / elapsed.max(1e-9),
        p50_ms: pct(50.0),
        p90_ms: pct(90.0),
        p99_ms: pct(99.0),
        p999_ms: pct(99.9),
        max_ms: all.last().map(|v| f64::from(*v) / 1000.0).unwrap_or(0.0),
        start_unix_s,
        timeline,
        servers_cpu_us_per_op: servers_cpu_us_per_op(&servers, metrics.len(), ops),
        client_cpu_us_per_op: client_cpu_us.filter(|_| ops > 0).map(|us| us / ops as f64),
        servers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_figures_are_the_difference_over_the_run() {
        let page = |requests: f64, syncs: f64, appends: f64| {
            HashMap::from([
                ("flotilla_requests_total".to_string(), requests),
                ("flotilla_store_syncs_total".to_string(), syncs),
                ("flotilla_store_write_batches_total".to_string(), syncs * 2.0),
                ("flotilla_host_log_appends_total".to_string(), appends),
                ("flotilla_store_write_microseconds_total".to_string(), syncs * 1_000.0),
                ("flotilla_host_messages_sent_total".to_string(), requests * 3.0),
            ])
        };
        let f = ServerFigures::between(2, &page(100.0, 10.0, 30.0), &page(2_100.0, 210.0, 830.0), 2.0);
        assert_eq!(f.node, 2);
        assert_eq!((f.requests_per_s, f.fsyncs_per_s, f.write_batches_per_s), (1_000.0, 100.0, 200.0));
        assert_eq!(f.appends_per_fsync, 4.0);
        // 200 fsyncs of 1 ms in 2 s: the writer was busy a tenth of the run.
        assert_eq!(f.writer_busy, 0.1);
        assert_eq!(f.raft_messages_per_s, 3_000.0);
        // A node that did no fsync (a restarted counter reads as none) divides by nothing.
        let idle = ServerFigures::between(3, &page(5.0, 9.0, 9.0), &page(5.0, 3.0, 9.0), 1.0);
        assert_eq!((idle.fsyncs_per_s, idle.appends_per_fsync), (0.0, 0.0));
    }

    #[test]
    fn server_cpu_counts_each_process_once_and_only_when_known() {
        let page =
            |cpu_us: f64, instance: f64| HashMap::from([(CPU.to_string(), cpu_us), (INSTANCE.to_string(), instance)]);
        // 2 s run: node 1 in process 10 used 0.5 s of CPU.
        let one = ServerFigures::between(1, &page(1e6, 10.0), &page(1.5e6, 10.0), 2.0);
        assert_eq!((one.cpu_us, one.cpu_cores, one.process), (Some(5e5), Some(0.25), 10));
        // Nodes 2 and 3 share process 20 (0.3 s): counted once.
        let two = ServerFigures::between(2, &page(0.0, 20.0), &page(3e5, 20.0), 2.0);
        let three = ServerFigures::between(3, &page(0.0, 20.0), &page(3e5, 20.0), 2.0);
        let all = [one.clone(), two.clone(), three.clone()];
        // (0.5 + 0.3) s over 1,000 operations.
        assert_eq!(servers_cpu_us_per_op(&all, 3, 1_000), Some(800.0));
        // Unknown, never a low figure: a node without figures, no operations, a restart (a new
        // process, whose counter started again), a page without the metrics.
        assert_eq!(servers_cpu_us_per_op(&all, 4, 1_000), None);
        assert_eq!(servers_cpu_us_per_op(&all, 3, 0), None);
        let restarted = ServerFigures::between(3, &page(9e5, 20.0), &page(1e5, 30.0), 2.0);
        assert_eq!((restarted.cpu_us, restarted.cpu_cores), (None, None));
        assert_eq!(servers_cpu_us_per_op(&[one.clone(), two.clone(), restarted], 3, 1_000), None);
        let old_build = ServerFigures::between(3, &HashMap::new(), &HashMap::new(), 2.0);
        assert_eq!(servers_cpu_us_per_op(&[one, two, old_build], 3, 1_000), None);
    }

    #[test]
    fn keys_are_distinct_and_spread() {
        let keys: std::collections::BTreeSet<Vec<u8>> = (0..10_000).map(key_of).collect();
        assert_eq!(keys.len(), 10_000);
        let low = keys.iter().filter(|k| k.as_slice() < b"80".as_slice()).count();
        assert!((4_000..6_000).contains(&low), "{low}");
    }

    #[test]
    fn timeline_puts_each_operation_in_its_interval() {
        // Successes at 0.1 s (1 ms), 0.9 s (3 ms), 1.5 s (10 ms); a failure at 2.2 s; 2.5 s run.
        let ok = [(100, 1_000), (900, 3_000), (1_500, 10_000)];
        let rows = timeline(&ok, &[2_200], 1_000, 2_500);
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].ops, rows[0].errors, rows[0].max_ms), (2, 0, 3.0));
        assert_eq!((rows[0].ops_per_s, rows[0].p50_ms), (2.0, 3.0));
        assert_eq!((rows[1].t_s, rows[1].ops, rows[1].p99_ms), (1.0, 1, 10.0));
        // The last interval is half long: its rate is per its own span; no successes, no latency.
        assert_eq!((rows[2].ops, rows[2].errors, rows[2].ops_per_s, rows[2].max_ms), (0, 1, 0.0, 0.0));
        // An end time past the run (rounding) lands in the last row, never out of bounds.
        assert_eq!(timeline(&[(2_600, 5)], &[], 1_000, 2_500)[2].ops, 1);
    }

    #[test]
    fn random_values_change_every_put_and_do_not_repeat_a_pattern() {
        let mut state = 7u64;
        let (mut a, mut b) = (vec![0u8; 1024], vec![0u8; 1023]);
        fill_random(&mut a, &mut state);
        fill_random(&mut b, &mut state);
        assert_ne!(&a[..1023], &b[..]);
        // Bytes spread over the whole range (the fixed pattern uses 26 letters).
        let distinct: std::collections::BTreeSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 200, "{}", distinct.len());
    }
}
