//! Implementing the network: carrying [`Message`]s between the members of a group.
//!
//! # Messages, not calls
//!
//! Raft peers talk by one-way [`Message`]s. A reply is just another message going the other
//! way; nothing waits for it. Raft tolerates messages that are lost, duplicated, delayed or
//! reordered: every message carries the sender's term, stale ones are recognized and ignored,
//! and whatever matters is sent again (heartbeats every
//! [`heartbeat_interval_ms`](crate::Config::heartbeat_interval_ms), replication that made no
//! progress for two heartbeat intervals is restarted, unacknowledged snapshot chunks are
//! resent after [`snapshot_resend_ms`](crate::Config::snapshot_resend_ms)). The network
//! therefore owes no delivery guarantee, and should not try to give one at the cost of
//! blocking.
//!
//! # Sending: the `Network` trait
//!
//! [`Network::send`] queues one message for `msg.to` and returns at once:
//!
//! - **Fire-and-forget.** There is no result to report; if the peer is unknown or
//!   unreachable, drop the message.
//! - **Never block.** `send` is called by the group's core task in the middle of executing
//!   the engine's actions. Blocking there (on a full socket, a lock held across I/O, a bounded
//!   channel) stalls the whole group, its timers included, and can cost it its leadership.
//! - **Batch.** Queue messages per peer and let one writer per peer connection drain the
//!   queue, writing everything that accumulated in one frame or one system call. Under load a
//!   leader emits many small messages per peer (appends, heartbeats, commit notices), and
//!   sending them one by one costs more than the messages themselves.
//! - **Drop under pressure, oldest first.** Bound each queue. When it is full, drop the
//!   oldest message rather than refusing the newest: newer messages carry newer information
//!   (a later commit index, a later heartbeat round), and whatever is dropped is sent again.
//!
//! Large messages share the link with small urgent ones: an append carries up to
//! [`append_bytes_max`](crate::Config::append_bytes_max) of entries (always at least one entry,
//! however large) and a snapshot chunk up to
//! [`snapshot_chunk_bytes`](crate::Config::snapshot_chunk_bytes). If a heartbeat waits behind
//! them for longer than an election timeout, followers start elections against a healthy
//! leader; a transport with a separate queue or stream for snapshot chunks avoids that.
//!
//! # Receiving: `Raft::receive`
//!
//! Decode each message and hand it to the destination group's [`Raft::receive`]. It never
//! blocks: it puts the message in the group's inbox, and if the inbox is full
//! ([`INBOX_MSGS_MAX`](crate::driver::INBOX_MSGS_MAX) messages) the message being received is
//! dropped and counted in [`Raft::inbox_dropped`]. The engine drops a message whose `to` is not
//! its own node id.
//!
//! # Several groups per process
//!
//! A [`Message`] names its sender and recipient nodes, not its group: a node runs one engine
//! per group, and the engine never looks at the group. When a process runs several groups,
//! the transport carries the group id next to each message. The simplest way is one `Network`
//! value per group that knows its [`GroupId`], and on the receiving side a map from group id to
//! [`Raft`] handle. The in-memory [`MemRouter`](crate::testing::MemRouter) of the `testing`
//! feature routes by node id only, so it serves one group.
//!
//! # Security
//!
//! Raft trusts `from` and `term`: a forged message with a high term makes the node that
//! receives it adopt that term (a leader steps down), and a forged append can overwrite
//! uncommitted entries. Authenticate peers (for
//! example with mutual TLS) and check that `msg.from` is the node at the other end of the
//! connection.
//!
//! # Example: per-peer outboxes
//!
//! ```rust
//! use flotilla_raft::{GroupId, Message, Network, NodeId, Raft};
//! use std::collections::{HashMap, VecDeque};
//! use std::sync::{Arc, Mutex};
//! use tokio::sync::Notify;
//!
//! const OUTBOX_MSGS_MAX: usize = 10_000;
//!
//! /// Messages waiting for one peer, oldest first, shared by every group of this process.
//! #[derive(Default)]
//! struct Outbox {
//!     queue: Mutex<VecDeque<(GroupId, Message)>>,
//!     ready: Notify,
//! }
//!
//! /// The `Network` of one group: tags its messages with the group id.
//! struct GroupNetwork {
//!     group: GroupId,
//!     outboxes: Arc<HashMap<NodeId, Arc<Outbox>>>,
//! }
//!
//! impl Network for GroupNetwork {
//!     fn send(&self, msg: Message) {
//!         let Some(outbox) = self.outboxes.get(&msg.to) else { return };
//!         let mut queue = outbox.queue.lock().unwrap();
//!         if queue.len() >= OUTBOX_MSGS_MAX {
//!             queue.pop_front(); // the oldest goes; Raft sends what matters again
//!         }
//!         queue.push_back((self.group, msg));
//!         drop(queue);
//!         outbox.ready.notify_one();
//!     }
//! }
//!
//! /// One task per peer connection: everything queued since the last write goes out as one
//! /// batch (`write` stands in for encoding and writing a frame).
//! async fn peer_writer(outbox: Arc<Outbox>, mut write: impl FnMut(Vec<(GroupId, Message)>)) {
//!     loop {
//!         outbox.ready.notified().await;
//!         let batch: Vec<_> = outbox.queue.lock().unwrap().drain(..).collect();
//!         if !batch.is_empty() {
//!             write(batch);
//!         }
//!     }
//! }
//!
//! /// The receiving side: a decoded batch goes to the groups' handles.
//! fn deliver(groups: &HashMap<GroupId, Raft>, batch: Vec<(GroupId, Message)>) {
//!     for (group, msg) in batch {
//!         if let Some(raft) = groups.get(&group) {
//!             raft.receive(msg); // never blocks
//!         }
//!     }
//! }
//! ```
//!
//! [`Message`] and everything in it implement serde's `Serialize` and `Deserialize`, so any
//! serde format can encode them.
//!
//! # The messages
//!
//! Every [`Message`] has `from`, `to`, `term` (the sender's current term; for a pre-vote, the
//! term the sender would campaign in) and a [`MessageBody`].
//! [`MessageBody::kind`] gives a short name for logs and metrics.
//!
//! | Body (`kind`) | Sent by | Purpose |
//! |---|---|---|
//! | [`PreVote`](crate::MessageBody::PreVote) (`pre_vote`) | a node whose election timer fired, with [`pre_vote`](crate::Config::pre_vote) on | asks whether peers would vote for it, without changing anyone's term |
//! | [`PreVoteResp`](crate::MessageBody::PreVoteResp) (`pre_vote_resp`) | voters | the answer |
//! | [`Vote`](crate::MessageBody::Vote) (`vote`) | a candidate | asks for a vote; `transfer` is set when a leadership transfer asked for the election |
//! | [`VoteResp`](crate::MessageBody::VoteResp) (`vote_resp`) | voters | the answer; a granted vote is sent only once it is durable |
//! | [`Append`](crate::MessageBody::Append) (`append`) | the leader | entries following `prev`, and the leader's commit index; empty to probe or to announce a commit |
//! | [`AppendResp`](crate::MessageBody::AppendResp) (`append_resp`) | followers and learners | [`Success`](crate::AppendResult::Success) up to the durably matched index, or [`Conflict`](crate::AppendResult::Conflict) with a hint that lets the leader skip a whole term at once |
//! | [`Heartbeat`](crate::MessageBody::Heartbeat) (`heartbeat`) | the leader | keeps followers from campaigning, carries the commit point (a log id the follower must hold to advance) and a round number counted by reads |
//! | [`HeartbeatResp`](crate::MessageBody::HeartbeatResp) (`heartbeat_resp`) | followers and learners | acknowledges a round; also tells a stale leader the newer term |
//! | [`TimeoutNow`](crate::MessageBody::TimeoutNow) (`timeout_now`) | the leader, during a transfer | tells the target to campaign at once |
//! | [`Snapshot`](crate::MessageBody::Snapshot) (`snapshot`) | the leader | one chunk of a snapshot |
//! | [`SnapshotResp`](crate::MessageBody::SnapshotResp) (`snapshot_resp`) | the receiver | the next offset it expects, or that the snapshot is installed |
//!
//! [`Message`]: crate::Message
//! [`MessageBody`]: crate::MessageBody
//! [`MessageBody::kind`]: crate::MessageBody::kind
//! [`Network::send`]: crate::Network::send
//! [`Raft`]: crate::Raft
//! [`Raft::receive`]: crate::Raft::receive
//! [`Raft::inbox_dropped`]: crate::Raft::inbox_dropped
//! [`GroupId`]: crate::GroupId
// Links into `crate::testing` resolve only when the `testing` feature is on.
#![cfg_attr(not(feature = "testing"), allow(rustdoc::broken_intra_doc_links))]
