//! The Redis front door: a RESP listener on every node that has one configured, so that
//! `redis-cli`, `redis-benchmark` and Redis client libraries work against Flotilla unchanged
//! (issue 15). The protocol itself (parser, typed commands, replies, Redis's error texts) is
//! the `flotilla-resp` crate; this module owns the sockets and the meaning of each command.
//!
//! - `listener.rs`: the accept loop, the connection limit, TLS handshakes.
//! - `tls.rs`: TLS with the node's certificate and the cluster CAs; client certificates.
//! - `users.rs`: password users (`AUTH`), their hashes and the constant-time check.
//! - `access.rs`: who a connection acts as; `-NOAUTH` before authentication, and every command
//!   authorized by the role and prefix rules of `crate::authz` before it runs.
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
//! # Security
//!
//! A listener authenticates its clients by TLS client certificates (`resp_tls`), by passwords
//! (`[[resp_users]]`), or both; [`RespConfig::check`] refuses any other listener except
//! plaintext without authentication on a loopback address with `resp_plaintext_loopback`
//! (`flotilla dev`). Who may authenticate how:
//!
//! | listener            | client certificate | a connection without one               |
//! |---------------------|--------------------|----------------------------------------|
//! | TLS, no users       | required           | refused at the handshake               |
//! | TLS and users       | optional           | must `AUTH` (`-NOAUTH` until then)     |
//! | plaintext and users | —                  | must `AUTH`                            |
//! | plaintext, no users | —                  | loopback only, unrestricted (`default`)|
//!
//! A certificate's role and prefix, or a user's, then limit every command (`access.rs`), by
//! the same rules as the client protocol (`crate::authz`). Passwords cross a plaintext listener
//! in the clear: outside loopback, use TLS with them.
//!
//! Until a connection that must authenticate has, its requests are held to Redis's small
//! limits (10 arguments, bulk strings of 16 KiB: a larger one closes it), it has
//! `resp_auth_timeout_ms` ([`AUTH_TIMEOUT`]) from its accept to authenticate, and
//! [`AUTH_FAILURES_MAX`] wrong passwords close any connection; failed `AUTH`s are counted
//! and logged at most once a second.
//!
//! Not built yet: expiries, atomic multi-key commands across shards, and changing users without
//! a restart (SIGHUP reloads certificates only).

mod access;
mod connection;
mod cursors;
mod dispatch;
mod glob;
mod info;
mod listener;
mod metrics;
mod router;
mod tls;
mod users;

pub use listener::{bind, Listener};
pub use metrics::RespMetrics;
pub use tls::RespTls;
pub use users::{sha256, User, Users};

use flotilla_resp::Limits;
use std::net::SocketAddr;
use std::time::Duration;

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

/// How long a connection that must authenticate (one without a client certificate, on a
/// listener with users) may take to, from its accept; then it is closed (`resp_auth_timeout_ms`).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Most arguments of a request before the connection has authenticated (Redis's limit since
/// CVE-2021-32675: `HELLO 3 AUTH user password SETNAME name` is 7).
pub const UNAUTHENTICATED_ARGS_MAX: usize = 10;
/// Longest bulk string before the connection has authenticated (Redis's, since the same fix).
pub const UNAUTHENTICATED_BULK_BYTES_MAX: usize = 16 << 10;
/// Most bytes of one request before the connection has authenticated: its arguments at their
/// longest, with room for their headers.
pub const UNAUTHENTICATED_REQUEST_BYTES_MAX: usize = UNAUTHENTICATED_ARGS_MAX * (UNAUTHENTICATED_BULK_BYTES_MAX + 32);
/// Failed `AUTH`s (or `HELLO ... AUTH`s) after which a connection is closed, the last one
/// answered first; a successful one starts the count again.
pub const AUTH_FAILURES_MAX: u32 = 10;

/// A node's RESP listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RespConfig {
    /// TCP address (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// Plaintext without authentication is allowed only on a loopback address, and only when
    /// this is set (`flotilla dev` sets it).
    pub plaintext_loopback: bool,
    /// Speak TLS, with the node's certificate and the cluster's CAs ([`RespTls`]).
    pub tls: bool,
    /// Password users (`AUTH`); with any, a connection without a client certificate must
    /// authenticate.
    pub users: Users,
    /// Refuse client certificates without a role (as the transport does with the node's
    /// `require_client_roles`; `Node::start` copies it).
    pub require_client_roles: bool,
    /// The request parser's limits.
    pub limits: Limits,
    /// Most connections at once.
    pub connections_max: usize,
    /// How long a connection that must authenticate may take to ([`AUTH_TIMEOUT`]).
    pub auth_timeout: Duration,
}

impl RespConfig {
    /// A listener at `listen` with the default limits; no TLS, no users, plaintext not allowed
    /// (set one of them).
    pub fn new(listen: SocketAddr) -> RespConfig {
        RespConfig {
            listen,
            plaintext_loopback: false,
            tls: false,
            users: Users::default(),
            require_client_roles: false,
            limits: Limits {
                bulk_bytes_max: BULK_BYTES_MAX,
                request_bytes_max: REQUEST_BYTES_MAX,
                ..Limits::default()
            },
            connections_max: CONNECTIONS_MAX,
            auth_timeout: AUTH_TIMEOUT,
        }
    }

    /// The parser's limits until a connection that must authenticate has: Redis's small ones
    /// ([`UNAUTHENTICATED_ARGS_MAX`] arguments, bulk strings of
    /// [`UNAUTHENTICATED_BULK_BYTES_MAX`]), so that a client without a password cannot make
    /// the node buffer a large request. Larger ones break the protocol: the connection is
    /// closed.
    pub fn unauthenticated_limits(&self) -> Limits {
        let configured = &self.limits;
        Limits {
            bulk_bytes_max: configured.bulk_bytes_max.min(UNAUTHENTICATED_BULK_BYTES_MAX),
            args_max: configured.args_max.min(UNAUTHENTICATED_ARGS_MAX),
            inline_bytes_max: configured.inline_bytes_max,
            request_bytes_max: configured.request_bytes_max.min(UNAUTHENTICATED_REQUEST_BYTES_MAX),
        }
    }

    /// Why this listener may not start, if it may not.
    pub fn check(&self) -> Result<(), String> {
        let authenticated = self.tls || self.users.any();
        if !authenticated && !self.listen.ip().is_loopback() {
            return Err(format!(
                "resp_listen {}: a Redis listener outside loopback must authenticate its clients: set \
                 resp_tls = true (client certificates from the cluster CA) and/or add [[resp_users]] (AUTH \
                 with a password); plaintext without authentication is allowed on a loopback address only",
                self.listen
            ));
        }
        if !authenticated && !self.plaintext_loopback {
            return Err(format!(
                "resp_listen {}: plaintext Redis protocol without authentication must be asked for: set \
                 resp_plaintext_loopback = true (or --resp-plaintext-loopback; flotilla dev does), or \
                 resp_tls = true, or add [[resp_users]]",
                self.listen
            ));
        }
        if self.auth_timeout.is_zero() {
            return Err("resp_auth_timeout_ms must be at least 1".into());
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
