//! Throughput and latency of the Raft library alone, in the shape of openraft's minimal
//! benchmark so the two can be run side by side (`tools/openraft-bench/`): three nodes in one
//! process on an in-memory network (`MemRouter`), in-memory log and state machine
//! (`MemLogStorage`, `MemStateMachine`), and N client tasks on the leader, each writing one
//! command at a time and waiting for it to be committed and applied.
//!
//! ```sh
//! cargo run --release -p flotilla-raft --features testing --example bench -- --clients 64 --ops 1000000
//! ```
//!
//! The nodes run on a server runtime of `--server-workers` threads, the clients on a runtime
//! of `--client-workers` threads (as openraft's bench splits them). Commands are empty by
//! default (`--payload-bytes` makes them bigger); the state machine answers an empty command
//! with a refusal, which costs it nothing. Nothing is durable (no disk): this measures the
//! library's CPU cost per write and its hand-offs, not fsync.
//!
//! The last line of the output is one line of `key=value` pairs (`RESULT ...`) that
//! `tools/openraft-bench/run.sh` reads.

use bytes::Bytes;
use flotilla_raft::testing::{MemLogStorage, MemRouter, MemStateMachine};
use flotilla_raft::{Config, GroupId, Membership, NodeId, Raft, Role};
use std::time::{Duration, Instant};

/// Bounds on the arguments: a typo must not ask for a billion tasks or a terabyte of latencies.
const CLIENTS_MAX: u64 = 100_000;
const OPS_MAX: u64 = 100_000_000;
const WORKERS_MAX: usize = 64;
const PAYLOAD_BYTES_MAX: usize = 1 << 20;
/// How long the cluster may take to elect its first leader.
const ELECTION_WAIT: Duration = Duration::from_secs(10);
const NODES: u64 = 3;

struct Args {
    clients: u64,
    ops: u64,
    server_workers: usize,
    client_workers: usize,
    payload_bytes: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args { clients: 64, ops: 1_000_000, server_workers: 2, client_workers: 1, payload_bytes: 0 };
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
                "--payload-bytes" => {
                    a.payload_bytes = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
                    if a.payload_bytes > PAYLOAD_BYTES_MAX {
                        return Err(format!("{flag} must be at most {PAYLOAD_BYTES_MAX}"));
                    }
                }
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        if a.ops < a.clients {
            return Err("--ops must be at least --clients".into());
        }
        Ok(a)
    }
}

const USAGE: &str = "usage: bench [--clients N (64)] [--ops N (1000000)] [--server-workers N (2)] \
                     [--client-workers N (1)] [--payload-bytes N (0)]";

fn main() -> anyhow::Result<()> {
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
            raft.shutdown().await;
        }
    });
    Ok(())
}

/// Starts three nodes, forms the cluster and returns them with the leader's handle.
async fn start_cluster() -> anyhow::Result<(Vec<Raft>, Raft)> {
    let router = MemRouter::new();
    let mut rafts = Vec::new();
    for id in 1..=NODES {
        let raft = Raft::start(
            NodeId(id),
            GroupId(1),
            Config::default(),
            MemLogStorage::new(),
            MemStateMachine::new(),
            router.network(),
        )
        .await?;
        router.register(raft.clone());
        rafts.push(raft);
    }
    rafts[0].initialize(Membership::new((1..=NODES).map(NodeId))).await?;
    let m = rafts[0].wait_for(ELECTION_WAIT, |m| m.leader.is_some()).await?;
    let leader_id = m.leader.ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let leader = rafts
        .iter()
        .find(|r| r.id() == leader_id)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("leader {leader_id} is not one of the nodes"))?;
    leader.wait_for(ELECTION_WAIT, |m| m.role == Role::Leader && m.applied >= m.committed).await?;
    Ok((rafts, leader))
}

/// What one run measured.
struct Report {
    elapsed: Duration,
    /// Every write's latency in microseconds, sorted.
    latencies_us: Vec<u32>,
}

async fn run_clients(args: &Args, leader: Raft) -> anyhow::Result<Report> {
    let per_client = args.ops / args.clients;
    let payload = Bytes::from(vec![0u8; args.payload_bytes]);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients as usize);
    for _ in 0..args.clients {
        let raft = leader.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client as usize);
            for _ in 0..per_client {
                let t = Instant::now();
                raft.client_write(payload.clone()).await?;
                lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Ok::<_, flotilla_raft::RaftError>(lat)
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
            "flotilla-raft: {} clients, {} writes of {} bytes in {:.2} s: {:.0} writes/s; latency p50 {} µs, \
             p99 {} µs, p99.9 {} µs, max {} µs",
            args.clients,
            ops,
            args.payload_bytes,
            secs,
            ops_per_s,
            self.percentile_us(50.0),
            self.percentile_us(99.0),
            self.percentile_us(99.9),
            self.percentile_us(100.0)
        );
        println!(
            "RESULT system=flotilla-raft clients={} ops={} secs={:.3} ops_per_s={:.0} p50_us={} p99_us={} \
             p999_us={} server_workers={} client_workers={}",
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
