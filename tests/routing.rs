//! Client routing (issue 12): a client whose map predates a split still scans every key and
//! finds moved keys after one refresh (finding 3); a client whose only contact cannot reach
//! the meta leader still routes by that node's own copy of the map (finding 10).

use flotilla::transport::PeerIdentity;
use flotilla::wire::{AdminRequest, AdminResponse, ReadConsistency, Request, Response};
use flotilla::Client;
use std::time::{Duration, Instant};

mod common;

use common::cluster::Cluster;

/// `n` nodes; the meta group on `meta`, every initial shard on `replicas`, split at `keys`.
async fn start(n: u64, meta: &[u64], replicas: &[u64], keys: &[&str]) -> Cluster {
    Cluster::start_with(n, meta, replicas, keys.iter().map(|k| k.as_bytes().to_vec()).collect(), |_| {}).await
}

/// Waits until the meta leader's reports show `shards` shards, each with a leader.
async fn wait_shards_led(client: &Client, shards: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(AdminResponse::Shards(rows)) = client.admin(AdminRequest::Shards).await {
            if rows.len() == shards && rows.iter().all(|r| r.leader.is_some()) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the {shards} shards never all got a leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn keys_of(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
    pairs.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_map_predates_a_split_scans_every_key_and_finds_moved_keys_after_one_refresh() {
    let mut cluster = start(3, &[1, 2, 3], &[1, 2, 3], &[]).await;
    let stale = cluster.client().await;
    let mut want = Vec::new();
    for side in ["b", "x"] {
        for i in 0..15 {
            let k = format!("{side}-{i:02}");
            stale.put(k.as_bytes(), b"v").await.unwrap();
            want.push(k);
        }
    }
    // Another client splits the shard at "m"; the first one's map still has one shard.
    let admin = cluster.client().await;
    let AdminResponse::Changed(halves) = admin.admin(AdminRequest::Split { key: b"m".to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    let left = halves.iter().find(|d| d.start.is_empty()).expect("left half").clone();
    wait_shards_led(&admin, 2).await;
    assert_eq!(stale.cached_view().map.len(), 1, "the client's map predates the split");

    // A scan of the whole key space sees every key, the half that split off included.
    let all = stale.scan(b"", None, 1000).await.unwrap();
    assert_eq!(keys_of(&all), want);
    assert_eq!(stale.cached_view().map.len(), 2, "the scan refreshed the map");
    // Pages cut by the limit, across the split point.
    let some = stale.scan(b"b-10", Some(b"x-05"), 7).await.unwrap();
    assert_eq!(keys_of(&some), ["b-10", "b-11", "b-12", "b-13", "b-14", "x-00", "x-01"]);

    // A fresh client with the old map (taken before the split is not possible any more, so
    // the same client again after another split): gets and puts of moved keys succeed after
    // one map refresh, promptly.
    let AdminResponse::Changed(_) = admin.admin(AdminRequest::Split { key: b"t".to_vec() }).await.unwrap() else {
        panic!("split answered otherwise")
    };
    wait_shards_led(&admin, 3).await;
    assert_eq!(stale.cached_view().map.len(), 2, "the client's map predates the second split");
    let before = stale.routing_refreshes();
    let pages_before = stale.map_answers().1;
    let started = Instant::now();
    stale.put(b"x-new", b"w").await.unwrap();
    assert_eq!(stale.get(b"x-00").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(stale.get(b"x-new").await.unwrap(), Some(b"w".to_vec()));
    let took = started.elapsed();
    assert_eq!(stale.map_answers().1, pages_before, "no page of the whole map after the first");
    assert_eq!(stale.routing_refreshes() - before, 1, "one map refresh for the moved keys");
    // The client held a map: it was sent what changed since, not the map again.
    assert!(stale.map_answers().0 >= 1, "answers: {:?}", stale.map_answers());
    assert!(took < Duration::from_secs(3), "stale routing took {took:?}");

    // A node refuses a scan starting in a shard its map says the key is not in, saying where
    // it is; and a scan limit of zero.
    let node = cluster.node(1);
    let view = node.meta_view();
    let d = view.map.get(left.id).unwrap();
    let req = |start: &str, limit: u32| Request::Scan {
        shard: d.id,
        epoch: d.epoch,
        start: start.as_bytes().to_vec(),
        end: None,
        limit,
        consistency: ReadConsistency::Stale,
    };
    match node.handle(&PeerIdentity::Client("test".into()), req("x-00", 10)).await {
        Response::WrongShard { owner } => assert!(owner.contains(b"x-00"), "{owner:?}"),
        other => panic!("a scan outside the shard answered {other:?}"),
    }
    assert!(matches!(node.handle(&PeerIdentity::Client("test".into()), req("b-00", 0)).await, Response::Invalid(_)));
    stale.close().await;
    admin.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_contact_cannot_reach_the_meta_leader_still_routes_to_shard_leaders() {
    // The meta group on nodes 1-3, the data shards on nodes 2-4.
    let mut cluster = start(4, &[1, 2, 3], &[2, 3, 4], &["m"]).await;
    let client = cluster.client().await;
    wait_shards_led(&client, 2).await;
    for k in ["a-before", "z-before"] {
        client.put(k.as_bytes(), b"v").await.unwrap();
    }
    assert_eq!(cluster.node(4).meta_view().map.len(), 2, "node 4 holds a copy of the map");
    client.close().await;

    // Two of the three meta voters stop: the meta group has no leader, and no node can read
    // the map through one. Every shard keeps a quorum (nodes 3 and 4).
    cluster.stop(1).await;
    cluster.stop(2).await;

    // A new client whose only contact is node 4 connects by node 4's own copy of the map and
    // reaches the shard leaders (elected anew among nodes 3 and 4).
    let mut cfg = cluster.config(&[4]);
    cfg.request_timeout = Duration::from_secs(2);
    cfg.op_timeout = Duration::from_secs(15);
    let started = Instant::now();
    let client = Client::connect(cfg).await.expect("connect through a node that cannot reach a meta leader");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "connecting took {took:?}");
    for k in ["a-after", "z-after"] {
        client.put(k.as_bytes(), b"w").await.unwrap();
    }
    for (k, v) in [("a-before", "v"), ("z-before", "v"), ("a-after", "w"), ("z-after", "w")] {
        assert_eq!(client.get(k.as_bytes()).await.unwrap(), Some(v.as_bytes().to_vec()), "{k}");
    }
    // Only the authoritative read of the map needs the meta leader.
    assert!(client.refresh().await.is_err());
    client.close().await;
    cluster.shutdown().await;
}

/// The window between a group applying a split and the map hearing of it: a node whose map
/// still gives the shard the whole key space serves a scan only as far as the group's range
/// reaches now, says where that is, and refuses a scan starting beyond it as out of range —
/// never an empty page that would make the client skip the half that split off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scan_in_the_window_before_the_map_hears_of_a_split_is_bounded_and_refused_beyond() {
    let mut cluster = start(3, &[1, 2, 3], &[1, 2, 3], &[]).await;
    let client = cluster.client().await;
    for k in ["b-1", "b-2", "x-1", "x-2"] {
        client.put(k.as_bytes(), b"v").await.unwrap();
    }
    let view = cluster.node(1).meta_view();
    let shard = view.map.lookup(b"b").unwrap().clone();
    assert!(shard.start.is_empty() && shard.end.is_none(), "one shard holds every key");
    // The group splits at "m" through Raft alone: the meta state does not know.
    let leader = loop {
        let mut found = None;
        for n in cluster.nodes() {
            if let Ok(infos) = n.host().group_info().await {
                if infos.iter().any(|i| i.group == shard.id && i.role == flotilla::raft::Role::Leader) {
                    found = Some(n.id());
                }
            }
        }
        if let Some(l) = found {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let node = cluster.node(leader.0);
    let split = flotilla::shard::KvCommand::Split { at: b"m".to_vec(), new_group: 1000 };
    node.host().write(shard.id, split).await.expect("split through Raft");
    assert_eq!(node.meta_view().map.get(shard.id).unwrap().end, None, "the map has not heard of it");

    let scan = |start: &str| Request::Scan {
        shard: shard.id,
        epoch: shard.epoch,
        start: start.as_bytes().to_vec(),
        end: None,
        limit: 100,
        consistency: ReadConsistency::Linearizable,
    };
    let me = PeerIdentity::Client("test".into());
    match node.handle(&me, scan("a")).await {
        Response::Page { pairs, end } => {
            let keys: Vec<&[u8]> = pairs.iter().map(|(k, _)| k.as_slice()).collect();
            assert_eq!(keys, [b"b-1".as_slice(), b"b-2"]);
            assert_eq!(end, flotilla::wire::ScanEnd::Covered(Some(b"m".to_vec())), "the page says where it stops");
        }
        other => panic!("a scan inside the group's range answered {other:?}"),
    }
    match node.handle(&me, scan("n")).await {
        Response::OutOfRange { shard: s } => assert_eq!(s, shard.id),
        other => panic!("a scan beyond the group's range answered {other:?}"),
    }
    client.close().await;
    cluster.shutdown().await;
}

/// The peer protocol is for nodes: a client's certificate gets a refusal, whatever it asks;
/// a node's gets the meta state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_requests_are_refused_to_clients_and_served_to_nodes() {
    use flotilla::peer_wire::{MetaOp, PeerRequest, PeerResponse};
    use flotilla::transport::Client as RawClient;
    let mut cluster = start(3, &[1, 2, 3], &[1, 2, 3], &[]).await;
    cluster.client().await.close().await;
    let addr = cluster.node(1).local_addr().unwrap();
    let body = PeerRequest::Meta { op: MetaOp::Read, forwarded: false }.encode();
    let ask = |tls: flotilla::transport::cert::TlsIdentity, as_node: bool| {
        let body = body.clone();
        async move {
            let bind = "127.0.0.1:0".parse().unwrap();
            let raw = if as_node { RawClient::for_node(&tls, bind) } else { RawClient::new(&tls, bind) }.unwrap();
            let conn = raw.connect(addr, flotilla::raft::NodeId(1), Duration::from_secs(5)).await.unwrap();
            let answer = conn.request(body, Duration::from_secs(10)).await.unwrap();
            raw.close().await;
            PeerResponse::decode(&answer).unwrap()
        }
    };
    match ask(cluster.dev.client_tls().unwrap(), false).await {
        PeerResponse::Refused(why) => assert!(why.contains("for nodes"), "{why}"),
        other => panic!("a client's peer request answered {other:?}"),
    }
    match ask(cluster.dev.node_tls(flotilla::raft::NodeId(2)).unwrap(), true).await {
        PeerResponse::Meta { state: flotilla::peer_wire::WholeState::Inline(state), .. } => assert!(!state.is_empty()),
        other => panic!("a node's meta read answered {other:?}"),
    }
    cluster.shutdown().await;
}

/// A client reads a map of many shards in pages (here 3 shards a page), assembled into the
/// node's map even while splits change it between pages, and afterwards only the changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_map_is_read_in_pages_while_it_changes_and_then_followed_by_its_changes() {
    let mut cluster = Cluster::start(3, 20).await;
    let admin = cluster.client().await;
    wait_shards_led(&admin, 20).await;
    let paged = |cluster: &Cluster| {
        let mut cfg = cluster.config(&[1, 2, 3]);
        cfg.map_page_shards = 3;
        cfg
    };
    let client = Client::connect(paged(&cluster)).await.unwrap();
    let (changes, pages) = client.map_answers();
    assert_eq!(changes, 0);
    assert!(pages >= 7, "20 shards, 3 a page: {pages} pages");
    let view = client.cached_view();
    view.map.validate().unwrap();
    assert_eq!(view.map, cluster.node(1).meta_view().map, "the pages make the node's map");

    // Splits one after another, while new clients read the map in pages.
    let splitter = {
        let admin = std::sync::Arc::new(admin);
        let a = admin.clone();
        (
            admin,
            tokio::spawn(async move {
                for i in 0..8u32 {
                    let key = format!("{:02x}{:02x}", i * 29 % 256, i);
                    a.admin(AdminRequest::Split { key: key.into_bytes() }).await.expect("split");
                }
            }),
        )
    };
    let mut readers = 0;
    while !splitter.1.is_finished() || readers < 3 {
        let c = Client::connect(paged(&cluster)).await.unwrap();
        let map = c.cached_view().map;
        map.validate().unwrap_or_else(|e| panic!("pages read while splitting: {e}"));
        for d in map.shards() {
            let mut key = d.start.clone();
            key.push(b'~');
            c.put(&key, b"v").await.unwrap();
            assert_eq!(c.get(&key).await.unwrap(), Some(b"v".to_vec()));
        }
        c.close().await;
        readers += 1;
    }
    splitter.1.await.unwrap();
    wait_shards_led(&splitter.0, 28).await;
    // The first client catches up by changes alone.
    let key = b"e5~moved";
    client.put(key, b"v").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.cached_view().map.len() != 28 {
        assert!(Instant::now() < deadline, "the client never saw every split");
        client.put(key, b"v").await.unwrap();
        for d in cluster.node(1).meta_view().map.shards() {
            let mut k = d.start.clone();
            k.push(b'~');
            client.put(&k, b"v").await.unwrap();
        }
    }
    assert_eq!(client.map_answers().1, pages, "no page after the first map");
    assert!(client.map_answers().0 >= 1);
    client.close().await;
    splitter.0.close().await;
    cluster.shutdown().await;
}

/// `Client::refresh` reads the map through the meta leader, in pages: a split acknowledged
/// just before is in it, whichever node answers and however many shards the map holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_map_comes_in_pages_and_holds_every_change_acknowledged_before() {
    let mut cluster = Cluster::start(3, 20).await;
    let admin = cluster.client().await;
    wait_shards_led(&admin, 20).await;
    let mut cfg = cluster.config(&[1, 2, 3]);
    cfg.map_page_shards = 3;
    let client = Client::connect(cfg).await.unwrap();
    for i in 0..5u32 {
        let key = format!("{:02x}~fresh{i}", 40 * i + 7).into_bytes();
        admin.admin(AdminRequest::Split { key: key.clone() }).await.expect("split");
        let (_, pages_before) = client.map_answers();
        let view = client.refresh().await.expect("a fresh map");
        let (_, pages_after) = client.map_answers();
        view.map.validate().unwrap();
        assert_eq!(view.map.len(), 21 + i as usize, "every split so far");
        assert!(view.map.shards().any(|d| d.start == key), "the split acknowledged before the refresh");
        assert!(pages_after - pages_before >= 7, "{} shards, 3 a page", view.map.len());
        assert_eq!(client.cached_view().map, view.map, "the fresh map is the client's");
    }
    cluster.shutdown().await;
}
