//! Pipelined requests, the server's side (the client's is `pipe.rs`): a bidirectional stream
//! whose first frame is a `PipeRequest` carries requests until the client finishes it. Each
//! request goes to the node as any other (with the same handler timeout); the answers go back
//! on the stream as they are ready, those ready together as one chunk. At most
//! [`PIPE_IN_FLIGHT_MAX`] pipelined requests of one connection (all its pipes together) are
//! answered at once: beyond, the pipes are not read (QUIC flow control then holds the client
//! back).

use super::inbound::answer_payload;
use super::*;
use crate::pipe::{encode_pipe_frame, next_pipe_chunk, split_pipe_payload};

/// Pipelined requests of one connection being answered at once, at most.
pub(super) const PIPE_IN_FLIGHT_MAX: usize = 256;

type Answered = (u64, Result<Bytes, String>, tokio::sync::OwnedSemaphorePermit);

/// Serves the pipe that `first` (the payload of its first `PipeRequest` frame) opened.
pub(super) async fn run_pipe(
    shared: Arc<Shared>,
    from: PeerIdentity,
    peer: Option<Arc<Peer>>,
    conn: Connection,
    (send, mut recv): (SendStream, RecvStream),
    first: Bytes,
    slots: Arc<Semaphore>,
) {
    let frame_max = shared.config.limits.frame_bytes_max;
    let (out_tx, out_rx) = mpsc::channel::<Answered>(PIPE_IN_FLIGHT_MAX);
    let writer = tokio::spawn(write_answers(send, out_rx, frame_max));
    let mut decoder = FrameDecoder::new(frame_max);
    let mut pending = vec![first];
    'read: loop {
        for payload in pending.drain(..) {
            let Some((id, body)) = split_pipe_payload(payload) else {
                let error = FrameError::Malformed("a pipelined request without its id");
                shared.reject_frame(peer.as_deref(), &from, &conn, &error);
                break 'read;
            };
            if let Some(peer) = &peer {
                if shared.blocked(peer.id) {
                    // As a request stream of its own would be: refused, the pipe with it.
                    stop_refused(&mut recv);
                    break 'read;
                }
                add(&peer.counters.requests_received, 1);
            }
            let Ok(slot) = slots.clone().acquire_owned().await else { break 'read };
            let (shared, from, out_tx) = (shared.clone(), from.clone(), out_tx.clone());
            tokio::spawn(async move {
                let answer = super::inbound::answer_request(&shared, from, body).await;
                // Room is certain: one slot per request in flight, as many as the channel holds.
                let _ = out_tx.try_send((id, answer, slot));
            });
        }
        if writer.is_finished() {
            break; // the answers' side failed: nothing read now could be answered
        }
        let chunk = match recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) | Err(_) => break,
        };
        decoder.handle_bytes(&chunk);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) if frame.kind == FrameKind::PipeRequest => pending.push(frame.payload),
                Ok(Some(_)) => {
                    let error = FrameError::Malformed("only pipelined requests may follow on a pipe");
                    shared.reject_frame(peer.as_deref(), &from, &conn, &error);
                    break 'read;
                }
                Ok(None) => break,
                Err(error) => {
                    shared.reject_frame(peer.as_deref(), &from, &conn, &error);
                    break 'read;
                }
            }
        }
    }
    // The answers still being made go out; the writer ends once the last one did.
    drop(out_tx);
    let _ = writer.await;
}

/// Writes the answers, those ready together as one chunk, until every request was answered
/// and the reader stopped, or the stream fails.
async fn write_answers(mut send: SendStream, mut rx: mpsc::Receiver<Answered>, frame_max: usize) {
    let mut buf = BytesMut::new();
    // Same bound as a stream of its own: the body within `frame_bytes_max` (the id rides on
    // top, and the client's decoder allows for it).
    let encode = |(id, answer, _slot): Answered, buf: &mut BytesMut| match answer_payload(answer, frame_max) {
        Ok(body) => encode_pipe_frame(FrameKind::PipeResponse, id, &body, buf),
        Err(reason) => encode_pipe_frame(FrameKind::PipeResponseError, id, &reason, buf),
    };
    while let Some(chunk) = next_pipe_chunk(&mut rx, &mut buf, encode).await {
        if send.write_chunk(chunk).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}
