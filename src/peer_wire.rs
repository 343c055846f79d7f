//! The peer protocol: what only nodes ask of each other — the meta operations a node runs on
//! the meta leader (bootstrap, its periodic report, the splits and balancing it drives, a
//! linearizable read of the meta state). Clients speak the client protocol
//! ([`crate::wire`]); both travel on the transport's requests, told apart by their first byte:
//! a peer message's version has the high bit set ([`PEER_PROTOCOL_VERSION`]). A request of
//! this protocol from anything but a node's certificate is refused before it is decoded.

use crate::meta::records::MetaWrite;
use crate::placement::{MetaCommand, NodeId, NodeReport, ReportChange, ShardId, ShardLoad};
use crate::wire::{decode_versioned, encode_versioned, AdminResponse, WireError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version byte that starts every peer request and response (high bit set: see the module
/// documentation).
/// Version 2: a report carries its shards' loads beside it ([`MetaOp::Report`]'s `load`), and
/// `MetaOp::Bootstrap` the backup a restored cluster starts from (and the meta state its
/// `restored_from`).
/// Version 3: each shard load carries its epoch, and the report the node's total led load.
/// Version 4: the meta leader asks a node to hold a replica of the meta group
/// ([`PeerRequest::HoldMetaReplica`]).
/// Version 5: [`MetaOp::RemoveDeadNodes`], an unsafe recovery's map change written above a
/// given revision.
/// Version 6: merges (the meta state's merge plans, their commands).
/// Version 7: reports as changes from the previous one ([`MetaOp::ReportChange`]).
/// Version 8: the meta state's bootstrap record (first voters, nodes that formed theirs).
/// Version 9: a whole meta state larger than a part travels in parts ([`WholeState`],
/// [`PeerRequest::MetaPart`]).
/// Version 10: [`PeerRequest::MetaSince`] says whether it was forwarded: a node forwarding an
/// op to the meta leader asks for the changes since its view, not the whole state.
pub const PEER_PROTOCOL_VERSION: u8 = 0x80 | 10;

/// Whether `bytes` is a message of the peer protocol (rather than the client protocol).
pub fn is_peer_message(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|v| v & 0x80 != 0)
}

/// A node's request to another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Run a meta operation on the meta leader. `forwarded` stops a second hop: a node that
    /// is not the leader forwards a request once, never a forwarded one.
    Meta {
        /// The operation.
        op: MetaOp,
        /// Set when a node forwards it.
        forwarded: bool,
    },
    /// Run a meta operation on the meta leader, as [`PeerRequest::Meta`] does, and answer with
    /// what brings the asker's copy of the meta state from revision `since` to the state after
    /// it: the changes in between when the answering node holds them all, else the whole
    /// state ([`PeerResponse::MetaSince`]). How nodes refresh their copy every report interval
    /// without being sent the whole map each time.
    MetaSince {
        /// The operation.
        op: MetaOp,
        /// The revision of the asker's copy, if it holds one that changes can bring up to date.
        since: Option<u64>,
        /// Set when a node forwards an op to the node it takes for the meta leader: it is not
        /// forwarded again (as [`PeerRequest::Meta`]'s).
        forwarded: bool,
    },
    /// From the meta leader, once the meta group's committed configuration lists the asked
    /// node as a learner: hold a replica of the meta group (created empty if there is none,
    /// to be caught up by the leader), and tell how far it has applied.
    HoldMetaReplica,
    /// The bytes from `offset` of the whole meta state at `revision` that this node sent in
    /// parts ([`WholeState::Parts`]): answered [`PeerResponse::MetaPart`], or `Unavailable`
    /// once it no longer holds that encoding (the asker asks for the state again).
    MetaPart {
        /// The revision of the state.
        revision: u64,
        /// Where the part starts.
        offset: u64,
    },
}

/// A whole meta state, as [`crate::meta::encode_view`] makes it (reports included): in the
/// answer itself when it fits a part, else its first part and its length, the rest to be
/// asked for ([`PeerRequest::MetaPart`]). At 100,000 shards a state is tens of megabytes,
/// more than a transport frame holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WholeState {
    /// The encoding.
    Inline(Vec<u8>),
    /// The encoding in parts.
    Parts {
        /// The revision of the state (what the parts are asked for by).
        revision: u64,
        /// Its length in bytes.
        total: u64,
        /// Its first bytes.
        first: Vec<u8>,
    },
}

