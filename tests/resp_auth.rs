//! The Redis front door's security end to end (issue 15), with the real `redis-cli`: TLS with
//! the cluster's client certificates (required without users, optional with them), a
//! certificate from another CA refused, password users (`AUTH`, `HELLO 3 AUTH`, `-NOAUTH`,
//! `-WRONGPASS`), roles and prefixes (`-NOPERM`, `KEYS`/`SCAN`/`DBSIZE` clamped to a tenant's
//! prefix), the listener rule checked at start, and `MSETNX`, `DBSIZE`, `TIME`.
//!
//! One 3-node cluster of 4 shards (split at "40", "80", "c0"), three front doors:
//! node 1 TLS without users, node 2 plaintext with users, node 3 TLS with users.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::cluster::Cluster;
use flotilla::raft::NodeId;
use flotilla::resp_server::{sha256, RespConfig, User, Users};
use flotilla::transport::{Grant, Role};

fn redis_cli_present() -> bool {
    Command::new("redis-cli").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn users() -> Users {
    let user = |name: &str, password: &str, role: &str, prefix: Option<&[u8]>| {
        User::new(name, &hex(&sha256(password.as_bytes())), role, prefix).expect("user")
    };
    Users::new(vec![
        user("app", "app-secret", "readwrite", None),
        user("viewer", "viewer-secret", "readonly", None),
        user("tenant", "tenant-secret", "readwrite", Some(b"tenant1/")),
        user("default", "default-secret", "admin", None),
    ])
    .expect("users")
}

/// redis-cli's `--tls` arguments for a client certificate (`cert`: certificate and key files).
fn tls_args(ca: &Path, cert: Option<&(PathBuf, PathBuf)>) -> Vec<String> {
    let mut args = vec!["--tls".to_string(), "--cacert".into(), ca.display().to_string()];
    if let Some((c, k)) = cert {
        args.extend(["--cert".into(), c.display().to_string(), "--key".into(), k.display().to_string()]);
    }
    args
}

/// Runs `redis-cli -p PORT --no-raw ARGS` with `script` on its standard input (one connection,
/// one command a line): its standard output and error.
fn cli(port: u16, args: &[String], script: &str) -> (String, String) {
    let args: Vec<&str> = std::iter::once("--no-raw").chain(args.iter().map(String::as_str)).collect();
    let out = common::redis_cli(port, &args, script);
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Each line of `script` with the one-line reply `redis-cli --no-raw` prints for it.
fn check(port: u16, args: &[String], pairs: &[(&str, &str)]) {
    let script: String = pairs.iter().map(|(cmd, _)| format!("{cmd}\n")).collect();
    let (out, err) = cli(port, args, &script);
    // redis-cli's timing line after a slow reply (`(0.94s)`) is not a reply.
    let is_timing =
        |l: &str| l.strip_prefix('(').and_then(|l| l.strip_suffix("s)")).is_some_and(|n| n.parse::<f64>().is_ok());
    let got: Vec<&str> = out.lines().filter(|l| !is_timing(l)).collect();
    for (i, (cmd, want)) in pairs.iter().enumerate() {
        assert_eq!(got.get(i).copied(), Some(*want), "reply to {cmd}\nwhole output:\n{out}\nstderr:\n{err}");
    }
    assert_eq!(got.len(), pairs.len(), "more output than expected:\n{out}");
}

/// redis-cli could not talk to the server: no reply to PING.
fn refused(port: u16, args: &[String]) -> String {
    let (out, err) = cli(port, args, "PING\n");
    assert!(!out.contains("PONG"), "answered although it should be refused:\n{out}\n{err}");
    format!("{out}{err}")
}

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|i| i.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cli_with_certificates_and_passwords() {
    if !redis_cli_present() {
        // .ci/run installs redis-tools; say loudly where it is missing.
        eprintln!("NOT RUN: redis-cli is not installed (apt-get install redis-tools)");
        return;
    }
    let cluster = Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], flotilla::meta::dev_split_keys(4), |cfg| {
        let mut resp = RespConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        match cfg.id {
            NodeId(1) => resp.tls = true,
            NodeId(2) => resp.users = users(),
            _ => {
                resp.tls = true;
                resp.users = users();
            }
        }
        cfg.resp = Some(resp);
    })
    .await;
    let _client = cluster.client().await;
    let port = |id: u64| cluster.node(id).resp_addr().expect("front door").port();
    let (p1, p2, p3) = (port(1), port(2), port(3));

    // Client certificates of the cluster's CA, and one of another CA.
    let certs = cluster.dev.certs_dir();
    let ca = certs.join("ca.pem");
    let issue = |name: &str, grant: Grant| flotilla::cluster::issue_client(&certs, name, grant).expect("issue");
    let admin = issue("ops", Grant::new(Role::Admin));
    let reader = issue("reader", Grant::new(Role::ReadOnly));
    let tenant = issue("tenant-a", Grant::with_prefix(Role::ReadWrite, b"tenant1/".to_vec()));
    let other = tempfile::tempdir().expect("tempdir");
    flotilla::cluster::create_ca(other.path()).expect("another CA");
    let stranger = flotilla::cluster::issue_client(other.path(), "stranger", Grant::new(Role::Admin)).expect("issue");

    tokio::task::spawn_blocking(move || {
        // Node 1, TLS without users: the certificate decides.
        check(p1, &tls_args(&ca, Some(&admin)), &[("PING", "PONG"), ("SET 10 a", "OK"), ("GET 10", "\"a\"")]);
        check(
            p1,
            &tls_args(&ca, Some(&reader)),
            &[
                ("GET 10", "\"a\""),
                (
                    "SET 10 b",
                    "(error) NOPERM this user has no permissions to run the 'set' command (user cert:reader has role readonly, which may not write)",
                ),
                ("GET 10", "\"a\""),
            ],
        );
        check(
            p1,
            &tls_args(&ca, Some(&tenant)),
            &[
                ("SET tenant1/x 1", "OK"),
                (
                    "GET 10",
                    "(error) NOPERM this user has no permissions to access one of the keys used as arguments (user cert:tenant-a is limited to keys starting with \"tenant1/\"; \"10\" is not)",
                ),
                ("KEYS *", "1) \"tenant1/x\""),
                ("DBSIZE", "(integer) 1"),
            ],
        );
        // A pipeline over TLS: 2,000 SETs sent whole (redis-cli --pipe), every one answered.
        let mut pipe = String::new();
        for i in 0..2000 {
            let (k, v) = (format!("p{i:04}"), "v".repeat(100));
            pipe += &format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len());
        }
        let (out, err) = cli(p1, &[tls_args(&ca, Some(&admin)), s(&["--pipe"])].concat(), &pipe);
        assert!(out.contains("errors: 0, replies: 2000"), "{out}{err}");
        check(p1, &tls_args(&ca, Some(&admin)), &[("STRLEN p1999", "(integer) 100"), ("DEL p0000", "(integer) 1")]);
        // A certificate of another CA, none, or no TLS at all: no conversation.
        // (With TLS 1.3 the client learns of the refusal of its certificate after its side of
        // the handshake: "Server closed the connection". A plaintext client gets a TLS alert.)
        assert!(refused(p1, &tls_args(&ca, Some(&stranger))).contains("Server closed the connection"));
        assert!(refused(p1, &tls_args(&ca, None)).contains("Server closed the connection"));
        assert!(refused(p1, &[]).contains("Protocol error"));

        // Node 2, plaintext with users: nothing but AUTH, HELLO, PING and QUIT before AUTH.
        check(
            p2,
            &[],
            &[
                ("PING", "PONG"),
                ("GET 10", "(error) NOAUTH Authentication required."),
                ("SET 10 z", "(error) NOAUTH Authentication required."),
                ("CLIENT ID", "(error) NOAUTH Authentication required."),
                ("NOSUCHCOMMAND", "(error) NOAUTH Authentication required."),
                ("HELLO 3", "(error) NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"),
                ("AUTH app wrong", "(error) WRONGPASS invalid username-password pair or user is disabled."),
                ("AUTH nobody app-secret", "(error) WRONGPASS invalid username-password pair or user is disabled."),
                ("AUTH viewer-secret", "(error) WRONGPASS invalid username-password pair or user is disabled."),
                ("GET 10", "(error) NOAUTH Authentication required."),
                ("AUTH app app-secret", "OK"),
                ("GET 10", "\"a\""),
                ("SET 11 b", "OK"),
                // A failed AUTH leaves the connection as it was.
                ("AUTH app nope", "(error) WRONGPASS invalid username-password pair or user is disabled."),
                ("GET 11", "\"b\""),
            ],
        );
        // redis-cli's own --user/--pass, and AUTH PASSWORD for the default user.
        let viewer = s(&["--user", "viewer", "--pass", "viewer-secret"]);
        check(
            p2,
            &viewer,
            &[
                ("GET 11", "\"b\""),
                (
                    "INCR 11",
                    "(error) NOPERM this user has no permissions to run the 'incr' command (user viewer has role readonly, which may not write)",
                ),
                ("MSETNX v1 1", "(error) NOPERM this user has no permissions to run the 'msetnx' command (user viewer has role readonly, which may not write)"),
            ],
        );
        check(p2, &s(&["-a", "default-secret"]), &[("SET 12 c", "OK")]);
        check(p2, &[], &[("AUTH default-secret", "OK"), ("DEL 12", "(integer) 1")]);
        // HELLO 3 AUTH: authenticated and switched to RESP3 at once.
        let (out, err) = cli(p2, &[], "HELLO 3 AUTH tenant tenant-secret\nSET tenant1/y 2\nSET tenant2/y 2\n");
        assert!(out.contains("\"proto\"") && out.contains("(integer) 3"), "{out}{err}");
        assert!(out.contains("OK"), "{out}");
        assert!(out.contains("NOPERM this user has no permissions to access one of the keys used as arguments"), "{out}");
        let (out, _) = cli(p2, &[], "HELLO 3 AUTH tenant wrong\n");
        assert!(out.contains("WRONGPASS invalid username-password pair or user is disabled."), "{out}");
        // A tenant sees its prefix only: KEYS, SCAN and DBSIZE are clamped to it.
        let as_tenant = s(&["--user", "tenant", "--pass", "tenant-secret"]);
        let (out, _) = cli(p2, &as_tenant, "KEYS *\nDBSIZE\n");
        assert_eq!(out.lines().collect::<Vec<_>>(), ["1) \"tenant1/x\"", "2) \"tenant1/y\"", "(integer) 2"], "{out}");
        let (out, err) = cli(p2, &[as_tenant.clone(), s(&["--scan"])].concat(), "");
        let mut scanned: Vec<&str> = out.lines().collect();
        scanned.sort();
        assert_eq!(scanned, ["\"tenant1/x\"", "\"tenant1/y\""], "{out}{err}");

        // Node 3, TLS with users: a certificate is optional; without one, AUTH.
        let (out, _) = cli(p3, &tls_args(&ca, Some(&reader)), "CLIENT INFO\n");
        assert!(out.contains(" user=cert:reader "), "{out}");
        check(
            p3,
            &tls_args(&ca, None),
            &[
                ("GET 10", "(error) NOAUTH Authentication required."),
                ("AUTH app app-secret", "OK"),
                ("GET 10", "\"a\""),
            ],
        );
        check(
            p3,
            &tls_args(&ca, Some(&reader)),
            &[
                ("GET 11", "\"b\""),
                (
                    "DEL 11",
                    "(error) NOPERM this user has no permissions to run the 'del' command (user cert:reader has role readonly, which may not write)",
                ),
            ],
        );
        assert!(refused(p3, &tls_args(&ca, Some(&stranger))).contains("Server closed the connection"));
        assert!(refused(p3, &[]).contains("Protocol error"));

        // MSETNX: atomic within one shard ("10", "11", "12", "13" share one), CROSSSLOT across.
        let admin_tls = tls_args(&ca, Some(&admin));
        check(
            p1,
            &admin_tls,
            &[
                ("MSETNX 12 x 13 y", "(integer) 1"),
                ("MSETNX 13 q 14 r", "(integer) 0"),
            ],
        );
        let (out, _) = cli(p1, &admin_tls, "MGET 12 13 14\nMSETNX 15 a 50 b\nEXISTS 15 50\nMSETNX 16 a 16 b\nGET 16\n");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "1) \"x\"",
                "2) \"y\"",
                "3) (nil)",
                "(error) CROSSSLOT Keys in request don't hash to the same slot",
                "(integer) 0",
                "(integer) 1",
                "\"b\"",
            ],
            "{out}"
        );
        // DBSIZE: every key of every shard (10, 11, 12, 13, 16, tenant1/x, tenant1/y, and
        // p0001..p1999 of the pipeline).
        check(p1, &admin_tls, &[("DBSIZE", "(integer) 2006")]);
        // TIME: seconds and microseconds, as bulk strings, now.
        let (out, _) = cli(p1, &admin_tls, "TIME\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let number = |line: &str, prefix: &str| -> u64 {
            line.strip_prefix(prefix).and_then(|l| l.trim_matches('"').parse().ok()).unwrap_or_else(|| panic!("{out}"))
        };
        let secs = number(lines[0], "1) ");
        let micros = number(lines[1], "2) ");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        assert!(secs.abs_diff(now) <= 5 && micros < 1_000_000, "{out}");
    })
    .await
    .expect("redis-cli checks");

    // Refusals were counted.
    let mut text = String::new();
    for id in 1..=3 {
        text.push_str(&cluster.node(id).metrics_text().await);
    }
    for counter in
        ["flotilla_resp_tls_refused_total", "flotilla_resp_auth_failures_total", "flotilla_resp_denied_total"]
    {
        assert!(text.lines().any(|l| l.starts_with(counter) && !l.ends_with(" 0")), "{counter} not counted:\n{text}");
    }
}

