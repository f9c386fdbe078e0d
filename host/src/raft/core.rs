//! The consensus core: Raft's rules and nothing else. No I/O, no clocks, no threads.
//!
//! Events go in (`tick` with the time, `step` with a peer message, `propose`, `persisted` when a
//! storage write is durable, `read_index`, `set_applied`); what must happen comes out through
//! [`RaftCore::take_ready`]: messages to send now, storage writes (each carrying the messages that
//! may only leave once that write is durable), the commit index, read indexes that are safe to
//! serve and role changes. The runtime (`node.rs`) and the simulator are thin shells around it.
//!
//! `RaftCore`'s rules are split by who applies them: this file holds the state, the inputs,
//! membership changes, leadership transfer and the log; `election.rs` the campaigns and
//! check-quorum; `replicator.rs` the leader's side of replication and the commit rule;
//! `follower.rs` the follower's side; `tests.rs` their unit tests.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::SmallRng};

use super::NodeId;
use super::ballot_box::BallotBox;
use super::membership::{ChangeRefused, Membership};
use super::message::{EntryKind, LogEntry, MAX_WIRE_NUMBER, Message, tail_bytes, tail_size};

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
    /// Bytes the in-memory tail (entries not yet durable, committed and applied) may hold,
    /// counted as `LogEntry::tail_size` (payload and a fixed overhead per entry), before the
    /// leader refuses new proposals with `Overloaded`: the pipeline's backpressure.
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

/// Terms no cluster reaches by elections: half the wire's range. A message may bring one in
/// only within `MAX_TERM_STEP` of the receiver's term, so a forged term cannot push a cluster
/// to the top of the range (where the next election's term would not decode), while elections
/// above it still go through: 2^41 forged steps stand between `MAX_TERM` and the top. This
/// limits what a forged message can do (a peer port without `--peer-secret-file`), it cannot
/// undo it: after a forged jump to `MAX_TERM` and an election, a member that was far behind
/// cannot follow any more.
pub const MAX_TERM: u64 = MAX_WIRE_NUMBER / 2;
const MAX_TERM_STEP: u64 = 1 << 20;

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
    /// Whether this node has been a voting member (so that it can say when it is removed).
    was_member: bool,
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
    /// A candidate's write of its own vote, not yet durable: the vote counts once it is.
    own_vote_write: Option<u64>,

    replicators: BTreeMap<NodeId, Replicator>,
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

mod election;
mod follower;
mod replicator;
#[cfg(test)]
mod tests;

