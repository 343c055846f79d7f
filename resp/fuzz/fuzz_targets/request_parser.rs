//! Fuzzes the request parser with arbitrary bytes split at arbitrary points, under limits
//! the input picks. It must never panic, never hand out a request over its limits, stick to
//! its first error, and every request it accepts must re-encode and parse back the same;
//! typing the request as a command must not panic either.
#![no_main]

use bytes::{Bytes, BytesMut};
use flotilla_resp::{Command, Frame, Limits, Parser, Protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else { return };
    // The first byte picks the limits and the size of the pieces fed to the parser.
    let limits = Limits {
        bulk_bytes_max: usize::from(control & 0x0f) * 8,
        args_max: usize::from(control >> 4) + 1,
        inline_bytes_max: usize::from(control % 61) + 1,
        request_bytes_max: usize::from(control) * 4 + 1,
    };
    let piece = usize::from(control % 17) + 1;
    let mut parser = Parser::new(limits.clone());
    let mut buf = BytesMut::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match parser.parse(&mut buf) {
                Ok(Some(args)) => {
                    assert!(!args.is_empty());
                    let total: usize = args.iter().map(Bytes::len).sum();
                    let array_ok = args.len() <= limits.args_max
                        && args.iter().all(|a| a.len() <= limits.bulk_bytes_max)
                        && total <= limits.request_bytes_max;
                    assert!(array_ok || total <= limits.inline_bytes_max, "request over the limits");
                    let mut wire = BytesMut::new();
                    Frame::Array(args.iter().cloned().map(Frame::Bulk).collect()).encode(Protocol::Resp2, &mut wire);
                    let mut again = Parser::default();
                    assert_eq!(again.parse(&mut wire), Ok(Some(args.clone())), "request does not round trip");
                    let mut reply = BytesMut::new();
                    if let Err(error) = Command::parse(&args) {
                        error.to_frame().encode(Protocol::Resp3, &mut reply);
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    assert_eq!(parser.parse(&mut buf), Err(error));
                    return;
                }
            }
        }
    }
});