#[tokio::test]
async fn a_listener_outside_loopback_without_tls_or_users_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    flotilla::cluster::create_ca(dir.path()).expect("CA");
    flotilla::cluster::issue_node(dir.path(), NodeId(1)).expect("node certificate");
    let tls = flotilla::cluster::node_tls(dir.path(), NodeId(1)).expect("node identity");
    let mut cfg = RespConfig::new(SocketAddr::from(([0, 0, 0, 0], 0)));
    cfg.plaintext_loopback = true;
    let err = flotilla::resp_server::bind(&cfg, &tls).await.expect_err("plaintext outside loopback");
    assert!(err.contains("must authenticate its clients") && err.contains("resp_tls = true"), "{err}");
    // With TLS, or with users, the same address is allowed.
    cfg.tls = true;
    assert!(flotilla::resp_server::bind(&cfg, &tls).await.is_ok());
    cfg.tls = false;
    cfg.users = users();
    assert!(flotilla::resp_server::bind(&cfg, &tls).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_to_new_redis_connections() {
    if !redis_cli_present() {
        eprintln!("NOT RUN: redis-cli is not installed (apt-get install redis-tools)");
        return;
    }
    let cluster = Cluster::start_with(1, &[1], &[1], Vec::new(), |cfg| {
        let mut resp = RespConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        resp.tls = true;
        cfg.resp = Some(resp);
    })
    .await;
    let _client = cluster.client().await;
    let port = cluster.node(1).resp_addr().expect("front door").port();
    let certs = cluster.dev.certs_dir();
    let ca = certs.join("ca.pem");
    // A client of a second CA, which the node does not trust yet.
    let new = tempfile::tempdir().expect("tempdir");
    flotilla::cluster::create_ca(new.path()).expect("new CA");
    let newcomer = flotilla::cluster::issue_client(new.path(), "newcomer", Grant::new(Role::ReadWrite)).expect("issue");
    let args = tls_args(&ca, Some(&newcomer));
    let before = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || refused(port, &args)).await.expect("redis-cli")
    };
    assert!(before.contains("Server closed the connection"), "{before}");
    // Both CAs trusted from now on (step 1 of a move to a new CA, as SIGHUP does it).
    let read = |p: &Path| std::fs::read_to_string(p).expect("read PEM");
    let (cert, key) = flotilla::cluster::node_cert_paths(&certs, NodeId(1));
    let both = format!("{}{}", read(&ca), read(&new.path().join("ca.pem")));
    // But first a reload that is refused (a certificate naming another node): all or nothing,
    // the front door does not take the new CA either.
    flotilla::cluster::issue_node(new.path(), NodeId(2)).expect("node 2's certificate");
    let (cert2, key2) = flotilla::cluster::node_cert_paths(new.path(), NodeId(2));
    let wrong = flotilla::transport::cert::TlsIdentity::from_pem(&both, &read(&cert2), &read(&key2)).expect("identity");
    assert!(cluster.node(1).reload_tls(wrong).is_err(), "a certificate of node 2 taken by node 1");
    let after = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || refused(port, &args)).await.expect("redis-cli")
    };
    assert!(after.contains("Server closed the connection"), "{after}");
    let tls = flotilla::transport::cert::TlsIdentity::from_pem(&both, &read(&cert), &read(&key)).expect("identity");
    cluster.node(1).reload_tls(tls).expect("reload");
    tokio::task::spawn_blocking(move || check(port, &args, &[("SET n 1", "OK"), ("GET n", "\"1\"")]))
        .await
        .expect("redis-cli");
}

