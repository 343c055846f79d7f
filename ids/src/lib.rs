//! flotilla-ids: the identifiers every Flotilla crate shares, so that a node or a group is
//! one type from the Raft engine to the transport, the placement layer and the client.
//!
//! Both are plain newtypes over `u64`, serialized as a newtype (bincode, JSON and TOML see
//! the bare number): changing which crate defines them changes no on-disk or wire format.
//! A shard is a Raft group: the placement layer calls it `ShardId`, the same type.
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                $name(v)
            }
        }
    };
}

id_newtype!(
    /// The id of a node (a process taking part in Raft groups), unique in a cluster. It is the
    /// number in the node's certificate (`node-<id>.flotilla`); ids start at 1.
    NodeId
);
id_newtype!(
    /// The id of a Raft group. One process runs many groups; every data shard is one group
    /// (group 0 is the meta group). The Raft engine does not look at it; the transport uses it
    /// only to choose a stream, so that the messages of one group stay in order.
    GroupId
);
