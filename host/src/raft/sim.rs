//! A deterministic cluster simulator for the consensus core (used by `tests/simulation.rs` and
//! the core's unit tests).
//!
//! N cores in one thread, one seed: a network that drops, delays, reorders and duplicates, with
//! partitions of any shape (one-way included); disks that make writes durable after a delay and
//! lose whatever was not durable on a crash; crashes of any node (all at once included) and
//! restarts that rebuild from the disk, each with its own wall clock (seconds apart, stepping
//! on restart); state machines that apply what is committed after a delay, now and then a long
//! one (as the FSM caller's thread lags the commit index); clients writing and reading a small
//! key-value machine through the same completion bookkeeping as the runtime; snapshots of that
//! machine every few entries, the log compacted behind them, and followers that fell behind
//! the compaction sent the snapshot in chunks; leadership transfers; members added and removed
//! one at a time (some nodes start outside the group, to join it), and moved to new addresses.
//! It checks: at most one leader per term, committed entries (timestamps included) never
//! change, timestamps never go back along the committed log, equal state at equal applied
//! index (a replica restored from a snapshot included), linearizability of the
//! history per key, that no acknowledged write is lost, and that once healed every replica
//! applies the whole committed log and holds the same membership, addresses included.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::SmallRng};

use super::NodeId;
use super::core::ProposeRefused as ProposeRefusal;
use super::core::{
    ChangeOutcome, ChangeStarted, CoreConfig, DurableState, HardState, LogRead, LogWrite, RaftCore,
    Snapshot, TransferRefused,
};
use super::membership::{ChangeRefused, Membership};
use super::message::{EntryKind, LogEntry, Message, tail_size};
use history::{HistOp, OpKind, linearizable};

pub mod history;

/// What one simulation run looks like.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub faults: bool,
    /// Simulated milliseconds of the faulty phase (a quiet phase of healing follows).
    pub duration_ms: u64,
    pub clients: usize,
    pub keys: u64,
    /// The negative control: followers acknowledge entries before they are durable.
    pub unsafe_ack_before_durable: bool,
    /// Every disk write takes 20-100 ms to become durable (else mostly 1-4 ms): a crash then
    /// loses more of what was not durable yet.
    pub slow_disks: bool,
    /// Applied entries between a node's snapshots (0: none, the log is never compacted).
    pub snapshot_every: u64,
    /// The leader is asked to hand leadership to another member this often (0: only now and
    /// then, as one of the faults).
    pub transfer_every_ms: u64,
    /// The members the cluster starts with: nodes `1..=initial_members` (the others start
    /// outside it, to be added).
    pub initial_members: usize,
    /// Whether the leader is asked, now and then, as one of the faults, to add or remove a
    /// node; and how often besides (0: only as a fault).
    pub membership_changes: bool,
    pub membership_every_ms: u64,
}

impl SimConfig {
    pub fn new(seed: u64, nodes: usize) -> SimConfig {
        SimConfig {
            seed,
            nodes,
            faults: true,
            duration_ms: 10_000,
            clients: 4,
            keys: 6,
            unsafe_ack_before_durable: false,
            slow_disks: false,
            // Most seeds compact their logs; a third keep them whole.
            snapshot_every: if seed.is_multiple_of(3) {
                0
            } else {
                8 + seed % 40
            },
            transfer_every_ms: 0,
            // Half the seeds change members; half of those start with a node outside.
            initial_members: nodes - usize::from(seed % 4 == 1 && nodes > 1),
            membership_changes: seed % 4 < 2,
            membership_every_ms: 0,
        }
    }
}

/// What a passing run reports.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub trace_hash: u64,
    pub ops_ok: usize,
    pub ops_indeterminate: usize,
    pub commit_index: u64,
    pub leaders: usize,
    /// Snapshots taken, snapshots a follower installed from its leader, and the chunks of
    /// them sent (resends included).
    pub snapshots: usize,
    pub installs: usize,
    pub snapshot_chunks: usize,
    /// Leadership transfers asked for, and those whose target then won an election.
    pub transfers_asked: usize,
    pub transfers_done: usize,
    /// Membership changes a leader appended, and those that committed.
    pub changes_asked: usize,
    pub changes_committed: usize,
    /// Changes refused because too few of the new members were reachable.
    pub changes_refused: usize,
    /// Of the changes asked, the moves of a member to a new address; and those that committed.
    pub moves_asked: usize,
    pub moves_committed: usize,
    /// The members at the end.
    pub members: Vec<NodeId>,
}

const TICK_MS: u64 = 10;
const OP_TIMEOUT_MS: u64 = 1_500;
const WALL_EPOCH_MS: u64 = 1_700_000_000_000;

#[derive(Default)]
struct Disk {
    hard: HardState,
    /// Entries `compacted.0 + 1..`.
    entries: Vec<LogEntry>,
    compacted: (u64, u64),
    /// The latest snapshot, durable as soon as it is stored (the runtime's rename + fsync).
    snapshot: Option<Snapshot>,
    /// Membership records by index (the log store's `memberships` table).
    memberships: BTreeMap<u64, Membership>,
}

impl Disk {
    fn last_index(&self) -> u64 {
        self.compacted.0 + self.entries.len() as u64
    }

    fn get(&self, index: u64) -> Option<&LogEntry> {
        let k = index.checked_sub(self.compacted.0 + 1)?;
        self.entries.get(k as usize)
    }

    /// Drops the entries up to `index`, and the rest of the log unless it holds that entry.
    fn compact(&mut self, index: u64, term: u64) {
        if index <= self.compacted.0 {
            return;
        }
        let k = (index - self.compacted.0) as usize;
        if k <= self.entries.len() && self.entries[k - 1].term == term {
            self.entries.drain(..k);
        } else {
            self.entries.clear();
        }
        self.compacted = (index, term);
    }
}

#[derive(Clone)]
struct SharedDisk(Arc<Mutex<Disk>>);

impl LogRead for SharedDisk {
    fn entries(&self, lo: u64, hi: u64, max_bytes: usize) -> Option<Vec<LogEntry>> {
        let d = self.0.lock().ok()?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for i in lo..hi {
            let e = d.get(i)?;
            if !out.is_empty() && bytes + e.size() > max_bytes {
                break;
            }
            bytes += e.size();
            out.push(e.clone());
        }
        Some(out)
    }
}

