//! The client protocol: what clients (the CLI, [`crate::Client`]) ask of nodes over transport
//! requests (nodes speak it to each other too, forwarding a client's request). What only
//! nodes ask of each other is the peer protocol, [`crate::peer_wire`].
//!
//! Every message is `[u8 version][bincode body]`; a version this build does not know is refused
//! with a clear error (never guessed at). Requests name the shard and the epoch the client
//! routed by; a node whose view differs answers with where to go instead of serving.

use crate::placement::{Epoch, NodeId, ShardDescriptor, ShardId, ShardMap};
pub use crate::shard::UpdateOp;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version byte that starts every request and response of this protocol. 2: a put answers
/// no previous value. 3: a scan answers a [`Response::Page`] saying how far it read, and a
/// request for keys a shard no longer holds is answered [`Response::OutOfRange`] (a version 2
/// peer would take a scan's empty page for the end of the shard and skip what split off).
/// 4: the node-to-node meta operations moved to the peer protocol ([`crate::peer_wire`]).
/// 5: [`Request::Update`], read-modify-writes applied in the state machine (the Redis front
/// door's `INCR`, `APPEND`). 6: [`Request::InsertAll`] (the Redis front door's `MSETNX`).
/// 7: backups ([`AdminRequest::BackupStart`], [`AdminRequest::BackupRead`],
/// [`AdminRequest::BackupEnd`]) and unsafe recovery ([`AdminRequest::ReplicaStates`],
/// [`AdminRequest::ForceAlone`], [`AdminRequest::DropReplica`],
/// [`AdminRequest::RemoveDeadNodes`]). 8: unsafe recovery carries meta revisions (a
/// replica-states answer names its node's, the map change is written above the highest), and
/// `admin status` names the meta group's voters and learners. 9: merges
/// ([`AdminRequest::Merge`], a shard row's merge in progress). 10: [`Request::MapSince`]
/// may ask for a fresh map (`fresh`): a client's linearizable read of the map, in pages.
/// Versions stay below 0x80: a first byte with the high bit set is a peer message.
pub const PROTOCOL_VERSION: u8 = 10;

/// Largest key accepted (bytes): the shard's own limit, checked here first so that a key too
/// long is refused before it is routed (or made a split point). Keys travel in every routing
/// check and log entry.
pub const KEY_BYTES_MAX: usize = crate::shard::KEY_BYTES_MAX;
/// Largest value accepted (bytes): the shard's own limit, checked here first so that a value
/// too large is refused before it is routed. The same limit bounds the meta state, which the
/// meta group stores as one value.
pub const VALUE_BYTES_MAX: usize = crate::shard::VALUE_BYTES_MAX;
/// Most pairs a scan returns in one answer.
pub const SCAN_LIMIT_MAX: usize = 10_000;
/// Most key and value bytes in one scan answer (under the transport's 4 MiB frame); a longer
/// answer is cut (at least one pair kept) and the client asks again from where it stopped.
pub const SCAN_RESPONSE_BYTES_MAX: usize = 2 << 20;

/// How a read is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ReadConsistency {
    /// Linearizable, by ReadIndex (one quorum round trip; no clock assumption). The default.
    #[default]
    Linearizable,
    /// Linearizable by the leader's lease (no round trip while the lease holds; assumes
    /// bounded clock drift).
    Lease,
    /// From whichever replica answers, leader or not, without any check: may miss recent
    /// writes (a follower read). Spreads reads over replicas and works without a leader.
    Stale,
}