/// How an asker's copy of the meta state reaches a revision ([`PeerResponse::MetaSince`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaUpdate {
    /// The whole state.
    Whole(WholeState),
    /// The changes after the asker's revision, oldest first, each one revision (see
    /// [`crate::meta::records::StoredMeta::apply`]); none when nothing changed.
    Changes(Vec<Vec<MetaWrite>>),
}

/// The answer to a [`PeerRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    /// The meta state after the operation and its revision (see [`crate::meta::encode_view`])
    /// and what the operation reports.
    Meta {
        /// The meta state.
        state: WholeState,
        /// The operation's answer.
        answer: AdminResponse,
    },
    /// The operation was refused (invalid against the meta state, or not from a node).
    Refused(String),
    /// The meta leader cannot be reached or cannot serve now: try again.
    Unavailable(String),
    /// The answer to [`PeerRequest::HoldMetaReplica`]: the node's replica of the meta group
    /// has applied up to this index.
    MetaReplica {
        /// Its applied index.
        applied: u64,
    },
    /// The answer to [`PeerRequest::MetaPart`]: the bytes from the asked offset (at most a
    /// part; fewer only at the end).
    MetaPart {
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The answer to [`PeerRequest::MetaSince`].
    MetaSince {
        /// The revision of the state after the operation.
        revision: u64,
        /// What brings the asker's copy there.
        update: MetaUpdate,
        /// The meta leader as the answering node knows it (itself, when it ran the operation):
        /// where the asker's next request goes.
        leader: Option<NodeId>,
        /// The operation's answer.
        answer: AdminResponse,
    },
}

/// A meta operation, executed on the meta leader as one read-modify-write of the meta state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOp {
    /// Apply these commands in order, all or nothing.
    Commands(Vec<MetaCommand>),
    /// Create the cluster if the map is empty: register `nodes`, bootstrap one shard on
    /// `replicas`, split it at `split_keys` (ascending). A no-op on a bootstrapped cluster.
    Bootstrap {
        /// Every initial node and its client address.
        nodes: Vec<(NodeId, String)>,
        /// The voters of every initial shard.
        replicas: Vec<NodeId>,
        /// Split points, ascending.
        split_keys: Vec<Vec<u8>>,
        /// The backup the cluster is restored from (the bootstrapper's restore record), kept
        /// as `MetaState::restored_from`; `None` for a new, empty cluster.
        backup_id: Option<String>,
    },
    /// A node's periodic report; registers it (or updates its address) first if needed.
    Report {
        /// The node.
        node: NodeId,
        /// Its client address.
        addr: String,
        /// Its report.
        report: NodeReport,
        /// The report's [`NodeReport::shard_load`], which the report's own serialized form
        /// leaves out (see there): build with [`MetaOp::report`], read with
        /// [`MetaOp::full_report`].
        load: BTreeMap<ShardId, ShardLoad>,
        /// The report's [`NodeReport::led_requests_per_s`], left out of its serialized form
        /// too.
        led_requests_per_s: u64,
    },
    /// A node's periodic report as the change from its previous one, or (without `base`) from
    /// an empty report; a change too large for one message goes in several, in order. The
    /// meta leader holds each node's report as of the last change it took, numbered: it takes
    /// a change only onto the report numbered `base` and numbers the result `seq`; at the
    /// `last` part it runs the report as the whole [`MetaOp::Report`] (an earlier part is
    /// only held: a report cut short would say the node no longer holds the shards of the
    /// parts to come). Any other base is refused, and the node sends its whole report next
    /// (so does it after any failure: a change is never applied twice).
    ReportChange {
        /// The node.
        node: NodeId,
        /// Its client address.
        addr: String,
        /// The number of the report the change applies to; `None`: an empty one.
        base: Option<u64>,
        /// The number of the report it makes.
        seq: u64,
        /// The change.
        change: ReportChange,
        /// Whether this is the change's last part.
        last: bool,
    },
    /// Split the shard holding `key` at `key`.
    SplitAt {
        /// The split key.
        key: Vec<u8>,
    },
    /// Run a balancer round and start what it proposes.
    Rebalance {
        /// The proposer's clock, stamped into started moves.
        now_ms: u64,
    },
    /// Read the state (linearizably) without changing it.
    Read,
    /// Unsafe recovery, right after forcing the meta group: no change to the state, only its
    /// revision raised above `floor` (see [`MetaOp::RemoveDeadNodes`]), written to the meta
    /// group's log at once.
    RaiseRevision {
        /// The highest revision a live node's copy had.
        floor: u64,
    },
    /// Unsafe recovery's map change ([`MetaCommand::RemoveDeadNodes`]), written at a revision
    /// above `revision_floor`: after the meta group was forced onto a survivor that lacked
    /// changes other nodes had seen, the forced history's revisions start above theirs, so a
    /// node's copy is never taken for a state of the new history, nor followed change by
    /// change from it.
    RemoveDeadNodes {
        /// The nodes lost for good.
        dead: Vec<NodeId>,
        /// Forced shards and the node each was forced onto.
        kept: Vec<(ShardId, NodeId)>,
        /// The highest revision a live node's copy had.
        revision_floor: u64,
    },
}

