//! Pipelined requests, the client's side: many requests in flight on one long-lived
//! bidirectional stream of a connection, each tagged with an id, answered in any order, and
//! the requests (and, on the server, the answers) that are ready together written as one
//! chunk. A request on a stream of its own costs a stream opened, finished and acknowledged
//! and a task on each side; on the pipe it costs a frame. The server's side is
//! `transport/inbound_pipe.rs`.
//!
//! The pipe is opened by the first request that needs it and replaced when it fails: a
//! request in flight on a failed pipe fails as `ConnectionLost` (its outcome is unknown, as
//! for a stream of its own), the next one opens a new pipe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout_at, Instant};

use crate::error::TransportError;
use crate::frame::{encode_frame, FrameDecoder, FrameKind, FRAME_HEADER_BYTES};
use crate::stream::READ_CHUNK_BYTES_MAX;

/// Requests queued for the pipe's writer at most (callers wait for room beyond).
pub(crate) const PIPE_QUEUE_MAX: usize = 1024;
/// Bytes written at most as one chunk (requests ready together, or answers).
pub(crate) const PIPE_CHUNK_BYTES_MAX: usize = 64 << 10;
/// Bytes of the request id before each pipelined body.
pub(crate) const PIPE_ID_BYTES: usize = 8;
/// Largest answer frame the client takes on a pipe. A server's `frame_bytes_max` may be
/// larger than this client's: an answer within either is read (one over this would end the
/// pipe, failing every request in flight on it, where a stream of its own failed one).
const PIPE_ANSWER_BYTES_MAX: usize = 64 << 20;

type Answer = Result<Bytes, TransportError>;

/// One pipe: its writer's queue and the requests waiting for an answer.
#[derive(Debug)]
struct Pipe {
    queue: mpsc::Sender<(u64, Bytes)>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    /// Set when the pipe failed: requests go to a new one.
    dead: AtomicBool,
}

impl Pipe {
    /// Fails every waiting request and marks the pipe dead.
    fn fail_all(&self, why: &str) {
        self.dead.store(true, Ordering::Release);
        let waiting: Vec<_> = match self.waiting.lock() {
            Ok(mut w) => w.drain().collect(),
            Err(_) => Vec::new(),
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(TransportError::ConnectionLost(why.to_string())));
        }
    }

    fn take(&self, id: u64) -> Option<oneshot::Sender<Answer>> {
        self.waiting.lock().ok().and_then(|mut w| w.remove(&id))
    }
}

/// The pipe of one client connection, opened on first use. Cheap to clone.
#[derive(Debug, Default, Clone)]
pub(crate) struct PipeSlot {
    pipe: Arc<Mutex<Option<Arc<Pipe>>>>,
}

impl PipeSlot {
    /// Sends `body` on the connection's pipe and waits for its answer, within `timeout` (the
    /// pipe's opening included). `NotSent` only when the request was certainly not queued for
    /// the pipe's writer; `Timeout` and `ConnectionLost` after it was (its outcome unknown).
    pub(crate) async fn request(
        &self,
        conn: &Connection,
        body: Bytes,
        frame_bytes_max: usize,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let deadline = Instant::now() + timeout;
        let pipe = match timeout_at(deadline, self.pipe(conn, frame_bytes_max)).await {
            Ok(p) => p?,
            Err(_) => return Err(TransportError::NotSent("timed out opening the connection's pipe".into())),
        };
        let id = pipe.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        pipe.waiting.lock().map_err(|_| TransportError::NotSent("pipe lock poisoned".into()))?.insert(id, tx);
        if pipe.dead.load(Ordering::Acquire) {
            // Failed after it was picked: its `fail_all` may have run before the insert.
            pipe.take(id);
            return Err(TransportError::NotSent("the connection's pipe failed".into()));
        }
        // `send` is cancel-safe: timed out, the request was not queued.
        match timeout_at(deadline, pipe.queue.send((id, body))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                pipe.take(id);
                return Err(TransportError::NotSent("the connection's pipe closed".into()));
            }
            Err(_) => {
                pipe.take(id);
                return Err(TransportError::NotSent("timed out queueing on the connection's pipe".into()));
            }
        }
        match timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(TransportError::ConnectionLost("the pipe ended without an answer".into())),
            Err(_) => {
                pipe.take(id);
                Err(TransportError::Timeout)
            }
        }
    }

    /// The live pipe, or a new one.
    async fn pipe(&self, conn: &Connection, frame_bytes_max: usize) -> Result<Arc<Pipe>, TransportError> {
        if let Some(p) = self.live() {
            return Ok(p);
        }
        // Opening sends nothing and fails only on a closed connection. Two callers may open at
        // once; the second to finish uses the first one's pipe and lets its own end unused.
        let (send, recv) = conn.open_bi().await.map_err(|e| TransportError::NotSent(e.to_string()))?;
        let mut slot = self.pipe.lock().map_err(|_| TransportError::NotSent("pipe lock poisoned".into()))?;
        if let Some(p) = live(&slot) {
            return Ok(p);
        }
        let (queue, rx) = mpsc::channel(PIPE_QUEUE_MAX);
        let pipe = Arc::new(Pipe {
            queue,
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        });
        // The tasks hold the pipe weakly: once no connection handle holds it (or a new pipe
        // replaced it), its queue closes, the writer finishes the stream, the server finishes
        // its side and the reader ends; a connection is not kept alive by its old pipes.
        tokio::spawn(write_requests(Arc::downgrade(&pipe), send, rx));
        tokio::spawn(read_answers(Arc::downgrade(&pipe), recv, frame_bytes_max));
        *slot = Some(pipe.clone());
        Ok(pipe)
    }

    fn live(&self) -> Option<Arc<Pipe>> {
        live(&*self.pipe.lock().ok()?)
    }
}

