//! One balancer round with 100 nodes and 100,000 shards (replicas skewed onto 3 nodes, so the
//! round has moves to find), without and with shard sizes reported.
//!
//! `cargo bench -p flotilla-placement --bench balance`

use criterion::{criterion_group, criterion_main, Criterion};
use flotilla_placement::{balance, BalancerConfig, MetaCommand, MetaState, NodeId, NodeReport};
use std::hint::black_box;

fn state(nodes: u64, shards: u64) -> MetaState {
    let mut s = MetaState::default();
    for i in 1..=nodes {
        s.apply(MetaCommand::RegisterNode { node: NodeId(i), addr: String::new() }).expect("register");
    }
    s.apply(MetaCommand::Bootstrap { nodes: vec![NodeId(1), NodeId(2), NodeId(3)] }).expect("bootstrap");
    for i in 1..shards {
        let last = s.map.lookup(&[0xff; 8]).expect("a shard").clone();
        s.apply(MetaCommand::Split { shard: last.id, epoch: last.epoch, key: (i * 1000).to_be_bytes().to_vec() })
            .expect("split");
    }
    s
}

fn round(c: &mut Criterion) {
    let mut s = state(100, 100_000);
    let cfg = BalancerConfig::default();
    c.bench_function("balancer_round_100_nodes_100k_shards", |b| b.iter(|| black_box(balance(&s, &cfg, 0).len())));
    // The same with every shard's size reported (1..=64 MiB), so each count move also scans
    // the source's shards for the one that best evens out bytes.
    for node in [1, 2, 3] {
        let report = NodeReport {
            shard_bytes: s.map.shards().map(|d| (d.id, (1 + d.id.0 % 64) << 20)).collect(),
            ..Default::default()
        };
        s.apply(MetaCommand::Heartbeat { node: NodeId(node), report }).expect("heartbeat");
    }
    c.bench_function("balancer_round_100_nodes_100k_shards_sized", |b| {
        b.iter(|| black_box(balance(&s, &cfg, 0).len()))
    });
}

criterion_group!(benches, round);
criterion_main!(benches);
