//! Throughput between two transports on loopback: envelopes/s and MB/s for 64-byte and
//! 4 KiB envelopes over 1 and 1,000 groups, and the same payload bytes over one plain quinn
//! stream (same TLS, no framing, no queues) as the ceiling.
//!
//! `cargo bench -p flotilla-transport` prints one line per case: the median of 3 runs
//! (each run after one warm-up). Not a test: it asserts nothing about speed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_transport::cert::{node_name, CertificateAuthority, TlsIdentity};
use flotilla_transport::{tls, Envelope, GroupId, Incoming, NodeId, Transport, TransportConfig};

const RUNS: usize = 3;
/// The producer pauses while this many envelopes wait in the queue, so nothing is dropped.
const QUEUE_HIGH_WATER: usize = 20_000;
const RUN_DEADLINE: Duration = Duration::from_secs(60);

fn node_tls(ca: &CertificateAuthority, node: u64) -> TlsIdentity {
    TlsIdentity::from_issued(ca.cert_pem(), &ca.issue_node(NodeId(node)).unwrap()).unwrap()
}

fn config(ca: &CertificateAuthority, node: u64) -> TransportConfig {
    let mut config = TransportConfig::new(NodeId(node), "127.0.0.1:0".parse().unwrap(), node_tls(ca, node));
    config.limits.queue_envelopes_max = 1 << 20;
    config.limits.queue_bytes_max = 512 << 20;
    config
}

/// Sends `count` envelopes of `size` bytes over `groups` groups; returns the elapsed time
/// from the first send to the last receive.
async fn run(a: &Transport, b_in: &mut Incoming, count: usize, size: usize, groups: u64) -> Duration {
    let payload = Bytes::from(vec![0x5A; size]);
    let sender = a.clone();
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for i in 0..count {
            while sender.queue_len(NodeId(2)) > QUEUE_HIGH_WATER {
                tokio::task::yield_now().await;
            }
            sender.send(NodeId(2), Envelope { group: GroupId(i as u64 % groups), payload: payload.clone() }).unwrap();
        }
    });
    for _ in 0..count {
        tokio::time::timeout(RUN_DEADLINE, b_in.envelopes.recv()).await.expect("bench stalled").unwrap();
    }
    let elapsed = started.elapsed();
    producer.await.unwrap();
    elapsed
}

/// The same payload bytes over one plain quinn uni stream, written in `chunk`-byte pieces.
async fn run_plain(ca: &CertificateAuthority, total_bytes: usize, chunk: usize) -> Duration {
    let server_id = node_tls(ca, 2);
    let client_id = node_tls(ca, 1);
    let quic = std::sync::Arc::new(quinn::TransportConfig::default());
    let server_config = tls::server_config(&server_id, quic.clone()).unwrap();
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(
        tls::client_config(&client_id.ca, Some((client_id.chain, client_id.key)), quic).unwrap(),
    );
    let addr = server.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut recv = conn.accept_uni().await.unwrap();
        let mut got = 0;
        while let Some(c) = recv.read_chunk(1 << 20, true).await.unwrap() {
            got += c.bytes.len();
        }
        assert_eq!(got, total_bytes);
        let at = Instant::now();
        conn.close(0u32.into(), b"");
        server.wait_idle().await;
        at
    });
    let conn = client.connect(addr, &node_name(NodeId(2))).unwrap().await.unwrap();
    let data = Bytes::from(vec![0x5A; chunk]);
    let started = Instant::now();
    let mut send = conn.open_uni().await.unwrap();
    let mut sent = 0;
    while sent < total_bytes {
        let n = chunk.min(total_bytes - sent);
        send.write_chunk(data.slice(..n)).await.unwrap();
        sent += n;
    }
    send.finish().unwrap();
    let done = reader.await.unwrap();
    client.close(0u32.into(), b"");
    done - started
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing: run either way.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let ca = CertificateAuthority::generate("bench CA").unwrap();
        let (b, mut b_in) = Transport::start(config(&ca, 2)).await.unwrap();
        let mut config_a = config(&ca, 1);
        config_a.peers.push((NodeId(2), b.local_addr().unwrap()));
        let (a, _a_in) = Transport::start(config_a).await.unwrap();
        run(&a, &mut b_in, 1_000, 64, 1).await; // connect and warm up

        println!("flotilla-transport throughput, loopback, 2 tokio workers, median of {RUNS} runs");
        println!("{:<34} {:>12} {:>14} {:>10} {:>12}", "case", "envelopes", "envelopes/s", "MB/s", "env/batch");
        for (size, groups, count) in
            [(64, 1, 1_200_000), (64, 1_000, 1_200_000), (4096, 1, 120_000), (4096, 1_000, 120_000)]
        {
            run(&a, &mut b_in, count / 10, size, groups).await;
            let before = a.metrics().peers[&NodeId(2)].clone();
            let mut times = Vec::new();
            for _ in 0..RUNS {
                times.push(run(&a, &mut b_in, count, size, groups).await);
            }
            let after = a.metrics().peers[&NodeId(2)].clone();
            assert_eq!(after.queue_drops, 0, "the producer overran the queue");
            let t = median(times).as_secs_f64();
            let per_batch = (after.envelopes_sent - before.envelopes_sent) as f64
                / (after.batches_sent - before.batches_sent).max(1) as f64;
            println!(
                "{:<34} {:>12} {:>14.0} {:>10.1} {:>12.1}",
                format!("transport {size} B x {groups} groups"),
                count,
                count as f64 / t,
                (count * size) as f64 / t / 1e6,
                per_batch
            );
        }
        a.shutdown().await;
        b.shutdown().await;

        for (size, count) in [(64, 1_200_000), (4096, 120_000)] {
            let total = size * count;
            run_plain(&ca, total / 10, 64 << 10).await;
            let mut times = Vec::new();
            for _ in 0..RUNS {
                times.push(run_plain(&ca, total, 64 << 10).await);
            }
            let t = median(times).as_secs_f64();
            println!(
                "{:<34} {:>12} {:>14.0} {:>10.1} {:>12}",
                format!("plain quinn, bytes of {count} x {size} B"),
                count,
                count as f64 / t,
                total as f64 / t / 1e6,
                "-"
            );
        }
    });
}