struct SimNode {
    id: NodeId,
    incarnation: u64,
    core: Option<RaftCore>,
    disk: SharedDisk,
    disk_queue: std::collections::VecDeque<LogWrite>,
    /// Writes of the group commit under way (those queued when it started), as the disk
    /// queue's: a write queued meanwhile waits for the next group.
    disk_group: usize,
    kv: BTreeMap<u64, u64>,
    applied: u64,
    /// Term and timestamp of the entry at `applied`, and the membership in effect there (what
    /// a snapshot there records).
    applied_term: u64,
    applied_ts: u64,
    membership: Membership,
    /// The state-machine queue: committed up to here, applied once `ApplyDone` fires (as on
    /// the FSM caller's thread, which lags the commit index, sometimes by much).
    apply_to: u64,
    apply_busy: bool,
    /// Reads whose read index is not applied yet: (index, history op).
    reads_waiting: Vec<(u64, usize)>,
    state_hash: u64,
    /// This incarnation's wall clock runs this far ahead of the simulation's (drawn at each
    /// boot: a restart may step the clock back by seconds).
    clock_skew_ms: u64,
    /// Completions aligned to index: index → (term, history op).
    pending: BTreeMap<u64, (u64, usize)>,
    reads: BTreeMap<u64, usize>,
    /// Committed entries already checked against the cluster's record.
    checked: u64,
}

impl SimNode {
    /// Drops a caller who gave up: nothing answers it any more.
    fn forget(&mut self, op: usize) {
        self.pending.retain(|_, (_, o)| *o != op);
        self.reads.retain(|_, o| *o != op);
        self.reads_waiting.retain(|&(_, o)| o != op);
    }
}

#[derive(Debug)]
enum Ev {
    Deliver {
        from: NodeId,
        to: NodeId,
        bytes: Vec<u8>,
    },
    DiskDone {
        node: usize,
        inc: u64,
    },
    ApplyDone {
        node: usize,
        inc: u64,
    },
    Tick {
        node: usize,
        inc: u64,
    },
    Client {
        client: usize,
        epoch: u64,
    },
    Fault,
    Transfer,
    Reconfigure,
    Restart {
        node: usize,
    },
    /// The state-machine thread finished installing a snapshot (it takes a while).
    Installed {
        node: usize,
        inc: u64,
        index: u64,
    },
}

struct Client {
    epoch: u64,
    leader_guess: NodeId,
    /// The history op in flight and the node it went to.
    current: Option<(usize, usize)>,
    deadline: u64,
}

