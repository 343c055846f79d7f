//! Fuzzes the frame decoder with arbitrary bytes split at arbitrary points. It must never
//! panic, never return a frame over its limit, and every batch it accepts must re-encode to
//! the same bytes.
#![no_main]

use flotilla_transport::frame::{decode_batch, decode_stream_header, BatchBuilder, FrameDecoder, FrameKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else { return };
    // The first byte picks the limit and the size of the pieces fed to the decoder.
    let frame_bytes_max = 6 + usize::from(control) * 64;
    let piece = usize::from(control % 17) + 1;
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    for chunk in data.chunks(piece) {
        decoder.handle_bytes(chunk);
        loop {
            match decoder.poll_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() + 6 <= frame_bytes_max);
                    if frame.kind == FrameKind::Batch {
                        if let Ok(envelopes) = decode_batch(frame.payload.clone()) {
                            let mut builder = BatchBuilder::new();
                            envelopes.iter().for_each(|e| builder.push(e));
                            let wire = builder.finish();
                            assert_eq!(&wire[6..], &frame.payload[..], "batch does not re-encode identically");
                        }
                    }
                    let _ = decode_stream_header(&frame.payload);
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(decoder.poll_frame().is_err());
                    return;
                }
            }
        }
    }
});
