//! Linearizability of real nodes under faults: HTTP clients write (alone or in batches) and read
//! a few keys of `kv` through every node while members are killed with -9 (one, two, all of
//! them) or stopped (SIGTERM) and restarted, the leader is frozen past an election timeout or
//! cut off from the others (both ways, or one way), a follower is cut off both ways,
//! leadership is handed over, a new node joins and the leader removes itself, `kv` is upgraded
//! in place, and logs are compacted behind snapshots. Each key's history (when each call was
//! sent and answered, and what it saw) must be linearizable. The simulator checks the consensus
//! core this way; this checks the whole path a caller sees: HTTP, redirects, what each error
//! code promises, restarts from disk.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep::raft::sim::history::{HistOp, OpKind, linearizable};
use lockstep_tests::Lcg;
use lockstep_tests::cluster::{TestCluster, wait_until};
use lockstep_tests::guests;
use lockstep_tests::http::{Client, Reply};

const KEYS: u64 = 3;
const CLIENTS: u64 = 6;

/// What is done to the cluster while the clients run, one after the other.
#[derive(Debug)]
enum Fault {
    /// kill -9, and a restart a moment later. Without a quorum (two or three of them) writes
    /// and reads must stop, not go wrong.
    Kill(&'static [Who]),
    /// SIGTERM, as an operator stops a node: it answers the calls it has taken (for up to 5 s)
    /// and exits; restarted at once.
    Stop(Who),
    /// The leader frozen past an election timeout (SIGSTOP): the others elect another, and it
    /// wakes believing it still leads, with calls in hand.
    PauseLeader,
    /// Leadership handed to a follower.
    Transfer,
    /// Leadership handed to a follower that is cut off: it can never catch up, so the leader
    /// gives the hand-over up (`transfer_failed`) and leads on; meanwhile it proposes nothing.
    TransferToIsolated,
    /// A new node joins, is added, and the leader removes itself (it steps down once that
    /// commits); it stays up a while, called by clients, before it is stopped.
    ReplaceLeader,
    /// `kv` deployed again: an upgrade through the log, its state carried across by the old
    /// instance's snapshot and the new one's restore.
    Upgrade,
    /// Every link to and from a member cut for a while, then healed; it runs on, called by
    /// clients. An isolated leader cannot commit or confirm a read and must step down; the
    /// others elect a leader and go on. What it sent meanwhile arrives late, at the heal.
    Isolate(Who),
    /// The leader heard by its followers but hearing none of them (links cut one way): its
    /// heartbeats still arrive, yet it cannot commit, and must step down.
    DeafLeader,
    /// The leader hearing its followers but heard by none (the other way): they elect another,
    /// whose term reaches the old leader.
    MuteLeader,
    /// A follower cut off and replaced while it cannot hear of it: a new node joins and is
    /// added, the cut-off one removed. It is down through the heal (so nothing sent to it
    /// meanwhile arrives late) and restarted knowing nothing of either change: it calls
    /// elections among the members it remembers, must be told it is out, and must never lead
    /// or take the members' leader away. It runs a while, called by clients, then is stopped.
    ReplaceIsolated,
}

#[derive(Debug)]
enum Who {
    Leader,
    Follower,
    Other,
}

const FAULTS: [Fault; 18] = [
    Fault::Isolate(Who::Leader),
    Fault::Kill(&[Who::Leader]),
    Fault::Kill(&[Who::Follower]),
    Fault::Stop(Who::Leader),
    Fault::Upgrade,
    Fault::PauseLeader,
    Fault::Kill(&[Who::Leader, Who::Follower]),
    Fault::Transfer,
    Fault::ReplaceLeader,
    Fault::Kill(&[Who::Leader, Who::Follower, Who::Other]),
    Fault::PauseLeader,
    Fault::Kill(&[Who::Follower, Who::Other]),
    Fault::Stop(Who::Follower),
    Fault::DeafLeader,
    Fault::Isolate(Who::Follower),
    Fault::MuteLeader,
    Fault::ReplaceIsolated,
    Fault::TransferToIsolated,
];

/// How long a partition lasts once it has shown its effect, with clients calling every side.
const PARTITION: Duration = Duration::from_millis(1_500);

/// The members other than `i`.
fn others_of(i: usize, members: &[usize]) -> impl Iterator<Item = usize> + '_ {
    members.iter().copied().filter(move |&m| m != i)
}

