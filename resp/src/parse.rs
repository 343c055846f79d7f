//! Requests: an incremental parser of what clients send.
//!
//! Clients send a request as an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`);
//! people typing into telnet send an inline line (`GET k\r\n`), split at spaces with
//! Redis's quoting rules. A request that starts with `*` is an array, anything else a line.
//!
//! The connection task appends what it reads to one `BytesMut` and calls [`Parser::parse`]
//! until it returns `Ok(None)`. The parser leaves an incomplete request in the buffer and
//! remembers how far it got, so a request arriving a byte at a time costs linear time, not
//! quadratic; a complete array request is split off the buffer in one piece and its
//! arguments are slices of it, never copies.
//!
//! Every length is checked against [`Limits`] as soon as its header is read, before its
//! bytes are buffered, so a client cannot make the connection hold more than one request of
//! `request_bytes_max`. A violation is a [`ProtocolError`] with Redis's text: the connection
//! replies with it and closes, because after a framing error nothing that follows can be
//! trusted to start a request. Empty requests (`*0`, `*-1`, a blank line) are skipped, as
//! Redis skips them.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::Frame;
use crate::number::parse_i64;

/// How much one request may hold. The defaults are Redis's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest bulk string (Redis's `proto-max-bulk-len`, 512 MiB).
    pub bulk_bytes_max: usize,
    /// Most arguments in one request, the command name included (1 Mi).
    pub args_max: usize,
    /// Longest inline request line, and longest length header of an array request (64 KiB).
    pub inline_bytes_max: usize,
    /// Most bytes of one request on the wire (Redis's `client-query-buffer-limit`, 1 GiB).
    pub request_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            bulk_bytes_max: 512 * 1024 * 1024,
            args_max: 1024 * 1024,
            inline_bytes_max: 64 * 1024,
            request_bytes_max: 1024 * 1024 * 1024,
        }
    }
}

/// The client broke the protocol; reply with [`ProtocolError::to_frame`] and close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// An array header that is not a number, or more elements than `args_max`.
    InvalidMultibulkLength,
    /// A bulk header that is not a number, is negative, or exceeds `bulk_bytes_max`.
    InvalidBulkLength,
    /// An array element that is not a bulk string; `got` is its first byte.
    ExpectedBulk {
        /// The byte found where `$` should be.
        got: u8,
    },
    /// An inline line longer than `inline_bytes_max`.
    TooBigInline,
    /// An array header line longer than `inline_bytes_max`.
    TooBigMultibulkCount,
    /// A bulk header line longer than `inline_bytes_max`.
    TooBigBulkCount,
    /// An inline line with an unclosed quote, or a closing quote not followed by a space.
    UnbalancedQuotes,
    /// A bulk string not followed by CRLF. (Redis skips two bytes without looking; a
    /// mismatch there means the client and we disagree on where requests start.)
    UnterminatedBulk,
    /// A request larger than `request_bytes_max`. (Redis closes such a client without a
    /// reply; we say why.)
    RequestTooBig,
}

impl ProtocolError {
    /// The error text as Redis words it, without the `ERR ` code. Raw bytes: the `$`
    /// mismatch quotes the client's byte as it was.
    pub fn message(&self) -> Vec<u8> {
        let text = match self {
            ProtocolError::InvalidMultibulkLength => "invalid multibulk length",
            ProtocolError::InvalidBulkLength => "invalid bulk length",
            ProtocolError::ExpectedBulk { got } => {
                let mut message = b"Protocol error: expected '$', got '".to_vec();
                message.push(*got);
                message.push(b'\'');
                return message;
            }
            ProtocolError::TooBigInline => "too big inline request",
            ProtocolError::TooBigMultibulkCount => "too big mbulk count string",
            ProtocolError::TooBigBulkCount => "too big bulk count string",
            ProtocolError::UnbalancedQuotes => "unbalanced quotes in request",
            ProtocolError::UnterminatedBulk => "bulk string not followed by CRLF",
            ProtocolError::RequestTooBig => "request exceeds the query buffer limit",
        };
        format!("Protocol error: {text}").into_bytes()
    }

    /// The reply to send before closing: `-ERR Protocol error: ...`.
    pub fn to_frame(&self) -> Frame {
        let mut text = b"ERR ".to_vec();
        text.extend_from_slice(&self.message());
        Frame::Error(text.into())
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::error::write_escaped(f, &self.message())
    }
}

impl std::error::Error for ProtocolError {}

