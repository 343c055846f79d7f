//! The Redis front door end to end (issue 15): the real `redis-cli` (Debian's `redis-tools`)
//! against a 3-node cluster of 4 shards in this process, the front door on nodes 1 and 3.
//! Every command with its expected reply, keys of different shards through one address,
//! pipelining (`redis-cli --pipe`, and many requests in one write), a protocol error closing
//! the connection, a half-closed connection answered, wrong arity and unknown commands.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

mod common;

use common::cluster::Cluster;
use flotilla::raft::{NodeId, Role};
use flotilla::resp_server::RespConfig;
use flotilla::wire::{AdminRequest, AdminResponse};
use std::sync::atomic::Ordering;
use std::time::Instant;

fn redis_cli_present() -> bool {
    Command::new("redis-cli").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs `redis-cli -p PORT --no-raw` with `script` on its standard input (one connection, one
/// command a line); its output.
fn cli_script(port: u16, extra: &[&str], script: &str) -> String {
    let out = common::redis_cli(port, extra, script);
    assert!(out.status.success(), "redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Each line of `script` with the reply `redis-cli --no-raw` prints for it (lines of a
/// multi-line reply separated by `\n`).
fn check(port: u16, pairs: &[(&str, &str)]) {
    let script: String = pairs.iter().map(|(cmd, _)| format!("{cmd}\n")).collect();
    let out = cli_script(port, &["--no-raw"], &script);
    let expected: Vec<(&str, &str)> =
        pairs.iter().flat_map(|(cmd, reply)| reply.split('\n').map(move |line| (*cmd, line))).collect();
    // redis-cli adds a line like `(0.94s)` after a reply that took longer than half a second
    // (a shard's first write on a loaded machine): timing, not a reply.
    let is_timing =
        |l: &str| l.strip_prefix('(').and_then(|l| l.strip_suffix("s)")).is_some_and(|n| n.parse::<f64>().is_ok());
    let got: Vec<&str> = out.lines().filter(|l| !is_timing(l)).collect();
    for (i, (cmd, want)) in expected.iter().enumerate() {
        assert_eq!(got.get(i).copied(), Some(*want), "reply to {cmd}\nwhole output:\n{out}");
    }
    assert_eq!(got.len(), expected.len(), "more output than expected:\n{out}");
}

/// Sends raw bytes on one connection, half-closes it, and reads everything until the server
/// closes.
fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    sock.write_all(bytes).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    sock.read_to_end(&mut out).expect("the server closes after answering");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cli_against_a_three_node_cluster() {
    if !redis_cli_present() {
        // .ci/run installs redis-tools; say loudly where it is missing.
        eprintln!("NOT RUN: redis-cli is not installed (apt-get install redis-tools)");
        return;
    }
    let cluster = Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], flotilla::meta::dev_split_keys(4), |cfg| {
        if cfg.id == NodeId(1) || cfg.id == NodeId(3) {
            let mut resp = RespConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
            resp.plaintext_loopback = true;
            if cfg.id == NodeId(3) {
                resp.connections_max = 4;
            }
            cfg.resp = Some(resp);
        }
    })
    .await;
    let _client = cluster.client().await;
    let a1 = cluster.node(1).resp_addr().expect("node 1 serves redis");
    let a3 = cluster.node(3).resp_addr().expect("node 3 serves redis");
    assert!(cluster.node(2).resp_addr().is_none());
    let (p1, p3) = (a1.port(), a3.port());

    // Keys of four different shards.
    let view = cluster.node(1).meta_view();
    let shards: std::collections::BTreeSet<_> =
        ["10", "50", "90", "d0"].iter().map(|k| view.map.lookup(k.as_bytes()).expect("routed").id).collect();
    assert_eq!(shards.len(), 4, "the test keys must live in four shards");

    tokio::task::spawn_blocking(move || {
        check(
            p1,
            &[
                ("PING", "PONG"),
                ("PING hi", "\"hi\""),
                ("ECHO hello", "\"hello\""),
                ("SELECT 0", "OK"),
                ("SELECT 1", "(error) ERR DB index is out of range"),
                ("SET 10 a", "OK"),
                ("SET 50 b", "OK"),
                ("SET 90 c", "OK"),
                ("SET d0 d", "OK"),
                ("GET 10", "\"a\""),
                ("GET nothing", "(nil)"),
                ("SET 10 x NX", "(nil)"),
                ("SET newkey x NX", "OK"),
                ("SET absent x XX", "(nil)"),
                ("GET absent", "(nil)"),
                ("SET newkey y XX", "OK"),
                ("SET newkey z GET", "\"y\""),
                ("SET newkey w NX GET", "\"z\""),
                ("SET k v EX 10", "(error) ERR SET with EX, PX, EXAT, PXAT or KEEPTTL is not supported: Flotilla keys do not expire (yet)"),
                ("SET k v KEEPTTL", "(error) ERR SET with EX, PX, EXAT, PXAT or KEEPTTL is not supported: Flotilla keys do not expire (yet)"),
                ("SETNX 10 q", "(integer) 0"),
                ("SETNX setnx q", "(integer) 1"),
                ("GETSET setnx r", "\"q\""),
                ("GETSET fresh r", "(nil)"),
                ("GETDEL fresh", "\"r\""),
                ("GETDEL fresh", "(nil)"),
                ("EXISTS 10 50 nothing 10", "(integer) 3"),
                ("STRLEN 90", "(integer) 1"),
                ("STRLEN nothing", "(integer) 0"),
                ("TYPE 90", "string"),
                ("TYPE nothing", "none"),
                ("MSET m1 1 m5 5 m9 9", "OK"),
                ("MGET 10 50 nothing d0", "1) \"a\"\n2) \"b\"\n3) (nil)\n4) \"d\""),
                ("DEL m1 m5 nothing", "(integer) 2"),
                ("UNLINK m9", "(integer) 1"),
                ("INCR counter", "(integer) 1"),
                ("INCRBY counter 41", "(integer) 42"),
                ("DECR counter", "(integer) 41"),
                ("DECRBY counter 50", "(integer) -9"),
                ("INCRBYFLOAT float 1.5", "\"1.5\""),
                ("INCRBYFLOAT float 0.25", "\"1.75\""),
                ("INCR 10", "(error) ERR value is not an integer or out of range"),
                ("INCRBYFLOAT 10 1", "(error) ERR value is not a valid float"),
                ("SET big 9223372036854775807", "OK"),
                ("INCR big", "(error) ERR increment or decrement would overflow"),
                ("APPEND app hello", "(integer) 5"),
                ("APPEND app \" world\"", "(integer) 11"),
                ("GET app", "\"hello world\""),
                ("SET \"\\x00meta\" v", "(error) ERR keys starting with the byte 0x00 are reserved for the cluster's own metadata"),
                ("GET \"\\x00meta\"", "(error) ERR keys starting with the byte 0x00 are reserved for the cluster's own metadata"),
                // 10, 50, 90, d0, newkey, setnx, counter, float, big, app.
                ("DBSIZE", "(integer) 10"),
                ("MSETNX msetnx1 1 msetnx2 2", "(integer) 1"),
                ("MSETNX msetnx2 x msetnx3 3", "(integer) 0"),
                ("EXISTS msetnx3", "(integer) 0"),
                ("MSETNX 10 x 50 y", "(error) CROSSSLOT Keys in request don't hash to the same slot"),
                ("DEL msetnx1 msetnx2", "(integer) 2"),
                ("GET", "(error) ERR wrong number of arguments for 'get' command"),
                ("SET onlykey", "(error) ERR wrong number of arguments for 'set' command"),
                ("MSET a", "(error) ERR wrong number of arguments for 'mset' command"),
                ("CLIENT SETNAME", "(error) ERR wrong number of arguments for 'client|setname' command"),
                ("FOO bar", "(error) ERR unknown command 'FOO', with args beginning with: 'bar' "),
                ("MULTI", "(error) ERR MULTI, EXEC, DISCARD and WATCH are not supported: Flotilla has no transactions across keys (yet)"),
                ("EXPIRE 10 5", "(error) ERR expiries are not supported: Flotilla keys do not expire (yet)"),
                ("CLIENT SETNAME tester", "OK"),
                ("CLIENT GETNAME", "\"tester\""),
                ("READONLY", "OK"),
                ("GET 50", "\"b\""),
                ("READWRITE", "OK"),
                ("GET d0", "\"d\""),
                ("AUTH pw", "(error) ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"),
            ],
        );

        // Another node's front door sees the same data: any address will do.
        check(p3, &[("GET 10", "\"a\""), ("GET d0", "\"d\""), ("GET counter", "\"-9\""), ("GET setnx", "\"r\"")]);

        // Introspection and the connection's own state, on one connection.
        let out = cli_script(
            p1,
            &["--no-raw"],
            "CLIENT ID\nCLIENT SETINFO LIB-NAME redis-py\nCLIENT SETINFO lib-ver 5.2.1\nCLIENT INFO\nCOMMAND COUNT\nCOMMAND DOCS get\nCOMMAND INFO get\nINFO\nINFO keyspace\nHELLO 3\nGET 10\nHELLO 2\n",
        );
        assert!(out.starts_with("(integer) "), "{out}");
        assert!(out.contains("id=") && out.contains("resp=2") && out.contains("cmd=client"), "{out}");
        assert!(out.contains("lib-name=redis-py lib-ver=5.2.1"), "CLIENT SETINFO shows in CLIENT INFO: {out}");
        assert!(out.contains("Returns the string value of a key"), "COMMAND DOCS: {out}");
        assert!(out.contains("redis_version:7.2.0") && out.contains("connected_clients:"), "{out}");
        assert!(out.contains("flotilla_shards:4"), "{out}");
        assert!(out.contains("\"proto\"") && out.contains("(integer) 3") && out.contains("\"standalone\""), "{out}");
        let info = cli_script(p1, &[], "INFO keyspace\n");
        assert!(info.contains("# Keyspace") && info.contains("flotilla_shards:4"), "{info}");

        // SCAN across shards (redis-cli's --scan loops over the cursors on one connection).
        let out = cli_script(p1, &["--scan"], "");
        let mut keys: Vec<&str> = out.lines().collect();
        keys.sort();
        for k in ["10", "50", "90", "d0", "counter", "app", "newkey"] {
            assert!(keys.contains(&k), "SCAN missed {k}: {keys:?}");
        }
        let out = cli_script(p1, &["--scan", "--pattern", "[15]0"], "");
        let mut matched: Vec<&str> = out.lines().collect();
        matched.sort();
        assert_eq!(matched, ["10", "50"]);
        // A cursor works on another connection of the same node (client pools do that).
        let first = cli_script(p1, &[], "SCAN 0 COUNT 2\n");
        let cursor = first.lines().next().expect("a cursor").to_string();
        assert_ne!(cursor, "0", "{first}");
        let next = cli_script(p1, &[], &format!("SCAN {cursor} COUNT 2\n"));
        assert!(next.lines().count() >= 1 && !next.contains("invalid cursor"), "{next}");
        let out = cli_script(p1, &["--no-raw"], "SCAN 0 COUNT 1000 MATCH d*\nSCAN 0 TYPE hash\nSCAN 18446744073709551615\nKEYS *0\n");
        assert!(out.contains("\"d0\""), "{out}");
        assert!(out.contains("(error) ERR invalid cursor"), "{out}");
        for k in ["10", "50", "90", "d0"] {
            assert!(out.contains(&format!("\"{k}\"")), "KEYS missed {k}: {out}");
        }

        // Pipelining: redis-cli --pipe sends everything at once, then counts the replies.
        let mut pipe = String::new();
        for i in 0..500 {
            let (k, v) = (format!("p{i:03}"), format!("v{i}"));
            pipe += &format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len());
        }
        let out = cli_script(p1, &["--pipe"], &pipe);
        assert!(out.contains("errors: 0, replies: 500"), "{out}");
        check(p3, &[("GET p499", "\"v499\""), ("STRLEN p000", "(integer) 2")]);

        // Many requests in one write, inline and array forms: answered in order.
        let mut many = Vec::new();
        let mut want = Vec::new();
        for i in 0..200 {
            many.extend_from_slice(format!("*2\r\n$3\r\nGET\r\n$4\r\np{i:03}\r\nECHO e{i}\r\n").as_bytes());
            want.extend_from_slice(format!("${}\r\nv{i}\r\n${}\r\ne{i}\r\n", 1 + i.to_string().len(), 1 + i.to_string().len()).as_bytes());
        }
        assert_eq!(String::from_utf8_lossy(&raw(a1, &many)), String::from_utf8_lossy(&want));

        // INCR is atomic: four connections adding at once lose nothing.
        let incrs = "INCR hot\n".repeat(100);
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let incrs = incrs.clone();
                std::thread::spawn(move || cli_script(p1, &[], &incrs))
            })
            .collect();
        for w in writers {
            assert_eq!(w.join().unwrap().lines().count(), 100);
        }
        check(p3, &[("GET hot", "\"400\"")]);

        // Pipelined requests on one key keep their order; on distinct keys they run at once.
        let out = raw(a1, b"SET pk 1\r\nINCR pk\r\nGET pk\r\nSET pk2 x\r\nAPPEND pk2 y\r\nGET pk2\r\nDEL pk pk2\r\nGET pk\r\n");
        assert_eq!(String::from_utf8_lossy(&out), "+OK\r\n:2\r\n$1\r\n2\r\n+OK\r\n:2\r\n$2\r\nxy\r\n:2\r\n$-1\r\n");
        // A value over Flotilla's 1 MiB limit is refused and the connection goes on; a bulk
        // string over the listener's limit (8 MiB) breaks the protocol and closes it.
        let big = vec![b'v'; (1 << 20) + 1];
        let mut request = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", big.len()).into_bytes();
        request.extend_from_slice(&big);
        request.extend_from_slice(b"\r\nPING\r\n");
        assert_eq!(
            String::from_utf8_lossy(&raw(a1, &request)),
            "-ERR value of 1048577 bytes exceeds the limit of 1048576 bytes\r\n+PONG\r\n"
        );
        assert_eq!(
            String::from_utf8_lossy(&raw(a1, b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$999999999\r\n")),
            "-ERR Protocol error: invalid bulk length\r\n"
        );
        // QUIT: OK, then closed (the PING after it is not answered).
        assert_eq!(raw(a1, b"QUIT\r\nPING\r\n"), b"+OK\r\n");
        // Half-closed: what was sent is answered, then the connection closes.
        assert_eq!(raw(a1, b"PING\r\n*1\r\n$4\r\nPING\r\n"), b"+PONG\r\n+PONG\r\n");
        // A protocol error: the error, then the connection closed (the PING after it is not
        // answered).
        assert_eq!(
            String::from_utf8_lossy(&raw(a1, b"PING\r\n*1\r\n$x\r\nPING\r\n")),
            "+PONG\r\n-ERR Protocol error: invalid bulk length\r\n"
        );
        assert_eq!(
            String::from_utf8_lossy(&raw(a1, b"*2\r\n:1\r\n")),
            "-ERR Protocol error: expected '$', got ':'\r\n"
        );
        // RESP3 after HELLO 3: a null and a map.
        let out = raw(a1, b"HELLO 3\r\nGET nothing\r\n");
        assert!(out.starts_with(b"%7\r\n") && out.ends_with(b"_\r\n"), "{}", String::from_utf8_lossy(&out));
    })
    .await
    .unwrap();

    // Routing inside the node: split a shard (node 1's map changes under the front door) and
    // hand every shard's leadership to node 2, which has no front door: every request through
    // node 1 or 3 is now forwarded to the leader, after a redirect or a stale epoch.
    let client = &_client;
    let split = client.admin(AdminRequest::Split { key: b"95".to_vec() }).await;
    assert!(matches!(split, Ok(AdminResponse::Changed(_))), "{split:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shards: Vec<_> = cluster.node(1).meta_view().map.shards().map(|d| d.id).collect();
        let mut led_by_2 = 0;
        for shard in &shards {
            let _ = client.admin(AdminRequest::TransferLeader { shard: *shard, node: NodeId(2) }).await;
        }
        let infos = cluster.node(2).host().group_info().await.unwrap_or_default();
        for shard in &shards {
            led_by_2 += usize::from(infos.iter().any(|i| i.group == *shard && i.role == Role::Leader));
        }
        if shards.len() == 5 && led_by_2 == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "node 2 never led the 5 shards ({led_by_2} of {})", shards.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served_by_2 = cluster.node(2).stats().requests.load(Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        check(
            p1,
            &[
                ("GET 10", "\"a\""),
                ("SET 96 after-split", "OK"),
                ("GET 96", "\"after-split\""),
                ("INCR counter", "(integer) -8"),
                ("MGET 10 50 90 96 d0", "1) \"a\"\n2) \"b\"\n3) \"c\"\n4) \"after-split\"\n5) \"d\""),
            ],
        );
        check(p3, &[("GET 96", "\"after-split\""), ("SET d1 e", "OK"), ("GET d1", "\"e\"")]);

        // The connection limit (4 on node 3): the fifth is told so and closed.
        let held: Vec<TcpStream> = (0..4)
            .map(|_| {
                let mut c = TcpStream::connect(a3).unwrap();
                c.write_all(b"PING\r\n").unwrap();
                let mut pong = [0u8; 7];
                c.read_exact(&mut pong).unwrap();
                c
            })
            .collect();
        let mut refused = Vec::new();
        let mut fifth = TcpStream::connect(a3).unwrap();
        fifth.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        fifth.read_to_end(&mut refused).unwrap();
        assert_eq!(refused, b"-ERR max number of clients reached\r\n");
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cli_script(p3, &[], "INFO clients\n").contains("maxclients:4") {
            assert!(Instant::now() < deadline, "node 3's connections were not freed");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let forwarded = cluster.node(2).stats().requests.load(Ordering::Relaxed) - served_by_2;
    assert!(forwarded >= 12, "node 2 served only {forwarded} requests: the front doors did not forward to it");

    // Counted per command, shown in /metrics.
    let metrics = cluster.node(1).metrics_text().await;
    assert!(cluster.node(1).resp_metrics().calls("set") >= 500);
    assert!(metrics.contains("flotilla_resp_commands_total{node=\"1\",command=\"get\"}"), "{metrics}");
    assert!(metrics.contains("flotilla_resp_command_errors_total{node=\"1\",command=\"incr\"} 2"), "{metrics}");
    assert!(metrics.contains("flotilla_resp_protocol_errors_total{node=\"1\"} 3"), "{metrics}");
    assert!(
        metrics.contains("flotilla_resp_command_seconds_bucket{node=\"1\",command=\"set\",le=\"+Inf\"}"),
        "{metrics}"
    );
}

/// A one-node cluster with the front door on node 1; its address.
async fn one_node_front_door() -> (Cluster, SocketAddr) {
    common::cluster::one_node_front_door_with(|resp| resp.plaintext_loopback = true).await
}

/// A web page can make a browser POST to a loopback port without asking first; the body's
/// lines must not run as commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_post_from_a_browser_runs_no_command() {
    let (_cluster, addr) = one_node_front_door().await;
    let http = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 22\r\n\
                 Origin: http://evil.example\r\n\r\nSET pwned by-a-browser\r\n";
    let got = tokio::task::spawn_blocking(move || raw(addr, http)).await.expect("task");
    assert!(got.is_empty(), "answered: {}", String::from_utf8_lossy(&got));
    let check = tokio::task::spawn_blocking(move || raw(addr, b"GET pwned\r\n")).await.expect("task");
    assert_eq!(check, b"$-1\r\n", "the POST body ran: {}", String::from_utf8_lossy(&check));
}

/// MGET holds its whole reply before sending it: past a bound it is refused, not built.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mget_whose_reply_would_pass_the_bound_is_refused() {
    let (_cluster, addr) = one_node_front_door().await;
    let value = "v".repeat(64 << 10);
    let set = format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{value}\r\n", value.len());
    let stored = tokio::task::spawn_blocking(move || raw(addr, set.as_bytes())).await.expect("task");
    assert_eq!(stored, b"+OK\r\n");
    // 1,100 copies of a 64 KiB value: past the 64 MiB bound.
    let n = 1_100;
    let mut req = format!("*{}\r\n$4\r\nMGET\r\n", n + 1);
    for _ in 0..n {
        req.push_str("$1\r\nk\r\n");
    }
    let got = tokio::task::spawn_blocking(move || raw(addr, req.as_bytes())).await.expect("task");
    assert!(
        got.starts_with(b"-ERR MGET answers"),
        "{} bytes: {:?}",
        got.len(),
        String::from_utf8_lossy(&got[..got.len().min(80)])
    );
}

/// MSET and DEL check every key (and value) before changing any: a bad one later in the
/// command leaves nothing half done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mset_with_a_bad_key_later_changes_nothing() {
    let (_cluster, addr) = one_node_front_door().await;
    let mset = b"*5\r\n$4\r\nMSET\r\n$5\r\nfirst\r\n$1\r\n1\r\n$4\r\n\x00bad\r\n$1\r\n2\r\n";
    let got = tokio::task::spawn_blocking(move || raw(addr, mset)).await.expect("task");
    assert!(got.starts_with(b"-ERR"), "{:?}", String::from_utf8_lossy(&got));
    let check = tokio::task::spawn_blocking(move || raw(addr, b"GET first\r\n")).await.expect("task");
    assert_eq!(check, b"$-1\r\n", "the pair before the bad key was written");
    let set = tokio::task::spawn_blocking(move || raw(addr, b"SET first 1\r\n")).await.expect("task");
    assert_eq!(set, b"+OK\r\n");
    let del = b"*3\r\n$3\r\nDEL\r\n$5\r\nfirst\r\n$4\r\n\x00bad\r\n";
    let got = tokio::task::spawn_blocking(move || raw(addr, del)).await.expect("task");
    assert!(got.starts_with(b"-ERR"), "{:?}", String::from_utf8_lossy(&got));
    let check = tokio::task::spawn_blocking(move || raw(addr, b"GET first\r\n")).await.expect("task");
    assert_eq!(check, b"$1\r\n1\r\n", "the key before the bad one was deleted");
}

/// A client that sends its whole pipeline before reading any reply (redis-py's `execute`)
/// is answered, though both the requests and the replies pass the socket buffers long before
/// it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_sent_whole_before_any_reply_is_read_is_answered() {
    let (_cluster, addr) = one_node_front_door().await;
    // 2,000 ECHOs of 8 KiB: 16 MiB each way.
    let (n, payload) = (2_000, "e".repeat(8 << 10));
    let one = format!("*2\r\n$4\r\nECHO\r\n${}\r\n{payload}\r\n", payload.len());
    let pipeline = one.repeat(n);
    let started = Instant::now();
    let got = tokio::task::spawn_blocking(move || raw(addr, pipeline.as_bytes())).await.expect("task");
    let reply = format!("${}\r\n{payload}\r\n", payload.len());
    assert_eq!(got.len(), n * reply.len(), "replies after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

/// One RESP reply line (`+OK`, `-ERR ...`, `$N` header), without its CRLF.
fn reply_line(r: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("a reply");
    line.trim_end().to_string()
}

/// A client of the front door keeps writing while the shard under its keys splits three times
/// and every shard's leader moves: each SET is answered OK (the front door follows the new map
/// and leaders by itself), and every key answered OK reads back its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sets_during_splits_and_leader_transfers_are_all_answered_and_all_read_back() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let cluster = common::cluster::three_nodes_with_front_doors(&[1]).await;
    let admin = cluster.client().await;
    let addr = cluster.node(1).resp_addr().expect("node 1 serves redis");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let sock = TcpStream::connect(addr).expect("connect");
            sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut out = sock.try_clone().unwrap();
            let mut replies = std::io::BufReader::new(sock);
            let (mut ok, mut refused) = (Vec::new(), Vec::new());
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && i < 100_000 {
                let (key, value) = (format!("w:{i:05}"), format!("v{i}"));
                let cmd = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n", key.len(), value.len());
                out.write_all(cmd.as_bytes()).unwrap();
                match reply_line(&mut replies).as_str() {
                    "+OK" => ok.push(i),
                    other => refused.push(format!("{key}: {other}")),
                }
                i += 1;
            }
            (ok, refused)
        })
    };
    // The writes go to the shard holding "w:..." (every key from "80" on): split it three
    // times inside the keys being written, and move every shard's leader after each split.
    for round in 1..=3u32 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        common::cluster::split_and_move_leaders(&admin, format!("w:{:05}", round * 150).as_bytes()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, refused) = writer.await.expect("writer");
    assert!(refused.is_empty(), "SETs refused during the changes: {refused:?}");
    assert!(ok.len() >= 100, "too few writes went through the changes: {}", ok.len());
    eprintln!("{} SETs answered OK through three splits and the leader transfers", ok.len());
    let Ok(AdminResponse::Shards(rows)) = admin.admin(AdminRequest::Shards).await else { panic!("shards") };
    assert_eq!(rows.len(), 5, "{rows:?}");
    tokio::task::spawn_blocking(move || {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = sock.try_clone().unwrap();
        let mut replies = std::io::BufReader::new(sock);
        for i in ok {
            let key = format!("w:{i:05}");
            out.write_all(format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes()).unwrap();
            let header = reply_line(&mut replies);
            assert!(header.starts_with('$') && header != "$-1", "{key}: {header}");
            assert_eq!(reply_line(&mut replies), format!("v{i}"), "{key}");
        }
    })
    .await
    .expect("read back");
}

