//! How long a node forms the shards of its bootstrap with their first configuration.
//!
//! Every voter of a bootstrap shard forms it itself: the shard's first state (its first
//! voters, its range then, and the data of a restore) is on each of them before any log
//! entry is, and a shard whose voters have not formed it has no leader to feed them. Once a
//! voter formed its replica, forming it again would be wrong: a replica removed since and
//! placed here again must be fed by its leader from what the group holds now (a restore's
//! data, for one, was deleted with it). So a node forms with the first configuration, whatever
//! the map holds of a shard now, until it has formed every bootstrap shard placed on it once;
//! that point is recorded in its data directory. After it, only a shard the map still holds
//! in its first configuration is formed (`replicas_to_create` in `reconcile.rs`), which no
//! removal can have preceded.
//!
//! Without that, a move (by hand, a drain or the balancer) of a bootstrap shard asked before
//! its voters formed it left the shard without a leader for good: the voters still to form it
//! saw a changed configuration in the map and started empty, waiting for a leader.
//!
//! The first voters a node forms with are the meta state's record of the bootstrap
//! (`placement::BootstrapRecord`), which its own `[bootstrap]` must match; a cluster
//! bootstrapped before the record forms by the older rule only. Once done here, the node has
//! the meta state record it too: a node the record names whose data directory says nothing
//! (wiped, or new under an old id) creates no replica (`reconcile.rs`).

use super::unsafe_recovery::write_durably;
use std::path::Path;

/// The file in a node's data directory that says its bootstrap shards are being formed: a
/// round formed some of them, and may have been cut short.
pub const FORMING_FILE: &str = "bootstrap-forming";
/// The file in a node's data directory that says its bootstrap shards were all formed.
pub const FORMED_FILE: &str = "bootstrap-formed";

/// Where a node is in forming its bootstrap shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Forming {
    /// None formed, nothing recorded.
    NotStarted,
    /// Recorded as started ([`FORMING_FILE`]).
    Started,
    /// Done ([`FORMED_FILE`]), or nothing to form: a node without a bootstrap.
    Done,
}

impl Forming {
    /// Whether bootstrap shards are still formed with their first configuration whatever the
    /// map holds of them now.
    pub(super) fn open(self) -> bool {
        self != Forming::Done
    }
}

/// Where the node of `data_dir` is, at start-up. `bootstrapped`: it has a bootstrap;
/// `holds_shards`: its store holds replicas of data shards. A store that holds replicas and
/// records nothing was written before this record existed: its bootstrap shards were formed by
/// the rule that needs none, so it is done (and recorded so).
pub(super) fn at_start(data_dir: &Path, bootstrapped: bool, holds_shards: bool) -> std::io::Result<Forming> {
    if !bootstrapped || data_dir.join(FORMED_FILE).exists() {
        return Ok(Forming::Done);
    }
    if data_dir.join(FORMING_FILE).exists() {
        return Ok(Forming::Started);
    }
    if holds_shards {
        write_durably(&data_dir.join(FORMED_FILE))?;
        return Ok(Forming::Done);
    }
    Ok(Forming::NotStarted)
}

/// Records `to` ([`Forming::Started`] or [`Forming::Done`]) durably in `data_dir`.
pub(super) fn record(data_dir: &Path, to: Forming) -> std::io::Result<()> {
    match to {
        Forming::NotStarted => Ok(()),
        Forming::Started => write_durably(&data_dir.join(FORMING_FILE)),
        Forming::Done => {
            write_durably(&data_dir.join(FORMED_FILE))?;
            match std::fs::remove_file(data_dir.join(FORMING_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forming_is_recorded_and_read_back_and_an_older_store_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(at_start(d, false, false).unwrap(), Forming::Done, "a node that joined forms nothing");
        assert_eq!(at_start(d, true, false).unwrap(), Forming::NotStarted);
        record(d, Forming::Started).unwrap();
        assert_eq!(at_start(d, true, true).unwrap(), Forming::Started, "cut short: forming goes on");
        record(d, Forming::Done).unwrap();
        assert!(!d.join(FORMING_FILE).exists());
        assert_eq!(at_start(d, true, false).unwrap(), Forming::Done);
        let older = tempfile::tempdir().unwrap();
        assert_eq!(at_start(older.path(), true, true).unwrap(), Forming::Done);
        assert!(older.path().join(FORMED_FILE).exists(), "recorded, so that it holds however the store changes");
    }
}
