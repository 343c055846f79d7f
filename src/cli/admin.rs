//! `flotilla admin`: listings of nodes and shards, the cluster summary, and placement changes
//! (splits, moves, leader transfers, drains, balancer rounds, node registrations).

use super::{connect, print_table, show, Conn};
use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use flotilla::placement::{NodeId, ShardId};
use flotilla::wire::{AdminRequest, AdminResponse, ShardRow, ShardsSummary, SHARDS_PAGE_MAX};
use flotilla::Client;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long `admin move` follows a move before it returns (the move goes on).
const MOVE_FOLLOW_S_MAX: u64 = 600;

#[derive(Args)]
pub struct AdminArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    op: AdminOp,
}

#[derive(Subcommand)]
pub enum AdminOp {
    /// List nodes.
    Nodes,
    /// List shards with replicas, leaders and applied indexes, and a summary of the map.
    Shards {
        /// Show at most this many shards (one page; the summary still covers the whole map).
        #[arg(long)]
        limit: Option<u32>,
        /// Start at the shard holding this key.
        #[arg(long)]
        from: Option<String>,
    },
    /// Split the shard holding KEY at KEY.
    Split {
        /// The split key.
        key: String,
    },
    /// Move SHARD's replica from node FROM to node TO.
    Move {
        /// Shard id.
        shard: u64,
        /// Node losing the replica.
        from: u64,
        /// Node gaining it.
        to: u64,
        /// Return at once instead of following the move.
        #[arg(long)]
        no_wait: bool,
    },
    /// Merge SHARD with its right-hand neighbour (the next shard in key order): the right one
    /// freezes, then SHARD absorbs it. Both must have the same replicas (move one first, or
    /// let the balancer align them).
    Merge {
        /// The left shard's id.
        shard: u64,
        /// Return at once instead of following the merge.
        #[arg(long)]
        no_wait: bool,
    },
    /// Hand SHARD's leadership to NODE.
    TransferLeader {
        /// Shard id.
        shard: u64,
        /// Target node.
        node: u64,
    },
    /// Run the balancer once.
    Rebalance,
    /// Drain NODE (move everything off it), or stop draining with --undo.
    Drain {
        /// Node id.
        node: u64,
        /// Stop draining.
        #[arg(long)]
        undo: bool,
    },
    /// Cluster summary.
    Status,
    /// Register a node by hand (a node started with peers and no bootstrap registers itself).
    AddNode {
        /// Its id.
        node: u64,
        /// Its QUIC address.
        addr: String,
    },
    /// Back up every shard into a new directory (each shard at one Raft index at or after a
    /// linearizable read; writes go on meanwhile). Needs an admin certificate.
    Backup {
        /// The backup's directory: absent or empty.
        #[arg(long, value_name = "DIR")]
        to: std::path::PathBuf,
    },
    /// UNSAFE: after losing a majority of some shards' replicas for good, force each such
    /// shard onto its most up-to-date survivor (writes only the dead nodes had are lost) and
    /// bring every shard back to full replication on live nodes. See README "Unsafe recovery".
    UnsafeRecover(super::recover::RecoverArgs),
}

pub async fn run(a: AdminArgs) -> Result<i32> {
    let json = a.conn.json;
    let req = match &a.op {
        AdminOp::UnsafeRecover(r) => {
            let client = connect(&a.conn).await?;
            let code = super::recover::run(&client, r, json).await;
            client.close().await;
            return code;
        }
        AdminOp::Nodes => AdminRequest::Nodes,
        AdminOp::Backup { to } => return super::backup::run_backup(&a.conn, to).await,
        AdminOp::Shards { limit, from } => {
            let client = connect(&a.conn).await?;
            let r = list_shards(&client, *limit, from.as_deref(), json).await;
            client.close().await;
            return r.map(|()| 0);
        }
        AdminOp::Split { key } => {
            flotilla::wire::check_user_key(key.as_bytes()).map_err(|e| anyhow!("key {key:?}: {e}"))?;
            AdminRequest::Split { key: key.as_bytes().to_vec() }
        }
        AdminOp::Move { shard, from, to, .. } => {
            if from == to {
                bail!("FROM and TO are the same node");
            }
            AdminRequest::Move { shard: ShardId(*shard), from: NodeId(*from), to: NodeId(*to) }
        }
        AdminOp::TransferLeader { shard, node } => {
            AdminRequest::TransferLeader { shard: ShardId(*shard), node: NodeId(*node) }
        }
        AdminOp::Rebalance => AdminRequest::Rebalance,
        AdminOp::Merge { shard, .. } => AdminRequest::Merge { shard: ShardId(*shard) },
        AdminOp::Drain { node, undo } => AdminRequest::Drain { node: NodeId(*node), draining: !undo },
        AdminOp::Status => AdminRequest::Status,
        AdminOp::AddNode { node, addr } => {
            addr.parse::<SocketAddr>().map_err(|e| anyhow!("{addr:?} is not an address like 127.0.0.1:7004: {e}"))?;
            AdminRequest::AddNode { node: NodeId(*node), addr: addr.clone() }
        }
    };
    let client = connect(&a.conn).await?;
    let resp = client.admin(req).await?;
    if json {
        println!("{}", serde_json::to_string(&resp)?);
    } else {
        print_admin(&resp);
    }
    if let (AdminOp::Move { shard, no_wait: false, .. }, false) = (&a.op, json) {
        follow_move(&client, ShardId(*shard)).await?;
    }
    if let (AdminOp::Merge { shard, no_wait: false }, false) = (&a.op, json) {
        follow_merge(&client, ShardId(*shard)).await?;
    }
    client.close().await;
    Ok(0)
}

