//! Large transfers and request/response, each on a stream of its own.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::error::TransportError;
use crate::frame::{encode_frame, Frame, FrameDecoder, FrameError, FrameKind, FRAME_HEADER_BYTES};
use crate::id::{GroupId, NodeId, PeerIdentity};

/// Application error codes: on connection close (`CLOSE_*`) and stream stop/reset
/// (`STREAM_*`).
pub mod codes {
    use quinn::VarInt;
    /// The transport is shutting down.
    pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// A newer connection with the same peer replaced this one.
    pub const CLOSE_REPLACED: VarInt = VarInt::from_u32(1);
    /// The peer sent a frame that does not decode.
    pub const CLOSE_FRAME_MALFORMED: VarInt = VarInt::from_u32(2);
    /// The peer sent a frame over `frame_bytes_max`.
    pub const CLOSE_FRAME_OVERSIZED: VarInt = VarInt::from_u32(3);
    /// The peer's identity may not open this connection (itself, a
    /// certificate without a flotilla name, too many peers).
    pub const CLOSE_IDENTITY_REFUSED: VarInt = VarInt::from_u32(4);
    /// The peer used a stream it may not use (e.g. a client opening a Raft stream).
    pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(5);
    /// A transfer exceeded `transfer_bytes_max`.
    pub const STREAM_TRANSFER_TOO_LARGE: VarInt = VarInt::from_u32(10);
    /// The sender abandoned the transfer.
    pub const STREAM_TRANSFER_ABORTED: VarInt = VarInt::from_u32(11);
    /// The receiver discarded the stream (blocked peer, node not listening).
    pub const STREAM_REFUSED: VarInt = VarInt::from_u32(12);
}

/// Largest piece read from a stream at once.
pub(crate) const READ_CHUNK_BYTES_MAX: usize = 256 << 10;

/// Why reading a frame stopped.
pub(crate) enum ReadFail {
    /// The bytes are bad: close the connection.
    Frame(FrameError),
    /// The stream or connection failed, or ended mid-frame; nothing to blame on the content.
    Stream(String),
}

/// Reads exactly one frame (header, then payload) and nothing after it. `Ok(None)` if the
/// stream ended cleanly before any byte.
pub(crate) async fn read_frame_exact(recv: &mut RecvStream, frame_bytes_max: usize) -> Result<Option<Frame>, ReadFail> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let mut filled = 0;
    while filled < header.len() {
        match recv.read(&mut header[filled..]).await {
            Ok(Some(n)) => filled += n,
            Ok(None) if filled == 0 => return Ok(None),
            Ok(None) => return Err(ReadFail::Stream("stream ended inside a frame header".into())),
            Err(e) => return Err(ReadFail::Stream(e.to_string())),
        }
    }
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    decoder.handle_bytes(&header);
    if let Some(frame) = decoder.poll_frame().map_err(ReadFail::Frame)? {
        return Ok(Some(frame));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    // Read what arrives rather than allocate the announced length up front: a peer announcing
    // large frames on many streams and sending slowly must not make us reserve memory it has
    // not sent. The decoder already checked `len` against `frame_bytes_max`.
    let mut remaining = len;
    while remaining > 0 {
        match recv.read_chunk(remaining.min(READ_CHUNK_BYTES_MAX), true).await {
            Ok(Some(chunk)) => {
                remaining -= chunk.bytes.len();
                decoder.handle_bytes(&chunk.bytes);
            }
            Ok(None) => return Err(ReadFail::Stream("stream ended inside a frame".into())),
            Err(e) => return Err(ReadFail::Stream(e.to_string())),
        }
    }
    match decoder.poll_frame().map_err(ReadFail::Frame)? {
        Some(frame) => Ok(Some(frame)),
        None => Err(ReadFail::Stream("frame incomplete".into())),
    }
}

/// Sends one request on a new bidirectional stream of `conn` and reads the answer.
pub(crate) async fn request_on(
    conn: &quinn::Connection,
    body: &[u8],
    frame_bytes_max: usize,
) -> Result<Bytes, TransportError> {
    let lost = |e: String| TransportError::ConnectionLost(e);
    // Opening a stream sends nothing; it fails only on a closed connection.
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| TransportError::NotSent(e.to_string()))?;
    let mut frame = BytesMut::new();
    encode_frame(FrameKind::Request, body, &mut frame);
    send.write_chunk(frame.freeze()).await.map_err(|e| lost(e.to_string()))?;
    // Cannot fail: the stream is ours and not yet finished.
    let _ = send.finish();
    match read_frame_exact(&mut recv, frame_bytes_max).await {
        Ok(Some(Frame { kind: FrameKind::Response, payload })) => Ok(payload),
        Ok(Some(Frame { kind: FrameKind::ResponseError, payload })) => {
            Err(TransportError::Remote(String::from_utf8_lossy(&payload).into_owned()))
        }
        Ok(Some(frame)) => Err(TransportError::Protocol(format!("unexpected {:?} frame as a response", frame.kind))),
        Ok(None) => Err(lost("the server closed the stream without answering".into())),
        Err(ReadFail::Frame(e)) => Err(TransportError::Protocol(e.to_string())),
        Err(ReadFail::Stream(e)) => Err(lost(e)),
    }
}