pub struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    now: u64,
    clock: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    event_store: BTreeMap<usize, Ev>,
    next_ev: usize,
    nodes: Vec<SimNode>,
    /// blocked[from][to]: one-way link cuts.
    blocked: Vec<Vec<bool>>,
    drop_rate: f64,
    faults_on: bool,
    clients: Vec<Client>,
    history: Vec<HistOp>,
    acked: Vec<(u64, u64, Bytes)>,
    leaders: BTreeMap<u64, NodeId>,
    snapshots: usize,
    installs: usize,
    snapshot_chunks: usize,
    transfers_asked: usize,
    transfers_done: usize,
    /// Index and term of the membership entries leaders appended.
    changes: Vec<(u64, u64)>,
    changes_refused: usize,
    /// The moves among `changes`, as (index, term).
    moves: Vec<(u64, u64)>,
    /// The latest transfer asked for: its target, the term and the time it was asked in.
    transfer: Option<(NodeId, u64, u64)>,
    committed: Vec<(u64, u64)>,
    /// The timestamp of the last entry in `committed`.
    committed_ts: u64,
    state_at: BTreeMap<u64, u64>,
    next_value: u64,
    next_read_id: u64,
    hash: u64,
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn entry_hash(e: &LogEntry) -> u64 {
    let h = fnv(0xcbf29ce484222325, &e.term.to_le_bytes());
    let h = fnv(h, &[e.kind as u8]);
    let h = fnv(h, &e.timestamp_ms.to_le_bytes());
    fnv(h, &e.payload)
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let n = cfg.nodes;
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(cfg.seed),
            now: 0,
            clock: 0,
            seq: 0,
            events: BinaryHeap::new(),
            event_store: BTreeMap::new(),
            next_ev: 0,
            nodes: Vec::new(),
            blocked: vec![vec![false; n]; n],
            drop_rate: 0.0,
            faults_on: cfg.faults,
            clients: Vec::new(),
            history: Vec::new(),
            acked: Vec::new(),
            leaders: BTreeMap::new(),
            snapshots: 0,
            installs: 0,
            snapshot_chunks: 0,
            transfers_asked: 0,
            transfers_done: 0,
            changes: Vec::new(),
            changes_refused: 0,
            moves: Vec::new(),
            transfer: None,
            committed: Vec::new(),
            committed_ts: 0,
            state_at: BTreeMap::new(),
            next_value: 1,
            next_read_id: 1,
            hash: 0xcbf29ce484222325,
            cfg,
        };
        for i in 0..n {
            sim.nodes.push(SimNode {
                id: i as NodeId + 1,
                incarnation: 0,
                core: None,
                disk: SharedDisk(Arc::new(Mutex::new(Disk::default()))),
                disk_queue: Default::default(),
                disk_group: 0,
                kv: BTreeMap::new(),
                applied: 0,
                applied_term: 0,
                applied_ts: 0,
                membership: Membership::default(),
                apply_to: 0,
                apply_busy: false,
                reads_waiting: Vec::new(),
                state_hash: 0,
                clock_skew_ms: 0,
                pending: BTreeMap::new(),
                reads: BTreeMap::new(),
                checked: 0,
            });
            sim.boot(i).expect("a fresh node boots");
        }
        for c in 0..sim.cfg.clients {
            sim.clients.push(Client {
                epoch: 0,
                leader_guess: 1,
                current: None,
                deadline: 0,
            });
            let at = sim.rng.gen_range(0..50);
            sim.schedule(
                at,
                Ev::Client {
                    client: c,
                    epoch: 0,
                },
            );
        }
        if sim.faults_on {
            let at = sim.rng.gen_range(200..800);
            sim.schedule(at, Ev::Fault);
        }
        if sim.cfg.transfer_every_ms > 0 {
            let every = sim.cfg.transfer_every_ms;
            sim.schedule(every, Ev::Transfer);
        }
        if sim.cfg.membership_every_ms > 0 {
            let every = sim.cfg.membership_every_ms;
            sim.schedule(every, Ev::Reconfigure);
        }
        sim
    }

    fn core_config(&self, id: NodeId) -> CoreConfig {
        CoreConfig {
            id,
            members: if id as usize <= self.cfg.initial_members {
                (1..=self.cfg.initial_members as NodeId).collect()
            } else {
                Vec::new()
            },
            election_timeout_ms: (150, 300),
            heartbeat_ms: 30,
            max_batch_entries: 8,
            max_batch_bytes: 512,
            max_inflight: 4,
            // Snapshots span several chunks.
            snapshot_chunk_bytes: 40,
            // Four puts' worth, so clients meet `Overloaded` and retry.
            max_unapplied_bytes: 4 * tail_size(16),
            unsafe_ack_before_durable: self.cfg.unsafe_ack_before_durable,
        }
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        let id = self.next_ev;
        self.next_ev += 1;
        self.event_store.insert(id, ev);
        self.events.push(Reverse((self.now + delay, self.seq, id)));
    }

    fn trace(&mut self, bytes: &[u8]) {
        self.hash = fnv(self.hash, bytes);
    }

    /// (Re)starts node `i` from its disk, replaying committed entries into a fresh machine.
    fn boot(&mut self, i: usize) -> Result<(), String> {
        let cfg = self.core_config(self.nodes[i].id);
        let node_seed = self.rng.r#gen::<u64>();
        let clock_skew_ms = self.rng.gen_range(0..5_000);
        let (hard, entries, compacted, snapshot, recorded) = {
            let mut d = self.nodes[i].disk.0.lock().map_err(|_| "poisoned disk")?;
            // A crash between storing an installed snapshot and cutting the log: the log
            // is brought in line with the snapshot first (as `Node::start` does).
            if let Some((index, term)) = d.snapshot.as_ref().map(|s| (s.index, s.term))
                && index > d.compacted.0
            {
                d.compact(index, term);
                d.hard.commit = d.hard.commit.max(index);
            }
            let recorded: Vec<(u64, Membership)> =
                d.memberships.iter().map(|(&i, m)| (i, m.clone())).collect();
            (
                d.hard,
                d.entries.clone(),
                d.compacted,
                d.snapshot.clone(),
                recorded,
            )
        };
        let boot_membership = Membership::of_ids(cfg.members.iter().copied());
        let base = compacted.0;
        let snapshot_index = snapshot.as_ref().map_or(0, |s| s.index);
        let commit = hard
            .commit
            .min(base + entries.len() as u64)
            .max(snapshot_index);
        let hard = HardState { commit, ..hard };
        let n = &mut self.nodes[i];
        n.clock_skew_ms = clock_skew_ms;
        n.apply_busy = false;
        n.checked = 0;
        n.membership = boot_membership;
        restore(n, snapshot.as_ref())?;
        let from = n.applied;
        self.check_restored(i)?;
        let n = &mut self.nodes[i];
        n.apply_to = commit;
        let mut term_runs: Vec<(u64, u64)> = Vec::new();
        for e in &entries {
            if term_runs.last().map(|&(_, t)| t) != Some(e.term) {
                term_runs.push((e.index, e.term));
            }
        }
        let tail = entries[(commit - base) as usize..].to_vec();
        let state = DurableState {
            hard,
            term_runs,
            tail,
            applied: commit,
            compacted,
            snapshot,
            memberships: recorded,
        };
        let core = RaftCore::new(cfg, node_seed, state, Box::new(n.disk.clone()), self.now);
        n.core = Some(core);
        n.incarnation += 1;
        let inc = n.incarnation;
        self.apply_committed(
            i,
            &entries[(from - base) as usize..(commit - base) as usize],
        )?;
        let first_tick = self.rng.gen_range(1..=TICK_MS);
        self.schedule(first_tick, Ev::Tick { node: i, inc });
        Ok(())
    }

    /// Runs the whole scenario and checks it.
    pub fn run(mut self) -> Result<SimReport, String> {
        let end = self.cfg.duration_ms;
        self.run_until(end)?;
        // Quiet phase: heal everything, restart the dead, let clients finish.
        self.faults_on = false;
        self.drop_rate = 0.0;
        for row in &mut self.blocked {
            row.iter_mut().for_each(|b| *b = false);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                self.boot(i)?;
            }
        }
        self.run_until(end + 4_000)?;
        self.final_reads()?;
        self.check_caught_up()?;
        self.check_linearizable()?;
        self.check_acked_writes()?;
        let members = self.final_members()?;
        let committed = |changes: &[(u64, u64)]| {
            changes
                .iter()
                .filter(|&&(i, t)| self.committed.get(i as usize - 1).is_some_and(|c| c.0 == t))
                .count()
        };
        let (changes_committed, moves_committed) =
            (committed(&self.changes), committed(&self.moves));
        let ops_ok = self.history.iter().filter(|o| o.ret.is_some()).count();
        Ok(SimReport {
            trace_hash: self.hash,
            ops_ok,
            ops_indeterminate: self.history.len() - ops_ok,
            commit_index: self.committed.len() as u64,
            leaders: self.leaders.len(),
            snapshots: self.snapshots,
            installs: self.installs,
            snapshot_chunks: self.snapshot_chunks,
            transfers_asked: self.transfers_asked,
            transfers_done: self.transfers_done,
            changes_asked: self.changes.len(),
            changes_committed,
            changes_refused: self.changes_refused,
            moves_asked: self.moves.len(),
            moves_committed,
            members,
        })
    }

    fn run_until(&mut self, end: u64) -> Result<(), String> {
        while let Some(Reverse((at, _, id))) = self.events.peek().copied() {
            if at > end {
                break;
            }
            self.events.pop();
            self.now = at;
            self.clock += 1;
            let ev = self.event_store.remove(&id).ok_or("lost event")?;
            self.handle(ev)?;
        }
        self.now = end;
        Ok(())
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        let now = self.now;
        self.trace(&now.to_le_bytes());
        match ev {
            Ev::Deliver { from, to, bytes } => {
                self.trace(&bytes);
                let i = (to - 1) as usize;
                let msg = Message::decode(&bytes).map_err(|e| format!("decode: {e}"))?;
                if let Some(core) = self.nodes[i].core.as_mut() {
                    core.step(from, msg);
                    self.drain(i)?;
                }
            }
            Ev::DiskDone { node, inc } => {
                if self.nodes[node].incarnation == inc {
                    self.disk_done(node)?;
                }
            }
            Ev::ApplyDone { node, inc } => {
                if self.nodes[node].incarnation == inc {
                    self.apply_done(node)?;
                }
            }
            Ev::Tick { node, inc } => {
                let wall = WALL_EPOCH_MS + now + self.nodes[node].clock_skew_ms;
                if self.nodes[node].incarnation == inc
                    && let Some(core) = self.nodes[node].core.as_mut()
                {
                    core.tick(now, wall);
                    self.drain(node)?;
                    self.schedule(TICK_MS, Ev::Tick { node, inc });
                }
            }
            Ev::Client { client, epoch } => {
                if self.clients[client].epoch == epoch {
                    self.client_step(client)?;
                }
            }
            Ev::Fault => {
                if self.faults_on {
                    self.fault()?;
                    let at = self.rng.gen_range(100..700);
                    self.schedule(at, Ev::Fault);
                }
            }
            Ev::Transfer => {
                if self.now < self.cfg.duration_ms {
                    self.transfer_leadership()?;
                    let every = self.cfg.transfer_every_ms;
                    self.schedule(every, Ev::Transfer);
                }
            }
            Ev::Reconfigure => {
                if self.now < self.cfg.duration_ms {
                    self.change_membership()?;
                    let every = self.cfg.membership_every_ms;
                    self.schedule(every, Ev::Reconfigure);
                }
            }
            Ev::Restart { node } => {
                if self.nodes[node].core.is_none() {
                    self.trace(b"restart");
                    self.boot(node)?;
                }
            }
            Ev::Installed { node, inc, index } => {
                if self.nodes[node].incarnation == inc
                    && let Some(core) = self.nodes[node].core.as_mut()
                {
                    core.installed(index);
                    self.drain(node)?;
                }
            }
        }
        Ok(())
    }

    // ----- network -----

    fn send(&mut self, from: NodeId, to: NodeId, msg: &Message) {
        if matches!(msg, Message::InstallSnapshot { .. }) {
            self.snapshot_chunks += 1;
        }
        let mut bytes = Vec::new();
        msg.encode(&mut bytes);
        let (f, t) = ((from - 1) as usize, (to - 1) as usize);
        if self.blocked[f][t] || (self.drop_rate > 0.0 && self.rng.gen_bool(self.drop_rate)) {
            return;
        }
        let copies = if self.faults_on && self.rng.gen_bool(0.02) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faults_on && self.rng.gen_bool(0.05) {
                self.rng.gen_range(20..120)
            } else {
                self.rng.gen_range(1..6)
            };
            self.schedule(
                delay,
                Ev::Deliver {
                    from,
                    to,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    // ----- faults -----

    fn fault(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        let choice = self.rng.gen_range(0..100);
        self.trace(&[choice as u8]);
        match choice {
            0..=14 => {
                // Split into two sides.
                let side: Vec<bool> = (0..n).map(|_| self.rng.gen_bool(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        self.blocked[a][b] = side[a] != side[b];
                    }
                }
            }
            15..=24 => {
                // One-way cuts.
                for _ in 0..self.rng.gen_range(1..=n) {
                    let a = self.rng.gen_range(0..n);
                    let b = self.rng.gen_range(0..n);
                    self.blocked[a][b] = true;
                }
            }
            25..=34 => {
                // Isolate the leader.
                if let Some(l) = self.current_leader() {
                    let l = (l - 1) as usize;
                    for x in 0..n {
                        self.blocked[l][x] = x != l;
                        self.blocked[x][l] = x != l;
                    }
                }
            }
            35..=39 if self.cfg.membership_changes => self.change_membership()?,
            35..=49 => {
                for row in &mut self.blocked {
                    row.iter_mut().for_each(|b| *b = false);
                }
                self.drop_rate = 0.0;
            }
            55..=64 => self.drop_rate = [0.0, 0.05, 0.2][self.rng.gen_range(0..3)],
            65..=84 => {
                let i = self.rng.gen_range(0..n);
                self.crash(i);
            }
            85..=89 => {
                for i in 0..n {
                    self.crash(i);
                }
            }
            50..=54 => self.transfer_leadership()?,
            _ => {
                // Crash the leader.
                if let Some(l) = self.current_leader() {
                    self.crash((l - 1) as usize);
                }
            }
        }
        Ok(())
    }

    /// Asks the leader to hand leadership to another member, chosen at random.
    fn transfer_leadership(&mut self) -> Result<(), String> {
        let Some(l) = self.current_leader() else {
            return Ok(());
        };
        let i = (l - 1) as usize;
        let Some(core) = self.nodes[i].core.as_ref() else {
            return Ok(());
        };
        let others: Vec<NodeId> = core.members().iter().copied().filter(|&m| m != l).collect();
        if others.is_empty() {
            return Ok(());
        }
        let to = others[self.rng.gen_range(0..others.len())];
        self.trace(b"transfer");
        let Some(core) = self.nodes[i].core.as_mut() else {
            return Ok(());
        };
        let term = core.term();
        match core.transfer_leadership(to) {
            Ok(()) => {}
            // The previous hand-over is still under way.
            Err(TransferRefused::InProgress { .. }) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "node {l}, leading term {term}, refused a transfer: {e:?}"
                ));
            }
        }
        self.transfers_asked += 1;
        self.transfer = Some((to, term, self.now));
        self.drain(i)
    }

    /// Asks the leader to add a node chosen at random if it is not a member, or to remove it
    /// if it is (the leader itself included); or, one time in four, to move a member to a new
    /// address (the leader itself included, which it must refuse).
    fn change_membership(&mut self) -> Result<(), String> {
        let Some(l) = self.current_leader() else {
            return Ok(());
        };
        let x = self.rng.gen_range(1..=self.nodes.len() as NodeId);
        let moving = self.rng.gen_ratio(1, 4);
        self.trace(b"reconfigure");
        let i = (l - 1) as usize;
        let wall = WALL_EPOCH_MS + self.now + self.nodes[i].clock_skew_ms;
        let Some(core) = self.nodes[i].core.as_mut() else {
            return Ok(());
        };
        let (_, current) = core.membership();
        if moving && current.contains(x) {
            // The address is never routed here (the network knows nodes by id); what is
            // checked is that every replica ends up with the same one.
            let address = format!("sim-{x}-{}", self.moves.len());
            let next = current.moved(x, address).map_err(|e| format!("{e:?}"))?;
            let term = core.term();
            match core.move_member(x, next, wall) {
                Ok(_) if x == l => return Err(format!("node {l} moved itself while leading")),
                Ok(index) => {
                    self.changes.push((index, term));
                    self.moves.push((index, term));
                }
                Err(ChangeRefused::MovingLeader(id)) if id == l => {}
                Err(e) => self.change_refused(l, term, e)?,
            }
            return self.drain(i);
        }
        let next = if current.contains(x) {
            current.without(x)
        } else {
            current.with(x, String::new())
        };
        let Ok(next) = next else {
            return Ok(()); // the last member
        };
        let term = core.term();
        match core.change_membership(next, wall) {
            Ok(ChangeStarted::Appended(index)) => self.changes.push((index, term)),
            // Appended (or given up) once the new member has caught up: see `drain`.
            Ok(ChangeStarted::CatchingUp) => {}
            Err(e) => self.change_refused(l, term, e)?,
        }
        self.drain(i)
    }

    /// What any membership change, a move included, may be refused for; anything else fails
    /// the run.
    fn change_refused(&mut self, l: NodeId, term: u64, e: ChangeRefused) -> Result<(), String> {
        match e {
            // The previous change is not committed yet, or leadership is moving.
            ChangeRefused::InProgress | ChangeRefused::Transferring { .. } => Ok(()),
            // A member of the new group is down or cut off (the strict reconfiguration check).
            ChangeRefused::TooFewReachable { .. } => {
                self.changes_refused += 1;
                Ok(())
            }
            e => Err(format!(
                "node {l}, leading term {term}, refused a membership change: {e:?}"
            )),
        }
    }

    fn current_leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .filter(|c| c.is_leader())
            .map(|c| c.id())
            .max()
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].core.is_none() {
            return;
        }
        self.trace(b"crash");
        let n = &mut self.nodes[i];
        n.core = None;
        n.incarnation += 1;
        n.disk_queue.clear();
        n.disk_group = 0;
        // Callers of a crashed node learn nothing: writes indeterminate, reads void.
        let pending: Vec<usize> = n.pending.values().map(|&(_, op)| op).collect();
        let reads: Vec<usize> = n
            .reads
            .values()
            .copied()
            .chain(n.reads_waiting.drain(..).map(|(_, op)| op))
            .collect();
        n.pending.clear();
        n.reads.clear();
        for op in pending {
            self.finish_op(op, None, false);
        }
        for op in reads {
            self.finish_op(op, None, true);
        }
        let at = self.rng.gen_range(50..1_000);
        self.schedule(at, Ev::Restart { node: i });
    }

    // ----- the shell around one core (what node.rs does with threads) -----

    fn drain(&mut self, i: usize) -> Result<(), String> {
        loop {
            let Some(core) = self.nodes[i].core.as_mut() else {
                return Ok(());
            };
            if !core.has_ready() {
                return Ok(());
            }
            if !core.tail_bytes_counted() {
                return Err(format!("node {}: the tail's byte count drifted", core.id()));
            }
            let ready = core.take_ready();
            let (id, term, is_leader) = (core.id(), core.term(), core.is_leader());
            // Or it removed itself, and that is not committed yet.
            let leads_as_member =
                core.members().contains(&id) || core.membership().0 > core.commit_index();
            let commit_index = core.commit_index();
            if ready.stepped_down {
                // Proposals of a term this node no longer leads: outcome unknown, unless already
                // handed to the state machine, which answers them (as `fail_pending` in node.rs).
                let shipped = self.nodes[i].apply_to;
                let failed: Vec<u64> = self.nodes[i]
                    .pending
                    .iter()
                    .filter(|&(&idx, &(t, _))| idx > shipped && (!is_leader || t != term))
                    .map(|(&idx, _)| idx)
                    .collect();
                for idx in failed {
                    if let Some((_, op)) = self.nodes[i].pending.remove(&idx) {
                        self.finish_op(op, None, false);
                    }
                }
            }
            for rid in ready.reads_failed {
                if let Some(op) = self.nodes[i].reads.remove(&rid) {
                    self.finish_op(op, None, true);
                }
            }
            if ready.became_leader {
                if !leads_as_member {
                    return Err(format!("node {id} leads term {term} outside its members"));
                }
                if let Some(&other) = self.leaders.get(&term)
                    && other != id
                {
                    return Err(format!("two leaders in term {term}: {other} and {id}"));
                }
                self.leaders.insert(term, id);
                // Counted only if it won soon after (a hand-over takes a round trip or two).
                if let Some((to, asked_in, at)) = self.transfer
                    && to == id
                    && term > asked_in
                    && self.now <= at + 150
                {
                    self.transfers_done += 1;
                    self.transfer = None;
                }
            }
            if let Some(ChangeOutcome::Appended(index)) = ready.membership {
                self.changes.push((index, term));
            }
            for (to, m) in &ready.messages {
                self.send(id, *to, m);
            }
            if let Some(snapshot) = ready.install {
                self.install(i, snapshot)?;
            }
            if !ready.writes.is_empty() {
                self.nodes[i].disk_queue.extend(ready.writes);
                if self.nodes[i].disk_group == 0 {
                    self.start_group_commit(i);
                }
            }
            if let Some(commit) = ready.commit {
                let n = &mut self.nodes[i];
                n.apply_to = n.apply_to.max(commit);
                if !n.apply_busy {
                    n.apply_busy = true;
                    let inc = n.incarnation;
                    let at = self.apply_latency();
                    self.schedule(at, Ev::ApplyDone { node: i, inc });
                }
            }
            for (rid, index) in ready.reads_ready {
                if index > commit_index {
                    return Err(format!(
                        "node {id}: read released at {index}, above its commit {commit_index}"
                    ));
                }
                if let Some(op) = self.nodes[i].reads.remove(&rid) {
                    // As on the FSM caller: the read runs once its index is applied.
                    self.nodes[i].reads_waiting.push((index, op));
                }
            }
            self.serve_reads(i);
        }
    }

    fn disk_latency(&mut self) -> u64 {
        if self.cfg.slow_disks {
            self.rng.gen_range(20..100)
        } else if self.rng.gen_bool(0.1) {
            self.rng.gen_range(10..40)
        } else {
            self.rng.gen_range(1..4)
        }
    }

    /// Mostly prompt; now and then a machine that falls far behind its commit index.
    fn apply_latency(&mut self) -> u64 {
        if self.rng.gen_bool(0.05) {
            self.rng.gen_range(20..150)
        } else {
            self.rng.gen_range(0..3)
        }
    }

    /// The state-machine queue's turn: applies everything committed since it last ran.
    fn apply_done(&mut self, i: usize) -> Result<(), String> {
        let n = &mut self.nodes[i];
        n.apply_busy = false;
        let (from, to, id) = (n.applied + 1, n.apply_to, n.id);
        let Some(core) = n.core.as_ref() else {
            return Ok(());
        };
        if from <= to {
            let entries = core
                .entries(from, to)
                .ok_or("entries for apply unavailable")?;
            if entries.len() as u64 != to + 1 - from {
                return Err(format!(
                    "node {id}: committed entries {from}..={to} missing"
                ));
            }
            self.apply_committed(i, &entries)?;
            if let Some(core) = self.nodes[i].core.as_mut() {
                core.set_applied(to);
            }
            self.maybe_snapshot(i);
        }
        self.serve_reads(i);
        self.drain(i)
    }

    /// A machine restored from a snapshot holds the state every replica had at its index.
    fn check_restored(&self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        match self.state_at.get(&n.applied) {
            Some(&h) if h != n.state_hash => Err(format!(
                "node {}: the snapshot at {} restores another state",
                n.id, n.applied
            )),
            _ => Ok(()),
        }
    }

    /// Every `snapshot_every` applied entries a node snapshots its machine and compacts its
    /// log behind it, keeping a few entries for followers just behind.
    fn maybe_snapshot(&mut self, i: usize) {
        let every = self.cfg.snapshot_every;
        let n = &self.nodes[i];
        let Some(core) = n.core.as_ref() else {
            return;
        };
        if every == 0 || n.applied < core.snapshot_index() + every {
            return;
        }
        let snapshot = Snapshot {
            index: n.applied,
            term: n.applied_term,
            timestamp_ms: n.applied_ts,
            data: encode_state(n),
            membership: n.membership.clone(),
        };
        let keep = self.rng.gen_range(0..4);
        self.trace(b"snapshot");
        self.snapshots += 1;
        let n = &mut self.nodes[i];
        if let Ok(mut d) = n.disk.0.lock() {
            d.snapshot = Some(snapshot.clone());
        }
        if let Some(core) = n.core.as_mut() {
            core.compact(snapshot, keep);
        }
    }

    /// The leader's snapshot arrived whole: stored, the machine restored from it (as on the
    /// FSM caller's thread), then the core told.
    fn install(&mut self, i: usize, snapshot: Snapshot) -> Result<(), String> {
        self.trace(b"install");
        self.installs += 1;
        let n = &mut self.nodes[i];
        if snapshot.index <= n.applied {
            return Err(format!(
                "node {}: sent a snapshot at {} with {} applied",
                n.id, snapshot.index, n.applied
            ));
        }
        if let Ok(mut d) = n.disk.0.lock() {
            d.snapshot = Some(snapshot.clone());
        }
        restore(n, Some(&snapshot))?;
        n.apply_to = n.apply_to.max(snapshot.index);
        self.check_restored(i)?;
        // Callers of entries the snapshot covers cannot be told their outputs.
        let n = &mut self.nodes[i];
        let covered: Vec<usize> = n
            .pending
            .range(..=snapshot.index)
            .map(|(_, &(_, op))| op)
            .collect();
        n.pending.retain(|&idx, _| idx > snapshot.index);
        for op in covered {
            self.finish_op(op, None, false);
        }
        // The core hears of it later, as from the FSM caller's thread: meanwhile the leader
        // resends, and must not flood the follower with chunks.
        let inc = self.nodes[i].incarnation;
        let at = self.rng.gen_range(10..200);
        self.schedule(
            at,
            Ev::Installed {
                node: i,
                inc,
                index: snapshot.index,
            },
        );
        self.serve_reads(i);
        Ok(())
    }

    /// Answers the reads whose index is applied, in the order they became ready.
    fn serve_reads(&mut self, i: usize) {
        let applied = self.nodes[i].applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.nodes[i].reads_waiting)
            .into_iter()
            .partition(|&(index, _)| index <= applied);
        self.nodes[i].reads_waiting = waiting;
        for (_, op) in ready {
            let key = self.history[op].key;
            let v = self.nodes[i].kv.get(&key).copied();
            self.history[op].read = v;
            self.finish_op(op, Some(self.clock), false);
        }
    }

    /// Starts a group commit of every write queued now.
    fn start_group_commit(&mut self, i: usize) {
        self.nodes[i].disk_group = self.nodes[i].disk_queue.len();
        let inc = self.nodes[i].incarnation;
        let at = self.disk_latency();
        self.schedule(at, Ev::DiskDone { node: i, inc });
    }

    /// The group commit under way is durable: its writes reach the disk in order, their
    /// messages go out, and the core hears of the last one (as `log_manager.rs` does). One
    /// write at a time instead let a follower short of its commit index queue a write per
    /// heartbeat faster than slow disks retired them, and never catch up.
    fn disk_done(&mut self, i: usize) -> Result<(), String> {
        let group = std::mem::take(&mut self.nodes[i].disk_group);
        let id = self.nodes[i].id;
        let mut last = None;
        for _ in 0..group {
            let Some(w) = self.nodes[i].disk_queue.pop_front() else {
                break;
            };
            self.write_to_disk(i, &w)?;
            for (to, m) in &w.after {
                self.send(id, *to, m);
            }
            last = Some((w.id, w.last_index, w.last_term));
        }
        if let Some((id, index, term)) = last
            && let Some(core) = self.nodes[i].core.as_mut()
        {
            core.persisted(id, index, term);
        }
        if !self.nodes[i].disk_queue.is_empty() {
            self.start_group_commit(i);
        }
        self.drain(i)
    }

    fn write_to_disk(&mut self, i: usize, w: &LogWrite) -> Result<(), String> {
        let mut d = self.nodes[i].disk.0.lock().map_err(|_| "poisoned disk")?;
        if let Some((index, term)) = w.compact_through {
            if d.snapshot.as_ref().is_none_or(|s| s.index < index) {
                return Err(format!("log compacted to {index} past the snapshot"));
            }
            d.compact(index, term);
        }
        if let Some(from) = w.truncate_from {
            let keep = from.saturating_sub(d.compacted.0 + 1);
            d.entries.truncate(keep as usize);
            d.memberships.retain(|&i, _| i < from);
        }
        for e in &w.entries {
            if e.index != d.last_index() + 1 {
                return Err(format!(
                    "non-contiguous write at {} (disk has {})",
                    e.index,
                    d.last_index()
                ));
            }
            d.entries.push(e.clone());
            if e.kind == EntryKind::Config {
                let m = Membership::decode(&e.payload).map_err(|e| e.to_string())?;
                d.memberships.insert(e.index, m);
            }
        }
        if let Some((index, m)) = &w.membership {
            d.memberships.insert(*index, m.clone());
        }
        if let Some(hs) = w.hard_state {
            d.hard.term = hs.term;
            d.hard.vote = hs.vote;
        }
        let last = d.last_index();
        d.hard.commit = d.hard.commit.max(w.commit.min(last));
        Ok(())
    }

    /// The state-machine queue: applies committed entries, checks them against what the
    /// cluster committed before, and completes the callers waiting on them.
    fn apply_committed(&mut self, i: usize, entries: &[LogEntry]) -> Result<(), String> {
        for e in entries {
            let n = &mut self.nodes[i];
            if e.index != n.applied + 1 {
                return Err(format!("node {}: apply gap at {}", n.id, e.index));
            }
            let h = entry_hash(e);
            let slot = (e.index - 1) as usize;
            match self.committed.get(slot) {
                Some(&(t, ch)) if t != e.term || ch != h => {
                    return Err(format!(
                        "node {}: committed entry {} changed (term {t} → {})",
                        n.id, e.index, e.term
                    ));
                }
                Some(_) => {}
                None if slot == self.committed.len() => {
                    // Guests read the entry's timestamp as their clock: it never goes back
                    // along the committed log, whatever the leaders' clocks do.
                    if e.timestamp_ms < self.committed_ts {
                        return Err(format!(
                            "entry {} is stamped {} after one stamped {}",
                            e.index, e.timestamp_ms, self.committed_ts
                        ));
                    }
                    self.committed_ts = e.timestamp_ms;
                    self.committed.push((e.term, h))
                }
                None => return Err("commit record gap".into()),
            }
            let mut out = None;
            match e.kind {
                EntryKind::Normal => {
                    let (k, v) = decode_put(&e.payload).ok_or("bad payload")?;
                    n.kv.insert(k, v);
                    out = Some(());
                }
                EntryKind::Config => {
                    n.membership = Membership::decode(&e.payload).map_err(|e| e.to_string())?;
                }
                EntryKind::Noop => {}
            }
            n.applied = e.index;
            n.applied_term = e.term;
            n.applied_ts = e.timestamp_ms;
            n.state_hash = fnv(n.state_hash, &h.to_le_bytes());
            let sh = n.state_hash;
            match self.state_at.get(&e.index) {
                Some(&s) if s != sh => {
                    return Err(format!(
                        "node {}: state diverges at index {}",
                        self.nodes[i].id, e.index
                    ));
                }
                Some(_) => {}
                None => {
                    self.state_at.insert(e.index, sh);
                }
            }
            if let Some((term, op)) = self.nodes[i].pending.remove(&e.index) {
                if term == e.term && out.is_some() {
                    self.acked.push((e.index, e.term, e.payload.clone()));
                    let clock = self.clock;
                    self.finish_op(op, Some(clock), false);
                } else {
                    // Another leader's entry took this index: ours was never committed.
                    self.history[op].ret = Some(u64::MAX);
                    self.finish_op(op, None, true);
                }
            }
        }
        Ok(())
    }

    // ----- clients -----

    /// Ends op `op`: `ret` = completion clock, `None` = no answer. `void` removes it from the
    /// history (it certainly had no effect, or it is a read without an answer).
    fn finish_op(&mut self, op: usize, ret: Option<u64>, void: bool) {
        if void {
            self.history[op].ret = Some(u64::MAX);
        } else {
            self.history[op].ret = ret;
        }
        for c in 0..self.clients.len() {
            if self.clients[c].current.map(|(o, _)| o) == Some(op) {
                self.clients[c].current = None;
                self.clients[c].epoch += 1;
                let epoch = self.clients[c].epoch;
                let think = self.rng.gen_range(0..30);
                self.schedule(think, Ev::Client { client: c, epoch });
            }
        }
    }

    fn client_step(&mut self, c: usize) -> Result<(), String> {
        if let Some((op, node)) = self.clients[c].current {
            if self.now < self.clients[c].deadline {
                return Ok(());
            }
            // Timed out: forget the completion; a write stays indeterminate.
            self.nodes[node].forget(op);
            let void = self.history[op].kind == OpKind::Get;
            self.finish_op(op, None, void);
            return Ok(());
        }
        let key = self.rng.gen_range(0..self.cfg.keys);
        let kind = if self.rng.gen_bool(0.5) {
            self.next_value += 1;
            OpKind::Put(self.next_value)
        } else {
            OpKind::Get
        };
        self.submit(c, key, kind)
    }

    fn submit(&mut self, c: usize, key: u64, kind: OpKind) -> Result<(), String> {
        let target = self.clients[c].leader_guess;
        let ti = (target - 1) as usize;
        let n = self.nodes.len() as u64;
        let retry = |sim: &mut Sim, guess: Option<NodeId>| {
            let g = guess.unwrap_or_else(|| sim.rng.gen_range(1..=n));
            sim.clients[c].leader_guess = g;
            sim.clients[c].epoch += 1;
            let epoch = sim.clients[c].epoch;
            sim.schedule(10, Ev::Client { client: c, epoch });
        };
        let wall = WALL_EPOCH_MS + self.now + self.nodes[ti].clock_skew_ms;
        let Some(core) = self.nodes[ti].core.as_mut() else {
            retry(self, None);
            return Ok(());
        };
        let op = self.history.len();
        let outcome = match kind {
            OpKind::Put(v) | OpKind::Swap(v, _) => core
                .propose([encode_put(key, v)], wall, None)
                .map(|(index, term)| self.nodes[ti].pending.insert(index, (term, op)).map(|_| ()))
                .map(|dup| dup.is_none()),
            OpKind::Get => {
                let rid = self.next_read_id;
                self.next_read_id += 1;
                core.read_index(rid)
                    .map(|()| self.nodes[ti].reads.insert(rid, op).is_none())
            }
        };
        match outcome {
            Ok(true) => {
                self.history.push(HistOp {
                    key,
                    kind,
                    invoke: self.clock,
                    ret: None,
                    read: None,
                });
                self.clients[c].current = Some((op, ti));
                self.clients[c].deadline = self.now + OP_TIMEOUT_MS;
                self.clients[c].epoch += 1;
                let epoch = self.clients[c].epoch;
                self.schedule(OP_TIMEOUT_MS, Ev::Client { client: c, epoch });
                self.drain(ti)
            }
            Ok(false) => Err("completion slot reused".into()),
            Err(ProposeRefusal::NotLeader { leader }) => {
                retry(self, leader);
                Ok(())
            }
            Err(ProposeRefusal::TermMismatch { .. }) => Err("unexpected term mismatch".into()),
            Err(ProposeRefusal::Overloaded) => {
                retry(self, Some(target));
                Ok(())
            }
            Err(ProposeRefusal::Transferring { to }) => {
                retry(self, Some(to));
                Ok(())
            }
        }
    }

    /// Liveness: healed and quiet, every replica knows the whole committed log and has applied
    /// it, however far behind it fell (crashed, partitioned, or its machine slow to apply).
    fn check_caught_up(&mut self) -> Result<(), String> {
        let t = self.now + 1_000;
        self.run_until(t)?;
        let commit = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref().map(|c| c.commit_index()))
            .max()
            .unwrap_or(0)
            .max(self.committed.len() as u64);
        // Nodes removed from the group hear from no leader any more.
        let agreed = self.final_membership()?;
        let members: Vec<NodeId> = agreed.ids().collect();
        for n in self.nodes.iter().filter(|n| members.contains(&n.id)) {
            let known = n.core.as_ref().map_or(0, |c| c.commit_index());
            if known != commit || n.applied != commit {
                return Err(format!(
                    "node {} knows {known} and applied {} of {commit} committed entries after \
                     the quiet phase: {}",
                    n.id,
                    n.applied,
                    self.describe()
                ));
            }
            // Addresses included: a member moved is reached at its new address by every one.
            let held = n.core.as_ref().map(|c| c.membership().1);
            if held != Some(&agreed) {
                return Err(format!(
                    "node {} holds the membership {held:?}, its leader {agreed:?}",
                    n.id
                ));
            }
        }
        Ok(())
    }

    /// Each node's role, term, commit and members, for a failure's message.
    fn describe(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            match &n.core {
                Some(c) => {
                    out += &format!(
                        "\n  node {}: {:?} term {} leader {:?} commit {} last {} members {:?} \
                         (from {})",
                        n.id,
                        c.role(),
                        c.term(),
                        c.leader(),
                        c.commit_index(),
                        c.last_index(),
                        c.members(),
                        c.membership().0
                    )
                }
                None => out += &format!("\n  node {}: down", n.id),
            }
        }
        out
    }

    /// The members as the final leader has them, once every change it holds is committed.
    fn final_members(&self) -> Result<Vec<NodeId>, String> {
        Ok(self.final_membership()?.ids().collect())
    }

    /// The membership (addresses included) the final leader holds, once it is committed.
    fn final_membership(&self) -> Result<Membership, String> {
        let l = self.current_leader().ok_or("no leader at the end")?;
        let core = self.nodes[(l - 1) as usize]
            .core
            .as_ref()
            .ok_or("leader down")?;
        let (made_at, m) = core.membership();
        if made_at > core.commit_index() {
            return Err(format!(
                "the membership change at {made_at} is not committed after the quiet phase"
            ));
        }
        Ok(m.clone())
    }

    /// After healing: every client reads every key through the leader (into the history).
    fn final_reads(&mut self) -> Result<(), String> {
        for c in 0..self.clients.len() {
            self.clients[c].epoch += 1;
            if let Some((op, node)) = self.clients[c].current.take() {
                self.nodes[node].forget(op);
                let void = self.history[op].kind == OpKind::Get;
                self.finish_op(op, None, void);
                self.clients[c].epoch += 1;
            }
        }
        for key in 0..self.cfg.keys {
            let mut done = false;
            for _attempt in 0..40 {
                let Some(l) = self.current_leader() else {
                    let t = self.now + 100;
                    self.run_until(t)?;
                    continue;
                };
                let li = (l - 1) as usize;
                let op = self.history.len();
                let rid = self.next_read_id;
                self.next_read_id += 1;
                let Some(core) = self.nodes[li].core.as_mut() else {
                    continue;
                };
                if core.read_index(rid).is_err() {
                    let t = self.now + 100;
                    self.run_until(t)?;
                    continue;
                }
                self.history.push(HistOp {
                    key,
                    kind: OpKind::Get,
                    invoke: self.clock,
                    ret: None,
                    read: None,
                });
                self.nodes[li].reads.insert(rid, op);
                self.drain(li)?;
                let t = self.now + 500;
                self.run_until(t)?;
                if self.history[op].ret.is_some_and(|r| r != u64::MAX) {
                    done = true;
                    break;
                }
                self.nodes[li].forget(op);
                self.history[op].ret = Some(u64::MAX);
            }
            if !done {
                self.check_committed_held()?;
                return Err(format!(
                    "no progress: the healed cluster did not serve a read of key {key}: {}",
                    self.describe()
                ));
            }
        }
        Ok(())
    }

    // ----- checks -----

    fn check_linearizable(&self) -> Result<(), String> {
        for key in 0..self.cfg.keys {
            let ops: Vec<&HistOp> = self
                .history
                .iter()
                .filter(|o| o.key == key && o.ret != Some(u64::MAX))
                .collect();
            if !linearizable(&ops) {
                let mut s = format!("history of key {key} is not linearizable:\n");
                for o in ops {
                    s += &format!(
                        "  {:?} invoke {} ret {:?} read {:?}\n",
                        o.kind, o.invoke, o.ret, o.read
                    );
                }
                return Err(s);
            }
        }
        Ok(())
    }

    /// The last committed entry is in the log of some node that counts itself a member (a node
    /// down counts as holding it): else no member can lead without it, and the cluster is stuck
    /// because a committed entry was lost, not merely slow to recover.
    fn check_committed_held(&self) -> Result<(), String> {
        let last = self.committed.len() as u64;
        let term = self.committed.last().map_or(0, |&(t, _)| t);
        let held = self.nodes.iter().any(|n| match &n.core {
            Some(c) => {
                c.members().contains(&n.id)
                    && (c.term_at(last) == term || c.compacted_index() > last)
            }
            None => true,
        });
        if held {
            Ok(())
        } else {
            Err(format!(
                "committed entry {last} lost: no member holds it ({})",
                self.describe()
            ))
        }
    }

    fn check_acked_writes(&self) -> Result<(), String> {
        for &(index, term, ref payload) in &self.acked {
            match self.committed.get((index - 1) as usize) {
                Some(&(t, _)) if t == term => {}
                _ => {
                    return Err(format!(
                        "acknowledged write at {index} (term {term}) lost: {payload:?}"
                    ));
                }
            }
        }
        // The final leader's log holds every committed entry.
        let l = self.current_leader().ok_or("no leader at the end")?;
        let core = self.nodes[(l - 1) as usize]
            .core
            .as_ref()
            .ok_or("leader down")?;
        // (Entries it compacted away are checked through its snapshot's state.)
        let kept = core.compacted_index() as usize;
        for (i, &(t, h)) in self.committed.iter().enumerate().skip(kept) {
            let idx = i as u64 + 1;
            let e = core
                .entries(idx, idx)
                .and_then(|v| v.into_iter().next())
                .ok_or("leader lacks an entry")?;
            if e.term != t || entry_hash(&e) != h {
                return Err(format!("committed entry {idx} differs on the final leader"));
            }
        }
        Ok(())
    }
}

