//! Merges of neighbouring shards in a cluster of in-process nodes: by `admin merge` while
//! clients write across the boundary (a checked history, every acknowledged key read back), by
//! the balancer on its own, and aborted when a replica of the right shard cannot take the
//! freeze.

mod common;

use common::cluster::Cluster;
use flotilla::placement::ShardId;
use flotilla::wire::{AdminRequest, AdminResponse, ShardRow};
use flotilla::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn rows(admin: &Client) -> Vec<ShardRow> {
    match admin.admin(AdminRequest::Shards).await {
        Ok(AdminResponse::Shards(rows)) => rows,
        other => panic!("admin shards: {other:?}"),
    }
}

/// The shard holding `key`.
async fn shard_of(admin: &Client, key: &[u8]) -> ShardRow {
    rows(admin).await.into_iter().find(|r| r.descriptor.contains(key)).expect("a shard holds every key")
}

/// Waits until the map has `n` shards, none in a merge, each with a leader.
async fn wait_shards(admin: &Client, n: usize, within: Duration) -> Vec<ShardRow> {
    let deadline = Instant::now() + within;
    loop {
        let rows = rows(admin).await;
        if rows.len() == n && rows.iter().all(|r| r.merging.is_none() && r.leader.is_some()) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "still {} shards: {:?}",
            rows.len(),
            rows.iter().map(|r| (r.descriptor.id, r.merging.clone(), r.leader)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_back(client: &Client, acked: &[String]) {
    for k in acked {
        assert_eq!(client.get(k.as_bytes()).await.expect("read").as_deref(), Some(&b"w"[..]), "key {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_merge_joins_two_shards_while_clients_write_across_the_boundary() {
    let mut c = Cluster::start(3, 4).await;
    let admin = c.client().await;
    let clients = vec![c.client().await, c.client().await, c.client().await];
    // Shards start at 40, 80 and c0: the history's keys sit on both sides of 40.
    let history = common::History::start(clients, &["30-a", "50-b", "3f-c"]);
    let stop = Arc::new(AtomicBool::new(false));
    let w = common::acked_writer(c.client().await, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = shard_of(&admin, b"30").await;
    let right = shard_of(&admin, b"50").await;
    assert_eq!(left.descriptor.end.as_deref(), Some(&b"40"[..]));
    let started = admin.admin(AdminRequest::Merge { shard: left.descriptor.id }).await;
    assert!(matches!(started, Ok(AdminResponse::Changed(_) | AdminResponse::Done(_))), "{started:?}");
    let after = wait_shards(&admin, 3, Duration::from_secs(30)).await;
    let merged = after.iter().find(|r| r.descriptor.id == left.descriptor.id).expect("the left shard stays");
    assert_eq!(merged.descriptor.start, left.descriptor.start);
    assert_eq!(merged.descriptor.end, right.descriptor.end);
    assert!(after.iter().all(|r| r.descriptor.id != right.descriptor.id), "the right shard left the map");
    assert!(merged.descriptor.epoch.version > left.descriptor.epoch.version);
    // Every node deleted its replica of the right shard.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.nodes().any(|n| n.host().groups().contains(&flotilla::raft::GroupId(right.descriptor.id.0))) {
        assert!(Instant::now() < deadline, "a node still holds the absorbed shard");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    history.stop_and_check(50).await;
    let acked = w.await.expect("writer");
    assert!(acked.len() > 20, "too few writes to say anything: {}", acked.len());
    read_back(&admin, &acked).await;
    // The merged shard survives a restart of a node.
    c.stop(2).await;
    c.restart(2).await;
    wait_shards(&admin, 3, Duration::from_secs(30)).await;
    read_back(&admin, &acked).await;
    // A merge with no right-hand neighbour, or of a shard that does not exist, is refused.
    let last = shard_of(&admin, b"f0").await;
    assert!(admin.admin(AdminRequest::Merge { shard: last.descriptor.id }).await.is_err());
    assert!(admin.admin(AdminRequest::Merge { shard: ShardId(999) }).await.is_err());
    admin.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancer_merges_small_cold_neighbours_down_to_one_shard() {
    let mut c = Cluster::start_with(3, &[1, 2, 3], &[1, 2, 3], flotilla::meta::dev_split_keys(4), |cfg| {
        cfg.auto_balance_interval_ms = Some(300);
        cfg.balancer.merge_size_bytes_threshold = 1 << 20;
    })
    .await;
    let client = c.client().await;
    let keys: Vec<String> = (0..64).map(|i| format!("{:02x}-k", i * 4)).collect();
    for k in &keys {
        client.put(k.as_bytes(), b"w").await.expect("write");
    }
    wait_shards(&client, 1, Duration::from_secs(60)).await;
    read_back(&client, &keys).await;
    client.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_whose_right_shard_cannot_freeze_everywhere_is_aborted_and_the_shard_writes_again() {
    let mut c = Cluster::start_with(4, &[1, 2, 4], &[1, 2, 3], flotilla::meta::dev_split_keys(2), |cfg| {
        cfg.balancer.merge_freeze_timeout_ms = 2_000;
    })
    .await;
    let admin = c.client().await;
    admin.put(b"90-before", b"w").await.expect("write");
    // Node 3 holds a replica of every shard and is down: the freeze reaches two of three.
    c.stop(3).await;
    let left = shard_of(&admin, b"10").await;
    let right = shard_of(&admin, b"90").await;
    let started = admin.admin(AdminRequest::Merge { shard: left.descriptor.id }).await;
    assert!(started.is_ok(), "{started:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = rows(&admin).await;
        assert_eq!(rows.len(), 2, "the merge never commits");
        if rows.iter().all(|r| r.merging.is_none()) {
            break;
        }
        assert!(Instant::now() < deadline, "the merge was never aborted: {:?}", rows);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Thawed: the right shard takes writes again, and its data is there.
    admin.put(b"90-after", b"w").await.expect("a write after the abort");
    assert_eq!(admin.get(b"90-before").await.expect("read").as_deref(), Some(&b"w"[..]));
    assert_eq!(shard_of(&admin, b"90").await.descriptor.id, right.descriptor.id);
    c.restart(3).await;
    admin.put(b"90-later", b"w").await.expect("a write with node 3 back");
    admin.close().await;
    c.shutdown().await;
}
