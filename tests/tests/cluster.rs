//! Black-box tests: real `lockstep serve` processes on 127.0.0.1, driven over HTTP.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_tests::cluster::{TestCluster, wait_until};
use lockstep_tests::guests;
use lockstep_tests::http::Client;

/// Each test runs a 3-node cluster (three fsyncing processes): on 2 cores they run one at a
/// time, or elections time out under the load of the others.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn three_nodes_apply_1000_tasks_from_16_clients_and_agree() {
    let _serial = serial();
    let c = TestCluster::start(3);
    let r = c.deploy("counter", &guests::read(guests::COUNTER));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], 1);

    let leader = c.wait_for_leader(Duration::from_secs(10));
    let addr = c.nodes[leader].http.to_string();
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (addr, results) = (addr.clone(), results.clone());
            std::thread::spawn(move || {
                let mut client = Client::new(addr);
                let n = if t < 8 { 63 } else { 62 };
                for _ in 0..n {
                    let r = client
                        .post("/v1/machines/counter/tasks", br#"{"add":1}"#)
                        .expect("task");
                    assert_eq!(r.status, 200, "{}", r.text());
                    let index: u64 = r
                        .header("lockstep-index")
                        .expect("index")
                        .parse()
                        .expect("u64");
                    assert!(r.header("lockstep-term").is_some());
                    let value = r.json()["value"].as_i64().expect("value");
                    results.lock().unwrap().push((index, value));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let mut results = results.lock().unwrap().clone();
    assert_eq!(results.len(), 1000);
    results.sort();
    let indexes: BTreeSet<u64> = results.iter().map(|r| r.0).collect();
    assert_eq!(indexes.len(), 1000, "indexes must be unique");
    // Each task added 1, so in log order the values are exactly 1..=1000.
    let values: Vec<i64> = results.iter().map(|r| r.1).collect();
    assert_eq!(values, (1..=1000).collect::<Vec<_>>());

    let digest = c.wait_converged("counter", Duration::from_secs(20));
    assert_eq!(digest.len(), 64);
    for i in 0..3 {
        let q = c
            .client(i)
            .post("/v1/machines/counter/query?consistency=local", b"")
            .expect("query");
        assert_eq!(q.json()["value"], 1000, "node {i}: {}", q.text());
    }
}

/// Writers that put unique keys into `kv` until stopped, recording every acknowledged key.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    /// Answers `outcome_unknown` (proposed, then leadership lost).
    unknown: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(c: &TestCluster, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let unknown = Arc::new(AtomicUsize::new(0));
        let addrs: Vec<String> = c.nodes.iter().map(|n| n.http.to_string()).collect();
        let threads = (0..n)
            .map(|w| {
                let (stop, acked, unknown, addrs) =
                    (stop.clone(), acked.clone(), unknown.clone(), addrs.clone());
                std::thread::spawn(move || {
                    let mut target = 0;
                    let mut client = Client::new(addrs[target].clone());
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-{seq}");
                        let body = format!(r#"{{"put":{{"key":"{key}","value":"v"}}}}"#);
                        match client.post("/v1/machines/kv/tasks", body.as_bytes()) {
                            Ok(r) if r.status == 200 => {
                                acked.lock().unwrap().push(key);
                                seq += 1;
                            }
                            Ok(r) if r.status == 307 => {
                                if let Some(host) = r.redirect_addr() {
                                    client = Client::new(host);
                                }
                            }
                            // Down, no leader yet, or outcome unknown: try another node. The key
                            // is retired either way, since it may or may not have been applied.
                            other => {
                                if other.is_ok_and(|r| {
                                    r.error_code().as_deref() == Some("outcome_unknown")
                                }) {
                                    unknown.fetch_add(1, Ordering::Relaxed);
                                }
                                seq += 1;
                                target = (target + 1) % addrs.len();
                                client = Client::new(addrs[target].clone());
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            unknown,
            threads,
        }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("writer thread");
        }
        self.acked.lock().unwrap().clone()
    }
}

/// Every acknowledged write is in the leader's state, and the replicas then converge.
/// Three nodes with `kv` deployed, `writers` writing to it, `acks` of their writes acknowledged.
fn kv_under_load(writers: usize, acks: usize) -> (TestCluster, Writers) {
    let c = TestCluster::start(3);
    c.deploy_guest("kv", guests::KV);
    let w = Writers::start(&c, writers);
    wait_for_acks(&w, acks);
    (c, w)
}

fn assert_no_acked_write_lost(c: &TestCluster, acked: &[String]) {
    let present = all_keys(c);
    let lost: Vec<_> = acked.iter().filter(|k| !present.contains(*k)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
    c.wait_converged("kv", Duration::from_secs(30));
}

fn all_keys(c: &TestCluster) -> BTreeSet<String> {
    let leader = c.wait_for_leader(Duration::from_secs(20));
    let r = c
        .client(leader)
        .post("/v1/machines/kv/query", br#"{"scan":{"prefix":""}}"#)
        .expect("scan");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|kv| kv[0].as_str().map(str::to_owned))
        .collect()
}

fn wait_for_acks(w: &Writers, n: usize) {
    wait_until(Duration::from_secs(30), || {
        (w.acked_count() >= n).then_some(())
    })
    .expect("writers made no progress");
}

#[test]
fn leader_kill_9_under_load_loses_no_acknowledged_write() {
    let _serial = serial();
    let (mut c, w) = kv_under_load(8, 200);

    let old = c.wait_for_leader(Duration::from_secs(5));
    let old_term = c.cluster_status(old).expect("status")["term"]
        .as_u64()
        .expect("term");
    c.kill(old);
    let killed_at = Instant::now();
    let before = w.acked_count();
    // Writes succeed again under a new leader.
    wait_until(Duration::from_secs(10), || {
        (w.acked_count() > before + 20).then_some(())
    })
    .expect("no writes after the leader died");
    let recovered = killed_at.elapsed();
    assert!(
        recovered < Duration::from_secs(5),
        "writes resumed only after {recovered:?}"
    );
    // The survivors agree on a newer term and a leader that is not the dead node.
    let new = c.wait_for_leader(Duration::from_secs(5));
    let s = c.cluster_status(new).expect("status");
    assert!(s["term"].as_u64().expect("term") > old_term);
    assert_ne!(s["leader"]["id"].as_u64(), Some(c.nodes[old].id));

    c.restart(old);
    wait_for_acks(&w, w.acked_count() + 100);
    let acked = w.stop();
    assert_no_acked_write_lost(&c, &acked);
}

#[test]
fn whole_cluster_kill_9_under_load_keeps_every_acknowledged_write() {
    let _serial = serial();
    let (mut c, w) = kv_under_load(8, 300);
    for i in 0..3 {
        c.kill(i);
    }
    let acked = w.stop();
    for i in 0..3 {
        c.restart(i);
    }
    assert_no_acked_write_lost(&c, &acked);
}

/// An operator moves leadership (before restarting the leader's machine, say): the member
/// asked for leads within moments, writers carry on, and a hand-over in a healthy cluster
/// leaves no caller with an unknown outcome (everything proposed is committed first).
#[test]
fn leadership_moves_to_the_member_asked_for_and_no_write_is_lost() {
    let _serial = serial();
    let (c, w) = kv_under_load(8, 200);
    let leader = c.wait_for_leader(Duration::from_secs(5));
    let target = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let (target_id, leader_id) = (c.nodes[target].id, c.nodes[leader].id);
    let body = format!(r#"{{"id":{target_id}}}"#);

    // A follower sends the caller to the leader.
    let r = c
        .client(other)
        .post("/v1/cluster/leader", body.as_bytes())
        .expect("post");
    assert_eq!(r.status, 307, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some(format!("http://{}/v1/cluster/leader", c.nodes[leader].http).as_str())
    );
    // Bad requests change nothing.
    for (bad, expect) in [
        (r#"{"id":9}"#, "node 9 is not a member (members: 1, 2, 3)"),
        ("garbage", "the body must be"),
        (r#"{"id":2,"x":1}"#, "the body must be"),
    ] {
        let r = c
            .client(leader)
            .post("/v1/cluster/leader", bad.as_bytes())
            .expect("post");
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.text().contains(expect), "{bad}: {}", r.text());
    }
    let r = c.client(leader).get("/v1/cluster/leader").expect("get");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));

    let unknown_before = w.unknown.load(Ordering::Relaxed);
    let asked = Instant::now();
    let r = c
        .client(leader)
        .post("/v1/cluster/leader", body.as_bytes())
        .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["leader"]["id"].as_u64(), Some(target_id));
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(2), "the hand-over took {took:?}");
    let s = c.cluster_status(target).expect("status");
    assert_eq!(s["role"], "leader", "{s}");
    let before = w.acked_count();
    wait_for_acks(&w, before + 200);

    // And back, through the CLI.
    let stdout = c.cli_ok(other, &["transfer-leader", &leader_id.to_string()]);
    assert!(stdout.contains(&format!(r#""id":{leader_id}"#)), "{stdout}");
    wait_for_acks(&w, w.acked_count() + 200);
    let unknown = w.unknown.load(Ordering::Relaxed) - unknown_before;
    let acked = w.stop();
    assert_eq!(unknown, 0, "callers left with an unknown outcome");
    assert_no_acked_write_lost(&c, &acked);
}

/// A transfer to a member that is down is given up after an election timeout: the caller is
/// told, and the leader takes tasks again.
#[test]
fn a_transfer_to_a_stopped_member_fails_clearly_and_the_leader_leads_on() {
    let _serial = serial();
    let mut c = TestCluster::start(3);
    c.deploy_guest("counter", guests::COUNTER);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let target = (leader + 1) % 3;
    c.kill(target);
    let body = format!(r#"{{"id":{}}}"#, c.nodes[target].id);
    let asked = Instant::now();
    let r = c
        .client(leader)
        .post("/v1/cluster/leader", body.as_bytes())
        .expect("post");
    let took = asked.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.error_code().as_deref(),
        Some("transfer_failed"),
        "{}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "given up after {took:?}"
    );
    let r = c
        .client(leader)
        .post("/v1/machines/counter/tasks", br#"{"add":1}"#)
        .expect("post");
    assert_eq!(
        r.status,
        200,
        "tasks again after the hand-over was given up: {}",
        r.text()
    );
    c.restart(target);
}

#[test]
fn follower_redirects_to_the_leader() {
    let _serial = serial();
    let c = TestCluster::start(3);
    c.deploy_guest("counter", guests::COUNTER);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let follower = (leader + 1) % 3;
    let r = c
        .client(follower)
        .post("/v1/machines/counter/tasks", br#"{"add":5}"#)
        .expect("post");
    assert_eq!(r.status, 307, "{}", r.text());
    let loc = r.header("location").expect("location");
    assert_eq!(
        loc,
        format!("http://{}/v1/machines/counter/tasks", c.nodes[leader].http)
    );
    let r = Client::new(r.redirect_addr().expect("leader address"))
        .post("/v1/machines/counter/tasks", br#"{"add":5}"#)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["value"], 5);
    let index: u64 = r
        .header("lockstep-index")
        .and_then(|v| v.parse().ok())
        .expect("lockstep-index");

    // Only the leader knows how far each member's log goes; a follower says it does not.
    let matched = |i: usize| -> Vec<serde_json::Value> {
        let r = c.client(i).get("/v1/cluster").expect("cluster");
        let members = r.json()["members"].as_array().cloned().expect("members");
        members.iter().map(|m| m["match_index"].clone()).collect()
    };
    assert!(
        matched(follower).iter().all(serde_json::Value::is_null),
        "{:?}",
        matched(follower)
    );
    let caught_up = wait_until(Duration::from_secs(10), || {
        let m = matched(leader);
        m.iter()
            .all(|v| v.as_u64().is_some_and(|i| i >= index))
            .then_some(m)
    });
    assert!(caught_up.is_some(), "{:?}", matched(leader));
}

#[test]
fn redirects_and_listings_use_the_advertised_http_address() {
    let _serial = serial();
    // The nodes listen on 127.0.0.1 and tell clients "localhost": what a node behind a
    // wildcard or NATed address does with --advertise-http.
    let c = TestCluster::start_advertising(3, "localhost");
    c.deploy_guest("counter", guests::COUNTER);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let follower = (leader + 1) % 3;
    let advertised = format!("localhost:{}", c.nodes[leader].http.port());
    let r = c
        .client(follower)
        .post("/v1/machines/counter/tasks", br#"{"add":5}"#)
        .expect("post");
    assert_eq!(r.status, 307, "{}", r.text());
    assert_eq!(
        r.header("location").expect("location"),
        format!("http://{advertised}/v1/machines/counter/tasks")
    );
    let status = c.cluster_status(follower).expect("cluster status");
    assert_eq!(status["leader"]["http"], advertised.as_str(), "{status}");
}

#[test]
fn serve_refuses_a_wildcard_http_address_without_an_advertised_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Held, so that a node which got past its flags would fail to bind it and exit at once
    // (the test fails instead of hanging).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let raft = taken.local_addr().expect("addr").to_string();
    let peers = format!("1={raft}");
    let serve = |extra: &[&str]| {
        std::process::Command::new(lockstep_tests::cluster::lockstep_bin())
            .args(["serve", "--id", "1", "--data-dir"])
            .arg(dir.path().join("node1"))
            .args(["--raft", &raft, "--peers", &peers])
            .args(extra)
            .output()
            .expect("run lockstep serve")
    };
    // Refused before anything is bound or written.
    let out = serve(&["--http", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--advertise-http HOST:PORT"), "{err}");
    assert!(!dir.path().join("node1").exists());
    for bad in [
        "http://example.com:80",
        "example.com",
        "example.com:http",
        ":80",
    ] {
        let out = serve(&["--http", "127.0.0.1:0", "--advertise-http", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
    }
}

#[test]
fn bad_input_gets_clear_errors_and_the_cluster_stays_healthy() {
    let _serial = serial();
    let c = TestCluster::start(3);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let mut l = c.client(leader);

    let r = l
        .request("PUT", "/v1/machines/junk", &[], b"this is not wasm")
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("invalid_module"));

    c.deploy_guest("chaos", guests::CHAOS);
    // A 2 MiB task: the node answers 413 from the headers alone, before any body is sent.
    let mut raw = TcpStream::connect(c.nodes[leader].http).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(
        b"POST /v1/machines/chaos/tasks HTTP/1.1\r\nhost: x\r\ncontent-length: 2097152\r\n\r\n",
    )
    .unwrap();
    let mut head = vec![0u8; 4096];
    let n = raw.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("too_large"), "{head}");
    // And a whole 2 MiB body, sent by a client that does not wait: the 413 too, since the
    // node reads the rest of the body behind its answer instead of resetting the connection.
    let r = l
        .post("/v1/machines/chaos/tasks", &vec![b'x'; 2 * 1024 * 1024])
        .expect("the 413, not a reset");
    assert_eq!(r.status, 413, "{}", r.text());
    let mut l = c.client(leader);
    let r = l.post("/v1/machines/nope/tasks", b"{}").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("not_found"));
    // A parameter or a header given twice is refused, not guessed at (nothing is proposed:
    // the counts below would be off); so is a digest flag that is neither yes nor no.
    let refused = |r: lockstep_tests::http::Reply, says: &str| {
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains(says), "{}", r.text());
    };
    let twice = "/v1/machines/chaos/query?consistency=local&consistency=linearizable";
    refused(
        l.post(twice, b"").unwrap(),
        "consistency given more than once",
    );
    refused(
        l.get("/v1/machines/chaos?digest=yes").unwrap(),
        "digest must be 1, true, 0 or false",
    );
    let r = l.get("/v1/machines/chaos?digest=0").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("state_digest").is_none(), "{}", r.text());
    let term = c.cluster_status(leader).expect("status")["term"].to_string();
    let terms = [
        ("lockstep-expected-term", term.as_str()),
        ("lockstep-expected-term", "1"),
    ];
    let r = l.request("POST", "/v1/machines/chaos/tasks", &terms, br#"{"add":1}"#);
    refused(r.unwrap(), "given more than once");
    // A known route with another method is a 405; an unknown path a 404, whatever the method.
    let r = l.get("/v1/machines/chaos/tasks").unwrap();
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("method_not_allowed"));
    assert_eq!(r.header("allow"), Some("POST"));
    let r = l.post("/v1/machines/chaos", b"").unwrap();
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), Some("GET, HEAD, PUT, DELETE"));
    let r = l.get("/v1/machines/chaos/tasks/what").unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    // A caller's long input is not echoed back whole.
    let r = l.get(&format!("/{}", "p".repeat(8000))).unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().len() < 300, "{}", r.text());
    // HEAD is answered as GET, without the body: what health checkers often send.
    let mut raw = TcpStream::connect(c.nodes[leader].http).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"HEAD /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut head = String::new();
    raw.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {head:?}"
    );

    let r = l
        .post("/v1/machines/chaos/tasks", br#"{"spin":true}"#)
        .unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("out_of_fuel"));
    assert!(r.text().contains("fuel"), "{}", r.text());
    // The failed task was committed all the same, and says where.
    let index = |r: &lockstep_tests::http::Reply| -> u64 {
        r.header("lockstep-index")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no lockstep-index: {:?}", r.headers))
    };
    let failed_at = index(&r);
    assert!(r.header("lockstep-term").is_some(), "{:?}", r.headers);
    let r = l.post("/v1/machines/chaos/tasks", br#"{"add":2}"#).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["value"], 2);
    assert!(index(&r) > failed_at);
    c.wait_converged("chaos", Duration::from_secs(20));
    for i in 0..3 {
        let q = c
            .client(i)
            .post("/v1/machines/chaos/query?consistency=local", b"")
            .unwrap();
        assert_eq!(q.json()["value"], 2, "node {i}");
    }
    // A query that traps costs the leader a rebuild of the machine each time: asked over and
    // over, it is refused for a while (503, Retry-After) without running, and tasks go on.
    let mut throttled = None;
    for _ in 0..100_000 {
        let q = l.post("/v1/machines/chaos/query", b"trap").unwrap();
        match q.error_code().as_deref() {
            Some("guest_trap") => assert_eq!(q.status, 422, "{}", q.text()),
            Some("reads_throttled") => {
                throttled = Some(q);
                break;
            }
            _ => panic!("{} {}", q.status, q.text()),
        }
    }
    let q = throttled.expect("failing queries were never refused");
    assert_eq!(q.status, 503, "{}", q.text());
    assert!(q.header("retry-after").is_some(), "{:?}", q.headers);
    let r = l.post("/v1/machines/chaos/tasks", br#"{"add":1}"#).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["value"], 3);

    // On every raft port: random bytes, a small frame that is not a hello, an oversized length
    // prefix, and a frame over the limit after a valid hello. Each connection is greeted with
    // the node's challenge, then closed at once (well before the 5 s hello timeout), and the
    // node stays healthy.
    let cluster_id = c.cluster_status(0).expect("status")["cluster_id"]
        .as_str()
        .expect("cluster id")
        .to_owned();
    let after_hello = |nonce: &[u8; 32]| {
        let mut hello = lockstep::transport::frame::Hello {
            cluster_id: cluster_id.clone(),
            node_id: 2,
            http_addr: "127.0.0.1:1".into(),
            raft_addr: String::new(),
            apply_limits: lockstep::wasm::WasmEngine::new(lockstep::wasm::Limits::default())
                .expect("engine")
                .apply_identity(),
            proof: [0; 32],
        };
        hello.seal(b"", nonce);
        let mut wire = Vec::new();
        lockstep::transport::frame::put_frame(&mut wire, &hello.encode());
        wire.extend_from_slice(&(512u32 << 20).to_be_bytes());
        wire
    };
    for n in &c.nodes {
        for case in 0..4 {
            let mut s = TcpStream::connect(n.raft).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let nonce = read_challenge(&mut s);
            let junk = match case {
                0 => b"\x13\x37garbage\xff\xfe\x00\x01 random bytes".to_vec(),
                1 => b"\x00\x00\x00\x08GARBAGE!".to_vec(),
                2 => vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
                _ => after_hello(&nonce),
            };
            // The node may close before it has read everything: a failed write is fine too.
            let _ = s.write_all(&junk);
            let mut buf = [0u8; 16];
            match s.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("connection left open: {other:?}"),
            }
        }
        let h = Client::new(n.http.to_string()).get("/healthz").unwrap();
        assert_eq!(h.status, 200);
    }
    let r = c
        .client(c.wait_for_leader(Duration::from_secs(10)))
        .post("/v1/machines/chaos/tasks", br#"{"add":1}"#)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn connections_beyond_the_cap_wait_until_one_closes() {
    let _serial = serial();
    let c = TestCluster::start_with_args(1, &["--max-connections", "2"]);
    let (mut a, mut b) = (c.client(0), c.client(0));
    assert_eq!(a.get("/healthz").expect("first connection").status, 200);
    assert_eq!(b.get("/healthz").expect("second connection").status, 200);

    // The kernel's backlog takes the third connection, but the node does not serve it while
    // both slots are held.
    let mut third = TcpStream::connect(c.nodes[0].http).expect("connect");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: lockstep\r\n\r\n")
        .expect("write");
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    match third.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("served beyond --max-connections 2: {other:?}"),
    }

    // A slot frees when a connection closes, and the waiting client is served.
    drop(a);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let n = third.read(&mut buf).expect("served once a slot is free");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(b.get("/healthz").expect("second still served").status, 200);
}

#[test]
fn the_batch_endpoint_answers_each_task_in_order() {
    let _serial = serial();
    let c = TestCluster::start(3);
    c.deploy_guest("counter", guests::COUNTER);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let path = "/v1/machines/counter/tasks:batch";
    let mut l = c.client(leader);

    let r = l
        .post(path, br#"[{"add":1},{"add":2},{"bogus":1},{"add":3}]"#)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json()["results"].as_array().cloned().expect("results");
    let statuses: Vec<_> = results.iter().map(|t| t["status"].as_u64()).collect();
    assert_eq!(statuses, [Some(200), Some(200), Some(422), Some(200)]);
    let values: Vec<_> = results
        .iter()
        .map(|t| t["output"]["value"].as_i64())
        .collect();
    assert_eq!(
        values,
        [Some(1), Some(3), None, Some(6)],
        "applied in order"
    );
    assert_eq!(results[2]["error"]["code"], "guest_error", "{}", r.text());
    // Every task was committed, the failed one too: four positions, in order.
    let indexes: Vec<u64> = results.iter().filter_map(|t| t["index"].as_u64()).collect();
    assert_eq!(indexes.len(), 4, "{}", r.text());
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");

    // Refused as a whole before anything is proposed.
    let follower = (leader + 1) % 3;
    let r = c.client(follower).post(path, br#"[{"add":1}]"#).unwrap();
    assert_eq!(r.status, 307, "{}", r.text());
    let r = l.post(path, br#"{"add":1}"#).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("bad_request"));
    let many = format!("[{}]", vec![r#"{"add":1}"#; 10_001].join(","));
    let r = l.post(path, many.as_bytes()).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let r = l
        .request(
            "POST",
            path,
            &[("lockstep-expected-term", "999999")],
            br#"[{"add":1},{"add":1}]"#,
        )
        .unwrap();
    assert_eq!(r.status, 409, "one answer for the batch: {}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("term_mismatch"));

    // None of the refused requests changed the state.
    let q = l.post("/v1/machines/counter/query", b"").unwrap();
    assert_eq!(q.json()["value"], 6, "{}", q.text());
}

/// The value of an unlabelled metric on node `i`.
fn metric(c: &TestCluster, i: usize, name: &str) -> Option<u64> {
    let text = c.client(i).get("/metrics").ok()?.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_leader_past_max_unapplied_mib_refuses_tasks_and_keeps_taking_ones_that_fit() {
    let _serial = serial();
    // A fuel budget no spin exhausts while the test runs: the spinning task stays unapplied.
    let c = TestCluster::start_with_args(
        1,
        &[
            "--max-unapplied-mib",
            "1",
            "--fuel-per-task",
            "1000000000000",
        ],
    );
    c.deploy_guest("chaos", guests::CHAOS);
    let commit = || metric(&c, 0, "lockstep_commit_index");
    let before = commit().expect("commit index");
    let applied = metric(&c, 0, "lockstep_applied_index").expect("applied index");
    let path = "/v1/machines/chaos/tasks";
    // JSON allows trailing whitespace: padding makes a task weigh 700 KiB.
    let padded = |task: &str| {
        let mut body = task.as_bytes().to_vec();
        body.resize(700 << 10, b' ');
        body
    };

    // Never answered: the node is killed at the end of the test with the task still running.
    let mut spinner = c.client(0);
    let spin = padded(r#"{"spin": true}"#);
    std::thread::spawn(move || spinner.post(path, &spin));
    wait_until(Duration::from_secs(10), || commit().filter(|&i| i > before))
        .expect("the spinning task is committed");

    // 700 KiB are unapplied: another 700 KiB would pass 1 MiB.
    let mut client = c.client(0);
    let refused = client.post(path, &padded(r#"{"add": 1}"#)).expect("reply");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.error_code().as_deref(), Some("overloaded"));
    assert!(refused.header("retry-after").is_some(), "no Retry-After");
    assert_eq!(metric(&c, 0, "lockstep_proposals_refused_total"), Some(1));

    // A small task still fits: it is committed (and waits behind the spin to be applied).
    let mut small = c.client(0);
    std::thread::spawn(move || small.post(path, br#"{"add": 1}"#));
    wait_until(Duration::from_secs(10), || {
        commit().filter(|&i| i > before + 1)
    })
    .expect("the small task is committed");
    assert_eq!(metric(&c, 0, "lockstep_applied_index"), Some(applied));
}

#[test]
fn a_node_restarts_over_a_log_holding_a_trapped_task() {
    let _serial = serial();
    let mut c = TestCluster::start(1);
    c.deploy_guest("chaos", guests::CHAOS);
    let mut client = c.client(0);
    let path = "/v1/machines/chaos/tasks";
    // The guest's panic message goes to its stderr, on replay too.
    let trapped = client.post(path, br#"{"trap": true}"#).expect("reply");
    assert_eq!(trapped.error_code().as_deref(), Some("guest_trap"));
    assert_eq!(
        client.post(path, br#"{"add": 2}"#).expect("reply").status,
        200
    );

    c.restart(0);
    let mut client = c.client(0);
    let value = client
        .post("/v1/machines/chaos/query", b"{}")
        .expect("reply");
    assert_eq!(value.status, 200, "{}", value.text());
    assert_eq!(value.json()["value"], 2);
}

#[test]
fn a_follower_whose_data_directory_was_wiped_catches_up() {
    let _serial = serial();
    let mut c = TestCluster::start(3);
    c.deploy_guest("kv", guests::KV);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client(leader);
    for i in 0..20 {
        let put = format!(r#"{{"put": {{"key": "k{i}", "value": "v"}}}}"#);
        let r = client
            .post("/v1/machines/kv/tasks", put.as_bytes())
            .expect("reply");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    c.wait_converged("kv", Duration::from_secs(20));
    c.wipe(follower);
    c.restart(follower);
    // It must be replicated everything again, not probed at its old match index forever.
    c.wait_converged("kv", Duration::from_secs(30));
    assert_eq!(local_keys(&c, follower), Some(20));
}

/// How many keys starting with `k` node `i`'s `kv` machine holds, read locally.
fn local_keys(c: &TestCluster, i: usize) -> Option<usize> {
    let keys = c
        .client(i)
        .post(
            "/v1/machines/kv/query?consistency=local",
            br#"{"scan": {"prefix": "k"}}"#,
        )
        .ok()?;
    keys.json()["items"].as_array().map(Vec::len)
}

/// Snapshot files in node `i`'s data directory, by name.
fn snapshots(c: &TestCluster, i: usize) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(c.data_dir(i).join("snapshots"))
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_follower_behind_the_compacted_log_is_sent_a_snapshot_and_restarts_start_from_one() {
    let _serial = serial();
    let mut c =
        TestCluster::start_with_args(3, &["--snapshot-every", "40", "--snapshot-keep", "5"]);
    c.deploy_guest("kv", guests::KV);
    c.deploy_guest("counter", guests::COUNTER);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    c.kill(follower);
    let mut client = c.client(leader);
    for i in 0..150 {
        let put = format!(r#"{{"put": {{"key": "k{i}", "value": "v{i}"}}}}"#);
        let r = client
            .post("/v1/machines/kv/tasks", put.as_bytes())
            .expect("reply");
        assert_eq!(r.status, 200, "{}", r.text());
        if i % 10 == 0 {
            let r = client
                .post("/v1/machines/counter/tasks", br#"{"add": 1}"#)
                .expect("reply");
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let kept = snapshots(&c, leader);
    assert_eq!(kept.len(), 1, "only the latest is kept: {kept:?}");
    // The deploys are compacted away: the follower can only catch up from the snapshot,
    // which carries the modules with the states.
    c.restart(follower);
    let digest = c.wait_converged("kv", Duration::from_secs(30));
    c.wait_converged("counter", Duration::from_secs(10));
    assert!(
        c.node_log(follower)
            .contains("installed the leader's snapshot"),
        "{}",
        c.node_log(follower)
    );
    let kept = snapshots(&c, follower);
    assert_eq!(kept.len(), 1, "{kept:?}");
    // One, or two: a snapshot the leader takes while the first is being sent compacts the
    // log past it, and the follower is sent that one as well.
    let installed = metric(&c, follower, "lockstep_snapshots_installed_total");
    assert!(
        matches!(installed, Some(1 | 2)),
        "{installed:?} {}",
        c.node_log(follower)
    );
    assert!(metric(&c, leader, "lockstep_snapshots_taken_total").is_some_and(|n| n >= 3));
    assert_eq!(local_keys(&c, follower), Some(150));

    // kill -9 everyone: each node restarts from its snapshot and the log after it.
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.restart(i);
    }
    assert_eq!(c.wait_converged("kv", Duration::from_secs(30)), digest);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let r = c
        .client(leader)
        .post("/v1/machines/counter/query", b"")
        .expect("reply");
    assert_eq!(r.json()["value"], 15, "{}", r.text());
}

#[test]
fn the_cli_gets_the_answer_a_node_gives_before_reading_the_body() {
    let _serial = serial();
    let c = TestCluster::start(1);
    // Three times the task limit: the node answers 413 after the first MiB, with the rest
    // still on its way. It used to close the connection on the unread bytes, and the CLI,
    // still sending, reported "broken pipe" about half the time.
    let dir = tempfile::tempdir().expect("temp dir");
    let payload = dir.path().join("payload");
    std::fs::write(&payload, vec![b' '; 3 << 20]).expect("payload");
    let payload = format!("@{}", payload.display());
    for attempt in 0..10 {
        let out = c.cli(0, &["submit", "counter", &payload]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("413 too_large"),
            "attempt {attempt}: {stderr}"
        );
    }
}

/// The CLI covers the API a module author and an operator use: deploy, list, describe,
/// batch, delete; a name no node would take is refused before any request.
#[test]
fn the_cli_lists_describes_batches_and_deletes_machines() {
    let _serial = serial();
    let c = TestCluster::start(1);
    let cli = |args: &[&str]| {
        let out = c.cli(0, args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let wasm = dir.path().join("counter.wasm");
    std::fs::write(&wasm, guests::read(guests::COUNTER)).expect("write the module");
    let wasm = wasm.to_string_lossy().into_owned();

    let (ok, out) = cli(&["deploy", "counter", &wasm]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["list"]);
    assert!(ok && out.contains(r#""name":"counter""#), "{out}");
    let (ok, out) = cli(&["batch", "counter", r#"[{"add":2},{"add":3}]"#]);
    assert!(ok, "{out}");
    let results: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(results["results"][1]["output"]["value"], 5, "{out}");
    let (ok, out) = cli(&["batch", "counter", "not json"]);
    assert!(!ok && out.contains("400 bad_request"), "{out}");
    let (ok, out) = cli(&["describe", "counter", "--digest"]);
    assert!(ok && out.contains("state_digest"), "{out}");
    let (ok, out) = cli(&["delete", "counter"]);
    assert!(ok && out.contains(r#""deleted":true"#), "{out}");
    let (ok, out) = cli(&["describe", "counter"]);
    assert!(!ok && out.contains("not_found"), "{out}");
    for bad in ["a/b", "../x", "with space"] {
        let (ok, out) = cli(&["submit", bad, "{}"]);
        assert!(!ok && out.contains("use 1 to"), "{bad}: {out}");
    }
}

/// A raw connection to node 0 that has sent the headers of a task for `machine` with a body of
/// `len` bytes, and waits at most 10 s for any answer.
fn task_headers_sent(c: &TestCluster, machine: &str, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(c.nodes[0].http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "POST /v1/machines/{machine}/tasks HTTP/1.1\r\nhost: lockstep\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("headers");
    s
}

#[test]
fn a_stopping_node_answers_the_request_in_flight() {
    let _serial = serial();
    let c = TestCluster::start(1);
    c.deploy_guest("chaos", guests::CHAOS);
    let task = br#"{"add": 5}"#;
    let mut s = task_headers_sent(&c, "chaos", task.len());
    s.write_all(&task[..4]).expect("part of the body");
    // Stopped mid-request: the rest of the body still arrives, and the answer goes out.
    c.sigterm(0);
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&task[4..]).expect("the rest of the body");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(reply.contains(r#"{"value":5}"#), "{reply:?}");
    // And nobody new is served.
    assert!(
        wait_until(Duration::from_secs(10), || c
            .client(0)
            .get("/healthz")
            .is_err()
            .then_some(()))
        .is_some(),
        "still serving after SIGTERM"
    );
}

#[test]
fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let _serial = serial();
    let c = TestCluster::start(1);
    c.deploy_guest("chaos", guests::CHAOS);
    let task = br#"{"add": 3}"#;
    for attempt in 0..5 {
        let mut s = task_headers_sent(&c, "chaos", task.len());
        s.write_all(task).expect("body");
        // Done sending: the task is committed and answered all the same (it used to be
        // committed and the connection closed without an answer).
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "attempt {attempt}: {reply:?}"
        );
        let value = 3 * (attempt + 1);
        assert!(
            reply.contains(&format!(r#"{{"value":{value}}}"#)),
            "attempt {attempt}: {reply:?}"
        );
    }
}

#[test]
fn dev_stops_the_whole_cluster_when_a_node_exits() {
    let _serial = serial();
    // Node 2's HTTP port is taken: its process fails to bind and exits at once.
    let port = lockstep_tests::cluster::free_dev_port(3);
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port + 1)).expect("bind");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut dev = std::process::Command::new(lockstep_tests::cluster::lockstep_bin())
        .args([
            "dev",
            "--nodes",
            "3",
            "--port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run lockstep dev");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dev.try_wait().expect("wait for dev") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = dev.kill();
            panic!("lockstep dev kept running with node 2 dead");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    // The other nodes were stopped with it: node 1's port is free again (checked before
    // reading stderr, which a surviving child would hold open).
    assert!(
        wait_until(Duration::from_secs(5), || std::net::TcpListener::bind((
            "127.0.0.1",
            port
        ))
        .ok())
        .is_some(),
        "node 1 outlived lockstep dev"
    );
    let mut err = String::new();
    dev.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert!(err.contains("node 2 exited"), "{err}");
}

#[test]
fn dev_stops_its_nodes_gracefully() {
    let _serial = serial();
    let port = lockstep_tests::cluster::free_dev_port(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut dev = std::process::Command::new(lockstep_tests::cluster::lockstep_bin())
        .args([
            "dev",
            "--nodes",
            "3",
            "--port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run lockstep dev");
    let up = wait_until(Duration::from_secs(20), || {
        (0..3)
            .all(|i| {
                Client::new(format!("127.0.0.1:{}", port + i))
                    .get("/healthz")
                    .is_ok_and(|r| r.status == 200)
            })
            .then_some(())
    });
    // SIGTERM to dev alone (as a supervisor sends it): the nodes must be stopped the same way.
    let pid = i32::try_from(dev.id()).expect("pid");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = dev.wait().expect("dev exits");
    let mut err = String::new();
    dev.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert!(up.is_some(), "the cluster never came up: {err}");
    assert!(status.success(), "{status}: {err}");
    assert_eq!(err.matches("node stopped").count(), 3, "{err}");
}

#[test]
fn a_node_refuses_to_reapply_its_log_under_other_limits() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = lockstep_tests::cluster::free_dev_port(1);
    let (http, raft) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", port + 100),
    );
    let peers = format!("1={raft}");
    let serve = |extra: &[&str]| {
        std::process::Command::new(lockstep_tests::cluster::lockstep_bin())
            .args(["serve", "--id", "1", "--data-dir"])
            .arg(dir.path())
            .args(["--http", &http, "--raft", &raft, "--peers", &peers])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run lockstep serve")
    };
    let mut node = serve(&[]);
    let mut client = Client::new(http.clone());
    let up = wait_until(Duration::from_secs(20), || {
        client.get("/healthz").ok().filter(|r| r.status == 200)
    });
    let _ = node.kill();
    let _ = node.wait();
    assert!(up.is_some(), "the node never came up");

    // Other limits: refused before anything is applied, naming what the log was applied under.
    let mut node = serve(&["--fuel-per-task", "5000000"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = node.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = node.kill();
            panic!("the node re-applied its log under other limits");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    node.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(!status.success());
    assert!(
        err.contains("start it with `--fuel-per-task 100000000 --memory-mib 64`"),
        "{err}"
    );
    // The same limits as before: it starts.
    let mut node = serve(&["--fuel-per-task", "100000000"]);
    let up = wait_until(Duration::from_secs(20), || {
        client.get("/healthz").ok().filter(|r| r.status == 200)
    });
    let _ = node.kill();
    let _ = node.wait();
    assert!(up.is_some(), "refused its own limits");
}

/// With `--peer-secret-file` the members work as before, and a caller that knows all but the
/// secret (the cluster id is public at /v1/cluster) is refused before anything it sends counts;
/// the same bytes proven with the secret are believed, so the proof is what keeps it out.
#[test]
fn a_caller_without_the_peer_secret_cannot_pose_as_a_member() {
    use lockstep::raft::Message;
    use lockstep::transport::frame::{Hello, put_frame};

    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("peer-secret");
    std::fs::write(&path, "correct horse battery staple\n").expect("write the secret");
    let path = path.to_string_lossy().into_owned();
    let c = TestCluster::start_with_args(3, &["--peer-secret-file", &path]);
    let leader = c.wait_for_leader(Duration::from_secs(10));
    c.deploy_guest("counter", guests::COUNTER);
    let r = c
        .client(leader)
        .post("/v1/machines/counter/tasks", br#"{"add":1}"#)
        .expect("a task");
    assert_eq!(r.status, 200, "{}", r.text());

    let follower = (leader + 1) % c.nodes.len();
    let status = c.cluster_status(follower).expect("follower status");
    let cluster_id = status["cluster_id"]
        .as_str()
        .expect("cluster id")
        .to_owned();
    let term = status["term"].as_u64().expect("term");
    // Poses as the leader and announces a newer term: a heartbeat the follower would follow.
    let pose = |secret: &[u8]| {
        let mut s = TcpStream::connect(c.nodes[follower].raft).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let nonce = read_challenge(&mut s);
        let mut hello = Hello {
            cluster_id: cluster_id.clone(),
            node_id: c.nodes[leader].id,
            http_addr: "impostor.example:80".into(),
            raft_addr: String::new(),
            apply_limits: lockstep::wasm::WasmEngine::new(lockstep::wasm::Limits::default())
                .expect("engine")
                .apply_identity(),
            proof: [0; 32],
        };
        hello.seal(secret, &nonce);
        let mut wire = Vec::new();
        put_frame(&mut wire, &hello.encode());
        let mut msg = Vec::new();
        Message::Heartbeat {
            term: term + 5,
            commit: 0,
            seq: 1,
        }
        .encode(&mut msg);
        put_frame(&mut wire, &msg);
        s.write_all(&wire).expect("send");
        s
    };
    let mut refused = pose(b"a guess");
    let mut rest = Vec::new();
    assert!(
        matches!(refused.read_to_end(&mut rest), Ok(0) | Err(_)),
        "the node closes the connection"
    );
    std::thread::sleep(Duration::from_millis(300));
    let status = c.cluster_status(follower).expect("follower status");
    assert!(
        status["term"].as_u64().is_some_and(|t| t < term + 5),
        "the impostor's term was not taken: {status}"
    );

    let _believed = pose(b"correct horse battery staple");
    let moved = wait_until(Duration::from_secs(5), || {
        c.cluster_status(follower)?["term"]
            .as_u64()
            .filter(|&t| t >= term + 5)
    });
    assert!(
        moved.is_some(),
        "with the secret, the same hello is believed"
    );
}

/// The nonce of the challenge a node greets each peer connection with.
fn read_challenge(s: &mut TcpStream) -> [u8; 32] {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("the challenge's length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("the challenge");
    lockstep::transport::frame::Challenge::decode(&body)
        .expect("a challenge")
        .nonce
}

#[test]
fn a_bad_worker_thread_count_is_refused_with_a_clear_error() {
    for bad in ["0", "two", "-1"] {
        let out = std::process::Command::new(lockstep_tests::cluster::lockstep_bin())
            .args(["status", "--url", "http://127.0.0.1:9"])
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .expect("run the CLI");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {stderr}");
        assert!(!stderr.contains("panicked"), "{bad}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "TOKIO_WORKER_THREADS={bad} is not a positive number"
            )),
            "{bad}: {stderr}"
        );
    }
}

/// Node `i`'s `/v1/cluster` once it lists `n` members, waited for up to `within`.
fn status_listing(
    c: &TestCluster,
    i: usize,
    n: usize,
    within: Duration,
) -> Option<serde_json::Value> {
    wait_until(within, || {
        let s = c.cluster_status(i)?;
        (s["members"].as_array()?.len() == n).then_some(s)
    })
}

/// Whether a `/v1/cluster` status lists member `id`.
fn lists_member(status: &serde_json::Value, id: u64) -> bool {
    status["members"]
        .to_string()
        .contains(&format!(r#""id":{id},"#))
}

/// A follower moves to a new peer address under load (etcd's member update): bad requests
/// change nothing, the leader cannot be moved, the change commits while the member is down,
/// and once it is restarted at the new address it catches up. A member restarted with the old
/// address still in its `--peers` reaches it there (the membership in the log wins), so the
/// two can elect a leader without the first one.
#[test]
fn a_follower_moves_to_a_new_peer_address_under_load() {
    let _serial = serial();
    let (mut c, w) = kv_under_load(4, 100);
    let leader = c.wait_for_leader(Duration::from_secs(5));
    let moving = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let (leader_id, moving_id) = (c.nodes[leader].id, c.nodes[moving].id);
    let old = c.nodes[moving].raft.to_string();
    let others = c.nodes[other].raft.to_string();
    for (path, body, status, expect) in [
        (leader_id, "127.0.0.1:1", 409, "member_is_leader"),
        (9, "127.0.0.1:1", 400, "9 is not a member"),
        (
            moving_id,
            old.as_str(),
            400,
            "reached at that address already",
        ),
        (moving_id, others.as_str(), 409, "address_in_use"),
        (moving_id, "", 400, "peer address"),
        (moving_id, "127.0.0.1:port", 400, "peer address"),
        (moving_id, " 127.0.0.1:1", 400, "peer address"),
    ] {
        let body = serde_json::json!({ "raft": body }).to_string();
        let r = c
            .client(leader)
            .request(
                "PUT",
                &format!("/v1/cluster/members/{path}"),
                &[],
                body.as_bytes(),
            )
            .expect("put");
        assert_eq!(r.status, status, "{path} {body}: {}", r.text());
        assert!(r.text().contains(expect), "{path} {body}: {}", r.text());
    }

    let new = c.move_raft(moving).to_string();
    let stdout = c.cli_ok(leader, &["move-member", &moving_id.to_string(), &new]);
    assert!(stdout.contains(r#""members":[1,2,3]"#), "{stdout}");
    let raft_of = |s: &serde_json::Value, id: u64| {
        s["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["id"] == id))
            .and_then(|m| m["raft"].as_str().map(str::to_owned))
    };
    let s = c.cluster_status(leader).expect("status");
    assert_eq!(raft_of(&s, moving_id).as_deref(), Some(new.as_str()), "{s}");

    c.restart(moving);
    wait_for_acks(&w, w.acked_count() + 100);
    let target = c.cluster_status(leader).expect("status")["commit_index"]
        .as_u64()
        .expect("commit index");
    wait_until(Duration::from_secs(20), || {
        (c.cluster_status(moving)?["applied_index"].as_u64()? >= target).then_some(())
    })
    .unwrap_or_else(|| panic!("the moved member did not catch up to {target}"));

    // `other` still has the old address in its --peers; the log tells it the new one.
    c.restart(other);
    let s = wait_until(Duration::from_secs(10), || {
        let s = c.cluster_status(other)?;
        (raft_of(&s, moving_id)? == new).then_some(s)
    });
    assert!(s.is_some(), "{:?}", c.cluster_status(other));
    wait_for_acks(&w, w.acked_count() + 100);
    c.kill(leader);
    let next = wait_until(Duration::from_secs(10), || {
        c.leader().filter(|&l| l != leader)
    })
    .expect("the moved member and the restarted one elect a leader");
    assert!(next == moving || next == other);
    wait_for_acks(&w, w.acked_count() + 100);
    let acked = w.stop();
    assert_no_acked_write_lost(&c, &acked);
}

/// Members change under load: a fourth node started with `--join` is added through the CLI
/// while a member is down, and catches up; it is handed leadership, and the member that was
/// down comes back and follows it (knowing nothing of it at first). Then the leader removes
/// itself: it steps down, another member leads, no acknowledged write is lost, every replica
/// holds the same state, and the new membership survives a restart.
#[test]
fn a_member_joins_and_the_leader_removes_itself_under_load() {
    let _serial = serial();
    let (mut c, w) = kv_under_load(4, 100);
    let first_leader = c.wait_for_leader(Duration::from_secs(5));
    let away = (first_leader + 1) % 3;
    c.kill(away);

    let joiner = c.join();
    let s = c.cluster_status(joiner).expect("status");
    assert_eq!(s["members"], serde_json::json!([]), "not a member yet: {s}");
    let leader = c.wait_for_leader(Duration::from_secs(5));
    // Bad requests change nothing.
    for (bad, expect) in [
        (r#"{"id":2,"raft":"127.0.0.1:1"}"#, "2 is a member already"),
        (r#"{"id":0,"raft":"127.0.0.1:1"}"#, "member ids are 1 to"),
        // Past 2^62 an id would be written into the log and refused by every node reading it.
        (
            r#"{"id":18446744073709551615,"raft":"127.0.0.1:1"}"#,
            "not 18446744073709551615",
        ),
        (r#"{"id":9}"#, "the body must be"),
        (r#"{"id":9,"raft":""}"#, "peer address"),
    ] {
        let r = c
            .client(leader)
            .post("/v1/cluster/members", bad.as_bytes())
            .expect("post");
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.text().contains(expect), "{bad}: {}", r.text());
    }
    // Removing a live member while another is down would leave a group that needs the one
    // that is down: refused once the leader has not heard from it for an election timeout.
    std::thread::sleep(Duration::from_millis(2_500));
    let live = (0..3)
        .find(|&i| i != leader && i != away)
        .expect("a live follower");
    let r = c
        .client(leader)
        .request(
            "DELETE",
            &format!("/v1/cluster/members/{}", c.nodes[live].id),
            &[],
            b"",
        )
        .expect("delete");
    assert_eq!(r.status, 409, "{}", r.text());
    let away_id = c.nodes[away].id;
    assert!(
        r.text().contains("too_few_reachable")
            && r.text().contains(&format!(
                "not heard from in the last election timeout: {away_id}"
            )),
        "{}",
        r.text()
    );
    let joiner_id = c.nodes[joiner].id.to_string();
    let raft = c.nodes[joiner].raft.to_string();
    let stdout = c.cli_ok(leader, &["add-member", &joiner_id, &raft]);
    assert!(stdout.contains(r#""members":[1,2,3,4]"#), "{stdout}");
    wait_for_acks(&w, w.acked_count() + 100);
    let s = status_listing(&c, joiner, 4, Duration::from_secs(20))
        .expect("the new member learns the members");
    assert_eq!(s["role"], "follower", "{s}");

    // The new member leads; the member that missed its addition returns and follows it.
    let leader = c.wait_for_leader(Duration::from_secs(5));
    c.cli_ok(leader, &["transfer-leader", &joiner_id]);
    c.restart(away);
    wait_for_acks(&w, w.acked_count() + 100);
    let target = c.cluster_status(joiner).expect("status")["commit_index"]
        .as_u64()
        .expect("commit index");
    wait_until(Duration::from_secs(20), || {
        let s = c.cluster_status(away)?;
        (s["members"].as_array()?.len() == 4 && s["applied_index"].as_u64()? >= target)
            .then_some(())
    })
    .unwrap_or_else(|| {
        let all: Vec<_> = (0..c.nodes.len()).map(|i| c.cluster_status(i)).collect();
        panic!("the returning member did not catch up with the new leader to {target}: {all:?}")
    });

    // The leader removes itself (asked through a follower: redirected).
    let leader = c.wait_for_leader(Duration::from_secs(5));
    let leader_id = c.nodes[leader].id;
    let follower = (0..c.nodes.len())
        .find(|&i| i != leader)
        .expect("a follower");
    let r = c
        .client(follower)
        .request(
            "DELETE",
            &format!("/v1/cluster/members/{leader_id}"),
            &[],
            b"",
        )
        .expect("delete");
    assert_eq!(r.status, 307, "{}", r.text());
    let r = c
        .client(leader)
        .request(
            "DELETE",
            &format!("/v1/cluster/members/{leader_id}"),
            &[],
            b"",
        )
        .expect("delete");
    assert_eq!(r.status, 200, "{}", r.text());
    let new_leader = wait_until(Duration::from_secs(10), || {
        c.leader().filter(|&l| l != leader)
    })
    .expect("another member leads");
    let s = c.cluster_status(new_leader).expect("status");
    let members: Vec<u64> = s["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert!(!members.contains(&leader_id) && members.len() == 3, "{s}");
    wait_for_acks(&w, w.acked_count() + 100);
    let acked = w.stop();
    c.kill(leader);
    assert_no_acked_write_lost(&c, &acked);

    // The membership is in the log: a restarted member still has it.
    let other = (0..c.nodes.len())
        .find(|&i| i != leader && i != new_leader)
        .expect("a third member");
    c.restart(other);
    let s = status_listing(&c, other, 3, Duration::from_secs(20))
        .expect("the restarted member's members");
    assert!(!lists_member(&s, leader_id), "{s}");

    // A removed follower is told: it lists the members without itself, says it can be
    // stopped, and never campaigns.
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let removed = (0..c.nodes.len())
        .find(|&i| i != leader && c.cluster_status(i).is_some())
        .expect("a live follower");
    let removed_id = c.nodes[removed].id;
    c.cli_ok(leader, &["remove-member", &removed_id.to_string()]);
    let s = status_listing(&c, removed, 2, Duration::from_secs(10))
        .expect("the removed member learns the members without itself");
    assert!(!lists_member(&s, removed_id), "{s}");
    // The removal is in its log (so in effect) before it hears the removal commit, with the
    // leader's next message: only then does it know it is out.
    wait_until(Duration::from_secs(10), || {
        c.node_log(removed)
            .contains("this node was removed from the members")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("not told it was removed: {}", c.node_log(removed)));
    // Past the longest election timeout (2 s), it has not campaigned.
    std::thread::sleep(Duration::from_millis(3_000));
    let log = c.node_log(removed);
    let after = log
        .rfind("this node was removed from the members")
        .map(|at| &log[at..])
        .unwrap_or_default();
    assert!(
        !after.contains("asking the members for pre-votes"),
        "a removed member never campaigns: {after}"
    );
    let s = c.cluster_status(removed).expect("status");
    assert_eq!(s["role"], "follower", "{s}");
}
