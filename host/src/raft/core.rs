//! The consensus core: Raft's rules and nothing else. No I/O, no clocks, no threads.
//!
//! Events go in (`tick` with the time, `step` with a peer message, `propose`, `persisted` when a
//! storage write is durable, `read_index`, `set_applied`); what must happen comes out through
//! [`RaftCore::take_ready`]: messages to send now, storage writes (each carrying the messages that
//! may only leave once that write is durable), the commit index, read indexes that are safe to
//! serve and role changes. The runtime (`node.rs`) and the simulator are thin shells around it.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::SmallRng};

use super::NodeId;
use super::ballot_box::BallotBox;
use super::membership::{ChangeRefused, Membership};
use super::message::{EntryKind, LogEntry, MAX_WIRE_NUMBER, Message};

/// The core's own view of the configuration (times in milliseconds of the injected clock).
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub id: NodeId,
    /// The members the cluster started with (empty: this node joins a running cluster, and
    /// learns its members from the leader). Membership entries in the log override them.
    pub members: Vec<NodeId>,
    pub election_timeout_ms: (u64, u64),
    pub heartbeat_ms: u64,
    pub max_batch_entries: usize,
    pub max_batch_bytes: usize,
    pub max_inflight: usize,
    /// Bytes of a snapshot per `InstallSnapshot` chunk.
    pub snapshot_chunk_bytes: usize,
    /// Payload bytes the in-memory tail (entries not yet durable, committed and applied) may
    /// hold before the leader refuses new proposals with `Overloaded`: the pipeline's
    /// backpressure.
    pub max_unapplied_bytes: usize,
    /// Test-only: break "a follower acknowledges only durable entries" (the negative control).
    #[doc(hidden)]
    pub unsafe_ack_before_durable: bool,
}

/// Term, vote and a lower bound of the commit index: what survives a restart besides entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    /// 0 = voted for nobody in `term` (node ids are never 0).
    pub vote: NodeId,
    pub commit: u64,
}

/// What a core starts from: `tail` holds the entries `applied+1..=last` (older ones are
/// readable through [`LogRead`] down to `compacted + 1`), `term_runs` the terms of the log
/// past `compacted` as `(first index, term)`, `compacted` the last compacted entry's index and
/// term, `snapshot` the latest snapshot of the applied state (at or past `compacted`).
#[derive(Debug, Default)]
pub struct DurableState {
    pub hard: HardState,
    pub term_runs: Vec<(u64, u64)>,
    pub tail: Vec<LogEntry>,
    pub applied: u64,
    pub compacted: (u64, u64),
    pub snapshot: Option<Snapshot>,
    /// Memberships by the index they are in effect from (membership entries, and the
    /// membership at an installed snapshot's index), in index order.
    pub memberships: Vec<(u64, Membership)>,
}

/// The state machine's applied state at `index` (entry `index` has `term` and `timestamp_ms`),
/// as the state machine serialized it. The log up to `index` may be compacted away once a
/// snapshot is durable; a follower that needs entries no longer kept installs it instead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub index: u64,
    pub term: u64,
    pub timestamp_ms: u64,
    pub data: Bytes,
    /// The membership in effect at `index` (empty in snapshots from before membership
    /// changes, and taken before a joining member learnt any: it records nothing).
    pub membership: Membership,
}

/// Reads the durable log below the in-memory tail (entries a lagging follower still needs).
pub trait LogRead: Send {
    /// Entries `lo..hi`, at most `max_bytes` (at least one); `None` if storage failed.
    fn entries(&self, lo: u64, hi: u64, max_bytes: usize) -> Option<Vec<LogEntry>>;
}

/// One storage action. The runtime applies them in order: delete entries up to
/// `compact_through` (recording that index and its term as the log's start), delete entries
/// from `truncate_from` on, append `entries`, save `hard_state`, make it durable, then send
/// `after` and call [`RaftCore::persisted`] with `(id, last_index, last_term)` of the last
/// write of each group made durable together.
#[derive(Debug, Default)]
pub struct LogWrite {
    /// Issue order (from 1): `persisted` names the last write of a durable group by it.
    pub id: u64,
    /// `(index, term)`: entries up to `index` are in a durable snapshot; drop them.
    pub compact_through: Option<(u64, u64)>,
    pub truncate_from: Option<u64>,
    pub entries: Vec<LogEntry>,
    pub hard_state: Option<HardState>,
    /// Commit index known durable with this write (never above the log written so far).
    pub commit: u64,
    pub last_index: u64,
    pub last_term: u64,
    /// Messages that promise durability (votes, append acknowledgements).
    pub after: Vec<(NodeId, Message)>,
    /// The membership in effect from this index on, recorded beside the log: an installed
    /// snapshot's (membership entries in `entries` are recorded by their kind).
    pub membership: Option<(u64, Membership)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreRole {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// Everything the core asks of its shell since the last `take_ready`.
#[derive(Debug, Default)]
pub struct Ready {
    pub messages: Vec<(NodeId, Message)>,
    pub writes: Vec<LogWrite>,
    /// The commit index, if it advanced.
    pub commit: Option<u64>,
    /// Read requests `(id, index)` that may be served once applied ≥ index.
    pub reads_ready: Vec<(u64, u64)>,
    /// Read requests that cannot be served here (leadership lost).
    pub reads_failed: Vec<u64>,
    /// This node stopped being leader of `term` (pending proposals: outcome unknown).
    pub stepped_down: bool,
    pub became_leader: bool,
    /// A snapshot received from the leader: the shell makes it durable, restores the state
    /// machine from it, then calls [`RaftCore::installed`].
    pub install: Option<Snapshot>,
    /// What became of a membership change that was catching a new member up.
    pub membership: Option<ChangeOutcome>,
}

/// Why a proposal was refused (nothing was appended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposeRefused {
    NotLeader {
        leader: Option<NodeId>,
    },
    TermMismatch {
        expected: u64,
        current: u64,
    },
    /// The in-memory tail holds `max_unapplied_bytes` already: the disk or the state machine is
    /// behind the clients.
    Overloaded,
    /// Leadership is being handed to `to`: nothing new is appended until it takes over (or the
    /// hand-over is given up after an election timeout).
    Transferring {
        to: NodeId,
    },
}

/// Why a leadership transfer could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferRefused {
    NotLeader {
        leader: Option<NodeId>,
    },
    NotAMember,
    /// Leadership is already moving to `to`: one hand-over at a time, so two targets never
    /// campaign against each other.
    InProgress {
        to: NodeId,
    },
}

/// A leadership hand-over in progress (braft's `transfer_leadership_to`, etcd's `MsgTimeoutNow`).
#[derive(Clone, Copy, Debug)]
struct Transfer {
    to: NodeId,
    /// Given up at this time if `to` has not taken over: proposals are accepted again.
    deadline: u64,
    /// When `TimeoutNow` last went out: it is sent again a heartbeat later, in case it was lost.
    sent_at: Option<u64>,
}

/// A member being added: replicated to, but not counted, until it holds nearly the whole log
/// (braft's catch-up, etcd's learner); only then is the change appended, so a new member that
/// starts empty does not stall commits while it catches up.
#[derive(Clone, Debug)]
struct CatchUp {
    id: NodeId,
    next: Membership,
    /// Given up at this time if it has not caught up (down, or not at the address given).
    deadline: u64,
}

/// What became of a membership change a leader started (`Ready::membership`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// The change's entry was appended at this index (it is done once that commits).
    Appended(u64),
    /// The member being added did not catch up in time: nothing was appended.
    NotCaughtUp(NodeId),
}

/// How `RaftCore::change_membership` began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeStarted {
    Appended(u64),
    /// The member being added is caught up first; `Ready::membership` says what came of it.
    CatchingUp,
}

/// Election timeouts a member being added has to catch up.
const CATCH_UP_TIMEOUTS: u64 = 10;

/// Reports in a row of a last index below a follower's match that mean it lost its log.
const LOST_LOG_REPORTS: u8 = 3;

/// Terms no cluster reaches by elections: half the wire's range. A message may bring one in
/// only within `MAX_TERM_STEP` of the receiver's term, so a forged term cannot push a cluster
/// to the top of the range (where the next election's term would not decode), while elections
/// above it still go through: 2^41 forged steps stand between `MAX_TERM` and the top. This
/// limits what a forged message can do (a peer port without `--peer-secret-file`), it cannot
/// undo it: after a forged jump to `MAX_TERM` and an election, a member that was far behind
/// cannot follow any more.
pub const MAX_TERM: u64 = MAX_WIRE_NUMBER / 2;
const MAX_TERM_STEP: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProgressState {
    /// One probe in flight at a time while the match point is unknown.
    Probe,
    /// Match known: stream appends, up to `max_inflight` in flight.
    Replicate,
    /// The entries it needs were compacted: sending `Progress::snapshot`, one chunk in flight.
    Snapshot,
}

/// A snapshot on its way to one follower.
#[derive(Clone, Debug)]
struct Sending {
    snapshot: Snapshot,
    /// Bytes the follower confirmed it holds.
    acked: u64,
    sent_at: Option<u64>,
}

/// A snapshot being received, chunk by chunk.
#[derive(Debug)]
struct Receiving {
    /// The term of the leader sending it: one leader per term, one snapshot per leader and
    /// index, so chunks of two leaders' snapshots (which may differ) are never spliced.
    leader_term: u64,
    index: u64,
    term: u64,
    timestamp_ms: u64,
    total: u64,
    data: Vec<u8>,
    membership: Membership,
}

/// The leader's view of one follower (braft's Replicator state, etcd's Progress).
#[derive(Clone, Debug)]
struct Progress {
    next: u64,
    matched: u64,
    state: ProgressState,
    /// Last index of each append in flight, oldest first.
    inflight: VecDeque<u64>,
    probe_sent_at: Option<u64>,
    last_progress_at: u64,
    /// Heard from in the current check-quorum window.
    active: bool,
    /// When the follower last answered (`None`: not yet this term).
    heard_at: Option<u64>,
    /// Highest read-index round the follower has answered.
    seq_acked: u64,
    /// Reports in a row of a last index below `matched` (see `lost_log`).
    reported_less: u8,
    /// In `ProgressState::Snapshot`: the snapshot being sent.
    sending: Option<Sending>,
}

struct PendingRead {
    id: u64,
    seq: u64,
    index: u64,
}

pub struct RaftCore {
    cfg: CoreConfig,
    rng: SmallRng,
    now: u64,
    wall_ms: u64,

    role: CoreRole,
    term: u64,
    vote: NodeId,
    leader: Option<NodeId>,
    commit: u64,
    applied: u64,
    durable: u64,

    /// Terms of the log past `compacted` as runs `(first index, term)`: term lookups never
    /// touch storage.
    term_runs: Vec<(u64, u64)>,
    /// Entries up to `compacted` are gone from the log (the snapshot holds their effect);
    /// `compacted_term` is that entry's term.
    compacted: u64,
    compacted_term: u64,
    /// The latest durable snapshot: what a follower behind `compacted` is sent.
    snapshot: Option<Snapshot>,
    /// Follower: a snapshot arriving in chunks, then one handed to the shell to install.
    receiving: Option<Receiving>,
    installing: Option<Snapshot>,
    /// Memberships by the index they are in effect from, oldest first: the last one is in
    /// effect (`voters` are its ids); older ones are kept back to the one in effect at the
    /// compaction point, which a snapshot sent to a follower carries.
    memberships: Vec<(u64, Membership)>,
    voters: Vec<NodeId>,
    last_index: u64,
    /// In-memory tail: entries `mem_first..=last_index`; older ones are read through `storage`.
    mem: VecDeque<LogEntry>,
    mem_first: u64,
    /// Payload bytes in `mem`.
    mem_bytes: usize,
    storage: Box<dyn LogRead>,
    /// The highest timestamp in this node's log so far (kept when entries leave `mem`).
    last_timestamp: u64,
    /// Writes issued so far, and the id of the last one that truncated the log.
    writes_issued: u64,
    truncated_by: u64,

    election_deadline: u64,
    last_leader_contact: Option<u64>,
    votes: BTreeMap<NodeId, bool>,

    progress: BTreeMap<NodeId, Progress>,
    next_heartbeat: u64,
    next_quorum_check: u64,
    /// Index of this leader's no-op; reads wait until it commits.
    term_start_index: u64,
    read_seq: u64,
    reads: VecDeque<PendingRead>,
    transfer: Option<Transfer>,
    catch_up: Option<CatchUp>,

    needs_replicate: bool,
    ready: Ready,
}

impl RaftCore {
    /// Builds a core from durable state (the log is read through `storage` below the tail).
    pub fn new(
        cfg: CoreConfig,
        seed: u64,
        state: DurableState,
        storage: Box<dyn LogRead>,
        now: u64,
    ) -> RaftCore {
        let DurableState {
            hard,
            term_runs,
            tail,
            applied,
            compacted: (compacted, compacted_term),
            snapshot,
            memberships: recorded,
        } = state;
        let last_index = tail.last().map(|e| e.index).unwrap_or(applied);
        let mut memberships = vec![(0, Membership::of_ids(cfg.members.iter().copied()))];
        memberships.extend(recorded.into_iter().filter(|(i, _)| *i <= last_index));
        // The snapshot's membership supersedes the records up to it (which may be missing: a
        // crash before the log was cut behind an installed snapshot).
        if let Some(s) = snapshot.as_ref().filter(|s| !s.membership.is_empty()) {
            memberships.retain(|(i, _)| *i > s.index);
            memberships.insert(0, (s.index, s.membership.clone()));
        }
        let mem_bytes = tail.iter().map(|e| e.payload.len()).sum();
        let snapshot_ts = snapshot.as_ref().map_or(0, |s| s.timestamp_ms);
        let last_timestamp = match tail.last() {
            Some(e) => e.timestamp_ms,
            None if last_index <= compacted => snapshot_ts,
            None => storage
                .entries(last_index, last_index + 1, 1)
                .and_then(|v| v.last().map(|e| e.timestamp_ms))
                .unwrap_or_else(|| {
                    tracing::error!(last_index, "cannot read the last entry's timestamp");
                    0
                }),
        }
        .max(snapshot_ts);
        let mut core = RaftCore {
            rng: SmallRng::seed_from_u64(seed),
            now,
            wall_ms: 0,
            role: CoreRole::Follower,
            term: hard.term,
            vote: hard.vote,
            leader: None,
            commit: hard.commit.min(last_index),
            applied,
            durable: last_index,
            term_runs,
            compacted,
            compacted_term,
            snapshot,
            receiving: None,
            installing: None,
            memberships,
            voters: Vec::new(),
            last_index,
            mem_first: applied + 1,
            mem: tail.into(),
            mem_bytes,
            storage,
            last_timestamp,
            writes_issued: 0,
            truncated_by: 0,
            election_deadline: 0,
            last_leader_contact: None,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            next_heartbeat: 0,
            next_quorum_check: 0,
            term_start_index: 0,
            read_seq: 0,
            reads: VecDeque::new(),
            transfer: None,
            catch_up: None,
            needs_replicate: false,
            ready: Ready::default(),
            cfg,
        };
        core.refresh_voters();
        core.reset_election_deadline();
        // A lone member need not wait for anybody.
        if core.voters == [core.cfg.id] {
            core.election_deadline = now;
        }
        core
    }

