//! The wire format: versioned, length-prefixed frames.
//!
//! ```text
//! frame  = [u8 version][u32 BE payload length][u8 kind][payload]
//! batch  = envelope*             (kind 2; at least one envelope)
//! envelope = [u64 BE group][u32 BE length][bytes]
//! ```
//!
//! The version byte comes first so that a future format can change everything after it; a
//! receiver refuses a version it does not know rather than guess (bincode has no schema
//! evolution of its own). The length is checked against the receiver's `frame_bytes_max` as
//! soon as the 6-byte header has arrived, before any payload is buffered.
//!
//! Batches are laid out by hand rather than with bincode: the payloads are opaque, and a fixed
//! layout lets the decoder hand out slices of the received buffer without copying them.
//! Stream headers, whose fields may grow, are bincode.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::id::{Envelope, GroupId};

/// The format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes before a frame's payload: version, length, kind.
pub const FRAME_HEADER_BYTES: usize = 6;
/// Bytes before each envelope's payload inside a batch: group and length.
pub const ENVELOPE_HEADER_BYTES: usize = 12;
/// Upper bound on an encoded stream header; it holds a few integers.
pub const STREAM_HEADER_BYTES_MAX: usize = 256;

/// What a frame carries.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// First frame of every unidirectional stream: a bincode [`StreamHeader`].
    StreamOpen = 1,
    /// Envelopes of one or more groups (see the module docs).
    Batch = 2,
    /// A request's body, first frame of a bidirectional stream.
    Request = 3,
    /// The answer to a request.
    Response = 4,
    /// The request failed on the server; the payload is a UTF-8 reason.
    ResponseError = 5,
    /// One request of a pipelined stream: `[u64 BE id][body]` (see `pipe.rs`). The first such
    /// frame on a bidirectional stream makes it a pipeline: more requests follow on it, and
    /// their answers come back on it as they are ready, in any order.
    PipeRequest = 6,
    /// The answer to the pipelined request `id`: `[u64 BE id][body]`.
    PipeResponse = 7,
    /// The pipelined request `id` failed on the server: `[u64 BE id][UTF-8 reason]`.
    PipeResponseError = 8,
}

impl FrameKind {
    fn from_u8(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::StreamOpen,
            2 => FrameKind::Batch,
            3 => FrameKind::Request,
            4 => FrameKind::Response,
            5 => FrameKind::ResponseError,
            6 => FrameKind::PipeRequest,
            7 => FrameKind::PipeResponse,
            8 => FrameKind::PipeResponseError,
            _ => return None,
        })
    }
}

/// What a unidirectional stream is for; sent once at its start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamHeader {
    /// A long-lived stream of batch frames; `index` is `group % K` on the sender.
    Raft {
        /// Which of the sender's K Raft streams this is (for logs only).
        index: u16,
    },
    /// A large transfer (a snapshot) for one group: raw bytes follow the header, unframed.
    Transfer {
        /// The group the transfer belongs to.
        group: GroupId,
    },
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload, a slice of the received bytes.
    pub payload: Bytes,
}

/// Why bytes did not decode. Any of these closes the connection they came on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first byte is not a version this build reads.
    #[error("unsupported frame format version {0}")]
    UnsupportedVersion(u8),
    /// The kind byte is unknown.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The header announces a frame larger than the receiver accepts.
    #[error("frame of {bytes} bytes exceeds the limit of {max_bytes} bytes")]
    Oversized {
        /// Size announced by the header, header included.
        bytes: u64,
        /// The receiver's `frame_bytes_max`.
        max_bytes: usize,
    },
    /// The frame's content is inconsistent.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// Appends one frame to `out`.
///
/// Panics if the payload does not fit a `u32` length: callers bound payloads by
/// `frame_bytes_max`, which is itself a `u32`, so this is a programming error.
pub fn encode_frame(kind: FrameKind, payload: &[u8], out: &mut BytesMut) {
    let len = u32::try_from(payload.len()).expect("frame payload bounded by frame_bytes_max (u32)");
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.put_u8(FORMAT_VERSION);
    out.put_u32(len);
    out.put_u8(kind as u8);
    out.put_slice(payload);
}

/// Encodes a stream header as a whole `StreamOpen` frame.
pub fn encode_stream_header(header: &StreamHeader) -> Bytes {
    // Encoding a small enum of integers into a Vec cannot fail.
    let body =
        bincode::serde::encode_to_vec(header, bincode::config::standard()).expect("a stream header always encodes");
    let mut out = BytesMut::new();
    encode_frame(FrameKind::StreamOpen, &body, &mut out);
    out.freeze()
}

