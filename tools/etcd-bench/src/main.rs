//! `etcd-bench`: the load of `flotilla bench` (the repository's `src/bench.rs`), sent to an etcd
//! cluster instead, so the two can be measured side by side on one machine.
//!
//! What is the same as `flotilla bench`: the workloads (put, get, mixed with half gets), N
//! workers with one request outstanding each, the keys (`K` fixed keys, each the 16 hex digits
//! of SplitMix64's finalizer applied to its index), puts walking the keys in order and gets
//! choosing them with the same per-worker xorshift generator, the value bytes, no prefill (run
//! `put` first, as `flotilla bench` expects too), the stop rule (duration or operation count),
//! the percentile formula and the `--json` summary's field names.
//!
//! What is etcd's own:
//! - Gets are linearizable: etcd's default Range (`serializable = false`), which confirms the
//!   leader's commit index (ReadIndex) before answering; `flotilla bench` reads with ReadIndex.
//! - Connections: one etcd-client `Client` (one HTTP/2 connection) per `--workers-per-conn`
//!   workers (default 8), each to one endpoint, round robin over `--endpoints`. 64 workers thus
//!   use 8 connections, 2 or 3 per member; each request goes to that member, which forwards
//!   writes to the leader and asks the leader for the read index, as the cluster is meant to
//!   be used. gRPC multiplexes the workers of one connection as HTTP/2 streams; several
//!   connections keep one connection's flow control and one server goroutine from capping the
//!   load. (`flotilla bench` puts 16 workers on one client, which holds one QUIC connection per
//!   node.)
//! - No retries: etcd-client does not retry, and the members forward to the leader themselves.
//!   Each request has a deadline (`--timeout`, default 10 s like `flotilla bench`).
//! - Errors: a failed put is counted as `errors_unknown` (it may have been applied) unless etcd
//!   refused it outright (invalid argument, failed precondition, no space, permission); failed
//!   gets and refused puts count as `errors_other`.
//! - Plain TCP: the members and the client talk without TLS (etcd's default), while Flotilla
//!   always runs mutual TLS 1.3 over QUIC.

use clap::{Parser, ValueEnum};
use etcd_client::{Client, ConnectOptions, KvClient};
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The load of `flotilla bench`, against etcd.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Workload (run `put` first: it writes every key, and there is no prefill).
    #[arg(value_enum)]
    workload: Workload,
    /// etcd client endpoints, comma-separated (host:port or http://host:port).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// Concurrent clients (workers, one request outstanding each).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Value size (bytes).
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Run time (seconds).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many operations.
    #[arg(long)]
    ops: Option<u64>,
    /// Workers sharing one gRPC connection.
    #[arg(long, default_value_t = 8)]
    workers_per_conn: usize,
    /// Deadline of each request (seconds).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
enum Workload {
    /// Puts only.
    Put,
    /// Gets only.
    Get,
    /// Half gets, half puts.
    Mixed,
}

/// The summary: the same fields as `flotilla bench --json`.
#[derive(Debug, Serialize)]
struct Report {
    workload: Workload,
    clients: usize,
    value_size: usize,
    keys: u64,
    ops: u64,
    errors_unknown: u64,
    errors_other: u64,
    elapsed_s: f64,
    ops_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

/// The key of index `i`: as `flotilla::bench::key_of`, so both systems see the same keys.
fn key_of(i: u64) -> Vec<u8> {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31)).into_bytes()
}

/// Whether a failed put may still have been applied: everything but an outright refusal.
fn put_outcome_unknown(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => !matches!(
            s.code(),
            Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::ResourceExhausted
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::OutOfRange
                | Code::Unimplemented
        ),
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => false,
        _ => true,
    }
}

/// Counters shared by the workers (and the progress line).
#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    ops: AtomicU64,
    errors: AtomicU64,
    unknown: AtomicU64,
}

