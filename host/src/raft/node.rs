//! The runtime around the core: braft's queues as tokio channels and two threads.
//!
//! - `ApplyQueue`: callers' submissions go to the core loop's channel; the loop drains
//!   everything queued and cuts it into batches bounded by count and bytes; each batch is
//!   checked for leadership and expected term once, gets consecutive indexes, and one completion
//!   per entry (kept in index order).
//! - Core loop (a tokio task): owns the [`RaftCore`]; feeds it peer messages, ticks and
//!   storage notices; sends its messages (the replicators' appends, built from the in-memory
//!   tail), passes its writes to the disk queue and its commits to the FSM caller.
//! - `LogManager` disk queue (a thread, `log_manager.rs`), `FsmCaller` (a thread,
//!   `fsm_caller.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::core::{
    ChangeOutcome, ChangeStarted, CoreRole, DurableState, ProposeRefused, RaftCore, TransferRefused,
};
use super::fsm_caller::{FsmCaller, FsmTask};
use super::log_manager::{DiskQueue, DiskTask};
use super::membership::{ChangeRefused, Membership};
use super::message::{LogEntry, Message};
use super::metrics::{Metrics, MetricsSnapshot};
use super::{HardState, NodeId, RaftConfig};
use crate::state_machine::{Entry, StateMachine};
use crate::storage::LogStore;

/// Sends one message to a peer. Fire-and-forget: it may drop, delay or reorder.
/// Called from the core loop (a tokio task) and from the disk thread (not a tokio thread):
/// it must not block; queue and return.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, to: NodeId, msg: Message);

    /// The members changed: reach every one of them (at the address the membership records,
    /// where it records one).
    fn set_members(&self, members: &Membership) {
        let _ = members;
    }

    /// The peer address this node reaches `id` at, if it knows one.
    fn peer_address(&self, id: NodeId) -> Option<String> {
        let _ = id;
        None
    }
}

/// One change of the members (`Node::change_members`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// Adds member `id`, reached at peer address `address`.
    Add {
        id: NodeId,
        address: String,
    },
    Remove(NodeId),
    /// Records that member `id` is now reached at peer address `address` (restart it there).
    Move {
        id: NodeId,
        address: String,
    },
}

/// Why the members did not change as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// Nothing was appended; `leader` is the leader this node knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// Nothing was appended.
    #[error("{0}")]
    Refused(ChangeRefused),
    /// Nothing was appended: the member being added did not catch up with the log in time
    /// (is it running, with `--join`, at the address given?).
    #[error(
        "node {0} did not catch up with the log in time (is it running, with --join, at the \
         address given?); nothing changed"
    )]
    NotCaughtUp(NodeId),
    /// Appended, then leadership was lost before it committed: it may still commit.
    #[error("leadership lost before the change committed: outcome unknown")]
    OutcomeUnknown,
    #[error("shutting down")]
    ShuttingDown,
}

impl From<ChangeRefused> for MembershipError {
    fn from(refused: ChangeRefused) -> Self {
        match refused {
            ChangeRefused::NotLeader { leader } => MembershipError::NotLeader { leader },
            other => MembershipError::Refused(other),
        }
    }
}

/// A committed, applied entry and what the machine returned for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied<O> {
    pub index: u64,
    pub term: u64,
    pub output: O,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Nothing was proposed; `leader` is the leader this node knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// Nothing was proposed: the caller expected another term.
    #[error("expected term {expected}, current term is {current}")]
    TermMismatch { expected: u64, current: u64 },
    /// Proposed, then leadership was lost (or the node stopped): it may still commit.
    #[error("leadership lost after proposing: outcome unknown")]
    OutcomeUnknown,
    /// Nothing was proposed: the node is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// Nothing was proposed: entries not yet committed and applied fill the leader's bound.
    #[error("overloaded: the log is too far ahead of what is committed and applied")]
    Overloaded,
    /// Nothing was proposed: leadership is being handed to `to` (retry shortly, on it).
    #[error("leadership is moving to node {to}")]
    LeaderMoving { to: NodeId },
}

/// Why leadership did not move where asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("node {0} is not a member")]
    NotAMember(NodeId),
    /// Leadership is already moving to `to`.
    #[error("leadership is already moving to node {to}; ask again once it has moved")]
    InProgress { to: NodeId },
    /// The leader gave the hand-over up (the target did not take over within an election
    /// timeout) and leads on, as far as it knows.
    #[error(
        "node {to} did not take over within an election timeout; node {leader} gave the \
         hand-over up and leads on, as far as it knows"
    )]
    GaveUp { to: NodeId, leader: NodeId },
    /// The target's election lost to another member's.
    #[error("node {to} did not win the election; node {leader} leads")]
    WentElsewhere { to: NodeId, leader: NodeId },
    #[error("shutting down")]
    ShuttingDown,
}

