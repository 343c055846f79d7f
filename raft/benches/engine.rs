//! Engine throughput: a 3-node cluster of sans-IO engines in one thread, storage in memory,
//! messages delivered instantly. Measures the protocol's own CPU cost per committed write,
//! with 1 writer (one proposal in flight) and 256 writers (256 proposals per step).
//! Also the Tokio driver over the in-memory router, with the same writer counts.
//!
//! `cargo bench -p flotilla-raft --features testing --bench engine`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flotilla_raft::testing::{MemLogStorage, MemRouter, MemStateMachine};
use flotilla_raft::{
    Action, Config, Engine, Entry, GroupId, InitialState, LogIndex, Membership, Message, Millis, NodeId, Raft, Role,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// One node: an engine and its log, executed synchronously.
struct Node {
    engine: Engine,
    log: VecDeque<Entry>,
    /// Index of `log[0]`: old entries are dropped to keep memory flat.
    first: u64,
}

impl Node {
    fn entry(&self, i: LogIndex) -> Entry {
        self.log[(i.0 - self.first) as usize].clone()
    }

    fn run(&mut self, out: &mut VecDeque<Message>) {
        let now = Millis(0);
        while let Some(a) = self.engine.poll_action() {
            match a {
                Action::AppendEntries { io, entries } => {
                    self.log.extend(entries);
                    self.engine.handle_io_done(now, io);
                }
                Action::TruncateFrom { io, index } => {
                    self.log.truncate((index.0 - self.first) as usize);
                    self.engine.handle_io_done(now, io);
                }
                Action::SaveVote { io, .. } | Action::PurgeUpTo { io, .. } => self.engine.handle_io_done(now, io),
                Action::Send(m) => out.push_back(m),
                Action::Apply { last, .. } => self.engine.handle_applied(now, last),
                Action::LoadEntries { peer, from, to, .. } => {
                    let entries = (from.0..=to.0).map(|i| self.entry(LogIndex(i))).collect();
                    self.engine.handle_entries_loaded(now, peer, entries);
                }
                _ => {}
            }
        }
    }
}

struct Cluster {
    nodes: Vec<Node>,
    queue: VecDeque<Message>,
}

impl Cluster {
    fn new() -> Cluster {
        let config = Arc::new(Config::default());
        let mut nodes: Vec<Node> = (1..=3u64)
            .map(|id| Node {
                engine: Engine::new(NodeId(id), config.clone(), InitialState::default(), id, Millis(0)),
                log: VecDeque::new(),
                first: 1,
            })
            .collect();
        for n in nodes.iter_mut() {
            n.engine.initialize(Millis(0), Membership::new([1, 2, 3].map(NodeId))).expect("fresh");
        }
        let mut c = Cluster { nodes, queue: VecDeque::new() };
        c.nodes[0].engine.handle_timeout(Millis(10_000));
        c.settle();
        assert_eq!(c.nodes[0].engine.role(), Role::Leader);
        c
    }

    fn settle(&mut self) {
        loop {
            for n in self.nodes.iter_mut() {
                n.run(&mut self.queue);
            }
            if self.queue.is_empty() {
                return;
            }
            while let Some(m) = self.queue.pop_front() {
                self.nodes[(m.to.0 - 1) as usize].engine.handle_message(Millis(0), m);
            }
        }
    }

    /// Proposes `writers` commands one per call, then runs until all are committed.
    fn round(&mut self, writers: usize, payload: &Bytes) {
        let target = self.nodes[0].engine.last_log_id().index.0 + writers as u64;
        for _ in 0..writers {
            self.nodes[0].engine.propose(Millis(0), vec![payload.clone()]).expect("leader");
        }
        self.settle();
        assert!(self.nodes[0].engine.committed().0 >= target);
        // Keep memory flat across iterations: every follower is caught up, so old entries
        // are never read again.
        for n in self.nodes.iter_mut() {
            if n.log.len() > 1 << 16 {
                let drop = n.log.len() - 1024;
                n.log.drain(..drop);
                n.first += drop as u64;
            }
        }
    }
}

fn engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_3_nodes");
    let payload = Bytes::from(vec![0u8; 64]);
    for writers in [1usize, 256] {
        g.throughput(Throughput::Elements(writers as u64));
        g.bench_with_input(BenchmarkId::new("writers", writers), &writers, |b, &w| {
            let mut cluster = Cluster::new();
            b.iter(|| cluster.round(w, &payload));
        });
    }
    g.finish();
}

fn driver(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let router = MemRouter::new();
    let rafts: Vec<Raft> = rt.block_on(async {
        let mut rafts = Vec::new();
        for id in 1..=3u64 {
            let config = Config::fast();
            let r = Raft::start(
                NodeId(id),
                GroupId(1),
                config,
                MemLogStorage::new(),
                MemStateMachine::new(),
                router.network(),
            )
            .await
            .expect("start");
            router.register(r.clone());
            rafts.push(r);
        }
        rafts[0].initialize(Membership::new([1, 2, 3].map(NodeId))).await.expect("init");
        rafts[0].wait_for(Duration::from_secs(10), |m| m.role == Role::Leader).await.expect("leader");
        rafts
    });
    let leader = rafts[0].clone();
    let mut g = c.benchmark_group("driver_3_nodes_in_memory");
    let payload = Bytes::from(vec![0u8; 64]);
    for writers in [1usize, 256] {
        g.throughput(Throughput::Elements(writers as u64));
        g.bench_with_input(BenchmarkId::new("writers", writers), &writers, |b, &w| {
            b.to_async(&rt).iter(|| {
                let leader = leader.clone();
                let payload = payload.clone();
                async move {
                    let mut tasks = Vec::with_capacity(w);
                    for _ in 0..w {
                        let l = leader.clone();
                        let p = payload.clone();
                        tasks.push(tokio::spawn(async move { l.client_write(p).await }));
                    }
                    for t in tasks {
                        t.await.expect("task").expect("write");
                    }
                }
            });
        });
    }
    g.finish();
    rt.block_on(async {
        for r in rafts {
            r.shutdown().await;
        }
    });
}

criterion_group!(benches, engine, driver);
criterion_main!(benches);
