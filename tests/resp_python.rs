//! Redis clients nobody here wrote (issue 15): Python's `redis` package, eight threads on two
//! of a 3-node cluster's front doors, reading and writing a few keys while the shard under
//! them splits twice and every shard's leader moves. The history they record is checked for
//! linearizability by the project's checker (`flotilla_raft::testing::linearizability`).
//!
//! The package is taken from `FLOTILLA_PYTHON` (a Python that can `import redis`) or installed
//! into a virtual environment under the target directory the first time (`python3 -m venv`,
//! `pip install redis==REDIS_PY`), which needs PyPI; `.ci/run` prepares it.

use flotilla_raft::testing::linearizability::{check_history, Op, OpInput, OpOutput};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;

/// The redis-py release the workload runs on (pinned: a test's client must not change under it).
const REDIS_PY: &str = "5.2.1";
/// The workload's keys: all in the shard that starts at "80", split at "py:c" and "py:e".
const KEYS: &[&str] = &["py:a", "py:b", "py:c", "py:d", "py:e", "py:f"];

/// A Python that can `import redis`: `FLOTILLA_PYTHON`, or a virtual environment made once
/// under the target directory.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOTILLA_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("redis-py-{REDIS_PY}"));
    let bin = venv.join("bin/python3");
    let ready = |bin: &Path| Command::new(bin).args(["-c", "import redis"]).status().is_ok_and(|s| s.success());
    if ready(&bin) {
        return bin;
    }
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "python3 -m venv {} failed: this test needs Python 3 with venv",
        venv.display()
    );
    let pip = Command::new(&bin)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", &format!("redis=={REDIS_PY}")])
        .status();
    assert!(
        pip.is_ok_and(|s| s.success()),
        "pip install redis=={REDIS_PY} failed (needs PyPI, or set FLOTILLA_PYTHON)"
    );
    assert!(ready(&bin), "{} cannot import redis after installing it", bin.display());
    bin
}

/// One line of the workload's output (see tests/python/redis_history.py).
#[derive(Debug, Deserialize)]
struct Line {
    client: u64,
    key: String,
    op: String,
    value: String,
    invoke: u64,
    /// Absent: the outcome is unknown.
    ret: Option<u64>,
    out: Option<serde_json::Value>,
}

/// The checker's view of one line.
fn to_op(l: Line) -> Op {
    let text = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_str()).map(str::to_string);
    let flag = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_bool()).unwrap_or(false);
    let (input, output) = match l.op.as_str() {
        "get" => (OpInput::Get, OpOutput::Get(text(&l.out))),
        "put" => (OpInput::Put(Some(l.value)), OpOutput::Put { previous: text(&l.out) }),
        "del" => (OpInput::Put(None), OpOutput::Put { previous: text(&l.out) }),
        "set" => (OpInput::Put(Some(l.value)), OpOutput::Written),
        "setnx" => (OpInput::Cas { expected: None, new: Some(l.value) }, OpOutput::Cas { ok: flag(&l.out) }),
        other => panic!("unknown operation {other:?} in the workload's output"),
    };
    Op { client: l.client, key: l.key, input, invoke: l.invoke, result: l.ret.map(|t| (t, output)) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_py_clients_see_a_linearizable_history_through_splits_and_leader_moves() {
    let python = python();
    let cluster = common::cluster::three_nodes_with_front_doors(&[1, 3]).await;
    let admin = cluster.client().await;
    let addrs: Vec<String> =
        [1, 3].iter().map(|n| cluster.node(*n).resp_addr().expect("the node serves redis").to_string()).collect();
    let out = tempfile::NamedTempFile::new().expect("history file");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/redis_history.py");
    let workload = Command::new(&python)
        .arg(&script)
        .args(["--addrs", &addrs.join(","), "--keys", &KEYS.join(","), "--clients", "8", "--seconds", "6"])
        .arg("--out")
        .arg(out.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the workload");
    // Two splits between the keys and every shard's leader moved after each.
    for at in ["py:c", "py:e"] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        common::cluster::split_and_move_leaders(&admin, at.as_bytes()).await;
    }
    let done =
        tokio::time::timeout(Duration::from_secs(120), tokio::task::spawn_blocking(|| workload.wait_with_output()))
            .await
            .expect("the workload ends")
            .expect("the workload's waiter")
            .expect("the workload ran");
    assert!(done.status.success(), "the workload failed: {}", String::from_utf8_lossy(&done.stdout));
    let text = std::fs::read_to_string(out.path()).expect("read the history");
    let history: Vec<Op> =
        text.lines().map(|l| to_op(serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))).collect();
    let known = history.iter().filter(|o| o.result.is_some()).count();
    eprintln!(
        "redis-py workload: {} operations, {known} answered, {}",
        history.len(),
        String::from_utf8_lossy(&done.stdout).trim()
    );
    // Enough answered operations, on every key, for the check to mean something.
    assert!(known >= 500, "too few operations answered: {known} of {}", history.len());
    assert!(known * 10 >= history.len() * 9, "more than a tenth of the outcomes unknown: {known} of {}", history.len());
    for key in KEYS {
        assert!(
            history.iter().filter(|o| o.key == *key && o.result.is_some()).count() >= 20,
            "few operations on {key}"
        );
    }
    if let Err(e) = check_history(&history) {
        panic!("{e}");
    }
}
