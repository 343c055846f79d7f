//! A linearizability checker for histories of a key-value store (put, get, compare-and-swap),
//! in the style of Wing & Gong with Lowe's memoization, partitioned per key as Porcupine does:
//! operations on different keys commute, so each key's sub-history is checked alone.
//!
//! An operation whose outcome is unknown (the client timed out, the node crashed) may have
//! taken effect at any time after its invocation, or never: it is given an infinite return
//! time and its output is not checked. Operations that definitely failed must be left out of
//! the history by the caller.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpInput {
    /// Write `value` (`None` deletes).
    Put(Option<String>),
    /// Read.
    Get,
    /// Write `new` if the current value is `expected`.
    Cas {
        /// Expected current value.
        expected: Option<String>,
        /// Value to write.
        new: Option<String>,
    },
}

/// What the client was told.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpOutput {
    /// A put's answer: the value before it.
    Put {
        /// Previous value.
        previous: Option<String>,
    },
    /// A put's answer that does not tell the value before it (a blind write).
    Written,
    /// A get's answer.
    Get(Option<String>),
    /// A compare-and-swap's answer.
    Cas {
        /// Whether it swapped.
        ok: bool,
    },
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client that ran it (for messages only).
    pub client: u64,
    /// The key.
    pub key: String,
    /// The request.
    pub input: OpInput,
    /// Invocation time.
    pub invoke: u64,
    /// Return time and answer; `None` if the outcome is unknown.
    pub result: Option<(u64, OpOutput)>,
}

/// Why a history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotLinearizable {
    /// The key whose sub-history has no linearization.
    pub key: String,
    /// That sub-history, ordered by invocation.
    pub ops: Vec<Op>,
    /// The search gave up (too many states) rather than proving the history wrong.
    pub inconclusive: bool,
}

impl fmt::Display for NotLinearizable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what =
            if self.inconclusive { "could not be checked (search budget exhausted)" } else { "is not linearizable" };
        writeln!(f, "history of key {:?} {what}:", self.key)?;
        for op in &self.ops {
            match &op.result {
                Some((ret, out)) => {
                    writeln!(f, "  client {} [{}, {}] {:?} -> {:?}", op.client, op.invoke, ret, op.input, out)?
                }
                None => writeln!(f, "  client {} [{}, ?] {:?} -> unknown", op.client, op.invoke, op.input)?,
            }
        }
        Ok(())
    }
}

/// States the search may visit per key before it gives up.
pub const SEARCH_STATES_MAX: usize = 2_000_000;

/// Checks a whole history; every key must start absent.
pub fn check_history(ops: &[Op]) -> Result<(), NotLinearizable> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in ops {
        // An unknown read has no effect and nothing to check.
        if op.result.is_none() && op.input == OpInput::Get {
            continue;
        }
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    for (key, mut ops) in by_key {
        ops.sort_by_key(|o| o.invoke);
        match check_key(&ops) {
            Some(true) => {}
            Some(false) => return Err(NotLinearizable { key: key.to_string(), ops, inconclusive: false }),
            None => return Err(NotLinearizable { key: key.to_string(), ops, inconclusive: true }),
        }
    }
    Ok(())
}

/// Applies `op` to `state`: the new state, or `None` if the op's answer contradicts `state`.
fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    let out = op.result.as_ref().map(|(_, o)| o);
    match (&op.input, out) {
        (OpInput::Put(v), None) => Some(v.clone()),
        (OpInput::Put(v), Some(OpOutput::Put { previous })) => (previous == state).then(|| v.clone()),
        (OpInput::Put(v), Some(OpOutput::Written)) => Some(v.clone()),
        (OpInput::Get, Some(OpOutput::Get(v))) => (v == state).then(|| state.clone()),
        (OpInput::Get, None) => Some(state.clone()),
        (OpInput::Cas { expected, new }, None) => Some(if expected == state { new.clone() } else { state.clone() }),
        (OpInput::Cas { expected, new }, Some(OpOutput::Cas { ok })) => {
            let swaps = expected == state;
            (swaps == *ok).then(|| if swaps { new.clone() } else { state.clone() })
        }
        _ => None, // an answer of the wrong kind
    }
}