// ---------------------------------------------------------------------------------------------
// Limits of clients that have not authenticated, and what is each principal's own, on raw
// connections (no redis-cli needed): a listener on one node, plaintext on loopback with users.

/// One reply, as read off the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Reply>),
}

impl Reply {
    fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    fn error(&self) -> &str {
        match self {
            Reply::Error(e) => e,
            other => panic!("not an error: {other:?}"),
        }
    }

    fn text(&self) -> String {
        match self {
            Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            Reply::Simple(s) => s.clone(),
            other => panic!("not text: {other:?}"),
        }
    }

    fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(items) => items,
            other => panic!("not an array: {other:?}"),
        }
    }
}

const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// A connection that sends requests as RESP arrays and reads replies one by one (blocking).
struct Raw {
    sock: std::io::BufReader<std::net::TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).expect("timeout");
        Raw { sock: std::io::BufReader::new(sock) }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.sock.get_mut().write_all(bytes).expect("send");
    }

    fn cmd(&mut self, args: &[&[u8]]) -> Reply {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.send(&req);
        self.reply()
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self.sock.read_line(&mut line).expect("a reply");
        assert!(n > 0, "the server closed the connection");
        line.trim_end_matches("\r\n").to_string()
    }

    /// One line, or `None` once the server has closed the connection.
    fn try_line(&mut self) -> Option<String> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.sock.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches("\r\n").to_string()),
        }
    }

    fn reply(&mut self) -> Reply {
        use std::io::Read;
        let line = self.line();
        let (kind, rest) = line.split_at(1);
        let n = || rest.parse::<i64>().unwrap_or_else(|_| panic!("bad header {line:?}"));
        match kind {
            "+" => Reply::Simple(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(n()),
            "_" => Reply::Null,
            "$" | "=" if n() < 0 => Reply::Null,
            "$" | "=" => {
                let mut data = vec![0; usize::try_from(n()).expect("length") + 2];
                self.sock.read_exact(&mut data).expect("bulk");
                data.truncate(data.len() - 2);
                Reply::Bulk(data)
            }
            "*" if n() < 0 => Reply::Null,
            "*" | "%" => {
                let count = n() * if kind == "%" { 2 } else { 1 };
                Reply::Array((0..count).map(|_| self.reply()).collect())
            }
            _ => panic!("unexpected reply {line:?}"),
        }
    }

    /// Reads until the server closes the connection, which it must within `within`; what
    /// arrived meanwhile.
    fn closed_within(mut self, within: std::time::Duration) -> Vec<u8> {
        use std::io::Read;
        let started = std::time::Instant::now();
        self.sock.get_ref().set_read_timeout(Some(within)).expect("timeout");
        let mut rest = Vec::new();
        match self.sock.read_to_end(&mut rest) {
            Ok(_) => {}
            // A reset after the server closed with unread input is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => {
                panic!("not closed after {:?} ({e}); got {:?}", started.elapsed(), String::from_utf8_lossy(&rest))
            }
        }
        assert!(started.elapsed() < within, "closed only after {:?}", started.elapsed());
        rest
    }
}

