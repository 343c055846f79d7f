//! Replies: the values of RESP2 and RESP3 and their encoding.
//!
//! A connection speaks RESP2 until the client switches with `HELLO 3`, and one reply value
//! must work under both, so every [`Frame`] encodes under either [`Protocol`]. A type RESP2
//! lacks degrades the way Redis degrades it, because clients written against Redis expect
//! exactly that shape: a map becomes a flat array of keys and values, a set or push becomes
//! an array, null becomes the null bulk string, a boolean becomes 1 or 0, a double, big
//! number or verbatim string becomes a bulk string, and attributes are dropped.
//!
//! Simple strings and errors are single lines on the wire; a CR or LF inside one would end it
//! early and desynchronize the client, so the encoder turns them into spaces (as Redis does
//! for its formatted errors).

use bytes::{BufMut, Bytes, BytesMut};

use crate::number::format_double;

/// The protocol version of a connection, chosen by `HELLO`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// RESP2: what every connection starts with.
    #[default]
    Resp2,
    /// RESP3: typed maps, sets, nulls, booleans, doubles and push messages.
    Resp3,
}

impl Protocol {
    /// The number `HELLO` takes and reports (`proto`).
    pub fn number(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }

    /// The version for `HELLO`'s number, if it is one we speak.
    pub fn from_number(number: i64) -> Option<Protocol> {
        match number {
            2 => Some(Protocol::Resp2),
            3 => Some(Protocol::Resp3),
            _ => None,
        }
    }
}

/// One reply value. Build it, then [`Frame::encode`] it into the connection's output buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// `+OK`: a short status line. CR and LF are sent as spaces.
    Simple(Bytes),
    /// `-ERR message`: the text starts with the error code (`ERR`, `WRONGTYPE`, ...). CR and
    /// LF are sent as spaces.
    Error(Bytes),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`: binary-safe.
    Bulk(Bytes),
    /// The null bulk string (`$-1`), e.g. GET of a missing key. `_` under RESP3.
    NullBulk,
    /// `*2 ...`
    Array(Vec<Frame>),
    /// The null array (`*-1`). `_` under RESP3.
    NullArray,
    /// RESP3 `%`: key-value pairs in the given order. A flat array under RESP2.
    Map(Vec<(Frame, Frame)>),
    /// RESP3 `~`. An array under RESP2.
    Set(Vec<Frame>),
    /// RESP3 `_`. The null bulk string under RESP2.
    Null,
    /// RESP3 `#t`/`#f`. The integer 1 or 0 under RESP2.
    Boolean(bool),
    /// RESP3 `,`. A bulk string of the same text under RESP2.
    Double(f64),
    /// RESP3 `(`: an integer of any size, as decimal digits with an optional leading `-`.
    /// A bulk string under RESP2.
    BigNumber(Bytes),
    /// RESP3 `=`: text with a three-letter format (`txt`, `mkd`) for a client to display as
    /// is. The bare text as a bulk string under RESP2.
    Verbatim {
        /// `txt` or `mkd`.
        format: [u8; 3],
        /// The text.
        text: Bytes,
    },
    /// RESP3 `>`: out-of-band data (invalidation, pub/sub). An array under RESP2.
    Push(Vec<Frame>),
    /// RESP3 `|`: attributes sent ahead of a value. Under RESP2 only the value is sent.
    WithAttributes {
        /// Key-value pairs describing `value`.
        attributes: Vec<(Frame, Frame)>,
        /// The reply itself.
        value: Box<Frame>,
    },
}

impl Frame {
    /// `+OK`
    pub fn ok() -> Frame {
        Frame::Simple(Bytes::from_static(b"OK"))
    }

    /// A simple string from a constant.
    pub fn simple(text: &'static str) -> Frame {
        Frame::Simple(Bytes::from_static(text.as_bytes()))
    }

    /// An error reply; `message` starts with the error code, e.g. `ERR syntax error`.
    pub fn error(message: impl Into<Bytes>) -> Frame {
        Frame::Error(message.into())
    }

    /// A bulk string.
    pub fn bulk(data: impl Into<Bytes>) -> Frame {
        Frame::Bulk(data.into())
    }

