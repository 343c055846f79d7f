//! Command errors: the texts Redis replies with, word for word.
//!
//! Client libraries and test suites match on these strings (`WRONGTYPE`, `NOPROTO`, "value
//! is not an integer"), so they are Redis's exactly, error code included. CR and LF inside a
//! message, which user input can bring in, are sent as spaces by the frame encoder.

use std::fmt;

use bytes::Bytes;

use crate::frame::Frame;

/// `ERR syntax error`
pub const SYNTAX: &str = "ERR syntax error";
/// `ERR value is not an integer or out of range`
pub const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
/// `ERR value is not a valid float`
pub const NOT_A_FLOAT: &str = "ERR value is not a valid float";
/// `ERR invalid cursor`
pub const INVALID_CURSOR: &str = "ERR invalid cursor";
/// `ERR decrement would overflow` (`DECRBY` by the smallest integer)
pub const DECREMENT_OVERFLOW: &str = "ERR decrement would overflow";
/// `ERR increment or decrement would overflow`
pub const INCREMENT_OVERFLOW: &str = "ERR increment or decrement would overflow";
/// `ERR increment would produce NaN or Infinity`
pub const FLOAT_OVERFLOW: &str = "ERR increment would produce NaN or Infinity";
/// `WRONGTYPE ...`: the key holds a value of another type.
pub const WRONG_TYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
/// `NOAUTH ...`: a command other than AUTH/HELLO/QUIT before authenticating.
pub const NO_AUTH: &str = "NOAUTH Authentication required.";
/// `NOAUTH ...` for `HELLO` without `AUTH` before authenticating.
pub const HELLO_NO_AUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time";
/// `CROSSSLOT ...` (Redis Cluster's): a multi-key command whose keys live in different shards.
pub const CROSS_SLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";
/// `WRONGPASS ...`
pub const WRONG_PASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
/// `NOPROTO ...`: HELLO with a version other than 2 or 3.
pub const NO_PROTO: &str = "NOPROTO unsupported protocol version";
/// HELLO with a version that is not a number.
pub const PROTOCOL_VERSION_NOT_AN_INTEGER: &str = "ERR Protocol version is not an integer or out of range";
/// CLIENT SETNAME or HELLO SETNAME with a blank or a byte outside `!`..`~`.
pub const INVALID_CLIENT_NAME: &str = "ERR Client names cannot contain spaces, newlines or special characters.";
/// `ERR DB index is out of range`
pub const DB_INDEX_OUT_OF_RANGE: &str = "ERR DB index is out of range";
/// `ERR SELECT is not allowed in cluster mode`
pub const SELECT_IN_CLUSTER: &str = "ERR SELECT is not allowed in cluster mode";

/// Redis cuts user input it quotes in an error at this many bytes.
const QUOTE_MAX: usize = 128;

/// A request that names no known command, has the wrong arguments, or an argument Redis
/// would refuse. Reply with [`CommandError::to_frame`]; the connection stays usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandError {
    message: Bytes,
}

impl CommandError {
    /// An error with this full text, code included (`ERR ...`, `WRONGTYPE ...`).
    pub fn new(message: impl Into<Bytes>) -> CommandError {
        CommandError { message: message.into() }
    }

    /// A constant text.
    pub const fn from_static(message: &'static str) -> CommandError {
        CommandError { message: Bytes::from_static(message.as_bytes()) }
    }

    /// `ERR wrong number of arguments for 'get' command`; `name` is the table's
    /// (lowercase, `client|setname` for a subcommand).
    pub fn wrong_arity(name: &str) -> CommandError {
        CommandError::new(format!("ERR wrong number of arguments for '{name}' command"))
    }

    /// `ERR unknown command 'foo', with args beginning with: 'a' 'b' `: the name and the
    /// first arguments as the client sent them, cut at 128 bytes like Redis does.
    pub fn unknown_command(args: &[Bytes]) -> CommandError {
        let name = args.first().map(|name| quote_prefix(name, QUOTE_MAX)).unwrap_or_default();
        let mut message = b"ERR unknown command '".to_vec();
        message.extend_from_slice(name);
        message.extend_from_slice(b"', with args beginning with: ");
        let mut listed = Vec::new();
        for arg in args.iter().skip(1) {
            if listed.len() >= QUOTE_MAX {
                break;
            }
            let room = QUOTE_MAX - listed.len();
            listed.push(b'\'');
            listed.extend_from_slice(quote_prefix(arg, room));
            listed.extend_from_slice(b"' ");
        }
        message.extend_from_slice(&listed);
        CommandError::new(message)
    }

