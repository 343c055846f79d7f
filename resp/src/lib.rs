//! flotilla-resp: the Redis protocol for Flotilla's Redis front door. Protocol only: no
//! sockets, no storage, no cluster. The node's connection task wires it up:
//!
//! 1. Append what the socket reads to a `BytesMut` and call [`Parser::parse`] until it
//!    returns `Ok(None)`; each `Some(args)` is one request. On a [`ProtocolError`], send
//!    its [`ProtocolError::to_frame`] and close the connection.
//! 2. Turn the arguments into a [`Command`] with [`Command::parse`]; on a [`CommandError`],
//!    reply with its frame and go on with the next request.
//! 3. Execute the command and [`Frame::encode`] the reply into the output buffer under the
//!    connection's [`Protocol`] (RESP2 until `HELLO 3`).
//!
//! [`Command::spec`] gives the table's entry ([`table`]): flags for routing (readonly,
//! write, connection-local), key positions. [`introspection`] builds `COMMAND`'s replies
//! in the shapes redis-cli reads; [`error`] holds Redis's error texts, [`number`] its
//! rules for numbers in strings.
#![warn(missing_docs)]

pub mod command;
pub mod error;
pub mod frame;
pub mod introspection;
pub mod number;
pub mod parse;
pub mod table;

pub use command::Command;
pub use error::CommandError;
pub use frame::{Frame, Protocol};
pub use parse::{Limits, Parser, ProtocolError};
