//! Real network partitions: three `flotilla server` processes, each in its own network
//! namespace on a bridge, and the test's clients in the root namespace. iptables rules inside
//! one namespace cut that node off from the other two, both ways or one way (clients still
//! reach it), or from the meta leader only, then heal; during each cut a shard is split and a
//! leadership moved.
//! Clients run a checked history (`common::History`: linearizable and lease reads, puts,
//! deletes, compare-and-swaps) throughout; it must linearize. Cutting off the shard's leader
//! is the case a lease read gets wrong if the lease outlives the leader's right to lead.
//!
//! Needs root, `ip` (iproute2) and `iptables`; ignored by default. `.ci/run` runs it when the
//! machine can create namespaces: `cargo test -p flotilla --test partition -- --ignored`.

mod common;

use common::Servers;
use flotilla::wire::{AdminRequest, AdminResponse, ReadConsistency};
use flotilla::Client;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs a shell command, which must succeed.
fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Namespaces `<tag>n1..n3` with addresses 10.<net>.0.1..3 on a bridge whose root-side
/// address is 10.<net>.0.254. Removed on drop.
struct Net {
    tag: String,
    net: u8,
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let net = (pid % 200 + 20) as u8;
        let tag = format!("fl{}", pid % 100_000);
        let n = Net { tag, net };
        let (t, x) = (&n.tag, n.net);
        sh(&format!("ip link add {t}br type bridge && ip addr add 10.{x}.0.254/24 dev {t}br && ip link set {t}br up"));
        for i in 1..=3 {
            sh(&format!(
                "ip netns add {t}n{i} && ip link add {t}v{i} type veth peer name eth0 netns {t}n{i} && \
                 ip link set {t}v{i} master {t}br && ip link set {t}v{i} up && \
                 ip -n {t}n{i} addr add 10.{x}.0.{i}/24 dev eth0 && ip -n {t}n{i} link set eth0 up && \
                 ip -n {t}n{i} link set lo up"
            ));
        }
        n
    }

    fn ns(&self, i: u64) -> String {
        format!("{}n{i}", self.tag)
    }

    fn ip(&self, i: u64) -> String {
        format!("10.{}.0.{i}", self.net)
    }

    /// Drops traffic between node `i` and the other nodes (not the clients'): what arrives at
    /// `i` from them if `inbound`, what `i` sends them if `outbound`.
    fn isolate(&self, i: u64, inbound: bool, outbound: bool) {
        for j in (1..=3).filter(|j| *j != i) {
            let (ns, peer) = (self.ns(i), self.ip(j));
            if inbound {
                sh(&format!("ip netns exec {ns} iptables -A INPUT -s {peer} -j DROP"));
            }
            if outbound {
                sh(&format!("ip netns exec {ns} iptables -A OUTPUT -d {peer} -j DROP"));
            }
        }
    }

    /// Drops traffic between node `i` and node `j` only, both ways.
    fn cut_pair(&self, i: u64, j: u64) {
        let (ns, peer) = (self.ns(i), self.ip(j));
        sh(&format!("ip netns exec {ns} iptables -A INPUT -s {peer} -j DROP"));
        sh(&format!("ip netns exec {ns} iptables -A OUTPUT -d {peer} -j DROP"));
    }

    fn heal(&self, i: u64) {
        sh(&format!("ip netns exec {} iptables -F", self.ns(i)));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let t = &self.tag;
        for i in 1..=3 {
            let cmd = format!("ip netns del {t}n{i}; ip link del {t}v{i} 2>/dev/null");
            let _ = Command::new("sh").args(["-c", &cmd]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{t}br")]).status();
    }
}

async fn leader_of_first_shard(client: &Client) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(AdminResponse::Shards(rows)) = client.admin(AdminRequest::Shards).await {
            if let Some(l) = rows.first().and_then(|r| r.leader) {
                return l.0;
            }
        }
        assert!(Instant::now() < deadline, "no leader reported");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn meta_leader(client: &Client) -> Option<u64> {
    match client.admin(AdminRequest::Status).await {
        Ok(AdminResponse::Status(s)) => s.meta_leader.map(|n| n.0),
        _ => None,
    }
}

/// Placement changes while a node is cut off: a split of the first shard at a new key, a merge
/// of two neighbours and a leader transfer of the last shard, each allowed to fail (the cut
/// may be in the way).
async fn change_placement(admin: &Client, round: u32) {
    let key = format!("{:02x}-split-{round}", (round * 29 + 3) % 256).into_bytes();
    let split = admin.admin(AdminRequest::Split { key }).await;
    eprintln!("round {round}: split: {}", split.is_ok());
    if let Ok(AdminResponse::Shards(rows)) = admin.admin(AdminRequest::Shards).await {
        if let Some(said) = common::ask_merge(admin, &rows, |n| round as usize % n).await {
            eprintln!("round {round}: {said}");
        }
        if let Some(row) = rows.last() {
            let voters: Vec<_> = row.descriptor.voters().collect();
            if let Some(to) = voters.get(round as usize % voters.len().max(1)) {
                let r = admin.admin(AdminRequest::TransferLeader { shard: row.descriptor.id, node: *to }).await;
                eprintln!("round {round}: transfer shard {} to {to}: {}", row.descriptor.id, r.is_ok());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iproute2 and iptables: run with --ignored (.ci/run does)"]
async fn partitions_of_real_processes_keep_the_history_linearizable() {
    let net = Net::new();
    let layout = common::Layout {
        hosts: (1..=3).map(|i| net.ip(i)).collect(),
        ports: vec![7000; 3],
        netns: Some((1..=3).map(|i| net.ns(i)).collect()),
    };
    let mut cluster = Servers::with_layout(3, 3, 2, layout);
    let mut cfg = cluster.client.clone();
    cfg.op_timeout = Duration::from_secs(10);
    cfg.request_timeout = Duration::from_secs(2);
    let admin = cluster.client_with(cfg.clone()).await;
    let mut clients = Vec::new();
    for c in 0..6 {
        let mut cfg = cfg.clone();
        cfg.consistency = if c % 3 == 2 { ReadConsistency::Lease } else { ReadConsistency::Linearizable };
        clients.push(cluster.client_with(cfg).await);
    }
    let history = common::History::start(clients, &["10-a", "10-b", "f0-a", "f0-b"]);

    // Each round cuts off whichever node leads the first shard then, for 5 s, and heals
    // (`FLOTILLA_PARTITION_ROUNDS` rounds, default 4): both ways, then only what reaches it
    // (it still sends heartbeats but hears no acknowledgement: it must step down and stop
    // serving lease reads), then only what it sends (the others elect while it still hears
    // them), then from the meta leader only (its map lags while its shards carry on). During
    // each cut a shard is split and a leadership moved.
    let rounds: u32 = std::env::var("FLOTILLA_PARTITION_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 0..rounds {
        let victim = leader_of_first_shard(&admin).await;
        match (round % 4, meta_leader(&admin).await) {
            (3, Some(m)) if m != victim => {
                eprintln!("round {round}: cutting node {victim} from the meta leader {m} only");
                net.cut_pair(victim, m);
            }
            (r, _) => {
                let (inbound, outbound) = [(true, true), (true, false), (false, true), (true, true)][r as usize];
                eprintln!("round {round}: isolating node {victim} (inbound {inbound}, outbound {outbound})");
                net.isolate(victim, inbound, outbound);
            }
        }
        change_placement(&admin, round).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        net.heal(victim);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // Every shard has a leader again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(AdminResponse::Shards(rows)) = admin.admin(AdminRequest::Shards).await {
            if rows.iter().all(|r| r.leader.is_some()) {
                eprintln!("{} shards, all led", rows.len());
                break;
            }
        }
        assert!(Instant::now() < deadline, "shards left without a leader after healing");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    history.stop_and_check(200).await;
    admin.close().await;
    for s in cluster.servers.iter_mut() {
        assert!(s.terminate().success());
    }
}
