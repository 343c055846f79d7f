//! The harness of the host tests: in-process hosts over an in-memory network that goes through
//! the wire format and can cut a node off.
#![allow(dead_code)]

use flotilla_raft::{Config, GroupId, Membership, Message, MessageBody, NodeId, RaftError, ReadMode, Role};
use flotilla_shard::{Host, HostConfig, HostError, HostNetwork, KeyRange, KvCommand, KvResponse, NodeBatch, Store};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
/// Delivers batches between in-process hosts; a node can be cut off (both directions).
#[derive(Default)]
pub struct MemNet {
    pub hosts: RwLock<HashMap<NodeId, Host>>,
    pub cut: RwLock<BTreeSet<NodeId>>,
    pub delivered: AtomicU64,
    /// Snapshot chunks the hosts handed to `send_transfer`.
    pub transfers: AtomicU64,
    /// Snapshot chunks found inside batches (the hosts must send none that way).
    pub chunks_in_batches: AtomicU64,
    /// (node, group, index): messages of that group to that node never tell it that the
    /// entry at that index or later is committed (appends carry a lower commit index,
    /// heartbeats naming it name none).
    pub hide_commit: RwLock<Option<(NodeId, GroupId, flotilla_raft::LogIndex)>>,
    /// (node, group): messages of that group to that node are lost, as if its host had not
    /// loaded the group yet (the node itself answers).
    pub unloaded: RwLock<Option<(NodeId, GroupId)>>,
    /// Connections established with each node, as a transport counts them: a test bumps a
    /// node's count to play its restart on a new connection.
    pub connections: RwLock<HashMap<NodeId, u64>>,
}

impl HostNetwork for MemNet {
    fn send(&self, to: NodeId, batch: NodeBatch) {
        let chunks = batch.messages.iter().filter(|(_, m)| matches!(m.body, MessageBody::Snapshot { .. })).count();
        self.chunks_in_batches.fetch_add(chunks as u64, Ordering::Relaxed);
        self.deliver(to, batch);
    }

    fn send_transfer(&self, to: NodeId, group: GroupId, msg: Message) {
        assert!(matches!(msg.body, MessageBody::Snapshot { .. }), "only snapshot chunks take the transfer path");
        self.transfers.fetch_add(1, Ordering::Relaxed);
        self.deliver(
            to,
            NodeBatch { from: msg.from, messages: vec![(group, msg)], quiesce: Vec::new(), removed: Vec::new() },
        );
    }

    fn connections(&self, to: NodeId) -> u64 {
        self.connections.read().expect("lock").get(&to).copied().unwrap_or(1)
    }
}

impl MemNet {
    pub fn deliver(&self, to: NodeId, batch: NodeBatch) {
        let cut = self.cut.read().expect("lock");
        if cut.contains(&to) || cut.contains(&batch.from) {
            return;
        }
        drop(cut);
        // Through the wire format, as a transport would carry it.
        let bytes = batch.encode().expect("encode");
        let mut batch = NodeBatch::decode(&bytes).expect("decode");
        if let Some((node, group)) = *self.unloaded.read().expect("lock") {
            if node == to {
                batch.messages.retain(|(g, _)| *g != group);
            }
        }
        if let Some((node, group, at)) = *self.hide_commit.read().expect("lock") {
            if node == to {
                let below = flotilla_raft::LogIndex(at.0 - 1);
                batch.messages.retain_mut(|(g, m)| {
                    if *g != group {
                        return true;
                    }
                    match &mut m.body {
                        MessageBody::Append { commit, .. } => {
                            *commit = (*commit).min(below);
                            true
                        }
                        MessageBody::Heartbeat { commit, .. } => {
                            if commit.index >= at {
                                *commit = flotilla_raft::LogId::ZERO;
                            }
                            true
                        }
                        _ => true,
                    }
                });
            }
        }
        let host = self.hosts.read().expect("lock").get(&to).cloned();
        if let Some(h) = host {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            h.receive(batch);
        }
    }
}

pub fn config(node: u64) -> HostConfig {
    let mut c = HostConfig::new(NodeId(node));
    c.raft = Config::fast();
    c.tick_ms = 10;
    c.quiesce_after_ticks = 10;
    c.peer_down_ms = 300;
    c.api_timeout_ms = 10_000;
    c
}

pub struct Cluster {
    pub net: Arc<MemNet>,
    pub hosts: Vec<Host>,
    pub _dirs: Vec<tempfile::TempDir>,
    /// The node that last served each group's call, where `put` and `get` start, as a client
    /// remembers its leaders: without it every call would start at a fixed node and pay a
    /// redirect whenever another leads.
    pub leaders: RwLock<HashMap<GroupId, NodeId>>,
}

impl Cluster {
    pub async fn start(n: u64) -> Cluster {
        Self::start_with(n, |_| {}).await
    }

    /// `n` hosts whose configuration `tweak` adjusts.
    pub async fn start_with(n: u64, tweak: impl Fn(&mut HostConfig)) -> Cluster {
        let net = Arc::new(MemNet::default());
        let mut hosts = Vec::new();
        let mut dirs = Vec::new();
        for id in 1..=n {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            let mut cfg = config(id);
            tweak(&mut cfg);
            let host = Host::open(store, cfg, net.clone()).await.expect("host");
            net.hosts.write().expect("lock").insert(NodeId(id), host.clone());
            hosts.push(host);
            dirs.push(dir);
        }
        Cluster { net, hosts, _dirs: dirs, leaders: RwLock::default() }
    }