/// Decodes the payload of a `StreamOpen` frame.
pub fn decode_stream_header(payload: &[u8]) -> Result<StreamHeader, FrameError> {
    if payload.len() > STREAM_HEADER_BYTES_MAX {
        return Err(FrameError::Malformed("stream header too long"));
    }
    let config = bincode::config::standard().with_limit::<STREAM_HEADER_BYTES_MAX>();
    let (header, used) = bincode::serde::decode_from_slice::<StreamHeader, _>(payload, config)
        .map_err(|_| FrameError::Malformed("stream header does not decode"))?;
    if used != payload.len() {
        return Err(FrameError::Malformed("trailing bytes after stream header"));
    }
    Ok(header)
}

/// Builds one batch frame in place, envelope by envelope, so the writer copies each payload
/// once, straight into the bytes that go on the wire.
#[derive(Debug)]
pub struct BatchBuilder {
    /// The frame being built, header first (its length is patched in `finish`).
    buf: BytesMut,
    /// Envelopes pushed so far.
    envelopes: usize,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(4096);
        buf.put_u8(FORMAT_VERSION);
        buf.put_u32(0);
        buf.put_u8(FrameKind::Batch as u8);
        BatchBuilder { buf, envelopes: 0 }
    }

    /// Adds one envelope. Panics if its payload exceeds `u32::MAX` bytes (callers check
    /// envelopes against `frame_bytes_max` when they are queued).
    pub fn push(&mut self, envelope: &Envelope) {
        let len = u32::try_from(envelope.payload.len()).expect("envelope bounded by frame_bytes_max (u32)");
        self.buf.reserve(ENVELOPE_HEADER_BYTES + envelope.payload.len());
        self.buf.put_u64(envelope.group.0);
        self.buf.put_u32(len);
        self.buf.put_slice(&envelope.payload);
        self.envelopes += 1;
    }

    /// Envelopes pushed so far.
    pub fn len(&self) -> usize {
        self.envelopes
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.envelopes == 0
    }

    /// The frame's size on the wire so far, header included.
    pub fn frame_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The finished frame.
    pub fn finish(mut self) -> Bytes {
        let len = u32::try_from(self.buf.len() - FRAME_HEADER_BYTES).expect("batch bounded by batch_bytes_max (u32)");
        self.buf[1..5].copy_from_slice(&len.to_be_bytes());
        self.buf.freeze()
    }
}

/// Size on the wire of one envelope inside a batch.
pub fn envelope_wire_bytes(envelope: &Envelope) -> usize {
    ENVELOPE_HEADER_BYTES + envelope.payload.len()
}

/// Splits a batch payload into its envelopes; the payloads are slices of `payload`.
pub fn decode_batch(mut payload: Bytes) -> Result<Vec<Envelope>, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Malformed("empty batch"));
    }
    let mut envelopes = Vec::new();
    while !payload.is_empty() {
        if payload.len() < ENVELOPE_HEADER_BYTES {
            return Err(FrameError::Malformed("truncated envelope header"));
        }
        let group = GroupId(payload.get_u64());
        let len = payload.get_u32() as usize;
        if payload.len() < len {
            return Err(FrameError::Malformed("envelope longer than its batch"));
        }
        envelopes.push(Envelope { group, payload: payload.split_to(len) });
    }
    Ok(envelopes)
}

