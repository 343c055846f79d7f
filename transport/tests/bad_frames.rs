//! A malformed or oversized frame closes only the connection it came on, with an error
//! code; the node and its other peers keep working.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use flotilla_transport::frame::{encode_frame, encode_stream_header, FrameKind, StreamHeader, FORMAT_VERSION};
use flotilla_transport::{codes, NodeId};
use quinn::{ConnectionError, VarInt};

/// Opens a connection to node 20 as (valid) node 5 and writes `bytes` on a new uni stream;
/// returns the code node 20 closed the connection with.
async fn send_raw(
    ca: &flotilla_transport::cert::CertificateAuthority,
    to: std::net::SocketAddr,
    bytes: &[u8],
) -> VarInt {
    let (endpoint, conn) = raw_connection(&node_tls(ca, 5), to, NodeId(20)).await;
    let mut stream = conn.open_uni().await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let reason = tokio::time::timeout(DEADLINE, conn.closed()).await.expect("connection not closed");
    endpoint.close(VarInt::from_u32(0), b"");
    match reason {
        ConnectionError::ApplicationClosed(close) => close.error_code,
        other => panic!("closed for another reason: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[20, 30]).await;
    let (c, mut c_in) = nodes.pop().unwrap();
    let (b, mut b_in) = nodes.pop().unwrap();
    let b_addr = b.local_addr().unwrap();
    let frame_max = flotilla_transport::FRAME_BYTES_MAX_DEFAULT;

    let raft_header = encode_stream_header(&StreamHeader::Raft { index: 0 });
    let mut unknown_kind = raft_header.to_vec();
    unknown_kind.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0, 1, 99, 0]);
    let mut bad_batch = BytesMut::from(&raft_header[..]);
    let mut lying = BytesMut::new();
    lying.put_u64(1);
    lying.put_u32(1_000); // claims 1,000 bytes, carries 3
    lying.put_slice(b"abc");
    encode_frame(FrameKind::Batch, &lying, &mut bad_batch);
    let mut wrong_version = raft_header.to_vec();
    wrong_version.extend_from_slice(&[FORMAT_VERSION + 1, 0, 0, 0, 0, 2]);
    let mut no_header = BytesMut::new();
    encode_frame(FrameKind::Batch, &[0; 12], &mut no_header);
    let mut oversized = raft_header.to_vec();
    oversized.push(FORMAT_VERSION);
    oversized.extend_from_slice(&(frame_max as u32).to_be_bytes()); // header + this > limit
    oversized.push(FrameKind::Batch as u8);

    let cases: Vec<(&str, Vec<u8>, VarInt)> = vec![
        ("unknown kind", unknown_kind, codes::CLOSE_FRAME_MALFORMED),
        ("batch longer than its frame", bad_batch.to_vec(), codes::CLOSE_FRAME_MALFORMED),
        ("unknown version", wrong_version, codes::CLOSE_FRAME_MALFORMED),
        ("no stream header", no_header.to_vec(), codes::CLOSE_FRAME_MALFORMED),
        ("oversized", oversized, codes::CLOSE_FRAME_OVERSIZED),
    ];
    let count = cases.len() as u64;
    for (i, (case, bytes, code)) in cases.into_iter().enumerate() {
        assert_eq!(send_raw(&ca, b_addr, &bytes).await, code, "{case}");
        assert_eq!(b.metrics().peers[&NodeId(5)].frames_rejected, i as u64 + 1, "{case}");
        // The good peer still talks to node 20, both ways, over its untouched connection.
        b.send(NodeId(30), env(1, seq_payload(i as u64, 0))).unwrap();
        c.send(NodeId(20), env(1, seq_payload(i as u64, 0))).unwrap();
        assert_eq!(seq_of(&recv_n(&mut c_in, 1).await[0].1), i as u64, "{case}");
        assert_eq!(seq_of(&recv_n(&mut b_in, 1).await[0].1), i as u64, "{case}");
    }
    assert_eq!(b.metrics().peers[&NodeId(5)].frames_rejected, count);
    let good = b.metrics().peers[&NodeId(30)].clone();
    assert_eq!((good.connections, good.frames_rejected), (1, 0));
    b.shutdown().await;
    c.shutdown().await;
}
