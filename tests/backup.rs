//! Backup and restore end to end, in process: a cluster of several shards backed up while
//! clients write, restored into a new cluster, which must hold every key acknowledged before
//! the backup started with its value; a client without the admin role is refused, and a
//! corrupt backup is refused before anything is written.

use flotilla::backup::{self, BackupError, Manifest};
use flotilla::placement::NodeId;
use flotilla::transport::{Grant, Role};
use flotilla::wire::AdminRequest;
use flotilla::{BootstrapConfig, Client, ClientError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::cluster::Cluster;

/// Keys written before the backup, spread over every shard.
const KEYS_BEFORE: usize = 400;
/// Clients writing new keys while the backup runs.
const WRITERS: usize = 3;

/// Acknowledged writes of the writers: key, value and when the acknowledgement arrived.
type Acked = Arc<Mutex<Vec<(Vec<u8>, Vec<u8>, Instant)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_load_restores_every_acknowledged_key() {
    let mut cluster = Cluster::start(3, 4).await;
    let client = cluster.client().await;
    // Five shards: the four of the bootstrap and one split off by hand.
    client.admin(AdminRequest::Split { key: b"a0".to_vec() }).await.unwrap();
    let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for i in 0..KEYS_BEFORE {
        let key = format!("{:02x}-before-{i}", (i * 37) % 256).into_bytes();
        let value = format!("value-{i}-{}", "x".repeat(i % 50)).into_bytes();
        client.put(&key, &value).await.unwrap();
        expected.insert(key, value);
    }
    // A deleted key stays deleted.
    client.delete(b"40-before-deleted").await.unwrap();
    client.put(b"41-gone", b"soon").await.unwrap();
    client.delete(b"41-gone").await.unwrap();

    // Writers on new keys all through the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (c, stop, acked) = (cluster.client().await, stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("{:02x}-during-{w}-{n}", (n * 53 + w as u64 * 17) % 256).into_bytes();
                let value = format!("w{w}-{n}").into_bytes();
                if c.put(&key, &value).await.is_ok() {
                    acked.lock().unwrap().push((key, value, Instant::now()));
                }
                n += 1;
            }
            c.close().await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dir = tempfile::tempdir().unwrap();
    // A client without the admin role may not back up.
    let app = cluster.dev.client_config_with("app", Grant::new(Role::ReadWrite)).unwrap();
    match backup::take_backup(app, &dir.path().join("refused"), |_| {}).await {
        Err(BackupError::Cluster(ClientError::Denied(e))) => assert!(e.contains("may not backup"), "{e}"),
        other => panic!("a readwrite client's backup: {other:?}"),
    }
    let to = dir.path().join("backup");
    let started = Instant::now();
    let mut seen = Vec::new();
    let summary = backup::take_backup(cluster.dev.client_config().unwrap(), &to, |p| seen.push(p)).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let during = acked.lock().unwrap().clone();
    let before_backup: Vec<_> = during.iter().filter(|(_, _, at)| *at < started).collect();
    eprintln!(
        "backup: {} shards, {} keys, {} bytes in {:?}; writers acknowledged {} writes ({} before it started)",
        summary.shards,
        summary.keys,
        summary.bytes,
        summary.elapsed,
        during.len(),
        before_backup.len()
    );
    assert_eq!(summary.shards, 5);
    assert!(summary.keys >= (KEYS_BEFORE + before_backup.len()) as u64);
    assert!(!before_backup.is_empty(), "the writers ran before the backup started");
    assert!(during.len() > before_backup.len(), "the writers went on during the backup");
    let last = seen.last().copied().unwrap();
    assert_eq!((last.shards_done, last.shards_total), (5, 5), "progress ends with every shard: {seen:?}");
    assert_eq!(last.bytes_done, summary.bytes);
    let manifest = Manifest::load(&to).unwrap();
    assert_eq!(manifest.split_keys().unwrap(), vec![b"40".to_vec(), b"80".to_vec(), b"a0".to_vec(), b"c0".to_vec()]);
    assert!(manifest.shards.iter().all(|s| s.raft_index > 0 && !s.files.is_empty()));
    // A second backup into the same directory is refused.
    match backup::take_backup(cluster.dev.client_config().unwrap(), &to, |_| {}).await {
        Err(BackupError::Directory(e)) => assert!(e.contains("is not empty"), "{e}"),
        other => panic!("a backup into a used directory: {other:?}"),
    }
    client.close().await;
    cluster.shutdown().await;

    // A corrupt copy of the backup is refused before anything is written.
    let bad = dir.path().join("corrupt");
    std::fs::create_dir(&bad).unwrap();
    for e in std::fs::read_dir(&to).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let victim = bad.join(&manifest.shards[2].files[0].name);
    let mut body = std::fs::read(&victim).unwrap();
    let mid = body.len() / 2;
    body[mid] ^= 0x40;
    std::fs::write(&victim, body).unwrap();
    let target = dir.path().join("node-x");
    let bootstrap = BootstrapConfig::of_nodes(&[NodeId(1)], Vec::new());
    match flotilla::dev_cluster::DevCluster::restore(&target, 1, &bootstrap, &bad, |_, _| {}) {
        Err(e) => assert!(e.to_string().contains("is corrupt"), "{e}"),
        Ok(_) => panic!("a corrupt backup was restored"),
    }
    // Nothing loaded: only the marker of an unfinished restore, which the node refuses to
    // start beside (it was to be restored, and must not start as a new, empty node).
    let names: Vec<_> = std::fs::read_dir(target.join("node-1")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from(backup::restore::RESTORING_DIR)],
        "nothing written for a corrupt backup"
    );
    assert!(backup::restored(&target.join("node-1")).is_err(), "the node refuses to start");

    // The restored cluster: the backup's shards, every key acknowledged before it started.
    let mut restored = Cluster::start_restored(3, &to).await;
    let client = restored.client().await;
    let map = client.cached_view().map;
    let starts: Vec<Vec<u8>> = map.shards().skip(1).map(|d| d.start.clone()).collect();
    assert_eq!(starts, manifest.split_keys().unwrap(), "the restored cluster has the backup's shards");
    for (k, v) in &expected {
        assert_eq!(client.get(k).await.unwrap().as_ref(), Some(v), "key {:?}", String::from_utf8_lossy(k));
    }
    for (k, v, _) in &before_backup {
        assert_eq!(client.get(k).await.unwrap().as_ref(), Some(v), "key {:?}", String::from_utf8_lossy(k));
    }
    assert_eq!(client.get(b"41-gone").await.unwrap(), None);
    // Nothing but what the old cluster acknowledged or was writing: every restored key is a
    // key written before, or by a writer (acknowledged or not).
    let all = client.scan(b"", None, 100_000).await.unwrap();
    assert_eq!(all.len() as u64, summary.keys, "the restored cluster holds exactly the backup's keys");
    assert!(all.iter().all(|(k, _)| expected.contains_key(k) || String::from_utf8_lossy(k).contains("-during-")));
    // And it takes writes.
    client.put(b"c5-after-restore", b"yes").await.unwrap();
    assert_eq!(client.get(b"c5-after-restore").await.unwrap(), Some(b"yes".to_vec()));
    close(client).await;
    restored.shutdown().await;
}

