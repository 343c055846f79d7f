//! Shared by the crash tests: run this test binary again as a child that writes and prints
//! `ack ...` lines, read acknowledgements until enough arrived, then kill it (SIGKILL); and a
//! single-node host for the children.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs test `test` of this binary as a child with `env_key=env_value`, hands each line that
/// starts with `ack ` (without the prefix) to `on_ack` until `target` acknowledgements arrived
/// or `time_max` passed, then kills the child mid-write. Returns how many were seen.
pub fn run_and_kill(
    test: &str,
    env_key: &str,
    env_value: &str,
    target: u64,
    time_max: Duration,
    mut on_ack: impl FnMut(&str),
) -> u64 {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(env_key, env_value)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < target && started.elapsed() < time_max {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.strip_prefix("ack ") {
            on_ack(rest);
            seen += 1;
        }
    }
    child.kill().expect("kill");
    let _ = child.wait();
    seen
}

/// Single-node groups need no network.
pub struct NoNet;
impl flotilla_shard::HostNetwork for NoNet {
    fn send(&self, _to: flotilla_raft::NodeId, _batch: flotilla_shard::NodeBatch) {}
}

/// The configuration of a single-node host whose calls wait long (a loaded machine).
pub fn single_node_config() -> flotilla_shard::HostConfig {
    let mut c = flotilla_shard::HostConfig::new(flotilla_raft::NodeId(1));
    c.raft = flotilla_raft::Config::fast();
    c.api_timeout_ms = 20_000;
    c
}

/// Opens the single-node host on the store in `dir`.
pub async fn open_single(dir: &str) -> flotilla_shard::Host {
    let store = flotilla_shard::Store::open(dir).expect("open");
    flotilla_shard::Host::open(store, single_node_config(), std::sync::Arc::new(NoNet)).await.expect("host")
}

/// [`run_and_kill`] for children that print `ack <number> <key> <value>`: adds each to
/// `acked` (key -> (number, value)) and checks the child acknowledged something.
pub fn run_and_kill_collecting(
    test: &str,
    env_key: &str,
    dir: &str,
    target: u64,
    acked: &mut std::collections::BTreeMap<String, (u64, String)>,
) {
    let seen = run_and_kill(test, env_key, dir, target, Duration::from_secs(40), |ack| {
        let mut parts = ack.splitn(3, ' ');
        let (Some(n), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else { return };
        let Ok(n) = n.parse::<u64>() else { return };
        acked.insert(k.to_string(), (n, v.to_string()));
    });
    assert!(seen > 0, "the child acknowledged nothing");
}