/// One node, the front door plaintext on loopback with [`users`]; `tweak` changes it.
async fn one_node_with_users(tweak: impl Fn(&mut RespConfig)) -> (Cluster, SocketAddr) {
    common::cluster::one_node_front_door_with(move |resp| {
        resp.users = users();
        tweak(resp);
    })
    .await
}

/// Until it authenticates, a connection may send requests of at most 10 arguments and bulk
/// strings of 16 KiB (Redis's limits since CVE-2021-32675): a larger one announced is refused
/// at its header, before anything of it is buffered, and the connection closed. Once
/// authenticated, the configured limits apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_may_send_only_small_requests() {
    let (_cluster, addr) = one_node_with_users(|_| {}).await;
    tokio::task::spawn_blocking(move || {
        let mut other = Raw::connect(addr);
        // An 8 MB bulk string announced (within the configured 8 MiB): refused at once.
        let mut big = Raw::connect(addr);
        big.send(b"*2\r\n$4\r\nAUTH\r\n$8000000\r\n");
        assert_eq!(big.reply(), Reply::Error("ERR Protocol error: invalid bulk length".into()));
        big.closed_within(std::time::Duration::from_secs(5));
        // More than 10 arguments announced.
        let mut many = Raw::connect(addr);
        many.send(b"*11\r\n");
        assert_eq!(many.reply(), Reply::Error("ERR Protocol error: invalid multibulk length".into()));
        many.closed_within(std::time::Duration::from_secs(5));
        // The server serves others meanwhile; within the small limits nothing changes.
        assert_eq!(other.cmd(&[b"PING"]), Reply::Simple("PONG".into()));
        let message = vec![b'm'; 16 << 10];
        assert_eq!(other.cmd(&[b"PING", &message]), Reply::Bulk(message));
        assert_eq!(other.cmd(&[b"AUTH", b"app", b"app-secret"]), Reply::ok());
        // Authenticated: the configured limits.
        let value = vec![b'v'; 512 << 10];
        assert_eq!(other.cmd(&[b"SET", b"big", &value]), Reply::ok());
        assert_eq!(other.cmd(&[b"GET", b"big"]), Reply::Bulk(value));
        let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("k{i}").into_bytes()).collect();
        let mut del: Vec<&[u8]> = vec![b"DEL"];
        del.extend(keys.iter().map(Vec::as_slice));
        assert_eq!(other.cmd(&del), Reply::Int(0));
    })
    .await
    .expect("checks");
}