/// One worker: runs until the deadline or the operation budget; returns its latencies (µs).
async fn worker(w: usize, mut kv: KvClient, args: Arc<Args>, start: Instant, c: Arc<Counters>) -> Vec<u32> {
    let duration = Duration::from_secs_f64(args.duration);
    let keys = args.keys.max(1);
    let value: Vec<u8> = (0..args.value_size).map(|i| b'a' + ((i + w) % 26) as u8).collect();
    let mut rng = (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut lat_us = Vec::new();
    while start.elapsed() < duration {
        let n = c.issued.fetch_add(1, Ordering::Relaxed);
        if args.ops.is_some_and(|max| n >= max) {
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = key_of(if args.workload == Workload::Put { n % keys } else { rng % keys });
        let read = match args.workload {
            Workload::Put => false,
            Workload::Get => true,
            Workload::Mixed => rng >> 63 == 0,
        };
        let t = Instant::now();
        // `get` with no options is a linearizable Range (serializable = false).
        let r = if read { kv.get(key, None).await.map(drop) } else { kv.put(key, value.clone(), None).await.map(drop) };
        match r {
            Ok(()) => {
                lat_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                c.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if !read && put_outcome_unknown(&e) {
                    c.unknown.fetch_add(1, Ordering::Relaxed);
                }
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    lat_us
}

async fn run(args: Arc<Args>, stop_progress: Arc<AtomicBool>, c: Arc<Counters>) -> Result<Report, String> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let options = ConnectOptions::new().with_timeout(timeout).with_connect_timeout(timeout);
    let n_conns = args.clients.div_ceil(args.workers_per_conn).max(1);
    let mut conns = Vec::with_capacity(n_conns);
    for i in 0..n_conns {
        let endpoint = &args.endpoints[i % args.endpoints.len()];
        let client = Client::connect([endpoint.as_str()], Some(options.clone()))
            .await
            .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
        let mut kv = client.kv_client();
        // One request before the clock starts: opens the connection and checks the member.
        kv.get("etcd-bench-ping", None).await.map_err(|e| format!("{endpoint} does not answer: {e}"))?;
        conns.push(kv);
    }
    let start = Instant::now();
    let workers: Vec<_> = (0..args.clients.max(1))
        .map(|w| tokio::spawn(worker(w, conns[w % n_conns].clone(), args.clone(), start, c.clone())))
        .collect();
    let mut all: Vec<u32> = Vec::new();
    for w in workers {
        if let Ok(v) = w.await {
            all.extend(v);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop_progress.store(true, Ordering::Relaxed);
    all.sort_unstable();
    // Nearest rank, rounded: the same formula as `flotilla bench`.
    let pct = |p: f64| match all.len() {
        0 => 0.0,
        len => f64::from(all[(((p / 100.0) * (len as f64 - 1.0)).round() as usize).min(len - 1)]) / 1000.0,
    };
    let ops = all.len() as u64;
    let errors = c.errors.load(Ordering::Relaxed);
    let errors_unknown = c.unknown.load(Ordering::Relaxed);
    Ok(Report {
        workload: args.workload,
        clients: args.clients,
        value_size: args.value_size,
        keys: args.keys,
        ops,
        errors_unknown,
        errors_other: errors - errors_unknown,
        elapsed_s: elapsed,
        ops_per_s: ops as f64 / elapsed.max(1e-9),
        p50_ms: pct(50.0),
        p90_ms: pct(90.0),
        p99_ms: pct(99.0),
        p999_ms: pct(99.9),
        max_ms: all.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
    })
}

fn check(args: &Args) -> Result<(), String> {
    if args.clients == 0 || args.clients > 4096 {
        return Err("--clients must be 1..=4096".into());
    }
    if args.keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    if args.workers_per_conn == 0 {
        return Err("--workers-per-conn must be at least 1".into());
    }
    if args.endpoints.iter().all(|e| e.is_empty()) {
        return Err("--endpoints must name at least one endpoint".into());
    }
    for (name, secs) in [("--duration", args.duration), ("--timeout", args.timeout)] {
        if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
            return Err(format!("{name} must be a number of seconds in (0, 86400]"));
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    args.endpoints.retain(|e| !e.is_empty());
    if let Err(e) = check(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let args = Arc::new(args);
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    if !args.json {
        let (c, stop) = (counters.clone(), stop.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let ops = c.ops.load(Ordering::Relaxed);
                let errors = c.errors.load(Ordering::Relaxed);
                eprint!(
                    "\r{:>5.0}s  {ops:>9} ops  {:>8} ops/s  {errors} errors   ",
                    start.elapsed().as_secs_f64(),
                    ops - last
                );
                let _ = std::io::stderr().flush();
                last = ops;
            }
        });
    }
    let r = match run(args.clone(), stop, counters).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&r).expect("a report serializes"));
    } else {
        eprintln!();
        println!(
            "{:?} (etcd): {} clients, {}-byte values, {} keys, {:.1} s",
            r.workload, r.clients, r.value_size, r.keys, r.elapsed_s
        );
        println!("  ops:      {} ({:.0} ops/s)", r.ops, r.ops_per_s);
        println!(
            "  latency:  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
        );
        println!("  errors:   {} unknown outcome, {} other", r.errors_unknown, r.errors_other);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_flotilla_bench() {
        // Key 0 is SplitMix64's first output from seed 0, as in `flotilla::bench::key_of`.
        assert_eq!(key_of(0), b"e220a8397b1dcdaf");
        let keys: std::collections::BTreeSet<Vec<u8>> = (0..10_000).map(key_of).collect();
        assert_eq!(keys.len(), 10_000);
    }
}
