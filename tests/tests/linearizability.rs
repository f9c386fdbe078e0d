//! Linearizability of real nodes under faults: HTTP clients write and read a few keys of `kv`
//! through every node while members are killed with -9 (one, two, all of them) and restarted,
//! the leader is frozen past an election timeout, logs are compacted behind snapshots, and
//! leadership is handed over. Each key's history (when each call was sent and answered, and
//! what it saw) must be linearizable. The simulator checks the consensus core this way; this
//! checks the whole path a caller sees: HTTP, redirects, what each error code promises, restarts
//! from disk.

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
    /// The leader frozen past an election timeout (SIGSTOP): the others elect another, and it
    /// wakes believing it still leads, with calls in hand.
    PauseLeader,
    /// Leadership handed to a follower.
    Transfer,
}

#[derive(Debug)]
enum Who {
    Leader,
    Follower,
    Other,
}

const FAULTS: [Fault; 8] = [
    Fault::Kill(&[Who::Leader]),
    Fault::Kill(&[Who::Follower]),
    Fault::PauseLeader,
    Fault::Kill(&[Who::Leader, Who::Follower]),
    Fault::Transfer,
    Fault::Kill(&[Who::Leader, Who::Follower, Who::Other]),
    Fault::PauseLeader,
    Fault::Kill(&[Who::Follower, Who::Other]),
];

/// What a call's answer says about whether it took effect.
enum Outcome {
    /// Answered `200`.
    Done(Reply),
    /// Nothing was proposed (or a read refused): `307`, or an error that promises so.
    NotDone(Option<String>),
    /// It may or may not have taken effect.
    Unknown,
}

/// The codes the README promises mean "nothing was proposed".
const NOTHING_PROPOSED: [&str; 4] = ["no_leader", "shutting_down", "overloaded", "leader_moving"];