/// Cuts every link between member `i` and the other members, both ways.
fn isolate(c: &TestCluster, i: usize, members: &[usize]) {
    let others = others_of(i, members).map(|m| c.nodes[m].id);
    c.links().isolate(c.nodes[i].id, others);
}

/// Replaces member `out` (the leader itself, perhaps): a new node joins, `leader` adds it and
/// then removes `out`, and the clients call the new node too. Returns the new node's index.
fn replace(
    c: &mut TestCluster,
    clients: &Clients,
    members: &mut Vec<usize>,
    leader: usize,
    out: usize,
) -> usize {
    let joiner = c.join();
    clients
        .shared
        .addrs
        .lock()
        .unwrap()
        .push(c.nodes[joiner].http.to_string());
    let (id, raft) = (c.nodes[joiner].id, c.nodes[joiner].raft);
    let added = c.client(leader).post(
        "/v1/cluster/members",
        format!(r#"{{"id":{id},"raft":"{raft}"}}"#).as_bytes(),
    );
    assert!(
        added.as_ref().is_ok_and(|r| r.status == 200),
        "adding {id}: {added:?}"
    );
    let id = c.nodes[out].id;
    let removed =
        c.client(leader)
            .request("DELETE", &format!("/v1/cluster/members/{id}"), &[], b"");
    assert!(
        removed.as_ref().is_ok_and(|r| r.status == 200),
        "removing {id}: {removed:?}"
    );
    members.retain(|&i| i != out);
    members.push(joiner);
    joiner
}

/// Waits until one of `nodes` (indexes in the cluster) reports itself leader, and returns it.
fn wait_for_leader_among(c: &TestCluster, nodes: &[usize]) -> usize {
    wait_until(Duration::from_secs(20), || {
        c.leader_among(nodes.iter().copied())
    })
    .unwrap_or_else(|| panic!("none of {nodes:?} took the lead across the partition"))
}

/// A counter in node `n`'s `/metrics`.
fn metric(c: &TestCluster, n: usize, name: &str) -> u64 {
    let text = c
        .client(n)
        .get("/metrics")
        .map(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("node {n}'s {name}"))
}

/// A number in node `n`'s `/v1/cluster` answer.
fn status(c: &TestCluster, n: usize, field: &str) -> u64 {
    c.cluster_status(n)
        .and_then(|s| s[field].as_u64())
        .unwrap_or_else(|| panic!("node {n}'s {field}"))
}

/// What an answer says about a call (or one task of a batch).
enum Outcome {
    /// Answered `200`.
    Done,
    /// Nothing was proposed (or a read refused): `307`, or a code that promises so.
    NotDone,
    /// It may or may not have taken effect.
    Unknown,
}

/// The codes the README promises mean "nothing was proposed".
const NOTHING_PROPOSED: [&str; 4] = ["no_leader", "shutting_down", "overloaded", "leader_moving"];

/// `None`: an answer no caller should get here.
fn judge(status: u64, code: Option<&str>) -> Option<Outcome> {
    match (status, code) {
        (200, _) => Some(Outcome::Done),
        (307, _) => Some(Outcome::NotDone),
        (503, Some(code)) if NOTHING_PROPOSED.contains(&code) => Some(Outcome::NotDone),
        (503, Some("outcome_unknown")) => Some(Outcome::Unknown),
        _ => None,
    }
}

/// A register value as `kv` answers it: `null` or a decimal string this test wrote.
fn value(v: &serde_json::Value) -> Option<u64> {
    let s = v.as_str()?;
    Some(
        s.parse()
            .unwrap_or_else(|_| panic!("a value nobody wrote: {s:?}")),
    )
}

/// One call of a client.
enum Call {
    /// A `put` of a fresh value to a key, alone or (several) in one `tasks:batch` request.
    Write(Vec<(u64, u64)>, bool),
    /// A linearizable query of a key.
    Read(u64),
}

impl Call {
    fn path(&self) -> &'static str {
        match self {
            Call::Write(_, false) => "/v1/machines/kv/tasks",
            Call::Write(_, true) => "/v1/machines/kv/tasks:batch",
            Call::Read(_) => "/v1/machines/kv/query",
        }
    }

    fn body(&self) -> String {
        let put = |(key, v): &(u64, u64)| format!(r#"{{"put":{{"key":"k{key}","value":"{v}"}}}}"#);
        match self {
            Call::Write(puts, false) => put(&puts[0]),
            Call::Write(puts, true) => {
                format!("[{}]", puts.iter().map(put).collect::<Vec<_>>().join(","))
            }
            Call::Read(key) => format!(r#"{{"get":{{"key":"k{key}"}}}}"#),
        }
    }
}

/// What the clients share with the test.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    history: Mutex<Vec<HistOp>>,
    /// Writes answered `200`.
    writes: AtomicUsize,
    unexpected: Mutex<Vec<String>>,
    /// The nodes' HTTP addresses, joiners included.
    addrs: Mutex<Vec<String>>,
}

/// Where a client sends its next call.
enum Next {
    Same,
    /// Where a `307` pointed.
    To(String),
    /// Another node, picked at random.
    Elsewhere,
}

impl Shared {
    /// The address of node `i`, modulo the number of nodes.
    fn addr(&self, i: u64) -> String {
        let addrs = self.addrs.lock().unwrap();
        addrs[(i % addrs.len() as u64) as usize].clone()
    }

    /// Records what `reply` says `call`, sent at `invoke`, did, and says where to send the next
    /// call.
    fn record(
        &self,
        call: &Call,
        invoke: u64,
        ret: u64,
        reply: std::io::Result<Reply>,
        sent_to: &str,
    ) -> Next {
        let done = |key, kind, read| HistOp {
            key,
            kind,
            invoke,
            ret: Some(ret),
            read,
        };
        // A write that may or may not have taken effect, at any time after `invoke`.
        let maybe = |key, v| HistOp {
            key,
            kind: OpKind::Put(v),
            invoke,
            ret: None,
            read: None,
        };
        let unknown = || match call {
            Call::Write(puts, _) => puts.iter().map(|&(key, v)| maybe(key, v)).collect(),
            Call::Read(_) => Vec::new(),
        };
        let unexpected = |what: String| {
            self.unexpected.lock().unwrap().push(format!(
                "{} sent to {sent_to} at µs {invoke}: {what}",
                call.body()
            ));
        };
        let reply = match reply {
            Ok(r) => r,
            // Nothing reached a node.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Next::Elsewhere,
            // Sent, perhaps received: the node died or the connection broke.
            Err(_) => {
                self.history.lock().unwrap().extend(unknown());
                return Next::Elsewhere;
            }
        };
        let (ops, next) = match judge(u64::from(reply.status), reply.error_code().as_deref()) {
            Some(Outcome::Done) => (
                self.answered(call, &reply, done, maybe, &unexpected),
                Next::Same,
            ),
            Some(Outcome::NotDone) => {
                let next = reply.redirect_addr().map_or(Next::Elsewhere, Next::To);
                (Vec::new(), next)
            }
            Some(Outcome::Unknown) => (unknown(), Next::Elsewhere),
            None => {
                unexpected(format!("{} {}", reply.status, reply.text()));
                (unknown(), Next::Elsewhere)
            }
        };
        self.history.lock().unwrap().extend(ops);
        next
    }

    /// The ops a `200` answer to `call` shows (each task of a batch has its own outcome), with
    /// `done` the op of a key that took effect.
    fn answered(
        &self,
        call: &Call,
        reply: &Reply,
        done: impl Fn(u64, OpKind, Option<u64>) -> HistOp,
        unknown: impl Fn(u64, u64) -> HistOp,
        unexpected: &impl Fn(String),
    ) -> Vec<HistOp> {
        let body = reply.json();
        let wrote = |key, v, prev| {
            self.writes.fetch_add(1, Ordering::Relaxed);
            done(key, OpKind::Swap(v, prev), None)
        };
        match call {
            Call::Read(key) => vec![done(*key, OpKind::Get, value(&body["value"]))],
            Call::Write(puts, false) => {
                let (key, v) = puts[0];
                vec![wrote(key, v, value(&body["prev"]))]
            }
            Call::Write(puts, true) => {
                let results = body["results"].as_array().cloned().unwrap_or_default();
                if results.len() != puts.len() {
                    unexpected(format!(
                        "{} results for {} tasks",
                        results.len(),
                        puts.len()
                    ));
                }
                let mut ops = Vec::new();
                for (i, &(key, v)) in puts.iter().enumerate() {
                    let r = results.get(i).cloned().unwrap_or_default();
                    let status = r["status"].as_u64().unwrap_or(0);
                    match judge(status, r["error"]["code"].as_str()) {
                        Some(Outcome::Done) => ops.push(wrote(key, v, value(&r["output"]["prev"]))),
                        Some(Outcome::NotDone) => {}
                        Some(Outcome::Unknown) => ops.push(unknown(key, v)),
                        None => {
                            unexpected(format!("task {i}: {r}"));
                            ops.push(unknown(key, v));
                        }
                    }
                }
                ops
            }
        }
    }
}

struct Clients {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    /// `CLIENTS` threads, each making one call at a time on a random key through a random
    /// node: a write (a `put`, whose answer says what it replaced), a batch of two or three
    /// writes, or a read (a linearizable query).
    fn start(c: &TestCluster, start: Instant) -> Self {
        let shared = Arc::new(Shared::default());
        *shared.addrs.lock().unwrap() = c.nodes.iter().map(|n| n.http.to_string()).collect();
        let threads = (0..CLIENTS)
            .map(|id| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let now = || start.elapsed().as_micros() as u64;
                    let mut rng = Lcg(id + 1);
                    let mut client = Client::new(shared.addr(id));
                    let mut seq = 0u64;
                    let mut fresh = |rng: &mut Lcg| {
                        seq += 1;
                        (rng.below(KEYS), id << 32 | seq)
                    };
                    while !shared.stop.load(Ordering::Relaxed) {
                        let call = match rng.below(5) {
                            0 | 1 => Call::Read(rng.below(KEYS)),
                            2 | 3 => Call::Write(vec![fresh(&mut rng)], false),
                            _ => {
                                let n = 2 + rng.below(2);
                                Call::Write((0..n).map(|_| fresh(&mut rng)).collect(), true)
                            }
                        };
                        let invoke = now();
                        let reply = client.post(call.path(), call.body().as_bytes());
                        let ret = now();
                        match shared.record(&call, invoke, ret, reply, client.addr()) {
                            Next::Same => {}
                            Next::To(addr) => client = Client::new(addr),
                            Next::Elsewhere => {
                                client = Client::new(shared.addr(rng.below(u64::MAX)));
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                })
            })
            .collect();
        Clients { shared, threads }
    }

    /// Waits until `n` more writes have been answered `200`.
    fn wait_for_writes(&self, n: usize, what: &str) {
        let writes = &self.shared.writes;
        let target = writes.load(Ordering::Relaxed) + n;
        wait_until(Duration::from_secs(30), || {
            (writes.load(Ordering::Relaxed) >= target).then_some(())
        })
        .unwrap_or_else(|| panic!("no writes succeeded {what}"));
    }

    fn stop(self) -> (Vec<HistOp>, Vec<String>) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("client thread");
        }
        let history = std::mem::take(&mut *self.shared.history.lock().unwrap());
        let unexpected = std::mem::take(&mut *self.shared.unexpected.lock().unwrap());
        (history, unexpected)
    }
}

