//! `flotilla bench`: the load generator ([`flotilla::bench`]) with a progress line and a
//! latency summary.

use super::{client_config, Conn};
use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use flotilla::bench::{self, BenchConfig, Workload};
use flotilla::config::RUNTIME_THREADS_MAX;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most concurrent bench workers (`--clients`).
const BENCH_CLIENTS_MAX: usize = 4096;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    conn: Conn,
    /// Workload.
    #[arg(value_enum)]
    workload: WorkloadArg,
    /// Concurrent clients.
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
    /// Put fresh pseudo-random (incompressible) bytes instead of a fixed pattern.
    #[arg(long)]
    random_values: bool,
    /// Add a timeline to the report: throughput and latency per interval of this many seconds.
    #[arg(long)]
    timeline: Option<f64>,
    /// How gets are served: `linearizable` (ReadIndex: the leader confirms its leadership with
    /// a quorum per read round) or `lease` (the leader answers within its lease, without a
    /// round; linearizable under the bounded clock drift that ARCHITECTURE.md states).
    #[arg(long, value_enum, default_value_t = ReadsArg::Linearizable)]
    reads: ReadsArg,
    /// Worker threads of the load generator's runtime. One drives tens of thousands of
    /// operations a second and, on a machine shared with the servers, leaves them the rest of
    /// the cores; with more threads than it needs, each answer handed between them wakes a
    /// sleeping thread. Give more when the load generator's one core is the limit.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=RUNTIME_THREADS_MAX as i64))]
    threads: u16,
}

impl BenchArgs {
    /// The runtime's worker threads (`--threads`), read before the runtime starts.
    pub fn threads(&self) -> usize {
        usize::from(self.threads)
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ReadsArg {
    Linearizable,
    Lease,
}

/// The metrics address of each node the cluster file gives one.
fn metrics_addrs(conn: &Conn) -> Result<Vec<(u64, String)>> {
    let path = conn.cluster.clone().unwrap_or_else(flotilla::cluster::default_cluster_file);
    let file = flotilla::cluster::ClusterFile::load(&path).map_err(|e| anyhow!(e))?;
    Ok(file.nodes.iter().filter_map(|n| n.metrics.clone().map(|m| (n.id.0, m))).collect())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum WorkloadArg {
    Put,
    Get,
    Mixed,
}

pub async fn run(a: BenchArgs) -> Result<i32> {
    if a.clients == 0 || a.clients > BENCH_CLIENTS_MAX {
        bail!("--clients must be 1..={BENCH_CLIENTS_MAX}");
    }
    if a.keys == 0 {
        bail!("--keys must be at least 1");
    }
    if a.value_size > flotilla::wire::VALUE_BYTES_MAX {
        bail!("--value-size must be at most {} bytes", flotilla::wire::VALUE_BYTES_MAX);
    }
    if !(a.duration.is_finite() && a.duration > 0.0 && a.duration <= 86_400.0) {
        bail!("--duration must be a number of seconds in (0, 86400]");
    }
    if a.timeline.is_some_and(|t| !(t.is_finite() && (0.001..=86_400.0).contains(&t))) {
        bail!("--timeline must be a number of seconds in [0.001, 86400]");
    }
    let workload = match a.workload {
        WorkloadArg::Put => Workload::Put,
        WorkloadArg::Get => Workload::Get,
        WorkloadArg::Mixed => Workload::Mixed,
    };
    let cfg = BenchConfig {
        workload,
        clients: a.clients,
        value_size: a.value_size,
        keys: a.keys,
        duration: Duration::from_secs_f64(a.duration),
        ops: a.ops,
        random_values: a.random_values,
        timeline_ms: a.timeline.map(|t| (t * 1000.0).round() as u32),
    };
    let mut ccfg = client_config(&a.conn)?;
    ccfg.consistency = match a.reads {
        ReadsArg::Linearizable => flotilla::wire::ReadConsistency::Linearizable,
        ReadsArg::Lease => flotilla::wire::ReadConsistency::Lease,
    };
    let metrics = metrics_addrs(&a.conn)?;
    let progress = Arc::new(bench::Progress::default());
    let p = progress.clone();
    let json = a.conn.json;
    let ticker = tokio::spawn(async move {
        let start = Instant::now();
        let mut last = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let ops = p.ops.load(std::sync::atomic::Ordering::Relaxed);
            let errors = p.errors.load(std::sync::atomic::Ordering::Relaxed);
            if !json {
                eprint!(
                    "\r{:>5.0}s  {ops:>9} ops  {:>8} ops/s  {errors} errors   ",
                    start.elapsed().as_secs_f64(),
                    ops - last
                );
                let _ = std::io::stderr().flush();
            }
            last = ops;
        }
    });
    let report = bench::run(ccfg, cfg, &metrics, progress).await;
    ticker.abort();
    let report = report.map_err(|e| anyhow!("cannot reach the cluster: {e}"))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!();
        println!(
            "{:?}: {} clients, {}-byte values, {} keys, {:.1} s, {} load generator thread{}",
            report.workload,
            report.clients,
            report.value_size,
            report.keys,
            report.elapsed_s,
            a.threads,
            if a.threads == 1 { "" } else { "s" }
        );
        println!("  ops:      {} ({:.0} ops/s)", report.ops, report.ops_per_s);
        println!(
            "  latency:  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            report.p50_ms, report.p90_ms, report.p99_ms, report.p999_ms, report.max_ms
        );
        println!("  errors:   {} unknown outcome, {} other", report.errors_unknown, report.errors_other);
        for f in &report.servers {
            println!(
                "  node {}:   {:.0} requests/s, {:.0} write batches/s, {:.0} fsyncs/s, {:.1} shard appends per fsync, \
                 writer busy {:.0}%, {:.0} Raft messages sent/s, CPU {} cores",
                f.node,
                f.requests_per_s,
                f.write_batches_per_s,
                f.fsyncs_per_s,
                f.appends_per_fsync,
                f.writer_busy * 100.0,
                f.raft_messages_per_s,
                known(f.cpu_cores, 2)
            );
        }
        if !report.servers.is_empty() {
            println!(
                "  CPU per op: servers {} µs (every process once), this load generator {} µs",
                known(report.servers_cpu_us_per_op, 1),
                known(report.client_cpu_us_per_op, 1)
            );
        }
        for r in &report.timeline {
            println!(
                "  {:>8.1}s  {:>9.0} ops/s  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  {} errors",
                r.t_s, r.ops_per_s, r.p50_ms, r.p99_ms, r.max_ms, r.errors
            );
        }
    }
    Ok(0)
}

/// A figure with `decimals` decimals, or "unknown".
fn known(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "unknown".to_string(), |v| format!("{v:.decimals$}"))
}