fn outcome(r: std::io::Result<Reply>, call: &str, unexpected: &Mutex<Vec<String>>) -> Outcome {
    match r {
        Ok(r) if r.status == 200 => Outcome::Done(r),
        Ok(r) if r.status == 307 => Outcome::NotDone(r.header("location").map(str::to_owned)),
        Ok(r) if r.status == 503 => match r.error_code().as_deref() {
            Some(code) if NOTHING_PROPOSED.contains(&code) => Outcome::NotDone(None),
            Some("outcome_unknown") => Outcome::Unknown,
            _ => {
                unexpected
                    .lock()
                    .unwrap()
                    .push(format!("{call}: {}", r.text()));
                Outcome::Unknown
            }
        },
        Ok(r) => {
            unexpected
                .lock()
                .unwrap()
                .push(format!("{call}: {} {}", r.status, r.text()));
            Outcome::Unknown
        }
        // Nothing reached a node.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::NotDone(None),
        // Sent, perhaps received: the node died or the connection broke.
        Err(_) => Outcome::Unknown,
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

struct Clients {
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<HistOp>>>,
    /// Writes answered `200`.
    writes: Arc<AtomicUsize>,
    unexpected: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    /// `CLIENTS` threads, each writing (a `put`, whose answer says what it replaced) or reading
    /// (a linearizable query) a random key through a random node, one call at a time.
    fn start(c: &TestCluster, start: Instant) -> Self {
        let addrs: Vec<String> = c.nodes.iter().map(|n| n.http.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(Vec::new()));
        let writes = Arc::new(AtomicUsize::new(0));
        let unexpected = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..CLIENTS)
            .map(|id| {
                let (addrs, stop, history, writes, unexpected) = (
                    addrs.clone(),
                    stop.clone(),
                    history.clone(),
                    writes.clone(),
                    unexpected.clone(),
                );
                std::thread::spawn(move || {
                    let now = || start.elapsed().as_micros() as u64;
                    let mut rng = Lcg(id + 1);
                    let mut client = Client::new(addrs[(id % 3) as usize].clone());
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = rng.below(KEYS);
                        let write = rng.below(2) == 0;
                        let (path, body, written) = if write {
                            seq += 1;
                            let v = id << 32 | seq;
                            let body = format!(r#"{{"put":{{"key":"k{key}","value":"{v}"}}}}"#);
                            ("/v1/machines/kv/tasks", body, Some(v))
                        } else {
                            let body = format!(r#"{{"get":{{"key":"k{key}"}}}}"#);
                            ("/v1/machines/kv/query", body, None)
                        };
                        let invoke = now();
                        let reply = client.post(path, body.as_bytes());
                        let ret = now();
                        let op = |kind, ret, read| HistOp {
                            key,
                            kind,
                            invoke,
                            ret,
                            read,
                        };
                        let call = format!(
                            "{} of k{key} sent to {} at µs {invoke}",
                            if write { "write" } else { "read" },
                            client.addr()
                        );
                        let recorded = match (outcome(reply, &call, &unexpected), written) {
                            (Outcome::Done(r), Some(v)) => {
                                writes.fetch_add(1, Ordering::Relaxed);
                                Some(op(
                                    OpKind::Swap(v, value(&r.json()["prev"])),
                                    Some(ret),
                                    None,
                                ))
                            }
                            (Outcome::Done(r), None) => {
                                Some(op(OpKind::Get, Some(ret), value(&r.json()["value"])))
                            }
                            (Outcome::Unknown, Some(v)) => Some(op(OpKind::Put(v), None, None)),
                            (Outcome::NotDone(Some(location)), _) => {
                                let host = location.trim_start_matches("http://");
                                client = Client::new(host.split('/').next().unwrap_or(host));
                                None
                            }
                            (Outcome::NotDone(None) | Outcome::Unknown, _) => {
                                let next = addrs[rng.below(addrs.len() as u64) as usize].clone();
                                client = Client::new(next);
                                std::thread::sleep(Duration::from_millis(10));
                                None
                            }
                        };
                        history.lock().unwrap().extend(recorded);
                    }
                })
            })
            .collect();
        Clients {
            stop,
            history,
            writes,
            unexpected,
            threads,
        }
    }

    /// Waits until `n` more writes have been answered `200`.
    fn wait_for_writes(&self, n: usize, what: &str) {
        let target = self.writes.load(Ordering::Relaxed) + n;
        wait_until(Duration::from_secs(30), || {
            (self.writes.load(Ordering::Relaxed) >= target).then_some(())
        })
        .unwrap_or_else(|| panic!("no writes succeeded {what}"));
    }

    fn stop(self) -> (Vec<HistOp>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("client thread");
        }
        let history = std::mem::take(&mut *self.history.lock().unwrap());
        let unexpected = std::mem::take(&mut *self.unexpected.lock().unwrap());
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
fn histories_under_kill_9_pauses_and_snapshots_are_linearizable() {
    let start = Instant::now();
    let mut c =
        TestCluster::start_with_args(3, &["--snapshot-every", "300", "--snapshot-keep", "50"]);
    c.deploy_guest("kv", guests::KV);
    let clients = Clients::start(&c, start);
    clients.wait_for_writes(50, "before any fault");

    let mut rng = Lcg(7);
    for (round, fault) in FAULTS.iter().enumerate() {
        let leader = c.wait_for_leader(Duration::from_secs(20));
        let follower = (leader + 1 + rng.below(2) as usize) % 3;
        match fault {
            Fault::Kill(who) => {
                let killed: Vec<usize> = who
                    .iter()
                    .map(|w| match w {
                        Who::Leader => leader,
                        Who::Follower => follower,
                        Who::Other => 3 - leader - follower,
                    })
                    .collect();
                for &i in &killed {
                    c.kill(i);
                }
                std::thread::sleep(Duration::from_millis(300 + 100 * rng.below(5)));
                for &i in &killed {
                    c.restart(i);
                }
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
        "{writes} writes, {reads} reads, {} writes of unknown outcome",
        count(|o| o.ret.is_none())
    );
    assert_linearizable(&history);
    c.wait_converged("kv", Duration::from_secs(30));
    let snapshots: u64 = (0..3)
        .filter_map(|i| {
            let text = c.client(i).get("/metrics").ok()?.text();
            let line = text
                .lines()
                .find(|l| l.starts_with("lockstep_snapshots_taken_total "))?;
            line.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    assert!(snapshots > 0, "no snapshot was taken");
}