/// `admin shards`: one page (`--limit`, `--from`) or every page, then the map's summary.
async fn list_shards(client: &Client, limit: Option<u32>, from: Option<&str>, json: bool) -> Result<()> {
    let one_page = limit.is_some() || from.is_some();
    let mut from = from.map(|f| f.as_bytes().to_vec()).unwrap_or_default();
    let limit = limit.unwrap_or(SHARDS_PAGE_MAX);
    let mut all = Vec::new();
    loop {
        let resp = client.admin(AdminRequest::ShardsPage { from: from.clone(), limit }).await?;
        let AdminResponse::ShardsPage { rows, next, summary } = resp else { bail!("unexpected answer") };
        if one_page {
            if json {
                println!("{}", serde_json::to_string(&AdminResponse::ShardsPage { rows, next, summary })?);
            } else {
                print_shard_rows(&rows);
                print_summary(&summary);
                if let Some(n) = next {
                    println!("next page: --from {}", show(&n));
                }
            }
            return Ok(());
        }
        all.extend(rows);
        match next {
            // The map may change between pages: never loop on a key that does not move on.
            Some(n) if n > from => from = n,
            _ => {
                if json {
                    println!("{}", serde_json::to_string(&AdminResponse::Shards(all))?);
                } else {
                    print_shard_rows(&all);
                    print_summary(&summary);
                }
                return Ok(());
            }
        }
    }
}