/// A request to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Read one key.
    Get {
        /// The shard the client routed to.
        shard: ShardId,
        /// The shard's epoch in the client's map.
        epoch: Epoch,
        /// The key.
        key: Vec<u8>,
        /// How to read.
        consistency: ReadConsistency,
    },
    /// Set a key.
    Put {
        /// The shard the client routed to.
        shard: ShardId,
        /// The shard's epoch in the client's map.
        epoch: Epoch,
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove a key.
    Delete {
        /// The shard the client routed to.
        shard: ShardId,
        /// The shard's epoch in the client's map.
        epoch: Epoch,
        /// The key.
        key: Vec<u8>,
    },
    /// Compare-and-swap.
    Cas {
        /// The shard the client routed to.
        shard: ShardId,
        /// The shard's epoch in the client's map.
        epoch: Epoch,
        /// The key.
        key: Vec<u8>,
        /// The value expected now (`None`: absent).
        expected: Option<Vec<u8>>,
        /// The value to set (`None`: delete).
        new: Option<Vec<u8>>,
    },
    /// Pairs of `[start, end)` within one shard, at most `limit`.
    Scan {
        /// The shard the client routed to.
        shard: ShardId,
        /// The shard's epoch in the client's map.
        epoch: Epoch,
        /// First key: at or after the shard's start (an earlier one is clamped to it), and
        /// inside the range the shard holds now, or the answer is [`Response::OutOfRange`].
        start: Vec<u8>,
        /// End of the scan (exclusive); `None` for the shard's end.
        end: Option<Vec<u8>>,
        /// Most pairs (at least 1).
        limit: u32,
        /// How to read.
        consistency: ReadConsistency,
    },
    /// The node's view of the cluster (shard map and node addresses). `fresh` asks for a
    /// linearizable read on the meta leader (forwarded if needed); otherwise the node's local
    /// copy, which may lag but needs no meta leader: enough to route by, since every shard
    /// checks the epoch a request was routed with.
    ClusterView {
        /// Read through the meta leader.
        fresh: bool,
    },
    /// An administrative operation.
    Admin(AdminRequest),
    /// Change a key's value by `op`, atomically where it is applied; answered
    /// [`Response::Written`] with the value before, or [`Response::Invalid`] if the value does
    /// not suit the operation (nothing changed).
    Update {
        /// The shard the client routed to.
        shard: ShardId,
        /// The shard's epoch in the client's map.
        epoch: Epoch,
        /// The key.
        key: Vec<u8>,
        /// What to do with its value.
        op: UpdateOp,
    },
    /// Set every key of `pairs`, all in the shard, if none of them exists; otherwise nothing.
    /// Answered [`Response::Written`] when written, [`Response::CasFailed`] (with the first
    /// existing key's value) when not; [`Response::Invalid`] with a text starting `CROSSSLOT`
    /// when the keys are not all in the shard.
    InsertAll {
        /// The shard the client routed to.
        shard: ShardId,
        /// The shard's epoch in the client's map.
        epoch: Epoch,
        /// Keys and values (at least one pair).
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// The node's local copy of the map, incrementally: without `from`, the shards that
    /// changed since revision `since` of the meta state (a client's copy), when the node's
    /// recent history reaches that far and they are few; otherwise, and with `from`, a page of
    /// at most `limit` shards starting at key `from` (the start when `None`). Answered
    /// [`Response::Map`]. Like `ClusterView { fresh: false }`, it needs no meta leader.
    MapSince {
        /// The revision of the copy the client holds (0: none).
        since: u64,
        /// Where a page starts: a page of the whole map is asked for.
        from: Option<Vec<u8>>,
        /// Shards per page at most (the node may send fewer).
        limit: u32,
        /// How far the client's copy has come (`client::map_progress`): a node whose revision
        /// is below `since` but whose map is further on (its revisions were numbered afresh)
        /// sends its map rather than nothing.
        progress: u64,
        /// Brings the node's copy up to date through the meta leader first (a linearizable
        /// read, as `ClusterView { fresh: true }`): the answer holds every change of the map
        /// acknowledged before the request. Asked with the first page only: the pages after
        /// it come from the same copy or a newer one.
        fresh: bool,
    },
}

/// Administrative operations (the `flotilla admin` commands).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Every node with its last report.
    Nodes,
    /// Every shard with its replicas, leader, applied indexes and size.
    Shards,
    /// Split the shard holding `key` at `key`.
    Split {
        /// First key of the new right-hand shard.
        key: Vec<u8>,
    },
    /// Move the replica of `shard` on `from` to `to` (a move plan the meta leader drives).
    Move {
        /// The shard.
        shard: ShardId,
        /// The node losing the replica.
        from: NodeId,
        /// The node gaining it.
        to: NodeId,
    },
    /// Hand the leadership of `shard` to `node`.
    TransferLeader {
        /// The shard.
        shard: ShardId,
        /// The voter to lead.
        node: NodeId,
    },
    /// Run one balancer round now; answers with what it started.
    Rebalance,
    /// Start (or stop) draining `node`.
    Drain {
        /// The node.
        node: NodeId,
        /// Draining or not.
        draining: bool,
    },
    /// A summary of the cluster's health.
    Status,
    /// Register a new node at `addr` so the running nodes dial it (the lower id dials): the
    /// first step of joining a node to a running cluster.
    AddNode {
        /// The new node's id.
        node: NodeId,
        /// Its QUIC address.
        addr: String,
    },
    /// A page of shards in key order, from the one holding `from` on, at most `limit` (at most
    /// [`SHARDS_PAGE_MAX`]), with a summary of the whole map: a large map does not fit one
    /// answer.
    ShardsPage {
        /// A key in the first shard of the page (empty: from the start).
        from: Vec<u8>,
        /// Most rows.
        limit: u32,
    },
    /// Copy `shard` for a backup (`flotilla admin backup`), on its leader: a linearizable
    /// read point, then the shard's snapshot files built at one point at or after it, kept on
    /// the leader for [`AdminRequest::BackupRead`] until [`AdminRequest::BackupEnd`] or until
    /// unused for a while. Answered [`AdminResponse::BackupStarted`], or redirected as a data
    /// request is.
    BackupStart {
        /// The shard the client routed to.
        shard: ShardId,
        /// Its epoch in the client's map.
        epoch: Epoch,
    },
    /// Bytes `offset..offset + len` (at most [`BACKUP_CHUNK_BYTES_MAX`]) of a shard copy's
    /// stream, from the node that built it. Answered [`AdminResponse::BackupChunk`].
    BackupRead {
        /// The shard.
        shard: ShardId,
        /// The copy ([`BackupShard::copy_id`]).
        copy_id: u64,
        /// Where to read from in the stream.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// The client is done with a shard copy: its files go.
    BackupEnd {
        /// The shard.
        shard: ShardId,
        /// The copy.
        copy_id: u64,
    },
    /// Unsafe recovery: the Raft state of this node's own replicas, from shard `from` on, at
    /// most `limit` (at most [`REPLICA_STATES_PAGE_MAX`]). Served by the node asked, from its
    /// own replicas, without the meta leader (which may be lost).
    ReplicaStates {
        /// The first shard of the page.
        from: ShardId,
        /// Most replicas.
        limit: u32,
    },
    /// Unsafe recovery: make this node's replica of `shard` the group's only voter. Served by
    /// the node asked. Loses whatever the group's other replicas had and this one lacks.
    /// Refused, changing nothing, unless `dead` hold a majority of either half of the
    /// replica's configuration and its last log id is still `last_term`.`last_index` (a guard
    /// against a typo in the dead nodes, or a decision made on a state that moved on).
    ForceAlone {
        /// The shard (0: the meta group).
        shard: ShardId,
        /// The nodes named dead.
        dead: Vec<NodeId>,
        /// The term of the replica's last log entry when the tool decided.
        last_term: u64,
        /// The index of the replica's last log entry when the tool decided.
        last_index: u64,
        /// For the meta group: the highest meta revision a live node reported. The forced
        /// replica's node writes its first meta change above it (see `RemoveDeadNodes`),
        /// whichever change that is. 0 for a data group.
        revision_floor: u64,
    },
    /// Unsafe recovery: delete this node's replica of `shard` (a survivor of a forced group
    /// that was not kept). Served by the node asked. Refused, changing nothing, unless the
    /// replica still holds the configuration from before the loss (`dead` hold a majority of
    /// either half of its committed configuration): a drop arriving late must not delete a
    /// replica the group gave this node since.
    DropReplica {
        /// The shard.
        shard: ShardId,
        /// The nodes named dead.
        dead: Vec<NodeId>,
    },
    /// Unsafe recovery: remove `dead` for good and give every shard that lost a replica
    /// voters on live nodes; each shard of `kept` keeps only its replica on that node.
    RemoveDeadNodes {
        /// The nodes lost for good.
        dead: Vec<NodeId>,
        /// Forced shards and the node each was forced onto.
        kept: Vec<(ShardId, NodeId)>,
        /// The highest meta revision any live node reported
        /// ([`AdminResponse::ReplicaStates`]'s `view_revision`): the change is written at a
        /// revision above it. A forced meta group may have lost changes that nodes following
        /// the dead meta leader had already seen; the revisions of its history from then on
        /// must not be taken for theirs.
        revision_floor: u64,
    },
    /// Merge `shard` with its right-hand neighbour (a plan the shards' leaders carry out):
    /// answers once the plan is recorded.
    Merge {
        /// The left shard.
        shard: ShardId,
    },
}

/// Most bytes one [`AdminRequest::BackupRead`] answers: under the transport's 4 MiB frame,
/// and the memory a backup's transfer costs each side.
pub const BACKUP_CHUNK_BYTES_MAX: u64 = 1 << 20;

/// A shard copy made for a backup ([`AdminRequest::BackupStart`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupShard {
    /// Names the copy in the reads that follow.
    pub copy_id: u64,
    /// The Raft index of the last entry the copy holds (at or after the read point).
    pub index: u64,
    /// That entry's term.
    pub term: u64,
    /// Length of the copy's stream: the snapshot stream of `flotilla_shard::kv_snapshot`
    /// (header, then the SST files back to back).
    pub size_bytes: u64,
    /// Key-value pairs in the copy.
    pub keys: u64,
}

