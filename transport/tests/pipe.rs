//! Pipelined requests: a client connection's requests share one stream, are answered in any
//! order, each to its own caller; errors and timeouts stay per request; a malformed pipelined
//! frame closes only its connection.

mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use flotilla_transport::frame::{encode_frame, FrameKind};
use flotilla_transport::{codes, Client, IncomingRequest, NodeId, TransportError};
use quinn::{ConnectionError, VarInt};

/// "after:<ms>:<x>" -> "<x>" after <ms> ms; "fail" -> error; anything else is never answered.
fn serve(mut requests: tokio::sync::mpsc::Receiver<IncomingRequest>) {
    tokio::spawn(async move {
        let mut parked = Vec::new();
        while let Some(request) = requests.recv().await {
            let body = String::from_utf8_lossy(&request.body).into_owned();
            if let Some(rest) = body.strip_prefix("after:") {
                let (ms, x) = rest.split_once(':').expect("after:<ms>:<x>");
                let (ms, x): (u64, String) = (ms.parse().expect("ms"), x.to_string());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    request.responder.respond(x);
                });
            } else if body == "fail" {
                request.responder.fail("nope");
            } else {
                parked.push(request);
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_connection_each_get_their_own_answer() {
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.timing.request_handler_timeout_ms = 1_000;
    let (b, b_in) = start(config_b).await;
    serve(b_in.requests);
    let client = Client::new(&client_tls(&ca), loopback()).unwrap();
    let conn = client.connect(b.local_addr().unwrap(), NodeId(2), DEADLINE).await.unwrap();

    // Later requests answered sooner: answers come back out of order, each to its caller.
    let mut calls = Vec::new();
    for i in 0..300u64 {
        let conn = conn.clone();
        calls.push(tokio::spawn(async move {
            let body = format!("after:{}:{i}", (300 - i) % 37);
            (i, conn.request(Bytes::from(body), DEADLINE).await)
        }));
    }
    for call in calls {
        let (i, answer) = call.await.unwrap();
        assert_eq!(answer.unwrap(), Bytes::from(i.to_string()), "request {i}");
    }
    // Errors and timeouts stay with their request; the pipe goes on.
    match conn.request("fail".into(), DEADLINE).await {
        Err(TransportError::Remote(reason)) => assert_eq!(reason, "nope"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(conn.request("slow".into(), Duration::from_millis(100)).await, Err(TransportError::Timeout)));
    match conn.request("slow".into(), DEADLINE).await {
        Err(TransportError::Remote(reason)) => assert!(reason.contains("in time"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // An answer arriving after its caller gave up goes nowhere.
    assert!(matches!(
        conn.request("after:300:late".into(), Duration::from_millis(50)).await,
        Err(TransportError::Timeout)
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(conn.request("after:0:next".into(), DEADLINE).await.unwrap(), Bytes::from("next"));
    // A stream of its own still works beside the pipe.
    assert_eq!(conn.request_on_own_stream("after:0:own".into(), DEADLINE).await.unwrap(), Bytes::from("own"));
    client.close().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_pipe_whose_server_went_away_fails_and_a_new_connection_works() {
    let ca = ca();
    let (b, b_in) = start(config(&ca, 2)).await;
    serve(b_in.requests);
    let addr = b.local_addr().unwrap();
    let client = Client::new(&client_tls(&ca), loopback()).unwrap();
    let conn = client.connect(addr, NodeId(2), DEADLINE).await.unwrap();
    assert_eq!(conn.request("after:0:a".into(), DEADLINE).await.unwrap(), Bytes::from("a"));
    b.shutdown().await;
    // The connection is gone with the server: a clear error, not a hang.
    let r = conn.request("after:0:b".into(), Duration::from_secs(5)).await;
    assert!(matches!(r, Err(TransportError::NotSent(_) | TransportError::ConnectionLost(_))), "{r:?}");
    let (b, b_in) = start(config(&ca, 2)).await;
    serve(b_in.requests);
    let conn = client.connect(b.local_addr().unwrap(), NodeId(2), DEADLINE).await.unwrap();
    assert_eq!(conn.request("after:0:c".into(), DEADLINE).await.unwrap(), Bytes::from("c"));
    client.close().await;
    b.shutdown().await;
}

/// A pipelined request without its id, and a frame of another kind after the pipe opened,
/// close the connection they came on as malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pipelined_frames_close_their_connection() {
    let ca = ca();
    let (b, b_in) = start(config(&ca, 2)).await;
    serve(b_in.requests);
    let to = b.local_addr().unwrap();
    let mut short = BytesMut::new();
    encode_frame(FrameKind::PipeRequest, &[1, 2, 3], &mut short);
    let mut mixed = BytesMut::new();
    let mut good = BytesMut::new();
    good.put_u64(7);
    good.put_slice(b"after:0:x");
    encode_frame(FrameKind::PipeRequest, &good, &mut mixed);
    encode_frame(FrameKind::Request, b"after:0:y", &mut mixed);
    for (case, bytes) in [("no id", short), ("a plain request on a pipe", mixed)] {
        let (endpoint, conn) = raw_connection(&client_tls(&ca), to, NodeId(2)).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let reason = tokio::time::timeout(DEADLINE, conn.closed()).await.expect("connection not closed");
        endpoint.close(VarInt::from_u32(0), b"");
        match reason {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, codes::CLOSE_FRAME_MALFORMED, "{case}")
            }
            other => panic!("{case}: closed for another reason: {other}"),
        }
    }
    b.shutdown().await;
}