/// `MSETNX`'s request on the client protocol: refused by the serving node when its keys span
/// shards (whatever the front door's map said), and a tenant's checked key by key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_of_keys_of_several_shards_or_outside_a_prefix_is_refused_by_the_serving_node() {
    use flotilla::transport::{ClientIdentity, Grant, PeerIdentity, Role};
    use flotilla::wire::{Request, Response};
    let cluster = Cluster::start(1, 4).await;
    let _client = cluster.client().await;
    let node = cluster.node(1);
    let d = node.meta_view().map.lookup(b"10").cloned().expect("routed");
    let insert = |pairs: &[(&str, &str)]| Request::InsertAll {
        shard: d.id,
        epoch: d.epoch,
        pairs: pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect(),
    };
    let me = PeerIdentity::Node(NodeId(1));
    // The shard may have no leader yet: wait for one with a read.
    let deadline = Instant::now() + Duration::from_secs(20);
    let get = || Request::Get { shard: d.id, epoch: d.epoch, key: b"10".to_vec(), consistency: Default::default() };
    while !matches!(node.handle(&me, get()).await, Response::Value(_)) {
        assert!(Instant::now() < deadline, "shard {} has no leader", d.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let across = node.handle(&me, insert(&[("10", "a"), ("50", "b")])).await;
    assert_eq!(across, Response::Invalid("CROSSSLOT Keys in request don't hash to the same slot".into()));
    assert_eq!(node.handle(&me, insert(&[("10", "a"), ("11", "b")])).await, Response::Written { previous: None });
    assert!(matches!(node.handle(&me, insert(&[("11", "x"), ("12", "y")])).await, Response::CasFailed { .. }));
    let tenant = PeerIdentity::Client(ClientIdentity {
        name: "t".into(),
        grant: Some(Grant::with_prefix(Role::ReadWrite, b"1".to_vec())),
    });
    let refused = node.handle(&tenant, insert(&[("13", "a"), ("21", "b")])).await;
    assert!(matches!(&refused, Response::Denied(e) if e.contains("may not insert key \"21\"")), "{refused:?}");
    assert_eq!(node.handle(&tenant, insert(&[("13", "a"), ("14", "b")])).await, Response::Written { previous: None });
}

/// A listener without users acts as Redis's `default` user with `nopass`: `AUTH default` and
/// `HELLO 3 AUTH default` with any password succeed (and change nothing); another user name is
/// a wrong pair, and `AUTH password` alone is Redis's error for a default user without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_as_default_with_any_password_succeeds_on_a_listener_without_users() {
    let (_cluster, addr) = one_node_front_door().await;
    let script = b"AUTH default anything\r\nAUTH anything\r\nAUTH someone anything\r\nSET k v\r\n\
                   HELLO 3 AUTH default x\r\nGET k\r\n";
    let got = tokio::task::spawn_blocking(move || raw(addr, script)).await.expect("task");
    let got = String::from_utf8_lossy(&got);
    let expected_start = "+OK\r\n\
         -ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n\
         -WRONGPASS invalid username-password pair or user is disabled.\r\n\
         +OK\r\n%7\r\n";
    assert!(got.starts_with(expected_start), "{got}");
    assert!(got.contains("$5\r\nproto\r\n:3\r\n"), "{got}");
    assert!(got.ends_with("$1\r\nv\r\n"), "{got}");
}

