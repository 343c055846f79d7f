//! `flotilla server` processes with TOML configs on loopback. Three of them: write and read
//! through `flotilla::Client`; crash (SIGKILL) the process leading a shard and keep serving;
//! restart it and see it catch up; metrics and health over HTTP; SIGTERM stops a server
//! cleanly. Four: a fourth server joins by itself, and while clients write, a shard is split
//! and a replica moved to the new server, losing no acknowledged write.

use flotilla::wire::{AdminRequest, AdminResponse, ShardRow};
use flotilla::Client;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

mod common;
use common::Servers;

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

async fn shards(client: &Client) -> Vec<ShardRow> {
    match client.admin(AdminRequest::Shards).await.unwrap() {
        AdminResponse::Shards(rows) => rows,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_survive_a_crash_and_catch_up() {
    let mut cluster = Servers::new(3, 3, 2);
    let client = cluster.client().await;
    let metrics = cluster.metrics.clone();
    let servers = &mut cluster.servers;

    for i in 0..30 {
        client.put(format!("{:02x}-k{i}", i * 8).as_bytes(), b"before").await.unwrap();
    }

    // Crash the node that leads the first shard (as the meta state's reports say).
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        if let Some(l) = shards(&client).await[0].leader {
            break l.0;
        }
        assert!(Instant::now() < deadline, "no leader reported");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    servers[(leader - 1) as usize].kill();
    // The first write to the dead leader times out: its outcome is unknown (the client does
    // not retry it). This test is the keys' only writer, so it may retry them itself.
    let mut unknown = 0;
    for i in 0..30 {
        let key = format!("{:02x}-k{i}", i * 8);
        loop {
            match client.put(key.as_bytes(), b"after").await {
                Ok(()) => break,
                Err(flotilla::ClientError::Unknown(e)) if unknown < 10 => {
                    unknown += 1;
                    eprintln!("put {key}: {e}; retrying");
                }
                Err(e) => panic!("put {key}: {e}"),
            }
        }
    }
    for i in 0..30 {
        assert_eq!(client.get(format!("{:02x}-k{i}", i * 8).as_bytes()).await.unwrap(), Some(b"after".to_vec()));
    }

    // Restart it: it rejoins and catches up (its reported applied index reaches the others').
    servers[(leader - 1) as usize].restart();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = shards(&client).await;
        let caught_up = rows.iter().all(|r| {
            let max = r.applied.values().copied().max().unwrap_or(0);
            r.applied.get(&flotilla::placement::NodeId(leader)).is_some_and(|a| *a == max) && max > 0
        });
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "node {leader} did not catch up: {rows:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Metrics and health over HTTP.
    let other = (1..=3u64).find(|n| *n != leader).unwrap();
    let port = metrics[(other - 1) as usize];
    let health = http_get(port, "/health");
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
    let m = http_get(port, "/metrics");
    assert!(m.contains("flotilla_requests_total{node=") && m.contains("flotilla_groups{node="), "{m}");
    // Memory and writes: the budget from the config file, RocksDB's sizes derived from it, and
    // figures that moved with the writes above.
    let value = |name: &str| -> u64 {
        let prefix = format!("{name}{{node=\"{other}\"}} ");
        let line = m.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
        line.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {name} in {m}"))
    };
    assert_eq!(value("flotilla_store_memory_budget_bytes"), 256 << 20); // common::SERVER_MEMORY_BUDGET
    assert_eq!(value("flotilla_rocksdb_block_cache_capacity_bytes"), 192 << 20);
    assert!(value("flotilla_rocksdb_memtable_bytes") > 0);
    assert!(value("flotilla_rocksdb_wal_written_bytes_total") > 0);
    assert!(value("flotilla_rocksdb_written_bytes_total") > 0);
    assert!(value("flotilla_process_resident_memory_bytes") > 1 << 20);
    // The node's own process, which has done work by now (CPU time in µs).
    assert_eq!(Some(value("flotilla_process_id")), servers[(other - 1) as usize].pid().map(u64::from));
    assert!(value("flotilla_process_cpu_microseconds_total") > 10_000);
    // The runtime runs the threads its configuration asked for.
    assert_eq!(value("flotilla_runtime_worker_threads"), common::SERVER_RUNTIME_THREADS as u64);
    assert!(value("flotilla_process_instance") > 0);
    assert_eq!(value("flotilla_groups_stopped"), 0, "no group of a healthy node stopped");
    for name in [
        "flotilla_rocksdb_block_cache_usage_bytes",
        "flotilla_rocksdb_block_cache_pinned_bytes",
        "flotilla_rocksdb_table_readers_bytes",
        "flotilla_rocksdb_flush_written_bytes_total",
        "flotilla_rocksdb_compaction_written_bytes_total",
    ] {
        value(name);
        assert!(m.contains(&format!("# TYPE {name} ")), "no TYPE line for {name}");
    }
    // Disk writes are in /proc/self/io, which some sandboxes hide: there or left out (and
    // possibly 0: writes to a tmpfs never reach a block device).
    if std::fs::read_to_string("/proc/self/io").is_ok() {
        value("flotilla_process_disk_written_bytes_total");
    }
    assert!(http_get(port, "/nope").starts_with("HTTP/1.1 404"));

    client.close().await;
    for s in servers.iter_mut() {
        assert!(s.terminate().success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_joins_then_a_split_and_a_move_lose_no_write() {
    let mut cluster = Servers::new(3, 4, 1);
    let client = std::sync::Arc::new(cluster.client().await);
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // Writers on both sides of the coming split key. A write that failed or whose outcome is
    // unknown is not counted; every acknowledged one must survive.
    let mut writers = Vec::new();
    for prefix in ["b", "x"] {
        let (client, stop) = (client.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0u32);
            let mut i = 0;
            while !stop.load(Relaxed) {
                let k = format!("{prefix}-{i:06}");
                match client.put(k.as_bytes(), k.as_bytes()).await {
                    Ok(_) => acked.push(k),
                    Err(e) => {
                        failed += 1;
                        eprintln!("write {k}: {e}");
                    }
                }
                i += 1;
            }
            (acked, failed)
        }));
    }

    // Node 4 starts with the others as peers and no bootstrap: it registers itself.
    cluster.start(4);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let AdminResponse::Nodes(rows) = client.admin(AdminRequest::Nodes).await.unwrap() else { panic!() };
        if rows.iter().any(|r| r.node.0 == 4 && r.report_age_ms.is_some_and(|a| a < 3_000)) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never joined: {rows:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Split while the writers run; both halves get a leader.
    let AdminResponse::Changed(halves) = client.admin(AdminRequest::Split { key: b"m".to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    let right = halves.iter().find(|d| d.start == b"m").expect("the right half").id;
    let deadline = Instant::now() + Duration::from_secs(60);
    while shards(&client).await.iter().filter(|r| r.leader.is_some()).count() != 2 {
        assert!(Instant::now() < deadline, "the halves never both got a leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Move the right half's replica from node 1 to node 4, still writing.
    use flotilla::placement::NodeId;
    client.admin(AdminRequest::Move { shard: right, from: NodeId(1), to: NodeId(4) }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = shards(&client).await;
        let row = rows.iter().find(|r| r.descriptor.id == right).expect("the right half");
        let on_4 = row.applied.get(&NodeId(4)).copied().unwrap_or(0);
        let done = row.moving.is_none()
            && row.descriptor.replica(NodeId(4)).is_some()
            && row.descriptor.replica(NodeId(1)).is_none()
            && on_4 > 0;
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "the move did not finish: {row:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        let (a, failed) = w.await.unwrap();
        assert!(a.len() >= failed as usize, "most writes succeed: {} acked, {failed} failed", a.len());
        acked.extend(a);
    }
    assert!(acked.iter().any(|k| k.starts_with('x')) && acked.iter().any(|k| k.starts_with('b')));

    // With node 1 gone, the right half is served by nodes 2, 3 and 4: every acknowledged write
    // on either side reads back.
    cluster.servers[0].kill();
    for k in &acked {
        assert_eq!(client.get(k.as_bytes()).await.unwrap().as_deref(), Some(k.as_bytes()), "{k} lost");
    }
    client.close().await;
    for s in cluster.servers.iter_mut().skip(1) {
        assert!(s.terminate().success());
    }
}

/// Certificates move to a new CA while the servers run, by SIGHUP alone: first every node
/// trusts both CAs, then presents a certificate of the new one. A client that knows only the
/// new CA then reads and writes through any node, and one that knows only the old CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_move_to_a_new_ca_on_sighup_without_a_restart() {
    let mut cluster = Servers::new(3, 3, 1);
    let old_client = cluster.client().await;
    old_client.put(b"before", b"1").await.expect("put with the old CA");
    let (certs, next) = (cluster.dir.path().join("certs"), cluster.dir.path().join("next"));
    common::make_certs(&next, 3);
    let pem = |dir: &std::path::Path, name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    // Step 1: both CAs trusted.
    std::fs::write(certs.join("ca.pem"), pem(&certs, "ca.pem") + &pem(&next, "ca.pem")).unwrap();
    cluster.servers.iter_mut().for_each(|s| s.hangup());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Step 2: each node presents its certificate of the new CA.
    for id in 1..=3 {
        for file in [format!("node-{id}.pem"), format!("node-{id}-key.pem")] {
            std::fs::copy(next.join(&file), certs.join(&file)).unwrap();
        }
    }
    cluster.servers.iter_mut().for_each(|s| s.hangup());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in 1..=3 {
        let log = std::fs::read_to_string(cluster.dir.path().join(format!("n{id}.log"))).unwrap();
        assert_eq!(log.matches("SIGHUP: certificates reloaded").count(), 2, "node {id}:\n{log}");
    }

    let tls = flotilla::transport::cert::TlsIdentity::load(
        &next.join("ca.pem"),
        &next.join("client-test.pem"),
        &next.join("client-test-key.pem"),
    )
    .unwrap();
    let mut cfg = flotilla::ClientConfig::new(tls, cluster.client.endpoints.clone());
    cfg.op_timeout = Duration::from_secs(30);
    let new_client = cluster.client_with(cfg).await;
    assert_eq!(new_client.get(b"before").await.unwrap(), Some(b"1".to_vec()));
    new_client.put(b"after", b"2").await.expect("put with the new CA");
    assert_eq!(new_client.get(b"after").await.unwrap(), Some(b"2".to_vec()));

    let mut stale = cluster.client.clone();
    stale.op_timeout = Duration::from_secs(3);
    let refused = match Client::connect(stale).await {
        Ok(c) => c.get(b"before").await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(refused.is_err(), "a client trusting only the old CA still got through");
}