impl MetaOp {
    /// The revision the change this op makes must be written above (0: the next one).
    pub fn revision_floor(&self) -> u64 {
        match self {
            MetaOp::RemoveDeadNodes { revision_floor, .. } => *revision_floor,
            MetaOp::RaiseRevision { floor } => *floor,
            _ => 0,
        }
    }

    /// The node whose report this op is (whole or as a change); `None` for other ops.
    pub fn reporter(&self) -> Option<NodeId> {
        match self {
            MetaOp::Report { node, .. } | MetaOp::ReportChange { node, .. } => Some(*node),
            _ => None,
        }
    }

    /// A node's report, its shard loads moved beside it so that they travel.
    pub fn report(node: NodeId, addr: String, mut report: NodeReport) -> MetaOp {
        let load = std::mem::take(&mut report.shard_load);
        let led_requests_per_s = std::mem::take(&mut report.led_requests_per_s);
        MetaOp::Report { node, addr, report, load, led_requests_per_s }
    }

    /// The report of a [`MetaOp::Report`], its shard loads and total put back; `None` for other ops.
    pub fn full_report(&self) -> Option<NodeReport> {
        let MetaOp::Report { report, load, led_requests_per_s, .. } = self else { return None };
        Some(NodeReport { shard_load: load.clone(), led_requests_per_s: *led_requests_per_s, ..report.clone() })
    }
}

impl PeerRequest {
    /// Encodes with the version byte.
    pub fn encode(&self) -> Bytes {
        encode_versioned(PEER_PROTOCOL_VERSION, self)
    }
    /// Decodes; a bad or unknown message is an error.
    pub fn decode(bytes: &[u8]) -> Result<PeerRequest, WireError> {
        decode_versioned(PEER_PROTOCOL_VERSION, bytes)
    }
}

impl PeerResponse {
    /// Encodes with the version byte.
    pub fn encode(&self) -> Bytes {
        encode_versioned(PEER_PROTOCOL_VERSION, self)
    }
    /// Decodes; a bad or unknown message is an error.
    pub fn decode(bytes: &[u8]) -> Result<PeerResponse, WireError> {
        decode_versioned(PEER_PROTOCOL_VERSION, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Request, PROTOCOL_VERSION};

    #[test]
    fn peer_and_client_messages_are_told_apart_by_their_first_byte() {
        let peer = PeerRequest::Meta { op: MetaOp::Read, forwarded: true }.encode();
        let client = Request::Admin(crate::wire::AdminRequest::Nodes).encode();
        assert!(is_peer_message(&peer) && !is_peer_message(&client));
        const { assert!(PROTOCOL_VERSION < 0x80) };
        assert_eq!(PeerRequest::decode(&peer).unwrap(), PeerRequest::Meta { op: MetaOp::Read, forwarded: true });
        // Neither protocol decodes the other's messages.
        assert!(matches!(PeerRequest::decode(&client), Err(WireError::Version(_))));
        assert!(matches!(Request::decode(&peer), Err(WireError::Version(_))));
        assert!(!is_peer_message(&[]));
    }

    #[test]
    fn a_report_carries_its_shard_loads() {
        let mut report = NodeReport { leading: vec![ShardId(3)], led_requests_per_s: 5_630, ..NodeReport::default() };
        let epoch = crate::placement::Epoch { conf_version: 2, version: 3 };
        let load = ShardLoad { requests_per_s: 5_000, split_key: Some(b"m".to_vec()), epoch };
        report.shard_load.insert(ShardId(3), load);
        let op = MetaOp::report(NodeId(1), "a".into(), report.clone());
        let sent = PeerRequest::Meta { op, forwarded: false }.encode();
        let Ok(PeerRequest::Meta { op, .. }) = PeerRequest::decode(&sent) else { panic!("decodes") };
        assert_eq!(op.full_report(), Some(report));
        assert_eq!(MetaOp::Read.full_report(), None);
    }
}