/// A connection that must authenticate and has not within `auth_timeout` of its accept is
/// closed, sending or not (so it cannot hold a connection slot forever); one that did stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_authenticate_in_time_is_closed() {
    let timeout = std::time::Duration::from_millis(500);
    let (_cluster, addr) = one_node_with_users(|resp| resp.auth_timeout = timeout).await;
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let idle = Raw::connect(addr);
        let mut pinging = Raw::connect(addr);
        let mut authenticated = Raw::connect(addr);
        assert_eq!(authenticated.cmd(&[b"AUTH", b"app", b"app-secret"]), Reply::ok());
        assert_eq!(pinging.cmd(&[b"PING"]), Reply::Simple("PONG".into()));
        let goodbye = idle.closed_within(std::time::Duration::from_secs(5));
        assert!(started.elapsed() >= timeout, "closed after {:?}", started.elapsed());
        assert!(goodbye.starts_with(b"-ERR authentication timed out"), "{}", String::from_utf8_lossy(&goodbye));
        // Sending all the while does not keep it open either.
        let mut last = String::new();
        while started.elapsed() < std::time::Duration::from_secs(5) {
            let _ = pinging.sock.get_mut().write_all(b"PING\r\n");
            last = pinging.try_line().unwrap_or_default();
            if last != "+PONG" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(last.is_empty() || last.starts_with("-ERR authentication timed out"), "{last}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "still open");
        // Nor does sending without a pause, replies read as fast as they come.
        let flooding = Raw::connect(addr);
        let mut writer = flooding.sock.get_ref().try_clone().expect("clone");
        let flooded = std::time::Instant::now();
        std::thread::spawn(move || {
            let pings = b"PING\r\n".repeat(1000);
            while flooded.elapsed() < std::time::Duration::from_secs(10) && writer.write_all(&pings).is_ok() {}
        });
        flooding.closed_within(std::time::Duration::from_secs(5));
        // Authenticated in time: no deadline.
        std::thread::sleep(timeout);
        assert_eq!(authenticated.cmd(&[b"PING"]), Reply::Simple("PONG".into()));
    })
    .await
    .expect("checks");
}

