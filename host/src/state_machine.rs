//! The seam between the replication pipeline and what it replicates.
//!
//! The pipeline (`raft`) drives a [`StateMachine`]; the node implements it over the Wasm
//! runtime, tests implement it natively.

use bytes::Bytes;

/// One committed entry as a state machine sees it. `timestamp_ms` is chosen by the leader when
/// it proposes and is the same on every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub timestamp_ms: u64,
    pub payload: Bytes,
}

/// A deterministic state machine: the same entries in the same order give the same outputs and
/// the same state, however they are grouped into batches.
pub trait StateMachine: Send + 'static {
    /// What applying one entry gives back to the caller that proposed it.
    type Output: Send + 'static;

    /// Applies committed entries in log order and returns exactly one output per entry. The
    /// entries are the machine's to keep (a machine that logs them for replay moves them).
    fn apply(&mut self, batch: Vec<Entry>) -> Vec<Self::Output>;

    /// The whole applied state as bytes, for [`StateMachine::restore`] on this replica after a
    /// restart or on another that fell behind the compacted log. Called only when the pipeline
    /// is configured to take snapshots (`RaftConfig::snapshot_every`). An error skips this
    /// snapshot (the log is compacted later).
    fn snapshot(&mut self) -> anyhow::Result<Vec<u8>> {
        anyhow::bail!("this state machine takes no snapshots")
    }

    /// Replaces the whole state with a snapshot's. An error stops the node: it cannot go on
    /// from a state it does not have.
    fn restore(&mut self, snapshot: &[u8]) -> anyhow::Result<()> {
        let _ = snapshot;
        anyhow::bail!("this state machine cannot restore snapshots")
    }
}
