//! Peer transport: persistent TCP connections carrying one-way Raft messages.
//!
//! Each node dials every peer once and keeps that connection for its own outbound messages;
//! what a peer sends back arrives on the connection the peer dialled. Messages are
//! fire-and-forget (Raft retries whatever is lost), so a full queue or a broken connection drops
//! messages instead of blocking the consensus loop. A writer drains everything queued for a peer
//! into one `write` call: under load many messages share a syscall. Peers are added as members
//! are (`set_peers`) and as callers say hello: a caller that proves the cluster's secret and
//! identity but is not known yet (a member added by a change this node has not seen) is dialled
//! at the peer address its hello gives, so this node can answer it. A peer neither named nor
//! calling in is no longer dialled.

pub mod frame;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use frame::{Challenge, FrameError, Hello, MAX_HELLO_BYTES, put_frame, put_frame_with, read_frame};

pub type NodeId = u64;

/// How long sent data may go unacknowledged, or an idle peer unanswered to keepalive probes,
/// before its connection is dropped. Without it a write into a partitioned peer's full socket
/// blocks for as long as TCP retransmits (many minutes), and the link stays stalled for up to
/// two minutes of retransmission backoff after the partition heals; a dialer instead
/// reconnects within its backoff (≤ 500 ms). A dead inbound connection frees its task too.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// A dial that gets no answer (SYNs dropped) is given up after this and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Socket options of every peer connection, dialled or accepted.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(PEER_TIMEOUT / 2)
        .with_interval(Duration::from_secs(1));
    let _ = sock.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = sock.set_tcp_user_timeout(Some(PEER_TIMEOUT));
}

/// A message the transport can carry: encoded by the sender's writer task, decoded by the
/// receiver's reader task, so neither costs the consensus loop any CPU.
pub trait WireMessage: Send + Sized + 'static {
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

/// Where the transport listens and whom it talks to.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Connections from another cluster are refused at the hello.
    pub cluster_id: String,
    pub node_id: NodeId,
    /// This node's HTTP address, told to every peer.
    pub http_addr: String,
    /// The limits this node applies entries under: a peer with others is refused at the hello,
    /// since the same entry could fail on one replica and succeed on another.
    pub apply_limits: String,
    /// Raft address of every member at the start, this node included.
    pub peers: BTreeMap<NodeId, String>,
    /// Hard limit on one frame; a larger length prefix closes the connection.
    pub max_frame_bytes: u32,
    /// Messages queued per peer before new ones are dropped.
    pub queue_depth: usize,
    /// What every member's hello must prove it holds (`--peer-secret-file`); empty: no secret,
    /// and anyone who can reach the port and knows the cluster id passes.
    pub peer_secret: PeerSecret,
}

/// The cluster's peer secret, kept out of any `Debug` output of the configuration.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PeerSecret(pub Vec<u8>);

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = if self.0.is_empty() { "none" } else { "set" };
        write!(f, "PeerSecret({set})")
    }
}

impl TransportConfig {
    /// A deploy carries up to 16 MiB of module in one entry; leave room for the envelope.
    pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024 * 1024;
}

type Handler<M> = Arc<dyn Fn(NodeId, M) + Send + Sync>;

/// Handle to the running transport. Dropping the last handle stops its tasks.
pub struct PeerTransport<M: WireMessage> {
    inner: Arc<Inner<M>>,
}

