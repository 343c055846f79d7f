//! The Redis front door: a RESP listener on every node that has one configured, so that
//! `redis-cli`, `redis-benchmark` and Redis client libraries work against Flotilla unchanged
//! (issue 15). The protocol itself (parser, typed commands, replies, Redis's error texts) is
//! the `flotilla-resp` crate; this module owns the sockets and the meaning of each command.
//!
//! - `listener.rs`: the accept loop, the connection limit, the plaintext-on-loopback rule.
//! - `connection.rs`: one task per connection: pipelined requests run and answered in the
//!   order sent, bounded buffers, replies written in batches, a protocol error answered and the
//!   connection closed.
//! - `dispatch.rs`: what each command does, in terms of gets, puts, deletes, compare-and-swaps
//!   and scans.
//! - `router.rs`: every key goes through the node's own client path (the shard map, the
//!   shard's leader, redirects followed and stale epochs refreshed inside the node), so a
//!   client needs one address.
//! - `info.rs`: `INFO`, `HELLO`'s map and `CLIENT INFO`.
//! - `metrics.rs`: per-command counters for `/metrics`.
//! - `cursors.rs`: `SCAN` cursors, each standing for the key a scan goes on from.
//! - `glob.rs`: Redis's glob patterns for `SCAN MATCH` and `KEYS`.
//!
//! Not built yet: TLS and `AUTH` (so a listener is allowed only on loopback, and only when the
//! configuration says plaintext there is wanted), expiries, `MSETNX`, `DBSIZE`, and atomic
//! multi-key commands across shards.

mod connection;
mod cursors;
mod dispatch;
mod glob;
mod info;
mod listener;
mod metrics;
mod router;

pub use listener::{bind, Listener};
pub use metrics::RespMetrics;

use flotilla_resp::Limits;
use std::net::SocketAddr;

/// Most connections one node's RESP listener serves at once; more are refused with Redis's
/// "max number of clients reached" (Redis's own default `maxclients`).
pub const CONNECTIONS_MAX: usize = 10_000;
/// Longest bulk string accepted (8 MiB): above Flotilla's 1 MiB value limit, so a value a bit
/// too large gets a clear error reply instead of a closed connection, yet bounded.
pub const BULK_BYTES_MAX: usize = 8 << 20;
/// Smallest `bulk_bytes_max` accepted (a key must fit).
pub const BULK_BYTES_MIN: usize = 64 << 10;
/// Largest `bulk_bytes_max` accepted (Redis's own default).
pub const BULK_BYTES_LIMIT: usize = 512 << 20;
/// Most bytes of one request (64 MiB, e.g. a large `MSET`): what one connection may buffer.
pub const REQUEST_BYTES_MAX: usize = 64 << 20;

/// A node's RESP listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RespConfig {
    /// TCP address (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// Plaintext without authentication is allowed only on a loopback address, and only when
    /// this is set (`flotilla dev` sets it): until TLS and AUTH exist, nothing else starts.
    pub plaintext_loopback: bool,
    /// The request parser's limits.
    pub limits: Limits,
    /// Most connections at once.
    pub connections_max: usize,
}

impl RespConfig {
    /// A listener at `listen` with the default limits; plaintext not allowed yet.
    pub fn new(listen: SocketAddr) -> RespConfig {
        RespConfig {
            listen,
            plaintext_loopback: false,
            limits: Limits {
                bulk_bytes_max: BULK_BYTES_MAX,
                request_bytes_max: REQUEST_BYTES_MAX,
                ..Limits::default()
            },
            connections_max: CONNECTIONS_MAX,
        }
    }

    /// Why this listener may not start, if it may not.
    pub fn check(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() {
            return Err(format!(
                "resp_listen {}: the Redis listener speaks plaintext without AUTH (TLS and AUTH are not built yet), \
                 so it may only listen on a loopback address",
                self.listen
            ));
        }
        if !self.plaintext_loopback {
            return Err(format!(
                "resp_listen {}: plaintext Redis protocol without AUTH must be asked for: set \
                 resp_plaintext_loopback = true, or --resp-plaintext-loopback (flotilla dev does)",
                self.listen
            ));
        }
        if self.connections_max == 0 {
            return Err("resp_connections_max must be at least 1".into());
        }
        let bulk = self.limits.bulk_bytes_max;
        if !(BULK_BYTES_MIN..=BULK_BYTES_LIMIT).contains(&bulk) {
            return Err(format!("resp_bulk_bytes_max: {bulk} is not within {BULK_BYTES_MIN}..={BULK_BYTES_LIMIT}"));
        }
        if bulk > self.limits.request_bytes_max {
            return Err(format!(
                "resp_bulk_bytes_max: {bulk} is above the request limit of {} bytes",
                self.limits.request_bytes_max
            ));
        }
        Ok(())
    }
}
