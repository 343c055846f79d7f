//! Scans of a group whose range a split narrowed (issue 12, finding 3): a scan starting outside
//! the group's current range is refused as out of range (never answered with an empty page a
//! caller would take for "nothing there"), and every page says how far it read, so a caller
//! whose routing still has the wider range continues from where the group stopped.

use flotilla_raft::{Config, GroupId, Membership, NodeId, RaftError, ReadMode};
use flotilla_shard::{
    Host, HostConfig, HostError, HostNetwork, KeyRange, KvCommand, KvResponse, NodeBatch, ScanEnd, ScanPage, Store,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One host, groups of one voter: nothing to send.
struct NoNet;

impl HostNetwork for NoNet {
    fn send(&self, _to: NodeId, _batch: NodeBatch) {}
}

async fn one_host(dir: &std::path::Path) -> Host {
    let mut c = HostConfig::new(NodeId(1));
    c.raft = Config::fast();
    c.tick_ms = 10;
    c.api_timeout_ms = 10_000;
    Host::open(Store::open(dir).expect("open"), c, Arc::new(NoNet)).await.expect("host")
}

/// Runs `cmd` on `group` once it has elected itself.
async fn write(host: &Host, group: GroupId, cmd: KvCommand) -> KvResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match host.write(group, cmd.clone()).await {
            Err(HostError::Raft(RaftError::NotLeader { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other.expect("write"),
        }
    }
}

fn keys(page: &ScanPage) -> Vec<String> {
    page.pairs.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_of_a_split_group_is_bounded_by_its_new_range_and_refused_outside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = one_host(dir.path()).await;
    host.create_group(GroupId(1), KeyRange::all(), Some(Membership::new([NodeId(1)]))).await.expect("create");
    for k in ["a1", "a2", "l9", "m", "m1", "z"] {
        let cmd = KvCommand::Put { key: k.as_bytes().to_vec(), value: b"v".to_vec() };
        assert_eq!(write(&host, GroupId(1), cmd).await, KvResponse::Done { previous: None });
    }
    let page = host.scan(GroupId(1), Vec::new(), None, 100, ReadMode::ReadIndex).await.expect("scan");
    assert_eq!(keys(&page), ["a1", "a2", "l9", "m", "m1", "z"]);
    assert_eq!(page.end, ScanEnd::Covered(None), "an unbounded group read to the end of the key space");

    // Split at "m": group 1 keeps [.., m), group 2 gets [m, ..).
    let split = KvCommand::Split { at: b"m".to_vec(), new_group: 2 };
    assert!(matches!(write(&host, GroupId(1), split).await, KvResponse::Split { .. }));

    // A caller still routing by the old range asks group 1 for everything: it gets the left
    // half and is told the page ends at "m" (where the group's range ends now), not "to the end".
    let page = host.scan(GroupId(1), Vec::new(), None, 100, ReadMode::ReadIndex).await.expect("scan");
    assert_eq!(keys(&page), ["a1", "a2", "l9"]);
    assert_eq!(page.end, ScanEnd::Covered(Some(b"m".to_vec())));
    // A requested end before the range's end bounds the page.
    let page = host.scan(GroupId(1), b"a".to_vec(), Some(b"b".to_vec()), 100, ReadMode::ReadIndex).await.expect("scan");
    assert_eq!(keys(&page), ["a1", "a2"]);
    assert_eq!(page.end, ScanEnd::Covered(Some(b"b".to_vec())));
    // The limit cuts a page with keys left: "more", resume after the last key.
    let page = host.scan(GroupId(1), Vec::new(), None, 2, ReadMode::ReadIndex).await.expect("scan");
    assert_eq!(keys(&page), ["a1", "a2"]);
    assert_eq!(page.end, ScanEnd::More);
    // A limit that takes exactly the keys left is not "more": the page covers the range.
    let page = host.scan(GroupId(1), b"a2\0".to_vec(), None, 1, ReadMode::ReadIndex).await.expect("scan");
    assert_eq!(keys(&page), ["l9"]);
    assert_eq!(page.end, ScanEnd::Covered(Some(b"m".to_vec())));

    // Starting in the half that was split off: refused as out of range, not an empty page.
    for start in [&b"m"[..], b"m1", b"zz"] {
        let r = host.scan(GroupId(1), start.to_vec(), None, 100, ReadMode::ReadIndex).await;
        assert!(matches!(r, Err(HostError::KeyOutOfRange(GroupId(1)))), "start {start:?}: {r:?}");
    }
    // The new group serves its half, and refuses a start before it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        match host.scan(GroupId(2), b"m".to_vec(), None, 100, ReadMode::ReadIndex).await {
            Err(HostError::Raft(RaftError::NotLeader { .. }) | HostError::UnknownGroup(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => break other.expect("scan of the new group"),
        }
    };
    assert_eq!(keys(&page), ["m", "m1", "z"]);
    assert_eq!(page.end, ScanEnd::Covered(None));
    let r = host.scan(GroupId(2), b"a".to_vec(), None, 100, ReadMode::ReadIndex).await;
    assert!(matches!(r, Err(HostError::KeyOutOfRange(GroupId(2)))), "{r:?}");
    host.shutdown().await;
}