/// Ten wrong passwords on one connection close it (a right one in between starts the count
/// again), so guessing costs a connection per ten tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_wrong_passwords_close_the_connection() {
    let (_cluster, addr) = one_node_with_users(|_| {}).await;
    tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(addr);
        for _ in 0..9 {
            assert_eq!(c.cmd(&[b"AUTH", b"app", b"wrong"]).error(), WRONGPASS);
        }
        assert_eq!(c.cmd(&[b"AUTH", b"app", b"app-secret"]), Reply::ok());
        for _ in 0..9 {
            assert_eq!(c.cmd(&[b"AUTH", b"viewer", b"wrong"]).error(), WRONGPASS);
        }
        // The tenth, here by HELLO: answered, then the connection is closed.
        assert_eq!(c.cmd(&[b"HELLO", b"3", b"AUTH", b"app", b"wrong"]).error(), WRONGPASS);
        assert_eq!(c.closed_within(std::time::Duration::from_secs(5)), b"");
        // Another connection is not affected.
        let mut d = Raw::connect(addr);
        assert_eq!(d.cmd(&[b"AUTH", b"app", b"wrong"]).error(), WRONGPASS);
        assert_eq!(d.cmd(&[b"AUTH", b"app", b"app-secret"]), Reply::ok());
    })
    .await
    .expect("checks");
}

