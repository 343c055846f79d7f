//! Quiescence: when a group may go quiet, and how waking resumes the timers.

use super::*;

#[test]
fn quiescence_needs_an_idle_caught_up_group_and_wake_resumes_the_timers() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.stabilize();
    let all = |_: NodeId| true;
    let (term, last) = c.engine(1).quiesce_point(all).expect("idle after stabilizing");
    assert_eq!(last, c.engine(1).last_log_id().index);
    for id in [2, 3] {
        assert!(c.engine(id).can_quiesce_follower(n(1), term, last));
        assert!(!c.engine(id).can_quiesce_follower(n(2), term, last), "not its leader");
        assert!(c.engine(id).quiesce_point(all).is_none(), "followers have no quiesce point");
    }
    // A proposal in flight: not idle, and a follower missing the entry refuses to go quiet.
    c.propose(1, "x");
    assert!(c.engine(1).quiesce_point(all).is_none());
    let new_last = c.engine(1).last_log_id().index;
    assert!(!c.engine(2).can_quiesce_follower(n(1), term, new_last));
    // A follower that is down (3's messages cut) does not keep the group awake; one that is
    // up and behind does.
    c.cut.extend([(n(1), n(3)), (n(3), n(1))]);
    c.stabilize();
    assert!(c.engine(1).quiesce_point(all).is_none(), "3 is behind and counted as live");
    assert!(c.engine(1).quiesce_point(|id| id != n(3)).is_some(), "3 is down: ignored");
    // Wake: a leader heartbeats at once; a follower restarts its election timer from now.
    c.now = c.now.add_ms(10_000);
    let now = c.now;
    c.node(1).engine.wake(now, true);
    assert_eq!(c.engine(1).next_deadline(), now);
    c.node(2).engine.wake(now, true);
    assert!(c.engine(2).next_deadline() > now, "no instant election after a long quiet spell");
    assert!(c.engine(2).in_lease(now), "the live leader counts as heard from");
    c.node(3).engine.wake(now, false);
    assert!(!c.engine(3).in_lease(now), "a dead leader is not counted as heard from");
}

#[test]
fn a_woken_leader_goes_quiet_again_only_once_every_live_follower_answered_a_heartbeat() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    c.stabilize();
    let all = |_: NodeId| true;
    assert!(c.engine(1).quiesce_point(all).is_some(), "idle after stabilizing");
    // Quiet, then woken: every follower still matches the whole log, but none has answered a
    // heartbeat since the wake (a follower's replica may not even be loaded yet).
    let now = c.now;
    c.node(1).engine.wake(now, true);
    assert!(c.engine(1).quiesce_point(all).is_none(), "nobody answered since the wake");
    // Node 3 does not answer (its messages are lost); node 2 does.
    c.cut.extend([(n(1), n(3)), (n(3), n(1))]);
    c.settle(1);
    assert!(c.engine(1).quiesce_point(all).is_none(), "3 is counted live and has not answered");
    assert!(c.engine(1).quiesce_point(|id| id != n(3)).is_some(), "3 is down: 2's answer is enough");
    // 3 answers the next heartbeat.
    c.cut.clear();
    c.settle(1);
    assert!(c.engine(1).quiesce_point(all).is_some(), "every live follower answered since the wake");
}

#[test]
fn a_leader_with_a_read_waiting_does_not_go_quiet() {
    let mut c = Cluster::with_leader(&[1, 2, 3], Config { lease_read: false, ..cfg() });
    let all = |_| true;
    assert!(c.engine(1).quiesce_point(all).is_some(), "idle before the read");
    let now = c.now;
    c.node(1).engine.read(now, 7, ReadMode::ReadIndex);
    assert!(c.engine(1).quiesce_point(all).is_none(), "a read waits for its round");
    // The round goes out; until a quorum answers it, the read still waits.
    let round = c.take_outbox(1);
    assert!(c.engine(1).quiesce_point(all).is_none(), "a read waits for its round's answers");
    for m in round {
        c.deliver(m);
    }
    c.stabilize();
    assert!(c.engine(1).quiesce_point(all).is_some(), "idle again once the read was answered");
}