/// Cuts frames out of a byte stream that arrives in arbitrary pieces.
///
/// Feed bytes with [`handle_bytes`](Self::handle_bytes), take frames with
/// [`poll_frame`](Self::poll_frame). After an error the decoder is poisoned: the stream is
/// out of step and the connection must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Received bytes not yet returned as frames; never more than one frame plus one read.
    buf: BytesMut,
    /// Largest frame accepted, header included.
    frame_bytes_max: usize,
    /// Set by the first error; every later poll returns it again.
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that refuses frames over `frame_bytes_max` bytes (header included).
    pub fn new(frame_bytes_max: usize) -> Self {
        FrameDecoder { buf: BytesMut::new(), frame_bytes_max, failed: None }
    }

    /// Appends received bytes.
    pub fn handle_bytes(&mut self, data: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn poll_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.parse() {
            Err(error) => {
                self.failed = Some(error.clone());
                self.buf.clear();
                Err(error)
            }
            ok => ok,
        }
    }

    fn parse(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(&version) = self.buf.first() else { return Ok(None) };
        if version != FORMAT_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        if self.buf.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as u64;
        let frame_bytes = len + FRAME_HEADER_BYTES as u64;
        if frame_bytes > self.frame_bytes_max as u64 {
            return Err(FrameError::Oversized { bytes: frame_bytes, max_bytes: self.frame_bytes_max });
        }
        let kind = FrameKind::from_u8(self.buf[5]).ok_or(FrameError::UnknownKind(self.buf[5]))?;
        // Checked above: frame_bytes <= frame_bytes_max, a usize.
        let frame_bytes = frame_bytes as usize;
        if self.buf.len() < frame_bytes {
            // No reserve for the announced size: memory follows the bytes actually received.
            return Ok(None);
        }
        let mut frame = self.buf.split_to(frame_bytes).freeze();
        frame.advance(FRAME_HEADER_BYTES);
        Ok(Some(Frame { kind, payload: frame }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(envelopes: &[Envelope]) -> Bytes {
        let mut builder = BatchBuilder::new();
        for envelope in envelopes {
            builder.push(envelope);
        }
        builder.finish()
    }

    #[test]
    fn batch_round_trips_through_the_decoder() {
        let envelopes = vec![
            Envelope::new(GroupId(7), &b"hello"[..]),
            Envelope::new(GroupId(u64::MAX), Bytes::new()),
            Envelope::new(GroupId(0), vec![0xAB; 1000]),
        ];
        let wire = batch(&envelopes);
        assert_eq!(wire[0], FORMAT_VERSION);
        let mut decoder = FrameDecoder::new(1 << 20);
        decoder.handle_bytes(&wire);
        let frame = decoder.poll_frame().unwrap().unwrap();
        assert_eq!(frame.kind, FrameKind::Batch);
        assert_eq!(decode_batch(frame.payload).unwrap(), envelopes);
        assert_eq!(decoder.poll_frame().unwrap(), None);
        assert_eq!(decoder.buffered_bytes(), 0);
    }

    #[test]
    fn frames_split_at_every_byte_still_decode() {
        let mut wire = BytesMut::new();
        encode_frame(FrameKind::Request, b"abc", &mut wire);
        wire.extend_from_slice(&encode_stream_header(&StreamHeader::Transfer { group: GroupId(3) }));
        let mut decoder = FrameDecoder::new(1024);
        let mut frames = Vec::new();
        for byte in wire.iter() {
            decoder.handle_bytes(&[*byte]);
            while let Some(frame) = decoder.poll_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], Frame { kind: FrameKind::Request, payload: Bytes::from_static(b"abc") });
        assert_eq!(frames[1].kind, FrameKind::StreamOpen);
        assert_eq!(decode_stream_header(&frames[1].payload).unwrap(), StreamHeader::Transfer { group: GroupId(3) });
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header_alone() {
        let mut decoder = FrameDecoder::new(100);
        // Header announcing 95 payload bytes: 101 on the wire, one over the limit.
        decoder.handle_bytes(&[FORMAT_VERSION, 0, 0, 0, 95, FrameKind::Batch as u8]);
        assert_eq!(decoder.poll_frame(), Err(FrameError::Oversized { bytes: 101, max_bytes: 100 }));
        // Poisoned: later bytes are ignored and the error repeats.
        decoder.handle_bytes(&[1, 2, 3]);
        assert!(decoder.poll_frame().is_err());
        let mut at_limit = FrameDecoder::new(101);
        at_limit.handle_bytes(&[FORMAT_VERSION, 0, 0, 0, 95, FrameKind::Batch as u8]);
        assert_eq!(at_limit.poll_frame(), Ok(None));
    }

    #[test]
    fn unknown_version_and_kind_are_refused() {
        let mut decoder = FrameDecoder::new(100);
        decoder.handle_bytes(&[2]);
        assert_eq!(decoder.poll_frame(), Err(FrameError::UnsupportedVersion(2)));
        let mut decoder = FrameDecoder::new(100);
        decoder.handle_bytes(&[FORMAT_VERSION, 0, 0, 0, 0, 99]);
        assert_eq!(decoder.poll_frame(), Err(FrameError::UnknownKind(99)));
    }

    #[test]
    fn inconsistent_batches_are_malformed() {
        assert!(decode_batch(Bytes::new()).is_err());
        assert!(decode_batch(Bytes::from_static(&[0; 11])).is_err());
        let mut lying = BytesMut::new();
        lying.put_u64(1);
        lying.put_u32(10);
        lying.put_slice(b"short");
        assert_eq!(decode_batch(lying.freeze()), Err(FrameError::Malformed("envelope longer than its batch")));
    }

    #[test]
    fn stream_header_rejects_garbage_and_trailing_bytes() {
        assert!(decode_stream_header(&[0xFF; 8]).is_err());
        let wire = encode_stream_header(&StreamHeader::Raft { index: 2 });
        let mut payload = wire[FRAME_HEADER_BYTES..].to_vec();
        assert_eq!(decode_stream_header(&payload), Ok(StreamHeader::Raft { index: 2 }));
        payload.push(0);
        assert!(decode_stream_header(&payload).is_err());
    }
}
