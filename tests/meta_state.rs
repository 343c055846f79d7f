//! The meta state machine on real storage, with no network: meta changes applied as log
//! entries to the meta group's key-value state machine, read back as a replica reads them,
//! carried to another replica by the streaming snapshot path, and continued from there by a
//! new meta leader, whose change a stale proposer can no longer overwrite.

use flotilla::meta::{meta_range, read_stored_blocking, StoredMeta, META_GROUP, META_STATE_KEY};
use flotilla::placement::{MetaCommand, NodeId};
use flotilla::raft::{Entry, EntryPayload, LogId, StateMachine};
use flotilla::shard::{KvCommand, KvResponse, KvStateMachine, Store};

/// A replica of the meta group on its own store, applying entries in order.
struct Replica {
    store: Store,
    sm: KvStateMachine,
    next_index: u64,
}

impl Replica {
    fn open(dir: &std::path::Path) -> Replica {
        let store = Store::open(dir).expect("open");
        let sm = KvStateMachine::new(store.clone(), META_GROUP, meta_range());
        Replica { store, sm, next_index: 1 }
    }

    /// Applies `cmd` as the next entry and returns its answer.
    async fn apply(&mut self, cmd: &KvCommand) -> KvResponse {
        let entry = Entry {
            log_id: LogId::new(1, self.next_index),
            payload: EntryPayload::Normal(cmd.encode().expect("encode")),
        };
        self.next_index += 1;
        let out = self.sm.apply(vec![entry]).await.expect("apply");
        KvResponse::decode(&out[0]).expect("decode")
    }

    fn read(&self) -> StoredMeta {
        read_stored_blocking(&self.store).expect("read")
    }
}

/// What a meta leader proposes for `cmd` on the state it read: the records it changes, guarded
/// by the header it read.
fn propose(read: &StoredMeta, cmd: MetaCommand) -> (KvCommand, StoredMeta) {
    let mut next = read.state.clone();
    next.apply(cmd).expect("command fits the state");
    let (writes, after) = read.changes(&next).expect("changes");
    (KvCommand::Txn { guard: META_STATE_KEY.to_vec(), expected: read.guard.clone(), writes }, after)
}

#[tokio::test]
async fn the_meta_state_survives_a_snapshot_and_a_new_leader_continues_from_it() {
    let (d1, d2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let mut leader = Replica::open(d1.path());
    let mut cmds = Vec::new();
    for i in 1..=3 {
        cmds.push(MetaCommand::RegisterNode { node: NodeId(i), addr: format!("127.0.0.1:{i}") });
    }
    cmds.push(MetaCommand::Bootstrap { nodes: vec![NodeId(1), NodeId(2), NodeId(3)] });
    for cmd in cmds {
        let (txn, after) = propose(&leader.read(), cmd);
        assert!(matches!(leader.apply(&txn).await, KvResponse::Done { .. }));
        assert_eq!(leader.read(), after, "a replica reads what the proposer computed");
    }
    for key in ["b", "d", "f", "h"] {
        let read = leader.read();
        let d = read.state.map.lookup(key.as_bytes()).cloned().expect("shard");
        let (txn, _) = propose(&read, MetaCommand::Split { shard: d.id, epoch: d.epoch, key: key.as_bytes().to_vec() });
        assert!(matches!(leader.apply(&txn).await, KvResponse::Done { .. }));
    }
    let at_leader = leader.read();
    assert_eq!((at_leader.revision(), at_leader.state.map.len()), (8, 5));

    // A follower holding an older state (revision 4) is caught up by a streamed snapshot.
    let mut follower = Replica::open(d2.path());
    let older = StoredMeta::default();
    let (txn, _) = propose(&older, MetaCommand::RegisterNode { node: NodeId(9), addr: "stale".into() });
    assert!(matches!(follower.apply(&txn).await, KvResponse::Done { .. }));
    let snap = leader.sm.build_snapshot().await.expect("build");
    let mut offset = 0;
    while offset < snap.size_bytes {
        let len = 100.min(snap.size_bytes - offset);
        let data = leader.sm.read_snapshot(&snap, offset, len).await.expect("read").expect("built");
        follower.sm.receive_snapshot(&snap, offset, data).await.expect("receive");
        offset += len;
    }
    follower.sm.install_snapshot(&snap).await.expect("install");
    follower.next_index = snap.last_log_id.index.0 + 1;
    assert_eq!(follower.read(), at_leader, "the follower holds the leader's state, its stale records gone");

    // The follower becomes meta leader and continues from its own state: it removes a replica.
    let read = follower.read();
    let d = read.state.map.lookup(b"c").cloned().expect("shard");
    let (txn, after) = propose(&read, MetaCommand::RemoveReplica { shard: d.id, epoch: d.epoch, node: NodeId(3) });
    let KvCommand::Txn { writes, .. } = &txn else { unreachable!() };
    assert_eq!(writes.len(), 3, "the descriptor, its tombstone and the header: {writes:?}");
    assert!(matches!(follower.apply(&txn).await, KvResponse::Done { .. }));
    assert!(matches!(leader.apply(&txn).await, KvResponse::Done { .. }), "the same entry on the old leader");
    assert_eq!(follower.read(), after);
    assert_eq!(leader.read(), after, "both replicas hold the same state");

    // The old leader, proposing from the state it read before, is refused by the guard: its
    // change would have been computed from a state that is gone.
    let (stale, _) = propose(&at_leader, MetaCommand::SetDraining { node: NodeId(1), draining: true });
    assert!(matches!(follower.apply(&stale).await, KvResponse::CasFailed { .. }));
    assert_eq!(follower.read(), after, "nothing changed");
}
