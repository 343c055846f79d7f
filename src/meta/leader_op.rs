//! One meta op as the meta leader works it out in memory, before anything is written: a copy
//! of the stored state with the nodes' live reports laid over it, the op applied to the copy,
//! and the records that differ from the stored state. Kept apart from the node so that its
//! cost can be measured alone (`benches/meta_op.rs`): the leader runs it for every meta op,
//! a node's report each second among them, so it must cost what the op changes, not what
//! the map holds.

use super::records::{MetaWrite, StoredMeta};
use super::run_op;
use crate::peer_wire::MetaOp;
use crate::placement::{BalancerConfig, MetaState};
use crate::wire::AdminResponse;

/// What [`work_out`] made of an op.
#[derive(Debug)]
pub struct WorkedOut {
    /// The state after the op, the live reports laid over it (and changed by the op).
    pub next: MetaState,
    /// The op's answer.
    pub answer: AdminResponse,
    /// The records to write (empty: nothing stored changed).
    pub writes: Vec<MetaWrite>,
    /// The stored state once `writes` landed.
    pub after: StoredMeta,
}

/// Runs `op` on a copy of `stored`'s state over which `overlay` laid the nodes' reports, and
/// works out the records it changed, at a revision above `floor` (see
/// [`StoredMeta::changes_above`]). An error is the op's refusal (nothing was changed).
pub fn work_out(
    stored: &StoredMeta,
    op: &MetaOp,
    balancer: &BalancerConfig,
    floor: u64,
    overlay: impl FnOnce(&mut MetaState),
) -> Result<WorkedOut, String> {
    let mut next = stored.state.clone();
    overlay(&mut next);
    let answer = run_op(op, &mut next, balancer)?;
    let (writes, after) = stored.changes_above(&next, floor)?;
    Ok(WorkedOut { next, answer, writes, after })
}
