//! flotilla-resp: the Redis protocol for Flotilla's Redis front door. Protocol only: no
//! sockets, no storage, no cluster.
#![warn(missing_docs)]

pub mod error;
pub mod frame;
pub mod number;
pub mod parse;

pub use frame::{Frame, Protocol};
pub use parse::{Limits, Parser, ProtocolError};
