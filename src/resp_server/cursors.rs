//! `SCAN` cursors. Flotilla's scan goes on from a key, which does not fit Redis's 64-bit
//! cursor, so the listener keeps the key and hands out a number for it. The table is shared by
//! the listener's connections, because client libraries may send the next `SCAN` of one
//! iteration on another connection of their pool; it is bounded, forgetting the oldest cursors
//! first (a forgotten cursor is answered `ERR invalid cursor`). A cursor may be used again, as
//! in Redis.
//!
//! Each cursor belongs to the principal (user or certificate, with its grant) whose scan made
//! it: another principal's `SCAN` of it is answered `ERR invalid cursor`, so a cursor tells
//! nobody else where a scan stands. Numbers are not handed out in sequence (a keyed hash of a
//! counter), so one cursor tells nothing of the others.

use super::access::Principal;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

/// Cursors kept per listener (at most one key of 1000 bytes each).
pub const CURSORS_MAX: usize = 16_384;

#[derive(Debug, Default)]
pub struct Cursors {
    inner: Mutex<Table>,
    /// Random keys of the hash that makes cursor numbers.
    numbers: RandomState,
}

#[derive(Debug, Default)]
struct Table {
    cursors: HashMap<u64, Cursor>,
    /// Cursor numbers, oldest first.
    order: VecDeque<u64>,
    /// Cursors made so far.
    made: u64,
}

#[derive(Debug)]
struct Cursor {
    next: Vec<u8>,
    owner: Option<Principal>,
}

impl Cursors {
    /// A cursor of `owner` for a scan going on from `next`: never 0, which starts a scan.
    pub fn save(&self, owner: Option<&Principal>, next: Vec<u8>) -> u64 {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while t.cursors.len() >= CURSORS_MAX {
            let Some(oldest) = t.order.pop_front() else { break };
            t.cursors.remove(&oldest);
        }
        let cursor = loop {
            t.made = t.made.wrapping_add(1);
            let n = self.numbers.hash_one(t.made);
            if n != 0 && !t.cursors.contains_key(&n) {
                break n;
            }
        };
        t.cursors.insert(cursor, Cursor { next, owner: owner.cloned() });
        t.order.push_back(cursor);
        cursor
    }

    /// Where the scan of `cursor` goes on from, if the cursor is known and `owner`'s.
    pub fn get(&self, owner: Option<&Principal>, cursor: u64) -> Option<Vec<u8>> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.cursors.get(&cursor).filter(|c| c.owner.as_ref() == owner).map(|c| c.next.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Grant, Role};

    fn user(name: &str, grant: Option<Grant>) -> Principal {
        Principal { user: name.into(), grant }
    }

    #[test]
    fn a_cursor_is_its_owners_only() {
        let cursors = Cursors::default();
        let tenant = user("tenant", Some(Grant::with_prefix(Role::ReadWrite, b"t/".to_vec())));
        let app = user("app", Some(Grant::new(Role::ReadWrite)));
        let c = cursors.save(Some(&tenant), b"t/5".to_vec());
        assert_eq!(cursors.get(Some(&tenant), c), Some(b"t/5".to_vec()));
        // Again, as in Redis.
        assert_eq!(cursors.get(Some(&tenant), c), Some(b"t/5".to_vec()));
        assert_eq!(cursors.get(Some(&app), c), None);
        assert_eq!(cursors.get(Some(&Principal::default_user()), c), None);
        assert_eq!(cursors.get(None, c), None);
        // The same name with another grant (a certificate issued again) is another principal.
        let narrower = user("tenant", Some(Grant::with_prefix(Role::ReadOnly, b"t/".to_vec())));
        assert_eq!(cursors.get(Some(&narrower), c), None);
        assert_eq!(cursors.get(Some(&tenant), c.wrapping_add(1)), None);
    }

    #[test]
    fn numbers_are_not_in_sequence_and_the_oldest_are_forgotten() {
        let cursors = Cursors::default();
        let me = Principal::default_user();
        let numbers: Vec<u64> = (0..CURSORS_MAX + 10).map(|i| cursors.save(Some(&me), vec![b'k', i as u8])).collect();
        assert!(numbers.iter().all(|&n| n != 0));
        let close = numbers.windows(2).filter(|w| w[0].abs_diff(w[1]) < 1 << 20).count();
        assert!(close < 3, "{close} cursors close to the one before");
        for (i, &n) in numbers.iter().enumerate() {
            assert_eq!(cursors.get(Some(&me), n).is_some(), i >= 10, "cursor {i}");
        }
    }
}
