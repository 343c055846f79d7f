//! Thousands of Redis protocol connections at once (issue 15), in a test binary of its own: it
//! measures the heap the idle connections hold from the process's allocator figures, which
//! other tests running beside it in one process would blur.

use std::time::Duration;

mod common;

/// Thousands of connections at once, each cheap: 2,000 clients connect and stay connected,
/// each writes its own key; every one is then read back on its own connection, while the node
/// counts them all in `INFO clients`. The heap the idle connections hold is printed and
/// bounded: both ends are in this process, the client's with a 64-byte read buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_at_once_are_each_served() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    const CONNECTIONS: usize = 2_000;
    // Each connection is two descriptors here (client and server end).
    let limit =
        flotilla::open_files::raise_to(2 * CONNECTIONS as u64 + flotilla::open_files::RESERVED).expect("rlimit");
    assert!(limit.allows(2 * CONNECTIONS as u64 + 256), "this machine's open-files hard limit is too low: {limit:?}");
    let (_cluster, addr) = common::cluster::one_node_front_door_with(|resp| resp.plaintext_loopback = true).await;
    let heap = || flotilla::allocator::stats().map(|s| s.allocated);
    let before = heap();
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conns.push(BufReader::with_capacity(64, sock));
    }
    // Every connection is open before any command: the node holds all of them at once.
    for c in conns.iter_mut() {
        c.write_all(b"PING\r\n").await.expect("ping");
    }
    for c in conns.iter_mut() {
        let mut line = String::new();
        c.read_line(&mut line).await.expect("pong");
        assert_eq!(line, "+PONG\r\n");
    }
    let idle = heap();
    let info =
        tokio::task::spawn_blocking(move || common::redis_cli(addr.port(), &[], "INFO clients\n")).await.unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains(&format!("connected_clients:{}", CONNECTIONS + 1)), "{info}");
    if let (Some(b), Some(i)) = (before, idle) {
        let per = i.saturating_sub(b) / CONNECTIONS as u64;
        eprintln!("{CONNECTIONS} idle connections: {per} bytes of heap each, both ends");
        assert!(per < 6 * 1024, "an idle connection holds {per} bytes of heap");
    }
    let set = |i: usize| {
        let (k, v) = (format!("conn:{i:04}"), format!("v{i}"));
        format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n",
            k.len(),
            v.len(),
            k.len()
        )
    };
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let req = set(i);
            tokio::spawn(async move {
                c.write_all(req.as_bytes()).await.expect("write");
                let mut lines = Vec::new();
                for _ in 0..3 {
                    let mut line = String::new();
                    c.read_line(&mut line).await.expect("reply");
                    lines.push(line);
                }
                assert_eq!(
                    lines,
                    ["+OK\r\n".to_string(), format!("${}\r\n", format!("v{i}").len()), format!("v{i}\r\n")]
                );
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t).await.expect("answered in time").expect("every reply right");
    }
}
