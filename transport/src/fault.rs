//! Fault injection: block, delay or drop traffic to and from chosen peers, or take up the
//! streams peers open late (a busy receiver). Off by default;
//! tests turn it on through the [`Transport`](crate::Transport) methods, which exist only with
//! the `fault-injection` feature. Without it no fault can be set, but the checks are compiled
//! all the same, so tests and production run one send path.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code))]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::id::NodeId;

/// The faults in force. Guarded by a mutex in the transport; consulted only when
/// `FaultState::active` is set, so a transport without faults pays one atomic load.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    /// Peers whose traffic is discarded in both directions.
    pub blocked: HashSet<NodeId>,
    /// Extra delay before an envelope to this peer may be written.
    pub delay: HashMap<NodeId, Duration>,
    /// Fraction of outgoing Raft envelopes dropped, with its seeded generator.
    pub drop: Option<(f64, SplitMix64)>,
    /// A busy receiver: its connection tasks wait this long before each round of taking up
    /// the streams a peer opened.
    pub accept_delay: Option<Duration>,
}

impl FaultState {
    pub(crate) fn active(&self) -> bool {
        !self.blocked.is_empty() || !self.delay.is_empty() || self.drop.is_some() || self.accept_delay.is_some()
    }

    /// Whether this outgoing envelope is dropped by the drop fraction.
    pub(crate) fn roll_drop(&mut self) -> bool {
        match &mut self.drop {
            Some((fraction, rng)) => rng.next_f64() < *fraction,
            None => false,
        }
    }
}

/// A small seeded generator (SplitMix64): the same seed drops the same envelopes.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_fraction_is_seeded_and_roughly_right() {
        let rolls = |seed| {
            let mut state = FaultState { drop: Some((0.25, SplitMix64::new(seed))), ..Default::default() };
            (0..10_000).map(|_| state.roll_drop()).collect::<Vec<_>>()
        };
        assert_eq!(rolls(7), rolls(7));
        assert_ne!(rolls(7), rolls(8));
        let dropped = rolls(7).iter().filter(|d| **d).count();
        assert!((2_000..3_000).contains(&dropped), "{dropped}");
    }
}
