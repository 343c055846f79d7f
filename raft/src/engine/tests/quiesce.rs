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
