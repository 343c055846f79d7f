//! Helpers shared by the integration tests: `flotilla` server processes ([`Servers`]), checked
//! client histories ([`History`]), and the in-process cluster ([`cluster::Cluster`]).
#![allow(dead_code)]

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// A server process, killed on drop.
pub struct Server {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    /// The network namespace it runs in, if any.
    netns: Option<String>,
}

impl Server {
    pub fn start(config: &Path, log: &Path) -> Server {
        Self::start_in(None, config, log)
    }

    /// Starts `flotilla server --config CONFIG`, inside network namespace `netns` if given
    /// (`ip netns exec` runs the server in place, so the child is the server itself).
    pub fn start_in(netns: Option<&str>, config: &Path, log: &Path) -> Server {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["server", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn flotilla server");
        Server {
            child: Some(child),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            netns: netns.map(str::to_string),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        *self = Server::start_in(self.netns.clone().as_deref(), &self.config.clone(), &self.log.clone());
    }

    /// SIGSTOP: the process freezes (timers, sockets and all) until [`Server::resume`].
    pub fn pause(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-STOP", &c.id().to_string()]).status();
        }
    }

    /// SIGHUP: the server reads its certificate files again.
    pub fn hangup(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-HUP", &c.id().to_string()]).status();
        }
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process runs (not killed, not exited).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the server again if it is not running (on its data and configuration).
    pub fn ensure_running(&mut self) {
        if !self.running() {
            self.restart();
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
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

/// Runs the `flotilla` binary and asserts it succeeded.
pub fn run(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, node certificates `1..=nodes` and a client certificate `test` in `dir`.
pub fn make_certs(dir: &Path, nodes: u64) {
    let c = dir.to_str().unwrap();
    run(&["cert", "ca", "--dir", c]);
    for id in 1..=nodes {
        run(&["cert", "node", "--dir", c, "--id", &id.to_string()]);
    }
    run(&["cert", "client", "--dir", c, "--name", "test", "--role", "admin"]);
}

/// Seconds a [`History`] uses one set of keys.
pub const PHASE_SECS: u64 = 15;

/// A checked client history: each client runs a random mix of gets (40 %), puts (20 %),
/// deletes (10 %) and compare-and-swaps (30 %) on a few keys, one operation at a time, and every
/// operation is recorded with its invocation and return times. Writes the client reports as
/// `Unavailable` ("nothing was changed") are left out, so one that did take effect would show
/// up as a value nobody wrote; `Unknown` outcomes may have happened or not. The Raft crate's
/// checker must then find a linearization.
pub struct History {
    ops: std::sync::Arc<std::sync::Mutex<Vec<flotilla_raft::testing::linearizability::Op>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl History {
    pub fn start(clients: Vec<flotilla::Client>, keys: &[&str]) -> History {
        use flotilla::{CasOutcome, ClientError};
        use flotilla_raft::testing::linearizability::{Op, OpInput, OpOutput};
        let ops: std::sync::Arc<std::sync::Mutex<Vec<Op>>> = Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let now = move || start.elapsed().as_nanos() as u64;
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let text = |v: Vec<u8>| String::from_utf8(v).expect("the history writes text values");
        let mut tasks = Vec::new();
        for (c, client) in clients.into_iter().enumerate() {
            let c = c as u64;
            let (keys, ops, stop) = (keys.clone(), ops.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = c * 7919 + 1;
                let mut next = move |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Keys change every PHASE_SECS (same prefixes, so same shards): each key's
                    // history stays short enough to check however long the run.
                    let phase = start.elapsed().as_secs() / PHASE_SECS;
                    let key = format!("{}.{phase}", keys[next(keys.len() as u64) as usize]);
                    let value = format!("c{c}-{i}");
                    i += 1;
                    let invoke = now();
                    let (input, result) = match next(10) {
                        0..=3 => (OpInput::Get, client.get(key.as_bytes()).await.map(|v| OpOutput::Get(v.map(text)))),
                        4..=5 => (
                            OpInput::Put(Some(value.clone())),
                            client.put(key.as_bytes(), value.as_bytes()).await.map(|()| OpOutput::Written),
                        ),
                        6 => (
                            OpInput::Put(None),
                            client.delete(key.as_bytes()).await.map(|p| OpOutput::Put { previous: p.map(text) }),
                        ),
                        _ => {
                            // Expect a value some client may have written recently, or absence.
                            let expected = (next(3) > 0).then(|| format!("c{}-{}", next(6), i.saturating_sub(next(8))));
                            let out = client
                                .cas(key.as_bytes(), expected.as_deref().map(str::as_bytes), Some(value.as_bytes()))
                                .await
                                .map(|o| OpOutput::Cas { ok: matches!(o, CasOutcome::Swapped { .. }) });
                            (OpInput::Cas { expected, new: Some(value.clone()) }, out)
                        }
                    };
                    let result = match result {
                        Ok(out) => Some((now(), out)),
                        Err(ClientError::Unavailable(_)) => continue,
                        Err(ClientError::Unknown(_)) => None,
                        Err(e) => panic!("client {c}: {e}"),
                    };
                    ops.lock().unwrap().push(Op { client: c, key, input, invoke, result });
                }
                client.close().await;
            }));
        }
        History { ops, stop, tasks }
    }

    /// Stops the clients and checks the history; at least `answered_min` operations must have
    /// completed for the check to say anything.
    pub async fn stop_and_check(self, answered_min: usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let history = std::mem::take(&mut *self.ops.lock().unwrap());
        let answered = history.iter().filter(|o| o.result.is_some()).count();
        eprintln!("{} operations, {answered} answered", history.len());
        assert!(answered >= answered_min, "too few operations completed to say anything: {answered}");
        if let Err(e) = flotilla_raft::testing::linearizability::check_history(&history) {
            panic!("{e}");
        }
    }
}

/// Asks for a merge of a shard of `rows` (picked by `pick`) with its right-hand neighbour,
/// among the pairs whose replicas are the same (a merge needs that); allowed to fail (a fault
/// may be in its way, or the freeze not reach every replica and the merge abort). Returns what
/// the admin call said, for the log.
pub async fn ask_merge(
    admin: &flotilla::Client,
    rows: &[flotilla::wire::ShardRow],
    pick: impl FnOnce(usize) -> usize,
) -> Option<String> {
    let nodes = |r: &flotilla::wire::ShardRow| {
        let mut n: Vec<u64> = r.descriptor.replicas.iter().map(|x| x.node.0).collect();
        n.sort();
        n
    };
    let pairs: Vec<&flotilla::wire::ShardRow> = rows
        .windows(2)
        .filter(|w| w[0].descriptor.end.as_ref() == Some(&w[1].descriptor.start) && nodes(&w[0]) == nodes(&w[1]))
        .map(|w| &w[0])
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let left = pairs[pick(pairs.len()) % pairs.len()].descriptor.id;
    let r = admin.admin(flotilla::wire::AdminRequest::Merge { shard: left }).await;
    Some(format!(
        "merge shard {left} with its right neighbour: {}",
        if r.is_ok() { "started".into() } else { format!("{r:?}") }
    ))
}

/// Where the servers of a [`Servers`] listen: node `i` (from 1) at `hosts[i-1]:ports[i-1]`,
/// inside network namespace `netns[i-1]` if given; metrics on loopback only without
/// namespaces.
pub struct Layout {
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub netns: Option<Vec<String>>,
}

impl Layout {
    /// `total` servers on 127.0.0.1 at free ports.
    pub fn loopback(total: u64) -> Layout {
        let port = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Layout {
            hosts: vec!["127.0.0.1".into(); total as usize],
            ports: (0..total).map(|_| port()).collect(),
            netns: None,
        }
    }
}

/// Each test server's `memory_budget` (256 MiB).
pub const SERVER_MEMORY_BUDGET: &str = "256MiB";
/// The runtime threads of a test server (`runtime_threads`).
pub const SERVER_RUNTIME_THREADS: usize = 1;

/// Server processes: nodes `1..=boot` bootstrap a cluster of `shards` shards (meta group and
/// shards on all of them); nodes after them (up to `total`) start with the first ones as peers
/// and no bootstrap (they join). Each node's log is `n<id>.log` in `dir`.
pub struct Servers {
    pub dir: tempfile::TempDir,
    pub servers: Vec<Server>,
    pub configs: Vec<PathBuf>,
    /// Metrics ports (loopback layouts only).
    pub metrics: Vec<u16>,
    /// A client configuration for the bootstrapped nodes (30 s deadline).
    pub client: flotilla::ClientConfig,
    netns: Option<Vec<String>>,
}

impl Servers {
    /// On loopback.
    pub fn new(boot: u64, total: u64, shards: u32) -> Servers {
        Self::with_layout(boot, total, shards, Layout::loopback(total))
    }

    pub fn with_layout(boot: u64, total: u64, shards: u32, layout: Layout) -> Servers {
        let mut dir = tempfile::tempdir().unwrap();
        // FLOTILLA_KEEP_LOGS=1: the directory (the servers' logs `n<id>.log`, their data) stays
        // after the test, for reading a failed run.
        if std::env::var_os("FLOTILLA_KEEP_LOGS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("servers' directory (kept): {}", dir.path().display());
        }
        let certs = dir.path().join("certs");
        make_certs(&certs, total);
        let addr = |id: u64| format!("{}:{}", layout.hosts[(id - 1) as usize], layout.ports[(id - 1) as usize]);
        let metrics: Vec<u16> = match &layout.netns {
            None => (0..total)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
                .collect(),
            Some(_) => Vec::new(),
        };
        let mut configs = Vec::new();
        for id in 1..=total {
            // A budget below the default and one runtime thread each: several servers share
            // the test machine (so every server path runs on one runtime worker thread here),
            // and the settings are read from a file as an operator would write them.
            let mut text = format!(
                "id = {id}\ndata_dir = \"n{id}\"\nlisten = \"{}\"\nmemory_budget = \"{SERVER_MEMORY_BUDGET}\"\n\
                 runtime_threads = {SERVER_RUNTIME_THREADS}\n",
                addr(id)
            );
            if let Some(m) = metrics.get((id - 1) as usize) {
                text += &format!("metrics_listen = \"127.0.0.1:{m}\"\n");
            }
            text += &format!(
                "\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node-{id}.pem\"\nkey = \"certs/node-{id}-key.pem\"\n\n"
            );
            for p in (1..=boot).filter(|p| *p != id) {
                text += &format!("[[peers]]\nid = {p}\naddr = \"{}\"\n\n", addr(p));
            }
            if id <= boot {
                let ids: Vec<String> = (1..=boot).map(|n| n.to_string()).collect();
                text += &format!(
                    "[bootstrap]\nmeta_voters = [{0}]\nshard_replicas = [{0}]\nshards = {shards}\n",
                    ids.join(", ")
                );
            }
            let path = dir.path().join(format!("n{id}.toml"));
            std::fs::write(&path, text).unwrap();
            configs.push(path);
        }
        let file = flotilla::cluster::ClusterFile {
            version: flotilla::cluster::CLUSTER_FILE_VERSION,
            nodes: (1..=boot)
                .map(|id| flotilla::cluster::ClusterNode {
                    id: flotilla::raft::NodeId(id),
                    addr: addr(id),
                    metrics: None,
                })
                .collect(),
            ca: certs.join("ca.pem"),
            cert: certs.join("client-test.pem"),
            key: certs.join("client-test-key.pem"),
            data_dir: None,
            pid: None,
        };
        let mut client = flotilla::ClientConfig::new(file.tls().unwrap(), file.endpoints().unwrap());
        client.op_timeout = Duration::from_secs(30);
        let mut out = Servers { dir, servers: Vec::new(), configs, metrics, client, netns: layout.netns };
        for id in 1..=boot {
            out.start(id);
        }
        out
    }

    /// Starts node `id` (call in id order: `servers[id - 1]` is node `id`).
    pub fn start(&mut self, id: u64) {
        let log = self.dir.path().join(format!("n{id}.log"));
        let ns = self.netns.as_ref().map(|n| n[(id - 1) as usize].clone());
        self.servers.push(Server::start_in(ns.as_deref(), &self.configs[(id - 1) as usize], &log));
    }

    /// A client, once the cluster answers (within 90 s).
    pub async fn client(&self) -> flotilla::Client {
        self.client_with(self.client.clone()).await
    }

    pub async fn client_with(&self, cfg: flotilla::ClientConfig) -> flotilla::Client {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match flotilla::Client::connect(cfg.clone()).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "servers never formed a cluster: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
}

/// Runs `redis-cli -p PORT ARGS` with `script` on its standard input (one connection, one
/// command a line) and waits for it: its exit status and output.
pub fn redis_cli(port: u16, args: &[&str], script: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write to redis-cli");
    child.wait_with_output().expect("redis-cli output")
}

/// A writer of unique keys spread over the keyspace (`<hex byte>-w<i>`, value `w`), until
/// `stop`: returns the keys it saw acknowledged, every one of which must survive. Outcomes
/// unknown or unavailable are not counted (and slow it down a little).
pub fn acked_writer(
    client: flotilla::Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    use flotilla::ClientError;
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let key = format!("{:02x}-w{i}", (i * 37) % 256);
            i += 1;
            match client.put(key.as_bytes(), b"w").await {
                Ok(()) => acked.push(key),
                Err(ClientError::Unavailable(_) | ClientError::Unknown(_)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("writer: {e}"),
            }
        }
        client.close().await;
        acked
    })
}