    /// Appends the wire form of this value under `protocol` to `out`.
    pub fn encode(&self, protocol: Protocol, out: &mut BytesMut) {
        let resp3 = protocol == Protocol::Resp3;
        match self {
            Frame::Simple(text) => put_line(out, b'+', text),
            Frame::Error(text) => put_line(out, b'-', text),
            Frame::Integer(n) => put_header(out, b':', *n),
            Frame::Bulk(data) => put_bulk(out, data),
            Frame::NullBulk | Frame::Null if resp3 => out.put_slice(b"_\r\n"),
            Frame::NullBulk | Frame::Null => out.put_slice(b"$-1\r\n"),
            Frame::NullArray if resp3 => out.put_slice(b"_\r\n"),
            Frame::NullArray => out.put_slice(b"*-1\r\n"),
            Frame::Array(items) => put_items(out, b'*', items, protocol),
            Frame::Set(items) => put_items(out, if resp3 { b'~' } else { b'*' }, items, protocol),
            Frame::Push(items) => put_items(out, if resp3 { b'>' } else { b'*' }, items, protocol),
            Frame::Map(pairs) if resp3 => put_pairs(out, b'%', pairs, protocol),
            Frame::Map(pairs) => {
                put_header(out, b'*', len_i64(pairs.len()).saturating_mul(2));
                put_pair_items(out, pairs, protocol);
            }
            Frame::Boolean(b) if resp3 => out.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Frame::Boolean(b) => out.put_slice(if *b { b":1\r\n" } else { b":0\r\n" }),
            Frame::Double(d) if resp3 => put_line(out, b',', format_double(*d).as_bytes()),
            Frame::Double(d) => put_bulk(out, format_double(*d).as_bytes()),
            Frame::BigNumber(digits) if resp3 => put_line(out, b'(', digits),
            Frame::BigNumber(digits) => put_bulk(out, digits),
            Frame::Verbatim { format, text } if resp3 => {
                put_header(out, b'=', len_i64(text.len()).saturating_add(4));
                out.put_slice(format);
                out.put_u8(b':');
                out.put_slice(text);
                out.put_slice(b"\r\n");
            }
            Frame::Verbatim { text, .. } => put_bulk(out, text),
            Frame::WithAttributes { attributes, value } => {
                if resp3 {
                    put_pairs(out, b'|', attributes, protocol);
                }
                value.encode(protocol, out);
            }
        }
    }

    /// The wire form under `protocol` as a new buffer (tests, small replies).
    pub fn to_bytes(&self, protocol: Protocol) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(protocol, &mut out);
        out.freeze()
    }
}

