//! `flotilla kv`: get, put, delete, compare-and-swap and scan through [`Client`].

use super::{client_config, json_opt, print_table, show, Conn};
use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use flotilla::{CasOutcome, Client};

#[derive(Args)]
pub struct KvArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    op: KvOp,
}

#[derive(Subcommand)]
pub enum KvOp {
    /// Print the value of KEY.
    Get {
        /// The key.
        key: String,
        /// Lease read instead of ReadIndex.
        #[arg(long, conflicts_with = "stale")]
        lease: bool,
        /// Read from any replica, possibly stale (follower read).
        #[arg(long)]
        stale: bool,
    },
    /// Set KEY to VALUE.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove KEY.
    Delete {
        /// The key.
        key: String,
    },
    /// Set KEY to NEW if its value is EXPECTED.
    Cas {
        /// The key.
        key: String,
        /// The expected value (omit with --absent).
        #[arg(long, conflicts_with = "absent")]
        expected: Option<String>,
        /// Expect the key to be absent.
        #[arg(long)]
        absent: bool,
        /// The new value (omit with --delete).
        #[arg(long, conflicts_with = "delete")]
        new: Option<String>,
        /// Delete the key if it matches.
        #[arg(long)]
        delete: bool,
    },
    /// List pairs with keys in [START, END).
    Scan {
        /// First key (default: the beginning).
        start: Option<String>,
        /// End key, exclusive (default: the end).
        end: Option<String>,
        /// Most pairs.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

pub async fn run(a: KvArgs) -> Result<i32> {
    let json = a.conn.json;
    // Check the input before connecting, so a typo is reported even with no cluster.
    let check = |k: &str| flotilla::wire::check_user_key(k.as_bytes()).map_err(|e| anyhow!("key {k:?}: {e}"));
    match &a.op {
        KvOp::Get { key, .. } | KvOp::Delete { key } => check(key)?,
        KvOp::Put { key, value } => {
            check(key)?;
            flotilla::wire::check_value(value.as_bytes()).map_err(|e| anyhow!(e))?;
        }
        KvOp::Cas { key, expected, absent, new, delete } => {
            check(key)?;
            if expected.is_none() && !absent {
                bail!("cas needs --expected VALUE or --absent");
            }
            if new.is_none() && !delete {
                bail!("cas needs --new VALUE or --delete");
            }
        }
        KvOp::Scan { limit, start, end } => {
            if *limit == 0 {
                bail!("--limit must be at least 1");
            }
            if let (Some(s), Some(e)) = (start, end) {
                if s >= e {
                    bail!("the scan's start {s:?} must come before its end {e:?}");
                }
            }
        }
    }
    let mut cfg = client_config(&a.conn)?;
    match &a.op {
        KvOp::Get { lease: true, .. } => cfg.consistency = flotilla::wire::ReadConsistency::Lease,
        KvOp::Get { stale: true, .. } => cfg.consistency = flotilla::wire::ReadConsistency::Stale,
        _ => {}
    }
    let client = Client::connect(cfg).await.map_err(|e| anyhow!("cannot reach the cluster: {e}"))?;
    let code = match a.op {
        KvOp::Get { key, .. } => {
            let v = client.get(key.as_bytes()).await?;
            if json {
                println!("{}", serde_json::json!({"key": key, "found": v.is_some(), "value": json_opt(&v)}));
                0
            } else if let Some(v) = v {
                println!("{}", show(&v));
                0
            } else {
                eprintln!("key {key:?} not found");
                1
            }
        }
        KvOp::Put { key, value } => {
            client.put(key.as_bytes(), value.as_bytes()).await?;
            if json {
                println!("{}", serde_json::json!({"key": key, "ok": true}));
            } else {
                println!("OK");
            }
            0
        }
        KvOp::Delete { key } => {
            let prev = client.delete(key.as_bytes()).await?;
            if json {
                println!("{}", serde_json::json!({"key": key, "deleted": prev.is_some(), "previous": json_opt(&prev)}));
            } else if prev.is_some() {
                println!("OK (deleted)");
            } else {
                println!("OK (was absent)");
            }
            0
        }
        KvOp::Cas { key, expected, new, .. } => {
            let r = client
                .cas(key.as_bytes(), expected.as_deref().map(str::as_bytes), new.as_deref().map(str::as_bytes))
                .await?;
            match r {
                CasOutcome::Swapped { .. } => {
                    if json {
                        println!("{}", serde_json::json!({"key": key, "swapped": true}));
                    } else {
                        println!("OK (swapped)");
                    }
                    0
                }
                CasOutcome::Failed { current } => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"key": key, "swapped": false, "current": json_opt(&current)})
                        );
                    } else {
                        let cur = current.as_ref().map(|c| format!("{:?}", show(c))).unwrap_or_else(|| "absent".into());
                        println!("NOT SWAPPED: the current value is {cur}");
                    }
                    1
                }
            }
        }
        KvOp::Scan { start, end, limit } => {
            let pairs = client
                .scan(start.as_deref().unwrap_or("").as_bytes(), end.as_deref().map(str::as_bytes), limit)
                .await?;
            if json {
                let items: Vec<_> =
                    pairs.iter().map(|(k, v)| serde_json::json!({"key": show(k), "value": show(v)})).collect();
                println!("{}", serde_json::json!({"pairs": items}));
            } else {
                let rows: Vec<Vec<String>> = pairs.iter().map(|(k, v)| vec![show(k), show(v)]).collect();
                print_table(&["KEY", "VALUE"], &rows);
                println!("({} pairs)", pairs.len());
            }
            0
        }
    };
    client.close().await;
    Ok(code)
}
