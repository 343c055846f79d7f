//! A 3-node Raft cluster in one process over an in-memory network: elect, write, read,
//! add a learner, change membership by joint consensus, transfer leadership, snapshot.
//!
//! ```sh
//! cargo run -p flotilla-raft --features testing --example cluster
//! ```
//! Set `RUST_LOG=flotilla_raft=debug` to watch the protocol.

use flotilla_raft::testing::{KvCommand, KvResponse, MemLogStorage, MemRouter, MemStateMachine};
use flotilla_raft::{Config, GroupId, LogIndex, Membership, NodeId, Raft, ReadMode, Role};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

async fn start(router: &MemRouter, id: u64, sms: &mut BTreeMap<u64, MemStateMachine>) -> anyhow::Result<Raft> {
    let sm = MemStateMachine::new();
    // Short timers for a local demo; keep only two entries behind a snapshot so compaction shows.
    let config = Config { log_keep_entries: 2, ..Config::fast() };
    let raft = Raft::start(NodeId(id), GroupId(1), config, MemLogStorage::new(), sm.clone(), router.network()).await?;
    router.register(raft.clone());
    sms.insert(id, sm);
    Ok(raft)
}

async fn leader_of(rafts: &BTreeMap<u64, Raft>) -> anyhow::Result<u64> {
    let any = rafts.values().next().ok_or_else(|| anyhow::anyhow!("no nodes"))?;
    let m = any.wait_for(WAIT, |m| m.leader.is_some_and(|l| rafts.contains_key(&l.0))).await?;
    let leader = m.leader.ok_or_else(|| anyhow::anyhow!("no leader"))?.0;
    rafts[&leader].wait_for(WAIT, |m| m.role == Role::Leader).await?;
    Ok(leader)
}

async fn put(raft: &Raft, key: &str, value: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    let cmd = KvCommand::Put { key: key.into(), value: value.into() };
    let r = raft.client_write(cmd.encode()).await?;
    let resp = KvResponse::decode(&r.data).map_err(anyhow::Error::msg)?;
    println!(
        "  put {key}={value} on node {} -> entry {} (previous: {:?}) in {:?}",
        raft.id(),
        r.log_id,
        resp.previous,
        t.elapsed()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "flotilla_raft=warn".into()),
        )
        .init();
    let router = MemRouter::new();
    let mut sms = BTreeMap::new();
    let mut rafts = BTreeMap::new();
    for id in 1..=3 {
        rafts.insert(id, start(&router, id, &mut sms).await?);
    }

    println!("1. Forming a cluster of nodes 1, 2, 3");
    rafts[&1].initialize(Membership::new([1, 2, 3].map(NodeId))).await?;
    let leader = leader_of(&rafts).await?;
    println!("  node {leader} is the leader (term {})", rafts[&leader].metrics().borrow().term);

    println!("2. Writing");
    for (k, v) in [("apple", "red"), ("banana", "yellow"), ("cherry", "dark red")] {
        put(&rafts[&leader], k, v).await?;
    }

    println!("3. Reading linearizably");
    let idx = rafts[&leader].ensure_linearizable(ReadMode::ReadIndex).await?;
    println!("  ReadIndex confirmed at index {idx}: apple={:?}", sms[&leader].get("apple"));
    let idx = rafts[&leader].ensure_linearizable(ReadMode::Lease).await?;
    println!("  lease read at index {idx}: banana={:?}", sms[&leader].get("banana"));

    println!("4. Adding node 4 as a learner, then replacing node {} by it", if leader == 3 { 2 } else { 3 });
    rafts.insert(4, start(&router, 4, &mut sms).await?);
    let at = rafts[&leader].add_learner(NodeId(4)).await?;
    let target = rafts[&leader].metrics().borrow().last_log_id.index;
    rafts[&4].wait_for(WAIT, |m| m.applied >= target).await?;
    println!("  learner added at entry {at}; it caught up to {target}: cherry={:?}", sms[&4].get("cherry"));
    let removed = if leader == 3 { 2 } else { 3 };
    let voters: BTreeSet<NodeId> = [1, 2, 3, 4].into_iter().filter(|i| *i != removed).map(NodeId).collect();
    let at = rafts[&leader].change_membership(voters).await?;
    println!(
        "  joint consensus done, final configuration at entry {at}: {}",
        rafts[&leader].metrics().borrow().committed_membership.membership
    );
    let gone = rafts.remove(&removed).ok_or_else(|| anyhow::anyhow!("missing node"))?;
    router.unregister(NodeId(removed));
    gone.shutdown().await;
    put(&rafts[&leader], "date", "brown").await?;

    println!("5. Transferring leadership from node {leader} to node 4");
    rafts[&leader].transfer_leader(NodeId(4)).await?;
    let leader = leader_of(&rafts).await?;
    println!("  node {leader} is the leader now (term {})", rafts[&leader].metrics().borrow().term);
    put(&rafts[&leader], "elderberry", "purple").await?;

    println!("6. Log compaction (no snapshot needed: the state machine's state is durable)");
    rafts[&leader].compact_log().await?;
    let m = rafts[&leader].wait_for(WAIT, |m| m.first_log_index > LogIndex(1)).await?;
    println!("  durable applied index {}; the log now starts at index {}", m.durable_applied, m.first_log_index);

    let idx = rafts[&leader].ensure_linearizable(ReadMode::ReadIndex).await?;
    for (id, raft) in &rafts {
        raft.wait_for(WAIT, |m| m.applied >= idx).await?;
        println!("  node {id}: {} keys, applied {}", sms[id].data().len(), raft.metrics().borrow().applied);
    }
    for raft in rafts.values() {
        raft.shutdown().await;
    }
    println!("done");
    Ok(())
}