/// Most replicas of one [`AdminRequest::ReplicaStates`] answer.
pub const REPLICA_STATES_PAGE_MAX: u32 = 2_000;

/// One replica's Raft state, as its node reports it for unsafe recovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The shard (0: the meta group).
    pub shard: ShardId,
    /// The node holding the replica.
    pub node: NodeId,
    /// Voters of the newest configuration in the replica's log (the incoming half if joint).
    pub voters: Vec<NodeId>,
    /// The outgoing voters, if that configuration is joint.
    pub outgoing: Option<Vec<NodeId>>,
    /// Its learners.
    pub learners: Vec<NodeId>,
    /// Term of the last log entry.
    pub last_term: u64,
    /// Index of the last log entry.
    pub last_index: u64,
    /// Commit index the replica knows.
    pub committed: u64,
    /// Applied index.
    pub applied: u64,
    /// The leader it knows, if any.
    pub leader: Option<NodeId>,
}

/// The cluster as a node sees it: enough for a client to route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The shard map.
    pub map: ShardMap,
    /// Client address of each node.
    pub nodes: BTreeMap<NodeId, String>,
}

/// One row of `admin shards`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRow {
    /// The shard as the map has it.
    pub descriptor: ShardDescriptor,
    /// The node that reports leading it.
    pub leader: Option<NodeId>,
    /// Applied index reported by each replica.
    pub applied: BTreeMap<NodeId, u64>,
    /// Largest reported size in bytes (0 when unknown).
    pub bytes: u64,
    /// A move in progress, described.
    pub moving: Option<String>,
    /// A merge in progress that the shard is part of, described.
    pub merging: Option<String>,
}

