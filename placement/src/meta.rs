//! The meta state machine: the shard map plus the nodes, changed only by [`MetaCommand`]s
//! (replicated by the meta Raft group). A command that does not fit the current state is
//! refused with a clear error and changes nothing.

use crate::map::{Epoch, NodeId, Replica, ReplicaRole, ShardDescriptor, ShardId, ShardMap};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

/// What a node reports on each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Bytes of data per shard replica on the node.
    pub shard_bytes: BTreeMap<ShardId, u64>,
    /// Shards the node currently leads.
    pub leading: Vec<ShardId>,
}

/// A node as the meta state knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node.
    pub id: NodeId,
    /// Where it listens (opaque to placement).
    pub addr: String,
    /// Its last report.
    pub report: NodeReport,
    /// Being drained: the balancer moves everything off it.
    pub draining: bool,
}

/// A change to the meta state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create the first shard, over the whole keyspace, on `nodes` (voters).
    Bootstrap {
        /// Initial replicas.
        nodes: Vec<NodeId>,
    },
    /// Add (or update the address of) a node.
    RegisterNode {
        /// The node.
        node: NodeId,
        /// Its address.
        addr: String,
    },
    /// A node's periodic report.
    Heartbeat {
        /// The node.
        node: NodeId,
        /// Its report.
        report: NodeReport,
    },
    /// Split `shard` (as of `epoch`) at `key`.
    Split {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// First key of the new right-hand shard.
        key: Vec<u8>,
    },
    /// Add a learner replica on `node`.
    AddLearner {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// Make the learner on `node` a voter.
    Promote {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// Remove the replica on `node`.
    RemoveReplica {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The node.
        node: NodeId,
    },
    /// Ask the replicas of `shard` to hand leadership to the voter on `node`. Recorded until a
    /// heartbeat of `node` reports it leads the shard.
    TransferLeader {
        /// The shard.
        shard: ShardId,
        /// The epoch the decision was made at.
        epoch: Epoch,
        /// The voter to lead.
        node: NodeId,
    },
    /// Start or stop draining a node.
    SetDraining {
        /// The node.
        node: NodeId,
        /// Draining or not.
        draining: bool,
    },
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum MetaError {
    /// Bootstrap on a map that already has shards.
    #[error("already bootstrapped")]
    AlreadyBootstrapped,
    /// A command needs a bootstrapped map.
    #[error("not bootstrapped")]
    NotBootstrapped,
    /// The node is not registered.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The shard does not exist.
    #[error("unknown shard {0}")]
    UnknownShard(ShardId),
    /// The command was decided on an older version of the shard.
    #[error("stale epoch for shard {shard}: command at {given:?}, shard at {current:?}")]
    StaleEpoch {
        /// The shard.
        shard: ShardId,
        /// The epoch in the command.
        given: Epoch,
        /// The shard's epoch.
        current: Epoch,
    },
    /// A split key must lie strictly inside the shard's range.
    #[error("split key is not strictly inside shard {0}'s range")]
    SplitKeyOutsideRange(ShardId),
    /// The node already holds a replica of the shard.
    #[error("node {node} already holds a replica of shard {shard}")]
    ReplicaExists {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// The node holds no replica (or no learner, for a promotion) of the shard.
    #[error("node {node} holds no such replica of shard {shard}")]
    NoSuchReplica {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// Removing the replica would leave the shard without a voter.
    #[error("shard {0} would be left without a voter")]
    LastVoter(ShardId),
    /// Bootstrap needs at least one node, each registered once.
    #[error("invalid bootstrap: {0}")]
    InvalidBootstrap(String),
}

/// What an applied command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOutcome {
    /// Nothing beyond the state change.
    Done,
    /// The shard descriptors a command changed or created, as they are now.
    Shards(Vec<ShardDescriptor>),
}

/// The replicated state of the placement layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// The shard map.
    pub map: ShardMap,
    /// Registered nodes.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// The id the next new shard gets.
    pub next_shard_id: u64,
    /// Leader transfers asked for and not yet seen done: shard -> target node.
    pub transfers: BTreeMap<ShardId, NodeId>,
}

impl MetaState {
    /// Applies `cmd`; on error nothing changed.
    pub fn apply(&mut self, cmd: MetaCommand) -> Result<MetaOutcome, MetaError> {
        match cmd {
            MetaCommand::Bootstrap { nodes } => {
                if !self.map.is_empty() {
                    return Err(MetaError::AlreadyBootstrapped);
                }
                if nodes.is_empty() {
                    return Err(MetaError::InvalidBootstrap("no nodes".into()));
                }
                let mut sorted = nodes.clone();
                sorted.sort();
                sorted.dedup();
                if sorted.len() != nodes.len() {
                    return Err(MetaError::InvalidBootstrap("a node is listed twice".into()));
                }
                if let Some(n) = nodes.iter().find(|n| !self.nodes.contains_key(n)) {
                    return Err(MetaError::UnknownNode(*n));
                }
                let id = ShardId(self.next_shard_id.max(1));
                self.next_shard_id = id.0 + 1;
                let replicas = nodes.into_iter().map(|node| Replica { node, role: ReplicaRole::Voter }).collect();
                self.map = ShardMap::bootstrap(id, replicas);
                Ok(MetaOutcome::Shards(self.map.get(id).cloned().into_iter().collect()))
            }
            MetaCommand::RegisterNode { node, addr } => {
                let e = self.nodes.entry(node).or_insert_with(|| NodeInfo {
                    id: node,
                    addr: String::new(),
                    report: NodeReport::default(),
                    draining: false,
                });
                e.addr = addr;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::Heartbeat { node, report } => {
                let n = self.nodes.get_mut(&node).ok_or(MetaError::UnknownNode(node))?;
                self.transfers.retain(|shard, target| !(*target == node && report.leading.contains(shard)));
                n.report = report;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::TransferLeader { shard, epoch, node } => {
                let d = self.current(shard, epoch)?;
                if d.replica(node).is_none_or(|r| r.role != ReplicaRole::Voter) {
                    return Err(MetaError::NoSuchReplica { shard, node });
                }
                self.transfers.insert(shard, node);
                Ok(MetaOutcome::Done)
            }
            MetaCommand::SetDraining { node, draining } => {
                let n = self.nodes.get_mut(&node).ok_or(MetaError::UnknownNode(node))?;
                n.draining = draining;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::Split { shard, epoch, key } => {
                let d = self.current(shard, epoch)?;
                if key.as_slice() <= d.start.as_slice() || !d.contains(&key) {
                    return Err(MetaError::SplitKeyOutsideRange(shard));
                }
                let new_id = ShardId(self.next_shard_id.max(1));
                self.next_shard_id = new_id.0 + 1;
                self.map.split(shard, key, new_id);
                let changed = [shard, new_id].iter().filter_map(|id| self.map.get(*id).cloned()).collect();
                Ok(MetaOutcome::Shards(changed))
            }
            MetaCommand::AddLearner { shard, epoch, node } => {
                if !self.nodes.contains_key(&node) {
                    return Err(MetaError::UnknownNode(node));
                }
                let d = self.current(shard, epoch)?;
                if d.replica(node).is_some() {
                    return Err(MetaError::ReplicaExists { shard, node });
                }
                self.change(shard, |d| d.replicas.push(Replica { node, role: ReplicaRole::Learner }))
            }
            MetaCommand::Promote { shard, epoch, node } => {
                let d = self.current(shard, epoch)?;
                if d.replica(node).is_none_or(|r| r.role != ReplicaRole::Learner) {
                    return Err(MetaError::NoSuchReplica { shard, node });
                }
                self.change(shard, |d| {
                    if let Some(r) = d.replicas.iter_mut().find(|r| r.node == node) {
                        r.role = ReplicaRole::Voter;
                    }
                })
            }
            MetaCommand::RemoveReplica { shard, epoch, node } => {
                let d = self.current(shard, epoch)?;
                let Some(r) = d.replica(node) else {
                    return Err(MetaError::NoSuchReplica { shard, node });
                };
                if r.role == ReplicaRole::Voter && d.voters().count() == 1 {
                    return Err(MetaError::LastVoter(shard));
                }
                self.change(shard, |d| d.replicas.retain(|r| r.node != node))
            }
        }
    }

    /// The shard, if `epoch` is its current one.
    fn current(&self, shard: ShardId, epoch: Epoch) -> Result<&ShardDescriptor, MetaError> {
        if self.map.is_empty() {
            return Err(MetaError::NotBootstrapped);
        }
        let d = self.map.get(shard).ok_or(MetaError::UnknownShard(shard))?;
        if d.epoch != epoch {
            return Err(MetaError::StaleEpoch { shard, given: epoch, current: d.epoch });
        }
        Ok(d)
    }

    /// Applies a replica change and bumps `conf_version`.
    fn change(&mut self, shard: ShardId, f: impl FnOnce(&mut ShardDescriptor)) -> Result<MetaOutcome, MetaError> {
        let d = self.map.get_mut(shard).ok_or(MetaError::UnknownShard(shard))?;
        f(d);
        d.epoch.conf_version += 1;
        Ok(MetaOutcome::Shards(vec![d.clone()]))
    }

    /// Serializes the whole state (a snapshot of the meta group).
    pub fn snapshot(&self) -> Result<Vec<u8>, String> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).map_err(|e| e.to_string())
    }

    /// Restores a state from [`MetaState::snapshot`], checking the map's invariant.
    pub fn restore(bytes: &[u8]) -> Result<MetaState, String> {
        let (s, used): (MetaState, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map_err(|e| e.to_string())?;
        if used != bytes.len() {
            return Err(format!("{} trailing bytes", bytes.len() - used));
        }
        s.map.validate()?;
        Ok(s)
    }
}
