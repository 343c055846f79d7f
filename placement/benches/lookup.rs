//! Lookup by key in a map of 100,000 shards, and the route check every request makes (the
//! shard by id, its range and epoch).
//!
//! `cargo bench -p flotilla-placement --bench lookup`

use criterion::{criterion_group, criterion_main, Criterion};
use flotilla_placement::{MetaCommand, MetaState, NodeId};
use std::hint::black_box;

fn map_with(shards: u64) -> MetaState {
    let mut s = MetaState::default();
    for i in 1..=3 {
        s.apply(MetaCommand::RegisterNode { node: NodeId(i), addr: String::new() }).expect("register");
    }
    s.apply(MetaCommand::Bootstrap { nodes: vec![NodeId(1), NodeId(2), NodeId(3)] }).expect("bootstrap");
    // Split the last shard at increasing keys: shard i covers [key(i), key(i+1)).
    for i in 1..shards {
        let last = s.map.lookup(&[0xff; 8]).expect("a shard").clone();
        let key = (i * 1000).to_be_bytes().to_vec();
        s.apply(MetaCommand::Split { shard: last.id, epoch: last.epoch, key }).expect("split");
    }
    s
}

fn lookup(c: &mut Criterion) {
    let s = map_with(100_000);
    let mut i = 0u64;
    c.bench_function("lookup_by_key_100k_shards", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919) % 100_000_000;
            black_box(s.map.lookup(&i.to_be_bytes()).map(|d| d.id))
        })
    });
}

fn check_route(c: &mut Criterion) {
    let s = map_with(100_000);
    let routes: Vec<_> = s.map.shards().map(|d| (d.id, d.epoch, d.start.clone())).collect();
    let mut i = 0usize;
    c.bench_function("check_route_100k_shards", |b| {
        b.iter(|| {
            i = (i + 7919) % routes.len();
            let (id, epoch, key) = &routes[i];
            black_box(s.map.check_route(*id, *epoch, key).is_ok())
        })
    });
}

criterion_group!(benches, lookup, check_route);
criterion_main!(benches);