/// One row of `admin nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRow {
    /// The node.
    pub node: NodeId,
    /// Its client address.
    pub addr: String,
    /// Replicas it holds in the map.
    pub replicas: usize,
    /// Shards it reports leading.
    pub leading: usize,
    /// Requests per second it served, as last reported.
    pub requests_per_s: u64,
    /// Being drained.
    pub draining: bool,
    /// Milliseconds since the node's last report reached the meta leader that answers (None
    /// when it never reported to it).
    pub report_age_ms: Option<u64>,
}

/// Answers of admin operations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// `Nodes`.
    Nodes(Vec<NodeRow>),
    /// `Shards`.
    Shards(Vec<ShardRow>),
    /// Shards a command changed or created.
    Changed(Vec<ShardDescriptor>),
    /// Done, with a human summary.
    Done(String),
    /// `Status`.
    Status(StatusReport),
    /// `ShardsPage`.
    ShardsPage {
        /// The page's shards, in key order.
        rows: Vec<ShardRow>,
        /// The first key of the next page (`None`: this page ends the map).
        next: Option<Vec<u8>>,
        /// Figures of the whole map.
        summary: ShardsSummary,
    },
    /// `BackupStart`.
    BackupStarted(BackupShard),
    /// `BackupRead`: the bytes.
    BackupChunk(Bytes),
    /// `ReplicaStates`.
    ReplicaStates {
        /// The page's replicas, by shard.
        replicas: Vec<ReplicaState>,
        /// The first shard of the next page (`None`: the last page).
        next: Option<ShardId>,
        /// The revision of the answering node's copy of the meta state.
        view_revision: u64,
        /// The nodes that copy registers and their addresses: unsafe recovery asks each of
        /// them too (a node registered in changes the forced meta group lost is known only
        /// to nodes that saw them).
        nodes: Vec<(NodeId, String)>,
    },
    /// `ForceAlone`: the index of the forced configuration's entry (the replica kept
    /// everything before it).
    Forced {
        /// The shard.
        shard: ShardId,
        /// The forced configuration's index.
        index: u64,
    },
}