    // ----- observers -----

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn role(&self) -> CoreRole {
        self.role
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn commit_index(&self) -> u64 {
        self.commit
    }
    pub fn last_index(&self) -> u64 {
        self.last_index
    }
    /// As leader, the index of this term's no-op (0 otherwise): until it commits, this
    /// leader's commit index may lag what an earlier leader committed.
    pub fn term_start_index(&self) -> u64 {
        if self.is_leader() {
            self.term_start_index
        } else {
            0
        }
    }
    pub fn durable_index(&self) -> u64 {
        self.durable
    }
    /// The members this node must reach: those in effect, and, on a leader catching a new
    /// member up, that one too (the index says which membership is in effect; the id, which
    /// member is being caught up).
    pub fn members_to_reach(&self) -> (u64, Option<NodeId>, &Membership) {
        match &self.catch_up {
            Some(c) => (self.membership().0, Some(c.id), &c.next),
            None => (self.membership().0, None, self.membership().1),
        }
    }

    /// The membership in effect at `index` (at or past the compaction point).
    pub fn membership_at(&self, index: u64) -> &Membership {
        let pos = self.memberships.partition_point(|(i, _)| *i <= index);
        &self.memberships[pos.saturating_sub(1)].1
    }

    /// The voting members in effect (the latest membership in the log).
    pub fn members(&self) -> &[NodeId] {
        &self.voters
    }
    /// The membership in effect, and the index of the entry that made it (0: the one the
    /// cluster started with).
    pub fn membership(&self) -> (u64, &Membership) {
        let (index, m) = self.memberships.last().expect("never empty");
        (*index, m)
    }
    /// The leader's match index for `peer` (its own durable index for itself).
    pub fn match_index(&self, peer: NodeId) -> u64 {
        if peer == self.cfg.id {
            return self.durable;
        }
        self.progress.get(&peer).map(|p| p.matched).unwrap_or(0)
    }
    pub fn is_leader(&self) -> bool {
        self.role == CoreRole::Leader
    }
    /// As leader, the member leadership is being handed to, if any.
    pub fn transferring_to(&self) -> Option<NodeId> {
        self.transfer.map(|t| t.to)
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
        }
    }

    /// The term of entry `index` (0 for index 0, beyond the log or compacted before the last
    /// compacted entry).
    pub fn term_at(&self, index: u64) -> u64 {
        if index == 0 || index > self.last_index || index < self.compacted {
            return 0;
        }
        if index == self.compacted {
            return self.compacted_term;
        }
        let pos = self.term_runs.partition_point(|&(start, _)| start <= index);
        if pos == 0 {
            0
        } else {
            self.term_runs[pos - 1].1
        }
    }

    /// The last entry compacted away (0: none); entries past it are in the log.
    pub fn compacted_index(&self) -> u64 {
        self.compacted
    }

    /// The index of the latest snapshot this node holds (0: none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }

    /// Entries `lo..=hi` from memory or storage (for the state-machine queue and tests).
    pub fn entries(&self, lo: u64, hi: u64) -> Option<Vec<LogEntry>> {
        self.slice(lo, hi + 1, usize::MAX)
    }

    // ----- inputs -----

    /// Advances time; drives elections, heartbeats, retries and check-quorum.
    pub fn tick(&mut self, now: u64, wall_ms: u64) {
        self.now = now.max(self.now);
        self.wall_ms = wall_ms.max(self.wall_ms);
        match self.role {
            CoreRole::Leader => {
                if self.now >= self.next_quorum_check {
                    self.check_quorum();
                    if self.role != CoreRole::Leader {
                        return;
                    }
                }
                if self.transfer.is_some_and(|t| self.now >= t.deadline) {
                    // The target did not take over (down, cut off, or too far behind): lead on.
                    self.transfer = None;
                }
                self.maybe_timeout_now();
                self.maybe_caught_up();
                if self.now >= self.next_heartbeat {
                    self.next_heartbeat = self.now + self.cfg.heartbeat_ms;
                    self.broadcast_heartbeat();
                }
                let peers: Vec<NodeId> = self.progress.keys().copied().collect();
                for p in peers {
                    self.retry_if_stuck(p);
                }
            }
            _ => {
                if self.now >= self.election_deadline {
                    if self.may_campaign() {
                        self.start_pre_vote();
                    } else {
                        // Not a member (yet, or any more): nothing to campaign for.
                        self.reset_election_deadline();
                    }
                }
            }
        }
    }

    /// Whether the tail's byte count matches its entries (the simulator checks it every step).
    #[doc(hidden)]
    pub fn tail_bytes_counted(&self) -> bool {
        self.mem_bytes == self.mem.iter().map(|e| e.payload.len()).sum::<usize>()
    }

    /// The state machine has applied everything up to `index`: the tail may be trimmed.
    pub fn set_applied(&mut self, index: u64) {
        self.applied = self.applied.max(index.min(self.commit));
        self.trim();
    }

    /// Storage made the log durable up to `(index, term)`, with write `id` the last of the
    /// group. A notice from before the latest truncation is ignored: the same (index, term) may
    /// have been truncated and appended again since, and not be durable yet.
    pub fn persisted(&mut self, id: u64, index: u64, term: u64) {
        if id < self.truncated_by || index <= self.durable || self.term_at(index) != term {
            return;
        }
        self.durable = index;
        if self.role == CoreRole::Leader {
            self.maybe_commit();
        }
        self.trim();
    }

    /// A snapshot of the applied state is durable: followers behind the log are sent it, and
    /// the log is compacted up to `keep` entries before it (fewer if not yet durable here),
    /// so a follower a little behind still catches up from the log.
    pub fn compact(&mut self, snapshot: Snapshot, keep: u64) {
        if snapshot.index <= self.snapshot_index() || snapshot.index > self.applied {
            return;
        }
        self.last_timestamp = self.last_timestamp.max(snapshot.timestamp_ms);
        let through = snapshot
            .index
            .saturating_sub(keep)
            .min(self.durable)
            .min(self.mem_first.saturating_sub(1));
        self.snapshot = Some(snapshot);
        if through > self.compacted {
            let term = self.term_at(through);
            self.forget_through(through, term);
            self.write_mut(false).compact_through = Some((through, term));
        }
    }

    /// The snapshot from [`Ready::install`] is durable and the state machine restored from it.
    /// The log keeps what follows the snapshot if it holds the snapshot's last entry, and is
    /// emptied otherwise; the leader hears of it once that is durable.
    pub fn installed(&mut self, index: u64) {
        let Some(snap) = self.installing.take_if(|s| s.index == index) else {
            return;
        };
        if index <= self.commit {
            // Not installed: the state machine had it all already.
            return;
        }
        let term = snap.term;
        self.last_timestamp = self.last_timestamp.max(snap.timestamp_ms);
        if index <= self.last_index && self.term_at(index) == term {
            self.forget_through(index, term);
            self.write_mut(false).compact_through = Some((index, term));
        } else {
            self.term_runs.clear();
            self.mem.clear();
            self.mem_bytes = 0;
            self.mem_first = index + 1;
            self.last_index = index;
            self.durable = self.durable.min(index);
            self.compacted = index;
            self.compacted_term = term;
            // A write of its own, like a truncation: notices from before it do not count.
            let w = self.write_mut(true);
            w.compact_through = Some((index, term));
            w.truncate_from = Some(index + 1);
            self.truncated_by = w.id;
        }
        // The membership at the snapshot's index: the entries that made it may be gone.
        let last_index = self.last_index;
        // A snapshot from before membership changes has none: the one in effect here stands.
        let membership = if snap.membership.is_empty() {
            self.membership_at(index).clone()
        } else {
            snap.membership.clone()
        };
        self.memberships
            .retain(|(i, _)| *i > index && *i <= last_index);
        self.memberships.insert(0, (index, membership.clone()));
        self.write_mut(false).membership = Some((index, membership));
        self.refresh_voters();
        self.applied = self.applied.max(index);
        self.snapshot = Some(snap);
        self.advance_commit(index);
        if let Some(leader) = self.leader {
            let resp = Message::AppendResp {
                term: self.term,
                success: true,
                index,
                last_index: self.last_index,
                seq: 0,
            };
            self.send_after_durable(leader, resp, index);
        }
    }

    /// Forgets entries up to `through` (still in memory only if not yet applied or durable:
    /// never, as callers compact below both).
    fn forget_through(&mut self, through: u64, term: u64) {
        let keep_from = self
            .term_runs
            .partition_point(|&(start, _)| start <= through + 1)
            .saturating_sub(1);
        self.term_runs.drain(..keep_from);
        while self.mem_first <= through
            && let Some(e) = self.mem.pop_front()
        {
            self.mem_bytes -= e.payload.len();
            self.mem_first += 1;
        }
        self.compacted = through;
        self.compacted_term = term;
        // Keep the membership in effect at the compaction point, and those after it.
        let keep_from = self
            .memberships
            .partition_point(|(i, _)| *i <= through)
            .saturating_sub(1);
        self.memberships.drain(..keep_from);
    }

    /// Appends user entries if this node leads `expected_term` (or any term). Returns the index
    /// of the first one and the term.
    pub fn propose<I: IntoIterator<Item = Bytes>>(
        &mut self,
        payloads: I,
        timestamp_ms: u64,
        expected_term: Option<u64>,
    ) -> Result<(u64, u64), ProposeRefused> {
        if self.role != CoreRole::Leader {
            return Err(ProposeRefused::NotLeader {
                leader: self.leader,
            });
        }
        if let Some(expected) = expected_term
            && expected != self.term
        {
            return Err(ProposeRefused::TermMismatch {
                expected,
                current: self.term,
            });
        }
        if let Some(t) = self.transfer {
            return Err(ProposeRefused::Transferring { to: t.to });
        }
        // Timestamps never go backwards along the log, whatever the leader's clock does.
        let ts = timestamp_ms.max(self.last_timestamp);
        let first = self.last_index + 1;
        let mut entries = Vec::new();
        let mut bytes = 0;
        for payload in payloads {
            bytes += payload.len();
            let index = self.last_index + 1 + entries.len() as u64;
            entries.push(LogEntry {
                index,
                term: self.term,
                timestamp_ms: ts,
                kind: EntryKind::Normal,
                payload,
            });
        }
        // An empty tail takes any batch, so one larger than the bound still goes through.
        if !self.mem.is_empty() && self.mem_bytes + bytes > self.cfg.max_unapplied_bytes {
            return Err(ProposeRefused::Overloaded);
        }
        self.append_local(entries);
        // Replicators are woken once per `take_ready`, so a burst of proposals shares appends.
        self.needs_replicate = true;
        Ok((first, self.term))
    }

    /// Appends a change to `next`, which adds or removes one member: in effect at once, done
    /// once the returned index commits. One change at a time, and only once this leader's
    /// first entry is committed (so a change of a previous term that this leader has not yet
    /// seen committed cannot overlap with it).
    pub fn change_membership(
        &mut self,
        next: Membership,
        timestamp_ms: u64,
    ) -> Result<ChangeStarted, ChangeRefused> {
        if self.role != CoreRole::Leader {
            return Err(ChangeRefused::NotLeader {
                leader: self.leader,
            });
        }
        if let Some(t) = self.transfer {
            return Err(ChangeRefused::Transferring { to: t.to });
        }
        let (made_at, current) = self.membership();
        if made_at > self.commit || self.commit < self.term_start_index || self.catch_up.is_some() {
            return Err(ChangeRefused::InProgress);
        }
        if !current.one_change_to(&next) {
            return Err(ChangeRefused::NotOneChange);
        }
        let added = next.ids().find(|&id| !current.contains(id));
        self.check_reachable(&next, added)?;
        if let Some(id) = added.filter(|&id| id != self.cfg.id) {
            let fresh = self.fresh_progress();
            self.progress.entry(id).or_insert(fresh);
            self.catch_up = Some(CatchUp {
                id,
                next,
                deadline: self.now + CATCH_UP_TIMEOUTS * self.cfg.election_timeout_ms.1,
            });
            self.send_append(id);
            self.maybe_caught_up();
            return Ok(ChangeStarted::CatchingUp);
        }
        Ok(ChangeStarted::Appended(
            self.append_membership(next, timestamp_ms),
        ))
    }

    /// Appends the change once the member being added holds all but the last batch of the
    /// log (its snapshot installed, if it needed one), or gives it up at the deadline.
    fn maybe_caught_up(&mut self) {
        let Some(c) = &self.catch_up else {
            return;
        };
        let margin = self.cfg.max_batch_entries as u64;
        let caught = self.progress.get(&c.id).is_some_and(|p| {
            p.state == ProgressState::Replicate && p.matched + margin >= self.last_index
        });
        if caught {
            let Some(c) = self.catch_up.take() else {
                return;
            };
            let index = self.append_membership(c.next, self.wall_ms);
            self.ready.membership = Some(ChangeOutcome::Appended(index));
        } else if self.now >= c.deadline {
            let id = c.id;
            self.catch_up = None;
            self.progress.remove(&id);
            self.ready.membership = Some(ChangeOutcome::NotCaughtUp(id));
        }
    }

    /// etcd's strict reconfiguration check: refuses a change after which fewer than a quorum
    /// of the new members would be reachable (answered within the longest election timeout;
    /// a member being added counts, as it is caught up before the change is appended).
    /// Without it, removing a live member while another is down could leave a group that
    /// commits nothing until the down one returns. Removing the unreachable ones passes.
    fn check_reachable(
        &self,
        next: &Membership,
        added: Option<NodeId>,
    ) -> Result<(), ChangeRefused> {
        let window = self.cfg.election_timeout_ms.1;
        let reachable = |id: NodeId| {
            id == self.cfg.id
                || Some(id) == added
                || self.progress.get(&id).is_some_and(|p| {
                    p.heard_at
                        .is_some_and(|t| self.now.saturating_sub(t) <= window)
                })
        };
        let unreachable: Vec<NodeId> = next.ids().filter(|&id| !reachable(id)).collect();
        let needed = next.len() / 2 + 1;
        let reachable = next.len() - unreachable.len();
        if reachable < needed {
            return Err(ChangeRefused::TooFewReachable {
                needed,
                reachable,
                unreachable,
            });
        }
        Ok(())
    }

    fn append_membership(&mut self, next: Membership, timestamp_ms: u64) -> u64 {
        let index = self.last_index + 1;
        let entry = LogEntry {
            index,
            term: self.term,
            timestamp_ms: timestamp_ms.max(self.last_timestamp),
            kind: EntryKind::Config,
            payload: next.encode(),
        };
        self.append_local(vec![entry]);
        self.needs_replicate = true;
        index
    }

    /// Starts a read-index round. The answer comes in `Ready::reads_ready` (or `reads_failed`).
    pub fn read_index(&mut self, id: u64) -> Result<(), ProposeRefused> {
        if self.role != CoreRole::Leader {
            return Err(ProposeRefused::NotLeader {
                leader: self.leader,
            });
        }
        self.read_seq += 1;
        // Until this term's no-op commits, the commit index may lag what earlier leaders
        // committed: serve at the no-op's index at least.
        let index = self.commit.max(self.term_start_index);
        self.reads.push_back(PendingRead {
            id,
            seq: self.read_seq,
            index,
        });
        if self.alone() {
            self.release_reads();
        } else {
            self.broadcast_heartbeat();
        }
        Ok(())
    }