/// A request received from a node or a client. Answer it with [`Responder`]; a request not
/// answered within `request_handler_timeout_ms` gets an error response then.
#[derive(Debug)]
pub struct IncomingRequest {
    /// Who sent it, from its certificate.
    pub from: PeerIdentity,
    /// The request bytes, opaque to the transport.
    pub body: Bytes,
    /// Where the answer goes.
    pub responder: Responder,
}

/// Answers one request. Dropping it answers with an error.
#[derive(Debug)]
pub struct Responder {
    pub(crate) tx: oneshot::Sender<Result<Bytes, String>>,
}

impl Responder {
    /// Sends `body` as the response.
    pub fn respond(self, body: impl Into<Bytes>) {
        // The requester may be gone; there is no one to tell.
        let _ = self.tx.send(Ok(body.into()));
    }

    /// Answers with an error; the requester gets [`TransportError::Remote`] with `reason`
    /// (cut to 512 bytes).
    pub fn fail(self, reason: impl Into<String>) {
        let _ = self.tx.send(Err(reason.into()));
    }

    /// Resolves once nobody waits for the answer any more: the transport answered the
    /// requester with a timeout (or the transport is gone). Work still waiting to start can
    /// give up then.
    pub async fn closed(&mut self) {
        self.tx.closed().await
    }
}

/// An incoming large transfer (e.g. a snapshot). Read it with [`read_chunk`](Self::read_chunk);
/// the sender can only run ahead by one stream window, so a slow reader slows the sender
/// (QUIC flow control) and never the Raft streams. Dropping it frees the sender's slot.
#[derive(Debug)]
pub struct IncomingTransfer {
    /// The sending node, from its certificate.
    pub from: NodeId,
    /// The group the transfer is for, as declared by the sender.
    pub group: GroupId,
    pub(crate) recv: RecvStream,
    pub(crate) received_bytes: u64,
    pub(crate) bytes_max: u64,
    /// One of the sender's `transfers_in_per_peer_max` slots, freed when this is dropped.
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl IncomingTransfer {
    /// The next piece of the transfer; `Ok(None)` once the sender finished it.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        match self.recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await {
            Ok(Some(chunk)) => {
                self.received_bytes += chunk.bytes.len() as u64;
                if self.received_bytes > self.bytes_max {
                    let _ = self.recv.stop(codes::STREAM_TRANSFER_TOO_LARGE);
                    return Err(TransportError::TooLarge {
                        bytes: usize::try_from(self.received_bytes).unwrap_or(usize::MAX),
                        max_bytes: usize::try_from(self.bytes_max).unwrap_or(usize::MAX),
                    });
                }
                Ok(Some(chunk.bytes))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(TransportError::ConnectionLost(e.to_string())),
        }
    }

    /// Bytes read so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }
}

/// An outgoing large transfer. Writes wait while the receiver is behind (backpressure). It
/// holds one of `transfers_out_max` slots until dropped or finished.
#[derive(Debug)]
pub struct OutgoingTransfer {
    pub(crate) send: SendStream,
    pub(crate) _permit: OwnedSemaphorePermit,
    pub(crate) sent_bytes: u64,
}

impl OutgoingTransfer {
    /// Writes `data`, waiting for flow-control credit as needed.
    pub async fn write(&mut self, data: Bytes) -> Result<(), TransportError> {
        let len = data.len() as u64;
        self.send.write_chunk(data).await.map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
        self.sent_bytes += len;
        Ok(())
    }

    /// Bytes written so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    /// Ends the transfer and waits (up to `timeout`) until the receiver's QUIC stack has
    /// acknowledged every byte. That is delivery, not consumption: a receiver that refuses the
    /// transfer after a small one was fully acknowledged is not reported here. Snapshot
    /// installation is confirmed by Raft's own messages; a refused transfer that is still
    /// being written fails its next `write` instead.
    pub async fn finish(mut self, timeout: Duration) -> Result<(), TransportError> {
        self.send.finish().map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
        match tokio::time::timeout(timeout, self.send.stopped()).await {
            Err(_) => Err(TransportError::Timeout),
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(code))) => Err(TransportError::Remote(format!("receiver stopped the transfer (code {code})"))),
            Ok(Err(e)) => Err(TransportError::ConnectionLost(e.to_string())),
        }
    }

    /// Abandons the transfer; the receiver sees an error.
    pub fn abort(mut self) {
        let _ = self.send.reset(codes::STREAM_TRANSFER_ABORTED);
    }
}

pub(crate) fn stop_refused(recv: &mut RecvStream) {
    let _ = recv.stop(codes::STREAM_REFUSED);
}