/// Parses the requests of one connection; see the module docs for the contract.
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    state: State,
    /// Once the stream is broken it stays broken: the same error on every later call.
    failed: Option<ProtocolError>,
}

#[derive(Debug)]
enum State {
    /// Between requests. `scanned` bytes of the first line were searched for its end.
    Start { scanned: usize },
    /// Inside an array request; every offset counts from the start of the buffer, which
    /// holds the request from its first byte until it is complete.
    Array(ArrayProgress),
}

#[derive(Debug)]
struct ArrayProgress {
    /// Elements still to read.
    remaining: usize,
    /// Where each element read so far lies.
    args: Vec<(usize, usize)>,
    /// Start of the current element's header, or of its data once `bulk_len` is known.
    at: usize,
    /// The current element's length, once its header is read.
    bulk_len: Option<usize>,
    /// Bytes searched so far for the end of the current header.
    scanned: usize,
}

enum Step {
    NeedMore,
    Skipped,
    Request(Vec<Bytes>),
}

impl Default for Parser {
    fn default() -> Parser {
        Parser::new(Limits::default())
    }
}

impl Parser {
    /// A parser for a new connection.
    pub fn new(limits: Limits) -> Parser {
        Parser { limits, state: State::Start { scanned: 0 }, failed: None }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Enforces `limits` from now on: a server parses with small limits until the client has
    /// authenticated, then with its configured ones (as Redis does since CVE-2021-32675).
    /// Meant to be called between requests; a request already begun has its later headers
    /// checked against the new limits.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Takes the next complete request (its arguments, the command name first) off the
    /// front of `buf`, or returns `Ok(None)` when `buf` holds no complete request yet.
    ///
    /// Between calls the caller may only append to `buf`: the parser keeps offsets into
    /// the incomplete request at its front. After an error, every call returns that error.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        loop {
            let step = match self.step(buf) {
                Ok(step) => step,
                Err(error) => {
                    self.failed = Some(error.clone());
                    return Err(error);
                }
            };
            match step {
                Step::NeedMore => return Ok(None),
                Step::Skipped => continue,
                Step::Request(args) => return Ok(Some(args)),
            }
        }
    }

    /// How many more bytes the request being read needs at least, as far as its headers
    /// tell; 0 when unknown. A connection can reserve that much before reading a large
    /// bulk string, instead of growing the buffer step by step.
    pub fn bytes_missing(&self, buf: &BytesMut) -> usize {
        match &self.state {
            State::Array(ArrayProgress { at, bulk_len: Some(len), .. }) => {
                at.saturating_add(*len).saturating_add(2).saturating_sub(buf.len())
            }
            _ => 0,
        }
    }

    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ProtocolError> {
        let limits = &self.limits;
        match &mut self.state {
            State::Start { scanned } => {
                let Some(&first) = buf.first() else { return Ok(Step::NeedMore) };
                if first != b'*' {
                    return inline_request(limits, scanned, buf);
                }
                let Some(line_end) = find_line_end(
                    buf,
                    0,
                    scanned,
                    limits,
                    ProtocolError::TooBigMultibulkCount,
                    ProtocolError::InvalidMultibulkLength,
                )?
                else {
                    return Ok(Step::NeedMore);
                };
                let count = buf.get(1..line_end).and_then(parse_i64).ok_or(ProtocolError::InvalidMultibulkLength)?;
                if count <= 0 {
                    buf.advance(line_end + 2);
                    *scanned = 0;
                    return Ok(Step::Skipped);
                }
                let count = usize::try_from(count).map_err(|_| ProtocolError::InvalidMultibulkLength)?;
                if count > limits.args_max {
                    return Err(ProtocolError::InvalidMultibulkLength);
                }
                // Room for what has arrived, not for what the header claims.
                let args = Vec::with_capacity(count.min(1024));
                let at = line_end + 2;
                self.state = State::Array(ArrayProgress { remaining: count, args, at, bulk_len: None, scanned: at });
                Ok(Step::Skipped)
            }
            State::Array(progress) => {
                if !read_elements(limits, progress, buf)? {
                    return Ok(Step::NeedMore);
                }
                let Some(request_len) = (progress.at <= buf.len()).then_some(progress.at) else {
                    return Ok(Step::NeedMore);
                };
                let request = buf.split_to(request_len).freeze();
                let args = progress.args.iter().map(|&(start, end)| request.slice(start..end)).collect();
                self.state = State::Start { scanned: 0 };
                Ok(Step::Request(args))
            }
        }
    }
}