/// The pipe in `slot`, unless it failed.
fn live(slot: &Option<Arc<Pipe>>) -> Option<Arc<Pipe>> {
    slot.as_ref().filter(|p| !p.dead.load(Ordering::Acquire)).cloned()
}

/// Appends one pipelined frame (`kind`, request `id`, `body`) to `out`.
pub(crate) fn encode_pipe_frame(kind: FrameKind, id: u64, body: &[u8], out: &mut BytesMut) {
    let mut payload = BytesMut::with_capacity(PIPE_ID_BYTES + body.len());
    payload.put_u64(id);
    payload.put_slice(body);
    encode_frame(kind, &payload, out);
}

/// Splits a pipelined frame's payload into its request id and body.
pub(crate) fn split_pipe_payload(mut payload: Bytes) -> Option<(u64, Bytes)> {
    if payload.len() < PIPE_ID_BYTES {
        return None;
    }
    let body = payload.split_off(PIPE_ID_BYTES);
    let id = u64::from_be_bytes(payload[..PIPE_ID_BYTES].try_into().ok()?);
    Some((id, body))
}

/// The next chunk a pipe's writer sends (requests here, answers in `inbound_pipe.rs`): the
/// first item queued, waited for, and those queued with it, each encoded by `encode`, up to
/// [`PIPE_CHUNK_BYTES_MAX`]; `None` once the queue is closed and empty.
///
/// Items become ready together, each in its own task (the callers woken by one chunk of
/// answers ask again together; the answers of one read round or one commit), and the first
/// wakes the writer, maybe on another worker while the others still run. Letting the tasks
/// queued on this worker run first puts their items in this chunk, so that QUIC more often
/// sends them in one packet, not a packet (a `sendmsg`, and a receive on the other side) each.
/// With both writers doing it, 64 clients got about a third more gets for a fifth less CPU per
/// get (BENCHMARKS.md, session 24).
pub(crate) async fn next_pipe_chunk<T>(
    rx: &mut mpsc::Receiver<T>,
    buf: &mut BytesMut,
    mut encode: impl FnMut(T, &mut BytesMut),
) -> Option<Bytes> {
    let first = rx.recv().await?;
    encode(first, buf);
    tokio::task::yield_now().await;
    while buf.len() < PIPE_CHUNK_BYTES_MAX {
        match rx.try_recv() {
            Ok(next) => encode(next, buf),
            Err(_) => break,
        }
    }
    Some(buf.split().freeze())
}

/// Writes the queued requests, those ready together as one chunk, until the queue closes or
/// the stream fails.
async fn write_requests(pipe: Weak<Pipe>, mut send: SendStream, mut rx: mpsc::Receiver<(u64, Bytes)>) {
    let mut buf = BytesMut::new();
    let encode =
        |(id, body): (u64, Bytes), buf: &mut BytesMut| encode_pipe_frame(FrameKind::PipeRequest, id, &body, buf);
    while let Some(chunk) = next_pipe_chunk(&mut rx, &mut buf, encode).await {
        if let Err(e) = send.write_chunk(chunk).await {
            if let Some(pipe) = pipe.upgrade() {
                pipe.fail_all(&format!("pipe stream failed: {e}"));
            }
            return;
        }
    }
    let _ = send.finish();
}

/// Reads answers and hands each to its request, until the stream ends or sends something
/// that is not an answer.
async fn read_answers(pipe: Weak<Pipe>, mut recv: RecvStream, frame_bytes_max: usize) {
    let mut decoder = FrameDecoder::new(PIPE_ANSWER_BYTES_MAX.max(frame_bytes_max) + PIPE_ID_BYTES);
    let why = loop {
        let chunk = match recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => break "the server ended the pipe".to_string(),
            Err(e) => break format!("pipe stream failed: {e}"),
        };
        decoder.handle_bytes(&chunk);
        let bad = loop {
            let frame = match decoder.poll_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(e) => break Some(format!("bad answer on the pipe: {e}")),
            };
            let Some((id, body)) = split_pipe_payload(frame.payload) else {
                break Some("answer without a request id".to_string());
            };
            let answer = match frame.kind {
                FrameKind::PipeResponse => Ok(body),
                FrameKind::PipeResponseError => {
                    Err(TransportError::Remote(String::from_utf8_lossy(&body).into_owned()))
                }
                other => break Some(format!("unexpected {other:?} frame on the pipe")),
            };
            // A request that timed out is no longer waiting: its answer is dropped.
            let Some(pipe) = pipe.upgrade() else { break Some("the pipe is no longer used".to_string()) };
            if let Some(tx) = pipe.take(id) {
                let _ = tx.send(answer);
            }
        };
        if let Some(why) = bad {
            break why;
        }
    };
    if let Some(pipe) = pipe.upgrade() {
        pipe.fail_all(&why);
    }
    let _ = recv.stop(crate::stream::codes::STREAM_REFUSED);
}

/// Whether a body fits a pipelined request frame of at most `frame_bytes_max` bytes.
pub(crate) fn fits(body_len: usize, frame_bytes_max: usize) -> bool {
    body_len + PIPE_ID_BYTES + FRAME_HEADER_BYTES <= frame_bytes_max
}