/// Most rows of one [`AdminRequest::ShardsPage`].
pub const SHARDS_PAGE_MAX: u32 = 1_000;

/// Figures of the whole shard map (with a page of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardsSummary {
    /// Shards in the map.
    pub shards: u64,
    /// Shards with a reported leader.
    pub with_leader: u64,
    /// Shards being moved.
    pub moving: u64,
    /// Replicas in all (voters and learners).
    pub replicas: u64,
    /// Sum of the shards' reported sizes (bytes).
    pub bytes: u64,
}

/// `admin status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Nodes registered.
    pub nodes: usize,
    /// Nodes whose report is recent.
    pub nodes_live: usize,
    /// Shards in the map.
    pub shards: usize,
    /// Shards with a reported leader.
    pub shards_with_leader: usize,
    /// Moves in progress.
    pub moves: usize,
    /// The meta group's leader.
    pub meta_leader: Option<NodeId>,
    /// The meta group's voters in its committed configuration, as the answering node's replica
    /// knows it (empty if that node holds none).
    pub meta_voters: Vec<NodeId>,
    /// The meta group's learners, the same way (replicas being caught up before they vote).
    pub meta_learners: Vec<NodeId>,
}

/// A response from a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A read's value.
    Value(Option<Vec<u8>>),
    /// A write was applied; the value before it.
    Written {
        /// Previous value (of a delete or compare-and-swap; a put does not read it: `None`).
        previous: Option<Vec<u8>>,
    },
    /// A compare-and-swap did not match; nothing changed.
    CasFailed {
        /// The current value.
        current: Option<Vec<u8>>,
    },
    /// Scan results, in key order, and how far they cover.
    Page {
        /// The pairs, in key order.
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        /// Where the scan goes on.
        end: ScanEnd,
    },
    /// The cluster view.
    View(ClusterView),
    /// An admin answer.
    Admin(AdminResponse),
    /// This node does not lead the shard: go to `leader` (at `addr`) if known.
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
        /// Its client address.
        addr: Option<String>,
    },
    /// The client's epoch differs from the node's: here is the shard as the node knows it.
    StaleEpoch {
        /// The shard now.
        descriptor: ShardDescriptor,
    },
    /// The key is in another shard now.
    WrongShard {
        /// The shard holding the key.
        owner: ShardDescriptor,
    },
    /// This node has no such shard (not in its map, or no replica here).
    UnknownShard,
    /// The shard's replica here no longer holds the key (a scan's start): the shard split,
    /// and the node's map has not caught up yet. Nothing was read or changed; route again by
    /// a newer map.
    OutOfRange {
        /// The shard that was asked.
        shard: ShardId,
    },
    /// The request may or may not have been applied (a timeout inside the node).
    Unknown(String),
    /// Refused for a reason retrying elsewhere may fix (no leader yet, node starting).
    Unavailable(String),
    /// Refused: the request is wrong and retrying will not help.
    Invalid(String),
    /// Refused: the client's certificate does not allow it ([`crate::authz`]); says which
    /// role may not do what. Nothing was read or changed. (Added within version 4, last, so
    /// every earlier answer keeps its encoding. Only a certificate with a role draws it; a
    /// client built before roles cannot decode it and reports an error after its retries, an
    /// unknown outcome for a write, although nothing changed.)
    Denied(String),
    /// The node's copy of the map, or the part of it asked for ([`Request::MapSince`]).
    Map(MapAnswer),
}

/// What a node sends of its copy of the map ([`Request::MapSince`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapAnswer {
    /// The shards that changed from revision `base` to `revision`: each as it is now
    /// (`changed`), or gone (`removed`). Applied to the map at `base`, they make the map at
    /// `revision`; a shard may be named that did not change after all. A `revision` below
    /// `base` (and no shard): the node's copy is older than the client's.
    Changes {
        /// The revision the changes start from (the one asked for).
        base: u64,
        /// The revision they bring the map to.
        revision: u64,
        /// Shards as they are at `revision`.
        changed: Vec<ShardDescriptor>,
        /// Shards no longer in the map (merged away).
        removed: Vec<ShardId>,
        /// How far the node's map at `revision` has come (`client::map_progress`): the client's
        /// copy with the changes applied must come exactly as far, or it is not the node's map
        /// (the client's revision named another history) and the client reads it whole.
        progress: u64,
        /// Client address of each node.
        nodes: BTreeMap<NodeId, String>,
    },
    /// Shards of the map at `revision` in key order, from the one starting at the key asked
    /// for; `next`: the start key of the shard after the last one sent (`None`: the last shard
    /// was sent).
    Page {
        /// The revision of the map the page is of.
        revision: u64,
        /// The shards.
        shards: Vec<ShardDescriptor>,
        /// Where the next page starts.
        next: Option<Vec<u8>>,
        /// Client address of each node.
        nodes: BTreeMap<NodeId, String>,
    },
}

