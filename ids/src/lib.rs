//! flotilla-ids: the identifiers every Flotilla crate shares, so that a node or a group is
//! one type from the Raft engine to the transport, the placement layer and the client.
//!
//! Both are plain newtypes over `u64`, serialized as a newtype (bincode, JSON and TOML see
//! the bare number): changing which crate defines them changes no on-disk or wire format.
//! A shard is a Raft group: the placement layer calls it `ShardId`, the same type.
#![warn(missing_docs)]

/// Defines a `u64` newtype: `pub struct $name(pub u64)`, displayed as the bare number, made
/// `From<u64>`, serialized as a plain newtype. The ids below use it, and so do other crates for
/// their own numbers (Raft's `Term` and `LogIndex`); a crate calling it needs `serde`.
#[macro_export]
macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, ::serde::Serialize, ::serde::Deserialize,
        )]
        pub struct $name(pub u64);

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl ::core::convert::From<u64> for $name {
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
