//! The idle cost of many groups: memory per group replica and CPU of a host whose groups take
//! no writes, with quiescence on (the default) and off.
//!
//! Three hosts in this process over an in-memory network, each holding one replica of every
//! group (`IDLE_GROUPS`, default 10,000), default Raft timers (100 ms heartbeats). After every
//! group has a leader (and, with quiescence, every replica is quiet), the process's CPU time
//! is sampled over `IDLE_SECS` (default 10) and divided by three for one host; the growth of
//! the resident set while the groups were created, divided by the replicas, is the memory
//! per group replica (RocksDB's memtables and block cache are included: they are shared).
//! The Rust heap's growth per replica is counted exactly as well (RocksDB's C++ allocations
//! are not in it), so a change to a group's in-memory size shows without the allocator's and
//! the page cache's noise.
//!
//! `cargo bench --profile dev -p flotilla-shard --bench idle`

use flotilla_raft::{GroupId, Membership, NodeId, Role};
use flotilla_shard::{Host, HostConfig, HostNetwork, KeyRange, NodeBatch, Store};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes live on the Rust heap.
struct Counting;

static HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        HEAP_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_BYTES.fetch_add(new_size, Ordering::Relaxed);
            HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn heap_bytes() -> usize {
    HEAP_BYTES.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Net {
    hosts: RwLock<HashMap<NodeId, Host>>,
}

impl HostNetwork for Net {
    fn send(&self, to: NodeId, batch: NodeBatch) {
        let h = self.hosts.read().ok().and_then(|h| h.get(&to).cloned());
        if let Some(h) = h {
            h.receive(batch);
        }
    }
}

/// Resident set size of this process, from /proc (Linux).
fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

fn main() {
    let groups: u64 = std::env::var("IDLE_GROUPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let idle_secs: u64 = std::env::var("IDLE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!("{groups} groups x 3 replicas on 3 in-process hosts; CPU sampled over {idle_secs} s");
    println!(
        "{:>12} {:>14} {:>16} {:>16} {:>18} {:>12}",
        "quiescence", "setup s", "RSS/replica", "heap/replica", "CPU of one host", "quiet"
    );
    for quiesce in [true, false] {
        rt.block_on(async {
            let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
            let net = Arc::new(Net::default());
            let mut hosts = Vec::new();
            for (i, d) in dirs.iter().enumerate() {
                let id = NodeId(i as u64 + 1);
                let mut cfg = HostConfig::new(id);
                if !quiesce {
                    cfg.quiesce_after_ticks = 0;
                }
                let h = Host::open(Store::open(d.path()).expect("open"), cfg, net.clone()).await.expect("host");
                net.hosts.write().expect("lock").insert(id, h.clone());
                hosts.push(h);
            }
            let rss0 = rss_bytes();
            let heap0 = heap_bytes();
            let t0 = Instant::now();
            let members = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
            let mut tasks = Vec::new();
            for h in &hosts {
                for chunk in (1..=groups).collect::<Vec<_>>().chunks(500) {
                    let (h, m, chunk) = (h.clone(), members.clone(), chunk.to_vec());
                    tasks.push(tokio::spawn(async move {
                        for g in chunk {
                            let range = KeyRange {
                                start: format!("{g:08}/").into_bytes(),
                                end: Some(format!("{g:08}0").into_bytes()),
                            };
                            h.create_group(GroupId(g), range, Some(m.clone())).await.expect("create");
                        }
                    }));
                }
            }
            for t in tasks {
                t.await.expect("create task");
            }
            // Every group led, and with quiescence every replica quiet.
            loop {
                let mut leaders = 0;
                let mut quiet = 0;
                for h in &hosts {
                    for i in h.group_info().await.expect("info") {
                        leaders += (i.role == Role::Leader) as u64;
                        quiet += i.quiet as u64;
                    }
                }
                if leaders == groups && (!quiesce || quiet == 3 * groups) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let setup = t0.elapsed();
            // Let start-up work (compactions, flushes) settle before sampling.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss = rss_bytes().saturating_sub(rss0);
            let heap = heap_bytes().saturating_sub(heap0);
            let c0 = cpu_time();
            tokio::time::sleep(Duration::from_secs(idle_secs)).await;
            let cpu = cpu_time().saturating_sub(c0);
            let mut quiet = 0;
            for h in &hosts {
                quiet += h.group_info().await.expect("info").iter().filter(|i| i.quiet).count();
            }
            println!(
                "{:>12} {:>14.1} {:>13} KiB {:>12} B {:>16.2} % {:>12}",
                if quiesce { "on" } else { "off" },
                setup.as_secs_f64(),
                rss / (3 * groups) / 1024,
                heap as u64 / (3 * groups),
                cpu.as_secs_f64() / idle_secs as f64 / 3.0 * 100.0,
                quiet
            );
            for h in &hosts {
                h.shutdown().await;
            }
            net.hosts.write().expect("lock").clear();
        });
    }
}