impl<M: WireMessage> Clone for PeerTransport<M> {
    fn clone(&self) -> Self {
        PeerTransport {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<M> {
    config: Arc<TransportConfig>,
    peers: Peers<M>,
    http_addrs: Arc<RwLock<HashMap<NodeId, String>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The peers this node dials. A peer is dialled while the last `set_peers` names it or while
/// it has a connection in, said hello on: a caller this node's log does not know yet (a member
/// added by a change not seen here, perhaps its leader) must be answered, and a removed member
/// still running must be told so, but a member removed and gone is not dialled forever.
struct Peers<M> {
    config: Arc<TransportConfig>,
    map: Arc<RwLock<HashMap<NodeId, Peer<M>>>>,
}

impl<M> Clone for Peers<M> {
    fn clone(&self) -> Self {
        Peers {
            config: self.config.clone(),
            map: self.map.clone(),
        }
    }
}

/// A peer this node dials: its address, the queue its dialler sends from, and where its
/// hello last said it is when that differs from the address (tried when the address fails).
struct Peer<M> {
    address: String,
    queue: mpsc::Sender<M>,
    dialler: JoinHandle<()>,
    elsewhere: Arc<Mutex<Option<String>>>,
    /// Named by the last `set_peers`.
    named: bool,
    /// Its connections in that said hello and are still open.
    callers: usize,
}

impl<M: WireMessage> Peer<M> {
    fn dial(id: NodeId, address: &str, config: &Arc<TransportConfig>) -> Self {
        let (queue, rx) = mpsc::channel(config.queue_depth.max(1));
        let elsewhere = Arc::new(Mutex::new(None));
        let dialler = tokio::spawn(dial_loop(
            id,
            address.to_owned(),
            config.clone(),
            rx,
            elsewhere.clone(),
        ));
        Peer {
            address: address.to_owned(),
            queue,
            dialler,
            elsewhere,
            named: false,
            callers: 0,
        }
    }
}

impl<M> Peer<M> {
    /// Whether it is still dialled.
    fn wanted(&self) -> bool {
        self.named || self.callers > 0
    }
}

impl<M> Drop for Peer<M> {
    fn drop(&mut self) {
        self.dialler.abort();
    }
}

impl<M: WireMessage> Peers<M> {
    /// Dials exactly `named` (this node aside) from now on, besides peers with a connection in.
    fn set(&self, named: &BTreeMap<NodeId, String>) {
        let Ok(mut map) = self.map.write() else {
            return;
        };
        map.retain(|id, p| {
            p.named = named.contains_key(id);
            p.wanted()
        });
        for (&id, address) in named {
            if id == self.config.node_id {
                continue;
            }
            let callers = match map.get(&id) {
                Some(p) if p.address == *address => continue,
                // Dialled at the new address from now on; its callers still count.
                Some(p) => p.callers,
                None => 0,
            };
            let mut p = Peer::dial(id, address, &self.config);
            p.named = true;
            p.callers = callers;
            map.insert(id, p);
        }
    }

    /// A caller proved it is member `id`, taking peer connections at `raft_addr`. Dials it
    /// there if this node does not yet; `None` if it cannot be reached (no address). The caller
    /// counts as connected until the returned guard drops.
    fn admit(&self, id: NodeId, raft_addr: &str) -> Option<Caller<M>> {
        let mut map = self.map.write().ok()?;
        if let Some(p) = map.get_mut(&id) {
            // A member that moved while this node missed the change (`move-member`) says
            // where it is now. Its dialler tries there whenever the address it was given
            // does not answer; the given one stays first, so a hello spelling the address
            // otherwise (a port mapping, a host name) changes nothing that works.
            if !raft_addr.is_empty()
                && p.address != raft_addr
                && let Ok(mut elsewhere) = p.elsewhere.lock()
                && elsewhere.as_deref() != Some(raft_addr)
            {
                info!(peer = id, dialled = %p.address, %raft_addr, "a peer says it is elsewhere");
                *elsewhere = Some(raft_addr.to_owned());
            }
            p.callers += 1;
        } else {
            if raft_addr.is_empty() {
                return None;
            }
            info!(peer = id, %raft_addr, "a peer this node did not know: dialling it");
            let mut p = Peer::dial(id, raft_addr, &self.config);
            p.callers = 1;
            map.insert(id, p);
        }
        Some(Caller {
            peers: self.map.clone(),
            id,
        })
    }
}

/// A peer's connection in, from its hello until it closes (see `Peers`).
struct Caller<M> {
    peers: Arc<RwLock<HashMap<NodeId, Peer<M>>>>,
    id: NodeId,
}

impl<M> Drop for Caller<M> {
    fn drop(&mut self) {
        let Ok(mut map) = self.peers.write() else {
            return;
        };
        if let Some(p) = map.get_mut(&self.id) {
            p.callers = p.callers.saturating_sub(1);
            if !p.wanted() {
                debug!(
                    peer = self.id,
                    "no longer a member nor connected: not dialled"
                );
                map.remove(&self.id);
            }
        }
    }
}

impl<M> Drop for Inner<M> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Callers' guards may outlive the transport: stop the diallers now.
        if let Ok(mut peers) = self.peers.map.write() {
            peers.clear();
        }
    }
}

impl<M: WireMessage> PeerTransport<M> {
    /// Starts accepting on `listener` and dialling every other member. Each decoded inbound
    /// message is handed to `on_message` together with the sender's id.
    pub fn start(
        config: TransportConfig,
        listener: TcpListener,
        on_message: impl Fn(NodeId, M) + Send + Sync + 'static,
    ) -> Self {
        let config = Arc::new(config);
        let on_message: Handler<M> = Arc::new(on_message);
        let http_addrs = Arc::new(RwLock::new(HashMap::from([(
            config.node_id,
            config.http_addr.clone(),
        )])));
        let peers = Peers {
            config: config.clone(),
            map: Arc::default(),
        };
        let tasks = vec![tokio::spawn(accept_loop(
            listener,
            config.clone(),
            http_addrs.clone(),
            on_message,
            peers.clone(),
        ))];
        let transport = PeerTransport {
            inner: Arc::new(Inner {
                config: config.clone(),
                peers,
                http_addrs,
                tasks,
            }),
        };
        transport.set_peers(&config.peers);
        transport
    }

    /// Dials `peers` (this node's own entry aside) from now on, at the addresses given: a
    /// peer at a new address is dialled there. A peer not named is dropped unless it has a
    /// connection in (see `Peers`).
    pub fn set_peers(&self, peers: &BTreeMap<NodeId, String>) {
        self.inner.peers.set(peers);
    }

    /// The address this node dials `id` at.
    pub fn peer_address(&self, id: NodeId) -> Option<String> {
        if id == self.inner.config.node_id {
            return self.inner.config.peers.get(&id).cloned();
        }
        let peers = self.inner.peers.map.read().ok()?;
        peers.get(&id).map(|p| p.address.clone())
    }

    /// The addresses this node was started with (`--peers`).
    pub fn initial_peers(&self) -> &BTreeMap<NodeId, String> {
        &self.inner.config.peers
    }

    /// Queues `msg` for `to`; drops it when the peer is unknown or its queue is full.
    pub fn send(&self, to: NodeId, msg: M) {
        let Ok(peers) = self.inner.peers.map.read() else {
            return;
        };
        if let Some(p) = peers.get(&to)
            && p.queue.try_send(msg).is_err()
        {
            debug!(to, "peer queue full or closed: message dropped");
        }
    }

    /// The HTTP address `id` announced in its hello (this node's own is always known).
    pub fn http_addr(&self, id: NodeId) -> Option<String> {
        self.inner
            .http_addrs
            .read()
            .ok()
            .and_then(|m| m.get(&id).cloned())
    }
}

/// Inbound connections that have not said hello yet. A peer sends its hello as soon as it has
/// the node's challenge, so beyond this many the oldest is closed: a flood of silent connections can
/// neither use up the node's file descriptors nor keep a real peer out (it would have to open
/// this many connections within a peer's first round trip).
const MAX_PENDING_INBOUND: usize = 16;

/// The node's inbound peer connections: those awaiting their hello, oldest first, and one per
/// member after it (a member's newer connection replaces its older one: the dialler uses only
/// its latest).
#[derive(Default)]
struct Inbound {
    next: u64,
    pending: VecDeque<(u64, tokio::task::AbortHandle)>,
    members: HashMap<NodeId, (u64, tokio::task::AbortHandle)>,
}

impl Inbound {
    fn admit(&mut self, conn: u64, task: tokio::task::AbortHandle) {
        self.pending.push_back((conn, task));
        while self.pending.len() > MAX_PENDING_INBOUND {
            if let Some((_, oldest)) = self.pending.pop_front() {
                oldest.abort();
            }
        }
    }

    /// `conn` said hello as `member`. False when the member already has a newer connection
    /// (whose hello was read first): then this one is closed instead.
    fn promote(&mut self, conn: u64, member: NodeId) -> bool {
        let at = self.pending.iter().position(|(c, _)| *c == conn);
        let Some((_, task)) = at.and_then(|at| self.pending.remove(at)) else {
            return false;
        };
        if self
            .members
            .get(&member)
            .is_some_and(|(newer, _)| *newer > conn)
        {
            return false;
        }
        if let Some((_, older)) = self.members.insert(member, (conn, task)) {
            older.abort();
        }
        true
    }

    fn forget(&mut self, conn: u64) {
        self.pending.retain(|(c, _)| *c != conn);
        self.members.retain(|_, (c, _)| *c != conn);
    }
}

type SharedInbound = Arc<Mutex<Inbound>>;

fn inbound(shared: &SharedInbound) -> std::sync::MutexGuard<'_, Inbound> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn accept_loop<M: WireMessage>(
    listener: TcpListener,
    config: Arc<TransportConfig>,
    http_addrs: Arc<RwLock<HashMap<NodeId, String>>>,
    on_message: Handler<M>,
    peers: Peers<M>,
) {
    let conns = SharedInbound::default();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                warn!(error = %e, "raft accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Held until the connection is admitted: its task cannot promote or forget it before.
        let mut registry = inbound(&conns);
        registry.next += 1;
        let conn = registry.next;
        let (config, http_addrs, on_message, shared, peers) = (
            config.clone(),
            http_addrs.clone(),
            on_message.clone(),
            conns.clone(),
            peers.clone(),
        );
        let task = tokio::spawn(async move {
            let served = serve_inbound(
                stream,
                &config,
                &http_addrs,
                &on_message,
                &peers,
                |member| inbound(&shared).promote(conn, member),
            )
            .await;
            inbound(&shared).forget(conn);
            if let Err(e) = served {
                match e {
                    FrameError::Closed => debug!(%remote, "peer connection closed"),
                    e => warn!(%remote, error = %e, "closing raft connection"),
                }
            }
        });
        registry.admit(conn, task.abort_handle());
    }
}

async fn serve_inbound<M: WireMessage>(
    stream: TcpStream,
    config: &TransportConfig,
    http_addrs: &RwLock<HashMap<NodeId, String>>,
    on_message: &Handler<M>,
    peers: &Peers<M>,
    said_hello: impl FnOnce(NodeId) -> bool,
) -> Result<(), FrameError> {
    tune(&stream);
    let mut stream = stream;
    let mut buf = Vec::new();
    let nonce: [u8; 32] = rand::random();
    let challenge = Challenge {
        node_id: config.node_id,
        nonce,
    };
    put_frame(&mut buf, &challenge.encode());
    // A silent connection must not hold a task forever. The hello is read unbuffered: a
    // stranger gets no large buffer before it has said who it is.
    tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&buf).await?;
        read_frame(&mut stream, MAX_HELLO_BYTES, &mut buf).await
    })
    .await
    .map_err(|_| FrameError::BadHello("no hello within 5 s"))??;
    let hello = Hello::decode(&buf)?;
    // First, before anything in the hello is believed or answered to.
    if !hello.proves(&config.peer_secret.0, &nonce) {
        return Err(FrameError::Refused(if config.peer_secret.0.is_empty() {
            format!(
                "a caller posing as node {} proves a peer secret this node was not given: start \
                 every member with the same --peer-secret-file, or none",
                hello.node_id
            )
        } else {
            format!(
                "a caller posing as node {} does not hold this node's peer secret: start every \
                 member with the same --peer-secret-file",
                hello.node_id
            )
        }));
    }
    if hello.cluster_id != config.cluster_id {
        return Err(FrameError::Refused(format!(
            "node {} belongs to cluster {:?}, this one is {:?}",
            hello.node_id, hello.cluster_id, config.cluster_id
        )));
    }
    if hello.apply_limits != config.apply_limits {
        return Err(FrameError::Refused(format!(
            "node {} applies entries under other limits ({:?}) than this node ({:?}): replicas \
             would diverge; start every member with the same --fuel-per-task and --memory-mib",
            hello.node_id, hello.apply_limits, config.apply_limits
        )));
    }
    if hello.node_id == config.node_id {
        return Err(FrameError::BadHello("peer id is not a member"));
    }
    // Held while the connection is open: the caller is dialled back until it closes.
    let Some(_caller) = peers.admit(hello.node_id, &hello.raft_addr) else {
        return Err(FrameError::BadHello("peer id is not a member"));
    };
    let from = hello.node_id;
    if !said_hello(from) {
        debug!(from, "the member has a newer connection; closing this one");
        return Err(FrameError::Closed);
    }
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    if let Ok(mut m) = http_addrs.write() {
        m.insert(from, hello.http_addr);
    }
    debug!(from, "peer connected");
    loop {
        read_frame(&mut reader, config.max_frame_bytes, &mut buf).await?;
        let msg = M::decode(&buf).map_err(FrameError::BadMessage)?;
        on_message(from, msg);
    }
}

