//! The load generator behind `flotilla bench`: N concurrent workers issuing puts, gets or a mix
//! through the ordinary [`Client`], for a duration or a number of operations, recording every
//! latency. Keys are `K` fixed keys, each the 16-hex-digit mix of its index (spread evenly over
//! the hex split points `flotilla dev` uses).

use crate::{Client, ClientConfig, ClientError};
use serde::Serialize;
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
pub async fn run(
    client_config: ClientConfig,
    cfg: BenchConfig,
    progress: Arc<Progress>,
) -> Result<BenchReport, ClientError> {
    let n_clients = cfg.clients.div_ceil(WORKERS_PER_CLIENT).max(1);
    let mut clients = Vec::new();
    for _ in 0..n_clients {
        clients.push(Arc::new(Client::connect(client_config.clone()).await?));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..cfg.clients.max(1) {
        let client = clients[w % n_clients].clone();
        let (stop, issued, unknown, progress, cfg) =
            (stop.clone(), issued.clone(), unknown.clone(), progress.clone(), cfg.clone());
        workers.push(tokio::spawn(async move {
            let mut lat_us: Vec<u32> = Vec::new();
            let value: Vec<u8> = (0..cfg.value_size).map(|i| b'a' + ((i + w) % 26) as u8).collect();
            let mut rng = (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
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
                let t = Instant::now();
                let r =
                    if read { client.get(&key).await.map(|_| ()) } else { client.put(&key, &value).await.map(|_| ()) };
                match r {
                    Ok(()) => {
                        lat_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        progress.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if matches!(e, ClientError::Unknown(_)) {
                            unknown.fetch_add(1, Ordering::Relaxed);
                        }
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat_us
        }));
    }
    let mut all: Vec<u32> = Vec::new();
    for w in workers {
        if let Ok(v) = w.await {
            all.extend(v);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for c in &clients {
        c.close().await;
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let idx = ((p / 100.0) * (all.len() as f64 - 1.0)).round() as usize;
        f64::from(all[idx.min(all.len() - 1)]) / 1000.0
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_spread() {
        let keys: std::collections::BTreeSet<Vec<u8>> = (0..10_000).map(key_of).collect();
        assert_eq!(keys.len(), 10_000);
        let low = keys.iter().filter(|k| k.as_slice() < b"80".as_slice()).count();
        assert!((4_000..6_000).contains(&low), "{low}");
    }
}