    /// Starts handing leadership to `to`: proposals are refused from now on; once `to` holds
    /// the whole log and all of it is committed (so every proposal's outcome is known here),
    /// it is told to campaign at once (`TimeoutNow`), and its votes are granted even by
    /// members that still hear this leader. Given up after a maximum election timeout.
    /// Asking for the member already asked for changes nothing; for another one (this node
    /// included) while a hand-over is in progress is refused.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), TransferRefused> {
        if self.role != CoreRole::Leader {
            return Err(TransferRefused::NotLeader {
                leader: self.leader,
            });
        }
        if !self.is_voter(to) {
            return Err(TransferRefused::NotAMember);
        }
        match self.transfer {
            Some(t) if t.to == to => return Ok(()),
            Some(t) => return Err(TransferRefused::InProgress { to: t.to }),
            None if to == self.cfg.id => return Ok(()),
            None => {}
        }
        self.transfer = Some(Transfer {
            to,
            deadline: self.now + self.cfg.election_timeout_ms.1,
            sent_at: None,
        });
        self.send_append(to);
        self.maybe_timeout_now();
        Ok(())
    }

    /// Sends the transfer target `TimeoutNow` once it holds the whole log, committed, and
    /// again every heartbeat interval until it takes over (a lost one would otherwise cost the
    /// whole hand-over; an old-term one is dropped by a target that already campaigned).
    fn maybe_timeout_now(&mut self) {
        let Some(t) = self.transfer else {
            return;
        };
        let resend_due = t
            .sent_at
            .is_none_or(|at| self.now >= at + self.cfg.heartbeat_ms);
        if !resend_due || self.commit < self.last_index || self.match_index(t.to) < self.last_index
        {
            return;
        }
        self.ready
            .messages
            .push((t.to, Message::TimeoutNow { term: self.term }));
        self.transfer = Some(Transfer {
            sent_at: Some(self.now),
            ..t
        });
    }

    /// Whether a vote marked `transfer` from `from` is one this node's own hand-over asked for
    /// (a leader grants only those; a follower cannot tell, and trusts its peers).
    fn asked_to_campaign(&self, from: NodeId) -> bool {
        self.role != CoreRole::Leader
            || self
                .transfer
                .is_some_and(|t| t.to == from && t.sent_at.is_some())
    }

    /// Handles one message from `from`.
    pub fn step(&mut self, from: NodeId, msg: Message) {
        // Messages from non-members are taken: a member being added hears from its leader
        // before its log says it is a member, and a leader hears from it. Only votes count
        // members alone (`tally`).
        if from == self.cfg.id {
            return;
        }
        let mterm = msg.term();
        if mterm > MAX_TERM && mterm.saturating_sub(self.term) > MAX_TERM_STEP {
            // A forged or corrupt term: adopted, it could leave the next elections' terms
            // past what peers decode, and the cluster without a leader for good.
            return;
        }
        if mterm > self.term {
            match msg {
                Message::PreVote { .. } => {}
                Message::PreVoteResp { granted: true, .. } => {}
                Message::Vote { transfer, .. }
                    if self.in_lease() && !(transfer && self.asked_to_campaign(from)) =>
                {
                    // A current leader is alive: a disruptive candidate is ignored (unless that
                    // leader sent it to campaign).
                    return;
                }
                Message::Append { .. }
                | Message::Heartbeat { .. }
                | Message::InstallSnapshot { .. } => self.become_follower(mterm, Some(from)),
                _ => self.become_follower(mterm, None),
            }
        } else if mterm < self.term {
            match msg {
                // Tell a stale leader about the newer term so it steps down.
                Message::Append { .. }
                | Message::Heartbeat { .. }
                | Message::InstallSnapshot { .. } => {
                    let resp = Message::AppendResp {
                        term: self.term,
                        success: false,
                        index: 0,
                        last_index: self.last_index,
                        seq: 0,
                    };
                    self.ready.messages.push((from, resp));
                }
                Message::PreVote { .. } | Message::Vote { .. } => {
                    let granted = false;
                    let resp = if matches!(msg, Message::PreVote { .. }) {
                        Message::PreVoteResp {
                            term: self.term,
                            granted,
                        }
                    } else {
                        Message::VoteResp {
                            term: self.term,
                            granted,
                        }
                    };
                    self.ready.messages.push((from, resp));
                }
                _ => {}
            }
            return;
        }

        match msg {
            Message::PreVote {
                term,
                last_index,
                last_term,
            } => {
                let granted =
                    term > self.term && !self.in_lease() && self.log_ok(last_index, last_term);
                let term = if granted { term } else { self.term };
                self.ready
                    .messages
                    .push((from, Message::PreVoteResp { term, granted }));
            }
            Message::Vote {
                term,
                last_index,
                last_term,
                ..
            } => {
                let free = self.vote == 0 || self.vote == from;
                let granted = term == self.term && free && self.log_ok(last_index, last_term);
                if granted {
                    self.vote = from;
                    self.reset_election_deadline();
                    // The vote must be durable before the candidate may count it.
                    let hs = self.hard_state();
                    self.write_mut(false).hard_state = Some(hs);
                    self.send_after_durable(
                        from,
                        Message::VoteResp {
                            term: self.term,
                            granted,
                        },
                        u64::MAX,
                    );
                } else {
                    self.ready.messages.push((
                        from,
                        Message::VoteResp {
                            term: self.term,
                            granted,
                        },
                    ));
                }
            }
            Message::PreVoteResp { granted, term } => {
                // Grants carry the proposed term; refusals carry the voter's (possibly ours).
                if self.role == CoreRole::PreCandidate
                    && (!granted || term == self.term + 1)
                    && self.is_voter(from)
                {
                    self.votes.insert(from, granted);
                    self.tally(true);
                }
            }
            Message::VoteResp { granted, .. } => {
                if self.role == CoreRole::Candidate && self.is_voter(from) {
                    self.votes.insert(from, granted);
                    self.tally(false);
                }
            }
            Message::Append {
                prev_index,
                prev_term,
                commit,
                seq,
                entries,
                ..
            } => {
                self.heard_from_leader(from);
                self.handle_append(from, prev_index, prev_term, commit, seq, entries);
            }
            Message::Heartbeat { commit, seq, .. } => {
                self.heard_from_leader(from);
                // The leader sends min(its commit, our match): entries up to it match its log.
                if self.installing.is_none() {
                    self.advance_commit(commit.min(self.last_index));
                }
                self.ready.messages.push((
                    from,
                    Message::HeartbeatResp {
                        term: self.term,
                        seq,
                        last_index: self.last_index,
                    },
                ));
            }
            Message::AppendResp {
                success,
                index,
                last_index,
                seq,
                ..
            } => {
                if self.role == CoreRole::Leader {
                    self.handle_append_resp(from, success, index, last_index, seq);
                }
            }
            Message::InstallSnapshot {
                index,
                last_term,
                timestamp_ms,
                offset,
                total,
                data,
                membership,
                ..
            } => {
                self.heard_from_leader(from);
                let Ok(membership) = Membership::decode(&membership) else {
                    tracing::warn!(from, index, "dropping a snapshot chunk: bad membership");
                    return;
                };
                let snapshot = Snapshot {
                    index,
                    term: last_term,
                    timestamp_ms,
                    data,
                    membership,
                };
                self.handle_snapshot(from, snapshot, offset, total);
            }
            Message::SnapshotResp {
                index, received, ..
            } => {
                if self.role == CoreRole::Leader {
                    self.handle_snapshot_resp(from, index, received);
                }
            }
            Message::TimeoutNow { .. } => {
                // Our leader hands over: campaign now. (An election is always safe; one from a
                // hand-over given up meanwhile only costs a term, and the leader refuses it.)
                if self.role == CoreRole::Follower
                    && self.leader == Some(from)
                    && self.may_campaign()
                {
                    self.start_election(true);
                }
            }
            Message::HeartbeatResp {
                seq, last_index, ..
            } => {
                if self.role == CoreRole::Leader {
                    self.ack_seq(from, seq);
                    if self.lost_log(from, last_index) {
                        return;
                    }
                    if let Some(p) = self.progress.get(&from)
                        && p.matched < self.last_index
                    {
                        self.send_append(from);
                    }
                }
            }
        }
    }

    /// Drains what the shell must do.
    pub fn take_ready(&mut self) -> Ready {
        if std::mem::take(&mut self.needs_replicate) && self.role == CoreRole::Leader {
            self.replicate_all();
            if self.alone() {
                self.maybe_commit();
            }
        }
        std::mem::take(&mut self.ready)
    }

    pub fn has_ready(&self) -> bool {
        let r = &self.ready;
        self.needs_replicate
            || !r.messages.is_empty()
            || !r.writes.is_empty()
            || r.commit.is_some()
            || !r.reads_ready.is_empty()
            || !r.reads_failed.is_empty()
            || r.stepped_down
            || r.became_leader
            || r.install.is_some()
            || r.membership.is_some()
    }

    // ----- elections -----

    fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    /// The leader's view of the other members (not of a member being caught up).
    fn voting_progress(&self) -> impl Iterator<Item = &Progress> {
        self.progress
            .iter()
            .filter(|(id, _)| self.voters.contains(id))
            .map(|(_, p)| p)
    }

    /// Whether no other member's answer is needed (a lone member).
    fn alone(&self) -> bool {
        self.voting_progress().next().is_none()
    }

    /// A member campaigns; so does a node whose own removal is in its log but not committed
    /// (a leader that removed itself and lost leadership before the removal committed): it
    /// may hold entries no member has, which the members' votes need it to pass on. Its votes
    /// are counted among the members as anybody's are.
    fn may_campaign(&self) -> bool {
        if self.is_voter(self.cfg.id) {
            return true;
        }
        let (made_at, _) = self.membership();
        let before = self.memberships.len().checked_sub(2);
        made_at > self.commit && before.is_some_and(|k| self.memberships[k].1.contains(self.cfg.id))
    }

    /// Takes the latest membership into effect; a leader starts or stops replicating to the
    /// members it adds or removes.
    fn refresh_voters(&mut self) {
        self.voters = self.membership().1.ids().collect();
        if self.role != CoreRole::Leader {
            // A campaign's votes count among the members in effect: grants from members just
            // removed (a snapshot installed mid-campaign, say) must not make a quorum.
            let voters = &self.voters;
            self.votes.retain(|id, _| voters.contains(id));
            return;
        }
        let voters = std::mem::take(&mut self.voters);
        let learner = self.catch_up.as_ref().map(|c| c.id);
        // A member being removed is still replicated to, uncounted, until its removal
        // commits: so it learns it was removed (see `forget_removed`).
        let committed: Vec<NodeId> = self.membership_at(self.commit).ids().collect();
        self.progress
            .retain(|id, _| voters.contains(id) || Some(*id) == learner || committed.contains(id));
        for &p in &voters {
            if p != self.cfg.id && !self.progress.contains_key(&p) {
                let fresh = self.fresh_progress();
                self.progress.insert(p, fresh);
            }
        }
        self.voters = voters;
    }

    fn fresh_progress(&self) -> Progress {
        Progress {
            next: self.last_index + 1,
            matched: 0,
            state: ProgressState::Probe,
            inflight: VecDeque::new(),
            probe_sent_at: None,
            last_progress_at: self.now,
            // Earned by answering: a leader nobody hears steps down at the first check-quorum.
            active: false,
            heard_at: None,
            seq_acked: 0,
            reported_less: 0,
            sending: None,
        }
    }

    fn reset_election_deadline(&mut self) {
        let (lo, hi) = self.cfg.election_timeout_ms;
        self.election_deadline = self.now + self.rng.gen_range(lo..=hi.max(lo));
    }

    /// Within a minimum election timeout of hearing from a leader (leader stickiness).
    fn in_lease(&self) -> bool {
        if self.role == CoreRole::Leader {
            return true;
        }
        match self.last_leader_contact {
            Some(t) => self.leader.is_some() && self.now < t + self.cfg.election_timeout_ms.0,
            None => false,
        }
    }

    fn log_ok(&self, last_index: u64, last_term: u64) -> bool {
        let my_term = self.term_at(self.last_index);
        last_term > my_term || (last_term == my_term && last_index >= self.last_index)
    }

    fn heard_from_leader(&mut self, from: NodeId) {
        if self.role != CoreRole::Follower {
            self.become_follower(self.term, Some(from));
        }
        self.leader = Some(from);
        self.last_leader_contact = Some(self.now);
        self.reset_election_deadline();
    }

    fn start_pre_vote(&mut self) {
        self.role = CoreRole::PreCandidate;
        self.leader = None;
        self.votes.clear();
        if self.is_voter(self.cfg.id) {
            self.votes.insert(self.cfg.id, true);
        }
        self.reset_election_deadline();
        let (last_index, last_term) = (self.last_index, self.term_at(self.last_index));
        for &p in &self.voters {
            if p != self.cfg.id {
                let m = Message::PreVote {
                    term: self.term + 1,
                    last_index,
                    last_term,
                };
                self.ready.messages.push((p, m));
            }
        }
        self.tally(true);
    }

    /// `transfer`: asked to by the leader (`TimeoutNow`), which pre-votes would refuse while
    /// it is alive; the votes say so.
    fn start_election(&mut self, transfer: bool) {
        self.role = CoreRole::Candidate;
        self.term += 1;
        self.vote = self.cfg.id;
        self.leader = None;
        self.votes.clear();
        if self.is_voter(self.cfg.id) {
            self.votes.insert(self.cfg.id, true);
        }
        self.reset_election_deadline();
        let hs = self.hard_state();
        self.write_mut(false).hard_state = Some(hs);
        let (last_index, last_term) = (self.last_index, self.term_at(self.last_index));
        let peers: Vec<NodeId> = self
            .voters
            .iter()
            .copied()
            .filter(|&p| p != self.cfg.id)
            .collect();
        for p in peers {
            // Our own vote must be durable before anybody else's can make us leader.
            let m = Message::Vote {
                term: self.term,
                last_index,
                last_term,
                transfer,
            };
            self.send_after_durable(p, m, u64::MAX);
        }
        self.tally(false);
    }

    fn tally(&mut self, pre: bool) {
        let granted = self.votes.values().filter(|&&g| g).count();
        let rejected = self.votes.values().filter(|&&g| !g).count();
        if granted >= self.quorum() {
            if pre {
                self.start_election(false);
            } else {
                // Our own vote is in the write queued ahead of everything the leader does, so
                // nothing commits before it is durable (FIFO storage).
                self.become_leader();
            }
        } else if rejected >= self.quorum() {
            self.become_follower(self.term, None);
        }
    }

    fn become_follower(&mut self, term: u64, leader: Option<NodeId>) {
        let was_leader = self.role == CoreRole::Leader;
        if was_leader && term > self.term {
            tracing::info!(term, "a newer term: stepping down");
        }
        if term > self.term {
            self.term = term;
            self.vote = 0;
            let hs = self.hard_state();
            self.write_mut(false).hard_state = Some(hs);
        }
        self.role = CoreRole::Follower;
        self.leader = leader;
        self.votes.clear();
        self.transfer = None;
        self.catch_up = None;
        if was_leader {
            self.progress.clear();
            self.ready.stepped_down = true;
            for r in self.reads.drain(..) {
                self.ready.reads_failed.push(r.id);
            }
        }
        self.reset_election_deadline();
    }

    fn become_leader(&mut self) {
        self.role = CoreRole::Leader;
        self.leader = Some(self.cfg.id);
        self.ready.became_leader = true;
        self.transfer = None;
        self.catch_up = None;
        self.progress.clear();
        self.refresh_voters();
        self.next_quorum_check = self.now + self.cfg.election_timeout_ms.0;
        self.next_heartbeat = self.now + self.cfg.heartbeat_ms;
        // The term's first entry. In a log with no membership entry yet it records the
        // members the cluster started with, so a member added later learns them from the log.
        let (made_at, membership) = self.membership();
        let (kind, payload) = if made_at == 0 && !membership.is_empty() {
            (EntryKind::Config, membership.encode())
        } else {
            (EntryKind::Noop, Bytes::new())
        };
        let noop = LogEntry {
            index: self.last_index + 1,
            term: self.term,
            timestamp_ms: self.wall_ms.max(self.last_timestamp),
            kind,
            payload,
        };
        self.term_start_index = noop.index;
        self.append_local(vec![noop]);
        self.replicate_all();
        self.maybe_commit();
    }

    fn check_quorum(&mut self) {
        self.next_quorum_check = self.now + self.cfg.election_timeout_ms.0;
        let me = usize::from(self.is_voter(self.cfg.id));
        let active = me + self.voting_progress().filter(|p| p.active).count();
        for p in self.progress.values_mut() {
            p.active = false;
        }
        if active < self.quorum() {
            tracing::warn!(
                term = self.term,
                active,
                "too few members heard from in an election timeout: stepping down"
            );
            self.become_follower(self.term, None);
        }
    }

    // ----- the log -----

    /// The pending storage write to add to (a new one if `fresh` or none is pending).
    fn write_mut(&mut self, fresh: bool) -> &mut LogWrite {
        if fresh || self.ready.writes.is_empty() {
            self.writes_issued += 1;
            self.ready.writes.push(LogWrite {
                id: self.writes_issued,
                ..LogWrite::default()
            });
        }
        let (last_index, last_term, commit) =
            (self.last_index, self.term_at(self.last_index), self.commit);
        let w = self
            .ready
            .writes
            .last_mut()
            .expect("just ensured non-empty");
        w.last_index = last_index;
        w.last_term = last_term;
        w.commit = commit.min(last_index);
        w
    }

    /// Sends `msg` at once if the log is durable up to `needs`, else once the pending write is.
    fn send_after_durable(&mut self, to: NodeId, msg: Message, needs: u64) {
        if needs <= self.durable || (self.cfg.unsafe_ack_before_durable && needs != u64::MAX) {
            self.ready.messages.push((to, msg));
        } else {
            self.write_mut(false).after.push((to, msg));
        }
    }

    /// Appends entries that extend the log (indexes already assigned, contiguous).
    fn append_local(&mut self, entries: Vec<LogEntry>) {
        let Some(first) = entries.first() else { return };
        debug_assert_eq!(first.index, self.last_index + 1);
        let mut reconfigured = false;
        for e in &entries {
            if self.term_runs.last().map(|&(_, t)| t) != Some(e.term) {
                self.term_runs.push((e.index, e.term));
            }
            // In effect as soon as it is in the log (appends check that it decodes).
            if e.kind == EntryKind::Config
                && let Ok(m) = Membership::decode(&e.payload)
            {
                self.memberships.push((e.index, m));
                reconfigured = true;
            }
        }
        if let Some(last) = entries.last() {
            self.last_index = last.index;
            self.last_timestamp = self.last_timestamp.max(last.timestamp_ms);
        }
        if self.mem.is_empty() {
            self.mem_first = first.index;
        }
        self.mem_bytes += entries.iter().map(|e| e.payload.len()).sum::<usize>();
        self.mem.extend(entries.iter().cloned());
        let w = self.write_mut(false);
        w.entries.extend(entries);
        if reconfigured {
            self.refresh_voters();
        }
    }

    /// Deletes entries from `from` on (a conflict with the leader's log).
    fn truncate(&mut self, from: u64) {
        assert!(
            from > self.commit,
            "truncating committed entry {from} (commit {})",
            self.commit
        );
        let keep = self.term_runs.partition_point(|&(start, _)| start < from);
        self.term_runs.truncate(keep);
        self.last_index = from - 1;
        if from >= self.mem_first {
            self.mem.truncate((from - self.mem_first) as usize);
        } else {
            self.mem.clear();
            self.mem_first = from;
        }
        self.mem_bytes = self.mem.iter().map(|e| e.payload.len()).sum();
        self.durable = self.durable.min(from - 1);
        // A membership change truncated away is undone.
        let before = self.memberships.len();
        self.memberships.retain(|(i, _)| *i < from);
        if self.memberships.len() != before {
            self.refresh_voters();
        }
        // A write of its own: acknowledgements queued before must not be mixed into it.
        let w = self.write_mut(true);
        w.truncate_from = Some(from);
        self.truncated_by = w.id;
    }

    /// Frees the in-memory tail up to min(durable, applied).
    fn trim(&mut self) {
        let upto = self.durable.min(self.applied);
        while self.mem_first <= upto
            && let Some(e) = self.mem.pop_front()
        {
            self.mem_bytes -= e.payload.len();
            self.mem_first += 1;
        }
    }

    /// Entries `lo..hi` bounded by `max_bytes` (at least one), from memory or storage.
    fn slice(&self, lo: u64, hi: u64, max_bytes: usize) -> Option<Vec<LogEntry>> {
        let hi = hi.min(self.last_index + 1);
        if lo >= hi {
            return Some(Vec::new());
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut i = lo;
        if i < self.mem_first {
            let stored = self.storage.entries(i, hi.min(self.mem_first), max_bytes)?;
            for e in stored {
                bytes += e.size();
                i = e.index + 1;
                out.push(e);
            }
            if i < self.mem_first || bytes >= max_bytes {
                return Some(out);
            }
        }
        while i < hi {
            let e = &self.mem[(i - self.mem_first) as usize];
            if !out.is_empty() && bytes + e.size() > max_bytes {
                break;
            }
            bytes += e.size();
            out.push(e.clone());
            i += 1;
        }
        Some(out)
    }

    fn advance_commit(&mut self, to: u64) {
        if to > self.commit {
            let (made_at, _) = self.membership();
            if made_at > self.commit && made_at <= to && !self.is_voter(self.cfg.id) {
                let was = self.memberships.len().checked_sub(2);
                if was.is_some_and(|k| self.memberships[k].1.contains(self.cfg.id)) {
                    tracing::warn!(
                        id = self.cfg.id,
                        index = made_at,
                        "this node was removed from the members: it takes no part in the \
                         cluster any more and can be stopped"
                    );
                }
            }
            self.commit = to;
            self.ready.commit = Some(to);
            let last = self.last_index;
            if let Some(w) = self.ready.writes.last_mut() {
                w.commit = to.min(last);
            }
        }
    }

    // ----- follower side -----

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: u64,
        prev_term: u64,
        commit: u64,
        seq: u64,
        entries: Vec<LogEntry>,
    ) {
        let reject = |core: &mut RaftCore| {
            let m = Message::AppendResp {
                term: core.term,
                success: false,
                index: prev_index,
                last_index: core.match_hint(prev_index),
                seq,
            };
            core.ready.messages.push((from, m));
        };
        // A well-formed append carries consecutive entries after `prev_index`, in terms that
        // never decrease nor exceed the leader's; anything else is dropped, not trusted.
        let well_formed = entries.iter().enumerate().all(|(k, e)| {
            (e.kind != EntryKind::Config || Membership::decode(&e.payload).is_ok())
                && e.index == prev_index + 1 + k as u64
                && e.term <= self.term
                && e.term
                    >= if k == 0 {
                        prev_term
                    } else {
                        entries[k - 1].term
                    }
        });
        if !well_formed {
            tracing::warn!(from, prev_index, "dropping a malformed append");
            return;
        }
        // A snapshot being installed replaces the log: the leader resends after it.
        if self.installing.is_some() {
            return;
        }
        // A follower whose machine lags behind its commit takes no more entries while its tail
        // holds `max_unapplied_bytes` (the leader bounds only its own): dropped unanswered, the
        // append is sent again later, as if lost. Otherwise a slow machine (say, under a flood
        // of local queries) would let the tail, and the state-machine queue sharing its
        // payloads, grow without bound. Only while something committed is unapplied, which the
        // machine works off by itself: a tail full of a deposed leader's entries still truncates.
        if !entries.is_empty()
            && self.mem_bytes >= self.cfg.max_unapplied_bytes
            && self.applied < self.commit
        {
            return;
        }
        if prev_index > self.last_index || self.term_at(prev_index) != prev_term {
            // Below our commit the entries are known to match: the leader just lags behind.
            if prev_index >= self.commit {
                reject(self);
                return;
            }
        }
        let last_new = prev_index + entries.len() as u64;
        // Skip what we already have; truncate at the first conflict; append the rest.
        let mut to_append = Vec::new();
        for e in entries {
            if e.index <= self.commit {
                continue;
            }
            if to_append.is_empty() && e.index <= self.last_index {
                if self.term_at(e.index) == e.term {
                    continue;
                }
                self.truncate(e.index);
            }
            to_append.push(e);
        }
        if !to_append.is_empty() {
            self.append_local(to_append);
        }
        self.advance_commit(commit.min(last_new));
        let resp = Message::AppendResp {
            term: self.term,
            success: true,
            index: last_new,
            last_index: self.last_index,
            seq,
        };
        self.send_after_durable(from, resp, last_new);
    }

    /// One chunk of the leader's snapshot. Chunks are taken in order only; anything else is
    /// answered with what is held, so the leader resends from there.
    fn handle_snapshot(&mut self, from: NodeId, chunk: Snapshot, offset: u64, total: u64) {
        let index = chunk.index;
        if index <= self.commit {
            // Everything it holds is committed here already: the leader may go on from our
            // commit, once that much of our log is durable.
            let resp = Message::AppendResp {
                term: self.term,
                success: true,
                index: self.commit,
                last_index: self.last_index,
                seq: 0,
            };
            self.send_after_durable(from, resp, self.commit);
            return;
        }
        if let Some(s) = &self.installing {
            // One install at a time. The leader waits for its answer (sending this one) or
            // resends later (another one, from a new leader): no answer keeps it waiting.
            if s.index == index {
                self.snapshot_resp(from, index, total);
            }
            return;
        }
        let fits = offset
            .checked_add(chunk.data.len() as u64)
            .is_some_and(|end| end <= total);
        let key = (self.term, index, chunk.term, total);
        let held = match &self.receiving {
            Some(r) if (r.leader_term, r.index, r.term, r.total) == key => {
                Some(r.data.len() as u64)
            }
            _ => None,
        };
        let continues = held == Some(offset);
        if !fits || !(continues || offset == 0) {
            self.snapshot_resp(from, index, held.unwrap_or(0));
            return;
        }
        if !continues {
            self.receiving = Some(Receiving {
                leader_term: self.term,
                index,
                term: chunk.term,
                timestamp_ms: chunk.timestamp_ms,
                total,
                data: Vec::new(),
                membership: chunk.membership,
            });
        }
        let Some(r) = self.receiving.as_mut() else {
            return;
        };
        r.data.extend_from_slice(&chunk.data);
        let received = r.data.len() as u64;
        if received == total
            && let Some(r) = self.receiving.take()
        {
            let snapshot = Snapshot {
                index: r.index,
                term: r.term,
                timestamp_ms: r.timestamp_ms,
                data: Bytes::from(r.data),
                membership: r.membership,
            };
            self.installing = Some(snapshot.clone());
            self.ready.install = Some(snapshot);
        }
        self.snapshot_resp(from, index, received);
    }

    fn snapshot_resp(&mut self, to: NodeId, index: u64, received: u64) {
        let resp = Message::SnapshotResp {
            term: self.term,
            index,
            received,
        };
        self.ready.messages.push((to, resp));
    }

    /// Where a leader whose append at `prev_index` this log rejects should probe next: its
    /// last index when shorter, else the entry before the term run holding `prev_index` (the
    /// leader has another term there, so that run is suspect from its start; the logs may
    /// still match partway into it, which costs only resending entries), never below commit. The leader skips a whole run per round trip
    /// instead of one index, so a long divergent suffix costs one probe, not one per entry.
    fn match_hint(&self, prev_index: u64) -> u64 {
        if prev_index > self.last_index {
            return self.last_index;
        }
        let pos = self
            .term_runs
            .partition_point(|&(start, _)| start <= prev_index);
        let run_start = pos.checked_sub(1).map(|p| self.term_runs[p].0).unwrap_or(1);
        run_start.saturating_sub(1).max(self.commit)
    }

    // ----- leader side -----

    fn replicate_all(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for p in peers {
            self.send_append(p);
        }
    }

    fn broadcast_heartbeat(&mut self) {
        let peers: Vec<(NodeId, u64)> = self
            .progress
            .iter()
            .map(|(&p, pr)| (p, pr.matched))
            .collect();
        for (p, matched) in peers {
            let m = Message::Heartbeat {
                term: self.term,
                commit: self.commit.min(matched),
                seq: self.read_seq,
            };
            self.ready.messages.push((p, m));
        }
    }

    /// Sends what `peer` can take now: one probe, or appends up to the in-flight bound.
    fn send_append(&mut self, peer: NodeId) {
        loop {
            let Some(p) = self.progress.get(&peer) else {
                return;
            };
            match p.state {
                ProgressState::Probe => {
                    if let Some(at) = p.probe_sent_at
                        && self.now < at + self.cfg.heartbeat_ms
                    {
                        return;
                    }
                }
                ProgressState::Replicate => {
                    if p.inflight.len() >= self.cfg.max_inflight || p.next > self.last_index {
                        return;
                    }
                }
                ProgressState::Snapshot => {
                    self.send_snapshot_chunk(peer);
                    return;
                }
            }
            if p.next <= self.compacted {
                self.start_snapshot(peer);
                return;
            }
            let next = p.next;
            let hi = next.saturating_add(self.cfg.max_batch_entries as u64);
            let Some(entries) = self.slice(next, hi, self.cfg.max_batch_bytes) else {
                tracing::error!(peer, next, "log read failed; will retry");
                return;
            };
            if entries.is_empty() && p.state == ProgressState::Replicate {
                return;
            }
            let last = next + entries.len() as u64 - 1;
            let prev_index = next - 1;
            let msg = Message::Append {
                term: self.term,
                prev_index,
                prev_term: self.term_at(prev_index),
                commit: self.commit,
                seq: self.read_seq,
                entries,
            };
            self.ready.messages.push((peer, msg));
            let now = self.now;
            let Some(p) = self.progress.get_mut(&peer) else {
                return;
            };
            match p.state {
                ProgressState::Probe => {
                    p.probe_sent_at = Some(now);
                    return;
                }
                ProgressState::Replicate => {
                    // Unanswered time counts from the oldest append in flight, not from the
                    // last answer before an idle spell.
                    if p.inflight.is_empty() {
                        p.last_progress_at = now;
                    }
                    p.inflight.push_back(last);
                    p.next = last + 1;
                }
                ProgressState::Snapshot => return,
            }
        }
    }

    /// `peer` needs entries compacted away: it is sent the latest snapshot instead.
    fn start_snapshot(&mut self, peer: NodeId) {
        let Some(snapshot) = self.snapshot.clone() else {
            tracing::error!(peer, "entries compacted without a snapshot to send");
            return;
        };
        let Some(p) = self.progress.get_mut(&peer) else {
            return;
        };
        tracing::info!(peer, index = snapshot.index, "sending a snapshot");
        p.state = ProgressState::Snapshot;
        p.inflight.clear();
        p.probe_sent_at = None;
        p.sending = Some(Sending {
            snapshot,
            acked: 0,
            sent_at: None,
        });
        self.send_snapshot_chunk(peer);
    }

    /// Sends the chunk after what `peer` confirmed, unless one is in flight (resent after two
    /// heartbeats unanswered).
    fn send_snapshot_chunk(&mut self, peer: NodeId) {
        let (now, term, chunk) = (self.now, self.term, self.cfg.snapshot_chunk_bytes.max(1));
        let latest = self.snapshot.as_ref();
        let Some(sending) = self
            .progress
            .get_mut(&peer)
            .and_then(|p| p.sending.as_mut())
        else {
            return;
        };
        // Nothing of it received yet (a follower down all along): a newer snapshot, taken
        // since, spares it entries, or a second snapshot once this one is installed.
        if sending.acked == 0
            && let Some(latest) = latest.filter(|l| l.index > sending.snapshot.index)
        {
            sending.snapshot = latest.clone();
        }
        if sending
            .sent_at
            .is_some_and(|at| now < at + 2 * self.cfg.heartbeat_ms)
        {
            return;
        }
        let snap = &sending.snapshot;
        let total = snap.data.len() as u64;
        // All of it confirmed: an empty chunk at the end asks whether it is installed (the
        // answer is an `AppendResp` once it is, or where to start again if it was lost).
        let offset = sending.acked.min(total);
        let end = (offset + chunk as u64).min(total);
        let msg = Message::InstallSnapshot {
            term,
            index: snap.index,
            last_term: snap.term,
            timestamp_ms: snap.timestamp_ms,
            offset,
            total,
            data: snap.data.slice(offset as usize..end as usize),
            membership: snap.membership.encode(),
        };
        sending.sent_at = Some(now);
        self.ready.messages.push((peer, msg));
    }

    fn handle_snapshot_resp(&mut self, from: NodeId, index: u64, received: u64) {
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.active = true;
        p.heard_at = Some(self.now);
        let Some(s) = p.sending.as_mut().filter(|s| s.snapshot.index == index) else {
            return;
        };
        // Only an answer that moves the follower on sends the next chunk: a duplicate or late
        // one, or the whole being installed, leaves the resend to the timer, so no chain of
        // chunks and answers runs on by itself.
        let total = s.snapshot.data.len() as u64;
        let received = received.min(total);
        if received == s.acked {
            return;
        }
        p.last_progress_at = self.now;
        s.acked = received;
        s.sent_at = None;
        if received < total {
            self.send_snapshot_chunk(from);
        }
    }

    fn handle_append_resp(
        &mut self,
        from: NodeId,
        success: bool,
        index: u64,
        last_index: u64,
        seq: u64,
    ) {
        self.ack_seq(from, seq);
        let now = self.now;
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        if success {
            if index > self.last_index {
                return; // not an answer to anything this leader sent
            }
            if index > p.matched {
                p.matched = index;
                p.last_progress_at = now;
            }
            while p.inflight.front().is_some_and(|&l| l <= p.matched) {
                p.inflight.pop_front();
            }
            let installed = p
                .sending
                .as_ref()
                .is_some_and(|s| p.matched >= s.snapshot.index);
            if p.state == ProgressState::Probe || (p.state == ProgressState::Snapshot && installed)
            {
                p.state = ProgressState::Replicate;
                p.next = p.matched + 1;
                p.inflight.clear();
                p.probe_sent_at = None;
                p.sending = None;
            }
            p.next = p.next.max(p.matched + 1);
            self.maybe_commit();
            if self.role != CoreRole::Leader {
                return;
            }
            self.maybe_caught_up();
        } else {
            if index <= p.matched {
                self.lost_log(from, last_index);
                return; // stale rejection
            }
            if p.state == ProgressState::Probe && index + 1 != p.next
                || p.state == ProgressState::Snapshot
            {
                return; // answer to an older probe or append
            }
            p.state = ProgressState::Probe;
            p.inflight.clear();
            p.probe_sent_at = None;
            p.next = index.min(last_index + 1).max(p.matched + 1);
        }
        self.send_append(from);
    }

    /// Whether `peer`, reporting `last_index` below its match, has lost its log. A stale
    /// report (delayed past later successes) is a one-off; a follower that keeps reporting
    /// less than it acknowledged as durable lost it (a wiped data directory, outside what Raft
    /// tolerates). It is started over from what it has, so it catches up instead of being
    /// probed at its old match, or sent nothing, forever.
    fn lost_log(&mut self, peer: NodeId, last_index: u64) -> bool {
        let Some(p) = self.progress.get_mut(&peer) else {
            return false;
        };
        if last_index >= p.matched {
            p.reported_less = 0;
            return false;
        }
        p.reported_less = p.reported_less.saturating_add(1);
        if p.reported_less < LOST_LOG_REPORTS {
            return false;
        }
        tracing::error!(
            follower = peer,
            matched = p.matched,
            last_index,
            "the follower lost entries it had acknowledged as durable (was its data directory \
             wiped?); replicating them again"
        );
        p.reported_less = 0;
        // Nothing it reports is checked yet: its match starts over from 0 (so heartbeats
        // commit nothing on it), and the next probe checks its log from `last_index` down.
        p.matched = 0;
        p.sending = None;
        p.state = ProgressState::Probe;
        p.inflight.clear();
        p.probe_sent_at = None;
        p.next = last_index + 1;
        self.send_append(peer);
        true
    }

    /// Resets a follower whose appends went unanswered (lost messages) to probing.
    fn retry_if_stuck(&mut self, peer: NodeId) {
        let retry_after = 2 * self.cfg.heartbeat_ms;
        let now = self.now;
        let Some(p) = self.progress.get_mut(&peer) else {
            return;
        };
        if p.state == ProgressState::Replicate
            && !p.inflight.is_empty()
            && now >= p.last_progress_at + retry_after
        {
            p.state = ProgressState::Probe;
            p.inflight.clear();
            p.next = p.matched + 1;
            p.probe_sent_at = None;
            p.last_progress_at = now;
        }
        self.send_append(peer);
    }

    fn ack_seq(&mut self, from: NodeId, seq: u64) {
        if let Some(p) = self.progress.get_mut(&from) {
            p.active = true;
            p.heard_at = Some(self.now);
            // A follower only echoes rounds it was sent: a higher seq would confirm rounds
            // not yet started.
            if seq > p.seq_acked && seq <= self.read_seq {
                p.seq_acked = seq;
                self.release_reads();
            }
        }
    }

    /// Serves reads whose round a quorum has answered, once this term's no-op is committed.
    fn release_reads(&mut self) {
        if self.commit < self.term_start_index {
            return;
        }
        let mut acked: Vec<u64> = self.voting_progress().map(|p| p.seq_acked).collect();
        if self.is_voter(self.cfg.id) {
            acked.push(u64::MAX);
        }
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_seq = acked[self.quorum() - 1];
        while self.reads.front().is_some_and(|r| r.seq <= quorum_seq) {
            if let Some(r) = self.reads.pop_front() {
                self.ready
                    .reads_ready
                    .push((r.id, r.index.max(self.term_start_index)));
            }
        }
    }

    /// The ballot box: commit the highest index a quorum holds durably, if it is of this term.
    fn maybe_commit(&mut self) {
        let mut bb = BallotBox::new(self.voters.len());
        if self.is_voter(self.cfg.id) {
            bb.vote(self.durable);
        }
        for p in self.voting_progress() {
            bb.vote(p.matched);
        }
        let q = bb.quorum_index();
        if q > self.commit && self.term_at(q) == self.term {
            self.advance_commit(q);
            self.release_reads();
            self.leave_if_removed();
            if self.role != CoreRole::Leader {
                return;
            }
            self.forget_removed();
        }
        self.maybe_timeout_now();
    }

    /// Once a removal commits, the removed member is sent a last heartbeat carrying the commit
    /// (if it holds the removal, it then knows it is out and stops campaigning), and no more.
    fn forget_removed(&mut self) {
        let committed = self.membership_at(self.commit);
        let gone: Vec<(NodeId, u64)> = self
            .progress
            .iter()
            .filter(|(id, _)| {
                !self.voters.contains(id)
                    && !committed.contains(**id)
                    && self.catch_up.as_ref().is_none_or(|c| c.id != **id)
            })
            .map(|(&id, p)| (id, p.matched))
            .collect();
        for (id, matched) in gone {
            let m = Message::Heartbeat {
                term: self.term,
                commit: self.commit.min(matched),
                seq: self.read_seq,
            };
            self.ready.messages.push((id, m));
            self.progress.remove(&id);
        }
    }

    /// A leader whose own removal is committed steps down. The members hear the commit at
    /// once, and one holding the whole log is told to campaign, so the group is not left
    /// without a leader for an election timeout.
    fn leave_if_removed(&mut self) {
        if self.role != CoreRole::Leader
            || self.is_voter(self.cfg.id)
            || self.membership().0 > self.commit
        {
            return;
        }
        tracing::info!(id = self.cfg.id, "removed from the members: stepping down");
        self.broadcast_heartbeat();
        let successor = self
            .progress
            .iter()
            .find(|(id, p)| self.is_voter(**id) && p.matched >= self.last_index)
            .map(|(&id, _)| id);
        if let Some(to) = successor {
            self.ready
                .messages
                .push((to, Message::TimeoutNow { term: self.term }));
        }
        self.become_follower(self.term, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoStorage;
    impl LogRead for NoStorage {
        fn entries(&self, _: u64, _: u64, _: usize) -> Option<Vec<LogEntry>> {
            None
        }
    }

    fn cfg(id: NodeId, n: u64) -> CoreConfig {
        CoreConfig {
            id,
            members: (1..=n).collect(),
            election_timeout_ms: (100, 200),
            heartbeat_ms: 20,
            max_batch_entries: 64,
            max_batch_bytes: 1 << 20,
            max_inflight: 4,
            snapshot_chunk_bytes: 8,
            max_unapplied_bytes: usize::MAX,
            unsafe_ack_before_durable: false,
        }
    }

    /// A follower's durable acknowledgement of everything up to `index`.
    fn ack(term: u64, index: u64) -> Message {
        Message::AppendResp {
            term,
            success: true,
            index,
            last_index: index,
            seq: 0,
        }
    }

    fn entry(index: u64, term: u64) -> LogEntry {
        LogEntry {
            index,
            term,
            timestamp_ms: 0,
            kind: EntryKind::Normal,
            payload: Bytes::from(vec![term as u8]),
        }
    }

    /// A core whose log holds entries with the given terms (index = position + 1).
    fn core(id: NodeId, n: u64, terms: &[u64], term: u64) -> RaftCore {
        let tail: Vec<LogEntry> = terms
            .iter()
            .enumerate()
            .map(|(i, &t)| entry(i as u64 + 1, t))
            .collect();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for e in &tail {
            if runs.last().map(|r| r.1) != Some(e.term) {
                runs.push((e.index, e.term));
            }
        }
        let hs = HardState {
            term,
            vote: 0,
            commit: 0,
        };
        let state = DurableState {
            hard: hs,
            term_runs: runs,
            tail,
            applied: 0,
            ..DurableState::default()
        };
        RaftCore::new(cfg(id, n), id, state, Box::new(NoStorage), 0)
    }

    /// Makes every write durable at once; returns all messages (immediate and after-durable).
    fn flush(c: &mut RaftCore) -> Vec<(NodeId, Message)> {
        let mut out = Vec::new();
        while c.has_ready() {
            let r = c.take_ready();
            out.extend(r.messages);
            for w in r.writes {
                out.extend(w.after);
                c.persisted(w.id, w.last_index, w.last_term);
            }
        }
        out
    }

    /// Elects node 1 of `n` with the given log, votes granted by every peer.
    fn elect(c: &mut RaftCore, n: u64) {
        c.tick(1_000, 0);
        flush(c);
        for p in 2..=n {
            c.step(
                p,
                Message::PreVoteResp {
                    term: c.term() + 1,
                    granted: true,
                },
            );
        }
        flush(c);
        for p in 2..=n {
            c.step(
                p,
                Message::VoteResp {
                    term: c.term(),
                    granted: true,
                },
            );
        }
        flush(c);
        assert!(c.is_leader());
    }

    #[test]
    fn a_follower_behind_on_applying_takes_no_entries_until_it_catches_up() {
        let append = |term: u64, prev_index: u64, prev_term: u64, new: &[u64], commit: u64| {
            Message::Append {
                term,
                prev_index,
                prev_term,
                commit,
                seq: prev_index,
                entries: new
                    .iter()
                    .enumerate()
                    .map(|(k, &t)| entry(prev_index + 1 + k as u64, t))
                    .collect(),
            }
        };
        let answered = |out: &[(NodeId, Message)]| {
            out.iter()
                .any(|(to, m)| *to == 1 && matches!(m, Message::AppendResp { success: true, .. }))
        };
        let mut c = core(2, 3, &[1], 1);
        c.cfg.max_unapplied_bytes = 3;
        c.step(1, append(1, 1, 1, &[1, 1, 1], 4));
        assert!(answered(&flush(&mut c)));
        assert_eq!((c.last_index(), c.commit_index()), (4, 4));
        // Four bytes committed and none applied: more entries are dropped, unanswered.
        c.step(1, append(1, 4, 1, &[1, 1], 4));
        assert!(flush(&mut c).is_empty());
        assert_eq!(c.last_index(), 4);
        // Heartbeats still go through (no election while the machine catches up).
        c.step(
            1,
            Message::Heartbeat {
                term: 1,
                commit: 4,
                seq: 9,
            },
        );
        assert!(!flush(&mut c).is_empty());
        c.set_applied(4);
        c.step(1, append(1, 4, 1, &[1, 1], 4));
        assert!(answered(&flush(&mut c)));
        assert_eq!(c.last_index(), 6);

        // A full tail of entries nobody committed (a deposed leader's) still gives way to
        // the new leader's: the machine has nothing left to apply.
        let mut c = core(2, 3, &[1, 1, 1, 1], 1);
        c.cfg.max_unapplied_bytes = 2;
        c.step(3, append(2, 1, 1, &[2], 0));
        assert!(
            flush(&mut c)
                .iter()
                .any(|(to, m)| *to == 3 && matches!(m, Message::AppendResp { success: true, .. }))
        );
        assert_eq!((c.last_index(), c.term_at(2)), (2, 2));
    }

    #[test]
    fn a_forged_term_cannot_push_the_cluster_past_decodable_terms() {
        let heartbeat = |term| Message::Heartbeat {
            term,
            commit: 0,
            seq: 1,
        };
        let mut c = core(1, 3, &[1], 1);
        c.step(2, heartbeat(MAX_WIRE_NUMBER));
        assert_eq!(c.term(), 1, "the top of the range is not adopted");
        assert!(flush(&mut c).is_empty(), "nor answered");
        c.step(2, heartbeat(MAX_TERM + 1));
        assert_eq!(c.term(), 1, "nor anything above MAX_TERM from far below it");
        c.step(2, heartbeat(MAX_TERM));
        assert_eq!(
            c.term(),
            MAX_TERM,
            "MAX_TERM itself is a term like any other"
        );
        c.step(2, heartbeat(MAX_TERM + MAX_TERM_STEP + 1));
        assert_eq!(
            c.term(),
            MAX_TERM,
            "above it, a term moves in bounded steps only"
        );
        c.step(2, heartbeat(MAX_TERM + 3));
        assert_eq!(c.term(), MAX_TERM + 3, "as the elections after it do");
        // This node's own next election is decodable by its peers.
        c.tick(10_000, 0);
        c.step(
            2,
            Message::PreVoteResp {
                term: c.term() + 1,
                granted: true,
            },
        );
        let out = flush(&mut c);
        let votes: Vec<_> = out
            .iter()
            .filter(|(_, m)| matches!(m, Message::Vote { .. }))
            .collect();
        assert!(!votes.is_empty(), "{out:?}");
        for (_, m) in votes {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            assert_eq!(Message::decode(&buf).as_ref(), Ok(m));
        }
    }

    #[test]
    fn election_safety_one_vote_per_term_and_only_when_durable() {
        let mut c = core(1, 3, &[1, 1], 1);
        c.step(
            2,
            Message::Vote {
                term: 2,
                last_index: 2,
                last_term: 1,
                transfer: false,
            },
        );
        let r = c.take_ready();
        assert!(
            r.messages
                .iter()
                .all(|(_, m)| !matches!(m, Message::VoteResp { granted: true, .. }))
        );
        let w = r
            .writes
            .iter()
            .find(|w| w.hard_state.is_some())
            .expect("vote is persisted");
        assert_eq!(w.hard_state.map(|h| (h.term, h.vote)), Some((2, 2)));
        assert!(
            w.after.contains(&(
                2,
                Message::VoteResp {
                    term: 2,
                    granted: true
                }
            )),
            "granted only after durable"
        );
        // A second candidate in the same term is refused.
        c.step(
            3,
            Message::Vote {
                term: 2,
                last_index: 9,
                last_term: 1,
                transfer: false,
            },
        );
        assert!(c.take_ready().messages.contains(&(
            3,
            Message::VoteResp {
                term: 2,
                granted: false
            }
        )));
        // A candidate with a less up-to-date log is refused in a fresh term.
        let mut c = core(1, 3, &[1, 2], 2);
        c.step(
            3,
            Message::Vote {
                term: 3,
                last_index: 5,
                last_term: 1,
                transfer: false,
            },
        );
        assert!(c.take_ready().messages.contains(&(
            3,
            Message::VoteResp {
                term: 3,
                granted: false
            }
        )));
    }

    #[test]
    fn election_safety_no_leader_without_a_quorum() {
        let mut c = core(1, 5, &[], 0);
        c.tick(1_000, 0);
        flush(&mut c);
        c.step(
            2,
            Message::PreVoteResp {
                term: 1,
                granted: true,
            },
        );
        flush(&mut c);
        assert_eq!(c.role(), CoreRole::PreCandidate, "2 of 5 is no quorum");
        assert_eq!(c.term(), 0, "pre-vote changes no term");
        c.step(
            3,
            Message::PreVoteResp {
                term: 1,
                granted: true,
            },
        );
        flush(&mut c);
        assert_eq!((c.role(), c.term()), (CoreRole::Candidate, 1));
        c.step(
            2,
            Message::VoteResp {
                term: 1,
                granted: true,
            },
        );
        c.step(
            2,
            Message::VoteResp {
                term: 1,
                granted: true,
            },
        ); // a duplicate counts once
        flush(&mut c);
        assert_eq!(c.role(), CoreRole::Candidate);
        c.step(
            4,
            Message::VoteResp {
                term: 1,
                granted: true,
            },
        );
        flush(&mut c);
        assert!(c.is_leader());
    }

    #[test]
    fn log_matching_rejects_gaps_and_truncates_conflicts() {
        let mut f = core(2, 3, &[1, 1, 2, 2], 2);
        // prev entry missing: rejected with our last index as a hint.
        f.step(
            1,
            Message::Append {
                term: 3,
                prev_index: 6,
                prev_term: 3,
                commit: 0,
                seq: 0,
                entries: vec![],
            },
        );
        assert!(f.take_ready().messages.contains(&(
            1,
            Message::AppendResp {
                term: 3,
                success: false,
                index: 6,
                last_index: 4,
                seq: 0
            }
        )));
        // prev term differs: rejected.
        f.step(
            1,
            Message::Append {
                term: 3,
                prev_index: 3,
                prev_term: 3,
                commit: 0,
                seq: 0,
                entries: vec![],
            },
        );
        assert!(
            flush(&mut f)
                .iter()
                .any(|(_, m)| matches!(m, Message::AppendResp { success: false, .. }))
        );
        // Matching prev, conflicting suffix: truncated from the conflict, the rest kept.
        f.step(
            1,
            Message::Append {
                term: 3,
                prev_index: 1,
                prev_term: 1,
                commit: 2,
                seq: 0,
                entries: vec![entry(2, 1), entry(3, 3)],
            },
        );
        let r = f.take_ready();
        assert_eq!(r.writes.iter().find_map(|w| w.truncate_from), Some(3));
        assert_eq!((f.last_index(), f.term_at(2), f.term_at(3)), (3, 1, 3));
        assert_eq!(f.commit_index(), 2);
        // The ack waits for durability.
        assert!(
            r.messages
                .iter()
                .all(|(_, m)| !matches!(m, Message::AppendResp { success: true, .. }))
        );
        assert!(
            r.writes
                .iter()
                .any(|w| w.after.iter().any(|(_, m)| matches!(
                    m,
                    Message::AppendResp {
                        success: true,
                        index: 3,
                        ..
                    }
                )))
        );
        // A stale, shorter append never truncates what matches.
        f.step(
            1,
            Message::Append {
                term: 3,
                prev_index: 1,
                prev_term: 1,
                commit: 2,
                seq: 0,
                entries: vec![entry(2, 1)],
            },
        );
        flush(&mut f);
        assert_eq!(f.last_index(), 3);
    }

    #[test]
    #[should_panic(expected = "truncating committed entry")]
    fn log_matching_never_truncates_committed_entries() {
        let mut f = core(2, 3, &[1, 1], 1);
        f.step(
            1,
            Message::Append {
                term: 1,
                prev_index: 2,
                prev_term: 1,
                commit: 2,
                seq: 0,
                entries: vec![],
            },
        );
        flush(&mut f);
        assert_eq!(f.commit_index(), 2);
        // Entry 1 at ≤ commit is skipped (known to match); forcing the check at the core level:
        f.truncate(2);
    }

    #[test]
    fn commit_rule_counts_only_current_term_entries() {
        // Node 1 has entries of terms 1 and 2 and becomes leader of term 3 (no-op at 3).
        let mut c = core(1, 3, &[1, 2], 2);
        assert_eq!(c.term_start_index(), 0, "not a leader");
        elect(&mut c, 3);
        assert_eq!((c.term(), c.last_index()), (3, 3));
        assert_eq!(c.term_start_index(), 3, "the no-op");
        // A quorum holds index 2 (an older term's entry): it must not commit by counting.
        c.step(2, ack(3, 2));
        flush(&mut c);
        assert_eq!(
            c.commit_index(),
            0,
            "entries of an older term are not committed by counting replicas"
        );
        // Once the current term's no-op is on a quorum, everything up to it commits.
        c.step(2, ack(3, 3));
        flush(&mut c);
        assert_eq!(c.commit_index(), 3);
    }

    #[test]
    fn commit_needs_the_leaders_own_durable_write() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let (first, _) = c
            .propose([Bytes::from_static(b"a")], 0, None)
            .expect("leader");
        let r = c.take_ready(); // not persisted: the leader's vote is missing
        c.step(2, ack(1, first));
        flush(&mut c);
        assert_eq!(
            c.commit_index(),
            1,
            "only the no-op (durable on the leader) commits"
        );
        for w in r.writes {
            c.persisted(w.id, w.last_index, w.last_term);
        }
        flush(&mut c);
        assert_eq!(c.commit_index(), first);
    }

    #[test]
    fn the_leader_refuses_proposals_while_the_tail_is_full() {
        let mut c = core(1, 1, &[], 0);
        c.cfg.max_unapplied_bytes = 100;
        elect(&mut c, 1);
        let noop = c.last_index();
        c.set_applied(noop);
        let p = |n: usize| [Bytes::from(vec![7u8; n])];
        // An empty tail takes a batch larger than the bound.
        let (big, _) = c.propose(p(150), 0, None).expect("empty tail");
        assert!(matches!(
            c.propose(p(1), 0, None),
            Err(ProposeRefused::Overloaded)
        ));
        flush(&mut c);
        assert_eq!(
            c.commit_index(),
            big,
            "a lone member commits what is durable"
        );
        assert!(
            matches!(c.propose(p(1), 0, None), Err(ProposeRefused::Overloaded)),
            "durable but not applied still counts"
        );
        c.set_applied(big);
        let (a, _) = c.propose(p(60), 0, None).expect("the tail was trimmed");
        assert!(matches!(
            c.propose(p(41), 0, None),
            Err(ProposeRefused::Overloaded)
        ));
        c.propose(p(40), 0, None).expect("exactly at the bound");
        flush(&mut c);
        c.set_applied(a);
        c.propose(p(60), 0, None)
            .expect("the applied entry no longer counts");
    }

    #[test]
    fn a_transfer_tells_the_target_to_campaign_once_it_holds_the_whole_log_committed() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let term = c.term();
        c.propose(
            [Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            0,
            None,
        )
        .expect("leader");
        flush(&mut c);
        assert_eq!(
            c.transfer_leadership(7),
            Err(TransferRefused::NotAMember),
            "not a member"
        );
        c.transfer_leadership(2).expect("leader");
        assert_eq!(c.transferring_to(), Some(2));
        assert_eq!(
            c.propose([Bytes::from_static(b"c")], 0, None),
            Err(ProposeRefused::Transferring { to: 2 }),
            "nothing new is appended while leadership moves"
        );
        let timeout_now = |out: &[(NodeId, Message)]| {
            out.iter()
                .any(|m| matches!(m, (2, Message::TimeoutNow { term: t }) if *t == term))
        };
        assert!(!timeout_now(&flush(&mut c)), "the target holds nothing yet");
        // Committed by node 3, but the target still lacks entries: not yet.
        c.step(3, ack(term, 3));
        assert_eq!(c.commit_index(), 3);
        assert!(!timeout_now(&flush(&mut c)));
        c.step(2, ack(term, 2));
        assert!(!timeout_now(&flush(&mut c)), "the target lacks entry 3");
        c.step(2, ack(term, 3));
        let out = flush(&mut c);
        assert!(timeout_now(&out), "caught up and committed: {out:?}");
        assert!(c.is_leader(), "leads until the target's election");
    }

    #[test]
    fn a_transfer_waits_for_the_leaders_own_write_so_every_proposal_is_committed_first() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let term = c.term();
        c.propose([Bytes::from_static(b"a")], 0, None)
            .expect("leader");
        // The leader's write of entry 2 is not durable yet; the target already holds it.
        let r = c.take_ready();
        let writes = r.writes;
        c.transfer_leadership(2).expect("leader");
        c.step(2, ack(term, 2));
        assert_eq!(
            c.commit_index(),
            1,
            "one durable copy of entry 2 is not a quorum"
        );
        let sent = |r: Ready| {
            r.messages
                .iter()
                .any(|m| matches!(m, (2, Message::TimeoutNow { .. })))
        };
        assert!(
            !sent(c.take_ready()),
            "a proposal's outcome would be unknown if the target took over now"
        );
        for w in writes {
            c.persisted(w.id, w.last_index, w.last_term);
        }
        assert_eq!(c.commit_index(), 2);
        assert!(sent(c.take_ready()));
    }

    #[test]
    fn a_transfer_nobody_completes_is_given_up_and_proposals_resume() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let term = c.term();
        c.transfer_leadership(3).expect("leader");
        let mut t = 1_000;
        while c.transferring_to().is_some() && t < 1_500 {
            t += 10;
            // Node 2 answers, so check-quorum keeps this node leader; node 3 never does.
            c.step(2, ack(term, c.last_index()));
            c.tick(t, 0);
        }
        assert!(c.is_leader());
        assert_eq!(c.transferring_to(), None, "given up");
        assert!(
            t <= 1_000 + 200 + 10,
            "within a maximum election timeout: {t}"
        );
        c.propose([Bytes::from_static(b"a")], 0, None)
            .expect("proposals accepted again");
        // Asking for the leader itself is a no-op, and a follower names its leader.
        c.transfer_leadership(1).expect("itself");
        let mut f = core(2, 3, &[], 0);
        f.step(
            1,
            Message::Heartbeat {
                term: 1,
                commit: 0,
                seq: 0,
            },
        );
        assert_eq!(
            f.transfer_leadership(3),
            Err(TransferRefused::NotLeader { leader: Some(1) })
        );
    }

    #[test]
    fn timeout_now_starts_an_election_that_members_hearing_the_leader_still_vote_in() {
        let heartbeat = Message::Heartbeat {
            term: 1,
            commit: 0,
            seq: 0,
        };
        let vote = |transfer| Message::Vote {
            term: 2,
            last_index: 0,
            last_term: 0,
            transfer,
        };
        // A follower that heard the leader ignores an ordinary candidate...
        let mut f = core(3, 3, &[], 1);
        f.step(1, heartbeat.clone());
        flush(&mut f);
        f.step(2, vote(false));
        assert!(flush(&mut f).is_empty(), "leader stickiness");
        assert_eq!(f.term(), 1);
        // ... but votes for one the leader sent to campaign.
        f.step(2, vote(true));
        let out = flush(&mut f);
        assert!(
            out.contains(&(
                2,
                Message::VoteResp {
                    term: 2,
                    granted: true
                }
            )),
            "{out:?}"
        );
        // The target campaigns at once, saying why.
        let mut t = core(2, 3, &[], 1);
        t.step(1, heartbeat.clone());
        flush(&mut t);
        t.step(1, Message::TimeoutNow { term: 1 });
        assert_eq!(t.role(), CoreRole::Candidate);
        let out = flush(&mut t);
        assert!(out.contains(&(3, vote(true))), "{out:?}");
        // A follower ignores a `TimeoutNow` from anyone but its leader (a forged or confused
        // one).
        let mut o = core(3, 3, &[], 1);
        o.step(1, heartbeat.clone());
        flush(&mut o);
        o.step(2, Message::TimeoutNow { term: 1 });
        assert_eq!(o.role(), CoreRole::Follower);
        assert!(flush(&mut o).is_empty());

        // A leader grants a transfer vote only from the member it told to campaign.
        let mut l = core(1, 3, &[], 0);
        elect(&mut l, 3);
        let (term, last) = (l.term(), l.last_index());
        let transfer_vote = Message::Vote {
            term: term + 1,
            last_index: last,
            last_term: term,
            transfer: true,
        };
        l.step(2, transfer_vote.clone());
        assert!(
            l.is_leader(),
            "no hand-over asked for: an ordinary disruptive vote"
        );
        assert!(flush(&mut l).is_empty());
        l.transfer_leadership(2).expect("leader");
        l.step(2, ack(term, last));
        assert!(flush(&mut l).contains(&(2, Message::TimeoutNow { term })));
        l.step(2, transfer_vote);
        assert!(!l.is_leader(), "the old leader steps down");
        let out = flush(&mut l);
        assert!(
            out.iter()
                .any(|m| matches!(m, (2, Message::VoteResp { granted: true, .. }))),
            "{out:?}"
        );
    }

    #[test]
    fn one_hand_over_at_a_time_and_a_lost_timeout_now_is_sent_again() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let term = c.term();
        c.step(2, ack(term, c.last_index()));
        c.transfer_leadership(2).expect("leader");
        c.transfer_leadership(2).expect("the same target again");
        assert_eq!(
            c.transfer_leadership(3),
            Err(TransferRefused::InProgress { to: 2 })
        );
        assert_eq!(
            c.transfer_leadership(1),
            Err(TransferRefused::InProgress { to: 2 }),
            "a TimeoutNow already sent cannot be called back"
        );
        let timeouts = |out: Vec<(NodeId, Message)>| {
            out.iter()
                .filter(|m| matches!(m, (2, Message::TimeoutNow { .. })))
                .count()
        };
        assert_eq!(timeouts(flush(&mut c)), 1);
        // Lost: nothing more until a heartbeat interval has passed, then once again.
        c.tick(1_005, 0);
        assert_eq!(timeouts(flush(&mut c)), 0);
        c.tick(1_020, 0);
        assert_eq!(timeouts(flush(&mut c)), 1);
    }

    #[test]
    fn check_quorum_steps_down_and_fails_reads() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        c.read_index(7).expect("leader");
        let mut t = 1_000;
        while c.is_leader() && t < 2_000 {
            t += 10;
            c.tick(t, 0);
        }
        assert!(!c.is_leader(), "a leader that hears nobody steps down");
        let r = c.take_ready();
        assert!(r.stepped_down);
        assert_eq!(r.reads_failed, vec![7]);
    }

    #[test]
    fn read_index_waits_for_a_quorum_round() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        c.step(2, ack(1, 1));
        flush(&mut c);
        c.read_index(1).expect("leader");
        let seq = flush(&mut c)
            .iter()
            .find_map(|(_, m)| {
                if let Message::Heartbeat { seq, .. } = m {
                    Some(*seq)
                } else {
                    None
                }
            })
            .expect("a heartbeat round");
        assert!(c.take_ready().reads_ready.is_empty());
        c.step(
            3,
            Message::HeartbeatResp {
                term: 1,
                seq: seq - 1,
                last_index: 1,
            },
        );
        assert!(
            c.take_ready().reads_ready.is_empty(),
            "an older round does not confirm"
        );
        c.step(
            3,
            Message::HeartbeatResp {
                term: 1,
                seq,
                last_index: 1,
            },
        );
        assert_eq!(c.take_ready().reads_ready, vec![(1, 1)]);
    }

    #[test]
    fn a_long_divergent_suffix_costs_one_rejected_probe_not_one_per_entry() {
        // The leader has 50 entries of term 3 after a common prefix; the follower 200 of term 2
        // (an old leader's uncommitted proposals).
        let mut leader_terms = vec![1, 1];
        leader_terms.extend([3; 50]);
        let mut follower_terms = vec![1, 1];
        follower_terms.extend([2; 200]);
        let mut l = core(1, 3, &leader_terms, 3);
        let mut f = core(2, 3, &follower_terms, 3);
        elect(&mut l, 3);
        // The election's own appends were dropped (`elect` flushes them away): the probe is
        // sent again a heartbeat later.
        l.tick(1_000 + 25, 0);
        let mut rejections = 0;
        let mut to_follower: Vec<Message> = flush(&mut l)
            .into_iter()
            .filter(|(to, _)| *to == 2)
            .map(|(_, m)| m)
            .collect();
        for _ in 0..100 {
            let mut to_leader = Vec::new();
            for m in to_follower.drain(..) {
                f.step(1, m);
                to_leader.extend(flush(&mut f).into_iter().map(|(_, m)| m));
            }
            if to_leader.is_empty() {
                break;
            }
            for m in to_leader {
                rejections += usize::from(matches!(m, Message::AppendResp { success: false, .. }));
                l.step(2, m);
                to_follower.extend(
                    flush(&mut l)
                        .into_iter()
                        .filter(|(to, _)| *to == 2)
                        .map(|(_, m)| m),
                );
            }
        }
        assert_eq!(f.last_index(), l.last_index(), "the follower caught up");
        assert!(
            (1..=l.last_index()).all(|i| f.term_at(i) == l.term_at(i)),
            "the logs match"
        );
        assert!(rejections <= 2, "{rejections} rejected probes");
    }

    #[test]
    fn timestamps_never_go_back_once_the_tail_is_trimmed() {
        let mut c = core(1, 1, &[], 0);
        elect(&mut c, 1);
        let (i, _) = c
            .propose([Bytes::from_static(b"a")], 5_000, None)
            .expect("leader");
        flush(&mut c);
        c.set_applied(i);
        // Everything is durable and applied: the in-memory tail is empty.
        let (j, _) = c
            .propose([Bytes::from_static(b"b")], 1_000, None)
            .expect("leader");
        let ts = c.entries(j, j).expect("in memory")[0].timestamp_ms;
        assert_eq!(ts, 5_000, "the clock went back, the log must not");
    }

    #[test]
    fn a_restarted_core_takes_the_last_timestamp_from_storage() {
        struct Stored(Vec<LogEntry>);
        impl LogRead for Stored {
            fn entries(&self, lo: u64, hi: u64, _: usize) -> Option<Vec<LogEntry>> {
                Some(
                    self.0
                        .iter()
                        .filter(|e| (lo..hi).contains(&e.index))
                        .cloned()
                        .collect(),
                )
            }
        }
        let mut last = entry(3, 1);
        last.timestamp_ms = 9_000;
        let state = DurableState {
            hard: HardState {
                term: 1,
                vote: 1,
                commit: 3,
            },
            term_runs: vec![(1, 1)],
            tail: Vec::new(),
            applied: 3,
            ..DurableState::default()
        };
        let stored = Stored(vec![entry(1, 1), entry(2, 1), last]);
        let mut c = RaftCore::new(cfg(1, 1), 1, state, Box::new(stored), 0);
        elect(&mut c, 1);
        let (i, _) = c
            .propose([Bytes::from_static(b"a")], 100, None)
            .expect("leader");
        assert_eq!(c.entries(i, i).expect("in memory")[0].timestamp_ms, 9_000);
    }

    #[test]
    fn a_notice_from_before_a_truncation_does_not_make_reappended_entries_durable() {
        let append = |term: u64, entry_term: u64| Message::Append {
            term,
            prev_index: 2,
            prev_term: 1,
            commit: 0,
            seq: 0,
            entries: vec![entry(3, entry_term), entry(4, entry_term)],
        };
        let mut f = core(2, 3, &[1, 1], 1);
        f.step(1, append(2, 2));
        let w1 = f.take_ready().writes.pop().expect("append write");
        // A term-3 leader replaces 3..4; a term-4 leader sends the term-2 entries again.
        f.step(3, append(3, 3));
        f.step(1, append(4, 2));
        let later = f.take_ready().writes;
        assert!(later.iter().all(|w| w.id > w1.id));
        assert_eq!(f.term_at(4), 2);
        // W1's notice arrives now: its (4, term 2) matches the log again, but the entries it
        // made durable were truncated, and their copies are still queued.
        f.persisted(w1.id, w1.last_index, w1.last_term);
        assert_eq!(f.durable_index(), 2, "durable from a stale notice");
        let last = later.last().expect("writes");
        f.persisted(last.id, last.last_index, last.last_term);
        assert_eq!(f.durable_index(), 4);
    }

    #[test]
    fn a_follower_cannot_confirm_read_rounds_not_yet_started() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        c.step(2, ack(1, 1));
        flush(&mut c);
        c.read_index(1).expect("leader");
        flush(&mut c);
        // A faulty peer echoes a round far ahead of any sent.
        c.step(
            2,
            Message::HeartbeatResp {
                term: 1,
                seq: 1_000,
                last_index: 1,
            },
        );
        assert!(
            c.take_ready().reads_ready.is_empty(),
            "confirmed by an echo of a round that had not started"
        );
    }

    #[test]
    fn a_new_leader_nobody_answers_steps_down_at_the_first_check() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        // One minimum election timeout (100 ms) after winning, with no answer to its appends.
        c.tick(1_000 + 110, 0);
        assert!(!c.is_leader());
    }

    #[test]
    fn an_append_after_an_idle_spell_is_not_retried_at_once() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        for p in [2, 3] {
            c.step(p, ack(1, 1));
        }
        flush(&mut c);
        // Idle for a while (heartbeats answered), then a proposal.
        let mut t = 1_000;
        for _ in 0..10 {
            t += 20;
            c.tick(t, 0);
            flush(&mut c);
            for p in [2, 3] {
                c.step(
                    p,
                    Message::HeartbeatResp {
                        term: 1,
                        seq: 0,
                        last_index: 1,
                    },
                );
            }
        }
        c.propose([Bytes::from_static(b"a")], 0, None)
            .expect("leader");
        let sent = flush(&mut c);
        assert!(
            sent.iter()
                .any(|(_, m)| matches!(m, Message::Append { .. }))
        );
        // The next tick comes before any answer: nothing is resent.
        c.tick(t + 5, 0);
        let resent = flush(&mut c);
        assert!(
            !resent
                .iter()
                .any(|(_, m)| matches!(m, Message::Append { entries, .. } if !entries.is_empty())),
            "an append resent within a tick: {resent:?}"
        );
    }

    #[test]
    fn a_follower_that_lost_its_log_is_replicated_again_not_probed_forever() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let (last, _) = c
            .propose((0..4).map(|_| Bytes::from_static(b"a")), 0, None)
            .expect("leader");
        flush(&mut c);
        c.step(2, ack(1, last));
        flush(&mut c);
        assert_eq!(c.match_index(2), last);
        // Node 2 comes back with an empty log and rejects every probe at its old match.
        let lost = Message::AppendResp {
            term: 1,
            success: false,
            index: last,
            last_index: 0,
            seq: 0,
        };
        c.step(2, lost.clone());
        assert_eq!(
            c.match_index(2),
            last,
            "one stale rejection changes nothing"
        );
        c.step(2, lost.clone());
        c.step(2, lost);
        assert_eq!(c.match_index(2), 0);
        let sent = flush(&mut c);
        assert!(
            sent.iter().any(|(to, m)| *to == 2
                && matches!(m, Message::Append { prev_index: 0, entries, .. } if !entries.is_empty())),
            "the log is sent again from its start: {sent:?}"
        );
    }

    /// A leader of {1,2,3} adds 4: 4 is first caught up, uncounted, and only then is the
    /// change appended; it is in effect at once (commits then need 3 of 4); a second change
    /// waits for the first to commit.
    #[test]
    fn a_new_member_is_caught_up_then_counts_and_changes_go_one_at_a_time() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let start = c.last_index();
        c.step(2, ack(c.term(), start));
        flush(&mut c);
        assert_eq!(c.commit_index(), start, "the term's first entry commits");
        let (_, m) = c.membership();
        let added = m.with(4, "10.0.0.4:7000".into()).expect("a new member");
        assert_eq!(
            c.change_membership(added.clone(), 0),
            Ok(ChangeStarted::CatchingUp)
        );
        let sent = flush(&mut c);
        assert!(sent.iter().any(|(to, _)| *to == 4), "4 is replicated to");
        assert_eq!(c.members(), &[1, 2, 3], "not counted while catching up");
        assert_eq!(
            c.change_membership(added.without(2).expect("member"), 0),
            Err(ChangeRefused::InProgress)
        );
        c.step(4, ack(c.term(), c.last_index()));
        let r = c.take_ready();
        let Some(ChangeOutcome::Appended(at)) = r.membership else {
            panic!("caught up: the change is appended ({:?})", r.membership);
        };
        for w in r.writes {
            c.persisted(w.id, w.last_index, w.last_term);
        }
        flush(&mut c);
        assert_eq!(c.members(), &[1, 2, 3, 4]);
        c.step(2, ack(c.term(), at));
        flush(&mut c);
        assert!(c.commit_index() < at, "2 of 4 is no quorum");
        c.step(3, ack(c.term(), at));
        flush(&mut c);
        assert_eq!(c.commit_index(), at, "3 of 4 is");
        assert!(
            c.change_membership(added.without(2).expect("member"), 0)
                .is_ok()
        );
    }

    /// A new member that never answers is given up: nothing is appended, and it is no longer
    /// replicated to.
    #[test]
    fn a_new_member_that_does_not_catch_up_is_given_up() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        c.step(2, ack(c.term(), c.last_index()));
        flush(&mut c);
        let last = c.last_index();
        let (_, m) = c.membership();
        let added = m.with(4, String::new()).expect("a new member");
        assert_eq!(c.change_membership(added, 0), Ok(ChangeStarted::CatchingUp));
        flush(&mut c);
        let mut outcome = None;
        for t in (1_000..30_000).step_by(100) {
            c.tick(t, 0);
            c.step(2, ack(c.term(), c.last_index()));
            let r = c.take_ready();
            outcome = outcome.or(r.membership);
        }
        assert_eq!(outcome, Some(ChangeOutcome::NotCaughtUp(4)));
        assert_eq!(c.last_index(), last, "nothing appended");
        assert_eq!(c.members(), &[1, 2, 3]);
        c.tick(31_000, 0);
        let sent = flush(&mut c);
        assert!(!sent.iter().any(|(to, _)| *to == 4), "{sent:?}");
    }

    /// Regression (a second reader's review): a node campaigning while it installs a
    /// snapshot whose membership drops a member that already granted its vote must not count
    /// that vote among the new members.
    #[test]
    fn votes_from_members_a_snapshot_removes_do_not_count() {
        let mut c = core(1, 5, &[], 0);
        let snap = Snapshot {
            membership: Membership::of_ids([1, 2, 3]),
            ..snapshot_at(9, 1)
        };
        for part in chunks(1, &snap, 64) {
            c.step(2, part);
        }
        assert_eq!(c.take_ready().install, Some(snap.clone()));
        // The leader goes quiet; this node campaigns among {1..5} meanwhile.
        c.tick(10_000, 0);
        flush(&mut c);
        for p in [3, 4] {
            c.step(
                p,
                Message::PreVoteResp {
                    term: 2,
                    granted: true,
                },
            );
        }
        flush(&mut c);
        assert_eq!(c.role(), CoreRole::Candidate);
        c.step(
            4,
            Message::VoteResp {
                term: 2,
                granted: true,
            },
        );
        flush(&mut c);
        assert_eq!(c.role(), CoreRole::Candidate, "2 of 5");
        c.installed(9);
        flush(&mut c);
        assert_eq!(c.members(), &[1, 2, 3]);
        c.step(
            3,
            Message::VoteResp {
                term: 2,
                granted: false,
            },
        );
        flush(&mut c);
        assert!(
            !c.is_leader(),
            "4's vote counted among {{1, 2, 3}}: elected by 1 and a non-member"
        );
    }

    /// A follower takes a change when it is appended, and undoes it when the entry is
    /// truncated by a new leader's log.
    #[test]
    fn a_truncated_change_is_undone() {
        let mut c = core(2, 3, &[1], 1);
        let change = LogEntry {
            kind: EntryKind::Config,
            payload: Membership::of_ids([1, 2]).encode(),
            ..entry(2, 1)
        };
        c.step(
            1,
            Message::Append {
                term: 1,
                prev_index: 1,
                prev_term: 1,
                commit: 0,
                seq: 0,
                entries: vec![change],
            },
        );
        flush(&mut c);
        assert_eq!(c.members(), &[1, 2]);
        c.step(
            3,
            Message::Append {
                term: 2,
                prev_index: 1,
                prev_term: 1,
                commit: 0,
                seq: 0,
                entries: vec![entry(2, 2)],
            },
        );
        flush(&mut c);
        assert_eq!(c.members(), &[1, 2, 3], "back to the members before it");
        assert_eq!(c.membership().0, 0);
    }

    /// A leader that removes itself leads on without counting itself until the removal
    /// commits, then steps down and tells a member holding its whole log to campaign.
    #[test]
    fn a_leader_that_removes_itself_steps_down_once_that_commits() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let start = c.last_index();
        c.step(2, ack(c.term(), start));
        c.step(3, ack(c.term(), start));
        flush(&mut c);
        let (_, m) = c.membership();
        let Ok(ChangeStarted::Appended(at)) = c.change_membership(m.without(1).expect("member"), 0)
        else {
            panic!("a removal is appended at once");
        };
        assert_eq!(c.members(), &[2, 3]);
        flush(&mut c);
        c.step(2, ack(c.term(), at));
        flush(&mut c);
        assert!(c.is_leader(), "its own copy does not count: 1 of {{2, 3}}");
        c.step(3, ack(c.term(), at));
        let sent = flush(&mut c);
        assert_eq!(c.commit_index(), at);
        assert!(!c.is_leader(), "removed: steps down");
        assert!(
            sent.iter()
                .any(|(to, m)| *to == 2 && matches!(m, Message::TimeoutNow { .. })),
            "{sent:?}"
        );
        // A node outside the members never campaigns.
        c.tick(100_000, 0);
        assert!(flush(&mut c).is_empty());
        assert_eq!(c.role(), CoreRole::Follower);
    }

    /// The strict reconfiguration check: a change after which fewer than a quorum of the new
    /// members have answered lately is refused; removing the one that is down is not.
    #[test]
    fn a_change_that_leaves_too_few_members_reachable_is_refused() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let start = c.last_index();
        c.step(2, ack(c.term(), start));
        flush(&mut c);
        assert_eq!(c.commit_index(), start);
        let (_, m) = c.membership();
        let m = m.clone();
        // 3 never answered: {1, 3} would need both.
        assert_eq!(
            c.change_membership(m.without(2).expect("member"), 0),
            Err(ChangeRefused::TooFewReachable {
                needed: 2,
                reachable: 1,
                unreachable: vec![3],
            })
        );
        assert_eq!(c.last_index(), start, "nothing appended");
        // Nor may the leader leave {2, 3}.
        assert!(matches!(
            c.change_membership(m.without(1).expect("member"), 0),
            Err(ChangeRefused::TooFewReachable { .. })
        ));
        // Adding 4 is fine: {1, 2, 4} with 4 caught up first.
        // Removing the one that is down leaves {1, 2}, both reachable.
        assert!(matches!(
            c.change_membership(m.without(3).expect("member"), 0),
            Ok(ChangeStarted::Appended(_))
        ));
        // Once a member stops answering for longer than an election timeout, it no longer
        // counts: 2 answered at `now`, then nothing for two election timeouts.
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let start = c.last_index();
        c.step(2, ack(c.term(), start));
        c.step(3, ack(c.term(), start));
        flush(&mut c);
        let later = c.now + 2 * c.cfg.election_timeout_ms.1;
        c.now = later; // no tick: check-quorum would step the leader down
        c.step(3, ack(c.term(), start));
        assert!(matches!(
            c.change_membership(m.without(3).expect("member"), 0),
            Err(ChangeRefused::TooFewReachable { unreachable, .. }) if unreachable == vec![2]
        ));
    }

    /// A member being removed is replicated to until its removal commits, then sent a last
    /// heartbeat with the commit, and nothing more; it then knows it is out and never
    /// campaigns.
    #[test]
    fn a_removed_member_learns_its_removal_and_is_sent_nothing_more() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let start = c.last_index();
        c.step(2, ack(c.term(), start));
        c.step(3, ack(c.term(), start));
        flush(&mut c);
        let (_, m) = c.membership();
        let Ok(ChangeStarted::Appended(at)) = c.change_membership(m.without(3).expect("member"), 0)
        else {
            panic!("appended");
        };
        let sent = flush(&mut c);
        assert!(
            sent.iter().any(|(to, m)| *to == 3
                && matches!(m, Message::Append { entries, .. }
                    if entries.iter().any(|e| e.index == at))),
            "the member being removed is sent its removal: {sent:?}"
        );
        c.step(3, ack(c.term(), at));
        flush(&mut c);
        assert_eq!(
            c.commit_index(),
            start,
            "3's answer does not count any more"
        );
        c.step(2, ack(c.term(), at));
        let sent = flush(&mut c);
        assert_eq!(c.commit_index(), at);
        let last: Vec<&Message> = sent
            .iter()
            .filter(|(to, _)| *to == 3)
            .map(|(_, m)| m)
            .collect();
        assert!(
            matches!(last[..], [Message::Heartbeat { commit, .. }] if *commit == at),
            "{last:?}"
        );
        c.tick(c.now + 10 * c.cfg.heartbeat_ms, 0);
        let sent = flush(&mut c);
        assert!(sent.iter().all(|(to, _)| *to != 3), "{sent:?}");
        assert!(sent.iter().any(|(to, _)| *to == 2));

        // The removed member's side: it takes the removal, then the commit, and stays quiet.
        let mut f = core(3, 3, &[], 0);
        f.step(
            1,
            Message::Append {
                term: c.term(),
                prev_index: 0,
                prev_term: 0,
                commit: start,
                seq: 0,
                entries: c.entries(1, at + 1).expect("in the tail"),
            },
        );
        flush(&mut f);
        assert_eq!(f.last_index(), at);
        assert_eq!(f.members(), &[1, 2], "in effect once in the log");
        f.step(
            1,
            Message::Heartbeat {
                term: c.term(),
                commit: at,
                seq: 0,
            },
        );
        flush(&mut f);
        assert_eq!(f.commit_index(), at);
        assert_eq!(f.members(), &[1, 2]);
        f.tick(f.now + 100 * f.cfg.election_timeout_ms.1, 0);
        assert!(flush(&mut f).is_empty(), "a removed node never campaigns");
    }

    /// The chunks of `snap` as a leader in `term` sends them, `chunk` bytes each.
    fn chunks(term: u64, snap: &Snapshot, chunk: usize) -> Vec<Message> {
        let total = snap.data.len();
        (0..total.max(1))
            .step_by(chunk)
            .map(|offset| Message::InstallSnapshot {
                term,
                index: snap.index,
                last_term: snap.term,
                timestamp_ms: snap.timestamp_ms,
                offset: offset as u64,
                total: total as u64,
                data: snap.data.slice(offset..(offset + chunk).min(total)),
                membership: snap.membership.encode(),
            })
            .collect()
    }

    fn snapshot_at(index: u64, term: u64) -> Snapshot {
        Snapshot {
            index,
            term,
            timestamp_ms: 7_000,
            data: Bytes::from((0..20u8).collect::<Vec<_>>()),
            membership: Membership::of_ids([1, 2, 3]),
        }
    }

    #[test]
    fn a_follower_behind_the_compacted_log_is_sent_the_snapshot_then_the_entries_after_it() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        let (first, _) = c
            .propose((0..6).map(|_| Bytes::from_static(b"a")), 0, None)
            .expect("leader");
        let last = first + 5;
        flush(&mut c);
        c.step(3, ack(1, last));
        flush(&mut c);
        assert_eq!(c.commit_index(), last);
        // Applied up to 5, so 6 and 7 are still in memory (no storage in this test).
        c.set_applied(5);
        c.compact(snapshot_at(5, 1), 1);
        flush(&mut c);
        assert_eq!(c.compacted_index(), 4, "one entry kept before the snapshot");
        // Node 2 never answered the probe with the no-op: when it is probed again, entry 1
        // is compacted away.
        c.tick(1_100, 0);
        let sent = flush(&mut c);
        let chunk = |m: &Message| match m {
            Message::InstallSnapshot {
                index: 5,
                offset,
                data,
                ..
            } => Some((*offset, data.len())),
            _ => None,
        };
        let first_chunks: Vec<_> = sent.iter().filter_map(|(_, m)| chunk(m)).collect();
        assert_eq!(first_chunks, vec![(0, 8)], "one chunk in flight: {sent:?}");
        let holds = |received| Message::SnapshotResp {
            term: 1,
            index: 5,
            received,
        };
        for received in [8, 16] {
            c.step(2, holds(received));
            let sent = flush(&mut c);
            let next: Vec<_> = sent.iter().filter_map(|(_, m)| chunk(m)).collect();
            assert_eq!(next, vec![(received, (20 - received as usize).min(8))]);
        }
        // A duplicate answer sends nothing more (no chain of chunks runs on by itself), nor
        // does the answer that confirms the whole: the follower is installing it.
        for received in [16, 20, 20] {
            c.step(2, holds(received));
            let sent = flush(&mut c);
            assert!(sent.iter().all(|(_, m)| chunk(m).is_none()), "{sent:?}");
        }
        // Unanswered for two heartbeats: an empty chunk at the end asks again.
        c.tick(1_200, 0);
        let sent = flush(&mut c);
        let asked: Vec<_> = sent.iter().filter_map(|(_, m)| chunk(m)).collect();
        assert_eq!(asked, vec![(20, 0)], "{sent:?}");
        // Installed: the follower is at 5, and the entries after it follow.
        c.step(2, ack(1, 5));
        let sent = flush(&mut c);
        assert_eq!(c.match_index(2), 5);
        assert!(
            sent.iter().any(|(to, m)| *to == 2
                && matches!(m, Message::Append { prev_index: 5, prev_term: 1, entries, .. } if !entries.is_empty())),
            "{sent:?}"
        );
    }

    #[test]
    fn a_follower_assembles_a_snapshot_from_chunks_in_order_only() {
        let mut c = core(2, 3, &[1, 1], 1);
        let snap = snapshot_at(9, 2);
        let parts = chunks(2, &snap, 8);
        assert_eq!(parts.len(), 3);
        // A chunk out of order is answered with what is held (nothing), and dropped.
        c.step(1, parts[1].clone());
        let r = c.take_ready();
        assert!(r.install.is_none());
        assert!(
            r.messages
                .iter()
                .any(|(_, m)| matches!(m, Message::SnapshotResp { received: 0, .. }))
        );
        // The first chunk of another leader's snapshot at the same index (its bytes may
        // differ): the next leader's chunks are not spliced onto it.
        let other = Snapshot {
            data: Bytes::from(vec![9u8; 20]),
            ..snap.clone()
        };
        c.step(3, chunks(2, &other, 8)[0].clone());
        c.take_ready();
        let next_leader = chunks(3, &snap, 8);
        c.step(1, next_leader[1].clone());
        let r = c.take_ready();
        assert!(
            r.messages
                .iter()
                .any(|(_, m)| matches!(m, Message::SnapshotResp { received: 0, .. })),
            "{:?}",
            r.messages
        );
        for (k, part) in next_leader.iter().enumerate() {
            c.step(1, part.clone());
            if k < 2 {
                // A duplicate of the chunk just taken changes nothing.
                c.step(1, part.clone());
            }
        }
        let r = c.take_ready();
        assert_eq!(r.install, Some(snap.clone()), "assembled whole, once");
        // Appends wait while it is being installed.
        c.step(
            1,
            Message::Append {
                term: 3,
                prev_index: 9,
                prev_term: 2,
                commit: 9,
                seq: 0,
                entries: vec![entry(10, 2)],
            },
        );
        assert_eq!(c.last_index(), 2);
        c.installed(9);
        let sent = flush(&mut c);
        assert_eq!(
            (c.last_index(), c.commit_index(), c.compacted_index()),
            (9, 9, 9)
        );
        assert_eq!(c.term_at(9), 2);
        assert!(
            sent.iter().any(|(to, m)| *to == 1 && *m == ack(3, 9)),
            "{sent:?}"
        );
    }

    #[test]
    fn a_snapshot_keeps_the_log_after_it_when_the_log_holds_its_last_entry() {
        // Entries past the snapshot may be committed on the leader with this follower's
        // acknowledgement: dropping them could lose committed entries.
        let mut c = core(2, 3, &[1, 1, 1, 1, 1, 1], 1);
        let snap = snapshot_at(4, 1);
        for part in chunks(1, &snap, 8) {
            c.step(1, part);
        }
        assert!(c.take_ready().install.is_some());
        c.installed(4);
        flush(&mut c);
        assert_eq!((c.last_index(), c.compacted_index()), (6, 4));
        // A snapshot whose last entry this log holds in another term replaces the whole log.
        let mut c = core(2, 3, &[1, 1, 1, 1, 1, 1], 2);
        let snap = snapshot_at(4, 2);
        for part in chunks(2, &snap, 8) {
            c.step(1, part);
        }
        assert!(c.take_ready().install.is_some());
        c.installed(4);
        let mut truncated = None;
        while c.has_ready() {
            for w in c.take_ready().writes {
                truncated = truncated.or(w.truncate_from.zip(w.compact_through));
            }
        }
        assert_eq!(truncated, Some((5, (4, 2))));
        assert_eq!((c.last_index(), c.term_at(4)), (4, 2));
    }

    #[test]
    fn a_follower_that_lost_its_log_is_noticed_from_its_heartbeat_answers() {
        let mut c = core(1, 3, &[], 0);
        elect(&mut c, 3);
        c.step(2, ack(1, 1));
        flush(&mut c);
        // Caught up, the follower is sent only heartbeats: their answers must tell.
        let answer = Message::HeartbeatResp {
            term: 1,
            seq: 0,
            last_index: 0,
        };
        for _ in 0..3 {
            c.step(2, answer.clone());
        }
        assert_eq!(c.match_index(2), 0);
        assert!(
            flush(&mut c)
                .iter()
                .any(|(to, m)| *to == 2 && matches!(m, Message::Append { prev_index: 0, .. }))
        );
    }
}