fn len_i64(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

/// `<prefix><n>\r\n`: integers and every length header.
fn put_header(out: &mut BytesMut, prefix: u8, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.reserve(24);
    out.put_u8(prefix);
    if n < 0 {
        out.put_u8(b'-');
    }
    out.put_slice(&digits[at..]);
    out.put_slice(b"\r\n");
}

fn put_bulk(out: &mut BytesMut, data: &[u8]) {
    put_header(out, b'$', len_i64(data.len()));
    out.reserve(data.len() + 2);
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// A single-line value; CR and LF become spaces so the line cannot end early.
fn put_line(out: &mut BytesMut, prefix: u8, text: &[u8]) {
    out.reserve(text.len() + 3);
    out.put_u8(prefix);
    let mut rest = text;
    while let Some(at) = rest.iter().position(|&b| b == b'\r' || b == b'\n') {
        out.put_slice(&rest[..at]);
        out.put_u8(b' ');
        rest = &rest[at + 1..];
    }
    out.put_slice(rest);
    out.put_slice(b"\r\n");
}

fn put_items(out: &mut BytesMut, prefix: u8, items: &[Frame], protocol: Protocol) {
    put_header(out, prefix, len_i64(items.len()));
    for item in items {
        item.encode(protocol, out);
    }
}

fn put_pairs(out: &mut BytesMut, prefix: u8, pairs: &[(Frame, Frame)], protocol: Protocol) {
    put_header(out, prefix, len_i64(pairs.len()));
    put_pair_items(out, pairs, protocol);
}

fn put_pair_items(out: &mut BytesMut, pairs: &[(Frame, Frame)], protocol: Protocol) {
    for (key, value) in pairs {
        key.encode(protocol, out);
        value.encode(protocol, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(frame: &Frame) -> (Bytes, Bytes) {
        (frame.to_bytes(Protocol::Resp2), frame.to_bytes(Protocol::Resp3))
    }

    #[test]
    fn types_common_to_both_versions_encode_the_same() {
        for (frame, wire) in [
            (Frame::ok(), &b"+OK\r\n"[..]),
            (Frame::error("ERR syntax error"), b"-ERR syntax error\r\n"),
            (Frame::Integer(0), b":0\r\n"),
            (Frame::Integer(-42), b":-42\r\n"),
            (Frame::Integer(i64::MIN), b":-9223372036854775808\r\n"),
            (Frame::Integer(i64::MAX), b":9223372036854775807\r\n"),
            (Frame::bulk("foo"), b"$3\r\nfoo\r\n"),
            (Frame::bulk(""), b"$0\r\n\r\n"),
            (Frame::bulk(&b"a\r\nb\0"[..]), b"$5\r\na\r\nb\0\r\n"),
            (Frame::Array(vec![]), b"*0\r\n"),
            (Frame::Array(vec![Frame::Integer(1), Frame::bulk("x")]), b"*2\r\n:1\r\n$1\r\nx\r\n"),
        ] {
            let (v2, v3) = both(&frame);
            assert_eq!(v2, wire, "{frame:?} under RESP2");
            assert_eq!(v3, wire, "{frame:?} under RESP3");
        }
    }

    #[test]
    fn resp3_types_degrade_under_resp2_as_redis_does() {
        let cases: Vec<(Frame, &[u8], &[u8])> = vec![
            (Frame::NullBulk, b"$-1\r\n", b"_\r\n"),
            (Frame::NullArray, b"*-1\r\n", b"_\r\n"),
            (Frame::Null, b"$-1\r\n", b"_\r\n"),
            (Frame::Boolean(true), b":1\r\n", b"#t\r\n"),
            (Frame::Boolean(false), b":0\r\n", b"#f\r\n"),
            (Frame::Double(1.5), b"$3\r\n1.5\r\n", b",1.5\r\n"),
            (Frame::Double(f64::INFINITY), b"$3\r\ninf\r\n", b",inf\r\n"),
            (
                Frame::BigNumber(Bytes::from_static(b"-123456789012345678901234567890")),
                b"$31\r\n-123456789012345678901234567890\r\n",
                b"(-123456789012345678901234567890\r\n",
            ),
            (
                Frame::Verbatim { format: *b"txt", text: Bytes::from_static(b"hi") },
                b"$2\r\nhi\r\n",
                b"=6\r\ntxt:hi\r\n",
            ),
            (
                Frame::Map(vec![(Frame::bulk("k"), Frame::Integer(1)), (Frame::bulk("j"), Frame::Null)]),
                b"*4\r\n$1\r\nk\r\n:1\r\n$1\r\nj\r\n$-1\r\n",
                b"%2\r\n$1\r\nk\r\n:1\r\n$1\r\nj\r\n_\r\n",
            ),
            (Frame::Set(vec![Frame::simple("a")]), b"*1\r\n+a\r\n", b"~1\r\n+a\r\n"),
            (Frame::Push(vec![Frame::bulk("m")]), b"*1\r\n$1\r\nm\r\n", b">1\r\n$1\r\nm\r\n"),
            (
                Frame::WithAttributes {
                    attributes: vec![(Frame::simple("ttl"), Frame::Integer(3))],
                    value: Box::new(Frame::Integer(7)),
                },
                b":7\r\n",
                b"|1\r\n+ttl\r\n:3\r\n:7\r\n",
            ),
            // Nested: the degradation applies inside containers too.
            (
                Frame::Array(vec![Frame::Map(vec![(Frame::Boolean(true), Frame::Set(vec![]))])]),
                b"*1\r\n*2\r\n:1\r\n*0\r\n",
                b"*1\r\n%1\r\n#t\r\n~0\r\n",
            ),
        ];
        for (frame, v2, v3) in cases {
            let (got2, got3) = both(&frame);
            assert_eq!(got2, v2, "{frame:?} under RESP2");
            assert_eq!(got3, v3, "{frame:?} under RESP3");
        }
    }

    #[test]
    fn line_values_cannot_break_the_line() {
        let (v2, v3) = both(&Frame::error("ERR bad\r\nthing\n"));
        assert_eq!(v2, &b"-ERR bad  thing \r\n"[..]);
        assert_eq!(v3, v2);
        assert_eq!(Frame::Simple(Bytes::from_static(b"\r")).to_bytes(Protocol::Resp2), &b"+ \r\n"[..]);
    }

    #[test]
    fn encode_appends_to_what_the_buffer_holds() {
        let mut out = BytesMut::from(&b"+first\r\n"[..]);
        Frame::Integer(2).encode(Protocol::Resp2, &mut out);
        assert_eq!(&out[..], b"+first\r\n:2\r\n");
    }

    #[test]
    fn protocol_numbers() {
        assert_eq!(Protocol::from_number(2), Some(Protocol::Resp2));
        assert_eq!(Protocol::from_number(3).map(Protocol::number), Some(3));
        assert_eq!(Protocol::from_number(1), None);
        assert_eq!(Protocol::from_number(4), None);
        assert_eq!(Protocol::default(), Protocol::Resp2);
    }
}
