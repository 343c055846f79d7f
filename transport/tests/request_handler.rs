//! Requests served by a registered handler, in the transport's own task for each request: the
//! answers are the handler's, on pipes and on streams of their own (a peer's requests); a
//! dropped responder, a handler's panic and a handler too slow get error answers; work left after the answer or
//! past the timeout still runs to its end; nothing goes to the `requests` queue any more.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use flotilla_transport::{Client, IncomingRequest, NodeId, RequestHandler, Serving, TransportError};

/// "echo:<x>" -> "<x>"; "drop" -> the responder dropped; "panic" -> a panic; "answer-then-work" -> "ok", then
/// work that waits for `release` and sets `after_answer`; "late" -> work that waits for
/// `release` (past the timeout), sets `past_timeout`, then answers nobody any more;
/// "wait-for-slot" -> waits for a slot that never comes, and gives up (setting `given_up`)
/// once nobody waits for its answer.
#[derive(Default)]
struct Handler {
    served: AtomicUsize,
    release: Arc<tokio::sync::Notify>,
    after_answer: Arc<AtomicBool>,
    past_timeout: Arc<AtomicBool>,
    given_up: Arc<AtomicBool>,
}

impl RequestHandler for Handler {
    fn serve(&self, request: IncomingRequest) -> Serving {
        self.served.fetch_add(1, Ordering::Relaxed);
        let (release, after_answer, past_timeout, given_up) =
            (self.release.clone(), self.after_answer.clone(), self.past_timeout.clone(), self.given_up.clone());
        Box::pin(async move {
            let mut request = request;
            let body = String::from_utf8_lossy(&request.body).into_owned();
            match body.as_str() {
                "drop" => drop(request),
                "panic" => panic!("a handler's bug"),
                "answer-then-work" => {
                    request.responder.respond("ok");
                    release.notified().await;
                    after_answer.store(true, Ordering::Release);
                }
                "wait-for-slot" => {
                    let never = tokio::sync::Semaphore::new(0);
                    tokio::select! {
                        _slot = never.acquire() => request.responder.respond("a slot?"),
                        () = request.responder.closed() => given_up.store(true, Ordering::Release),
                    }
                }
                "late" => {
                    release.notified().await;
                    past_timeout.store(true, Ordering::Release);
                    request.responder.respond("too late");
                }
                other => {
                    let x = other.strip_prefix("echo:").unwrap_or("?").to_string();
                    request.responder.respond(x);
                }
            }
        })
    }
}

fn remote_reason(answer: Result<Bytes, TransportError>) -> String {
    match answer {
        Err(TransportError::Remote(reason)) => reason,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_answers_pipelined_and_peer_requests_and_the_queue_gets_none() {
    let ca = ca();
    let mut nodes = cluster(&ca, &[1, 2]).await;
    let (b, mut b_in) = nodes.pop().unwrap();
    let (a, _a_in) = nodes.pop().unwrap();
    let handler = Arc::new(Handler::default());
    b.serve_requests_with(handler.clone()).unwrap();
    assert!(b.serve_requests_with(Arc::new(Handler::default())).is_err(), "a second handler is refused");

    // A client's requests share one pipe, answered in the handler's task each.
    let client = Client::new(&client_tls(&ca), loopback()).unwrap();
    let conn = client.connect(b.local_addr().unwrap(), NodeId(2), DEADLINE).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..200u64 {
        let conn = conn.clone();
        calls.push(tokio::spawn(async move { (i, conn.request(Bytes::from(format!("echo:{i}")), DEADLINE).await) }));
    }
    for call in calls {
        let (i, answer) = call.await.unwrap();
        assert_eq!(answer.unwrap(), Bytes::from(i.to_string()), "request {i}");
    }
    // A peer's request comes on a stream of its own.
    assert_eq!(a.request(NodeId(2), Bytes::from("echo:peer"), DEADLINE).await.unwrap(), Bytes::from("peer"));
    assert_eq!(handler.served.load(Ordering::Relaxed), 201);
    assert!(b_in.requests.try_recv().is_err(), "the queue got a request the handler should have served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_late_answers_are_errors_and_the_work_still_ends() {
    let ca = ca();
    let mut config_b = config(&ca, 2);
    config_b.timing.request_handler_timeout_ms = 100;
    let (b, _b_in) = start(config_b).await;
    let handler = Arc::new(Handler::default());
    b.serve_requests_with(handler.clone()).unwrap();
    let client = Client::new(&client_tls(&ca), loopback()).unwrap();
    let conn = client.connect(b.local_addr().unwrap(), NodeId(2), DEADLINE).await.unwrap();

    let reason = remote_reason(conn.request("drop".into(), DEADLINE).await);
    assert!(reason.contains("dropped"), "{reason}");
    // A handler's panic fails its request at once, and only it.
    let reason = remote_reason(conn.request("panic".into(), Duration::from_secs(5)).await);
    assert!(reason.contains("dropped"), "{reason}");

    // The answer goes at once (the work after it waits for the test); that work is not cut
    // short.
    let answer = conn.request("answer-then-work".into(), Duration::from_secs(5)).await;
    assert_eq!(answer.unwrap(), Bytes::from("ok"), "the answer waited for the work after it");
    assert!(!handler.after_answer.load(Ordering::Acquire));
    handler.release.notify_one();
    eventually("the work after the answer ends", || handler.after_answer.load(Ordering::Acquire)).await;

    // Past the timeout the requester hears so, and the work still runs to its end.
    let reason = remote_reason(conn.request("late".into(), DEADLINE).await);
    assert!(reason.contains("in time"), "{reason}");
    assert!(!handler.past_timeout.load(Ordering::Acquire));
    handler.release.notify_one();
    eventually("the work past the timeout ends", || handler.past_timeout.load(Ordering::Acquire)).await;

    // Work still waiting to start hears that nobody waits for its answer any more.
    let reason = remote_reason(conn.request("wait-for-slot".into(), DEADLINE).await);
    assert!(reason.contains("in time"), "{reason}");
    eventually("the waiting work gives up", || handler.given_up.load(Ordering::Acquire)).await;

    // The pipe goes on.
    assert_eq!(conn.request("echo:after".into(), DEADLINE).await.unwrap(), Bytes::from("after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_the_handler_go_to_the_queue() {
    let ca = ca();
    let (b, mut b_in) = start(config(&ca, 2)).await;
    let client = Client::new(&client_tls(&ca), loopback()).unwrap();
    let conn = client.connect(b.local_addr().unwrap(), NodeId(2), DEADLINE).await.unwrap();
    let early = tokio::spawn({
        let conn = conn.clone();
        async move { conn.request("echo:early".into(), DEADLINE).await }
    });
    let queued = tokio::time::timeout(DEADLINE, b_in.requests.recv()).await.unwrap().unwrap();
    assert_eq!(queued.body, Bytes::from("echo:early"));
    b.serve_requests_with(Arc::new(Handler::default())).unwrap();
    assert_eq!(conn.request("echo:late".into(), DEADLINE).await.unwrap(), Bytes::from("late"));
    queued.responder.respond("from the queue");
    assert_eq!(early.await.unwrap().unwrap(), Bytes::from("from the queue"));
}
