//! flotilla-placement: the shard map (key ranges to shards, with epochs), split decisions and
//! the balancer. Pure logic, no I/O.
//!
//! Not built yet: see the placement issue. It depends on no other crate of ours.
#![warn(missing_docs)]