    /// A cluster of hosts a test opened itself (their directories are the test's).
    pub fn of(net: Arc<MemNet>, hosts: Vec<Host>) -> Cluster {
        Cluster { net, hosts, _dirs: Vec::new(), leaders: RwLock::default() }
    }

    pub fn host(&self, id: NodeId) -> &Host {
        &self.hosts[(id.0 - 1) as usize]
    }

    pub async fn create_groups(&self, groups: impl Iterator<Item = u64> + Clone) {
        let members = Membership::new(self.hosts.iter().map(|h| h.node()));
        for h in &self.hosts {
            for g in groups.clone() {
                h.create_group(GroupId(g), range_of(g), Some(members.clone())).await.expect("create");
            }
        }
    }

    /// Writes through whichever host leads the group, following redirects.
    pub async fn put(&self, group: GroupId, key: &str, value: &str) -> Result<KvResponse, HostError> {
        let cmd = KvCommand::Put { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec() };
        let first = self.hosts[(group.0 % self.hosts.len() as u64) as usize].node();
        self.call_leader(group, first, |host| {
            let cmd = cmd.clone();
            async move { host.write(group, cmd).await }
        })
        .await
    }

    /// A ReadIndex read through whichever host leads the group, following redirects.
    pub async fn get(&self, group: GroupId, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        let first = self.hosts[0].node();
        self.call_leader(group, first, |host| {
            let key = key.as_bytes().to_vec();
            async move { host.get(group, key, ReadMode::ReadIndex).await }
        })
        .await
    }

    /// Runs `call` on the node last known to lead `group` (`first` if none is known), following
    /// redirects for up to 30 s: at once to a leader named, after 20 ms when none is (an
    /// election is on) or after a few redirects in a row (the names are stale).
    async fn call_leader<T, F, Fut>(&self, group: GroupId, first: NodeId, call: F) -> Result<T, HostError>
    where
        F: Fn(Host) -> Fut,
        Fut: std::future::Future<Output = Result<T, HostError>>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut target = self.leaders.read().expect("lock").get(&group).copied().unwrap_or(first);
        let mut redirects = 0u32;
        loop {
            match call(self.host(target).clone()).await {
                Err(HostError::Raft(RaftError::NotLeader { leader })) if Instant::now() < deadline => {
                    redirects += 1;
                    target = match leader {
                        Some(l) if redirects <= 3 => l,
                        named => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            named.unwrap_or(NodeId(target.0 % self.hosts.len() as u64 + 1))
                        }
                    };
                }
                other => {
                    if other.is_ok() {
                        self.leaders.write().expect("lock").insert(group, target);
                    }
                    return other;
                }
            }
        }
    }

    /// Waits until `pred` holds for every host's group list.
    pub async fn wait_info(&self, what: &str, pred: impl Fn(&[flotilla_shard::GroupInfo]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut ok = true;
            for h in &self.hosts {
                if !pred(&h.group_info().await.expect("info")) {
                    ok = false;
                    break;
                }
            }
            if ok {
                return;
            }
            if Instant::now() >= deadline {
                for h in &self.hosts {
                    let infos = h.group_info().await.expect("info");
                    let quiet = infos.iter().filter(|i| i.quiet).count();
                    eprintln!("host {}: {} groups, {quiet} quiet, sample {:?}", h.node(), infos.len(), infos.first());
                }
                panic!("timed out waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn shutdown(&self) {
        for h in &self.hosts {
            h.shutdown().await;
        }
    }
}

/// Group `g` owns the keys starting with `{g:06}/`.
pub fn range_of(g: u64) -> KeyRange {
    KeyRange { start: format!("{g:06}/").into_bytes(), end: Some(format!("{g:06}0").into_bytes()) }
}

pub fn key(g: u64, k: &str) -> String {
    format!("{g:06}/{k}")
}

/// The log purged 5 entries behind the durable applied index, a follower more than 20 behind
/// not waited for, 512-byte chunks: a replica cut off for a while can only catch up by a
/// streamed snapshot.
pub fn small_snapshots(cfg: &mut HostConfig) {
    cfg.raft.log_keep_entries = 5;
    cfg.raft.log_lag_entries_max = 20;
    cfg.raft.log_purge_step_entries = 1;
    cfg.raft.snapshot_chunk_bytes = 512;
}

pub fn groups_env(default: u64) -> u64 {
    std::env::var("HOST_GROUPS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `cmd` on `group` through whichever of `nodes` leads it, following redirects.
pub async fn write_on(c: &Cluster, nodes: &[u64], group: GroupId, cmd: KvCommand) -> Result<KvResponse, HostError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let target = NodeId(nodes[i % nodes.len()]);
        match c.host(target).write(group, cmd.clone()).await {
            Err(HostError::Raft(RaftError::NotLeader { leader })) if Instant::now() < deadline => {
                i = leader.and_then(|l| nodes.iter().position(|n| *n == l.0)).unwrap_or(i + 1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// The node of `nodes` that leads `group`.
pub async fn leader_among(c: &Cluster, nodes: &[u64], group: GroupId) -> NodeId {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in nodes {
            let infos = c.host(NodeId(*n)).group_info().await.expect("info");
            if infos.iter().any(|i| i.group == group && i.role == Role::Leader) {
                return NodeId(*n);
            }
        }
        assert!(Instant::now() < deadline, "no leader for {group}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn rocksdb_mode(from: &[u8]) -> rocksdb::IteratorMode<'_> {
    rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward)
}