/// `Some(true)`: linearizable; `Some(false)`: not; `None`: gave up.
///
/// Ops are sorted by invocation. Each search node carries `lo`, the first op with a known
/// outcome not yet linearized, and how many such ops are done, so a step looks only at the
/// window of ops invoked before the earliest pending return (plus unknown ops left behind),
/// not at the whole history: long histories cost about their length times the window.
fn check_key(ops: &[Op]) -> Option<bool> {
    let n = ops.len();
    let ret: Vec<u64> = ops.iter().map(|o| o.result.as_ref().map(|(t, _)| *t).unwrap_or(u64::MAX)).collect();
    let known_total = ops.iter().filter(|o| o.result.is_some()).count();
    let unknown: Vec<usize> = (0..n).filter(|i| ops[*i].result.is_none()).collect();
    let words = n.div_ceil(64).max(1);
    let mut visited: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    struct Node {
        done: Vec<u64>,
        state: Option<String>,
        /// Next candidate to try, as a position in this node's candidate list.
        from: usize,
        lo: usize,
        known_done: usize,
    }
    let mut stack = vec![Node { done: vec![0u64; words], state: None, from: 0, lo: 0, known_done: 0 }];
    while let Some(Node { done, state, from, mut lo, known_done }) = stack.pop() {
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // Finished once every op with a known outcome is linearized: the unknown ones can all
        // go last (or never have happened).
        if known_done == known_total {
            return Some(true);
        }
        while lo < n && (is_done(lo) || ops[lo].result.is_none()) {
            lo += 1;
        }
        // The earliest return among pending ops: only ops invoked by then may go next (an op
        // invoked after it cannot precede it). Unknown ops never return, so they do not count.
        let mut min_ret = u64::MAX;
        for i in lo..n {
            if ops[i].invoke > min_ret {
                break;
            }
            if !is_done(i) {
                min_ret = min_ret.min(ret[i]);
            }
        }
        // Candidates: pending unknown ops from before `lo`, then ops from `lo` invoked by
        // `min_ret` (equal times count as concurrent: the clock is coarse).
        let behind = unknown.iter().copied().take_while(|i| *i < lo).filter(|i| !is_done(*i));
        let window = (lo..n).take_while(|i| ops[*i].invoke <= min_ret).filter(|i| !is_done(*i));
        for (pos, i) in behind.chain(window).enumerate().skip(from) {
            let Some(next) = step(&state, &ops[i]) else { continue };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if visited.insert((d.clone(), next.clone())) {
                if visited.len() > SEARCH_STATES_MAX {
                    return None;
                }
                let k = known_done + usize::from(ops[i].result.is_some());
                // Come back to try the next candidate after this branch.
                stack.push(Node { done: done.clone(), state: state.clone(), from: pos + 1, lo, known_done });
                stack.push(Node { done: d, state: next, from: 0, lo, known_done: k });
                break;
            }
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn put(client: u64, inv: u64, ret: u64, v: &str, prev: Option<String>) -> Op {
        Op {
            client,
            key: "k".into(),
            input: OpInput::Put(s(v)),
            invoke: inv,
            result: Some((ret, OpOutput::Put { previous: prev })),
        }
    }

    fn get(client: u64, inv: u64, ret: u64, v: Option<String>) -> Op {
        Op { client, key: "k".into(), input: OpInput::Get, invoke: inv, result: Some((ret, OpOutput::Get(v))) }
    }

    fn unknown_put(client: u64, inv: u64, v: &str) -> Op {
        Op { client, key: "k".into(), input: OpInput::Put(s(v)), invoke: inv, result: None }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![put(1, 0, 1, "a", None), get(1, 2, 3, s("a")), put(1, 4, 5, "b", s("a")), get(2, 6, 7, s("b"))];
        assert!(check_history(&h).is_ok());
    }

    #[test]
    fn a_blind_write_checks_only_its_effect() {
        let written = |inv: u64, ret: u64, v: &str| Op {
            client: 1,
            key: "k".into(),
            input: OpInput::Put(s(v)),
            invoke: inv,
            result: Some((ret, OpOutput::Written)),
        };
        assert!(check_history(&[written(0, 1, "a"), written(2, 3, "b"), get(2, 4, 5, s("b"))]).is_ok());
        assert!(check_history(&[written(0, 1, "a"), written(2, 3, "b"), get(2, 4, 5, s("a"))]).is_err());
    }

    #[test]
    fn operations_at_the_same_instant_are_concurrent() {
        let h = vec![put(1, 0, 5, "a", None), get(2, 5, 5, s("a")), put(1, 5, 5, "b", s("a"))];
        assert!(check_history(&h).is_ok());
    }

    #[test]
    fn stale_read_after_a_completed_write_is_rejected() {
        // The write returned before the read was invoked; the read saw the old value.
        let h = vec![put(1, 0, 1, "a", None), put(1, 2, 3, "b", s("a")), get(2, 4, 5, s("a"))];
        let err = check_history(&h).expect_err("stale read");
        assert!(!err.inconclusive);
        assert_eq!(err.key, "k");
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The read overlaps the write: both old and new values are fine.
        let h = vec![put(1, 0, 1, "a", None), put(1, 2, 10, "b", s("a")), get(2, 3, 4, s("b")), get(3, 5, 6, s("b"))];
        assert!(check_history(&h).is_ok());
        let h = vec![put(1, 0, 1, "a", None), put(1, 2, 10, "b", s("a")), get(2, 3, 4, s("a"))];
        assert!(check_history(&h).is_ok());
    }

    #[test]
    fn a_read_cannot_go_back_in_time() {
        // Two sequential reads during one write: new then old is impossible.
        let h = vec![put(1, 0, 1, "a", None), put(1, 2, 10, "b", s("a")), get(2, 3, 4, s("b")), get(2, 5, 6, s("a"))];
        assert!(check_history(&h).is_err());
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        // The write timed out; later reads saw it.
        let h = vec![put(1, 0, 1, "a", None), unknown_put(2, 2, "b"), get(3, 5, 6, s("b"))];
        assert!(check_history(&h).is_ok());
        // ... or never saw it.
        let h = vec![put(1, 0, 1, "a", None), unknown_put(2, 2, "b"), get(3, 5, 6, s("a"))];
        assert!(check_history(&h).is_ok());
        // But it cannot take effect before it was invoked.
        let h = vec![put(1, 0, 1, "a", None), get(3, 2, 3, s("b")), unknown_put(2, 4, "b")];
        assert!(check_history(&h).is_err());
        // And once seen, it cannot be unseen.
        let h = vec![put(1, 0, 1, "a", None), unknown_put(2, 2, "b"), get(3, 5, 6, s("b")), get(3, 7, 8, s("a"))];
        assert!(check_history(&h).is_err());
    }

    #[test]
    fn compare_and_swap_answers_are_checked() {
        let cas = |client, inv, ret, exp: Option<String>, new: &str, ok| Op {
            client,
            key: "k".into(),
            input: OpInput::Cas { expected: exp, new: s(new) },
            invoke: inv,
            result: Some((ret, OpOutput::Cas { ok })),
        };
        // Two concurrent CAS from the same expected value: at most one may succeed.
        let h = vec![put(1, 0, 1, "a", None), cas(2, 2, 5, s("a"), "b", true), cas(3, 3, 6, s("a"), "c", true)];
        assert!(check_history(&h).is_err());
        let h = vec![put(1, 0, 1, "a", None), cas(2, 2, 5, s("a"), "b", true), cas(3, 3, 6, s("a"), "c", false)];
        assert!(check_history(&h).is_ok());
    }

    #[test]
    fn a_put_reports_the_value_it_replaced() {
        let h = vec![put(1, 0, 1, "a", None), put(2, 2, 3, "b", s("zzz"))];
        assert!(check_history(&h).is_err());
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut other = get(2, 4, 5, None);
        other.key = "other".into();
        let h = vec![put(1, 0, 1, "a", None), other, get(3, 6, 7, s("a"))];
        assert!(check_history(&h).is_ok());
    }
}
