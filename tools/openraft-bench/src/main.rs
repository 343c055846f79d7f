//! `openraft-bench`: openraft's minimal benchmark shape, measured the way
//! `raft/examples/bench.rs` measures flotilla-raft, so the two run side by side
//! (`tools/openraft-bench/run.sh`).
//!
//! The same on both sides: three nodes in one process, an in-memory log, a state machine that
//! holds nothing, an in-process network that hands a message to the peer directly, N client
//! tasks on the leader each writing one empty command at a time and waiting until it is
//! committed and applied, the nodes on a server runtime of `--server-workers` threads and the
//! clients on a runtime of `--client-workers` threads, the flags, the latency percentiles and
//! the `RESULT` line.
//!
//! openraft's own (as its minimal benchmark sets it): elections between 200 and 2000 ms,
//! purges of 1024 entries at a time, at most 1024 entries per append, its default snapshot
//! policy (a snapshot every 5000 entries, cheap here: the machine holds no data).

mod network;
mod store;

use network::Router;
use openraft::{BasicNode, Config, Raft};
use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{LogStore, Request, Response, StateMachine};

openraft::declare_raft_types!(
    /// The types of the benchmark's cluster.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// Bounds on the arguments: a typo must not ask for a billion tasks or a terabyte of latencies.
const CLIENTS_MAX: u64 = 100_000;
const OPS_MAX: u64 = 100_000_000;
const WORKERS_MAX: usize = 64;
/// How long the cluster may take to elect its first leader.
const ELECTION_WAIT: Duration = Duration::from_secs(10);
const NODES: u64 = 3;

struct Args {
    clients: u64,
    ops: u64,
    server_workers: usize,
    client_workers: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args { clients: 64, ops: 1_000_000, server_workers: 2, client_workers: 1 };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                return Err(String::new());
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = |max: u64| -> Result<u64, String> {
                let v: u64 = value.replace('_', "").parse().map_err(|e| format!("{flag} {value}: {e}"))?;
                if v == 0 || v > max {
                    return Err(format!("{flag} must be in 1..={max}"));
                }
                Ok(v)
            };
            match flag.as_str() {
                "--clients" => a.clients = num(CLIENTS_MAX)?,
                "--ops" => a.ops = num(OPS_MAX)?,
                "--server-workers" => a.server_workers = num(WORKERS_MAX as u64)? as usize,
                "--client-workers" => a.client_workers = num(WORKERS_MAX as u64)? as usize,
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        if a.ops < a.clients {
            return Err("--ops must be at least --clients".into());
        }
        Ok(a)
    }
}

const USAGE: &str =
    "usage: openraft-bench [--clients N (64)] [--ops N (1000000)] [--server-workers N (2)] [--client-workers N (1)]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_workers)
        .thread_name("bench-server")
        .enable_all()
        .build()?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_workers)
        .thread_name("bench-client")
        .enable_all()
        .build()?;
    let (rafts, leader) = server.block_on(start_cluster())?;
    let report = client.block_on(run_clients(&args, leader))?;
    report.print(&args);
    server.block_on(async {
        for raft in &rafts {
            let _ = raft.shutdown().await;
        }
    });
    Ok(())
}

/// Starts three nodes, forms the cluster and returns them with the leader's handle.
async fn start_cluster() -> Result<(Vec<Raft<TypeConfig>>, Raft<TypeConfig>), Box<dyn std::error::Error>> {
    let config = Arc::new(
        Config {
            election_timeout_min: 200,
            election_timeout_max: 2000,
            purge_batch_size: 1024,
            max_payload_entries: 1024,
            ..Default::default()
        }
        .validate()?,
    );
    let router = Router::default();
    let mut rafts = Vec::new();
    for id in 1..=NODES {
        let raft = Raft::new(id, config.clone(), router.clone(), LogStore::default(), StateMachine::default()).await?;
        router.register(id, raft.clone());
        rafts.push(raft);
    }
    let members: BTreeSet<u64> = (1..=NODES).collect();
    rafts[0].initialize(members).await?;
    let m = rafts[0].wait(Some(ELECTION_WAIT)).metrics(|m| m.current_leader.is_some(), "a leader").await?;
    let leader_id = m.current_leader.ok_or("no leader")?;
    let leader = rafts.iter().find(|r| r.metrics().borrow().id == leader_id).cloned().ok_or("leader not found")?;
    leader
        .wait(Some(ELECTION_WAIT))
        .metrics(|m| m.state.is_leader() && m.last_applied.map(|l| l.index) >= m.last_log_index, "leader applied")
        .await?;
    Ok((rafts, leader))
}

/// What one run measured.
struct Report {
    elapsed: Duration,
    /// Every write's latency in microseconds, sorted.
    latencies_us: Vec<u32>,
}

async fn run_clients(args: &Args, leader: Raft<TypeConfig>) -> Result<Report, Box<dyn std::error::Error>> {
    let per_client = args.ops / args.clients;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients as usize);
    for _ in 0..args.clients {
        let raft = leader.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client as usize);
            for _ in 0..per_client {
                let t = Instant::now();
                raft.client_write(Request).await.map_err(|e| e.to_string())?;
                lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut latencies_us = Vec::with_capacity((per_client * args.clients) as usize);
    for t in tasks {
        latencies_us.extend(t.await??);
    }
    let elapsed = start.elapsed();
    latencies_us.sort_unstable();
    Ok(Report { elapsed, latencies_us })
}

impl Report {
    fn percentile_us(&self, p: f64) -> u32 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1]
    }

    fn print(&self, args: &Args) {
        let ops = self.latencies_us.len() as u64;
        let secs = self.elapsed.as_secs_f64();
        let ops_per_s = ops as f64 / secs.max(1e-9);
        println!(
            "openraft: {} clients, {} empty writes in {:.2} s: {:.0} writes/s; latency p50 {} µs, p99 {} µs, \
             p99.9 {} µs, max {} µs",
            args.clients,
            ops,
            secs,
            ops_per_s,
            self.percentile_us(50.0),
            self.percentile_us(99.0),
            self.percentile_us(99.9),
            self.percentile_us(100.0)
        );
        println!(
            "RESULT system=openraft clients={} ops={} secs={:.3} ops_per_s={:.0} p50_us={} p99_us={} p999_us={} \
             server_workers={} client_workers={}",
            args.clients,
            ops,
            secs,
            ops_per_s,
            self.percentile_us(50.0),
            self.percentile_us(99.0),
            self.percentile_us(99.9),
            args.server_workers,
            args.client_workers
        );
    }
}
