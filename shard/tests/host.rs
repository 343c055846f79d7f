//! The shard host: many groups on a few pollers, across three in-process hosts over an
//! in-memory network; quiescence and waking; restart; group lifecycle; bad requests.

use flotilla_raft::{Config, GroupId, Membership, Message, MessageBody, NodeId, RaftError, ReadMode, Role};
use flotilla_shard::{Host, HostConfig, HostError, HostNetwork, KeyRange, KvCommand, KvResponse, NodeBatch, Store};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Delivers batches between in-process hosts; a node can be cut off (both directions).
#[derive(Default)]
struct MemNet {
    hosts: RwLock<HashMap<NodeId, Host>>,
    cut: RwLock<BTreeSet<NodeId>>,
    delivered: AtomicU64,
    /// Snapshot chunks the hosts handed to `send_transfer`.
    transfers: AtomicU64,
    /// Snapshot chunks found inside batches (the hosts must send none that way).
    chunks_in_batches: AtomicU64,
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
        self.deliver(to, NodeBatch { from: msg.from, messages: vec![(group, msg)], quiesce: Vec::new() });
    }
}

impl MemNet {
    fn deliver(&self, to: NodeId, batch: NodeBatch) {
        let cut = self.cut.read().expect("lock");
        if cut.contains(&to) || cut.contains(&batch.from) {
            return;
        }
        drop(cut);
        // Through the wire format, as a transport would carry it.
        let bytes = batch.encode().expect("encode");
        let batch = NodeBatch::decode(&bytes).expect("decode");
        let host = self.hosts.read().expect("lock").get(&to).cloned();
        if let Some(h) = host {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            h.receive(batch);
        }
    }
}

fn config(node: u64) -> HostConfig {
    let mut c = HostConfig::new(NodeId(node));
    c.raft = Config::fast();
    c.tick_ms = 10;
    c.quiesce_after_ticks = 10;
    c.peer_down_ms = 300;
    c.api_timeout_ms = 10_000;
    c
}

struct Cluster {
    net: Arc<MemNet>,
    hosts: Vec<Host>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start(n: u64) -> Cluster {
        Self::start_with(n, |_| {}).await
    }

    /// `n` hosts whose configuration `tweak` adjusts.
    async fn start_with(n: u64, tweak: impl Fn(&mut HostConfig)) -> Cluster {
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
        Cluster { net, hosts, _dirs: dirs }
    }

    fn host(&self, id: NodeId) -> &Host {
        &self.hosts[(id.0 - 1) as usize]
    }

    async fn create_groups(&self, groups: impl Iterator<Item = u64> + Clone) {
        let members = Membership::new(self.hosts.iter().map(|h| h.node()));
        for h in &self.hosts {
            for g in groups.clone() {
                h.create_group(GroupId(g), range_of(g), Some(members.clone())).await.expect("create");
            }
        }
    }