/// Reads array elements while their bytes are there; true once all are read.
fn read_elements(limits: &Limits, progress: &mut ArrayProgress, buf: &BytesMut) -> Result<bool, ProtocolError> {
    while progress.remaining > 0 {
        match progress.bulk_len {
            None => {
                let Some(&first) = buf.get(progress.at) else { return Ok(false) };
                // Redis waits for the whole header line before it looks; looking at once
                // fails the same requests without buffering up to a line of junk.
                if first != b'$' {
                    return Err(ProtocolError::ExpectedBulk { got: first });
                }
                let Some(line_end) = find_line_end(
                    buf,
                    progress.at,
                    &mut progress.scanned,
                    limits,
                    ProtocolError::TooBigBulkCount,
                    ProtocolError::InvalidBulkLength,
                )?
                else {
                    return Ok(false);
                };
                let len = buf
                    .get(progress.at + 1..line_end)
                    .and_then(parse_i64)
                    .and_then(|len| usize::try_from(len).ok())
                    .filter(|&len| len <= limits.bulk_bytes_max)
                    .ok_or(ProtocolError::InvalidBulkLength)?;
                let data_start = line_end + 2;
                let request_len = data_start.saturating_add(len).saturating_add(2);
                if request_len > limits.request_bytes_max {
                    return Err(ProtocolError::RequestTooBig);
                }
                progress.at = data_start;
                progress.bulk_len = Some(len);
            }
            Some(len) => {
                let end = progress.at + len;
                match buf.get(end..end + 2) {
                    None => return Ok(false),
                    Some(b"\r\n") => {}
                    Some(_) => return Err(ProtocolError::UnterminatedBulk),
                }
                progress.args.push((progress.at, end));
                progress.at = end + 2;
                progress.scanned = progress.at;
                progress.bulk_len = None;
                progress.remaining -= 1;
            }
        }
    }
    Ok(true)
}

/// Finds the CR of the CRLF ending the header line that starts at `start`, searching on
/// from `scanned`. `Ok(None)` until the LF has arrived; `too_long` once the line is longer
/// than the inline limit, whether or not its end has arrived (so the outcome does not
/// depend on how the bytes were split into reads).
fn find_line_end(
    buf: &BytesMut,
    start: usize,
    scanned: &mut usize,
    limits: &Limits,
    too_long: ProtocolError,
    not_a_number: ProtocolError,
) -> Result<Option<usize>, ProtocolError> {
    let from = (*scanned).max(start + 1);
    let found = buf.get(from..).and_then(|rest| rest.iter().position(|&b| b == b'\r')).map(|at| from + at);
    let Some(cr) = found else {
        if buf.len().saturating_sub(start) > limits.inline_bytes_max {
            return Err(too_long);
        }
        *scanned = buf.len().max(from);
        return Ok(None);
    };
    if cr - start > limits.inline_bytes_max {
        return Err(too_long);
    }
    *scanned = cr;
    match buf.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some(cr)),
        // Redis skips the byte after CR without looking; a stray CR inside a header is
        // not a number either way.
        Some(_) => Err(not_a_number),
    }
}

/// An inline request: one line ending in LF (CRLF from telnet), split into arguments.
fn inline_request(limits: &Limits, scanned: &mut usize, buf: &mut BytesMut) -> Result<Step, ProtocolError> {
    let from = *scanned;
    let found = buf.get(from..).and_then(|rest| rest.iter().position(|&b| b == b'\n')).map(|at| from + at);
    let Some(newline) = found else {
        if buf.len() > limits.inline_bytes_max {
            return Err(ProtocolError::TooBigInline);
        }
        *scanned = buf.len();
        return Ok(Step::NeedMore);
    };
    if newline > limits.inline_bytes_max {
        return Err(ProtocolError::TooBigInline);
    }
    let line = buf.split_to(newline + 1).freeze();
    *scanned = 0;
    let args = split_inline(&line)?;
    Ok(if args.is_empty() { Step::Skipped } else { Step::Request(args) })
}

