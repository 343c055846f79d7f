//! Counters of the Redis front door, exported in `/metrics`: connections, and for every
//! command of the table its calls, error replies and a latency histogram. The map of counters
//! is built once from the table, so counting takes no lock.

use flotilla_resp::table::COMMANDS;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The name requests that name no known command are counted under.
const UNKNOWN: &str = "unknown";

/// Upper bounds of the latency buckets (seconds): a local lease read to a slow write.
const LATENCY_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
struct CommandCounters {
    calls: AtomicU64,
    errors: AtomicU64,
    /// Calls per latency bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_us: AtomicU64,
}

/// Counters of one node's RESP listener.
#[derive(Debug)]
pub struct RespMetrics {
    commands: HashMap<&'static str, CommandCounters>,
    /// Connections open now.
    pub(crate) connected: AtomicU64,
    /// Connections accepted since start.
    pub(crate) accepted: AtomicU64,
    /// Connections refused at the connection limit.
    pub(crate) rejected: AtomicU64,
    /// Connections closed after a protocol error.
    pub(crate) protocol_errors: AtomicU64,
    /// TLS connections refused: failed handshakes, certificates that may not be used.
    pub(crate) tls_refused: AtomicU64,
    /// `AUTH` (or `HELLO ... AUTH`) with a wrong user or password.
    pub(crate) auth_failures: AtomicU64,
    /// Commands refused with `-NOAUTH` or `-NOPERM`.
    pub(crate) denied: AtomicU64,
    /// Connections closed because they did not authenticate in time, or failed to too often.
    pub(crate) auth_closed: AtomicU64,
}

impl Default for RespMetrics {
    fn default() -> RespMetrics {
        let commands = COMMANDS.iter().map(|spec| spec.name).chain([UNKNOWN]).map(|n| (n, CommandCounters::default()));
        RespMetrics {
            commands: commands.collect(),
            connected: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            tls_refused: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            auth_closed: AtomicU64::new(0),
        }
    }
}

impl RespMetrics {
    /// Counts one request of the command `name` (the table's top-level name; subcommands count
    /// under their container), and whether it was answered with an error.
    pub(crate) fn count(&self, name: &str, error: bool, took: Duration) {
        let counters = self.commands.get(name).or_else(|| self.commands.get(UNKNOWN));
        if let Some(c) = counters {
            c.calls.fetch_add(1, Ordering::Relaxed);
            if error {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
            let secs = took.as_secs_f64();
            let bucket = LATENCY_BUCKETS.iter().position(|&bound| secs <= bound).unwrap_or(LATENCY_BUCKETS.len());
            if let Some(b) = c.buckets.get(bucket) {
                b.fetch_add(1, Ordering::Relaxed);
            }
            c.latency_us.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    /// Calls of `name` so far (tests, `INFO`).
    pub fn calls(&self, name: &str) -> u64 {
        self.commands.get(name).map_or(0, |c| c.calls.load(Ordering::Relaxed))
    }

    /// Appends the Prometheus text of these counters; commands never called are left out.
    pub(crate) fn write_text(&self, out: &mut String, node: u64) {
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{node}\"}} {v}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(out, "flotilla_resp_connections", "Redis protocol connections open.", "gauge", load(&self.connected));
        gauge(
            out,
            "flotilla_resp_connections_accepted_total",
            "Redis protocol connections accepted.",
            "counter",
            load(&self.accepted),
        );
        gauge(
            out,
            "flotilla_resp_connections_rejected_total",
            "Redis protocol connections refused at the connection limit.",
            "counter",
            load(&self.rejected),
        );
        gauge(
            out,
            "flotilla_resp_protocol_errors_total",
            "Redis protocol connections closed after a protocol error.",
            "counter",
            load(&self.protocol_errors),
        );
        gauge(
            out,
            "flotilla_resp_tls_refused_total",
            "Redis protocol TLS connections refused (handshake failed, certificate not usable).",
            "counter",
            load(&self.tls_refused),
        );
        gauge(
            out,
            "flotilla_resp_auth_failures_total",
            "Redis protocol AUTH attempts with a wrong user or password.",
            "counter",
            load(&self.auth_failures),
        );
        gauge(
            out,
            "flotilla_resp_denied_total",
            "Redis protocol commands refused with NOAUTH or NOPERM.",
            "counter",
            load(&self.denied),
        );
        gauge(
            out,
            "flotilla_resp_auth_closed_total",
            "Redis protocol connections closed for not authenticating in time or too many failed AUTHs.",
            "counter",
            load(&self.auth_closed),
        );
        let mut names: Vec<_> = self.commands.iter().filter(|(_, c)| load(&c.calls) > 0).collect();
        names.sort_by_key(|(name, _)| **name);
        let _ = writeln!(
            out,
            "# HELP flotilla_resp_commands_total Redis protocol requests, by command.\n\
             # TYPE flotilla_resp_commands_total counter"
        );
        for (name, c) in &names {
            let _ =
                writeln!(out, "flotilla_resp_commands_total{{node=\"{node}\",command=\"{name}\"}} {}", load(&c.calls));
        }
        let _ = writeln!(
            out,
            "# HELP flotilla_resp_command_errors_total Redis protocol requests answered with an error, by command.\n\
             # TYPE flotilla_resp_command_errors_total counter"
        );
        for (name, c) in &names {
            let _ = writeln!(
                out,
                "flotilla_resp_command_errors_total{{node=\"{node}\",command=\"{name}\"}} {}",
                load(&c.errors)
            );
        }
        let _ = writeln!(
            out,
            "# HELP flotilla_resp_command_seconds Time from a request's parse to its reply, by command.\n\
             # TYPE flotilla_resp_command_seconds histogram"
        );
        for (name, c) in &names {
            let labels = format!("node=\"{node}\",command=\"{name}\"");
            let mut cumulative = 0u64;
            for (bound, b) in LATENCY_BUCKETS.iter().zip(&c.buckets) {
                cumulative += load(b);
                let _ = writeln!(out, "flotilla_resp_command_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let total: u64 = c.buckets.iter().map(load).sum();
            let _ = writeln!(out, "flotilla_resp_command_seconds_bucket{{{labels},le=\"+Inf\"}} {total}");
            let _ = writeln!(out, "flotilla_resp_command_seconds_sum{{{labels}}} {}", load(&c.latency_us) as f64 / 1e6);
            let _ = writeln!(out, "flotilla_resp_command_seconds_count{{{labels}}} {total}");
        }
    }
}