    /// `ERR unknown subcommand 'foo'. Try CLIENT HELP.`: the subcommand as sent, the
    /// command in upper case.
    pub fn unknown_subcommand(command: &[u8], subcommand: &[u8]) -> CommandError {
        let mut message = b"ERR unknown subcommand '".to_vec();
        message.extend_from_slice(quote_prefix(subcommand, QUOTE_MAX));
        message.extend_from_slice(b"'. Try ");
        message.extend(command.iter().map(u8::to_ascii_uppercase));
        message.extend_from_slice(b" HELP.");
        CommandError::new(message)
    }

    /// `ERR invalid expire time in 'set' command`
    pub fn invalid_expire_time(name: &str) -> CommandError {
        CommandError::new(format!("ERR invalid expire time in '{name}' command"))
    }

    /// The full text.
    pub fn message(&self) -> &Bytes {
        &self.message
    }

    /// The reply: `-<message>`.
    pub fn to_frame(&self) -> Frame {
        Frame::Error(self.message.clone())
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.message)
    }
}

/// Writes printable ASCII as it is and every other byte escaped, for logs.
pub(crate) fn write_escaped(f: &mut fmt::Formatter<'_>, text: &[u8]) -> fmt::Result {
    for &byte in text {
        if (0x20..0x7f).contains(&byte) {
            write!(f, "{}", char::from(byte))?;
        } else {
            write!(f, "{}", byte.escape_ascii())?;
        }
    }
    Ok(())
}

impl std::error::Error for CommandError {}

/// What of `text` Redis's `%.Ns` prints: at most `max` bytes, and nothing from a NUL on.
fn quote_prefix(text: &[u8], max: usize) -> &[u8] {
    let text = &text[..text.len().min(max)];
    match text.iter().position(|&b| b == 0) {
        Some(nul) => &text[..nul],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect()
    }

    #[test]
    fn unknown_command_lists_the_first_arguments() {
        let error = CommandError::unknown_command(&args(&["foo", "a", "b"]));
        assert_eq!(error.message(), "ERR unknown command 'foo', with args beginning with: 'a' 'b' ");
        let error = CommandError::unknown_command(&args(&["FOO"]));
        assert_eq!(error.message(), "ERR unknown command 'FOO', with args beginning with: ");
    }

    #[test]
    fn unknown_command_quotes_at_most_128_bytes() {
        let long = "x".repeat(300);
        let error = CommandError::unknown_command(&args(&[&long, &long, "never"]));
        let text = String::from_utf8(error.message().to_vec()).unwrap();
        let expected_name = format!("ERR unknown command '{}'", "x".repeat(128));
        assert!(text.starts_with(&expected_name), "{text}");
        // The argument list stops once it reaches 128 bytes: one argument cut to fit.
        let listed = text.split("beginning with: ").nth(1).unwrap();
        assert_eq!(listed, format!("'{}' ", "x".repeat(128)));
        let error = CommandError::unknown_command(&args(&["f", "a\0b", "c"]));
        assert_eq!(error.message(), "ERR unknown command 'f', with args beginning with: 'a' 'c' ");
    }

    #[test]
    fn other_templates() {
        assert_eq!(CommandError::wrong_arity("get").message(), "ERR wrong number of arguments for 'get' command");
        assert_eq!(
            CommandError::unknown_subcommand(b"client", b"Foo").message(),
            "ERR unknown subcommand 'Foo'. Try CLIENT HELP."
        );
        assert_eq!(CommandError::invalid_expire_time("set").message(), "ERR invalid expire time in 'set' command");
        assert_eq!(CommandError::from_static(SYNTAX).to_frame(), Frame::error("ERR syntax error"));
    }
}