/// A `SCAN` cursor may be used only by the principal that was given it: another user's
/// connection gets `ERR invalid cursor` (the same user's other connections may go on with it,
/// as a client's pool does). A tenant's `INFO` has the server section only: the others
/// describe the whole node and cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_cursors_and_info_are_each_principals_own() {
    let (_cluster, addr) = one_node_with_users(|_| {}).await;
    tokio::task::spawn_blocking(move || {
        let mut app = Raw::connect(addr);
        assert_eq!(app.cmd(&[b"AUTH", b"app", b"app-secret"]), Reply::ok());
        for i in 0..10 {
            let key = format!("tenant1/{i}");
            assert_eq!(app.cmd(&[b"SET", key.as_bytes(), b"v"]), Reply::ok());
        }
        let mut tenant = Raw::connect(addr);
        assert_eq!(tenant.cmd(&[b"AUTH", b"tenant", b"tenant-secret"]), Reply::ok());
        let page = tenant.cmd(&[b"SCAN", b"0", b"COUNT", b"3"]);
        let cursor = page.items()[0].text();
        assert_ne!(cursor, "0", "{page:?}");
        assert_eq!(page.items()[1].items().len(), 3, "{page:?}");
        // Another principal: refused, whoever it is.
        assert_eq!(app.cmd(&[b"SCAN", cursor.as_bytes()]).error(), "ERR invalid cursor");
        let mut viewer = Raw::connect(addr);
        assert_eq!(viewer.cmd(&[b"AUTH", b"viewer", b"viewer-secret"]), Reply::ok());
        assert_eq!(viewer.cmd(&[b"SCAN", cursor.as_bytes()]).error(), "ERR invalid cursor");
        // The same user on another connection goes on.
        let mut tenant2 = Raw::connect(addr);
        assert_eq!(tenant2.cmd(&[b"AUTH", b"tenant", b"tenant-secret"]), Reply::ok());
        let next = tenant2.cmd(&[b"SCAN", cursor.as_bytes(), b"COUNT", b"3"]);
        assert_eq!(next.items()[1].items().len(), 3, "{next:?}");
        // Cursors handed out one after the other are not consecutive numbers.
        let again = tenant.cmd(&[b"SCAN", b"0", b"COUNT", b"3"]).items()[0].text();
        let (a, b): (u64, u64) = (cursor.parse().expect("cursor"), again.parse().expect("cursor"));
        assert!(a.abs_diff(b) > 1_000, "cursors {a} and {b}");

        // INFO: the server section only for a tenant, whatever it asks for.
        for asked in [&[b"INFO".as_slice()][..], &[b"INFO", b"all"], &[b"INFO", b"clients", b"flotilla", b"server"]] {
            let info = tenant.cmd(asked).text();
            assert!(info.contains("# Server\r\n") && info.contains("redis_version:"), "{info}");
            for hidden in ["# Clients", "# Keyspace", "# Flotilla", "connected_clients", "shards:"] {
                assert!(!info.contains(hidden), "{asked:?} shows {hidden}: {info}");
            }
        }
        assert_eq!(tenant.cmd(&[b"INFO", b"keyspace"]).text(), "");
        let info = app.cmd(&[b"INFO"]).text();
        for shown in ["# Server", "# Clients", "# Keyspace", "# Flotilla"] {
            assert!(info.contains(shown), "{shown}: {info}");
        }
    })
    .await
    .expect("checks");
}
