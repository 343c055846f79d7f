//! The server's self-descriptions: `HELLO`'s map, `INFO`'s sections and `CLIENT INFO`'s line,
//! in the shapes Redis clients parse. Flotilla reports itself as a Redis 7.2 server in
//! standalone mode (`flotilla_version` says what it is): a client must not try Redis Cluster's
//! slot routing, since any node routes any key itself.

use super::connection::Shared;
use super::dispatch::Conn;
use bytes::Bytes;
use flotilla_resp::{Frame, Protocol};
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// The Redis version whose commands and replies the front door follows.
pub const REDIS_VERSION: &str = "7.2.0";
/// Sections `INFO` knows; `INFO` alone, `all`, `default` and `everything` give them all.
const SECTIONS: [&str; 4] = ["server", "clients", "keyspace", "flotilla"];

fn text(s: &'static str) -> Frame {
    Frame::bulk(Bytes::from_static(s.as_bytes()))
}

/// `HELLO`'s reply.
pub fn hello(conn: &Conn) -> Frame {
    Frame::Map(vec![
        (text("server"), text("redis")),
        (text("version"), text(REDIS_VERSION)),
        (text("proto"), Frame::Integer(conn.protocol.number())),
        (text("id"), Frame::Integer(i64::try_from(conn.id).unwrap_or(i64::MAX))),
        (text("mode"), text("standalone")),
        (text("role"), text("master")),
        (text("modules"), Frame::Array(Vec::new())),
    ])
}

/// `CLIENT INFO`'s line (Redis's fields that mean something here).
pub fn client_line(conn: &Conn) -> String {
    let local = conn.local.map(|a| a.to_string()).unwrap_or_default();
    format!(
        "id={} addr={} laddr={local} name={} age={} idle={} flags={} db=0 resp={} cmd={} user={} lib-name={} lib-ver={}\n",
        conn.id,
        conn.peer,
        String::from_utf8_lossy(&conn.name),
        conn.created.elapsed().as_secs(),
        conn.last_active.elapsed().as_secs(),
        if conn.consistency == crate::wire::ReadConsistency::Stale { "r" } else { "N" },
        if conn.protocol == Protocol::Resp3 { 3 } else { 2 },
        if conn.last_command.is_empty() { "NULL" } else { conn.last_command },
        conn.principal.as_ref().map_or("", |p| p.user.as_str()),
        String::from_utf8_lossy(&conn.lib_name),
        String::from_utf8_lossy(&conn.lib_ver),
    )
}

/// `INFO [section ...]`. A principal limited to a key prefix (a tenant) gets the `server`
/// section only: the others describe the whole node and cluster (every client's connections,
/// the shards, the requests served), which are not a tenant's to see. Sections it may not see
/// are left out as unknown ones are.
pub async fn info(shared: &Shared, conn: &Conn, asked: &[Bytes]) -> String {
    let all = asked.is_empty()
        || asked.iter().any(|s| ["all", "default", "everything"].iter().any(|a| s.eq_ignore_ascii_case(a.as_bytes())));
    let tenant = conn.principal.as_ref().and_then(|p| p.grant.as_ref()).is_some_and(|g| g.prefix.is_some());
    let visible = |name: &str| !tenant || name == "server";
    let wanted = |name: &str| visible(name) && (all || asked.iter().any(|s| s.eq_ignore_ascii_case(name.as_bytes())));
    let node = shared.router.node();
    let mut out = String::new();
    for section in SECTIONS.into_iter().filter(|s| wanted(s)) {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        match section {
            "server" => {
                let uptime = shared.started.elapsed().as_secs();
                let _ = write!(
                    out,
                    "# Server\r\nredis_version:{REDIS_VERSION}\r\nflotilla_version:{}\r\nredis_mode:standalone\r\n\
                     os:{} {}\r\narch_bits:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{uptime}\r\n\
                     uptime_in_days:{}\r\nflotilla_node_id:{}\r\n",
                    env!("CARGO_PKG_VERSION"),
                    std::env::consts::OS,
                    std::env::consts::ARCH,
                    usize::BITS,
                    std::process::id(),
                    shared.port,
                    uptime / 86_400,
                    node.id(),
                );
            }
            "clients" => {
                let m = &shared.metrics;
                let _ = write!(
                    out,
                    "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nrejected_connections:{}\r\n\
                     total_connections_received:{}\r\n",
                    m.connected.load(Ordering::Relaxed),
                    shared.connections_max,
                    m.rejected.load(Ordering::Relaxed),
                    m.accepted.load(Ordering::Relaxed),
                );
            }
            "keyspace" => {
                // Flotilla keeps no key count (DBSIZE counts by scanning every shard, too slow
                // for INFO), and Redis leaves out a database it has nothing to say about; the
                // shards are Flotilla's keyspace.
                let view = node.meta_view();
                let _ = write!(out, "# Keyspace\r\nflotilla_shards:{}\r\n", view.map.shards().count());
            }
            _ => {
                let view = node.meta_view();
                let infos = node.host().group_info().await.unwrap_or_default();
                let leading = infos.iter().filter(|i| i.role == crate::raft::Role::Leader).count();
                let _ = write!(
                    out,
                    "# Flotilla\r\nnodes:{}\r\nshards:{}\r\ngroups_here:{}\r\ngroups_led_here:{leading}\r\n\
                     read_consistency:{:?}\r\nrequests_served:{}\r\n",
                    view.nodes.len(),
                    view.map.shards().count(),
                    infos.len(),
                    conn.consistency,
                    node.stats().requests.load(Ordering::Relaxed),
                );
            }
        }
    }
    out
}