async fn close(c: Client) {
    c.close().await;
}

/// The commands an operator runs, on server processes: `flotilla admin backup` against one
/// cluster, `flotilla restore --config` for each node of a new one (refused while a node's data
/// directory is in use), and the new servers started on what it built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_and_restore_commands_move_a_cluster_to_new_servers() {
    let source = common::Servers::new(3, 3, 2);
    let client = source.client().await;
    let keys: Vec<String> = (0..100).map(|i| format!("{:02x}-cli-{i}", (i * 41) % 256)).collect();
    for k in &keys {
        client.put(k.as_bytes(), format!("v-{k}").as_bytes()).await.unwrap();
    }
    client.close().await;
    let cluster_file = source.dir.path().join("cluster.json");
    flotilla::cluster::ClusterFile {
        version: flotilla::cluster::CLUSTER_FILE_VERSION,
        nodes: source
            .client
            .endpoints
            .iter()
            .map(|(id, a)| flotilla::cluster::ClusterNode { id: *id, addr: a.to_string(), metrics: None })
            .collect(),
        ca: source.dir.path().join("certs/ca.pem"),
        cert: source.dir.path().join("certs/client-test.pem"),
        key: source.dir.path().join("certs/client-test-key.pem"),
        data_dir: None,
        pid: None,
    }
    .save(&cluster_file)
    .unwrap();
    let backup_dir = source.dir.path().join("backup");
    let out = std::process::Command::new(common::BIN)
        .args(["admin", "backup", "--to", backup_dir.to_str().unwrap(), "--cluster", cluster_file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "admin backup: {stderr}");
    assert!(stderr.contains("backup: 2/2 shards"), "progress on stderr: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 shards, 100 keys"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The new cluster: its own certificates and configuration, four shards by its file, which
    // the backup's two replace.
    let mut target = common::Servers::new(3, 3, 4);
    let restore = |id: usize| {
        std::process::Command::new(common::BIN)
            .args(["restore", "--from", backup_dir.to_str().unwrap(), "--config", target.configs[id].to_str().unwrap()])
            .output()
            .unwrap()
    };
    // Its servers ran once, so their data directories are taken.
    let _ = target.client().await;
    for s in target.servers.iter_mut() {
        s.kill();
    }
    let refused = restore(0);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not empty"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    for id in 0..3 {
        std::fs::remove_dir_all(target.dir.path().join(format!("n{}", id + 1))).unwrap();
        let out = restore(id);
        assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("2 shards, 100 keys"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for s in target.servers.iter_mut() {
        s.restart();
    }
    let client = target.client().await;
    assert_eq!(client.cached_view().map.len(), 2, "the backup's shards");
    for k in &keys {
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(format!("v-{k}").into_bytes()), "key {k}");
    }
    client.close().await;
}

// ---- Review probes (branch review-backup) ----

/// Probe: the copy's read point is real. A leader answers a write before its apply is stored
/// (`answer_writes` precedes the store write), so a copy built from a RocksDB snapshot taken
/// right away would miss it; the ReadIndex read with `wait_apply` must hold the build back
/// until the write is in the store. Fails if `Host::build_backup` skips or weakens its read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn review_probe_an_acknowledged_write_not_yet_stored_is_in_the_backup() {
    let mut cluster = Cluster::start(1, 1).await;
    let client = cluster.client().await;
    client.put(b"10-first", b"1").await.unwrap();
    cluster.node(1).host().hold_applies(true);
    client.put(b"20-acked-but-not-stored", b"2").await.unwrap();
    let node = cluster.node(1).clone();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        node.host().hold_applies(false);
    });
    let dir = tempfile::tempdir().unwrap();
    let summary = backup::take_backup(cluster.dev.client_config().unwrap(), &dir.path().join("b"), |_| {}).await;
    release.await.unwrap();
    let summary = summary.unwrap();
    assert_eq!(summary.keys, 2, "the backup holds both acknowledged writes");
    client.close().await;
    cluster.shutdown().await;
}

