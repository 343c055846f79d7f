//! Three `flotilla server` processes with TOML configs on loopback: write and read through
//! `flotilla::Client`; crash (SIGKILL) the process leading a shard and keep serving; restart it
//! and see it catch up; metrics and health over HTTP; SIGTERM stops a server cleanly.

use flotilla::cluster::{ClusterFile, ClusterNode, CLUSTER_FILE_VERSION};
use flotilla::wire::{AdminRequest, AdminResponse, ShardRow};
use flotilla::{Client, ClientConfig};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// A server process, killed on drop.
struct Server {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(config: &Path, log: &Path) -> Server {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(BIN)
            .args(["server", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn flotilla server");
        Server { child: Some(child), config: config.to_path_buf(), log: log.to_path_buf() }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        *self = Server::start(&self.config.clone(), &self.log.clone());
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        assert!(Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

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
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dir.join("certs");
    let c = certs.to_str().unwrap();
    run(&["cert", "ca", "--dir", c]);
    for id in ["1", "2", "3"] {
        run(&["cert", "node", "--dir", c, "--id", id]);
    }
    run(&["cert", "client", "--dir", c, "--name", "test"]);
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let metrics: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect();
    let mut servers = Vec::new();
    for id in 1..=3u64 {
        let mut text = format!(
            "id = {id}\ndata_dir = \"n{id}\"\nlisten = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node-{id}.pem\"\nkey = \"certs/node-{id}-key.pem\"\n\n",
            ports[(id - 1) as usize],
            metrics[(id - 1) as usize]
        );
        for p in (1..=3u64).filter(|p| *p != id) {
            text += &format!("[[peers]]\nid = {p}\naddr = \"127.0.0.1:{}\"\n\n", ports[(p - 1) as usize]);
        }
        text += "[bootstrap]\nmeta_voters = [1, 2, 3]\nshard_replicas = [1, 2, 3]\nshards = 2\n";
        let path = dir.join(format!("n{id}.toml"));
        std::fs::write(&path, text).unwrap();
        servers.push(Server::start(&path, &dir.join(format!("n{id}.log"))));
    }
    let file = ClusterFile {
        version: CLUSTER_FILE_VERSION,
        nodes: (1..=3u64)
            .map(|id| ClusterNode { id, addr: format!("127.0.0.1:{}", ports[(id - 1) as usize]), metrics: None })
            .collect(),
        ca: certs.join("ca.pem"),
        cert: certs.join("client-test.pem"),
        key: certs.join("client-test-key.pem"),
        data_dir: None,
        pid: None,
    };
    let mut cfg = ClientConfig::new(file.tls().unwrap(), file.endpoints().unwrap());
    cfg.op_timeout = Duration::from_secs(30);
    let deadline = Instant::now() + Duration::from_secs(90);
    let client = loop {
        match Client::connect(cfg.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "servers never formed a cluster: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };

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
    for i in 0..30 {
        client.put(format!("{:02x}-k{i}", i * 8).as_bytes(), b"after").await.unwrap();
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
    assert!(http_get(port, "/nope").starts_with("HTTP/1.1 404"));

    client.close().await;
    for s in servers.iter_mut() {
        assert!(s.terminate().success());
    }
}
