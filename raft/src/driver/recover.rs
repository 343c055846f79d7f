//! Start-up: rebuilds the engine's [`InitialState`] from storage.

use crate::engine::InitialState;
use crate::error::StorageError;
use crate::membership::StoredMembership;
use crate::storage::{LogStorage, StateMachine};
use crate::types::{LogId, LogIndex};

/// Bytes read per call while scanning the log tail for configuration entries.
const SCAN_BYTES_MAX: usize = 4 << 20;

/// Reads what the engine needs to resume: the vote, the log's bounds and the points where its
/// term changes (found by binary search: terms never decrease along a log, so each term costs
/// O(log n) single-entry reads rather than a scan), the applied state, the configurations in
/// the not-yet-applied tail.
pub async fn recover_state<L: LogStorage, S: StateMachine>(log: &L, sm: &mut S) -> Result<InitialState, StorageError> {
    let vote = log.read_vote().await?.unwrap_or_default();
    let ls = log.log_state().await?;
    let last_purged = ls.last_purged.unwrap_or(LogId::ZERO);
    let last_log_id = ls.last.unwrap_or(last_purged);
    if last_log_id.index < last_purged.index {
        return Err(StorageError::new(
            "log_state",
            format!("last entry {last_log_id} is before the purged {last_purged}"),
        ));
    }
    let term_points = term_points(log, last_purged.index.next(), last_log_id.index).await?;
    let committed = log.read_committed().await?.unwrap_or_default();
    let applied_state = sm.applied_state().await?;
    let applied = applied_state.last_applied.unwrap_or(LogId::ZERO);
    if applied.index < last_purged.index {
        // The log was purged on the promise that the state machine held these entries
        // durably: it does not, and the entries are gone.
        return Err(StorageError::new(
            "applied_state",
            format!("the state machine has applied up to {applied}, but the log is purged up to {last_purged}"),
        ));
    }

    // Configuration entries after what the state machine applied.
    let mut log_memberships = Vec::new();
    let mut next = applied.index.next().max(last_purged.index.next());
    while next <= last_log_id.index {
        let chunk = log.read_entries(next, last_log_id.index, SCAN_BYTES_MAX).await?;
        let Some(end) = chunk.last().map(|e| e.log_id.index) else {
            return Err(StorageError::new("read_entries", format!("no entry at {next}")));
        };
        for e in &chunk {
            if let Some(m) = e.membership() {
                log_memberships.push(StoredMembership { log_id: e.log_id, membership: m.clone() });
            }
        }
        next = end.next();
    }
    let state = InitialState {
        vote,
        last_purged,
        term_points,
        last_log_id,
        committed,
        applied,
        applied_membership: applied_state.membership,
        log_memberships,
    };
    Ok(state)
}

async fn term_at<L: LogStorage>(log: &L, index: LogIndex) -> Result<LogId, StorageError> {
    let e = log.read_entries(index, index, 1).await?;
    match e.first() {
        Some(e) if e.log_id.index == index => Ok(e.log_id),
        _ => Err(StorageError::new("read_entries", format!("entry {index} missing"))),
    }
}

async fn term_points<L: LogStorage>(log: &L, first: LogIndex, last: LogIndex) -> Result<Vec<LogId>, StorageError> {
    let mut points = Vec::new();
    let mut start = first;
    while start <= last {
        let id = term_at(log, start).await?;
        points.push(id);
        // The last index whose term equals id.term: binary search over (start, last].
        let (mut lo, mut hi) = (start.0, last.0);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if term_at(log, LogIndex(mid)).await?.term == id.term {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        start = LogIndex(lo + 1);
    }
    Ok(points)
}
