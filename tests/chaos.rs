//! Placement changes during faults, with real server processes on loopback: while clients run
//! a checked history and a writer records every acknowledged key, each round injects one fault
//! (kill -9 and restart, SIGSTOP then SIGCONT, a clean restart) on a node chosen by the seed and,
//! during it, asks for a split, a merge of two neighbours, a replica move and a leader
//! transfer. At the end every server
//! runs again, every shard must have a leader, the history must linearize and every
//! acknowledged key must read back.
//!
//! `FLOTILLA_CHAOS_ROUNDS` sets the rounds (default 4, about a minute); `FLOTILLA_CHAOS_SEED`
//! the seed (default 1).

mod common;

use common::Servers;
use flotilla::placement::{NodeId, ShardId};
use flotilla::wire::{AdminRequest, AdminResponse, ReadConsistency, ShardRow};
use flotilla::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// xorshift: the seed picks the victims and the placement changes.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn shards(admin: &Client) -> Option<Vec<ShardRow>> {
    match admin.admin(AdminRequest::Shards).await {
        Ok(AdminResponse::Shards(rows)) => Some(rows),
        _ => None,
    }
}

/// One placement change of each kind, each allowed to fail (the fault may be in its way).
async fn change_placement(admin: &Client, rng: &mut Rng, round: u64, nodes: u64) {
    let key = format!("{:02x}-split-{round}", rng.next(256));
    let split = admin.admin(AdminRequest::Split { key: key.into_bytes() }).await;
    eprintln!("round {round}: split: {}", if split.is_ok() { "ok".to_string() } else { format!("{split:?}") });
    let Some(rows) = shards(admin).await else { return };
    if let Some(said) = common::ask_merge(admin, &rows, |n| rng.next(n as u64) as usize).await {
        eprintln!("round {round}: {said}");
    }
    let Some(row) = rows.get(rng.next(rows.len() as u64) as usize) else { return };
    let shard = row.descriptor.id;
    let holders: Vec<u64> = row.descriptor.replicas.iter().map(|r| r.node.0).collect();
    let spare: Vec<u64> = (1..=nodes).filter(|n| !holders.contains(n)).collect();
    if !holders.is_empty() && !spare.is_empty() {
        let from = holders[rng.next(holders.len() as u64) as usize];
        let to = spare[rng.next(spare.len() as u64) as usize];
        let r = admin.admin(AdminRequest::Move { shard, from: NodeId(from), to: NodeId(to) }).await;
        eprintln!("round {round}: move shard {shard} {from} -> {to}: {}", r.is_ok());
    }
    let Some(row) = rows.get(rng.next(rows.len() as u64) as usize) else { return };
    let voters: Vec<u64> = row.descriptor.voters().map(|n| n.0).collect();
    if let Some(&to) = voters.get(rng.next(voters.len().max(1) as u64) as usize) {
        let r = admin.admin(AdminRequest::TransferLeader { shard: row.descriptor.id, node: NodeId(to) }).await;
        eprintln!("round {round}: transfer shard {} to {to}: {}", row.descriptor.id, r.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_moves_and_transfers_during_crashes_pauses_and_restarts_lose_nothing() {
    let rounds = env_u64("FLOTILLA_CHAOS_ROUNDS", 4);
    let mut rng = Rng(env_u64("FLOTILLA_CHAOS_SEED", 1).max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let nodes = 4;
    let mut cluster = Servers::new(3, nodes, 2);
    // The fourth server joins by itself.
    cluster.start(4);
    let mut cfg = cluster.client.clone();
    cfg.op_timeout = Duration::from_secs(10);
    cfg.request_timeout = Duration::from_secs(2);
    let admin = cluster.client_with(cfg.clone()).await;
    let mut clients = Vec::new();
    for c in 0..4 {
        let mut cfg = cfg.clone();
        cfg.consistency = if c % 2 == 1 { ReadConsistency::Lease } else { ReadConsistency::Linearizable };
        clients.push(cluster.client_with(cfg).await);
    }
    let history = common::History::start(clients, &["10-a", "90-b", "f0-c"]);

    // A writer of unique keys: every acknowledged one must survive.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = common::acked_writer(cluster.client_with(cfg.clone()).await, stop.clone());

    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 0..rounds {
        let victim = 1 + rng.next(nodes);
        let server = &mut cluster.servers[(victim - 1) as usize];
        match round % 3 {
            0 => {
                eprintln!("round {round}: kill -9 node {victim}");
                server.kill();
            }
            1 => {
                eprintln!("round {round}: SIGSTOP node {victim}");
                server.pause();
            }
            _ => {
                eprintln!("round {round}: restart node {victim}");
                server.restart();
            }
        }
        change_placement(&admin, &mut rng, round, nodes).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let server = &mut cluster.servers[(victim - 1) as usize];
        server.resume();
        server.ensure_running();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    for s in cluster.servers.iter_mut() {
        s.resume();
        s.ensure_running();
    }

    // Every shard gets a leader again (moves and splits settle).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(rows) = shards(&admin).await {
            if rows.iter().all(|r| r.leader.is_some()) {
                eprintln!("{} shards, all led", rows.len());
                break;
            }
            assert!(Instant::now() < deadline, "shards without a leader: {:?}", {
                rows.iter().filter(|r| r.leader.is_none()).map(|r| r.descriptor.id).collect::<Vec<ShardId>>()
            });
        }
        assert!(Instant::now() < deadline, "the cluster does not answer");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    history.stop_and_check(100).await;
    let acked = writer.await.unwrap();
    assert!(acked.len() > 50, "too few writes acknowledged to say anything: {}", acked.len());
    let reader = cluster.client_with(cfg).await;
    for k in &acked {
        let v = reader.get(k.as_bytes()).await.unwrap_or_else(|e| panic!("reading {k}: {e}"));
        assert_eq!(v.as_deref(), Some(&b"w"[..]), "acknowledged write {k} lost");
    }
    eprintln!("{} acknowledged writes read back", acked.len());
    for s in cluster.servers.iter_mut() {
        assert!(s.terminate().success());
    }
}
