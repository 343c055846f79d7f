//! A whole meta state across the peer protocol, in parts when it is large.
//!
//! A node new to the cluster, or one whose copy the answering node's log of changes no longer
//! reaches, is sent the whole meta state; so is the node that forwarded a meta operation. At
//! 100,000 shards that state (the map and every node's report) is tens of megabytes, more than
//! one transport frame. The sender encodes it once, holds the encoding for a while, and sends
//! its first part with its length ([`WholeState::Parts`]); the asker fetches the rest from the
//! same node, part by part ([`PeerRequest::MetaPart`]), each within a frame. A sender that no
//! longer holds that revision's encoding says so, and the asker asks for the state again.

use super::Node;
use crate::meta::{self};
use crate::peer_wire::{MetaUpdate, PeerRequest, PeerResponse, WholeState};
use crate::placement::MetaState;
use crate::raft::NodeId;
use bytes::Bytes;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of a whole state sent in one answer, at most (default of
/// `NodeConfig::meta_part_bytes`): a quarter of a transport frame, so that a part and its
/// envelope always fit.
pub const META_PART_BYTES_DEFAULT: usize = 1 << 20;
/// The largest whole state an asker assembles: past this a sender is taken to be wrong (a
/// state of 100,000 shards with every report is about 30 MiB).
pub const WHOLE_STATE_BYTES_MAX: u64 = 1 << 30;
/// Encodings a node holds for askers to fetch in parts, at most (two askers at different
/// revisions do not evict each other's).
const HELD_MAX: usize = 2;
/// How long a node holds an encoding after it last served a part of it (an asker fetches the
/// parts one after another at once), unless it served the last part before.
const HELD_FOR: Duration = Duration::from_secs(10);

/// The encodings a node sent in parts, newest last.
#[derive(Default)]
pub(super) struct HeldStates(Mutex<VecDeque<Held>>);

struct Held {
    revision: u64,
    bytes: Arc<Vec<u8>>,
    used: Instant,
}

impl HeldStates {
    /// Holds `bytes`, the encoding of the state at `revision`, in place of the oldest held (and
    /// of any not used for [`HELD_FOR`]).
    fn hold(&self, revision: u64, bytes: Arc<Vec<u8>>) {
        let Ok(mut held) = self.0.lock() else { return };
        held.retain(|h| h.revision != revision && h.used.elapsed() < HELD_FOR);
        while held.len() >= HELD_MAX {
            held.pop_front();
        }
        held.push_back(Held { revision, bytes, used: Instant::now() });
    }

    /// The part of at most `len` bytes from `offset` of the encoding held for `revision`:
    /// `None` if none is held, an error if `offset` is past its end. Serving its last part
    /// lets it go (an encoding of 100,000 shards is tens of megabytes).
    fn part(&self, revision: u64, offset: u64, len: usize) -> Option<Result<Vec<u8>, String>> {
        let mut held = self.0.lock().ok()?;
        held.retain(|h| h.used.elapsed() < HELD_FOR);
        let i = held.iter().position(|h| h.revision == revision)?;
        let bytes = held[i].bytes.clone();
        let Some(start) = usize::try_from(offset).ok().filter(|o| *o < bytes.len()) else {
            return Some(Err(format!("offset {offset} is past the state's {} bytes", bytes.len())));
        };
        let end = start.saturating_add(len.max(1)).min(bytes.len());
        if end == bytes.len() {
            held.remove(i);
        } else {
            held[i].used = Instant::now();
        }
        Some(Ok(bytes[start..end].to_vec()))
    }
}

impl Node {
    /// The state at `revision` as an answer carries it: whole, or its first part (the rest
    /// held for the asker to fetch).
    pub(super) fn whole_state(&self, revision: u64, state: &MetaState) -> Result<WholeState, String> {
        let bytes = meta::encode_view(revision, state)?;
        Ok(self.in_parts(revision, bytes))
    }

    fn in_parts(&self, revision: u64, bytes: Vec<u8>) -> WholeState {
        let part = self.inner.config.meta_part_bytes.max(1);
        if bytes.len() <= part {
            return WholeState::Inline(bytes);
        }
        let first = bytes[..part].to_vec();
        let total = bytes.len() as u64;
        self.inner.held_states.hold(revision, Arc::new(bytes));
        WholeState::Parts { revision, total, first }
    }

    /// The encoding `whole` carries or names, the rest fetched from `from`, the node that
    /// sent it.
    pub(super) async fn assemble_from(&self, from: NodeId, whole: WholeState) -> Result<Vec<u8>, String> {
        let parts = matches!(whole, WholeState::Parts { .. });
        let bytes = assemble(whole, |req| self.ask_part(from, req)).await?;
        if parts {
            self.inner.stats.meta_whole_in_parts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(bytes)
    }

    /// `update`, its whole state assembled from `from` (see [`Node::assemble_from`]).
    pub(super) async fn assemble_update_from(&self, from: NodeId, update: MetaUpdate) -> Result<MetaUpdate, String> {
        match update {
            MetaUpdate::Whole(w) => Ok(MetaUpdate::Whole(WholeState::Inline(self.assemble_from(from, w).await?))),
            changes => Ok(changes),
        }
    }

    async fn ask_part(&self, to: NodeId, req: Bytes) -> Result<Bytes, String> {
        let timeout = Duration::from_millis(super::PEER_REQUEST_TIMEOUT_MS);
        self.inner.transport.request(to, req, timeout).await.map_err(|e| format!("node {to}: {e}"))
    }

    /// The answer to [`PeerRequest::MetaPart`].
    pub(super) fn meta_part(&self, revision: u64, offset: u64) -> PeerResponse {
        match self.inner.held_states.part(revision, offset, self.inner.config.meta_part_bytes) {
            Some(Ok(bytes)) => PeerResponse::MetaPart { bytes },
            Some(Err(e)) => PeerResponse::Refused(e),
            None => PeerResponse::Unavailable(format!(
                "node {} no longer holds the meta state at revision {revision}: ask for it again",
                self.inner.id
            )),
        }
    }
}

/// The encoding `whole` carries or names, the rest fetched through `ask` (which sends a
/// request to the node that sent `whole`, and returns its answer).
pub(super) async fn assemble<F, Fut>(whole: WholeState, mut ask: F) -> Result<Vec<u8>, String>
where
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = Result<Bytes, String>>,
{
    let (revision, total, first) = match whole {
        WholeState::Inline(bytes) => return Ok(bytes),
        WholeState::Parts { revision, total, first } => (revision, total, first),
    };
    if total > WHOLE_STATE_BYTES_MAX {
        return Err(format!("a meta state of {total} bytes is past the bound of {WHOLE_STATE_BYTES_MAX}"));
    }
    if first.is_empty() || first.len() as u64 > total {
        return Err(format!("a first part of {} bytes of a state of {total}", first.len()));
    }
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&first);
    while (out.len() as u64) < total {
        let req = PeerRequest::MetaPart { revision, offset: out.len() as u64 }.encode();
        match PeerResponse::decode(&ask(req).await?) {
            Ok(PeerResponse::MetaPart { bytes }) if !bytes.is_empty() && (out.len() + bytes.len()) as u64 <= total => {
                out.extend_from_slice(&bytes);
            }
            Ok(PeerResponse::MetaPart { bytes }) => {
                return Err(format!("a part of {} bytes at {} of a state of {total}", bytes.len(), out.len()))
            }
            Ok(PeerResponse::Unavailable(e) | PeerResponse::Refused(e)) => return Err(e),
            Ok(other) => return Err(format!("a part answered {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender's answers to part requests, from `held` as `Node::meta_part` makes them.
    fn sender(held: Arc<HeldStates>, part: usize) -> impl FnMut(Bytes) -> std::future::Ready<Result<Bytes, String>> {
        move |req: Bytes| {
            let answer = match PeerRequest::decode(&req) {
                Ok(PeerRequest::MetaPart { revision, offset }) => match held.part(revision, offset, part) {
                    Some(Ok(bytes)) => PeerResponse::MetaPart { bytes },
                    Some(Err(e)) => PeerResponse::Refused(e),
                    None => PeerResponse::Unavailable("gone".into()),
                },
                other => PeerResponse::Refused(format!("{other:?}")),
            };
            std::future::ready(Ok(answer.encode()))
        }
    }

    #[tokio::test]
    async fn a_state_in_parts_is_assembled_as_sent_and_a_state_no_longer_held_is_an_error() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let held = Arc::new(HeldStates::default());
        held.hold(7, Arc::new(bytes.clone()));
        let whole = WholeState::Parts { revision: 7, total: bytes.len() as u64, first: bytes[..999].to_vec() };
        assert_eq!(assemble(whole.clone(), sender(held.clone(), 1_000)).await.unwrap(), bytes);
        assert_eq!(assemble(WholeState::Inline(vec![1, 2]), sender(held.clone(), 1)).await.unwrap(), vec![1, 2]);
        // Its last part served, revision 7's encoding is let go: asked again, it is gone.
        assert!(held.part(7, 0, 10).is_none());
        let e = assemble(whole.clone(), sender(held.clone(), 1_000)).await.unwrap_err();
        assert!(e.contains("gone"), "{e}");
        // Two newer encodings held: the oldest is let go.
        held.hold(7, Arc::new(bytes.clone()));
        held.hold(8, Arc::new(vec![0; 10]));
        held.hold(9, Arc::new(vec![0; 10]));
        assert!(held.part(7, 0, 1).is_none() && held.part(8, 0, 1).is_some() && held.part(9, 0, 1).is_some());
        assert!(matches!(held.part(8, 10, 1), Some(Err(_))), "an offset past the end is refused");
    }

    #[tokio::test]
    async fn parts_of_the_wrong_length_and_states_past_the_bound_are_refused() {
        let held = Arc::new(HeldStates::default());
        held.hold(1, Arc::new(vec![5; 100]));
        // The sender says 50 bytes, but its parts make 100.
        let short = WholeState::Parts { revision: 1, total: 50, first: vec![5; 10] };
        assert!(assemble(short, sender(held.clone(), 60)).await.unwrap_err().contains("a part of"));
        let huge = WholeState::Parts { revision: 1, total: WHOLE_STATE_BYTES_MAX + 1, first: vec![5] };
        assert!(assemble(huge, sender(held.clone(), 60)).await.unwrap_err().contains("past the bound"));
        let empty = WholeState::Parts { revision: 1, total: 100, first: Vec::new() };
        assert!(assemble(empty, sender(held, 60)).await.is_err());
    }
}