/// `MSETNX` is one transaction: more keys or bytes than one may hold is refused by the front
/// door at once with the reason, also when the shard's leader is another node (whose answer
/// the request would not even fit the transport to ask for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_msetnx_larger_than_a_transaction_is_refused_at_once_with_the_reason() {
    // The front door on node 1; the only replica of every shard on node 2.
    let cluster = Cluster::start_with(2, &[1], &[2], Vec::new(), |cfg| {
        if cfg.id == NodeId(1) {
            let mut resp = RespConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
            resp.plaintext_loopback = true;
            cfg.resp = Some(resp);
        }
    })
    .await;
    let _client = cluster.client().await;
    let addr = cluster.node(1).resp_addr().expect("front door");
    let request = |pairs: &[(String, Vec<u8>)]| {
        let mut req = format!("*{}\r\n$6\r\nMSETNX\r\n", 1 + 2 * pairs.len()).into_bytes();
        for (k, v) in pairs {
            req.extend_from_slice(format!("${}\r\n{k}\r\n${}\r\n", k.len(), v.len()).as_bytes());
            req.extend_from_slice(v);
            req.extend_from_slice(b"\r\n");
        }
        req
    };
    let send = |req: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let got = raw(addr, &req);
            (String::from_utf8_lossy(&got).into_owned(), started.elapsed())
        })
    };
    // A small one is set, by the remote leader.
    let (got, _) = send(request(&[("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())])).await.expect("task");
    assert_eq!(got, ":1\r\n");
    // Five values of 1 MiB each (each within the value limit): more than the transport carries.
    let mib = flotilla::shard::VALUE_BYTES_MAX;
    let big: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("big{i}"), vec![b'v'; mib])).collect();
    let (got, took) = send(request(&big)).await.expect("task");
    assert!(got.starts_with("-ERR MSETNX") && got.contains(&format!("exceeds the limit of {mib}")), "{got}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}: {got}");
    // Two values of 600 KiB: within the transport, above the transaction's bytes.
    let two: Vec<(String, Vec<u8>)> = (0..2).map(|i| (format!("two{i}"), vec![b'v'; 600 << 10])).collect();
    let (got, took) = send(request(&two)).await.expect("task");
    assert!(got.starts_with("-ERR MSETNX") && got.contains("bytes exceeds the limit"), "{got}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}: {got}");
    // More keys than one transaction writes.
    let many: Vec<(String, Vec<u8>)> =
        (0..=flotilla::shard::TXN_WRITES_MAX).map(|i| (format!("m{i}"), b"v".to_vec())).collect();
    let (got, _) = send(request(&many)).await.expect("task");
    assert!(got.starts_with("-ERR MSETNX") && got.contains("writes exceeds the limit"), "{got}");
    // Nothing of them was set.
    let (got, _) = send(b"EXISTS big0 two0 m0\r\n".to_vec()).await.expect("task");
    assert_eq!(got, ":0\r\n");
}

/// The real `redis-cli`, one connection fed a loop of SETs on its standard input, while the
/// shard under the keys splits twice and every shard's leader moves after each split: the
/// client sees no error (every reply `OK`), and every key reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cli_loop_sees_no_error_through_splits_and_leader_moves() {
    let cluster = common::cluster::three_nodes_with_front_doors(&[1]).await;
    let admin = cluster.client().await;
    let port = cluster.node(1).resp_addr().expect("node 1 serves redis").port();
    const SETS: usize = 3_000;
    let script: String = (0..SETS).map(|i| format!("SET cli:{i:05} v{i}\n")).collect();
    let cli = tokio::task::spawn_blocking(move || common::redis_cli(port, &[], &script));
    for at in ["cli:00400", "cli:01200"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        common::cluster::split_and_move_leaders(&admin, at.as_bytes()).await;
    }
    let out =
        tokio::time::timeout(Duration::from_secs(180), cli).await.expect("redis-cli ends").expect("redis-cli ran");
    assert!(out.status.success(), "redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
    let replies = String::from_utf8_lossy(&out.stdout);
    let not_ok: Vec<&str> = replies.lines().filter(|l| *l != "OK").collect();
    assert!(not_ok.is_empty(), "replies other than OK: {:?}", &not_ok[..not_ok.len().min(10)]);
    assert_eq!(replies.lines().count(), SETS, "one reply per SET");
    let Ok(AdminResponse::Shards(rows)) = admin.admin(AdminRequest::Shards).await else { panic!("shards") };
    assert_eq!(rows.len(), 4, "both splits happened: {rows:?}");
    let gets: String = (0..SETS).map(|i| format!("GET cli:{i:05}\n")).collect();
    let back = tokio::task::spawn_blocking(move || common::redis_cli(port, &[], &gets)).await.expect("redis-cli");
    let values: Vec<String> = String::from_utf8_lossy(&back.stdout).lines().map(str::to_string).collect();
    let expected: Vec<String> = (0..SETS).map(|i| format!("v{i}")).collect();
    assert_eq!(values, expected, "every SET reads back");
}