/// Every key's history, checked; on failure the key's history, in the order calls were sent, is
/// written to a file the message names.
fn assert_linearizable(history: &[HistOp]) {
    for key in 0..KEYS {
        let mut ops: Vec<&HistOp> = history.iter().filter(|o| o.key == key).collect();
        if !linearizable(&ops) {
            ops.sort_by_key(|o| o.invoke);
            let lines: String = ops
                .iter()
                .map(|o| {
                    format!(
                        "µs {} → {:?}: {:?} read {:?}\n",
                        o.invoke, o.ret, o.kind, o.read
                    )
                })
                .collect();
            let file = std::env::temp_dir().join(format!(
                "lockstep-history-k{key}-{}.txt",
                std::process::id()
            ));
            let kept = std::fs::write(&file, lines).map_or_else(
                |e| format!("not written to {}: {e}", file.display()),
                |()| format!("in {}", file.display()),
            );
            panic!(
                "the history of k{key} ({} calls) is not linearizable; the calls are {kept}",
                ops.len()
            );
        }
    }
}

#[test]
fn histories_under_crashes_partitions_and_membership_changes_are_linearizable() {
    let start = Instant::now();
    let mut c =
        TestCluster::start_partitionable(3, &["--snapshot-every", "300", "--snapshot-keep", "50"]);
    c.deploy_guest("kv", guests::KV);
    let clients = Clients::start(&c, start);
    clients.wait_for_writes(50, "before any fault");

    let mut rng = Lcg(7);
    // Followers cut off until the leader compacted its log past them, caught up by a snapshot.
    let mut snapshots_sent = 0;
    // Indexes (in `c.nodes`) of the members.
    let mut members = vec![0, 1, 2];
    // A longer soak: `LOCKSTEP_LIN_CYCLES=20 cargo test -p lockstep-tests --test linearizability`.
    let cycles: usize = match std::env::var("LOCKSTEP_LIN_CYCLES") {
        Ok(v) => v.parse().expect("LOCKSTEP_LIN_CYCLES: a number of cycles"),
        Err(_) => 1,
    };
    for (round, fault) in FAULTS
        .iter()
        .cycle()
        .take(FAULTS.len() * cycles)
        .enumerate()
    {
        let leader = c.wait_for_leader(Duration::from_secs(20));
        let others: Vec<usize> = others_of(leader, &members).collect();
        let k = rng.below(2) as usize;
        let (follower, other) = (others[k], others[1 - k]);
        let pick = |w: &Who| match w {
            Who::Leader => leader,
            Who::Follower => follower,
            Who::Other => other,
        };
        match fault {
            Fault::Kill(who) => {
                let killed: Vec<usize> = who.iter().map(&pick).collect();
                for &i in &killed {
                    c.kill(i);
                }
                std::thread::sleep(Duration::from_millis(300 + 100 * rng.below(5)));
                for &i in &killed {
                    c.restart(i);
                }
            }
            Fault::Stop(who) => {
                let i = pick(who);
                assert!(c.stop(i, Duration::from_secs(15)), "node {i} did not stop");
                c.restart(i);
            }
            Fault::PauseLeader => {
                c.pause(leader);
                std::thread::sleep(Duration::from_millis(2_500));
                c.resume(leader);
            }
            Fault::Transfer => {
                let to = c.nodes[follower].id;
                let r = c
                    .client(leader)
                    .post("/v1/cluster/leader", format!(r#"{{"id":{to}}}"#).as_bytes());
                assert!(r.is_ok(), "transfer request failed: {r:?}");
            }
            Fault::TransferToIsolated => {
                isolate(&c, follower, &members);
                let to = c.nodes[follower].id;
                let r = c
                    .client(leader)
                    .post("/v1/cluster/leader", format!(r#"{{"id":{to}}}"#).as_bytes())
                    .expect("transfer request");
                assert_eq!(
                    (r.status, r.error_code().as_deref()),
                    (503, Some("transfer_failed")),
                    "a hand-over to a member cut off: {}",
                    r.text()
                );
                clients.wait_for_writes(30, "after a hand-over was given up");
                assert_eq!(
                    c.leader_among([leader]),
                    Some(leader),
                    "the leader gave a failed hand-over its lead"
                );
                c.links().heal();
            }
            Fault::ReplaceLeader => {
                replace(&mut c, &clients, &mut members, leader, leader);
                // It stays up a while, no longer a member, with clients still calling it.
                clients.wait_for_writes(30, "after the leader removed itself");
                c.kill(leader);
            }
            Fault::ReplaceIsolated => {
                isolate(&c, follower, &members);
                replace(&mut c, &clients, &mut members, leader, follower);
                // Down through the heal: nothing the leader sent it before giving it up arrives.
                c.kill(follower);
                std::thread::sleep(PARTITION);
                c.links().heal();
                c.restart(follower);
                let never_leads = || {
                    let leads = c.leader_among([follower]).is_some();
                    assert!(!leads, "a removed member took the lead");
                };
                let told = wait_until(Duration::from_secs(20), || {
                    never_leads();
                    c.node_log(follower)
                        .contains("this node was removed from the members")
                        .then_some(())
                });
                assert!(
                    told.is_some(),
                    "a member removed while cut off was not told"
                );
                clients.wait_for_writes(30, "with a member removed while cut off back");
                never_leads();
                c.kill(follower);
            }
            Fault::Upgrade => {
                let r = c.deploy("kv", &guests::read(guests::KV));
                assert_eq!(r.status, 200, "upgrading kv: {}", r.text());
            }
            Fault::Isolate(Who::Leader) => {
                isolate(&c, leader, &members);
                // The partition is real: the others elect a leader of their own.
                wait_for_leader_among(&c, &others);
                std::thread::sleep(PARTITION);
                c.links().heal();
            }
            Fault::Isolate(who) => {
                let i = pick(who);
                isolate(&c, i, &members);
                // All the follower can still hear was sent before the cut, with a commit index
                // no higher than the leader's now; the others go on committing.
                let bound = status(&c, leader, "commit_index");
                clients.wait_for_writes(30, "with a follower cut off");
                let (cut_off, went_on) = (
                    status(&c, i, "commit_index"),
                    status(&c, leader, "commit_index"),
                );
                assert!(
                    cut_off <= bound && bound < went_on,
                    "an isolated follower at commit {cut_off}, the leader {bound} at the cut \
                     and {went_on} since"
                );
                std::thread::sleep(PARTITION);
                // Healed, the follower catches up: from a snapshot if the leader compacted its
                // log past the follower's end meanwhile.
                let installed = |n| metric(&c, n, "lockstep_snapshots_installed_total");
                let before = installed(i);
                let past = status(&c, leader, "compacted_index") > status(&c, i, "last_index");
                c.links().heal();
                let commit = status(&c, leader, "commit_index");
                wait_until(Duration::from_secs(20), || {
                    let s = c.cluster_status(i)?;
                    (s["applied_index"].as_u64()? >= commit).then_some(())
                })
                .unwrap_or_else(|| panic!("a healed follower did not catch up to {commit}"));
                if past {
                    assert!(installed(i) > before, "caught up past a compacted log");
                    snapshots_sent += 1;
                }
            }
            Fault::DeafLeader | Fault::MuteLeader => {
                let old = c.nodes[leader].id;
                let deaf = matches!(fault, Fault::DeafLeader);
                for &m in &others {
                    let id = c.nodes[m].id;
                    let (from, to) = if deaf { (id, old) } else { (old, id) };
                    c.links().cut(from, to);
                }
                let new = wait_for_leader_among(&c, &others);
                let term = status(&c, new, "term");
                if deaf {
                    // It hears nothing, the new term included.
                    assert!(
                        status(&c, leader, "term") < term,
                        "a deaf leader heard a term"
                    );
                } else {
                    // It hears the new leader, and follows it.
                    let new_id = c.nodes[new].id;
                    wait_until(Duration::from_secs(10), || {
                        let s = c.cluster_status(leader)?;
                        (s["leader"]["id"] == new_id).then_some(())
                    })
                    .unwrap_or_else(|| panic!("a mute leader did not hear of {new_id}"));
                }
                std::thread::sleep(PARTITION);
                c.links().heal();
            }
        }
        clients.wait_for_writes(30, &format!("after round {round} ({fault:?})"));
    }
    clients.wait_for_writes(50, "once the faults were over");
    let (mut history, unexpected) = clients.stop();

    // One last read of every key, with nothing else running.
    let leader = c.wait_for_leader(Duration::from_secs(20));
    let mut client = c.client(leader);
    for key in 0..KEYS {
        let invoke = start.elapsed().as_micros() as u64;
        let r = client
            .post(
                "/v1/machines/kv/query",
                format!(r#"{{"get":{{"key":"k{key}"}}}}"#).as_bytes(),
            )
            .expect("final read");
        assert_eq!(r.status, 200, "{}", r.text());
        history.push(HistOp {
            key,
            kind: OpKind::Get,
            invoke,
            ret: Some(start.elapsed().as_micros() as u64),
            read: value(&r.json()["value"]),
        });
    }

    assert!(
        unexpected.is_empty(),
        "answers no caller should get: {unexpected:?}"
    );
    let count = |f: fn(&HistOp) -> bool| history.iter().filter(|o| f(o)).count();
    let (writes, reads) = (
        count(|o| matches!(o.kind, OpKind::Swap(..))),
        count(|o| o.kind == OpKind::Get),
    );
    assert!(
        writes >= 300 && reads >= 300,
        "{writes} writes and {reads} reads"
    );
    eprintln!(
        "{writes} writes, {reads} reads, {} writes of unknown outcome; {snapshots_sent} \
         partitioned followers caught up by a snapshot",
        count(|o| o.ret.is_none())
    );
    assert_linearizable(&history);
    c.wait_converged("kv", Duration::from_secs(30));
    let snapshots: u64 = (0..c.nodes.len())
        .filter(|&i| c.cluster_status(i).is_some())
        .map(|i| metric(&c, i, "lockstep_snapshots_taken_total"))
        .sum();
    assert!(snapshots > 0, "no snapshot was taken");
}
