//! What one meta op costs the meta leader in memory, by the size of the map: the copy of the
//! stored state with the live reports laid over it, the op, the diff into records
//! ([`flotilla::meta::leader_op::work_out`]), and, for an op forwarded from another node, the
//! encoding of the state it is answered with.
//!
//! `cargo bench --bench meta_op` (env `SHARDS`, a comma-separated list, default
//! `1000,10000,100000`; `ROUNDS`, default 5). Three voters hold every shard and report it
//! (each leads a third, as a balanced cluster does); a fourth node is registered for the move.

use flotilla::meta::leader_op::work_out;
use flotilla::meta::records::StoredMeta;
use flotilla::meta::{encode_view, run_op};
use flotilla::peer_wire::MetaOp;
use flotilla::placement::{
    BalancerConfig, GroupConf, LogIndex, MetaCommand, MetaState, MovePlan, NodeId, NodeReport, ShardId,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `shards - 1` keys spread evenly over six hex digits (`dev_split_keys` stops at the
/// bootstrap's bound, and this bench goes past it).
fn split_keys(shards: u32) -> Vec<Vec<u8>> {
    let s = u64::from(shards.max(1));
    (1..s).map(|i| format!("{:06x}", (1u64 << 24) * i / s).into_bytes()).collect()
}

fn cluster(shards: u32) -> (StoredMeta, HashMap<NodeId, Arc<NodeReport>>) {
    let voters = vec![NodeId(1), NodeId(2), NodeId(3)];
    let mut state = MetaState::default();
    let op = MetaOp::Bootstrap {
        nodes: (1..=4).map(|i| (NodeId(i), format!("127.0.0.1:{}", 7000 + i))).collect(),
        replicas: voters.clone(),
        split_keys: split_keys(shards),
        backup_id: None,
    };
    run_op(&op, &mut state, &BalancerConfig::default()).expect("bootstrap");
    let stored = StoredMeta::default().changes(&state).expect("records").1;
    let ids: Vec<ShardId> = state.map.shards().map(|d| d.id).collect();
    let mut reports = HashMap::new();
    for (k, n) in voters.iter().enumerate() {
        let mut r = NodeReport { requests_per_s: 1_000, ..NodeReport::default() };
        for (i, id) in ids.iter().enumerate() {
            r.applied.insert(*id, LogIndex(1_000));
            r.shard_bytes.insert(*id, 1 << 20);
            if i % voters.len() == k {
                r.leading.push(*id);
                let conf =
                    GroupConf { index: LogIndex(10), voters: voters.iter().copied().collect(), ..GroupConf::default() };
                r.confs.insert(*id, conf);
            }
        }
        reports.insert(*n, Arc::new(r));
    }
    (stored, reports)
}

fn overlay(reports: &HashMap<NodeId, Arc<NodeReport>>) -> impl FnOnce(&mut MetaState) + '_ {
    move |s: &mut MetaState| {
        for (n, info) in s.nodes.iter_mut() {
            info.report = reports.get(n).cloned().unwrap_or_default();
        }
    }
}

/// Mean time of `f` over `rounds` runs.
fn time(rounds: u32, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..rounds {
        f();
    }
    start.elapsed() / rounds
}

fn main() {
    let shards: Vec<u32> = std::env::var("SHARDS")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds: u32 = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let balancer = BalancerConfig::default();
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "shards", "read", "report", "move", "split", "answer", "bytes"
    );
    for n in shards {
        let (stored, reports) = cluster(n);
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        let run = |op: &MetaOp| work_out(&stored, op, &balancer, 0, overlay(&reports)).expect("the op runs");
        let read = time(rounds, || drop(run(&MetaOp::Read)));
        // A report the leader cannot take in memory (a move is under way): the general path.
        let mut r = reports[&NodeId(1)].as_ref().clone();
        r.requests_per_s += 1;
        let report = MetaOp::report(NodeId(1), "127.0.0.1:7001".into(), r);
        let report = time(rounds, || drop(run(&report)));
        let d = stored.state.map.shards().nth(n as usize / 2).expect("a shard").clone();
        let plan = MovePlan::new(d.id, NodeId(3), NodeId(4), None, 1_000);
        let mv = MetaOp::Commands(vec![MetaCommand::StartMove { epoch: d.epoch, plan, now_ms: 1 }]);
        let mv = time(rounds, || drop(run(&mv)));
        let mut key = d.start.clone();
        key.push(b'8');
        let split = MetaOp::SplitAt { key };
        let split = time(rounds, || drop(run(&split)));
        // A forwarded op is answered with the state after it, encoded.
        let next = run(&MetaOp::Read).next;
        let mut bytes = 0;
        let answer = time(rounds, || bytes = encode_view(1, &next).expect("encodes").len());
        println!(
            "{n:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
            ms(read),
            ms(report),
            ms(mv),
            ms(split),
            ms(answer),
            bytes
        );
    }
}
