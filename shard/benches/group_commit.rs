//! Durable writes per second and fsyncs per second on the shared RocksDB store, with 1, 16
//! and 256 groups appending at once (each group one append in flight, as a Raft leader's log
//! writer has). Shows how many groups one fsync serves.
//!
//! `cargo bench -p flotilla-shard --bench group_commit` (set `BENCH_SECS` to change the 3 s
//! per case; the store lives in a temporary directory on the current disk).

use bytes::Bytes;
use flotilla_raft::{Entry, EntryPayload, GroupId, LogId, LogStorage};
use flotilla_shard::{RocksLog, Store};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn main() {
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!("{:>7} {:>14} {:>12} {:>16} {:>12}", "groups", "writes/s", "fsyncs/s", "writes per fsync", "p50 / p99 ms");
    for groups in [1u64, 16, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let deadline = Instant::now() + Duration::from_secs(secs);
        let (writes, mut lat) = rt.block_on(async {
            let mut tasks = Vec::new();
            for g in 0..groups {
                let log = RocksLog::new(store.clone(), GroupId(g));
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut i = 1;
                    while Instant::now() < deadline {
                        let e = Entry {
                            log_id: LogId::new(1, i),
                            payload: EntryPayload::Normal(Bytes::from(vec![7u8; 128])),
                        };
                        let t = Instant::now();
                        log.append(vec![e]).await.expect("append");
                        lat.push(t.elapsed());
                        i += 1;
                    }
                    lat
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.expect("task"));
            }
            (all.len() as u64, all)
        });
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default()
        };
        let syncs = store.stats().syncs.load(Ordering::Relaxed);
        println!(
            "{:>7} {:>14.0} {:>12.0} {:>16.1} {:>6.2} / {:.2}",
            groups,
            writes as f64 / secs as f64,
            syncs as f64 / secs as f64,
            writes as f64 / syncs.max(1) as f64,
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3
        );
    }
}