/// How far a [`Response::Page`] covers: where the client continues. Never the client's own
/// idea of the shard's end, which a split may have made wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScanEnd {
    /// The limit (or the answer's byte budget) cut the page with keys left: continue just
    /// after its last key (a page that says so has at least one pair).
    More,
    /// Every key from the request's start up to this key (exclusive) is in the page: the
    /// request's end or the end of the shard's range, whichever comes first. `None`: to the
    /// end of the key space.
    Covered(Option<Vec<u8>>),
}

/// A message that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Empty input.
    #[error("empty message")]
    Empty,
    /// A protocol version this build does not speak.
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// The body is malformed.
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    encode_versioned(PROTOCOL_VERSION, value)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    decode_versioned(PROTOCOL_VERSION, bytes)
}

/// `[version][bincode body]`.
pub(crate) fn encode_versioned<T: Serialize>(version: u8, value: &T) -> Bytes {
    let mut out = vec![version];
    // Serializing our own plain data types into a Vec cannot fail.
    match bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard()) {
        Ok(_) => Bytes::from(out),
        Err(e) => unreachable!("bincode cannot fail on plain data: {e}"),
    }
}

/// Decodes `[version][bincode body]`, refusing another version and trailing bytes.
pub(crate) fn decode_versioned<T: for<'de> Deserialize<'de>>(expected: u8, bytes: &[u8]) -> Result<T, WireError> {
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != expected {
        return Err(WireError::Version(version));
    }
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(WireError::Malformed(format!("{} trailing bytes", body.len() - used)));
    }
    Ok(value)
}

impl Request {
    /// Encodes with the version byte.
    pub fn encode(&self) -> Bytes {
        encode(self)
    }
    /// Decodes; a bad or unknown message is an error.
    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        decode(bytes)
    }
}

impl Response {
    /// Encodes with the version byte.
    pub fn encode(&self) -> Bytes {
        encode(self)
    }
    /// Decodes; a bad or unknown message is an error.
    pub fn decode(bytes: &[u8]) -> Result<Response, WireError> {
        decode(bytes)
    }
}

/// Checks a user key: non-empty, at most [`KEY_BYTES_MAX`], and not starting with `0x00`
/// (reserved for the meta group's keys).
pub fn check_user_key(key: &[u8]) -> Result<(), String> {
    if key.is_empty() {
        return Err("keys must not be empty".into());
    }
    if key[0] == 0 {
        return Err("keys starting with the byte 0x00 are reserved for the cluster's own metadata".into());
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(format!("key of {} bytes exceeds the limit of {KEY_BYTES_MAX} bytes", key.len()));
    }
    Ok(())
}

/// Checks a value's size.
pub fn check_value(value: &[u8]) -> Result<(), String> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(format!("value of {} bytes exceeds the limit of {VALUE_BYTES_MAX} bytes", value.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let r = Request::Put {
            shard: ShardId(3),
            epoch: Epoch { conf_version: 1, version: 2 },
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        };
        let bytes = r.encode();
        assert_eq!(bytes[0], PROTOCOL_VERSION);
        assert_eq!(Request::decode(&bytes).unwrap(), r);
        let mut wrong = bytes.to_vec();
        wrong[0] = PROTOCOL_VERSION + 1;
        assert!(matches!(Request::decode(&wrong), Err(WireError::Version(v)) if v == PROTOCOL_VERSION + 1));
        assert!(matches!(Request::decode(&[]), Err(WireError::Empty)));
        assert!(matches!(Request::decode(&[PROTOCOL_VERSION, 200, 1]), Err(WireError::Malformed(_))));
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(Request::decode(&long).is_err());
    }

    #[test]
    fn user_keys() {
        assert!(check_user_key(b"a").is_ok());
        assert!(check_user_key(b"").is_err());
        assert!(check_user_key(b"\x00meta").is_err());
        assert!(check_user_key(&vec![b'a'; KEY_BYTES_MAX + 1]).is_err());
    }
}