/// Splits an inline line into arguments by Redis's rules (its `sdssplitargs`): blanks
/// separate arguments; `"..."` may hold `\n \r \t \b \a \xHH` and `\<any>` escapes, `'...'`
/// only `\'`; a closing quote must be followed by a blank or the end. Unquoted arguments are
/// slices of `line`; only quoted ones are copied, because they are rewritten.
fn split_inline(line: &Bytes) -> Result<Vec<Bytes>, ProtocolError> {
    let mut end = line.len().saturating_sub(1);
    if end > 0 && line.get(end - 1) == Some(&b'\r') {
        end -= 1;
    }
    // Redis reads the line as a C string: nothing after a NUL counts.
    if let Some(nul) = line.get(..end).and_then(|text| text.iter().position(|&b| b == 0)) {
        end = nul;
    }
    let text = line.get(..end).unwrap_or_default();
    let mut args = Vec::new();
    let mut at = 0;
    loop {
        while text.get(at).is_some_and(|&b| is_blank(b)) {
            at += 1;
        }
        if at >= text.len() {
            return Ok(args);
        }
        let start = at;
        while text.get(at).is_some_and(|&b| !ends_unquoted(b) && b != b'"' && b != b'\'') {
            at += 1;
        }
        match text.get(at) {
            Some(&quote @ (b'"' | b'\'')) => {
                let mut arg = text.get(start..at).unwrap_or_default().to_vec();
                at = read_quoted(text, at + 1, quote, &mut arg)?;
                args.push(Bytes::from(arg));
            }
            _ => args.push(line.slice(start..at)),
        }
    }
}

/// Appends the quoted part starting after the opening quote to `arg`; returns the index
/// after the closing quote.
fn read_quoted(text: &[u8], mut at: usize, quote: u8, arg: &mut Vec<u8>) -> Result<usize, ProtocolError> {
    loop {
        let Some(&byte) = text.get(at) else { return Err(ProtocolError::UnbalancedQuotes) };
        let next = text.get(at + 1).copied();
        if byte == quote {
            if next.is_some_and(|b| !is_blank(b)) {
                return Err(ProtocolError::UnbalancedQuotes);
            }
            return Ok(at + 1);
        }
        if byte != b'\\' || next.is_none() {
            arg.push(byte);
            at += 1;
            continue;
        }
        if quote == b'\'' {
            if next == Some(b'\'') {
                arg.push(b'\'');
                at += 2;
            } else {
                arg.push(byte);
                at += 1;
            }
            continue;
        }
        let hex = |i: usize| text.get(i).and_then(|&b| char::from(b).to_digit(16));
        if let (Some(b'x'), Some(high), Some(low)) = (next, hex(at + 2), hex(at + 3)) {
            arg.push((high * 16 + low) as u8);
            at += 4;
            continue;
        }
        arg.push(match next {
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'b') => 0x08,
            Some(b'a') => 0x07,
            Some(other) => other,
            None => byte,
        });
        at += 2;
    }
}

