//! One Lockstep node: the log, the Wasm machines, the Raft pipeline, the peer transport and the
//! HTTP API, wired together.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::api::{self, ApiState};
use crate::machines::MachineSet;
use crate::raft::{self, Membership, Message, Node, NodeId, RaftConfig};
use crate::storage::LogStore;
use crate::transport::{PeerTransport, TransportConfig, WireMessage};
use crate::wasm::{Limits, ModuleRegistry, WasmEngine};

/// How to start a node (the flags of `lockstep serve`).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    /// Where clients are sent (HOST:PORT); the bound `http_addr` when not given, which a
    /// wildcard `http_addr` cannot be.
    pub advertise_http: Option<String>,
    pub raft_addr: SocketAddr,
    /// Raft address of every initial member, this node included.
    pub peers: BTreeMap<NodeId, String>,
    /// Defaults to a digest of `peers`, so two clusters on one host never cross-talk.
    pub cluster_id: Option<String>,
    pub limits: Limits,
    /// HTTP connections served at once (see `api::serve`).
    pub max_connections: usize,
    /// See `RaftConfig::max_unapplied_bytes`.
    pub max_unapplied_bytes: usize,
    /// See `RaftConfig::snapshot_every` and `snapshot_keep`.
    pub snapshot_every: u64,
    pub snapshot_keep: u64,
    /// A file holding the secret every member's peer hello must prove (`--peer-secret-file`).
    pub peer_secret_file: Option<PathBuf>,
    /// Joins a running cluster (`--join`): no members at the start; the leader that adds this
    /// node sends it the members with the log. `peers` then only says where they are.
    pub join: bool,
}

impl NodeConfig {
    pub fn cluster_id(&self) -> String {
        self.cluster_id.clone().unwrap_or_else(|| {
            let mut h = Sha256::new();
            for (id, addr) in &self.peers {
                h.update(format!("{id}={addr};"));
            }
            hex::encode(&h.finalize()[..8])
        })
    }
}

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub http_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub node: Node<MachineSet>,
    api: JoinHandle<()>,
    stop_http: tokio::sync::watch::Sender<bool>,
    _transport: PeerTransport<Message>,
}

/// How long a stopping node waits for HTTP requests in flight before it drops them.
pub const HTTP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl WireMessage for Message {
    fn encode(&self, out: &mut Vec<u8>) {
        Message::encode(self, out)
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        Message::decode(bytes).map_err(|e| e.to_string())
    }
}

struct TcpTransport(PeerTransport<Message>);

impl raft::Transport for TcpTransport {
    fn send(&self, to: NodeId, msg: Message) {
        self.0.send(to, msg)
    }

    /// Dials the members, at the addresses the membership records or else `--peers` gives (the
    /// first members are recorded without). A joining node, which knows no members yet,
    /// dials `--peers`. Whoever calls in is dialled back while connected (see the transport).
    fn set_members(&self, members: &Membership) {
        let initial = self.0.initial_peers();
        if members.is_empty() {
            return self.0.set_peers(initial);
        }
        let peers = members
            .ids()
            .filter_map(|id| {
                let address = members.address(id).or(initial.get(&id).map(String::as_str));
                Some((id, address?.to_owned()))
            })
            .collect();
        self.0.set_peers(&peers);
    }

    fn peer_address(&self, id: NodeId) -> Option<String> {
        self.0.peer_address(id)
    }
}

/// Whether `--raft` can be the address `--peers` gives for this node: the same port, and the
/// same IP unless `--raft` listens on every interface or the entry is a host name.
fn raft_addr_matches(entry: &str, raft: SocketAddr) -> bool {
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return addr.port() == raft.port()
            && (raft.ip().is_unspecified() || addr.ip() == raft.ip());
    }
    entry
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_some_and(|port| port == raft.port())
}