/// The key-value machine's snapshot: applied index, state hash, then the pairs.
fn encode_state(n: &SimNode) -> Bytes {
    let mut b = Vec::new();
    for v in [n.applied, n.state_hash] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for (k, v) in &n.kv {
        b.extend_from_slice(&k.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(b)
}

/// Restores node `n`'s machine from `snapshot` (a fresh machine without one).
fn restore(n: &mut SimNode, snapshot: Option<&Snapshot>) -> Result<(), String> {
    n.kv.clear();
    (n.applied, n.applied_term, n.applied_ts, n.state_hash) = (0, 0, 0, 0);
    let Some(snap) = snapshot else {
        return Ok(());
    };
    let words: Vec<u64> = snap
        .data
        .chunks(8)
        .map(|c| c.try_into().map(u64::from_le_bytes))
        .collect::<Result<_, _>>()
        .map_err(|_| "snapshot of a ragged length")?;
    let [applied, hash, pairs @ ..] = words.as_slice() else {
        return Err("snapshot too short".into());
    };
    if *applied != snap.index || pairs.len() % 2 != 0 {
        return Err(format!("snapshot at {} says {applied}", snap.index));
    }
    n.kv = pairs.chunks(2).map(|p| (p[0], p[1])).collect();
    if !snap.membership.is_empty() {
        n.membership = snap.membership.clone();
    }
    (n.applied, n.applied_term, n.applied_ts, n.state_hash) =
        (snap.index, snap.term, snap.timestamp_ms, *hash);
    Ok(())
}

fn encode_put(key: u64, value: u64) -> Bytes {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&key.to_le_bytes());
    b.extend_from_slice(&value.to_le_bytes());
    Bytes::from(b)
}

fn decode_put(p: &[u8]) -> Option<(u64, u64)> {
    let k = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let v = u64::from_le_bytes(p.get(8..16)?.try_into().ok()?);
    Some((k, v))
}