async fn dial_loop<M: WireMessage>(
    peer: NodeId,
    addr: String,
    config: Arc<TransportConfig>,
    mut rx: mpsc::Receiver<M>,
    elsewhere: Arc<Mutex<Option<String>>>,
) {
    let mut hello = Hello {
        cluster_id: config.cluster_id.clone(),
        node_id: config.node_id,
        http_addr: config.http_addr.clone(),
        raft_addr: config
            .peers
            .get(&config.node_id)
            .cloned()
            .unwrap_or_default(),
        apply_limits: config.apply_limits.clone(),
        proof: [0; 32],
    };
    let mut buf = Vec::new();
    let mut backoff = Duration::from_millis(20);
    let mut out = Vec::with_capacity(64 * 1024);
    // Where the peer was last found, if not at `addr`: tried first next time.
    let mut found_elsewhere = false;
    // A refusal is warned about once, not at every retry (an address now another member's
    // would otherwise log twice a second for as long as this node runs).
    let mut warned = String::new();
    loop {
        // The address it was given first, then where its hello said it is: whatever answers
        // at the one (nothing, a stranger, another member), the other is tried.
        let other = elsewhere.lock().ok().and_then(|a| a.clone());
        let (first, second) = match other.as_deref() {
            Some(other) if found_elsewhere => (other, Some(addr.as_str())),
            other => (addr.as_str(), other),
        };
        let mut greeted = None;
        for at in [Some(first), second].into_iter().flatten() {
            match greet(peer, at, &mut buf).await {
                Ok(ok) => {
                    greeted = Some((ok, at));
                    break;
                }
                Err(e) => report(peer, at, &e, &mut warned),
            }
        }
        let ((mut stream, nonce), at) = match greeted {
            Some(greeted) => greeted,
            None => {
                // Whatever queued meanwhile is stale; Raft resends what still matters.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        found_elsewhere = at != addr;
        if found_elsewhere {
            info!(%addr, %at, "dialled the peer where it says it is");
        }
        let at = at.to_owned();
        warned.clear();
        hello.seal(&config.peer_secret.0, &nonce);
        out.clear();
        put_frame(&mut out, &hello.encode());
        if stream.write_all(&out).await.is_err() {
            tokio::time::sleep(backoff).await;
            continue;
        }
        info!(peer, %at, "connected to peer");
        let connected = std::time::Instant::now();
        loop {
            let Some(first) = rx.recv().await else {
                return;
            };
            out.clear();
            put_frame_with(&mut out, |out| first.encode(out));
            // Coalesce whatever else is already queued into the same write.
            while out.len() < 1024 * 1024 {
                match rx.try_recv() {
                    Ok(m) => put_frame_with(&mut out, |out| m.encode(out)),
                    Err(_) => break,
                }
            }
            if let Err(e) = stream.write_all(&out).await {
                debug!(peer, %at, error = %e, "peer write failed; reconnecting");
                break;
            }
        }
        // A peer that refuses the hello (another cluster, other limits) closes at once: back
        // off as from a failed dial instead of reconnecting for every message.
        if connected.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        } else {
            backoff = Duration::from_millis(20);
        }
    }
}

/// Logs why member `peer` could not be greeted at `at`: a refusal (another protocol, another
/// member answering there) as a warning, once until it changes; anything else (nothing
/// listening, the peer down) at debug level.
fn report(peer: NodeId, at: &str, e: &FrameError, warned: &mut String) {
    let text = e.to_string();
    if matches!(e, FrameError::Refused(_)) && text != *warned {
        warn!(peer, %at, error = %text, "cannot talk to the peer");
        *warned = text;
    } else {
        debug!(peer, %at, error = %text, "peer not reachable");
    }
}

/// Dials member `peer` at `addr` and reads its challenge: the connection and the nonce the
/// hello proves the secret over. Whatever else answers there is an error.
async fn greet(
    peer: NodeId,
    addr: &str,
    buf: &mut Vec<u8>,
) -> Result<(TcpStream, [u8; 32]), FrameError> {
    let mut stream = dial(addr).await?;
    tune(&stream);
    tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut stream, MAX_HELLO_BYTES, buf),
    )
    .await
    .map_err(|_| FrameError::BadHello("no challenge within 5 s"))??;
    let challenge = Challenge::decode(buf)?;
    if challenge.node_id != peer {
        return Err(FrameError::Refused(format!(
            "member {} answers there, not member {peer}",
            challenge.node_id
        )));
    }
    Ok((stream, challenge.nonce))
}

/// Connects to `addr` (HOST:PORT), trying each address it resolves to for at most
/// `CONNECT_TIMEOUT` (the name lookup itself is not bounded by it).
async fn dial(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for a in tokio::net::lookup_host(addr).await? {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::ErrorKind::TimedOut.into(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests;
