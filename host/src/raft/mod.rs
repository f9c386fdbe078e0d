//! The replication pipeline: a deterministic Raft core (`core`) and the runtime around it
//! (`node`): apply queue → log manager + disk queue → replicators → ballot box → FSM caller.

pub mod ballot_box;
pub mod core;
mod fsm_caller;
pub mod local;
mod log_manager;
pub mod membership;
pub mod message;
pub mod metrics;
mod node;

use std::time::Duration;

pub use self::core::{
    ChangeOutcome, ChangeStarted, CoreConfig, CoreRole, DurableState, HardState, LogRead, LogWrite,
    RaftCore, Ready, Snapshot,
};
pub use membership::{ChangeRefused, MAX_NODE_ID, Membership};
pub use message::{DecodeError, EntryKind, LogEntry, Message};
pub use metrics::{HistogramSnapshot, MetricsSnapshot};
pub use node::{
    Applied, MemberChange, MemberStatus, MembershipError, Node, ProposeError, ReadError, Role,
    Status, TransferError, Transport,
};
pub(crate) use node::{Completion, Event, ReadJob};

/// A member's id. Never 0 (0 means "nobody" in the vote).
pub type NodeId = u64;

/// Configuration of one member.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub id: NodeId,
    pub members: Vec<NodeId>,
    /// Randomized between the bounds; the lower bound is also the leader lease / check-quorum
    /// window.
    pub election_timeout: (Duration, Duration),
    pub heartbeat_interval: Duration,
    /// Bounds of one apply-queue batch and of one AppendEntries.
    pub max_batch_entries: usize,
    pub max_batch_bytes: usize,
    /// Appends in flight per follower.
    pub max_inflight_appends: usize,
    /// Bytes of entries not yet durable and applied, each counted as its payload and
    /// `message::TAIL_OVERHEAD`, beyond which the leader refuses new proposals
    /// (`ProposeError::Overloaded`).
    pub max_unapplied_bytes: usize,
    /// Bounds of one group commit in the disk queue.
    pub max_write_entries: usize,
    pub max_write_bytes: usize,
    /// Entries applied between snapshots of the state machine (0: none, the log is kept
    /// whole). Behind each snapshot the log is compacted, keeping `snapshot_keep` entries so
    /// that a follower a little behind catches up from the log rather than a snapshot.
    pub snapshot_every: u64,
    pub snapshot_keep: u64,
}

impl RaftConfig {
    pub fn new(id: NodeId, members: Vec<NodeId>) -> RaftConfig {
        RaftConfig {
            id,
            members,
            election_timeout: (Duration::from_millis(1000), Duration::from_millis(2000)),
            heartbeat_interval: Duration::from_millis(100),
            max_batch_entries: 1024,
            max_batch_bytes: 512 * 1024,
            max_inflight_appends: 16,
            max_unapplied_bytes: 256 * 1024 * 1024,
            max_write_entries: 4096,
            max_write_bytes: 1024 * 1024,
            snapshot_every: 0,
            snapshot_keep: 10_000,
        }
    }

    pub fn core_config(&self) -> CoreConfig {
        CoreConfig {
            id: self.id,
            members: self.members.clone(),
            election_timeout_ms: (
                self.election_timeout.0.as_millis() as u64,
                self.election_timeout.1.as_millis() as u64,
            ),
            heartbeat_ms: self.heartbeat_interval.as_millis().max(1) as u64,
            max_batch_entries: self.max_batch_entries.max(1),
            max_batch_bytes: self.max_batch_bytes.max(1),
            max_inflight: self.max_inflight_appends.max(1),
            snapshot_chunk_bytes: 1 << 20,
            max_unapplied_bytes: self.max_unapplied_bytes,
            unsafe_ack_before_durable: false,
        }
    }
}

#[doc(hidden)]
pub mod sim;