/// C's `isspace`: what separates inline arguments and may follow a closing quote.
fn is_blank(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// What ends an unquoted argument (Redis's list, narrower than `isspace`).
fn ends_unquoted(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        parse_all_with(Limits::default(), input)
    }

    fn parse_all_with(limits: Limits, input: &[u8]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut parser = Parser::new(limits);
        let mut buf = BytesMut::from(input);
        let mut requests = Vec::new();
        while let Some(request) = parser.parse(&mut buf)? {
            requests.push(request);
        }
        Ok(requests)
    }

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect()
    }

    fn message(error: ProtocolError) -> String {
        String::from_utf8_lossy(&error.message()).into_owned()
    }

    #[test]
    fn limits_changed_between_requests_apply_to_the_next() {
        let small = Limits { args_max: 2, bulk_bytes_max: 4, ..Limits::default() };
        let mut parser = Parser::new(small);
        let mut buf =
            BytesMut::from(&b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n"[..]);
        assert_eq!(parser.parse(&mut buf), Ok(Some(args(&["AUTH", "pw"]))));
        parser.set_limits(Limits::default());
        assert_eq!(parser.parse(&mut buf), Ok(Some(args(&["SET", "k", "value"]))));
        // The other way: the small limits refuse what the default ones took.
        parser.set_limits(Limits { args_max: 2, ..Limits::default() });
        let mut buf = BytesMut::from(&b"*3\r\n"[..]);
        assert_eq!(parser.parse(&mut buf), Err(ProtocolError::InvalidMultibulkLength));
    }

    #[test]
    fn array_requests_parse_and_leave_the_rest() {
        let mut parser = Parser::default();
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPI"[..]);
        assert_eq!(parser.parse(&mut buf), Ok(Some(args(&["GET", "k"]))));
        assert_eq!(parser.parse(&mut buf), Ok(None));
        assert_eq!(&buf[..], b"*1\r\n$4\r\nPI", "an incomplete request stays in the buffer");
        buf.extend_from_slice(b"NG\r\n");
        assert_eq!(parser.parse(&mut buf), Ok(Some(args(&["PING"]))));
        assert!(buf.is_empty());
    }

    #[test]
    fn arguments_are_binary_safe_and_may_be_empty() {
        let got = parse_all(b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\n\r\n\0\xff\r\n").unwrap();
        assert_eq!(got, vec![vec![Bytes::from_static(b"SET"), Bytes::new(), Bytes::from_static(b"\r\n\0\xff")]]);
    }

    #[test]
    fn arguments_share_the_request_buffer() {
        let mut parser = Parser::default();
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n"[..]);
        let request = parser.parse(&mut buf).unwrap().unwrap();
        // Slices of one allocation: the key sits right after the name and its CRLF + header.
        let gap = request[1].as_ptr() as usize - request[0].as_ptr() as usize;
        assert_eq!(gap, b"GET\r\n$5\r\n".len());
    }

    #[test]
    fn empty_requests_are_skipped() {
        let got = parse_all(b"*0\r\n*-1\r\n\r\n   \r\n\n*1\r\n$4\r\nPING\r\n").unwrap();
        assert_eq!(got, vec![args(&["PING"])]);
    }

    #[test]
    fn inline_requests_split_at_blanks() {
        let got = parse_all(b"PING\r\nset  k\tv \r\nGET x\n").unwrap();
        assert_eq!(got, vec![args(&["PING"]), args(&["set", "k", "v"]), args(&["GET", "x"])]);
    }

    #[test]
    fn inline_quotes_follow_redis() {
        for (line, expected) in [
            (&b"SET k \"a b\"\r\n"[..], vec![&b"SET"[..], b"k", b"a b"]),
            (b"SET k 'a b'\r\n", vec![b"SET", b"k", b"a b"]),
            (b"SET k \"\\x41\\n\\r\\t\\b\\a\\\\\\\"\\q\"\r\n", vec![b"SET", b"k", b"A\n\r\t\x08\x07\\\"q"]),
            (b"SET k \"\\x4\"\r\n", vec![b"SET", b"k", b"x4"]),
            (b"SET k 'it\\'s \\n'\r\n", vec![b"SET", b"k", b"it's \\n"]),
            (b"ECHO a\"b c\"\r\n", vec![b"ECHO", b"ab c"]),
            (b"ECHO \"\"\r\n", vec![b"ECHO", b""]),
            (b"ECHO \"x\"\x0bnext\r\n", vec![b"ECHO", b"x", b"next"]),
            (b"ECHO a\x0bb\r\n", vec![b"ECHO", b"a\x0bb"]),
            (b"ECHO a\0 ignored \"\r\n", vec![b"ECHO", b"a"]),
        ] {
            let got = parse_all(line).unwrap();
            let expected: Vec<Bytes> = expected.into_iter().map(Bytes::copy_from_slice).collect();
            assert_eq!(got, vec![expected], "{}", line.escape_ascii());
        }
    }

    #[test]
    fn unbalanced_quotes_are_a_protocol_error() {
        for line in
            [&b"ECHO \"abc\r\n"[..], b"ECHO 'abc\r\n", b"ECHO \"a\"b\r\n", b"ECHO 'a'b\r\n", b"ECHO \"a\\\"\r\n"]
        {
            let error = parse_all(line).unwrap_err();
            assert_eq!(message(error), "Protocol error: unbalanced quotes in request", "{}", line.escape_ascii());
        }
    }

    #[test]
    fn array_header_errors_use_redis_texts() {
        for (input, text) in [
            (&b"*abc\r\n"[..], "Protocol error: invalid multibulk length"),
            (b"*03\r\n", "Protocol error: invalid multibulk length"),
            (b"*+3\r\n", "Protocol error: invalid multibulk length"),
            (b"*\r\n", "Protocol error: invalid multibulk length"),
            (b"*1048577\r\n", "Protocol error: invalid multibulk length"),
            (b"*99999999999999999999\r\n", "Protocol error: invalid multibulk length"),
            (b"*1\rX", "Protocol error: invalid multibulk length"),
            (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$x\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$536870913\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$1\rX", "Protocol error: invalid bulk length"),
            (b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n", "Protocol error: expected '$', got 'f'"),
            (b"*1\r\n:1\r\n", "Protocol error: expected '$', got ':'"),
            (b"*1\r\n$3\r\nGETxx", "Protocol error: bulk string not followed by CRLF"),
        ] {
            let error = parse_all(input).unwrap_err();
            assert_eq!(message(error), text, "{}", input.escape_ascii());
        }
    }

    #[test]
    fn the_largest_allowed_counts_pass() {
        let limits = Limits { args_max: 3, bulk_bytes_max: 4, ..Limits::default() };
        let got = parse_all_with(limits.clone(), b"*3\r\n$4\r\nabcd\r\n$0\r\n\r\n$1\r\nx\r\n").unwrap();
        assert_eq!(got, vec![args(&["abcd", "", "x"])]);
        assert_eq!(parse_all_with(limits.clone(), b"*4\r\n"), Err(ProtocolError::InvalidMultibulkLength));
        assert_eq!(parse_all_with(limits, b"*1\r\n$5\r\n"), Err(ProtocolError::InvalidBulkLength));
    }

    #[test]
    fn long_lines_are_refused_before_they_end() {
        let limits = Limits { inline_bytes_max: 16, ..Limits::default() };
        let mut parser = Parser::new(limits.clone());
        let mut buf = BytesMut::from(&b"PING 0123456789"[..]);
        assert_eq!(parser.parse(&mut buf), Ok(None));
        buf.extend_from_slice(b"ab");
        assert_eq!(parser.parse(&mut buf), Err(ProtocolError::TooBigInline));
        // Exactly at the limit is fine; one more byte is not, wherever the line ends.
        assert_eq!(
            parse_all_with(limits.clone(), b"ECHO 0123456789a\n").unwrap(),
            vec![args(&["ECHO", "0123456789a"])]
        );
        assert_eq!(parse_all_with(limits.clone(), b"ECHO 0123456789ab\n"), Err(ProtocolError::TooBigInline));
        assert_eq!(message(ProtocolError::TooBigInline), "Protocol error: too big inline request");

        let count_line = b"*1111111111111111111";
        assert_eq!(parse_all_with(limits.clone(), count_line), Err(ProtocolError::TooBigMultibulkCount));
        assert_eq!(message(ProtocolError::TooBigMultibulkCount), "Protocol error: too big mbulk count string");
        let bulk_line = b"*1\r\n$1111111111111111111";
        assert_eq!(parse_all_with(limits, bulk_line), Err(ProtocolError::TooBigBulkCount));
        assert_eq!(message(ProtocolError::TooBigBulkCount), "Protocol error: too big bulk count string");
    }

    #[test]
    fn a_request_over_the_size_limit_is_refused_at_its_header() {
        let limits = Limits { request_bytes_max: 40, ..Limits::default() };
        // 4 + 9 + 4 + 2 + ... : the second header announces more than fits.
        let mut parser = Parser::new(limits);
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$30\r\n"[..]);
        assert_eq!(parser.parse(&mut buf), Err(ProtocolError::RequestTooBig));
    }

    #[test]
    fn errors_are_sticky() {
        let mut parser = Parser::default();
        let mut buf = BytesMut::from(&b"*x\r\n"[..]);
        assert_eq!(parser.parse(&mut buf), Err(ProtocolError::InvalidMultibulkLength));
        let mut good = BytesMut::from(&b"PING\r\n"[..]);
        assert_eq!(parser.parse(&mut good), Err(ProtocolError::InvalidMultibulkLength));
    }

    #[test]
    fn the_reply_to_a_protocol_error_is_an_err_line() {
        let frame = ProtocolError::ExpectedBulk { got: b'x' }.to_frame();
        assert_eq!(frame, Frame::error("ERR Protocol error: expected '$', got 'x'"));
        assert_eq!(ProtocolError::ExpectedBulk { got: b'\n' }.to_string(), "Protocol error: expected '$', got '\\n'");
    }

    #[test]
    fn bytes_missing_tells_the_size_of_a_pending_bulk() {
        let mut parser = Parser::default();
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$1000\r\nabc"[..]);
        assert_eq!(parser.bytes_missing(&buf), 0);
        assert_eq!(parser.parse(&mut buf), Ok(None));
        assert_eq!(parser.bytes_missing(&buf), 1000 - 3 + 2);
    }

    #[test]
    fn a_buffer_shrunk_against_the_contract_does_not_panic() {
        let mut parser = Parser::default();
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$3\r\nab"[..]);
        assert_eq!(parser.parse(&mut buf), Ok(None));
        buf.clear();
        assert_eq!(parser.parse(&mut buf), Ok(None));
        buf.extend_from_slice(b"*1");
        let _ = parser.parse(&mut buf);
    }
}