use follower::Receiving;
use replicator::{Replicator, ReplicatorState};

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
        let mem_bytes = tail_bytes(&tail);
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
            was_member: false,
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
            own_vote_write: None,
            replicators: BTreeMap::new(),
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
        // A node restarted with its own removal in its log can still say so when it commits.
        core.was_member = core
            .memberships
            .iter()
            .any(|(_, m)| m.contains(core.cfg.id));
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
        &self.membership_record_at(index).1
    }

    /// The membership in effect at `index` and the index of the entry that made it.
    fn membership_record_at(&self, index: u64) -> &(u64, Membership) {
        let pos = self.memberships.partition_point(|(i, _)| *i <= index);
        &self.memberships[pos.saturating_sub(1)]
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
        self.replicators.get(&peer).map(|p| p.matched).unwrap_or(0)
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
                self.forget_removed();
                if self.now >= self.next_heartbeat {
                    self.next_heartbeat = self.now + self.cfg.heartbeat_ms;
                    self.broadcast_heartbeat();
                }
                let peers: Vec<NodeId> = self.replicators.keys().copied().collect();
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
        self.mem_bytes == tail_bytes(&self.mem)
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
        if self.own_vote_write.is_some_and(|w| id >= w) {
            self.own_vote_durable();
        }
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
            self.mem_bytes -= e.tail_size();
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
            bytes += tail_size(payload.len());
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
        let current = self.may_change()?;
        if !current.one_change_to(&next) {
            return Err(ChangeRefused::NotOneChange);
        }
        let added = next.ids().find(|&id| !current.contains(id));
        self.check_reachable(&next, added, None)?;
        if let Some(id) = added.filter(|&id| id != self.cfg.id) {
            let fresh = self.fresh_replicator();
            self.replicators.entry(id).or_insert(fresh);
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

    /// Records that member `id` is now reached at the address `next` gives it (etcd's member
    /// update): the voters stay the same, so no quorum changes. Returns the change's index.
    /// Every member dials `id` there once the change is in its log; `id` itself is restarted
    /// there by its operator. Refused for the leader itself (its followers would answer to an
    /// address it does not listen on yet) and when the other members alone are too few to
    /// commit it (`id` counts as unreachable: it has not answered from its new address yet).
    pub fn move_member(
        &mut self,
        id: NodeId,
        next: Membership,
        timestamp_ms: u64,
    ) -> Result<u64, ChangeRefused> {
        let current = self.may_change()?;
        if !current.contains(id) {
            return Err(ChangeRefused::NotAMember(id));
        }
        if !next.ids().eq(current.ids()) || next.address(id).is_none() {
            return Err(ChangeRefused::NotOneChange);
        }
        if id == self.cfg.id {
            return Err(ChangeRefused::MovingLeader(id));
        }
        self.check_reachable(&next, None, Some(id))?;
        Ok(self.append_membership(next, timestamp_ms))
    }

    /// What every membership change needs: this node leads, hands nothing over, and the last
    /// change and its own term's first entry are committed. Returns the membership in effect.
    pub fn may_change(&self) -> Result<Membership, ChangeRefused> {
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
        Ok(current.clone())
    }

    /// Appends the change once the member being added holds all but the last batch of the
    /// log (its snapshot installed, if it needed one), or gives it up at the deadline.
    fn maybe_caught_up(&mut self) {
        let Some(c) = &self.catch_up else {
            return;
        };
        let margin = self.cfg.max_batch_entries as u64;
        let caught = self.replicators.get(&c.id).is_some_and(|p| {
            p.state == ReplicatorState::Replicate && p.matched + margin >= self.last_index
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
            self.replicators.remove(&id);
            self.ready.membership = Some(ChangeOutcome::NotCaughtUp(id));
        }
    }

    /// etcd's strict reconfiguration check: refuses a change after which fewer than a quorum
    /// of the new members would be reachable (answered within the longest election timeout;
    /// a member being added counts, as it is caught up before the change is appended; a member
    /// being moved does not, as it has not answered from its new address yet).
    /// Without it, removing a live member while another is down could leave a group that
    /// commits nothing until the down one returns. Removing the unreachable ones passes.
    fn check_reachable(
        &self,
        next: &Membership,
        added: Option<NodeId>,
        moved: Option<NodeId>,
    ) -> Result<(), ChangeRefused> {
        let window = self.cfg.election_timeout_ms.1;
        let reachable = |id: NodeId| {
            Some(id) != moved
                && (id == self.cfg.id
                    || Some(id) == added
                    || self.replicators.get(&id).is_some_and(|p| {
                        p.heard_at
                            .is_some_and(|t| self.now.saturating_sub(t) <= window)
                    }))
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
                self.tell_removed(from);
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
                    if !self.is_voter(from) {
                        self.forget_removed();
                    }
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
                    if let Some(p) = self.replicators.get(&from)
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
        self.mem_bytes += tail_bytes(&entries);
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
        self.mem_bytes = tail_bytes(&self.mem);
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
            self.mem_bytes -= e.tail_size();
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
            if self.was_member && made_at <= to && !self.is_voter(self.cfg.id) {
                self.was_member = false;
                tracing::warn!(
                    id = self.cfg.id,
                    index = made_at,
                    "this node was removed from the members: it takes no part in the cluster \
                     any more and can be stopped"
                );
            }
            self.commit = to;
            self.ready.commit = Some(to);
            let last = self.last_index;
            if let Some(w) = self.ready.writes.last_mut() {
                w.commit = to.min(last);
            }
        }
    }
}