impl TransferError {
    /// The core's refusal of a transfer to `to`.
    fn refused(to: NodeId, refused: TransferRefused) -> Self {
        match refused {
            TransferRefused::NotLeader { leader } => TransferError::NotLeader { leader },
            TransferRefused::NotAMember => TransferError::NotAMember(to),
            TransferRefused::InProgress { to } => TransferError::InProgress { to },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// Leadership was lost before the read index was confirmed; retry on the new leader.
    #[error("leadership lost before the read was confirmed")]
    LeadershipLost,
    #[error("shutting down")]
    ShuttingDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: NodeId,
    /// Highest index known durable on that member; only a leader knows it.
    pub match_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    /// As leader, the index of its term's no-op (0 otherwise): until that is committed and
    /// applied, this node's applied state may miss what an earlier leader acknowledged.
    pub term_start_index: u64,
    /// The latest snapshot's index, and the last entry compacted out of the log (0: none).
    pub snapshot_index: u64,
    pub compacted_index: u64,
    pub members: Vec<MemberStatus>,
}

pub(crate) type Completion<O> = oneshot::Sender<Result<Applied<O>, ProposeError>>;
pub(crate) type ReadJob<SM> = Box<dyn FnOnce(Result<&mut SM, ReadError>) + Send>;

pub(crate) enum Event<SM: StateMachine> {
    Propose {
        payload: Bytes,
        expected_term: Option<u64>,
        done: Completion<SM::Output>,
    },
    ProposeMany {
        payloads: Vec<Bytes>,
        expected_term: Option<u64>,
        done: Vec<Completion<SM::Output>>,
    },
    Read(ReadJob<SM>),
    /// Change the members; `done` is answered with the change's index once it commits.
    ChangeMembers {
        change: MemberChange,
        done: oneshot::Sender<Result<u64, MembershipError>>,
    },
    /// Hand leadership to `to`; `done` is answered once it has moved (or did not).
    Transfer {
        to: NodeId,
        done: oneshot::Sender<Result<(), TransferError>>,
    },
    Peer {
        from: NodeId,
        msg: Message,
    },
    /// A group of writes is durable; `id` is its last write's (`LogWrite::id`).
    Persisted {
        id: u64,
        index: u64,
        term: u64,
    },
    /// The FSM caller made a snapshot durable: followers behind are sent it, the log compacts.
    Snapshotted(super::core::Snapshot),
    /// The FSM caller installed the leader's snapshot at this index.
    Installed(u64),
    /// A pipeline thread failed (a log commit, or a panic): the node stops.
    Failed,
    Shutdown(oneshot::Sender<()>),
}

struct Shared {
    status: Mutex<Status>,
    applied: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    stopped: AtomicBool,
}

struct Handle<SM: StateMachine> {
    events: mpsc::UnboundedSender<Event<SM>>,
    fsm: std::sync::mpsc::Sender<FsmTask<SM>>,
    shared: Arc<Shared>,
}

/// A running member. Cheap to clone.
pub struct Node<SM: StateMachine> {
    inner: Arc<Handle<SM>>,
}

impl<SM: StateMachine> Clone for Node<SM> {
    fn clone(&self) -> Self {
        Node {
            inner: self.inner.clone(),
        }
    }
}

impl<SM: StateMachine> Node<SM> {
    /// Starts a member from its log (rebuilding `sm` by re-applying the committed entries).
    /// Must be called inside a tokio runtime.
    pub fn start(
        config: RaftConfig,
        log: LogStore,
        transport: Arc<dyn Transport>,
        mut sm: SM,
    ) -> anyhow::Result<Node<SM>> {
        // 0 is the core's "voted for nobody": a member 0 could collect a second vote in a term.
        anyhow::ensure!(
            !config.members.contains(&0) && config.id != 0,
            "node id 0 is reserved (ids start at 1)"
        );
        // No members: a node that joins a running cluster (it learns them from the leader).
        anyhow::ensure!(
            config.members.is_empty() || config.members.contains(&config.id),
            "node {} is not among the members",
            config.id
        );
        let distinct: std::collections::BTreeSet<_> = config.members.iter().collect();
        anyhow::ensure!(
            distinct.len() == config.members.len(),
            "a member id appears twice in {:?}",
            config.members
        );
        let mut rec = log.recover().context("recovering the log")?;
        let snapshot = log
            .snapshots()
            .load_latest()
            .context("reading the latest snapshot")?;
        let from = snapshot.as_ref().map_or(0, |s| s.index);
        anyhow::ensure!(
            rec.compacted.0 <= from,
            "the log is compacted through entry {}, but the latest snapshot in {} is {}: the \
             state those entries built is missing. Restore the snapshots directory, or start \
             the node afresh with an empty data directory, to be sent a snapshot",
            rec.compacted.0,
            log.snapshots().dir().display(),
            if from == 0 {
                "absent".to_string()
            } else {
                format!("at {from}")
            }
        );
        if let Some(s) = &snapshot {
            rec = log.align_to_snapshot(rec, s.index, s.term)?;
        }
        // The machine is rebuilt from the latest snapshot and the committed log after it. On a
        // thread of its own, as on the FSM caller's: machines run outside any async runtime (a
        // guest's WASI output blocks on a runtime of its own, which cannot start inside the
        // caller's).
        let commit = rec.hard_state.commit.max(from);
        let applied = std::thread::scope(|s| {
            s.spawn(|| {
                if let Some(snap) = &snapshot {
                    sm.restore(&snap.data).with_context(|| {
                        format!("restoring the machine from the snapshot at {}", snap.index)
                    })?;
                }
                replay(&log, &mut sm, from, commit)
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("replaying the log panicked")))
        })?;
        let tail = log.read(applied + 1, rec.last_index + 1, usize::MAX)?;
        // Term and timestamp of the last applied entry, for the next snapshot.
        let last_entry = match log.read(applied, applied + 1, 1)?.pop() {
            Some(e) if e.index == applied => (e.term, e.timestamp_ms),
            _ => snapshot
                .as_ref()
                .map_or((0, 0), |s| (s.term, s.timestamp_ms)),
        };
        let state = DurableState {
            hard: HardState {
                commit,
                ..rec.hard_state
            },
            term_runs: rec.term_runs,
            tail,
            applied,
            compacted: rec.compacted,
            snapshot,
            memberships: rec.memberships,
        };
        let core = RaftCore::new(
            config.core_config(),
            rand::random(),
            state,
            Box::new(log.clone()),
            0,
        );
        let applied_membership = core.membership_at(applied).clone();

        let metrics = Arc::new(Metrics::default());
        let applied_at = Arc::new(AtomicU64::new(applied));
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                id: config.id,
                role: Role::Follower,
                term: rec.hard_state.term,
                leader: None,
                commit_index: applied,
                applied_index: applied,
                last_index: rec.last_index,
                term_start_index: 0,
                snapshot_index: from,
                compacted_index: rec.compacted.0,
                members: config
                    .members
                    .iter()
                    .map(|&id| MemberStatus {
                        id,
                        match_index: None,
                    })
                    .collect(),
            }),
            applied: applied_at.clone(),
            metrics: metrics.clone(),
            stopped: AtomicBool::new(false),
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (disk_tx, disk_rx) = std::sync::mpsc::channel();
        let (fsm_tx, fsm_rx) = std::sync::mpsc::channel();

        let snapshots = log.snapshots().clone();
        let disk = DiskQueue::<SM> {
            store: log,
            rx: disk_rx,
            events: events_tx.clone(),
            transport: transport.clone(),
            metrics: metrics.clone(),
            max_entries: config.max_write_entries,
            max_bytes: config.max_write_bytes,
        };
        let disk_thread =
            spawn_pipeline_thread(format!("log-manager-{}", config.id), &events_tx, || {
                disk.run()
            })?;
        let fsm = FsmCaller {
            sm,
            rx: fsm_rx,
            applied: applied_at,
            metrics,
            events: events_tx.clone(),
            snapshots: snapshots.clone(),
            snapshot_every: config.snapshot_every,
            snapshot_index: from,
            last_entry,
            membership: applied_membership,
            writing: Arc::default(),
            writer: None,
        };
        let fsm_thread =
            spawn_pipeline_thread(format!("fsm-caller-{}", config.id), &events_tx, || {
                fsm.run()
            })?;

        let tick = (config.heartbeat_interval / 5)
            .clamp(Duration::from_millis(1), Duration::from_millis(20));
        let core_loop = CoreLoop {
            core,
            started: Instant::now(),
            tick,
            transport,
            disk: disk_tx,
            fsm: fsm_tx.clone(),
            shared: shared.clone(),
            pending: VecDeque::new(),
            shipped: applied,
            reads: HashMap::new(),
            next_read: 1,
            max_batch_entries: config.max_batch_entries.max(1),
            max_batch_bytes: config.max_batch_bytes.max(1),
            snapshot_keep: config.snapshot_keep,
            refusing: false,
            transfers: Vec::new(),
            changes: Vec::new(),
            catching_up: None,
            told_members: None,
            threads: vec![disk_thread, fsm_thread],
        };
        tokio::spawn(core_loop.run(events_rx));
        Ok(Node {
            inner: Arc::new(Handle {
                events: events_tx,
                fsm: fsm_tx,
                shared,
            }),
        })
    }