/// Starts every part of a node inside the current tokio runtime.
pub async fn start(cfg: NodeConfig) -> anyhow::Result<RunningNode> {
    anyhow::ensure!(
        !cfg.join || cfg.cluster_id.is_some(),
        "--join needs --cluster-id: the running cluster's id, as GET /v1/cluster shows it"
    );
    anyhow::ensure!(
        cfg.peers.contains_key(&cfg.id),
        "--peers must include this node's own id {}",
        cfg.id
    );
    let own = &cfg.peers[&cfg.id];
    // A warning, not a refusal: a port mapping (containers, NAT) may send peers to --raft.
    if !raft_addr_matches(own, cfg.raft_addr) {
        tracing::warn!(
            raft = %cfg.raft_addr,
            peers_entry = %own,
            "--raft is not this node's entry in --peers: peers dial the entry, so unless a port \
             mapping forwards it here they will never reach this node"
        );
    }
    anyhow::ensure!(
        cfg.advertise_http.is_some() || !cfg.http_addr.ip().is_unspecified(),
        "--http {} listens on every interface, so it is no address to send clients to: \
         say which one with --advertise-http HOST:PORT",
        cfg.http_addr
    );
    let peer_secret = match &cfg.peer_secret_file {
        Some(path) => read_peer_secret(path)?,
        None => Vec::new(),
    };
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let raft_listener = TcpListener::bind(cfg.raft_addr)
        .await
        .with_context(|| format!("binding the raft address {}", cfg.raft_addr))?;
    let http_listener = TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("binding the http address {}", cfg.http_addr))?;
    let raft_addr = raft_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let cluster_id = cfg.cluster_id();

    let engine = WasmEngine::new(cfg.limits.clone())?;
    let registry = Arc::new(ModuleRegistry::open(
        &engine,
        &cfg.data_dir.join("modules"),
    )?);
    let machines = MachineSet::new(registry.clone());
    let catalog = machines.catalog();
    let guest_errors = machines.error_counts();

    let log = LogStore::open(&cfg.data_dir.join("log.redb"))
        .with_context(|| format!("opening the log in {}", cfg.data_dir.display()))?;
    log.bind_cluster(&cluster_id)?;
    log.bind_limits(&cfg.limits.flags())?;
    // The members it starts with, until its log records some.
    let initial: Vec<NodeId> = if cfg.join {
        Vec::new()
    } else {
        cfg.peers.keys().copied().collect()
    };
    if !log.has_memberships()? {
        log.bind_members(&initial)?;
    }

    // Inbound messages may arrive before the node exists; those are dropped like any loss.
    let inbox: Arc<OnceLock<Node<MachineSet>>> = Arc::new(OnceLock::new());
    let sink = inbox.clone();
    let transport = PeerTransport::start(
        TransportConfig {
            cluster_id: cluster_id.clone(),
            node_id: cfg.id,
            http_addr: cfg
                .advertise_http
                .clone()
                .unwrap_or_else(|| http_addr.to_string()),
            apply_limits: engine.apply_identity(),
            peers: cfg.peers.clone(),
            max_frame_bytes: TransportConfig::DEFAULT_MAX_FRAME,
            queue_depth: 8192,
            peer_secret: crate::transport::PeerSecret(peer_secret),
        },
        raft_listener,
        move |from, msg| {
            if let Some(node) = sink.get() {
                node.receive(from, msg);
            }
        },
    );
    let members = initial;
    let raft_config = RaftConfig {
        max_unapplied_bytes: cfg.max_unapplied_bytes,
        snapshot_every: cfg.snapshot_every,
        snapshot_keep: cfg.snapshot_keep,
        ..RaftConfig::new(cfg.id, members)
    };
    let node = Node::start(
        raft_config,
        log,
        Arc::new(TcpTransport(transport.clone())),
        machines,
    )?;
    let _ = inbox.set(node.clone());

    let http_of = transport.clone();
    let raft_of = transport.clone();
    let state = Arc::new(ApiState {
        cluster_id,
        node: node.clone(),
        registry,
        catalog,
        raft_addr: Box::new(move |id| raft_of.peer_address(id)),
        http_addr: Box::new(move |id| http_of.http_addr(id)),
        metrics: api::metrics::Metrics::new(guest_errors),
        bodies: Default::default(),
    });
    let (stop_http, stop) = tokio::sync::watch::channel(false);
    let api = tokio::spawn(api::serve(http_listener, state, cfg.max_connections, stop));
    info!(id = cfg.id, %http_addr, %raft_addr, "node started");
    Ok(RunningNode {
        http_addr,
        raft_addr,
        node,
        api,
        stop_http,
        _transport: transport,
    })
}

/// The file's bytes, without the line ends an editor or `echo` leaves.
fn read_peer_secret(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let mut secret = std::fs::read(path)
        .with_context(|| format!("reading the peer secret file {}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    anyhow::ensure!(
        !secret.is_empty(),
        "the peer secret file {} is empty",
        path.display()
    );
    Ok(secret)
}

impl RunningNode {
    /// Stops serving HTTP, then resolves every pending task and stops the pipeline.
    pub async fn shutdown(mut self) {
        // Requests in flight are answered first (their tasks need the pipeline), within a
        // grace period; then whatever is left is dropped.
        let _ = self.stop_http.send(true);
        if tokio::time::timeout(HTTP_GRACE, &mut self.api)
            .await
            .is_err()
        {
            self.api.abort();
        }
        self.node.shutdown().await;
        info!(id = self.node.status().id, "node stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::{raft_addr_matches, read_peer_secret};

    #[test]
    fn a_peer_secret_file_loses_its_line_end_and_may_not_be_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\r\n").expect("write");
        assert_eq!(read_peer_secret(&file).expect("a secret"), b"s3cret");
        std::fs::write(&file, "\n").expect("write");
        let err = read_peer_secret(&file).expect_err("an empty secret");
        assert!(err.to_string().contains("is empty"), "{err}");
        let err = read_peer_secret(&dir.path().join("missing")).expect_err("no file");
        assert!(
            err.to_string().contains("reading the peer secret file"),
            "{err}"
        );
    }

    #[test]
    fn raft_must_be_this_nodes_entry_in_peers() {
        let raft = |s: &str| s.parse().expect("socket address");
        assert!(raft_addr_matches("127.0.0.1:7001", raft("127.0.0.1:7001")));
        assert!(raft_addr_matches("10.0.0.5:7001", raft("0.0.0.0:7001")));
        assert!(raft_addr_matches(
            "node1.internal:7001",
            raft("10.0.0.5:7001")
        ));
        assert!(!raft_addr_matches("127.0.0.1:7001", raft("127.0.0.1:7009")));
        assert!(!raft_addr_matches("10.0.0.5:7001", raft("10.0.0.6:7001")));
        assert!(!raft_addr_matches(
            "node1.internal:7002",
            raft("10.0.0.5:7001")
        ));
        assert!(!raft_addr_matches("garbage", raft("127.0.0.1:7001")));
    }
}
