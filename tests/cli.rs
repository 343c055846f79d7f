//! End to end through the real binary: `flotilla dev` in a child process, then `flotilla kv`,
//! `admin` and `bench` in others, finding the cluster with no flags (through
//! `FLOTILLA_HOME`); a client certificate from another CA is refused; certificates with a
//! role may do only what it allows; bad input to each command
//! gives a clear error; SIGTERM stops `dev` cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// Kills the child on drop, so a failing test leaves no cluster behind.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn flotilla(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("FLOTILLA_HOME", home).env_remove("RUST_LOG").output().expect("run flotilla")
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = flotilla(home, args);
    assert!(
        out.status.success(),
        "flotilla {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs a command that must fail with exit code `code` and a message containing `needle`.
fn fails(home: &Path, args: &[&str], code: i32, needle: &str) {
    let out = flotilla(home, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "flotilla {args:?}: stderr {err}");
    assert!(err.contains(needle), "flotilla {args:?}: expected {needle:?} in {err}");
    assert!(!err.contains("panicked"), "flotilla {args:?} panicked: {err}");
}

fn start_dev(home: &Path) -> Guard {
    let child = Command::new(BIN)
        .args(["dev", "--nodes", "3", "--shards", "4", "--runtime-threads", "2"])
        .env("FLOTILLA_HOME", home)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flotilla dev");
    let guard = Guard(Some(child));
    let file = home.join("cluster.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !file.exists() {
        assert!(Instant::now() < deadline, "flotilla dev did not write {}", file.display());
        std::thread::sleep(Duration::from_millis(200));
    }
    guard
}

#[test]
fn dev_cluster_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().to_path_buf();
    let mut dev = start_dev(&home);

    // kv: every operation, no flags.
    assert_eq!(ok(&home, &["kv", "put", "hello", "world"]).trim(), "OK");
    assert_eq!(ok(&home, &["kv", "get", "hello"]).trim(), "world");
    let json: serde_json::Value = serde_json::from_str(&ok(&home, &["kv", "get", "hello", "--json"])).unwrap();
    assert_eq!(json["value"], "world");
    assert_eq!(json["found"], true);
    fails(&home, &["kv", "get", "absent"], 1, "not found");
    assert_eq!(ok(&home, &["kv", "cas", "hello", "--expected", "world", "--new", "there"]).trim(), "OK (swapped)");
    let out = flotilla(&home, &["kv", "cas", "hello", "--expected", "world", "--new", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"there\""));
    for k in ["a1", "b2", "f3", "09"] {
        ok(&home, &["kv", "put", k, &format!("v{k}")]);
    }
    let scan = ok(&home, &["kv", "scan"]);
    let keys: Vec<&str> = scan.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(keys, ["09", "a1", "b2", "f3", "hello", "(5"], "{scan}");
    let limited: serde_json::Value = serde_json::from_str(&ok(&home, &["kv", "scan", "a", "g", "--json"])).unwrap();
    assert_eq!(limited["pairs"].as_array().unwrap().len(), 3);
    assert_eq!(ok(&home, &["kv", "delete", "hello"]).trim(), "OK (deleted)");
    fails(&home, &["kv", "get", "hello"], 1, "not found");

    // The nodes' shared runtime runs the threads `--runtime-threads` asked for.
    let cluster = flotilla::cluster::ClusterFile::load(&home.join("cluster.json")).unwrap();
    let addr = cluster.nodes[0].metrics.clone().expect("node 1's metrics address");
    let fetch = flotilla::metrics_scrape::fetch(&addr, Duration::from_secs(10));
    let page = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(fetch).unwrap();
    assert!(page.lines().any(|l| l == "flotilla_runtime_worker_threads{node=\"1\"} 2"), "{page}");

    // admin.
    let shards = ok(&home, &["admin", "shards"]);
    assert_eq!(shards.lines().count(), 6, "{shards}");
    assert!(
        shards.lines().last().unwrap().starts_with("4 shards, 4 with a known leader, 0 moving, 12 replicas"),
        "{shards}"
    );
    // One page: two shards, the whole map's summary, and where the next page starts.
    let page = ok(&home, &["admin", "shards", "--limit", "2"]);
    let lines: Vec<&str> = page.lines().collect();
    assert_eq!(lines.len(), 5, "{page}");
    assert!(lines[3].starts_with("4 shards,"), "{page}");
    let next = lines[4].strip_prefix("next page: --from ").expect("a next page");
    let rest = ok(&home, &["admin", "shards", "--from", next, "--json"]);
    let rest: serde_json::Value = serde_json::from_str(&rest).unwrap();
    assert_eq!(rest["ShardsPage"]["rows"].as_array().unwrap().len(), 2, "{rest}");
    assert!(rest["ShardsPage"]["next"].is_null(), "{rest}");
    let all: serde_json::Value = serde_json::from_str(&ok(&home, &["admin", "shards", "--json"])).unwrap();
    assert_eq!(all["Shards"].as_array().unwrap().len(), 4);
    let nodes: serde_json::Value = serde_json::from_str(&ok(&home, &["admin", "nodes", "--json"])).unwrap();
    assert_eq!(nodes["Nodes"].as_array().unwrap().len(), 3);
    assert!(ok(&home, &["admin", "status"]).contains("shards: 4"));
    // A live split: the map gains a shard; splitting at a shard's first key is refused.
    ok(&home, &["admin", "split", "m"]);
    assert!(ok(&home, &["admin", "status"]).contains("shards: 5"));
    fails(&home, &["admin", "split", "m"], 1, "first key");
    // A merge back: the shard that ends at "m" absorbs the one split off, and the command
    // follows it to the end.
    let all: serde_json::Value = serde_json::from_str(&ok(&home, &["admin", "shards", "--json"])).unwrap();
    let left = all["Shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["descriptor"]["end"] == serde_json::json!([b'm']))
        .map(|r| r["descriptor"]["id"].as_u64().unwrap())
        .expect("the shard that ends at m");
    assert!(ok(&home, &["admin", "merge", &left.to_string()]).contains("merge done"));
    assert!(ok(&home, &["admin", "status"]).contains("shards: 4"));
    fails(&home, &["admin", "merge", "99"], 1, "no shard 99");

    // Roles: certificates from the dev cluster's CA, each in a cluster file of its own.
    let certs = {
        let file: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(home.join("cluster.json")).unwrap()).unwrap();
        PathBuf::from(file["ca"].as_str().unwrap()).parent().unwrap().to_path_buf()
    };
    let as_client = |name: &str, role_args: &[&str]| -> String {
        let mut args = vec!["cert", "client", "--dir", certs.to_str().unwrap(), "--name", name];
        args.extend_from_slice(role_args);
        ok(&home, &args);
        let mut file: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(home.join("cluster.json")).unwrap()).unwrap();
        file["cert"] = certs.join(format!("client-{name}.pem")).to_str().unwrap().into();
        file["key"] = certs.join(format!("client-{name}-key.pem")).to_str().unwrap().into();
        let path = home.join(format!("{name}.json"));
        std::fs::write(&path, file.to_string()).unwrap();
        path.to_str().unwrap().to_string()
    };
    ok(&home, &["cert", "client", "positional", "--dir", certs.to_str().unwrap(), "--role", "readonly"]);
    assert!(certs.join("client-positional.pem").exists());
    let viewer = as_client("viewer", &["--role", "readonly"]);
    assert_eq!(ok(&home, &["kv", "--cluster", &viewer, "get", "a1"]).trim(), "va1");
    fails(&home, &["kv", "--cluster", &viewer, "put", "a1", "x"], 1, "permission denied: role readonly may not put");
    fails(&home, &["admin", "--cluster", &viewer, "split", "n"], 1, "permission denied: role readonly may not split");
    let app = as_client("app", &["--role", "readwrite"]);
    assert_eq!(ok(&home, &["kv", "--cluster", &app, "put", "app", "1"]).trim(), "OK");
    fails(&home, &["admin", "--cluster", &app, "drain", "3"], 1, "permission denied: role readwrite may not drain");
    fails(&home, &["admin", "--cluster", &app, "rebalance"], 1, "permission denied: role readwrite may not rebalance");
    let tenant = as_client("tenant-a", &["--role", "readwrite", "--prefix", "a"]);
    let scan = ok(&home, &["kv", "--cluster", &tenant, "scan"]);
    let keys: Vec<&str> = scan.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(keys, ["a1", "app", "(2"], "{scan}");
    fails(&home, &["kv", "--cluster", &tenant, "get", "b2"], 1, "limited to keys starting with \"a\" may not get");
    ok(&home, &["kv", "delete", "app"]);
    fails(&home, &["cert", "client", "--dir", certs.to_str().unwrap(), "--name", "x"], 2, "--role");
    fails(
        &home,
        &["cert", "client", "--dir", certs.to_str().unwrap(), "--name", "x", "--role", "root"],
        2,
        "unknown role",
    );
    let admin_prefix =
        ["cert", "client", "--dir", certs.to_str().unwrap(), "--name", "x", "--role", "admin", "--prefix", "a"];
    fails(&home, &admin_prefix, 1, "cannot be limited to a prefix");

    // bench, briefly.
    let report: serde_json::Value = serde_json::from_str(&ok(
        &home,
        &["bench", "put", "--clients", "4", "--duration", "1", "--keys", "100", "--json"],
    ))
    .unwrap();
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors_other"], 0);

    // Bad input: a clear error, no panic, before or without touching the cluster.
    fails(&home, &["kv", "put", "", "v"], 1, "must not be empty");
    fails(&home, &["kv", "get"], 2, "KEY");
    fails(&home, &["kv", "cas", "k", "--new", "v"], 1, "--expected");
    fails(&home, &["kv", "scan", "--limit", "0"], 1, "--limit");
    fails(&home, &["kv", "scan", "z", "a"], 1, "must come before");
    fails(&home, &["kv", "delete", ""], 1, "must not be empty");
    fails(&home, &["admin", "split", &"k".repeat(1001)], 1, "exceeds the limit");
    fails(&home, &["admin", "transfer-leader", "1", "9"], 1, "no such replica");
    fails(&home, &["admin", "drain", "99"], 1, "unknown node");
    fails(&home, &["admin", "add-node", "5", "nowhere"], 1, "not an address");
    fails(&home, &["kv", "put", "k"], 2, "VALUE");
    fails(&home, &["kv", "--timeout=0", "get", "k"], 1, "--timeout");
    fails(&home, &["admin", "move", "1", "2", "2"], 1, "same node");
    fails(&home, &["admin", "move", "99", "1", "2"], 1, "no shard 99");
    fails(&home, &["bench", "put", "--clients", "0"], 1, "--clients");
    fails(&home, &["dev", "--nodes", "0"], 1, "--nodes");
    fails(&home, &["dev", "--runtime-threads", "0"], 2, "--runtime-threads");
    fails(&home, &["dev", "--runtime-threads", "1025"], 2, "--runtime-threads");
    fails(&home, &["dev", "--memory-budget", "1MiB"], 1, "below the minimum");
    fails(&home, &["dev", "--memory-budget", "512MB"], 1, "not a size");
    fails(&home, &["kv", "--cluster", "/nonexistent/cluster.json", "get", "k"], 1, "no cluster file");
    fails(&home, &["server", "--config", "/nonexistent/flotilla.toml"], 1, "cannot read");
    fails(&home, &["server"], 1, "without --config, give --id");
    // A server's flags, complete but for what each case adds.
    let server = |extra: &[&'static str]| -> Vec<&'static str> {
        let base = ["server", "--id", "1", "--data-dir", "d", "--listen", "127.0.0.1:0"];
        base.into_iter().chain(["--ca", "a", "--cert", "b", "--key", "c"]).chain(extra.iter().copied()).collect()
    };
    fails(&home, &server(&["--memory-budget", "lots"]), 1, "memory_budget");
    fails(&home, &server(&["--peer", "2"]), 1, "ID=ADDR");
    // Runtime threads are checked before the runtime starts, naming the setting.
    fails(&home, &server(&["--runtime-threads", "0"]), 1, "runtime_threads: 0 is not within");
    fails(&home, &["bench", "put", "--threads", "0"], 2, "--threads");
    // The Redis listener outside loopback must authenticate: refused before anything starts;
    // with TLS it gets past that check, to the (missing) certificate files.
    let open_redis = server(&["--resp-listen", "0.0.0.0:6379", "--resp-plaintext-loopback"]);
    fails(&home, &open_redis, 1, "must authenticate its clients");
    fails(&home, &server(&["--resp-listen", "0.0.0.0:6379", "--resp-tls"]), 1, "tls:");
    fails(&home, &["cert", "password-hash"], 1, "no password on standard input");
    fails(
        &home,
        &["server", "--id", "1", "--data-dir", "d", "--listen", "nowhere", "--ca", "a", "--cert", "b", "--key", "c"],
        1,
        "listen",
    );
    let bad_toml = home.join("bad.toml");
    std::fs::write(&bad_toml, "id = 1\ndata_dir = \"d\"\nlisten = \"127.0.0.1:0\"\nport = 3\n").unwrap();
    fails(&home, &["server", "--config", bad_toml.to_str().unwrap()], 1, "port");
    let empty = home.join("no-ca");
    fails(&home, &["cert", "node", "--dir", empty.to_str().unwrap(), "--id", "1"], 1, "create a CA first");

    // A client certificate from another CA is refused.
    let other = home.join("other-ca");
    ok(&home, &["cert", "ca", "--dir", other.to_str().unwrap()]);
    ok(&home, &["cert", "client", "--dir", other.to_str().unwrap(), "--name", "intruder", "--role", "admin"]);
    fails(&home, &["cert", "ca", "--dir", other.to_str().unwrap()], 1, "refusing to overwrite");
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("cluster.json")).unwrap()).unwrap();
    file["ca"] = other.join("ca.pem").to_str().unwrap().into();
    file["cert"] = other.join("client-intruder.pem").to_str().unwrap().into();
    file["key"] = other.join("client-intruder-key.pem").to_str().unwrap().into();
    let intruder: PathBuf = home.join("intruder.json");
    std::fs::write(&intruder, file.to_string()).unwrap();
    fails(
        &home,
        &["kv", "--cluster", intruder.to_str().unwrap(), "--timeout", "5", "get", "a1"],
        1,
        "cannot reach the cluster",
    );

    // SIGTERM stops dev cleanly and removes the cluster file it wrote.
    let child = dev.0.take().unwrap();
    let pid = child.id().to_string();
    let _guard = Guard(Some(child));
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut child = _guard;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "dev exited with {status}");
    assert!(!home.join("cluster.json").exists());
}

#[test]
fn a_redis_password_hash_is_sha256sum_of_the_line() {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["cert", "password-hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flotilla");
    child.stdin.take().expect("stdin").write_all(b"secret\n").expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // printf %s secret | sha256sum
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\n"
    );
}