    /// Proposes one entry and waits until it is applied (or fails).
    pub async fn propose(
        &self,
        payload: Bytes,
        expected_term: Option<u64>,
    ) -> Result<Applied<SM::Output>, ProposeError> {
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .events
            .send(Event::Propose {
                payload,
                expected_term,
                done: tx,
            })
            .is_err()
        {
            return Err(ProposeError::ShuttingDown);
        }
        // A dropped completion means the node died holding it: it may have been proposed.
        rx.await.unwrap_or(Err(ProposeError::OutcomeUnknown))
    }

    /// Proposes several entries as one submission (consecutive indexes, one leadership check).
    pub async fn propose_many(
        &self,
        payloads: Vec<Bytes>,
        expected_term: Option<u64>,
    ) -> Vec<Result<Applied<SM::Output>, ProposeError>> {
        let (txs, rxs): (Vec<_>, Vec<_>) = payloads.iter().map(|_| oneshot::channel()).unzip();
        if self
            .inner
            .events
            .send(Event::ProposeMany {
                payloads,
                expected_term,
                done: txs,
            })
            .is_err()
        {
            return rxs
                .iter()
                .map(|_| Err(ProposeError::ShuttingDown))
                .collect();
        }
        let mut out = Vec::with_capacity(rxs.len());
        for rx in rxs {
            out.push(rx.await.unwrap_or(Err(ProposeError::OutcomeUnknown)));
        }
        out
    }

