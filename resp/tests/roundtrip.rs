//! Requests encoded the ways clients send them parse back to the same arguments, however
//! the bytes are split into reads; and arbitrary bytes never panic the parser, never yield
//! more than the limits allow, and give the same outcome however they are split.

use bytes::{Bytes, BytesMut};
use flotilla_resp::{Frame, Limits, Parser, Protocol, ProtocolError};
use proptest::prelude::*;

/// How one request goes on the wire.
#[derive(Clone, Debug)]
enum Form {
    /// `*n` and bulk strings, as client libraries send.
    Array,
    /// An inline line with every argument in double quotes and every byte `\xHH`.
    InlineEscaped,
    /// An inline line of bare words (only for arguments that need no quoting).
    InlineBare,
    /// Something Redis skips: `*0`, `*-1` or a blank line, then the request as an array.
    AfterEmpty(u8),
}

fn encode(args: &[Vec<u8>], form: &Form, out: &mut BytesMut) {
    match form {
        Form::Array => {
            Frame::Array(args.iter().map(|a| Frame::Bulk(Bytes::copy_from_slice(a))).collect())
                .encode(Protocol::Resp2, out);
        }
        Form::InlineEscaped => {
            let quoted: Vec<String> = args
                .iter()
                .map(|a| format!("\"{}\"", a.iter().map(|b| format!("\\x{b:02x}")).collect::<String>()))
                .collect();
            out.extend_from_slice(quoted.join(" ").as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Form::InlineBare => {
            let words: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            out.extend_from_slice(&words.join(&b' '));
            out.extend_from_slice(b"\n");
        }
        Form::AfterEmpty(which) => {
            out.extend_from_slice([&b"*0\r\n"[..], b"*-1\r\n", b"\r\n", b"  \t\n"][usize::from(*which % 4)]);
            encode(args, &Form::Array, out);
        }
    }
}

fn is_bare_word(arg: &[u8]) -> bool {
    !arg.is_empty() && arg.iter().all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(b))
}

fn request() -> impl Strategy<Value = (Vec<Vec<u8>>, Form)> {
    let any_args = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6);
    let words = prop::collection::vec("[a-zA-Z0-9_:.-]{1,12}", 1..6)
        .prop_map(|words| words.into_iter().map(String::into_bytes).collect::<Vec<_>>());
    prop_oneof![
        (any_args.clone(), Just(Form::Array)),
        (any_args.clone(), Just(Form::InlineEscaped)),
        (any_args, any::<u8>().prop_map(Form::AfterEmpty)),
        (words, Just(Form::InlineBare)),
    ]
}

/// Feeds `wire` in pieces ending at `cuts` (sorted offsets) and collects every request, and
/// the error if one ends the stream.
fn parse_in_pieces(limits: &Limits, wire: &[u8], cuts: &[usize]) -> (Vec<Vec<Bytes>>, Option<ProtocolError>, usize) {
    let mut parser = Parser::new(limits.clone());
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    let mut start = 0;
    let mut buffered_max = 0;
    for end in cuts.iter().copied().chain([wire.len()]) {
        let end = end.clamp(start, wire.len());
        buf.extend_from_slice(&wire[start..end]);
        start = end;
        buffered_max = buffered_max.max(buf.len());
        loop {
            match parser.parse(&mut buf) {
                Ok(Some(request)) => requests.push(request),
                Ok(None) => break,
                Err(error) => {
                    // Sticky: asking again gives the same error.
                    assert_eq!(parser.parse(&mut buf), Err(error.clone()));
                    return (requests, Some(error), buffered_max);
                }
            }
        }
    }
    (requests, None, buffered_max)
}

fn cuts_strategy(max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..max_len.max(1), 0..12).prop_map(|mut cuts| {
        cuts.sort_unstable();
        cuts
    })
}

proptest! {
    #[test]
    fn encoded_requests_parse_back_whatever_the_split(
        requests in prop::collection::vec(request(), 1..8),
        cuts in cuts_strategy(2048),
    ) {
        let mut wire = BytesMut::new();
        for (args, form) in &requests {
            encode(args, form, &mut wire);
        }
        let expected: Vec<Vec<Bytes>> = requests
            .iter()
            .map(|(args, _)| args.iter().map(|a| Bytes::copy_from_slice(a)).collect())
            .collect();
        let limits = Limits::default();

        let (whole, error, _) = parse_in_pieces(&limits, &wire, &[]);
        prop_assert_eq!(error, None);
        prop_assert_eq!(&whole, &expected);

        let (pieces, error, _) = parse_in_pieces(&limits, &wire, &cuts);
        prop_assert_eq!(error, None);
        prop_assert_eq!(&pieces, &expected);

        let every_byte: Vec<usize> = (1..wire.len()).collect();
        let (bytewise, error, _) = parse_in_pieces(&limits, &wire, &every_byte);
        prop_assert_eq!(error, None);
        prop_assert_eq!(&bytewise, &expected);
    }

    #[test]
    fn bare_words_need_no_quotes(args in prop::collection::vec("[a-z0-9]{1,8}", 1..5)) {
        let args: Vec<Vec<u8>> = args.into_iter().map(String::into_bytes).collect();
        prop_assert!(args.iter().all(|a| is_bare_word(a)));
        let mut wire = BytesMut::new();
        encode(&args, &Form::InlineBare, &mut wire);
        let (got, error, _) = parse_in_pieces(&Limits::default(), &wire, &[]);
        prop_assert_eq!(error, None);
        prop_assert_eq!(got, vec![args.into_iter().map(Bytes::from).collect::<Vec<_>>()]);
    }

    /// Arbitrary input, mostly protocol-shaped, under small limits.
    #[test]
    fn arbitrary_bytes_are_handled_within_limits_and_split_invariantly(
        wire in prop::collection::vec(
            prop_oneof![
                3 => any::<u8>(),
                1 => prop::sample::select(b"*$\r\n\"' 0123456789-".to_vec()),
            ],
            0..400,
        ),
        cuts in cuts_strategy(400),
        args_max in 1usize..6,
        bulk_bytes_max in 0usize..20,
        inline_bytes_max in 1usize..40,
        request_bytes_max in 1usize..200,
    ) {
        let limits = Limits { bulk_bytes_max, args_max, inline_bytes_max, request_bytes_max };
        let whole = parse_in_pieces(&limits, &wire, &[]);
        let pieces = parse_in_pieces(&limits, &wire, &cuts);
        let every_byte: Vec<usize> = (1..wire.len()).collect();
        let bytewise = parse_in_pieces(&limits, &wire, &every_byte);
        prop_assert_eq!((&whole.0, &whole.1), (&pieces.0, &pieces.1));
        prop_assert_eq!((&whole.0, &whole.1), (&bytewise.0, &bytewise.1));
        for request in &whole.0 {
            prop_assert!(!request.is_empty());
            let total: usize = request.iter().map(Bytes::len).sum();
            // An array request: within every limit. An inline one: within the line limit.
            let within_array_limits = request.len() <= args_max
                && request.iter().all(|a| a.len() <= bulk_bytes_max)
                && total <= request_bytes_max;
            prop_assert!(within_array_limits || total <= inline_bytes_max, "{:?}", request);
        }
        // Fed a byte at a time, the parser never let a request grow past its limits before
        // failing: at most one request, or one line, over them plus a byte.
        let bound = request_bytes_max.max(inline_bytes_max) + inline_bytes_max + 2;
        prop_assert!(bytewise.2 <= bound, "buffered {} > {}", bytewise.2, bound);
    }
}