fn print_shard_rows(rows: &[ShardRow]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|s| {
            let d = &s.descriptor;
            let range = format!(
                "[{}, {})",
                if d.start.is_empty() { "-inf".into() } else { show(&d.start) },
                d.end.as_ref().map(|e| show(e)).unwrap_or_else(|| "+inf".into())
            );
            let replicas: Vec<String> = d
                .replicas
                .iter()
                .map(|r| match r.role {
                    flotilla::placement::ReplicaRole::Voter => r.node.to_string(),
                    flotilla::placement::ReplicaRole::Learner => format!("{}(learner)", r.node),
                })
                .collect();
            let max = s.applied.values().copied().max().unwrap_or(0);
            let lag = s.applied.values().map(|a| max - a).max().unwrap_or(0);
            vec![
                d.id.to_string(),
                range,
                format!("{}.{}", d.epoch.conf_version, d.epoch.version),
                replicas.join(","),
                s.leader.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                max.to_string(),
                lag.to_string(),
                human_bytes(s.bytes),
                s.moving.clone().unwrap_or_else(|| "-".into()),
                s.merging.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(&["SHARD", "RANGE", "EPOCH", "REPLICAS", "LEADER", "APPLIED", "LAG", "SIZE", "MOVE", "MERGE"], &rows);
}

fn print_summary(s: &ShardsSummary) {
    println!(
        "{} shards, {} with a known leader, {} moving, {} replicas, {} in all",
        s.shards,
        s.with_leader,
        s.moving,
        s.replicas,
        human_bytes(s.bytes)
    );
}

/// Prints the progress of a move until it finishes.
/// The row of `shard` as the meta leader has it: the one-row page from its start key (a shard
/// keeps its start key through moves, splits and merges it survives), not every shard's row
/// (with 100,000 shards, the whole list takes seconds). `None` once the map no longer has it.
async fn shard_row(client: &Client, shard: ShardId) -> Result<Option<ShardRow>> {
    for fresh in [false, true] {
        let map = if fresh { client.refresh().await?.map } else { client.cached_view().map };
        let Some(start) = map.get(shard).map(|d| d.start.clone()) else { continue };
        let resp = client.admin(AdminRequest::ShardsPage { from: start, limit: 1 }).await?;
        let AdminResponse::ShardsPage { rows, .. } = resp else { bail!("unexpected answer") };
        if let Some(row) = rows.into_iter().find(|r| r.descriptor.id == shard) {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

async fn follow_move(client: &Client, shard: ShardId) -> Result<()> {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(MOVE_FOLLOW_S_MAX);
    while Instant::now() < deadline {
        let Some(row) = shard_row(client, shard).await? else { bail!("shard {shard} vanished") };
        match &row.moving {
            Some(m) => {
                let applied: Vec<String> = row.applied.iter().map(|(n, a)| format!("n{n}@{a}")).collect();
                let now = format!("moving {m}; applied: {}", applied.join(" "));
                if now != last {
                    println!("{now}");
                    last = now;
                }
            }
            None => {
                let replicas: Vec<String> = row.descriptor.replicas.iter().map(|r| format!("{}", r.node)).collect();
                println!("move done: shard {shard} on nodes {}", replicas.join(","));
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!(
        "the move did not finish within {} minutes (it goes on; check `flotilla admin shards`)",
        MOVE_FOLLOW_S_MAX / 60
    )
}

/// Prints the progress of a merge until its plan is gone: merged (the shard took its
/// neighbour's range) or aborted (it did not).
async fn follow_merge(client: &Client, shard: ShardId) -> Result<()> {
    let mut last = String::new();
    let mut end_before = None;
    let deadline = Instant::now() + Duration::from_secs(MOVE_FOLLOW_S_MAX);
    while Instant::now() < deadline {
        let Some(row) = shard_row(client, shard).await? else { bail!("shard {shard} vanished") };
        let end = row.descriptor.end.clone();
        let end_before = end_before.get_or_insert_with(|| end.clone());
        match &row.merging {
            Some(m) => {
                if *m != last {
                    println!("{m}");
                    last = m.clone();
                }
            }
            None => {
                let shown = end
                    .as_ref()
                    .map_or("the end of the keyspace".into(), |e| format!("{:?}", e.escape_ascii().to_string()));
                match end != *end_before || !last.is_empty() && !last.ends_with("aborted") {
                    true => println!("merge done: shard {shard} now ends at {shown}"),
                    false => {
                        println!("no merge in progress for shard {shard} (aborted, or done before); it ends at {shown}")
                    }
                }
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!(
        "the merge did not finish within {} minutes (it goes on; check `flotilla admin shards`)",
        MOVE_FOLLOW_S_MAX / 60
    )
}

fn human_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

fn print_admin(r: &AdminResponse) {
    match r {
        AdminResponse::Nodes(rows) => {
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|n| {
                    vec![
                        n.node.to_string(),
                        n.addr.clone(),
                        n.replicas.to_string(),
                        n.leading.to_string(),
                        n.requests_per_s.to_string(),
                        if n.draining { "draining".into() } else { "-".into() },
                        n.report_age_ms
                            .map(|a| format!("{:.1}s ago", a as f64 / 1000.0))
                            .unwrap_or_else(|| "never".into()),
                    ]
                })
                .collect();
            print_table(&["NODE", "ADDRESS", "REPLICAS", "LEADING", "REQ/S", "DRAIN", "LAST REPORT"], &rows);
        }
        AdminResponse::Shards(rows) => print_shard_rows(rows),
        AdminResponse::ShardsPage { rows, summary, .. } => {
            print_shard_rows(rows);
            print_summary(summary);
        }
        AdminResponse::Changed(ds) => {
            if ds.is_empty() {
                println!("OK");
            }
            for d in ds {
                let nodes: Vec<String> = d.replicas.iter().map(|r| r.node.to_string()).collect();
                println!(
                    "shard {} epoch {}.{} on nodes {}",
                    d.id,
                    d.epoch.conf_version,
                    d.epoch.version,
                    nodes.join(",")
                );
            }
        }
        AdminResponse::Done(s) => println!("{s}"),
        AdminResponse::ReplicaStates { replicas, .. } => println!("{} replicas", replicas.len()),
        AdminResponse::Forced { shard, index } => println!("shard {shard} forced alone at index {index}"),
        AdminResponse::Status(s) => {
            println!("nodes:  {} registered, {} reporting", s.nodes, s.nodes_live);
            println!("shards: {} ({} with a known leader)", s.shards, s.shards_with_leader);
            println!("moves in progress: {}", s.moves);
            println!("meta leader: {}", s.meta_leader.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into()));
            let list = |ns: &[NodeId]| ns.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
            match (s.meta_voters.is_empty(), s.meta_learners.is_empty()) {
                (true, _) => println!("meta group: not known to the node answering (it holds no meta replica)"),
                (false, true) => println!("meta group: voters {}", list(&s.meta_voters)),
                (false, false) => {
                    println!("meta group: voters {}, learners {}", list(&s.meta_voters), list(&s.meta_learners))
                }
            }
        }
        // The backup's own answers, which `admin backup` reads itself.
        AdminResponse::BackupStarted(b) => println!("{b:?}"),
        AdminResponse::BackupChunk(b) => println!("{} bytes", b.len()),
    }
}
