//! `SCAN` cursors. Flotilla's scan goes on from a key, which does not fit Redis's 64-bit
//! cursor, so the listener keeps the key and hands out a number for it. The table is shared by
//! the listener's connections, because client libraries may send the next `SCAN` of one
//! iteration on another connection of their pool; it is bounded, forgetting the oldest cursors
//! first (a forgotten cursor is answered `ERR invalid cursor`). A cursor may be used again, as
//! in Redis.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Cursors kept per listener (at most one key of 1000 bytes each).
pub const CURSORS_MAX: usize = 16_384;

#[derive(Debug, Default)]
pub struct Cursors {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    keys: BTreeMap<u64, Vec<u8>>,
    last: u64,
}

impl Cursors {
    /// A cursor for a scan going on from `next`: never 0, which starts a scan.
    pub fn save(&self, next: Vec<u8>) -> u64 {
        let Ok(mut t) = self.inner.lock() else { return 0 };
        while t.keys.len() >= CURSORS_MAX {
            t.keys.pop_first();
        }
        t.last = t.last.wrapping_add(1).max(1);
        let cursor = t.last;
        t.keys.insert(cursor, next);
        cursor
    }

    /// Where the scan of `cursor` goes on from, if the cursor is known.
    pub fn get(&self, cursor: u64) -> Option<Vec<u8>> {
        self.inner.lock().ok()?.keys.get(&cursor).cloned()
    }
}