    /// Runs `f` on the state-machine thread. Linearizable: after a read-index round confirmed
    /// leadership and the read index is applied (leader only). Otherwise: on the local state.
    pub async fn read<R: Send + 'static>(
        &self,
        linearizable: bool,
        f: impl FnOnce(&mut SM) -> R + Send + 'static,
    ) -> Result<R, ReadError> {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob<SM> = Box::new(move |sm: Result<&mut SM, ReadError>| {
            let _ = tx.send(sm.map(f));
        });
        let sent = if linearizable {
            self.inner.events.send(Event::Read(job)).is_ok()
        } else {
            self.inner.fsm.send(FsmTask::Read(0, job)).is_ok()
        };
        if !sent {
            return Err(ReadError::ShuttingDown);
        }
        rx.await.unwrap_or(Err(ReadError::ShuttingDown))
    }

    /// Hands leadership to member `to` (braft's `transfer_leadership_to`, etcd's move-leader)
    /// and waits until it leads, as far as this node knows. Meanwhile the leader proposes
    /// nothing new (callers get `LeaderMoving`); once `to` holds the whole log, committed, it
    /// is told to campaign at once. One hand-over at a time: asking for another member
    /// meanwhile is refused (`InProgress`).
    pub async fn transfer_leadership(&self, to: NodeId) -> Result<(), TransferError> {
        self.ask(
            |done| Event::Transfer { to, done },
            TransferError::ShuttingDown,
        )
        .await
    }

    /// Adds or removes one member and waits until the change commits (it is in effect at
    /// once on the leader, and on each member as soon as that member has it in its log).
    /// Returns the index of the change's entry. One change at a time: another one while it
    /// is not committed is refused (`ChangeRefused::InProgress`), as is one during a
    /// leadership hand-over.
    pub async fn change_members(&self, change: MemberChange) -> Result<u64, MembershipError> {
        self.ask(
            |done| Event::ChangeMembers { change, done },
            MembershipError::ShuttingDown,
        )
        .await
    }

    /// Sends the core loop the event `make` builds around a reply channel, and waits for the
    /// reply (`stopped` if the loop is gone).
    async fn ask<T, E>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, E>>) -> Event<SM>,
        stopped: E,
    ) -> Result<T, E> {
        let (tx, rx) = oneshot::channel();
        if self.inner.events.send(make(tx)).is_err() {
            return Err(stopped);
        }
        rx.await.unwrap_or(Err(stopped))
    }

    /// Hands an inbound peer message to the node.
    pub fn receive(&self, from: NodeId, msg: Message) {
        let _ = self.inner.events.send(Event::Peer { from, msg });
    }

    pub fn status(&self) -> Status {
        let mut s = match self.inner.shared.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        s.applied_index = self.inner.shared.applied.load(Ordering::Acquire);
        s
    }

    /// This node's role and the leader it knows of: the per-request check, without copying
    /// the whole status.
    pub fn role(&self) -> (Role, Option<NodeId>) {
        match self.inner.shared.status.lock() {
            Ok(s) => (s.role, s.leader),
            Err(p) => {
                let s = p.into_inner();
                (s.role, s.leader)
            }
        }
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.inner.shared.metrics;
        let s = self.status();
        let r = Ordering::Relaxed;
        MetricsSnapshot {
            proposals: m.proposals.load(r),
            proposals_refused: m.proposals_refused.load(r),
            reads: m.reads.load(r),
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            entries_applied: m.entries_applied.load(r),
            apply_batch_size: m.apply_batch_size.snapshot(),
            fsync_latency_us: m.fsync_latency.snapshot(),
            fsync_entries: m.fsync_entries.load(r),
            stepdowns: m.stepdowns.load(r),
            snapshots_taken: m.snapshots_taken.load(r),
            snapshots_failed: m.snapshots_failed.load(r),
            snapshots_installed: m.snapshots_installed.load(r),
            replication_lag: if s.role == Role::Leader {
                s.members
                    .iter()
                    .filter(|m| m.id != s.id)
                    .map(|m| {
                        let matched = m.match_index.unwrap_or(0);
                        (m.id, s.last_index.saturating_sub(matched))
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// True once the node stopped (shutdown, a failed log commit, a pipeline thread's panic).
    pub fn is_stopped(&self) -> bool {
        self.inner.shared.stopped.load(Ordering::Acquire)
    }

    /// Stops the node: proposed-but-unapplied entries resolve `OutcomeUnknown`, everything not
    /// yet proposed `ShuttingDown`; the disk and state-machine threads finish and exit.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.events.send(Event::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

struct CoreLoop<SM: StateMachine> {
    core: RaftCore,
    started: Instant,
    tick: Duration,
    transport: Arc<dyn Transport>,
    disk: std::sync::mpsc::Sender<DiskTask>,
    fsm: std::sync::mpsc::Sender<FsmTask<SM>>,
    shared: Arc<Shared>,
    /// Completions of proposed entries, in index order: (index, term, completion).
    pending: VecDeque<(u64, u64, Completion<SM::Output>)>,
    /// Highest index handed to the FSM caller.
    shipped: u64,
    reads: HashMap<u64, Vec<ReadJob<SM>>>,
    next_read: u64,
    max_batch_entries: usize,
    max_batch_bytes: usize,
    /// Entries kept in the log before a snapshot when compacting.
    snapshot_keep: u64,
    /// The core refused a batch as overloaded in this pass: later batches of the pass are
    /// refused too, so a small one never overtakes a larger one it queued behind.
    refusing: bool,
    /// Callers of `transfer_leadership`, each with the member it asked for.
    transfers: Vec<(NodeId, oneshot::Sender<Result<(), TransferError>>)>,
    /// Callers of `change_members`, with their change's index and term; and the one whose
    /// new member is being caught up before its change is appended.
    changes: Vec<(u64, u64, ChangeDone)>,
    catching_up: Option<(u64, ChangeDone)>,
    /// The membership the transport was last told of: its index and term, and the member
    /// then being caught up.
    told_members: Option<(u64, u64, Option<NodeId>)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Where a membership change's caller is answered (the change's index once it commits).
type ChangeDone = oneshot::Sender<Result<u64, MembershipError>>;

/// One apply-queue batch being assembled.
struct Batch<O> {
    expected_term: Option<u64>,
    payloads: Vec<Bytes>,
    done: Vec<Completion<O>>,
    bytes: usize,
}

impl<SM: StateMachine> CoreLoop<SM> {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event<SM>>) {
        // However this task ends (a panic drops it mid-poll), the node reads as stopped.
        let _stopped = MarkStopped(self.shared.clone());
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut events = Vec::with_capacity(4096);
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        let mut failed = false;
        loop {
            tokio::select! {
                n = rx.recv_many(&mut events, 4096) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = ticker.tick() => {
                    let now = self.now_ms();
                    self.core.tick(now, wall_ms());
                }
            }
            let mut batch: Option<Batch<SM::Output>> = None;
            let mut reads: Vec<ReadJob<SM>> = Vec::new();
            // What the FSM caller applied since the last pass frees the tail, before this pass
            // proposes.
            self.core
                .set_applied(self.shared.applied.load(Ordering::Acquire));
            self.refusing = false;
            for ev in events.drain(..) {
                match ev {
                    Event::Propose {
                        payload,
                        expected_term,
                        done,
                    } => {
                        self.enqueue(&mut batch, expected_term, payload, done);
                    }
                    Event::ProposeMany {
                        payloads,
                        expected_term,
                        done,
                    } => {
                        for (p, d) in payloads.into_iter().zip(done) {
                            self.enqueue(&mut batch, expected_term, p, d);
                        }
                    }
                    Event::Read(job) => reads.push(job),
                    Event::ChangeMembers { change, done } => match self.change_members(change) {
                        Ok(ChangeStarted::Appended(at)) => {
                            self.changes.push((at, self.core.term(), done))
                        }
                        Ok(ChangeStarted::CatchingUp) => {
                            self.catching_up = Some((self.core.term(), done))
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    },
                    Event::Transfer { to, done } => match self.core.transfer_leadership(to) {
                        Ok(()) => self.transfers.push((to, done)),
                        Err(refused) => {
                            let _ = done.send(Err(TransferError::refused(to, refused)));
                        }
                    },
                    Event::Peer { from, msg } => self.core.step(from, msg),
                    Event::Persisted { id, index, term } => self.core.persisted(id, index, term),
                    Event::Snapshotted(snapshot) => self.core.compact(snapshot, self.snapshot_keep),
                    Event::Installed(index) => self.installed(index),
                    Event::Failed => failed = true,
                    Event::Shutdown(tx) => shutdown = Some(tx),
                }
            }
            // (Proposals that arrived in this pass before a `Transfer` are refused with it:
            // the batch is submitted after every event. Nothing is proposed, so no harm.)
            if let Some(b) = batch.take() {
                self.submit(b);
            }
            if !reads.is_empty() {
                self.start_read(reads);
            }
            if failed || shutdown.is_some() {
                break;
            }
            self.flush_ready();
            self.publish_status();
            if !self.transfers.is_empty() {
                self.answer_transfers();
            }
            if !self.changes.is_empty() || self.catching_up.is_some() {
                self.answer_changes();
            }
            self.tell_transport_members();
            // Let woken submitters run before draining again: the next batch is bigger and
            // the cycle costs fewer appends, writes and thread wake-ups.
            tokio::task::yield_now().await;
        }
        self.stop(rx, shutdown).await;
    }

    fn enqueue(
        &mut self,
        batch: &mut Option<Batch<SM::Output>>,
        expected_term: Option<u64>,
        payload: Bytes,
        done: Completion<SM::Output>,
    ) {
        let full = batch.as_ref().is_some_and(|b| {
            b.expected_term != expected_term
                || b.payloads.len() >= self.max_batch_entries
                || b.bytes + payload.len() > self.max_batch_bytes
        });
        if full && let Some(b) = batch.take() {
            self.submit(b);
        }
        let b = batch.get_or_insert_with(|| Batch {
            expected_term,
            payloads: Vec::new(),
            done: Vec::new(),
            bytes: 0,
        });
        b.bytes += payload.len();
        b.payloads.push(payload);
        b.done.push(done);
    }

    /// One leadership and term check, consecutive indexes, a completion per entry.
    fn submit(&mut self, b: Batch<SM::Output>) {
        let n = b.payloads.len() as u64;
        let proposed = if self.refusing {
            Err(ProposeRefused::Overloaded)
        } else {
            self.core.propose(b.payloads, wall_ms(), b.expected_term)
        };
        match proposed {
            Ok((first, term)) => {
                self.shared
                    .metrics
                    .proposals
                    .fetch_add(n, Ordering::Relaxed);
                for (i, done) in b.done.into_iter().enumerate() {
                    self.pending.push_back((first + i as u64, term, done));
                }
            }
            Err(refused) => {
                self.shared
                    .metrics
                    .proposals_refused
                    .fetch_add(n, Ordering::Relaxed);
                let err = match refused {
                    ProposeRefused::NotLeader { leader } => ProposeError::NotLeader { leader },
                    ProposeRefused::TermMismatch { expected, current } => {
                        ProposeError::TermMismatch { expected, current }
                    }
                    ProposeRefused::Overloaded => {
                        self.refusing = true;
                        ProposeError::Overloaded
                    }
                    ProposeRefused::Transferring { to } => ProposeError::LeaderMoving { to },
                };
                for done in b.done {
                    let _ = done.send(Err(err.clone()));
                }
            }
        }
    }

    /// One read-index round for every read that arrived together.
    fn start_read(&mut self, jobs: Vec<ReadJob<SM>>) {
        self.shared
            .metrics
            .reads
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let id = self.next_read;
        self.next_read += 1;
        match self.core.read_index(id) {
            Ok(()) => {
                self.reads.insert(id, jobs);
            }
            Err(refused) => {
                let leader = match refused {
                    ProposeRefused::NotLeader { leader } => leader,
                    ProposeRefused::TermMismatch { .. }
                    | ProposeRefused::Overloaded
                    | ProposeRefused::Transferring { .. } => self.core.leader(),
                };
                for job in jobs {
                    job(Err(ReadError::NotLeader { leader }));
                }
            }
        }
    }

    fn flush_ready(&mut self) {
        while self.core.has_ready() {
            let ready = self.core.take_ready();
            if ready.stepped_down {
                self.shared
                    .metrics
                    .stepdowns
                    .fetch_add(1, Ordering::Relaxed);
                self.fail_pending();
            }
            for (to, msg) in ready.messages {
                self.transport.send(to, msg);
            }
            for w in ready.writes {
                if self.disk.send(DiskTask::Write(w)).is_err() {
                    tracing::error!("disk queue gone");
                }
            }
            if let Some(snapshot) = ready.install
                && self.fsm.send(FsmTask::Install(snapshot)).is_err()
            {
                tracing::error!("state-machine queue gone");
            }
            if let Some(commit) = ready.commit {
                self.ship(commit);
            }
            for (id, index) in ready.reads_ready {
                // The FSM caller runs it once `index` is applied.
                for job in self.reads.remove(&id).unwrap_or_default() {
                    if let Err(std::sync::mpsc::SendError(FsmTask::Read(_, job))) =
                        self.fsm.send(FsmTask::Read(index, job))
                    {
                        job(Err(ReadError::ShuttingDown));
                    }
                }
            }
            match ready.membership {
                Some(ChangeOutcome::Appended(at)) => {
                    if let Some((_, done)) = self.catching_up.take() {
                        self.changes.push((at, self.core.term(), done));
                    }
                }
                Some(ChangeOutcome::NotCaughtUp(id)) => {
                    if let Some((_, done)) = self.catching_up.take() {
                        let _ = done.send(Err(MembershipError::NotCaughtUp(id)));
                    }
                }
                None => {}
            }
            for id in ready.reads_failed {
                for job in self.reads.remove(&id).unwrap_or_default() {
                    job(Err(ReadError::LeadershipLost));
                }
            }
        }
    }

    /// Hands committed entries and their completions to the FSM caller.
    fn ship(&mut self, commit: u64) {
        if commit <= self.shipped {
            return;
        }
        let Some(entries) = self.core.entries(self.shipped + 1, commit) else {
            tracing::error!(
                from = self.shipped + 1,
                to = commit,
                "committed entries unreadable"
            );
            return;
        };
        let mut done = Vec::new();
        while self.pending.front().is_some_and(|(i, _, _)| *i <= commit) {
            let Some((index, term, tx)) = self.pending.pop_front() else {
                break;
            };
            let ours = index
                .checked_sub(self.shipped + 1)
                .and_then(|k| entries.get(k as usize))
                .is_some_and(|e| e.term == term);
            if ours {
                done.push((index, tx));
            } else {
                let _ = tx.send(Err(ProposeError::OutcomeUnknown));
            }
        }
        self.shipped = commit;
        if let Err(std::sync::mpsc::SendError(FsmTask::Apply { done, .. })) =
            self.fsm.send(FsmTask::Apply { entries, done })
        {
            for (_, tx) in done {
                let _ = tx.send(Err(ProposeError::OutcomeUnknown));
            }
        }
    }

    /// The leader's snapshot at `index` replaced the machine's state: entries up to it will
    /// not be applied here, so their callers cannot be told an output.
    fn installed(&mut self, index: u64) {
        while self.pending.front().is_some_and(|(i, _, _)| *i <= index) {
            if let Some((_, _, tx)) = self.pending.pop_front() {
                let _ = tx.send(Err(ProposeError::OutcomeUnknown));
            }
        }
        self.shipped = self.shipped.max(index);
        self.core.installed(index);
    }

    /// Answers the callers of `transfer_leadership` whose hand-over ended: the target leads, the
    /// leader gave up, or another member won. (Stepped down, with no leader known yet: wait.)
    fn answer_transfers(&mut self) {
        let (me, leader) = (self.core.id(), self.core.leader());
        let moving = self.core.transferring_to();
        let mut waiting = Vec::new();
        for (to, done) in self.transfers.drain(..) {
            if done.is_closed() {
                continue; // the caller gave up waiting
            }
            let outcome = match leader {
                Some(l) if l == to => Ok(()),
                Some(l) if l != me => Err(TransferError::WentElsewhere { to, leader: l }),
                Some(l) if moving != Some(to) => Err(TransferError::GaveUp { to, leader: l }),
                // Still handing over, or no leader known yet.
                _ => {
                    waiting.push((to, done));
                    continue;
                }
            };
            let _ = done.send(outcome);
        }
        self.transfers = waiting;
    }

    /// Leadership lost: proposals of a term this node no longer leads may or may not commit.
    fn fail_pending(&mut self) {
        let (term, leader) = (self.core.term(), self.core.is_leader());
        let mut keep = VecDeque::new();
        for (index, t, tx) in self.pending.drain(..) {
            if leader && t == term {
                keep.push_back((index, t, tx));
            } else {
                let _ = tx.send(Err(ProposeError::OutcomeUnknown));
            }
        }
        self.pending = keep;
    }

    /// Appends the change, with the addresses of members the log records none for (those the
    /// cluster started with) filled in from the transport, so that members added later reach
    /// every member from the log alone.
    fn change_members(&mut self, change: MemberChange) -> Result<ChangeStarted, MembershipError> {
        let current = self.core.may_change()?;
        let filled = |m: Membership| m.with_addresses(|id| self.transport.peer_address(id));
        // Two ids at one address would each get the other's messages.
        let taken = |id: NodeId, address: &str| {
            current.ids().find(|&other| {
                other != id && self.transport.peer_address(other).as_deref() == Some(address)
            })
        };
        let next = match change {
            MemberChange::Add { id, address } => {
                let next = current.with(id, address.clone())?;
                if let Some(by) = taken(id, &address) {
                    return Err(ChangeRefused::AddressTaken { address, by }.into());
                }
                next
            }
            MemberChange::Remove(id) => current.without(id)?,
            MemberChange::Move { id, address } => {
                if current.contains(id)
                    && self.transport.peer_address(id).as_deref() == Some(address.as_str())
                {
                    return Err(ChangeRefused::SameAddress(id).into());
                }
                if let Some(by) = taken(id, &address) {
                    return Err(ChangeRefused::AddressTaken { address, by }.into());
                }
                let next = filled(current.clone()).moved(id, address)?;
                let at = self.core.move_member(id, next, wall_ms())?;
                return Ok(ChangeStarted::Appended(at));
            }
        };
        Ok(self.core.change_membership(filled(next), wall_ms())?)
    }

    /// Answers the callers of `change_members` whose change committed, or whose outcome this
    /// node can no longer know (it stopped leading the term it appended the change in).
    fn answer_changes(&mut self) {
        let commit = self.core.commit_index();
        let term = self.core.term();
        let leading = self.core.is_leader();
        // Stepped down (perhaps elected again since): the catch-up was dropped with the term.
        if let Some((_, done)) = self.catching_up.take_if(|(t, _)| !leading || *t != term) {
            // Nothing was appended: the new leader may be asked again.
            let leader = self.core.leader();
            let _ = done.send(Err(MembershipError::NotLeader { leader }));
        }
        let mut waiting = Vec::new();
        for (index, t, done) in self.changes.drain(..) {
            let answer = if index <= commit && self.core.term_at(index) == t {
                Ok(index)
            } else if index <= commit || !leading || term != t {
                Err(MembershipError::OutcomeUnknown)
            } else {
                waiting.push((index, t, done));
                continue;
            };
            let _ = done.send(answer);
        }
        self.changes = waiting;
    }

    /// Tells the transport of a membership that came into effect (appended, truncated or
    /// installed with a snapshot), or of a member being caught up before it is added.
    fn tell_transport_members(&mut self) {
        let (at, learner, members) = self.core.members_to_reach();
        // The term too: a truncated change may be replaced by another at the same index.
        let told = (at, self.core.term_at(at), learner);
        if self.told_members != Some(told) {
            // A member being removed is replicated to until it holds its removal: the
            // committed membership gives its address (it may have joined with `--join`).
            let committed = self.core.membership_at(self.core.commit_index());
            self.transport.set_members(&members.including(committed));
            self.told_members = Some(told);
        }
    }

    fn publish_status(&self) {
        let Ok(mut s) = self.shared.status.lock() else {
            return;
        };
        s.role = match self.core.role() {
            CoreRole::Leader => Role::Leader,
            CoreRole::Follower => Role::Follower,
            CoreRole::PreCandidate | CoreRole::Candidate => Role::Candidate,
        };
        s.term = self.core.term();
        s.leader = self.core.leader();
        s.commit_index = self.core.commit_index();
        s.last_index = self.core.last_index();
        s.term_start_index = self.core.term_start_index();
        s.snapshot_index = self.core.snapshot_index();
        s.compacted_index = self.core.compacted_index();
        let leading = self.core.is_leader();
        s.members = self
            .core
            .members()
            .iter()
            .map(|&id| MemberStatus {
                id,
                match_index: leading.then(|| self.core.match_index(id)),
            })
            .collect();
    }

    async fn stop(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Event<SM>>,
        shutdown: Option<oneshot::Sender<()>>,
    ) {
        self.shared.stopped.store(true, Ordering::Release);
        rx.close();
        // Entries already shipped to the FSM caller will be applied and answered there.
        for (_, _, tx) in self.pending.drain(..) {
            let _ = tx.send(Err(ProposeError::OutcomeUnknown));
        }
        for (_, jobs) in self.reads.drain() {
            for job in jobs {
                job(Err(ReadError::ShuttingDown));
            }
        }
        for (_, _, done) in self.changes.drain(..) {
            let _ = done.send(Err(MembershipError::OutcomeUnknown));
        }
        if let Some((_, done)) = self.catching_up.take() {
            let _ = done.send(Err(MembershipError::ShuttingDown));
        }
        for (_, done) in self.transfers.drain(..) {
            let _ = done.send(Err(TransferError::ShuttingDown));
        }
        let mut waiters = Vec::new();
        waiters.extend(shutdown);
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Propose { done, .. } => {
                    let _ = done.send(Err(ProposeError::ShuttingDown));
                }
                Event::ProposeMany { done, .. } => {
                    for d in done {
                        let _ = d.send(Err(ProposeError::ShuttingDown));
                    }
                }
                Event::Read(job) => job(Err(ReadError::ShuttingDown)),
                Event::ChangeMembers { done, .. } => {
                    let _ = done.send(Err(MembershipError::ShuttingDown));
                }
                Event::Transfer { done, .. } => {
                    let _ = done.send(Err(TransferError::ShuttingDown));
                }
                Event::Shutdown(tx) => waiters.push(tx),
                Event::Peer { .. }
                | Event::Persisted { .. }
                | Event::Snapshotted(_)
                | Event::Installed(_)
                | Event::Failed => {}
            }
        }
        let _ = self.disk.send(DiskTask::Stop);
        let _ = self.fsm.send(FsmTask::Stop);
        let threads = std::mem::take(&mut self.threads);
        drop(self);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        for w in waiters {
            let _ = w.send(());
        }
    }
}

/// Starts a pipeline thread (disk queue, FSM caller) that stops the node if it panics: without
/// it the node can no longer make a write durable or apply one, and must not go on looking alive.
fn spawn_pipeline_thread<SM: StateMachine>(
    name: String,
    events: &mpsc::UnboundedSender<Event<SM>>,
    run: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let guard = StopOnPanic(events.clone());
    std::thread::Builder::new().name(name).spawn(move || {
        let _guard = guard;
        run()
    })
}

/// Sends `Event::Failed` when dropped by a panicking thread.
struct StopOnPanic<SM: StateMachine>(mpsc::UnboundedSender<Event<SM>>);

impl<SM: StateMachine> Drop for StopOnPanic<SM> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("a pipeline thread panicked; stopping the node");
            let _ = self.0.send(Event::Failed);
        }
    }
}

/// Marks the node stopped when the core loop ends, normally or not.
struct MarkStopped(Arc<Shared>);

impl Drop for MarkStopped {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Applies the committed entries `from+1..=commit` to `sm` in bounded chunks; returns the last
/// index.
fn replay<SM: StateMachine>(
    log: &LogStore,
    sm: &mut SM,
    from: u64,
    commit: u64,
) -> anyhow::Result<u64> {
    let mut applied = from;
    while applied < commit {
        let chunk = log.read(applied + 1, commit + 1, 4 << 20)?;
        let Some(last) = chunk.last() else {
            anyhow::bail!("log ends at {applied}, commit is {commit}")
        };
        applied = last.index;
        let batch: Vec<Entry> = chunk
            .into_iter()
            .filter_map(LogEntry::into_user_entry)
            .collect();
        if !batch.is_empty() {
            sm.apply(batch);
        }
    }
    Ok(applied)
}