    /// Writes through whichever host leads the group, following redirects.
    async fn put(&self, group: GroupId, key: &str, value: &str) -> Result<KvResponse, HostError> {
        let cmd = KvCommand::Put { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec() };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut target = self.hosts[(group.0 % self.hosts.len() as u64) as usize].node();
        loop {
            match self.host(target).write(group, cmd.clone()).await {
                Err(HostError::Raft(RaftError::NotLeader { leader })) if Instant::now() < deadline => {
                    target = leader.unwrap_or(NodeId(target.0 % self.hosts.len() as u64 + 1));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    async fn get(&self, group: GroupId, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut target = self.hosts[0].node();
        loop {
            match self.host(target).get(group, key.as_bytes().to_vec(), ReadMode::ReadIndex).await {
                Err(HostError::Raft(RaftError::NotLeader { leader })) if Instant::now() < deadline => {
                    target = leader.unwrap_or(NodeId(target.0 % self.hosts.len() as u64 + 1));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Waits until `pred` holds for every host's group list.
    async fn wait_info(&self, what: &str, pred: impl Fn(&[flotilla_shard::GroupInfo]) -> bool) {
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

    async fn shutdown(&self) {
        for h in &self.hosts {
            h.shutdown().await;
        }
    }
}

/// Group `g` owns the keys starting with `{g:06}/`.
fn range_of(g: u64) -> KeyRange {
    KeyRange { start: format!("{g:06}/").into_bytes(), end: Some(format!("{g:06}0").into_bytes()) }
}

fn key(g: u64, k: &str) -> String {
    format!("{g:06}/{k}")
}

/// The log purged 5 entries behind the durable applied index, a follower more than 20 behind
/// not waited for, 512-byte chunks: a replica cut off for a while can only catch up by a
/// streamed snapshot.
fn small_snapshots(cfg: &mut HostConfig) {
    cfg.raft.log_keep_entries = 5;
    cfg.raft.log_lag_entries_max = 20;
    cfg.raft.log_purge_step_entries = 1;
    cfg.raft.snapshot_chunk_bytes = 512;
}

fn groups_env(default: u64) -> u64 {
    std::env::var("HOST_GROUPS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_groups_on_three_hosts_make_progress_together_and_go_quiet() {
    let n = groups_env(1000);
    let c = Cluster::start(3).await;
    c.create_groups(1..=n).await;
    // Every group elects a leader and takes a write; all are readable linearizably.
    let mut tasks = Vec::new();
    let c = Arc::new(c);
    for g in 1..=n {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.put(GroupId(g), &key(g, "k"), &format!("v{g}")).await;
            (g, r)
        }));
    }
    for t in tasks {
        let (g, r) = t.await.expect("task");
        if r.is_err() {
            for h in &c.hosts {
                let i = h.group_info().await.expect("info").into_iter().find(|i| i.group == GroupId(g));
                eprintln!("host {}: {i:?} stats {:?}", h.node(), h.stats());
            }
        }
        assert_eq!(r.expect("write"), KvResponse::Done { previous: None }, "group {g}");
    }
    for g in [1, n / 2, n] {
        assert_eq!(c.get(GroupId(g), &key(g, "k")).await.expect("read"), Some(format!("v{g}").into_bytes()));
    }
    // Idle groups go quiet on every replica; then each group has exactly one (quiet) leader.
    c.wait_info("all groups quiet", |infos| infos.len() as u64 == n && infos.iter().all(|i| i.quiet)).await;
    let mut leaders = HashMap::new();
    for h in &c.hosts {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader {
                assert!(leaders.insert(i.group, h.node()).is_none(), "two leaders for {}", i.group);
            }
        }
    }
    assert_eq!(leaders.len() as u64, n, "every group has a leader");
    let sent: u64 = c.hosts.iter().map(|h| h.stats().messages_sent.load(Ordering::Relaxed)).sum();
    let batches: u64 = c.hosts.iter().map(|h| h.stats().batches_sent.load(Ordering::Relaxed)).sum();
    eprintln!("{n} groups: {sent} messages in {batches} batches");
    if n >= 100 {
        assert!(sent > 4 * batches, "messages were coalesced per destination ({sent} messages, {batches} batches)");
    }
    // While quiet, the hosts exchange only liveness pings, no Raft messages.
    let raft_msgs = |c: &Cluster| c.hosts.iter().map(|h| h.stats().messages_sent.load(Ordering::Relaxed)).sum::<u64>();
    let before = raft_msgs(&c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(raft_msgs(&c), before, "quiet groups send no Raft messages");
    // A write wakes a quiet group and succeeds.
    let r = c.put(GroupId(n), &key(n, "again"), "x").await.expect("write after quiet");
    assert_eq!(r, KvResponse::Done { previous: None });
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_groups_led_by_a_node_that_goes_down_elect_a_new_leader() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=30).await;
    for g in 1..=30 {
        c.put(GroupId(g), &key(g, "a"), "1").await.expect("write");
    }
    c.wait_info("all quiet", |infos| infos.iter().all(|i| i.quiet)).await;
    // Find a node that leads some groups and cut it off.
    let mut led: HashMap<NodeId, Vec<GroupId>> = HashMap::new();
    for h in &c.hosts {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader {
                led.entry(h.node()).or_default().push(i.group);
            }
        }
    }
    let (&victim, groups) = led.iter().max_by_key(|(_, g)| g.len()).expect("a leader");
    let groups = groups.clone();
    c.net.cut.write().expect("lock").insert(victim);
    // The others notice the node is down, wake those groups, and elect among themselves.
    let others: Vec<&Host> = c.hosts.iter().filter(|h| h.node() != victim).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for g in &groups {
        loop {
            let mut led_elsewhere = false;
            for h in &others {
                let infos = h.group_info().await.expect("info");
                if infos.iter().any(|i| i.group == *g && i.role == Role::Leader) {
                    led_elsewhere = true;
                }
            }
            if led_elsewhere {
                break;
            }
            assert!(Instant::now() < deadline, "group {g} found no new leader after its leader's node went down");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Groups led elsewhere stay quiet: a down follower does not wake a group.
    for h in &others {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader && !groups.contains(&i.group) {
                assert!(i.quiet, "group {} (leader {}) was woken by a down follower", i.group, h.node());
            }
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_resumes_every_group_with_its_data() {
    let net = Arc::new(MemNet::default());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let h = Host::open(Store::open(d.path()).expect("open"), config(id.0), net.clone()).await.expect("host");
        net.hosts.write().expect("lock").insert(id, h.clone());
        hosts.push(h);
    }
    let c = Cluster { net: net.clone(), hosts, _dirs: Vec::new() };
    c.create_groups(1..=20).await;
    for g in 1..=20 {
        c.put(GroupId(g), &key(g, "k"), &format!("{g}")).await.expect("write");
    }
    c.shutdown().await;
    // The stores close once every handle is gone.
    net.hosts.write().expect("lock").clear();
    drop(c);
    // Reopen every host on its store: the groups are listed and serve their data.
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let h = Host::open(Store::open(d.path()).expect("reopen"), config(id.0), net.clone()).await.expect("host");
        net.hosts.write().expect("lock").insert(id, h.clone());
        assert_eq!(h.groups(), (1..=20).map(GroupId).collect::<Vec<_>>());
        hosts.push(h);
    }
    let c = Cluster { net, hosts, _dirs: Vec::new() };
    for g in 1..=20 {
        assert_eq!(
            c.get(GroupId(g), &key(g, "k")).await.expect("read"),
            Some(format!("{g}").into_bytes()),
            "group {g}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_created_listed_and_destroyed_at_run_time_and_bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    net.hosts.write().expect("lock").insert(NodeId(1), host.clone());
    let range = KeyRange { start: b"m".to_vec(), end: Some(b"t".to_vec()) };
    host.create_group(GroupId(5), range.clone(), Some(Membership::new([NodeId(1)]))).await.expect("create");
    let right = KeyRange { start: b"t".to_vec(), end: None };
    host.create_group(GroupId(6), right, Some(Membership::new([NodeId(1)]))).await.expect("create");
    assert!(matches!(host.create_group(GroupId(5), range, None).await, Err(HostError::GroupExists(GroupId(5)))));
    // A node's groups own disjoint ranges.
    assert!(matches!(
        host.create_group(GroupId(7), KeyRange::all(), None).await,
        Err(HostError::RangeTaken { group: GroupId(7), other: GroupId(5) })
    ));
    assert_eq!(host.groups(), vec![GroupId(5), GroupId(6)]);
    // A single-node group elects itself and serves.
    let put = |k: &str| KvCommand::Put { key: k.as_bytes().to_vec(), value: b"v".to_vec() };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match host.write(GroupId(5), put("n")).await {
            Ok(r) => {
                assert_eq!(r, KvResponse::Done { previous: None });
                break;
            }
            Err(HostError::Raft(RaftError::NotLeader { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    // Outside the range: refused before it reaches the log.
    assert!(matches!(host.write(GroupId(5), put("a")).await, Err(HostError::KeyOutOfRange(GroupId(5)))));
    assert!(matches!(
        host.get(GroupId(5), b"z".to_vec(), ReadMode::ReadIndex).await,
        Err(HostError::KeyOutOfRange(GroupId(5)))
    ));
    // Over the size limits: refused with the limit named.
    let big = KvCommand::Put { key: vec![b'n'; flotilla_shard::KEY_BYTES_MAX + 1], value: Vec::new() };
    assert!(matches!(host.write(GroupId(5), big).await, Err(HostError::TooLarge(m)) if m.contains("key")));
    // Unknown group.
    assert!(matches!(host.write(GroupId(99), put("n")).await, Err(HostError::UnknownGroup(GroupId(99)))));
    // Destroy: gone from the list, calls refused, its state deleted; the store does not
    // resurrect it on restart.
    host.destroy_group(GroupId(5), true).await.expect("destroy");
    assert_eq!(host.groups(), vec![GroupId(6)]);
    assert!(matches!(host.write(GroupId(5), put("n")).await, Err(HostError::UnknownGroup(GroupId(5)))));
    assert!(matches!(host.destroy_group(GroupId(5), true).await, Err(HostError::UnknownGroup(GroupId(5)))));
    assert_eq!(host.store().groups().expect("groups"), vec![GroupId(6)]);
    // A message for a group not on this node is counted, not fatal.
    host.receive(NodeBatch {
        from: NodeId(2),
        messages: vec![(
            GroupId(5),
            flotilla_raft::Message {
                from: NodeId(2),
                to: NodeId(1),
                term: flotilla_raft::Term(1),
                body: flotilla_raft::MessageBody::HeartbeatResp { round: 0 },
            },
        )],
        quiesce: Vec::new(),
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.stats().unknown_group_msgs.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "unknown-group message not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Corrupt batches are an error, not a panic.
    assert!(NodeBatch::decode(b"\x01garbage").is_err());
    // Bad configuration is refused with a reason.
    let mut bad = config(1);
    bad.pollers = 0;
    assert!(matches!(bad.validate(), Err(HostError::Config(_))));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_failure_stops_the_groups_and_calls_get_a_fatal_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    host.create_group(GroupId(1), KeyRange::all(), Some(Membership::new([NodeId(1)]))).await.expect("create");
    let put = KvCommand::Put { key: b"k".to_vec(), value: b"v".to_vec() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.write(GroupId(1), put.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "single-node group never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.store().fail_next_write();
    let err = host.write(GroupId(1), put.clone()).await.expect_err("the disk failed");
    assert!(
        matches!(&err, HostError::Raft(RaftError::Fatal(flotilla_raft::Fatal::Storage(e))) if e.message.contains("injected")),
        "{err}"
    );
    // The group stays stopped; the store refuses writes.
    assert!(host.write(GroupId(1), put).await.is_err());
    assert!(host.group_info().await.expect("info")[0].stopped.as_deref().is_some_and(|m| m.contains("injected")));
    assert!(host.store().poisoned().is_some());
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_catches_up_by_snapshot_through_the_hosts() {
    // Small snapshot threshold and log tail, tiny chunks: the cut-off replica's entries are
    // purged on the others, so it can only catch up from a streamed SST snapshot.
    let c = Cluster::start_with(3, small_snapshots).await;
    c.create_groups(1..=1).await;
    c.put(GroupId(1), &key(1, "first"), "1").await.expect("write");
    // Node 3 must not lead (a cut-off leader leaves its clients waiting until it times out):
    // hand leadership to node 1 if it does, then cut node 3 off.
    let lagging = NodeId(3);
    let infos = c.host(lagging).group_info().await.expect("info");
    if infos[0].role == Role::Leader {
        c.host(lagging).transfer_leader(GroupId(1), NodeId(1)).await.expect("transfer");
    }
    c.net.cut.write().expect("lock").insert(lagging);
    // The leader keeps entries for a follower whose matched index moved within two election
    // timeouts; past that, the log is purged and node 3 needs a snapshot.
    tokio::time::sleep(Duration::from_millis(2 * 300 + 100)).await;
    for i in 0..150 {
        if let Err(e) = c.put(GroupId(1), &key(1, &format!("k{i:03}")), &format!("value {i}")).await {
            for h in &c.hosts {
                eprintln!("host {}: {:?}", h.node(), h.group_info().await.expect("info"));
            }
            panic!("write {i} while cut: {e}");
        }
    }
    c.net.cut.write().expect("lock").clear();
    // Node 3 catches up: same applied index as the others, and the data is in its store.
    c.wait_info("replica 3 caught up", |infos| infos[0].applied.0 >= 150).await;
    let sm = flotilla_shard::KvStateMachine::new(c.host(lagging).store().clone(), GroupId(1), range_of(1));
    for i in [0, 77, 149] {
        let got = sm.get(key(1, &format!("k{i:03}")).into_bytes()).await.expect("local read");
        assert_eq!(got, Some(format!("value {i}").into_bytes()), "key {i} on the caught-up replica");
    }
    let info = c.host(lagging).group_info().await.expect("info").remove(0);
    assert!(info.first_index.0 > 10, "the replica's log starts after the snapshot it installed: {info:?}");
    // Every chunk went to the network's transfer path, none in a batch.
    assert!(c.net.transfers.load(Ordering::Relaxed) > 1, "the snapshot's chunks took the transfer path");
    assert_eq!(c.net.chunks_in_batches.load(Ordering::Relaxed), 0, "snapshot chunks in batches");
    // The leader's snapshot is dropped once the transfer ended; the next durability report
    // (a write's) purges the log behind the durable applied index, without a snapshot.
    c.wait_info("the leader dropped its snapshot", |infos| infos[0].snapshot.is_none()).await;
    c.put(GroupId(1), &key(1, "after"), "x").await.expect("write after the catch-up");
    let leader = c.hosts.iter().find(|h| h.node() != lagging).expect("a host");
    let deadline = Instant::now() + Duration::from_secs(10);
    while leader.group_info().await.expect("info")[0].first_index.0 <= 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let linfo = leader.group_info().await.expect("info").remove(0);
    assert!(linfo.first_index.0 > 100, "the log was purged: {linfo:?}");
    assert!(linfo.durable_applied.0 + 1 >= linfo.first_index.0, "purged only behind durability: {linfo:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_splits_while_clients_write_and_both_halves_survive_a_restart() {
    let net = Arc::new(MemNet::default());
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let open = |net: Arc<MemNet>, i: usize, dir: std::path::PathBuf| async move {
        let id = NodeId(i as u64 + 1);
        let h = Host::open(Store::open(&dir).expect("open"), config(id.0), net.clone()).await.expect("host");
        net.hosts.write().expect("lock").insert(id, h.clone());
        h
    };
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        hosts.push(open(net.clone(), i, d.path().to_path_buf()).await);
    }
    let c = Arc::new(Cluster { net: net.clone(), hosts, _dirs: Vec::new() });
    let members = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
    for h in &c.hosts {
        h.create_group(GroupId(1), KeyRange::all(), Some(members.clone())).await.expect("create");
    }
    // Writers on both sides of the future split point, running across the split.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for prefix in ["a", "z"] {
        let (c, stop) = (c.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("{prefix}{i:05}");
                // Before the split group 1 owns everything; after it, "z..." belongs to 2.
                for g in [1, 2] {
                    match c.put(GroupId(g), &k, "v").await {
                        Ok(KvResponse::Done { .. }) => {
                            acked.push((k.clone(), g));
                            break;
                        }
                        // Not applied: the key moved, the group is not here yet, or a new
                        // leader replaced the entry (elections under load).
                        Err(HostError::KeyOutOfRange(_))
                        | Err(HostError::UnknownGroup(_))
                        | Err(HostError::Raft(RaftError::Dropped { .. })) => continue,
                        // Outcome unknown: not counted as acknowledged (nor as lost).
                        Err(HostError::Raft(RaftError::Timeout | RaftError::Indeterminate { .. })) => break,
                        Ok(other) => panic!("unexpected answer {other:?}"),
                        Err(e) => panic!("write {k}: {e}"),
                    }
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut target = NodeId(1);
    let resp = loop {
        match c.host(target).write(GroupId(1), split.clone()).await {
            Err(HostError::Raft(RaftError::NotLeader { leader })) if Instant::now() < deadline => {
                target = leader.unwrap_or(NodeId(target.0 % 3 + 1));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.expect("split"),
        }
    };
    let left = KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) };
    let right = KeyRange { start: b"m".to_vec(), end: None };
    assert_eq!(resp, KvResponse::Split { left: left.clone(), right: right.clone() });
    // Every host starts group 2 and it elects a leader.
    c.wait_info("group 2 on every host", |infos| infos.iter().any(|i| i.group == GroupId(2))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(acked.iter().any(|(k, g)| k.starts_with('z') && *g == 2), "writes reached the new group");
    // Group 1 now refuses the right half; a second split at the same key is refused.
    assert!(matches!(
        c.host(target).write(GroupId(1), KvCommand::Put { key: b"zz".to_vec(), value: Vec::new() }).await,
        Err(HostError::KeyOutOfRange(GroupId(1)))
    ));
    // Restart every host: both halves come back with their ranges and every acknowledged write.
    drop(c);
    let old: Vec<Host> = net.hosts.read().expect("lock").values().cloned().collect();
    for h in &old {
        h.shutdown().await;
    }
    drop(old);
    net.hosts.write().expect("lock").clear();
    let mut hosts = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let h = open(net.clone(), i, d.path().to_path_buf()).await;
        assert_eq!(h.groups(), vec![GroupId(1), GroupId(2)]);
        hosts.push(h);
    }
    let c = Cluster { net, hosts, _dirs: Vec::new() };
    for (k, _) in &acked {
        let g = if k.as_str() < "m" { 1 } else { 2 };
        assert_eq!(c.get(GroupId(g), k).await.expect("read"), Some(b"v".to_vec()), "{k} in group {g}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_a_split_gets_the_new_groups_data_by_snapshot() {
    let c = Cluster::start_with(3, small_snapshots).await;
    let members = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
    for h in &c.hosts {
        h.create_group(GroupId(1), KeyRange::all(), Some(members.clone())).await.expect("create");
    }
    c.put(GroupId(1), "a0", "1").await.expect("write");
    let lagging = NodeId(3);
    if c.host(lagging).group_info().await.expect("info")[0].role == Role::Leader {
        c.host(lagging).transfer_leader(GroupId(1), NodeId(1)).await.expect("transfer");
    }
    c.net.cut.write().expect("lock").insert(lagging);
    // The leader keeps entries for a follower whose matched index moved within two election
    // timeouts; past that, the log is purged and node 3 needs a snapshot.
    tokio::time::sleep(Duration::from_millis(2 * 300 + 100)).await;
    // Written while node 3 is away, then split off into group 2: node 3 never applies it.
    c.put(GroupId(1), "x1", "right half, before the split").await.expect("write");
    for i in 0..50 {
        c.put(GroupId(1), &format!("b{i:03}"), "v").await.expect("write");
    }
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let mut target = NodeId(1);
    loop {
        match c.host(target).write(GroupId(1), split.clone()).await {
            Err(HostError::Raft(RaftError::NotLeader { leader })) => {
                target = leader.unwrap_or(NodeId(2));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => {
                assert!(matches!(other, Ok(KvResponse::Split { .. })), "{other:?}");
                break;
            }
        }
    }
    // Group 1 moves on past the split (snapshot, purge), so node 3 will skip the split entry.
    for i in 0..60 {
        c.put(GroupId(1), &format!("c{i:03}"), "v").await.expect("write");
    }
    // Group 2 lives on nodes 1 and 2 only so far: write through them.
    let y1 = KvCommand::Put { key: b"y1".to_vec(), value: b"right half, after the split".to_vec() };
    let deadline = Instant::now() + Duration::from_secs(30);
    'written: loop {
        for n in [1, 2] {
            if c.host(NodeId(n)).write(GroupId(2), y1.clone()).await.is_ok() {
                break 'written;
            }
        }
        assert!(Instant::now() < deadline, "group 2 never took a write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.net.cut.write().expect("lock").clear();
    // Node 3 catches up group 1 by snapshot and adopts the narrower range...
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.host(lagging).group_range(GroupId(1)).and_then(|r| r.end) != Some(b"m".to_vec()) {
        assert!(Instant::now() < deadline, "node 3 never adopted the split range");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!c.host(lagging).groups().contains(&GroupId(2)), "no split entry applied on node 3");
    // ...and a replica of group 2 created there empty (as the node's reconciler does) gets the
    // new group's data by snapshot, including what was written before the split.
    let right = KeyRange { start: b"m".to_vec(), end: None };
    c.host(lagging).create_group(GroupId(2), right.clone(), None).await.expect("create empty replica");
    let sm = flotilla_shard::KvStateMachine::new(c.host(lagging).store().clone(), GroupId(2), right);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let x1 = sm.get(b"x1".to_vec()).await.expect("read");
        let y1 = sm.get(b"y1".to_vec()).await.expect("read");
        if x1.as_deref() == Some(&b"right half, before the split"[..]) && y1.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "node 3's replica of group 2 never got the data: x1={x1:?} y1={y1:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// Writes are answered once committed and computed, before their applied state is stored:
/// a read right after an answered write (ReadIndex or lease, on the leader) must still see it,
/// and a compare-and-swap right after must find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_or_cas_right_after_an_answered_write_sees_it() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=1).await;
    let g = GroupId(1);
    c.put(g, &key(1, "warm"), "up").await.expect("first write");
    async fn leader_of(c: &Cluster, g: GroupId) -> NodeId {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for h in &c.hosts {
                let infos = h.group_info().await.expect("info");
                if infos.iter().any(|i| i.group == g && i.role == Role::Leader) {
                    return h.node();
                }
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut leader = leader_of(&c, g).await;
    let mut checked = 0;
    for i in 0..200u32 {
        let h = c.host(leader);
        let k = key(1, &format!("k{}", i % 7));
        let v = format!("v{i}").into_bytes();
        // A leader change (a loaded machine) skips the round.
        let r = match h.write(g, KvCommand::Put { key: k.clone().into_bytes(), value: v.clone() }).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) => {
                leader = leader_of(&c, g).await;
                continue;
            }
            r => r.expect("write"),
        };
        assert_eq!(r, KvResponse::Done { previous: None });
        let mode = if i % 2 == 0 { ReadMode::ReadIndex } else { ReadMode::Lease };
        match h.get(g, k.clone().into_bytes(), mode).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) => {
                leader = leader_of(&c, g).await;
                continue;
            }
            r => assert_eq!(r.expect("read"), Some(v.clone()), "{mode:?} read {i}"),
        }
        let next = format!("w{i}").into_bytes();
        let cas = KvCommand::Cas { key: k.into_bytes(), expected: Some(v.clone()), new: Some(next) };
        match h.write(g, cas).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) => leader = leader_of(&c, g).await,
            r => assert_eq!(r.expect("cas"), KvResponse::Done { previous: Some(v) }, "cas {i}"),
        }
        checked += 1;
    }
    assert!(checked >= 150, "only {checked} rounds ran on a stable leader");
    c.shutdown().await;
}

/// Runs `cmd` on `group` through whichever of `nodes` leads it, following redirects.
async fn write_on(c: &Cluster, nodes: &[u64], group: GroupId, cmd: KvCommand) -> Result<KvResponse, HostError> {
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
async fn leader_among(c: &Cluster, nodes: &[u64], group: GroupId) -> NodeId {
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

/// Splits group 1 (on nodes 1-3, whose leader holds a snapshot taken before the split) at "m",
/// then adds a learner on node 4, created empty with `placeholder` as its range. The learner
/// must catch up by snapshot with the left half's range and data, and none of the right half.
async fn learner_added_after_a_split(placeholder: KeyRange, then_split_at: Option<&[u8]>) {
    let c = Cluster::start_with(4, small_snapshots).await;
    let voters = [1, 2, 3];
    let members = Membership::new(voters.map(NodeId));
    for n in voters {
        c.host(NodeId(n)).create_group(GroupId(1), KeyRange::all(), Some(members.clone())).await.expect("create");
    }
    // Past the snapshot threshold (40 entries): a snapshot of the whole range, the log purged.
    for i in 0..45 {
        let k = format!("{}{i:03}", if i % 2 == 0 { "a" } else { "z" });
        let put = KvCommand::Put { key: k.into_bytes(), value: b"v".to_vec() };
        write_on(&c, &voters, GroupId(1), put).await.expect("write");
    }
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let r = write_on(&c, &voters, GroupId(1), split).await.expect("split");
    assert!(matches!(r, KvResponse::Split { .. }), "{r:?}");
    let mut left = KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) };
    let node4 = c.host(NodeId(4));
    node4.create_group(GroupId(1), placeholder, None).await.expect("create empty replica");
    let leader = leader_among(&c, &voters, GroupId(1)).await;
    let index = c.host(leader).add_learner(GroupId(1), NodeId(4)).await.expect("add learner");
    if let Some(at) = then_split_at {
        // The snapshot is wider than the placeholder: refused, without stopping the group,
        // until the group applies the split the map made ahead of it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let info = node4.group_info().await.expect("info").into_iter().find(|i| i.group == GroupId(1));
        let info = info.expect("group 1 on node 4");
        assert!(info.stopped.is_none(), "the learner's group stopped: {:?}", info.stopped);
        assert_eq!(info.applied, flotilla_raft::LogIndex(0), "a snapshot wider than the replica's range was installed");
        let split = KvCommand::Split { at: at.to_vec(), new_group: 3 };
        let r = write_on(&c, &voters, GroupId(1), split).await.expect("split");
        assert!(matches!(r, KvResponse::Split { .. }), "{r:?}");
        left = KeyRange { start: Vec::new(), end: Some(at.to_vec()) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = node4.group_info().await.expect("info").into_iter().find(|i| i.group == GroupId(1));
        let info = info.expect("group 1 on node 4");
        assert!(info.stopped.is_none(), "the learner's group stopped: {:?}", info.stopped);
        if info.applied >= index && node4.group_range(GroupId(1)) == Some(left.clone()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the learner never caught up: {info:?}, {:?}",
            node4.group_range(GroupId(1))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sm = flotilla_shard::KvStateMachine::new(node4.store().clone(), GroupId(1), left);
    for i in [0, 20, 44] {
        assert_eq!(sm.get(format!("a{i:03}").into_bytes()).await.expect("read"), Some(b"v".to_vec()), "a{i:03}");
    }
    // The right half belongs to group 2, which has no replica on node 4.
    let store = node4.store();
    let data = store.db().get_cf(store.cf(flotilla_shard::CF_DATA).expect("cf"), b"z001").expect("read");
    assert_eq!(data, None, "node 4 holds data of the right half");
    assert!(!node4.groups().contains(&GroupId(2)));
    c.shutdown().await;
}

/// Issue 12 (2): the new replica, created with the split's narrowed range, refused the leader's
/// pre-split snapshot (wider range) and its group stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_after_a_split_catches_up_by_snapshot_with_the_narrowed_range() {
    learner_added_after_a_split(KeyRange { start: Vec::new(), end: Some(b"m".to_vec()) }, None).await;
}

/// Issue 12 (2): a replica created empty with a placeholder range narrower than the group's
/// (the map split the shard again before Raft carried it out) stopped on the wider snapshot.
/// It must wait, and catch up once the group applied that split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_created_with_a_narrower_placeholder_range_catches_up_once_the_group_splits_there() {
    learner_added_after_a_split(KeyRange { start: Vec::new(), end: Some(b"f".to_vec()) }, Some(b"f")).await;
}

/// Issue 12 (5): a node whose store was poisoned kept answering liveness pings, so the quiet
/// groups it led were never woken on the other nodes and stayed leaderless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_groups_led_by_a_node_whose_store_is_poisoned_elect_a_new_leader() {
    let c = Cluster::start(3).await;
    c.create_groups(1..=20).await;
    for g in 1..=20 {
        c.put(GroupId(g), &key(g, "a"), "1").await.expect("write");
    }
    c.wait_info("all quiet", |infos| infos.iter().all(|i| i.quiet)).await;
    let mut led: HashMap<NodeId, Vec<GroupId>> = HashMap::new();
    for h in &c.hosts {
        for i in h.group_info().await.expect("info") {
            if i.role == Role::Leader {
                led.entry(h.node()).or_default().push(i.group);
            }
        }
    }
    let (&victim, groups) = led.iter().max_by_key(|(_, g)| g.len()).expect("a leader");
    let groups = groups.clone();
    // One failed write poisons the victim's store.
    c.host(victim).store().fail_next_write();
    let put = KvCommand::Put { key: key(groups[0].0, "b").into_bytes(), value: b"2".to_vec() };
    assert!(c.host(victim).write(groups[0], put).await.is_err());
    assert!(c.host(victim).store().poisoned().is_some());
    // Every group it led gets a leader elsewhere within a few election timeouts.
    let others: Vec<&Host> = c.hosts.iter().filter(|h| h.node() != victim).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    for g in &groups {
        loop {
            let mut led_elsewhere = false;
            for h in &others {
                let infos = h.group_info().await.expect("info");
                led_elsewhere |= infos.iter().any(|i| i.group == *g && i.role == Role::Leader);
            }
            if led_elsewhere {
                break;
            }
            assert!(Instant::now() < deadline, "group {g} found no new leader after its leader's store failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The victim's groups are all stopped, and it no longer pings.
    for i in c.host(victim).group_info().await.expect("info") {
        assert!(i.stopped.is_some(), "group {} still runs on the poisoned node", i.group);
    }
    c.shutdown().await;
}

/// Issue 12 (6): two starts of one group (the reconciler's create and a split's start) both
/// checked the registry, then both built and added the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_starts_of_one_group_start_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    let me = Some(Membership::new([NodeId(1)]));
    let (a, b) = tokio::join!(
        host.create_group(GroupId(7), KeyRange::all(), me.clone()),
        host.create_group(GroupId(7), KeyRange::all(), me.clone())
    );
    let exists = |r: &Result<(), HostError>| matches!(r, Err(HostError::GroupExists(GroupId(7))));
    assert!(a.is_ok() != b.is_ok(), "exactly one start succeeds: {a:?} {b:?}");
    assert!(exists(&a) || exists(&b), "the other is refused as a duplicate: {a:?} {b:?}");
    let infos = host.group_info().await.expect("info");
    assert_eq!(infos.iter().filter(|i| i.group == GroupId(7)).count(), 1);
    // Destroyed, the id can be used again.
    host.destroy_group(GroupId(7), true).await.expect("destroy");
    host.create_group(GroupId(7), KeyRange::all(), me).await.expect("create again");
    host.shutdown().await;
}

/// Issue 12 (7): destroying a group did not wait for the snapshot installation in flight,
/// which then ingested the snapshot into the range the destroy had cleared (and wrote the
/// group's Raft keys back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_group_while_it_installs_a_snapshot_leaves_its_range_empty() {
    let c = Cluster::start_with(3, small_snapshots).await;
    c.create_groups(1..=1).await;
    c.put(GroupId(1), &key(1, "first"), "1").await.expect("write");
    let lagging = NodeId(3);
    if c.host(lagging).group_info().await.expect("info")[0].role == Role::Leader {
        c.host(lagging).transfer_leader(GroupId(1), NodeId(1)).await.expect("transfer");
    }
    c.net.cut.write().expect("lock").insert(lagging);
    // The leader keeps entries for a follower whose matched index moved within two election
    // timeouts; past that, the log is purged and node 3 needs a snapshot.
    tokio::time::sleep(Duration::from_millis(2 * 300 + 100)).await;
    for i in 0..150 {
        c.put(GroupId(1), &key(1, &format!("k{i:03}")), "v").await.expect("write while cut");
    }
    let h = c.host(lagging).clone();
    h.store().hold_installs(true);
    c.net.cut.write().expect("lock").clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.store().installs_held() == 0 {
        assert!(Instant::now() < deadline, "node 3 never started installing a snapshot");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let destroy = tokio::spawn({
        let h = h.clone();
        async move { h.destroy_group(GroupId(1), true).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.store().hold_installs(false);
    destroy.await.expect("task").expect("destroy");
    let store = h.store();
    let range = range_of(1);
    let end = range.end.clone().expect("bounded");
    let raft_prefix = 1u64.to_be_bytes();
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        let data = store.cf(flotilla_shard::CF_DATA).expect("cf");
        let left = store
            .db()
            .iterator_cf(data, rocksdb_mode(&range.start))
            .map(|kv| kv.expect("iterate").0)
            .take_while(|k| k.as_ref() < end.as_slice())
            .count();
        assert_eq!(left, 0, "keys of the destroyed group came back");
        let raft = store.cf(flotilla_shard::CF_RAFT).expect("cf");
        let raft_keys = store
            .db()
            .iterator_cf(raft, rocksdb_mode(&raft_prefix))
            .map(|kv| kv.expect("iterate").0)
            .take_while(|k| k.starts_with(&raft_prefix))
            .count();
        assert_eq!(raft_keys, 0, "Raft state of the destroyed group came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

fn rocksdb_mode(from: &[u8]) -> rocksdb::IteratorMode<'_> {
    rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward)
}

/// Issue 12 (8): the `from` of the Raft messages inside a batch was not checked against the
/// batch's (authenticated) sender, so any peer could speak for another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_claiming_another_sender_than_their_batch_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Arc::new(MemNet::default());
    let host = Host::open(Store::open(dir.path()).expect("open"), config(1), net.clone()).await.expect("host");
    let members = Membership::new([NodeId(1), NodeId(2), NodeId(3)]);
    host.create_group(GroupId(1), KeyRange::all(), Some(members)).await.expect("create");
    let heartbeat = |from: u64, term: u64| {
        (
            GroupId(1),
            flotilla_raft::Message {
                from: NodeId(from),
                to: NodeId(1),
                term: flotilla_raft::Term(term),
                body: flotilla_raft::MessageBody::Heartbeat { commit: flotilla_raft::LogIndex(0), round: 0 },
            },
        )
    };
    // Node 2 sends a heartbeat in node 3's name (term 50), then one of its own (term 40).
    host.receive(NodeBatch {
        from: NodeId(2),
        messages: vec![heartbeat(3, 50), heartbeat(2, 40)],
        quiesce: Vec::new(),
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let info = loop {
        let info = host.group_info().await.expect("info").remove(0);
        if info.term.0 >= 40 {
            break info;
        }
        assert!(Instant::now() < deadline, "the genuine heartbeat was not handled: {info:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!((info.term.0, info.leader), (40, Some(NodeId(2))), "the forged message was taken");
    assert_eq!(host.stats().sender_mismatch_msgs.load(Ordering::Relaxed), 1);
    host.shutdown().await;
}

/// The requests queued for one poller are bounded: past the bound a call is refused at once
/// as overloaded (never queued), and the bound frees as the poller takes requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_mailbox_bound_are_refused_as_overloaded() {
    let cluster = Cluster::start_with(1, |c| {
        c.pollers = 1;
        c.mailbox_requests_max = 2;
    })
    .await;
    cluster.create_groups(1..=1).await;
    cluster.put(GroupId(1), &key(1, "a"), "v").await.expect("put");
    let host = cluster.hosts[0].clone();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let host = host.clone();
        calls.spawn(async move { host.get(GroupId(1), key(1, "a").into_bytes(), ReadMode::ReadIndex).await });
    }
    let (mut served, mut refused) = (0, 0);
    while let Some(r) = calls.join_next().await {
        match r.expect("task") {
            Ok(v) => {
                assert_eq!(v, Some(b"v".to_vec()));
                served += 1;
            }
            Err(HostError::Overloaded(n)) => {
                assert!(n >= 2, "refused below the bound: {n}");
                refused += 1;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(served > 0 && refused > 0, "served {served}, refused {refused}");
    // Every request taken gave its place back.
    assert_eq!(cluster.get(GroupId(1), &key(1, "a")).await.expect("get"), Some(b"v".to_vec()));
    cluster.shutdown().await;
}

/// Between a split's prepare (the source's range narrows at once) and its durable write, the
/// new group's id is already taken here: nothing else (the node's reconciler, following a map
/// that has the new shard) may create it empty, which would leave a replica unable to vote and
/// keep the split's own state from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_group_cannot_be_created_by_anyone_else_while_its_split_is_being_written() {
    let cluster = Cluster::start_with(1, |c| c.pollers = 1).await;
    let host = cluster.hosts[0].clone();
    let whole = KeyRange { start: Vec::new(), end: None };
    host.create_group(GroupId(1), whole, Some(Membership::new([NodeId(1)]))).await.expect("create");
    cluster.put(GroupId(1), "a", "v").await.expect("put");
    // A write is answered before its apply is stored: a read waits for that store, so no
    // write of the put is held back (its group would wait for it, and the split with it).
    assert_eq!(cluster.get(GroupId(1), "a").await.expect("get"), Some(b"v".to_vec()));
    host.hold_applies(true);
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    let right = KeyRange { start: b"m".to_vec(), end: None };
    assert!(matches!(host.write(GroupId(1), split).await, Ok(KvResponse::Split { .. })));
    assert_eq!(host.group_range(GroupId(1)).and_then(|r| r.end), Some(b"m".to_vec()), "narrowed at prepare");
    assert!(!host.groups().contains(&GroupId(2)), "the split's write is held: group 2 has not started");
    let created = tokio::time::timeout(Duration::from_secs(5), host.create_group(GroupId(2), right, None)).await;
    assert!(
        matches!(created, Ok(Err(HostError::GroupExists(GroupId(2))))),
        "a second start of the split's group must be refused at once: {created:?}"
    );
    // Once written, the split's own state starts and serves.
    host.hold_applies(false);
    cluster.wait_info("group 2 started", |infos| infos.iter().any(|i| i.group == GroupId(2))).await;
    cluster.put(GroupId(2), "z", "w").await.expect("put in the split's group");
    assert_eq!(cluster.get(GroupId(2), "z").await.expect("get"), Some(b"w".to_vec()));
    cluster.shutdown().await;
}

/// A split's group is reserved while its split is being written, and with it every group the
/// map split off it since: those are started by the new group's own splits, with its
/// configuration. Created empty by anyone else meanwhile (the node's reconciler, which sees the
/// source narrowed and the new group not yet registered), a replica could never vote, and the
/// split's state could not start it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_split_off_a_split_group_being_started_is_left_to_that_split() {
    let cluster = Cluster::start_with(1, |c| c.pollers = 1).await;
    let host = cluster.hosts[0].clone();
    host.create_group(GroupId(1), KeyRange::all(), Some(Membership::new([NodeId(1)]))).await.expect("create");
    cluster.put(GroupId(1), "a", "v").await.expect("put");
    assert_eq!(cluster.get(GroupId(1), "a").await.expect("get"), Some(b"v".to_vec()));
    host.hold_applies(true);
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    assert!(matches!(host.write(GroupId(1), split).await, Ok(KvResponse::Split { .. })));
    assert!(!host.groups().contains(&GroupId(2)), "the split's write is held: group 2 has not started");
    // The map has split the new shard again, at "t": group 3 owns ["t", end) there.
    let third = KeyRange { start: b"t".to_vec(), end: None };
    let created = tokio::time::timeout(Duration::from_secs(5), host.create_group(GroupId(3), third, None)).await;
    let refused = matches!(&created, Ok(Err(e)) if e.to_string().contains("overlaps group 2"));
    assert!(refused, "group 3's keys belong to group 2 until it splits: {created:?}");
    host.hold_applies(false);
    cluster.wait_info("group 2 started", |infos| infos.iter().any(|i| i.group == GroupId(2))).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let split = KvCommand::Split { at: b"t".to_vec(), new_group: 3 };
        match host.write(GroupId(2), split).await {
            Ok(KvResponse::Split { .. }) => break,
            other => assert!(Instant::now() < deadline, "group 2 never split: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Started from the split's state: it elects itself and serves.
    cluster.wait_info("group 3 started", |infos| infos.iter().any(|i| i.group == GroupId(3))).await;
    cluster.put(GroupId(3), "z", "w").await.expect("put in the split's group");
    assert_eq!(cluster.get(GroupId(3), "z").await.expect("get"), Some(b"w".to_vec()));
    cluster.shutdown().await;
}
