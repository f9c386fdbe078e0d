//! Real `lockstep serve` processes on 127.0.0.1 for black-box tests. Every process is killed
//! when the cluster is dropped, and the data lives in a temporary directory.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::http::{Client, Reply};
use crate::partition::{Links, PeerProxy};

/// The `lockstep` binary cargo built for this test run (next to the test executable's folder).
pub fn lockstep_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOCKSTEP_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir.join(format!("lockstep{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p lockstep` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// A port for a child process to listen on, free when picked. The listener that checks it is
/// dropped before the child binds, so the port must not be taken meanwhile:
/// - it comes from below the kernel's ephemeral range (`ip_local_port_range`), where neither
///   `bind(0)` nor outgoing connections (peer dials, test clients) ever land;
/// - a per-process counter keeps parallel tests of one binary apart, and a start that depends
///   on the pid keeps test binaries running side by side apart.
///
/// Where that range is too small to use, it falls back to an ephemeral port.
fn free_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = ephemeral_floor().min(u32::from(u16::MAX));
    if high > LOW + 1_000 {
        let span = high - LOW;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let Ok(port) = u16::try_from(LOW + (start + k) % span) else {
                continue;
            };
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr().expect("local addr");
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// A first port for `lockstep dev --nodes n --port P`: P..P+n (HTTP) and P+100..P+100+n (peers)
/// free when picked, below the ephemeral range like `free_addr`'s.
pub fn free_dev_port(n: u16) -> u16 {
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    loop {
        let p = free_addr().port();
        let fits =
            p.checked_add(100 + n).is_some() && (0..n).all(|i| free(p + i) && free(p + 100 + i));
        if fits {
            return p;
        }
    }
}

/// The lowest port the kernel hands out on its own (Linux; 32768, its default, elsewhere).
fn ephemeral_floor() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub struct TestNode {
    pub id: u64,
    pub http: SocketAddr,
    /// The node's peer address, as the cluster knows it (`--peers`, `add-member`).
    pub raft: SocketAddr,
    /// In a cluster that can be partitioned, `raft` is the node's proxy and the node listens
    /// here (its `--raft`).
    behind_proxy: Option<(SocketAddr, PeerProxy)>,
    data_dir: PathBuf,
    child: Option<Child>,
    /// For a node that joined the running cluster: its `--peers` and `--join --cluster-id`.
    joined: Option<(String, String)>,
    /// For a node moved to a new peer address: its `--peers` (its own entry the new address)
    /// and `--cluster-id` (its `--peers` no longer digest to it).
    moved: Option<(String, String)>,
}

impl TestNode {
    /// Node `id`, not started, its data under `dir`; behind a proxy when `links` is given (it
    /// then logs that its `--raft` is not its `--peers` entry, as it should).
    fn new(id: u64, dir: &std::path::Path, links: Option<&Arc<Links>>) -> Self {
        let (raft, behind_proxy) = match links {
            None => (free_addr(), None),
            Some(links) => {
                let listen = free_addr();
                let proxy = PeerProxy::start(id, listen, links.clone()).expect("start a proxy");
                (proxy.addr, Some((listen, proxy)))
            }
        };
        TestNode {
            id,
            http: free_addr(),
            raft,
            behind_proxy,
            data_dir: dir.join(format!("node{id}")),
            child: None,
            joined: None,
            moved: None,
        }
    }

    /// Where the node takes peer connections (its `--raft`).
    fn listen_addr(&self) -> SocketAddr {
        self.behind_proxy
            .as_ref()
            .map_or(self.raft, |(listen, _)| *listen)
    }
}

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    peers: String,
    /// Each node runs with `--advertise-http HOST:its port` when set.
    advertise_host: Option<&'static str>,
    /// Given to every node's `lockstep serve` after the usual flags.
    extra_args: Vec<String>,
    /// Set when the nodes talk through proxies that can cut links (`start_partitionable`).
    links: Option<Arc<Links>>,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` nodes and waits until one of them leads.
    pub fn start(n: u64) -> Self {
        Self::start_inner(n, None, &[], None)
    }

    /// Like `start`, each node advertising `host` with its own HTTP port (`--advertise-http`).
    pub fn start_advertising(n: u64, host: &'static str) -> Self {
        Self::start_inner(n, Some(host), &[], None)
    }

    /// Like `start`, with `args` added to every node's command line.
    pub fn start_with_args(n: u64, args: &[&str]) -> Self {
        Self::start_inner(n, None, args, None)
    }

    /// Like `start_with_args`, each node reached by its peers through a proxy, so that links
    /// between nodes can be cut (`links`); the nodes that join later too.
    pub fn start_partitionable(n: u64, args: &[&str]) -> Self {
        Self::start_inner(n, None, args, Some(Arc::default()))
    }

    fn start_inner(
        n: u64,
        advertise_host: Option<&'static str>,
        args: &[&str],
        links: Option<Arc<Links>>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes: Vec<TestNode> = (1..=n)
            .map(|id| TestNode::new(id, dir.path(), links.as_ref()))
            .collect();
        let peers = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.raft))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = TestCluster {
            nodes,
            peers,
            advertise_host,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            links,
            _dir: dir,
        };
        for i in 0..c.nodes.len() {
            c.spawn(i);
        }
        c.wait_for_leader(Duration::from_secs(20));
        c
    }

    fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        // Appended, so that a restarted node's log keeps what it wrote before it was killed.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.data_dir.with_extension("log"))
            .expect("log file");
        let mut cmd = Command::new(lockstep_bin());
        cmd.args(["serve", "--id", &n.id.to_string()])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(["--http", &n.http.to_string()])
            .args(["--raft", &n.listen_addr().to_string()]);
        match &n.joined {
            Some((peers, cluster_id)) => {
                cmd.args(["--peers", peers, "--join", "--cluster-id", cluster_id]);
            }
            None => match &n.moved {
                Some((peers, cluster_id)) => {
                    cmd.args(["--peers", peers, "--cluster-id", cluster_id]);
                }
                None => {
                    cmd.args(["--peers", &self.peers]);
                }
            },
        }
        if let Some(host) = self.advertise_host {
            cmd.arg("--advertise-http")
                .arg(format!("{host}:{}", n.http.port()));
        }
        let child = cmd
            .args(&self.extra_args)
            .env("LOCKSTEP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lockstep serve");
        n.child = Some(child);
        wait_until(Duration::from_secs(20), || {
            Client::new(n.http.to_string())
                .get("/healthz")
                .is_ok_and(|r| r.status == 200)
                .then_some(())
        })
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(n.data_dir.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "node {} did not come up; its log ends:\n{}",
                n.id,
                tail.join("\n")
            )
        });
    }

    /// Starts one more node with `--join` (not a member until `add-member`) and returns its
    /// index.
    pub fn join(&mut self) -> usize {
        let leader = self.wait_for_leader(Duration::from_secs(20));
        let status = self.cluster_status(leader).expect("status");
        let cluster_id = status["cluster_id"]
            .as_str()
            .expect("cluster id")
            .to_owned();
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let mut node = TestNode::new(id, self._dir.path(), self.links.as_ref());
        node.joined = Some((format!("{},{id}={}", self.peers, node.raft), cluster_id));
        self.nodes.push(node);
        let i = self.nodes.len() - 1;
        self.spawn(i);
        i
    }

    /// kill -9: the process gets no chance to flush or say goodbye.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9, then gives node `i` a new peer address: its `--raft`, and its own entry in the
    /// `--peers` it starts with next, with the cluster's `--cluster-id` (the other nodes keep
    /// theirs). Returns the new address. Not for a cluster behind proxies, whose addresses
    /// are the proxies'.
    pub fn move_raft(&mut self, i: usize) -> SocketAddr {
        assert!(
            self.links.is_none(),
            "move_raft: a proxy passes connections to the address the node had"
        );
        let status = self.cluster_status(i).expect("the node's status");
        let cluster_id = status["cluster_id"]
            .as_str()
            .expect("cluster id")
            .to_owned();
        self.kill(i);
        let n = &mut self.nodes[i];
        let (old, new) = (n.raft, free_addr());
        n.raft = new;
        let peers = match (&n.joined, &n.moved) {
            (Some((peers, _)), _) | (None, Some((peers, _))) => peers,
            (None, None) => &self.peers,
        };
        let moved = peers.replace(&format!("{}={old}", n.id), &format!("{}={new}", n.id));
        match &mut n.joined {
            Some((peers, _)) => *peers = moved,
            None => n.moved = Some((moved, cluster_id)),
        }
        new
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// SIGTERM, as an operator stops a node; the process is reaped later (kill, restart, drop).
    pub fn sigterm(&self, i: usize) {
        self.signal(i, "-TERM");
    }

    /// SIGTERM, and waits until node `i` has exited (within `timeout`; kill -9 past it).
    /// Returns whether it exited by itself.
    pub fn stop(&mut self, i: usize, timeout: Duration) -> bool {
        self.sigterm(i);
        let Some(child) = self.nodes[i].child.as_mut() else {
            return true;
        };
        let exited = wait_until(timeout, || child.try_wait().ok().flatten()).is_some();
        self.kill(i);
        exited
    }

    /// The links between the nodes of a cluster started with `start_partitionable`.
    pub fn links(&self) -> &Links {
        self.links
            .as_deref()
            .expect("a cluster started with start_partitionable")
    }

    /// SIGSTOP: node `i` freezes (a long pause of its machine), connections and all, until
    /// `resume`.
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(c) = &self.nodes[i].child {
            let _ = Command::new("kill")
                .args([signal, &c.id().to_string()])
                .status();
        }
    }

    /// kill -9, then deletes the node's data directory (a lost disk).
    pub fn wipe(&mut self, i: usize) {
        self.kill(i);
        let dir = &self.nodes[i].data_dir;
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("wiping {}: {e}", dir.display()));
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> &std::path::Path {
        &self.nodes[i].data_dir
    }

    /// What node `i` has logged so far (every incarnation's, appended).
    pub fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].data_dir.with_extension("log")).unwrap_or_default()
    }

    /// Runs the `lockstep` command line with `args` against node `i` (`--url`).
    pub fn cli(&self, i: usize, args: &[&str]) -> std::process::Output {
        std::process::Command::new(lockstep_bin())
            .args(args)
            .arg("--url")
            .arg(format!("http://{}", self.nodes[i].http))
            .output()
            .expect("run the CLI")
    }

    /// Like `cli`, and asserts that it succeeded; returns what it printed.
    pub fn cli_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.cli(i, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    pub fn client(&self, i: usize) -> Client {
        Client::new(self.nodes[i].http.to_string())
    }

    pub fn cluster_status(&self, i: usize) -> Option<serde_json::Value> {
        self.nodes[i].child.as_ref()?;
        let r = self.client(i).get("/v1/cluster").ok()?;
        (r.status == 200).then(|| r.json())
    }

    /// Index of a node that reports itself leader right now.
    pub fn leader(&self) -> Option<usize> {
        self.leader_among(0..self.nodes.len())
    }

    /// The first of `nodes` (indexes) that reports itself leader right now.
    pub fn leader_among(&self, nodes: impl IntoIterator<Item = usize>) -> Option<usize> {
        nodes.into_iter().find(|&i| {
            self.cluster_status(i)
                .is_some_and(|s| s["role"] == "leader")
        })
    }

    /// Index of the node that reports itself leader, waiting up to `timeout`.
    pub fn wait_for_leader(&self, timeout: Duration) -> usize {
        wait_until(timeout, || self.leader()).expect("no leader elected in time")
    }

    /// Deploys a component through the leader and returns the reply.
    /// Deploys the built guest at `guest` (a `guests::` path) as `name`; it must be created.
    pub fn deploy_guest(&self, name: &str, guest: &str) {
        let r = self.deploy(name, &crate::guests::read(guest));
        assert_eq!(r.status, 201, "deploying {name}: {}", r.text());
    }

    pub fn deploy(&self, name: &str, wasm: &[u8]) -> Reply {
        let l = self.wait_for_leader(Duration::from_secs(20));
        self.client(l)
            .request("PUT", &format!("/v1/machines/{name}"), &[], wasm)
            .expect("deploy request")
    }

    /// `GET /v1/machines/{name}?digest=1` on node `i`.
    pub fn machine_status(&self, i: usize, name: &str) -> Option<serde_json::Value> {
        let r = self
            .client(i)
            .get(&format!("/v1/machines/{name}?digest=1"))
            .ok()?;
        (r.status == 200).then(|| r.json())
    }

    /// Waits until every running node has applied the leader's commit index and reports the
    /// same state digest for `name`, and returns that digest. Call it once the load has stopped.
    pub fn wait_converged(&self, name: &str, timeout: Duration) -> String {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect();
        wait_until(timeout, || {
            // No leader yet is "not converged yet": the caller's timeout decides.
            let leader = self.leader()?;
            let commit = self.cluster_status(leader)?["commit_index"].as_u64()?;
            for &i in &running {
                if self.cluster_status(i)?["applied_index"].as_u64()? < commit {
                    return None;
                }
            }
            let digests: Vec<String> = running
                .iter()
                .map(|&i| {
                    Some(
                        self.machine_status(i, name)?["state_digest"]
                            .as_str()?
                            .to_owned(),
                    )
                })
                .collect::<Option<_>>()?;
            digests
                .iter()
                .all(|d| *d == digests[0])
                .then(|| digests[0].clone())
        })
        .unwrap_or_else(|| panic!("replicas did not converge on {name}"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Polls `f` every 50 ms until it gives `Some`, or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_are_distinct_and_outside_the_ephemeral_range() {
        let floor = ephemeral_floor();
        let ports: Vec<u16> = (0..200).map(|_| free_addr().port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        if floor > 11_000 {
            assert!(
                ports.iter().all(|&p| u32::from(p) < floor),
                "a port from the ephemeral range (from {floor})"
            );
        }
    }
}