/// A backup of two shards (split at "80") with keys in both, and the keys of the first.
async fn two_shard_backup(dir: &std::path::Path) -> (std::path::PathBuf, Vec<Vec<u8>>) {
    let mut source = Cluster::start(1, 2).await; // split at "80"
    let c = source.client().await;
    let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("{:02x}-k{i}", (i * 5) % 128).into_bytes()).collect();
    for k in &keys {
        c.put(k, b"v").await.unwrap();
    }
    c.put(b"90-in-shard-2", b"v").await.unwrap();
    let to = dir.join("b");
    backup::take_backup(source.dev.client_config().unwrap(), &to, |_| {}).await.unwrap();
    c.close().await;
    source.shutdown().await;
    (to, keys)
}

/// A node of `shard_replicas` that was not restored (an operator's slip, or a restore that
/// failed on that node) forms no replica of the restored shards: an empty voting replica
/// could lead them, or make a quorum without the data (review finding F2). The cluster
/// records the backup it was bootstrapped from, and each node compares its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_left_unrestored_forms_no_replica_of_a_restored_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (to, keys) = two_shard_backup(dir.path()).await;
    let backup_id = Manifest::load(&to).unwrap().backup_id;
    // Nodes 1 and 2 restored, node 3 forgotten; all with a server file's default shards = 1.
    let mut restored = Cluster::start_partly_restored(3, &to, &[1, 2]).await;
    let client = restored.client().await;
    // The restored nodes serve every key (two voters of three are a quorum).
    for k in &keys {
        assert_eq!(client.get(k).await.unwrap(), Some(b"v".to_vec()), "{}", String::from_utf8_lossy(k));
    }
    let view = restored.node(1).meta_view();
    assert_eq!(view.restored_from.as_deref(), Some(backup_id.as_str()), "the cluster records its backup");
    let shards: Vec<_> = view.map.shards().map(|d| d.id).collect();
    assert_eq!(shards.len(), 2, "the backup's shards");
    // Node 3 forms none of them: its replicas start empty, without a configuration (so
    // without a vote), and their leaders send them a snapshot of the restored data.
    let deadline = Instant::now() + Duration::from_secs(30);
    for d in view.map.shards() {
        let mine: Vec<Vec<u8>> = keys.iter().filter(|k| d.contains(k)).cloned().collect();
        loop {
            let range = restored.node(3).host().group_range(d.id);
            if let Some(r) = &range {
                assert_eq!(r.end, d.end, "node 3's replica of shard {} has the shard's range", d.id);
            }
            let held = match restored.node(3).host().state_machine(d.id) {
                Some(sm) => futures_count(&sm, &mine).await,
                None => 0,
            };
            if range.is_some() && held == mine.len() {
                break;
            }
            assert!(Instant::now() < deadline, "node 3's replica of shard {}: {held} of {} keys", d.id, mine.len());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // What a client sees once node 3 leads the first shard.
    let first = shards[0];
    for n in 1..=3 {
        let _ = restored.node(n).host().transfer_leader(first, NodeId(3)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.get(&keys[0]).await.unwrap(), Some(b"v".to_vec()));
    client.close().await;
    restored.shutdown().await;
}

/// A manifest whose files do not hold its shard's keys (here shard 2 names shard 1's files,
/// the manifest's crc recomputed) is refused by the restore (review finding F4).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mislabelled_backup_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (to, _) = two_shard_backup(dir.path()).await;
    let bad = dir.path().join("mislabelled");
    std::fs::create_dir(&bad).unwrap();
    for e in std::fs::read_dir(&to).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let mut m = Manifest::load(&bad).unwrap();
    m.shards[1].files = m.shards[0].files.clone();
    m.save(&bad).unwrap();
    let target = dir.path().join("node-bad");
    match backup::restore_data_dir(&bad, &target, true, |_| {}) {
        Ok(s) => panic!("a backup whose shard 2 names shard 1's files was restored ({} keys claimed)", s.keys),
        Err(e) => assert!(e.to_string().contains("named by two shards"), "{e}"),
    }
    assert!(!target.join(backup::restore::STORE_DIR).exists(), "no store appears");
    assert!(backup::restored(&target).is_err(), "the node refuses to start beside the marker");
    // The same files under names of their own: intact, but not shard 2's keys.
    let mut m = Manifest::load(&bad).unwrap();
    for f in &mut m.shards[1].files {
        let name = format!("copy-{}", f.name);
        std::fs::copy(bad.join(&f.name), bad.join(&name)).unwrap();
        f.name = name;
    }
    m.save(&bad).unwrap();
    let target = dir.path().join("node-bad-2");
    match backup::restore_data_dir(&bad, &target, true, |_| {}) {
        Ok(s) => panic!("a backup whose shard 2 holds shard 1's keys was restored ({} keys claimed)", s.keys),
        Err(e) => assert!(e.to_string().contains("outside the shard's range"), "{e}"),
    }
    assert!(!target.join(backup::restore::STORE_DIR).exists(), "no store appears");
}

async fn futures_count(sm: &flotilla::shard::KvStateMachine, keys: &[Vec<u8>]) -> usize {
    let mut n = 0;
    for k in keys {
        if sm.get(k.clone()).await.unwrap().is_some() {
            n += 1;
        }
    }
    n
}

/// A replica added to a restored shard after the restore (a move, the balancer, a replaced
/// node) holds the restored data: each restored group starts as if a snapshot of that data
/// had been installed at its first index, so a new replica, whose log is empty, gets a
/// snapshot and not the log from index 1 onto an empty key range (review finding F1).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_moved_after_a_restore_holds_the_restored_data() {
    let mut source = Cluster::start(1, 2).await; // split at "80"
    let c = source.client().await;
    let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("{:02x}-m{i}", i * 11).into_bytes()).collect();
    for k in &keys {
        c.put(k, b"v").await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("b");
    backup::take_backup(source.dev.client_config().unwrap(), &to, |_| {}).await.unwrap();
    c.close().await;
    source.shutdown().await;

    let mut restored = Cluster::start_restored(3, &to).await;
    let client = restored.client().await;
    client.put(b"f0-after-restore", b"v").await.unwrap();
    restored.join().await;
    let shards: Vec<_> = client.cached_view().map.shards().map(|d| d.id).collect();
    assert_eq!(shards.len(), 2, "the backup's two shards");
    for &shard in &shards {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = client.admin(AdminRequest::Move { shard, from: NodeId(3), to: NodeId(4) }).await {
            assert!(Instant::now() < deadline, "move of shard {shard} never started: {e}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = restored.node(1).meta_view();
        let done = shards.iter().all(|s| {
            let d = view.map.get(*s).expect("the shard");
            d.replica(NodeId(4)).is_some() && d.replica(NodeId(3)).is_none()
        });
        if view.moves.is_empty() && done {
            break;
        }
        assert!(Instant::now() < deadline, "the moves did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Node 4's replicas, read locally, once they caught up with the write after the restore.
    let view = client.cached_view();
    let deadline = Instant::now() + Duration::from_secs(30);
    for &shard in &shards {
        let d = view.map.get(shard).expect("the shard").clone();
        let mine: Vec<Vec<u8>> = keys.iter().filter(|k| d.contains(k)).cloned().collect();
        assert!(!mine.is_empty(), "keys in shard {shard}");
        loop {
            let held = match restored.node(4).host().state_machine(shard) {
                Some(sm) => futures_count(&sm, &mine).await,
                None => 0,
            };
            if held == mine.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node 4's replica of restored shard {shard} holds {held} of its {} restored keys",
                mine.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let sm = restored.node(4).host().state_machine(view.map.lookup(b"f0").expect("a shard").id).expect("replica");
    assert_eq!(sm.get(b"f0-after-restore".to_vec()).await.unwrap(), Some(b"v".to_vec()), "the write after the restore");
    client.close().await;
    restored.shutdown().await;
}