#[test]
fn a_leader_whose_own_log_write_is_not_durable_does_not_go_quiet() {
    let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
    let all = |_: NodeId| true;
    assert!(c.engine(1).quiesce_point(all).is_some(), "idle before the write");
    c.node(1).auto_sync = false;
    c.propose(1, "x");
    c.stabilize();
    let last = c.engine(1).last_log_id().index;
    assert_eq!(c.engine(1).committed(), last, "the followers' acks committed the entry");
    assert!(c.engine(1).quiesce_point(all).is_none(), "its own copy of the entry is not durable");
    let now = c.now;
    c.node(1).sync(now);
    c.stabilize();
    assert_eq!(c.engine(1).quiesce_point(all), Some((c.engine(1).term(), last)), "idle once durable");
}

/// Twin clusters take the same inputs; in one, every engine releases its idle memory when the
/// group could go quiet, and again in the middle of a write. Their buffers must really be
/// given back, and both must emit exactly the same actions afterwards: waking, replicating,
/// a lease read and a ReadIndex read.
#[test]
fn releasing_idle_memory_gives_back_the_buffers_and_changes_no_behaviour() {
    fn run(release: bool) -> Cluster {
        let mut c = Cluster::with_leader(&[1, 2, 3], cfg());
        for i in 0..5 {
            c.propose(1, &format!("v{i}"));
            c.stabilize();
        }
        c.settle(3);
        assert!(c.engine(1).quiesce_point(|_| true).is_some(), "idle");
        if release {
            let spare = |e: &Engine| e.buffer_sizes().iter().map(|(_, len, cap)| cap - len).sum::<usize>();
            assert!(spare(c.engine(1)) > 0, "the leader kept spare capacity before the release");
            for id in [1, 2, 3] {
                c.node(id).engine.release_idle_memory();
                for (name, len, cap) in c.engine(id).buffer_sizes() {
                    assert_eq!(len, cap, "node {id}: {name} keeps no spare capacity");
                    if !["memberships", "term points", "round_sent_at"].contains(&name) {
                        assert_eq!(cap, 0, "node {id}: {name} is empty and holds no buffer");
                    }
                }
            }
            let rounds = c.engine(1).buffer_sizes().into_iter().find(|(name, ..)| *name == "round_sent_at");
            assert_eq!(rounds.map(|(_, len, _)| len), Some(1), "only the round a quorum acknowledged is kept");
        }
        // Within the lease: served at once, without a round.
        c.now = c.now.add_ms(5);
        let now = c.now;
        c.node(1).engine.read(now, 1, ReadMode::Lease);
        c.node(1).run(now);
        assert_eq!(c.nodes[&n(1)].reads.len(), 1, "the lease still holds (release: {release})");
        // Quiet for a while, then woken by a write.
        c.now = c.now.add_ms(10_000);
        let now = c.now;
        for id in [1, 2, 3] {
            c.node(id).engine.wake(now, true);
        }
        c.propose(1, "after");
        if release {
            // Mid-write: only spare capacity goes, never what the buffers hold.
            for id in [1, 2, 3] {
                c.node(id).engine.release_idle_memory();
            }
        }
        c.stabilize();
        let now = c.now;
        c.node(1).engine.read(now, 2, ReadMode::ReadIndex);
        c.stabilize();
        c.settle(2);
        let now = c.now;
        c.node(1).engine.read(now, 3, ReadMode::Lease);
        c.stabilize();
        c
    }
    let (kept, released) = (run(false), run(true));
    for id in [1, 2, 3] {
        assert_eq!(kept.nodes[&n(id)].seen, released.nodes[&n(id)].seen, "node {id} acted the same");
        assert_eq!(released.applied_data(id).last().map(String::as_str), Some("after"));
    }
    assert_eq!(kept.nodes[&n(1)].reads, released.nodes[&n(1)].reads);
    assert_eq!(released.nodes[&n(1)].reads.len(), 3, "every read was served");
    assert!(released.nodes[&n(1)].reads.iter().all(|(_, r)| r.is_ok()));
}
