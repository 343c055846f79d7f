//! Property tests of the frame codec: encode/decode round-trips whatever the envelopes and
//! however the bytes are split, and arbitrary bytes never make the decoder panic.

use bytes::{Bytes, BytesMut};
use flotilla_transport::frame::{
    decode_batch, decode_stream_header, encode_frame, encode_stream_header, BatchBuilder, FrameDecoder, FrameKind,
    StreamHeader,
};
use flotilla_transport::{Envelope, GroupId};
use proptest::prelude::*;

fn envelopes() -> impl Strategy<Value = Vec<Envelope>> {
    prop::collection::vec(
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(group, payload)| Envelope::new(GroupId(group), payload)),
        1..40,
    )
}

/// Feeds `wire` to a decoder in pieces of the given sizes (cycled) and collects the frames.
fn decode_in_pieces(wire: &[u8], pieces: &[usize], frame_bytes_max: usize) -> Vec<(FrameKind, Bytes)> {
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    let mut frames = Vec::new();
    let mut offset = 0;
    let mut i = 0;
    while offset < wire.len() {
        let n = pieces[i % pieces.len()].max(1).min(wire.len() - offset);
        decoder.handle_bytes(&wire[offset..offset + n]);
        offset += n;
        i += 1;
        while let Some(frame) = decoder.poll_frame().expect("valid frames decode") {
            frames.push((frame.kind, frame.payload));
        }
    }
    assert_eq!(decoder.buffered_bytes(), 0);
    frames
}

proptest! {
    #[test]
    fn batches_round_trip(batches in prop::collection::vec(envelopes(), 1..5), pieces in prop::collection::vec(1usize..200, 1..10)) {
        let mut wire = BytesMut::new();
        for batch in &batches {
            let mut builder = BatchBuilder::new();
            batch.iter().for_each(|e| builder.push(e));
            prop_assert_eq!(builder.len(), batch.len());
            wire.extend_from_slice(&builder.finish());
        }
        let frames = decode_in_pieces(&wire, &pieces, 1 << 20);
        prop_assert_eq!(frames.len(), batches.len());
        for ((kind, payload), batch) in frames.into_iter().zip(batches) {
            prop_assert_eq!(kind, FrameKind::Batch);
            prop_assert_eq!(decode_batch(payload).unwrap(), batch);
        }
    }

    #[test]
    fn other_frames_round_trip(payload in prop::collection::vec(any::<u8>(), 0..2000), group in any::<u64>(), index in any::<u16>()) {
        let mut wire = BytesMut::new();
        encode_frame(FrameKind::Request, &payload, &mut wire);
        wire.extend_from_slice(&encode_stream_header(&StreamHeader::Transfer { group: GroupId(group) }));
        wire.extend_from_slice(&encode_stream_header(&StreamHeader::Raft { index }));
        let frames = decode_in_pieces(&wire, &[7], 1 << 20);
        prop_assert_eq!(frames.len(), 3);
        prop_assert_eq!(&frames[0].1[..], &payload[..]);
        prop_assert_eq!(decode_stream_header(&frames[1].1).unwrap(), StreamHeader::Transfer { group: GroupId(group) });
        prop_assert_eq!(decode_stream_header(&frames[2].1).unwrap(), StreamHeader::Raft { index });
    }

    /// Whatever arrives, the decoder returns frames no larger than its limit, or an error;
    /// it never panics, and nothing it returns makes the batch or header decoders panic.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096), frame_bytes_max in 6usize..5000, valid_prefix in any::<bool>()) {
        let mut decoder = FrameDecoder::new(frame_bytes_max);
        if valid_prefix {
            // Start like a real frame so the fuzzing reaches past the version check.
            decoder.handle_bytes(&[flotilla_transport::frame::FORMAT_VERSION]);
        }
        decoder.handle_bytes(&data);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => {
                    prop_assert!(frame.payload.len() + 6 <= frame_bytes_max);
                    let _ = decode_batch(frame.payload.clone());
                    let _ = decode_stream_header(&frame.payload);
                }
                Ok(None) => break,
                Err(_) => {
                    prop_assert!(decoder.poll_frame().is_err(), "errors are sticky");
                    break;
                }
            }
        }
    }
}
