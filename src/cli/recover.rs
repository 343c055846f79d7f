//! `flotilla admin unsafe-recover`: the operator's side of unsafe recovery
//! ([`flotilla::unsafe_recovery`]), with its report as a table or JSON.

use super::{print_table, show};
use anyhow::Result;
use clap::Args;
use flotilla::placement::NodeId;
use flotilla::unsafe_recovery::{recover, wait_replicated, Report};
use flotilla::Client;
use std::collections::BTreeSet;
use std::time::Duration;

#[derive(Args)]
pub struct RecoverArgs {
    /// The nodes whose disks are gone for good, comma-separated (e.g. 2,3). They are removed
    /// from the cluster for good and may never come back under these ids.
    #[arg(long, value_delimiter = ',', required = true)]
    dead_nodes: Vec<u64>,
    /// How long to wait for every shard to be back to full replication (seconds; 0: do not wait).
    #[arg(long, default_value_t = 600)]
    wait_s: u64,
}

pub async fn run(client: &Client, a: &RecoverArgs, json: bool) -> Result<i32> {
    let dead: BTreeSet<NodeId> = a.dead_nodes.iter().map(|n| NodeId(*n)).collect();
    // Progress goes to standard error, so that --json keeps standard output one object.
    let mut progress = |line: String| eprintln!("{line}");
    let report = recover(client, &dead, &mut progress).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    if a.wait_s > 0 {
        wait_replicated(client, &dead, &report.lost, Duration::from_secs(a.wait_s), &mut progress).await?;
    }
    Ok(if report.lost.is_empty() { 0 } else { 2 })
}

fn print_report(r: &Report) {
    let dead: Vec<String> = r.dead.iter().map(|n| n.to_string()).collect();
    println!("nodes removed for good: {}", dead.join(","));
    if r.forced.is_empty() {
        println!("no shard lost its quorum: nothing was forced, nothing was lost");
    } else {
        println!("shards that lost their quorum (writes after KEPT that only the dead nodes had are lost):");
        let rows: Vec<Vec<String>> = r
            .forced
            .iter()
            .map(|f| {
                let d = &f.decision;
                let range = match &f.range {
                    None => "meta".into(),
                    Some((start, end)) => format!(
                        "[{}, {})",
                        if start.is_empty() { "-inf".into() } else { show(start) },
                        end.as_ref().map(|e| show(e)).unwrap_or_else(|| "+inf".into())
                    ),
                };
                let others: Vec<String> =
                    d.others.iter().map(|(n, p)| format!("n{n}@{}.{} (dropped)", p.term, p.index)).collect();
                let dead: Vec<String> = d.dead_voters.iter().map(|n| n.to_string()).collect();
                vec![
                    d.shard.to_string(),
                    range,
                    d.survivor.to_string(),
                    format!("{}.{}", d.kept.term, d.kept.index),
                    if others.is_empty() { "-".into() } else { others.join(" ") },
                    dead.join(","),
                ]
            })
            .collect();
        print_table(&["SHARD", "RANGE", "KEPT ON", "KEPT (TERM.INDEX)", "OTHER SURVIVORS", "DEAD VOTERS"], &rows);
    }
    if !r.lost.is_empty() {
        let lost: Vec<String> = r.lost.iter().map(|s| s.to_string()).collect();
        println!("shards with no surviving replica (their data is gone): {}", lost.join(","));
    }
    println!("{} shards get new replicas on live nodes", r.changed.len());
}
